"""A Sokoban position (walls, targets, boxes, player), its moves, and its text grid.

The text grid follows verl-agent's `tiny_rgb_array` rendering of gym-sokoban: every cell is written
as ` c \\t` (space, symbol, space, tab) and rows are joined by newlines, with the symbols

    #  wall           _  floor           O  target
    X  box            √  box on target
    P  player         S  player on target

Positions are `(row, column)` counted from 0 at the top-left corner (the outer wall included).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Pos = tuple[int, int]

#: the four moves, in the order the reference's action ids 1-4 use
ACTIONS: tuple[str, ...] = ("up", "down", "left", "right")
DELTAS: dict[str, Pos] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "√", "P", "S"


@dataclass(frozen=True)
class Room:
    """One Sokoban position. Immutable and hashable (the solver and the expert's plan cache key on it).

    Cells outside the `height x width` grid count as walls. The room is solved when every box is on
    a target (rooms have as many targets as boxes)."""

    height: int
    width: int
    walls: frozenset[Pos]
    targets: frozenset[Pos]
    boxes: frozenset[Pos]
    player: Pos

    def is_floor(self, pos: Pos) -> bool:
        """Inside the grid and not a wall (boxes and the player stand on floor)."""
        r, c = pos
        return 0 <= r < self.height and 0 <= c < self.width and pos not in self.walls

    @property
    def boxes_on_target(self) -> int:
        return len(self.boxes & self.targets)

    @property
    def solved(self) -> bool:
        return self.boxes <= self.targets

    def move(self, action: str) -> tuple["Room", bool]:
        """Apply one move (`action` in `ACTIONS`). Returns the new room and whether the player moved.

        Walking into a wall, or pushing a box into a wall or another box, leaves the room unchanged."""
        dr, dc = DELTAS[action]
        r, c = self.player
        nxt = (r + dr, c + dc)
        if not self.is_floor(nxt):
            return self, False
        if nxt in self.boxes:
            beyond = (r + 2 * dr, c + 2 * dc)
            if not self.is_floor(beyond) or beyond in self.boxes:
                return self, False
            return replace(self, boxes=(self.boxes - {nxt}) | {beyond}, player=nxt), True
        return replace(self, player=nxt), True

    def symbol(self, pos: Pos) -> str:
        if pos in self.walls:
            return WALL
        on_target = pos in self.targets
        if pos == self.player:
            return PLAYER_ON_TARGET if on_target else PLAYER
        if pos in self.boxes:
            return BOX_ON_TARGET if on_target else BOX
        return TARGET if on_target else FLOOR

    def to_text(self) -> str:
        """The reference's text grid (see the module docstring)."""
        return "\n".join(
            "".join(f" {self.symbol((r, c))} \t" for c in range(self.width)) for r in range(self.height)
        )

    @classmethod
    def from_text(cls, text: str) -> "Room":
        """Parse a text grid: the reference's tab-separated form, or rows of bare symbols (`#_OP#`).

        Raises ValueError naming the problem for ragged rows, unknown symbols, or not exactly one player."""
        rows = []
        for line in text.strip("\n").split("\n"):
            cells = [cell.strip() for cell in line.split("\t")] if "\t" in line else list(line.strip())
            rows.append([cell for cell in cells if cell])
        width = len(rows[0]) if rows else 0
        if not rows or width == 0 or any(len(row) != width for row in rows):
            raise ValueError(f"Sokoban grid must be a non-empty rectangle; got row lengths {[len(r) for r in rows]}.")
        walls, targets, boxes, players = set(), set(), set(), []
        for r, row in enumerate(rows):
            for c, sym in enumerate(row):
                pos = (r, c)
                if sym == WALL:
                    walls.add(pos)
                elif sym in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                    targets.add(pos)
                elif sym not in (FLOOR, BOX, PLAYER):
                    raise ValueError(f"Unknown Sokoban symbol {sym!r} at {pos}; use one of # _ O X √ P S.")
                if sym in (BOX, BOX_ON_TARGET):
                    boxes.add(pos)
                if sym in (PLAYER, PLAYER_ON_TARGET):
                    players.append(pos)
        if len(players) != 1:
            raise ValueError(f"A Sokoban grid needs exactly one player (P or S); found {len(players)}.")
        return cls(len(rows), width, frozenset(walls), frozenset(targets), frozenset(boxes), players[0])
