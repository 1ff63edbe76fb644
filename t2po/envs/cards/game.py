"""What the four gym-cards games share: playing cards, the one-instance game interface, and the batch
environment that runs any of them behind the t2po protocol.

A game (`CardGame`) is one instance with its own `random.Random`: it applies an action token,
describes its state in words, draws it, and knows an expert move. `CardGameEnv` holds one game per
instance and adds what every game needs: seeding by split, the step limit, observation modes, the
prompt, and the check that actions are among the game's tokens.

Observation modes (constructor option `observation_mode`):
- "image": `EnvState.image` is the RGB picture; the prompt shows the literal `<image>` marker where the
  picture goes (the VLM prompt builder replaces it) and only the text gym-cards gives beside the
  picture (the current formula in the points games).
- "text": no picture; the observation describes the whole state in words.
- "both": the picture and the description.
In every mode `anchor_obs` (GiGPO's step-grouping key) is the full description, so that step groups
never merge different states, whatever the model is shown.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction
from t2po.errors import InvalidInput

SUITS = ("hearts", "diamonds", "clubs", "spades")
_RANK_LABELS = {1: "A", 11: "J", 12: "Q", 13: "K"}

#: validation tasks use seed + VALID_SEED_OFFSET, so that equal seeds give different train and valid tasks
VALID_SEED_OFFSET = 1000
SPLITS = ("train", "valid")
OBSERVATION_MODES = ("image", "text", "both")


@dataclass(frozen=True)
class Card:
    """A playing card: rank 1 (ace) to 13 (king) and a suit."""

    rank: int
    suit: str

    @property
    def value(self) -> int:
        """Points value in the gym-cards games: ace 1, number cards their number, J/Q/K 10."""
        return min(self.rank, 10)

    @property
    def label(self) -> str:
        return _RANK_LABELS.get(self.rank, str(self.rank))

    def describe(self) -> str:
        return f"{self.label} of {self.suit}"


def random_card(rng: random.Random) -> Card:
    """A card from an infinite deck: rank and suit uniform."""
    return Card(rng.randint(1, 13), rng.choice(SUITS))


@dataclass(frozen=True)
class Move:
    """What one action did: its reward, whether the game accepted it, and a sentence for the player
    when it was rejected or ended the game ("" otherwise)."""

    reward: float
    legal: bool = True
    feedback: str = ""


class CardGame(abc.ABC):
    """One instance of a gym-cards game."""

    done: bool = False
    won: bool = False

    @abc.abstractmethod
    def play(self, action: str) -> Move:
        """Apply `action`, one of the game's action tokens."""

    @abc.abstractmethod
    def task(self) -> str:
        """One sentence: what this instance asks for."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The whole state in words (text observation and GiGPO anchor)."""

    @abc.abstractmethod
    def caption(self) -> str:
        """The text shown beside the picture in image mode."""

    @abc.abstractmethod
    def picture(self) -> Image.Image:
        """The state as a 300x300 RGB picture."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, Any]:
        """Episode metrics, at least {"success": 0 or 1}; also called on a game cut off by the step limit."""

    @abc.abstractmethod
    def expert(self) -> tuple[str, str] | None:
        """(short reasoning, action token) of an expert, or None when no move can still win."""

    def info(self) -> dict[str, Any]:
        """Structured state for traces and tests."""
        return {}


def cards_projection(response: str, action_tokens: tuple[str, ...]) -> ParsedAction:
    """The reference's gym-cards projection (WillDreamer/T2PO-ICML,
    agent_system/environments/env_package/gym_cards/projection.py), read on this package's `<action>` span
    where the reference's prompts ask for a JSON `"action":` field:

        string = string.lower()
        action_index = string.find('"action":')
        string = string[action_index:]
        if 'points' in env_name.lower() and '10' in string:
            contained_actions.append('10')
            string = string.replace('10', '')  # Remove '10' to prevent it from being counted as '1'
        for action in action_list:
            if action in string: contained_actions.append(action)
        contained_actions = list(set(contained_actions))
        if len(contained_actions) == 1 and contained_actions[0] in action_list: valid

    The span is the text between `<action>` and `</action>` (or to the end): everything after the tag would
    always contain the "/" of `</action>`, a Points24 keyword. Where the reference finds no key, `find` gives -1
    and it reads the last character alone; here a response without `<action>` is invalid. No think check."""
    text = (response if isinstance(response, str) else "").lower()
    start = text.find("<action>")
    if start == -1:
        return ParsedAction(text[-30:], False, "no <action> tag")
    end = text.find("</action>", start)
    span = text[start + len("<action>") : end if end != -1 else len(text)]
    contained = set()
    if "10" in action_tokens and "10" in span:  # the points games
        contained.add("10")
        span = span.replace("10", "")
    contained.update(token for token in action_tokens if token in span)
    if len(contained) != 1:
        reason = f"{len(contained)} action keywords in the action span (need exactly one)"
        return ParsedAction(span.strip(), False, reason)
    return ParsedAction(contained.pop(), True)


class CardGameEnv(BatchEnv):
    """A batch of one gym-cards game (subclasses say which game and its rules).

    Options (all environments):
      split: "train" (task seed = seed) or "valid" (task seed = seed + 1000).
      max_steps: steps before an unfinished episode is cut off (done, no extra reward, success 0);
        None = the game's default.
      history_length: past (observation, action) pairs shown in the prompt.
      observation_mode: "image" (default, as gym-cards), "text" or "both"; see the module docstring.

    An action that is not one of the game's tokens (the rollout penalises it as invalid) leaves the
    game unchanged with reward 0 and uses up a step.
    """

    check_admissible = True
    #: the game's action tokens, in gym-cards' action-space order
    action_tokens: tuple[str, ...] = ()
    #: default of the `max_steps` option
    default_max_steps: int = 10

    def __init__(
        self,
        *,
        split: str = "train",
        max_steps: int | None = None,
        history_length: int = 2,
        observation_mode: str = "image",
    ) -> None:
        if split not in SPLITS:
            raise InvalidInput(f"split={split!r} is not supported by {self.name}; use one of {', '.join(SPLITS)}.")
        if observation_mode not in OBSERVATION_MODES:
            raise InvalidInput(
                f"observation_mode={observation_mode!r} is not supported; use one of {', '.join(OBSERVATION_MODES)}."
            )
        if max_steps is None:
            max_steps = self.default_max_steps
        if not isinstance(max_steps, int) or max_steps < 1:
            raise InvalidInput(f"max_steps must be a positive integer, got {max_steps!r}.")
        if not isinstance(history_length, int) or history_length < 0:
            raise InvalidInput(f"history_length must be a non-negative integer, got {history_length!r}.")
        self.split = split
        self.max_steps = max_steps
        self.history_length = history_length
        self.observation_mode = observation_mode
        self._games: list[CardGame] = []
        self._steps: list[int] = []
        self._done: list[bool] = []

    # -- what a subclass provides ------------------------------------------------------------

    @abc.abstractmethod
    def new_game(self, rng: random.Random) -> CardGame:
        """A fresh game drawn with `rng` (the instance's own generator)."""

    @abc.abstractmethod
    def rules(self) -> str:
        """The game and its rules, as the prompt states them (may depend on the observation mode)."""

    # -- protocol ----------------------------------------------------------------------------

    def task_seed(self, seed: int) -> int:
        """The seed that draws the task: `seed` for train, `seed + 1000` for valid."""
        return seed + VALID_SEED_OFFSET if self.split == "valid" else seed

    def reset(self, seeds: list[int]) -> list[EnvState]:
        if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
            raise TypeError(f"seeds must be integers, got {seeds!r}.")
        self._games = [self.new_game(random.Random(self.task_seed(s))) for s in seeds]
        self._steps = [0] * len(seeds)
        self._done = [False] * len(seeds)
        return [self._state(i, Move(0.0)) for i in range(len(seeds))]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        if not self._games:
            raise RuntimeError(f"{self.name}: call reset(seeds) before step(actions).")
        if len(actions) != len(self._games):
            raise ValueError(
                f"step got {len(actions)} actions for {len(self._games)} instances; pass one entry per instance "
                "(None for finished ones), in the order of reset's seeds."
            )
        states: list[EnvState | None] = []
        for i, action in enumerate(actions):
            if action is None:
                states.append(None)
                continue
            if not isinstance(action, str):
                raise TypeError(f"action for instance {i} must be a string or None, got {type(action).__name__}.")
            if self._done[i]:
                raise ValueError(f"instance {i} is already done; pass None as its action.")
            move = self._play(self._games[i], action)
            self._steps[i] += 1
            if self._games[i].done:
                self._done[i] = True
            elif self._steps[i] >= self.max_steps:
                self._done[i] = True
                feedback = f"{move.feedback} Out of steps: the game is over.".strip()
                move = Move(move.reward, move.legal, feedback)
            states.append(self._state(i, move))
        return states

    def _play(self, game: CardGame, action: str) -> Move:
        token = action.strip().lower()
        if token not in self.action_tokens:
            allowed = ", ".join(f"'{a}'" for a in self.action_tokens)
            return Move(0.0, legal=False,
                    feedback=f"'{action[:30]}' is not an action of this game (actions: {allowed}); nothing changed.")
        return game.play(token)

    def _state(self, index: int, move: Move) -> EnvState:
        game = self._games[index]
        description = game.describe()
        observation = game.caption() if self.observation_mode == "image" else description
        if move.feedback:
            observation = f"{move.feedback}\n{observation}"
        done = self._done[index]
        return EnvState(
            observation=observation,
            reward=float(move.reward),
            done=done,
            won=bool(game.won),
            anchor_obs=description,
            admissible_actions=list(self.action_tokens),
            image=None if self.observation_mode == "text" else game.picture(),
            metrics=game.metrics() if done else {},
            info={"legal_action": move.legal, **game.info()},
        )

    def task_description(self, index: int) -> str:
        """What instance `index` asks for, in one sentence."""
        return self._games[index].task()

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        """`cards_projection` with `response_format` "reference" (the default), else the generic check."""
        if self.response_format == "reference":
            return cards_projection(response, self.action_tokens)
        return super().parse_action(response, state)

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        parts = [self.rules()]
        shown = history[-self.history_length :] if self.history_length else []
        if history:
            lines = [f"Prior to this step, you have already taken {len(history)} step(s)."]
            if shown:
                lines.append(f"Below are the most recent {len(shown)} observation(s) and the action(s) you took:")
                first = len(history) - len(shown) + 1
                for k, (obs, act) in enumerate(shown, start=first):
                    lines.append(f"[Observation {k}: {obs.strip()}]\n[Action {k}: '{act}']")
            parts.append("\n".join(lines))
        marker = "" if self.observation_mode == "text" else "<image>\n"
        parts.append(f"You are now at step {len(history) + 1} and your current observation "
                     f"is:\n{marker}{state.observation}")
        actions = ", ".join(f"'{a}'" for a in (state.admissible_actions or self.action_tokens))
        parts.append(f"Your admissible actions are: {actions}.")
        parts.append(
            "Now it's your turn to take one action. First reason step by step about the current state inside "
            "<think> </think> tags. Then choose one admissible action and present it inside <action> </action> "
            "tags, with nothing else in the action tags."
        )
        return "\n\n".join(parts)

    def expert_response(self, index: int, state: EnvState) -> str | None:
        """The expert's next move for instance `index` (its current state), or None when the episode
        is over or no move can still win (an unsolvable deal, a formula that went wrong)."""
        if self._done[index]:
            return None
        plan = self._games[index].expert()
        if plan is None:
            return None
        reasoning, action = plan
        return f"<think>{reasoning}</think><action>{action}</action>"
