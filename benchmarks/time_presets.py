"""Wall-clock time of every CPU preset's `t2po train` run, one after another, on this machine.

    python benchmarks/time_presets.py --out runs/presets --json docs/results/presets.json
    python benchmarks/time_presets.py --presets alfworld-cpu search-cpu   # a subset

Presets: `default` (the main job), `smoke` and every `t2po/configs/*-cpu.yaml`. Each runs as its own
`python -m t2po.cli train PRESET` process (interpreter start, installation excluded: what a user
waits for after `t2po train PRESET`), with `HF_HUB_OFFLINE=1`, into `<out>/<preset>`. The runs are
sequential: two at once on a 2-core machine would each take several times longer.

Per preset the JSON holds the command's wall seconds, t2po's own clock (`summary.json` `seconds`:
setup to the final validation), the peak resident memory of the process, its exit status, the
iterations and the held-out validation (success and valid-action rate after the warm-up and after
RL). It is rewritten after every preset, so a stopped benchmark keeps what it measured; a preset
whose entry and run folder exist is skipped on the next call (`--again` reruns it).
The JSON records the CPU kind (model name, the AVX2 / AVX-512 / AVX512-BF16 / AMX flags) and the
dtype `model.dtype: auto` picks on it, since the same job runs bfloat16 on an AVX512-BF16/AMX CPU and
float32 elsewhere. `--emulate-avx2` runs on a newer CPU as an AVX2-only one would: ATen, oneDNN and MKL
kernels capped at AVX2 (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`) and
`model.dtype=float32` (what `auto` picks without bf16 hardware); the JSON says so.
Nothing here asserts: the README's preset times are read from this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_presets() -> list[str]:
    return ["default", "smoke", *sorted(p.stem for p in (REPO / "t2po" / "configs").glob("*-cpu.yaml"))]


def held_out(summary: dict, key: str) -> dict | None:
    v = summary.get(key)
    return {"success_rate": v["success_rate"], "valid_action_rate": v["valid_action_rate"]} if v else None


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_kind(emulate_avx2: bool) -> dict:
    """The CPU model, its vector/matrix extensions, and the dtype `model.dtype: auto` resolves to."""
    import torch

    from t2po.models import native_bf16

    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
                break
    except OSError:
        pass
    info["auto_dtype"] = "float32" if emulate_avx2 else str(torch.bfloat16 if native_bf16()
                                                            else torch.float32).removeprefix("torch.")
    if emulate_avx2:
        info["emulated"] = {"as": "AVX2-only CPU, float32", **AVX2_ONLY}
    return info


def time_preset(preset: str, out: Path, overrides: list[str], env: dict | None = None) -> dict:
    run_dir = out / preset
    cmd = [sys.executable, "-m", "t2po.cli", "train", preset, f"trainer.output_dir={out}",
           f"trainer.run_name={preset}", *overrides]
    log = out / f"{preset}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - start
    entry = {"command": " ".join(["t2po", "train", preset, *overrides]),
             "exit_status": os.waitstatus_to_exitcode(status),
             "wall_seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "log": str(log)}
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        entry.update({"t2po_seconds": round(summary["seconds"], 1), "env": summary["env"], "algo": summary["algo"],
                      "iterations": summary["iterations"], "validation_tasks": summary.get("validation_tasks"),
                      "after_warmup": held_out(summary, "after_warmup"), "after_rl": held_out(summary, "after_rl")})
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None,
                        help="default: the main job, smoke and every *-cpu preset")
    parser.add_argument("--out", type=Path, default=Path("runs/presets"), help="the run folders and their console logs")
    parser.add_argument("--json", type=Path, default=Path("bench_results/presets.json"))
    parser.add_argument("--again", action="store_true", help="rerun presets the JSON already holds")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides for every run")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run as an AVX2-only CPU would (kernels capped at AVX2, float32)")
    args = parser.parse_args()
    if args.emulate_avx2:
        args.set = [*args.set, "model.dtype=float32"]
    presets = args.presets or cpu_presets()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results.update({"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                "python": platform.python_version(),
                                "cpu": cpu_kind(args.emulate_avx2), "load_average": os.getloadavg()},
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=REPO).stdout.strip()})
    runs = results.setdefault("presets", {})
    for preset in presets:
        if preset in runs and (out / preset).exists() and not args.again:
            print(f"[presets] {preset}: measured already ({runs[preset]['wall_seconds']} s), skipped", flush=True)
            continue
        if (out / preset).exists():
            shutil.rmtree(out / preset)
        print(f"[presets] {preset} ...", flush=True)
        runs[preset] = time_preset(preset, out, args.set, AVX2_ONLY if args.emulate_avx2 else None)
        r = runs[preset]
        print(f"[presets] {preset}: {r['wall_seconds'] / 60:.1f} min (t2po "
              f"{r.get('t2po_seconds', float('nan')) / 60:.1f} min), exit {r['exit_status']}, peak {r['peak_rss_mb']} "
              "MB", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
