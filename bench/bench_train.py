"""Update throughput: phase 4 of grpo.train, the update (FSDP2, packing, fused chunked log-probs, GRPO loss, AdamW) on
random sequences, with update tokens/s, MFU and peak memory beside the README's memory estimate.

    python bench/bench_train.py                          # GPU: random Qwen2 of Qwen2.5-0.5B's shape, bf16, 16K packing
    torchrun --nproc_per_node=8 bench/bench_train.py --model=Qwen/Qwen2.5-7B-Instruct --micro_tokens=24576
    python bench/bench_train.py --model=tiny --prompt=200 --completion=56 --seqs=8 --micro_tokens=1024   # CPU check

MFU = 6 x N x tokens / time / peak, N = parameters (embeddings included), peak = the GPU's dense bf16 FLOP/s
(H100/H200 989e12, A100 312e12, MI300X 1307e12); the 6N rule counts no attention FLOPs and no recomputation,
so MFU here understates the hardware's work (activation checkpointing adds a forward: 8N per token).
"""
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import keychain  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "MI300X": 1307e12}


@dataclass
class Config:
    model: str = "random-0.5b"  # random-0.5b (Qwen2.5-0.5B's shape, built here) | tiny | HF path
    prompt: int = 3072  # tokens per sequence: prompt + completion (log-probs and loss on the completion)
    completion: int = 1024
    seqs: int = 12  # sequences per rank per step
    micro_tokens: int = 16384
    steps: int = 3  # timed steps, after one warm-up step
    grad_ckpt: bool = True
    device: str = "auto"
    seed: int = 0


def peak_flops(name: str) -> float:
    """Dense bf16 FLOP/s by GPU name (0: unknown, MFU not given)."""
    return next((v for k, v in PEAK_BF16.items() if k in name.upper().replace(" ", "")), 0.0)


def memory_estimate(c, n: int, tokens: int, world: int) -> dict[str, float]:
    """The README's memory table for a model of this shape with n parameters, in GB per GPU."""
    L, h, inter, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    layer = (n - V * h * (1 if c.tie_word_embeddings else 2)) / L
    root = V * h * (1 if c.tie_word_embeddings else 2)
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    rows = {"fp32 parameters + gradients + AdamW, sharded": n * 16 / world,
            "gathered bf16 parameters (root + 2 layers)": (root + 2 * layer) * 2,
            "checkpointed layer inputs": L * tokens * h * 2,
            "one layer recomputed (MLP gate/up/act/product, attention q/k/v/out, norms)":
                (4 * tokens * inter + tokens * (3 * h + 2 * kv) + 2 * tokens * h) * 2,
            "fused log-probs (2 logits chunks, fp32 lm_head gradient + its bf16 copy)": 2 * 128 * V * 4 + V * h * 6,
            "unsharded gradients kept to the last micro-batch (fp32) + bf16 root and layer in flight":
                n * 4 + (root + layer) * 2}
    return {k: v / 1e9 for k, v in rows.items()}


def main(argv: list[str]) -> dict:
    cfg = keychain.parse_config(Config, argv, __doc__)
    gcfg = grpo.Config(model=cfg.model, device=cfg.device, seed=cfg.seed, micro_tokens=cfg.micro_tokens)
    rank, world, device = grpo.init_distributed(gcfg)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    tok = None if cfg.model == "random-0.5b" else keychain.load_tokenizer(
        "" if cfg.model == "tiny" else cfg.model, tmp_dir=f"/tmp/bench_train_tok_{os.getpid()}")
    torch.manual_seed(cfg.seed)
    if cfg.model == "random-0.5b":  # the gpu1 preset's model, without writing it to disk
        from transformers import Qwen2Config, Qwen2ForCausalLM

        c = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                        tie_word_embeddings=True)
        c._attn_implementation = "flash_attention_2" if grpo.flash_attn_ok(device) else "sdpa"
        lm = Qwen2ForCausalLM(c)
    else:
        lm = grpo.load_lm(gcfg, tok)
    if cfg.grad_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in lm.parameters())
    policy = grpo.shard(grpo.Policy(lm), mesh, device, False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(cfg.seed + rank)
    vocab = min(lm.config.vocab_size, 151643)
    seqs = [{"prompt": torch.randint(0, vocab, (cfg.prompt,), generator=g).tolist(),
             "completion": torch.randint(0, vocab, (cfg.completion,), generator=g).tolist()} for _ in range(cfg.seqs)]
    groups = [[seqs[i] for i in idx] for idx in grpo.pack([cfg.prompt + cfg.completion] * cfg.seqs, cfg.micro_tokens)]
    n_tok = float(cfg.seqs * cfg.completion * world)

    def step():
        opt.zero_grad(set_to_none=True)
        for i, mb in enumerate(groups):
            policy.set_requires_gradient_sync(i == len(groups) - 1)
            adv = torch.randn(sum(len(s["completion"]) for s in mb), generator=g).to(device)
            loss_fn = lambda lp, ent, sl: grpo.policy_loss(lp, lp.detach(), adv[sl], 0.2, 0.2)[0].sum() * world / n_tok  # noqa: E731, B023
            loss, _, _ = policy(*grpo.packed_inputs(mb, device), loss_fn=loss_fn)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()

    cuda = device.type == "cuda"
    step()  # warm-up: allocator, kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / cfg.steps
    tokens = cfg.seqs * (cfg.prompt + cfg.completion)  # per rank per step
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = peak_flops(name) if cuda else 0.0
    tps = tokens / dt
    mfu = 6 * n_params * tps / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out = {"device": name, "world": world, "params": n_params, "micro_batches": len(groups),
           "tokens_per_step_per_rank": tokens, "step_s": round(dt, 3), "update_tok_per_s_per_rank": round(tps, 1),
           "mfu": None if mfu is None else round(mfu, 4), "peak_mem_gb": round(mem, 2)}
    if rank == 0:
        print(f"bench_train: {name}, {world} rank(s), {n_params / 1e6:.1f}M parameters, {len(groups)} micro-batches "
              f"of <= {cfg.micro_tokens} tokens, {tokens} tokens per rank per step")
        print(f"update tokens/s per rank: {tps:,.0f}   step: {dt:.2f} s   MFU (6N): "
              + (f"{mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" if mfu is not None else "n/a (no bf16 peak known for this device)"))
        est = memory_estimate(lm.config, n_params, min(cfg.micro_tokens, tokens), world)
        print(f"peak memory: {mem:.2f} GB ({'torch.cuda.max_memory_allocated' if cuda else 'process max RSS'}); "
              f"README table for this shape, {world} GPU(s):")
        for k, v in est.items():
            print(f"  {v:8.2f} GB  {k}")
        print(f"  {sum(est.values()):8.2f} GB  total estimate")
    grpo.finish()
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
