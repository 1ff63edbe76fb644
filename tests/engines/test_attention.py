"""The copy-free grouped-query decode attention (`t2po.attention`) against attention computed by hand,
and a model using it against the same model on transformers' own SDPA path."""

from types import SimpleNamespace

import pytest
import torch

import t2po.attention
from t2po.attention import GROUPED_SDPA, grouped_sdpa_attention


def test_decode_step_equals_attention_with_repeated_kv_heads(monkeypatch):
    """softmax(q k^T * scale + mask) v with K/V head h // groups for query head h (the rule of
    transformers' `repeat_kv`), computed by hand; the grouped path must not fall back to transformers."""
    monkeypatch.setattr(t2po.attention, "sdpa_attention_forward", lambda *a, **k: pytest.fail("fell back to repeat_kv"))
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, length, dim = 3, 2, 3, 7, 8
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen)
    k, v = torch.randn(batch, kv_heads, length, dim, generator=gen), torch.randn(batch, kv_heads, length,
                                                                                 dim, generator=gen)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding of row 0
    module = SimpleNamespace(num_key_value_groups=groups, training=False)
    out, _ = grouped_sdpa_attention(module, q, k, v, mask, scaling=0.5)
    assert out.shape == (batch, 1, kv_heads * groups, dim)
    for b in range(batch):
        for h in range(kv_heads * groups):
            scores = (q[b, h, 0] @ k[b, h // groups].T) * 0.5
            scores = scores.masked_fill(~mask[b, 0, 0], float("-inf"))
            expected = torch.softmax(scores, dim=-1) @ v[b, h // groups]
            assert torch.allclose(out[b, 0, h], expected, atol=1e-5)


def test_model_decodes_the_same_with_either_attention(tiny_model):
    model, tokenizer = tiny_model
    assert (model.config._attn_implementation == GROUPED_SDPA
            and model.config.num_key_value_heads < model.config.num_attention_heads)
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    logits = {}
    try:
        for name in ("sdpa", GROUPED_SDPA):
            model.set_attn_implementation(name)
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
                step = model(input_ids=torch.tensor([[20], [21]]),
                             attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                             position_ids=torch.tensor([[5], [3]]), past_key_values=out.past_key_values, use_cache=True)
            logits[name] = step.logits[:, -1]
    finally:
        model.set_attn_implementation(GROUPED_SDPA)
    assert torch.allclose(logits["sdpa"], logits[GROUPED_SDPA], atol=1e-5)
