"""How the engine's generate call and one update step slow down when another process competes for the CPU,
with torch's OpenMP defaults and with t2po's settings (`t2po/openmp.py`), side by side in one run.

Each measurement is a fresh child process (OpenMP reads its environment once, at torch's import):
- settings `old`: `T2PO_OPENMP=default` (libgomp's defaults: threads spin ~300k iterations before sleeping,
  as many threads as the machine has cores), `new`: what t2po sets on import;
- condition `idle`: nothing else runs; `busy`: one competing CPU-bound process (a Python busy loop) runs for
  the whole measurement, as a browser tab, a second job or a CI neighbour would.
Work, at the main job's shape (t2po/configs/default.yaml, the model's auto dtype): `engine`, the HF engine's
batch-32 generate call (Sokoban turn-0 prompts, 40 new tokens, TTI monitoring on); `update`, one PPO update
over 32 samples (mini-batches of 16, the frozen trunk replayed, as the trainer does; the old-log-prob pass
that records the trunk runs untimed before it). The order of (setting, condition) pairs alternates over the
repeats so that drift in the machine's speed falls on all of them; medians are reported.

    python benchmarks/bench_contention.py --out docs/results/contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"old": {"T2PO_OPENMP": "default"}, "new": {}}
OPENMP_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "KMP_BLOCKTIME")


def child(work: str, repeats: int) -> None:
    """Runs in a fresh interpreter: time `work` `repeats` times after one warm-up call, print JSON."""
    sys.path.insert(0, str(HERE))
    import t2po  # noqa: F401  (applies the OpenMP settings unless T2PO_OPENMP=default)
    import torch

    from bench_update import main_job_prompts, trainer_logprobs, update, with_lora
    from t2po.engines.base import SamplingParams
    from t2po.engines.hf import HFEngine
    from t2po.models import load_model
    from t2po.forward import FrozenTrunk

    model, tokenizer = load_model(dtype=os.environ.get("BENCH_DTYPE", "auto"))
    prompts = main_job_prompts(tokenizer, 32, seed=0)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40, seed=0)
    engine = HFEngine(model, tokenizer)
    if work == "engine":
        def run() -> float:
            start = time.perf_counter()
            engine.generate(prompts, sampling)
            return time.perf_counter() - start
    else:
        model = with_lora(model)
        gens = engine.generate(prompts, sampling)
        responses = [g.token_ids for g in gens]
        old = [torch.tensor(g.logprobs) for g in gens]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        pad = tokenizer.pad_token_id

        def run() -> float:
            trunk = FrozenTrunk(FrozenTrunk.first_trainable_layer(model))
            trainer_logprobs(model, prompts, responses, pad, False, 4096, trunk=trunk)
            return update(model, optimizer, prompts, responses, old, pad, False, 16, 4096, trunk=trunk)
    run()
    seconds = [run() for _ in range(repeats)]
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "dtype": str(next(model.parameters()).dtype),
                      "env": {k: os.environ.get(k) for k in OPENMP_KEYS}}))


def measure(work: str, setting: str, busy: bool, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_KEYS and k != "T2PO_OPENMP"}
    env.update(SETTINGS[setting], HF_HUB_OFFLINE="1")
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", work, "--repeats", str(repeats)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["engine", "update"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per child (after one warm-up call)")
    parser.add_argument("--rounds", type=int, default=2, help="children per (work, setting, condition), alternated")
    parser.add_argument("--work", nargs="+", default=["engine", "update"], choices=["engine", "update"])
    parser.add_argument("--out", default="bench_results/contention.json")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.repeats)

    start = time.time()
    runs: dict[str, list] = {}
    pairs = [(s, b) for s in SETTINGS for b in (False, True)]
    for r in range(args.rounds):
        for work in args.work:
            for setting, busy in (pairs if r % 2 == 0 else pairs[::-1]):
                key = f"{work}/{setting}/{'busy' if busy else 'idle'}"
                result = measure(work, setting, busy, args.repeats)
                runs.setdefault(key, []).append(result)
                print(f"{key:20s} {' '.join(f'{s:.2f}' for s in result['seconds'])} s  ({result['threads']} threads, "
                      f"{result['dtype']}, {result['env']})", flush=True)
    median = {k: statistics.median(s for r in v for s in r["seconds"]) for k, v in runs.items()}
    ratios = {}
    for work in args.work:
        ratios[work] = {
            "busy_over_idle_old": median[f"{work}/old/busy"] / median[f"{work}/old/idle"],
            "busy_over_idle_new": median[f"{work}/new/busy"] / median[f"{work}/new/idle"],
            "idle_new_over_old": median[f"{work}/new/idle"] / median[f"{work}/old/idle"],
            "busy_old_over_new": median[f"{work}/old/busy"] / median[f"{work}/new/busy"],
        }
        print(f"{work}: busy/idle old {ratios[work]['busy_over_idle_old']:.2f}x, new "
              f"{ratios[work]['busy_over_idle_new']:.2f}x; idle new/old {ratios[work]['idle_new_over_old']:.3f}")
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    sys.path.insert(0, str(HERE))
    from time_presets import cpu_kind  # the CPU model, its vector/matrix flags, the dtype `auto` picks

    summary = {"commit": commit, "cpu": cpu_kind(emulate_avx2=False), "wall_seconds": time.time() - start,
               "median_seconds": median, "ratios": ratios,
               "settings": {"old": "T2PO_OPENMP=default (torch/libgomp defaults)",
                            "new": "t2po/openmp.py"}, "runs": runs,
               "load_before": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
