"""Tests for per-decoder-layer activation checkpointing (model.Model.checkpoint_layers) and its
place in the training-memory estimate (memory.saved_bytes, memory.memory_plan). CPU only, tiny
checkpoints written by the tests."""
import contextlib
import json

import pytest
import torch

import model as M
import qlora
import rigsa
from lib import memory
from lib import tiny

NO_AMP = contextlib.nullcontext()


def rows_of(tok, lengths):
    """Textual-MNIST-like rows: right padded to the longest, the last two tokens supervised."""
    rows = [tok.encode("The digit is " + "7" * n) for n in lengths]
    return [(r, [len(r) - 2, len(r) - 1]) for r in rows]


def grads(m, rows, tok, amp):
    """Every trainable tensor's gradient after one effective batch (two micro-batches)."""
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)   # LoRA's dropout: the same masks in both runs, the recomputation replays them
    rigsa.accumulate(m, rows, 2, tok.pad_id, "cpu", amp)
    return [p.grad.clone() for p in m.parameters() if p.requires_grad]


# (adapter, base weights' dtype, bfloat16 autocast)
CASES = [("rigsa", torch.float32, False), ("rigsa", torch.float32, True), ("rigsa-pruned", torch.float32, False),
         ("rigsa-pruned", torch.bfloat16, True), ("lora", torch.float32, False), ("lora", torch.float32, True),
         ("lora", torch.bfloat16, True)]


@pytest.mark.parametrize("adapter,dtype,autocast", CASES)
def test_checkpointed_gradients_are_bitwise_the_plain_ones(tiny_dir, adapter, dtype, autocast):
    m, tok = M.load(tiny_dir, dtype=dtype)
    if adapter == "lora":
        torch.manual_seed(0)
        for p in qlora.apply_lora(m, 4, 32, dropout=0.1):   # B nonzero too, so that A has a gradient
            p.data.normal_(0, 0.1)
        m.train()
    else:
        layers = rigsa.install_adapters(m, rigsa.Config())
        if adapter == "rigsa-pruned":   # a mask: the layer reads it again in the recomputation
            rigsa.prune(layers, 0.5)
            assert all(L.mask is not None for L in layers.values())
    amp = torch.autocast("cpu", torch.bfloat16) if autocast else NO_AMP
    rows = rows_of(tok, (1, 6, 3))
    plain = grads(m, rows, tok, amp)
    m.checkpoint_layers = True
    ckpt = grads(m, rows, tok, amp)
    assert len(plain) == len(ckpt) > 0 and all(g.abs().sum() > 0 for g in plain)
    assert all(a.dtype == b.dtype and a.equal(b) for a, b in zip(plain, ckpt))


def hooked_saved(fn, inputs=()):
    """Bytes of the storages autograd saves while fn() runs (parameters, buffers and `inputs` not
    counted; each storage once), and fn()'s result."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for p, n in seen.items() if p not in inputs), out


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):   # six layers: what checkpointing saves shows against what it drops
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny6"), shape="gqa", seed=0, num_hidden_layers=6)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_estimate_matches_what_autograd_saves(deep_dir, checkpoint):
    m, tok = M.load(deep_dir)
    rigsa.install_adapters(m, rigsa.Config())
    own = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    T = 200
    plain = memory.saved_bytes(m, T, "cpu", NO_AMP, checkpoint=False)
    if checkpoint:   # at a longer sequence the layers' inputs are a fraction of their activations
        assert memory.saved_bytes(m, T, "cpu", NO_AMP, checkpoint=True) < plain / 3
    m.checkpoint_layers = checkpoint
    est = memory.memory_plan(m, rigsa.adapters(m), "cpu", NO_AMP, 2 * T)["device"]["activations"]
    assert m.checkpoint_layers is checkpoint   # the estimate leaves the flag as it was

    # what a real micro-batch of two sequences saves, and, checkpointed, what the last layer saves
    # again when the backward recomputes it (the layer run by hand on the inputs it was given)
    rows = [([7 + (i + j) % 90 for j in range(T)], [T - 2, T - 1]) for i in range(2)]
    given = []
    hook = m.model.layers[-1].register_forward_pre_hook(lambda mod, args: given.append(args))
    with torch.enable_grad():
        saved, (loss, _) = hooked_saved(lambda: rigsa.batch_loss(m, rows, tok.pad_id, "cpu"), own)
        hook.remove()
        loss.backward()
        if checkpoint:
            args = given[0]
            again, _ = hooked_saved(lambda: m.model.layers[-1](*args), own | {a.untyped_storage().data_ptr()
                                                                              for a in args if torch.is_tensor(a)})
            saved += again
    assert est == pytest.approx(saved, rel=0.005)
    if not checkpoint:
        assert saved == pytest.approx(plain * 2, rel=0.005)


def test_a_run_with_checkpointing_trains_the_same_adapters_and_may_resume_without(tiny_dir, tmp_path, monkeypatch):
    # the flag changes how the step runs, not what it computes: a run halted without it and continued
    # with it (--resume may change it) ends with the plain run's adapters, bit for bit; and it does
    # reach the model: the decoder layers are checkpointed in the continued part only
    import torch.utils.checkpoint as C
    from lib import mnist
    from conftest import one_thread
    from test_rigsa import tiny_cfg
    from safetensors.torch import load_file
    calls, checkpoint = [], C.checkpoint
    monkeypatch.setattr(C, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=8, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / "plain")))
        assert rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / "ckpt"), halt_after=3)) is None
        assert not calls
        rigsa.train(rigsa.Config(out=str(tmp_path / "ckpt"), resume=True, checkpoint_activations=True))
    assert calls
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["config"]["checkpoint_activations"] is True
    for k in (1, 2):
        a, b = (load_file(tmp_path / d / f"iter{k}.safetensors") for d in ("plain", "ckpt"))
        assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a), k


def test_lora_dropout_draws_the_same_masks_with_checkpointing(tiny_dir, tmp_path):
    # the memory estimate's forward passes (more of them with checkpointing) leave the run's random
    # state alone, so --lora-dropout's masks, and the adapters, are the plain run's
    from lib import mnist
    from conftest import one_thread
    from test_rigsa import tiny_cfg
    from safetensors.torch import load_file
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=24, n_test=4, size=8)
    with one_thread():
        for ckpt in (False, True):
            rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / str(ckpt)), method="lora", lora_dropout=0.3,
                                 checkpoint_activations=ckpt))
    a, b = (load_file(tmp_path / str(c) / "iter1.safetensors") for c in (False, True))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
