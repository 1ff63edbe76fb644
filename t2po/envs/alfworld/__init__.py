"""ALFWorld environment (registered as "alfworld"): the official text games, played with the real
TextWorld/PDDL engine in worker processes. See `env.py` for the environment, `games.py` for the game
files and splits, `pool.py` and `worker.py` for the worker processes."""

from t2po.envs.alfworld.env import AlfWorldEnv, aggregate_alfworld_metrics
from t2po.envs.alfworld.games import TASK_TYPES, Game

__all__ = ["AlfWorldEnv", "aggregate_alfworld_metrics", "TASK_TYPES", "Game"]
