"""Experiment tracking: MLflow by default, TensorBoard and Weights & Biases when installed.

Every run folder holds its own MLflow store, so a run is self-contained and can be copied or deleted
as one folder; nothing needs a server:

    <run_dir>/mlflow.db        MLflow tracking store (SQLite): parameters, per-iteration metrics
    <run_dir>/mlartifacts/     MLflow artifacts: config.yaml, traces/, summary.json, report/

    mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db     # then open http://127.0.0.1:5000

(MLflow 3 refuses the old `file:` store, "in maintenance mode", unless MLFLOW_ALLOW_FILE_STORE is set,
hence SQLite.) One MLflow UI shows one store; to compare runs side by side in MLflow,
`t2po report RUN [RUN ...] --mlflow` copies them into one store in the report folder (see
`t2po/report.py`, which also draws the comparison plots).

The sampled episodes (`trainer.trace_episodes` per iteration, and those of each validation) are also
MLflow Traces of the run (`MlflowTracker.log_traces`; their form: `t2po/traces.py`). The UI's Traces
tab shows them; `mlflow.search_traces(locations=[experiment_id], run_id=...)` returns them.

Console output is the trainer's own progress lines (`t2po.progress`), always on and copied into
`<run_dir>/train.log`. A tracker failure never stops training: the failure is reported once on
stderr and that tracker is switched off.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from t2po.errors import UserError

MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_EXPERIMENT = "t2po"
RUN_DIR_TAG = "t2po.run_dir"  # identifies the MLflow run of a run folder, so `--resume` continues it


class MissingPackage(UserError, RuntimeError):
    """An optional tracker whose package is not installed."""


def _report(message: str) -> None:
    # failures go to stderr even with --quiet: a silently missing tracker loses a whole run's logs
    print(f"[tracking] {message}", file=sys.stderr, flush=True)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numbers only (trackers reject strings; NaN/inf lines break MLflow's charts)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def mlflow_store_uri(store_dir: Path) -> str:
    """The `--backend-store-uri` of the MLflow store in `store_dir` (absolute: `sqlite:////abs/path`)."""
    return f"sqlite:///{(Path(store_dir) / MLFLOW_STORE).resolve()}"


def mlflow_ui_command(store_dir: Path) -> str:
    """The command that shows the runs of a store (works offline; serves on 127.0.0.1:5000)."""
    return f"mlflow ui --backend-store-uri {mlflow_store_uri(store_dir)}"


def mlflow_ui_page(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the MLflow UI. The UI opens on its GenAI overview unless told
    `workflowType=machine_learning` (it then keeps that choice in the browser)."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_status(error: BaseException | None = None) -> str:
    """How a run ended, in MLflow's words: FINISHED, KILLED (Ctrl-C, SIGTERM: `t2po train` turns it
    into KeyboardInterrupt) or FAILED (any other exception). Default: the exception in flight."""
    if error is None:
        error = sys.exc_info()[1]
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


class Tracker:
    """One logging backend. Methods may raise; `TrackerGroup` contains the damage."""

    name = "base"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        """Attach a file or a whole folder (under `subdir` in the tracker's artifact tree)."""
        raise NotImplementedError

    def log_traces(self, traces: list[dict], phase: str, step: int) -> None:
        """Rollout traces (`episode_trace` dicts) of one phase ("train", "validation"); only
        trackers with a trace view keep them (the JSONL files in the run folder have them anyway)."""

    def close(self, status: str | None = None) -> None:
        """End the run as `status` (FINISHED, FAILED, KILLED; None: `run_status()`)."""
        raise NotImplementedError

    def forget_after(self, step: int, warmup: bool = False) -> None:
        """Delete the training metrics logged past `step` (iterations lost in a kill, redone after a
        resume), so that each step keeps one value, and with `warmup` the warm-up's (`sft/*`, redone
        too). Trackers that cannot delete keep both."""


def _check_sqlite(path: Path) -> None:
    """Fail fast on a store SQLite cannot open (MLflow itself retries for about 100 s before giving up)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA user_version")
    except sqlite3.Error as e:
        raise RuntimeError(f"cannot open the MLflow store {path}: {e}") from e


class MlflowTracker(Tracker):
    """MLflow run in the SQLite store `<store_dir>/mlflow.db` (default store_dir: the run folder).

    Parameters are the flattened config (`rollout.group_size`, ...), metrics keep the trainer's names
    (`rollout/success_rate`, `actor/grad_norm`), the step is the iteration. Resuming a run folder
    continues its MLflow run (found by the `t2po.run_dir` tag) instead of opening a second one.
    """

    name = "mlflow"

    def __init__(self, run_dir: Path, params: dict, store_dir: Path | None = None):
        import logging

        from mlflow import MlflowClient

        # "Creating initial MLflow database tables..." on every new run folder is noise, not news
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        # "Flushing ... before program exit"
        logging.getLogger("mlflow.tracing.export.async_export_queue").setLevel(logging.WARNING)
        # Traces are written when they end, not by MLflow's background queue: its consumer polls, so
        # every flush (one per iteration and validation, and one at exit) waited ~2 s doing nothing,
        # 13 s of the main job; written in place a batch of traces takes ~0.08 s. An explicit setting wins.
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
        self.run_dir = Path(run_dir).resolve()
        self.store_dir = Path(store_dir or run_dir).resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        _check_sqlite(self.store_dir / MLFLOW_STORE)
        self.client = MlflowClient(tracking_uri=mlflow_store_uri(self.store_dir))
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is None:
            # a training experiment: the UI opens on its runs and charts, not on the GenAI overview
            experiment_id = self.client.create_experiment(MLFLOW_EXPERIMENT,
                    artifact_location=(self.store_dir / MLFLOW_ARTIFACTS).as_uri(),
                                                          tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            experiment_id = experiment.experiment_id
        previous = [r for r in self.client.search_runs([experiment_id], max_results=1000)
                    if r.data.tags.get(RUN_DIR_TAG) == str(self.run_dir)]
        if previous:
            run = previous[0]
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                         tags={RUN_DIR_TAG: str(self.run_dir)})
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self._log_params(_flatten(params), run.data.params)
        if (self.run_dir / "config.yaml").exists():
            self.log_artifact(self.run_dir / "config.yaml")

    def _log_params(self, flat: dict[str, Any], logged: dict[str, str]) -> None:
        from mlflow.entities import Param

        new = []
        for key, value in flat.items():
            text = str(value)[:6000]  # MLflow's limit on a parameter value
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:
                # MLflow forbids changing a logged parameter; config.yaml (logged again) has the new value
                _report(f"mlflow: {key} changed on resume ({logged[key]} -> {text}); the MLflow parameter keeps the "
                        f"first value, the artifact config.yaml has the new one")
        for start in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in _numeric(metrics).items()]
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def forget_after(self, step: int, warmup: bool = False) -> None:
        """MLflow can delete a run but not a metric value, so a run with values to forget is replaced,
        through MLflow's API only: a new run gets the old one's name, tags, parameters, the metric
        history it keeps (each value with its step and time), its artifacts and its traces (linked),
        and the old run is deleted (`mlflow gc` purges it from the store). The warm-up's sft/* metrics
        count epochs, not iterations: they stay, unless the warm-up is redone. Nothing to forget: the
        run stays as it is."""
        import tempfile

        from mlflow.entities import Metric, Param

        old = self.client.get_run(self.run_id)
        history = {key: self.client.get_metric_history(self.run_id, key) for key in old.data.metrics}

        def kept(key: str, metric: Metric) -> bool:
            return not warmup if key.startswith("sft/") else metric.step <= step

        keep = [Metric(key, m.value, m.timestamp, m.step) for key, values in history.items()
                for m in values if kept(key, m)]
        if len(keep) == sum(map(len, history.values())):
            return
        tags = {k: v for k, v in old.data.tags.items() if not k.startswith("mlflow.")}
        new = self.client.create_run(self.experiment_id, start_time=old.info.start_time, tags=tags,
                                     run_name=old.info.run_name)
        params = [Param(k, v) for k, v in old.data.params.items()]
        for start in range(0, len(params), 100):  # MLflow's limits per batch
            self.client.log_batch(new.info.run_id, params=params[start : start + 100])
        for start in range(0, len(keep), 1000):
            self.client.log_batch(new.info.run_id, metrics=keep[start : start + 1000])
        if self.client.list_artifacts(self.run_id):
            with tempfile.TemporaryDirectory() as tmp:
                self.client.log_artifacts(new.info.run_id, self.client.download_artifacts(self.run_id, "", tmp))
        traces, page = [], None
        while True:  # the run's traces, a page at a time
            found = self.client.search_traces(locations=[self.experiment_id], run_id=self.run_id, max_results=500,
                                              page_token=page, include_spans=False)
            traces += [t.info.trace_id for t in found]
            page = found.token
            if not page:
                break
        for start in range(0, len(traces), 100):
            self.client.link_traces_to_run(traces[start : start + 100], new.info.run_id)
        self.client.delete_run(self.run_id)
        self.run_id = new.info.run_id

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=subdir)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=subdir)

    def log_traces(self, traces: list[dict], phase: str, step: int) -> None:
        import mlflow
        from mlflow.entities.trace_location import MlflowExperimentLocation

        from t2po.traces import log_mlflow_trace

        # MLflow's tracing exports through the process-wide tracking URI and destination: point both
        # at this run's store for the call (several run folders in one process each keep their own)
        mlflow.set_tracking_uri(mlflow_store_uri(self.store_dir))
        mlflow.tracing.set_destination(MlflowExperimentLocation(self.experiment_id))
        for trace in traces:
            log_mlflow_trace(mlflow, trace, self.run_id, phase, step)
        mlflow.flush_trace_async_logging()  # into this store before another run folder's call repoints the URI

    def close(self, status: str | None = None) -> None:
        # called from the trainer's `finally`: an exception in flight means the run did not finish
        self.client.set_terminated(self.run_id, status=status or run_status())


class TensorBoardTracker(Tracker):
    """TensorBoard event files in `<run_dir>/tensorboard` (`tensorboard --logdir runs`).

    Scalars only: the artifacts (traces, summary, report) are files in the run folder already."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, params: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingPackage("the tensorboard tracker needs the tensorboard "
                                 "package: pip install tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flatten(params).items()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in _numeric(metrics).items():
            self.writer.add_scalar(k, v, global_step=int(step))
        self.writer.flush()

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        pass  # see the class docstring

    def close(self, status: str | None = None) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run (project `t2po`, files under `<run_dir>/wandb`); `WANDB_MODE=offline`
    keeps it local (`wandb sync` uploads later). Resuming a run folder continues its W&B run."""

    name = "wandb"

    def __init__(self, run_dir: Path, params: dict):
        try:
            import wandb
        except ImportError as e:
            raise MissingPackage("the wandb tracker needs the wandb package: pip install wandb") from e
        self.wandb = wandb
        run_dir = Path(run_dir).resolve()
        run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]  # stable per folder, no '/' allowed
        # allow_val_change: a resumed run may override keys (e.g. more iterations)
        self.run = wandb.init(project="t2po", name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=params, allow_val_change=True)
        # warm-up epochs, validations and iterations each count from 0 or 1: plot against our step,
        # not W&B's own strictly increasing one
        self.run.define_metric("t2po/step")
        self.run.define_metric("*", step_metric="t2po/step")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**_numeric(metrics), "t2po/step": int(step)})

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        path = Path(path)
        artifact = self.wandb.Artifact(name=subdir or path.stem, type="t2po")
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str | None = None) -> None:
        self.run.finish(exit_code=0 if (status or run_status()) == "FINISHED" else 1)


TRACKERS: dict[str, type[Tracker]] = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class TrackerGroup:
    """The trackers of one run. A tracker that raises is reported once and dropped; training goes on."""

    def __init__(self, trackers: list[Tracker], quiet: bool = False):
        self.trackers = list(trackers)
        self.quiet = quiet

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker must never stop training
                _report(f"{tracker.name} failed in {method}: {e!r}; training goes on without {tracker.name}.")
                self.trackers.remove(tracker)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._call("log_artifact", Path(path), subdir)

    def log_traces(self, traces: list[dict], phase: str, step: int) -> None:
        if traces:
            self._call("log_traces", traces, phase, step)

    def forget_after(self, step: int, warmup: bool = False) -> None:
        self._call("forget_after", step, warmup)

    def close(self, status: str | None = None) -> None:
        self._call("close", status or run_status())


def make_trackers(names: list[str], run_dir: Path, params: dict, quiet: bool = False) -> TrackerGroup:
    """Start the named trackers ("console", "mlflow", "tensorboard", "wandb") for one run folder.

    "console" is the trainer's own progress output (always on). A tracker that cannot start (package
    missing, store not writable) is reported once and left out."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "console":
            continue
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from {['console', *TRACKERS]}")
        try:
            trackers.append(TRACKERS[name](Path(run_dir), params))
        except MissingPackage as e:
            _report(f"{e}; training goes on without {name}.")
        except Exception as e:
            _report(f"could not start {name}: {e!r}; training goes on without it.")
    mlflow_tracker = next((t for t in trackers if t.name == "mlflow"), None)
    if not quiet and mlflow_tracker is not None:
        print(f"[tracking] MLflow: {mlflow_ui_command(run_dir)}, then open "
              f"{mlflow_ui_page(mlflow_tracker.experiment_id)}", flush=True)
    return TrackerGroup(trackers, quiet)


def validation_step(tag: str, iterations: int) -> int:
    """The step a validation is logged at: "iter_N" -> N, "final" -> the run's last iteration,
    "before" and "after_warmup" -> 0."""
    if tag.startswith("iter_"):
        return int(tag.split("_")[1])
    return iterations if tag == "final" else 0
