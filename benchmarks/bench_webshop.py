"""Benchmark the WebShop environment at several catalog sizes (default 1,000 and 100,000 products):

- build: generating the catalog and building the BM25 index from scratch; for catalogs of 10,000
  products or more (which are cached), the first open (which also writes the cache) and a cached open;
- search latency: one `SearchIndex.search` per goal instruction (mean, p50, p95 in ms);
- env steps per second: the oracle plays a batch of episodes through `WebShopEnv.step` (instance
  steps per second of `step` alone, and with `expert_response` + `parse_action` + `render_prompt`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_webshop.py [--sizes 1000 100000] [--out
    bench_results/webshop.json]

The cache goes to a temporary folder unless --cache-dir is given. Prints the figures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

from t2po.envs.webshop import catalog as catalog_module
from t2po.envs.webshop.catalog import generate_catalog, generated_catalog
from t2po.envs.webshop.engine import SearchIndex
from t2po.envs.webshop.env import WebShopEnv


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_size(num_products: int, seed: int, queries: int, batch: int, cache_dir: Path) -> dict:
    catalog, gen_s = _timed(lambda: generate_catalog(num_products, seed))
    index, index_s = _timed(lambda: SearchIndex.build(catalog.products))
    result = {"num_products": num_products, "num_goals": len(catalog.goals), "generate_s": gen_s,
              "index_build_s": index_s}

    if num_products >= catalog_module.CATALOG_CACHE_MIN_PRODUCTS:
        # first open: generate + build + write the cache; then open both from the cache
        _, first_catalog_s = _timed(lambda: generated_catalog(num_products, seed, cache_dir))
        _, first_index_s = _timed(lambda: SearchIndex.build(catalog.products, cache_dir))
        _, cached_catalog_s = _timed(lambda: generated_catalog(num_products, seed, cache_dir))
        _, cached_index_s = _timed(lambda: SearchIndex.build(catalog.products, cache_dir))
        result.update(
            first_open_with_cache_write_s=first_catalog_s + first_index_s,
            cached_open_catalog_s=cached_catalog_s,
            cached_open_index_s=cached_index_s,
        )

    texts = [re.sub(r", and price lower than [\d.]+ dollars$", "", g.instruction_text) for g in catalog.goals[:queries]]
    latencies, found = [], 0
    for text in texts:
        hits, seconds = _timed(lambda: index.search(text))
        latencies.append(seconds * 1000)
        found += bool(hits)
    latencies.sort()
    result.update(
        search_ms_mean=statistics.fmean(latencies),
        search_ms_p50=latencies[len(latencies) // 2],
        search_ms_p95=latencies[int(len(latencies) * 0.95)],
        search_queries=len(latencies),
    )

    env = WebShopEnv(split="test", num_products=num_products, catalog_seed=seed, cache_dir=str(cache_dir))
    states = env.reset(list(range(batch)))
    history: list[list[tuple[str, str]]] = [[] for _ in range(batch)]
    step_s, agent_s, steps = 0.0, 0.0, 0
    while True:
        start = time.perf_counter()
        actions: list[str | None] = []
        for i, state in enumerate(states):
            if state.done:
                actions.append(None)
                continue
            env.render_prompt(i, history[i], state)
            parsed = env.parse_action(env.expert_response(i, state), state)
            history[i].append((state.observation, parsed.action))
            actions.append(parsed.action)
        agent_s += time.perf_counter() - start
        if all(a is None for a in actions):
            break
        stepped, seconds = _timed(lambda: env.step(actions))
        step_s += seconds
        steps += sum(a is not None for a in actions)
        states = [new if new is not None else old for new, old in zip(stepped, states)]
    result.update(
        env_instance_steps=steps,
        env_steps_per_s=steps / step_s,
        env_steps_per_s_with_prompt_and_oracle=steps / (step_s + agent_s),
        oracle_success=sum(s.metrics["success"] for s in states) / batch,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=300, help="search queries per size")
    parser.add_argument("--batch", type=int, default=64, help="oracle episodes per size")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the cache here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/webshop.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="t2po-bench-webshop-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        results = []
        for size in args.sizes:
            result = bench_size(size, args.seed, args.queries, args.batch, cache_dir)
            results.append(result)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    report = {
        "benchmark": "webshop",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
