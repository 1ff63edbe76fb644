"""ALFWorld environment: real game files and the real TextWorld engine, played through `make_env`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from t2po.envs import make_env
from t2po.envs.alfworld import TASK_TYPES, aggregate_alfworld_metrics
from t2po.envs.alfworld.games import collect_games, find_games_root, unpack_archive

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it has exited and only waits to be reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _walkthrough(path: str) -> list[str]:
    with open(path) as f:
        return json.load(f)["walkthrough"]


@pytest.fixture(scope="module")
def games_root() -> Path:
    return find_games_root()


@pytest.fixture(scope="module")
def valid_seen_env():
    with make_env("alfworld", split="valid_seen", num_workers=2) as env:
        yield env


@pytest.fixture(scope="module")
def valid_unseen_env():
    with make_env("alfworld", split="valid_unseen", num_workers=1) as env:
        yield env


@pytest.fixture(scope="module")
def train_env():
    with make_env("alfworld", split="train", num_workers=1) as env:
        yield env


def test_splits_hold_the_official_games(games_root):
    counts = {"train": 3553, "valid_seen": 140, "valid_unseen": 134}
    for split, count in counts.items():
        games = collect_games(games_root, split)
        assert len(games) == count
        assert {game.task_type for game in games} == set(TASK_TYPES.values())
        assert len({game.task_type for game in games[:16]}) >= 4  # consecutive seeds mix the task types
    # seed -> game is pinned: the same seed must name the same game on every machine and in every version
    first = Path(collect_games(games_root, "valid_seen")[0].path)
    assert first.parent.parent.name == "pick_and_place_simple-TissueBox-None-Toilet-426"
    assert first.parent.name == "trial_T20190910_155319_795672"
    assert collect_games(games_root, "valid") == collect_games(games_root, "valid_seen")
    with pytest.raises(ValueError, match="valid_unseen"):
        collect_games(games_root, "test")


# two games per split, together one of each of the six task types
WALKTHROUGH_SAMPLE = {
    "train": ("look_at_obj_in_light", "pick_two_obj_and_place"),
    "valid_seen": ("pick_and_place", "pick_heat_then_place"),
    "valid_unseen": ("pick_clean_then_place", "pick_cool_then_place"),
}


@pytest.mark.parametrize("split", list(WALKTHROUGH_SAMPLE))
def test_stored_walkthrough_wins_the_game(split, request):
    """The walkthrough stored in a game file, played through reset/step, ends in a win with reward 10."""
    env = request.getfixturevalue(f"{split}_env")
    task_types = [game.task_type for game in env.games]
    seeds = [task_types.index(task_type) for task_type in WALKTHROUGH_SAMPLE[split]]
    states = env.reset(seeds)
    walkthroughs = [_walkthrough(env.game_for_seed(seed).path) for seed in seeds]
    for step in range(max(map(len, walkthroughs))):
        actions = [walk[step] if step < len(walk) else None for walk in walkthroughs]
        for index, action in enumerate(actions):
            if action is not None:  # every walkthrough action is admissible where it is taken
                assert action in states[index].admissible_actions
        new_states = env.step(actions)
        for index, action in enumerate(actions):
            if action is None:
                assert new_states[index] is None
                continue
            state = states[index] = new_states[index]
            last = step == len(walkthroughs[index]) - 1
            assert state.done == last and state.won == last
            assert state.reward == (10.0 if last else 0.0)
    for seed, state in zip(seeds, states):
        assert state.metrics == {"success": 1, "task_type": env.game_for_seed(seed).task_type}
        assert state.anchor_obs == state.observation


def test_prompt_and_action_validity(valid_seen_env):
    env = valid_seen_env
    (state,) = env.reset([9])
    first = env.render_prompt(0, [], state)
    assert f"Your current observation is: {state.observation}\n" in first
    assert "'help'" not in first and "'look'" in first and "<think> </think>" in first
    history = [("obs one", "go to a"), ("obs two", "go to b"), ("obs three", "go to c")]
    prompt = env.render_prompt(0, history, state)
    assert f"Your task is to: {env.task_description(0)}\n" in prompt
    assert "already taken 3 step(s). Below are the most recent 2 observaitons" in prompt
    assert "obs one" not in prompt
    assert ("[Observation 2: 'obs two', Action 2: 'go to b']\n[Observation 3: 'obs three', Action 3: 'go to c']"
            in prompt)
    assert "You are now at step 4 and your current observation is: " in prompt

    admissible = state.admissible_actions[0]
    parsed = env.parse_action(f"<think>go</think><action>{admissible.upper()}</action>", state)
    assert parsed.valid and parsed.action == admissible
    parsed = env.parse_action("<think>hmm</think><action>fly to the moon</action>", state)
    assert not parsed.valid and parsed.action == "fly to the moon"
    assert not env.parse_action(admissible, state).valid  # no tags
    (after,) = env.step([parsed.action])  # an invalid action is still played: the game ignores it
    assert after.observation == "Nothing happens."
    assert (after.reward, after.done, after.won) == (0.0, False, False)


def test_compact_prompt_keeps_the_task_actions_and_observation(valid_seen_env):
    env = valid_seen_env
    (state,) = env.reset([9])
    reference = env.render_prompt(0, [("obs one", "go to a"), ("obs two", "go to b")], state)
    compact_env = make_env("alfworld", split="valid_seen", history_length=2, num_workers=1, prompt_style="compact")
    with compact_env:
        (same,) = compact_env.reset([9])
        assert same.observation == state.observation
        first = compact_env.render_prompt(0, [], same)
        prompt = compact_env.render_prompt(0,
                                           [("obs zero", "look"), ("obs one", "go to a"), ("obs two", "go to b")], same)
    assert first.startswith(f"ALFWorld household task: {env.task_description(0)}\nNow (step 1): {state.observation}\n")
    assert ("Your last actions: go to a; go to b.\nNow (step 4): " in prompt
            and "look" not in prompt.split("Now (step 4)")[0])
    assert "obs one" not in prompt and "obs two" not in prompt  # past observations are left out
    listed = [a for a in state.admissible_actions if a != "help"]
    assert f"Admissible actions: {'; '.join(listed)}.\n" in prompt and "; help;" not in prompt
    assert prompt.endswith("<action>one admissible action</action>.") and len(prompt) < len(reference)
    with pytest.raises(ValueError, match="prompt_style"):
        make_env("alfworld", split="valid_seen", prompt_style="short")


def test_max_steps_ends_the_episode_and_close_stops_the_workers():
    with make_env("alfworld", split="valid", max_steps=2, num_workers=1) as env:
        (state,) = env.reset([7])
        (state,) = env.step(["look"])
        assert not state.done and state.metrics == {}
        (state,) = env.step(["inventory"])
        assert state.done and not state.won and state.reward == 0.0
        assert state.metrics == {"success": 0, "task_type": env.game_for_seed(7).task_type}
        with pytest.raises(ValueError, match="pass None"):
            env.step(["look"])
        pids = env.worker_pids
        assert len(pids) == 1 and _alive(pids[0])
        env.close()
        assert not _alive(pids[0])
        with pytest.raises(RuntimeError, match="closed"):
            env.reset([0])
    # leaving the block closes the environment a second time, which is fine


def test_expert_solves_on_and_off_the_walkthrough(valid_seen_env):
    """Instance 0 follows the expert from the start (stored walkthrough); instance 1 first detours, so
    the expert must replan from the state it reached. Seeds 11 and 11 + n name the same game."""
    env = valid_seen_env
    n = len(env.games)
    states = env.reset([11, 11 + n])
    assert states[0].info["gamefile"] == states[1].info["gamefile"] == env.games[11].path
    assert states[0].observation == states[1].observation
    walkthrough = _walkthrough(env.game_for_seed(11).path)
    detour = next(a for a in states[1].admissible_actions if a.startswith("go to ") and a != walkthrough[0])
    states = [states[0], env.step([None, detour])[1]]
    for _ in range(30):
        actions = []
        for index, state in enumerate(states):
            if state.done:
                actions.append(None)
                continue
            response = env.expert_response(index, state)
            parsed = env.parse_action(response, state)
            assert parsed.valid, response
            actions.append(parsed.action)
        if all(action is None for action in actions):
            break
        states = [new if new is not None else old for old, new in zip(states, env.step(actions))]
    assert states[0].won and states[1].won
    assert env.expert_response(0, states[0]) is None


def test_aggregate_metrics_per_task_type():
    episodes = [
        {"success": 1, "task_type": "pick_and_place"},
        {"success": 0, "task_type": "pick_and_place"},
        {"success": 1, "task_type": "pick_and_place"},
        {"success": 1, "task_type": "look_at_obj_in_light"},
        {"success": 0, "task_type": "pick_heat_then_place"},
    ]
    result = aggregate_alfworld_metrics(episodes)
    assert result["num_episodes"] == 5 and result["success_rate"] == pytest.approx(3 / 5)
    assert result["pick_and_place/num_episodes"] == 3
    assert result["pick_and_place/success_rate"] == pytest.approx(2 / 3)
    assert result["look_at_obj_in_light/success_rate"] == 1.0
    assert result["pick_heat_then_place/success_rate"] == 0.0
    assert result["pick_cool_then_place/num_episodes"] == 0 and "pick_cool_then_place/success_rate" not in result
    with pytest.raises(ValueError, match="unknown task_type"):
        aggregate_alfworld_metrics([{"success": 1, "task_type": "pick_and_place_simple"}])
    with pytest.raises(ValueError, match="lack"):
        aggregate_alfworld_metrics([{"score": 1.0}])


def test_exception_in_with_block_stops_the_workers():
    with pytest.raises(KeyError):
        with make_env("alfworld", split="valid_seen", num_workers=1) as env:
            env.reset([0])
            pids = env.worker_pids
            assert len(pids) == 1 and _alive(pids[0])
            raise KeyError("boom")
    assert not any(_alive(pid) for pid in pids)


def test_workers_exit_when_the_parent_is_killed():
    script = textwrap.dedent(
        """
        import os, signal
        from t2po.envs import make_env
        env = make_env("alfworld", split="valid_seen", num_workers=1)
        env.reset([0])
        print(" ".join(map(str, env.worker_pids)), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 1, result.stderr
    assert _wait_gone(pids), "workers outlived their killed parent"


def test_data_dir_option_and_worker_errors(tmp_path, games_root):
    """A user's own data folder is used as given; a broken game file gives an error naming the worker."""
    real = collect_games(games_root, "valid_unseen")[0].path
    good = tmp_path / "json_2.1.1" / "valid_unseen" / "pick_and_place_simple-A-None-B-1" / "trial_1" / "game.tw-pddl"
    bad = tmp_path / "json_2.1.1" / "valid_unseen" / "pick_and_place_simple-Z-None-Z-9" / "trial_1" / "game.tw-pddl"
    good.parent.mkdir(parents=True)
    bad.parent.mkdir(parents=True)
    good.write_text(Path(real).read_text())
    bad.write_text(json.dumps({"solvable": True, "pddl_domain": "(define", "grammar": "{}", "pddl_problem": ""}))
    with make_env("alfworld", split="valid_unseen", data_dir=tmp_path, num_workers=1) as env:
        paths = [game.path for game in env.games]
        assert sorted(paths) == [str(good), str(bad)]
        (state,) = env.reset([paths.index(str(good))])
        assert "Your task is to:" in state.observation
        with pytest.raises(RuntimeError, match="worker process .* failed"):
            env.reset([paths.index(str(bad))])


def test_missing_data_says_where_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        make_env("alfworld", data_dir=tmp_path)
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setenv("T2PO_ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="json_2.1.1.tar.xz"):
        make_env("alfworld")


def test_unpack_is_atomic_and_runs_once(tmp_path):
    source = tmp_path / "src" / "json_2.1.1" / "valid_seen" / "look_at_obj_in_light-X-None-Y-1" / "trial_1"
    source.mkdir(parents=True)
    (source / "game.tw-pddl").write_text("{}")
    archive = tmp_path / "games.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "json_2.1.1", arcname="json_2.1.1")
    cache = tmp_path / "cache"
    root = unpack_archive(archive, cache)
    assert root == cache / "json_2.1.1" and (root / source.relative_to(tmp_path / "src" / "json_2.1.1")).is_dir()
    assert sorted(p.name for p in cache.iterdir()) == ["json_2.1.1"]  # no staging folder left behind
    (root / "marker").write_text("kept")
    assert unpack_archive(archive, cache) == root and (root / "marker").exists()  # present: not unpacked again

    wrong = tmp_path / "wrong.tar.xz"
    with tarfile.open(wrong, "w:xz") as tar:
        tar.add(source / "game.tw-pddl", arcname="game.tw-pddl")
    with pytest.raises(ValueError, match="does not contain"):
        unpack_archive(wrong, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []
