"""The MLflow UI on a tiny run, in a real headless Chromium (Playwright): the run is listed, a metric
chart is drawn, and a trace shows its turn's response, with the observation's grid on separate lines.

Needs the `playwright` package (a dev dependency) and a Chromium: Debian's (`apt-get install chromium`),
or Playwright's own (`playwright install chromium`). Without them the test is skipped, saying which
is missing."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_training
from t2po.config import load_config
from t2po.tracking import MLFLOW_EXPERIMENT, mlflow_store_uri, mlflow_ui_page

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed (pip install playwright==1.65.2)")


def chromium_path() -> str | None:
    """A Chromium to drive: the system's (Debian's chromium package), else Playwright's download."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    with sync_api.sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if bundled and Path(bundled).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (Debian), or playwright install chromium")
    return path


@pytest.fixture(scope="module")
def ui(tiny_model_dir, tmp_path_factory):
    """A one-iteration tiny run with MLflow, and `mlflow ui` on its store (127.0.0.1, one worker, no job runners)."""
    out = tmp_path_factory.mktemp("ui")
    cfg = load_config("default", [
        f"model.path={tiny_model_dir}", f"trainer.output_dir={out}", "trainer.run_name=ui-run",
                                  "trainer.trackers=[mlflow]",
        "trainer.iterations=1", "trainer.val_before_train=false", "trainer.trace_episodes=1", "trainer.report=false",
                                  "warmup.episodes=0",
        "rollout.num_tasks=1", "rollout.group_size=2", "rollout.sampling.max_new_tokens=12", "rollout.val_num_tasks=1",
        "env.options.max_steps=2", "model.lora_rank=4"])
    run_dir = run_training(cfg).run_dir
    port = free_port()
    log = open(out / "mlflow-ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow_store_uri(run_dir),
                             "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (out / "mlflow-ui.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow ui did not start:\n" + (out / "mlflow-ui.log").read_text()
            time.sleep(0.5)
        yield base, run_dir
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_the_mlflow_ui_shows_the_run_a_metric_chart_and_a_traces_response(ui, browser_path):
    import mlflow

    base, run_dir = ui
    mlflow.set_tracking_uri(mlflow_store_uri(run_dir))
    experiment = mlflow.get_experiment_by_name(MLFLOW_EXPERIMENT)
    (run,) = mlflow.search_runs([experiment.experiment_id], output_format="list")
    (trace,) = [t for t in mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
                if t.info.tags["t2po.phase"] == "train"]
    turn = next(s for s in trace.data.spans if s.name == "turn 0")
    grid = [row for row in turn.inputs["observation"].splitlines() if row.startswith("#")]
    # the tiny model's answers hold control characters, which a page does not show: compare the letters and digits
    letters = _letters(turn.outputs["response"].strip("`"))
    assert len(grid) >= 3 and len(letters) >= 4, (grid, turn.outputs["response"])

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            # the link t2po prints: the runs of the experiment, not the GenAI overview
            page.goto(mlflow_ui_page(experiment.experiment_id, base))
            page.get_by_text("ui-run", exact=True).first.wait_for()
            assert "/runs" in page.url

            page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
                      "/model-metrics?workflowType=machine_learning")
            page.get_by_text("ui-run (actor/grad_norm)").first.wait_for()  # a chart's legend
            assert page.locator("svg").filter(has_text="Step").count() > 0  # the chart itself, with its step axis

            page.goto(f"{base}/#/experiments/{experiment.experiment_id}/traces?workflowType=machine_learning"
                      f"&selectedEvaluationId={trace.info.trace_id}")
            page.get_by_text("turn 0", exact=True).first.click()
            page.get_by_text("response", exact=True).first.wait_for()
            text = page.inner_text("body")
            response = text[text.index("\nresponse\n"):]
            assert letters in _letters(response[: response.index("\naction\n")]), (letters, response[:300])
            lines = text.splitlines()
            # the observation is a code block: each row of the grid on its own (numbered) line
            for row in grid:
                assert any(line.endswith(row) and len(line) <= len(row) + 3 for line in lines), (row, lines)
        finally:
            browser.close()


def _letters(text: str) -> str:
    return "".join(re.findall(r"[A-Za-z0-9]", text))
