"""The Search QA environment: response parsing, episodes against a live retrieval server over HTTP,
prompts with history, metrics, and what happens when the server is down."""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest

from t2po.envs import make_env
from t2po.envs.base import EnvState
from t2po.envs.search.corpus import build_corpus
from t2po.envs.search.data import default_data_dir, normalize_answer
from t2po.envs.search.env import NO_RESULTS, aggregate_metrics, format_information, parse_search_action
from t2po.envs.search.server import RetrieverUnavailableError, ServerProcess

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared Search QA data not at {DATA}")


@pytest.mark.parametrize("response, action, valid, reason", [
    ("<think>need facts</think><search> first nobel prize </search>", "<search>first nobel prize</search>", True, ""),
    ("<think>known</think><answer>Paris</answer>", "<answer>Paris</answer>", True, ""),
    ("<think>x</think><SEARCH>Oslo</SEARCH>", "<search>Oslo</search>", True, ""),  # tags are case-insensitive
    # the first block counts; text after the first </search> is cut before extraction
    ("<search>a</search><information>made up</information>", "<search>a</search>", True, ""),
    ("<think>x</think>I think it is Paris", "", False, "no complete"),
    ("<answer>Paris", "", False, "no complete"),
    ("<search>capital</search><answer>Paris</answer>", "<search>capital</search>", False, "both"),
    ("<answer>Paris</answer><answer>Lyon</answer>", "<answer>Paris</answer>", False, "more than one"),
    ("<search>a</search><search>b</search>", "<search>a</search>", False, "more than one"),
    ("<think>x</think><search>  </search>", "<search></search>", False, "empty search query"),
    (None, "", False, "no complete"),
])
def test_parse_search_action(response, action, valid, reason):
    parsed = parse_search_action(response)
    assert (parsed.action, parsed.valid) == (action, valid)
    assert reason in parsed.reason


def test_information_block_uses_search_r1_layout():
    hits = [{"document": {"id": "1", "contents": '"Oslo"\nOslo is the capital of Norway.'}, "score": 3.0},
            {"document": {"id": "2", "contents": '"Bergen"\nBergen is a city.'}, "score": 1.0}]
    assert format_information(hits) == ('<information>Doc 1(Title: "Oslo") Oslo is the capital of Norway.\n'
                                        'Doc 2(Title: "Bergen") Bergen is a city.</information>')
    assert format_information([]) == f"<information>{NO_RESULTS}</information>"


def test_aggregate_metrics_per_data_source():
    episodes = [{"success": 1, "data_source": "nq", "num_searches": 1, "corpus": "c-1"},
                {"success": 0, "data_source": "nq", "num_searches": 3, "corpus": "c-1"},
                {"success": 1, "data_source": "hotpotqa", "num_searches": 2, "corpus": "c-1"}]
    out = aggregate_metrics(episodes)
    assert out["success"] == pytest.approx(2 / 3) and out["success/nq"] == 0.5 and out["success/hotpotqa"] == 1.0
    assert out["episodes/nq"] == 2 and out["num_searches"] == 2.0 and out["corpus"] == "c-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"shared Search QA data not at {DATA}")
    cache = tmp_path_factory.getbasetemp() / "t2po-search-cache"  # shared with test_search_server.py
    corpus = cache / "search" / "corpus.jsonl"
    if not corpus.is_file():
        build_corpus(out=corpus)
    process = ServerProcess(corpus=str(corpus), env={**os.environ, "T2PO_CACHE": str(cache)})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def env(server):
    env = make_env("search", retriever_url=server.url, split="validation")
    yield env
    env.close()


def _act(env, states, responses):
    parsed = [env.parse_action(r, s) if r is not None else None for r, s in zip(responses, states)]
    return parsed, env.step([p.action if p is not None else None for p in parsed])


def test_search_then_correct_answer_gets_reward_one(env):
    # the first validation question whose own text retrieves a passage containing its answer
    for seed in range(30):
        (state,) = env.reset([seed])
        question = env.questions[seed % len(env.questions)]
        assert env.task_description(0) == question.question == state.observation
        _, (after_search,) = _act(env, [state], [f"<think>look it up</think><search>{question.question}</search>"])
        if any(normalize_answer(a) in normalize_answer(after_search.observation) for a in question.golden_answers):
            break
    else:
        pytest.fail("no question in the first 30 retrieves its answer with its own text")
    assert after_search.observation.startswith("<information>Doc 1(Title: ") and not after_search.done
    assert after_search.anchor_obs == after_search.observation  # GiGPO anchor: no history
    assert len(after_search.info["retrieved_ids"]) == 3
    answer = f"<think>found it</think><answer>{question.golden_answers[0]}</answer>"
    parsed, (final,) = _act(env, [after_search], [answer])
    assert parsed[0].valid
    assert final.done and final.won and final.reward == 1.0
    assert final.metrics == {"success": 1, "data_source": question.data_source, "num_searches": 1, "num_turns": 2,
                             "corpus": env.describe()["corpus"]["name"]}


def test_lone_surrogates_in_queries_and_answers(env):
    """UTF-8 cannot encode "\\ud800": the query goes out with "?" in its place, the answer is graded."""
    states = env.reset([0, 1])
    parsed, (searched, answered) = _act(env, states, ["<think>x</think><search>nobel \ud800 prize</search>",
                                                      "<think>x</think><answer>\udfff</answer>"])
    assert (parsed[0].valid and searched.observation.startswith("<information>")
            and searched.info["query"] == "nobel \ud800 prize")
    assert answered.done and answered.reward == 0.0


def test_wrong_answer_invalid_turns_and_the_turn_limit(env):
    states = env.reset([3, 4, 5])
    parsed, states = _act(env, states, ["<think>guess</think><answer>definitely not this</answer>",
                                        "I will not use tags",
                                        "<think>x</think><search>nobel prize physics</search>"])
    wrong, invalid, searched = states
    assert wrong.done and not wrong.won and wrong.reward == 0.0 and wrong.metrics["success"] == 0
    assert not parsed[1].valid and invalid.observation == "" and not invalid.done
    assert searched.observation.startswith("<information>")
    with pytest.raises(ValueError, match="done"):
        env.step(["<answer>again</answer>", None, None])
    # keep searching: turns 2 and 3 search, turn 4 (= max_steps) ends the episode unanswered
    for turn in (2, 3, 4):
        _, (_, invalid, searched) = _act(env, [None, invalid, searched],
                                         [None, "<search>x</search>", f"<search>query {turn}</search>"])
    assert searched.done and searched.reward == 0.0 and searched.metrics["num_searches"] == 3
    assert searched.metrics["num_turns"] == 4 and invalid.done


def test_prompt_shows_the_last_history_length_steps(env):
    (state,) = env.reset([7])
    question = env.task_description(0)
    first = env.render_prompt(0, [], state)
    assert question in first and "History:" not in first and "<search> your query </search>" in first
    history = [(state.observation, "<search>q1</search>"), ("<information>r1</information>", "<search>q2</search>")]
    current = EnvState(observation="<information>r2</information>")
    prompt = env.render_prompt(0, history, current)
    assert "already taken 2 step(s)" in prompt
    assert "Step 1:<search>q1</search> <information>r1</information>" in prompt
    assert "Step 2:<search>q2</search> <information>r2</information>" in prompt
    env.history_length = 1
    try:
        short = env.render_prompt(0, history, current)
    finally:
        env.history_length = 4
    assert "Step 1:" not in short and "Step 2:<search>q2</search> <information>r2</information>" in short


def test_describe_and_splits(env, server):
    info = env.describe()
    health = httpx.get(server.url + "/health", trust_env=False).json()
    assert info["corpus"] == health["corpus"] and info["retriever_url"] == server.url
    assert info["max_steps"] == 4 and info["history_length"] == 4 and info["topk"] == 3
    train = make_env("search", retriever_url=server.url, split="train", data_sources=["hotpotqa"])
    try:
        assert {q.data_source for q in train.questions} == {"hotpotqa"}
        assert not {q.question for q in train.questions} & {q.question for q in env.questions}
        assert env.reset([11])[0].observation == env.reset([11 + len(env.questions)])[0].observation
    finally:
        train.close()


@needs_data
def test_env_fails_clearly_when_the_server_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailableError,
                       match=f"127.0.0.1:{port}.*serve-retriever.*env.options.retriever_url="):
        make_env("search", retriever_url=f"http://127.0.0.1:{port}", timeout=1.0)
    assert time.monotonic() - start < 8.0


@needs_data
def test_in_process_server_when_no_url_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": '"Oslo"\nOslo is the capital of Norway.'}) + "\n"
                      + json.dumps({"id": "1", "contents": '"Paris"\nParis is the capital of France.'}) + "\n")
    env = make_env("search", corpus=str(corpus), split="validation", data_sources=["nq"])
    url = env.retriever_url
    assert url.startswith("http://127.0.0.1:") and env.describe()["in_process_server"]
    assert env.describe()["corpus"]["num_passages"] == 2
    (state,) = env.reset([0])
    (after,) = env.step(["<search>Norway</search>"])
    assert after.observation == '<information>Doc 1(Title: "Oslo") Oslo is the capital of Norway.</information>'
    env.close()
    env.close()  # safe twice
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=1.0, trust_env=False)
    with pytest.raises(ValueError, match="retriever_url"):
        make_env("search", retriever_url=url, corpus=str(corpus))


@pytest.mark.parametrize("options, problem", [
    ({"split": "test"}, "Unknown split 'test'"),
    ({"data_sources": ["triviaqa"]}, "data_sources must be a non-empty subset"),
    ({"topk": 0}, "topk must be at least 1"),
    ({"max_steps": 0}, "max_steps must be at least 1"),
])
def test_bad_options_fail_before_any_server_starts(options, problem):
    with pytest.raises(ValueError, match=problem):
        make_env("search", **options)


def test_search_has_no_expert_and_says_what_to_do(env):
    from t2po.sft import play_expert_episodes

    with pytest.raises(ValueError, match="'search' has no expert; use `t2po rft collect` with a model"):
        play_expert_episodes(env, [0, 1])


def _regex_projection(text: str) -> tuple[str, bool]:
    """verl-agent's search projection (agent_system/environments/env_package/search/projection.py,
    `search_projection`) as regexes, as this module had it: the reference for the one-scan parser."""
    import re

    lowered = text.lower()
    if "</search>" in lowered:
        text_cut = text[: lowered.index("</search>") + len("</search>")]
    elif "</answer>" in lowered:
        text_cut = text[: lowered.index("</answer>") + len("</answer>")]
    else:
        text_cut = text
    search = re.search(r"<search>(.*?)</search>", text_cut, re.IGNORECASE | re.DOTALL)
    answer = re.search(r"<answer>(.*?)</answer>", text_cut, re.IGNORECASE | re.DOTALL)
    if search:
        action, empty = f"<search>{search.group(1).strip()}</search>", not search.group(1).strip()
    elif answer:
        action, empty = f"<answer>{answer.group(1).strip()}</answer>", False
    else:
        return "", False
    n_search = len(re.findall(r"<search>", text, re.IGNORECASE))
    n_answer = len(re.findall(r"<answer>", text, re.IGNORECASE))
    return action, not (n_search and n_answer) and n_search <= 1 and n_answer <= 1 and not empty


def test_one_scan_parser_matches_the_regex_projection_in_linear_time():
    import random

    rng = random.Random(0)
    parts = ["<search>", "</search>", "<answer>", "</answer>", "<SEARCH>", "</Answer>", "x", " ", "<think>", "y "]
    for _ in range(20_000):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(8)))
        parsed = parse_search_action(text)
        assert (parsed.action, parsed.valid) == _regex_projection(text), text
    start = time.perf_counter()
    assert not parse_search_action("<think>x</think>" + "<answer>" * 100_000).valid  # the regexes: minutes
    assert time.perf_counter() - start < 2.0
