"""`t2po report RUN [RUN ...] [--out DIR] [--mlflow]`: plots and a summary table of training runs.

    t2po report runs/sokoban-t2po-20260101-120000                 one run -> <run>/report/
    t2po report runs/t2po-seed* runs/grpo-seed* --out cmp/        compare configurations over seeds
    t2po report runs/                                             every run folder inside runs/

Reads only the run folders' files (`config.yaml`, `metrics.jsonl`, `validation.jsonl`,
`summary.json`), so it works on finished, running and killed runs alike. Writes into the output folder
(default `<first run>/report/`):
  - one PNG per quantity over iterations (success rate, reward, task score, invalid actions,
    response length per turn with its shortest-longest band, responses cut at the token limit, KL,
    gradient norm, policy entropy, TTI triggers, think length, TDS flag rates, turn-score deltas,
    TDS extra tokens, tokens, held-out validation success; fractions on a [0, 1] axis), `time_split.png`
    (seconds per iteration by phase) and `overview.png` with all of them;
  - `report.md`: per-run and per-configuration tables (final / best training success, held-out
    validation before and after training, tokens, time), an exploration-control table (what TTI and
    TDS did per iteration), and the plots.
Runs whose configs are equal except for `trainer.seed`, `trainer.run_name` and `trainer.output_dir`
are seeds of one configuration: drawn as the mean over seeds with a min-max band. Configurations
are labelled by the config keys in which they differ (e.g. `algo.name=grpo`).
`--mlflow` also copies the runs into one MLflow store in the output folder, so that one MLflow UI
compares them (each run folder's own store shows only that run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2po.runlog import read_jsonl_log
from t2po.errors import InvalidInput, UserError
from t2po.paths import new_folder
from t2po.runfiles import read_run_config

SEED_KEYS = ("trainer.seed", "trainer.run_name", "trainer.output_dir")  # differ between seeds of one configuration


@dataclass
class Run:
    """The files of one run folder, parsed."""

    path: Path
    config: dict  # nested, as in config.yaml
    metrics: list[dict]  # metrics.jsonl, one dict per iteration, sorted by iteration
    validation: dict[str, dict]  # validation tag ("before", "after_warmup", "iter_5", "final") -> stats
    summary: dict | None  # summary.json; None while running or after a kill

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        return self.config.get("trainer", {}).get("seed")

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(iterations, values) of one metric; iterations that lack it are left out."""
        pts = [(m["iteration"], m[key]) for m in self.metrics if isinstance(m.get(key), (int, float))]
        return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)

    @property
    def corpus(self) -> str | None:
        """The Search QA corpus the run retrieved from (results are comparable only on the same one):
        from summary.json, else from the per-corpus validation metrics of a running or killed run."""
        described = ((self.summary or {}).get("environment") or {}).get("corpus")
        if described:
            return f"{described['name']} ({described['num_passages']:,} passages)"
        names = {key.split("/", 2)[2] for stats in self.validation.values() for key in stats
                 if key.startswith("success/corpus/")}
        return ", ".join(sorted(names)) or None

    def validation_points(self) -> list[tuple[int, float]]:
        """(iteration, held-out success) for every validation: the untrained or warmed-up model at 0."""
        last = self.metrics[-1]["iteration"] if self.metrics else 0
        iterations = int(self.config.get("trainer", {}).get("iterations", last))
        start = self.validation.get("after_warmup") or self.validation.get("before")
        pts = [(0, start["success_rate"])] if start else []
        for tag, stats in self.validation.items():
            if tag.startswith("iter_"):
                pts.append((int(tag.split("_")[1]), stats["success_rate"]))
        if "final" in self.validation:
            pts.append((iterations, self.validation["final"]["success_rate"]))
        return sorted(pts)


def _read_jsonl(path: Path, key: tuple[str, type]) -> list[dict]:
    # a run killed mid-write leaves a cut last line: skipped with a note, as the trainer's resume does
    return read_jsonl_log(path, _note, key)


def _note(message: str) -> None:
    print(f"t2po report: {message}", file=sys.stderr)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder; pass run folders (e.g. "
                                "runs/sokoban-t2po-...)")
    config = read_run_config(path)
    by_iteration: dict[int, dict] = {}
    if (path / "metrics.jsonl").exists():
        for row in _read_jsonl(path / "metrics.jsonl", ("iteration", int)):
            by_iteration[row["iteration"]] = row  # a resumed run re-logs redone iterations: keep the last
    validation: dict[str, dict] = {}
    if (path / "validation.jsonl").exists():
        for row in _read_jsonl(path / "validation.jsonl", ("tag", str)):
            validation[row["tag"]] = row
    summary = None
    if (path / "summary.json").exists():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except (OSError, ValueError) as e:
            _note(f"{path / 'summary.json'} cannot be read ({e}); the report goes on without it")
        summary = summary if isinstance(summary, dict) else None
    return Run(path=path, config=config, metrics=[by_iteration[k] for k in sorted(by_iteration)], validation=validation,
               summary=summary)


def expand_run_paths(paths: list[str | Path]) -> list[Path]:
    """Run folders as given; a folder without config.yaml whose subfolders are runs stands for them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "config.yaml").exists():
            children = sorted(c for c in p.iterdir() if (c / "config.yaml").exists())
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


@dataclass
class RunGroup:
    """Runs of one configuration (seeds)."""

    label: str
    runs: list[Run] = field(default_factory=list)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(iterations, mean, min, max) over the runs that logged `key` at each iteration."""
        per_iter: dict[float, list[float]] = defaultdict(list)
        for run in self.runs:
            for x, y in zip(*run.series(key)):
                per_iter[x].append(y)
        return _aggregate(per_iter)

    def validation_series(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        per_iter: dict[float, list[float]] = defaultdict(list)
        for run in self.runs:
            for x, y in run.validation_points():
                per_iter[float(x)].append(y)
        return _aggregate(per_iter)


def _aggregate(per_iter: dict[float, list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xs = np.array(sorted(per_iter))
    vals = [np.array(per_iter[x]) for x in xs]
    return xs, np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]), np.array([v.max() for v in vals])


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Group seeds of one configuration; label each group by the config keys where groups differ."""
    flat = [{k: v for k, v in _flatten(r.config).items() if k not in SEED_KEYS} for r in runs]
    order: dict[str, RunGroup] = {}
    first_flat: dict[str, dict[str, str]] = {}
    for run, f in zip(runs, flat):
        key = json.dumps(f, sort_keys=True)
        if key not in order:
            order[key] = RunGroup(label="")
            first_flat[key] = f
        order[key].runs.append(run)
    groups = list(order.values())
    configs = list(first_flat.values())
    all_keys = sorted(set().union(*configs)) if configs else []
    differing = [k for k in all_keys if len({c.get(k) for c in configs}) > 1]
    for group, cfg in zip(groups, configs):
        if differing:
            label = ", ".join(f"{k}={_short(cfg.get(k, 'null'))}" for k in differing)
            group.label = label if len(label) <= 60 else label[:57] + "..."
        elif len(group.runs) == 1:
            group.label = group.runs[0].name
        else:
            env, algo = cfg.get("env.name", '""'), cfg.get("algo.name", '""')
            group.label = f"{json.loads(env)} / {json.loads(algo)}"
    return groups


def _short(value_json: str) -> str:
    value = json.loads(value_json)
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Panel:
    """One plot: metrics of `metrics.jsonl` over iterations (several keys get several line styles).

    `spread` names, per key, the metrics holding that quantity's minimum and maximum within an
    iteration (drawn as a band around the mean, e.g. the shortest and longest response); `domain`
    bounds the y axis (fractions: [0, 1], so autoscaling never shows impossible values below 0)."""

    file: str
    title: str
    keys: tuple[tuple[str, str], ...]  # (metric key, line label)
    ylabel: str = ""
    spread: tuple[tuple[str, str, str], ...] = ()  # (metric key, its min key, its max key)
    domain: tuple[float, float] | None = None


FRACTION = (0.0, 1.0)
PANELS = (
    Panel("success_rate", "training success rate", (("rollout/success_rate", "success"),), "fraction of episodes won",
          domain=FRACTION),
    Panel("episode_reward", "episode reward", (("rollout/episode_reward", "reward"),), "reward per episode"),
    Panel("env_score", "task score", (("rollout/env/score", "score"),), "environment score"),
    Panel("invalid_action_rate", "invalid actions", (("rollout/invalid_action_rate", "invalid"),), "fraction of turns",
          domain=FRACTION),
    Panel("response_length", "response length per turn (band: shortest-longest)",
          (("rollout/response_length", "mean"),), "tokens",
          spread=(("rollout/response_length", "rollout/response_length_min", "rollout/response_length_max"),)),
    Panel("clip_ratio", "responses cut at the token limit", (("rollout/clip_ratio", "cut"),), "fraction of turns",
          domain=FRACTION),
    Panel("kl", "KL", (("actor/approx_kl", "to the rollout policy (approx.)"), ("actor/kl", "to the reference policy")),
          "nats per token"),
    Panel("grad_norm", "gradient norm (before clipping)", (("actor/grad_norm", "grad norm"),)),
    Panel("entropy", "policy entropy", (("actor/entropy", "entropy"),), "nats per token"),
    Panel("tti_triggers", "TTI triggers (end of thinking forced)",
          (("rollout/tti_stagnation_triggers", "stagnation"), ("rollout/tti_budget_triggers", "budget")), "triggers"),
    Panel("think_length", "think length", (("rollout/think_length", "mean"), ("rollout/think_length_p90", "p90")),
          "think tokens per turn"),
    Panel("tds_flag_rate", "TDS: flagged turns (of eligible turns)",
          (("rollout/tds_flag_rate", "regenerated"), ("rollout/tds_inband_before", "in band, first samples"),
           ("rollout/tds_inband_after", "in band, kept samples")), "fraction", domain=FRACTION),
    Panel("tds_delta", "|Mbar(k) - Mbar(k-1)| of first samples, TDS threshold",
          (("rollout/tds_delta_p50", "p50"), ("rollout/tds_delta_p10", "p10"), ("rollout/tds_delta_p90", "p90"),
           ("rollout/tds_eta", "relative eta")), "delta"),
    Panel("tds_extra_tokens", "TDS: tokens of discarded samples", (("rollout/tds_extra_token_fraction", "extra"),),
          "fraction of generated tokens", domain=FRACTION),
    Panel("tokens", "tokens per iteration",
          (("rollout/generated_tokens", "generated (incl. TDS discards)"),
           ("rollout/response_tokens", "trained on")), "tokens"),
)
TIME_PHASES = (("time/rollout", "rollout"), ("time/old_logprob", "old log-probs"), ("time/reference", "reference"),
               ("time/advantages", "advantages"), ("time/update", "update"), ("time/validation", "validation"),
               ("time/checkpoint", "checkpoint"), ("time/tracking", "tracking"))
LINE_STYLES = ("-", "--", ":", "-.")
# Curves that coincide (two seeds with equal values, two counters both at 0) must stay visible: each
# later curve is drawn thinner than the previous one, with its own marker, hollow.
MARKERS = ("o", "s", "^", "D", "v", "P")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]


def _draw_line(ax, xs, mean, lo, hi, band: bool, color, style: str, label: str, order: int = 0) -> None:
    """One curve with its min-max band; `order` (0, 1, ...) gives later curves a thinner line and
    another, hollow marker, so that a curve lying on top of an earlier one does not hide it."""
    marker = MARKERS[order % len(MARKERS)] if len(xs) <= 30 else None
    ax.plot(xs, mean, linestyle=style, color=color, label=label, marker=marker, markersize=max(6 - 1.5 * order, 3),
            linewidth=max(2.2 - 0.6 * order, 0.8), markerfacecolor=color if order == 0 else "none")
    if band:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)


def _group_label(group: RunGroup) -> str:
    n = len(group.runs)
    return f"{group.label} ({n} seeds)" if n > 1 else group.label


def draw_panel(ax, panel: Panel, groups: list[RunGroup]) -> bool:
    """Draw one panel into a matplotlib Axes; False if no run logged any of its metrics.

    The band is the within-iteration spread when the panel has one for the key (the smallest minimum
    and the largest maximum over the seeds), else the spread of the mean over seeds."""
    drawn = False
    colors = _colors(len(groups))
    spread = {key: (lo_key, hi_key) for key, lo_key, hi_key in panel.spread}
    order = 0
    for group, color in zip(groups, colors):
        for (key, key_label), style in zip(panel.keys, LINE_STYLES):
            xs, mean, lo, hi = group.series(key)
            if not len(xs):
                continue
            band = len(group.runs) > 1
            if key in spread:
                lo_xs, _, lo, _ = group.series(spread[key][0])  # the smallest minimum over the seeds
                hi_xs, _, _, hi = group.series(spread[key][1])  # the largest maximum
                band = np.array_equal(lo_xs, xs) and np.array_equal(hi_xs, xs)
            parts = [_group_label(group)] if len(groups) > 1 else []
            if len(panel.keys) > 1 or not parts:
                parts.append(key_label)
            _draw_line(ax, xs, mean, lo, hi, band, color, style, ", ".join(parts), order)
            order += 1
            drawn = True
    _decorate(ax, panel.title, panel.ylabel, groups, panel.domain, seed_band=not panel.spread)
    return drawn


def draw_validation(ax, groups: list[RunGroup]) -> bool:
    """Held-out success per validation. One run: the band is the 95 % Wilson interval of a success rate
    measured on `rollout.val_num_tasks` tasks (the noise of the measurement itself); several seeds:
    their min-max."""
    drawn = binomial = False
    for order, (group, color) in enumerate(zip(groups, _colors(len(groups)))):
        xs, mean, lo, hi = group.validation_series()
        tasks = group.runs[0].config.get("rollout", {}).get("val_num_tasks") if len(group.runs) == 1 else None
        if tasks:
            lo, hi = wilson_interval(mean, tasks)
            binomial = True
        if len(xs):
            _draw_line(ax, xs, mean, lo, hi, len(group.runs) > 1 or bool(tasks), color, "-", _group_label(group), order)
            drawn = True
    drawn_refs = set()  # the random mover and the expert on the same held-out tasks (t2po.references), once per figure
    for group in groups:
        refs = (group.runs[0].summary or {}).get("references") or {}
        for key, style, label in (("random", "--", "random mover"), ("expert", ":", "expert")):
            if refs.get(key) and key not in drawn_refs:
                ax.axhline(refs[key]["success"], color="0.4", linestyle=style, linewidth=1.2,
                           label=f"{label} ({refs[key]['success']:.2f})")
                drawn_refs.add(key)
    title = "held-out validation success" + (" (band: 95 % binomial interval)" if binomial else "")
    _decorate(ax, title, "fraction of tasks solved", groups, FRACTION)
    return drawn


def wilson_interval(rate: np.ndarray, n: int, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of success rates `rate` measured on `n` tasks each (95 % for z = 1.96)."""
    rate = np.asarray(rate, dtype=float)
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return np.clip(center - half, 0, 1), np.clip(center + half, 0, 1)


def draw_time_split(ax, groups: list[RunGroup]) -> bool:
    """Seconds per iteration by phase: stacked bars, one bar per configuration (mean over iterations and seeds)."""

    def mean_seconds(group: RunGroup, key: str) -> float:
        _, mean, _, _ = group.series(key)
        return float(np.mean(mean)) if len(mean) else 0.0

    heights = {label: np.array([mean_seconds(g, key) for g in groups]) for key, label in TIME_PHASES}
    total = np.array([mean_seconds(g, "time/iteration") for g in groups])
    heights["other"] = np.maximum(total - sum(heights.values()), 0.0)
    bottoms = np.zeros(len(groups))
    for (label, h), color in zip(heights.items(), _colors(len(heights))):
        if h.any():
            ax.bar(range(len(groups)), h, width=0.6, bottom=bottoms, color=color, label=label)
            bottoms += h
    ax.set_xticks(range(len(groups)), [_group_label(g) for g in groups], rotation=15 if len(groups) > 2
                  else 0, fontsize=8)
    ax.set_xlim(-0.75, len(groups) - 0.25)
    ax.set_title("time per iteration by phase (mean over iterations and seeds)", fontsize=10)
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    if bottoms.any():
        ax.legend(fontsize=8)
    return bool(bottoms.any())


def _decorate(ax, title: str, ylabel: str, groups: list[RunGroup], domain: tuple[float, float] | None = None,
              seed_band: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    if seed_band and any(len(g.runs) > 1 for g in groups):
        title += " (mean over seeds, band min-max)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    x0, x1 = ax.dataLim.intervalx
    if ax.has_data() and x0 == x1:  # a single iteration: give it some room instead of a ±0.04 axis
        ax.set_xlim(x0 - 1, x1 + 1)
    if domain is not None and ax.has_data():  # autoscaling pads past the domain (a rate of 0 gave an axis from -0.05)
        y0, y1 = ax.get_ylim()
        lo, hi = max(y0, domain[0]), min(y1, domain[1])
        ax.set_ylim(lo, hi if hi > lo else lo + 0.05 * (domain[1] - domain[0]))
        for line in ax.lines:
            line.set_clip_on(False)  # markers exactly on the bound stay whole
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 1 or (handles and len(groups) > 1):
        ax.legend(fontsize=8)


def _run_title(fig, groups: list[RunGroup]) -> None:
    """Which runs a figure shows, above its panels: a PNG passed around on its own still says it."""
    runs = [run for g in groups for run in g.runs]
    first = runs[0].config
    what = f"{first.get('env', {}).get('name', '?')} / {first.get('algo', {}).get('name', '?')}"
    names = ", ".join(run.name for run in runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    fig.suptitle(f"{what}: {names}" if len(runs) == 1 else f"{len(runs)} runs: {names}", fontsize=9, color="0.3")


def _figure(width: float = 7.0, height: float = 4.0):
    # a bare Figure renders with Agg on savefig: no pyplot, no global backend, no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    # the top margin holds the run title (`_run_title`) above the panel's own
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.6 / height,
                        wspace=0.25, hspace=0.45)
    return fig


def write_plots(groups: list[RunGroup], out: Path) -> list[tuple[str, str]]:
    """One PNG per panel plus overview.png. Returns (file name, title) of the plots written."""
    drawers = [(p.file, p.title, lambda ax, p=p: draw_panel(ax, p, groups)) for p in PANELS]
    drawers.append(("validation_success", "held-out validation success", lambda ax: draw_validation(ax, groups)))
    drawers.append(("time_split", "time per iteration by phase", lambda ax: draw_time_split(ax, groups)))
    written = []
    for name, title, draw in drawers:
        fig = _figure()
        if draw(fig.add_subplot()):
            _run_title(fig, groups)
            fig.savefig(out / f"{name}.png")
            written.append((name, title))
    if written:
        cols = 3
        rows = -(-len(written) // cols)
        fig = _figure(6.0 * cols, 3.6 * rows)
        by_name = {name: draw for name, _, draw in drawers}
        for k, (name, _) in enumerate(written):
            by_name[name](fig.add_subplot(rows, cols, k + 1))
        _run_title(fig, groups)
        fig.savefig(out / "overview.png")
    return written


# ---------------------------------------------------------------------------------------- tables


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def run_row(run: Run) -> dict:
    """The numbers of one run that the tables show."""
    xs, ys = run.series("rollout/success_rate")
    best = int(np.argmax(ys)) if len(ys) else None
    val = lambda tag: run.validation[tag]["success_rate"] if tag in run.validation else None  # noqa: E731
    _, it_seconds = run.series("time/iteration")
    _, tokens = run.series("rollout/generated_tokens")
    iterations = int(run.config.get("trainer", {}).get("iterations", 0))
    done = int(xs[-1]) if len(xs) else 0
    return {
        "status": "finished" if run.summary else f"stopped at {done}/{iterations}",
        "iterations": done,
        "train_final": float(ys[-1]) if len(ys) else None,
        "train_best": float(ys[best]) if best is not None else None,
        "train_best_at": int(xs[best]) if best is not None else None,
        "val_before": val("before"),
        "val_after_warmup": val("after_warmup"),
        "val_final": val("final"),
        "tokens": float(tokens.sum()) if len(tokens) else None,
        "rl_seconds": float(it_seconds.sum()) if len(it_seconds) else None,
        "wall_seconds": float(run.summary["seconds"]) if run.summary and "seconds" in run.summary else None,
    }


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"


#: (metric, column title, digits) of the exploration-control table: what TTI and TDS did (docs/method.md §2-§3)
EXPLORATION_COLUMNS = (
    ("rollout/tti_stagnation_triggers", "TTI stagnation triggers", 1),
    ("rollout/tti_budget_triggers", "TTI budget triggers", 1),
    ("rollout/tti_random_triggers", "random truncations (control)", 1),
    ("rollout/forced_tokens", "forced tokens", 1),
    ("rollout/think_length", "think length", 1),
    ("rollout/think_length_p90", "think p90", 1),
    ("rollout/tds_flag_rate", "TDS flag rate (eligible)", 3),
    ("rollout/tds_inband_before", "in band before TDS (eligible)", 3),
    ("rollout/tds_inband_after", "in band after TDS (kept)", 3),
    ("rollout/tds_kept_delta_mean", "delta of kept samples (regenerated turns)", 3),
    ("rollout/tds_discarded_delta_mean", "delta of discarded samples", 3),
    ("rollout/tds_delta_p10", "delta p10", 3),
    ("rollout/tds_delta_p50", "delta p50", 3),
    ("rollout/tds_delta_p90", "delta p90", 3),
    ("rollout/tds_extra_token_fraction", "TDS extra tokens", 3),
)


def exploration_markdown(groups: list[RunGroup]) -> list[str]:
    """Per configuration, each exploration-control metric per iteration as min / mean / max over the
    iterations of all its seeds ("–" where no run logged it)."""
    lines = ["", "## Exploration control (per iteration: mean [min, max] over iterations and seeds)", "",
             "| configuration | " + " | ".join(title for _, title, _ in EXPLORATION_COLUMNS) + " |",
             "|---|" + "---|" * len(EXPLORATION_COLUMNS)]
    for group in groups:
        cells = []
        for key, _, digits in EXPLORATION_COLUMNS:
            values = np.concatenate([run.series(key)[1] for run in group.runs]) if group.runs else np.array([])
            cells.append("–" if not values.size
                         else f"{values.mean():.{digits}f} [{values.min():.{digits}f}, {values.max():.{digits}f}]")
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(groups: list[RunGroup], plots: list[tuple[str, str]]) -> str:
    val_tasks = {g.runs[0].config.get("rollout", {}).get("val_num_tasks") for g in groups}
    lines = ["# t2po report", "", f"{sum(len(g.runs) for g in groups)} run(s) in {len(groups)} configuration(s). "
             f"Success rates are fractions of episodes won; validation uses held-out tasks "
             f"({', '.join(str(v) for v in sorted(v for v in val_tasks if v is not None))} per run). "
             "Training success is that of the iteration's sampled rollouts (exploration on).", ""]
    lines += ["## Runs", "",
              "| run | configuration | seed | status | train success final | train success best (iter) | val before | "
              "val after warm-up | val final | generated tokens | RL min | wall min |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        for run in group.runs:
            r = run_row(run)
            best = "–" if r["train_best"] is None else f"{r['train_best']:.3f} ({r['train_best_at']})"
            lines.append(f"| {run.name} | {group.label} | {run.seed} | {r['status']} | {_fmt(r['train_final'])} | "
                         f"{best} | {_fmt(r['val_before'])} | {_fmt(r['val_after_warmup'])} | {_fmt(r['val_final'])} | "
                         f"{_fmt(r['tokens'], 0)} | {_minutes(r['rl_seconds'])} | {_minutes(r['wall_seconds'])} |")
    refs = {(k, v["success"], v["method"]) for g in groups for r in g.runs
            for k, v in ((r.summary or {}).get("references") or {}).items() if v}
    if refs:
        lines += ["", "Reference points on the same held-out tasks: " + "; ".join(
            f"{'random mover' if k == 'random' else 'expert'} {p:.3f} ({m})" for k, p, m in sorted(refs)) + "."]
    corpora = [(run.name, run.corpus) for group in groups for run in group.runs if run.corpus]
    if corpora:
        lines += ["", "Search corpus: " + "; ".join(f"{name}: `{corpus}`" for name, corpus in corpora) + "."]
    lines += ["", "## Configurations (mean ± std over seeds)", "",
              "| configuration | seeds | val final | val after warm-up | val before | train success final | RL min |",
              "|---|---|---|---|---|---|---|"]
    for group in groups:
        rows = [run_row(r) for r in group.runs]
        col = lambda key: [r[key] for r in rows if r[key] is not None]  # noqa: E731
        rl = col("rl_seconds")
        lines.append(f"| {group.label} | {len(group.runs)} | {_mean_std(col('val_final'))} | "
                     f"{_mean_std(col('val_after_warmup'))} | {_mean_std(col('val_before'))} | "
                     f"{_mean_std(col('train_final'))} | {_minutes(float(np.mean(rl)) if rl else None)} |")
    lines += exploration_markdown(groups)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({name}.png)" for name, title in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- entry points


def write_report(run_paths: list[str | Path], out: str | Path | None = None) -> Path:
    """Plots and `report.md` for the given run folders; returns the output folder."""
    runs = [load_run(p) for p in expand_run_paths(run_paths)]
    if not runs:
        raise InvalidInput("no run folders given; pass one or more folders that `t2po train` created")
    out = Path(out) if out is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    # drop plots of an earlier report that this one may not redraw (only our own file names)
    for name in [p.file for p in PANELS] + ["validation_success", "time_split", "overview"]:
        (out / f"{name}.png").unlink(missing_ok=True)
    groups = group_runs(runs)
    plots = write_plots(groups, out)
    (out / "report.md").write_text(summary_markdown(groups, plots))
    return out


def export_to_mlflow(run_paths: list[str | Path], out: str | Path) -> str:
    """Copy runs (config, metrics, validation, summary) into one MLflow store `<out>/mlflow.db`,
    replacing the runs an earlier export left there. Returns the `mlflow ui` command that shows them."""
    from mlflow import MlflowClient

    from t2po.tracking import (MLFLOW_ARTIFACTS, MLFLOW_EXPERIMENT, MLFLOW_STORE, MlflowTracker, mlflow_store_uri,
                               mlflow_ui_command, validation_step)

    out = Path(out)
    if (out / MLFLOW_STORE).exists():
        # delete through MLflow, not by removing the file: MLflow keeps stores open per URI within a process
        client = MlflowClient(tracking_uri=mlflow_store_uri(out))
        experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        for old in client.search_runs([experiment.experiment_id], max_results=10_000) if experiment else []:
            client.delete_run(old.info.run_id)
            shutil.rmtree(out / MLFLOW_ARTIFACTS / old.info.run_id, ignore_errors=True)
    for path in expand_run_paths(run_paths):
        run = load_run(path)
        tracker = MlflowTracker(run.path, run.config, store_dir=out)
        for row in run.metrics:
            tracker.log_metrics(row, step=int(row["iteration"]))
        iterations = int(run.config.get("trainer", {}).get("iterations", 0))
        for tag, stats in run.validation.items():
            tracker.log_metrics({f"val/{k}": v for k, v in stats.items()}, step=validation_step(tag, iterations))
        for name in ("validation.jsonl", "summary.json"):
            if (run.path / name).exists():
                tracker.log_artifact(run.path / name)
        tracker.close()
    return mlflow_ui_command(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2po report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or a folder of run folders)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <first run>/report)")
    parser.add_argument("--mlflow", action="store_true",
                        help="also copy the runs into one MLflow store in the output folder")
    ns = parser.parse_args(argv)
    try:
        if ns.out is not None:  # the path rule (t2po/paths.py); an earlier report (its report.md) is redrawn
            new_folder(ns.out, "--out", own_marker="report.md")
        out = write_report(ns.runs, ns.out)
        ui = export_to_mlflow(ns.runs, out) if ns.mlflow else None
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"t2po report: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"report: {out}/report.md ({len(list(out.glob('*.png')))} plots)")
    if ui:
        print(f"MLflow, all runs in one store: {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
