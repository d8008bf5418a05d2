"""Rule-based rewards and benchmark metrics: every score of the project comes from here (LoongRL, arXiv 2510.19363:
rule-based rewards; the authors' verl fork).

    python reward.py --rows=rows.jsonl --responses=responses.jsonl              # mean reward per source/kind
    python reward.py --rows=rows.jsonl --responses=r.jsonl --qa_metric=f1 --out=scored.jsonl

responses.jsonl holds {"id": <row id>, "response": <text>[, "finish": "stop" | "length"]} lines, several per id.

One final answer is graded. The prompt prefills `<think>`, so a complete response holds `</think>`; the answer is the
last \\boxed{...} / \\fbox{...} / `\\boxed x` after the last </think>; without a box: for math the DAPO "Answer:"
line, for the others the last "the answer is ...", else the whole text after </think>. Rewards by row kind:
keychain, qa -> QA rule (qa_metric: sub_em | substring | em | f1 | hotpot_f1); ruler -> every gold value, nothing
else; choice -> the letter; math -> Minerva normalization (DAPO), then math-verify.

Guards (qa_rule=guarded, the default). The policy optimizes whatever is paid, so each rule below closes a way to
be paid without being right; each scores 0 and names itself in diag["rule"]. Every kind:
  length       the completion hit the token limit (finish="length"): its text is cut, whatever it holds.
  no_think     no </think>: a response cut mid-reasoning ("<think>maybe \\boxed{Paris} hmm... Lond") is drafts.
  multi_box    two different answers after </think> ("\\boxed{London} ... \\boxed{Paris}", a box in a box). Identical
               boxes count once, empty ones ("in \\boxed{} form") not at all; RULER joins its boxes.
  empty        an answer that normalizes to "" ("\\boxed{the}"): "" is inside every gold. Wrong in every mode.
  too_long     longer than the longest gold (ruler: all golds) by over max_answer_chars (128, the authors' strict
               mode): a long enumeration of candidates.
QA (keychain, qa). Only the head is graded: "Paris, London" and "Paris (France)" are Paris, a qualifier earns nothing.
  braces       "{" or "}" left once every \\text-like wrapper is removed ("{London}, {Paris}").
  list         three or more comma / semicolon / line separated items ("Paris, London, Berlin").
  alternatives "or", "either", "vs", "and/or", a slash ("Paris or London", "Paris/London"; math: \\lor, \\vee).
  conjunction  "and" joining candidates ("Paris and London").
  negation     "not Paris", "neither ... nor", "no": says what is not the answer.
  yes_no       both "yes" and "no".
  extra_words  words beside the gold that can be a second answer: a number ("(1903–1971)" for 1903; a shortened
               range end continues its start: "1998–99"), a name the passages use, whatever its case ("Tollen in
               northern Vandria" for either, "1794 by Ansel Kerrow" for the year), any word when the answer is no
               phrase of one clause of the passages ("Paris London"), more than max_extra_words (2) of them.
               Descriptors copied from the passages pay ("the city of Paris"); without passages (evaluation)
               only names and numbers count.
  longer_name  a longer name holding the gold that the passages use as a name of its own ("Northern Ireland" for
               Ireland, "New York" for York, "The Polist II" for The Polist); unless they use the gold only after
               it, as its short form ("Barack Obama ... Obama": "Barack Obama" is right for Obama).
  fragment     a part of the gold covering under half its content words ("John" for "John Fitzgerald Kennedy",
               "1" for "1 December 2010") or one side of its "of" / "and" ("Vandria" for "Bank of Vandria").
  generic      a part made of common words only: the passages use them in lower case ("City" or "the city" for
               "Marrowby City": "a city in"; "Films" where they say "a film"), or an English common noun
               (wonderwords' list: "Studios", "River") that the passages never use alone for the gold.
  ambiguous    a part the passages also use for something else: inside another name ("Korea" for "South Korea"
               beside "North Korea", "Films" beside "Brisk Films") or alone, before or without the gold ("Varn" for
               "Lake Varn" where a passage is about the town of Varn).
  date         another date ("June 6, 1902" for "5 June 1902").
Choice, RULER, math:
  choice_unparsed  no single option letter ("A) or B)", "A/C", "A cat").
  choice_list  a second option after the letter: "A. B. C. D.", "A: 12 km; B: 15 km", another option's text.
  extra_values ruler: a value that is no gold ("1234567 7654321 5550123"), also split by spaces ("765 4321");
               a gold glued to another ("12345677654321") is not found: values are whole tokens.
  equation     math: "=" other than one "var = value" ("7=5": math-verify compares the right side only).
  unverifiable math: a command or sign a value has not ("7 \\to 5", "7 \\hspace{1em} 5", "7 ~ 5") and the gold has
               not, where math-verify would read one side only; Minerva's exact match still decides.
  percent      math: a percent sign the gold has not ("3\\%" for 3: math-verify reads it as 3 and as 0.03).
  base         math: a base subscript the gold has not ("43_7" for "43_5").
(A form a gold itself has is allowed: "Simon and Garfunkel", "yes and no", "Paris, France". QA matches whole
words: character-level, "e" is inside most golds and "art" inside "cartoon".)

Forms that keep right answers right. Every kind: zero-width characters dropped, odd spaces read as spaces. QA:
\\text-like wrappers anywhere (\\text{Paris} (France)), accents (NFKD: "Sao Paulo" = "São Paulo"), curly quotes,
hyphens as spaces ("rock-and-roll"), "&" = "and", possessive 's ("Sony's"), number words zero..twenty ("three" =
"3"), thousands separators, a/an/the; titles and middle initials ("Dr. Ada K. Morrow" = "Ada Morrow"); dates in
any common form, read by dateutil ("June 5, 1902" = "5th June 1902" = "1902-06-05" = "5 June 1902"; a part covering
half the fields, "December 2010", as for words); a part that names the gold ("Marrowby" for "Marrowby City",
"Obama" for "Barack Obama"). Choice: "C", "(C)", "C)", "C. 12 km", "Option C". Math: degree marks (90^\\circ,
90\\degree, 90°), thin-space digit groups ("1\\,000"), "x = 5".

--qa_rule=public: the authors' public QA rule, literally: the normalized gold is a substring of the normalized last
box (no QA guards), except that an empty answer is wrong. length and no_think still apply (they are not about QA);
the other kinds are graded as above.

Benchmark metrics are plain functions with no guards, exactly as the benchmarks define them:
qa_f1_score / longbench_score (LongBench v1), exact_match, hotpot_f1 (HotpotQA's yes/no rule),
string_match_all / string_match_part (RULER), normalize_final_answer (Minerva, as in DAPO).
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import multiprocessing as mp
import os
import re
import string
import sys
import threading
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator

from dateutil import parser as dateparser  # python-dateutil: dates in any written form

from keychain import DataError, parse_config, read_records, write_rows


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # -- data: the command line's files
    rows: str = ""  # CLI: rows .jsonl/.parquet (keychain.py output)
    responses: str = ""  # CLI: {"id", "response"[, "finish"]} .jsonl
    out: str = ""  # CLI: optional .jsonl of {"id", "reward", "pred", "rule"} per response
    # -- reward: the QA metric and the guards' limits
    qa_metric: str = "sub_em"  # sub_em (final runs) | substring (gold in answer) | em | f1 | hotpot_f1
    qa_rule: str = "guarded"  # guarded (the guards listed above) | public (authors' public one-way rule, empty = 0)
    max_answer_chars: int = 128  # too_long slack over the longest gold (authors' strict mode); < 0 disables
    max_extra_words: int = 2  # content words allowed beside the gold ("the city of Paris"); more = a list
    # -- math: math-verify and the process pool that runs it
    math_timeout: int = 5  # seconds per math-verify parse/compare (signal based: main thread only)
    workers: int = 0  # processes for math rows in score_batch; 0 = min(cpu count, 8); 1 = inline
    pool_min: int = 32  # fewer math rows than this are scored inline (pool start-up costs more)
    start_method: str = "forkserver"  # fork is unsafe in a trainer that holds threads (CUDA, tokenizers)


QA_METRICS = ("substring", "sub_em", "em", "f1", "hotpot_f1")
QA_RULES = ("guarded", "public")
KINDS = ("keychain", "qa", "ruler", "choice", "math")
DEFAULT = Config()


# ----------------------------------------------------------------------------- answer extraction
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"(?i)\bthe (?:final |correct )?answer is\s*:?[ \t]*")
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")  # DAPO's math answer line
# formatting commands whose argument is the text itself: removed wherever they are (innermost first)
_WRAPPER = re.compile(r"\\(?:text[a-z]*|math(?:rm|bf|it|sf|tt|normal)|mbox|hbox|emph|underline|operatorname)\s*"
                      r"\{([^{}]*)\}|\{\\(?:bf|it|em|rm|sc|tt|sf)\s+([^{}]*)\}")
_SPACES = re.compile(r"\\[ ,;:!]|~")
_BRACE = re.compile(r"\\.|[{}]", re.S)  # \{ and \} are literal braces, not grouping


def _box(s: str, i: int) -> tuple[str | None, int]:
    """(content, end) of the box whose command ends at s[i]; content None when truncated (unbalanced braces)."""
    j = i
    while j < len(s) and s[j] in " \t":
        j += 1
    if j < len(s) and s[j] == "{":
        depth = 0
        for m in _BRACE.finditer(s, j):
            c = m.group()
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return s[j + 1 : m.start()], m.end()
        return None, len(s)
    if j == i:  # "\boxed5": not a box
        return None, i
    got = s[j:].split("$")[0].split("\n")[0]  # `\boxed x` (MATH style) runs to "$" or the line end
    return got, j + len(got)


def boxes(region: str) -> list[str | None]:
    """Contents of the top-level boxes in order (a box inside a box stays inside its content); None = truncated."""
    out, pos = [], 0
    while m := _BOX.search(region, pos):
        got, pos = _box(region, m.end())
        if got is not None or pos > m.end():  # "\boxed5" is no box at all
            out.append(got)
        pos = max(pos, m.end())
    return out


def unwrap(s: str) -> str:
    """'\\text{New York}, \\textsc{USA}.' -> 'New York, USA.': formatting, wherever it is, is not the answer."""
    s, prev = _SPACES.sub(" ", s), None
    while prev != s:
        prev, s = s, _WRAPPER.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), s)
    return s.replace("$", "").strip()


def _key(s: str) -> str:
    """Two boxes with this key are one answer written twice ("\\boxed{Paris} ... \\boxed{\\text{paris}.}")."""
    return re.sub(r"[\s.,;:!?()]", "", unwrap(s).lower())


def _final(text: str, kind: str | None, join: bool) -> tuple[str | None, str, int]:
    """(answer, how it was found, distinct non-empty boxes) from the text after the last </think>, or from the
    whole text when there is none. join: RULER reads all distinct boxes, the others the last one."""
    k = text.rfind("</think>")
    region = text[k + len("</think>") :] if k >= 0 else text
    clean = str.strip if kind == "math" else unwrap  # math keeps its LaTeX: Minerva strips "\text{ cm}" itself
    found = boxes(region)
    if found:
        if found[-1] is None:  # cut mid-box: no answer
            return None, "none", 0
        seen: dict[str, str] = {}  # key -> the first box written with it
        last = None
        for b in found:
            if b is not None and (key := _key(b)):
                seen.setdefault(key, b)
                last = b
        if last is None:
            return clean(found[-1]), "box", 0
        return (", ".join(map(clean, seen.values())) if join else clean(last)), "box", len(seen)
    if kind == "math":  # DAPO: the box, else the "Answer:" line of the tail; nothing else
        lines = _ANSWER_LINE.findall(region[-300:])
        return (lines[-1].strip(), "answer_line", 0) if lines else (None, "none", 0)
    said = None
    for said in _ANSWER_IS.finditer(region):  # the last one, to the end of its line
        pass
    if said:
        return clean(region[said.end() :].split("\n")[0].strip().rstrip(".")), "answer_is", 0
    if k >= 0 and region.strip():
        return clean(region), "after_think", 0
    return None, "none", 0


def extract_answer(text: str) -> str | None:
    """The model's final answer (the last non-empty box, else "the answer is ...", else the text after </think>);
    None when it gave none. Reads the whole text when there is no </think> (prompts without the think prefill)."""
    return _final(text, None, False)[0] if isinstance(text, str) else None


# ----------------------------------------------------------------------------- benchmark metrics (no guards)
_PUNCT = str.maketrans("", "", string.punctuation)  # ASCII only: LongBench leaves "’" and "“" in place
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """LongBench / SQuAD normalization: lower, drop ASCII punctuation, drop a/an/the, collapse spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def _token_f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:  # also both empty: LongBench scores that 0, not 1
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def qa_f1_score(pred: str, gold: str) -> float:
    """LongBench v1 qa_f1_score for one gold: token F1 of the normalized strings."""
    return _token_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def longbench_score(pred: str, golds: list[str]) -> float:
    """One LongBench QA item: max of qa_f1_score over the golds (0 with no gold)."""
    return max((qa_f1_score(pred, g) for g in golds), default=0.0)


def longbench_dataset_score(preds: list[str], golds: list[list[str]]) -> float:
    """A LongBench dataset's score: 100 x mean item score, rounded to 2 decimals as LongBench prints it."""
    if not preds:
        return 0.0
    return round(100 * sum(longbench_score(p, g) for p, g in zip(preds, golds)) / len(preds), 2)


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def hotpot_f1(pred: str, gold: str) -> float:
    """HotpotQA's official answer F1: 0 when either side is yes/no/noanswer and the two differ."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
        return 0.0
    return _token_f1(p.split(), g.split())


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER: per item the fraction of references found in the prediction (case-insensitive), mean x100."""
    items = [sum(r.lower() in p.lower() for r in rs) / len(rs) if rs else 0.0 for p, rs in zip(preds, refs)]
    return round(100 * sum(items) / len(items), 2) if items else 0.0


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """RULER: per item 1 if any reference is found in the prediction, mean x100."""
    items = [max((float(r.lower() in p.lower()) for r in rs), default=0.0) for p, rs in zip(preds, refs)]
    return round(100 * sum(items) / len(items), 2) if items else 0.0


# ----------------------------------------------------------------------------- math: Minerva normalization
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots"]


def normalize_final_answer(ans: str) -> str:
    """Minerva-style normalization of a final math answer (the rule DAPO's reward uses)."""
    ans = ans.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        ans = ans.replace(old, new)
    for junk in _REMOVED:
        ans = ans.replace(junk, "")
    ans = re.sub(r"^.*?\$(.*?)\$.*$", r"$\1$", ans, flags=re.S)  # keep the first $...$ only
    for cmd in ("text", "textbf", "overline"):
        ans = re.sub(r"\\" + cmd + r"\{(.*?)\}", r"\1", ans)
    ans = re.sub(r"\\boxed\{(.*)\}", r"\1", ans)
    ans = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", ans)  # \frac12 -> \frac{1}{2}
    ans = re.sub(r"sqrt([^{])", r"sqrt{\1}", ans)  # \sqrt2 -> \sqrt{2}
    ans = ans.replace("$", "")
    if ans.replace(",", "").isdigit():
        ans = ans.replace(",", "")
    return ans.strip()


def _mv_timeout(cfg: Config) -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set: elsewhere run without
    # (the too_long guard keeps inputs short, so sympy stays fast).
    return cfg.math_timeout if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _mv_parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse("\\boxed{" + text + "}", parsing_timeout=timeout)


def math_equal(pred: str, gold: str, cfg: Config = DEFAULT) -> bool:
    """math-verify equivalence of two answers ('\\frac{1}{2}' == '0.5'); safe in any thread or process."""
    from math_verify import verify

    t = _mv_timeout(cfg)
    g, p = _mv_parse(gold, t), _mv_parse(pred, t)
    return bool(g and p and verify(g, p, timeout_seconds=t))


# ----------------------------------------------------------------------------- QA: normalization and answer forms
_STOP = frozenset("a an the of and or in on at to for by with from as is are was were be been it its this that "
                  "these those he she they his her their de da di du del la le von van".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_TYPOGRAPHY = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"',
                             "″": '"', "–": "-", "—": "-", "‐": "-", "‑": "-", "‒": "-", "―": "-", "−": "-"})
# characters that hide or join tokens: zero-width ones go, odd spaces become spaces ("1234567\u200b7654321")
_VISIBLE = str.maketrans({**dict.fromkeys("\u200b\u200c\u200d\u2060\u2063\ufeff\u00ad\u180e"),
                          **dict.fromkeys("\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                                          "\u200a\u202f\u205f\u3000\t\r\v\f", " ")})
_THOUSANDS = re.compile(r",(?<=\d,)(?=\d{3}(?!\d))")  # "1,000" -> "1000" (the comma first: a fast scan)
_SEPARATOR = re.compile(r"[;\n]|,(?!\d{3}(?!\d))")  # between items of a list (not a thousands comma)
_PAREN = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")  # "(France)": a qualifier
_POSSESSIVE = re.compile(r"'s\b")
_POSSESSIVE_ANY = re.compile(r"'s\b", re.I)  # text whose case is kept: "SONY'S"
_AS_SPACE = re.compile(r"[-/_]")  # "rock-and-roll" = "rock and roll"
_PUNCT_CHARS = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")  # any punctuation, except a decimal point
_SLASH = re.compile(r"(?<!\d)/|/(?!\d)|\|")  # "Paris/London", "and/or"; "1/2" is a number
_ALTERNATIVES = frozenset({"or", "either", "vs", "versus"})
_NEGATIONS = frozenset("not no never neither nor none nothing nobody cannot cant dont doesnt didnt isnt wasnt arent "
                       "werent wont hasnt havent hadnt".split())
_FORM_RULES = ("yes_no", "alternatives", "list", "conjunction", "negation")  # checked in this order
# titles before a name, and middle initials between two names, are not part of what a name says
_TITLE = re.compile(r"\b(?:(?:Mrs|Mr|Ms|Mx|Dr|Prof|Rev|Hon|Capt|Col|Gen|Lt|Sgt|Maj|Adm|Cmdr|Cpl|Pvt|Det|Insp|Fr"
                    r"|Sen|Gov|Rep|Pres|Mme|Mlle)\.|(?:Mrs|Mr|Ms|Mx|Dr|Prof|Professor|Sir|Dame|Rev|Reverend)\s)"
                    r"\s*(?=[A-Z])|\b(?:mrs|mr|ms|dr|prof)\.\s*(?=[a-z])")
_INITIALS = re.compile(r"\b([A-Z][a-z]+)(?:(?:\s+[A-HJ-UWYZ]\.)+|(?:\s+[A-HJ-UWYZ](?=\s))+)\s*(?=[A-Z][a-z])"
                       r"|\b([a-z]{2,})(?:\s+[a-hj-uwyz]\.)+\s*(?=[a-z]{2})")  # not I, V, X: "World War I. The"


def _forms_of(word: str) -> list[str]:
    """The word and its singular if it is a plural: "cities" -> city, "boxes" -> box, "films" -> film."""
    if word.endswith("ies"):
        return [word, word[:-3] + "y"]
    if word.endswith("es"):
        return [word, word[:-1], word[:-2]]
    return [word, word[:-1]] if word.endswith("s") else [word]


def _fold(s: str) -> str:
    """Accents off (NFKD: "São" -> "Sao"), curly quotes and dashes straightened; case kept."""
    if s.isascii():  # the common case, and the fast one
        return s
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if not unicodedata.combining(c)).translate(_TYPOGRAPHY)


def _plain(s: str) -> str:
    return _fold(s).lower()


def _visible(s: str) -> str:
    return s if s.isascii() else s.translate(_VISIBLE)


@lru_cache(maxsize=65536)
def _bare_name(s: str) -> str:
    """'Dr. Ada K. Morrow' -> 'Ada Morrow': names compare without titles and middle initials."""
    if "." not in s and " " not in s.strip():
        return s
    return _INITIALS.sub(lambda m: (m.group(1) or m.group(2)) + " ", _TITLE.sub("", s))


@lru_cache(maxsize=65536)  # golds repeat G times per prompt, answers repeat within a group
def _norm(s: str, possessive: bool = True) -> str:
    """Reward normalization: _plain, "&" = "and", possessive 's off, hyphens/slashes = spaces, punctuation off,
    a/an/the off, number words zero..twenty as digits. (normalize_answer stays LongBench's, for the metrics.)"""
    s = _plain(s).replace("&", " and ")
    if possessive:
        s = _POSSESSIVE.sub("", s)
    s = _PUNCT_CHARS.sub("", _AS_SPACE.sub(" ", _THOUSANDS.sub("", s)))
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split() if w not in ("a", "an", "the"))


def _norms(s: str) -> set[str]:
    """Both readings of an apostrophe-s: "Sony's" is "Sony", but "McDonald's" is also "McDonalds"."""
    return {_norm(s), _norm(s, possessive=False)} if "'" in s or "’" in s else {_norm(s)}


def _content(s: str) -> list[str]:
    return [w for w in s.split() if w not in _STOP]


def _parts(s: str) -> list[str]:
    """Comma / semicolon / line separated items, parentheticals left out: "Paris (France), Texas" -> 2 items."""
    return [p for p in _SEPARATOR.split(_PAREN.sub(" ", s)) if _norm(p)]


@lru_cache(maxsize=65536)
def _forms(s: str) -> frozenset[str]:
    """The hedging shapes an answer has: yes_no, alternatives, list (3+ items), conjunction, negation."""
    words = set(_norm(s).split())
    out = set()
    if {"yes", "no"} <= words:
        out.add("yes_no")
    if words & _ALTERNATIVES or _SLASH.search(s):
        out.add("alternatives")
    if len(_parts(s)) >= 3:
        out.add("list")
    if "and" in words:
        out.add("conjunction")
    if words & _NEGATIONS:
        out.add("negation")
    return frozenset(out)


def _names(s: str) -> set[str]:
    """Normalized words the answer writes as names or numbers ("Paris", "1999", "three"): candidates, unlike
    "city" in "Paris city". The shortened end of a range continues its start ("99" of "1998–99"); a full one
    ("1971" of "1903–1971", "4" of "3-4") is a second number."""
    out = set()
    for m in re.finditer(r"[^\W_]+", s):
        w, n = m.group(), _norm(m.group())
        start = re.search(r"(\d+)\s*[-–—]\s*$", s[: m.start()]) if n.isdigit() else None
        if n and (w[0].isupper() or (n.isdigit() and not (start and len(n) < len(start.group(1))))):
            out.add(n)
    return out


# ----------------------------------------------------------------------------- QA: dates
_DATE_TOKEN = re.compile(r"\d+|[^\W\d_]+|[^\s\w]")
_DATE_WORDS = frozenset("of the on st nd rd th , . / -".split())


_DATE_NAMES = dateparser.parserinfo()  # month and weekday names in English, full and short ("Sept", "Thu")


@lru_cache(maxsize=8192)
def _date(s: str) -> tuple[tuple[str, int], ...] | None:
    """(("day", 5), ("month", 6), ("year", 1902)) for "June 5, 1902", "5th June 1902", "1902-06-05", ...; None unless
    the text is a date and nothing else: a month (by name, or all-number with a 3-4 digit year), at most one day and
    one year. An all-number date is y-m-d, d.m.y (day first, by convention) or a d/m/y that only one reading fits
    ("25/06/1902"; "05/06/1902" is two dates). dateutil reads the values."""
    nums, named = [], 0
    for t in _DATE_TOKEN.findall(s.lower()):
        if t.isdigit():
            nums.append(t)
        elif _DATE_NAMES.month(t) is not None:
            named += 1
        elif t not in _DATE_WORDS and _DATE_NAMES.weekday(t) is None:
            return None  # a word no date has: "June 5 or 6", "born June 1902"
    years = [n for n in nums if len(n) in (3, 4)]
    days = [n for n in nums if len(n) <= 2]
    if len(years) > 1 or len(years) + len(days) != len(nums) or named > 1:
        return None
    if named:
        if len(days) > 1:
            return None
    elif len(nums) != 3 or len(years) != 1:
        return None
    elif nums[0] not in years and "." not in s and days[0] != days[1] and max(map(int, days)) <= 12:
        return None
    try:
        d = dateparser.parse(re.sub(r"(?i)\b(?:the|of|on)\b", " ", s), default=datetime(2000, 1, 1),  # leap: 29 Feb
                             dayfirst="." in s and not named and nums[0] not in years)
    except (ValueError, OverflowError):
        return None
    if d.hour or d.minute or d.second:  # read as a time of day
        return None
    fields = [("day", d.day)] if days else []
    return tuple(fields + [("month", d.month)] + ([("year", d.year)] if years else []))


@lru_cache(maxsize=8192)
def _gold_date(gold: str) -> tuple[tuple[str, int], ...] | None:
    """A gold's date; a bare year is one too ("1902": a date in 1902 names it)."""
    return _date(gold) or ((("year", int(gold)),) if re.fullmatch(r"\d{3,4}", gold.strip()) else None)


def _same_date(pred: tuple, gold: tuple, metric: str) -> bool:
    """Dates agree on every field both give; sub_em also pays a part that covers half the gold's fields, as for
    words ("December 2010" for "1 December 2010"), em needs the same fields, substring all of the gold's."""
    p, g = dict(pred), dict(gold)
    shared = p.keys() & g.keys()
    if not shared or any(p[k] != g[k] for k in shared):
        return False
    if metric == "em":
        return p.keys() == g.keys()
    if metric == "substring":
        return p.keys() >= g.keys()
    return p.keys() >= g.keys() or 2 * len(shared) >= len(g)


# ----------------------------------------------------------------------------- QA: what the passages say
_PASSAGE = re.compile(r"Passage \d+:")  # keychain.passages(): one document each
# clause marks: "," ";" "(" ")" inside a sentence; ". " "!" "?" ":" and line ends close one (the next word's case
# says nothing). "St. Louis", "J. R. R. Tolkien": an abbreviation's period closes nothing
_CLAUSE_MARK = re.compile(r"([,;()\[\]])|([!?:\n]|\.(?!\S)(?<!\b[A-Z]\.)(?<!\bSt\.)(?<!\bMt\.)(?<!\bFt\.)(?<!\bJr\.)"
                          r"(?<!\bSr\.)(?<!\bCo\.)(?<!\bNo\.)(?<!\bvs\.)(?<!\bInc\.)(?<!\bLtd\.)(?<!\bBros\.))")
_PUNCT_MARKED = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s\0\1]")  # _PUNCT_CHARS, clause marks kept
_LINKS = frozenset("of in at on for from by and with to".split())  # "Bank of Vandria": each side names something
_NAME_LINKS = frozenset("of de du da di del la le von van der den y".split())  # inside one name


def _tokens(text: str, title: bool = False) -> tuple[list[str], list[int]]:
    """Text as the words _norm would write ("\\0" after a clause mark, "\\1" after a sentence end) and each word's
    case: 1 capitalized inside a sentence, 2 capitalized as a sentence's first word, 0 lower case, -1 neither (a
    number, a mark). title: the text is a passage's title line, whose first word's case is a name's."""
    s = _THOUSANDS.sub("", _POSSESSIVE_ANY.sub("", _fold(_bare_name.__wrapped__(text)).replace("&", " and ")))
    s = _CLAUSE_MARK.sub(lambda m: " \0 " if m.group(1) else " \1 ", s)
    words: list[str] = []
    caps: list[int] = []
    start = not title
    for w in _PUNCT_MARKED.sub("", _AS_SPACE.sub(" ", s)).split():
        if w in ("\0", "\1"):
            start = w == "\1"
            words.append(w)
            caps.append(-1)
            continue
        low = w.lower()
        if low not in ("a", "an", "the"):
            words.append(_NUMBER_WORDS.get(low, low))
            caps.append(-1 if not w[0].isalpha() else 0 if w[0].islower() else 2 if start else 1)
        start = False
    return words, caps


class Passages:
    """The prompt's passages, read lazily: an answer's words are found in the lower-cased text, and only the passages
    that hold them are tokenized. Built once per prompt (cached): GRPO scores G responses to it in a row."""

    def __init__(self, text: str):
        self.raw = _fold(text)
        self.low = self.raw.lower()
        if len(self.low) != len(self.raw):  # a rare letter changed length: case is unknown, positions still agree
            self.raw = self.low
        starts, at = [0], self.raw.find("Passage ")
        while at >= 0:  # str.find, not a regex scan: a 16K-token prompt is read once per group
            if at and _PASSAGE.match(self.raw, at):
                starts.append(at)
            at = self.raw.find("Passage ", at + 8)
        self.starts = starts
        self._tok: dict[int, tuple[list[str], list[int], str]] = {}
        self._usage: dict[str, tuple[bool, bool]] = {}

    def passage(self, i: int) -> tuple[list[str], list[int], str]:
        """(words, cases, " w1 w2 ... ") of passage i. keychain.passages() writes "Passage 3:\\nTitle\\nText"."""
        if i not in self._tok:
            end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.raw)
            text = self.raw[self.starts[i]:end]
            head = _PASSAGE.match(text)
            text = text[head.end():] if head else text  # "Passage 3:" is no part of what it says
            lines = text.split("\n", 2)
            if len(lines) == 3 and not lines[0].strip() and 0 < len(lines[1].split()) <= 12 and lines[1][-1:] != ".":
                words, caps = _tokens(lines[1], title=True)  # a title: a name, whatever its position
                more = _tokens(lines[2])
                words, caps = words + ["\1"] + more[0], caps + [-1] + more[1]
            else:
                words, caps = _tokens(text)
            self._tok[i] = (words, caps, " " + " ".join(words) + " ")
        return self._tok[i]

    def find(self, phrase: str) -> Iterator[tuple[int, int, int]]:
        """(passage, word index, position in the passage's joined text) of each occurrence of a normalized phrase
        inside one clause, passages in order. Only passages holding every word of letters are tokenized; the
        phrase's longest word leads to them. (A word normalization rewrote, "oneill" of "O'Neill", is missed: the
        phrase counts as absent, the strict side.)"""
        words = phrase.split()
        if not words:
            return
        anchor = max(words, key=lambda w: (w.isalpha(), len(w)))
        pos = self.low.find(anchor)
        if pos < 0 and anchor.isalpha():
            return
        every = pos < 0  # a number may be spelled out ("three"): read every passage
        i = 0 if every else bisect.bisect_right(self.starts, pos) - 1
        while i < len(self.starts):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.low)
            if every or all(self.low.find(w, self.starts[i], end) >= 0 for w in words if w.isalpha()):
                joined = self.passage(i)[2]
                at = joined.find(f" {phrase} ")
                while at >= 0:
                    yield i, joined.count(" ", 0, at), at
                    at = joined.find(f" {phrase} ", at + 1)
            if every:
                i += 1
                continue
            pos = self.low.find(anchor, end)
            if pos < 0:
                return
            i = bisect.bisect_right(self.starts, pos) - 1

    def usage(self, word: str) -> tuple[bool, bool]:
        """(written capitalized inside a sentence, written in lower case) anywhere in the passages."""
        if word not in self._usage:
            upper, lower, at, n = False, False, self.low.find(word), len(word)
            while at >= 0 and not lower:
                end = at + n
                if not (at and self.low[at - 1].isalnum()) and not (end < len(self.low) and self.low[end].isalnum()):
                    c = self.raw[at]
                    k = at - 1
                    while k >= 0 and self.raw[k] in " \t\"'([{":
                        k -= 1
                    lower = c.islower()
                    upper = upper or (c.isupper() and k >= 0 and self.raw[k] not in ".!?:\n")
                at = self.low.find(word, end)
            self._usage[word] = (upper, lower)
        return self._usage[word]

    def named(self, word: str, case: int) -> bool:
        """A word written with this case is a name: capitalized inside a sentence, or first in one and never written
        in lower case ("Greater Brell has ..."; not "Several archives ...")."""
        return case == 1 or (case == 2 and not self.usage(word)[1])

    def is_name(self, word: str) -> bool:
        """Written capitalized inside a sentence and never in lower case: "Vandria", not "city"."""
        upper, lower = self.usage(word)
        return upper and not lower

    def is_common(self, word: str) -> bool:
        """Written in lower case, as it is or in the singular: "city", "films" (the passages say "a film")."""
        return any(self.usage(w)[1] for w in _forms_of(word) if len(w) > 2)


@lru_cache(maxsize=16)  # a prompt is scored G times in a row
def _read_passages(text: str) -> Passages:
    return Passages(text)


def _passages_of(row: dict) -> Passages | None:
    """The row's prompt (all but the system turn), or None for a row without one (evaluation)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        return None
    text = "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict) and m.get("role") != "system")
    return _read_passages(text) if text.strip() else None


def _at(words: list[str], k: int, part: list[str], whole: list[str]) -> bool:
    """The occurrence of `part` at words[k] lies inside an occurrence of `whole` (part is a piece of whole)."""
    n = len(part)
    return any(whole[o:o + n] == part and words[max(k - o, 0):k - o + len(whole)] == whole
               for o in range(len(whole) - n + 1) if k >= o)


def _same_entity(ps: Passages, short: str, long: str) -> bool:
    """The passages use the short name only after the long one in the same passage ("Barack Obama ... Obama"):
    one entity. A short name a passage uses first or alone ("York", "Ireland", "Vandria") is a name of its own."""
    sw, lw = short.split(), long.split()
    for i, k, at in ps.find(short):
        words, _, joined = ps.passage(i)
        if _at(words, k, sw, lw):
            continue
        first = joined.find(f" {long} ")
        if first < 0 or at < first:
            return False
    return True


def _one_name(ps: Passages, i: int, k: int, n: int) -> bool:
    """Words k..k+n of passage i are one capitalized name ("Bank of Vandria"), not two joined by a small word."""
    words, caps, _ = ps.passage(i)
    return all(w in _NAME_LINKS or w.isdigit() or ps.named(w, c) for w, c in zip(words[k:k + n], caps[k:k + n]))


# ----------------------------------------------------------------------------- QA: the rules
def _covers(pred: str, gold: str) -> bool:
    """A normalized answer inside a normalized gold is right only when it covers a substantial part of it: at least
    half of the gold's content words, at least one content word, and not a lone number ("1" in "1 December 2010")."""
    p, g = pred.split(), gold.split()
    pc, gc = _content(pred), _content(gold) or g
    if not pc or (len(p) == 1 and re.fullmatch(r"[\d.]+", p[0]) and len(g) > 1):
        return False
    return 2 * len(pc) >= len(gc)


@lru_cache(maxsize=1)
def _nouns() -> frozenset[str]:
    """English common nouns, singular (wonderwords' list, installed for eval.py): "city", "studio", "bank"."""
    try:
        from importlib.resources import files

        return frozenset(files("wonderwords").joinpath("assets/nounlist.txt").read_text().lower().split())
    except (ImportError, OSError):
        return frozenset()


def _generic(word: str) -> bool:
    """An English common noun, singular or plural ("studios", "cities")."""
    return any(w in _nouns() for w in _forms_of(word))


def _part(pred: str, gold: str, row: dict) -> str | None:
    """Why a part of the gold is not the gold (a rule name), or None when it names the gold."""
    p, g = pred.split(), gold.split()
    if not _covers(pred, gold):
        return "fragment"
    at = next(o for o in range(len(g) - len(p) + 1) if g[o:o + len(p)] == p)
    if any(g[j] in _LINKS and not at <= j < at + len(p) for j in range(1, len(g) - 1)):
        return "fragment"  # one side of "Bank of Vandria", "Simon and Garfunkel"
    # a generic head ("City", "Studios") names the gold only where the passages use it alone for it
    generic = all(_generic(w) for w in _content(pred))
    ps = _passages_of(row)
    if ps is None:
        return "generic" if generic else None
    if all(ps.is_common(w) for w in _content(pred)):
        return "generic"  # the passages use it as a common word: "a city in", "a film" for "Films"
    if next(ps.find(gold), None) is None:
        return "generic" if generic else None  # nothing to compare with: the gold is not named in the prompt
    short = False
    for i, k, at in ps.find(pred):
        words, caps, joined = ps.passage(i)
        if _at(words, k, p, g):
            continue
        if any(c == 0 for w, c in zip(p, caps[k:k + len(p)]) if w not in _STOP):
            return "ambiguous"  # a common word here: "a city in ..."
        for n in (k - 1, k + len(p)):
            if 0 <= n < len(words) and words[n] not in _STOP and len(words[n]) > 1 and ps.named(words[n], caps[n]):
                return "ambiguous"  # part of another name: "Korea" in "North Korea", "Films" in "Brisk Films"
        first = joined.find(f" {gold} ")
        if first < 0 or first > at:
            return "ambiguous"  # a name of its own: "Varn" (the town) for "Lake Varn"
        short = True  # the gold's short name: "Barack Obama ... Obama"
    return "generic" if generic and not short else None


def _beside(pred: str, gold: str, raw: str, extra: Counter, row: dict, cfg: Config) -> str | None:
    """Why words beside the gold make the answer another one (a rule name), or None when they only describe it."""
    if sum(extra.values()) > cfg.max_extra_words:
        return "extra_words"
    named = _names(raw)
    if any(w in named and w[0].isdigit() for w in extra):
        return "extra_words"  # a second number: "(1903–1971)", "1794 by Ansel Kerrow" for the founder
    ps = _passages_of(row)
    if ps is None:
        return "extra_words" if set(extra) & named else None  # no passages: any name beside the gold
    hits = list(itertools.islice(ps.find(pred), 64))
    if not hits:
        return "extra_words"  # not a phrase of the passages: "Paris London", "Paris city"
    n = len(pred.split())
    named = any(ps.is_name(w) for w in extra)  # a name somewhere in the passages, or written as one right here
    for i, k, _ in hits:
        words, caps, _ = ps.passage(i)
        named = named or any(w in extra and ps.named(w, c) for w, c in zip(words[k:k + n], caps[k:k + n]))
    if not named:
        return None  # descriptors: "the city of Paris"
    if not any(_one_name(ps, i, k, n) for i, k, _ in hits):
        return "extra_words"  # two names: "Tollen in northern Vandria", "Ostrel Films with Brisk Pictures"
    return None if _same_entity(ps, gold, pred) else "longer_name"  # "New York" for York; "Barack Obama" for Obama


def _qa(pred: str, golds: list[str], cfg: Config, row: dict) -> tuple[float, str]:
    """Guarded QA: hedging forms the gold does not share score 0, then the metric on the head of the answer."""
    m = cfg.qa_metric
    if m not in QA_METRICS:
        raise ValueError(f"unknown qa_metric {m!r} (one of {QA_METRICS})")
    if "{" in pred or "}" in pred:
        return 0.0, "braces"
    # 1) a date is read as a date, whatever its written form ("Friday, June 5, 1902" = "5 June 1902"): a date and
    #    nothing else has no hedge in it, so this comes before the hedging forms
    bare = [_bare_name(g) for g in golds]  # "Dr. Ada K. Morrow" = "Ada Morrow" (the metrics below read golds as given)
    dated = [_gold_date(g) for g in bare]
    whole_date = _date(_PAREN.sub(" ", pred)) if any(dated) and m in ("sub_em", "substring", "em") else None
    if whole_date:
        return (1.0, m) if any(d and _same_date(whole_date, d, m) for d in dated) else (0.0, "date")
    have, allowed = _forms(pred), set().union(*map(_forms, golds))
    for rule in _FORM_RULES:
        if rule in have and rule not in allowed:
            return 0.0, rule
    if m == "f1":
        return longbench_score(pred, golds), m
    if m == "hotpot_f1":
        return max(hotpot_f1(pred, g) for g in golds), m
    pred = _bare_name(pred)
    head = (_parts(pred) or [pred])[0]
    why = m
    for gold, gd in zip(bare, dated):
        # 2) a date at the head ("June 1902, in Tollen")
        if gd and (hd := _date(head)):
            if _same_date(hd, gd, m):
                return 1.0, m
            why = "date"
            continue
        # 3) "New York, USA": the head is the answer, a qualifier after it earns nothing; unless the gold has parts
        whole = m == "em" or len(_parts(gold)) > 1 or bool(_PAREN.search(gold))
        raw = pred if whole else head
        for p in _norms(raw):
            for g in _norms(gold):
                if not g or not p:
                    continue
                if m == "em":
                    if p == g:
                        return 1.0, m
                elif f" {g} " in f" {p} ":  # whole words: "art" is not in "cartoon"
                    # 4) words beside the gold must describe it, never name a second candidate
                    extra = Counter(_content(p)) - Counter(_content(g))
                    rule = _beside(p, g, raw, extra, row, cfg) if extra else None
                    if rule is None:
                        return 1.0, m
                    why = rule
                elif m == "sub_em" and f" {p} " in f" {g} ":
                    # 5) a part of the gold must name the gold, and nothing else the passages name
                    rule = _part(p, g, row)
                    if rule is None:
                        return 1.0, m
                    why = rule
    return 0.0, why


# ----------------------------------------------------------------------------- ruler, choice, math
_VALUE = re.compile(r"[^\W_]+(?:-[^\W_]+)*")  # a value is a whole token: "12345677654321" holds no 1234567
_RULER_WORDS = frozenset("special magic number numbers value values word words key keys uuid uuids".split())


def _ruler(pred: str, golds: list[str]) -> tuple[float, str]:
    """Every gold value is in the answer (boxes joined), and no other value is: a candidate list is no answer."""
    text = _THOUSANDS.sub("", _plain(pred))
    toks = _VALUE.findall(text)
    want = [" ".join(_VALUE.findall(_plain(g))) for g in golds]
    if not all(f" {w} " in f" {' '.join(toks)} " for w in want):
        return 0.0, "ruler_all"
    gold_toks = {t for w in want for t in w.split()}
    numeric = [t for t in gold_toks if any(c.isdigit() for c in t)]
    if numeric:  # number values: any other number at least as long as the shortest gold is a candidate ...
        shortest = min(map(len, numeric))
        extra = [t for t in toks if t not in gold_toks and any(c.isdigit() for c in t) and len(t) >= shortest]
        for run in re.findall(r"\d+(?:\s+\d+)+", text):  # ... and so is one split by spaces: "765 4321"
            piece = ""
            for group in run.split() + [""]:
                if group and len(group) < shortest:
                    piece += group
                    continue
                if len(piece) >= shortest:
                    extra.append(piece)
                piece = ""
    else:  # word values: any other content word is
        extra = [t for t in toks if t not in gold_toks and t not in _STOP and t not in _RULER_WORDS]
    return (0.0, "extra_values") if extra else (1.0, "ruler_all")


_OPTION = re.compile(r"(?m)(?:^|(?<=:))[ \t]*\(?([A-E])[).][ \t]*(.+?)[ \t]*$")  # "Choices:(A) 12\n(B) 15"
_SECOND_LETTER = re.compile(r"(?:^|[\s;,/&])\(?[A-Z]\s*[).:](?![A-Za-z])")  # "A. B. C. D.", "A: 12; B: 15"


def _choice_letter(s: str) -> tuple[str | None, str]:
    """('C', what follows it) for 'C', '(C)', 'C)', 'C. 12 km', 'Option C'; a lone lower-case letter counts;
    'A cat', 'A) or B)' -> (None, '')."""
    s = re.sub(r"(?i)^(?:option|choice)[\s:]*", "", s.strip())
    if m := re.fullmatch(r"\(?([A-Za-z])\)?\.?", s):
        return m.group(1).upper(), ""
    m = re.match(r"\(?([A-Z])[).:]", s)
    if not m or re.search(r"\(?\b[A-Z]\)|\b(?:or|and)\s+\(?[A-Z]\b", s[m.end():]):  # a second option: a hedge
        return None, ""
    return m.group(1), s[m.end():]


def _choice_list(rest: str, letter: str, row: dict) -> bool:
    """What follows the letter names another option: a second letter, or another option's text (the prompt's)."""
    said = _norm(rest)
    if not said:
        return False
    msgs = row.get("messages")
    user = [str(m.get("content", "")) for m in msgs if isinstance(m, dict) and m.get("role") == "user"] \
        if isinstance(msgs, list) else []
    options = {k: _norm(t) for k, t in _OPTION.findall(user[-1])} if user else {}
    mine = options.get(letter, "")
    if mine and f" {said} " in f" {mine} ":
        return False  # the option's own text: "C. 12 km"
    if _SECOND_LETTER.search(rest):
        return True
    return any(t and f" {t} " in f" {said} " and f" {t} " not in f" {mine} " for k, t in options.items() if k != letter)


_MATH_HEDGE = re.compile(r"\\(?:lor|vee|land|wedge)(?![A-Za-z])|\bor\b")  # math-verify reads "3 \lor 5" as 5
_VAR_EQ = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?(?:\([^()=]*\))?\s*=([^=]+)")  # "x = 5", "a_1 = 5", "f(x) = 2x"


# what a value is made of: math-verify may judge an answer only when it holds nothing else (or only the gold's own)
_VALUE_COMMANDS = frozenset(
    "frac dfrac tfrac sqrt pi infty cdot times div pm mp left right log ln lg exp sin cos tan sec csc cot arcsin "
    "arccos arctan sinh cosh tanh binom dbinom tbinom overline mathbb mathrm mathbf text textbf textrm mbox "
    "displaystyle emptyset varnothing alpha beta gamma delta epsilon varepsilon theta lambda mu rho sigma "
    "tau phi varphi omega Gamma Delta Theta Lambda Pi Sigma Phi Omega begin end".split())
_VALUE_CHARS = frozenset(string.ascii_letters + string.digits + " \t\n+-*/^_.,()[]{}='!%")
_COMMAND = re.compile(r"\\([A-Za-z]+)|\\(.)", re.S)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|\\text\{\s*°\s*\}|°")  # 90^\circ, 90°
_DIGIT_GROUPS = re.compile(r"(?<=\d)(?:\\[,;: ]|\s|~)(?=\d{3}(?!\d))")  # "1\,000", "1 000": one number
_PERCENT = re.compile(r"%|\\text\{\s*percent\s*\}|\bpercent\b")  # math-verify reads 3% as 3 and as 0.03
_BASE = re.compile(r"(?<![\\\w])(?=[0-9A-Fa-f]*\d)[0-9A-Fa-f]+_\{?\(?(\d+)\)?\}?")  # 43_5, 1A_{16}: the base
_TEXT_ARG = re.compile(r"\\(?:text[a-z]*|mbox|mathrm)\s*\{([^{}]*)\}")


def _verifiable(pred: str, golds: list[str]) -> bool:
    """math-verify keeps one side of a relation and skips what it cannot read: "7 \\to 5", "7 \\hspace{1em} 5",
    "\\cancel{7} 5", "7 ~ 5", "7 ... 5" all equal 5 to it. So it judges only answers made of a value's commands and
    characters; any other ("|", ":", "<", "\\\\", "\\in") must be the gold's own. Minerva's exact match still applies."""
    gold = " ".join(golds)
    s = _DEGREES.sub(" ", pred)
    if (re.search(r"\\(?:left|right)\.|%(?!\s*$)|\{\s*\}|(?<!\d)\.(?!\d)", s)  # "\left.", "7 {} 5", "7 . 5"
            or s.count("\\{") != s.count("\\}")):
        return False
    for m in _COMMAND.finditer(s):
        name = m.group(1) or m.group(2)
        if name not in _VALUE_COMMANDS and name not in ",;!% ${}" and "\\" + name not in gold:
            return False
    if set(_COMMAND.sub(" ", s)) - _VALUE_CHARS - set(gold):
        return False
    return all(re.fullmatch(r"[A-Za-z\s.]*", t) for t in _TEXT_ARG.findall(s))  # units, not "(approx"


def _math(pred: str, golds: list[str], cfg: Config) -> tuple[float, str]:
    pred = re.sub(r"(?<!\\left)(?<!\\right)\s*\.$", "", pred.strip())  # "34." ends a sentence; "\right." does not
    # degree marks and thin-space digit groups are how a number is written, not what it is
    pred = _DIGIT_GROUPS.sub("", _DEGREES.sub("", pred)).strip()
    golds = [_DIGIT_GROUPS.sub("", _DEGREES.sub("", g)).strip() for g in golds]
    if _PERCENT.search(pred) and not any(_PERCENT.search(g) for g in golds):
        return 0.0, "percent"
    bases = {b for g in golds for b in _BASE.findall(g)} or {"10"}
    if set(_BASE.findall(pred)) - bases:
        return 0.0, "base"  # 43_7 for 43_5: the digits alone do not make the number
    if _MATH_HEDGE.search(pred) and not any(_MATH_HEDGE.search(g) for g in golds):
        return 0.0, "alternatives"
    if "=" in pred and not any("=" in g for g in golds):  # Minerva keeps what follows the last "=": "7=5" -> "5"
        m = _VAR_EQ.fullmatch(pred)
        if not m:
            return 0.0, "equation"
        pred = m.group(1)
    if any(normalize_final_answer(pred) == normalize_final_answer(g) for g in golds):
        return 1.0, "minerva"
    if not _verifiable(pred, golds):
        return 0.0, "unverifiable"
    if any(math_equal(pred, g, cfg) for g in golds):
        return 1.0, "math_verify"
    return 0.0, "math_wrong"


# ----------------------------------------------------------------------------- the reward
def _golds(row: dict) -> list[str]:
    a = row.get("answers")
    return [] if a is None else [str(x) for x in ([a] if isinstance(a, (str, int, float)) else a)]


def score(row: dict, response: str, cfg: Config | None = None, finish: str | None = None) -> tuple[float, dict]:
    """Reward of one response to one row, by the row's kind, and {"pred", "rule"} saying what decided.
    finish: the engine's finish reason; "length" (cut at the token limit) scores 0."""
    cfg = cfg or DEFAULT
    # 1) the row and the rule must be known: a typo must fail loudly, not pay 0 to every response
    kind = row.get("kind")
    golds = _golds(row)
    if kind not in KINDS:
        raise ValueError(f"row {row.get('id')!r}: unknown kind {kind!r}")
    if cfg.qa_rule not in QA_RULES:
        raise ValueError(f"unknown qa_rule {cfg.qa_rule!r} (one of {QA_RULES})")
    diag: dict[str, Any] = {"pred": None, "rule": ""}

    def out(r: float, rule: str) -> tuple[float, dict]:
        diag["rule"] = rule
        return float(r), diag

    if not isinstance(response, str):
        return out(0, "no_answer")
    public = cfg.qa_rule == "public" and kind in ("qa", "keychain")
    # 2) the final answer (kept in diag even when a gate below scores 0)
    pred, _, n_boxes = _final(response, kind, join=kind == "ruler")
    pred = None if pred is None else _visible(pred)  # zero-width and odd spaces, before any rule reads it
    diag["pred"] = pred
    # 3) gates in every mode: a cut or unfinished response, no answer, no gold
    if finish == "length":
        return out(0, "length")
    if "</think>" not in response:
        return out(0, "no_think")
    if pred is None:
        return out(0, "no_answer")
    if not golds:
        return out(0, "no_gold")
    # 4) the authors' public rule: normalized gold inside the normalized answer; "" is inside everything
    if public:
        p = normalize_answer(pred)
        gs = [g for g in map(normalize_answer, golds) if g]
        if not p:
            return out(0, "empty")
        return out(float(any(g in p for g in gs)), "public") if gs else out(0, "no_gold")

    # 5) guards shared by every kind: a hedge over boxes, a long enumeration, an empty answer
    if (n_boxes > 1 and kind != "ruler") or _BOX.search(pred):
        return out(0, "multi_box")
    ref_len = sum(len(g) + 2 for g in golds) if kind == "ruler" else max(map(len, golds))
    if cfg.max_answer_chars >= 0 and len(pred) > ref_len + cfg.max_answer_chars:
        return out(0, "too_long")
    if not (_norm(pred) if kind in ("qa", "keychain", "ruler") else re.search(r"[^\W_]", pred)):
        return out(0, "empty")
    # 6) grade by kind
    if kind == "choice":
        want = _choice_letter(unwrap(golds[0]))[0]
        got, rest = _choice_letter(pred)
        if got is None:
            return out(0, "choice_unparsed")
        if _choice_list(rest, got, row):
            return out(0, "choice_list")
        return out(float(got == want), "choice")
    if kind == "math":
        return out(*_math(pred, golds, cfg))
    if kind == "ruler":
        return out(*_ruler(pred, golds))
    if not any(_norm(g) for g in golds):
        return out(0, "no_gold")  # a gold that normalizes to "" ("The", "?") is inside everything
    return out(*_qa(pred, golds, cfg, row))


# ----------------------------------------------------------------------------- batches
_pool_lock = threading.Lock()
_pool: tuple[tuple, ProcessPoolExecutor] | None = None


def _get_pool(workers: int, method: str) -> ProcessPoolExecutor:
    """One persistent pool per process, so workers keep math-verify imported and its parse cache warm."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != (workers, method):
            if _pool is not None:
                _pool[1].shutdown(cancel_futures=True)
            _pool = ((workers, method), ProcessPoolExecutor(workers, mp_context=mp.get_context(method)))
        return _pool[1]


def close_pool() -> None:
    """Shut the pool down. A process that leaves by os._exit skips the pool's own exit handler, and its forkserver
    and workers would outlive it, holding the caller's stdout open."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool[1].shutdown(cancel_futures=True)
            _pool = None


def _score_chunk(rows: list[dict], responses: list[str], cfg: Config,
                 finish: list[str | None]) -> list[tuple[float, dict]]:
    return [score(r, t, cfg, f) for r, t, f in zip(rows, responses, finish)]


def score_batch(rows: list[dict], responses: list[str], cfg: Config | None = None, workers: int | None = None,
                finish: list[str | None] | None = None) -> list[tuple[float, dict]]:
    """score() over a batch, in order; finish: one finish reason per response (or None). Math rows (math-verify:
    milliseconds each) go to a process pool when there are at least cfg.pool_min of them; everything else is
    microseconds and runs inline, because shipping a response to another process costs more than scoring it
    (bench/bench_reward.py)."""
    global _pool
    cfg = cfg or DEFAULT
    if len(rows) != len(responses):
        raise ValueError(f"score_batch: {len(rows)} rows but {len(responses)} responses")
    finish = [None] * len(rows) if finish is None else list(finish)
    if len(finish) != len(rows):
        raise ValueError(f"score_batch: {len(rows)} rows but {len(finish)} finish reasons")
    workers = cfg.workers if workers is None else workers
    workers = workers or min(os.cpu_count() or 1, 8)
    out: list = [None] * len(rows)
    slow = [i for i, r in enumerate(rows) if r.get("kind") == "math"]
    futures = []
    if workers > 1 and len(slow) >= max(cfg.pool_min, 2):
        try:
            pool = _get_pool(workers, cfg.start_method)
            size = math.ceil(len(slow) / (4 * workers))
            for s in range(0, len(slow), size):
                idx = slow[s : s + size]  # slim rows: the 16K-token prompt never crosses the process boundary
                slim = [{"id": rows[i].get("id"), "kind": "math", "answers": _golds(rows[i])} for i in idx]
                futures.append((idx, pool.submit(_score_chunk, slim, [responses[i] for i in idx], cfg,
                                                    [finish[i] for i in idx])))
        except (BrokenProcessPool, RuntimeError, OSError) as e:
            logging.getLogger(__name__).warning("reward pool unavailable (%s); scoring inline", e)
            futures = []
    pending = {i for idx, _ in futures for i in idx}
    for i, (r, t) in enumerate(zip(rows, responses)):
        if i not in pending:
            out[i] = score(r, t, cfg, finish[i])
    for idx, fut in futures:
        try:
            got = fut.result()
        except BrokenProcessPool:  # a worker died (OOM, signal): never lose a training step over it
            _pool = None
            got = _score_chunk([rows[i] for i in idx], [responses[i] for i in idx], cfg, [finish[i] for i in idx])
        for i, g in zip(idx, got):
            out[i] = g
    return out


# ----------------------------------------------------------------------------- command line
def main(argv: list[str]) -> None:
    cfg = parse_config(Config, argv, __doc__)
    if not cfg.rows or not cfg.responses:
        raise SystemExit("reward.py needs --rows=... and --responses=... (see --help)")
    if cfg.qa_metric not in QA_METRICS:
        raise SystemExit(f"--qa_metric must be one of {QA_METRICS}, got {cfg.qa_metric!r}")
    if cfg.qa_rule not in QA_RULES:
        raise SystemExit(f"--qa_rule must be one of {QA_RULES}, got {cfg.qa_rule!r}")
    try:
        by_id = {}
        for i, row in read_records(cfg.rows):
            if not isinstance(row, dict) or "id" not in row:
                raise DataError(f"{cfg.rows}: record {i}: a row needs an 'id'")
            by_id[str(row["id"])] = row
        pairs = []
        for i, rec in read_records(cfg.responses):
            if (not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("response"), str)
                    or not isinstance(rec.get("finish", ""), str)):
                raise DataError(f"{cfg.responses}: record {i}: expected "
                                '{"id": ..., "response": "..."[, "finish": "stop" | "length"]}')
            if str(rec["id"]) not in by_id:
                raise DataError(f"{cfg.responses}: record {i}: id {rec['id']!r} is not among the rows of {cfg.rows}")
            pairs.append((by_id[str(rec["id"])], rec["response"], rec.get("finish")))
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    results = score_batch([p[0] for p in pairs], [p[1] for p in pairs], cfg, finish=[p[2] for p in pairs])
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    rules: Counter = Counter()
    for (row, *_), (r, d) in zip(pairs, results):
        groups[(str(row.get("source", "")), str(row.get("kind", "")))].append(r)
        rules[d["rule"]] += 1
    print(f"{'source':<20} {'kind':<10} {'n':>7} {'reward':>8}")
    for (src, kind), rs in sorted(groups.items()):
        print(f"{src:<20} {kind:<10} {len(rs):>7} {sum(rs) / len(rs):>8.4f}")
    allr = [r for r, _ in results]
    print(f"{'all':<20} {'':<10} {len(allr):>7} {sum(allr) / max(len(allr), 1):>8.4f}")
    print("rules: " + ", ".join(f"{k}={v}" for k, v in rules.most_common()))
    if cfg.out:
        write_rows(cfg.out, ({"id": row.get("id"), "reward": r, **d} for (row, *_), (r, d) in zip(pairs, results)))


if __name__ == "__main__":
    main(sys.argv[1:])
