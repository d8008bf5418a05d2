"""reward.py: extraction, benchmark metrics pinned to hand-computed values, guards vs. hacks, batches, CLI."""
from __future__ import annotations

import json
import os
import random
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


def qa(*answers, kind="qa"):
    return {"id": "q", "source": "hotpotqa", "kind": kind, "answers": list(answers)}


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
    ("\\boxed{\\text{New York}}", "New York"),  # formatting around the whole answer is unwrapped
    ("\\boxed{\\textbf{\\text{Oslo}}}", "Oslo"),
    ("\\boxed{}", ""),
    ("\\boxed{Paris", None),  # truncated mid-box
    ("<think>still thinking about \\boxed", None),
    ("no answer here", None),
    ("<think>no close, no box", None),
    ("", None),
    ("\\boxedParis", None),  # not a box command
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_never_crashes_on_any_string():
    rng = random.Random(0)
    atoms = ["\\boxed", "\\fbox", "{", "}", "\\{", "\\}", "\\", "$", "</think>", "<think>", " ", "\n", "a", "The answer is",
             "Answer:", "é", "\x00", "😀", "yes", "no", "(C)"]
    rows = [qa("Paris"), qa("1", "2", kind="ruler"), {"kind": "choice", "answers": ["C"]},
            {"kind": "math", "answers": ["\\frac{1}{2}"]}]
    for _ in range(3000):
        s = "".join(rng.choices(atoms, k=rng.randint(0, 12)))
        got = extract_answer(s)
        assert got is None or isinstance(got, str)
        r, d = score(rows[_ % 4], s)
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
    assert score(row, "\\boxed{Paris}", replace(D, qa_metric="substring"))[0] == 0.0  # gold not inside pred
    assert score(row, "\\boxed{Paris}") == (1.0, {"pred": "Paris", "rule": "sub_em"})  # pred inside gold
    assert score(row, "\\boxed{paris france}", replace(D, qa_metric="em"))[0] == 1.0
    assert score(row, "\\boxed{Paris}", replace(D, qa_metric="em"))[0] == 0.0
    assert score(qa("a cat on a mat"), "\\boxed{The cat sat on the mat}", replace(D, qa_metric="f1"))[0] == \
        pytest.approx(6 / 7)
    assert score(qa("yes it is"), "\\boxed{yes}", replace(D, qa_metric="hotpot_f1"))[0] == 0.0
    assert score(qa("Paris"), "<think>hmm</think>\n\\boxed{\\text{Paris}}") == (1.0, {"pred": "Paris", "rule": "sub_em"})
    assert score(qa("Paris"), "<think>x</think> Paris")[0] == 1.0  # answer after </think> only
    assert score(qa("Paris", kind="keychain"), "\\boxed{The city of Paris}")[0] == 1.0
    assert score(qa("Paris"), "\\boxed{London}") == (0.0, {"pred": "London", "rule": "sub_em"})
    with pytest.raises(ValueError):
        score(qa("Paris"), "\\boxed{Paris}", replace(D, qa_metric="bleu"))


def test_empty_golds():
    assert score(qa(), "\\boxed{Paris}") == (0.0, {"pred": "Paris", "rule": "no_gold"})
    # a gold that normalizes to "" is inside every string: never a free reward
    assert score(qa("The"), "\\boxed{Paris}", replace(D, guards=False)) == (0.0, {"pred": "Paris", "rule": "no_gold"})
    assert score({"kind": "ruler", "answers": []}, "\\boxed{1}")[1]["rule"] == "no_gold"
    assert score({"kind": "math", "answers": []}, "\\boxed{1}")[1]["rule"] == "no_gold"
    assert score({"kind": "qa"}, "\\boxed{x}")[1]["rule"] == "no_gold"  # no answers field at all


def test_answers_may_be_a_bare_string():
    assert score({"kind": "qa", "answers": "Paris"}, "\\boxed{Paris}")[0] == 1.0


# Each guard: the hack is rewarded with that guard off, and that guard alone turns it into 0. `also` lists
# other guards that catch the same hack and are switched off on both sides, so the guard under test is alone.
@pytest.mark.parametrize("flag,also,row,response,metric,rule", [
    ("guard_empty", ["whole_words"], qa("Paris"), "\\boxed{}", "sub_em", "empty"),  # "" is inside every gold
    ("guard_empty", ["whole_words"], qa("Paris"), "\\boxed{ the . }", "sub_em", "empty"),  # normalizes to ""
    ("guard_multi_box", [], qa("Paris"), "\\boxed{London} or \\boxed{Paris}", "sub_em", "multi_box"),
    ("guard_multi_box", ["guard_braces"], qa("Paris"), "\\boxed{London \\boxed{Paris}}", "sub_em", "multi_box"),
    ("guard_braces", [], qa("Paris"), "\\boxed{{London}, {Paris}}", "sub_em", "braces"),
    ("guard_yes_no", [], qa("Paris"), "\\boxed{yes no Paris London}", "substring", "yes_no"),
    ("guard_yes_no", [], qa("yes"), "\\boxed{yes no Paris London}", "substring", "yes_no"),
    ("whole_words", [], qa("Paris, France"), "\\boxed{e}", "sub_em", "sub_em"),  # one letter inside the gold
    ("whole_words", [], qa("Art"), "\\boxed{Cartoon Network}", "substring", "substring"),
])
def test_guard_rejects_hack(flag, also, row, response, metric, rule):
    cfg = replace(D, qa_metric=metric, **{f: False for f in also})
    assert score(row, response, replace(cfg, **{flag: False}))[0] == 1.0, "the unguarded rule must reward the hack"
    assert score(row, response, replace(D, qa_metric=metric, guards=False))[0] == 1.0  # the literal public rule
    r, d = score(row, response, cfg)
    assert (r, d["rule"]) == (0.0, rule)
    assert score(row, response, replace(D, qa_metric=metric))[0] == 0.0  # and with every guard on


def test_too_long_guard_enumerating_candidates():
    cities = ["London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin", "Athens",
              "Warsaw", "Brussels", "Helsinki", "Budapest", "Bern", "Sofia", "Riga", "Tallinn", "Paris"]
    hack = "\\boxed{" + ", ".join(cities) + "}"  # 156 characters of candidates
    assert score(qa("Paris"), hack, replace(D, max_answer_chars=-1))[0] == 1.0
    assert score(qa("Paris"), hack) == (0.0, {"pred": ", ".join(cities), "rule": "too_long"})
    # the slack is over the LONGEST gold: 5 + 128 = 133 characters pass, 134 do not
    ok, long = "Paris" + "x" * 0 + " " + "y" * 127, "Paris" + " " + "y" * 128
    assert (len(ok), len(long)) == (133, 134)
    assert score(qa("Paris"), f"\\boxed{{{ok}}}", replace(D, qa_metric="substring"))[0] == 1.0
    assert score(qa("Paris"), f"\\boxed{{{long}}}", replace(D, qa_metric="substring"))[1]["rule"] == "too_long"
    assert score(qa("Paris", "Paris" + "z" * 10), f"\\boxed{{{long}}}", replace(D, qa_metric="substring"))[0] == 1.0


def test_guards_leave_honest_answers_alone():
    assert score(qa("yes and no"), "\\boxed{Yes and no}")[0] == 1.0  # the gold itself has both
    assert score(qa("no"), "\\boxed{No.}")[0] == 1.0
    assert score(qa("Paris"), "<think>\\boxed{London}? no</think>\\boxed{Paris}")[0] == 1.0  # one box after </think>
    assert score(qa("A Tale of Two Cities"), "\\boxed{\\textit{A Tale of Two Cities}}")[0] == 1.0


# ----------------------------------------------------------------------------- ruler, choice
def test_ruler_every_gold_in_the_box():
    row = {"kind": "ruler", "answers": ["1234567", "7654321"]}
    assert score(row, "\\boxed{7654321, 1234567}") == (1.0, {"pred": "7654321, 1234567", "rule": "ruler_all"})
    assert score(row, "\\boxed{1234567}")[0] == 0.0  # one of two: string_match_all 50, reward 0
    assert score(row, "1234567 7654321 \\boxed{1234567}")[0] == 0.0  # outside the box does not count
    spray = "\\boxed{" + " ".join(str(n) for n in range(1234550, 1234570)) + " 7654321}"
    assert score(row, spray, replace(D, guards=False))[0] == 1.0
    assert score(row, spray)[1]["rule"] == "too_long"  # 164 characters > 2 x (7 + 2) + 128


@pytest.mark.parametrize("response,want", [
    ("\\boxed{(C)}", 1.0), ("\\boxed{C}", 1.0), ("\\boxed{C) 12 km}", 1.0), ("\\boxed{C. 12}", 1.0),
    ("\\boxed{c}", 1.0), ("\\boxed{\\text{(C)}}", 1.0), ("The answer is (C).", 1.0),
    ("\\boxed{B}", 0.0), ("\\boxed{(B) 12 km}", 0.0), ("\\boxed{CD}", 0.0), ("\\boxed{A cat}", 0.0),
    ("\\boxed{B} \\boxed{C}", 0.0),  # two boxes
])
def test_choice_letter(response, want):
    assert score({"kind": "choice", "answers": ["C"]}, response)[0] == want
    assert score({"kind": "choice", "answers": ["(C)"]}, response)[0] == want


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
    assert score({"kind": "math", "answers": ["34"]}, "work...\nAnswer: 34") == (1.0, {"pred": "34", "rule": "minerva"})
    assert score(half, "\\boxed{\\frac12}") == (1.0, {"pred": "\\frac12", "rule": "minerva"})
    assert score(half, "<think>...</think>\\boxed{0.5}") == (1.0, {"pred": "0.5", "rule": "math_verify"})
    assert normalize_final_answer("0.5") != normalize_final_answer("\\frac{1}{2}")  # only math-verify sees it
    assert score(half, "Answer: 1/2")[1]["rule"] == "math_verify"
    assert score(half, "\\boxed{\\frac{1}{3}}") == (0.0, {"pred": "\\frac{1}{3}", "rule": "math_wrong"})
    assert score(half, "I give up") == (0.0, {"pred": None, "rule": "no_answer"})
    assert score(half, "\\boxed{" + "1/2 " * 60 + "}")[1]["rule"] == "too_long"
    assert math_equal("x + 1", "1 + x") and not math_equal("2", "3")


def test_math_verify_needs_the_thread_fix():
    from math_verify import parse

    with pytest.raises(ValueError, match="thread"):  # the premise: its default timeouts use SIGALRM
        in_thread(lambda: parse("\\boxed{7/8}"))
    half = {"kind": "math", "answers": ["\\frac{3}{4}"]}
    assert in_thread(lambda: score(half, "\\boxed{0.75}")) == (1.0, {"pred": "0.75", "rule": "math_verify"})
    assert in_thread(lambda: math_equal("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"))


# ----------------------------------------------------------------------------- batches
def mixed_batch():
    rng = random.Random(1)
    rows, responses = [], []
    for i in range(120):
        k = i % 5
        if k == 0:
            rows.append(qa("Paris", "Paris, France"))
            responses.append(rng.choice(["\\boxed{Paris}", "\\boxed{}", "<think>x</think>London", "\\boxed{a}\\boxed{b}"]))
        elif k == 1:
            rows.append(qa("Barack Obama", kind="keychain"))
            responses.append(rng.choice(["The answer is Obama.", "\\boxed{Barack Obama}", "nothing"]))
        elif k == 2:
            rows.append({"kind": "ruler", "answers": ["123", "456"]})
            responses.append(rng.choice(["\\boxed{123 456}", "\\boxed{123}"]))
        elif k == 3:
            rows.append({"kind": "choice", "answers": ["B"], "messages": [{"role": "user", "content": "x" * 10_000}]})
            responses.append(rng.choice(["\\boxed{(B)}", "\\boxed{A}"]))
        else:
            a, b = rng.randint(1, 9), rng.randint(2, 9)
            rows.append({"id": i, "kind": "math", "answers": [f"\\frac{{{a}}}{{{b}}}"]})
            responses.append(rng.choice([f"\\boxed{{{a / b:.6f}}}", f"Answer: {a}/{b}", f"\\boxed{{{a + 1}}}"]))
    return rows, responses


def test_score_batch_equals_loop_of_score_through_the_pool():
    rows, responses = mixed_batch()
    want = [score(r, t) for r, t in zip(rows, responses)]  # inline, main thread
    got = score_batch(rows, responses, replace(D, pool_min=2), workers=2)  # math rows in worker processes
    assert reward._pool is not None, "the pool path must actually run"
    assert got == want
    assert sum(r for r, _ in want) > 20 and {d["rule"] for _, d in want} >= {"math_verify", "multi_box", "empty"}
    assert score_batch(rows, responses, workers=1) == want
    assert score_batch([], []) == []
    with pytest.raises(ValueError):
        score_batch(rows, responses[:-1])


def test_score_batch_from_a_worker_thread():
    rows, responses = mixed_batch()
    want = [score(r, t) for r, t in zip(rows, responses)]
    reward._mv_parse.cache_clear()  # make the thread parse for itself, without signals
    assert in_thread(lambda: score_batch(rows, responses, workers=1)) == want  # inline in the thread
    assert in_thread(lambda: score_batch(rows, responses, replace(D, pool_min=2), workers=2)) == want


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
        {"id": "a", "response": "\\boxed{Paris}"}, {"id": "a", "response": "\\boxed{Lyon}"},
        {"id": "b", "response": "\\boxed{Rome}"}, {"id": "c", "response": "Answer: 34"},
    ])
    out = tmp_path / "scored.jsonl"
    reward.main([f"--rows={rows}", f"--responses={resp}", f"--out={out}"])
    lines = capsys.readouterr().out.splitlines()
    table = {tuple(l.split()[:2]): l.split()[2:] for l in lines[1:-1]}
    assert table[("hotpotqa", "keychain")] == ["2", "0.5000"]
    assert table[("musique", "qa")] == ["1", "1.0000"]
    assert table[("math_dapo", "math")] == ["1", "1.0000"]
    assert table[("all", "4")] == ["0.7500"]
    assert [json.loads(l)["reward"] for l in out.read_text().splitlines()] == [1.0, 0.0, 1.0, 1.0]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "response": "x"}, {"id": "zzz", "response": "x"}])
    with pytest.raises(SystemExit) as e:
        reward.main([f"--rows={rows}", f"--responses={bad}"])
    assert "bad.jsonl: record 1" in str(e.value) and "'zzz'" in str(e.value)
    nores = write_jsonl(tmp_path / "nores.jsonl", [{"id": "a"}])
    with pytest.raises(SystemExit, match="nores.jsonl: record 0"):
        reward.main([f"--rows={rows}", f"--responses={nores}"])


def test_cli_help():
    p = subprocess.run([sys.executable, "reward.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--qa_metric='sub_em'" in p.stdout and "--max_answer_chars=128" in p.stdout
