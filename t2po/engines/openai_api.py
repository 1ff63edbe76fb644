"""An agent behind an OpenAI-compatible chat-completions API (OpenAI, vLLM, llama.cpp, `t2po serve`, ...).

One request per turn: the environment's prompt (`env.render_prompt`, the same text a local model gets
through its chat template) is the only user message. The answer is parsed by the environment like a
local model's response; an empty or malformed answer becomes the empty response, i.e. an invalid action.
A 200 answer whose body is not JSON at all (a proxy's error page) is retried like a 5xx first; token
usage that is not a pair of non-negative integers counts as not reported.

Retries are this module's own loop around the official `openai` client (built with `max_retries=0`),
so that they are visible (counted per request, reported by `t2po eval`) and testable: HTTP 408/409/429,
5xx, timeouts and dropped connections are retried with exponential back-off (doubling from `backoff`
seconds, capped at `max_backoff`, at least the server's `Retry-After`); any other refusal (401 bad key,
404 unknown model or URL, 400 bad request) stops with an `APIError` that says what to fix.

The API key is read from an environment variable by name (`api_key_from_env`) and handed only to the
client; it is never stored on the agent, printed, or written anywhere.

    agent = OpenAIChatAgent("https://api.openai.com/v1", "gpt-4o-mini", api_key_from_env("OPENAI_API_KEY"))
    reply = agent.respond("You are in the middle of a room ...")
    reply.text, reply.prompt_tokens, reply.attempts
"""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from t2po.errors import UserError

#: HTTP statuses worth another try (request timeout, conflict, rate limit, server errors)
RETRYABLE_STATUS = frozenset({408, 409, 429})


class APIError(UserError, RuntimeError):
    """A request the server refused for good, or that failed after every retry; the message says what
    happened and what to do."""


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off for retryable failures: wait `backoff * 2**k` seconds before retry k+1 (capped at
    `max_backoff`, and never less than the server's `Retry-After`), at most `max_retries` retries."""

    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0

    def wait(self, retry: int, retry_after: float | None = None) -> float:
        delay = min(self.backoff * 2**retry, self.max_backoff)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay


@dataclass
class APIReply:
    """One answered turn."""

    text: str  # the assistant message; "" when the answer was empty or malformed (an invalid action)
    prompt_tokens: int  # as reported by the server's `usage` (0 when it reports none)
    completion_tokens: int
    finish_reason: str  # the server's ("stop", "length", ...), or "empty" / "malformed"
    attempts: int  # requests sent for this turn (1 = no retry)
    # one per retry: "429", "503", "timeout", "connection", "notjson"
    retry_reasons: list[str] = field(default_factory=list)
    latency_s: float = 0.0  # wall time of the turn, retries and back-off included
    usage_reported: bool = True  # False when the server sent no token usage (or negative counts)


def api_key_from_env(name: str) -> str:
    """The API key in environment variable `name` (never logged)."""
    key = os.environ.get(name, "")
    if not key.strip():
        raise APIError(
            f"the environment variable {name} holds no API key: export {name}=... (or name another variable "
            "with --api-key-env). A server without authentication, such as `t2po serve`, accepts any value, "
            f"e.g. {name}=none."
        )
    return key.strip()


class OpenAIChatAgent:
    """Chat completions from `model` at `base_url` (for OpenAI: https://api.openai.com/v1).

    Sampling parameters set to None are not sent (the server's defaults apply). `top_k` is not part of
    the OpenAI API; it is sent in the request body only when set (vLLM, llama.cpp and `t2po serve`
    accept it). `reasoning_api=True` uses the request format of OpenAI reasoning models:
    `max_completion_tokens` instead of `max_tokens` (it then also bounds the hidden reasoning tokens)
    and no temperature, top-p, top-k or seed, which those models reject.

    Prices are US dollars per million input / output tokens, for the cost in `cost_usd`.
    Thread-safe: one agent serves every worker thread of an evaluation.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        max_tokens: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        reasoning_api: bool = False,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        price_input_per_1m: float = 0.0,
        price_output_per_1m: float = 0.0,
    ) -> None:
        if not base_url or "://" not in base_url:
            raise APIError(f"api base URL {base_url!r} is not a URL: pass e.g. https://api.openai.com/v1 or "
                           "http://127.0.0.1:8000/v1")
        if not model:
            raise APIError("no model name: pass --model NAME (the server's /v1/models lists them)")
        if max_tokens < 1 or timeout <= 0 or retry.max_retries < 0 or retry.backoff < 0:
            raise APIError("max_tokens must be >= 1, timeout > 0, max_retries >= 0 and backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.reasoning_api = reasoning_api
        self.timeout = timeout
        self.retry = retry
        self.price_input_per_1m = price_input_per_1m
        self.price_output_per_1m = price_output_per_1m
        # retries are ours (see the module docstring): the client itself never retries
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout)

    def __repr__(self) -> str:  # no key in any repr
        return f"OpenAIChatAgent(base_url={self.base_url!r}, model={self.model!r})"

    def describe(self) -> dict[str, Any]:
        """What determines the answers (recorded with the results; holds no secret)."""
        return {
            "api_base": self.base_url,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": None if self.reasoning_api else self.temperature,
            "top_p": None if self.reasoning_api else self.top_p,
            "top_k": None if self.reasoning_api else self.top_k,
            "reasoning_api": self.reasoning_api,
        }

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_1m + completion_tokens * self.price_output_per_1m) / 1e6

    def messages(self, prompt: str, image: Any = None) -> list[dict[str, Any]]:
        """The chat messages of one turn: the prompt as the single user message. An image observation
        (PIL image) goes in as a PNG data URL where the prompt has its `<image>` placeholder."""
        if image is None:
            return [{"role": "user", "content": prompt}]
        before, sep, after = prompt.partition("<image>")
        if not sep:
            before, after = "", prompt
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        parts: list[dict[str, Any]] = []
        if before:
            parts.append({"type": "text", "text": before})
        parts.append({"type": "image_url", "image_url": {"url": url}})
        if after:
            parts.append({"type": "text", "text": after})
        return [{"role": "user", "content": parts}]

    def _request(self, prompt: str, image: Any, seed: int | None) -> dict[str, Any]:
        request: dict[str, Any] = {"model": self.model, "messages": self.messages(prompt, image)}
        if self.reasoning_api:
            request["max_completion_tokens"] = self.max_tokens
            return request
        request["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if self.top_p is not None:
            request["top_p"] = self.top_p
        if self.top_k is not None:
            request["extra_body"] = {"top_k": self.top_k}
        if seed is not None:
            request["seed"] = seed
        return request

    def respond(self, prompt: str, image: Any = None, seed: int | None = None) -> APIReply:
        """Answer one turn, retrying retryable failures (see the module docstring).
        Raises `APIError` when the request is refused for good or every retry failed."""
        request = self._request(prompt, image, seed)
        start = time.monotonic()
        reasons: list[str] = []
        while True:
            try:
                response = self._client.chat.completions.create(**request)
                break
            except openai.APIStatusError as e:
                if not (e.status_code in RETRYABLE_STATUS or e.status_code >= 500):
                    raise APIError(self._refusal_message(e)) from None
                reason, retry_after = str(e.status_code), _retry_after_seconds(e.response)
            except openai.APITimeoutError:
                reason, retry_after = "timeout", None
            except openai.APIConnectionError:
                reason, retry_after = "connection", None
            except (ValueError, openai.APIResponseValidationError):  # a 200 whose body is not JSON
                reason, retry_after = "notjson", None
            if len(reasons) >= self.retry.max_retries:
                if reason == "notjson":  # an answer, just unreadable: the empty response, an invalid action
                    return APIReply("", 0, 0, "malformed", len(reasons) + 1, reasons, time.monotonic() - start,
                                    usage_reported=False)
                raise APIError(
                    f"{self.base_url}: no answer after {len(reasons) + 1} attempts (failures: "
                    f"{', '.join(reasons + [reason])}). "
                    "The server may be overloaded or down: rerun later (finished episodes are kept), or raise "
                    "--max-retries / --request-timeout."
                ) from None
            time.sleep(self.retry.wait(len(reasons), retry_after))
            reasons.append(reason)
        text, finish, usage = _read_completion(response)
        return APIReply(
            text=text,
            prompt_tokens=usage[0] if usage else 0,
            completion_tokens=usage[1] if usage else 0,
            finish_reason=finish,
            attempts=len(reasons) + 1,
            retry_reasons=reasons,
            latency_s=time.monotonic() - start,
            usage_reported=usage is not None,
        )

    def _refusal_message(self, e: openai.APIStatusError) -> str:
        detail = _error_detail(e)
        hint = {
            401: "the API key was rejected: check the variable named by --api-key-env",
            403: "the key may not use this model or endpoint",
            404: f"check --api-base (usually ends in /v1; now {self.base_url}) and --model ({self.model!r}; the "
                 "server's /v1/models lists its models)",
        }.get(e.status_code, "the request was refused; see the server's message")
        return f"{self.base_url} answered HTTP {e.status_code}: {detail} ({hint})"


def _error_detail(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
    return str(e.message)[:500]


def _retry_after_seconds(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after")))
    except (AttributeError, TypeError, ValueError):
        return None


def _read_completion(response: Any) -> tuple[str, str, tuple[int, int] | None]:
    """(text, finish_reason, (prompt_tokens, completion_tokens) or None) of a chat completion; any
    answer that is not a chat completion with a text message yields ("", "malformed"), an empty
    message ("", "empty")."""
    usage = None
    try:
        u = response.usage
        counts = (u.prompt_tokens, u.completion_tokens) if u is not None else ()
        if counts and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            usage = counts
    except AttributeError:
        pass
    try:
        choice = response.choices[0]
        content = choice.message.content
        finish = choice.finish_reason
    except (AttributeError, IndexError, KeyError, TypeError):
        return "", "malformed", usage
    if content is None or content == "":
        return "", "empty", usage
    if not isinstance(content, str):
        return "", "malformed", usage
    return content, str(finish or "stop"), usage
