"""P4 lever 2 on CPU: forward + backward of the fused L_ce + L_mlm (``losses.kd_mlm_loss``) against today's
``alpha_ce · ce_loss + alpha_mlm · mlm_loss``, side by side in one process. Prints one JSON line.

rows × vocab fp32 logits (default 1,024 × 30,522), KD over every row (kd_positions "all"), ~15 % of rows
labelled, T = 2, α_ce = 5, α_mlm = 2, local norms. Each variant runs once to warm up (the compiled one
compiles then; ``compile_s`` is that first call), then ``--repeats`` times, interleaved; the minimum counts.

    python benchmarks/kd_loss.py [--rows 1024] [--vocab 30522] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import losses  # noqa: E402
from pipeline.masking import IGNORE_INDEX  # noqa: E402

T, ALPHA_CE, ALPHA_MLM = 2.0, 5.0, 2.0


def make_inputs(rows: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, rows, vocab, generator=g).requires_grad_(True)
    t = torch.randn(1, rows, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    labels[torch.rand(1, rows, generator=g) > 0.15] = IGNORE_INDEX
    return s, t, labels, torch.ones(1, rows)


def today(s, t, labels, weight) -> float:
    """fwd + bwd of the two separate terms; returns the loss (so both variants can be checked to agree)."""
    loss = ALPHA_CE * losses.ce_loss(s, t, weight.bool(), temperature=T) + ALPHA_MLM * losses.mlm_loss(s, labels)
    loss.backward()
    return loss.item()


def fused(s, t, labels, weight) -> float:
    loss, _, _ = losses.kd_mlm_loss(s, t, labels, weight, temperature=T, alpha_ce=ALPHA_CE, alpha_mlm=ALPHA_MLM,
                                    norm_ce=None, norm_mlm=None)
    loss.backward()
    return loss.item()


def timed(fn, inputs, compile_blocks: bool) -> tuple[float, float]:
    losses.COMPILE_BLOCKS = compile_blocks
    inputs[0].grad = None
    start = time.perf_counter()
    value = fn(*inputs)
    return time.perf_counter() - start, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.rows, args.vocab)
    variants = {"today_eager": (today, False), "fused_eager": (fused, False), "fused_compiled": (fused, True)}
    first = {name: timed(fn, inputs, comp) for name, (fn, comp) in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (fn, comp) in variants.items():
            times[name].append(timed(fn, inputs, comp)[0])
    best = {name: min(ts) for name, ts in times.items()}
    values = [v for _, v in first.values()]
    print(json.dumps({
        "benchmark": "kd_loss", "rows": args.rows, "vocab": args.vocab, "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__,
        "fwd_bwd_s": {name: round(t, 4) for name, t in best.items()},
        "compile_s": round(first["fused_compiled"][0], 1),
        "ratio_today_over_fused_compiled": round(best["today_eager"] / best["fused_compiled"], 2),
        "ratio_today_over_fused_eager": round(best["today_eager"] / best["fused_eager"], 2),
        "max_rel_diff_of_loss": max(abs(v - values[0]) / abs(values[0]) for v in values),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
