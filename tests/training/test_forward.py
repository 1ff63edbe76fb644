"""`t2po.forward`: the micro-batch forward pass that runs the rows' shared beginning once gives the same
log-probs, entropies, critic values and gradients as the plain forward pass over whole rows."""

import dataclasses

import pytest
import torch

from t2po.forward import FrozenTrunk, _SkippedLayer, forward_micro_batch, make_micro_batch
from t2po.models import load_model


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]


def test_shared_beginning_once_equals_the_full_forward_pass(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)  # its own copy: the test computes gradients
    torch.manual_seed(0)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    prompts = [chat(tokenizer, t) for t in ("Push the box up.", "hi", "Grid:\n#####\n#_@$#\n#####", "hi")]
    responses = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    mb = make_micro_batch([0, 1, 2, 3], prompts, responses, tokenizer.pad_token_id)
    assert mb.shared >= 16 and all(p[: mb.shared] == prompts[0][: mb.shared] for p in prompts)
    full = dataclasses.replace(mb, shared=0)
    assert mb.processed_tokens == full.processed_tokens - 3 * mb.shared
    assert mb.processed_tokens - mb.real_tokens == full.processed_tokens - full.real_tokens  # the same padding

    results = {}
    for name, batch in (("shared", mb), ("full", full)):
        model.zero_grad(set_to_none=True)
        value_head.zero_grad(set_to_none=True)
        out = forward_micro_batch(model, batch, with_entropy=True, value_head=value_head)
        (out["logp"].sum() + out["entropy"].sum() + out["values"].sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[name] = ({k: v.detach() for k, v in out.items()}, grads)
    (shared_out, shared_grads), (full_out, full_grads) = results["shared"], results["full"]
    for key in ("logp", "entropy", "values"):
        assert torch.allclose(shared_out[key], full_out[key], atol=1e-5), key
    assert (shared_out["logp"] != 0).sum() == sum(map(len, responses))  # every response token scored
    assert len(shared_grads) == len(full_grads) > 0
    for a, b in zip(shared_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_rows_without_a_common_beginning_run_whole(tiny_model):
    _, tokenizer = tiny_model
    mb = make_micro_batch([0, 1], [[1, 2, 3] * 10, [4, 5, 6] * 10], [[7], [8]], tokenizer.pad_token_id)
    assert mb.shared == 0 and mb.processed_tokens == mb.input_ids.numel()


def test_frozen_trunk_replay_skips_the_frozen_layers_and_equals_the_full_pass(tiny_model_dir):
    """LoRA on the last layer only: the old-log-prob pass records the states entering it, the update's
    pass starts there (the frozen layers do not run) and gives the full pass's log-probs and gradients."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model(tiny_model_dir)
    n = base.config.num_hidden_layers
    assert n >= 2
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[n - 1],
                                            layers_pattern="layers", init_lora_weights=False))
    trunk = FrozenTrunk(FrozenTrunk.first_trainable_layer(model))
    assert trunk.layer == n - 1
    prompts = [chat(tokenizer, t) for t in ("Push the box up.", "hi", "Grid:\n#####\n#_@$#\n#####")]
    responses = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    first_layer_calls = []
    decoder = model.get_base_model().get_decoder()
    hook = decoder.layers[0].register_forward_hook(lambda *a: first_layer_calls.append(1))
    results = {}
    try:
        for name, rows in (("whole", [0, 1, 2]), ("shared", [0, 1, 2])):  # with and without the shared beginning
            mb = make_micro_batch(rows, prompts, responses, tokenizer.pad_token_id)
            if name == "whole":
                mb = dataclasses.replace(mb, shared=0)
            trunk.states.clear()
            with torch.no_grad():
                recorded = forward_micro_batch(model, mb, trunk=trunk)  # records
            assert sorted(trunk.states) == rows and first_layer_calls
            assert [len(trunk.states[i]) for i in rows] == [len(prompts[i]) + len(responses[i]) for i in rows]
            first_layer_calls.clear()
            for mode in ("replay", "full"):
                model.zero_grad(set_to_none=True)
                out = forward_micro_batch(model, mb, with_entropy=True, trunk=trunk if mode == "replay" else None)
                out["logp"].sum().backward()
                results[name, mode] = (out["logp"].detach(),
                                       [p.grad.clone() for p in model.parameters() if p.grad is not None])
                assert bool(first_layer_calls) == (mode == "full")  # replay skips the frozen layers
                first_layer_calls.clear()
            assert torch.allclose(recorded["logp"], results[name, "full"][0], atol=1e-5)
    finally:
        hook.remove()
    assert all(type(layer) is not _SkippedLayer for layer in decoder.layers)  # put back
    for name in ("whole", "shared"):
        (replay_logp, replay_grads), (full_logp, full_grads) = results[name, "replay"], results[name, "full"]
        assert torch.allclose(replay_logp, full_logp, atol=1e-5)
        assert len(replay_grads) == len(full_grads) == 4  # lora_A and lora_B of q_proj and v_proj in the last layer
        for a, b in zip(replay_grads, full_grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_reference_pass_replays_the_trunk_with_the_adapters_off(tiny_model_dir):
    """The KL's reference is the model without its LoRA adapters (`Trainer._score_into`): its pass replays
    the states the old-log-prob pass recorded and gives the adapter-free full pass's log-probs, not the policy's."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model(tiny_model_dir)
    n = base.config.num_hidden_layers
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[n - 1],
                                            layers_pattern="layers", init_lora_weights=False))
    prompts = [chat(tokenizer, t) for t in ("Push the box up.", "Grid:\n#####\n#_@$#\n#####")]
    mb = make_micro_batch([0, 1], prompts, [[5, 6, 7], [8, 9]], tokenizer.pad_token_id)
    trunk = FrozenTrunk(FrozenTrunk.first_trainable_layer(model))
    first_layer_calls = []
    hook = model.get_base_model().get_decoder().layers[0].register_forward_hook(lambda *a: first_layer_calls.append(1))
    with torch.no_grad():
        policy = forward_micro_batch(model, mb, trunk=trunk)["logp"]  # records
        with model.disable_adapter():
            first_layer_calls.clear()
            replayed = forward_micro_batch(model, mb, trunk=trunk)["logp"]
            assert not first_layer_calls  # the frozen layers did not run
            full = forward_micro_batch(model, mb)["logp"]
    hook.remove()
    assert torch.allclose(replayed, full, atol=1e-5)
    assert not torch.allclose(replayed, policy, atol=1e-3)  # the adapters were off in the replayed pass


def test_reference_pass_alone_records_the_trunk_when_the_engine_log_probs_are_kept(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """`optim.recompute_logprobs=null` with float32 weights keeps the engine's log-probs (`Trainer._score_into`):
    the old-log-prob pass is skipped, so the KL's reference pass records the trunk the update replays. The update
    must be the one the recomputing run makes (the engine's log-probs are the trainer's within ~1e-6 in float32),
    with fewer forward passes; a trunk recorded from other rows or layers would change the loss and the gradient.
    With optim.bf16 the engine and the trainer round differently, and null recomputes."""
    import json

    from helpers import run_training

    import t2po.trainer.trainer as trainer_module
    from t2po.config import load_config

    calls = []
    counted = trainer_module.forward_micro_batch
    monkeypatch.setattr(trainer_module, "forward_micro_batch", lambda *a, **k: calls.append(1) or counted(*a, **k))

    def run(name: str, *extra: str):
        calls.clear()
        cfg = load_config("default", [
            f"model.path={tiny_model_dir}", f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}",
            "trainer.iterations=1", "trainer.trackers=[console]", "trainer.val_before_train=false",
            "trainer.trace_episodes=0", "trainer.report=false", "warmup.episodes=0", "rollout.num_tasks=2",
            "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
            "env.options.max_steps=2", "model.dtype=float32", "model.lora_rank=4", "model.lora_layers=1",
            "algo.kl_coef=0.1", "optim.lr=1e-2", "optim.mini_batch_size=2", *extra])
        trainer = run_training(cfg)
        trainer.forward_passes = len(calls)
        return trainer, json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])

    kept, kept_metrics = run("kept", "optim.recompute_logprobs=null")
    recomputed, recomputed_metrics = run("recomputed", "optim.recompute_logprobs=true")
    assert kept.recompute_logprobs is False and recomputed.recompute_logprobs is True
    assert 0 < kept.forward_passes < recomputed.forward_passes  # the old-log-prob pass did not run
    assert kept_metrics["rollout/generated_tokens"] == recomputed_metrics["rollout/generated_tokens"] > 0
    for key in ("actor/pg_loss", "actor/kl", "actor/grad_norm"):
        assert kept_metrics[key] == pytest.approx(recomputed_metrics[key], rel=1e-4, abs=1e-7), key
    assert abs(kept_metrics["actor/kl"]) > 1e-6  # after the first step the policy left the reference
    autocast, _ = run("autocast", "optim.recompute_logprobs=null", "optim.bf16=true")
    assert autocast.recompute_logprobs is True
