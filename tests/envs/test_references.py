"""Reference points (t2po/references.py): the random mover by hand enumeration, the expert, the flag."""

from __future__ import annotations

import pytest

from t2po import references
from t2po.envs import make_env
from t2po.envs.cards.numberline import NumberLineGame
from t2po.envs.sokoban.env import random_solve_probability
from t2po.envs.sokoban.room import Room
from t2po.policies import text_generation
from t2po.rollout import RolloutSettings, collect_rollouts
from t2po.trainer.trainer import format_summary

WALLS = frozenset({(r, c) for r in range(5) for c in range(5) if r in (0, 4) or c in (0, 4)})


def sokoban(split: str = "valid"):
    return make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3, history_length=0,
                    prompt_style="compact",
                    split=split)


def test_random_mover_equals_a_hand_enumeration():
    # player (1,1), box (1,2), target (1,3): "right" solves it; "up" and "left" hit a wall (the player stays);
    # "down" leaves the player at (2,1), from where no single move pushes the box onto the target
    room = Room(5, 5, WALLS, frozenset({(1, 3)}), frozenset({(1, 2)}), (1, 1))
    assert random_solve_probability(room, 1) == pytest.approx(1 / 4)
    # two moves: right (1/4), or up/left then right (2 x 1/4 x 1/4); down never solves within 2
    assert random_solve_probability(room, 2) == pytest.approx(1 / 4 + 2 / 16)
    # three moves, enumerated: all 64 sequences, stopping once solved
    wins = 0
    for a in ("up", "down", "left", "right"):
        for b in ("up", "down", "left", "right"):
            for c in ("up", "down", "left", "right"):
                r = room
                for m in (a, b, c):
                    r = r.move(m)[0]
                    if r.solved:
                        break
                wins += r.solved
    assert random_solve_probability(room, 3) == pytest.approx(wins / 64)


def test_exact_random_mover_agrees_with_play_and_the_expert_solves_every_room():
    env = sokoban()
    seeds = list(range(16))
    exact = references.random_mover(env, seeds, 3)
    assert exact["method"] == "exact" and len(exact["per_task"]) == 16
    # the Monte Carlo path (RandomPolicy through the rollout loop) on the same rooms, 64 episodes each
    env.random_success = lambda seeds: None
    played = references.random_mover(env, seeds, 3, samples=64)
    assert played["method"].startswith("monte carlo")
    assert abs(played["success"] - exact["success"]) < 4 * played["stderr"]
    assert references.expert(sokoban(), seeds, 3)["success"] == 1.0


class AlwaysUp:
    tokenizer = None

    def act(self, turns, seed):
        return [text_generation("<think>up</think><action>up</action>") for _ in turns]


def test_a_policy_that_always_answers_up_scores_below_the_random_mover_and_is_flagged():
    env, seeds = sokoban(), list(range(32))
    result = collect_rollouts(AlwaysUp(), env, seeds, RolloutSettings(max_turns=3))
    up = sum(ep.won for ep in result.episodes) / len(seeds)
    refs = references.reference_points(sokoban(), seeds, 3)
    assert up < refs["random"]["success"]
    summary = {"env": "sokoban", "algo": "t2po", "iterations": 1, "seconds": 1.0, "validation_tasks": 32,
               "run_dir": "r", "checkpoint": None,
               "after_rl": {"success_rate": up, "success_stderr": references.stderr(up, 32), "valid_action_rate": 1.0,
                            "episode_reward": 0.0},
               "references": refs}
    text = format_summary(summary)
    assert "below the random mover" in text and "random mover (same tasks)" in text
    summary["after_rl"]["success_rate"] = refs["random"]["success"] + 0.1
    assert "below the random mover" not in format_summary(summary)


def test_numberline_random_mover_equals_a_hand_enumeration_and_agrees_with_play():
    env = make_env("numberline", observation_mode="text", max_steps=3, split="valid")
    # 3 -> 0 in three moves: only "---" (1 of 8 sequences)
    env.new_game = lambda rng: NumberLineGame(3, 0, 5)
    assert env.random_success([0]) == [pytest.approx(1 / 8)]
    # 0 -> 2 in three moves: "++" then anything (2 of 8), and "-++", whose "-" stays at 0 on the line's end (1 of 8);
    # without that clipping "-++" would end at 1 and the chance be 2/8
    env.new_game = lambda rng: NumberLineGame(0, 2, 5)
    assert env.random_success([0]) == [pytest.approx(3 / 8)]
    env = make_env("numberline", observation_mode="text", max_steps=3, split="valid")
    seeds = list(range(16))
    exact = references.random_mover(env, seeds, 3)
    assert exact["method"] == "exact" and 0 < exact["success"] < 1
    env.random_success = lambda seeds: None
    played = references.random_mover(env, seeds, 3, samples=64)
    assert abs(played["success"] - exact["success"]) < 4 * played["stderr"]
    assert references.expert(make_env("numberline", observation_mode="text", max_steps=5, split="valid"), seeds,
                             5)["success"] == 1.0
