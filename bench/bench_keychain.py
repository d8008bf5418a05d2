"""Benchmark KeyChain synthesis: items per second at L=16384, and synthesis time over one plain tokenizer pass.

    python bench/bench_keychain.py --tokenizer=../shared/qwen2.5-tokenizer --n=1000

The plain pass tokenizes the finished prompts once, in the same batches; a ratio near 1 means synthesis costs
little more than reading its own output once.
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
    n: int = 1000
    max_tokens: int = 16384
    kind: str = "keychain"
    key_style: str = "uuid"
    seed: int = 0


def main() -> None:
    b = keychain.parse_config(Config, sys.argv[1:], __doc__)
    tok = keychain.load_tokenizer(b.tokenizer)
    raw = keychain.generate_raw(tempfile.mkdtemp(), n=b.n, seed=b.seed)
    cfg = keychain.Config(input=raw["hotpotqa"], kind=b.kind, max_tokens=b.max_tokens, key_style=b.key_style, seed=b.seed)
    t0 = time.perf_counter()
    rows, stats = keychain.synth(cfg, tok)
    t_synth = time.perf_counter() - t0
    texts = [keychain.render_prompt(tok, r["messages"]) for r in rows]
    t0 = time.perf_counter()
    total = sum(sum(keychain.count_tokens(tok, texts[i:i + cfg.batch])) for i in range(0, len(texts), cfg.batch))
    t_plain = time.perf_counter() - t0
    print(keychain.summarize(rows, stats))
    print(f"{len(rows)} {b.kind} rows at L={b.max_tokens} ({total / len(rows):.0f} tokens each) in {t_synth:.1f} s: "
          f"{len(rows) / t_synth:.1f} items/s; plain tokenizer pass {t_plain:.1f} s; ratio {t_synth / t_plain:.2f}")


if __name__ == "__main__":
    main()
