import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import keychain as kc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bpe_tok(raw, tmp_path_factory):
    """A BPE tokenizer with real merges, trained here: token counts are not additive across boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    items, _ = kc.load_items(raw["hotpotqa"])
    text = [d for it in items for d in it["docs"]] + [it["question"] for it in items]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=700, special_tokens=kc.TINY_SPECIALS,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=kc.CHATML_TEMPLATE)
    tok.save_pretrained(str(tmp_path_factory.mktemp("bpe")))
    return tok


def cfg(**kw):
    base = dict(max_tokens=8192, key_style="short", seed=3)
    base.update(kw)
    return kc.Config(**base)


@pytest.fixture(scope="module")
def kc_rows(raw, tiny_tok):
    rows, stats = kc.synth(cfg(input=f"{raw['hotpotqa']},{raw['musique']}", kind="keychain", max_tokens=12288), tiny_tok)
    return rows, stats


# ----------------------------------------------------------------------------- loaders
def test_hotpot_pairs_and_dict_shapes_load_the_same(raw, tmp_path):
    data = json.loads(Path(raw["hotpotqa"]).read_text())
    mirror = [{**r, "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}}
              for r in data]
    p = tmp_path / "hotpot_mirror.json"
    p.write_text(json.dumps(mirror))
    a, _ = kc.load_items(raw["hotpotqa"])
    b, _ = kc.load_items(str(p), source="hotpotqa")
    assert a == b and len(a) == 40
    first = data[0]["context"][0]
    assert a[0]["docs"][0] == first[0] + "\n" + "".join(first[1])  # HotpotQA sentences joined with ""
    assert a[0]["answers"] == [data[0]["answer"]] and a[0]["id"] == data[0]["_id"] and a[0]["source"] == "hotpotqa"


def test_2wiki_sentences_get_spaces_and_musique_drops_unanswerable(raw):
    w, _ = kc.load_items(raw["2wiki"])
    rec = json.loads(Path(raw["2wiki"]).read_text())[0]
    assert w[0]["docs"][0] == rec["context"][0][0] + "\n" + " ".join(rec["context"][0][1])
    m, skips = kc.load_items(raw["musique"])
    recs = [json.loads(x) for x in Path(raw["musique"]).read_text().splitlines()]
    answerable = [r for r in recs if r["answerable"]]
    assert len(m) == len(answerable) and skips == {"unanswerable": len(recs) - len(answerable)} and skips["unanswerable"] > 0
    assert m[0]["answers"] == [answerable[0]["answer"]] + answerable[0]["answer_aliases"]
    p0 = answerable[0]["paragraphs"][0]
    assert m[0]["docs"][0] == p0["title"] + "\n" + p0["paragraph_text"] and m[0]["source"] == "musique"


def test_join_sentences_exact():
    assert kc.join_sentences(["A b.", " C d.", "E."]) == "A b. C d. E."
    assert kc.join_sentences(["A.", "B.\n", "C"]) == "A. B.\nC"


def test_longbench_and_items_roundtrip(tmp_path):
    lb = tmp_path / "hotpotqa_e.jsonl"
    lb.write_text(json.dumps({"input": "Who?", "context": "Passage 1:\nX is Y.", "answers": ["Y"], "length": 5,
                              "dataset": "hotpotqa", "_id": "abc"}) + "\n")
    items, _ = kc.load_items(str(lb))
    assert items == [{"id": "abc", "question": "Who?", "answers": ["Y"], "docs": ["Passage 1:\nX is Y."],
                      "source": "hotpotqa"}]
    out = tmp_path / "items.jsonl"
    kc.write_rows(out, items)
    assert kc.load_items(str(out))[0] == items


def test_verl_parquet_maps_data_sources_to_kinds(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    kcq = "Please read the following text.\n... the correct consecutive chain of key:value pairs ..."
    recs = [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve the following math problem step by "
         "step. The last line of your response should be of the form Answer: $Answer (without quotes) where $Answer "
         "is the answer to the problem.\n\nWhat is 2+3?\n\nRemember to put your answer on its own line after \"Answer:\"."}],
         "ability": "MATH", "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"index": "7"}},
        {"data_source": "hotpotqa_keychain", "prompt": [{"role": "user", "content": kcq}], "ability": "qa",
         "reward_model": {"style": "rule", "ground_truth": "Paris"}, "extra_info": {"index": "8"}},
        {"data_source": "musique", "prompt": [{"role": "user", "content": "The following are given passages."}],
         "ability": "qa", "reward_model": {"style": "rule", "ground_truth": "x"}, "extra_info": {"index": "9"}},
        {"data_source": "mathqa", "prompt": [{"role": "user", "content": "Question: 1+1\nChoices:(A) 2\n(B) 3"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "A"}, "extra_info": {"index": "10"}},
        {"data_source": "ruler_book", "prompt": [{"role": "user", "content": "special magic numbers"}],
         "ability": "qa", "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": {"index": "11"}},
    ]
    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(recs), p)
    rows = kc.load_rows(str(p))
    assert [r["kind"] for r in rows] == ["math", "keychain", "qa", "choice", "ruler"]
    assert rows[0]["messages"] == kc.chat("What is 2+3?") and rows[0]["answers"] == ["5"] and rows[0]["id"] == "dapo-7"
    assert rows[0]["source"] == "dapo"  # DAPO-Math-17k's data_source math_dapo: one name everywhere
    assert rows[1]["messages"][0] == {"role": "system", "content": kc.SYSTEM_PROMPT} and rows[1]["messages"][1]["content"] == kcq
    synthesized, _ = kc.synth(kc.Config(input=str(p), max_tokens=4096), tiny_tok)  # --kind plays no part
    assert [(r["kind"], r["num_tokens"]) for r in synthesized] == [
        (r["kind"], kc.prompt_tokens_msgs(tiny_tok, r["messages"])) for r in rows]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{**recs[2], "data_source": "imagenet"}]), bad)
    with pytest.raises(kc.DataError, match=r"bad\.parquet: record 0: unknown data_source 'imagenet'"):
        kc.load_rows(str(bad))


def test_math_and_choice_rows(raw, tiny_tok):
    rows, _ = kc.synth(cfg(input=raw["mathqa"], kind="choice"), tiny_tok)
    rec = json.loads(Path(raw["mathqa"]).read_text())[0]
    assert rows[0]["answers"] == [rec["correct"].upper()]
    user = rows[0]["messages"][1]["content"]
    assert user.startswith("Question: " + rec["Problem"] + "\nChoices:(A) ") and "\n(E) " in user
    math, _ = kc.synth(cfg(input=raw["dapo"], kind="math"), tiny_tok)
    assert all(r["kind"] == "math" and "Answer:" not in r["messages"][1]["content"] for r in math)
    assert all(r["num_tokens"] == kc.prompt_tokens_msgs(tiny_tok, r["messages"]) for r in math)


GOOD = {"_id": "g", "question": "q", "answer": "x", "context": [["t", ["s."]]]}


@pytest.mark.parametrize("name,content,match", [
    ("h.json", [GOOD, {"_id": "a", "answer": "x", "context": []}], r"h\.json: record 1: missing field 'question'"),
    ("h.json", [GOOD, {"_id": "a", "question": "q", "answer": "x", "context": [["t", "not a list"]]}],
     r"h\.json: record 1: context\[0\] is not a \[title, \[sentences\]\] pair"),
    ("h.json", [GOOD, {"_id": "a", "question": "q", "answer": "x", "context": {"title": ["t"], "sentences": []}}],
     r"h\.json: record 1: context dict needs equal-length"),
    ("h.json", [GOOD, "just a string"], r"h\.json: record 1: expected an object"),
    ("h.json", {"not": "a list"}, r"h\.json: expected a JSON list"),
    ("m.jsonl", None, r"m\.jsonl: record 1 \(line 2\): invalid JSON"),
    ("m2.jsonl", [{"id": "1", "question": "q", "answer": "a", "answerable": True, "paragraphs": [{"title": "t"}]}],
     r"m2\.jsonl: record 0 paragraph 0: missing field 'paragraph_text'"),
    ("h2.json", [{"_id": "a", "question": " ", "answer": "x", "context": [["t", ["s."]]]}],
     r"h2\.json: record 0: empty question"),
    ("odd.json", [{"foo": 1}], r"odd\.json: record 0: cannot tell the format"),
])
def test_bad_records_name_file_and_record(tmp_path, name, content, match):
    p = tmp_path / name
    if content is None:
        p.write_text('{"id": "1", "question": "q", "answer": "a", "answerable": true, "paragraphs": [{"title": "t", "paragraph_text": "p."}]}\n{broken\n')
    elif name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        p.write_text(json.dumps(content))
    with pytest.raises(kc.DataError, match=match):
        kc.load_items(str(p))


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("kind,budget", [("keychain", "docs"), ("keychain", "total"), ("qa", "docs"), ("ruler", "docs")])
@pytest.mark.parametrize("which", ["tiny_tok", "bpe_tok"])
def test_no_row_over_budget_and_rows_near_it(raw, request, kind, budget, which):
    tok = request.getfixturevalue(which)
    L = 4096 if which == "bpe_tok" else 8192
    c = cfg(input=raw["hotpotqa"], kind=kind, max_tokens=L, n=12, budget=budget)
    rows, stats = kc.synth(c, tok)
    assert len(rows) == 12, stats
    for r in rows:
        exact = len(tok(kc.render_prompt(tok, r["messages"]), add_special_tokens=False).input_ids)
        assert exact == r["num_tokens"]
        fit = exact
        if kind == "keychain" and budget == "docs":  # chains on top: the prompt without its pairs fills L
            user = r["messages"][1]["content"]
            fit = kc.prompt_tokens(tok, user.replace(user[32:user.rindex("\n\nIn the context")],
                                                     kc.parse_pairs(user[32:user.rindex("\n\nIn the context")])[0]))
            assert exact > L and r["budget"] == "docs" and kc.verify_row(r, tok) == []
        assert fit <= L and fit >= (0.95 if kind == "keychain" else 0.98) * L, (kind, fit)


def test_pool_documents_are_tokenized_once(raw, tiny_tok, monkeypatch):
    items, _ = kc.load_items(raw["hotpotqa"])
    pool = kc.Pool(tiny_tok, items)
    seen = []
    real = kc.count_tokens
    monkeypatch.setattr(kc, "count_tokens", lambda tok, texts: seen.extend(texts) or real(tok, texts))
    rows, _ = kc.synth(cfg(input=raw["hotpotqa"], kind="qa", n=5), tiny_tok)
    prompts = [t for t in seen if t.startswith("<|im_start|>") and len(t) > 1000]
    assert len(prompts) == 5  # each final prompt exactly once
    assert sum(t in pool.index for t in seen) == len(pool.docs)  # each pool document exactly once
    # plus one separator calibration over at most 200 pool documents, and short probes
    assert sum(len(t) for t in seen) < 1.1 * sum(len(t) for t in prompts) + 2 * sum(len(d) for d in pool.docs)


def test_fillers_come_from_the_pool_never_the_items_own_and_no_repeats(raw, tiny_tok):
    items, _ = kc.load_items(raw["hotpotqa"])
    pool = kc.Pool(tiny_tok, items)
    for it in items[:10]:
        docs = kc.fill_context(it, pool, 6000, random.Random(0))
        assert len(docs) == len(set(docs)) and set(it["docs"]) <= set(docs)
        assert all(d in pool.index for d in docs) and len(docs) > len(it["docs"])
    assert kc.fill_context(items[0], pool, 50, random.Random(0)) is None


def test_middle_placement_concentrates_core_documents(raw, tiny_tok):
    items, _ = kc.load_items(raw["hotpotqa"])
    pool = kc.Pool(tiny_tok, items)

    def positions(placement):
        out = []
        for i, it in enumerate(items):
            docs = kc.fill_context(it, pool, 12000, random.Random(i), placement)
            out += [docs.index(d) / (len(docs) - 1) for d in it["docs"]]
        return out

    mid, uni = positions("middle"), positions("shuffle")
    sd = lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)) ** 0.5  # noqa: E731
    assert abs(sum(mid) / len(mid) - 0.5) < 0.05 and sd(mid) < 0.2 < 0.25 < sd(uni)
    assert min(mid) > 0.0 and max(mid) < 1.0  # clamped at +-0.95 of the range


# ----------------------------------------------------------------------------- KeyChain invariants
def test_keychain_invariants(kc_rows, raw):
    rows, stats = kc_rows
    assert {r["source"] for r in rows} == {"hotpotqa", "musique"} and len(rows) == 74
    assert stats == {"requested": 74, "skip: unanswerable": 6}
    all_q = {it["question"] for it in kc.load_items(raw["hotpotqa"])[0] + kc.load_items(raw["musique"])[0]}
    for r in rows:
        assert kc.verify_row(r) == []
        user = r["messages"][1]["content"]
        plain, pairs = kc.parse_pairs(user)
        nxt = {k: v for k, v, _ in pairs}
        assert len(pairs) == len(nxt) == r["chains"] * r["hops"]  # no key repeats
        assert r["chains"] == len(r["distractor_questions"]) + 1
        k, hops = r["start_key"], 0
        while k in nxt:
            k, hops = nxt[k], hops + 1
        assert k == r["question"] and hops == 4
        assert user.endswith(f'starting from {r["start_key"]}.') and r["question"] not in plain
        ends = [v for v in nxt.values() if v not in nxt]
        assert ends.count(r["question"]) == 1 and set(r["distractor_questions"]) <= all_q
        assert all(len(key) == 8 for key in nxt)


def test_uuid_keys_are_full_uuid4(raw, tiny_tok):
    rows, _ = kc.synth(cfg(input=raw["hotpotqa"], kind="keychain", key_style="uuid", max_tokens=16384, n=3), tiny_tok)
    assert len(rows) == 3
    for r in rows:
        keys = [k for k, _, _ in kc.parse_pairs(r["messages"][1]["content"])[1]]
        assert all(len(k) == 36 and uuid.UUID(k).version == 4 for k in keys)
        assert kc.verify_row(r, tiny_tok) == []


def test_chain_count_one_per_1k_of_L_or_as_given(raw, tiny_tok):
    small, _ = kc.synth(cfg(input=raw["hotpotqa"], kind="keychain", n=4), tiny_tok)
    assert [r["chains"] for r in small] == [8] * 4  # L = 8192
    dense, _ = kc.synth(cfg(input=raw["hotpotqa"], kind="keychain", n=4, chains=11, hops=3), tiny_tok)
    for d in dense:
        assert d["chains"] == 11 and d["hops"] == 3 and kc.verify_row(d, tiny_tok) == []
        assert len(kc.parse_pairs(d["messages"][1]["content"])[1]) == 33


def test_deterministic_for_a_seed(raw, tiny_tok, kc_rows):
    c = cfg(input=f"{raw['hotpotqa']},{raw['musique']}", kind="keychain", max_tokens=12288)
    again, _ = kc.synth(c, tiny_tok)
    assert again == kc_rows[0]
    other, _ = kc.synth(dataclasses.replace(c, seed=4), tiny_tok)
    assert [r["messages"] for r in other] != [r["messages"] for r in again]


def _corrupt(row, how):
    r = json.loads(json.dumps(row))
    user = r["messages"][1]["content"]
    plain, pairs = kc.parse_pairs(user)
    nxt = {k: v for k, v, _ in pairs}
    if how == "break a link":
        k = nxt[r["start_key"]]
        user = user.replace(f'"{r["start_key"]}": "{k}"', f'"{r["start_key"]}": "{k[:-1]}0"' if k[-1] != "0" else f'"{r["start_key"]}": "{k[:-1]}1"')
    elif how == "duplicate a pair":
        k, v = r["start_key"], nxt[r["start_key"]]
        user = user.replace("Passage 2:\n", "Passage 2:\n" + kc.pair_text(k, v) + "\n", 1)
    elif how == "second chain to the real question":
        d = r["distractor_questions"][0]
        user = user.replace(json.dumps(d, ensure_ascii=False), json.dumps(r["question"], ensure_ascii=False))
    elif how == "drop a pair":
        k = r["start_key"]
        user = user.replace(" " + kc.pair_text(k, nxt[k]), "").replace(kc.pair_text(k, nxt[k]) + "\n", "")
    elif how == "pair inside a word":
        k = r["start_key"]
        text = user.replace(" " + kc.pair_text(k, nxt[k]), "").replace(kc.pair_text(k, nxt[k]) + "\n", "")
        i = text.index("filmmaker") + 4
        user = text[:i] + " " + kc.pair_text(k, nxt[k]) + text[i:]
    elif how == "wrong start key":
        other = next(k for k in nxt if k != r["start_key"])
        user = user.replace(f'starting from {r["start_key"]}.', f'starting from {other}.')
    elif how == "over budget":
        user = user.replace("Passage 1:\n", "Passage 1:\n" + "x" * 400, 1)
    elif how == "key leaks into text":
        user = user.replace("Passage 3:\n", "Passage 3:\nSee " + nxt[r["start_key"]] + " here.\n", 1)
    r["messages"][1]["content"] = user
    return r


@pytest.mark.parametrize("how", ["break a link", "duplicate a pair", "second chain to the real question", "drop a pair",
                                 "pair inside a word", "wrong start key", "over budget", "key leaks into text"])
def test_verify_rejects_corrupted_rows(kc_rows, tiny_tok, how):
    row = kc_rows[0][0]
    assert kc.verify_row(row, tiny_tok) == []
    bad = _corrupt(row, how)
    assert bad != row
    assert kc.verify_row(bad, tiny_tok), how


def test_verify_command_exit_codes(kc_rows, tiny_tok, tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    kc.write_rows(good, kc_rows[0][:3])
    kc.write_rows(bad, kc_rows[0][:2] + [_corrupt(kc_rows[0][2], "break a link")])
    tdir = tmp_path / "tok"
    tiny_tok.save_pretrained(str(tdir))
    run = lambda p: subprocess.run([sys.executable, "keychain.py", "verify", f"--input={p}", f"--tokenizer={tdir}"],  # noqa: E731
                                   cwd=ROOT, capture_output=True, text=True)
    ok, ko = run(good), run(bad)
    assert ok.returncode == 0 and "3 ok, 0 bad" in ok.stdout
    assert ko.returncode == 1 and "record 2" in ko.stdout and "2 ok, 1 bad" in ko.stdout


# ----------------------------------------------------------------------------- RULER
def test_ruler_rows(tiny_tok, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"Sentence number {i} of the book is here." for i in range(3000)))
    for hay in ("", str(book)):
        rows, _ = kc.synth(cfg(kind="ruler", n=6, haystack=hay, needles=3), tiny_tok)
        assert [r["mode"] for r in rows] == ["multikey", "multivalue"] * 3
        for r in rows:
            user = r["messages"][1]["content"]
            needles = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.", user)
            assert len(needles) == 3 and r["num_tokens"] <= 8192
            assert r["answers"] == [v for k, v in needles if k == r["query"]]
            assert len(r["answers"]) == (1 if r["mode"] == "multikey" else 3)
            assert user.endswith(f"special magic numbers for {r['query']} mentioned in the provided text?")
            if hay:
                assert "of the book is here." in user


# ----------------------------------------------------------------------------- filter, output, CLI
def test_filter_keeps_lo_to_hi_inclusive(raw, tmp_path):
    items, _ = kc.load_items(raw["hotpotqa"])
    counts = tmp_path / "counts.jsonl"
    kc.write_rows(counts, [{"id": it["id"], "n": 8, "k": i % 9} for i, it in enumerate(items[:36])])
    kept, stats = kc.filter_items(items, kc.read_counts(str(counts)), 1, 6)
    assert [it["id"] for it in kept] == [it["id"] for i, it in enumerate(items[:36]) if 1 <= i % 9 <= 6]
    assert stats == {"kept": 24, "too easy": 8, "too hard": 4, "no count": 4}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "n": 8, "k": 9}\n')
    with pytest.raises(kc.DataError, match=r"bad\.jsonl: record 0: need 0 <= k <= n"):
        kc.read_counts(str(bad))
    # the authors' filter context: documents joined by "\n", no "Passage" headers
    assert kc.filter_prompt(items[0]) == kc.FILTER_PROMPT.format(context="\n".join(items[0]["docs"]),
                                                                 question=items[0]["question"])
    assert "Passage" not in kc.filter_prompt(items[0]).split("\n\nAnswer the question")[0]


def test_cli_synth_jsonl_and_parquet(raw, tiny_tok, tmp_path):
    tiny_tok.save_pretrained(str(tmp_path / "tok"))
    for ext in ("jsonl", "parquet"):
        out = tmp_path / f"rows.{ext}"
        r = subprocess.run([sys.executable, "keychain.py", "synth", f"--input={raw['2wiki']}", "--kind=qa", "--n=3",
                            "--max_tokens=4096", f"--out={out}", f"--tokenizer={tmp_path / 'tok'}"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rows = kc.read_rows(out)
        assert len(rows) == 3 and {k for k in ("id", "source", "kind", "messages", "answers", "num_tokens")} <= rows[0].keys()
        assert "wrote 3 of 3 requested rows" in r.stdout and "2wiki" in r.stdout
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
    h = subprocess.run([sys.executable, "keychain.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--max_tokens=16384" in h.stdout
    lines = h.stdout.splitlines()  # a group header, then its first option with the reason from the dataclass
    i = lines.index(" chains")
    assert lines[i + 1].split()[0] == "--chains=0" and "one per 1,024 tokens of L" in lines[i + 1]
    assert set(kc.option_comments(kc.Config)) == {f.name for f in dataclasses.fields(kc.Config)}
    bad = subprocess.run([sys.executable, "keychain.py", "synth", "--nope=1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option --nope" in bad.stderr


def test_failed_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "rows.jsonl"
    kc.write_rows(out, [{"a": 1}])
    with pytest.raises(TypeError):
        kc.write_rows(out, [{"a": 2}, {"b": object()}])
    assert kc.read_rows(out) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_generate_covers_hops_and_question_types(raw):
    recs = [json.loads(x) for x in Path(raw["musique"]).read_text().splitlines()]
    assert {len(r["question_decomposition"]) for r in recs} >= {2, 3, 4}
    hp = json.loads(Path(raw["hotpotqa"]).read_text())
    assert {r["type"] for r in hp} == {"bridge", "comparison"}
    for r in hp:
        titles = [t for t, _ in r["context"]]
        assert len(titles) == 10 and all(t in titles for t, _ in r["supporting_facts"])


# ----------------------------------------------------------------------------- released layout (issue 12)
def test_defaults_reproduce_the_released_layout(raw, tiny_tok):
    d = kc.Config()
    assert (d.budget, d.chains, d.hops, d.key_style, d.instruction, d.needles, d.max_tokens) == \
        ("docs", 0, 4, "uuid", "code", 20, 16384)
    rows, stats = kc.synth(kc.Config(input=raw["2wiki"], n=2), tiny_tok)
    assert len(rows) == 2, stats
    for r in rows:
        user = r["messages"][1]["content"]
        plain, pairs = kc.parse_pairs(user)
        assert r["chains"] == 16 and len(pairs) == 64 and r["budget"] == "docs"
        assert all(len(k) == 36 and uuid.UUID(k).version == 4 for k, _, _ in pairs)
        # the authors' code wording, exactly: no backticks, no quotes, no closing sentence
        ctx = user[len("Please read the following text.\n"):user.rindex("\n\nIn the context above")]
        assert user == kc.KEYCHAIN_PROMPT.format(context=ctx, start_key=r["start_key"]) and "`" not in user[-300:]
        assert user.endswith(f"(e.g., f81d4fae-7dec-11d0-a765-00a0c91e6bf6), starting from {r['start_key']}.")
        # documents fill L; the 64 pairs come on top of it
        no_pairs = kc.prompt_tokens(tiny_tok, user.replace(ctx, kc.parse_pairs(ctx)[0]))
        assert 0.98 * 16384 <= no_pairs <= 16384 < r["num_tokens"] and r["max_tokens"] == 16384
        assert kc.verify_row(r, tiny_tok) == []


def test_poster_wording_and_total_budget_are_options(raw, tiny_tok):
    rows, _ = kc.synth(cfg(input=raw["hotpotqa"], n=3, instruction="poster", budget="total"), tiny_tok)
    for r in rows:
        user = r["messages"][1]["content"]
        assert user.endswith(f'starting from `"{r["start_key"]}"`.\nFind the correct question first, then answer it.')
        assert r["num_tokens"] <= 8192 and kc.verify_row(r, tiny_tok) == []
        assert kc.start_key(user) == r["start_key"]
    docs, _ = kc.synth(cfg(input=raw["hotpotqa"], n=3), tiny_tok)
    assert all(d["num_tokens"] > 8192 > t["num_tokens"] for d, t in zip(docs, rows))  # chains on top vs inside


def test_ruler_defaults_match_the_20key_20value_files(tiny_tok):
    rows, _ = kc.synth(kc.Config(kind="ruler", n=4, max_tokens=4096), tiny_tok)
    assert [r["mode"] for r in rows] == ["multikey", "multivalue"] * 2
    for r in rows:
        needles = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.", r["messages"][1]["content"])
        assert len(needles) == 20
        assert len({k for k, _ in needles}) == (20 if r["mode"] == "multikey" else 1)
        assert len(r["answers"]) == (1 if r["mode"] == "multikey" else 20)


def test_ruler_too_short_for_its_needles_is_skipped_not_a_crash(tiny_tok):
    rows, stats = kc.synth(kc.Config(kind="ruler", n=3, max_tokens=2048), tiny_tok)  # 20 needles fill 2K bytes
    assert rows == [] and stats["skip: haystack budget too small"] == 3
    assert len(kc.synth(kc.Config(kind="ruler", n=3, max_tokens=2048, needles=4), tiny_tok)[0]) == 3


RELEASED_SOURCES = ["hotpotqa_keychain", "musique", "book_20key_10k_512", "book_20value_10k_512", "needle_sentence",
                    "math_dapo", "mathqa"]


def released_parquet(path, kc_row, tiny_tok):
    """A small parquet in the exact schema of OldKingMeister/LoongRL-Train-Data (verl rows + the extra columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kc_user = kc_row["messages"][1]["content"]
    users = {"hotpotqa_keychain": kc_user,
             "musique": "The following are given passages.\nPassage 1:\nX\nX is in Y.\n\nQuestion: Where is X?",
             "book_20key_10k_512": "Some special magic numbers are hidden ... for amber-river mentioned in the provided text?",
             "book_20value_10k_512": "Some special magic numbers are hidden ... for opal-quill mentioned in the provided text?",
             "needle_sentence": "A special sentence is hidden in the text below. ... What is the special sentence?",
             "math_dapo": "What is 2+3?", "mathqa": "Question: 1+1\nChoices:(A) 2\n(B) 3"}
    golds = {"hotpotqa_keychain": kc_row["answers"], "musique": ["Y"], "book_20key_10k_512": ["1234567"],
             "book_20value_10k_512": ["1", "2"], "needle_sentence": ["The sky is green."], "math_dapo": ["5"],
             "mathqa": ["A"]}
    recs = []
    for i, ds in enumerate(RELEASED_SOURCES):
        recs.append({"data_source": ds, "prompt": [{"role": "user", "content": users[ds]}], "ability": "long_context",
                     "reward_model": {"style": "rule", "ground_truth": golds[ds]},
                     "extra_info": {"index": i, "input_question": kc_row["question"] if i == 0 else "", "split": "train"},
                     "index": i, "input": users[ds][-40:], "context": "", "length": len(users[ds]),
                     "distract_questions": kc_row["distractor_questions"] if i == 0 else []})
    pq.write_table(pa.Table.from_pylist(recs), path)
    return recs


def test_released_parquet_loads_every_row(tmp_path, raw, tiny_tok):
    kc_row = kc.synth(cfg(input=raw["hotpotqa"], n=1, max_tokens=4096), tiny_tok)[0][0]
    p = tmp_path / "train.parquet"
    released_parquet(p, kc_row, tiny_tok)
    rows = kc.load_rows(str(p))
    assert [r["kind"] for r in rows] == ["keychain", "qa", "ruler", "ruler", "ruler", "math", "choice"]
    k = rows[0]
    assert k["question"] == kc_row["question"] and k["start_key"] == kc_row["start_key"]
    assert k["answers"] == kc_row["answers"] and rows[3]["answers"] == ["1", "2"]
    # kept whole: the KeyChain row is over a 2K budget, still loaded (only --cut_tasks drops it)
    got, stats = kc.synth(kc.Config(input=str(p), max_tokens=2048), tiny_tok)
    assert len(got) == 7 and got[0]["num_tokens"] > 2048 and stats == {"requested": 7}
    assert kc.verify_row(got[0], tiny_tok) == []  # verify reads the authors' wording and the mapped fields
    cut, stats = kc.synth(kc.Config(input=str(p), max_tokens=2048, cut_tasks=True), tiny_tok)
    assert len(cut) == 6 and stats["skip: over budget"] == 1


# the data_source values the authors' preprocess scripts write (prefix + the input file's stem), with their kinds
AUTHORS_NAMES = [
    ("custom_longcontext_needle_qa_2wikimqa_qwen_filtered-num_sample_39679-max_seq_16384-distractor", "keychain", "2wiki"),
    ("custom_longcontext_needle_qa_hotpotqa_qwen_filtered-num_sample_24287-max_seq_16384-distractor", "keychain", "hotpotqa"),
    ("custom_longcontext_needle_qa_musique_qwen_filtered-num_sample_8517-max_seq_16384-distractor", "keychain", "musique"),
    ("custom_longcontextqa_hotpotqa", "qa", "hotpotqa"),
    ("custom_longcontextqa_musique", "qa", "musique"),
    ("custom_longcontextqa_2wikimqa", "qa", "2wiki"),
    ("custom_rulerniah_book_20key_10k_512", "ruler", "book_20key_10k_512"),
    ("custom_sentence_needle_book_16k", "ruler", "book_16k"),
    ("custom_mathqa_choice_train", "choice", "train"),
]


def test_released_rows_with_the_authors_data_source_names(tmp_path, raw, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import reward

    kc_row = kc.synth(kc.Config(input=raw["2wiki"], n=1, max_tokens=4096), tiny_tok)[0][0]
    code = kc_row["messages"][1]["content"]  # "Please read the following text.\nPassage 1:..." + the instruction
    assert code.startswith("Please read the following text.\nPassage 1:\n")
    users = [code,
             code + "\nFind the correct question first, then answer it.",  # their "_1line" wording
             # an instruction the text check misses: the name alone decides (it contains "needle")
             code.replace("consecutive chain of key:value pairs", "chain of pairs"),
             "The following are given passages.\nPassage 1:\nX\nX is in Y.\n\nQuestion: Where is X?",
             "The following are given passages.\nPassage 1:\nX\nX is in Y.\n\nQuestion: Where is X?",
             "The following are given passages.\nPassage 1:\nX\nX is in Y.\n\nQuestion: Where is X?",
             "Some special magic numbers are hidden ... for amber-river mentioned in the provided text?",
             "A special sentence is hidden in the text below. ... What is the special sentence?",
             "Question: 1+1\nChoices:(A) 2\n(B) 3"]
    golds = [kc_row["answers"]] * 3 + [["Y"]] * 3 + [["1234567"], ["The sky is green."], ["A"]]
    recs = [{"data_source": ds, "prompt": [{"role": "user", "content": u}],
             "ability": "longcontext_qa" if kind == "keychain" else "long_context",
             "reward_model": {"style": "rule", "ground_truth": g},
             "extra_info": {"index": 0, "split": "train",
                            **({"input_question": kc_row["question"]} if kind == "keychain" else {})}}
            for (ds, kind, _), u, g in zip(AUTHORS_NAMES, users, golds)]
    path, back = tmp_path / "train.parquet", tmp_path / "reversed.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    pq.write_table(pa.Table.from_pylist(recs[::-1]), back)
    rows = kc.load_rows(str(path))
    assert [r["kind"] for r in rows] == [kind for _, kind, _ in AUTHORS_NAMES]
    assert [r["source"] for r in rows] == [src for _, _, src in AUTHORS_NAMES]
    assert [(r["id"], r["kind"]) for r in kc.load_rows(str(back))] == [(r["id"], r["kind"]) for r in rows[::-1]]
    assert rows[0]["id"] == "2wiki-keychain-0" and rows[5]["id"] == "2wiki-qa-0"  # same index, distinct ids
    assert len({r["id"] for r in rows}) == len(rows) and not any(re.search(r"-r\d+$", r["id"]) for r in rows)
    for r in rows[:2]:  # both wordings: the real question and the start key found
        assert r["question"] == kc_row["question"] and r["start_key"] == kc_row["start_key"]
    assert kc.verify_row({**rows[0], "num_tokens": 0}, None) == []
    # scored as QA (the gold in the box), not as RULER needles
    gold = kc_row["answers"][0]
    texts = [f"<think> ... </think> \\boxed{{{gold}}}", "<think> ... </think> \\boxed{nobody}"]
    assert [x for x, _ in reward.score_batch([rows[2]] * 2, texts)] == [1.0, 0.0]
    assert kc.verl_kind("custom_longcontext_needle_qa_x", "anything") == "keychain"
    assert kc.verl_kind("needle_sentence", "no instruction") == "ruler"  # other names: the old rules


# ----------------------------------------------------------------------------- robustness (issue 12, point 5)
def test_synth_writing_nothing_fails_and_says_why(raw, tiny_tok, tmp_path):
    tiny_tok.save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, "keychain.py", "synth", f"--input={raw['hotpotqa']}", "--n=5", "--max_tokens=400",
                        f"--out={out}", f"--tokenizer={tmp_path / 'tok'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and not out.exists()
    assert "wrote 0 of 5 requested rows: core documents exceed the budget (40)" in r.stderr  # every item tried


def test_bad_file_prints_one_line_without_traceback(tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text(json.dumps([{"_id": "a", "answer": "x", "context": []}]))
    for inp in (bad, tmp_path / "missing.json"):
        r = subprocess.run([sys.executable, "keychain.py", "synth", f"--input={inp}", f"--out={tmp_path / 'o.jsonl'}",
                            "--kind=qa"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert str(inp.name) in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_source_contradicting_the_format_warns(raw, capsys):
    kc.load_items(raw["musique"], source="hotpotqa")
    assert "--source=hotpotqa but the records look like musique" in capsys.readouterr().err
    kc.load_items(raw["2wiki"], source="2wiki")  # the same shape as HotpotQA: no warning
    assert capsys.readouterr().err == ""


def test_stale_tmp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "rows.jsonl"
    stale, live = tmp_path / f".rows.jsonl.tmp{int(dead.stdout)}", tmp_path / f".rows.jsonl.tmp{os.getppid()}"
    stale.write_text("half")
    live.write_text("busy")
    kc.write_rows(out, [{"a": 1}])
    assert not stale.exists() and live.exists() and kc.read_rows(out) == [{"a": 1}]


def test_distractors_normalized_once_per_pool(raw, tiny_tok, monkeypatch):
    calls = []
    real = kc.norm_q
    monkeypatch.setattr(kc, "norm_q", lambda q: calls.append(q) or real(q))
    items, _ = kc.load_items(raw["hotpotqa"])
    rows, _ = kc.synth(cfg(input=raw["hotpotqa"], n=20), tiny_tok)
    assert len(rows) == 20 and len(calls) == len({it["question"] for it in items})  # the pool's, once each


def test_fillers_skip_documents_of_items_with_the_same_question(tiny_tok):
    mk = lambda i, q, docs: {"id": str(i), "source": "s", "question": q, "answers": ["a"], "docs": docs}  # noqa: E731
    items = [mk(0, "Who founded Zed?", ["Zed\nZed was founded by Ann."]),
             mk(1, "who founded  zed", ["Zed Corp\nAnn founded Zed."])]  # the same question after normalization
    items += [mk(i, f"Question {i}?", [f"Doc {i}\nFiller text {i}."]) for i in range(2, 40)]
    pool = kc.Pool(tiny_tok, items)
    docs = kc.fill_context(items[0], pool, 100000, random.Random(0))
    assert "Zed Corp\nAnn founded Zed." not in docs and len(docs) == 39  # everything else fits
    row, _ = kc.build_row(items[0], "keychain", pool, kc.Budget(tiny_tok, pool, "uuid"), tiny_tok,
                          cfg(max_tokens=20000, chains=38))
    assert row is not None and "who founded  zed" not in row["distractor_questions"]


def test_keychain_imports_neither_rollout_nor_reward():
    r = subprocess.run([sys.executable, "-c", "import sys, keychain; print(sorted(m for m in ('rollout', 'reward', "
                        "'grpo', 'curriculum', 'torch') if m in sys.modules))"], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr
    src = (ROOT / "keychain.py").read_text()
    assert not re.search(r"^\s*(import|from) (rollout|reward|grpo|curriculum)\b", src, re.M)


def test_tiny_tokenizer_format_tokens_are_whole(tmp_path):
    plain = kc.make_tiny_tokenizer(tmp_path / "a")
    words = kc.make_tiny_tokenizer(tmp_path / "b", format_tokens=True)
    text = " </think>\\boxed{yes} <think>"
    assert len(plain(text, add_special_tokens=False)["input_ids"]) == len(text.encode())  # one token per byte
    ids = words(text, add_special_tokens=False)["input_ids"]
    assert [words.decode([i]) for i in ids] == [" ", "</think>", "\\boxed{", "y", "e", "s", "}", " ", "<think>"]
    assert words.decode(ids) == text and len(words) == len(plain) + 3
