"""Tests for rigsa.py: Textual MNIST, the gated sparse adapter, IMP, the training loop, resume,
merge (paper §3.2, §4.2, §4.4). CPU only, no network, tiny checkpoints and synthetic digits
written by the tests. Correctness is invariants plus parity with a plain reference."""
import copy
import os
import sys
import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import model as M
import qlora
import rigsa
from lib import adapter_files as AF
from lib import memory
from lib import mnist
from lib import rundir
from lib import tiny
from lib import util
from conftest import hf_model, one_thread

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
from dense_layer import DenseGatedLinear  # noqa: E402  (the reference the compact layer replaced; benches use it too)


def tiny_cfg(tiny_dir, tmp, **kw):
    base = dict(model=str(tiny_dir), out=str(tmp / "run"), data_dir=str(tmp), device="cpu", dtype="float32", steps=4, warmup=2,
                batch_size=4, micro_batch=2, val_frac=0.1, limit=8, log_every=1, save_every=0, offline=True, verify=False)
    method = kw.get("method", "rigsa")
    base.update({"iters": 2} if rigsa.METHODS[method]["prunes"] else {})   # flags a method would ignore are refused
    base.update({} if rigsa.METHODS[method]["lora"] else {"lr": 2e-2})
    base.update(kw)
    return rigsa.Config(**base)


def test_a_resume_from_another_folder_names_its_relative_paths(tiny_dir, tmp_path, monkeypatch, capsys):
    # --model and --data-dir are saved as typed: a resume from another folder said "MNIST: missing data files"
    # or "no such model directory" of files that are there, relative to where the run started
    start = tmp_path / "start"
    mnist.write_synthetic_mnist(start / "data" / "mnist", n_train=40, n_test=8, size=8)
    shutil.copytree(tiny_dir, start / "tiny")
    monkeypatch.chdir(start)
    with one_thread():
        assert rigsa.train(tiny_cfg(Path("tiny"), Path("."), data_dir="data", iters=1, halt_after=2)) is None
        monkeypatch.chdir(tmp_path)
        with pytest.raises(FileNotFoundError):
            rigsa.train(rigsa.Config(out="start/run", resume=True))
    err = capsys.readouterr().err
    for f, v in (("data_dir", "data"), ("model", "tiny")):
        assert (f"note: --resume: config.json's {f} {v!r} is a path relative to the folder the run started in, and "
                f"{tmp_path} has none; pass --{f.replace('_', '-')} with its path from here") in err, err
    monkeypatch.chdir(start)   # from there: nothing to say
    with one_thread():
        rigsa.train(rigsa.Config(out="run", resume=True))
    assert "relative to the folder" not in capsys.readouterr().err


def test_rates_and_durations_ignore_the_wall_clock(tiny_dir, tmp_path, monkeypatch):
    # tokens/s came from time.time(): a clock stepped back (NTP) logged a negative rate, a frozen one divided by zero
    # (a traceback); durations now come from time.perf_counter, which neither moves
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    monkeypatch.setattr(time, "time", lambda: 1.8e9)
    with one_thread():
        log = rigsa.train(tiny_cfg(tiny_dir, tmp_path, iters=1))
    assert all(r["tok_s"] > 0 for r in log if "tok_s" in r) and any("tok_s" in r for r in log)


def test_an_iteration_no_longer_than_its_warmup_is_said(tiny_dir, tmp_path, capsys):
    # get_lr's warmup step w - 1 trains at the peak: an iteration of w steps reaches it and does not decay, a shorter
    # one never reaches it; each is said once, as it is, and a longer one says nothing
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    for steps, note in ((2, "= warmup 2: the lr reaches its peak only at the last step and does not decay"),
                        (1, "< warmup 2: the lr never reaches its peak and does not decay"), (3, None)):
        with one_thread():
            rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / f"r{steps}"), steps=steps, warmup=2, iters=1))
        err = capsys.readouterr().err
        assert [x for x in err.splitlines() if "per iteration" in x] == ([f"note: {steps} steps per iteration {note}"]
                                                                          if note else []), err


def test_steps_past_an_iteration_are_said(capsys):
    # --steps only shortens an iteration: one longer than its epochs' steps trains those, while config.json
    # (and reproduce.py's "Made by") record the number typed
    rundir.check_steps(rigsa.Config(steps=1000), None, steps=25, left=25)
    assert capsys.readouterr().err == ("note: --steps 1000: an iteration (its epochs of the training split) is 25 steps, "
                                       "which it trains; --steps only shortens one\n")
    for n in (25, 0):   # one that acts, or none given
        rundir.check_steps(rigsa.Config(steps=n), None, steps=25, left=25)
    assert capsys.readouterr().err == ""


def test_an_iterations_accuracy_is_logged_exactly(monkeypatch):
    # 2 of 5 right is 0.4, as evals/run.py writes it, not a float32 mean's 0.4000000059604645
    monkeypatch.setattr(rigsa, "mnist_accuracy", lambda model, tok, x, y, batch_size: (None, torch.tensor([1, 2, 0, 0, 0])))
    run = type("Run", (), dict(cfg=rigsa.Config(), model=nn.Linear(2, 2), layers={}, tok=None,
                               data={"test": (torch.zeros(5, 8, 8), torch.tensor([1, 2, 3, 4, 5]))}))
    res = rigsa.evaluate(run, 1)
    assert res["test_acc"] == 0.4 and res["test_images"] == 5, res


def test_get_lr_endpoints():
    lr = lambda s: rigsa.get_lr(s, 100, 10, 2e-3)
    assert lr(0) == pytest.approx(2e-4) and lr(9) == pytest.approx(2e-3) and lr(10) == pytest.approx(2e-3)
    assert lr(99) == pytest.approx(2e-3 / 90) and lr(100) == 0.0 and lr(1000) == 0.0
    assert all(lr(s) >= lr(s + 1) for s in range(10, 100))


def test_quantizer_idx_and_split(tmp_path):
    img = torch.tensor([[0, 25, 26, 255], [128, 127, 230, 231]], dtype=torch.uint8)
    assert rigsa.to_text(img) == "0019\n5489"  # floor(p * 10 / 256)
    d = mnist.write_synthetic_mnist(tmp_path / "m", n_train=100, n_test=10, size=8)
    x, y = mnist.load_mnist(d, "train", verify=False)
    xv, yv = mnist.load_mnist(d, "val", verify=False)
    xt, _ = mnist.load_mnist(d, "test", verify=False)
    assert x.shape == (99, 8, 8) and xv.shape == (1, 8, 8) and xt.shape == (10, 8, 8) and x.dtype == torch.uint8
    assert mnist.load_mnist(d, "val", verify=False)[0].equal(xv)  # deterministic by seed
    with pytest.raises(ValueError, match="not the original MNIST file"):   # stand-in data needs --no-verify
        mnist.load_mnist(d, "train")
    assert mnist.read_idx(d / "train-images-idx3-ubyte.gz", 2051).shape == (100, 8, 8)
    with pytest.raises(ValueError, match="magic"):
        mnist.read_idx(d / "train-labels-idx1-ubyte.gz", 2051)
    import gzip   # a header cut short, bytes beyond the shape, images of no pixels: one line each, even --no-verify
    raw = gzip.open(d / "train-images-idx3-ubyte.gz").read()
    for name, data, said in (("cut", raw[:8], "8 bytes end inside its header (3 dimensions): truncated"),
                             ("long", raw + b"xx", "do not match the header shape (100, 8, 8) (bytes beyond it)"),
                             ("short", raw[:-1], "do not match the header shape (100, 8, 8) (truncated)")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(said)):
            mnist.read_idx(tmp_path / name, 2051)
    z = mnist.write_synthetic_mnist(tmp_path / "z", n_train=10, n_test=4, size=8)
    again = mnist.write_synthetic_mnist(tmp_path / "again", n_train=10, n_test=4, size=8)   # the same digits, later:
    assert all((z / n).read_bytes() == (again / n).read_bytes() for n in mnist.MNIST_FILES)   # the same files
    mnist.write_idx(z / "t10k-images-idx3-ubyte.gz", np.zeros((4, 0, 0), np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: images of 0 x 0 pixels"):
        mnist.load_mnist(z, "test", verify=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*data|put them"):
        mnist.load_mnist(tmp_path / "empty", "train", download=False)


def test_idx_files_and_splits_are_checked_and_reproducible(tmp_path):
    d = mnist.write_synthetic_mnist(tmp_path / "m", n_train=10, n_test=4, size=8)
    for n in mnist.MNIST_FILES:   # no time in the gzip header: the same digits, the same bytes
        assert (d / n).read_bytes()[4:8] == b"\0\0\0\0"
    train = mnist.read_idx(d / "train-images-idx3-ubyte.gz", 2051)
    with pytest.raises(ValueError, match=r"bad magic number \(expected 2049, an IDX label file\)"):
        mnist.read_idx(d / "train-images-idx3-ubyte.gz", 2049)
    e = mnist.write_synthetic_mnist(tmp_path / "e", n_train=4, n_test=4, size=8)   # test digits are other digits
    assert not np.array_equal(mnist.read_idx(e / "t10k-images-idx3-ubyte.gz", 2051),
                              mnist.read_idx(e / "train-images-idx3-ubyte.gz", 2051))
    x, _ = mnist.load_mnist(d, "train", val_frac=0.5, verify=False)   # in the files' order
    rows = [next(i for i in range(10) if np.array_equal(train[i], r.numpy())) for r in x]
    assert rows == sorted(rows) and len(rows) == 5
    mnist.write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((4, 9, 9), np.uint8))
    with pytest.raises(ValueError, match=r"the training digits are 8 x 8 pixels and the test digits 9 x 9"):
        mnist.load_mnist_splits(d, ("train", "test"), verify=False)
    mnist.write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: \(3, 8, 8\) images do not match \(4,\) labels"):
        mnist.load_mnist(d, "test", verify=False)
    mnist.write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((4, 8, 8), np.uint8))
    mnist.write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([0, 9, 10, 1], np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: label 10 is not a digit"):
        mnist.load_mnist(d, "test", verify=False)


def test_a_test_split_alone_needs_only_the_test_files(tmp_path):
    d = mnist.write_synthetic_mnist(tmp_path / "data" / "mnist", n_train=10, n_test=4, size=8)
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (d / n).rename(tmp_path / n)
    assert mnist.load_mnist(d, "test", verify=False)[0].shape == (4, 8, 8)
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):   # and a run without the test split
        (tmp_path / n).rename(d / n)                                          # hashes the files it has
    for n in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / n).unlink()
    data, hashes = mnist.run_splits(rigsa.Config(data_dir=str(tmp_path / "data"), eval_test=False, val_frac=0.5,
                                                 verify=False, offline=True))
    assert sorted(data) == ["train", "val"] and sorted(hashes) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_digit_after_prefix_is_one_token(tiny_dir):
    _, tok = M.load(tiny_dir)
    ids = rigsa.digit_ids(tok)
    assert len(set(ids)) == 10
    img = torch.zeros(8, 8, dtype=torch.uint8)
    p = tok.encode(rigsa.prompt(tok, img))
    for d in range(10):
        assert tok.encode(rigsa.prompt(tok, img) + str(d)) == p + [ids[d]]
    text = rigsa.prompt(tok, img, shots=[(img, 3)])
    assert text.count("<|im_start|>user") == 2 and "The digit is 3<|im_end|>" in text and text.endswith("The digit is ")


def test_gate_at_init(tiny_dir):
    m, tok = M.load(tiny_dir)
    x = torch.tensor([tok.encode("The digit is 7")])
    base = m(x)
    layers = rigsa.install_adapters(m, rigsa.Config())
    assert len(layers) == 14 and "lm_head" not in layers and isinstance(m.lm_head, nn.Linear)
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n_train == sum(L.weight.numel() + 1 for L in layers.values())  # dW full-rank + one alpha each
    for L in layers.values():   # nn.Linear's U(+-1/sqrt(fan_in)): k_proj, gate/up/down are not square
        bound = 1 / math.sqrt(L.in_features)
        assert L.delta.abs().max() <= bound and L.delta.abs().max() > 0.9 * bound and L.alpha.item() == pytest.approx(1e-6)
    L = layers["model.layers.0.self_attn.q_proj"]
    assert L.mask is None and L.delta.shape == (L.weight.numel(),)    # every entry free: no mask stored
    out = m(x)
    assert not out.equal(base) and (out - base).abs().max() < 1e-3   # only the alpha term differs
    for L in layers.values():
        L.alpha.data.zero_()
    assert m(x).equal(base)                                           # alpha = 0: exactly the base model
    h = torch.randn(3, L.in_features)
    L.alpha.data.fill_(0.5)
    torch.testing.assert_close(L(h), h @ L.weight.T + 0.5 * h @ L.dense().T)


def hand_layers(shapes=((2, 4), (2, 4))):
    """Layers whose dW is set by hand relative to their regenerated dW0."""
    layers = {}
    for i, (o, n) in enumerate(shapes):
        layers[f"l{i}"] = rigsa.GatedSparseLinear(nn.Linear(n, o, bias=False), init_seed=i)
    return layers


def set_dense(L, d, free=None):
    """dW = d (out, in) by hand; the entries where `free` (bool (out, in)) is False pruned."""
    index = torch.arange(L.numel()) if free is None else free.reshape(-1).nonzero().view(-1)
    L.set_free(index, d.reshape(-1)[index])


def mask_of(L):
    """A layer's mask as a bool (out, in) tensor."""
    m = torch.zeros(L.numel(), dtype=torch.bool)
    m[slice(None) if L.mask is None else L.free_index()] = True
    return m.view(L.out_features, L.in_features)


def test_prune_sign_flips_counts_rewind_and_scope():
    for scope in ("global", "layer"):
        layers = hand_layers()
        d0 = {n: L.init_delta() for n, L in layers.items()}
        # layer 0: large final magnitudes, two entries flipped; layer 1: small magnitudes, one flipped
        s0 = torch.tensor([[10., 9, 8, 7], [6, 5, -4, -3]])
        s1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, -0.8]])
        for (n, L), s in zip(layers.items(), (s0, s1)):
            set_dense(L, d0[n].sign() * s)    # |dW| = s, sign flipped where s < 0
        st = rigsa.prune(layers, keep=0.5, scope=scope)
        m0, m1 = mask_of(layers["l0"]), mask_of(layers["l1"])
        assert st["eligible"] == 13 and st["sign_flip"] == pytest.approx(3 / 16)
        # not measured is None, not 0% (lt-sft checks no sign) nor 100% (no entry free)
        assert rigsa.flips(st, sign=False) is None and rigsa.flips({"free": 0, "eligible": 0}) is None
        if scope == "global":  # round(0.5 * 13) = 6 largest of all: 10, 9, 8, 7, 6, 5
            assert m0.tolist() == [[True] * 4, [True, True, False, False]] and not m1.any()
        else:                  # per layer: round(0.5 * 6) = 3 and round(0.5 * 7) = 4
            assert m0.tolist() == [[True, True, True, False], [False] * 4]
            assert m1.tolist() == [[False, False, False, True], [True, True, True, False]]
        assert st["kept"] == int(m0.sum() + m1.sum())
        for n, L in layers.items():  # kept entries rewound to dW0 exactly, the rest exactly zero
            assert L.dense().equal(d0[n] * mask_of(L)) and L.delta.numel() == int(mask_of(L).sum())


def test_prune_ties_exact_count_and_only_free_entries():
    layers = hand_layers(((3, 5), (2, 5)))
    L, L1 = layers["l0"], layers["l1"]
    free = torch.ones(3, 5, dtype=torch.bool)
    free[0, :] = False                      # already pruned entries are never revived
    set_dense(L, L.init_delta().sign() * 1.0, free)   # every magnitude tied
    set_dense(L1, L1.init_delta().sign() * 1.0)
    rigsa.prune(layers, keep=0.4, scope="global")
    # round(0.4 * 20) = 8 kept, ties broken by layer, then row-major index
    m, m1 = mask_of(L), mask_of(L1)
    assert int(m.sum()) == 8 and not m[0].any() and not m1.any()
    assert m.flatten().nonzero().flatten().tolist() == list(range(5, 13))


def test_accumulation_gives_the_gradient_of_the_batch_mean(tiny_dir):
    m, tok = M.load(tiny_dir)
    layers = rigsa.install_adapters(m, rigsa.Config())
    rows = [(tok.encode("The digit is " + "7" * n), [n + 2, n + 3]) for n in (1, 4, 2)]
    rows[1] = (rows[1][0], [6])              # a row with another number of supervised tokens
    grads = []
    for mb in (1, 3):
        m.zero_grad()
        loss = rigsa.accumulate(m, rows, mb, tok.pad_id, "cpu")
        grads.append(torch.cat([L.delta.grad.flatten() for L in layers.values()]))
    m.zero_grad()
    ce = torch.cat([torch.nn.functional.cross_entropy(m(torch.tensor([r]))[0, torch.tensor(p) - 1],
                                                      torch.tensor(r)[p], reduction="none") for r, p in rows])
    ce.mean().backward()                     # the mean over the 5 supervised tokens of the batch
    ref = torch.cat([L.delta.grad.flatten() for L in layers.values()])
    assert loss == pytest.approx(ce.mean().item(), rel=1e-5)
    torch.testing.assert_close(grads[0], ref, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(grads[1], ref, rtol=1e-4, atol=1e-9)


def test_kth_largest_matches_sort():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.rand(1000, generator=g), torch.rand(10, generator=g).round(), torch.zeros(0), torch.rand(77, generator=g)]
    allv = torch.cat(chunks).sort(descending=True).values
    for k in (1, 5, 500, 1087):
        assert util.kth_largest(lambda: iter(chunks), k) == allv[k - 1].item()


def test_pruned_entries_stay_zero_and_weight_decay_is_exact():
    torch.manual_seed(0)
    layers = hand_layers(((4, 6), (3, 4)))
    net = nn.Sequential(layers["l0"], nn.Tanh(), layers["l1"])
    for L in layers.values():
        set_dense(L, L.init_delta() * torch.randn(L.out_features, L.in_features).sign())
    rigsa.prune(layers, keep=0.5)
    before = {n: L.delta.detach().clone() for n, L in layers.items()}
    gate = {n: L.alpha.item() for n, L in layers.items()}
    cfg = rigsa.Config(weight_decay=1.0)
    opt = rigsa.make_optimizer(net, cfg)
    lr = 2e-3
    for grp in opt.param_groups:
        grp["lr"] = lr
    # one step with zero gradient: every free dW shrinks by exactly (1 - lr * wd), the gate not at all
    for L in layers.values():
        L.delta.grad, L.alpha.grad = torch.zeros_like(L.delta), torch.zeros_like(L.alpha)
    opt.step()
    for n, L in layers.items():
        assert L.delta.data.equal(before[n] * (1 - lr * 1.0)) and L.alpha.item() == gate[n]
    # real gradients with wd = 1.0: only free entries have a gradient and an AdamW state; pruned
    # entries stay exactly zero in the layer's output
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 6)).pow(2).sum().backward()
        for L in layers.values():
            assert L.delta.grad.shape == L.delta.shape == (int(mask_of(L).sum()),)
        opt.step()
    for L in layers.values():
        assert opt.state[L.delta]["exp_avg"].shape == L.delta.shape
        m = mask_of(L)
        assert (L.dense()[~m] == 0).all() and (L.dense()[m] != 0).all()


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """A tiny two-iteration RIGSA run, uninterrupted and halted + resumed."""
    tmp = tmp_path_factory.mktemp("rigsa_run")
    mnist.write_synthetic_mnist(tmp / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        full = rigsa.train(tiny_cfg(tiny_dir, tmp))
        assert rigsa.train(tiny_cfg(tiny_dir, tmp, out=str(tmp / "halted"), halt_after=3)) is None
        assert (tmp / "halted" / "resume.pt").exists()
        resumed = rigsa.train(tiny_cfg(tiny_dir, tmp, out=str(tmp / "halted"), resume=True))
    return tmp, full, resumed


def test_resume_gives_the_same_result(tiny_run):
    tmp, full, resumed = tiny_run
    assert [r.get("loss") for r in full] == [r.get("loss") for r in resumed]
    for k in (1, 2):
        a, meta_a, _ = rigsa.read_adapter(tmp / "run" / f"iter{k}")
        b, meta_b, _ = rigsa.read_adapter(tmp / "halted" / f"iter{k}")
        assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)
        assert meta_a["val_acc"] == meta_b["val_acc"]
    lines = (tmp / "halted" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(full) and not (tmp / "halted" / "resume.pt").exists()
    saved = json.loads((tmp / "run" / "config.json").read_text())
    assert saved["config"]["lr"] == 2e-2 and saved["torch"] == torch.__version__ and "git_commit" in saved
    prune = [r for r in full if r.get("event") == "prune"][0]
    assert 0 < prune["density"] < 1 and 0 <= prune["sign_flip"] < 1 and len(prune["layer_density"]) == 14


def test_a_halt_at_an_iterations_last_step_stops_there(tiny_dir, tiny_run, tmp_path, capsys):
    # --halt-after 4 with 4 steps an iteration: 4 steps, iteration 1 evaluated, saved and pruned, then
    # the halt (not one step of iteration 2); the resume ends as the uninterrupted run
    tmp, full, _ = tiny_run
    with one_thread():
        assert rigsa.train(tiny_cfg(tiny_dir, tmp, out=str(tmp_path / "edge"), halt_after=4)) is None
        assert "halted after iteration 1 (4 steps); continue with: " in capsys.readouterr().out
        assert torch.load(tmp_path / "edge" / "resume.pt", weights_only=True)["iteration"] == 2
        assert (tmp_path / "edge" / "iter1.safetensors").exists() and not (tmp_path / "edge" / "iter2.safetensors").exists()
        resumed = rigsa.train(tiny_cfg(tiny_dir, tmp, out=str(tmp_path / "edge"), resume=True))
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in full]
    a, b = (rigsa.read_adapter(d / "iter2")[0] for d in (tmp / "run", tmp_path / "edge"))
    assert all(a[n].equal(b[n]) for n in a)


def test_a_halt_or_save_that_would_never_act_is_refused():
    # --halt-after at or past the steps left never halts (the run ends first), --save-every of an iteration or
    # more never saves between the saves at each iteration's end: a flag typed for nothing is said, not ignored
    for halt in (5, 6):
        with pytest.raises(ValueError) as e:
            rundir.check_steps(rigsa.Config(halt_after=halt), None, steps=10, left=5)
        assert str(e.value) == f"--halt-after {halt}: the run has 5 steps left, so it would not act; drop it"
    for every in (10, 11):
        with pytest.raises(ValueError) as e:
            rundir.check_steps(rigsa.Config(save_every=every), None, steps=10, left=5)
        assert str(e.value) == (f"--save-every {every}: an iteration is 10 steps, and its end always saves, so it would "
                                f"not act; drop it")
    rundir.check_steps(rigsa.Config(halt_after=4, save_every=9), None, steps=10, left=5)


def test_a_batch_the_processes_cannot_share_is_refused(monkeypatch):
    # torchrun: each process takes its share of a batch's sequences; a batch smaller than the processes leaves some none
    monkeypatch.setattr(util, "world", lambda: (0, 2))
    with pytest.raises(ValueError) as e:
        rundir.check_steps(rigsa.Config(batch_size=1, micro_batch=1), None, steps=10, left=10)
    assert str(e.value) == "--batch-size 1: fewer sequences than the 2 processes; use at least one per process"
    rundir.check_steps(rigsa.Config(batch_size=2, micro_batch=1), None, steps=10, left=10)


def test_a_run_resumes_on_the_thread_count_it_started_with(tmp_path, capsys, monkeypatch):
    # on the CPU a sum's last bits depend on how many threads split it: this model's adapters after
    # 4 steps at 1 thread and at 2 differ; so config.json saves the count, and --resume takes it again
    d = tiny.write_tiny_checkpoint(tmp_path / "wide", shape="wide", seed=0)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    cfg = lambda name, **kw: tiny_cfg(d, tmp_path, out=str(tmp_path / name), iters=1, eval_test=False, **kw)
    adapter = lambda name: rigsa.read_adapter(tmp_path / name / "iter1")[0]
    seen, step = [], rigsa.train_step
    monkeypatch.setattr(rigsa, "train_step", lambda *a: seen.append(torch.get_num_threads()) or step(*a))
    with one_thread():
        rigsa.train(cfg("full"))
        rigsa.train(cfg("two", threads=2))
        assert json.loads((tmp_path / "full" / "config.json").read_text())["config"]["threads"] == 1   # resolved
        a, b = adapter("full"), adapter("two")
        assert any(not a[n].equal(b[n]) for n in a), "the premise: the thread count shows in the adapters"
        assert rigsa.train(cfg("halted", halt_after=2)) is None
        for name in ("other", "older", "twice"):
            shutil.copytree(tmp_path / "halted", tmp_path / name)
        for name, typed in (("halted", {}), ("other", {"threads": 2})):
            torch.set_num_threads(2)   # a process with another count resumes it
            capsys.readouterr()
            seen.clear()
            rigsa.train(rigsa.Config(out=str(tmp_path / name), resume=True, **typed))
            err = capsys.readouterr().err
            assert seen == [2 if typed else 1] * 2 and torch.get_num_threads() == 2, err   # the caller's, after
            c = adapter(name)
            if not typed:   # the saved count: bit for bit the uninterrupted run, and said
                assert ("note: --resume: 1 CPU thread, as config.json says (this process had 2); so that it ends bit for "
                        "bit as an uninterrupted run") in err, err
                assert all(a[n].equal(c[n]) for n in a)
            else:           # another count, typed: taken, and said to cost the bits
                assert ("note: --resume: the run started on 1 CPU thread; this resume runs on 2 CPU threads; so its "
                        "steps from here may differ") in err, err
                saved = json.loads((tmp_path / name / "config.json").read_text())
                assert saved["config"]["threads"] == 2 and saved["threads"] == 1 and saved["resumed_on"][-1]["threads"] == 2
        rigsa.train(rigsa.Config(out=str(tmp_path / "halted"), resume=True))   # complete: only that is said
        out, err = capsys.readouterr()
        assert "the run is complete" in out and "thread" not in err, err
        torch.set_num_threads(1)   # --threads 2 for a step, then a plain resume: 2 as config.json says, never "bit for bit"
        rigsa.train(rigsa.Config(out=str(tmp_path / "twice"), resume=True, threads=2, halt_after=1))
        capsys.readouterr()
        rigsa.train(rigsa.Config(out=str(tmp_path / "twice"), resume=True))
        err = capsys.readouterr().err
        assert ("note: --resume: the run started on 1 CPU thread; this resume runs on 2 CPU threads; 2 CPU threads, "
                "as config.json says (this process had 1); so its steps") in err and "bit for bit" not in err, err
        c = json.loads((tmp_path / "older" / "config.json").read_text())   # as an older version wrote it
        del c["config"]["threads"], c["threads"]
        (tmp_path / "older" / "config.json").write_text(json.dumps(c))
        torch.set_num_threads(2)
        rigsa.train(rigsa.Config(out=str(tmp_path / "older"), resume=True))
        assert ("note: --resume: config.json does not record the CPU threads the run started on (an older version's): "
                "2 from here on; if it started on another count, its steps") in capsys.readouterr().err
        assert json.loads((tmp_path / "older" / "config.json").read_text())["config"]["threads"] == 2
    with monkeypatch.context() as m:   # a host with CUDA: a CPU run keeps its count; on CUDA the host's is taken
        m.setattr(torch.cuda, "is_available", lambda: True)
        r = lambda **kw: rundir.resumed(rigsa.Config(out=str(tmp_path / "full"), resume=True, **kw), None)[0].threads
        assert r() == 1 and r(device="cuda") == 0 and r(device="cuda", threads=3) == 3


def test_a_resume_on_another_machine_or_torch_is_said_and_recorded(tiny_dir, tmp_path, capsys, monkeypatch):
    # their kernels change the last bits: a resume there is no longer bit for bit, and config.json keeps both
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    here = util.machine("cpu")
    assert here.startswith("cpu: ") and len(here) > 5 and (util.native_bf16("cpu") or "") in here
    cap = torch.backends.cpu.get_cpu_capability()   # torch's vector kernels: AVX2, AVX512 round a softmax apart
    assert f"({cap}" in here
    with monkeypatch.context() as m:   # so one model name ("Intel(R) Xeon(R) Processor") on two kernel sets is two machines
        other = "AVX512" if cap == "AVX2" else "AVX2"
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
        assert util.machine("cpu") == here.replace(f"({cap}", f"({other}", 1) != here
    with monkeypatch.context() as m:   # MKL told to take other kernels (AVX2's moved an adapter by 1e-4 here), unseen
        m.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
        m.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")   # cuBLAS's: not a CPU run's
        assert util.machine("cpu") == here[:-1] + "; MKL_ENABLE_INSTRUCTIONS=AVX2)"
        was = torch.backends.mkldnn.matmul.fp32_precision
        try:   # float32 matmuls in bfloat16 (torch's per-backend API): named, and no RuntimeError from the legacy getter
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
            assert util.machine("cpu") == here[:-1] + "; MKL_ENABLE_INSTRUCTIONS=AVX2; float32 matmuls in bf16)"
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = was
    assert util.machine("cpu") == here
    with one_thread():
        assert rigsa.train(tiny_cfg(tiny_dir, tmp_path, steps=6, iters=1, halt_after=2)) is None
        assert rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True, halt_after=2)) is None
        assert "the run started on" not in capsys.readouterr().err   # the same machine: nothing to say
        version, code = torch.__version__, util.code_version()
        for name in ("restart", "edited", "pulled"):
            shutil.copytree(tmp_path / "run", tmp_path / name)
        (tmp_path / "restart" / "resume.pt").unlink()   # killed before its first resume checkpoint
        c = json.loads((tmp_path / "edited" / "config.json").read_text())
        (tmp_path / "edited" / "config.json").write_text(json.dumps({**c, "resumed_on": 5, "processes": "1"}))
        with monkeypatch.context() as m:
            m.setattr(util, "machine", lambda device: "cpu: Another CPU (AMX)")
            m.setattr(torch, "__version__", "9.9.9")
            assert rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True, halt_after=1)) is None
            assert (f"note: --resume: the run started on torch {version}, {here}; this resume runs on torch 9.9.9, cpu: "
                    f"Another CPU (AMX); so its steps from here may differ in their last bits from an uninterrupted "
                    f"run's") in capsys.readouterr().err
            saved = json.loads((tmp_path / "run" / "config.json").read_text())
            assert saved["machine"] == here and saved["torch"] == version   # where it started, not the resuming one's
            assert saved["resumed_on"] == [{"torch": "9.9.9", "machine": "cpu: Another CPU (AMX)", "processes": 1,
                                            "code": code, "threads": 1}]
            assert saved["code"] == code and saved["git_commit"] == util.git_commit()
            rigsa.train(rigsa.Config(out=str(tmp_path / "restart"), resume=True))   # from step 1: a new start there
            assert "the run started on" not in capsys.readouterr().err
            saved = json.loads((tmp_path / "restart" / "config.json").read_text())
            assert saved["machine"] == "cpu: Another CPU (AMX)" and "resumed_on" not in saved
            rigsa.train(rigsa.Config(out=str(tmp_path / "edited"), resume=True))   # values of the wrong kind: unrecorded
            err = capsys.readouterr().err
            assert "this resume runs on torch 9.9.9, cpu: Another CPU (AMX);" in err and "process" not in err, err
            assert json.loads((tmp_path / "edited" / "config.json").read_text())["resumed_on"][0]["torch"] == "9.9.9"
        with monkeypatch.context() as m:   # a git pull between the halt and the resume: said, recorded, no promise
            m.setattr(util, "code_version", lambda: "0123456789ab")
            m.setattr(util, "git_commit", lambda: "a later commit")
            rigsa.train(rigsa.Config(out=str(tmp_path / "pulled"), resume=True, halt_after=1))
            assert (f"note: --resume: the run started on rigsa's code {code}; this resume runs on rigsa's code "
                    f"0123456789ab; so its steps from here may differ from an uninterrupted run's (rigsa's code changed"
                    ) in capsys.readouterr().err
            saved = json.loads((tmp_path / "pulled" / "config.json").read_text())
            assert saved["code"] == code and saved["git_commit"] != "a later commit"   # where it started
            assert saved["resumed_on"] == [{**saved["resumed_on"][0], "code": "0123456789ab"}]
        torch.set_num_threads(2)   # back on the first machine, at another count: no promise now
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True))
    err = capsys.readouterr().err
    assert ("note: --resume: 1 CPU thread, as config.json says (this process had 2); an earlier resume ran elsewhere "
            "(config.json's resumed_on), so it cannot end bit for bit") in err, err


def test_an_older_runs_config_without_a_machine_resumes_without_a_false_note(tiny_dir, tmp_path, capsys):
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        assert rigsa.train(tiny_cfg(tiny_dir, tmp_path, steps=6, iters=1, halt_after=2)) is None
        c = json.loads((tmp_path / "run" / "config.json").read_text())
        del c["machine"]   # as an older version wrote it
        (tmp_path / "run" / "config.json").write_text(json.dumps(c))
        for _ in range(2):   # the first resume writes machine null; the second reads it
            assert rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True, halt_after=1)) is None
    assert "the run started on" not in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["machine"] is None and "resumed_on" not in saved


def test_adapter_roundtrip_merge_and_random_mask(tiny_run, tiny_dir, tmp_path, monkeypatch):
    tmp, full, _ = tiny_run
    m, tok = M.load(tiny_dir)
    cfg, _ = cli.load_adapter(m, tmp / "run" / "iter2")
    assert cfg.method == "rigsa"
    t, meta, _ = rigsa.read_adapter(tmp / "run" / "iter2")   # the tensors' checksum, written with them
    assert meta["tensors_sha256"] == AF.checksum(t) and len(meta["tensors_sha256"]) == 64
    save_file(t, tmp_path / "older.safetensors", metadata={k: v for k, v in safe_open(
        str(tmp / "run" / "iter2.safetensors"), "pt").metadata().items() if k != "tensors_sha256"})
    assert rigsa.read_adapter(tmp_path / "older")[0].keys() == t.keys()   # a file from before checksums: read as is
    x = torch.tensor([tok.encode("The digit is 7")])
    y = m(x)
    it2 = [r for r in full if r.get("event") == "iteration"][-1]
    assert it2["test_images"] == 8   # what test_acc is over (reproduce's interval): the 8 synthetic test digits
    assert rigsa.density_report(rigsa.adapters(m))[0] == pytest.approx(it2["density"])
    out = cli.merge(tmp / "run" / "iter2", tmp_path / "merged", dtype="float32")
    merged, _ = M.load(out)
    torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_model(out)(x).logits, y, rtol=1e-4, atol=1e-4)  # transformers reads it too
    # a failure while writing (a full disk) leaves neither a half checkpoint at --out nor a temporary folder
    real = M.save_checkpoint

    def full_disk(folder, *a, **kw):
        real(folder, *a, **kw)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(M, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.merge(tmp / "run" / "iter2", tmp_path / "again" / "merged", dtype="float32")
    monkeypatch.undo()
    assert list((tmp_path / "again").iterdir()) == []
    # random-mask: the per-layer counts of the RIGSA mask, at other positions; or a uniform density
    counts = {n: free for n, (free, _) in AF.mask_counts(tmp / "run" / "iter2").items()}
    assert AF.mask_counts(tmp / "run" / "iter2", verify=False) == AF.mask_counts(tmp / "run" / "iter2")   # the header's shapes
    m2, _ = M.load(tiny_dir)
    layers = rigsa.install_adapters(m2, rigsa.Config(method="random-mask", density=0.25))
    rigsa.random_masks(layers, counts, seed=5)
    assert {n: L.delta.numel() for n, L in layers.items()} == counts
    assert any(not mask_of(L).equal(mask_of(rigsa.adapters(m)[n])) for n, L in layers.items())
    d0 = {n: L.init_delta() for n, L in layers.items()}
    assert all(L.dense().equal(d0[n] * mask_of(L)) for n, L in layers.items())   # dW0 where free, 0 elsewhere
    layers = rigsa.install_adapters(M.load(tiny_dir)[0], rigsa.Config(method="random-mask", density=0.25))
    rigsa.random_masks(layers, {n: round(0.25 * L.numel()) for n, L in layers.items()}, seed=5)
    assert all(L.delta.numel() == round(0.25 * L.numel()) for L in layers.values())
    # and through the training loop: --method random-mask --mask-like RUN/iter2
    cfg = tiny_cfg(tiny_dir, tmp, out=str(tmp_path / "rm"), method="random-mask", mask_like=str(tmp / "run" / "iter2"), steps=2)
    with one_thread():
        log = rigsa.train(cfg)
    assert {n: c for n, (c, _) in AF.mask_counts(tmp_path / "rm" / "iter1").items()} == counts \
        and len([r for r in log if r.get("event")]) == 1


def test_learns_tiny_textual_digits(tiny_dir, tmp_path):
    # the whole method (gate, IMP-ready adapters, AdamW loop) on a task small enough for CPU: 32
    # synthetic 8x8 digits, learnt by a random tiny model through --method rigsa; and in bfloat16
    # (--dtype auto on such CPUs) as in float32: the same accuracy, the loss curves close
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=32, n_test=8, size=8, noise=0.05)
    kw = dict(iters=1, steps=160, epochs=100.0, lr=3e-2, weight_decay=0.0, warmup=5, batch_size=16, micro_batch=16,
              val_frac=0.0, log_every=20)
    logs, accs = {}, {}
    x, y = mnist.load_mnist(tmp_path / "mnist", "train", val_frac=0.0, verify=False)
    with one_thread():
        for dtype in ("float32", "bfloat16"):
            logs[dtype] = rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / dtype), **kw, dtype=dtype))
            m, tok = M.load(tiny_dir, dtype=getattr(torch, dtype))
            cli.load_adapter(m, tmp_path / dtype / "iter1")
            accs[dtype] = rigsa.mnist_accuracy(m, tok, x, y, progress=False)[0]
    assert accs["float32"] >= 0.9 and accs["bfloat16"] >= 0.9 and abs(accs["bfloat16"] - accs["float32"]) <= 1 / 16, accs
    l32, l16 = ([r["loss"] for r in logs[d] if "loss" in r] for d in ("float32", "bfloat16"))
    assert len(l32) == len(l16) and max(abs(a - b) for a, b in zip(l32, l16)) < 0.1 + 0.1 * l32[0], (l32, l16)


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit):
        rigsa.main(["train", "--help"])
    h = capsys.readouterr().out
    for flag in ("--keep", "--prune-scope", "--alpha-init", "--mask-like", "--micro-batch", "--lora-lr", "--resume"):
        assert flag in h
    assert "[default: 0.8; a number > 0 <= 1, or a comma-separated list of them]" in " ".join(h.split()) and "§4.4" in h
    with pytest.raises(SystemExit) as e:                     # the whole matrix: test_cli.py
        rigsa.main(["train", "--method", "foo"])
    assert e.value.code == 2 and "error: argument --method: invalid choice: 'foo'" in capsys.readouterr().err


def test_qlora_wiring(tiny_dir, tmp_path):
    # --method qlora through rigsa's loop, saved and re-installed by load_adapter (§5.3, Table 4)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, method="qlora", rank=2, steps=2, lora_lr=1e-2, warmup=1)
    with one_thread():
        log = rigsa.train(cfg)
    assert [r["iter"] for r in log if r.get("event") == "iteration"] == [1]   # no pruning
    assert (tmp_path / "run" / "iter1-peft" / "adapter_model.safetensors").exists()
    m, tok = M.load(tiny_dir)
    assert cli.load_adapter(m, tmp_path / "run" / "iter1")[0].method == "qlora"
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, qlora.LoRALinear) and q.lora_B.weight.abs().sum() > 0       # trained B was loaded


def test_lora_merge(tiny_dir, tmp_path, capsys):
    # --method lora (the unquantized baseline) merges like RIGSA: float32 merge, official layout
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, method="lora", rank=2, steps=2, lora_lr=5e-2, warmup=1)
    with one_thread():
        rigsa.train(cfg)
    m, tok = M.load(tiny_dir)
    cli.load_adapter(m, tmp_path / "run" / "iter1")
    x = torch.tensor([tok.encode("The digit is 7")])
    y = m(x)
    assert (y - M.load(tiny_dir)[0](x)).abs().max() > 1e-4          # the adapter does something
    out = cli.merge(tmp_path / "run" / "iter1", tmp_path / "merged", dtype="float32")
    assert re.search(r"\(float32\); the cast lost 0\.\d\d% of sum\|scale\*B@A\|\n", capsys.readouterr().out)   # LoRA's delta
    torch.testing.assert_close(M.load(out)[0](x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_model(out)(x).logits, y, rtol=1e-4, atol=1e-4)
    q = tmp_path / "q"
    mnist.write_synthetic_mnist(q / "mnist", n_train=12, n_test=4, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, q, method="qlora", rank=2, steps=1, warmup=1))
    with pytest.raises(ValueError, match="4-bit base"):
        cli.merge(q / "run" / "iter1", tmp_path / "merged-q")


def test_merge_adapters_folds_lora_in_float32_and_refuses_4bit(tiny_dir, monkeypatch, capsys):
    # one merge for every adapter kind: W0 + delta in float32, cast to the weight's dtype; a bar, layer by layer
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    m, tok = M.load(tiny_dir, dtype=torch.bfloat16)
    torch.manual_seed(0)
    for p in qlora.apply_lora(m, rank=2, alpha=32):
        p.data.normal_(0, 0.02)                     # B != 0, so that the merge changes W
    x = torch.tensor([tok.encode("The digit is 7")])
    want = m(x).float()
    l0 = m.model.layers[0].self_attn.q_proj
    W = (l0.weight.float() + (l0.lora_B.weight @ l0.lora_A.weight) * 16.0).bfloat16()
    lost, total = AF.merge_adapters(m)
    assert "merge: 100%" in (err := capsys.readouterr().err) and "layer/s" in err, err
    assert not rigsa.adapters(m) and all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith("_proj"))
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, W) and 0 < lost < total
    assert (m(x).float() - want).abs().max() < 0.05 * want.abs().max()   # bf16 rounding of W only
    q = qlora.quantize_model(M.load(tiny_dir)[0])
    qlora.apply_lora(q, 2, 32)
    with pytest.raises(ValueError, match="4-bit"):
        AF.merge_adapters(q)


# ---- the compact layer against today's dense one (nothing changes numerically) ----

@torch.no_grad()
def dense_prune(layers, keep, scope, sign):
    """The IMP rule on dense tensors, as rigsa.prune was written before it became compact."""
    elig = {n: L.mask & (torch.sign(L.delta) == torch.sign(L.init_delta())) if sign else L.mask.clone()
            for n, L in layers.items()}
    for group in ([list(layers)] if scope == "global" else [[n] for n in layers]):
        k = round(keep * sum(int(elig[n].sum()) for n in group))
        thr = util.kth_largest(lambda: (layers[n].delta.abs()[elig[n]] for n in group), k) if k else math.inf
        quota = k - sum(int(((layers[n].delta.abs() > thr) & elig[n]).sum()) for n in group)
        for n in group:
            L = layers[n]
            new = elig[n] & (L.delta.abs() > thr)
            tie = (elig[n] & (L.delta.abs() == thr)).flatten().nonzero().flatten()[:max(quota, 0)]
            new.view(-1)[tie] = True
            quota -= len(tie)
            L.mask.copy_(new)
            L.delta.copy_(L.init_delta() * new)


def dense_reference_run(tiny_dir, cfg):
    """rigsa.train's IMP loop (schedule, data order, accumulation, AdamW, prune, rewind, gate
    reset) written out over DenseGatedLinear. -> per iteration {layer: (m * dW, alpha)}."""
    model, tok = M.load(tiny_dir)
    model.requires_grad_(False)
    layers = {}
    for prefix, mod in list(model.named_modules()):
        for c, child in list(mod.named_children()):
            name = f"{prefix}.{c}" if prefix else c
            if isinstance(child, nn.Linear) and name != "lm_head":
                layers[name] = DenseGatedLinear(child, rigsa.layer_seed(cfg.seed, name), cfg.init, cfg.init_std,
                                                cfg.alpha_init, cfg.method != "lt-sft")
                setattr(mod, c, layers[name])
    if cfg.method == "random-mask":
        for n, L in layers.items():
            g = torch.Generator().manual_seed(rigsa.layer_seed(cfg.seed, n + "/mask"))
            L.mask.view(-1)[torch.randperm(L.mask.numel(), generator=g)[:round(cfg.density * L.mask.numel())]] = False
            L.mask.logical_not_()
            L.delta.data.mul_(L.mask)
    x, y = mnist.load_mnist(tmp_mnist(cfg), "train", cfg.val_frac, cfg.split_seed, verify=False)
    digits, eos = rigsa.digit_ids(tok), rigsa.end_id(tok)
    steps = min(math.ceil(len(x) * cfg.epochs / cfg.batch_size), cfg.steps)
    out = []
    for it in range(1, rigsa.n_iters(cfg) + 1):
        gates = [L.alpha for L in layers.values() if L.alpha.requires_grad]
        groups = [{"params": [L.delta for L in layers.values()], "weight_decay": cfg.weight_decay}] + \
                 ([{"params": gates, "weight_decay": 0.0}] if gates else [])
        opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + it)
        order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(math.ceil(cfg.epochs))])
        for step in range(steps):
            for grp in opt.param_groups:
                grp["lr"] = rigsa.get_lr(step, steps, cfg.warmup, cfg.lr)
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
            rows = [rigsa.encode_example(tok, x[i], y[i], digits, eos) for i in idx]
            rigsa.accumulate(model, rows, cfg.micro_batch, tok.pad_id, "cpu")
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append({n: (L.delta.detach() * L.mask, L.alpha.detach().clone()) for n, L in layers.items()})
        if it < rigsa.n_iters(cfg):
            dense_prune(layers, cfg.keep, cfg.prune_scope, sign=cfg.method != "lt-sft")
            for L in layers.values():
                L.alpha.data.fill_(cfg.alpha_init if L.gated else 1.0)
    return out


def tmp_mnist(cfg):
    return mnist.mnist_dir(cfg.data_dir)


@pytest.mark.parametrize("variant", [dict(), dict(prune_scope="layer", iters=3, keep=0.6), dict(method="lt-sft"),
                                     dict(method="random-mask", density=0.3, micro_batch=1), dict(method="dense")])
def test_compact_layer_trains_the_dense_layers_adapters_bitwise(tiny_dir, tmp_path, variant):
    # float32 on the CPU, IMP iterations with gradient accumulation (batch 4 of micro-batches 2),
    # pruning, rewind and gate reset: rigsa.train on the compact layer and the dense reference loop
    # give the same adapters, bit for bit (m * dW and alpha of every layer, every iteration)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, eval_test=False, limit=2, **variant)
    with one_thread():
        rigsa.train(cfg)
        want = dense_reference_run(tiny_dir, cfg)
    for it, ref in enumerate(want, 1):
        m, _ = M.load(tiny_dir)
        cli.load_adapter(m, tmp_path / "run" / f"iter{it}")
        assert rigsa.adapters(m).keys() == ref.keys()
        for n, L in rigsa.adapters(m).items():
            assert torch.equal(L.dense(), ref[n][0]) and torch.equal(L.alpha.detach(), ref[n][1]), (it, n)


# ---- memory: state proportional to the free entries, x alone saved, AdamW's moments ----

def state_bytes(model, opt):
    """Bytes of every parameter, gradient, buffer and optimizer state tensor, storages counted once."""
    seen = {}
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None] + list(model.buffers())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("density", [1.0, 0.52, 0.07])
def test_state_bytes_are_16_per_free_entry_plus_a_bit_per_entry(tiny_dir, density):
    # during accumulation (gradients present, AdamW's state created): the base, then per layer
    # 16 bytes per free entry (dW, gradient, m, v) plus the packed mask (none at density 1), plus
    # each gate's value, gradient and moments (4 x 4 bytes) and AdamW's step counters (4 bytes each)
    m, tok = M.load(tiny_dir)
    base = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    layers = rigsa.install_adapters(m, rigsa.Config())
    if density < 1:
        rigsa.random_masks(layers, {n: round(density * L.numel()) for n, L in layers.items()}, seed=0)
    opt = rigsa.make_optimizer(m, rigsa.Config())
    rigsa.accumulate(m, [(tok.encode("The digit is 7"), [3, 4])], 1, tok.pad_id, "cpu")
    memory.adamw_step(opt)
    rigsa.accumulate(m, [(tok.encode("The digit is 7"), [3, 4])], 1, tok.pad_id, "cpu")
    k = {n: L.delta.numel() for n, L in layers.items()}
    want = base + sum(16 * k[n] + (0 if density == 1 else -(-L.numel() // 8)) for n, L in layers.items()) \
        + len(layers) * (16 + 2 * 4)       # gates: value, gradient, m, v; a step counter per tensor
    assert state_bytes(m, opt) == want
    assert all(abs(k[n] / L.numel() - density) < 0.01 for n, L in layers.items())


def test_only_the_input_is_saved_for_backward(tiny_dir):
    # no weight-shaped tensor (m * dW, W0 + alpha m dW, their transposes) outlives its layer's
    # forward: autograd keeps x and the free entries' positions, the parameters by reference
    m, tok = M.load(tiny_dir)
    layers = rigsa.install_adapters(m, rigsa.Config())
    rigsa.random_masks(layers, {n: L.numel() // 2 for n, L in layers.items()}, seed=0)
    shapes = {tuple(L.weight.shape) for L in layers.values()} | {tuple(L.weight.shape[::-1]) for L in layers.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(torch.tensor([tok.encode("The digit is 7 and 8")]), hidden_only=True).sum()
    params = {p.data_ptr() for p in m.parameters()}
    assert saved and not [t.shape for t in saved if tuple(t.shape) in shapes and t.data_ptr() not in params]


def adamw_run(moments, steps=6, seed=0):
    """A few AdamW steps on two tensors (one decayed, one not) with random gradients."""
    torch.manual_seed(seed)
    w, a = nn.Parameter(torch.randn(300)), nn.Parameter(torch.randn(()))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 1.0}, {"params": [a], "weight_decay": 0.0}],
                            lr=2e-3, foreach=False)
    opt.moments = moments
    for _ in range(steps):
        w.grad, a.grad = torch.randn(300), torch.randn(())
        memory.adamw_step(opt)
    return w.detach(), a.detach(), opt


def test_host_moments_are_torchs_adamw_bitwise_and_8bit_is_close():
    want_w, want_a, ref = adamw_run("device")
    host_w, host_a, opt = adamw_run("host")
    assert torch.equal(host_w, want_w) and torch.equal(host_a, want_a)
    st = ref.state[ref.param_groups[0]["params"][0]]
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"], st["exp_avg_sq"])
    q_w, _, q = adamw_run("8bit")
    assert not torch.equal(q_w, want_w) and (q_w - want_w).abs().max() < 0.05 * (want_w - adamw_run("device", 0)[0]).abs().max()
    assert q.state[q.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.uint8
    # a zero gradient: decay is exact in every placement (the moments stay 0 in 8 bits too)
    for moments in ("host", "8bit"):
        w, _, opt = adamw_run(moments, steps=0)
        before = w.clone()
        opt.param_groups[0]["params"][0].grad = torch.zeros(300)
        memory.adamw_step(opt)
        assert torch.equal(opt.param_groups[0]["params"][0].detach(), before * (1 - 2e-3 * 1.0))


def test_moments_resume_in_any_placement():
    # resume.pt's optimizer state (a copy, as torch.save makes it) loads into a fresh optimizer whose
    # moments live elsewhere: the same placement continues bit for bit; 8 bits to float decodes the
    # codes (never reads them as values); float to 8 bits encodes
    def saved_then_fresh(written, resumed):
        w, a, opt = adamw_run(written, steps=3)
        state = copy.deepcopy(opt.state_dict())
        wf, af = nn.Parameter(w.clone()), nn.Parameter(a.clone())
        fresh = torch.optim.AdamW([{"params": [wf], "weight_decay": 1.0}, {"params": [af], "weight_decay": 0.0}],
                                  lr=0.5, foreach=False)   # the saved lr must replace this one
        fresh.moments = resumed
        memory.load_optimizer_state(fresh, state)
        return opt, fresh
    for moments in ("device", "host", "8bit"):
        opt, fresh = saved_then_fresh(moments, moments)
        assert fresh.param_groups[0]["lr"] == 2e-3
        g = torch.randn(300)
        for o in (opt, fresh):
            o.param_groups[0]["params"][0].grad, o.param_groups[1]["params"][0].grad = g.clone(), torch.tensor(0.5)
            memory.adamw_step(o)
        assert torch.equal(opt.param_groups[0]["params"][0], fresh.param_groups[0]["params"][0]), moments
    opt, fresh = saved_then_fresh("8bit", "device")
    st, p = opt.state[opt.param_groups[0]["params"][0]], fresh.param_groups[0]["params"][0]
    want = memory.dequantize_8bit(st["exp_avg_sq"], st["exp_avg_sq_absmax"], memory.CODES["exp_avg_sq"], torch.empty(300))
    assert fresh.state[p]["exp_avg_sq"].dtype == torch.float32 and torch.equal(fresh.state[p]["exp_avg_sq"], want)
    assert fresh.state[p]["exp_avg_sq"].max() < 100   # a code read as a value would be up to 255
    assert all(fresh.state[q]["exp_avg"].shape == q.shape for g in fresh.param_groups for q in g["params"])   # a gate: ()
    for o in (opt, fresh):   # and it steps as the 8-bit run would, but for the codes' rounding
        o.param_groups[0]["params"][0].grad, o.param_groups[1]["params"][0].grad = torch.ones(300), torch.tensor(0.5)
        memory.adamw_step(o)
    assert (p - opt.param_groups[0]["params"][0]).abs().max() < 1e-4
    opt, fresh = saved_then_fresh("host", "8bit")
    st = fresh.state[fresh.param_groups[0]["params"][0]]
    assert st["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in st
    back = memory.dequantize_8bit(st["exp_avg"], st["exp_avg_absmax"], memory.CODES["exp_avg"], torch.empty(300))
    want = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    assert (back - want).abs().max() <= 0.05 * want.abs().max()
    fresh.param_groups[0]["params"][0].grad, fresh.param_groups[1]["params"][0].grad = torch.randn(300), torch.tensor(0.5)
    memory.adamw_step(fresh)   # and it steps


@pytest.mark.parametrize("method", ["rigsa", "lora"])
def test_a_resume_may_move_the_moments_and_the_run_records_each_placement(tiny_dir, tmp_path, capsys, method):
    # a run halted with 8-bit moments continues with them on the device (decoded: a gate's () and LoRA's
    # 2-D moments too), and config.json says that both placements made its numbers
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=24, n_test=4, size=8)
    with one_thread():
        assert rigsa.train(tiny_cfg(tiny_dir, tmp_path, method=method, moments="8bit", halt_after=2)) is None
        saved = json.loads((tmp_path / "run" / "config.json").read_text())
        assert saved["moments"] == ["8bit"]
        if method == "lora":   # as an older version wrote it: resume.pt's 8-bit codes tell
            (tmp_path / "run" / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "moments"}))
        capsys.readouterr()
        log = rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True, moments="device"))
    assert log and (tmp_path / "run" / f"iter{2 if method == 'rigsa' else 1}.safetensors").exists()
    assert "note: --resume: AdamW's moments were 8bit until now and are device from here" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["moments"] == ["8bit", "device"]
    assert json.loads(rigsa.read_adapter(tmp_path / "run" / "iter1", tensors=False)[1]["moments"]) == ["8bit", "device"]


def test_8bit_codes_round_trip_and_never_zero_a_positive_second_moment():
    torch.manual_seed(0)
    for k, x in (("exp_avg", torch.randn(1000)), ("exp_avg_sq", torch.rand(1000) ** 4)):
        x[300] = x.abs().max() * 1e-7                               # far below the smallest code
        codes, absmax = memory.quantize_8bit(x, memory.CODES[k])
        assert codes.dtype == torch.uint8 and absmax.shape == (4,)  # one scale per 256 entries
        back = memory.dequantize_8bit(codes, absmax, memory.CODES[k], torch.empty(1000))
        # the nearest code: no code lies closer to x / absmax than the one chosen
        code, scaled = memory.CODES[k], x / absmax.repeat_interleave(256)[:1000]
        best = (scaled[:, None] - code[None]).abs().min(1).values
        chosen = (scaled - code[codes.long()]).abs()
        if k == "exp_avg":
            assert torch.allclose(chosen, best, atol=1e-7)
        else:  # the nearest code except where that is 0 for a positive v: the smallest code instead
            zeroed = (best < chosen - 1e-7)
            assert zeroed.any() and (codes[zeroed] == 1).all() and (x[zeroed] > 0).all()
            assert (back > 0).all()                                   # every v here is positive
        assert ((back - x).abs() <= 0.1 * absmax.repeat_interleave(256)[:1000]).all()


def test_the_memory_estimate_chooses_and_refuses_in_one_line(monkeypatch, capsys):
    GB = memory.GB
    plan = {m: {"base": 3 * GB, "adapters": n * GB, "activations": 2 * GB, "transients": 0}
            for m, n in (("device", 16), ("host", 8), ("8bit", 10))}   # host moments: 8 GB in host memory
    cuda = torch.device("cuda")

    def machine(gpu, ram):
        monkeypatch.setattr(memory, "capacity", lambda device: (gpu if device.type == "cuda" else ram) * GB)
    machine(20, 64)
    assert memory.choose_moments(plan, cuda, "auto") == "host"                # 21 GB do not fit in 20; 13 do
    assert "memory: ~13.0 GB on cuda with AdamW's moments host" in capsys.readouterr().out
    machine(40, 64)
    assert memory.choose_moments(plan, cuda, "auto") == "device"
    machine(20, 6)                                                           # no room for 8 GB of host moments
    assert memory.choose_moments(plan, cuda, "auto") == "8bit"
    with pytest.raises(ValueError, match=r"^memory: --moments host needs ~8.0 GB of host memory, which has 6.0 GB; "
                                         r"try --moments 8bit \(~15.0 GB\)$"):
        memory.choose_moments(plan, cuda, "host")
    machine(14, 64)                                                          # only what fits is offered
    with pytest.raises(ValueError, match=r"^memory: the run needs ~21.0 GB on cuda, which has 14.0 GB; "
                                         r"try --moments host \(~13.0 GB\) or a smaller --micro-batch$"):
        memory.choose_moments(plan, cuda, "device")
    machine(12, 64)
    with pytest.raises(ValueError, match=r"which has 12.0 GB; try a smaller --micro-batch$"):
        memory.choose_moments(plan, cuda, "auto")
    with pytest.raises(ValueError, match=r"which has 12.0 GB; no flag of this run makes it smaller: a device with more "
                                         r"memory, or a smaller model$"):   # nothing left to offer
        memory.choose_moments(plan, cuda, "auto", checkpointed=True, micro_batch=1)
    machine(0.02098, 64)                                                     # a shortfall of 0.02 MB reads as one
    small = {m: {k: v / 1000 for k, v in parts.items()} for m, parts in plan.items()}
    with pytest.raises(ValueError, match=r"needs ~21.00 MB on cuda, which has 20.98 MB; try --moments host \(~13.0 MB\) "
                                         r"or --moments 8bit \(~15.0 MB\) or --checkpoint-activations$"):
        memory.choose_moments(small, cuda, "device", checkpointed=False, micro_batch=1)
    cpu = torch.device("cpu")                     # on the CPU host moments take the device's room: auto is device
    machine(20, 20)                               # or 8-bit, and host is neither chosen, offered nor undercounted
    assert memory.choose_moments(plan, cpu, "auto") == "8bit"
    with pytest.raises(ValueError, match=r"^memory: the run needs ~21.0 GB on cpu, which has 20.0 GB; try --moments "
                                         r"8bit \(~15.0 GB\) or a smaller --micro-batch$"):
        memory.choose_moments(plan, cpu, "host")
    machine(21.5, 21.5)                           # within the GPU's 5% margin, but it fits: no 8-bit numbers
    assert memory.choose_moments(plan, cpu, "auto") == "device"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                              # alone: a variable left in a shell
    machine(20, 64)
    assert memory.choose_moments(plan, cuda, "auto") == "host"
    monkeypatch.setenv("WORLD_SIZE", "8")                                    # 8 processes pin 8 GB each
    assert memory.choose_moments(plan, cuda, "auto") == "8bit"


def test_resume_takes_a_branch_name_as_the_recorded_commit(tmp_path):
    # a run records the commit its --revision resolved to; resumed with the branch name again (as
    # reproduce.py passes it), it continues on that commit; another commit is a changed flag
    sha = "a" * 40
    saved = rigsa.Config(model="org/name", revision=sha, out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"config": dataclasses.asdict(saved)}))
    cfg, state = rundir.resumed(rigsa.Config(model="org/name", revision="main", out=str(tmp_path), resume=True), None)
    assert cfg.revision == sha and state is None
    with pytest.raises(ValueError, match="--revision 'b{40}' \\(saved: 'a{40}'\\)"):
        rundir.resumed(rigsa.Config(model="org/name", revision="b" * 40, out=str(tmp_path), resume=True), None)


def test_a_resume_removes_only_the_runs_own_temporary_files(tmp_path):
    # what a kill during a save leaves is the run's to remove; a .tmp file of the user's in its folder is not
    (tmp_path / "config.json").write_text(json.dumps({"config": dataclasses.asdict(rigsa.Config(out=str(tmp_path)))}))
    (tmp_path / "iter1-peft").mkdir()
    theirs = ["notes.tmp", ".notes.abcd1234.tmp", "iter1.tmp", "resume.tmp"]
    ours = [".resume.pt.abcd1234.tmp", "iter1.safetensors.tmp", ".config.json.0a1b2c3d.tmp", "metrics.jsonl.tmp",
            "iter1-peft/adapter_model.safetensors.tmp"]
    for name in theirs + ours:
        (tmp_path / name).write_text("partial")
    rundir.resumed(rigsa.Config(out=str(tmp_path), resume=True), None)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tmp")) == sorted(theirs)


def test_init_check_is_dw0s_first_values_and_guards_loading(tiny_dir):
    m, _ = M.load(tiny_dir)
    layers = rigsa.install_adapters(m, rigsa.Config())
    t = AF.tensors_of(layers)
    for n, L in layers.items():
        assert torch.equal(t[f"{n}.init_check"], L.init_delta().reshape(-1)[:16])
    n = next(iter(layers))
    t[f"{n}.init_check"] = t[f"{n}.init_check"] + 1e-7
    with pytest.raises(ValueError, match=f"src: dW0 of {n} does not regenerate as when the adapter was made"):
        AF.set_adapter_tensors(layers, t, "src")


# ---- extension points: a pruning criterion is one function, a method one table entry ----

def free_dw0(L):
    d0 = L.init_delta().view(-1)
    return d0 if L.mask is None else d0[L.free_index()]


def test_a_new_criterion_is_one_function(tiny_dir, tmp_path, monkeypatch):
    # movement pruning, |dW - dW0|: one function in CRITERIA, handed to the same exact selection and rewind
    monkeypatch.setitem(rigsa.CRITERIA, "movement", lambda name, L: (L.delta - free_dw0(L)).abs())
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=4, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, criterion="movement"))
        before, after = M.load(tiny_dir)[0], M.load(tiny_dir)[0]
        cli.load_adapter(before, tmp_path / "run" / "iter1")   # iteration 1's trained dW (every entry free)
        cli.load_adapter(after, tmp_path / "run" / "iter2")    # the mask the pruning chose
    layers, kept = rigsa.adapters(before), {n: L.free_index() for n, L in rigsa.adapters(after).items()}
    elig = {n: rigsa.eligible(L) for n, L in layers.items()}

    def top(score):   # the global top round(0.8 * eligible) of score among the eligible entries (no ties here)
        k = round(0.8 * sum(int(e.count_nonzero()) for e in elig.values()))
        thr = torch.cat([score(L)[elig[n]] for n, L in layers.items()]).sort(descending=True).values[k - 1]
        return {n: (elig[n] & (score(L) >= thr)).nonzero().view(-1) for n, L in layers.items()}
    movement, magnitude = top(lambda L: (L.delta - free_dw0(L)).abs()), top(lambda L: L.delta.abs())
    assert all(torch.equal(kept[n], movement[n]) for n in layers)
    assert not all(torch.equal(kept[n], magnitude[n]) for n in layers)   # the criterion did act


def test_a_new_method_is_one_table_entry(tiny_dir, tmp_path, monkeypatch):
    # a mask chosen from one batch's gradient (half the entries of each layer, largest |grad| at dW0): one
    # METHODS entry with its init_mask; setup calls it, the loop trains it, check_config reads its flags
    def grad_mask(run):
        x, y = run.data["train"]
        rows = [rigsa.encode_example(run.tok, x[i], y[i], run.digits, run.eos) for i in range(4)]
        rigsa.accumulate(run.model, rows, 4, run.tok.pad_id, run.device)
        grads = {n: L.delta.grad.abs() for n, L in run.layers.items()}
        chosen = rigsa.select(run.layers, {n: g > -1 for n, g in grads.items()}, 0.5, "layer",
                              score=lambda n, L: grads[n])
        for n, L in run.layers.items():
            rigsa.rewind(L, chosen[n])
    monkeypatch.setitem(rigsa.METHODS, "grad-mask", dict(gated=True, prunes=False, lora=False, nf4=False, init_mask=grad_mask,
                                                         flags=rigsa.GATE + rigsa.SPARSE_OPT))
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=4, size=8)
    with one_thread():
        log = rigsa.train(tiny_cfg(tiny_dir, tmp_path, method="grad-mask"))
    it = [r for r in log if r.get("event") == "iteration"]
    assert len(it) == 1 and abs(it[0]["density"] - 0.5) < 1e-3 and all(r.get("loss") == r.get("loss") for r in log)
    with pytest.raises(ValueError, match="--keep 0.5: --method grad-mask does not use it"):
        rigsa.check_config(tiny_cfg(tiny_dir, tmp_path, method="grad-mask", keep=0.5))


def test_a_list_valued_flag_round_trips_through_config_json_and_resume(tiny_dir, tmp_path, capsys):
    # --keep 0.8,0.5: one keep per pruning; config.json holds it as a JSON list, --resume reads it back as the
    # same tuple, a typed equal value is accepted and a different one refused
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=4, size=8)
    args = ["train", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--device", "cpu", "--offline", "--no-verify",
            "--steps", "4", "--warmup", "1", "--batch-size", "4", "--micro-batch", "2", "--limit", "4", "--val-frac",
            "0.1", "--iters", "3", "--keep", "0.8,0.5", "--out", str(tmp_path / "run")]
    with one_thread():
        assert run_cli(args + ["--halt-after", "5"]) == 0
        assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["keep"] == [0.8, 0.5]
        with pytest.raises(SystemExit, match=r"--keep \(0.8, 0.6\) \(saved: \(0.8, 0.5\)\)"):
            rigsa.main(["train", "--resume", "--out", str(tmp_path / "run"), "--keep", "0.8,0.6"])
        assert run_cli(["train", "--resume", "--out", str(tmp_path / "run"), "--keep", "0.8,0.5"]) == 0
    prunes = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    prunes = [r for r in prunes if r.get("event") == "prune"]
    assert [r["kept"] for r in prunes] == [round(0.8 * prunes[0]["eligible"]), round(0.5 * prunes[1]["eligible"])]


def run_cli(argv):
    try:
        rigsa.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_a_diverged_run_stops_before_its_step_and_huge_epochs_draw_only_the_orders_used(tiny_dir, tmp_path, monkeypatch):
    # a NaN loss would be applied by AdamW to every dW and printed as a run: the run stops in one line
    # instead, before that step, and writes no adapter. And an --epochs far past what --steps uses
    # draws only the data orders the steps reach (each order one randperm of the training split)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread(), pytest.raises(ValueError, match=r"the training loss is nan at lr .*: the run diverged, and this "
                                                       r"step was not applied; start again with a lower --lr"):
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, lr=1e30, iters=1, out=str(tmp_path / "nan")))
    assert not list((tmp_path / "nan").glob("iter*"))
    drawn, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **k: drawn.append(n) or randperm(n, **k))
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, iters=1, epochs=1e12, steps=2, out=str(tmp_path / "long")))
    assert len(drawn) <= 2, len(drawn)


def test_a_lora_iterations_peft_copy_is_written_before_the_adapter_that_marks_it_done(tiny_dir, tmp_path, monkeypatch):
    # iterK.safetensors tells --resume the iteration is done: a kill between the two writes must leave the
    # PEFT copy whole and the adapter missing (the iteration is redone), not the other way round
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    seen, save_peft = [], qlora.save_peft
    def peft(model, out, *a, **k):
        seen.append((out / "adapter_model.safetensors").exists() or (out.parent / "iter1.safetensors").exists())
        return save_peft(model, out, *a, **k)
    monkeypatch.setattr(qlora, "save_peft", peft)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, method="lora", rank=2))
    assert seen == [False] and (tmp_path / "run" / "iter1-peft" / "adapter_model.safetensors").exists()


def test_a_saved_config_lacking_keys_says_which_defaults_stand_for_them(capsys):
    # an older version's config.json (or an edited one) without "keep": the run would prune at this
    # version's default without a word; now one note names each missing key and the value used
    saved = dataclasses.asdict(rigsa.Config(keep=0.5))
    del saved["keep"], saved["lr"]
    cfg = rundir.config_from(saved, "RUN/config.json", rigsa.Config)
    assert cfg.keep == 0.8
    assert capsys.readouterr().err == ("note: RUN/config.json: lacks config keys, so this version's defaults stand for "
                                       "them: keep=0.8, lr=0.002 (written by another version, or edited)\n")
