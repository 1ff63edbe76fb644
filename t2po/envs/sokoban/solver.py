"""Exact Sokoban solver: A* over push states, with the player's walks between pushes found by BFS.

A search node is (player cell, box cells) right after a push. From a node, one BFS over the floor
not covered by boxes gives the player's distance to every cell; each push of a box b in direction d
(player standing at b - d, cell b + d free) is an edge of cost (walk + 1 moves, 1 push). Costs are
compared lexicographically: the plan has the fewest moves (env steps), ties broken by fewer pushes.
The heuristic (sum over boxes of the Manhattan distance to the nearest target) lower-bounds both
the moves and the pushes still needed and is consistent, so the first goal popped is optimal.

Boxes are never pushed onto dead cells (cells from which no sequence of pushes reaches a target,
found by "pulling" boxes backwards from every target), which prunes without losing optimality.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from t2po.envs.sokoban.room import ACTIONS, DELTAS, Pos, Room

#: A* expansions after which `solve` gives up (returns None); a 6x6 room needs at most a few hundred
DEFAULT_NODE_LIMIT = 100_000


def _live_cells(room: Room) -> set[Pos]:
    """Cells from which a box can still be pushed onto some target (all others are dead)."""
    live = set(room.targets)
    frontier = deque(room.targets)
    while frontier:
        r, c = frontier.popleft()
        for dr, dc in DELTAS.values():
            # a box at `prev` reaches (r, c) by a push in direction (-dr, -dc) when the player can
            # stand at `stand`, on the far side of `prev`
            prev, stand = (r + dr, c + dc), (r + 2 * dr, c + 2 * dc)
            if prev not in live and room.is_floor(prev) and room.is_floor(stand):
                live.add(prev)
                frontier.append(prev)
    return live


Walk = dict[Pos, tuple[Pos | None, str | None, int]]


def _walk(room: Room, start: Pos, boxes: frozenset[Pos]) -> Walk:
    """BFS of the player from `start` around `boxes`: reachable cell -> (previous cell, move, distance)."""
    parents: Walk = {start: (None, None, 0)}
    frontier = deque([start])
    while frontier:
        r, c = frontier.popleft()
        dist = parents[(r, c)][2] + 1
        for action in ACTIONS:
            dr, dc = DELTAS[action]
            nxt = (r + dr, c + dc)
            if nxt not in parents and room.is_floor(nxt) and nxt not in boxes:
                parents[nxt] = ((r, c), action, dist)
                frontier.append(nxt)
    return parents


def _path_to(parents: Walk, goal: Pos) -> list[str]:
    moves = []
    cell: Pos | None = goal
    while cell is not None:
        prev, action, _ = parents[cell]
        if action is not None:
            moves.append(action)
        cell = prev
    return moves[::-1]


def solve(room: Room, node_limit: int = DEFAULT_NODE_LIMIT) -> list[str] | None:
    """Fewest-moves solution of `room` as a list of moves (`"up"`, ...), `[]` when already solved.

    Returns None when the room has no solution or the search expanded more than `node_limit` nodes."""
    if room.solved:
        return []
    if len(room.targets) < len(room.boxes):
        return None
    live = _live_cells(room)
    if not room.boxes <= live:
        return None

    def heuristic(boxes: frozenset[Pos]) -> int:
        return sum(min(abs(br - tr) + abs(bc - tc) for tr, tc in room.targets) for br, bc in boxes)

    start = (room.player, room.boxes)
    best: dict[tuple[Pos, frozenset[Pos]], tuple[int, int]] = {start: (0, 0)}
    # node -> (parent node, cell the player walked to, push direction)
    parent: dict[tuple[Pos, frozenset[Pos]], tuple[tuple[Pos, frozenset[Pos]], Pos, str]] = {}
    tie = itertools.count()
    h0 = heuristic(room.boxes)
    queue = [(h0, h0, next(tie), start)]
    closed: set[tuple[Pos, frozenset[Pos]]] = set()
    while queue:
        _, _, _, node = heapq.heappop(queue)
        if node in closed:
            continue
        closed.add(node)
        player, boxes = node
        if boxes <= room.targets:
            return _reconstruct(room, parent, node)
        if len(closed) > node_limit:
            return None
        moves, pushes = best[node]
        reach = _walk(room, player, boxes)
        for br, bc in boxes:
            for action in ACTIONS:
                dr, dc = DELTAS[action]
                stand, dest = (br - dr, bc - dc), (br + dr, bc + dc)
                if stand not in reach or dest not in live or dest in boxes:
                    continue
                child = ((br, bc), (boxes - {(br, bc)}) | {dest})
                cost = (moves + reach[stand][2] + 1, pushes + 1)
                if child in closed or cost >= best.get(child, (1 << 30, 0)):
                    continue
                best[child] = cost
                parent[child] = (node, stand, action)
                h = heuristic(child[1])
                heapq.heappush(queue, (cost[0] + h, cost[1] + h, next(tie), child))
    return None


def _reconstruct(room: Room, parent: dict, node: tuple[Pos, frozenset[Pos]]) -> list[str]:
    segments = []
    while node in parent:
        prev, stand, action = parent[node]
        segments.append(_path_to(_walk(room, prev[0], prev[1]), stand) + [action])
        node = prev
    return [move for segment in reversed(segments) for move in segment]
