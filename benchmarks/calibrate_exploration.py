"""Do TTI and TDS act at the main job's setting? Exploration diagnostics of candidate settings, cheaply.

Runs the main job's warm-up once (t2po/configs/default.yaml: 16 expert episodes, 3 epochs; ~1 min), then
collects training rollouts at the main job's setting (8 tasks x 4, Sokoban, 40 response tokens) with
each candidate's TTI / TDS settings, `--batches` batches per candidate (one per "iteration", the
relative TDS threshold carried across them as in training), and prints what the mechanisms did:
TTI triggers by kind, think length, the TDS flag rate over eligible turns, the flag rate of the
regenerated samples, |delta Mbar| percentiles and the extra tokens. No training step: the policy is
the warmed-up one throughout (what the first RL iteration sees).

    python benchmarks/calibrate_exploration.py --out bench_results/calibrate.json \\
        --candidate paper: \\
        --candidate q30-b28:rollout.tds.quantile=0.3,rollout.tti.budget=28

A candidate is `name:` followed by comma-separated dotted overrides of the main job's config; the
warm-up is kept in `--run-dir` and reused by later invocations.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np

from t2po.algos.sampling import TDSQuantileThreshold, TDSResampler
from t2po.config import load_config
from t2po.envs import make_env
from t2po.policies import EnginePolicy
from t2po.rollout import RolloutSettings, collect_rollouts
from t2po.trainer.trainer import Trainer

PAPER_ETA = 0.3  # docs/method.md §3
SHOWN = ("tti_stagnation_triggers", "tti_budget_triggers", "forced_tokens", "think_length", "think_length_p90",
         "tds_flag_rate",
         "tds_inband_before", "tds_inband_after", "tds_kept_delta_mean", "tds_discarded_delta_mean", "tds_delta_p10",
         "tds_delta_p50", "tds_delta_p90", "tds_extra_token_fraction", "success_rate",
         "invalid_action_rate", "generated_tokens")


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--candidate {text!r}: write NAME:KEY=VALUE,KEY=VALUE (or NAME: for the preset as it is)")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", required=True,
                        help="NAME:KEY=VALUE,... (dotted config overrides)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batches", type=int, default=3, help="rollout batches per candidate")
    parser.add_argument("--run-dir", default="bench_results/calibrate_warmup",
                        help="where the warm-up is kept (reused)")
    parser.add_argument("--out", default="bench_results/calibrate_exploration.json")
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    candidates = [parse_candidate(c) for c in ns.candidate]
    # every config checked before any work
    configs = {name: load_config(ns.preset, overrides) for name, overrides in candidates}

    base = load_config(ns.preset, ["trainer.trackers=[]", "trainer.report=false"])
    trainer = Trainer(base, run_dir=ns.run_dir, resume=Path(ns.run_dir, "run_state.json").exists(), quiet=False)
    trainer.setup()
    if not trainer.run_state.get("warmup_done"):
        trainer.warmup()
    results = {}
    try:
        for name, cfg in configs.items():
            # e.g. another response_format
            env = trainer.train_env if cfg.env == base.env else make_env(cfg.env.name, **cfg.env.options)
            r = cfg.resolved_rollout()  # the candidate's rollout settings; the model stays the warmed-up one
            threshold = TDSQuantileThreshold(r.tds.quantile,
                                             r.tds.window) if r.tds.enabled and r.tds.quantile is not None else None
            batches = []
            for k in range(ns.batches):
                t0 = time.time()
                result = collect_rollouts(EnginePolicy(trainer.engine, r.sampling, r.tti), env, trainer.task_seeds(k),
                                          RolloutSettings(r.group_size, r.max_turns, r.invalid_action_penalty,
                                                          r.max_prompt_tokens),
                                          seed=cfg.trainer.seed * 7_777 + k, resampler=TDSResampler(r.tds, threshold)
                                          if r.tds.enabled else None)
                stats = {key: result.stats[key] for key in SHOWN if key in result.stats}
                # what the paper's absolute eta would flag among the same first samples
                deltas = np.array([x.tds_delta for x in result.traces if np.isfinite(x.tds_delta)])
                stats["flag_rate_at_eta_0.3"] = float(np.mean((deltas > 0) & (deltas
                                                                              < PAPER_ETA))) if deltas.size else 0.0
                stats["seconds"] = time.time() - t0
                reasons = collections.Counter(t.invalid_reason
                                              for s, t in zip(result.samples, result.traces) if not s.valid)
                stats["invalid_reasons"] = dict(reasons.most_common())
                if threshold is not None:
                    stats["tds_eta"] = threshold.eta()
                batches.append(stats)
                print(f"{name} batch {k + 1}: "
                      + "  ".join(f"{key} {value:.3g}" if isinstance(value, float | int) else f"{key} {value}"
                                                           for key, value in stats.items()), flush=True)
            results[name] = {"overrides": dict(candidates)[name], "batches": batches}
            if env is not trainer.train_env:
                env.close()
    finally:
        trainer.cleanup()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
