import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keychain  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """The byte-level tokenizer built offline: one token per UTF-8 byte, ChatML specials."""
    return keychain.make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    """Procedurally generated raw HotpotQA / 2Wiki / MuSiQue / DAPO / MathQA files."""
    return keychain.generate_raw(str(tmp_path_factory.mktemp("raw")), n=40, seed=1)
