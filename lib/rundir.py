"""
rundir.py: a training run directory's life, for rigsa.py's loop. Knows nothing of the method's
arithmetic: a run's config is a flags.py dataclass (rigsa.Config), read here for its machinery (the
base, the paths, --dtype, the resume and stop flags) and for the lines a run prints; its trainable
state is a dict of tensors.

  config_from, resumed     a saved config read back (keys of another version named and dropped);
                           --resume: the flags the user typed against the saved ones, resume.pt
  finished, check_steps    --resume of a complete run; flags the run's length leaves idle
  check_iterations         the iterK files are the ones the run's log recorded (not another run's)
  Run                      what a training run holds between its phases; record() appends to metrics.jsonl
  start                    before the data and model load: the base's files, --dtype resolved, the checks
  check_bases, run_dtype,  provenance: the base against --resume's run and --mask-like's adapter; --dtype
  check_data, begin        resolved once; the data files' hashes; config.json and metrics.jsonl at the start,
                           and a resumed run's place
  save_resume, checkpoint  resume.pt, written whole or not at all; when the loop writes it and stops;
  rng_states               every rank's random state in it (CPU and CUDA), restored rank by rank
  continue_command         the line that continues a run (--resume)
  run_lock                 one process writes a run directory at a time (<out>/LOCK)
  STOP, stop_on_signals    Ctrl-C / SIGTERM during training: finish the step, save, stop; on torchrun
                           every rank after the same step (stop_signal)
  print_summary            the density report at the end
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import model as M
from lib import adapter_files as AF
from lib import flags
from lib import interrupts
from lib import util

# -----------------------------------------------------------------------------
# the config, saved and read back

_WARNED = set()


# config keys renamed since runs were saved with them: old name -> (new name, the value's translation)
RENAMED = {"eval_max": ("limit", lambda v: v), "download": ("offline", lambda v: not v)}


def renamed(saved):
    """A saved config with the keys renamed since under their names now (a dict; anything else as it is)."""
    if not isinstance(saved, dict):
        return saved
    out = dict(saved)
    for old, (new, f) in RENAMED.items():
        if old in out and new not in out:
            out[new] = f(out.pop(old))
    return out


def config_from(saved, source, cls, check=None, strict=False):
    """A config of dataclass `cls` (rigsa.Config) from a saved one (config.json, an adapter's
    metadata), possibly written by another version of rigsa: keys this version does not know are
    dropped with one warning line naming them (strict, a resume's: refused); a missing or malformed config, or a value `check`
    refuses, is a ValueError naming `source`."""
    if not isinstance(saved, dict):
        raise ValueError(f"{source}: holds no rigsa config (a {type(saved).__name__}, not a dict); it was not "
                         f"written by rigsa.py train")
    saved = renamed(saved)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - known)
    if unknown and strict:   # a resume: dropped, the run would go on under this version's defaults, and lose them
        raise ValueError(f"{source}: the run started with config keys this version of rigsa does not know: "
                         f"{', '.join(unknown)} (another version's, or a field renamed since), which a resume would "
                         f"drop and go on without; resume it with the code that started it")
    if unknown and (str(source), *unknown) not in _WARNED:   # once per file, however often it is read
        _WARNED.add((str(source), *unknown))
        util.say(f"warning: {source}: ignoring config keys this version of rigsa does not know: {', '.join(unknown)} "
                 f"(written by another version)", file=sys.stderr)
    missing = sorted(known - set(saved))
    if missing and (str(source), "missing", *missing) not in _WARNED:   # an older version's file, or an edit
        _WARNED.add((str(source), "missing", *missing))
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        util.say(f"note: {source}: lacks config keys, so this version's defaults stand for them: "
                 + ", ".join(f"{k}={defaults[k]!r}" for k in missing) + " (written by another version, or edited)",
                 file=sys.stderr)
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})   # JSON's lists
    try:
        check and check(cfg)   # a value this version cannot use (another version's, an edit): named as the file's
    except ValueError as e:
        raise ValueError(f"{source}: a saved value this version cannot use, {e} (written by another version, or "
                         f"edited); fix it, or use the version that wrote it") from None
    return cfg


def resumed(cfg, given, check=None):
    """--resume: the run's saved config (a flag the user typed, default or not, whose value differs
    from the saved one is refused, naming it, unless its field is resumable (flags.field); given=None: the flags that
    differ from their default), its resume.pt (None if there is none), and stale .tmp files from an
    interrupted write removed. A new run: cfg, None."""
    out = Path(cfg.out)
    if not cfg.resume:
        if (out / "config.json").exists():
            try:
                ours = "config" in (d := util.read_json(out / "config.json")) and isinstance(d, dict)
            except (OSError, ValueError, TypeError):   # unreadable: a damaged run's (a model's is valid JSON)
                ours = True
            raise FileExistsError(f"{out}: a run is already there; use --resume or another --out" if ours else
                                  f"{out}: holds a config.json that is not a run's (a model's folder?); choose another --out")
        held = sorted(p.name for p in out.glob("*") if re.fullmatch(r"metrics\.jsonl|resume\.pt|iter\d+(\.safetensors|-peft)",
                                                                    p.name)) if out.is_dir() else []
        if held:   # a run's files without its config: not this run's to replace (nor resumable)
            raise FileExistsError(f"{out}: holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}, files a run "
                                  f"writes, but no config.json; move them, or choose another --out")
        return cfg, None
    try:
        raw = util.read_json(out / "config.json")
        saved = dataclasses.asdict(config_from(raw["config"], out / "config.json", type(cfg), check, strict=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"{out / 'config.json'}: nothing to resume; drop --resume to start a run") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{out / 'config.json'}: not a run's config ({type(e).__name__}: {e}); "
                         f"start a new run with another --out") from None
    if (cfg.revision and cfg.revision != saved.get("revision") and not M.COMMIT.fullmatch(cfg.revision)
            and M.COMMIT.fullmatch(saved.get("revision") or "")):   # a branch or tag: it named that commit then
        util.say(f"note: --revision {cfg.revision}: the run continues on the commit it started from, "
                 f"{saved['revision']}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, revision=saved["revision"])
    typed, shown = flags.typed_by(cfg, given), {}
    if typed("dtype") and cfg.dtype == "auto" and saved.get("dtype") != "auto":   # auto as it resolves here
        resolved, why = util.auto_dtype("auto", util.pick_device(cfg.device))
        model = cfg.model if typed("model") else saved.get("model")
        if isinstance(model, str) and os.path.isdir(model):   # and for this base: a float32 merge stays float32
            resolved, why = util.merge_dtype("auto", resolved, why, model)
        resolved = str(resolved).removeprefix("torch.")
        cfg = dataclasses.replace(cfg, dtype=saved["dtype"] if resolved == saved["dtype"] else resolved)
        shown["dtype"] = f"; 'auto' is {resolved} here"   # named as typed, and what it is
    same = lambda a, b: a == b or isinstance(a, str) and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
    resumable = flags.resumable(type(cfg))
    changed = [f for f in saved if f not in resumable and typed(f) and not same(getattr(cfg, f), saved[f])]
    if changed:
        said = ", ".join(f"--{f.replace('_', '-')} {'auto' if f in shown else getattr(cfg, f)!r} "
                         f"(saved: {saved[f]!r}{shown.get(f, '')})" for f in changed)
        raise ValueError(f"--resume: {said} differ{'s' * (len(changed) == 1)} from the run's saved config; drop "
                         f"{'them' if len(changed) > 1 else 'it'} to continue the run as it was, or start a new run "
                         f"with another --out")
    keep = {f: getattr(cfg, f) for f in resumable if typed(f)}
    # the thread count is in a CPU run's bits only: a CUDA run (or one resumed on CUDA) takes this host's own
    if "threads" not in keep and (util.pick_device(keep.get("device", saved["device"])).type != "cpu"
                                  or str(raw.get("machine")).startswith("cuda")):
        keep["threads"] = 0
    cfg = type(cfg)(**{**saved, **keep, "resume": True, "halt_after": cfg.halt_after})   # a halt is this process's
    for f in ("data_dir", "model"):   # saved as typed: a relative path is the folder the run started in's
        v = getattr(cfg, f)
        if (not typed(f) and isinstance(v, str) and v and not os.path.isabs(v) and not os.path.exists(v)
                and (f == "data_dir" or v.startswith(".") or v.count("/") != 1)):   # a hub id "org/name" is none
            util.say(f"note: --resume: config.json's {f} {v!r} is a path relative to the folder the run started in, "
                     f"and {os.getcwd()} has none; pass --{f.replace('_', '-')} with its path from here", file=sys.stderr)
    # what a kill during a save leaves: util.atomic_write's .NAME.XXXXXXXX.tmp (NAME.tmp from older versions)
    ours = r"(config\.json|metrics\.jsonl|resume\.pt|iter\d+\.safetensors)\.tmp|\.(config\.json|metrics\.jsonl|" \
           r"resume\.pt|iter\d+\.safetensors)\.\w{8}\.tmp"
    for tmp in [*out.glob("*.tmp"), *out.glob("iter*-peft/*.tmp")] if util.world()[0] == 0 else ():   # hidden ones too
        if tmp.is_file() and (tmp.parent != out or re.fullmatch(ours, tmp.name)):   # only this run's own
            tmp.unlink()
    if not (out / "resume.pt").exists():
        return cfg, None
    try:
        state = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{out / 'resume.pt'}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                         f"delete it, and --resume starts the run again from its first step") from None
    lacks = sorted({"iteration", "step", "optimizer", "state", "rng", "log"} - set(state)) if isinstance(state, dict) \
        else [f"everything (a {type(state).__name__})"]
    if lacks:
        raise ValueError(f"{out / 'resume.pt'}: not a resume checkpoint of rigsa.py train (it lacks {', '.join(lacks)}); "
                         f"delete it, and --resume starts the run again from its first step")
    made = state.get("config") if isinstance(state.get("config"), dict) else {}   # older versions' resume.pt: none
    # resume.pt and config.json of one run: a config.json edited since, or another run's resume.pt copied in, would
    # continue one run under the other's numbers (--mask-like's path may move; verify_model changes no number)
    other = [f for f in saved if f not in resumable | {"mask_like", "verify_model"} and f in made
             and made[f] != getattr(cfg, f)]
    if other:
        raise ValueError(f"{out / 'resume.pt'}: written by a run with {', '.join(f'{f} {made[f]!r}' for f in other)}, "
                         f"where {out / 'config.json'} has {', '.join(f'{getattr(cfg, f)!r}' for f in other)}: one of "
                         f"them was edited or copied from another run; put the run's own back, or delete resume.pt and "
                         f"--resume starts the run again from its first step")
    check_iterations(out, state["log"] if isinstance(state["log"], list) else [],
                     f"put the run's own back, or move it out of {out} to continue the run without it")
    return cfg, state



# -----------------------------------------------------------------------------
# the run in memory

@dataclasses.dataclass
class Run:
    """What a training run holds between its phases: set up once by rigsa.setup(), read and updated
    by the IMP loop's steps; record() appends to metrics.jsonl (rank 0)."""
    cfg: object                 # rigsa.Config
    out: Path
    model: torch.nn.Module
    tok: M.Tokenizer
    device: torch.device
    amp: object                 # bfloat16 autocast (--dtype bfloat16, on CUDA or the CPU), else a null context
    layers: dict                # {name: GatedSparseLinear}; empty for LoRA/QLoRA
    data: dict                  # split -> (images, labels)
    digits: list                # token ids of '0'..'9'
    eos: int
    steps: int                  # optimizer steps per IMP iteration
    lr: float                   # peak learning rate
    epochs: float
    moments: str                # where AdamW's moments live (choose_moments, once the adapters are in place)
    log: list                   # every metrics.jsonl record so far
    base: dict = None           # the base model's identity (model.base_identity), recorded with every adapter
    checks: dict = None         # check_base's verdicts (--resume, --mask-like), recorded likewise
    start_iter: int = 1         # where this process starts (a resumed run: where it stopped)
    start_step: int = 0
    resume: dict = None         # resume.pt's content, until the iteration it belongs to has started
    done_steps: int = 0         # optimizer steps taken by this process (--halt-after)
    comm_s: float = 0.0         # seconds in the gradients' all-reduce (torchrun), this process
    placed: list = None         # each placement of the moments the run used, in order (config.json's moments)

    def log_step(self, it, step, loss, lr, tok_s):
        """A training step's metrics.jsonl line: loss, lr, tokens/s, the all-reduce's seconds under
        torchrun, and the gates' mean and range (§3.2's alpha)."""
        r = {"iter": it, "step": step, "loss": loss, "lr": lr, "tok_s": tok_s,
             **({"comm_s": self.comm_s} if util.world()[1] > 1 else {})}
        if self.layers:
            a = torch.stack([L.alpha.detach().float() for L in self.layers.values()])
            r.update(alpha_mean=a.mean().item(), alpha_min=a.min().item(), alpha_max=a.max().item())
        self.record(r)

    def record(self, r):
        self.log.append(r)
        if util.world()[0] == 0:
            util.append_line(self.out / "metrics.jsonl", json.dumps(r))   # whole, or an error naming it


# -----------------------------------------------------------------------------
# provenance: what the run was made from

def check_bases(cfg, ident, mask_like=None):
    """The base the run loads (ident: {"model", **model.base_identity}) against those it builds on:
    --resume's run continues on the base it started on (config.json keeps naming it), and --mask-like's
    adapter (its metadata, mask_like) was trained on it. -> (config.json's content, {} for a new run;
    the checks' verdicts, kept with the run and its adapters). adapter_files.check_base refuses."""
    out = Path(cfg.out)
    started = util.read_json(out / "config.json") if cfg.resume else {}
    checks = dict(started.get("base_check") or {})
    if cfg.resume:
        checks["resume"] = AF.check_base(started.get("base"), ident, f"--resume {out}", cfg.allow_other_base)
    if mask_like is not None:
        checks["mask_like"] = AF.check_base(mask_like.get("base"), ident, f"--mask-like {cfg.mask_like}",
                                            cfg.allow_other_base)
    return started, checks


def run_dtype(cfg, device):
    """--dtype resolved once (util.auto_dtype) and saved resolved, so that a resumed run keeps it on any
    machine; a run that an older version saved as "auto" ran bfloat16 on CUDA, float32 on the CPU.
    -> (torch dtype, why)."""
    if not cfg.resume:
        return util.auto_dtype(cfg.dtype, device)
    legacy = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtype = legacy if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return dtype, "as the run started" + util.emulated(dtype, device)


def start(cfg, device, mask_like=None, resumes=False):
    """A run's provenance, after its data are read (rigsa.setup: before the base's gigabytes) and before
    its model loads: --dtype resolved (run_dtype) and the base's
    files (a hub id resolves to one commit, which the run records in its config and every adapter's,
    and a resumed run loads again, whatever the hub's main is by then), both written into cfg; the
    base checked (check_bases); the config and the dtype's reason printed; `resumes`: from a resume.pt,
    where it runs against where it started said (said_where). -> (the base's folder, its
    identity, the dtype, config.json's content or {}, the checks' verdicts)."""
    dtype, why = run_dtype(cfg, device)
    had = torch.get_num_threads()
    cfg.threads = cfg.threads or had   # saved resolved: a resumed run takes it again (resumed)
    if cfg.threads != had:
        torch.set_num_threads(cfg.threads)
    base = util.rank_zero_first(lambda: M.resolve(cfg.model, cfg.revision or None, cfg.verify_model, cfg.offline))
    AF.check_not_adapter(base, cfg.model)
    if not cfg.resume:   # a float32 merge stays float32 under auto, as evals/run.py evaluates it
        dtype, why = util.merge_dtype(cfg.dtype, dtype, why, base)
    cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.revision = M.hub_commit(base) or cfg.revision
    ident = {"model": cfg.model, **M.base_identity(base)}   # recorded in config.json and every adapter
    started, checks = check_bases(cfg, ident, mask_like)
    started.setdefault("dtype_choice", why)   # a resumed run keeps why its dtype is what it is
    here = {"torch": torch.__version__, "machine": util.machine(device), "processes": util.world()[1],
            "code": util.code_version()}
    if cfg.resume and resumes:
        said_where(cfg, device, started, here, had)
    else:   # config.json keeps where the run started (null: an older version's, not recorded); a resume
        started.update(here, threads=cfg.threads, git_commit=util.git_commit())   # without resume.pt starts it
        started.pop("resumed_on", None)                                            # again from its first step
        started.pop("moments", None)
    util.say("config:", json.dumps(dataclasses.asdict(cfg)))
    util.say(f"dtype: {cfg.dtype} ({why.removeprefix('auto: ')})"
             + ("; weights only: no autocast, no loss scaling" if dtype == torch.float16 else ""))
    return base, ident, dtype, started, checks


def said_where(cfg, device, started, here, had):
    """--resume from a resume.pt: what the run's last bits depend on beyond its config and data
    (torch's kernels, the machine, the number of processes and, in a CPU run, of threads; rigsa's own
    code, util.code_version: `here`) against where it started (config.json, `started`), in one note:
    each difference, recorded in started["resumed_on"]; the thread count taken from config.json when
    this process (`had`) has another; "bit for bit" promised only when nothing differs now or in an
    earlier resume."""
    kinds = {"torch": str, "machine": str, "processes": int, "threads": int, "code": str}
    ok = lambda k, v: isinstance(v, kinds[k]) and not isinstance(v, bool) and v != ""   # else: not recorded
    cpu = torch.device(device).type == "cpu" and not str(started.get("machine")).startswith("cuda")
    saved = started.get("config", {}).get("threads")   # the count resumes take (a typed --threads sets it)
    start = started.get("threads") or saved             # the count it started on (older versions: the saved one)
    here = {**here, **({"threads": cfg.threads} if cpu else {})}
    then = {k: v for k, v in {**started, "threads": start}.items() if k in here and ok(k, v)}
    differ = [k for k in then if then[k] != here[k]]
    on = started.get("resumed_on")
    earlier = [r for r in on if isinstance(r, dict)] if isinstance(on, list) else []   # hand-edited: what can be read
    plural = lambda k, n: f"{n} {'process' if k == 'processes' else 'CPU thread'}{('es' if k == 'processes' else 's') * (n != 1)}"
    at = lambda d: ", ".join(plural(k, d[k]) if k in ("processes", "threads") else
                             f"torch {d[k]}" if k == "torch" else f"rigsa's code {d[k]}" if k == "code" else d[k]
                             for k in differ)
    said = [f"the run started on {at(then)}; this resume runs on {at(here)}"] if differ else []
    if cpu and ok("threads", saved) and cfg.threads == saved != had:
        said.append(f"{plural('threads', saved)}, as config.json says (this process had {had})")
    elif cpu and not ok("threads", start):
        said.append(f"config.json does not record the CPU threads the run started on (an older version's): "
                    f"{cfg.threads} from here on")
    if differ:
        said.append(("so its steps from here may differ from an uninterrupted run's (rigsa's code changed: its sources' "
                     "sha256; a new run with another --out keeps one version)" if "code" in differ else
                     "so its steps from here may differ in their last bits from an uninterrupted run's")
                    + " (config.json records this in resumed_on)")
    elif cpu and not ok("threads", start):
        said.append("if it started on another count, its steps from here may differ in their last bits from an "
                    "uninterrupted run's")
    elif said and earlier:
        said.append("an earlier resume ran elsewhere (config.json's resumed_on), so it cannot end bit for bit as an "
                    "uninterrupted run")
    elif said:
        said.append("so that it ends bit for bit as an uninterrupted run; --threads N for another count, at that cost")
    if said:
        util.say("note: --resume: " + "; ".join(said), file=sys.stderr)
    if differ:
        started["resumed_on"] = earlier + [here]


@contextlib.contextmanager
def own_threads():
    """The block may set torch's CPU thread count to a run's own (start); the caller's comes back after."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_data(out, folder, saved, hashes):
    """--resume: each data file the run recorded (saved: name -> sha256) is the one in `folder` now."""
    for n in sorted(set(saved) & set(hashes)):
        if saved[n] != hashes[n]:
            raise ValueError(f"--resume {out}: {folder / n} is not the file the run started on (sha256 "
                             f"{saved[n][:12]}... then, {hashes[n][:12]}... now); continue on the run's data, or "
                             f"start a new run with another --out")


def finished(out, last):
    """--resume without a resume.pt: the run's log if it is complete (its last adapter, iter{last}, is
    there: said). Else None: it stopped before its first resume checkpoint, and starts again from its
    first step, which gives the same numbers (every seed is in its config): said too."""
    if (Path(out) / f"iter{last}.safetensors").exists():
        util.say(f"{out}: the run is complete (iter{last}.safetensors is there)")
        log = Path(out) / "metrics.jsonl"
        try:
            with open(log) as f:
                records = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:   # ValueError: not JSON, not UTF-8
            raise ValueError(f"{log}: the complete run's log is not readable ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}); its adapters are whole, but its report needs the log") from None
        check_iterations(out, records, "put the run's own back (its report would be of other adapters)")
        return records
    have = sorted((q.stem for q in Path(out).glob("iter*.safetensors")), key=lambda n: (len(n), n))
    util.say(f"note: {out} has no resume checkpoint" + (f" (it holds {', '.join(have)}, but not iter{last}, the last): "
             f"the run trains again from its first step, and writes them again" if have else
             " yet; the run starts again from its first step"), file=sys.stderr)
    return None


def check_iterations(out, log, remedy):
    """The adapters a run's log says its iterations saved are the files in its folder: each iteration
    record names its file by the tensors' checksum (adapter_sha256; records from before 2026-12-05 hold
    none, and are not checked). Another run's iterK.safetensors put there, or one changed since, would
    be taken as this run's by --resume and by reproduce.py's tables, next to this run's accuracies.
    A file that is not there is left to whoever reads it (one line when it is read). remedy: what to do."""
    for r in log:
        recorded = (isinstance(r, dict) and r.get("event") == "iteration" and isinstance(r.get("iter"), int)
                    and isinstance(r.get("adapter_sha256"), str))
        if recorded and (p := Path(out) / f"iter{r['iter']}.safetensors").exists():
            try:
                sha = AF.read(p, tensors=False)[1].get("tensors_sha256")
            except ValueError as e:   # its own words end in an evaluation's remedy: this one is the run's
                raise ValueError(f"{str(e).rsplit('; ', 1)[0]}; {remedy}") from None
            if sha != r["adapter_sha256"]:
                raise ValueError(f"{p}: not the adapter this run's iteration {r['iter']} saved (its tensors' checksum "
                                 f"is not the one the run's log recorded: another run's file, or changed since); "
                                 f"{remedy}")


def check_steps(cfg, given, steps, left):
    """Flags the run's length leaves idle, and a batch the processes cannot share (steps: an iteration's
    optimizer steps; left: this run's steps to go; given: the flags the user typed)."""
    typed = flags.typed_by(cfg, given)
    for flag, idle, why in (("halt_after", cfg.halt_after >= left, f"the run has {left} steps left"),
                            ("save_every", typed("save_every") and cfg.save_every >= steps,
                             f"an iteration is {steps} steps, and its end always saves")):
        if idle:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: {why}, so it would not act; drop it")
    if cfg.batch_size < util.world()[1]:
        raise ValueError(f"--batch-size {cfg.batch_size}: fewer sequences than the {util.world()[1]} processes; "
                         f"use at least one per process")
    if cfg.steps > steps:   # it only shortens an iteration: what config.json records is not what ran, so say it
        util.say(f"note: --steps {cfg.steps}: an iteration (its epochs of the training split) is {steps} steps, "
                 f"which it trains; --steps only shortens one", file=sys.stderr)


def continue_command(out):
    """The shell line that continues the run in `out`."""
    return interrupts.command(Path(__file__).parent.parent / "rigsa.py", ["train", "--resume", "--out", out])


def checkpoint(run, it, step, save):
    """After optimizer step `step` of iteration `it`: save() (resume.pt) every --save-every steps, and
    at --halt-after or a stop signal (every rank after the same step). -> what to say if the run stops
    here, else None."""
    cfg = run.cfg
    sig = stop_signal(run.device)
    halt = (cfg.halt_after and run.done_steps >= cfg.halt_after or sig) and step < run.steps
    if halt or (cfg.save_every and step % cfg.save_every == 0 and step < run.steps):
        save()
    if halt:
        why = f"stopped by {signal.Signals(sig).name}" if sig else "halted"
        return (f"{why} after {run.done_steps} steps (iteration {it}, step {step}); continue with: "
                f"{continue_command(run.out)}")
    return None


def begin(run, started, hashes, resume=None):
    """The run directory once the data and the model have loaded and the step fits, written by rank 0
    (the ranks hold the same adapters): config.json with the run's config, the identity of the base
    it started on (and the base checks' verdicts: an --allow-other-base is recorded), its data files'
    sha256, the code (util.code_version, and the git commit), torch and machine it started on (and, as
    resumed_on, each other one a resume ran on), why the dtype is what it is (start()'s `started`), and
    where AdamW's moments lived (moments: each placement in the order used);
    metrics.jsonl holding what resume.pt holds (lines written after it are dropped). Then what is
    trained is said, and a resumed run (`resume`: resume.pt's content) takes up where it stopped."""
    cfg, out = run.cfg, Path(run.out)
    rank, ranks = util.world()
    # where AdamW's moments lived, each placement once in the order used (8-bit codes give other numbers:
    # docs/memory.md); --moments auto decides it per process, and a resume may convert them
    used = [m for m in started["moments"] if isinstance(m, str)] if isinstance(started.get("moments"), list) else []
    if resume is not None and not used and any(k.endswith("_absmax") for st in ((resume.get("optimizer") or {}).get(
            "state") or {}).values() for k in st):   # an older version's run: its resume.pt holds 8-bit codes
        used = ["8bit"]   # (device and host moments are the same numbers: only 8 bits needs telling apart)
    if resume is not None and used and used[-1] != run.moments:
        util.say(f"note: --resume: AdamW's moments were {used[-1]} until now and are {run.moments} from here (converted; "
                 f"config.json's moments records both)", file=sys.stderr)
    started["moments"] = run.placed = used + [run.moments] * (not used or used[-1] != run.moments)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        util.write_json(out / "config.json", {"config": dataclasses.asdict(cfg), "base": started.get("base") or run.base,
                                              "data": hashes, "base_check": run.checks or {},
                                              "dtype_choice": started["dtype_choice"], "code": started.get("code"),
                                              "git_commit": started.get("git_commit"),
                                              "torch": started.get("torch"), "machine": started.get("machine"),
                                              "python": sys.version.split()[0], "processes": started.get("processes"),
                                              "moments": started["moments"],
                                              **{k: started[k] for k in ("threads", "resumed_on") if k in started}})
        log = resume["log"] if resume else []
        util.atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log)))
    n_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    util.say(f"{cfg.method}: {len(run.layers) or 'LoRA on the'} adapted layers, {n_trainable:,} trainable tensor "
             f"entries" + (f"; {ranks} processes, {cfg.batch_size // ranks}-{-(-cfg.batch_size // ranks)} sequences "
                           f"each a step" if ranks > 1 else ""))
    if run.steps == cfg.warmup:   # get_lr: the warmup's last step, warmup - 1, is the one at the peak
        util.say(f"note: {run.steps} steps per iteration = warmup {cfg.warmup}: the lr reaches its peak only at the "
                 f"last step and does not decay", file=sys.stderr)
    elif run.steps < cfg.warmup:
        util.say(f"note: {run.steps} steps per iteration < warmup {cfg.warmup}: the lr never reaches its peak and "
                 f"does not decay", file=sys.stderr)
    if resume is not None:
        run.start_iter, run.start_step, run.log, run.resume = resume["iteration"], resume["step"], resume["log"], resume
        set_rng_states(resume["rng"], run.device)


def rng_states(device):
    """Every rank's random state (the dropout of --lora-dropout draws from it), in rank order: the
    CPU's, and the CUDA device's where the run computes there. Every rank calls it (a gather)."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    return util.gather([mine])


def set_rng_states(saved, device):
    """This rank's state from rng_states() (rank 0's if the run had another number of processes:
    then its draws cannot repeat anyway); a resume.pt of an earlier version holds the CPU's alone."""
    if isinstance(saved, torch.Tensor):
        return torch.set_rng_state(saved)
    rank, ranks = util.world()
    mine = saved[rank] if len(saved) == ranks else saved[0]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def save_resume(out, state):
    """resume.pt (rank 0 only: the ranks hold the same state)."""
    if util.world()[0] == 0:
        util.atomic_write(Path(out) / "resume.pt", lambda tmp: torch.save(state, tmp))

# -----------------------------------------------------------------------------
# one writer at a time

@contextlib.contextmanager
def run_lock(cfg):
    """train(): one process writes a run directory at a time (util.lock_dir, <out>/LOCK naming its
    pid). Taken before anything of the run is read or written: for --resume before resume.pt is
    read (a missing folder: resumed() says there is nothing to resume); a new run's folder is made
    here, and removed again if the run ends with nothing written into it, so a refused run leaves
    nothing. Under torchrun rank 0 holds it for every rank, and says to the others whether it could.
    An empty --out, --data-dir or --model is refused first: '' is the current directory, unasked (checked here,
    not by the fields' own checks, so that an older run that saved '' stays readable)."""
    for name, what in (("out", "a folder"), ("data_dir", "a folder"), ("model", "a hub id or a model folder")):
        if isinstance(getattr(cfg, name), str) and not getattr(cfg, name).strip():   # every rank the same
            raise ValueError(f"{flags.flag(name)}: empty; name {what}")
    out = Path(cfg.out)
    rank, ranks = util.world()
    held = contextlib.ExitStack()
    ok = [False]
    try:
        if rank == 0 and not (cfg.resume and not out.is_dir()):
            made = [p for p in (out, *out.parents) if not p.exists()]   # deepest first
            if out.exists() and not out.is_dir():
                raise FileExistsError(f"--out {out}: is a file, not a run directory; choose another --out")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(f"--out {out}: cannot create it ({e.strerror}); choose another --out") from None
            held.callback(_remove_empty, made)    # runs after the lock is released
            held.enter_context(util.lock_dir(out))
        ok = [True]
    except BaseException:
        held.close()
        raise
    finally:
        if ranks > 1:
            dist.broadcast_object_list(ok, src=0)
    if not ok[0]:
        raise RuntimeError(f"rank {rank}: rank 0 could not lock {out} (its error is above)")
    with held:
        yield


def _remove_empty(folders):
    for p in folders:   # deepest first; one that holds anything stays, and so do its parents
        try:
            p.rmdir()
        except OSError:
            return


# -----------------------------------------------------------------------------
# signals during training

STOP = []  # signals received during training (SIGINT, SIGTERM): finish the step, save, stop


def _on_signal(signum, frame):
    if STOP:  # a second one: stop at once (the last resume checkpoint stays)
        signal.signal(signum, signal.SIG_DFL)
        STOP.append(signum)
        raise KeyboardInterrupt
    STOP.append(signum)
    if interrupts.speaks():   # on torchrun every rank gets the signal; rank 0 says it
        print(f"\n{signal.Signals(signum).name}: finishing this optimizer step (or this iteration's evaluation and save), "
              f"then writing a resume checkpoint and stopping; a run in its last step or evaluation completes instead "
              f"(send it again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr)


def stop_signal(device):
    """The signal that stops training, or 0: the largest any rank received, so that on torchrun
    every rank stops after the same step (one small all-reduce a step)."""
    if util.world()[1] == 1:
        return STOP[0] if STOP else 0
    t = torch.tensor([STOP[0] if STOP else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextlib.contextmanager
def stop_on_signals():
    """During training, Ctrl-C (SIGINT) and SIGTERM (a job scheduler's) stop cleanly: the step in
    progress completes, resume.pt is written and train() returns None."""
    STOP.clear()
    try:
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

# -----------------------------------------------------------------------------
# the report

def print_summary(log):
    """The density report: one row per IMP iteration (the paper reports 3.46% after 5, §4.4)."""
    flips = {r["iter"]: r["sign_flip"] for r in log if r.get("event") == "prune"}
    pct = lambda v, p=1: "-" if v is None or v != v else f"{v:.{p}%}"
    print("\n| iteration | density | sign flips at its end | val acc | test acc |\n|---|---|---|---|---|")
    for r in log:
        if r.get("event") == "iteration":
            print(f"| {r['iter']} | {pct(r.get('density'), 2)} | {pct(flips.get(r['iter']))} | "
                  f"{pct(r.get('val_acc'))} | {pct(r.get('test_acc'))} |")
