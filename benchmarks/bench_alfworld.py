"""ALFWorld environment throughput: steps per second with many games in parallel, reset time, memory.

    .venv/bin/python benchmarks/bench_alfworld.py                      # 8 and 32 games, CPU-count workers
    .venv/bin/python benchmarks/bench_alfworld.py --batch-sizes 8 32 128 --workers 16 --out bench_results/x.json

For each batch size B: start the environment, reset B different games (the first reset also starts the
workers), reset B other games (loading new games, as at each training iteration), reset the same B games
again (no reload), then play `--steps` steps in which every game takes a random admissible action.
Memory is the resident set (VmRSS) of each worker process after the steps; the per-game figure comes from
comparing batch sizes (same workers, more games each).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from t2po.envs import make_env


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def run_batch(split: str, batch_size: int, num_workers: int | None, steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    with make_env("alfworld", split=split, num_workers=num_workers) as env:
        seeds = list(range(batch_size))
        start = time.perf_counter()
        env.reset(seeds)
        first_reset = time.perf_counter() - start
        start = time.perf_counter()
        env.reset([s + batch_size for s in seeds])
        new_games_reset = time.perf_counter() - start
        start = time.perf_counter()
        states = env.reset([s + batch_size for s in seeds])
        same_games_reset = time.perf_counter() - start

        actions_taken = 0
        start = time.perf_counter()
        for _ in range(steps):
            actions = [None if s.done else rng.choice(s.admissible_actions) for s in states]
            actions_taken += sum(a is not None for a in actions)
            new_states = env.step(actions)
            states = [new if new is not None else old for old, new in zip(states, new_states)]
        step_time = time.perf_counter() - start
        worker_rss = [rss_mb(pid) for pid in env.worker_pids]
        return {
            "batch_size": batch_size,
            "num_workers": len(worker_rss),
            "games_per_worker": batch_size / len(worker_rss),
            "first_reset_s": round(first_reset, 2),
            "reset_new_games_s": round(new_games_reset, 2),
            "reset_same_games_s": round(same_games_reset, 2),
            "steps": actions_taken,
            "steps_per_s": round(actions_taken / step_time, 2),
            "worker_rss_mb": [round(r, 1) for r in worker_rss],
            "worker_rss_mb_mean": round(statistics.mean(worker_rss), 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--steps", type=int, default=10, help="steps per game")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/alfworld.json")
    args = parser.parse_args()

    results = [run_batch(args.split, b, args.workers, args.steps, args.seed) for b in args.batch_sizes]
    report = {
        "benchmark": "alfworld",
        "split": args.split,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "results": results,
    }
    same_workers = [r for r in results if r["num_workers"] == results[-1]["num_workers"]]
    if len(same_workers) >= 2:
        small, large = same_workers[0], same_workers[-1]
        extra_games = large["games_per_worker"] - small["games_per_worker"]
        if extra_games > 0:
            per_game = (large["worker_rss_mb_mean"] - small["worker_rss_mb_mean"]) / extra_games
            report["rss_mb_per_game"] = round(per_game, 1)
            without_games = small["worker_rss_mb_mean"] - per_game * small["games_per_worker"]
            report["rss_mb_worker_without_games"] = round(without_games, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['batch_size']:4d} games / {r['num_workers']} workers: {r['steps_per_s']:7.2f} steps/s, "
            f"reset {r['first_reset_s']:.1f} s (first, starts workers) / {r['reset_new_games_s']:.1f} s (new games) / "
            f"{r['reset_same_games_s']:.1f} s (same games), worker RSS {r['worker_rss_mb_mean']:.0f} MB"
        )
    if "rss_mb_per_game" in report:
        print(f"memory: {report['rss_mb_worker_without_games']:.0f} MB per worker + {report['rss_mb_per_game']:.1f} MB "
              "per game")
    print(f"load average during the run: {report['load_average_1min']} on {report['cpu_count']} CPUs; written to {out}")


if __name__ == "__main__":
    main()
