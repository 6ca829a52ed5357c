"""The command lines' bad-input matrix: every foreseeable fault gives one line that
names the thing, `error: ...`, exit 1 (2 for usage), no traceback and no new file; Ctrl-C, SIGTERM
and SIGKILL during training lose nothing. evals/run.py's own matrix is in tests/test_evals.py."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli
import model as M
import reproduce
import rigsa
from lib import adapter_files as AF
from lib import flags
from lib import mnist
from lib import rundir
from lib import interrupts
from lib import tiny
from lib import util
from evals import run as evals_run
from conftest import one_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, above tests/


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, tiny_mha_dir):
    """Data, a finished run with its adapters, a QLoRA adapter, broken files: what the cases point at."""
    w = tmp_path_factory.mktemp("world")
    mnist.write_synthetic_mnist(w / "data" / "mnist", n_train=24, n_test=4, size=8)
    cfg = dict(model=str(tiny_dir), data_dir=str(w / "data"), device="cpu", dtype="float32", steps=2, warmup=1, batch_size=4, val_frac=0.25,
               micro_batch=2, limit=2, log_every=1, save_every=0, offline=True, verify=False)
    with one_thread():
        rigsa.train(rigsa.Config(out=str(w / "run"), iters=2, lr=2e-2, **cfg))
        rigsa.train(rigsa.Config(out=str(w / "qlora"), method="qlora", rank=2, **cfg))
    (w / "broken").mkdir()
    (w / "broken" / "x.safetensors").write_bytes(b"not a safetensors file")
    (w / "badconfig").mkdir()
    (w / "badconfig" / "config.json").write_text("{oops")
    shutil.copytree(w / "run", w / "badresume")
    (w / "badresume" / "resume.pt").write_bytes(b"\x00garbage")
    (w / "badmnist" / "mnist").mkdir(parents=True)
    for f in (w / "data" / "mnist").iterdir():
        shutil.copy(f, w / "badmnist" / "mnist" / f.name)
    (w / "badmnist" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")   # an empty file
    (w / "emptydata").mkdir()
    (w / "notademo").mkdir()
    (w / "notademo" / "keep.txt").write_text("mine")
    (w / "full").mkdir()
    (w / "full" / "x").write_text("not empty")
    # another checkpoint of the same shapes (other weights): an adapter loads into it silently unless its base is checked
    tiny.write_tiny_checkpoint(w / "other", shape="gqa", seed=1)
    shutil.copytree(tiny_dir, w / "moved")        # a run whose base directory's weights later change
    with one_thread():
        rigsa.train(rigsa.Config(out=str(w / "onmoved"), iters=2, lr=2e-2, halt_after=1,
                                 **{**cfg, "model": str(w / "moved"), "save_every": 1}))
    shutil.copy(w / "other" / "model.safetensors", w / "moved" / "model.safetensors")
    t, meta = load_file(w / "run" / "iter2.safetensors"), safe_open_meta(w / "run" / "iter2.safetensors")
    # files made wrong, not damaged since: their checksum is their tensors'
    save = lambda d, name: save_file(d, w / name, metadata={**meta, "tensors_sha256": AF.checksum(d)})
    save({**t, "model.layers.9.mlp.up_proj.mask": t["model.layers.0.mlp.up_proj.mask"].clone()},
         "extralayer.safetensors")                                           # a layer this model lacks
    save_file(t, w / "noconfig.safetensors", metadata={k: v for k, v in meta.items() if k != "config"})
    save_file(t, w / "futurekey.safetensors",                               # a newer version's config key
              metadata={**meta, "config": json.dumps({**json.loads(meta["config"]), "future_knob": 3})})
    # the same weights under another config (rope_theta): another base too
    shutil.copytree(tiny_dir, w / "tweak")
    c = json.loads((w / "tweak" / "config.json").read_text())
    (w / "tweak" / "config.json").write_text(json.dumps({**c, "rope_theta": 10.0}))
    with one_thread():   # a run halted early, then its data changes under --data-dir
        rigsa.train(rigsa.Config(out=str(w / "halted"), iters=2, lr=2e-2, halt_after=1, **{**cfg, "save_every": 1}))
    mnist.write_synthetic_mnist(w / "otherdata" / "mnist", n_train=24, n_test=4, size=8, seed=7)
    mine = {**json.loads(meta["config"]), "criterion": "movement"}   # pruned by a criterion a script registered
    save_file(t, w / "mycriterion.safetensors", metadata={**meta, "config": json.dumps(mine)})
    future = {**json.loads(meta["config"]), "method": "frobnicate"}   # a value this version cannot use, as a later
    save_file(t, w / "badmethod.safetensors",                          # version would write it: its checksums its own
              metadata={**meta, "config": json.dumps(future), "install_sha256": AF.install_checksum(future)})
    n0 = "model.layers.0.mlp.up_proj"   # damaged adapters: a part missing, a mask of the wrong dtype, a base not an identity
    save({k: v for k, v in t.items() if k != n0 + ".delta"}, "nodelta.safetensors")
    save({**t, n0 + ".mask": t[n0 + ".mask"].float()}, "floatmask.safetensors")
    save({**t, n0 + ".delta": t[n0 + ".delta"].half()}, "halfdelta.safetensors")
    save({**t, n0 + ".delta": t[n0 + ".delta"][:-1]}, "shortdelta.safetensors")
    save_file({**t, n0 + ".delta": t[n0 + ".delta"] * 2}, w / "flipped.safetensors", metadata=meta)   # damaged since
    save_file(t, w / "oddbase.safetensors", metadata={**meta, "base": '"abc"'})
    save_file(t, w / "relbase.safetensors",   # trained with a relative --model, read from elsewhere
              metadata={**meta, "config": json.dumps({**json.loads(meta["config"]), "model": "runs/gone", "revision": ""})})
    shutil.copytree(w / "data", w / "noimages")
    mnist.write_idx(w / "noimages" / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((0, 8, 8), np.uint8))
    mnist.write_idx(w / "noimages" / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros((0,), np.uint8))
    shutil.copytree(w / "run", w / "emptyresume")   # a resume.pt that torch reads, but not a run's
    torch.save({}, w / "emptyresume" / "resume.pt")
    shutil.copytree(w / "halted", w / "renamedkey")   # started by a version whose Config named a field otherwise
    c = json.loads((w / "renamedkey" / "config.json").read_text())
    c["config"]["keep_frac"] = c["config"].pop("keep")
    (w / "renamedkey" / "config.json").write_text(json.dumps(c))
    shutil.copytree(w / "run", w / "badlog")     # a complete run whose log was damaged
    (w / "badlog" / "metrics.jsonl").write_text("{oops\n")
    (w / "orphan").mkdir()                       # a run's files without its config.json: not a new run's to replace
    (w / "orphan" / "metrics.jsonl").write_text("{}\n")
    (w / "orphan" / "resume.pt").write_bytes(b"mine")
    shutil.copytree(tiny_dir, w / "bigvocab")     # a tokenizer with more tokens than the model's embeddings
    from tokenizers import AddedToken, Tokenizer
    tk = Tokenizer.from_file(str(w / "bigvocab" / "tokenizer.json"))
    tk.add_special_tokens([AddedToken(f"<|extra{i}|>", special=True) for i in range(8)])
    tk.save(str(w / "bigvocab" / "tokenizer.json"))
    shutil.copytree(tiny_dir, w / "notemplate")   # a tokenizer without a chat template: --chat cannot know the format
    c = json.loads((w / "notemplate" / "tokenizer_config.json").read_text())
    (w / "notemplate" / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in c.items() if k != "chat_template"}))
    os.mkfifo(w / "fifo")                         # --output onto a pipe: never replaced by a file
    (w / "opfile").mkdir()                        # --output_path whose model folder is a file
    (w / "opfile" / evals_run.lm_eval_name(str(tiny_dir), None)[1]).write_text("mine")
    d = dict(t)                                   # an adapter that a diverged training left NaN
    d["model.layers.0.mlp.up_proj.delta"] = torch.full_like(d["model.layers.0.mlp.up_proj.delta"], float("nan"))
    save(d, "nanadapter.safetensors")
    return w, str(tiny_dir), str(tiny_mha_dir)


def safe_open_meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def T(*argv):
    return ["train", "--device", "cpu", "--dtype", "float32", "--offline", "--no-verify", *argv]


def E(*argv):
    return ["--device", "cpu", "--offline", "--no-verify", "--data-dir", "{w}/data", "--limit", "2", *argv]


# (command line, exit code, text the one line must contain). {w}: the world; {m}: the tiny model;
# {mha}: another model shape
CASES = [
    # numeric flags, checked where they are parsed (exit 2)
    ("rigsa", T("--lr", "-1"), 2, "--lr"),
    ("rigsa", T("--steps", "-3"), 2, "--steps"),
    ("rigsa", T("--val-frac", "1.5"), 2, "--val-frac"),
    ("rigsa", T("--epochs", "0"), 2, "--epochs"),
    ("rigsa", T("--keep", "0"), 2, "--keep"),
    ("rigsa", T("--batch-size", "0"), 2, "--batch-size"),
    ("rigsa", T("--micro-batch", "two"), 2, "--micro-batch"),
    ("rigsa", T("--alpha-init", "0"), 2, "--alpha-init"),
    ("rigsa", T("--beta2", "1"), 2, "--beta2"),
    ("rigsa", T("--warmup", "-5"), 2, "--warmup"),
    ("rigsa", T("--method", "foo"), 2, "--method"),
    ("rigsa", T("--moments", "4bit"), 2, "--moments"),
    ("rigsa", T("--out", ""), 1, "--out: empty; name a folder"),   # else the current directory
    ("rigsa", T("--allow-other-base"), 1, "--allow-other-base: acts only with --resume or --mask-like"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--out", "{m}"), 1,
     "{m}: holds a config.json that is not a run's (a model's folder?); choose another --out"),
    ("rigsa", T("--data-dir", " "), 1, "--data-dir: empty; name a folder"),
    ("rigsa", T("--no-such-flag"), 2, "--no-such-flag"),
    ("rigsa", ["frobnicate"], 2, "frobnicate"),
    ("rigsa", ["show", "--index", "-1"], 2, "--index"),
    # flags the method would ignore, combinations, the device (exit 1)
    ("rigsa", T("--method", "lora", "--keep", "0.5"), 1, "--keep 0.5: --method lora does not use it"),
    ("rigsa", T("--method", "rigsa", "--rank", "4"), 1, "--rank 4: --method rigsa does not use it"),
    ("rigsa", T("--method", "dense", "--iters", "3"), 1, "--iters 3: --method dense does not use it"),
    ("rigsa", T("--method", "random-mask"), 1, "--mask-like"),
    ("rigsa", T("--method", "random-mask", "--density", "0"), 1, "--density 0: a random mask with no free entry trains "
     "nothing; give a density > 0, or --mask-like RUN/iterK"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--method", "random-mask", "--density", "0", "--mask-like",
                "{w}/nope"), 1, "{w}/nope.safetensors: adapter file not found"),   # 0 with --mask-like: not given
    ("rigsa", T("--device", "cuda"), 1, "--device cuda: CUDA is not available"),
    ("rigsa", T("--device", "gpu"), 1, "--device 'gpu'"),
    # files: the model, the data, the run directory, resume (exit 1)
    ("rigsa", T("--model", "{w}/nope", "--data-dir", "{w}/data", "--val-frac", "0"), 1, "nope: no such model directory"),
    # the data before the base (its download is gigabytes): a bad data file is said first
    ("rigsa", T("--model", "{w}/nope", "--data-dir", "{w}/emptydata"), 1, "{w}/emptydata/mnist/train-images-idx3"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/emptydata"), 1, "MNIST: missing data files"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/emptydata"), 1, "t10k-labels-idx1-ubyte.gz <- "),   # all, at once
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/badmnist"), 1, "train-images-idx3-ubyte.gz"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--out", "{w}/run"), 1, "a run is already there"),
    ("rigsa", T("--resume", "--out", "{w}/emptydata"), 1, "nothing to resume"),
    ("rigsa", T("--resume", "--out", "{w}/badconfig"), 1, "config.json: not a run's config"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--out", "{w}/badconfig"), 1,
     "{w}/badconfig: a run is already there"),   # a damaged run's config.json: a run's, not a model's
    ("rigsa", T("--resume", "--out", "{w}/run", "--lr", "0.5"), 1, "--lr 0.5 (saved: 0.02)"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--method", "random-mask", "--mask-like", "{w}/nope"),
     1, "nope.safetensors: adapter file not found"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--method", "random-mask", "--mask-like",
                "{w}/broken/x"), 1, "x.safetensors: not a readable safetensors file"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--method", "random-mask",
                "--mask-like", "{w}/qlora/iter1"), 1, "--mask-like {w}/qlora/iter1: a qlora adapter, which has no mask"),
    ("rigsa", T("--model", "{mha}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--method", "random-mask",
                "--mask-like", "{w}/run/iter2", "--allow-other-base"), 1,
     "--mask-like {w}/run/iter2: its mask of model.layers.0.self_attn.k_proj is for a layer of about 2,048 entries, and "
     "this model's has 4,096; its per-layer counts cannot be copied"),
    # merge
    ("rigsa", ["merge", "--adapter", "{w}/nope", "--out", "{w}/m1"], 1, "nope.safetensors: adapter file not found"),
    ("rigsa", ["merge", "--adapter", "{w}/broken/x", "--out", "{w}/m2"], 1, "not a readable safetensors file"),
    ("rigsa", ["merge", "--adapter", "{w}/qlora/iter1", "--out", "{w}/m3"], 1, "QLoRA adapter"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/full"], 1, "--out"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/m4", "--dtype", "bfloat16"], 1,
     "--dtype bfloat16: the cast loses"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/m5", "--model", "{mha}"], 1,
     "does not fit the base model"),   # other shapes: said first, as --allow-other-base could not help
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/m5", "--model", "{mha}", "--allow-other-base"],
     1, "it was made on a model of other shapes"),
    ("rigsa", ["show", "--index", "999", "--data-dir", "{w}/data", "--no-verify"], 1, "--index 999"),
    ("rigsa", ["show", "--index", "4", "--split", "test", "--data-dir", "{w}/data", "--no-verify"], 1,
     "--index 4: outside the test split (0..3)"),   # one past the last image; the range it has
    ("rigsa", ["show", "--data-dir", "{w}/emptydata", "--offline"], 1, "MNIST: missing data files"),
    ("rigsa", ["demo", "--out", "{w}/notademo"], 1, "not a demo directory"),
    # model.py, reproduce.py
    ("model", ["--model", "{w}/nope", "--prompt", "hi"], 1, "nope: no such model directory"),
    ("model", ["--model", "{m}", "--prompt", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("model", ["--model", "{m}", "--prompt", "hi", "--device", "cuda"], 1, "--device cuda"),
    ("model", ["--model", "{w}/broken", "--prompt", "hi"], 1, "config.json"),
    # 1. an adapter is applied exactly, to the base it was trained on, or refused
    ("evals", E("--task", "mnist", "--adapter", "{w}/run/iter2", "--quantize", "nf4"), 1, "--quantize nf4"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/run/iter2", "--model", "{w}/other"), 1, "made on the base"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/extralayer", "--model", "{m}"), 1,
     "(it adapts a layer model.layers.9.mlp.up_proj this base lacks); the file is damaged or edited: use the one its "
     "run wrote"),   # said from its header, before the base loads
    ("evals", E("--task", "mnist", "--adapter", "{w}/noconfig", "--model", "{m}"), 1, "its metadata is not readable"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/m6", "--model", "{w}/other"], 1, "made on the base"),
    ("rigsa", ["merge", "--adapter", "{w}/noconfig", "--out", "{w}/m7"], 1, "its metadata is not readable"),
    ("rigsa", T("--model", "{w}/other", "--data-dir", "{w}/data", "--val-frac", "0.25", "--method", "random-mask",
                "--mask-like", "{w}/run/iter2"), 1, "--mask-like {w}/run/iter2: made on the base"),
    ("rigsa", T("--resume", "--out", "{w}/onmoved"), 1, "--resume {w}/onmoved: made on the base"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/run/iter2", "--model", "{w}/tweak"), 1, "made on the base"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/badmethod", "--model", "{m}"), 1,
     "badmethod.safetensors: a saved value this version cannot use, --method 'frobnicate'"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--method", "random-mask",
                "--mask-like", "{w}/badmethod"), 1, "badmethod.safetensors: a saved value this version cannot use"),
    ("rigsa", T("--resume", "--out", "{w}/halted", "--data-dir", "{w}/otherdata"), 1,
     "is not the file the run started on"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--data-dir", "{w}/noimages"), 1, "holds no images"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/nodelta", "--model", "{m}"), 1, "up_proj.delta missing"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/floatmask", "--model", "{m}"), 1, "are not an adapter's"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/run", "--model", "{m}"), 1,
     "{w}/run: a run directory; name one of its adapters as RUN/iterK: {w}/run/iter1, {w}/run/iter2"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/shortdelta", "--model", "{m}"), 1,
     "the very one it was trained on ("),
    ("evals", E("--task", "mnist", "--adapter", "{w}/relbase"), 1, "its base is recorded as the local folder runs/gone"),
    ("rigsa", ["merge", "--adapter", "{w}/relbase", "--out", "{w}/m11"], 1, "its base is recorded as the local folder"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/m10", "--allow-lossy"], 1,
     "--allow-lossy: a float32 merge loses nothing"),
    ("rigsa", ["merge", "--adapter", "{w}/qlora/iter1-peft", "--out", "{w}/m9"], 1,
     "{w}/qlora/iter1-peft: the PEFT copy of {w}/qlora/iter1 (for peft and transformers); name the adapter itself"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/halfdelta", "--model", "{m}"), 1, "up_proj.delta is float16, not float32"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/flipped", "--model", "{m}"), 1,
     "error: --adapter: {w}/flipped.safetensors: its tensors do not match the checksum written with them (changed since"),
    ("rigsa", ["merge", "--adapter", "{w}/oddbase", "--out", "{w}/m8"], 1, "oddbase.safetensors: its metadata"),
    ("rigsa", ["merge", "--adapter", "{w}/run/iter2", "--out", "{w}/full/x"], 1, "--out {w}/full/x: is a file"),
    # 4. a flag means what it says: typed at its default is typed; one that cannot act is refused
    ("rigsa", T("--decay-gate", "--weight-decay", "0"), 1, "--decay-gate: acts only with --weight-decay above 0"),
    ("rigsa", T("--split-seed", "3", "--val-frac", "0"), 1, "--split-seed 3: acts only with --val-frac above 0"),
    ("rigsa", T("--val-frac", "0", "--no-eval-test"), 1, "--val-frac 0 with --no-eval-test"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--halt-after", "1000"), 1,
     "--halt-after 1000: the run has"),
    ("rigsa", T("--model", "{w}/nomodel", "--data-dir", "{w}/data", "--val-frac", "0.25", "--halt-after", "1000"), 1,
     "--halt-after 1000: the run has"),   # said before the base is looked for (at 1.7B, a download of gigabytes)
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--save-every", "500"), 1,
     "--save-every 500: an iteration is"),
    ("rigsa", T("--resume", "--out", "{w}/run", "--lr", "2e-3"), 1, "--lr 0.002 (saved: 0.02)"),
    ("rigsa", T("--resume", "--out", "{w}/run", "--iters", "5"), 1, "--iters 5 (saved: 2)"),
    ("rigsa", T("--iters", "1", "--keep", "0.5"), 1, "--keep 0.5: acts only with --iters above 1"),
    ("rigsa", T("--iters", "1", "--prune-scope", "layer"), 1, "--prune-scope layer: acts only with --iters above 1"),
    ("rigsa", T("--iters", "1", "--no-reset-alpha"), 1, "--no-reset-alpha: acts only with --iters above 1"),
    ("rigsa", T("--init-std", "0.1"), 1, "--init-std 0.1: acts only with --init normal"),
    ("rigsa", T("--method", "lora", "--lr", "2e-3"), 1, "--lr 0.002: --method lora does not use it"),
    ("rigsa", T("--micro-batch", "32"), 1, "--micro-batch 32: larger than the effective batch"),
    ("rigsa", T("--seed", str(2 ** 63 - 1)), 2, "--seed"),
    ("rigsa", T("--model", "{m}", "--revision", "main"), 1, "--revision main: the model"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.01"), 1,
     "--val-frac 0.01 leaves the val split"),
    ("rigsa", T("--resume", "--out", "{w}/emptyresume"), 1, "resume.pt: not a resume checkpoint of rigsa.py train (it lacks"),
    ("rigsa", T("--resume", "--out", "{w}/renamedkey"), 1,
     "{w}/renamedkey/config.json: the run started with config keys this version of rigsa does not know: keep_frac "
     "(another version's, or a field renamed since), which a resume would drop and go on without; resume it with the "
     "code that started it"),
    ("rigsa", T("--resume", "--out", "{w}/badlog"), 1, "metrics.jsonl: the complete run's log is not readable"),
    ("rigsa", ["show", "--split", "val", "--data-dir", "{w}/data", "--no-verify"], 1, "outside the val split (it holds no images)"),
    ("rigsa", T("--lr", "inf"), 2, "--lr"),
    ("rigsa", T("--epochs", "inf"), 2, "--epochs"),
    ("rigsa", T("--iters", "2", "--keep", "0.8,0.7"), 1, "--keep 0.8,0.7: 2 values for the 1 prunings of --iters 2"),
    ("rigsa", T("--model", "{m}", "--data-dir", "{w}/data", "--val-frac", "0.25", "--out", "{w}/orphan"), 1,
     "metrics.jsonl, resume.pt, files a run writes, but no config.json"),
    ("evals", E("--task", "mnist", "--model", "{w}/bigvocab"), 1, "tokenizer.json has"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--output", "{w}/fifo"), 1, "is not a regular file"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--output", "{w}/op", "--output_path", "{w}/op"), 1,
     "is where --output_path puts its folder"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--output_path", "{w}/opfile"), 1, "is a file, where lm-eval's layout"),
    ("evals", E("--task", "mnist", "--model", "{w}/" + "a" * 200 + "/" + "b" * 100, "--output_path", "{w}/oplong"), 1,
     "is longer than this file system allows"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--num-fewshot", "5", "--seed", str(2 ** 32)), 2, "--seed"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--revision", "main"), 1, "--revision main: the model"),
    ("evals", E("--task", "mnist", "--model", "{w}/notemplate", "--chat"), 1, "--chat: the model {w}/notemplate has no chat"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--seed", "3"), 1, "--seed 3: only Textual MNIST's few-shot draw"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--softmax-dtype", "model"), 1,
     "--softmax-dtype model: only PIQA's and HellaSwag's log-likelihoods use it, and --task mnist has neither"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--softmax-dtype", "float32"), 1,   # typed at its default
     "--softmax-dtype float32: only PIQA's and HellaSwag's log-likelihoods use it"),
    ("evals", E("--task", "mnist", "--model", "{m}", "--allow-other-base"), 1, "--allow-other-base: lets an --adapter"),
    ("evals", E("--task", "mnist", "--adapter", "{w}/nanadapter", "--model", "{m}"), 1,
     "its tensor model.layers.0.mlp.up_proj.delta is not finite (NaN or inf"),   # said before the base loads
    ("reproduce", ["--limit", "-1", "--dry-run"], 2, "--limit"),
    ("reproduce", ["--tables-only", "--model", "{m}", "--out", "{w}/rp"], 2, "--tables-only: --model cannot act"),
    ("reproduce", ["--tables-only", "--limit", "2", "--out", "{w}/rp"], 2, "--tables-only: --limit cannot act"),
    ("reproduce", ["--seeds", "a,b", "--dry-run"], 2, "--seeds"),
    ("reproduce", ["--seeds", f"0,{2 ** 29}", "--dry-run"], 2, "--seeds 0,536870912: 536870912 is outside"),
]
MAINS = {"rigsa": rigsa.main, "model": M.main, "reproduce": reproduce.main, "evals": evals_run.main}


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("tool,argv,code,text", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_one_line_no_traceback_no_new_file(world, tool, argv, code, text, capsys, monkeypatch, tmp_path):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this machine has CUDA")
    w, m, mha = world
    sub = lambda s: s.format(w=w, m=m, mha=mha)  # noqa: E731
    monkeypatch.chdir(tmp_path)                   # the defaults (runs/rigsa, data/, runs/demo) land here
    before, here = files(w), files(tmp_path)
    with one_thread(), pytest.raises(SystemExit) as e:
        MAINS[tool]([sub(a) for a in argv])
    err = capsys.readouterr().err
    said = e.value.code if isinstance(e.value.code, str) else err   # sys.exit("error: ...") or argparse's
    status = 1 if isinstance(e.value.code, str) else e.value.code
    assert status == code, said
    assert said.startswith("error: ") and sub(text) in said and len(said.strip().splitlines()) == 1, said
    assert "Traceback" not in err
    assert files(w) == before and files(tmp_path) == here      # nothing half-written, nowhere


def test_the_matrix_covers_sixty_cases():
    assert len(CASES) >= 60


def test_a_config_made_in_python_is_checked_as_its_flags_are():
    for kw, said in ((dict(offline="yes"), "--offline 'yes': not a bool"), (dict(model=3), "--model 3: not a str"),
                     (dict(steps=True), "--steps True: not an int"), (dict(lr=True), "--lr True: not a float"),
                     (dict(lr=-1.0), "--lr: -1.0 is out of range: expected a number > 0"),
                     (dict(method="lora", keep=0.5), "--keep 0.5: --method lora does not use it (only rigsa, lt-sft do); "
                                                     "drop it")):
        with pytest.raises(ValueError) as e:
            rigsa.check_config(rigsa.Config(**kw))
        assert str(e.value) == said


def test_a_flag_annotated_as_a_string_bool_is_a_switch():
    @dataclasses.dataclass
    class C:
        on: "bool" = flags.field(False, "a switch")
    ap = flags.add_flags(util.ArgumentParser(), C)
    assert ap.parse_args(["--on"]).on is True and ap.parse_args(["--no-on"]).on is False


def test_an_adapter_pruned_by_a_criterion_registered_elsewhere_is_read(world):
    # the criterion chose the mask, which the file holds: evaluating or merging it needs no such function here
    w = world[0]
    assert rigsa.read_adapter(w / "mycriterion", tensors=False)[2].criterion == "movement"
    with pytest.raises(ValueError, match="a saved value this version cannot use, --method 'frobnicate'"):
        rigsa.read_adapter(w / "badmethod", tensors=False)   # what decides how it installs is still checked


def test_config_keys_renamed_since_are_read_under_their_names_now(capsys):
    # runs saved before --limit and --offline had those names (eval_max, download) resume and load as they ran
    old = dataclasses.asdict(rigsa.Config())
    del old["limit"], old["offline"]
    cfg = rundir.config_from({**old, "eval_max": 5, "download": False}, "old/config.json", rigsa.Config)
    assert cfg.limit == 5 and cfg.offline is True and capsys.readouterr().err == ""


def test_a_plain_dataclass_field_is_named_not_a_key_error():
    # a researcher's new `x: float = 0.0` beside the _f ones: every command said a bare KeyError: 'check'
    @dataclasses.dataclass
    class C:
        on: bool = flags.field(False, "a switch")
        smoothing: float = 0.0
    said = ("C.smoothing: a plain dataclass field; declare it with flags.field(default, help) (rigsa.py's _f), which "
            "gives it its flag, help, check and record in config.json")
    for use in (lambda: flags.add_flags(util.ArgumentParser(), C), lambda: flags.check(C()),
                lambda: flags.refuse_idle(C(), lambda f: True, lambda f: [], "rigsa", "--method")):
        with pytest.raises(TypeError) as e:
            use()
        assert str(e.value) == said


def run_main(main, argv, capsys):
    """-> (exit code, stdout, stderr) of a CLI main."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


EMPTY = [   # (main, argv, the one line): an empty value was the default or the current directory, unasked
    (evals_run.main, ["--task", "mnist", "--adapter", ""],   # the base evaluated as if no adapter had been named
     "argument --adapter: empty; name an adapter (RUN/iterK), or drop the flag"),
    (evals_run.main, ["--task", "mnist", "--model", ""],     # the 1.7B default, downloaded and evaluated
     "argument --model: empty; name a hub id or a model folder, or drop the flag"),
    (evals_run.main, ["--task", "mnist", "--data-dir", ""], "argument --data-dir: empty; name a folder"),
    (rigsa.main, ["merge", "--adapter", "r/iter1", "--out", ""], "argument --out: empty; name a folder"),   # [Errno 22]
    (rigsa.main, ["merge", "--adapter", "", "--out", "m"], "argument --adapter: empty; name an adapter (RUN/iterK)"),
    (rigsa.main, ["show", "--data-dir", ""], "argument --data-dir: empty; name a folder"),
    (rigsa.main, ["train", "--model", ""], "--model: empty; name a hub id or a model folder"),   # ": no such model"
    (M.main, ["--model", "", "--prompt", "hi"], "argument --model: empty; name a hub id or a model folder"),
    (reproduce.main, ["--model", "", "--dry-run"], "argument --model: empty; name a hub id or a model folder"),
]


@pytest.mark.parametrize("main,argv,said", EMPTY)
def test_an_empty_path_or_model_is_refused_naming_its_flag(main, argv, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:   # argparse's exit 2 with its line on stderr, or sys.exit("error: ...")
        main(argv)
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    assert e.value.code in (2, f"error: {said}") and f"error: {said}" in err and not os.listdir(tmp_path), err


def test_an_adapter_on_another_base_only_when_asked_and_recorded(world, tmp_path, capsys):
    # rule 1: --allow-other-base applies it, says so in one line, and the output records it
    w, m, _ = world
    ev = ["--task", "mnist", "--device", "cpu", "--offline", "--no-verify", "--data-dir", str(w / "data"),
          "--adapter", str(w / "run" / "iter2")]
    with one_thread():
        code, _, err = run_main(evals_run.main, ev + ["--output", str(tmp_path / "same.json")], capsys)
        assert code == 0 and "base" not in err.replace("base_check", ""), err
        code, _, err = run_main(evals_run.main, ev + ["--model", str(w / "other"), "--allow-other-base", "--output",
                                                      str(tmp_path / "other.json")], capsys)
    assert code == 0 and "applied anyway (--allow-other-base)" in err
    same, other = (json.loads((tmp_path / f).read_text()) for f in ("same.json", "other.json"))
    assert same["base_check"] == "same" and other["base_check"] == "other (allowed)"
    assert other["base"]["fingerprint"] != same["base"]["fingerprint"]
    assert same["adapter_code"] == same["code"] == util.code_version() and "another version" not in err
    assert same["adapter_dtype"] == json.loads((w / "run" / "config.json").read_text())["config"]["dtype"]
    with safe_open(str(w / "run" / "iter2.safetensors"), "pt") as f:   # trained by other code: said and recorded
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(t, tmp_path / "older.safetensors", metadata={**meta, "code": "0123456789ab"})
    with one_thread():
        code, _, err = run_main(evals_run.main, ev[:-1] + [str(tmp_path / "older"), "--output", str(tmp_path / "o.json")],
                                capsys)
    assert code == 0 and (f"note: --adapter {tmp_path / 'older'} was trained by another version of rigsa's code "
                          f"(0123456789ab) than this evaluation runs ({util.code_version()}): its Textual MNIST prompts "
                          f"are this version's") in err, err
    assert json.loads((tmp_path / "o.json").read_text())["adapter_code"] == "0123456789ab"
    with one_thread():
        code, _, err = run_main(rigsa.main, ["merge", "--adapter", str(w / "run" / "iter2"), "--out", str(tmp_path / "m"),
                                             "--model", str(w / "other"), "--allow-other-base"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "rigsa-merge.json").read_text())["base_check"] == "other (allowed)"


def test_files_of_another_version_load_with_one_warning(world, tmp_path, capsys):
    # rule 8: keys this version does not know are ignored, named in one line
    w, m, _ = world
    with one_thread():
        code, _, err = run_main(evals_run.main, ["--task", "mnist", "--device", "cpu", "--offline", "--no-verify",
                                                 "--data-dir", str(w / "data"), "--adapter", str(w / "futurekey"),
                                                 "--model", m], capsys)
    assert code == 0 and [x for x in err.splitlines() if "future_knob" in x] == [
        f"warning: {w / 'futurekey.safetensors'}: ignoring config keys this version of rigsa does not know: future_knob "
        f"(written by another version)"], err
    shutil.copytree(w / "run", tmp_path / "run")
    c = json.loads((tmp_path / "run" / "config.json").read_text())
    c["config"]["future_knob"] = 1
    (tmp_path / "run" / "config.json").write_text(json.dumps(c))
    with one_thread(), pytest.raises(SystemExit) as e:   # but a resume, which would go on without them, is refused
        rigsa.main(["train", "--resume", "--out", str(tmp_path / "run")])
    assert e.value.code == (f"error: {tmp_path / 'run' / 'config.json'}: the run started with config keys this version "
                            f"of rigsa does not know: future_knob (another version's, or a field renamed since), which "
                            f"a resume would drop and go on without; resume it with the code that started it")


def test_a_record_from_before_the_template_was_fingerprinted_is_named(tmp_path):
    # a base with chat_template.jinja got a new fingerprint; what an older version recorded on it is not "another base"
    d = tiny.write_tiny_checkpoint(tmp_path / "m", seed=0)
    shutil.copytree(d, tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    have = {"model": "t", **M.base_identity(tmp_path / "t")}
    assert have["without_template"] == M.base_identity(d)["fingerprint"] != have["fingerprint"]
    assert "without_template" not in M.base_identity(d)   # a base without the file: as before
    rec = {"model": "t", "commit": None, "fingerprint": have["without_template"]}
    for recorded, now in ((rec, have), ({**rec, "commit": "a" * 40}, {**have, "commit": "b" * 40})):
        with pytest.raises(ValueError, match=r"^--adapter A: recorded by an older rigsa, whose fingerprint of the base "
                                             r"left out its chat_template.jinja: every other file of t matches, the "
                                             r"template cannot be compared; use the base .* pass --allow-other-base .*"
                                             r"\(if the template is the one it was made with, nothing differs\)$"):
            AF.check_base(recorded, now, "--adapter A")
    assert AF.check_base(rec, have, "--adapter A", allow=True) == "other (allowed)"
    assert AF.check_base({**rec, "commit": "a" * 40}, {**have, "commit": "a" * 40}, "x") == "same"   # one hub commit
    with pytest.raises(ValueError, match=r"^--adapter A: made on the base t \(weights 0{16}\), not on"):
        AF.check_base({**rec, "fingerprint": "0" * 16}, have, "--adapter A")


def test_an_adapters_relative_base_not_there_from_here_is_said(tmp_path, monkeypatch):
    # a run trained with --model runs/x records runs/x; from another folder that names nothing (a hub id has a commit)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    local, hub = {"commit": None, "fingerprint": "f"}, {"commit": "a" * 40, "fingerprint": "f"}
    with pytest.raises(ValueError, match=r"^--adapter R/iter1: its base is recorded as the local folder runs/x, relative "
                                         r"to where it was trained, which is not there from here; pass --model"):
        cli.check_recorded_base(rigsa.Config(model="runs/x"), local, "R/iter1")
    cli.check_recorded_base(rigsa.Config(model="org/name", revision="a" * 40), hub, "R/iter1")   # a hub id
    cli.check_recorded_base(rigsa.Config(model="org/name"), hub, "R/iter1")   # older: no revision in its config
    cli.check_recorded_base(rigsa.Config(model="org/name"), None, "R/iter1")  # older still: no base record
    cli.check_recorded_base(rigsa.Config(model="here"), local, "R/iter1")     # there from here


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(world, tmp_path, capsys):
    # rule 7: a kill before resume.pt leaves config.json alone; --resume then starts again, with the same result
    w, m, _ = world
    args = ["train", "--model", m, "--data-dir", str(w / "data"), "--device", "cpu", "--dtype", "float32", "--offline",
            "--no-verify", "--steps", "3", "--warmup", "1", "--batch-size", "4", "--micro-batch", "2", "--iters", "2", "--limit", "2",
            "--val-frac", "0.25", "--save-every", "0"]
    with one_thread():
        assert run_main(rigsa.main, args + ["--out", str(tmp_path / "ref")], capsys)[0] == 0
        assert run_main(rigsa.main, args + ["--out", str(tmp_path / "cut"), "--halt-after", "1"], capsys)[0] == 0
        assert not (tmp_path / "cut" / "resume.pt").exists() or (tmp_path / "cut" / "resume.pt").unlink() is None
        code, _, err = run_main(rigsa.main, ["train", "--resume", "--out", str(tmp_path / "cut")], capsys)
    assert code == 0 and "starts again from its first step" in err, err
    assert adapters_equal(tmp_path / "cut", tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "gone")   # a complete run whose last adapter was removed: said
    (tmp_path / "gone" / "iter2.safetensors").unlink()
    with one_thread():
        code, _, err = run_main(rigsa.main, ["train", "--resume", "--out", str(tmp_path / "gone")], capsys)
    assert code == 0 and "(it holds iter1, but not iter2, the last): the run trains again from its first step" in err
    assert adapters_equal(tmp_path / "gone", tmp_path / "ref")


# ---- signals: Ctrl-C and SIGTERM save and say how to resume; SIGKILL loses only unsaved steps ----

def launch(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(REPO, "rigsa.py"), "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out, n, proc, timeout=120):
    """Until metrics.jsonl holds n step lines (the run is training), or the process ended."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        p = out / "metrics.jsonl"
        if p.exists() and sum('"step"' in line for line in p.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {n} steps: {proc.poll()}")


def adapters_equal(a, b):
    return all(load_file(a / f).keys() == load_file(b / f).keys() and
               all(torch.equal(load_file(a / f)[k], load_file(b / f)[k]) for k in load_file(a / f))
               for f in ("iter1.safetensors", "iter2.safetensors"))


def signalled_args(world):
    w, m, _ = world
    return ["--model", m, "--data-dir", str(w / "data"), "--device", "cpu", "--dtype", "float32", "--offline", "--no-verify",
            "--steps", "30",
            "--warmup", "2", "--lr", "2e-2", "--batch-size", "4", "--micro-batch", "2", "--iters", "2", "--limit", "2", "--val-frac", "0.25", "--epochs", "10",
            "--log-every", "1", "--save-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """The signalled run, trained once without a signal: what each signal's stopped and resumed run must
    equal (the cases only read it)."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
    with one_thread():
        rigsa.train(rigsa.Config(**vars(flags.add_flags(util.ArgumentParser(), rigsa.Config).parse_args(
            signalled_args(world) + ["--out", str(ref)]))))
    return ref


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, "twice"])
def test_a_signal_during_training_loses_nothing(world, uninterrupted, tmp_path, sig):
    args, ref = signalled_args(world), uninterrupted
    out = tmp_path / "run"
    proc = launch(args + ["--out", str(out)], tmp_path)
    wait_for_steps(out, 8, proc)
    if sig == "twice":            # Ctrl-C, and again before the step is done: at once, in one line
        proc.send_signal(signal.SIGINT)
        while "finishing this optimizer step" not in (line := proc.stderr.readline()):
            assert line, "the first Ctrl-C was not acknowledged"
        proc.send_signal(signal.SIGINT)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:     # nothing said; the last resume.pt (every 3 steps) and a stale .tmp remain
        assert proc.returncode == -signal.SIGKILL
        (out / "iter1.safetensors.tmp").write_bytes(b"half an adapter")             # an older version's name
        (out / ".iter1.safetensors.k3_x9qz0.tmp").write_bytes(b"half an adapter")   # util.atomic_write's
        (out / "iter1-peft").mkdir()
        (out / "iter1-peft" / "adapter_model.safetensors.tmp").write_bytes(b"half a PEFT export")
    elif sig == "twice":
        assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (f"SIGINT: stopped; {interrupts.python_cmd()} {REPO}/rigsa.py train --resume --out "
                                                   f"{out} continues from the last resume checkpoint")
    else:                         # the step finishes, resume.pt is written, the resume command is printed
        assert proc.returncode == 128 + sig, stderr
        assert f"{signal.Signals(sig).name}: finishing this optimizer step" in stderr and "Traceback" not in stderr
        assert f"continue with: {interrupts.python_cmd()} {REPO}/rigsa.py train --resume --out {out}" in stdout
    assert (out / "resume.pt").exists()
    with one_thread():
        rigsa.train(rigsa.Config(out=str(out), resume=True))
    assert not list(out.rglob("*.tmp")) and not (out / "resume.pt").exists()
    assert adapters_equal(out, ref)                       # bit for bit the uninterrupted run's
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines] == [json.loads(x).get("loss") for x in (ref / "metrics.jsonl").read_text().splitlines()]


def test_a_signal_during_the_last_evaluation_lets_the_run_complete_and_says_so(world, tmp_path, capsys, monkeypatch):
    # nothing is left to stop after the last training step: the evaluation and the adapter finish, exit 0
    w, m, _ = world
    evaluate = rigsa.evaluate
    monkeypatch.setattr(rundir, "STOP", [])   # the signal it records is this test's alone

    def signalled(run, it):   # Ctrl-C as the last iteration's evaluation starts
        if it == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(run, it)
    monkeypatch.setattr(rigsa, "evaluate", signalled)
    out = tmp_path / "run"
    with one_thread():
        cli.main(argv := ["train", "--model", m, "--data-dir", str(w / "data"), "--device", "cpu", "--dtype", "float32",
                          "--offline", "--no-verify", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--micro-batch",
                          "2", "--iters", "2", "--limit", "2", "--val-frac", "0.25", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert "SIGINT: finishing this optimizer step (or this iteration's evaluation and save), then writing a resume " \
           "checkpoint and stopping; a run in its last step or evaluation completes instead" in stderr, stderr
    assert stdout.rstrip().endswith("SIGINT came during the run's last step or evaluation: the run completed"), stdout
    assert (out / "iter2.safetensors").exists() and not (out / "resume.pt").exists()
    monkeypatch.setattr(rigsa, "evaluate", evaluate)   # the same run without a signal: nothing of the kind said
    shutil.rmtree(out)
    with one_thread():
        cli.main(argv)
    assert "the run completed" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def many_digits(tmp_path_factory):
    """3,000 test digits, more than an evaluation scores before its signal (3 s to write: once; the
    cases only read them)."""
    data = tmp_path_factory.mktemp("many_digits")
    mnist.write_synthetic_mnist(data / "mnist", n_train=8, n_test=3000, size=28)
    return data


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_evaluation_says_what_was_kept_in_one_line(tiny_dir, many_digits, tmp_path, sig):
    # rule 7: exit 130 / 143, one line with the command that runs it again, no traceback
    argv = ["--task", "mnist", "--model", str(tiny_dir), "--device", "cpu", "--offline", "--no-verify", "--data-dir",
            str(many_digits), "--batch-size", "1", "--output", str(tmp_path / "r.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "evals", "run.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (line := proc.stderr.readline()).startswith("model "):   # loaded: scoring starts
        assert line, "evals/run.py ended before scoring"
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == (f"{signal.Signals(sig).name}: stopped; nothing was written; run again with: "
                    f"{interrupts.python_cmd()} {REPO}/evals/run.py {' '.join(argv)}"), last
    assert not (tmp_path / "r.json").exists() and not [*tmp_path.glob("*.tmp"), *many_digits.glob("*.tmp")]


def test_ctrl_c_before_the_run_exists_says_run_again_not_resume(world, tmp_path, capsys, monkeypatch):
    # rule 7: an interrupt while the data or the model loads keeps nothing, and says so
    w, m, _ = world
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(M, "load", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = T("--model", m, "--data-dir", str(w / "data"), "--val-frac", "0.25", "--out", "r")
    code, _, err = run_main(rigsa.main, argv, capsys)
    assert code == 130 and err.strip().splitlines()[-1] == (
        f"SIGINT: stopped; nothing was kept; run again with: {interrupts.python_cmd()} {REPO}/rigsa.py {' '.join(argv)}"), err
    assert not (tmp_path / "r").exists()


def test_on_torchrun_rank_0_alone_says_a_stop_and_the_line_that_continues_is_torchruns(monkeypatch, capsys):
    # every rank gets Ctrl-C: each printed the notice and "stopped; ..." (twice on 2 processes), and the line that
    # continues named python alone, which resumes on one process, whose last bits differ from the run's
    py, here = interrupts.python_cmd(), os.path.relpath(os.path.join(REPO, "rigsa.py"))
    here = os.path.abspath(here) if here.startswith("..") else here
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert rundir.continue_command("r") == f"{py} {here} train --resume --out r"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rundir.continue_command("r") == \
        f"{py} -m torch.distributed.run --standalone --nproc-per-node=2 {here} train --resume --out r"
    monkeypatch.setenv("WORLD_SIZE", "8")   # two machines of 4: their rendezvous is theirs to give
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rundir.continue_command("r") == (f"on each machine, with the rendezvous flags it started with: {py} -m "
                                            f"torch.distributed.run --nnodes=2 --nproc-per-node=4 {here} train "
                                            f"--resume --out r")   # the command itself pasteable after the colon
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(rundir, "STOP", [])
    monkeypatch.setattr(interrupts, "SIGNALS", [])
    monkeypatch.setattr(sys, "argv", ["evals/run.py", "--task", "piqa"])
    # RANK alone: one process; WORLD_SIZE and RANK left in a shell, not torchrun's (TORCHELASTIC_RUN_ID): each speaks
    for size, rank, run_id, says in (("2", "1", "1", False), ("2", "0", "1", True), ("1", "1", "1", True),
                                     ("2", "1", "", True)):
        monkeypatch.setenv("WORLD_SIZE", size)
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        rundir.STOP.clear()
        rundir._on_signal(signal.SIGINT, None)
        interrupts.SIGNALS[:] = [signal.SIGINT]
        with pytest.raises(SystemExit) as e:
            interrupts.exit_interrupted("kept")
        with pytest.raises(SystemExit) as early:   # a signal while the imports run
            interrupts._early(signal.SIGTERM, None)
        err = capsys.readouterr().err
        assert e.value.code == 130 and early.value.code == 143 and \
            ("SIGINT: finishing this optimizer step" in err) == says and ("SIGINT: stopped; kept" in err) == says and \
            (f"SIGTERM: stopped; nothing was kept; run again with: {py} "
             + ("-m torch.distributed.run --standalone --nproc-per-node=2 " if size == "2" else "")
             + "evals/run.py --task piqa" in err) == says, (size, rank, err)


@pytest.mark.parametrize("tool", ["model", "evals", "rigsa"])
def test_an_interrupt_while_the_model_loads_blames_no_file(world, tmp_path, capsys, monkeypatch, tool):
    # rule 7: a safetensors read cut short by a signal is the interrupt (exit 130, one line), never "corrupt ...;
    # replace it", which would send the user to delete a good download
    w, m, _ = world

    def cut_short(path):   # what a read stopped by Ctrl-C looks like from here: the signal, then an error
        interrupts.SIGNALS.append(signal.SIGINT)
        raise OSError("Interrupted system call")
    monkeypatch.setattr(M, "load_file", cut_short)
    monkeypatch.chdir(tmp_path)
    argv = {"model": ["--model", m, "--prompt", "hi", "--device", "cpu"],
            "evals": E("--task", "mnist", "--model", m),
            "rigsa": T("--model", m, "--data-dir", "{w}/data", "--val-frac", "0.25", "--out", "r")}[tool]
    argv = [a.format(w=w) for a in argv]
    code, _, err = run_main(MAINS[tool], argv, capsys)
    assert code == 130 and "corrupt" not in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("SIGINT: stopped; nothing was"), err


def test_the_command_line_reference_is_each_commands_help():
    # docs/cli.md is written by docs/make_cli.py from every command's --help: a flag added, renamed or
    # re-described without `make docs` fails here
    r = subprocess.run([sys.executable, os.path.join(REPO, "docs", "make_cli.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    md = Path(REPO, "docs", "cli.md").stat().st_mtime_ns
    for flag in ("--chek", "--help"):   # a typo, or a look at its usage, never rewrites the file
        r = subprocess.run([sys.executable, os.path.join(REPO, "docs", "make_cli.py"), flag], capture_output=True, text=True)
        assert r.returncode == (2 if flag == "--chek" else 0) and "wrote" not in r.stdout, r.stdout + r.stderr
    assert Path(REPO, "docs", "cli.md").stat().st_mtime_ns == md


def sigterm_caught(pid):
    """Whether the process handles SIGTERM (its SigCgt mask in /proc): the scripts' guard is installed."""
    try:
        mask = next(x for x in open(f"/proc/{pid}/status") if x.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
@pytest.mark.parametrize("script,sig", [("rigsa.py", signal.SIGINT), ("evals/run.py", signal.SIGTERM),
                                        ("model.py", signal.SIGTERM), ("reproduce.py", signal.SIGINT)])
def test_a_signal_while_torch_loads_is_one_line_too(tmp_path, script, sig):
    # rule 7 before main() runs: the scripts' first lines catch Ctrl-C and SIGTERM while the imports take their second
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--help"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not sigterm_caught(proc.pid) and proc.poll() is None and time.time() - t0 < 30:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the imports finished before the signal arrived")
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert err.strip().splitlines() == [f"{signal.Signals(sig).name}: stopped; nothing was kept; run again with: "
                                        f"{sys.executable} {os.path.join(REPO, script)} --help"], err


def test_a_demo_stopped_by_a_signal_ends_as_a_training_does(tmp_path, monkeypatch, capsys):
    # the demo's training stopped (rundir.STOP): no "demo done", exit 128 + the signal
    monkeypatch.setattr(rigsa, "train", lambda cfg: rundir.STOP.append(signal.SIGTERM) or None)
    code, out, err = run_main(rigsa.main, ["demo", "--out", str(tmp_path / "d")], capsys)
    assert code == 143 and "demo done" not in out and not (tmp_path / "d" / "LOCK").exists()



def test_a_second_sigterm_during_training_ends_as_sigterm(tmp_path, monkeypatch, capsys):
    # training's own handler records both signals (rundir.STOP), and the second raises KeyboardInterrupt: the
    # line and the exit code name the signal, not Ctrl-C's
    def twice(cfg, given=None):
        rundir.STOP.extend([signal.SIGTERM, signal.SIGTERM])
        raise KeyboardInterrupt
    monkeypatch.setattr(rundir, "STOP", [])
    monkeypatch.setattr(rigsa, "train", twice)
    code, out, err = run_main(rigsa.main, ["train", "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert code == 143 and err.startswith("SIGTERM: stopped; nothing was kept"), err


DW0 = ("dW0 of L does not regenerate as when the adapter was made (this platform's generator, or rigsa's init code, "
       "init_delta or layer_seed, differs from what trained it)")


@pytest.mark.parametrize("why,check,said", [
    ("layer L has 5 dW values for a mask of 6 free entries", "same", "--adapter R/iter1: does not fit the base model B, "
     "the very one it was trained on (layer L has 5 dW values for a mask of 6 free entries); the file is damaged or "
     "edited: use the one its run wrote"),
    ("layer L has 5 dW values for a mask of 6 free entries", None, "--adapter R/iter1: does not fit the base model B "
     "(layer L has 5 dW values for a mask of 6 free entries); evaluate it on the model it was trained on"),
    (DW0, "same", f"--adapter R/iter1: {DW0}; use the code (and platform) that trained it"),
    (DW0, None, f"--adapter R/iter1: {DW0}; use the code (and platform) that trained it")])
def test_an_adapter_that_does_not_fit_its_own_base_is_called_what_it_is(monkeypatch, why, check, said):
    # on the base it was trained on, a file that does not fit is damaged; dW0 drawn otherwise is neither the file's
    # fault nor the base's (another platform's generator, or an edit of rigsa's init code)
    def load(model, spec, read=None):
        raise ValueError(why)
    monkeypatch.setattr(cli, "load_adapter", load)
    with pytest.raises(ValueError) as e:
        evals_run.install_adapter(None, "R/iter1", "B", check)
    assert str(e.value).startswith(said), e.value
