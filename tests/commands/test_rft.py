"""Cold start: collection round-trips, assistant-only SFT, and the collect -> sft -> train pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2po.envs import make_env
from t2po.errors import UserError
from t2po.forward import make_micro_batch
from t2po.rft import collect
from t2po.sft import (Conversation, load_conversations, play_expert_episodes, save_conversations, sft_train,
                      tokenize_conversations)

REPO = Path(__file__).resolve().parents[2]
SOKOBAN = {"dim_room": [5, 5], "num_boxes": 1, "num_gen_steps": 3, "max_steps": 6, "history_length": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_collected_conversations_round_trip(tmp_path, suffix):
    out = tmp_path / f"demos{suffix}"
    stats = collect("sokoban", "expert", episodes=6, threshold=0.8, out=out, env_options=SOKOBAN)
    assert stats["kept"] == 6, "the solver wins every generated room"
    convs = load_conversations(out)
    assert len(convs) == 6
    env = make_env("sokoban", **SOKOBAN)
    again = play_expert_episodes(env, [c.seed for c in convs])
    assert [c.steps for c in convs] == [c.steps for c in again]
    assert all(c.won and c.steps and "<action>" in c.steps[0]["response"] for c in convs)


def test_threshold_filters_episodes(tmp_path):
    # 0.8 keeps wins; a threshold above the best score keeps nothing
    stats = collect("sokoban", "expert", episodes=4, threshold=1.5, out=tmp_path / "none.jsonl", env_options=SOKOBAN)
    assert stats["kept"] == 0 and load_conversations(tmp_path / "none.jsonl") == []


def test_sft_masks_prompt_tokens(tiny_model):
    _, tokenizer = tiny_model
    conv = Conversation("sokoban", 0,
            [{"prompt": "Where is the box?", "response": "<think>left</think><action>left</action>"}], 1.0, True)
    [(prompt_ids, response_ids)] = tokenize_conversations([conv], tokenizer)
    mb = make_micro_batch([0], [prompt_ids], [response_ids], tokenizer.pad_token_id)
    # the loss mask covers exactly the assistant tokens (response + end-of-turn), never the prompt
    assert int(mb.response_mask.sum()) == len(response_ids)
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids, skip_special_tokens=True) == conv.steps[0]["response"]
    assert mb.input_ids[0, : len(prompt_ids)].tolist() == prompt_ids


def test_sft_loss_decreases(tiny_model_dir):
    from t2po.models import load_model

    model, tokenizer = load_model(tiny_model_dir)  # a private copy: this test trains it
    env = make_env("sokoban", **SOKOBAN)
    convs = play_expert_episodes(env, range(4))
    examples = tokenize_conversations(convs, tokenizer)
    torch.manual_seed(0)
    losses = sft_train(model, tokenizer, examples, epochs=4, lr=3e-3, batch_size=4)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5, losses


def test_sft_under_lora_on_the_last_layer_runs_the_frozen_layers_in_the_first_epoch_only(tiny_model_dir, monkeypatch):
    """Later epochs start at the first LoRA layer from the states the first epoch recorded
    (t2po.sft._frozen_trunk) and train exactly as the full passes do."""
    from peft import LoraConfig, get_peft_model

    import t2po.sft
    from t2po.models import load_model

    env = make_env("sokoban", **SOKOBAN)
    convs = play_expert_episodes(env, range(3))
    results = {}
    for mode in ("trunk", "full"):
        base, tokenizer = load_model(tiny_model_dir)
        n = base.config.num_hidden_layers
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[n - 1],
                                                layers_pattern="layers"))
        examples = tokenize_conversations(convs, tokenizer)
        epochs = []  # finished epochs, from sft_train's log
        calls = []  # per forward pass of layer 0: the epoch it ran in
        model.get_base_model().get_decoder().layers[0].register_forward_hook(lambda *a: calls.append(len(epochs)))
        monkeypatch.setattr(t2po.sft, "TRUNK_BYTES", 2**31 if mode == "trunk" else 0)
        losses = sft_train(model, tokenizer, examples, epochs=3, lr=3e-3, batch_size=2,
                           log=lambda m: epochs.append(m["sft/epoch"]))
        results[mode] = (losses, [p.detach().clone() for p in model.parameters() if p.requires_grad])
        per_epoch = [calls.count(e) for e in range(3)]
        assert per_epoch[0] > 0
        assert (per_epoch[1:] == [0, 0]) == (mode == "trunk"), per_epoch
    (trunk_losses, trunk_params), (full_losses, full_params) = results["trunk"], results["full"]
    assert trunk_losses == pytest.approx(full_losses, abs=1e-4)
    for a, b in zip(trunk_params, full_params):
        assert torch.allclose(a, b, atol=1e-4)


def test_collect_sft_train_pipeline(tiny_model_dir, tmp_path):
    def t2po(*args):
        out = subprocess.run([sys.executable, "-m", "t2po.cli", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    data = tmp_path / "demos.jsonl"
    t2po("rft", "collect", "sokoban", "--episodes", "3", "--out", str(data),
         *[f"--env-option={k}={json.dumps(v)}" for k, v in SOKOBAN.items()])
    model_dir = tmp_path / "sft"
    printed = t2po("sft", str(data), "--model", str(tiny_model_dir), "--out", str(model_dir), "--epochs", "1")
    assert "t2po train model.path=" in printed
    assert (model_dir / "model.safetensors").exists() and (model_dir / "sft.json").exists()
    t2po("train", "--quiet", f"model.path={model_dir}", "trainer.iterations=1", f"trainer.output_dir={tmp_path}",
         "trainer.run_name=r",
         "trainer.trackers=[console]", "trainer.report=false", "trainer.val_before_train=false", "warmup.episodes=0",
         "rollout.num_tasks=1", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
         "env.options.max_steps=2")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["checkpoint"]


def test_collect_takes_the_environment_from_a_preset(tmp_path):
    from t2po.rft import main

    out = tmp_path / "demos.jsonl"
    assert main(["collect", "--preset", "default", "--episodes", "2", "--out", str(out)]) == 0
    from t2po.config import load_config

    (conv,) = load_conversations(out)[:1]
    # the prompt is the one `t2po train default` renders: its compact 5x5 Sokoban prompt
    env = make_env("sokoban", **load_config("default").env.options)
    assert conv.steps == play_expert_episodes(env, [conv.seed])[0].steps
    # expected errors are UserError: `t2po rft` prints them as one line with exit status 2 (t2po/cli.py)
    with pytest.raises(UserError, match="trains on 'sokoban', not 'alfworld'"):
        main(["collect", "alfworld", "--preset", "default", "--out", str(out)])
    with pytest.raises(UserError, match="Unknown preset"):
        main(["collect", "--preset", "defualt", "--out", str(out)])


@pytest.mark.slow  # SmolLM2-135M: collect, two evaluations of 16 rooms and 3 SFT epochs (several minutes)
def test_sft_on_expert_sokoban_raises_the_valid_action_rate(tmp_path):
    out = tmp_path / "rft.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_rft.py"), "--episodes", "32",
                          "--eval-episodes", "16",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sft"]["loss_last"] < result["sft"]["loss_first"]
    assert result["after"]["valid_action_rate"] > result["before"]["valid_action_rate"] + 0.2, result
