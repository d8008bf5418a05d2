"""Seconds per GRPO step on the CPU: grpo.py's train() against TRL's GRPOTrainer, same model, prompts, reward.

    python bench/bench_step.py --tokenizer=Qwen/Qwen2.5-7B-Instruct          # ours, and TRL when importable
    python bench/bench_step.py --tokenizer=Qwen/Qwen2.5-7B-Instruct --trl=false --rounds=1

The shape: a random Qwen2 (2 layers, hidden 128) with the tokenizer's full vocabulary (Qwen2.5:
151,665 tokens), 8 prompts x G=8 completions, ~200-token prompts, 64 new tokens, one optimizer step per rollout
batch, 3 steps, fp32, KL to a reference (beta 0.001), gradient checkpointing on both sides (TRL's default).
Each side runs in its own process (TRL's accelerate and our torch.distributed do not share one); `--rounds`
alternates them, and the median step time over all rounds and steps is reported with the load average.
`trl` is an optional, bench-only dependency (`pip install trl`); without it only our side runs.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import keychain  # noqa: E402


@dataclass
class Config:
    tokenizer: str = "../shared/qwen2.5-tokenizer"
    prompts: int = 8
    group: int = 8
    prompt_tokens: int = 200  # about: the rendered chat prompt
    new_tokens: int = 64
    steps: int = 3
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    kl: float = 0.001
    rounds: int = 2  # ours/TRL process pairs
    trl: bool = True  # also run TRL's GRPOTrainer when `trl` is importable
    seed: int = 0
    side: str = ""  # internal: ours | trl, in a child process
    workdir: str = ""  # internal


def reward(texts: list[str]) -> list[float]:
    """Any cheap function of the text with some spread, so advantages are not all zero."""
    return [(len(t) % 7) / 6 for t in texts]


WORDS = ("river city key chain question answer value find the of a to which where who when follow each step "
         "number seven north bridge library").split()


def prepare(cfg: Config, d: Path) -> None:
    """Model + tokenizer folder and the prompts (as rows for grpo.py, as rendered text for TRL)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    conf = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    Qwen2ForCausalLM(conf).float().save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng, rows = random.Random(cfg.seed), []
    for i in range(cfg.prompts):
        words = [rng.choice(WORDS) for _ in range(400)]
        while True:  # shorten until the rendered prompt is about prompt_tokens long
            msgs = keychain.chat(" ".join(words) + "?")
            n = len(tok(keychain.render_prompt(tok, msgs), add_special_tokens=False)["input_ids"])
            if n <= cfg.prompt_tokens:
                break
            words = words[:-max(1, (n - cfg.prompt_tokens) // 2)]
        rows.append({"id": f"p{i}", "source": "bench", "messages": msgs, "answers": ["x"], "num_tokens": n,
                     "text": keychain.render_prompt(tok, msgs)})
    keychain.write_rows(d / "rows.jsonl", rows)


def run_ours(cfg: Config, d: Path) -> dict:
    import grpo

    out = d / f"ours-{time.time_ns()}"
    gcfg = grpo.Config(data=str(d / "rows.jsonl"), model=str(d / "model"), out_dir=str(out), engine="hf",
                       steps=cfg.steps, batch_prompts=cfg.prompts, group=cfg.group, max_new_tokens=cfg.new_tokens,
                       max_prompt_tokens=4096, kl_coef=cfg.kl, drop_equal_groups=False, save_every=0,
                       export=False, resume=False, log_samples=0, seed=cfg.seed, device="cpu")
    grpo.train(gcfg, reward_fn=lambda rows, texts: [(r, {}) for r in reward(texts)])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    grpo.finish()
    return {"step_s": [x["t_step"] for x in lines], "gen_s": [x["t_gen"] for x in lines],
            "update_s": [x["t_update"] for x in lines], "update_tok_per_s": [x["update_tok_per_s"] for x in lines],
            "completion_len": [x["response_len"] for x in lines]}


def run_trl(cfg: Config, d: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in (d / "rows.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["text"]} for r in rows])  # the same rendered text, not re-templated
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=str(d / "trl-out"), per_device_train_batch_size=cfg.prompts * cfg.group,
                      num_generations=cfg.group, max_completion_length=cfg.new_tokens, num_iterations=1,
                      max_steps=cfg.steps, beta=cfg.kl, learning_rate=1e-6, temperature=1.0, top_p=1.0,
                      use_cpu=True, bf16=False, logging_steps=1, report_to="none", save_strategy="no",
                      gradient_checkpointing=True, seed=cfg.seed, shuffle_dataset=False)
    trainer = GRPOTrainer(model=str(d / "model"), reward_funcs=lambda completions, **kw: reward(completions),
                          args=args, train_dataset=data, callbacks=[Clock()])
    trainer.train()
    lens = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    return {"step_s": times, "completion_len": lens}


def main(argv: list[str]) -> None:
    cfg = keychain.parse_config(Config, argv, __doc__)
    if cfg.side:
        d = Path(cfg.workdir)
        res = run_ours(cfg, d) if cfg.side == "ours" else run_trl(cfg, d)
        print("RESULT " + json.dumps(res))
        return
    import importlib.util

    sides = ["ours"] + (["trl"] if cfg.trl and importlib.util.find_spec("trl") else [])
    if cfg.trl and "trl" not in sides:
        print("trl is not importable: only our side runs (pip install trl)")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prepare(cfg, d)
        n_tok = [r["num_tokens"] for r in keychain.read_rows(str(d / "rows.jsonl"))]
        print(f"{cfg.prompts} prompts of {min(n_tok)}-{max(n_tok)} tokens x G={cfg.group}, {cfg.new_tokens} new "
              f"tokens, {cfg.steps} steps, hidden {cfg.hidden}, {cfg.layers} layers, vocab "
              f"{json.loads((d / 'model' / 'config.json').read_text())['vocab_size']}")
        res: dict = {s: [] for s in sides}
        for r in range(cfg.rounds):
            for side in sides:
                args = [f"--{k}={getattr(cfg, k)}" for k in Config.__dataclass_fields__ if k not in ("side", "workdir")]
                env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
                load = os.getloadavg()[0]
                p = subprocess.run([sys.executable, __file__, *args, f"--side={side}", f"--workdir={d}"],
                                   capture_output=True, text=True, env=env, cwd=ROOT)
                if p.returncode:
                    sys.exit(f"bench_step.py: {side} failed:\n{p.stderr[-3000:]}")
                out = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
                out["load_before"] = round(load, 2)
                res[side].append(out)
                print(f"round {r} {side}: " + json.dumps(out), flush=True)
    med = {s: statistics.median(t for o in res[s] for t in o["step_s"]) for s in sides}
    ours = res["ours"]
    print(f"ours: {med['ours']:.1f} s/step (generation {statistics.median(t for o in ours for t in o['gen_s']):.1f} s, "
          f"update {statistics.median(t for o in ours for t in o['update_s']):.1f} s, "
          f"{statistics.median(t for o in ours for t in o['update_tok_per_s']):.0f} update tokens/s)")
    if "trl" in med:
        print(f"TRL:  {med['trl']:.1f} s/step;  ours / TRL = {med['ours'] / med['trl']:.2f} (goal <= 0.3)")
    print(f"load average now {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
