"""
Where one gated projection's training step time goes, on this machine:

    python bench/bench_layer.py [--out 1536 --in 576 --tokens 850 --density 0.52]

1. One projection's forward and backward (float32, CPU, x (1, T, in)), the compact layer
   (rigsa.GatedSparseLinear) against the dense one it replaced (bench/dense_layer.py's DenseGatedLinear):
   median ms, and torch.profiler's split into the GEMMs (aten::mm) and everything else.
2. The index kernels the compact layer could use for the same numbers, median ms each: building
   m*dW (a scatter), reading the gradient at the free entries (a gather), the free positions from
   the mask, the merged weight W0 + alpha m dW; and the two that need no positions, working from the
   unpacked bits (masked_scatter_, masked_select).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import rigsa  # noqa: E402
from lib import util  # noqa: E402
from dense_layer import DenseGatedLinear  # noqa: E402  (the dense layer the compact one replaced)


def ms(f, repeats):
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def split(f, repeats):
    """(ms in aten::mm, ms in everything else) per call, from torch.profiler's self times."""
    with profile() as p:
        for _ in range(repeats):
            f()
    ev = p.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e3 / repeats
    mm = sum(e.self_cpu_time_total for e in ev if e.key == "aten::mm") / 1e3 / repeats
    return mm, total - mm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=util.number(int, 1), default=1536, help="out features [default: 1536, 135M's MLP]")
    ap.add_argument("--in", dest="inp", type=util.number(int, 1), default=576, help="in features [default: 576]")
    ap.add_argument("--tokens", type=util.number(int, 1), default=850)
    ap.add_argument("--density", type=util.number(float, 0, 1, lo_open=True), default=0.52,
                    help="the share of free entries, in (0, 1] [default: 0.52]")
    ap.add_argument("--repeats", type=util.number(int, 1), default=20)
    a = ap.parse_args()
    util.keep_freed_memory()   # as the training CLI does: freed blocks reused, not page-faulted afresh
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one {a.out}x{a.inp} projection, "
          f"{a.tokens} tokens, density {a.density:.2%}, float32, CPU\n")
    base = torch.nn.Linear(a.inp, a.out, bias=False).requires_grad_(False)
    C = rigsa.GatedSparseLinear(base, 1)
    n = C.numel()
    idx = torch.randperm(n)[:round(a.density * n)].sort().values
    C.set_free(idx, C.init_delta().view(-1)[idx])
    D = DenseGatedLinear(base, 1)
    D.mask.view(-1).zero_()
    D.mask.view(-1)[idx] = True
    D.delta.data.mul_(D.mask)
    x = torch.randn(1, a.tokens, a.inp, requires_grad=True)
    gy = torch.randn(1, a.tokens, a.out)
    layers = {"dense (old)": D, "compact": C}
    got = {name: [] for name in layers}
    for _ in range(5):   # the two interleaved, so that load slows them alike; medians of the rounds
        for name, L in layers.items():
            step = lambda L=L: L(x).backward(gy)  # noqa: E731
            got[name].append((ms(step, a.repeats), *split(step, a.repeats)))
    print("| layer | forward + backward ms | in aten::mm | outside it |")
    print("|---|---:|---:|---:|")
    for name, rows in got.items():
        t, mm, rest = (statistics.median(c) for c in zip(*rows))
        print(f"| {name} | {t:.2f} | {mm:.2f} | {rest:.2f} |")

    k = len(idx)
    d, gw, W0, alpha = torch.randn(k), torch.randn(n), torch.randn(n), torch.tensor(1e-3)
    inp, dn, packed = idx.numpy(), d.numpy(), C.mask.numpy()
    bits = torch.from_numpy(np.unpackbits(packed, count=n).view(bool))

    def numpy_scatter():
        z = np.zeros(n, np.float32)
        z[inp] = dn
        return z

    def put():
        z = torch.zeros(n)
        z[idx] = d
        return z
    cases = [
        ("m*dW (scatter)", "zeros + index_copy_ (used)", lambda: torch.zeros(n).index_copy_(0, idx, d)),
        ("m*dW (scatter)", "zeros + index_put_", put),
        ("m*dW (scatter)", "zeros + scatter_", lambda: torch.zeros(n).scatter_(0, idx, d)),
        ("m*dW (scatter)", "numpy fancy assignment", numpy_scatter),
        ("m*dW (scatter)", "zeros + masked_scatter_ of the unpacked bits (no positions needed)",
         lambda: torch.zeros(n).masked_scatter_(bits, d)),
        ("gradient at the free entries", "index_select (used)", lambda: gw.index_select(0, idx)),
        ("gradient at the free entries", "take", lambda: torch.take(gw, idx)),
        ("gradient at the free entries", "indexing gw[idx]", lambda: gw[idx]),
        ("gradient at the free entries", "gather", lambda: gw.gather(0, idx)),
        ("gradient at the free entries", "masked_select of the unpacked bits", lambda: gw.masked_select(bits)),
        ("free positions from the mask", "numpy unpackbits + nonzero (used)",
         lambda: np.nonzero(np.unpackbits(packed, count=n).view(bool))[0]),
        ("free positions from the mask", "torch nonzero (of the unpacked bits)", lambda: bits.nonzero()),
        ("free positions from the mask", "torch masked_select of an arange", lambda: torch.arange(n).masked_select(bits)),
        ("W0 + alpha m dW", "zeros, index_copy_, mul_, add_ (used above a quarter)",
         lambda: torch.zeros(n).index_copy_(0, idx, d).mul_(alpha).add_(W0)),
        ("W0 + alpha m dW", "W0 copy + index_add_ (used below a quarter)", lambda: W0.clone().index_add_(0, idx, alpha * d)),
    ]
    print(f"\n| what | kernel | ms ({n:,} entries, {k:,} free) |")
    print("|---|---|---:|")
    for what, kernel, f in cases:
        print(f"| {what} | {kernel} | {ms(f, 5 * a.repeats):.2f} |")


if __name__ == "__main__":
    main()
