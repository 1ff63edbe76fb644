"""TTI (docs/method.md §2): per-row stagnation and budget forcing, multi-token end tags, tag matching on text."""

import numpy as np
import pytest

from t2po.algos.intervention import ThinkingIntervention, vocabulary_text

START, END_A, END_B = 1, 2, 3  # id-level tags: start = [1], end = [2, 3] (a two-token end tag)
WORD = 7  # any other token


def run(tti, steps):
    """Drive the per-row API. `steps[t][row]` = (M_t, token the model would sample); returns the
    tokens each row actually emitted (forced ones replace the proposal)."""
    emitted = [[] for _ in tti.rows]
    for step in steps:
        for row, (m, proposal) in enumerate(step):
            forced = tti.observe(row, m)
            token = proposal if forced is None else forced
            tti.advance(row, token)
            emitted[row].append(token)
    return emitted


def id_tti(**options):
    return ThinkingIntervention([START], [END_A, END_B], **options)


def test_rows_trigger_stagnation_at_their_own_steps():
    tti = id_tti(patience=3, eps=1e-4)
    tti.start([[9], [9], [9]])
    # row 0 opens a span at step 0, row 1 at step 2, row 2 never thinks; M_t is constant for everyone
    tokens = [[START] + [WORD] * 9, [WORD, WORD, START] + [WORD] * 7, [WORD] * 10]
    script = [[(0.5, tokens[row][t]) for row in range(3)] for t in range(10)]
    emitted = run(tti, script)
    # row 0: in span from step 1; comparisons at steps 2, 3, 4 -> forced 2 at step 4, 3 at step 5
    assert emitted[0][4:6] == [END_A, END_B]
    assert tti.rows[0].forced_positions == [4, 5]
    # row 1: START at step 2, in span from step 3, comparisons at 4, 5, 6 -> forced at 6, 7
    assert emitted[1][2] == START and emitted[1][6:8] == [END_A, END_B]
    assert tti.rows[1].forced_positions == [6, 7]
    assert tti.rows[0].triggers == {"budget": 0, "stagnation": 1, "random": 0}
    assert tti.rows[1].triggers == {"budget": 0, "stagnation": 1, "random": 0}
    # a row outside any think span is never forced, however stagnant
    assert tti.rows[2].forced_positions == [] and tti.rows[2].think_length == 0
    # after the forced end tag the rows are outside and write freely again
    assert not tti.rows[0].in_think and emitted[0][6:] == [WORD] * 4
    # think length: tokens emitted inside the span, end tag included (row 0: steps 1..5)
    assert tti.rows[0].think_length == 5


def test_budget_forces_the_end_tag_and_counts_separately():
    tti = id_tti(patience=3, budget=4)
    tti.start([[9, START]])  # a prompt ending with the start tag opens the span
    steps = [[(0.1 * t, WORD)] for t in range(8)]  # M_t changes by 0.1 every step: never stagnant
    emitted = run(tti, steps)
    assert emitted[0][:6] == [WORD] * 4 + [END_A, END_B]
    assert tti.rows[0].triggers == {"budget": 1, "stagnation": 0, "random": 0}
    assert tti.rows[0].think_length == 6


def test_budget_takes_precedence_when_both_rules_fire():
    tti = id_tti(patience=2, budget=2)
    tti.start([[START]])
    emitted = run(tti, [[(0.3, WORD)]] * 4)
    assert emitted[0][2:4] == [END_A, END_B]
    assert tti.rows[0].triggers == {"budget": 1, "stagnation": 0, "random": 0}


def test_counter_resets_on_movement_and_after_forcing():
    tti = id_tti(patience=3, eps=0.01)
    tti.start([[START]])
    # first span: M moves at step 3, so three consecutive stagnant comparisons only end at step 6
    ms = [0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9]
    emitted = run(tti, [[(m, WORD)] for m in ms])
    assert tti.rows[0].forced_positions == [6]
    run(tti, [[(0.9, WORD)]])  # second end-tag token forced at step 7
    assert tti.rows[0].forced_positions == [6, 7] and not tti.rows[0].in_think
    # second span (re-opened by the model): previous M and counter start afresh
    emitted = run(tti, [[(0.9, START)]] + [[(0.9, WORD)]] * 4)
    assert tti.rows[0].forced_positions == [6, 7, 12]
    assert emitted[0][-1] == END_A
    assert tti.rows[0].triggers["stagnation"] == 2


def test_no_rules_only_monitors():
    tti = id_tti(patience=None, budget=None)
    tti.start([[START]])
    run(tti, [[(0.5, WORD)]] * 50)
    assert tti.rows[0].forced_positions == [] and tti.rows[0].think_length == 50
    assert tti.rows[0].uncertainty == [0.5] * 50


def test_a_model_that_closes_the_span_itself_is_left_alone():
    tti = id_tti(patience=3, budget=10)
    tti.start([[START]])
    emitted = run(tti, [[(0.1 * t, tok)] for t, tok in enumerate([WORD, WORD, END_A, END_B, WORD, WORD])])
    assert emitted[0] == [WORD, WORD, END_A, END_B, WORD, WORD]
    assert tti.rows[0].forced_positions == [] and not tti.rows[0].in_think
    assert tti.rows[0].think_length == 4


def test_protocol_misuse_is_reported():
    tti = id_tti(budget=0)
    tti.start([[START]])
    assert tti.observe(0, 0.0) == END_A
    with pytest.raises(RuntimeError, match="observe"):
        tti.observe(0, 0.0)
    with pytest.raises(RuntimeError, match="forced token 2"):
        tti.advance(0, WORD)
    with pytest.raises(ValueError, match="patience"):
        id_tti(patience=0)
    with pytest.raises(ValueError, match="think_end_ids"):
        ThinkingIntervention([1], [])


# Text matching: a toy vocabulary where the same tag has several tokenizations.
VOCAB = ["<", "think", ">", "</", " <", "><", "a", "b", " ", "\n", "</think>", "action"]
TOK = {piece: i for i, piece in enumerate(VOCAB)}


def text_tti(**options):
    return ThinkingIntervention(
        [TOK["<"], TOK["think"], TOK[">"]], [TOK["</"], TOK["think"], TOK[">"]], token_text=VOCAB, **options
    )


def test_tags_are_matched_on_text_across_tokenizations():
    tti = text_tti(patience=None, budget=None)
    tti.start([[TOK["a"]]])
    # " <think>" opens the span (space-merged first token); "</think><action" closes it with a merged "><"
    for token in [" <", "think", ">", "a", "b", "</", "think", "><", "action"]:
        tti.observe(0, 0.0)
        tti.advance(0, TOK[token])
        if token == ">":
            assert tti.rows[0].in_think
    assert not tti.rows[0].in_think
    assert tti.rows[0].think_length == 5  # a, b, </, think, ><
    # a single special-like token holding the whole end tag also closes a span
    tti.start([[TOK["<"], TOK["think"], TOK[">"], TOK["\n"]]])  # prompt pre-fills "<think>\n"
    assert tti.rows[0].in_think
    tti.observe(0, 0.0)
    tti.advance(0, TOK["</think>"])
    assert not tti.rows[0].in_think


def test_forcing_completes_a_half_written_end_tag():
    tti = text_tti(budget=3, patience=None)
    tti.start([[TOK["<"], TOK["think"], TOK[">"]]])
    emitted = run(tti, [[(0.0, TOK["a"])], [(0.0, TOK["b"])], [(0.0, TOK["</"])], [(0.0, TOK["a"])], [(0.0, TOK["a"])]])
    # budget fires after "a b </": only "think" and ">" are missing
    assert emitted[0] == [TOK["a"], TOK["b"], TOK["</"], TOK["think"], TOK[">"]]
    assert tti.rows[0].forced_positions == [3, 4] and not tti.rows[0].in_think


def test_prompt_that_only_mentions_the_tag_does_not_open_a_span():
    tti = text_tti(budget=0)
    prompt = [TOK["<"], TOK["think"], TOK[">"], TOK["a"]]  # "<think>a": the tag is not at the end
    tti.start([prompt])
    assert not tti.rows[0].in_think
    assert tti.observe(0, 0.0) is None


def test_tiny_tokenizer_variants(tiny_model):
    _, tokenizer = tiny_model
    tti = ThinkingIntervention.from_tokenizer(tokenizer, budget=None, patience=None)
    tti.start([tokenizer.encode("Answer:", add_special_tokens=False)])
    text = " <think> a plan\n</think><action>up</action>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    states = []
    for token in ids:
        tti.observe(0, 0.0)
        tti.advance(0, token)
        states.append(tti.rows[0].in_think)
    assert any(states) and not states[-1]
    pieces = vocabulary_text(tokenizer)
    opened = states.index(True)
    assert "".join(pieces[t] for t in ids[: opened + 1]).endswith("<think>")


def test_relative_tolerance_is_a_fraction_of_the_rows_noise_floor():
    """eps_floor: stagnant when |M_t - M_{t-1}| <= eps_floor x median(the row's earlier changes), once K are seen.
    M = 0, 1, 0, 1, 0.5, 0.45, 0.44, 0.43 with eps_floor 0.3, K = 3, by hand:
      t1..t3 change by 1 with fewer than 3 earlier changes: never stagnant (changes [1, 1, 1]);
      t4: change 0.5 > 0.3 x median 1: not stagnant; t5: 0.05 <= 0.3 x median([1, 1, 1, 0.5]) = 0.3: stagnant 1;
      t6: 0.01 <= 0.3 x 1: stagnant 2; t7: 0.01 <= 0.3 x median([.01, .05, .5, 1, 1, 1]) = 0.225: stagnant 3
      -> the end tag is forced at t7.
    The absolute eps 1e-4 (the paper's) never sees a 0.01 step as stagnant."""
    ms = [0.0, 1.0, 0.0, 1.0, 0.5, 0.45, 0.44, 0.43, 0.42]
    relative = id_tti(patience=3, eps_floor=0.3)
    relative.start([[START]])
    run(relative, [[(m, WORD)] for m in ms])
    assert relative.rows[0].forced_positions == [7, 8]
    assert relative.rows[0].triggers == {"budget": 0, "stagnation": 1, "random": 0}
    absolute = id_tti(patience=3, eps=1e-4)
    absolute.start([[START]])
    run(absolute, [[(m, WORD)] for m in ms])
    assert absolute.rows[0].forced_positions == []
    with pytest.raises(ValueError, match="eps_floor"):
        id_tti(eps_floor=0.0)


def test_random_truncation_control_ends_thinking_at_its_rate_at_random_positions():
    """random_rate: each think token ends the span with that probability, whatever M_t does (cause "random");
    the same seed repeats the positions, another seed moves them."""
    def spans(seed, rate=0.1, rows=400, steps=30):
        tti = id_tti(patience=None, random_rate=rate, seed=seed)
        tti.start([[START]] * rows)
        run(tti, [[(0.5, WORD)] * rows for _ in range(steps)])  # constant M: the stagnation rule would fire
        return tti

    tti = spans(0)
    first = [row.forced_positions[0] if row.forced_positions else None for row in tti.rows]
    triggered = [p for p in first if p is not None]
    assert all(row.triggers["stagnation"] == 0 and row.triggers["random"] <= 1 for row in tti.rows)
    # P(span ended within 30 tokens) = 1 - 0.9^30 = 0.958; the first position is geometric: mean 1/0.1 - 1 = 9 tokens
    assert abs(len(triggered) / 400 - 0.958) < 0.03 and 6.5 < np.mean(triggered) < 11
    assert first == [row.forced_positions[0] if row.forced_positions else None for row in spans(0).rows]
    assert first != [row.forced_positions[0] if row.forced_positions else None for row in spans(1).rows]
    assert not any(row.forced_positions for row in spans(0, rate=0.0).rows)
    with pytest.raises(ValueError, match="random_rate"):
        id_tti(random_rate=1.5)
