"""The CPU path's reference figures (issue 17) in one file, from the three benchmarks' outputs.

    python benchmarks/bench_engine.py --out bench_results/engine.json
    python benchmarks/bench_update.py --out bench_results/update.json
    python benchmarks/bench_rollout.py --out bench_results/rollout.json
    python benchmarks/cpu_path_summary.py --out docs/results/cpu_path.json

Headline keys (each benchmark's docstring says how it is measured):
- `engine_speedup_vs_fp32`: batch-32 generate call, the fp32 engine before issue 17 / the default
  (bf16 weights, grouped-query decode attention, inverse-CDF sampling);
- `roofline_ratio`: the default's call / the floor estimated from this machine's matmul and memory
  probes (1.0 = at the hardware's limit);
- `update_speedup_vs_fp32`: the PPO update before issue 17 (fp32, whole rows) / today's (bf16, shared
  beginning once, frozen layers replayed);
- `prefill_tokens_over_unique`: prompt tokens prefilled in a rollout iteration / distinct prompt
  tokens of the iteration (1.0 = no prompt prefilled twice; below 1: the prompts' shared beginning is
  prefilled once per generate call, not once per distinct prompt);
- `tti_monitoring_overhead`: generate call with M_t monitoring / without, minus 1 (whole calls: noisy, +-10 %);
- `tti_cost_share_of_decode_step`: TTI's full cost (M_t + its per-row bookkeeping) / a decode step with TTI, from
  the per-step breakdown measured side by side in one process (issue 27);
- `trainer_step_speedup_vs_whole_rows`: old-log-prob pass + update in bf16, every row through every
  layer / the default (shared beginning once per micro-batch, frozen layers replayed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="bench_results/engine.json")
    parser.add_argument("--update", default="bench_results/update.json")
    parser.add_argument("--rollout", default="bench_results/rollout.json")
    parser.add_argument("--out", default="docs/results/cpu_path.json")
    args = parser.parse_args()
    engine, update, rollout = (json.loads(Path(p).read_text()) for p in (args.engine, args.update, args.rollout))
    summary = {
        "engine_speedup_vs_fp32": engine["engine_speedup_vs_fp32"],
        "roofline_ratio": engine["roofline_ratio"],
        "update_speedup_vs_fp32": update["update_speedup_vs_fp32"],
        "trainer_step_speedup_vs_whole_rows": update["trainer_step_speedup_vs_whole_rows"]["shared_prefix_trunk"],
        "prefill_tokens_over_unique": rollout["prefill_tokens_over_unique"],
        "tti_monitoring_overhead": engine["tti_monitoring_overhead"],
        "tti_cost_share_of_decode_step": engine["tti_cost_share_of_decode_step"],
        "rollout_speedup_vs_fp32": rollout["rollout_speedup_vs_fp32"],
        "engine": engine,
        "update": update,
        "rollout": {k: v for k, v in rollout.items() if k != "all"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
