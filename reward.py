"""Rule-based rewards and benchmark metrics: every score of the project comes from here (LoongRL, arXiv 2510.19363:
rule-based rewards; the authors' verl fork).

    python reward.py --rows=rows.jsonl --responses=responses.jsonl              # mean reward per source/kind
    python reward.py --rows=rows.jsonl --responses=r.jsonl --qa_metric=f1 --out=scored.jsonl

responses.jsonl holds {"id": <row id>, "response": <text>} lines, several per id allowed.

Answer = content of the last \\boxed{...} / \\fbox{...} / `\\boxed x` after the last </think> (the whole text
when there is none); else the last "the answer is ..."; else the text after </think>. Rewards by row kind:
keychain, qa -> QA rule (qa_metric: substring | sub_em | em | f1 | hotpot_f1); ruler -> every gold in the box;
choice -> the letter; math -> DAPO "Answer:" line / box with Minerva normalization, then math-verify.

Guards against reward hacking, on by default (QA; * = ruler too; empty and too_long also guard math, where
too_long keeps sympy's input short). Each scores 0 and names itself in diag["rule"]:
  * empty      an answer that normalizes to "" ("\\boxed{}", "\\boxed{the}", "..."): "" is a substring of
               every gold, so two-way sub_em would reward saying nothing.
  * multi_box  more than one box after </think>: several boxes are several answers, a hedge that
               scorers reading different boxes (first, last, any) would grade differently.
    braces     "{" or "}" left in a QA answer after unwrapping \\text{..}: sets and nested boxes ("{A}{B}")
               smuggle several answers (the authors' strict mode).
  * too_long   longer than the longest gold (ruler: all golds) by more than max_answer_chars (paper: 128):
               a list of candidates contains the gold.
    yes_no     "yes" and "no" both as words (unless a gold has both): one answer to every yes/no question.
    whole_words substring tests align to word boundaries: character-level, "e" is inside most golds
               (sub_em's prediction-in-gold side) and "art" inside "cartoon".
--guards=false turns them all off (the literal public rules).

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
    rows: str = ""  # CLI: rows .jsonl/.parquet (keychain.py output)
    responses: str = ""  # CLI: {"id", "response"} .jsonl
    out: str = ""  # CLI: optional .jsonl of {"id", "reward", "pred", "rule"} per response
    qa_metric: str = "sub_em"  # substring (public code default) | sub_em (final runs) | em | f1 | hotpot_f1
    guards: bool = True  # master switch for every guard below
    guard_empty: bool = True
    guard_multi_box: bool = True
    guard_braces: bool = True
    guard_yes_no: bool = True
    whole_words: bool = True
    max_answer_chars: int = 128  # too_long slack over the longest gold; < 0 disables
    math_timeout: int = 5  # seconds per math-verify parse/compare (signal based: main thread only)
    workers: int = 0  # processes for math rows in score_batch; 0 = min(cpu count, 8); 1 = inline
    pool_min: int = 32  # fewer math rows than this are scored inline (pool start-up costs more)
    start_method: str = "forkserver"  # fork is unsafe in a trainer that holds threads (CUDA, tokenizers)


QA_METRICS = ("substring", "sub_em", "em", "f1", "hotpot_f1")
DEFAULT = Config()


# ----------------------------------------------------------------------------- answer extraction
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"(?i)\bthe (?:final |correct )?answer is\s*:?[ \t]*")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|emph)\s*\{(.*)\}", re.S)


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def _box_content(s: str, i: int) -> str | None:
    """Content of the box whose command ends at s[i]; None when truncated (unbalanced braces)."""
    j = i
    while j < len(s) and s[j] in " \t":
        j += 1
    if j < len(s) and s[j] == "{":
        depth, k = 0, j
        while k < len(s):
            c = s[k]
            if c == "\\":  # \{ and \} are literal braces, not grouping
                k += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return s[j + 1 : k]
            k += 1
        return None
    if j == i:  # "\boxed5": not a box
        return None
    return s[j:].split("$")[0].split("\n")[0]  # `\boxed x` (MATH style) runs to "$" or the line end


def _unwrap(s: str) -> str:
    """'\\text{Paris}' -> 'Paris': formatting around the whole answer, not part of it."""
    s = s.strip()
    while (m := _WRAPPER.fullmatch(s)) and _balanced(m.group(1)):
        s = m.group(1).strip()
    return s


def _extract(text: str) -> tuple[str | None, int, str]:
    """(answer, boxes after </think>, how it was found)."""
    if not isinstance(text, str):
        return None, 0, "none"
    k = text.rfind("</think>")
    region = text[k + len("</think>") :] if k >= 0 else text
    boxes = list(_BOX.finditer(region))
    if boxes:
        got = _box_content(region, boxes[-1].end())
        return (None if got is None else _unwrap(got)), len(boxes), "box"
    said = None
    for said in _ANSWER_IS.finditer(region):  # the last one, to the end of its line
        pass
    if said:
        return _unwrap(region[said.end() :].split("\n")[0].strip().rstrip(".")), 0, "answer_is"
    if k >= 0 and region.strip():
        return _unwrap(region), 0, "after_think"
    return None, 0, "none"


def extract_answer(text: str) -> str | None:
    """The model's final answer; None when it gave none (no box, no "the answer is", nothing after </think>)."""
    return _extract(text)[0]


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
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


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


# ----------------------------------------------------------------------------- rewards by kind
def _golds(row: dict) -> list[str]:
    a = row.get("answers")
    return [] if a is None else [str(x) for x in ([a] if isinstance(a, (str, int, float)) else a)]


def _contains(hay: str, needle: str, whole_words: bool) -> bool:
    return f" {needle} " in f" {hay} " if whole_words else needle in hay


def _qa_reward(pred: str, golds: list[str], cfg: Config, ww: bool) -> float:
    m = cfg.qa_metric
    if m == "f1":
        return longbench_score(pred, golds)
    if m == "hotpot_f1":
        return max(hotpot_f1(pred, g) for g in golds)
    p = normalize_answer(pred)
    ns = [normalize_answer(g) for g in golds]
    if m == "em":
        return float(p in ns)
    if m == "substring":
        return float(any(_contains(p, g, ww) for g in ns))
    if m == "sub_em":
        return float(any(_contains(p, g, ww) or _contains(g, p, ww) for g in ns))
    raise ValueError(f"unknown qa_metric {m!r} (one of {QA_METRICS})")


def _choice_letter(s: str) -> str | None:
    """'(C)', 'C', 'C) 12 km', 'C. 12' -> 'C'; a lone lower-case letter counts; 'A cat' is no letter."""
    s = s.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", s) or re.match(r"\(?([A-Z])[).:]", s)
    return m.group(1).upper() if m else None


def score(row: dict, response: str, cfg: Config | None = None) -> tuple[float, dict]:
    """Reward of one response to one row, by the row's kind, and {"pred", "rule"} saying what decided."""
    cfg = cfg or DEFAULT
    kind, golds, on = row.get("kind"), _golds(row), cfg.guards
    pred, n_boxes, _ = _extract(response)
    diag: dict[str, Any] = {"pred": pred, "rule": ""}

    def out(r: float, rule: str) -> tuple[float, dict]:
        diag["rule"] = rule
        return float(r), diag

    if kind == "math":  # DAPO: the last "Answer:" line; or the box / fallback answer
        text = response if isinstance(response, str) else ""
        k = text.rfind("</think>")
        lines = _ANSWER_LINE.findall((text[k + len("</think>") :] if k >= 0 else text)[-300:])  # DAPO's tail
        cands = [c for c in (pred, lines[-1] if lines else None) if c is not None]
        if diag["pred"] is None and cands:
            diag["pred"] = cands[0]
        if not cands:
            return out(0, "no_answer")
        if not golds:
            return out(0, "no_gold")
        if on and cfg.guard_empty and not any(c.strip() for c in cands):
            return out(0, "empty")
        limit = max(map(len, golds)) + cfg.max_answer_chars
        if on and cfg.max_answer_chars >= 0:
            cands = [c for c in cands if len(c) <= limit]
            if not cands:
                return out(0, "too_long")
        if any(normalize_final_answer(c) == normalize_final_answer(g) for c in cands for g in golds):
            return out(1, "minerva")
        if any(math_equal(c, g, cfg) for c in cands for g in golds):
            return out(1, "math_verify")
        return out(0, "math_wrong")

    if kind not in ("keychain", "qa", "ruler", "choice"):
        raise ValueError(f"row {row.get('id')!r}: unknown kind {kind!r}")
    if pred is None:
        return out(0, "no_answer")
    if not golds:
        return out(0, "no_gold")
    if on and cfg.guard_multi_box and n_boxes > 1:
        return out(0, "multi_box")

    if kind == "choice":
        want, got = _choice_letter(golds[0]), _choice_letter(pred)
        return out(float(got is not None and got == want), "choice" if got else "choice_unparsed")

    if on and cfg.guard_empty and not normalize_answer(pred):
        return out(0, "empty")
    ref_len = sum(len(g) + 2 for g in golds) if kind == "ruler" else max(map(len, golds))
    if on and cfg.max_answer_chars >= 0 and len(pred) > ref_len + cfg.max_answer_chars:
        return out(0, "too_long")
    if kind == "ruler":  # RULER needles: every value, case-insensitive substring (string_match_all == 100)
        return out(float(all(g.lower() in pred.lower() for g in golds)), "ruler_all")

    if on and cfg.guard_braces and ("{" in pred or "}" in pred):
        return out(0, "braces")
    if on and cfg.guard_yes_no:
        words = set(normalize_answer(pred).split())
        if {"yes", "no"} <= words and not any({"yes", "no"} <= set(normalize_answer(g).split()) for g in golds):
            return out(0, "yes_no")
    if not any(normalize_answer(g) for g in golds):
        return out(0, "no_gold")  # a gold that normalizes to "" ("The", "?") is inside everything
    return out(_qa_reward(pred, golds, cfg, on and cfg.whole_words), cfg.qa_metric)


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


def _score_chunk(rows: list[dict], responses: list[str], cfg: Config) -> list[tuple[float, dict]]:
    return [score(r, t, cfg) for r, t in zip(rows, responses)]


def score_batch(rows: list[dict], responses: list[str], cfg: Config | None = None,
                workers: int | None = None) -> list[tuple[float, dict]]:
    """score() over a batch, in order. Math rows (math-verify: milliseconds each) go to a process pool when
    there are at least cfg.pool_min of them; everything else is microseconds and runs inline, because
    shipping a response to another process costs more than scoring it (bench/bench_reward.py)."""
    global _pool
    cfg = cfg or DEFAULT
    if len(rows) != len(responses):
        raise ValueError(f"score_batch: {len(rows)} rows but {len(responses)} responses")
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
                futures.append((idx, pool.submit(_score_chunk, slim, [responses[i] for i in idx], cfg)))
        except (BrokenProcessPool, RuntimeError, OSError) as e:
            logging.getLogger(__name__).warning("reward pool unavailable (%s); scoring inline", e)
            futures = []
    pending = {i for idx, _ in futures for i in idx}
    for i, (r, t) in enumerate(zip(rows, responses)):
        if i not in pending:
            out[i] = score(r, t, cfg)
    for idx, fut in futures:
        try:
            got = fut.result()
        except BrokenProcessPool:  # a worker died (OOM, signal): never lose a training step over it
            _pool = None
            got = _score_chunk([rows[i] for i in idx], [responses[i] for i in idx], cfg)
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
    try:
        by_id = {}
        for i, row in read_records(cfg.rows):
            if not isinstance(row, dict) or "id" not in row:
                raise DataError(f"{cfg.rows}: record {i}: a row needs an 'id'")
            by_id[str(row["id"])] = row
        pairs = []
        for i, rec in read_records(cfg.responses):
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("response"), str):
                raise DataError(f"{cfg.responses}: record {i}: expected {{\"id\": ..., \"response\": \"...\"}}")
            if str(rec["id"]) not in by_id:
                raise DataError(f"{cfg.responses}: record {i}: id {rec['id']!r} is not among the rows of {cfg.rows}")
            pairs.append((by_id[str(rec["id"])], rec["response"]))
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    results = score_batch([p[0] for p in pairs], [p[1] for p in pairs], cfg)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    rules: Counter = Counter()
    for (row, _), (r, d) in zip(pairs, results):
        groups[(str(row.get("source", "")), str(row.get("kind", "")))].append(r)
        rules[d["rule"]] += 1
    print(f"{'source':<20} {'kind':<10} {'n':>7} {'reward':>8}")
    for (src, kind), rs in sorted(groups.items()):
        print(f"{src:<20} {kind:<10} {len(rs):>7} {sum(rs) / len(rs):>8.4f}")
    allr = [r for r, _ in results]
    print(f"{'all':<20} {'':<10} {len(allr):>7} {sum(allr) / max(len(allr), 1):>8.4f}")
    print("rules: " + ", ".join(f"{k}={v}" for k, v in rules.most_common()))
    if cfg.out:
        write_rows(cfg.out, ({"id": row.get("id"), "reward": r, **d} for (row, _), (r, d) in zip(pairs, results)))


if __name__ == "__main__":
    main(sys.argv[1:])
