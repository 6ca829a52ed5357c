"""
Memory and speed of the naive QLoRA (qlora.py) against the unquantized base, in one run.

    python bench/bench_qlora.py [--preset SmolLM2-135M-Instruct] [--dtype float32] [--device cpu]
                                [--batch 2] [--seq 128] [--rank 16] [--repeats 3] [--threads N]

1. Quantized weight bytes per parameter of the 7 projections of every layer: packed codes plus
   float32 absmax (target <= 0.563), or plus 8-bit absmax, nested absmax and offset with double
   quantization (target <= 0.516); for the preset and for the SmolLM2-1.7B shapes (one layer of
   each projection shape is quantized; every layer has the same shapes).
2. Forward pass (no grad) and one training step (forward, backward, AdamW) at batch x seq tokens:
   the unquantized base, the NF4 base (dequantized in every forward, no kernel), LoRA on the
   unquantized base, and QLoRA. Weights are random (model.Model with its default init).
   On a shared machine, --threads 1 gives steadier numbers than oversubscribed threads.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M  # noqa: E402
import qlora as Q  # noqa: E402
from lib import util  # noqa: E402


def timeit(fn, repeats, sync):
    """Median seconds per call after one warm-up call."""
    fn()  # warm-up
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bytes_per_param(shapes, double_quant):
    """(bytes, params) of NF4-quantizing one random weight of each shape, weighted by its count."""
    b = n = 0
    for (out, inp), count in shapes.items():
        lin = nn.Linear(inp, out, bias=False)
        q4 = Q.Linear4bit.from_linear(lin, double_quant=double_quant)
        b += count * Q.nf4_bytes(q4)
        n += count * out * inp
    return b, n


def proj_shapes(cfg):
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {}
    for s in [(q, C), (kv, C), (kv, C), (C, q), (I, C), (I, C), (C, I)]:
        shapes[s] = shapes.get(s, 0) + L
    return shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the base weights, hence the NF4 compute dtype (default float32 on CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=util.number(int, 1), default=2)
    ap.add_argument("--seq", type=util.number(int, 1), default=128)
    ap.add_argument("--rank", type=util.number(int, 1), default=16)   # apply_lora's own floor, said before the model
    ap.add_argument("--alpha", type=util.number(float), default=32.0)   # any finite scale
    ap.add_argument("--repeats", type=util.number(int, 1), default=3)
    ap.add_argument("--threads", type=util.number(int, 0), default=0, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after the first table
        a.device = str(util.pick_device(a.device))   # "auto" resolved: the rest reads a device name
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = M.PRESETS[a.preset]
    print(f"# bench_qlora: {a.preset} ({a.dtype}, {dev}, {torch.get_num_threads()} threads), batch {a.batch} x "
          f"seq {a.seq}, LoRA r={a.rank} alpha={a.alpha}, torch {torch.__version__}\n")

    # 1. bytes per parameter
    print("| shapes | absmax | bytes/param | target |\n|---|---|---:|---:|")
    for name in dict.fromkeys([a.preset, "SmolLM2-1.7B-Instruct"]):
        for dq, target in ((False, 0.563), (True, 0.516)):
            b, n = bytes_per_param(proj_shapes(M.PRESETS[name]), dq)
            print(f"| {name} ({n / 1e6:.1f} M proj. params) | {'8-bit, double quant' if dq else 'float32'} "
                  f"| {b / n:.5f} | <= {target} |")
    print()

    # 2. speed
    torch.manual_seed(0)
    base = M.Model(cfg).to(device=dev, dtype=dtype).eval().requires_grad_(False)
    x = torch.randint(3, cfg.vocab_size, (a.batch, a.seq + 1), device=dev)
    inp, tgt = x[:, :-1], x[:, 1:]

    def fwd(m):
        with torch.no_grad():
            m(inp)

    def train_step(m, opt):
        def step():
            logits = m(inp).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def proj_bytes(m):
        return sum(Q.nf4_bytes(mod) if getattr(mod, "packed", None) is not None else mod.weight.numel() * mod.weight.element_size()
                   for mod in (getattr(p, c) for p, c, _ in Q._targets(m, (nn.Linear, Q.Linear4bit, Q.LoRALinear))))

    nf4 = Q.quantize_model(copy.deepcopy(base), double_quant=True)
    lora = copy.deepcopy(base)
    torch.manual_seed(0)
    lora_params = Q.apply_lora(lora, a.rank, a.alpha)
    qlora = Q.quantize_model(copy.deepcopy(base), double_quant=True)
    torch.manual_seed(0)
    qlora_params = Q.apply_lora(qlora, a.rank, a.alpha)
    opt_l = torch.optim.AdamW(lora_params, lr=2e-4, weight_decay=0.1)
    opt_q = torch.optim.AdamW(qlora_params, lr=2e-4, weight_decay=0.1)
    ntok = a.batch * a.seq
    rows = [
        ("forward, base", fwd_t := timeit(lambda: fwd(base), a.repeats, sync), proj_bytes(base)),
        ("forward, NF4 base (double quant)", timeit(lambda: fwd(nf4), a.repeats, sync), proj_bytes(nf4)),
        ("train step, LoRA on base", timeit(train_step(lora, opt_l), a.repeats, sync), proj_bytes(lora)),
        ("train step, QLoRA (NF4 + LoRA)", timeit(train_step(qlora, opt_q), a.repeats, sync), proj_bytes(qlora)),
    ]
    print(f"| {a.preset}, {a.dtype}, {dev} | ms | tokens/s | x base forward | projection weights (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, t, nbytes in rows:
        print(f"| {name} | {t * 1e3:.0f} | {ntok / t:.0f} | {t / fwd_t:.2f} | {nbytes / 1e6:.1f} |")
    print(f"\ntrainable LoRA parameters: {sum(p.numel() for p in qlora_params):,} "
          f"(formula {Q.lora_num_params(cfg, a.rank):,})")
    if dev.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
