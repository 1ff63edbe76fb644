"""NumberLine: move the current number to the target with '+' and '-'.

Rules as in gym-cards (RL4VLM's `numberline.py`): positions 0..max_position (default 5), start and
target drawn uniformly and different; '-' subtracts one and '+' adds one, staying within the line.
Reward +1 on reaching the target (the game ends), -1 for a move that does not bring the number
closer (including a move against the end of the line), 0 otherwise. The episode is cut off after
2 * max_position steps (gym-cards' truncation; the `max_steps` default).
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from t2po.envs import register_env
from t2po.envs.cards.drawing import number_line_picture
from t2po.envs.cards.game import CardGame, CardGameEnv, Move
from t2po.errors import InvalidInput


class NumberLineGame(CardGame):
    """One number line: where the current number is, where it must go."""

    def __init__(self, start: int, target: int, max_position: int) -> None:
        if not (0 <= start <= max_position and 0 <= target <= max_position):
            raise ValueError(f"start {start} and target {target} must lie in 0..{max_position}")
        self.start = start
        self.position = start
        self.target = target
        self.max_position = max_position

    def play(self, action: str) -> Move:
        before = abs(self.position - self.target)
        step = 1 if action == "+" else -1
        self.position = min(max(self.position + step, 0), self.max_position)
        after = abs(self.position - self.target)
        if after == 0:
            self.done = self.won = True
            return Move(1.0, feedback="You reached the target!")
        return Move(-1.0 if after >= before else 0.0)

    def task(self) -> str:
        return f"Move the current number from {self.start} to {self.target}."

    def describe(self) -> str:
        return f"Target number: {self.target}. Current number: {self.position}."

    def caption(self) -> str:
        return "The image shows the target number and the current number."

    def picture(self) -> Image.Image:
        return number_line_picture(self.position, self.target, self.max_position)

    def metrics(self) -> dict[str, Any]:
        return {"success": int(self.won)}

    def info(self) -> dict[str, Any]:
        return {"position": self.position, "target": self.target}

    def expert(self) -> tuple[str, str]:
        if self.position < self.target:
            return (f"The current number is {self.position} and the target is {self.target}; it is below the target, "
                    "so I add one.", "+")
        return (f"The current number is {self.position} and the target is {self.target}; it is above the target, so I "
                "subtract one.", "-")


@register_env("numberline")
class NumberLineEnv(CardGameEnv):
    """NumberLine (gym-cards).

    Options: max_position (default 5: the line is 0..5), and those of `CardGameEnv` (split,
    max_steps = 2 * max_position by default, history_length, observation_mode). Metrics: success."""

    action_tokens = ("-", "+")

    def __init__(
        self,
        *,
        max_position: int = 5,
        split: str = "train",
        max_steps: int | None = None,
        history_length: int = 2,
        observation_mode: str = "image",
    ) -> None:
        if not isinstance(max_position, int) or max_position < 1:
            raise InvalidInput(f"max_position must be a positive integer, got {max_position!r}.")
        self.max_position = max_position
        super().__init__(
            split=split,
            max_steps=2 * max_position if max_steps is None else max_steps,
            history_length=history_length,
            observation_mode=observation_mode,
        )

    def random_success(self, seeds: list[int]) -> list[float]:
        """Exact chance that uniformly random moves ('+' or '-', one half each) reach each task's target within
        `max_steps`: P(position, k) = 1 at the target, 0 when k = 0, else the mean of P(position + 1, k - 1) and
        P(position - 1, k - 1), the position clipped to the line as `NumberLineGame.play` clips it."""
        memo: dict[tuple[int, int, int], float] = {}

        def chance(position: int, target: int, steps: int) -> float:
            if position == target:
                return 1.0
            if steps == 0:
                return 0.0
            key = (position, target, steps)
            if key not in memo:
                up, down = min(position + 1, self.max_position), max(position - 1, 0)
                memo[key] = (chance(up, target, steps - 1) + chance(down, target, steps - 1)) / 2
            return memo[key]

        games = [self.new_game(random.Random(self.task_seed(s))) for s in seeds]
        return [chance(game.start, game.target, self.max_steps) for game in games]

    def new_game(self, rng: random.Random) -> NumberLineGame:
        start = rng.randint(0, self.max_position)
        target = rng.choice([n for n in range(self.max_position + 1) if n != start])
        return NumberLineGame(start, target, self.max_position)

    def rules(self) -> str:
        where = {
            "image": "You will see a target number and a current number in the image. ",
            "text": "",
            "both": "The image and the text below show the target number and the current number. ",
        }[self.observation_mode]
        return (
            f"You are playing a game called number line, on the whole numbers from 0 to {self.max_position}. {where}"
            "Your goal is to move the current number to the target number, one step at a time: '+' adds one to the "
            "current number and '-' subtracts one (the number never leaves the line). Reaching the target gives "
            "reward +1 and ends the game; a move that does not bring the current number closer to the target gives "
            f"reward -1. You have {self.max_steps} moves."
        )
