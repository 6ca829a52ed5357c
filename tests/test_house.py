"""The house's arrows, read from the sources: the machinery in lib/ (and model.py, qlora.py) never
imports what sits on top of it, model.py knows nothing of adapters or tasks, the training path never
imports evals/, and the top level holds the architecture only."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, above tests/
LIB = {f[:-3] for f in os.listdir(os.path.join(REPO, "lib")) if f.endswith(".py") and f != "__init__.py"}
TOP = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py") and not f.startswith("test_")}
OURS = TOP | LIB | {"evals"}
ON_TOP = {"rigsa", "cli", "reproduce", "evals", "conftest"}          # what sits on top of the method
BELOW = LIB | {"model", "qlora"}


def path(m):
    return os.path.join(REPO, "lib", m + ".py") if m in LIB else os.path.join(REPO, m + ".py")


def imports(path):
    """{project module: [the functions it is imported in ('' at the top level)]} of one source file;
    `from lib import x` counts as importing x."""
    found = {}

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.removeprefix("lib.") for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level:
                names = ([a.name for a in child.names] if child.module == "lib" else
                         [(child.module or "").removeprefix("lib.")])
            for n in names:
                if n.split(".")[0] in OURS:
                    found.setdefault(n.split(".")[0], []).append(where)
            visit(child, where)
    visit(ast.parse(open(path, encoding="utf-8").read()), "")
    return found


def test_the_arrows_point_one_way():
    assert {"util", "flags", "interrupts", "tiny", "mnist", "memory", "adapter_files", "rundir", "sparse"} <= LIB, LIB
    for m in sorted(BELOW):
        up = set(imports(path(m))) & ON_TOP
        assert not up, f"{m}.py imports {sorted(up)}, which sit on top of it"
    for m in ("flags", "interrupts"):   # the chores: no project module at all
        assert not imports(path(m)), m
    assert imports(path("util")) == {"interrupts": [""]}   # but util may read the launcher's counts as interrupts does
    assert set(imports(path("model"))) <= {"util", "interrupts"}   # no adapters, no tasks
    rigsa = imports(path("rigsa"))
    assert "evals" not in rigsa and rigsa.get("cli") == ["main"], rigsa   # the commands only, from main


def test_the_top_level_is_the_architecture():
    # the method, its commands, the model, the 4-bit baseline, the paper's runs, the tests' fixtures;
    # the machinery is in lib/ (README's code map)
    assert TOP == {"rigsa", "cli", "model", "qlora", "reproduce", "conftest"}, TOP


BENCH_RUNNER = """import argparse, contextlib, io, json, os, runpy, signal, sys, traceback
repo, cases = os.path.realpath(sys.argv[1]), json.loads(sys.argv[2])
start, env, stdout = sys.path[1:], dict(os.environ), sys.stdout   # sys.path[0]: -c's own ''
below = [os.path.realpath(p) + os.sep for p in start if p]        # site-packages and the like, wherever they are

def ours(m):   # a module read from the repository's files (not from an interpreter's folder inside it)
    own = getattr(m, "__dict__", {})   # not getattr(m, ...): some of torch's modules make up any attribute
    files = [os.path.realpath(f) for f in [own.get("__file__"), *(own.get("__path__") or [])] if isinstance(f, str)]
    return any(f.startswith(repo + os.sep) and not f.startswith(tuple(below)) for f in files)

class Worked(BaseException):
    pass

def late(*_):
    raise Worked()

signal.signal(signal.SIGALRM, late)
parse = argparse.ArgumentParser.parse_args

def timed_parse(self, *args, **kw):   # the flags read: the work may start now
    got = parse(self, *args, **kw)
    signal.setitimer(signal.ITIMER_REAL, 20)
    return got
argparse.ArgumentParser.parse_args = timed_parse

for script, argv in cases:
    for name in [n for n, m in list(sys.modules.items()) if ours(m)]:
        del sys.modules[name]
    sys.path[:] = [os.path.dirname(script), *start]
    sys.argv[:] = [script, *argv]
    os.environ.clear()
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    code = 0   # the exit status `python bench/x.py ARGV` would have
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=err)   # sys.exit("error: ...") says it on stderr, exit 1
    except Worked:
        code = "still working 20 s after its flags were read"
    except BaseException:
        code = 1
        err.write(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps([script, code, out.getvalue(), err.getvalue()]), file=stdout)
"""


def run_benches(cases, cwd):
    """Each bench script of cases [(path, argv)] as `python bench/x.py ARGV` runs it, all in one interpreter
    (torch's import, paid once, was most of 16 processes' time): before each script its sys.path is what
    `python bench/x.py` starts with (the script's folder, then the interpreter's own: no repository), the
    repository's modules are forgotten, so each is imported from its file again, and os.environ is the one
    it was given (other process state an import leaves, such as a signal handler or torch's thread count,
    carries over: harmless here). Once parse_args returns, a script has 20 s to end (its own checks: the
    device, the data folder), else it is stopped. -> [(script, exit status, stdout, stderr)]."""
    import json
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", BENCH_RUNNER, REPO, json.dumps(cases)], cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ran = [json.loads(line) for line in p.stdout.splitlines()]
    assert [s for s, *_ in ran] == [s for s, _ in cases], p.stdout[-3000:]
    return ran


def test_the_benches_still_load(tmp_path):
    # the benches sit on top of everything and no other test runs them: each script's --help, run as
    # `python bench/x.py --help` would from another folder (run_benches), so that a moved module, or a
    # script that lost its path set-up, breaks this test rather than `make bench`
    import subprocess
    scripts = sorted(os.path.join(REPO, "bench", f) for f in os.listdir(os.path.join(REPO, "bench"))
                     if f.endswith(".py") and f != "dense_layer.py")
    ran = run_benches([(s, ["--help"]) for s in scripts], tmp_path)
    bad = [f"{s}: exit {code}: {err[-500:]}" for s, code, out, err in ran if not (code == 0 and "usage:" in out)]
    assert not bad, "\n".join(bad)
    for sh in ("gpu.sh", "device.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(REPO, "bench", sh)]).returncode == 0, sh


def test_the_device_script_refuses_missing_data_before_it_writes_anything(tmp_path):
    # make device-check without data/: one line, and no empty log folder left behind (it was made first)
    import subprocess
    import sys
    env = {**os.environ, "SMALL": "1", "DATA": str(tmp_path / "none"), "LOG": str(tmp_path / "log"), "PY": sys.executable}
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "device.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 1 and p.stdout.splitlines()[-1] == (
        f"error: {tmp_path}/none/piqa: not there; the evals part needs PIQA's and GSM8k's files (DATA=folder)"), p.stdout
    assert not (tmp_path / "log").exists()


def test_make_eval_takes_the_adapters_own_base_and_a_bad_nproc_is_one_line():
    # make's variables as a user types them (make -n: the commands, not run; -o: the environment taken as made)
    import subprocess

    def make(*args):
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MODEL", "ITERS",
                                                                  "TASK", "ADAPTER", "OUT", "PAPER", "NPROC", "ARGS")}
        r = subprocess.run(["make", "-s", "-n", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=env)   # as typed, not as this shell has it
        return r.returncode, " ".join(r.stdout.replace("\\\n", " ").split()), r.stderr.strip()
    assert make("eval", "ADAPTER=runs/x/iter2")[1] == ".venv/bin/python evals/run.py --task 'all' --adapter 'runs/x/iter2'"
    assert make("eval", "ADAPTER=runs/x/iter2", "MODEL=m")[1] == \
        ".venv/bin/python evals/run.py --task 'all' --model 'm' --adapter 'runs/x/iter2'"
    assert make("eval")[1] == ".venv/bin/python evals/run.py --task 'all' --model 'HuggingFaceTB/SmolLM2-1.7B-Instruct'"
    assert make("train", "OUT=a b", "ARGS=--resume --no-verify")[1] == (   # a space stays in its value; ARGS are flags
        ".venv/bin/python rigsa.py train --model 'HuggingFaceTB/SmolLM2-1.7B-Instruct' --iters '5' --out 'a b' --resume "
        "--no-verify")
    assert make("train", "OUT=bob's run", "MODEL=m")[1] == (   # a quote too (it ended the quoted value: a shell error)
        ".venv/bin/python rigsa.py train --model 'm' --iters '5' --out 'bob'\\''s run'")
    assert make("train", "MODEL=m", "q=1")[1].startswith(".venv/bin/python rigsa.py train --model 'm'")   # q is make's
    assert make("train", "NPROC=2")[1].startswith(".venv/bin/python -m torch.distributed.run --standalone "
                                                  "--nproc-per-node=2 rigsa.py train")
    assert make("demo")[1] == ".venv/bin/python rigsa.py demo" and make("demo", "OUT=d")[1].endswith("demo --out 'd'")
    code, out, err = make("chat", "ADAPTER=runs/x/iter2")   # the adapter said, not dropped
    assert code != 0 and err.endswith("ADAPTER=runs/x/iter2: make chat talks to MODEL alone; merge the adapter first "
                                      "(rigsa.py merge --adapter runs/x/iter2 --out DIR), then make chat MODEL=DIR.  Stop.")
    for bad in ("0", "abc", ""):
        code, out, err = make("eval", f"NPROC={bad}")
        assert code != 0 and not out and err.endswith(f"NPROC={bad}: the processes per machine, a whole number from 1 "
                                                      f"(1: no torchrun).  Stop."), err


BAD_BENCH_FLAGS = [   # (script, argv, exit status, what the last line names); {w}: an empty folder
    ("bench_memory.py", ["--part", "9"], 2, "--part: '9'"),                  # ran nothing, exit 0
    ("bench_memory.py", ["--tokens", "-1"], 2, "--tokens: -1 is out of range"),
    ("bench_precision.py", ["--part", "step, dx,bogus"], 2, "--part: 'bogus'"),
    ("bench_model.py", ["--batches", "0,abc"], 2, "--batches: 0 is out of range"),
    ("bench_model.py", ["--device", "bogus"], 1, "--device 'bogus'"),        # torch's traceback
    ("bench_train.py", ["--steps", "-1"], 2, "--steps: -1 is out of range"),  # three memory runs first
    ("bench_layer.py", ["--density", "1.5"], 2, "--density: 1.5 is out of range"),
    ("bench_qlora.py", ["--rank", "0"], 2, "--rank: 0 is out of range"),
    ("attention_by_hand.py", ["--tokens", "-1"], 2, "--tokens: -1 is out of range"),
    ("bench_distributed.py", ["--steps", "0"], 2, "argument --steps: 0"),    # blamed --log-every
    ("bench_generate.py", ["--data-dir", "{w}/none"], 1, "missing data files"),   # MissingData's traceback
    ("bench_evals.py", ["--tasks", "piqa,mnist"], 2, "--tasks: 'mnist'"),
    ("bench_checkpoint.py", ["--device", "gpu"], 1, "--device 'gpu'"),
    ("bench_attention.py", ["--rows", "0"], 2, "--rows: 0 is out of range"),
    ("halt_resume.py", ["--device", "cpu", "--batch-size", "0"], 2, "--batch-size: 0 is out of range"),
    ("check_lm_eval.py", ["--limit", "0"], 2, "--limit: 0 is out of range"),
]


def test_a_bench_refuses_a_bad_flag_in_one_line_before_any_work(tmp_path):
    # each bench script as `python bench/x.py ARGV` runs it, all in one interpreter (run_benches). The work's
    # start is caught, not waited for: once parse_args returns, a script has 20 s to refuse (its own checks:
    # the device, the data folder), else it is stopped and fails here
    cases = [(os.path.join(REPO, "bench", s), [x.format(w=tmp_path) for x in argv]) for s, argv, *_ in BAD_BENCH_FLAGS]
    ran = run_benches(cases, tmp_path)
    bad = []
    for (name, argv, want, says), (_, code, out, err) in zip(BAD_BENCH_FLAGS, ran):
        lines = err.strip().splitlines()
        # sys.exit("error: ..."): that line alone; argparse: its usage, then the line
        one = lines[-1:] == lines if want == 1 else lines[:1] and lines[0].startswith("usage:")
        if code != want or out or not one or "error: " not in (lines or [""])[-1] or says not in lines[-1]:
            bad.append(f"{name} {' '.join(argv)}: exit {code} (wanted {want}, one line naming {says!r}), "
                       f"stdout {out[-300:]!r}, stderr {err[-600:]!r}")
    assert not bad, "\n".join(bad)
