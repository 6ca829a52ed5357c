"""Tests for rigsa: CPU only, no network, tiny checkpoints written by the tests (conftest.py).
Correctness is parity with transformers (a test-only reference) plus invariants."""
import json
import platform
import shutil

import pytest
import torch

import model as M

# ---- model.py: parity with transformers, cache and padding invariants, loader errors ----

def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def left_pad(rows, pad_id):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, am


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_mha_dir"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ref = hf_model(path)
    m, tok = M.load(path)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rows = [tok.encode("The digit is 7. Question: How do I"), tok.encode("Answer: 12 34")]
    ids, am = left_pad(rows, tok.pad_id)
    with torch.no_grad():
        ours = m(ids, am)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
        single = ref(input_ids=torch.tensor([rows[0]])).logits
    real = am.bool()
    assert (ours - theirs)[real].abs().max() <= 1e-4
    assert (m(torch.tensor([rows[0]])) - single).abs().max() <= 1e-4


def test_bf16_logits_match_transformers_bitwise(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    m, tok = M.load(tiny_dir, dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("Below is a digit as text. Which digit is it? 0123")])
    with torch.no_grad():
        assert torch.equal(m(ids), ref(input_ids=ids).logits)


def test_padded_row_equals_row_alone(tiny_dir):
    m, tok = M.load(tiny_dir)
    a, b = tok.encode("the of and to 5"), tok.encode("Question: How do I 1 2 3 4 5 6 7")
    ids, am = left_pad([a, b], tok.pad_id)
    with torch.no_grad():
        batch = m(ids, am)
        alone = m(torch.tensor([a]))
    assert (batch[0, -len(a):] - alone[0]).abs().max() < 1e-5
    # right padding too: positions are per row
    ids_r = torch.tensor([a + [tok.pad_id] * (len(b) - len(a)), b])
    am_r = torch.tensor([[1] * len(a) + [0] * (len(b) - len(a)), [1] * len(b)])
    with torch.no_grad():
        assert (m(ids_r, am_r)[0, :len(a)] - alone[0]).abs().max() < 1e-5


def test_cached_greedy_equals_full_forward(tiny_dir):
    m, tok = M.load(tiny_dir)
    prompts = [tok.encode("The digit is"), tok.encode("Question: How do I 3 4")]
    cached = M.generate_ids(m, prompts, 12, eos_id=-1)
    for p, got in zip(prompts, cached):
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        assert got == ids[len(p):]


def test_packed_rows_equal_rows_alone(tiny_dir):
    # a | b c1 | c2 in one row: sequence a, then b followed by two alternative continuations that
    # both start at position len(b) and do not see each other. A (B, T, T) mask and explicit
    # positions make each part equal to its own row alone (harness.score_shared's layout)
    m, tok = M.load(tiny_dir)
    a, b = tok.encode("the of and to 5"), tok.encode("Question: How do I 1 2")
    c1, c2 = tok.encode(" 7 8 9"), tok.encode(" the digit")
    n, k = len(a), len(b)
    ids = torch.tensor([a + b + c1 + c2])
    pos = torch.tensor([list(range(n)) + list(range(k)) + list(range(k, k + len(c1))) + list(range(k, k + len(c2)))])
    seg = torch.tensor([0] * n + [1] * (k + len(c1) + len(c2)))
    br = torch.tensor([0] * (n + k) + [1] * len(c1) + [2] * len(c2))
    ar = torch.arange(len(seg))
    mask = (seg[:, None] == seg[None]) & (ar[:, None] >= ar[None]) & ((br[None] == 0) | (br[:, None] == br[None]))
    with torch.no_grad():
        out = m(ids, mask[None], position_ids=pos)[0]
        assert (out[:n] - m(torch.tensor([a]))[0]).abs().max() < 1e-5
        assert (out[n:n + k + len(c1)] - m(torch.tensor([b + c1]))[0]).abs().max() < 1e-5
        assert (out[n + k + len(c1):] - m(torch.tensor([b + c2]))[0, k:]).abs().max() < 1e-5
        with pytest.raises(ValueError, match="position_ids"):
            m(ids, mask[None])


def test_ragged_cache_decode_equals_rows_alone(tiny_dir, tiny_mha_dir, monkeypatch):
    # prompts of five lengths decode side by side, each at its own next slot, in groups of 2 rows
    # that each read only their own longest row's slots; every row equals its greedy run alone,
    # and its cached logits equal a full forward pass (GQA like 135M/360M, MHA like 1.7B)
    monkeypatch.setattr(M, "DECODE_GROUP", 2)
    for d in (tiny_dir, tiny_mha_dir):
        m, tok = M.load(d)
        prompts = [tok.encode(s) for s in ["Question: How do I 1 2 3 4 5 6", "The digit is", "Answer: 7",
                                           "the of and to in is that for it", "5"]]
        got = M.generate_ids(m, prompts, 6, eos_id=-1)
        assert got == [M.generate_ids(m, [p], 6, eos_id=-1)[0] for p in prompts]
        cache = M.KVCache(m.config, len(prompts), 40, "cpu", torch.float32)
        with torch.no_grad():
            for i, p in enumerate(prompts):
                m(torch.tensor([p]), cache=cache.row(i))
            step = m(torch.tensor([[g[0]] for g in got]), cache=cache)[:, 0]           # (B, V)
            for p, g, row in zip(prompts, got, step):
                assert (row - m(torch.tensor([p + g[:1]]))[0, -1]).abs().max() < 1e-5
        assert cache.len.tolist() == [len(p) + 1 for p in prompts]
        with pytest.raises(ValueError, match="empty rows"):   # a second multi-token input
            m(torch.tensor([[5, 6]] * len(prompts)), cache=cache)
    cache = M.KVCache(m.config, 2, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="padding"):
        m(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 1]]), cache=cache)


def test_rows_that_stop_leave_the_batch_without_disturbing_the_rest(tiny_dir, monkeypatch):
    # rows stop at different steps (a stop function, or the end token) and leave the batch: a
    # block's last live row moves into each place that opens before it (KVCache.drop). Every row
    # still equals its greedy run alone, cut where it stopped
    monkeypatch.setattr(M, "DECODE_GROUP", 3)
    m, tok = M.load(tiny_dir)
    prompts = [tok.encode(s) for s in ["Question: How do I 1 2 3 4 5 6", "The digit is", "Answer: 7",
                                       "the of and to in is that for it", "5", "Question: 9 8", "The"]]
    alone = [M.generate_ids(m, [p], 7, eos_id=-1)[0] for p in prompts]
    stop_after = [2, 7, 1, 5, 3, 7, 4]
    got = M.generate_ids(m, prompts, 7, eos_id=-1, stop_fn=lambda i, new: len(new) >= stop_after[i])
    assert got == [a[:k] for a, k in zip(alone, stop_after)]
    eos = alone[0][3]   # a token some row emits: rows stop before its first occurrence
    got = M.generate_ids(m, prompts, 7, eos_id=eos)
    assert got == [a[:a.index(eos)] if eos in a else a for a in alone]
    # the move itself: blocks [0, 3) and [3, 5); rows 0 and 4 leave, row 2 takes row 0's place
    cache = M.KVCache(m.config, 5, 8, "cpu", torch.float32)
    for r in range(5):
        cache.len[r] = r + 1
        for buf in cache.k + cache.v:
            buf[r, :, :r + 1] = r
    assert cache.drop([0, 4]) == {2: 0}
    assert cache.live() == [0, 1, 3] and cache.blocks == [[0, 2], [3, 1]]
    assert cache.len[0] == 3 and all(bool((buf[0, :, :3] == 2).all()) for buf in cache.k + cache.v)
    with pytest.raises(ValueError, match="live rows"):
        m(torch.tensor([[5]] * 5), cache=cache)


def test_keep_freed_memory_settings_take_on_glibc():
    # both mallopt options must be accepted (a wrong option number or value returns 0); the speed
    # it buys (no page faults per forward pass) is measured by bench/bench_evals.py, not here
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("libc is not glibc")
    assert M.keep_freed_memory()


def test_progress_bar_in_a_log_prints_the_final_line_once(monkeypatch, capsys):
    # stderr captured = not a terminal: one line per 30 s, and the close; a job shorter than that
    # prints its close only (it used to print the same final line twice)
    monkeypatch.delenv("RIGSA_NO_PROGRESS", raising=False)
    bar = M.progress(total=3, desc="docs", unit="doc")
    bar.update(2)
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "docs" in lines[0] and "3/3" in lines[0] and "doc/s" in lines[0]
    # a line drawn at the end (an update after 30 s) is not repeated by close()
    bar = M.progress(total=2, desc="gen", unit="seq")
    bar.update(1)
    bar.last = 0.0   # as if 30 s had passed
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "2/2" in lines[0]


def test_generate_stops_each_row_independently(tiny_dir):
    m, tok = M.load(tiny_dir)
    prompts = ["The digit is", "Answer: The answer is 42 and"]
    free = M.generate(m, tok, prompts, 16, progress_bar=False)
    stop = free[0][3:6]  # a stop string that occurs in row 0's continuation
    assert stop and stop in free[0]
    got = M.generate(m, tok, prompts, 16, stop=[stop], batch_size=2, progress_bar=False)
    assert got[0] == free[0].split(stop)[0]
    assert got[1] == free[1].split(stop)[0]
    assert got == [M.generate(m, tok, [p], 16, stop=[stop], progress_bar=False)[0] for p in prompts]


def test_tokenizer_matches_file_pipeline(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    tok = M.load_tokenizer(tiny_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    for s in ["a\n\n5", "0  1", "The digit is 7", "<|im_start|>user\nHi<|im_end|>\n", "12345 héllo  wörld"]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    # digits are single tokens, also after several whitespace characters
    assert len(tok.encode("0123456789")) == 10
    assert tok.encode("a  5")[-1] == tok.encode("5")[0]


def test_chat_renders_smollm2_template(tiny_dir):
    tok = M.load_tokenizer(tiny_dir)
    sys_ = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tok.chat([{"role": "user", "content": "Hello"}]) == \
        sys_ + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"}]) == \
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    ref.chat_template = M.CHAT_TEMPLATE
    for add in (True, False):
        assert tok.chat(msgs, add) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)


def test_config_rope_theta_locations(tiny_dir, tmp_path):
    d = json.loads((tiny_dir / "config.json").read_text())
    theta = d.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps({**d, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}))
    assert M.SmolLM2Config.from_json(tmp_path / "config.json").rope_theta == theta
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_theta"):
        M.SmolLM2Config.from_json(tmp_path / "config.json")


def test_presets_count_parameters():
    with torch.device("meta"):
        n = {k: sum(p.numel() for p in M.Model(c).parameters()) for k, c in M.PRESETS.items()}
    assert n == {"SmolLM2-135M-Instruct": 134_515_008, "SmolLM2-360M-Instruct": 361_821_120,
                 "SmolLM2-1.7B-Instruct": 1_711_376_384}


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_tensors(fn):
    def edit(d):
        from safetensors.torch import load_file, save_file
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, str(d / "model.safetensors"))
    return edit


@pytest.mark.parametrize("edit,msg", [
    (_edit_tensors(lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")), "'model.layers.1.mlp.up_proj.weight' missing"),
    (_edit_tensors(lambda sd: sd.update(extra=torch.zeros(2))), "unexpected tensor 'extra'"),
    (_edit_tensors(lambda sd: sd.update({"model.norm.weight": torch.ones(3)})), r"model.safetensors: tensor 'model.norm.weight' has shape \(3,\)"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "model.safetensors: corrupt or truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: checkpoint file not found"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})),
     "not a Llama architecture"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: tokenizer file not found"),
])
def test_loader_errors_name_the_thing(tiny_dir, tmp_path, edit, msg):
    d = broken_copy(tiny_dir, tmp_path / "ckpt", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        M.load(d)


def test_hub_unreachable_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match="no-such-org/no-such-model: cannot download"):
        M.load("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        M.load(str(tmp_path / "missing"))


def test_sharded_checkpoint_loads_like_single(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = broken_copy(tiny_dir, tmp_path / "sharded", lambda d: None)
    sd = load_file(d / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for f, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / f))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    a, tok = M.load(tiny_dir)
    b, _ = M.load(d)
    ids = torch.tensor([tok.encode("Question: 12")])
    assert torch.equal(a(ids), b(ids))


# ---- rigsa.py: method and training ----
# Textual MNIST, the gated sparse adapter, IMP, the training loop, resume, merge (paper §3.2, §4.2, §4.4).
import contextlib
import math

import torch.nn as nn

import rigsa


@contextlib.contextmanager
def one_thread():
    # tiny models are dominated by per-op overhead, which extra threads only add to
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_cfg(tiny_dir, tmp, **kw):
    base = dict(model=str(tiny_dir), out=str(tmp / "run"), data_dir=str(tmp / "mnist"), device="cpu",
                iters=2, steps=4, warmup=2, lr=2e-2, batch_size=4, micro_batch=2, val_frac=0.1,
                eval_max=8, log_every=1, save_every=0, download=False)
    base.update(kw)
    return rigsa.Config(**base)


def test_get_lr_endpoints():
    lr = lambda s: rigsa.get_lr(s, 100, 10, 2e-3)
    assert lr(0) == pytest.approx(2e-4) and lr(9) == pytest.approx(2e-3) and lr(10) == pytest.approx(2e-3)
    assert lr(99) == pytest.approx(2e-3 / 90) and lr(100) == 0.0 and lr(1000) == 0.0
    assert all(lr(s) >= lr(s + 1) for s in range(10, 100))


def test_quantizer_idx_and_split(tmp_path):
    img = torch.tensor([[0, 25, 26, 255], [128, 127, 230, 231]], dtype=torch.uint8)
    assert rigsa.to_text(img) == "0019\n5489"  # floor(p * 10 / 256)
    d = rigsa.write_synthetic_mnist(tmp_path / "m", n_train=100, n_test=10, size=8)
    x, y = rigsa.load_mnist(d, "train")
    xv, yv = rigsa.load_mnist(d, "val")
    xt, _ = rigsa.load_mnist(d, "test")
    assert x.shape == (99, 8, 8) and xv.shape == (1, 8, 8) and xt.shape == (10, 8, 8) and x.dtype == torch.uint8
    assert rigsa.load_mnist(d, "val")[0].equal(xv)  # deterministic by seed
    assert rigsa.read_idx(d / "train-images-idx3-ubyte.gz", 2051).shape == (100, 8, 8)
    with pytest.raises(ValueError, match="magic"):
        rigsa.read_idx(d / "train-labels-idx1-ubyte.gz", 2051)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*data|put them"):
        rigsa.load_mnist(tmp_path / "empty", "train", download=False)


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
    L = layers["model.layers.0.self_attn.q_proj"]
    bound = 1 / math.sqrt(L.in_features)
    assert L.delta.abs().max() <= bound and L.delta.abs().max() > 0.9 * bound and L.alpha.item() == pytest.approx(1e-6)
    out = m(x)
    assert not out.equal(base) and (out - base).abs().max() < 1e-3   # only the alpha term differs
    for L in layers.values():
        L.alpha.data.zero_()
    assert m(x).equal(base)                                           # alpha = 0: exactly the base model
    h = torch.randn(3, L.in_features)
    L.alpha.data.fill_(0.5)
    torch.testing.assert_close(L(h), h @ L.weight.T + 0.5 * h @ L.delta.T)


def hand_layers(shapes=((2, 4), (2, 4))):
    """Layers whose dW is set by hand relative to their regenerated dW0."""
    layers = {}
    for i, (o, n) in enumerate(shapes):
        layers[f"l{i}"] = rigsa.GatedSparseLinear(nn.Linear(n, o, bias=False), init_seed=i)
    return layers


def test_prune_sign_flips_counts_rewind_and_scope():
    for scope in ("global", "layer"):
        layers = hand_layers()
        d0 = {n: L.init_delta() for n, L in layers.items()}
        # layer 0: large final magnitudes, two entries flipped; layer 1: small magnitudes, one flipped
        s0 = torch.tensor([[10., 9, 8, 7], [6, 5, -4, -3]])
        s1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, -0.8]])
        for (n, L), s in zip(layers.items(), (s0, s1)):
            L.delta.data = d0[n].sign() * s   # |dW| = s, sign flipped where s < 0
        st = rigsa.prune(layers, keep=0.5, scope=scope)
        m0, m1 = layers["l0"].mask, layers["l1"].mask
        assert st["eligible"] == 13 and st["sign_flip"] == pytest.approx(3 / 16)
        if scope == "global":  # round(0.5 * 13) = 6 largest of all: 10, 9, 8, 7, 6, 5
            assert m0.tolist() == [[True] * 4, [True, True, False, False]] and not m1.any()
        else:                  # per layer: round(0.5 * 6) = 3 and round(0.5 * 7) = 4
            assert m0.tolist() == [[True, True, True, False], [False] * 4]
            assert m1.tolist() == [[False, False, False, True], [True, True, True, False]]
        assert st["kept"] == int(m0.sum() + m1.sum())
        for n, L in layers.items():  # kept entries rewound to dW0 exactly, the rest exactly zero
            assert L.delta.data.equal(d0[n] * L.mask)


def test_prune_ties_exact_count_and_only_free_entries():
    layers = hand_layers(((3, 5), (2, 5)))
    L, L1 = layers["l0"], layers["l1"]
    for X in (L, L1):
        X.delta.data = X.init_delta().sign() * 1.0   # every magnitude tied
    L.mask[0, :] = False                    # already pruned entries are never revived
    L.delta.data[0, :] = 0
    rigsa.prune(layers, keep=0.4, scope="global")
    # round(0.4 * 20) = 8 kept, ties broken by layer, then row-major index
    assert int(L.mask.sum()) == 8 and not L.mask[0].any() and not L1.mask.any()
    assert L.mask.flatten().nonzero().flatten().tolist() == list(range(5, 13))


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
        assert rigsa.kth_largest(lambda: iter(chunks), k) == allv[k - 1].item()


def test_pruned_entries_stay_zero_and_weight_decay_is_exact():
    torch.manual_seed(0)
    layers = hand_layers(((4, 6), (3, 4)))
    net = nn.Sequential(layers["l0"], nn.Tanh(), layers["l1"])
    for L in layers.values():
        L.delta.data = L.init_delta() * torch.randn(L.delta.shape).sign()
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
    # real gradients with wd = 1.0: pruned entries get no gradient and stay exactly zero
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 6)).pow(2).sum().backward()
        for L in layers.values():
            assert (L.delta.grad[~L.mask] == 0).all()
        opt.step()
    for L in layers.values():
        assert (L.delta.data[~L.mask] == 0).all() and (L.delta.data[L.mask] != 0).all()


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """A tiny two-iteration RIGSA run, uninterrupted and halted + resumed."""
    tmp = tmp_path_factory.mktemp("rigsa_run")
    rigsa.write_synthetic_mnist(tmp / "mnist", n_train=40, n_test=8, size=8)
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


def test_adapter_roundtrip_merge_and_random_mask(tiny_run, tiny_dir, tmp_path):
    tmp, full, _ = tiny_run
    m, tok = M.load(tiny_dir)
    cfg = rigsa.load_adapter(m, tmp / "run" / "iter2")
    assert cfg.method == "rigsa"
    x = torch.tensor([tok.encode("The digit is 7")])
    y = m(x)
    it2 = [r for r in full if r.get("event") == "iteration"][-1]
    assert rigsa.density_report(rigsa.adapters(m))[0] == pytest.approx(it2["density"])
    out = rigsa.merge(tmp / "run" / "iter2", tmp_path / "merged", dtype="float32")
    merged, _ = M.load(out)
    torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_model(out)(x).logits, y, rtol=1e-4, atol=1e-4)  # transformers reads it too
    # random-mask: the per-layer counts of the RIGSA mask, at other positions; or a uniform density
    counts = rigsa.mask_counts(tmp / "run" / "iter2")
    m2, _ = M.load(tiny_dir)
    layers = rigsa.install_adapters(m2, rigsa.Config(method="random-mask", density=0.25))
    rigsa.random_masks(layers, counts, seed=5)
    assert {n: int(L.mask.sum()) for n, L in layers.items()} == counts
    assert any(not L.mask.equal(rigsa.adapters(m)[n].mask) for n, L in layers.items())
    assert all((L.delta.data[~L.mask] == 0).all() for L in layers.values())
    rigsa.random_masks(layers, {n: round(0.25 * L.mask.numel()) for n, L in layers.items()}, seed=5)
    assert all(int(L.mask.sum()) == round(0.25 * L.mask.numel()) for L in layers.values())
    # and through the training loop: --method random-mask --mask-like RUN/iter2
    cfg = tiny_cfg(tiny_dir, tmp, out=str(tmp_path / "rm"), method="random-mask", mask_like=str(tmp / "run" / "iter2"), steps=2)
    with one_thread():
        log = rigsa.train(cfg)
    assert rigsa.mask_counts(tmp_path / "rm" / "iter1") == counts and len([r for r in log if r.get("event")]) == 1


def test_learns_tiny_textual_digits(tiny_dir, tmp_path):
    # the whole method (gate, IMP-ready adapters, AdamW loop) on a task small enough for CPU:
    # 32 synthetic 8x8 digits, learnt by a random tiny model through --method rigsa
    rigsa.write_synthetic_mnist(tmp_path / "mnist", n_train=32, n_test=8, size=8, noise=0.05)
    cfg = tiny_cfg(tiny_dir, tmp_path, iters=1, steps=160, epochs=100.0, lr=3e-2, weight_decay=0.0,
                   warmup=5, batch_size=16, micro_batch=16, val_frac=0.0, eval_test=False, log_every=20)
    with one_thread():
        rigsa.train(cfg)
        m, tok = M.load(tiny_dir)
        rigsa.load_adapter(m, tmp_path / "run" / "iter1")
        x, y = rigsa.load_mnist(tmp_path / "mnist", "train", val_frac=0.0)
        acc, preds = rigsa.mnist_accuracy(m, tok, x, y, progress=False)
    assert acc >= 0.9, acc


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit):
        rigsa.main(["train", "--help"])
    h = capsys.readouterr().out
    for flag in ("--keep", "--prune-scope", "--alpha-init", "--mask-like", "--micro-batch", "--lora-lr", "--resume"):
        assert flag in h
    assert "[default: 0.8]" in h and "§4.4" in h
    with pytest.raises(SystemExit, match="error: config: --method 'foo'"):
        rigsa.main(["train", "--method", "foo"])


def test_qlora_wiring(tiny_dir, tmp_path):
    # --method qlora through rigsa's loop, saved and re-installed by load_adapter (§5.3, Table 4)
    qlora = pytest.importorskip("qlora")
    rigsa.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, method="qlora", rank=2, steps=2, lora_lr=1e-2, warmup=1)
    with one_thread():
        log = rigsa.train(cfg)
    assert [r["iter"] for r in log if r.get("event") == "iteration"] == [1]   # no pruning
    assert (tmp_path / "run" / "iter1-peft" / "adapter_model.safetensors").exists()
    m, tok = M.load(tiny_dir)
    assert rigsa.load_adapter(m, tmp_path / "run" / "iter1").method == "qlora"
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, qlora.LoRALinear) and q.lora_B.weight.abs().sum() > 0       # trained B was loaded


def test_lora_merge(tiny_dir, tmp_path):
    # --method lora (the unquantized baseline) merges like RIGSA: float32 merge, official layout
    pytest.importorskip("qlora")
    rigsa.write_synthetic_mnist(tmp_path / "mnist", n_train=12, n_test=4, size=8)
    cfg = tiny_cfg(tiny_dir, tmp_path, method="lora", rank=2, steps=2, lora_lr=5e-2, warmup=1)
    with one_thread():
        rigsa.train(cfg)
    m, tok = M.load(tiny_dir)
    rigsa.load_adapter(m, tmp_path / "run" / "iter1")
    x = torch.tensor([tok.encode("The digit is 7")])
    y = m(x)
    assert (y - M.load(tiny_dir)[0](x)).abs().max() > 1e-4          # the adapter does something
    out = rigsa.merge(tmp_path / "run" / "iter1", tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(M.load(out)[0](x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_model(out)(x).logits, y, rtol=1e-4, atol=1e-4)
    q = tmp_path / "q"
    rigsa.write_synthetic_mnist(q / "mnist", n_train=12, n_test=4, size=8)
    with one_thread():
        rigsa.train(tiny_cfg(tiny_dir, q, method="qlora", rank=2, steps=1, warmup=1))
    with pytest.raises(ValueError, match="4-bit base"):
        rigsa.merge(q / "run" / "iter1", tmp_path / "merged-q")


# ---- reproduce.py: the plan and the tables ----

def test_reproduce_plan_and_tables(tmp_path):
    import reproduce
    a = reproduce.main.__globals__["argparse"].Namespace(model="M", out=str(tmp_path), limit=3, steps=2, data_dir="", no_verify=False)
    steps = reproduce.plan(a)
    # 2 x (2 MNIST + 3 source) base evals; rigsa 1 + 5x3; random mask 1 + 3; 4 QLoRA ranks x (1 + 3)
    assert len(steps) == 10 + 16 + 4 + 16
    cmds = [" ".join(c) for _, c in steps]
    assert any("--method random-mask --mask-like " + str(tmp_path / "rigsa" / "iter5") in c for c in cmds)
    assert sum("--method qlora --rank" in c for c in cmds) == 4
    assert all("--limit 3" in c for c in cmds if "evals/run.py" in c)
    ev = tmp_path / "evals"
    ev.mkdir()
    (ev / "base-piqa.json").write_text(json.dumps({"metrics": {"acc": 0.754}}))
    (ev / "base-nf4-gsm8k.json").write_text(json.dumps({"metrics": {"exact_match_strict": 0.199}}))
    (tmp_path / "rigsa").mkdir()
    (tmp_path / "rigsa" / "metrics.jsonl").write_text(
        json.dumps({"event": "iteration", "iter": 1, "test_acc": 0.9905, "density": 1.0, "trainable": 10}) + "\n")
    text = reproduce.tables(tmp_path)
    assert "| PIQA | 75.40 | - |" in text and "| GSM8k (5-shot) | - | 19.90 |" in text
    assert "| RIGSA iteration 1 | 100.00% | 99.05 |" in text
    assert (tmp_path / "TABLES.md").read_text() == text
