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
be paid without being right; each scores 0 and names itself in diag["rule"]:
  length       the completion hit the token limit (finish="length"): its text is cut, whatever it holds.
  no_think     no </think>: a response cut mid-reasoning ("<think>maybe \\boxed{Paris} hmm... Lond") has no final
               answer, only drafts.
  multi_box    two different answers after </think> ("\\boxed{London} ... \\boxed{Paris}", a box inside a box):
               a hedge. Identical boxes count once and empty boxes ("in \\boxed{} form") are ignored; RULER joins
               its boxes (values may be spread over them).
  empty        an answer that normalizes to "" ("\\boxed{the}"): "" is inside every gold. Wrong in every mode.
  too_long     longer than the longest gold (ruler: all golds) by more than max_answer_chars (128, as the
               authors' strict mode): a long enumeration of candidates.
  braces       "{" or "}" left in a QA answer once every \\text-like wrapper is removed ("{London}, {Paris}").
  list         three or more comma / semicolon / line separated items ("Paris, London, Berlin") when the gold
               has fewer. With one comma ("New York, USA") only the first item is graded: the gold must be the
               head, a qualifier after it earns nothing, so "Paris, London" pays only when Paris is right.
  alternatives "or", "either", "vs", "and/or", a slash ("Paris or London", "Paris/London"; math: \\lor, \\vee).
  conjunction  "and" joining candidates ("Paris and London") when the gold has no "and".
  negation     "not Paris", "neither ... nor", "no": says what is not the answer.
  yes_no       both "yes" and "no".
  extra_words  words beside the gold ("Paris London", "paris in london", "1998 1999") when the answer is not a
               phrase of the prompt's passages ("Barack Obama" for "Obama" is; without passages, as in evaluation,
               only names and numbers count), or more than max_extra_words of them ("Paris London Berlin Rome").
               Qualifiers go after a comma, where they earn nothing.
  fragment     (sub_em, answer inside the gold) the answer covers less than half of the gold's content words,
               or is only stop words ("of" for "Bank of America") or a lone number inside a longer gold ("1" for
               "1 December 2010").
  equation     math: "=" other than one "var = value" ("7=5": math-verify compares the right side only).
  unverifiable math: a command or sign a value has not ("7 \\to 5", "7 \\hspace{1em} 5", "7 ~ 5") and the gold has
               not, where math-verify would read one side only; Minerva's exact match still decides.
  extra_values ruler: a value that is no gold ("1234567 7654321 5550123"); a gold glued to another
               ("12345677654321") is not found, since values are read as whole tokens.
  choice_unparsed  no single option letter ("A) or B)", "A/C", "A cat").
(A form a gold itself has is allowed: "Simon and Garfunkel", "yes and no", "Paris, France". QA matches whole
words: character-level, "e" is inside most golds and "art" inside "cartoon".)

Normalization that keeps right answers right (QA): every \\text-like wrapper anywhere (\\text{Paris} (France),
\\textsc{..}), accents (NFKD: "Sao Paulo" == "São Paulo"), curly quotes, hyphens and dashes as spaces
("rock-and-roll"), "&" as "and", possessive 's ("Sony's" == "Sony"), number words zero..twenty ("three" == "3"),
thousands separators, a/an/the; a parenthetical is a qualifier. Choice reads "C", "(C)", "C)", "C. 12 km", "Option C".

--qa_rule=public: the authors' public QA rule, literally: the normalized gold is a substring of the normalized last
box (no QA guards), except that an empty answer is wrong. length and no_think still apply (they are not about QA);
the other kinds are graded as above.

Benchmark metrics are plain functions with no guards, exactly as the benchmarks define them:
qa_f1_score / longbench_score (LongBench v1), exact_match, hotpot_f1 (HotpotQA's yes/no rule),
string_match_all / string_match_part (RULER), normalize_final_answer (Minerva, as in DAPO).
"""
from __future__ import annotations

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
from functools import lru_cache
from typing import Any

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
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,000" -> "1000"
_SEPARATOR = re.compile(r"[;\n]|,(?!\d{3}(?!\d))")  # between items of a list (not a thousands comma)
_PAREN = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")  # "(France)": a qualifier
_POSSESSIVE = re.compile(r"'s\b")
_AS_SPACE = re.compile(r"[-/_]")  # "rock-and-roll" = "rock and roll"
_PUNCT_CHARS = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")  # any punctuation, except a decimal point
_SLASH = re.compile(r"(?<!\d)/|/(?!\d)|\|")  # "Paris/London", "and/or"; "1/2" is a number
_ALTERNATIVES = frozenset({"or", "either", "vs", "versus"})
_NEGATIONS = frozenset("not no never neither nor none nothing nobody cannot cant dont doesnt didnt isnt wasnt arent "
                       "werent wont hasnt havent hadnt".split())
_FORM_RULES = ("yes_no", "alternatives", "list", "conjunction", "negation")  # checked in this order


def _plain(s: str) -> str:
    """Accents off (NFKD: "São" -> "sao"), curly quotes and dashes straightened, lower case."""
    if s.isascii():  # the common case, and the fast one
        return s.lower()
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if not unicodedata.combining(c)).translate(_TYPOGRAPHY).lower()


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


def _forms(s: str) -> set[str]:
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
    return out


def _names(s: str) -> set[str]:
    """Normalized words the answer writes as names or numbers ("Paris", "1999", "three"): candidates, unlike
    "city" in "Paris city". The end of a range ("99" of "1998–99") continues its start: "3-4" pays for 3 only."""
    out = set()
    for m in re.finditer(r"[^\W_]+", s):
        w, n = m.group(), _norm(m.group())
        if n and (w[0].isupper() or (n.isdigit() and not re.search(r"\d\s*[-–—]\s*$", s[: m.start()]))):
            out.add(n)
    return out


_CLAUSE = re.compile(r"[,;:!?()\[\]\n]|\.(?!\S)")  # a copied phrase lies inside one clause: "Paris, London" is none


@lru_cache(maxsize=16)  # a prompt is scored G times in a row
def _passages(text: str) -> str:
    return " " + " \0 ".join(_norm.__wrapped__(c) for c in _CLAUSE.split(text)) + " "


def _phrase_ok(row: dict, phrase: str, pred: str, extra: Counter) -> bool:
    """Words beside the gold are fine when the answer is a phrase copied from the row's passages ("Barack Obama"
    for "Obama", "the Mississippi River"); rows without passages (evaluation) refuse only extra names."""
    msgs = row.get("messages")
    text = "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict)) if isinstance(msgs, list) else ""
    if text:
        return f" {phrase} " in _passages(text)
    return not set(extra) & _names(pred)


def _covers(pred: str, gold: str) -> bool:
    """A normalized answer inside a normalized gold is right only when it covers a substantial part of it: at least
    half of the gold's content words, at least one content word, and not a lone number ("1" in "1 December 2010")."""
    p, g = pred.split(), gold.split()
    pc, gc = _content(pred), _content(gold) or g
    if not pc or (len(p) == 1 and re.fullmatch(r"[\d.]+", p[0]) and len(g) > 1):
        return False
    return 2 * len(pc) >= len(gc)


def _qa(pred: str, golds: list[str], cfg: Config, row: dict) -> tuple[float, str]:
    """Guarded QA: hedging forms the gold does not share score 0, then the metric on the head of the answer."""
    m = cfg.qa_metric
    if m not in QA_METRICS:
        raise ValueError(f"unknown qa_metric {m!r} (one of {QA_METRICS})")
    if "{" in pred or "}" in pred:
        return 0.0, "braces"
    have, allowed = _forms(pred), set().union(*map(_forms, golds))
    for rule in _FORM_RULES:
        if rule in have and rule not in allowed:
            return 0.0, rule
    if m == "f1":
        return longbench_score(pred, golds), m
    if m == "hotpot_f1":
        return max(hotpot_f1(pred, g) for g in golds), m
    head = (_parts(pred) or [pred])[0]
    why = m
    for gold in golds:
        # "New York, USA": the head is the answer, a qualifier after it earns nothing; unless the gold has parts
        whole = m == "em" or len(_parts(gold)) > 1 or bool(_PAREN.search(gold))
        for p in _norms(pred if whole else head):
            for g in _norms(gold):
                if not g or not p:
                    continue
                if m == "em":
                    if p == g:
                        return 1.0, m
                elif f" {g} " in f" {p} ":  # whole words: "art" is not in "cartoon"
                    # another word beside the gold may be a second candidate ("Paris London", "Paris in London")
                    extra = Counter(_content(p)) - Counter(_content(g))
                    if not extra or (sum(extra.values()) <= cfg.max_extra_words and _phrase_ok(row, p, pred, extra)):
                        return 1.0, m
                    why = "extra_words"
                elif m == "sub_em" and f" {p} " in f" {g} ":
                    if _covers(p, g):
                        return 1.0, m
                    why = "fragment"
    return 0.0, why


# ----------------------------------------------------------------------------- ruler, choice, math
_VALUE = re.compile(r"[^\W_]+(?:-[^\W_]+)*")  # a value is a whole token: "12345677654321" holds no 1234567
_RULER_WORDS = frozenset("special magic number numbers value values word words key keys uuid uuids".split())


def _ruler(pred: str, golds: list[str]) -> tuple[float, str]:
    """Every gold value is in the answer (boxes joined), and no other value is: a candidate list is no answer."""
    toks = _VALUE.findall(_THOUSANDS.sub("", _plain(pred)))
    want = [" ".join(_VALUE.findall(_plain(g))) for g in golds]
    text = f" {' '.join(toks)} "
    if not all(f" {w} " in text for w in want):
        return 0.0, "ruler_all"
    gold_toks = {t for w in want for t in w.split()}
    numeric = [t for t in gold_toks if any(c.isdigit() for c in t)]
    if numeric:  # number values: any other number at least as long as the shortest gold is a candidate
        shortest = min(map(len, numeric))
        extra = [t for t in toks if t not in gold_toks and any(c.isdigit() for c in t) and len(t) >= shortest]
    else:  # word values: any other content word is
        extra = [t for t in toks if t not in gold_toks and t not in _STOP and t not in _RULER_WORDS]
    return (0.0, "extra_values") if extra else (1.0, "ruler_all")


def _choice_letter(s: str) -> str | None:
    """'C', '(C)', 'C)', 'C. 12 km', 'Option C' -> 'C'; a lone lower-case letter counts; 'A cat', 'A) or B)' -> None."""
    s = re.sub(r"(?i)^(?:option|choice)[\s:]*", "", s.strip())
    if m := re.fullmatch(r"\(?([A-Za-z])\)?\.?", s):
        return m.group(1).upper()
    m = re.match(r"\(?([A-Z])[).:]", s)
    if not m or re.search(r"\(?\b[A-Z]\)|\b(?:or|and)\s+\(?[A-Z]\b", s[m.end():]):  # a second option: a hedge
        return None
    return m.group(1)


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
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])")
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
        want = _choice_letter(unwrap(golds[0]))
        got = _choice_letter(pred)
        return out(float(got is not None and got == want), "choice" if got else "choice_unparsed")
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
