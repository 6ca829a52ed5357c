"""
adapter_files.py: the adapter files, and merging an adapter into its base. It knows the layers only by
what they hold (a gated sparse layer: mask, delta, alpha, init_seed, init_check; LoRA: its two
matrices; either: delta_weight()), so rigsa.py, cli.py, evals/run.py and lib's rundir.py and sparse.py
import it, not the other way round.

A RIGSA-family adapter file (safetensors), per adapted layer `{name}`:
  {name}.mask        uint8 (ceil(out*in/8),)  the row-major mask bit-packed as np.packbits does
  {name}.delta       float32 (k,)             dW at the k free entries, in row-major order
  {name}.alpha       float32 (1,)             the gate
  {name}.init_seed   int64 (1,)               dW0's seed (dW0 is regenerated, not stored)
  {name}.init_check  float32 (16,)            dW0's first values: regeneration on another platform is checked
A LoRA / QLoRA file holds the lora_A / lora_B matrices. The metadata: format=rigsa-adapter, the run's
config (JSON), the base's identity (model.base_identity), the iteration's evaluation, and
tensors_sha256 (checksum): a byte changed inside the tensor data, which safetensors cannot see,
is found when the file is read.
"""
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import model as M
from lib import util

POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)])   # set bits of each byte value


# byte -> its 8 bits, most significant first (np.packbits' order, the adapter file's)
_BITS = ((torch.arange(256)[:, None] >> torch.arange(7, -1, -1)) & 1).bool()   # (256, 8)


def pack_bits(index, n, device):
    """Sorted flat positions (k,) of n entries -> the packed mask, uint8 (ceil(n/8),)."""
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.bool, device=device)
    bits[index] = True
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)
    return (bits.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed, n):
    """The packed mask -> bool (n,)."""
    return util.on_device(_BITS, packed.device).index_select(0, packed.int()).view(-1)[:n]


def all_free_mask(n):
    """The packed mask of n entries all free: every bit set, the padding bits of the last byte 0."""
    packed = torch.full((-(-n // 8),), 255, dtype=torch.uint8)
    if n % 8:
        packed[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return packed


def tensors_of(layers, lora=()):
    """The trained adapter as the files hold it: each gated sparse layer of `layers` {name: layer}
    in its compact storage, and `lora`, LoRA's state dict."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in dict(lora).items()}
    for n, L in layers.items():
        tensors[f"{n}.mask"] = L.mask.cpu() if L.mask is not None else all_free_mask(L.numel())
        tensors[f"{n}.delta"] = L.delta.detach().cpu()
        tensors[f"{n}.alpha"] = L.alpha.detach().cpu().float().reshape(1)
        tensors[f"{n}.init_seed"] = torch.tensor([L.init_seed], dtype=torch.int64)
        tensors[f"{n}.init_check"] = L.init_check
    return tensors


@torch.no_grad()
def set_adapter_tensors(layers, tensors, source):
    """Give installed GatedSparseLinear layers the masks, dW values and gates of adapter_tensors'
    dict (an adapter file, or resume.pt); `source` names it in errors."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    if names - set(layers):   # every tensor lands in a layer: none may name a layer this model lacks
        extra = sorted(names - set(layers))
        raise ValueError(f"{source}: adapts {len(extra)} layer(s) this model has no adaptable nn.Linear for "
                         f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}; another base model?)")
    parts = ("mask", "delta", "alpha", "init_seed", "init_check")
    for n, L in layers.items():
        if f"{n}.mask" not in tensors:
            raise ValueError(f"{source}: no adapter for layer {n} (another base model?)")
        odd = [k for k in tensors if k.startswith(n + ".") and k[len(n) + 1:] not in parts]
        odd += [f"{n}.{k} missing" for k in parts[:3] if f"{n}.{k}" not in tensors]
        odd += [f"{n}.{k} is {str(tensors[f'{n}.{k}'].dtype).removeprefix('torch.')}, not float32" for k in parts[1:3]
                if f"{n}.{k}" in tensors and tensors[f"{n}.{k}"].dtype != torch.float32]   # rigsa writes float32
        if odd or tensors[f"{n}.delta"].dim() != 1 \
                or tensors[f"{n}.alpha"].numel() != 1 or tensors[f"{n}.mask"].dtype != torch.uint8 \
                or tensors[f"{n}.mask"].dim() != 1:
            raise ValueError(f"{source}: layer {n}'s tensors are not an adapter's ({', '.join(odd) or 'shapes'}); "
                             f"pass a file written by rigsa.py train")
        if f"{n}.init_check" in tensors and not torch.equal(tensors[f"{n}.init_check"], L.init_check):
            raise ValueError(f"{source}: dW0 of {n} does not regenerate as when the adapter was made (this platform's "
                             f"generator, or rigsa's init code, init_delta or layer_seed, differs from what trained it)")
        m, d = tensors[f"{n}.mask"], tensors[f"{n}.delta"]
        if m.numel() == -(-L.numel() // 8) and L.numel() % 8:   # the last byte's padding bits are 0
            m = m.clone()
            m[-1] &= (0xFF << (8 - L.numel() % 8)) & 0xFF
        free = int(POPCOUNT[m.long()].sum()) if m.numel() == -(-L.numel() // 8) else -1
        if free != d.numel():
            raise ValueError(f"{source}: layer {n} has {d.numel()} dW values for a mask of "
                             f"{'a wrong size' if free < 0 else f'{free} free entries'} (of {L.numel()}): another "
                             f"base model's adapter, or a damaged file; pass the one its run wrote for this base")
        L.set_packed(None if free == L.numel() else m, d)
        L.alpha.fill_(float(tensors[f"{n}.alpha"]))


@torch.no_grad()
def set_trainable(model, layers, state):
    """--resume: the trainable tensors as tensors_of saved them, into the gated sparse `layers`, or
    (LoRA: no such layers) into the model's parameters of the same names."""
    if layers:
        return set_adapter_tensors(layers, state, "resume.pt")
    own = dict(model.named_parameters())
    for n, t in state.items():
        own[n].copy_(t)


def checksum(tensors):
    """sha256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())   # the bytes as they are, no copy
    return h.hexdigest()


# the config's fields that decide what the tensors compute once installed (LoRA's scale is lora_alpha / rank):
# under a checksum of their own, since a user may edit the others (the base's path, after moving it)
INSTALL = ("method", "rank", "lora_alpha")


def install_checksum(config):
    return hashlib.sha256(json.dumps({k: config.get(k) for k in INSTALL}, sort_keys=True).encode()).hexdigest()


def write(path, tensors, config, extra=None, tensors_sha256=None):
    """The adapter file: `tensors` (tensors_of), and as metadata the run's config (a dict), `extra`,
    the tensors' checksum (tensors_sha256: checksum(tensors), if the caller took it) and that of the
    config's INSTALL fields."""
    meta = {"format": "rigsa-adapter", "config": json.dumps(config), **(extra or {}),
            "tensors_sha256": tensors_sha256 or checksum(tensors), "install_sha256": install_checksum(config)}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    util.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def adapter_path(spec):
    """RUN/iterK (or RUN/iterK.safetensors) -> the adapter file's path; a name that is none, one line
    naming the adapters there are: in the run directory given, or in the folder of the name."""
    p = Path(spec)
    iters = lambda d: sorted((q.stem for q in d.glob("iter*.safetensors")), key=lambda n: (len(n), n)) \
        if d.is_dir() else []                                              # iter2 before iter10
    if p.is_dir() and re.fullmatch(r"iter\d+-peft", p.name):               # the LoRA run's copy for peft
        raise FileNotFoundError(f"{spec}: the PEFT copy of {p.parent / p.name.removesuffix('-peft')} (for peft and "
                                f"transformers); name the adapter itself, {p.parent / p.name.removesuffix('-peft')}")
    if p.is_dir() and (have := iters(p)):                                  # a run directory
        raise FileNotFoundError(f"{spec}: a run directory; name one of its adapters as RUN/iterK: "
                                + ", ".join(str(p / n) for n in have))
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    if not p.exists():
        have = iters(p.parent)
        raise FileNotFoundError(f"{p}: adapter file not found; name one as RUN/iterK ("
                                + (f"{p.parent} has {', '.join(have)})" if have else f"{p.parent} holds none)"))
    return p


def check_not_adapter(path, name):
    """--model `name`, resolved to `path`, is a model's folder, not a PEFT adapter's (a LoRA run's iterK-peft/)
    nor a run directory (whose config.json is the run's record: the loaders said three other things)."""
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {name}: a PEFT adapter's folder (adapter_config.json), not a model; pass the base "
                         f"model as --model (and to evaluate a run's adapter, --adapter RUN/iterK)")
    try:
        run = util.read_json(Path(path) / "config.json")
    except (OSError, ValueError):   # none, or unreadable: the model's loader says so
        return
    if isinstance(run, dict) and isinstance(run.get("config"), dict) and "base" in run:
        base = run["base"].get("model") if isinstance(run["base"], dict) else None
        raise ValueError(f"--model {name}: a rigsa run directory (its config.json is the run's record), not a model; "
                         f"pass its base as --model" + (f" ({base}, as its training named it)" if base else "") +
                         f"; its adapter {name.rstrip('/')}/iterK is evals/run.py's --adapter, or a model to train "
                         f"on once merged (rigsa.py merge --adapter {name.rstrip('/')}/iterK --out DIR, then --model DIR)")


def read(spec, tensors=True):
    """-> (its tensors, or None if not asked for: the metadata alone is read; the metadata, with
    "base" parsed; the run's config, a dict)."""
    p = adapter_path(spec)
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except Exception as e:
        raise ValueError(f"{p}: not a readable safetensors file ({' '.join(str(e).split())}): truncated or damaged, "
                         f"or not an adapter; point at the adapter its run wrote (RUN/iterK)") from None
    if meta.get("format") != "rigsa-adapter":
        raise ValueError(f"{p}: not a rigsa adapter file (no format=rigsa-adapter metadata)")
    if t is not None and "tensors_sha256" in meta and checksum(t) != meta["tensors_sha256"]:   # older files: none
        raise ValueError(f"{p}: its tensors do not match the checksum written with them (changed since: a damaged "
                         f"copy or disk); copy it again from where its run wrote it, or train it again (an edit on purpose: "
                         f"save it with lib/adapter_files.write, which records its checksum)")
    bad = next((k for k, v in (t or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:   # before any long work: merge would write a model of NaNs, evaluation score nothing
        raise ValueError(f"{p}: its tensor {bad} is not finite (NaN or inf: a diverged training, or a damaged file); "
                         f"use an earlier iteration's adapter, or train it again")
    try:
        config = json.loads(meta["config"])
        meta = {**meta, "base": json.loads(meta["base"]) if "base" in meta else None}
        if not isinstance(meta["base"], (dict, type(None))):
            raise KeyError("base is not a base model's identity")
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: its metadata is not readable ({type(e).__name__}: {e}); it was not written "
                         f"by rigsa.py train, or was damaged") from None
    if "install_sha256" in meta and isinstance(config, dict) and install_checksum(config) != meta["install_sha256"]:
        raise ValueError(f"{p}: its config's {', '.join(INSTALL)} do not match the checksum written with them "
                         f"(edited since: {', '.join(f'{k} {config.get(k)!r}' for k in INSTALL)}); they decide what "
                         f"its tensors compute, so put back the values its run wrote, or train it again")
    return t, meta, config


def shapes(spec):
    """A saved adapter's tensors' shapes, from its header alone (its metadata checked by read): what
    it fits, known before a base loads. -> {name: shape tuple}."""
    read(spec, tensors=False)   # a rigsa adapter, its metadata readable
    with safe_open(str(adapter_path(spec)), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def mask_counts(spec, verify=True):
    """A saved adapter's (RUN/iterK: --mask-like) layers -> (free entries, the packed mask's bytes, which
    are ceil(the layer's entries / 8): the shape it was made on, as far as the file tells). verify: its
    tensors are read and their checksum checked (gigabytes at 1.7B); else the shapes come from the header."""
    if verify:
        sizes = {k: v.numel() for k, v in read(spec)[0].items()}
    else:
        sizes = {k: math.prod(s) for k, s in shapes(spec).items()}
    return {k[:-len(".delta")]: (n, sizes[k[:-len(".delta")] + ".mask"])
            for k, n in sizes.items() if k.endswith(".delta") and k[:-len(".delta")] + ".mask" in sizes}


def same_base(recorded, have):
    """Whether a base record (adapter, run, reproduce's) names the base `have` (model.base_identity): its
    fingerprint, or one recorded before chat_template.jinja was covered ("without_template") at one hub
    commit, where the template too is the one it was made with."""
    fp = recorded.get("fingerprint")
    return bool(fp) and (fp == have.get("fingerprint") or (
        fp == have.get("without_template") and bool(recorded.get("commit")) and recorded.get("commit") == have.get("commit")))


def check_base(recorded, have, what, allow=False):
    """An adapter (or a run) applies to the base it was made on: recorded and have are
    {"model", "commit", "fingerprint"} (model.base_identity). Another base is refused, since dW0 and
    the mask are only meaningful on W0 (a base of the same shapes would load silently), unless
    allow (--allow-other-base), which is said. -> what the outputs record: "same", "other (allowed)"
    or "unrecorded" (a file from an older version, said)."""
    if not recorded or not recorded.get("fingerprint"):
        util.say(f"warning: {what}: records no base identity (an older version wrote it), so whether it was made "
                 f"on {have['model']} is not checked", file=sys.stderr)
        return "unrecorded"
    if same_base(recorded, have):
        return "same"
    older = recorded["fingerprint"] == have.get("without_template")   # recorded before chat_template.jinja counted
    at = lambda b: f"{b.get('model')} ({'commit ' + b['commit'] + ', ' if b.get('commit') else ''}weights {b['fingerprint']})"
    msg = f"{what}: made on the base {at(recorded)}, not on {at(have)}"
    if older:   # the same weights and files but the template, which a version before 2026-12-05 did not fingerprint
        msg = (f"{what}: recorded by an older rigsa, whose fingerprint of the base left out its chat_template.jinja: "
               f"every other file of {have.get('model')} matches, the template cannot be compared")
    if not allow:
        raise ValueError(f"{msg}; use the base it was made on, or pass --allow-other-base to apply it anyway"
                         + (" (if the template is the one it was made with, nothing differs)" if older else ""))
    util.say(f"warning: {msg}; applied anyway (--allow-other-base)", file=sys.stderr)
    return "other (allowed)"


@torch.no_grad()
def merge_adapters(model, dtype=None):
    """Fold every adapter (RIGSA family or LoRA) into its base weight, in place: W0 + delta in
    float32, cast to `dtype` (default: the weight's own), as plain nn.Linear layers. A 4-bit base
    is refused: merging into it would re-quantize it (lossy). -> (sum |what the cast lost|,
    sum |delta|), to report how much of the adapter survived the cast."""
    todo = [(f"{pname}.{cname}".lstrip("."), parent, cname, child) for pname, parent in list(model.named_modules())
            for cname, child in list(parent.named_children())
            if hasattr(child, "delta_weight")]            # the gated sparse layers and LoRA
    if any(getattr(child, "quantized", False) for *_, child in todo):
        raise ValueError("the base is 4-bit (QLoRA): merging would re-quantize it; merge only adapters on an "
                         "unquantized base, or use the adapter unmerged")
    lost, total = 0.0, 0.0
    for name, parent, cname, child in util.progress(todo, desc="merge", unit="layer"):   # 168 of them at 1.7B
        d = child.delta_weight()                               # (out, in) float32
        if not torch.isfinite(d).all():   # finite tensors (read checks them) whose product overflows float32
            raise ValueError(f"the adapter's delta of {name} is not finite (NaN or inf), so the merged model would "
                             f"not be either; nothing was written")
        w0 = child.weight.float()
        w = (w0 + d).to(dtype or child.weight.dtype)
        lost += ((w.float() - w0) - d).abs().sum().item()
        total += d.abs().sum().item()
        lin = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")   # no init work
        lin.weight = nn.Parameter(w, requires_grad=False)
        setattr(parent, cname, lin)
    return lost, total


MERGE_MARK = ".rigsa-merge-in-progress"   # in a merge's temporary folder from its flock to its rename


def remove_killed_merges(out):
    """The temporary folders that merges into `out` killed by SIGKILL (no cleanup ran) left: only real
    folders of this user's, named as mkdtemp names them, holding MERGE_MARK (written once the flock
    is held, so never a live merge's) and held by no process (util.held_by_nobody); anything else
    that looks like one (a user's folder, a link, an older rigsa's) stays."""
    if util.fcntl is None:   # no flock: a live merge could not be told from a killed one
        return
    try:
        found = list(out.parent.iterdir())
    except OSError:   # a folder one may write but not list: nothing to clean
        return
    for old in found:
        try:
            st = old.lstat()
        except OSError:
            continue
        if (re.fullmatch(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp", old.name) and stat.S_ISDIR(st.st_mode)
                and st.st_uid == os.getuid() and (old / MERGE_MARK).is_file() and util.held_by_nobody(old)):
            shutil.rmtree(old, ignore_errors=True)
            util.say(f"note: {old}: the temporary folder of a killed merge into {out}; " +
                     ("removed" if not os.path.lexists(old) else "could not be removed entirely; delete it"),
                     file=sys.stderr)


def write_merged(out, src, model, dtype, record):
    """The merged model as a checkpoint in the official layout, at `out`, with the base's other files
    (tokenizer, configs) from `src` and `record` as rigsa-merge.json. Written into a sibling folder
    renamed to `out` at the end: a failure (a full disk, Ctrl-C, SIGTERM) leaves no half checkpoint,
    and the folder is removed; the folder a kill (SIGKILL) left, the next merge into `out` removes."""
    conf = util.read_json(src / "config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with util.sigterm_cleanup(f"stopped; --out {out} not written, and its temporary folder removed"):
        remove_killed_merges(out)
        tmp, held = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)), None
        try:
            held = util.hold_folder(tmp)   # in use: a later merge leaves it alone; then the mark that it is ours
            (tmp / MERGE_MARK).touch()
            os.chmod(tmp, util.file_mode(folder=True))   # mkdtemp's is 0700: the umask's, as mkdir would
            for f in os.listdir(src):
                if not f.endswith(".safetensors") and f != "model.safetensors.index.json" and os.path.isfile(src / f):
                    shutil.copyfile(src / f, tmp / f)   # a new file (umask), not the source's mode (a read-only cache's)
            M.save_checkpoint(tmp, conf, model.state_dict(), dtype)
            util.write_json(tmp / "rigsa-merge.json", record)
            (tmp / MERGE_MARK).unlink()
            try:
                if out.exists():
                    out.rmdir()           # empty (checked before)
                os.replace(tmp, out)
            except OSError as e:   # another process made it since the check: a folder with files, a file or a link
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise FileExistsError(f"--out {out}: another process wrote it during this merge; what is there is "
                                      f"that process's, and nothing of this merge's was kept; name a new "
                                      f"folder") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if held is not None:
                os.close(held)
