"""Cost of M_t monitoring and TTI in the HF engine, and the engine against raw `model.generate`.

Workload: the embedded SmolLM2-135M-Instruct, a batch of Sokoban prompts (the project's own
Sokoban environment, first turn, rendered with the chat template), temperature 1, 128 new tokens.

Timed configurations (each repeated, runs interleaved so that machine load drifts evenly; the
median is reported):
- `unmonitored`: HFEngine(monitor_uncertainty=False): no M_t at all;
- `monitored`: M_t + turn scores + think-span tracking, intervention disabled. Same seed as
  `unmonitored`, so it samples exactly the same tokens: the time ratio is the monitoring overhead;
- `tti`: the thinking intervention on (spec §2 defaults: K=20, eps=1e-4, plus a budget). SmolLM2-135M
  never opens a think span by itself, so this run pre-fills `<think>` after the assistant header (as
  thinking templates do): every row starts inside a span and the budget rule fires;
- `hf_generate`: `model.generate(do_sample=True, temperature=1)` on the same left-padded batch.
On a shared, loaded CPU whole-call timings are noisy, so the per-step cost of monitoring (M_t from
the step's log-probs plus the per-row intervention bookkeeping) is also timed in isolation and
compared with one decode forward of the same batch (`isolated`, minimum over repetitions).

    OMP_NUM_THREADS=2 python benchmarks/bench_engine.py --out bench_results/engine.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from t2po.algos.intervention import ThinkingIntervention, vocabulary_text
from t2po.algos.uncertainty import uncertainty_from_logprobs
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.models import load_model


def sokoban_prompts(tokenizer, batch_size: int, seed: int) -> list[list[int]]:
    env = make_env("sokoban")
    states = env.reset(seeds=[seed + i for i in range(batch_size)])
    prompts = []
    for index, state in enumerate(states):
        message = [{"role": "user", "content": env.render_prompt(index, [], state)}]
        prompts.append(tokenizer.apply_chat_template(message, add_generation_prompt=True)["input_ids"])
    env.close()
    return prompts


def time_engine(engine: HFEngine, prompts, sampling, intervention) -> dict:
    start = time.perf_counter()
    gens = engine.generate(prompts, sampling, intervention)
    seconds = time.perf_counter() - start
    tokens = sum(g.num_tokens for g in gens)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "token_ids": [g.token_ids for g in gens],
        "forced_tokens": sum(sum(g.forced) for g in gens),
        "triggers": {k: sum(g.tti_triggers.get(k, 0) for g in gens) for k in ("budget", "stagnation")},
        "think_tokens": sum(g.think_length for g in gens),
    }


def time_hf_generate(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> dict:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    # count each row's tokens up to and including its first EOS (generate pads finished rows)
    tokens = 0
    for row in new.tolist():
        tokens += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    return {"seconds": seconds, "tokens": tokens}


def isolated_step_costs(model, tokenizer, prompts, repeats: int = 20) -> dict:
    """Seconds of one decode forward of the batch vs the monitoring work on its logits (minimum of
    `repeats`). A 64-token context keeps the prefill cheap; the decode step barely depends on it."""
    context = torch.tensor([p[-64:] for p in prompts])
    with torch.inference_mode():
        out = model(input_ids=context, use_cache=True, logits_to_keep=1)
        cache, step_input = out.past_key_values, context[:, -1:]
        forward = []
        for _ in range(max(3, repeats // 4)):
            start = time.perf_counter()
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
            forward.append(time.perf_counter() - start)
        logits = out.logits[:, -1, :].float()
        tti = ThinkingIntervention.from_tokenizer(tokenizer, token_text=vocabulary_text(tokenizer), budget=64)
        tti.start([p + tti.think_start_ids for p in prompts])  # rows inside a think span: the costlier path
        tokens = logits.argmax(dim=-1).tolist()
        monitoring = []
        for _ in range(repeats):
            logp = torch.log_softmax(logits, dim=-1)  # computed with or without monitoring (log-probs)
            start = time.perf_counter()
            m = uncertainty_from_logprobs(logp).tolist()
            for row, token in enumerate(tokens):
                forced = tti.observe(row, m[row])
                tti.advance(row, token if forced is None else forced)
            monitoring.append(time.perf_counter() - start)
    return {"decode_forward_s": min(forward), "monitoring_s": min(monitoring), "ratio": min(monitoring) / min(forward)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=64, help="TTI think budget B for the `tti` run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_results/engine.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    prompts = sokoban_prompts(tokenizer, args.batch_size, args.seed)
    thinking_prompts = [p + tokenizer.encode("<think>", add_special_tokens=False) for p in prompts]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    monitored, unmonitored = HFEngine(model, tokenizer), HFEngine(model, tokenizer, monitor_uncertainty=False)
    runs = {
        "unmonitored": lambda: time_engine(unmonitored, prompts, sampling, None),
        "monitored": lambda: time_engine(monitored, prompts, sampling, InterventionConfig(enabled=False)),
        "tti": lambda: time_engine(monitored, thinking_prompts, sampling, InterventionConfig(budget=args.budget)),
        "hf_generate": lambda: time_hf_generate(model, tokenizer, prompts, args.max_new_tokens, args.seed),
    }
    isolated = isolated_step_costs(model, tokenizer, prompts)
    # warm-up: first-call allocations, vocabulary decoding for tag matching
    monitored.generate(prompts[:2], SamplingParams(max_new_tokens=4, seed=0), InterventionConfig(enabled=False))
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run())

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    same_tokens = all(m["token_ids"] == u["token_ids"] for m, u in zip(results["monitored"], results["unmonitored"]))
    summary = {
        "model": args.model or "smollm2-135m-instruct",
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds": {name: median(name, "seconds") for name in runs},
        "tokens": {name: median(name, "tokens") for name in runs},
        "tokens_per_s": {name: median(name, "tokens") / median(name, "seconds") for name in runs},
        "monitoring_overhead": median("monitored", "seconds") / median("unmonitored", "seconds") - 1,
        "monitoring_same_tokens": same_tokens,
        "tti_overhead_per_token": (median("tti", "seconds") / median("tti", "tokens"))
        / (median("unmonitored", "seconds") / median("unmonitored", "tokens"))
        - 1,
        "tti_forced_tokens": results["tti"][0]["forced_tokens"],
        "tti_triggers": results["tti"][0]["triggers"],
        "tti_think_tokens": results["tti"][0]["think_tokens"],
        "engine_vs_hf_generate_tokens_per_s": (median("unmonitored", "tokens") / median("unmonitored", "seconds"))
        / (median("hf_generate", "tokens") / median("hf_generate", "seconds")),
        "isolated": isolated,
        "all_seconds": {name: [r["seconds"] for r in results[name]] for name in runs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    for name in runs:
        print(f"{name:12s} {summary['seconds'][name]:7.2f} s  {summary['tokens'][name]:6.0f} tokens  "
              f"{summary['tokens_per_s'][name]:7.1f} tokens/s")
    print(f"monitoring overhead (same tokens: {same_tokens}): {100 * summary['monitoring_overhead']:+.1f}%")
    print(f"TTI overhead per token: {100 * summary['tti_overhead_per_token']:+.1f}%  "
          f"(forced {summary['tti_forced_tokens']} tokens, triggers {summary['tti_triggers']})")
    print(f"isolated per step: decode forward {1000 * isolated['decode_forward_s']:.1f} ms, "
          f"monitoring {1000 * isolated['monitoring_s']:.2f} ms ({100 * isolated['ratio']:.2f}%)")
    print(f"engine / model.generate tokens/s: {summary['engine_vs_hf_generate_tokens_per_s']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
