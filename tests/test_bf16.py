"""The low-precision path end to end on the CPU: bfloat16 weights and autocast, with dW, the gates, the
LoRA matrices and AdamW's state in float32. It is what --dtype auto runs on CUDA and on CPUs that
compute bfloat16 natively, so every test here pins --dtype bfloat16 and checks the numbers against
the float32 path (the exact reference), not only that it runs."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import model as M
import rigsa
from lib import mnist
from lib import rundir
from lib import util
from conftest import one_thread
from test_rigsa import tiny_cfg
from evals import run as R


def bf16_cfg(tiny_dir, tmp, **kw):
    return tiny_cfg(tiny_dir, tmp, **{"dtype": "bfloat16", **kw})


def layer_pair(alpha, density=0.5, seed=0):
    """A GatedSparseLinear on float32 weights (the exact path) and its copy on bfloat16 weights, with a
    mask keeping `density` of the entries and gate `alpha`."""
    torch.manual_seed(seed)
    base = nn.Linear(96, 80, bias=False)
    base.weight.data = base.weight.data.to(torch.bfloat16).float()   # W0 as checkpoints hold it: bfloat16 values
    a = rigsa.GatedSparseLinear(base, init_seed=seed, alpha_init=alpha)
    keep = torch.randperm(a.numel())[:int(density * a.numel())].sort().values
    a.set_free(keep, a.init_delta().view(-1)[keep] * 3)
    b = rigsa.GatedSparseLinear(nn.Linear(96, 80, bias=False), init_seed=seed, alpha_init=alpha)
    b.weight = nn.Parameter(a.weight.detach().to(torch.bfloat16), requires_grad=False)
    b.set_packed(a.mask, a.delta.detach().clone())
    return a, b


def grads(layer, x, amp, scale=1.0):
    x = x.clone().requires_grad_(True)
    with amp:
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1]) * scale).sum().backward()
    return y.float(), x.grad.float(), layer.delta.grad, layer.alpha.grad


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("alpha", [0.5, 1e-6])
def test_gated_delta_in_bfloat16_is_within_bfloat16s_tolerance_of_the_exact_path(alpha):
    exact, low = layer_pair(alpha)
    x = torch.randn(2, 40, 96)
    y32, gx32, gd32, ga32 = grads(exact, x, torch.autocast("cpu", enabled=False))
    y16, gx16, gd16, ga16 = grads(low, x.to(torch.bfloat16), torch.autocast("cpu", torch.bfloat16))
    assert low.delta.dtype == torch.float32 and gd16.dtype == torch.float32 and ga16.dtype == torch.float32
    # bfloat16 keeps 8 bits: each output and gradient within a few of its ulps (2**-8 = 0.4%) of the exact one
    for name, a, b in (("y", y16, y32), ("dx", gx16, gx32), ("dW", gd16, gd32)):
        assert rel(a, b) < 1.5e-2, (name, rel(a, b))
    # alpha's gradient is one sum over every entry, sum(dL/dW * m dW), whose terms cancel: each term is
    # within an ulp, so the sum is within an ulp of the sum of the terms' magnitudes
    gw = torch.linspace(-1, 1, 80)[:, None] * x.reshape(-1, 96).sum(0)[None]      # (out, in): dL/dW of grads' loss
    assert (ga16 - ga32).abs() <= 2 ** -7 * (gw * exact.dense().detach()).abs().sum(), (ga16, ga32)


@pytest.mark.parametrize("scale", [1e-4, 1e-7])
def test_dws_gradient_in_bfloat16_keeps_the_small_gradients_of_a_small_gate(scale):
    # the paper's gate starts at 1e-6 and a 1.7B model's loss gradients are small: dW's gradient, alpha * gy^T x,
    # is then far below float16's range (6e-8), where bfloat16's and float32's go on. Rounded through float16
    # after the GEMM it passed the test above (alpha 1e-6 on gradients of 1), and zeroed a median 41% of the entries
    # in a bfloat16 training of the tiny model: every entry within bfloat16's tolerance of the exact one, none lost
    exact, low = layer_pair(1e-6)
    x = torch.randn(2, 40, 96)
    gd32 = grads(exact, x, torch.autocast("cpu", enabled=False), scale)[2]
    gd16 = grads(low, x.to(torch.bfloat16), torch.autocast("cpu", torch.bfloat16), scale)[2]
    assert gd32.abs().max() < 6e-8, gd32.abs().max()   # what the test is about: under float16's least positive value
    assert rel(gd16, gd32) < 1.5e-2 and not ((gd32 != 0) & (gd16 == 0)).any(), rel(gd16, gd32)


@pytest.mark.parametrize("alpha", [0.5, 1e-6])
def test_the_gates_gradient_in_bfloat16_where_its_terms_do_not_cancel(alpha):
    # positive dW, inputs and output weights: sum(dL/dW * m dW) has no cancelling terms, so a few ulps bound it
    # relatively (the test above bounds it against the terms' magnitudes only, loose enough to miss a factor)
    exact, low = layer_pair(alpha)
    for L in (exact, low):
        L.delta.data.abs_()
    x = torch.rand(2, 40, 96)
    ga = []
    for layer, xx, amp in ((exact, x, torch.autocast("cpu", enabled=False)),
                           (low, x.to(torch.bfloat16), torch.autocast("cpu", torch.bfloat16))):
        with amp:
            layer(xx).float().sum().backward()
        ga.append(layer.alpha.grad)
    assert rel(ga[1], ga[0]) < 2e-2, ga


def test_a_delta_under_half_an_ulp_of_w0_still_counts():
    # alpha m dW a quarter of an ulp of W0 at every entry, of one sign, on inputs of one sign (a coherent
    # update, as fine-tuning makes): one GEMM on W0 + alpha m dW rounded to bfloat16 is W0 itself and the
    # delta is gone; the forward's own GEMM for the delta keeps it, a few ulps of each output
    exact, low = layer_pair(1.0, density=1.0)
    w0 = exact.weight.detach()
    ulp = 2.0 ** (torch.frexp(w0)[1].float() - 8)   # bfloat16's ulp at each entry of W0
    low.set_packed(None, (0.25 * ulp).view(-1))
    assert torch.equal((w0 + low.dense()).to(torch.bfloat16), w0.to(torch.bfloat16))   # the rounded merge: W0
    x = (1 + torch.rand(512, 96)).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        moved = low(x).float() - F.linear(x, w0.to(torch.bfloat16)).float()
    want = F.linear(x.float(), low.dense())   # the delta's exact contribution
    assert rel(moved, want) < 0.35 and (moved != 0).float().mean() > 0.9, rel(moved, want)


@pytest.mark.parametrize("moments", ["device", "host", "8bit"])
def test_an_imp_run_in_bfloat16_resumes_bit_for_bit(tiny_dir, tmp_path, moments):
    # accumulation (2 micro-batches a step), 3 iterations (2 prunings, rewinds, gate resets), a halt
    # inside iteration 2 and a resume, with AdamW's moments in each placement: the adapters equal the
    # uninterrupted run's, bit for bit
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        full = rigsa.train(bf16_cfg(tiny_dir, tmp_path, iters=3, moments=moments))
        assert rigsa.train(bf16_cfg(tiny_dir, tmp_path, iters=3, moments=moments, out=str(tmp_path / "cut"),
                                    halt_after=6)) is None
        state = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
        resumed = rigsa.train(rigsa.Config(out=str(tmp_path / "cut"), resume=True))
    assert all(t.dtype == torch.float32 for s in state["optimizer"]["state"].values() for t in s.values()
               if t.is_floating_point())                           # AdamW's state: float32 (8bit: its absmax)
    assert [r.get("loss") for r in full] == [r.get("loss") for r in resumed]
    for k in (1, 2, 3):
        a, _, cfg = rigsa.read_adapter(tmp_path / "run" / f"iter{k}")
        b, _, _ = rigsa.read_adapter(tmp_path / "cut" / f"iter{k}")
        assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a), k
        assert cfg.dtype == "bfloat16" and all(a[n].dtype == torch.float32 for n in a if n.endswith((".delta", ".alpha")))
    dens = [r["density"] for r in full if r.get("event") == "iteration"]
    assert dens[0] == 1.0 and dens[0] > dens[1] > dens[2]
    a = {it: [r["alpha_mean"] for r in full if r.get("iter") == it and "alpha_mean" in r] for it in (1, 2, 3)}
    assert all(a[it][-1] > a[it][0] for it in a) and a[2][0] < a[1][-1] and a[3][0] < a[2][-1], a   # trained, reset


@pytest.mark.parametrize("method", ["random-mask", "lt-sft", "lora", "qlora"])
def test_every_method_trains_saves_and_evaluates_in_bfloat16(tiny_dir, tmp_path, method):
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    kw = dict(method=method, steps=3)
    if method == "random-mask":
        kw["density"] = 0.3
    if method in ("lora", "qlora"):
        kw.update(rank=2, lora_lr=1e-2)
    with one_thread():
        log = rigsa.train(bf16_cfg(tiny_dir, tmp_path, **kw))
    losses = [r["loss"] for r in log if "loss" in r]
    assert all(l == l for l in losses) and losses[-1] < losses[0]   # finite, and it learns
    last = f"iter{rigsa.n_iters(bf16_cfg(tiny_dir, tmp_path, **kw))}"
    tensors, _, cfg = rigsa.read_adapter(tmp_path / "run" / last)
    assert cfg.dtype == "bfloat16" and all(t.dtype == torch.float32 for n, t in tensors.items() if t.is_floating_point())
    # evaluation of that adapter in bfloat16 (evals/run.py) and, for the gated ones, a float32 merge
    out = tmp_path / "eval.json"
    R.main(["--task", "mnist", "--model", str(tiny_dir), "--adapter", str(tmp_path / "run" / last), "--data-dir",
            str(tmp_path), "--no-verify", "--offline", "--limit", "4", "--dtype", "bfloat16", "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16" and r["dtype_choice"].startswith("as asked") and 0 <= r["metrics"]["acc"] <= 1
    if method in ("random-mask", "lt-sft"):
        merged, _ = M.load(cli.merge(tmp_path / "run" / last, tmp_path / "merged"))
        assert merged.lm_head.weight.dtype == torch.float32


def test_auto_is_bfloat16_only_where_the_cpu_computes_it(tiny_dir, tmp_path, monkeypatch, capsys):
    has = {"_is_amx_tile_supported": False, "_is_avx512_bf16_supported": False}
    for name in has:
        monkeypatch.setattr(torch.cpu, name, lambda name=name: has[name], raising=False)
    assert util.auto_dtype("auto", "cpu") == (torch.float32, "auto: no native bfloat16 on this cpu")
    # asked for on such a CPU: taken, and said (an AVX2 EPYC, 2026-12-05: 1.2 GFLOP/s against float32's 64)
    assert util.auto_dtype("bfloat16", "cpu") == (torch.bfloat16, "as asked; emulated on this cpu (no AMX or "
                                                  "AVX512-BF16): many times slower than float32")
    assert util.auto_dtype("float32", "cpu") == (torch.float32, "as asked")
    # float16 on a CPU without AMX-FP16: 2-4x slower than float32 on the AVX512-BF16 EPYC (2026-12-06), taken silently
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    assert util.auto_dtype("float16", "cpu") == (torch.float16, "as asked; emulated on this cpu (no AMX-FP16): slower "
                                                 "than float32")
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True, raising=False)
    assert util.auto_dtype("float16", "cpu") == (torch.float16, "as asked")
    has["_is_avx512_bf16_supported"] = True
    assert util.auto_dtype("bfloat16", "cpu") == (torch.bfloat16, "as asked")
    assert util.auto_dtype("auto", "cpu") == (torch.bfloat16, "auto: AVX512-BF16")
    has["_is_amx_tile_supported"] = True
    assert util.auto_dtype("auto", "cpu") == (torch.bfloat16, "auto: AMX")
    # a run says its choice in its first lines and saves it resolved: --resume keeps it on any machine
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, dtype="auto", steps=2, iters=1))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config: ") and out[1] == "dtype: bfloat16 (AMX)"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16" and saved["dtype_choice"] == "auto: AMX"
    has.update({k: False for k in has})   # the same run resumed where bfloat16 is not native: still bfloat16
    assert rundir.run_dtype(rigsa.Config(dtype="bfloat16", resume=True), "cpu")[0] == torch.bfloat16
    assert rundir.run_dtype(rigsa.Config(dtype="auto", resume=True), "cpu")[0] == torch.float32   # an older run's auto
    assert rundir.run_dtype(rigsa.Config(dtype="auto", resume=True), "cuda")[0] == torch.bfloat16   # as it ran there


def test_evaluation_in_bfloat16_is_near_float32s(tiny_dir, tmp_path):
    # PIQA's protocol on both dtypes: the log-likelihoods of bfloat16 weights within bfloat16's rounding
    # of a sum of ~10 token log-probs of the float32 ones
    from test_evals import _write_data
    _write_data(tmp_path)
    res = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--dtype", dtype, "--output", str(out)])
        res[dtype] = json.loads(out.read_text())
    assert res["bfloat16"]["dtype"] == "bfloat16" and res["bfloat16"]["softmax_dtype"] == "float32"
    a = [ll for s in res["float32"]["samples"] for ll in s["loglikelihoods"]]
    b = [ll for s in res["bfloat16"]["samples"] for ll in s["loglikelihoods"]]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a), (a, b)
