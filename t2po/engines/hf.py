"""Generation with a Hugging Face transformers model: our own batched decoding loop over a KV cache.

Why not `model.generate`: the loop here gives every guarantee the rollout needs in one place:
- per-row state: the thinking intervention (spec §2) decides per row; EOS and stop strings end a row;
- finished rows leave the batch (their KV cache rows are dropped), so they stop consuming compute;
- log-probs and M_t (spec §1) come from the very logits each token is drawn from (no second pass).

Decoding: prompts are left-padded into one batch, prefilled once, then decoded one token per step.
Per step and row: `logp = log_softmax(z)` of the raw logits z; M_t from `logp`; the token is sampled
from softmax(z / temperature) after top-k then top-p filtering (temperature 0 = greedy argmax); a
token forced by the intervention replaces the sampled one (equivalent to setting every other logit
to -inf); the returned log-prob is `logp[token]`, i.e. under the raw logits, temperature not applied
(the trainer recomputes log-probs from the same raw logits). Token ids are returned exactly as
emitted, EOS included; `text` is decoded without special tokens and, when a stop string ended the
row, cut right after it (the ids keep the whole last token).

Vision-language models (`t2po.vlm`): a prompt may come with pixel inputs (`pixel_inputs`, one dict
or None per prompt, from `t2po.vlm.build_image_prompt`); they go into the prefill only. Qwen2-VL-class
models get their multimodal RoPE positions for the prefill from the model's own `get_rope_index`
(padding-aware), and each generated token continues at the row's largest position + 1, passed
explicitly, so the model's cached `rope_deltas` never matter. Image placeholder tokens get logit
-inf (a response never contains one; the trainer does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from t2po.algos.intervention import ThinkingIntervention, vocabulary_text
from t2po.algos.uncertainty import turn_score, uncertainty_from_logprobs
from t2po.engines.base import Engine, Generation, InterventionConfig, SamplingParams, check_request, make_intervention


class HFEngine(Engine):
    """Batched sampling from a transformers causal LM (`model`, `tokenizer` from `t2po.models`).

    `monitor_uncertainty=False` switches M_t off entirely (no M_t, no intervention, NaN
    `uncertainty` and `turn_score`); it exists to measure what monitoring costs.
    The engine shares `model` with the trainer: it samples from the module's current weights."""

    def __init__(self, model, tokenizer, monitor_uncertainty: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.monitor_uncertainty = monitor_uncertainty
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self._token_text: list[str] | None = None  # decoded vocabulary for tag matching, built on first use

    def sync_weights(self, model) -> None:
        self.model = model

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        intervention: InterventionConfig | None = None,
        pixel_inputs: list[dict | None] | None = None,
    ) -> list[Generation]:
        """Sample one response per prompt (token ids). `intervention=None` behaves like
        `InterventionConfig(enabled=False)`: nothing is forced, M_t, turn scores and think lengths
        are still recorded. `pixel_inputs`: per prompt, the pixel inputs of its image (None: none)."""
        check_request(prompts, sampling)
        if pixel_inputs is not None:
            from t2po.vlm import NEEDS_VLM, is_vision_language

            if len(pixel_inputs) != len(prompts):
                raise ValueError(f"pixel_inputs has {len(pixel_inputs)} entries for {len(prompts)} prompts; give one (or None) per prompt")
            if any(p is not None for p in pixel_inputs) and not is_vision_language(self.model):
                raise ValueError(NEEDS_VLM)
        config = intervention if intervention is not None else InterventionConfig(enabled=False)
        if not self.monitor_uncertainty and config.enabled:
            raise ValueError("the thinking intervention needs M_t: build the engine with monitor_uncertainty=True")
        if not prompts:
            return []
        tti = self._intervention(config) if self.monitor_uncertainty else None
        if tti is not None:
            tti.start(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                token_ids, logprobs, finish = self._decode(prompts, sampling, tti, config, pixel_inputs)
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
                triggers, think_length, score = {"budget": 0, "stagnation": 0}, 0, math.nan
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
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        from transformers import DynamicCache

        from t2po import vlm

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        next_position = position_ids[:, -1:] + 1
        pixels = vlm.collate_pixel_inputs(pixel_inputs or [], device)
        suppressed = vlm.placeholder_token_ids(self.model) if vlm.is_vision_language(self.model) else []
        if pixels is not None:
            position_ids = vlm.position_ids(self.model, input_ids, attention_mask, pixels)  # [3, B, L] for M-RoPE
            next_position = position_ids.reshape(-1, *input_ids.shape).amax(dim=(0, 2))[:, None] + 1
        generator = None  # None: torch's global RNG, so an unseeded call follows torch.manual_seed
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        stop_window = 4 * max((len(s) for s in sampling.stop), default=0) + 2  # tokens that can hold a stop string

        token_ids: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        active = list(range(len(prompts)))  # prompt row of each batch position
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **(pixels or {}),
        )
        while True:
            logits = out.logits[:, -1, :].float()
            if suppressed:
                logits[:, suppressed] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            chosen = _sample(logits, sampling, generator)
            if tti is not None:
                m = uncertainty_from_logprobs(logp, config.alpha, config.confidence).tolist()
                forced = [(i, t) for i, row in enumerate(active) if (t := tti.observe(row, m[i])) is not None]
                if forced:
                    positions, tokens = zip(*forced)
                    chosen[list(positions)] = torch.tensor(tokens, device=chosen.device)
            chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1)
            for i, (token, token_logp) in enumerate(zip(chosen.tolist(), chosen_logp.tolist())):
                row = active[i]
                token_ids[row].append(token)
                logprobs[row].append(token_logp)
                if tti is not None:
                    tti.advance(row, token)
                if token in self.eos_token_ids:
                    finish[row] = "stop"
                elif sampling.stop and self._hits_stop(token_ids[row], sampling.stop, stop_window):
                    finish[row] = "stop"
                elif len(token_ids[row]) >= sampling.max_new_tokens:
                    finish[row] = "length"
            keep = [i for i, row in enumerate(active) if finish[row] is None]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch and its KV cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, next_position, chosen = attention_mask[index], next_position[index], chosen[index]
                active = [active[i] for i in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            next_position = next_position + 1
        return token_ids, logprobs, finish

    def _intervention(self, config: InterventionConfig) -> ThinkingIntervention:
        if self._token_text is None:
            self._token_text = vocabulary_text(self.tokenizer)
        return make_intervention(config, self.tokenizer, self._token_text)

    def _hits_stop(self, ids: list[int], stop: Sequence[str], window: int) -> bool:
        # A row stops at the first occurrence, so any occurrence in the recent window is a new one.
        text = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in text for s in stop)

    def _response_text(self, ids: list[int], stop: Sequence[str]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stop if s in text]
        return text[: min(ends)] if ends else text


def _sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row: greedy for temperature 0, else temperature -> top-k -> top-p -> sample."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
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
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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
