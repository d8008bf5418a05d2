r"""KeyChain data synthesis: short multi-hop QA -> long-context RL rows (LoongRL, arXiv 2510.19363:
KeyChain; the authors' synthesis code).

    python keychain.py generate --out_dir=data/raw --n=200          # procedural raw QA, no downloads
    python keychain.py synth --input=data/raw/hotpotqa.json --kind=keychain --tokenizer=... --out=kc.jsonl
    python keychain.py verify --input=kc.jsonl --tokenizer=...
    python keychain.py filter --input=data/raw/hotpotqa.json --counts=counts.jsonl --out=kept.jsonl
    (pass counts are sampled by `curriculum.py filter`: one function with Stage II's hard mining)

What a KeyChain row looks like (the user turn, cut down: `python keychain.py synth --kind=keychain
--max_tokens=4096 --chains=2` on generated data; the real rows have 16 chains at 16K):

    Please read the following text.
    Passage 1:
    Loberul Selvordre
    Loberul Selvordre (born 1921) is a filmmaker. {"42392b87-61c9-4a3c-8d77-548379b4e454": "a7972db6-440d-...
    Loberul Selvordre was born in Ulsavor City. {"90eb4854-125d-48ff-9b79-e413c3a9ce3c": "a20c05a0-1190-..."}.

    Passage 2:
    {"a20c05a0-1190-4b19-8986-ab57fe729656": "In which country was the founder of the company that produced
    The Dunullin born?"}.
    The Polist
    The Polist is a film released in 1954. It was directed by Polmiqui Lobri. {"cd89fc09-91d8-453a-8d77-...":
    "Who was born first, Locasne Nelora or Dunwyn Uldun?"}. It was produced by Venari Films. ...
    ...
    Passage 8:
    Dunber City
    Dunber City is a city in Istrhoari. ... {"a7972db6-440d-4645-b3bf-d9dafe53448f": "90eb4854-125d-..."}. ...
    ...
    In the context above, there is one correct question to answer. The correct question can only be found by
    following the correct consecutive chain of key:value pairs encoded with UUID strings (e.g., f81d4fae-7dec-
    11d0-a765-00a0c91e6bf6), starting from 42392b87-61c9-4a3c-8d77-548379b4e454.

The chain 42392b87 -> a7972db6 -> 90eb4854 -> a20c05a0 -> the real question (gold: Istrhoari); the other chain
ends in a distractor question. The model must follow the keys through the passages, then answer by multi-hop
reasoning over the same passages, in `<think>...</think> \boxed{answer}`.

Pipeline: load raw items -> (difficulty filter) -> fill a context to L = max_tokens with the item's own
documents plus random fillers from the dataset's deduplicated pool -> insert KeyChain UUID chains on top
(kind=keychain: 16 chains of 4 pairs at 16K, the layout of the authors' released training files) or not
(kind=qa) -> one chat row per item. RULER needles and math rows come out of the same `synth` command with
kind=ruler / math / choice. `--budget=total` fits the whole prompt, chains included, inside L instead.

Decisions (the authors' released rows are the default; the other variants are options):
- Layout: documents fill L (the prompt without its pairs fits L), then --chains (1 per 1,024 tokens of L) chains
  of --hops=4 UUID4 pairs go on top: a 16K KeyChain prompt is about 20.5K Qwen2.5 tokens. Plain QA, RULER and math
  rows stay within L.
- Wording: --instruction=code (the authors' code and data: no backticks, the start key bare) or poster (backticks,
  the key in quotes, "Find the correct question first, then answer it."); `verify` reads both.
- RULER rows: 20 needles each (the authors' book_20key_* / book_20value_* files), multi-key and multi-value
  alternating.
- Counting is exact: each pool document is tokenized once, pair costs calibrated once, the final prompt counted
  once; the rare row whose estimate overshot L is rebuilt smaller.
- Distractor questions are other items' distinct normalized questions; filler documents never come from an item
  whose question normalizes to the same one (they would answer it from outside the chain).
- Pairs are written {"<key>": "<value>"}. (JSON strings) after a sentence end or on a line of their own, never two
  at one boundary; keys never repeat in an item; only the chain from the start key ends in the real question.
- Files are written to a temporary name and renamed. Row fields: id, source, kind, messages, answers, num_tokens,
  max_tokens; KeyChain rows add question, start_key, distractor_questions, chains, hops, budget; RULER rows add
  mode, query, depths.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

# ----------------------------------------------------------------------------- prompts (the authors' code)
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "\\boxed{} tags, respectively, i.e., <think> reasoning process here </think> \\boxed{answer here}."
)
PREFILL = "<think>"  # the assistant turn is prefilled with this (authors' chat template)
# the authors' training code and released data (no backticks, no quotes, no closing sentence) ...
KEYCHAIN_PROMPT = (
    "Please read the following text.\n{context}\n\nIn the context above, there is one correct question to "
    "answer. The correct question can only be found by following the correct consecutive chain of key:value "
    "pairs encoded with UUID strings (e.g., f81d4fae-7dec-11d0-a765-00a0c91e6bf6), starting from {start_key}."
)
# ... and the poster's variant (--instruction=poster)
KEYCHAIN_PROMPT_POSTER = (
    "Please read the following text.\n{context}\n\nIn the context above, there is one correct question to "
    "answer. The correct question can only be found by following the correct consecutive chain of key:value "
    "pairs encoded with UUID strings (e.g., `f81d4fae-7dec-11d0-a765-00a0c91e6bf6`), starting from "
    "`\"{start_key}\"`.\nFind the correct question first, then answer it."
)
KEYCHAIN_PROMPTS = {"code": KEYCHAIN_PROMPT, "poster": KEYCHAIN_PROMPT_POSTER}
QA_PROMPT = "The following are given passages.\n{context}\n\nQuestion: {question}"
FILTER_PROMPT = (
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Please think step by step before answering. After thinking, output the final answer in the format of "
    "'The answer is <your answer here>'\n\nQuestion: {question}"
)
RULER_PROMPT = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_v} afterwards.\n{context}\n\nWhat are all the special magic {type_v} for {query} "
    "mentioned in the provided text?"
)
RULER_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
CHOICE_PROMPT = "Question: {problem}\nChoices:{choices}"


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # -- command and files
    command: str = "synth"  # generate | synth | verify | filter | demo
    input: str = ""  # raw file(s), comma separated (synth/filter/verify)
    out: str = ""  # output .jsonl or .parquet (synth/filter)
    out_dir: str = "data/raw"  # generate / demo
    kind: str = "keychain"  # keychain | qa (from QA items) | ruler; task files (verl, DAPO, MathQA) keep their kinds
    format: str = "auto"  # auto | hotpotqa | 2wiki | musique | longbench | verl | dapo | mathqa | items
    source: str = ""  # dataset name; guessed from the file name when empty
    tokenizer: str = ""  # path or hub id; empty = build the tiny byte tokenizer
    n: int = 0  # rows to write (0 = one per input item; ruler: 0 = 64)
    seed: int = 0  # item order, fillers, key values and pair positions: the same seed gives the same rows
    # -- length and layout
    max_tokens: int = 16384  # L: the rendered prompt without the chains fits in it (--budget=total: with them)
    budget: str = "docs"  # docs: documents fill L, chains go on top (released data: 16.3K-20.7K at 16K) | total
    placement: str = "shuffle"  # shuffle | middle (core documents near the middle, truncated Gaussian)
    cut_tasks: bool = False  # task files (verl incl. the released set, DAPO, MathQA): drop rows over max_tokens
    # -- chains
    chains: int = 0  # chains per KeyChain row; 0 = one per 1,024 tokens of L (16 at 16K, the released data)
    hops: int = 4  # keys per chain -> pairs per chain: key1->key2 ... key4->question
    key_style: str = "uuid"  # uuid (36 chars, released data) | short (8 hex, a later commit of the authors' code)
    instruction: str = "code"  # code: the authors' code and released data | poster: backticks, quotes, last sentence
    # -- ruler
    needles: int = 20  # ruler: needles with distinct keys (multi-key) or values (multi-value); authors' 20key/20value
    ruler_mode: str = "mix"  # multikey | multivalue | mix
    haystack: str = ""  # ruler: a plain text file (a book); empty = built-in synthetic haystack
    # -- difficulty filter
    counts: str = ""  # filter: JSONL of {"id", "n", "k"} pass counts (curriculum.py filter samples them)
    lo: int = 1  # filter: keep items with lo <= k <= hi (paper: 1..6 of 8): not trivial ...
    hi: int = 6  # ... and not hopeless for the filter model
    # -- performance
    batch: int = 64  # rows tokenized together in the exact final pass


# ----------------------------------------------------------------------------- KeyChain: the chains (make, insert, parse)
KEY_RE = r"[0-9a-f]{8}(?:-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})?"
PAIR_RE = re.compile(r'( ?)\{"(' + KEY_RE + r')": ("(?:[^"\\]|\\.)*")\}\.')
BOUNDARY_RE = re.compile(r"[.?](?=\s|$)|\n")


def new_key(rng: random.Random, style: str) -> str:
    k = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return k if style == "uuid" else k[:8]


def pair_text(key: str, value: str) -> str:
    return "{" + json.dumps(key) + ": " + json.dumps(value, ensure_ascii=False) + "}."


def make_chains(rng: random.Random, questions: list[str], hops: int, style: str) -> tuple[str, list[tuple[str, str]]]:
    """One chain per question (the first is the real one): key1->key2 ... key_h->question. Keys never repeat."""
    seen: set = set()
    pairs, start = [], ""
    for q in questions:
        keys = []
        while len(keys) < hops:
            k = new_key(rng, style)
            if k not in seen:
                seen.add(k)
                keys.append(k)
        start = start or keys[0]
        pairs += list(zip(keys, keys[1:] + [q]))
    return start, pairs


def insert_pairs(context: str, pairs: list[tuple[str, str]], rng: random.Random) -> str | None:
    """Shuffle the pairs into distinct random sentence boundaries (after '.', '?' or a newline)."""
    bounds = [m.end() for m in BOUNDARY_RE.finditer(context)]
    if len(bounds) < len(pairs):
        return None
    order = pairs[:]
    rng.shuffle(order)
    at = sorted(rng.sample(bounds, len(order)))
    out, prev = [], 0
    for pos, (k, v) in zip(at, order):
        out.append(context[prev:pos])
        # a space after '.'/'?'; after a newline the pair gets its own line
        out.append(pair_text(k, v) + "\n" if context[pos - 1] == "\n" else " " + pair_text(k, v))
        prev = pos
    out.append(context[prev:])
    return "".join(out)


def parse_pairs(text: str) -> tuple[str, list[tuple[str, str, int]]]:
    """Inverse of insert_pairs: (text without pairs, [(key, value, offset in that text)])."""
    out, pairs, prev = [], [], 0
    stripped_len = 0
    for m in PAIR_RE.finditer(text):
        space, key, val = m.group(1), m.group(2), json.loads(m.group(3))
        end = m.end()
        if not space and text[end:end + 1] == "\n":
            end += 1
        out.append(text[prev:m.start()])
        stripped_len += m.start() - prev
        pairs.append((key, val, stripped_len))
        prev = end
    out.append(text[prev:])
    return "".join(out), pairs


# ----------------------------------------------------------------------------- context filling
def count_tokens(tok, texts: list[str]) -> list[int]:
    """Token counts of many texts in one batched (Rust-parallel) tokenizer call."""
    return [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


class Pool:
    """The deduplicated documents of one dataset, each tokenized exactly once, plus its questions."""

    def __init__(self, tok, items: list[dict], chunk: int = 2048):
        from tqdm import tqdm

        # 1) every distinct document once, with its token count (a 90,000-item pool: tokenized in chunks)
        self.docs = list(dict.fromkeys(d for it in items for d in it["docs"]))
        self.index = {d: i for i, d in enumerate(self.docs)}
        self.ntok: list[int] = []
        for s in tqdm(range(0, len(self.docs), chunk), desc="tokenize pool", unit="chunk", leave=False,
                      disable=len(self.docs) <= chunk):
            self.ntok += count_tokens(tok, self.docs[s:s + chunk])
        self.order = sorted(range(len(self.docs)), key=lambda j: self.ntok[j])  # by cost, to top up the tail
        self.sorted_ntok = [self.ntok[j] for j in self.order]
        # 2) the questions: distractor candidates for the chains
        self.questions = list(dict.fromkeys(it["question"] for it in items))
        # normalized once per pool: one representative question per normalized form (distractor candidates),
        # and the documents of every item asking it (never fillers of another item with the same question)
        self.norm = {q: norm_q(q) for q in self.questions}
        self.distinct = list({self.norm[q]: q for q in reversed(self.questions)}.values())[::-1]
        self.docs_of: dict[str, set[int]] = {}
        for it in items:
            self.docs_of.setdefault(self.norm[it["question"]], set()).update(self.index[d] for d in it["docs"])
        # 3) the cost of the "Passage i:" headers and separators, so that estimates add up to the real count
        self.tok = tok
        self.sep = 0.0
        self.headers = [0.0]
        # what joining with "\n\n" really costs per passage (".\n\n" is one token in Qwen's BPE), measured once
        sample = random.Random(0).sample(self.docs, min(len(self.docs), 200))
        if len(sample) > 1:
            alone = sum(self.ntok[self.index[d]] for d in sample) + sum(self.header(i + 1) for i in range(len(sample)))
            self.sep = (count_tokens(tok, [passages(sample)])[0] - alone) / (len(sample) - 1)
            self.headers = [0.0]  # recomputed with the measured separator

    def header(self, i: int) -> float:
        """Tokens of the "Passage i:\n" header plus its separator (digits may tokenize one by one)."""
        while len(self.headers) <= i:
            nxt = range(len(self.headers), len(self.headers) + 256)
            self.headers += [c + self.sep for c in count_tokens(self.tok, [f"Passage {k}:\n" for k in nxt])]
        return self.headers[i]


def fill_context(item: dict, pool: Pool, budget: int, rng: random.Random, placement: str = "shuffle") -> list[str] | None:
    """Core documents + random fillers (never the item's own) whose estimated tokens fit `budget`.

    Returns the passages in order, or None when the core documents alone do not fit.
    """
    import bisect

    # 1) the item's own documents must fit, or there is no row
    core = list(dict.fromkeys(pool.index[d] for d in item["docs"]))
    used = sum(pool.ntok[j] + pool.header(i + 1) for i, j in enumerate(core))
    if used > budget:
        return None
    # documents of other items with the same (normalized) question would answer it from a filler: never drawn
    taken = set(core) | pool.docs_of.get(pool.norm.get(item["question"], ""), set())
    fillers: list[int] = []
    misses = 0
    # 2) random fillers that still fit, until none does (rejection sampling, then one scan when nearly used up)
    while True:
        head = pool.header(len(core) + len(fillers) + 1)  # passage numbers 1..n cost the same in any order
        k = bisect.bisect_right(pool.sorted_ntok, budget - used - head)  # only documents that still fit
        if k == 0:
            break
        j = pool.order[rng.randrange(k)]
        if j in taken:
            misses += 1
            if misses < 8:
                continue
            free = [j for j in pool.order[:k] if j not in taken]  # small pool nearly used up: scan once
            if not free:
                break
            j = rng.choice(free)
        misses = 0
        taken.add(j)
        fillers.append(j)
        used += pool.ntok[j] + head
    # 3) the order of the passages: all shuffled, or the core ones near the middle
    n = len(core) + len(fillers)
    slots: list[int | None] = [None] * n
    if placement == "middle":  # truncated Gaussian around the middle, sigma 0.30 of the range, |z| <= 0.95
        for j in core:
            z = max(-0.95, min(0.95, rng.gauss(0.0, 0.30)))
            pos = round((z + 1) / 2 * (n - 1))
            free = min((p for p in range(n) if slots[p] is None), key=lambda p: (abs(p - pos), p))
            slots[free] = j
        rest = fillers[:]
        rng.shuffle(rest)
        it = iter(rest)
        slots = [s if s is not None else next(it) for s in slots]
    elif placement == "shuffle":
        slots = core + fillers
        rng.shuffle(slots)
    else:
        raise ValueError(f"placement must be shuffle or middle, got {placement!r}")
    return [pool.docs[j] for j in slots]


def passages(docs: list[str]) -> str:
    return "\n\n".join(f"Passage {i + 1}:\n{d}" for i, d in enumerate(docs))


# ----------------------------------------------------------------------------- building a row
def norm_q(q: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", q.lower()).split())


class Budget:
    """Token-cost estimates for the parts of a prompt that are not tokenized before the final exact pass.

    Pair costs are calibrated once on random keys; questions and documents are tokenized once each.
    The final prompt is always tokenized exactly; an estimate that overshoots L only costs a rebuild.
    """

    def __init__(self, tok, pool: Pool, style: str, seed: int = 0, instruction: str = "code"):
        rng = random.Random(f"calibrate/{seed}")
        qs = pool.questions
        self.qtok = dict(zip(qs, count_tokens(tok, qs)))
        keys = [new_key(rng, style) for _ in range(257)]
        kk = count_tokens(tok, [" " + pair_text(a, b) for a, b in zip(keys, keys[1:])])
        sample = [rng.choice(qs) for _ in range(64)]
        kq = [c - self.qtok[q] for c, q in zip(count_tokens(tok, [" " + pair_text(k, q) for k, q in zip(keys, sample)]), sample)]
        self.kk, self.kk_var = _mean_var(kk)
        self.kq, self.kq_var = _mean_var(kq)
        self.q_mean = sum(self.qtok.values()) / len(self.qtok)
        # the instruction around an empty context: the same for every item (start keys have one length)
        self.instruction = prompt_tokens(tok, KEYCHAIN_PROMPTS[instruction].format(context="", start_key=new_key(rng, style)))

    def pairs(self, questions: list[str], hops: int) -> int:
        n_kk, n_kq = len(questions) * (hops - 1), len(questions)
        sd = math.sqrt(n_kk * self.kk_var + n_kq * self.kq_var)
        return math.ceil(n_kk * self.kk + n_kq * self.kq + sum(self.qtok[q] for q in questions) + 4 * sd + 4)


def _mean_var(xs: list[int]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, sum((x - m) ** 2 for x in xs) / len(xs)


def prompt_tokens(tok, user: str) -> int:
    return prompt_tokens_msgs(tok, chat(user))


def build_row(item: dict, kind: str, pool: Pool, budget: Budget, tok, cfg: Config, slack: int = 0) -> tuple[dict | None, str]:
    """One keychain/qa row whose estimated prompt fits cfg.max_tokens - slack, or (None, skip reason)."""
    rng = random.Random(f"{cfg.seed}/{item['source']}/{kind}/{item['id']}")  # per item: rows do not depend on order
    L = cfg.max_tokens - slack
    q = item["question"]
    row = {"id": f"{item['source']}-{kind}-{item['id']}", "source": item["source"], "kind": kind,
           "answers": item["answers"], "question": q, "max_tokens": cfg.max_tokens}
    if kind == "qa":  # plain QA: the question after the passages, no chains
        room = L - prompt_tokens(tok, QA_PROMPT.format(context="", question=q))
        docs = fill_context(item, pool, room, rng, cfg.placement)
        if docs is None:
            return None, "core documents exceed the budget"
        row["messages"] = chat(QA_PROMPT.format(context=passages(docs), question=q))
        return row, ""
    # 1) chains: the real question plus distinct distractor questions of other items (normalized once per pool)
    n_chains = cfg.chains or max(1, round(cfg.max_tokens / 1024))
    real = pool.norm.get(q) or norm_q(q)
    picks = rng.sample(range(len(pool.distinct)), min(len(pool.distinct), n_chains))
    distract = [x for x in (pool.distinct[j] for j in picks) if pool.norm[x] != real][:n_chains - 1]
    if len(distract) < n_chains - 1:
        return None, "too few distractor questions"
    start, pairs = make_chains(rng, [q] + distract, cfg.hops, cfg.key_style)
    # 2) documents: fill L (released layout: the chains go on top) or what the chains leave of it (--budget=total)
    room = L - budget.instruction - 2
    if cfg.budget == "total":
        room -= budget.pairs([q] + distract, cfg.hops)
    docs = fill_context(item, pool, room, rng, cfg.placement)
    if docs is None:
        return None, "core documents exceed the budget" if cfg.budget == "docs" else "core documents and chains exceed the budget"
    # 3) pairs at distinct random sentence boundaries
    ctx = insert_pairs(passages(docs), pairs, rng)
    if ctx is None:
        return None, "fewer sentence boundaries than pairs"
    # 4) the instruction names the first key; the row keeps what verify and the reward need
    prompt = KEYCHAIN_PROMPTS[cfg.instruction]
    row["messages"] = chat(prompt.format(context=ctx, start_key=start))
    row.update(start_key=start, distractor_questions=distract, chains=n_chains, hops=cfg.hops, budget=cfg.budget)
    if cfg.budget == "docs":  # the prompt without its pairs is what must fit L: counted exactly in finalize()
        row["_plain"] = chat(prompt.format(context=passages(docs), start_key=start))
    return row, ""


# ----------------------------------------------------------------------------- RULER-style needles
WORDS = ["amber", "brisk", "cobalt", "dusky", "eager", "fabled", "gentle", "hollow", "ivory", "jagged", "keen",
         "lunar", "mellow", "nimble", "opal", "placid", "quartz", "russet", "silent", "tawny", "umber", "vivid",
         "woolen", "zesty"]
NOUNS = ["harbor", "lantern", "meadow", "orchard", "pebble", "quill", "river", "saddle", "thistle", "valley",
         "willow", "anchor", "beacon", "canyon", "ember", "falcon", "garnet", "heron", "islet", "juniper"]


def haystack_sentences(path: str = "", seed: int = 0, n: int = 4000) -> list[str]:
    """Sentences of a user's text file (a book), or a built-in synthetic haystack."""
    if path:
        text = " ".join(Path(path).read_text(encoding="utf-8", errors="replace").split())
        sents = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        if len(sents) < 10:
            raise DataError(f"{path}: a haystack needs at least 10 sentences, found {len(sents)}")
        return sents
    rng = random.Random(f"haystack/{seed}")
    return [f"The {rng.choice(WORDS)} {rng.choice(NOUNS)} {rng.choice(['rests', 'waits', 'glows', 'drifts', 'hums'])} "
            f"{rng.choice(['near', 'beyond', 'under', 'beside'])} the {rng.choice(WORDS)} {rng.choice(NOUNS)}."
            for _ in range(n)]


def ruler_row(i: int, sents: list[str], sent_tok: list[int], tok, cfg: Config, slack: int = 0) -> tuple[dict | None, str]:
    rng = random.Random(f"{cfg.seed}/ruler/{i}")
    mode = cfg.ruler_mode if cfg.ruler_mode != "mix" else ("multikey", "multivalue")[i % 2]
    keys = set()
    while len(keys) < (cfg.needles if mode == "multikey" else 1):
        keys.add(f"{rng.choice(WORDS)}-{rng.choice(NOUNS)}")
    keys = sorted(keys)
    rng.shuffle(keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(cfg.needles)]
    needles = [RULER_NEEDLE.format(type_v="numbers", key=keys[j % len(keys)], value=v) for j, v in enumerate(values)]
    query, answers = keys[0], values[:1] if mode == "multikey" else values
    room = (cfg.max_tokens - slack - prompt_tokens(tok, RULER_PROMPT.format(type_v="numbers", context="", query=query))
            - sum(count_tokens(tok, [" " + s for s in needles])) - 4)
    hay, used, j = [], 0, rng.randrange(len(sents))
    while len(hay) < len(sents) and used + sent_tok[j] <= room:
        hay.append(sents[j])
        used += sent_tok[j]
        j = (j + 1) % len(sents)
    if len(hay) < max(2, len(needles) - 1):  # each needle needs its own gap between sentences
        return None, "haystack budget too small"
    at = sorted(rng.sample(range(len(hay) + 1), len(needles)))
    for pos, nd in zip(reversed(at), reversed(needles)):  # from the back, so earlier positions stay valid
        hay.insert(pos, nd)
    depths = [round(hay.index(nd) / (len(hay) - 1), 4) for nd in needles]
    row = {"id": f"ruler-{mode}-{i}", "source": "ruler", "kind": "ruler", "answers": answers, "mode": mode,
           "query": query, "depths": depths, "max_tokens": cfg.max_tokens,
           "messages": chat(RULER_PROMPT.format(type_v="numbers", context=" ".join(hay), query=query))}
    return row, ""


# ----------------------------------------------------------------------------- the synth driver
def finalize(rows: list[tuple[dict, Any]], tok, cfg: Config, rebuild, stats: dict) -> list[dict]:
    """Exact pass: tokenize each final prompt once (batched), and for rows with chains on top (--budget=docs)
    the prompt without its pairs too; rebuild the rare row whose estimate overshot L with a smaller budget."""
    out = []
    counts = count_tokens(tok, [render_prompt(tok, r["messages"]) for r, _ in rows])
    plain = iter(count_tokens(tok, [render_prompt(tok, r["_plain"]) for r, _ in rows if "_plain" in r]))
    for (row, key), n in zip(rows, counts):
        fit = next(plain) if "_plain" in row else n  # the part of the prompt that L budgets
        slack = 0
        for _ in range(4):
            if fit <= cfg.max_tokens:
                break
            slack += fit - cfg.max_tokens + 8
            stats["rebuilt"] = stats.get("rebuilt", 0) + 1
            row, why = rebuild(key, slack)
            if row is None:
                break
            n = prompt_tokens_msgs(tok, row["messages"])
            fit = prompt_tokens_msgs(tok, row["_plain"]) if "_plain" in row else n
        if row is None or fit > cfg.max_tokens:
            stats["skip: over budget after rebuilds"] = stats.get("skip: over budget after rebuilds", 0) + 1
            continue
        row.pop("_plain", None)
        row["num_tokens"] = n
        out.append(row)
    return out


def prompt_tokens_msgs(tok, messages: list[dict]) -> int:
    return count_tokens(tok, [render_prompt(tok, messages)])[0]


def file_format(path: str, fmt: str = "auto") -> str:
    """A file's format, from --format or its first record."""
    if fmt != "auto":
        return fmt
    for i, rec in read_records(path):
        return guess_format(rec, f"{path}: record {i}")
    raise DataError(f"{path}: no records")


def synth(cfg: Config, tok) -> tuple[list[dict], dict]:
    """Rows from cfg.input (comma separated, one pool per file). QA items become cfg.kind (keychain | qa) rows;
    files that already hold tasks (verl parquet, DAPO, MathQA) keep their own kinds; kind=ruler needs no input."""
    stats: dict = {}
    rows: list[dict] = []
    # 1) RULER rows need no input: a haystack and generated needles
    if cfg.kind == "ruler":
        sents = haystack_sentences(cfg.haystack, cfg.seed)
        sent_tok = count_tokens(tok, [" " + s for s in sents])
        build = lambda i, slack=0: ruler_row(i, sents, sent_tok, tok, cfg, slack)  # noqa: E731
        stats["requested"] = cfg.n or 64
        return _run(list(range(cfg.n or 64)), build, tok, cfg, stats), stats
    for path in filter(None, cfg.input.split(",")):
        fmt = file_format(path, cfg.format)
        pick = random.Random(f"{cfg.seed}/select/{Path(path).name}")  # not the folder: same rows wherever the data lives
        # 2) files that already hold tasks: counted, kept whole (unless --cut_tasks), sampled down to n
        if fmt in ("verl", "dapo", "mathqa"):
            short = []
            loaded = load_rows(path, fmt, cfg.source)
            stats["requested"] = stats.get("requested", 0) + (min(cfg.n, len(loaded)) if cfg.n else len(loaded))
            ns = []
            for s in range(0, len(loaded), cfg.batch):  # batched: the released set holds 16K-20K-token rows
                ns += count_tokens(tok, [render_prompt(tok, r["messages"]) for r in loaded[s:s + cfg.batch]])
            for r, n in zip(loaded, ns):
                if cfg.cut_tasks and n > cfg.max_tokens:  # finished tasks are kept whole unless asked
                    stats["skip: over budget"] = stats.get("skip: over budget", 0) + 1
                    continue
                short.append({**r, "num_tokens": n})
            rows += pick.sample(short, cfg.n) if 0 < cfg.n < len(short) else short
            continue
        if cfg.kind not in ("keychain", "qa"):
            raise SystemExit(f"{path} holds QA items: use --kind=keychain or --kind=qa")
        # 3) QA items: one pool per file, then rows until n are built (items that do not fit are replaced)
        items, skips = load_items(path, fmt, cfg.source)
        for k, v in skips.items():
            stats[f"skip: {k}"] = stats.get(f"skip: {k}", 0) + v
        pool = Pool(tok, items)
        budget = Budget(tok, pool, cfg.key_style, cfg.seed, cfg.instruction) if cfg.kind == "keychain" else None
        order = items[:]
        if 0 < cfg.n < len(items):
            pick.shuffle(order)
        build = lambda it, slack=0, pool=pool, budget=budget: build_row(it, cfg.kind, pool, budget, tok, cfg, slack)  # noqa: E731
        want = min(cfg.n, len(items)) if cfg.n else len(items)
        got: list[dict] = []
        start = 0
        stats["requested"] = stats.get("requested", 0) + (cfg.n or len(items))
        while len(got) < want and start < len(order):  # items skipped for the budget are replaced by the next ones
            chunk = order[start:start + want - len(got)]
            start += len(chunk)
            got += _run(chunk, build, tok, cfg, stats, desc=Path(path).name)
        rows += got
    return rows, stats


def _run(jobs: list, build, tok, cfg: Config, stats: dict, desc: str = "ruler") -> list[dict]:
    from tqdm import tqdm

    out, pending = [], []
    for job in tqdm(jobs, desc=f"{cfg.kind} {desc}", unit="row", dynamic_ncols=True):
        row, why = build(job)
        if row is None:
            stats[f"skip: {why}"] = stats.get(f"skip: {why}", 0) + 1
            continue
        pending.append((row, job))
        if len(pending) >= cfg.batch:
            out += finalize(pending, tok, cfg, build, stats)
            pending = []
    return out + finalize(pending, tok, cfg, build, stats)


def summarize(rows: list[dict], stats: dict) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault((r["source"], r["kind"]), []).append(r.get("num_tokens", 0))
    lines = [f"{'source':<14}{'kind':<10}{'rows':>7}{'min tok':>9}{'mean tok':>10}{'max tok':>9}"]
    for (s, k), ns in sorted(by.items()):
        lines.append(f"{s:<14}{k:<10}{len(ns):>7}{min(ns):>9}{sum(ns) / len(ns):>10.0f}{max(ns):>9}")
    lines += [f"{k}: {v}" for k, v in sorted(stats.items()) if k != "requested"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- verify
def verify_row(row: dict, tok=None) -> list[str]:
    """Every invariant of a KeyChain row, re-derived from its text alone. Returns the violations."""
    errs = []
    user = next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), "")
    head, tail = "Please read the following text.\n", "\n\nIn the context above, there is one correct question"
    start = start_key(user)  # either wording: the authors' code (bare key) or the poster's (`"key"`)
    if not user.startswith(head) or tail not in user or not start or not re.fullmatch(KEY_RE, start):
        return ["prompt does not follow the KeyChain instruction template"]
    ctx = user[len(head):user.rindex(tail)]
    plain, pairs = parse_pairs(ctx)
    nxt: dict = {}
    for k, v, _ in pairs:
        if k in nxt:
            errs.append(f"key {k} repeats")
        nxt[k] = v
    if row.get("start_key") not in (None, start):
        errs.append(f"start key {start} differs from the row's start_key {row.get('start_key')}")
    pointed = [v for v in nxt.values() if v in nxt]
    if len(pointed) != len(set(pointed)):
        errs.append("two keys point to the same key")
    heads = [k for k in nxt if k not in set(pointed)]
    if start not in nxt:
        errs.append(f"start key {start} has no pair")
    hops = row.get("hops")
    ends = {}
    for h in heads:
        k, steps = h, 0
        while k in nxt and nxt[k] in nxt and steps <= len(nxt):
            k, steps = nxt[k], steps + 1
        ends[h] = (nxt.get(k), steps + 1)
        if hops and steps + 1 != hops:
            errs.append(f"chain from {h} has {steps + 1} pairs, expected {hops}")
    if len(pairs) != sum(n for _, n in ends.values()):
        errs.append("pairs that belong to no chain (a cycle)")
    if row.get("chains") and len(heads) != row["chains"]:
        errs.append(f"{len(heads)} chains, expected {row['chains']}")
    q = row.get("question")
    if start in ends and q is not None and ends[start][0] != q:
        errs.append(f"the chain from the start key ends in {ends[start][0]!r}, not the real question")
    if q is not None:
        others = [h for h, (v, _) in ends.items() if h != start and v is not None and norm_q(v) == norm_q(q)]
        if others:
            errs.append(f"{len(others)} other chain(s) also reach the real question")
    if row.get("distractor_questions") is not None:
        got = sorted(v for h, (v, _) in ends.items() if h != start)
        if got != sorted(row["distractor_questions"]):
            errs.append("distractor chains do not end in the row's distractor_questions")
    offs = [o for _, _, o in pairs]
    if len(set(offs)) != len(offs):
        errs.append("two pairs share a sentence boundary")
    for k, _, o in pairs:
        if not (o > 0 and (plain[o - 1] == "\n" or (plain[o - 1] in ".?" and (o == len(plain) or plain[o].isspace())))):
            errs.append(f"pair of key {k} is not at a sentence boundary")
    for k in nxt:
        if k in plain:
            errs.append(f"key {k} also appears outside its pair")
    if tok is not None:
        n = prompt_tokens_msgs(tok, row["messages"])
        if n != row.get("num_tokens"):
            errs.append(f"prompt has {n} tokens, row says {row.get('num_tokens')}")
        if row.get("max_tokens") and row.get("budget", "total") == "total" and n > row["max_tokens"]:
            errs.append(f"prompt has {n} tokens, over the budget {row['max_tokens']}")
        if row.get("max_tokens") and row.get("budget") == "docs":  # chains on top: the rest must fit L
            msgs = [{**m, "content": m["content"].replace(ctx, plain)} if m.get("role") == "user" else m
                    for m in row["messages"]]
            n_plain = prompt_tokens_msgs(tok, msgs)
            if n_plain > row["max_tokens"]:
                errs.append(f"prompt without its pairs has {n_plain} tokens, over the budget {row['max_tokens']}")
    return errs


# ----------------------------------------------------------------------------- difficulty filter
def read_counts(path: str) -> dict[str, tuple[int, int]]:
    """Pass counts file: JSONL, one {"id": item id, "n": samples, "k": correct} per line."""
    counts = {}
    for i, rec in read_records(path):
        where = f"{path}: record {i}"
        n, k = _field(rec, "n", where, int), _field(rec, "k", where, int)
        if not 0 <= k <= n or n == 0:
            raise DataError(f"{where}: need 0 <= k <= n and n > 0, got n={n} k={k}")
        counts[str(_field(rec, "id", where))] = (n, k)
    return counts


def filter_items(items: list[dict], counts: dict, lo: int, hi: int) -> tuple[list[dict], dict]:
    """Keep items solved by lo..hi of n samples (paper: 1..6 of 8): neither trivial nor hopeless."""
    kept, stats = [], {"kept": 0, "too easy": 0, "too hard": 0, "no count": 0}
    for it in items:
        if it["id"] not in counts:
            stats["no count"] += 1
            continue
        k = counts[it["id"]][1]
        key = "too hard" if k < lo else "too easy" if k > hi else "kept"
        stats[key] += 1
        if key == "kept":
            kept.append(it)
    return kept, stats


def filter_prompt(item: dict) -> str:
    """The user turn the pass counts are sampled with: the item's own documents joined by "\n", no "Passage"
    headers (the authors' filter), then "The answer is ..." (see curriculum.filter_correct)."""
    return FILTER_PROMPT.format(context="\n".join(item["docs"]), question=item["question"])


# ----------------------------------------------------------------------------- raw loaders
# An item is {"id", "source", "question", "answers": [...], "docs": [...]}: the short-context QA unit.
def _field(rec: Any, key: str, where: str, types: type | tuple = object) -> Any:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], types):
        raise DataError(f"{where}: field {key!r} has type {type(rec[key]).__name__}")
    return rec[key]


def _hotpot_docs(ctx: Any, where: str) -> list[str]:
    if isinstance(ctx, dict):  # mirrors' dict-of-lists shape: {"title": [...], "sentences": [[...]]}
        titles, sents = ctx.get("title"), ctx.get("sentences")
        if not isinstance(titles, list) or not isinstance(sents, list) or len(titles) != len(sents):
            raise DataError(f"{where}: context dict needs equal-length 'title' and 'sentences' lists")
        pairs = list(zip(titles, sents))
    elif isinstance(ctx, list):
        pairs = ctx
    else:
        raise DataError(f"{where}: context must be a list of [title, sentences] or a dict of lists")
    docs = []
    for j, p in enumerate(pairs):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
                and all(isinstance(s, str) for s in p[1])):
            raise DataError(f"{where}: context[{j}] is not a [title, [sentences]] pair")
        docs.append(doc_text(p[0], join_sentences(p[1])))
    return docs


def guess_format(rec: Any, where: str = "record") -> str:
    if isinstance(rec, dict):
        if "paragraphs" in rec:
            return "musique"
        if "data_source" in rec and "prompt" in rec:
            return "verl"
        if "Problem" in rec and "options" in rec:
            return "mathqa"
        if "docs" in rec and "question" in rec:
            return "items"
        if {"input", "context", "answers"} <= rec.keys():
            return "longbench"
        if "context" in rec and "question" in rec:
            return "hotpotqa"  # 2Wiki has the same shape
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(f"{where}: cannot tell the format (keys {keys}); pass --format")


def guess_source(path: str) -> str:
    name = Path(path).name.lower()
    for key, src in (("hotpot", "hotpotqa"), ("2wiki", "2wiki"), ("musique", "musique"), ("dapo", "dapo"),
                     ("mathqa", "mathqa")):
        if key in name:
            return src
    return Path(path).name.split(".")[0]


# the raw shapes each named source comes in: a --source that names another dataset is probably a mistake
SOURCE_FORMATS = {"hotpotqa": {"hotpotqa", "2wiki"}, "2wiki": {"hotpotqa", "2wiki"}, "musique": {"musique"},
                  "dapo": {"verl", "dapo"}, "mathqa": {"mathqa"}}


def check_source(path: str, fmt: str, source: str) -> None:
    """Warn when --source names a dataset whose raw shape is not the one detected in the file."""
    if source in SOURCE_FORMATS and fmt not in SOURCE_FORMATS[source] | {"items", "longbench"}:
        print(f"warning: {path}: --source={source} but the records look like {fmt}", file=sys.stderr)


def load_items(path: str, fmt: str = "auto", source: str = "") -> tuple[list[dict], dict]:
    """Raw QA file -> items. Returns (items, skip counts). Malformed records raise DataError(file, record)."""
    default = source or guess_source(path)
    items, skips = [], {}
    for i, rec in read_records(path):
        where = f"{path}: record {i}"
        if fmt == "auto":  # the first record decides for the file
            fmt = guess_format(rec, where)
            check_source(path, fmt, source)
        f = fmt
        src = default
        if f in ("hotpotqa", "2wiki"):
            rid = rec.get("_id", rec.get("id")) if isinstance(rec, dict) else None
            q, a = _field(rec, "question", where, str), _field(rec, "answer", where, str)
            item = {"id": str(rid if rid is not None else i), "question": q, "answers": [a],
                    "docs": _hotpot_docs(_field(rec, "context", where), where)}
        elif f == "musique":
            if not _field(rec, "answerable", where, bool):
                skips["unanswerable"] = skips.get("unanswerable", 0) + 1
                continue
            paras = _field(rec, "paragraphs", where, list)
            docs = []
            for j, p in enumerate(paras):
                docs.append(doc_text(_field(p, "title", f"{where} paragraph {j}", str),
                                     _field(p, "paragraph_text", f"{where} paragraph {j}", str)))
            aliases = rec.get("answer_aliases") or []
            item = {"id": str(_field(rec, "id", where)), "question": _field(rec, "question", where, str),
                    "answers": [_field(rec, "answer", where, str)] + [x for x in aliases if isinstance(x, str)],
                    "docs": docs}
        elif f == "longbench":
            ans = _field(rec, "answers", where, list)
            item = {"id": str(rec.get("_id", i)), "question": _field(rec, "input", where, str),
                    "answers": [str(x) for x in ans], "docs": [_field(rec, "context", where, str)]}
            src = source or rec.get("dataset") or default
        elif f == "items":
            item = {k: _field(rec, k, where) for k in ("id", "question", "answers", "docs")}
            src = source or rec.get("source") or default
        else:
            raise DataError(f"{where}: format {f!r} holds finished tasks, not QA items")
        if not item["question"].strip() or not any(a.strip() for a in item["answers"]) or not item["docs"]:
            raise DataError(f"{where}: empty question, answer or context")
        item["source"] = src
        items.append(item)
    return items, skips


DAPO_WRAP = re.compile(r"^Solve the following math problem step by step\..*?\n\n(.*)\n\nRemember to put your answer "
                       r"on its own line after \"Answer:\"\.?\s*$", re.S)
CHOICE_RE = re.compile(r"([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)", re.S)


# The authors' data_source prefixes, as their verl fork's reward dispatch reads them (verl/utils/reward_score/
# __init__.py, _default_compute_score; the examples/data_preprocess scripts write them as prefix + the input file's
# stem, e.g. "custom_longcontext_needle_qa_2wikimqa_qwen_filtered-num_sample_39679-max_seq_16384-distractor"), and
# the row kind that scores each the same way. "needle" in the KeyChain prefix names the chain, not a RULER needle.
VERL_PREFIXES = (("custom_longcontext_needle_qa_", "keychain"), ("custom_longcontextqa_", "qa"),
                 ("custom_longcontextchoice_", "choice"), ("custom_mathqa_choice_", "choice"),
                 ("custom_rulerniah_", "ruler"), ("custom_sentence_needle_", "ruler"), ("custom_math_", "math"))
VERL_DATASETS = {"hotpotqa": "hotpotqa", "2wikimqa": "2wiki", "musique": "musique"}  # the authors' -> our source names


def verl_kind(data_source: str, text: str) -> str:
    """The released verl parquet names each row's origin in data_source; map it to our row kinds. The authors'
    prefixes decide by name alone; other names by the instruction text first (a KeyChain row and a plain QA row
    may share a source name), then by words in the name."""
    ds = data_source.lower()
    for prefix, kind in VERL_PREFIXES:
        if ds.startswith(prefix):
            return kind
    if "keychain" in ds or "consecutive chain of key:value" in text:
        return "keychain"
    if "mathqa" in ds or "choice" in ds:
        return "choice"
    # RULER-style needles: book_20key_*, book_20value_* and the sentence-needle rows ("needle", "niah")
    if any(s in ds for s in ("ruler", "niah", "needle", "book", "key", "value")) or "special magic" in text:
        return "ruler"
    if "math" in ds or "dapo" in ds or "aime" in ds or "gsm" in ds:
        return "math"
    if any(s in ds for s in ("hotpot", "musique", "2wiki", "wiki", "qa")):
        return "qa"
    raise DataError(f"unknown data_source {data_source!r}")


def verl_source(data_source: str) -> str | None:
    """Our short source name for an authors' data_source (hotpotqa, 2wiki, musique, else the name after the
    prefix, e.g. book_20key_10k_512); None for other names."""
    ds = data_source.lower()
    for prefix, _ in VERL_PREFIXES:
        if ds.startswith(prefix):
            rest = ds[len(prefix):]
            found = [ours for theirs, ours in VERL_DATASETS.items() if rest.startswith(theirs)]
            return found[0] if found else rest
    return None


# the start key in any wording: `"<key>"` (poster), bare (the authors' code), bare + the poster's last sentence
# (their "_1line" variant)
START_RE = re.compile(r'starting from (?:`"(?P<q>[^"`]+)"`|(?P<b>[0-9a-fA-F-]{8,36}))\.'
                      r'(?:\nFind the correct question first, then answer it\.)?\s*$')


def start_key(user: str) -> str | None:
    m = START_RE.search(user)
    return (m.group("q") or m.group("b")) if m else None


def load_rows(path: str, fmt: str = "auto", source: str = "") -> list[dict]:
    """Files that already are single-turn tasks (verl parquet incl. DAPO-Math-17k, MathQA) -> our rows."""
    rows, seen = [], set()
    for i, rec in read_records(path):
        where = f"{path}: record {i}"
        if fmt == "auto":
            fmt = guess_format(rec, where)
            check_source(path, fmt, source)
        f = fmt
        if f in ("verl", "dapo"):
            prompt = _field(rec, "prompt", where, list)
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
                raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages")
            gt = _field(_field(rec, "reward_model", where, dict), "ground_truth", where)
            answers = [str(g) for g in gt] if isinstance(gt, (list, tuple)) else [str(gt)]
            ds = str(_field(rec, "data_source", where))
            try:
                kind = verl_kind(ds, prompt[-1]["content"])
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            msgs = [{"role": m.get("role", "user"), "content": m["content"]} for m in prompt]
            if kind == "math" and len(msgs) == 1 and (m := DAPO_WRAP.match(msgs[0]["content"])):
                msgs = chat(m.group(1))  # DAPO's "Answer:" wrapper -> our system prompt's boxed answer
            elif msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": SYSTEM_PROMPT}] + msgs
            extra = rec.get("extra_info") or {}
            idx = extra.get("index", i) if isinstance(extra, dict) else i
            short = verl_source(ds)
            name = source or short or {"math_dapo": "dapo"}.get(ds, ds)  # DAPO-Math-17k's data_source: "dapo"
            # ids unique across mixed sources; the authors' files number each (source, kind) file from 0
            rid = f"{name}-{kind}-{idx}" if short and not source else f"{name}-{idx}"
            row = {"id": rid, "source": name, "kind": kind, "messages": msgs, "answers": answers}
            if kind == "keychain":  # the released rows: the real question in extra_info, the start key in the text
                ex = extra if isinstance(extra, dict) else {}
                q = ex.get("question", ex.get("input_question"))
                if isinstance(q, str) and q:
                    row["question"] = q
                key = ex.get("start_key") or start_key(msgs[-1]["content"])
                if key:
                    row["start_key"] = key
        elif f == "mathqa":
            problem, opts = _field(rec, "Problem", where, str), _field(rec, "options", where, (str, list))
            opts = ", ".join(opts) if isinstance(opts, list) else opts
            choices = CHOICE_RE.findall(opts)
            letter = _field(rec, "correct", where, str).strip().lower()
            if len(choices) < 2 or letter not in [c for c, _ in choices]:
                raise DataError(f"{where}: options {opts!r} or correct {letter!r} not parseable")
            text = "\n".join(f"({c.upper()}) {t}" for c, t in choices)
            row = {"id": f"{source or 'mathqa'}-{rec.get('id', i)}", "source": source or "mathqa", "kind": "choice",
                   "messages": chat(CHOICE_PROMPT.format(problem=problem.strip(), choices=text)),
                   "answers": [letter.upper()]}
        else:
            raise DataError(f"{where}: format {f!r} holds QA items, not finished tasks")
        if row["id"] in seen:  # two files' index columns may collide: the record number keeps ids unique
            row["id"] += f"-r{i}"
        seen.add(row["id"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- procedural raw data
# A fictional world (people, cities, countries, films, companies) whose encyclopedia paragraphs and
# multi-hop questions come out in the raw formats of HotpotQA, 2WikiMultihopQA and MuSiQue.
SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "dun", "bri", "mar", "qui", "zel", "oph", "ari", "ne", "gal",
       "tes", "vor", "lin", "cas", "dre", "hu", "pol", "wyn", "ist", "ber", "ul", "fen", "rho", "sa"]
LORE = ["{n} was discussed at length in the {adj} press during the {dec}s.",
        "Historians describe {n} as {adj} and unusually well documented.",
        "Several archives hold letters that mention {n} in passing.",
        "A {adj} exhibition about {n} toured for {k} years.",
        "Local guides still tell a {adj} story about {n}.",
        "The name {n} appears in {k} regional almanacs.",
        "Critics called the legacy of {n} {adj} but uneven.",
        "In the {dec}s a society devoted to {n} published {k} bulletins."]
ADJ = ["remarkable", "quiet", "controversial", "celebrated", "obscure", "lively", "austere", "curious"]


def _name(rng: random.Random, used: set, parts: int) -> str:
    while True:
        n = " ".join("".join(rng.choice(SYL) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(parts))
        if n not in used:
            used.add(n)
            return n


def _world(rng: random.Random, n: int, countries: int = 0) -> dict:
    used: set = set()
    # big enough that even a small dataset's pool fills a 16K-token context with distinct documents
    W: dict = {"country": [_name(rng, used, 1) for _ in range(countries or max(16, n // 40))]}
    wide = lambda k: 1 if k <= 5000 else 2  # one-word names run out (27,900 of them) in a 90,000-item world  # noqa: E731
    W["city"] = [_name(rng, used, wide(n // 4)) + " City" for _ in range(max(60, n // 4))]
    W["person"] = [_name(rng, used, 2) for _ in range(max(200, n))]
    W["company"] = [_name(rng, used, wide(n // 3)) + " " + rng.choice(["Pictures", "Studios", "Films"]) for _ in range(max(60, n // 3))]
    W["film"] = ["The " + _name(rng, used, wide(n)) for _ in range(max(200, n))]
    W["in_country"] = {c: rng.choice(W["country"]) for c in W["city"]}
    W["born_in"] = {p: rng.choice(W["city"]) for p in W["person"]}
    W["born_year"] = {p: rng.randint(1900, 1990) for p in W["person"]}
    W["founder"] = {c: rng.choice(W["person"]) for c in W["company"]}
    W["director"] = {f: rng.choice(W["person"]) for f in W["film"]}
    W["producer"] = {f: rng.choice(W["company"]) for f in W["film"]}
    W["year"] = {f: rng.randint(1930, 2020) for f in W["film"]}
    return W


def _facts(W: dict, e: str) -> list[str]:
    if e in W["in_country"]:
        return [f"{e} is a city in {W['in_country'][e]}.", f"It is one of the larger settlements of {W['in_country'][e]}."]
    if e in W["born_in"]:
        return [f"{e} (born {W['born_year'][e]}) is a filmmaker.", f"{e} was born in {W['born_in'][e]}."]
    if e in W["founder"]:
        return [f"{e} is a production company.", f"It was founded by {W['founder'][e]}."]
    if e in W["director"]:
        return [f"{e} is a film released in {W['year'][e]}.", f"It was directed by {W['director'][e]}.",
                f"It was produced by {W['producer'][e]}."]
    return [f"{e} is a country."]


def _paragraph(W: dict, e: str, rng: random.Random) -> list[str]:
    lore = [t.format(n=e, adj=rng.choice(ADJ), dec=rng.randrange(1900, 2000, 10), k=rng.randint(2, 9))
            for t in rng.sample(LORE, rng.randint(1, 2))]
    return _facts(W, e) + lore


def _question(W: dict, rng: random.Random) -> tuple[str, str, list[str], str, list[str]]:
    """(question, answer, supporting entities in hop order, type, sub-questions)."""
    f = rng.choice(W["film"])
    d, c = W["director"][f], W["producer"][f]
    kind = rng.choice(["bridge2", "bridge3", "bridge4", "cmp_year", "cmp_country"])
    if kind == "bridge2":
        return (f"In which city was the director of {f} born?", W["born_in"][d], [f, d], "bridge",
                [f"Who directed {f}?", f"Where was {d} born?"])
    if kind == "bridge3":
        city = W["born_in"][d]
        return (f"In which country was the director of {f} born?", W["in_country"][city], [f, d, city], "bridge",
                [f"Who directed {f}?", f"Where was {d} born?", f"Which country is {city} in?"])
    if kind == "bridge4":
        p = W["founder"][c]
        city = W["born_in"][p]
        return (f"In which country was the founder of the company that produced {f} born?", W["in_country"][city],
                [f, c, p, city], "bridge", [f"Which company produced {f}?", f"Who founded {c}?",
                                            f"Where was {p} born?", f"Which country is {city} in?"])
    a, b = rng.sample(W["person"], 2)
    if kind == "cmp_year" and W["born_year"][a] != W["born_year"][b]:
        first = a if W["born_year"][a] < W["born_year"][b] else b
        return (f"Who was born first, {a} or {b}?", first, [a, b], "comparison",
                [f"When was {a} born?", f"When was {b} born?"])
    same = W["in_country"][W["born_in"][a]] == W["in_country"][W["born_in"][b]]
    return (f"Were {a} and {b} born in the same country?", "yes" if same else "no",
            [a, b, W["born_in"][a], W["born_in"][b]], "comparison", [f"Where was {a} born?", f"Where was {b} born?"])


def generate_raw(out_dir: str, n: int = 200, seed: int = 0, countries: int = 0) -> dict[str, str]:
    """Write hotpotqa.json, 2wiki.json, musique.jsonl, dapo.jsonl and mathqa.json; return their paths.
    countries: the world's number of countries (0 = max(16, n / 40)); a few make the country and same-country
    questions guessable (the tiny preset)."""
    rng = random.Random(seed)
    W = _world(rng, n, countries)
    ents = W["country"] + W["city"] + W["person"] + W["company"] + W["film"]
    paras = {e: _paragraph(W, e, rng) for e in ents}
    hotpot, wiki, musique = [], [], []
    for i in range(n):
        q, a, sup, qtype, subs = _question(W, rng)
        sup = list(dict.fromkeys(sup))
        dis = [e for e in rng.sample(ents, 24) if e not in sup]
        ctx = sup + dis[: 10 - len(sup)]
        rng.shuffle(ctx)
        hotpot.append({"_id": f"hp{i:06d}", "question": q, "answer": a, "type": qtype, "level": "hard",
                       "supporting_facts": [[e, 1] for e in sup],
                       "context": [[e, [paras[e][0]] + [" " + s for s in paras[e][1:]]] for e in ctx]})
        wiki.append({"_id": f"wk{i:06d}", "question": q, "answer": a,
                     "type": "compositional" if qtype == "bridge" else "comparison",
                     "supporting_facts": [[e, 1] for e in sup], "evidences": [],
                     "context": [[e, paras[e]] for e in ctx]})
        mctx = sup + dis[: 20 - len(sup)]
        rng.shuffle(mctx)
        musique.append({"id": f"{len(subs)}hop__{i}", "question": q, "answer": a,
                        "answer_aliases": [a.upper()] if a not in ("yes", "no") else [],
                        "answerable": i % 6 != 5,  # MuSiQue ships unanswerable twins; the loader drops them
                        "question_decomposition": [{"id": j, "question": s} for j, s in enumerate(subs)],
                        "paragraphs": [{"idx": j, "title": e, "paragraph_text": " ".join(paras[e]),
                                        "is_supporting": e in sup} for j, e in enumerate(mctx)]})
    dapo, mathqa = [], []
    for i in range(max(8, n // 4)):
        x, y, z = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
        problem = f"A crate holds {x} apples and another holds {y}. Each apple is cut into {z} slices. How many slices are there?"
        dapo.append({"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": f"dapo{i}"},
                     "prompt": [{"role": "user", "content": "Solve the following math problem step by step. The last "
                                 "line of your response should be of the form Answer: $Answer (without quotes) where "
                                 f"$Answer is the answer to the problem.\n\n{problem}\n\nRemember to put your answer on "
                                 "its own line after \"Answer:\"."}],
                     "reward_model": {"style": "rule-lighteval/MATH_v2", "ground_truth": str((x + y) * z)}})
        right = x * z
        opts = sorted({right, right + z, right - 1, right + 2 * y, x + z}, key=lambda v: rng.random())[:5]
        while len(opts) < 5:
            opts.append(right + 100 + len(opts))
        letter = "abcde"[opts.index(right)]
        mathqa.append({"Problem": f"a box has {x} rows of {z} tiles . how many tiles are there ?",
                       "Rationale": f"\"{x} * {z} = {right}\"", "correct": letter, "category": "general",
                       "options": " , ".join(f"{c} ) {v}" for c, v in zip("abcde", opts)),
                       "annotated_formula": f"multiply({x}, {z})", "linear_formula": "multiply(n0,n1)|"})
    paths = {}
    for name, data in (("hotpotqa.json", hotpot), ("2wiki.json", wiki), ("musique.jsonl", musique),
                       ("dapo.jsonl", dapo), ("mathqa.json", mathqa)):
        p = str(Path(out_dir) / name)
        if name.endswith(".jsonl"):
            write_rows(p, data)
        else:
            atomic_write(p, lambda tmp, d=data: tmp.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8"))
        paths[name.split(".")[0]] = p
    return paths


# ----------------------------------------------------------------------------- command line
COMMANDS = ("generate", "synth", "verify", "filter", "demo")


def main(argv: list[str]) -> int:
    cfg = parse_config(Config, argv, __doc__)
    # bad input stops here, before a tokenizer folder or an output is created
    if cfg.command not in COMMANDS:
        raise SystemExit(f"keychain.py: unknown command {cfg.command!r} ({' | '.join(COMMANDS)})")
    bad = [k for k in ("max_tokens", "hops", "needles", "batch") if getattr(cfg, k) <= 0]
    bad += [k for k in ("n", "lo", "hi", "chains") if getattr(cfg, k) < 0]
    if bad:
        raise SystemExit(f"keychain.py: --{bad[0]}={getattr(cfg, bad[0])} is out of range")
    if cfg.command == "synth" and not cfg.out:
        raise SystemExit("keychain.py: synth needs --out=FILE.jsonl (or .parquet)")
    if cfg.command in ("verify", "filter") or (cfg.command == "synth" and cfg.kind != "ruler"):
        if not cfg.input:
            raise SystemExit(f"keychain.py: {cfg.command} needs --input=FILE[,FILE...]")
    if cfg.command in ("synth", "verify", "filter"):
        missing = [p for p in filter(None, cfg.input.split(",")) if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"keychain.py: --input file not found: {missing[0]}")
    if cfg.command == "generate":
        for name, p in generate_raw(cfg.out_dir, cfg.n or 200, cfg.seed).items():
            print(f"{name:<10}{p}")
        return 0
    if cfg.command == "filter":
        if not cfg.counts:
            raise SystemExit("filter needs --counts=FILE (JSONL of {id, n, k}; `curriculum.py filter` samples it)")
        items, _ = load_items(cfg.input, cfg.format, cfg.source)
        kept, stats = filter_items(items, read_counts(cfg.counts), cfg.lo, cfg.hi)
        write_rows(cfg.out, kept)
        print(f"wrote {len(kept)} items to {cfg.out}: {stats}")
        return 0
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.command == "verify":
        bad = total = 0
        for path in cfg.input.split(","):
            for i, row in read_records(path):
                if row.get("kind") != "keychain":
                    continue
                total += 1
                errs = verify_row(row, tok)
                if errs:
                    bad += 1
                    print(f"{path}: record {i} ({row.get('id')}): " + "; ".join(errs[:5]))
        print(f"verified {total} KeyChain rows: {total - bad} ok, {bad} bad")
        if not total:
            print(f"keychain.py: {cfg.input}: no KeyChain rows to verify", file=sys.stderr)
        return 1 if bad or not total else 0
    if cfg.command == "demo":
        return demo(cfg, tok)
    if cfg.command != "synth":
        raise SystemExit(f"unknown command {cfg.command!r}: generate | synth | verify | filter | demo")
    rows, stats = synth(cfg, tok)
    asked = stats.get("requested", len(rows))
    if not rows:  # nothing to train on: say why, write nothing
        why = "; ".join(f"{k[6:]} ({v})" for k, v in sorted(stats.items()) if k.startswith("skip: ")) or "no input rows"
        print(f"wrote 0 of {asked} requested rows: {why}", file=sys.stderr)
        return 1
    write_rows(cfg.out, rows)
    print(summarize(rows, stats))
    print(f"wrote {len(rows)} of {asked} requested rows to {cfg.out}")
    return 0


def demo(cfg: Config, tok) -> int:
    """Generate raw data and build every row kind of the training mix from it, then verify."""
    raw = generate_raw(cfg.out_dir, cfg.n or 120, cfg.seed)
    qa_files = ",".join(raw[k] for k in ("hotpotqa", "2wiki", "musique"))
    out_dir, all_rows, all_stats = Path(cfg.out_dir).parent / "rows", [], {}
    for kind, inp in (("keychain", qa_files), ("qa", qa_files), ("ruler", ""), ("math", raw["dapo"]),
                      ("choice", raw["mathqa"])):
        rows, stats = synth(dataclasses.replace(cfg, kind=kind, input=inp), tok)
        write_rows(out_dir / f"{kind}.jsonl", rows)
        all_rows += rows
        all_stats.update({f"{kind} {k}": v for k, v in stats.items()})
    print(summarize(all_rows, all_stats))
    kc = [r for r in all_rows if r["kind"] == "keychain"]
    bad = sum(bool(verify_row(r, tok)) for r in kc)
    print(f"rows in {out_dir}/; KeyChain rows failing verify: {bad}")
    if not kc:
        print(f"keychain.py: demo built no KeyChain rows (--max_tokens={cfg.max_tokens} is too small for them)",
              file=sys.stderr)
    return 1 if bad or not kc else 0


# ==================== plumbing: shared by every file (config parsing, I/O, tokenizer, chat) ====================
# Everything below is the ground floor the other files import; nothing here is about KeyChain itself.

# ----------------------------------------------------------------------------- config parsing
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _config_source(cls: type) -> str:
    import inspect

    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def option_comments(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the dataclass source: the one place an option is described."""
    src = _config_source(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    (\w+): [^=\n]+=[^\n]*?  # (.*)$", src, re.M)}


def option_groups(cls: type) -> dict[str, str]:
    """The `    # -- group` header line above a field, for the first field of each group."""
    out, header = {}, None
    for line in _config_source(cls).splitlines():
        if line.startswith("    # -- "):
            header = line[len("    # -- "):].strip()
        elif header and (m := re.match(r"^    (\w+): ", line)):
            out[m.group(1)] = header
            header = None
    return out


def parse_config(cls: type, argv: list[str], doc: str = "") -> Any:
    """Build a config dataclass from `[command] --key=value ...`; `--help` lists every key, default and comment.
    Bools take true/false/1/0/yes/no (a bare `--flag` is true); anything else stops with one line."""
    cfg, fields = cls(), {f.name: f for f in dataclasses.fields(cls)}
    for arg in argv:
        if arg in ("-h", "--help"):
            notes = option_comments(cls)
            groups = option_groups(cls)
            print(doc.strip() + "\n\noptions (--key=value):")
            for f in dataclasses.fields(cls):
                if f.name in groups:
                    print(f"\n {groups[f.name]}")
                opt = f"  --{f.name}={getattr(cfg, f.name)!r}"
                print(f"{opt:<40} {notes[f.name]}" if f.name in notes else opt)
            sys.exit(0)
        if not arg.startswith("--"):
            if "command" not in fields:
                raise SystemExit(f"unexpected argument {arg!r}")
            cfg.command = arg
            continue
        key, eq, val = arg[2:].partition("=")
        if key not in fields:
            raise SystemExit(f"unknown option --{key} (see --help)")
        cur = getattr(cfg, key)
        if isinstance(cur, bool):
            if eq and val.lower() not in BOOLS:
                raise SystemExit(f"--{key} expects true/false/1/0/yes/no, got {val!r}")
            setattr(cfg, key, BOOLS[val.lower()] if eq else True)
        elif isinstance(cur, (int, float)) and not isinstance(cur, bool):
            try:
                setattr(cfg, key, type(cur)(val))
            except ValueError:
                raise SystemExit(f"--{key} expects {type(cur).__name__}, got {val!r}") from None
            if not math.isfinite(getattr(cfg, key)):
                raise SystemExit(f"--{key} expects a finite number, got {val!r}")
        else:
            setattr(cfg, key, val)
    return cfg


def cli(main) -> int:
    """A script's entry point: Ctrl-C / SIGTERM end it quietly (exit 130 / 143), it dies with its parent
    (PR_SET_PDEATHSIG: torchrun starts its workers in their own sessions, so killing the launcher would leave
    them running), and bad input is one line naming the file, not a traceback."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: os._exit(128 + s))
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (linux/prctl.h)
    try:
        return main(sys.argv[1:])
    except (DataError, OSError) as e:  # OSError: a missing file, a model folder or hub id that does not load
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- small io helpers
class DataError(ValueError):
    """A malformed input record; the message names the file and the record."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through `write(tmp_path)` and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_tmp(path: Path) -> None:
    """Remove `.name.tmpPID` files that a killed writer left behind (its process is gone)."""
    for t in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = t.name[len(path.name) + 5:]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            if int(pid) != os.getpid():
                continue  # a live writer: leave its file alone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        t.unlink(missing_ok=True)


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Rows to .jsonl (or .parquet by extension), atomically. Returns the row count."""
    rows = list(rows)

    def write(tmp: Path) -> None:
        if str(path).endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write)
    return len(rows)


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(index, record) pairs from .json (a list), .jsonl or .parquet; bad JSON names file and line."""
    path = str(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: record {i} (line {i + 1}): invalid JSON: {e}") from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        yield from enumerate(data)


def read_rows(path: str | os.PathLike) -> list[dict]:
    return [r for _, r in read_records(path)]


# ----------------------------------------------------------------------------- tokenizer and chat
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


TINY_FORMAT_TOKENS = ["<think>", "</think>", "\\boxed{"]  # the tiny preset's whole-word tokens (format_tokens)


def make_tiny_tokenizer(out_dir: str | os.PathLike, format_tokens: bool = False):
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built on the spot: no hub, no training.

    One token per UTF-8 byte keeps token counts predictable in tests. format_tokens (the `tiny` preset) adds
    `<think>`, `</think>` and `\\boxed{` as whole tokens: the answer format " </think>\\boxed{yes}" is then 7
    tokens, not 19 bytes, so a 2-layer model sampling at T=1 cannot misspell it byte by byte ("</thiink>",
    "\\boed{"), and GRPO has right answers to reinforce from its first steps.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=TINY_SPECIALS[1:], chat_template=CHATML_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": TINY_SPECIALS[1:]})
    if format_tokens:  # plain (not special) tokens: they decode as text and the reward reads them
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, normalized=False) for t in TINY_FORMAT_TOKENS])
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(name: str, tmp_dir: str = "data/tiny-tokenizer", format_tokens: bool = False):
    """A Hugging Face tokenizer from a path or hub id; empty name -> the tiny byte tokenizer (format_tokens: with
    the format's whole-word tokens, built once in tmp_dir)."""
    from transformers import AutoTokenizer

    if not name:
        if not (Path(tmp_dir) / "tokenizer.json").exists():
            make_tiny_tokenizer(tmp_dir, format_tokens)
        name = tmp_dir
    return AutoTokenizer.from_pretrained(name)


def render_prompt(tok, messages: list[dict]) -> str:
    """The exact text the policy sees: chat template with generation prompt, then the `<think>` prefill."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + PREFILL


def chat(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def doc_text(title: str, body: str) -> str:
    return f"{title}\n{body}"


def join_sentences(sents: list[str]) -> str:
    """HotpotQA sentences carry their own leading spaces (joined with ""); 2Wiki's do not."""
    out = ""
    for s in sents:
        if out and not out[-1].isspace() and s and not s[0].isspace():
            out += " "
        out += s
    return out


if __name__ == "__main__":
    sys.exit(cli(main))
