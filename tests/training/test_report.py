"""`t2po report` tests: plots (real images with content) and the summary table from real tiny runs,
seeds of one configuration aggregated into mean + min-max band, configurations labelled by their
differences, killed runs, bad paths, and the combined MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image

from t2po.config import load_config
from t2po.report import PANELS, draw_panel, group_runs, load_run, main, write_report
from t2po.trainer.trainer import Trainer

EXPECTED_PLOTS = ["success_rate", "episode_reward", "invalid_action_rate", "response_length", "clip_ratio", "kl",
                  "grad_norm", "entropy", "tti_triggers", "think_length",
                  "tds_flag_rate", "tds_delta", "tds_extra_tokens", "tokens", "validation_success",
                  "time_split", "overview"]


@pytest.fixture(scope="module")
def two_seeds(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Two real tiny training runs of one configuration, seeds 0 and 1."""
    out = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (0, 1):
        cfg = load_config("default", [
            f"model.path={tiny_model_dir}", f"trainer.output_dir={out}", f"trainer.run_name=seed{seed}",
                                      f"trainer.seed={seed}",
            "trainer.trackers=[console]", "trainer.iterations=2", "trainer.val_before_train=true",
                                      "trainer.trace_episodes=0",
            "warmup.episodes=0", "rollout.num_tasks=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=12",
                                      "rollout.val_num_tasks=1",
            "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "optim.mini_batch_size=4", "model.lora_rank=4"])
        trainer = Trainer(cfg, quiet=True)
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup()
        dirs.append(trainer.run_dir)
    return dirs


def assert_image_with_content(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100, path
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 2, f"{path} is blank"


def test_report_writes_plots_and_table_for_two_seeds(two_seeds, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(p) for p in two_seeds] + ["--out", str(out)]) == 0
    for name in EXPECTED_PLOTS:
        assert_image_with_content(out / f"{name}.png")
    table = (out / "report.md").read_text()
    assert "| seed0 |" in table and "| seed1 |" in table
    # both seeds form one configuration: its row says 2 seeds and gives mean ± std of the final validation
    finals = [json.loads((p / "summary.json").read_text())["after_rl"]["success_rate"] for p in two_seeds]
    assert f"| 2 | {np.mean(finals):.3f} ± {np.std(finals):.3f} |" in table
    for name in EXPECTED_PLOTS[:-1]:
        assert f"({name}.png)" in table
    assert "report.md" in capsys.readouterr().out


def test_default_output_is_the_first_runs_report_folder(two_seeds):
    out = write_report([two_seeds[0]])
    assert out == two_seeds[0] / "report"
    assert_image_with_content(out / "success_rate.png")


def test_seeds_are_aggregated_into_mean_and_min_max_band(two_seeds):
    runs = [load_run(p) for p in two_seeds]
    groups = group_runs(runs)
    assert len(groups) == 1 and len(groups[0].runs) == 2
    xs, mean, lo, hi = groups[0].series("actor/grad_norm")
    per_seed = np.array([[m["actor/grad_norm"] for m in r.metrics] for r in runs])
    assert xs.tolist() == [1, 2]
    np.testing.assert_allclose(mean, per_seed.mean(axis=0))
    np.testing.assert_allclose(lo, per_seed.min(axis=0))
    np.testing.assert_allclose(hi, per_seed.max(axis=0))
    assert (hi > lo).any(), "different seeds should give different gradient norms"
    # the plot draws the band (a filled area) and says what it is
    ax = Figure().add_subplot()
    assert draw_panel(ax, next(p for p in PANELS if p.file == "grad_norm"), groups)
    assert len(ax.collections) == 1
    assert "mean over seeds, band min-max" in ax.get_title()


def fake_run(root: Path, name: str, algo: str, seed: int, success: list[float], finished: bool = True) -> Path:
    """A run folder in the trainer's format with hand-chosen numbers."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config("default",
            [f"algo.name={algo}", f"trainer.seed={seed}", f"trainer.run_name={name}", "trainer.iterations=3"]).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"iteration": k + 1, "rollout/success_rate": s, "time/rollout": 2.0, "time/update": 1.0,
                         "time/iteration": 3.5})
             for k, s in enumerate(success)]
    if not finished:
        lines.append('{"iteration": 9, "rollout/succ')  # killed while writing
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    val = [{"tag": "before", "success_rate": 0.1, "invalid_action_rate": 0.5, "episode_reward": 0.0,
            "episode_length": 3.0}]
    if finished:
        val.append({"tag": "final", "success_rate": success[-1], "invalid_action_rate": 0.0, "episode_reward": 1.0,
                    "episode_length": 3.0})
        (run / "summary.json").write_text(json.dumps({"seconds": 600.0}))
    (run / "validation.jsonl").write_text("".join(json.dumps(v) + "\n" for v in val))
    return run


def test_configurations_are_labelled_by_their_differences_and_killed_runs_are_read(tmp_path, capsys):
    fake_run(tmp_path / "runs", "t2po-s0", "t2po", 0, [0.0, 0.5, 0.75])
    fake_run(tmp_path / "runs", "t2po-s1", "t2po", 1, [0.25, 0.25, 1.0])
    fake_run(tmp_path / "runs", "grpo-s0", "grpo", 0, [0.5, 0.25], finished=False)
    out = write_report([tmp_path / "runs"], tmp_path / "out")  # a folder of runs stands for all of them
    assert "metrics.jsonl: dropped line 3" in capsys.readouterr().err
    groups = group_runs([load_run(p) for p in sorted((tmp_path / "runs").iterdir())])
    assert sorted(g.label for g in groups) == ["algo.name=grpo", "algo.name=t2po"]
    t2po = next(g for g in groups if g.label == "algo.name=t2po")
    xs, mean, lo, hi = t2po.series("rollout/success_rate")
    np.testing.assert_allclose(mean, [0.125, 0.375, 0.875])
    np.testing.assert_allclose(lo, [0.0, 0.25, 0.75])
    np.testing.assert_allclose(hi, [0.25, 0.5, 1.0])
    xs, mean, _, _ = t2po.validation_series()
    assert xs.tolist() == [0, 3] and mean.tolist() == pytest.approx([0.1, 0.875])
    table = (out / "report.md").read_text()
    assert "| grpo-s0 | algo.name=grpo | 0 | stopped at 2/3 | 0.250 | 0.500 (1) | 0.100 | – | – |" in table
    assert "| t2po-s1 | algo.name=t2po | 1 | finished | 1.000 | 1.000 (3) |" in table
    assert "| algo.name=t2po | 2 | 0.875 ± 0.125 |" in table
    for name in ("success_rate", "validation_success", "time_split", "overview"):
        assert_image_with_content(out / f"{name}.png")
    assert not (out / "kl.png").exists(), "no run logged a KL: no empty plot"


def _metrics_run(root: Path, name: str, rows: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_config("default", [f"trainer.run_name={name}"]).to_dict()))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": k + 1, **r}) + "\n"
                                               for k, r in enumerate(rows)))
    return run


def _panel(name: str):
    return next(p for p in PANELS if p.file == name)


def test_agent_panels_band_the_response_length_and_clamp_fractions(tmp_path):
    rows = [{"rollout/response_length": 20.0, "rollout/response_length_min": 5.0, "rollout/response_length_max": 40.0,
             "rollout/clip_ratio": 0.0, "rollout/invalid_action_rate": 0.0},
            {"rollout/response_length": 30.0, "rollout/response_length_min": 12.0, "rollout/response_length_max": 48.0,
             "rollout/clip_ratio": 0.25, "rollout/invalid_action_rate": 1.0}]
    groups = group_runs([load_run(_metrics_run(tmp_path, "r", rows))])
    ax = Figure().add_subplot()
    assert draw_panel(ax, _panel("response_length"), groups)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # one run: the band is the within-iteration min-max
    assert band.min() == 5.0 and band.max() == 48.0
    for name in ("clip_ratio", "invalid_action_rate"):
        ax = Figure().add_subplot()
        assert draw_panel(ax, _panel(name), groups)
        y0, y1 = ax.get_ylim()
        assert y0 >= 0.0 and y1 <= 1.0, (name, y0, y1)  # autoscaling alone gives -0.05 .. 1.05
    out = write_report([tmp_path / "r"], tmp_path / "out")
    for name in ("invalid_action_rate", "response_length", "clip_ratio"):
        assert_image_with_content(out / f"{name}.png")


def test_coinciding_curves_stay_distinguishable(tmp_path):
    """Two counters that are both 0 (TTI stagnation and budget) and two configurations with equal
    success: each later curve gets another marker, hollow, and a thinner line than the one below it."""
    zero = {"rollout/tti_stagnation_triggers": 0.0, "rollout/tti_budget_triggers": 0.0}
    groups = group_runs([load_run(_metrics_run(tmp_path, "r", [zero, zero]))])
    ax = Figure().add_subplot()
    assert draw_panel(ax, _panel("tti_triggers"), groups)
    first, second = ax.lines
    assert first.get_marker() != second.get_marker()
    assert second.get_linewidth() < first.get_linewidth()
    assert second.get_markerfacecolor() == "none"


def test_bad_paths_get_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_mlflow_export_puts_all_runs_in_one_store(tmp_path):
    from mlflow import MlflowClient

    from t2po.tracking import MLFLOW_EXPERIMENT, mlflow_store_uri

    a = fake_run(tmp_path / "runs", "t2po-s0", "t2po", 0, [0.0, 0.5, 0.75])
    b = fake_run(tmp_path / "runs", "grpo-s0", "grpo", 0, [0.5, 0.25, 0.5])
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out), "--mlflow"]) == 0
    client = MlflowClient(tracking_uri=mlflow_store_uri(out))
    runs = client.search_runs([client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["grpo-s0", "t2po-s0"]
    assert by_name["grpo-s0"].data.params["algo.name"] == "grpo"
    history = sorted(client.get_metric_history(by_name["t2po-s0"].info.run_id, "rollout/success_rate"),
                     key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 0.0), (2, 0.5), (3, 0.75)]
    assert by_name["t2po-s0"].data.metrics["val/success_rate"] == 0.75
    # exporting again replaces the copy instead of duplicating the runs
    assert main([str(a), str(b), "--out", str(out), "--mlflow"]) == 0
    assert len(client.search_runs([client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id])) == 2


def test_one_runs_validation_band_is_the_binomial_interval_and_figures_carry_the_run_title(tmp_path):
    from t2po.report import _run_title, draw_validation, wilson_interval

    lo, hi = wilson_interval(np.array([0.5, 0.0]), 10)  # 5/10 and 0/10 solved (hand-computed Wilson 95 % bounds)
    assert lo == pytest.approx([0.2366, 0.0], abs=1e-4) and hi == pytest.approx([0.7634, 0.2775], abs=1e-4)
    run = _metrics_run(tmp_path, "val-run", [{"rollout/success_rate": 0.5}] * 2)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["rollout"]["val_num_tasks"] = 10
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "validation.jsonl").write_text("".join(json.dumps({"tag": t, "success_rate": r}) + "\n"
                                                  for t, r in (("before", 0.0), ("final", 0.5))))
    groups = group_runs([load_run(run)])
    fig = Figure()
    ax = fig.add_subplot()
    assert draw_validation(ax, groups)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() == pytest.approx(0.7634, abs=1e-4)
    assert "95 % binomial interval" in ax.get_title()
    _run_title(fig, groups)
    assert fig.get_suptitle() == "sokoban / t2po: val-run"
