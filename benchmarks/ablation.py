"""A seeded ablation on the main job's setting: T2PO as the paper sets it (t2po/configs/t2po-paper.yaml), T2PO with the
calibrated relative options, GiGPO, GRPO, and the two controls of issue 27 (random truncation, random
resampling), several seeds each (issue 18).

    python benchmarks/ablation.py                                   # 6 arms x seeds 0 1 2, t2po/configs/default.yaml
    python benchmarks/ablation.py --arms gigpo grpo --seeds 3 4     # a subset (or more seeds)
    python benchmarks/ablation.py --set trainer.iterations=2        # dotted overrides for every run
    python benchmarks/ablation.py --plan --seeds 0 1 2 3 4 5 6 7    # the power of this design, nothing run

- Per seed the main job's warm-up (SFT on expert demonstrations) runs once, in `<out>/warmup-seed<s>`;
  every arm of that seed starts from that model in its own run folder `<out>/<arm>-seed<s>`, as a
  `t2po train` run that had done this warm-up itself: it validates the warmed-up model (the "before
  RL" numbers, with the arm's own TTI setting), trains, validates again.
- Resumable: a finished run (its `summary.json`) is skipped; a killed one resumes from its last
  checkpoint; a finished warm-up is reused. Arms differ from the preset only by `ARMS` below.
- Writes `--json` (default `<out>/ablation.json`; rewritten after every finished run): the commit (and whether the
  worktree had changes), the machine, the power plan of the design (`benchmarks/power.py`), and a `runs` list, one
  entry per (arm, seed) run found finished in `<out>`: its resolved config, every validation with its per-room
  outcomes (`per_task_success`, so runs can be re-paired), the learning curve, held-out success and valid-action
  rate before and after RL, per-iteration success / invalid-action rate / KL / gradient norm / TTI and TDS
  diagnostics, tokens generated, wall time, the commit it ran at and the load average around it. Per arm (`arms`)
  the mean, min and max over its seeds, also printed as a Markdown table; per arm (`comparison`) the paired
  difference with GiGPO: per seed, its mean with a 95 % t-interval over seeds, and a per-room interval pooled over
  seeds. Then `t2po report` of the arm runs into `<out>/report/` (seeds of one arm as a mean with a min-max band).
Nothing here asserts or picks a winner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # power.py and learning.py beside this file
import power  # noqa: E402
from learning import t_interval  # noqa: E402
from t2po.config import load_config  # noqa: E402
from t2po.checkpoints import WARMUP_MODEL, atomic_write_text  # noqa: E402
from t2po.trainer.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "gigpo"  # every arm is compared with it, paired by seed and room (issue 27, item 7)
RUN_INFO = "ablation_run.json"  # per run folder: the commit it ran at, its wall time, the load average around it


def preset_overrides(name: str) -> list[str]:
    """A preset that extends `default` as dotted overrides of it (its `base:` line dropped)."""
    from t2po.config import configs_dir

    data = yaml.safe_load((configs_dir() / f"{name}.yaml").read_text())
    data.pop("base", None)

    def flatten(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict) and key not in ("options", "val_options"):
                out += flatten(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={json.dumps(value)}")
        return out

    return flatten(data, "")


# Dotted overrides of the preset per arm. "t2po-paper" is t2po/configs/t2po-paper.yaml (every exploration value of the
# reference's scripts: eps 1e-4 over K = 20 tokens, eta 0.3, max_try 2, budget 450;
# tests/training/test_paper_preset.py);
# "t2po-calibrated" is the preset as it stands (t2po/configs/default.yaml: its relative TDS threshold).
ARMS: dict[str, list[str]] = {
    "t2po-paper": preset_overrides("t2po-paper"),
    "t2po-calibrated": ["algo.name=t2po"],
    "gigpo": ["algo.name=gigpo"],
    "grpo": ["algo.name=grpo"],
    # the controls of issue 27: the preset's T2PO with one mechanism's choice made at random at the same rate.
    # Random truncation ends thinking at random think tokens at TTI's rate (stagnation triggers per think token
    # of the same seed's t2po-calibrated run, or --random-rate); random resampling redraws as many eligible
    # turns as TDS's rule flags, chosen at random.
    "random-truncation": ["algo.name=t2po", "rollout.tti.control=random"],
    "random-resampling": ["algo.name=t2po", "rollout.tds.control=random"],
}
RATE_SOURCE = "t2po-calibrated"  # the arm whose TTI rate the random-truncation control copies
# per-iteration metrics kept in the JSON (metrics.jsonl key -> JSON name)
ITERATION_KEYS = {
    "rollout/success_rate": "success_rate", "rollout/invalid_action_rate": "invalid_action_rate",
    "actor/approx_kl": "approx_kl", "actor/kl": "kl_to_reference", "actor/grad_norm": "grad_norm",
    "rollout/generated_tokens": "generated_tokens", "rollout/tti_stagnation_triggers": "tti_stagnation_triggers",
    "rollout/tti_budget_triggers": "tti_budget_triggers", "rollout/forced_tokens": "forced_tokens",
    "rollout/think_length": "think_length", "rollout/tds_flag_rate": "tds_flag_rate",
    "rollout/tds_inband_before": "tds_inband_before", "rollout/tds_inband_after": "tds_inband_after",
    "rollout/tds_kept_delta_mean": "tds_kept_delta_mean",
    "rollout/tds_discarded_delta_mean": "tds_discarded_delta_mean",
    "rollout/tti_random_triggers": "tti_random_triggers", "rollout/tds_delta_p50": "tds_delta_p50",
    "rollout/tds_extra_token_fraction": "tds_extra_token_fraction", "time/iteration": "seconds",
}


def tti_rate(run_dir: Path) -> float:
    """TTI's stagnation triggers per think token over a finished run (metrics.jsonl)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    triggers = sum(m.get("rollout/tti_stagnation_triggers", 0.0) for m in metrics)
    think_tokens = sum(m.get("rollout/think_length", 0.0) * m.get("rollout/steps", 0.0) for m in metrics)
    return triggers / think_tokens if think_tokens else 0.0


def arm_overrides(arm: str, seed: int, out: Path, random_rate: float | None) -> list[str]:
    """ARMS[arm], with the random-truncation control's rate filled in (--random-rate, or the rate of the
    same seed's t2po-calibrated run)."""
    if arm != "random-truncation":
        return ARMS[arm]
    if random_rate is None:
        source = out / f"{RATE_SOURCE}-seed{seed}"
        if not (source / "summary.json").exists():
            raise SystemExit(f"the random-truncation arm copies TTI's rate from {source}, which has not finished: "
                             f"run the {RATE_SOURCE} arm of seed {seed} first (list it before random-truncation in "
                             "--arms) or give --random-rate")
        random_rate = tti_rate(source)
        if random_rate <= 0:
            raise SystemExit(f"{source} never triggered TTI's stagnation rule: there is no rate to copy; "
                             "give --random-rate")
    return [*ARMS[arm], f"rollout.tti.random_rate={random_rate:.6g}"]


def _log(msg: str) -> None:
    print(f"[ablation] {msg}", flush=True)


def run_warmup(preset: str, common: list[str], seed: int, folder: Path) -> dict:
    """The preset's warm-up for one seed (reused when done); returns its run state."""
    state_path = folder / "run_state.json"
    if state_path.exists() and json.loads(state_path.read_text()).get("warmup_done"):
        return json.loads(state_path.read_text())
    cfg = load_config(preset, [*common, f"trainer.seed={seed}"])
    if cfg.warmup.episodes <= 0:
        raise SystemExit(f"the {preset} preset has no warm-up (warmup.episodes=0): there is nothing to share between "
                         "arms")
    _log(f"seed {seed}: warm-up into {folder}")
    trainer = Trainer(cfg, run_dir=folder, resume=folder.exists())
    try:
        trainer.setup()
        trainer.warmup()
    finally:
        trainer.cleanup()
    return json.loads(state_path.read_text())


def run_arm(preset: str, common: list[str], arm: str, seed: int, out: Path, warm_folder: Path, warm_state: dict,
            random_rate: float | None = None) -> None:
    """One arm of one seed from the seed's warm-up model: validate, train, validate (resumes a killed run)."""
    run_dir = out / f"{arm}-seed{seed}"
    cfg = load_config(preset, [*common, *arm_overrides(arm, seed, out, random_rate), f"trainer.seed={seed}",
                               f"trainer.output_dir={out}", f"trainer.run_name={run_dir.name}"])
    if not (run_dir / "run_state.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        link = run_dir / WARMUP_MODEL
        if not link.exists():
            link.symlink_to(os.path.relpath(warm_folder / WARMUP_MODEL, run_dir), target_is_directory=True)
        # the state a `t2po train` run has after its own warm-up (the Trainer then starts RL from warmup_model)
        atomic_write_text(run_dir / "run_state.json",
                json.dumps({"warmup_done": True, "validation": {}, "warmup": warm_state.get("warmup")}, indent=1))
    _log(f"{run_dir.name}: training")
    load_before, start = os.getloadavg(), time.time()
    trainer = Trainer(cfg, run_dir=run_dir, resume=True)
    try:
        trainer.setup()
        if "after_warmup" not in trainer.run_state["validation"]:
            trainer.validate("after_warmup")
        trainer.train()
    finally:
        trainer.cleanup()
    sessions = json.loads((run_dir / RUN_INFO).read_text())["sessions"] if (run_dir / RUN_INFO).exists() else []
    sessions.append({**commit(), "wall_seconds": time.time() - start, "load_average_before": load_before,
                     "load_average_after": os.getloadavg()})  # a resumed run has one entry per session
    atomic_write_text(run_dir / RUN_INFO, json.dumps({"sessions": sessions}, indent=1))


def commit() -> dict:
    """The checkout's commit and whether tracked files differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _validation(state: dict, tag: str) -> dict | None:
    v = state["validation"].get(tag)
    if v is None:
        return None
    out = {"success_rate": v["success_rate"], "valid_action_rate": 1 - v["invalid_action_rate"],
           "episode_reward": v["episode_reward"]}
    if "tti_on/success_rate" in v:  # the same model decoded with its TTI (trainer.val_tti=both)
        out.update({"tti_on_success_rate": v["tti_on/success_rate"],
                    "tti_on_valid_action_rate": 1 - v["tti_on/invalid_action_rate"]})
    return out


VALIDATION_KEYS = ("success_rate", "success_stderr", "invalid_action_rate", "episode_reward", "episode_length",
                   "per_task_success", "tti_on/success_rate", "tti_on/invalid_action_rate", "seconds")


def run_entry(run_dir: Path, arm: str, seed: int, warm_state: dict) -> dict:
    """The JSON entry of one finished run, read back from its folder."""
    state = json.loads((run_dir / "run_state.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).exists() else {"sessions": []}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    iterations = [{"iteration": m["iteration"], **{name: m[key] for key, name in ITERATION_KEYS.items() if key in m}}
                  for m in metrics]
    total = lambda name: float(sum(it.get(name, 0.0) for it in iterations))  # noqa: E731
    flag_rates = [it["tds_flag_rate"] for it in iterations if "tds_flag_rate" in it]

    def mean_of(name: str) -> float | None:
        values = [it[name] for it in iterations if it.get(name) is not None]
        return sum(values) / len(values) if values else None
    warmup_seconds = (warm_state.get("warmup") or {}).get("seconds")
    return {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "overrides": ARMS[arm],
        "random_rate": state_rate(run_dir),
        "before_rl": _validation(state, "after_warmup"),
        "after_rl": _validation(state, "final"),
        "iterations": iterations,
        "generated_tokens": total("generated_tokens"),
        "tti_triggers": {"stagnation": total("tti_stagnation_triggers"), "budget": total("tti_budget_triggers"),
                         "random": total("tti_random_triggers")},
        "tds_flag_rate_mean": sum(flag_rates) / len(flag_rates) if flag_rates else 0.0,
        # what TDS changes (issue 27, item 3): the in-band share of kept eligible turns before and after resampling,
        # |delta Mbar| of kept vs discarded samples, the extra tokens; and what TTI forced
        "tds": {name: mean_of(name) for name in ("tds_inband_before", "tds_inband_after", "tds_kept_delta_mean",
                                                 "tds_discarded_delta_mean", "tds_extra_token_fraction")},
        "forced_tokens": total("forced_tokens"),
        # this arm's own validations and RL iterations by t2po's clock (summary.json `seconds` counts the warm-up the
        # run state holds too, which the arms of a seed share); the command's wall time per session is in `sessions`
        "wall_seconds": summary["seconds"] - (warmup_seconds or 0.0),
        "warmup_seconds": warmup_seconds,  # shared by the arms of the seed
        # every validation with its per-room outcomes (the rooms are the same in every run: seeds 0..R-1 of the split)
        "validations": [{"tag": tag, **{k: v[k] for k in VALIDATION_KEYS if k in v}}
                        for tag, v in state["validation"].items()],
        "learning_curve": summary["validation_curve"],  # held-out success at each validation, by iteration
        "sessions": info["sessions"],  # per session: commit, dirty, wall seconds, load average before and after
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),  # the resolved config the run trained with
    }


def state_rate(run_dir: Path) -> float | None:
    """The random-truncation rate a run used (its config.yaml), None for the other arms."""
    tti = yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["tti"]
    return tti.get("random_rate") if tti.get("control") == "random" else None


def arm_summary(runs: list[dict]) -> dict:
    """Per arm over its seeds: mean, min and max of the held-out figures and the exploration cost."""
    def stat(values: list) -> dict | None:
        values = [float(v) for v in values if v is not None]
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else None

    summary = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        held_out = lambda when, key: stat([(r[when] or {}).get(key) for r in rs])  # noqa: E731
        summary[arm] = {
            "seeds": [r["seed"] for r in rs],
            "held_out_success_before_rl": held_out("before_rl", "success_rate"),
            "held_out_success_after_rl": held_out("after_rl", "success_rate"),
            "held_out_valid_actions_before_rl": held_out("before_rl", "valid_action_rate"),
            "held_out_valid_actions_after_rl": held_out("after_rl", "valid_action_rate"),
            "held_out_success_after_rl_tti_on": held_out("after_rl", "tti_on_success_rate"),
            "training_success_last_iteration": stat([r["iterations"][-1].get("success_rate") for r in rs
                                                     if r["iterations"]]),
            "generated_tokens": stat([r["generated_tokens"] for r in rs]),
            "tds_flag_rate_mean": stat([r["tds_flag_rate_mean"] for r in rs]),
            "tti_stagnation_triggers": stat([r["tti_triggers"]["stagnation"] for r in rs]),
            "tti_budget_triggers": stat([r["tti_triggers"]["budget"] for r in rs]),
        }
    return summary


def comparison(runs: list[dict]) -> dict:
    """Per arm other than GiGPO: (arm - gigpo) in held-out success after RL, paired by seed (same warm-up, same
    rooms): the per-seed differences, their mean with a 95 % t-interval over seeds (the interval the power plan is
    about), and a 95 % interval over the per-room differences pooled over those seeds. The per-room interval holds
    the trained policies fixed (it leaves out the seed-to-seed spread of training), so it is narrower and answers a
    narrower question: did these runs differ on these rooms."""
    final = {(r["arm"], r["seed"]): r for r in runs if r["after_rl"] is not None}
    out = {}
    for arm in dict.fromkeys(a for a, _ in final if a != BASELINE):
        seeds = sorted(s for a, s in final if a == arm and (BASELINE, s) in final)
        if not seeds:
            continue
        per_seed = {s: final[(arm, s)]["after_rl"]["success_rate"] - final[(BASELINE, s)]["after_rl"]["success_rate"]
                    for s in seeds}
        rooms = []
        for s in seeds:
            mine, base = power.final_rooms(final[(arm, s)]), power.final_rooms(final[(BASELINE, s)])
            if mine is not None and base is not None:
                rooms += [a - b for a, b in zip(mine, base, strict=True)]
        out[arm] = {"minus": BASELINE, "seeds": seeds, "per_seed": {str(s): d for s, d in per_seed.items()},
                    "paired_by_seed": t_interval(list(per_seed.values())),
                    "paired_by_room": t_interval(rooms) if rooms else None}
    return out


def markdown_table(summary: dict) -> str:
    """The per-arm summary as a Markdown table (mean over seeds, [min, max])."""
    def cell(s: dict | None, digits: int = 3) -> str:
        return "-" if s is None else f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"

    lines = ["| arm | seeds | held-out success before RL (TTI off) | after RL (TTI off) | after RL (TTI on) | valid "
             "actions after RL | tokens generated (RL) | TDS flag rate | TTI stagnation / budget triggers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in summary.items():
        tti = f"{a['tti_stagnation_triggers']['mean']:.0f} / {a['tti_budget_triggers']['mean']:.0f}"
        lines.append(f"| {arm} | {len(a['seeds'])} | {cell(a['held_out_success_before_rl'])} | "
                     f"{cell(a['held_out_success_after_rl'])} | {cell(a['held_out_success_after_rl_tti_on'])} | "
                     f"{cell(a['held_out_valid_actions_after_rl'])} | {a['generated_tokens']['mean']:,.0f} | "
                     f"{cell(a['tds_flag_rate_mean'], 2)} | {tti} |")
    return "\n".join(lines)


def write_json(path: Path, out: Path, preset: str, common: list[str], argv: list[str]) -> list[dict]:
    """Every finished (arm, seed) run in `out`, as one JSON file."""
    runs = []
    for arm in ARMS:
        for run_dir in sorted(out.glob(f"{arm}-seed*")):
            seed = int(run_dir.name.rsplit("seed", 1)[1])
            if (run_dir / "summary.json").exists():
                warm = out / f"warmup-seed{seed}" / "run_state.json"
                runs.append(run_entry(run_dir, arm, seed, json.loads(warm.read_text()) if warm.exists() else {}))
    seeds = sorted({r["seed"] for r in runs})
    rooms = runs[0]["config"]["rollout"]["val_num_tasks"] if runs else load_config(preset, common).rollout.val_num_tasks
    doc = {"setting": {"preset": preset, "overrides": common, "arms": ARMS,
                       "command": "python benchmarks/ablation.py " + " ".join(argv)},
           **commit(), "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "plan": power.plan(power.estimates(), design=(max(len(seeds), 2), rooms)),
           "arms": arm_summary(runs), "comparison": comparison(runs), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1))
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default",
                        help="the setting (default: the main job, t2po/configs/default.yaml)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides for every run (warm-up included)")
    parser.add_argument("--out", default="bench_results/ablation", help="folder of the warm-ups and run folders")
    parser.add_argument("--json", default=None, help="the JSON written (default: <out>/ablation.json)")
    parser.add_argument("--no-report", action="store_true", help="skip the `t2po report` comparison")
    parser.add_argument("--plan", action="store_true",
                        help="print the power of this design (--seeds, the preset's held-out rooms) for a 0.10 "
                             "difference with GiGPO, from the committed results (benchmarks/power.py); run nothing")
    parser.add_argument("--random-rate", type=float, default=None,
                        help="the random-truncation control's per-think-token rate "
                             "(default: TTI's rate in the same seed's t2po-calibrated run)")
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(ns.out)
    # one decoder for every arm (TTI off), and the T2PO arms also with their TTI (issue 27)
    common = ["trainer.trackers=[console]", "trainer.report=false", "trainer.val_tti=both", *ns.set]
    if ns.plan:
        rooms = load_config(ns.preset, common).rollout.val_num_tasks
        if len(ns.seeds) < 2:
            raise SystemExit("--plan: a paired t-test over seeds needs at least 2 seeds (--seeds)")
        print(power.format_plan(power.plan(power.estimates(), design=(len(ns.seeds), rooms))), flush=True)
        return 0
    for arm in ns.arms:  # every configuration checked before any work (the control's rate as a stand-in)
        stand_in = ["rollout.tti.random_rate=0.05"] if arm == "random-truncation" else []
        load_config(ns.preset, [*common, *ARMS[arm], *stand_in])
    t0 = time.time()
    json_path = Path(ns.json) if ns.json else out / "ablation.json"
    for seed in ns.seeds:
        warm_folder = out / f"warmup-seed{seed}"
        warm_state = None
        for arm in ns.arms:
            if (out / f"{arm}-seed{seed}" / "summary.json").exists():
                _log(f"{arm}-seed{seed}: finished, skipped")
                continue
            warm_state = warm_state or run_warmup(ns.preset, common, seed, warm_folder)
            run_arm(ns.preset, common, arm, seed, out, warm_folder, warm_state, ns.random_rate)
            write_json(json_path, out, ns.preset, common, argv)  # after every run: a stopped study keeps its results
    runs = write_json(json_path, out, ns.preset, common, argv)
    _log(f"{len(runs)} finished runs in {json_path} ({(time.time() - t0) / 60:.1f} min this call)")
    if runs:
        print(markdown_table(arm_summary(runs)), flush=True)
    if not ns.no_report and runs:
        from t2po.report import write_report

        report = write_report([r["run_dir"] for r in runs], out / "report")
        _log(f"comparison: {report}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
