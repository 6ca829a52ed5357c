"""Tests for util.py: atomic writes, the progress bar in a log and on/off, the device, malloc settings."""
import os
import platform

import pytest
import torch

import util


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    p = tmp_path / "f.json"
    util.write_json(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        util.atomic_write(p, broken)
    assert p.read_text() == '{\n  "a": 1\n}\n' and os.listdir(tmp_path) == ["f.json"]


def test_progress_bar_in_a_log_one_line_per_interval(monkeypatch, capsys):
    # stderr captured = not a terminal: no line at the start, one per 30 s, one at the close; a
    # job shorter than 30 s prints its close only, with the count, the rate and the ETA
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = util.progress(total=3, desc="docs", unit="doc")
    bar.update(2)
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "docs" in lines[0] and "3/3" in lines[0] and "doc/s" in lines[0] and "<" in lines[0]
    bar = util.progress(total=4, desc="gen", unit="seq")
    bar.update(1)
    bar.last_print_t = 0.0   # as if 30 s had passed
    bar.update(1)
    bar.set_postfix(loss=1.5, refresh=False)
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "2/4" in lines[0] and "4/4" in lines[1] and "loss=1.5" in lines[1]
    assert all("\r" not in line and line == line.rstrip() for line in lines)


def test_progress_bar_off(monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(util.progress(range(3), desc="x")) == [0, 1, 2]
    monkeypatch.delenv("TQDM_DISABLE")
    bar = util.progress(total=2, desc="y", enabled=False)
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err == ""


def test_pick_device():
    assert util.pick_device("cpu") == torch.device("cpu")
    assert util.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'gpu': not a device"):
        util.pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            util.pick_device("cuda")


def test_keep_freed_memory_settings_take_on_glibc():
    # both mallopt options must be accepted (a wrong option number or value returns 0); the speed
    # it buys (no page faults per forward pass) is measured by make bench-evals, not here
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("libc is not glibc")
    assert util.keep_freed_memory()
