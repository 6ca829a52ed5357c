"""
cli.py: rigsa.py's commands. `python rigsa.py ...` arrives here through rigsa.main; this file sits on
top of rigsa.py (it imports the method; the method does not import it).

  train     rigsa.train with one flag per Config field (lib/flags.py)
  show      one image as Textual MNIST (§4.2, Figure 1)
  merge     an adapter merged into its base, written in the official layout
  demo      the whole pipeline offline on a tiny random model, under a minute on a CPU (make demo)
  main      the parser, and what an error or a signal prints: one line, and the command that continues
also: load_adapter: a saved adapter (any method, read by rigsa.read_adapter) back into a model, checked
against its base (evals/run.py and merge use it)
"""
import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import model as M
import qlora
import rigsa
from lib import adapter_files as AF
from lib import flags
from lib import interrupts
from lib import mnist
from lib import rundir
from lib import tiny
from lib import util


@torch.no_grad()
def load_adapter(model, path, base=None, allow_other_base=False, read=None):
    """Install a saved adapter (any method) into a loaded base model, in place, every tensor into
    exactly one layer of its shape and kind. base: the model's identity ({"model", **model.base_identity}),
    checked against the one the adapter recorded (adapter_files.check_base). read: rigsa.read_adapter(path),
    where the caller read it before the base loaded (its checksum checked before that long work).
    -> (its Config, the verdict)."""
    tensors, meta, cfg = read or rigsa.read_adapter(path)
    verdict = (AF.check_base(meta["base"], base, str(AF.adapter_path(path)), allow_other_base)
               if base else "unchecked")
    if rigsa.METHODS[cfg.method]["lora"]:
        qlora.load_adapter(model, tensors, rigsa.METHODS[cfg.method]["nf4"], cfg.rank, cfg.lora_alpha, path)
        return cfg, verdict
    if qlora.is_quantized(model):
        raise ValueError(f"{path}: a {cfg.method} adapter adds to the unquantized weights, and this base is 4-bit "
                         f"(NF4); drop --quantize")
    AF.set_adapter_tensors(rigsa.install_adapters(model, cfg), tensors, path)
    return cfg, verdict


def check_fits(spec, acfg, ameta, mcfg, path, base, four_bit=False):
    """What load_adapter would refuse, said from the adapter's header before the base loads (minutes at
    1.7B, and NF4 quantization): the adapter `spec` (its Config acfg, metadata ameta) on the base at
    `path` (its config mcfg, identity base; four_bit: a 4-bit checkpoint). A method that adds to the
    unquantized weights on a 4-bit checkpoint; tensors not of the base's layers or shapes; a base that is
    a merge of this very adapter, on which --allow-other-base would add its delta twice."""
    method, made_on = rigsa.METHODS[acfg.method], (ameta.get("base") or {}).get("model") or acfg.model
    if four_bit and not method["nf4"]:
        raise ValueError(f"--adapter {spec}: a {acfg.method} adapter adds to the unquantized weights, and {path} is a "
                         f"4-bit checkpoint; pass an unquantized base: the one it was trained on, {made_on}")
    layers, have = rigsa.adapted_shapes(mcfg), AF.shapes(spec)
    if method["lora"]:   # lora_A (r, in) and lora_B (out, r) of every adapted layer
        have = {qlora.own_name(k): s for k, s in have.items()}
        want = {f"{n}.lora_{ab}.weight": s for n, (o, i) in layers.items()
                for ab, s in (("A", (acfg.rank, i)), ("B", (o, acfg.rank)))}
    else:   # a mask of ceil(entries / 8) bytes for every adapted layer, whatever its density
        have = {k: s for k, s in have.items() if k.endswith(".mask")}
        want = {f"{n}.mask": (-(-o * i // 8),) for n, (o, i) in layers.items()}
    # a shape that differs says most (a model of other widths); else a layer one side lacks (other depths)
    odd = [k for k in want if k in have and have[k] != want[k]] or sorted(set(have) ^ set(want))
    if odd:
        k = odd[0]
        n = k.rsplit(".", 2 if method["lora"] else 1)[0]   # the layer: without .lora_A.weight, or .mask
        if k in have and k in want and not method["lora"]:   # the packed mask's bytes: ceil(entries / 8)
            why = (f"its mask of {n} is for a layer of about {8 * have[k][0]:,} entries, and this base's has "
                   f"{math.prod(layers[n]):,}")
        elif k in have and k in want:
            why = f"{k} has shape {have[k]}, and this base's layer needs {want[k]}"
        else:
            why = (f"it adapts a layer {n} this base lacks" if k in have else
                   f"it has no adapter for this base's layer {n}")
        if AF.same_base(ameta.get("base") or {}, base):
            fix = "the file is damaged or edited: use the one its run wrote"
        elif made_on == base["model"]:   # an older file, which records no base: which one it is cannot be told
            fix = "the file is damaged or edited, or was made on a model of other shapes"
        else:
            fix = f"it was made on a model of other shapes: use it with its base, {made_on}"
        raise ValueError(f"--adapter {spec}: does not fit the base model {base['model']} ({why}); {fix}")
    try:
        rec = util.merge_record(Path(path) / "rigsa-merge.json") if (Path(path) / "rigsa-merge.json").is_file() else {}
    except ValueError:   # a damaged record: merge_dtype says so where it matters
        rec = {}
    # the merge's record names the adapter by its checksum; one written before it did, by its absolute path
    sha, where = rec.get("adapter_sha256"), rec.get("adapter")
    if sha:
        twice = sha == ameta.get("tensors_sha256")
    else:
        twice = (isinstance(where, str) and os.path.isabs(where)
                 and os.path.realpath(where) == os.path.realpath(AF.adapter_path(spec)))
    if twice:
        raise ValueError(f"--adapter {spec}: {path} is a merge of this very adapter (its rigsa-merge.json), so it "
                         f"would add its delta twice; use the base it was made on, {made_on}")


def check_recorded_base(cfg, base, adapter):
    """An adapter's recorded base (`cfg`: its run's config; `base`: its base record, whose commit is
    None for a local folder, a hub snapshot's sha else) is a hub id or a local folder as the run named
    it: a folder that is not there from here (a relative path, from another folder) is one line saying
    so. An older record without a commit says nothing either way: model.resolve decides, as before."""
    if isinstance(base, dict) and "commit" in base and base["commit"] is None and not os.path.isdir(cfg.model):
        raise ValueError(f"--adapter {adapter}: its base is recorded as the local folder {cfg.model}"
                         + (", relative to where it was trained," if not os.path.isabs(cfg.model) else "")
                         + " which is not there from here; pass --model with its path")


def merge(adapter, out, base=None, dtype="float32", revision=None, allow_lossy=False, allow_other_base=False):
    """`rigsa.py merge`: base + adapter, merged in float32 and cast once, written as a checkpoint in
    the official layout (adapter_files.write_merged). A bfloat16 cast that loses more than 1% of
    sum |alpha m dW| (small deltas round away under bfloat16's ulp of W0) is refused unless
    allow_lossy: the merged model would be closer to the base than to the adapted one."""
    if allow_lossy and dtype == "float32":   # a flag that cannot act
        raise ValueError("--allow-lossy: a float32 merge loses nothing; drop it, or use it with --dtype bfloat16")
    _, meta, cfg = rigsa.read_adapter(adapter, tensors=False)
    if rigsa.METHODS[cfg.method]["nf4"]:
        raise ValueError(f"{adapter}: a QLoRA adapter sits on a 4-bit base, and merging would re-quantize it "
                         f"(lossy); use it unmerged (evals/run.py --adapter) or its PEFT copy in iterK-peft/")
    out = Path(out)
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a link" if out.is_symlink() else "a file" if not out.is_dir() else "a directory that is not empty"
        raise FileExistsError(f"--out {out}: is {what}; name a new folder (or an empty one)")
    name = base or cfg.model
    if not base:
        check_recorded_base(cfg, meta.get("base"), adapter)
    M.check_revision(name, revision)   # as train and evals/run.py refuse it
    src = M.resolve(name, revision or (cfg.revision if not base or base == cfg.model else None) or None)
    AF.check_not_adapter(src, name)
    if os.path.realpath(out).startswith(os.path.realpath(src).rstrip(os.sep) + os.sep):   # a model's folder is its own
        raise ValueError(f"--out {out}: is in the base model's directory {src}, which this merge reads; choose "
                         f"another --out")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    try:   # before the load
        util.check_writable(parent)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose another --out") from None
    ident = {"model": name, **M.base_identity(src)}
    mcfg = M.check_checkpoint(src)[0]   # a quantized base or another model's tokenizer: said before the adapter's read
    check_fits(adapter, cfg, meta, mcfg, src, ident)   # its layers and shapes, from its header
    verdict = AF.check_base(meta["base"], ident, f"--adapter {adapter}", allow_other_base)   # before the load
    read = rigsa.read_adapter(adapter)   # its tensors, checksum checked, before the load too
    model, _ = M.load(src, "cpu", torch.float32)   # merge in float32, then cast
    load_adapter(model, adapter, read=read)
    lost, total = AF.merge_adapters(model, getattr(torch, dtype))
    frac = lost / max(total, 1e-30)
    what = "scale*B@A" if rigsa.METHODS[read[2].method]["lora"] else "alpha*m*dW"   # the delta added to W0
    if frac > 0.01 and not allow_lossy:
        raise ValueError(f"--dtype {dtype}: the cast loses {frac:.2%} of sum|{what}| (more than 1%); merge in "
                         f"float32 (the default), or pass --allow-lossy to write it anyway")
    AF.write_merged(out, src, model, getattr(torch, dtype),
                    {"adapter": str(AF.adapter_path(adapter)), "adapter_sha256": meta.get("tensors_sha256"),
                     "base": ident, "adapter_base": meta["base"], "base_check": verdict, "dtype": dtype})
    print(f"merged {adapter} into {out} ({dtype}); the cast lost {frac:.2%} of sum|{what}|")
    return out

# -----------------------------------------------------------------------------
# demo: the whole pipeline offline on a tiny random model (make demo)

DEMO_ENTRIES = ("DEMO", "tiny-model", "mnist", "run")   # what `rigsa.py demo` writes under --out


def demo(out="runs/demo", dtype="float32"):
    """A tiny random model with SmolLM2's architecture and tokenizer structure learns synthetic 8x8
    digits (a 5x7 font with 5% of the pixels noise) through two IMP iterations. The lr is higher and
    the weight decay lower than the paper's (§4.4): 2 x 300 steps instead of 2 x 3,713. float32 by
    default: the exact path, so that what it prints is what the README says (--dtype bfloat16: the
    low-precision path on the same run, for comparison)."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a tiny model is all per-op overhead: threads only add to it
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "DEMO").is_file())):
        raise FileExistsError(f"{out}: exists and is not a demo directory (no DEMO file in it); "
                              f"choose another --out, or an empty folder")
    try:   # an unwritable working directory (the default --out is relative) or a file on the path: said as --out
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make it ({e.strerror}); choose another --out") from None
    with util.lock_dir(out, "rigsa.py demo"):   # one demo per folder; and its run is not another's to delete
        with util.lock_dir(out / "run") if (out / "run").is_dir() else contextlib.nullcontext():
            for name in DEMO_ENTRIES:   # what an earlier demo wrote; anything else there is the user's, and stays
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        (out / "DEMO").write_text("written by rigsa.py demo\n")
        tiny.write_tiny_checkpoint(out / "tiny-model", shape="gqa", seed=0)
        mnist.write_synthetic_mnist(out / "mnist", n_train=400, n_test=100, size=8, seed=0, noise=0.05, shift=False)
        cfg = rigsa.Config(model=str(out / "tiny-model"), out=str(out / "run"), data_dir=str(out), device="cpu",
                           dtype=dtype, iters=2, steps=300, epochs=100.0, warmup=10, lr=1e-2, weight_decay=0.1,
                           val_frac=0.05, micro_batch=16, log_every=10, save_every=0, offline=True, verify=False)
        print("demo: tiny SmolLM2-shaped random model, 380 synthetic 8x8 training digits, 2 IMP iterations")
        if rigsa.train(cfg) is None:   # stopped by a signal (it said so, with the command that continues)
            return None
        model, tok = M.load(cfg.model, "cpu", getattr(torch, dtype))
        x, y = mnist.load_mnist(out / "mnist", "test", verify=False)
        base_acc, _ = rigsa.mnist_accuracy(model, tok, x, y, progress=False)
        print(f"base model (no adapter) test acc {base_acc:.1%}; chance is 10%")
        print(f"demo done in {time.perf_counter() - t0:.0f} s; adapters in {cfg.out}/iterK.safetensors")
        return cfg.out

# -----------------------------------------------------------------------------
# the command line

def parser():
    """rigsa.py's parser, and train's (whose flags are Config's fields)."""
    ap = util.ArgumentParser(prog="rigsa.py", description=rigsa.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    train_ap = flags.add_flags(sub.add_parser("train", help="train adapters with IMP (§3.2, §4.4)"), rigsa.Config)
    p = sub.add_parser("show", help="print one image as Textual MNIST (§4.2, Figure 1)")
    p.add_argument("--index", type=rigsa.INT0, default=0,
                   help=f"the image's index within --split, split as train's defaults split it: val, the images "
                        f"--val-frac {rigsa.Config.val_frac} and --split-seed {rigsa.Config.split_seed} draw from "
                        f"the training file; train, the rest in the file's order; test, the test file [default: 0]")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="[default: train]")
    p.add_argument("--data-dir", default="data", type=util.nonempty("a folder"), help="data root, MNIST in <root>/mnist/ [default: data]")
    p.add_argument("--offline", action="store_true", help="never download: a missing MNIST file is an error")
    p.add_argument("--no-verify", action="store_true", help="skip the MNIST checksums (stand-in data)")
    p = sub.add_parser("merge", help="merge an adapter into its base model, official layout")
    p.add_argument("--adapter", required=True, type=util.nonempty("an adapter (RUN/iterK)"), help="RUN/iterK")
    p.add_argument("--out", required=True, type=util.nonempty("a folder"), help="output directory (new, or empty)")
    p.add_argument("--model", default=None, type=util.nonempty("a hub id or a model folder, or drop the flag"),
                   help="base model [default: the one the adapter was trained on]")
    p.add_argument("--revision", default=None, help="hub revision of --model [default: the adapter's recorded one]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="of the merged weights [default: float32: bfloat16 rounds away small deltas, so a "
                        "cast that loses more than 1%% of the adapter is refused without --allow-lossy]")
    p.add_argument("--allow-lossy", action="store_true", help="write a bfloat16 merge whatever the cast loses")
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge into a base other than the one the adapter was trained on (recorded in rigsa-merge.json)")
    p = sub.add_parser("demo", help="the whole pipeline offline on a tiny model (under a minute on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", type=util.nonempty("a folder"), help="[default: runs/demo]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 (default: the exact path, what the README shows) or bfloat16 (weights and autocast, "
                        "dW and AdamW in float32) to compare")
    return ap, train_ap


def main(argv=None, shell=False):
    """shell: rigsa.py runs as a script, the process is this command's (a Python caller's signals stay its own)."""
    ap, train_ap = parser()
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    util.keep_freed_memory()
    interrupts.stop_as_interrupt()   # SIGTERM as Ctrl-C: cleanup runs, one line, exit 143 (training: resume.pt first)
    here = rigsa.__file__            # the continue commands name rigsa.py, as typed
    # under torchrun only train shares its work: two merges raced to write one --out (said by rank 0 alone)
    try:
        several = interrupts.env_count("WORLD_SIZE", 1) > 1
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.cmd != "train" and several:   # torchrun's other ranks exit without a word: rank 0 says it
        sys.exit((f"error: rigsa.py {a.cmd} runs in one process; run it without torchrun" if interrupts.torchrun() else
                  f"error: rigsa.py {a.cmd} runs in one process; unset WORLD_SIZE (in the environment, not torchrun's)")
                 if interrupts.speaks() else 1)
    try:
        if a.cmd == "train":
            given = flags.typed(train_ap, argv[argv.index("train") + 1:], rigsa.Config)
            done = rigsa.train(rigsa.Config(**{f.name: getattr(a, f.name) for f in dataclasses.fields(rigsa.Config)}),
                               given)
            code = 128 + rundir.STOP[0] if done is None and rundir.STOP else 0   # interrupted by a signal: saved, and the shell sees why
            if shell and not code and util.world()[1] == 1:   # complete, and written: a signal until the exit is ignored
                interrupts.finished()
            interrupts.stop_as_interrupt(False)   # its files are written: a signal from here on needs no word
            if done is not None and rundir.STOP:   # it came during the last step or evaluation: nothing left to stop
                util.say(f"{signal.Signals(rundir.STOP[0]).name} came during the run's last step or evaluation: the "
                         f"run completed")
            util.exit_distributed(code)
            if code:
                sys.exit(code)
        elif a.cmd == "show":
            x, y = mnist.load_mnist(mnist.mnist_dir(a.data_dir), a.split, download=not a.offline, verify=not a.no_verify)
            if not a.index < len(x):
                raise ValueError(f"--index {a.index}: outside the {a.split} split " + (f"(0..{len(x) - 1})" if len(x) else
                                                                                        "(it holds no images)"))
            print(rigsa.to_text(x[a.index]))
            print(f"label: {int(y[a.index])}")
        elif a.cmd == "merge":
            merge(a.adapter, a.out, a.model, a.dtype, a.revision, a.allow_lossy, a.allow_other_base)
        elif a.cmd == "demo" and demo(a.out, a.dtype) is None and rundir.STOP:   # stopped: as train, 128 + the signal
            sys.exit(128 + rundir.STOP[0])
        if a.cmd != "train" and shell:   # done and written: a signal until the exit is ignored, not a silent 143
            interrupts.finished()
    except (OSError, ValueError, RuntimeError) as e:   # OSError: FileNotFoundError, FileExistsError, a full disk
        util.abandon_distributed()
        sys.exit(f"error: {' '.join(str(e).split())}")
    except KeyboardInterrupt:   # Ctrl-C outside training, or a second signal during it: at once, in one line
        util.abandon_distributed()
        if rundir.STOP:
            interrupts.SIGNALS.append(rundir.STOP[-1])
        if a.cmd == "train" and (Path(a.out) / "config.json").exists():
            what = (f"{rundir.continue_command(a.out)} continues from the last "
                    f"resume checkpoint")
        else:
            what = f"nothing was kept; run again with: {interrupts.command(here, argv)}"
        interrupts.exit_interrupted(what)
    finally:
        interrupts.stop_as_interrupt(False)   # the handlers as they were, or after finished() ignored
