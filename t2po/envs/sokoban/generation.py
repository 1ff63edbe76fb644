"""Procedural Sokoban rooms, after gym-sokoban's `room_utils.generate_room`.

1. Topology: a random walk of `int(1.7 * (height + width))` steps (gym-sokoban's default walk length)
   stamps small floor masks into a solid block; the outer ring stays wall.
2. The player and `num_boxes` targets go on random floor cells; the boxes start on their targets.
3. Reverse play: from that solved room the player walks and *pulls* boxes (the inverse of pushing)
   for at most `num_gen_steps` moves. Every reachable position is enumerated breadth-first; among
   those with no box on any target, one of the positions with the largest box displacement (sum of
   Manhattan distances from each box to the target it started on) is picked at random.

Playing the reverse moves backwards solves the room, so its optimal solution has at most
`num_gen_steps` moves: small values (2-5) give easy rooms. This differs from gym-sokoban in two
places, for determinism and exactness: gym-sokoban's reverse play is a depth-first search whose
visited set can hide shallower positions (we enumerate all of them), and it scores by box swaps x
displacement (for one box the same ranking). gym-sokoban calls the walk length `num_gen_steps` and
the reverse-play depth `search_depth` (verl-agent: 30); here `num_gen_steps` is the reverse-play
depth, as that is the knob that sets difficulty.

A try can fail (too few floor cells, no position with every box off target within the depth); the
next try uses a seed derived from the room seed and the try number, and after `MAX_TRIES` failures
`generate_room` raises an error naming the options to change. All randomness comes from a private
`random.Random`, so a seed gives the same room in every process.
"""

from __future__ import annotations

import random
from collections import deque

from t2po.envs.sokoban.room import DELTAS, Room
from t2po.envs.sokoban.solver import solve

#: generation tries per seed before giving up
MAX_TRIES = 100
#: reverse-play positions enumerated per try at most (gym-sokoban stops its search at 300k as well)
MAX_REVERSE_STATES = 300_000
#: probability that the topology walk changes direction at a step (gym-sokoban's default)
P_CHANGE_DIRECTION = 0.35

# Floor stamps of the topology walk, centred on the walker (gym-sokoban's masks).
_MASKS = (
    ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
    ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
    ((0, 0, 0), (1, 1, 0), (0, 1, 0)),
    ((0, 0, 0), (1, 1, 0), (1, 1, 0)),
    ((0, 0, 0), (0, 1, 1), (0, 1, 0)),
)


class RoomGenerationError(RuntimeError):
    """No valid room could be generated for a seed within `MAX_TRIES` tries."""


class _TryFailed(Exception):
    """One generation try produced no usable room (the caller retries with a derived seed)."""


def _topology(rng: random.Random, height: int, width: int) -> list[list[bool]]:
    """Floor map (True = floor) carved by a random walk; the outer ring is wall."""
    floor = [[False] * width for _ in range(height)]
    directions = [(1, 0), (0, 1), (-1, 0), (0, -1)]
    direction = rng.choice(directions)
    r, c = rng.randint(1, height - 1), rng.randint(1, width - 1)
    for _ in range(int(1.7 * (height + width))):
        if rng.random() < P_CHANGE_DIRECTION:
            direction = rng.choice(directions)
        # the walker stays off the outer ring so that its 3x3 stamp fits in the grid
        r = min(max(r + direction[0], 1), height - 2)
        c = min(max(c + direction[1], 1), width - 2)
        for i, mask_row in enumerate(rng.choice(_MASKS)):
            for j, on in enumerate(mask_row):
                if on:
                    floor[r - 1 + i][c - 1 + j] = True
    for r in range(height):
        floor[r][0] = floor[r][width - 1] = False
    for c in range(width):
        floor[0][c] = floor[height - 1][c] = False
    return floor


def _reverse_play(room: Room, depth: int, rng: random.Random) -> Room:
    """A position at most `depth` reverse moves from the solved `room` with no box on a target and
    the largest box displacement (ties broken by `rng`)."""
    targets = sorted(room.targets)  # box i started on targets[i]
    start = (room.player, tuple(targets))
    seen = {start}
    frontier = deque([(start, 0)])
    best_score, best = 0, []
    while frontier and len(seen) < MAX_REVERSE_STATES:
        (player, boxes), dist = frontier.popleft()
        if not room.targets.intersection(boxes):
            score = sum(abs(b[0] - t[0]) + abs(b[1] - t[1]) for b, t in zip(boxes, targets))
            if score > best_score:
                best_score, best = score, []
            if score == best_score:
                best.append((player, boxes))
        if dist == depth:
            continue
        for dr, dc in DELTAS.values():
            nxt = (player[0] + dr, player[1] + dc)
            if not room.is_floor(nxt) or nxt in boxes:
                continue
            successors = [(nxt, boxes)]
            behind = (player[0] - dr, player[1] - dc)
            if behind in boxes:  # the player may also pull the box behind it into its old cell
                successors.append((nxt, tuple(player if b == behind else b for b in boxes)))
            for state in successors:
                if state not in seen:
                    seen.add(state)
                    frontier.append((state, dist + 1))
    if not best:
        raise _TryFailed(f"no position with every box off target within {depth} reverse moves")
    player, boxes = rng.choice(best)
    return Room(room.height, room.width, room.walls, room.targets, frozenset(boxes), player)


def _generate_once(rng: random.Random, dim_room: tuple[int, int], num_boxes: int, num_gen_steps: int) -> Room:
    height, width = dim_room
    floor = _topology(rng, height, width)
    cells = [(r, c) for r in range(height) for c in range(width) if floor[r][c]]
    if len(cells) <= num_boxes + 1:
        raise _TryFailed(f"only {len(cells)} floor cells for {num_boxes} box(es) and the player")
    player = rng.choice(cells)
    targets = rng.sample([cell for cell in cells if cell != player], num_boxes)
    walls = frozenset((r, c) for r in range(height) for c in range(width) if not floor[r][c])
    solved = Room(height, width, walls, frozenset(targets), frozenset(targets), player)
    return _reverse_play(solved, num_gen_steps, rng)


def generate_room(seed: int, dim_room: tuple[int, int] = (6, 6), num_boxes: int = 1, num_gen_steps: int = 30) -> Room:
    """The room for `seed` (deterministic): unsolved, and solvable in at most `num_gen_steps` moves.

    Raises RoomGenerationError when `MAX_TRIES` tries all fail."""
    reasons = []
    for attempt in range(MAX_TRIES):
        # str seeds are hashed with SHA-512 by `random`, the same in every process
        rng = random.Random(f"sokoban/{seed}/{attempt}")
        try:
            room = _generate_once(rng, dim_room, num_boxes, num_gen_steps)
        except _TryFailed as exc:
            reasons.append(str(exc))
            continue
        # By construction the room is unsolved and solvable; the solver double-checks it.
        plan = solve(room)
        if plan:
            return room
        reasons.append("the solver found no solution")
    raise RoomGenerationError(
        f"Could not generate a Sokoban room for seed {seed} (dim_room={dim_room}, num_boxes={num_boxes}, "
        f"num_gen_steps={num_gen_steps}) in {MAX_TRIES} tries; last failure: {reasons[-1]}. "
        "Use a larger dim_room or num_gen_steps, or fewer boxes."
    )
