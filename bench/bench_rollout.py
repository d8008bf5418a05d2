"""HF-engine generation throughput (rollout.HFEngine) on a random Qwen2.5-0.5B-shaped model.

    .venv/bin/python bench/bench_rollout.py                     # GPU: one 16K-token prompt x G=8, 512 new tokens
    .venv/bin/python bench/bench_rollout.py --prompt_tokens=256 --new_tokens=32 --n=4 --hidden=128 \\
        --intermediate=256 --layers=2 --heads=4 --kv_heads=2 --vocab=4096 --repeats=1   # CPU smoke run

The GRPO shape: each prompt is prefilled once (its KV cache shared by its n samples), then n sequences decode
together. Every sequence runs exactly new_tokens (ignore_eos), so tokens/s compare across runs. Reported:
prefill seconds (a max_new_tokens=1 run), total seconds, generated tokens/s over the whole call, decode
tokens/s after the prefill, and the peak GPU memory. Weights are random: only the speed means something.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keychain import parse_config  # noqa: E402
import rollout  # noqa: E402


@dataclass
class Config:
    prompts: int = 1  # distinct prompts
    prompt_tokens: int = 16384
    new_tokens: int = 512
    n: int = 8  # samples per prompt
    max_batch_seqs: int = 64
    # Qwen2.5-0.5B shape
    vocab: int = 151936
    hidden: int = 896
    intermediate: int = 4864
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    attn: str = "sdpa"  # sdpa | eager | flash_attention_2 (if installed)
    warmup: int = 1  # untimed runs first (kernels, allocator)
    repeats: int = 3  # timed runs; the median is reported
    seed: int = 0
    out: str = ""  # append the result as a JSON line to this file (bench/out/ is ignored by git)


def build_model(cfg: Config, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         max_position_embeddings=max(32768, cfg.prompt_tokens + cfg.new_tokens))
    config._attn_implementation = cfg.attn
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialize straight on the device
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main(argv: list[str]) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    device = rollout.resolve_device(cfg.device)
    dtype = rollout.resolve_dtype(cfg.dtype, device)
    model = build_model(cfg, device, dtype)
    rcfg = rollout.Config(device=str(device), n=cfg.n, temperature=1.0, top_p=1.0, ignore_eos=True,
                          max_prompt_tokens=cfg.prompt_tokens, max_new_tokens=cfg.new_tokens,
                          max_batch_seqs=cfg.max_batch_seqs, hf_copy=False, seed=cfg.seed)
    engine = rollout.HFEngine(rcfg, model, tokenizer=None)  # hf_copy=False: time the model, not a deepcopy
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab, (cfg.prompts, cfg.prompt_tokens), generator=gen).tolist()

    def timed(max_new: int) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens=max_new, seed=cfg.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(c.token_ids) for comps in outs for c in comps)

    for _ in range(cfg.warmup):
        timed(min(cfg.new_tokens, 8))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = median([timed(1)[0] for _ in range(cfg.repeats)])
    runs = [timed(cfg.new_tokens) for _ in range(cfg.repeats)]
    total, tokens = median([t for t, _ in runs]), runs[0][1]
    assert tokens == cfg.prompts * cfg.n * cfg.new_tokens, "ignore_eos: every sequence runs to new_tokens"
    decode_tokens = cfg.prompts * cfg.n * (cfg.new_tokens - 1)
    result = dict(
        bench="rollout_hf", device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or "cpu", torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), prefill_s=round(prefill, 3),
        total_s=round(total, 3), gen_tok_per_s=round(tokens / total, 1),
        decode_tok_per_s=round(decode_tokens / max(total - prefill, 1e-9), 1),
        peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        config=asdict(cfg),
    )
    print(json.dumps(result))
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
