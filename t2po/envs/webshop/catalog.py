"""WebShop product data: the official data files, or a generated catalog in the same schema.

A `Catalog` holds products (as WebShop's `load_products` leaves them: title, description, bullet
points, attributes, options, price), one price per product, and goals (instruction text, target
product, attributes, options, price bound), in the order that the splits index.

- `load_official_catalog(data_dir)` reads the files WebShop's `setup.sh` downloads:
  `items_shuffle_1000.json` + `items_ins_v2_1000.json` (`use_small=True`, verl-agent's default) or
  `items_shuffle.json` + `items_ins_v2.json`, plus `items_human_ins.json` for human goals and an
  optional `reviews.json`. Goals follow WebShop's `get_goals` (synthetic goals: one per option
  combination; human goals: one per annotated instruction) and are shuffled with seed 233 as there.
  Splits: test = goals[0:500], valid = goals[500:1500], train = goals[1500:] (the split written in
  verl-agent's WebShop env, from WebShop's baselines; the code verl-agent runs validates on
  goals[0:500] and trains on goals[500:], i.e. on our train and valid splits together).
- `generate_catalog(num_products, seed)` builds a deterministic synthetic shop: five categories
  (beauty, food, fashion, furniture, electronics) of six product types each, with attributes,
  option groups and price ranges per type, reviews, and one goal per product written like WebShop's
  synthetic goals ("i need a sulfate free shampoo with scent: lavender, and size: 16 fl oz, and
  price lower than 30.00 dollars"). Split by goal index: i % 10 == 0 test, == 1 valid, else train.
  `generated_catalog` keeps catalogs of 10,000 products or more as JSON in a cache folder.

The random draws that WebShop leaves unseeded (the price of a product with a price range, the price
bound of a goal) are drawn here from `random.Random(seed)`, so that a catalog is reproducible.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import random
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterator

from t2po.errors import InvalidInput

SPLITS = ("train", "valid", "test")
PRICE_RANGE = [10.0 * i for i in range(1, 100)]  # WebShop's candidate price bounds
GOAL_SHUFFLE_SEED = 233  # WebShop's SimServer shuffles the goals with this seed
OFFICIAL_TEST_GOALS, OFFICIAL_VALID_END = 500, 1500  # verl-agent: test [0,500), eval [500,1500), train rest
CATALOG_CACHE_MIN_PRODUCTS = 10_000  # smaller generated catalogs take well under a second to make


@dataclass(slots=True)
class Review:
    title: str
    score: int
    body: str


@dataclass(slots=True)
class Product:
    """One product, with the fields WebShop's pages and reward read."""

    asin: str
    name: str  # the title ("Title" and "name" in WebShop)
    category: str  # top-level category: beauty, food, fashion, furniture, electronics
    query: str  # the search query the product was collected under (used by the type reward)
    product_category: str  # breadcrumb path, "A › B › C"
    description: str
    bullet_points: list[str]
    attributes: list[str]
    options: dict[str, list[str]]  # option name -> values, in page order
    pricing: list[float]  # one price, or a [low, high] range
    price_tag: str  # what the pages show: "$12.99" or "$10.0 to $20.0"
    rating: str = "N.A."
    reviews: list[Review] = field(default_factory=list)
    main_image: str | None = None

    def search_text(self) -> str:
        """The text the search index holds for this product (WebShop's `documents.jsonl`
        `contents`: title, description, first bullet point and the option text, lower-cased)."""
        option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in self.options.items())
        first_bullet = self.bullet_points[0] if self.bullet_points else ""
        return " ".join([self.name, self.description, first_bullet, option_text]).lower()


@dataclass(slots=True)
class Goal:
    """One shopping task: the instruction shown to the agent and what the reward compares with."""

    asin: str  # the target product
    category: str
    query: str
    name: str  # the target's title
    product_category: str
    instruction_text: str
    attributes: list[str]
    price_upper: float
    goal_options: dict[str, str] | list[str]  # dict for synthetic goals, list for human goals


@dataclass
class Catalog:
    products: list[Product]
    prices: dict[str, float]  # asin -> the price a purchase pays
    goals: list[Goal]
    source: str  # where it came from, for logs and cache keys
    official: bool  # official data files (verl-agent splits) or a generated catalog

    def __post_init__(self) -> None:
        self.by_asin = {p.asin: p for p in self.products}

    def split_goals(self, split: str) -> list[Goal]:
        """The goals of `split` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise InvalidInput(f"Unknown WebShop split {split!r}; use one of {', '.join(SPLITS)}.")
        if self.official:
            bounds = {"test": (0, OFFICIAL_TEST_GOALS), "valid": (OFFICIAL_TEST_GOALS, OFFICIAL_VALID_END)}
            start, end = bounds.get(split, (OFFICIAL_VALID_END, len(self.goals)))
            goals = self.goals[start:end]
        else:
            slots = {"test": (0,), "valid": (1,), "train": tuple(range(2, 10))}[split]
            goals = [g for i, g in enumerate(self.goals) if i % 10 in slots]
        if not goals:
            raise InvalidInput(
                f"WebShop split {split!r} has no goals in {self.source} ({len(self.goals)} goals in all; official data "
                f"splits test=[0,{OFFICIAL_TEST_GOALS}) valid=[{OFFICIAL_TEST_GOALS},{OFFICIAL_VALID_END}) "
                "train=rest). Use another split or a larger catalog."
            )
        return goals


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many long-lived objects (a catalog, an
    index), then freeze them (`gc.freeze`) so later collections never rescan them: at 100k products
    the collector's repeated scans otherwise double the build time and slow every later step."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- shared goal helpers


def price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    """WebShop's goal price bound: the larger of two draws among the first four multiples of 10
    above the price, with the instruction's price clause (no bound above $990)."""
    candidates = [p for p in PRICE_RANGE if p > price][:4]
    if len(candidates) < 2:
        return 1000000.0, ""
    upper = max(rng.sample(candidates, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def option_clause(goal_options: dict[str, str]) -> str:
    """WebShop's synthetic-goal option text: " with color: black, and size: large"."""
    text = ", and ".join(f"{name}: {value}" for name, value in goal_options.items())
    return f" with {text}" if text else ""


def purchase_price(pricing: list[float], rng: random.Random) -> float:
    """WebShop's `generate_product_prices`: the price, or a uniform draw in a price range."""
    if not pricing:
        return 100.0
    if len(pricing) == 1:
        return pricing[0]
    return rng.uniform(*pricing[:2])


# --------------------------------------------------------------------------- official data files


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{path} is not valid JSON ({err}); re-download the WebShop data file.") from err


def _parse_pricing(raw: Any) -> tuple[list[float], str]:
    """WebShop's price parsing: "$12.99" or "$10.00 - $20.00" -> ([12.99], "$12.99")."""
    if not raw:
        return [100.0], "$100.0"
    pricing = []
    for piece in str(raw).split("$")[1:]:
        digits = re.sub(r"[^\d.]", "", piece)
        try:
            pricing.append(float(Decimal(digits)))
        except InvalidOperation:
            continue  # a "$" with no number after it
    if not pricing:
        return [100.0], "$100.0"
    if len(pricing) == 1:
        return pricing, f"${pricing[0]}"
    return pricing[:2], f"${pricing[0]} to ${pricing[1]}"


def _parse_product(raw: dict[str, Any], attributes: dict[str, Any], reviews: dict[str, Any]) -> Product:
    asin = raw["asin"]
    options: dict[str, list[str]] = {}
    for option_name, contents in (raw.get("customization_options") or {}).items():
        if contents is None:
            continue
        options[option_name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
    bullets = raw.get("small_description")
    bullets = bullets if isinstance(bullets, list) else [bullets or ""]
    pricing, price_tag = _parse_pricing(raw.get("pricing"))
    review_entry = reviews.get(asin, {})
    product_reviews = [
        Review(title=str(r.get("title", "")), score=int(r.get("score", r.get("stars", 0)) or 0),
               body=str(r.get("review", r.get("body", ""))))
        for r in review_entry.get("reviews", [])
    ]
    images = raw.get("images") or [None]
    return Product(
        asin=asin,
        name=raw["name"],
        category=raw["category"],
        query=raw["query"].lower().strip(),
        product_category=raw["product_category"],
        description=raw.get("full_description") or "",
        bullet_points=[str(b) for b in bullets],
        attributes=list(attributes.get(asin, {}).get("attributes") or ["DUMMY_ATTR"]),
        options=options,
        pricing=pricing,
        price_tag=price_tag,
        rating=str(review_entry.get("average_rating", "N.A.")),
        reviews=product_reviews,
        main_image=images[0],
    )


def _synthetic_goals(products: list[Product], prices: dict[str, float], attributes: dict[str, Any],
                     rng: random.Random) -> list[Goal]:
    """WebShop's `get_synthetic_goals`: one goal per option combination of each annotated product."""
    goals = []
    for product in products:
        annotation = attributes.get(product.asin, {})
        instruction = annotation.get("instruction")
        goal_attributes = annotation.get("instruction_attributes")
        if instruction is None or not goal_attributes:
            continue
        price_upper, price_text = price_bound(prices[product.asin], rng)
        names = sorted(product.options)
        for combination in itertools.product(*(product.options[n] for n in names)):
            goal_options = dict(zip(names, combination))
            goals.append(
                Goal(
                    asin=product.asin,
                    category=product.category,
                    query=product.query,
                    name=product.name,
                    product_category=product.product_category,
                    instruction_text=f"{instruction}{option_clause(goal_options)}{price_text}",
                    attributes=list(goal_attributes),
                    price_upper=price_upper,
                    goal_options=goal_options,
                )
            )
    return goals


def _human_goals(products: list[Product], prices: dict[str, float], human: dict[str, Any],
                 rng: random.Random) -> list[Goal]:
    """WebShop's `get_human_goals`: one goal per human-written instruction with attributes."""
    goals = []
    for product in products:
        for entry in human.get(product.asin, []):
            if not entry.get("instruction_attributes"):
                continue
            price_upper, price_text = price_bound(prices[product.asin], rng)
            goals.append(
                Goal(
                    asin=product.asin,
                    category=product.category,
                    query=product.query,
                    name=product.name,
                    product_category=product.product_category,
                    instruction_text=entry["instruction"].strip(".") + price_text,
                    attributes=list(entry["instruction_attributes"]),
                    price_upper=price_upper,
                    goal_options=list(entry.get("instruction_options") or []),
                )
            )
    return goals


def official_file_names(use_small: bool) -> tuple[str, str]:
    """(products file, attributes file) of the small (1,000 products) or full data set."""
    if use_small:
        return "items_shuffle_1000.json", "items_ins_v2_1000.json"
    return "items_shuffle.json", "items_ins_v2.json"


def load_official_catalog(
    data_dir: str | Path,
    use_small: bool = True,
    human_goals: bool = False,
    num_products: int | None = None,
    seed: int = 0,
) -> Catalog:
    """Load WebShop's data files from `data_dir` (see the module docstring for which files)."""
    data_dir = Path(data_dir).expanduser()
    products_name, attributes_name = official_file_names(use_small)
    needed = [products_name, attributes_name] + (["items_human_ins.json"] if human_goals else [])
    missing = [n for n in needed if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WebShop data_dir {str(data_dir)!r} lacks {', '.join(missing)}. Put the files from WebShop's setup.sh "
            "there (use_small=True needs items_shuffle_1000.json and items_ins_v2_1000.json, use_small=False "
            "items_shuffle.json and items_ins_v2.json, human_goals=True also items_human_ins.json), "
            "or leave data_dir unset to use the generated catalog."
        )
    with paused_gc():
        return _load_official(data_dir, products_name, attributes_name, human_goals, num_products, seed)


def _load_official(
    data_dir: Path, products_name: str, attributes_name: str, human_goals: bool, num_products: int | None, seed: int
) -> Catalog:
    raw_products = _read_json(data_dir / products_name)
    attributes = _read_json(data_dir / attributes_name)
    reviews_path = data_dir / "reviews.json"
    reviews = {r["asin"]: r for r in _read_json(reviews_path)} if reviews_path.is_file() else {}
    if num_products is not None:
        raw_products = raw_products[:num_products]  # the files are already shuffled

    products, seen = [], set()
    for raw in raw_products:
        asin = raw.get("asin")
        if not isinstance(asin, str) or asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        try:
            products.append(_parse_product(raw, attributes, reviews))
        except (KeyError, TypeError) as err:
            raise InvalidInput(f"{data_dir / products_name}: product {asin} lacks a "
                               f"field WebShop needs ({err!r}).") from err

    rng = random.Random(seed)
    prices = {p.asin: purchase_price(p.pricing, rng) for p in products}
    if human_goals:
        goals = _human_goals(products, prices, _read_json(data_dir / "items_human_ins.json"), rng)
    else:
        goals = _synthetic_goals(products, prices, attributes, rng)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goals)
    source = f"{data_dir}/{products_name} ({'human' if human_goals else 'synthetic'} goals, seed {seed})"
    return Catalog(products=products, prices=prices, goals=goals, source=source, official=True)


# --------------------------------------------------------------------------- generated catalog


@dataclass(frozen=True)
class ProductType:
    """A kind of product in the generated shop and what varies between its products."""

    noun: str  # as the instruction says it ("shampoo")
    title: str  # as titles say it ("Shampoo")
    query: str
    path: str  # category breadcrumb
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price: tuple[float, float]
    plural: bool = False  # "socks": no article in the instruction


def _kind(noun: str, title: str, query: str, path: str, attributes: str, options: dict[str, str],
          price: tuple[float, float], plural: bool = False) -> ProductType:
    """A ProductType from comma-separated attribute and option value lists."""
    return ProductType(noun, title, query, path, tuple(attributes.split(", ")),
                       {k: tuple(v.split(", ")) for k, v in options.items()}, price, plural)


# Option values are chosen so that no two values of one group match each other under the reward's
# fuzzy matching (checked by tests/envs/test_webshop_reward.py), so a wrong choice always costs reward.
PRODUCT_TYPES: dict[str, list[ProductType]] = {
    "beauty": [
        _kind("shampoo", "Shampoo", "shampoo", "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
           "sulfate free, paraben free, dry hair, hair growth, natural ingredients, cruelty free, tea tree oil",
           {"scent": "lavender, coconut, argan, eucalyptus, unscented",
            "size": "8 fl oz, 16 fl oz, 32 fl oz"}, (6, 38)),
        _kind("deodorant", "Deodorant", "deodorant",
              "Beauty & Personal Care › Personal Care › Deodorants & Antiperspirants › Deodorant",
           "aluminum free, long lasting, sensitive skin, natural ingredients, vegan, travel size",
           {"scent": "citrus, cedar, eucalyptus, vanilla, fresh", "size": "2.6 ounce, 3.4 ounce, 5 ounce"}, (5, 24)),
        _kind("lipstick", "Lipstick", "lipstick", "Beauty & Personal Care › Makeup › Lips › Lipstick",
           "long lasting, matte finish, cruelty free, moisturizing, waterproof, vitamin e",
           {"color": "ruby red, nude, coral, berry, plum, pink"}, (4, 30)),
        _kind("face moisturizer", "Face Moisturizer", "face moisturizer",
              "Beauty & Personal Care › Skin Care › Face › Creams & Moisturizers",
           "hyaluronic acid, oil free, fragrance free, sensitive skin, anti aging, spf 30",
           {"size": "1.7 ounce, 3.4 ounce", "formula": "gel, lotion, balm"}, (9, 60)),
        _kind("nail polish", "Nail Polish", "nail polish",
              "Beauty & Personal Care › Foot, Hand & Nail Care › Nail Art & Polish › Nail Polish",
           "quick dry, long lasting, non toxic, gel effect, chip resistant",
           {"color": "cherry red, navy, mint, lilac, gold, white"}, (3, 18)),
        _kind("sunscreen", "Sunscreen", "sunscreen", "Beauty & Personal Care › Skin Care › Sun › Sunscreens",
           "water resistant, spf 50, reef safe, broad spectrum, oil free, fragrance free",
           {"size": "3 fl oz, 6 fl oz, 10 fl oz"}, (7, 32)),
    ],
    "food": [
        _kind("coffee beans", "Whole Bean Coffee", "coffee beans",
              "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Coffee › Whole Coffee Beans",
           "medium roast, dark roast, fair trade, organic, single origin, low acid",
           {"flavor": "colombian, hazelnut, vanilla, mocha", "size": "12 ounce, 2 pound, 5 pound"},
              (9, 70), plural=True),
        _kind("green tea", "Green Tea", "green tea",
              "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Tea › Green",
           "organic, non gmo, gluten free, sugar free, individually wrapped",
           {"flavor": "jasmine, matcha, ginger, lemon", "size": "20 count, 50 count, 100 count"}, (4, 28), plural=True),
        _kind("protein bars", "Protein Bars", "protein bars",
              "Grocery & Gourmet Food › Snack Foods › Bars › Protein Bars",
           "high protein, low sugar, gluten free, keto friendly, plant based, non gmo",
           {"flavor": "chocolate chip, peanut butter, cookie dough, salted caramel", "size": "12 count, 24 count"},
              (12, 45), plural=True),
        _kind("dark chocolate", "Dark Chocolate Bar", "dark chocolate",
              "Grocery & Gourmet Food › Candy & Chocolate › Chocolate › Chocolate Bars",
           "dairy free, vegan, fair trade, sugar free, organic, low carb",
           {"flavor": "sea salt, almond, orange, raspberry"}, (3, 25), plural=True),
        _kind("olive oil", "Extra Virgin Olive Oil", "olive oil",
              "Grocery & Gourmet Food › Pantry Staples › Cooking & Baking › Oils › Olive",
           "extra virgin, cold pressed, organic, non gmo, first harvest",
           {"size": "500 ml, 1 liter, 3 liter"}, (8, 55), plural=True),
        _kind("beef jerky", "Beef Jerky", "beef jerky",
              "Grocery & Gourmet Food › Snack Foods › Jerky & Dried Meats › Jerky",
           "high protein, gluten free, low fat, grass fed, no preservatives",
           {"flavor": "original, teriyaki, spicy, chipotle", "size": "3.25 ounce, 10 ounce"}, (6, 35), plural=True),
    ],
    "fashion": [
        _kind("men's t-shirt", "Men's T-Shirt", "men's t-shirts",
              "Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
           "cotton, short sleeve, machine wash, slim fit, moisture wicking, crew neck",
           {"color": "black, white, navy, heather gray, olive", "size": "small, medium, large, xl, xxl"}, (8, 35)),
        _kind("women's dress", "Women's Dress", "women's dresses",
              "Clothing, Shoes & Jewelry › Women › Clothing › Dresses",
           "floral print, v neck, long sleeve, machine wash, pockets, high waist",
           {"color": "black, burgundy, teal, yellow, floral", "size": "small, medium, large, xl"}, (18, 70)),
        _kind("running shoes", "Running Shoes", "running shoes",
              "Clothing, Shoes & Jewelry › Men › Shoes › Athletic › Running",
           "non slip, breathable, lightweight, rubber sole, arch support, memory foam",
           {"color": "black, white, gray, blue, red", "size": "8, 9, 10, 11, 12"}, (30, 140), plural=True),
        _kind("jeans", "Jeans", "women's jeans", "Clothing, Shoes & Jewelry › Women › Clothing › Jeans",
           "stretch, high waist, button closure, machine wash, slim fit, relaxed fit",
           {"color": "indigo, black, gray", "size": "26, 28, 30, 32, 34"}, (20, 80), plural=True),
        _kind("hoodie", "Hoodie", "men's hoodies",
              "Clothing, Shoes & Jewelry › Men › Clothing › Fashion Hoodies & Sweatshirts",
           "fleece lined, drawstring closure, machine wash, kangaroo pocket, long sleeve",
           {"color": "black, charcoal, navy, maroon, green", "size": "small, medium, large, xl"}, (20, 60)),
        _kind("athletic socks", "Athletic Socks", "athletic socks",
              "Clothing, Shoes & Jewelry › Men › Clothing › Socks › Athletic Socks",
           "moisture wicking, cushioned, arch support, cotton blend, ankle length",
           {"color": "white, black, gray", "size": "medium, large, xl"}, (8, 30), plural=True),
    ],
    "furniture": [
        _kind("office chair", "Office Chair", "office chairs",
              "Home & Kitchen › Furniture › Home Office Furniture › Home Office Chairs",
           "lumbar support, adjustable height, easy assemble, mesh back, swivel, heavy duty",
           {"color": "black, gray, white, blue"}, (60, 320)),
        _kind("bookshelf", "Bookshelf", "bookshelves", "Home & Kitchen › Furniture › Living Room Furniture › Bookcases",
           "easy assemble, solid wood, space saving, storage space, engineered wood",
           {"color": "walnut, white, black", "size": "3 tier, 5 tier"}, (40, 220)),
        _kind("coffee table", "Coffee Table", "coffee tables",
              "Home & Kitchen › Furniture › Living Room Furniture › Tables › Coffee Tables",
           "storage space, easy assemble, solid wood, tempered glass, mid century",
           {"color": "walnut, white, black, gray"}, (50, 300)),
        _kind("bed frame", "Bed Frame", "bed frames",
              "Home & Kitchen › Furniture › Bedroom Furniture › Beds, Frames & Bases › Bed Frames",
           "heavy duty, easy assemble, no box spring needed, underbed storage, noise free",
           {"size": "twin, full, queen, king"}, (80, 400)),
        _kind("bar stool", "Bar Stool", "bar stools",
              "Home & Kitchen › Furniture › Game & Recreation Room Furniture › Home Bar Furniture › Barstools",
           "swivel, adjustable height, pu leather, footrest, easy assemble",
           {"color": "black, white, gray, brown"}, (40, 200)),
        _kind("shoe rack", "Shoe Rack", "shoe racks",
              "Home & Kitchen › Storage & Organization › Clothing & Closet Storage › Shoe Organizers",
           "space saving, easy assemble, stackable, metal frame",
           {"color": "black, white, bronze", "size": "3 tier, 6 tier"}, (15, 90)),
    ],
    "electronics": [
        _kind("bluetooth headphones", "Bluetooth Headphones", "bluetooth headphones",
              "Electronics › Headphones, Earbuds & Accessories › Headphones › Over-Ear Headphones",
           "noise cancelling, wireless bluetooth, long battery life, built-in microphone, foldable",
           {"color": "black, white, silver, rose gold"}, (25, 250), plural=True),
        _kind("phone case", "Phone Case", "phone cases",
              "Electronics › Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
           "shockproof, slim fit, wireless charging compatible, raised edges, clear back",
           {"color": "black, clear, purple, green", "model": "iphone 14, iphone 15, galaxy s23"}, (6, 30)),
        _kind("usb c cable", "USB C Cable", "usb c cables",
              "Electronics › Computers & Accessories › Cables & Interconnects › USB Cables",
           "fast charging, braided nylon, high speed, durable, data transfer",
           {"color": "black, white, red", "length": "3 ft, 6 ft, 10 ft"}, (5, 25)),
        _kind("wireless mouse", "Wireless Mouse", "wireless mouse",
              "Electronics › Computers & Accessories › Keyboards, Mice & Accessories › Mice",
           "ergonomic design, silent click, usb receiver, long battery life, adjustable dpi",
           {"color": "black, white, pink, blue"}, (9, 60)),
        _kind("power bank", "Power Bank", "power banks",
              "Electronics › Cell Phones & Accessories › Chargers & Power Adapters › Portable Power Banks",
           "fast charging, usb c, compact, led display, high capacity",
           {"capacity": "10000mah, 20000mah, 26800mah", "color": "black, white"}, (15, 80)),
        _kind("security camera", "Security Camera", "security cameras",
              "Electronics › Camera & Photo › Video Surveillance › Surveillance Cameras",
           "motion detection, night vision, two way audio, weatherproof, easy install",
           {"pack": "single camera, two cameras, four cameras"}, (25, 200)),
    ],
}

_BRAND_PARTS = (
    "al ba cor da el fa gen ho ix jo ka lu mo nu or pe qua ri so ta ul ve wy xa yo ze bri cla dro fen gla"
).split()
_BRAND_ENDS = "ra via lex tix nova ora ix ant wen dale mont sky crest field line".split()
_INSTRUCTIONS = (
    "i need {a}{attrs} {noun}",
    "i am looking for {a}{noun} that is {attrs}",
    "i want to buy {a}{attrs} {noun}",
    "i'm looking for {a}{attrs} {noun}",
    "find me {a}{noun} which is {attrs}",
)
_REVIEW_TITLES = ("Great {noun}", "Works as described", "Not what I expected", "Love it", "Good value for the price",
                  "Would buy again")
_REVIEW_BODIES = (
    "Exactly what I was looking for. The {attr} part really shows.",
    "Arrived quickly and the quality is fine for the price.",
    "It is okay, but the {attr} claim is a bit of a stretch.",
    "My second one already; {attr} as promised.",
    "Returned it, did not fit what I needed.",
)
_FEATURES = (
    "{Attr}: made with care for everyday use",
    "Designed to be {attr} without compromise",
    "Satisfaction guaranteed: contact us with any question about your {noun}",
    "Ships in recyclable packaging",
    "Great gift idea for friends and family",
)


def _brand(rng: random.Random) -> str:
    return (rng.choice(_BRAND_PARTS) + rng.choice(_BRAND_PARTS) + rng.choice(_BRAND_ENDS)).capitalize()


def _article(word: str, plural: bool) -> str:
    if plural:
        return ""
    return "an " if word[0] in "aeiou" else "a "


def _generate_product(asin: str, category: str, kind: ProductType, rng: random.Random) -> Product:
    brand = _brand(rng)
    attributes = rng.sample(kind.attributes, k=min(len(kind.attributes), rng.randint(3, 4)))
    options = {}
    for name, values in kind.options.items():
        chosen = set(rng.sample(values, k=rng.randint(min(2, len(values)), len(values))))
        options[name] = [v for v in values if v in chosen]  # keep the catalogue order on the page
    title_attrs = [a.title() for a in attributes[:2]]
    title = f"{brand} {title_attrs[0]} {kind.title}, {title_attrs[1]}"
    if rng.random() < 0.5:
        title += f" - {attributes[2].title()}"
    description = (
        f"The {brand} {kind.noun} {'are' if kind.plural else 'is'} {', '.join(attributes[:-1])} and {attributes[-1]}. "
        "Every order is checked before it ships, and our customer service answers within a day."
    )
    bullets = [_FEATURES[0].format(Attr=attributes[0].capitalize())]
    bullets += [rng.choice(_FEATURES[1:]).format(attr=a, noun=kind.noun) for a in attributes[1:3]]
    low, high = kind.price
    if rng.random() < 0.2:
        start = round(rng.uniform(low, high * 0.8), 2)
        pricing = [start, round(start * rng.uniform(1.1, 1.5), 2)]
        price_tag = f"${pricing[0]} to ${pricing[1]}"
    else:
        pricing = [round(rng.uniform(low, high), 2)]
        price_tag = f"${pricing[0]}"
    reviews = [
        Review(
            title=rng.choice(_REVIEW_TITLES).format(noun=kind.noun),
            score=rng.randint(1, 5),
            body=rng.choice(_REVIEW_BODIES).format(attr=rng.choice(attributes)),
        )
        for _ in range(rng.randint(0, 3))
    ]
    rating = f"{sum(r.score for r in reviews) / len(reviews):.1f}" if reviews else "N.A."
    return Product(
        asin=asin,
        name=title,
        category=category,
        query=kind.query,
        product_category=kind.path,
        description=description,
        bullet_points=bullets,
        attributes=attributes,
        options=options,
        pricing=pricing,
        price_tag=price_tag,
        rating=rating,
        reviews=reviews,
    )


def _generate_goal(product: Product, kind: ProductType, price: float, rng: random.Random) -> Goal:
    goal_attributes = rng.sample(product.attributes, k=rng.randint(1, 2))
    goal_options = {name: rng.choice(product.options[name]) for name in sorted(product.options)}
    template = rng.choice(_INSTRUCTIONS)
    article_before = goal_attributes[0] if "{a}{attrs}" in template else kind.noun
    instruction = template.format(a=_article(article_before, kind.plural),
                                  attrs=" and ".join(goal_attributes), noun=kind.noun)
    price_upper, price_text = price_bound(price, rng)
    return Goal(
        asin=product.asin,
        category=product.category,
        query=product.query,
        name=product.name,
        product_category=product.product_category,
        instruction_text=f"{instruction}{option_clause(goal_options)}{price_text}",
        attributes=goal_attributes,
        price_upper=price_upper,
        goal_options=goal_options,
    )


def generate_catalog(num_products: int = 1000, seed: int = 0) -> Catalog:
    """A deterministic synthetic shop of `num_products` products with one goal each."""
    if num_products < 1:
        raise InvalidInput(f"num_products must be at least 1, got {num_products}.")
    with paused_gc():
        return _generate(num_products, seed)


def _generate(num_products: int, seed: int) -> Catalog:
    rng = random.Random(seed)
    kinds = [(category, kind) for category, kinds in PRODUCT_TYPES.items() for kind in kinds]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    products, goals, prices, asins = [], [], {}, set()
    for _ in range(num_products):
        asin = "B0" + "".join(rng.choices(alphabet, k=8))
        while asin in asins:
            asin = "B0" + "".join(rng.choices(alphabet, k=8))
        asins.add(asin)
        category, kind = rng.choice(kinds)
        product = _generate_product(asin, category, kind, rng)
        prices[asin] = purchase_price(product.pricing, rng)
        products.append(product)
        goals.append(_generate_goal(product, kind, prices[asin], rng))
    source = f"generated catalog ({num_products} products, seed {seed})"
    return Catalog(products=products, prices=prices, goals=goals, source=source, official=False)


# --------------------------------------------------------------------------- cache of large generated catalogs


def _catalog_rows(catalog: Catalog) -> dict[str, Any]:
    def product_row(p: Product) -> list[Any]:
        row = [getattr(p, f.name) for f in fields(Product)]
        row[[f.name for f in fields(Product)].index("reviews")] = [[r.title, r.score, r.body] for r in p.reviews]
        return row

    return {
        "products": [product_row(p) for p in catalog.products],
        "prices": [catalog.prices[p.asin] for p in catalog.products],
        "goals": [[getattr(g, f.name) for f in fields(Goal)] for g in catalog.goals],
    }


def _catalog_from_rows(rows: dict[str, Any], source: str) -> Catalog:
    review_at = [f.name for f in fields(Product)].index("reviews")
    products = []
    for row in rows["products"]:
        row[review_at] = [Review(*r) for r in row[review_at]]
        products.append(Product(*row))
    prices = {p.asin: price for p, price in zip(products, rows["prices"])}
    goals = [Goal(*row) for row in rows["goals"]]
    return Catalog(products=products, prices=prices, goals=goals, source=source, official=False)


def generated_catalog(num_products: int = 1000, seed: int = 0, cache_dir: str | Path | None = None) -> Catalog:
    """`generate_catalog`, kept as JSON under `cache_dir` when it is large (see
    CATALOG_CACHE_MIN_PRODUCTS). The file name includes a hash of this module's source, so any
    change to the generator makes a new file; files are written atomically."""
    if cache_dir is None or num_products < CATALOG_CACHE_MIN_PRODUCTS:
        return generate_catalog(num_products, seed)
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = Path(cache_dir) / "webshop" / f"catalog-{num_products}-seed{seed}-{code}.json"
    source = f"generated catalog ({num_products} products, seed {seed})"
    if path.is_file():
        with paused_gc():
            return _catalog_from_rows(_read_json(path), source)
    catalog = generate_catalog(num_products, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_catalog_rows(catalog), f)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"Could not cache the WebShop catalog in {path} ({err}); it will be generated again next time.")
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after a successful replace
    return catalog
