"""
rigsa.py: Random Initialization of Gated Sparse Adapters (arXiv 2511.01794), from scratch.

  config                        Config: every hyperparameter, the paper's numbers as defaults; TABLE4; METHODS
  Textual MNIST (§4.2)          to_text (28 lines of 28 digits) -> prompt (ChatML); mnist_accuracy
  the gated sparse adapter      GatedSparseLinear (§3.2): y = x W0^T + alpha * x (m * dW)^T, dW full-rank
                                random, alpha = 1e-6; install_adapters swaps it in for every nn.Linear
  the IMP rule                  prune (§3.2, §4.4): keep 80% of the sign-preserving free entries, rewind;
                                the score is one function of CRITERIA (--criterion)
  training                      get_lr, accumulate, train_step (§4.4: AdamW, wd 1.0, lr 2e-3 with 1000
                                warmup steps, effective batch 16); train: the IMP loop, x5
  baselines                     random-mask (§4.4), lt-sft (§6), dense, lora/qlora (§5.3, qlora.py)
  machinery                     lib/: sparse (dW's arithmetic, the product), flags, rundir, memory, adapter_files
                                (save_adapter's format), mnist (the IDX files), interrupts, util; cli.py: the
                                commands, and loading a saved adapter

  python rigsa.py train --iters 5 | demo | show --index 0 | merge --adapter runs/x/iter5 --out merged/
"""
import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path

from lib import interrupts  # standard library only: before torch

if __name__ == "__main__":   # a signal while torch loads (a second or two): one line, no traceback; main() then takes over
    interrupts.early()

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import qlora
from lib import adapter_files as AF, flags, memory, mnist, rundir, sparse, util   # the machinery (lib/__init__.py)

# -----------------------------------------------------------------------------
# config: every hyperparameter in one place, printed at start and saved with the run

# paper §5.3, Table 4: the QLoRA baseline's hyperparameters (AdamW, linear schedule), the defaults of
# --method qlora (and of --method lora, the same on the unquantized base). Its batch 16 and 1000
# warmup steps are §4.4's, so they are --batch-size's and --warmup's defaults, shared with RIGSA.
TABLE4 = dict(ranks=(1, 4, 8, 16), alpha=32.0, dropout=0.0, lr=2e-4, weight_decay=0.1, epochs=4.0)

_f = flags.field   # one line per hyperparameter: its flag, range, help, refusal and record (lib/flags.py)
POS, NONNEG, FRAC = util.number(float, 0, lo_open=True), util.number(float, 0), util.number(float, 0, 1, hi_open=True)
INT0, INT1 = util.number(int, 0), util.number(int, 1)
PRUNES = (lambda c: c.iters > 1, "--iters above 1 (one iteration never prunes)")
# the data order's generator is seeded seed * 1000 + iteration, and a torch CPU generator keeps the low 32
# bits of its seed: above 2**29 - 1, a seed would repeat a smaller one's data order
SEED_MAX = 2 ** 29 - 1

# The methods, one entry each: what check_config, setup, the IMP loop, the help and reproduce.py read.
#   gated      the ReZero gate alpha (§3.2); lt-sft has none (§6)
#   prunes     IMP iterations (§3.2, §4.4); the others train once
#   lora       LoRA layers (qlora.py, §5.3) instead of the gated sparse layer; nf4: on the 4-bit base
#   init_mask  f(run): the mask it starts from, set once the adapters are installed, before the memory
#              estimate, not on resume (None: every entry free)
#   flags      the Config fields it uses beyond the common ones (another method's flag is refused)
GATE = ("alpha_init", "init", "init_std", "decay_gate")
IMP = ("iters", "keep", "prune_scope", "criterion")
SPARSE_OPT = ("lr", "weight_decay", "epochs")
LORA = ("rank", "lora_alpha", "lora_dropout", "lora_lr", "lora_weight_decay", "lora_epochs")
METHODS = {
    "rigsa":       dict(gated=True, prunes=True, lora=False, nf4=False, init_mask=None,
                        flags=GATE + IMP + SPARSE_OPT + ("reset_alpha",)),
    "random-mask": dict(gated=True, prunes=False, lora=False, nf4=False, init_mask=lambda run: random_mask_init(run),
                        flags=GATE + SPARSE_OPT + ("mask_like", "density")),                              # §4.4
    "lt-sft":      dict(gated=False, prunes=True, lora=False, nf4=False, init_mask=None, flags=IMP + SPARSE_OPT),  # §6
    "dense":       dict(gated=True, prunes=False, lora=False, nf4=False, init_mask=None, flags=GATE + SPARSE_OPT),
    "lora":        dict(gated=False, prunes=False, lora=True, nf4=False, init_mask=None, flags=LORA),     # §5.3
    "qlora":       dict(gated=False, prunes=False, lora=True, nf4=True, init_mask=None, flags=LORA),      # §5.3
}
CRITERIA = {}   # pruning criteria, name -> score(name, layer) (IMP section); filled below, --criterion picks one


@dataclasses.dataclass
class Config:
    # what to train
    model: str = _f(M.DEFAULT_MODEL, "base model: hub id or local directory (§4.1); --resume takes a new path "
                                     "to the same base (its identity is checked)", resumable=True)
    revision: str = _f("", "hub revision of --model (commit, branch or tag; default: the latest); the run records "
                           "the commit it resolved to and resumes on it")
    method: str = _f("rigsa", " | ".join(METHODS) + " (§3.2, §4.4, §5.3; lt-sft: §6): the table METHODS",
                     choices=METHODS)
    out: str = _f("runs/rigsa", "run directory: config.json, metrics.jsonl, iterK.safetensors", resumable=True)
    data_dir: str = _f("data", "data root: the four MNIST IDX files are in <root>/mnist/ (§4.2)", resumable=True)
    seed: int = _f(1234, "seed of dW's init (per layer), of the random mask and of the data order",
                   check=util.number(int, 0, SEED_MAX))
    # the gated adapter (§3.2)
    alpha_init: float = _f(1e-6, "initial gate alpha, one per layer (§3.2)", check=POS)
    init: str = _f("uniform", "dW init: uniform = nn.Linear's U(+-1/sqrt(fan_in)) | normal (std --init-std) (silent in §3.2)",
                   choices=("uniform", "normal"))
    init_std: float = _f(0.02, "std of dW's init when --init normal", check=POS,
                         needs=(lambda c: c.init == "normal", "--init normal"))
    decay_gate: bool = _f(False, "weight-decay the gate alpha too (silent in §4.4: off)",
                          needs=(lambda c: c.weight_decay > 0, "--weight-decay above 0"))
    reset_alpha: bool = _f(True, "reset alpha to --alpha-init at every IMP rewind (silent in §3.2: on)",
                           needs=(lambda c: c.iters > 1, "--iters above 1 (one iteration never rewinds)"))
    # iterative magnitude pruning (§3.2, §4.4)
    iters: int = _f(5, "IMP iterations, each one training run (§4.4); dense, random-mask and LoRA train once",
                    check=INT1)
    keep: float = _f(0.8, "fraction of the sign-preserving free entries kept at each pruning (§4.4); a list "
                          "(0.8,0.7,...) is one per pruning, its last value for the rest",
                     check=util.numbers(float, 0, 1, lo_open=True), needs=PRUNES)
    prune_scope: str = _f("global", "global | layer: where the magnitude threshold is taken (silent in §4.4)",
                          choices=("global", "layer"), needs=PRUNES)
    criterion: str = _f("magnitude", "the pruning score: magnitude = |dW| (§4.4); a score added to CRITERIA is a choice",
                        choices=CRITERIA, needs=PRUNES)
    mask_like: str = _f("", "random-mask: copy the per-layer counts of this adapter, RUN/iterK (§4.4)")
    density: float = _f(0.0, "random-mask: uniform density instead of --mask-like",
                        check=util.number(float, 0, 1))
    # optimisation (§4.4)
    lr: float = _f(2e-3, "peak learning rate (§4.4)", check=POS)
    warmup: int = _f(1000, "linear warmup steps, then linear decay to 0 at the end of the iteration (§4.4)", check=INT0)
    weight_decay: float = _f(1.0, "AdamW decoupled weight decay on dW (§4.4)", check=NONNEG)
    beta1: float = _f(0.9, "AdamW beta1 (silent in §4.4: torch default)", check=FRAC)
    beta2: float = _f(0.999, "AdamW beta2 (silent in §4.4: torch default)", check=FRAC)
    eps: float = _f(1e-8, "AdamW eps (silent in §4.4: torch default)", check=POS)
    batch_size: int = _f(16, "effective batch, by gradient accumulation (§4.4)", check=INT1)
    micro_batch: int = _f(1, "sequences per forward pass (§4.4: one fits a 24 GB GPU)", check=INT1)
    checkpoint_activations: bool = _f(False, "recompute each decoder layer in the backward instead of keeping "
                                             "its activations: a bigger --micro-batch fits, the same gradients, "
                                             "~1/3 slower", resumable=True)
    epochs: float = _f(1.0, "epochs of the training split per IMP iteration (§4.4)", check=POS)
    steps: int = _f(0, "cap on optimizer steps per iteration, for quick runs (0 = no cap)", check=INT0)
    grad_clip: float = _f(0.0, "max gradient norm (0 = off; silent in §4.4)", check=NONNEG)
    moments: str = _f("auto", "where AdamW's moments live: device | host (pinned, streamed per tensor: exact, slower) | "
                              "8bit (approximate) | auto: device if the step fits, else host (a GPU's), else 8bit "
                              "(docs/memory.md)",
                      choices=("auto", "device", "host", "8bit"), resumable=True)
    # LoRA / QLoRA baseline (§5.3, Table 4); used when --method lora or qlora
    rank: int = _f(TABLE4["ranks"][-1], "LoRA rank (Table 4: 1/4/8/16)", check=INT1)
    lora_alpha: float = _f(TABLE4["alpha"], "LoRA alpha (Table 4)", check=POS)
    lora_dropout: float = _f(TABLE4["dropout"], "LoRA dropout (Table 4)", check=FRAC)
    lora_lr: float = _f(TABLE4["lr"], "LoRA peak learning rate, linear schedule, --warmup warmup (Table 4)",
                        check=POS)
    lora_weight_decay: float = _f(TABLE4["weight_decay"], "LoRA weight decay (Table 4)", check=NONNEG)
    lora_epochs: float = _f(TABLE4["epochs"], "LoRA epochs (Table 4)", check=POS)
    # data and evaluation (§4.2)
    val_frac: float = _f(0.01, "fraction of the training images held out for validation (§4.2; 0: none)", check=FRAC)
    split_seed: int = _f(0, "seed of the validation split", check=util.number(int, 0, 2 ** 63 - 1),
                         needs=(lambda c: c.val_frac > 0, "--val-frac above 0 (a validation split)"))
    limit: int = _f(0, "evaluate on the first N val/test images only (0 = all)", check=INT0)
    eval_batch: int = _f(16, "batch size of the accuracy evaluation", check=INT1, resumable=True)
    eval_test: bool = _f(True, "also evaluate the test split after every iteration (§5.1, Figure 2a)")
    # machinery
    device: str = _f("auto", "cpu | cuda | cuda:N | auto", resumable=True)
    threads: int = _f(0, "CPU threads of torch's math (0: torch's own count, $OMP_NUM_THREADS or the cores); saved "
                         "resolved and kept by --resume: the last bits of a CPU run's numbers depend on it",
                      check=util.number(int, 0, 1024), resumable=True)
    dtype: str = _f("auto", "auto (bfloat16 where the device computes it natively: CUDA, a CPU with AMX or "
                            "AVX512-BF16; else, and on a float32 merge, float32) | float32 (exact) | bfloat16 "
                            "(weights and autocast; dW, LoRA and AdamW's state in float32) | float16 (weights only, "
                            "no autocast); saved resolved",
                    choices=("auto", "float32", "bfloat16", "float16"))
    log_every: int = _f(10, "optimizer steps between metrics.jsonl lines", check=INT1, resumable=True)
    save_every: int = _f(500, "optimizer steps between resume checkpoints (0 = only at iteration ends)", check=INT0,
                         resumable=True)
    halt_after: int = _f(0, "stop (resumably) after this many optimizer steps in this process (0 = never)", check=INT0,
                         resumable=True)
    resume: bool = _f(False, "continue the run in --out where it stopped (its saved config is used)",
                      resumable=True)
    allow_other_base: bool = _f(False, "accept a base model other than the one --mask-like's adapter, or the resumed "
                                       "run, was made on (said, and recorded in config.json)", resumable=True,
                                needs=(lambda c: c.resume or bool(c.mask_like), "--resume or --mask-like (a new run "
                                       "compares its base with nothing else)"))
    offline: bool = _f(False, "never download (the MNIST files, the base model): a missing one is an error",
                       resumable=True)
    verify: bool = _f(True, "check the MNIST files' pinned sizes and md5s (--no-verify: stand-in data)",
                      resumable=True)
    verify_model: bool = _f(False, "hash the base model's cached hub files against the hub's checksums (slow at 1.7B)")


def flag_users(name):
    """The methods that use the setting `name` ([]: every one)."""
    return [m for m, d in METHODS.items() if name in d["flags"]]


def check_config(cfg, given=None):
    """What the flags' own checks cannot see: a Config made in Python, a flag that cannot act on this
    run, and combinations. given: the fields the user typed, else those not at their default."""
    flags.check(cfg)
    typed = flags.typed_by(cfg, given)
    flags.refuse_idle(cfg, typed, flag_users, cfg.method, "--method")
    if cfg.method == "random-mask" and cfg.density == 0 and not cfg.mask_like and typed("density"):   # 0: not given
        raise ValueError("--density 0: a random mask with no free entry trains nothing; give a density > 0, or "
                         "--mask-like RUN/iterK")
    if cfg.method == "random-mask" and bool(cfg.mask_like) == (cfg.density > 0):
        raise ValueError("--method random-mask: needs exactly one of --mask-like RUN/iterK or --density D")
    if cfg.val_frac == 0 and not cfg.eval_test:
        raise ValueError("--val-frac 0 with --no-eval-test: no split is evaluated, so every accuracy reported would be "
                         "empty; keep a validation split or the test split")
    if cfg.micro_batch > cfg.batch_size:
        raise ValueError(f"--micro-batch {cfg.micro_batch}: larger than the effective batch (--batch-size "
                         f"{cfg.batch_size}); use at most {cfg.batch_size}")
    if isinstance(cfg.keep, tuple) and len(cfg.keep) > n_iters(cfg) - 1:   # a value no pruning would use
        raise ValueError(f"--keep {','.join(map(str, cfg.keep))}: {len(cfg.keep)} values for the {n_iters(cfg) - 1} "
                         f"prunings of --iters {cfg.iters}; give at most {n_iters(cfg) - 1}")
    M.check_revision(cfg.model, cfg.revision)
    util.pick_device(cfg.device)   # --device cuda without CUDA: said now, not after the data loaded
    return cfg


def n_iters(cfg):
    return cfg.iters if METHODS[cfg.method]["prunes"] else 1   # the others train once

# -----------------------------------------------------------------------------
# Textual MNIST (paper §4.2)

QUESTION = "Below is a digit as text. Which digit is it?\n"  # Figure 5
PREFIX = "The digit is "  # §4.2: appended to the assistant turn, the answer is the next token


def to_text(image):
    """(H, W) uint8 -> H lines of W digits: pixel p becomes floor(p * 10 / 256) in 0..9 (§4.2, Figure 1)."""
    q = (np.asarray(image, dtype=np.int32) * 10 // 256).astype(np.uint8) + ord("0")
    return "\n".join(row.tobytes().decode() for row in q)


def prompt(tok, image, shots=()):
    """Figure 5: ChatML with the default system prompt; earlier turns are the few-shot examples."""
    msgs = []
    for img, lab in shots:
        msgs += [{"role": "user", "content": QUESTION + to_text(img)},
                 {"role": "assistant", "content": PREFIX + str(int(lab))}]
    msgs.append({"role": "user", "content": QUESTION + to_text(image)})
    return tok.chat(msgs, add_generation_prompt=True) + PREFIX


def digit_ids(tok):
    """Token ids of '0'..'9'. Checks that each digit after the prefix is exactly one token, so the
    answer is one greedy step and the loss covers exactly that token (§4.2)."""
    ids = []
    text = tok.chat([{"role": "user", "content": QUESTION + "0"}]) + PREFIX
    head = tok.encode(text)
    for d in range(10):
        one = tok.encode(str(d))
        if len(one) != 1 or tok.encode(text + str(d)) != head + one:
            raise ValueError(f"tokenizer {tok.path}: digit {d} after {PREFIX!r} is not a single token")
        ids.append(one[0])
    return ids


def end_id(tok):
    ids = tok.encode("<|im_end|>")
    if len(ids) != 1:
        raise ValueError(f"tokenizer {tok.path}: <|im_end|> is not a special token")
    return ids[0]


def mnist_accuracy(model, tok, images, labels, shots=None, batch_size=16, progress=True):
    """-> (accuracy, predictions (N,) long, -1 = not a digit): the greedy next token after the
    prefix; a non-digit token counts as wrong (§4.2). shots[i]: image i's few-shot examples, a
    list of (image, label) (Table 2's 5-shot column: evals/run.py draws them)."""
    ids = torch.tensor(digit_ids(tok))
    rows = (tok.encode(prompt(tok, images[i], shots[i] if shots else ())) for i in range(len(images)))
    nxt = M.next_tokens(model, rows, len(images), tok.pad_id, batch_size, progress,
                        f"mnist {len(shots[0]) if shots else 0}-shot", "img")   # (N,) over the whole vocabulary
    hit = nxt[:, None] == ids[None]                                              # (N, 10)
    preds = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(nxt, -1))
    return (preds == labels.long()).float().mean().item() if len(preds) else float("nan"), preds

# -----------------------------------------------------------------------------
# the gated sparse adapter (paper §3.2)

def layer_seed(seed, name):
    """A per-layer seed from the run seed and the module's name (independent of traversal order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


class GatedSparseLinear(nn.Module):
    """Drop-in for nn.Linear: y = x (W0 + alpha (m * dW))^T (§3.2). `weight` is the frozen base
    tensor (checkpoints load unchanged), `alpha` one scalar gate. dW is stored at the free entries
    only: `delta` (k,) float32 in row-major order (a float32 master copy even when W0 is bfloat16,
    so that weight decay's factor 1 - 2e-3 is not rounded away), and `mask` bit-packed as in the
    adapter files, None while every entry is free. dW0 is regenerated from `init_seed`."""
    def __init__(self, base, init_seed, init="uniform", init_std=0.02, alpha_init=1e-6, gated=True):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.init_seed, self.init, self.init_std, self.gated = init_seed, init, init_std, gated
        dev = self.weight.device
        d0 = self.init_delta().view(-1)
        self.init_check = d0[:16].clone()   # dW0's first values, for the adapter files (no regeneration at a save)
        self.delta = nn.Parameter(d0.to(dev))
        self.alpha = nn.Parameter(torch.tensor(alpha_init if gated else 1.0, device=dev), requires_grad=gated)
        self.register_buffer("mask", None)

    def init_delta(self):
        """dW0, (out, in) float32, from a CPU generator: rewinding needs no stored copy (6.4 GB at
        1.7B). lt-sft starts from zero (§6)."""
        if not self.gated:
            return torch.zeros(self.out_features, self.in_features)
        g = torch.Generator().manual_seed(self.init_seed)
        t = torch.empty(self.out_features, self.in_features)
        if self.init == "normal":
            return t.normal_(0.0, self.init_std, generator=g)
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's own init distribution
        return t.uniform_(-bound, bound, generator=g)

    def numel(self):
        return self.in_features * self.out_features

    def free_index(self):
        """Flat row-major positions (k,) of the free entries, in `delta`'s order; None if all are."""
        return sparse.free_index(self.mask, self.numel())

    def set_free(self, index, values):
        """Make the entries at sorted flat positions `index` the free ones, with dW = values."""
        n, dev = self.numel(), self.weight.device
        self.set_packed(None if len(index) == n else AF.pack_bits(index.to(dev), n, dev), values)

    def set_packed(self, mask, values):
        """The same from a packed mask (None: every entry free), as the adapter files hold it."""
        dev = self.weight.device
        self.mask = None if mask is None else mask.to(dev)
        self.delta = nn.Parameter(values.to(dev, torch.float32).contiguous(), requires_grad=True)

    def dense(self, delta=None, index=None):
        """m * dW as a dense (out, in) float32 tensor, the pruned entries exactly 0."""
        return sparse.dense(self.delta if delta is None else delta, self.free_index() if index is None else index,
                            self.weight.shape)

    def forward(self, x):  # x (B, T, in) -> (B, T, out)
        # x W0^T + alpha x (m dW)^T, one autograd Function that keeps only x and rebuilds m * dW from
        # the free entries in each pass (lib/sparse.py: memory; float32 exact, bfloat16 keeps tiny deltas)
        if torch.is_autocast_enabled(x.device.type):  # autocast's dtype, but the layer casts itself
            x = x.to(torch.get_autocast_dtype(x.device.type))
            with torch.autocast(x.device.type, enabled=False):
                return sparse.GatedDelta.apply(x, self.delta, self.alpha, self)
        return sparse.GatedDelta.apply(x, self.delta, self.alpha, self)

    def delta_weight(self):
        """alpha * (m * dW), (out, in) float32: what the adapter adds to W0 (adapter_files.merge_adapters)."""
        return self.alpha.detach().float() * self.dense().detach()

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, gated={self.gated}, "
                f"density={self.delta.numel() / self.numel():.4f}")


def install_adapters(model, cfg):
    """Replace every nn.Linear except lm_head by a GatedSparseLinear, in place (§3.2: all linear
    layers except the language modelling head). -> {name: layer}."""
    model.requires_grad_(False)
    layers = {}
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            name = f"{pname}.{cname}" if pname else cname
            if isinstance(child, nn.Linear) and name != "lm_head":
                layer = GatedSparseLinear(child, layer_seed(cfg.seed, name), cfg.init, cfg.init_std,
                                          cfg.alpha_init, gated=METHODS[cfg.method]["gated"])
                setattr(parent, cname, layer)
                layers[name] = layer
    return layers


def adapted_shapes(mcfg):
    """The (out, in) of every layer install_adapters (and LoRA) adapts in the model `mcfg` configures,
    built on the meta device (no memory): what a saved adapter or a flag is checked against before
    the base's weights load (minutes at 1.7B)."""
    with torch.device("meta"):
        model = M.Model(mcfg)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedSparseLinear)}

# -----------------------------------------------------------------------------
# iterative magnitude pruning (paper §3.2, §4.4)

def magnitude(name, L):
    """§4.4's criterion: |dW| at the layer's free entries, (k,) float32 in `delta`'s order."""
    return L.delta.abs()


CRITERIA["magnitude"] = magnitude


def eligible(L, sign=True):
    """bool (k,): the free entries that may be kept. §3.2: those whose sign is still that of their
    initial value (a flipped or exactly zero one is not); sign=False (lt-sft, init 0): all."""
    if not sign:
        return torch.ones_like(L.delta, dtype=torch.bool)
    d0 = L.init_delta().view(-1).to(L.delta.device)
    return torch.sign(L.delta) == torch.sign(d0 if L.mask is None else d0[L.free_index()])


def select(layers, elig, keep, scope="global", score=magnitude):
    """Exact top-k: among the eligible entries of each group (all layers, or each layer: --prune-scope),
    the round(keep * n_eligible) with the largest score, ties at the threshold broken by layer then
    row-major (delta's) order. score(name, layer) is called once per layer per pass and not kept,
    so the working set is one layer's scores. -> {name: bool (k,)} the entries kept."""
    names = list(layers)
    groups = [names] if scope == "global" else [[n] for n in names]
    chosen = {}
    for group in groups:  # the threshold, exact, over the group's eligible entries (two histogram passes)
        k = round(keep * sum(int(elig[n].count_nonzero()) for n in group))
        thr = util.kth_largest(lambda: (score(n, layers[n])[elig[n]] for n in group), k) if k else math.inf
        quota = k - sum(int(((score(n, layers[n]) > thr) & elig[n]).count_nonzero()) for n in group)
        for n in group:
            s = score(n, layers[n])
            chosen[n] = elig[n] & (s > thr)
            if quota > 0:  # ties at the threshold: the first ones in row-major (= delta's) order
                tie = (elig[n] & (s == thr)).nonzero().view(-1)[:quota]
                chosen[n][tie] = True
                quota -= len(tie)
    return chosen


def rewind(L, kept):
    """The kept free entries (bool (k,)) become the layer's free entries, rewound to dW0 (§3.2);
    every other entry is zeroed and frozen."""
    index = (torch.arange(L.numel(), device=kept.device) if L.mask is None else L.free_index())[kept]
    L.set_free(index, L.init_delta().view(-1)[index.cpu()])


def flips(s, sign=True):
    """The share of free entries whose dW changed sign from dW0: None where it was not measured (the
    sign not checked, lt-sft; or no entry free), not 0% or 100%."""
    return 1 - s["eligible"] / s["free"] if sign and s["free"] else None


@torch.no_grad()
def prune(layers, keep=0.8, scope="global", sign=True, score=magnitude):
    """One IMP step (§3.2, §4.4): the eligible free entries (eligible), the fraction `keep` of them
    with the largest score kept (select; §4.4: |dW|), rewound to dW0 (rewind). Works on the free
    entries only: its working set is one bool per free entry plus one layer's dW0 at a time. -> statistics."""
    elig = {n: eligible(L, sign) for n, L in layers.items()}
    stats = {"layers": {n: {"free": L.delta.numel(), "eligible": int(elig[n].count_nonzero()), "numel": L.numel()}
                        for n, L in layers.items()}}
    for n, kept in select(layers, elig, keep, scope, score).items():
        rewind(layers[n], kept)
        stats["layers"][n]["kept"] = int(kept.count_nonzero())
    tot = lambda key: sum(s[key] for s in stats["layers"].values())
    stats.update(free=tot("free"), eligible=tot("eligible"), kept=tot("kept"), numel=tot("numel"))
    stats["sign_flip"] = flips(stats, sign)
    stats["density"] = stats["kept"] / stats["numel"]
    return stats


@torch.no_grad()
def random_masks(layers, counts, seed):
    """The random-mask baseline (§4.4): exactly counts[name] free entries per layer at random
    positions (open_lth's layerwise random pruning), the others zeroed and frozen."""
    for n, L in layers.items():
        g = torch.Generator().manual_seed(layer_seed(seed, n + "/mask"))
        index = torch.randperm(L.numel(), generator=g)[:counts[n]].sort().values
        L.set_free(index, L.dense().reshape(-1)[index.to(L.delta.device)])


def random_mask_init(run):
    """--method random-mask's initial mask: --mask-like's per-layer counts, or --density's."""
    cfg, layers = run.cfg, run.layers
    if not cfg.mask_like:
        return random_masks(layers, {n: round(cfg.density * L.numel()) for n, L in layers.items()}, cfg.seed)
    like = mask_like_counts(cfg.mask_like, {n: L.numel() for n, L in layers.items()}, verify=False)   # setup read it
    random_masks(layers, like, cfg.seed)


def mask_like_counts(spec, sizes, verify=True):
    """--mask-like's per-layer free counts, for layers of `sizes` ({name: entries}): refused unless its
    masks are of exactly these layers (a base of other shapes, --allow-other-base: other densities).
    verify: its checksum is checked (setup does, before the base loads; the counts need only the header)."""
    like = AF.mask_counts(spec, verify)   # name -> (free entries, mask bytes)
    if set(like) != set(sizes):
        raise ValueError(f"--mask-like {spec}: its layers are not this model's gated layers; pass a RIGSA "
                         f"adapter (RUN/iterK) trained on this base")
    for n, size in sizes.items():
        if like[n][1] != -(-size // 8) or like[n][0] > size:
            raise ValueError(f"--mask-like {spec}: its mask of {n} is for a layer of about {8 * like[n][1]:,} "
                             f"entries, and this model's has {size:,}; its per-layer counts cannot be copied: pass "
                             f"an adapter made on a base of this model's shapes")
    return {n: free for n, (free, _) in like.items()}


def density_report(layers):
    per = {n: L.delta.numel() / L.numel() for n, L in layers.items()}
    total = sum(L.delta.numel() for L in layers.values()) / max(sum(L.numel() for L in layers.values()), 1)
    return total, per

# -----------------------------------------------------------------------------
# training (paper §4.4): the schedule, one optimizer step, one IMP iteration, the IMP loop

def get_lr(step, total, warmup, peak):
    """Piecewise linear (§4.4): step 0 .. warmup-1 rise to `peak`, then linear decay reaching 0 at
    `total` (the end of the IMP iteration). Step 0 already trains (HF's schedule wastes it)."""
    if step < warmup:                       # 1) linear warmup
        return peak * (step + 1) / warmup
    if step >= total:                       # 2) past the end
        return 0.0
    return peak * (total - step) / max(total - warmup, 1)  # 3) linear decay to 0


def encode_example(tok, image, label, digits, eos):
    """-> token ids and the supervised positions: the answer digit and <|im_end|> after the prefix."""
    ids = tok.encode(prompt(tok, image)) + [digits[int(label)], eos]
    return ids, [len(ids) - 2, len(ids) - 1]


def batch_loss(model, rows, pad_id, device):
    """Summed cross-entropy over the supervised tokens of a micro-batch of (ids, positions), right
    padded. Only the supervised positions go through lm_head (no (T, V) logits). -> (sum, count)."""
    L = max(len(r) for r, _ in rows)
    x = torch.tensor([r + [pad_id] * (L - len(r)) for r, _ in rows], device=device)
    am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r, _ in rows], device=device)
    b = torch.tensor([i for i, (_, p) in enumerate(rows) for _ in p], device=device)
    t = torch.tensor([q for _, p in rows for q in p], device=device)
    h = model(x, am, hidden_only=True)                    # (B, T, C)
    logits = model.lm_head(h[b, t - 1]).float()           # (n_sup, V): position t-1 predicts token t
    return F.cross_entropy(logits, x[b, t], reduction="sum"), len(t)


def accumulate(model, rows, micro_batch, pad_id, device, amp=contextlib.nullcontext(), n_sup=None):
    """Forward and backward over micro-batches of one effective batch (§4.4: batch 16 by gradient
    accumulation). Each micro-batch's summed loss is divided by the supervised-token count of the
    whole effective batch (n_sup: of the global batch, when these rows are one rank's share), so
    the gradient is that of the batch mean. -> the summed loss of these rows over n_sup (float)."""
    n_sup = n_sup or sum(len(p) for _, p in rows)
    total = torch.zeros((), device=device)
    for mb in range(0, len(rows), micro_batch):
        with amp:
            s, _ = batch_loss(model, rows[mb:mb + micro_batch], pad_id, device)
        (s / n_sup).backward()
        total += s.detach().float()  # summed on the device: one host sync per step, not per micro-batch
    return total.item() / n_sup


def make_optimizer(model, cfg, moments="device"):
    """AdamW (§4.4) on the trainable tensors: dW decayed by --weight-decay, the gate not (unless
    --decay-gate); LoRA: every LoRA matrix decayed by --lora-weight-decay (Table 4). Its moments
    live where `moments` says (memory.adamw_step)."""
    if METHODS[cfg.method]["lora"]:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": cfg.lora_weight_decay}]
    else:
        layers = adapters(model)
        deltas = [L.delta for L in layers.values()]
        gates = [L.alpha for L in layers.values() if L.alpha.requires_grad]
        groups = [{"params": deltas, "weight_decay": cfg.weight_decay},
                  {"params": gates, "weight_decay": cfg.weight_decay if cfg.decay_gate else 0.0}]
        groups = [g for g in groups if g["params"]]
    # foreach=False: the per-tensor update, with temporaries the size of one tensor, not of the model
    # (foreach's _foreach_sqrt would allocate 4 bytes per parameter at once, 6.4 GB at 1.7B). It is
    # what the CPU runs by default, so the numbers are those of torch.optim.AdamW there
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    opt.moments = moments
    return opt


def train_step(run, opt, rows, lr):
    """One optimizer step on one effective batch of encoded rows: on torchrun each rank takes its
    contiguous share of them (the single-process order, sharded), divides by the supervised tokens
    of the whole batch, and the gradients are summed across ranks before the identical AdamW step
    on every rank. -> the batch's mean loss."""
    for grp in opt.param_groups:
        grp["lr"] = lr
    n_sup = sum(len(p) for _, p in rows)
    loss = accumulate(run.model, rows[util.shard(len(rows))], run.cfg.micro_batch, run.tok.pad_id, run.device,
                      run.amp, n_sup)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    if util.world()[1] > 1:   # torchrun: the ranks' gradients and losses summed (DDP's no_sync, then sync)
        loss, seconds = util.all_reduce_grads(params, loss, run.device)
        run.comm_s += seconds
    if not math.isfinite(loss):   # AdamW would write NaN into every dW; the last checkpoint stays as it was
        raise ValueError(f"the training loss is {loss} at lr {lr:.3g}: the run diverged, and this step was not applied; "
                         f"start again with a lower --lr (the finished iterations and the last resume checkpoint are kept)")
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
    memory.adamw_step(opt)   # torch's AdamW step; with host or 8-bit moments, streamed per tensor (lib/memory.py)
    opt.zero_grad(set_to_none=True)
    return loss


def setup(cfg, resume=None, given=None):
    """Everything before the first step: the data (§4.2), the base model and its adapters (§3.2;
    LoRA: §5.3), the memory check, the run directory and the schedule's length; `resume`, resume.pt's
    content, puts the adapters back as they were; given: the flags the user typed (check_config)."""
    out = Path(cfg.out)
    lora = METHODS[cfg.method]["lora"]
    device = util.init_distributed(cfg.device)   # torchrun: rank 0 downloads, the others wait (rank_zero_first)
    mask_like = None
    if cfg.mask_like and resume is None:   # its base is checked in rundir.start, its shapes just after
        _, mask_like, like = read_adapter(cfg.mask_like, tensors=False)
        if METHODS[like.method]["lora"]:
            raise ValueError(f"--mask-like {cfg.mask_like}: a {like.method} adapter, which has no mask to copy; pass "
                             f"one of a masked method's runs (RUN/iterK of --method rigsa or lt-sft)")
    # data (§4.2): encoded on the fly, 16 prompts per step cost nothing next to the model; read (and
    # fetched) before the base, whose download is gigabytes: a bad data file is said first
    data, hashes = util.rank_zero_first(lambda: mnist.run_splits(cfg))
    # the schedule's length (§4.4: epochs of the training split, or --steps), and the flags it would leave idle,
    # said before the base's download
    epochs = cfg.lora_epochs if lora else cfg.epochs
    steps = math.ceil(len(data["train"][0]) * epochs / cfg.batch_size)
    steps = min(steps, cfg.steps) if cfg.steps else steps
    left = (n_iters(cfg) - (resume or {}).get("iteration", 1) + 1) * steps - (resume or {}).get("step", 0)
    rundir.check_steps(cfg, given, steps, left)
    # the base's files (one hub commit, resumed on) and --dtype resolved (auto: bfloat16 where the device
    # computes it natively), checked against --resume's run and --mask-like's adapter: rundir.start
    base, ident, dtype, started, checks = rundir.start(cfg, device, mask_like, resumes=resume is not None)
    util.same_on_every_rank({"data files": hashes, "base model": ident})   # config.json records rank 0's
    # the base's config and tokenizer, checked before its weights load
    mcfg, tok = (qlora.check_model if METHODS[cfg.method]["nf4"] else M.check_checkpoint)(base)[:2]
    shapes = adapted_shapes(mcfg)   # --mask-like's masks and --rank against this base's layers, before the load
    if mask_like is not None:
        mask_like_counts(cfg.mask_like, {n: o * i for n, (o, i) in shapes.items()})
    if lora:
        qlora.check_rank(cfg.rank, shapes.values())
    # every example within the model's positions (a 28x28 digit is ~850 tokens): said before the load, as
    # evals/run.py does, rather than trained past the positions the model knows. One image per split: every
    # prompt of a split has its length, since SmolLM2's tokenizer makes one token per pixel digit
    digits, eos = digit_ids(tok), end_id(tok)
    longest = max(len(encode_example(tok, x[0], 0, digits, eos)[0]) for x, _ in data.values())
    if longest > mcfg.max_position_embeddings:
        raise ValueError(f"{cfg.model}: a Textual MNIST example (prompt and answer) is {longest} tokens, more than "
                         f"the model's {mcfg.max_position_embeddings} positions; use a model with more, or smaller digits")
    torch.manual_seed(cfg.seed)
    if cfg.resume:   # the run continues on the data it started on (--data-dir may move, not change)
        rundir.check_data(out, mnist.mnist_dir(cfg.data_dir), started.get("data") or {}, hashes)

    # qlora.load_model also reads pre-quantized bnb-4bit checkpoints (§5.3: Unsloth's)
    model, tok = (qlora.load_model if METHODS[cfg.method]["nf4"] else M.load)(base, device, dtype)
    # mixed precision, one recipe on CUDA and the CPU: bfloat16 weights and autocast, float32 master dW
    # (GatedSparseLinear.delta), LoRA matrices and AdamW state
    amp = torch.autocast(device.type, torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    # the baseline lives in its own file (§5.3): 4-bit base (qlora), LoRA's A seeded by --seed
    layers = {} if lora else install_adapters(model, cfg)
    if lora:
        qlora.attach(model, METHODS[cfg.method]["nf4"], cfg.seed, cfg.rank, cfg.lora_alpha, cfg.lora_dropout)
    run = rundir.Run(cfg, out, model, tok, device, amp, layers, data, digit_ids(tok), end_id(tok), steps,
              cfg.lora_lr if lora else cfg.lr, epochs, None, [], base=ident, checks=checks)
    if resume is not None:   # the adapters as they were (a later iteration is smaller), for the estimate
        AF.set_trainable(model, layers, resume["state"])
    elif METHODS[cfg.method]["init_mask"]:   # the method's initial mask (random-mask: §4.4), in the estimate too
        METHODS[cfg.method]["init_mask"](run)
    model.checkpoint_layers = cfg.checkpoint_activations   # model.py: per decoder layer; the estimate knows it
    tokens = cfg.micro_batch * len(encode_example(tok, data["train"][0][0], 0, run.digits, run.eos)[0])
    run.moments = memory.choose_moments(memory.memory_plan(model, layers, device, amp, tokens), device, cfg.moments,
                                        cfg.checkpoint_activations, cfg.micro_batch)
    if resume is not None and resume["optimizer"] is not None:   # AdamW's state fits this code's, before the run dir is touched
        memory.check_optimizer_state(make_optimizer(model, cfg, run.moments), resume["optimizer"],
                                     resume.get("optimizer_names"), model)
    # the run directory is written once the data and the model have loaded, and the step fits; a
    # resumed run takes up its log, position and RNG
    rundir.begin(run, started, hashes, resume)
    return run


def train_iteration(run, it):
    """Train IMP iteration `it` (§4.4): a fresh AdamW and schedule (§3.2), the training split in a
    seeded order, one optimizer step per effective batch. Continues a resumed iteration where it
    stopped, writes resume checkpoints every --save-every steps. -> False if halted (--halt-after)."""
    cfg, model = run.cfg, run.model
    model.train()
    opt = make_optimizer(model, cfg, run.moments)
    step = 0
    if run.resume is not None and it == run.start_iter:
        step = run.start_step
        if run.resume["optimizer"] is not None:
            memory.load_optimizer_state(opt, run.resume["optimizer"])
    x, y = run.data["train"]
    g = torch.Generator().manual_seed(cfg.seed * 1000 + it)
    # the epochs' orders that the steps reach, drawn in sequence (a huge --epochs cut short by --steps costs nothing)
    n_orders = min(math.ceil(run.epochs), math.ceil(run.steps * cfg.batch_size / max(len(x), 1)))
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(max(n_orders, 1))])
    bar = util.progress(total=run.steps, desc=f"iter {it}/{n_iters(cfg)}", unit="step")
    bar.update(step)
    t0, tokens = time.perf_counter(), 0
    while step < run.steps:
        lr = get_lr(step, run.steps, cfg.warmup, run.lr)
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        rows = [encode_example(run.tok, x[i], y[i], run.digits, run.eos) for i in idx]
        loss = train_step(run, opt, rows, lr)
        step += 1
        run.done_steps += 1
        tokens += sum(len(r) for r, _ in rows)
        bar.set_postfix(loss=loss, lr=lr, tok_s=tokens / (time.perf_counter() - t0), refresh=False)
        bar.update(1)
        if step % cfg.log_every == 0 or step == run.steps:
            run.log_step(it, step, loss, lr, tokens / (time.perf_counter() - t0))   # metrics.jsonl, with the gates' range
        stop = rundir.checkpoint(run, it, step, lambda: save_resume(run, opt, it, step))   # --save-every, --halt-after, signals
        if stop:
            bar.close()
            util.say(stop)
            return False
    bar.close()
    run.resume = None
    return True


def evaluate(run, it):
    """Iteration `it`'s record: validation and test accuracy (§5.1, Figure 2a: before pruning),
    density, per-layer alpha, and the trainable count of Figure 4 (free dW entries plus the gates,
    or the LoRA matrices)."""
    cfg, model, layers = run.cfg, run.model, run.layers
    res = {"event": "iteration", "iter": it}
    res["trainable"] = (sum(L.delta.numel() + int(L.gated) for L in layers.values()) if layers
                        else sum(p.numel() for p in model.parameters() if p.requires_grad))
    for split in [s for s in ("val", "test") if s in run.data]:   # on torchrun each rank scores its share
        x, y = run.data[split]
        part = util.shard(len(x))
        _, preds = mnist_accuracy(model, run.tok, x[part], y[part], batch_size=cfg.eval_batch)
        preds = torch.tensor(util.gather(preds.tolist()), dtype=torch.long)
        # exact (correct / images, as evals/run.py writes it), not a float32 mean's 0.7200000286
        res[f"{split}_acc"] = (preds == y.long()).sum().item() / len(preds) if len(preds) else float("nan")
        res[f"{split}_images"] = len(y)   # what the accuracy is over: its interval's N (reproduce.py)
    if layers:
        res["density"], res["layer_density"] = density_report(layers)
        res["alpha"] = {n: L.alpha.item() for n, L in layers.items()}
    return res


def save_resume(run, opt, it, step):
    """resume.pt: the trainable state, the optimizer, where the run is, the RNG and the log."""
    rundir.save_resume(run.out, {"iteration": it, "step": step, "optimizer": opt.state_dict() if opt is not None else None,
                                 "optimizer_names": memory.group_names(run.model, opt) if opt is not None else None,
                                 "state": AF.tensors_of(adapters(run.model), qlora.lora_state_dict(run.model)),
                                 "rng": rundir.rng_states(run.device), "log": run.log,
                                 "config": dataclasses.asdict(run.cfg)})   # --resume checks config.json against it


def read_adapter(spec, tensors=True):
    """-> (its tensors or None, its metadata, its Config) (adapter_files.read; a key this version lacks is said)."""
    t, meta, config = AF.read(spec, tensors)
    if isinstance(config, dict) and "model" not in config and (meta.get("base") or {}).get("model"):
        config = {**config, "model": meta["base"]["model"]}   # the base it records, not this version's default
    return t, meta, rundir.config_from(config, AF.adapter_path(spec), Config, check_saved_adapter)


def check_saved_adapter(cfg):
    """flags.check on an adapter's config, but a --criterion this process has not registered passes: it
    chose the mask, which the file holds (a criterion a script of one's own registered, say); what decides
    how the adapter installs is still checked."""
    flags.check(cfg if cfg.criterion in CRITERIA else dataclasses.replace(cfg, criterion=next(iter(CRITERIA))))


def save_adapter(model, path, cfg, extra=None):
    """Write the trained adapter, with its config and `extra` (adapter_files.write)."""
    AF.write(path, AF.tensors_of(adapters(model), qlora.lora_state_dict(model)), dataclasses.asdict(cfg), extra)


def save_iteration(run, it, res):
    """Record iteration `it`'s evaluation with its adapter's checksum (a resume and reproduce.py check the
    file against it: rundir.check_iterations), then write the adapter (and for LoRA its PEFT copy)."""
    cfg = run.cfg
    tensors = AF.tensors_of(adapters(run.model), qlora.lora_state_dict(run.model))   # the same on every rank
    res["adapter_sha256"] = AF.checksum(tensors)
    run.record(res)   # first: iterK.safetensors marks the iteration done (rundir.finished), its record with it
    if util.world()[0] != 0:  # rank 0 writes the adapters
        return
    if METHODS[cfg.method]["lora"]:   # and the PEFT copy before it too
        qlora.save_peft(run.model, run.out / f"iter{it}-peft", cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.model,
                        cfg.revision or None)
    AF.write(run.out / f"iter{it}.safetensors", tensors, dataclasses.asdict(cfg),
             {"base": run.base, "base_check": run.checks, "moments": run.placed, "code": util.code_version(),
              **{k: v for k, v in res.items() if k in ("iter", "val_acc", "test_acc", "density", "trainable")}},
             res["adapter_sha256"])   # hashed once (gigabytes at 1.7B)
    print(f"iter {it}:" + "".join(f" {k} {res[k + '_acc']:.4f}" for k in ("val", "test") if k + "_acc" in res)
          + (f" density {res['density']:.4%}" if run.layers else ""))


def prune_and_rewind(run, it):
    """After iteration `it` (§3.2, §4.4): prune, rewind the kept entries to dW0, reset the gate,
    and checkpoint, so that a resumed run starts iteration it + 1 from here."""
    cfg, layers = run.cfg, run.layers
    keep = cfg.keep[min(it, len(cfg.keep)) - 1] if isinstance(cfg.keep, tuple) else cfg.keep   # pruning `it`'s
    st = prune(layers, keep, cfg.prune_scope, sign=METHODS[cfg.method]["gated"], score=CRITERIA[cfg.criterion])
    if cfg.reset_alpha:
        for L in layers.values():
            L.alpha.data.fill_(cfg.alpha_init if L.gated else 1.0)
    run.record({"event": "prune", "iter": it, "sign_flip": st["sign_flip"], "density": st["density"],
                "kept": st["kept"], "eligible": st["eligible"], "free": st["free"],
                "layer_sign_flip": {n: flips(s, METHODS[cfg.method]["gated"]) for n, s in st["layers"].items()},
                "layer_density": {n: s["kept"] / s["numel"] for n, s in st["layers"].items()}})
    said = "not measured" if st["sign_flip"] is None else f"{st['sign_flip']:.2%} of free entries"
    util.say(f"pruned after iter {it}: sign flips {said}, "
             f"density now {st['density']:.4%}")
    save_resume(run, None, it + 1, 0)


def train(cfg, given=None):
    """The IMP loop (§3.2, §4.4): each iteration trains with a fresh AdamW and schedule, evaluates
    and saves its adapter, and all but the last prune, rewind to dW0 and reset the gate. `--iters 5`
    is 5 trainings and 4 prunings. given: the flags the user typed (check_config). -> the metrics
    log, or None if halted (--halt-after)."""
    util.init_distributed(cfg.device)             # under torchrun: this rank's process group, first,
    util.same_on_every_rank({flags.flag(f): v for f, v in dataclasses.asdict(cfg).items()})   # and one command
    with rundir.run_lock(cfg), rundir.own_threads():   # one writer per run directory, before resume.pt is read
        cfg, resume = rundir.resumed(cfg, given, flags.check)
        if cfg.resume and resume is None and (log := rundir.finished(cfg.out, n_iters(cfg))) is not None:
            return log                            # a complete run: nothing left to do
        run = setup(check_config(cfg, given), resume, given)
        with rundir.stop_on_signals():
            for it in range(run.start_iter, n_iters(run.cfg) + 1):
                if not train_iteration(run, it):
                    return None                   # halted or stopped: continue with --resume
                res = evaluate(run, it)           # Figure 2a: each iteration before its pruning
                save_iteration(run, it, res)
                if it < n_iters(run.cfg):
                    prune_and_rewind(run, it)     # writes resume.pt for iteration it + 1
                    sig = rundir.stop_signal(run.device)   # or --halt-after's count reached at the iteration's end
                    if sig or run.cfg.halt_after and run.done_steps >= run.cfg.halt_after:
                        util.say(f"{'stopped' if sig else 'halted'} after iteration {it} ({run.done_steps} steps); "
                                 f"continue with: {rundir.continue_command(run.out)}")
                        return None
        if util.world()[0] == 0:
            (run.out / "resume.pt").unlink(missing_ok=True)   # complete: its adapters are the iterK files
            rundir.print_summary(run.log)
        return run.log


# -----------------------------------------------------------------------------
# the command line

def main(argv=None, shell=False):
    """python rigsa.py train | show | merge | demo (cli.py: their flags, merge, the demo, and what an
    error or a signal prints)."""
    import cli   # sits on top of this file
    cli.main(argv, shell)


if __name__ == "__main__":
    sys.modules["rigsa"] = sys.modules["__main__"]   # cli's `import rigsa` is this module, not a second copy
    main(shell=True)
