"""Ray environment workers: the pool behaves exactly like the in-process environment.

One local Ray instance (2 CPUs, no dashboard) serves the whole file and is shut down at the end."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from t2po.engines.base import InterventionConfig, SamplingParams  # noqa: E402
from t2po.engines.hf import HFEngine  # noqa: E402
from t2po.envs import make_env  # noqa: E402
from t2po.envs.ray_pool import RayEnvPool  # noqa: E402
from t2po.policies import EnginePolicy  # noqa: E402
from t2po.rollout import RolloutSettings, collect_rollouts  # noqa: E402

SOKOBAN = {"dim_room": (5, 5), "num_boxes": 1, "num_gen_steps": 3, "max_steps": 3}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    env = RayEnvPool("sokoban", SOKOBAN, num_workers=2, num_cpus_per_worker=0.5)  # holds 1 of the 2 CPUs
    yield env
    env.close()


def _same_state(a, b):
    return (a.observation, a.reward, a.done, a.won, a.anchor_obs, a.admissible_actions, a.metrics, a.info) == (
        b.observation, b.reward, b.done, b.won, b.anchor_obs, b.admissible_actions, b.metrics, b.info)


def test_pool_reports_the_environment_attributes(pool):
    local = make_env("sokoban", **SOKOBAN)
    assert (pool.name, pool.max_steps, pool.check_admissible, pool.history_length) == (
        "sokoban", local.max_steps, local.check_admissible, local.history_length)
    assert pool.num_workers == 2


def test_same_seeds_and_actions_give_the_same_episodes(pool):
    """5 instances over 2 workers (an uneven split, 3 + 2): states, prompts, parsed actions and
    expert responses equal the in-process environment's at every step."""
    local = make_env("sokoban", **SOKOBAN)
    seeds = [3, 3, 4, 5, 6]
    states_pool, states_local = pool.reset(seeds), local.reset(seeds)
    assert [s.info["room_seed"] for s in states_pool] == seeds
    script = [["up", "left", "bogus", "down", "right"], ["left", None, "up", "up", "down"],
              ["down", "right", "left", None, "up"]]
    history: list[list[tuple[str, str]]] = [[] for _ in seeds]
    for actions in script:
        for i, (a, b) in enumerate(zip(states_pool, states_local)):
            assert _same_state(a, b), f"instance {i} differs"
            assert pool.render_prompt(i, history[i], a) == local.render_prompt(i, history[i], b)
            assert pool.expert_response(i, a) == local.expert_response(i, b)
            response = f"<think>go</think><action>{actions[i] or 'up'}</action>"
            assert pool.parse_action(response, a) == local.parse_action(response, b)
        actions = [None if s.done else a for s, a in zip(states_local, actions)]
        new_pool, new_local = pool.step(actions), local.step(actions)
        for i, (a, b) in enumerate(zip(new_pool, new_local)):
            assert (a is None) == (b is None) == (actions[i] is None)
            if a is not None:
                assert _same_state(a, b)
                history[i].append((states_local[i].observation, actions[i]))
                states_pool[i], states_local[i] = a, b
    assert any(s.done for s in states_local), "the script should finish some episodes"
    for i, (a, b) in enumerate(zip(states_pool, states_local)):
        assert pool.episode_metrics(i, a) == local.episode_metrics(i, b)


def test_rollouts_through_the_pool_equal_in_process_rollouts(pool, tiny_model):
    """The real rollout loop, unchanged, with the tiny model: same token ids, rewards and episodes."""
    model, tokenizer = tiny_model
    engine = HFEngine(model, tokenizer)
    policy = EnginePolicy(engine, SamplingParams(max_new_tokens=8), InterventionConfig(turn_score_skip=0))
    local = collect_rollouts(policy, make_env("sokoban", **SOKOBAN), [3, 4], RolloutSettings(group_size=2), seed=5)
    remote = collect_rollouts(policy, pool, [3, 4], RolloutSettings(group_size=2), seed=5)
    assert len(local.samples) == len(remote.samples) > 4
    for a, b in zip(local.samples, remote.samples):
        assert (a.prompt_ids, a.response_ids, a.reward, a.done, a.anchor_obs, a.valid) == (
            b.prompt_ids, b.response_ids, b.reward, b.done, b.anchor_obs, b.valid)
    assert [t.action for t in local.traces] == [t.action for t in remote.traces]
    assert [ep.metrics for ep in local.episodes] == [ep.metrics for ep in remote.episodes]
    assert local.stats == remote.stats


def test_bad_input_fails_with_a_clear_message(pool, local_ray):
    with pytest.raises(ValueError, match="Unknown environment 'sokobna'.*Did you mean 'sokoban'"):
        RayEnvPool("sokobna", num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RayEnvPool("sokoban", SOKOBAN, num_workers=0)
    with pytest.raises(ValueError, match="dim_room"):  # raised by the environment inside the actor
        RayEnvPool("sokoban", {"dim_room": (2, 2)}, num_workers=1, num_cpus_per_worker=0.5)
    with pytest.raises(TimeoutError, match="did not start.*3 x 1.0 CPUs requested"):
        RayEnvPool("sokoban", SOKOBAN, num_workers=3, num_cpus_per_worker=1.0, startup_timeout_s=3)
    pool.reset([1, 2, 3])
    with pytest.raises(ValueError, match="got 2 actions for 3 instances"):
        pool.step(["up", "up"])
    with pytest.raises(IndexError, match="instance 3 does not exist"):
        pool.render_prompt(3, [], pool.reset([1, 2, 3])[0])


def test_close_ends_the_actors_and_is_idempotent(local_ray):
    env = RayEnvPool("sokoban", SOKOBAN, num_workers=2)  # Ray's default: placed on a free CPU, none held
    env.reset([1, 2])
    workers = list(env.workers)
    env.close()
    env.close()
    assert ray.is_initialized(), "Ray stays up for other pools"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(workers[0].build.remote("sokoban", SOKOBAN), timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset([1])


def test_closing_after_ray_shut_down_is_safe(local_ray):  # last: it stops the module's Ray instance
    env = RayEnvPool("sokoban", SOKOBAN, num_workers=1)
    other = RayEnvPool("sokoban", SOKOBAN, num_workers=1)
    env.close()
    ray.shutdown()  # e.g. the process is ending
    other.close()  # its actors went with Ray: nothing to do, no error
    assert other.workers and not ray.is_initialized()
