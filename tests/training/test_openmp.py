"""OpenMP settings (t2po/openmp.py): applied on `import t2po`, before torch reads them, and a user's own value wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from t2po import openmp

PROBE = """
import json, os, sys
import t2po
assert "torch" not in sys.modules, "t2po imported torch before setting OpenMP"
import torch
print(json.dumps({"env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
                  "threads": torch.get_num_threads(), "applied": t2po.OPENMP_SETTINGS}))
"""


def _probe(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "T2PO_OPENMP")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_settings_reach_torch_from_the_available_cores():
    got = _probe()
    assert got["env"]["GOMP_SPINCOUNT"] == openmp.SPIN_COUNT
    assert got["env"]["OMP_NUM_THREADS"] == str(openmp.available_cpus())
    assert got["threads"] == openmp.available_cpus()  # torch read the value t2po set
    assert got["applied"] == {"GOMP_SPINCOUNT": openmp.SPIN_COUNT, "OMP_NUM_THREADS": str(openmp.available_cpus())}


def test_a_users_own_values_win():
    got = _probe(GOMP_SPINCOUNT="77", OMP_NUM_THREADS="1")
    assert got["env"] == {"GOMP_SPINCOUNT": "77", "OMP_NUM_THREADS": "1"}
    assert got["threads"] == 1 and got["applied"] == {}
    # a wait policy of the user's: GOMP_SPINCOUNT would override it, so t2po leaves the spin count alone
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["env"]["GOMP_SPINCOUNT"] is None
    # T2PO_OPENMP=default: OpenMP exactly as torch has it
    assert _probe(T2PO_OPENMP="default")["applied"] == {}


def test_subprocesses_inherit_the_settings():
    # environment workers, the retrieval server and Ray workers are started from os.environ
    child = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_NUM_THREADS'))"
    parent = (f"import subprocess, sys, t2po; print(subprocess.run([sys.executable, '-c', {child!r}], "
              "capture_output=True, text=True).stdout)")
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "T2PO_OPENMP")}
    out = subprocess.run([sys.executable, "-c", parent], env=base, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [openmp.SPIN_COUNT, str(openmp.available_cpus())]


def test_cgroup_quota_caps_the_thread_count(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota
    assert openmp.available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert openmp.available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert openmp.available_cpus(tmp_path) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert openmp.available_cpus(tmp_path) == 1
