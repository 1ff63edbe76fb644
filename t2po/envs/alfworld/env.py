"""ALFWorld: household tasks in text (TextWorld + PDDL), the official 2.1.x game files, played in worker processes.

    env = make_env("alfworld", split="valid_seen")
    states = env.reset(seeds=[0, 0, 1, 1])          # 2 games x group size 2; seed -> game index seed % 140
    prompt = env.render_prompt(0, history=[], state=states[0])
    states = env.step(["go to countertop 1", None, "look", "open fridge 1"])

Behaviour follows verl-agent's ALFWorld environment (the reference of docs/method.md §6): its prompt templates, the
admissible-action check (an action outside the list is invalid but still sent; the game answers
"Nothing happens."), reward 10 for a won game and 0 otherwise, at most 50 steps, the raw game text as
observation and as GiGPO anchor observation. Per-task-type success rates come from
`aggregate_alfworld_metrics`.
"""

from __future__ import annotations

import os
from typing import Any

from t2po.envs import register_env
from t2po.envs.alfworld.games import TASK_TYPES, Game, collect_games, find_games_root
from t2po.envs.alfworld.pool import WorkerPool
from t2po.envs.base import BatchEnv, EnvState
from t2po.errors import InvalidInput

# The two prompt templates are verl-agent's ALFWORLD_TEMPLATE_NO_HIS / ALFWORLD_TEMPLATE word for word
# (its typo "observaitons" included), so that prompts match checkpoints trained with the reference.
ALFWORLD_TEMPLATE_NO_HIS = """
You are an expert agent operating in the ALFRED Embodied Environment.
Your current observation is: {current_observation}
Your admissible actions of the current situation are: [{admissible_actions}].

Now it's your turn to take an action.
You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed within \
<think> </think> tags. 
Once you've finished your reasoning, you should choose an admissible action for current step and present it within \
<action> </action> tags.
"""

ALFWORLD_TEMPLATE = """
You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: {task_description}
Prior to this step, you have already taken {step_count} step(s). Below are the most recent {history_length} \
observaitons and the corresponding actions you took: {action_history}
You are now at step {current_step} and your current observation is: {current_observation}
Your admissible actions of the current situation are: [{admissible_actions}].

Now it's your turn to take an action.
You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed within \
<think> </think> tags. 
Once you've finished your reasoning, you should choose an admissible action for current step and present it within \
<action> </action> tags.
"""

# prompt_style="compact": the same information in fewer tokens for small models on CPUs, where the
# prompt's prefill dominates the cost of a run: the task, the last `history_length` actions (without
# their observations), the current observation, the admissible actions on one line, one instruction.
_COMPACT_INSTRUCTION = "Answer with <think>brief reasoning</think><action>one admissible action</action>."
PROMPT_STYLES = ("reference", "compact")

#: reward of a won game (verl-agent: 10 * won); every other step gives 0
WIN_REWARD = 10.0
_TASK_PREFIX = "Your task is to: "


@register_env("alfworld")
class AlfWorldEnv(BatchEnv):
    """A batch of ALFWorld text games.

    Options:
        split: "train" (3553 games), "valid_seen" (140, evaluation in distribution; "valid" is an alias) or
            "valid_unseen" (134, evaluation out of distribution).
        max_steps: steps per episode before the game ends unsolved (50, the paper's setting).
        history_length: past (observation, action) pairs shown in the prompt (2, the paper's setting).
        prompt_style: "reference" (verl-agent's templates, the paper's setting) or "compact" (the task,
            the last `history_length` actions without their observations, the current observation, the
            admissible actions on one line: about half the tokens of the reference prompt after the first
            step, for small models on CPUs).
        num_workers: worker processes running the games (default: the CPU count), never more than the
            number of game instances; instance i runs in worker i % num_workers. A worker takes about
            80 MB of memory plus about 5 MB per game it holds (resident set measured by
            benchmarks/bench_alfworld.py). A step costs about 50 ms and loading + resetting a new game
            about 1 s of one CPU core (the TextWorld PDDL engine), so use about one worker per core.
        data_dir: folder with the game files (e.g. `$ALFWORLD_DATA` after `alfworld-download`); by default
            the project's archive, unpacked once into the cache (see `t2po.envs.alfworld.games`).

    Each instance's final state carries `metrics = {"success": 0 or 1, "task_type": <one of TASK_TYPES>}`.
    """

    check_admissible = True

    def __init__(
        self,
        split: str = "train",
        max_steps: int = 50,
        history_length: int = 2,
        num_workers: int | None = None,
        data_dir: str | os.PathLike | None = None,
        prompt_style: str = "reference",
    ) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise InvalidInput(f"max_steps must be a positive integer, got {max_steps!r}.")
        if not isinstance(history_length, int) or history_length < 0:
            raise InvalidInput(f"history_length must be an integer >= 0, got {history_length!r}.")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise InvalidInput("num_workers must be a positive integer (or None for the CPU count), got "
                               f"{num_workers!r}.")
        if prompt_style not in PROMPT_STYLES:
            raise InvalidInput(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}; got {prompt_style!r}.")
        self.prompt_style = prompt_style
        self.split = split
        self.max_steps = max_steps
        self.history_length = history_length
        self.num_workers = num_workers or os.cpu_count() or 1
        self.games: list[Game] = collect_games(find_games_root(data_dir), split)
        self._workers = WorkerPool(max_steps)
        # per instance, set by reset
        self._instance_games: list[Game] = []
        self._tasks: list[str] = []
        self._walkthroughs: list[list[str]] = []
        self._walkthrough_progress: list[int | None] = []  # steps taken along the walkthrough; None once off it
        self._done: list[bool] = []

    @property
    def worker_pids(self) -> list[int]:
        return self._workers.pids

    def game_for_seed(self, seed: int) -> Game:
        return self.games[seed % len(self.games)]

    def _worker_of(self, index: int) -> int:
        return index % len(self._workers)

    def reset(self, seeds: list[int]) -> list[EnvState]:
        if not seeds:
            raise ValueError("reset needs at least one seed.")
        self._instance_games = [self.game_for_seed(int(seed)) for seed in seeds]
        self._workers.grow(min(self.num_workers, len(seeds)))
        # every worker gets a request, possibly empty, so that it drops the games of the previous batch
        requests: dict[int, dict[str, Any]] = {w: {"cmd": "reset", "games": []} for w in range(len(self._workers))}
        for index, game in enumerate(self._instance_games):
            requests[self._worker_of(index)]["games"].append([index, game.path])
        answers = self._workers.request(requests)
        states: list[EnvState | None] = [None] * len(seeds)
        self._tasks = [""] * len(seeds)
        self._walkthroughs = [[] for _ in seeds]
        for answer in answers.values():
            for index, observation, won, admissible, walkthrough in answer:
                start = observation.find(_TASK_PREFIX)
                if start == -1:
                    raise RuntimeError("No task description in the first observation of "
                                       f"{self._instance_games[index].path}.")
                self._tasks[index] = observation[start + len(_TASK_PREFIX) :].strip()
                self._walkthroughs[index] = walkthrough
                states[index] = EnvState(
                    observation=observation,
                    won=won,
                    admissible_actions=admissible,
                    info={"gamefile": self._instance_games[index].path},
                )
        self._walkthrough_progress = [0] * len(seeds)
        self._done = [False] * len(seeds)
        return states  # type: ignore[return-value]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        if len(actions) != len(self._done):
            raise ValueError(f"step got {len(actions)} actions for {len(self._done)} instances (call reset first).")
        for index, action in enumerate(actions):
            if action is not None and not isinstance(action, str):
                raise TypeError(f"Action of instance {index} must be a string or None, got {type(action).__name__}.")
            if action is not None and self._done[index]:
                raise ValueError(f"Instance {index} is done; pass None as its action.")
        requests: dict[int, dict[str, Any]] = {}
        for index, action in enumerate(actions):
            if action is None:
                continue
            self._follow_walkthrough(index, action)
            request = requests.setdefault(self._worker_of(index), {"cmd": "step", "actions": []})
            request["actions"].append([index, action])
        answers = self._workers.request(requests)
        states: list[EnvState | None] = [None] * len(actions)
        for answer in answers.values():
            for index, observation, done, won, admissible in answer:
                self._done[index] = done
                metrics = {"success": int(won), "task_type": self._instance_games[index].task_type} if done else {}
                states[index] = EnvState(
                    observation=observation,
                    reward=WIN_REWARD if won else 0.0,
                    done=done,
                    won=won,
                    admissible_actions=admissible,
                    metrics=metrics,
                    info={"gamefile": self._instance_games[index].path},
                )
        return states

    def _follow_walkthrough(self, index: int, action: str) -> None:
        progress = self._walkthrough_progress[index]
        walkthrough = self._walkthroughs[index]
        if progress is not None and progress < len(walkthrough) and walkthrough[progress] == action:
            self._walkthrough_progress[index] = progress + 1
        else:
            self._walkthrough_progress[index] = None

    def task_description(self, index: int) -> str:
        return self._tasks[index]

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        # verl-agent leaves "help" out of the listed actions (it stays admissible)
        listed = [action for action in state.admissible_actions or [] if action != "help"]
        if self.prompt_style == "compact":
            recent = [action for _, action in history[-self.history_length :]] if self.history_length > 0 else []
            past = f"Your last actions: {'; '.join(recent)}.\n" if recent else ""
            return (f"ALFWorld household task: {self._tasks[index]}\n{past}Now (step {len(history) + 1}): "
                    f"{state.observation}\nAdmissible actions: {'; '.join(listed)}.\n{_COMPACT_INSTRUCTION}")
        admissible = "\n ".join(f"'{action}'" for action in listed)
        if not history or self.history_length <= 0:
            return ALFWORLD_TEMPLATE_NO_HIS.format(current_observation=state.observation, admissible_actions=admissible)
        recent = history[-self.history_length :]
        first = len(history) - len(recent) + 1
        action_history = "\n".join(
            f"[Observation {first + k}: '{observation}', Action {first + k}: '{action}']"
            for k, (observation, action) in enumerate(recent)
        )
        return ALFWORLD_TEMPLATE.format(
            task_description=self._tasks[index],
            step_count=len(history),
            history_length=len(recent),
            action_history=action_history,
            current_step=len(history) + 1,
            current_observation=state.observation,
            admissible_actions=admissible,
        )

    def expert_response(self, index: int, state: EnvState) -> str | None:
        """The next action of the game's stored walkthrough while the episode has followed it, else the
        first action of a fresh Fast Downward plan from the current state (alfworld's planner expert; its
        hand-coded expert needs `traj_data.json`, which the shipped game files lack)."""
        if state.done:
            return None
        progress = self._walkthrough_progress[index]
        if progress is not None and progress < len(self._walkthroughs[index]):
            action = self._walkthroughs[index][progress]
        else:
            plan = self._workers.request({self._worker_of(index): {"cmd": "plan", "slot": index}})
            plan = next(iter(plan.values()))
            if not plan:
                return None
            action = plan[0]
        task = self._tasks[index].rstrip(".")
        return f"<think>My task is to {task}. The next step towards it is to {action}.</think><action>{action}</action>"

    def close(self) -> None:
        self._workers.close()


def aggregate_alfworld_metrics(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Success rate over all episodes and for each task type, with episode counts.

    `episodes` are final `EnvState.metrics` dicts ({"success": 0/1, "task_type": name}). Returns
    {"success_rate", "num_episodes", "<task_type>/success_rate", "<task_type>/num_episodes"}; a task type
    without episodes has a count of 0 and no success rate."""
    by_type: dict[str, list[float]] = {name: [] for name in TASK_TYPES.values()}
    for k, episode in enumerate(episodes):
        if "success" not in episode or "task_type" not in episode:
            raise ValueError(f"Episode {k} metrics {episode!r} lack 'success' or 'task_type'; pass the final "
                             "EnvState.metrics.")
        if episode["task_type"] not in by_type:
            raise ValueError(f"Episode {k} has unknown task_type {episode['task_type']!r}; expected one of "
                             f"{', '.join(by_type)}.")
        by_type[episode["task_type"]].append(float(episode["success"]))
    successes = [s for values in by_type.values() for s in values]
    result: dict[str, float] = {"num_episodes": len(successes)}
    if successes:
        result["success_rate"] = sum(successes) / len(successes)
    for name, values in by_type.items():
        result[f"{name}/num_episodes"] = len(values)
        if values:
            result[f"{name}/success_rate"] = sum(values) / len(values)
    return result
