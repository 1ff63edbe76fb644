"""Search QA data: answer normalisation, exact match, loaders of the shared files, disjoint splits."""

from __future__ import annotations

import pytest

from t2po.envs.search.data import (
    SearchQuestion,
    default_data_dir,
    exact_match,
    load_hotpotqa_distractor,
    load_hotpotqa_ircot,
    load_nq_open_oracle,
    load_search_r1_parquet,
    load_shared_questions,
    normalize_answer,
    question_pool,
    split_of,
)

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared Search QA data not at {DATA}")


@pytest.mark.parametrize("raw, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  A   cat\n", "cat"),
    ("An apple, an orange and THE pear.", "apple orange and pear"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),  # non-ASCII letters kept
    ("the", ""),
    ("1,000", "1000"),
])
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_any_golden_answer():
    assert exact_match("the Beatles", ["Beatles", "John Lennon"]) == 1.0
    assert exact_match("john lennon.", ["Beatles", "John Lennon"]) == 1.0
    assert exact_match("Lennon", ["Beatles", "John Lennon"]) == 0.0  # exact, not substring
    assert exact_match("", ["Beatles"]) == 0.0


def test_split_is_deterministic_and_ignores_surface_form():
    assert split_of("who got the first nobel prize in physics?") == split_of("Who got the first Nobel Prize in physics")
    splits = {split_of(f"question number {i}") for i in range(200)}
    assert splits == {"train", "validation"}


@needs_data
def test_loaders_read_the_shared_files():
    parquet = load_search_r1_parquet(DATA / "nq_search_test.parquet")
    assert len(parquet) == 3610 and all(q.data_source == "nq" and q.golden_answers for q in parquet)
    oracle = load_nq_open_oracle(DATA / "nq-open-oracle.jsonl.gz")
    assert len(oracle) == 2655 and all(len(q.gold_passages) == 1 for q in oracle)
    assert oracle[0].gold_passages[0].contents.startswith('"List of Nobel laureates in Physics"\n')
    ircot = load_hotpotqa_ircot(DATA / "hotpotqa_dev_subsampled.jsonl.xz")
    assert len(ircot) == 500 and all(len(q.gold_passages) == 2 and len(q.passages) >= 2 for q in ircot)
    hard = load_hotpotqa_distractor(DATA / "hotpotqa_hard_train.jsonl.xz")
    assert len(hard) == 300 and all(q.data_source == "hotpotqa" and len(q.gold_passages) == 2 for q in hard)


@needs_data
def test_train_and_validation_never_share_a_question():
    questions = load_shared_questions()  # all five files, about 7,400 rows
    train = question_pool(questions, "train")
    validation = question_pool(questions, "validation")
    train_keys = {normalize_answer(q.question) for q in train}
    validation_keys = {normalize_answer(q.question) for q in validation}
    assert not train_keys & validation_keys
    assert train_keys | validation_keys == {normalize_answer(q.question) for q in questions}
    assert 0.1 < len(validation) / (len(train) + len(validation)) < 0.3
    assert {q.data_source for q in validation} == {"nq", "hotpotqa"}
    nq_only = question_pool(questions, "validation", ["nq"])
    assert nq_only and all(q.data_source == "nq" for q in nq_only)


def test_pool_merges_duplicates_and_rejects_bad_options():
    a = SearchQuestion("a", "Who wrote Hamlet?", ("Shakespeare",), "nq")
    b = SearchQuestion("b", "who wrote hamlet", ("William Shakespeare",), "nq")
    split = split_of(a.question)
    (merged,) = question_pool([a, b], split)
    assert merged.id == "a" and merged.golden_answers == ("Shakespeare", "William Shakespeare")
    with pytest.raises(ValueError, match="split"):
        question_pool([a], "test")
    with pytest.raises(ValueError, match="data source"):
        question_pool([a], "train", ["triviaqa"])


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="T2PO_SEARCH_DATA"):
        load_shared_questions(tmp_path / "nowhere")
