"""The program each ALFWorld worker process runs: it holds some of the batch's games and plays them with
the real TextWorld engine, answering the parent's requests (see `pool.py` for the parent's side).

A game is the environment that `textworld.gym` builds for alfworld's `AlfredTWEnv.init_env`:
`GenericEnvironment` (TextWorld's PDDL engine) -> `Limit(max_steps)` -> `AlfredDemangler` (readable
object names, no shuffling) -> `AlfredInfos` -> `Filter`.

Requests and answers are JSON lines on stdin/stdout, strictly one request then one answer. The worker
exits when asked, when its stdin closes, or within a second of its parent dying (it polls the parent pid).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback
from typing import Any

import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
from textworld.envs.wrappers import Filter, GenericEnvironment, Limit

_REQUESTED_INFOS = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "walkthrough"])


def _new_game_env(max_steps: int) -> Any:
    env = Limit(GenericEnvironment(_REQUESTED_INFOS), max_episode_steps=max_steps)
    for wrapper in (AlfredDemangler(shuffle=False), AlfredInfos, Filter):
        env = wrapper(env)
    return env


class Games:
    """The games one worker holds, by slot (the instance index in the batch)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._envs: dict[int, Any] = {}
        self._loaded: dict[int, str] = {}  # slot -> game file its env holds

    def reset(self, games: list[list[Any]]) -> list[list[Any]]:
        """`games`: [slot, game file] pairs. Answers [slot, observation, won, admissible, walkthrough]."""
        keep = {slot for slot, _ in games}
        for slot in set(self._envs) - keep:  # instances of an earlier, larger batch
            del self._envs[slot], self._loaded[slot]
        answers = []
        for slot, path in games:
            if slot not in self._envs:
                self._envs[slot] = _new_game_env(self.max_steps)
            env = self._envs[slot]
            if self._loaded.get(slot) != path:  # loading parses the PDDL; resetting the same game is cheaper
                env.load(path)
                self._loaded[slot] = path
            obs, infos = env.reset()
            answers.append([slot, obs, bool(infos["won"]), infos["admissible_commands"], infos["extra.walkthrough"]])
        return answers

    def step(self, actions: list[list[Any]]) -> list[list[Any]]:
        """`actions`: [slot, command] pairs. Answers [slot, observation, done, won, admissible]."""
        answers = []
        for slot, action in actions:
            obs, _, done, infos = self._envs[slot].step(action)
            answers.append([slot, obs, bool(done), bool(infos["won"]), infos["admissible_commands"]])
        return answers

    def plan(self, slot: int) -> list[str]:
        """Commands that reach the goal from the current state: the Fast Downward plan that alfworld's
        PLANNER expert reads as `policy_commands`. Asked for on demand because planning at every step
        would cost about a fifth of the step time."""
        pddl_env = self._envs[slot].unwrapped
        return pddl_env._pddl_state.replan(pddl_env._entity_infos)


def serve(max_steps: int, parent_pid: int) -> None:
    """The worker's request loop; ends the process when done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the workers
    answer_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the game libraries print goes to stderr, not into the answers

    def answer(message: dict[str, Any]) -> None:
        answer_stream.write(json.dumps(message) + "\n")

    games = Games(max_steps)
    answer({"ok": "ready"})
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 1.0)
        if not readable:
            if os.getppid() != parent_pid:
                break
            continue
        line = sys.stdin.readline()
        if not line:  # the parent closed our stdin or died
            break
        request = json.loads(line)
        if request["cmd"] == "close":
            break
        try:
            if request["cmd"] == "reset":
                result: Any = games.reset(request["games"])
            elif request["cmd"] == "step":
                result = games.step(request["actions"])
            elif request["cmd"] == "plan":
                result = games.plan(request["slot"])
            else:
                raise ValueError(f"unknown request {request['cmd']!r}")
        except Exception:
            answer({"error": traceback.format_exc()})
        else:
            answer({"ok": result})
    # Nothing to save or flush (answers are line-buffered): skip the interpreter's slow teardown of the
    # loaded games, which would only delay the parent's close().
    os._exit(0)
