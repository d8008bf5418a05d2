import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import curriculum as cur
import keychain as kc
import rollout

ROOT = Path(__file__).resolve().parent.parent


def test_mixture_sizes_follow_the_paper_and_scale():
    s = cur.sizes(1.0)
    assert s == {"keychain": {"hotpotqa": 2500, "2wiki": 2500, "musique": 2500},
                 "qa": {"hotpotqa": 2500, "2wiki": 2500, "musique": 2500},
                 "ruler": {"ruler": 1024}, "math": {"dapo": 2500, "mathqa": 2500}}
    assert cur.sizes(0.001) == {"keychain": {"hotpotqa": 3, "2wiki": 3, "musique": 2},
                                "qa": {"hotpotqa": 3, "2wiki": 3, "musique": 2},
                                "ruler": {"ruler": 1}, "math": {"dapo": 3, "mathqa": 2}}
    assert "keychain" not in cur.STAGES["warmup"] and set(cur.STAGES["stage1"]) == set(cur.MIX)


def tiny_cfg(run, **kw):
    return cur.Config(**{"preset": "tiny", "run_dir": str(run), "scale": 0.002, "max_tokens": 8192, "key_style": "short", **kw})


def test_prepare_builds_the_stage_mixes_and_reuses_them(tmp_path, capsys):
    run = tmp_path / "run"
    stages = cur.prepare(tiny_cfg(run), run)
    s1, wu = kc.read_rows(stages["stage1"]), kc.read_rows(stages["warmup"])
    count = lambda rows: {(r["kind"], r["source"]): sum(1 for x in rows if (x["kind"], x["source"]) == (r["kind"], r["source"]))  # noqa: E731
                          for r in rows}
    assert count(s1) == {("keychain", "hotpotqa"): 5, ("keychain", "2wiki"): 5, ("keychain", "musique"): 5,
                         ("qa", "hotpotqa"): 5, ("qa", "2wiki"): 5, ("qa", "musique"): 5, ("ruler", "ruler"): 2,
                         ("math", "dapo"): 5, ("choice", "mathqa"): 5}
    assert {r["kind"] for r in wu} == {"qa", "ruler", "math", "choice"} and len(wu) == 27
    assert len({r["id"] for r in s1}) == len(s1) and all(r["num_tokens"] <= 8192 for r in s1 if r["kind"] != "keychain")
    assert all(r["num_tokens"] > 8192 and r["chains"] == 8 for r in s1 if r["kind"] == "keychain")  # chains on top
    stamp = {p.name: p.stat().st_mtime_ns for p in (run / "data").glob("*.jsonl")}
    capsys.readouterr()
    cur.prepare(tiny_cfg(run), run)
    assert "reusing" in capsys.readouterr().out
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (run / "data").glob("*.jsonl")}
    cur.prepare(tiny_cfg(run, seed=1), run)  # another setting: rebuilt
    assert kc.read_rows(run / "data" / "stage1.jsonl") != s1


def test_tiny_trains_on_balanced_yes_no_questions_at_4096(tmp_path):
    run = tmp_path / "run"
    s1 = kc.read_rows(cur.prepare(tiny_cfg(run, max_tokens=4096), run)["stage1"])
    qa = [r for r in s1 if r["kind"] in ("qa", "keychain")]
    assert len(qa) == 30 and {r["answers"][0] for r in qa} == {"yes", "no"}
    yes = sum(r["answers"][0] == "yes" for r in qa)
    assert 10 <= yes <= 20, yes  # two countries: "born in the same country?" is a coin flip, not a constant
    assert all(r["num_tokens"] <= 4096 for r in qa if r["kind"] == "qa")  # MuSiQue too: near documents only
    for src in cur.QA_SOURCES:  # every kept item, not just the drawn ones
        items = kc.read_rows(run / "data" / "filter" / f"{src}.jsonl")
        assert items and all(it["answers"][0] in ("yes", "no") and len(it["docs"]) == 4 for it in items), src


def test_near_docs_keeps_what_the_question_names_and_what_those_name():
    item = {"question": "Were Ann Lee and Bo Kim born in the same country?", "answers": ["no"],
            "docs": ["Zed\nZed is a country.", "Bo Kim\nBo Kim was born in Ulm City.", "Ulm City\nUlm City is in Zed.",
                     "Cy Orr\nCy Orr was born in Ulm City.", "Ann Lee\nAnn Lee was born in Rho City.",
                     "Rho City\nRho City is in Vor."]}
    assert [d.split("\n")[0] for d in cur.near_docs(item)["docs"]] == ["Bo Kim", "Ann Lee", "Ulm City", "Rho City"]
    assert len(item["docs"]) == 6  # the input item is left as it was


def test_tiny_heads_must_divide_the_width(tmp_path):
    r = subprocess.run([sys.executable, "curriculum.py", "format", "--tiny_heads=3", f"--run_dir={tmp_path / 'r'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--tiny_heads=3 must divide 64" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_mining_on_hand_made_counts():
    rows = [{"id": f"r{i}", "source": src} for i, src in enumerate(["a", "a", "a", "b", "b"])]
    counts = {"r0": (8, 0), "r1": (8, 3), "r2": (8, 8), "r3": (8, 7), "r4": (8, 8)}
    kept, report = cur.mine_from_counts(rows, counts)
    assert [r["id"] for r in kept] == ["r0", "r1", "r3"]
    assert report == {"a": {"solved 0/G": 1, "partly": 1, "solved G/G": 1},
                      "b": {"solved 0/G": 0, "partly": 1, "solved G/G": 1},
                      "total": {"solved 0/G": 1, "partly": 2, "solved G/G": 2}}
    with pytest.raises(SystemExit, match="no pass count for item 'r9'"):
        cur.mine_from_counts(rows + [{"id": "r9", "source": "a"}], counts)


def test_counts_from_stage_one_rollouts_sum_every_draw(tmp_path):
    p = tmp_path / "mining.jsonl"
    kc.write_rows(p, [{"id": "x", "n": 4, "k": 4, "step": 1}, {"id": "y", "n": 4, "k": 1, "step": 1},
                      {"id": "x", "n": 4, "k": 3, "step": 9},
                      {"id": "x", "n": 4, "k": 2, "step": 9}])  # step 9 ran again after a resume: its last record
    assert cur.counts_from_rollouts(p) == {"x": (8, 6), "y": (4, 1)}


# ----------------------------------------------------------------------------- train.sh
def train_sh(*args, env=None, timeout=60):
    e = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(["bash", "train.sh", *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)


@pytest.mark.parametrize("args,env,msg", [
    ((), {}, "usage: bash train.sh PRESET"),
    (("70b",), {}, "unknown preset '70b'"),
    (("tiny",), {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a non-negative integer"),
    (("7b",), {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK=2 must be below NNODES=2"),
    (("7b",), {"NNODES": "2"}, "needs MASTER_ADDR"),
    (("7b",), {"MASTER_PORT": "x"}, "MASTER_PORT must be a non-negative integer"),
    (("tiny",), {"ENGINE": "sglang"}, "ENGINE must be hf or vllm, got 'sglang'"),
    (("7b",), {"ENGINE": "hf"}, "ENGINE=hf: the 7b preset generates with vLLM"),
])
def test_train_sh_rejects_bad_arguments(args, env, msg):
    r = train_sh(*args, env={"MASTER_ADDR": "", **env})
    assert r.returncode == 2 and msg in r.stderr


def test_train_sh_checks_files_model_and_gpus_before_heavy_work(tmp_path):
    run = tmp_path / "run7b"
    t0 = time.time()
    r = train_sh("7b", env={"RUN_DIR": str(run), "NNODES": "1", "HOTPOTQA": str(tmp_path / "nope.json"),
                            "MODEL": str(tmp_path / "no-model")})
    assert r.returncode != 0 and time.time() - t0 < 60
    err = r.stderr
    assert "cannot start" in err and "raw file for hotpotqa not found" in err and "raw file for 2wiki not found: (not set)" in err
    assert "no-model" in err and "has 0 GPU(s); preset 7b needs 8" in err
    assert not (run / "data").exists()


def test_kill_in_stage_one_then_rerun_resumes(tmp_path):
    run = tmp_path / "tiny"
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(run), "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(["bash", "train.sh", "tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while not (run / "stage1" / "ckpt" / "step_000004").exists():
        assert p.poll() is None and time.time() < deadline, "stage I never reached its first checkpoint"
        time.sleep(0.5)
    # train.sh's group in the middle of Stage I: torchrun and its workers (their own sessions) die with it
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(2)
    assert subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split() == []
    assert not (run / "stage1" / "hf").exists()
    r = subprocess.run(["bash", "train.sh", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr  # a process left behind holding the pipe would time this out: none may outlive it
    assert r.returncode == 0, out[-3000:]
    assert "reusing" in out and "warmup: done, skipping" in out and "resumed from" in out
    steps = [json.loads(x)["step"] for x in (run / "stage1" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the steps logged after the checkpoint were cut on resume, then 5..20
    assert "format warm-up: done, skipping" in out
    for stage in ("warmup", "stage1", "stage2"):
        log = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]
        # the format warm-up and the guessable yes/no items give GRPO unequal rewards in every stage
        assert sum(x["optimizer_steps"] for x in log) > 0, stage
        assert [r["step"] for r in kc.read_rows(run / stage / "rollouts" / "step_000001.jsonl")][0] == 1
    summary = (run / "summary.md").read_text()
    assert "| stage1 | 42 | 20 |" in summary and "solved 0/G" in summary and (run / "stage2" / "hf").exists()



def test_tiny_run_learns(tmp_path):
    """The demo's promise: `bash train.sh tiny` (seed 0, the real reward, nothing mocked) raises the reward over
    Stage I + Stage II, and summary.md says what rose (format, yes/no) and shows the held-out before/after."""
    run = tmp_path / "tiny"
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(run), "SEED": "0", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    # output to a file, not a pipe: a process-pool forkserver of the reward (started by a trainer rank) can outlive
    # the run holding the pipe open, and reading it would wait for that process
    with open(tmp_path / "train.log", "w") as log:
        r = subprocess.run(["bash", "train.sh", "tiny"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=900)
    assert r.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    curve = [json.loads(x) for s in ("stage1", "stage2") for x in (run / s / "log.jsonl").read_text().splitlines()]
    reward = [x["reward"] for x in curve]
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    # measured (seed 0, 2 cores): reward +0.156 (0.036 -> 0.193), format rate 0.50 -> 0.91; the margins leave room
    # for another CPU's rounding, which changes the samples and so the curve
    assert last - first >= 0.08, f"Stage I+II reward {reward}: first 3 {first:.3f}, last 3 {last:.3f}"
    fmt = [x["format"] for x in curve]
    assert sum(fmt[-3:]) / 3 - sum(fmt[:3]) / 3 >= 0.1, f"format rate {fmt}"
    summary = (run / "summary.md").read_text()
    assert f"Stage I+II: first 3 steps mean {first:.3f}, last 3 mean {last:.3f}" in summary
    assert "| format rate |" in summary and "Held-out before/after" in summary and "yes_no_kept" in summary
    held = json.loads((run / "heldout" / "scores.json").read_text())
    assert held["before"]["model"].endswith("format/hf") and held["after"]["model"].endswith("stage2/hf")
    print(f"tiny run: {time.time() - t0:.0f} s, Stage I+II {first:.3f} -> {last:.3f}")

# ----------------------------------------------------------------------------- preflight (bash train.sh PRESET check)
QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)  # Qwen2.5-7B-Instruct's config


def test_disk_arithmetic_for_the_7b_run():
    need = cur.disk_need(7_615_616_512, keep=2, rows=21024, max_tokens=16384, gpu=True)
    # 12 bytes per parameter per checkpoint (fp32 weights + two Adam moments): 91.4 GB; 2 kept per stage, all
    # three stages', + 1 while writing; bf16 exports of 15.2 GB per stage
    assert need == {"checkpoints": 7 * 12 * 7_615_616_512, "exports": 3 * 2 * 7_615_616_512,
                    "data": 20 * 21024 * 16384}
    assert round(12 * 7_615_616_512 / 1e9, 1) == 91.4 and round(sum(need.values()) / 1e9) == 692
    # the hub models' sizes used when their configs cannot be read are their configs' parameter counts
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import torch

    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**QWEN7B))
    assert sum(p.numel() for p in lm.parameters()) == cur.HUB_PARAMS["Qwen/Qwen2.5-7B-Instruct"]


def test_preflight_reports_each_problem_in_one_line(tmp_path, capsys):
    from transformers import Qwen2Config

    model = tmp_path / "qwen7b-config-only"
    Qwen2Config(**QWEN7B).save_pretrained(model)  # a config and a tokenizer, but no weight files
    kc.make_tiny_tokenizer(model)
    run = tmp_path / "run"
    a100_40 = [("NVIDIA A100-SXM4-40GB", 40 * 2**30)] * 8
    cfg = cur.Config(command="check", preflight=True, preset="7b", run_dir=str(run), model=str(model), gpus=8,
                     released=str(tmp_path / "missing-release"))
    errors = cur.check(cfg, run, free=100 * 10**9, found=a100_40)
    table = capsys.readouterr().out
    assert f"RELEASED not found: {tmp_path / 'missing-release'}" in errors
    assert f"model {model}: weight file(s) missing: model.safetensors" in errors
    assert "GPU 0 (NVIDIA A100-SXM4-40GB, 40 GiB) has less than the 75 GiB preset 7b was sized for (and 7 more)" in errors
    assert (f"disk: {run} has 100 GB free; the run writes about 692 GB (checkpoints 640 GB, exports 46 GB, data 7 GB)"
            in errors)
    assert "7.62B parameters, tokenizer loads" in table and "8 x NVIDIA A100-SXM4-40GB, 40 GiB" in table
    assert all("\n" not in e for e in errors) and not run.exists()  # one line each; nothing created
    # enough of everything: those problems are gone (vLLM is not installed here: that one stays)
    (model / "model.safetensors").write_bytes(b"")
    kc.write_rows(tmp_path / "missing-release", [])
    h100 = [("NVIDIA H100 80GB HBM3", 80 * 2**30)] * 8
    errors = cur.check(cfg, run, free=700 * 10**9, found=h100[:4])
    assert [e.split(":")[0] for e in errors] == ["this node has 4 GPU(s); preset 7b needs 8", "vllm"]
    assert cur.check(cfg, run, free=700 * 10**9, found=h100)[0].startswith("vllm: not installed")
    # a model that is not there, and no data at all: one line each
    cfg = cur.Config(command="check", preflight=True, preset="7b", run_dir=str(run), model=str(tmp_path / "no-model"))
    errors = cur.check(cfg, run, free=10**12, found=[])
    assert errors[0].startswith("no data for preset 7b: set RELEASED=path/to/LoongRL-Train-Data")
    assert errors[1].startswith(f"model {tmp_path / 'no-model'}: ") and len(errors) == 2


def cluster_nodes(tmp_path, run_dirs):
    """Two "nodes" on this machine (torchrun --nnodes=2, one process each, gloo), each with its own RUN_DIR."""
    port = rollout._free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "--nproc_per_node=1",
                               "curriculum.py", "cluster", f"--run_dir={d}", f"--verdict={tmp_path / f'verdict{n}'}",
                               "--wait_s=120"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, d in enumerate(run_dirs)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return outs, [(tmp_path / f"verdict{n}").read_text() for n in range(2)]


def test_cluster_check_finds_a_run_dir_that_is_not_shared(tmp_path):
    shared = tmp_path / "shared" / "run"
    outs, verdicts = cluster_nodes(tmp_path, [shared, shared])
    assert verdicts == ["ok", "ok"] and "all-reduce over 2 ranks on 2 node(s) (gloo): sum right" in outs[0]
    assert not (tmp_path / "shared").exists()  # the probe file and the folders made for it are gone
    outs, verdicts = cluster_nodes(tmp_path, [tmp_path / "a" / "run", tmp_path / "b" / "run"])
    line = (f"node 1: RUN_DIR={tmp_path / 'b' / 'run'} does not show the file node 0 wrote there: RUN_DIR must be "
            "on a filesystem every node shares (NFS, Lustre, ...)")
    assert verdicts == [line, line]  # both nodes know
    assert f"check: {line}" in outs[0] and "RUN_DIR NOT shared" in outs[1]


def test_train_sh_check_tiny_passes_and_7b_names_what_is_missing(tmp_path):
    run = tmp_path / "runs" / "tiny"
    r = train_sh("tiny", "check", env={"RUN_DIR": str(run)}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all-reduce over 2 ranks on 1 node(s) (gloo): sum right" in r.stdout and "RUN_DIR shared" in r.stdout
    assert "check: preset tiny ready on node 0" in r.stdout and not (tmp_path / "runs").exists()
    r = train_sh("7b", "check", env={"RUN_DIR": str(tmp_path / "r7"), "MODEL": str(tmp_path / "no-model")}, timeout=300)
    err = r.stderr.splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "r7").exists()
    assert err[0].startswith("check: no data for preset 7b: set RELEASED=") and "HOTPOTQA, TWOWIKI" in err[0]
    assert "check: this node has 0 GPU(s); preset 7b needs 8" in err
    assert "check: all-reduce and shared RUN_DIR not checked: this node has fewer than 8 GPUs" in err
    assert err[-1] == "train.sh: 7b check on node 0: problems above; nothing was started"
    assert "preset 7b needs" in r.stdout and "8 x 75 GiB" in r.stdout  # the table


def test_steps_runs_n_steps_per_stage_in_its_own_run_dir(tmp_path):
    r = train_sh("tiny", env={"STEPS": "0"})
    assert r.returncode == 2 and "STEPS must be at least 1" in r.stderr
    r = train_sh("tiny", "check", env={"STEPS": "2", "RUN_DIR": ""}, timeout=300)
    assert r.returncode == 0 and "disk in runs/tiny-steps2" in r.stdout  # never the real run's stages


# ----------------------------------------------------------------------------- summary
def _step(step, reward, opt, dropped, groups=4, **kw):
    return {"step": step, "reward": reward, "response_len": 100.0 + step, "clip_frac": 0.01 * step,
            "optimizer_steps": opt, "dropped_groups": dropped, "groups": groups, **kw}


def fake_run(run):
    kc.write_rows(run / "data" / "warmup.jsonl", [{"id": str(i)} for i in range(5)])
    kc.write_rows(run / "data" / "stage1.jsonl", [{"id": str(i)} for i in range(7)])
    kc.write_rows(run / "warmup" / "log.jsonl", [_step(1, 0.0, 0, 4), _step(2, 0.5, 1, 2)])
    names = {"keychain/names_real": 0.25, "keychain/names_distractor": 0.5}
    # stage1: step 2 ran twice (resumed): the last record counts; a crash tore the last line
    s1 = [_step(1, 0.1, 2, 1, **names), _step(2, 0.9, 9, 9), _step(2, 0.2, 1, 3, **names),
          _step(3, 0.3, 2, 0, **names), _step(4, 0.6, 2, 1, **names)]
    (run / "stage1").mkdir()
    (run / "stage1" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s1) + '{"step": 5, "rew')
    (run / "stage1" / "hf").mkdir()
    kc.write_rows(run / "mining" / "counts.jsonl", [{"id": "hotpotqa-keychain-1", "n": 8, "k": 0},
                                                     {"id": "hotpotqa-qa-2", "n": 8, "k": 8},
                                                     {"id": "dapo-3", "n": 8, "k": 3}, {"id": "dapo-4", "n": 8, "k": 8}])


def test_summary_tables_plots_and_torn_lines(tmp_path, capsys):
    run = tmp_path / "run"
    fake_run(run)
    text = cur.summary(run)
    assert "| warmup | 5 | 2 | 0.250 | 0.250 | 1 | 6 of 8 | no |" in text
    assert "| stage1 | 7 | 4 | 0.200 | 0.367 | 7 | 5 of 16 | yes |" in text  # rewards 0.1, 0.2, 0.3, 0.6
    assert "| stage2 | 0 | 0 | - | - | - | - | no |" in text
    assert f"{run / 'stage1' / 'log.jsonl'}: skipped line(s) 6 (torn by a crash" in text
    assert "skipped line(s) 6" in capsys.readouterr().err
    for png in ("training", "mining"):
        assert f"(plots/{png}.png)" in text
        assert (run / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "summary.md").read_text() == text


def test_summary_plot_contents(tmp_path, monkeypatch):
    import matplotlib.figure

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figs.append(fig))
    run = tmp_path / "run"
    fake_run(run)
    cur.summary(run)
    training, mining = figs
    reward, length, names, clip = training.axes
    assert [ln.get_label() for ln in reward.lines] == ["warmup", "stage1"]
    assert list(reward.lines[1].get_xdata()) == [3, 4, 5, 6]  # Stage I continues after warmup's 2 steps
    assert list(reward.lines[1].get_ydata()) == [0.1, 0.2, 0.3, 0.6]
    assert list(names.lines[0].get_ydata()) == [0.25] * 4 and names.lines[1].get_linestyle() == "--"
    assert list(clip.lines[0].get_ydata()) == [0.01, 0.02]
    ax = mining.axes[0]
    heights = [0] * 9
    for patch in ax.patches:
        if hasattr(patch, "get_height") and patch.get_width() < 1:
            heights[round(patch.get_x() + patch.get_width() / 2)] += patch.get_height()
    assert heights == [1, 0, 0, 1, 0, 0, 0, 0, 2] and "2 kept for Stage II" in ax.get_title()


def test_summary_missing_run_dir_is_one_line_and_creates_nothing(tmp_path):
    run = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"^error: run dir {run} does not exist$"):
        cur.summary(run)
    r = subprocess.run([sys.executable, "curriculum.py", "summary", f"--run_dir={run}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: run dir {run} does not exist"]
    assert not run.exists()


def test_train_sh_other_nodes_and_gpu1_check(tmp_path):
    # a node other than 0 reads node 0's data: no raw files needed, the GPUs still checked
    r = train_sh("7b", env={"RUN_DIR": str(tmp_path / "r1"), "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                            "MODEL": "tiny"})
    assert r.returncode != 0 and "has 0 GPU(s); preset 7b needs 8" in r.stderr and "raw file" not in r.stderr
    # gpu1: generated data, the HF engine when vLLM is missing; only the GPU is required
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = train_sh("gpu1", env={"RUN_DIR": str(tmp_path / "g"), "MODEL": str(model)})
    assert r.returncode != 0 and "has 0 GPU(s); preset gpu1 needs 1" in r.stderr
    assert "vllm" not in r.stderr and "raw file" not in r.stderr and not (tmp_path / "g" / "data").exists()


# ----------------------------------------------------------------------------- difficulty filter and pass counts
@pytest.mark.parametrize("text,golds,ok", [
    ("Let me think. The answer is Paris.", ["Paris"], True),
    ("the answer is paris, france", ["Paris"], False),  # prediction must be inside the gold
    ("THE ANSWER IS New York", ["New York City"], True),  # a substring of the gold counts (the authors' rule)
    ("The answer is A. Later: the answer is Paris", ["Paris"], False),  # the text after the FIRST occurrence
    ("Paris", ["Paris"], False),  # no "the answer is"
    ("The answer is .", ["Paris"], False),  # nothing after it: empty is a substring of everything
    ("The answer is the Eiffel", ["Eiffel Tower", "x"], True),
])
def test_filter_correct_is_the_authors_rule(text, golds, ok):
    assert cur.filter_correct(text, golds) is ok


def test_pass_counts_one_function_resumable(tmp_path, tiny_tok, raw):
    import rollout

    model = tmp_path / "model"
    rollout.tiny_model(len(tiny_tok), seed=0).save_pretrained(str(model))
    tiny_tok.save_pretrained(str(model))
    items, _ = kc.load_items(raw["hotpotqa"])
    jobs = [{**it, "id": f"hotpotqa/{it['id']}"} for it in items[:5]]
    seen = []

    def score(js, texts):  # counts what was sampled; "correct" = an even number of characters
        seen.extend(j["id"] for j in js)
        return [len(t) % 2 == 0 for t in texts]

    render = lambda tok, it: kc.filter_prompt(it)  # noqa: E731
    kw = dict(model=str(model), group=3, temperature=1.0, max_new_tokens=5, tp=1, max_prompt=8192,
              tokenizer=str(model), render=render, score=score)
    c = cur.Config(engine="hf", batch=2, seed=0)
    out = tmp_path / "filter"
    # a run killed after two items: their counts are on disk, the rerun samples only the other three
    kc.write_rows(out / "counts.rank0.jsonl", [{"id": jobs[0]["id"], "n": 3, "k": 3}, {"id": jobs[1]["id"], "n": 3, "k": 0}])
    counts = cur.pass_counts(c, jobs, out, **kw)
    assert seen == [j["id"] for j in jobs[2:] for _ in range(3)]
    assert set(counts) == {j["id"] for j in jobs} and counts[jobs[0]["id"]] == (3, 3) and counts[jobs[1]["id"]] == (3, 0)
    assert all(n == 3 and 0 <= k <= 3 for n, k in counts.values())
    seen.clear()
    again = cur.pass_counts(c, jobs, out, **kw)  # everything counted: nothing sampled
    assert again == counts and seen == []
    (out / "counts.rank0.jsonl").unlink()  # from scratch: the same seeds give the same counts
    fresh = cur.pass_counts(c, jobs[2:], out, **kw)
    assert fresh == {j["id"]: counts[j["id"]] for j in jobs[2:]}
    import grpo

    grpo.finish()


def test_prepare_keeps_only_items_solved_lo_to_hi(tmp_path):
    run = tmp_path / "run"
    raw = cur.raw_paths(tiny_cfg(run), run)
    counts, k_of = [], {}
    for src in cur.QA_SOURCES:
        for i, it in enumerate(kc.load_items(raw[src], source=src)[0]):
            k_of[(src, it["id"])] = i % 9
            counts.append({"id": f"{src}/{it['id']}", "n": 8, "k": i % 9})
    cpath = tmp_path / "counts.jsonl"
    kc.write_rows(cpath, counts)
    stages = cur.prepare(tiny_cfg(run, filter_counts=str(cpath)), run)
    rows = [r for r in kc.read_rows(stages["stage1"]) if r["kind"] in ("keychain", "qa")]
    assert len(rows) == 30
    for r in rows:
        assert 1 <= k_of[(r["source"], r["id"].split(f"-{r['kind']}-", 1)[1])] <= 6
    kept = kc.read_rows(run / "data" / "filter" / "hotpotqa.jsonl")
    assert len(kept) == sum(1 <= k <= 6 for (s, _), k in k_of.items() if s == "hotpotqa")


def test_released_set_trains_warmup_on_non_keychain_rows(tmp_path, tiny_tok, raw):
    from test_keychain import RELEASED_SOURCES, released_parquet

    kc_row = kc.synth(kc.Config(input=raw["hotpotqa"], n=1, max_tokens=4096, key_style="short"), tiny_tok)[0][0]
    folder = tmp_path / "LoongRL-Train-Data" / "data"
    folder.mkdir(parents=True)
    released_parquet(folder / "train-00000-of-00001.parquet", kc_row, tiny_tok)
    run = tmp_path / "run"
    stages = cur.prepare(cur.Config(preset="7b", run_dir=str(run), released=str(folder.parent), max_tokens=2048), run)
    s1, wu = kc.read_rows(stages["stage1"]), kc.read_rows(stages["warmup"])
    assert len(s1) == len(RELEASED_SOURCES) and len(wu) == len(RELEASED_SOURCES) - 1
    assert {r["kind"] for r in wu} == {"qa", "ruler", "math", "choice"}
    kc_rows = [r for r in s1 if r["kind"] == "keychain"]
    assert len(kc_rows) == 1 and kc_rows[0]["num_tokens"] > 2048 and kc.verify_row(kc_rows[0], None) == []


def test_rehearsal_shares_released_rows_and_filter_items(tmp_path, tiny_tok, raw):
    from test_keychain import released_parquet

    # STEPS=N: --scale=0.5 keeps half of each released part (at least one row), drawn with the seed
    kc_row = kc.synth(kc.Config(input=raw["hotpotqa"], n=1, max_tokens=4096, key_style="short"), tiny_tok)[0][0]
    released_parquet(tmp_path / "train.parquet", kc_row, tiny_tok)
    parts = cur.released_parts(cur.Config(preset="7b", released=str(tmp_path / "train.parquet"), max_tokens=2048,
                                          scale=0.5), tiny_tok)
    full = cur.released_parts(cur.Config(preset="7b", released=str(tmp_path / "train.parquet"), max_tokens=2048),
                              tiny_tok)
    assert {p: len(r) for p, r in full.items()} == {"keychain": 1, "qa": 1, "ruler": 3, "math": 2}
    assert {p: len(r) for p, r in parts.items()} == {"keychain": 1, "qa": 1, "ruler": 2, "math": 1}
    assert all(r in full[p] for p, rows in parts.items() for r in rows)
    # --filter_items=2: the filter samples the first two raw items of each source, and no others
    model = tmp_path / "filter-model"
    rollout.tiny_model(len(tiny_tok), seed=0).save_pretrained(str(model))
    tiny_tok.save_pretrained(str(model))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "curriculum.py", "filter", "--preset=7b", f"--run_dir={run}", "--engine=hf",
                        f"--hotpotqa={raw['hotpotqa']}", f"--twowiki={raw['2wiki']}", f"--musique={raw['musique']}",
                        f"--filter_model={model}", "--filter_items=2", "--filter_group=2", "--filter_new_tokens=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = sorted(rec["id"] for rec in kc.read_rows(run / "data" / "filter" / "counts.jsonl"))
    first = sorted(f"{src}/{it['id']}" for src in cur.QA_SOURCES for it in kc.load_items(raw[src], source=src)[0][:2])
    assert ids == first


def test_grpo_fails_when_many_rows_exceed_max_prompt_tokens(tmp_path):
    rows = [{"id": f"r{i}", "source": "s", "kind": "qa", "answers": ["a"], "num_tokens": 100 + 1000 * (i < 3),
             "messages": kc.chat("q")} for i in range(10)]
    kc.write_rows(tmp_path / "rows.jsonl", rows)
    r = subprocess.run([sys.executable, "grpo.py", f"--data={tmp_path / 'rows.jsonl'}", "--model=tiny", "--device=cpu",
                        f"--out_dir={tmp_path / 'out'}", "--max_prompt_tokens=500", "--steps=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and "3 of 10 rows over --max_prompt_tokens=500 left out" in r.stdout
    assert "3 of 10 rows (over 2%) exceed --max_prompt_tokens=500" in r.stderr
