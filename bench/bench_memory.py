"""
Training memory and step time of the gated layer, measured on this machine:

    python bench/bench_memory.py                 # the CPU tables: 135M shape, float32; and the 1.7B projection
    python bench/bench_memory.py --gpu           # bench/gpu.sh: CUDA peaks of the real 1.7B shape

Part 1, SmolLM2-135M's shape on the CPU in float32, one 850-token sequence with 2 supervised tokens
(a Textual MNIST example) per micro-batch: the compact layer (rigsa.GatedSparseLinear) against the
dense one it replaced (bench/dense_layer.py's DenseGatedLinear, kept as the tests' reference), at densities
100, 52, 27, 7 and 3.46% (random masks, as after IMP's prunings):
  state B/entry   parameters + gradients + buffers + AdamW's state beyond the base, per adapted
                  entry, during accumulation (the storages, each counted once)
  saved MB/seq    what autograd keeps for the backward of one sequence
  peak alloc      the most bytes a step's ops held at once beyond what existed before it (the CPU
                  analogue of torch.cuda.max_memory_allocated)
  peak RSS        each case alone in a subprocess (VmHWM)
  step            one micro-batch's forward and backward, and one AdamW step, the two layers
                  interleaved in one process (medians); a paper step is 16 micro-batches + 1 AdamW step
Part 2, the 1.7B shape on the CPU under bfloat16 autocast, as on CUDA: one and two decoder layers
measured (state, saved bytes at two lengths, allocation peak), projected to 24 layers and 850
tokens at micro-batch 1, with AdamW's moments on the device, in host memory and in 8 bits.
Part 3, what the moments' placement costs in accuracy: the demo's two IMP iterations (tiny model,
synthetic digits, float32 on the CPU) with the moments on the device, in host memory and in 8 bits;
the adapters against the exact ones (host must equal them bit for bit).
"""
import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as M  # noqa: E402
import rigsa  # noqa: E402
from lib import memory  # noqa: E402
from lib import mnist  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402
from dense_layer import DenseGatedLinear  # noqa: E402  (the dense layer the compact one replaced)

DENSITIES = (1.0, 0.52, 0.27, 0.07, 0.0346)   # 3.46%: the paper's final density (§4.4)
GB, MB = 1e9, 1e6


class PeakBytes(TorchDispatchMode):
    """The most bytes held at once by the storages that ATen ops create while this mode is on
    (those alive before are not counted, nor views and in-place results on them); a storage
    counts until it is freed. Backward ops on the CPU run in this thread, so they count too."""
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and not t.is_meta:
                s = t.untyped_storage()
                if s.data_ptr() not in inputs and not hasattr(s, "_counted") and s.nbytes():
                    s._counted = True
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, s.nbytes())
        return out


def storage_bytes(tensors):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def build(layer, cfg, density, dtype=torch.float32, seed=0):
    """A random model of cfg's shape with one kind of gated layer on every projection, masked to
    `density`. -> (model, the layers, AdamW over them, the base's bytes)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = M.Model(cfg)
    model.to_empty(device="cpu").to(dtype)
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    base = storage_bytes(list(model.parameters()) + list(model.buffers()))
    rcfg = rigsa.Config()
    if layer == "compact":
        layers = rigsa.install_adapters(model, rcfg)
        if density < 1:
            rigsa.random_masks(layers, {n: round(density * L.numel()) for n, L in layers.items()}, seed)
        opt = rigsa.make_optimizer(model, rcfg)
    else:
        layers = {}
        for prefix, mod in list(model.named_modules()):
            for c, child in list(mod.named_children()):
                name = f"{prefix}.{c}" if prefix else c
                if isinstance(child, torch.nn.Linear) and name != "lm_head":
                    layers[name] = DenseGatedLinear(child, rigsa.layer_seed(0, name))
                    setattr(mod, c, layers[name])
        g = torch.Generator().manual_seed(seed)
        for L in layers.values():
            if density < 1:
                L.mask.copy_(torch.rand(L.mask.shape, generator=g) < density)
                L.delta.data.mul_(L.mask)
        opt = torch.optim.AdamW([{"params": [L.delta for L in layers.values()], "weight_decay": 1.0},
                                 {"params": [L.alpha for L in layers.values()], "weight_decay": 0.0}], lr=2e-3)
        opt.moments = "device"
    return model, layers, opt, base


def batch(cfg, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (tokens,), generator=g).tolist()
    return [(ids, [tokens - 2, tokens - 1])]


def micro_step(model, rows, amp):
    rigsa.accumulate(model, rows, 1, 2, "cpu", amp)


def state_per_entry(model, layers, opt, base):
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(model.buffers()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return (storage_bytes(tensors) - base) / sum(L.weight.numel() for L in layers.values())


def saved_bytes(model, rows, amp):
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rigsa.accumulate(model, rows, 1, 2, "cpu", amp)
    return sum(seen.values())


def measure(layer, cfg, density, tokens, dtype=torch.float32, amp=None):
    """One case: state bytes (after a step, during accumulation), saved bytes, a step's allocation peak."""
    amp = amp or torch.autocast("cpu", enabled=False)
    model, layers, opt, base = build(layer, cfg, density, dtype)
    rows = batch(cfg, tokens)
    micro_step(model, rows, amp)
    memory.adamw_step(opt)              # AdamW's state exists from here on
    opt.zero_grad(set_to_none=True)
    saved = saved_bytes(model, rows, amp)   # a forward and backward: the gradients are there again
    state = state_per_entry(model, layers, opt, base)
    opt.zero_grad(set_to_none=True)
    with PeakBytes() as pk:
        micro_step(model, rows, amp)
        memory.adamw_step(opt)
    return {"state_B": state, "saved_B": saved, "peak_B": pk.peak, "base_B": base,
            "entries": sum(L.weight.numel() for L in layers.values()),
            "largest": max(L.weight.numel() for L in layers.values())}


def rss_case(a, layer, density):
    """Peak RSS of one case alone: a fresh process, two steps."""
    code = (f"import sys; sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import bench_memory as B, model as M, torch; from lib import util; util.keep_freed_memory(); torch.set_num_threads({a.threads}); "
            f"cfg = B.preset(B.argparse.Namespace(preset={a.preset!r}, layers={a.layers})); "
            f"m, L, o, _ = B.build({layer!r}, cfg, {density}); r = B.batch(cfg, {a.tokens}); "
            f"[(B.micro_step(m, r, torch.autocast('cpu', enabled=False)), B.memory.adamw_step(o), o.zero_grad()) for _ in range(2)]; "
            f"print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: the RSS case {layer} {density} failed:\n{p.stderr[-2000:]}")
    return int(p.stdout.split()[-1])


def step_times(a, cfg, density):
    """Median seconds of a micro-batch (forward + backward) and of an AdamW step, both layers
    interleaved in this process so that a busy machine slows them alike."""
    cases = {k: build(k, cfg, density) for k in ("dense", "compact")}
    rows = batch(cfg, a.tokens)
    amp = torch.autocast("cpu", enabled=False)
    t = {k: {"fb": [], "opt": []} for k in cases}
    for rep in range(a.repeats + 1):
        for k, (model, _, opt, _) in cases.items():
            t0 = time.perf_counter()
            micro_step(model, rows, amp)
            t1 = time.perf_counter()
            memory.adamw_step(opt)
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if rep:                      # the first round is a warm-up
                t[k]["fb"].append(t1 - t0)
                t[k]["opt"].append(t2 - t1)
    return {k: {n: statistics.median(v) for n, v in d.items()} for k, d in t.items()}


def preset(a):
    cfg = M.PRESETS[a.preset]
    return M.SmolLM2Config(**{**cfg.__dict__, "num_hidden_layers": a.layers}) if a.layers else cfg


def part1(a):
    cfg = preset(a)
    print(f"\n## {a.preset} shape, float32, CPU, {a.tokens} tokens per micro-batch\n")
    print("| density | layer | state B/entry | saved MB/seq | peak alloc GB | peak RSS GiB | micro-batch s | AdamW s | "
          "paper step s (16 + 1) | vs dense |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for d in DENSITIES:
        times = step_times(a, cfg, d)
        for k in ("dense", "compact"):
            r = measure(k, cfg, d, a.tokens)
            r.update(layer=k, density=d, rss=rss_case(a, k, d), **times[k])
            r["paper_step"] = 16 * r["fb"] + r["opt"]
            rows.append(r)
        dense, compact = rows[-2], rows[-1]
        for r in (dense, compact):
            ratio = r["paper_step"] / dense["paper_step"]
            print(f"| {d:.2%} | {r['layer']} | {r['state_B']:.3f} | {r['saved_B'] / MB:.0f} | {r['peak_B'] / GB:.3f} | "
                  f"{r['rss'] / 2**30:.2f} | {r['fb']:.2f} | {r['opt']:.3f} | {r['paper_step']:.1f} | {ratio:.3f} |", flush=True)
    return rows


def part2(a):
    """The 1.7B shape: bytes measured on 1 and 2 decoder layers under CPU bfloat16 autocast (state,
    saved at two lengths, a step's allocation peak), split into a per-layer part and the rest, and
    projected to the 24 layers, 850 tokens, micro-batch 1."""
    full = M.PRESETS["SmolLM2-1.7B-Instruct"]
    amp = torch.autocast("cpu", torch.bfloat16)
    T1, T2 = a.short, 2 * a.short
    m = {}
    for d in DENSITIES:
        for L, T in ((1, T1), (2, T1)) + (((1, T2), (2, T2)) if d == 1.0 else ()):
            cfg = M.SmolLM2Config(**{**full.__dict__, "num_hidden_layers": L})
            t0 = time.time()
            m[L, T, d] = measure("compact", cfg, d, T, torch.bfloat16, amp)
            print(f"measured {L} layer(s), {T} tokens, density {d:.2%} in {time.time() - t0:.0f} s", file=sys.stderr)
    n, tok = full.num_hidden_layers, a.tokens
    layer = lambda key, d, T=T1: m[2, T, d][key] - m[1, T, d][key]          # noqa: E731  one layer's share
    rest = lambda key, d, T=T1: m[1, T, d][key] - layer(key, d, T)          # noqa: E731  embeddings, norm, head
    # saved for backward: per layer a part per token (x, the attention's q/k/v/out, the MLP's three
    # inputs...) and a part that is not (the free entries' positions), both measured
    per_token = (layer("saved_B", 1.0, T2) - layer("saved_B", 1.0, T1)) / (T2 - T1)
    rest_token = (rest("saved_B", 1.0, T2) - rest("saved_B", 1.0, T1)) / (T2 - T1)
    print(f"\n## SmolLM2-1.7B shape: measured per layer under bfloat16 autocast on the CPU, projected to {n} layers, "
          f"{tok} tokens, micro-batch 1 (GB; the 24 GB card is 25.8 GB, the target 22)\n")
    print("| density | moments | base | adapter state | activations | transients | peak | B/entry (state) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    out = []
    for d in DENSITIES:
        base = rest("base_B", d) + n * layer("base_B", d)
        entries = n * layer("entries", d)
        state_abs = lambda L: m[L, T1, d]["state_B"] * m[L, T1, d]["entries"]  # noqa: E731  bytes, not per entry
        state = state_abs(1) + (n - 1) * (state_abs(2) - state_abs(1))
        free = d * entries
        const = layer("saved_B", d) - per_token * T1
        acts = n * (const + per_token * tok) + (rest("saved_B", d) - rest_token * T1) + rest_token * tok
        # transients: the step's allocation peak beyond what it saved for backward (one layer's
        # dense m * dW, its copies and G; AdamW's per-tensor buffers), from one layer
        one = m[1, T1, d]
        trans = max(one["peak_B"] - one["saved_B"], 0)
        for moments, mb in (("device", 8.0), ("host", 0.0), ("8bit", memory.MOMENT_BYTES["8bit"])):
            st = state - (8.0 - mb) * free
            peak = base + st + acts + trans
            out.append(dict(density=d, moments=moments, base=base, state=st, acts=acts, trans=trans, peak=peak))
            print(f"| {d:.2%} | {moments} | {base / GB:.2f} | {st / GB:.2f} | {acts / GB:.2f} | {trans / GB:.2f} | "
                  f"{peak / GB:.1f} | {st / entries:.3f} |")
    largest = m[1, T1, 1.0]["largest"]
    print(f"\nsaved for backward: {per_token:.0f} B per layer and token ({per_token * tok * n / GB:.2f} GB for {n} "
          f"layers and {tok} tokens); transients at density 100%: {out[0]['trans'] / largest:.1f} B per entry of the "
          f"largest layer ({largest:,} entries)")
    return out


def part3(a):
    """What 8-bit moments cost (the README's --moments table): the demo's run (tiny model, synthetic
    8x8 digits, two IMP iterations, cli.demo's hyperparameters) with AdamW's moments on the device,
    in host memory and in 8 bits, in float32 on the CPU: accuracy, density, and how far the adapters
    are from the exact ones."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-moments-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as cli.demo: its exact rows are the demo's own output
    try:
        tiny.write_tiny_checkpoint(tmp / "tiny", shape="gqa", seed=0)
        mnist.write_synthetic_mnist(tmp / "mnist", n_train=400, n_test=100, size=8, seed=0, noise=0.05, shift=False)
        logs = {}
        for moments in ("device", "host", "8bit"):
            cfg = rigsa.Config(model=str(tmp / "tiny"), out=str(tmp / moments), data_dir=str(tmp), device="cpu",
                               iters=2, steps=300, epochs=100.0, warmup=10, lr=1e-2, weight_decay=0.1,
                               val_frac=0.05, micro_batch=16, log_every=1000, save_every=0, offline=True,
                               verify=False, moments=moments)
            with contextlib.redirect_stdout(io.StringIO()):   # the trainings' own logs
                logs[moments] = [r for r in rigsa.train(cfg) if r.get("event") == "iteration"]
        print("\n## AdamW's moments on the device, in host memory and in 8 bits: the demo's run (tiny model, "
              "2 IMP iterations, float32, CPU, 1 thread)\n")
        print("| moments | iteration | density | val acc | test acc | mask bits equal to exact | dW rel. L2 from exact "
              "(common free entries) | alpha rel. from exact |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        rows = []
        for moments in ("device", "host", "8bit"):
            for k, r in enumerate(logs[moments], 1):
                want, got = (load_file(tmp / m / f"iter{k}.safetensors") for m in ("device", moments))
                bits = agree = 0
                num = den = 0.0
                alpha = []
                for n in want:
                    if n.endswith(".alpha"):
                        alpha.append(abs(got[n].item() - want[n].item()) / abs(want[n].item()))
                    if not n.endswith(".delta"):
                        continue
                    L = n[:-len(".delta")]
                    mw, mg = (np.unpackbits(t[L + ".mask"].numpy()).view(bool) for t in (want, got))
                    size = mw.size                                  # the packed masks' bits (padding is 0 in both)
                    dw, dg = np.zeros(size, np.float32), np.zeros(size, np.float32)
                    dw[mw], dg[mg] = want[n].numpy(), got[n].numpy()
                    both = mw & mg
                    bits, agree = bits + size, agree + int((mw == mg).sum())
                    num, den = num + float(((dw - dg)[both] ** 2).sum()), den + float((dw[both] ** 2).sum())
                rows.append(dict(moments=moments, iter=k, density=r["density"], val_acc=r["val_acc"],
                                 test_acc=r["test_acc"], mask_agree=agree / bits, rel_l2=(num / den) ** 0.5,
                                 alpha_rel=max(alpha)))
                x = rows[-1]
                print(f"| {moments} | {k} | {x['density']:.2%} | {x['val_acc']:.1%} | {x['test_acc']:.1%} | "
                      f"{x['mask_agree']:.2%} | {x['rel_l2']:.3g} | {x['alpha_rel']:.3g} |", flush=True)
        return rows
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def gpu(a):
    """bench/gpu.sh: torch.cuda.max_memory_allocated at the real shape, random bf16 weights, one
    850-token sequence (2 supervised tokens) per micro-batch, a step of 16: micro-batch 1 (16
    accumulated; moments on the device and in host memory) and 16 (one pass), each micro-batch also with
    --checkpoint-activations, densities 100% and 3.46%; seconds per step, tokens/s and MFU (8 N T FLOPs
    a step: GatedDelta's 4 GEMMs of 2 N T per gated layer; a recomputed forward is not counted)."""
    dev = util.pick_device(a.device)
    cfg = preset(a)
    cuda = dev.type == "cuda"
    amp = torch.autocast(dev.type, torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gb = lambda f: f(dev) / GB if cuda else float("nan")  # noqa: E731
    print("| preset | layers | density | micro-batch | moments | checkpoint | rigsa's estimate GB | before the step GB | "
          "peak GB | s/step | tokens/s | MFU |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for d in (1.0, 0.0346):
        with torch.device("meta"):
            model = M.Model(cfg)
        model.to_empty(device=dev).to(dtype)
        model.lm_head.weight = model.model.embed_tokens.weight
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        layers = rigsa.install_adapters(model, rigsa.Config())
        if d < 1:   # a random mask drawn on the device (rigsa.random_masks' CPU randperm: a minute at 1.7B)
            g = torch.Generator(dev).manual_seed(0)
            for L in layers.values():
                index = torch.randperm(L.numel(), generator=g, device=dev)[:round(d * L.numel())].sort().values
                L.set_free(index, L.dense().reshape(-1)[index])
        n = sum(L.numel() for L in layers.values())
        for mb, moments, ckpt in ((1, "device", False), (1, "host", False), (16, "device", False), (1, "device", True),
                                  (16, "device", True)):
            model.checkpoint_layers = ckpt
            opt = rigsa.make_optimizer(model, rigsa.Config(), moments)
            rows = batch(cfg, a.tokens) * 16
            est = sum(memory.memory_plan(model, layers, dev, amp, mb * a.tokens)[moments].values()) / GB
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            before = gb(torch.cuda.memory_allocated) if cuda else float("nan")
            times = []
            try:
                for _ in range(a.steps):
                    sync()
                    t0 = time.perf_counter()
                    rigsa.accumulate(model, rows, mb, 2, dev, amp)
                    memory.adamw_step(opt)
                    opt.zero_grad(set_to_none=True)
                    sync()
                    times.append(time.perf_counter() - t0)
            except torch.cuda.OutOfMemoryError:
                print(f"| {a.preset} | {cfg.num_hidden_layers} | {d:.2%} | {mb} | {moments} | {ckpt} | {est:.1f} | "
                      f"{before:.2f} | OOM | | | |")
                opt.zero_grad(set_to_none=True)
                continue
            s = statistics.median(times[1:]) if len(times) > 1 else times[0]
            mfu = 8 * n * 16 * a.tokens / s / (a.peak_tflops * 1e12)
            print(f"| {a.preset} | {cfg.num_hidden_layers} | {d:.2%} | {mb} | {moments} | {ckpt} | {est:.1f} | {before:.2f} | "
                  f"{gb(torch.cuda.max_memory_allocated):.2f} | {s:.2f} | {16 * a.tokens / s:.0f} | {mfu:.1%} |", flush=True)
        del model, layers, opt


def known_parts(s):
    """--part: the digits of the parts wanted ("123", "1,3", "2"), commas and spaces dropped; a digit that
    is no part is named (it would otherwise run nothing and exit 0)."""
    got = s.replace(",", "").replace(" ", "")
    bad = sorted(set(got) - set("123"))
    if bad or not got:
        raise argparse.ArgumentTypeError(f"{s!r}: the parts are 1, 2 and 3 (e.g. 1, 23 or 1,3); "
                                         + (f"no part {', '.join(bad)}" if bad else "none given"))
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=list(M.PRESETS), help="[default: 135M for the CPU tables, 1.7B for --gpu]")
    # a sequence is a prompt token and the two supervised ones at least (batch(): labels at T-2, T-1)
    ap.add_argument("--tokens", type=util.number(int, 3), default=850,
                    help="tokens per sequence (a Textual MNIST prompt) [default: 850]")
    ap.add_argument("--short", type=util.number(int, 3), default=64,
                    help="part 2: the shorter of the two measured lengths [default: 64]")
    ap.add_argument("--repeats", type=util.number(int, 1), default=3, help="timed steps per case, after a warm-up [default: 3]")
    ap.add_argument("--threads", type=util.number(int, 1), default=torch.get_num_threads())
    ap.add_argument("--part", type=known_parts, default="123", help="which parts, e.g. 1, 23 [default: 123]")
    ap.add_argument("--json", default="", help="also write the measurements here")
    ap.add_argument("--gpu", action="store_true", help="bench/gpu.sh's measurement (CUDA; on the CPU it only checks itself)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=util.number(int, 0), default=0,
                    help="fewer layers than the preset's (a quick look, a CPU dry run of --gpu)")
    ap.add_argument("--steps", type=util.number(int, 1), default=3, help="--gpu: optimizer steps per case [default: 3]")
    ap.add_argument("--peak-tflops", type=util.number(float, 0, lo_open=True), default=989.0,
                    help="--gpu: the device's dense bf16 peak for MFU [H200: 989]")
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after the tables began
        util.pick_device(a.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if a.gpu:
        a.preset = a.preset or "SmolLM2-1.7B-Instruct"
        return gpu(a)
    a.preset = a.preset or "SmolLM2-135M-Instruct"
    res = {}
    if "1" in a.part:
        res["part1"] = part1(a)
    if "2" in a.part:
        res["part2"] = part2(a)
    if "3" in a.part:
        res["part3"] = part3(a)
    if a.json:
        util.write_json(a.json, res)


if __name__ == "__main__":
    main()
