"""Tests for reproduce.py: the plan of commands, the 95% intervals, the tables and figures it
writes from the steps' outputs (mostly written by hand, with the records reproduce.py would write),
and, on a tiny model, that a step's output is reused only if made from the same inputs and that an
interrupted reproduction continues where it stopped."""
import argparse
import dataclasses
import json
import math
import os
import shlex
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import model as M
import reproduce as P
import rigsa
from lib import adapter_files as AF
from lib import mnist
from lib import tiny
from lib import util


def args(out, seeds, **kw):
    return argparse.Namespace(**{"model": "M", "out": str(out), "limit": 3, "steps": 2, "data_dir": "",
                                 "no_verify": False, "offline": False, "seeds": seeds, **kw})


def test_plan_one_seed_keeps_the_single_seed_layout(tmp_path):
    steps = P.plan(args(tmp_path, [P.DEFAULT_SEED]))
    # 2 x (2 MNIST + 3 source) base evals; rigsa 1 + 5x3; random mask 1 + 3; 4 QLoRA ranks x (1 + 3)
    assert len(steps) == 10 + 16 + 4 + 16
    cmds = [" ".join(c) for _, c in steps]
    assert any("--method random-mask --mask-like " + str(tmp_path / "rigsa" / "iter5") in c for c in cmds)
    assert sum("--method qlora --rank" in c for c in cmds) == 4
    assert all("--limit 3" in c for c in cmds if "evals/run.py" in c)
    assert tmp_path / "evals" / "rigsa-iter1-piqa.json" in [f for f, _ in steps]
    assert tmp_path / "qlora-r16" / "iter1.safetensors" in [f for f, _ in steps]


def test_plan_with_seeds(tmp_path):
    steps = P.plan(args(tmp_path, [0, 1], offline=True, no_verify=True, data_dir="D", dtype="float32"))
    assert len(steps) == 10 + 2 * 36  # the base model's evaluations once, every training per seed
    cmds = [" ".join(c) for _, c in steps]
    trains = [c for c in cmds if "rigsa.py train" in c]
    assert len(trains) == 2 * 6 and sum("--seed 1 " in c for c in trains) == 6
    # each seed's random mask copies that seed's RIGSA densities, and runs after it
    mask1 = next(i for i, c in enumerate(cmds) if f"--out {tmp_path / 'random-mask-seed1'} " in c)
    assert f"--mask-like {tmp_path / 'rigsa-seed1' / 'iter5'}" in cmds[mask1]
    assert cmds.index(next(c for c in trains if f"--out {tmp_path / 'rigsa-seed1'} " in c)) < mask1
    assert tmp_path / "evals" / "qlora-r4-seed0-iter1-gsm8k.json" in [f for f, _ in steps]
    assert all("--offline" in c and "--no-verify" in c and "--data-dir D" in c and "--dtype float32" in c for c in cmds)
    assert not any("--seed" in c for c in cmds if "evals/run.py" in c)


def jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def stand_in_tasks(data):
    """PIQA, HellaSwag and GSM8k files of a few documents each (reproduce.py reads every step's data
    before the first step). PIQA's first document has a continuation longer than the tiny models'
    2048 positions, so that the step evaluating an adapter on it fails, in one line."""
    jsonl(data / "piqa" / "valid.jsonl", [{"goal": "Stay dry", "sol1": "1" * 3000, "sol2": "use an umbrella"},
                                          {"goal": "Cut paper", "sol1": "use scissors", "sol2": "use a spoon"}])
    (data / "piqa" / "valid-labels.lst").write_text("1\n0\n")
    jsonl(data / "hellaswag" / "hellaswag_val.jsonl", [{"activity_label": "Cooking", "ctx_a": "A man cracks an egg.",
                                                        "ctx_b": "he", "endings": ["stirs", "sings", "runs", "naps"],
                                                        "label": 0}] * 2)
    jsonl(data / "gsm8k" / "train.jsonl", [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                                           for i in range(6)])
    jsonl(data / "gsm8k" / "test.jsonl", [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}] * 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    """Digits, a few documents of the other tasks, and two tiny models of the same shapes with other
    weights (A, B)."""
    w = tmp_path_factory.mktemp("repro")
    mnist.write_synthetic_mnist(w / "data" / "mnist", n_train=60, n_test=4, size=8)
    stand_in_tasks(w / "data")
    return w, str(tiny_dir), str(tiny.write_tiny_checkpoint(w / "B", shape="gqa", seed=1))


def quick(model, out, data, *more):
    return ["--model", str(model), "--out", str(out), "--data-dir", str(data), "--limit", "2", "--steps", "2",
            "--dtype", "float32", "--offline", "--no-verify", *more]


def fake(argv, upto, first=1):
    """Steps first..upto of a reproduction as if reproduce.py had run them: their outputs, and their records."""
    a = P.parse_args(argv)
    inputs = P.Inputs(a)
    for target, cmd in P.plan(a)[first - 1:upto]:
        out = P.output_of(target, cmd)
        if P.is_training(cmd):
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")
            for k in range(1, int(target.stem[4:]) + 1):
                (out / f"iter{k}.safetensors").write_bytes(b"adapter %d" % k)
        else:
            write_eval(target, "acc", 0.5, 0.01)
        P.write_record(out, cmd, inputs.of(cmd), a.model, "done")
    return a


def files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_eta_counts_the_kept_steps_that_rerun_changed_redoes(world, tmp_path):
    # the ETA left out every step whose output was there, although --rerun-changed redoes those made from other
    # inputs: days of GPU time unsaid on a change of base model
    w, A, B = world
    a = fake(quick(A, tmp_path, w / "data"), 3)   # the base model's first three evaluations, made on A
    steps = P.plan(a)
    runs = lambda argv: [P.will_run(x, P.Inputs(x), t, c) for x in [P.parse_args(argv)] for t, c in steps[:4]]  # noqa: E731
    assert runs(quick(A, tmp_path, w / "data")) == [False, False, False, True]    # kept (or refused when reached)
    assert runs(quick(B, tmp_path, w / "data")) == [False, False, False, True]    # refused when reached, not redone
    assert runs(quick(A, tmp_path, w / "data", "--rerun-changed")) == [False, False, False, True]
    assert runs(quick(B, tmp_path, w / "data", "--rerun-changed")) == [True, True, True, True]   # another base
    write_eval(steps[1][0], "acc", 0.7, 0.01)   # an output changed since its step made it
    assert runs(quick(A, tmp_path, w / "data", "--rerun-changed")) == [False, True, False, True]


def test_seeds_of_two_settings_are_never_pooled_in_one_cell(world, tmp_path, capsys):
    # seed 0 reproduced with --steps 2, seed 1 added later with --steps 3: nothing compared them (seed 0's outputs
    # are not in seed 1's plan), and the tables averaged both into one interval (70.00 +- 127.06, "n = 2 seeds")
    w, A, _ = world
    argv = quick(A, tmp_path, w / "data")
    fake(argv + ["--seeds", "0"], 46)                  # the base model's evaluations and all of seed 0's steps
    said = (rf"error: {tmp_path}: TABLES.md's cell rigsa would pool two settings: seed 0's output was made with "
            r"--steps 2, seed 1's is to be made with 3; reproduce each setting into its own --out \(move the other's "
            r"runs and evaluations away\), or tabulate one of them with --tables-only --seeds")
    for more in (["--dry-run"], ["--dry-run", "--rerun-changed"]):   # before any step, and whatever redoes seed 1's
        with pytest.raises(SystemExit) as e:
            P.main(argv + ["--seeds", "1", "--steps", "3", *more])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 1 and re.fullmatch(said, err), err
    P.main(argv + ["--seeds", "1", "--dry-run"])       # the same setting: planned without a word
    assert "would pool" not in capsys.readouterr().err
    # a default edited between the seeds (keep 0.8 -> 0.7): seed 0's config.json holds it, untyped by its command
    cfg = json.loads(json.dumps(dataclasses.asdict(rigsa.Config(keep=0.7))))
    (tmp_path / "rigsa-seed0" / "config.json").write_text(json.dumps({"config": cfg}))
    with pytest.raises(SystemExit):
        P.main(argv + ["--seeds", "1", "--dry-run"])
    assert re.search(r"cell rigsa would pool two settings: seed 0's output was made with --keep \(not typed\) 0\.7, "
                     r"seed 1's is to be made with 0\.8;", capsys.readouterr().err)
    (tmp_path / "rigsa-seed0" / "config.json").write_text("{}")
    fake(argv + ["--seeds", "1", "--steps", "3"], 46, first=11)   # assembled by hand (or by an older reproduce.py)
    with pytest.raises(ValueError, match=r"cell \S+ would pool two settings: seed 0's output was made with --steps "
                                         r"2, seed 1's was made with 3"):
        P.tables(tmp_path)
    P.tables(tmp_path, [1])                             # one setting's seeds: tabulated
    assert "n = 2" not in (tmp_path / "TABLES.md").read_text()
    assert P.seed_of("e/rigsa-seed0-iter1-piqa.json") == (0, "rigsa-iter1-piqa") and P.seed_of("o/qlora-r4-seed-3") == \
        (-3, "qlora-r4") and P.seed_of("rigsa-iter2-gsm8k.json") == (P.DEFAULT_SEED, "rigsa-iter2-gsm8k") and \
        P.seed_of("base-nf4-piqa.json") == (None, "base-nf4-piqa")
    assert P.pool_difference({"--dtype": "auto"}, {}) is None and P.pool_difference({"--dtype": "float32"}, {}) == \
        ("--dtype", "float32", "auto")   # not typed is each step's default, auto
    assert P.pool_difference({"--keep (not typed)": 0.7}, {}) is None   # a config.json without it: not compared
    one, two = {"commit": "a" * 40, "fingerprint": "f"}, {"commit": "b" * 40, "fingerprint": "f"}
    assert P.pool_difference({"base model": one}, {"base model": {**one, "fingerprint": "older"}}) is None   # a commit
    assert P.pool_difference({"base model": one}, {"base model": two})[0] == "base model"   # sampled weights: commits
    assert P.pool_difference({"base model": {"commit": None, "fingerprint": "f"}},
                             {"base model": {"commit": None, "fingerprint": "g"}})[0] == "base model"
    # the hub's latest moved on between seed 0 and seed 1 (a README edit is enough): --revision makes seed 1 from
    # seed 0's commit; another model id's is not offered
    (tmp_path / "hub" / "evals").mkdir(parents=True)
    P.write_record(tmp_path / "hub" / "evals" / "rigsa-seed0-iter1-piqa.json", [], {"base model": one}, "M", "done")
    (tmp_path / "hub" / "evals" / "rigsa-seed0-iter1-piqa.json").write_text("{}")
    for model, hint in (("M", f"--revision {'a' * 40} makes it from the commit the other was made from, or "), ("N", "")):
        with pytest.raises(ValueError) as e:
            P.check_pooling(tmp_path / "hub", None, [(1, "rigsa-iter1-piqa", {"base model": two})], model)
        assert str(e.value).endswith(f"seed 1's is to be made with {model} (commit {'b' * 40}, fingerprint f); {hint}"
                                     f"reproduce each setting into its own --out (move the other's runs and "
                                     f"evaluations away), or tabulate one of them with --tables-only --seeds"), e.value
    P.write_record(tmp_path / "hub" / "evals" / "rigsa-seed1-iter1-piqa.json", [], {"base model": two}, "M", "done")
    (tmp_path / "hub" / "evals" / "rigsa-seed1-iter1-piqa.json").write_text("{}")
    with pytest.raises(ValueError, match="would pool two settings") as e:   # both made: nothing to make from a commit
        P.check_pooling(tmp_path / "hub", None, [], "M")
    assert "--revision" not in str(e.value) and "seed 1's was made with" in str(e.value), e.value


def test_a_dry_run_into_a_fresh_out_asks_for_no_base(world, tmp_path, capsys, monkeypatch):
    # the pooling check asked every planned step's inputs, the base's identity among them: --dry-run resolved the
    # base (a 1.7B download with the network; offline, a refusal), where it printed the commands without
    w, A, _ = world
    argv = quick(A, tmp_path / "out", w / "data", "--seeds", "0,1")
    asked = lambda self: pytest.fail("--dry-run asked for the base")   # noqa: E731
    monkeypatch.setattr(P.Inputs, "identity", asked)
    P.main(argv + ["--dry-run"])
    assert capsys.readouterr().out.count("[82/82] ") == 1   # 10 + 36 a seed
    monkeypatch.undo()
    fake(quick(A, tmp_path / "out", w / "data", "--seeds", "0"), 46)   # seed 0 is made: seed 1's cells compare bases
    monkeypatch.setattr(P.Inputs, "identity", asked)
    with pytest.raises(pytest.fail.Exception, match="asked for the base"):
        P.main(quick(A, tmp_path / "out", w / "data", "--seeds", "1", "--dry-run"))


def test_main_skips_recorded_outputs_and_resumes(world, tmp_path, capsys):
    w, A, _ = world
    argv = quick(A, tmp_path, w / "data", "--seeds", "0,1")
    fake(argv, 3)                                              # the base model's first three evaluations
    (tmp_path / "rigsa-seed0").mkdir()
    (tmp_path / "rigsa-seed0" / "config.json").write_text("{}")  # a half-trained run, started by reproduce.py
    a = P.parse_args(argv)
    rig = next((t, c) for t, c in P.plan(a) if f"{tmp_path / 'rigsa-seed0'}" in c)
    P.write_record(tmp_path / "rigsa-seed0", rig[1], P.Inputs(a).of(rig[1]), A, "started")
    P.main(argv + ["--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 82 - 3 and not any("/base-piqa.json" in x or "/base-mnist-5shot.json" in x for x in lines)
    assert sum("--resume" in x for x in lines) == 1 and f"--out {tmp_path / 'rigsa-seed0'} " in \
        next(x for x in lines if "--resume" in x)
    with pytest.raises(SystemExit) as e:
        P.main(["--seeds", "0,0", "--dry-run"])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_outputs_of_other_code_are_kept_and_said(world, tmp_path, capsys, no_plots, monkeypatch):
    # code is no input (a git pull would otherwise redo days of work), but what other code made is never silent
    w, A, _ = world
    argv = quick(A, tmp_path, w / "data")
    fake(argv, 3)
    evals = sorted(p for p in (tmp_path / "evals").glob("*.json") if not p.name.endswith(".inputs.json"))
    for p, code in zip(evals, ("0123456789ab", util.code_version(), None)):   # another's, this one's, unrecorded
        d = json.loads(p.read_text())
        p.write_text(json.dumps({**d, **({"code": code} if code else {})}))
        P.write_record(p, *[json.loads(P.record_path(p).read_text())[k] for k in ("argv", "inputs", "model")], "done")
    P.main(argv + ["--dry-run"])
    err = capsys.readouterr().err
    assert err.startswith(f"note: 1 of the outputs kept ({evals[0]}) were made by another version of rigsa's code than "
                          f"this checkout's ({util.code_version()}, the sha256 of its sources)"), err
    monkeypatch.setattr(P, "run_step", lambda cmd, env: 1)   # a later step fails: the note is said all the same
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"note: 1 of the outputs kept ({evals[0]})") \
        and "error: step 4 of 46: failed (exit 1)" in err, err
    def stopped(cmd, env):   # or is stopped (SIGTERM, as on_signal leaves it)
        P.SIG["sig"] = signal.SIGTERM
        raise P.Stopped
    monkeypatch.setattr(P, "run_step", stopped)
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    assert e.value.code == 143 and f"note: 1 of the outputs kept ({evals[0]})" in capsys.readouterr().err
    P.main(["--out", str(tmp_path), "--tables-only"])
    line = next(x for x in (tmp_path / "TABLES.md").read_text().splitlines() if x.startswith("- base-model"))
    assert line.startswith("- base-model evaluations: **mixed**: ") and "rigsa's code 0123456789ab;" in line \
        and f"rigsa's code {util.code_version()}" in line, line


def test_a_step_that_exits_0_without_its_output_stops_the_reproduction(world, tmp_path, capsys, monkeypatch):
    # it was recorded "done" and said "done in", and its table cell came out blank; nothing says it finished but its file
    w, A, _ = world
    argv = quick(A, tmp_path, w / "data")
    plan = P.plan(P.parse_args(argv))
    first = next(i for i, (_, c) in enumerate(plan, 1) if P.is_training(c))
    monkeypatch.setattr(P, "run_step", lambda cmd, env: 0)
    for i in (4, first):   # an evaluation, then a training
        fake(argv, i - 1)
        with pytest.raises(SystemExit) as e:
            P.main(argv)
        target, cmd = plan[i - 1]
        said = capsys.readouterr()
        assert e.value.code == 1 and said.err.startswith(f"error: step {i} of {len(plan)}: exited 0 without writing "
                                                         f"{target}; run its command (above) to see why, then continue "
                                                         f"with: "), said.err
        assert " done in " not in said.out
        rec = P.record_path(P.output_of(target, cmd))
        assert (json.loads(rec.read_text())["status"] == "started") if P.is_training(cmd) else not rec.exists()


def test_the_eta_comes_from_the_steps_of_each_kind_run_here(tmp_path):
    # reproduce.py runs for days: after each step, how long the rest should take (its steps' own bars restart)
    steps = [c for _, c in P.plan(P.parse_args(["--out", str(tmp_path / "qlora-study")]))]   # OUT's name: no kind
    kinds = {P.kind(c) for c in steps}   # 10 base evaluations (an adapter of full precision: as long), 3 trainings,
    # and the 3 tasks on a QLoRA adapter
    assert len(kinds) == 16 and ("train", "qlora") in kinds and ("eval", "piqa", None, "nf4", False) in kinds
    rig = next(c for c in steps if "--adapter" in c and P.flags(c)["--adapter"].endswith("/rigsa/iter1"))
    assert P.kind(rig) == ("eval", "piqa", None, None, False)   # RIGSA's adapter, though OUT's name says qlora
    took = {k: [10.0] for k in kinds}
    assert P.eta(took, steps) == 10.0 * len(steps) == 460
    took[("train", "rigsa")] = [100.0, 300.0]   # the mean of its kind
    assert P.eta(took, steps) == 450 + 200 and P.eta(took, []) == 0
    del took[("eval", "gsm8k", None, None, True)]
    assert P.eta(took, steps) is None and P.eta(took, steps[:1]) == 10
    assert [P.duration(x) for x in (0.4, 59, 60, 61, 3599, 3600, 7500, 86399, 86400, 90000)] == [
        "0 s", "59 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 05 min", "23 h 59 min", "1 d 0 h",
        "1 d 1 h"]   # each unit from its first second: never "60 min 00 s"


def test_rerun_changed_never_deletes_through_a_link(world, tmp_path, capsys):
    # a run folder linked from elsewhere (another disk): rmtree refused in its own words; its target is not ours
    w, A, _ = world
    out = tmp_path / "out"
    fake(quick(A, out, w / "data"), 12)
    (out / "rigsa").rename(tmp_path / "elsewhere")
    (out / "rigsa").symlink_to(tmp_path / "elsewhere")
    before = files(tmp_path / "elsewhere")
    argv = quick(A, out, w / "data", "--rerun-changed")
    argv[argv.index("--steps") + 1] = "3"
    for more in (["--dry-run"], []):
        with pytest.raises(SystemExit) as e:
            P.main(argv + more)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err == (f"error: {out / 'rigsa'}: a symbolic link (to {tmp_path / 'elsewhere'}), "
                                             f"which --rerun-changed does not delete through; move the link away to "
                                             f"train the run again here\n"), err
        assert (out / "rigsa").is_symlink() and files(tmp_path / "elsewhere") == before


def test_rerun_changed_never_deletes_a_run_being_trained(world, tmp_path, capsys, monkeypatch):
    # a rigsa.py train writing the run (started by hand meanwhile): deleted under it, both would lose their work
    w, A, _ = world
    monkeypatch.setattr(P, "run_step", lambda cmd, env: pytest.fail("a step ran"))
    out = tmp_path / "out"
    fake(quick(A, out, w / "data"), 12)
    argv = quick(A, out, w / "data", "--rerun-changed")
    argv[argv.index("--steps") + 1] = "3"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # a live process's LOCK in the run
    try:
        (out / "rigsa" / "LOCK").write_text(f"{p.pid} {socket.gethostname()} {util._start_time(p.pid)}\n")
        before = files(out)
        with pytest.raises(SystemExit) as e:
            P.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and f"another rigsa.py (pid {p.pid}) is writing this run" in err, err
        assert files(out) == before
    finally:
        p.kill()
        p.wait()


def test_a_kept_output_recorded_as_started_is_recorded_done(world, tmp_path, capsys):
    # reproduce.py stopped between a step's end and its record: the output is kept, and its record completed, with
    # an evaluation's sha256, without which a later edit of that file would never be caught
    w, A, _ = world
    argv = quick(A, tmp_path, w / "data")
    a = fake(argv, 11)   # the base model's ten evaluations and RIGSA's training
    inputs = P.Inputs(a)
    (ev, ev_cmd), (run, run_cmd) = P.plan(a)[0], P.plan(a)[10]
    for target, cmd in ((ev, ev_cmd), (run.parent, run_cmd)):
        P.write_record(target, cmd, inputs.of(cmd), A, "started")
    assert "sha256" not in json.loads(P.record_path(ev).read_text())
    P.main(argv + ["--dry-run"])
    assert "--resume" not in capsys.readouterr().out   # its last iteration file is there: finished
    rec = json.loads(P.record_path(ev).read_text())
    assert rec["status"] == "done" and rec["sha256"] == util.file_hash(ev, "sha256"), rec
    assert json.loads(P.record_path(run.parent).read_text())["status"] == "done"


def test_a_training_records_every_mnist_file_it_reads(tiny_dir, tmp_path):
    # a training reads MNIST's train and test files: one reused after its training digits changed would not be
    # of this data; an evaluation reads the test files, and the training files too for its shots
    a = P.parse_args(["--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
    inputs = P.Inputs(a)
    cmds = {str(t.relative_to(tmp_path / "out")): c for t, c in P.plan(a)}
    read = lambda step: {k for k in inputs.of(cmds[step]) if k.startswith("mnist/")}
    every = {f"mnist/{n}" for n in mnist.MNIST_FILES}
    assert read("rigsa/iter5.safetensors") == read("evals/base-mnist-5shot.json") == every and len(every) == 4
    assert read("evals/base-mnist-0shot.json") == {"mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"}


def test_the_default_seeds_runs_count_beside_other_seeds(tmp_path, no_plots):
    # rigsa/ is the default seed's run (the one-seed layout): beside rigsa-seed1/ it is a seed of the means too
    for name, acc in (("rigsa", 0.5), ("rigsa-seed1", 0.7)):
        write_run(tmp_path, name, [{"iter": 1, "test_acc": acc, "test_images": 100}])
    assert P.seeds_found(tmp_path) == sorted([1, P.DEFAULT_SEED])
    assert f"**n = 2 seeds** (1, {P.DEFAULT_SEED})" in P.tables(tmp_path)


def test_seeds_are_rigsa_trains_whole_range():
    # --seeds takes every seed rigsa.py train takes, and refuses the others before any step
    assert P.parse_seeds(f"0,{rigsa.SEED_MAX}") == [0, rigsa.SEED_MAX]
    for bad in (-1, rigsa.SEED_MAX + 1):
        with pytest.raises(ValueError) as e:
            P.parse_seeds(f"1,{bad}")
        assert str(e.value) == f"--seeds 1,{bad}: {bad} is outside rigsa.py train's --seed range, 0 to {rigsa.SEED_MAX}"


def test_each_step_says_its_time_and_then_the_rests(world, tmp_path, capsys, monkeypatch, no_plots):
    w, A, _ = world

    def step(cmd, env):   # each step made at once: its output, as the real one writes it
        f = P.flags(cmd)
        if P.is_training(cmd):
            Path(f["--out"]).mkdir(parents=True, exist_ok=True)
            (Path(f["--out"]) / "config.json").write_text("{}")
            for k in range(1, P.IMP_ITERS + 1):
                (Path(f["--out"]) / f"iter{k}.safetensors").write_bytes(b"adapter %d" % k)
        else:
            write_eval(Path(f["--output"]), "acc", 0.5, 0.01)
        return 0
    monkeypatch.setattr(P, "run_step", step)
    argv = quick(A, tmp_path / "out", w / "data")
    a = fake(argv, 43, first=43)   # QLoRA rank 16's training, made already (as step() makes it): skipped, so not left
    assert P.plan(a)[42][0] == tmp_path / "out" / "qlora-r16" / "iter1.safetensors"
    P.main(argv)
    done = [x for x in capsys.readouterr().out.splitlines() if " done in " in x]
    assert len(done) == 45 and done[0] == "[1/46] done in 0 s", done
    first = next(i for i, x in enumerate(done) if "left" in x)   # once a step of each kind has run: the QLoRA adapter's
    assert first == 33 and re.fullmatch(r"\[34/46\] done in 0 s; the 11 steps left: about 0 s", done[first]), done
    assert all("left" in x for x in done[first:-1]) and "left" not in done[-1]
    left = {int(m[1]): int(m[2]) for x in done if (m := re.fullmatch(r"\[(\d+)/46\] done in 0 s; the (\d+) steps left: .*", x))}
    assert left == {i: 46 - i - (i < 43) for i in range(34, 46) if i != 43}, left


def mutate(out, data, name):
    """What changed since the fake reproduction, for the case `name`."""
    if name == "test digits":
        mnist.write_synthetic_mnist(data / "mnist", n_train=60, n_test=4, size=8, seed=1)
    elif name == "adapter":
        (out / "rigsa" / "iter1.safetensors").write_bytes(b"another adapter")
    elif name == "a config default edited":   # trained when rigsa.Config's split_seed was 3: not to be pooled with
        # this code's runs; what its command types (--steps: an input already) or what only changes how it runs, is no
        (out / "rigsa" / "config.json").write_text(json.dumps({"config": {"steps": 7, "moments": "8bit", "split_seed": 3,
                                                                          "device": "cuda"}}))
    elif name == "output edited":   # another task's result written over it by hand, or a file cut short
        write_eval(out / "evals" / "base-mnist-0shot.json", "acc", 0.9, 0.01)
    elif name == "output cut":
        p = out / "evals" / "base-mnist-0shot.json"
        p.write_bytes(p.read_bytes()[:20])
    elif name == "another run's adapter":   # a whole adapter file, but not the one the run's log recorded
        AF.write(out / "rigsa" / "iter1.safetensors", {"x": torch.ones(2)}, {})
        (out / "rigsa" / "metrics.jsonl").write_text(json.dumps({"event": "iteration", "iter": 1,
                                                                 "adapter_sha256": "0" * 64}) + "\n")
    elif name.startswith("no record"):
        P.record_path(out / ("evals/base-mnist-0shot.json" if "evaluation" in name else "rigsa")).unlink()


# (case, argv changes, what the one line names: {A}/{B} the models' paths and fingerprints, {out} OUT)
CHANGES = [
    ("model", ["--model", "{B}"], "{out}/evals/base-mnist-0shot.json: made from other inputs than this command's "
     "(base model: {A} (fingerprint {fa}) then, {B} (fingerprint {fb}) now)"),
    ("limit", ["--limit", "3"], "{out}/evals/base-mnist-0shot.json: made from other inputs than this command's "
     "(--limit: 2 then, 3 now)"),
    ("steps", ["--steps", "3"], "{out}/rigsa: made from other inputs than this command's (--steps: 2 then, 3 now)"),
    ("dtype", ["--dtype", "bfloat16"], "{out}/evals/base-mnist-0shot.json: made from other inputs than this command's "
     "(--dtype: float32 then, bfloat16 now)"),   # other numbers in the last bits
    ("test digits", [], "{out}/evals/base-mnist-0shot.json: made from other inputs than this command's "
     "(mnist/t10k-images-idx3-ubyte.gz: sha256 "),
    ("adapter", [], "{out}/evals/rigsa-iter1-piqa.json: made from other inputs than this command's (--adapter: sha256 "),
    ("a config default edited", [], "{out}/rigsa: made from other inputs than this command's (--split-seed (not typed "
     "by this command): 3 in its config.json, 0 in this code's rigsa.Config); use another --out, or pass --rerun-changed"),
    ("another run's adapter", [], "{out}/rigsa/iter1.safetensors: not the adapter this run's iteration 1 saved "),
    ("output edited", [], "{out}/evals/base-mnist-0shot.json: changed after this step made it: sha256 "),
    ("output cut", [], "{out}/evals/base-mnist-0shot.json: changed after this step made it: sha256 "),
    ("no record: evaluation", [], "{out}/evals/base-mnist-0shot.json: no record of the inputs that made it "
     "(base-mnist-0shot.inputs.json is missing"),
    ("no record: run", [], "{out}/rigsa: no record of the inputs that made it (rigsa.inputs.json is missing"),
]


ALWAYS = ("no record: run", "another run's adapter")   # refused with --rerun-changed too: not reproduce.py's to redo


@pytest.mark.parametrize("name,change,text", CHANGES, ids=[c[0] for c in CHANGES])
def test_an_output_is_reused_only_if_made_from_the_same_inputs(world, tmp_path, capsys, name, change, text):
    w, A, B = world
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(w / "data", data)
    fake(quick(A, out, data), 12)     # the base model's ten evaluations, RIGSA's training, its first evaluation
    mutate(out, data, name)
    argv = quick(A, out, data)
    for i in range(0, len(change), 2):
        argv[argv.index(change[i]) + 1] = change[i + 1].format(B=B)
    before = files(out)
    fp = {k: M.base_identity(m)["fingerprint"] for k, m in (("fa", A), ("fb", B))}
    for again in ([], ["--rerun-changed", "--dry-run"]):
        with pytest.raises(SystemExit) as e:
            P.main(argv + again)
            raise SystemExit(0)
        o, err = capsys.readouterr()
        if again and name not in ALWAYS:  # the changed steps would run again; a dry run changes nothing
            assert e.value.code == 0 and "--rerun-changed: it would be replaced" in o, err
        else:                                   # refused, in one line naming the first difference
            assert e.value.code == 1 and len(err.splitlines()) == 1, err
            assert err.startswith("error: " + text.format(out=out, A=A, B=B, **fp)), err
            assert ("pass --rerun-changed" in err) == (name not in ALWAYS), err
        assert files(out) == before


def test_another_model_is_refused_or_rerun(world, tmp_path, capsys, monkeypatch, no_plots):
    """A partial reproduction on model A, then on model B in the same OUT: refused, naming both; with
    --rerun-changed B's evaluations replace A's, and TABLES.md says B made them."""
    w, A, B = world
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # tiny models: threads only add overhead
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(w / "data", data)
    run_step = P.run_step                  # the 0-shot evaluation runs, the 5-shot one fails and stops the reproduction
    monkeypatch.setattr(P, "run_step", lambda cmd, env: 1 if "5shot" in " ".join(cmd) else run_step(cmd, env))

    def run(model, *more):
        with pytest.raises(SystemExit) as e:
            P.main(quick(model, out, data, *more))
        o, err = capsys.readouterr()
        assert e.value.code == 1, err
        return o, err.strip().splitlines()[-1]
    o, err = run(A)
    assert "[1/46]" in o and err.startswith("error: step 2 of 46: failed (exit 1)"), err
    # a failed evaluation keeps nothing partial, nor its record (a "started" one would name inputs of nothing there)
    assert not (out / "evals" / "base-mnist-5shot.inputs.json").exists()
    assert re.search(r"^\[1/46\] done in \d+ s$", o, re.M), o   # no ETA until a step of each kind has run
    assert json.loads((out / "evals" / "base-mnist-0shot.json").read_text())["model"] == A
    before = files(out)
    o, err = run(B)
    assert "[1/46]" not in o and "base model: " + A in err and B in err and files(out) == before
    o, err = run(B, "--rerun-changed")
    assert "[1/46]" in o and err.startswith("error: step 2 of 46"), err
    ev = json.loads((out / "evals" / "base-mnist-0shot.json").read_text())
    assert ev["model"] == B
    P.main(["--out", str(out), "--tables-only"])
    text = (out / "TABLES.md").read_text()
    fa, fb = (M.base_identity(m)["fingerprint"] for m in (A, B))
    assert f"- base-model evaluations: `{B}` (fingerprint {fb}), --limit 2, in float32, on {util.machine('cpu')}, rigsa's code {util.code_version()}\n" in text
    assert fa not in text
    cell = P.fmt(P.interval([(ev["metrics"]["acc"], ev["metrics"]["acc_stderr"])]))
    assert f"| Full Precision | {cell} | - |" in text


def test_tables_name_the_machine_and_a_mix_of_machines(tmp_path):
    # each output records where it was made (its kernels set the last bits); outputs of two machines are said
    (tmp_path / "evals").mkdir()
    # and the dtype each computed in (what --dtype auto resolved to there)
    for name, made_on, dtype in (("base-piqa", "cpu: A CPU (AMX)", "bfloat16"), ("base-gsm8k", "cuda: A GPU", "float32"),
                                 ("base-hellaswag", None, None)):
        out = tmp_path / "evals" / f"{name}.json"
        out.write_text(json.dumps({"task": name[5:], **({"machine": made_on, "dtype": dtype} if made_on else {})}))
        P.write_record(out, ["python", "evals/run.py"], {"base model": {"fingerprint": "f1"}, "--limit": 2}, "M", "done")
    line = next(x for x in P.made_by(tmp_path) if x.startswith("- base-model evaluations"))
    assert line == ("- base-model evaluations: **mixed**: 1 from `M` (fingerprint f1), --limit 2, in float32, on cuda: "
                    "A GPU; 1 from `M` (fingerprint f1), --limit 2; 1 from `M` (fingerprint f1), --limit 2, in bfloat16, "
                    "on cpu: A CPU (AMX)")
    # a training resumed on another machine is made on both: mixed with one that ran on the first alone
    for name, on in (("rigsa", [{"machine": "cuda: A GPU"}, {"machine": "cpu: A CPU (AMX)"}]), ("lora", [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"machine": "cpu: A CPU (AMX)", "resumed_on": on,
                                                                 "config": {"dtype": "float32"}}))
        P.write_record(tmp_path / name, ["python", "rigsa.py"], {"base model": {"fingerprint": "f1"}, "--limit": 2},
                       "M", "done")
    line = next(x for x in P.made_by(tmp_path) if x.startswith("- trainings"))
    for odd in ({"machine": 3}, {"machine": ["x"]}, {"machine": "cpu: A", "resumed_on": 5},
                {"machine": "cpu: A", "resumed_on": [{"machine": 3}, "x"]}):   # hand-edited: read what can be read
        (tmp_path / "odd.json").write_text(json.dumps(odd))
        assert P.recorded(tmp_path / "odd.json") == (None if "resumed_on" not in odd else "cpu: A")
    assert line.endswith("in float32, on cpu: A CPU (AMX); 1 from `M` (fingerprint f1), --limit 2, no --steps (the paper's epochs), in float32, on cpu: A CPU (AMX) and cuda: A GPU") and line.startswith("- trainings: **mixed**: "), line
    # a run an older version saved as "auto" ran in what auto resolved to on its machine (rundir.run_dtype)
    (tmp_path / "old").mkdir()
    for machine, dtype in (("cuda: A GPU", "bfloat16"), ("cpu: A CPU", "float32"), (None, None)):
        (tmp_path / "old" / "config.json").write_text(json.dumps({"config": {"dtype": "auto"},
                                                                  **({"machine": machine} if machine else {})}))
        assert P.dtype_of(tmp_path / "old" / "config.json") == dtype, machine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_reproduction_continues_from_another_directory(world, tmp_path, sig):
    """Launched from a directory other than the repository's, with relative paths: a signal while RIGSA
    trains stops reproduce.py after the training's step (exit 130 or 143, one line, the command that
    continues); that command, pasted, continues the training with --resume and goes on."""
    w, A, _ = world
    here = tmp_path / "here"
    here.mkdir()
    shutil.copytree(w / "data", tmp_path / "data")
    argv = quick(os.path.relpath(A, here), "../out", "../data")
    argv[argv.index("--steps") + 1] = "4"
    fake([str(here / x) if x.startswith("..") else x for x in argv], 10)   # the base model's evaluations
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reproduce.py"),
                             *argv], cwd=here, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "rigsa" / "metrics.jsonl"
    for _ in range(1200):  # until RIGSA's first iteration has been logged
        if proc.poll() is not None or (metrics.exists() and '"step"' in metrics.read_text()):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    o, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{signal.Signals(sig).name}: reproduce.py stopped; the outputs of steps 1-10 of 46 are "
                           f"kept; {tmp_path / 'out' / 'rigsa'} keeps its training's progress"), line
    again = line.split("; continue with: ")[1]
    assert shlex.split(again)[-len(argv):] == argv
    assert (tmp_path / "out" / "rigsa" / "resume.pt").exists()
    r = subprocess.run(again, shell=True, cwd=here, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # a PIQA document too long: step 12 stops it
    assert r.stderr.strip().splitlines()[-1].startswith("error: step 12 of 46: failed"), r.stderr
    steps = [x for x in r.stdout.splitlines() if x.startswith("[")]
    assert steps[0].startswith("[11/46]") and steps[0].endswith(" --resume") and steps[2].startswith("[12/46]")
    assert re.fullmatch(r"\[11/46\] done in \d+ s", steps[1]), steps
    assert json.loads(P.record_path(tmp_path / "out" / "rigsa").read_text())["status"] == "done"
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["iter"] for r in logged if r.get("event") == "iteration"] == [1, 2, 3, 4, 5]   # each once


BAD_DATA = [   # (case, what is done to a copy of the data, what the one line says)
    ("offline", "missing", "missing data files (offline); put them at: {gsm}test.jsonl <- https://"),
    ("online", "missing", "missing data files; put them at: {gsm}test.jsonl <- {mirror}/gsm8k/test.jsonl (from "
     "RIGSA_DATA_MIRROR, a copy of https://"),
    ("offline", "malformed", "gsm8k: {gsm}train.jsonl line 1: malformed JSON"),
    ("offline", "a folder", "{gsm}test.jsonl: not a file; put the gsm8k file test.jsonl there"),
    ("offline", "a pipe", "{gsm}test.jsonl: not a file; put the gsm8k file test.jsonl there"),   # read: waits forever
    ("offline", "data dir a file", "{data}: not a directory; --data-dir is a folder of <task>/ folders"),
    ("offline", "few digits", "{data}/mnist: its 40 training images leave rigsa.py train's validation split (1% of "
     "them, §4.2) empty; use MNIST's own files"),   # found by the 11th step's training, after ten evaluations
    ("offline", "checksums", "{gsm}train.jsonl: not the original gsm8k file (sha256 "),   # the stand-ins, verified
    ("online", "checksums", "{gsm}train.jsonl: not the original gsm8k file (sha256 "),
]


@pytest.mark.parametrize("mode,change,text", BAD_DATA, ids=[f"{m}-{c}" for m, c, _ in BAD_DATA])
def test_bad_data_is_named_before_the_first_step(world, tmp_path, capsys, monkeypatch, mode, change, text):
    """A data file that a later step would read, missing or not readable as that step reads it: named in
    one line before any step runs, with nothing written. Missing: with --offline, every missing file
    (of every task) is named; without, they are fetched first (from an empty mirror here, so the
    fetch fails, before any step too); --no-verify skips checksums, never the format; without it, every
    stand-in is named by its checksum, before any download."""
    w, A, _ = world
    data, out = tmp_path / "data", tmp_path / "new" / "out"   # new/: made for OUT, and removed with it
    shutil.copytree(w / "data", data)
    without = []            # flags taken out of quick()'s
    if change == "missing":
        for f in (data / "gsm8k" / "test.jsonl", data / "mnist" / "train-labels-idx1-ubyte.gz"):
            f.unlink()
    elif change == "malformed":
        (data / "gsm8k" / "train.jsonl").write_text("not a record\n")
    elif change == "few digits":
        mnist.write_synthetic_mnist(data / "mnist", n_train=40, n_test=4, size=8)
    elif change == "checksums":
        without = ["--no-verify"]
    elif change in ("a folder", "a pipe"):
        (data / "gsm8k" / "test.jsonl").unlink()
        (data / "gsm8k" / "test.jsonl").mkdir() if change == "a folder" else os.mkfifo(data / "gsm8k" / "test.jsonl")
    else:
        shutil.rmtree(data)
        data.write_text("not a folder")
    (tmp_path / "mirror").mkdir()
    argv = [x for x in quick(A, out, data) if x not in without]
    if mode == "online":
        monkeypatch.setenv("RIGSA_DATA_MIRROR", (tmp_path / "mirror").as_uri())
        argv.remove("--offline")
    before = files(tmp_path)
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    o, err = capsys.readouterr()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "[1/" not in o, (o, err)
    assert err.startswith("error: " + text.format(gsm=f"{data / 'gsm8k'}/", mirror=(tmp_path / "mirror").as_uri(),
                                                  data=data)), err
    if change == "missing":
        assert f"{data / 'mnist' / 'train-labels-idx1-ubyte.gz'} <- " in err   # every missing file, of every task
        assert ("or run without --offline to download them" in err) == (mode == "offline"), err
    if change == "checksums":   # every task's stand-in named; what to do depends on whether it may download
        assert all(f"{data / t}" in err for t in ("gsm8k", "hellaswag", "mnist", "piqa")) and "--no-verify" in err, err
        assert ("delete it to download it again" in err) == (mode == "online"), err
    assert files(tmp_path) == before and not (tmp_path / "new").exists()


def t_cdf(q, df, n=20000):
    """Student's t CDF by Simpson's rule on its density: the check of the hard-coded quantiles."""
    x = np.linspace(0, q, n + 1)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    return 0.5 + (q / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


def test_t_quantile():
    assert [round(P.t95(d), 3) for d in (1, 2, 4, 9, 30, 60, 120)] == [12.706, 4.303, 2.776, 2.262, 2.042, 2.0, 1.98]
    for df in list(range(1, 41)) + [60, 120, 1000]:
        assert abs(t_cdf(P.t95(df), df) - 0.975) < 1e-5, df
    assert abs(P.t95(10**6) - P.Z95) < 1e-5


def test_interval_arithmetic():
    m, h, n = P.interval([(0.5, None), (0.6, 0.1), (0.7, None)])  # over seeds: the stderrs are not used
    assert n == 3 and m == pytest.approx(0.6) and h == pytest.approx(4.302653 * 0.1 / math.sqrt(3))
    assert P.interval([(0.75, 0.01)]) == (0.75, pytest.approx(0.0196, abs=1e-6), 1)  # one run: 1.96 stderr
    assert P.interval([(0.75, None)]) == (0.75, None, 1) and P.interval([]) is None
    assert P.binomial_stderr(0.9, 101) == pytest.approx(0.03)  # sqrt(0.9 * 0.1 / 100)
    assert P.binomial_stderr(1.0, 1) is None


def write_run(out, name, rows, limit=0):
    run = out / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"limit": limit, "data_dir": str(out / "none")}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "iteration", **r}) + "\n" for r in rows))


def write_eval(path, key, value, stderr):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": {key: value, key + "_stderr": stderr}}))


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError


def test_tables_one_seed(tmp_path, no_plots):
    ev = tmp_path / "evals"
    write_eval(ev / "base-piqa.json", "acc", 0.754, 0.01)
    write_eval(ev / "base-nf4-gsm8k.json", "exact_match_strict", 0.199, 0.011)
    write_run(tmp_path, "rigsa", [{"iter": 1, "test_acc": 0.9, "test_images": 101, "density": 1.0,
                                   "trainable": 1234567}])
    write_run(tmp_path, "random-mask", [{"iter": 1, "test_acc": 0.8}])   # before test_images: its test file, not there
    write_run(tmp_path, "qlora-r1", [{"iter": 1, "test_acc": 0.0, "test_images": 100}])   # a result, though 0
    text = P.tables(tmp_path)
    assert "| 1 | 0.00 ± 0.00 |" in text, text   # not "-" (no result)
    # outputs made by hand are tabulated, but never without a word
    assert "- without a record (by hand, or an older reproduce.py): evals/base-nf4-gsm8k.json, evals/base-piqa.json, " \
           "qlora-r1, random-mask, rigsa\n" in text, text
    assert "| Random mask | - | 80.00 |" in text, text   # no N: the value alone, not an interval for 10,000 images
    assert "| PIQA | 75.40 ± 1.96 | - |" in text and "| GSM8k (5-shot) | - | 19.90 ± 2.16 |" in text
    assert "| RIGSA iteration 1 | 100.00% | 90.00 ± 5.88 |" in text  # sqrt(.9 * .1 / 100) over the run's 101 images
    assert "| RIGSA iteration 1 | 1,234,567 | 90.00 ± 5.88 |" in text
    assert "one seed** (1234)" in text and "√(p(1 - p) / (N - 1))" in text
    assert (tmp_path / "TABLES.md").read_text() == text


def test_tables_with_seeds(tmp_path, no_plots):
    ev = tmp_path / "evals"
    write_eval(ev / "base-piqa.json", "acc", 0.754, 0.01)
    for s, acc, piqa in ((0, 0.5, 0.75), (1, 0.7, 0.77)):
        write_run(tmp_path, f"rigsa-seed{s}", [{"iter": 1, "test_acc": acc, "density": 1.0, "trainable": 10 + 2 * s}])
        write_eval(ev / f"rigsa-seed{s}-iter1-piqa.json", "acc", piqa, 0.01)
    write_run(tmp_path, "qlora-r4-seed1", [{"iter": 1, "test_acc": 0.99, "test_images": 10000, "trainable": 7}])  # seed 0 missing
    text = P.tables(tmp_path)  # without seeds: those found in OUT
    # n = 2: mean +- 12.7062 * s / sqrt(2), s = 0.1414 (MNIST), 0.01414 (PIQA)
    assert "| RIGSA iteration 1 | 100.00% | 60.00 ± 127.06 | 76.00 ± 12.71 | - | - |" in text
    assert "| 4 | 99.00 ± 0.20 (n=1) | - | - | - |" in text  # one seed of two: its stderr, and it says so
    assert "| baseline | - | - | 75.40 ± 1.96 | - | - |" in text
    assert "| RIGSA iteration 1 | 11 | 60.00 ± 127.06 |" in text and "(mean over seeds)" in text
    assert "**n = 2 seeds** (0, 1)" in text and "df = 1 is 12.7062" in text
    assert "(n=" not in P.tables(tmp_path, [0])  # --seeds 0: only seed 0's runs


def test_no_matplotlib_one_line(tmp_path, capsys, no_plots):
    text = P.tables(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -r requirements-plots.txt" in err[0]
    assert "## Figure 4" in text and "![" not in text and not list(tmp_path.glob("*.png"))


def test_figures_written(tmp_path):
    pytest.importorskip("matplotlib")
    write_eval(tmp_path / "evals" / "base-mnist-0shot.json", "acc", 0.1, 0.003)
    for s in (0, 1):
        write_run(tmp_path, f"rigsa-seed{s}", [{"iter": k, "test_acc": 0.9 + k / 100 + s / 200,
                                                "density": 0.8 ** (k - 1), "trainable": 10**9 * 0.8 ** (k - 1)}
                                               for k in range(1, 6)])
    text = P.tables(tmp_path)
    for k in (2, 3, 4):
        assert (tmp_path / f"figure{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![Figure {k}](figure{k}.png)" in text


def test_a_point_of_fewer_seeds_says_so_in_the_figure(tmp_path, monkeypatch):
    # a seed stopped after iteration 4: its table cells say (n=1), but the figure drew the point among the others
    # under "n = 2 seeds ... t interval over seeds", its bar being 1.96 stderr
    pytest.importorskip("matplotlib")
    for s in (0, 1):
        write_run(tmp_path, f"rigsa-seed{s}", [{"iter": k, "test_acc": 0.9 + k / 100 + s / 200, "test_images": 100,
                                                "density": 0.8 ** (k - 1), "trainable": 10**9 * 0.8 ** (k - 1)}
                                               for k in range(1, 6 - s)])
    saved, save = {}, P._save

    def seen(fig, axes, out, name, *a):   # each figure's annotations and caption, as drawn
        axes = list(axes)
        done = save(fig, axes, out, name, *a)
        saved[name] = [t.get_text() for ax in axes for t in ax.texts], " ".join(fig._suptitle.get_text().split())
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())   # the caption within the PNG's edges
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1, (name, box, fig.bbox)
        return done
    monkeypatch.setattr(P, "_save", seen)
    assert "(n=1)" in P.tables(tmp_path)
    notes, title = saved["figure2.png"]
    assert notes.count("n=1") == 1 and "n = 2 seeds" in title and "n=k: a point of k seeds (k = 1: ± 1.96 stderr)" in title
    notes, title = saved["figure4.png"]
    assert notes.count("n=1") == 1 and "n=k" in title and "bars cut" not in title
    shutil.rmtree(tmp_path / "rigsa-seed1")   # two seeds 1 point apart at 95% and 96%: 95.50 +- 6.35 runs past 100%
    write_run(tmp_path, "rigsa-seed1", [{"iter": k, "test_acc": 0.9 + k / 100 + 0.01, "test_images": 100,
                                         "density": 0.8 ** (k - 1), "trainable": 10**9 * 0.8 ** (k - 1)} for k in range(1, 6)])
    assert "95.50 ± 6.35" in P.tables(tmp_path)
    assert "bars cut at 0% or 100% (TABLES.md: whole)" in saved["figure2.png"][1]
    import matplotlib.pyplot as plt   # the longest caption, every clause, on both figure widths: within the PNG
    for size in ((10, 8), (8, 5.5)):  # (it ran past both edges, seeds and cut bars lost, as one line)
        fig, axes = plt.subplots(2, 2, figsize=size, layout="constrained")
        for ax in axes.flat:
            ax.fewer = ax.clipped = True
            ax.axhspan(0, 1)
        seen(fig, axes.flat, tmp_path, "long.png", "Figure 2: RIGSA at each IMP iteration, a random mask and the base "
             "model", list(range(10, 20)))
        plt.close(fig)


def test_plan_on_torchrun(tmp_path):
    cmds = [c for _, c in P.plan(args(tmp_path, [P.DEFAULT_SEED], nproc=2))]
    assert all(c[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] for c in cmds)
    assert any("rigsa.py" in c and "train" in c for c in cmds) and any("evals/run.py" in c for c in cmds)


@pytest.mark.parametrize("content", ['{"metrics": {"acc": 0.5', "[1]", '{"task": "piqa"}', '{"metrics": {"acc": "0.5"}}',
                                     '{"metrics": [1]}', b"\xff\xfe"])
def test_a_damaged_evaluation_is_never_a_blank_cell(tmp_path, content):
    # a cut or edited results file was read as "no result" ("-" in TABLES.md); now one line names it
    p = tmp_path / "base-piqa.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(p))}: .*; delete it, and run reproduce.py again"):
        P.read(p, "acc")
    p.write_text('{"metrics": {"acc": 0.5, "acc_stderr": 0.1}}')
    assert P.read(p, "acc") == (0.5, 0.1) and P.read(p, "acc_norm") is None and P.read(tmp_path / "none", "acc") is None


def test_an_evaluation_of_another_slot_a_changed_one_or_a_non_finite_value_is_refused(tmp_path):
    # --tables-only read each evals JSON by its name alone: HellaSwag's results saved as PIQA's, a 5-shot file over
    # the 0-shot one or a 4-bit base's in the full-precision slot were tabulated and drawn; so were a file changed
    # since its step made it (which the full run refuses) and a NaN (the figure dropped the point without a word)
    p, cmd = tmp_path / "base-piqa.json", ["evals/run.py", "--task", "piqa", "--output", str(tmp_path / "base-piqa.json")]
    slot = {"task": "piqa", "quantize": None, "adapter": None}

    def put(**fields):
        p.write_text(json.dumps({"task": "piqa", "quantize": None, "adapter": None, "num_fewshot": 0,
                                 "metrics": {"acc": 0.5, "acc_stderr": 0.1}, **fields}))
    put()
    assert P.read(p, "acc", slot) == (0.5, 0.1)
    for fields, said in (({"task": "hellaswag"}, "task 'hellaswag', where its name says 'piqa'"),
                         ({"quantize": "nf4"}, "quantize 'nf4', where its name says None"),
                         ({"adapter": "runs/x/rigsa/iter2"}, "adapter 'rigsa/iter2', where its name says None")):
        put(**fields)
        with pytest.raises(ValueError, match=re.escape(f"{p}: holds the results of {said} (another evaluation's file")):
            P.read(p, "acc", slot)
    put(num_fewshot=5)
    with pytest.raises(ValueError, match="num_fewshot 5, where its name says 0"):
        P.read(p, "acc", {**slot, "num_fewshot": 0})
    p.write_text('{"metrics": {"acc": 0.5}}')   # an older file, without the fields: read as it is
    assert P.read(p, "acc", slot) == (0.5, None)
    P.write_record(p, cmd, {}, "m", "done")      # its sha256 recorded: then edited
    p.write_text('{"metrics": {"acc": 0.9}}')
    with pytest.raises(ValueError, match=re.escape(f"{p}: changed after its step made it")):
        P.read(p, "acc", slot)
    for bad in ("NaN", "Infinity"):
        p.write_text('{"metrics": {"acc": %s}}' % bad)
        P.write_record(p, cmd, {}, "m", "done")
        with pytest.raises(ValueError, match="not a finite number"):
            P.read(p, "acc", slot)


@pytest.mark.parametrize("theirs", ["TABLES.md", "figure2.png"])
def test_a_users_tables_or_figures_are_never_replaced(tmp_path, theirs, capsys, monkeypatch):
    # --tables-only --out . in a folder of one's own replaced its TABLES.md and figure2.png; a full run or a dry
    # run says so before its first step, not after days of them
    (tmp_path / theirs).write_text("my own")
    monkeypatch.setattr(P, "run_steps", lambda *a: pytest.fail("a step ran before the check"))
    for more in (["--tables-only"], [], ["--dry-run"]):
        with pytest.raises(SystemExit) as e:
            P.main(more + ["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and f"{tmp_path / theirs}: exists and was not written by reproduce.py" in err, err
    assert [p.name for p in tmp_path.iterdir()] == [theirs] and (tmp_path / theirs).read_text() == "my own"
    with pytest.raises(SystemExit) as e:
        P.parse_args(["--tables-only", "--out", ""])   # abspath("") would be the current folder
    assert e.value.code == 2 and "--out: empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        P.parse_args(["--dry-run", "--model", str(tmp_path), "--revision", "main", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--revision main: the model" in capsys.readouterr().err
    (tmp_path / "f").write_text("a file")
    for out, said in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "is under a file")):
        with pytest.raises(SystemExit) as e:
            P.parse_args(["--dry-run", "--out", str(out)])
        assert e.value.code == 2 and f"--out {out}: {said}, not a folder" in capsys.readouterr().err


def test_figures_that_cannot_be_drawn_again_do_not_stay(tmp_path, monkeypatch, capsys):
    # drawn, then the numbers change where matplotlib is missing: the old figures would show other numbers
    write_eval(tmp_path / "evals" / "base-piqa.json", "acc", 0.754, 0.01)
    pytest.importorskip("matplotlib")
    P.tables(tmp_path)
    assert all(P.ours(tmp_path / n) and (tmp_path / n).exists() for n in P.FIGURES)
    (tmp_path / "solo").mkdir()   # without our TABLES.md beside it, a figure is ours by its mark alone
    shutil.copy(tmp_path / "figure2.png", tmp_path / "solo" / "figure2.png")
    (tmp_path / "solo" / "figure3.png").write_bytes(b"\x89PNG someone else's")
    assert P.ours(tmp_path / "solo" / "figure2.png") and not P.ours(tmp_path / "solo" / "figure3.png")
    (tmp_path / "figure3.png").write_bytes(b"\x89PNG an older version's, no mark")   # beside our TABLES.md: ours
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    P.tables(tmp_path)
    assert not any((tmp_path / n).exists() for n in P.FIGURES)
    assert "plots: removed figure2.png, figure3.png, figure4.png: drawn earlier, and not drawn again" in capsys.readouterr().err


def test_two_reproductions_of_one_out_do_not_run_at_once(tmp_path, capsys, monkeypatch):
    # each would take the other's outputs for its own (TABLES.md mixed another --limit's cells, silently)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, time; from lib import util\nwith util.lock_dir(sys.argv[1], 'reproduce.py'):\n"
            "    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        monkeypatch.setattr(P, "run_steps", lambda *a: pytest.fail("a step ran beside the other reproduce.py"))
        with pytest.raises(SystemExit) as e:
            P.main(["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and f"another reproduce.py (pid {p.pid}) is writing this run" in err, err
        assert sorted(x.name for x in tmp_path.iterdir()) == ["LOCK"]   # nothing written
        write_eval(tmp_path / "evals" / "base-piqa.json", "acc", 0.5, 0.01)   # the first step's output, meanwhile
        P.main(["--tables-only", "--out", str(tmp_path)])   # a look at the tables meanwhile (make plots) is fine
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("case", ["no folder", "empty folder", "a training run", "no run of seed 7"])
def test_tables_only_of_nothing_is_refused(tmp_path, capsys, case):
    # a typo in --out gave exit 0 and a TABLES.md of dashes (written into whatever folder it named)
    out = tmp_path / "out"
    if case != "no folder":
        out.mkdir()
    if case == "a training run":   # a run directory of rigsa.py's own, not a reproduction
        (out / "config.json").write_text("{}")
        (out / "metrics.jsonl").write_text("")
    if case == "no run of seed 7":
        (out / "rigsa-seed0").mkdir()
        (out / "rigsa-seed0" / "config.json").write_text("{}")
    before = files(tmp_path)
    with pytest.raises(SystemExit) as e:
        P.main(["--tables-only", "--out", str(out)] + ["--seeds", "0,7"] * (case == "no run of seed 7"))
    err = capsys.readouterr().err
    want = {"no folder": f"--out {out}: no such folder, so nothing to tabulate",
            "no run of seed 7": f"--seeds: {out} holds no run of seed 7 (its runs are of seed 0)"}.get(
        case, f"--out {out}: holds no output of reproduce.py (no evals/*.json, no run folder such as rigsa/)")
    assert e.value.code == 1 and err.startswith("error: " + want) and len(err.splitlines()) == 1, err
    assert files(tmp_path) == before and out.exists() == (case != "no folder")
    if case == "no run of seed 7":   # the seed it has: tabulated
        P.main(["--tables-only", "--out", str(out), "--seeds", "0"])
        assert (out / "TABLES.md").exists()


@pytest.mark.parametrize("line,ok", [('[1]', False), ('{"event": "iteration", "iter": "1"}', False), ("oops", False),
                                     ('{"event": "iterat', True)])   # the last: cut mid-write, dropped as --resume does
def test_a_damaged_metrics_line_is_one_line_naming_it(tmp_path, line, ok, monkeypatch):
    monkeypatch.setattr(P, "REPO", tmp_path)   # no data/ there, whatever this clone holds
    run = tmp_path / "rigsa"
    write_run(tmp_path, "rigsa", [{"iter": 1, "test_acc": 0.9, "density": 1.0, "trainable": 5}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + ("" if ok else "\n" + '{"event": "step"}\n'))
    (run / "config.json").write_text('{"config": [1]}')   # a config that is not an object: the default test size, no traceback
    if ok:
        assert P.run_metrics(run)[1]["test_acc"] == 0.9 and P.test_images(run) is None   # no N: no interval
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(str(run / 'metrics.jsonl'))}: line 2 is not a metrics record"):
            P.run_metrics(run)


def test_docs_runs_table_names_every_flag(capsys):
    # docs/runs.md's table of reproduce.py's flags is a second copy of --help: it must not lose one
    with pytest.raises(SystemExit):
        P.parse_args(["--help"])
    options = re.split(r"\n(?:options|optional arguments):", capsys.readouterr().out)[1]   # not the description's
    flags = set(re.findall(r"^  (--[a-z][a-z-]+)", options, re.M)) - {"--help"}
    doc = open(os.path.join(os.path.dirname(P.__file__), "docs", "runs.md")).read()
    table = "".join(x for x in doc[doc.index("## `reproduce.py`"):doc.index("## Data files")].splitlines(True)
                    if x.startswith("| `"))   # its rows, not the prose around them
    assert flags and not {f for f in flags if f"`{f}" not in table}, "undocumented in docs/runs.md"


def test_a_record_from_before_the_template_was_fingerprinted_is_the_same_base(tiny_dir, tmp_path):
    # a base with chat_template.jinja: its records hold only commit and fingerprint (not the older one beside)
    d = tmp_path / "t"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    inputs = P.Inputs(P.parse_args(["--model", str(d), "--out", str(tmp_path / "out")]))
    now = inputs.identity()
    assert set(now) == {"commit", "fingerprint"} and inputs.older == M.base_identity(tiny_dir)["fingerprint"]
    hub = {"commit": "a" * 40}
    rec = lambda base: {"inputs": {"base model": base}, "model": "t"}
    assert P.difference(rec({**hub, "fingerprint": inputs.older}), {"base model": {**hub, **{"fingerprint": "f"}}},
                        "t", inputs.older) is None   # one hub commit: the template too was this one
    for base in ({"commit": None, "fingerprint": inputs.older}, {**hub, "fingerprint": "0" * 16}):
        assert P.difference(rec(base), {"base model": {**hub, "fingerprint": "f"}}, "t", inputs.older).startswith(
            "base model: ")
    # the hub's latest commit moved on since (a README edit is enough): the one line names the --revision that
    # takes the commit the outputs were made from, where --rerun-changed would redo them all
    assert P.difference(rec({**hub, "fingerprint": "f"}), {"base model": {"commit": "b" * 40, "fingerprint": "f"}},
                        "t", inputs.older) == (f"base model: t (commit {'a' * 40}, fingerprint f) then, t (commit "
                                               f"{'b' * 40}, fingerprint f) now; --revision {'a' * 40} takes the "
                                               f"commit they were made from")
    assert "--revision" not in P.difference(rec({**hub, "fingerprint": "f"}), {"base model": {
        "commit": "b" * 40, "fingerprint": "f"}}, "u", inputs.older)   # another model: not its revision
    assert "--revision" not in P.difference(rec({**hub, "fingerprint": "0" * 16}), {"base model": {
        **hub, "fingerprint": "f"}}, "t", inputs.older)   # one commit, other bytes: no revision takes them back


def test_an_older_runs_test_count_is_read_only_from_its_own_file(tmp_path, monkeypatch):
    # a run from before test_images was recorded: its data folder now, if it holds the file the run recorded
    monkeypatch.setattr(P, "REPO", tmp_path)
    d = mnist.write_synthetic_mnist(tmp_path / "d" / "mnist", n_train=60, n_test=4, size=8)
    sha = util.file_hash(d / "t10k-labels-idx1-ubyte.gz", "sha256")
    run = tmp_path / "run"
    run.mkdir()
    for data, want in (({"t10k-labels-idx1-ubyte.gz": sha}, 4), ({}, 4), ({"t10k-labels-idx1-ubyte.gz": "0" * 64}, None)):
        (run / "config.json").write_text(json.dumps({"config": {"data_dir": "d", "limit": 0}, "data": data}))
        assert P.test_images(run) == want, data   # another file there now: no interval, not one for its N
    for cfg, want in (({"limit": 2}, 2), ({"limit": 9}, 4), ({"eval_max": 3}, 3), ({"eval_max": 0}, 4)):
        # its --limit (eval_max: the flag's name before its rename) capped the images it was tested on
        (run / "config.json").write_text(json.dumps({"config": {"data_dir": "d", **cfg}, "data": {}}))
        assert P.test_images(run) == want, cfg
    assert P.test_images(run, {"test_images": 8}) == 8


def test_a_kept_trainings_settings_count_only_where_they_act(tmp_path):
    # config_drift: a setting its method does not use, or whose needs fail, or renamed since, is no difference
    def drift(method, **saved):
        (tmp_path / "config.json").write_text(json.dumps({"config": {"method": method, **saved}}))
        return P.config_drift(tmp_path, [".venv/bin/python", "rigsa.py", "train", "--method", method, "--steps", "2"])
    assert drift("qlora", keep=0.5) is None and drift("rigsa", rank=4) is None   # another method's setting
    assert drift("rigsa", keep=0.5) == ("--keep (not typed by this command): 0.5 in its config.json, 0.8 in this "
                                        "code's rigsa.Config")
    assert drift("rigsa", init_std=0.1) is None   # --init-std acts only with --init normal
    assert drift("rigsa", init="normal", init_std=0.1).startswith("--init (not typed")
    assert drift("rigsa", steps=9, moments="8bit", threads=1) is None   # typed, or how it runs
    assert drift("rigsa", eval_max=0, download=True) is None   # renamed since: --limit 0, not --offline
    assert drift("rigsa", eval_max=7).startswith("--limit (not typed by this command): 7 in")
