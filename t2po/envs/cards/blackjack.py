"""Blackjack: 'hit' or 'stand' against a dealer who draws to 17.

Rules as in gym-cards (RL4VLM's `blackjack.py`, itself gymnasium's Blackjack-v1, Sutton & Barto
example 5.1): an infinite deck; the dealer and the player get two cards each; the player sees one
dealer card. 'hit' draws a card: over 21 is a bust, reward -1, game over. 'stand' ends the player's
turn: the dealer draws until the hand is 17 or more (a soft 17 stands), then reward +1 / 0 / -1 for a
higher / equal / lower total (a dealer bust loses). An ace counts 11 unless that busts the hand. With
`natural=True` a winning two-card 21 pays 1.5 (gym-cards' `natural`, off by default as there).
Deliberate difference: ranks are drawn uniformly from A-K, so a ten is drawn as "10" as well as J, Q,
K (gym-cards drew only J, Q, K for the value 10; the values have the same distribution).
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from t2po.envs import register_env
from t2po.envs.cards.drawing import blackjack_picture
from t2po.envs.cards.game import Card, CardGame, CardGameEnv, Move, random_card
from t2po.errors import InvalidInput


def hand_total(cards: list[Card]) -> tuple[int, bool]:
    """(best total, soft): an ace counts 11 when that does not bust the hand (then the hand is soft)."""
    total = sum(card.value for card in cards)
    if any(card.rank == 1 for card in cards) and total + 10 <= 21:
        return total + 10, True
    return total, False


def is_natural(cards: list[Card]) -> bool:
    """A two-card 21 (ace and a ten-valued card)."""
    return len(cards) == 2 and hand_total(cards)[0] == 21


def basic_strategy(player_total: int, soft: bool, dealer_up: Card) -> str:
    """Hit/stand basic strategy for an infinite deck where the dealer stands on soft 17
    (no doubling or splitting): hard 17+ stands, hard 13-16 stands against 2-6, hard 12 stands
    against 4-6, hard 11 or less hits; soft 19+ stands, soft 18 stands against 2-8, soft 17 or less hits."""
    up = 11 if dealer_up.rank == 1 else dealer_up.value
    if soft:
        if player_total >= 19:
            return "stand"
        return "stand" if player_total == 18 and up <= 8 else "hit"
    if player_total >= 17:
        return "stand"
    if 13 <= player_total <= 16:
        return "stand" if up <= 6 else "hit"
    if player_total == 12:
        return "stand" if 4 <= up <= 6 else "hit"
    return "hit"


def _describe_card(card: Card) -> str:
    value = "1 or 11" if card.rank == 1 else str(card.value)
    return f"{card.describe()} ({value})"


class BlackjackGame(CardGame):
    """One hand of blackjack; `rng` draws the cards still to come."""

    def __init__(self, rng: random.Random, natural: bool = False, dealer: list[Card] | None = None,
                 player: list[Card] | None = None) -> None:
        self.rng = rng
        self.natural = natural
        # gym-cards deals the dealer's two cards, then the player's
        self.dealer = list(dealer) if dealer is not None else [random_card(rng), random_card(rng)]
        self.player = list(player) if player is not None else [random_card(rng), random_card(rng)]
        self.outcome = ""  # "win", "lose", "push" once the hand is over

    def play(self, action: str) -> Move:
        if action == "hit":
            card = random_card(self.rng)
            self.player.append(card)
            total, _ = hand_total(self.player)
            if total > 21:
                self.done, self.outcome = True, "lose"
                return Move(-1.0, feedback=f"You drew the {card.describe()}: {total} is a bust. You lose.")
            return Move(0.0)
        # stand: the dealer plays out the hand
        while hand_total(self.dealer)[0] < 17:
            self.dealer.append(random_card(self.rng))
        player, dealer = hand_total(self.player)[0], hand_total(self.dealer)[0]
        dealer_score = 0 if dealer > 21 else dealer
        reward = float((player > dealer_score) - (player < dealer_score))
        if self.natural and reward == 1.0 and is_natural(self.player):
            reward = 1.5
        self.done = True
        self.outcome = "win" if reward > 0 else "lose" if reward < 0 else "push"
        self.won = reward > 0
        result = {"win": "You win!", "lose": "You lose.", "push": "It is a push (a draw)."}[self.outcome]
        dealer_text = "a bust" if dealer > 21 else str(dealer)
        return Move(reward, feedback=f"You stand on {player}; the dealer's hand makes {dealer_text}. {result}")

    def task(self) -> str:
        return "Beat the dealer at blackjack: get closer to 21 than the dealer without going over."

    def describe(self) -> str:
        yours = ", ".join(_describe_card(card) for card in self.player)
        if self.done:
            dealer = ", ".join(_describe_card(card) for card in self.dealer)
            return f"Dealer's cards: {dealer}.\nYour cards: {yours}."
        return (
            f"Dealer's face-up card: {_describe_card(self.dealer[0])}; the other dealer card is face down.\n"
            f"Your cards: {yours}."
        )

    def caption(self) -> str:
        if self.done:
            return "The image shows the dealer's cards and your cards."
        return "The image shows the dealer's face-up card and your cards."

    def picture(self) -> Image.Image:
        return blackjack_picture(self.dealer, self.player, reveal_dealer=self.done)

    def metrics(self) -> dict[str, Any]:
        return {
            "success": int(self.won),
            "push": int(self.outcome == "push"),
            "bust": int(hand_total(self.player)[0] > 21),
        }

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"player": [c.describe() for c in self.player], "dealer_up": self.dealer[0].describe()}
        if self.done:
            info["dealer"] = [c.describe() for c in self.dealer]
        return info

    def expert(self) -> tuple[str, str]:
        total, soft = hand_total(self.player)
        up = self.dealer[0]
        action = basic_strategy(total, soft, up)
        kind = "soft" if soft else "hard"
        return (
            f"My cards make a {kind} {total} and the dealer shows {up.label}. "
            f"Basic strategy for a {kind} {total} against {up.label} is to {action}.",
            action,
        )


@register_env("blackjack")
class BlackjackEnv(CardGameEnv):
    """Blackjack (gym-cards).

    Options: natural (default False: a natural blackjack pays 1 like any win; True: 1.5), and those of
    `CardGameEnv` (split, max_steps = 10 by default, history_length, observation_mode). Metrics:
    success (the hand was won), push, bust."""

    action_tokens = ("stand", "hit")
    default_max_steps = 10

    def __init__(
        self,
        *,
        natural: bool = False,
        split: str = "train",
        max_steps: int | None = None,
        history_length: int = 2,
        observation_mode: str = "image",
    ) -> None:
        if not isinstance(natural, bool):
            raise InvalidInput(f"natural must be True or False, got {natural!r}.")
        self.natural = natural
        super().__init__(split=split, max_steps=max_steps, history_length=history_length,
                         observation_mode=observation_mode)

    def new_game(self, rng: random.Random) -> BlackjackGame:
        return BlackjackGame(rng, natural=self.natural)

    def rules(self) -> str:
        where = {
            "image": "displayed in the image. The dealer (top) has one face-up card and one face-down card; "
            "your cards (bottom) are laid left to right",
            "text": "described below. The dealer has one face-up card and one face-down card",
            "both": "displayed in the image and described below. The dealer (top) has one face-up card and one "
            "face-down card; your cards (bottom) are laid left to right",
        }[self.observation_mode]
        natural = (
            "A natural blackjack (an ace and a ten-valued card as your first two cards) that wins pays 1.5."
            if self.natural
            else "A natural blackjack (an ace and a ten-valued card) pays like any other win."
        )
        return "\n".join(
            [
                f"You are an expert blackjack player deciding the best action for the current game state, {where}.",
                "Rules:",
                "- Your goal is to get as close to 21 as possible without going over, and closer than the dealer.",
                "- Number cards (2-10) count their number. Face cards (J, Q, K) count 10. An ace (A) counts 11 unless "
                "that takes the hand over 21, then 1.",
                "- 'hit' takes another card; if your total goes over 21 you bust and lose immediately (reward -1).",
                "- 'stand' ends your turn: the dealer reveals the hidden card and draws until the dealer's total is 17 "
                "or more. Then a higher total than the dealer's (or a dealer bust) wins (reward +1), an equal total is "
                "a push (reward 0), and a lower total loses (reward -1).",
                f"- {natural}",
                "- The deck is infinite (cards are drawn with replacement).",
            ]
        )
