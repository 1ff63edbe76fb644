"""The response format check (t2po/envs/parsing.py): strict by default, as the reference, with a
lenient option."""

import pytest

from t2po.config import ConfigError, load_config
from t2po.envs import make_env
from t2po.envs.parsing import parse_think_action

VALID = "<think>the box is left of me</think><action>left</action>"


@pytest.mark.parametrize(
    "response, reason",
    [
        (VALID + " and then I go up", "text after </action>"),
        ("<think>push it</think> so: <action>left</action>", "text between </think> and <action>"),
        # after a forced close the model often writes a second </think>
        ("<think>hmm</think> more thoughts</think><action>left</action>", "repeated </think> tag"),
        ("<think>a</think><action>left</action><action>up</action>", "repeated <action> tag"),
        ("<think>a</think><think>b</think><action>left</action>", "repeated <think> tag"),
        ("Sure! <think>a</think><action>left</action>", "text before <think>"),
    ],
)
def test_strict_format_rejects_what_the_lenient_one_accepts(response, reason):
    """The reference's format as issue 18 states it (the T2PO authors' code; docs/method.md §2 response form):
    exactly one think span, then one action span, nothing else but whitespace. The extracted action
    is still returned (the environment plays it, penalised)."""
    strict = parse_think_action(response, ["left", "up"])
    assert (strict.valid, strict.reason, strict.action) == (False, reason, "left")
    assert parse_think_action(response, ["left", "up"], strict=False).valid


@pytest.mark.parametrize("response", [VALID, f"\n  {VALID}\n", "<think>\nline one\nline two\n</think>\n<action> left </action>"])
def test_strict_format_accepts_whitespace_around_the_spans(response):
    assert parse_think_action(response, ["left"]).valid


def test_response_format_is_an_environment_option():
    strict = make_env("sokoban", dim_room=(6, 6), num_boxes=1)
    lenient = make_env("sokoban", dim_room=(6, 6), num_boxes=1, response_format="lenient")
    (state,) = strict.reset([3])
    response = VALID + " done"
    assert not strict.parse_action(response, state).valid
    assert lenient.parse_action(response, state).valid
    with pytest.raises(ValueError, match="response_format must be one of strict, lenient"):
        make_env("sokoban", response_format="loose")


def test_config_checks_the_response_format_option():
    cfg = load_config("default", ["env.options.response_format=lenient"])
    assert cfg.env.options["response_format"] == "lenient"
    with pytest.raises(ConfigError, match="response_format must be one of strict, lenient"):
        load_config("default", ["env.options.response_format=loose"])
