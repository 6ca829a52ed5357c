"""The house's arrows, read from the sources: the modules rigsa.py is made of never import it (nor
anything that sits on top of it), model.py knows nothing of adapters or tasks, and the training
path never imports evals/."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, above tests/
OURS = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py") and not f.startswith("test_")} | {"evals"}
ON_TOP = {"rigsa", "cli", "reproduce", "evals", "conftest"}          # what sits on top of the method
BELOW = {"util", "flags", "interrupts", "model", "tiny", "mnist", "qlora", "memory", "adapter_files", "rundir",
         "sparse"}


def imports(path):
    """{project module: [the functions it is imported in ('' at the top level)]} of one source file."""
    found = {}

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                     [child.module or ""] if isinstance(child, ast.ImportFrom) and not child.level else [])
            for n in names:
                if n.split(".")[0] in OURS:
                    found.setdefault(n.split(".")[0], []).append(where)
            visit(child, where)
    visit(ast.parse(open(path, encoding="utf-8").read()), "")
    return found


def test_the_arrows_point_one_way():
    assert BELOW <= OURS, BELOW - OURS   # a module renamed or gone: this test names what to update
    for m in sorted(BELOW):
        up = set(imports(os.path.join(REPO, m + ".py"))) & ON_TOP
        assert not up, f"{m}.py imports {sorted(up)}, which sit on top of it"
    for m in ("util", "flags", "interrupts"):   # the chores: no project module at all
        assert not imports(os.path.join(REPO, m + ".py")), m
    assert set(imports(os.path.join(REPO, "model.py"))) <= {"util", "interrupts"}   # no adapters, no tasks
    rigsa = imports(os.path.join(REPO, "rigsa.py"))
    assert "evals" not in rigsa and rigsa.get("cli") == ["main"], rigsa   # the commands only, from main

