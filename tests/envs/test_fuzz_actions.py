"""Hostile model output in every environment: random, huge (1 MB), unicode and surrogate-laden text
through `parse_action` and `step`. Each must give a clean `ParsedAction` and `EnvState` (never an
exception), an invalid action where the text has no valid action, within a time bound proportional to
the input (a parser with quadratic backtracking takes minutes on 1 MB)."""

from __future__ import annotations

import json
import random
import time

import pytest

from t2po.envs import EnvState, ParsedAction, list_envs, make_env
from t2po.envs.alfworld.games import find_games_root
from t2po.envs.search.data import default_data_dir

MB = 1 << 20
# seconds allowed for one parse + step: a fixed part plus a part per character (linear at about a
# microsecond per character; quadratic behaviour on 1 MB is thousands of times slower)
BASE_S, PER_CHAR_S = 0.5, 3e-6


def hostile_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def random_unicode(n: int) -> str:
        # any code point, lone surrogates included (U+D800-U+DFFF), CJK, NUL, RTL and combining marks
        return "".join(chr(rng.choice([rng.randrange(0x110000), rng.randrange(0xD800, 0xE000), rng.randrange(128)]))
                       for _ in range(n))

    tags = ["<think>", "</think>", "<action>", "</action>", "<search>", "</search>", "<answer>", "</answer>",
            "[", "]", "(", ")"]
    texts = [
        "", " ", "\x00", "\ud800", "\udfff\ud800", "<think>\ud800</think><action>\ud800</action>",
        "<think>x</think><action>search[t-shirt size s]\udc80</action>", "<think>x</think><search>\ud800</search>",
        "<think>一</think><action>up</action>", "<think>x</think><action>" + "9" * 5000 + "</action>",
        "<think>x</think><action>(" * 3 + ")" * 3, "<think>x</think><action>" + "(" * 10_000 + "</action>",
        random_unicode(2000), "".join(rng.choice(tags) for _ in range(3000)),
    ]
    for pattern in ("<answer>", "<search>", "<action>", "<think>", "[", "search[", "click[", "(", "\ud800", "<", "a["):
        texts.append("<think>x</think>" + pattern * (MB // len(pattern)))  # the quadratic-parser traps, 1 MB each
    texts.append("<think>x</think><action>" + "a" * MB + "</action>")
    texts.append("<think>x</think><action>search[" + "word " * (MB // 5) + "]</action>")
    texts.append("<think>x</think><search>" + "word " * (MB // 5) + "</search>")
    texts.append(random_unicode(MB // 4))
    return texts


ENV_OPTIONS = {
    "sokoban": {"dim_room": (6, 6), "num_boxes": 1},
    "ezpoints": {"observation_mode": "text"},
    "points24": {"observation_mode": "text"},
    "numberline": {"observation_mode": "text"},
    "blackjack": {"observation_mode": "text"},
    "webshop": {"num_products": 300},
    "alfworld": {"split": "valid_seen", "num_workers": 1},
    "search": {"split": "validation", "data_sources": ["nq"]},
}


def _available(name: str) -> str | None:
    """Why `name` cannot be built here (None: it can)."""
    if name == "alfworld":
        try:
            find_games_root()
        except (FileNotFoundError, ValueError) as e:
            return str(e)
    if name == "search" and not default_data_dir().is_dir():
        return f"shared Search QA data not at {default_data_dir()}"
    return None


def test_every_registered_environment_is_fuzzed():
    assert set(ENV_OPTIONS) == set(list_envs())


@pytest.mark.parametrize("name", sorted(ENV_OPTIONS))
def test_hostile_output_is_a_clean_invalid_action(name, tmp_path, monkeypatch):
    if (why := _available(name)) is not None:
        pytest.skip(why)
    options = dict(ENV_OPTIONS[name])
    if name == "search":  # an in-process retrieval server over a two-passage corpus
        monkeypatch.setenv("T2PO_CACHE", str(tmp_path / "cache"))
        corpus = tmp_path / "tiny.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"{t}"\n{t} is a city.'}) + "\n"
                                  for i, t in enumerate(["Oslo", "Paris"])))
        options["corpus"] = str(corpus)
    texts = hostile_texts()
    if name == "alfworld":  # every step is a TextWorld process round trip: the trap texts only
        texts = texts[:6] + texts[-5:]
    with make_env(name, **options) as env:
        (state,) = env.reset([0])
        for k, text in enumerate(texts):
            if state.done:
                (state,) = env.reset([k])
            start = time.perf_counter()
            parsed = env.parse_action(text, state)
            (after,) = env.step([parsed.action])
            elapsed = time.perf_counter() - start
            assert isinstance(parsed, ParsedAction) and isinstance(parsed.action,
                                                                   str) and isinstance(parsed.valid, bool)
            assert isinstance(after, EnvState) and isinstance(after.observation, str)
            if not any(tag in text for tag in ("</action>", "</search>", "</answer>")):
                assert not parsed.valid, (name, text[:80])
            assert elapsed < BASE_S + PER_CHAR_S * len(text), (
                f"{name}: {elapsed:.2f} s for {len(text):,} characters: {text[:60]!r}")
            state = after
        assert not env.parse_action(None, state).valid  # not even text
