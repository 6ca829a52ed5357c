"""More of the low-precision path's rules, each a test that fails when its rule is broken: a bfloat16 run
steps under bfloat16 autocast (every method, fresh and resumed, seen where the forward runs), IMP's
prune and rewind on bfloat16 weights are float32's, --dtype auto is bfloat16 on CUDA and on a CPU that
computes it (training and evaluation) and float32 elsewhere, an older run saved as "auto" resumes in
float32 on any CPU, evaluation in bfloat16 applies the adapter and takes its log-softmax in float32
unless asked otherwise, the demo trains in float32, and a run that does not fit names
--checkpoint-activations as a fix (unless it is on). CPU only, tiny checkpoints written by the tests."""
import json
import types

import pytest
import torch

import model as M
import rigsa
from lib import memory
from lib import mnist
from lib import rundir
from lib import util
from conftest import one_thread
from test_rigsa import tiny_cfg
from evals import run as R


@pytest.mark.parametrize("dtype,autocast", [("bfloat16", True), ("float32", False)])
def test_training_steps_run_under_bfloat16_autocast_only_in_bfloat16(tiny_dir, tmp_path, monkeypatch, dtype, autocast):
    # the recipe: bfloat16 weights *and* autocast; without autocast the norms, softmaxes and the loss
    # would run in bfloat16 too, and a run would still learn (so the other tests cannot tell)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    seen, accumulate = [], rigsa.accumulate

    def spy(model, rows, micro_batch, pad_id, device, amp=None, n_sup=None):
        with amp:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return accumulate(model, rows, micro_batch, pad_id, device, amp, n_sup)
    monkeypatch.setattr(rigsa, "accumulate", spy)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, dtype=dtype, steps=1, iters=1))
    assert seen and all(on is autocast and (not on or d == torch.bfloat16) for on, d in seen), seen


def test_an_older_run_saved_as_auto_resumes_in_float32_even_on_a_bfloat16_cpu(monkeypatch):
    # older versions ran "auto" as float32 on every CPU: resuming one on a CPU that now computes
    # bfloat16 natively must not switch it (AdamW's state and the adapters were made in float32)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
    assert util.auto_dtype("auto", "cpu")[0] == torch.bfloat16                     # a new run: bfloat16
    assert rundir.run_dtype(rigsa.Config(dtype="auto", resume=True), "cpu") == (torch.float32, "as the run started")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)   # a resume on a CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)      # without it: said
    assert rundir.run_dtype(rigsa.Config(dtype="bfloat16", resume=True), "cpu") == (
        torch.bfloat16, "as the run started; emulated on this cpu (no AMX or AVX512-BF16): many times slower than float32")
    assert rundir.run_dtype(rigsa.Config(dtype="float32", resume=True), "cpu")[0] == torch.float32


def test_evaluation_log_softmax_is_float32_unless_asked_for_the_models_dtype(tiny_dir, tmp_path):
    # bfloat16 weights: the default sums float32 log-probs (not all of them bfloat16 numbers, and nearer
    # the float32 model's); --softmax-dtype model sums in bfloat16 (every one a bfloat16 number)
    from test_evals import _write_data
    _write_data(tmp_path)
    lls = {}
    for name, args in (("ref", ["--dtype", "float32"]), ("f32", ["--dtype", "bfloat16"]),
                       ("model", ["--dtype", "bfloat16", "--softmax-dtype", "model"])):
        out = tmp_path / f"{name}.json"
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--device", "cpu", "--output", str(out)] + args)
        lls[name] = torch.tensor([ll for s in json.loads(out.read_text())["samples"] for ll in s["loglikelihoods"]],
                                 dtype=torch.float64)
    is_bf16 = lambda t: t.eq(t.to(torch.bfloat16).to(torch.float64))
    assert is_bf16(lls["model"]).all() and not is_bf16(lls["f32"]).all()
    assert (lls["f32"] - lls["ref"]).abs().sum() < (lls["model"] - lls["ref"]).abs().sum()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_run_that_does_not_fit_names_checkpoint_activations_unless_it_is_on(tiny_dir, tmp_path, monkeypatch,
                                                                               checkpoint):
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    monkeypatch.setattr(memory, "capacity", lambda device: 1000)   # bytes: nothing fits
    with one_thread(), pytest.raises(ValueError, match="memory: the run needs") as e:
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, steps=1, iters=1, checkpoint_activations=checkpoint))
    assert ("--checkpoint-activations" in str(e.value)) is not checkpoint, str(e.value)
    assert not (tmp_path / "run").exists()   # refused before the run directory is written


def test_resume_accepts_the_auto_it_started_with_and_keeps_why(tiny_dir, tmp_path, monkeypatch, capsys):
    # --dtype auto typed again on --resume is the run's own dtype where it resolves to it, and the
    # reason config.json recorded at the start stays
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    args = ["train", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--offline", "--no-verify", "--steps", "4", "--warmup", "1", "--batch-size", "4",
            "--micro-batch", "2", "--val-frac", "0.25", "--limit", "4", "--save-every", "0", "--dtype", "auto"]
    with one_thread():
        rigsa.main(args + ["--halt-after", "2"])
        rigsa.main(args + ["--resume"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16" and saved["dtype_choice"].startswith("auto: ")
    assert (tmp_path / "run" / "iter2.safetensors").exists()


def test_resume_refuses_an_auto_that_resolves_to_another_dtype_naming_it_as_typed(tiny_dir, tmp_path, monkeypatch):
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, steps=4, iters=1, halt_after=2))   # float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    with pytest.raises(SystemExit) as e:
        rigsa.main(["train", "--resume", "--out", str(tmp_path / "run"), "--dtype", "auto"])
    assert "--dtype 'auto' (saved: 'float32'; 'auto' is bfloat16 here) differs from the run's saved config" in str(e.value), e.value


@pytest.mark.parametrize("device", ["meta", "xpu", "mps", "tpu"])
def test_a_device_this_toolkit_does_not_run_on_is_one_line(device):
    with pytest.raises(ValueError, match=f"--device '{device}': not a device this toolkit runs on; use cpu"):
        util.pick_device(device)


def test_auto_keeps_a_float32_merge_in_float32(tiny_dir, tmp_path, monkeypatch, capsys):
    # a float32 merge holds deltas bfloat16 would round away: evaluation's auto keeps it float32, and says why; so
    # does a training on it (the forgetting set-up: a task merged, the next one trained on top), whose accuracies
    # were computed on the base without the merge's deltas, and its adapter's evaluation on the merge
    import cli
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, iters=1))
    cli.merge(tmp_path / "run" / "iter1", tmp_path / "merged")
    out = tmp_path / "r.json"
    R.main(["--task", "mnist", "--model", str(tmp_path / "merged"), "--data-dir", str(tmp_path), "--no-verify",
            "--offline", "--limit", "2", "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["dtype"] == "float32" and r["dtype_choice"].startswith("auto: a float32 merge"), r["dtype_choice"]
    loaded = []   # model.py's chat too: it took auto as bfloat16 here, without a word (the native-bfloat16 tester's M2)
    stop = types.SimpleNamespace(chat=lambda msgs: (_ for _ in ()).throw(KeyboardInterrupt))   # after the dtype line
    monkeypatch.setattr(M, "load", lambda path, device, dtype, *a: loaded.append(dtype) or (None, stop))
    for typed in ("auto", "bfloat16"):
        with pytest.raises(SystemExit):
            M.main(["--model", str(tmp_path / "merged"), "--prompt", "hi", "--dtype", typed])
    assert loaded == [torch.float32, torch.bfloat16], loaded
    err = capsys.readouterr().err
    assert "dtype: float32 (a float32 merge of an adapter, whose small deltas bfloat16 would round away)" in err
    assert f"note: --dtype bfloat16: {tmp_path / 'merged'} is a float32 merge" in err and "dtype: bfloat16 (as asked)" in err
    monkeypatch.undo()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    on = dict(model=str(tmp_path / "merged"), iters=1, steps=1)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / "auto"), dtype="auto", **on))
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / "bf16"), dtype="bfloat16", **on))
    c = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert c["config"]["dtype"] == "float32" and c["dtype_choice"].startswith("auto: a float32 merge"), c["dtype_choice"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["config"]["dtype"] == "bfloat16"   # as asked
    assert f"note: --dtype bfloat16: {tmp_path / 'merged'} is a float32 merge of an adapter" in capsys.readouterr().err
    rigsa.main(["train", "--resume", "--out", str(tmp_path / "auto"), "--dtype", "auto", "--offline", "--no-verify"])
    assert "the run is complete" in capsys.readouterr().out   # the auto it started with, typed again: taken
    (tmp_path / "merged" / "rigsa-merge.json").write_text("{oops")   # which merge it is cannot be told: refused
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--model", str(tmp_path / "merged"), "--data-dir", str(tmp_path), "--no-verify",
                "--offline", "--limit", "2"])
    assert "rigsa-merge.json: not readable as rigsa.py merge's record (JSONDecodeError" in e.value.code, e.value.code


def bf16_cfg(tiny_dir, tmp, **kw):
    return tiny_cfg(tiny_dir, tmp, **{"dtype": "bfloat16", **kw})


@pytest.mark.parametrize("method", ["rigsa", "lt-sft", "lora", "qlora"])
def test_every_method_computes_in_bfloat16_under_autocast(tiny_dir, tmp_path, monkeypatch, method):
    # gaps M1b, M9c, M11, M12, M12c: what each micro-batch's forward actually runs under, seen from
    # inside accumulate (not the amp object handed to it), fresh and after a resume
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    seen, batch_loss = [], rigsa.batch_loss

    def spy(model, rows, pad_id, device):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     model.model.embed_tokens.weight.dtype))
        return batch_loss(model, rows, pad_id, device)
    monkeypatch.setattr(rigsa, "batch_loss", spy)
    kw = dict(method=method, steps=3)
    if method in ("lora", "qlora"):
        kw.update(rank=2, lora_lr=1e-2)
    with one_thread():
        assert rigsa.train(bf16_cfg(tiny_dir, tmp_path, halt_after=1, **kw)) is None
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True))
    assert len(seen) >= 4 and all(on and d == torch.bfloat16 and w == torch.bfloat16 for on, d, w in seen), seen


def test_prune_and_rewind_in_bfloat16_equal_float32s(tiny_dir):
    # gaps M7, M8: the IMP rule (sign-preserving, rewind to dW0) on bfloat16 weights is float32's
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        m, _ = M.load(tiny_dir, dtype=dtype)
        layers = rigsa.install_adapters(m, rigsa.Config())
        g = torch.Generator().manual_seed(0)
        for L in layers.values():   # trained-looking deltas: some signs flipped
            L.set_packed(None, L.delta.detach() + 0.05 * torch.randn(L.delta.shape, generator=g))
        rigsa.prune(layers, 0.8)
        out[dtype] = {n: (L.mask.clone(), L.delta.detach().clone(),
                          L.init_delta().view(-1)[L.free_index()]) for n, L in layers.items()}
    for n, (mask, delta, d0) in out[torch.bfloat16].items():
        assert torch.equal(mask, out[torch.float32][n][0]), n          # the same entries kept
        assert delta.dtype == torch.float32 and torch.equal(delta, d0), n   # rewound to dW0


def test_auto_is_bfloat16_on_cuda_that_computes_it(monkeypatch):
    # gap D4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert util.auto_dtype("auto", "cuda") == (torch.bfloat16, "auto: CUDA")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert util.auto_dtype("auto", "cuda")[0] == torch.float32


@pytest.mark.parametrize("native", [False, True])
def test_evaluation_auto_follows_the_cpu(tiny_dir, tmp_path, monkeypatch, native):
    # gap E5: evals/run.py --dtype auto (the default) gives bfloat16 only to a CPU that computes it
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    out = tmp_path / "r.json"
    R.main(["--task", "mnist", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline", "--device", "cpu",
            "--limit", "2", "--output", str(out)])
    r = json.loads(out.read_text())
    assert (r["dtype"], r["dtype_choice"]) == (("bfloat16", "auto: AVX512-BF16") if native
                                               else ("float32", "auto: no native bfloat16 on this cpu"))


def test_evaluation_in_bfloat16_uses_the_adapter(tiny_dir, tmp_path):
    # gap E1: test_evals.test_cli_adapter_in_memory, pinned to bfloat16: the adapter changes the scores
    from test_evals import _write_data
    _write_data(tmp_path)
    model, tok = M.load(str(tiny_dir))
    cfg = rigsa.Config(method="dense", model=str(tiny_dir))
    for L in rigsa.install_adapters(model, cfg).values():
        L.alpha.data.fill_(0.5)
    rigsa.save_adapter(model, str(tmp_path / "iter1.safetensors"), cfg)
    runs = {}
    for name, extra in (("base", []), ("adapted", ["--adapter", str(tmp_path / "iter1")])):
        out = tmp_path / f"{name}.json"
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline", "--device", "cpu",
                "--limit", "2", "--output", str(out), "--dtype", "bfloat16"] + extra)
        runs[name] = json.loads(out.read_text())
    got, base = (runs[k]["samples"][0]["loglikelihoods"] for k in ("adapted", "base"))
    assert runs["adapted"]["dtype"] == "bfloat16" and all(abs(a - b) > 1e-2 for a, b in zip(got, base, strict=True))


def test_the_log_softmax_itself_runs_in_float32(tiny_dir):
    # gap E2b: not only the sums: each token's log-prob is float32's log_softmax of the bfloat16 logits
    from evals import harness as H
    m, _ = M.load(tiny_dir, dtype=torch.bfloat16)
    h = torch.randn(5, m.lm_head.weight.shape[1], dtype=torch.bfloat16)
    at, tg = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([3, 7, 11, 13, 17])
    lp, _ = H._cont_scores(m, h, at, tg, torch.float32)
    want = torch.log_softmax(m.lm_head(h).float(), -1)[at, tg]
    assert lp.dtype == torch.float32 and torch.equal(lp, want)


def test_the_demo_trains_in_float32_by_default(tmp_path, monkeypatch):
    # `rigsa.py demo` as typed (its command line's default, not only cli.demo's): what it prints
    # stays what the README shows on any CPU
    seen = []
    monkeypatch.setattr(rigsa, "train", lambda cfg: seen.append(cfg.dtype) or [])
    monkeypatch.setattr(rigsa, "mnist_accuracy", lambda *a, **k: (0.1, None))
    rigsa.main(["demo", "--out", str(tmp_path / "demo")])
    assert seen == ["float32"]
