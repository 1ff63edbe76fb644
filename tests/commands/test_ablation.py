"""benchmarks/ablation.py on a smoke-sized setting with the tiny model: the warm-up runs once per seed
and is shared by the arms, the JSON has one entry per (arm, seed), a rerun skips finished runs, and
`t2po report` groups the seeds of an arm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_smoke_runs_resumes_and_reports(tiny_model_dir, tmp_path):
    ablation = _ablation()
    out = tmp_path / "ablation"
    tiny = [f"model.path={tiny_model_dir}", "trainer.iterations=1", "warmup.episodes=2", "warmup.epochs=1", "rollout.num_tasks=1",
            "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1", "rollout.tti.turn_score_skip=0",
            "env.options.max_steps=2", "model.lora_rank=4", "trainer.trace_episodes=0"]
    args = ["--out", str(out), "--seeds", "0", "1", "--arms", "t2po-paper", "grpo", "--set", *tiny]
    assert ablation.main(args) == 0
    doc = json.loads((out / "ablation.json").read_text())
    runs = doc["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("grpo", 0), ("grpo", 1), ("t2po-paper", 0), ("t2po-paper", 1)]
    for r in runs:
        assert r["before_rl"] is not None and r["after_rl"] is not None and 0 <= r["after_rl"]["valid_action_rate"] <= 1
        assert [it["iteration"] for it in r["iterations"]] == [1]
        assert {"success_rate", "invalid_action_rate", "approx_kl", "grad_norm", "tds_flag_rate"} <= set(r["iterations"][0])
        assert r["generated_tokens"] > 0 and r["wall_seconds"] > 0 and set(r["tti_triggers"]) == {"stagnation", "budget", "random"}
        # one decoder (TTI off) for every arm; the T2PO arm also with its TTI (issue 27)
        assert ("tti_on_success_rate" in r["after_rl"]) == (r["arm"] == "t2po-paper")
    # one warm-up per seed, shared: both arms of a seed start from the same model folder
    for seed in (0, 1):
        models = {(out / f"{arm}-seed{seed}" / "warmup_model").resolve() for arm in ("t2po-paper", "grpo")}
        assert models == {(out / f"warmup-seed{seed}" / "warmup_model").resolve()}
    # GRPO never resamples
    assert all(it["tds_flag_rate"] == 0 for r in runs if r["arm"] == "grpo" for it in r["iterations"])
    # a rerun skips the finished runs (their files are untouched)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")}
    assert ablation.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")} == stamp
    # the report groups the two seeds of each arm into one configuration
    report = (out / "report" / "report.md").read_text()
    assert report.count("| 2 |") >= 2 and "Exploration control" in report
    # the controls (issue 27): random truncation takes TTI's rate from the same seed's t2po-calibrated run, or --random-rate
    with pytest.raises(SystemExit, match="t2po-calibrated"):
        ablation.arm_overrides("random-truncation", 0, out, None)
    controls = ["--out", str(out), "--seeds", "0", "--arms", "random-truncation", "random-resampling", "--random-rate", "0.05",
                "--no-report", "--set", *tiny]
    assert ablation.main(controls) == 0
    runs = {r["arm"]: r for r in json.loads((out / "ablation.json").read_text())["runs"]}
    assert runs["random-truncation"]["random_rate"] == 0.05 and runs["random-resampling"]["random_rate"] is None
    config = yaml.safe_load((out / "random-resampling-seed0" / "config.yaml").read_text())
    assert config["rollout"]["tds"]["control"] == "random" and config["rollout"]["tti"]["control"] == "none"
