"""Runs that survive what users do to them: bad input, a second run, a crash mid-write, Ctrl-C (issue 14)."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import curriculum as cur
import grpo
import keychain as kc

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def script(name, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


def one_line_error(r, msg):
    assert r.returncode != 0, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and msg in err, err


# ----------------------------------------------------------------------------- option parsing
@dataclass
class Opts:
    flag: bool = True  # a switch
    n: int = 3  # how many
    name: str = "x"


@pytest.mark.parametrize("val,want", [("true", True), ("1", True), ("yes", True), ("YES", True), ("false", False),
                                      ("0", False), ("no", False)])
def test_bools_accept_only_true_false_1_0_yes_no(val, want):
    assert kc.parse_config(Opts, [f"--flag={val}"]).flag is want
    assert kc.parse_config(Opts, ["--flag"]).flag is True


@pytest.mark.parametrize("arg,msg", [("--flag=maybe", "--flag expects true/false/1/0/yes/no, got 'maybe'"),
                                     ("--flag=", "--flag expects true/false/1/0/yes/no, got ''"),
                                     ("--n=two", "--n expects int, got 'two'"), ("--nope=1", "unknown option --nope")])
def test_bad_option_values_stop(arg, msg):
    with pytest.raises(SystemExit, match=msg):
        kc.parse_config(Opts, [arg])


def test_help_prints_each_options_comment(capsys):
    with pytest.raises(SystemExit):
        kc.parse_config(Opts, ["--help"], "doc")
    out = capsys.readouterr().out.splitlines()
    assert [x.split() for x in out[-3:]] == [["--flag=True", "a", "switch"], ["--n=3", "how", "many"], ["--name='x'"]]
    notes = kc.option_comments(grpo.Config)
    assert notes["group"] == "G: completions per prompt" and notes["adv_std"].startswith("divide by the group std")
    assert "format_steps" in kc.option_comments(cur.Config) and "max_tokens" in kc.option_comments(kc.Config)


@pytest.mark.parametrize("module", ["keychain", "reward", "rollout", "grpo", "curriculum", "eval"])
def test_every_option_of_every_file_is_explained_and_grouped(module):
    import dataclasses
    import importlib

    cls = importlib.import_module(module).Config
    names = [f.name for f in dataclasses.fields(cls)]
    notes = kc.option_comments(cls)
    assert [n for n in names if not notes.get(n, "").strip()] == []  # each field's reason reaches --help
    groups = kc.option_groups(cls)
    assert names[0] in groups and len(set(groups.values())) >= 3  # grouped under headers from the first field on


# ----------------------------------------------------------------------------- bad input: one line, nothing created
@pytest.fixture
def rows_dir(tmp_path):
    good = {"id": "r0", "source": "s", "kind": "qa", "messages": kc.chat("Is it? Question: yes or no"), "answers": ["yes"]}
    kc.write_rows(tmp_path / "good.jsonl", [good] * 4)
    kc.write_rows(tmp_path / "no_answers.jsonl", [good, {k: v for k, v in good.items() if k != "answers"}])
    (tmp_path / "torn.jsonl").write_text(json.dumps(good) + "\n" + '{"id": "r1", "mess')
    return tmp_path


@pytest.mark.parametrize("args,msg", [
    (["--data=missing.jsonl"], "--data=missing.jsonl: no such file"),
    (["--data=torn.jsonl"], "torn.jsonl: record 1 (line 2): invalid JSON"),
    (["--data=no_answers.jsonl"], "no_answers.jsonl: record 1 (r0): 'answers' must be a non-empty list"),
    (["--data=good.jsonl", "--model=no/such-model", "--batch_prompts=4"], "--model=no/such-model: cannot load its config"),
    (["--data=good.jsonl", "--batch_prompts=0"], "--batch_prompts=0 must be positive"),
    (["--data=good.jsonl", "--steps=-1"], "--steps=-1 must not be negative"),
    (["--data=good.jsonl", "--batch_prompts=4", "--group=1"], "--group=1 must be at least 2: GRPO's baseline is"),
    (["--data=good.jsonl", "--batch_prompts=4", "--dual_clip=1"], "--dual_clip=1.0 must be 0 (off) or above 1"),
    (["--data=good.jsonl", "--adv_std=maybe"], "--adv_std expects true/false/1/0/yes/no"),
    (["--data=good.jsonl", "--batch_prompts=8"], "4 rows within --max_prompt_tokens, fewer than one batch of 8"),
    (["--data=good.jsonl", "--batch_prompts=4", "--engine=vllm"], "--engine=vllm loads the model from a folder"),
])
def test_grpo_bad_input_is_one_line_and_creates_nothing(rows_dir, args, msg):
    model = [] if any(a.startswith("--model") for a in args) else ["--model=tiny"]
    one_line_error(script("grpo.py", *args, *model, "--out_dir=out", "--device=cpu", cwd=rows_dir), msg)
    assert not (rows_dir / "out").exists() and not (rows_dir / "data").exists()


@pytest.mark.parametrize("args,msg", [
    (["bogus"], "unknown command 'bogus'"),
    (["synth", "--input=nope.json", "--out=x.jsonl"], "--input file not found: nope.json"),
    (["synth", "--kind=qa", "--out=x.jsonl"], "synth needs --input"),
    (["synth", "--input=x.json"], "synth needs --out"),
    (["verify", "--input=nope.jsonl"], "--input file not found: nope.jsonl"),
    (["synth", "--kind=ruler", "--out=x.jsonl", "--max_tokens=0"], "--max_tokens=0 is out of range"),
])
def test_keychain_bad_input_is_one_line_and_creates_nothing(tmp_path, args, msg):
    one_line_error(script("keychain.py", *args, cwd=tmp_path), msg)
    assert list(tmp_path.iterdir()) == []


def test_keychain_verify_without_keychain_rows_fails(tmp_path):
    kc.write_rows(tmp_path / "qa.jsonl", [{"id": "a", "kind": "qa", "messages": kc.chat("q"), "answers": ["x"]}])
    r = script("keychain.py", "verify", "--input=qa.jsonl", cwd=tmp_path)
    assert r.returncode == 1 and "no KeyChain rows to verify" in r.stderr


def test_keychain_demo_without_keychain_rows_fails(tmp_path):
    r = script("keychain.py", "demo", "--out_dir=d/raw", "--max_tokens=1024", cwd=tmp_path)
    assert r.returncode == 1 and "demo built no KeyChain rows" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args,msg", [
    (["bogus", "--run_dir=run"], "unknown command 'bogus'"),
    (["summary", "--run_dir=run"], "error: run dir run does not exist"),
    (["check", "--preset=13b", "--run_dir=run"], "unknown preset '13b'"),
    (["mine", "--run_dir=run", "--model=m"], "run/data/stage1.jsonl does not exist"),
    (["prepare", "--run_dir=run", "--scale=0"], "--scale=0.0 must be positive"),
    (["format", "--preset=7b", "--run_dir=run"], "format warm-up is for the tiny preset"),
])
def test_curriculum_bad_input_is_one_line_and_creates_nothing(tmp_path, args, msg):
    one_line_error(script("curriculum.py", *args, cwd=tmp_path), msg)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- resume: append-only files
def test_resume_cuts_logs_back_to_the_checkpoint_and_drops_a_torn_line(tmp_path, capsys):
    out = tmp_path / "stage1"
    (out / "rollouts").mkdir(parents=True)
    log = [{"step": s, "reward": s / 10} for s in (1, 2, 3, 3, 4)]  # step 3 ran twice: a crash, a resume
    (out / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log) + '{"step": 5, "rew')
    (out / "mining.jsonl").write_text("".join(json.dumps({"id": i, "n": 4, "k": 1, "step": s}) + "\n"
                                              for s in (1, 2, 3, 4) for i in "ab"))
    for s in (1, 2, 3, 4):
        kc.write_rows(out / "rollouts" / f"step_{s:06d}.jsonl", [{"step": s}])
    grpo.trim_logs(out, 2)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert [r["step"] for r in kc.read_rows(out / "mining.jsonl")] == [1, 1, 2, 2]
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"{out}: continuing at step 2: removed 8 log lines and 2 rollout files written after it "
                    "(or torn by a crash)"]
    grpo.trim_logs(out, 2)  # nothing left to cut: silent
    assert capsys.readouterr().out == ""


def test_torn_mining_counts_line_is_dropped(tmp_path):
    part = tmp_path / "counts.rank1.jsonl"
    part.write_text('{"id": "a", "n": 8, "k": 3}\n{"id": "b", "n": 8, "k"')
    assert grpo.trim_jsonl(part) == 1
    assert kc.read_rows(part) == [{"id": "a", "n": 8, "k": 3}]
    assert grpo.trim_jsonl(part) == 0


# ----------------------------------------------------------------------------- train.sh: lock, Ctrl-C
def test_second_run_on_a_locked_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (run / ".lock").write_text("pid 4242 on node7 since 2026-01-01 00:00:00 UTC\n")
        r = subprocess.run(["bash", "train.sh", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**ENV, "PYTHON": sys.executable, "RUN_DIR": str(run)})
    assert r.returncode == 2 and "pid 4242 on node7 since 2026-01-01" in r.stderr and "in use" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else was created


def test_ctrl_c_stops_the_run_quietly_and_leaves_nothing_running(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(["bash", "train.sh", "tiny"], cwd=ROOT, env={**ENV, "PYTHON": sys.executable,
                         "RUN_DIR": str(run)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 300
    while not (run / "data" / "manifest.json").exists() and not (run / "format").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted; run the same command again" in err, err
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert left == []
