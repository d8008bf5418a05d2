"""Benchmark KeyChain synthesis at full scale: N items from a large raw file at L=16384, items per second.

    python keychain.py generate --out_dir=data/bench-raw --n=90000          # a 90,000-item raw HotpotQA-format file
    python bench/bench_keychain.py --tokenizer=Qwen/Qwen2.5-7B-Instruct --raw=data/bench-raw/hotpotqa.json --n=2500

The time covers everything `keychain.py synth` does after reading the file: loading the items, tokenizing the
pool once, normalizing its questions once, building and exactly counting every row. The plain pass tokenizes
the finished prompts once, in the same batches: a ratio near 1 means synthesis costs little more than reading
its own output once (rows with chains on top are counted twice: with and without their pairs).
"""
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import keychain  # noqa: E402


@dataclasses.dataclass
class Config:
    tokenizer: str = "../shared/qwen2.5-tokenizer"
    raw: str = ""  # a raw QA file; empty = generate one with `pool` items
    pool: int = 90000  # items in the generated raw file (the size of HotpotQA's training set)
    n: int = 2500  # rows to synthesize (one source's share of the 7,500 KeyChain rows)
    max_tokens: int = 16384
    kind: str = "keychain"
    budget: str = "docs"
    key_style: str = "uuid"
    seed: int = 0


def main() -> None:
    b = keychain.parse_config(Config, sys.argv[1:], __doc__)
    tok = keychain.load_tokenizer(b.tokenizer)
    raw = b.raw or keychain.generate_raw(tempfile.mkdtemp(), n=b.pool, seed=b.seed)["hotpotqa"]
    cfg = keychain.Config(input=raw, kind=b.kind, max_tokens=b.max_tokens, key_style=b.key_style, seed=b.seed,
                          n=b.n, budget=b.budget)
    t0 = time.perf_counter()
    rows, stats = keychain.synth(cfg, tok)
    t_synth = time.perf_counter() - t0
    texts = [keychain.render_prompt(tok, r["messages"]) for r in rows]
    t0 = time.perf_counter()
    total = sum(sum(keychain.count_tokens(tok, texts[i:i + cfg.batch])) for i in range(0, len(texts), cfg.batch))
    t_plain = time.perf_counter() - t0
    print(keychain.summarize(rows, stats))
    print(f"{len(rows)} of {b.n} {b.kind} rows from {Path(raw).name} at L={b.max_tokens} (budget={b.budget}; "
          f"{total / len(rows):.0f} tokens each, max {max(r['num_tokens'] for r in rows)}) in {t_synth:.1f} s: "
          f"{len(rows) / t_synth:.1f} items/s; plain tokenizer pass {t_plain:.1f} s; ratio {t_synth / t_plain:.2f}")


if __name__ == "__main__":
    main()
