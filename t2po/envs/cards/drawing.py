"""Pictures of the gym-cards games, drawn with PIL (no image files, no system fonts).

Everything is drawn from shapes and Pillow's built-in scalable font, so a picture depends only on
the game state and the Pillow version: equal states give byte-identical images. The layout follows
gym-cards: a 300x300 green table with the cards and the formula, a white panel for the number line.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from t2po.envs.cards.game import Card

#: side of every picture, in pixels (gym-cards' 300x300 observations)
CANVAS_SIZE = 300
TABLE_GREEN = "#35654d"
_RED = "#c8102e"
_BLACK = "#111111"


@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (scalable when Pillow has FreeType)."""
    return ImageFont.load_default(size=size)


def new_canvas(color: str = TABLE_GREEN) -> Image.Image:
    return Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), color)


def _suit_shape(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, size: float) -> None:
    """A suit symbol of height ~`size` centred on (cx, cy), drawn from circles and polygons."""
    color = _RED if suit in ("hearts", "diamonds") else _BLACK
    h = size / 2
    if suit == "diamonds":
        draw.polygon([(cx, cy - h), (cx + 0.7 * h, cy), (cx, cy + h), (cx - 0.7 * h, cy)], fill=color)
    elif suit == "hearts":
        r = 0.5 * h
        draw.ellipse([cx - 2 * r, cy - h, cx, cy - h + 2 * r], fill=color)
        draw.ellipse([cx, cy - h, cx + 2 * r, cy - h + 2 * r], fill=color)
        draw.polygon([(cx - 2 * r + 0.5, cy - h + 1.2 * r), (cx + 2 * r - 0.5, cy - h + 1.2 * r),
                      (cx, cy + h)], fill=color)
    elif suit == "spades":
        r = 0.45 * h
        draw.polygon([(cx, cy - h), (cx + 2 * r, cy + 0.25 * h), (cx - 2 * r, cy + 0.25 * h)], fill=color)
        draw.ellipse([cx - 2 * r, cy - 0.2 * h, cx, cy - 0.2 * h + 2 * r], fill=color)
        draw.ellipse([cx, cy - 0.2 * h, cx + 2 * r, cy - 0.2 * h + 2 * r], fill=color)
        draw.polygon([(cx, cy + 0.2 * h), (cx + 0.4 * h, cy + h), (cx - 0.4 * h, cy + h)], fill=color)
    elif suit == "clubs":
        r = 0.38 * h
        draw.ellipse([cx - r, cy - h, cx + r, cy - h + 2 * r], fill=color)
        draw.ellipse([cx - 2.1 * r, cy - 0.45 * h, cx - 0.1 * r, cy - 0.45 * h + 2 * r], fill=color)
        draw.ellipse([cx + 0.1 * r, cy - 0.45 * h, cx + 2.1 * r, cy - 0.45 * h + 2 * r], fill=color)
        draw.polygon([(cx, cy - 0.2 * h), (cx + 0.4 * h, cy + h), (cx - 0.4 * h, cy + h)], fill=color)
    else:
        raise ValueError(f"unknown suit {suit!r}; expected hearts, diamonds, clubs or spades")


def draw_card(canvas: Image.Image, card: "Card", box: tuple[int, int, int, int]) -> None:
    """A face-up card in `box` (x0, y0, x1, y1): rank in two corners, a large suit in the middle."""
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rounded_rectangle(box, radius=max(3, w // 10), fill="white", outline=_BLACK, width=2)
    color = _RED if card.suit in ("hearts", "diamonds") else _BLACK
    corner = font(max(10, int(h * 0.22)))
    draw.text((x0 + w * 0.08, y0 + h * 0.04), card.label, fill=color, font=corner)
    draw.text((x1 - w * 0.08, y1 - h * 0.04), card.label, fill=color, font=corner, anchor="rd")
    _suit_shape(draw, card.suit, x0 + w / 2, y0 + h * 0.55, min(w, h) * 0.5)


def draw_card_back(canvas: Image.Image, box: tuple[int, int, int, int]) -> None:
    """A face-down card: blue back with a white frame and a grid of small diamonds."""
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w = x1 - x0
    draw.rounded_rectangle(box, radius=max(3, w // 10), fill="#1f3f8f", outline=_BLACK, width=2)
    inset = max(4, w // 10)
    draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), outline="white", width=1)
    step = max(6, w // 6)
    r = step / 3
    y = y0 + inset + step / 2
    while y + r <= y1 - inset:
        x = x0 + inset + step / 2
        while x + r <= x1 - inset:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill="#6f8fdf")
            x += step
        y += step


def wrap_text(text: str, width: int, size: int) -> list[str]:
    """Break `text` at spaces into lines no wider than `width` pixels at font `size`."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and font(size).getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def formula_picture(cards: list["Card"], formula_text: str) -> Image.Image:
    """The points games: the cards in a row on the table, the formula written below them."""
    canvas = new_canvas()
    gap = 8
    card_w = min(90, (CANVAS_SIZE - gap * (len(cards) + 1)) // len(cards))
    card_h = card_w * 7 // 5  # playing-card proportions
    row_w = len(cards) * card_w + (len(cards) - 1) * gap
    x = (CANVAS_SIZE - row_w) // 2
    y = 30
    for card in cards:
        draw_card(canvas, card, (x, y, x + card_w, y + card_h))
        x += card_w + gap
    draw = ImageDraw.Draw(canvas)
    size = 18
    text_y = y + card_h + 25
    draw.text((10, text_y), "Formula:", fill="white", font=font(size))
    for line in wrap_text(formula_text, CANVAS_SIZE - 20, size):
        text_y += size + 6
        draw.text((10, text_y), line, fill="white", font=font(size))
    return canvas


def number_line_picture(position: int, target: int, max_position: int) -> Image.Image:
    """The number line: the target and current numbers written out (as gym-cards), and a line with
    ticks 0..max_position, a green ring on the target and a red triangle on the current number."""
    canvas = new_canvas("white")
    draw = ImageDraw.Draw(canvas)
    draw.text((30, 40), f"Target: {target}", fill="black", font=font(34))
    draw.text((30, 100), f"Current: {position}", fill="black", font=font(34))
    left, right, line_y = 25, CANVAS_SIZE - 25, 225
    draw.line([(left, line_y), (right, line_y)], fill="black", width=3)
    spacing = (right - left) / max_position
    label_size = max(9, min(16, int(spacing * 0.6)))
    # on a long line label every k-th tick only, so that the numbers do not overlap
    label_width = 0.6 * label_size * len(str(max_position)) + 4
    every = max(1, math.ceil(label_width / spacing))
    for n in range(max_position + 1):
        x = left + n * spacing
        draw.line([(x, line_y - 7), (x, line_y + 7)], fill="black", width=2)
        if n % every == 0:
            draw.text((x, line_y + 12), str(n), fill="black", font=font(label_size), anchor="mt")
    tx = left + target * spacing
    draw.ellipse([tx - 11, line_y - 11, tx + 11, line_y + 11], outline="#1a9641", width=4)
    cx = left + position * spacing
    draw.polygon([(cx, line_y - 14), (cx - 9, line_y - 32), (cx + 9, line_y - 32)], fill=_RED)
    return canvas


def blackjack_picture(dealer: list["Card"], player: list["Card"], reveal_dealer: bool) -> Image.Image:
    """Blackjack table: the dealer's up card and a face-down card on top (the whole dealer hand once
    `reveal_dealer`), the player's cards below, five to a row (ten at most: with an infinite deck a
    longer hand that has not bust is possible but vanishingly rare)."""
    canvas = new_canvas()
    draw = ImageDraw.Draw(canvas)
    card_w, card_h, gap = 52, 73, 4
    draw.text((5, 5), "Dealer", fill="white", font=font(16))
    dealer_shown = dealer if reveal_dealer else dealer[:1]
    x = 5
    for card in dealer_shown[:5]:
        draw_card(canvas, card, (x, 26, x + card_w, 26 + card_h))
        x += card_w + gap
    if not reveal_dealer:
        draw_card_back(canvas, (x, 26, x + card_w, 26 + card_h))
    draw.text((5, 120), "Player", fill="white", font=font(16))
    for i, card in enumerate(player[:10]):
        row, col = divmod(i, 5)
        x, y = 5 + col * (card_w + gap), 141 + row * (card_h + gap)
        draw_card(canvas, card, (x, y, x + card_w, y + card_h))
    return canvas
