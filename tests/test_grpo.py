import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import keychain as kc
import rollout

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "grpo_worker.py"


# ----------------------------------------------------------------------------- loss pieces, by hand
def test_group_advantages_exact():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = grpo.group_advantages(r)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))
    assert torch.allclose(grpo.group_advantages(r, use_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_kl_k3_exact():
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    k = grpo.kl_k3(logp, ref)
    assert torch.allclose(k, torch.tensor([0.5 + math.log(2) - 1, 0.0]), atol=1e-7)
    assert grpo.kl_k3(torch.tensor([0.0]), torch.tensor([-100.0])).item() == 10.0  # clamped like the public code


def test_policy_loss_clipping_exact():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = grpo.policy_loss(logp, old, adv, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]
    w = torch.tensor([0.5, 1.0, 2.0, 1.0])
    assert torch.allclose(grpo.policy_loss(logp, old, adv, 0.2, 0.28, w)[0], torch.tensor([-0.64, 1.5, -1.0, 0.8]))


def test_policy_loss_clamps_the_log_ratio_and_dual_clips_like_verl():
    """Stale tokens (off-policy mini-batches): verl's defaults clamp the log-ratio to +-20 and cap the loss of a
    token with A < 0 at 3 |A|; the loss and its gradient stay finite. Both off: the old inf loss, NaN gradient."""
    log_ratio = torch.tensor([100.0, 100.0, -100.0, -100.0, 1.5, 30.0, 0.1])
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0, -2.0, -0.5, -1.0])
    logp = log_ratio.clone().requires_grad_()
    loss, clipped = grpo.policy_loss(logp, torch.zeros(7), adv, 0.2, 0.2)
    loss.sum().backward()
    e = math.exp
    # A < 0 at ratio e^20 (clamped from e^100) and e^1.5: capped at 3 |A|; A > 0: the usual clip at 1.2
    # A < 0 at ratio e^-20: the clip's 0.8; A > 0 at e^-20: r A itself; an in-range token keeps r |A|
    want = torch.tensor([3.0, -1.2, 0.8, -e(-20), 6.0, 1.5, e(0.1)])
    assert torch.allclose(loss.detach(), want, rtol=1e-6, atol=0)
    assert clipped.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # only the in-range token moves: the capped, clipped and clamped ones have zero gradient, not NaN
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, e(0.1)]), rtol=1e-6, atol=0)
    for dual_clip, clamp in ((0.0, 0.0), (3.0, 0.0)):  # no clamp: exp(100) = inf in fp32, and 0 x inf = NaN
        logp.grad = None
        loss, _ = grpo.policy_loss(logp, torch.zeros(7), adv, 0.2, 0.2, dual_clip=dual_clip, max_log_ratio=clamp)
        loss.sum().backward()
        assert loss[0].item() == (math.inf if dual_clip == 0 else 3.0) and logp.grad.isnan().any()
    loss, _ = grpo.policy_loss(logp, torch.zeros(7), adv, 0.2, 0.2, dual_clip=0.0)  # clamp alone: e^20, finite
    assert loss[0].item() == pytest.approx(e(20), rel=1e-6)


def test_pack_respects_the_token_budget():
    lengths = [5, 9, 3, 12, 7, 1, 20]
    bins = grpo.pack(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 12 or len(b) == 1 for b in bins)
    assert [6] in bins and len(bins) == 5  # 20 alone; 12; 9+3; 7+5; 1 fits with the rest


def test_hash_seed_is_stable():
    assert grpo.hash_seed(0, 1, 2) == grpo.hash_seed(0, 1, 2) != grpo.hash_seed(0, 2, 1)
    assert grpo.hash_seed(0, 0, 0) == 982667905  # fixed across processes and Python versions


# ----------------------------------------------------------------------------- log-probs: packed, chunked
@pytest.fixture(scope="module")
def lm(tiny_tok):
    return rollout.tiny_model(len(tiny_tok), seed=0).train()


def seqs_for(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"prompt": torch.randint(0, 250, (5 + 3 * i,), generator=g).tolist(),
             "completion": torch.randint(0, 250, (4 + 2 * i,), generator=g).tolist()} for i in range(n)]


def test_packed_logprobs_equal_unpacked(lm):
    pol = grpo.Policy(lm, chunk=1024)
    seqs = seqs_for()
    packed, _ = pol(*grpo.packed_inputs(seqs, torch.device("cpu")))
    alone = torch.cat([pol(*grpo.packed_inputs([s], torch.device("cpu")))[0] for s in seqs])
    assert packed.shape == (sum(len(s["completion"]) for s in seqs),)
    assert torch.allclose(packed, alone, atol=1e-5)
    # and the naive full-logits path on one unpadded sequence agrees too
    s = seqs[1]
    ids, pos, at, tgt, attn = grpo.packed_inputs([s], torch.device("cpu"))
    assert torch.allclose(grpo.naive_logp(lm, ids, pos, at, tgt), pol(ids, pos, at, tgt, attn)[0], atol=1e-5)
    # SDPA mode: right-padded rows [b, max_len], in any order, give the same log-probs and entropies
    order = [2, 0, 1]
    ids, pos, at, tgt, attn = grpo.padded_inputs([seqs[i] for i in order], torch.device("cpu"))
    assert attn == {}  # no varlen arguments for padded rows
    assert ids.shape == (3, max(len(s["prompt"]) + len(s["completion"]) for s in seqs))
    padded, padded_ent = pol(ids, pos, at, tgt)
    alone_ent = [pol(*grpo.packed_inputs([seqs[i]], torch.device("cpu")))[1] for i in order]
    assert torch.allclose(padded, torch.cat([alone.split([len(s["completion"]) for s in seqs])[i] for i in order]),
                          atol=1e-5)
    assert torch.allclose(padded_ent, torch.cat(alone_ent), atol=1e-5)


def varlen_attention(calls):
    """An attention function for transformers' AttentionInterface that works only from the varlen arguments:
    causal SDPA inside each [cu[i], cu[i+1]) span. Wrong or missing boundaries give wrong log-probs."""
    def attend(module, q, k, v, mask, dropout=0.0, scaling=None, **kw):
        calls.append({key: kw.get(key) for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        cu = kw["cu_seq_lens_q"].tolist()
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: each k/v head serves `groups` query heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scaling) for a, b in zip(cu, cu[1:])], 2)
        return out.transpose(1, 2).contiguous(), None

    return attend


def test_packed_rows_pass_the_varlen_arguments_to_every_attention_layer(tiny_tok):
    from transformers import AttentionInterface

    calls = []
    AttentionInterface.register("varlen_test", varlen_attention(calls))
    lm = rollout.tiny_model(len(tiny_tok), seed=0, num_hidden_layers=3)
    alone_pol = grpo.Policy(lm, chunk=1024)
    seqs = seqs_for()
    alone = torch.cat([alone_pol(*grpo.packed_inputs([s], torch.device("cpu")))[0] for s in seqs])  # SDPA
    lm.config._attn_implementation = "varlen_test"
    ids, pos, at, tgt, attn = grpo.packed_inputs(seqs, torch.device("cpu"))
    lens = [len(s["prompt"]) + len(s["completion"]) for s in seqs]
    assert attn["cu_seq_lens_q"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert attn["cu_seq_lens_q"].dtype == torch.int32 and attn["max_length_q"] == max(lens)
    # through the policy's forward, with and without the fused loss: every layer gets them, and they are right
    pol = grpo.Policy(lm, chunk=1024)
    lp, _ = pol(ids, pos, at, tgt, attn)
    assert len(calls) == 3 and torch.allclose(lp, alone, atol=1e-5)
    _, lp2, _ = pol(*grpo.model_inputs(seqs, True, torch.device("cpu")), loss_fn=lambda lp, ent, sl: lp.sum())
    assert len(calls) == 6 and torch.allclose(lp2, alone, atol=1e-5)
    for c in calls:
        assert c["cu_seq_lens_k"] is c["cu_seq_lens_q"] and c["max_length_q"] == c["max_length_k"] == max(lens)
        assert isinstance(c["max_length_q"], int)  # a Python int: flash-attn needs no .item() per layer
    # one row whose boundaries are wrong (one span): the varlen path reads them, so the log-probs change
    bad = {**attn, "cu_seq_lens_q": torch.tensor([0, sum(lens)], dtype=torch.int32)}
    bad["cu_seq_lens_k"] = bad["cu_seq_lens_q"]
    assert not torch.allclose(pol(ids, pos, at, tgt, bad)[0], alone, atol=1e-3)


def test_pad_groups_count_padded_tokens():
    lengths = [5, 9, 3, 12, 7, 1, 20, 8]
    groups = grpo.pad_groups(lengths, 24)
    assert sorted(i for g in groups for i in g) == list(range(8))
    # similar lengths together; rows x longest row within the budget (an over-long row alone)
    assert groups == [[6], [1, 3], [0, 4, 7], [2, 5]]  # 20 | 12+9 | 8+7+5 (3 x 8) | 3+1
    assert all(len(g) * max(lengths[i] for i in g) <= 24 or len(g) == 1 for g in groups)


def test_chunked_logprobs_and_grads_equal_full(lm):
    seqs = seqs_for()
    inputs = grpo.packed_inputs(seqs, torch.device("cpu"))
    n = len(inputs[3])
    wt = torch.linspace(-1, 1, n)

    def loss_fn(lp, ent, sl):  # a non-linear per-token loss using both outputs
        return (wt[sl] * lp + 0.1 * ent + 0.05 * lp.exp()).sum()

    runs = []
    for chunk in (3, 7, 10_000):
        lm.zero_grad()
        loss, lp, ent = grpo.Policy(lm, chunk=chunk)(*inputs, loss_fn=loss_fn)
        loss.backward()
        runs.append((loss.detach(), lp, ent, [p.grad.clone() for p in lm.parameters()]))
    lm.zero_grad()  # the reference: full logits and plain autograd
    logp_all = torch.log_softmax(lm(input_ids=inputs[0], position_ids=inputs[1], use_cache=False).logits[0], -1)[inputs[2]]
    lp = logp_all.gather(-1, inputs[3][:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    loss = loss_fn(lp, ent, slice(0, n))
    loss.backward()
    ref = [p.grad.clone() for p in lm.parameters()]
    for l2, lp2, ent2, g2 in runs:
        assert torch.allclose(l2, loss, atol=1e-5) and torch.allclose(lp2, lp, atol=1e-5)
        assert torch.allclose(ent2, ent, atol=1e-5)
        assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(g2, ref))
    with torch.no_grad():  # the no-gradient path (old and reference log-probs) agrees as well
        lp3, ent3 = grpo.Policy(lm, chunk=5)(*inputs)
    assert torch.allclose(lp3, lp, atol=1e-5) and torch.allclose(ent3, ent, atol=1e-5)


def test_trainer_logprobs_use_the_sampling_temperature(rows_file, tmp_path):
    """At T = 0.7 the engine samples from softmax(logits / T) and reports those log-probs ("processed"); the
    trainer's policy and reference (as train() builds them) score the same log-probs, entropies and, in the fused
    path, the same gradients as autograd on logits / T."""
    from torch.distributed.device_mesh import init_device_mesh

    T = 0.7
    cfg = grpo.Config(data=rows_file, model="tiny", temperature=T, kl_coef=0.01, logit_chunk=3, seed=5, device="cpu")
    _, world, device = grpo.init_distributed(cfg)
    tok = kc.load_tokenizer("", tmp_dir=str(tmp_path / "tok"))
    policy, ref, _ = grpo.load_models(cfg, tok, "hf", init_device_mesh("cpu", (world,)), device)
    lm = grpo.load_lm(cfg, tok)  # the same weights, unsharded
    engine = rollout.make_engine(rollout.Config(engine="hf", temperature=T, logprobs_mode="processed", device="cpu",
                                                max_new_tokens=10, seed=3), lm, tok)
    outs = engine.generate([[5, 6, 7, 8, 9, 10], [40, 41, 42]], n=2)
    seqs = [{"prompt": p, "completion": c.token_ids} for p, comps in zip([[5, 6, 7, 8, 9, 10], [40, 41, 42]], outs)
            for c in comps]
    engine_lp = torch.tensor([x for comps in outs for c in comps for x in c.logprobs])
    inputs = grpo.padded_inputs(seqs, device)
    with torch.no_grad():
        lp, ent = policy(*inputs)
        ref_lp, _ = ref(*inputs)
    assert torch.allclose(lp, engine_lp, atol=1e-5) and torch.allclose(ref_lp, engine_lp, atol=1e-5)
    # the test can fail: the temperature-1 log-probs of the same tokens are far from the engine's
    raw = torch.cat([grpo.naive_logp(lm, *grpo.packed_inputs([s], device)) for s in seqs])
    assert (raw - engine_lp).abs().max() > 1e-2
    # entropies and the fused path's gradients against autograd on the full logits / T
    logits = lm(input_ids=inputs[0], position_ids=inputs[1], use_cache=False).logits.flatten(0, 1)[inputs[2]] / T
    logp_all = logits.log_softmax(-1)
    want_lp = logp_all.gather(-1, inputs[3][:, None])[:, 0]
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    assert torch.allclose(ent, want_ent.detach(), atol=1e-5)
    wt = torch.linspace(-1, 1, len(want_lp))
    loss_fn = lambda lp, ent, sl: (wt[sl] * lp + 0.1 * ent).sum()  # noqa: E731
    loss_fn(want_lp, want_ent, slice(None)).backward()
    want_grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    loss, fused_lp, _ = grpo.Policy(lm, chunk=3, temperature=T)(*inputs, loss_fn=loss_fn)
    loss.backward()
    assert torch.allclose(fused_lp, engine_lp, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4) for p, g in zip(lm.parameters(), want_grads))


def test_stale_old_logprobs_keep_the_mini_batch_finite(tiny_tok):
    """A mini-batch after the first scores against old log-probs from before the last update: a token 100 nats
    more likely now, with A < 0, costs 3 |A| (verl's defaults reach backward_micro_batch), not inf."""
    lm = rollout.tiny_model(len(tiny_tok), seed=0)
    policy = grpo.Policy(lm, chunk=16)
    seqs = seqs_for()
    with torch.no_grad():
        lp, _ = policy(*grpo.padded_inputs(seqs, torch.device("cpu")))
    n = [len(s["completion"]) for s in seqs]
    for s, a, shift, old in zip(seqs, (-1.0, 1.0, -1.0), (-100.0, 0.0, 0.0), lp.split(n)):
        s.update(adv=a, old=old + shift, engine_lp=old + shift)

    def run(**opts):
        cfg = grpo.Config(kl_coef=0.0, **opts)
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "tokens": 0.0, "entropy_sum": 0.0, "engine_gap_sum": 0.0,
                 "engine_gap_max": 0.0, "engine_gap_tokens": 0}
        lm.zero_grad()
        grpo.backward_micro_batch(policy, seqs, sum(n), stats, cfg, 1, False, torch.device("cpu"))
        return stats["loss"], [p.grad for p in lm.parameters()]

    loss, grads = run()
    assert loss == pytest.approx((3 * n[0] - n[1] + n[2]) / sum(n), rel=1e-5)  # 3 |A|, -r A, -r A at r = 1
    assert all(g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert run(dual_clip=0.0, max_log_ratio=0.0)[0] == math.inf  # without the guards: the old skipped mini-batch


# ----------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, tiny_tok):
    """Short math rows (about 530 byte-tokens each): quick to generate from on the CPU."""
    d = tmp_path_factory.mktemp("grpo_data")
    raw = kc.generate_raw(str(d / "raw"), n=40, seed=0)
    rows, _ = kc.synth(kc.Config(input=raw["dapo"], max_tokens=1024), tiny_tok)
    kc.write_rows(d / "rows.jsonl", rows)
    return str(d / "rows.jsonl")


ARGS = ["--model=tiny", "--batch_prompts=4", "--group=4", "--max_new_tokens=12", "--lr=1e-3", "--kl_coef=0.01",
        "--micro_tokens=1200", "--log_samples=2", "--seed=5"]


def run_worker(out, rows_file, nproc=0, extra=()):
    args = [f"--data={rows_file}", f"--out_dir={out}", *ARGS, *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *args]
    else:
        cmd = [sys.executable, str(WORKER), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def exported(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "hf" / "model.safetensors"))


def log_lines(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_one_step_two_processes_equals_one(rows_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_worker(one, rows_file, nproc=1, extra=["--steps=1"])
    run_worker(two, rows_file, nproc=2, extra=["--steps=1"])
    a, b = exported(one), exported(two)
    start = rollout.tiny_model(259, seed=5).state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # the step changed the weights
    # gradients: same norm before clipping (FSDP2 on gloo must average, not sum, over ranks) and same loss
    la, lb = log_lines(one)[0], log_lines(two)[0]
    assert la["reward"] == lb["reward"] and la["dropped_groups"] == lb["dropped_groups"] == 0
    assert lb["grad_norm"] == pytest.approx(la["grad_norm"], rel=1e-5) and lb["loss"] == pytest.approx(la["loss"], rel=1e-5)
    # parameters: Adam's first step is lr * g / (|g| + eps), so entries whose gradient is ~eps differ by
    # float noise up to a fraction of lr (1e-3); anything systematic would move every entry by ~lr
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert sum((a[k] - b[k]).abs().sum() for k in a) < 1e-3 * sum((a[k] - start[k]).abs().sum() for k in a)


def test_resume_after_a_crash_equals_an_uninterrupted_run(rows_file, tmp_path):
    full, crash = tmp_path / "full", tmp_path / "crash"
    run_worker(full, rows_file, extra=["--steps=4", "--save_every=2"])
    run_worker(crash, rows_file, extra=["--steps=4", "--save_every=2", "--stop_after=3"])  # dies after step 3
    assert [p.name for p in (crash / "ckpt").iterdir()] == ["step_000002"] and not (crash / "hf").exists()
    r = run_worker(crash, rows_file, extra=["--steps=4", "--save_every=2"])
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    a, b = exported(full), exported(crash)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    lines = lambda out: [(json.loads(x)["step"], json.loads(x)["id"], json.loads(x)["k"])  # noqa: E731
                         for x in (Path(out) / "mining.jsonl").read_text().splitlines()]
    f, c = lines(full), lines(crash)
    at = lambda step: [x for x in f if x[0] == step]  # noqa: E731
    assert c == at(1) + at(2) + at(3) + at(4)  # step 3 ran twice; the resume cut its first record
    assert [x["step"] for x in log_lines(crash)] == [1, 2, 3, 4] and "removed" in r.stdout
    assert sorted(p.name for p in (crash / "ckpt").iterdir()) == ["step_000002", "step_000004"]


def test_learning_raises_the_reward(rows_file, tmp_path):
    out = tmp_path / "learn"
    run_worker(out, rows_file, extra=["--steps=30", "--lr=3e-3", "--kl_coef=0", "--group=8", "--save_every=0",
                                      "--max_new_tokens=16"])
    rew = [x["reward"] for x in log_lines(out)]
    start, end = sum(rew[:3]) / 3, sum(rew[-3:]) / 3
    assert end > max(0.4, 2 * start), rew


def test_nan_reward_skips_the_step(rows_file, tmp_path, monkeypatch):
    cfg = grpo.Config(data=rows_file, out_dir=str(tmp_path / "nan"), model="tiny", batch_prompts=2, group=4,
                      max_new_tokens=8, steps=1, kl_coef=0.0, drop_equal_groups=False, export=False, seed=5)
    loaded, before = [], {}
    load_models = grpo.load_models

    def keep_policy(*args):  # the policy train() builds, and its weights before any step
        policy, ref, engine = load_models(*args)
        loaded.append(policy)
        before.update({k: v.clone() for k, v in policy.state_dict().items()})
        return policy, ref, engine

    monkeypatch.setattr(grpo, "load_models", keep_policy)
    last = grpo.train(cfg, reward_fn=lambda rows, texts: [(math.nan if i == 0 else float(i % 2), {})
                                                          for i in range(len(texts))])
    assert last["skipped_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in loaded[0].state_dict().items())
    assert (tmp_path / "nan" / "rollouts" / "step_000001.jsonl").exists()


def share_of_lowercase(rows, texts):  # tests/grpo_worker.py's toy reward
    return [(sum("a" <= ch <= "z" for ch in t) / max(1, len(t)), {}) for t in texts]


def test_a_checkpoint_before_the_first_update_leaves_adam_untouched(rows_file, tmp_path):
    """Step 1 drops every group (equal rewards), so no optimizer step precedes the step-1 checkpoint; the update
    of step 2 after a resume from it equals the uninterrupted run's (a phantom Adam step made it 0.74x)."""
    rows = kc.read_rows(rows_file)
    first = {rows[i]["id"] for i in grpo.batch_indices(0, len(rows), 2, 5)}  # the rows of step 1

    def reward(rows, texts):
        return [(0.0, {})] * len(texts) if rows[0]["id"] in first else share_of_lowercase(rows, texts)

    def run(out, **opts):
        cfg = grpo.Config(data=rows_file, out_dir=str(out), model="tiny", batch_prompts=2, group=4, max_new_tokens=8,
                          steps=2, kl_coef=0.0, lr=1e-3, seed=5, device="cpu", engine="hf", **opts)
        return grpo.train(cfg, reward_fn=reward)

    run(tmp_path / "full", save_every=0)
    run(tmp_path / "crash", save_every=1, stop_after=1)
    assert [p.name for p in (tmp_path / "crash" / "ckpt").iterdir()] == ["step_000001"]
    run(tmp_path / "crash", save_every=1)  # resumes at step 1
    for out in ("full", "crash"):
        assert [(x["optimizer_steps"], x["dropped_groups"]) for x in log_lines(tmp_path / out)] == [(0, 2), (1, 0)]
    a, b = exported(tmp_path / "full"), exported(tmp_path / "crash")
    start = rollout.tiny_model(259, seed=5).state_dict()
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # step 2 moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k


def test_a_skipped_mini_batch_is_not_logged(rows_file, tmp_path, monkeypatch):
    """Two mini-batches per step; the second of step 2 is skipped (the cross-rank decision says so). The logged
    loss, KL and clip fraction are those of the applied mini-batch alone, per optimizer step taken."""
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}  # of the current mini-batch, from its micro-batches
    minis = []  # one entry per mini-batch: its sums, at the skip decision
    backward_micro_batch = grpo.backward_micro_batch
    any_rank = grpo.any_rank

    def recording(policy, mb, n_tok, stats, *rest):
        before = {k: stats[k] for k in sums}
        backward_micro_batch(policy, mb, n_tok, stats, *rest)
        for k in sums:
            sums[k] += stats[k] - before[k]

    def skip_the_fourth(bad, device):
        minis.append(dict(sums))
        sums.update(loss=0.0, kl=0.0, clip_frac=0.0)
        return any_rank(bad, device) or len(minis) == 4

    monkeypatch.setattr(grpo, "backward_micro_batch", recording)
    monkeypatch.setattr(grpo, "any_rank", skip_the_fourth)
    cfg = grpo.Config(data=rows_file, out_dir=str(tmp_path / "skip"), model="tiny", batch_prompts=2, group=4,
                      max_new_tokens=8, steps=2, mini_batches=2, kl_coef=0.05, lr=1e-2, save_every=0, export=False,
                      seed=5, device="cpu", engine="hf")
    last = grpo.train(cfg, reward_fn=share_of_lowercase)
    assert len(minis) == 4 and last["optimizer_steps"] == 1 and last["skipped_steps"] == 1
    applied, skipped = minis[2], minis[3]
    assert skipped["kl"] > 0 and skipped["clip_frac"] > 0  # the skipped one would have changed the log
    for k in sums:
        assert last[k] == pytest.approx(applied[k], rel=1e-9, abs=1e-12), k


# ----------------------------------------------------------------------------- FSDP2 pieces, 2 processes on gloo
def _fsdp_worker(rank, world, tmp, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    cfg = grpo.Config(model="tiny", device="cpu", seed=3)
    _, _, device = grpo.init_distributed(cfg)
    mesh = init_device_mesh("cpu", (world,))
    tok = kc.load_tokenizer(f"{tmp}/tok")
    full = lambda m: get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))  # noqa: E731
    result = {}
    # meta-device load: structure only on every rank, weights read by rank 0 (rank 1 would build other ones)
    plain = grpo.shard(grpo.Policy(grpo.load_lm(cfg, tok), 16), mesh, device, False)
    with torch.device("meta"):
        meta = grpo.shard(grpo.Policy(grpo.load_lm(cfg, tok, weights=False), 16), mesh, device, False)
    grpo.load_from_rank0(meta, grpo.Config(model="tiny", device="cpu", seed=3 + 100 * rank), tok, device,
                         torch.float32, False)
    a, b = full(plain), full(meta)
    result["meta_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(rank)
    seqs = [{"prompt": torch.randint(3, 250, (n,), generator=g).tolist(), "completion": torch.randint(3, 250, (5,), generator=g).tolist()}
            for n in (7, 11, 4)]
    with torch.no_grad():  # the rotary buffers rebuilt after the meta device: same log-probs
        result["meta_logp_equal"] = bool(torch.equal(plain(*grpo.packed_inputs(seqs, device))[0],
                                                     meta(*grpo.packed_inputs(seqs, device))[0]))
    # gradient sync only after the last micro-batch: same gradients as a reduce-scatter after every one
    grads = []
    for skip in (False, True):
        model = grpo.shard(grpo.Policy(grpo.load_lm(cfg, tok), 16), mesh, device, False)
        for i, s in enumerate(seqs):
            model.set_requires_gradient_sync(not skip or i == len(seqs) - 1)
            loss, _, _ = model(*grpo.packed_inputs([s], device), loss_fn=lambda lp, ent, sl: lp.sum() - 0.1 * ent.sum())
            loss.backward()
            if skip and i == 0:  # nothing reduced yet: no sharded gradient exists
                result["inner_no_grad"] = all(p.grad is None for p in model.parameters())
        grads.append([p.grad.full_tensor() for p in model.parameters()])
    result["sync_equal"] = all(torch.allclose(x, y, atol=1e-6, rtol=1e-5) for x, y in zip(*grads))
    result["sync_nonzero"] = all(bool(x.abs().sum() > 0) for x in grads[1])
    with open(f"{tmp}/fsdp{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    os._exit(0)  # gloo teardown after FSDP2 aborts now and then (see grpo.finish)


def test_fsdp2_meta_load_and_skipped_gradient_sync(tiny_tok, tmp_path):
    tiny_tok.save_pretrained(tmp_path / "tok")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, str(tmp_path), rollout._free_port()), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        assert r == {"meta_equal": True, "meta_logp_equal": True, "inner_no_grad": True, "sync_equal": True,
                     "sync_nonzero": True}, (rank, r)


def test_resume_at_another_world_size(rows_file, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run_worker(one, rows_file, extra=["--steps=3", "--save_every=2"])  # uninterrupted, one process
    run_worker(two, rows_file, nproc=2, extra=["--steps=3", "--save_every=2", "--stop_after=2"])
    assert sorted(p.name for p in (two / "ckpt" / "step_000002").glob("extra*.pt")) == ["extra.pt"]
    r = run_worker(two, rows_file, extra=["--steps=3", "--save_every=2"])  # resumed by a world of one
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    assert [x["step"] for x in log_lines(two)] == [1, 2, 3]
    a, b = exported(one), exported(two)
    start = rollout.tiny_model(259, seed=5).state_dict()
    # same data order and seeds whatever the world size: the same run up to float noise (see the 1-vs-2 test)
    assert sum((a[k] - b[k]).abs().sum() for k in a) < 1e-2 * sum((a[k] - start[k]).abs().sum() for k in a)


# ----------------------------------------------------------------------------- GPU guards and scripts
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_flash_attn_probe_never_crashes(monkeypatch, capsys):
    assert grpo.flash_attn_ok(torch.device("cpu")) is False  # the CPU always takes SDPA, silently
    assert capsys.readouterr().err == ""
    broken = type(sys)("flash_attn")  # a wheel built for another torch: imports, then fails in its kernel

    def varlen(*a, **k):
        raise RuntimeError("undefined symbol: _ZN3c10")

    broken.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    monkeypatch.setattr(grpo, "_FLASH", {})
    dev = torch.device("cuda", 0)
    assert grpo.flash_attn_ok(dev) is False and grpo.flash_attn_ok(dev) is False
    err = capsys.readouterr().err
    assert err.count("warning: flash-attn unusable") == 1 and "SDPA" in err  # one warning, not one per call


@needs_cuda
def test_gpu_bf16_fsdp2_logprobs_match_fp32(tiny_tok):
    """On the GPU (world of one, NCCL): the bf16 FSDP2 policy's log-probs are the fp32 ones up to bf16 noise."""
    cfg = grpo.Config(model="tiny", device="cuda", seed=1)
    _, _, device = grpo.init_distributed(cfg)
    from torch.distributed.device_mesh import init_device_mesh

    lm = grpo.load_lm(cfg, tiny_tok)
    ref = grpo.naive_logp(lm, *grpo.packed_inputs([{"prompt": [5, 6, 7, 8], "completion": [9, 10, 11]}], torch.device("cpu")))
    policy = grpo.shard(grpo.Policy(lm, 16), init_device_mesh("cuda", (1,)), device, False)
    with torch.no_grad():
        lp, _ = policy(*grpo.packed_inputs([{"prompt": [5, 6, 7, 8], "completion": [9, 10, 11]}], device))
    assert torch.allclose(lp.float().cpu(), ref, atol=0.05)
    assert isinstance(grpo.flash_attn_ok(device), bool)


def clean_env():  # without the torchrun variables an in-process train() of an earlier test left behind
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def test_bench_train_runs_on_cpu():
    r = subprocess.run([sys.executable, "bench/bench_train.py", "--model=tiny", "--prompt=100", "--completion=28",
                        "--seqs=6", "--micro_tokens=400", "--steps=1", "--device=cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**clean_env(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 micro-batches of <= 400 tokens, 768 tokens per rank per step" in r.stdout
    tps = float(r.stdout.split("update tokens/s per rank: ")[1].split()[0].replace(",", ""))
    assert tps > 0 and "MFU (6N): n/a" in r.stdout and "total estimate" in r.stdout
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train

    assert [bench_train.peak_flops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla T4")] \
        == [989e12, 989e12, 312e12, 0.0]


def test_gpu_check_without_a_gpu_checks_nothing_and_says_so():
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable})
    assert r.returncode == 3 and r.stdout == ""  # never 0: "skipped" must not read as a pass
    assert r.stderr.strip().splitlines() == ["gpu_check: no GPU here (torch.cuda.is_available() is False): "
                                             "nothing was checked"]


def test_skipping_the_old_logprob_pass_keeps_loss_and_gradient(rows_file, tmp_path, monkeypatch):
    """One optimizer step per rollout batch: old log-probs = detached current ones give the same loss, KL,
    importance weights and gradient as a separate old-log-prob forward, and train() skips that forward.
    The skipping path runs first: an old-log-prob forward after a backward once doubled the FSDP2 root's
    gradients (parameters left gathered)."""
    from torch.distributed.device_mesh import init_device_mesh

    cfg = grpo.Config(data=rows_file, out_dir=str(tmp_path / "skip"), model="tiny", batch_prompts=2, group=2,
                      max_new_tokens=4, steps=1, kl_coef=0.05, tis_cap=1.5, entropy_coef=0.01, export=False,
                      resume=False, seed=5)
    _, world, device = grpo.init_distributed(cfg)
    tok = kc.load_tokenizer("", tmp_dir=str(tmp_path / "tok"))  # what train() loads for --model=tiny
    policy, ref, _ = grpo.load_models(cfg, tok, "hf", init_device_mesh("cpu", (world,)), device)
    packed = False  # no flash-attn on the CPU: train() takes padded rows
    g = torch.Generator().manual_seed(1)
    seqs = [{"prompt": torch.randint(0, 250, (6 + 5 * i,), generator=g).tolist(),
             "completion": torch.randint(0, 250, (3 + 2 * i,), generator=g).tolist(), "adv": (-1.0) ** i * (i + 1),
             "engine_lp": -5.5 + 0.3 * torch.randn(3 + 2 * i, generator=g)} for i in range(4)]
    grpo.score_logps(ref, seqs, "ref", packed, cfg.micro_tokens, device)
    for s in seqs:  # the reference starts as a copy of the policy: move it so that the KL term is not zero
        s["ref"] = s["ref"] + 0.3 * torch.randn(len(s["ref"]), generator=g)
    n_tok = sum(len(s["completion"]) for s in seqs)

    def grads(batch):
        policy.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "tokens": 0.0, "entropy_sum": 0.0, "engine_gap_sum": 0.0,
                 "engine_gap_max": 0.0, "engine_gap_tokens": 0}
        for mb in grpo.micro_batches(batch, packed, cfg.micro_tokens, device):
            grpo.backward_micro_batch(policy, mb, n_tok, stats, cfg, world, packed, device)
        return stats, [p.grad.full_tensor().clone() for p in policy.parameters()]

    skip_stats, skip = grads([dict(s) for s in seqs])
    with_old = [dict(s) for s in seqs]
    grpo.score_logps(policy, with_old, "old", packed, cfg.micro_tokens, device)
    old_stats, full = grads(with_old)
    assert skip_stats["loss"] == pytest.approx(old_stats["loss"], rel=1e-5, abs=1e-7)
    assert skip_stats["kl"] == pytest.approx(old_stats["kl"], rel=1e-5) and skip_stats["kl"] > 0
    assert skip_stats["entropy_sum"] == pytest.approx(sum(float(s["entropy"].sum()) for s in with_old), rel=1e-5)
    # the trainer-engine gap in log.jsonl: |old - engine| per sampled token, from either path
    gaps = torch.cat([(s["old"] - s["engine_lp"]).abs() for s in with_old])
    for st in (skip_stats, old_stats):
        assert st["engine_gap_tokens"] == n_tok and st["engine_gap_sum"] == pytest.approx(float(gaps.sum()), rel=1e-5)
        assert st["engine_gap_max"] == pytest.approx(float(gaps.max()), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(skip, full))
    assert any(a.abs().sum() > 0 for a in skip)
    scored = []  # the no-gradient passes of a real step: (key, sequences)
    score_logps = grpo.score_logps

    def keep_scored(model, batch, key, *args):
        scored.append((key, batch))
        return score_logps(model, batch, key, *args)

    monkeypatch.setattr(grpo, "score_logps", keep_scored)
    grpo.train(cfg)  # mini_batches = ppo_epochs = 1: no old-log-prob forward, the reference's alone
    assert all("old" not in s for _, batch in scored for s in batch)
    assert [key for key, _ in scored] == ["ref"]


@pytest.mark.parametrize("text,finish,want", [
    (" </think>\\boxed{yes}", "stop", {"format": True, "says": "yes"}),
    (" </think>\\boxed{No}", "stop", {"format": True, "says": "no"}),
    (" </think>\\boxed{C}", "stop", {"format": True, "says": "other"}),  # a letter for a yes/no question
    (" </thiink>\\boxed{yes}", "stop", {"format": False, "says": "other"}),  # no </think>: not the format
    (" </think>\\boxed{yes", "length", {"format": False, "says": "other"}),  # cut at the token limit
])
def test_answer_form_tells_format_from_a_yes_no_side(text, finish, want):
    assert grpo.answer_form({"answers": ["no"]}, text, finish) == want
    assert grpo.answer_form({"answers": ["D"]}, text, finish) == {"format": want["format"]}  # no "says": not yes/no
