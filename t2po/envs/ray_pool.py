"""Environment instances held by a pool of Ray actors, behind the same `BatchEnv` protocol.

For environments that are heavy (ALFWorld's TextWorld games, a WebShop catalogue) or that must run on
other machines, the instances of a batch can live in Ray actors instead of the trainer's process:

    import ray
    ray.init(num_cpus=4)                                    # or an existing cluster: ray.init("auto")
    env = RayEnvPool("alfworld", {"max_steps": 50}, num_workers=4)
    result = collect_rollouts(policy, env, task_seeds, settings)   # unchanged
    env.close()

Each actor builds the environment once with `make_env(name, **options)`. `reset(seeds)` splits the
batch into contiguous shards, one per actor (the first `n % num_workers` actors get one instance
more), and every later call on instance `i` goes to the actor that holds it, with `i` translated to
the actor's local index. `reset` and `step` run on all actors at once; the per-instance calls
(`render_prompt`, `parse_action`, `expert_response`, `episode_metrics`) are one round trip each.

Same seeds, same episodes: an environment is deterministic by seed whatever the batch it sits in
(`BatchEnv.reset`), so sharding changes nothing that a rollout sees; `tests/envs/test_ray_pool.py` checks
that a rollout through the pool equals the in-process one token for token.

The in-process environment stays the default everywhere; the pool is opt-in. Ray itself is an
optional dependency (`pip install ray==2.60.0`). When no Ray instance is running, the pool starts a
local one (`ray.init()`, which also honours `RAY_ADDRESS`); Ray stops it when the process exits
(or call `ray.shutdown()`), so that other pools (the validation environment's) can share it. On a multi-node cluster
every node needs t2po installed (or a
Ray `runtime_env`), and the environment's data where its options point.
"""

from __future__ import annotations

from typing import Any

from t2po.envs import get_env_class, make_env
from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction
from t2po.errors import InvalidInput, MissingPackage


class EnvWorker:
    """The body of one Ray actor: one environment instance batch, built by `build(name, options)`.

    The environment is built in a method call rather than in the actor's constructor so that a bad
    option comes back as the environment's own exception (a ValueError stays a ValueError) instead
    of Ray's generic "actor died"."""

    env: BatchEnv

    def build(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Make the environment; return the attributes the pool mirrors."""
        self.env = make_env(name, **options)
        return {"max_steps": self.env.max_steps, "check_admissible": self.env.check_admissible,
                "history_length": self.env.history_length,
                "describe": self.env.describe()}

    def reset(self, seeds: list[int]) -> list[EnvState]:
        return self.env.reset(seeds)

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        return self.env.step(actions)

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        return self.env.render_prompt(index, history, state)

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        return self.env.parse_action(response, state)

    def expert_response(self, index: int, state: EnvState) -> str | None:
        return self.env.expert_response(index, state)

    def episode_metrics(self, index: int, state: EnvState) -> dict[str, Any]:
        return self.env.episode_metrics(index, state)

    def close(self) -> None:
        self.env.close()


class RayEnvPool(BatchEnv):
    """`num_workers` Ray actors, each holding one `make_env(env_name, **env_options)`; a `BatchEnv`
    whose instances are sharded over the actors (see the module docstring).

    `num_cpus_per_worker` is what Ray reserves for each actor for its lifetime (a pool of k workers
    then needs k times that many free CPUs); None keeps Ray's actor default (a free CPU to be
    placed, none held while running), so that a training and a validation pool fit on any machine. Other actor options
    (memory, resources, runtime_env) go in `actor_options`, passed to `ray.remote(...).options()`. Workers
    that have not started after `startup_timeout_s` (Ray cannot place them) are an error rather
    than a silent wait.
    """

    def __init__(
        self,
        env_name: str,
        env_options: dict[str, Any] | None = None,
        num_workers: int = 2,
        num_cpus_per_worker: float | None = None,
        actor_options: dict[str, Any] | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise MissingPackage("RayEnvPool needs Ray: pip install ray==2.60.0 (or use the "
                                 "in-process environment, the default)") from e
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise InvalidInput(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if num_cpus_per_worker is not None and num_cpus_per_worker < 0:
            raise InvalidInput(f"num_cpus_per_worker must be >= 0, got {num_cpus_per_worker}")
        get_env_class(env_name)  # an unknown name fails here, with suggestions, before any actor starts
        self.name = env_name
        self.env_options = dict(env_options or {})
        self._ray = ray
        if not ray.is_initialized():
            ray.init()
        cpus = {} if num_cpus_per_worker is None else {"num_cpus": num_cpus_per_worker}
        remote_worker = ray.remote(EnvWorker).options(**cpus, **(actor_options or {}))
        self.workers = [remote_worker.remote() for _ in range(num_workers)]
        self._closed = False
        try:
            # Constructor errors (bad options, missing data) surface here, raised as in the actor.
            attributes = ray.get([w.build.remote(env_name, self.env_options) for w in self.workers],
                                 timeout=startup_timeout_s)[0]
        except ray.exceptions.GetTimeoutError as e:
            free = ray.available_resources().get("CPU", 0.0)
            self._shut_down(grace_s=0.0)  # unplaced actors never run a call: kill them outright
            raise TimeoutError(
                f"{num_workers} {env_name} workers did not start within {startup_timeout_s:.0f} s: Ray probably cannot "
                f"place them ({num_workers} x {num_cpus_per_worker or 1} CPUs requested, {free:g} free). Lower "
                "num_workers or num_cpus_per_worker, or give Ray more CPUs (ray.init(num_cpus=...))."
            ) from e
        except BaseException:
            self._shut_down()
            raise
        self.max_steps = attributes["max_steps"]
        self.check_admissible = attributes["check_admissible"]
        self.history_length = attributes["history_length"]
        self._description = attributes["describe"]
        self._shards: list[tuple[int, int]] = []  # (start, stop) of each worker's instances in the batch
        self._owner: list[tuple[int, int]] = []  # instance -> (worker, local index)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    # -- the batch ------------------------------------------------------------------------------

    def reset(self, seeds: list[int]) -> list[EnvState]:
        self._check_open()
        n = len(seeds)
        base, extra = divmod(n, self.num_workers)
        self._shards, start = [], 0
        for k in range(self.num_workers):
            stop = start + base + (k < extra)
            self._shards.append((start, stop))
            start = stop
        self._owner = [(k, i - lo) for k, (lo, hi) in enumerate(self._shards) for i in range(lo, hi)]
        busy = [k for k, (lo, hi) in enumerate(self._shards) if hi > lo]
        parts = self._get([self.workers[k].reset.remote(list(seeds[slice(*self._shards[k])])) for k in busy])
        return [state for part in parts for state in part]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        self._check_open()
        if len(actions) != len(self._owner):
            raise ValueError(f"step() got {len(actions)} actions for {len(self._owner)} instances; pass one per "
                             "instance (None for done ones).")
        results: list[EnvState | None] = [None] * len(actions)
        # Actors whose instances are all done are not called at all.
        calls = [(k, lo, hi) for k, (lo, hi) in enumerate(self._shards) if any(a is not None for a in actions[lo:hi])]
        parts = self._get([self.workers[k].step.remote(list(actions[lo:hi])) for k, lo, hi in calls])
        for (k, lo, hi), part in zip(calls, parts):
            if len(part) != hi - lo:
                raise RuntimeError(f"environment worker {k} returned {len(part)} states for {hi - lo} actions")
            results[lo:hi] = part
        return results

    # -- per instance ---------------------------------------------------------------------------

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        worker, local = self._locate(index)
        return self._get(self.workers[worker].render_prompt.remote(local, history, state))

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        # Parsing does not depend on the instance; every worker holds the same environment class.
        self._check_open()
        return self._get(self.workers[0].parse_action.remote(response, state))

    def expert_response(self, index: int, state: EnvState) -> str | None:
        worker, local = self._locate(index)
        return self._get(self.workers[worker].expert_response.remote(local, state))

    def describe(self) -> dict[str, Any]:
        return self._description  # every worker holds the same environment setup

    def episode_metrics(self, index: int, state: EnvState) -> dict[str, Any]:
        worker, local = self._locate(index)
        return self._get(self.workers[worker].episode_metrics.remote(local, state))

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every environment and end the actors (Ray itself keeps running)."""
        if getattr(self, "_closed", True):
            return
        if not self._ray.is_initialized():  # Ray was shut down: the actors went with it
            self._closed = True
            return
        try:
            self._ray.get([w.close.remote() for w in self.workers])
        finally:
            self._shut_down()

    # -- internals ------------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[int, int]:
        self._check_open()
        if not 0 <= index < len(self._owner):
            raise IndexError(f"instance {index} does not exist: the last reset() made {len(self._owner)} instances")
        return self._owner[index]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.name} environment pool is closed; build a new RayEnvPool")

    def _shut_down(self, grace_s: float = 10.0) -> None:
        """End the actors. `ray.kill` alone is asynchronous (a call made right after it may still run),
        so each actor is first asked to exit after its queued calls (`__ray_terminate__`, whose result
        resolves once the actor is gone); actors still alive after `grace_s` are killed."""
        self._closed = True
        ray = self._ray
        exits = [w.__ray_terminate__.remote() for w in self.workers] if grace_s > 0 else []
        _, pending = ray.wait(exits, num_returns=len(exits), timeout=grace_s) if exits else ([], [])
        for worker, ref in zip(self.workers, exits or [None] * len(self.workers)):
            if ref is None or ref in pending:
                ray.kill(worker)

    def _get(self, refs):
        # An error raised inside an actor comes back as a RayTaskError that is also an instance of the
        # original exception class (a ValueError stays catchable as ValueError), with its traceback.
        return self._ray.get(refs)
