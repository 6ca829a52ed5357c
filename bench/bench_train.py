"""
Training-step speed and memory: a RIGSA step against plain full fine-tuning in this project, and
this project's full fine-tuning against transformers' LlamaForCausalLM, in one run.

    python bench/bench_train.py [--preset SmolLM2-135M-Instruct] [--tokens 850] [--steps 3]

One step = one 850-token sequence (a Textual MNIST prompt is about 850 tokens) with 2 supervised
tokens at its end (the digit and <|im_end|>, as rigsa.batch_loss does), forward, backward and an
AdamW step. Random weights, float32, CPU by default. Time: the three variants in one process with
their steps interleaved (median of --steps after one warm-up each), so that other load on the
machine slows them alike. Peak memory (ru_maxrss): each variant alone in its own process.
  rigsa   every Linear but lm_head is a GatedSparseLinear (dW, alpha, mask), AdamW on dW and alpha
  full    this project's model.py, every parameter trained
  hf      transformers' LlamaForCausalLM, every parameter trained, same loss
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M  # noqa: E402
import rigsa  # noqa: E402
from lib import util  # noqa: E402


def build(variant, cfg, dtype, dev):
    torch.manual_seed(0)
    if variant == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM
        hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                         rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings)
        m = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa", dtype=dtype).to(dev).train()
        hidden = lambda ids: m.model(input_ids=ids).last_hidden_state    # (B, T, C)
        return m, hidden, list(m.parameters())
    m = M.Model(cfg).to(device=dev, dtype=dtype).train()
    hidden = lambda ids: m(ids, hidden_only=True)                          # (B, T, C)
    if variant == "full":
        return m, hidden, list(m.parameters())
    layers = rigsa.install_adapters(m, rigsa.Config())
    return m, hidden, [p for L in layers.values() for p in (L.delta, L.alpha)]


def make_step(variant, a):
    """-> (step function, trainable count) of one variant; the step is one full training step."""
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    cfg = M.PRESETS[a.preset]
    m, hidden, params = build(variant, cfg, dtype, dev)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, a.tokens), generator=g).to(dev)
    pos = torch.tensor([a.tokens - 2, a.tokens - 1], device=dev)

    def step():
        h = hidden(ids)                                      # (1, T, C)
        logits = m.lm_head(h[0, pos - 1]).float()            # (2, V): only the supervised positions
        F.cross_entropy(logits, ids[0, pos]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def run_memory(a):
    """Peak memory of one variant, alone in this process (2 steps: the AdamW state exists)."""
    step, n = make_step(a.variant, a)
    step()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(json.dumps({"variant": a.variant, "peak_gib": peak, "trainable": n}))


def run_timing(a):
    """The three variants in one process, their steps interleaved, so that a busy machine slows
    them alike. -> {variant: median seconds per step}."""
    steps = {v: make_step(v, a)[0] for v in VARIANTS}
    ts = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        steps[v]()  # warm-up (allocates the AdamW state)
    for _ in range(a.steps):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            ts[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in ts.items()}


VARIANTS = ("rigsa", "full", "hf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    # a prompt token and the two supervised ones at least (make_step: labels at T-2, T-1)
    ap.add_argument("--tokens", type=util.number(int, 3), default=850)
    ap.add_argument("--steps", type=util.number(int, 1), default=3)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant per process
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after three memory runs
        a.device = str(util.pick_device(a.device))   # "auto" resolved: the rest reads a device name
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()  # both sides: they share this process
    if a.variant:
        return run_memory(a)
    res = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", v] + sum(([f"--{k}", str(getattr(a, k))] for k in
                                                                ("preset", "dtype", "device", "tokens")), [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"error: variant {v} failed:\n{p.stderr[-2000:]}")
        res[v] = json.loads(p.stdout.strip().splitlines()[-1])
    for v, t in run_timing(a).items():
        res[v]["step_s"] = t
    print(f"\n{a.preset} shape, {a.dtype}, {a.device}, one {a.tokens}-token sequence per step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.1f}\n")
    print("| training step | trainable | s/step | tokens/s | peak RSS GiB | ratio |")
    print("|---|---:|---:|---:|---:|---|")
    ratio = {"rigsa": f"{res['rigsa']['step_s'] / res['full']['step_s']:.2f} x full (target <= 1.3)",
             "full": f"{res['full']['step_s'] / res['hf']['step_s']:.2f} x hf (target <= 1.0)", "hf": "1.00"}
    names = {"rigsa": "RIGSA (rigsa.py)", "full": "full fine-tuning (model.py)", "hf": "full fine-tuning (transformers)"}
    for v in ("rigsa", "full", "hf"):
        r = res[v]
        print(f"| {names[v]} | {r['trainable'] / 1e6:.1f}M | {r['step_s']:.2f} | {a.tokens / r['step_s']:.0f} | "
              f"{r['peak_gib']:.2f} | {ratio[v]} |")


if __name__ == "__main__":
    main()
