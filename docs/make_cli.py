"""docs/cli.md's command reference, written from each command's own --help, so that it cannot drift.

    python docs/make_cli.py            # rewrite docs/cli.md below its marker line (the text above it is kept)
    python docs/make_cli.py --check    # exit 1 with one line if docs/cli.md differs from what --help prints now
"""
import argparse
import difflib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
COMMANDS = ["rigsa.py train", "rigsa.py merge", "rigsa.py show", "rigsa.py demo", "evals/run.py", "reproduce.py",
            "model.py"]
MARK = "<!-- Everything below is written by docs/make_cli.py from each command's --help: edit the commands, not this. -->"
HEAD = "# Command-line reference\n\n"  # used only when docs/cli.md does not exist yet


def helps():
    """{command: its --help text}, at a fixed width and without colour, with the interpreter running this script."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONUTF8": "1", "PYTHON_COLORS": "0", "NO_COLOR": "1"}
    procs = {c: subprocess.Popen([sys.executable, *c.split(), "--help"], cwd=ROOT, env=env, text=True,
                                 encoding="utf-8", stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in COMMANDS}
    out = {}
    for c, p in procs.items():  # started together: each pays torch's import, and they overlap
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"error: python {c} --help: exit {p.returncode} ({last}); fix the command first")
        out[c] = stdout.rstrip()
    return out


def render(head):
    body = "".join(f"\n## `python {c}`\n\n```text\n{text}\n```\n" for c, text in helps().items())
    return f"{head}{MARK}\n{body}"


def main(argv=None):
    ap = argparse.ArgumentParser(description="docs/cli.md's command reference, from each command's own --help")
    ap.add_argument("--check", action="store_true", help="exit 1 with one line if docs/cli.md differs from --help")
    check = ap.parse_args(argv).check   # a typo or --help is argparse's, never a rewrite
    have = CLI_MD.read_text(encoding="utf-8") if CLI_MD.exists() else None
    head = have.split(MARK)[0] if have and MARK in have else HEAD
    want = render(head)
    if check:
        if have == want:
            return 0
        if have is None:
            print(f"error: {CLI_MD.relative_to(ROOT)}: missing; run python docs/make_cli.py", file=sys.stderr)
            return 1
        a, b = have.splitlines(), want.splitlines()
        changed = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
        if not changed:  # the same lines, other line endings or a missing final newline
            changed = [("replace", len(a) - 1, len(a), len(b) - 1, len(b))]
        n = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in changed)
        i, j = changed[0][1], changed[0][3]  # the first difference: line i of the file, line j of --help
        now = b[j].strip()[:60] if j < len(b) else "<end>"
        print(f"error: {CLI_MD.relative_to(ROOT)}: {n} line(s) differ from --help, the first at line {i + 1} "
              f"(--help now: {now!r}); run python docs/make_cli.py", file=sys.stderr)
        return 1
    tmp = CLI_MD.with_suffix(".md.tmp")
    try:
        tmp.write_text(want, encoding="utf-8")
        tmp.replace(CLI_MD)
    finally:
        tmp.unlink(missing_ok=True)  # after the rename there is none; after a failed write, no half file stays
    print(f"wrote {CLI_MD.relative_to(ROOT)} ({len(want.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
