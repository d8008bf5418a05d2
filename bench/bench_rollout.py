"""Generation throughput of the rollout engines (rollout.py) on a random Qwen2 with the full vocabulary.

    .venv/bin/python bench/bench_rollout.py                     # GPU, HF engine: one 16K-token prompt x G=8, 512 new
    .venv/bin/python bench/bench_rollout.py --engine=both --tokenizer=Qwen/Qwen2.5-7B-Instruct --layers=2 \\
        --hidden=128 --intermediate=256 --heads=4 --kv_heads=2 --new_tokens=64 --repeats=1   # CPU: HF, then vLLM
    .venv/bin/python bench/bench_rollout.py --prompt_tokens=256 --new_tokens=32 --n=4 --hidden=128 \\
        --intermediate=256 --layers=2 --heads=4 --kv_heads=2 --vocab=4096 --repeats=1   # CPU smoke run

The GRPO shape: each prompt is prefilled once (its KV cache shared by its n samples), then n sequences decode
together, seeded per prompt as the trainer seeds them. Every sequence runs exactly new_tokens (ignore_eos), so
tokens/s compare across runs and engines. Reported per engine: prefill seconds (a max_new_tokens=1 run), total
seconds, generated tokens/s over the whole call, decode tokens/s after the prefill, the peak GPU memory; with
--engine=both, also vLLM's tokens/s over HF's. Weights are random: only the speed means something.
vLLM loads the model from a folder (written to a temporary one with the tokenizer, which must cover the
vocabulary: --tokenizer); its prefix cache is reset before every timed call, so each call prefills anew, as
the HF engine does.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keychain import parse_config  # noqa: E402
import rollout  # noqa: E402


@dataclass
class Config:
    # -- shape: the GRPO rollout
    prompts: int = 1  # distinct prompts
    prompt_tokens: int = 16384  # the paper's 16K context
    new_tokens: int = 512  # generated per sequence (ignore_eos: exactly this many)
    n: int = 8  # samples per prompt (G)
    # -- model: Qwen2.5-0.5B's shape
    vocab: int = 151936  # the full vocabulary: the sampler and lm_head cost what they cost in training
    hidden: int = 896  # hidden size
    intermediate: int = 4864  # MLP width
    layers: int = 24  # decoder layers
    heads: int = 14  # attention heads (vLLM's CPU attention: head size 32, 64, 80, 96, ...)
    kv_heads: int = 2  # key/value heads (GQA)
    rope_theta: float = 1_000_000.0  # Qwen2.5's
    # -- engine
    engine: str = "hf"  # hf | vllm | both (one run: HF, then vLLM on the same weights, and the ratio)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda (the HF engine; vLLM takes its platform's)
    attn: str = "sdpa"  # HF attention: sdpa | eager | flash_attention_2 (if installed)
    max_batch_seqs: int = 64  # HF: sequences decoded together
    tokenizer: str = ""  # vLLM: a tokenizer covering the vocabulary (e.g. the offline Qwen2.5 one)
    enforce_eager: bool = False  # vLLM: no CUDA graphs or torch.compile (the trainer's default is to compile)
    gpu_memory_utilization: float = 0.5  # vLLM on GPU: the trainer's share
    # -- timing
    warmup: int = 1  # untimed runs first (kernels, allocator, vLLM's compile)
    repeats: int = 3  # timed runs; the median is reported
    seed: int = 0  # weights, prompt and sampling
    out: str = ""  # append the results as JSON lines to this file (bench/out/ is ignored by git)


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


def measure(cfg: Config, engine, prompts: list[list[int]], cuda: bool, reset=None) -> dict:
    """Warm-up, then the median prefill (1 new token) and whole-call times of `engine.generate`."""

    def timed(max_new: int) -> tuple[float, int]:
        if reset:
            reset()  # vLLM: drop the prompt's cached KV blocks, so every call prefills
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens=max_new, seed=cfg.seed)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(c.token_ids) for comps in outs for c in comps)

    for _ in range(cfg.warmup):
        timed(min(cfg.new_tokens, 8))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prefill = median([timed(1)[0] for _ in range(cfg.repeats)])
    runs = [timed(cfg.new_tokens) for _ in range(cfg.repeats)]
    total = median([t for t, _ in runs])
    tokens = runs[0][1]
    assert tokens == cfg.prompts * cfg.n * cfg.new_tokens, "ignore_eos: every sequence runs to new_tokens"
    decode_tokens = cfg.prompts * cfg.n * (cfg.new_tokens - 1)
    return dict(prefill_s=round(prefill, 3), total_s=round(total, 3), gen_tok_per_s=round(tokens / total, 1),
                decode_tok_per_s=round(decode_tokens / max(total - prefill, 1e-9), 1),
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def main(argv: list[str]) -> list[dict]:
    cfg = parse_config(Config, argv, __doc__)
    if cfg.engine not in ("hf", "vllm", "both"):
        raise SystemExit(f"--engine={cfg.engine!r}: hf | vllm | both")
    if cfg.engine != "hf" and not cfg.tokenizer:
        raise SystemExit("--engine=vllm needs --tokenizer=PATH covering the vocabulary (vLLM detokenizes every "
                         "sample), e.g. the offline Qwen2.5 tokenizer")
    device = rollout.resolve_device(cfg.device)
    dtype = rollout.resolve_dtype(cfg.dtype, device)
    model = build_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab, (cfg.prompts, cfg.prompt_tokens), generator=gen).tolist()
    common = dict(n=cfg.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_prompt_tokens=cfg.prompt_tokens,
                  max_new_tokens=cfg.new_tokens, seed=cfg.seed)
    base = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), config=asdict(cfg))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.engine != "hf":  # vLLM loads from a folder: the same weights, written before the HF run
            from transformers import AutoTokenizer

            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(cfg.tokenizer).save_pretrained(tmp)
        # 1) the HF engine generates with the model itself (hf_copy=False: time the model, not a deepcopy)
        if cfg.engine in ("hf", "both"):
            engine = rollout.HFEngine(rollout.Config(**common, device=str(device), max_batch_seqs=cfg.max_batch_seqs,
                                                     hf_copy=False), model, tokenizer=None)
            results.append({"bench": "rollout_hf", **base, **measure(cfg, engine, prompts, device.type == "cuda")})
            print(json.dumps(results[-1]), flush=True)
            del engine
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # 2) vLLM, in this process, as the trainer runs it (external_launcher, tp=1, no sleep mode)
        if cfg.engine in ("vllm", "both"):
            import vllm

            rcfg = rollout.Config(**common, engine="vllm", tp=1, dtype=base["dtype"], enforce_eager=cfg.enforce_eager,
                                  enable_sleep_mode=False, gpu_memory_utilization=cfg.gpu_memory_utilization)
            engine = rollout.VLLMEngine(rcfg, tmp, tokenizer=None)
            cuda = torch.cuda.is_available()
            stats = measure(cfg, engine, prompts, cuda, reset=engine.llm.reset_prefix_cache)
            results.append({"bench": "rollout_vllm", **base, "vllm": vllm.__version__, **stats})
            print(json.dumps(results[-1]), flush=True)
    if len(results) == 2:
        hf, vl = (r["gen_tok_per_s"] for r in results)
        print(f"generated tokens/s: vLLM {vl} / HF {hf} = {vl / hf:.2f}x "
              f"(prefill {results[1]['prefill_s']} s vs {results[0]['prefill_s']} s)")
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
