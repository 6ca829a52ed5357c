"""Every number reaches what it governs: the paper's defaults, the LoRA baseline's own (Table 4), the
flags that are off by default (--grad-clip, --lora-dropout), the supervised tokens, the statistics a
pruning records, the checksum's header. Each test here was written against a mutant that every other
test let through (the code broken on purpose: a default, a swapped flag, a dropped term)."""
import json
import math

import pytest
import torch

import model as M
import qlora
import rigsa
from lib import adapter_files as AF
from lib import memory
from lib import mnist
from conftest import one_thread
from evals import tasks as T
from test_rigsa import hand_layers, set_dense, tiny_cfg


def test_the_papers_numbers_are_the_defaults():
    # §3.2 alpha 1e-6; §4.4 lr 2e-3, 1000 warmup steps, batch 16 (micro-batch 1), weight decay 1.0 on dW only,
    # keep 80%, 5 iterations, 1 epoch; §5.3 Table 4: rank 16 (of 1/4/8/16), alpha 32, dropout 0, lr 2e-4,
    # weight decay 0.1, 4 epochs
    c = rigsa.Config()
    assert (c.alpha_init, c.lr, c.warmup, c.batch_size, c.micro_batch, c.weight_decay, c.keep, c.iters, c.epochs) == \
        (1e-6, 2e-3, 1000, 16, 1, 1.0, 0.8, 5, 1.0)
    assert (c.rank, c.lora_alpha, c.lora_dropout, c.lora_lr, c.lora_weight_decay, c.lora_epochs) == \
        (16, 32.0, 0.0, 2e-4, 0.1, 4.0)
    assert rigsa.TABLE4["ranks"] == (1, 4, 8, 16) and not c.decay_gate


def test_each_methods_weight_decay_reaches_adamw(tiny_dir):
    m, _ = M.load(tiny_dir)
    rigsa.install_adapters(m, rigsa.Config())
    opt = rigsa.make_optimizer(m, rigsa.Config())
    assert [g["weight_decay"] for g in opt.param_groups] == [1.0, 0.0]   # dW decayed, the gate not (§4.4)
    m, _ = M.load(tiny_dir)
    qlora.attach(m, False, 0, 2, 32.0, 0.0)
    opt = rigsa.make_optimizer(m, rigsa.Config(method="lora", weight_decay=1.0, lora_weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]        # Table 4's, not RIGSA's


def test_a_lora_run_takes_its_own_learning_rate_and_epochs(tiny_dir, tmp_path):
    # --lora-lr and --lora-epochs (Table 4), not RIGSA's --lr and --epochs, set the LoRA baseline's schedule
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, method="lora", rank=2, lora_lr=1e-2, lora_epochs=2.0,   # --lr and --epochs: defaults
                   steps=0, warmup=1, val_frac=0.0, batch_size=4)
    with one_thread():
        log = rigsa.train(cfg)
    steps = [r for r in log if "lr" in r]
    assert len(steps) == math.ceil(12 * 2.0 / 4)                                   # 2 epochs of 12 images, 4 a step
    assert steps[0]["lr"] == pytest.approx(rigsa.get_lr(0, len(steps), 1, 1e-2))   # the peak is --lora-lr's


def test_grad_clip_bounds_the_norm_adamw_sees(tiny_dir, tmp_path, monkeypatch):
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    norms, step = [], memory.adamw_step
    def seen(opt):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(opt)
    monkeypatch.setattr(memory, "adamw_step", seen)
    with one_thread():
        for clip in (0.0, 1e-3):
            rigsa.train(tiny_cfg(tiny_dir, tmp_path, out=str(tmp_path / f"c{clip}"), iters=1, steps=1, grad_clip=clip))
    assert norms[0] > 1e-2 and norms[1] == pytest.approx(1e-3, rel=1e-4), norms


def test_lora_dropout_acts_in_training_only(tiny_dir):
    m, tok = M.load(tiny_dir)
    qlora.attach(m, False, 0, 2, 32.0, 0.5)
    for p in m.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[1] == 2:   # lora_B (out, rank): not zero, so the path counts
            p.data.normal_()
    x = torch.tensor([tok.encode("The digit is 7")])
    m.train()
    assert not torch.equal(m(x), m(x))                             # a mask drawn per forward
    m.eval()
    assert torch.equal(m(x), m(x))


def test_the_answer_digit_and_the_turns_end_are_supervised(tiny_dir):
    # §4.2: the loss covers the digit after "The digit is " and the <|im_end|> that closes the turn
    _, tok = M.load(tiny_dir)
    digits, eos = rigsa.digit_ids(tok), rigsa.end_id(tok)
    ids, sup = rigsa.encode_example(tok, torch.zeros(8, 8, dtype=torch.uint8), 7, digits, eos)
    assert sup == [len(ids) - 2, len(ids) - 1] and ids[sup[0]] == digits[7] and ids[sup[1]] == eos
    assert ids[:-2] == tok.encode(rigsa.prompt(tok, torch.zeros(8, 8, dtype=torch.uint8)))


def test_a_prunings_density_counts_every_entry_of_the_layers():
    # the records' density (metrics.jsonl, "density now ...") is kept / all entries, falling 80%, 64%, ...
    layers = hand_layers()
    densities = []
    for _ in range(2):
        for L in layers.values():   # every free entry keeps its sign: all eligible
            set_dense(L, L.init_delta() * 2, free=L.dense() != 0 if L.mask is not None else None)
        densities.append(rigsa.prune(layers, keep=0.5)["density"])
    assert densities == [0.5, 0.25]


def test_an_exactly_zero_dw_has_not_kept_its_sign():
    L = hand_layers(((1, 4),))["l0"]
    d = L.init_delta() * 2
    d[0, 1] = 0.0
    set_dense(L, d)
    assert rigsa.eligible(L).tolist() == [True, False, True, True]


def test_the_checksum_covers_each_tensors_dtype_and_shape():
    t = torch.arange(8, dtype=torch.float32)
    same = AF.checksum({"a": t})
    assert AF.checksum({"a": t.view(torch.int32)}) != same and AF.checksum({"a": t.view(2, 4)}) != same
    assert AF.checksum({"b": t}) != same and AF.checksum({"a": t.clone()}) == same


def test_gsm8k_stops_where_lm_eval_does():
    # lm-eval 0.4.x's gsm8k.yaml: generation_kwargs.until (the evaluation adds the tokenizer's end token besides)
    assert T.GSM8K_UNTIL == ["Question:", "</s>", "<|im_end|>"]


def test_eight_bit_moments_take_the_bytes_the_estimate_counts(tiny_dir):
    # the memory estimate's 8-bit moments: two uint8 codes and a float32 absmax per 256 entries, per trainable entry
    m, _ = M.load(tiny_dir)
    rigsa.install_adapters(m, rigsa.Config())
    opt = rigsa.make_optimizer(m, rigsa.Config(), moments="8bit")
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    memory.adamw_step(opt)
    held = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
               if torch.is_tensor(t) and k != "step")
    n = sum(p.numel() for p in params)
    assert held == pytest.approx(n * memory.MOMENT_BYTES["8bit"], rel=0.02), (held, n)


def test_every_process_compares_its_flags_data_and_base(tiny_dir, tmp_path, monkeypatch):
    # torchrun: what each process was given and read is compared with rank 0's before the run is written
    # (tests/test_distributed.py launches two with other flags); here, that train hands over all of it
    from lib import util
    mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    seen, same = [], util.same_on_every_rank
    monkeypatch.setattr(util, "same_on_every_rank", lambda settings: seen.append(settings) or same(settings))
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, tmp_path, steps=1, iters=1))
    assert seen[0]["--limit"] == 8 and seen[0]["--data-dir"] == str(tmp_path) and len(seen[0]) == len(vars(rigsa.Config()))
    assert sorted(seen[1]) == ["base model", "data files"] and len(seen[1]["data files"]) == 4 \
        and seen[1]["base model"]["fingerprint"] == M.base_identity(tiny_dir)["fingerprint"]
    with pytest.raises(ValueError, match=r"^torchrun: the processes were not given the same --lr \(0.1 on rank 0, 0.2 on "
                                         r"rank 1\); data files \(\{'a': 1\} on rank 0, \{'a': 2\} on rank 1\); every "):
        monkeypatch.setattr(util, "world", lambda: (0, 2))
        monkeypatch.setattr(util, "gather", lambda part: part + [part[0].replace("0.1", "0.2").replace("1}", "2}")])
        same({"--lr": 0.1, "data files": {"a": 1}, "--seed": 3})
    # a setting that rank 0 has and another lacks (nodes on two versions of the code): said as well
    monkeypatch.setattr(util, "gather", lambda part: part + [json.dumps({"--lr": 0.1})])
    with pytest.raises(ValueError) as e:
        same({"--lr": 0.1, "--seed": 3})
    assert str(e.value) == ("torchrun: the processes were not given the same --seed (3 on rank 0, None on rank 1); "
                            "every process must run the same command, on every node")
