"""The gym-cards games (t2po.envs.cards): rules, the safe formula evaluator, the solver and experts,
pictures and prompts, determinism by seed."""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from t2po.envs import get_env_class, make_env
from t2po.envs.cards import (
    BlackjackEnv,
    BlackjackGame,
    Card,
    EZPointsEnv,
    FormulaError,
    FormulaGame,
    NumberLineEnv,
    NumberLineGame,
    Points24Env,
    complete_formula,
    evaluate_formula,
    tokenize,
)
from t2po.envs.cards.blackjack import basic_strategy, hand_total
from t2po.envs.cards.drawing import formula_picture
from t2po.envs.cards.formula import MAX_NESTING
from t2po.envs.parsing import parse_think_action

P24_OPS = ("+", "-", "*", "/")


def play(env, tokens, index=0):
    """Step instance `index` of a one-instance env through `tokens`; return the list of states."""
    states = []
    for token in tokens:
        states.append(env.step([token])[0])
    return states


def run_expert(env, seed):
    """Play one episode of `env` on `seed` with its expert; the final state, or None if the expert gave up."""
    state = env.reset([seed])[0]
    while not state.done:
        response = env.expert_response(0, state)
        if response is None:
            return None
        parsed = parse_think_action(response, state.admissible_actions)
        assert parsed.valid, (response, parsed.reason)
        state = env.step([parsed.action])[0]
    return state


def p24_game(values, max_tokens=20):
    cards = [Card(v, "spades") for v in values]
    return FormulaGame(cards, 24, P24_OPS, True, max_tokens)


# -- registry -----------------------------------------------------------------------------------


def test_registry_names_map_to_the_card_envs():
    expected = {"ezpoints": EZPointsEnv, "points24": Points24Env, "numberline": NumberLineEnv,
                "blackjack": BlackjackEnv}
    for name, cls in expected.items():
        assert get_env_class(name) is cls
        assert cls.name == name
        assert cls.check_admissible


# -- safe evaluator -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "formula, value",
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("10 - 4 - 3", 3),
        ("8/(3-8/3)", 24),  # float eval gives 23.99999...
        ("1/3*3", 1),
        ("((1+2))*(3+5)", 24),
        (["(", "10", "+", "2", ")", "*", "2"], 24),
    ],
)
def test_evaluate_formula_values(formula, value):
    assert evaluate_formula(formula) == Fraction(value)


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('echo hi')",
        "2**10",  # no power operator
        "-3+27",  # no unary minus
        "2 4",  # numbers do not concatenate
        "",
        "   ",
        "(1+2",
        "1+2)",
        "1+",
        "1/0",
        "3/(2-2)",
        "1e3",
        "0x10",
        "\u0663+1",  # Arabic-Indic digit three
        "1;2",
        "lambda: 0",
        "1 = 1",
    ],
)
def test_evaluate_formula_rejects_hostile_and_broken_input(formula):
    with pytest.raises(FormulaError):
        evaluate_formula(formula)


def test_evaluate_formula_bounds_length_nesting_and_types():
    with pytest.raises(FormulaError, match="characters"):
        evaluate_formula("1+" * 1_000_000 + "1")
    with pytest.raises(FormulaError, match="nested"):
        evaluate_formula("(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1))
    assert evaluate_formula("(" * MAX_NESTING + "7" + ")" * MAX_NESTING) == 7
    with pytest.raises(FormulaError):
        evaluate_formula(["__import__", "(", "1", ")"])
    with pytest.raises(FormulaError):
        tokenize(None)  # type: ignore[arg-type]
    assert tokenize(" (10+ 2)*3") == ["(", "10", "+", "2", ")", "*", "3"]
    assert issubclass(FormulaError, ValueError)


def test_no_eval_or_exec_in_the_card_games():
    package = Path(__import__("t2po.envs.cards", fromlist=["x"]).__file__).parent
    for path in package.glob("*.py"):
        source = path.read_text()
        assert not re.search(r"(?<![\w.])(eval|exec|compile)\(", source), path


# -- solver -------------------------------------------------------------------------------------


def test_complete_formula_finds_valid_solutions_on_random_deals():
    rng = random.Random(123)
    solved = 0
    for _ in range(30):
        numbers = tuple(min(rng.randint(1, 13), 10) for _ in range(4))
        solution = complete_formula(numbers, (), 24, P24_OPS, True, 20)
        reachable = FormulaGame([Card(n, "clubs") for n in numbers], 24, P24_OPS, True, 20).solvable()
        assert (solution is not None) == reachable
        if solution:
            solved += 1
            assert evaluate_formula(solution) == 24
            assert Counter(int(t) for t in solution if t.isdigit()) == Counter(numbers)
    assert solved >= 15


def test_complete_formula_respects_prefixes():
    assert complete_formula((3, 3, 8, 8), (), 24, P24_OPS, True, 20) == tuple("8 / ( 3 - 8 / 3 )".split())
    completed = complete_formula((1, 2, 3, 4), ("(",), 24, P24_OPS, True, 20)
    assert completed[0] == "(" and evaluate_formula(completed) == 24
    # a prefix written with a redundant group, which no canonical solution has
    completed = complete_formula((1, 2, 3, 4), ("(", "(", "4"), 24, P24_OPS, True, 20)
    assert completed[:3] == ("(", "(", "4") and evaluate_formula(completed) == 24
    # dead ends: 4 + 6 + 1 (+-*/) 1 never makes 24; two numbers in a row never parse; too few tokens left
    assert complete_formula((1, 1, 4, 6), ("4", "+", "6", "+", "1"), 24, P24_OPS, True, 20) is None
    assert complete_formula((1, 2, 3, 4), ("3", "3"), 24, P24_OPS, True, 20) is None
    assert complete_formula((3, 3, 8, 8), (), 24, P24_OPS, True, 8) is None  # needs 9 tokens
    assert complete_formula((1, 1, 1, 1), (), 24, P24_OPS, True, 20) is None
    # EZPoints: no parentheses, + and * only
    assert complete_formula((2, 6), (), 12, ("+", "*"), False, 5) == ("2", "*", "6")
    assert complete_formula((2, 10), ("10",), 12, ("+", "*"), False, 5) == ("10", "+", "2")


# -- EZPoints -----------------------------------------------------------------------------------


def _ez_env_and_numbers(seed=0):
    env = make_env("ezpoints", observation_mode="text")
    state = env.reset([seed])[0]
    return env, state, state.info["numbers"]


def test_ezpoints_deals_are_solvable_and_a_correct_formula_wins():
    for seed in range(20):
        env, state, (a, b) = _ez_env_and_numbers(seed)
        assert a + b == 12 or a * b == 12
        op = "+" if a + b == 12 else "*"
        states = play(env, [str(a), op, str(b), "="])
        assert [s.reward for s in states] == [0.0, 0.0, 0.0, 10.0]
        assert [s.done for s in states] == [False, False, False, True]
        assert states[-1].won and states[-1].metrics == {"success": 1, "solvable": 1}


def test_ezpoints_wrong_result_and_unused_card_lose():
    env, state, (a, b) = _ez_env_and_numbers(3)
    wrong = "*" if a + b == 12 else "+"
    final = play(env, [str(a), wrong, str(b), "="])[-1]
    assert final.done and not final.won and final.reward == -1.0
    assert final.metrics["success"] == 0 and "not 12" in final.observation

    env.reset([3])
    final = play(env, [str(a), "="])[-1]
    assert final.done and final.reward == -1.0 and "every card" in final.observation


def test_ezpoints_illegal_numbers_are_rejected_without_changing_the_formula():
    env, state, (a, b) = _ez_env_and_numbers(5)
    absent = next(v for v in range(1, 11) if v not in (a, b))
    s = env.step([str(absent)])[0]
    assert s.reward == -1.0 and not s.done and s.info["legal_action"] is False
    assert s.info["formula"] == [] and "rejected" in s.observation
    assert s.anchor_obs == state.anchor_obs  # same state, same GiGPO anchor
    s = env.step([str(a)])[0]
    assert s.reward == 0.0 and s.info["formula"] == [str(a)]
    if a != b:  # reusing the only card with this value
        s = env.step([str(a)])[0]
        assert s.reward == -1.0 and s.info["formula"] == [str(a)]


def test_ezpoints_unparsable_formula_and_overlong_formula_end_the_game():
    env, _, (a, b) = _ez_env_and_numbers(7)
    final = play(env, ["+", "="])[-1]
    assert final.done and final.reward == -1.0 and "not valid" in final.observation

    env.reset([7])
    states = play(env, [str(a), "+", "+", "+", "+", "+"])  # the sixth token does not fit
    assert [s.done for s in states] == [False] * 5 + [True]
    assert states[-1].reward == -1.0 and states[-1].metrics["success"] == 0


def test_actions_outside_the_game_are_a_no_op():
    env, state, _ = _ez_env_and_numbers(1)
    s = env.step(["open the door"])[0]
    assert s.reward == 0.0 and not s.done and s.info["legal_action"] is False
    assert s.info["formula"] == [] and "not an action" in s.observation
    assert s.anchor_obs == state.anchor_obs


# -- Points24 -----------------------------------------------------------------------------------


def test_points24_exact_division_wins():
    game = p24_game([8, 3, 8, 3])
    moves = [game.play(t) for t in "8 / ( 3 - 8 / 3 ) =".split()]
    assert [m.reward for m in moves[:-1]] == [0.0] * 9
    assert moves[-1].reward == 10.0 and game.done and game.won


@pytest.mark.parametrize(
    "values, tokens, reason",
    [
        ([2, 4, 1, 1], "2 4 * 1 * 1 =", "not valid"),  # gym-cards' eval read "24"
        ([1, 1, 2, 3], "3 / ( 1 - 1 ) * 2 =", "division by zero"),
        ([1, 2, 3, 4], "( 1 + 2 + 3 * 4 =", "not valid"),
        ([6, 6, 6, 6], "6 + 6 + 6 + 6 =", None),  # a win, for contrast
        ([6, 6, 6, 6], "6 * 6 - 6 + 6 =", "not 24"),
    ],
)
def test_points24_formula_outcomes(values, tokens, reason):
    game = p24_game(values)
    move = [game.play(t) for t in tokens.split()][-1]
    assert game.done
    if reason is None:
        assert move.reward == 10.0 and game.won
    else:
        assert move.reward == -1.0 and not game.won and reason in move.feedback


def test_points24_expert_wins_solvable_deals_and_gives_up_on_unsolvable_ones():
    env = make_env("points24", observation_mode="text")
    solvable = 0
    for seed in range(12):
        state = env.reset([seed])[0]
        game = FormulaGame([Card(n, "hearts") for n in state.info["numbers"]], 24, P24_OPS, True, 20)
        final = run_expert(env, seed)
        if game.solvable():
            solvable += 1
            assert final is not None and final.won and final.reward == 10.0
            assert final.metrics == {"success": 1, "solvable": 1}
        else:
            assert final is None
    assert solvable >= 6


def test_expert_demonstrations_skip_unsolvable_deals():
    # the warm-up and `t2po rft collect --policy expert` play batches that hold unsolvable 24-game deals
    from t2po.sft import play_expert_episodes

    env = make_env("points24", observation_mode="text")
    seeds = list(range(12))
    states = env.reset(seeds)
    unsolvable = {seed for i, seed in enumerate(seeds) if env.expert_response(i, states[i]) is None}
    assert unsolvable and len(unsolvable) < len(seeds)  # the batch mixes both kinds
    convs = play_expert_episodes(env, seeds)
    assert [c.seed for c in convs] == seeds
    for conv in convs:
        assert (conv.steps == [] and not conv.won) if conv.seed in unsolvable else (conv.won and conv.steps)
    with pytest.raises(ValueError, match="gave no expert move"):
        play_expert_episodes(env, sorted(unsolvable))


def test_points24_expert_recovers_from_a_policy_prefix_and_spots_dead_ends():
    env = make_env("points24", observation_mode="text")
    seed = next(s for s in range(50) if p24_game(env.reset([s])[0].info["numbers"]).solvable())
    state = env.reset([seed])[0]
    state = env.step(["("])[0]  # not how the expert would start
    while not state.done:
        response = env.expert_response(0, state)
        assert response is not None
        state = env.step([parse_think_action(response, state.admissible_actions).action])[0]
    assert state.won and state.info["formula"][0] == "("

    game = p24_game([4, 6, 1, 1])
    for token in "4 + 6 + 1".split():
        game.play(token)
    assert game.expert() is None


# -- NumberLine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_position", [1, 5, 12])
def test_numberline_expert_always_wins(max_position):
    env = make_env("numberline", max_position=max_position, observation_mode="text")
    for seed in range(25):
        start = env.reset([seed])[0].info
        assert start["position"] != start["target"]
        distance = abs(start["position"] - start["target"])
        state = env.reset([seed])[0]
        rewards = []
        while not state.done:
            state = env.step([parse_think_action(env.expert_response(0, state), ["-", "+"]).action])[0]
            rewards.append(state.reward)
        assert state.won and state.metrics == {"success": 1}
        assert rewards == [0.0] * (distance - 1) + [1.0]


def test_numberline_rewards_clamping_and_truncation():
    game = NumberLineGame(start=0, target=3, max_position=5)
    assert game.play("-").reward == -1.0 and game.position == 0  # against the end of the line
    assert game.play("+").reward == 0.0 and game.position == 1
    assert game.play("-").reward == -1.0 and game.position == 0

    env = make_env("numberline", observation_mode="text")
    assert env.max_steps == 10  # 2 * max_position, as gym-cards
    seed = next(s for s in range(100) if (lambda i: i["target"] > i["position"])(env.reset([s])[0].info))
    env.reset([seed])
    states = play(env, ["-"] * 10)
    assert [s.done for s in states] == [False] * 9 + [True]
    assert states[-1].metrics == {"success": 0} and "Out of steps" in states[-1].observation


# -- Blackjack ----------------------------------------------------------------------------------


def _hand(*ranks):
    return [Card(r, "diamonds") for r in ranks]


def test_hand_totals_count_aces_as_11_unless_that_busts():
    assert hand_total(_hand(1, 6)) == (17, True)
    assert hand_total(_hand(1, 6, 10)) == (17, False)
    assert hand_total(_hand(1, 1)) == (12, True)
    assert hand_total(_hand(13, 12, 2)) == (22, False)


@pytest.mark.parametrize(
    "player, dealer, natural, reward",
    [
        ((10, 13), (10, 7), False, 1.0),  # 20 vs 17: the dealer stands on 17
        ((10, 6), (10, 9), False, -1.0),
        ((10, 9), (9, 13), False, 0.0),  # push
        ((1, 13), (10, 8), True, 1.5),  # natural pays 1.5 when enabled
        ((1, 13), (10, 8), False, 1.0),
        ((1, 13), (1, 12), True, 0.0),  # both natural: push
    ],
)
def test_blackjack_stand_outcomes(player, dealer, natural, reward):
    game = BlackjackGame(random.Random(0), natural=natural, dealer=_hand(*dealer), player=_hand(*player))
    move = game.play("stand")
    assert move.reward == reward and game.done and game.won == (reward > 0)
    assert game.metrics()["push"] == int(reward == 0.0)


def test_blackjack_dealer_draws_to_17_and_hits_can_bust():
    busts = 0
    for seed in range(30):
        game = BlackjackGame(random.Random(seed), dealer=_hand(2, 3), player=_hand(10, 8))
        move = game.play("stand")
        dealer_total = hand_total(game.dealer)[0]
        assert dealer_total >= 17 and len(game.dealer) > 2
        expected = 1.0 if dealer_total > 21 or dealer_total < 18 else (0.0 if dealer_total == 18 else -1.0)
        assert move.reward == expected

        game = BlackjackGame(random.Random(seed), dealer=_hand(10, 7), player=_hand(10, 12))
        move = game.play("hit")
        total = hand_total(game.player)[0]
        assert game.done == (total > 21) and move.reward == (-1.0 if total > 21 else 0.0)
        busts += total > 21
    assert busts > 20  # 20 + anything but an ace busts


def test_blackjack_basic_strategy_table():
    ten, six, four, three, eight, nine, ace = (Card(r, "clubs") for r in (10, 6, 4, 3, 8, 9, 1))
    assert basic_strategy(16, False, ten) == "hit"
    assert basic_strategy(16, False, six) == "stand"
    assert basic_strategy(16, False, ace) == "hit"
    assert basic_strategy(12, False, three) == "hit"
    assert basic_strategy(12, False, four) == "stand"
    assert basic_strategy(11, False, six) == "hit"
    assert basic_strategy(17, False, ace) == "stand"
    assert basic_strategy(18, True, nine) == "hit"
    assert basic_strategy(18, True, eight) == "stand"
    assert basic_strategy(17, True, six) == "hit"


def test_blackjack_expert_beats_always_hitting():
    env = make_env("blackjack", observation_mode="text")
    expert_return, hit_return = 0.0, 0.0
    episodes = 200
    for seed in range(episodes):
        final = run_expert(env, seed)
        expert_return += final.reward
        state = env.reset([seed])[0]
        while not state.done:
            state = env.step(["hit"])[0]
        hit_return += state.reward
    assert expert_return / episodes > -0.3
    assert hit_return / episodes < -0.8


# -- pictures, observation modes, prompts -------------------------------------------------------


@pytest.mark.parametrize("name", ["ezpoints", "points24", "numberline", "blackjack"])
def test_image_mode_gives_rgb_pictures_and_one_image_marker(name):
    env = make_env(name)  # image mode is the default
    states = env.reset([4, 4, 5])
    for s in states:
        assert isinstance(s.image, Image.Image) and s.image.mode == "RGB" and s.image.size == (300, 300)
    assert states[0].image.tobytes() == states[1].image.tobytes()
    again = make_env(name).reset([4])[0]
    assert again.image.tobytes() == states[0].image.tobytes()

    action = env.expert_response(0, states[0])
    parsed = parse_think_action(action, states[0].admissible_actions)
    nxt = env.step([parsed.action, None, None])[0]
    history = [(states[0].observation, parsed.action)]
    prompt = env.render_prompt(0, history, nxt)
    assert prompt.count("<image>") == 1
    assert "<think>" in prompt and "<action>" in prompt and "step 2" in prompt
    assert all(f"'{a}'" in prompt for a in env.action_tokens)
    if not nxt.done:
        assert nxt.image.tobytes() != states[0].image.tobytes()  # the picture follows the state


@pytest.mark.parametrize("name", ["ezpoints", "points24", "numberline", "blackjack"])
def test_text_and_both_modes(name):
    text_state = make_env(name, observation_mode="text").reset([2])[0]
    assert text_state.image is None
    text_env = make_env(name, observation_mode="text")
    assert "<image>" not in text_env.render_prompt(0, [], text_env.reset([2])[0])
    both_state = make_env(name, observation_mode="both").reset([2])[0]
    image_state = make_env(name, observation_mode="image").reset([2])[0]
    assert both_state.image is not None and both_state.observation == text_state.observation
    # the anchor is the full description whatever the model sees
    assert text_state.anchor_obs == both_state.anchor_obs == image_state.anchor_obs == text_state.observation
    if name != "numberline":
        assert "of" in text_state.observation  # cards named in words, e.g. "Q of hearts"


def test_text_observation_names_the_cards_the_picture_shows():
    env = make_env("points24", observation_mode="both")
    state = env.reset([11])[0]
    for card in state.info["cards"]:
        assert card in state.observation


def test_card_pictures_use_suit_colours():
    def red_pixels(image):
        return sum(1 for r, g, b in image.getdata() if r > 150 and g < 80 and b < 80)

    red = formula_picture([Card(1, "hearts"), Card(13, "diamonds")], "")
    black = formula_picture([Card(1, "spades"), Card(13, "clubs")], "")
    assert red_pixels(red) > 200 and red_pixels(black) == 0
    assert formula_picture([Card(5, "hearts")], "5 +").tobytes() != formula_picture([Card(5, "hearts")], "5").tobytes()


def test_prompt_shows_only_the_last_history_length_pairs():
    env = make_env("numberline", observation_mode="text", history_length=2, max_position=12)
    state = env.reset([0])[0]
    history = [(f"observation number {k}", "+" if k % 2 else "-") for k in range(1, 6)]
    prompt = env.render_prompt(0, history, state)
    assert "already taken 5 step(s)" in prompt and "step 6" in prompt
    assert "[Observation 4: observation number 4]\n[Action 4: '-']" in prompt
    assert "[Observation 5: observation number 5]\n[Action 5: '+']" in prompt
    assert "observation number 3" not in prompt
    assert state.observation in prompt and "reward +1" in prompt
    assert "already taken" not in env.render_prompt(0, [], state)
    no_history = make_env("numberline", observation_mode="text", history_length=0)
    assert "observation number" not in no_history.render_prompt(0, history, no_history.reset([0])[0])


# -- determinism and options --------------------------------------------------------------------


def test_equal_seeds_give_equal_tasks_and_valid_split_offsets_by_1000():
    env = make_env("points24", observation_mode="text")
    a, b, c = env.reset([7, 7, 8])
    assert a.observation == b.observation != c.observation
    valid = make_env("points24", observation_mode="text", split="valid")
    train = make_env("points24", observation_mode="text", split="train")
    for seed in range(5):
        v = valid.reset([seed])[0].observation
        assert v == train.reset([seed + 1000])[0].observation
        assert v != train.reset([seed])[0].observation


def test_blackjack_draws_are_deterministic_per_instance_and_leave_global_random_alone():
    random.seed(99)
    expected = random.random()
    random.seed(99)
    runs = []
    for _ in range(2):
        env = make_env("blackjack", observation_mode="text")
        env.reset([21, 21, 22])
        states = env.step(["hit", "hit", "hit"])
        runs.append([s.observation for s in states])
    assert random.random() == expected
    assert runs[0] == runs[1]
    assert runs[0][0] == runs[0][1]


def test_bad_options_and_misuse_raise_clear_errors():
    with pytest.raises(ValueError, match="valid"):
        make_env("points24", split="test")
    with pytest.raises(ValueError, match="observation_mode"):
        make_env("ezpoints", observation_mode="video")
    with pytest.raises(ValueError, match="max_steps"):
        make_env("blackjack", max_steps=0)
    with pytest.raises(ValueError, match="max_position"):
        make_env("numberline", max_position=0)
    with pytest.raises(TypeError):
        make_env("points24", target=30)
    env = make_env("numberline", observation_mode="text")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(["+"])
    env.reset([0, 1])
    with pytest.raises(ValueError, match="one entry per instance"):
        env.step(["+"])
    assert env.step(["+", None])[1] is None
    finished = make_env("ezpoints", observation_mode="text")
    finished.reset([0])
    finished.step(["="])
    with pytest.raises(ValueError, match="already done"):
        finished.step(["="])
    assert finished.expert_response(0, None) is None


@pytest.mark.parametrize("name", ["ezpoints", "points24", "numberline", "blackjack"])
def test_random_and_junk_actions_never_crash_and_episodes_end_by_max_steps(name):
    env = make_env(name, observation_mode="text")
    rng = random.Random(0)
    junk = ["", "  ", "__import__('os')", "10 + 2", "-1", "HIT", "=" * 500, "\u0663", "stand please"]
    for seed in range(15):
        state = env.reset([seed])[0]
        steps = 0
        while not state.done:
            action = rng.choice(list(env.action_tokens) + junk)
            state = env.step([action])[0]
            steps += 1
            assert isinstance(state.reward, float)
        assert steps <= env.max_steps
        assert state.metrics["success"] == int(state.won)
