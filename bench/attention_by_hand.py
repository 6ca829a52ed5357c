"""
A training step's attention written by hand against SDPA (BENCHMARKS.md, "Why 1.6x is out of reach"):
one layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64), forward and backward,
float32 and bfloat16. By hand: per KV head one batched GEMM over its query heads' rows, the causal
mask added, the softmax in float32, then the GEMM with V; autograd for the backward.

    .venv/bin/python bench/attention_by_hand.py --tokens 850 --repeats 8
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import util  # noqa: E402  (the flags' ranges)

H, KV, D = 9, 3, 64   # SmolLM2-135M


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def by_hand(q, k, v, mask):
    B, _, T, _ = q.shape                                                    # q (B, H, T, D); k, v (B, KV, T, D)
    s = torch.matmul(q.reshape(B, KV, H // KV * T, D), k.transpose(-1, -2))  # (B, KV, H/KV*T, T)
    p = (s.view(B, H, T, T).float() * D ** -0.5 + mask).softmax(-1)         # the softmax in float32
    return torch.matmul(p.to(q.dtype).view(B, KV, H // KV * T, T), v).view(B, H, T, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=util.number(int, 1), default=850)
    ap.add_argument("--repeats", type=util.number(int, 1), default=8, help="the median of this many forward + backward passes")
    ap.add_argument("--threads", type=util.number(int, 1), default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T = a.tokens
    mask = torch.full((T, T), float("-inf")).triu(1)
    for dtype in (torch.float32, torch.bfloat16):
        for name, f in (("sdpa", sdpa), ("by hand", lambda q, k, v: by_hand(q, k, v, mask))):
            q = torch.randn(1, H, T, D, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, KV, T, D, dtype=dtype, requires_grad=True) for _ in range(2))
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                f(q, k, v).sum().backward()
                ts.append(time.perf_counter() - t)
            print(f"{str(dtype).removeprefix('torch.'):<9} {name:<8} {1000 * sorted(ts)[len(ts) // 2]:6.1f} ms "
                  f"(one layer, {T} tokens, forward + backward)")


if __name__ == "__main__":
    main()
