"""The transformers engine on the CPU: the new default against the fp32 engine before issue 17,
against `model.generate`, per-step costs, and the hardware's limit for the same work.

Workload (the main job's, `t2po/configs/default.yaml`): the embedded SmolLM2-135M-Instruct, a batch of 32
Sokoban turn-0 prompts (compact style, ~150 tokens, distinct rooms), temperature 1, 40 new tokens.

Timed configurations (each repeated; runs alternate so machine load drifts evenly; medians):
- `fp32_baseline`: the engine before issue 17: float32 weights, transformers' SDPA attention (it copies
  every K/V head per query head, `repeat_kv`), `torch.multinomial` sampling, every prompt prefilled whole;
- `fp32`: float32 weights, today's engine (grouped-query attention without the copy,
  `t2po.attention`; inverse-CDF sampling, `t2po.engines.hf.sample_tokens`; the beginning the prompts
  share prefilled once, `t2po.engines.base.shared_prefix_length`);
- `bf16` (the default): bfloat16 weights, today's decode step; M_t + turn scores monitored, as in the
  rollouts, with the intervention disabled;
- `bf16_unmonitored`: the same without M_t (`monitor_uncertainty=False`), same seed, so the same
  tokens: `tti_monitoring_overhead` = bf16 / bf16_unmonitored - 1;
- `bf16_hf_generate`: `model.generate(do_sample=True)` on the same bf16 model and left-padded batch.
Each timed call uses a new engine, so every call prefills its prompts (the prefix store is per engine);
the engines are warm otherwise: the decoded vocabulary that TTI matches tags on is cached per tokenizer
(`t2po.algos.intervention.vocabulary_text`) and decoded once, in the untimed warm-up call (before issue 27
each timed call paid that ~0.5 s, which made `tti_monitoring_overhead` read +17 %).

Per-step breakdown (bf16, batch 32, minimum over repetitions, measured in isolation): one decode
forward, the log-softmax (the returned log-probs need it with or without TTI), the sampler (at
temperature 1: the CDF of exp(log-probs)), M_t as the engine computes it (sharing the sampler's
exp(log-probs): the max and one dot product per row, `uncertainty_from_logprobs(..., probs=...)`), M_t
computed alone from the log-probs (`m_t_separate_pass`, for reference), and TTI's per-row bookkeeping
(observe/advance on rows inside a think span, the costlier path). `tti_cost_share_of_decode_step` =
(M_t + bookkeeping) / (forward + log-softmax + sampler + M_t + bookkeeping): TTI's full cost as a
share of a decode step with TTI.

Roofline: a matmul probe times every weight matmul of one decode step (x [batch, in] @ W) and of the
prefill (x [batch * prompt, in] @ W) in bf16 on this machine, and a copy probe measures memory
bandwidth for reading the KV cache; the estimated floor of the whole call is prefill matmuls + per
generated token (decode matmuls + KV read) / batch. `roofline_ratio` = measured bf16 call / floor.

    python benchmarks/bench_engine.py --threads 2 --out bench_results/engine.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import t2po.engines.hf as hf
from t2po.algos.intervention import ThinkingIntervention, vocabulary_text
from t2po.algos.uncertainty import uncertainty_from_logprobs
from t2po.attention import GROUPED_SDPA
from t2po.engines.base import InterventionConfig, SamplingParams, shared_prefix_length
from t2po.engines.hf import HFEngine, sample_tokens
from t2po.envs import make_env
from t2po.models import load_model


def sokoban_prompts(tokenizer, batch_size: int, seed: int) -> list[list[int]]:
    """Turn-0 prompts of the main job's rooms (distinct seeds, so distinct prompts)."""
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3, history_length=0,
                   prompt_style="compact")
    states = env.reset(seeds=[seed + i for i in range(batch_size)])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": env.render_prompt(i, [], s)}],
                                             add_generation_prompt=True)["input_ids"]
               for i, s in enumerate(states)]
    env.close()
    return prompts


def multinomial_sampler(logits, sampling, generator, probs=None):
    """The sampler before issue 17 (same filtering, then `torch.multinomial`; it computed its own softmax)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def time_engine(model, tokenizer, prompts, sampling, monitor: bool = True, baseline: bool = False) -> dict:
    engine = HFEngine(model, tokenizer, monitor_uncertainty=monitor)
    if baseline:  # the sampler before issue 17, and every row's prompt prefilled whole
        hf.sample_tokens, hf.shared_prefix_length = multinomial_sampler, lambda prompts: 0
    try:
        start = time.perf_counter()
        gens = engine.generate(prompts, sampling, InterventionConfig(enabled=False) if monitor else None)
        seconds = time.perf_counter() - start
    finally:
        hf.sample_tokens, hf.shared_prefix_length = sample_tokens, shared_prefix_length
    return {"seconds": seconds, "tokens": sum(g.num_tokens for g in gens), "token_ids": [g.token_ids for g in gens]}


def time_hf_generate(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> dict:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    tokens = 0  # each row's tokens up to and including its first EOS (generate pads finished rows)
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        tokens += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    return {"seconds": seconds, "tokens": tokens}


def step_breakdown(model, tokenizer, prompts, repeats: int = 10) -> dict:
    """Seconds of each part of one decode step at the batch's size (minimum over `repeats`)."""
    context = torch.tensor([p[-64:] for p in prompts])
    sampling = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    tti = ThinkingIntervention.from_tokenizer(tokenizer, token_text=vocabulary_text(tokenizer), budget=10**6)
    times: dict[str, list[float]] = {"forward": [], "log_softmax": [], "sampling": [], "m_t": [],
                                     "m_t_separate_pass": [], "bookkeeping": []}
    with torch.inference_mode():
        out = model(input_ids=context, use_cache=True, logits_to_keep=1)
        cache, step = out.past_key_values, context[:, -1:]
        mask = torch.ones(len(prompts), context.shape[1] + 1, dtype=torch.long)
        for _ in range(repeats):
            trial = copy.deepcopy(cache)
            start = time.perf_counter()
            logits = model(input_ids=step, attention_mask=mask, past_key_values=trial, use_cache=True).logits[:, -1, :]
            times["forward"].append(time.perf_counter() - start)
        logits = logits.float()
        tti.start([p + tti.think_start_ids for p in prompts])  # rows inside a think span: the costlier path
        rows: list[list[int]] = [[] for _ in prompts]
        for _ in range(repeats):
            start = time.perf_counter()
            logp = torch.log_softmax(logits, dim=-1)
            times["log_softmax"].append(time.perf_counter() - start)
            start = time.perf_counter()
            probs = logp.exp()
            chosen = sample_tokens(logits, sampling, generator, probs)
            times["sampling"].append(time.perf_counter() - start)
            start = time.perf_counter()
            m = uncertainty_from_logprobs(logp, probs=probs).tolist()
            times["m_t"].append(time.perf_counter() - start)
            start = time.perf_counter()
            uncertainty_from_logprobs(logp).tolist()
            times["m_t_separate_pass"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for row, token in enumerate(chosen.tolist()):
                forced = tti.observe(row, m[row])
                rows[row].append(token if forced is None else forced)
                tti.advance(row, rows[row][-1])
            times["bookkeeping"].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def roofline(model, batch: int, prompt_tokens: float, context: float, repeats: int = 5) -> dict:
    """The matmul floor of one decode step at `batch` rows and of the prefill, in bf16 on this machine,
    plus the time to read the KV cache at `context` tokens per row at the measured bandwidth."""
    config = model.config
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden), (hidden, inter),
                 (hidden, inter), (inter, hidden)]
    head = (hidden, config.vocab_size)

    def floor(rows: int, shapes) -> tuple[float, float]:
        seconds = flops = 0.0
        for fan_in, fan_out in shapes:
            x, w = torch.randn(rows, fan_in, dtype=torch.bfloat16), torch.randn(fan_in, fan_out, dtype=torch.bfloat16)
            x @ w  # warm-up
            best = min(_timed(lambda: x @ w) for _ in range(repeats))
            seconds, flops = seconds + best, flops + 2.0 * rows * fan_in * fan_out
        return seconds, flops

    layer_s, layer_flops = floor(batch, per_layer)
    head_s, head_flops = floor(batch, [head])
    decode_s, decode_flops = layers * layer_s + head_s, layers * layer_flops + head_flops
    prefill_rows = int(batch * prompt_tokens)
    prefill_layer_s, prefill_layer_flops = floor(prefill_rows, per_layer)
    prefill_head_s, _ = floor(batch, [head])  # the prefill computes logits of the last position only
    prefill_s = layers * prefill_layer_s + prefill_head_s
    source = torch.empty(64 * 2**20, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy_s = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    bandwidth = 2 * source.numel() / copy_s  # bytes read + written per second
    kv_bytes = batch * context * layers * 2 * kv_out * 2  # K and V, bf16
    return {
        "decode_step_matmul_s": decode_s,
        "decode_step_gflop": decode_flops / 1e9,
        "decode_matmul_gflops_per_s": decode_flops / decode_s / 1e9,
        "prefill_matmul_s": prefill_s,
        "prefill_matmul_gflops_per_s": layers * prefill_layer_flops / (layers * prefill_layer_s) / 1e9,
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "decode_step_kv_read_s": kv_bytes / bandwidth,
        "decode_step_floor_s": decode_s + kv_bytes / bandwidth,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="bench_results/engine.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32, tokenizer = load_model()
    baseline = copy.deepcopy(fp32)
    baseline.set_attn_implementation("sdpa")  # transformers' own path: repeat_kv whenever a mask is passed
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert fp32.config._attn_implementation == bf16.config._attn_implementation == GROUPED_SDPA
    prompts = sokoban_prompts(tokenizer, args.batch_size, args.seed)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    runs = {
        "fp32_baseline": lambda: time_engine(baseline, tokenizer, prompts, sampling, baseline=True),
        "fp32": lambda: time_engine(fp32, tokenizer, prompts, sampling),
        "bf16": lambda: time_engine(bf16, tokenizer, prompts, sampling),
        "bf16_unmonitored": lambda: time_engine(bf16, tokenizer, prompts, sampling, monitor=False),
        "bf16_hf_generate": lambda: time_hf_generate(bf16, tokenizer, prompts, args.max_new_tokens, args.seed),
    }
    time_engine(bf16, tokenizer, prompts[:2], SamplingParams(max_new_tokens=4, seed=0))  # warm-up (vocabulary decoding)
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run())
            print(f"{name:18s} {results[name][-1]['seconds']:7.2f} s", flush=True)

    def median(name: str, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in results[name])

    prompt_mean = sum(map(len, prompts)) / len(prompts)
    breakdown = step_breakdown(bf16, tokenizer, prompts)
    limits = roofline(bf16, args.batch_size, prompt_mean, prompt_mean + args.max_new_tokens / 2)
    tokens = median("bf16", "tokens")
    floor_s = limits["prefill_matmul_s"] + tokens / args.batch_size * limits["decode_step_floor_s"]
    summary = {
        "model": "smollm2-135m-instruct",
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": prompt_mean,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds": {name: median(name) for name in runs},
        "tokens": {name: median(name, "tokens") for name in runs},
        "tokens_per_s": {name: median(name, "tokens") / median(name) for name in runs},
        "engine_speedup_vs_fp32": median("fp32_baseline") / median("bf16"),
        "engine_speedup_vs_fp32_same_decode_step": median("fp32") / median("bf16"),
        "decode_step_speedup_fp32": median("fp32_baseline") / median("fp32"),
        "engine_vs_hf_generate_tokens_per_s": (median("bf16", "tokens") / median("bf16"))
               / (median("bf16_hf_generate", "tokens") / median("bf16_hf_generate")),
        "tti_monitoring_overhead": median("bf16") / median("bf16_unmonitored") - 1,
        "tti_cost_share_of_decode_step": (breakdown["m_t"] + breakdown["bookkeeping"])
        / (breakdown["forward"] + breakdown["log_softmax"] + breakdown["sampling"] + breakdown["m_t"]
           + breakdown["bookkeeping"]),
        "monitoring_same_tokens": all(m["token_ids"] == u["token_ids"]
                                      for m, u in zip(results["bf16"], results["bf16_unmonitored"])),
        "step_breakdown_s": breakdown,
        "roofline": {**limits, "call_floor_s": floor_s},
        "roofline_ratio": median("bf16") / floor_s,
        "all_seconds": {name: [r["seconds"] for r in results[name]] for name in runs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    for name in runs:
        print(f"{name:18s} {summary['seconds'][name]:7.2f} s  {summary['tokens'][name]:6.0f} tokens  "
              f"{summary['tokens_per_s'][name]:7.1f} tokens/s")
    print(f"engine speedup vs the fp32 engine before issue 17: {summary['engine_speedup_vs_fp32']:.2f}x "
          f"(decode step alone, fp32: {summary['decode_step_speedup_fp32']:.2f}x; bf16 alone: "
          f"{summary['engine_speedup_vs_fp32_same_decode_step']:.2f}x)")
    print(f"engine / model.generate (bf16) tokens/s: {summary['engine_vs_hf_generate_tokens_per_s']:.2f}")
    print(f"M_t monitoring overhead: {100 * summary['tti_monitoring_overhead']:+.1f}% (same tokens: "
          f"{summary['monitoring_same_tokens']})")
    print("per step (ms): " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in breakdown.items()))
    print(f"TTI's full cost (M_t + bookkeeping) per decode step: {100 * summary['tti_cost_share_of_decode_step']:.2f} "
          "%")
    print(f"roofline: call floor {floor_s:.2f} s (decode step floor {1000 * limits['decode_step_floor_s']:.1f} ms at "
          f"{limits['decode_matmul_gflops_per_s']:.0f} GFLOP/s, {limits['bandwidth_gb_per_s']:.1f} GB/s; prefill "
          f"{limits['prefill_matmul_s']:.2f} s); measured / floor = {summary['roofline_ratio']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
