"""The WebShop shop: the official-file loader (on a hand-written sample in WebShop's schema), the
generated catalog, BM25 search and its cache, pages, available actions and navigation."""

import json
from pathlib import Path

import pytest

from t2po.envs.webshop import catalog as catalog_module
from t2po.envs.webshop.catalog import generate_catalog, generated_catalog, load_official_catalog
from t2po.envs.webshop.engine import SearchIndex, Shop, rich_text, simple_text

DATA = Path(__file__).resolve().parents[1] / "data" / "webshop"


@pytest.fixture(scope="module")
def shop() -> Shop:
    catalog = generate_catalog(300, seed=5)
    return Shop(catalog, SearchIndex.build(catalog.products))


@pytest.fixture(scope="module")
def official() -> Shop:
    catalog = load_official_catalog(DATA)
    return Shop(catalog, SearchIndex.build(catalog.products))


# --------------------------------------------------------------------------- data


def test_official_loader_parses_webshop_schema():
    catalog = load_official_catalog(DATA)
    # the duplicate ASIN and the "nan" ASIN are skipped, as in WebShop's load_products
    assert [p.asin for p in catalog.products] == ["B078GWRC1J", "B09QKP7XQL", "B07XYZ1234", "B01NOPRICE"]
    deodorant, jeans, chair, tea = catalog.products
    assert deodorant.query == "deodorant"  # lower-cased and stripped
    assert deodorant.options == {"scent": ["bright citrus", "calming lavender"],
                                 "size": ["3 ounce (pack of 1)", "travel set | 4-pack"]}
    assert deodorant.price_tag == "$10.99" and catalog.prices["B078GWRC1J"] == 10.99
    assert jeans.price_tag == "$19.99 to $29.99" and 19.99 <= catalog.prices["B09QKP7XQL"] <= 29.99
    assert "fit type" not in jeans.options  # a None option group is dropped
    assert jeans.bullet_points == ["Machine wash cold"]  # a string becomes a one-item list
    assert chair.price_tag == "$1299.99" and chair.options == {}
    assert tea.price_tag == "$100.0" and tea.main_image is None  # no pricing: WebShop's $100 default
    assert tea.attributes == ["organic"]


def test_official_synthetic_goals_cover_every_option_combination():
    catalog = load_official_catalog(DATA)
    # deodorant 2x2 + jeans 2x2 + chair 1 (no options); the tea has no instruction
    assert len(catalog.goals) == 9
    by_product = {}
    for goal in catalog.goals:
        by_product.setdefault(goal.asin, []).append(goal)
    assert sorted(len(v) for v in by_product.values()) == [1, 4, 4]
    jeans_goal = next(g for g in catalog.goals if g.goal_options == {"color": "black", "size": "small"})
    assert jeans_goal.instruction_text == (
        "i need slim fit jeans with a high waist with color: black, and size: small, and price lower than "
        f"{jeans_goal.price_upper:.2f} dollars"
    )
    assert jeans_goal.price_upper in (30.0, 40.0, 50.0, 60.0)  # two of the 4 multiples of 10 above the price
    chair_goal = by_product["B07XYZ1234"][0]
    assert (chair_goal.price_upper == 1000000.0
            and chair_goal.instruction_text == "i want an office chair with lumbar support")
    # deterministic: same seed, same goals in the same (seed-233 shuffled) order
    assert [g.instruction_text for g in load_official_catalog(DATA).goals] == [g.instruction_text
                                                                               for g in catalog.goals]
    assert len(catalog.split_goals("test")) == 9
    with pytest.raises(ValueError, match="has no goals"):
        catalog.split_goals("train")


def test_official_human_goals():
    catalog = load_official_catalog(DATA, human_goals=True)
    assert len(catalog.goals) == 2  # the instruction without attributes is skipped
    deodorant = next(g for g in catalog.goals if g.asin == "B078GWRC1J")
    assert deodorant.goal_options == ["bright citrus", "3 ounce (pack of 1)"]
    assert deodorant.instruction_text.startswith("i would like a 3 ounce bottle of bright citrus deodorant for "
                                                 "sensitive skin, and price lower than")


def test_official_loader_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="items_shuffle_1000.json"):
        load_official_catalog(tmp_path)
    (tmp_path / "items_shuffle.json").write_text("[")
    (tmp_path / "items_ins_v2.json").write_text("{}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_official_catalog(tmp_path, use_small=False)


def test_generated_catalog_is_deterministic_and_consistent():
    a, b = generate_catalog(200, seed=3), generate_catalog(200, seed=3)
    assert [p.name for p in a.products] == [p.name for p in b.products]
    assert [g.instruction_text for g in a.goals] == [g.instruction_text for g in b.goals]
    assert [p.name for p in generate_catalog(200, seed=4).products] != [p.name for p in a.products]
    assert len({p.asin for p in a.products}) == 200
    for goal in a.goals:
        product = a.by_asin[goal.asin]
        assert set(goal.attributes) <= set(product.attributes)
        assert all(product.options[name] and value in product.options[name]
                   for name, value in goal.goal_options.items())
        assert a.prices[goal.asin] <= goal.price_upper
        assert goal.instruction_text.endswith(f", and price lower than {goal.price_upper:.2f} dollars")
    test, valid, train = a.split_goals("test"), a.split_goals("valid"), a.split_goals("train")
    assert (len(test), len(valid), len(train)) == (20, 20, 160)
    assert not {id(g) for g in test} & {id(g) for g in train}


def test_large_generated_catalog_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_module, "CATALOG_CACHE_MIN_PRODUCTS", 10)
    built = generated_catalog(50, seed=1, cache_dir=tmp_path)
    files = list((tmp_path / "webshop").glob("catalog-50-seed1-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["products"]
    loaded = generated_catalog(50, seed=1, cache_dir=tmp_path)
    assert loaded.products == built.products and loaded.goals == built.goals and loaded.prices == built.prices


# --------------------------------------------------------------------------- search


def test_search_ranks_matching_products_first(shop):
    goal = shop.catalog.goals[0]
    product = shop.catalog.by_asin[goal.asin]
    hits = shop.index.search(product.name)
    assert hits[0] == goal.asin  # its own title ranks it first
    assert len(hits) <= 50
    # every hit contains a query term; stemming maps plural to singular
    noun = product.name.split(",")[0].split()[-1].lower()
    plural_hits = shop.index.search(noun + "s")
    assert goal.asin in plural_hits or len(plural_hits) == 50
    assert shop.index.search("zzzz qqqq") == []
    assert shop.index.search("the and of") == []  # Lucene's stop words only


def test_search_with_one_and_two_letter_words(shop):
    """A size "s" (Snowball's Porter stems it to "", which crashed the search) and "xs" are kept
    whole, as Lucene's stemmer keeps words of up to two letters."""
    from t2po.envs.webshop.engine import Analyzer, parse_action

    assert Analyzer()("t-shirt size s, men's xs shoes") == ["t", "shirt", "size", "s", "men", "xs", "shoe"]
    for query in ("t-shirt size s", "men s shoes", "'s", "s", "xs us"):
        assert isinstance(shop.index.search(query), list)
    session = shop.new_session(shop.catalog.goals[0])
    assert shop.act(session, "search[t-shirt size s]")
    assert parse_action("search[t-shirt size s]") == ("search", "t-shirt size s")


def test_parse_action_matches_webshop_regex_in_linear_time():
    """Same result as WebShop's `re.match(r"(.+)\\[(.+)\\]", action)` (web_agent_text_env.py
    parse_action) on random bracket soup, without its quadratic backtracking."""
    import random
    import re
    import time

    from t2po.envs.webshop.engine import parse_action

    reference = re.compile(r"(.+)\[(.+)\]")
    rng = random.Random(0)
    for _ in range(20_000):
        action = "".join(rng.choice("ab[] \n") for _ in range(rng.randrange(12)))
        m = reference.match(action)
        assert parse_action(action) == ((action, None) if m is None else (m.group(1), m.group(2))), action
    start = time.perf_counter()
    assert parse_action("x" + "[a" * 500_000) == ("x" + "[a" * 500_000, None)
    assert time.perf_counter() - start < 0.5  # the regex takes minutes here


def test_search_index_cache_round_trip(tmp_path, shop):
    products = shop.catalog.products[:80]
    built = SearchIndex.build(products, cache_dir=tmp_path)
    saved = list((tmp_path / "webshop").glob("index-*"))
    assert len(saved) == 1 and (saved[0] / "asins.json").is_file()
    loaded = SearchIndex.build(products, cache_dir=tmp_path)
    for goal in shop.catalog.goals[:20]:
        assert loaded.search(goal.instruction_text) == built.search(goal.instruction_text)
    SearchIndex.build(products[:40], cache_dir=tmp_path)  # other documents, other key
    assert len(list((tmp_path / "webshop").glob("index-*"))) == 2


# --------------------------------------------------------------------------- pages and actions


def test_search_page_and_its_actions(shop):
    s = shop.new_session(shop.catalog.goals[0])
    page = shop.render(s)
    assert simple_text(page) == f"WebShop [SEP] Instruction: [SEP] {s.goal.instruction_text} [SEP] Search"
    assert page.has_search_bar and list(page.clickables()) == ["search"]
    assert not shop.act(s, "click[search]")  # WebShop ignores a click on the search button
    assert not shop.act(s, "search[]") and not shop.act(s, "buy it") and not shop.act(s, "click[next >]")
    assert s.page == "search"


def test_results_pages_paginate(shop):
    s = shop.new_session(shop.catalog.goals[0])
    assert shop.act(s, "search[Free Black]")  # arguments are lower-cased
    assert s.keywords == "free black" and len(s.results) > 20
    page = shop.render(s)
    texts = page.texts()
    assert texts[:5] == ["Instruction:", s.goal.instruction_text, "Back to Search",
                         f"Page 1 (Total results: {len(s.results)})", "Next >"]
    first = s.page_results
    assert len(first) == 10 and texts[5:8] == [first[0], shop.catalog.by_asin[first[0]].name,
                                               shop.catalog.by_asin[first[0]].price_tag]
    assert list(page.clickables()) == ["back to search", "next >"] + [a.lower() for a in first]
    assert shop.act(s, "click[next >]")
    assert s.page_num == 2 and s.page_results != first
    assert "< Prev" in shop.render(s).texts()
    assert shop.act(s, "click[< prev]") and s.page_results == first
    assert not shop.act(s, "click[< prev]")  # no "< Prev" on page 1


def test_item_page_options_sub_pages_and_purchase(shop):
    goal = shop.catalog.goals[0]
    product = shop.catalog.by_asin[goal.asin]
    s = shop.new_session(goal)
    shop.act(s, f"search[{product.name}]")
    assert shop.act(s, f"click[{goal.asin.lower()}]")
    assert s.page == "item" and s.asin == goal.asin and goal.asin in s.visited
    page = shop.render(s)
    values = [v for vs in product.options.values() for v in vs]
    assert list(page.clickables()) == ["back to search", "< prev", "description", "features", "reviews",
                                       "buy now", *values]
    assert page.texts()[-7:] == [product.name, f"Price: {product.price_tag}", f"Rating: {product.rating}",
                                 "Description", "Features", "Reviews", "Buy Now"]
    for name, value in goal.goal_options.items():
        assert shop.act(s, f"click[{value}]")
        assert s.options[name] == value
    assert "You have clicked" in rich_text(shop.render(s))
    assert shop.act(s, "click[features]") and s.page == "features"
    assert shop.render(s).texts()[4:] == product.bullet_points
    assert shop.act(s, "click[< prev]") and s.page == "item" and s.options == goal.goal_options  # options kept
    assert shop.act(s, "click[buy now]")
    assert s.done and s.outcome.reward == 1.0
    assert (simple_text(shop.render(s))
            == "Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] 1.0")
    assert not shop.act(s, "search[anything]")  # a finished session ignores actions


def test_back_to_results_and_back_to_search_reset_the_choice(shop):
    goal = shop.catalog.goals[1]
    s = shop.new_session(goal)
    shop.act(s, f"search[{shop.catalog.by_asin[goal.asin].name}]")
    shop.act(s, f"click[{goal.asin.lower()}]")
    value = next(iter(goal.goal_options.values()))
    shop.act(s, f"click[{value}]")
    assert shop.act(s, "click[< prev]")
    assert s.page == "results" and s.asin is None and s.options == {}
    assert shop.act(s, "click[back to search]")
    assert s.page == "search" and s.results == [] and s.visited == set()


def test_official_data_pages(official):
    goal = next(g for g in official.catalog.goals if g.asin == "B078GWRC1J")
    s = official.new_session(goal)
    official.act(s, "search[deodorant for sensitive skin]")
    assert s.results[0] == "B078GWRC1J"
    official.act(s, "click[b078gwrc1j]")
    texts = official.render(s).texts()
    assert texts[4:11] == ["scent", "bright citrus", "calming lavender", "size", "3 ounce (pack of 1)",
                           "travel set | 4-pack",
                           "Bright Citrus Deodorant by Earth Mama | Natural and Safe for Sensitive Skin, 3-Ounce"]
    official.act(s, "click[reviews]")
    # no reviews
    assert official.render(s).texts() == ["Instruction:", goal.instruction_text, "Back to Search", "< Prev"]
