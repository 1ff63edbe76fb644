"""Generation with a Hugging Face transformers model: our own batched decoding loop over a KV cache.

Why not `model.generate`: the loop here gives every guarantee the rollout needs in one place:
- per-row state: the thinking intervention (docs/method.md §2) decides per row; EOS and stop strings end a row;
- finished rows leave the batch (their KV cache rows are dropped), so they stop consuming compute;
- log-probs and M_t (docs/method.md §1) come from the very logits each token is drawn from (no second pass).

Decoding: every distinct prompt is prefilled once (rows with the same prompt, e.g. the group members
of a task at turn 0, share it; the beginning all prompts of a call share, e.g. the system turn and
the task's instructions, is prefilled once for all of them; a prompt the previous call prefilled with the same weights,
e.g. a TDS regeneration, is not prefilled again: `_prefill`), the rows' K/V are assembled left-padded into one
preallocated cache, then the batch decodes one token per step. Per step and row: `logp =
log_softmax(z)` of the raw logits z; M_t from `logp`; the token is sampled from softmax(z /
temperature) after top-k then top-p filtering (`sample_tokens`; temperature 0 = greedy argmax); a
token forced by the intervention replaces the sampled one (equivalent to setting every other logit
to -inf); the returned log-prob is `logp[token]`, i.e. under the raw logits, temperature not applied
(the trainer recomputes log-probs from the same raw logits). Token ids are returned exactly as
emitted, EOS included; `text` is decoded without special tokens and, when a stop string ended the
row, cut right after it (the ids keep the whole last token).

Precision: the engine computes in the model's dtype (`model.dtype`; the CPU presets use bfloat16 on
AVX512-BF16/AMX CPUs) and takes log-probs and M_t from the float32 upcast of the logits. A bf16
model's decode-step log-probs differ from the trainer's bf16 forward of the same tokens (mean |delta|
0.045, 0.5-0.9% of tokens with a ratio outside [0.8, 1.2]; float32: 3e-6 and 0%, benchmarks/bench_update.py),
which is why bf16 presets recompute the old log-probs (`optim.recompute_logprobs`).

Vision-language models (`t2po.vlm`): a prompt may come with pixel inputs (`pixel_inputs`, one dict
or None per prompt, from `t2po.vlm.build_image_prompt`); they go into the prefill only. Qwen2-VL-class
models get their multimodal RoPE positions for the prefill from the model's own `get_rope_index`
(padding-aware), and each generated token continues at the row's largest position + 1, passed
explicitly, so the model's cached `rope_deltas` never matter. Image placeholder tokens get logit
-inf (a response never contains one; the trainer does the same).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicLayer, LogitsProcessor

from t2po.algos.intervention import TRIGGER_KINDS, ThinkingIntervention, vocabulary_text
from t2po.algos.uncertainty import turn_score, uncertainty_from_logprobs
from t2po.engines.base import (Engine, Generation, InterventionConfig, SamplingParams, check_request, make_intervention,
                               shared_prefix_length)
from t2po.progress import activity


class HFEngine(Engine):
    """Batched sampling from a transformers causal LM (`model`, `tokenizer` from `t2po.models`).

    `monitor_uncertainty=False` switches M_t off entirely (no M_t, no intervention, NaN
    `uncertainty` and `turn_score`); it exists to measure what monitoring costs.
    The engine shares `model` with the trainer: it samples from the module's current weights."""

    shares_policy_weights = True
    reads_images = True

    def __init__(self, model, tokenizer, monitor_uncertainty: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.monitor_uncertainty = monitor_uncertainty
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self._prefix_store: dict[tuple, _Prefix] = {}  # the previous call's prefilled prompts (`_prefill`)
        self._prefix_stamp: tuple | None = None  # the weights they were computed with

    def sync_weights(self, model) -> None:
        self.model = model

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        intervention: InterventionConfig | None = None,
        pixel_inputs: list[dict | None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
        top_logprobs: int = 0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Sample one response per prompt (token ids). `intervention=None` behaves like
        `InterventionConfig(enabled=False)`: nothing is forced, M_t, turn scores and think lengths
        are still recorded. `pixel_inputs`: per prompt, the pixel inputs of its image (None: none).
        `should_stop(row)`, asked once per decode step for each unfinished row, ends that row with
        finish reason "cancelled" when it answers True (`t2po serve`: the client hung up).
        `top_logprobs=k` records the k likeliest tokens and their log-probs at each step (`t2po serve`'s
        logprobs); `on_token(row, token_id)` is called as each token is chosen (streaming)."""
        check_request(prompts, sampling)
        if pixel_inputs is not None:
            from t2po.vlm import NEEDS_VLM, is_vision_language

            if len(pixel_inputs) != len(prompts):
                raise ValueError(f"pixel_inputs has {len(pixel_inputs)} entries for {len(prompts)} prompts; give one "
                                 "(or None) per prompt")
            if any(p is not None for p in pixel_inputs) and not is_vision_language(self.model):
                raise ValueError(NEEDS_VLM)
        config = intervention if intervention is not None else InterventionConfig(enabled=False)
        if not self.monitor_uncertainty and config.enabled:
            raise ValueError("the thinking intervention needs M_t: build the engine with monitor_uncertainty=True")
        if not prompts:
            return []
        tti = self._intervention(config, sampling.seed) if self.monitor_uncertainty else None
        if tti is not None:
            tti.start(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                token_ids, logprobs, finish, cached, top = self._decode(prompts, sampling, tti, config,
                                                                        pixel_inputs, should_stop,
                                                                       top_logprobs, on_token)
        finally:
            self.model.train(was_training)

        generations = []
        for row, prompt in enumerate(prompts):
            ids = token_ids[row]
            if tti is not None:
                trace = tti.rows[row]
                uncertainty, forced = list(trace.uncertainty), list(trace.forced)
                triggers, think_length = dict(trace.triggers), trace.think_length
                score = turn_score(uncertainty, skip=config.turn_score_skip)
            else:
                uncertainty, forced = [math.nan] * len(ids), [False] * len(ids)
                triggers, think_length, score = dict.fromkeys(TRIGGER_KINDS, 0), 0, math.nan
            generations.append(
                Generation(
                    token_ids=ids,
                    logprobs=logprobs[row],
                    uncertainty=uncertainty,
                    forced=forced,
                    text=self._response_text(ids, sampling.stop if finish[row] == "stop" else []),
                    finish_reason=finish[row],
                    turn_score=score,
                    tti_triggers=triggers,
                    think_length=think_length,
                    prompt_tokens=len(prompt),
                    cached_prompt_tokens=cached[row],
                    top_logprobs=top[row],
                )
            )
        return generations

    def _decode(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        tti: ThinkingIntervention | None,
        config: InterventionConfig,
        pixel_inputs: list[dict | None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
        top_logprobs: int = 0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[str], list[int], list[list[list[tuple[int, float]]]]]:
        from t2po import vlm

        device = next(self.model.parameters()).device
        generator = None  # None: torch's global RNG, so an unseeded call follows torch.manual_seed
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        stop_window = 4 * max((len(s) for s in sampling.stop), default=0) + 2  # tokens that can hold a stop string
        suppressed = vlm.placeholder_token_ids(self.model) if vlm.is_vision_language(self.model) else []
        # softmax(z / T) = exp(log_softmax(z))
        plain = sampling.temperature == 1 and sampling.top_k == 0 and sampling.top_p >= 1.0

        token_ids: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        top: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        active = list(range(len(prompts)))  # prompt row of each batch position
        cache, attention_mask, next_position, logits, cached = self._prefill(prompts, pixel_inputs
                or [None] * len(prompts), device, sampling.max_new_tokens)
        while True:
            logits = logits.float()
            if suppressed:
                logits[:, suppressed] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            # at temperature 1 without top-k / top-p the sampler's distribution is exp(logp): one pass over the
            # vocabulary serves the sampler and M_t's entropy (M_t is defined on the unscaled logits, docs/method.md §1)
            probs = logp.exp() if plain else None
            chosen = sample_tokens(logits, sampling, generator, probs)
            if tti is not None:
                shared = None if suppressed else probs  # masked entries (-inf) need the clamped entropy
                m = uncertainty_from_logprobs(logp, config.alpha, config.confidence, shared).tolist()
                forced = [(i, t) for i, row in enumerate(active) if (t := tti.observe(row, m[i])) is not None]
                if forced:
                    positions, tokens = zip(*forced)
                    chosen[list(positions)] = torch.tensor(tokens, device=chosen.device)
            chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1)
            if top_logprobs:
                best = logp.topk(top_logprobs, dim=-1)
                for i, (values, ids) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                    top[active[i]].append(list(zip(ids, values)))
            for i, (token, token_logp) in enumerate(zip(chosen.tolist(), chosen_logp.tolist())):
                row = active[i]
                token_ids[row].append(token)
                logprobs[row].append(token_logp)
                if on_token is not None:
                    on_token(row, token)
                if tti is not None:
                    tti.advance(row, token)
                if token in self.eos_token_ids:
                    finish[row] = "stop"
                elif sampling.stop and self._hits_stop(token_ids[row], sampling.stop, stop_window):
                    finish[row] = "stop"
                elif len(token_ids[row]) >= sampling.max_new_tokens:
                    finish[row] = "length"
            if should_stop is not None:  # the caller gave up on these rows
                for row in active:
                    if finish[row] is None and should_stop(row):
                        finish[row] = "cancelled"
            keep = [i for i, row in enumerate(active) if finish[row] is None]
            if not keep:
                break
            activity(f"generating token {len(token_ids[active[keep[0]]]) + 1}/{sampling.max_new_tokens}, "
                     f"{len(keep)}/{len(prompts)} rows")
            if len(keep) < len(active):  # finished rows leave the batch and its KV cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, next_position, chosen = attention_mask[index], next_position[index], chosen[index]
                active = [active[i] for i in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            logits = self.model(
                input_ids=chosen[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
            next_position = next_position + 1
        return token_ids, logprobs, finish, cached, top

    def _prefill(self, prompts: list[list[int]], pixel_inputs: list[dict | None], device: torch.device,
                 new_tokens: int):
        """The batch's KV cache after its prompts, prefilling only the prompts not yet in the prefix
        store (each distinct prompt once, their shared beginning once: `_prefill_forward`). Returns (cache, attention
        mask, next position per row, logits of the next token [B, V], prompt tokens per row served without a forward
        pass); the cache has room for `new_tokens` more positions.

        The store keeps the prefilled K/V of the previous call's distinct prompts (unpadded, with the
        next-token logits and next position), so a TDS regeneration of the same turn (docs/method.md §3)
        prefills nothing; it is dropped as soon as the weights change (any in-place update of a
        parameter bumps its version counter) and holds nothing a call did not use. A prompt's K/V do
        not depend on the padding it was prefilled with (its positions start at 0 at its first token),
        so rows can be re-assembled with any left padding."""
        from transformers import Cache

        keys = [_prompt_key(p, x) for p, x in zip(prompts, pixel_inputs)]
        stamp = _weights_stamp(self.model)
        store = self._prefix_store if stamp == self._prefix_stamp else {}
        missing = list(dict.fromkeys(k for k in keys if k not in store))
        first = {k: keys.index(k) for k in missing}
        shared = 0
        if missing:
            rows = [first[k] for k in missing]
            entries, shared = self._prefill_forward([prompts[r] for r in rows], [pixel_inputs[r] for r in rows], device)
            store.update(zip(missing, entries))
        # served without a forward pass: a stored or repeated prompt whole, the shared beginning for
        # every newly prefilled prompt but the first
        prefilled = {row: (0 if i == 0 else shared) for i, row in enumerate(first.values())}
        cached = [prefilled.get(row, len(p)) for row, p in enumerate(prompts)]
        self._prefix_store, self._prefix_stamp = {k: store[k] for k in dict.fromkeys(keys)}, stamp

        entries = [store[k] for k in keys]
        width = max(len(p) for p in prompts)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            attention_mask[row, width - len(prompt) :] = 1
        cache = Cache(layers=[_PreallocatedLayer(width + new_tokens) for _ in entries[0].keys])
        for layer in range(len(entries[0].keys)):
            k0, v0 = entries[0].keys[layer], entries[0].values[layer]
            k = k0.new_zeros((len(prompts), k0.shape[0], width, k0.shape[-1]))
            v = v0.new_zeros((len(prompts), v0.shape[0], width, v0.shape[-1]))
            for row, entry in enumerate(entries):
                k[row, :, width - entry.length :] = entry.keys[layer]
                v[row, :, width - entry.length :] = entry.values[layer]
            cache.update(k, v, layer)
        logits = torch.stack([e.logits for e in entries])
        next_position = torch.stack([e.next_position for e in entries])[:, None]
        return cache, attention_mask, next_position, logits, cached

    def _prefill_forward(self, prompts: list[list[int]], pixel_inputs: list[dict | None],
                         device: torch.device) -> tuple[list[_Prefix], int]:
        """Each prompt's K/V without padding, the next-token logits and position, from one forward pass
        over the batch. Text prompts that begin alike (the chat template's system turn and the task's
        instructions: 83 of the main job's ~150 prompt tokens) have that shared beginning prefilled
        once (`shared_prefix_length`), then the rest of every row continues from its K/V; returns the
        number of prompt tokens so served to every row but the first."""
        from transformers import DynamicCache

        from t2po import vlm

        pixels = vlm.collate_pixel_inputs(pixel_inputs if any(x is not None for x in pixel_inputs) else [], device)
        shared = shared_prefix_length(prompts) if pixels is None else 0
        cache = DynamicCache(config=self.model.config)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("the transformers engine needs a model whose KV cache is a plain DynamicCache (no "
                             "sliding-window layers)")
        if shared:
            self.model(input_ids=torch.tensor([prompts[0][:shared]], device=device),
                       past_key_values=cache, use_cache=True,
                       logits_to_keep=_last_position(shared, device))
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.expand(len(prompts), -1, -1,
                                                             -1), layer.values.expand(len(prompts), -1, -1, -1)
        # the rest of each row, left-padded after the shared part: [shared | padding | rest of the prompt]
        rests = [p[shared:] for p in prompts]
        width = max(len(r) for r in rests)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for row, rest in enumerate(rests):
            input_ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            attention_mask[row, shared + width - len(rest) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, shared:]
        next_position = position_ids[:, -1] + 1
        if pixels is not None:
            position_ids = vlm.position_ids(self.model, input_ids, attention_mask, pixels)  # [3, B, L] for M-RoPE
            next_position = position_ids.reshape(-1, *input_ids.shape).amax(dim=(0, 2)) + 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=_last_position(width, device),
            **(pixels or {}),
        )
        logits = out.logits[:, -1, :]
        keep = [attention_mask[row].nonzero().squeeze(1) for row in range(len(prompts))]
        return [
            _Prefix(
                keys=[layer.keys[row][:, keep[row]] for layer in cache.layers],
                values=[layer.values[row][:, keep[row]] for layer in cache.layers],
                logits=logits[row],
                next_position=next_position[row],
                length=len(prompt),
            )
            for row, prompt in enumerate(prompts)
        ], shared

    def _intervention(self, config: InterventionConfig, seed: int | None) -> ThinkingIntervention:
        # the vocabulary is decoded once per tokenizer (vocabulary_text caches it)
        return make_intervention(config, self.tokenizer, vocabulary_text(self.tokenizer), seed)

    def _hits_stop(self, ids: list[int], stop: Sequence[str], window: int) -> bool:
        # A row stops at the first occurrence, so any occurrence in the recent window is a new one.
        text = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in text for s in stop)

    def _response_text(self, ids: list[int], stop: Sequence[str]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stop if s in text]
        return text[: min(ends)] if ends else text


def _last_position(length: int, device: torch.device) -> torch.Tensor:
    """`logits_to_keep` for the last of `length` positions, as an index tensor rather than the int 1.

    With the int, transformers takes the view `hidden[:, -1:, :]`, and the LM head's matmul of that
    strided [B, 1, H] view does not fold into one matrix product: torch expands the [V, H] head
    weight to [B, H, V] and copies it (32 rows x 49k x 576 in bf16: 1.8 GB, ~2-3 s on 2 cores, more
    than the rest of a batch-32 prefill). An index tensor gathers a contiguous [B, 1, H] instead, and
    the head is one [B, H] x [H, V] product (transformers documents both forms)."""
    return torch.tensor([length - 1], device=device)


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None,
                  probs: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` [B, V]: greedy for temperature 0, else temperature -> top-k ->
    top-p -> one draw from the remaining distribution.

    The draw inverts the CDF: one uniform u per row, the first token whose cumulative probability
    exceeds u * total. That is an exact sample of the filtered distribution with one random number
    per row, where `torch.multinomial` draws an exponential for every vocabulary entry (27 ms per step
    at batch 32 with a 49k vocabulary, against 1.5 ms). Top-k keeps the tokens scoring at least the
    k-th score (ties included, as transformers' `TopKLogitsWarper`); top-p keeps the smallest prefix of
    the tokens sorted by probability whose mass reaches top_p (the top token always stays). The
    uniforms come from `generator` (None: torch's global RNG). `probs`: softmax(logits), when the caller has
    it and the sampling is plain (temperature 1, no top-k / top-p): the CDF is then taken from it."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    if probs is not None and sampling.temperature == 1 and sampling.top_k == 0 and sampling.top_p >= 1.0:
        return _draw(probs.cumsum(dim=-1), generator)
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top token stays).
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        kept = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(1, order, kept)
    return _draw(torch.softmax(scores, dim=-1).cumsum(dim=-1), generator)


def _draw(cdf: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One inverse-CDF draw per row of the cumulative (unnormalised) probabilities `cdf` [B, V]."""
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    # u < total strictly, so the token found has positive probability even after rounding
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


class _PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose K/V sit at the front of buffers with room for `capacity` positions: a
    decode step writes its position in place, where `DynamicLayer` re-allocates the layer's whole
    cache (`torch.cat`) at every step. `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
            self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


@dataclass
class _Prefix:
    """A prefilled prompt: per layer its K and V [kv_heads, length, head_dim] (no padding), the
    next-token logits [V] and the position its first generated token takes."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    next_position: torch.Tensor
    length: int


def _prompt_key(prompt: list[int], pixels: dict | None) -> tuple:
    """What a prompt's prefill depends on: its token ids and, with an image, the pixel inputs' bytes."""
    if pixels is None:
        return tuple(prompt)
    digest = hashlib.sha1()
    for name in sorted(pixels):
        value = pixels[name]
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}{value!r}".encode())
    return (tuple(prompt), digest.hexdigest())


def _weights_stamp(model: torch.nn.Module) -> tuple:
    # every in-place update of a parameter (optimizer step, load_state_dict) bumps its version counter;
    # a moved or re-cast parameter gets new storage
    return tuple((p.data_ptr(), p.dtype, p._version) for p in model.parameters())


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else (value or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model and tokenizer define no eos token; set tokenizer.eos_token")
    return ids


class TTILogitsProcessor(LogitsProcessor):
    """The thinking intervention (docs/method.md §2) for plain transformers `generate`, outside t2po:

        tti = TTILogitsProcessor(tokenizer, InterventionConfig(budget=450))
        model.generate(ids, logits_processor=LogitsProcessorList([tti]), do_sample=True, temperature=0.7, top_k=0)

    It applies `ThinkingIntervention` to the logits as `HFEngine` does: M_t from the raw logits of
    each step, and when the rule fires every logit but the end-tag token set to -inf, so that the
    token chosen is the one t2po forces (tests/commands/test_export.py checks them token by token).
    transformers runs custom processors after its own (repetition penalty and the like, none by
    default) and before temperature, top-k and top-p, so the processor sees the logits t2po's engine
    sees. One instance per `generate` call (it keeps each row's state; only the end of a prompt
    matters, so left padding does not). `rows[i].forced` marks what it forced in row i.
    """

    def __init__(self, tokenizer, config: InterventionConfig | None = None) -> None:
        self.config = config if config is not None else InterventionConfig()
        self.tti = make_intervention(self.config, tokenizer, vocabulary_text(tokenizer))
        self.started = False

    @property
    def rows(self):
        return self.tti.rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.started:
            self.tti.start(input_ids.tolist())
            self.started = True
        else:  # the token each row chose at the previous step
            for row, token in enumerate(input_ids[:, -1].tolist()):
                self.tti.advance(row, token)
        m = uncertainty_from_logprobs(torch.log_softmax(scores.float(), dim=-1), self.config.alpha,
                                      self.config.confidence).tolist()
        for row, m_t in enumerate(m):
            forced = self.tti.observe(row, m_t)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores

