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
    for m in ("util", "flags", "interrupts"):   # the chores: no project module at all
        assert not imports(path(m)), m
    assert set(imports(path("model"))) <= {"util", "interrupts"}   # no adapters, no tasks
    rigsa = imports(path("rigsa"))
    assert "evals" not in rigsa and rigsa.get("cli") == ["main"], rigsa   # the commands only, from main


def test_the_top_level_is_the_architecture():
    # the method, its commands, the model, the 4-bit baseline, the paper's runs, the tests' fixtures;
    # the machinery is in lib/ (README's code map)
    assert TOP == {"rigsa", "cli", "model", "qlora", "reproduce", "conftest"}, TOP


def test_the_benches_still_load(tmp_path):
    # the benches sit on top of everything and no other test runs them: each script's --help, run as
    # `python bench/x.py --help` from another folder, so that a moved module, or a script that lost
    # its path set-up, breaks this test rather than `make bench` (two at a time: ~1 s of imports each)
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    scripts = sorted(os.path.join(REPO, "bench", f) for f in os.listdir(os.path.join(REPO, "bench"))
                     if f.endswith(".py") and f != "dense_layer.py")

    def run(script):
        p = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return None if p.returncode == 0 and "usage:" in p.stdout else f"{script}: exit {p.returncode}: {p.stderr[-500:]}"
    with ThreadPoolExecutor(2) as pool:
        bad = [r for r in pool.map(run, scripts) if r]
    assert not bad, "\n".join(bad)
    for sh in ("gpu.sh", "device.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(REPO, "bench", sh)]).returncode == 0, sh
