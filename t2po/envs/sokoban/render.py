"""RGB image of a Sokoban room, drawn with PIL from flat coloured tiles (no sprite assets).

Tiles: wall brown, floor near-black, target a red diamond on the floor, box a yellow square with an
orange cross, box on target a green square with the cross, player a blue disc (on a target the
red diamond shows around it). The colours are listed in the image prompt so a VLM can read them.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw

from t2po.envs.sokoban.room import BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET, TARGET, WALL, Room

WALL_RGB = (120, 72, 40)
FLOOR_RGB = (24, 24, 24)
TARGET_RGB = (220, 40, 40)
BOX_RGB = (235, 190, 40)
BOX_ON_TARGET_RGB = (60, 190, 80)
BOX_CROSS_RGB = (200, 100, 20)
PLAYER_RGB = (60, 140, 255)

#: how the image prompt describes the tiles
TILE_LEGEND = (
    "Walls are brown, floor is black, targets are red diamonds, boxes are yellow squares (green once on "
    "a target), and you are the blue disc."
)


@lru_cache(maxsize=64)
def _tile(symbol: str, px: int) -> Image.Image:
    tile = Image.new("RGB", (px, px), WALL_RGB if symbol == WALL else FLOOR_RGB)
    if symbol == WALL:
        return tile
    draw = ImageDraw.Draw(tile)
    mid, inset = (px - 1) / 2, max(1, px // 8)
    if symbol in (TARGET, PLAYER_ON_TARGET, BOX_ON_TARGET):
        draw.polygon([(mid, inset), (px - 1 - inset, mid), (mid, px - 1 - inset), (inset, mid)], fill=TARGET_RGB)
    if symbol in (BOX, BOX_ON_TARGET):
        draw.rectangle([inset, inset, px - 1 - inset, px - 1 - inset], fill=BOX_ON_TARGET_RGB
                       if symbol == BOX_ON_TARGET else BOX_RGB)
        width = max(1, px // 10)
        draw.line([(inset, inset), (px - 1 - inset, px - 1 - inset)], fill=BOX_CROSS_RGB, width=width)
        draw.line([(inset, px - 1 - inset), (px - 1 - inset, inset)], fill=BOX_CROSS_RGB, width=width)
    if symbol in (PLAYER, PLAYER_ON_TARGET):
        radius = px / 4 if symbol == PLAYER_ON_TARGET else px / 3
        draw.ellipse([mid - radius, mid - radius, mid + radius, mid + radius], fill=PLAYER_RGB)
    return tile


def render_image(room: Room, tile_px: int = 16) -> Image.Image:
    """The room as an RGB image of `room.height * tile_px` rows by `room.width * tile_px` columns."""
    image = Image.new("RGB", (room.width * tile_px, room.height * tile_px), FLOOR_RGB)
    for r in range(room.height):
        for c in range(room.width):
            image.paste(_tile(room.symbol((r, c)), tile_px), (c * tile_px, r * tile_px))
    return image
