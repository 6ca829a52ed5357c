# Tests for qlora.py: NF4 bit-exactness against bitsandbytes 0.50.2, LoRA semantics against PEFT,
# PEFT's file format, and a tiny QLoRA run. CPU only, no network, no files outside the repository.
import hashlib
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
import qlora as Q


def sha(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

# -----------------------------------------------------------------------------
# reference values measured with bitsandbytes 0.50.2 on the CPU (quantize_4bit, blocksize 64).
# Its input is torch.manual_seed(0); torch.randn(4, 128), regenerated here and checked by hash.

REF_INPUT_SHA = "be6c6e802815e1a4ac95cdbe2148abbccc0800435418db517647db901e76911e"
REF_INPUT_HEAD = [-1.1258398294448853, -1.152360200881958, -0.2505785822868347, -0.4338788092136383]
REF_BF16_INPUT_SHA = "21ad3a9dad5bd45b07b94a5ec3acd4ecf44ac575943ee6684925812369105d86"
# `packed` (== `dq_packed`), 256 bytes
REF_PACKED = bytes.fromhex(
    "4466a96183887bb6329a936da568cca4575897997a679e325ab866966acf33d55bcc2f5915553c6b7a47b5c96f17337a"
    "d2990168879994b36077b93745e58cbd353abaf278416259689d996683083989c296d4cb986952917515d8ec23e9b221"
    "4aaa8c5d72abb1b4d8dc1d41de3b97265e896b51644c2cd01082e6b67dc438fa7345a2667ea551ef6ba90a437d9625c2"
    "ab6372743c4de4c5464b82622a21e756778acaa64b8972b49f78854bc422a5c49cab7c8ba79456689a8b967965647966"
    "89ba9389bfa359b55882b6c4c49a57dc7a4c6695589ca5a3db68b867878586b637d4f55d66bc8c6c82599786393784c0"
    "56637bc279854c49873564496a2182b2")
# `bf16_dq_packed` differs from it in one byte (index 237: 0x37 -> 0x47), bf16 rounding of the input
REF_BF16_PACKED = REF_PACKED[:237] + bytes([0x47]) + REF_PACKED[238:]
REF_ABSMAX = [float.fromhex(h) for h in (
    "0x1.b48b5ap+1", "0x1.4e815ap+1", "0x1.f35e44p+0", "0x1.e7219ap+0",
    "0x1.08624ap+1", "0x1.f70a5ep+1", "0x1.067edep+2", "0x1.b38fd0p+1")]
REF_DEQUANT_SHA = "eec2352888078de2e65741bc40a7f4eaf5fd7aeca6f8f7797ba69168e5da96d6"
REF_DEQUANT_HEAD = [-0.9700880646705627, -0.9700880646705627, -0.31052640080451965, -0.31052640080451965]
# double quantization (fp32 input)
REF_DQ_ABSMAX_U8 = [213, 52, 12, 9, 19, 244, 255, 212]
REF_DQ_OFFSET = float.fromhex("0x1.7608dcp+1")          # 2.92215
REF_DQ_NESTED_ABSMAX = float.fromhex("0x1.2de9c0p+0")   # 1.17935
REF_DQ_DEQUANT_SHA = "7820889ff5286fdfe01c71ea7a918b4fa7071fc48fc984fb6d00c892b8587868"
# double quantization (bf16 input, bf16 output)
REF_BF16_DQ_ABSMAX_U8 = [213, 52, 12, 9, 18, 245, 255, 213]
REF_BF16_DQ_OFFSET = float.fromhex("0x1.76p+1")
REF_BF16_DQ_NESTED_ABSMAX = float.fromhex("0x1.2cp+0")
REF_BF16_DQ_DEQUANT_SHA = "ffece275cd976c8e1bb3141345e8446e3378ee24bca889bbacb74aa589c73bcd"
# the 16 NF4 values and bnb's 8-bit dynamic map (`nf4_code`, `dq_nested_quant_map`)
REF_NF4_CODE_SHA = "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
REF_DYNAMIC_SHA = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
# decision thresholds hard-coded in bitsandbytes' CUDA dQuantizeNF4 (csrc/kernels.cu)
CUDA_THRESHOLDS = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                   -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                   0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                   0.5016634166240692, 0.6427869200706482, 0.8614784181118011]


def ref_input():
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    assert x.flatten()[:4].tolist() == REF_INPUT_HEAD and sha(x) == REF_INPUT_SHA, \
        "torch.randn(4, 128) after manual_seed(0) no longer reproduces the reference input"
    return x


def test_nf4_code_values():
    assert sha(Q.NF4_CODE) == REF_NF4_CODE_SHA
    assert Q.NF4_CODE[0] == -1.0 and Q.NF4_CODE[7] == 0.0 and Q.NF4_CODE[15] == 1.0
    assert (Q.NF4_CODE[1:] > Q.NF4_CODE[:-1]).all()
    assert (Q.NF4_CODE < 0).sum() == 7 and (Q.NF4_CODE > 0).sum() == 8
    assert Q.NF4_MIDPOINTS.tolist() == torch.tensor(CUDA_THRESHOLDS, dtype=torch.float32).tolist()


def test_dynamic_map_is_bnbs():
    c = Q.dynamic_map()
    assert c.shape == (256,) and sha(c) == REF_DYNAMIC_SHA
    assert c[0].item() == pytest.approx(-0.99296875) and c[-1] == 1.0 and (c == 0).sum() == 1


def test_bit_exact_with_bitsandbytes():
    x = ref_input()
    q = Q.quantize_nf4(x)
    assert q["packed"].shape == (256, 1) and q["packed"].dtype == torch.uint8
    assert bytes(q["packed"].flatten().tolist()) == REF_PACKED
    assert q["absmax"].dtype == torch.float32 and q["absmax"].tolist() == REF_ABSMAX
    d = Q.dequantize_nf4(**q)
    assert d.dtype == torch.float32 and d.shape == (4, 128)
    assert d.flatten()[:4].tolist() == REF_DEQUANT_HEAD and sha(d) == REF_DEQUANT_SHA
    # bitsandbytes' own bytes: byte 3 is 0x61 (inputs 6 and 7 -> codes 6 and 1)
    assert q["packed"][3].item() == 0x61


def test_double_quant_bit_exact():
    x = ref_input()
    q = Q.quantize_nf4(x, double_quant=True)
    assert bytes(q["packed"].flatten().tolist()) == REF_PACKED          # codes use the exact fp32 absmax
    assert q["absmax"].dtype == torch.uint8 and q["absmax"].tolist() == REF_DQ_ABSMAX_U8
    assert q["offset"].item() == REF_DQ_OFFSET and q["nested_absmax"].tolist() == [REF_DQ_NESTED_ABSMAX]
    assert sha(Q.dequantize_nf4(**q)) == REF_DQ_DEQUANT_SHA
    # bf16 weights: upcast to fp32 for quantization, dequantized back to bf16
    xb = x.bfloat16()
    assert sha(xb) == REF_BF16_INPUT_SHA
    q = Q.quantize_nf4(xb, double_quant=True)
    assert bytes(q["packed"].flatten().tolist()) == REF_BF16_PACKED
    assert q["absmax"].tolist() == REF_BF16_DQ_ABSMAX_U8
    assert q["offset"].item() == REF_BF16_DQ_OFFSET and q["nested_absmax"].tolist() == [REF_BF16_DQ_NESTED_ABSMAX]
    d = Q.dequantize_nf4(**q)
    assert d.dtype == torch.bfloat16 and sha(d) == REF_BF16_DQ_DEQUANT_SHA


def test_tie_rule_and_nibble_order():
    # one block with absmax exactly 1: each midpoint must go to the LOWER code (bnb's `x > t`)
    mids = Q.NF4_MIDPOINTS.tolist()
    x = torch.tensor([1.0] + mids + [0.0] * (64 - 1 - len(mids)))
    q = Q.quantize_nf4(x)
    codes = torch.stack([q["packed"].flatten() >> 4, q["packed"].flatten() & 15], -1).flatten()
    assert codes[1:16].tolist() == list(range(15))
    assert codes[0] == 15 and (codes[16:] == 7).all()
    # a hair above a midpoint goes up
    up = torch.tensor([1.0] + [torch.nextafter(torch.tensor(m), torch.tensor(2.0)).item() for m in mids])
    q = Q.quantize_nf4(up)
    codes = torch.stack([q["packed"].flatten() >> 4, q["packed"].flatten() & 15], -1).flatten()
    assert codes[1:16].tolist() == list(range(1, 16))
    # first element -> high nibble: [-1, 1] is code 0 then 15 -> 0x0F; an odd length keeps a zero pad
    assert Q.quantize_nf4(torch.tensor([-1.0, 1.0]))["packed"].flatten().tolist() == [0x0F]
    assert Q.quantize_nf4(torch.tensor([1.0, -1.0, 1.0]))["packed"].flatten().tolist() == [0xF0, 0xF7]


def test_round_trip_error_bound():
    torch.manual_seed(1)
    half_gap = ((Q.NF4_CODE[1:] - Q.NF4_CODE[:-1]) / 2).max().item()    # 0.1385, between 0.72 and 1.0
    for shape, dq in [((96, 256), False), ((96, 256), True), ((3, 37), False), ((5, 1000), True)]:
        w = torch.randn(shape) * 0.02
        q = Q.quantize_nf4(w, double_quant=dq)
        d = Q.dequantize_nf4(**q)
        assert d.shape == w.shape and d.dtype == w.dtype
        n = w.numel()
        absmax = F.pad(w.flatten(), (0, -n % 64)).view(-1, 64).abs().amax(1).repeat_interleave(64)[:n]
        err = (d - w).flatten().abs()
        # nearest code: within half a code gap of the block absmax (+ the absmax's own 8-bit error)
        slack = 0.02 * absmax if dq else 1e-6 * absmax
        assert (err <= half_gap * absmax + slack).all(), shape
        rel = ((d - w).norm() / w.norm()).item()
        assert rel < 0.11, (shape, dq, rel)   # bnb's NF4 + double quant: 0.092 on N(0, 0.02) 2048x8192
    # an all-zero block stays zero with fp32 absmax (with double quant its absmax of 0 comes back
    # as a small 8-bit-coded number, in bitsandbytes too)
    z = torch.zeros(2, 64)
    z[1] = torch.randn(64)
    assert (Q.dequantize_nf4(**Q.quantize_nf4(z))[0] == 0).all()


def test_linear4bit_forward_backward():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False).bfloat16()
    q4 = Q.Linear4bit.from_linear(lin, double_quant=True)
    assert q4.compute_dtype == torch.bfloat16 and not list(q4.parameters())
    W = q4.dequantize()
    assert W.dtype == torch.bfloat16 and W.shape == (64, 128)
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = q4(x)                                   # fp32 in -> bf16 compute -> fp32 out (bnb Linear4bit)
    assert y.dtype == torch.float32
    xb = x.detach().bfloat16().requires_grad_()
    yb = F.linear(xb, W)
    assert torch.equal(y, yb.float())
    g = torch.randn_like(y)
    y.backward(g)
    yb.backward(g.bfloat16())
    assert torch.equal(x.grad, xb.grad.float())


@pytest.fixture
def tiny(tiny_dir):
    def make(dtype=torch.float32):
        m, tok = M.load(tiny_dir, dtype=dtype)
        return m
    return make


def batch(cfg, B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (B, T), generator=g)


def test_quantize_model_targets(tiny):
    m = tiny()
    emb = m.model.embed_tokens.weight.clone()
    Q.quantize_model(m)
    L = m.config.num_hidden_layers
    assert len(Q._targets(m, Q.Linear4bit)) == 7 * L and not Q._targets(m, nn.Linear)
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.embed_tokens.weight, emb)
    x = batch(m.config)
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("quant", [False, True])
def test_lora_exactly_zero_at_init(tiny, quant):
    m = tiny(torch.bfloat16)
    if quant:
        Q.quantize_model(m)
    x = batch(m.config)
    before = m(x)
    torch.manual_seed(0)
    params = Q.apply_lora(m, rank=4, alpha=32, dropout=0.1)
    m.train()                                   # dropout active: it only touches the LoRA input
    after = m(x)
    assert torch.equal(before, after)
    for mod in (getattr(p, c) for p, c, _ in Q._targets(m, Q.LoRALinear)):
        A, B = mod.lora_A.weight, mod.lora_B.weight
        assert A.dtype == B.dtype == torch.float32 and (B == 0).all()
        assert A.abs().max() <= 1 / math.sqrt(mod.in_features) and A.abs().max() > 0.5 / math.sqrt(mod.in_features)
        assert mod.scaling == 8.0
        assert mod.quantized == quant and (quant or mod.weight.requires_grad is False)
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}


def test_trainable_parameter_counts(tiny):
    for r in (1, 4):
        mm = tiny()
        params = Q.apply_lora(mm, rank=r, alpha=32)
        cfg = mm.config
        C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        by_hand = L * r * ((C + q) + (C + kv) + (C + kv) + (q + C) + (C + I) + (C + I) + (I + C))
        assert sum(p.numel() for p in params) == by_hand == Q.lora_num_params(cfg, r)
        assert len(params) == 2 * 7 * L
    mm = tiny()   # a rank no layer can reach is a typo (at 1.7B found by running out of memory): refused, at the edge not
    narrow = min(min(getattr(p, c).in_features, getattr(p, c).out_features) for p, c, _ in Q._targets(mm, torch.nn.Linear))
    with pytest.raises(ValueError, match=rf"^--rank {narrow + 1}: above the narrowest adapted layer's width, {narrow};"):
        Q.apply_lora(mm, rank=narrow + 1, alpha=32)
    assert not Q._targets(mm, Q.LoRALinear) and len(Q.apply_lora(mm, rank=narrow, alpha=32)) == 2 * 7 * cfg.num_hidden_layers
    # SmolLM2-1.7B, rank 16 (the paper's largest QLoRA): 24 layers x 47,104 x 16, from shapes only
    big = M.PRESETS["SmolLM2-1.7B-Instruct"]
    assert Q.lora_num_params(big, 16) == 18_087_936
    assert [Q.lora_num_params(big, r) for r in (1, 4, 8)] == [1_130_496, 4_521_984, 9_043_968]


def test_qlora_training_lowers_loss(tiny):
    m = tiny()                                  # float32 base: bf16 matmuls are slow on CPU
    Q.quantize_model(m)
    packed = m.model.layers[0].self_attn.q_proj.packed.clone()
    torch.manual_seed(0)
    params = Q.apply_lora(m, rank=8, alpha=16)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    x = batch(m.config, B=4, T=24)
    losses = []
    m.train()
    for _ in range(20):
        logits = m(x[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(m.model.layers[0].self_attn.q_proj.packed, packed)          # base stays frozen
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_peft_format_and_reload(tiny, tmp_path):
    m = tiny()
    Q.quantize_model(m)
    torch.manual_seed(0)
    Q.apply_lora(m, rank=4, alpha=32)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)              # B != 0 so that reloading is visible
    x = batch(m.config)
    want = m(x)
    Q.save_peft(m, tmp_path / "peft", 4, 32, 0.0, "unsloth/SmolLM2-1.7B-Instruct-bnb-4bit")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    cfg = m.config
    keys = set()
    for i in range(cfg.num_hidden_layers):
        for mod, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for p in projs:
                keys |= {f"base_model.model.model.layers.{i}.{mod}.{p}.lora_A.weight",
                         f"base_model.model.model.layers.{i}.{mod}.{p}.lora_B.weight"}
    assert set(t) == keys
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, cfg.intermediate_size)
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (cfg.hidden_size, 4)
    assert all(v.dtype == torch.float32 for v in t.values())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert c["peft_type"] == "LORA" and c["task_type"] == "CAUSAL_LM" and c["r"] == 4 and c["lora_alpha"] == 32
    assert c["lora_dropout"] == 0.0 and c["bias"] == "none" and c["use_rslora"] is False
    assert c["base_model_name_or_path"] == "unsloth/SmolLM2-1.7B-Instruct-bnb-4bit"
    assert sorted(c["target_modules"]) == sorted(Q.TARGETS)
    # reload into a fresh quantized model
    tensors, c2 = Q.read_peft(tmp_path / "peft")
    m2 = Q.quantize_model(tiny())
    Q.load_lora(m2, tensors, c2["r"], c2["lora_alpha"])
    assert torch.equal(m2(x), want)
    # bad input names the tensor
    bad = dict(tensors)
    bad.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.lora_B"):
        Q.load_lora(Q.quantize_model(tiny()), bad, 4, 32)
    with pytest.raises(ValueError, match="shape"):
        Q.load_lora(tiny(), tensors, 8, 32)
    with pytest.raises(ValueError, match="lora_A.weight' is float64, not a float of 32 bits or fewer"):
        Q.load_lora(tiny(), {k: v.double() for k, v in tensors.items()}, 4, 32)   # it would be rounded on the way in
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        Q.read_peft(tmp_path)
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        Q.read_peft(tmp_path / "peft")


def test_lora_state_dict_roundtrip(tiny):
    m = tiny(torch.bfloat16)
    torch.manual_seed(0)
    Q.apply_lora(m, rank=2, alpha=32)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    sd = Q.lora_state_dict(m)
    assert len(sd) == 2 * 7 * m.config.num_hidden_layers and all(".lora_" in k for k in sd)
    x = batch(m.config)
    want = m(x).float()
    m2 = tiny(torch.bfloat16)
    Q.load_lora(m2, sd, 2, 32)
    assert torch.equal(m2(x).float(), want)
    l0 = m2.model.layers[0].self_attn.q_proj   # what a merge adds to W0 (adapter_files.merge_adapters; test_rigsa.py)
    assert torch.equal(l0.delta_weight(), (l0.lora_B.weight.float() @ l0.lora_A.weight.float()) * 16.0)


def test_prequantized_unsloth_layout(tiny, tiny_dir, tmp_path):
    m = Q.quantize_model(tiny(torch.bfloat16), double_quant=True)
    x = batch(m.config)
    want = m(x)
    sd = Q.to_bnb_state_dict(m)
    p = "model.layers.1.mlp.down_proj"
    assert {k for k in sd if k.startswith(p)} == {f"{p}.weight", f"{p}.weight.absmax", f"{p}.weight.nested_absmax",
                                                 f"{p}.weight.nested_quant_map", f"{p}.weight.quant_map",
                                                 f"{p}.weight.quant_state.bitsandbytes__nf4"}
    cfg = m.config
    assert sd[f"{p}.weight"].dtype == torch.uint8 and sd[f"{p}.weight"].shape == (cfg.hidden_size * cfg.intermediate_size // 2, 1)
    assert sd[f"{p}.weight.absmax"].dtype == torch.uint8
    meta = json.loads(bytes(sd[f"{p}.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [cfg.hidden_size, cfg.intermediate_size] and meta["nested_blocksize"] == 256
    assert "lm_head.weight" not in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fresh = M.Model(cfg).bfloat16()
    Q.load_prequantized(load_file(str(tmp_path / "model.safetensors")), fresh)
    assert torch.equal(fresh(x), want)
    # a whole checkpoint directory as Unsloth publishes it (config.json with quantization_config)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    c = json.loads((tiny_dir / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                                "bnb_4bit_quant_storage": "uint8"}
    (tmp_path / "config.json").write_text(json.dumps(c))
    loaded, tok = Q.load_model(str(tmp_path), device="cpu")
    assert len(Q._targets(loaded, Q.Linear4bit)) == 7 * cfg.num_hidden_layers
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(x), want)
    from evals import run as R   # --quantize nf4 on it would not act: refused before the model loads
    from lib import mnist
    mnist.write_synthetic_mnist(tmp_path / "data" / "mnist", n_train=4, n_test=2, size=8)
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "mnist", "--model", str(tmp_path), "--quantize", "nf4", "--data-dir", str(tmp_path / "data"),
                "--no-verify", "--offline", "--device", "cpu", "--limit", "1"])
    assert re.fullmatch(r"error: --quantize nf4: \S+ is a 4-bit checkpoint already \(its config.json's "
                        r"quantization_config\), so it would not act; drop it", e.value.code), e.value.code
    plain, _ = Q.load_model(str(tiny_dir), device="cpu")                  # no quantization_config: model.load
    head = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}     # a tied config, a head of its own
    save_file({k: v.contiguous() for k, v in head.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"config.json ties lm_head to the embeddings .* an lm_head.weight of their own"):
        Q.load_model(str(tmp_path), device="cpu")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert not Q._targets(plain, Q.Linear4bit)
    with pytest.raises(ValueError, match=r"^\S+: a bitsandbytes 4-bit checkpoint \(config.json's quantization_config\), "
                                         r"and this needs the unquantized weights; pass the checkpoint it was quantized from$"):
        M.load(str(tmp_path), device="cpu")   # rigsa, lora, dense and merge read the weights themselves
    for qc, kind in (({"quant_method": "bitsandbytes", "load_in_8bit": True}, "a bitsandbytes 8-bit"),
                     ({"quant_method": "gptq", "bits": 4}, r"a quantized \(gptq\)"),
                     ({"quant_method": "awq"}, r"a quantized \(awq\)")):   # else a shape or dtype error
        (tmp_path / "config.json").write_text(json.dumps({**c, "quantization_config": qc}))
        for load in (M.load, Q.load_model):
            with pytest.raises(ValueError, match=rf"^\S+: {kind} checkpoint \(config.json's quantization_config\), and "):
                load(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("[1, 2]")   # the whole file not a mapping: one line too
    for load in (M.load, Q.load_model):
        with pytest.raises(ValueError, match=r"config.json: a JSON list, not a model's config \(a mapping\)"):
            load(str(tmp_path), device="cpu")
    for qc in ("nf4", [4]):   # not a mapping: one line, not an AttributeError
        (tmp_path / "config.json").write_text(json.dumps({**c, "quantization_config": qc}))
        for load in (M.load, Q.load_model):
            with pytest.raises(ValueError, match=r"config.json: quantization_config is a (str|list), not a mapping; "):
                load(str(tmp_path), device="cpu")
    # transformers' config of a model it did not quantize: both flags false, the weights plain
    plain = shutil.copytree(tiny_dir, tmp_path / "plain")
    (plain / "config.json").write_text(json.dumps({**c, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False}}))
    assert not Q._targets(M.load(str(plain), device="cpu")[0], Q.Linear4bit)
    bad = dict(sd)
    bad.pop(f"{p}.weight.absmax")
    with pytest.raises(ValueError, match="absmax"):
        Q.load_prequantized(bad, M.Model(cfg).bfloat16())


def test_lora_under_autocast_saves_no_float32_copy_and_gives_the_same_numbers(tiny):
    # under autocast the adapters' GEMMs run in bfloat16 anyway: x is no longer cast up to float32
    # first (autocast cast it back, and autograd kept that copy per projection), same numbers
    m = tiny(torch.bfloat16)
    Q.quantize_model(m)
    torch.manual_seed(0)
    for p in Q.apply_lora(m, rank=4, alpha=32):
        p.data.normal_(0, 0.05)
    lora = m.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, lora.in_features, dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for cast in (False, True):   # today's forward, and the one that cast x to float32 first
        saved = []
        with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            y = nf4_then_lora(lora, x, cast)
        y.float().sum().backward()
        outs.append((y.detach(), x.grad.clone(), lora.lora_A.weight.grad.clone()))
        x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad = None, None, None
        copies = [t for t in saved if t.numel() == x.numel() and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
        assert bool(copies) == cast        # lora_A's saved input is x itself, not a re-cast copy of it
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def nf4_then_lora(lora, x, cast):
    """LoRALinear.forward, or (cast=True) the same with x cast to float32 before the adapters, as it was."""
    if not cast:
        return lora(x)
    y = Q.nf4_linear(x, lora)
    return (y + lora.lora_B(lora.lora_A(x.to(torch.float32))) * lora.scaling).to(y.dtype)


def test_dequantize_in_chunks_is_the_same_and_prequantized_loads_no_bf16_projection(tiny, tiny_dir, tmp_path, monkeypatch):
    m = Q.quantize_model(tiny(torch.bfloat16), double_quant=True)
    layer = m.model.layers[0].mlp.down_proj
    whole = Q._dequantize(layer)
    monkeypatch.setattr(Q, "DEQUANT_CHUNK", 3 * 64)   # many chunks, the last one partial
    assert torch.equal(Q._dequantize(layer), whole)
    # a bnb-4bit checkpoint: the projections arrive as NF4, never as bfloat16 (out, in) tensors
    save_file({k: v.contiguous() for k, v in Q.to_bnb_state_dict(m).items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    c = json.loads((tiny_dir / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps(c))
    shapes = {tuple(getattr(p, ch).shape) for p, ch, _ in Q._targets(m, Q.Linear4bit)}
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t) and t.is_floating_point() and tuple(t.shape) in shapes and not t.is_meta:
                    Watch.made.append(tuple(t.shape))
            return out
    with Watch():
        loaded, _ = Q.load_model(str(tmp_path), device="cpu")
    assert not Watch.made and not any(p.is_meta for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = batch(m.config)
    assert torch.equal(loaded(x), m(x))
