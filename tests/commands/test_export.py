"""`t2po export` and the checkpoint files: a trained tiny policy loads outside t2po (plain
transformers, plain PEFT) with the same greedy responses and logits as t2po's own loader
(`t2po.evaluate.resolve_policy`), also after a warm-up (the adapter's base is `warmup_model/`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import run_training
from t2po.config import load_config
from t2po.policy_source import resolve_policy
from t2po.export import main as export_main
from t2po.rollout import build_prompt_ids

PROMPTS = ["You are in a 5x5 room. Push the box onto the target.", "Guess a number from 1 to 8.", "<think>"]


def train(model_dir: Path, out: Path, *extra: str) -> Path:
    cfg = load_config("default", [
        f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run", "trainer.trackers=[console]", "trainer.report=false",
        "trainer.iterations=1", "trainer.val_before_train=false", "rollout.num_tasks=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=1", "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "optim.lr=5e-2", "optim.mini_batch_size=4",
        "model.lora_rank=4", "model.lora_layers=null",
        "model.dtype=float32", *extra])  # float32 on every CPU: the 1e-4 comparison is about the files, not bf16 rounding
    return run_training(cfg).run_dir


def outputs(model, tokenizer) -> list[tuple[torch.Tensor, list[int]]]:
    """(last-position logits, greedy continuation) per prompt, rendered with t2po's chat template."""
    res = []
    for text in PROMPTS:
        ids = torch.tensor([build_prompt_ids(tokenizer, text)[0]])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        res.append((logits, greedy))
    return res


def assert_same(a, b) -> None:
    for (la, ga), (lb, gb) in zip(a, b):
        assert ga == gb
        assert (la - lb).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["lora-after-warmup", "full"])
def test_export_loads_in_plain_transformers_and_peft_with_t2pos_outputs(tiny_model_dir, tmp_path, kind):
    extra = ["warmup.episodes=2", "warmup.epochs=1", "warmup.lr=5e-2"] if kind == "lora-after-warmup" else ["model.lora=false", "warmup.episodes=0"]
    run = train(tiny_model_dir, tmp_path, *extra)
    ckpt = run / "checkpoints" / "iter_000001"
    info = json.loads((ckpt / "checkpoint.json").read_text())
    # after a LoRA warm-up the checkpoint's adapter holds the warm-up's ranks and the RL ranks, on the real base
    base = tiny_model_dir
    assert info["kind"] == ("lora" if kind == "lora-after-warmup" else "full") and info["iteration"] == 1
    assert Path(info["base"]) == base.resolve()
    if kind == "lora-after-warmup":
        assert info["warmup_adapter_rank"] == 4
        warmup = run / "warmup_model"  # the warm-up as its adapter, not a copy of the model
        assert not (warmup / "config.json").exists()
        size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
        assert size(warmup) < 0.5 * size(tiny_model_dir), (size(warmup), size(tiny_model_dir))

    model, tokenizer, _ = resolve_policy(run)  # t2po's own loader
    expected = outputs(model, tokenizer)
    untrained = outputs(*resolve_policy(tiny_model_dir)[:2])
    assert any((a[0] - b[0]).abs().max() > 1e-2 for a, b in zip(expected, untrained)), "training changed nothing: the test would prove nothing"

    out = tmp_path / "exported"
    assert export_main([str(run), "--out", str(out)]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "export.json"):
        assert (out / name).is_file(), name
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain_tokenizer.chat_template == tokenizer.chat_template
    assert_same(outputs(AutoModelForCausalLM.from_pretrained(out), plain_tokenizer), expected)
    assert export_main([str(run), "--out", str(out)]) == 2, "an existing export is never overwritten"

    if kind == "lora-after-warmup":
        from peft import AutoPeftModelForCausalLM

        for adapter in (out / "adapter", ckpt / "adapter"):  # the export's and the trainer's own adapter
            assert Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]) == base.resolve()
            assert_same(outputs(AutoPeftModelForCausalLM.from_pretrained(adapter), plain_tokenizer), expected)
