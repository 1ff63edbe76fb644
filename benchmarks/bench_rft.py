"""Cold start benchmark: what multi-turn SFT on expert conversations does to the embedded model.

The documented pipeline, through the CLI a user runs (each step a subprocess):

    t2po rft collect --preset default --policy expert --episodes N --out WORK/demos.jsonl
    t2po eval sokoban                      --split valid --episodes M --env-option ...   (before)
    t2po sft WORK/demos.jsonl --out WORK/sft --epochs E
    t2po eval sokoban WORK/sft             --split valid --episodes M --env-option ...   (after)

Expert Sokoban conversations come from the solver on training rooms (the `default` preset's 5x5
rooms and compact prompt); the evaluation plays held-out rooms (split `valid`, seed + 1000) with the
same prompt, validation sampling (T=0.6, top-p 0.95, top-k 20). Reported: valid-action rate and
success before and after SFT, the SFT loss, and the time of each step.

    .venv/bin/python benchmarks/bench_rft.py                       # writes bench_results/bench_rft.json
    .venv/bin/python benchmarks/bench_rft.py --episodes 32 --eval-episodes 16 --epochs 2 --out /tmp/rft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def t2po(*args: str) -> tuple[str, float]:
    """Run one `t2po` command; its stdout and seconds. A failure stops the benchmark with its stderr."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "t2po.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"`t2po {' '.join(args)}` failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout, time.perf_counter() - start


def evaluate(model: str | None, work: Path, name: str, episodes: int, env_options: dict, max_new_tokens: int) -> dict:
    out = work / name
    options = [f"--env-option={k}={json.dumps(v)}" for k, v in env_options.items()]
    _, seconds = t2po("eval", "sokoban", *([model] if model else []), "--split", "valid", "--episodes", str(episodes),
                      "--max-new-tokens", str(max_new_tokens), "--out", str(out), "--quiet", *options)
    summary = json.loads((out / "eval.json").read_text())["summary"]["all"]
    return {"valid_action_rate": 1 - summary["invalid_action_rate"], "success": summary["success"],
            "success_stderr": summary["success_stderr"], "mean_turns": summary["mean_turns"],
            "episodes": summary["episodes"],
            "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64, help="expert episodes collected (training rooms)")
    parser.add_argument("--eval-episodes", type=int, default=32, help="held-out rooms played before and after SFT")
    parser.add_argument("--epochs", type=int, default=3, help="SFT epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="SFT learning rate (LoRA)")
    parser.add_argument("--max-new-tokens", type=int, default=40,
                        help="response budget per turn (the default preset's)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the data, model and evaluations (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "bench_rft.json")
    ns = parser.parse_args()

    from t2po.config import load_config

    env_options = dict(load_config("default").env.options)
    with tempfile.TemporaryDirectory(prefix="bench-rft-") as tmp:
        work = ns.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        printed, collect_s = t2po("rft", "collect", "--preset", "default", "--policy", "expert", "--episodes",
                                  str(ns.episodes),
                                  "--out", str(work / "demos.jsonl"))
        print(printed.strip(), flush=True)
        before = evaluate(None, work, "eval-before", ns.eval_episodes, env_options, ns.max_new_tokens)
        print(f"before SFT: valid actions {before['valid_action_rate']:.3f}, success {before['success']:.3f}",
              flush=True)
        printed, sft_s = t2po("sft", str(work / "demos.jsonl"), "--out", str(work / "sft"), "--epochs", str(ns.epochs),
                              "--lr", str(ns.lr))
        print(printed.strip(), flush=True)
        sft_info = json.loads((work / "sft" / "sft.json").read_text())
        after = evaluate(str(work / "sft"), work, "eval-after", ns.eval_episodes, env_options, ns.max_new_tokens)
        print(f"after SFT:  valid actions {after['valid_action_rate']:.3f}, success {after['success']:.3f}", flush=True)
        kept = sum(1 for line in (work / "demos.jsonl").read_text().splitlines() if line.strip())

    result = {
        "benchmark": "rft",
        "model": "SmolLM2-135M-Instruct (embedded GGUF), LoRA r=16 merged",
        "env": {"name": "sokoban", "options": env_options, "eval_split": "valid"},
        "collect": {"policy": "expert (solver)", "episodes": ns.episodes, "kept": kept, "seconds": collect_s},
        "sft": {"epochs": ns.epochs, "lr": ns.lr, "examples": sft_info["examples"], "loss_first": sft_info["losses"][0],
                "loss_last": sft_info["losses"][-1], "losses": sft_info["losses"], "seconds": sft_s},
        "before": before,
        "after": after,
        "valid_action_rate_gain": after["valid_action_rate"] - before["valid_action_rate"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
