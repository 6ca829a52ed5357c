"""
The low-precision training step against the exact float32 one, both sides in one process on the same
machine: what --dtype auto buys where the hardware computes bfloat16 natively.

    python bench/bench_precision.py [--preset SmolLM2-135M-Instruct] [--tokens 850] [--steps 5] [--part step,dx,gemm]
    python bench/bench_precision.py --part profile,attention     # where a step's time goes
    python bench/bench_precision.py --part step --keep 0.8       # the same after one pruning (masked layers)

One step = one 850-token sequence (a Textual MNIST prompt), its 2 supervised tokens, forward,
backward and AdamW, as rigsa.batch_loss and train_step do; random weights. Variants, their steps
interleaved (median of --steps after a warm-up each), so that other load slows them alike:
  rigsa float32       the exact path: one GEMM on W0 + alpha m dW, float32 everywhere (--dtype float32)
  rigsa bfloat16      --dtype auto on such hardware: bfloat16 W0 under autocast, dW and AdamW in float32;
                      GatedDelta's 4 GEMMs (forward x W0^T + alpha x (m dW)^T; dx on the merged weight
                      rounded once; dW one GEMM)
  rigsa bf16 5-GEMM   the same with dx = gy W0 + alpha gy (m dW): the form that keeps a sub-ulp delta in dx
  full bfloat16       plain full fine-tuning under the same autocast, every weight trained (3 GEMMs)
--part dx: the input gradient of a 576x576 layer over 2,048 tokens, one GEMM on the rounded merged
weight against two, for deltas of a quarter and 4 ulps of W0: the error against float32, and the share
of the delta's own contribution that reaches dx. --part gemm: this CPU's float32 and bfloat16 GEMM
rates; a dense bfloat16 product against torch's CSR one at three densities (850x576 @ 576x1536).
--part profile: one step of rigsa float32, rigsa bfloat16 and full bfloat16 under torch.profiler
(after two warm-up steps): GEMMs, flash attention (forward and backward) and the rest, self time.
--part attention: one layer's causal attention over --tokens tokens, forward and backward, in both
dtypes: SDPA with enable_gqa (model.py), with K/V expanded, and the math backend.
--part loop: `rigsa.py train` itself, as a user runs it, in float32 and in bfloat16, one after the
other: a random --preset checkpoint, synthetic digits, one IMP iteration of --loop-steps optimizer
steps of 16 sequences (--micro-batch, default the paper's 1: AdamW once per 16 sequences, where the
step table above runs it after every sequence); tokens/s as the run logs it: its average over the
steps so far (the last logged line), the first step's warm-up included.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M  # noqa: E402
import rigsa  # noqa: E402
from lib import sparse  # noqa: E402
from lib import util  # noqa: E402


def five_gemm_backward(ctx, gy):
    """GatedDelta's backward with the input gradient in two GEMMs (the previous form), for comparison."""
    x, delta, alpha, index = ctx.saved_tensors
    L = ctx.layer
    index = None if index is None else index.long()
    md = L.dense(delta, index)
    gy2, x2 = gy.reshape(-1, L.out_features), x.reshape(-1, L.in_features)
    gx = (gy2.mm(L.weight) + (gy2 * alpha.to(x.dtype)).mm(md.to(x.dtype))).view_as(x)
    gw = gy2.t().mm(x2).float()
    g = gw.view(-1) if index is None else gw.view(-1).index_select(0, index)
    return gx, g * alpha, (gw * md).sum(), None


def make_step(variant, a):
    torch.manual_seed(0)
    cfg = M.PRESETS[a.preset]
    dtype = torch.float32 if variant == "rigsa float32" else torch.bfloat16
    m = M.Model(cfg).to(dtype=dtype).train()
    if variant.startswith("full"):
        params = list(m.parameters())
    else:
        layers = rigsa.install_adapters(m, rigsa.Config())
        if a.keep:   # a later IMP iteration's layers: masked, rebuilt from their free entries in each pass
            rigsa.prune(layers, keep=a.keep)
        params = [p for L in layers.values() for p in (L.delta, L.alpha)]
    amp = torch.autocast("cpu", torch.bfloat16) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1.0, foreach=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, a.tokens), generator=g)
    pos = torch.tensor([a.tokens - 2, a.tokens - 1])
    backward = five_gemm_backward if variant.endswith("5-GEMM") else sparse.GatedDelta.backward

    def step():
        sparse.GatedDelta.backward = staticmethod(backward)
        with amp:
            h = m(ids, hidden_only=True)                               # (1, T, C)
            logits = m.lm_head(h[0, pos - 1]).float()                  # (2, V)
        F.cross_entropy(logits, ids[0, pos]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


VARIANTS = ("rigsa float32", "rigsa bfloat16", "rigsa bf16 5-GEMM", "full bfloat16")


def rate(f, reps=20, budget=5.0):
    """Mean seconds per call after a warm-up call; fewer than `reps` calls where the warm-up shows they
    would take over `budget` seconds (a GEMM in bfloat16 emulated on a CPU without it takes up to minutes)."""
    t = time.perf_counter()
    f()
    first = time.perf_counter() - t
    reps = min(reps, int(budget / max(first, 1e-9)))
    if reps == 0:                  # one call takes more than the budget: its own time, warm-up and all
        return first
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def dx_part():
    """dx = gy (W0 + delta) with one GEMM on the merged weight rounded to bfloat16, or two (gy W0 + gy delta)."""
    torch.manual_seed(0)
    w0 = (torch.randn(576, 576) * 0.02).bfloat16().float()
    ulp = 2.0 ** (torch.frexp(w0)[1].float() - 8)                      # bfloat16's ulp at each entry of W0
    gy = torch.randn(2048, 576)
    print("\n| delta | dx error, 4 GEMMs | dx error, 5 GEMMs | delta's share in dx, 4 | in dx, 5 |\n|---|---:|---:|---:|---:|")
    for name, delta in (("0.25 ulp, random signs", 0.25 * ulp * torch.sign(torch.randn_like(w0))),
                        ("4 ulps, random signs", 4 * ulp * torch.sign(torch.randn_like(w0)))):
        exact, g16 = gy @ (w0 + delta), gy.bfloat16()
        four = g16.mm((w0 + delta).bfloat16()).float()
        five = (g16.mm(w0.bfloat16()) + g16.mm(delta.bfloat16())).float()
        base, dc = g16.mm(w0.bfloat16()).float(), gy @ delta
        err = lambda a: ((a - exact).norm() / exact.norm()).item()    # noqa: E731
        kept = lambda a: (((a - base) * dc).sum() / (dc * dc).sum()).item()   # noqa: E731
        print(f"| {name} | {err(four):.1e} | {err(five):.1e} | {kept(four):.0%} | {kept(five):.0%} |")


def gemm_part():
    print("\n| product | float32 GFLOP/s | bfloat16 GFLOP/s | ratio |\n|---|---:|---:|---:|")
    for m, k, n in ((850, 576, 1536), (850, 2048, 8192)):
        r = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            r[dt] = 2 * m * k * n / rate(lambda: a @ b) / 1e9
        print(f"| {m}x{k} @ {k}x{n} | {r[torch.float32]:.3g} | {r[torch.bfloat16]:.3g} | "
              f"{r[torch.bfloat16] / r[torch.float32]:.3g} |")
    x = torch.randn(850, 576)
    print("\n| density of m dW | dense bfloat16 ms | CSR float32 ms |\n|---:|---:|---:|")
    for d in (0.8, 0.25, 0.035):
        md = torch.randn(1536, 576) * (torch.rand(1536, 576) < d)
        dense, csr, x16 = md.bfloat16(), md.to_sparse_csr(), x.bfloat16()
        print(f"| {d:.1%} | {rate(lambda: x16 @ dense.t()) * 1e3:.2f} | "
              f"{rate(lambda: torch.sparse.mm(csr, x.t())) * 1e3:.2f} |")


def profile_part(a):
    from torch.profiler import ProfilerActivity, profile
    print("\n| one step | s | GEMMs s | flash attention s | the rest s |\n|---|---:|---:|---:|---:|")
    for v in ("rigsa float32", "rigsa bfloat16", "full bfloat16"):
        step = make_step(v, a)
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            step()
        own = {e.key: e.self_cpu_time_total / 1e6 for e in p.key_averages()}
        total, mm = sum(own.values()), own.get("aten::mm", 0.0)
        attn = sum(t for k, t in own.items() if "scaled_dot_product" in k)
        print(f"| {v} | {total:.2f} | {mm:.2f} | {attn:.2f} | {total - mm - attn:.2f} |")


def attention_part(a):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = M.PRESETS[a.preset]
    H, KV, D, g = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    print(f"\n| one layer's attention, {a.tokens} tokens, forward + backward | float32 ms | bfloat16 ms |\n|---|---:|---:|")
    forms = {"SDPA, enable_gqa (model.py)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "SDPA, K/V expanded": lambda q, k, v: F.scaled_dot_product_attention(
                 q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)}

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return forms["SDPA, K/V expanded"](q, k, v)
    forms["math backend"] = math
    for name, f in forms.items():
        ms = []
        for dt in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, h, a.tokens, D, dtype=dt, requires_grad=True) for h in (H, KV, KV))
            ms.append(rate(lambda: f(q, k, v).sum().backward(), reps=10) * 1e3)
        print(f"| {name} | {ms[0]:.1f} | {ms[1]:.1f} |")


def loop_part(a):
    import dataclasses
    import json
    import subprocess
    import tempfile
    from lib import mnist, tiny
    cfg = M.PRESETS[a.preset]
    if a.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as work:
        mdir, data = os.path.join(work, "model"), os.path.join(work, "data")
        tiny.write_tokenizer(mdir, 512)                      # digits one per token, as SmolLM2's
        tiny.write_random_checkpoint(mdir, cfg, seed=0)
        mnist.write_synthetic_mnist(os.path.join(data, "mnist"), n_train=16 * a.loop_steps + 40, n_test=4, size=28)
        tok = M.load_tokenizer(mdir)
        T = len(rigsa.encode_example(tok, [[0] * 28] * 28, 0, rigsa.digit_ids(tok), rigsa.end_id(tok))[0])
        print(f"\n| rigsa.py train, {a.loop_steps} steps of 16 sequences of {T} tokens, --micro-batch {a.micro_batch} "
              f"| s/step | tokens/s (the run's average) | x float32 |\n|---|---:|---:|---:|")
        res = {}
        for dt in ("float32", "bfloat16"):
            out = os.path.join(work, dt)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, os.path.join(repo, "rigsa.py"), "train", "--model", mdir,
                                "--data-dir", data, "--offline", "--no-verify", "--dtype", dt, "--iters", "1",
                                "--steps", str(a.loop_steps), "--micro-batch", str(a.micro_batch), "--val-frac", "0.02",
                                "--limit", "4", "--log-every", "1", "--out", out],
                               cwd=repo, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if p.returncode:
                raise SystemExit(f"rigsa.py train --dtype {dt} failed:\n" + (p.stdout + p.stderr)[-3000:])
            log = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
            steps = [r for r in log if "tok_s" in r]
            res[dt] = steps[-1]["tok_s"]
            print(f"| {dt} | {16 * T / res[dt]:.1f} | {res[dt]:.0f} | {res[dt] / res['float32']:.2f} |"
                  f"  <!-- whole run {time.perf_counter() - t:.0f} s -->", flush=True)


PARTS = ("step", "dx", "gemm", "profile", "attention", "loop")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--layers", type=util.number(int, 0), default=0, help="keep only the first N decoder layers (0: all)")
    # a prompt token and the two supervised ones at least (make_step: labels at T-2, T-1)
    ap.add_argument("--tokens", type=util.number(int, 3), default=850)
    ap.add_argument("--steps", type=util.number(int, 1), default=5)
    ap.add_argument("--keep", type=util.number(float, 0, 1, lo_open=True), default=None,
                    help="--part step, profile: prune the adapters once at this keep first (0.8: IMP's second "
                         "iteration) [default: dense, the first]")
    ap.add_argument("--part", type=util.comma_list(PARTS, "table"), default="step,dx,gemm", help="which tables: step, dx, gemm, profile, attention, "
                    "loop [default: step,dx,gemm]")
    ap.add_argument("--loop-steps", type=util.number(int, 1), default=3, help="--part loop: optimizer steps per run")
    # at most rigsa.py's --batch-size, 16, which --part loop keeps
    ap.add_argument("--micro-batch", type=util.number(int, 1, 16), default=1, help="--part loop: rigsa.py's --micro-batch")
    a = ap.parse_args()
    util.keep_freed_memory()
    parts = a.part.split(",")
    if "dx" in parts:
        dx_part()
    if "gemm" in parts:
        gemm_part()
    if "attention" in parts:
        attention_part(a)
    if "profile" in parts:
        profile_part(a)
    if "loop" in parts:
        loop_part(a)
    if "step" not in parts:
        return
    if a.layers:
        import dataclasses
        M.PRESETS[a.preset] = dataclasses.replace(M.PRESETS[a.preset], num_hidden_layers=a.layers)
    real = sparse.GatedDelta.backward
    steps = {v: make_step(v, a) for v in VARIANTS}
    ts = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        steps[v]()   # warm-up: AdamW's state, the thread pools
    for _ in range(a.steps):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            ts[v].append(time.perf_counter() - t0)
    sparse.GatedDelta.backward = real
    med = {v: statistics.median(t) for v, t in ts.items()}
    cfg = M.PRESETS[a.preset]
    print(f"\n{a.preset} shape ({cfg.num_hidden_layers} layers), one {a.tokens}-token sequence per step"
          + (f", adapters pruned once at keep {a.keep}" if a.keep else "") + ", CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f" (native bfloat16: {util.native_bf16('cpu') or 'no'}), load avg {os.getloadavg()[0]:.1f}\n")
    print("| training step | s/step | tokens/s | x rigsa float32 |\n|---|---:|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {med[v]:.3f} | {a.tokens / med[v]:.0f} | {med['rigsa float32'] / med[v]:.2f} |")


if __name__ == "__main__":
    main()
