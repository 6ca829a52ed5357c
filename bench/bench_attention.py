"""
Where a GSM8k decode step spends its time, and how fast its attention reads the KV cache against
a plain read of the same memory: the measurement behind "GSM8k's CPU decode is bound by attention
per core" in BENCHMARKS.md. No lm-eval, no data files: a random SmolLM2-shaped model and a KV
cache of random keys and values whose rows have GSM8k-like lengths.

    python bench/bench_attention.py [--rows 128] [--lengths 839,1548] [--threads 2,1] [--dtype bfloat16]

1. A decode step of model.py (one new token for every row, lm_head and argmax included), timed,
   and split by torch.profiler into attention (SDPA), matmuls and the rest.
2. One step's attention alone (30 layers, the step's blocks of DECODE_GROUP rows, each over its
   own longest row) written four ways, in GB/s of keys and values read: a plain sum over the same
   slices (the memory's streaming rate; a bfloat16 sum is slow in itself), SDPA as model.py calls
   it, q @ K^T, softmax, @ V as batched matmuls, and in bfloat16 two_gemm (below) over each block
   copied to a contiguous tensor of exactly its filled slots beforehand (its best case: model.py's
   cache holds every row's slots in one buffer); with 2 and 1 threads, which tells a per-core limit
   from a memory-bus one.
3. With --dtype bfloat16: how far each form lands from float32 attention over the same (rounded)
   keys and values. The plain matmul form rounds the scores q K^T to bfloat16 (a CPU bfloat16
   matmul returns bfloat16); SDPA keeps them in float32; two_gemm recovers what the rounding lost
   with a second GEMM.
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402
from bench_model import timeit  # noqa: E402  (the median of `repeats` runs after a warm-up)


def two_gemm(q, K, V, bias):
    """Decoding attention in bfloat16 as batched GEMMs with nearly exact scores, measured here and not
    used by model.py (BENCHMARKS.md, "Where GSM8k's bfloat16 decode goes"). q (n, nkv, g, hd), K and V
    (n, nkv, S, hd) contiguous (a slice of fewer slots than the buffer runs one GEMM per matrix), bias
    (n, 1, 1, S) float32, 0 or -inf. A bfloat16 GEMM rounds each score to 8 bits, so the scores take
    two: r = bf16(q K^T), then baddbmm(r, q, K^T, beta=-1) = bf16(q K^T - r), which oneDNN sums in
    float32 before it rounds: r + that carries about 16 bits, as good as exact for the softmax."""
    n, nkv, g, hd = q.shape
    S = K.shape[2]
    q3, k3 = q.reshape(n * nkv, g, hd), K.view(n * nkv, S, hd).transpose(1, 2)   # (n nkv, g, hd), (n nkv, hd, S)
    r = torch.bmm(q3, k3)                                                   # (n nkv, g, S) bfloat16
    s = torch.baddbmm(r, q3, k3, beta=-1).float().add_(r)                   # q K^T, ~16 bits
    s = torch.add(bias, s.view(n, nkv, g, S), alpha=hd ** -0.5)              # scaled, masked (an added mask:
    p = torch.softmax(s, dim=-1).to(q.dtype)                                # a broadcast masked_fill is slower)
    return torch.bmm(p.view(n * nkv, g, S), V.view(n * nkv, S, hd)).view(n, nkv, g, hd)


def exact_residual():
    """Whether this CPU's bfloat16 baddbmm adds its input before it rounds (two_gemm needs it): q k =
    1 + 2^-10 rounds to 1 in bfloat16, and the second GEMM must leave 2^-10."""
    q = torch.zeros(4, 3, 64, dtype=torch.bfloat16)
    q[..., 0], q[..., 1] = 1.0, 2.0 ** -10
    k = torch.zeros(4, 128, 64, dtype=torch.bfloat16)
    k[..., :2] = 1.0
    k = k.transpose(1, 2)
    r = torch.bmm(q, k)
    return bool((r == 1).all()) and bool((torch.baddbmm(r, q, k, beta=-1) == 2.0 ** -10).all())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--rows", type=util.number(int, 1), default=128, help="decode batch (evals' CPU default for GSM8k)")
    ap.add_argument("--lengths", default="839,1548",
                    help="LO,HI filled slots, spread evenly over the rows (default: the first 128 GSM8k 5-shot "
                         "prompts, 711-1420 tokens with bench_generate's tokenizer, 128 tokens into their generation)")
    ap.add_argument("--threads", default="2,1", help="thread counts for part 2")
    ap.add_argument("--repeats", type=util.number(int, 1), default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights, cache and queries")
    a = ap.parse_args()
    try:
        lo, hi = (int(x) for x in a.lengths.split(","))
        threads = [int(x) for x in a.threads.split(",")]
        if not (1 <= lo <= hi and a.rows > 0 and all(t > 0 for t in threads)):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--lengths {a.lengths!r} / --threads {a.threads!r} / --rows {a.rows}: "
                         "expected LO,HI with 1 <= LO <= HI, positive thread counts and rows")
    util.keep_freed_memory()
    cfg, B = M.PRESETS[a.preset], a.rows
    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    model = M.Model(cfg).eval().requires_grad_(False)
    model.load_state_dict(tiny.random_state_dict(cfg, seed=0))
    model.to(dt)
    lens = torch.linspace(hi, lo, B).round().long()     # longest first, as generate_ids orders rows
    cache = M.KVCache(cfg, B, hi + 1, "cpu", dt)
    for buf in cache.k + cache.v:
        buf.normal_()
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dt.itemsize * int(lens.sum())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}; "
          f"{a.preset}, {B} rows, {lo}-{hi} filled slots, {kv_bytes / 1e9:.2f} GB of keys and values a step, {a.dtype}")

    # 1. the real decode step, and its split
    nxt = torch.randint(0, cfg.vocab_size, (B, 1))

    @torch.inference_mode()
    def step():
        cache.len[:] = lens   # the step appends one slot; start from the same lengths each time
        h = model(nxt, hidden_only=True, cache=cache)
        return model.lm_head(h[:, -1]).max(-1).indices

    t = timeit(step, a.repeats)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    attn = sum(v for k, v in self_us.items() if "scaled_dot_product" in k)
    mm = sum(v for k, v in self_us.items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"decode step: {t * 1000:.0f} ms, {t / B * 1000:.2f} ms a row; attention {attn / total:.0%}, "
          f"matmuls {mm / total:.0%}, the rest {(total - attn - mm) / total:.0%} (profiler, self time)")

    # 2. one step's attention alone, three ways
    g, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(B, cfg.num_key_value_heads, g, hd).to(dt)
    blocks = []
    for s in range(0, B, M.DECODE_GROUP):
        n = min(M.DECODE_GROUP, B - s)
        S = int(lens[s:s + n].max())
        m = (torch.arange(S) < lens[s:s + n, None])[:, None, None, :]           # (n, 1, 1, S)
        blocks.append((s, n, S, m, torch.zeros(m.shape, dtype=dt).masked_fill(~m, float("-inf"))))

    def read(l, s, n, S, m, fm):
        return cache.k[l][s:s + n, :, :S].sum() + cache.v[l][s:s + n, :, :S].sum()

    def sdpa(l, s, n, S, m, fm):  # model.KVCache.attend's decode call
        k, v = cache.k[l][s:s + n, :, :S], cache.v[l][s:s + n, :, :S]
        return F.scaled_dot_product_attention(q[s:s + n], k, v, attn_mask=m)

    def bmm(l, s, n, S, m, fm):
        w = torch.softmax(q[s:s + n] * hd ** -0.5 @ cache.k[l][s:s + n, :, :S].transpose(-1, -2) + fm, -1)
        return w @ cache.v[l][s:s + n, :, :S]

    ways = [("plain read", read), ("SDPA (model.py)", sdpa), ("batched matmuls", bmm)]
    if dt == torch.bfloat16 and exact_residual():
        exact = {(l, s): (cache.k[l][s:s + n, :, :S].contiguous(), cache.v[l][s:s + n, :, :S].contiguous())
                 for l in range(cfg.num_hidden_layers) for s, n, S, m, fm in blocks}   # best case: no slot to spare

        def two(l, s, n, S, m, fm):
            return two_gemm(q[s:s + n], *exact[l, s], fm.float())
        ways.append(("two_gemm, contiguous", two))
    for th in threads:
        torch.set_num_threads(th)
        row = []
        for name, f in ways:
            with torch.inference_mode():
                t = timeit(lambda: [f(l, *blk) for l in range(cfg.num_hidden_layers) for blk in blocks], a.repeats)
            row.append(f"{name} {kv_bytes / t / 1e9:.1f} GB/s ({t * 1000:.0f} ms)")
        print(f"attention of one step, {th} thread{'s' if th > 1 else ''}: " + ", ".join(row))

    # 3. in bfloat16: each form's distance from float32 attention over the same keys and values, on
    # the first block of the first layer, with queries scaled so that the scores spread as a trained
    # model's do (std 1, 3 and 6: the larger, the more a rounded score moves the softmax)
    if dt != torch.float32:
        s0, n, S, m, fm = blocks[0]
        k, v = cache.k[0][s0:s0 + n, :, :S], cache.v[0][s0:s0 + n, :, :S]
        for spread in (1, 3, 6):
            qs = (q[s0:s0 + n].float() * spread).to(dt)
            ref = F.scaled_dot_product_attention(qs.float(), k.float(), v.float(), attn_mask=m)
            err = lambda y: ((y.float() - ref).norm() / ref.norm()).item()   # noqa: E731
            sd = F.scaled_dot_product_attention(qs, k, v, attn_mask=m)
            mm = torch.softmax((qs * hd ** -0.5 @ k.transpose(-1, -2)).float() + fm.float(), -1).to(dt) @ v
            two = f", two_gemm {err(two_gemm(qs, k.contiguous(), v.contiguous(), fm.float())):.1e}" \
                if exact_residual() else ""
            print(f"score spread {spread}: relative error against float32, SDPA {err(sd):.1e}, batched matmuls "
                  f"(the softmax in float32) {err(mm):.1e}{two}")


if __name__ == "__main__":
    main()
