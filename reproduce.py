"""
One command from a fresh clone to the paper's tables and figures (make paper).

    python reproduce.py                      # everything, on SmolLM2-1.7B-Instruct (days on one GPU)
    python reproduce.py --seeds 0,1,2        # each training three times: mean and 95% interval per cell
    python reproduce.py --dry-run            # the commands it would run, in order
    python reproduce.py --tables-only        # TABLES.md and the figures from what exists (make plots)
    python reproduce.py --limit 50 --steps 20 --out runs/paper-smoke   # a quick end-to-end look

It only chains the two command lines, `rigsa.py train` and `evals/run.py`, and reads what they
write, so every number in the tables can be re-made by hand with the command printed beside it.

Each output records what made it, beside it: OUT/<run>.inputs.json for a training run,
OUT/evals/<name>.inputs.json for an evaluation: the command, the base model's identity (hub commit
and a fingerprint of its weights), --limit, --steps, the seed and method flags, and the sha256 of
every data file and adapter the step reads (and an evaluation's own sha256 once done). A step whose
output exists is skipped only when its record matches what this command would do now, and an
evaluation only if its file is unchanged since; an output made from other inputs, or without a
record (by hand, or an older reproduce.py), is refused in one line naming the first difference:
choose another --out, or pass --rerun-changed to redo the changed steps (an evaluation is run
again; a training run this script recorded is deleted and trained again; one without a record is
never deleted). One reproduce.py runs an OUT's steps at a time (OUT/LOCK). So an interrupted reproduction (Ctrl-C, SIGTERM: exit 130 or 143, with the command
that continues) continues exactly where it stopped, from any working directory: a half-trained run
with `rigsa.py train --resume`. Relative paths are the caller's; the steps run in the repository.
TABLES.md's header says what made its numbers: per group of steps the base model, --limit, --steps,
the machine (torch's kernels there set the last bits) and the version of rigsa's code (its sources'
sha256) each output records, **mixed** where they differ. The code is no input: outputs of another
version (made before a git pull) are kept when their inputs match, and said in a note; but a training
whose config.json differs from this code's rigsa.Config in a setting its command does not type (an
edited default) is made from other inputs (config_drift). Before the first step, every data file the
steps read is checked (its checksum, and its format as the step reads it) and a missing one downloaded (with --offline, every missing one is named in one
line), not found hours in by the step reading it.

Seeds. The paper ran every training once and names that as its limitation (§5.2, §6). With
--seeds, each training (RIGSA, the random mask, the four QLoRA ranks) runs once per seed
(`rigsa.py train --seed S`: dW's init, the random mask, the data order) and each of its adapters
is evaluated; the base model's evaluations are deterministic and run once. The runs of rigsa.py's
default seed keep the single-seed names (OUT/rigsa, OUT/qlora-r16, ...), seed S goes in
OUT/<name>-seed<S>: an earlier single-seed reproduction stays valid, and is one seed of a later
one. The tables use the seeds of --seeds, or without it every seed whose runs are in OUT; the seeds of
one cell were made from one setting (the same flags, data and base but the seed), or the command refuses
(check_pooling): before any step, a plan whose seeds differ from OUT's others; when tabulating, an OUT
that holds such a mix.

Written to OUT/ (the interval of each cell is defined in TABLES.md's header):
  TABLES.md     Table 2   Textual MNIST 0-/5-shot accuracy, full precision and 4-bit (paper §4.2)
                Table 3   PIQA, HellaSwag, GSM8k 5-shot, full precision and 4-bit (paper §4.3)
                Figure 2  RIGSA at each IMP iteration, and the random mask of the last iteration's density (§5.1-5.2)
                Figure 3  QLoRA at ranks 1/4/8/16 on the 4-bit base (§5.3, Table 4)
                Figure 4  Textual MNIST test accuracy against trainable parameters (§5.3)
  figure2.png, figure3.png, figure4.png   the same figures drawn, with matplotlib, an optional
                extra (pip install -r requirements-plots.txt); without it only the tables
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lib import interrupts  # standard library only: before torch

if __name__ == "__main__":   # a signal while torch loads (a second or two): one line, no traceback; main() then takes over
    interrupts.early()

import model as M
import rigsa
from lib import adapter_files as AF
from lib import flags as flags_mod
from lib import mnist
from lib import rundir
from lib import util
from evals import tasks as T

REPO = Path(__file__).resolve().parent
SOURCE_TASKS = ["piqa", "hellaswag", "gsm8k"]      # paper §4.3
SRC_METRIC = {"piqa": "acc", "hellaswag": "acc", "gsm8k": "exact_match_strict"}
SHOTS = {"piqa": 0, "hellaswag": 0, "gsm8k": T.GSM8K_SHOTS}   # evals/run.py's defaults, which the steps take
QLORA_RANKS = list(rigsa.TABLE4["ranks"])           # paper Table 4
IMP_ITERS = rigsa.Config.iters                      # paper §4.4
DEFAULT_SEED = 1234   # rigsa.Config.seed's default: its runs keep the single-seed names. A number of its own, so
                      # that an edit of that default leaves OUT's folders named as they were (every step types --seed)
RUNS = ["rigsa", "random-mask"] + [f"qlora-r{r}" for r in QLORA_RANKS]


def run_name(name, seed):
    return name if seed == DEFAULT_SEED else f"{name}-seed{seed}"


def plan(a):
    """[(output file, command)] in the order they must run: the base model's evaluations, then per
    seed each training followed by the evaluations of its adapters."""
    py, out = [os.path.relpath(sys.executable, REPO)], Path(a.out)  # commands run in the repo root
    if getattr(a, "nproc", 1) > 1:   # each step data-parallel on torchrun (PyTorch's own launcher)
        py += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}"]
    common = (["--limit", str(a.limit)] if a.limit else []) + (["--data-dir", a.data_dir] if a.data_dir else []) \
        + (["--dtype", a.dtype] if getattr(a, "dtype", "") else []) \
        + ["--no-verify"] * a.no_verify + ["--offline"] * a.offline \
        + (["--revision", a.revision] if getattr(a, "revision", "") else [])
    ev = py + ["evals/run.py", "--model", a.model] + common
    tr = py + ["rigsa.py", "train", "--model", a.model] + (["--steps", str(a.steps)] if a.steps else []) + common
    steps = []
    for q in ("", "nf4"):  # Tables 2 and 3: the base model, full precision and 4-bit
        qa = ["--quantize", q] if q else []
        tag = "base" + ("-nf4" if q else "")
        for shots in (0, 5):
            f = out / "evals" / f"{tag}-mnist-{shots}shot.json"
            steps.append((f, ev + ["--task", "mnist", "--num-fewshot", str(shots), "--output", str(f)] + qa))
        for t in SOURCE_TASKS:
            f = out / "evals" / f"{tag}-{t}.json"
            steps.append((f, ev + ["--task", t, "--output", str(f)] + qa))
    for seed in a.seeds:  # Figures 2 and 3: train, then evaluate every iteration's adapter
        rig = out / run_name("rigsa", seed)  # the random mask copies this seed's last per-layer density
        runs = [("rigsa", "rigsa", ["--iters", str(IMP_ITERS)]),
                ("random-mask", "random-mask", ["--mask-like", str(rig / f"iter{IMP_ITERS}")])]
        runs += [(f"qlora-r{r}", "qlora", ["--rank", str(r)]) for r in QLORA_RANKS]
        for name, method, args in runs:   # one adapter per IMP iteration; the methods that do not prune: one
            iters, args = IMP_ITERS if rigsa.METHODS[method]["prunes"] else 1, ["--method", method] + args
            run = out / run_name(name, seed)
            steps.append((run / f"iter{iters}.safetensors", tr + ["--out", str(run), "--seed", str(seed)] + args
                          + (["--resume"] if (run / "config.json").exists() else [])))
            for k in range(1, iters + 1):
                for t in SOURCE_TASKS:
                    f = out / "evals" / f"{run.name}-iter{k}-{t}.json"
                    steps.append((f, ev + ["--task", t, "--adapter", str(run / f"iter{k}"), "--output", str(f)]))
    return steps

# -----------------------------------------------------------------------------
# what made each output: its record, and a step reused only when its inputs are the same

NOT_INPUTS = {"--out", "--output", "--resume", "--offline", "--no-verify", "--revision", "--model", "--data-dir"}
ADAPTER_FLAGS = ("--adapter", "--mask-like")  # RUN/iterK: an input by its file's content
SEEDED = ("--seed",) + ADAPTER_FLAGS   # what the seeds of one cell differ in by design: their seed, its adapters
MNIST_TEST = [n for n in mnist.MNIST_FILES if n.startswith("t10k")]


def is_training(cmd):
    return "rigsa.py" in cmd


def output_of(target, cmd):
    """A step's output: a training's run directory (target: its last adapter), an evaluation's JSON file."""
    return Path(target).parent if is_training(cmd) else Path(target)


def record_path(output):
    """OUT/<run>.inputs.json beside a run directory, OUT/evals/<name>.inputs.json beside an evaluation."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".json") + ".inputs.json")


def read_record(output):
    try:
        rec = util.read_json(record_path(output))
        return rec if isinstance(rec, dict) and isinstance(rec.get("inputs"), dict) else None
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_record(output, cmd, inputs, model, status):
    rec = {"made_by": "reproduce.py", "status": status, "model": model, "argv": cmd, "cwd": "the repository root",
           "inputs": inputs}
    if status == "done" and Path(output).is_file():   # an evaluation's JSON as it was made: reused only unchanged
        rec["sha256"] = util.file_hash(output, "sha256")
    util.atomic_write(record_path(output), lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=2) + "\n"))


def flags(cmd):
    """{--flag: value, or True for a switch} of a step's command line after its script."""
    args = cmd[next(i for i, x in enumerate(cmd) if x.endswith(".py")) + 1:]
    out = {}
    for i, x in enumerate(args):
        if x.startswith("--"):
            out[x] = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
    return out


class Inputs:
    """What a step reads, as its record holds it: the base model's identity, its flags, and the
    sha256 of the data files and adapters it reads; each file hashed once (per size and mtime)."""

    def __init__(self, a):
        self.a, self.base, self.hashes, self.older = a, None, {}, None

    def identity(self):
        if self.base is None:  # only when needed: a hub id may have to be asked for its commit
            ident = M.base_identity(M.resolve(self.a.model, self.a.revision or None, offline=self.a.offline))
            self.older = ident.pop("without_template", None)   # what records from before 2026-12-05 hold
            self.base = ident
        return self.base

    def sha(self, path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key not in self.hashes:
            self.hashes[key] = util.file_hash(path, "sha256")
        return self.hashes[key]

    def data(self, task, shots):
        """{<task>/<file>: sha256 or None} of the data files a step reads (an evaluation of `task`, or a
        training: task None)."""
        root = Path(self.a.data_dir or REPO / "data")
        if task in (None, "mnist"):  # training reads all four; an evaluation its test split, and train for shots
            folder, names = mnist.mnist_dir(root), MNIST_TEST if task and not shots else list(mnist.MNIST_FILES)
        else:
            folder, names = root / task, [f[0] for f in T.FILES[task]]
        return {f"{folder.name}/{n}": self.sha(folder / n) for n in names}

    def of(self, cmd, seeded=True):
        """The step's inputs; seeded=False: without those the seeds of one cell differ in (SEEDED), whose
        adapters are not hashed (check_pooling)."""
        f = flags(cmd)
        got = {"base model": self.identity()}
        for k, v in f.items():
            if k not in NOT_INPUTS and (seeded or k not in SEEDED):
                got[k] = self.sha(v + ".safetensors") if k in ADAPTER_FLAGS else v
        shots = f.get("--num-fewshot", "0") != "0"
        got.update(self.data(None if is_training(cmd) else f["--task"], shots))
        return got


def fetch_data(a, steps):
    """Every data file the steps read, before the first step starts, rather than by the step that
    reads it after the steps before it ran for hours: what is there is checked (its checksum, unless
    --no-verify), then what is missing is fetched (with --offline: named, all of it in one line),
    then every file is read as its step will read it (its format: stand-in data under --no-verify)."""
    root = Path(a.data_dir or REPO / "data")
    tasks = sorted({"mnist"} | {flags(cmd)["--task"] for _, cmd in steps if not is_training(cmd)})
    folders = {t: mnist.mnist_dir(root) if t == "mnist" else root / t for t in tasks}
    for d in [root, *folders.values()]:
        if d.exists() and not d.is_dir():
            raise ValueError(f"{d}: not a directory; --data-dir is a folder of <task>/ folders (mnist/, piqa/, ...)")

    def ensure(t, verify=not a.no_verify):   # the trainings read MNIST's four files, the evaluations their task's
        if t == "mnist":
            return mnist.ensure_mnist(folders[t], download=not a.offline, verify=verify)
        return T.ensure_files(t, str(root), download=not a.offline, verify=verify)
    names = {t: list(mnist.MNIST_FILES) if t == "mnist" else [f[0] for f in T.FILES[t]] for t in tasks}
    missing = [t for t in tasks if not all((folders[t] / n).exists() for n in names[t])]
    bad, failed = [], []
    for t in tasks:         # 1. the tasks whose files are all there: checked, nothing to fetch
        if t not in missing:
            try:
                ensure(t)
            except ValueError as e:
                bad.append(str(e))
    if bad:                 # before any download
        raise ValueError("; ".join(bad) + (f" (and {', '.join(missing)} files are missing)" if missing else ""))
    for t in missing:       # 2. the others: fetched, or with --offline named
        try:
            ensure(t)
        except util.MissingData as e:
            failed.append(e)
    if failed:              # every task's, in one line
        raise util.MissingData(None, [x for e in failed for x in e.failed], not a.offline,
                               (f" (or set {util.DATA_MIRROR} to a mirror holding <task>/<file>)" if failed[0].hint else "")
                               + ("; or run without --offline to download them" if a.offline else ""))
    for t in tasks:         # 3. read as the steps will read them
        if t == "mnist":   # with the trainings' own split: reproduce.py runs them at the paper's --val-frac
            d = mnist.load_mnist_splits(folders[t], ("train", "val", "test"), rigsa.Config.val_frac,
                                        verify=not a.no_verify)
            if not len(d["val"][0]) or not len(d["train"][0]):
                raise ValueError(f"{folders[t]}: its {len(d['train'][0]) + len(d['val'][0])} training images leave "
                                 f"rigsa.py train's validation split ({rigsa.Config.val_frac:.0%} of them, §4.2) empty; "
                                 f"use MNIST's own files, or more stand-in training images")
        else:
            getattr(T, f"load_{t}")(ensure(t, verify=False))   # all there now, checked above


def show(key, value, model):
    if value is None:
        return "missing" if "/" in key else "not given"
    if key == "base model":
        return f"{model} (" + ", ".join(f"{k} {v}" for k, v in value.items() if v) + ")"
    return f"sha256 {value[:12]}" if "/" in key or key in ADAPTER_FLAGS else str(value)


# a training's settings that change how it runs, not its numbers (or are checked as inputs already: the base, the dtype)
RUN_ONLY = flags_mod.resumable(rigsa.Config) | {"verify_model", "revision", "dtype"}


def untyped(saved, cmd):
    """The settings of a training's config (`saved`, as config.json holds it) that its command does not
    type and that act on its run (its method uses them, and what they need holds): {flag: value}. The
    command's own flags are inputs already (Inputs.of); these are the defaults it trained under."""
    saved = rundir.renamed(saved)
    names = {f.name for f in dataclasses.fields(rigsa.Config)}
    run = rigsa.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})
    typed = {k.lstrip("-").replace("-", "_").removeprefix("no_") for k in flags(cmd)}
    got = {}
    for f in dataclasses.fields(rigsa.Config):
        users, needs = rigsa.flag_users(f.name), f.metadata.get("needs")
        if (f.name in typed | RUN_ONLY or f.name not in saved or users and run.method not in users
                or needs and not needs[0](run)):   # typed, how it runs, or a setting that did not act on this run
            continue
        got[flags_mod.flag(f.name)] = saved[f.name]
    return got


def defaults():
    """This code's rigsa.Config, as a config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(rigsa.Config())))


def code_defaults(cmd):
    """untyped() of a training this code is about to run: rigsa.Config's defaults, its method as typed."""
    cfg = defaults()
    return untyped({**cfg, "method": flags(cmd).get("--method", cfg["method"])}, cmd)


def config_drift(out, cmd):
    """A kept training against this version of rigsa.Config, for each setting its command does not type
    (a default edited since, or another version's) and that acts on its run: the first whose value in the
    run's config.json differs, said with both; None if none (a key its config.json lacks: another
    version's run, noted as that)."""
    try:
        saved = untyped(util.read_json(out / "config.json")["config"], cmd)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None   # unreadable: the training step says so when it resumes
    now = {flags_mod.flag(k): v for k, v in defaults().items()}
    for flag, v in saved.items():
        if v != now[flag]:
            return f"{flag} (not typed by this command): {v!r} in its config.json, {now[flag]!r} in this code's rigsa.Config"
    return None


def hub_moved(then, now):
    """Whether two base identities of one model id are two hub commits: the hub's latest moved on between
    them (a README edit moves it too), and --revision takes the earlier one back."""
    return isinstance(then, dict) and isinstance(now, dict) and bool(then.get("commit")) and \
        bool(now.get("commit")) and then["commit"] != now["commit"]


def difference(rec, now, model, older=None):
    """The first input that differs between a record and now, said with both values (and, for another
    hub commit of the same model id, the --revision that takes the record's); None if none. older: the
    base's fingerprint without chat_template.jinja, which a record made before that file was covered
    holds: the same base at one hub commit (adapter_files.same_base)."""
    old = rec["inputs"]
    for k in list(now) + [k for k in old if k not in now]:
        a, b = old.get(k), now.get(k)
        if k == "base model" and isinstance(a, dict) and isinstance(b, dict) and a.get("commit") == b.get("commit") \
                and AF.same_base(a, {**b, "without_template": older}):
            continue
        if a != b:
            moved = k == "base model" and rec.get("model") == model and hub_moved(a, b)
            return f"{k}: {show(k, old.get(k), rec.get('model'))} then, {show(k, now.get(k), model)} now" \
                + (f"; --revision {a['commit']} takes the commit they were made from" if moved else "")
    return None

# -----------------------------------------------------------------------------
# 95% intervals: a t interval over seeds, or one run's stderr


Z95 = 1.959964  # the normal distribution's 0.975 quantile
T95 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,   # df 1..9
       2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,   # df 10..18
       2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,   # df 19..27
       2.048407, 2.045230, 2.042272]   # df 28..30; to 6 decimals, so that a half-width's last printed digit is exact


def seed_of(output):
    """(its seed, its cell) of a run folder or an evaluation's file: rigsa-seed0-iter1-piqa.json is seed 0's
    output of the cell rigsa-iter1-piqa, rigsa-iter1-piqa.json the default seed's; the base model's
    evaluations are no seed's (None)."""
    output = Path(output)
    name = output.stem if output.suffix == ".json" else output.name
    base, sep, rest = name.partition("-seed")
    num, _, tail = rest.lstrip("-").partition("-")
    if sep and base in RUNS and num.isdigit():
        return (-1 if rest.startswith("-") else 1) * int(num), base + ("-" + tail if tail else "")
    return (DEFAULT_SEED if name.split("-iter")[0] in RUNS else None), name


def pool_difference(a, b):
    """The first input two seeds' outputs of one cell differ in, their seed and its adapters aside:
    (key, a's value, b's value), or None. One base is one hub commit (its bytes, whichever fingerprint
    format a record holds: before chat_template.jinja counted, or after), or, for a local folder, one
    fingerprint; another commit is another base, as for a step's own output (difference: the
    fingerprint samples the weights, a commit pins them)."""
    for k in dict.fromkeys([*a, *b]):
        x, y = a.get(k), b.get(k)
        if k == "--dtype":   # not typed is each step's own default, auto
            x, y = x or "auto", y or "auto"
        if k.endswith(" (not typed)") and (k not in a or k not in b):   # a config.json that lacks it: unknown
            continue
        if k in SEEDED or x == y or k == "base model" and isinstance(x, dict) and isinstance(y, dict) and (
                x.get("commit") and x.get("commit") == y.get("commit")
                or not x.get("commit") and not y.get("commit") and x.get("fingerprint") == y.get("fingerprint")):
            continue
        return k, x, y
    return None


def check_pooling(out, seeds=None, planned=(), model=None):
    """Every cell of the tables pools seeds made from one setting: a run or evaluation of one seed made
    with other flags, data or base than another's of the same cell (a --seeds added later with another
    --steps or --limit) is refused in one line, not averaged into one interval. seeds: those tabulated
    (None: all); planned: [(seed, cell, inputs, or a function that gives them)] of the steps this command
    is about to run, checked against OUT's outputs of the other seeds before any runs: only in a cell that
    holds one (one command's seeds share their setting), so that a fresh OUT's --dry-run asks for no base
    (its inputs' identity: a download of the 1.7B model, or a refusal offline)."""
    out = Path(out)
    kept = [p.parent for p in out.glob("*/config.json")] + \
        [p for p in (out / "evals").glob("*.json") if not p.name.endswith(".inputs.json")]
    ours, entries = {s for s, _, _ in planned}, []
    for p in sorted(kept):   # the other seeds' outputs (this command's own are its steps' to keep or redo)
        seed, cell = seed_of(p)
        rec = read_record(p)
        if seed is not None and seed not in ours and (seeds is None or seed in seeds) and rec is not None:
            try:   # a training's untyped settings too, as its config.json holds them (an edited default)
                extra = untyped(util.read_json(p / "config.json")["config"], rec["argv"]) if p.is_dir() else {}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                extra = {}
            entries.append((seed, cell, {**rec["inputs"], **{f"{k} (not typed)": v for k, v in extra.items()}},
                            "was made", rec.get("model")))
    made = {c for _, c, _, _, _ in entries}
    entries += [(s, c, i() if callable(i) else i, "is to be made", model) for s, c, i in planned if c in made]
    seen = {}
    for s, c, i, how, m in entries:
        first = seen.setdefault(c, (s, i, how, m))
        if (d := pool_difference(first[1], i)) is not None:
            k, x, y = d
            moved = k == "base model" and how != first[2] and first[3] == m and hub_moved(x, y)
            raise ValueError(f"{out}: TABLES.md's cell {c} would pool two settings: seed {first[0]}'s output "
                             f"{first[2]} with {k} {show(k, x, first[3])}, seed {s}'s {how} with {show(k, y, m)}; "
                             + (f"--revision {x['commit']} makes it from the commit the other was made from, or "
                                if moved else "")
                             + "reproduce each setting into its own --out (move the other's runs and evaluations "
                             "away), or tabulate one of them with --tables-only --seeds")


def t95(df):
    """Student's t 0.975 quantile (no scipy): the table to df 30, then the Cornish-Fisher
    expansion around the normal quantile, within 1e-4 from df 30 on."""
    if df <= len(T95):
        return T95[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) \
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)


def interval(samples):
    """[(value, stderr or None)], one per seed, missing ones left out -> (mean, half-width of the 95%
    interval or None, n), or None when there is none. n >= 2: mean +- t95(n-1) * s / sqrt(n), s the
    sample standard deviation; n = 1: the value +- 1.96 * its stderr (a test set's sampling only)."""
    if not samples:
        return None
    n = len(samples)
    if n == 1:
        x, se = samples[0]
        return x, None if se is None else Z95 * se, 1
    m = sum(x for x, _ in samples) / n
    s = math.sqrt(sum((x - m) ** 2 for x, _ in samples) / (n - 1))
    return m, t95(n - 1) * s / math.sqrt(n), n


def binomial_stderr(p, n):
    """The stderr of an accuracy p over n 0/1 scores, as evals/ and lm-eval compute it (sample
    standard deviation / sqrt(n)) for the test accuracy that training logs without its scores."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n is not None and n >= 2 else None

# -----------------------------------------------------------------------------
# reading what the steps wrote


def read(path, key, slot=None):
    """(value, stderr or None) of one metric in an evals JSON file; None if there is no such file, or it
    has no such metric. A file that is not an evaluation's results (cut, edited, a value not finite), one
    of another evaluation than its name says (slot: {field: value} its task, shots, quantization and
    adapter RUN/iterK; a field an older file lacks is not checked), or one changed since its step made it
    (its record's sha256) is a ValueError naming it: --tables-only reads OUT as it finds it."""
    fix = "delete it, and run reproduce.py again to make it"
    try:
        d = util.read_json(Path(path))
        m = d["metrics"]
        if not isinstance(m, dict):
            raise TypeError(f"its metrics are a {type(m).__name__}")
        if key not in m:
            return None
        v, se = m[key], m.get(key + "_stderr")
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as e:   # ValueError: not JSON, not UTF-8; TypeError: not an object
        raise ValueError(f"{path}: not evals/run.py's results ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
                         f"{fix}") from None
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)   # noqa: E731
    if not num(v) or not (se is None or num(se)):
        raise ValueError(f"{path}: its {key} is {v!r}" + (f" ± {se!r}" if num(v) else "") + f", not a finite number; {fix}")
    for field, want in (slot or {}).items():
        have = d.get(field, want)
        have = "/".join(Path(have).parts[-2:]) if field == "adapter" and isinstance(have, str) else have
        if have != want:
            raise ValueError(f"{path}: holds the results of {field} {have!r}, where its name says {want!r} (another "
                             f"evaluation's file put here); {fix}")
    rec = read_record(path)
    if rec and rec.get("sha256") not in (None, util.file_hash(path, "sha256")):
        raise ValueError(f"{path}: changed after its step made it (its record's sha256 differs: edited, replaced or "
                         f"cut); {fix}")
    return v, se


def run_metrics(run):
    """Per-iteration test accuracy, density and trainable count from a run's metrics.jsonl."""
    rows = {}
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        return rows
    lines = p.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except ValueError:
            if i == len(lines):   # a last line cut by a kill mid-write: the run's --resume drops it too
                break
            r = None
        if not isinstance(r, dict) or r.get("event") == "iteration" and not isinstance(r.get("iter"), int):
            raise ValueError(f"{p}: line {i} is not a metrics record of rigsa.py train; the run's log is damaged: "
                             f"train it again (--rerun-changed after moving it), or mend the line")
        if r.get("event") == "iteration":
            rows[r["iter"]] = r
    # its accuracies sit next to its iterK files' evaluations in the tables: the files must be its own
    rundir.check_iterations(run, rows.values(), "put the run's own back, or move the run away and run reproduce.py "
                                                "again to train it again")
    return rows


def test_images(run, m=None):
    """How many images a run's test_acc is over: as its iteration record `m` says (test_images), or in a
    run from before it was recorded, its --limit capped by the test split's size in its data root's IDX
    header, read again now (a relative --data-dir taken from the repository, where reproduce.py runs its
    steps) if it is the file the run recorded (config.json's data sha256); None if unreadable or another
    file: no interval, rather than one for another N."""
    if isinstance((m or {}).get("test_images"), int) and not isinstance(m["test_images"], bool):
        return m["test_images"]
    try:
        raw = util.read_json(Path(run) / "config.json")
        cfg, data = raw["config"], raw.get("data") or {}
    except (FileNotFoundError, KeyError, TypeError, ValueError, AttributeError):   # not JSON, not an object
        cfg, data = {}, {}
    cfg = cfg if isinstance(cfg, dict) else {}
    name = "t10k-labels-idx1-ubyte.gz"
    try:
        labels = Path(mnist.mnist_dir(REPO / cfg.get("data_dir", "data"))) / name
        if isinstance(data, dict) and data.get(name) not in (None, util.file_hash(labels, "sha256")):
            return None   # its folder holds other test digits now (stand-ins then, MNIST's own now, or back)
        n = len(mnist.read_idx(labels, 2049))
    except (OSError, ValueError, TypeError):
        return None
    limit = cfg.get("limit", cfg.get("eval_max", 0))  # eval_max: runs from before the flag's rename
    return min(limit, n) if isinstance(limit, int) and limit > 0 else n


def seeds_found(out, default=(DEFAULT_SEED,)):
    """The seeds whose runs are in OUT (none: `default`)."""
    found = set()
    for p in Path(out).glob("*/config.json"):
        base, _, s = p.parent.name.rpartition("-seed")
        if p.parent.name in RUNS:
            found.add(DEFAULT_SEED)
        elif base in RUNS and s.lstrip("-").isdigit():
            found.add(int(s))
    return sorted(found) or list(default)


def check_outputs(out, seeds):
    """--tables-only: OUT holds an output of reproduce.py's, and a run of each of --seeds where it holds
    runs (before any, the base model's rows alone are a fair look), not a table of dashes."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"--out {out}: no such folder, so nothing to tabulate; run reproduce.py first, or fix the path")
    found = seeds_found(out, default=())
    if not found and not [p for p in (out / "evals").glob("*.json") if not p.name.endswith(".inputs.json")]:
        raise ValueError(f"--out {out}: holds no output of reproduce.py (no evals/*.json, no run folder such as "
                         f"rigsa/), so nothing to tabulate; run reproduce.py first, or fix the path")
    if found and (missing := [str(s) for s in seeds or () if s not in found]):
        raise ValueError(f"--seeds: {out} holds no run of seed {', '.join(missing)} (its runs are of seed "
                         f"{', '.join(map(str, found))}); name those, or leave --seeds out for all of them")


def results(out, seeds):
    """Every cell of the tables and figures. base: {(tag, column): interval}, tag base or base-nf4,
    column mnist-0shot, mnist-5shot or a source task; rows: one per adapter (RIGSA iteration,
    random mask, QLoRA rank) with its intervals over seeds and its mean density and trainable count."""
    out, ev = Path(out), Path(out) / "evals"
    base = {}
    for tag in ("base", "base-nf4"):
        for col in ["mnist-0shot", "mnist-5shot"] + SOURCE_TASKS:
            task, _, shots = col.partition("-")   # mnist-0shot: Textual MNIST, 0 shots
            r = read(ev / f"{tag}-{col}.json", SRC_METRIC.get(col, "acc"),
                     {"task": task, "quantize": "nf4" if tag == "base-nf4" else None, "adapter": None,
                      "num_fewshot": int(shots[0]) if shots else SHOTS[task]})
            base[tag, col] = interval([r] if r else [])
    rows = [("rigsa", k, f"RIGSA iteration {k}") for k in range(1, IMP_ITERS + 1)] + [("random-mask", 1, "Random mask")]
    rows += [(f"qlora-r{r}", 1, f"QLoRA rank {r}") for r in QLORA_RANKS]
    R = {"seeds": list(seeds), "base": base, "rows": [], "made_by": made_by(out)}
    for name, k, label in rows:
        per = {c: [] for c in ["mnist", "density", "trainable"] + SOURCE_TASKS}
        for seed in seeds:
            run = out / run_name(name, seed)
            m = run_metrics(run).get(k, {})
            if m.get("test_acc") is not None:
                per["mnist"].append((m["test_acc"], binomial_stderr(m["test_acc"], test_images(run, m))))
            for c in ("density", "trainable"):
                if m.get(c) is not None:
                    per[c].append(m[c])
            for t in SOURCE_TASKS:
                r = read(ev / f"{run.name}-iter{k}-{t}.json", SRC_METRIC[t],
                         {"task": t, "num_fewshot": SHOTS[t], "adapter": f"{run.name}/iter{k}"})
                if r:
                    per[t].append(r)
        row = {"name": name, "k": k, "label": label, "rank": int(name[7:]) if name.startswith("qlora") else None}
        row.update({c: interval(per[c]) for c in ["mnist"] + SOURCE_TASKS})
        row.update({c: sum(per[c]) / len(per[c]) if per[c] else None for c in ("density", "trainable")})
        R["rows"].append(row)
    return R

# -----------------------------------------------------------------------------
# TABLES.md


def recorded(path, key="machine"):
    """The machine an output was made on (its torch kernels set the last bits), or with key "code" the
    version of rigsa's code (util.code_version), as recorded: a run's config.json (and each other one a
    resume ran on), an evaluation's JSON; None for an older version's."""
    try:
        d = util.read_json(Path(path))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get(key), str) or not d[key]:   # unrecorded
        return None
    on = [r.get(key) for r in d.get("resumed_on") if isinstance(r, dict)] if isinstance(d.get("resumed_on"), list) else []
    return " and ".join(dict.fromkeys(m for m in [d[key], *on] if isinstance(m, str) and m))


def dtype_of(path):
    """The dtype an output computed in, as recorded (--dtype auto resolved: bfloat16 on a GPU, float32 on
    a CPU without native bfloat16): a run's config.json's config, an evaluation's JSON; None if unrecorded.
    A run an older version saved as "auto" ran bfloat16 on CUDA, float32 on the CPU (rundir.run_dtype)."""
    try:
        d = util.read_json(Path(path))
    except (OSError, ValueError):
        return None
    run = d.get("config") if isinstance(d, dict) and path.name == "config.json" else d
    dtype = run.get("dtype") if isinstance(run, dict) else None
    if dtype == "auto":
        dtype = {"cuda": "bfloat16", "cpu": "float32"}.get(str(d.get("machine")).split(":")[0])
    return dtype if isinstance(dtype, str) and dtype else None


def made_by(out):
    """TABLES.md's lines naming what made its numbers, from the outputs' records: per group of steps
    the base model, its identity, --limit and --steps, the dtype, the machine, the code (util.code_version),
    and the outputs that have no record."""
    out = Path(out)
    outputs = [("base-model evaluations" if p.name.startswith("base-") else "adapter evaluations", p)
               for p in sorted((out / "evals").glob("*.json")) if not p.name.endswith(".inputs.json")]
    outputs += [("trainings", p.parent) for p in sorted(out.glob("*/config.json"))]
    groups, unrecorded = {}, []
    for group, p in outputs:
        rec = read_record(p)
        if rec is None:
            unrecorded.append(os.path.relpath(p, out))
            continue
        i = rec["inputs"]
        what = show("base model", i.get("base model"), f"`{rec.get('model')}`") \
            + (f", --limit {i['--limit']}" if "--limit" in i else ", no --limit (all)") \
            + ((f", --steps {i['--steps']}" if "--steps" in i else ", no --steps (the paper's epochs)")
               if group == "trainings" else "") \
            + (f", in {d}" if (d := dtype_of(p / "config.json" if group == "trainings" else p)) else "") \
            + (f", on {m}" if (m := recorded(p / "config.json" if group == "trainings" else p)) else "") \
            + (f", rigsa's code {c}" if (c := recorded(p / "config.json" if group == "trainings" else p, "code")) else "")
        groups.setdefault(group, {}).setdefault(what, 0)
        groups[group][what] += 1
    L = ["Made by (each output's record, `<output>.inputs.json`):"] if groups or unrecorded else []
    for group in ("base-model evaluations", "trainings", "adapter evaluations"):
        made = groups.get(group, {})
        if len(made) == 1:
            L.append(f"- {group}: {next(iter(made))}")
        elif made:  # reproduce.py never mixes them in one OUT; hand-assembled files can
            L.append(f"- {group}: **mixed**: " + "; ".join(f"{n} from {w}" for w, n in made.items()))
    if unrecorded:
        L.append(f"- without a record (by hand, or an older reproduce.py): {', '.join(unrecorded)}")
    return L + [""] * bool(L)


def header(seeds):
    n = len(seeds)
    s = ", ".join(map(str, seeds))
    adapters = [f"- Adapter rows: **n = {n} seeds** ({s}), a t interval over seeds: mean ± t(0.975, n - 1) · s / √n,",
                "  s the sample standard deviation (divisor n - 1) of the per-seed values; Student's t quantile for",
                f"  df = {n - 1} is {t95(n - 1):.4f}. It measures training randomness on a fixed test set. A cell with",
                "  fewer seeds says (n=k); with n=1 its interval is the stderr one below."] if n >= 2 else \
        [f"- Adapter rows: **one seed** ({s}), value ± 1.96 · stderr, as the base-model rows."]
    return ["Values in %, each the mean ± the half-width of its 95% interval. PIQA and HellaSwag: `acc` (lm-eval's);",
            "GSM8k: strict-match exact match (flexible-extract in the evals JSON files). Each number comes from",
            "`evals/base[-nf4]-<task>.json` or `evals/<run>-iter<k>-<task>.json` (run: `rigsa`, `qlora-r4-seed0`, ...);",
            "an adapter's Textual MNIST test accuracy from `<run>/metrics.jsonl` (§5.1: the training run's, before pruning).", "",
            "95% intervals:"] + adapters + [
            "- Base-model rows (one deterministic evaluation): value ± 1.96 · stderr, stderr the evals JSON file's",
            "  `<metric>_stderr` as lm-eval computes it, √(Σ(xᵢ - x̄)² / (N - 1)) / √N over the N per-document scores.",
            "  For a run's Textual MNIST accuracy p over N test images (no per-image file) that is √(p(1 - p) / (N - 1)).",
            "  It measures the test set's sampling only (and is 0 wide at 0% or 100%); a cell without a stderr",
            "  (N < 2) shows the value alone.", ""]


def fmt(c, n_seeds=1):
    if c is None:
        return "-"
    m, h, n = c
    return f"{100 * m:.2f}" + ("" if h is None else f" ± {100 * h:.2f}") + (f" (n={n})" if n < n_seeds else "")


def render(R, images=()):
    B, S, n = R["base"], SOURCE_TASKS, len(R["seeds"])
    picture = {f: ["", f"![Figure {f[6]}]({f})"] for f in images}  # figureN.png, drawn in this call
    L = [TITLE, ""] + R.get("made_by", []) + header(R["seeds"]) + [
         "## Table 2: Textual MNIST test accuracy of the base model (paper §4.2)", "",
         "| Variant | 0-shot | 5-shot |", "|---|---:|---:|"]
    for tag, name in (("base", "Full Precision"), ("base-nf4", "Quantized (4-bit)")):
        L.append(f"| {name} | {fmt(B[tag, 'mnist-0shot'])} | {fmt(B[tag, 'mnist-5shot'])} |")
    L += ["", "## Table 3: source tasks of the base model (paper §4.3)", "",
          "| Benchmark | Full Precision | Quantized (4-bit) |", "|---|---:|---:|"]
    for t, name in zip(S, ["PIQA", "HellaSwag", "GSM8k (5-shot)"]):
        L.append(f"| {name} | {fmt(B['base', t])} | {fmt(B['base-nf4', t])} |")
    L += ["", "## Figure 2: RIGSA at each IMP iteration, and the random mask (paper §5.1-5.2)", "",
          "| Adapter | density | Textual MNIST | PIQA | HellaSwag | GSM8k |", "|---|---:|---:|---:|---:|---:|"]
    L.append(f"| baseline | - | {fmt(B['base', 'mnist-0shot'])} | " + " | ".join(fmt(B["base", t]) for t in S) + " |")
    for r in R["rows"]:
        if r["rank"] is None:
            d = "-" if r["density"] is None else f"{100 * r['density']:.2f}%"
            L.append(f"| {r['label']} | {d} | {fmt(r['mnist'], n)} | " + " | ".join(fmt(r[t], n) for t in S) + " |")
    L += picture.get("figure2.png", [])
    L += ["", "## Figure 3: QLoRA on the 4-bit base (paper §5.3, Table 4)", "",
          "| Rank | Textual MNIST | PIQA | HellaSwag | GSM8k |", "|---:|---:|---:|---:|---:|"]
    L.append(f"| 4-bit baseline | {fmt(B['base-nf4', 'mnist-0shot'])} | " + " | ".join(fmt(B["base-nf4", t]) for t in S) + " |")
    for r in R["rows"]:
        if r["rank"] is not None:
            L.append(f"| {r['rank']} | {fmt(r['mnist'], n)} | " + " | ".join(fmt(r[t], n) for t in S) + " |")
    L += picture.get("figure3.png", [])
    L += ["", "## Figure 4: Textual MNIST test accuracy against trainable parameters (paper §5.3)", "",
          "| Adapter | trainable parameters" + (" (mean over seeds)" if n > 1 else "") + " | test accuracy |",
          "|---|---:|---:|"]
    count = lambda x: "-" if x is None else f"{round(x):,}"  # noqa: E731
    L += [f"| {r['label']} | {count(r['trainable'])} | {fmt(r['mnist'], n)} |" for r in R["rows"]]
    L += picture.get("figure4.png", [])
    return "\n".join(L) + "\n"

# -----------------------------------------------------------------------------
# Figures 2-4 as PNGs (matplotlib is optional: requirements-plots.txt)


PANELS = [("mnist", "a. Textual MNIST (target task; baseline 0-shot)", "test accuracy (%)"),  # the paper's order
          ("gsm8k", "b. GSM8k 5-shot", "exact match, strict (%)"),
          ("hellaswag", "c. HellaSwag 0-shot", "accuracy (%)"), ("piqa", "d. PIQA 0-shot", "accuracy (%)")]


def _series(ax, xs, cells, n_seeds=1, **kw):
    """Means with their 95% intervals as error bars, points without a value left out -> the points. A
    point of fewer seeds than the figure's n (a seed stopped early) says n=k beside it, as its table cell
    does (with one, its bar is ± 1.96 stderr, not a t interval), and the caption says so (ax.fewer)."""
    pts = [(x, 100 * c[0], 0 if c[1] is None else 100 * c[1]) for x, c in zip(xs, cells) if c is not None]
    if pts:
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, **kw)
        if any(y - e < 0 or y + e > 100 for _, y, e in pts):   # _panel keeps the axis within 0-100%: said
            ax.clipped = True
    for x, c in zip(xs, cells):
        if c is not None and c[2] < n_seeds:
            ax.annotate(f"n={c[2]}", (x, 100 * c[0]), xytext=(4, -10), textcoords="offset points", fontsize=7,
                        color=kw.get("color"))
            ax.fewer = True
    return pts


def _level(ax, c, label, pts, **kw):
    """A horizontal reference (the base model, the random mask) with its interval as a band -> "",
    or, where it would squash the adapters' differences (Textual MNIST: the base model is near
    chance, the adapters near 100%), a note for the panel's title instead."""
    if c is None:
        return ""
    y, h = 100 * c[0], 0 if c[1] is None else 100 * c[1]
    lo, hi = ax.get_ylim()
    span = max(hi - lo, 1)  # _panel's smallest axis
    if pts and not lo - 2 * span <= y <= hi + 2 * span:
        return f"{label}: {y:.1f}%, {'below' if y < lo else 'above'} the axis"
    ax.axhline(y, label=label, **kw)
    if h:
        ax.axhspan(y - h, y + h, alpha=0.12, color=kw.get("color"), lw=0)
    return ""


def _panel(ax, title, ylabel, xlabel, notes=()):
    if not ax.lines:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_yticks([])
    else:  # an accuracy axis stays within 0-100% (a normal-approximation interval may not) and spans >= 1 point
        lo, hi = ax.get_ylim()
        mid, half = (lo + hi) / 2, max((hi - lo) / 2, 0.5)
        lo, hi = max(mid - half, 0), min(mid + half, 100)
        ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))  # a margin: points at 0% stay visible
    ax.set_title(title + "".join(f"\n{n}" for n in notes if n), fontsize=10)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)


def _save(fig, axes, out, name, title, seeds):
    axes = list(axes)
    s = ", ".join(map(str, seeds))
    how = (f"n = {len(seeds)} seeds ({s}): means, error bars the 95% t interval over seeds" if len(seeds) > 1
           else f"one seed ({s}): error bars the 95% interval ± 1.96 stderr")
    bands = "; shaded: the horizontal lines' 95% intervals" if any(ax.patches for ax in axes) else ""
    if any(getattr(ax, "fewer", False) for ax in axes):   # as TABLES.md's (n=k) cells
        bands += "; n=k: a point of k seeds (k = 1: ± 1.96 stderr)"
    if any(getattr(ax, "clipped", False) for ax in axes):   # TABLES.md has the whole interval
        bands += "; bars cut at 0% or 100% (TABLES.md: whole)"
    # the caption wrapped to the figure's width (10 pt: ~12 characters an inch): never clipped at the PNG's edges
    fig.suptitle("\n".join([title, *textwrap.wrap(how + bands, int(fig.get_figwidth() * 12))]), fontsize=10)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    handles = dict(sorted(handles.items(), key=lambda lh: not hasattr(lh[1], "has_yerr")))  # the series first
    if handles:  # one legend for all panels, under them
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    util.atomic_write(Path(out) / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png",   # no half PNG
                                                                metadata={"Source": MARK}))
    return name


def figures(out, R):
    """figure2.png, figure3.png, figure4.png next to TABLES.md -> their names; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
    except ImportError:
        print("plots: matplotlib is not installed; `pip install -r requirements-plots.txt` draws Figures 2-4 "
              "as PNGs next to TABLES.md", file=sys.stderr)
        return []
    B, rows, seeds = R["base"], R["rows"], R["seeds"]
    rig = [r for r in rows if r["name"] == "rigsa"]
    mask = next(r for r in rows if r["name"] == "random-mask")
    ql = [r for r in rows if r["rank"] is not None]
    base = lambda tag, c: B[tag, "mnist-0shot" if c == "mnist" else c]  # noqa: E731  (Table 2: 0-shot)
    grid = dict(nrows=2, ncols=2, figsize=(10, 8), layout="constrained")
    written = []

    # Figure 2 (§5.1-5.2): RIGSA against the IMP iteration; the random mask and the base model as levels
    fig, axes = plt.subplots(**grid)
    for ax, (c, title, ylabel) in zip(axes.flat, PANELS):
        pts = _series(ax, [r["k"] for r in rig], [r[c] for r in rig], len(seeds), label="RIGSA", color="C0")
        notes = [_level(ax, mask[c], f"Random mask (iteration {IMP_ITERS}'s density)", pts, color="C1", ls="--"),
                 _level(ax, base("base", c), "Baseline (base model)", pts, color="0.4")]
        ax.set_xticks([r["k"] for r in rig], [f"{r['k']}\n" + ("" if r["density"] is None else f"{100 * r['density']:.3g}%")
                                               for r in rig])
        _panel(ax, title, ylabel, "IMP iteration (density)", notes)
    written.append(_save(fig, axes.flat, out, "figure2.png",
                         "Figure 2: RIGSA at each IMP iteration, a random mask and the base model", seeds))

    # Figure 3 (§5.3): QLoRA against the rank, on a log-2 axis; the 4-bit base model as a level
    fig, axes = plt.subplots(**grid)
    for ax, (c, title, ylabel) in zip(axes.flat, PANELS):
        pts = _series(ax, [r["rank"] for r in ql], [r[c] for r in ql], len(seeds), label="QLoRA", color="C2")
        note = _level(ax, base("base-nf4", c), "4-bit baseline (NF4 base model)", pts, color="0.4")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(QLORA_RANKS))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(QLORA_RANKS[0] / 1.4, QLORA_RANKS[-1] * 1.4)
        _panel(ax, title, ylabel, "QLoRA rank", [note])
    written.append(_save(fig, axes.flat, out, "figure3.png",
                         "Figure 3: QLoRA at each rank on the 4-bit base, and the 4-bit base model", seeds))

    # Figure 4 (§5.3): Textual MNIST against trainable parameters, log scale (they span decades)
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    pts = []
    for sel, label, color, tag, dx in ((rig, "RIGSA (IMP iterations)", "C0", lambda r: f"it {r['k']}", 5),
                                       ([mask], "Random mask", "C1", lambda r: "mask", -5),  # left: it 5 is right
                                       (ql, "QLoRA (ranks, 4-bit base)", "C2", lambda r: f"r {r['rank']}", 5)):
        sel = [r for r in sel if r["trainable"] and r["mnist"]]
        pts += _series(ax, [r["trainable"] for r in sel], [r["mnist"] for r in sel], len(seeds), label=label,
                       color=color)
        for r in sel:
            ax.annotate(tag(r), (r["trainable"], 100 * r["mnist"][0]), textcoords="offset points", xytext=(dx, 4),
                        ha="left" if dx > 0 else "right", fontsize=8, color=color, bbox=dict(fc="white", ec="none", alpha=0.8, pad=0.5))
    ax.set_xscale("log")
    note = _level(ax, B["base", "mnist-0shot"], "Baseline (base model, 0-shot)", pts, color="0.4")
    _panel(ax, "", "Textual MNIST test accuracy (%)", "trainable parameters (log scale)", [note])
    ax.grid(alpha=0.12, which="minor")
    written.append(_save(fig, [ax], out, "figure4.png",
                         "Figure 4: Textual MNIST test accuracy against trainable parameters", seeds))
    plt.close("all")
    return written


MARK = "rigsa reproduce.py"   # in the figures' PNG metadata: they are this script's to replace
TITLE = "# The paper's tables, reproduced"
FIGURES = ("figure2.png", "figure3.png", "figure4.png")


def ours(p):
    """Whether OUT's TABLES.md or figureN.png is this script's to replace: absent, TABLES.md with its
    title, a PNG carrying MARK (or, from an older version, beside our TABLES.md)."""
    p = Path(p)
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if p.name == "TABLES.md":
        return head.startswith(TITLE.encode())
    return MARK.encode() in head or (p.parent / "TABLES.md").is_file() and ours(p.parent / "TABLES.md")


def check_tables(out):
    """OUT's TABLES.md and figures are this script's to replace (ours), else a ValueError naming one."""
    if theirs := [n for n in ("TABLES.md", *FIGURES) if not ours(Path(out) / n)]:
        raise ValueError(f"{Path(out) / theirs[0]}: exists and was not written by reproduce.py, so it is not replaced; "
                         f"move it, or choose another --out")


def tables(out, seeds=None):
    """Write OUT/TABLES.md and the figures from what exists; seeds: those of --seeds, default every
    seed whose runs are in OUT. A TABLES.md or figure there that is not ours is refused, not replaced;
    figures that cannot be drawn (no matplotlib) are removed, not left to show other numbers.
    -> TABLES.md's text."""
    out = Path(out)
    check_tables(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds or seeds_found(out)
    check_pooling(out, seeds)   # a cell's seeds of two settings (a hand-assembled OUT, or an older reproduce.py's)
    R = results(out, seeds)
    drawn = figures(out, R)
    if stale := [n for n in FIGURES if n not in drawn and (out / n).exists()]:   # drawn from earlier numbers
        for n in stale:
            (out / n).unlink()
        print(f"plots: removed {', '.join(stale)}: drawn earlier, and not drawn again from these numbers "
              f"(no matplotlib here), so they could show others", file=sys.stderr)
    text = render(R, drawn)
    util.atomic_write(out / "TABLES.md", lambda tmp: Path(tmp).write_text(text))
    return text


def parse_seeds(s):
    try:
        seeds = [int(x) for x in s.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {s}: expected integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {s}: a seed appears twice")
    bad = [x for x in seeds if not 0 <= x <= rigsa.SEED_MAX]   # rigsa.py train's range: said now, not after hours
    if bad:
        raise ValueError(f"--seeds {s}: {bad[0]} is outside rigsa.py train's --seed range, 0 to {rigsa.SEED_MAX}")
    return seeds

# -----------------------------------------------------------------------------
# running the steps: each reused only when its record matches; Ctrl-C and SIGTERM stop cleanly


class Stopped(BaseException):
    """A SIGINT or SIGTERM outside a step (a BaseException, as KeyboardInterrupt: nothing catches it on the way)."""


SIG = {"proc": None, "sig": None, "defer": False}
AT = {"step": 0, "total": 0, "done": 0, "output": None, "train": False}  # where reproduce.py stands, for its last line


def from_terminal():
    """Whether a SIGINT is the terminal's Ctrl-C, which the running step (same process group) has
    had too: a second one would stop a training at once instead of after its optimizer step."""
    for f in (sys.stdin, sys.stderr, sys.stdout):
        try:
            if f.isatty():
                return os.tcgetpgrp(f.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):
            pass
    return False


def on_signal(signum, frame):
    SIG["sig"] = signum
    proc = SIG["proc"]
    if proc is not None:  # the step stops as it does on its own (a training after its step), and is waited for
        if signum != signal.SIGINT or not from_terminal():
            proc.send_signal(signum)
    elif not SIG["defer"]:
        raise Stopped()


def run_step(cmd, env):
    """One step in the repository root -> its exit code, a SIGINT or SIGTERM meanwhile passed on to it."""
    SIG["defer"] = True
    try:
        SIG["proc"] = subprocess.Popen(cmd, cwd=REPO, env=env)
    finally:
        SIG["defer"] = False
    try:
        if SIG["sig"] is not None:  # it came while the step started
            on_signal(SIG["sig"], None)
        return SIG["proc"].wait()
    finally:
        SIG["proc"] = None


def stopped_line(again):
    n, k, out = AT["total"], AT["done"], AT["output"]
    kept = (f"the outputs of steps 1-{k} of {n} are kept" if k > 1 else f"the output of step 1 of {n} is kept" if k
            else "no step had finished" if n else "no step was run")
    if out is not None:   # stopped inside a step
        kept += f"; {out} " + ("keeps its training's progress (continued with rigsa.py train --resume)"
                               if AT["train"] else "is evaluated again")
    return f"{signal.Signals(SIG['sig']).name}: reproduce.py stopped; {kept}; continue with: {again}"


def record(*args):
    """write_record, a SIGINT or SIGTERM meanwhile held until it is written (the caller then stops)."""
    SIG["defer"] = True
    try:
        write_record(*args)
    finally:
        SIG["defer"] = False


def check_stop():
    if SIG["sig"] is not None:
        raise Stopped()


def kind(cmd):
    """Steps that take about as long as each other: a training per method, an evaluation per task,
    shots, base precision and adapter kind (a QLoRA adapter runs on the 4-bit base)."""
    f = flags(cmd)
    if is_training(cmd):
        return ("train", f.get("--method"))
    adapter = f.get("--adapter")   # RUN/iterK: the run folder's name says its method (OUT's path may say anything)
    return ("eval", f.get("--task"), f.get("--num-fewshot"), f.get("--quantize"),
            bool(adapter) and Path(adapter).parent.name.startswith("qlora"))


def duration(s):
    s = int(round(s))
    return (f"{s // 86400} d {s % 86400 // 3600} h" if s >= 86400 else f"{s // 3600} h {s % 3600 // 60:02d} min"
            if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s")


def eta(took, left):
    """The time the steps `left` should take, from the steps of each kind run here (took: kind -> their
    seconds); None until a step of every kind left has run."""
    if all(kind(cmd) in took for cmd in left):
        return sum(sum(took[kind(c)]) / len(took[kind(c)]) for c in left)
    return None


def will_run(a, inputs, target, cmd):
    """Whether a step still to come will run, for the ETA: its output is missing, or it was made from
    other inputs and --rerun-changed redoes it (steps_of's own test, without its refusals and records)."""
    if not target.exists():
        return True
    if not a.rerun_changed:
        return False   # kept, or refused when it is reached
    cmd = [x for x in cmd if x != "--resume"]
    out, train = output_of(target, cmd), is_training(cmd)
    rec = read_record(out)
    if rec is None or difference(rec, inputs.of(cmd), a.model, inputs.older) or (train and config_drift(out, cmd)):
        return True
    return not train and rec.get("sha256") not in (None, util.file_hash(out, "sha256"))


def script():
    """This file as the caller typed it, or else its shorter spelling from the caller's directory."""
    if sys.argv[0] and os.path.exists(sys.argv[0]) and os.path.samefile(sys.argv[0], __file__):
        return sys.argv[0]
    return min(os.path.relpath(Path(__file__).resolve()), str(Path(__file__).resolve()), key=len)


def run_steps(a, again):
    older = []   # outputs kept whose record names other code than this checkout's
    try:
        steps_of(a, again, older)
    finally:   # said however the run ends (a later step refused, failed or stopped): they stay kept in OUT
        say_older(older)


def steps_of(a, again, older):
    """run_steps' work; `older` collects the kept outputs of other code."""
    steps = plan(a)
    if not a.dry_run:
        fetch_data(a, steps)
    inputs = Inputs(a)
    planned = []   # the seeds' steps against OUT's other seeds: one setting per cell, said before any step runs
    for target, cmd in steps:
        seed, cell = seed_of(output_of(target, cmd))
        if seed is not None:   # a training's untyped settings: this code's defaults
            extra = code_defaults(cmd) if is_training(cmd) else {}
            planned.append((seed, cell, lambda cmd=cmd, extra=extra: {   # asked only where compared (the base)
                **inputs.of(cmd, seeded=False), **{f"{k} (not typed)": v for k, v in extra.items()}}))
    check_pooling(a.out, None, planned, a.model)   # every seed OUT holds: make plots pools them all
    env = {**os.environ, "RIGSA_QUIET_STOP": "1", **({"HF_HUB_OFFLINE": "1"} if a.offline else {})}  # offline:
    # also keeps huggingface-hub off the hub; quiet: a step stopped by a signal leaves the one line to reproduce.py
    AT["total"] = len(steps)
    took = {}    # kind of step -> the seconds each such step took here (the ETA's)
    for i, (target, cmd) in enumerate(steps, 1):
        check_stop()
        AT.update(step=i, done=i - 1, output=None)
        out, train = output_of(target, cmd), is_training(cmd)
        cmd = [x for x in cmd if x != "--resume"]  # a run continues only when its record says it is this one
        made = (out / "config.json").exists() if train else out.exists()
        if made:
            rec = read_record(out)
            why = difference(rec, inputs.of(cmd), a.model, inputs.older) if rec else None
            why = why or (config_drift(out, cmd) if rec and train else None)   # seeds of other settings are not pooled
            if rec and not why and not train and rec.get("sha256") not in (None, util.file_hash(out, "sha256")):
                why = (f"changed after this step made it: sha256 {str(rec['sha256'])[:12]}... then, "
                       f"{util.file_hash(out, 'sha256')[:12]}... now (edited, replaced or cut)")
                if not a.rerun_changed:   # never tabulated as this step's
                    raise ValueError(f"{out}: {why}; move it away, or pass --rerun-changed to make it again")
            if rec and not why and (not train or target.exists()):
                if train:   # its iterK files are the ones its log recorded, before their evaluations are taken or redone
                    run_metrics(out)
                if rec.get("status") != "done":   # it finished after its record was written
                    record(out, cmd, rec["inputs"], rec.get("model"), "done")
                if recorded(out / "config.json" if train else out, "code") not in (None, util.code_version()):
                    older.append(str(out))   # kept (code is no input), but said, and named in TABLES.md
                continue
            if rec is None and (train or not a.rerun_changed):
                raise ValueError(f"{out}: no record of the inputs that made it ({record_path(out).name} is missing: "
                                 "made by hand or by an older reproduce.py); move it away or use another --out"
                                 + ("" if train else ", or pass --rerun-changed to evaluate it again"))
            if why and not a.rerun_changed:
                raise ValueError(f"{out}: made from other inputs than this command's ({why}); use another --out, "
                                 "or pass --rerun-changed to redo the changed steps")
            if rec is None or why:  # --rerun-changed: made again from the start (a run only if this script recorded it)
                if train and out.is_symlink():   # rmtree refuses a link in its own words; its target is not ours
                    raise ValueError(f"{out}: a symbolic link (to {os.path.realpath(out)}), which --rerun-changed does "
                                     f"not delete through; move the link away to train the run again here")
                print(f"[{i}/{len(steps)}] {out}: {why or 'no record of its inputs'}; --rerun-changed: "
                      + ("it would be replaced" if a.dry_run else "replacing it"), flush=True)
                if not a.dry_run and train:
                    with util.lock_dir(out):   # not while a training writes it (refused, naming its pid)
                        shutil.rmtree(out)
                elif not a.dry_run:
                    out.unlink()
                made = False
            cmd += ["--resume"] * (train and made)
        print(f"[{i}/{len(steps)}] {shlex.join(cmd)}", flush=True)
        if a.dry_run:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        # before it starts: its output is taken as this step's, and a half-trained run continued, only on these inputs
        record(out, cmd, inputs.of(cmd), a.model, "started")
        check_stop()
        AT.update(output=out, train=train)
        t0 = time.perf_counter()
        rc = run_step(cmd, env)
        if rc == 0 and target.exists():
            record(out, cmd, inputs.of(cmd), a.model, "done")
            AT.update(done=i, output=None)
            took.setdefault(kind(cmd), []).append(time.perf_counter() - t0)
            todo = [c for t, c in steps[i:] if will_run(a, inputs, t, c)]   # those kept are skipped
            left = eta(took, todo)
            print(f"[{i}/{len(steps)}] done in {duration(took[kind(cmd)][-1])}"
                  + (f"; the {len(todo)} steps left: about {duration(left)}" if todo and left is not None else ""),
                  flush=True)
        if not target.exists() and not train:  # an evaluation keeps nothing partial: nor its record
            record_path(out).unlink(missing_ok=True)
        check_stop()
        if rc != 0:
            raise ValueError(f"step {i} of {len(steps)}: failed (exit {rc}); fix it, and continue with: {again}")
        if not target.exists():   # it said it finished, yet its output is not there: nothing is taken as done
            raise ValueError(f"step {i} of {len(steps)}: exited 0 without writing {target}; run its command (above) "
                             f"to see why, then continue with: {again}")
    check_stop()
    AT.update(done=len(steps), output=None)


def say_older(older):
    """The note on kept outputs whose record names other code than this checkout's (code is no input)."""
    if older:
        print(f"note: {len(older)} of the outputs kept ({', '.join(older[:3])}{', ...' * (len(older) > 3)}) were made "
              f"by another version of rigsa's code than this checkout's ({util.code_version()}, the sha256 of its sources); "
              f"their inputs are this command's, so they are tabulated, and TABLES.md names each group's code; for "
              f"numbers of this code alone, reproduce into another --out", file=sys.stderr, flush=True)


def parse_args(argv):
    """The command line -> its namespace, seeds parsed, the caller's relative paths made absolute
    (the steps run in the repository root)."""
    ap = util.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-1.7B-Instruct", type=util.nonempty("a hub id or a model folder"),
                    help="base model [default: the paper's]")
    ap.add_argument("--revision", default="", help="hub revision of --model, passed to every step [default: the latest]")
    ap.add_argument("--out", default="runs/paper", help="where runs, evals/*.json and TABLES.md go [default: runs/paper]")
    ap.add_argument("--seeds", default="", help="training seeds, comma-separated (e.g. 0,1,2): each training runs once "
                    f"per seed and each cell reports the mean and a 95%% t interval [default: {DEFAULT_SEED}, one run; "
                    "tables: every seed in --out]")
    ap.add_argument("--limit", type=util.number(int, 0), default=0, help="evaluate only the first N documents/images (0 = all) [default: 0]")
    ap.add_argument("--steps", type=util.number(int, 0), default=0, help="cap optimizer steps per training iteration (0 = the paper's epochs)")
    ap.add_argument("--data-dir", default="", help="data root holding <task>/ folders, mnist/ included, for training and "
                    "evaluation [default: data]")
    ap.add_argument("--dtype", default="", choices=["", "auto", "float32", "bfloat16"],
                    help="every step's --dtype [default: theirs, auto: bfloat16 where the device computes it natively]")
    ap.add_argument("--no-verify", action="store_true", help="skip the data checksums (stand-in data files)")
    ap.add_argument("--offline", action="store_true", help="never download: a missing model or data file is an error")
    ap.add_argument("--nproc", type=util.number(int, 1), default=1,
                    help="run each training and evaluation on torchrun with this many processes (one per GPU) [default: 1]")
    ap.add_argument("--rerun-changed", action="store_true", help="redo the steps whose outputs were made from other "
                    "inputs (or have no record of them) instead of refusing: evaluations again, recorded runs retrained")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--tables-only", action="store_true", help="only (re)write TABLES.md and the figures from what exists")
    a = ap.parse_args(argv)
    idle = [d for d in ("model", "revision", "limit", "steps", "data_dir", "dtype", "no_verify", "offline", "nproc",
                        "rerun_changed", "dry_run") if a.tables_only and getattr(a, d) != ap.get_default(d)]
    if idle:   # the tables come from what OUT holds, whatever these say: TABLES.md names what made each cell
        ap.error(f"--tables-only: --{idle[0].replace('_', '-')} cannot act (the tables are read from what --out "
                 f"holds, and name the model and limits that made them); drop it")
    try:
        a.seeds_given = parse_seeds(a.seeds) if a.seeds else None
    except ValueError as e:
        ap.error(str(e))
    a.seeds = a.seeds_given or [DEFAULT_SEED]
    if not a.out:   # abspath("") is the current folder: never a default by accident
        ap.error("--out: empty; name the reproduction's folder")
    up = os.path.abspath(a.out)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):   # before the data checks, and for --dry-run too
        ap.error(f"--out {a.out}: {'is' if up == os.path.abspath(a.out) else 'is under'} a file, not a folder; "
                 f"choose another --out")
    a.out = os.path.abspath(a.out)
    a.data_dir = a.data_dir and os.path.abspath(a.data_dir)
    if os.path.exists(a.model):
        a.model = os.path.abspath(a.model)
    try:   # as every step would refuse it, after the data checks, with advice to run the same command again
        M.check_revision(a.model, a.revision)
    except ValueError as e:
        ap.error(str(e))
    return a


@contextlib.contextmanager
def held(a):
    """OUT/LOCK (util.lock_dir) while the steps and the tables write OUT; none for --dry-run or
    --tables-only (make plots during make paper). An OUT made here and left empty (a refusal before any
    step) is removed again, with the folders made above it."""
    if a.dry_run or a.tables_only:   # the tables only read OUT's outputs (and TABLES.md is written whole)
        yield
        return
    out = Path(a.out)
    made = [d for d in [out, *out.parents] if not d.exists()]   # OUT and the folders above it made for it
    out.mkdir(parents=True, exist_ok=True)
    try:
        with util.lock_dir(out, "reproduce.py"):
            yield
    finally:
        for d in made:   # innermost first: each only if left empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    again = shlex.join([interrupts.python_cmd(), script()] + argv)  # pasteable where it was typed
    a = parse_args(argv)
    SIG.update(proc=None, sig=None, defer=False)
    AT.update(step=0, total=0, done=0, output=None, train=False)
    old = {}
    try:
        try:
            old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals stay as they are
            pass
        check_tables(a.out)   # before days of steps, not after them
        if a.tables_only:
            check_outputs(a.out, a.seeds_given)
        with held(a):   # one reproduce.py per OUT: two would each take the other's outputs as their own
            if not a.tables_only:
                run_steps(a, again)
            if not a.dry_run:
                print(tables(a.out, a.seeds_given))
    except Stopped:
        print(stopped_line(again), file=sys.stderr)
        sys.exit(128 + SIG["sig"])
    except (OSError, ValueError, RuntimeError) as e:
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"error: {what}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    main()
