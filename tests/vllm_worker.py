"""Drives the real vLLM engine for tests/test_vllm.py, in its own process (vLLM initializes torch.distributed,
fixes torch's thread count and keeps its memory until the process ends).

    python tests/vllm_worker.py engine DIR                                  # one process: DIR/engine.json
    python -m torch.distributed.run --nproc_per_node=2 tests/vllm_worker.py ranks DIR TP   # DIR/ranks{TP}.{rank}.json

DIR holds the tokenizer (tok/) and the models the test saved (see `vllm_tiny`). The worker only generates and
pushes; the test computes every reference log-prob itself, with grpo.py's own code.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rollout  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103], [200, 201, 202, 203, 204, 205, 206, 207, 208]]
SEEDS = [10, 20, 30, 40]  # one per prompt, as the trainer gives them
# two 300-token prompts: each fills two 128-token KV blocks (the CPU backend's block size), and both do not fit
# in one 528-token scheduler step
LONG = [[(k * i) % 200 + 30 for i in range(300)] for k in (7, 11)]
KW = dict(n=4, max_new_tokens=16, stop_token_ids=list(range(8)))  # some samples stop early, some run to 16
# fp32 on any platform (auto would be bf16 on CUDA); on the CPU the memory share is unused (explicit KV cache)
ENGINE = dict(engine="vllm", dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)


def vllm_tiny(vocab: int, seed: int, tied: bool = True, **overrides):
    """A tiny Qwen2 that vLLM's CPU attention takes (head size 64; it has no kernel for 16) with a wide init,
    so that distributions are peaked enough for log-prob comparisons to mean something."""
    return rollout.tiny_model(vocab, seed, hidden_size=256, intermediate_size=512, initializer_range=0.2,
                              tie_word_embeddings=tied, **overrides)


def dump(outs) -> list[list[dict]]:
    return [[{"tokens": c.token_ids, "logprobs": c.logprobs, "finish": c.finish_reason} for c in comps]
            for comps in outs]


def weights(path: Path):
    """A saved model's tensors under HF names, as grpo.push_weights streams them (tied: both names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").state_dict().items()


def engine_checks(d: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "tok"))
    out: dict = {}
    # 1) tied embeddings, sleep mode asked for as by default (the CPU build has none)
    # the trainer's log-prob mode: the distribution sampled from (at T = 1 the raw one)
    cfg = rollout.Config(**ENGINE, tp=1, max_prompt_tokens=512, max_new_tokens=16, max_num_batched_tokens=528,
                         logprobs_mode="processed")
    engine = rollout.make_engine(cfg, str(d / "a"), tok)
    model_config = engine.llm.llm_engine.vllm_config.model_config
    out["sleep_mode"] = engine.sleep_mode
    out["engine_config"] = {"enforce_eager": model_config.enforce_eager, "dtype": str(model_config.dtype)}
    out["first"] = dump(engine.generate(PROMPTS, seed=SEEDS, **KW))
    out["again"] = dump(engine.generate(PROMPTS, seed=SEEDS, **KW))
    # the same prompts with the same seeds in other company and order
    out["reordered"] = dump(engine.generate([PROMPTS[2], LONG[0], PROMPTS[0]], seed=[SEEDS[2], 77, SEEDS[0]], **KW))
    out["alone"] = dump(engine.generate([PROMPTS[3]], seed=[SEEDS[3]], **KW))
    out["cool"] = dump(engine.generate(PROMPTS, seed=SEEDS, temperature=0.7, **KW))  # grpo scores logits / 0.7
    # seeded samples of two 300-token prompts with a 528-token step budget: the second prefill does not fit
    # beside the first; split, it would crash the CPU build (rollout.VLLMEngine.__init__)
    out["long_before"] = dump(engine.generate(LONG, seed=[77, 78], **KW))
    engine.sleep()  # no sleep mode: both are no-ops and the engine stays usable
    engine.wake()
    # 2) push other weights: the prompts' cached prefixes were computed by the old ones
    out["pushed_tied"] = engine.update_weights(weights(d / "b"))
    out["long_after"] = dump(engine.generate(LONG, seed=[77, 78], **KW))
    out["after"] = dump(engine.generate(PROMPTS, seed=SEEDS, **KW))
    del engine
    gc.collect()
    # 3) untied embeddings in the 7b evaluation's YaRN window: a 32,768-position model, factor 4, 36,864 tokens
    cfg = rollout.Config(**ENGINE, tp=1, rope_yarn_factor=4.0, max_prompt_tokens=36864 - 16, max_new_tokens=16,
                         enable_sleep_mode=False)
    engine = rollout.make_engine(cfg, str(d / "ua"), tok)
    model_config = engine.llm.llm_engine.vllm_config.model_config
    hf = model_config.hf_config
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    out["yarn"] = {"max_model_len": model_config.max_model_len, "max_position_embeddings": hf.max_position_embeddings,
                   "rope_type": rope["rope_type"], "factor": rope["factor"],
                   "original": rope["original_max_position_embeddings"]}
    out["yarn_before"] = dump(engine.generate(PROMPTS, seed=SEEDS, **KW))
    out["pushed_untied"] = engine.update_weights(weights(d / "ub"))
    out["yarn_after"] = dump(engine.generate(PROMPTS, seed=SEEDS, **KW))
    return out


def rank_checks(d: Path, tp: int) -> None:
    """Each rank generates its share of the prompts (rank r: prompts r, r+2) with the prompts' own seeds."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(str(d / "tok"))
    cfg = rollout.Config(**ENGINE, tp=tp, max_prompt_tokens=512, max_new_tokens=16, enable_sleep_mode=False)
    engine = rollout.make_engine(cfg, str(d / "a"), tok)
    outs = engine.generate(PROMPTS[rank::2], seed=SEEDS[rank::2], **KW)
    (d / f"ranks{tp}.{rank}.json").write_text(json.dumps(dump(outs)))
    dist.barrier()
    # a normal exit: with tp > 1 the CPU build's shared-memory segments (/dev/shm/*cpushm*) are removed only then,
    # and under external_launcher their names do not change from run to run: one left behind fails the next run
    del engine
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "engine":
        (where / "engine.json").write_text(json.dumps(engine_checks(where)))
        sys.stdout.flush()
        os._exit(0)  # one process, no shared memory: vLLM's teardown at exit adds seconds and nothing else
    rank_checks(where, int(sys.argv[3]))
