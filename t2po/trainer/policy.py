"""Forward passes of the policy over step samples: per-token log-probs, entropies and critic values.

Samples (prompt ids + response ids) are packed into micro-batches by length so that padding stays
small (`pack_by_length`); each micro-batch is right-padded, run through the decoder once, and only the
hidden states that predict response tokens go through the LM head (a [B, T_response, V] logits tensor
instead of [B, L, V]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2po.algos import entropy_from_logits


@dataclass
class MicroBatch:
    indices: list[int]  # sample indices in the caller's list
    input_ids: torch.Tensor  # [B, L] right-padded prompt+response
    attention_mask: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, T] right-padded
    response_mask: torch.Tensor  # [B, T] 1 on real response tokens

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def processed_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack_by_length(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices (sorted by length) so that rows x longest row <= max_tokens per group.
    A sample longer than `max_tokens` forms a group on its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and longest * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def make_micro_batch(indices: list[int], prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> MicroBatch:
    rows = [prompts[i] + responses[i] for i in indices]
    L = max(len(r) for r in rows)
    T = max(max(len(responses[i]) for i in indices), 1)
    B = len(indices)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    for b, i in enumerate(indices):
        row = rows[b]
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        r = responses[i]
        if r:
            response_ids[b, : len(r)] = torch.tensor(r)
            response_mask[b, : len(r)] = 1.0
    prompt_lens = torch.tensor([len(prompts[i]) for i in indices])
    return MicroBatch(indices, input_ids, attention_mask, prompt_lens, response_ids, response_mask)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the LM head of a causal LM (plain or wrapped by peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def forward_micro_batch(
    model: torch.nn.Module,
    mb: MicroBatch,
    with_entropy: bool = False,
    value_head: torch.nn.Module | None = None,
    autocast_bf16: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-probs [B, T] of the response tokens (and entropies [B, T], values [B] at the last prompt
    token) from one forward pass."""
    decoder, head = decoder_and_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        hidden = decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state  # [B, L, H]
    B, T = mb.response_ids.shape
    # hidden state at position p predicts token p + 1: response token t sits at prompt_len + t
    pos = (mb.prompt_lens.unsqueeze(1) - 1 + torch.arange(T).unsqueeze(0)).clamp(max=hidden.shape[1] - 1)
    h = hidden.gather(1, pos.unsqueeze(-1).expand(B, T, hidden.shape[-1]))
    logits = head(h).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    out = {"logp": logp_all.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1) * mb.response_mask}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits) * mb.response_mask
    if value_head is not None:
        last_prompt = hidden[torch.arange(B), mb.prompt_lens - 1].float()
        out["values"] = value_head(last_prompt).squeeze(-1)
    return out
