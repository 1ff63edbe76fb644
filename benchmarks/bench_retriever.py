"""Retrieval server benchmark: index build time, corpus size, and query throughput/latency over HTTP.

    python benchmarks/bench_retriever.py [--retriever bm25|dense] [--corpus FILE] [--requests 300]
                                         [--batch-size 32] [--batch-requests 20] [--out
                                         bench_results/bench_retriever.json]

- Builds the corpus from the shared Search QA data (unless `--corpus` is given) and its index in a fresh
  temporary cache (unless `--cache` names one), so that the build times are measured, not read from a
  warm cache.
- Starts `python -m t2po.envs.search.server --port 0` as a child process (127.0.0.1 only) and sends a
  bounded number of requests with NQ-open questions: `--requests` single-query requests one after the
  other (the latency one environment step sees), then `--batch-requests` requests of `--batch-size`
  queries (the throughput a rollout batch sees). Reports queries per second and p50/p95 latency.
- Also reports recall@3 of the NQ-open gold passage (all 2,655 questions), when the corpus holds them.
Writes one JSON file and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2po.envs.search.corpus import Corpus, build_corpus  # noqa: E402
from t2po.envs.search.data import default_data_dir, load_nq_open_oracle  # noqa: E402
from t2po.envs.search.retriever import make_retriever  # noqa: E402
from t2po.envs.search.server import RetrievalClient, ServerProcess  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed_requests(client: RetrievalClient, batches: list[list[str]], topk: int) -> dict[str, float]:
    latencies = []
    start = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        client.retrieve(batch, topk)
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    queries = sum(len(b) for b in batches)
    return {"requests": len(batches), "queries_per_request": len(batches[0]), "queries_per_second": queries / total,
            "requests_per_second": len(batches) / total, "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p95_ms": 1000 * _percentile(latencies, 0.95),
            "latency_mean_ms": 1000 * statistics.fmean(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retriever", choices=("bm25", "dense"), default="bm25")
    parser.add_argument("--corpus", default=None, help="wiki-18 JSONL corpus (default: build it from the shared data)")
    parser.add_argument("--requests", type=int, default=300, help="single-query requests, sent one after another")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per batched request")
    parser.add_argument("--batch-requests", type=int, default=20, help="batched requests")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--cache", default=None,
                        help="cache folder to use (default: a fresh temporary one, so the builds are timed; "
                             "an existing cache reuses its corpus and index and reports no build time)")
    parser.add_argument("--out", default="bench_results/bench_retriever.json")
    args = parser.parse_args(argv)

    questions = load_nq_open_oracle(default_data_dir() / "nq-open-oracle.jsonl.gz")
    texts = [q.question for q in questions]
    with tempfile.TemporaryDirectory(prefix="t2po-bench-cache-") as fresh_cache:
        cache = args.cache or fresh_cache
        report: dict[str, object] = {"benchmark": "retriever", "retriever": args.retriever,
                                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                 "platform": platform.platform(),
                                                 # other work on the machine slows every figure below
                                                 "load_average_1min_at_start": os.getloadavg()[0]}}
        corpus = args.corpus
        if corpus is None:
            corpus = Path(cache) / "search" / "corpus.jsonl"
            if not corpus.is_file():
                start = time.perf_counter()
                build_corpus(out=corpus)
                report["corpus_build_seconds"] = time.perf_counter() - start
            corpus = str(corpus)
        start = time.perf_counter()
        server = ServerProcess(corpus=corpus, retriever=args.retriever, topk=args.topk,
                               env={**os.environ, "T2PO_CACHE": cache})
        report["server_start_seconds"] = time.perf_counter() - start  # includes the index build
        client = RetrievalClient(server.url, timeout=120.0)
        try:
            health = client.health()
            report["corpus"] = health["corpus"]
            report["index_build_seconds"] = health["retriever"]["build_seconds"]
            for text in texts[:5]:  # warm-up
                client.retrieve([text], args.topk)
            singles = [[texts[i % len(texts)]] for i in range(args.requests)]
            report["single_query"] = _timed_requests(client, singles, args.topk)
            batches = [[texts[(i * args.batch_size + j) % len(texts)] for j in range(args.batch_size)]
                       for i in range(args.batch_requests)]
            report["batched"] = _timed_requests(client, batches, args.topk)
            found = 0
            for start_at in range(0, len(questions), 256):
                chunk = questions[start_at:start_at + 256]
                for question, hits in zip(chunk, client.retrieve([q.question for q in chunk], 3)):
                    found += any(h["document"]["contents"] == question.gold_passages[0].contents for h in hits)
            report["nq_gold_recall_at_3"] = found / len(questions)
            report["nq_questions"] = len(questions)
        finally:
            client.close()
            server.stop()
        # the same single queries without HTTP: what the retriever itself costs
        os.environ["T2PO_CACHE"] = cache  # reuse the index the server built
        retriever = make_retriever(args.retriever, Corpus(corpus))
        latencies = []
        for batch in singles:
            t = time.perf_counter()
            retriever.search(batch, args.topk)
            latencies.append(time.perf_counter() - t)
        report["single_query_in_process"] = {"queries": len(latencies),
                                             "queries_per_second": len(latencies) / sum(latencies),
                                             "latency_p50_ms": 1000 * statistics.median(latencies),
                                             "latency_p95_ms": 1000 * _percentile(latencies, 0.95)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
