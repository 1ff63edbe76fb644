"""The four gym-cards games of RL4VLM (used by verl-agent), as t2po environments.

    env = make_env("points24", observation_mode="text")      # or "image" (default) / "both"
    states = env.reset(seeds=[3, 3, 4])

- "ezpoints": make 12 from two cards with + and * (`points.py`)
- "points24": the 24 game on four cards with + - * / ( ) (`points.py`)
- "numberline": move a number to a target with + and - (`numberline.py`)
- "blackjack": hit or stand against the dealer (`blackjack.py`)

`game.py` holds what they share (cards, seeding by split, observation modes, the prompt),
`formula.py` the safe formula evaluator and the solver, `drawing.py` the PIL pictures.
"""

from t2po.envs.cards.blackjack import BlackjackEnv, BlackjackGame
from t2po.envs.cards.formula import FormulaError, complete_formula, evaluate_formula, tokenize
from t2po.envs.cards.game import Card, CardGame, CardGameEnv
from t2po.envs.cards.numberline import NumberLineEnv, NumberLineGame
from t2po.envs.cards.points import EZPointsEnv, FormulaGame, Points24Env

__all__ = [
    "BlackjackEnv",
    "BlackjackGame",
    "Card",
    "CardGame",
    "CardGameEnv",
    "EZPointsEnv",
    "FormulaError",
    "FormulaGame",
    "NumberLineEnv",
    "NumberLineGame",
    "Points24Env",
    "complete_formula",
    "evaluate_formula",
    "tokenize",
]
