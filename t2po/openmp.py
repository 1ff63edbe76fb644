"""OpenMP settings that hold up on a busy machine, applied before torch is imported (`t2po/__init__.py`).

torch's CPU wheel runs its parallel regions on GNU OpenMP (libgomp, shipped in torch/lib). By default
libgomp's idle threads spin for ~300,000 iterations before they sleep. On an idle machine that saves
a wake-up per parallel region; on a machine where anything else runs (a browser, another job, a CI
neighbour), a spinning thread holds a core that the thread it waits for needs, and a decode step
becomes 10-30x slower (issue 25's measurement: 0.9 steps/s with the defaults, 17.1 with no spinning).
A short spin (`GOMP_SPINCOUNT`) keeps the idle speed and lets threads give their core back quickly;
`benchmarks/bench_contention.py` measures the choice (docs/results/contention.json).

The thread count comes from the cores this process may actually use: its CPU affinity and, in a
container, its cgroup CPU quota, not the machine's core count (which is what torch would use).

Everything is set with `os.environ.setdefault`, so a value the user exported wins, and it is set in
`os.environ`, so subprocesses (environment workers, the retrieval server, Ray workers started by this
process, vLLM) inherit it. `T2PO_OPENMP=default` leaves OpenMP exactly as torch would have it. The
settings only take effect if t2po is imported before torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

SPIN_COUNT = "1000"   # libgomp's own default for oversubscribed threads; see the module docstring


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of quota (cpu.max `QUOTA PERIOD` in v2, cfs_quota_us / cfs_period_us in v1), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def configure(environ: os._Environ | dict = os.environ) -> dict[str, str]:
    """Set the OpenMP environment (user's values win); returns what t2po set."""
    if environ.get("T2PO_OPENMP", "").lower() == "default":
        return {}
    wanted = {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_NUM_THREADS": str(available_cpus())}
    if "OMP_WAIT_POLICY" in environ:  # the user chose a wait policy: GOMP_SPINCOUNT would override it
        wanted.pop("GOMP_SPINCOUNT")
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied
