"""Tests for reproduce.py: the plan of commands, the 95% intervals, and the tables and figures it
writes from the steps' outputs (no training: the outputs are written by hand)."""
import argparse
import json
import math
import sys

import numpy as np
import pytest

import reproduce as P


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
    steps = P.plan(args(tmp_path, [0, 1], offline=True, no_verify=True, data_dir="D"))
    assert len(steps) == 10 + 2 * 36  # the base model's evaluations once, every training per seed
    cmds = [" ".join(c) for _, c in steps]
    trains = [c for c in cmds if "rigsa.py train" in c]
    assert len(trains) == 2 * 6 and sum("--seed 1 " in c for c in trains) == 6
    # each seed's random mask copies that seed's RIGSA densities, and runs after it
    mask1 = next(i for i, c in enumerate(cmds) if f"--out {tmp_path / 'random-mask-seed1'} " in c)
    assert f"--mask-like {tmp_path / 'rigsa-seed1' / 'iter5'}" in cmds[mask1]
    assert cmds.index(next(c for c in trains if f"--out {tmp_path / 'rigsa-seed1'} " in c)) < mask1
    assert tmp_path / "evals" / "qlora-r4-seed0-iter1-gsm8k.json" in [f for f, _ in steps]
    assert all("--offline" in c and "--no-verify" in c and "--data-dir D" in c for c in cmds)
    assert not any("--seed" in c for c in cmds if "evals/run.py" in c)


def test_main_skips_existing_outputs_and_resumes(tmp_path, capsys):
    ev = tmp_path / "evals"
    ev.mkdir()
    (ev / "base-piqa.json").write_text("{}")
    (tmp_path / "rigsa-seed0").mkdir()
    (tmp_path / "rigsa-seed0" / "config.json").write_text("{}")  # a half-trained run
    P.main(["--model", "M", "--out", str(tmp_path), "--seeds", "0,1", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 82 - 1 and not any("base-piqa.json" in x for x in lines)
    assert sum("--resume" in x for x in lines) == 1 and f"--out {tmp_path / 'rigsa-seed0'} " in \
        next(x for x in lines if "--resume" in x)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        P.main(["--seeds", "0,0", "--dry-run"])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err


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
    assert n == 3 and m == pytest.approx(0.6) and h == pytest.approx(4.3027 * 0.1 / math.sqrt(3))
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
    write_run(tmp_path, "rigsa", [{"iter": 1, "test_acc": 0.9, "density": 1.0, "trainable": 1234567}], limit=101)
    text = P.tables(tmp_path)
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
    write_run(tmp_path, "qlora-r4-seed1", [{"iter": 1, "test_acc": 0.99, "trainable": 7}])  # seed 0 missing
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


def test_plan_on_torchrun(tmp_path):
    cmds = [c for _, c in P.plan(args(tmp_path, [P.DEFAULT_SEED], nproc=2))]
    assert all(c[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] for c in cmds)
    assert any("rigsa.py" in c and "train" in c for c in cmds) and any("evals/run.py" in c for c in cmds)
