"""Shared fixtures: a tiny randomly initialised Llama causal LM built once per test session.

`tiny_model_dir` is a real Hugging Face model directory (safetensors, byte-level BPE tokenizer whose
`<think>`/`</think>` tags are several tokens each, SmolLM2 chat template), loaded through the same
`t2po.models.load_model` path as any user model. `tiny_vlm_dir` is the same for a vision-language
model: a tiny random Qwen2-VL with its processor (`t2po.tiny_models.build_tiny_vlm`)."""

from __future__ import annotations

import pytest

from t2po.models import load_model
from t2po.tiny_models import build_tiny_model, build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) of the tiny model; session-wide, so tests must not modify its weights."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), seed=0)
