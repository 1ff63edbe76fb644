"""Experiment tracking: console always, MLflow by default (local store inside the run folder).

A tracker failure never kills training: it is reported once and that tracker is switched off.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class Tracker:
    name = "base"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...

    def close(self) -> None: ...


class MlflowTracker(Tracker):
    """MLflow with a local store in `<run_dir>/mlruns` (view: `mlflow ui --backend-store-uri <run_dir>/mlruns`)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, params: dict):
        import mlflow

        self.mlflow = mlflow
        store = (Path(run_dir) / "mlruns").resolve()
        mlflow.set_tracking_uri(store.as_uri())
        mlflow.set_experiment("t2po")
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        flat = _flatten(params)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def close(self) -> None:
        self.mlflow.end_run()


class TrackerGroup:
    def __init__(self, trackers: list[Tracker], quiet: bool = False):
        self.trackers = trackers
        self.quiet = quiet

    def _call(self, method: str, *args: Any, **kw: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args, **kw)
            except Exception as e:  # a tracker must never stop training
                print(f"[tracking] {t.name} failed in {method}: {e!r}; continuing without it.", flush=True)
                self.trackers.remove(t)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._call("log_artifact", path, subdir)

    def close(self) -> None:
        self._call("close")


def make_trackers(names: list[str], run_dir: Path, params: dict, quiet: bool = False) -> TrackerGroup:
    trackers: list[Tracker] = []
    for name in names:
        if name == "console":
            continue  # the trainer prints progress itself
        try:
            if name == "mlflow":
                trackers.append(MlflowTracker(run_dir, params))
            else:
                raise ValueError(f"tracker {name!r} is not available in this build")
        except Exception as e:
            print(f"[tracking] could not start {name}: {e!r}; continuing without it.", flush=True)
    return TrackerGroup(trackers, quiet)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def episode_trace(episode: Any, tokenizer: Any) -> dict:
    """One episode as JSON: per step the prompt and response (decoded and token ids), where TTI
    forced tokens, whether TDS resampled the turn, the action, validity and reward."""
    steps = []
    for s in episode.samples:
        steps.append({
            "step": s.step,
            "observation": episode.observations[s.step] if s.step < len(episode.observations) else None,
            "prompt": tokenizer.decode(s.prompt_ids),
            "response": s.response_text,
            "response_ids": s.response_ids,
            "forced_positions": [k for k, f in enumerate(s.forced_mask) if f],
            "tti_triggers": s.tti_triggers,
            "think_length": s.think_length,
            "tds_resampled": s.resampled,
            "turn_score": None if math.isnan(s.turn_score) else s.turn_score,
            "action": s.action,
            "valid": s.valid,
            "invalid_reason": s.invalid_reason,
            "reward": s.reward,
            "done": s.done,
        })
    return {"traj_id": episode.traj_id, "group_id": episode.group_id, "seed": episode.seed, "won": episode.won,
            "total_reward": episode.total_reward, "metrics": {k: v for k, v in episode.metrics.items() if isinstance(v, (int, float, str, bool))}, "steps": steps}
