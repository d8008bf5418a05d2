"""Runs one GRPO stage with a toy reward under torchrun or plain python (used by tests/test_grpo.py).

    python tests/grpo_worker.py --data=rows.jsonl --model=tiny --out_dir=... [grpo.py options]

The toy reward is the share of lowercase ASCII letters in the completion: a tiny random model can learn it in
minutes, and rewards differ within a group from the first step, so every step updates the weights.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import keychain  # noqa: E402


def share_of_lowercase(rows, texts):
    return [(sum("a" <= ch <= "z" for ch in t) / max(1, len(t)), {}) for t in texts]


if __name__ == "__main__":
    cfg = keychain.parse_config(grpo.Config, sys.argv[1:], __doc__)
    grpo.train(cfg, reward_fn=share_of_lowercase)
    grpo.finish()
