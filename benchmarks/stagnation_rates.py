"""How often does each TTI stagnation rule fire on real think spans? (issue 27)

Samples think spans from a model at the main job's setting (configs/default.yaml: Sokoban prompts, the
training temperature; the response starts inside a `<think>` span, so even the untouched model thinks),
records M_t of every token with TTI off (monitoring only), cuts each response at its `</think>`, and
replays each span's M_t through both rules offline (`t2po.algos.intervention.ThinkingIntervention`):

- the relative rule of the preset (eps_floor, patience from the config; default 0.3 x the row's noise floor,
  K = 4), and
- the paper's rule (|M_t - M_{t-1}| <= 1e-4 for K = 20 tokens).

It prints and writes (JSON) the share of spans each rule ends, and the relative rule's rate split by
whether the paper's rule also judged the span stagnant, plus the shares of think tokens within 1e-4 of
the previous one.

    python benchmarks/stagnation_rates.py                                # embedded SmolLM2-135M, 64 spans
    python benchmarks/stagnation_rates.py --model runs/<run>/warmup_model --spans 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def replay(spans: list[list[float]], **rule) -> list[bool]:
    """Per span (M_t of its think tokens): does the rule force the end of thinking?"""
    from t2po.algos.intervention import ThinkingIntervention

    start, end_a, end_b, word = 1, 2, 3, 7  # id-level tags; only the M_t values matter
    tti = ThinkingIntervention([start], [end_a, end_b], **rule)
    tti.start([[start]] * len(spans))
    for row, ms in enumerate(spans):
        for m in ms:
            if not tti.rows[row].in_think:
                break
            forced = tti.observe(row, m)
            tti.advance(row, word if forced is None else forced)
    return [row.triggers["stagnation"] > 0 for row in tti.rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--spans", type=int, default=64, help="responses sampled (one think span each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/stagnation_rates.json")
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from t2po.config import load_config
    from t2po.engines.base import InterventionConfig, SamplingParams
    from t2po.engines.hf import HFEngine
    from t2po.envs import make_env
    from t2po.models import load_model
    from t2po.rollout import build_prompt_ids

    cfg = load_config(ns.preset)
    tti = cfg.rollout.tti
    torch.manual_seed(ns.seed)
    model, tokenizer = load_model(ns.model, dtype=cfg.model.dtype)
    env = make_env(cfg.env.name, **cfg.env.options)
    states = env.reset(list(range(ns.spans)))
    start_ids = tokenizer.encode(tti.think_start, add_special_tokens=False)
    prompts = [build_prompt_ids(tokenizer, env.render_prompt(i, [], s))[0] + start_ids for i, s in enumerate(states)]
    t0 = time.time()
    engine = HFEngine(model, tokenizer)
    train = cfg.rollout.sampling
    sampling = SamplingParams(temperature=train.temperature, top_p=train.top_p, top_k=train.top_k,
                              max_new_tokens=train.max_new_tokens, seed=ns.seed)
    monitor = InterventionConfig(enabled=False, think_start=tti.think_start, think_end=tti.think_end)  # M_t only
    gens = engine.generate(prompts, sampling, monitor)
    seconds = time.time() - t0
    spans = []
    for g in gens:
        text, n = "", len(g.token_ids)
        for k, token in enumerate(g.token_ids):  # the span ends with the token that completes </think>
            text += tokenizer.decode([token])
            if tti.think_end in text:
                n = k
                break
        spans.append(list(g.uncertainty[:n]))
    relative = replay(spans, patience=tti.patience, eps=tti.eps, eps_floor=tti.eps_floor or 0.3)
    paper = replay(spans, patience=20, eps=1e-4)
    changes = np.concatenate([np.abs(np.diff(s)) for s in spans if len(s) > 1])
    split = {}
    for judged in (True, False):
        chosen = [r for r, p in zip(relative, paper) if p == judged]
        split["paper_stagnant" if judged else "paper_not_stagnant"] = {
            "spans": len(chosen), "relative_rule_fires": float(np.mean(chosen)) if chosen else None}
    result = {
        "model": ns.model or "embedded SmolLM2-135M-Instruct", "preset": ns.preset, "spans": len(spans),
        "think_tokens_mean": float(np.mean([len(s) for s in spans])),
        "relative_rule": {"eps_floor": tti.eps_floor or 0.3, "patience": tti.patience,
                          "fires": float(np.mean(relative))},
        "paper_rule": {"eps": 1e-4, "patience": 20, "fires": float(np.mean(paper))},
        "relative_rule_by_paper_judgement": split,
        "token_changes": {"within_1e-4": float(np.mean(changes <= 1e-4)), "p10": float(np.percentile(changes, 10)),
                          "p50": float(np.percentile(changes, 50))},
        "generate_seconds": seconds,
    }
    print(json.dumps(result, indent=1))
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
