"""The retrieval server over real HTTP (a child process on a free loopback port) and its client.

The recall test sends all 2,655 NQ-open questions that come with a gold wiki-18 passage (no sampling)
and needs the gold passage in the top 3 for at least 80% of them.
"""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from t2po.envs.search.corpus import build_corpus
from t2po.envs.search.data import default_data_dir, load_nq_open_oracle
from t2po.envs.search.server import MAX_TOPK, RetrievalClient, RetrievalError, RetrieverUnavailableError, ServerProcess

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared Search QA data not at {DATA}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # one cache for the whole test session (the env tests reuse the corpus and its index)
    cache = tmp_path_factory.getbasetemp() / "t2po-search-cache"
    corpus = cache / "search" / "corpus.jsonl"
    if not corpus.is_file():
        build_corpus(out=corpus)
    process = ServerProcess(corpus=str(corpus), env={**os.environ, "T2PO_CACHE": str(cache)})
    yield process
    process.stop()


@pytest.fixture()
def client(server):
    client = RetrievalClient(server.url, timeout=30.0)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_binds_loopback_and_names_its_corpus(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    health = client.health()
    assert health["status"] == "ok" and health["retriever"]["kind"] == "bm25"
    corpus = health["corpus"]
    assert corpus["path"].endswith("corpus.jsonl") and corpus["num_passages"] > 12_000 and len(corpus["sha256"]) == 64
    assert any("Serving corpus" in line and corpus["path"] in line for line in server.log)


def test_search_r1_response_shape(server):
    body = {"queries": ["first nobel prize in physics", "capital of norway"], "topk": 2, "return_scores": True}
    reply = httpx.post(server.url + "/retrieve", json=body, timeout=30.0, trust_env=False)
    assert reply.status_code == 200
    result = reply.json()["result"]
    assert len(result) == 2 and all(len(hits) == 2 for hits in result)
    first = result[0][0]
    assert set(first) == {"document", "score"} and set(first["document"]) == {"id", "contents"}
    assert first["score"] >= result[0][1]["score"] > 0
    assert "Röntgen" in first["document"]["contents"]
    # without scores Search-R1 returns the documents alone; topk defaults to the server's (3)
    plain = httpx.post(server.url + "/retrieve", json={"queries": ["first nobel prize in physics"]},
                       timeout=30.0, trust_env=False).json()["result"]
    assert len(plain[0]) == 3 and set(plain[0][0]) == {"id", "contents"}
    assert plain[0][0] == first["document"]


@pytest.mark.parametrize("topk", [0, None])
def test_falsy_topk_means_the_server_default(server, topk):
    """Search-R1 `search_r1/search/retrieval_server.py` `retrieve_endpoint`: `if not request.topk:
    request.topk = config.retrieval_topk`, so topk 0 or null returns the server's default (3 here)."""
    reply = httpx.post(server.url + "/retrieve", json={"queries": ["capital of norway"], "topk": topk}, timeout=30.0,
                       trust_env=False)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["result"][0]) == 3


def test_empty_oversized_and_invalid_requests(server, client):
    assert client.retrieve(["", "   "], topk=3) == [[], []]
    long_query = "first nobel prize in physics " * 500  # cut to MAX_QUERY_CHARS on both sides
    assert len(client.retrieve([long_query], topk=3)[0]) == 3
    too_long = httpx.post(server.url + "/retrieve", json={"queries": [long_query], "topk": 1}, timeout=30.0,
                          trust_env=False)
    assert too_long.status_code == 200 and len(too_long.json()["result"][0]) == 1
    with pytest.raises(RetrievalError, match="422"):
        client.retrieve(["nobel"], topk=MAX_TOPK + 1)
    bad = httpx.post(server.url + "/retrieve", json={"query": "nobel"}, timeout=30.0, trust_env=False)
    assert bad.status_code == 422 and "queries" in bad.text


def test_gold_passage_in_top3_for_80_percent_of_nq(client):
    questions = load_nq_open_oracle(DATA / "nq-open-oracle.jsonl.gz")
    found = 0
    for start in range(0, len(questions), 256):
        batch = questions[start:start + 256]
        results = client.retrieve([q.question for q in batch], topk=3)
        for question, hits in zip(batch, results):
            gold = question.gold_passages[0].contents
            found += any(hit["document"]["contents"] == gold for hit in hits)
    recall = found / len(questions)
    assert recall >= 0.80, f"gold passage in top 3 for only {recall:.1%} of {len(questions)} NQ questions"


def test_client_gives_up_with_a_clear_error_when_the_server_is_down():
    url = f"http://127.0.0.1:{_free_port()}"
    client = RetrievalClient(url, timeout=1.0, max_retries=3, backoff=0.2)
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailableError) as error:
        client.retrieve(["anything"])
    elapsed = time.monotonic() - start
    assert 0.2 + 0.4 + 0.8 <= elapsed < 5.0  # three retries with exponential back-off, then stop
    message = str(error.value)
    assert url in message and "4 attempts" in message and "t2po serve-retriever" in message


def test_client_rejects_a_url_without_scheme():
    with pytest.raises(ValueError, match="http://"):
        RetrievalClient("127.0.0.1:8000")
