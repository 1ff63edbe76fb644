"""The response format checks (t2po/envs/parsing.py): each environment's reference projection by default
(WillDreamer/T2PO-ICML, agent_system/environments/env_package/*/projection.py; each test quotes the rule it
checks), the strict and lenient checks as options."""

import pytest

from t2po.config import ConfigError, load_config
from t2po.envs import make_env
from t2po.envs.parsing import parse_think_action, reference_think_action

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


@pytest.mark.parametrize("response",
                         [VALID, f"\n  {VALID}\n", "<think>\nline one\nline two\n</think>\n<action> left </action>"])
def test_strict_format_accepts_whitespace_around_the_spans(response):
    assert parse_think_action(response, ["left"]).valid


def test_response_format_is_an_environment_option():
    reference = make_env("sokoban", dim_room=(6, 6), num_boxes=1)
    strict = make_env("sokoban", dim_room=(6, 6), num_boxes=1, response_format="strict")
    lenient = make_env("sokoban", dim_room=(6, 6), num_boxes=1, response_format="lenient")
    (state,) = strict.reset([3])
    response = "<think>hmm</think> more</think><action>left</action> done"  # a second </think> after TTI forced one
    assert reference.response_format == "reference" and reference.parse_action(response, state).valid
    assert not strict.parse_action(response, state).valid
    assert lenient.parse_action(response, state).valid
    with pytest.raises(ValueError, match="response_format must be one of reference, strict, lenient"):
        make_env("sokoban", response_format="loose")


def test_config_checks_the_response_format_option():
    cfg = load_config("default", ["env.options.response_format=lenient"])
    assert cfg.env.options["response_format"] == "lenient"
    with pytest.raises(ConfigError, match="response_format must be one of reference, strict, lenient"):
        load_config("default", ["env.options.response_format=loose"])


# sokoban/projection.py:
#     Expected format:
#         <think>some reasoning...</think><action>up/down/left/right/still</action>
# start_idx = actions[i].find(start_tag)  ...  extracted_action = actions[i][start_idx +
# len(start_tag):end_idx].strip().lower()
#     for act in action_pools.keys():   # "up", "down", "left", "right", "still"
#         if act in extracted_action: actions[i] = action_pools[act]; valids[i] = 1; break
#     think_start_idx = original_str.find("<think>"); think_end_idx = original_str.find("</think>")
#     if think_start_idx == -1 or think_end_idx == -1: valids[i] = 0
@pytest.mark.parametrize("response, action, valid", [
    # its docstring's example
    ("<think>some reasoning...</think><action>up/down/left/right/still</action>", "up", True),
    ("<think>hmm</think> more thoughts</think><action>left</action>", "left", True),  # tags anywhere, repeated
    ("<action>I will move DOWN now</action> <think>because</think>", "down", True),  # any order, a substring, any case
    ("<think>wait</think><action>still</action>", "still", True),  # valid, and moves nothing
    ("<think>x</think><action>jump</action>", "still", False),
    ("x</think><action>right</action>", "right", False),  # no <think>: played, but invalid
    ("<THINK>x</THINK><action>right</action>", "right", False),  # the think check is case-sensitive
    ("<think>x</think></action>up<action>", "still", False),  # </action> before <action>: an empty span
    ("<think>x</think>up", "still", False),
])
def test_sokoban_reference_projection(response, action, valid):
    env = make_env("sokoban", dim_room=(6, 6), num_boxes=1)
    (state,) = env.reset([3])
    parsed = env.parse_action(response, state)
    assert (parsed.action, parsed.valid) == (action, valid), parsed.reason


# alfworld/projection.py (and webshop/projection.py, without the pool):
# strict_pattern = re.compile(r'^\s*<think>(.*?)</think>\s*<action>(.*?)</action>\s*$', flags=re.IGNORECASE | re.DOTALL)
#     strict_ok = bool(m) and not has_chinese and (
#         think_open_count == think_close_count == 1 and action_open_count == action_close_count == 1)
#     extracted_action = m.group(2).strip().lower(); valids[i] = 1 if actions[i] in pool_lower else 0
#     m2 = action_first_re.search(original_str)  ->  extracted, format_valids[i] = 0, valids[i] = 0
#     actions[i] = default_invalid_store  (original_str[-30:])
@pytest.mark.parametrize("response, action, valid", [
    ("<think>the cabinet</think><action>go to cabinet 1</action>", "go to cabinet 1", True),
    ("\n <THINK>x</THINK>\n<Action> Go To Cabinet 1 </Action> \n", "go to cabinet 1", True),  # case-insensitive
    ("<think>x</think><action>go to cabinet 1</action> done", "go to cabinet 1", False),  # text after the span
    ("<think>x</think></think><action>go to cabinet 1</action>", "go to cabinet 1", False),  # two </think>
    ("<think>x</think>< action >go to cabinet 1</action>", "go to cabinet 1", False),  # counted as a tag, not the form
    ("<think>柜子</think><action>go to cabinet 1</action>", "go to cabinet 1", False),  # Chinese
    ("<think>x</think><action>fly to the moon</action>", "fly to the moon", False),  # not in the pool
    ("I go to cabinet 1 right now, sure thing", "abinet 1 right now, sure thing", False),  # the last 30 characters
])
def test_alfworld_reference_projection(response, action, valid):
    parsed = reference_think_action(response, ["go to cabinet 1", "look"])
    assert (parsed.action, parsed.valid) == (action, valid), parsed.reason


# gym_cards/projection.py:
#     if 'points' in env_name.lower() and '10' in string:
#         contained_actions.append('10'); string = string.replace('10', '')
#     for action in action_list: if action in string: contained_actions.append(action)
#     if len(contained_actions) == 1 and contained_actions[0] in action_list: valid
@pytest.mark.parametrize("env_name, response, action, valid", [
    ("points24", "<think>x</think><action>10</action>", "10", True),  # not 1 and 0
    ("points24", "<action>(</action>", "(", True),  # no think check; the "/" of </action> is not read
    ("points24", "<think>x</think><action>1 + 2</action>", "1 + 2", False),  # three keywords
    ("blackjack", "<think>x</think><action>I will HIT</action>", "hit", True),
    ("numberline", "<think>x</think><action>+</action>", "+", True),
    ("numberline", "<think>x</think>+", "<think>x</think>+", False),  # no <action>
])
def test_cards_reference_projection(env_name, response, action, valid):
    env = make_env(env_name, observation_mode="text")
    (state,) = env.reset([0])
    parsed = env.parse_action(response, state)
    assert (parsed.action, parsed.valid) == (action, valid), parsed.reason
