"""The WebShop purchase reward, computed as WebShop's `get_reward` computes it.

WebShop (Yao et al., 2022; `web_agent_site/engine/goal.py`, the version verl-agent ships and the
T2PO runs used) scores a purchase against the goal as

    r = (n_attr + n_opt + [price <= price_upper]) / (|goal attributes| + |goal options| + 1) * r_type

- n_attr: goal attributes found in the product (a fuzzy `token_set_ratio > 85` match against one of
  the product's attributes, else a plain substring of its title, features or description);
- n_opt: goal options matched (`token_set_ratio > 85`) by one of the chosen option values, after
  colour normalisation (`normalize_color`: the first colour word of a fixed list that occurs in
  the value);
- r_type: the product-type factor: 1 when the purchased product shares the goal's search query, two
  levels of its category path, or more than 20% of its title nouns; 0.5 otherwise; 0.1 when fewer
  than 10% of the title nouns match; 0 when none do.

Two quirks of the original are kept on purpose, since the published scores were computed with them:
goal options given as a dict (synthetic goals) are matched as `(name, value)` pairs, i.e. as the
text "('size', 'large')"; and `normalize_color` is a substring test ("tan" is found in "standard").

`token_set_ratio` is thefuzz 0.19.0's (the version WebShop pins), which without python-Levenshtein
scores with `difflib.SequenceMatcher`: reimplemented here with the standard library, exactly.

Deviation (documented in the package docstring): the title nouns come from spaCy's
`en_core_web_sm` part-of-speech tagger in the original. That model is not installed here, so the
default `title_nouns="closed_class"` keeps every alphabetic word of the title that is not a
closed-class word (determiner, pronoun, preposition, conjunction, auxiliary, ...). Identical
titles (buying the target product) score exactly as in the original; only purchases of a
different product can get a different r_type. `title_nouns="spacy"` uses the original tagger
where `en_core_web_sm` is installed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from t2po.envs.webshop.catalog import Goal, Product

FUZZY_MATCH_THRESHOLD = 85  # token_set_ratio must exceed this for a match (goal.py)

# The colour vocabulary of WebShop's `normalize.py`, in its order (the first hit wins).
COLOR_SET = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown "
    "burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee "
    "cognac copper coral cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold "
    "granite grape graphite grass gray green grey heather indigo ivory ivy khaki lavender lemon "
    "leopard light lilac lime magenta maroon mauve merlot midnight mint mocha multicolor mushroom "
    "mustard natural navy nude olive orange peach pewter pink plum purple rainbow red rose royal "
    "rust sand sapphire seashell silver skull slate steel stone stonewash sunflower tan taupe teal "
    "tiger turquoise violet walnut wheat white wine yellow"
).split()

TITLE_NOUN_MODES = ("closed_class", "spacy")

# Closed-class English words: what a part-of-speech tagger never calls a noun.
_CLOSED_CLASS = frozenset(
    """
    a an the this that these those each every either neither some any no all both few many much
    more most several such what which whose whatever whichever another other own same
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves who whom one ones
    about above across after against along amid among around as at before behind below beneath
    beside besides between beyond but by despite down during except for from in inside into like
    near of off on onto out outside over past per plus since than through throughout till to
    toward towards under underneath unlike until up upon versus via vs with within without
    and or nor so yet if because although though while whereas unless whether
    am is are was were be been being have has had having do does did doing done
    can could may might must shall should will would ought
    not very too also just only even ever never again still already here there then now how when
    where why s t
    """.split()
)


@dataclass(frozen=True)
class RewardBreakdown:
    """The components of one purchase's reward (WebShop's `verbose=True` info)."""

    reward: float
    r_type: float
    r_att: float
    r_option: float | None  # None when the goal has no options
    r_price: bool | None  # None when the goal has no price bound
    query_match: bool
    category_match: bool
    title_score: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- fuzzy matching


_LATIN1_UPPER_HALF = {code: None for code in range(128, 256)}
_NON_WORD = re.compile(r"(?ui)\W")


def _full_process(value: Any) -> str:
    """thefuzz 0.19 `full_process(s, force_ascii=True)`: non-strings become their `str()`, code
    points 128-255 are dropped, every non-word character becomes a space, lower case, stripped."""
    text = str(value).translate(_LATIN1_UPPER_HALF)
    return _NON_WORD.sub(" ", text).lower().strip()


def _ratio(a: str, b: str) -> int:
    """thefuzz 0.19 `fuzz.ratio` on its pure-Python path (difflib)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def token_set_ratio(s1: Any, s2: Any) -> int:
    """thefuzz 0.19 `fuzz.token_set_ratio`: compare the shared tokens with each side's full token
    set (tokens sorted and joined) and keep the best `ratio`."""
    if s1 is None or s2 is None:
        return 0
    p1, p2 = _full_process(s1), _full_process(s2)
    if not p1 or not p2:
        return 0
    tokens1, tokens2 = set(p1.split()), set(p2.split())
    sect = " ".join(sorted(tokens1 & tokens2))
    combined_1to2 = (sect + " " + " ".join(sorted(tokens1 - tokens2))).strip()
    combined_2to1 = (sect + " " + " ".join(sorted(tokens2 - tokens1))).strip()
    return max(_ratio(sect, combined_1to2), _ratio(sect, combined_2to1), _ratio(combined_1to2, combined_2to1))


def normalize_color(value: str | tuple[str, str]) -> str | tuple[str, str]:
    """The first colour of `COLOR_SET` that `value` contains, else `value` itself. For a string this
    is a substring test; for a `(name, value)` pair (dict goal options) it is element equality."""
    for color in COLOR_SET:
        if color in value:
            return color
    return value


# --------------------------------------------------------------------------- title nouns


@lru_cache(maxsize=1)
def _spacy_tagger() -> Any:
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except OSError as err:
        raise RuntimeError(
            "title_nouns='spacy' needs spaCy's 'en_core_web_sm' pipeline, which is not installed. "
            "Install it (python -m spacy download en_core_web_sm) or use title_nouns='closed_class'."
        ) from err


@lru_cache(maxsize=65536)
def title_nouns(title: str, mode: str = "closed_class") -> list[str]:
    """The lower-cased nouns of a product title in order, repeats kept, as `get_type_reward` collects
    them (its title score divides by the length of this list)."""
    if mode == "spacy":
        doc = _spacy_tagger()(title)
        return [t.text.lower() for t in doc if t.pos_ in ("PNOUN", "NOUN", "PROPN")]
    if mode != "closed_class":
        raise ValueError(f"Unknown title_nouns mode {mode!r}; use one of {TITLE_NOUN_MODES}.")
    words = re.findall(r"[^\W\d_]+", title.lower())
    return [w for w in words if len(w) > 1 and w not in _CLOSED_CLASS]


# --------------------------------------------------------------------------- reward terms


def type_reward(purchased: Product, goal: Goal, nouns_mode: str = "closed_class") -> tuple[float, bool, bool, float]:
    """`get_type_reward`: (r_type, query_match, category_match, title_score)."""
    query_match = purchased.query == goal.query
    purchased_path = {x.strip() for x in purchased.product_category.split("›")}
    goal_path = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(purchased_path & goal_path) >= 2

    desired = title_nouns(goal.name, nouns_mode)
    bought = title_nouns(purchased.name, nouns_mode)
    # as WebShop: distinct shared nouns over the goal's noun list *with* repeats
    title_score = 0.2 if not desired else len(set(bought) & set(desired)) / len(desired)

    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def attribute_matches(purchased: Product, goal: Goal) -> int:
    """`get_attribute_reward`: how many goal attributes the product has."""
    title = purchased.name.lower()
    features = " ".join(purchased.bullet_points).lower()
    description = purchased.description.lower()
    matches = 0
    for goal_attr in goal.attributes:
        if any(token_set_ratio(p_attr, goal_attr) > FUZZY_MATCH_THRESHOLD for p_attr in purchased.attributes):
            matches += 1
        elif goal_attr in title or goal_attr in features or goal_attr in description:
            matches += 1
    return matches


def goal_option_list(goal: Goal) -> list[Any]:
    """The goal options as `get_reward` hands them on: `(name, value)` pairs for a dict."""
    if isinstance(goal.goal_options, dict):
        return list(goal.goal_options.items())
    return list(goal.goal_options)


def option_matches(chosen_values: list[str], goal_options: list[Any]) -> int:
    """`get_option_reward`: how many goal options one of the chosen values matches."""
    chosen = [normalize_color(v) for v in chosen_values]
    wanted = [normalize_color(g) for g in goal_options]
    matches = 0
    for goal_option in wanted:
        if any(token_set_ratio(value, goal_option) > FUZZY_MATCH_THRESHOLD for value in chosen):
            matches += 1
    return matches


def purchase_reward(
    purchased: Product,
    goal: Goal,
    price: float,
    chosen_options: dict[str, str],
    nouns_mode: str = "closed_class",
) -> RewardBreakdown:
    """WebShop's `get_reward` for buying `purchased` at `price` with `chosen_options` (option name
    -> chosen value), in [0, 1]; see the module docstring for the formula."""
    if not goal.attributes:
        raise ValueError(f"Goal for {goal.asin} has no attributes; WebShop goals always have at least one.")
    r_type, query_match, category_match, title_score = type_reward(purchased, goal, nouns_mode)
    r_price = (price <= goal.price_upper) if goal.price_upper > 0 else None
    n_attr = attribute_matches(purchased, goal)
    goal_options = goal_option_list(goal)
    n_opt = option_matches(list(chosen_options.values()), goal_options)
    denominator = len(goal.attributes) + len(goal_options) + 1
    reward = (n_attr + n_opt + bool(r_price)) / denominator * r_type
    return RewardBreakdown(
        reward=reward,
        r_type=r_type,
        r_att=n_attr / len(goal.attributes),
        r_option=n_opt / len(goal_options) if goal_options else None,
        r_price=r_price,
        query_match=query_match,
        category_match=category_match,
        title_score=title_score,
    )
