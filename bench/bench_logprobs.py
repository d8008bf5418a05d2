"""Peak memory and time of completion log-probs: chunked (grpo.Policy) against naive full logits.

    python bench/bench_logprobs.py                       # 4,096 tokens, Qwen2.5 vocabulary 151,936, hidden 896

Forward and backward of the sum of the log-probs through the lm_head only (what differs between the two
paths): naive = full [tokens x vocab] logits and autograd; chunked = grpo.FusedLogpLoss. Each variant runs in a fresh process; its peak is the rise of the process's peak RSS (CPU) or of
torch.cuda.max_memory_allocated (GPU) above the inputs, weights and their gradients, which both paths share.
Time: the median of `repeats` runs after a warm-up (the machine is shared: a minimum flatters whichever variant
met a quiet moment). `--rounds=R` alternates the two variants R times and reports the median over rounds.
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclasses.dataclass
class Config:
    tokens: int = 4096
    vocab: int = 151936
    hidden: int = 896
    chunk: int = 512  # grpo.Config.logit_chunk
    repeats: int = 5  # timed runs after one warm-up; the median is reported
    device: str = "cpu"
    rounds: int = 1  # naive/chunked process pairs, alternated; the median of their medians is reported
    variant: str = ""  # internal: run one variant and print JSON


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(c: Config) -> dict:
    import grpo

    torch.manual_seed(0)
    dev = torch.device(c.device)
    head = torch.nn.Linear(c.hidden, c.vocab, bias=False).to(dev)
    h = torch.randn(c.tokens, c.hidden, device=dev, requires_grad=True)
    tgt = torch.randint(0, c.vocab, (c.tokens,), device=dev)
    head.weight.grad = torch.zeros_like(head.weight)
    h.grad = torch.zeros_like(h)

    def chunked():  # the trainer's path: log-probs fused with the (here: summed) per-token loss
        return grpo.FusedLogpLoss.apply(h, head.weight, tgt, c.chunk, lambda lp, ent, sl: lp.sum())[0]

    def naive():
        return head(h).float().log_softmax(-1).gather(-1, tgt[:, None])[:, 0].sum()

    fn = chunked if c.variant == "chunked" else naive
    if c.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_mb(c.device)  # inputs, weight and both gradients: shared by the two paths
    times = []
    for _ in range(c.repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        fn().backward()
        if c.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return {"variant": c.variant, "time_s": times[len(times) // 2], "times": [round(t, 3) for t in times],
            "peak_extra_mb": peak_mb(c.device) - before}


def main() -> None:
    import keychain

    c = keychain.parse_config(Config, sys.argv[1:], __doc__)
    if c.variant:
        print(json.dumps(run_variant(c)))
        return
    runs: dict = {"naive": [], "chunked": []}
    for _ in range(c.rounds):
        for v in ("naive", "chunked"):
            args = [f"--{k}={getattr(c, k)}" for k in ("tokens", "vocab", "hidden", "chunk", "repeats", "device")]
            # a fixed mmap threshold makes glibc hand every large buffer back on free: peak RSS = peak live memory
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            out = subprocess.run([sys.executable, __file__, *args, f"--variant={v}"], capture_output=True,
                                 text=True, check=True, env=env)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {v: {"time_s": sorted(r["time_s"] for r in rs)[len(rs) // 2],
               "peak_extra_mb": max(r["peak_extra_mb"] for r in rs), "times": [r["times"] for r in rs]}
           for v, rs in runs.items()}
    n, k = res["naive"], res["chunked"]
    print(json.dumps({"load_avg": os.getloadavg(), "times_s": {v: r["times"] for v, r in res.items()}}))
    print(f"{c.tokens} tokens x vocab {c.vocab} x hidden {c.hidden} on {c.device}, chunk {c.chunk}, forward+backward")
    print(f"naive:   {n['peak_extra_mb']:8.0f} MB peak  {n['time_s']:.3f} s")
    print(f"chunked: {k['peak_extra_mb']:8.0f} MB peak  {k['time_s']:.3f} s")
    print(f"memory ratio {k['peak_extra_mb'] / n['peak_extra_mb']:.3f} (target < 0.125), "
          f"time ratio {k['time_s'] / n['time_s']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
