"""Does the main job's RL teach the agent its task? Seeds of the main job, each against its own warm-up
and the reference points, with a 95 % interval for RL's gain (issue 26).

    python benchmarks/learning.py --seeds 0 1 2 3 4 --out /tmp/learning --json docs/results/learning.json
    python benchmarks/learning.py --seeds 0 --set rollout.num_tasks=8     # any dotted overrides for every run

- Each seed is one `t2po train PRESET trainer.seed=S` (a fresh process, as a user runs it) in
  `<out>/seed<S>`; a finished run (its summary.json) is skipped, so the study can run in parts.
- `--imitation`: per seed (or per `--imitation-seeds`) also a run without RL whose warm-up gets more
  demonstrations and epochs (`--imitation-set`), the "same compute spent on more imitation" comparison.
- `--untouched`: one run (seed 0) that validates the model before any training, through the same validation
  (`UNTOUCHED`: no warm-up, no iteration, `trainer.val_before_train=true`), the "untouched model" reference.
- The JSON (rewritten after every run): per seed the held-out success after the warm-up and after RL,
  every validation (the learning curve) with its per-task outcomes, the random mover and the expert on
  the same tasks, generated tokens, wall time, the machine's load average, the resolved config; and a
  summary: RL's gain over the warm-up per seed, its mean with a 95 % t-interval over seeds, a paired
  per-task interval, and how many seeds end above the random mover.
Nothing here picks settings: choose them on the training split (`env.val_options={split: train}`), report
on the held-out one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# two-sided 95 % Student t quantiles by degrees of freedom (1..30); normal beyond
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> dict:
    """Mean and two-sided 95 % t-interval of `values` (None with fewer than two)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return {"mean": mean, "n": n, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T95[n - 2] if n - 1 <= len(T95) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "n": n, "sd": sd, "ci95": [mean - half, mean + half]}


def run(preset: str, seed: int, run_dir: Path, overrides: list[str]) -> float:
    """`t2po train` in its own process; returns its wall seconds (0 when the run had finished before)."""
    if (run_dir / "summary.json").exists():
        return 0.0
    args = ["--resume", str(run_dir)] if (run_dir / "config.yaml").exists() else \
        [preset, f"trainer.seed={seed}", f"trainer.output_dir={run_dir.parent}",
         f"trainer.run_name={run_dir.name}", *overrides]
    start = time.time()
    subprocess.run([sys.executable, "-m", "t2po.cli", "train", *args, "--quiet"], check=True, cwd=ROOT)
    return time.time() - start


def read_run(run_dir: Path, wall: float | None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    validations = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    state = json.loads((run_dir / "run_state.json").read_text()) if (run_dir / "run_state.json").exists() else {}
    info = json.loads((run_dir / "study.json").read_text()) if (run_dir / "study.json").exists() else {}
    return {
        "run_dir": str(run_dir),
        "commit": info.get("commit"),
        "dirty_worktree": info.get("dirty"),
        "after_warmup": (summary.get("after_warmup") or {}).get("success_rate"),
        "after_rl": (summary.get("after_rl") or {}).get("success_rate"),
        "valid_action_rate_after_rl": (summary.get("after_rl") or {}).get("valid_action_rate"),
        "references": summary.get("references"),
        "validations": [{k: v.get(k)
                         for k in ("tag", "success_rate", "success_stderr", "invalid_action_rate", "episode_length",
                                               "per_task_success", "seconds")} for v in validations],
        "iterations": [{k: m.get(k) for k
            in ("iteration", "rollout/success_rate", "rollout/invalid_action_rate", "rollout/generated_tokens",
                                              "rollout/tti_stagnation_triggers", "rollout/tti_budget_triggers",
                                              "rollout/tds_flag_rate",
                                              "actor/approx_kl", "time/iteration")} for m in metrics],
        "generated_tokens": sum(m.get("rollout/generated_tokens", 0) for m in metrics),
        "warmup": state.get("warmup", {}) and {k: state["warmup"].get(k) for k in ("episodes", "steps", "seconds")},
        "train_seconds": summary.get("seconds"),
        "wall_seconds": info.get("wall_seconds", wall),
        "load_average_before": info.get("load_average_before"),
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
    }


UNTOUCHED = ["warmup.episodes=0", "trainer.iterations=0", "trainer.val_before_train=true"]


def summarize(seeds: dict, imitation: dict, untouched: dict | None = None) -> dict:
    gains = [r["after_rl"] - r["after_warmup"] for r in seeds.values() if r["after_rl"] is not None
             and r["after_warmup"] is not None]
    # per task, pooled over seeds: after RL minus after warm-up (paired on the same rooms)
    paired = []
    for r in seeds.values():
        by_tag = {v["tag"]: v.get("per_task_success") for v in r["validations"]}
        if by_tag.get("final") and by_tag.get("after_warmup"):
            paired += [a - b for a, b in zip(by_tag["final"], by_tag["after_warmup"])]
    out = {
        "seeds": len(seeds),
        "after_warmup": t_interval([r["after_warmup"] for r in seeds.values() if r["after_warmup"] is not None]),
        "after_rl": t_interval([r["after_rl"] for r in seeds.values() if r["after_rl"] is not None]),
        "rl_gain_over_warmup": t_interval(gains),
        "rl_gain_per_task_pooled": t_interval(paired) if paired else None,
        "seeds_above_random": sum(1 for r in seeds.values() if r["after_rl"] is not None and r["references"]
                                  and r["references"].get("random")
                                  and r["after_rl"] > r["references"]["random"]["success"]),
        "seeds_above_warmup": sum(1 for g in gains if g > 0),
    }
    if imitation:
        imit = [imitation[s]["after_warmup"] for s in imitation]
        out["imitation_only"] = t_interval(imit)
        diffs = [seeds[s]["after_rl"] - imitation[s]["after_warmup"] for s in imitation if s in seeds
                 and seeds[s]["after_rl"] is not None]
        out["rl_minus_imitation_only"] = t_interval(diffs) if diffs else None
    if untouched:
        first = untouched["validations"][0]
        out["untouched"] = {k: first[k] for k in ("success_rate", "success_stderr", "invalid_action_rate")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides for every run")
    parser.add_argument("--imitation", action="store_true", help="also run imitation only (no RL) per seed")
    parser.add_argument("--imitation-seeds", type=int, nargs="+", default=None,
                        help="the seeds of the imitation-only runs (default: --seeds)")
    parser.add_argument("--imitation-set", nargs="*",
                        default=["trainer.iterations=0", "warmup.episodes=192", "warmup.epochs=4"],
                        help="the imitation-only runs' overrides (on top of --set)")
    parser.add_argument("--untouched", action="store_true", help="also validate the untouched model (seed 0)")
    parser.add_argument("--out", default="bench_results/learning")
    parser.add_argument("--json", default=None, help="default: <out>/learning.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or out / "learning.json")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    seeds, imitation, untouched = {}, {}, {}
    jobs = [(s, "seed", args.set) for s in args.seeds] + ([(s, "imitation", args.set + args.imitation_set)
                                                           for s in args.imitation_seeds or args.seeds]
                                                          if args.imitation else []) \
        + ([(0, "untouched", args.set + UNTOUCHED)] if args.untouched else [])
    for seed, kind, overrides in jobs:
        run_dir = out / f"{kind}{seed}"
        load = os.getloadavg()
        print(f"[learning] {kind} seed {seed}: {run_dir}", flush=True)
        wall = run(args.preset, seed, run_dir, overrides)
        if wall:
            (run_dir / "study.json").write_text(json.dumps({"wall_seconds": wall, "load_average_before": load,
                                                            "commit": commit, "dirty": dirty}))
        arm = {"seed": seeds, "imitation": imitation, "untouched": untouched}[kind]
        arm[seed] = read_run(run_dir, wall or None)
        result = {"commit": commit, "dirty_worktree": dirty, "preset": args.preset, "overrides": args.set,
                  "imitation_overrides": args.imitation_set if args.imitation else None,
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "summary": summarize(seeds, imitation, untouched.get(0)),
                  "runs": {str(k): v for k, v in seeds.items()},
                  "imitation_runs": {str(k): v for k, v in imitation.items()},
                  **({"untouched_run": untouched[0]} if untouched else {})}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
        done = arm[seed]  # an imitation run's own figures, not its seed's
        print(f"[learning] {kind} seed {seed}: after warm-up {done['after_warmup']}, after RL {done['after_rl']}; "
              f"summary {json.dumps(result['summary'])}", flush=True)


if __name__ == "__main__":
    main()
