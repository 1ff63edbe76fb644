"""`t2po serve` and the API agent: the tiny model behind a real OpenAI-compatible HTTP server on
loopback, queried with the official `openai` client (`OpenAIChatAgent`), with injected faults."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from helpers import wait_for_server
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.engines.openai_api import APIError, OpenAIChatAgent, RetryPolicy
from t2po.rollout import build_prompt_ids
from t2po.serve import DEFAULT_MAX_REQUEST_BYTES, GenerationBatcher, _StreamedText, build_app
from t2po.testing import FaultPlan

PROMPT = "You are solving the Sokoban puzzle. Think step by step inside <think> </think> tags, then give your action."


@contextlib.contextmanager
def serving(engine, faults: str | None = None, name: str = "tiny"):
    """`build_app` under uvicorn in a thread, on a free loopback port; yields the /v1 base URL."""
    app = build_app(engine, name, InterventionConfig(), FaultPlan(faults))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        yield base + "/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tokenizer = tiny_model
    return HFEngine(model, tokenizer)


def agent_for(base_url: str, **kw) -> OpenAIChatAgent:
    kw = {"retry": RetryPolicy(max_retries=4, backoff=0.01), "timeout": 30.0, "temperature": 0.0, **kw}
    return OpenAIChatAgent(base_url, "tiny", "sk-test", max_tokens=12, **kw)


def test_served_answer_equals_local_engine_answer(engine, tiny_model):
    """The server renders messages like the rollout and decodes with the same engine and TTI: a seeded
    sample and its token counts match a direct `HFEngine` call."""
    _, tokenizer = tiny_model
    prompt_ids, _ = build_prompt_ids(tokenizer, PROMPT)
    local = engine.generate([prompt_ids], SamplingParams(temperature=1.0, max_new_tokens=12, seed=123),
                            InterventionConfig())[0]
    with serving(engine) as url:
        reply = agent_for(url, temperature=1.0, top_p=1.0).respond(PROMPT, seed=123)
    assert len(set(local.text)) > 1, "a non-trivial sample"
    assert reply.text == local.text
    assert reply.prompt_tokens == len(prompt_ids)
    assert reply.completion_tokens == local.num_tokens
    assert reply.attempts == 1 and reply.retry_reasons == []
    assert reply.finish_reason == local.finish_reason


def test_openai_client_streams_gets_n_choices_and_logprobs(engine, tiny_model):
    """The official client against the real server: a stream's deltas add up to the non-streamed answer
    of the same seed, token by token as decoded; n=2 gives two different samples; log-probs are the
    engine's, with the top alternatives, the chosen token among them."""
    _, tokenizer = tiny_model
    prompt_ids, _ = build_prompt_ids(tokenizer, PROMPT)
    local = engine.generate([prompt_ids], SamplingParams(temperature=1.0, max_new_tokens=12, seed=7),
                            InterventionConfig(), top_logprobs=3)[0]
    messages = [{"role": "user", "content": PROMPT}]
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        ask = dict(model="tiny", messages=messages, max_tokens=12, temperature=1.0, seed=7)
        chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        answer = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
        two, two_again = (client.chat.completions.create(**ask, n=2) for _ in range(2))
        streamed_two = list(client.chat.completions.create(**ask, n=2, stream=True, logprobs=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 2, "text arrives in pieces"
    assert "".join(deltas) == answer.choices[0].message.content == local.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == local.finish_reason
    assert chunks[-1].usage.completion_tokens == local.num_tokens and chunks[-1].choices == []
    content = answer.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(local.logprobs, abs=1e-5)
    assert [t.token for t in content] == [tokenizer.decode([i]) for i in local.token_ids]
    for token, (chosen, alternatives) in zip(content, zip(local.token_ids, local.top_logprobs)):
        assert len(token.top_logprobs) == 3 and [a.logprob
                for a in token.top_logprobs] == sorted([a.logprob for a in token.top_logprobs], reverse=True)
        assert token.top_logprobs[0].logprob == pytest.approx(alternatives[0][1], abs=1e-5)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].message.content != two.choices[0].message.content
    # seeded: reproducible
    assert [c.message.content for c in two.choices] == [c.message.content for c in two_again.choices]
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in streamed_two if c.choices
                       and c.choices[0].index == index)
        assert text == two.choices[index].message.content
        last = [c.choices[0] for c in streamed_two if c.choices and c.choices[0].index == index][-1]
        assert last.finish_reason is not None and len(last.logprobs.content) > 0


def test_a_stream_holds_back_text_that_may_begin_a_stop_string():
    class Chars:  # one character per token id
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    text = _StreamedText(Chars(), ["END"])
    sent = [text.add(ord(c)) for c in "ab EN"]
    assert sent == ["a", "b", " ", "", ""]  # "E", "EN" may begin "END"
    assert text.add(ord("X")) == "ENX"
    assert text.finish("ab ENX tail") == " tail"


def test_agent_retries_429_and_5xx_with_backoff(engine):
    with serving(engine, "429*2,503") as url:
        reply = agent_for(url).respond(PROMPT)
    assert reply.attempts == 4
    assert reply.retry_reasons == ["429", "429", "503"]
    assert reply.finish_reason in ("stop", "length")
    assert reply.completion_tokens > 0


def test_agent_retries_a_request_that_times_out(engine):
    with serving(engine, "sleep=3") as url:
        reply = agent_for(url, timeout=0.5).respond(PROMPT)
    # the client gave up on the slow answer after its timeout and got the retry's answer
    assert reply.retry_reasons == ["timeout"] and reply.attempts == 2
    assert reply.finish_reason in ("stop", "length")


def test_agent_gives_up_after_max_retries_with_a_clear_error(engine):
    with serving(engine, "500*5") as url:
        with pytest.raises(APIError, match=r"no answer after 3 attempts \(failures: 500, 500, 500\)"):
            agent_for(url, retry=RetryPolicy(max_retries=2, backoff=0.01)).respond(PROMPT)


def test_agent_does_not_retry_refusals(engine):
    with serving(engine, "401,401") as url:
        with pytest.raises(APIError, match="HTTP 401.*api-key-env"):
            agent_for(url).respond(PROMPT)
        # the second fault is still pending: exactly one request was sent
        with pytest.raises(APIError, match="HTTP 401"):
            agent_for(url).respond(PROMPT)
        assert agent_for(url).respond(PROMPT).attempts == 1
        with pytest.raises(APIError, match=r"HTTP 404.*'gpt-none' does not exist; this server serves 'tiny'"):
            OpenAIChatAgent(url, "gpt-none", "sk-test").respond(PROMPT)


def test_empty_and_malformed_answers_become_empty_text(engine):
    with serving(engine, "empty,malformed") as url:
        agent = agent_for(url)
        empty, malformed = agent.respond(PROMPT), agent.respond(PROMPT)
    assert (empty.text, empty.finish_reason) == ("", "empty")
    assert (malformed.text, malformed.finish_reason, malformed.usage_reported) == ("", "malformed", False)


def test_an_answer_that_is_not_json_is_retried_then_an_invalid_action(engine):
    with serving(engine, "notjson,notjson") as url:
        assert agent_for(url).respond(PROMPT).retry_reasons == ["notjson", "notjson"]  # then answered
        assert agent_for(url).respond(PROMPT).attempts == 1
    with serving(engine, "notjson*3") as url:
        reply = agent_for(url, retry=RetryPolicy(max_retries=2, backoff=0.01)).respond(PROMPT)
    assert (reply.text, reply.finish_reason, reply.attempts, reply.usage_reported) == ("", "malformed", 3, False)


def test_negative_or_odd_token_usage_counts_as_not_reported():
    from types import SimpleNamespace

    from t2po.engines.openai_api import _read_completion

    choice = SimpleNamespace(message=SimpleNamespace(content="hi"), finish_reason="stop")
    for prompt_tokens, completion_tokens in ((-5, 3), (5, -1), (True, 2), (1.5, 2)):
        usage = SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        assert _read_completion(SimpleNamespace(choices=[choice], usage=usage)) == ("hi", "stop", None)
    usage = SimpleNamespace(prompt_tokens=7, completion_tokens=0)
    assert _read_completion(SimpleNamespace(choices=[choice], usage=usage)) == ("hi", "stop", (7, 0))


def test_invalid_requests_get_openai_style_errors(engine):
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        with pytest.raises(openai.BadRequestError,
                           match="tools is not supported by t2po serve; the fields it serves: model, messages"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        with pytest.raises(openai.BadRequestError,
                           match="presence_penalty=0.5 is not supported by t2po serve; leave it out"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           presence_penalty=0.5)
        with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
        with pytest.raises(openai.BadRequestError, match="n=17 is out of range"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=17)
        with pytest.raises(openai.BadRequestError, match="temperature=5.*out of range"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
        with pytest.raises(openai.BadRequestError, match="text-only model"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
        response = httpx.post(f"{url}/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1, temperature=0)
        assert answer.usage.completion_tokens == 1 and answer.choices[0].finish_reason == "length"


def test_limits_and_hostile_bodies_are_answered_400(engine):
    """Each limit is named in the 400 answer; nothing here reaches the engine as a 500."""
    with serving(engine) as url:
        def post(body: bytes | dict) -> tuple[int, str]:
            kw = {"json": body} if isinstance(body, dict) else {"content": body,
                                                                "headers": {"content-type": "application/json"}}
            reply = httpx.post(f"{url}/chat/completions", timeout=60, **kw)
            return reply.status_code, reply.json()["error"]["message"]

        hi = [{"role": "user", "content": "hi"}]
        assert post({"model": "tiny", "messages": hi, "max_tokens": 10**9}) == (
            400, "max_tokens=1000000000 is more than this server's limit of 4096 new tokens (t2po serve --max-tokens)")
        assert post({"model": "tiny", "messages": hi, "max_tokens": 10**400})[0] == 400
        status, message = post({"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}],
                                "max_tokens": 4000})
        assert status == 400 and "exceed the model's 4096 positions: ask for at most" in message
        status, message = post({"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]})
        assert status == 400 and "the model has 4096 positions" in message
        status, message = post({"model": "tiny",
                                "messages": [{"role": "user", "content": "x" * DEFAULT_MAX_REQUEST_BYTES}]})
        assert status == 400 and f"limit of {DEFAULT_MAX_REQUEST_BYTES} bytes" in message
        status, message = post(b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
        assert status == 400 and "lone surrogate" in message and "messages[0].content" in message
        status, message = post(b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": '
                               b'["\\udfff"]}')
        assert status == 400 and "stop[0] holds a lone surrogate" in message
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            status, message = post(b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": '
                                   + constant + b"}")
            assert status == 400 and "not a JSON number" in message
        assert post(b"[" * 200_000 + b"]" * 200_000) == (400, "the request body is nested too deeply")
        assert post(b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}')[0] == 400  # not UTF-8
        # still serving, and a prompt near the positions limit gets the rest as its default max_tokens
        answer = httpx.post(f"{url}/chat/completions",
                            json={"model": "tiny", "messages": hi, "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 2


class RecordingEngine(HFEngine):
    """The real engine on a model that never ends a response by itself (no EOS), recording each call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.eos_token_ids = set()
        self.calls: list[tuple[float, list]] = []

    def generate(self, prompts, sampling, intervention=None, **kw):
        start = time.monotonic()
        generations = super().generate(prompts, sampling, intervention, **kw)
        self.calls.append((time.monotonic() - start, generations))
        return generations


def test_a_client_that_hangs_up_frees_the_server(tiny_model):
    """A 4,000-token request (about 15 s of decoding here) whose client times out after 1 s stops
    at the next token; the next request is answered within seconds."""
    model, tokenizer = tiny_model
    engine = RecordingEngine(model, tokenizer)
    with serving(engine) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/chat/completions", json=body, timeout=1.0)
        start = time.monotonic()
        reply = httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        waited = time.monotonic() - start
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    (_, (abandoned,)), (_, (answered,)) = engine.calls
    assert abandoned.finish_reason == "cancelled" and abandoned.num_tokens < 4000
    assert answered.num_tokens == 3
    assert waited < 5.0


def test_batcher_stop_ends_generations_in_progress(tiny_model):
    """`stop()` (what SIGTERM calls) ends a running generation at its next token and refuses queued ones."""
    model, tokenizer = tiny_model
    engine = RecordingEngine(model, tokenizer)
    batcher = GenerationBatcher(engine, InterventionConfig())
    long = SamplingParams(max_new_tokens=4000)
    running = batcher.submit([1, 2, 3], long)
    time.sleep(0.5)
    queued = batcher.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
    start = time.monotonic()
    batcher.close()
    assert time.monotonic() - start < 3.0
    assert running.result(timeout=1).finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="shutting down"):
        queued.result(timeout=1)


class BlockingEngine(HFEngine):
    """The real engine, holding its first call until released and recording each call's batch size."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.batch_sizes: list[int] = []

    def generate(self, prompts, sampling, intervention=None, **kw):
        self.release.wait(timeout=30)
        self.batch_sizes.append(len(prompts))
        return super().generate(prompts, sampling, intervention, **kw)


def test_batcher_groups_waiting_requests_with_equal_sampling(tiny_model):
    model, tokenizer = tiny_model
    engine = BlockingEngine(model, tokenizer)
    batcher = GenerationBatcher(engine, InterventionConfig(), max_batch_size=8)
    try:
        ids, _ = build_prompt_ids(tokenizer, PROMPT)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
        first = batcher.submit(ids, greedy)
        time.sleep(0.2)  # the worker now holds `first` inside generate
        same = [batcher.submit(ids, SamplingParams(temperature=0.0, max_new_tokens=4, seed=k)) for k in range(3)]
        other = batcher.submit(ids, SamplingParams(temperature=1.0, max_new_tokens=4))
        engine.release.set()
        results = [f.result(timeout=60) for f in [first, *same, other]]
    finally:
        batcher.close()
    assert engine.batch_sizes == [1, 3, 1]
    assert all(r.prompt_tokens == len(ids) and 1 <= r.num_tokens <= 4 for r in results)


def test_fault_spec_parsing():
    plan = FaultPlan("429*2, sleep=1.5,empty,malformed,503,notjson")
    kinds = [(f.kind, f.value) for f in plan.faults]
    assert kinds == [("status", 429), ("status", 429), ("sleep", 1.5), ("empty", 0), ("malformed", 0),
                     ("status", 503), ("notjson", 0)]
    assert [plan.take() for _ in range(8)][-1] is None
    for bad in ("429x2", "sleep", "200", "teapot"):
        with pytest.raises(ValueError, match="--inject-faults"):
            FaultPlan(bad)


def test_retry_policy_backoff_doubles_caps_and_honours_retry_after():
    policy = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=3.0)
    assert [policy.wait(k) for k in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.wait(0, retry_after=2.5) == 2.5
    assert policy.wait(0, retry_after=100) == 3.0


def test_serve_command_in_a_subprocess(tiny_model_dir, tmp_path):
    """`t2po serve MODEL --port 0` prints its address, answers /health, /v1/models and chat requests
    while another request hangs (an injected 60 s sleep), and SIGTERM ends it within 10 s anyway."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "t2po.serve", str(tiny_model_dir), "--port", "0",
                                 "--log-level", "warning",
                                 "--inject-faults", "sleep=60"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = wait_for_server(proc, log)
        assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok", "model": tiny_model_dir.name}
        assert [m["id"] for m in httpx.get(url + "/models").json()["data"]] == [tiny_model_dir.name]
        messages = [{"role": "user", "content": PROMPT}]
        def hang() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url + "/chat/completions",
                           json={"model": tiny_model_dir.name, "messages": messages}, timeout=90)

        threading.Thread(target=hang, daemon=True).start()
        time.sleep(0.5)  # it holds the sleep fault now
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        answer = client.chat.completions.create(model=tiny_model_dir.name, messages=messages, max_tokens=5)
        assert answer.usage.completion_tokens <= 5 and answer.choices[0].message.role == "assistant"
        start = time.monotonic()
        proc.terminate()
        proc.wait(timeout=10)
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
