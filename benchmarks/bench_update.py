"""Cost of the PPO update on the CPU per precision, and how well the engine's log-probs agree with the
trainer's in each.

Workload: the main job's shape (`t2po/configs/default.yaml`): SmolLM2-135M-Instruct with LoRA (rank 16,
alpha 32) on the last 8 layers, Sokoban turn-0 prompts (compact style, ~150 tokens), responses of
up to 40 tokens sampled by the transformers engine, micro-batches of at most 4096 padded tokens,
mini-batches of 16 samples. One update = for every mini-batch: forward (log-probs + entropy), the
clipped policy loss (`t2po.algos.losses.ppo_policy_loss`), backward, AdamW step (the trainer's
`update`, without KL and critic).

`update_speedup_vs_fp32`: the update before issue 17 (`fp32_before`: float32, every row through every
layer) / the trainer's update today (`default`: bf16 base weights, the rows' shared beginning once,
the frozen layers' output replayed from the old-log-prob pass, which runs untimed before it).

Precisions compared with today's forward pass (`update_speedup_by_precision`; each model gets its own
LoRA adapters, trainable in float32):
- `fp32`: float32 weights, no autocast (the presets before issue 17);
- `fp32_autocast`: float32 weights, bf16 autocast in the forward (`optim.bf16=true`);
- `bf16`: bfloat16 base weights (`model.dtype=bfloat16`), float32 LoRA adapters (peft keeps adapters
  in float32), no autocast;
- `bf16_autocast`: bfloat16 base weights and bf16 autocast.
Runs alternate between the precisions (A/B/C/D, repeated, medians) so that machine load drifts evenly.

The trainer's step at the default precision (bf16), old-log-prob pass + update, in three variants
(alternated, medians): `whole_rows` (every row runs every layer: the trainer before these features),
`shared_prefix` (the beginning all rows of a micro-batch share runs once, `MicroBatch.shared`), and
`shared_prefix_trunk` (the default: also the layers below LoRA run only in the old-log-prob pass and
the update replays their output, `t2po.forward.FrozenTrunk`). `trainer_step_speedup_vs_whole_rows`.

Log-prob agreement: the engine samples with the precision's weights (its own log-probs are the old
log-probs when `optim.recompute_logprobs=false`); the trainer's forward in the same precision scores
the same tokens. Reported: mean |delta log p| and the fraction of tokens whose ratio exp(delta) lies
outside the PPO clip range [0.8, 1.2] (a ratio the policy did not cause).

    python benchmarks/bench_update.py --threads 2 --out bench_results/update.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from t2po.algos.losses import ppo_policy_loss
from t2po.engines.base import SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.forward import FrozenTrunk, forward_micro_batch, make_micro_batch, pack_by_length
from t2po.models import load_model, lora_targets

PRECISIONS = {"fp32": (torch.float32, False), "fp32_autocast": (torch.float32, True), "bf16": (torch.bfloat16, False),
              "bf16_autocast": (torch.bfloat16, True)}


def main_job_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Turn-0 prompts of the main job's Sokoban rooms (t2po/configs/default.yaml env options)."""
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3, history_length=0,
                   prompt_style="compact")
    states = env.reset(seeds=[seed + i for i in range(count)])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": env.render_prompt(i, [], s)}],
                                             add_generation_prompt=True)["input_ids"]
               for i, s in enumerate(states)]
    env.close()
    return prompts


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", **targets))


def micro_batch(indices, prompts, responses, pad_id, shared: bool):
    mb = make_micro_batch(indices, prompts, responses, pad_id)
    return mb if shared else dataclasses.replace(mb, shared=0)


def update(model, optimizer, prompts, responses, old, pad_id, autocast: bool, mini_batch: int, micro_tokens: int,
           shared: bool = True, trunk: FrozenTrunk | None = None) -> float:
    """One PPO update over all samples (fixed advantages +-1); returns the seconds it took. `shared`:
    run the rows' common beginning once; `trunk`: replay the frozen layers' recorded output."""
    model.train()
    advantages = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(prompts))])
    start = time.perf_counter()
    for first in range(0, len(prompts), mini_batch):
        mini = list(range(first, min(first + mini_batch, len(prompts))))
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(responses[i]) for i in mini)
        for group in pack_by_length([len(prompts[i]) + len(responses[i]) for i in mini], micro_tokens):
            mb = micro_batch([mini[j] for j in group], prompts, responses, pad_id, shared)
            out = forward_micro_batch(model, mb, with_entropy=True, autocast_bf16=autocast, trunk=trunk)
            old_lp = torch.zeros_like(out["logp"])
            for b, i in enumerate(mb.indices):
                old_lp[b, : len(old[i])] = old[i]
            loss, _ = ppo_policy_loss(out["logp"], old_lp, advantages[mb.indices], mb.response_mask, 0.2, 0.28,
                                      3.0, "token-mean")
            loss = loss - 0.001 * (out["entropy"] * mb.response_mask).sum() / mb.response_mask.sum().clamp(min=1)
            (loss * mb.response_mask.sum() / tokens).backward()
        optimizer.step()
    return time.perf_counter() - start


def trainer_logprobs(model, prompts, responses, pad_id, autocast: bool, micro_tokens: int, shared: bool = True,
                     trunk: FrozenTrunk | None = None) -> list[torch.Tensor]:
    """The old-log-prob pass (records the frozen layers' output into `trunk`)."""
    model.eval()
    scores: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    with torch.no_grad():
        for group in pack_by_length([len(p) + len(r) for p, r in zip(prompts, responses)], micro_tokens):
            mb = micro_batch(group, prompts, responses, pad_id, shared)
            logp = forward_micro_batch(model, mb, autocast_bf16=autocast, trunk=trunk)["logp"]
            for b, i in enumerate(mb.indices):
                scores[i] = logp[b, : len(responses[i])].float()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="step samples per update (the main job: ~95)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/update.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_model()
    prompts = main_job_prompts(tokenizer, args.samples, args.seed)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    setups, agreement = {}, {}
    for name, (dtype, autocast) in PRECISIONS.items():
        model = with_lora(copy.deepcopy(base).to(dtype))
        gens = HFEngine(model, tokenizer).generate(prompts, sampling)  # the engine samples with the precision's weights
        responses = [g.token_ids for g in gens]
        old = [torch.tensor(g.logprobs) for g in gens]
        scored = trainer_logprobs(model, prompts, responses, tokenizer.pad_token_id, autocast, 4096)
        delta = torch.cat([s - o for s, o in zip(scored, old)])
        agreement[name] = {"mean_abs_delta_logp": delta.abs().mean().item(),
                           "outside_clip_fraction": ((delta.exp() < 0.8) | (delta.exp() > 1.2)).float().mean().item(),
                           "tokens": delta.numel()}
        print(f"{name:14s} engine vs trainer: {agreement[name]}", flush=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        setups[name] = (model, optimizer, responses, old, autocast)

    def default_update(model, optimizer, responses, old, autocast) -> float:
        # the trainer's update: the old-log-prob pass (untimed here) records the frozen layers' output
        trunk = FrozenTrunk(FrozenTrunk.first_trainable_layer(model))
        trainer_logprobs(model, prompts, responses, tokenizer.pad_token_id, autocast, 4096, trunk=trunk)
        return update(model, optimizer, prompts, responses, old, tokenizer.pad_token_id, autocast, 16,
                      4096, trunk=trunk)

    timed = {"fp32_before": lambda: update(*setups["fp32"][:2], prompts, setups["fp32"][2], setups["fp32"][3],
                                           tokenizer.pad_token_id, False,
                                           16, 4096, shared=False),
             **{name: (lambda name=name: update(setups[name][0], setups[name][1], prompts,
                                                setups[name][2], setups[name][3],
                                                tokenizer.pad_token_id, setups[name][4], 16, 4096))
                for name in PRECISIONS},
             "default": lambda: default_update(*setups["bf16"])}
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, run in timed.items():
            seconds[name].append(run())
            print(f"{name:14s} {seconds[name][-1]:6.2f} s", flush=True)
    median = {name: statistics.median(s) for name, s in seconds.items()}

    model, optimizer, responses, old, autocast = setups["bf16"]
    step: dict[str, list[float]] = {"whole_rows": [], "shared_prefix": [], "shared_prefix_trunk": []}
    for _ in range(args.repeats):
        for name in step:
            start = time.perf_counter()
            trunk = FrozenTrunk(FrozenTrunk.first_trainable_layer(model)) if name.endswith("trunk") else None
            trainer_logprobs(model, prompts, responses, tokenizer.pad_token_id, autocast, 4096,
                             shared=name != "whole_rows", trunk=trunk)
            update(model, optimizer, prompts, responses, old, tokenizer.pad_token_id, autocast, 16, 4096,
                   shared=name != "whole_rows", trunk=trunk)
            step[name].append(time.perf_counter() - start)
            print(f"bf16 step {name:20s} {step[name][-1]:6.2f} s", flush=True)
    step_median = {name: statistics.median(s) for name, s in step.items()}
    summary = {
        "model": "smollm2-135m-instruct, LoRA r16 on the last 8 layers",
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "update_seconds": median,
        "update_speedup_vs_fp32": median["fp32_before"] / median["default"],
        "update_speedup_by_precision": {name: median["fp32"] / median[name] for name in PRECISIONS},
        "logprob_agreement": agreement,
        "trainer_step_seconds": step_median,
        "trainer_step_speedup_vs_whole_rows": {name: step_median["whole_rows"] / s for name, s in step_median.items()},
        "all_seconds": seconds,
        "all_trainer_step_seconds": step,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"update: fp32 before issue 17 {median['fp32_before']:.2f} s, default {median['default']:.2f} s "
          f"({summary['update_speedup_vs_fp32']:.2f}x)")
    for name in PRECISIONS:
        a = agreement[name]
        print(f"{name:14s} update {median[name]:6.2f} s ({summary['update_speedup_by_precision'][name]:.2f}x)  engine "
              f"vs trainer: mean |dlogp| {a['mean_abs_delta_logp']:.4f}, outside [0.8, 1.2] "
              f"{100 * a['outside_clip_fraction']:.2f}% of {a['tokens']} tokens")
    for name, sec in step_median.items():
        print(f"bf16 step {name:20s} {sec:6.2f} s ({summary['trainer_step_speedup_vs_whole_rows'][name]:.2f}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
