"""Data-parallel training on the CPU: 2 gloo processes (file rendezvous) with the tiny model, FSDP2.

One spawn serves the whole file (process start-up dominates): each rank generates under
`gathered` (ranks decode different numbers of tokens), takes one PPO step on its share of a fixed
batch, and writes what it saw; the parent process repeats the step alone on the whole batch and
reloads the 2-rank sharded checkpoint with world size 1."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from t2po.algos import ppo_policy_loss
from t2po.distributed import (
    clip_grad_norm,
    from_rank0,
    full_state_dict,
    gathered,
    init_distributed,
    load_sharded,
    mean_over_ranks,
    padded,
    plan_mini_batches,
    save_sharded,
    shard_model,
    shard_tasks,
    sum_over_ranks,
)
from t2po.engines.base import SamplingParams
from t2po.engines.hf import HFEngine
from t2po.forward import forward_micro_batch, make_micro_batch, pack_by_length
from t2po.models import load_model

WORLD = 2
MINI_BATCH = 4  # 7 samples -> mini-batches of 4 and 3, split unevenly between the ranks
# AdamW's first step is lr * g / (|g| + eps): a large eps keeps it continuous in g, so float-level
# differences between summing over ranks and summing in one process stay float-level in the weights.
OPTIM = dict(lr=1e-3, eps=1e-3)


def _batch(vocab: int):
    """Seven step samples (prompt ids, response ids, advantage, old log-probs) of varied lengths."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for k in range(7):
        prompt = torch.randint(3, vocab, (5 + 3 * k,), generator=g).tolist()
        response = torch.randint(3, vocab, (2 + (k * 5) % 7,), generator=g).tolist()
        samples.append((prompt, response, float(torch.randn(1, generator=g)),
                        (-3.0 - torch.rand(len(response), generator=g)).tolist()))
    return samples


def ppo_step(model, optimizer, samples, seed: int = 0) -> float:
    """One PPO epoch over `samples` (this rank's share) with the distributed helpers, as the trainer's
    update loop does: global mini-batch plan, token-mean weights over the global mini-batch,
    padded micro-batch counts. Returns the loss summed over ranks (the global mini-batch loss)."""
    prompts, responses = [s[0] for s in samples], [s[1] for s in samples]
    filler = make_micro_batch([0], [[0]], [[0]], 0)
    total = 0.0
    for share in plan_mini_batches([len(r) for r in responses], MINI_BATCH, np.random.default_rng(seed)):
        optimizer.zero_grad(set_to_none=True)
        groups = pack_by_length([len(prompts[i]) + len(responses[i]) for i in share.indices], 48)
        micro = [make_micro_batch([share.indices[i] for i in group], prompts, responses, 0) for group in groups]
        loss_sum = 0.0
        for mb, real in padded(micro, filler):
            out = forward_micro_batch(model, mb)
            B, T = mb.response_ids.shape
            old = torch.zeros(B, T)
            adv = torch.zeros(B)
            for b, i in enumerate(mb.indices if real else []):  # the filler has no sample behind it
                old[b, : len(samples[i][3])] = torch.tensor(samples[i][3])
                adv[b] = samples[i][2]
            loss, _ = ppo_policy_loss(out["logp"], old, adv, mb.response_mask, 0.2, 0.2, 3.0, "token-mean")
            weight = mb.response_mask.sum().item() / share.global_tokens if real else 0.0
            (loss * weight).backward()
            loss_sum += loss.item() * weight
        total += sum_over_ranks(loss_sum)
        clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
    return total


def _rank(rank: int, rendezvous: str, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file rendezvous: a TCP one on a port picked in advance can lose the port to another process
    # before rank 0 binds it (a rare CI failure). init_distributed then joins the initialised group.
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    ctx = init_distributed(device="cpu")
    try:
        _rank_work(ctx, model_dir, out_dir)
    finally:
        torch.distributed.destroy_process_group()
        # Free the sharded model now (its device mesh holds the process group and gloo's threads):
        # in the interpreter's final GC a gloo thread still releasing a collective's tensors cannot
        # take the GIL and aborts the process (seen with the trainer under torchrun; a possible
        # cause of this fixture's rare failures, like the port race the file rendezvous removes).
        gc.collect()


def _rank_work(ctx, model_dir: str, out_dir: str) -> None:
    rank = ctx.rank
    model, tokenizer = load_model(model_dir)
    shard_model(model)
    with torch.no_grad():  # a first forward that is not the root's (the trainer's scoring pass with vLLM rollouts)
        forward_micro_batch(model, make_micro_batch([0], [[5, 6, 7]], [[8, 9]], 0))
    # Generation on the sharded model: rank 1 decodes 3x more tokens, with no collective per step.
    with gathered(model):
        gens = HFEngine(model, tokenizer).generate([tokenizer.encode("hello")],
                                                   SamplingParams(temperature=0.0, max_new_tokens=4 + 8 * rank))
    model.train()
    batch = _batch(model.config.vocab_size)
    mine = shard_tasks(list(range(len(batch))), ctx.rank, ctx.world_size)
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
    loss = ppo_step(model, optimizer, [batch[i] for i in mine])
    weights = full_state_dict(model)
    save_sharded(os.path.join(out_dir, "ckpt"), model, optimizer, {"iteration": 1})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim_full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out_dir, "weights.safetensors"))
        exp_avg = {f"{fqn}": s["exp_avg"].contiguous() for fqn, s in optim_full["state"].items()}
        save_file(exp_avg, os.path.join(out_dir, "exp_avg.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": loss, "tasks": mine, "generated": gens[0].token_ids,
                   "run_dir": from_rank0(f"runs/started-by-{rank}"),
                   "metrics": mean_over_ranks({"success": float(rank), f"only_rank{rank}": 1.0 + rank})}, f)


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(str(out / "rendezvous"), str(tiny_model_dir), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks


def test_tasks_are_split_into_whole_contiguous_blocks():
    assert [shard_tasks(list(range(7)), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [shard_tasks([10, 11, 12], r, 3) for r in range(3)] == [[10], [11], [12]]
    with pytest.raises(ValueError, match="rollout.num_tasks >= 4"):
        shard_tasks([1, 2], 0, 4)


def test_mini_batch_plan_of_one_process_covers_the_batch_like_the_trainer():
    """World size 1: the single-process trainer's permutation and chunks, exactly."""
    lengths = [3, 1, 4, 1, 5, 9, 2]
    plan = plan_mini_batches(lengths, 3, np.random.default_rng([0, 4, 17]))
    perm = [int(i) for i in np.random.default_rng([0, 4, 17]).permutation(7)]
    assert [s.indices for s in plan] == [perm[0:3], perm[3:6], perm[6:]]
    assert [s.global_tokens for s in plan] == [sum(lengths[i] for i in perm[k : k + 3]) for k in (0, 3, 6)]
    assert [s.global_samples for s in plan] == [3, 3, 1]


def test_generation_inside_gathered_matches_the_unsharded_model(two_ranks, tiny_model):
    _, ranks = two_ranks
    model, tokenizer = tiny_model
    for rank, seen in enumerate(ranks):
        expected = HFEngine(model, tokenizer).generate([tokenizer.encode("hello")],
                                                       SamplingParams(temperature=0.0, max_new_tokens=4 + 8 * rank))
        assert seen["generated"] == expected[0].token_ids


def test_both_ranks_see_the_loss_of_a_single_process_run(two_ranks, tiny_model_dir):
    out, ranks = two_ranks
    assert ranks[0]["tasks"] + ranks[1]["tasks"] == list(range(7))
    assert ranks[0]["loss"] == ranks[1]["loss"]
    model, _ = load_model(tiny_model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
    loss = ppo_step(model, optimizer, _batch(model.config.vocab_size))
    assert loss == pytest.approx(ranks[0]["loss"], abs=1e-6)
    # the 2-rank update equals the single-process update on the same data
    weights = load_file(str(out / "weights.safetensors"))
    single = model.state_dict()
    original, _ = load_model(tiny_model_dir)
    moved = 0
    for name, tensor in weights.items():
        assert torch.allclose(tensor, single[name], atol=1e-6, rtol=0), name
        moved += int(not torch.equal(tensor, original.state_dict()[name]))
    assert moved == len(weights), "every weight took a step"


def test_sharded_checkpoint_of_two_ranks_loads_into_one_process(two_ranks, tiny_model_dir):
    out, _ = two_ranks
    assert sorted(p.name for p in (out / "ckpt").glob("*.safetensors")) == [p.name
            for p in sorted((out / "ckpt").glob("shard-*.safetensors"))]
    assert len(list((out / "ckpt").glob("*.safetensors"))) == 2, "one shard file per rank"
    model, _ = load_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
    state = load_sharded(out / "ckpt", model, optimizer)
    assert state == {"iteration": 1, "world_size": 2}
    weights = load_file(str(out / "weights.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    exp_avg = load_file(str(out / "exp_avg.safetensors"))
    names = dict(model.named_parameters())
    for fqn, tensor in exp_avg.items():
        assert torch.equal(optimizer.state[names[fqn]]["exp_avg"], tensor), fqn
    with pytest.raises(FileNotFoundError, match="not a complete sharded checkpoint"):
        load_sharded(out, model, optimizer)


def test_ranks_agree_on_metrics_and_on_rank0_values(two_ranks):
    _, ranks = two_ranks
    for seen in ranks:
        assert seen["metrics"] == {"success": 0.5, "only_rank0": 1.0, "only_rank1": 2.0}
        assert seen["run_dir"] == "runs/started-by-0"
