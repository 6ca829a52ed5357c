"""
A training halted and resumed is the uninterrupted one, bit for bit, at a real shape on a real
device: `rigsa.py train` as a user runs it, three times (the CPU tests check the same on tiny models).

    python bench/halt_resume.py [--device cuda] [--preset SmolLM2-1.7B-Instruct] [--layers 0]
                                [--steps 3] [--halt-after 4] [--batch-size 16] [--dtype auto]

Writes a random checkpoint of --preset in the official layout (no download; --layers N keeps the
first N decoder layers), a small BPE tokenizer and synthetic 28x28 digits, then runs two IMP
iterations of --steps optimizer steps each (so the halt can fall after the prune, the rewind and
the gate reset of iteration 2):
  reference   rigsa.py train, uninterrupted
  halted      the same with --halt-after K: it must stop there, resume.pt written, iter2 not yet
  resumed     rigsa.py train --resume on the halted run's folder
and compares every tensor of both iterations' adapters and every logged loss. Each run has
torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG set), strict: CUDA's flash
attention backward sums dQ with atomics, in another order from one run to the next, unless the
deterministic mode is strict (warn_only only warns, and runs that kernel anyway); an op with no
deterministic form then fails the run naming itself. A loss that differs before the halt is said
to be the device's run-to-run noise, not the resume's. Prints each run's wall time and the
reference's last step line (tokens/s); exit 1 if anything differs or a run failed.
"""
import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M  # noqa: E402
from lib import mnist  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# rigsa.py as its command line runs it, with deterministic kernels required (strict: see above)
DETERMINISTIC = ("import runpy, sys, torch; torch.use_deterministic_algorithms(True); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run(argv, what):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", DETERMINISTIC, os.path.join(REPO, "rigsa.py"), "train", *argv], cwd=REPO,
                       capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    lines = (p.stdout + p.stderr).strip().splitlines()
    said = [x for x in lines if x.startswith(("dtype:", "memory:", "device:"))]
    print(f"{what}: exit {p.returncode}, {time.perf_counter() - t:.0f} s" + "".join(f"\n    {x}" for x in said), flush=True)
    if p.returncode != 0:
        print("\n".join(lines[-20:]))
    return p.returncode


def check(a, work):
    cfg = M.PRESETS[a.preset]
    if a.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
    mdir, data = os.path.join(work, "model"), os.path.join(work, "data")
    with torch.device("meta"):
        m = M.Model(cfg)
    P = sum(p.numel() for p in m.parameters())                       # lm_head is tied to the embeddings
    N = P - cfg.vocab_size * cfg.hidden_size                         # the gated projections, about
    # the checkpoint (bfloat16), four adapters (~4.2 bytes a gated entry; iteration 2 at 80%) and
    # resume.pt (dW and AdamW's two float32 moments at 80%)
    need = 2 * P + 2 * 4.2 * N * 1.8 + 12 * N * 0.8
    free = shutil.disk_usage(work).free
    if free < 1.1 * need:
        raise SystemExit(f"error: {work}: {free / 1e9:.0f} GB free, about {need / 1e9:.0f} GB needed at "
                         f"{cfg.num_hidden_layers} layers; pass --layers fewer, or --work on a larger disk")
    t = time.perf_counter()
    tiny.write_tokenizer(mdir, 512)
    tiny.write_random_checkpoint(mdir, cfg, seed=0, device=util.pick_device(a.device))   # a GPU: seconds, not a minute
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # the runs below see the device's memory as a user's run would
    mnist.write_synthetic_mnist(os.path.join(data, "mnist"), n_train=200, n_test=8, size=28)
    print(f"{a.preset} shape, {cfg.num_hidden_layers} layers, random weights, written in {time.perf_counter() - t:.0f} s "
          f"to {work}; {a.device}, --dtype {a.dtype}, 2 iterations of {a.steps} steps of {a.batch_size} sequences, "
          f"halt after {a.halt_after}", flush=True)
    common = ["--model", mdir, "--data-dir", data, "--device", a.device, "--dtype", a.dtype, "--offline", "--no-verify",
              "--iters", "2", "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--warmup", "2",
              "--val-frac", "0.02", "--limit", "4", "--log-every", "1"]
    ref, halted = os.path.join(work, "reference"), os.path.join(work, "halted")
    if run(common + ["--out", ref], "reference"):
        raise SystemExit("error: the reference run failed (its last lines are above)")
    if run(common + ["--out", halted, "--halt-after", str(a.halt_after)], f"halted after {a.halt_after} steps") or \
            not os.path.exists(os.path.join(halted, "resume.pt")) or os.path.exists(os.path.join(halted, "iter2.safetensors")):
        raise SystemExit(f"error: the halted run did not stop after {a.halt_after} steps with a resume.pt")
    if run(["--out", halted, "--resume"], "resumed") or not os.path.exists(os.path.join(halted, "iter2.safetensors")):
        raise SystemExit("error: the resumed run failed (its last lines are above)")
    bad, n = [], 0
    for k in (1, 2):
        x, y = (load_file(os.path.join(d, f"iter{k}.safetensors")) for d in (ref, halted))
        n += len(x)
        bad += [f"iter{k}: {n}" for n in sorted(set(x) | set(y)) if n not in x or n not in y or not torch.equal(x[n], y[n])]
    logs = [[json.loads(s) for s in open(os.path.join(d, "metrics.jsonl"))] for d in (ref, halted)]
    losses = [[(r["iter"], r["step"], r["loss"]) for r in log if "loss" in r] for log in logs]
    if losses[0][:a.halt_after] != losses[1][:a.halt_after]:   # the same command, no resume yet
        bad.append("the losses differ before the halt: this device does not repeat a run bit for bit here (its "
                   "kernels), so nothing can be said of the resume")
    elif losses[0] != losses[1]:
        bad.append(f"losses: {len(losses[0])} logged uninterrupted, {len(losses[1])} halted and resumed, first difference at "
                   f"{next((u for u, v in zip(*losses) if u != v), 'the end')}")
    last = [r for r in logs[0] if "tok_s" in r][-1:]
    print(f"last step of the reference: {json.dumps(last[0]) if last else '-'}")
    if bad:
        print("DIFFERENT: " + "; ".join(bad[:10]) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""))
        sys.exit(1)
    print(f"halted after {a.halt_after} steps and resumed = uninterrupted, bit for bit: {n} tensors of 2 adapters, "
          f"{len(losses[0])} losses")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="SmolLM2-1.7B-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--layers", type=util.number(int, 0), default=0, help="keep only the first N decoder layers (0: all)")
    ap.add_argument("--steps", type=util.number(int, 1), default=3, help="optimizer steps per IMP iteration (two iterations)")
    ap.add_argument("--halt-after", type=util.number(int, 1), default=4,
                    help="halt after this many steps (default: in iteration 2)")
    ap.add_argument("--batch-size", type=util.number(int, 1), default=16, help="sequences per optimizer step (the paper's 16)")
    # rigsa.py train's choices: a typo is said here, not by the reference run after the checkpoint is written
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="rigsa.py's --dtype (auto: bfloat16 on CUDA)")
    ap.add_argument("--work", default=None, help="folder for the checkpoint, data and runs [default: a temporary one]")
    a = ap.parse_args()
    if not 0 < a.halt_after < 2 * a.steps:
        raise SystemExit(f"--halt-after {a.halt_after}: must fall inside the {2 * a.steps} steps of the two iterations")
    try:   # a typo, or the default cuda without CUDA: one line now, not after the work folder and the model's shape
        util.pick_device(a.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.work:
        try:
            os.makedirs(a.work, exist_ok=True)
        except OSError as e:   # a file there, no permission: one line
            sys.exit(f"error: --work {a.work}: {e.strerror or e}; choose another folder")
    work = a.work or tempfile.mkdtemp(prefix="halt_resume_")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a time limit's SIGTERM still cleans up below
    try:
        check(a, work)
    finally:
        if not a.work:   # at 1.7B: a 3.4 GB checkpoint, four adapters of ~6 GB and a resume.pt
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
