"""Reward throughput: responses scored per second; scoring must never bottleneck a training step.

    .venv/bin/python bench/bench_reward.py                 # 10,000 QA responses of ~1,500 tokens
    .venv/bin/python bench/bench_reward.py --n=2000 --math=200 --grouped=800

One GPU generating ~1,500-token responses produces on the order of 100 per second (vLLM, 7B), so the
bar is 20x that: 2,000 responses per second. Responses are synthetic and deterministic (seed): ~6,000
characters of reasoning, then an answer in the mix of forms a policy produces (boxed after </think>,
"the answer is", several boxes, long lists, cut at the length limit without an answer: the slowest path, a
full scan). The grouped part scores training-like rows: a ~16K-token prompt of passages from the generated
world (keychain.generate_raw), G responses per prompt in a row as GRPO sends them, with answers that make
the reward read the passages (a part of the gold, the gold beside another name, a descriptor).
"""
from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keychain import generate_raw, parse_config  # noqa: E402
import reward  # noqa: E402


@dataclass
class Config:
    n: int = 10_000  # QA responses
    chars: int = 6_000  # reasoning characters per response (~1,500 tokens at ~4 characters a token)
    math: int = 0  # also time this many math responses (math-verify), inline and through the pool
    workers: int = 0  # pool size for the comparisons; 0 = min(cpu count, 8)
    seed: int = 0
    target: float = 2_000.0  # responses per second required
    grouped: int = 4_000  # responses to rows with passages (0 = skip), G per prompt
    group: int = 8  # G: responses per prompt (the paper's group size)
    context_chars: int = 60_000  # passage characters per prompt (~16K tokens at ~4 characters a token)


def make_qa(n: int, chars: int, seed: int) -> tuple[list[dict], list[str], list[str]]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    vocab += ["the", "a", "passage", "key", "question", "so", "therefore", "answer", "Paris", "1987"]
    rows, responses, finish = [], [], []
    for i in range(n):
        gold = " ".join(rng.choices(vocab[:3000], k=rng.randint(1, 3))).title()
        words, size = [], 0
        while size < chars:
            w = rng.choice(vocab)
            words.append(w + ("." if rng.random() < 0.08 else ""))
            size += len(w) + 1
        think = "<think>" + " ".join(words)
        form = rng.random()
        if form < 0.60:
            tail = f"</think>\n\nThe answer is \\boxed{{{gold if rng.random() < 0.6 else rng.choice(vocab)}}}."
        elif form < 0.70:
            tail = f"</think>\n\nSo the answer is {gold}."
        elif form < 0.80:
            tail = f"</think>\n\\boxed{{{rng.choice(vocab)}}} or maybe \\boxed{{{gold}}}"
        elif form < 0.90:
            tail = "</think>\n\\boxed{" + ", ".join(rng.choices(vocab, k=40)) + f", {gold}}}"
        else:
            tail = ""  # truncated mid-thought
        rows.append({"id": f"bench-{i}", "source": "hotpotqa", "kind": "keychain" if i % 2 else "qa",
                     "answers": [gold], "messages": []})
        responses.append(think + tail)
        finish.append("stop" if tail else "length")
    return rows, responses, finish


def make_grouped(n: int, group: int, context_chars: int, chars: int, seed: int) -> tuple[list[dict], list[str]]:
    """Rows with a long prompt of passages (the generated world, as keychain.py writes QA rows), G answers each."""
    import json
    import tempfile

    from keychain import QA_PROMPT, chat, doc_text, passages

    rng = random.Random(seed + 2)
    with tempfile.TemporaryDirectory() as tmp:
        items = json.load(open(generate_raw(tmp, n=400, seed=seed)["hotpotqa"]))
    docs = {t: doc_text(t, "".join(ss)) for it in items for t, ss in it["context"]}
    titles = sorted(docs)
    rows, responses = [], []
    filler = "let me check the passages again. " * (chars // 33)
    for i in range(-(-n // group)):
        it = items[i % len(items)]
        own = [t for t, _ in it["context"]]
        picked, size = list(own), sum(len(docs[t]) for t in own)
        while size < context_chars:
            t = rng.choice(titles)
            picked.append(t)
            size += len(docs[t])
        rng.shuffle(picked)
        row = {"id": f"grouped-{i}", "source": "hotpotqa", "kind": "keychain" if i % 2 else "qa",
               "answers": [it["answer"]],
               "messages": chat(QA_PROMPT.format(context=passages([docs[t] for t in picked]), question=it["question"]))}
        gold, other = it["answer"], rng.choice(titles)
        words = gold.split()
        forms = [gold, words[-1], words[0], f"{gold} in {other}", f"the {gold}", other, f"{other} {gold}",
                 f"{gold}, {other}"]
        for _ in range(group):
            rows.append(row)
            responses.append("<think>" + filler + f"</think>\n\\boxed{{{rng.choice(forms)}}}")
    return rows[:n], responses[:n]


def make_math(n: int, chars: int, seed: int) -> tuple[list[dict], list[str]]:
    rng = random.Random(seed + 1)
    rows, responses = [], []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        gold = f"\\frac{{{a}}}{{{b}}}"
        pred = rng.choice([gold, f"{a / b:.6f}", f"\\frac{{{a + 1}}}{{{b}}}", f"{a}/{b}", f"x = {a + b}"])
        rows.append({"id": f"math-{i}", "source": "math_dapo", "kind": "math", "answers": [gold]})
        responses.append("<think>" + "let me compute. " * (chars // 16) + f"</think>\n\\boxed{{{pred}}}")
    return rows, responses


def rate(fn, n: int) -> tuple[float, list]:
    t = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - t), out


def main() -> None:
    cfg = parse_config(Config, sys.argv[1:], __doc__)
    workers = cfg.workers or min(os.cpu_count() or 1, 8)
    t = time.perf_counter()
    rows, responses, finish = make_qa(cfg.n, cfg.chars, cfg.seed)
    mean_chars = sum(map(len, responses)) / len(responses)
    print(f"made {cfg.n} QA responses, {mean_chars:.0f} characters each on average, in {time.perf_counter() - t:.1f}s;"
          f" {os.cpu_count()} cpus")

    r_loop, a = rate(lambda: [reward.score(r, s, None, f) for r, s, f in zip(rows, responses, finish)], cfg.n)
    r_batch, b = rate(lambda: reward.score_batch(rows, responses, finish=finish), cfg.n)
    assert a == b, "score_batch disagrees with score"
    pool = reward._get_pool(workers, reward.DEFAULT.start_method)  # what a pool would do for QA too
    list(pool.map(reward._score_chunk, [rows[:1]] * workers, [responses[:1]] * workers, [reward.DEFAULT] * workers,
                  [finish[:1]] * workers))

    def pooled():
        size = -(-cfg.n // (4 * workers))
        chunks = [(rows[s:s + size], responses[s:s + size]) for s in range(0, cfg.n, size)]
        fins = [finish[s:s + size] for s in range(0, cfg.n, size)]
        done = pool.map(reward._score_chunk, *zip(*chunks), [reward.DEFAULT] * len(chunks), fins)
        return [x for c in done for x in c]

    r_pool, c = rate(pooled, cfg.n)
    assert c == a
    mean = sum(x for x, _ in a) / cfg.n
    print(f"QA inline score() loop        : {r_loop:10,.0f} responses/s")
    print(f"QA score_batch (default)      : {r_batch:10,.0f} responses/s   mean reward {mean:.3f}")
    print(f"QA through a {workers}-process pool   : {r_pool:10,.0f} responses/s   (not used for QA: shipping costs "
          "more)")
    ok = r_batch >= cfg.target
    print(f"{'PASS' if ok else 'FAIL'}: {r_batch:,.0f}/s is {r_batch / cfg.target:.1f}x the {cfg.target:,.0f}/s bar "
          "(20x one GPU generating)")

    if cfg.grouped:
        grows, gresp = make_grouped(cfg.grouped, cfg.group, cfg.context_chars, cfg.chars, cfg.seed)
        prompt = sum(len(m["content"]) for m in grows[0]["messages"])
        r_g, g = rate(lambda: reward.score_batch(grows, gresp), len(grows))
        rules = Counter(d["rule"] for _, d in g)
        print(f"QA with passages, G={cfg.group}         : {r_g:10,.0f} responses/s   mean reward "
              f"{sum(x for x, _ in g) / len(g):.3f}   ({prompt:,} prompt characters; {dict(rules.most_common(6))})")
        ok_g = r_g >= cfg.target
        print(f"{'PASS' if ok_g else 'FAIL'}: {r_g:,.0f}/s with passages is {r_g / cfg.target:.1f}x the bar")
        ok = ok and ok_g

    if cfg.math:
        mrows, mresp = make_math(cfg.math, cfg.chars, cfg.seed)
        reward._mv_parse.cache_clear()
        r_mi, x = rate(lambda: [reward.score(r, s) for r, s in zip(mrows, mresp)], cfg.math)
        r_mp, y = rate(lambda: reward.score_batch(mrows, mresp, workers=workers), cfg.math)
        assert x == y
        mean_m = sum(v for v, _ in x) / cfg.math
        print(f"math inline (math-verify)     : {r_mi:10,.0f} responses/s   mean reward {mean_m:.3f}")
        print(f"math score_batch ({workers} workers)  : {r_mp:10,.0f} responses/s   (cold pool parse caches)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
