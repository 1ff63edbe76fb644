"""EZPoints and Points24: build, token by token, a formula over the card numbers that hits a target.

Rules as in gym-cards (RL4VLM's `ezpoints.py` and `points.py`):
- EZPoints: two cards whose values make 12 with one '+' or '*' (the deal guarantees it); tokens are
  the numbers 1-10, '+', '*', '='. Points24: four uniformly drawn cards (not always solvable);
  tokens are 1-10, '+', '-', '*', '/', '(', ')', '='. A is 1; J, Q, K are 10.
- Each step appends one token. A number with no unused card of that value is rejected: reward -1,
  formula unchanged. '=' ends the game: +10 if the formula parses, uses every card once and equals
  the target, else -1. Other tokens: reward 0.
- The formula holds at most 5 (EZPoints) or 20 (Points24) tokens; appending beyond that ends the game
  with -1. (gym-cards accepted one more token and ended the game on the action after it, also with
  -1; no formula that could still be evaluated is lost.)
Deliberate differences from gym-cards: the formula is evaluated exactly (`formula.py`: fractions, no
`eval`, so no power operator, unary minus or number concatenation); a rejected number is not
appended as a blank but costs a step of `max_steps`; the ten of a suit is drawn as "10" (gym-cards:
"T").
"""

from __future__ import annotations

import abc
import random
from collections import Counter
from fractions import Fraction
from typing import Any

from PIL import Image

from t2po.envs import register_env
from t2po.envs.cards.drawing import formula_picture
from t2po.envs.cards.formula import FormulaError, can_reach, complete_formula, evaluate_formula
from t2po.envs.cards.game import SUITS, Card, CardGame, CardGameEnv, Move, random_card

NUMBER_TOKENS = tuple(str(n) for n in range(1, 11))
WIN_REWARD = 10.0
LOSS_REWARD = -1.0  # wrong or invalid formula at '=', a rejected number, a formula that is too long


def _format_value(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class FormulaGame(CardGame):
    """One deal of a points game: the cards, the formula so far, the rules' parameters."""

    def __init__(
        self,
        cards: list[Card],
        target: int,
        operators: tuple[str, ...],
        parentheses: bool,
        max_formula_tokens: int,
    ) -> None:
        self.cards = list(cards)
        self.target = target
        self.operators = operators
        self.parentheses = parentheses
        self.max_formula_tokens = max_formula_tokens
        self.formula: list[str] = []
        self.finished_with_equals = False
        self._used: Counter[int] = Counter()

    @property
    def numbers(self) -> list[int]:
        return [card.value for card in self.cards]

    def play(self, action: str) -> Move:
        if action == "=":
            return self._evaluate()
        if len(self.formula) >= self.max_formula_tokens:
            self.done = True
            return Move(LOSS_REWARD,
                        feedback=f"The formula may hold at most {self.max_formula_tokens} tokens: the game is over.")
        if action in NUMBER_TOKENS:
            value = int(action)
            if self._used[value] >= self.numbers.count(value):
                reason = "its card is already used" if value in self.numbers else f"no card has the value {value}"
                return Move(LOSS_REWARD, legal=False, feedback=f"'{action}' was rejected: {reason}.")
            self._used[value] += 1
        self.formula.append(action)
        return Move(0.0)

    def _evaluate(self) -> Move:
        self.done = True
        self.finished_with_equals = True
        try:
            value = evaluate_formula(self.formula)
        except FormulaError as err:
            return Move(LOSS_REWARD, feedback=f"The formula is not valid ({err}). You lose.")
        if sum(self._used.values()) != len(self.cards):
            return Move(LOSS_REWARD, feedback="The formula does not use every card. You lose.")
        if value != self.target:
            return Move(LOSS_REWARD,
                        feedback=f"The formula equals {_format_value(value)}, not {self.target}. You lose.")
        self.won = True
        return Move(WIN_REWARD, feedback=f"The formula equals {self.target}. You win!")

    def formula_text(self) -> str:
        text = " ".join(self.formula)
        return f"{text} =" if self.finished_with_equals else text

    def task(self) -> str:
        labels = ", ".join(card.label for card in self.cards)
        return f"Build a formula that equals {self.target} from the cards {labels}."

    def describe(self) -> str:
        cards = ", ".join(f"{card.describe()} ({card.value})" for card in self.cards)
        return f"Cards: {cards}.\n{self.caption()}"

    def caption(self) -> str:
        return (f"Current formula: '{self.formula_text()}'" if self.formula or self.finished_with_equals
                else "Current formula: '' (empty)")

    def picture(self) -> Image.Image:
        return formula_picture(self.cards, self.formula_text())

    def solvable(self) -> bool:
        return can_reach(tuple(sorted(Fraction(n) for n in self.numbers)), Fraction(self.target), self.operators)

    def metrics(self) -> dict[str, Any]:
        return {"success": int(self.won), "solvable": int(self.solvable())}

    def info(self) -> dict[str, Any]:
        return {"cards": [card.describe() for card in self.cards], "numbers": self.numbers,
                "formula": list(self.formula)}

    def expert(self) -> tuple[str, str] | None:
        solution = complete_formula(
            tuple(self.numbers), tuple(self.formula), self.target, self.operators, self.parentheses,
                                    self.max_formula_tokens
        )
        if solution is None:
            return None
        full = " ".join(solution)
        numbers = ", ".join(str(n) for n in self.numbers)
        if len(solution) == len(self.formula):
            return f"The formula {full} uses every card ({numbers}) and equals {self.target}, so I finish it.", "="
        token = solution[len(self.formula)]
        so_far = f"the formula so far is '{' '.join(self.formula)}'" if self.formula else "the formula is still empty"
        return (
            f"The card numbers are {numbers}, and {full} = {self.target}. Since {so_far}, the next token is '{token}'.",
            token,
        )


def deal_ezpoints(rng: random.Random) -> list[Card]:
    """Two cards that make 12 with '+' or '*' (gym-cards' deal): the first card is 2 to K; the second is
    12 // v with probability 1/2 when v divides 12, else 12 - v; then the order is swapped with probability 1/2."""
    first = Card(rng.randint(2, 13), rng.choice(SUITS))
    v = first.value
    second_value = 12 // v if v in (2, 3, 4, 6) and rng.random() <= 0.5 else 12 - v
    cards = [first, Card(second_value, rng.choice(SUITS))]
    return cards[::-1] if rng.random() <= 0.5 else cards


def deal_points24(rng: random.Random) -> list[Card]:
    """Four cards from an infinite deck (gym-cards' deal; about one deal in five has no solution)."""
    return [random_card(rng) for _ in range(4)]


def _card_rules(count: str) -> str:
    return (
        f"Card rules: each of the {count} cards stands for one number: A is 1, number cards 2-10 are their number, "
        "and J, Q and K are 10. Each card must be used exactly once."
    )


class _PointsEnv(CardGameEnv):
    """Shared by EZPoints and Points24."""

    target: int
    operators: tuple[str, ...]
    parentheses: bool
    max_formula_tokens: int

    def _where(self) -> str:
        return {"image": "shown in the image", "text": "listed below", "both": "shown in the image and listed below"}[
            self.observation_mode
        ]

    def new_game(self, rng: random.Random) -> FormulaGame:
        return FormulaGame(self.deal(rng), self.target, self.operators, self.parentheses, self.max_formula_tokens)

    @abc.abstractmethod
    def deal(self, rng: random.Random) -> list[Card]:
        """The cards of a new game."""

    def _formula_rules(self, token_kinds: str) -> str:
        return (
            f"Formula rules: each step appends exactly one token to the end of the formula: {token_kinds}; or '=' "
            "to finish. A number with no unused card of that value is rejected (reward -1) and the formula stays as "
            "it was. '=' evaluates the formula and ends the game: reward +10 if it is valid, uses every card and "
            f"equals {self.target}; reward -1 otherwise. The formula holds at most {self.max_formula_tokens} tokens; "
            "appending more ends the game with reward -1."
        )


@register_env("ezpoints")
class EZPointsEnv(_PointsEnv):
    """EZPoints (gym-cards): make 12 from two cards with '+' or '*'.

    Options: those of `CardGameEnv` (split, max_steps = 10 by default, history_length,
    observation_mode). Reward +10 for a correct formula, -1 for a rejected number or a wrong/invalid
    formula, 0 otherwise. Metrics: success, solvable (always 1 here)."""

    action_tokens = NUMBER_TOKENS + ("+", "*", "=")
    default_max_steps = 10
    target = 12
    operators = ("+", "*")
    parentheses = False
    max_formula_tokens = 5

    def deal(self, rng: random.Random) -> list[Card]:
        return deal_ezpoints(rng)

    def rules(self) -> str:
        return "\n".join(
            [
                f"You are an expert card game player. Build a math formula that evaluates to exactly {self.target}, "
                f"using only the numbers of the two playing cards {self._where()}.",
                _card_rules("two"),
                self._formula_rules("the number of a card or an operator ('+' or '*')"),
            ]
        )


@register_env("points24")
class Points24Env(_PointsEnv):
    """Points24 (gym-cards): the 24 game on four cards with + - * / and parentheses.

    Options: those of `CardGameEnv` (split, max_steps = 25 by default: a legal episode takes at most
    21 steps, history_length, observation_mode). Rewards as EZPoints. Metrics: success, solvable
    (whether the deal has any solution; gym-cards deals unsolvable hands too)."""

    action_tokens = NUMBER_TOKENS + ("+", "-", "*", "/", "(", ")", "=")
    default_max_steps = 25
    target = 24
    operators = ("+", "-", "*", "/")
    parentheses = True
    max_formula_tokens = 20

    def deal(self, rng: random.Random) -> list[Card]:
        return deal_points24(rng)

    def rules(self) -> str:
        return "\n".join(
            [
                "You are an expert at the classic \"24 Game\": build a formula that evaluates to exactly "
                f"{self.target}, using the numbers of the four playing cards {self._where()}.",
                _card_rules("four"),
                self._formula_rules("the number of a card, an operator ('+', '-', '*', '/'), or a parenthesis ('(' or "
                                    "')')"),
                "Arithmetic is exact (8 / 3 is a fraction, not rounded). Every number is a separate token: '2' "
                "followed by '4' is not 24, and there is no negative sign (write '1 - 2', not '-2').",
                "Example: cards 8, 3, 2 and A (1), current formula '8 *'. Since 8 * 3 * (2 - 1) = 24, the next token "
                "is '3'.",
            ]
        )
