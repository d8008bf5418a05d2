r"""GRPO trainer: one stage of LoongRL training, from a rows file to a trained checkpoint (LoongRL, arXiv 2510.19363:
the GRPO recipe; the authors' verl fork).

    python grpo.py --data=runs/tiny/data/warmup.jsonl --model=tiny --out_dir=runs/grpo-cpu --device=cpu \
        --engine=hf --steps=2 --batch_prompts=4 --group=4 --max_new_tokens=24   # CPU; data from `bash train.sh tiny`
    torchrun --nproc_per_node=8 grpo.py --data=train.jsonl --model=Qwen/Qwen2.5-7B-Instruct --out_dir=runs/s1

One step of `train`'s loop: 1) the next B prompts (sharded over ranks) -> G completions each (rollout.py) ->
rewards (reward.py); 2) group-normalized advantages, equal-reward groups dropped; 3) old / reference log-probs;
4) clipped surrogate + k3 KL on packed sequences, log-probs only at completion positions and in chunks -> AdamW;
5) push weights to the engine, log, checkpoint. FSDP2 (`fully_shard` per decoder layer, then the root) on plain
torch.distributed: NCCL + bf16 + flash-attn on GPU, gloo + fp32 + SDPA on CPU.

Details that matter: each prompt has its own sampling seed, so results do not depend on the world size; the
data position is the step number, saved in checkpoints. Micro-batches fill a token budget (--micro_tokens): with
flash-attn, sequences are packed into one row with position ids restarting per sequence (varlen attention, cost
sum of len^2); with SDPA, sequences of similar length share right-padded rows (a packed row would need a dense
(sum len)^2 mask). With one optimizer step per rollout batch (the paper's setting) the ratio is exactly 1, so the
old log-probs are the detached current ones and their extra pass is skipped. Log-probs exist only at completion
positions: FusedLogpLoss computes them --logit_chunk positions at a time and takes each chunk's gradient at once,
so the [tokens x vocab] logits never exist. Logits are divided by the sampling temperature first. A non-finite
loss or gradient on any rank skips that optimizer step on all ranks; rows over --max_prompt_tokens are left out,
never cut (more than 2% of them stops the run).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import keychain
import reward as rewards
import rollout


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # -- data
    data: str = ""  # rows .jsonl/.parquet from keychain.py
    max_prompt_tokens: int = 16384  # the paper's 16K context; longer rows are left out (over 2% of them: stop)
    batch_prompts: int = 256  # B: prompts per rollout batch, over all ranks
    steps: int = 0  # optimizer-side steps (rollout batches); 0 = epochs x (rows / batch_prompts)
    epochs: int = 1  # passes over the rows when --steps=0, each in its own seeded order
    seed: int = 0  # data order, rollout seeds, mini-batch order and the tiny model's weights
    # -- model
    model: str = "Qwen/Qwen2.5-7B-Instruct"  # HF path or hub id; "tiny" = random tiny Qwen2 (CPU tests, demo)
    tokenizer: str = ""  # empty: the model's own (tiny: the byte tokenizer)
    # -- sampling: the paper's rollouts (arXiv 2510.19363, training setup)
    group: int = 8  # G: completions per prompt
    max_new_tokens: int = 4096  # the paper's output budget; a completion cut at it scores 0 (reward.py)
    temperature: float = 1.0  # the paper's T = 1; the trainer scores logits / T too, like verl and TRL
    top_p: float = 1.0  # no nucleus cut, as in the authors' code (--tis_cap needs 1.0 too)
    # -- reward
    qa_metric: str = "sub_em"  # QA match (reward.py): two-way substring, what the paper's final runs used
    qa_rule: str = "guarded"  # guarded (reward.py's anti-hacking guards) | public (the authors' one-way rule)
    # -- loss: GRPO as in the authors' code
    adv_std: bool = True  # divide by the group std (GRPO); False = Dr.GRPO
    drop_equal_groups: bool = True  # all-equal rewards carry no signal
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low: 0.2 in the authors' code
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high: 0.2 there too (DAPO's clip-higher raises it)
    dual_clip: float = 3.0  # > 1: a token with A < 0 loses at most dual_clip x |A| (verl's clip_ratio_c = 3); 0 = off
    max_log_ratio: float = 20.0  # log(p / p_old) clamped to +-this before exp, as in verl (fp32 exp(89) = inf); 0 = off
    kl_coef: float = 0.001  # k3 KL to the frozen reference, as a loss term (the paper's 0.001); 0 = no reference model
    entropy_coef: float = 0.0  # entropy bonus: 0 in the paper's final runs
    tis_cap: float = 0.0  # > 0: truncated importance weights min(p_train / p_engine, cap) on the surrogate
    # -- optimizer
    lr: float = 1e-6  # the paper's learning rate, constant, no warmup
    weight_decay: float = 0.01  # AdamW's decoupled decay at torch's default
    grad_clip: float = 1.0  # max global gradient norm, as in the authors' code
    mini_batches: int = 1  # optimizer steps per rollout batch
    ppo_epochs: int = 1  # passes over the rollout batch
    # -- memory
    micro_tokens: int = 24576  # packed tokens per micro-batch per rank (a budget, not a count)
    logit_chunk: int = 512  # completion positions whose logits exist at once (CPU: 512 beats naive, 128 is 1.4x it)
    grad_ckpt: bool = True  # non-reentrant activation checkpointing of the decoder layers
    offload: bool = False  # FSDP2 CPU offload of the policy's parameters, gradients and optimizer
    ref_offload: bool = True  # CPU offload of the reference model (GPU)
    grad_sync_last: bool = True  # reduce-scatter once per mini-batch, after its last micro-batch (false: after each)
    # until then each rank holds unsharded fp32 gradients (4 B x parameters: 30 GB at 7B)
    meta_load: bool = True  # with --engine=vllm: build on the meta device, rank 0 loads and broadcasts the shards
    # -- engine and devices
    engine: str = "auto"  # auto (vllm on GPU when installed, else hf) | hf | vllm
    tp: int = 2  # vLLM tensor parallel size (the authors' rollouts: 2-4); must divide the world size
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU (weights + KV cache); the rest is training's
    enforce_eager: bool = False  # vLLM without CUDA graphs or torch.compile: faster start, slower decoding
    device: str = "auto"  # auto (cuda when torch sees a GPU, else cpu) | cpu | cuda
    timeout_hours: float = 3.0  # collective timeout: ranks wait in barriers while rank 0 exports or others generate
    # -- checkpoints and logging
    out_dir: str = "runs/grpo"  # ckpt/, hf/ (the final policy), log.jsonl, mining.jsonl, rollouts/
    save_every: int = 10  # steps between checkpoints (0 = only at the end)
    keep: int = 2  # checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    export: bool = True  # Hugging Face folder of the final policy in out_dir/hf
    log_samples: int = 4  # rollouts per step written to out_dir/rollouts/
    wandb: str = ""  # project name; offline mode without WANDB_API_KEY
    # -- tests
    stop_after: int = 0  # exit after this many steps of this process (a crash after a checkpoint)


# ----------------------------------------------------------------------------- loss pieces (plain functions)
def group_advantages(r: torch.Tensor, use_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """r: [groups, G] rewards -> advantages (r - mean) / (std + eps), or r - mean (Dr.GRPO). G >= 2: one reward
    has no baseline and a NaN std (check_inputs refuses --group=1)."""
    a = r - r.mean(-1, keepdim=True)
    return a / (r.std(-1, keepdim=True) + eps) if use_std else a


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Low-variance KL estimator k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, clamped like the public code."""
    d = (ref - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def policy_loss(logp, old, adv, clip_low, clip_high, is_weight=None, dual_clip: float = 3.0,
                max_log_ratio: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate -min(r A, clip(r) A) and whether the clip was active. Off-policy guards as in
    verl's compute_policy_loss_vanilla (only mini-batches after the first of a rollout batch are off-policy):
    the log-ratio is clamped before exp, and a token with A < 0 loses at most dual_clip x |A| (dual-clip PPO,
    arXiv 1912.09729). Without them one stale token at log-ratio 100 makes the loss inf, and the mini-batch is lost."""
    log_ratio = logp - old
    if max_log_ratio > 0:  # also keeps the gradient finite where the dual clip cuts it (0 x exp(100) is NaN)
        log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:  # A >= 0 is bounded already: the clip holds r A at (1 + clip_high) A
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    if is_weight is not None:
        loss = loss * is_weight
    return loss, (clipped > unclipped).float()


# ----------------------------------------------------------------------------- model
class FusedLogpLoss(torch.autograd.Function):
    """Chunked log-probs fused with a per-token loss. Each chunk's logits live only inside its loop iteration:
    the per-token loss depends on that token's log-prob and entropy alone, so its gradient with respect to
    the chunk's logits, hence to the hidden states and lm_head, is taken right there in forward. Nothing is
    recomputed in backward, which only scales the stored gradients. `temperature`: log-probs and entropies of
    logits / T, the distribution the engine sampled from (verl and TRL divide the logits the same way)."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, loss_fn, temperature=1.0):
        gh = torch.empty_like(h)  # gradients with respect to the hidden states and (fp32) lm_head
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        total = torch.zeros((), device=h.device)
        lps, ents = [], []
        for s in range(0, len(targets), chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            # 1) the chunk's logits, log-probs of its targets and entropies
            z = (hc @ w.T).float()  # two [chunk x vocab] buffers at most: z and e = exp(z) (then dz)
            if temperature != 1.0:
                z /= temperature
            z -= z.amax(-1, keepdim=True)  # softmax by hand: logsumexp would allocate a third buffer
            e = z.exp()  # p = e / Z: never normalized in a pass of its own
            Z = e.sum(-1)
            log_z = Z.log()
            lp = z.gather(-1, tc[:, None])[:, 0] - log_z
            ent = log_z - torch.bmm(e[:, None], z[:, :, None])[:, 0, 0] / Z  # H = log Z - sum(e z) / Z, no temp
            # 2) the per-token loss and its gradient with respect to each log-prob and entropy
            with torch.enable_grad():
                lp_, ent_ = lp.detach().requires_grad_(), ent.detach().requires_grad_()
                loss = loss_fn(lp_, ent_, slice(s, s + len(tc)))
                g_lp, g_ent = torch.autograd.grad(loss, (lp_, ent_), allow_unused=True, materialize_grads=True)
            if temperature != 1.0:  # z above is logits / T: the chain rule divides what reaches the logits by T
                g_lp = g_lp / temperature
                g_ent = g_ent / temperature
            # 3) back to the logits: d logp_t / dz = onehot(t) - p ;  d entropy / dz = -p (log p + entropy); in
            # place on z and e
            if g_ent.any():
                z.add_((ent - log_z)[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None])
                dz = e.mul_(z).mul_(-1 / Z[:, None])
            else:
                dz = e.mul_((-g_lp / Z)[:, None])
            del z
            dz[torch.arange(len(tc), device=dz.device), tc] += g_lp
            # 4) on to the hidden states and lm_head
            gh[s:s + chunk] = (dz.to(w.dtype) @ w).to(h.dtype)
            gw.addmm_(dz.T, hc.float())
            del e, dz  # before the next chunk allocates its own
            total += loss.detach()
            lps.append(lp)
            ents.append(ent)
        ctx.save_for_backward(gh, gw.to(w.dtype))
        lp, ent = torch.cat(lps), torch.cat(ents)
        ctx.mark_non_differentiable(lp, ent)
        return total, lp, ent

    @staticmethod
    def backward(ctx, g_total, _g_lp, _g_ent):
        gh, gw = ctx.saved_tensors
        if not bool(g_total == 1):  # in place: a second [vocab x hidden] buffer is what we avoid
            gh, gw = gh.mul_(g_total), gw.mul_(g_total)
        return gh, gw, None, None, None, None


class Policy(nn.Module):
    """A causal LM whose forward works only at completion positions: it returns the log-probs and entropies
    of given targets, or (with `loss_fn`) a per-token loss summed, through FusedLogpLoss.

    FSDP2 shards this wrapper as the root, so embeddings, final norm and lm_head are gathered once per
    forward, and the [tokens x vocab] logits never exist beyond one chunk of `chunk` positions.
    """

    def __init__(self, lm: nn.Module, chunk: int = 128, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.chunk = chunk  # completion positions whose logits exist at once
        self.temperature = temperature  # the rollouts' sampling temperature: log-probs of logits / T

    def forward(self, input_ids, position_ids, at, targets, attn: dict | None = None, loss_fn: Callable | None = None):
        # attn: flash-attn's varlen arguments for a packed row (packed_inputs), passed on to every attention layer
        h = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **(attn or {})).last_hidden_state
        h = h.flatten(0, 1)[at]  # hidden states that predict the targets (`at`: flat positions)
        w = self.lm.lm_head.weight
        if loss_fn is not None:
            return FusedLogpLoss.apply(h, w, targets, self.chunk, loss_fn, self.temperature)
        lps, ents = [], []
        for s in range(0, len(targets), self.chunk):
            logits = (h[s:s + self.chunk] @ w.T).float()
            if self.temperature != 1.0:
                logits /= self.temperature
            logp_all = logits.log_softmax(-1)
            lps.append(logp_all.gather(-1, targets[s:s + self.chunk, None])[:, 0])
            ents.append(-(logp_all.exp() * logp_all).sum(-1))
        if not lps:
            return h.new_zeros(0, dtype=torch.float32), h.new_zeros(0, dtype=torch.float32)
        return torch.cat(lps), torch.cat(ents)


def naive_logp(lm: nn.Module, input_ids, position_ids, at, targets, attn: dict | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Reference path: full logits over every position, then pick (tests and the benchmark)."""
    logits = lm(input_ids=input_ids, position_ids=position_ids, use_cache=False, **(attn or {})).logits[0].float()
    return (logits / temperature).log_softmax(-1)[at].gather(-1, targets[:, None])[:, 0]


def load_lm(cfg: Config, tok, dtype: torch.dtype = torch.float32, weights: bool = True) -> nn.Module:
    """The model on the CPU: the policy in fp32 (master weights; on GPU FSDP2 computes in bf16).
    weights=False: only its structure (call under `torch.device("meta")`; load_from_rank0 fills it)."""
    if cfg.model == "tiny":
        return rollout.tiny_model(len(tok), cfg.seed).to(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    attn = "flash_attention_2" if gpu and flash_attn_ok(torch.device("cuda", torch.cuda.current_device())) else "sdpa"
    if not weights:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=dtype,
                                                attn_implementation=attn)
    return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn)


_FLASH: dict = {}


def flash_attn_ok(device: torch.device) -> bool:
    """flash-attn only if it imports and runs a tiny varlen call here (a wheel built for another torch or GPU
    fails at import or at the first kernel); otherwise SDPA, with one warning on GPU. False on the CPU."""
    if device.type != "cuda":
        return False
    if device not in _FLASH:
        try:
            from flash_attn import flash_attn_varlen_func

            q = torch.randn(4, 2, 64, device=device, dtype=torch.bfloat16)
            cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)  # two sequences, lengths 1 and 3
            out = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True)
            _FLASH[device] = bool(torch.isfinite(out).all())
        except Exception as e:  # noqa: BLE001 - ImportError, undefined symbols, no kernel for this GPU
            _FLASH[device] = False
            print(f"warning: flash-attn unusable ({type(e).__name__}: {str(e)[:120]}); using SDPA "
                  "(pip install flash-attn --no-build-isolation for long sequences)", file=sys.stderr)
    return _FLASH[device]


def load_from_rank0(policy: nn.Module, cfg: Config, tok, device: torch.device, dtype: torch.dtype,
                    offload: bool) -> None:
    """Fill a Policy built on the meta device and sharded: rank 0 alone reads the weights, every rank receives
    its shards by broadcast, so no rank but 0 ever holds a full copy (7B fp32: 30 GB per rank otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    policy.to_empty(device="cpu" if offload else device)
    lm = policy.lm
    rot = getattr(lm.model, "rotary_emb", None)
    if rot is not None:  # non-persistent buffers (inv_freq) are in no state dict: rebuild them from the config
        lm.model.rotary_emb = type(rot)(config=lm.config).to(device)  # computed on the CPU, then moved
    full = {f"lm.{k}": v for k, v in load_lm(cfg, tok, dtype).state_dict().items()} if dist.get_rank() == 0 else {}
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def save_random_model(out_dir: str, tokenizer: str = "", shape: str = "0.5b", seed: int = 0) -> str:
    """A random Qwen2 of Qwen2.5-0.5B's shape (494M parameters with its 151,936-token vocabulary) saved as a
    Hugging Face folder with a tokenizer (the Qwen2.5 one when given, else the offline byte tokenizer), so the
    GPU smoke preset runs every tool on a real-sized model without the hub."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    tok = keychain.load_tokenizer(tokenizer, tmp_dir=str(out) + ".tok")
    shapes = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2)}
    config = Qwen2Config(vocab_size=max(151936, len(tok)), max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **shapes[shape])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    shutil.rmtree(str(out) + ".tok", ignore_errors=True)
    return str(out)


def engine_kind(engine: str, device: torch.device) -> str:
    """auto: vLLM on a GPU where it is installed, else the HF engine."""
    if engine != "auto":
        return engine
    return "vllm" if device.type == "cuda" and _has("vllm") else "hf"


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def shard(model: Policy, mesh, device: torch.device, offload: bool) -> Policy:
    """FSDP2: each decoder layer is a unit, the wrapper (embeddings, norm, lm_head) is the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict = {"mesh": mesh}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in model.lm.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


# ----------------------------------------------------------------------------- packing
def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `budget` tokens (first-fit decreasing; one over-long
    sequence gets a micro-batch of its own)."""
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, (used, idx) in enumerate(bins):
            if used + lengths[i] <= budget:
                bins[b] = (used + lengths[i], idx + [i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [sorted(idx) for _, idx in bins]


def packed_inputs(seqs: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, dict]:
    """One row of concatenated prompt+completion tokens; positions restart per sequence, so attention stays
    inside each sequence (SDPA: transformers builds the block-diagonal mask from position_ids). The last value
    holds flash-attn's varlen arguments, known here without touching the GPU: given them, every attention layer
    skips working the boundaries out of position_ids again, two host syncs per layer (transformers 5.19
    modeling_flash_attention_utils: _is_packed_sequence, prepare_fa_kwargs_from_position_ids). SDPA ignores them."""
    ids, pos, at, tgt = [], [], [], []
    bounds = [0]  # where each sequence starts in the row, then the row's end
    for s in seqs:
        full = s["prompt"] + s["completion"]
        off = bounds[-1]
        p = len(s["prompt"])
        ids += full
        pos += range(len(full))
        at += range(off + p - 1, off + len(full) - 1)
        tgt += s["completion"]
        bounds.append(off + len(full))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)  # flash-attn's cu_seqlens are int32
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))  # a Python int: no .item() sync per layer
    attn = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return t(ids)[None], t(pos)[None], t(at), t(tgt), attn


def pad_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into padded micro-batches of at most `budget` tokens counting the padding: sorted by
    length, so each batch holds sequences of similar length (one over-long sequence gets a batch of its own)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def padded_inputs(seqs: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, dict]:
    """Rows [b, max_len] of prompt+completion, right-padded: without flash-attn, attention over one packed row
    costs (sum len)^2 (a dense block-diagonal mask), padded rows cost b * max_len^2 and need no mask at all: a
    causal model never looks right, so padding after a sequence cannot change it. Positions run on through
    the padding (a restart would read as packing). `at` indexes the flattened [b * max_len] positions; no varlen
    arguments (the empty dict: packed_inputs' last value)."""
    width = max(len(s["prompt"]) + len(s["completion"]) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    at, tgt = [], []
    for i, s in enumerate(seqs):
        full = s["prompt"] + s["completion"]
        p = len(s["prompt"])
        ids[i, :len(full)] = torch.tensor(full)
        at += range(i * width + p - 1, i * width + len(full) - 1)
        tgt += s["completion"]
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), torch.arange(width, device=device).expand(len(seqs), width), t(at), t(tgt), {}


DUMMY = {"prompt": [0], "completion": [0]}  # keeps a rank's forward count in step with the others


# ----------------------------------------------------------------------------- distributed
def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; a plain `python grpo.py` becomes a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # hours, not NCCL's 10 minutes: ranks wait in barriers while rank 0 exports or others finish generating
        # gloo beside NCCL for CPU tensors (FSDP2 CPU offload gathers and clips shards that live in host memory)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(hours=cfg.timeout_hours))
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(x: float, device: torch.device, op=dist.ReduceOp.SUM) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def all_max(x: float, device: torch.device) -> float:
    return all_sum(x, device, dist.ReduceOp.MAX)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any: the ranks must take the same branch around collectives."""
    return bool(all_max(float(flag), device))


def hash_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes (Python's hash() of str is salted)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 64)
    return h % (1 << 31)


# ----------------------------------------------------------------------------- setup pieces
POSITIVE = ("batch_prompts", "group", "epochs", "max_prompt_tokens", "max_new_tokens", "micro_tokens", "logit_chunk",
            "mini_batches", "ppo_epochs", "keep", "timeout_hours")
NON_NEGATIVE = ("steps", "save_every", "log_samples", "stop_after", "lr", "kl_coef", "grad_clip", "tis_cap",
                "max_log_ratio")


def check_inputs(cfg: Config) -> list[dict]:
    """Settings, the rows file and the model, checked before anything is created; returns the rows.
    Each row needs messages (a chat) and answers (a non-empty list): without answers every reward is 0."""
    # 1) settings
    bad = [f"--{k}={getattr(cfg, k)} must be positive" for k in POSITIVE if not getattr(cfg, k) > 0]
    bad += [f"--{k}={getattr(cfg, k)} must not be negative" for k in NON_NEGATIVE if getattr(cfg, k) < 0]
    # one completion is no group: its std is NaN, and verl's stand-in (mean 0, std 1) trains on the raw reward,
    # a baseline-free REINFORCE that --drop_equal_groups would drop anyway (TRL refuses it too)
    if cfg.group == 1:
        bad.append("--group=1 must be at least 2: GRPO's baseline is the mean reward of the prompt's group")
    if cfg.dual_clip != 0 and cfg.dual_clip <= 1:  # a cap at |A| or below cuts on-policy tokens (verl asserts > 1)
        bad.append(f"--dual_clip={cfg.dual_clip} must be 0 (off) or above 1")
    if cfg.qa_rule not in rewards.QA_RULES or cfg.qa_metric not in rewards.QA_METRICS:
        bad.append(f"--qa_rule={cfg.qa_rule} / --qa_metric={cfg.qa_metric}: one of {rewards.QA_RULES} / {rewards.QA_METRICS}")
    if bad:
        raise SystemExit(f"grpo.py: {bad[0]}")
    # 2) the rows file, record by record
    if not cfg.data:
        raise SystemExit("grpo.py: --data=ROWS.jsonl is required (make rows with keychain.py)")
    if not Path(cfg.data).is_file():
        raise SystemExit(f"grpo.py: --data={cfg.data}: no such file")
    rows = []
    for i, row in keychain.read_records(cfg.data):
        where = f"{cfg.data}: record {i}" + (f" ({row['id']})" if isinstance(row, dict) and "id" in row else "")
        if not isinstance(row, dict):
            raise keychain.DataError(f"{where}: a row must be a JSON object")
        if not (isinstance(row.get("messages"), list) and row["messages"]
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in row["messages"])):
            raise keychain.DataError(f"{where}: 'messages' must be a non-empty list of chat messages")
        if not (isinstance(row.get("answers"), list) and row["answers"]):
            raise keychain.DataError(f"{where}: 'answers' must be a non-empty list (the reward needs a gold answer)")
        rows.append(row)
    # 3) enough rows within the prompt budget for one batch
    fit = sum(r.get("num_tokens", 0) <= cfg.max_prompt_tokens for r in rows)
    if not fit or (not cfg.steps and fit < cfg.batch_prompts):
        raise SystemExit(f"grpo.py: {cfg.data}: {fit} rows within --max_prompt_tokens, fewer than one batch of "
                         f"{cfg.batch_prompts} (give --steps to cycle over them)" if fit else f"grpo.py: {cfg.data}: no rows")
    # 4) the model
    if cfg.model == "tiny" and cfg.engine == "vllm":
        raise SystemExit("grpo.py: --engine=vllm loads the model from a folder, and --model=tiny has none "
                         "(save one with save_pretrained; vLLM's CPU attention needs heads of 32 or more)")
    if cfg.model != "tiny":
        try:  # a local folder or a hub id: its config proves the name before any folder is made
            from transformers import AutoConfig

            AutoConfig.from_pretrained(cfg.model)
        except Exception as e:  # noqa: BLE001 - any failure means we cannot start
            raise SystemExit(f"grpo.py: --model={cfg.model}: cannot load its config ({str(e).splitlines()[0]})") from None
    return rows


def load_models(cfg: Config, tok, kind: str, mesh, device: torch.device) -> tuple[Policy, Policy | None, Any]:
    """The policy (FSDP2, fp32 master weights), the frozen reference (None without KL) and the rollout engine."""
    torch.manual_seed(cfg.seed)
    # 1) the policy's model. vLLM loads its own copy from the path: the trainer can start on the meta device and
    # fill its shards from rank 0 (the HF engine needs a whole copy on every rank anyway)
    meta = cfg.meta_load and kind == "vllm" and cfg.model != "tiny"
    with torch.device("meta") if meta else contextlib.nullcontext():
        lm = load_lm(cfg, tok, weights=not meta)  # CPU, fp32: fully_shard moves each rank's shard to GPU
    if cfg.grad_ckpt:  # non-reentrant: composes with FSDP2's hooks (transformers 5 renamed the method)
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # 2) the engine, before sharding: the HF engine keeps an unsharded copy
    engine = make_engine(cfg, kind, lm, tok, device)
    # 3) the reference: never trained, so on GPU loaded in bf16, without an fp32 copy in host memory
    ref = None
    if cfg.kl_coef > 0:
        gpu = device.type == "cuda"
        ref_off = cfg.ref_offload and gpu
        with torch.device("meta") if meta else contextlib.nullcontext():
            ref = load_lm(cfg, tok, torch.bfloat16, weights=not meta) if gpu or meta else copy.deepcopy(lm)
        ref = ref.requires_grad_(False).eval()
        ref = shard(Policy(ref, cfg.logit_chunk, cfg.temperature), mesh, device, ref_off)
        if meta:
            load_from_rank0(ref, cfg, tok, device, torch.bfloat16, ref_off)
    # 4) the policy, sharded last
    policy = shard(Policy(lm, cfg.logit_chunk, cfg.temperature), mesh, device, cfg.offload)
    if meta:
        load_from_rank0(policy, cfg, tok, device, torch.float32, cfg.offload)
    return policy, ref, engine


def make_engine(cfg: Config, kind: str, lm: nn.Module, tok, device: torch.device):
    """rollout.py's engine with this stage's sampling settings (bf16 on GPU, like the policy's compute)."""
    return rollout.make_engine(engine_config(cfg, kind, device), lm, tok)


def engine_config(cfg: Config, kind: str, device: torch.device) -> rollout.Config:
    # log-probs of the distribution sampled from (logits / T), what the trainer scores: raw ones at the paper's
    # T = 1. vLLM sleeps at level 2 during the update: every wake is a push that rewrites all weights, so level
    # 1's copy of them to pinned host memory and back would be wasted (rollout.VLLMEngine.update_weights)
    return rollout.Config(engine=kind, n=cfg.group, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed, device=str(device), tp=cfg.tp,
                          dtype="bfloat16" if device.type == "cuda" else "float32",
                          gpu_memory_utilization=cfg.gpu_memory_utilization, sleep_level=2,
                          enforce_eager=cfg.enforce_eager, logprobs_mode="processed")


# ----------------------------------------------------------------------------- one step's pieces
def batch_indices(step: int, n: int, batch_prompts: int, seed: int) -> list[int]:
    """Rows of step `step`: a seeded permutation per epoch; step s takes positions [s*B, (s+1)*B) of the stream."""
    B = batch_prompts
    perms = {}
    for epoch in {pos // n for pos in range(step * B, (step + 1) * B)}:
        perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [int(perms[pos // n][pos % n]) for pos in range(step * B, (step + 1) * B)]


def encode(tok, row: dict, max_prompt_tokens: int) -> list[int]:
    ids = tok(keychain.render_prompt(tok, row["messages"]), add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:  # cutting would drop the chat header: the rows must fit
        raise SystemExit(f"row {row.get('id')}: {len(ids)} prompt tokens > --max_prompt_tokens; rebuild the data")
    return ids


def micro_batches(seqs: list[dict], packed: bool, budget: int, device: torch.device) -> list[list[dict]]:
    """Token-budget micro-batches, padded with empty ones so every rank makes the same number of calls."""
    group = pack if packed else pad_groups
    groups = [[seqs[i] for i in idx] for idx in group([len(s["prompt"]) + len(s["completion"]) for s in seqs], budget)]
    n = int(all_max(len(groups), device))
    return groups + [[] for _ in range(n - len(groups))]


def model_inputs(mb: list[dict], packed: bool, device: torch.device) -> tuple:
    return (packed_inputs if packed else padded_inputs)(mb, device)


@torch.no_grad()
def score_logps(model: Policy, seqs: list[dict], key: str, packed: bool, budget: int, device: torch.device) -> None:
    """Each sequence's completion log-probs under `model`, stored as s[key] (key "old": entropies too)."""
    for mb in micro_batches(seqs, packed, budget, device):
        if not mb:  # a dummy micro-batch: this rank has run out, the others still gather parameters
            model(*model_inputs([DUMMY], packed, device))
            continue
        lp, ent = model(*model_inputs(mb, packed, device))
        sizes = [len(s["completion"]) for s in mb]
        for s, a, e in zip(mb, lp.split(sizes), ent.split(sizes)):
            s[key] = a.float().cpu()
            if key == "old":
                s["entropy"] = e.float().cpu()
    # FSDP2 keeps a root's parameters gathered after a no-grad forward; after an earlier backward the next
    # backward would then count the root's gradients (embeddings, norm, lm_head) twice
    model.reshard()


def backward_micro_batch(policy: Policy, mb: list[dict], n_tok: float, stats: dict, cfg: Config, world: int,
                         packed: bool, device: torch.device) -> None:
    """Clipped surrogate + k3 KL (- entropy bonus) of one micro-batch: backward, and its share of the stats.
    `n_tok`: completion tokens of the whole mini-batch over all ranks, the loss being their token mean."""
    if not mb:  # a dummy micro-batch: same collectives, zero gradient
        loss, _, _ = policy(*model_inputs([DUMMY], packed, device), loss_fn=lambda lp, ent, sl: lp.sum() * 0.0)
        loss.backward()
        return
    cat = lambda k: torch.cat([s[k] for s in mb]).to(device)  # noqa: E731
    old = cat("old") if "old" in mb[0] else None  # None: the detached current log-probs (phase 3 of train)
    adv = torch.cat([torch.full((len(s["completion"]),), s["adv"]) for s in mb]).to(device)
    ref = cat("ref") if cfg.kl_coef > 0 else None
    engine_lp = cat("engine_lp") if cfg.tis_cap > 0 else None
    # token mean over the whole mini-batch on all ranks: FSDP averages gradients over ranks, hence * world
    scale = world / n_tok

    def token_loss(lp, ent, sl):
        old_sl = lp.detach() if old is None else old[sl]
        w = None
        if engine_lp is not None:  # trainer vs engine kernels: correct the surrogate with capped importance weights
            w = (old_sl - engine_lp[sl]).exp().clamp(max=cfg.tis_cap)
        loss = policy_loss(lp, old_sl, adv[sl], cfg.clip_low, cfg.clip_high, w, cfg.dual_clip, cfg.max_log_ratio)[0]
        if ref is not None:
            loss = loss + cfg.kl_coef * kl_k3(lp, ref[sl])
        return (loss - cfg.entropy_coef * ent).sum() * scale

    loss, lp, ent = policy(*model_inputs(mb, packed, device), loss_fn=token_loss)
    loss.backward()
    if old is None:
        old = lp
        stats["entropy_sum"] += float(ent.sum())
    stats["loss"] += loss.item() / world
    if ref is not None:
        stats["kl"] += kl_k3(lp, ref).sum().item() / n_tok
    clip = policy_loss(lp, old, adv, cfg.clip_low, cfg.clip_high, None, cfg.dual_clip, cfg.max_log_ratio)[1]
    stats["clip_frac"] += clip.sum().item() / n_tok
    # trainer vs engine log-probs of the sampled tokens before the update (both of logits / T): ~1e-5 in fp32; an
    # engine that missed a push (a resume that did not reach it) is off by whole nats. top_p < 1: not comparable
    gap = (old.detach() - cat("engine_lp")).abs()
    stats["engine_gap_sum"] += gap.sum().item()
    stats["engine_gap_max"] = max(stats["engine_gap_max"], gap.max().item())
    stats["engine_gap_tokens"] += len(gap)
    stats["tokens"] += sum(len(s["prompt"]) + len(s["completion"]) for s in mb)


def push_weights(engine, policy: Policy, device: torch.device) -> None:
    """The policy's weights into the rollout engine (vLLM: wakes its weights first, then its KV cache)."""
    # each shard cast to bf16 before rollout.full_tensor gathers it: half the bytes, and what vLLM holds
    bf16 = device.type == "cuda"
    engine.update_weights((k[len("lm."):], v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v)
                          for k, v in policy.state_dict().items())


# ----------------------------------------------------------------------------- logs
def keychain_names(row: dict, text: str) -> dict:
    """For KeyChain rows: does the completion name the real question, or a distractor question?"""
    if row.get("kind") != "keychain" or not row.get("question"):
        return {}
    t = keychain.norm_q(text)
    return {"names_real": keychain.norm_q(row["question"]) in t,
            "names_distractor": any(keychain.norm_q(q) in t for q in row.get("distractor_questions") or [])}


def answer_form(row: dict, text: str, finish: str | None) -> dict:
    """What a completion learned, apart from being right: "format" (it closed </think>, then a closed \\boxed{},
    and stopped before the token limit) and, for a yes/no question, which of the two it says ("says": yes | no |
    other). A reward that rises while "format" rises learned the format; one that rises while "says" drifts to
    one side learned a yes/no prior, not the answer."""
    k = text.rfind("</think>")
    tail = text[k:] if k >= 0 else ""
    out = {"format": finish != "length" and k >= 0 and any(b is not None for b in rewards.boxes(tail))}
    golds = [str(a).strip().lower() for a in row.get("answers") or []]
    if golds and golds[0] in ("yes", "no"):
        pred = (rewards.extract_answer(text) or "").strip().lower() if out["format"] else ""
        out["says"] = pred if pred in ("yes", "no") else "other"
    return out


def rollout_records(rows: list[dict], outs: list, group_rewards: list[torch.Tensor]) -> list[dict]:
    """One record per completion: what log.jsonl averages and mining.jsonl counts."""
    records = []
    for row, comps, r in zip(rows, outs, group_rewards):
        for j, c in enumerate(comps):
            records.append({"id": row.get("id"), "source": row.get("source", "?"), "kind": row.get("kind", "?"),
                            "reward": float(r[j]), "len": len(c.token_ids), "finish": c.finish_reason,
                            **keychain_names(row, c.text), **answer_form(row, c.text, c.finish_reason)})
    return records


def log_line(step: int, recs: list[dict], dropped: int, groups: int, stats: dict, t_gen: float, t_update: float,
             t_step: float, device: torch.device) -> dict:
    """The step's numbers over all ranks: `recs` holds every rank's records, the rest is this rank's and is summed
    (or maxed) here, so every rank must call it."""
    tot = lambda x: all_sum(x, device)  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    steps = max(stats["steps"], 1)
    line = {"step": step}
    line["reward"] = mean([r["reward"] for r in recs])
    line["accuracy"] = mean([float(r["reward"] >= 1.0) for r in recs])
    line["response_len"] = mean([r["len"] for r in recs])
    line["truncated"] = mean([float(r["finish"] == "length") for r in recs])
    line["dropped_groups"] = int(tot(dropped))
    line["groups"] = int(tot(groups))
    line["loss"] = tot(stats["loss"]) / steps
    line["kl"] = tot(stats["kl"]) / steps
    line["clip_frac"] = tot(stats["clip_frac"]) / steps
    line["optimizer_steps"] = stats["steps"]
    line["entropy"] = tot(stats["entropy_sum"]) / max(tot(stats["entropy_tokens"]), 1)
    line["grad_norm"] = mean(stats["grad_norm"])
    compared = tot(stats["engine_gap_tokens"])  # 0 when every group was dropped: null, not a perfect 0
    line["engine_logp_gap"] = tot(stats["engine_gap_sum"]) / compared if compared else None
    line["engine_logp_gap_max"] = all_max(stats["engine_gap_max"], device) if compared else None
    line["skipped_steps"] = int(all_max(stats["skipped"], device))
    line["t_gen"] = all_max(t_gen, device)
    line["t_update"] = all_max(t_update, device)
    line["update_tok_per_s"] = tot(stats["tokens"]) / max(all_max(t_update, device), 1e-9)
    line["t_step"] = t_step
    for src in sorted({r["source"] for r in recs}):
        line[f"reward/{src}"] = mean([r["reward"] for r in recs if r["source"] == src])
    for kind in sorted({r["kind"] for r in recs}):
        line[f"kind/{kind}"] = mean([r["reward"] for r in recs if r["kind"] == kind])
    line["format"] = mean([float(r.get("format", False)) for r in recs])  # what answer_form says was learned
    yn = [r for r in recs if "says" in r]
    if yn:  # yes/no questions: how often the reply says yes, says no, and is right
        line["yes_no/says_yes"] = mean([float(r["says"] == "yes") for r in yn])
        line["yes_no/says_no"] = mean([float(r["says"] == "no") for r in yn])
        line["yes_no/right"] = mean([r["reward"] for r in yn])
    kc = [r for r in recs if "names_real" in r]
    if kc:
        line["keychain/names_real"] = mean([float(r["names_real"]) for r in kc])
        line["keychain/names_distractor"] = mean([float(r["names_distractor"]) for r in kc])
    return line


def write_logs(out: Path, step: int, line: dict, recs: list[dict], samples: list[dict]) -> None:
    """Rank 0 appends the line to log.jsonl, writes the samples to rollouts/, and appends every item's rewards
    to mining.jsonl (cheap hard mining: no extra sampling pass)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    (out / "rollouts").mkdir(exist_ok=True)
    keychain.write_rows(out / "rollouts" / f"step_{step:06d}.jsonl", samples)
    with open(out / "mining.jsonl", "a") as f:
        for rid in dict.fromkeys(r["id"] for r in recs):
            rs = [r["reward"] for r in recs if r["id"] == rid]
            f.write(json.dumps({"id": rid, "n": len(rs), "k": sum(x >= 1.0 for x in rs), "step": step}) + "\n")


def trim_logs(out: Path, step: int) -> None:
    """Cut the append-only files back to the step training continues from: a crash after the last
    checkpoint logged steps that run again now (log.jsonl would hold [1, 2, 3, 3, 4]), and may have torn the
    last line in half."""
    keep = lambda rec: isinstance(rec, dict) and rec.get("step", 0) <= step  # noqa: E731
    cut = trim_jsonl(out / "log.jsonl", keep) + trim_jsonl(out / "mining.jsonl", keep)
    stale = [p for p in (out / "rollouts").glob("step_*.jsonl") if int(p.stem[len("step_"):]) > step]
    for p in stale:
        p.unlink()
    if cut or stale:
        print(f"{out}: continuing at step {step}: removed {cut} log lines and {len(stale)} rollout "
              "files written after it (or torn by a crash)")


def trim_jsonl(path: Path, keep: Callable[[Any], bool] = lambda rec: True) -> int:
    """Rewrite an append-only .jsonl with only its whole lines whose record passes `keep`; returns the number
    of lines removed. A crash mid-write leaves a torn last line that is not JSON."""
    if not path.exists():
        return 0
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(rec):
            out.append(line + "\n")
    if len(out) < len(lines):
        keychain.atomic_write(path, lambda tmp: tmp.write_text("".join(out), encoding="utf-8"))
    return len(lines) - len(out)


# ----------------------------------------------------------------------------- checkpoints and export
def save_checkpoint(out: Path, step: int, policy: Policy, opt: torch.optim.Optimizer, cfg: Config) -> None:
    """out/ckpt/step_N by torch.distributed.checkpoint (any world size loads it), written to a temporary
    folder and renamed; the newest cfg.keep are kept. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    rank = dist.get_rank()
    final = out / "ckpt" / f"step_{step:06d}"
    if final.exists():
        return
    # 1) a fresh temporary folder (a crash may have left one half written)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    # 2) every rank writes its shards; rank 0 the step, every rank's RNG and the config. An optimizer that has not
    # stepped yet (every step so far skipped or all groups dropped) is left out: get_optimizer_state_dict creates
    # a missing state by an Adam step at lr 0, and that step count of 1 with zero moments would shrink the first
    # real update to 0.74x of what a run without this checkpoint takes
    state = {"model": get_model_state_dict(policy)}
    if opt.state:  # the same on every rank: the ranks step together
        state["optim"] = get_optimizer_state_dict(policy, opt)
    dcp.save(state, checkpoint_id=str(tmp))
    rngs = gather(torch.get_rng_state())  # one file for any world size: every rank's RNG, indexed by rank
    if rank == 0:
        extra = {"step": step, "torch_rng": rngs, "world": dist.get_world_size(), "config": asdict(cfg)}
        torch.save(extra, tmp / "extra.pt")
    dist.barrier()
    # 3) the rename makes it a checkpoint; older ones beyond cfg.keep go
    if rank == 0:
        os.replace(tmp, final)
        done = checkpoints(out)
        for old in done[:max(len(done) - max(cfg.keep, 1), 0)]:
            shutil.rmtree(old)
    dist.barrier()


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a .tmp folder is one a crash interrupted)."""
    return sorted(p for p in (out / "ckpt").glob("step_*") if not p.name.endswith(".tmp"))


def load_checkpoint(path: Path, policy: Policy, opt: torch.optim.Optimizer) -> int:
    """Model, optimizer and this rank's RNG from a checkpoint; returns its step. A checkpoint saved before the
    first optimizer step holds no optimizer state, and `opt` stays as it was built (see save_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    rank = dist.get_rank()
    stepped = any(k.startswith("optim.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = {"model": get_model_state_dict(policy)}
    if stepped:  # the template's values are overwritten by the load
        state["optim"] = get_optimizer_state_dict(policy, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(policy, state["model"])
    if stepped:
        set_optimizer_state_dict(policy, opt, state["optim"])
    # DCP reshards model and optimizer to this world size; step and RNG come from the one extra.pt (older
    # checkpoints: extra_rank{r}.pt). A rank beyond the saving world takes rank r mod that world's RNG.
    if (path / "extra.pt").exists():
        extra = torch.load(path / "extra.pt", weights_only=False)
        rng = extra["torch_rng"][rank % len(extra["torch_rng"])]
    else:
        old = sorted(path.glob("extra_rank*.pt"))
        mine = path / f"extra_rank{rank}.pt"
        extra = torch.load(mine if mine.exists() else old[0], weights_only=False)
        rng = extra["torch_rng"]
    torch.set_rng_state(rng)
    return extra["step"]


def export(policy: Policy, tok, path: Path, device: torch.device) -> None:
    """The policy as a Hugging Face folder (safetensors, config, tokenizer) for from_pretrained and vLLM."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        sd = {k[len("lm."):]: v for k, v in sd.items()}
        if getattr(policy.lm.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # gathered shards are separate copies; the config re-ties them
        if device.type == "cuda":  # the next stage, vLLM and eval load bf16, not fp32 master weights
            sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
            policy.lm.config.dtype = policy.lm.config.torch_dtype = torch.bfloat16
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.lm.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# ----------------------------------------------------------------------------- training
def train(cfg: Config, reward_fn: Callable | None = None) -> dict:
    """One stage: setup, then one loop over steps. Returns the last step's log line ({} when a resumed run had
    no step left). reward_fn(rows, texts) -> [(reward, diagnostics)] replaces reward.py (tests, benchmarks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from tqdm import tqdm

    # -- setup: settings and rows, process group, tokenizer, policy, reference, engine, optimizer, resume
    all_rows = check_inputs(cfg)  # before anything is created: bad input leaves no folder behind
    rank, world, device = init_distributed(cfg)
    if rank:  # one "Loading weights" bar on the console, not one per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if cfg.tis_cap > 0 and cfg.top_p < 1.0:  # the engine's nucleus renormalizes; the trainer's logits / T do not
        raise SystemExit("--tis_cap compares trainer and engine log-probs at top_p 1 only")
    if cfg.batch_prompts % world:
        raise SystemExit(f"--batch_prompts={cfg.batch_prompts} must be a multiple of the world size {world}")
    mesh = init_device_mesh(device.type, (world,))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_name = cfg.tokenizer or ("" if cfg.model == "tiny" else cfg.model)
    if rank == 0:  # the tiny tokenizer is written once, then read by every rank
        keychain.load_tokenizer(tok_name, tmp_dir=str(out / "tiny-tokenizer"))
    dist.barrier()
    tok = keychain.load_tokenizer(tok_name, tmp_dir=str(out / "tiny-tokenizer"))
    rows = [r for r in all_rows if r.get("num_tokens", 0) <= cfg.max_prompt_tokens]
    left_out = len(all_rows) - len(rows)  # long KeyChain rows must not vanish silently: count, print, fail
    if left_out and rank == 0:
        print(f"{cfg.data}: {left_out} of {len(all_rows)} rows over --max_prompt_tokens={cfg.max_prompt_tokens} "
              "left out")
    if left_out > 0.02 * len(all_rows):
        raise SystemExit(f"{cfg.data}: {left_out} of {len(all_rows)} rows (over 2%) exceed --max_prompt_tokens="
                         f"{cfg.max_prompt_tokens}; raise it or rebuild the data")
    reward_cfg = rewards.Config(qa_metric=cfg.qa_metric, qa_rule=cfg.qa_rule)
    # (rows, texts, finish reasons) -> [(reward, diag)]; a reward_fn given here reads rows and texts only
    if reward_fn:
        score = lambda rows, texts, finish: reward_fn(rows, texts)  # noqa: E731
    else:
        score = lambda rows, texts, finish: rewards.score_batch(rows, texts, reward_cfg, finish=finish)  # noqa: E731
    policy, ref, engine = load_models(cfg, tok, engine_kind(cfg.engine, device), mesh, device)
    # flash-attn varlen: one packed row per micro-batch; SDPA: length-grouped padded rows (see padded_inputs)
    packed = getattr(policy.lm.config, "_attn_implementation", None) == "flash_attention_2"
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps or cfg.epochs * (len(rows) // cfg.batch_prompts)  # >= 1: check_inputs saw a batch fit
    start = 0
    found = checkpoints(out) if cfg.resume else []
    if found:
        start = load_checkpoint(found[-1], policy, opt)  # model, optimizer, step, RNG, resharded to this world
        push_weights(engine, policy, device)  # the engine still holds the weights it was built with
        if rank == 0:
            print(f"resumed from {found[-1]} at step {start}")
    if rank == 0:
        trim_logs(out, start)  # a crash after the last checkpoint logged steps that run again now
    wb = None
    if cfg.wandb and rank == 0:
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        wb = wandb.init(project=cfg.wandb, dir=str(out), config=asdict(cfg), mode=mode)
    bar = tqdm(total=total, initial=start, desc=f"grpo {out.name}", disable=rank != 0, dynamic_ncols=True)
    G = cfg.group
    done = start  # steps finished
    last: dict = {}
    for step in range(start, total):
        t0 = time.time()

        # 1) rollouts: this rank's share of the step's B prompts, G completions each, and their rewards
        glob = batch_indices(step, len(rows), cfg.batch_prompts, cfg.seed)
        mine = list(range(rank, len(glob), world))  # positions in the global batch
        batch = [rows[glob[p]] for p in mine]
        prompts = [encode(tok, row, cfg.max_prompt_tokens) for row in batch]
        t1 = time.time()
        # one seed per prompt: the same prompt samples the same completions whatever the world size
        seeds = [hash_seed(cfg.seed, step, p) for p in mine]
        outs = engine.generate(prompts, n=G, seed=seeds)
        t_gen = time.time() - t1
        texts = [c.text for comps in outs for c in comps]
        reasons = [c.finish_reason for comps in outs for c in comps]  # "length" (cut): reward 0 in reward.py
        scored = score([row for row in batch for _ in range(G)], texts, reasons)
        group_rewards = [torch.tensor([float(s[0]) for s in scored[i * G:(i + 1) * G]]) for i in range(len(batch))]

        # 2) group advantages; a group whose G rewards are all equal carries no signal (dropped unless told not to)
        seqs: list[dict] = []  # what the update trains on: the completions of groups with a signal
        dropped = 0
        for prompt, comps, r in zip(prompts, outs, group_rewards):
            adv = group_advantages(r[None], cfg.adv_std)[0]
            equal = bool((r == r[0]).all())
            dropped += equal
            if equal and cfg.drop_equal_groups:
                continue
            for c, a in zip(comps, adv):
                if c.token_ids:  # an empty completion has no token to train on
                    seqs.append({"prompt": prompt, "completion": list(c.token_ids), "adv": float(a),
                                 "engine_lp": torch.tensor(c.logprobs, dtype=torch.float32)})
        engine.sleep()  # vLLM hands the GPU to the update (KV cache freed); HF: its copy to the CPU
        t2 = time.time()

        # 3) old and reference log-probs, no gradient. One optimizer step per batch (mini_batches = ppo_epochs
        # = 1): the old policy is the current one, so the ratio is exactly 1 and the detached current log-probs
        # serve as old ones, without this forward (TRL does the same with one iteration per generation)
        # score_logps: dummy micro-batches keep the ranks in step, and it reshards after its no-grad forward
        policy.train()
        if cfg.mini_batches > 1 or cfg.ppo_epochs > 1:
            score_logps(policy, seqs, "old", packed, cfg.micro_tokens, device)
        if ref is not None:
            score_logps(ref, seqs, "ref", packed, cfg.micro_tokens, device)

        # 4) clipped surrogate + k3 KL: ppo_epochs passes over the batch, one optimizer step per mini-batch
        stats = {
            # loss, kl, clip_frac: sums over the applied mini-batches only (log: over ranks, / steps)
            "loss": 0.0,  # this rank's share of each mini-batch's token-mean loss, summed
            "kl": 0.0,  # this rank's share of each mini-batch's mean k3 per completion token, summed likewise
            "clip_frac": 0.0,  # this rank's share of the tokens whose ratio the clip held, summed likewise
            "tokens": 0.0,  # prompt + completion tokens through the update, for tokens/s
            "grad_norm": [],  # before clipping, one per optimizer step taken
            "skipped": 0,  # mini-batches whose loss or gradient norm was not finite
            "steps": 0,  # optimizer steps taken
            # entropy per completion token: from the old-log-prob pass when there was one, else added in phase 4
            "entropy_sum": sum(float(s["entropy"].sum()) for s in seqs if "entropy" in s),
            "entropy_tokens": sum(len(s["completion"]) for s in seqs),
            "engine_gap_sum": 0.0,  # |trainer - engine| log-prob per sampled token, summed (log: the mean)
            "engine_gap_max": 0.0,  # and its largest value
            "engine_gap_tokens": 0,  # tokens compared
        }
        for _ in range(cfg.ppo_epochs):
            order = seqs[:]
            random.Random(hash_seed(cfg.seed, step, rank)).shuffle(order)
            for m in range(cfg.mini_batches):
                mini = order[m::cfg.mini_batches]
                n_tok = all_sum(sum(len(s["completion"]) for s in mini), device)
                if n_tok == 0:
                    continue
                opt.zero_grad(set_to_none=True)
                before = {k: stats[k] for k in ("loss", "kl", "clip_frac")}  # a skipped mini-batch is not logged
                mbs = micro_batches(mini, packed, cfg.micro_tokens, device)  # the same count on every rank
                for i, mb in enumerate(mbs):
                    # gradients accumulate unsharded; one reduce-scatter after the mini-batch's last micro-batch
                    policy.set_requires_gradient_sync(not cfg.grad_sync_last or i == len(mbs) - 1)
                    backward_micro_batch(policy, mb, n_tok, stats, cfg, world, packed, device)
                norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                # one decision for all ranks, per mini-batch: a NaN/inf never reaches the weights
                bad = not (math.isfinite(norm) and math.isfinite(stats["loss"] - before["loss"]))
                if any_rank(bad, device):
                    stats["skipped"] += 1
                    stats.update(before)  # log_line divides by the steps taken: the sums hold only those
                else:
                    opt.step()
                    stats["grad_norm"].append(norm)
                    stats["steps"] += 1
                opt.zero_grad(set_to_none=True)  # free the gradients before the push and the next rollout

        # 5) push weights, log, checkpoint
        # the push wakes vLLM in the safe order (weights, push, KV cache, prefix reset); HF: copy, then move
        push_weights(engine, policy, device)
        engine.wake()
        t_update = time.time() - t2
        done = step + 1
        records = rollout_records(batch, outs, group_rewards)
        samples = [{"step": done, "id": row.get("id"), "answers": row.get("answers"), "response": outs[i][0].text,
                    "reward": float(group_rewards[i][0])} for i, row in enumerate(batch[:cfg.log_samples])]
        t_step = time.time() - t0
        records = [r for part in gather(records) for r in part]  # every rank's
        samples = [s for part in gather(samples) for s in part]
        last = log_line(done, records, dropped, len(batch), stats, t_gen, t_update, t_step, device)
        if rank == 0:
            write_logs(out, done, last, records, samples)
            if wb:
                wb.log(last, step=done)
        bar.update(1)
        bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            save_checkpoint(out, done, policy, opt, cfg)  # via a .tmp folder: a crash mid-save spoils nothing
        if cfg.stop_after and done - start >= cfg.stop_after:  # tests: stop as a crash would (no final save)
            return last
    bar.close()
    save_checkpoint(out, done, policy, opt, cfg)
    if cfg.export:
        export(policy, tok, out / "hf", device)
    if wb:
        wb.finish()
    return last


def main(argv: list[str]) -> int:
    cfg = keychain.parse_config(Config, argv, __doc__)
    last = train(cfg)
    if dist.get_rank() == 0 and last:  # one line; every number is in out_dir/log.jsonl
        print(f"{cfg.out_dir}: step {last['step']}, reward {last['reward']:.3f}, optimizer steps this step "
              f"{last['optimizer_steps']}, dropped groups {last['dropped_groups']}/{last['groups']}")
    finish()
    return 0


def finish() -> None:
    """End the process group. Tearing gloo down after FSDP2 has been seen to abort a finished run now and
    then, so on gloo the process leaves without teardown once every rank is past the last barrier."""
    dist.barrier()
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        rewards.close_pool()  # os._exit skips its exit handler: the scoring workers would outlive the run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(keychain.cli(main))
