"""Forward passes of the policy over step samples: per-token log-probs, entropies and critic values.

Samples (prompt ids + response ids) are packed into micro-batches by length so that padding stays
small (`pack_by_length`); each micro-batch is right-padded, run through the decoder once, and only the
hidden states that predict response tokens go through the LM head (a [B, T_response, V] logits tensor
instead of [B, L, V]). For a vision-language model the micro-batch also carries the pixel inputs of
its rows' images (exactly those the engine saw) and the forward pass uses the engine's positions and
placeholder rule (`t2po.vlm`), so the recomputed log-probs equal the engine's.

The tokens all rows of a text micro-batch begin with (`MicroBatch.shared`: the chat template's system
turn and the task's instructions, 83 of the main job's ~180 tokens per sample) run through the model
once, as a batch of one; the rest of every row attends to their K/V (expanded to the batch, so their
gradients add up over the rows). Same logits as the full forward pass, up to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from t2po.algos import entropy_from_logits
from t2po.engines.base import shared_prefix_length
from t2po.vlm import collate_pixel_inputs, is_vision_language, multimodal_body, placeholder_token_ids, position_ids


@dataclass
class MicroBatch:
    indices: list[int]  # sample indices in the caller's list
    input_ids: torch.Tensor  # [B, L] right-padded prompt+response
    attention_mask: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, T] right-padded
    response_mask: torch.Tensor  # [B, T] 1 on real response tokens
    pixel_inputs: dict | None = None  # the rows' images, collated (t2po.vlm); None without images
    shared: int = 0  # leading tokens every row has (run once for the micro-batch); 0 with images

    @property
    def real_tokens(self) -> int:
        """Tokens the forward pass computes that are not padding."""
        return int(self.attention_mask.sum()) - (len(self.indices) - 1) * self.shared

    @property
    def processed_tokens(self) -> int:
        """Tokens the forward pass computes, padding included."""
        B, L = self.input_ids.shape
        return self.shared + B * (L - self.shared)

    def to(self, device: torch.device | str) -> "MicroBatch":
        """This micro-batch with every tensor on `device` (the policy's)."""
        moved = {f.name: v.to(device) for f in dataclasses.fields(self) if torch.is_tensor(v := getattr(self, f.name))}
        return dataclasses.replace(self, **moved)


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


def make_micro_batch(indices: list[int], prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     pixel_inputs: list[dict | None] | None = None) -> MicroBatch:
    """Rows `indices` of prompts + responses, right-padded; `pixel_inputs` (one entry per prompt, None
    for a prompt without an image) gives the rows' pixel inputs."""
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
    pixels = collate_pixel_inputs([pixel_inputs[i] for i in indices]) if pixel_inputs is not None else None
    shared = shared_prefix_length([prompts[i] for i in indices]) if pixels is None else 0
    return MicroBatch(indices, input_ids, attention_mask, prompt_lens, response_ids, response_mask, pixels, shared)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the LM head of a causal LM (plain or wrapped by peft); for a
    vision-language model the body includes the vision tower."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_vision_language(base):
        return multimodal_body(base), base.get_output_embeddings()
    return base.get_decoder(), base.get_output_embeddings()


class FrozenTrunk:
    """The hidden states entering decoder layer `layer`, the first layer with a trainable parameter, per
    sample (index in the trainer's sample list -> [prompt + response tokens, hidden]).

    Below that layer nothing trains (LoRA on the last layers only, `model.lora_layers`), so the
    embeddings and the layers under it compute the same states in every forward pass over a sample.
    The old-log-prob pass records them, and the update's passes over the same samples start at `layer`
    (the layers below are skipped for the pass, the recorded states fed in): in the main job (LoRA on
    the last 8 of 30 layers) the update's forward pass runs 8 layers instead of 30. The same layers on
    the same inputs, so the same results up to rounding (tests/training/test_forward.py). SFT
    does the same across epochs: the first records, the later ones replay (`t2po.sft._frozen_trunk`)."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.states: dict[int, torch.Tensor] = {}

    @staticmethod
    def first_trainable_layer(model: torch.nn.Module) -> int:
        """Index of the first decoder layer with a trainable parameter; 0 (nothing to skip) when the
        embeddings train, no layer trains, the model reads images, or its attention has dropout (the
        states of a training-mode pass would then differ from the recorded ones)."""
        if is_vision_language(model):
            return 0
        decoder, _ = decoder_and_head(model)
        layers = getattr(decoder, "layers", None)
        if layers is None or getattr(decoder.config, "attention_dropout", 0.0) or any(p.requires_grad
                for p in decoder.get_input_embeddings().parameters()):
            return 0
        trainable = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
        return trainable[0] if trainable else 0


class _SkippedLayer(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output the trunk already holds: passes its input on."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _trunk_pass(decoder: torch.nn.Module, trunk: FrozenTrunk | None, mb: MicroBatch):
    """Inside: the decoder's passes over `mb` record the states entering `trunk.layer` (some row not
    recorded yet) or start there from the recorded ones (every row recorded). Yields nothing."""
    if trunk is None:
        yield
        return
    layers = decoder.layers
    replay = all(i in trunk.states for i in mb.indices)
    lengths = mb.attention_mask.sum(dim=1).tolist()
    seen: list[torch.Tensor] = []
    if replay:  # the states each decoder call of `forward_micro_batch` starts from: the shared part, then the rows
        rows = [trunk.states[i] for i in mb.indices]
        queue = [rows[0][None, : mb.shared]] if mb.shared else []
        rest = rows[0].new_zeros((len(rows), mb.input_ids.shape[1] - mb.shared, rows[0].shape[-1]))
        for b, (row, n) in enumerate(zip(rows, lengths)):
            rest[b, : n - mb.shared] = row[mb.shared : n]
        queue.append(rest)

    def hook(module, args, kwargs):
        if not replay:
            seen.append((args[0] if args else kwargs["hidden_states"]).detach())
            return None
        states = queue.pop(0)
        return ((states, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": states})

    handle = layers[trunk.layer].register_forward_pre_hook(hook, with_kwargs=True)
    frozen = [layers[i] for i in range(trunk.layer)]
    if replay:
        for i, layer in enumerate(frozen):
            layers[i] = _SkippedLayer(layer)
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(frozen):
            layers[i] = layer
    if not replay:
        rest = seen[-1]
        for b, (i, n) in enumerate(zip(mb.indices, lengths)):
            trunk.states[i] = torch.cat([seen[0][0], rest[b, : n - mb.shared]]) if mb.shared else rest[b, :n].clone()


def forward_micro_batch(
    model: torch.nn.Module,
    mb: MicroBatch,
    with_entropy: bool = False,
    value_head: torch.nn.Module | None = None,
    autocast_bf16: bool = False,
    trunk: FrozenTrunk | None = None,
) -> dict[str, torch.Tensor]:
    """Log-probs [B, T] of the response tokens (and entropies [B, T], values [B] at the last prompt
    token) from one forward pass. `trunk`: record the rows' states below its layer, or, when it holds
    every row's, start the pass there."""
    decoder, head = decoder_and_head(model)
    inputs = {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}
    vision = is_vision_language(model)
    if vision:  # the engine's prefill inputs: its positions (M-RoPE with images) and the pixel inputs
        pixels = {k: v.to(mb.input_ids.device) for k, v in mb.pixel_inputs.items()} if mb.pixel_inputs else None
        inputs["position_ids"] = position_ids(model, mb.input_ids, mb.attention_mask, pixels)
        inputs.update(pixels or {})
    B, T = mb.response_ids.shape
    with torch.autocast(mb.input_ids.device.type, dtype=torch.bfloat16,
                        enabled=autocast_bf16), _trunk_pass(decoder, trunk, mb):
        if mb.shared:  # the shared beginning once, then every row's rest on top of its K/V
            from transformers import DynamicCache

            cache = DynamicCache(config=decoder.config)
            decoder(input_ids=mb.input_ids[:1, : mb.shared], past_key_values=cache, use_cache=True)
            filled = next(layer for layer in cache.layers if layer.keys is not None)
            for layer in cache.layers:
                # skipped by the trunk: zeros nothing reads, so every layer reports the shared length
                if layer.keys is None:
                    layer.update(torch.zeros_like(filled.keys), torch.zeros_like(filled.values))
                layer.keys, layer.values = layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1)
            inputs["input_ids"] = mb.input_ids[:, mb.shared :]
            inputs["past_key_values"], inputs["use_cache"] = cache, True
        hidden = decoder(**inputs).last_hidden_state  # [B, L - shared, H]
    # hidden state at position p predicts token p + 1: response token t sits at prompt_len + t;
    # hidden[:, j] is position shared + j
    prompt_lens = mb.prompt_lens.to(hidden.device) - mb.shared
    pos = (prompt_lens.unsqueeze(1) - 1
           + torch.arange(T, device=hidden.device).unsqueeze(0)).clamp(max=hidden.shape[1] - 1)
    h = hidden.gather(1, pos.unsqueeze(-1).expand(B, T, hidden.shape[-1]))
    logits = head(h).float()
    if vision:  # image placeholders have probability 0, as in the engine
        logits = logits.index_fill(-1, torch.tensor(placeholder_token_ids(model), device=logits.device), float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    out = {"logp": logp_all.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1) * mb.response_mask}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits) * mb.response_mask
    if value_head is not None:
        last_prompt = hidden[torch.arange(B, device=hidden.device), prompt_lens - 1].float()
        out["values"] = value_head(last_prompt).squeeze(-1)
    return out
