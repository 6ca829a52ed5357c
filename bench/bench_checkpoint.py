"""
Per-decoder-layer activation checkpointing (model.Model.checkpoint_layers) in a RIGSA training step:
what it saves for backward, what it costs in time, and what it means for the 1.7B model's memory.

    python bench/bench_checkpoint.py [--layers 30] [--tokens 850] [--micro-batch 1] [--steps 3] [--device cpu]

Part 1, SmolLM2-135M's shape (--layers of its 30), random weights, density 100% (the first IMP
iteration), one --tokens-token sequence with 2 supervised tokens per row, float32 and bfloat16 autocast
(bfloat16 base weights, as rigsa.py trains on CUDA): bytes saved for backward per sequence
(memory.saved_bytes: with checkpointing, the layers' inputs plus one layer recomputed) and the
seconds of one step (--micro-batch rows forward and backward, one AdamW step), with and without,
their steps interleaved (median of --steps after a warm-up).
Part 2, the SmolLM2-1.7B shape (24 layers, 850-token Textual MNIST rows), micro-batch 1/4/8/16:
memory.memory_plan's parts (base bf16 weights, adapters with AdamW's moments, transients,
activations) computed from the shape, the activations scaled from Part 1's bfloat16 measurement:
a layer's saved bytes per token by (hidden + intermediate) width (108.2 kB at 1.7B, against 106.6 kB
measured on one layer of the 1.7B shape), a layer's input and the rest by the hidden width. A card fits a
placement of the moments if the total is at most 95% of it (memory.choose_moments' margin).
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M  # noqa: E402
import rigsa  # noqa: E402
from lib import memory  # noqa: E402
from lib import util  # noqa: E402
from bench_memory import batch, build  # noqa: E402  (random SmolLM2-shaped model with adapters; a row)

GB, GiB = 1e9, 2**30
SMALL, BIG = M.PRESETS["SmolLM2-135M-Instruct"], M.PRESETS["SmolLM2-1.7B-Instruct"]
BIG_TOKENS = 850   # a Textual MNIST prompt


def per_token(f):
    """f(tokens) is a + b * tokens (memory_plan's model): -> b, from 16 and 32 tokens."""
    return (f(32) - f(16)) / 16


def measure(a, precision):
    """Part 1 for one precision: -> (saved bytes per sequence {checkpoint: bytes}, seconds per step
    {checkpoint: s}, per-token parts for Part 2: a layer, a layer's input, the rest plain and checkpointed)."""
    dev = torch.device(a.device)
    bf16 = precision == "bf16-autocast"
    amp = torch.autocast(dev.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    cfg = M.SmolLM2Config(**{**SMALL.__dict__, "num_hidden_layers": a.layers})
    model, layers, opt, _ = build("compact", cfg, 1.0, torch.bfloat16 if bf16 else torch.float32)
    model.to(dev)
    saved = {ck: memory.saved_bytes(model, a.tokens, dev, amp, checkpoint=ck) for ck in (False, True)}
    plain = per_token(lambda T: memory.saved_bytes(model, T, dev, amp, checkpoint=False))
    ckpt = per_token(lambda T: memory.saved_bytes(model, T, dev, amp, checkpoint=True))
    ids = lambda T: torch.randint(3, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)).to(dev)  # noqa: E731
    layer = per_token(lambda T: memory.forward_saved(model, ids(T), amp, inside=model.model.layers[-1]))
    inp = cfg.hidden_size * model.model.embed_tokens.weight.element_size()   # the residual stream's dtype
    parts = dict(layer=layer, input=inp, rest=plain - a.layers * layer, rest_ckpt=ckpt - a.layers * inp - layer)

    rows = batch(cfg, a.tokens) * a.micro_batch
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(ck):
        model.checkpoint_layers = ck
        sync()
        t0 = time.perf_counter()
        rigsa.accumulate(model, rows, a.micro_batch, 2, dev, amp)
        memory.adamw_step(opt)
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0
    times = {False: [], True: []}
    for ck in times:   # warm-up: AdamW's state
        step(ck)
    for _ in range(a.steps):
        for ck in times:
            times[ck].append(step(ck))
    return saved, {ck: statistics.median(t) for ck, t in times.items()}, parts


def project(parts, mb):
    """Part 2: memory_plan's parts at the 1.7B shape, micro-batch mb. -> ({moments: total bytes}, activations {ckpt: bytes})."""
    with torch.device("meta"):
        model = M.Model(BIG)
    base = 2 * sum(p.numel() for p in model.parameters())                     # bfloat16
    entries = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    width, hidden = (BIG.hidden_size + BIG.intermediate_size) / (SMALL.hidden_size + SMALL.intermediate_size), \
        BIG.hidden_size / SMALL.hidden_size
    n, tok = BIG.num_hidden_layers, mb * BIG_TOKENS
    acts = {False: tok * (n * parts["layer"] * width + parts["rest"] * hidden),
            True: tok * (n * parts["input"] * hidden + parts["layer"] * width + parts["rest_ckpt"] * hidden)}
    adapters = {m: (sum(entries) + len(entries)) * (8 + b) for m, b in memory.MOMENT_BYTES.items()}
    return {m: base + adapters[m] + 32 * max(entries) for m in adapters}, acts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=util.number(int, 2), default=SMALL.num_hidden_layers,
                    help=f"decoder layers of the 135M shape (at least 2) [default: {SMALL.num_hidden_layers}]")
    ap.add_argument("--tokens", type=util.number(int, 32), default=850, help="tokens per sequence [default: 850]")
    ap.add_argument("--micro-batch", type=util.number(int, 1), default=1, help="sequences per forward [default: 1]")
    ap.add_argument("--steps", type=util.number(int, 1), default=3, help="timed steps per case, after a warm-up [default: 3]")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after the first model is built
        a.device = str(util.pick_device(a.device))   # "auto" resolved: the rest reads a device name
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {a.device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"\n## SmolLM2-135M shape, {a.layers} layers, {a.tokens} tokens per sequence, micro-batch {a.micro_batch}, "
          f"density 100%\n")
    print("| precision | saved MB/seq plain | saved MB/seq checkpointed | ratio | s/step plain | s/step checkpointed | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for precision in ("float32", "bf16-autocast"):
        saved, secs, parts = measure(a, precision)
        print(f"| {precision} | {saved[False] / 1e6:.1f} | {saved[True] / 1e6:.1f} | {saved[True] / saved[False]:.2f} | "
              f"{secs[False]:.3f} | {secs[True]:.3f} | {secs[True] / secs[False]:.2f} |", flush=True)
    # parts is bfloat16's: the 1.7B model trains under bfloat16 autocast on CUDA
    print(f"\nper token, bfloat16: a layer saves {parts['layer']:.0f} B, its checkpointed input {parts['input']:.0f} B; "
          f"outside the layers' shares {parts['rest']:.0f} B plain (less layer 0's smaller share), "
          f"{parts['rest_ckpt']:.0f} B checkpointed (RoPE's cos/sin, the final norm)")
    print(f"\n## SmolLM2-1.7B shape projected: {BIG.num_hidden_layers} layers, {BIG_TOKENS} tokens per sequence, "
          f"density 100%, GB; a card's cell: the moments' placements that fit it\n")
    print("| micro-batch | checkpoint | activations | total: moments device | host | 8bit | 24 GiB | 40 GiB | 80 GiB |")
    print("|---:|---|---:|---:|---:|---:|---|---|---|")
    for mb in (1, 4, 8, 16):
        rest, acts = project(parts, mb)
        for ck in (False, True):
            total = {m: r + acts[ck] for m, r in rest.items()}
            fit = lambda card: ", ".join(m for m, t in total.items() if t <= 0.95 * card * GiB) or "-"  # noqa: E731
            print(f"| {mb} | {'yes' if ck else 'no'} | {acts[ck] / GB:.1f} | " + " | ".join(f"{t / GB:.1f}" for t in total.values())
                  + " | " + " | ".join(fit(c) for c in (24, 40, 80)) + " |")


if __name__ == "__main__":
    main()
