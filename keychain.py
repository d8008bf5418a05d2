"""KeyChain data synthesis: short multi-hop QA -> long-context RL rows (LOONGRL.md sections 2-3).

    python keychain.py generate --out_dir=data/raw --n=200          # procedural raw QA, no downloads
    python keychain.py synth --input=data/raw/hotpotqa.json --kind=keychain --tokenizer=... --out=kc.jsonl
    python keychain.py verify --input=kc.jsonl --tokenizer=...
    python keychain.py filter --input=data/raw/hotpotqa.json --counts=counts.jsonl --out=kept.jsonl

Pipeline: load raw items -> (difficulty filter) -> fill a context to exactly <= max_tokens with the
item's own documents plus random fillers from the dataset's deduplicated pool -> insert KeyChain
UUID chains (kind=keychain) or not (kind=qa) -> one chat row per item. RULER needles and math rows
come out of the same `synth` command with kind=ruler / math / choice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

# ----------------------------------------------------------------------------- prompts (LOONGRL.md 2)
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "\\boxed{} tags, respectively, i.e., <think> reasoning process here </think> \\boxed{answer here}."
)
PREFILL = "<think>"  # the assistant turn is prefilled with this (authors' chat template)
KEYCHAIN_PROMPT = (
    "Please read the following text.\n{context}\n\nIn the context above, there is one correct question to "
    "answer. The correct question can only be found by following the correct consecutive chain of key:value "
    "pairs encoded with UUID strings (e.g., `f81d4fae-7dec-11d0-a765-00a0c91e6bf6`), starting from "
    "`\"{start_key}\"`.\nFind the correct question first, then answer it."
)
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
KINDS = ("keychain", "qa", "ruler", "math", "choice")


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    command: str = "synth"  # generate | synth | verify | filter | demo
    input: str = ""  # raw file(s), comma separated (synth/filter/verify)
    out: str = ""  # output .jsonl or .parquet (synth/filter)
    out_dir: str = "data/raw"  # generate / demo
    kind: str = "keychain"  # keychain | qa | ruler | math | choice
    format: str = "auto"  # auto | hotpotqa | 2wiki | musique | longbench | verl | dapo | mathqa | items
    source: str = ""  # dataset name; guessed from the file name when empty
    tokenizer: str = ""  # path or hub id; empty = build the tiny byte tokenizer
    max_tokens: int = 16384  # L: the whole prompt (system, instruction, chains, chat template) fits in it
    n: int = 0  # rows to write (0 = one per input item; ruler: 0 = 64)
    seed: int = 0
    placement: str = "shuffle"  # shuffle | middle (core documents near the middle, truncated Gaussian)
    chains_per_1k: float = 4.0  # 64 chains at 16K (4 per 1,024 tokens)
    hops: int = 4  # keys per chain -> pairs per chain: key1->key2 ... key4->question
    key_style: str = "uuid"  # uuid (36 chars, poster) | short (8 hex, authors' final code)
    needles: int = 4  # ruler: needles with distinct keys (multi-key) or values (multi-value)
    ruler_mode: str = "mix"  # multikey | multivalue | mix
    haystack: str = ""  # ruler: a plain text file (a book); empty = built-in synthetic haystack
    counts: str = ""  # filter: JSONL of {"id", "n", "k"} pass counts
    lo: int = 1  # filter: keep items with lo <= k <= hi (paper: 1..6 of 8)
    hi: int = 6
    batch: int = 64  # rows tokenized together in the exact final pass


def parse_config(cls: type, argv: list[str], doc: str = "") -> Any:
    """Build a config dataclass from `[command] --key=value ...`; `--help` lists every key and default."""
    cfg, fields = cls(), {f.name: f for f in dataclasses.fields(cls)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc.strip() + "\n\noptions (--key=value):")
            for f in dataclasses.fields(cls):
                print(f"  --{f.name}={getattr(cfg, f.name)!r}")
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
            setattr(cfg, key, val.lower() in ("1", "true", "yes", "") if eq else True)
        elif isinstance(cur, (int, float)) and not isinstance(cur, bool):
            try:
                setattr(cfg, key, type(cur)(val))
            except ValueError:
                raise SystemExit(f"--{key} expects {type(cur).__name__}, got {val!r}") from None
        else:
            setattr(cfg, key, val)
    return cfg


# ----------------------------------------------------------------------------- small io helpers
class DataError(ValueError):
    """A malformed input record; the message names the file and the record."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through `write(tmp_path)` and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


# ----------------------------------------------------------------------------- tokenizer
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(out_dir: str | os.PathLike):
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built on the spot: no hub, no training.

    One token per UTF-8 byte keeps token counts predictable in tests and the `tiny` preset.
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
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(name: str, tmp_dir: str = "data/tiny-tokenizer"):
    """A Hugging Face tokenizer from a path or hub id; empty name -> the tiny byte tokenizer."""
    from transformers import AutoTokenizer

    if not name:
        if not (Path(tmp_dir) / "tokenizer.json").exists():
            make_tiny_tokenizer(tmp_dir)
        name = tmp_dir
    return AutoTokenizer.from_pretrained(name)


def render_prompt(tok, messages: list[dict]) -> str:
    """The exact text the policy sees: chat template with generation prompt, then the `<think>` prefill."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + PREFILL


def chat(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
