"""The RL trainer: rollouts -> advantages -> PPO-clip update, with checkpoints and resume.

One iteration (docs/method.md §4):
  1. collect B x N episodes with the current policy (TTI inside decoding, TDS between turns for t2po);
  2. recompute old log-probs (and reference log-probs when the KL loss is on; critic values for ppo),
     recording what the layers below LoRA output for step 4 (`t2po.forward.FrozenTrunk`);
  3. advantages: GiGPO (t2po, gigpo), GRPO, RLOO, or turn-level GAE with a critic (ppo);
  4. one PPO-clip pass over the batch in mini-batches (dual clip, token-mean), gradient clipping,
     learning-rate warm-up, optional entropy bonus and KL loss.
Launched by torchrun with several processes, every rank plays its share of the tasks and the
policy is FSDP2-sharded (t2po/distributed.py, docs/scaling.md). Rollouts run on the transformers
engine, which shares the policy module, or on vLLM (`rollout.engine=vllm`), which gets the weights
after every update; everything trains on the rank's GPU when there is one. It deliberately leaves out
asynchronous rollouts and sequence packing across samples (samples are grouped by length instead;
the beginning all rows of a micro-batch share, e.g. the system turn, runs once: `t2po.forward`).

A recipe in the torchtune sense: `Trainer(cfg).setup()`, `.train()`, `.cleanup()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from t2po import references
from t2po.algos import StepBatch
from t2po.algos.losses import LossBatch, get_loss, loss_token_counts
from t2po.algos.sampling import TDSResampler
from t2po.checkpoints import Checkpointer, atomic_dir, atomic_write_text
from t2po.config import Config
from t2po.distributed import (
    barrier, clip_grad_norm, from_rank0, gather_objects, gathered, init_distributed, mean_over_ranks, padded,
    plan_mini_batches, shard_model, shard_tasks, sum_over_ranks,
)
from t2po.engines import engine_class, engine_spec
from t2po.envs import make_env
from t2po.errors import InvalidInput
from t2po.forward import FrozenTrunk, forward_micro_batch, make_micro_batch, pack_by_length
from t2po.policies import EnginePolicy
from t2po.progress import ConsoleLog, PhaseTimer, Progress, silence_library_progress
from t2po.rollout import COUNTERS, RolloutResult, RolloutSettings, StepSample, collect_rollouts, rollout_stats
from t2po.runlog import RunLog
from t2po.testing import kill_point
from t2po.tracking import validation_step
from t2po.trainer.batch import TrainingBatch


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False, quiet: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.quiet = quiet
        if run_dir is None:
            run_dir = new_run_dir(cfg)
        elif not resume:
            refuse_existing_run(Path(run_dir))
        self.run_dir = Path(run_dir)
        # TTI/TDS on or off and the validation budget, as this run plays them
        self.rollout_config = cfg.resolved_rollout()
        self.start_iteration = 0
        self.history: dict[str, Any] = {}
        self.trunk: FrozenTrunk | None = None  # set by _score_samples for the update that follows
        self.engine_model_dir: Path | None = None  # the model folder of an engine with its own copy of the weights
        self.loss_fn = get_loss(cfg.algo.loss)  # (LossBatch, cfg.algo) -> (loss, metrics), t2po.algos.losses
        self.timer = PhaseTimer()  # time/<phase> of each iteration (t2po.progress)
        self.iteration_seconds: list[float] = []  # this session's iterations, the rate of the ETA

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Build everything. What can fail on the user's input (model path, environment options and
        data, device) is built before the run folder exists; if a later step fails, a run folder
        this call created is removed again: a run that never started leaves nothing behind."""
        from t2po.models import load_model, resolve_dtype

        cfg = self.cfg
        silence_library_progress()  # before the first model load: the run's own progress lines only
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)
        self.engine_spec = engine_spec(cfg.rollout.engine)
        engine_class(cfg.rollout.engine)  # imported now: a missing package (vLLM) is named before any file is written
        # one process unless launched by torchrun / accelerate launch
        self.dist = init_distributed(device=cfg.trainer.device)
        self.device = self.dist.device
        if self.dist.distributed:
            if cfg.algorithm.critic or cfg.warmup.episodes > 0:
                raise InvalidInput("multi-process training supports t2po, gigpo, grpo and rloo without warm-up; run "
                                   "ppo or the warm-up (t2po sft) in one process")
            self.run_dir = Path(from_rank0(str(self.run_dir)))
            self.quiet = self.quiet or not self.dist.is_main
        self.checkpointer = Checkpointer(self.run_dir, self.note)  # the layout of checkpoints/ and warmup_model/
        self.runlog = RunLog(self.run_dir, self.note, writer=self.dist.is_main)  # metrics, validations, run state
        state_path = self.runlog.state_path
        if (self.resume and not state_path.exists() and self.checkpointer.warmup_model.exists()
                and any(self.checkpointer.root.glob("iter_*"))):
            raise InvalidInput(f"{state_path} is missing (it says whether the warm-up the checkpoints apply to "
                               "finished); "
                             "restore it from a copy, or start a new run")
        if self.resume:
            self.runlog.load_state()

        base_path = cfg.model.path
        if self.run_state.get("warmup_done"):
            self.checkpointer.check_warmup()  # a damaged or missing warm-up is named here, not met in a model load
            base_path = str(self.checkpointer.warmup_model)
        self.model, self.tokenizer = load_model(base_path, dtype=resolve_dtype(cfg.model.dtype, self.device))
        self.base_model_path = base_path
        self.train_env = self._make_env(cfg.env.options)
        val_opts = {"split": "valid", **cfg.env.options, **cfg.env.val_options}
        if "split" in cfg.env.options and "split" not in cfg.env.val_options:
            val_opts["split"] = "valid"
        self.val_env = self._make_env(val_opts)
        created = not self.run_dir.exists()
        try:
            self._setup_run_folder()
        except BaseException:
            if created and not self.resume and self.dist.is_main:
                for part in ("trackers", "console"):
                    if getattr(self, part, None) is not None:
                        getattr(self, part).close()
                        setattr(self, part, None)
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        return self

    def _setup_run_folder(self) -> None:
        """The run folder, its config, the trainable policy, trackers, the resumed checkpoint, and the
        rollout engine."""
        from t2po.tracking import make_trackers

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # everything printed from here on is also in <run_dir>/train.log, the explanation of a run that died
        self.console = ConsoleLog(self.run_dir) if self.dist.is_main else None
        if not self.resume and self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.log(f"run folder: {self.run_dir}")
        self.log(self._setup_line())
        if not self.engine_spec.shares_policy_weights:  # exported from the base model, before LoRA wraps it
            self.engine_model_dir = self._engine_model_dir(self.base_model_path)
        self._wrap_trainable()
        self.trackers = make_trackers(cfg.trainer.trackers if self.dist.is_main else [], self.run_dir, cfg.to_dict(),
                                      quiet=self.quiet)
        # TDS for the training rollouts; its relative threshold's window of recent deltas is run state, kept
        # across iterations and checkpoints
        self.tds = TDSResampler(self.rollout_config.tds) if self.rollout_config.tds.enabled else None
        self.tds_threshold = self.tds.threshold if self.tds is not None else None
        if self.resume:
            ckpt = self._load_newest_loadable_checkpoint()
            self._forget_work_after(self.start_iteration)
            if ckpt is not None:
                self.log(f"resumed from {ckpt} (iteration {self.start_iteration})")
        self.engine = self._make_engine()
        # optim.recompute_logprobs null: the engine's log-probs are the trainer's when the engine decodes with the
        # model's own float32 weights (3e-6 apart, none outside the clip range; bf16 rounds differently:
        # docs/results/cpu_path.json), so the old-log-prob pass is only run where they are not
        chosen = cfg.optim.recompute_logprobs
        self.recompute_logprobs = chosen if chosen is not None else not (
            self.engine_spec.shares_policy_weights and not cfg.optim.bf16 and self.model.dtype == torch.float32)

    def _load_newest_loadable_checkpoint(self) -> Path | None:
        """Load the newest checkpoint that can be read whole (`Checkpointer.load_newest`: newer damaged ones
        are named in notes) and the run state it carries. None (start from iteration 0) when there is none."""
        loaded = self.checkpointer.load_newest(self.model, self.optimizer, self.value_head, self.cfg.model.lora,
                                               distributed=self.dist.distributed)
        if loaded is None:
            return None
        ckpt, state = loaded
        self.start_iteration = state["iteration"]
        if self.tds_threshold is not None and "tds_threshold" in state:
            self.tds_threshold.load_state_dict(state["tds_threshold"])
        self.scheduler_step = state.get("scheduler_step", self.start_iteration)
        self._set_lr()
        return ckpt

    def _make_engine(self):
        """The rollout engine (`rollout.engine`), built from its own settings (`Engine.build`): one that
        shares the policy module (transformers), or one with its own copy of the weights (vLLM,
        `rollout.vllm`), given the policy's weights now and after every update."""
        engine = engine_class(self.cfg.rollout.engine).build(
            self.model, self.tokenizer, self.cfg.rollout, model_dir=self.engine_model_dir,
            seed=self.cfg.trainer.seed + self.dist.rank, distributed=self.dist.distributed)
        if not self.engine_spec.shares_policy_weights:
            self._sync_engine(engine)
        return engine

    def _engine_model_dir(self, base_path: str | None) -> Path:
        """A Hugging Face model folder for an engine with its own copy of the weights to build the
        model from (its weights are replaced by the policy's at once): the base model's own folder, or
        one exported into the run folder when the base is the embedded GGUF model or a t2po run/checkpoint."""
        if (base_path is not None and (Path(base_path) / "config.json").is_file()
                and any(Path(base_path).glob("*.safetensors"))):
            return Path(base_path)
        out = self.run_dir / "vllm_model"
        if self.dist.is_main and not (out / "config.json").is_file():
            with atomic_dir(out) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        barrier()
        return out

    def _sync_engine(self, engine=None) -> None:
        """Let the rollout engine sample from the policy's current weights."""
        engine = engine or self.engine
        if self.engine_spec.shares_policy_weights:
            engine.sync_weights(self.model)
            return
        with gathered(self.model), torch.no_grad():  # full weights on every rank; LoRA merged in the copy sent
            engine.sync_weights(self.model)

    def _rollout_weights(self):
        """The context generation runs in: an engine sharing the policy module needs the full
        parameters of a sharded policy (`gathered`); one with its own copy does not."""
        return gathered(self.model) if self.engine_spec.shares_policy_weights else contextlib.nullcontext()

    def _make_env(self, options: dict):
        if self.cfg.env.ray_workers:
            from t2po.envs.ray_pool import RayEnvPool

            return RayEnvPool(self.cfg.env.name, options, num_workers=self.cfg.env.ray_workers)
        return make_env(self.cfg.env.name, **options)

    def _forget_work_after(self, iteration: int) -> None:
        """Forget what the iterations after `iteration`, lost in a kill, wrote (`RunLog.forget_after`: metrics
        lines and validations; `final` while iterations remain) and their tracker values: they are redone."""
        self.runlog.forget_after(iteration, final_kept=iteration >= self.cfg.trainer.iterations)
        if self.dist.is_main:
            # a warm-up not done is redone
            self.trackers.forget_after(iteration, warmup=not self.run_state.get("warmup_done"))

    def _wrap_trainable(self) -> None:
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.model.lora:
            from t2po.models import add_lora

            self.model = add_lora(self.model, cfg.model)
        self.ref_model = None
        if cfg.algo.kl_coef > 0 and not cfg.model.lora:
            from t2po.models import load_model

            self.ref_model, _ = load_model(self.base_model_path, dtype=self.model.dtype)
            self.ref_model.to(self.device).eval().requires_grad_(False)
        self.value_head = None
        if cfg.algorithm.critic:
            hidden = self.model.config.get_text_config().hidden_size  # a VLM's language model
            self.value_head = torch.nn.Linear(hidden, 1, device=self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        if self.dist.distributed:
            shard_model(self.model, mixed_precision=cfg.optim.bf16 and self.dist.device.type == "cuda")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler_step = 0
        self._set_lr()

    def _set_lr(self) -> None:
        warm = self.cfg.optim.warmup_ratio * max(self.cfg.trainer.iterations, 1)
        factor = min(1.0, (self.scheduler_step + 1) / warm) if warm > 0 else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * factor

    def _setup_line(self) -> str:
        """Where and on what the run computes: device, dtype and why, CPU threads, the model's source."""
        from t2po.models import dtype_reason, model_source

        cfg = self.cfg
        threads = (f"trainer.threads={cfg.trainer.threads}" if cfg.trainer.threads
                   else "torch's default; set trainer.threads")
        model = model_source(cfg.model.path)
        if self.base_model_path != cfg.model.path:
            model = f"this run's warm-up model {self.base_model_path}, trained from {model}"
        return (f"[setup] device {self.device}, {dtype_reason(cfg.model.dtype, self.device)}, "
                f"{_count(torch.get_num_threads(), 'CPU thread')} ({threads}); model: {model}")

    def _plan_line(self) -> str:
        """What this run will do, said before it starts (how much work is coming)."""
        cfg = self.cfg
        r = cfg.rollout
        turns = f"up to {r.max_turns} turns" if r.max_turns else "turns up to the environment's max_steps"
        todo = max(cfg.trainer.iterations - self.start_iteration, 0)
        parts = [f"[plan] {cfg.env.name} / {cfg.algo.name}: {_count(todo, 'RL iteration')} of "
                 f"{r.num_tasks * r.group_size} episodes ({r.num_tasks} tasks x {r.group_size}), {turns}, "
                 f"{r.sampling.max_new_tokens} new tokens per turn"]
        if cfg.warmup.episodes > 0 and not self.run_state.get("warmup_done"):
            parts.append(f"warm-up: {_count(cfg.warmup.episodes, 'expert episode')}, "
                         f"{_count(cfg.warmup.epochs, 'SFT epoch')}")
        vals = (["before"] if cfg.trainer.val_before_train else []) + (["after warm-up"]
                                                                       if cfg.warmup.episodes > 0 else [])
        vals += [f"every {cfg.trainer.val_every} iterations"] if cfg.trainer.val_every else []
        parts.append(f"validation: {r.val_num_tasks} held-out tasks ({', '.join(vals + ['at the end'])})")
        return "; ".join(parts)

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def note(self, msg: str) -> None:
        """Something the user should know even with --quiet (a skipped checkpoint, a dropped log line)."""
        if getattr(self, "dist", None) is None or self.dist.is_main:
            print(f"t2po train: {msg}", file=sys.stderr, flush=True)

    def _global_stats(self, result: RolloutResult) -> dict[str, float]:
        """Rollout statistics over every rank's episodes: the numbers one process playing all the
        tasks would report (rates over all episodes/steps, counts summed)."""
        if not self.dist.distributed:
            return dict(result.stats)
        # what the statistics read of each episode (`Episode.stats`), not the samples' token ids, texts, images
        everyone = gather_objects(([ep.stats() for ep in result.episodes],
                                   {k: result.stats[k] for k in COUNTERS if k in result.stats}))
        counters = {k: sum(c[k] for _, c in everyone if k in c) for k in COUNTERS if any(k in c for _, c in everyone)}
        return rollout_stats([ep for episodes, _ in everyone for ep in episodes], counters)

    def _play_settings(self, group_size: int) -> RolloutSettings:
        r = self.cfg.rollout
        return RolloutSettings(group_size, r.max_turns, r.invalid_action_penalty, r.max_prompt_tokens)

    def task_seeds(self, iteration: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.trainer.seed, iteration])
        return [int(s) for s in rng.integers(0, 2**31 - 1, size=self.cfg.rollout.num_tasks)]

    # ------------------------------------------------------------------ validation
    def validate(self, tag: str) -> dict[str, float]:
        """Held-out tasks (validation split), TDS off, validation sampling (docs/method.md §6), TTI as
        `trainer.val_tti` says: off (one decoder for every algorithm, so the figures compare policies), on (the
        run's own TTI setting), or both (off, then, for a run with TTI on, the same tasks and sampler seed with
        TTI as `tti_on/*` keys of the same record)."""
        cfg = self.cfg
        self.reference_points()
        # nothing forced: the decoder every algorithm shares
        tti_off = dataclasses.replace(self.rollout_config.tti, enabled=False)
        primary = self.rollout_config.tti if cfg.trainer.val_tti == "on" else tti_off
        result, stats = self._play_validation(tag, primary)
        stats["val_tti_enabled"] = float(bool(primary.enabled))
        if not self.dist.distributed:  # per-task outcomes, so runs can be paired task by task
            outcome = {ep.group_id: int(ep.won) for ep in result.episodes}
            stats["per_task_success"] = [outcome.get(g, 0) for g in range(cfg.rollout.val_num_tasks)]
        stats["success_stderr"] = references.stderr(stats["success_rate"], cfg.rollout.val_num_tasks)
        if cfg.trainer.val_tti == "both" and self.rollout_config.tti.enabled:
            _, with_tti = self._play_validation(f"{tag} tti", self.rollout_config.tti)
            stats.update({f"tti_on/{k}": v for k, v in with_tti.items()})
        kill_point("validation", tag)
        self.runlog.add_validation(tag, stats)
        if not self.dist.is_main:
            return stats
        with self.timer("tracking"):
            self._write_traces(f"val_{tag}", result, "validation", validation_step(tag, self.cfg.trainer.iterations))
            self.trackers.log_metrics({f"val/{k}": v for k, v in stats.items() if not isinstance(v, list)},
                                      step=validation_step(tag, self.cfg.trainer.iterations))
        with_tti = ""
        if "tti_on/success_rate" in stats:
            with_tti = (f"  [TTI on: success {stats['tti_on/success_rate']:.3f}  "
                        f"valid actions {1 - stats['tti_on/invalid_action_rate']:.3f}]")
        self.log(f"[val {tag}] success {stats['success_rate']:.3f}  valid actions "
                 f"{1 - stats['invalid_action_rate']:.3f}  reward {stats['episode_reward']:.2f}  turns "
                 f"{stats['episode_length']:.1f}  ({stats['seconds']:.0f}s){with_tti}")
        return stats

    def _play_validation(self, label: str, tti) -> tuple[RolloutResult, dict[str, float]]:
        """One pass over the held-out tasks with the thinking intervention `tti` (its `enabled` decides)."""
        cfg = self.cfg
        self.model.eval()
        # the same held-out tasks in every run (the split sets them apart)
        seeds = list(range(cfg.rollout.val_num_tasks))
        seeds = shard_tasks(seeds, self.dist.rank, self.dist.world_size)
        t0 = time.time()
        # the last validation's time
        previous = next(reversed(self.run_state["validation"].values()), {}).get("seconds")
        with self._rollout_weights(), Progress(len(seeds), f"[val {label}]", "episode", disable=self.quiet,
                                               expected_seconds=previous) as bar:
            result = collect_rollouts(EnginePolicy(self.engine, self.rollout_config.val_sampling, tti),
                                      self.val_env, seeds,
                                      self._play_settings(group_size=1),
                                      seed=cfg.trainer.seed + 7919 + 104_729 * self.dist.rank,
                                      progress=bar)
        return result, {**self._global_stats(result), "seconds": from_rank0(time.time() - t0)}

    def reference_points(self) -> dict:
        """The random mover's and the expert's success on the validation tasks (`t2po.references`),
        computed once per run and kept in the run state."""
        if "references" not in self.run_state:
            seeds = list(range(self.cfg.rollout.val_num_tasks))
            refs = references.reference_points(self.val_env, seeds, self.cfg.rollout.max_turns)
            self.run_state["references"] = {k: v and {key: v[key] for key in ("success", "stderr", "method")}
                                            for k, v in refs.items()}
            self.runlog.save_state()
        return self.run_state["references"]

    @property
    def run_state(self) -> dict[str, Any]:
        """The run state (`RunLog.state`, saved in run_state.json): warm-up done, validations, reference points."""
        return self.runlog.state

    # ------------------------------------------------------------------ warm-up
    def warmup(self) -> None:
        """Supervised warm-up on expert demonstrations in the response format (docs/method.md §5 cold start),
        merged into the base weights so that RL starts from (and, under LoRA, regularises towards) it."""
        from t2po.sft import play_expert_episodes, save_conversations, sft_steps, sft_train, tokenize_conversations

        cfg = self.cfg
        t0 = time.time()
        rng = np.random.default_rng([cfg.trainer.seed, 10**6])
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=cfg.warmup.episodes)]
        # every expert step is a correct demonstration, also in episodes that max_steps cuts short
        convs = [c for c in play_expert_episodes(self.train_env, seeds, cfg.rollout.max_turns) if c.steps]
        save_conversations(convs, self.run_dir / "warmup_demos.jsonl")
        examples = tokenize_conversations(convs, self.tokenizer, cfg.rollout.max_prompt_tokens)
        self.log(f"[warm-up] {len(convs)} expert episodes ({sum(c.won for c in convs)} won), {len(examples)} steps; "
                 f"SFT for {cfg.warmup.epochs} epochs")
        steps = sft_steps(len(examples), cfg.warmup.epochs, cfg.warmup.batch_size)
        with Progress(steps, "[warm-up SFT]", "step", disable=self.quiet) as bar:
            losses = sft_train(self.model, self.tokenizer, examples, epochs=cfg.warmup.epochs, lr=cfg.warmup.lr,
                               batch_size=cfg.warmup.batch_size, micro_batch_tokens=cfg.optim.micro_batch_tokens,
                               seed=cfg.trainer.seed,
                               log=lambda m: self.trackers.log_metrics(m, step=int(m["sft/epoch"])), progress=bar)
        # This run's base model from here on: the warm-up merged into the base weights. On disk a LoRA
        # warm-up is its adapter (a few MB; `load_model` merges it into the base it names), full
        # fine-tuning the whole model in its training dtype.
        out = self.checkpointer.save_warmup(self.model, self.tokenizer, cfg.model.lora, self.base_model_path)
        model = self.model.merge_and_unload() if cfg.model.lora else self.model
        self.model = model
        self.base_model_path = str(out)
        self._wrap_trainable()
        self._sync_engine()
        self.run_state["warmup_done"] = True
        self.run_state["warmup"] = {"episodes": len(convs), "steps": len(examples), "losses": losses,
                                    "seconds": time.time() - t0}
        self.runlog.save_state()
        self.log(f"[warm-up] SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.time() - t0:.0f}s)")

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, samples: list[StepSample], values: np.ndarray | None = None) -> tuple[np.ndarray,
            np.ndarray | None, dict]:
        """Per-sample advantages (and per-sample critic returns for an algorithm with a critic), by
        the estimator of `algo.name` (t2po.algos.ALGORITHMS)."""
        out = self.cfg.algorithm.advantages(_step_batch(samples, values), self.cfg.algo)
        adv = out.advantages
        info = {**out.info, "adv/mean": float(np.mean(adv)), "adv/std": float(np.std(adv))}
        return np.asarray(adv, dtype=np.float32), out.returns, info

    def _filter_zero_variance_groups(self, samples: list[StepSample]) -> list[StepSample]:
        """DAPO-style dynamic sampling: drop groups whose episode scores (`StepBatch.episode_scores`) are all equal."""
        scores = _step_batch(samples).episode_scores
        by_group: dict[int, set] = {}
        for s, score in zip(samples, scores):
            by_group.setdefault(s.group_id, set()).add(round(float(score), 8))
        keep = {g for g, vals in by_group.items() if len(vals) > 1}
        return [s for s in samples if s.group_id in keep]

    # ------------------------------------------------------------------ forward passes
    def _micro_batches(self, idx: list[int], samples: list[StepSample]):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prompts = [samples[i].prompt_ids for i in idx]
        responses = [samples[i].response_ids for i in idx]
        pixels = [samples[i].pixel_inputs for i in idx]  # the images the engine saw (vision-language models)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        for group in pack_by_length(lengths, self.cfg.optim.micro_batch_tokens):
            mb = make_micro_batch(group, prompts, responses, pad, pixels)
            mb.indices = [idx[g] for g in group]
            # sharded ranks gather each layer once per forward pass, all the same number of times
            if self.dist.distributed:
                mb.shared = 0
            yield mb.to(self.device)

    @torch.no_grad()
    def _score_samples(self, samples: list[StepSample]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                                 np.ndarray | None]:
        """Old log-probs (current policy before the update), reference log-probs, critic values."""
        if not self.recompute_logprobs and self.cfg.algo.kl_coef <= 0 and self.value_head is None:
            return [torch.tensor(s.rollout_logprobs, dtype=torch.float32) for s in samples], None, None
        self.model.eval()
        old: list[torch.Tensor] = [None] * len(samples)  # type: ignore[list-item]
        ref: list[torch.Tensor] | None = (
            [None] * len(samples) if self.cfg.algo.kl_coef > 0 else None)  # type: ignore[list-item]
        values = np.zeros(len(samples)) if self.value_head is not None else None
        bf16 = self.cfg.optim.bf16
        # the states entering the first trained layer, recorded here and replayed by this iteration's
        # update (t2po.forward.FrozenTrunk); sharded ranks run every layer
        layer = 0 if self.dist.distributed else FrozenTrunk.first_trainable_layer(self.model)
        self.trunk = FrozenTrunk(layer) if layer else None
        # inside `gathered`: no collective per forward pass, so ranks may run different numbers of them
        with gathered(self.model):
            self._score_into(samples, old, ref, values, bf16)
        return old, ref, values

    def _score_into(self, samples, old, ref, values, bf16) -> None:
        bar = Progress(len(samples), "[old log-probs]" if ref is None else "[old and reference log-probs]", "sample",
                       disable=self.quiet,
                       expected_seconds=self.timer.last.get("old_logprob", 0)
                       + self.timer.last.get("reference", 0) or None)
        policy_pass = self.recompute_logprobs or values is not None  # else only the reference pass runs
        for mb in self._micro_batches(list(range(len(samples))), samples):
            bar.update(0, note=f"micro-batch of {len(mb.indices)}")
            out = forward_micro_batch(self.model, mb, value_head=self.value_head, autocast_bf16=bf16,
                                      trunk=self.trunk) if policy_pass else None
            for b, i in enumerate(mb.indices):
                if self.recompute_logprobs:
                    old[i] = out["logp"][b, : len(samples[i].response_ids)].clone()
                else:
                    old[i] = torch.tensor(samples[i].rollout_logprobs, dtype=torch.float32)
                if values is not None:
                    values[i] = float(out["values"][b])
            if ref is not None:
                # the reference is this model without its adapters: the layers below the first LoRA layer are
                # the same, so its pass replays the states the old-log-prob pass just recorded (FrozenTrunk), or,
                # without that pass, records them for the update
                ctx = self.model.disable_adapter() if self.cfg.model.lora else contextlib.nullcontext()
                with ctx, self.timer("reference"):
                    ref_out = forward_micro_batch(self.ref_model or self.model, mb, autocast_bf16=bf16,
                                                  trunk=self.trunk if self.ref_model is None else None)
                for b, i in enumerate(mb.indices):
                    ref[i] = ref_out["logp"][b, : len(samples[i].response_ids)].clone()
            bar.update(len(mb.indices))
        bar.close()

    # ------------------------------------------------------------------ update
    def update(self, samples: list[StepSample], batch: TrainingBatch, iteration: int) -> dict[str, float]:
        """One PPO pass (`optim.ppo_epochs`) over the iteration's samples in mini-batches of
        `optim.mini_batch_size`, each accumulated over micro-batches of `optim.micro_batch_tokens`:
        the loss component (`algo.loss`) per micro-batch, weighted into the mini-batch mean, then
        gradient clipping and one optimizer step."""
        cfg = self.cfg
        self.model.train()
        rng = np.random.default_rng([cfg.trainer.seed, iteration, 17])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        log = _Means()
        tokens = [0, 0]  # real, processed (padding included)
        filler = next(self._micro_batches([0], samples))  # run with loss weight 0 (t2po.distributed.padded)
        # one process: rng.permutation(len(samples)) in mini_batch_size chunks per epoch; several: the same global plan
        # the token-mean denominator (`share.global_tokens`): the tokens the loss mask keeps
        lengths = loss_token_counts([len(s.response_ids) for s in samples], [s.forced_mask for s in samples],
                                    cfg.algo.mask_forced_tokens)
        plans = [plan_mini_batches(lengths, cfg.optim.mini_batch_size, rng) for _ in range(cfg.optim.ppo_epochs)]
        with Progress(sum(map(len, plans)), f"[update iter {iteration + 1}]", "step", disable=self.quiet,
                      expected_seconds=self.timer.last.get("update")) as bar:
            for share in (share for plan in plans for share in plan):
                self.optimizer.zero_grad(set_to_none=True)
                for mb, real in padded(list(self._micro_batches(share.indices, samples)), filler):
                    tokens[0] += mb.real_tokens
                    tokens[1] += mb.processed_tokens
                    loss, weight, metrics = self._micro_batch_loss(mb, batch, share, real)
                    (loss * weight).backward()
                    if real:
                        log.add(metrics)
                log.add({"grad_norm": clip_grad_norm(params, cfg.optim.grad_clip)})
                self.optimizer.step()
                bar.update(1)
        self.trunk = None  # this iteration's samples only
        self.scheduler_step += 1
        metrics = mean_over_ranks(log.means())
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["real_token_ratio"] = tokens[0] / max(tokens[1], 1)
        self._set_lr()
        return metrics

    def _micro_batch_loss(self, mb, batch: TrainingBatch, share, real: bool) -> tuple[torch.Tensor, float,
                                                                                      dict[str, float]]:
        """The loss component on one micro-batch, its weight in the mini-batch mean (token-mean: by
        tokens; seq-mean: by rows; 0 for a filler), and its metrics."""
        a = self.cfg.algo
        out = forward_micro_batch(self.model, mb, with_entropy=True, value_head=self.value_head,
                                  autocast_bf16=self.cfg.optim.bf16,
                                  trunk=self.trunk if real else None)
        rows = batch.rows(mb.indices, mb.response_mask)
        loss, metrics = self.loss_fn(LossBatch(out["logp"], out["entropy"], values=out.get("values"), **rows), a)
        if a.loss_agg == "token-mean":
            weight = rows["mask"].sum().item() / max(share.global_tokens, 1)
        else:
            weight = len(mb.indices) / share.global_samples
        return loss, weight if real else 0.0, metrics

    # ------------------------------------------------------------------ iteration
    def iteration(self, it: int) -> dict[str, float]:
        """Rollout, scoring, advantages and update of iteration `it`, each phase timed by `self.timer`
        (`train` adds their `time/<phase>` to the metrics with validation, checkpoint and tracking)."""
        cfg = self.cfg
        self.model.eval()
        episodes = len(shard_tasks(self.task_seeds(it), self.dist.rank, self.dist.world_size)) * cfg.rollout.group_size
        with self.timer("rollout"), self._rollout_weights(), Progress(episodes, f"[rollout iter {it + 1}]", "episode",
                                                                      disable=self.quiet,
                expected_seconds=self.timer.last.get("rollout")) as bar:
            result: RolloutResult = collect_rollouts(
                EnginePolicy(self.engine, self.rollout_config.sampling, self.rollout_config.tti), self.train_env,
                shard_tasks(self.task_seeds(it), self.dist.rank, self.dist.world_size),
                                                     self._play_settings(cfg.rollout.group_size),
                seed=cfg.trainer.seed * 7_777 + it + 104_729 * self.dist.rank, resampler=self.tds, progress=bar)
        kill_point("rollout", it + 1)
        samples = result.samples
        if cfg.algo.dynamic_sampling:
            samples = self._filter_zero_variance_groups(samples)
        with self.timer("rollout"):  # several ranks: waits for the slowest one
            metrics: dict[str, float] = {f"rollout/{k}": v for k, v in self._global_stats(result).items()}
        if self.tds_threshold is not None:
            metrics["rollout/tds_eta"] = self.tds_threshold.eta()  # the relative threshold after this iteration
        if self.dist.distributed and sum_over_ranks(float(not samples)) > 0:
            raise RuntimeError(f"iteration {it}: a rank has no training sample left (dynamic sampling dropped all its "
                               "groups); use more tasks per rank")
        if samples:
            with self.timer("old_logprob"):  # less the reference pass inside it (`_score_into`)
                old, ref, values = self._score_samples(samples)
            with self.timer("advantages"):
                adv, returns, adv_info = self.compute_advantages(samples, values)
            metrics.update(adv_info)
            with self.timer("update"):
                batch = TrainingBatch.build([s.forced_mask for s in samples], old, adv, ref, values, returns,
                                            cfg.algo.mask_forced_tokens,
                                            self.device)
                metrics.update({f"actor/{k}": v for k, v in self.update(samples, batch, it).items()})
                self._sync_engine()
            kill_point("update", it + 1)
        metrics["train/samples"] = sum_over_ranks(len(samples))
        with self.timer("tracking"):
            self._write_traces(f"iter_{it + 1:06d}", result, "train", it + 1)
        return metrics

    def _write_traces(self, name: str, result: RolloutResult, phase: str, step: int) -> None:
        """`trainer.trace_episodes` of the batch's episodes into traces/<name>.jsonl and the trackers
        (MLflow: as traces of the run, see t2po.traces)."""
        k = self.cfg.trainer.trace_episodes
        if k <= 0 or not self.dist.is_main:
            return
        from t2po.traces import episode_trace, trace_sample

        folder = self.run_dir / "traces"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.jsonl"
        traces = [episode_trace(ep, self.tokenizer) for ep in trace_sample(result.episodes, k)]
        atomic_write_text(path, "".join(json.dumps(t) + "\n" for t in traces))
        self.trackers.log_artifact(path, "traces")
        self.trackers.log_traces(traces, phase, step)

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        cfg = self.cfg
        self.log(self._plan_line())
        val = self.run_state["validation"]
        # a validation lost to a kill is replayed here (the weights it measures are the ones loaded)
        if self.start_iteration == 0:
            if not self.run_state.get("warmup_done"):
                if cfg.trainer.val_before_train and "before" not in val:
                    self.validate("before")
                if cfg.warmup.episodes > 0:
                    self.warmup()
            if cfg.warmup.episodes > 0 and "after_warmup" not in val:
                self.validate("after_warmup")
        # An iteration's line (metrics.jsonl, trackers, console) comes after its validation and checkpoint,
        # as verl logs a step, so that its time/<phase> cover the whole iteration; the time between two
        # lines is its time/iteration (the previous line's own tracking included).
        self.timer.pop()  # the validations before the loop are timed in validation.jsonl
        mark = time.perf_counter()
        for it in range(self.start_iteration, cfg.trainer.iterations):
            metrics = self.iteration(it)
            metrics["iteration"] = it + 1
            if cfg.trainer.val_every and (it + 1) % cfg.trainer.val_every == 0 and it + 1 < cfg.trainer.iterations:
                with self.timer("validation"):
                    self.validate(f"iter_{it + 1}")
            with self.timer("checkpoint"):
                self._save_checkpoint(it)
            metrics.update(self.timer.pop())
            now = time.perf_counter()
            metrics["time/iteration"], mark = now - mark, now
            self.iteration_seconds.append(metrics["time/iteration"])
            with self.timer("tracking"):
                self.runlog.append_metrics(metrics)
                self.trackers.log_metrics(metrics, step=it + 1)
            self.log(self._progress_line(it, metrics))
        if "final" not in val:  # dropped on resume while iterations remained
            self.validate("final")
        summary = self.summary(self._run_seconds())
        if not self.dist.is_main:
            return summary
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.trackers.log_artifact(self.run_dir / "summary.json")
        self.trackers.log_artifact(self.run_dir / "validation.jsonl")
        if cfg.trainer.report:
            self.log("[report] drawing the plots and report.md")
            self._write_report()
        self.log(format_summary(summary))
        return summary

    def _save_checkpoint(self, it: int) -> None:
        """The checkpoint after iteration `it` when `trainer.save_every` (or the last iteration) asks for one;
        several ranks: every rank writes its shards (docs/scaling.md)."""
        cfg = self.cfg
        if (it + 1) % cfg.trainer.save_every == 0 or it + 1 == cfg.trainer.iterations:
            state = {"scheduler_step": self.scheduler_step, "base_model": self.base_model_path}
            if self.tds_threshold is not None:
                state["tds_threshold"] = self.tds_threshold.state_dict()
            self.checkpointer.save(it + 1, self.model, self.optimizer, state, base_path=self.base_model_path,
                                   value_head=self.value_head, lora=cfg.model.lora, keep=cfg.trainer.keep_checkpoints,
                                   sharded=self.dist.distributed)

    def _run_seconds(self) -> float:
        """The run's wall time over all its sessions (resumes): its iterations (metrics.jsonl), warm-up and
        the validations outside iterations. Setup (model loading) and work a kill lost are not counted."""
        lines = self.runlog.metrics()
        val = self.run_state["validation"]
        return (sum(m.get("time/iteration", 0.0) for m in lines) + self.run_state.get("warmup", {}).get("seconds", 0.0)
                + sum(val[tag]["seconds"] for tag in ("before", "after_warmup", "final") if tag in val))

    def _write_report(self) -> None:
        """Plots and report.md into `<run_dir>/report/` (`t2po report`), attached as the artifact folder
        `report`. The run is complete at this point, so a plotting error is reported, never raised."""
        from t2po.report import write_report

        try:
            out = write_report([self.run_dir], self.run_dir / "report")
        except Exception as e:
            print(f"[tracking] could not write the report of {self.run_dir}: {e!r}", file=sys.stderr, flush=True)
            return
        self.trackers.log_artifact(out, "report")

    def _progress_line(self, it: int, m: dict) -> str:
        return (f"[iter {it + 1}/{self.cfg.trainer.iterations}] success {m.get('rollout/success_rate', 0):.3f}  "
                f"reward {m.get('rollout/episode_reward', 0):.2f}  invalid "
                f"{m.get('rollout/invalid_action_rate', 0):.2f}  tds {m.get('rollout/tds_flag_rate', 0):.2f}/elig  tti "
                f"{m.get('rollout/tti_stagnation_triggers', 0):.0f}/{m.get('rollout/tti_budget_triggers', 0):.0f}  "
                f"think {m.get('rollout/think_length', 0):.0f}  grad {m.get('actor/grad_norm', float('nan')):.3f}  kl "
                f"{m.get('actor/approx_kl', float('nan')):.4f}  ({self._time_line(it, m)})")

    def _time_line(self, it: int, m: dict) -> str:
        """Where iteration `it` spent its time, and the time left at this session's measured rates:
        the mean iteration, plus the final validation at the last validation's duration."""
        phases = ", ".join(f"{m[f'time/{k}']:.0f}s {label}" for k, label in PHASE_LABELS if f"time/{k}" in m)
        left = len(range(it + 1, self.cfg.trainer.iterations)) * float(np.mean(self.iteration_seconds))
        if "final" not in self.run_state["validation"] and self.run_state["validation"]:
            left += list(self.run_state["validation"].values())[-1]["seconds"]
        return f"{phases} = {m['time/iteration']:.0f}s; ~{_duration(left)} left"

    def summary(self, seconds: float) -> dict:
        val = self.run_state["validation"]
        ckpt = self.checkpointer.latest()

        def pick(tag: str) -> dict | None:
            if tag not in val:
                return None
            v = val[tag]
            return {"success_rate": v["success_rate"], "success_stderr": v.get("success_stderr"),
                    "valid_action_rate": 1 - v["invalid_action_rate"], "episode_reward": v["episode_reward"],
                    "episode_length": v["episode_length"]}

        return {
            "run_dir": str(self.run_dir),
            "env": self.cfg.env.name,
            "algo": self.cfg.algo.name,
            "iterations": self.cfg.trainer.iterations,
            "seconds": seconds,
            "checkpoint": str(ckpt) if ckpt else None,
            "before_warmup" if self.cfg.warmup.episodes > 0 else "before": pick("before"),
            **({"after_warmup": pick("after_warmup")} if self.cfg.warmup.episodes > 0 else {}),
            "after_rl": pick("final"),
            "validation_tasks": self.cfg.rollout.val_num_tasks,
            "references": self.run_state.get("references", {}),
            "validation_curve": [{"tag": t, "step": validation_step(t, self.cfg.trainer.iterations),
                                  "success_rate": v["success_rate"]}
                                 for t, v in val.items()],
            # what a result depends on beyond the config (Search QA: the corpus the retriever served)
            **({"environment": described} if (described := self.val_env.describe()) else {}),
        }

    def cleanup(self, status: str | None = None) -> None:
        """Release everything; `status` ends the tracker runs as FINISHED, FAILED or KILLED
        (default: from the exception in flight, see `t2po.tracking.run_status`)."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        for env in (getattr(self, "train_env", None), getattr(self, "val_env", None)):
            if env is not None:
                env.close()
        if getattr(self, "trackers", None) is not None:
            self.trackers.close(status)
        if getattr(self, "dist", None) is not None and self.dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            # FSDP2's device mesh keeps the process group, and gloo's worker threads, alive until the
            # sharded model is freed. Free it now: in the interpreter's final GC a gloo thread still
            # releasing a collective's tensors cannot take the GIL and aborts the process (seen under load).
            self.model = self.optimizer = self.ref_model = self.engine = None
            gc.collect()
        if getattr(self, "console", None) is not None:
            self.console.close()


def _step_batch(samples: list[StepSample], values: np.ndarray | None = None) -> StepBatch:
    """The samples as an advantage estimator reads them: environment rewards and penalties side by side."""
    return StepBatch(np.array([s.env_reward for s in samples], dtype=np.float64), [s.traj_id for s in samples],
                     [s.group_id for s in samples], [s.anchor_obs for s in samples], values,
                     penalties=np.array([s.penalty for s in samples], dtype=np.float64))


class _Means:
    """Running means of logged values, key by key (the update's metrics over its micro-batches)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}
# the console names of the time/<phase> metrics, in the order an iteration runs them
PHASE_LABELS = (("rollout", "rollout"), ("old_logprob", "old log-probs"), ("reference", "reference"),
                ("advantages", "advantages"),
                ("update", "update"), ("validation", "validation"), ("checkpoint", "checkpoint"),
                ("tracking", "tracking"))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_summary(s: dict) -> str:
    lines = ["", "=" * 72,
            f"t2po run finished: {s['env']} / {s['algo']}, {_count(s['iterations'], 'iteration')}, "
            f"{s['seconds'] / 60:.1f} min",
             f"  held-out validation ({s['validation_tasks']} tasks):            success   valid actions   reward"]
    for key, label in (("before", "before training"), ("before_warmup", "before warm-up"),
                       ("after_warmup", "after warm-up (SFT)"), ("after_rl", "after RL")):
        v = s.get(key)
        if v:
            lines.append(f"    {label:<38} {v['success_rate']:>7.3f}   {v['valid_action_rate']:>13.3f}   "
                         f"{v['episode_reward']:>6.2f}")
    refs = s.get("references") or {}
    for key, label in (("random", "random mover (same tasks)"), ("expert", "expert (same tasks)")):
        if refs.get(key):
            r = refs[key]
            lines.append(f"    {label:<38} {r['success']:>7.3f}   ({r['method']})")
    final, chance = s.get("after_rl"), refs.get("random")
    if final and chance and final["success_rate"] < chance["success"]:
        lines.append(f"  ! held-out success after RL ({final['success_rate']:.3f}) is below the random mover's "
                     f"({chance['success']:.3f})")
    if final and final.get("success_stderr") is not None:
        lines.append(f"  standard error of one validation's success: +-{final['success_stderr']:.3f} (binomial, "
                     f"{s['validation_tasks']} tasks)")
    corpus = (s.get("environment") or {}).get("corpus")
    if corpus:
        lines.append(f"  corpus: {corpus['name']} ({corpus['num_passages']:,} passages, {corpus['path']})")
    lines += [f"  run folder: {s['run_dir']}", f"  checkpoint: {s['checkpoint']}", "=" * 72]
    return "\n".join(lines)


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder that holds files (metrics, checkpoints and the summary
    would mix two runs, and pruning would delete the new checkpoints)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already holds a run: continue it with `t2po train --resume {run_dir}`, "
                              "or start a new one under another trainer.run_name (or none: a fresh timestamped name)")


def new_run_dir(cfg: Config) -> Path:
    """`output_dir/run_name`, refused if it holds a run; without a run name, `<env>-<algo>-<timestamp>`,
    with `-2`, `-3`, ... when a run started in the same second already took it."""
    from t2po.paths import check_run_name, output_path

    # the path rule (t2po/paths.py): not inside another run
    output_path(cfg.trainer.output_dir, "trainer.output_dir", parent=True)
    parent = Path(cfg.trainer.output_dir)
    if cfg.trainer.run_name:
        run_dir = parent / check_run_name(cfg.trainer.run_name)
        refuse_existing_run(run_dir)
        return run_dir
    env = cfg.env.name.rpartition(":")[2]  # an environment outside the package: package.module:ClassName
    stem = parent / f"{env}-{cfg.algo.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = stem, 1
    while run_dir.exists():
        k += 1
        run_dir = stem.with_name(f"{stem.name}-{k}")
    return run_dir
