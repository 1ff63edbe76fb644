"""WebShop's purchase reward (goal.py `get_reward`) on hand-made product/goal pairs, and the fuzzy
matching it is built on (thefuzz 0.19 `token_set_ratio`, `normalize_color`)."""

import pytest

from t2po.envs.webshop.catalog import PRODUCT_TYPES, Goal, Product
from t2po.envs.webshop.reward import (
    normalize_color,
    option_matches,
    purchase_reward,
    title_nouns,
    token_set_ratio,
)

SHAMPOO_PATH = "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos"


def _shampoo(**overrides) -> Product:
    fields = dict(
        asin="B000000001",
        name="Velora Sulfate Free Shampoo for Dry Hair",
        category="beauty",
        query="shampoo",
        product_category=SHAMPOO_PATH,
        description="A gentle shampoo.",
        bullet_points=["Made with argan oil"],
        attributes=["sulfate free", "dry hair", "paraben free"],
        options={"scent": ["lavender", "coconut"], "size": ["8 fl oz", "16 fl oz"]},
        pricing=[12.5],
        price_tag="$12.5",
    )
    fields.update(overrides)
    return Product(**fields)


def _goal(**overrides) -> Goal:
    fields = dict(
        asin="B000000001",
        category="beauty",
        query="shampoo",
        name="Velora Sulfate Free Shampoo for Dry Hair",
        product_category=SHAMPOO_PATH,
        instruction_text="i need a sulfate free shampoo for dry hair with scent: lavender, and size: 16 fl oz, and "
                         "price lower than 30.00 dollars",
        attributes=["sulfate free", "dry hair"],
        price_upper=30.0,
        goal_options={"scent": "lavender", "size": "16 fl oz"},
    )
    fields.update(overrides)
    return Goal(**fields)


def test_thefuzz_reference_values():
    # values from thefuzz/fuzzywuzzy's documentation and tests
    assert token_set_ratio("fuzzy was a bear", "fuzzy fuzzy was a bear") == 100
    assert token_set_ratio("new york mets vs atlanta braves", "atlanta braves vs new york mets") == 100
    # no shared token: the sorted token strings are compared with difflib ("bl" matches: 2*2/9)
    assert token_set_ratio("black", "blue") == 44
    # shared tokens, differing rest: best of ratio(sect, sect+rest) = 2*5/(5+7) -> 83
    assert token_set_ratio("8 fl oz", "16 fl oz") == 83
    assert token_set_ratio(None, "x") == 0 and token_set_ratio("!!", "x") == 0


def test_dict_goal_options_are_matched_as_name_value_pairs():
    # get_reward passes goal_options.items(): a pair is compared as the text "('size', 'x-large')"
    assert token_set_ratio("x-large", ("size", "x-large")) == 100
    assert token_set_ratio("large", ("size", "x-large")) == 100  # WebShop's quirk: a subset matches
    assert token_set_ratio("small", ("size", "x-large")) < 85


def test_normalize_color_is_a_substring_test():
    assert normalize_color("navy blue") == "blue"  # "blue" comes before "navy" in the list
    assert normalize_color("standard") == "tan"
    assert normalize_color("16 fl oz") == "16 fl oz"
    assert normalize_color(("color", "black")) == "black"  # a pair: element equality
    assert normalize_color(("color", "jet black")) == ("color", "jet black")


def test_full_match_scores_one():
    out = purchase_reward(_shampoo(), _goal(), price=12.5, chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.reward == 1.0
    assert (out.r_type, out.r_att, out.r_option, out.r_price) == (1.0, 1.0, 1.0, True)


def test_wrong_option_costs_one_share():
    # (2 attributes + 1 of 2 options + price) / (2 + 2 + 1)
    out = purchase_reward(_shampoo(), _goal(), price=12.5, chosen_options={"scent": "coconut", "size": "16 fl oz"})
    assert out.reward == pytest.approx(4 / 5)
    assert out.r_option == 0.5
    # no option chosen at all
    out = purchase_reward(_shampoo(), _goal(), price=12.5, chosen_options={})
    assert out.reward == pytest.approx(3 / 5)


def test_price_over_bound_costs_one_share():
    out = purchase_reward(_shampoo(), _goal(price_upper=10.0), price=12.5,
                          chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.r_price is False
    assert out.reward == pytest.approx(4 / 5)


def test_missing_attribute_found_in_description_counts():
    product = _shampoo(attributes=["paraben free"], description="Sulfate free formula for dry hair.")
    out = purchase_reward(product, _goal(), price=12.5, chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.r_att == 1.0
    product = _shampoo(attributes=["paraben free"], description="", bullet_points=[], name="Velora Shampoo")
    out = purchase_reward(product, _goal(), price=12.5, chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.r_att == 0.0
    assert out.reward == pytest.approx(3 / 5 * out.r_type)


def test_wrong_category_scores_zero():
    chair = Product(
        asin="B000000002",
        name="Ergonomic Mesh Office Chair",
        category="furniture",
        query="office chairs",
        product_category="Home & Kitchen › Furniture › Home Office Furniture › Home Office Chairs",
        description="",
        bullet_points=[],
        attributes=["lumbar support"],
        options={"color": ["black"]},
        pricing=[99.0],
        price_tag="$99.0",
    )
    out = purchase_reward(chair, _goal(), price=9.0, chosen_options={"color": "black"})
    assert (out.query_match, out.category_match, out.title_score) == (False, False, 0.0)
    assert out.r_type == 0.0 and out.reward == 0.0


def test_type_factor_half_when_only_a_few_title_nouns_match():
    # another query, one shared category level, 1 of the 6 goal title nouns -> 1/6 in [0.1, 0.2]
    other = _shampoo(name="Velora Body Lotion", query="body lotion",
                     product_category="Beauty & Personal Care › Skin Care › Body")
    assert title_nouns(_goal().name) == ["velora", "sulfate", "free", "shampoo", "dry", "hair"]
    out = purchase_reward(other, _goal(), price=12.5, chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.title_score == pytest.approx(1 / 6)
    assert out.r_type == 0.5
    assert out.reward == pytest.approx(5 / 5 * 0.5)


def test_title_score_divides_by_the_goal_nouns_with_repeats():
    """WebShop `web_agent_site/engine/goal.py` `get_type_reward`:
    title_score = len(set(purchased_nouns) & set(desired_nouns)) / len(desired_nouns), desired_nouns
    a list with repeats. Goal nouns [phone, case, case, case, case, iphone, clear, case] (8; "for"
    and "13" are not nouns), bought [iphone, screen, protector]: 1 shared / 8 = 0.125, not > 0.2,
    >= 0.1; no query match, one shared category level -> r_type 0.5 (dividing by the 4 distinct
    nouns gave 0.25 and r_type 1.0)."""
    goal = _goal(name="Phone Case Case Case Case for iPhone 13, Clear Case", query="phone cases")
    bought = _shampoo(name="iPhone 13 Screen Protector", query="screen protectors",
                      product_category="Beauty & Personal Care › Skin Care › Body")
    assert title_nouns(goal.name) == ["phone", "case", "case", "case", "case", "iphone", "clear", "case"]
    out = purchase_reward(bought, goal, price=12.5, chosen_options={"scent": "lavender", "size": "16 fl oz"})
    assert out.title_score == pytest.approx(1 / 8)
    assert (out.query_match, out.category_match) == (False, False)
    assert out.r_type == 0.5


def test_human_goal_options_are_plain_strings():
    goal = _goal(goal_options=["lavender", "16 fl oz"])
    out = purchase_reward(_shampoo(), goal, price=12.5, chosen_options={"scent": "lavender", "size": "8 fl oz"})
    assert out.reward == pytest.approx(4 / 5)


def test_spacy_title_nouns_need_the_model():
    pytest.importorskip("spacy")
    import spacy.util

    if spacy.util.is_package("en_core_web_sm"):
        pytest.skip("en_core_web_sm is installed here")
    with pytest.raises(RuntimeError, match="en_core_web_sm"):
        title_nouns("Velora Shampoo", "spacy")


def test_generated_option_values_never_match_each_other():
    """A wrong option in the generated catalog always costs reward: within every option group, a
    value matches its own (name, value) goal pair and no other value's."""
    for kinds in PRODUCT_TYPES.values():
        for kind in kinds:
            for name, values in kind.options.items():
                for wanted in values:
                    for chosen in values:
                        matched = option_matches([chosen], [(name, wanted)])
                        assert matched == (chosen == wanted), (kind.noun, name, chosen, wanted)
