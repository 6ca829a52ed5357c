"""
The paper's baseline: QLoRA (a 4-bit NF4 base plus LoRA adapters) and plain LoRA on the
bfloat16 base, written from scratch in PyTorch (no bitsandbytes, no PEFT).

    quantize_model(model)                      # 7 projections of every layer -> NF4 (+ double quant)
    params = apply_lora(model, rank=16, alpha=32, dropout=0.0)   # the paper's values: rigsa.TABLE4
    ... train params ...
    save_peft(model, "out/peft", 16, 32, 0.0, "HuggingFaceTB/SmolLM2-1.7B-Instruct")

NF4 is bit-exact with bitsandbytes 0.50.2 (packed bytes, absmax, double-quant codes and the
dequantized weights; bitsandbytes/functional.py's quantize_4bit and dequantize_4bit, and
tests/test_qlora.py). LoRA follows PEFT's semantics (peft 0.21, src/peft/tuners/lora). Shapes: B batch,
T time, N elements of a flattened weight, nb number of 64-element blocks, r LoRA rank.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
from lib import util

# the seven projections of every decoder layer (Unsloth's default target_modules in get_peft_model)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# -----------------------------------------------------------------------------
# NF4 and the 8-bit dynamic code (bitsandbytes/functional.py)

# the 16 NF4 values, index = 4-bit code (bitsandbytes get_4bit_type("nf4")): 7 negative, an exact
# zero and 8 positive levels, normalised so that max |value| = 1
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
# the 15 decision thresholds, midpoints computed in float32; they equal the constants hard-coded in
# bitsandbytes' CUDA dQuantizeNF4 (checked in tests/test_qlora.py)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def dynamic_map(signed=True):
    """bitsandbytes' 8-bit 'dynamic' code, create_dynamic_map(signed, max_exponent_bits=7, total_bits=8):
    for decade 10^(i-6), i = 0..6, the midpoints of linspace(0.1, 1, 2^i + 1) with both signs
    (signed: 127 + 127 + 0 and 1 = 256 sorted float32 values in [-0.993, 1]), or of
    linspace(0.1, 1, 2^(i+1) + 1) positive only (unsigned: 254 + 0 and 1, for AdamW's second moment)."""
    vals = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (i + (not signed)) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)                    # the same Python scalar bnb multiplies by, float32 product
        vals += [scale * mids, -scale * mids] if signed else [scale * mids]
    return torch.cat(vals).sort().values


DYNAMIC_CODE = dynamic_map()
def quantize_blockwise_8bit(x, code, blocksize=256):
    """bitsandbytes' quantize_blockwise on float32 input (its CPU kernel): per block absmax, x / absmax,
    binary search for the code value to the left, then step right only if strictly closer (a tie
    goes to the lower code). The search table has code[0] forced to -1.0, as the kernel does.
    x (N,) float32 -> (codes (N,) uint8, absmax (ceil(N/blocksize),) float32)."""
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)          # (nb, blocksize)
    absmax = blocks.abs().amax(dim=1)                                       # (nb,)
    s = (blocks / absmax[:, None]).reshape(-1)[:n]                         # (N,) division, as in the CPU kernel
    search = code.clone()
    search[0] = -1.0
    left = (torch.searchsorted(search, s, right=True) - 1).clamp(0, len(code) - 1)
    right = (left + 1).clamp(max=len(code) - 1)
    idx = torch.where((s - search[right]).abs() < (s - search[left]).abs(), right, left)
    return idx.to(torch.uint8), absmax


def quantize_nf4(w, blocksize=64, double_quant=False):
    """Quantize one weight matrix to NF4 exactly as bitsandbytes' quantize_4bit does.
    Returns the quant state: packed uint8 (ceil(N/2), 1), absmax float32 (nb,) or, with double
    quantization, uint8 (nb,) plus nested_absmax float32 (ceil(nb/256),) and offset float32 ();
    shape, dtype (the original weight dtype, which dequantize returns) and blocksize."""
    x = w.detach().float().reshape(-1)                                      # (N,) row-major, fp32 first
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)          # (nb, 64) zero-padded tail
    absmax = blocks.abs().amax(dim=1)                                       # (nb,) exact, not rounded
    # multiply by the reciprocal like the CUDA kernel; an all-zero block gives 0 * inf = NaN, which
    # bnb maps to code 0 (all its `x > t` tests fail); it dequantizes to -1.0 * 0 = 0 either way
    s = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1).nan_to_num(nan=-1.0)
    # nearest code; right=False sends a value exactly on a midpoint to the LOWER code, which is
    # bnb's tie rule (CUDA: chains of `x > threshold`; torch backend: argmin keeps the first)
    codes = torch.bucketize(s, util.on_device(NF4_MIDPOINTS, s.device), right=False)   # (nb, 64) int64 in 0..15
    codes = codes.reshape(-1)[: n + n % 2]                                  # an odd N keeps one zero pad
    # two codes per byte, the FIRST element in the HIGH nibble (as bitsandbytes packs them)
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).view(-1, 1)  # (ceil(N/2), 1)
    q = dict(packed=packed, absmax=absmax, nested_absmax=None, offset=None,
             shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        # QLoRA's double quantization: subtract the mean, 8-bit dynamic code in blocks of 256
        offset = absmax.mean()
        q["absmax"], q["nested_absmax"] = quantize_blockwise_8bit(absmax - offset, util.on_device(DYNAMIC_CODE, x.device), 256)
        q["offset"] = offset
    return q


def dequantize_absmax(absmax, nested_absmax, offset, nested_code=None, nested_blocksize=256):
    """uint8 absmax codes -> float32: code[u8] * nested_absmax[i // 256], then + offset (fp32, bnb's order)."""
    code = util.on_device(DYNAMIC_CODE, absmax.device) if nested_code is None else nested_code
    n = absmax.numel()
    a = code.index_select(0, absmax.reshape(-1).int())                      # (nb,)
    a = F.pad(a, (0, -n % nested_blocksize)).view(-1, nested_blocksize) * nested_absmax[:, None]
    return a.reshape(-1)[:n] + offset


# byte (hi << 4) | lo -> (NF4[hi], NF4[lo]): one gather per byte instead of unpacking nibbles
NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=-1)   # (256, 2)


DEQUANT_CHUNK = 1 << 22  # entries dequantized at a time: float32 temporaries of a chunk, not of the layer


def dequantize_nf4(packed, absmax, shape, dtype=torch.float32, blocksize=64, nested_absmax=None, offset=None,
                   nested_code=None):
    """Inverse of quantize_nf4 (accepts its dict as **kwargs): NF4[code] * absmax in float32, then cast to
    `dtype` (bnb casts to quant_state.dtype, the original weight dtype). Chunk by chunk
    into the output, so that the int32 codes and float32 values (10 bytes per entry) exist for
    DEQUANT_CHUNK entries at a time, not for the whole layer (docs/memory.md, "LoRA and QLoRA")."""
    n = math.prod(shape)
    if nested_absmax is not None:
        absmax = dequantize_absmax(absmax, nested_absmax, offset, nested_code)
    pairs, flat = util.on_device(NF4_PAIRS, packed.device), packed.reshape(-1)
    total = absmax.numel() * blocksize                                      # n rounded up to whole blocks
    out = torch.empty(total, dtype=dtype, device=packed.device)
    step = max(DEQUANT_CHUNK // blocksize, 1) * blocksize                   # whole blocks, an even count
    for s in range(0, total, step):
        e = min(s + step, total)
        vals = pairs.index_select(0, flat[s // 2:(e + 1) // 2].int()).reshape(-1)   # (<= e - s,) float32
        if vals.numel() != e - s:
            vals = F.pad(vals, (0, e - s - vals.numel()))                   # a tail block (never in SmolLM2)
        out[s:e] = (vals.view(-1, blocksize) * absmax[s // blocksize:e // blocksize, None]).reshape(-1)
    return out[:n].view(shape)


def nf4_bytes(module):
    """Bytes a quantized layer holds: packed codes + absmax (+ nested absmax and offset). The two code
    tables are shared constants (16 and 256 floats for the whole model), not counted per layer."""
    return sum(t.numel() * t.element_size() for t in (module.packed, module.absmax, module.nested_absmax,
                                                       module.offset, module.nested_code) if t is not None)

# -----------------------------------------------------------------------------
# the 4-bit linear layer (naive: dequantize the whole weight in every forward and backward)

_QUANT_BUFFERS = ("packed", "absmax", "nested_absmax", "offset", "nested_code")


def _adopt_nf4(dst, q, compute_dtype):
    """Register the NF4 quant state q (quantize_nf4's dict or another 4-bit module) on module dst."""
    get = q.get if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    for k in _QUANT_BUFFERS:
        dst.register_buffer(k, get(k))
    dst.shape, dst.dtype, dst.blocksize = tuple(get("shape")), get("dtype"), get("blocksize")
    dst.out_features, dst.in_features = dst.shape
    # bitsandbytes casts x to compute_dtype (Unsloth's bnb_4bit_compute_dtype = bfloat16, the dtype of
    # the official weights); None = the original weight dtype, i.e. bf16 for SmolLM2 on the GPU
    dst.compute_dtype = compute_dtype or get("compute_dtype") or dst.dtype


def _dequantize(m):
    return dequantize_nf4(m.packed, m.absmax, m.shape, m.dtype, m.blocksize, m.nested_absmax, m.offset, m.nested_code)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized on the fly. Only the 4-bit state is kept for backward, which
    dequantizes again (bnb's MatMul4Bit): memory stays at ~4 bits plus one transient
    layer. The weight gets no gradient."""
    @staticmethod
    def forward(ctx, x, m):
        ctx.m = m
        # dequantize to the weight's own dtype first, then to x's (bnb: dequantize_4bit(...).to(A.dtype))
        return F.linear(x, _dequantize(m).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        gx = grad @ _dequantize(ctx.m).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return gx, None


def nf4_linear(x, m):
    """bnb Linear4bit.forward: cast x to the compute dtype, 4-bit matmul, cast back to x's dtype."""
    return _NF4Matmul.apply(x.to(m.compute_dtype), m).to(x.dtype)


class Linear4bit(nn.Module):
    """A frozen nn.Linear (no bias) stored as NF4. Buffers: packed, absmax, nested_absmax, offset
    (and nested_code only for files whose 8-bit table differs from bnb's). Quantize AFTER any
    model.to(dtype): like every float buffer, the float32 statistics would be cast too."""
    def __init__(self, q, compute_dtype=None):
        super().__init__()
        _adopt_nf4(self, q, compute_dtype)

    @classmethod
    def from_linear(cls, linear, double_quant=True, blocksize=64, compute_dtype=None):
        if linear.bias is not None:
            raise ValueError("Linear4bit: layers with a bias are not supported (SmolLM2 has none)")
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), compute_dtype)

    def dequantize(self):
        return _dequantize(self)

    def forward(self, x):                     # x (B, T, in) -> (B, T, out)
        return nf4_linear(x, self)

    def extra_repr(self):
        dq = "double_quant" if self.nested_absmax is not None else "fp32 absmax"
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={self.blocksize}, {dq}, compute={self.compute_dtype}"

# -----------------------------------------------------------------------------
# LoRA (PEFT semantics: src/peft/tuners/lora/layer.py)

class LoRALinear(nn.Module):
    """Drop-in for nn.Linear or Linear4bit: y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r.
    The frozen base keeps its names: `weight` when unquantized, the NF4 buffers when quantized, so
    a base state dict loads into an adapted model unchanged. Adapters are float32 (PEFT's
    autocast_adapter_dtype); the base path never sees dropout."""
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.quantized = isinstance(base, Linear4bit)
        if self.quantized:
            _adopt_nf4(self, base, None)
        else:
            if getattr(base, "bias", None) is not None:
                raise ValueError("LoRALinear: layers with a bias are not supported (SmolLM2 has none)")
            self.in_features, self.out_features = base.in_features, base.out_features
            self.weight = base.weight
            self.weight.requires_grad_(False)
        dev = base.packed.device if self.quantized else base.weight.device
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank                # paper Table 4: alpha 32 -> 32/8/4/2 for r = 1/4/8/16
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        # PEFT init: A = kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), +1/sqrt(in)); B = 0, so the
        # adapted model starts exactly at the base model
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):                     # x (B, T, in) -> (B, T, out)
        y = nf4_linear(x, self) if self.quantized else F.linear(x, self.weight)
        # float32 adapters; but under autocast lora_A's GEMM runs in the autocast dtype anyway (as
        # PEFT's do), and casting x up first would only make autograd keep a float32 copy of x per
        # projection instead of sharing the layer's input (docs/memory.md): the same numbers without
        # it. With dropout (0 in Table 4) the cast stays, so that the mask is drawn as before
        keep = torch.is_autocast_enabled(x.device.type) and isinstance(self.lora_dropout, nn.Identity)
        a = self.lora_dropout(x if keep else x.to(self.lora_A.weight.dtype))
        # fp32 sum, then back to the base dtype (PEFT: result + lora * scaling, result.to(dtype))
        return (y + self.lora_B(self.lora_A(a)) * self.scaling).to(y.dtype)

    def delta_weight(self):
        """B @ A * alpha/r, (out, in) float32: what the adapter adds to the base weight (adapter_files.merge_adapters)."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}, nf4={self.quantized}"


def _targets(model, types):
    """(parent, child_name, full_name) of every target projection whose module is one of `types`."""
    out = []
    for name, mod in model.named_modules():
        for child in TARGETS:
            sub = getattr(mod, child, None)
            if isinstance(sub, types):
                out.append((mod, child, f"{name}.{child}" if name else child))
    return out


def quantize_model(model, double_quant=True, blocksize=64, compute_dtype=None):
    """Replace the 7 projections of every layer by Linear4bit, in place (embeddings, norms and the
    tied lm_head stay as they are, as in the Unsloth checkpoint). Returns the model."""
    if _targets(model, LoRALinear):
        raise ValueError("quantize_model: the model already has LoRA adapters; quantize first, then apply_lora")
    todo = _targets(model, nn.Linear)
    if not todo and not _targets(model, Linear4bit):
        raise ValueError(f"quantize_model: no {'/'.join(TARGETS)} nn.Linear found")
    for parent, child, _ in util.progress(todo, desc="nf4", unit="layer"):
        setattr(parent, child, Linear4bit.from_linear(getattr(parent, child), double_quant, blocksize, compute_dtype))
    return model


def is_quantized(model):
    """Whether the base is 4-bit: bare NF4 layers, or LoRA layers holding the NF4 state themselves."""
    return any(isinstance(m, Linear4bit) or getattr(m, "quantized", False) is True for m in model.modules())


def apply_lora(model, rank, alpha, dropout=0.0):
    """Freeze everything and put a LoRA adapter on the 7 projections of every layer (quantized or
    not). Seed torch before calling for reproducible A. Returns the trainable parameters, in module
    order (lora_A, lora_B of each projection)."""
    if rank < 1:
        raise ValueError(f"apply_lora: rank must be >= 1, got {rank}")
    if _targets(model, LoRALinear):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    todo = _targets(model, (nn.Linear, Linear4bit))
    if not todo:
        raise ValueError(f"apply_lora: no {'/'.join(TARGETS)} layer found")
    check_rank(rank, [(getattr(p, c).out_features, getattr(p, c).in_features) for p, c, _ in todo])
    model.requires_grad_(False)
    params = []
    for parent, child, _ in todo:
        lora = LoRALinear(getattr(parent, child), rank, alpha, dropout)
        setattr(parent, child, lora)
        params += [lora.lora_A.weight, lora.lora_B.weight]
    for p in params:
        p.requires_grad_(True)
    return params


def check_rank(rank, shapes):
    """--rank against the (out, in) shapes of the layers it adapts: rigsa.setup asks before the base loads
    (and, for qlora, is quantized), apply_lora again."""
    narrow = min(min(s) for s in shapes)
    if rank > narrow:   # no more than min(m, n) can be reached: a typo, found otherwise by running out of memory
        raise ValueError(f"--rank {rank}: above the narrowest adapted layer's width, {narrow}; the product B A of an m x n "
                         f"layer has rank at most min(m, n), so use --rank {narrow} or less")


def attach(model, quantize, seed, rank, alpha, dropout):
    """rigsa.py train --method lora | qlora (§5.3): the base made 4-bit first for qlora (unless it was
    loaded so), then LoRA on every target, its A initialised from `seed`."""
    if quantize and not is_quantized(model):
        quantize_model(model)
    torch.manual_seed(seed)
    apply_lora(model, rank, alpha, dropout)


def load_adapter(model, tensors, quantized, rank, alpha, path):
    """A saved LoRA (quantized=False) or QLoRA adapter's tensors into a loaded base, in place: a QLoRA
    adapter makes the base 4-bit; a LoRA adapter is refused on a 4-bit base (`path` names it)."""
    if quantized and not is_quantized(model):
        quantize_model(model)
    if not quantized and is_quantized(model):
        raise ValueError(f"{path}: a LoRA adapter of the unquantized base, and this base is 4-bit (NF4); "
                         f"drop --quantize (a QLoRA adapter is trained on the 4-bit base)")
    load_lora(model, tensors, rank, alpha)


def lora_num_params(cfg, rank):
    """r * (in + out) summed over the 7 projections of every layer, from the config's shapes alone."""
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = (C + q) + 2 * (C + kv) + (q + C) + 2 * (C + I) + (I + C)
    return rank * per_layer * L


def lora_state_dict(model):
    """The adapter tensors only, named like the model's state dict:
    'model.layers.0.self_attn.q_proj.lora_A.weight' (r, in) and '...lora_B.weight' (out, r)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}


PEFT_PREFIX = "base_model.model."


def own_name(k):
    """A LoRA tensor's name in lora_state_dict's spelling, from its own or PEFT's."""
    k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
    return k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def load_lora(model, tensors, rank, alpha, dropout=0.0):
    """Load adapter tensors (lora_state_dict names, or PEFT's with 'base_model.model.' and an optional
    '.default') into the model, applying LoRA first if it has none. Every adapter must be present
    with the right shape. Returns the LoRA parameters."""
    norm = {own_name(k): v for k, v in tensors.items()}
    if not _targets(model, LoRALinear):
        apply_lora(model, rank, alpha, dropout)
    own = lora_state_dict(model)
    for k in own:
        if k not in norm:
            raise ValueError(f"load_lora: adapter tensor '{k}' missing")
    for k, v in norm.items():
        if k not in own:
            raise ValueError(f"load_lora: unexpected tensor '{k}' (not a LoRA weight of this model)")
        if not v.is_floating_point() or v.dtype == torch.float64:   # float64 would be rounded on the way in
            raise ValueError(f"load_lora: tensor '{k}' is {str(v.dtype).removeprefix('torch.')}, not a float of 32 bits "
                             f"or fewer (rigsa writes float32)")
        if v.shape != own[k].shape:
            raise ValueError(f"load_lora: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)} "
                             f"(rank {rank})")
    params = []
    with torch.no_grad():
        for parent, child, _ in _targets(model, LoRALinear):
            lora = getattr(parent, child)
            lora.rank, lora.alpha, lora.scaling = rank, alpha, alpha / rank
            params += [lora.lora_A.weight, lora.lora_B.weight]
        sd = dict(model.named_parameters())
        for k, v in norm.items():
            sd[k].copy_(v.to(sd[k].dtype))
    return params


# -----------------------------------------------------------------------------
# PEFT's on-disk format (save_pretrained's adapter_model.safetensors and adapter_config.json)

def save_peft(model, out_dir, rank, alpha, dropout, base_model_name, revision=None):
    """Write adapter_model.safetensors (PEFT key names, float32) and adapter_config.json so the adapter
    loads with peft.PeftModel.from_pretrained(base, out_dir); `revision`: the base's hub commit."""
    sd = lora_state_dict(model)
    if not sd:
        raise ValueError("save_peft: the model has no LoRA adapters")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in sd.items()}
    util.atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
            lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    targets = sorted({k.split(".")[-3] for k in sd})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "revision": revision,
    }
    util.atomic_write(os.path.join(out_dir, "adapter_config.json"),
            lambda p: Path(p).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"))
    return out_dir


def read_peft(adapter_dir):
    """-> (tensors, config) of a PEFT LoRA adapter directory, with one clear error for bad input.
    Pass them to load_lora(model, tensors, config['r'], config['lora_alpha'])."""
    d = Path(adapter_dir)
    try:
        cfg = util.read_json(d / "adapter_config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{d / 'adapter_config.json'}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'adapter_config.json'}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"{d / 'adapter_config.json'}: only plain LoRA adapters are supported")
    f = d / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found")
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise ValueError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return tensors, cfg

# -----------------------------------------------------------------------------
# bitsandbytes / Unsloth pre-quantized checkpoints (e.g. unsloth/SmolLM2-1.7B-Instruct-bnb-4bit)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_bnb_state_dict(model):
    """The state dict in transformers' bitsandbytes 4-bit layout, six tensors per quantized Linear
    (weight, weight.absmax, weight.nested_absmax, weight.nested_quant_map, weight.quant_map,
    weight.quant_state.bitsandbytes__nf4) and the other weights as they are (no tied lm_head)."""
    quant = {name: getattr(p, c) for p, c, name in _targets(model, (Linear4bit, LoRALinear))
             if getattr(getattr(p, c), "packed", None) is not None}
    sd = {}
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in quant or ".lora_" in k or (k == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        sd[k] = v
    for name, m in quant.items():
        meta = {"quant_type": "nf4", "blocksize": m.blocksize, "dtype": str(m.dtype).replace("torch.", ""),
                "shape": list(m.shape)}
        sd[f"{name}.weight"] = m.packed
        sd[f"{name}.weight.absmax"] = m.absmax
        sd[f"{name}.weight.quant_map"] = NF4_CODE.clone()
        if m.nested_absmax is not None:
            meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=m.offset.item())
            sd[f"{name}.weight.nested_absmax"] = m.nested_absmax
            sd[f"{name}.weight.nested_quant_map"] = DYNAMIC_CODE.clone() if m.nested_code is None else m.nested_code
        sd[f"{name}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                          dtype=torch.uint8)
    return sd


def load_prequantized(state_dict, model, compute_dtype=None, device=None):
    """Load a bitsandbytes 4-bit state dict (Unsloth's unsloth/SmolLM2-1.7B-Instruct-bnb-4bit layout)
    into a freshly built Model, in place: a projection is quantized iff its
    'weight.quant_state.bitsandbytes__nf4' entry exists; all other tensors load as usual. A model
    built on the meta device gets its tensors assigned (on `device`, the others in compute_dtype),
    so that no bfloat16 copy of the projections is ever allocated."""
    sd = dict(state_dict)
    own = model.state_dict()
    for parent, child, name in _targets(model, nn.Linear):
        key = f"{name}.weight.quant_state.bitsandbytes__nf4"
        if key not in sd:
            continue
        try:
            meta = json.loads(bytes(sd.pop(key).tolist()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{key}: not a valid quant_state JSON ({e})") from None
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r} is not supported (only nf4)")
        lin = getattr(parent, child)
        shape = tuple(meta["shape"])
        if shape != tuple(lin.weight.shape):
            raise ValueError(f"{key}: shape {shape}, expected {tuple(lin.weight.shape)}")
        if meta.get("dtype") not in _DTYPES:
            raise ValueError(f"{key}: dtype {meta.get('dtype')!r} is not supported")
        try:
            qmap = sd.pop(f"{name}.weight.quant_map")
            q = dict(packed=sd.pop(f"{name}.weight"), absmax=sd.pop(f"{name}.weight.absmax"), nested_absmax=None,
                     offset=None, nested_code=None, shape=shape, dtype=_DTYPES[meta["dtype"]],
                     blocksize=int(meta["blocksize"]))
            if f"{name}.weight.nested_absmax" in sd:
                q["nested_absmax"] = sd.pop(f"{name}.weight.nested_absmax").float()
                q["offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
                nmap = sd.pop(f"{name}.weight.nested_quant_map").float()
                if not torch.equal(nmap.cpu(), DYNAMIC_CODE):   # keep a table that differs, to stay exact
                    q["nested_code"] = nmap
        except KeyError as e:
            raise ValueError(f"{name}: 4-bit tensor {e} missing from the checkpoint") from None
        if not torch.equal(qmap.float().cpu(), NF4_CODE):
            raise ValueError(f"{name}.weight.quant_map: not the NF4 table")
        n = math.prod(shape)
        if q["packed"].numel() != (n + 1) // 2 or q["absmax"].numel() != -(-n // q["blocksize"]):
            raise ValueError(f"{name}.weight: packed/absmax sizes do not match shape {shape}")
        dev = device if lin.weight.is_meta else lin.weight.device
        q = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in q.items()}
        setattr(parent, child, Linear4bit(q, compute_dtype))
    quant = {n for _, _, n in _targets(model, Linear4bit)}
    for k in sd:
        if k not in own or k.rsplit(".", 1)[0] in quant:
            raise ValueError(f"load_prequantized: unexpected tensor '{k}'")
    tied = getattr(model.config, "tie_word_embeddings", False)
    for k in own:
        if k not in sd and k.rsplit(".", 1)[0] not in quant and not (tied and k == "lm_head.weight"):
            raise ValueError(f"load_prequantized: tensor '{k}' missing from the checkpoint")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"load_prequantized: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    if any(p.is_meta for p in model.parameters()):    # embeddings and norms, straight into place
        model.load_state_dict({k: v.to(device, compute_dtype) for k, v in sd.items()}, strict=False, assign=True)
        if tied:                                      # assign=True gave lm_head a Parameter of its own
            model.lm_head.weight = model.model.embed_tokens.weight
    else:
        with torch.no_grad():
            params = dict(model.named_parameters(remove_duplicate=False))
            for k, v in sd.items():
                params[k].copy_(v)
    model.eval().requires_grad_(False)
    return model


def _quantization(path):
    try:
        return M.quantization(path)
    except (FileNotFoundError, json.JSONDecodeError):   # model.check_checkpoint says what is wrong with config.json
        return {}


def check_model(path):
    """What load_model refuses before it reads a weight, for a caller to check before its own long work.
    -> (config, tokenizer, quantization_config)."""
    qc = _quantization(path)
    if not qc.get("load_in_4bit"):
        return (*M.check_checkpoint(path), qc)
    if qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ValueError(f"{path}: 4-bit quant type {qc.get('bnb_4bit_quant_type')!r} is not supported (only nf4)")
    cfg = M.SmolLM2Config.from_json(Path(path) / "config.json")
    return cfg, M.check_vocab(cfg, M.load_tokenizer(path), path), qc


def load_model(name_or_path, device=None, dtype=None, revision=None):
    """model.load, plus bitsandbytes 4-bit checkpoints (config.json with quantization_config
    load_in_4bit, e.g. unsloth/SmolLM2-1.7B-Instruct-bnb-4bit). -> (model, tokenizer)."""
    path = M.resolve(name_or_path, revision)
    if not _quantization(path).get("load_in_4bit"):   # model.load checks the checkpoint itself
        return M.load(path, device, dtype, revision=revision)
    cfg, tok, qc = check_model(path)
    device = util.pick_device(device)
    dtype = dtype or _DTYPES.get(qc.get("bnb_4bit_compute_dtype"), torch.bfloat16)
    with torch.device("meta"):               # nothing allocated until the file's own tensors are assigned
        model = M.Model(cfg)
    sd = {k: v for k, (v, _) in M.read_safetensors(path).items()}
    M.check_tied_head(cfg, sd, path)
    sd.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    load_prequantized(sd, model, compute_dtype=dtype, device=device)
    return model, tok
