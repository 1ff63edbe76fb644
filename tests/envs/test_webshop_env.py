"""The "webshop" environment through the `BatchEnv` API: the oracle, rewards and metrics, invalid
actions, the prompt, splits and options, official data."""

from pathlib import Path

import pytest

from t2po.envs import make_env
from t2po.envs.parsing import extract_tag
from t2po.envs.webshop.env import SUCCESS_REWARD, WebShopEnv

DATA = Path(__file__).resolve().parents[1] / "data" / "webshop"


def _respond(action: str) -> str:
    return f"<think>ok</think><action>{action}</action>"


def _run_oracle(env: WebShopEnv, seeds: list[int]):
    """Play every instance with the oracle (expert_response -> parse_action -> step)."""
    states = env.reset(seeds)
    history = [[] for _ in seeds]
    while True:
        actions = []
        for i, state in enumerate(states):
            if state.done:
                actions.append(None)
                continue
            parsed = env.parse_action(env.expert_response(i, state), state)
            assert parsed.valid, (parsed, state.admissible_actions)
            history[i].append((state.observation, parsed.action))
            actions.append(parsed.action)
        if all(a is None for a in actions):
            return states, history
        stepped = env.step(actions)
        states = [new if new is not None else old for new, old in zip(stepped, states)]


@pytest.fixture(scope="module")
def env() -> WebShopEnv:
    return make_env("webshop", split="test")


def test_oracle_scores_one_on_generated_goals(env):
    states, history = _run_oracle(env, list(range(len(env.goals))))
    scores = [s.metrics["score"] for s in states]
    successes = [s.metrics["success"] for s in states]
    assert len(states) == 100
    assert sum(successes) / len(successes) >= 0.95
    assert all(s.reward == SUCCESS_REWARD for s in states if s.metrics["success"])
    assert all(s.won == bool(s.metrics["success"]) for s in states)
    assert max(len(h) for h in history) <= env.max_steps
    # the oracle's first step searches the goal's instruction
    first_action = history[0][0][1]
    assert first_action.startswith("search[") and "price lower than" not in first_action


def test_reward_is_ten_only_for_a_perfect_purchase(env):
    goal = env.goals[0]
    product = env.catalog.by_asin[goal.asin]
    [state] = env.reset([0])
    [state] = env.step([f"search[{product.name}]"])
    [state] = env.step([f"click[{goal.asin.lower()}]"])
    assert state.reward == 0.0 and not state.done
    [state] = env.step(["click[buy now]"])  # no options chosen: below 1
    assert state.done and state.reward == 0.0 and not state.won
    n_attr, n_opt = len(goal.attributes), len(goal.goal_options)
    assert state.metrics == {"success": 0, "score": pytest.approx((n_attr + 1) / (n_attr + n_opt + 1))}
    assert state.info["reward_info"]["r_type"] == 1.0
    assert state.admissible_actions == []


def test_episode_is_cut_off_at_max_steps():
    env = make_env("webshop", split="test", max_steps=3)
    [state] = env.reset([1])
    for _ in range(2):
        [state] = env.step(["click[search]"])  # ignored by the shop, still a step
        assert not state.done and state.info["action_applied"] is False
    [state] = env.step(["search[socks]"])
    assert state.done and state.info["truncated"] and state.metrics == {"success": 0, "score": 0.0}
    with pytest.raises(ValueError, match="finished"):
        env.step(["search[socks]"])


def test_equal_seeds_equal_tasks_and_splits_are_disjoint(env):
    states = env.reset([4, 4, 5])
    assert env.task_description(0) == env.task_description(1) != env.task_description(2)
    assert states[0].observation == "'Search'"
    train = make_env("webshop", split="train")
    valid = make_env("webshop", split="valid")
    test_goals = {g.instruction_text for g in env.goals}
    assert not test_goals & {g.instruction_text for g in train.goals}
    assert not test_goals & {g.instruction_text for g in valid.goals}
    assert train.shop is env.shop  # one catalog and index per process


def test_invalid_actions_are_flagged(env):
    [state] = env.reset([2])
    assert state.admissible_actions == ["search[<your query>]", "click[search]"]
    assert env.parse_action(_respond("search[red running shoes]"), state).valid
    assert env.parse_action(_respond("Search[Red Shoes]"), state).action == "search[red shoes]"
    for response, reason in [
        ("search[red running shoes]", "no <action>"),
        ("<action>search[x]</action>", "<think>"),
        (_respond("search[<your query>]"), "placeholder"),
        (_respond("search[ ]"), "empty search"),
        (_respond("click[buy now]"), "not admissible"),
        (_respond("buy the shoes"), "not admissible"),
    ]:
        parsed = env.parse_action(response, state)
        assert not parsed.valid and reason in parsed.reason, (response, parsed)
    [state] = env.step(["search[shoes]"])
    assert not env.parse_action(_respond("search[shoes]"), state).valid  # no search box on the results page
    assert env.parse_action(_respond("click[next >]"), state).valid
    # an invalid action changes nothing in the shop
    before = state.observation
    [state] = env.step(["click[does not exist]"])
    assert state.observation == before and state.info["action_applied"] is False


def test_prompt_follows_verl_agent_template(env):
    [state] = env.reset([3])
    first = env.render_prompt(0, [], state)
    assert "WebShop e\u2011commerce environment" in first
    assert f"Your task is to: {env.task_description(0)}." in first
    assert "Your current observation is: 'Search'." in first
    assert "'search[<your query>]',\n'click[search]',\n]." in first
    assert "<think> </think>" in first and "<action> </action>" in first
    history = [(state.observation, "search[a]")]
    [state] = env.step(["search[a]"])
    history.append((state.observation, "click[next >]"))
    [state] = env.step(["click[next >]"])
    history.append((state.observation, "click[< prev]"))
    [state] = env.step(["click[< prev]"])
    prompt = env.render_prompt(0, history, state)
    assert "Prior to this step, you have already taken 3 step(s). Below are the most recent 2 observations" in prompt
    assert "[Observation 2: '" in prompt and "Action 3: 'click[< prev]']" in prompt and "Observation 1:" not in prompt
    assert ("You are now at step 4 and your current observation is: 'Back to Search' [SEP] 'Page 1 (Total results:"
            in prompt)
    assert extract_tag(prompt, "action") == ""  # the instructions mention the tags, with nothing inside


def test_text_rich_observations():
    env = make_env("webshop", split="test", observation_mode="text_rich")
    [state] = env.reset([0])
    assert state.observation.startswith("WebShop\nInstruction:\n")
    assert "[button] Search [button_]" in state.observation


def test_options_are_checked():
    with pytest.raises(ValueError, match="split"):
        make_env("webshop", split="validation")
    with pytest.raises(ValueError, match="observation_mode"):
        make_env("webshop", observation_mode="html")
    with pytest.raises(FileNotFoundError, match="items_shuffle_1000.json"):
        make_env("webshop", data_dir=str(DATA / "missing"))


def test_official_data_through_the_env():
    env = make_env("webshop", split="test", data_dir=str(DATA))
    states, _ = _run_oracle(env, list(range(len(env.goals))))
    assert [s.metrics["success"] for s in states] == [1] * len(env.goals)
    human = make_env("webshop", split="test", data_dir=str(DATA), human_goals=True)
    states, _ = _run_oracle(human, [0, 1])
    assert all(s.metrics["score"] == 1.0 for s in states)
