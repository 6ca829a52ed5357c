"""
A hand-written SmolLM2 (Llama architecture) that loads the official Hugging Face checkpoints
as published and gives the same logits as transformers' LlamaForCausalLM.

    model, tok = load("HuggingFaceTB/SmolLM2-1.7B-Instruct")   # or a local directory
    print(generate(model, tok, [tok.chat([{"role": "user", "content": "Hi"}])], 64)[0])

Module names equal the checkpoint keys (model.layers.3.self_attn.q_proj, ...) and RoPE is the
rotate-half kind, so loading is one load_state_dict with no mapping table. This file knows
nothing of adapters, tasks or benchmarks. Shapes: B batch, T time, C hidden, nh query heads,
nkv key/value heads, hd head dim, V vocab.
"""
import copy
import errno
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields, asdict
from pathlib import Path

from lib import interrupts  # standard library only: before torch

if __name__ == "__main__":   # a signal while torch loads (a second or two): one line, no traceback; main() then takes over
    interrupts.early()

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from lib import util

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"

# -----------------------------------------------------------------------------
# config

@dataclass
class SmolLM2Config:
    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 64
    max_position_embeddings: int = 8192
    rope_theta: float = 130000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    @classmethod
    def from_json(cls, path):
        """Read a Hugging Face config.json strictly: a missing number is an error, never a default."""
        path = Path(path)
        try:
            d = util.read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a JSON {type(d).__name__}, not a model's config (a mapping); use the model's own config.json")
        arch = d.get("architectures") or []
        if d.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            if isinstance(d.get("config"), dict) and "base" in d:   # a training run's folder (rigsa.py train --out)
                raise ValueError(f"{path}: a training run's record, not a model's config; pass the model it names "
                                 f"under \"base\", or a merge of its adapter (rigsa.py merge)")
            raise ValueError(f"{path}: not a Llama architecture (model_type={d.get('model_type')!r}, "
                             f"architectures={arch}); this loader only reads Llama-style SmolLM2 checkpoints")
        # rope_theta is top-level in the official files (transformers 4.4x) and under
        # rope_parameters in files written by transformers 5. A silent 10000 would be 13x wrong.
        theta = d.get("rope_theta")
        if theta is None:
            theta = (d.get("rope_parameters") or {}).get("rope_theta")
        if theta is None:
            raise ValueError(f"{path}: missing field 'rope_theta' (neither top-level nor under 'rope_parameters')")

        def number(name, v, kind):   # JSON's positive numbers only: null, "64", 64.7 for an int, 0 or NaN is a damaged file
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                    or kind is int and not float(v).is_integer()):
                raise ValueError(f"{path}: field '{name}' is {json.dumps(v)}, expected a positive "
                                 f"{'whole number' if kind is int else 'number'}; the file is damaged or hand-edited: "
                                 f"use the model's own config.json")
            return kind(v)
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("rope_type", "default")
        if scaling not in (None, "default"):
            raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported (SmolLM2 has none)")
        for k, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if d.get(k, want) != want:
                raise ValueError(f"{path}: field '{k}' is {d[k]!r}, expected {want!r}")
        kw = {}
        for f in fields(cls):
            if f.name == "rope_theta":
                kw[f.name] = number(f.name, theta, float)
            elif f.name == "head_dim":  # written for 135M/360M, absent for 1.7B: after the others, below
                continue
            elif f.name == "tie_word_embeddings":   # transformers' LlamaConfig reads a missing one as false
                kw[f.name] = d.get(f.name, False)
                if not isinstance(kw[f.name], bool):
                    raise ValueError(f"{path}: field 'tie_word_embeddings' is {json.dumps(kw[f.name])}, expected true or false")
            elif f.name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = d.get(f.name)
                kw[f.name] = v[0] if isinstance(v, list) else v
            elif f.name not in d:
                raise ValueError(f"{path}: missing field '{f.name}'")
            else:
                kw[f.name] = number(f.name, d[f.name], f.type)
        kw["head_dim"] = (number("head_dim", d["head_dim"], int) if d.get("head_dim") is not None
                          else kw["hidden_size"] // kw["num_attention_heads"])
        return cls(**kw)

# numbers from the official config.json files (HuggingFaceTB/SmolLM2-*-Instruct on the Hub)
PRESETS = {
    "SmolLM2-135M-Instruct": SmolLM2Config(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                           num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "SmolLM2-360M-Instruct": SmolLM2Config(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                           num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0),
    "SmolLM2-1.7B-Instruct": SmolLM2Config(),
}

# -----------------------------------------------------------------------------
# the network

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # transformers' order: normalize in float32, cast back, THEN multiply by the weight.
        # (F.rms_norm multiplies in float32, which differs by one bf16 rounding in many elements.)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    # split-halves RoPE: dimension j pairs with j + hd/2 (the HF layout SmolLM2 was trained in)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


DECODE_GROUP = 16  # decoding rows attend in blocks of this many, each over its own longest row only


class KVCache:
    """Static per-layer key/value buffers in KV-head space, (B, nkv, Smax, hd). Row b holds its
    own tokens in slots 0 .. len[b]-1, with no padding in between: prompts of different lengths
    are prefilled one by one (row(i)) and then decode side by side, each new token written at its
    row's own next slot. Decoding rows attend in blocks of DECODE_GROUP rows (filled in order of
    length, so a block reads few slots beyond its own rows'). `blocks` lists each block's first
    row and how many of its rows are live, always its first ones; the live rows, block after
    block, are the batch. A forward pass calls prepare() before the layers, attend() in each
    layer and advance() after them."""
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.len = torch.zeros(batch_size, dtype=torch.long, device=device)  # filled slots per row
        self.blocks = [[a, min(DECODE_GROUP, batch_size - a)] for a in range(0, batch_size, DECODE_GROUP)]
        # the current step's placement, set by prepare(): cache rows (B,), their first free slot (B,),
        # and for decoding the blocks' (batch offset, first row, rows, slots to read, mask)
        self.rows, self.start, self.plan = None, None, []

    def live(self):
        """The cache rows of the batch's rows, in batch order."""
        return [a + j for a, n in self.blocks for j in range(n)]

    def row(self, i):
        """Row i as a batch-1 cache on the same buffers: prefilling it fills the batch's row in place."""
        c = copy.copy(self)
        c.k, c.v, c.len = [k[i:i + 1] for k in self.k], [v[i:i + 1] for v in self.v], self.len[i:i + 1]
        c.blocks = [[0, 1]]
        return c

    def drop(self, rows):
        """Rows (cache row indices) leave the batch. A block's last live row takes each place that
        opens before it, so one row's filled slots are copied per finished row, where compacting
        the whole batch would copy every row's (and hold the cache twice while it ran; BENCHMARKS.md,
        make bench-generate). Returns {old row: new row} for the moved rows."""
        gone, moved = set(rows), {}
        for blk in self.blocks:
            a, n = blk
            live = [r for r in range(a, a + n) if r not in gone]
            holes = [r for r in range(a, a + len(live)) if r in gone]
            for dst, src in zip(holes, [r for r in live if r >= a + len(live)]):
                used = int(self.len[src])
                for buf in self.k + self.v:
                    buf[dst, :, :used] = buf[src, :, :used]
                self.len[dst] = self.len[src]
                moved[src] = dst
            blk[1] = len(live)
        self.blocks = [blk for blk in self.blocks if blk[1]]
        return moved

    def prepare(self, B, T):
        """Before the layers: place an input of B rows x T tokens, all real. T > 1 is a prompt's
        prefill into empty rows (generate_ids does one at a time); T == 1 is one token for each
        of the batch's rows (live(), any lengths). -> the tokens' positions (B, T), = their slots."""
        live = self.live()
        if len(live) != B:
            raise ValueError(f"the cache has {len(live)} live rows, the input {B}")
        dev = self.len.device
        self.rows = torch.tensor(live, device=dev)                              # (B,) cache rows
        self.start = self.len[self.rows]                                        # (B,) first free slot
        if T > 1 and bool(self.start.any()):
            raise ValueError("a multi-token input to a KV cache must fill empty rows (a prompt's prefill)")
        if T == 1:
            # each block of rows attends over the slots its longest row has filled; a
            # (n, 1, 1, S) mask hides the rest from shorter rows. One host sync per step
            ends, self.plan, i = self.len.tolist(), [], 0
            for a, n in self.blocks:
                S = max(ends[a:a + n]) + 1
                m = None if min(ends[a:a + n]) + 1 == S else \
                    (torch.arange(S, device=dev) <= self.len[a:a + n, None])[:, None, None, :]
                self.plan.append((i, a, n, S, m))
                i += n
        return self.start[:, None] + torch.arange(T, device=dev)

    def attend(self, layer, q, k, v):
        """Store this layer's new keys and values, then attend. q (B, nh, T, hd), k, v (B, nkv, T, hd)
        -> (B, nh, T, hd)."""
        K, V = self.k[layer], self.v[layer]                                     # (B, nkv, Smax, hd)
        B, nh, T, hd = q.shape
        nkv = K.shape[1]
        if T > 1:  # prefill of empty rows: store, then attend to its own k, v (the causal kernel)
            K[:, :, :T], V[:, :, :T] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
        K[self.rows, :, self.start], V[self.rows, :, self.start] = k[:, :, 0], v[:, :, 0]
        # a block of rows reads only the slots its longest row has filled, not the batch's longest.
        # The g query heads of KV group j become g query rows of that group, so SDPA sees plain
        # attention over nkv heads: no K/V expansion, and faster on CPU than enable_gqa with a mask
        qg = q.reshape(B, nkv, nh // nkv, hd)                                   # (B, nkv, g, hd)
        y = torch.cat([F.scaled_dot_product_attention(qg[i:i + n], K[a:a + n, :, :S], V[a:a + n, :, :S], attn_mask=m)
                       for i, a, n, S, m in self.plan])                        # (B, nkv, g, hd)
        return y.reshape(B, nh, 1, hd)

    def advance(self, T):
        """After the layers: the T tokens now fill their slots."""
        self.len[self.rows] += T


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(C, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(C, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, C, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        """mask: None (causal, no padding) or boolean (B, 1, T, S), query t sees key s.
        cache: a KVCache to store into and attend over; `layer` is this layer's index in it."""
        B, T, C = x.shape
        # rows h*hd:(h+1)*hd of q_proj belong to head h, so a plain view splits the heads
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)    # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)   # (B, nkv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA: kv head j serves query heads j*g .. j*g+g-1 (= repeat_interleave, without the copy)
        gqa = self.nkv != self.nh
        if cache is not None:
            y = cache.attend(layer, q, k, v)                                    # (B, nh, T, hd)
        elif mask is None:  # no padding, no past: the fast causal kernel (a single token sees itself)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # exists only so that keys read "model.layers.3...."
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE frequencies, computed on the CPU in float32 exactly as transformers does
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
        # set by a trainer: keep only each decoder layer's input for the backward and recompute the
        # layer there (activation memory ~ one layer's instead of all of them, for a second forward)
        self.checkpoint_layers = False

    def forward(self, input_ids, attention_mask=None, hidden_only=False, cache=None, position_ids=None):
        """input_ids (B, T); attention_mask (B, T) with 1 for real tokens, 0 for padding (left or
        right). Returns logits (B, T, V), or the final-normed hidden states (B, T, C).
        For packed rows (several sequences, or a tree of continuations sharing one context, in one
        row), attention_mask may instead be boolean (B, T, T), query t sees key s, with every query
        seeing itself, together with position_ids (B, T); no cache then.
        With a KVCache, every input token is real and is appended to the cache (KVCache.prepare)."""
        B, T = input_ids.shape
        dev = input_ids.device
        # no position past the model's (RoPE would run on without a word); packed rows restart their positions per
        # segment, so theirs are what counts; with a KV cache, generate_ids keeps prompt and new tokens within them
        last = T if position_ids is None else int(position_ids.max()) + 1
        if cache is None and last > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {last} tokens, more than the model's {self.config.max_position_embeddings} "
                             f"positions (config.json's max_position_embeddings); shorten it, or use a model with more")
        if cache is not None:
            if (attention_mask is not None and not bool(attention_mask.bool().all())) or position_ids is not None:
                raise ValueError("with a KV cache every input token must be real (no padding), at its slot's position")
            pos = cache.prepare(B, T)                                          # (B, T) slot = position
            x = self._run(input_ids, pos, None, cache, hidden_only)
            cache.advance(T)
            return x
        if attention_mask is not None and attention_mask.dim() == 3:
            if position_ids is None:
                raise ValueError("a (B, T, T) attention_mask needs position_ids")
            return self._run(input_ids, position_ids, attention_mask[:, None], None, hidden_only)
        real = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        # per-row positions count real tokens only (transformers' cumsum - 1 convention), so a
        # padded row sees the same positions, hence the same logits, as the row alone
        pos = (real.long().cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids  # (B, T)
        mask = None
        if T > 1 and attention_mask is not None and not bool((real[:, 1:] <= real[:, :-1]).all()):
            # left padding: causal AND the key is real; every query also sees itself so that a pad
            # query never gets an all-masked row (NaN on some kernels). Without left padding (right
            # padding at most) the causal kernel is exact for every real query, and skips the upper
            # triangle an explicit mask would compute
            mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & real[:, None, :]  # (B, T, T)
            mask[:, torch.arange(T, device=dev), torch.arange(T, device=dev)] = True
            mask = mask[:, None]                                                # (B, 1, T, T)
        return self._run(input_ids, pos, mask, None, hidden_only)

    def _run(self, input_ids, pos, mask, cache, hidden_only):
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)          # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                # (B, T, hd)
        x = self.model.embed_tokens(input_ids)                                 # (B, T, C)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]  # (B, 1, T, hd)
        ckpt = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.model.layers):
            # non-reentrant: the recomputation replays autocast and the RNG (dropout) as they were,
            # so the gradients are those of the plain graph
            x = (torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False) if ckpt
                 else block(x, cos, sin, mask, cache, i))
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)

# -----------------------------------------------------------------------------
# tokenizer and chat format

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (not transformers: transformers 5 drops
    SmolLM2's digit-splitting pre-tokenizer: AutoTokenizer's GPT2Tokenizer rebuilds the pipeline
    without the Digits step)."""
    def __init__(self, path, eos_token=None, bos_token=None, pad_token=None, system_prompt=DEFAULT_SYSTEM):
        from tokenizers import Tokenizer as _Tok
        self.path = str(path)
        try:
            self.tok = _Tok.from_file(self.path)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.special_ids = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.eos_id = self._id(eos_token or "<|im_end|>")
        self.bos_id = self._id(bos_token or "<|im_start|>")
        self.pad_id = self._id(pad_token) if pad_token else self.eos_id
        self.system_prompt = system_prompt  # None: the template injects no system turn
        self.chat_template = None           # load_tokenizer: the checkpoint's own template, if any
        self.template_unread = None         # load_tokenizer: why that template is not the ChatML chat() writes

    def _id(self, token):
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: token {token!r} not in the vocabulary")
        return i

    def encode(self, text):
        # no BOS: SmolLM2's post-processor adds none, and lm-eval encodes it the same way
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages, add_generation_prompt=True):
        """ChatML exactly as SmolLM2-Instruct's chat template renders it, including the default
        system prompt it injects when the first message is not a system message."""
        out = ""
        if messages and messages[0]["role"] != "system" and self.system_prompt is not None:
            out += f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if add_generation_prompt:
            out += "<|im_start|>assistant\n"
        return out


def render_chat_template(template, messages, add_generation_prompt=False, **special_tokens):
    """A Hugging Face chat_template rendered as transformers renders it: Jinja in an immutable
    sandbox (a template comes from the hub, so it is untrusted code), trim_blocks and lstrip_blocks,
    loop controls, raise_exception and a tojson that does not escape HTML."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


def template_system_prompt(template, **special_tokens):
    """The system prompt a chat template injects before a lone user message, or None if it injects
    none: render one user message and read the turn in front of it. Rendering, not a regex over
    the template's source, so that any spelling works (the official tokenizer_config.json decodes
    to real newlines inside the Jinja strings, tiny.CHAT_TEMPLATE has \\n escapes). ValueError if
    the output is not ChatML as Tokenizer.chat writes it."""
    probe = "\x00probe\x00"  # content no template text can be confused with
    out = render_chat_template(template, [{"role": "user", "content": probe}], **special_tokens)
    user = re.escape(f"<|im_start|>user\n{probe}<|im_end|>\n")
    m = re.fullmatch(r"(?:<\|im_start\|>system\n(.*)<\|im_end\|>\n)?" + user, out, re.S)
    if not m:
        raise ValueError(f"one user message renders as {out[:120]!r}, not SmolLM2's ChatML")
    return m.group(1)


_SAID = set()   # load_tokenizer's warnings said in this process


def load_tokenizer(path):
    """Tokenizer from a checkpoint directory; special tokens come from tokenizer_config.json, and the
    default system prompt from rendering its chat_template (or chat_template.jinja, which
    transformers prefers). Without a template: DEFAULT_SYSTEM. With one that does not render as
    ChatML: DEFAULT_SYSTEM, and a warning on stderr (chat() then differs from the template)."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: tokenizer file not found")
    kw, template, tc = {}, None, path / "tokenizer_config.json"
    if tc.exists():
        try:
            d = util.read_json(tc)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{tc}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{tc}: a JSON {type(d).__name__}, not a tokenizer's config (a mapping); use the model's own")
        for k in ("eos_token", "bos_token", "pad_token"):
            v = d.get(k)
            kw[k] = v.get("content") if isinstance(v, dict) else v
        template = d.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").exists():
        try:
            tc, template = path / "chat_template.jinja", (path / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path / 'chat_template.jinja'}: not UTF-8 text ({e}); use the model's own") from None
    unread = None
    if template:
        try:
            kw["system_prompt"] = template_system_prompt(template, **{k: v for k, v in kw.items() if v})
        except Exception as e:  # a template is code from the hub: any failure means "cannot tell"
            unread = f"{tc}: chat_template not understood ({type(e).__name__}: {' '.join(str(e).split())})"
            if unread not in _SAID:   # once per process: the commands read a tokenizer before the load, then in it
                _SAID.add(unread)
                util.say(f"warning: {unread}; chat() writes ChatML with SmolLM2's default system prompt", file=sys.stderr)
    tok = Tokenizer(path / "tokenizer.json", **kw)
    tok.chat_template = template or None   # the checkpoint's own, if any (chat() writes ChatML either way)
    tok.template_unread = unread           # why chat() is not what that template renders (evals --chat refuses it)
    return tok

# -----------------------------------------------------------------------------
# loading checkpoints

READ_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")   # besides the weights
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]
COMMIT = re.compile(r"[0-9a-f]{40}")
LOCAL_DIR = "pass a local directory with config.json, tokenizer.json and model.safetensors instead"


def hub_commit(path):
    """The commit of a huggingface_hub cache snapshot (.../models--org--name/snapshots/<sha>/), or
    None for any other directory. Runs record it and pass it back as resolve(repo, revision=sha),
    which a cache then answers with no network at all (a commit never changes)."""
    p = Path(path).absolute()
    ok = COMMIT.fullmatch(p.name) and p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--")
    return p.name if ok else None


def check_revision(name, revision):
    """--revision with a local model directory (not a hub snapshot) is refused: it has no revisions,
    and silently ignoring the flag would name a version the numbers did not come from."""
    if revision and os.path.isdir(name) and not hub_commit(name):
        raise ValueError(f"--revision {revision}: the model {name} is a local directory, which has no revisions "
                         f"(its files are used as they are); drop --revision")


def base_identity(path, chunks=16, chunk_bytes=1 << 16):
    """A resolved checkpoint directory's identity, {"commit": hub commit or None, "fingerprint": 16
    hex}: sha256 over its config and tokenizer files, and each weight file's name, size and `chunks`
    slices of `chunk_bytes` spread evenly through it (the header first): 1 MB of weights is read
    whatever the model's size. Another
    checkpoint of the same shapes (other weights) differs in every slice; adapters and runs record
    it, so that they are not applied to a base they were not trained on. A base with a
    chat_template.jinja also gets "without_template": the fingerprint before that file was covered
    (2026-12-05), which files recorded earlier hold (adapter_files.check_base names the case)."""
    path = Path(path)
    files = [n for n in READ_FILES if (path / n).is_file()]   # a base without one hashes as before it was covered
    hs = {"fingerprint": hashlib.sha256()}
    if "chat_template.jinja" in files:
        hs["without_template"] = hashlib.sha256()
    for name in files:   # what the numbers also depend on: each file load() and load_tokenizer() read
        for k, h in hs.items():
            if k == "fingerprint" or name != "chat_template.jinja":
                h.update(name.encode() + b"\n" + (path / name).read_bytes())
    for p in sorted(path.glob("*.safetensors")):
        size = p.stat().st_size
        with open(p, "rb") as f:
            data = [f"{p.name}:{size}\n".encode()]
            for i in range(chunks):
                f.seek(max(0, size - chunk_bytes) * i // max(chunks - 1, 1))
                data.append(f.read(chunk_bytes))
        for h in hs.values():
            for b in data:
                h.update(b)
    return {"commit": hub_commit(path), **{k: h.hexdigest()[:16] for k, h in hs.items()}}


def resolve(name_or_path, revision=None, verify=False, offline=False):
    """A local directory as is, or a hub repo id -> its snapshot directory in the huggingface_hub cache
    (HUB_FILES only). A commit sha already cached needs no hub at all: runs record hub_commit(path)
    and pass it back. Otherwise one model_info call says which commit `revision` (default main) is
    and each file's size and checksum; it, and a HEAD before each missing file, time out after
    HF_HUB_ETAG_TIMEOUT (10 s), a download's reads after HF_HUB_DOWNLOAD_TIMEOUT (10 s; huggingface_hub
    retries a stalled body 5 times). If the hub cannot be asked (offline, refused, timeout, 5xx), a
    cached snapshot is used, with a one-line warning on stderr; with none cached, or a 404:
    RuntimeError, one line "<repo>: <what is wrong, in the hub's own words>; <what to do>".
    Cached files are checked against the hub's sizes whenever it answers (a truncated file);
    verify=True also hashes them against its sha256 (LFS) or git blob id, or offline against the
    ETags the cache names its blobs by: only that finds a byte changed inside the tensor data,
    which safetensors cannot see. A bad file: ValueError naming it and the blob to delete.
    offline=True (the CLIs' --offline), like HF_HUB_OFFLINE=1: the cache or an error, no request."""
    if os.path.isdir(name_or_path):
        path = Path(name_or_path)
        # a snapshot passed as a path: its blob names are the hub's checksums (_cached_checksums)
        return _checked(path, _cached_checksums(path), name_or_path, verify) if verify else path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such model directory (and not a hub id like 'org/name')")
    from huggingface_hub import (HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                                 try_to_load_from_cache)
    from huggingface_hub.utils import filter_repo_objects
    repo, revision, timeout = name_or_path, revision or None, constants.HF_HUB_ETAG_TIMEOUT  # "" is the default too
    why = "--offline" if offline else "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None
    if why or (revision and COMMIT.fullmatch(revision) and not verify):
        path = _cached(repo, revision)
        if path is not None:
            return _checked(path, _cached_checksums(path), repo, verify)
        if why:
            undo = "drop --offline" if offline else "unset HF_HUB_OFFLINE"
            raise RuntimeError(f"{repo}: offline ({why}) and revision {revision or 'main'} is not in the "
                               f"cache {constants.HF_HUB_CACHE}; {undo} to download it, or {LOCAL_DIR}")
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, timeout=timeout)
    except Exception as e:
        path = None if _hub_status(e) in (401, 404) else _cached(repo, revision)
        if path is None:
            raise RuntimeError(_hub_error(repo, revision, e, timeout)) from None
        util.say(f"warning: {repo}: no answer from the hub ({_said(e)}); using the cached snapshot {path}", file=sys.stderr)
        return _checked(path, _cached_checksums(path), repo, verify)
    want = {s.rfilename: s for s in info.siblings or []}
    files = list(filter_repo_objects(want, allow_patterns=HUB_FILES))
    if "config.json" not in files:
        raise RuntimeError(f"{repo}: revision {revision or 'main'} ({info.sha}) has no config.json; "
                           f"check the id and --revision")
    for f in files:  # pinned to the commit: a cached file returns at once, with no request
        try:
            if not isinstance(try_to_load_from_cache(repo, f, revision=info.sha), str):
                # one HEAD with our timeout first: hf_hub_download retries a silent one for minutes (60 s x 6)
                get_hf_file_metadata(hf_hub_url(repo, f, revision=info.sha), timeout=timeout)
            path = Path(hf_hub_download(repo, f, revision=info.sha, etag_timeout=timeout)).parents[f.count("/")]
        except Exception as e:
            raise RuntimeError(_hub_error(repo, revision, e, timeout, f)) from None
    if (revision or "main") != info.sha:  # so that offline runs find this commit under its branch or tag
        ref = path.parent.parent / "refs" / (revision or "main")
        ref.parent.mkdir(parents=True, exist_ok=True)
        util.atomic_write(ref, lambda tmp: Path(tmp).write_text(info.sha))
    sums = {f: (want[f].size, *(("sha256", want[f].lfs.sha256) if want[f].lfs else ("git", want[f].blob_id)))
            for f in files}
    return _checked(path, sums, repo, verify, "the hub's")


def _cached(repo, revision):
    """The cached snapshot of repo at revision if every file the loader needs is there, else None."""
    from huggingface_hub import snapshot_download
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
        index = path / "model.safetensors.index.json"
        need = set(util.read_json(index)["weight_map"].values()) if index.exists() else {"model.safetensors"}
    except Exception:  # not cached, partly cached, or an unreadable index: the hub is needed
        return None
    return path if all((path / f).exists() for f in need | {"config.json", "tokenizer.json"}) else None


def _cached_checksums(path):
    """{file: (None, kind, checksum)} of a cache snapshot, read from the cache's own layout: each
    file links to blobs/<ETag>, and the hub's ETag is an LFS file's sha256, another's git blob id.
    (No sizes: the cache does not keep them.) Empty for a plain directory."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        name = Path(os.path.realpath(f)).name
        if f.is_file() and re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", name):
            out[f.relative_to(path).as_posix()] = (None, "sha256" if len(name) == 64 else "git", name)
    return out


def _checked(path, sums, repo, verify, source="the hub's (as the cache recorded them)"):
    """path, once each file of sums {file: (size or None, kind, checksum)} has the size the hub lists
    and, with verify, its checksum (a pass over every byte). ValueError names the first that does not."""
    if verify and not sums:
        raise ValueError(f"{path}: --verify-model needs the hub's checksums, and this is not a hub download; drop --verify-model")
    for f, (size, kind, want) in sums.items():
        p = Path(path) / f
        if not p.exists():
            continue  # not downloaded (not in HUB_FILES): the loader says if it needs it
        have, bad = p.stat().st_size, None
        if size is not None and have != size:
            bad = f"{have} bytes where the hub has {size}"
        elif verify:
            got = util.file_hash(p, "sha256" if kind == "sha256" else "gitsha1")   # "git": git's blob id
            bad = None if got == want else f"{kind} {got[:12]}... where the hub has {want[:12]}..."
        if bad:
            raise ValueError(f"{p}: corrupt cached file of {repo} ({bad}); {_redownload(p)}")
    if verify:
        util.say(f"{repo}: {len(sums)} files match {source} checksums", file=sys.stderr)
    return path


def _redownload(file):
    """What to do about a bad file: a hub download is fetched afresh once its cached blob is gone."""
    if hub_commit(Path(file).parent):
        return f"delete {os.path.realpath(file)} (its blob in the hub cache) and run again to download it afresh"
    return "replace it with a good copy"


def _hub_status(e):
    """The HTTP status of a huggingface_hub error, or None (no answer at all)."""
    return getattr(getattr(e, "response", None), "status_code", None)


def _said(e):
    """huggingface_hub's (or httpx's) own message, with its status and URL, on one line and without
    its advice paragraphs."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    said = " ".join(s for s in lines if not s.startswith(("Please", "If you", "For more", "This is usually")))
    said = said if type(e).__name__ in said else f"{type(e).__name__}: {said}".rstrip(": ")
    try:  # an httpx error knows its request but does not say its URL ("timed out")
        return said if str(e.request.url) in said else f"{said} for url: {e.request.url}"
    except (AttributeError, RuntimeError):
        return said


# a failure of this machine's files (a cache folder that is a file, unwritable, full), which running again repeats
LOCAL_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EEXIST}


def _hub_error(repo, revision, e, timeout, file=None):
    """One line for a hub failure: what went wrong, in the hub's (or the network's) own words, and what to do."""
    from huggingface_hub import constants, errors
    cause = e.__cause__ if isinstance(e, errors.LocalEntryNotFoundError) and e.__cause__ else e
    status, said, during = _hub_status(cause), _said(cause), f" while downloading {file}" if file else ""
    if isinstance(cause, errors.RevisionNotFoundError):
        return f"{repo}: revision {revision!r} not found on the hub ({said}); check --revision"
    if isinstance(cause, errors.RepositoryNotFoundError) or (status in (401, 404) and not file):
        return (f"{repo}: repository not found on the hub ({said}); check the id, or log in (hf auth login) "
                f"if it is private or gated")
    if status is not None and status >= 500:
        return (f"{repo}: the hub answered with a server error{during} ({said}) and nothing is cached; "
                f"try again later, or {LOCAL_DIR}")
    if "Timeout" in type(cause).__name__:
        return (f"{repo}: no answer from the hub at {constants.ENDPOINT}{during} within {timeout:g} s ({said}) and "
                f"nothing is cached; try again, raise HF_HUB_ETAG_TIMEOUT (HF_HUB_DOWNLOAD_TIMEOUT for files), "
                f"or {LOCAL_DIR}")
    if isinstance(cause, OSError) and cause.errno in LOCAL_ERRNOS:   # this machine's files, not the hub: again fails
        return (f"{repo}: huggingface_hub cannot use its files on this machine{during} ({said}); check HF_HOME and "
                f"HF_HUB_CACHE (the cache: {constants.HF_HUB_CACHE}), or {LOCAL_DIR}")
    if "Connect" in type(cause).__name__ or isinstance(cause, errors.OfflineModeIsEnabled):
        return (f"{repo}: cannot connect to the hub at {constants.ENDPOINT}{during} ({said}): offline, and nothing "
                f"is cached; check the network (or HF_ENDPOINT), or {LOCAL_DIR}")
    return f"{repo}: {f'downloading {file}' if file else 'asking the hub'} failed ({said}); run again, or {LOCAL_DIR}"


def read_safetensors(path):
    """All tensors of a checkpoint directory: one model.safetensors, or the shards of an index.
    safetensors itself finds a truncated, extended or header-damaged file; a byte changed inside
    the tensor data loads silently (only resolve(..., verify=True) finds that)."""
    path = Path(path)
    index = path / "model.safetensors.index.json" if (path / "model.safetensors.index.json").exists() else None
    if index and (path / "model.safetensors").exists():   # transformers reads the single file then
        util.say(f"note: {path} holds both model.safetensors and the shards of model.safetensors.index.json; reading "
                 f"model.safetensors, as transformers does (move the other layout away if it is the one you meant)",
                 file=sys.stderr)
        index = None
    try:
        files = sorted(set(util.read_json(index)["weight_map"].values())) if index else ["model.safetensors"]
        if not all(isinstance(f, str) for f in files):
            raise TypeError("a weight_map value is not a file name")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); {_redownload(index)}") from None
    state = {}
    for f in files:
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f}: checkpoint file not found")
        try:
            state.update({k: (v, f) for k, v in load_file(path / f).items()})
        except Exception as e:
            if interrupts.interrupted():   # a read cut short by Ctrl-C or SIGTERM: the file is not to blame
                raise KeyboardInterrupt from None
            raise ValueError(f"{path / f}: corrupt or truncated safetensors file ({e}); "
                             f"{_redownload(path / f)}") from None
    return state


def load(name_or_path=DEFAULT_MODEL, device=None, dtype=None, revision=None, verify=False):
    """-> (model, tokenizer). Default dtype: bfloat16 on CUDA, float32 on CPU. hub_commit(resolve(...))
    is the commit loaded; verify: see resolve."""
    path = resolve(name_or_path, revision, verify)
    cfg, tok = check_checkpoint(path)
    device = util.pick_device(device)
    dtype = dtype or default_dtype(device)
    tensors = read_safetensors(path)
    check_tied_head(cfg, {k: t for k, (t, f) in tensors.items()}, path)
    tensors.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old files
    with torch.device("meta"):
        model = Model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    for k, shape in expected.items():
        if k not in tensors:
            raise ValueError(f"{path}: tensor '{k}' missing from the checkpoint" + (
                " (config.json's tie_word_embeddings is false, or absent, which transformers reads as false: "
                "set it to true if the head is the embeddings)" if k == "lm_head.weight" else ""))
        t, f = tensors[k]
        if t.shape != shape:
            raise ValueError(f"{path / f}: tensor '{k}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():   # integer weights are a quantized file without its quantization_config
            raise ValueError(f"{path / f}: tensor '{k}' is {str(t.dtype).replace('torch.', '')}, not a floating-point "
                             f"weight (a quantized checkpoint?); pass the unquantized one")
    for k, (t, f) in tensors.items():
        if k not in expected:
            raise ValueError(f"{path / f}: unexpected tensor '{k}' (not a SmolLM2/Llama weight)")
    model.load_state_dict({k: t for k, (t, f) in tensors.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True gives two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device=device, dtype=dtype)
    assert not cfg.tie_word_embeddings or model.lm_head.weight is model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model, tok


def check_tied_head(cfg, tensors, path):
    """A tied config (tie_word_embeddings true) with a file that holds its own lm_head.weight, other than
    the embeddings: transformers then keeps that head untied; refused here rather than dropped."""
    head, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        raise ValueError(f"{path}: config.json ties lm_head to the embeddings (tie_word_embeddings true), and the "
                         f"weights hold an lm_head.weight of their own, other than model.embed_tokens.weight; set "
                         f"tie_word_embeddings to false if that head is the model's")


def check_checkpoint(path):
    """A checkpoint folder's config.json, quantization and tokenizer, checked before a weight is read (minutes
    at 1.7B), so that a caller can also check them before its own long work. -> (config, tokenizer)."""
    cfg = SmolLM2Config.from_json(Path(path) / "config.json")
    if kind := quantized(path):   # else a shape error on its first packed tensor, or a dtype error
        raise ValueError(f"{path}: {kind} checkpoint (config.json's quantization_config), and this needs "
                         f"the unquantized weights; pass the checkpoint it was quantized from")
    return cfg, check_vocab(cfg, load_tokenizer(path), path)   # a tokenizer of another model costs no load


def quantization(path):
    """config.json's quantization_config ({} for unquantized weights); one that is not a mapping is one line."""
    conf = util.read_json(Path(path) / "config.json")
    qc = (conf.get("quantization_config") if isinstance(conf, dict) else None) or {}   # not a mapping: load says it
    if not isinstance(qc, dict):
        raise ValueError(f"{Path(path) / 'config.json'}: quantization_config is a {type(qc).__name__}, not a mapping; "
                         f"the file is damaged or hand-edited: use the model's own config.json")
    return qc


def quantized(path):
    """What quantized checkpoint the folder holds ("a bitsandbytes 4-bit", "a quantized (gptq)", ...), or None: its
    weights are not the unquantized ones model.load reads (transformers writes a bitsandbytes config
    with both load_in flags false for a model that is not quantized)."""
    qc = quantization(path)
    if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        return f"a bitsandbytes {'4' if qc.get('load_in_4bit') else '8'}-bit"
    method = qc.get("quant_method")
    return f"a quantized ({method})" if method and method != "bitsandbytes" else None


def check_vocab(cfg, tok, path):
    """A tokenizer that makes ids past the model's embeddings belongs to another model: refused here,
    not as an IndexError in the first forward pass. -> tok."""
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tok.vocab_size} tokens, more than config.json's vocab_size "
                         f"{cfg.vocab_size}: the two files are not one model's; put the model's own tokenizer beside it")
    return tok

def default_dtype(device):
    """bfloat16 on CUDA (the checkpoints' own dtype), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def hf_config(cfg, head_dim_in_config=True):
    """The config.json dict transformers writes for cfg (the inverse of SmolLM2Config.from_json)."""
    d = asdict(cfg)
    if not head_dim_in_config:
        d.pop("head_dim")
    d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
             mlp_bias=False, attention_dropout=0.0, rope_scaling=None, initializer_range=0.02,
             torch_dtype="bfloat16", use_cache=True, pretraining_tp=1)
    return d


def save_checkpoint(path, config, state_dict, dtype=torch.bfloat16):
    """Write config.json (a dict, e.g. hf_config(cfg)) and model.safetensors as save_pretrained
    does: the weights cast to dtype, no lm_head.weight when the embeddings are tied. Each file is
    written whole or not at all. -> path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    util.write_json(path / "config.json", {**config, "torch_dtype": str(dtype).replace("torch.", "")})
    tied = config.get("tie_word_embeddings", False)   # absent: untied, as transformers and load read it
    sd = {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    util.atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    return path

# -----------------------------------------------------------------------------
# generation

def check_finite(ok, what):
    """ok: whether every row's greatest logit was finite (max returns NaN if a row holds one). A greedy
    token from NaN or inf logits is no token at all: ValueError, so that no number is made from it
    (weights that a diverged training broke)."""
    if not bool(ok):
        raise ValueError(f"the model's logits are not finite (NaN or inf) {what}: its weights, or an adapter's, are "
                         f"broken (a diverged training?); no result is given")


@torch.no_grad()
def next_tokens(model, prompts, n, pad_id, batch_size=16, progress=True, desc="next token", unit="prompt"):
    """The greedy next token of each of n prompts (an iterable of token-id lists, read a batch at a
    time), over the whole vocabulary -> (n,) long on the CPU. Batches are left padded, so the last
    position is every prompt's end, and only that position goes through lm_head (no (B, T, V) logits)."""
    was_training = model.training
    model.eval()
    dev, it, out = model.lm_head.weight.device, iter(prompts), []
    bar = util.progress(total=n, desc=desc, unit=unit, enabled=progress)
    for b in range(0, n, batch_size):
        rows = [next(it) for _ in range(min(batch_size, n - b))]
        L = max(map(len, rows))
        x = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows], device=dev)     # (B, T)
        am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=dev)
        h = model(x, am, hidden_only=True)[:, -1]                                     # (B, C)
        top = model.lm_head(h).max(-1)                   # = argmax (the first maximum); NaN propagates to values
        check_finite(torch.isfinite(top.values).all(), "choosing the next token")
        out.append(top.indices.cpu())                                                 # (B,)
        bar.update(len(rows))
    bar.close()
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def generate_ids(model, prompts, max_new_tokens, eos_id, stop_fn=None):
    """Greedy decoding of a batch of token-id lists with a static KV cache. Each prompt is
    prefilled alone into its row of the cache (causal kernel, no padding: one ~1k-token GSM8k
    prompt already fills the matmuls, and padding costs more than it batches; BENCHMARKS.md,
    make bench-generate). Then all rows decode together, each new token at its row's
    own next slot (KVCache); pass prompts sorted by length so that the attention blocks
    (DECODE_GROUP) read few empty slots. Each row stops on its own at eos_id or when
    stop_fn(row_index, new_ids) is true; finished rows leave the batch (KVCache.drop). Returns
    the new ids of each row (eos not included).
    The model's limit is kept: a row stops when its prompt and new tokens fill max_position_embeddings
    (transformers' generate with max_length = that), so the KV cache needs min(longest prompt +
    max_new_tokens, max_position_embeddings) slots whatever max_new_tokens is. A prompt that leaves no
    room is a ValueError (callers left-truncate, as evals/run.py does for GSM8k)."""
    dev = model.lm_head.weight.device
    P = model.config.max_position_embeddings
    B, L = len(prompts), max(len(p) for p in prompts)
    if L >= P:
        raise ValueError(f"a prompt of {L} tokens leaves no room to generate in the model's {P} positions; shorten it")
    lim = [min(max_new_tokens, P - len(p)) for p in prompts]                 # new tokens each row may make
    cache = KVCache(model.config, B, min(L + max_new_tokens, P), dev, model.lm_head.weight.dtype)
    last = []
    for i, p in enumerate(prompts):
        h = model(torch.tensor([p], device=dev), hidden_only=True, cache=cache.row(i))   # (1, len, C)
        last.append(h[0, -1])
    # greedy token: max().indices is argmax (the first maximum), and faster than argmax on CPU
    top = model.lm_head(torch.stack(last)).max(-1)                            # NaN propagates to values
    ok, nxt = torch.isfinite(top.values).all(), top.indices                   # (), (B,)
    out = [[] for _ in range(B)]
    who = list(range(B))                                                      # cache row -> prompt
    for step in range(max(lim)):
        live = cache.live()
        tok = dict(zip(live, nxt.tolist()))                                   # cache row -> its new token
        done = []
        for r in live:
            i = who[r]
            if tok[r] != eos_id:
                out[i].append(tok[r])
            if tok[r] == eos_id or (stop_fn and stop_fn(i, out[i])) or step + 1 >= lim[i]:
                done.append(r)
        if len(done) == len(live):
            break
        for src, dst in cache.drop(done).items():
            who[dst], tok[dst] = who[src], tok[src]
        nxt = torch.tensor([tok[r] for r in cache.live()], device=dev)
        h = model(nxt[:, None], hidden_only=True, cache=cache)                 # (n, 1, C)
        top = model.lm_head(h[:, -1]).max(-1)
        ok, nxt = ok & torch.isfinite(top.values).all(), top.indices           # checked at the end: no sync a step
    check_finite(ok, "while generating")
    return out


def generate(model, tokenizer, prompts, max_new_tokens=256, stop=(), batch_size=16, progress_bar=True, stats=None,
             left_truncate=None):
    """Batched greedy generation for text prompts. Returns, per prompt, the decoded new text
    (special tokens skipped) cut at the first occurrence of each stop string in list order,
    as lm-evaluation-harness does. Prompts go longest first, so that a batch's rows have similar
    lengths and the decode blocks read few empty cache slots (generate_ids). left_truncate: keep
    each prompt's last N tokens (lm-eval's generate_until: max_length - max_gen_toks)."""
    enc = [tokenizer.encode(p)[-left_truncate:] if left_truncate else tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    texts, n_new, t0 = [None] * len(enc), 0, time.perf_counter()
    bar = util.progress(total=len(enc), desc="generate", unit="seq", enabled=progress_bar)

    def cut(s):
        for st in stop:
            s = s.split(st)[0]
        return s

    def stop_fn(i, new):  # decoding the whole continuation is cheap next to a forward pass
        if not stop:
            return False
        text = tokenizer.decode(new, skip_special_tokens=True)
        return any(st in text for st in stop)

    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        outs = generate_ids(model, [enc[i] for i in idx], max_new_tokens, tokenizer.eos_id, stop_fn)
        for i, o in zip(idx, outs):
            texts[i] = cut(tokenizer.decode(o, skip_special_tokens=True))
            n_new += len(o)
        bar.set_postfix(tok_s=n_new / (time.perf_counter() - t0), refresh=False)
        bar.update(len(idx))
    bar.close()
    if stats is not None:
        dt = time.perf_counter() - t0   # one reading: the rate is the seconds' own
        stats.update(new_tokens=n_new, seconds=dt, tokens_per_s=n_new / max(dt, 1e-9))
    return texts

# -----------------------------------------------------------------------------

def main(argv=None):
    ap = util.ArgumentParser(prog="model.py", description="Chat with a SmolLM2 checkpoint (one user message, greedy).")
    ap.add_argument("--model", default=DEFAULT_MODEL, type=util.nonempty("a hub id or a model folder"), help=f"hub id or local directory (default {DEFAULT_MODEL})")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--system", default=None, help="system prompt (default: the model's own default; \"\" an empty one)")
    ap.add_argument("--max-new-tokens", type=util.number(int, 1), default=256,
                    help="default 256; at most what the model's positions leave beside the prompt (clamped, with a note)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto (default): bfloat16 where the device computes it natively (CUDA, a CPU with AMX or "
                         "AVX512-BF16), else float32, and float32 for a float32 merge (rigsa.py merge)")
    ap.add_argument("--revision", default=None, help="pin a hub revision: commit, branch or tag (default: the latest, main)")
    ap.add_argument("--verify-model", action="store_true",
                    help="hash the cached files against the hub's checksums (finds a corrupted byte; slow for 1.7B)")
    a = ap.parse_args(argv)
    util.keep_freed_memory()
    interrupts.stop_as_interrupt()   # Ctrl-C and SIGTERM: one line, exit 130 / 143, no file blamed
    try:
        chat(a)
    except (OSError, ValueError, RuntimeError) as e:  # the library's errors are one line each: no traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
    except KeyboardInterrupt:
        interrupts.exit_interrupted(f"nothing was kept; run again with: "
                              f"{interrupts.command(__file__, sys.argv[1:] if argv is None else argv)}")
    finally:
        interrupts.stop_as_interrupt(False)


def chat(a):
    """model.py's one message: load, clamp --max-new-tokens to the model's positions, generate."""
    check_revision(a.model, a.revision)   # as train, merge and evals/run.py: a local folder has no revisions
    device = util.pick_device(a.device)
    path = resolve(a.model, a.revision, a.verify_model)
    # auto as train and evals/run.py take it: bfloat16 where native, but a float32 merge stays float32
    dtype, why = util.merge_dtype(a.dtype, *util.auto_dtype(a.dtype, device), path)
    model, tok = load(path, device, dtype)   # a checkpoint it cannot load is the one line said, nothing before it
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why.removeprefix('auto: ')})", file=sys.stderr)
    msgs = ([{"role": "system", "content": a.system}] if a.system is not None else []) + [{"role": "user", "content": a.prompt}]
    text, P = tok.chat(msgs), model.config.max_position_embeddings
    n = len(tok.encode(text))
    if n >= P:
        raise ValueError(f"--prompt: {n} tokens with the chat template, which leaves no room to generate in the "
                         f"model's {P} positions; shorten it")
    new = min(a.max_new_tokens, P - n)   # generation stops at the model's limit: say so rather than surprise
    if new < a.max_new_tokens:
        print(f"note: --max-new-tokens {a.max_new_tokens}: the prompt's {n} tokens leave room for {new} in the model's "
              f"{P} positions; generating at most {new}", file=sys.stderr)
    t0, bar = time.perf_counter(), util.progress(total=new, desc="generate", unit="tok")   # 256 tokens at 1.7B on a CPU: a minute

    def stop_fn(i, ids):   # generate()'s stop on "<|im_end|>", and the bar over the reply's tokens
        bar.update(len(ids) - bar.n)
        return "<|im_end|>" in tok.decode(ids, skip_special_tokens=True)
    ids = generate_ids(model, [tok.encode(text)], new, tok.eos_id, stop_fn)[0]
    bar.update(len(ids) - bar.n)
    bar.total = bar.n   # the reply ended before the cap: a full bar, not one cut short
    bar.close()
    print(tok.decode(ids, skip_special_tokens=True).split("<|im_end|>")[0])
    print(f"[{len(ids)} tokens, {len(ids) / max(time.perf_counter() - t0, 1e-9):.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
