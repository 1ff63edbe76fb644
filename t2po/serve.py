"""`t2po serve MODEL`: a local model or t2po checkpoint behind an OpenAI-compatible HTTP API.

    t2po serve runs/sokoban-t2po-20260101-120000 --port 8000     # latest checkpoint of a run
    t2po serve                                                   # the embedded SmolLM2-135M-Instruct
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sokoban-t2po-20260101-120000-iter_000010", "messages": [{"role": "user", "content": "hi"}]}'

Endpoints: `POST /v1/chat/completions` (`stream` as server-sent events, `stream_options.include_usage`,
`n`, `logprobs` / `top_logprobs`, `temperature`, `top_p`, `top_k`, `max_tokens` /
`max_completion_tokens`, `stop`, `seed`; any other field is answered 400 naming it, see `FIELDS`),
`GET /v1/models`, `GET /health`. The messages
are rendered with the model's chat template exactly as `t2po.rollout.build_prompt_ids` renders a
prompt, so an agent served here sees the tokens it was trained on. Decoding is `HFEngine` with the
thinking intervention on (docs/method.md §2; evaluation uses TTI, not TDS), `--no-tti` turns it off.
Requests that arrive while the model is busy and share sampling settings are decoded as one batch
(up to `--max-batch-size`); `seed` is best effort, as with OpenAI: a batch is sampled with its first
request's seed (choice i of an `n` request asks for seed + i). A stream sends each choice's text as
its tokens are decoded (text that could begin a stop string is held back until it cannot); its
log-probs come with the choice's last chunk.

The server binds 127.0.0.1 and has no authentication (clients may send any API key); `--host` opens
it to other machines, at your own risk.

Limits (each answered with HTTP 400 naming it): a request body of at most `--max-request-bytes`
(1 MiB), at most `--max-tokens` new tokens (4096), and prompt plus new tokens within the model's
positions (`max_position_embeddings`; without `max_tokens`, the default shrinks to fit). Text that
UTF-8 cannot encode (lone surrogates), non-finite numbers and JSON nested too deeply are refused
the same way. A client that hangs up stops its generation at the next token, and SIGTERM or Ctrl-C
ends the generations in progress and the server within seconds.

Testing aid: `--inject-faults SPEC` makes the first chat requests fail on purpose, in order (error
statuses such as 429, sleeps past a client's timeout, empty or malformed answers), so that a client's
retry handling can be tested against a real server; `t2po.testing.FAULTS_HELP` gives the syntax.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from t2po.bounds import NEW_TOKENS, PORT
from t2po.engines.base import Engine, Generation, InterventionConfig, SamplingParams
from t2po.testing import FAULTS_HELP, FaultPlan

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# The request fields served; anything else is answered 400 naming it. These are accepted when neutral
# (the value that changes nothing) and refused otherwise:
NEUTRAL_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "parallel_tool_calls": True}
FIELDS = ("model", "messages", "stream", "stream_options", "n", "logprobs", "top_logprobs", "temperature",
          "top_p", "top_k",
          "max_tokens", "max_completion_tokens", "stop", "seed", "user", *NEUTRAL_FIELDS)
DEFAULT_MAX_TOKENS_LIMIT = 4096  # --max-tokens
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # --max-request-bytes
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
SHUTDOWN_GRACE_S = 3.0  # after SIGTERM, requests still running after this are cancelled
class GenerationBatcher:
    """Runs `engine.generate` in one worker thread. Requests queued while it is busy (or within
    `wait_s` of the first) that share sampling settings (seed aside) are decoded as one batch.

    `cancel(future)` drops a request: still queued, it never runs; running, its row stops at the
    next decode step (the engine's `should_stop`). `stop()` does that to every request."""

    def __init__(self, engine: Engine, intervention: InterventionConfig, max_batch_size: int = 8,
                 wait_s: float = 0.005) -> None:
        self.engine = engine
        self.intervention = intervention
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue = queue.Queue()
        self._abandoned: set[concurrent.futures.Future] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="t2po-serve-generation", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, top_logprobs: int = 0,
               on_token: Callable[[int], None] | None = None) -> concurrent.futures.Future:
        """A future of the `Generation`; `on_token(token_id)` is called (in the worker thread) as each token is
        chosen."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(prompt_ids, sampling, future, top_logprobs, on_token))
        return future

    def cancel(self, future: concurrent.futures.Future) -> None:
        if not future.cancel():  # already running: its row stops at the next token
            self._abandoned.add(future)

    def stop(self) -> None:
        """End every generation at its next token and refuse the queued ones (server shutdown)."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            deadline = time.monotonic() + self.wait_s
            while len(pending) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                pending.append(item)
            groups: dict[tuple, list] = {}
            # a request cancelled while queued is dropped here (False: its future was cancelled)
            pending = [job for job in pending if job.future.set_running_or_notify_cancel()]
            if self._stopping.is_set():
                for job in pending:
                    job.future.set_exception(RuntimeError("the server is shutting down"))
                continue
            for job in pending:
                s = job.sampling
                groups.setdefault((s.temperature, s.top_p, s.top_k, s.max_new_tokens, tuple(s.stop),
                                   job.top_logprobs), []).append(job)
            for jobs in groups.values():
                self._generate(jobs)

    def _generate(self, jobs: list["_Job"]) -> None:
        def should_stop(row: int) -> bool:
            return self._stopping.is_set() or jobs[row].future in self._abandoned

        def on_token(row: int, token: int) -> None:
            if jobs[row].on_token is not None:
                jobs[row].on_token(token)

        try:
            generations = self.engine.generate([job.prompt_ids for job in jobs], jobs[0].sampling, self.intervention,
                                               should_stop=should_stop,
                                               top_logprobs=jobs[0].top_logprobs, on_token=on_token)
        except Exception as e:  # the requests fail, the server stays up
            for job in jobs:
                job.future.set_exception(e)
            return
        finally:
            self._abandoned.difference_update(job.future for job in jobs)
        for job, generation in zip(jobs, generations):
            job.future.set_result(generation)


@dataclass
class _Job:
    """One choice to generate: its prompt, sampling, the future of its `Generation`, and what it reports."""

    prompt_ids: list[int]
    sampling: SamplingParams
    future: concurrent.futures.Future
    top_logprobs: int = 0
    on_token: Callable[[int], None] | None = None


class RequestError(ValueError):
    """A chat request the server cannot answer; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ServeLimits:
    """What one chat request may ask for; beyond it the answer is HTTP 400 naming the limit."""

    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT  # new tokens per request (--max-tokens)
    max_positions: int | None = None  # prompt + new tokens: the model's max_position_embeddings
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # request body size (--max-request-bytes)
    max_n: int = 16  # choices per request


def model_positions(model: Any) -> int | None:
    """The model's `max_position_embeddings` (a VLM keeps it in its text config), None if unknown."""
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or `RequestError`: invalid UTF-8 or JSON, NaN / Infinity (Python's
    json reads them, JSON has none), nesting too deep for the parser."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None


def _check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} holds a lone surrogate (\\ud800-\\udfff without its pair), which is not "
                           "text: send valid Unicode", param=param.split("[")[0]) from None
    return text


@dataclass(frozen=True)
class ChatOptions:
    """What a chat request asks for besides the prompt and the sampling settings."""

    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False
    top_logprobs: int = 0


def parse_chat_request(body: Any, served_model: str, tokenizer: Any,
                       limits: ServeLimits = ServeLimits()) -> tuple[list[int], SamplingParams, ChatOptions]:
    """Prompt token ids, sampling settings and options of an OpenAI chat-completions request body; raises
    `RequestError` naming the field at fault or the limit exceeded."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model != served_model:
        raise RequestError(f"the model {model!r} does not exist; this server serves {served_model!r} (see /v1/models)",
                           404, "model")
    for name, value in body.items():
        if name not in FIELDS:
            raise RequestError(f"{name} is not supported by t2po serve; the fields it serves: {', '.join(FIELDS)}",
                               param=name)
        if name in NEUTRAL_FIELDS and value is not None and value != NEUTRAL_FIELDS[name]:
            raise RequestError(f"{name}={json.dumps(value)} is not supported by t2po serve; leave it out "
                               f"(or {json.dumps(NEUTRAL_FIELDS[name])})", param=name)
    for name in ("stream", "logprobs"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(f"{name} must be true or false", param=name)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise RequestError("stream_options may hold include_usage only", param="stream_options")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    rendered = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{k}] must be an object with role system, user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise RequestError(f"messages[{k}]: this server serves a text-only model; send text content only",
                                   param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{k}].content must be a string or a list of text parts", param="messages")
        rendered.append({"role": message["role"], "content": _check_text(content, f"messages[{k}].content")})
    ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]

    def number(name: str, default: Any, kind: type, low: float, high: float | None = None) -> Any:
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{name} must be a {'whole ' if kind is int else ''}number", param=name)
        if isinstance(value, float) and (not math.isfinite(value) or (kind is int and not value.is_integer())):
            raise RequestError(f"{name} must be a finite {'whole ' if kind is int else ''}number", param=name)
        if value < low or (high is not None and value > high):
            raise RequestError(f"{name}={value} is out of range [{low}, {high if high is not None else 'inf'}]",
                               param=name)
        return kind(value)

    asked = number("max_completion_tokens", None, int, 1) or number("max_tokens", None, int, 1)
    if asked is not None and asked > limits.max_tokens:
        raise RequestError(f"max_tokens={asked} is more than this server's limit of {limits.max_tokens} new tokens "
                           "(t2po serve --max-tokens)", param="max_tokens")
    max_tokens = asked if asked is not None else min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if limits.max_positions is not None:
        room = limits.max_positions - len(ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(ids)} tokens; the model has {limits.max_positions} positions for "
                               "prompt and answer together: shorten the messages", param="messages")
        if asked is not None and asked > room:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({asked}) exceed the model's "
                               f"{limits.max_positions} positions: ask for at most {room} tokens or shorten the "
                               "messages", param="max_tokens")
        max_tokens = min(max_tokens, room)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of them", param="stop")
    for k, s in enumerate(stop):
        _check_text(s, f"stop[{k}]")
    top_p = number("top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be > 0", param="top_p")
    top_logprobs = number("top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not body.get("logprobs"):
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    options = ChatOptions(n=number("n", 1, int, 1, limits.max_n), stream=bool(body.get("stream")),
                          include_usage=bool(stream_options.get("include_usage")), logprobs=bool(body.get("logprobs")),
                          top_logprobs=top_logprobs)
    sampling = SamplingParams(
        temperature=number("temperature", 1.0, float, 0.0, 2.0),
        top_p=top_p,
        top_k=number("top_k", 0, int, 0),
        max_new_tokens=max_tokens,
        stop=list(stop),
        seed=number("seed", None, int, -(2**63), 2**63 - 1),
    )
    return list(ids), sampling, options


def _content(generation: Generation, stop: list[str]) -> str:
    """The answer's text as OpenAI gives it: without the stop sequence that ended it (the engine keeps it)."""
    text = generation.text
    for s in stop:
        if generation.finish_reason == "stop" and text.endswith(s):
            return text[: -len(s)]
    return text


def _logprobs(generation: Generation, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's `choice.logprobs`: every generated token with its log-prob and the `top_logprobs` likeliest."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    top = generation.top_logprobs or [[] for _ in generation.token_ids]
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in alternatives]}
                        for t, lp, alternatives in zip(generation.token_ids, generation.logprobs, top)]}


def _usage(generations: list[Generation]) -> dict[str, int]:
    completion = sum(g.num_tokens for g in generations)
    prompt = generations[0].prompt_tokens if generations else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(served_model: str, generations: list[Generation], stop: list[str], tokenizer: Any = None,
                logprobs: bool = False) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": _content(g, stop)},
                     "finish_reason": g.finish_reason,
                     **({"logprobs": _logprobs(g, tokenizer)} if logprobs else {})} for i, g in enumerate(generations)],
        "usage": _usage(generations),
    }


class _StreamedText:
    """One choice's text as its tokens arrive: the part that is final (no longer a possible beginning
    of a stop string, no incomplete UTF-8 character) and not yet sent."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if any(s in text for s in self.stop):
            return ""  # the engine ends the row here; the final text comes with the generation
        safe = len(text)
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        while safe > 0 and text[safe - 1] == "\ufffd":  # a character whose bytes are not all decoded yet
            safe -= 1
        return self._take(text[:safe])

    def finish(self, content: str) -> str:
        return self._take(content)

    def _take(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or `RequestError` once it passes `limit` bytes (nothing more is read)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is larger than this server's limit of {limit} bytes "
                               "(t2po serve --max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: Engine, served_model: str, intervention: InterventionConfig | None = None,
              faults: FaultPlan | None = None, max_batch_size: int = 8, limits: ServeLimits | None = None):
    """The FastAPI application serving `engine` under the name `served_model`; `app.state.batcher`
    is its `GenerationBatcher`. `limits`: by default, the defaults with the model's positions."""
    intervention = intervention if intervention is not None else InterventionConfig()
    limits = limits if limits is not None else ServeLimits(max_positions=model_positions(getattr(engine, "model",
                                                                                                 None)))
    batcher = GenerationBatcher(engine, intervention, max_batch_size)
    faults = faults or FaultPlan(None)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="t2po serve", description=f"OpenAI-compatible chat completions from {served_model}",
                  lifespan=lifespan)
    app.state.batcher = batcher

    def refuse(e: RequestError) -> JSONResponse:
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(e), kind, e.param), status_code=e.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": served_model}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": served_model, "object": "model", "created": created, "owned_by": "t2po"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        fault = faults.take()
        try:
            body = parse_json_body(await _read_body(request, limits.max_request_bytes))
        except RequestError as e:
            return refuse(e)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody to answer
        if fault is not None and fault.kind == "status":
            status = int(fault.value)
            return JSONResponse(_error_body(f"injected fault: HTTP {status}", "injected_fault", code=str(status)),
                                status_code=status)
        if fault is not None and fault.kind == "sleep":
            await asyncio.sleep(fault.value)
            if await request.is_disconnected():  # the client timed out: spare the generation
                return Response(status_code=499)
        try:
            prompt_ids, sampling, options = parse_chat_request(body, served_model, engine.tokenizer, limits)
        except RequestError as e:
            return refuse(e)
        if fault is not None and fault.kind == "malformed":
            return JSONResponse({"object": "chat.completion", "model": served_model, "choices": "no choices here"})
        if fault is not None and fault.kind == "notjson":
            return Response("<html>502 Bad Gateway</html>", media_type="application/json")
        if fault is not None and fault.kind == "empty":
            empty = Generation([], [], [], [], "", "stop", prompt_tokens=len(prompt_ids))
            return JSONResponse(_completion(served_model, [empty], []))
        # choice i samples with seed + i: n choices are n different samples, also when split into batches
        samplings = [dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
                     for i in range(options.n)]
        if options.stream:
            return StreamingResponse(stream(request, prompt_ids, samplings, options), media_type="text/event-stream")
        futures = [batcher.submit(prompt_ids, s, options.top_logprobs) for s in samplings]
        waiters = [asyncio.wrap_future(f) for f in futures]
        while not all(w.done() for w in waiters):
            await asyncio.wait(waiters, timeout=DISCONNECT_POLL_S)
            if not all(w.done() for w in waiters) and await request.is_disconnected():
                for future in futures:
                    batcher.cancel(future)  # nobody will read the answer: free the engine
                return Response(status_code=499)
        try:
            generations = [w.result() for w in waiters]
        except ValueError as e:  # the engine's checks of the request
            return JSONResponse(_error_body(str(e), "invalid_request_error"), status_code=400)
        except RuntimeError as e:  # shutting down
            return JSONResponse(_error_body(str(e), "server_error"), status_code=503)
        if any(g.finish_reason == "cancelled" for g in generations):
            return JSONResponse(_error_body("the server is shutting down", "server_error"), status_code=503)
        return JSONResponse(_completion(served_model, generations, sampling.stop, engine.tokenizer, options.logprobs))

    async def stream(request: Request, prompt_ids: list[int], samplings: list[SamplingParams], options: ChatOptions):
        """The server-sent events of a streamed chat completion: a first chunk per choice with the role,
        then text deltas as tokens are decoded, a last chunk per choice with its finish reason (and
        log-probs), the usage when asked for, and `[DONE]`."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        texts = [_StreamedText(engine.tokenizer, s.stop) for s in samplings]
        futures = [batcher.submit(prompt_ids, s, options.top_logprobs,
                                  on_token=lambda token, i=i: loop.call_soon_threadsafe(tokens.put_nowait, (i, token)))
                   for i, s in enumerate(samplings)]
        waiters = [asyncio.wrap_future(f) for f in futures]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": served_model}

        def chunk(i: int, delta: dict, finish: str | None = None, **extra: Any) -> str:
            return _sse({**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish, **extra}]})

        try:
            for i in range(len(samplings)):
                yield chunk(i, {"role": "assistant", "content": ""})
            finished: set[int] = set()
            while True:
                while not tokens.empty():
                    i, token = tokens.get_nowait()
                    if new := texts[i].add(token):
                        yield chunk(i, {"content": new})
                # a future resolves after its last token was queued (both reach the loop in order)
                for i, waiter in enumerate(waiters):
                    if i in finished or not waiter.done():
                        continue
                    finished.add(i)
                    try:
                        g = waiter.result()
                    except (ValueError, RuntimeError) as e:
                        yield _sse(_error_body(str(e), "invalid_request_error" if isinstance(e, ValueError)
                                               else "server_error"))
                        return
                    rest = texts[i].finish(_content(g, samplings[i].stop))
                    yield chunk(i, {"content": rest} if rest else {}, g.finish_reason,
                                **({"logprobs": _logprobs(g, engine.tokenizer)} if options.logprobs else {}))
                if len(finished) == len(waiters):
                    break
                getter = asyncio.ensure_future(tokens.get())
                done, _ = await asyncio.wait([getter, *(w for w in waiters if not w.done())], timeout=DISCONNECT_POLL_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter.done():  # the first of the tokens waiting (the queue was empty)
                    i, token = getter.result()
                    if new := texts[i].add(token):
                        yield chunk(i, {"content": new})
                else:
                    getter.cancel()
                if not done and await request.is_disconnected():
                    return
            if options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage([w.result() for w in waiters])})
            yield _sse("[DONE]")
        finally:  # a client that hung up (or a finished stream): nothing left to generate
            for future in futures:
                if not future.done():
                    batcher.cancel(future)

    return app


def served_name(path: str | None) -> str:
    """The model name a client asks for: the run name plus checkpoint, the directory name, or the
    embedded default's name."""
    from t2po.locate import model_short_name

    return model_short_name(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2po serve",
        description="Serve a local model or t2po checkpoint through an OpenAI-compatible "
                    "/v1/chat/completions endpoint.",
        epilog=FAULTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
            help="a t2po run folder (its latest checkpoint), a checkpoint folder, a Hugging Face model directory, or "
                 "nothing for the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=PORT, default=8000,
                        help="port (0 = any free port; the line printed at start says which)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: derived from MODEL)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                        help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--engine", default="hf",
                        help="generation engine: hf (default), vllm, or package.module:Class (as rollout.engine)")
    parser.add_argument("--no-tti", action="store_true",
                        help="decode without the thinking intervention (docs/method.md §2)")
    parser.add_argument("--tti-budget", type=NEW_TOKENS, default=None,
                        help="TTI think-token budget B (default: the run's setting, else none)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="concurrent requests decoded together at most (default 8)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                        help=f"most new tokens one request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT})")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--inject-faults", default=None, metavar="SPEC",
                        help="testing aid: fail the first chat requests on purpose (see below)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level")
    ns = parser.parse_args(argv)
    try:
        faults = FaultPlan(ns.inject_faults)
    except ValueError as e:
        parser.error(str(e))
    for flag, value in (("--max-batch-size", ns.max_batch_size), ("--max-tokens", ns.max_tokens),
                        ("--max-request-bytes", ns.max_request_bytes)):
        if value < 1:
            parser.error(f"{flag} must be >= 1")

    import uvicorn

    from t2po.engines import engine_for_policy, engine_spec
    from t2po.errors import UserError
    from t2po.locate import check_device, intervention_for, load_local_model

    try:
        engine_spec(ns.engine)  # an unknown engine fails before the model loads
        check_device(ns.device)
        model, tokenizer, description = load_local_model(ns.model, dtype=ns.dtype, device=ns.device)
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"t2po serve: {e}", file=sys.stderr)
        return 2
    intervention = intervention_for(ns.model, enabled=not ns.no_tti, budget=ns.tti_budget)
    name = ns.served_model_name or served_name(ns.model)
    limits = ServeLimits(ns.max_tokens, model_positions(model), ns.max_request_bytes)
    app = build_app(engine_for_policy(ns.engine, model, tokenizer), name, intervention, faults,
                    ns.max_batch_size, limits)

    # Bind first, so that --port 0 can report the port actually taken.
    family = socket.AF_INET6 if ":" in ns.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ns.host, ns.port))
    except OSError as e:
        print(f"t2po serve: cannot bind {ns.host}:{ns.port} ({e}); pick another --port (0 = any free port)",
              file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown_host = f"[{ns.host}]" if family == socket.AF_INET6 else ns.host
    injecting = f"; injecting faults: {ns.inject_faults}" if faults.faults else ""
    print(f"t2po serve: {description} as model {name!r} on http://{shown_host}:{port}/v1"
          f"{' (TTI on)' if intervention.enabled else ' (TTI off)'}{injecting}", flush=True)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT
            app.state.batcher.stop()  # generations in progress end at their next token
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=ns.log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
