"""More of the low-precision path's rules, each a test that fails when its rule is broken: a bfloat16 run
steps under bfloat16 autocast, an older run saved as "auto" resumes in float32 on any CPU, evaluation's
log-softmax is float32 unless asked otherwise, and a run that does not fit names --checkpoint-activations
as a fix (unless it is on). CPU only, tiny checkpoints written by the tests."""
import json

import pytest
import torch

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


@pytest.mark.parametrize("device", ["meta", "xpu", "mps", "tpu"])
def test_a_device_this_toolkit_does_not_run_on_is_one_line(device):
    with pytest.raises(ValueError, match=f"--device '{device}': not a device this toolkit runs on; use cpu"):
        util.pick_device(device)


def test_auto_keeps_a_float32_merge_in_float32(tiny_dir, tmp_path, monkeypatch):
    # a float32 merge holds deltas bfloat16 would round away: evaluation's auto keeps it float32, and says why
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
