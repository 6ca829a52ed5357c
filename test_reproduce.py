"""Tests for reproduce.py: the plan of commands and the tables it writes from their outputs."""
import argparse
import json

import reproduce


def test_reproduce_plan_and_tables(tmp_path):
    a = argparse.Namespace(model="M", out=str(tmp_path), limit=3, steps=2, data_dir="", no_verify=False)
    steps = reproduce.plan(a)
    # 2 x (2 MNIST + 3 source) base evals; rigsa 1 + 5x3; random mask 1 + 3; 4 QLoRA ranks x (1 + 3)
    assert len(steps) == 10 + 16 + 4 + 16
    cmds = [" ".join(c) for _, c in steps]
    assert any("--method random-mask --mask-like " + str(tmp_path / "rigsa" / "iter5") in c for c in cmds)
    assert sum("--method qlora --rank" in c for c in cmds) == 4
    assert all("--limit 3" in c for c in cmds if "evals/run.py" in c)
    ev = tmp_path / "evals"
    ev.mkdir()
    (ev / "base-piqa.json").write_text(json.dumps({"metrics": {"acc": 0.754}}))
    (ev / "base-nf4-gsm8k.json").write_text(json.dumps({"metrics": {"exact_match_strict": 0.199}}))
    (tmp_path / "rigsa").mkdir()
    (tmp_path / "rigsa" / "metrics.jsonl").write_text(
        json.dumps({"event": "iteration", "iter": 1, "test_acc": 0.9905, "density": 1.0, "trainable": 10}) + "\n")
    text = reproduce.tables(tmp_path)
    assert "| PIQA | 75.40 | - |" in text and "| GSM8k (5-shot) | - | 19.90 |" in text
    assert "| RIGSA iteration 1 | 100.00% | 99.05 |" in text
    assert (tmp_path / "TABLES.md").read_text() == text
