"""
One command from a fresh clone to the paper's tables (make paper).

    python reproduce.py                      # everything, on SmolLM2-1.7B-Instruct (days on one GPU)
    python reproduce.py --dry-run            # the commands it would run, in order
    python reproduce.py --limit 50 --steps 20 --out runs/paper-smoke   # a quick end-to-end look

It only chains the two command lines, `rigsa.py train` and `evals/run.py`, and reads what they
write, so every number in the tables can be re-made by hand with the command printed beside it.
A step whose output already exists is skipped: an interrupted reproduction continues where it
stopped (a half-trained run continues with `rigsa.py train --resume`).

Tables written to OUT/TABLES.md:
  Table 2   Textual MNIST 0-/5-shot accuracy, full precision and 4-bit (paper §4.2)
  Table 3   PIQA, HellaSwag, GSM8k 5-shot, full precision and 4-bit (paper §4.3)
  Figure 2  RIGSA at each IMP iteration, and the random mask of the last iteration's density (§5.1-5.2)
  Figure 3  QLoRA at ranks 1/4/8/16 on the 4-bit base (§5.3, Table 4)
  Figure 4  Textual MNIST test accuracy against trainable parameters (§5.3)
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import rigsa
import util

REPO = Path(__file__).resolve().parent
SOURCE_TASKS = ["piqa", "hellaswag", "gsm8k"]      # paper §4.3
QLORA_RANKS = list(rigsa.TABLE4["ranks"])           # paper Table 4
IMP_ITERS = rigsa.Config.iters                      # paper §4.4


def plan(a):
    """[(output file, command)] in the order they must run."""
    py, out = [os.path.relpath(sys.executable, REPO)], Path(a.out)  # commands run in the repo root
    ev = py + ["evals/run.py", "--model", a.model] + (["--limit", str(a.limit)] if a.limit else []) \
        + (["--data-dir", a.data_dir] if a.data_dir else []) + (["--no-verify"] if a.no_verify else [])
    tr = py + ["rigsa.py", "train", "--model", a.model] + (["--steps", str(a.steps)] if a.steps else []) \
        + (["--limit", str(a.limit)] if a.limit else []) + (["--data-dir", a.data_dir] if a.data_dir else []) \
        + (["--no-verify"] if a.no_verify else [])
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
    runs = [("rigsa", ["--method", "rigsa", "--iters", str(IMP_ITERS)], IMP_ITERS),
            ("random-mask", ["--method", "random-mask", "--mask-like", str(out / "rigsa" / f"iter{IMP_ITERS}")], 1)]
    runs += [(f"qlora-r{r}", ["--method", "qlora", "--rank", str(r)], 1) for r in QLORA_RANKS]
    for name, args, iters in runs:  # Figures 2 and 3: train, then evaluate every iteration's adapter
        run = out / name
        steps.append((run / f"iter{iters}.safetensors",
                       tr + ["--out", str(run)] + args + (["--resume"] if (run / "config.json").exists() else [])))
        for k in range(1, iters + 1):
            for t in SOURCE_TASKS:
                f = out / "evals" / f"{name}-iter{k}-{t}.json"
                steps.append((f, ev + ["--task", t, "--adapter", str(run / f"iter{k}"), "--output", str(f)]))
    return steps


def read(path, key):
    try:
        return json.loads(Path(path).read_text())["metrics"][key]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def run_metrics(run):
    """Per-iteration test accuracy, density and trainable count from a run's metrics.jsonl."""
    rows = {}
    p = Path(run) / "metrics.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "iteration":
                rows[r["iter"]] = r
    return rows


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def tables(out):
    out, ev = Path(out), Path(out) / "evals"
    src_metric = {"piqa": "acc", "hellaswag": "acc", "gsm8k": "exact_match_strict"}
    L = ["# The paper's tables, reproduced", "",
         "Values in %. PIQA and HellaSwag: `acc` (lm-eval's); GSM8k: strict-match exact match (flexible-extract in the",
         "evals JSON files). Each number comes from the JSON file named after its row in `evals/`.", "",
         "## Table 2: Textual MNIST test accuracy of the base model (paper §4.2)", "",
         "| Variant | 0-shot | 5-shot |", "|---|---:|---:|"]
    for tag, name in (("base", "Full Precision"), ("base-nf4", "Quantized (4-bit)")):
        L.append(f"| {name} | {pct(read(ev / f'{tag}-mnist-0shot.json', 'acc'))} | "
                 f"{pct(read(ev / f'{tag}-mnist-5shot.json', 'acc'))} |")
    L += ["", "## Table 3: source tasks of the base model (paper §4.3)", "",
          "| Benchmark | Full Precision | Quantized (4-bit) |", "|---|---:|---:|"]
    for t, name in zip(SOURCE_TASKS, ["PIQA", "HellaSwag", "GSM8k (5-shot)"]):
        L.append(f"| {name} | {pct(read(ev / f'base-{t}.json', src_metric[t]))} | "
                 f"{pct(read(ev / f'base-nf4-{t}.json', src_metric[t]))} |")
    L += ["", "## Figure 2: RIGSA at each IMP iteration, and the random mask (paper §5.1-5.2)", "",
          "| Adapter | density | Textual MNIST | PIQA | HellaSwag | GSM8k |", "|---|---:|---:|---:|---:|---:|"]
    L.append("| baseline | - | " + pct(read(ev / "base-mnist-0shot.json", "acc")) + " | " +
             " | ".join(pct(read(ev / f"base-{t}.json", src_metric[t])) for t in SOURCE_TASKS) + " |")
    fig4 = []
    for name, label in (("rigsa", "RIGSA iteration {k}"), ("random-mask", "Random mask")):
        for k, r in sorted(run_metrics(out / name).items()):
            d = r.get("density")
            L.append(f"| {label.format(k=k)} | {'-' if d is None else f'{100 * d:.2f}%'} | {pct(r.get('test_acc'))} | " +
                     " | ".join(pct(read(ev / f"{name}-iter{k}-{t}.json", src_metric[t])) for t in SOURCE_TASKS) + " |")
            fig4.append((label.format(k=k), r.get("trainable"), r.get("test_acc")))
    L += ["", "## Figure 3: QLoRA on the 4-bit base (paper §5.3, Table 4)", "",
          "| Rank | Textual MNIST | PIQA | HellaSwag | GSM8k |", "|---:|---:|---:|---:|---:|"]
    L.append("| 4-bit baseline | " + pct(read(ev / "base-nf4-mnist-0shot.json", "acc")) + " | " +
             " | ".join(pct(read(ev / f"base-nf4-{t}.json", src_metric[t])) for t in SOURCE_TASKS) + " |")
    for r in QLORA_RANKS:
        m = run_metrics(out / f"qlora-r{r}").get(1, {})
        L.append(f"| {r} | {pct(m.get('test_acc'))} | " +
                 " | ".join(pct(read(ev / f"qlora-r{r}-iter1-{t}.json", src_metric[t])) for t in SOURCE_TASKS) + " |")
        fig4.append((f"QLoRA rank {r}", m.get("trainable"), m.get("test_acc")))
    L += ["", "## Figure 4: Textual MNIST test accuracy against trainable parameters (paper §5.3)", "",
          "| Adapter | trainable parameters | test accuracy |", "|---|---:|---:|"]
    L += [f"| {n} | {'-' if c is None else f'{c:,}'} | {pct(a)} |" for n, c, a in fig4]
    text = "\n".join(L) + "\n"
    util.atomic_write(out / "TABLES.md", lambda tmp: Path(tmp).write_text(text))
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-1.7B-Instruct", help="base model [default: the paper's]")
    ap.add_argument("--out", default="runs/paper", help="where runs, evals/*.json and TABLES.md go [default: runs/paper]")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N documents/images (0 = all) [default: 0]")
    ap.add_argument("--steps", type=int, default=0, help="cap optimizer steps per training iteration (0 = the paper's epochs)")
    ap.add_argument("--data-dir", default="", help="data root holding <task>/ folders, mnist/ included, for training and "
                    "evaluation [default: data]")
    ap.add_argument("--no-verify", action="store_true", help="skip the evals' data checksums (stand-in data files)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--tables-only", action="store_true", help="only (re)write TABLES.md from what exists")
    a = ap.parse_args(argv)
    if not a.tables_only:
        steps = plan(a)
        for i, (target, cmd) in enumerate(steps, 1):
            if target.exists():
                continue
            print(f"[{i}/{len(steps)}] {' '.join(cmd)}", flush=True)
            if a.dry_run:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(cmd, cwd=REPO)
            if r.returncode != 0:
                sys.exit(f"error: step {i} failed (exit {r.returncode}); fix it and run reproduce.py again to continue")
    if not a.dry_run:
        print(tables(a.out))


if __name__ == "__main__":
    main()
