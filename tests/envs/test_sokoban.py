"""Sokoban: generation, rules and rewards, solver optimality, image observations, prompt, expert."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from t2po.envs import make_env
from t2po.envs.parsing import parse_think_action
from t2po.envs.sokoban import ACTIONS, Room, RoomGenerationError, SokobanEnv, generate_room, render_image, solve
from t2po.envs.sokoban.env import IMAGE_OBSERVATION

SEEDS = list(range(40))


def _load(env: SokobanEnv, grid: str, index: int = 0) -> None:
    """Put a hand-made room into instance `index` (tests only; the env otherwise generates rooms)."""
    env._episodes[index].room = Room.from_text(grid)
    env._episodes[index].steps = 0


def _bfs_optimal_length(room: Room) -> int | None:
    """Brute-force fewest moves: BFS over every (player, boxes) position."""
    start = (room.player, room.boxes)
    dist = {start: 0}
    queue = deque([room])
    while queue:
        cur = queue.popleft()
        if cur.solved:
            return dist[(cur.player, cur.boxes)]
        for action in ACTIONS:
            nxt, moved = cur.move(action)
            key = (nxt.player, nxt.boxes)
            if moved and key not in dist:
                dist[key] = dist[(cur.player, cur.boxes)] + 1
                queue.append(nxt)
    return None


# ---- generation ---------------------------------------------------------------------------------


def test_generation_is_deterministic_and_groups_share_rooms():
    a = make_env("sokoban")
    b = make_env("sokoban")
    seeds = [7, 7, 7, 9, 9, 9]
    obs_a = [s.observation for s in a.reset(seeds)]
    obs_b = [s.observation for s in b.reset(seeds)]
    assert obs_a == obs_b
    assert obs_a[0] == obs_a[1] == obs_a[2] and obs_a[3] == obs_a[4] == obs_a[5]
    assert obs_a[0] != obs_a[3]
    assert a.reset([np.int64(9)])[0].observation == obs_a[3]  # numpy seeds are fine
    with pytest.raises(ValueError, match="integers"):
        a.reset([1.5])
    distinct = {generate_room(seed).to_text() for seed in SEEDS}
    assert len(distinct) > 30  # seeds give varied rooms


def test_valid_split_offsets_seeds_by_1000():
    train = make_env("sokoban", split="train")
    valid = make_env("sokoban", split="valid")
    assert valid.reset([3])[0].observation == train.reset([1003])[0].observation
    assert valid.reset([3])[0].observation != train.reset([3])[0].observation
    assert valid.reset([3])[0].info["room_seed"] == 1003


@pytest.mark.parametrize("num_gen_steps", [2, 5, 30])
def test_generated_rooms_are_unsolved_solvable_and_within_depth(num_gen_steps):
    for seed in SEEDS:
        room = generate_room(seed, (6, 6), 1, num_gen_steps)
        assert not room.solved
        assert len(room.boxes) == len(room.targets) == 1
        plan = solve(room)
        assert plan and len(plan) <= num_gen_steps
        # the outer ring is wall
        assert all((0, c) in room.walls and (5, c) in room.walls for c in range(6))


def test_two_box_rooms():
    for seed in range(10):
        room = generate_room(seed, (7, 7), 2, 20)
        assert len(room.boxes) == 2 and not room.boxes & room.targets
        assert solve(room)


def test_generation_failure_is_a_clear_error():
    # a 4x4 room has at most 4 floor cells: never enough for 3 boxes and the player
    with pytest.raises(RoomGenerationError, match="dim_room"):
        generate_room(0, (4, 4), 3, 10)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"observation_mode": "video"}, "observation_mode"),
        ({"split": "test"}, "split"),
        ({"dim_room": (3, 6)}, "dim_room"),
        ({"num_boxes": 0}, "num_boxes"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        make_env("sokoban", **options)


# ---- room, rules, rewards -----------------------------------------------------------------------


def test_text_grid_matches_reference_format_and_round_trips():
    room = generate_room(1)
    text = room.to_text()
    lines = text.split("\n")
    assert len(lines) == 6 and all(line.count("\t") == 6 for line in lines)
    assert lines[0] == " # \t" * 6
    assert Room.from_text(text) == room
    assert Room.from_text("#####\n#P√O#\n#####").boxes_on_target == 1
    with pytest.raises(ValueError, match="exactly one player"):
        Room.from_text("####\n#_O#\n####")
    with pytest.raises(ValueError, match="Unknown Sokoban symbol"):
        Room.from_text("####\n#PZ#\n####")


def test_rewards_for_pushes_on_and_off_target():
    env = make_env("sokoban", num_boxes=2, max_steps=10)
    env.reset([0])
    _load(env, "#######\n#P√_XO#\n#######")
    off = env.step(["right"])[0]  # pushes the box off its target
    assert off.reward == pytest.approx(-0.1 - 1.0)
    assert off.info["boxes_on_target"] == 0 and not off.done
    back = env.step(["left"])[0]  # walks back, no push
    assert back.reward == pytest.approx(-0.1)
    _load(env, "#######\n#P√XO_#\n#######")
    # a box cannot push another box
    blocked = env.step(["right"])[0]
    assert blocked.reward == pytest.approx(-0.1) and not blocked.info["action_is_effective"]
    _load(env, "#######\n#√PXO_#\n#######")
    win = env.step(["right"])[0]  # second box onto its target: +1 and the +10 for solving
    assert win.reward == pytest.approx(-0.1 + 1.0 + 10.0)
    assert win.done and win.won
    assert win.metrics == {"success": 1, "num_steps": 1, "boxes_on_target": 2}


def test_wall_bump_is_a_valid_step_that_moves_nothing():
    env = make_env("sokoban")
    env.reset([0])
    _load(env, "#####\n#PXO#\n#####")
    before = env._episodes[0].room
    state = env.step(["up"])[0]
    assert state.reward == pytest.approx(-0.1)
    assert state.info == {**state.info, "action_is_effective": False, "action_is_admissible": True}
    assert env._episodes[0].room == before


def test_invalid_actions_are_flagged_and_do_not_crash():
    env = make_env("sokoban")
    states = env.reset([5, 5])
    for garbage in ["", "no tags at all", "<action>jump</action>", "<think>x</think><action>dance</action>",
                    "中文 <action>up</action>", None]:
        parsed = env.parse_action(garbage, states[0])
        assert not parsed.valid and isinstance(parsed.action, str)
    parsed = env.parse_action("<think>go</think><action>jump</action>", states[0])
    assert "no action of up/down/left/right/still" in parsed.reason
    upper = env.parse_action("<think>go</think> <action> UP </action>", states[0])
    assert upper.valid and upper.action == "up"
    before = states[0].observation
    after = env.step(["jump", "RIGHT"])
    assert after[0].observation == before and after[0].reward == pytest.approx(-0.1)
    assert after[0].info["action_is_admissible"] is False and after[0].info["action_is_effective"] is False
    assert after[1].info["action_is_admissible"] is True  # case-insensitive


def test_max_steps_truncates_and_reports_metrics():
    env = make_env("sokoban", max_steps=3)
    env.reset([2])
    for k in range(3):
        state = env.step(["not a move"])[0]
        assert state.done == (k == 2)
        assert state.metrics == ({} if k < 2 else {"success": 0, "num_steps": 3, "boxes_on_target": 0})
    assert not state.won


def test_none_actions_for_done_instances():
    env = make_env("sokoban", max_steps=1)
    env.reset([1, 2])
    first = env.step(["up", "down"])
    assert all(s.done for s in first)
    assert env.step([None, None]) == [None, None]
    with pytest.raises(ValueError, match="pass None"):
        env.step(["up", None])
    with pytest.raises(ValueError, match="one per instance"):
        env.step([None])


# ---- solver -------------------------------------------------------------------------------------


def test_solver_plan_wins_through_env_step():
    env = make_env("sokoban", max_steps=50)
    states = env.reset(SEEDS)
    plans = [solve(Room.from_text(s.observation)) for s in states]
    total = [0.0] * len(SEEDS)
    for t in range(max(len(p) for p in plans)):
        actions = [p[t] if t < len(p) else None for p in plans]
        for i, s in enumerate(env.step(actions)):
            if s is not None:
                total[i] += s.reward
                assert s.done == (t == len(plans[i]) - 1)
                if s.done:
                    assert s.won and s.reward == pytest.approx(10.9)
                    assert s.metrics["success"] == 1 and s.metrics["num_steps"] == len(plans[i])
    for i, plan in enumerate(plans):
        assert total[i] == pytest.approx(-0.1 * len(plan) + 11.0)


def test_solver_is_optimal_against_brute_force():
    rooms = [generate_room(seed, (6, 6), 1, 30) for seed in range(25)]
    rooms += [generate_room(seed, (6, 6), 2, 12) for seed in range(5)]
    for room in rooms:
        assert len(solve(room)) == _bfs_optimal_length(room)


def test_solver_handles_solved_unsolvable_and_node_limit():
    assert solve(Room.from_text("####\n#P√#\n####")) == []
    assert solve(Room.from_text("#####\n#X_O#\n#P###\n#####")) is None  # box stuck in a corner
    assert solve(Room.from_text("######\n#PX_O#\n######")) == ["right", "right"]
    hard = generate_room(3, (7, 7), 2, 30)
    assert solve(hard, node_limit=0) is None and solve(hard) is not None


# ---- image observations -------------------------------------------------------------------------


def test_image_observation_shape_determinism_and_colours():
    env = make_env("sokoban", observation_mode="image", render_tile_px=16)
    states = env.reset([4, 4])
    image = states[0].image
    assert image.mode == "RGB" and image.size == (96, 96)
    assert np.array_equal(np.asarray(image), np.asarray(states[1].image))
    assert states[0].observation == IMAGE_OBSERVATION
    assert states[0].anchor_obs == generate_room(4).to_text()  # GiGPO groups on the text grid

    room = Room.from_text("#######\n#PXO√_#\n#######")
    pixels = np.asarray(render_image(room, 16))

    def centre(col):
        return tuple(pixels[16 + 4, col * 16 + 8])  # above the centre, clear of the box's cross

    player, box, target, box_on_target, floor = centre(1), centre(2), centre(3), centre(4), centre(5)
    assert len({player, box, target, box_on_target, floor}) == 5
    assert tuple(pixels[0, 0]) != floor  # wall differs from floor


def test_both_mode_has_text_and_image():
    env = make_env("sokoban", observation_mode="both")
    state = env.reset([6])[0]
    assert state.image is not None and state.observation == state.anchor_obs
    prompt = env.render_prompt(0, [], state)
    assert prompt.count("<image>") == 1 and state.observation in prompt


# ---- prompt -------------------------------------------------------------------------------------


def test_prompt_shows_recent_history_current_grid_and_format():
    env = make_env("sokoban", history_length=2)
    s0 = env.reset([8])[0]
    prompt0 = env.render_prompt(0, [], s0)
    assert s0.observation in prompt0 and "<think>" in prompt0 and "<action>" in prompt0
    assert "<image>" not in prompt0 and "Prior to this step" not in prompt0
    history, state = [], s0
    for action in ["left", "up", "right"]:
        history.append((state.observation, action))
        state = env.step([action])[0]
    prompt = env.render_prompt(0, history, state)
    assert "already taken 3 step(s)" in prompt and "step 4" in prompt
    assert "Action 1:" not in prompt and "Action 2: 'up'" in prompt and "Action 3: 'right'" in prompt
    assert prompt.endswith("</action> tags.")
    assert make_env("sokoban", history_length=0).render_prompt(0, history, state).count("Action") == 0


def test_image_prompt_has_one_placeholder_and_lists_actions():
    env = make_env("sokoban", observation_mode="image")
    state = env.reset([8])[0]
    history = [(state.observation, "left")]
    state = env.step(["left"])[0]
    prompt = env.render_prompt(0, history, state)
    assert prompt.count("<image>") == 1
    assert "[Action 1: 'left']" in prompt and "#" not in prompt.split("# Current Step")[1]


# ---- expert -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_gen_steps", [3, 30])
def test_expert_responses_parse_and_win(num_gen_steps):
    env = make_env("sokoban", num_gen_steps=num_gen_steps)
    states = env.reset(SEEDS)
    for _ in range(env.max_steps):
        actions = []
        for i, state in enumerate(states):
            if state is None or state.done:
                actions.append(None)
                continue
            response = env.expert_response(i, state)
            parsed = parse_think_action(response, state.admissible_actions)
            assert parsed.valid, (response, parsed.reason)
            actions.append(parsed.action)
        if all(a is None for a in actions):
            break
        stepped = env.step(actions)
        states = [new if new is not None else old for new, old in zip(stepped, states)]
    assert all(s.won for s in states)
    assert all(env.expert_response(i, s) is None for i, s in enumerate(states))


def test_expert_reasoning_is_derived_from_the_observation():
    env = make_env("sokoban")
    env.reset([0])
    _load(env, "#######\n#P_X_O#\n#######")
    response = env.expert_response(0, None)
    assert response == (
        "<think>Player at (1,1); box at (1,3); target at (1,5). "
        "Next push: box at (1,3) right, from (1,2). Go right.</think><action>right</action>"
    )


def test_expert_replans_after_a_detour():
    env = make_env("sokoban", max_steps=30)
    state = env.reset([11])[0]
    start = Room.from_text(state.observation)
    optimal = len(solve(start))
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}
    # a walk away from the plan and back (no push), then the expert must still play optimally
    away = next(a for a in ACTIONS if start.move(a)[1] and start.move(a)[0].boxes == start.boxes
                and a != solve(start)[0])
    env.step([away])
    env.expert_response(0, state)  # plans from the off-plan position
    state = env.step([opposite[away]])[0]
    steps = 2
    while not state.done:
        response = env.expert_response(0, state)
        state = env.step([parse_think_action(response, list(ACTIONS)).action])[0]
        steps += 1
    assert state.won and steps == 2 + optimal


def test_expert_returns_none_when_room_is_dead():
    env = make_env("sokoban")
    env.reset([0])
    _load(env, "#####\n#X_O#\n#P###\n#####")
    assert env.expert_response(0, None) is None
