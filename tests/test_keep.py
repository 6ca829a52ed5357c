"""Nothing the user made is destroyed or locked away: an output that is an input (or any file that is
not one of our results) is refused; a command deletes only what it wrote itself; one process writes
a run directory at a time; temporary files go on every way out, SIGTERM included; new files and
folders get the modes the user's umask says."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import model as M
import rigsa
from lib import adapter_files as AF
from lib import mnist
from lib import util
from lib import interrupts
from lib import tiny
from conftest import one_thread
from evals import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, above tests/


def base(model, data, **kw):
    return dict(model=str(model), data_dir=str(data), device="cpu", dtype="float32", steps=2, warmup=1, batch_size=4,
                micro_batch=2, limit=2, log_every=1, save_every=0, offline=True, verify=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model of its own (outputs are pointed into it), MNIST stand-in data and a finished run."""
    w = tmp_path_factory.mktemp("keep")
    tiny.write_tiny_checkpoint(w / "model", shape="gqa", seed=0)
    mnist.write_synthetic_mnist(w / "data" / "mnist", n_train=60, n_test=4, size=8)
    with one_thread():
        rigsa.train(rigsa.Config(out=str(w / "run"), iters=2, lr=2e-2, **base(w / "model", w / "data")))
    os.link(w / "run" / "iter2.safetensors", w / "hardlink.safetensors")
    return w


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# ---- an output is never an input, nor any file that is not one of our results ----

OUTPUTS = [   # (flags, what the one line says); {w}: the world
    (["--output", "{w}/run/iter2.safetensors", "--adapter", "{w}/run/iter2"], "is the --adapter file"),
    (["--output", "{w}/hardlink.safetensors", "--adapter", "{w}/run/iter2"], "is the --adapter file"),
    (["--output", "{w}/model/model.safetensors", "--model", "{w}/model"], "is in the model directory"),
    (["--output", "{w}/model/results.json", "--model", "{w}/model"], "is in the model directory"),
    (["--output", "{w}/model/r.json", "--adapter", "{w}/run/iter1"], "is in the model directory"),   # its recorded base
    (["--output_path", "{w}/model", "--model", "{w}/model"], "is in the model directory"),
    (["--output_path", "{w}/model/sub/r.json", "--model", "{w}/model"], "is in the model directory"),
    (["--output", "{w}/data/mnist/t10k-images-idx3-ubyte.gz"], "is a data file of --task mnist"),
    (["--output", "{w}/data/mnist/train-labels-idx1-ubyte.gz", "--num-fewshot", "1"], "is a data file of --task mnist"),
    (["--output", "{w}/run/iter1.safetensors"], "exists and is not a results file of evals/run.py"),
    (["--output", "{w}/run/config.json"], "exists and is not a results file of evals/run.py"),
    (["--output", "{w}/run/metrics.jsonl"], "exists and is not a results file of evals/run.py"),
    pytest.param(["--output", "/proc/rigsa-results.json"], "cannot write in /proc",   # os.access says yes to root there
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")),
]


@pytest.mark.parametrize("flags,text", OUTPUTS, ids=[" ".join((f.values if hasattr(f, "values") else f)[0][:2]) for f in OUTPUTS])
def test_an_output_that_is_an_input_or_not_ours_is_refused_before_any_work(world, flags, text, monkeypatch):
    w = world
    def no(*a, **k):
        raise AssertionError("work began before the output was checked")
    monkeypatch.setattr(R, "load_data", no)
    monkeypatch.setattr(R.qlora, "load_model", no)
    before = tree(w)
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--data-dir", str(w / "data"), "--no-verify", "--offline", "--device", "cpu",
                "--limit", "2"] + [a.format(w=w) for a in flags])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {flags[0]} {flags[1].format(w=w)}: {text}") and "\n" not in msg, msg
    assert tree(w) == before


@pytest.mark.parametrize("content,replaced", [
    ("", True),                                                           # holds nothing to lose
    ('{"task": "mnist", "metrics": {"acc": 0.5}}', True),                 # --output's result
    ('{"mnist": {"task": "mnist", "metrics": {}}}', True),                # --task all's
    ('{"results": {}, "configs": {}, "model_source": "rigsa"}', True),    # our lm-eval-shaped results_<date>.json
    ('{"results": {}, "configs": {}}', False),                            # lm-eval's own: not ours to replace
    ('{"metrics": 1}', False), ("{}", False), ("[1]", False), ("{oops", False), ("notes", False),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{}", False), (b'{"task": "\xff"', False),
])
def test_only_our_results_are_replaced(tmp_path, content, replaced):
    p = tmp_path / "r.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert R.ours(p) == replaced


MERGES = [   # (--out, other arguments, what the one line says) before the model loads; {w}: the world
    ("{w}/model/merged", {}, "is in the base model's directory"),
    ("{w}/elsewhere", {"revision": "abc"}, "the model {w}/model is a local directory, which has no revisions"),
    pytest.param("/proc/rigsa-merged", {}, "cannot write in /proc",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")),
]


@pytest.mark.parametrize("out,kw,text", MERGES, ids=["in the base", "--revision local", "unwritable"])
def test_a_merge_that_cannot_be_written_as_asked_is_refused_before_the_load(world, out, kw, text, monkeypatch):
    def no(*a, **k):
        raise AssertionError("the model loaded before --out was checked")
    monkeypatch.setattr(cli.M, "load", no)
    before = tree(world)
    with pytest.raises(ValueError) as e:
        cli.merge(world / "run" / "iter2", out.format(w=world), **kw)
    assert text.format(w=world) in str(e.value) and "\n" not in str(e.value), e.value
    assert tree(world) == before


def test_a_file_of_the_users_named_lock_is_never_taken(world, tmp_path):
    # rigsa keeps OUT/LOCK while it writes OUT; a LOCK of the user's (not 'pid host start'), however old, stays
    out = tmp_path / "mine"
    out.mkdir()
    (out / "LOCK").write_text("my notes\n")
    os.utime(out / "LOCK", (time.time() - 3600,) * 2)
    before = tree(tmp_path)
    for extra in (["--resume"], ["--lr", "2e-2"]):
        with pytest.raises(SystemExit) as e:
            rigsa.main(["train", "--model", str(world / "model"), "--data-dir", str(world / "data"), "--no-verify",
                        "--offline", "--device", "cpu", "--steps", "2", "--out", str(out), *extra])
        assert e.value.code == f"error: {out / 'LOCK'}: not a lock file of rigsa's (it holds something other than " \
            f"'pid host start'); move it away, since rigsa.py keeps a file of that name in {out} while it writes there"
        assert tree(tmp_path) == before


def test_a_mask_of_other_shapes_is_refused_before_the_base_loads(world, tmp_path, monkeypatch):
    # --mask-like from a base of other layer shapes (--allow-other-base): its counts are other densities,
    # said before the load (the shapes come from config.json, on the meta device)
    other = tiny.write_tiny_checkpoint(tmp_path / "mha", shape="mha", seed=1)
    def no(*a, **kw):
        raise AssertionError("the base loaded before --mask-like's shapes were checked")
    monkeypatch.setattr(rigsa.M, "load", no)
    with pytest.raises(ValueError, match=r"^--mask-like \S+iter2: its mask of model.layers.0.self_attn.k_proj is for a "
                                         r"layer of about 2,048 entries, and this model's has 4,096; "):
        rigsa.train(rigsa.Config(out=str(tmp_path / "rm"), method="random-mask", mask_like=str(world / "run" / "iter2"),
                                 allow_other_base=True, **base(other, world / "data")))


def test_a_damaged_adapter_is_refused_before_the_base_loads(world, tmp_path, monkeypatch):
    # its checksum is checked when its tensors are read, and that read comes before the base's (minutes at 1.7B)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(world / "run" / "iter2.safetensors"), "pt") as f:
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    k = next(k for k in sorted(t) if k.endswith(".delta"))
    save_file({**t, k: t[k] * 2}, str(tmp_path / "damaged.safetensors"), metadata=meta)
    def no(*a, **kw):
        raise AssertionError("the base loaded before the adapter's checksum was checked")
    monkeypatch.setattr(cli.M, "load", no)   # evals' qlora.load_model goes through it too
    with pytest.raises(ValueError, match=r"damaged.safetensors: its tensors do not match the checksum"):
        cli.merge(tmp_path / "damaged", tmp_path / "merged")
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device", "cpu",
                "--limit", "2", "--adapter", str(tmp_path / "damaged")])
    assert re.fullmatch(r"error: --adapter: \S+damaged.safetensors: its tensors do not match the checksum .*", e.value.code)
    assert not (tmp_path / "merged").exists()
    monkeypatch.setattr(rigsa.M, "load", no)   # --mask-like's too (random-mask needs only its counts, read from the header)
    with pytest.raises(ValueError, match=r"damaged.safetensors: its tensors do not match the checksum"):
        rigsa.train(rigsa.Config(out=str(tmp_path / "rm"), method="random-mask", mask_like=str(tmp_path / "damaged"),
                                 **base(world / "model", world / "data")))
    assert not (tmp_path / "rm").exists()


def test_a_quantized_base_is_refused_before_the_adapter_is_read(world, tmp_path, monkeypatch):
    # merge and evaluation read the adapter's tensors before the base (its checksum first); a base that the
    # load refuses anyway (here 8-bit) is said before that read, which at 1.7B takes seconds
    q = shutil.copytree(world / "model", tmp_path / "8bit")
    c = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**c, "quantization_config": {"quant_method": "bitsandbytes",
                                                                            "load_in_8bit": True}}))
    read = rigsa.read_adapter
    def header_only(spec, tensors=True):
        assert not tensors, "the adapter's tensors were read before the base was checked"
        return read(spec, tensors=False)
    monkeypatch.setattr(rigsa, "read_adapter", header_only)
    with pytest.raises(ValueError, match=r"8bit: a bitsandbytes 8-bit checkpoint \(config.json's quantization_config"):
        cli.merge(world / "run" / "iter2", tmp_path / "merged", base=str(q), allow_other_base=True)
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device", "cpu",
                "--limit", "2", "--model", str(q), "--adapter", str(world / "run" / "iter2"), "--allow-other-base"])
    assert re.fullmatch(r"error: \S+8bit: a bitsandbytes 8-bit checkpoint \(config.json's quantization_config\).*",
                        e.value.code), e.value.code
    assert not (tmp_path / "merged").exists()


def no_load(*a, **kw):
    raise AssertionError("the base loaded before what refuses it was checked")


def evals(world, *flags):
    """evals/run.py on the world's MNIST stand-in, -> the one line it exits with."""
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device", "cpu",
                "--limit", "2", *map(str, flags)])
    return e.value.code


def lora_adapter(model, path, rank=2, peft=False):
    """An untrained LoRA adapter file of `model` (B = 0: the shapes are what count here); peft: its tensors
    named as PEFT names them ('base_model.model.' and '.default')."""
    net, _ = cli.M.load(str(model))
    cli.qlora.apply_lora(net, rank, 8)
    t = cli.qlora.lora_state_dict(net)
    if peft:
        t = {cli.qlora.PEFT_PREFIX + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in t.items()}
    AF.write(path, t, dataclasses.asdict(rigsa.Config(method="lora", model=str(model), rank=rank, lora_alpha=8)))
    return path.with_suffix("")


@pytest.mark.parametrize("method", ["rigsa", "lora", "lora, PEFT's names"])
def test_an_adapter_of_other_shapes_is_refused_before_the_base_loads(world, tmp_path, monkeypatch, method):
    # with --allow-other-base (or an adapter that records no base) the layers' shapes were compared only once
    # the base had loaded (and, for QLoRA, been quantized): minutes at 1.7B. The adapter's header and the
    # base's config.json tell them before
    other = tiny.write_tiny_checkpoint(tmp_path / "mha", shape="mha", seed=1)
    adapter = (world / "run" / "iter2" if method == "rigsa" else
               lora_adapter(world / "model", tmp_path / "l.safetensors", peft="PEFT" in method))
    monkeypatch.setattr(cli.M, "load", no_load)   # evals' qlora.load_model goes through it too
    why = ("its mask of model.layers.0.self_attn.k_proj is for a layer of about 2,048 entries, and this base's has 4,096"
           if method == "rigsa" else "model.layers.0.self_attn.k_proj.lora_B.weight has shape (32, 2), and this base's "
                                     "layer needs (64, 2)")
    want = re.escape(f"--adapter {adapter}: does not fit the base model {other} ({why}); it was made on a model of "
                     f"other shapes: use it with its base, {world / 'model'}")
    with pytest.raises(ValueError) as e:
        cli.merge(adapter, tmp_path / "merged", base=str(other), allow_other_base=True)
    assert re.fullmatch(want, str(e.value)), e.value
    assert re.fullmatch("error: " + want, evals(world, "--model", other, "--adapter", adapter, "--allow-other-base"))
    assert not (tmp_path / "merged").exists()
    if method != "rigsa":   # and on its own base, the PEFT names are read as lora_state_dict's: it fits
        _, meta, cfg = rigsa.read_adapter(adapter, tensors=False)
        mcfg = cli.M.check_checkpoint(world / "model")[0]
        cli.check_fits(adapter, cfg, meta, mcfg, world / "model", {"model": str(world / "model")})


def test_an_adapter_that_does_not_fit_its_own_base_is_said_to_be_damaged(world, tmp_path, monkeypatch):
    # the shapes differ on the very base it records: not a model of other shapes, but a damaged or edited file
    t, meta, config = AF.read(world / "run" / "iter2")
    n = "model.layers.1.mlp.down_proj"
    t[n + ".mask"] = t[n + ".mask"][:-1]
    monkeypatch.setattr(cli.M, "load", no_load)
    for name, extra in (("edited", {"base": meta["base"]}), ("older", {})):   # older: it records no base
        AF.write(tmp_path / f"{name}.safetensors", t, config, extra)
        fix = ("the file is damaged or edited: use the one its run wrote" if name == "edited" else
               "the file is damaged or edited, or was made on a model of other shapes")
        assert evals(world, "--adapter", tmp_path / name) == (
            f"error: --adapter {tmp_path / name}: does not fit the base model {world / 'model'} (its mask of {n} is "
            f"for a layer of about 8,184 entries, and this base's has 8,192); {fix}")
    del t[n + ".mask"], t[n + ".delta"], t[n + ".alpha"]
    AF.write(tmp_path / "fewer.safetensors", t, config, {"base": meta["base"]})
    with pytest.raises(ValueError, match=re.escape(f"(it has no adapter for this base's layer {n}); the file is damaged")):
        cli.merge(tmp_path / "fewer", tmp_path / "merged")


ODD = dict(vocab_size=32, hidden_size=36, num_attention_heads=2, num_key_value_heads=1, head_dim=18)   # odd widths


def test_check_fits_judges_from_the_header_what_load_adapter_would(tmp_path, monkeypatch):
    # a layer of 61 x 36 = 2,196 entries packs into ceil(2,196 / 8) = 275 bytes: a fit, not a layer of other size
    mcfg = cli.M.SmolLM2Config(intermediate_size=61, num_hidden_layers=2, **ODD)
    net = cli.M.Model(mcfg)
    cfg = rigsa.Config(model="org/odd")
    rigsa.install_adapters(net, cfg)
    rigsa.save_adapter(net, tmp_path / "a.safetensors", cfg)
    _, meta, acfg = rigsa.read_adapter(tmp_path / "a", tensors=False)
    assert AF.shapes(tmp_path / "a")["model.layers.0.mlp.up_proj.mask"] == (275,)
    (tmp_path / "merged").mkdir()
    cli.check_fits(tmp_path / "a", acfg, meta, mcfg, tmp_path / "merged", {"model": "org/odd"})
    # a damaged merge record says nothing here (merge_dtype says it where it matters); nor does an older record's
    # relative path, which named a file from the folder the merge ran in, not from this one
    (tmp_path / "merged" / "rigsa-merge.json").write_text("{oops")
    cli.check_fits(tmp_path / "a", acfg, meta, mcfg, tmp_path / "merged", {"model": "org/odd"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merged" / "rigsa-merge.json").write_text(json.dumps({"adapter": "a.safetensors"}))
    cli.check_fits(tmp_path / "a", acfg, meta, mcfg, tmp_path / "merged", {"model": "org/odd"})
    # the base is named as the user did (a hub id), not by its snapshot's folder; the layer without .lora_A.weight
    wide = cli.M.SmolLM2Config(intermediate_size=62, num_hidden_layers=2, **ODD)
    with pytest.raises(ValueError, match=r"^--adapter \S+: does not fit the base model org/wide \(its mask of "
                                         r"model.layers.0.mlp.gate_proj is for a layer of about 2,200 entries, and this base.s has 2,232\)"):
        cli.check_fits(tmp_path / "a", acfg, meta, wide, tmp_path / "merged", {"model": "org/wide"})
    one = cli.M.SmolLM2Config(intermediate_size=61, num_hidden_layers=1, **ODD)
    net = cli.M.Model(mcfg)
    cli.qlora.apply_lora(net, 2, 8)
    AF.write(tmp_path / "l.safetensors", cli.qlora.lora_state_dict(net),
             dataclasses.asdict(rigsa.Config(method="lora", model="org/odd", rank=2, lora_alpha=8)))
    _, lmeta, lcfg = rigsa.read_adapter(tmp_path / "l", tensors=False)
    with pytest.raises(ValueError, match=r"\(it adapts a layer model.layers.1.mlp.down_proj this base lacks\); it was "
                                         r"made on a model of other shapes: use it with its base, org/odd$"):
        cli.check_fits(tmp_path / "l", lcfg, lmeta, one, tmp_path / "merged", {"model": "org/one"})
    # a record from before chat_template.jinja was fingerprinted, at the base's hub commit: the same base, so the
    # file is what is wrong
    old = {"model": "org/odd", "commit": "c" * 40, "fingerprint": "f" * 16}
    have = {"model": "org/odd", "commit": "c" * 40, "fingerprint": "e" * 16, "without_template": "f" * 16}
    with pytest.raises(ValueError, match=r"; the file is damaged or edited: use the one its run wrote$"):
        cli.check_fits(tmp_path / "a", acfg, {**meta, "base": old}, wide, tmp_path / "merged", have)


def test_an_adapter_of_unquantized_weights_into_a_4bit_model_is_refused(world, monkeypatch):
    # what check_fits says from the header, load_adapter says again on a model quantized in this process
    net, _ = cli.M.load(str(world / "model"))
    monkeypatch.setattr(cli.qlora, "is_quantized", lambda m: True)
    with pytest.raises(ValueError, match=r"iter2: a rigsa adapter adds to the unquantized weights, and this base is "
                                         r"4-bit \(NF4\); drop --quantize$"):
        cli.load_adapter(net, world / "run" / "iter2")

def test_merge_out_a_link_and_a_sibling_of_the_base(world, tmp_path, monkeypatch):
    # a link to an empty folder is refused (the merge would write through it); a folder whose name merely
    # begins with the base's is not inside it
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    monkeypatch.setattr(cli.M, "load", no_load)
    with pytest.raises(FileExistsError, match=r"^--out \S+link: is a link; name a new folder"):
        cli.merge(world / "run" / "iter2", tmp_path / "link")
    monkeypatch.undo()
    src = shutil.copytree(world / "model", tmp_path / "m")
    out = cli.merge(world / "run" / "iter2", tmp_path / "m-merged", base=str(src))
    assert (out / "rigsa-merge.json").is_file() and not list(tmp_path.glob("empty/*"))


def test_a_rank_above_a_layers_width_is_refused_before_the_base_loads(world, tmp_path, monkeypatch):
    monkeypatch.setattr(rigsa.M, "load", no_load)
    monkeypatch.setattr(rigsa.qlora, "load_model", no_load)
    for method in ("lora", "qlora"):
        with pytest.raises(ValueError, match=r"^--rank 1000: above the narrowest adapted layer's width, 32; "):
            rigsa.train(rigsa.Config(out=str(tmp_path / method), method=method, rank=1000, **base(world / "model",
                                                                                                   world / "data")))
        assert not (tmp_path / method).exists()


def test_an_adapter_of_unquantized_weights_on_a_4bit_checkpoint_is_refused_before_the_load(world, tmp_path, monkeypatch,
                                                                                             capsys):
    # evals/run.py told it to "drop --quantize", a flag never typed, after the 4-bit load; merge warned
    # "applied anyway" (--allow-other-base) just before it refused the checkpoint
    q = shutil.copytree(world / "model", tmp_path / "4bit")
    c = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**c, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    monkeypatch.setattr(cli.M, "load", no_load)
    monkeypatch.setattr(R.qlora, "load_model", no_load)
    adapter = world / "run" / "iter2"
    assert evals(world, "--model", q, "--adapter", adapter, "--allow-other-base") == (
        f"error: --adapter {adapter}: a rigsa adapter adds to the unquantized weights, and {q} is a 4-bit checkpoint; "
        f"pass an unquantized base: the one it was trained on, {world / 'model'}")
    with pytest.raises(ValueError, match=r"4bit: a bitsandbytes 4-bit checkpoint"):
        cli.merge(adapter, tmp_path / "merged", base=str(q), allow_other_base=True)
    assert "applied anyway" not in capsys.readouterr().err


def test_a_non_finite_adapter_is_refused_before_the_base_loads(world, tmp_path, monkeypatch):
    # merge wrote a model of NaNs and said "the cast lost nan%"; evaluation refused only after the load and a forward
    t, meta, config = AF.read(world / "run" / "iter2")
    k = next(k for k in sorted(t) if k.endswith(".delta"))
    t[k][0] = float("nan")
    AF.write(tmp_path / "nan.safetensors", t, config, {"base": meta["base"]})
    monkeypatch.setattr(cli.M, "load", no_load)
    want = (f"{tmp_path / 'nan.safetensors'}: its tensor {k} is not finite (NaN or inf: a diverged training, or a "
            f"damaged file); use an earlier iteration's adapter, or train it again")
    with pytest.raises(ValueError) as e:
        cli.merge(tmp_path / "nan", tmp_path / "merged")
    assert str(e.value) == want
    assert evals(world, "--adapter", tmp_path / "nan") == "error: --adapter: " + want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]   # no temporary folder either
    monkeypatch.undo()   # finite tensors whose delta overflows float32: the merge itself refuses it
    net, _ = cli.M.load(str(world / "model"))
    L = rigsa.install_adapters(net, rigsa.Config())["model.layers.0.mlp.up_proj"]
    L.alpha.data.fill_(3e38)
    L.delta.data.fill_(10.0)
    with pytest.raises(ValueError, match=r"^the adapter's delta of model.layers.0.mlp.up_proj is not finite"):
        AF.merge_adapters(net)


def test_an_adapter_on_its_own_merge_is_refused(world, tmp_path, capsys):
    # --allow-other-base ("it is the same base") on a merge of this very adapter would add its delta twice
    merged = cli.merge(world / "run" / "iter2", tmp_path / "merged")
    shutil.copy(world / "run" / "iter2.safetensors", tmp_path / "copy.safetensors")
    rec = json.loads((merged / "rigsa-merge.json").read_text())
    # another adapter since written at its path (a run trained again) is not it: the checksum decides
    t, meta, config = AF.read(world / "run" / "iter2")
    AF.write(tmp_path / "again.safetensors", {k: v * 2 if k.endswith(".delta") else v for k, v in t.items()}, config,
             {"base": meta["base"]})
    (merged / "rigsa-merge.json").write_text(json.dumps({**rec, "adapter": str(tmp_path / "again.safetensors")}))
    _, ameta, acfg = rigsa.read_adapter(tmp_path / "again", tensors=False)
    cli.check_fits(tmp_path / "again", acfg, ameta, cli.M.check_checkpoint(merged)[0], merged, {"model": str(merged)})
    for adapter in (tmp_path / "copy", world / "run" / "iter2"):   # its checksum; then, in a record from before
        if adapter == world / "run" / "iter2":                       # adapter_sha256, its path (absolute)
            (merged / "rigsa-merge.json").write_text(json.dumps({**rec, "adapter_sha256": None}))
        want = (f"--adapter {adapter}: {merged} is a merge of this very adapter (its rigsa-merge.json), so it would "
                f"add its delta twice; use the base it was made on, {world / 'model'}")
        with pytest.raises(ValueError) as e:
            cli.merge(adapter, tmp_path / "twice", base=str(merged), allow_other_base=True)
        assert str(e.value) == want
        assert evals(world, "--model", merged, "--adapter", adapter, "--allow-other-base") == "error: " + want
    assert not (tmp_path / "twice").exists()


def test_a_merge_whose_out_another_process_wrote_meanwhile_keeps_nothing(world, tmp_path, monkeypatch):
    out, save = tmp_path / "merged", AF.M.save_checkpoint
    def and_another(*a, **kw):   # a second merge into --out finishes while this one writes
        save(*a, **kw)
        out.mkdir()
        (out / "theirs").write_text("x")
    monkeypatch.setattr(AF.M, "save_checkpoint", and_another)
    def a_file(*a, **kw):   # or makes it a file
        save(*a, **kw)
        out.write_text("theirs")
    monkeypatch.setattr(AF.M, "save_checkpoint", a_file)
    with pytest.raises(FileExistsError, match="another process wrote it"):
        cli.merge(world / "run" / "iter2", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and out.read_text() == "theirs"
    out.unlink()
    monkeypatch.setattr(AF.M, "save_checkpoint", and_another)
    with pytest.raises(FileExistsError, match=rf"^--out {re.escape(str(out))}: another process wrote it during this "
                                              r"merge; what is there is that process's, and nothing of this "
                                              r"merge's was kept"):
        cli.merge(world / "run" / "iter2", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and os.listdir(out) == ["theirs"]


def test_a_peft_folder_as_the_model_is_said_to_be_one(world, tmp_path):
    peft = tmp_path / "iter1-peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    want = f"--model {peft}: a PEFT adapter's folder (adapter_config.json), not a model; pass the base model as --model"
    assert evals(world, "--model", peft).startswith("error: " + want)
    with pytest.raises(ValueError, match=re.escape(want)):
        cli.merge(world / "run" / "iter2", tmp_path / "merged", base=str(peft), allow_other_base=True)
    with pytest.raises(ValueError, match=re.escape(want)):
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), **base(peft, world / "data")))


def test_a_run_directory_as_the_model_is_said_to_be_one(world, tmp_path):
    # a run's folder as --model got three other messages (train and merge: "not a Llama architecture"; evals/run.py:
    # "tokenizer file not found"), none naming the run's base or where its adapter is
    run = world / "run"
    want = (f"--model {run}: a rigsa run directory (its config.json is the run's record), not a model; pass its base "
            f"as --model ({world / 'model'}, as its training named it); its adapter {run}/iterK is evals/run.py's "
            f"--adapter, or a model to train on once merged (rigsa.py merge --adapter {run}/iterK --out DIR, then "
            f"--model DIR)")
    assert evals(world, "--model", run) == "error: " + want
    with pytest.raises(ValueError, match=re.escape(want)):
        cli.merge(run / "iter2", tmp_path / "merged", base=str(run), allow_other_base=True)
    with pytest.raises(ValueError, match=re.escape(want)):
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), **base(run, world / "data")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()
    with pytest.raises(SystemExit) as e:   # model.py knows nothing of runs, but says what the file is
        M.main(["--model", str(run), "--prompt", "hi"])
    assert e.value.code == (f"error: {run}/config.json: a training run's record, not a model's config; pass the model "
                            f"it names under \"base\", or a merge of its adapter (rigsa.py merge)")


def test_prompts_past_the_models_positions_are_refused_before_the_base_loads(world, tmp_path, monkeypatch):
    # train said nothing and trained past RoPE's range where evals/run.py refused the same model and files
    short = shutil.copytree(world / "model", tmp_path / "short")
    c = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**c, "max_position_embeddings": 64}))
    def no(*a, **kw):
        raise AssertionError("the base loaded before the prompts' length was checked")
    monkeypatch.setattr(rigsa.M, "load", no)
    with pytest.raises(ValueError, match=r"short: a Textual MNIST example \(prompt and answer\) is \d+ tokens, more than "
                                         r"the model's 64 positions; "):
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), **base(short, world / "data")))
    assert not (tmp_path / "run").exists()


def test_training_and_test_digits_of_other_sizes_are_refused(world, tmp_path):
    # a model trained (or shown shots) on 8x8 digits and tested on 28x28 ones was asked another task, without a word
    mnist.write_synthetic_mnist(tmp_path / "big" / "mnist", n_train=8, n_test=4, size=12)
    mix = tmp_path / "mix" / "mnist"
    mix.mkdir(parents=True)
    for f in mnist.MNIST_FILES:
        shutil.copy((world / "data" / "mnist" if f.startswith("train") else tmp_path / "big" / "mnist") / f, mix / f)
    said = r"mnist: the training digits are 8 x 8 pixels and the test digits 12 x 12; use the four files of one dataset"
    with pytest.raises(ValueError, match=said):
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), **base(world / "model", tmp_path / "mix")))
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--num-fewshot", "1", "--data-dir", str(tmp_path / "mix"), "--no-verify", "--offline",
                "--device", "cpu", "--limit", "2", "--model", str(world / "model")])
    assert re.search(said, e.value.code), e.value.code
    R.main(["--task", "mnist", "--data-dir", str(tmp_path / "mix"), "--no-verify", "--offline", "--device", "cpu",
            "--limit", "2", "--model", str(world / "model")])   # 0-shot reads the test digits alone


@pytest.mark.parametrize("other", ["an edited config.json", "another run's resume.pt"])
def test_a_resume_pt_and_config_json_of_two_runs_are_refused(world, tmp_path, other):
    # resume.pt holds the config it was written with: a config.json edited since, or a resume.pt copied from another
    # run, would go on training one run with the other's numbers and record the mix as one run
    kw = base(world / "model", world / "data", iters=2, halt_after=3)
    with one_thread():
        assert rigsa.train(rigsa.Config(out=str(tmp_path / "a"), lr=2e-2, **kw)) is None
        if other == "another run's resume.pt":
            assert rigsa.train(rigsa.Config(out=str(tmp_path / "b"), lr=5e-2, **kw)) is None
            shutil.copy(tmp_path / "b" / "resume.pt", tmp_path / "a" / "resume.pt")
        else:
            c = json.loads((tmp_path / "a" / "config.json").read_text())
            c["config"]["lr"] = 5e-2
            (tmp_path / "a" / "config.json").write_text(json.dumps(c))
    before = tree(tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        rigsa.main(["train", "--resume", "--out", str(tmp_path / "a"), "--offline", "--no-verify"])
    assert re.fullmatch(rf"error: \S+/a/resume.pt: written by a run with lr {0.05 if 'resume' in other else 0.02}, where "
                        rf"\S+/a/config.json has {0.02 if 'resume' in other else 0.05}: one of them was edited or copied "
                        rf"from another run; .*", e.value.code), e.value.code
    assert tree(tmp_path / "a") == before


@pytest.mark.parametrize("moments", ["device", "host"])
@pytest.mark.parametrize("edit", ["one group", "gates first", "gates reversed", "gates first, an older resume.pt"])
def test_a_resume_after_make_optimizer_was_edited_is_refused_in_one_line(world, tmp_path, monkeypatch, moments, edit):
    # resume.pt's AdamW state is the tensors' of make_optimizer's groups in their order: an edit of it between the
    # save and the resume gave torch's raw error with device moments, and with host moments put each moment on
    # whatever tensor had its index (zip and an index, unchecked). Now one line, before the run directory is touched
    kw = base(world / "model", world / "data", iters=2, halt_after=3, moments=moments)
    with one_thread():
        assert rigsa.train(rigsa.Config(out=str(tmp_path / "a"), lr=2e-2, **kw)) is None
    make = rigsa.make_optimizer

    def edited(model, cfg, moments="device"):
        opt = make(model, cfg, moments)
        deltas, gates = opt.param_groups
        groups = ([{**deltas, "params": deltas["params"] + gates["params"]}] if edit == "one group" else
                  [{**gates}, {**deltas}] if edit.startswith("gates first") else
                  [{**deltas}, {**gates, "params": gates["params"][::-1]}])   # the same counts and sizes: names tell
        edited_opt = torch.optim.AdamW(groups, lr=0.0, foreach=False)
        edited_opt.moments = moments
        return edited_opt
    monkeypatch.setattr(rigsa, "make_optimizer", edited)
    if edit.endswith("older resume.pt"):   # without the tensors' names: their counts and sizes are compared
        r = torch.load(tmp_path / "a" / "resume.pt", weights_only=False)
        del r["optimizer_names"]
        torch.save(r, tmp_path / "a" / "resume.pt")
    before = tree(tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        rigsa.main(["train", "--resume", "--out", str(tmp_path / "a"), "--offline", "--no-verify"])
    what = {"one group": r"tensors per group \[\d+, \d+\], this optimizer's \[\d+\]",
            "gates first": r"group 0's tensor 0 was \S+\.delta, here \S+\.alpha",
            "gates reversed": r"group 1's tensor 0 was model\.layers\.0\.\S+\.alpha, here model\.layers\.\d+\.\S+\.alpha",
            "gates first, an older resume.pt": r"its tensor 0 has \d+ entries, this optimizer's 1"}[edit]
    assert re.fullmatch(rf"error: resume.pt: its AdamW state does not fit the optimizer this code makes \({what}\): "
                        r"make_optimizer changed since the run was saved; resume with the code that saved it, or train "
                        r"the run again", e.value.code), e.value.code
    assert tree(tmp_path / "a") == before


def test_an_iteration_file_that_is_not_the_runs_own_is_refused(world, tmp_path, monkeypatch):
    # each iteration record names its adapter by the tensors' checksum: another run's iterK.safetensors put in a
    # run's folder (or one changed since) was kept by --resume and taken by reproduce.py's tables as this run's,
    # next to this run's accuracies
    import reproduce as P
    kw = base(world / "model", world / "data", iters=2, lr=2e-2)
    write = AF.write

    def recorded_first(path, *a):   # the file marks the iteration done: a kill between the two leaves no record-less one
        assert Path(path).stem in {f"iter{json.loads(x).get('iter')}" for x in open(Path(path).parent / "metrics.jsonl")
                                   if json.loads(x).get("event") == "iteration"}, path
        return write(path, *a)
    monkeypatch.setattr(AF, "write", recorded_first)
    with one_thread():
        assert rigsa.train(rigsa.Config(out=str(tmp_path / "a"), halt_after=3, **kw)) is None   # in iteration 2
    monkeypatch.setattr(AF, "write", write)
    it1 = tmp_path / "a" / "iter1.safetensors"
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["adapter_sha256"] for r in log if r.get("event") == "iteration"] == \
        [AF.read(it1, tensors=False)[1]["tensors_sha256"]]
    t, _, config = AF.read(it1)
    AF.write(it1, {k: v + (k == min(t)) for k, v in t.items()}, config)   # a whole adapter file, of other tensors
    before = tree(tmp_path / "a")
    said = r"\S+/a/iter1.safetensors: not the adapter this run's iteration 1 saved \(its tensors' checksum is not the " \
           r"one the run's log recorded: another run's file, or changed since\); put the run's own back"
    with pytest.raises(SystemExit) as e:
        rigsa.main(["train", "--resume", "--out", str(tmp_path / "a"), "--offline", "--no-verify"])
    assert re.fullmatch(rf"error: {said}, or move it out of \S+/a to continue the run without it", e.value.code), \
        e.value.code
    assert tree(tmp_path / "a") == before
    with pytest.raises(ValueError, match=said):
        P.run_metrics(tmp_path / "a")
    it1.rename(tmp_path / "elsewhere.safetensors")   # moved out: the run goes on without it
    with one_thread():
        log = rigsa.train(rigsa.Config(out=str(tmp_path / "a"), resume=True, **kw))
    assert [r["iter"] for r in log if r.get("event") == "iteration"] == [1, 2] and len(P.run_metrics(tmp_path / "a")) == 2
    t, _, config = AF.read(tmp_path / "a" / "iter2")   # a complete run's too
    AF.write(tmp_path / "a" / "iter2.safetensors", {k: v * (1 + (k == max(t))) for k, v in t.items()}, config)
    with pytest.raises(ValueError, match=said.replace("iter1", "iter2").replace("iteration 1", "iteration 2")):
        rigsa.train(rigsa.Config(out=str(tmp_path / "a"), resume=True, **kw))
    (tmp_path / "a" / "iter2.safetensors").write_bytes(b"cut")   # unreadable: the run's remedy, not an --adapter's
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:        # and a hand-edited record without its number: skipped
        f.write(json.dumps({"event": "iteration", "adapter_sha256": "0" * 64}) + "\n")
    with pytest.raises(ValueError, match=r"\S+/a/iter2.safetensors: not a readable safetensors file \(.*\): truncated or "
                                         r"damaged, or not an adapter; put the run's own back \(its report"):
        rigsa.train(rigsa.Config(out=str(tmp_path / "a"), resume=True, **kw))


def test_a_resume_takes_a_moved_base_by_its_new_path(world, tmp_path):
    # after moving the base the recorded path is gone: --resume --model NEW continues on the same base (its
    # identity checked), and another base is still refused
    shutil.copytree(world / "model", tmp_path / "old")
    kw = base(tmp_path / "old", world / "data", iters=2, halt_after=3)
    with one_thread():
        assert rigsa.train(rigsa.Config(out=str(tmp_path / "run"), lr=2e-2, **kw)) is None
    (tmp_path / "old").rename(tmp_path / "new")
    other = tiny.write_tiny_checkpoint(tmp_path / "other", shape="gqa", seed=5)
    args = ["train", "--resume", "--out", str(tmp_path / "run"), "--offline", "--no-verify", "--model"]
    with pytest.raises(SystemExit) as e:
        rigsa.main(args + [str(other)])
    assert "--resume" in e.value.code and "other" in e.value.code and "\n" not in e.value.code, e.value.code
    with one_thread():
        rigsa.main(args + [str(tmp_path / "new")])
    assert (tmp_path / "run" / "iter2.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["model"] == str(tmp_path / "new")


def test_chat_with_a_template_that_is_not_chatml_is_refused(world, tmp_path, capsys):
    # lm-eval's --apply_chat_template renders the model's own template; ours writes SmolLM2's ChatML, which this is not
    m = shutil.copytree(world / "model", tmp_path / "inst")
    (m / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--chat", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device",
                "cpu", "--limit", "2", "--model", str(m)])
    assert re.fullmatch(r"error: --chat: \S+chat_template.jinja: chat_template not understood .*; drop --chat \(the "
                        r"paper's plain prompts\)", e.value.code), e.value.code


def test_a_lora_scale_edited_in_the_adapters_metadata_is_refused(world, tmp_path):
    # LoRA's scale is lora_alpha / rank from the config in the file's metadata, outside the tensors' checksum: an edit
    # changed every log-likelihood without a word; the base's path stays the user's to edit (after moving the base)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with one_thread():
        rigsa.train(rigsa.Config(out=str(tmp_path / "lora"), method="lora", rank=2, lora_lr=1e-2,
                                 **base(world / "model", world / "data")))
    with safe_open(str(tmp_path / "lora" / "iter1.safetensors"), "pt") as f:
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(meta["config"])
    for name, edit in (("moved", {"model": str(tmp_path / "elsewhere")}), ("scaled", {"lora_alpha": 320.0})):
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata={**meta, "config": json.dumps({**config, **edit})})
    assert rigsa.read_adapter(tmp_path / "moved")[2].model == str(tmp_path / "elsewhere")
    for tensors in (True, False):
        with pytest.raises(ValueError, match=r"scaled.safetensors: its config's method, rank, lora_alpha do not match "
                                             r"the checksum written with them \(edited since: method 'lora', rank 2, "
                                             r"lora_alpha 320.0\); "):
            rigsa.read_adapter(tmp_path / "scaled", tensors=tensors)


def test_an_adapter_config_without_its_model_takes_the_base_it_records(world, tmp_path, capsys):
    # this version's default (the 1.7B hub id) stood in, and the base check then called it a local folder
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(world / "run" / "iter2.safetensors"), "pt") as f:
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = {k: v for k, v in json.loads(meta["config"]).items() if k != "model"}
    save_file(t, str(tmp_path / "iter2.safetensors"), metadata={**meta, "config": json.dumps(config)})
    capsys.readouterr()
    assert rigsa.read_adapter(tmp_path / "iter2")[2].model == str(world / "model")
    assert "model=" not in capsys.readouterr().err
    R.main(["--task", "mnist", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device", "cpu",
            "--limit", "2", "--adapter", str(tmp_path / "iter2")])


@pytest.mark.parametrize("flag", ["--output", "--output_path"])
def test_an_empty_output_is_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as e:   # it would run and write nothing
        R.parse_args(["--task", "mnist", flag, ""])
    assert e.value.code == 2 and f"error: {flag}: empty; name a" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1]", "{oops", b"\xff\xfe", "5"])
def test_a_damaged_merge_record_is_one_line_naming_it(tmp_path, content):
    p = tmp_path / "rigsa-merge.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(p))}: not (readable as )?rigsa.py merge's record .*; merge "
                                         f"again, or pass --dtype float32 \\(or bfloat16\\) to choose the dtype yourself$"):
        util.merge_record(p)
    p.write_text('{"dtype": "float32"}')
    assert util.merge_record(p) == {"dtype": "float32"}


def test_a_previous_result_is_replaced(world, tmp_path):
    out = tmp_path / "r.json"
    with one_thread():
        for _ in range(2):   # the second run replaces the first one's file
            R.main(["--task", "mnist", "--data-dir", str(world / "data"), "--no-verify", "--offline", "--device", "cpu",
                    "--limit", "2", "--adapter", str(world / "run" / "iter2"), "--output", str(out)])
    assert json.loads(out.read_text())["task"] == "mnist"

# ---- the demo deletes only what it wrote ----

def test_demo_deletes_only_its_own_entries(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    for d in cli.DEMO_ENTRIES[1:]:
        (out / d).mkdir(parents=True)
        (out / d / "old").write_text("an earlier demo's")
    (out / "DEMO").write_text("written by rigsa.py demo\n")
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("the user's")
    (out / "results.json").write_text("the user's")
    trained = []
    monkeypatch.setattr(rigsa, "train", lambda cfg: trained.append(sorted(os.listdir(out))) or [])   # the rest as it is
    monkeypatch.setattr(rigsa, "mnist_accuracy", lambda *a, **k: (0.1, None))
    cli.demo(str(out))
    # the old run/ gone, new data there, and the demo's LOCK while it runs
    assert trained == [["DEMO", "LOCK", "mine", "mnist", "results.json", "tiny-model"]]
    assert not (out / "LOCK").exists()
    assert (out / "mine" / "notes.txt").read_text() == (out / "results.json").read_text() == "the user's"
    assert not list(out.rglob("old")) and (out / "DEMO").exists()
    empty = tmp_path / "empty"   # an empty folder is as good as none; a folder of the user's is refused (test_cli)
    empty.mkdir()
    cli.demo(str(empty))
    assert sorted(os.listdir(empty)) == ["DEMO", "mnist", "tiny-model"]


def test_a_demo_out_that_cannot_be_made_is_named_as_out(tmp_path, monkeypatch):
    # the default --out is relative: in a working directory the user cannot write (or under a file) the demo said
    # only errno's text and the path, not which flag moves it
    (tmp_path / "file").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        rigsa.main(["demo", "--out", "file/demo"])
    assert e.value.code == "error: --out file/demo: cannot make it (Not a directory); choose another --out"
    assert (tmp_path / "file").read_text() == "the user's"


def test_demo_unlinks_a_linked_entry_and_waits_for_a_run_that_writes(tmp_path, monkeypatch):
    out, mine = tmp_path / "demo", tmp_path / "mine"
    out.mkdir()
    (out / "DEMO").write_text("written by rigsa.py demo\n")
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    (out / "run").symlink_to(mine)
    monkeypatch.setattr(rigsa, "train", lambda cfg: None)   # stopped: the demo ends there
    assert cli.demo(str(out)) is None
    assert not (out / "run").exists() and (mine / "notes.txt").read_text() == "the user's"
    (out / "run").mkdir()
    (out / "run" / "x").write_text("a run's")
    with util.lock_dir(out / "run"):   # a run writing there (here, this process) is not the demo's to delete
        with pytest.raises(FileExistsError, match="run"):
            cli.demo(str(out))
    assert (out / "run" / "x").read_text() == "a run's"

# ---- one process writes a run directory at a time ----

def launch(args, cwd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def until(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.02)


def test_one_process_writes_a_run_at_a_time_and_a_stale_lock_is_taken_over(world, tmp_path, capsys):
    out = tmp_path / "run"
    with one_thread():   # a run stopped after its first step: resume.pt there
        assert rigsa.train(rigsa.Config(out=str(out), iters=2, lr=2e-2, halt_after=1,
                                        **{**base(world / "model", world / "data"), "steps": 400})) is None
    lock = out / "LOCK"
    assert (out / "resume.pt").exists() and not lock.exists()
    first = launch([os.path.join(REPO, "rigsa.py"), "train", "--resume", "--out", str(out)], tmp_path)
    try:
        until(lambda: lock.exists() and lock.read_text().endswith("\n"), first)
        held = lock.read_text()
        with pytest.raises(SystemExit) as e:   # the second, at the same time: refused, and nothing touched
            rigsa.main(["train", "--resume", "--out", str(out)])
        assert e.value.code == (f"error: {out}: another rigsa.py (pid {first.pid}) is writing this run; wait for it, "
                                f"or delete {lock} if that process is not rigsa.py")
        assert lock.read_text() == held   # the first one's, still (the first one writes the rest meanwhile)
    finally:
        first.send_signal(signal.SIGTERM)   # it stops (in its setup or after a step), and lets go of the run
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "Traceback" not in err and not lock.exists(), err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {os.uname().nodename} 1\n")   # a run killed (SIGKILL) while it held the lock
    capsys.readouterr()
    with one_thread():
        assert rigsa.train(rigsa.Config(out=str(out), resume=True, halt_after=1)) is None
    assert capsys.readouterr().err.startswith(f"note: {lock}: stale lock of pid {dead.pid} (not running); taken over\n")
    assert not lock.exists()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps == sorted(set(steps))   # no step twice


def test_torchrun_rank_zero_holds_the_lock_for_every_rank(world, tmp_path):
    # a run locked by a live process: rank 0 is refused, and tells rank 1, which stops too (no hang)
    out = tmp_path / "run"
    with one_thread():
        rigsa.train(rigsa.Config(out=str(out), iters=2, lr=2e-2, halt_after=1, **base(world / "model", world / "data")))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "LOCK").write_text(f"{holder.pid} {os.uname().nodename}\n")
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            os.path.join(REPO, "rigsa.py"), "train", "--resume", "--out", str(out)], cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode != 0 and f"error: {out}: another rigsa.py (pid {holder.pid}) is writing this run" in p.stderr
    assert "rank 1: rank 0 could not lock" in p.stderr, p.stderr[-3000:]
    assert 'rigsa.py", line' not in p.stderr   # the ranks' own lines, no traceback (torchrun's launcher prints its own)
    assert (out / "LOCK").read_text() == f"{holder.pid} {os.uname().nodename}\n"


@pytest.mark.parametrize("case", ["no model", "--out a file", "--out in a file"])
def test_a_refused_new_run_leaves_nothing(world, tmp_path, case):
    (tmp_path / "f").write_text("the user's")
    out, model, text = {"no model": (tmp_path / "a" / "b" / "run", tmp_path / "nope", "nope: no such model"),
                        "--out a file": (tmp_path / "f", world / "model", "is a file, not a run directory"),
                        "--out in a file": (tmp_path / "f" / "run", world / "model", "cannot create it")}[case]
    with pytest.raises(OSError, match=text), one_thread():
        rigsa.train(rigsa.Config(out=str(out), **base(model, world / "data")))
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "the user's"


# ---- temporaries go on SIGTERM too ----

def held_merge(world, out, ready):
    """A merge held after the checkpoint is written into its temporary folder, before the rename."""
    return f"""if 1:
        import sys, time
        sys.path.insert(0, {REPO!r})
        import model as M, rigsa
        save = M.save_checkpoint
        def slow(*a, **k):
            save(*a, **k)
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        M.save_checkpoint = slow
        rigsa.main(["merge", "--adapter", {str(world / "run" / "iter2")!r}, "--out", {str(out)!r}])"""


def test_sigterm_during_merge_leaves_no_temporary_folder(world, tmp_path):
    # the hook holds the merge after the checkpoint is written into its temporary folder, before the rename
    out, ready = tmp_path / "merged", tmp_path / "ready"
    proc = launch(["-c", held_merge(world, out, ready)], tmp_path)
    until(ready.exists, proc)
    tmp, = tmp_path.glob(".merged.*.tmp")
    assert (tmp / "model.safetensors").stat().st_size > 0
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err == (f"SIGTERM: stopped; nothing was kept; run again with: {interrupts.python_cmd()} {REPO}/rigsa.py merge --adapter "
                   f"{world / 'run' / 'iter2'} --out {out}\n")
    assert sorted(os.listdir(tmp_path)) == ["ready"]

def test_a_signal_after_a_complete_merge_or_evaluation_changes_nothing(world, tmp_path, monkeypatch):
    # between the merge's rename and the process's end (the interpreter's teardown, stretched here): SIGTERM ended a
    # complete merge with 143 and no word, which a script reads as a failure, and its --out refuses a second try
    out, ready = tmp_path / "merged", tmp_path / "ready"
    evals = ["--task", "mnist", "--model", str(world / "model"), "--data-dir", str(world / "data"), "--no-verify",
             "--offline", "--limit", "2", "--output", str(tmp_path / "r.json")]
    for script, argv, made in (("rigsa.py", ["merge", "--adapter", str(world / "run" / "iter2"), "--out", str(out)],
                                out / "model.safetensors"),
                               ("evals/run.py", evals, tmp_path / "r.json"),    # and an evaluation's results
                               ("rigsa.py", ["train", "--model", str(world / "model"), "--data-dir", str(world / "data"),
                                             "--out", str(tmp_path / "t"), "--steps", "2", "--warmup", "1", "--iters",
                                             "1", "--batch-size", "2", "--micro-batch", "2", "--limit", "2", "--offline",
                                             "--no-verify", "--dtype", "float32", "--device", "cpu"],
                                tmp_path / "t" / "iter1.safetensors")):      # and a training's
        proc = launch(["-c", f"""if 1:
            import atexit, os, runpy, sys, time
            sys.argv, sys.path[0] = [{script!r}, *{argv!r}], {REPO!r}   # as `python {script}` sets them
            atexit.register(time.sleep, 1)   # the teardown, stretched: the signal comes in it
            atexit.register(lambda: open({str(ready)!r}, "w").close())
            runpy.run_path(os.path.join({REPO!r}, {script!r}), run_name="__main__")   # as from the shell"""], tmp_path)
        until(ready.exists, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "SIGTERM" not in err and made.exists(), (script, proc.returncode, err)
        ready.unlink()
    handlers = lambda: [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]   # noqa: E731
    before = handlers()   # a Python caller's: its own after, its sys.argv the command's or not (they were ignored)
    monkeypatch.setattr(sys, "argv", ["rigsa.py", "merge", "--adapter", str(world / "run" / "iter2"), "--out",
                                      str(tmp_path / "m2")])
    with one_thread():
        rigsa.main()
        assert handlers() == before
        R.main([a.replace("r.json", "r2.json") for a in evals])
        assert handlers() == before
        rigsa.main([x.replace(str(tmp_path / "t"), str(tmp_path / "t2")) for x in argv])   # the training, last in the loop
        assert handlers() == before
    # torchrun's ranks of a complete training still wait at the last barrier: stoppable there, not ignoring signals
    monkeypatch.setattr(util, "world", lambda: (0, 2))
    monkeypatch.setattr(util, "exit_distributed", lambda code=0: None)
    monkeypatch.setattr(rigsa, "train", lambda cfg, given=None: [])
    try:
        cli.main(argv, shell=True)
        assert signal.SIG_IGN not in handlers()
    finally:
        for sig, h in zip((signal.SIGINT, signal.SIGTERM), before):
            signal.signal(sig, h)


def test_a_killed_merges_folder_goes_with_the_next_merge_and_a_live_ones_stays(world, tmp_path, capsys):
    out, ready = tmp_path / "merged", tmp_path / "ready"
    proc = launch(["-c", held_merge(world, out, ready)], tmp_path)
    try:
        until(ready.exists, proc)
        live, = tmp_path.glob(".merged.*.tmp")
        with one_thread():   # another merge into the same folder meanwhile: the live one's folder is not its to remove
            cli.merge(world / "run" / "iter2", out)
        assert live.is_dir() and "note:" not in capsys.readouterr().err
    finally:
        proc.kill()   # SIGKILL: no cleanup runs
        proc.communicate(timeout=60)
    shutil.rmtree(out)
    (tmp_path / ".merged.mine1234.tmp").mkdir()   # look-alikes that are not a merge's: the user's, a link
    (tmp_path / ".merged.mine1234.tmp" / "notes.txt").write_text("the user's")
    (tmp_path / "data").mkdir()
    (tmp_path / ".merged.abcdefgh.tmp").symlink_to(tmp_path / "data")
    with one_thread():
        cli.merge(world / "run" / "iter2", out)
    assert capsys.readouterr().err == f"note: {live}: the temporary folder of a killed merge into {out}; removed\n"
    assert sorted(os.listdir(tmp_path)) == [".merged.abcdefgh.tmp", ".merged.mine1234.tmp", "data", "merged", "ready"]
    assert (tmp_path / ".merged.mine1234.tmp" / "notes.txt").read_text() == "the user's"
    assert not list(out.glob(".rigsa-merge*"))   # the mark of a merge in progress is not in the checkpoint


# ---- new files and folders get the umask's modes ----

@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_have_the_modes_the_umask_says(world, tmp_path, mask):
    old = os.umask(mask)
    try:
        with one_thread():
            rigsa.train(rigsa.Config(out=str(tmp_path / "lora"), method="lora", rank=2, lora_lr=5e-2,
                                     **base(world / "model", world / "data")))
            cli.merge(tmp_path / "lora" / "iter1", tmp_path / "merged")
    finally:
        os.umask(old)
    made = [tmp_path / "lora", tmp_path / "lora" / "iter1.safetensors", tmp_path / "lora" / "iter1-peft",
            tmp_path / "merged"]
    made += [p for d in ("lora", "merged") for p in (tmp_path / d).rglob("*")]
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in made} == \
        {str(p.relative_to(tmp_path)): oct((0o777 if p.is_dir() else 0o666) & ~mask) for p in made}
    assert {p.name for p in (tmp_path / "merged").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_an_empty_out_made_in_python_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # '' would be the current directory: not even its stale LOCK is touched
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(f"{dead.pid} {os.uname().nodename} 1\n")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="^--out: empty; name a folder$"):
        rigsa.train(rigsa.Config(out=""))
    assert tree(tmp_path) == before


def test_an_adapter_whose_run_saved_an_empty_out_still_reads(world, tmp_path):
    # earlier versions took --out '' (the current directory): what such a run saved stays readable
    from lib import adapter_files as AF
    t, meta, config = AF.read(world / "run" / "iter2")
    AF.write(tmp_path / "old.safetensors", t, {**config, "out": "", "data_dir": ""},
             {k: v for k, v in meta.items() if k not in ("format", "config", "tensors_sha256")})
    assert rigsa.read_adapter(tmp_path / "old")[2].out == ""
