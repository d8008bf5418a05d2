"""reward.py: extraction, benchmark metrics pinned to hand-computed values, guards vs. hacks, right-answer variants,
batches, CLI. Each hack test is named after the trick it blocks and checks the honest answer is still paid."""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
from dataclasses import replace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402
from reward import (  # noqa: E402
    Config, exact_match, extract_answer, hotpot_f1, longbench_dataset_score, longbench_score, math_equal,
    normalize_answer, normalize_final_answer, qa_f1_score, score, score_batch, string_match_all,
    string_match_part,
)

D = Config()
T = "<think>Let me read the passages again.</think>\n"  # the prompt prefills <think>; a complete reply closes it
PUBLIC = replace(D, qa_rule="public")
PASSAGES = [{"role": "user", "content": "Passage 1: Barack Obama was born in Honolulu. Passage 2: Cities: Paris, "
                                        "London. The city of Paris lies on the Seine."}]  # a row's prompt, for phrases


def qa(*answers, kind="qa"):
    return {"id": "q", "source": "hotpotqa", "kind": kind, "answers": list(answers)}


def ruler(*answers):
    return {"id": "r", "source": "ruler", "kind": "ruler", "answers": list(answers)}


def math_row(*answers):
    return {"id": "m", "source": "math_dapo", "kind": "math", "answers": list(answers)}


def choice(letter="C"):
    return {"id": "c", "source": "mmlu", "kind": "choice", "answers": [letter]}


def rr(row, response, cfg=D, finish=None):
    """(reward, rule) of one response."""
    r, d = score(row, response, cfg, finish)
    return r, d["rule"]


def in_thread(fn):
    """Run fn() in a fresh non-main thread; return its result or re-raise its exception here."""
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    if "err" in box:
        raise box["err"]
    return box["out"]


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,want", [
    ("so \\boxed{Paris}.", "Paris"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not grouping
    ("\\boxed{\\left\\{ x \\right.} done", "\\left\\{ x \\right."),  # ... even unbalanced ones
    ("\\fbox{B}", "B"),
    ("we get $\\boxed 5$ in total", "5"),  # MATH-style `\boxed x`
    ("\\boxed{London} then \\boxed{Paris}", "Paris"),  # several boxes: the last
    ("<think>maybe \\boxed{London}</think>\\boxed{Paris}", "Paris"),  # boxes while thinking don't count
    ("<think>it is London or Paris</think>  Paris \n", "Paris"),  # answer after </think> only
    ("<think>a</think>b</think> Rome", "Rome"),  # the LAST </think>
    ("blah. The answer is Barack Obama.\nok", "Barack Obama"),  # no box: "the answer is" fallback
    ("The final answer is: (C)", "(C)"),
    ("The answer is London. Wait, no: the answer is Paris.", "Paris"),  # the last one
    ("\\boxed{\\text{New York}}", "New York"),  # formatting is unwrapped
    ("\\boxed{\\textbf{\\text{Oslo}}}", "Oslo"),
    ("\\boxed{\\text{New York}, \\textsc{USA}}", "New York, USA"),  # ... wherever it is
    ("\\boxed{{\\bf Oslo}\\ city}", "Oslo city"),
    ("in \\boxed{} form: \\boxed{Paris}", "Paris"),
    ("\\boxed{Paris} and that is \\boxed{}", "Paris"),  # the last NON-EMPTY box
    ("\\boxed{}", ""),
    ("\\boxed{Paris", None),  # truncated mid-box
    ("\\boxed{Paris} then \\boxed{Lon", None),  # the last box is cut
    ("<think>still thinking about \\boxed", None),
    ("no answer here", None),
    ("<think>no close, no box", None),
    ("", None),
    ("\\boxedParis", None),  # not a box command
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_boxes_are_top_level_only():
    assert reward.boxes("\\boxed{London \\boxed{Paris}} x \\fbox{Rome} \\boxedX \\boxed{Cut") == \
        ["London \\boxed{Paris}", "Rome", None]


def test_extract_never_crashes_on_any_string():
    rng = random.Random(0)
    atoms = ["\\boxed", "\\fbox", "{", "}", "\\{", "\\}", "\\", "$", "</think>", "<think>", " ", "\n", "a", "The answer is",
             "Answer:", "é", "\x00", "😀", "yes", "no", "(C)", ",", " or ", "\\text{", "=", "1234567", "’s"]
    rows = [qa("Paris"), ruler("1", "2"), choice("C"), math_row("\\frac{1}{2}")]
    for _ in range(3000):
        s = "".join(rng.choices(atoms, k=rng.randint(0, 12)))
        got = extract_answer(s)
        assert got is None or isinstance(got, str)
        for cfg in (D, PUBLIC):
            r, d = score(rows[_ % 4], s, cfg)
            assert r in (0.0, 1.0) and isinstance(d["rule"], str) and d["rule"]
    for bad in (None, 17, b"\\boxed{x}"):
        assert extract_answer(bad) is None
        assert score(qa("Paris"), bad) == (0.0, {"pred": None, "rule": "no_answer"})


# ----------------------------------------------------------------------------- LongBench / HotpotQA / RULER
@pytest.mark.parametrize("s,want", [
    ("The Beatles!", "beatles"),
    ("an apple a day", "apple day"),
    ("The-Who", "thewho"),  # punctuation goes first, so "the" is glued to "who" and stays
    ("  Hello,   World  ", "hello world"),
    ("ÉCOLE “Noir” café", "école “noir” café"),  # unicode kept: only ASCII punctuation is removed
    ("...!?", ""),
    ("", ""),
])
def test_normalize_answer(s, want):
    assert normalize_answer(s) == want


def test_qa_f1_score_hand_computed():
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1_score("Paris", "paris") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("paris paris", "paris") == pytest.approx(2 / 3)  # Counter: one common token, P = 1/2
    assert qa_f1_score("...", "!!!") == 0.0  # both normalize to nothing: LongBench gives 0, not 1
    assert qa_f1_score("“Paris”", "Paris") == 0.0  # curly quotes are not ASCII punctuation
    assert qa_f1_score("“Paris” France", "Paris France") == 0.5
    assert qa_f1_score("the", "a") == 0.0


def test_longbench_max_over_golds_and_dataset_score():
    # vs "Obama": P = 1/2, R = 1 -> 2/3; vs "Barack Hussein Obama": P = 1, R = 2/3 -> 0.8
    assert longbench_score("Barack Obama", ["Obama", "Barack Hussein Obama"]) == pytest.approx(0.8)
    assert longbench_score("anything", []) == 0.0
    assert longbench_dataset_score(["The cat sat on the mat.", "Paris"], [["a cat on a mat"], ["Paris"]]) == 92.86
    assert longbench_dataset_score(["x", "Paris"], [["y"], ["London", "paris"]]) == 50.0
    assert longbench_dataset_score([], []) == 0.0


def test_exact_match():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("...", "!!") == 1.0  # both empty after normalization


def test_hotpot_f1_yes_no_rule():
    assert hotpot_f1("yes", "yes it is") == 0.0  # pred is "yes" and differs from the gold
    assert qa_f1_score("yes", "yes it is") == 0.5  # LongBench has no such rule: P = 1, R = 1/3
    assert hotpot_f1("no way", "no") == 0.0
    assert qa_f1_score("no way", "no") == pytest.approx(2 / 3)
    assert hotpot_f1("No.", "no") == 1.0
    assert hotpot_f1("noanswer", "Paris") == 0.0
    assert hotpot_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)


def test_ruler_string_match():
    preds = ["The values are 123 and 456.", "789", "nothing"]
    refs = [["123", "456", "999"], ["789"], ["1"]]
    assert string_match_all(preds, refs) == 55.56  # (2/3 + 1 + 0) / 3 * 100
    assert string_match_part(preds, refs) == 66.67  # (1 + 1 + 0) / 3 * 100
    assert string_match_all(["KEY abc"], [["abc", "key"]]) == 100.0  # case-insensitive
    assert string_match_all(["x"], [[]]) == 0.0 and string_match_part(["x"], [[]]) == 0.0  # empty golds
    assert string_match_all([], []) == 0.0


# ----------------------------------------------------------------------------- QA rewards
def test_qa_metrics_differ_as_defined():
    row = qa("Paris, France")
    assert rr(row, T + "\\boxed{Paris}", replace(D, qa_metric="substring")) == (0.0, "substring")  # gold not inside
    assert score(row, T + "\\boxed{Paris}") == (1.0, {"pred": "Paris", "rule": "sub_em"})  # pred inside gold
    assert rr(row, T + "\\boxed{paris france}", replace(D, qa_metric="em")) == (1.0, "em")
    assert rr(row, T + "\\boxed{Paris}", replace(D, qa_metric="em")) == (0.0, "em")
    assert score(qa("a cat on a mat"), T + "\\boxed{The cat sat on the mat}", replace(D, qa_metric="f1"))[0] == \
        pytest.approx(6 / 7)
    assert rr(qa("yes it is"), T + "\\boxed{yes}", replace(D, qa_metric="hotpot_f1")) == (0.0, "hotpot_f1")
    assert score(qa("Paris"), "<think>hmm</think>\n\\boxed{\\text{Paris}}") == (1.0, {"pred": "Paris", "rule": "sub_em"})
    assert rr(qa("Paris"), "<think>x</think> Paris") == (1.0, "sub_em")  # answer after </think> only
    assert rr(qa("Paris", kind="keychain"), T + "\\boxed{The city of Paris}") == (1.0, "sub_em")
    assert score(qa("Paris"), T + "\\boxed{London}") == (0.0, {"pred": "London", "rule": "sub_em"})
    with pytest.raises(ValueError):
        score(qa("Paris"), T + "\\boxed{Paris}", replace(D, qa_metric="bleu"))
    with pytest.raises(ValueError):
        score(qa("Paris"), T + "\\boxed{Paris}", replace(D, qa_rule="lenient"))
    with pytest.raises(ValueError):
        score({"kind": "essay", "answers": ["x"]}, T + "\\boxed{x}")


def test_empty_golds():
    assert score(qa(), T + "\\boxed{Paris}") == (0.0, {"pred": "Paris", "rule": "no_gold"})
    # a gold that normalizes to "" is inside every string: never a free reward, in either rule
    assert rr(qa("The"), T + "\\boxed{Paris}") == (0.0, "no_gold")
    assert rr(qa("The"), T + "\\boxed{Paris}", PUBLIC) == (0.0, "no_gold")
    assert rr(ruler(), T + "\\boxed{1}") == (0.0, "no_gold")
    assert rr(math_row(), T + "\\boxed{1}") == (0.0, "no_gold")
    assert rr({"kind": "qa"}, T + "\\boxed{x}") == (0.0, "no_gold")  # no answers field at all


def test_answers_may_be_a_bare_string():
    assert score({"kind": "qa", "answers": "Paris"}, T + "\\boxed{Paris}")[0] == 1.0


# ----------------------------------------------------------------------------- hacks from issue 11: each pays 0
def test_blocks_two_answers_box_and_answer_line():
    # math grades the box when there is one, never the "Answer:" line as a second chance
    hack = T + "Answer: 7\n\\boxed{5}"
    assert rr(math_row("7"), hack) == (0.0, "math_wrong")
    assert rr(math_row("5"), hack) == (1.0, "minerva")  # the one graded answer is the box
    assert rr(math_row("7"), T + "Answer: 7") == (1.0, "minerva")  # the line alone is still read (DAPO)


def test_blocks_two_answers_box_and_answer_phrase():
    hack = T + "So \\boxed{5}. Hmm, the answer: 7"
    assert rr(math_row("7"), hack) == (0.0, "math_wrong")
    assert rr(math_row("5"), hack) == (1.0, "minerva")


def test_blocks_equation_right_side():
    assert rr(math_row("5"), T + "\\boxed{7=5}") == (0.0, "equation")  # Minerva kept "5", math-verify Eq(7, 5)
    assert rr(math_row("5"), T + "\\boxed{x = 5}") == (1.0, "minerva")  # one "var = value" is a value


def test_blocks_two_solutions_in_one_box():
    assert rr(math_row("5"), T + "\\boxed{x = 3 \\text{ or } x = 5}") == (0.0, "alternatives")
    assert rr(math_row("5"), T + "\\boxed{x=3, x=5}") == (0.0, "equation")


def test_blocks_stop_word_inside_gold():
    assert rr(qa("Bank of America"), T + "\\boxed{of}") == (0.0, "fragment")
    assert rr(qa("Bank of America"), T + "\\boxed{Bank of America}") == (1.0, "sub_em")


def test_blocks_conjunction_word_inside_gold():
    assert rr(qa("Simon and Garfunkel"), T + "\\boxed{and}") == (0.0, "fragment")
    assert rr(qa("Simon and Garfunkel"), T + "\\boxed{Simon and Garfunkel}") == (1.0, "sub_em")


def test_blocks_lone_number_inside_gold():
    assert rr(qa("1 December 2010"), T + "\\boxed{1}") == (0.0, "fragment")
    assert rr(qa("1 December 2010"), T + "\\boxed{2010}") == (0.0, "fragment")  # 1 of 3 content words
    assert rr(qa("1 December 2010"), T + "\\boxed{December 2010}") == (1.0, "sub_em")  # 2 of 3: a substantial part


def test_blocks_first_name_fragment():
    assert rr(qa("John Fitzgerald Kennedy"), T + "\\boxed{John}") == (0.0, "fragment")
    assert rr(qa("John Fitzgerald Kennedy"), T + "\\boxed{Fitzgerald Kennedy}") == (1.0, "sub_em")


def test_blocks_comma_list():
    hack = T + "\\boxed{Paris, London, Berlin, Rome}"
    for gold in ("Paris", "Rome"):
        assert rr(qa(gold), hack) == (0.0, "list")
    assert rr(qa("Paris, London, Berlin"), T + "\\boxed{Paris, London, Berlin}") == (1.0, "sub_em")  # gold is a list


def test_blocks_or_alternatives():
    for gold in ("Paris", "London"):
        assert rr(qa(gold), T + "\\boxed{Paris or London}") == (0.0, "alternatives")
    assert rr(qa("War or Peace"), T + "\\boxed{War or Peace}") == (1.0, "sub_em")  # the gold's own "or"


def test_blocks_negation():
    assert rr(qa("Paris"), T + "\\boxed{not Paris}") == (0.0, "negation")
    assert rr(qa("Paris"), T + "\\boxed{Paris, not London}") == (0.0, "negation")
    assert rr(qa("No Country for Old Men"), T + "\\boxed{No Country for Old Men}") == (1.0, "sub_em")


def test_blocks_or_alternatives_in_answer_phrase():
    assert rr(qa("London"), T + "The answer is Paris or London.") == (0.0, "alternatives")
    assert rr(qa("London"), T + "The answer is London.") == (1.0, "sub_em")


def test_blocks_bare_list_after_think():
    assert rr(qa("Rome"), T + "Paris\nLondon\nBerlin\nRome") == (0.0, "list")
    assert rr(qa("Rome"), T + "Paris London Berlin Rome Madrid") == (0.0, "extra_words")
    assert rr(qa("Rome"), T + "Rome") == (1.0, "sub_em")


def test_blocks_response_without_think_close():
    cut = "<think>maybe \\boxed{Paris} hmm... Lond"
    assert score(qa("Paris"), cut) == (0.0, {"pred": "Paris", "rule": "no_think"})
    assert rr(qa("Paris"), "\\boxed{Paris}") == (0.0, "no_think")  # no reasoning block closed: drafts only


def test_blocks_math_without_think_close():
    assert rr(math_row("5"), "<think>so x is \\boxed{5} unless Answer: 5 is wrong, let me") == (0.0, "no_think")
    assert rr(math_row("5"), "<think>so x is 5</think>\\boxed{5}") == (1.0, "minerva")


def test_blocks_two_choice_letters():
    assert rr(choice("A"), T + "\\boxed{A) or B)}") == (0.0, "choice_unparsed")
    assert rr(choice("B"), T + "\\boxed{A) or B)}") == (0.0, "choice_unparsed")
    assert rr(choice("A"), T + "\\boxed{A)}") == (1.0, "choice")


def test_blocks_ruler_distractor_values():
    row = ruler("1234567", "7654321")
    assert rr(row, T + "\\boxed{1234567, 7654321, 5550123, 8881234}") == (0.0, "extra_values")
    assert rr(row, T + "\\boxed{1234567, 7654321}") == (1.0, "ruler_all")


def test_blocks_ruler_glued_values():
    row = ruler("1234567", "7654321")
    assert rr(row, T + "\\boxed{12345677654321}") == (0.0, "ruler_all")
    assert rr(row, T + "\\boxed{12345677654321}", PUBLIC)[0] == 0.0  # the QA rule does not change RULER


def test_blocks_empty_answer_in_public_rule():
    for empty in ("\\boxed{}", "\\boxed{the}", "\\boxed{...}"):
        assert rr(qa("Paris"), T + empty, PUBLIC) == (0.0, "empty")  # "" is inside every gold
        assert rr(qa("Paris"), T + empty) == (0.0, "empty")
    assert rr(qa("Paris"), T + "\\boxed{The city of Paris}", PUBLIC) == (1.0, "public")


def test_public_rule_is_one_way_and_unguarded():
    assert rr(qa("Paris, France"), T + "\\boxed{Paris}", PUBLIC) == (0.0, "public")  # answer inside gold: no
    assert rr(qa("Paris"), T + "\\boxed{Paris or London}", PUBLIC) == (1.0, "public")  # no guards at all
    assert rr(qa("Paris"), T + "\\boxed{London} \\boxed{Paris}", PUBLIC) == (1.0, "public")  # the last box
    assert rr(qa("Art"), T + "\\boxed{Cartoon}", PUBLIC) == (1.0, "public")  # character substring, as published
    assert rr(qa("Paris"), "\\boxed{Paris}", PUBLIC) == (0.0, "no_think")  # extraction rules stay


def test_blocks_cut_at_length_limit():
    done = T + "\\boxed{Paris} and then the model kept going without an end of"
    assert rr(qa("Paris"), done) == (1.0, "sub_em")
    assert score(qa("Paris"), done, finish="length") == (0.0, {"pred": "Paris", "rule": "length"})
    assert rr(math_row("5"), T + "\\boxed{5}", finish="length") == (0.0, "length")
    assert rr(qa("Paris"), done, finish="stop") == (1.0, "sub_em")


# ----------------------------------------------------------------------------- right answers from issue 11: each pays 1
def test_accepts_text_wrapper_with_period():
    assert rr(qa("Paris"), T + "\\boxed{\\text{Paris}.}") == (1.0, "sub_em")


def test_accepts_city_with_country_qualifier():
    assert rr(qa("New York"), T + "\\boxed{\\text{New York}, \\text{USA}}") == (1.0, "sub_em")


def test_accepts_textsc_wrapper():
    assert rr(qa("Paris"), T + "\\boxed{\\textsc{Paris}}") == (1.0, "sub_em")


def test_accepts_text_wrapper_with_parenthetical():
    assert rr(qa("Paris"), T + "\\boxed{\\text{Paris} (France)}") == (1.0, "sub_em")


def test_accepts_same_box_written_twice():
    assert rr(qa("Paris"), T + "\\boxed{Paris}. To repeat: \\boxed{Paris}") == (1.0, "sub_em")
    assert rr(qa("Paris"), T + "\\boxed{Paris} \\boxed{\\text{paris}.}") == (1.0, "sub_em")  # same answer, other dress
    assert rr(math_row("5"), T + "\\boxed{5} so \\boxed{5}") == (1.0, "minerva")


def test_accepts_empty_box_in_format_talk():
    assert rr(qa("Paris"), T + "I will answer in \\boxed{} form: \\boxed{Paris}") == (1.0, "sub_em")


def test_accepts_ruler_values_over_two_boxes():
    row = ruler("1234567", "7654321")
    assert rr(row, T + "\\boxed{1234567} and \\boxed{7654321}") == (1.0, "ruler_all")
    assert rr(row, T + "\\boxed{1234567} and \\boxed{1234567}") == (0.0, "ruler_all")  # every gold, still


def test_accepts_option_word_before_letter():
    assert rr(choice("C"), T + "\\boxed{Option C}") == (1.0, "choice")
    assert rr(choice("C"), T + "\\boxed{option (C)}") == (1.0, "choice")


def test_accepts_digit_for_number_word():
    assert rr(qa("three"), T + "\\boxed{3}") == (1.0, "sub_em")
    assert rr(qa("3"), T + "\\boxed{three}") == (1.0, "sub_em")
    assert rr(qa("Twenty"), T + "\\boxed{20}") == (1.0, "sub_em")


def test_accepts_missing_accents():
    assert rr(qa("São Paulo"), T + "\\boxed{Sao Paulo}") == (1.0, "sub_em")
    assert rr(qa("Sao Paulo"), T + "\\boxed{São Paulo}") == (1.0, "sub_em")


def test_accepts_hyphens_for_spaces():
    assert rr(qa("rock and roll"), T + "\\boxed{rock-and-roll}") == (1.0, "sub_em")
    assert rr(qa("rock-and-roll"), T + "\\boxed{Rock and roll}") == (1.0, "sub_em")


def test_accepts_curly_apostrophes():
    assert rr(qa("O'Neill"), T + "\\boxed{O’Neill}") == (1.0, "sub_em")
    assert rr(qa("“Hey Jude”"), T + "\\boxed{\"Hey Jude\"}") == (1.0, "sub_em")


def test_accepts_possessive():
    assert rr(qa("Sony"), T + "\\boxed{Sony's}") == (1.0, "sub_em")
    assert rr(qa("Sony"), T + "\\boxed{Sony’s}") == (1.0, "sub_em")


def test_accepts_en_dash_range_for_year():
    assert rr(qa("1998"), T + "\\boxed{1998–99}") == (1.0, "sub_em")
    assert rr(qa("1999"), T + "\\boxed{1998–1999}") == (0.0, "extra_words")  # a range is its start, not a hedge


# ----------------------------------------------------------------------------- more hacks: each pays 0
def test_blocks_slash_alternatives():
    assert rr(qa("Paris"), T + "\\boxed{Paris/London}") == (0.0, "alternatives")
    assert rr(qa("Paris"), T + "\\boxed{Paris and/or London}") == (0.0, "alternatives")
    assert rr(qa("AC/DC"), T + "\\boxed{AC/DC}") == (1.0, "sub_em")  # the gold's own slash


def test_blocks_either_or():
    assert rr(qa("Paris"), T + "\\boxed{either Paris or London}") == (0.0, "alternatives")
    assert rr(qa("Paris"), T + "\\boxed{Paris vs London}") == (0.0, "alternatives")


def test_blocks_and_joined_candidates():
    assert rr(qa("Paris"), T + "\\boxed{Paris and London}") == (0.0, "conjunction")
    assert rr(qa("Paris"), T + "\\boxed{Paris & London}") == (0.0, "conjunction")


def test_blocks_neither_nor():
    assert rr(qa("Paris"), T + "\\boxed{neither London nor Paris}") == (0.0, "negation")


def test_blocks_yes_and_no():
    assert rr(qa("yes"), T + "\\boxed{yes no}") == (0.0, "yes_no")
    assert rr(qa("no"), T + "\\boxed{Yes or no}") == (0.0, "yes_no")
    assert rr(qa("yes and no"), T + "\\boxed{Yes and no}") == (1.0, "sub_em")  # the gold has both


def test_blocks_semicolon_and_line_lists():
    assert rr(qa("Rome"), T + "\\boxed{Paris; London; Rome}") == (0.0, "list")
    assert rr(qa("Rome"), T + "The answer is Paris; London; Rome") == (0.0, "list")


def test_blocks_gold_hidden_after_comma():
    # one comma: the head is the answer, so a second candidate after it never pays
    assert rr(qa("London"), T + "\\boxed{Paris, London}") == (0.0, "sub_em")
    assert rr(qa("Paris"), T + "\\boxed{Paris, London}") == (1.0, "sub_em")  # no better than "Paris" alone


def test_blocks_gold_hidden_in_parenthetical():
    assert rr(qa("Paris"), T + "\\boxed{London (Paris)}") == (0.0, "sub_em")
    assert rr(qa("Paris"), T + "\\boxed{London [or Paris]}") == (0.0, "alternatives")


def test_blocks_box_inside_box():
    assert rr(qa("Paris"), T + "\\boxed{London \\boxed{Paris}}") == (0.0, "multi_box")


def test_blocks_two_different_boxes():
    assert score(qa("Paris"), T + "\\boxed{London} or \\boxed{Paris}") == \
        (0.0, {"pred": "Paris", "rule": "multi_box"})
    assert rr(math_row("5"), T + "\\boxed{3} or \\boxed{5}") == (0.0, "multi_box")
    assert rr(choice("C"), T + "\\boxed{B} \\boxed{C}") == (0.0, "multi_box")


def test_blocks_braces_sets():
    assert rr(qa("Paris"), T + "\\boxed{{London}, {Paris}}") == (0.0, "braces")
    assert rr(qa("Paris"), T + "\\boxed{\\{Paris\\}}") == (0.0, "braces")


def test_blocks_long_enumeration():
    cities = ["London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin", "Athens",
              "Warsaw", "Brussels", "Helsinki", "Budapest", "Bern", "Sofia", "Riga", "Tallinn", "Paris"]
    hack = " ".join(cities + ["Bucharest"])  # Paris is in it, but so is every other capital
    assert len(hack) == 139 and rr(qa("Paris"), T + "\\boxed{" + hack + "}") == (0.0, "too_long")  # > 5 + 128
    # the slack is over the LONGEST gold: 5 + 128 = 133 characters pass the length rule, 134 do not
    ok, long = "Paris " + "y" * 127, "Paris " + "y" * 128
    assert (len(ok), len(long)) == (133, 134)
    assert rr(qa("Paris"), T + f"\\boxed{{{ok}}}") == (1.0, "sub_em")
    assert rr(qa("Paris"), T + f"\\boxed{{{long}}}") == (0.0, "too_long")
    assert rr(qa("Paris", "Paris" + "z" * 10), T + f"\\boxed{{{long}}}") == (1.0, "sub_em")


def test_blocks_single_letter_inside_gold():
    assert rr(qa("Paris, France"), T + "\\boxed{e}") == (0.0, "sub_em")  # whole words only
    assert rr(qa("Art"), T + "\\boxed{Cartoon Network}") == (0.0, "sub_em")


def test_blocks_surname_of_long_name():
    assert rr(qa("John Fitzgerald Kennedy"), T + "\\boxed{Kennedy}") == (0.0, "fragment")
    assert rr(qa("Barack Obama"), T + "\\boxed{Obama}") == (1.0, "sub_em")  # half of two words is substantial


def test_blocks_lone_number_from_a_title():
    assert rr(qa("Apollo 11"), T + "\\boxed{11}") == (0.0, "fragment")
    assert rr(qa("Apollo 11"), T + "\\boxed{Apollo 11}") == (1.0, "sub_em")


def test_blocks_answer_only_inside_think():
    assert rr(qa("Paris"), "<think>\\boxed{Paris}</think> I am unsure.") == (0.0, "sub_em")
    assert rr(math_row("5"), "<think>Answer: 5</think>") == (0.0, "no_answer")


def test_blocks_box_cut_after_think():
    assert rr(qa("Paris"), T + "\\boxed{Par") == (0.0, "no_answer")


def test_blocks_math_logical_or():
    assert rr(math_row("5"), T + "\\boxed{3 \\lor 5}") == (0.0, "alternatives")  # math-verify reads it as 5
    assert rr(math_row("5"), T + "\\boxed{3 \\vee 5}") == (0.0, "alternatives")
    assert rr(math_row("5"), T + "\\boxed{3 \\text{ or } 5}") == (0.0, "alternatives")


def test_blocks_name_joined_by_a_small_word():
    for gold in ("Paris", "London"):
        assert rr(qa(gold), T + "\\boxed{Paris in London}") == (0.0, "extra_words")
        assert rr(qa(gold), T + "\\boxed{London instead of Paris}") == (0.0, "extra_words")


@pytest.mark.parametrize("a,b", [("Paris", "London"), ("Barack Obama", "George Bush"), ("1998", "2005"),
                                 ("three", "four"), ("New York", "Los Angeles"), ("3", "4")])
@pytest.mark.parametrize("messages", [None, PASSAGES])
def test_no_answer_is_right_for_two_different_golds(a, b, messages):
    # the invariant behind every hedge guard: one response never earns 1 for two unrelated golds
    joins = [" ", ", ", "; ", "\n", " or ", " and ", "/", " & ", " | ", " (", " - ", " vs ", " then ", " in ", " of ",
             " not ", " but ", " maybe ", " with ", " + ", " i.e. ", " to ", " by ", "'s ", " = ", ": ", " -> ", " ~ ",
             " \\\\ ", "\\, ", " \\text{and} ", " instead of ", " rather than ", "-", "–", " to ", ""]
    wraps = ["\\boxed{%s}", "\\boxed{\\text{%s}.}", "The answer is %s.", "%s", "\\boxed{(%s)}"]
    paid = []
    for j in joins:
        for x, y in ((a, b), (b, a)):
            for w in wraps:
                resp = T + w % (x + j + y + (")" if j == " (" else ""))
                if score(dict(qa(a), messages=messages), resp)[0] and score(dict(qa(b), messages=messages), resp)[0]:
                    paid.append(resp)
    assert paid == []
    assert score(qa(a), T + f"\\boxed{{{a}}}")[0] == score(qa(b), T + f"\\boxed{{{b}}}")[0] == 1.0


def test_blocks_bare_two_name_hedge():
    assert rr(qa("London"), T + "\\boxed{Paris London}") == (0.0, "extra_words")
    assert rr(qa("Paris"), T + "\\boxed{Paris London}") == (0.0, "extra_words")
    assert rr(qa("1999"), T + "\\boxed{1998 1999}") == (0.0, "extra_words")
    assert rr(qa("Paris"), T + "\\boxed{Paris city}") == (1.0, "sub_em")  # a lower-case descriptor is no candidate


@pytest.mark.parametrize("junk", [
    "\\to", "\\rightarrow", "\\Rightarrow", "\\implies", "\\iff", "\\approx", "\\equiv", "\\sim", "\\cong",
    "\\mapsto", "\\in", "\\cap", "\\cup", "\\setminus", "\\mid", "\\circ", "\\hspace{1em}", "\\not", "\\\\",
    "\\cr", "\\hline", "\\therefore", "|", ":", "~", "&", "#", "?", "->", "...", "..", ">>", "\\left.", "\\%",
    "{}", "^{}", "_{}", "\\{", ".", "\\operatorname{x}", "\\right.",
])
def test_blocks_math_verify_reading_one_side(junk):
    # math-verify keeps one side of what it cannot read as one value: "7 \\to 5" would equal 5
    for hack in (f"7 {junk} 5", f"5 {junk} 7", f"{junk} 7 5", f"7 5 {junk}"):
        assert rr(math_row("5"), T + f"\\boxed{{{hack}}}")[0] == 0.0, hack
        assert rr(math_row("5"), T + f"Answer: {hack}")[0] == 0.0, hack


@pytest.mark.parametrize("gold,pred,rule", [
    ("\\frac{1}{2}", "0.5", "math_verify"), ("x^2+1", "1+x^2", "math_verify"), ("50\\%", "50 \\%", "minerva"),
    ("90", "90^\\circ", "minerva"), ("1000", "10^{3}", "math_verify"), ("\\{1,2\\}", "\\{2, 1\\}", "math_verify"),
    ("\\frac{1}{2}", "0.5 \\text{ cm}", "math_verify"), ("120", "5!", "math_verify"), ("2", "\\left( 2 \\right)", "math_verify"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", "minerva"), ("3:4", "3:4", "minerva"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "minerva"),
    ("34", "34.", "minerva"), ("0.5", ".5", "math_verify"), ("\\{1,2\\}", "\\left\\{1,2\\right\\}", "math_verify"),
    ("12", "12 \\text{ inches}", "minerva"), ("7", "7 - 0", "math_verify"),
])
def test_accepts_math_equivalent_forms(gold, pred, rule):
    assert rr(math_row(gold), T + f"\\boxed{{{pred}}}") == (1.0, rule)


def test_blocks_ruler_values_over_many_boxes():
    row = ruler("1234567", "7654321")
    assert rr(row, T + "\\boxed{1234567} \\boxed{7654321} \\boxed{5550123}") == (0.0, "extra_values")
    assert rr(ruler("1234567"), T + "\\boxed{1234567 7654321}") == (0.0, "extra_values")  # multi-key distractor


def test_blocks_ruler_missing_value():
    assert rr(ruler("1234567", "7654321"), T + "\\boxed{1234567}") == (0.0, "ruler_all")
    assert rr(ruler("1234567", "7654321"), T + "1234567 7654321 \\boxed{1234567}") == (0.0, "ruler_all")


def test_blocks_choice_letter_lists():
    for hack in ("\\boxed{A or C}", "\\boxed{A/C}", "\\boxed{AC}", "\\boxed{(A) (C)}", "\\boxed{C) or (A)}"):
        assert rr(choice("C"), T + hack)[0] == 0.0, hack
    assert rr(choice("C"), T + "\\boxed{A cat}") == (0.0, "choice_unparsed")  # a word, not a letter


def test_accepts_hedging_inside_think():
    # hedging inside <think> is thinking; only the final answer is graded (both ways)
    assert rr(qa("Paris"), "<think>Paris or London? Not London.</think>\\boxed{Paris}") == (1.0, "sub_em")


# ----------------------------------------------------------------------------- more right answers: each pays 1
def test_accepts_part_of_a_two_part_gold():
    assert rr(qa("Paris, France"), T + "\\boxed{Paris}") == (1.0, "sub_em")
    assert rr(qa("Springfield, Illinois"), T + "\\boxed{Springfield, Illinois}") == (1.0, "sub_em")


def test_accepts_short_sentence_after_think():
    assert rr(qa("Paris"), T + "It is the city of Paris.") == (1.0, "sub_em")


def test_accepts_longer_name_copied_from_the_passages():
    row = dict(qa("Obama"), messages=PASSAGES)
    assert rr(row, T + "\\boxed{Barack Obama}") == (1.0, "sub_em")
    assert rr(dict(qa("Paris"), messages=PASSAGES), T + "\\boxed{the city of Paris}") == (1.0, "sub_em")
    assert rr(qa("Obama"), T + "\\boxed{Barack Obama}") == (0.0, "extra_words")  # no passages: a name beside it
    assert rr(row, T + "\\boxed{Obama Honolulu}") == (0.0, "extra_words")  # two names, not a phrase there


def test_blocks_lowercase_hedge_against_the_passages():
    # with passages, any word beside the gold must come with it from the text, whatever its case
    for gold in ("Paris", "London"):
        row = dict(qa(gold), messages=PASSAGES)
        assert rr(row, T + "\\boxed{paris london}") == (0.0, "extra_words")  # "Paris, London" is two clauses there
        assert rr(row, T + "\\boxed{paris in london}") == (0.0, "extra_words")
    assert rr(dict(qa("Paris"), messages=PASSAGES), T + "\\boxed{Paris city}") == (0.0, "extra_words")


def test_accepts_thousands_separator():
    assert rr(qa("1000"), T + "\\boxed{1,000}") == (1.0, "sub_em")
    assert rr(qa("12,500 people"), T + "\\boxed{12500 people}") == (1.0, "sub_em")


def test_accepts_ampersand_for_and():
    assert rr(qa("Simon and Garfunkel"), T + "\\boxed{Simon \\& Garfunkel}") == (1.0, "sub_em")
    assert rr(qa("Simon & Garfunkel"), T + "\\boxed{Simon and Garfunkel}") == (1.0, "sub_em")


def test_accepts_bold_and_math_wrappers():
    assert rr(qa("Paris"), T + "\\boxed{\\textbf{Paris}}") == (1.0, "sub_em")
    assert rr(qa("Paris"), T + "\\boxed{{\\bf Paris}}") == (1.0, "sub_em")
    assert rr(qa("Paris"), T + "\\boxed{$\\mathrm{Paris}$}") == (1.0, "sub_em")
    assert rr(qa("New York City"), T + "\\boxed{\\text{New}\\ \\text{York City}}") == (1.0, "sub_em")


def test_accepts_quoted_answer():
    assert rr(qa("Hey Jude"), T + "\\boxed{“Hey Jude”.}") == (1.0, "sub_em")


def test_accepts_apostrophe_dropped():
    assert rr(qa("McDonald's"), T + "\\boxed{McDonalds}") == (1.0, "sub_em")
    assert rr(qa("McDonalds"), T + "\\boxed{McDonald's}") == (1.0, "sub_em")


def test_accepts_fullwidth_letters():
    assert rr(qa("Paris"), T + "\\boxed{Ｐａｒｉｓ}") == (1.0, "sub_em")  # NFKD folds compatibility forms


def test_accepts_accents_in_gold_only_with_em():
    assert rr(qa("Zürich"), T + "\\boxed{Zurich}", replace(D, qa_metric="em")) == (1.0, "em")


def test_accepts_choice_letter_forms():
    for form in ("C", "(C)", "C)", "C.", "c", "C) 12 km", "C. 12", "\\text{(C)}", "Option: C", "(C) salt and pepper"):
        assert rr(choice("C"), T + f"\\boxed{{{form}}}") == (1.0, "choice"), form
        assert rr(choice("(C)"), T + f"\\boxed{{{form}}}") == (1.0, "choice"), form
    assert rr(choice("C"), T + "The answer is (C).") == (1.0, "choice")
    assert rr(choice("C"), T + "\\boxed{(B) 12 km}") == (0.0, "choice")


def test_accepts_math_function_definition():
    assert rr(math_row("2x+1"), T + "\\boxed{f(x) = 2x+1}") == (1.0, "minerva")
    assert rr(math_row("7"), T + "\\boxed{a_1 = 7}") == (1.0, "minerva")


def test_accepts_math_gold_that_is_an_equation():
    assert rr(math_row("y = 2x + 3"), T + "\\boxed{y = 2x + 3}") == (1.0, "minerva")


def test_accepts_ruler_thousands_separators():
    assert rr(ruler("1234567", "7654321"), T + "\\boxed{1,234,567 and 7,654,321}") == (1.0, "ruler_all")


def test_accepts_ruler_sentence_and_numbered_list():
    row = ruler("1234567", "7654321")
    assert rr(row, T + "\\boxed{The special magic numbers for dusky-harbor are 7654321 and 1234567.}") == \
        (1.0, "ruler_all")
    assert rr(row, T + "\\boxed{1. 1234567 2. 7654321}") == (1.0, "ruler_all")
    assert rr(ruler("amber", "lunar"), T + "\\boxed{The special magic words are amber and lunar}") == \
        (1.0, "ruler_all")
    assert rr(ruler("amber", "lunar"), T + "\\boxed{amber, lunar, opal}") == (0.0, "extra_values")


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("s,want", [
    ("\\frac12", "\\frac{1}{2}"), ("1,000", "1000"), ("\\$1,000", "1000"), ("x = 34", "34"),
    ("90^\\circ", "90"), ("5 \\text{ cm}", "5"), ("\\text{(B)}", "(B)"), ("\\sqrt2", "\\sqrt{2}"),
    ("The final answer is $\\boxed{5}$", "5"), ("12 students", "12"),
])
def test_normalize_final_answer(s, want):
    assert normalize_final_answer(s) == want


def test_math_rewards():
    half = {"kind": "math", "answers": ["\\frac{1}{2}"]}
    assert score({"kind": "math", "answers": ["34"]}, T + "work...\nAnswer: 34") == (1.0, {"pred": "34", "rule": "minerva"})
    assert score(half, T + "\\boxed{\\frac12}") == (1.0, {"pred": "\\frac12", "rule": "minerva"})
    assert score(half, "<think>...</think>\\boxed{0.5}") == (1.0, {"pred": "0.5", "rule": "math_verify"})
    assert normalize_final_answer("0.5") != normalize_final_answer("\\frac{1}{2}")  # only math-verify sees it
    assert score(half, T + "Answer: 1/2")[1]["rule"] == "math_verify"
    assert score(half, T + "\\boxed{\\frac{1}{3}}") == (0.0, {"pred": "\\frac{1}{3}", "rule": "math_wrong"})
    assert score(half, T + "I give up") == (0.0, {"pred": None, "rule": "no_answer"})
    assert score(half, T + "\\boxed{" + "1/2 " * 60 + "}")[1]["rule"] == "too_long"
    assert math_equal("x + 1", "1 + x") and not math_equal("2", "3")


def test_math_verify_needs_the_thread_fix():
    from math_verify import parse

    with pytest.raises(ValueError, match="thread"):  # the premise: its default timeouts use SIGALRM
        in_thread(lambda: parse("\\boxed{7/8}"))
    half = {"kind": "math", "answers": ["\\frac{3}{4}"]}
    assert in_thread(lambda: score(half, T + "\\boxed{0.75}")) == (1.0, {"pred": "0.75", "rule": "math_verify"})
    assert in_thread(lambda: math_equal("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"))


# ----------------------------------------------------------------------------- batches
def mixed_batch():
    rng = random.Random(1)
    rows, responses = [], []
    for i in range(120):
        k = i % 5
        if k == 0:
            rows.append(qa("Paris", "Paris, France"))
            responses.append(rng.choice([T + "\\boxed{Paris}", T + "\\boxed{}", "<think>x</think>London",
                                         T + "\\boxed{a}\\boxed{b}", "<think>\\boxed{Paris}"]))
        elif k == 1:
            rows.append(qa("Barack Obama", kind="keychain"))
            responses.append(rng.choice([T + "The answer is Obama.", T + "\\boxed{Barack Obama}", T + "nothing"]))
        elif k == 2:
            rows.append({"kind": "ruler", "answers": ["123", "456"]})
            responses.append(rng.choice([T + "\\boxed{123 456}", T + "\\boxed{123}", T + "\\boxed{123 456 789}"]))
        elif k == 3:
            rows.append({"kind": "choice", "answers": ["B"], "messages": [{"role": "user", "content": "x" * 10_000}]})
            responses.append(rng.choice([T + "\\boxed{(B)}", T + "\\boxed{A}"]))
        else:
            a, b = rng.randint(1, 9), rng.randint(2, 9)
            rows.append({"id": i, "kind": "math", "answers": [f"\\frac{{{a}}}{{{b}}}"]})
            responses.append(T + rng.choice([f"\\boxed{{{a / b:.6f}}}", f"Answer: {a}/{b}", f"\\boxed{{{a + 1}}}"]))
    finish = [rng.choice(["stop"] * 4 + ["length"]) for _ in rows]
    return rows, responses, finish


def test_score_batch_equals_loop_of_score_through_the_pool():
    rows, responses, finish = mixed_batch()
    want = [score(r, t, D, f) for r, t, f in zip(rows, responses, finish)]  # inline, main thread
    got = score_batch(rows, responses, replace(D, pool_min=2), workers=2, finish=finish)  # math rows in workers
    assert reward._pool is not None, "the pool path must actually run"
    assert got == want
    rules = {d["rule"] for _, d in want}
    assert sum(r for r, _ in want) > 20 and rules >= {"math_verify", "multi_box", "empty", "length", "no_think",
                                                      "extra_values"}
    assert all(d["rule"] == "length" for (_, d), f in zip(want, finish) if f == "length")
    assert score_batch(rows, responses, workers=1, finish=finish) == want
    assert score_batch(rows, responses, workers=1) == [score(r, t) for r, t in zip(rows, responses)]
    assert score_batch([], []) == []
    with pytest.raises(ValueError):
        score_batch(rows, responses[:-1])
    with pytest.raises(ValueError):
        score_batch(rows, responses, finish=finish[:-1])


def test_close_pool_ends_its_workers_and_a_new_pool_starts():
    """grpo.py leaves by os._exit on gloo: close_pool must end the workers, or they outlive the run."""
    rows, responses, finish = mixed_batch()
    cfg = replace(D, pool_min=2)
    want = score_batch(rows, responses, cfg, workers=2, finish=finish)
    workers = list(reward._pool[1]._processes.values())
    assert workers and all(p.is_alive() for p in workers)
    reward.close_pool()
    assert reward._pool is None and not any(p.is_alive() for p in workers)
    assert score_batch(rows, responses, cfg, workers=2, finish=finish) == want  # the next batch starts a new pool
    assert reward._pool is not None


def test_score_batch_from_a_worker_thread():
    rows, responses, finish = mixed_batch()
    want = [score(r, t, D, f) for r, t, f in zip(rows, responses, finish)]
    reward._mv_parse.cache_clear()  # make the thread parse for itself, without signals
    assert in_thread(lambda: score_batch(rows, responses, workers=1, finish=finish)) == want  # inline in the thread
    assert in_thread(lambda: score_batch(rows, responses, replace(D, pool_min=2), workers=2, finish=finish)) == want


# ----------------------------------------------------------------------------- command line
def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_cli_table_and_errors(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"id": "a", "source": "hotpotqa", "kind": "keychain", "answers": ["Paris"]},
        {"id": "b", "source": "musique", "kind": "qa", "answers": ["Rome"]},
        {"id": "c", "source": "math_dapo", "kind": "math", "answers": ["34"]},
    ])
    resp = write_jsonl(tmp_path / "resp.jsonl", [
        {"id": "a", "response": T + "\\boxed{Paris}"}, {"id": "a", "response": T + "\\boxed{Lyon}"},
        {"id": "b", "response": T + "\\boxed{Rome}", "finish": "stop"}, {"id": "c", "response": T + "Answer: 34"},
        {"id": "b", "response": T + "\\boxed{Rome}", "finish": "length"},
    ])
    out = tmp_path / "scored.jsonl"
    reward.main([f"--rows={rows}", f"--responses={resp}", f"--out={out}"])
    lines = capsys.readouterr().out.splitlines()
    table = {tuple(l.split()[:2]): l.split()[2:] for l in lines[1:-1]}
    assert table[("hotpotqa", "keychain")] == ["2", "0.5000"]
    assert table[("musique", "qa")] == ["2", "0.5000"]  # the second one was cut at the length limit
    assert table[("math_dapo", "math")] == ["1", "1.0000"]
    assert table[("all", "5")] == ["0.6000"]
    assert [json.loads(l)["reward"] for l in out.read_text().splitlines()] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert json.loads(out.read_text().splitlines()[-1])["rule"] == "length"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "response": "x"}, {"id": "zzz", "response": "x"}])
    with pytest.raises(SystemExit) as e:
        reward.main([f"--rows={rows}", f"--responses={bad}"])
    assert "bad.jsonl: record 1" in str(e.value) and "'zzz'" in str(e.value)
    nores = write_jsonl(tmp_path / "nores.jsonl", [{"id": "a"}])
    with pytest.raises(SystemExit, match="nores.jsonl: record 0"):
        reward.main([f"--rows={rows}", f"--responses={nores}"])
    with pytest.raises(SystemExit, match="--qa_rule must be one of"):
        reward.main([f"--rows={rows}", f"--responses={resp}", "--qa_rule=loose"])


def test_cli_help():
    p = subprocess.run([sys.executable, "reward.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--qa_metric='sub_em'" in p.stdout and "--max_answer_chars=128" in p.stdout
    assert "--qa_rule='guarded'" in p.stdout and "--guards" not in p.stdout


# ----------------------------------------------------------------------------- issue 23: rows with passages
# Three invented worlds written as keychain.py writes rows ("Passage N:\nTitle\nText", then the question), each holding
# the ambiguous-entity kinds: two regions sharing a word, an "X of Y" name, a name with a generic head beside other
# names with that head, a lifespan, "A in northern B", "<year> by <founder>", two studios in one clause, a short name
# inside a longer one, a full name then its surname, a title and a middle initial.
from keychain import KEYCHAIN_PROMPT, QA_PROMPT, chat, doc_text, insert_pairs, make_chains, passages  # noqa: E402

VANDRIA = [
    ("Marrowby City", "Marrowby City is a city in Vandria. It is one of the larger settlements of Vandria."),
    ("Dunber City", "Dunber City is a city in Ostrelia. A quiet exhibition about Dunber City toured for 9 years."),
    ("Bank of Vandria", "The Bank of Vandria is a bank founded in 1794 by Ansel Kerrow. Its seat is in Marrowby City."),
    ("Vandria", "Vandria is a country. Its capital is Marrowby City."),
    ("Tollen", "Tollen is a town in northern Vandria. It lies on the Sarn River."),
    ("Ostrel Films", "Ostrel Films is a production company. It was founded by Dr. Ada K. Morrow in Tollen."),
    ("Brisk Pictures", "Brisk Pictures is a production company based in Dunber City."),
    ("Tesselvor Studios", "Tesselvor Studios is a production company founded in 1950."),
    ("The Polist", "The Polist is a film released in 1954. It was produced by Ostrel Films with Brisk Pictures."),
    ("The Polist II", "The Polist II is a film released in 1961, the sequel to The Polist."),
    ("Selsa Nezel", "Selsa Nezel (1903–1971) was a filmmaker. Nezel was born on 5 June 1903 in Tollen in northern "
                    "Vandria."),
    ("South Korea", "South Korea is a country in East Asia. It borders North Korea."),
    ("North Korea", "North Korea is a country in East Asia."),
    ("Ireland", "Ireland is an island in the North Atlantic. Its largest city is Dublin."),
    ("Northern Ireland", "Northern Ireland is part of the United Kingdom, on the island of Ireland."),
    ("York", "York is a cathedral city in England."),
    ("New York", "New York is the most populous city in the United States."),
    ("Barack Obama", "Barack Obama was the 44th president of the United States. Obama was born in Honolulu."),
]
ORLAN = [
    ("Kestrel Valley", "Kestrel Valley is a valley in West Orlan. Kestrel Valley was settled in 1820."),
    ("West Orlan", "West Orlan is a province. It borders East Orlan."),
    ("East Orlan", "East Orlan is a province on the coast."),
    ("University of Pellam", "The University of Pellam was founded in 1881 by Mira Soltane."),
    ("Pellam", "Pellam is a town in eastern Orlan, the region both provinces are named after."),
    ("Greater Pellam", "Greater Pellam is the metropolitan area around Pellam."),
    ("Corvane Records", "Corvane Records is a record label founded by Prof. Lio T. Dask."),
    ("Halden Records", "Halden Records is a label based in Pellam."),
    ("Lio Dask", "Lio T. Dask (1911–1988) was a musician born on 3 March 1911 in Pellam in eastern Orlan."),
    ("The Ember Road", "The Ember Road is a 1966 novel. It was published by Corvane Records with Halden Records."),
    ("The Ember Road Returns", "The Ember Road Returns is a 1971 novel, the sequel to The Ember Road."),
    ("Mira Soltane", "Mira Soltane was a novelist and the founder of a university. Soltane was born in Pellam."),
]
OSK = [
    ("Lake Varn", "Lake Varn is a lake in the Osk highlands. The Varn River drains Lake Varn."),
    ("Varn River", "The Varn River is a river that flows into the Hessel Sea."),
    ("Varn", "Varn is a town on the shore of the lake, founded in 1712."),
    ("Osk County", "Osk County is a county whose seat is Brell."),
    ("Hale & Dorne", "Hale & Dorne is a publishing house founded in 1899 by Tomas Hale and Ivo Dorne."),
    ("Kira Vell", "Dame Kira A. Vell (12 May 1931 – 4 April 2002) was a novelist. Vell lived in Brell."),
    ("Night of the Vale", "Night of the Vale is a 1958 novel by Kira Vell, published by Hale & Dorne."),
    ("Night of the Vale Returns", "Night of the Vale Returns is its 1963 sequel."),
    ("Brell", "Brell is a town in Osk County. Greater Brell has 40,000 people."),
    ("Juno Pictures", "Juno Pictures is a studio in Brell. It adapted Night of the Vale in 1960."),
    ("Arden Pictures", "Arden Pictures is a studio in Varn."),
]


def world_row(world, *golds, kind="qa", seed=0):
    """A training-like row over the world's passages (shuffled); kind=keychain also hides UUID chains in them."""
    docs = [doc_text(t, b) for t, b in world]
    random.Random(seed).shuffle(docs)
    context = passages(docs)
    if kind == "keychain":
        rng = random.Random(seed)
        start, pairs = make_chains(rng, ["Which country is Tollen in?", "Who founded Corvane Records?"], 4, "uuid")
        user = KEYCHAIN_PROMPT.format(context=insert_pairs(context, pairs, rng), start_key=start)
    else:
        user = QA_PROMPT.format(context=context, question="Which one is it?")
    return {"id": "w", "source": "hotpotqa", "kind": kind, "answers": list(golds), "messages": chat(user)}


def paid(world, gold, answer):
    """(reward, rule) of a boxed answer on rows of the world: QA and KeyChain rows, two passage orders, all agree."""
    got = {rr(world_row(world, gold, kind=k, seed=s), T + f"\\boxed{{{answer}}}") for k in ("qa", "keychain")
           for s in (0, 1)}
    assert len(got) == 1, (gold, answer, got)
    return got.pop()


@pytest.mark.parametrize("world,gold,hack,right", [
    (VANDRIA, "Marrowby City", "City", "Marrowby"), (VANDRIA, "Marrowby City", "the city", "Marrowby City"),
    (VANDRIA, "Dunber City", "city", "Dunber"), (VANDRIA, "Ostrel Films", "Films", "Ostrel"),
    (VANDRIA, "Tesselvor Studios", "Studios", "Tesselvor"), (ORLAN, "Kestrel Valley", "Valley", "Kestrel"),
    (ORLAN, "Corvane Records", "Records", "Corvane"), (ORLAN, "Corvane Records", "the label", "Corvane Records"),
    (OSK, "Lake Varn", "Lake", "Lake Varn"), (OSK, "Osk County", "County", "Osk County"),
    (OSK, "Juno Pictures", "Pictures", "Juno"), (OSK, "Hessel Sea", "Sea", "the Hessel Sea"),
])
def test_blocks_generic_head_word(world, gold, hack, right):
    assert paid(world, gold, hack)[0] == 0.0
    assert paid(world, gold, hack)[1] in ("generic", "ambiguous", "sub_em")
    assert paid(world, gold, right) == (1.0, "sub_em")


@pytest.mark.parametrize("world,gold,hack,rule,right", [
    (VANDRIA, "South Korea", "Korea", "ambiguous", "South Korea"), (VANDRIA, "North Korea", "North", "ambiguous", None),
    (VANDRIA, "Bank of Vandria", "Vandria", "fragment", "the Bank of Vandria"),
    (VANDRIA, "Bank of Vandria", "Bank", "fragment", None), (ORLAN, "West Orlan", "Orlan", "ambiguous", "West Orlan"),
    (ORLAN, "University of Pellam", "Pellam", "fragment", "University of Pellam"),
    (OSK, "Lake Varn", "Varn", "ambiguous", None), (OSK, "Varn River", "Varn", "ambiguous", "the Varn River"),
    (OSK, "Osk County", "Osk", "ambiguous", None), (OSK, "Hale & Dorne", "Hale", "fragment", "Hale and Dorne"),
])
def test_blocks_part_naming_another_entity(world, gold, hack, rule, right):
    assert paid(world, gold, hack) == (0.0, rule)
    if right:
        assert paid(world, gold, right) == (1.0, "sub_em")


@pytest.mark.parametrize("world,span,golds", [
    (VANDRIA, "(1903–1971)", ["1903", "1971"]), (VANDRIA, "1903-1971", ["1903", "1971"]),
    (VANDRIA, "Tollen in northern Vandria", ["Tollen", "Vandria"]),
    (VANDRIA, "1794 by Ansel Kerrow", ["1794", "Ansel Kerrow"]),
    (VANDRIA, "Ostrel Films with Brisk Pictures", ["Ostrel Films", "Brisk Pictures"]),
    (ORLAN, "(1911–1988)", ["1911", "1988"]), (ORLAN, "Pellam in eastern Orlan", ["Pellam", "Orlan"]),
    (ORLAN, "1881 by Mira Soltane", ["1881", "Mira Soltane"]),
    (ORLAN, "Corvane Records with Halden Records", ["Corvane Records", "Halden Records"]),
    (OSK, "12 May 1931 – 4 April 2002", ["12 May 1931", "4 April 2002"]),
    (OSK, "Brell in Osk County", ["Brell", "Osk County"]),
    (OSK, "1899 by Tomas Hale", ["1899", "Tomas Hale"]),
])
def test_blocks_one_copied_span_holding_two_candidates(world, span, golds):
    for gold in golds:  # copied verbatim from the passages, and still refused for either candidate
        assert paid(world, gold, span) == (0.0, "extra_words"), gold
        assert paid(world, gold, gold) == (1.0, "sub_em")


def test_accepts_descriptors_copied_from_the_passages():
    assert paid(VANDRIA, "Vandria", "northern Vandria") == (1.0, "sub_em")  # a lower-case word is no candidate
    assert paid(VANDRIA, "Marrowby City", "the city Marrowby City") == (0.0, "extra_words")  # not a phrase there
    assert paid(ORLAN, "Pellam", "the metropolitan area around Pellam")[0] == 0.0  # 3 words beside it


@pytest.mark.parametrize("world,gold,longer", [
    (VANDRIA, "Ireland", "Northern Ireland"), (VANDRIA, "York", "New York"), (VANDRIA, "The Polist", "The Polist II"),
    (ORLAN, "Pellam", "Greater Pellam"), (ORLAN, "The Ember Road", "The Ember Road Returns"),
    (OSK, "Brell", "Greater Brell"),  # its capital shows only at a sentence start
    (OSK, "Night of the Vale", "Night of the Vale Returns"),
])
def test_blocks_longer_name_holding_the_gold(world, gold, longer):
    assert paid(world, gold, longer) == (0.0, "longer_name")
    assert rr(qa(gold), T + f"\\boxed{{{longer}}}") == (0.0, "extra_words")  # without passages: a name beside it


@pytest.mark.parametrize("world,short,full", [(VANDRIA, "Obama", "Barack Obama"), (ORLAN, "Soltane", "Mira Soltane"),
                                              (VANDRIA, "Nezel", "Selsa Nezel"), (OSK, "Vell", "Kira Vell")])
def test_accepts_full_name_of_a_short_gold_and_the_reverse(world, short, full):
    assert paid(world, short, full) == (1.0, "sub_em")  # the passages use the short name after the full one
    assert paid(world, full, short) == (1.0, "sub_em")


@pytest.mark.parametrize("world,gold,answers", [
    (VANDRIA, "Ada Morrow", ["Ada K. Morrow", "Dr. Ada Morrow", "Dr. Ada K. Morrow", "ada k. morrow", "Ada K Morrow"]),
    (VANDRIA, "Ada K. Morrow", ["Ada Morrow", "Dr. Ada K. Morrow"]),
    (ORLAN, "Lio Dask", ["Prof. Lio T. Dask", "Professor Lio Dask", "Lio T. Dask"]),
    (ORLAN, "Prof. Lio T. Dask", ["Lio Dask"]),
    (OSK, "Kira Vell", ["Dame Kira Vell", "Kira A. Vell", "Dame Kira A. Vell", "Kira Vell (novelist)"]),
])
def test_accepts_name_without_middle_initial_or_title(world, gold, answers):
    for answer in answers:
        assert paid(world, gold, answer) == (1.0, "sub_em"), answer
    assert paid(world, gold, "Ada Morrow Lio Dask")[0] == 0.0
    assert rr(qa(gold), T + f"\\boxed{{{answers[0]}}}") == (1.0, "sub_em")  # no passages needed


@pytest.mark.parametrize("gold,right,wrong", [
    ("5 June 1903", ["June 5, 1903", "1903-06-05", "5th June 1903", "the 5th of June, 1903", "Friday, June 5, 1903",
                     "5 Jun 1903", "1903/06/05", "05.06.1903", "June 1903"],
     ["June 6, 1903", "5 June 1904", "June 5–6, 1903", "1903", "June", "05/06/1903", "June 5, 1903 or June 6, 1903"]),
    ("March 3, 1911", ["3 March 1911", "1911-03-03", "3rd March 1911", "March 3rd, 1911", "3 March"],
     ["4 March 1911", "1911-03-04", "March 3, 1912", "March 3, 1911, 1912 and 1913", "1911"]),
    ("1911", ["3 March 1911", "March 1911"], ["3 March 1912"]),
])
def test_accepts_dates_in_any_written_form(gold, right, wrong):
    row = world_row(ORLAN, gold)
    for answer in right:
        assert rr(row, T + f"\\boxed{{{answer}}}") == (1.0, "sub_em"), answer
        assert rr(qa(gold), T + f"The answer is {answer}") == (1.0, "sub_em"), answer
    for answer in wrong:
        assert rr(row, T + f"\\boxed{{{answer}}}")[0] == 0.0, answer
    assert rr(qa("1 December 2010"), T + "\\boxed{December 1, 2010}", replace(D, qa_metric="em")) == (1.0, "em")
    assert rr(qa("1 December 2010"), T + "\\boxed{December 2010}", replace(D, qa_metric="em")) == (0.0, "date")


def test_benchmark_metrics_read_names_and_dates_as_given():
    # titles, initials and dates are the training reward's equivalences, never the benchmarks' metrics
    for gold, pred in (("Dr. Ada K. Morrow", "Ada Morrow"), ("5 June 1903", "1903-06-05")):
        for metric, fn in (("f1", qa_f1_score), ("hotpot_f1", hotpot_f1)):
            assert score(qa(gold), T + f"\\boxed{{{pred}}}", replace(D, qa_metric=metric))[0] == fn(pred, gold) < 1
        assert rr(qa(gold), T + f"\\boxed{{{pred}}}") == (1.0, "sub_em")


def test_generated_data_pays_no_head_word_and_no_two_golds():
    # the project's own data (keychain.generate_raw): every city gold ends in "City"; no head word or hedge pays
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        items = json.load(open(reward_world(tmp)))
    cities = 0
    for it in items:
        docs = [doc_text(t, "".join(s)) for t, s in it["context"]]
        user = QA_PROMPT.format(context=passages(docs), question=it["question"])
        row = {"id": it["_id"], "kind": "keychain", "answers": [it["answer"]], "messages": chat(user)}
        gold = it["answer"]
        assert rr(row, T + f"\\boxed{{{gold}}}") == (1.0, "sub_em")
        if gold.endswith(" City"):
            cities += 1
            assert rr(row, T + "\\boxed{City}")[0] == 0.0 and rr(row, T + "\\boxed{the city}")[0] == 0.0, gold
            assert rr(row, T + f"\\boxed{{{gold[:-5]}}}") == (1.0, "sub_em"), gold
        others = [t for t, _ in it["context"] if t != gold and not t.startswith("The ")][:3]
        for other in others:
            for join in (" in ", " ", " with ", " by ", ", ", " of "):
                resp = T + f"\\boxed{{{gold}{join}{other}}}"
                both = score(row, resp)[0] and score(dict(row, answers=[other]), resp)[0]
                assert not both, resp
    assert cities >= 20


def reward_world(tmp):
    from keychain import generate_raw

    return generate_raw(tmp, n=200, seed=3)["hotpotqa"]


@pytest.mark.parametrize("gold,hack", [("1234567", "1234567 76\u200b54321"), ("1234567", "1234567 765 4321"),
                                       ("1234567", "1234567 7\u20096\u20095\u20094\u20093\u20092\u20091"),
                                       ("1234567", "1234567 7 6 5 4 3 2 1"), ("amber", "amber lu\u200bnar")])
def test_blocks_ruler_value_hidden_by_odd_characters(gold, hack):
    assert rr(ruler(gold), T + f"\\boxed{{{hack}}}") == (0.0, "extra_values")
    assert rr(ruler(gold), T + f"\\boxed{{{gold}\u200b}}") == (1.0, "ruler_all")
    assert rr(ruler("1234567", "7654321"), T + "\\boxed{1. 1234567\u00a02. 7654321}") == (1.0, "ruler_all")
    assert rr(qa("Paris"), T + "\\boxed{Par\u200bis}") == (1.0, "sub_em")


def choice_row(letter="C"):
    options = "(A) 10 km\n(B) 15 km\n(C) 12 km\n(D) 120 km\n(E) the U.S. mile"
    return {"id": "c", "kind": "choice", "answers": [letter],
            "messages": chat(f"Question: How far is it?\nChoices:{options}")}


@pytest.mark.parametrize("hack", ["A. B. C. D.", "C. D.", "A: 12 km; B: 15 km", "C: 12 km; B: 15 km",
                                  "C) 12 km or 15 km", "C. 12 km, 15 km", "C) 10 km", "C (also B.)"])
def test_blocks_choice_letter_and_option_lists(hack):
    assert rr(choice_row("C"), T + f"\\boxed{{{hack}}}")[0] == 0.0
    assert rr(choice_row("A"), T + f"\\boxed{{{hack}}}")[0] == 0.0
    for right in ("C", "C) 12 km", "(C) 12", "Option C: 12 km", "C. 12 km."):
        assert rr(choice_row("C"), T + f"\\boxed{{{right}}}") == (1.0, "choice"), right
    assert rr(choice_row("E"), T + "\\boxed{E. the U.S. mile}") == (1.0, "choice")


@pytest.mark.parametrize("gold,hack,rule", [
    ("3", "3\\%", "percent"), ("0.03", "3\\%", "percent"), ("30", "30 \\text{ percent}", "percent"),
    ("43_5", "43_7", "base"), ("43_{5}", "43_{8}", "base"), ("23", "43_5", "base"), ("26", "1A_{16}", "base"),
])
def test_blocks_math_percent_and_wrong_base(gold, hack, rule):
    assert rr(math_row(gold), T + f"\\boxed{{{hack}}}") == (0.0, rule)
    assert rr(math_row(gold), T + f"\\boxed{{{gold}}}") == (1.0, "minerva")


@pytest.mark.parametrize("gold,pred", [
    ("90", "90\\degree"), ("90", "90°"), ("90", "90^{\\circ}"), ("90^\\circ", "90"), ("1000", "1\\,000"),
    ("1000000", "1\\,000\\,000"), ("1000", "1 000"), ("1000", "1~000"), ("12\\%", "12\\%"), ("43_5", "43_{5}"),
    ("43", "43_{10}"),
])
def test_accepts_math_degrees_thin_spaces_and_bases(gold, pred):
    assert rr(math_row(gold), T + f"\\boxed{{{pred}}}")[0] == 1.0
    assert rr(math_row("12"), T + "\\boxed{12\\,000}")[0] == 0.0  # a digit group makes another number


@pytest.mark.parametrize("world", [VANDRIA, ORLAN])
def test_no_answer_is_right_for_two_entities_of_the_passages(world):
    # the invariant behind every rule of this issue, over every pair of names the passages give
    names = [t for t, _ in world] + ["1903", "1971", "1794", "1911", "1988", "1881"]
    joins = [" ", " in ", " in northern ", " in eastern ", " by ", " with ", " of ", "–", " (", "'s "]
    rows = {g: world_row(world, g) for g in names}
    paid_both = []
    for a, b in itertools.permutations(names, 2):
        for j in joins:
            resp = T + f"\\boxed{{{a}{j}{b}{')' if j == ' (' else ''}}}"
            if score(rows[a], resp)[0] and score(rows[b], resp)[0]:
                paid_both.append(resp)
    assert paid_both == []


def test_passage_reading_equals_a_full_scan():
    # Passages.find reads only the passages holding the phrase's longest word; the old full scan reads all of them
    row = world_row(VANDRIA + ORLAN, "x", kind="keychain")
    text = row["messages"][1]["content"]
    ps = reward.Passages(text)
    text = re.sub(r"Passage \d+:", "\n", reward._bare_name(text))
    full = " \0 ".join(reward._norm(c) for c in re.split(r"[,;:!?()\[\]\n]|\.(?!\S)", text))
    words = [w for w in full.split() if w != "\0"]
    rng = random.Random(0)
    phrases = {" ".join(words[i:i + rng.randint(1, 4)]) for i in rng.sample(range(len(words) - 4), 300)}
    phrases |= {"obama honolulu", "city of vandria", "new york", "marrowby city", "1794 by ansel kerrow", "east asia"}
    for p in phrases:
        assert (next(ps.find(p), None) is not None) == (f" {p} " in f" {full} "), p
    assert ps.is_name("vandria") and not ps.is_name("city") and ps.is_common("films") and not ps.is_common("marrowby")


def test_passage_words_are_norm_words():
    # the passages' tokenizer keeps each word's case but must write the words _norm writes
    rng = random.Random(0)
    atoms = ["Sony's", "SONY'S", "rock-and-roll", "1,000", "three", "The", "AN", "U.S.", "O'Neill", "&", "São", "3.5",
             "Zürich", "“Hey”", "x_y", "a/b", "Twenty", "e.g", "–", "McDonald's", "co-op", "#1"]
    for _ in range(500):
        s = " ".join(rng.choices(atoms, k=rng.randint(1, 6)))
        assert reward._tokens(s)[0] == reward._norm(s).split(), s


def test_passage_rules_never_crash_on_any_answer():
    rng = random.Random(0)
    atoms = ["City", "city", "Vandria", "Korea", "North", "of", "in northern", "1903", "–", "(", ")", "Dr.", "K.", "by",
             "with", "June", "5", ",", "Ada", "Morrow", "the", "Ireland", "Obama", "Barack", "II", "Films", "O'Neill",
             "three", "1,000", "São", "\u200b", "Passage 2:", "\n", "Varn", "Lake", "&", "’s", "e.g.", "St."]
    rows = [world_row(w, g, kind=k) for w, g in ((VANDRIA, "Marrowby City"), (VANDRIA, "5 June 1903"),
                                                  (OSK, "Kira Vell"), (ORLAN, "Bank of Vandria")) for k in ("qa", "keychain")]
    for i in range(1500):
        answer = " ".join(rng.choices(atoms, k=rng.randint(1, 6)))
        r, d = score(rows[i % len(rows)], T + f"\\boxed{{{answer}}}")
        assert r in (0.0, 1.0) and d["rule"], answer
