"""One rollout iteration of the main job: the engine before issue 17 against today's default, and the
prefill work against the distinct prompt tokens.

Workload (`t2po/configs/default.yaml`): SmolLM2-135M-Instruct, 8 Sokoban rooms x 4 group members (batch
32), at most 3 turns, 40 new tokens, TTI monitoring on, TDS on (eta 0.3, one retry), the same seed
for both engines.
- `fp32_baseline`: the engine before issue 17: float32 weights, transformers' SDPA attention
  (`repeat_kv`), `torch.multinomial`, and every generate call prefills every row (TDS regenerations
  prefill their prompts again, group members prefill the same turn-0 prompt once each);
- `default`: bfloat16 weights, grouped-query decode attention, inverse-CDF sampling, one prefill per
  distinct prompt (in-call deduplication + the prefix store that TDS regenerations hit), the prompts'
  shared beginning (system turn, instructions) once per call.
Runs alternate (A/B, repeated, medians). `prefill_tokens_over_unique`: prompt tokens the default
engine prefilled per iteration / the distinct prompt tokens of the iteration (1.0 = no prompt prefilled
twice; below 1 because the beginning all prompts of a call share is prefilled once per call).

    python benchmarks/bench_rollout.py --threads 2 --out bench_results/rollout.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import t2po.engines.hf as hf
from t2po.algos.sampling import TDSResampler
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.models import load_model
from t2po.policies import EnginePolicy
from t2po.rollout import RolloutSettings, TDSConfig, collect_rollouts

from bench_engine import multinomial_sampler


def rollout(model, tokenizer, baseline: bool, seed: int, max_new_tokens: int) -> dict:
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3, history_length=0,
                   prompt_style="compact")
    sampler, prompt_key, shared = hf.sample_tokens, hf._prompt_key, hf.shared_prefix_length
    if baseline:  # the engine before issue 17: multinomial sampling, no prefill shared between rows or calls
        rows = itertools.count()
        hf.sample_tokens, hf._prompt_key, hf.shared_prefix_length = (multinomial_sampler, lambda prompt,
                                                                     pixels: (next(rows),), lambda prompts: 0)
    try:
        start = time.perf_counter()
        policy = EnginePolicy(HFEngine(model, tokenizer),
                              SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens),
                              InterventionConfig(turn_score_skip=4))
        result = collect_rollouts(policy, env, list(range(100, 108)), RolloutSettings(group_size=4),
                                  resampler=TDSResampler(TDSConfig(eta=0.3, max_try=1)), seed=seed)
        seconds = time.perf_counter() - start
    finally:
        hf.sample_tokens, hf._prompt_key, hf.shared_prefix_length = sampler, prompt_key, shared
        env.close()
    keys = ("steps", "generated_tokens", "prompt_tokens", "prefill_tokens", "unique_prompt_tokens",
            "tds_regenerations", "success_rate")
    return {"seconds": seconds, **{k: result.stats[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_results/rollout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, tokenizer = load_model()
    baseline = copy.deepcopy(fp32)
    baseline.set_attn_implementation("sdpa")
    bf16 = fp32.to(torch.bfloat16)
    runs = {"fp32_baseline": lambda: rollout(baseline, tokenizer, True, args.seed, args.max_new_tokens),
            "default": lambda: rollout(bf16, tokenizer, False, args.seed, args.max_new_tokens)}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run())
            print(f"{name:14s} {json.dumps(results[name][-1])}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    summary = {
        "model": "smollm2-135m-instruct",
        "batch": 32,
        "torch_threads": torch.get_num_threads(),
        "runs": {name: {k: median(name, k) for k in results[name][0]} for name in runs},
        "rollout_speedup_vs_fp32": median("fp32_baseline", "seconds") / median("default", "seconds"),
        "generated_tokens_per_s": {name: median(name, "generated_tokens") / median(name, "seconds") for name in runs},
        "prefill_tokens_over_unique": median("default", "prefill_tokens") / median("default", "unique_prompt_tokens"),
        "baseline_prefill_tokens_over_unique": median("fp32_baseline", "prefill_tokens")
               / median("fp32_baseline", "unique_prompt_tokens"),
        "all": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "all"}, indent=1))


if __name__ == "__main__":
    main()
