"""The Sokoban environment (verl-agent's `sokoban` task on gym-sokoban rooms), with text and image
observations and an exact solver as expert."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from t2po.envs import register_env
from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction
from t2po.envs.sokoban.generation import generate_room
from t2po.envs.sokoban.render import TILE_LEGEND, render_image
from t2po.envs.sokoban.room import ACTIONS, DELTAS, Pos, Room
from t2po.envs.sokoban.solver import solve
from t2po.errors import InvalidInput

# gym-sokoban's rewards (SokobanEnv.penalty_for_step, reward_box_on_target, penalty_box_off_target,
# reward_finished); an invalid action costs the step penalty, as in verl-agent.
STEP_PENALTY = -0.1
BOX_ON_TARGET_REWARD = 1.0
BOX_OFF_TARGET_PENALTY = -1.0
SOLVED_REWARD = 10.0

#: seed offset of the validation split (the paper's harness validates on seed + 1000)
VALID_SEED_OFFSET = 1000
OBSERVATION_MODES = ("text", "image", "both")
#: `EnvState.observation` in image mode (the prompt adds the `<image>` placeholder itself, once)
IMAGE_OBSERVATION = "The room is shown in the image."

# A compact form of verl-agent's SOKOBAN_TEMPLATE / SOKOBAN_VISUAL_TEMPLATE
# (agent_system/environments/prompts/sokoban.py): same sections and history format, shorter wording.
_INTRO = "You are an expert agent operating in the Sokoban environment.\n\n"
_SYMBOLS = (
    "# Symbols\nWall `#`, floor `_`, target `O`, box `X`, box on target `√`, player `P`, player on target `S`.\n"
)
_IMAGE_LEGEND = f"# Image\n{TILE_LEGEND}\n"
_RULES = (
    "Positions are (row, column), counted from (0,0) at the top left.\n\n"
    "# Rules\nPush every box onto a target to win. You can only push boxes, not pull them, and nothing "
    "moves into a wall. Do not push a box into a corner or against a wall where it gets stuck.\n\n"
)
_INSTRUCTION = (
    f"Your admissible actions are {str(list(ACTIONS)).replace(chr(39), chr(34))}.\n\n"
    "Now it's your turn to make a move (choose ONE action only for the current step).\n"
    "First reason briefly about the positions of the player, boxes and targets within <think> </think> "
    "tags, then give one admissible action within <action> </action> tags."
)


# prompt_style="compact": the same task in few tokens (bare-symbol grid, positions spelled out, one
# instruction line) for small models on CPUs, where prompt length dominates the cost of a run.
_COMPACT_INTRO = (
    "Sokoban: push every box onto a target. Symbols: # wall, _ floor, O target, X box, "
    "√ box on target, P player, S player on target. Positions are (row,column).\n"
)
_COMPACT_INSTRUCTION = "Answer with <think>brief reasoning</think><action>up, down, left or right</action>."


def random_solve_probability(room: Room, steps: int, memo: dict | None = None) -> float:
    """Probability that `steps` uniformly random moves (each of the four, every step counting, as in
    an episode) solve `room`: P(room, k) = 1 if solved, 0 if k = 0, else the mean over the four moves m
    of P(room after m, k - 1). Exact, memoized on (position, steps left)."""
    memo = {} if memo is None else memo
    if room.solved:
        return 1.0
    if steps == 0:
        return 0.0
    key = (room, steps)
    if key not in memo:
        memo[key] = sum(random_solve_probability(room.move(m)[0], steps - 1, memo) for m in ACTIONS) / len(ACTIONS)
    return memo[key]
#: the reference's Sokoban action pool, in the order it is searched ("still" is valid and moves nothing)
REFERENCE_ACTIONS = ("up", "down", "left", "right", "still")


def sokoban_projection(response: str) -> ParsedAction:
    """The reference's Sokoban projection (WillDreamer/T2PO-ICML,
    agent_system/environments/env_package/sokoban/projection.py), which is lenient:

        start_idx = actions[i].find(start_tag)          # "<action>" in the lowercased response
        end_idx = actions[i].find(end_tag)              # "</action>"
        extracted_action = actions[i][start_idx + len(start_tag):end_idx].strip().lower()
        for act in action_pools.keys():                 # up, down, left, right, still
            if act in extracted_action: ... valids[i] = 1; break
        think_start_idx = original_str.find("<think>")  # anywhere, case-sensitive, in any order
        think_end_idx = original_str.find("</think>")
        if think_start_idx == -1 or think_end_idx == -1: valids[i] = 0

    So the direction is a substring of the action span ("move up!" is up), "still" is a valid no-op, the think
    tags may be anywhere (a `</think>` written after the one TTI forced is fine), and no CJK check. A
    direction found with the think tags missing is still played, but the step counts as invalid, as there."""
    text = response if isinstance(response, str) else ""
    lower = text.lower()
    start, end = lower.find("<action>"), lower.find("</action>")
    if start == -1 or end == -1:
        return ParsedAction("still", False, "no <action> or </action> tag")
    extracted = lower[start + len("<action>") : end].strip()  # empty when </action> comes first, as there
    action = next((act for act in REFERENCE_ACTIONS if act in extracted), None)
    if action is None:
        return ParsedAction("still", False, "no action of up/down/left/right/still in the action span")
    if "<think>" not in text or "</think>" not in text:
        return ParsedAction(action, False, "no <think> or </think> tag")
    return ParsedAction(action, True)


@dataclass
class _Episode:
    seed: int  # the room seed (split offset included)
    room: Room
    steps: int = 0
    done: bool = False
    won: bool = False


def _fmt(pos: Pos) -> str:
    return f"({pos[0]},{pos[1]})"


def _listing(noun: str, plural: str, cells: frozenset[Pos]) -> str:
    """`box at (1,2)` / `boxes at (1,2) and (3,3)` (row-major order)."""
    names = [_fmt(cell) for cell in sorted(cells)]
    if len(names) == 1:
        return f"{noun} at {names[0]}"
    return f"{plural} at {', '.join(names[:-1])} and {names[-1]}"


@register_env("sokoban")
class SokobanEnv(BatchEnv):
    """Sokoban rooms generated as in gym-sokoban; push every box onto a target.

    Options (keyword only):
    - `dim_room=(6, 6)`: room height and width, outer wall included (verl-agent: [6, 6]).
    - `num_boxes=1`: boxes (and targets) per room (verl-agent: 1).
    - `num_gen_steps=30`: reverse-play depth of the generator (see `generation.py`); the optimal
      solution has at most this many moves. Small values (2-5) give easy rooms; 30 matches
      verl-agent's `search_depth`, and then some rooms need more than `max_steps` moves, as there.
    - `max_steps=15`: env steps per episode (verl-agent's Sokoban run script sets
      `env.max_steps=15`); every step counts, invalid ones included.
    - `history_length=2`: past (observation, action) pairs in the prompt.
    - `observation_mode="text"`: "text" (the reference's text grid), "image" (an RGB rendering in
      `EnvState.image`; the observation text says the image shows the room and the prompt carries one
      `<image>` placeholder), or "both". The GiGPO anchor observation is always the text grid.
    - `split="train"`: "train" uses room seed = seed, "valid" room seed = seed + 1000 (the offset is
      applied in `reset`, to every seed it receives).
    - `render_tile_px=16`: pixels per tile of the image observation.
    - `prompt_style="reference"`: "reference" (the reference template and tab-separated grid) or
      "compact" (rows of bare symbols plus the positions of player, boxes and targets in words, one
      instruction line: about a third of the tokens, for small models on CPUs). Text mode only.

    Actions are "up", "down", "left", "right" (case-insensitive). Rewards follow gym-sokoban: -0.1
    per step, +1 when a push puts a box on a target, -1 when it takes one off, +10 when every box is
    on a target. An action outside the four is invalid: nothing moves and the step costs -0.1.
    Episodes end when solved (`won`) or after `max_steps` steps; the final state's `metrics` are
    `{"success": 0/1, "num_steps": n, "boxes_on_target": k}`. `expert_response` replays a
    fewest-moves solution (re-solved from the current room, plans cached).
    """

    check_admissible = True
    # rooms are generated by a node-limited search that slows steeply with size and boxes (4 rooms on a
    # 2-core CPU: 10x10 with 4 boxes 3.7 s, 12x12 with 3 boxes 1.3 s, 20x20 with 3 boxes over 40 s)
    option_ranges = {**BatchEnv.option_ranges, "dim_room": (4, 16), "num_boxes": (1, 4), "num_gen_steps": (1, 1000),
                     "render_tile_px": (4, 64)}

    def __init__(
        self,
        *,
        dim_room: tuple[int, int] | list[int] = (6, 6),
        num_boxes: int = 1,
        num_gen_steps: int = 30,
        max_steps: int = 15,
        history_length: int = 2,
        observation_mode: str = "text",
        split: str = "train",
        render_tile_px: int = 16,
        prompt_style: str = "reference",
    ) -> None:
        if not isinstance(dim_room, (tuple, list)) or len(dim_room) != 2 or any(not isinstance(d, int) or d < 4
                                                                                for d in dim_room):
            raise InvalidInput(f"dim_room must be two integers >= 4 (height, width), e.g. (6, 6); got {dim_room!r}.")
        minimums = {"num_boxes": 1, "num_gen_steps": 1, "max_steps": 1, "history_length": 0, "render_tile_px": 4}
        values = {"num_boxes": num_boxes, "num_gen_steps": num_gen_steps, "max_steps": max_steps,
                  "history_length": history_length, "render_tile_px": render_tile_px}
        for name, low in minimums.items():
            value = values[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInput(f"{name} must be an integer >= {low}; got {value!r}.")
        inside = (dim_room[0] - 2) * (dim_room[1] - 2)  # cells within the wall ring
        if num_boxes + 1 > inside:
            raise InvalidInput(f"num_boxes={num_boxes} boxes and the player do not fit in a "
                               f"{dim_room[0]}x{dim_room[1]} room "
                             f"({inside} cells inside its walls); use fewer boxes or a larger dim_room.")
        if observation_mode not in OBSERVATION_MODES:
            raise InvalidInput(f"observation_mode must be one of {OBSERVATION_MODES}; got {observation_mode!r}.")
        if prompt_style not in ("reference", "compact"):
            raise InvalidInput(f"prompt_style must be 'reference' or 'compact'; got {prompt_style!r}.")
        if prompt_style == "compact" and observation_mode != "text":
            raise InvalidInput("prompt_style='compact' is a text-mode prompt; use observation_mode='text'.")
        if split not in ("train", "valid"):
            raise InvalidInput(f"split must be 'train' or 'valid'; got {split!r}.")
        self.dim_room = (int(dim_room[0]), int(dim_room[1]))
        self.num_boxes = num_boxes
        self.num_gen_steps = num_gen_steps
        self.max_steps = max_steps
        self.history_length = history_length
        self.observation_mode = observation_mode
        self.split = split
        self.render_tile_px = render_tile_px
        self.prompt_style = prompt_style
        self._episodes: list[_Episode] = []
        # room -> remaining fewest-moves plan (None: unsolvable); filled along every plan found
        self._plans: dict[Room, list[str] | None] = {}

    # ---- episodes -------------------------------------------------------------------------------

    def reset(self, seeds: list[int]) -> list[EnvState]:
        for seed in seeds:
            if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
                raise ValueError(f"Sokoban seeds must be integers; got {seed!r}.")
        seeds = [int(seed) for seed in seeds]
        offset = VALID_SEED_OFFSET if self.split == "valid" else 0
        rooms: dict[int, Room] = {}
        for seed in seeds:
            if seed + offset not in rooms:
                rooms[seed + offset] = generate_room(seed + offset, self.dim_room, self.num_boxes, self.num_gen_steps)
        self._episodes = [_Episode(seed + offset, rooms[seed + offset]) for seed in seeds]
        self._plans.clear()
        return [self._state(ep, reward=0.0, effective=False) for ep in self._episodes]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        if len(actions) != len(self._episodes):
            raise ValueError(f"step() got {len(actions)} actions for {len(self._episodes)} instances; pass one per "
                             "instance (None for done ones).")
        results: list[EnvState | None] = []
        for i, (ep, action) in enumerate(zip(self._episodes, actions)):
            if action is None:
                results.append(None)
                continue
            if ep.done:
                raise ValueError(f"Instance {i} is done (won={ep.won}, steps={ep.steps}); pass None for it.")
            results.append(self._apply(ep, action))
        return results

    def _apply(self, ep: _Episode, action: str) -> EnvState:
        move = action.strip().lower() if isinstance(action, str) else ""
        before = ep.room
        moved = False
        if move in DELTAS:
            ep.room, moved = before.move(move)
        ep.steps += 1
        reward = STEP_PENALTY
        if ep.room.boxes_on_target > before.boxes_on_target:
            reward += BOX_ON_TARGET_REWARD
        elif ep.room.boxes_on_target < before.boxes_on_target:
            reward += BOX_OFF_TARGET_PENALTY
        if ep.room.solved:
            reward += SOLVED_REWARD
            ep.won = True
        ep.done = ep.won or ep.steps >= self.max_steps
        return self._state(ep, reward=reward, effective=moved, valid=move in DELTAS)

    def _state(self, ep: _Episode, reward: float, effective: bool, valid: bool = True) -> EnvState:
        if self.prompt_style == "compact":
            room = ep.room
            grid = "\n".join("".join(room.symbol((r, c)) for c in range(room.width)) for r in range(room.height))
            grid += (f"\nPlayer at {_fmt(room.player)}; {_listing('box', 'boxes', room.boxes)}; "
                     f"{_listing('target', 'targets', room.targets)}.")
        else:
            grid = ep.room.to_text()
        image = render_image(ep.room, self.render_tile_px) if self.observation_mode != "text" else None
        metrics: dict[str, Any] = {}
        if ep.done:
            metrics = {"success": int(ep.won), "num_steps": ep.steps, "boxes_on_target": ep.room.boxes_on_target}
        return EnvState(
            observation=IMAGE_OBSERVATION if self.observation_mode == "image" else grid,
            reward=reward,
            done=ep.done,
            won=ep.won,
            anchor_obs=grid,
            admissible_actions=list(ACTIONS),
            image=image,
            metrics=metrics,
            info={
                "action_is_effective": effective,
                "action_is_admissible": valid,
                "boxes_on_target": ep.room.boxes_on_target,
                "room_seed": ep.seed,
            },
        )

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        """`sokoban_projection` with `response_format` "reference" (the default), else the generic check."""
        if self.response_format == "reference":
            return sokoban_projection(response)
        return super().parse_action(response, state)

    # ---- prompt ---------------------------------------------------------------------------------

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        """The compact SOKOBAN template: legend, rules, the last `history_length` (observation, action)
        pairs in the reference's `[Observation k: '...', Action k: '...']` form (image mode: actions
        only, as past images are not in the prompt), the current observation and the answer format."""
        mode = self.observation_mode
        if self.prompt_style == "compact":
            recent = history[-self.history_length :] if self.history_length > 0 else []
            past = "".join(f"Earlier: {obs}\nYou moved {act}.\n" for obs, act in recent)
            return f"{_COMPACT_INTRO}{past}Now (step {len(history) + 1}):\n{state.observation}\n{_COMPACT_INSTRUCTION}"
        legend = {"text": _SYMBOLS, "image": _IMAGE_LEGEND, "both": _SYMBOLS + _IMAGE_LEGEND}[mode]
        if mode == "text":
            current = f"\n{state.observation}\n"
        else:
            current = " shown in the image: <image>\n"
            if mode == "both":
                current += f"As text:\n{state.observation}\n"
        n = len(history)
        recent = history[-self.history_length :] if self.history_length > 0 else []
        if recent:
            start = n - len(recent) + 1
            if mode == "image":
                lines = [f"[Action {start + k}: '{act}']" for k, (_, act) in enumerate(recent)]
                shown = f"the most recent {len(recent)} actions you took"
            else:
                lines = [f"[Observation {start + k}: '{obs}', Action {start + k}: '{act}']"
                         for k, (obs, act) in enumerate(recent)]
                shown = f"the most recent {len(recent)} observations and the corresponding actions you took"
            step = (
                f"Prior to this step, you have already taken {n} step(s). Below are {shown}:\n"
                + "\n".join(lines)
                + f"\nYou are now at step {n + 1} and your current observation is{':' if mode == 'text' else ''}"
            )
        else:
            step = f"Your current observation is{':' if mode == 'text' else ''}"
        return _INTRO + legend + _RULES + "# Current Step\n" + step + current + _INSTRUCTION

    # ---- reference points -----------------------------------------------------------------------

    def random_success(self, seeds: list[int]) -> list[float]:
        """Exact chance of a uniformly random mover solving each room within `max_steps`
        (`random_solve_probability`)."""
        offset = VALID_SEED_OFFSET if self.split == "valid" else 0
        memo: dict[tuple[Room, int], float] = {}
        return [random_solve_probability(generate_room(int(s) + offset, self.dim_room, self.num_boxes,
                                                       self.num_gen_steps), self.max_steps, memo)
                for s in seeds]

    # ---- expert ---------------------------------------------------------------------------------

    def plan(self, room: Room) -> list[str] | None:
        """Fewest-moves plan from `room` (cached; every suffix of a found plan is cached too, being
        itself optimal). None when the room cannot be solved."""
        if room not in self._plans:
            plan = solve(room)
            self._plans[room] = plan
            current = room
            for k, move in enumerate(plan or []):
                self._plans[current] = plan[k:]
                current, _ = current.move(move)
        return self._plans[room]

    def expert_response(self, index: int, state: EnvState) -> str | None:
        """`<think>positions; next push</think><action>move</action>` for the next move of a
        fewest-moves solution; None once the episode is done or when the room became unsolvable."""
        ep = self._episodes[index]
        if ep.done:
            return None
        plan = self.plan(ep.room)
        if not plan:
            return None
        room = ep.room
        for move in plan:  # walk the plan up to its next push
            dr, dc = DELTAS[move]
            box = (room.player[0] + dr, room.player[1] + dc)
            if box in room.boxes:
                stand, push = room.player, move
                break
            room, _ = room.move(move)
        current = ep.room
        positions = "" if self.prompt_style == "compact" else (  # the compact observation already lists them
            f"Player at {_fmt(current.player)}; {_listing('box', 'boxes', current.boxes)}; "
            f"{_listing('target', 'targets', current.targets)}. "
        )
        think = f"{positions}Next push: box at {_fmt(box)} {push}, from {_fmt(stand)}. Go {plan[0]}."
        return f"<think>{think}</think><action>{plan[0]}</action>"
