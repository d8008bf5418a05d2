"""eval.py: prompts byte for byte against LongBench's and RULER's templates, middle truncation, LongBench-E buckets and
the NarrativeQA split, RULER items (answers really in the context, at the stated depth, within budget), the needle
grid and heatmap, resume after an interruption, general benchmarks, the results table.

CPU only: the byte tokenizer, a tiny random Qwen2, an oracle engine that answers by reading the prompt, and small
hand-written files in each benchmark's official format under tests/fixtures/eval/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from collections import Counter
from pathlib import Path

import pytest

import eval as ev
import rollout
from keychain import SYSTEM_PROMPT, count_tokens, load_tokenizer
from rollout import Completion

FIX = Path(__file__).parent / "fixtures" / "eval"
QWEN_TOK = Path(__file__).resolve().parents[2] / "shared" / "qwen2.5-tokenizer"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat_user(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


class Oracle:
    """An engine that answers with answer(prompt_text) and counts what it was asked."""

    def __init__(self, tok, answer):
        self.tok, self.answer, self.prompts, self.max_new = tok, answer, [], []

    def generate(self, prompt_token_ids, n=1, temperature=None, max_new_tokens=None, seed=None, **_):
        self.max_new.append(max_new_tokens)
        out = []
        for ids in prompt_token_ids:
            text = self.tok.decode(ids)
            self.prompts.append(text)
            reply = self.answer(text)
            out.append([Completion(self.tok(reply, add_special_tokens=False)["input_ids"], reply, "stop", [])])
        return out


class Counting:
    """Wraps a real engine: counts calls and prompts; raises on call number fail_at (an interruption)."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.calls, self.prompts = inner, fail_at, 0, 0

    def generate(self, prompt_token_ids, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.prompts += len(prompt_token_ids)
        return self.inner.generate(prompt_token_ids, **kw)


@pytest.fixture(scope="module")
def hf_engine(tiny_tok):
    cfg = rollout.Config(device="cpu", max_prompt_tokens=32768, max_new_tokens=1, max_batch_seqs=8)
    return rollout.HFEngine(cfg, rollout.tiny_model(len(tiny_tok), seed=0), tiny_tok)


@pytest.fixture(scope="module")
def res():
    return ev.ruler_resources(FIX, seed=42)


def cfg_for(tmp_path, **kw) -> ev.Config:
    return ev.Config(**({"out_dir": str(tmp_path / "out"), "data_dir": str(FIX)} | kw))


# ----------------------------------------------------------------------------- LongBench prompts
MULTIHOP_HEAD = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
                 "words.\n\nThe following are given passages.\n")
MULTIHOP_MID = ("\n\nAnswer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nQuestion: ")
NARR_HEAD = ("You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
             "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: ")
NARR_MID = ("\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
            "Do not provide any explanation.\n\nQuestion: ")
QASPER_HEAD = ('You are given a scientific article and a question. Answer the question as concisely as you can, using a '
               'single phrase or sentence if possible. If the question cannot be answered based on the information in '
               'the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
               '"unanswerable". Do not provide any explanation.\n\nArticle: ')
QASPER_MID = ('\n\n Answer the question based on the above article as concisely as you can, using a single phrase or '
              'sentence if possible. If the question cannot be answered based on the information in the article, write '
              '"unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not '
              'provide any explanation.\n\nQuestion: ')


def expected_longbench(ds: str, rec: dict) -> str:
    if ds in ("hotpotqa", "2wikimqa", "musique"):
        return MULTIHOP_HEAD + rec["context"] + MULTIHOP_MID + rec["input"] + "\nAnswer:"
    head, mid = (NARR_HEAD, NARR_MID) if ds == "narrativeqa" else (QASPER_HEAD, QASPER_MID)
    return head + rec["context"] + mid + rec["input"] + "\n\nAnswer:"


@pytest.mark.parametrize("ds", ["hotpotqa", "2wikimqa", "musique", "narrativeqa", "qasper", "hotpotqa_e"])
def test_longbench_prompt_bytes(tiny_tok, tmp_path, ds):
    path = FIX / "longbench" / f"{ds}.jsonl"
    recs = read_jsonl(path)
    items, reserve = ev.longbench_items(path, tiny_tok, cfg_for(tmp_path), 32768)
    assert reserve == {"narrativeqa": 128, "qasper": 128}.get(ds, 32)  # LongBench dataset2maxlen
    assert [it["id"] for it in items] == [f"{ds}/{r['_id']}" for r in recs]
    for it, rec in zip(items, recs):
        assert it["prompt"] == chat_user(tiny_tok, expected_longbench(ds.removesuffix("_e"), rec))
        assert it["meta"]["answers"] == rec["answers"]
    if ds == "hotpotqa":  # braces in a context stay literal
        assert "Braces {like these} stay literal." in items[2]["prompt"]


def test_longbench_train_style(tiny_tok, tmp_path):
    rec = read_jsonl(FIX / "longbench" / "musique.jsonl")[0]
    items, reserve = ev.longbench_items(FIX / "longbench" / "musique.jsonl", tiny_tok,
                                        cfg_for(tmp_path, prompt_style="train"), 32768)
    user = "The following are given passages.\n" + rec["context"] + "\n\nQuestion: " + rec["input"]
    want = tiny_tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
                                        tokenize=False, add_generation_prompt=True) + "<think>"
    assert items[0]["prompt"] == want and reserve == 4096


# ----------------------------------------------------------------------------- truncation
def test_middle_truncation_byte_tokenizer(tiny_tok):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    assert ev.middle_truncate(tiny_tok, text, 1000) == text  # at the budget: untouched
    cut = ev.middle_truncate(tiny_tok, text, 101)  # half = int(101 / 2) = 50, as LongBench
    assert cut == text[:50] + text[-50:]
    ids = tiny_tok(text)["input_ids"]
    assert tiny_tok(cut)["input_ids"] == ids[:50] + ids[-50:]


@pytest.mark.skipif(not (QWEN_TOK / "tokenizer.json").exists(), reason="needs shared/qwen2.5-tokenizer")
def test_middle_truncation_qwen_tokenizer():
    tok = load_tokenizer(str(QWEN_TOK))
    text = " ".join(f"Sentence number {i} talks about item {i * 37 % 101}." for i in range(400))
    ids = tok(text)["input_ids"]
    cut = ev.middle_truncate(tok, text, 301)
    head, tail = tok.decode(ids[:150]), tok.decode(ids[-150:])
    assert cut == head + tail and text.startswith(head) and text.endswith(tail)
    assert len(head) + len(tail) < len(text) and abs(len(tok(cut)["input_ids"]) - 300) <= 2


def test_longbench_budget_truncates_in_the_middle(tiny_tok, tmp_path):
    path = tmp_path / "longbench" / "hotpotqa.jsonl"
    path.parent.mkdir()
    ctx = "Passage 1:\nStart\n" + "filler sentence. " * 200 + "\nPassage 2:\nEnd\nThe end is near."
    path.write_text(json.dumps({"input": "Where is the end?", "context": ctx, "answers": ["near"], "length": 400,
                                "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "x1"}) + "\n")
    full = expected_longbench("hotpotqa", {"context": ctx, "input": "Where is the end?"})
    cfg = ev.Config(max_length=600)
    items, _ = ev.longbench_items(path, tiny_tok, cfg, 32768)
    assert items[0]["prompt"] == chat_user(tiny_tok, full[:300] + full[-300:])
    # a small engine window caps the budget: template + truncated prompt + reply fit max_model_len
    items, reserve = ev.longbench_items(path, tiny_tok, cfg, 500)
    n = count_tokens(tiny_tok, [items[0]["prompt"]])[0]
    assert n + reserve <= 500 and n > 400 and items[0]["prompt"].endswith("Question: Where is the end?\nAnswer:"
                                                                          "<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- buckets and splits
def test_bucket_and_split_boundaries():
    assert [ev.e_bucket(x) for x in (0, 3999, 4000, 7999, 8000, 50000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+",
                                                                            "8k+"]
    got = [ev.narrqa_split(x) for x in (10, 16383, 16384, 32767, 32768, 65535, 65536)]
    assert got == ["0-16K", "0-16K", "16-32K", "16-32K", "32-64K", "32-64K", "64K+"]


def test_longbench_e_buckets_and_scores(tiny_tok, tmp_path):
    items, _ = ev.longbench_items(FIX / "longbench" / "hotpotqa_e.jsonl", tiny_tok, cfg_for(tmp_path), 32768)
    assert [it["meta"]["bucket"] for it in items] == ["0-4k", "4-8k", "8k+"]  # lengths 1200, 5000, 9000
    preds = ["Athens", "Helium", "It is blue."]
    rows = [{"pred": p, **it["meta"]} for p, it in zip(preds, items)]
    s = ev.score_longbench(rows, "longbench")["hotpotqa_e"]
    assert s["buckets"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}  # "it is blue" vs "blue": P 1/3, R 1
    assert s["f1"] == 50.0 and s["n"] == 3


def test_narrativeqa_split_by_context_tokens(tiny_tok, tmp_path):
    path = tmp_path / "longbench" / "narrativeqa.jsonl"
    path.parent.mkdir()
    sizes = {"a": 100, "b": 20000, "c": 40000, "d": 70000}  # bytes = tokens for the byte tokenizer
    path.write_text("".join(json.dumps({"input": "Who?", "context": "x" * n, "answers": ["x"], "length": n // 5,
                                        "dataset": "narrativeqa", "_id": k}) + "\n" for k, n in sizes.items()))
    items, _ = ev.longbench_items(path, tiny_tok, ev.Config(max_length=1000), 32768)
    assert [it["meta"]["split"] for it in items] == ["0-16K", "16-32K", "32-64K", "64K+"]
    rows = [{"pred": p, **it["meta"]} for p, it in zip(["x", "y", "x", "x"], items)]
    assert ev.score_longbench(rows, "longbench")["narrativeqa"]["split"] == {"0-16K": 100.0, "16-32K": 0.0,
                                                                             "32-64K": 100.0, "64K+": 100.0}


def test_longbench_scores_f1_sub_em_and_train_box():
    rows = [{"dataset": "hotpotqa", "answers": ["Paris"], "pred": "Paris, France"},
            {"dataset": "hotpotqa", "answers": ["yes"], "pred": "Yes."},
            {"dataset": "hotpotqa", "answers": ["the Thames"], "pred": "London"}]
    s = ev.score_longbench(rows, "longbench")["hotpotqa"]
    assert s["f1"] == 55.56 and s["sub_em"] == 66.67  # F1: 2/3, 1, 0
    boxed = [dict(r, pred=f"<think>{r['pred']}?</think> \\boxed{{{g}}}") for r, g in zip(rows, ["Paris", "no", "Thames"])]
    s = ev.score_longbench(boxed, "train")["hotpotqa"]
    assert s["f1"] == 66.67 and s["sub_em"] == 66.67  # the box is read: 1, 0, 1


# ----------------------------------------------------------------------------- RULER
def ruler(task, L, tok, res, **kw):
    cfg = dataclasses.replace(ev.Config(num_samples=3), **kw)
    items, reserve = ev.ruler_items(task, L, tok, cfg, res)
    assert len(items) == cfg.num_samples
    gen = ev.RULER_TEMPLATES[ev.RULER_TASKS[task][0]][2]  # RULER's tokens_to_generate, in both prompt styles
    for it in items:  # within L minus RULER's reply, and filled close to it
        n = count_tokens(tok, [it["prompt"]])[0]
        assert n == it["meta"]["prompt_tokens"] and n + gen <= L and n > 0.85 * (L - gen)
    return items, reserve


NIAH_HEAD = ("A special magic {t} is hidden within the following text. Make sure to memorize it. I will quiz you about "
             "the {t} afterwards.\n")
NIAH_HEAD_PLURAL = ("Some special magic {t}s are hidden within the following text. Make sure to memorize it. I will quiz "
                    "you about the {t}s afterwards.\n")


def niah_parts(item) -> tuple[str, str]:
    text = item["text"]
    m = re.fullmatch(r"(?s).*? afterwards\.\n(.*)\nWhat (?:is|are all) the special magic \w+ for (.+) mentioned in the "
                     r"provided text\?", text)
    assert m, text[-200:]
    return m.group(1), m.group(2)


@pytest.mark.parametrize("task,t", [("niah_single_1", "number"), ("niah_multikey_2", "number"),
                                    ("niah_multikey_3", "uuid")])
def test_ruler_niah_needles_in_context(tiny_tok, res, task, t):
    items, reserve = ruler(task, 2048, tiny_tok, res)
    assert reserve == 128
    for it in items:
        context, key = niah_parts(it)
        assert it["text"] == NIAH_HEAD.format(t=t) + context + f"\nWhat is the special magic {t} for {key} mentioned in " \
                                                               "the provided text?"
        assert it["prompt"] == chat_user(tiny_tok, it["text"]) + f"The special magic {t} for {key} mentioned in the " \
                                                                  "provided text is"
        lines = context.split("\n")
        (value,) = it["meta"]["answers"]
        assert f"One of the special magic {t}s for {key} is: {value}." in lines
        if task == "niah_single_1":  # noise haystack: one needle among RULER's noise lines
            assert sum(line != ev.NOISE for line in lines) == 1 and len(lines) > 10
        else:  # needle haystack: every line is a needle, the queried key only once
            assert all(line.startswith(f"One of the special magic {t}s for ") for line in lines)
            assert sum(f" for {key} is: " in line for line in lines) == 1


@pytest.mark.parametrize("task,n_ans", [("niah_multivalue", 4), ("niah_multikey_1", 1), ("niah_multiquery", 4),
                                        ("niah_single_3", 1)])
def test_ruler_essay_needles(tiny_tok, res, task, n_ans):
    essay = res["essay"]
    for it in ruler(task, 2048, tiny_tok, res)[0]:
        context, query = niah_parts(it)
        t = "uuid" if task == "niah_single_3" else "number"
        head = NIAH_HEAD_PLURAL if n_ans == 4 else NIAH_HEAD
        assert it["text"].startswith(head.format(t=t))
        if n_ans == 4:
            assert it["prompt"].endswith(f"The special magic {t}s for {query} mentioned in the provided text are")
        keys = query.split(", and ") if task == "niah_multiquery" else [query]
        keys = [k for part in keys for k in part.split(", ")]
        answers = it["meta"]["answers"]
        assert len(answers) == n_ans
        for a in answers:  # each answer sits in a needle for one of the queried keys
            assert any(f"One of the special magic {t}s for {k} is: {a}." in context for k in keys)
        needles = re.findall(r"One of the special magic \w+ for [\w-]+ is: [\w-]+\.", context)
        assert len(needles) == (4 if task in ("niah_multivalue", "niah_multikey_1", "niah_multiquery") else 1)
        rest = context
        for nd in needles:
            rest = rest.replace(nd, " ")
        words = rest.split()  # the haystack is the essay's words in order (repeated), needles only between sentences
        assert words == (essay * (len(words) // len(essay) + 1))[:len(words)]
        for nd in needles:  # after a sentence, or at depth 100 after the haystack's last (word-cut) sentence
            i = context.index(nd)
            after = context[i + len(nd):]
            for other in needles:
                after = after.replace(other, "")
            assert i == 0 or context[i - 2] in ".!?" or not after.strip()


def test_ruler_vt(tiny_tok, res):
    items, reserve = ruler("vt", 3000, tiny_tok, res)
    assert reserve == 30
    for it in items:
        text = it["text"]
        shot, main = text.rsplit("Memorize and track the chain(s)", 1)
        assert shot.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        assert re.search(r"they are: {2}[A-Z]{3}( [A-Z]{3}){4}\n\n$", shot)  # the solved one-shot example
        value = re.search(r"assigned the value (\d+) in the text above\.$", main).group(1)
        assert it["prompt"].endswith(f"Answer: According to the chain(s) of variable assignment in the text above, 5 "
                                     f"variables are assigned the value {value}, they are: ")
        assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})", main))
        holds = {v for v, x in assign.items() if x == value}
        while True:  # follow the chain from the value
            more = {v for v, x in assign.items() if x.startswith("VAR ") and x[4:] in holds} - holds
            if not more:
                break
            holds |= more
        assert holds == set(it["meta"]["answers"]) and len(holds) == 5


@pytest.mark.parametrize("L,common,rare", [(2048, 6, 1), (8192, 30, 3)])  # RULER: fewer repeats below 4096
def test_ruler_cwe(tiny_tok, res, L, common, rare):
    for it in ruler("cwe", L, tiny_tok, res)[0]:
        main = it["text"].rsplit("Below is a numbered list of words.", 1)[1]
        listed = re.findall(r"\d+\. (\S+)", main.split("\nQuestion:")[0])
        counts = Counter(listed)
        assert listed[:10] != sorted(listed[:10]) or listed[:5] != listed[5:10]  # shuffled, not in blocks
        assert {w for w, c in counts.items() if c == common} == set(it["meta"]["answers"])
        assert set(counts.values()) == {common, rare} and len(it["meta"]["answers"]) == 10
        assert it["prompt"].endswith("What are the 10 most common words in the above list?<|im_end|>\n<|im_start|>"
                                     "assistant\nAnswer: The top 10 words that appear most often in the list are:")


def test_ruler_fwe(tiny_tok, res):
    for it in ruler("fwe", 3000, tiny_tok, res)[0]:
        head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. ")
        tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
        assert it["text"].startswith(head) and it["text"].endswith(tail)
        counts = Counter(it["text"][len(head):-len(tail)].split())
        top = [w for w, _ in counts.most_common() if w != "..."][:3]
        assert top == it["meta"]["answers"] and counts.most_common(1)[0][0] == "..."


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_ruler_qa(tiny_tok, res, task):
    items, reserve = ruler(task, 2048, tiny_tok, res)
    assert reserve == 32
    qas, docs = res["squad" if task == "qa_1" else "hotpotqa"]
    assert len(qas) == (3 if task == "qa_1" else 2)  # SQuAD: the impossible question is left out
    for i, it in enumerate(items):
        q = qas[i % len(qas)]
        head = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
                "words.\n\nThe following are given documents.\n\nDocument 1:\n")
        assert it["text"].startswith(head) and it["text"].endswith(
            "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other "
            f"words.\n\nQuestion: {q['query']}")
        assert it["prompt"].endswith("<|im_start|>assistant\nAnswer:")
        for d in q["context"]:  # the gold paragraph(s) are among the documents
            assert f":\n{docs[d]}\n\n" in it["text"]
        assert it["meta"]["answers"] == q["outputs"]
        assert any(a in it["text"] for a in q["outputs"]) or q["outputs"] == ["yes"]  # HotpotQA yes/no: no span


def test_ruler_train_style_reserves_the_thinking_budget(tiny_tok, res):
    """The train style's prompt fills the same L - 128 as the plain style; the thinking budget comes on top."""
    items, reserve = ruler("niah_single_1", 6000, tiny_tok, res, prompt_style="train", think_tokens=1000)
    plain, plain_reserve = ruler("niah_single_1", 6000, tiny_tok, res)
    assert reserve == 1000 and plain_reserve == 128
    for it, p in zip(items, plain):
        # same haystack size up to the template difference (system prompt vs answer prefix): within 2%
        assert abs(it["meta"]["prompt_tokens"] - p["meta"]["prompt_tokens"]) < 0.02 * 6000
        assert 0.98 * (6000 - 128) < it["meta"]["prompt_tokens"] <= 6000 - 128
    for it in items:
        assert it["prompt"] == tiny_tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": it["text"]}], tokenize=False,
            add_generation_prompt=True) + "<think>"


def test_ruler_skips_tasks_without_files(tmp_path):
    bare = ev.ruler_resources(tmp_path, seed=0)
    assert ev.task_available("niah_single_2", bare) == "ruler/PaulGrahamEssays.json"
    assert ev.task_available("qa_1", bare) == "ruler/squad.json"
    assert all(ev.task_available(t, bare) == "" for t in ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt",
                                                         "cwe", "fwe"))


def test_ruler_items_are_deterministic(tiny_tok, res):
    a, _ = ev.ruler_items("niah_single_1", 1024, tiny_tok, ev.Config(num_samples=2), res)
    b, _ = ev.ruler_items("niah_single_1", 1024, tiny_tok, ev.Config(num_samples=2), res)
    c, _ = ev.ruler_items("niah_single_1", 1024, tiny_tok, ev.Config(num_samples=2, seed=7), res)
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b] != [x["prompt"] for x in c]


def test_ruler_end_to_end_scores(tiny_tok, tmp_path):
    def answer(prompt: str) -> str:  # solves the needle task only
        key = re.search(r"special magic number for ([\w-]+) mentioned", prompt)
        m = key and re.search(rf"numbers for {re.escape(key.group(1))} is: (\d+)\.", prompt)
        return f" {m.group(1)}." if m else "no idea"

    cfg = cfg_for(tmp_path, benchmarks="ruler", ruler_lengths="2500,3000", ruler_tasks="niah_single_1,vt,qa_1",
                  num_samples=2)
    s = ev.evaluate(cfg, engine=Oracle(tiny_tok, answer), tok=tiny_tok)
    assert s["ruler"] == {L: {"niah_single_1": 100.0, "vt": 0.0, "qa_1": 0.0, "avg": 33.33} for L in ("2500", "3000")}
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == s
    ids = [r["id"] for r in read_jsonl(tmp_path / "out" / "ruler" / "preds.jsonl")]
    assert len(ids) == 12 and "vt/3000/1" in ids and len(set(ids)) == 12


# ----------------------------------------------------------------------------- needle grid
@pytest.mark.parametrize("depth", [0, 10, 50, 90, 100])
def test_grid_needle_at_depth_noise(tiny_tok, depth):
    bare = ev.ruler_resources(Path("/nonexistent"), seed=0)
    (it,), _ = ev.ruler_items("niah_single_1", 2048, tiny_tok, ev.Config(), bare, depth=depth, samples=1, tag="g/")
    lines = niah_parts(it)[0].split("\n")
    (at,) = [i for i, line in enumerate(lines) if line != ev.NOISE]
    assert at == int((len(lines) - 1) * depth / 100) and it["meta"]["answers"][0] in lines[at]


@pytest.mark.parametrize("depth", [0, 30, 70, 100])
def test_grid_needle_at_depth_essay(tiny_tok, res, depth):
    (it,), _ = ev.ruler_items("niah_single_2", 3000, tiny_tok, ev.Config(), res, depth=depth, samples=1, tag="g/")
    context = niah_parts(it)[0]
    at = context.index("One of the special magic numbers for ")
    assert abs(at / len(context) - depth / 100) < 0.08


def test_niah_grid_scores_and_heatmap(tiny_tok, tmp_path):
    def answer(prompt: str) -> str:  # finds needles in the first 60% of the prompt only
        m = re.search(r"One of the special magic numbers for [\w-]+ is: (\d+)\.", prompt)
        return m.group(1) if m and m.start() < 0.6 * len(prompt) else "I do not know"

    engine = Oracle(tiny_tok, answer)
    cfg = ev.Config(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path), benchmarks="niah", niah_lengths="1200,2000",
                    niah_depths=3, niah_samples=2, batch=4)
    s = ev.evaluate(cfg, engine=engine, tok=tiny_tok)["niah"]
    assert s["depths"] == [0, 50, 100] and s["lengths"] == [1200, 2000] and s["task"] == "niah_single_1"
    assert s["grid"] == [[100.0, 100.0], [100.0, 100.0], [0.0, 0.0]]  # rows: depth, columns: length
    assert len(engine.prompts) == 12 and set(engine.max_new) == {128}
    png = tmp_path / "out" / "niah" / "heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| depth | 1200 | 2000 |" in md and "| 100% | 0.0 | 0.0 |" in md


# ----------------------------------------------------------------------------- resume
def test_resume_after_interruption(tiny_tok, hf_engine, tmp_path):
    kw = dict(data_dir=str(FIX), benchmarks="longbench", batch=2, max_new_tokens=3)
    whole = ev.Config(out_dir=str(tmp_path / "whole"), **kw)
    ref = Counting(hf_engine)
    ref_scores = ev.evaluate(whole, engine=ref, tok=tiny_tok)
    assert ref.prompts == 14  # 3 + 2 + 2 + 2 + 2 + 3 items

    cut = ev.Config(out_dir=str(tmp_path / "cut"), **kw)
    with pytest.raises(KeyboardInterrupt):  # calls 1-3 finish (hotpotqa 2 + 1, 2wikimqa 2), call 4 dies
        ev.evaluate(cut, engine=Counting(hf_engine, fail_at=4), tok=tiny_tok)
    preds = Path(cut.out_dir) / "longbench" / "preds.jsonl"
    lines = preds.read_text().splitlines()
    assert len(lines) == 5
    preds.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # the last write cut in half

    again = Counting(hf_engine)
    scores = ev.evaluate(cut, engine=again, tok=tiny_tok)
    assert again.prompts == 10  # only the missing items: 14 - 4 complete lines
    got = {r["id"]: r for r in read_jsonl(preds)}
    want = {r["id"]: r for r in read_jsonl(Path(whole.out_dir) / "longbench" / "preds.jsonl")}
    assert len(read_jsonl(preds)) == 14 and got == want and scores == ref_scores

    idle = Counting(hf_engine)
    assert ev.evaluate(cut, engine=idle, tok=tiny_tok) == ref_scores and idle.calls == 0  # nothing left to do
    with pytest.raises(SystemExit, match="longbench predictions were made with prompt_style='longbench' "
                                         r"\(now 'train'\)"):  # other settings, same out_dir
        ev.evaluate(dataclasses.replace(cut, prompt_style="train"), engine=idle, tok=tiny_tok)


def needle_answer(prompt: str) -> str:
    m = re.search(r"One of the special magic numbers for [\w-]+ is: (\d+)\.", prompt)
    return m.group(1) if m else "none"


def _dist_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    from keychain import make_tiny_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = make_tiny_tokenizer(Path(tmp) / f"tok{rank}")
    engine = Oracle(tok, needle_answer)
    cfg = ev.Config(out_dir=f"{tmp}/dist", data_dir=tmp, benchmarks="niah", niah_lengths="1200", niah_depths=3,
                    niah_samples=3, batch=4)
    scores = ev.evaluate(cfg, engine=engine, tok=tok)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({"scores": scores, "prompts": engine.prompts}))
    dist.destroy_process_group()


def test_torchrun_ranks_share_batches(tiny_tok, tmp_path):
    """Under torchrun each rank generates its slice of every batch; rank 0 alone writes; all agree on the scores."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["prompts"]) == 6 and len(r1["prompts"]) == 3  # 3 cells of 3 items: slices [0::2] and [1::2]
    assert not set(r0["prompts"]) & set(r1["prompts"])
    single = ev.evaluate(ev.Config(out_dir=str(tmp_path / "one"), data_dir=str(tmp_path), benchmarks="niah",
                                   niah_lengths="1200", niah_depths=3, niah_samples=3, batch=4),
                         engine=Oracle(tiny_tok, needle_answer), tok=tiny_tok)
    assert r0["scores"] == r1["scores"] == single and single["niah"]["grid"] == [[100.0], [100.0], [100.0]]
    rows = read_jsonl(tmp_path / "dist" / "niah" / "preds.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in read_jsonl(tmp_path / "one" / "niah" / "preds.jsonl"))
    assert len(rows) == 9


# ----------------------------------------------------------------------------- general benchmarks
def general_answer(prompt: str) -> str:
    for key, reply in (("Q(sqrt(2))", "\\boxed{B}"), ("Statement 1", "\\boxed{A}"), ("Z_2 x Z_3", "The answer is (B)"),
                       ("frac{1}{2}", "so \\boxed{0.75}"), ("7 \\times 6", "\\boxed{42}"), ("x + 3", "\\boxed{3}"),
                       ("cats", "cats are soft and warm"), ("the sea", "The Sea is big and blue"),
                       ("dogs", "* dogs bark\n* dogs run")):
        if key in prompt:
            return reply
    raise AssertionError(prompt)


def test_general_benchmarks(tiny_tok, tmp_path):
    engine = Oracle(tiny_tok, general_answer)
    s = ev.evaluate(cfg_for(tmp_path, benchmarks="mmlu,math500", think_tokens=64, mmlu_protocol="trained"),
                    engine=engine, tok=tiny_tok)
    assert s["mmlu"] == {"trained": {"acc": 66.67, "n": 3, "subjects": 1}}  # B, D (answered A), B ("the answer is")
    assert s["math500"] == {"acc": 66.67, "n": 3}  # 0.75 == 3/4 by math-verify, 42, 3 != 2
    mmlu = [p for p in engine.prompts if "Q(sqrt(2))" in p][0]
    assert mmlu == chat_user(tiny_tok, "Question: Find the degree for the given field extension Q(sqrt(2)) over Q.\n"
                                       "Choices:(A) 0\n(B) 2\n(C) 1\n(D) 3" + ev.MMLU_SUFFIX)
    assert set(engine.max_new) == {64}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| **tiny random model (longbench prompts)** (MMLU 0-shot trained format) | – | 66.7 | 66.7 | – |" in md


def test_ifeval_through_lm_eval(tiny_tok, tmp_path):
    pytest.importorskip("lm_eval.tasks.ifeval.utils")
    s = ev.evaluate(cfg_for(tmp_path, benchmarks="ifeval"), engine=Oracle(tiny_tok, general_answer), tok=tiny_tok)
    # no commas: yes; lowercase: no ("The Sea"), no commas: yes; two bullets: yes
    assert s["ifeval"] == {"prompt_strict": 66.67, "inst_strict": 75.0, "prompt_loose": 66.67, "inst_loose": 75.0,
                           "n": 3}
    boxed = ev.score_general("ifeval", [dict(json.loads((FIX / "ifeval" / "input_data.jsonl").read_text().splitlines()[0]),
                                             pred="<think>Hmm, well, ok</think>cats purr")], "train")
    assert boxed["prompt_strict"] == 100.0  # the thinking (with commas) is not graded


def test_general_train_style_prompt(tmp_path, tiny_tok):
    items = ev.general_items("math500", cfg_for(tmp_path, prompt_style="train"))
    assert items[1]["user"] == "Compute $7 \\times 6$." and items[1]["meta"] == {"kind": "math", "answers": ["42"]}
    items = ev.general_items("math500", cfg_for(tmp_path))
    assert items[1]["user"] == "Compute $7 \\times 6$.\nPlease reason step by step, and put your final answer within " \
                               "\\boxed{}."


# ----------------------------------------------------------------------------- the table
def test_table_puts_paper_numbers_beside_ours():
    lb = {d: {"f1": f, "sub_em": f + 5, "n": 200} for d, f in zip(ev.LB_DATASETS, (80.0, 90.0, 60.0, 50.0, 70.0))}
    lb["narrativeqa"]["split"] = {"0-16K": 61.0, "16-32K": 42.0, "32-64K": 33.0, "64K+": None}
    lb["hotpotqa_e"] = {"f1": 1.0, "sub_em": 1.0, "n": 3, "buckets": {"0-4k": 10.0, "4-8k": 20.0, "8k+": None}}
    scores = {"longbench": lb, "ruler": {"16384": {"niah_single_1": 90.0, "vt": 80.0, "avg": 85.0},
                                         "4096": {"niah_single_1": 99.0, "vt": 97.0, "avg": 98.0}},
              "mmlu": {"standard": {"acc": 70.0}}, "math500": {"acc": 80.0}, "ifeval": {"prompt_strict": 60.0}}
    md = ev.table(scores, "ckpt")
    lines = md.splitlines()
    i = lines.index("| model | LC avg | HotpotQA | 2WikiMQA | MuSiQue | NarrQA | Qasper |")
    assert lines[i + 2] == "| **ckpt** | 70.0 | 80.0 | 90.0 | 60.0 | 50.0 | 70.0 |"
    assert lines[i + 3] == "| **ckpt** (sub_em) | 75.0 | 85.0 | 95.0 | 65.0 | 55.0 | 75.0 |"
    assert "| LoongRL-7B | 72.4 | 83.1 | 91.1 | 65.6 | 58.4 | 63.6 |" in lines
    assert "| Qwen2.5-7B-Instruct | 48.9 | 69.5 | 50.5 | 34.0 | 44.5 | 46.0 |" in lines
    assert "| hotpotqa_e (3) | 10.0 | 20.0 | – |" in lines
    j = lines.index("| model | NarrQA 0-16K | NarrQA 16-32K | NarrQA 32-64K | RULER 4K | RULER 16K | RULER 32K | "
                    "RULER 64K | RULER 128K |")
    assert lines[j + 2] == "| **ckpt** | 61.0 | 42.0 | 33.0 | 98.0 | 85.0 | – | – | – |"
    assert "| LoongRL-7B | 69.8 | 47.4 | 57.2 | – | 93.4 | 91.4 | 86.2 | 76.8 |" in lines
    assert "mean over 2 of 13 tasks" in md
    k = lines.index("| model | Gen. avg | MMLU | MATH-500 | IFEval |")
    assert lines[k + 2] == "| **ckpt** (MMLU 5-shot standard) | 70.0 | 70.0 | 80.0 | 60.0 |"
    r = lines.index("| task | 4K | 16K |")  # RULER per task, in RULER's task order, then the mean
    assert lines[r + 2:r + 5] == ["| niah_single_1 | 99.0 | 90.0 |", "| vt | 97.0 | 80.0 |", "| **mean** | 98.0 | 85.0 |"]
    assert "| LoongRL-7B | 75.0 | 76.2 | 78.0 | 70.9 |" in lines


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    out = capsys.readouterr().out
    assert "--prompt_style='longbench'" in out and "--max_length=31500" in out and "preds.jsonl" in out


# ----------------------------------------------------------------------------- issue 13: train-style lengths
def boxed_needle(prompt: str) -> str:
    return "<think>found it</think> \\boxed{" + needle_answer(prompt) + "}"


def test_train_style_ruler_fills_the_length_and_widens_the_window(tiny_tok, tmp_path):
    """At 4K with a 4,096-token thinking budget the train style still builds full 4K items (it built none before),
    the engine window is L + think_tokens, and results.md says which style and budgets made the column."""
    engine = Oracle(tiny_tok, boxed_needle)
    cfg = cfg_for(tmp_path, benchmarks="ruler", ruler_lengths="4096", ruler_tasks="niah_single_1", num_samples=2,
                  prompt_style="train")
    s = ev.evaluate(cfg, engine=engine, tok=tiny_tok)
    assert s["ruler"]["4096"] == {"niah_single_1": 100.0, "avg": 100.0} and set(engine.max_new) == {4096}
    rows = read_jsonl(tmp_path / "out" / "ruler" / "preds.jsonl")
    assert len(rows) == 2 and all(0.98 * (4096 - 128) < r["prompt_tokens"] <= 4096 - 128 for r in rows)
    plan = ev.check(dataclasses.replace(cfg, ruler_lengths="4096,40000", out_dir=str(tmp_path / "o1")), load_model=False)
    assert plan["window"] == 40000 + 4096 and plan["yarn"] == 4.0
    plain = ev.check(dataclasses.replace(cfg, prompt_style="longbench", out_dir=str(tmp_path / "o2")), load_model=False)
    assert plain["window"] == 32768 and plain["yarn"] == 0.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert ("| RULER 4K | train | 4,096 minus tokens_to_generate (30/32/50/120/128) | thinking 4,096 | 32,768 | off |"
            in md)


# ----------------------------------------------------------------------------- issue 13: checks before loading
@pytest.mark.parametrize("kw,msg", [
    (dict(benchmarks="ruler", ruler_tasks="niah_single"),
     "error: --ruler_tasks: unknown niah_single; valid: all, niah_single_1, niah_single_2, niah_single_3, "),
    (dict(benchmarks="ruler", ruler_lengths="1k,2048"), "error: --ruler_lengths: '1k' is not a length in tokens"),
    (dict(benchmarks="niah", niah_lengths="4096,-1"), "error: --niah_lengths: '-1' is not a length in tokens"),
    (dict(benchmarks="math500", data_dir="EMPTY"), "math500/test.jsonl: not found"),
    (dict(benchmarks="ifeval", data_dir="EMPTY"), "ifeval/input_data.jsonl: not found"),
    (dict(benchmarks="longbench", data_dir="EMPTY"), "error: longbench: no files in "),
    (dict(benchmarks="ruler", ruler_tasks="qa_1", data_dir="EMPTY"), "error: --ruler_tasks: qa_1 needs "),
    (dict(benchmarks="mmlu,gsm8k"), "error: --benchmarks: unknown gsm8k; choose from longbench, ruler,"),
    (dict(benchmarks="ruler", ruler_lengths="65536", max_model_len=32768), "the longest RULER / needle length needs"),
    (dict(benchmarks="ruler", model="no/such/model"), "error: --model=no/such/model: no such folder"),
])
def test_bad_input_fails_before_anything_is_created(tmp_path, kw, msg):
    if kw.get("data_dir") == "EMPTY":
        kw["data_dir"] = str(tmp_path / "empty")
    cfg = dataclasses.replace(cfg_for(tmp_path), **kw)
    with pytest.raises(SystemExit) as e:
        ev.evaluate(cfg)  # no engine given: it would be loaded only after the checks
    assert msg in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = cfg_for(tmp_path, benchmarks="ruler,math500,ifeval", ruler_tasks="vt,nope", data_dir=str(tmp_path))
    with pytest.raises(SystemExit) as e:
        ev.evaluate(cfg)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(x.startswith("error: ") for x in lines)
    assert "nope" in lines[0] and "math500" in lines[1] and "ifeval" in lines[2]


def test_empty_and_malformed_files_are_one_line_errors(tmp_path):
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "test.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"^error: .*math500/test.jsonl: no records$"):
        ev.evaluate(cfg_for(tmp_path, benchmarks="math500", data_dir=str(tmp_path)))
    (tmp_path / "math500" / "test.jsonl").write_text('{"problem": "1+1?"}\n')
    with pytest.raises(SystemExit, match=r"test.jsonl: record 0: needs problem, answer$"):
        ev.evaluate(cfg_for(tmp_path, benchmarks="math500", data_dir=str(tmp_path)))
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "eval.py", "--benchmarks=ruler", "--ruler_lengths=1k",
                        f"--out_dir={tmp_path / 'out'}"], cwd=Path(ev.__file__).parent, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --ruler_lengths: '1k' is not a length in tokens (write 4096, not 4k)"]
    assert not (tmp_path / "out").exists()


def test_ifeval_needs_nltk_data_for_sentence_checks(tmp_path, monkeypatch):
    pytest.importorskip("nltk")
    if ev.ifeval_problems([]) != []:
        pytest.skip("lm-eval is not installed")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "input_data.jsonl").write_text(json.dumps(
        {"key": 1, "prompt": "Answer in fewer than 3 sentences.", "instruction_id_list":
         ["length_constraints:number_sentences"], "kwargs": [{"relation": "less than", "num_sentences": 3}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        ev.evaluate(cfg_for(tmp_path, benchmarks="ifeval", data_dir=str(tmp_path)))
    assert str(e.value) == ("error: ifeval: its length_constraints:number_sentences checks need nltk's punkt data: "
                            "python -c \"import nltk; nltk.download('punkt')\"")


def test_bad_model_leaves_nothing_that_refuses_the_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # passes the folder check, fails to load
    cfg = cfg_for(tmp_path, benchmarks="ruler", ruler_lengths="1024", ruler_tasks="niah_single_1", num_samples=1,
                  max_new_tokens=2)
    with pytest.raises(SystemExit, match=r"^error: --model=.*broken: loading failed"):
        ev.evaluate(dataclasses.replace(cfg, model=str(broken)))
    assert not (tmp_path / "out" / "run.json").exists()
    s = ev.evaluate(cfg)  # the tiny random model, same out_dir
    assert set(s["ruler"]["1024"]) == {"niah_single_1", "avg"}
    assert not (tmp_path / "data").exists()  # its byte tokenizer was built in a temporary folder, not in the cwd


# ----------------------------------------------------------------------------- issue 13: merging and resume keys
def test_reruns_merge_scores_and_tables(tiny_tok, tmp_path):
    engine = Oracle(tiny_tok, needle_answer)
    base = cfg_for(tmp_path, benchmarks="ruler", ruler_lengths="2500", num_samples=2)
    ev.evaluate(dataclasses.replace(base, ruler_tasks="niah_single_1,vt"), engine=engine, tok=tiny_tok)
    ev.evaluate(cfg_for(tmp_path, benchmarks="math500", think_tokens=64), engine=Oracle(tiny_tok, general_answer),
                tok=tiny_tok)
    n = len(engine.prompts)
    s = ev.evaluate(dataclasses.replace(base, ruler_tasks="fwe,vt"), engine=engine, tok=tiny_tok)
    assert len(engine.prompts) == n + 2  # fwe only: vt's predictions are reused
    assert s["ruler"]["2500"] == {"niah_single_1": 100.0, "vt": 0.0, "fwe": 0.0, "avg": 33.33}
    assert s["math500"] == {"acc": 66.67, "n": 3}  # the other benchmark's scores survive
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == s
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| niah_single_1 | 100.0 |" in md and "| fwe | 0.0 |" in md and "MATH-500" in md
    assert set(s["settings"]) == {"RULER 2500", "MATH-500"}


def test_merge_rules():
    old = {"ruler": {"4096": {"vt": 50.0, "cwe": 10.0, "avg": 30.0}}, "mmlu": {"trained": {"acc": 1.0}},
           "niah": {"task": "niah_single_1", "samples": 2, "lengths": [1024], "depths": [0, 100],
                    "grid": [[100.0], [0.0]]}}
    new = {"ruler": {"4096": {"cwe": 40.0, "avg": 40.0}, "8192": {"vt": 20.0, "avg": 20.0}},
           "mmlu": {"standard": {"acc": 2.0}},
           "niah": {"task": "niah_single_1", "samples": 2, "lengths": [2048], "depths": [0, 50],
                    "grid": [[90.0], [80.0]]}}
    m = ev.merge(old, new)
    assert m["ruler"] == {"4096": {"vt": 50.0, "cwe": 40.0, "avg": 45.0}, "8192": {"vt": 20.0, "avg": 20.0}}
    assert m["mmlu"] == {"trained": {"acc": 1.0}, "standard": {"acc": 2.0}}
    assert m["niah"]["lengths"] == [1024, 2048] and m["niah"]["depths"] == [0, 50, 100]
    assert m["niah"]["grid"] == [[100.0, 90.0], [None, 80.0], [0.0, None]]
    other = dict(new["niah"], task="niah_single_2")
    assert ev.merge(old, {"niah": other})["niah"] == other  # another needle task replaces the grid


def test_resume_key_covers_data_dir_window_and_word_lists(tiny_tok, tmp_path):
    data = tmp_path / "data"
    (data / "ruler").mkdir(parents=True)
    (data / "longbench").mkdir()
    (data / "longbench" / "musique.jsonl").write_text((FIX / "longbench" / "musique.jsonl").read_text())
    engine = Oracle(tiny_tok, lambda p: "x")
    cfg = ev.Config(out_dir=str(tmp_path / "out"), data_dir=str(data), benchmarks="longbench,ruler",
                    ruler_lengths="1500", ruler_tasks="niah_single_1", num_samples=1)
    ev.evaluate(cfg, engine=engine, tok=tiny_tok)
    key = json.loads((tmp_path / "out" / "run.json").read_text())["units"]
    assert key["longbench"]["max_model_len"] == 32768 and key["longbench"]["data_dir"] == str(data.resolve())
    assert key["ruler/1500"]["english_words.json"] is False
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| LongBench | longbench | 31,500 (cut in the middle) | 32/128 (LongBench's per set) | 32,768 | off |" in md
    assert "| RULER 1500 | longbench | 1,500 minus tokens_to_generate (30/32/50/120/128) | RULER's tokens_to_generate |" in md
    with pytest.raises(SystemExit, match=r"longbench predictions were made with max_model_len=32768 \(now 20000\)"):
        ev.evaluate(dataclasses.replace(cfg, max_model_len=20000), engine=engine, tok=tiny_tok)
    (data / "ruler" / "english_words.json").write_text(json.dumps({"0": "apple", "1": "pear"}))
    with pytest.raises(SystemExit, match=r"ruler/1500 predictions were made with english_words.json=False \(now "
                                         r"True\)"):
        ev.evaluate(dataclasses.replace(cfg, benchmarks="ruler"), engine=engine, tok=tiny_tok)
    moved = tmp_path / "data2"
    data.rename(moved)
    with pytest.raises(SystemExit, match="data_dir="):
        ev.evaluate(dataclasses.replace(cfg, data_dir=str(moved)), engine=engine, tok=tiny_tok)


def test_malformed_preds_lines_and_run_json_are_skipped_and_reported(tiny_tok, tmp_path, capsys):
    engine = Oracle(tiny_tok, needle_answer)
    cfg = cfg_for(tmp_path, benchmarks="ruler", ruler_lengths="1500", ruler_tasks="niah_single_1", num_samples=4)
    first = ev.evaluate(cfg, engine=engine, tok=tiny_tok)
    preds = tmp_path / "out" / "ruler" / "preds.jsonl"
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join([lines[0], '{"pred": "no id"}', "[1, 2]", lines[1], lines[2], lines[3][:30]]) + "\n")
    n = len(engine.prompts)
    assert ev.evaluate(cfg, engine=engine, tok=tiny_tok) == first
    assert len(engine.prompts) == n + 1  # only the torn item; the two malformed lines are dropped
    assert "skipped 3 malformed line(s) (2, 3, 6)" in capsys.readouterr().out
    assert [json.loads(x)["id"] for x in preds.read_text().splitlines()] == [f"niah_single_1/1500/{i}" for i in
                                                                             (0, 1, 2, 3)]
    (tmp_path / "out" / "run.json").write_text('{"model": ')  # torn or foreign
    assert ev.evaluate(cfg, engine=engine, tok=tiny_tok) == first
    assert len(engine.prompts) == n + 5 and "run.json" in capsys.readouterr().out  # its predictions regenerated
    assert json.loads((tmp_path / "out" / "run.json").read_text())["format"] == 2


# ----------------------------------------------------------------------------- issue 13: MMLU protocols
def test_mmlu_standard_prompt_bytes_and_letter_reading(tmp_path):
    cfg = cfg_for(tmp_path, mmlu_protocol="standard")
    (it, *_), dev = ev.general_items("mmlu", cfg), (FIX / "mmlu" / "abstract_algebra_dev.csv").read_text()
    assert it["id"] == "5shot/abstract_algebra/0" and "user" not in it
    assert it["prompt"].startswith("The following are multiple choice questions (with answers) about abstract "
                                   "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\n"
                                   "C. 2\nD. 3\nAnswer: B\n\nStatement 1 | If aH")
    assert it["prompt"].endswith("Answer: A\n\nFind the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\n"
                                 "B. 2\nC. 1\nD. 3\nAnswer:")
    assert it["prompt"].count("\nAnswer:") == 6 and len(dev.splitlines()) == 5
    assert [ev.mmlu_letter(x) for x in (" B", "B.", " (B)\nbecause", "b", "B. 2", "The answer is B")] == \
        ["B", "B", "B", "B", "B 2", "THE ANSWER IS B"]


def standard_answer(prompt: str) -> str:
    last = prompt.rsplit("\n\n", 1)[-1]
    for key, reply in (("Q(sqrt(2))", " B"), ("Statement 1", " D."), ("Z_2 x Z_3", " B. 6")):
        if key in last:
            return reply
    return general_answer(prompt)


def test_mmlu_both_protocols_side_by_side(tiny_tok, tmp_path):
    engine = Oracle(tiny_tok, standard_answer)
    s = ev.evaluate(cfg_for(tmp_path, benchmarks="mmlu", think_tokens=64), engine=engine, tok=tiny_tok)
    # standard: B right, D. right (punctuation ignored), "B. 6" wrong (lm-eval's exact match); trained: as above
    assert s["mmlu"] == {"standard": {"acc": 66.67, "n": 3, "subjects": 1},
                         "trained": {"acc": 66.67, "n": 3, "subjects": 1}}
    assert sorted(engine.max_new) == [16, 64]  # the letter vs the thinking budget
    std = [p for p in engine.prompts if p.startswith("The following are multiple choice")]
    assert len(std) == 3 and not any("<|im_start|>" in p for p in std)  # raw text, no chat template
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| **tiny random model (longbench prompts)** (MMLU 5-shot standard) | – | 66.7 | – | – |" in md
    assert "| **tiny random model (longbench prompts)** (MMLU 0-shot trained format) | – | 66.7 | – | – |" in md
    assert "| MMLU (standard) | 5-shot raw text (lm-eval mmlu) | – | 16 (first line read) |" in md


def test_mmlu_tarball_layout_reads_like_the_flat_one(tmp_path):
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        src = FIX / "mmlu" / f"abstract_algebra_{split}.csv"
        (tmp_path / "mmlu" / split / src.name).write_text(src.read_text())
    nested = ev.general_items("mmlu", ev.Config(data_dir=str(tmp_path)))
    assert nested == ev.general_items("mmlu", ev.Config(data_dir=str(FIX))) and len(nested) == 6


def test_mmlu_limit_is_per_subject(tmp_path):
    d = tmp_path / "mmlu"
    d.mkdir()
    row = lambda s, q, a: {"subject": s, "question": q, "choices": ["w", "x", "y", "z"], "answer": a}  # noqa: E731
    (d / "test.jsonl").write_text("".join(json.dumps(row(s, f"{s} q{i}", i % 4)) + "\n"
                                          for s in ("anatomy", "virology") for i in range(3)))
    (d / "dev.jsonl").write_text("".join(json.dumps(row(s, f"{s} dev{i}", "C")) + "\n"
                                         for s in ("anatomy", "virology") for i in range(5)))
    items = ev.general_items("mmlu", ev.Config(data_dir=str(tmp_path), limit=2))
    assert [it["id"] for it in items] == ["5shot/anatomy/0", "5shot/anatomy/1", "5shot/virology/3", "5shot/virology/4",
                                         "trained/anatomy/0", "trained/anatomy/1", "trained/virology/3",
                                         "trained/virology/4"]
    assert items[2]["prompt"].startswith("The following are multiple choice questions (with answers) about virology."
                                         "\n\nvirology dev0\nA. w\n") and items[1]["meta"]["answers"] == ["B"]
    (d / "dev.jsonl").write_text("".join(json.dumps(row("anatomy", f"dev{i}", 0)) + "\n" for i in range(5)))
    with pytest.raises(SystemExit, match="5 dev questions per subject .*too few for virology"):
        ev.check(ev.Config(data_dir=str(tmp_path), benchmarks="mmlu", out_dir=str(tmp_path / "o")), load_model=False)
    assert len(ev.general_items("mmlu", ev.Config(data_dir=str(tmp_path), mmlu_protocol="trained"))) == 6


# ----------------------------------------------------------------------------- issue 13: pictures and tables
def test_heatmap_has_title_and_cell_values(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.setdefault("fig", fig))
    ev.heatmap([[100.0, 50.0], [None, 0.0]], [1024, 2048], [0, 100], tmp_path / "h.png", "m: niah_single_1, 4 needles")
    ax = seen["fig"].axes[0]
    assert ax.get_title() == "m: niah_single_1, 4 needles"
    assert [t.get_text() for t in ax.texts] == ["100", "50", "–", "0"]
