"""Rollout throughput on Sokoban vs raw batched generation of the same prompts.

SmolLM2-135M-Instruct (embedded), batch 8 (2 tasks x 4), TTI monitoring on, TDS off. Measures the
whole rollout loop (prompt building, chat template, generation, parsing, env stepping, recording)
and, for the same per-turn prompt batches, (a) the engine's generate calls alone and (b) raw
`model.generate` with the same sampling budget. Loop overhead = rollout time / engine time - 1.

    OMP_NUM_THREADS=2 python benchmarks/bench_rollout.py --out bench_results/rollout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.models import load_model
from t2po.rollout import collect_rollouts


class TimedEngine(HFEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seconds = 0.0
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompts, sampling, intervention=None):
        t = time.perf_counter()
        out = super().generate(prompts, sampling, intervention)
        self.seconds += time.perf_counter() - t
        self.calls.append((prompts, max(g.num_tokens for g in out)))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/rollout.json")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompt-style", default="compact", choices=["compact", "reference"])
    ns = parser.parse_args()
    model, tokenizer = load_model()
    engine = TimedEngine(model, tokenizer)
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=5, history_length=0, prompt_style=ns.prompt_style)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=ns.max_new_tokens)
    t0 = time.perf_counter()
    result = collect_rollouts(engine, env, task_seeds=[0, 1], group_size=4, sampling=sampling, intervention=InterventionConfig(), seed=0)
    rollout_s = time.perf_counter() - t0

    # raw generate of the same prompt batches (left padded), same new-token budget as the engine used
    pad = tokenizer.pad_token_id
    raw_s = 0.0
    raw_tokens = 0
    with torch.inference_mode():
        for prompts, new_tokens in engine.calls:
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
            raw_s += time.perf_counter() - t
            raw_tokens += (out.shape[1] - width) * len(prompts)
    stats = result.stats
    report = {
        "model": "smollm2-135m-instruct",
        "batch": 8,
        "torch_threads": torch.get_num_threads(),
        "prompt_style": ns.prompt_style,
        "env_steps": stats["steps"],
        "generated_tokens": stats["generated_tokens"],
        "rollout_seconds": rollout_s,
        "engine_seconds": engine.seconds,
        "raw_generate_seconds": raw_s,
        "raw_generate_tokens": raw_tokens,
        "env_steps_per_s": stats["steps"] / rollout_s,
        "generated_tokens_per_s": stats["generated_tokens"] / rollout_s,
        "raw_generate_tokens_per_s": raw_tokens / raw_s,
        "loop_overhead_vs_engine": rollout_s / engine.seconds - 1,
        "rollout_vs_raw_generate": rollout_s / raw_s - 1,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=1))
    for k, v in report.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
