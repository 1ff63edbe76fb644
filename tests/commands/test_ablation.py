"""benchmarks/ablation.py on a smoke-sized setting with the tiny model: the warm-up runs once per seed
and is shared by the arms, the JSON has one entry per (arm, seed), a rerun skips finished runs, and
`t2po report` groups the seeds of an arm."""

from __future__ import annotations

import importlib.util
import json
import subprocess
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
    tiny = [f"model.path={tiny_model_dir}", "trainer.iterations=1", "warmup.episodes=2", "warmup.epochs=1",
            "rollout.num_tasks=1",
            "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
            "rollout.tti.turn_score_skip=0",
            "env.options.max_steps=2", "model.lora_rank=4", "trainer.trace_episodes=0"]
    args = ["--out", str(out), "--seeds", "0", "1", "--arms", "t2po-paper", "gigpo", "--set", *tiny]
    assert ablation.main(args) == 0
    doc = json.loads((out / "ablation.json").read_text())
    runs = doc["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("gigpo", 0), ("gigpo", 1), ("t2po-paper", 0),
                                                           ("t2po-paper", 1)]
    # what issue 27 (item 7) asks of the JSON: the commit, each run's resolved config, per-room outcomes, learning
    # curves, tokens, TTI and TDS diagnostics, wall time, load average; the paired comparison with GiGPO, the power plan
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert doc["commit"] == head and isinstance(doc["dirty"], bool)
    for r in runs:
        assert r["config"]["algo"]["name"] == {"t2po-paper": "t2po", "gigpo": "gigpo"}[r["arm"]]
        assert r["config"]["trainer"]["seed"] == r["seed"] and r["config"]["model"]["path"] == str(tiny_model_dir)
        assert [v["tag"] for v in r["validations"]] == ["after_warmup", "final"]
        assert all(len(v["per_task_success"]) == 1 for v in r["validations"])
        assert [p["tag"] for p in r["learning_curve"]] == ["after_warmup", "final"]
        assert set(r["tds"]) >= {"tds_inband_before", "tds_inband_after", "tds_kept_delta_mean"}
        (session,) = r["sessions"]
        assert session["commit"] == head and session["wall_seconds"] > 0 and len(session["load_average_before"]) == 3
    paper = doc["comparison"]["t2po-paper"]
    by_run = {(r["arm"], r["seed"]): r["after_rl"]["success_rate"] for r in runs}
    assert paper["seeds"] == [0, 1] and set(doc["comparison"]) == {"t2po-paper"}
    assert paper["per_seed"] == {str(s): by_run[("t2po-paper", s)] - by_run[("gigpo", s)] for s in (0, 1)}
    assert paper["paired_by_seed"]["n"] == 2 and paper["paired_by_room"]["n"] == 2  # 1 room x 2 seeds
    design = doc["plan"]["scenarios"]["learning"]["design"]
    assert design["seeds"] == 2 and design["rooms"] == 1 and 0 < design["power"] < 1
    for r in runs:
        assert r["before_rl"] is not None and r["after_rl"] is not None and 0 <= r["after_rl"]["valid_action_rate"] <= 1
        assert [it["iteration"] for it in r["iterations"]] == [1]
        assert {"success_rate", "invalid_action_rate", "approx_kl", "grad_norm",
                "tds_flag_rate"} <= set(r["iterations"][0])
        assert r["generated_tokens"] > 0 and r["wall_seconds"] > 0 and set(r["tti_triggers"]) == {"stagnation",
                                                                                                  "budget", "random"}
        # one decoder (TTI off) for every arm; the T2PO arm also with its TTI (issue 27)
        assert ("tti_on_success_rate" in r["after_rl"]) == (r["arm"] == "t2po-paper")
    # one warm-up per seed, shared: both arms of a seed start from the same model folder
    for seed in (0, 1):
        models = {(out / f"{arm}-seed{seed}" / "warmup_model").resolve() for arm in ("t2po-paper", "gigpo")}
        assert models == {(out / f"warmup-seed{seed}" / "warmup_model").resolve()}
    # GiGPO never resamples
    assert all(it["tds_flag_rate"] == 0 for r in runs if r["arm"] == "gigpo" for it in r["iterations"])
    # a rerun skips the finished runs (their files are untouched)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")}
    assert ablation.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")} == stamp
    # the report groups the two seeds of each arm into one configuration
    report = (out / "report" / "report.md").read_text()
    assert report.count("| 2 |") >= 2 and "Exploration control" in report
    # the controls (issue 27): random truncation takes TTI's rate from the same seed's t2po-calibrated run, or
    # --random-rate
    with pytest.raises(SystemExit, match="t2po-calibrated"):
        ablation.arm_overrides("random-truncation", 0, out, None)
    controls = ["--out", str(out), "--seeds", "0", "--arms", "random-truncation", "random-resampling",
                "--random-rate", "0.05",
                "--no-report", "--set", *tiny]
    assert ablation.main(controls) == 0
    runs = {r["arm"]: r for r in json.loads((out / "ablation.json").read_text())["runs"]}
    assert runs["random-truncation"]["random_rate"] == 0.05 and runs["random-resampling"]["random_rate"] is None
    config = yaml.safe_load((out / "random-resampling-seed0" / "config.yaml").read_text())
    assert config["rollout"]["tds"]["control"] == "random" and config["rollout"]["tti"]["control"] == "none"


def test_comparison_pairs_each_arm_with_gigpo_by_seed_and_by_room():
    """Hand-computed: two seeds, three rooms. Arm minus GiGPO per seed: 2/3 - 1/3 = 1/3 and 1/3 - 1/3 = 0 ->
    mean 1/6, sd sqrt(1/18), t(1) 12.706 -> half-width 12.706 * sqrt(1/18) / sqrt(2); per room, pooled:
    [1, 0, 0, 0, 1, -1] -> mean 1/6 over 6 rooms."""
    ablation = _ablation()

    def run(arm, seed, rooms):
        return {"arm": arm, "seed": seed, "after_rl": {"success_rate": sum(rooms) / len(rooms)},
                "validations": [{"tag": "after_warmup", "per_task_success": [0, 0, 0]},
                                {"tag": "final", "per_task_success": rooms}]}

    runs = [run("gigpo", 0, [0, 1, 0]), run("gigpo", 1, [0, 0, 1]), run("t2po", 0, [1, 1, 0]),
            run("t2po", 1, [0, 1, 0]), run("grpo", 0, [0, 1, 0])]  # grpo has no seed 1: paired on seed 0 only
    out = ablation.comparison(runs)
    assert set(out) == {"t2po", "grpo"}
    t2po = out["t2po"]
    assert t2po["per_seed"] == pytest.approx({"0": 1 / 3, "1": 0.0})
    half = 12.706 * (1 / 18) ** 0.5 / 2 ** 0.5
    assert t2po["paired_by_seed"]["mean"] == pytest.approx(1 / 6)
    assert t2po["paired_by_seed"]["ci95"] == pytest.approx([1 / 6 - half, 1 / 6 + half])
    assert t2po["paired_by_room"]["n"] == 6 and t2po["paired_by_room"]["mean"] == pytest.approx(1 / 6)
    assert out["grpo"]["seeds"] == [0] and out["grpo"]["paired_by_seed"]["ci95"] is None
