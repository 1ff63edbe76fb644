"""The retrieval server (Search-R1's HTTP contract) and the client the Search environment uses.

    t2po serve-retriever [--corpus FILE] [--port 8000] [--host 127.0.0.1] [--retriever bm25|dense] [--topk 3]
    python -m t2po.envs.search.server ...            # the same, without the CLI

Without `--corpus` the server builds (once) and serves the corpus made from the shared Search QA files
(`<cache>/search/corpus.jsonl`, see `corpus.py`). It binds 127.0.0.1 unless told otherwise; `--port 0`
picks a free port. The first log line names the corpus (path, passages, sha256) and the URL.

Endpoints (as Search-R1's `retrieval_server.py`):
- `POST /retrieve` with `{"queries": [str, ...], "topk": k, "return_scores": bool}` returns
  `{"result": [per query: [{"document": {"id", "contents"}, "score": float}, ...]]}`, or, when
  `return_scores` is false, `{"result": [per query: [{"id", "contents"}, ...]]}`. `topk` defaults to
  the server's `--topk` (absent, null or 0: Search-R1 treats a falsy topk as the default). An empty query gets an empty
  list; a query longer than `MAX_QUERY_CHARS`
  (1024) characters is cut to that length. More than `MAX_QUERIES` queries or a `topk` above `MAX_TOPK`
  is a 422 error.
- `GET /health` returns `{"status": "ok", "corpus": {name, path, num_passages, sha256},
  "retriever": {kind, build_seconds, load_seconds}, "default_topk", "max_query_chars"}`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

import t2po
from t2po.bounds import PORT, bounded
from t2po.envs.search.corpus import Corpus, ensure_corpus
from t2po.envs.search.retriever import MAX_QUERY_CHARS, RETRIEVERS, Retriever, make_retriever
from t2po.errors import InvalidInput, UserError

logger = logging.getLogger(__name__)

#: most queries one request may carry (a rollout batch sends one query per active environment)
MAX_QUERIES = 4096
#: largest topk a request may ask for
MAX_TOPK = 100
START_COMMAND = "t2po serve-retriever --port 8000"


class RetrieveRequest(BaseModel):
    """Body of `POST /retrieve` (Search-R1's QueryRequest)."""

    queries: list[str] = Field(max_length=MAX_QUERIES)
    topk: int | None = Field(default=None, ge=0, le=MAX_TOPK)  # 0 or null: the server's default, as Search-R1
    return_scores: bool = False


def create_app(retriever: Retriever, default_topk: int = 3) -> FastAPI:
    """The FastAPI app serving `retriever` (and its corpus)."""
    corpus = retriever.corpus
    app = FastAPI(title="t2po retrieval server")

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict[str, Any]:  # sync: FastAPI runs it in a thread pool
        hits = retriever.search(request.queries, request.topk or default_topk)
        result = []
        for query_hits in hits:
            documents = [(corpus.document(i), score) for i, score in query_hits]
            if request.return_scores:
                result.append([{"document": doc, "score": score} for doc, score in documents])
            else:
                result.append([doc for doc, _ in documents])
        return {"result": result}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "corpus": corpus.describe(), "retriever": retriever.describe(),
                "default_topk": default_topk, "max_query_chars": MAX_QUERY_CHARS}

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every reply (headers, then body) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port} ({e}). Pick another --port (0 = any free port).") from e
    sock.listen(2048)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def load_retriever(corpus: str | None = None, retriever: str = "bm25", data_dir: str | None = None) -> Retriever:
    """Open `corpus` (default: the corpus built from the shared data in `data_dir`, built on first
    use) and its retriever (index built on first use, then loaded from the cache)."""
    return make_retriever(retriever, Corpus(corpus if corpus is not None else ensure_corpus(data_dir)))


def run(corpus: str | None = None, host: str = "127.0.0.1", port: int = 8000, retriever: str = "bm25",
        topk: int = 3) -> None:
    """Serve `corpus` over HTTP until interrupted (Ctrl-C)."""
    if not _is_loopback(host):
        logger.warning("Binding %s: the retrieval server is reachable from other machines.", host)
    engine = load_retriever(corpus, retriever)
    sock = _bind(host, port)
    logger.info("Serving corpus %s (%d passages, sha256 %s) with the %s retriever at %s (POST /retrieve, GET /health)",
                engine.corpus.path, len(engine.corpus), engine.corpus.sha256[:12], engine.kind, _url(sock))
    uvicorn.Server(uvicorn.Config(create_app(engine, topk), log_level="warning")).run(sockets=[sock])


class BackgroundServer:
    """A retrieval server on a free loopback port in a daemon thread of this process (the Search
    environment starts one when it is given no `retriever_url`). `url`; `stop()` shuts it down."""

    def __init__(self, retriever: Retriever, topk: int = 3):
        self._sock = _bind("127.0.0.1", 0)
        self.url = _url(self._sock)
        self._server = uvicorn.Server(uvicorn.Config(create_app(retriever, topk), log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="t2po-retrieval-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30.0
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The in-process retrieval server at {self.url} did not start.")
            time.sleep(0.01)
        logger.info("In-process retrieval server for %s at %s", retriever.corpus.path, self.url)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout=10.0)
        self._sock.close()


class ServerProcess:
    """`python -m t2po.envs.search.server` in a child process on a free loopback port (`--port 0`);
    waits until it serves, then exposes `url` and the child's `log` lines; `stop()` ends it.
    Used by the benchmark and the tests to talk to a server over real HTTP."""

    def __init__(self, corpus: str | None = None, retriever: str = "bm25", topk: int = 3,
                 env: dict[str, str] | None = None, startup_timeout: float = 600.0):
        child_env = dict(os.environ if env is None else env)
        # a checkout that is not pip-installed still imports in the child
        package_root = str(Path(t2po.__file__).resolve().parents[1])
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "t2po.envs.search.server", "--port", "0", "--retriever", retriever,
                   "--topk", str(topk)] + (["--corpus", str(corpus)] if corpus is not None else [])
        self.log: list[str] = []
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         env=child_env)
        found = threading.Event()
        self.url = ""

        def drain() -> None:  # keep reading so the child never blocks on a full pipe
            for line in self._process.stderr:
                self.log.append(line.rstrip("\n"))
                if not found.is_set() and "Serving corpus" in line:
                    self.url = line.rsplit(" at ", 1)[1].split()[0]
                    found.set()

        threading.Thread(target=drain, name="t2po-retriever-log", daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while not found.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("The retrieval server did not start:\n" + "\n".join(self.log[-20:]))
        client = RetrievalClient(self.url, timeout=5.0, max_retries=6, backoff=0.05)
        try:
            client.health()
        finally:
            client.close()

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10.0)
            except Exception:
                self._process.kill()
                self._process.wait()


class RetrieverUnavailableError(UserError, ConnectionError):
    """The retrieval server did not answer (after retries)."""


class RetrievalError(UserError, RuntimeError):
    """The retrieval server answered with an error or a reply that breaks the contract."""


class RetrievalClient:
    """Client of a retrieval server (`base_url` like `http://127.0.0.1:8000`; a trailing `/retrieve`
    is accepted). Each request waits `timeout` seconds; connection failures, timeouts and 5xx replies
    are retried `max_retries` times with exponential back-off (`backoff`, 2x, 4x, ... seconds), then
    `RetrieverUnavailableError` names the URL and how to start the server. Queries are cut to
    `MAX_QUERY_CHARS` characters before sending."""

    def __init__(self, base_url: str, timeout: float = 10.0, max_retries: int = 3, backoff: float = 0.5):
        base_url = base_url.rstrip("/")
        if base_url.endswith("/retrieve"):
            base_url = base_url[: -len("/retrieve")]
        if not base_url.startswith(("http://", "https://")):
            raise InvalidInput(f"Retriever URL {base_url!r} must start with http:// or https:// "
                             f"(e.g. http://127.0.0.1:8000).")
        self.base_url = base_url
        self.max_retries = max_retries
        self.backoff = backoff
        # TCP_NODELAY: a POST goes out as two writes (headers, body); with Nagle on, the body waits
        # ~40 ms for the server's delayed ACK. trust_env=False: no proxy from the environment.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(timeout=timeout, transport=transport, trust_env=False)

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        url = self.base_url + path
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._http.request(method, url, json=payload)
            except httpx.TransportError as e:  # refused, reset, timed out, DNS
                problem = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code >= 500:
                problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
                continue
            if reply.status_code != 200:
                raise RetrievalError(f"{method} {url} was refused with HTTP {reply.status_code}: {reply.text[:500]}")
            try:
                return reply.json()
            except ValueError as e:
                raise RetrievalError(f"{method} {url} returned non-JSON: {reply.text[:200]!r}") from e
        raise RetrieverUnavailableError(
            f"Retrieval server at {self.base_url} did not answer {method} {path} after {self.max_retries + 1} "
            f"attempts ({problem}). Start it with `{START_COMMAND}` (or `python -m t2po.envs.search.server`) "
            f"and pass its URL as the env option retriever_url, e.g. env.options.retriever_url=http://127.0.0.1:8000."
        )

    def health(self) -> dict:
        """The server's `/health` reply (its corpus and retriever)."""
        return self._request("GET", "/health")

    def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        """Per query, the top-k `{"document": {"id", "contents"}, "score"}` entries, best first."""
        if not queries:
            return []
        # model text may hold lone surrogates ("\ud800"), which UTF-8 cannot encode: send "?" instead
        queries = [q[:MAX_QUERY_CHARS].encode("utf-8", "replace").decode("utf-8") for q in queries]
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        result = self._request("POST", "/retrieve", payload).get("result")
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"{self.base_url}/retrieve returned {str(result)[:200]!r}; expected one list of "
                                 f"passages per query ({len(queries)}).")
        return result

    def close(self) -> None:
        self._http.close()


def main(argv: list[str] | None = None) -> int:
    """`t2po serve-retriever`: serve a wiki-18-format corpus over HTTP (Search-R1 contract)."""
    parser = argparse.ArgumentParser(prog="t2po serve-retriever",
                                     description="Serve a wiki-18-format passage corpus over HTTP "
                                                 "(Search-R1 contract: POST /retrieve, GET /health).")
    parser.add_argument("--corpus", default=None,
                        help="wiki-18 JSONL corpus ({\"id\", \"contents\"} per line); default: the corpus built "
                             "from ../shared/data/search, at $T2PO_CACHE/search/corpus.jsonl (built if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=PORT, default=8000, help="port (default 8000; 0 = any free port, logged)")
    parser.add_argument("--retriever", choices=RETRIEVERS, default="bm25", help="bm25 (default) or dense (MiniLM)")
    parser.add_argument("--topk", type=bounded(1, 1000), default=3,
                        help="passages per query when a request gives no topk")
    args = parser.parse_args(argv)
    if not 1 <= args.topk <= MAX_TOPK:
        parser.error(f"--topk must be between 1 and {MAX_TOPK}, got {args.topk}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(corpus=args.corpus, host=args.host, port=args.port, retriever=args.retriever, topk=args.topk)
    except (OSError, ValueError, ImportError) as e:
        print(f"serve-retriever: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
