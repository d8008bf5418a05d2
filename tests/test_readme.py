"""The README, checked where a machine can check it: its size, the presets, flags, files and images it names, and
the summary excerpt it quotes. A README that drifts from the code is how a newcomer's first command fails."""
import ast
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")])


def blocks() -> tuple[list[str], list[list[str]]]:
    """README lines outside fenced code blocks, and the fenced blocks (each a list of lines)."""
    prose, code, fenced = [], [], False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            if fenced:
                code.append([])
        elif fenced:
            code[-1].append(line)
        else:
            prose.append(line)
    return prose, code


def commands() -> list[str]:
    """Shell commands of the code blocks, continuation lines joined, comments cut."""
    out = []
    for block in blocks()[1]:
        text = "\n".join(block).replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.extend(part.strip() for part in re.split(r"&&|;|\|\|", line))
    return out


@lru_cache(maxsize=None)
def options(script: str) -> frozenset[str]:
    """The --key names `python SCRIPT --help` lists (every script prints its config dataclass)."""
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{script} --help failed: {res.stderr[-500:]}"
    found = frozenset(re.findall(r"^\s+--([a-z0-9_]+)=", res.stdout, flags=re.M))
    assert found, f"{script} --help lists no options"
    return found


def test_size_and_width():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README has {len(lines)} lines (at most 250)"
    prose, _ = blocks()
    wide = [line for line in prose if len(line) > 120]
    assert not wide, f"{len(wide)} README lines outside code are over 120 characters: {wide[0][:80]}..."


def test_presets_exist():
    named = set(re.findall(r"bash train\.sh ([a-z0-9-]+)", README))
    assert {"tiny", "7b"} <= named
    res = subprocess.run(["bash", "train.sh", "no-such-preset"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    listed = set(re.search(r"\(([^)]*)\)", res.stderr).group(1).replace(" ", "").split("|"))
    assert named <= listed, f"README names presets train.sh does not have: {sorted(named - listed)}"


def test_command_flags_are_accepted():
    """Every --flag after a script of ours in a README command is an option of that script."""
    checked = 0
    for cmd in commands():
        m = re.search(r"(?:python3?|torchrun[^\n]*?)\s+((?:bench/)?[a-z_]+\.py)\b(.*)$", cmd)
        if not m or m.group(1) not in SCRIPTS:
            continue
        flags = set(re.findall(r"(?<![\w-])--([a-z0-9_]+)", m.group(2))) - {"help"}
        unknown = flags - options(m.group(1))
        assert not unknown, f"README command `{cmd[:90]}` passes {sorted(unknown)}, which {m.group(1)} does not take"
        checked += 1
    assert checked >= 3


def test_prose_flags_exist():
    """A `--flag` named in the prose is an option of some script (`--key=value` is the convention itself)."""
    prose = "\n".join(blocks()[0])
    spans = [span for span in re.findall(r"`([^`]+)`", prose) if not span.startswith("pip ")]  # pip's own flags
    named = {flag for span in spans for flag in re.findall(r"(?<![\w-])--([a-z0-9_]+)", span)} - {"help", "key"}
    known = set().union(*(options(s) for s in SCRIPTS))
    assert not named - known, f"README names flags no script takes: {sorted(named - known)}"


def test_linked_files_exist():
    links = re.findall(r"\]\(([^)#\s]+)\)", README) + re.findall(r'src="([^"]+)"', README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links files that do not exist: {missing}"
    named = {p for p in re.findall(r"`((?:bench|tests|assets)/[\w./-]+|[\w-]+\.(?:py|sh|txt))`", README)}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
    assert any(link.startswith("assets/") and link.endswith(".png") for link in local), "no picture from assets/"


def test_summary_excerpt_is_quoted_from_the_run():
    """The summary.md lines the README shows are lines of the tiny run's summary that assets/make.sh copied."""
    m = re.search(r"<!-- excerpt of (assets/[\w.]+) -->\s*```[a-z]*\n(.*?)```", README, flags=re.S)
    assert m, "README has no summary excerpt"
    source = (ROOT / m.group(1)).read_text().splitlines()
    for line in m.group(2).splitlines():
        assert line in source, f"README excerpt line not in {m.group(1)}: {line!r}"


def test_docstrings_print_clean():
    """`python FILE.py --help` prints the module docstring: no control characters from an unescaped backslash."""
    for script in SCRIPTS:
        doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False) or ""
        bad = sorted({hex(ord(c)) for c in doc if ord(c) < 32 and c not in "\n\t"})
        assert not bad, f"{script}'s docstring holds control characters {bad} (make it a raw string)"
