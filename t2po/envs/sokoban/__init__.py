"""Sokoban: procedurally generated rooms (gym-sokoban), text and image observations, exact solver.

    room.py        Room (position, moves, the reference's text grid)
    generation.py  generate_room (random-walk topology + reverse play), deterministic by seed
    solver.py      solve (A* over pushes, fewest moves)
    render.py      render_image (PIL tiles)
    env.py         SokobanEnv, registered as "sokoban"
"""

from t2po.envs.sokoban.env import SokobanEnv
from t2po.envs.sokoban.generation import RoomGenerationError, generate_room
from t2po.envs.sokoban.render import render_image
from t2po.envs.sokoban.room import ACTIONS, Room
from t2po.envs.sokoban.solver import solve

__all__ = ["SokobanEnv", "Room", "ACTIONS", "generate_room", "RoomGenerationError", "solve", "render_image"]
