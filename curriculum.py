"""The multi-stage curriculum (LoongRL, arXiv 2510.19363: data mixture, multi-stage RL):
warmup -> Stage I -> hard mining -> Stage II.

    python curriculum.py check   --preset=7b --run_dir=runs/7b --model=Qwen/Qwen2.5-7B-Instruct --gpus=8
    python curriculum.py check --preflight ...   # + tokenizer, weights, GPU memory, disk, vLLM, flash-attn, a table
    torchrun ... curriculum.py cluster --run_dir=runs/7b --gpus=8   # all-reduce over every rank; RUN_DIR shared?
    torchrun ... curriculum.py filter --run_dir=runs/7b --filter_model=Qwen/Qwen2.5-32B-Instruct ...  # pass counts
    python curriculum.py prepare --preset=tiny --run_dir=runs/tiny          # build (or reuse) every stage's data
    python curriculum.py prepare --preset=7b --released=LoongRL-Train-Data  # the authors' rows, no synthesis
    torchrun ... curriculum.py mine --run_dir=runs/tiny --model=runs/tiny/stage1/hf   # sample G times, drop G/G
    python curriculum.py heldout --run_dir=runs/tiny --model=runs/tiny/format/hf   # unseen items: before vs Stage II
    python curriculum.py summary --run_dir=runs/tiny

train.sh runs these around grpo.py. A run directory shows what happened:
    data/      raw/ (tiny: generated), one file per part, warmup.jsonl, stage1.jsonl, stage2.jsonl, manifest.json,
               filter/ (counts.rank*.jsonl as sampled, counts.jsonl, the kept items per source)
    warmup/ stage1/ stage2/   grpo.py out_dirs: ckpt/, hf/ (written last: the stage is done), log.jsonl,
                              rollouts/, mining.jsonl (every item's rewards during training)
    mining/    counts.jsonl (id, n, k per Stage I item), report.json
    eval/      eval.py output (preds, scores.json, results.md);  summary.md   the whole run in one page
    heldout/   (tiny) scores.json: the same unseen items, greedy, with the model entering warmup and Stage II's

What the tiny demo can learn, and how summary.md tells. A 2-layer, 64-wide random model cannot retrieve a fact
from 2,048 tokens in a few minutes on a CPU. What GRPO does teach it there is the answer's form: the format warm-up
stops while the format is still shaky (--format_loss), and the RL stages raise the share of replies that close
</think>, write one box and put in it an answer of the question's type (yes or no; a letter for multiple choice).
The yes/no questions are a coin flip (two countries), so a policy that learns to answer them cleanly earns about
0.5 on them whichever side it says; saying one side always earns no more than that on balanced items. grpo.py's
log has the numbers to tell these apart per step (format, yes_no/says_yes, yes_no/says_no, yes_no/right, kind/*),
hard mining reports how many gold-yes and gold-no items it kept (yes_no_kept), and summary.md puts the first and
last 3 steps of Stage I+II side by side and the held-out before/after with a sentence saying what was learned.
Measured (SEED=0,1,2; last 3 minus first 3 steps of Stage I+II): +0.156, +0.286, +0.229 with --format_loss=0.4
(at 0.5: +0.109, +0.115, +0.047). What limits the rise: the yes/no answers become one-sided (the policy says "no",
or "yes", to nearly every question: GRPO's updates on a choice the model cannot tie to its context drift to one
side), which earns no more than about 0.5 on them; hard mining then keeps more items of the side the policy does
not say, so Stage II starts lower than Stage I ended; 8 prompts a step make the per-step reward noisy (+-0.1); and
the policy can collapse for a while (seed 2's Stage II: 13 steps at reward 0, "</think>" repeated to the token
limit, before it recovered in its last 3 steps), so a seed's number is one draw, not a guarantee.
The greedy reply of the Stage II model can loop on "</think>" while its samples at T=1 close the box, so the
held-out table shows both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import keychain

# The training mixture (paper section 3), the one place to change sizes: rows per part at scale 1.
MIX = {"keychain": 7500, "qa": 7500, "ruler": 1024, "math": 5000}
QA_SOURCES = ("hotpotqa", "2wiki", "musique")  # KeyChain and plain QA rows split evenly over these
MATH_SOURCES = ("dapo", "mathqa")  # math rows split evenly: DAPO-Math-17k and MathQA multiple choice
STAGES = {"warmup": ("qa", "ruler", "math"),  # no KeyChain yet
          "stage1": ("keychain", "qa", "ruler", "math")}  # stage2 = Stage I items not solved G/G


@dataclass
class Config:
    # -- run
    command: str = "prepare"  # check | filter | prepare | format | mine | heldout | summary
    preset: str = "tiny"  # train.sh's preset: tiny and gpu1 generate their own raw data
    run_dir: str = ""  # the run directory every stage writes under (default runs/<preset>)
    tokenizer: str = ""  # the policy's tokenizer (empty: the tiny byte tokenizer)
    model: str = ""  # check: the model to validate; mine: the Stage I checkpoint
    seed: int = 0  # data synthesis, the stage shuffles and the mining samples
    # -- data: the mixture of paper section 3 (MIX above), synthesized by keychain.py
    scale: float = 1.0  # multiplies every MIX size (tiny: 0.002)
    max_tokens: int = 16384  # L: the documents of a KeyChain / QA / RULER row (paper: 16K)
    key_style: str = "uuid"  # uuid (the released data) | short (8 hex: the tiny preset's short prompts)
    ruler_needles: int = 20  # needles per RULER row (the authors' 20); tiny: 8, so that a row fits L=2048
    hotpotqa: str = ""  # raw files: train.sh fills them from HOTPOTQA, TWOWIKI, MUSIQUE, DAPO, MATHQA, HAYSTACK
    twowiki: str = ""  # 2WikiMultihopQA train json
    musique: str = ""  # MuSiQue-Ans train jsonl
    dapo: str = ""  # DAPO-Math-17k parquet
    mathqa: str = ""  # MathQA train json (multiple choice)
    haystack: str = ""  # a book for the RULER needles; empty = the synthetic haystack
    released: str = ""  # the authors' released set (a folder of verl parquet files, or one file): its rows, no synthesis
    released_cut: bool = False  # drop released rows over max_tokens (default: keep every row, as the authors trained)
    # -- difficulty filter (paper 2.2): G answers per raw QA item on its own short context, keep lo..hi correct
    filter_model: str = ""  # the strong model (paper: Qwen2.5-32B-Instruct); empty = no filter (tiny)
    filter_counts: str = ""  # an existing counts file (JSONL {id: "source/item id", n, k}) instead of sampling
    filter_group: int = 8  # answers per item (the authors' filter: 8)
    filter_temperature: float = 1.0  # sampling, not greedy: the count estimates how often the item is solved
    filter_new_tokens: int = 2048  # the filter prompt asks for step-by-step thinking before "The answer is"
    filter_lo: int = 1  # keep items solved lo..hi of G: neither trivial nor hopeless
    filter_hi: int = 6  # (paper: 1..6 of 8)
    filter_tp: int = 0  # tensor parallel for the filter model (0 = --tp)
    filter_max_prompt: int = 8192  # raw items' own contexts are short; longer ones get no count (filtered out)
    filter_items: int = 0  # raw items per source the filter samples, the first ones (0 = all; STEPS=N rehearsals)
    # -- hard mining (paper: Stage II trains on the Stage I items not solved every time)
    mine_mode: str = "sample"  # sample: G fresh samples per item | rollouts: Stage I's own rollouts
    group: int = 8  # G samples per item (the authors: 8); an item solved G/G is dropped
    temperature: float = 0.6  # the authors' hard mining samples at 0.6 (training: 1.0)
    max_new_tokens: int = 4096  # the authors: 4096, the training reply budget (a cut reply scores 0)
    engine: str = "auto"  # rollout engine for sampling (auto: vllm on GPU when installed)
    tp: int = 1  # vLLM tensor parallel size for the sampling model
    gpu_memory_utilization: float = 0.9  # vLLM's share of the GPU: no trainer beside it (filter and mining)
    enforce_eager: bool = False  # vLLM without CUDA graphs or torch.compile: faster start, slower decoding
    batch: int = 64  # prompts per generate call
    # -- held-out before/after (tiny): greedy, the training reward, items of a world the run never trains on
    heldout_items: int = 16  # yes/no questions (half gold yes, half no) per kind qa and keychain; MathQA: half as many
    # -- format warm-up: the tiny preset's random model, supervised, before the warmup stage
    format_steps: int = 100  # at most this many optimizer steps (8 sequences each, lr decayed linearly to 0)
    format_loss: float = 0.4  # stop once the mean loss of the last 10 steps is below this: the format is mostly
    # learned but still misspelled now and then at T=1, which leaves the RL stages something to learn (0 = never)
    format_lr: float = 6e-3  # high for a random 2-layer model: the format must be learned in seconds
    tiny_heads: int = 4  # attention heads of the 64-wide tiny model: 4 of 16; ENGINE=vllm: 2 of 32 (vLLM's CPU minimum)
    # -- check: before a run (train.sh), and the preflight (bash train.sh PRESET check)
    gpus: int = 0  # check: GPUs needed on this node (0 = CPU run)
    node_rank: int = 0  # check: nodes other than 0 need no raw files
    preflight: bool = False  # check: also tokenizer, weights, GPU memory, disk for the whole run, vLLM, flash-attn
    wait_s: int = 300  # cluster: how long the all-reduce waits for every rank of every node
    verdict: str = ""  # cluster: file each node's first process writes "ok" or the problems to (train.sh reads it)


# ----------------------------------------------------------------------------- data preparation
def raw_paths(cfg: Config, run: Path) -> dict[str, str]:
    """The raw files of each source; the tiny preset generates its own."""
    if cfg.preset in ("tiny", "gpu1"):
        raw = run / "data" / "raw"
        names = {"hotpotqa": "hotpotqa.json", "2wiki": "2wiki.json", "musique": "musique.jsonl",
                 "dapo": "dapo.jsonl", "mathqa": "mathqa.json"}
        if not all((raw / f).exists() for f in names.values()):
            keychain.generate_raw(str(raw), n=120, seed=cfg.seed, countries=2 if cfg.preset == "tiny" else 0)
        return {**{k: str(raw / f) for k, f in names.items()}, "haystack": ""}
    return {"hotpotqa": cfg.hotpotqa, "2wiki": cfg.twowiki, "musique": cfg.musique, "dapo": cfg.dapo,
            "mathqa": cfg.mathqa, "haystack": cfg.haystack}


def sizes(scale: float) -> dict[str, dict[str, int]]:
    """Rows per part and source: each part's total split as evenly as possible over its sources."""
    out = {}
    for part, n in MIX.items():
        total = max(1, round(n * scale))
        srcs = QA_SOURCES if part in ("keychain", "qa") else MATH_SOURCES if part == "math" else ("ruler",)
        out[part] = {s: total // len(srcs) + (i < total % len(srcs)) for i, s in enumerate(srcs)}
    return out


def released_files(path: str) -> list[Path]:
    """The released set's training parquet files (a folder holds train and maybe test splits: train only)."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.parquet") if not any(w in f.name.lower() for w in ("test", "val")))
    if not files:
        raise SystemExit(f"RELEASED={path}: no training .parquet files found")
    return files


def counts_path(cfg: Config, run: Path) -> Path:
    return Path(cfg.filter_counts) if cfg.filter_counts else run / "data" / "filter" / "counts.jsonl"


def manifest(cfg: Config, raw: dict[str, str], run: Path | None = None) -> dict:
    """Everything the built data depends on; equal manifests mean the data can be reused."""
    stamp = lambda p: [str(p), os.path.getsize(p), int(os.path.getmtime(p))]  # noqa: E731
    if cfg.released:
        files = {"released": [stamp(f) for f in released_files(cfg.released)]}
    else:
        files = {k: stamp(p) if p else None for k, p in raw.items()}
        if (cfg.filter_model or cfg.filter_counts) and run is not None:
            files["filter_counts"] = stamp(counts_path(cfg, run))
    keys = ("preset", "tokenizer", "scale", "max_tokens", "key_style", "ruler_needles", "seed", "released", "released_cut",
            "filter_model", "filter_lo", "filter_hi")
    code = Path(keychain.__file__).read_bytes() + Path(__file__).read_bytes()
    return {"settings": {k: getattr(cfg, k) for k in keys}, "mix": sizes(cfg.scale), "raw": files,
            "code": hashlib.sha256(code).hexdigest()[:16]}


def kept_inputs(run: Path, raw: dict[str, str], keep) -> dict[str, str]:
    """The raw files with each QA source replaced by the items `keep(src, items) -> (kept, message)` keeps,
    written to run/data/filter/<src>.jsonl (synthesis reads them like any items file)."""
    out = dict(raw)
    for src in QA_SOURCES:
        items, _ = keychain.load_items(raw[src], source=src)
        kept, message = keep(src, items)
        print(message)
        out[src] = str(run / "data" / "filter" / f"{src}.jsonl")
        keychain.write_rows(out[src], kept)
    return out


def filtered_inputs(cfg: Config, run: Path, raw: dict[str, str]) -> dict[str, str]:
    """The QA sources' items kept by the difficulty filter (lo..hi of G correct)."""
    path = counts_path(cfg, run)
    if not path.exists():
        raise SystemExit(f"no pass counts at {path}: run `curriculum.py filter` first (train.sh does) or set FILTER_COUNTS")
    counts = keychain.read_counts(str(path))

    def keep(src: str, items: list[dict]) -> tuple[list[dict], str]:
        mine = {i.split("/", 1)[1]: c for i, c in counts.items() if i.startswith(src + "/")}
        kept, stats = keychain.filter_items(items, mine, cfg.filter_lo, cfg.filter_hi)
        return kept, f"difficulty filter {src}: {stats}"

    return kept_inputs(run, raw, keep)


def balanced(items: list[dict]) -> list[dict]:
    """The gold-yes items, then as many gold-no ones (each side cut to the smaller), in their order."""
    sides = [[it for it in items if it["answers"][0].lower() == a] for a in ("yes", "no")]
    n = min(map(len, sides))
    return sides[0][:n] + sides[1][:n]


def guessable(items: list[dict]) -> list[dict]:
    """The yes/no questions ("Were A and B born in the same country?"): in a world of two countries about half
    are yes, so a model that can only guess is right about half the time."""
    return [it for it in items if it["answers"][0].lower() in ("yes", "no")]


def near_docs(item: dict) -> dict:
    """The item with only the documents its question names and the ones those name (for a yes/no question:
    the two people, then their cities): the context filler adds random documents around them up to L."""
    named = [d for d in item["docs"] if d.split("\n")[0] in item["question"]]
    more = [d for d in item["docs"] if d not in named and any(d.split("\n")[0] in n for n in named)]
    return {**item, "docs": named + more}


def guessable_inputs(run: Path, raw: dict[str, str]) -> dict[str, str]:
    """The tiny preset's stand-in for the difficulty filter (which keeps what the filter model solves 1..6 of 8):
    its QA sources keep the guessable items, so GRPO sees groups with unequal rewards in every stage, each with
    its near documents only, so that L=2048 holds it (MuSiQue's 20 paragraphs would not fit). As many with gold
    yes as with gold no: a policy that always says one of them then earns the same either way, so a rising reward
    is not a yes/no prior tilting toward the majority side."""
    def keep(src: str, items: list[dict]) -> tuple[list[dict], str]:
        kept = [near_docs(it) for it in balanced(guessable(items))]
        return kept, f"tiny: {src}: kept {len(kept)} yes/no questions of {len(items)} items, half of them yes"

    return kept_inputs(run, raw, keep)


def tiny_or_given_tokenizer(cfg: Config, run: Path):
    """--tokenizer, or the byte tokenizer built once in run/data/tiny-tokenizer (tiny: with the format's whole-word
    tokens, keychain.make_tiny_tokenizer), which the format warm-up saves beside its model for every later stage."""
    return keychain.load_tokenizer(cfg.tokenizer, tmp_dir=str(run / "data" / "tiny-tokenizer"),
                                   format_tokens=cfg.preset == "tiny")


def prepare(cfg: Config, run: Path) -> dict[str, Path]:
    """Build every part and the stage mixes under run/data, or reuse them when the manifest is unchanged."""
    # 1) the inputs exist: the released rows, or the raw files (and the filter's counts when it is on)
    data = run / "data"
    raw = raw_paths(cfg, run)
    if cfg.released:
        released_files(cfg.released)
    else:
        missing = [f"{k}: {p or '(not set)'}" for k, p in raw.items() if k != "haystack" and not (p and Path(p).exists())]
        if missing:
            raise SystemExit("missing raw files (set HOTPOTQA, TWOWIKI, MUSIQUE, DAPO, MATHQA, or RELEASED):\n  "
                             + "\n  ".join(missing))
        if (cfg.filter_model or cfg.filter_counts) and not counts_path(cfg, run).exists():
            raise SystemExit(f"no pass counts at {counts_path(cfg, run)}: run `curriculum.py filter` first or set FILTER_COUNTS")
    # 2) reuse: same settings, raw files and code -> the same data
    man = manifest(cfg, raw, run)
    stages = {s: data / f"{s}.jsonl" for s in STAGES}
    man_path = data / "manifest.json"
    if man_path.exists() and json.loads(man_path.read_text()) == man and all(p.exists() for p in stages.values()):
        print(f"data: reusing {data} (same settings)")
        return stages
    # 3) the parts: released rows, or (filtered) raw items synthesized by keychain.py
    tok = tiny_or_given_tokenizer(cfg, run)
    if cfg.released:
        parts = released_parts(cfg, tok)
    else:
        if cfg.filter_model or cfg.filter_counts:
            raw = filtered_inputs(cfg, run, raw)
        elif cfg.preset == "tiny":
            raw = guessable_inputs(run, raw)
        parts = synth_parts(cfg, tok, raw, data)
    # 4) each stage's mix, shuffled once; the manifest last, so a crash before it rebuilds
    for stage, names in STAGES.items():
        mix = [r for p in names for r in parts.get(p, [])]
        random.Random(f"{cfg.seed}/{stage}").shuffle(mix)
        keychain.write_rows(stages[stage], mix)
    keychain.atomic_write(man_path, lambda tmp: tmp.write_text(json.dumps(man, indent=1)))
    print(keychain.summarize([r for rows in parts.values() for r in rows], {}))
    return stages


def synth_parts(cfg: Config, tok, raw: dict[str, str], data: Path) -> dict[str, list[dict]]:
    """Every part of the mix synthesized from the raw files (keychain.py), one file per part."""
    base = keychain.Config(max_tokens=cfg.max_tokens, key_style=cfg.key_style, seed=cfg.seed, haystack=raw["haystack"],
                           needles=cfg.ruler_needles)
    parts: dict[str, list[dict]] = {}
    for part, per_source in sizes(cfg.scale).items():
        rows = []
        for src, n in per_source.items():
            # plain QA draws its items with another seed than KeyChain, so the two parts share few items
            c = dataclasses.replace(base, kind=part, n=n, source=src,
                                    input=raw.get(src, ""), seed=cfg.seed + (part == "qa"))
            got, st = keychain.synth(c, tok)
            rows += got
            if len(got) < n:
                print(f"warning: {part}/{src}: {len(got)} rows of {n} wanted ({st})")
        keychain.write_rows(data / f"{part}.jsonl", rows)
        parts[part] = rows
    return parts


def released_parts(cfg: Config, tok) -> dict[str, list[dict]]:
    """The authors' released rows, every one kept (unless --released_cut; --scale below 1 keeps that share of each
    part), split into our parts by kind: warmup then trains on its non-KeyChain rows, Stage I on all of them."""
    parts: dict[str, list[dict]] = {p: [] for p in MIX}
    seen: set = set()
    for f in released_files(cfg.released):
        c = keychain.Config(input=str(f), max_tokens=cfg.max_tokens, cut_tasks=cfg.released_cut, seed=cfg.seed)
        rows, stats = keychain.synth(c, tok)
        print(f"released {f.name}: {len(rows)} rows {({k: v for k, v in stats.items() if k != 'requested'})}")
        for r in rows:
            while r["id"] in seen:  # two files may number their rows alike
                r["id"] += "+"
            seen.add(r["id"])
            parts["math" if r["kind"] == "choice" else r["kind"]].append(r)
    if cfg.scale < 1:  # a rehearsal (STEPS=N): the same share of every part, drawn with the seed
        for p, rows in parts.items():
            keep = max(1, round(len(rows) * cfg.scale)) if rows else 0
            parts[p] = random.Random(f"{cfg.seed}/released/{p}").sample(rows, keep)
    return parts


# ----------------------------------------------------------------------------- tiny format warm-up
def format_rows(cfg: Config, run: Path, tok) -> list[dict]:
    """The yes/no questions of a second generated world (not the training items), as many with gold yes as with
    gold no (the warm-up must not hand RL a yes/no prior), as QA and KeyChain rows at the stages' length, plus
    MathQA multiple choice (a letter A-E)."""
    work = run / "format"
    raw = keychain.generate_raw(str(work / "raw"), n=120, seed=cfg.seed + 1, countries=2)
    items = [near_docs(it) for it in guessable(keychain.load_items(raw["hotpotqa"])[0])]
    items = balanced(items)
    keychain.write_rows(work / "raw" / "guessable.jsonl", items)
    base = keychain.Config(input=str(work / "raw" / "guessable.jsonl"), format="items", max_tokens=cfg.max_tokens,
                           key_style=cfg.key_style, seed=cfg.seed + 1)
    rows = []
    for kind in ("qa", "keychain"):
        rows += keychain.synth(dataclasses.replace(base, kind=kind), tok)[0]
    return rows + keychain.synth(dataclasses.replace(base, input=raw["mathqa"], format="auto"), tok)[0]


def format_warmup(cfg: Config, run: Path) -> None:
    """The tiny preset only: a random model never writes `</think>\\boxed{...}`, so every reward would be 0 and
    GRPO would drop every group. A short supervised warm-up on `<think> </think>\\boxed{gold}` completions of
    easy items teaches the format; the answers it then guesses (yes/no, a letter) are right by chance, which
    gives GRPO groups with unequal rewards from the first step. It stops early (--format_loss): sampled at T=1
    the model still writes a wrong box or a letter for a yes/no question often enough that the RL stages have
    something to improve. Writes run/format/hf."""
    import torch

    import grpo
    import rollout

    # 1) target completions: the prefill's <think> closed at once, then the gold in a box
    tok = tiny_or_given_tokenizer(cfg, run)
    seqs = []
    for r in format_rows(cfg, run, tok):
        prompt = tok(keychain.render_prompt(tok, r["messages"]), add_special_tokens=False)["input_ids"]
        target = f" </think>\\boxed{{{r['answers'][0]}}}"  # the prefill already opened <think>
        completion = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append({"prompt": prompt, "completion": completion})
    # 2) supervised steps on the completion tokens only
    lm = rollout.tiny_model(len(tok), cfg.seed, num_attention_heads=cfg.tiny_heads,
                            num_key_value_heads=max(1, cfg.tiny_heads // 2)).train()
    policy = grpo.Policy(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.format_lr)
    rng = random.Random(cfg.seed)
    # linear decay to 0: the format tokens must end up near-deterministic, since the stages sample at T=1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / cfg.format_steps)
    losses: list[float] = []
    for step in range(1, cfg.format_steps + 1):
        batch = rng.sample(seqs, min(8, len(seqs)))
        logp, _ = policy(*grpo.padded_inputs(batch, torch.device("cpu")))  # no cross-sequence mask
        loss = -logp.mean()  # mean log-loss of the completion tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == 1 or step % 20 == 0:
            print(f"format warm-up: step {step}/{cfg.format_steps} loss {loss.item():.3f}", flush=True)
        if len(losses) >= 10 and sum(losses[-10:]) / 10 < cfg.format_loss:  # enough: GRPO does the rest
            print(f"format warm-up: stopped at step {step}, mean loss of the last 10 steps "
                  f"{sum(losses[-10:]) / 10:.3f} < {cfg.format_loss}", flush=True)
            break
    # 3) the model for the warmup stage, written to a temporary folder and renamed
    out = run / "format" / "hf"
    tmp = out.with_name("hf.tmp")
    lm.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    print(f"format warm-up: {len(seqs)} easy items, model in {out}")


# ----------------------------------------------------------------------------- held-out before/after (tiny)
def heldout_rows(cfg: Config, run: Path, tok) -> list[dict]:
    """Items of a third generated world (neither the training world nor the format warm-up's), of the kinds the
    stages train on, at the stages' length L: yes/no questions as QA and KeyChain rows, as many with gold yes as
    with gold no (a model that always says one of them scores 0.5 on them), MathQA choice, DAPO math, RULER."""
    work = run / "heldout"
    raw = keychain.generate_raw(str(work / "raw"), n=120, seed=cfg.seed + 2, countries=2)
    items = [near_docs(it) for it in guessable(keychain.load_items(raw["hotpotqa"])[0])]
    per = cfg.heldout_items // 2
    yes = [it for it in items if it["answers"][0].lower() == "yes"][:per + 2]  # + 2: some may not fit L
    no = [it for it in items if it["answers"][0].lower() == "no"][:per + 2]
    keychain.write_rows(work / "raw" / "yes_no.jsonl", yes + no)
    base = keychain.Config(input=str(work / "raw" / "yes_no.jsonl"), format="items", max_tokens=cfg.max_tokens,
                           key_style=cfg.key_style, seed=cfg.seed + 2)
    rows = []
    for kind in ("qa", "keychain"):  # an item that does not fit L is dropped: balance again after
        got = keychain.synth(dataclasses.replace(base, kind=kind), tok)[0]
        rows += balanced(got)
    for path, n in ((raw["mathqa"], per), (raw["dapo"], per // 2)):
        rows += keychain.synth(dataclasses.replace(base, input=path, format="auto", n=n), tok)[0]
    return rows + keychain.synth(dataclasses.replace(base, input="", kind="ruler", n=2), tok)[0]


def heldout_scores(rows: list[dict], model: str, tok, max_new_tokens: int, temperature: float = 0.0,
                   n: int = 1) -> dict:
    """Replies of `model` to the rows (greedy, or n samples each at `temperature`), scored by the training reward:
    the mean reward, per kind, and the diagnostics of what was learned (grpo.answer_form): format rate, and on the
    yes/no questions how often the reply says yes, says no, and is right."""
    import grpo
    import reward
    import rollout

    engine = rollout.make_engine(rollout.Config(engine="hf", n=n, temperature=temperature, seed=0,
                                                max_new_tokens=max_new_tokens, device="cpu",
                                                max_prompt_tokens=max(r.get("num_tokens", 0) for r in rows) + 64),
                                 model, tok)
    outs = engine.generate([tok(keychain.render_prompt(tok, r["messages"]), add_special_tokens=False)["input_ids"]
                            for r in rows], seed=0)
    pairs = [(r, c) for r, cs in zip(rows, outs) for c in cs]
    # inline (workers=1): a few math rows, and no process pool whose forkserver would outlive this command
    scored = reward.score_batch([r for r, _ in pairs], [c.text for _, c in pairs], workers=1,
                                finish=[c.finish_reason for _, c in pairs])
    recs = [{"kind": r["kind"], "reward": x, "text": c.text, **grpo.answer_form(r, c.text, c.finish_reason)}
            for (r, c), (x, _) in zip(pairs, scored)]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    yn = [x for x in recs if "says" in x]
    out = {"reward": mean([x["reward"] for x in recs]), "format": mean([float(x["format"]) for x in recs]),
           "yes_no/right": mean([x["reward"] for x in yn]),
           "yes_no/says_yes": mean([float(x["says"] == "yes") for x in yn]),
           "yes_no/says_no": mean([float(x["says"] == "no") for x in yn])}
    for kind in sorted({x["kind"] for x in recs}):
        out[f"kind/{kind}"] = mean([x["reward"] for x in recs if x["kind"] == kind])
    out["samples"] = [x["text"] for x in recs[:4]]
    return out


def heldout(cfg: Config, run: Path) -> dict:
    """The same held-out items scored greedy with the model that entered the warmup stage (--model; tiny: the
    format warm-up's) and with the Stage II model: what the RL stages changed, on items they never saw.
    Writes run/heldout/scores.json (summary.md shows it)."""
    tok = tiny_or_given_tokenizer(cfg, run)
    rows = heldout_rows(cfg, run, tok)
    res = {"items": len(rows), "kinds": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
           "yes_no_golds": {a: sum(r["answers"][0].lower() == a for r in rows) for a in ("yes", "no")}}
    # greedy, and 4 samples at T=1 as the stages sample: the tiny policy's greedy reply can differ from what it
    # usually samples (e.g. "</think>" repeated to the token limit while most samples close the box)
    runs = (("before", cfg.model, 0.0, 1), ("after", str(run / "stage2" / "hf"), 0.0, 1),
            ("before, T=1", cfg.model, 1.0, 4), ("after, T=1", str(run / "stage2" / "hf"), 1.0, 4))
    for name, model, temperature, n in runs:
        res[name] = {"model": model, **heldout_scores(rows, model, tok, cfg.max_new_tokens, temperature, n)}
        print(f"held-out ({name}, {model}): " + ", ".join(f"{k} {v:.3f}" for k, v in res[name].items()
                                                          if isinstance(v, float)), flush=True)
    keychain.atomic_write(run / "heldout" / "scores.json", lambda tmp: tmp.write_text(json.dumps(res, indent=1)))
    return res


# ----------------------------------------------------------------------------- hard mining
def mine_from_counts(rows: list[dict], counts: dict[str, tuple[int, int]]) -> tuple[list[dict], dict]:
    """Keep the items not solved every time (k < n); report 0/n, partly and n/n per source."""
    report: dict = {}
    kept = []
    for r in rows:
        if r["id"] not in counts:
            raise SystemExit(f"mining: no pass count for item {r['id']!r}")
        n, k = counts[r["id"]]
        bucket = "solved 0/G" if k == 0 else "solved G/G" if k == n else "partly"
        src = report.setdefault(r["source"], {"solved 0/G": 0, "partly": 0, "solved G/G": 0})
        src[bucket] += 1
        if k < n:
            kept.append(r)
    report["total"] = {b: sum(v[b] for k, v in report.items() if k != "total") for b in ("solved 0/G", "partly", "solved G/G")}
    return kept, report


def counts_from_rollouts(path: Path) -> dict[str, tuple[int, int]]:
    """Stage I's own rollouts (grpo.py's mining.jsonl), summed over every step an item was drawn in; a step
    that ran twice (resumed after a crash) counts once, with its last record."""
    last = {(rec["step"], rec["id"]): rec for _, rec in keychain.read_records(path)}
    counts: dict = {}
    for rec in last.values():
        n, k = counts.get(rec["id"], (0, 0))
        counts[rec["id"]] = (n + rec["n"], k + rec["k"])
    return counts


def pass_counts(cfg: Config, jobs: list[dict], out: Path, *, model: str, group: int, temperature: float,
                max_new_tokens: int, tp: int, max_prompt: int, tokenizer: str, render, score) -> dict[str, tuple[int, int]]:
    """Sample `group` answers per job and count the correct ones, over all ranks (torchrun): the difficulty
    filter (a strong model at T=1.0 on raw items) and hard mining (the Stage I checkpoint at T=0.6 on training
    rows) are this one operation. render(tok, job) -> prompt text; score(jobs, texts) -> [correct?].

    Each rank appends to out/counts.rank{r}.jsonl as it goes; a rerun (at any world size) skips every id
    already in one of those files. Jobs whose prompt exceeds max_prompt tokens get no count."""
    import torch.distributed as dist
    from tqdm import tqdm

    import grpo
    import rollout

    # 1) ranks, and the jobs no rank has counted yet (a resumed run skips them)
    rank, world, device = grpo.init_distributed(grpo.Config(device="auto"))
    if rank:  # one "Loading weights" bar on the console, not one per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # a crash can tear a last line; its item is sampled again
        for f in sorted(out.glob("counts.rank*.jsonl")):
            if grpo.trim_jsonl(f):
                print(f"{f}: removed a torn line; its item is sampled again")
    dist.barrier()
    read = lambda: {rec["id"]: (rec["n"], rec["k"]) for f in sorted(out.glob("counts.rank*.jsonl"))  # noqa: E731
                    for _, rec in keychain.read_records(f)}
    done = read()
    mine = [j for j in jobs if j["id"] not in done][rank::world]
    # 2) the engine: vLLM on GPU, the HF engine on CPU
    tok = keychain.load_tokenizer(tokenizer)
    kind = grpo.engine_kind(cfg.engine, device)
    rcfg = engine_config(cfg, kind, str(device), group=group, temperature=temperature,
                         max_new_tokens=max_new_tokens, max_prompt=max_prompt, tp=tp)
    engine = rollout.make_engine(rcfg, model, tok)
    # 3) sample, score, append one line per job as soon as its batch is done
    part = out / f"counts.rank{rank}.jsonl"
    too_long = 0
    # the same number of generate calls on every rank: vLLM's tensor-parallel groups gather inside each call
    calls = int(grpo.all_max((len(mine) + cfg.batch - 1) // cfg.batch, device))
    for s in tqdm(range(0, calls * cfg.batch, cfg.batch), desc=f"pass counts ({group} per item)", disable=rank != 0):
        batch = [(j, tok(render(tok, j), add_special_tokens=False)["input_ids"]) for j in mine[s:s + cfg.batch]]
        too_long += sum(len(ids) > max_prompt for _, ids in batch)
        batch = [(j, ids) for j, ids in batch if len(ids) <= max_prompt]
        outs = engine.generate([ids for _, ids in batch], seed=[grpo.hash_seed(cfg.seed, 7, hash_id(j["id"])) for j, _ in batch])
        ok = score([j for j, _ in batch for _ in range(group)], [c.text for cs in outs for c in cs])
        with open(part, "a") as f:
            for i, (j, _) in enumerate(batch):
                f.write(json.dumps({"id": j["id"], "n": group, "k": int(sum(ok[i * group:(i + 1) * group]))}) + "\n")
    if too_long:
        print(f"rank {rank}: {too_long} items over {max_prompt} prompt tokens got no pass count")
    dist.barrier()
    return read()


def engine_config(cfg: Config, kind: str, device: str, *, group: int, temperature: float, max_new_tokens: int,
                  max_prompt: int, tp: int):
    """The sampling engine of the filter and of hard mining: no trainer shares its GPU, so no sleep mode and
    most of the memory for the KV cache (Qwen2.5-32B at tp=2 leaves little of 80 GB at a 0.5 share)."""
    import rollout

    return rollout.Config(engine=kind, n=group, temperature=temperature, max_new_tokens=max_new_tokens,
                          max_prompt_tokens=max_prompt, device=device, tp=tp, seed=cfg.seed,
                          enable_sleep_mode=False, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enforce_eager=cfg.enforce_eager)


def filter_correct(text: str, golds: list[str]) -> bool:
    """The authors' filter rule: prediction = the text after the first "the answer is" (any case), normalized;
    correct when it is a substring of a normalized gold. No "the answer is", or nothing after it, is wrong
    (an empty string is a substring of everything)."""
    import reward

    i = text.lower().find("the answer is")
    if i < 0:
        return False
    pred = reward.normalize_answer(text[i + len("the answer is"):])
    return bool(pred) and any(pred in reward.normalize_answer(g) for g in golds)


def difficulty_filter(cfg: Config, run: Path) -> None:
    """Pass counts of every raw QA item with the filter model -> run/data/filter/counts.jsonl (resumable)."""
    raw = raw_paths(cfg, run)
    jobs = []
    for src in QA_SOURCES:
        items, _ = keychain.load_items(raw[src], source=src)
        items = items[:cfg.filter_items] if cfg.filter_items else items  # a rehearsal samples a few hundred
        jobs += [{**it, "id": f"{src}/{it['id']}"} for it in items]
    render = lambda tok, it: tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": keychain.filter_prompt(it)}], tokenize=False, add_generation_prompt=True)
    score = lambda its, texts: [filter_correct(t, it["answers"]) for it, t in zip(its, texts)]  # noqa: E731
    out = counts_path(cfg, run).parent
    counts = pass_counts(cfg, jobs, out, model=cfg.filter_model, group=cfg.filter_group,
                         temperature=cfg.filter_temperature, max_new_tokens=cfg.filter_new_tokens,
                         tp=cfg.filter_tp or cfg.tp, max_prompt=cfg.filter_max_prompt, tokenizer=cfg.filter_model,
                         render=render, score=score)
    import grpo

    if int(os.environ.get("RANK", 0)) == 0:
        keychain.write_rows(out / "counts.jsonl", [{"id": i, "n": n, "k": k} for i, (n, k) in counts.items()])
        kept = sum(cfg.filter_lo <= k <= cfg.filter_hi for _, k in counts.values())
        print(f"difficulty filter: {len(counts)} of {len(jobs)} items counted, {kept} solved "
              f"{cfg.filter_lo}..{cfg.filter_hi} of {cfg.filter_group}")
    grpo.finish()


def mining_counts(cfg: Config, rows: list[dict], out: Path) -> dict[str, tuple[int, int]]:
    """G samples per Stage I item at temperature 0.6 with the Stage I checkpoint, scored by the training reward."""
    import reward

    render = lambda tok, r: keychain.render_prompt(tok, r["messages"])  # noqa: E731
    score = lambda rs, texts: [x >= 1.0 for x, _ in reward.score_batch(rs, texts)]  # noqa: E731
    return pass_counts(cfg, rows, out, model=cfg.model, group=cfg.group, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, tp=cfg.tp,
                       max_prompt=max([r.get("num_tokens", 0) for r in rows] + [cfg.max_tokens]),
                       tokenizer=cfg.tokenizer or cfg.model, render=render, score=score)


def hash_id(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def mine(cfg: Config, run: Path) -> None:
    rows = keychain.read_rows(run / "data" / "stage1.jsonl")
    out = run / "mining"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mine_mode == "rollouts":
        if int(os.environ.get("RANK", 0)) != 0:
            return  # no sampling: rank 0 alone reads the records
        counts = counts_from_rollouts(run / "stage1" / "mining.jsonl")
        rows = [r for r in rows if r["id"] in counts]  # items Stage I never drew stay out
    else:
        counts = mining_counts(cfg, rows, out)
        if int(os.environ.get("RANK", 0)) != 0:
            import grpo

            grpo.finish()
            return
    kept, report = mine_from_counts(rows, counts)
    yn = yes_no_kept(rows, kept)
    if yn:  # a guessing policy's prior shows here: it solves the items of the side it prefers G/G, so Stage II
        report["yes_no_kept"] = yn  # keeps the other side, and learning to say that side looks like learning
        print(f"yes_no_kept: gold yes {yn['yes']} of {yn['yes_of']}, gold no {yn['no']} of {yn['no_of']}")
    keychain.write_rows(out / "counts.jsonl", [{"id": i, "n": n, "k": k} for i, (n, k) in counts.items()])
    keychain.write_rows(run / "data" / "stage2.jsonl", kept)
    keychain.atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    print(f"hard mining ({cfg.mine_mode}): kept {len(kept)} of {len(rows)} Stage I items")
    print(report_table(report))
    if cfg.mine_mode == "sample":
        import grpo

        grpo.finish()


def yes_no_kept(rows: list[dict], kept: list[dict]) -> dict:
    """Of the yes/no questions among `rows`, how many with gold yes and with gold no hard mining kept ({} if none)."""
    gold = lambda r: str((r.get("answers") or [""])[0]).strip().lower()  # noqa: E731
    if not any(gold(r) in ("yes", "no") for r in rows):
        return {}
    return {"yes": sum(gold(r) == "yes" for r in kept), "yes_of": sum(gold(r) == "yes" for r in rows),
            "no": sum(gold(r) == "no" for r in kept), "no_of": sum(gold(r) == "no" for r in rows)}


def report_table(report: dict) -> str:
    lines = ["| source | solved 0/G | partly | solved G/G |", "|---|---|---|---|"]
    for src, v in report.items():
        if src != "yes_no_kept":
            lines.append(f"| {src} | {v['solved 0/G']} | {v['partly']} | {v['solved G/G']} |")
    yn = report.get("yes_no_kept")
    if yn:
        share = lambda k: yn[k] / max(yn[f"{k}_of"], 1)  # noqa: E731
        lop = abs(share("yes") - share("no")) > 0.3  # one side solved G/G far more often: the policy's prior
        lines += ["", f"yes_no_kept: of the yes/no questions, Stage II keeps gold yes {yn['yes']} of {yn['yes_of']} "
                  f"and gold no {yn['no']} of {yn['no_of']}"
                  + (" (lopsided: Stage I ended with a yes/no prior, Stage II trains on the other side)" if lop else "")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks: before a run, and the preflight
GPU_GIB = {"tiny": 0, "gpu1": 16, "7b": 75, "14b": 75, "7b-mi300x": 180}  # per GPU, what train.sh sized each for
# parameters of the models train.sh names (their configs' shapes), for the arithmetic when a config does not load;
# gpu1's random model (Qwen2.5-0.5B's shape) is built by the run itself
HUB_PARAMS = {"Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen/Qwen2.5-14B-Instruct": 14_770_033_664,
              "Qwen/Qwen2.5-32B-Instruct": 32_763_876_352, "gpu1": 494_032_768}
GIB = 1 << 30


def disk_need(params: int, keep: int, rows: int, max_tokens: int, gpu: bool) -> dict[str, int]:
    """Bytes a whole run writes under RUN_DIR. A checkpoint (torch DCP, all ranks' shards) holds the fp32 master
    weights and AdamW's two fp32 moments, 12 bytes per parameter (7B: 91 GB); each stage keeps `keep` of them and
    they stay when it is done, plus one while the newest is written. Each stage exports hf/ (bf16 on GPU)."""
    return {"checkpoints": (3 * keep + 1) * 12 * params, "exports": 3 * (2 if gpu else 4) * params,
            "data": 4 * 5 * rows * max_tokens}  # ~5 bytes of JSON per token; the parts, then three stage files


def model_facts(name: str, deep: bool) -> tuple[int, str, list[str], int]:
    """(parameters, what was found, problems, bytes to download) of a local folder or hub id: its config, the
    parameters counted on the meta device; deep: also its tokenizer and the weight files its index names."""
    import torch
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoModelForCausalLM

    hub_logging.set_verbosity_error()  # an unreachable hub: one problem line, not a warning per retry
    try:
        config = AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if deep:
            keychain.load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - any failure means the run cannot start
        n = HUB_PARAMS.get(name, 0)  # a known hub id still counts for the disk and the download
        return n, "does not load", [f"model {name}: {str(e).strip().splitlines()[0][:200]}"], 2 * n * deep
    found = f"{params / 1e9:.2f}B parameters" + (", tokenizer loads" if deep else "")
    if not deep:
        return params, found, [], 0
    local = Path(name).is_dir()

    def where(f: str) -> str | None:  # a local folder holds its weights; a hub id has them cached, or downloads them
        if local:
            return str(Path(name) / f) if (Path(name) / f).exists() else None
        hit = try_to_load_from_cache(name, f)
        return hit if isinstance(hit, str) else None

    index = where("model.safetensors.index.json")
    files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    missing = [f for f in files if not where(f)]
    if local and missing:
        return params, found, [f"model {name}: weight file(s) missing: {', '.join(missing[:3])}"], 0
    return params, found + (", weights to download" if missing else ", weights here"), [], 2 * params * bool(missing)


def engine_facts(gpu: bool) -> dict[str, tuple[str, bool]]:
    """vLLM and flash-attn: (state, usable) each. vLLM must import and sit in rollout.VLLM_RANGE; flash-attn
    must run a tiny varlen call on this GPU (grpo.flash_attn_ok; SDPA otherwise)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import grpo
    import rollout

    out = {}
    for pkg in ("vllm", "flash_attn"):
        try:
            v = version(pkg)
            __import__(pkg)  # a wheel built for another torch or CUDA fails here
        except PackageNotFoundError:
            out[pkg] = ("not installed", False)
            continue
        except Exception as e:  # noqa: BLE001
            out[pkg] = (f"{v}, does not import ({type(e).__name__})", False)
            continue
        if pkg == "vllm":
            ok = rollout.vllm_version_ok(v)
            out[pkg] = (v if ok else f"{v}, outside {rollout.vllm_range_text()}", ok)
        else:
            ok = gpu and grpo.flash_attn_ok(torch.device("cuda", 0))
            out[pkg] = (f"{v}, " + ("usable" if ok else "not usable here (SDPA instead)"), ok)
    return out


def check(cfg: Config, run: Path, free: int | None = None, found: list[tuple[str, int]] | None = None) -> list[str]:
    """Before a run (train.sh): the data, the model(s), this node's GPUs. --preflight (bash train.sh PRESET check)
    adds tokenizers and weight files, GPU memory, disk for the whole run and the downloads, vLLM and flash-attn,
    and prints a table of what it found. Returns the problems, one line each. Tests pass `free` (bytes free in
    RUN_DIR) and `found` ([(name, bytes)] per GPU) in place of this machine's."""
    import shutil

    import torch

    import grpo

    errors: list[str] = []
    table = [("", "found", f"preset {cfg.preset} needs")]
    # 1) data: the released rows or the raw files, on node 0 (the other nodes read its data)
    raw = {} if cfg.preset in ("tiny", "gpu1") else raw_paths(cfg, run)
    have = [k for k, p in raw.items() if k != "haystack" and p and Path(p).exists()]
    if cfg.released and not Path(cfg.released).exists():
        errors.append(f"RELEASED not found: {cfg.released}")
    elif raw and not cfg.released and cfg.node_rank == 0 and not any(raw.values()):
        errors.append(f"no data for preset {cfg.preset}: set RELEASED=path/to/LoongRL-Train-Data (the authors' "
                      "rows) or the raw files HOTPOTQA, TWOWIKI, MUSIQUE, DAPO, MATHQA (HAYSTACK optional)")
    elif raw and not cfg.released and cfg.node_rank == 0:
        errors += [f"raw file for {k} not found: {p or '(not set)'}" for k, p in raw.items()
                   if k != "haystack" and k not in have]
        if raw["haystack"] and not Path(raw["haystack"]).exists():
            errors.append(f"HAYSTACK file not found: {raw['haystack']}")
    table.append(("data", cfg.released or (f"{len(have)} of 5 raw files" if raw else "generated by the run"),
                  "RELEASED or the 5 raw files" if raw else ""))
    # 2) the policy and the filter model (gpu1's random model is built by the run)
    params = HUB_PARAMS["gpu1"] if cfg.preset == "gpu1" else 0
    download = 0
    for role, name in (("model", cfg.model), ("filter model", cfg.filter_model)):
        if not name or name == "tiny" or (cfg.preset == "gpu1" and role == "model" and not Path(name).exists()):
            table.append((f"{role} {name}".strip(), "random, built by the run" if name else "none", ""))
            continue
        n, note, bad, more = model_facts(name, cfg.preflight)
        params = n if role == "model" else params
        download += more
        errors += bad
        table.append((f"{role} {name}", note, ""))
    # 3) this node's GPUs: how many, how much memory
    gpus = found
    if gpus is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory) for i in range(count)]
    gib = GPU_GIB[cfg.preset]
    small = [f"{i} ({n}, {b / GIB:.0f} GiB)" for i, (n, b) in enumerate(gpus[:cfg.gpus]) if b < gib * GIB]
    if len(gpus) < cfg.gpus:
        errors.append(f"this node has {len(gpus)} GPU(s); preset {cfg.preset} needs {cfg.gpus}")
    if cfg.preflight and small:
        errors.append(f"GPU {small[0]} has less than the {gib} GiB preset {cfg.preset} was sized for"
                      + (f" (and {len(small) - 1} more)" if len(small) > 1 else ""))
    table.append(("GPUs on this node", f"{len(gpus)} x {gpus[0][0]}, {gpus[0][1] / GIB:.0f} GiB" if gpus else "none",
                  f"{cfg.gpus} x {gib} GiB" if cfg.gpus else ""))
    # 4) vLLM (every GPU preset but gpu1 generates with it), flash-attn (optional)
    needs_vllm = cfg.gpus > 0 and cfg.preset != "gpu1"
    if cfg.preflight:
        engines = engine_facts(bool(gpus))
    else:  # before a run, installed is enough: rollout.py checks the version as it starts the engine
        engines = {"vllm": ("installed", True) if grpo._has("vllm") else ("not installed", False)}
    state, usable = engines["vllm"]
    if needs_vllm and not usable:
        errors.append(f"vllm: {state} (pip install -r requirements-gpu.txt): GPU presets generate with it")
    table += [(pkg, state, "required" if pkg == "vllm" and needs_vllm else "") for pkg, (state, _) in engines.items()]
    if not cfg.preflight:
        return errors
    # 5) disk: everything the run writes in RUN_DIR (may not exist yet), and the downloads in the hub cache
    from huggingface_hub import constants

    need = disk_need(params, grpo.Config().keep, round(sum(MIX.values()) * cfg.scale), cfg.max_tokens, cfg.gpus > 0)
    parts = ", ".join(f"{k} {v / 1e9:.0f} GB" for k, v in need.items())
    space = lambda p: shutil.disk_usage(next(d for d in [p, *p.absolute().parents] if d.exists())).free  # noqa: E731
    have_disk = space(run) if free is None else free
    if have_disk < sum(need.values()):
        errors.append(f"disk: {run} has {have_disk / 1e9:.0f} GB free; the run writes about "
                      f"{sum(need.values()) / 1e9:.0f} GB ({parts})")
    cache = Path(constants.HF_HUB_CACHE)
    if space(cache) < download:
        errors.append(f"disk: the hub cache {cache} has {space(cache) / 1e9:.0f} GB free; the models to download "
                      f"need {download / 1e9:.0f} GB (HF_HOME=elsewhere)")
    table += [(f"disk in {run}", f"{have_disk / 1e9:.0f} GB free", f"{sum(need.values()) / 1e9:.0f} GB: {parts}"),
              (f"hub cache {cache}", f"{space(cache) / 1e9:.0f} GB free", f"{download / 1e9:.0f} GB to download")]
    # 6) the table
    w1, w2 = (max(len(row[i]) for row in table) for i in (0, 1))
    print(f"check: node {cfg.node_rank} ({os.uname().nodename})")
    print("\n".join(f"  {what:<{w1}}  {got:<{w2}}  {needs}".rstrip() for what, got, needs in table))
    return errors


def cluster(cfg: Config, run: Path) -> None:
    """The preflight's part under torchrun, on every node: an all-reduce over every rank of every node (NCCL on
    GPU, gloo on CPU), then a file that node 0 writes in RUN_DIR and every other node must read. Each node's first
    process prints every node's problems and writes "ok" or them to --verdict (train.sh reads it)."""
    import time
    import uuid

    import torch
    import torch.distributed as dist

    import grpo

    # 1) every rank joins (waiting at most --wait_s) and all-reduces 256 MiB of ones (CPU: 4 MiB): each must
    # become the world size; the time gives the bus bandwidth
    rank, world, device = grpo.init_distributed(grpo.Config(device="cuda" if cfg.gpus else "cpu",
                                                            timeout_hours=cfg.wait_s / 3600))
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    cuda = device.type == "cuda"
    x = torch.ones((128 if cuda else 1) << 20, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    dist.barrier()  # NCCL builds its communicators here, not inside the timed call
    t0 = time.time()
    dist.all_reduce(x)
    right = bool((x == world).all())  # a host sync: the all-reduce has finished
    busbw = 2 * (world - 1) / world * x.numel() * x.element_size() / max(time.time() - t0, 1e-9) / 1e9
    problems = [] if right else [f"rank {rank}: the all-reduce of ones did not give {world} everywhere"]
    # 2) the shared RUN_DIR: node 0 writes a fresh token, every node's first process reads it back
    token = [uuid.uuid4().hex if rank == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    probe = run / f".preflight-{token[0]}"
    made = [d for d in [run, *run.parents] if not d.exists()]  # removed again afterwards, deepest first
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    if first and not (probe.exists() and probe.read_text() == token[0]):
        problems.append(f"node {os.environ.get('GROUP_RANK', 0)}: RUN_DIR={run} does not show the file node 0 "
                        "wrote there: RUN_DIR must be on a filesystem every node shares (NFS, Lustre, ...)")
    dist.barrier()
    if rank == 0:
        probe.unlink()
        for d in made:
            d.rmdir()
    # 3) every node's problems on every node (stdout: train.sh keeps torchrun's stderr for its log)
    everyone = [p for part in grpo.gather(problems) for p in part]
    if first:
        print(f"check: all-reduce over {world} ranks on {os.environ.get('GROUP_WORLD_SIZE', 1)} node(s) "
              f"({dist.get_backend()}): sum {'right' if right else 'WRONG'}, {busbw:.1f} GB/s bus bandwidth on "
              f"{x.numel() * x.element_size() >> 20} MiB; RUN_DIR {'NOT ' if any('RUN_DIR' in p for p in everyone) else ''}shared")
        print("\n".join(f"check: {p}" for p in everyone))
        if cfg.verdict:
            Path(cfg.verdict).write_text("\n".join(everyone) or "ok")
    grpo.finish()


# ----------------------------------------------------------------------------- summary
def read_log(path: Path) -> tuple[dict[int, dict], list[int]]:
    """grpo.py's log.jsonl by step (a resumed step logs twice: the last record wins) and the numbers of the lines
    skipped: a torn last line after a crash, or anything else that is not a step record."""
    steps, bad = {}, []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            steps[rec["step"]] = rec
        elif line.strip():
            bad.append(n)
    return steps, bad


STAGE_NAMES = ("warmup", "stage1", "stage2")
CURVES = (("reward", "mean reward"), ("response_len", "response length (tokens)"),
          ("keychain/names_real", 'KeyChain: "names the real question" rate'), ("clip_frac", "clip fraction"))


def plot_training(logs: dict[str, dict[int, dict]], path: Path) -> None:
    """Four panels over steps, the stages one after another (shaded, labelled): reward, response length, how often
    a KeyChain reply names the real question (dashed: a distractor), clip fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    start = 0
    for i, (stage, steps) in enumerate(logs.items()):
        xs = [start + k for k in sorted(steps)]
        color = f"C{i}"
        for ax, (key, title) in zip(axes.flat, CURVES):
            pts = [(x, steps[k][key]) for x, k in zip(xs, sorted(steps)) if key in steps[k]]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=color, label=stage)
            if key == "keychain/names_real":
                pts = [(x, steps[k]["keychain/names_distractor"]) for x, k in zip(xs, sorted(steps))
                       if "keychain/names_distractor" in steps[k]]
                if pts:
                    ax.plot(*zip(*pts), ls="--", color=color, alpha=0.6, label=f"{stage}: names a distractor")
            ax.set_title(title, fontsize=10)
            if i % 2:
                ax.axvspan(start + 0.5, start + max(steps, default=0) + 0.5, color="0.93", zorder=0)
        start += max(steps, default=0)
    for ax in axes[1]:
        ax.set_xlabel("training step (the stages one after another)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[1][0].set_ylim(-0.03, 1.03)  # a rate
    axes[0][0].legend(fontsize=8)
    if axes[1][0].lines:
        axes[1][0].legend(fontsize=7)
    fig.suptitle("training curves per stage (grpo.py log.jsonl)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mining(counts: dict[str, tuple[int, int]], path: Path) -> None:
    """Stage I items by how many of their G samples were right, one bar segment per source; k = G is dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = max(n for n, _ in counts.values())
    by_src: dict[str, list[int]] = {}
    for rid, (n, k) in counts.items():
        by_src.setdefault(rid.split("-", 1)[0], [0] * (g + 1))[round(k * g / n) if n else 0] += 1
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = [0] * (g + 1)
    for src, hist in sorted(by_src.items()):
        ax.bar(range(g + 1), hist, bottom=bottom, label=src)
        bottom = [a + b for a, b in zip(bottom, hist)]
    for k, total in enumerate(bottom):
        ax.text(k, total, str(total), ha="center", va="bottom", fontsize=8)
    ax.axvspan(g - 0.5, g + 0.5, color="0.85", zorder=0)
    ax.set_xticks(range(g + 1), [f"{k}/{g}" for k in range(g + 1)])
    ax.set_xlabel(f"times solved out of G={g} (grey: solved every time, dropped from Stage II)")
    ax.set_ylabel("Stage I items")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"hard mining: {len(counts)} items, {len(counts) - bottom[g]} kept for Stage II", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RISE_KEYS = (("reward", "reward"), ("format", "format rate"), ("yes_no/says_yes", 'yes/no questions: says "yes"'),
             ("yes_no/says_no", 'says "no"'), ("yes_no/right", "right"))


def rl_rise(logs: dict[str, dict[int, dict]]) -> list[str]:
    """Stage I and Stage II as one curve: the mean of its first 3 steps and of its last 3, for the reward and for
    what may have made it move (grpo.answer_form: the format, a yes/no prior)."""
    recs = [logs[s][k] for s in ("stage1", "stage2") if s in logs for k in sorted(logs[s])]
    if len(recs) < 2:
        return []
    out = ["", "| Stage I+II | first 3 steps | last 3 steps | change |", "|---|---|---|---|"]
    for key, name in RISE_KEYS:
        first = [r[key] for r in recs[:3] if key in r]
        last = [r[key] for r in recs[-3:] if key in r]
        if first and last:
            a, b = sum(first) / len(first), sum(last) / len(last)
            out.append(f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    rew = [r.get("reward", 0.0) for r in recs]
    a, b = sum(rew[:3]) / len(rew[:3]), sum(rew[-3:]) / len(rew[-3:])
    out += ["", f"Stage I+II: first 3 steps mean {a:.3f}, last 3 mean {b:.3f} ({b - a:+.3f}); per step: "
            + " ".join(f"{x:.2f}" for x in rew)]
    return out


def heldout_table(path: Path, notes: list[str]) -> list[str]:
    """curriculum.py heldout's scores: the model that entered warmup vs the Stage II model, greedy, unseen items."""
    if not path.exists():
        return []
    try:
        res = json.loads(path.read_text())
        before, after = res["before"], res["after"]
    except (ValueError, KeyError, TypeError):
        notes.append(f"{path}: skipped (not a held-out score file)")
        return []
    keys = [k for k in before if isinstance(before[k], float) and k in after]
    out = ["", f"Held-out before/after: {res.get('items', '?')} items never trained on "
           f"({', '.join(f'{k} {n}' for k, n in res.get('kinds', {}).items())}; yes/no questions with gold yes "
           f"{res.get('yes_no_golds', {}).get('yes', '?')}, gold no {res.get('yes_no_golds', {}).get('no', '?')}), "
           "scored by the training reward:", "",
           "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in ("before", "after", "before, T=1", "after, T=1"):
        if name in res:
            r = res[name]
            how = "greedy" if "T=1" not in name else "4 samples each at T=1"
            out.append(f"| {name.split(',')[0]}: {r.get('model', '?')}, {how} | "
                       + " | ".join(f"{r.get(k, 0.0):.3f}" for k in keys) + " |")
    out += ["", "What the RL stages taught, measured on these items, greedy: " + learned(before, after)]
    if "before, T=1" in res and "after, T=1" in res:
        out += ["", "and sampled at T=1 as in training: " + learned(res["before, T=1"], res["after, T=1"])]
    return out


def learned(before: dict, after: dict) -> str:
    """One sentence from the held-out diagnostics: the format, and whether the yes/no answers beat a guess
    (the items are about half yes, half no: one answer for all of them scores about 0.5, retrieval more)."""
    g = lambda r, k: float(r.get(k, 0.0))  # noqa: E731
    said = g(after, "yes_no/says_yes") + g(after, "yes_no/says_no")  # the rest: a letter, junk, no box
    side = "yes" if g(after, "yes_no/says_yes") >= g(after, "yes_no/says_no") else "no"
    if g(after, "yes_no/right") > 0.6:
        yn = "above a guess: some retrieval"
    elif said and max(g(after, "yes_no/says_yes"), g(after, "yes_no/says_no")) / said >= 0.9:
        yn = f'where it says yes or no, nearly always "{side}": a yes/no prior, no retrieval'
    else:
        yn = "no better than a guess: no retrieval"
    return (f"format {g(before, 'format'):.2f} -> {g(after, 'format'):.2f}; yes/no questions right "
            f"{g(before, 'yes_no/right'):.2f} -> {g(after, 'yes_no/right'):.2f}, says yes "
            f"{g(before, 'yes_no/says_yes'):.2f} -> {g(after, 'yes_no/says_yes'):.2f}, says no "
            f"{g(before, 'yes_no/says_no'):.2f} -> {g(after, 'yes_no/says_no'):.2f} ({yn}); reward "
            f"{g(before, 'reward'):.3f} -> {g(after, 'reward'):.3f}.")


def summary(run: Path) -> str:
    """summary.md: per stage rows, steps, reward, optimizer steps and dropped groups; plots/training.png and
    plots/mining.png; the mining report and eval/results.md. Lines that cannot be read are skipped and named."""
    if not run.is_dir():
        raise SystemExit(f"error: run dir {run} does not exist")
    lines = [f"# {run}", "", "| stage | rows | steps | reward first 3 | reward last 3 | optimizer steps | "
             "dropped groups | done |", "|---|---|---|---|---|---|---|---|"]
    logs: dict = {}
    notes: list[str] = []
    mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "-"  # noqa: E731
    # 1) one table row per stage from its data file and log.jsonl (the last record of a step counts)
    for stage in STAGE_NAMES:
        data = run / "data" / f"{stage}.jsonl"
        log = run / stage / "log.jsonl"
        n = sum(1 for _ in open(data)) if data.exists() else 0
        steps, bad = read_log(log) if log.exists() else ({}, [])
        if bad:
            notes.append(f"{log}: skipped line(s) {', '.join(map(str, bad))} (torn by a crash, or not a step record)")
        if steps:
            logs[stage] = steps
        recs = [steps[k] for k in sorted(steps)]
        rew = [r.get("reward", 0.0) for r in recs]
        has = lambda key: recs and all(key in r for r in recs)  # noqa: E731
        opt = str(sum(r["optimizer_steps"] for r in recs)) if has("optimizer_steps") else "-"
        drop = (f"{sum(r['dropped_groups'] for r in recs)} of {sum(r['groups'] for r in recs)}"
                if has("dropped_groups") and has("groups") else "-")
        lines.append(f"| {stage} | {n} | {len(rew)} | {mean(rew[:3])} | {mean(rew[-3:])} | {opt} | {drop} | "
                     f"{'yes' if (run / stage / 'hf').exists() else 'no'} |")
    lines += ["", "optimizer steps: AdamW updates (0 when every group of every step had equal rewards); dropped "
              "groups: prompts whose G rewards were all equal, of all prompts drawn."]
    lines += rl_rise(logs)
    lines += heldout_table(run / "heldout" / "scores.json", notes)
    # 2) the mining pass counts, line by line: a torn line is named, not fatal
    counts: dict[str, tuple[int, int]] = {}
    cpath = run / "mining" / "counts.jsonl"
    if cpath.exists():
        for n, line in enumerate(cpath.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                rec = json.loads(line)
                counts[str(rec["id"])] = (int(rec["n"]), int(rec["k"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if line.strip():
                    notes.append(f"{cpath}: skipped line {n} (not an id, n, k record)")
    # 3) plots (matplotlib is optional), the mining report, the evaluation's results.md
    plots = []
    try:
        if logs:
            (run / "plots").mkdir(exist_ok=True)
            plot_training(logs, run / "plots" / "training.png")
            plots.append("![training curves: reward, response length, KeyChain question naming, clip fraction]"
                         "(plots/training.png)")
        if counts and max(n for n, _ in counts.values()) > 0:
            (run / "plots").mkdir(exist_ok=True)
            plot_mining(counts, run / "plots" / "mining.png")
    except ImportError:
        notes.append("no plots: matplotlib is not installed (pip install matplotlib)")
    lines += ["", *plots] if plots else []
    rep = run / "mining" / "report.json"
    if rep.exists():
        try:
            lines += ["", "Hard mining (Stage I items, G samples each):", "", report_table(json.loads(rep.read_text()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{rep}: skipped (not a mining report)")
    if (run / "plots" / "mining.png").exists() and counts:
        lines += ["", "![hard mining: Stage I items by times solved](plots/mining.png)"]
    ev = run / "eval" / "results.md"
    if ev.exists():
        lines += ["", "Evaluation:", "", ev.read_text().strip()]
    # 4) what could not be read, on the page and on stderr; the page itself written by tmp-and-rename
    if notes:
        lines += ["", "Skipped while reading:", "", *[f"- {x}" for x in notes]]
        for x in notes:
            print(f"summary: {x}", file=sys.stderr)
    text = "\n".join(lines) + "\n"
    keychain.atomic_write(run / "summary.md", lambda tmp: tmp.write_text(text))
    return text


PRESETS = ("tiny", "gpu1", "7b", "14b", "7b-mi300x")  # train.sh's presets
COMMANDS = ("check", "cluster", "filter", "prepare", "format", "mine", "heldout", "summary")


def validate(cfg: Config, run: Path) -> None:
    """Bad input stops here, before anything is created."""
    if cfg.command not in COMMANDS:
        raise SystemExit(f"curriculum.py: unknown command {cfg.command!r} ({' | '.join(COMMANDS)})")
    if cfg.preset not in PRESETS:
        raise SystemExit(f"curriculum.py: unknown preset {cfg.preset!r} ({' | '.join(PRESETS)})")
    bad = [k for k in ("group", "max_new_tokens", "max_tokens", "batch", "tp", "format_steps") if getattr(cfg, k) <= 0]
    bad += [k for k in ("scale", "format_lr") if not getattr(cfg, k) > 0] + (["gpus"] if cfg.gpus < 0 else [])
    bad += ["format_loss"] if cfg.format_loss < 0 else []
    if bad:
        raise SystemExit(f"curriculum.py: --{bad[0]}={getattr(cfg, bad[0])} must be positive")
    if cfg.mine_mode not in ("sample", "rollouts"):
        raise SystemExit(f"curriculum.py: --mine_mode={cfg.mine_mode!r}: sample | rollouts")
    if not 0 < cfg.tiny_heads <= 64 or 64 % cfg.tiny_heads:  # heads of equal width over the tiny model's 64
        raise SystemExit(f"curriculum.py: --tiny_heads={cfg.tiny_heads} must divide 64")
    if cfg.command == "summary" and not run.is_dir():
        raise SystemExit(f"error: run dir {run} does not exist")
    if cfg.command == "mine":
        need = run / "data" / "stage1.jsonl"
        if not need.is_file():
            raise SystemExit(f"curriculum.py: {need} does not exist (run prepare first)")
        if cfg.mine_mode == "rollouts" and not (run / "stage1" / "mining.jsonl").is_file():
            raise SystemExit(f"curriculum.py: {run / 'stage1' / 'mining.jsonl'} does not exist (train Stage I first)")
        if cfg.mine_mode == "sample" and not cfg.model:
            raise SystemExit("curriculum.py: mine needs --model=STAGE1_CHECKPOINT")
    if cfg.command == "heldout":
        if not cfg.model:
            raise SystemExit("curriculum.py: heldout needs --model=THE_MODEL_THAT_ENTERED_WARMUP (tiny: RUN/format/hf)")
        if not (run / "stage2" / "hf" / "config.json").is_file():
            raise SystemExit(f"curriculum.py: {run / 'stage2' / 'hf'} does not exist (train Stage II first)")
    if cfg.command == "format" and cfg.preset != "tiny":
        raise SystemExit("curriculum.py: the format warm-up is for the tiny preset's random model only")


def main(argv: list[str]) -> int:
    cfg = keychain.parse_config(Config, argv, __doc__)
    run = Path(cfg.run_dir or f"runs/{cfg.preset}")
    validate(cfg, run)
    if cfg.command == "check":
        errors = check(cfg, run)
        if errors and cfg.preflight:  # one line per problem; train.sh adds the cluster part and the verdict
            sys.stdout.flush()  # the table first
            print("\n".join(f"check: {e}" for e in errors), file=sys.stderr)
            return 1
        if errors:
            raise SystemExit("cannot start:\n  " + "\n  ".join(errors))
        print(f"check: preset {cfg.preset}: " + ("this node is ready" if cfg.preflight else "ready"))
    elif cfg.command == "cluster":
        cluster(cfg, run)
    elif cfg.command == "prepare":
        prepare(cfg, run)
    elif cfg.command == "filter":
        difficulty_filter(cfg, run)
    elif cfg.command == "format":
        format_warmup(cfg, run)
    elif cfg.command == "mine":
        mine(cfg, run)
    elif cfg.command == "heldout":
        heldout(cfg, run)
    elif cfg.command == "summary":
        print(summary(run))
    else:
        raise SystemExit(f"unknown command {cfg.command!r}: {' | '.join(COMMANDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(keychain.cli(main))
