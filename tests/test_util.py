"""Tests for lib/util.py: atomic writes (whole, with the umask's mode, gone on SIGTERM), the run-directory lock,
the progress bar in a log and on/off, the device, malloc settings."""
import errno
import json
import os
import shutil
import platform
import re
import select
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from lib import interrupts
from lib import util


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

    def full(tmp):                     # a full disk: the error names the file, in one line
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
    with pytest.raises(OSError, match=f"{p}: cannot write \\(No space left on device\\); free space"):
        util.atomic_write(p, full)
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_full_disk_is_said_as_one_whatever_the_writer_says(tmp_path, monkeypatch):
    # safetensors' SafetensorError and torch.save's RuntimeError ("unexpected pos") name no errno: a traceback,
    # or a line naming neither the file nor the disk (the environment tester, on a full tmpfs)
    p = tmp_path / "iter1.safetensors"

    def torn(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 534848 vs 534740")
    free = []
    monkeypatch.setattr(util.shutil, "disk_usage", lambda folder: free.append(os.listdir(folder)) or
                        types.SimpleNamespace(free=4096))   # what the temporary left free
    with pytest.raises(OSError, match=re.escape(f"{p}: cannot write (no space left on its disk: [enforce fail at "
                                                f"inline_container.cc:672] . unexpected pos 534848 vs 534740); free")):
        util.atomic_write(p, torn)
    assert len(free[0]) == 1 and os.listdir(tmp_path) == []   # asked while the temporary was there; none left

    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + '{"a": "é"}'.encode())   # a BOM, as Windows editors write
    assert util.read_json(tmp_path / "bom.json") == {"a": "é"}
    (tmp_path / "bom.json").unlink()

    def bug(tmp):
        raise TypeError("Object of type set is not JSON serializable")
    with pytest.raises(TypeError, match="not JSON serializable"):   # a bug of ours is not a full disk, even on one
        util.atomic_write(p, bug)
    monkeypatch.setattr(util.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=10 ** 9))
    with pytest.raises(RuntimeError, match="unexpected pos"):   # room left: the writer's own error, as it was
        util.atomic_write(p, torn)
    from safetensors import SafetensorError   # safetensors' own words, on a full disk: a traceback before
    monkeypatch.setattr(util.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=0))
    with pytest.raises(OSError, match=re.escape(f"{p}: cannot write (no space left on its disk: Error while serializing")):
        util.atomic_write(p, lambda tmp: (_ for _ in ()).throw(SafetensorError("Error while serializing: I/O error")))
    # a log's line: whole or not at all, even when a write takes part of it and the next fails
    log = tmp_path / "metrics.jsonl"
    util.append_line(log, '{"step": 1}')
    calls, write = [], os.write

    def short(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, bytes(data[:5]))
    monkeypatch.setattr(util.os, "write", short)
    with pytest.raises(OSError, match=re.escape(f"{log}: cannot write (No space left on device); free space")):
        util.append_line(log, '{"step": 2, "loss": 1.25}')
    assert log.read_text() == '{"step": 1}\n' and calls == [26, 21]

    def interrupted(fd, data):   # a signal (KeyboardInterrupt) between two parts of the line
        if calls.append(len(data)) or len(calls) > 3:
            raise KeyboardInterrupt
        return write(fd, bytes(data[:5]))
    monkeypatch.setattr(util.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        util.append_line(log, '{"step": 2, "loss": 1.25}')
    assert log.read_text() == '{"step": 1}\n'


def test_atomic_write_syncs_the_content_before_the_rename(tmp_path, monkeypatch):
    # a power cut after the rename must not find an empty file: the .tmp's data is fsynced first,
    # then the folder (the rename)
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.fstat(fd).st_ino)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", os.fspath(a))) or replace(a, b))
    p = tmp_path / "f.json"
    util.write_json(p, {"a": 1})
    # the .tmp's inode is the file's after the rename (file descriptors have no portable path)
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1] == os.stat(p).st_ino and calls[2][1] == os.stat(tmp_path).st_ino
    assert re.fullmatch(re.escape(f"{tmp_path}/.f.json.") + r"\w{8}\.tmp", calls[1][1])   # a name of its own


def test_atomic_write_touches_no_other_file_and_writes_through_a_link(tmp_path):
    # the temporary is a name of its own: a file of the user's named like it stays; two writes of one
    # file at once each land whole; a symbolic link keeps pointing at its target, which is replaced
    p = tmp_path / "r.json"
    (tmp_path / "r.json.tmp").write_text("mine")
    util.write_json(p, {"a": 1})
    assert (tmp_path / "r.json.tmp").read_text() == "mine" and json.loads(p.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.json.tmp"]
    real = tmp_path / "elsewhere.json"
    real.write_text("{}")
    (tmp_path / "link.json").symlink_to(real)
    util.write_json(tmp_path / "link.json", {"b": 2})
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text()) == {"b": 2}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_a_new_file_the_umasks_mode_and_keeps_a_replaced_ones(tmp_path, mask):
    from safetensors.torch import save_file
    old = os.umask(mask)
    try:
        assert util.umask() == mask
        util.atomic_write(tmp_path / "a.safetensors", lambda t: save_file({"x": torch.zeros(2)}, t))   # safetensors: 0600
        util.write_json(tmp_path / "b.json", {})
        (tmp_path / "c.json").write_text("{}")
        os.chmod(tmp_path / "c.json", 0o640)
        util.write_json(tmp_path / "c.json", {"a": 1})   # replaced: its mode stays, as cp's would
    finally:
        os.umask(old)
    mode = lambda n: os.stat(tmp_path / n).st_mode & 0o7777   # noqa: E731
    assert mode("a.safetensors") == mode("b.json") == 0o666 & ~mask and mode("c.json") == 0o640


def _until(cond, proc, timeout=60):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.02)


def test_sigterm_during_atomic_write_removes_the_temporary_and_exits_143(tmp_path):
    # SIGTERM's default action ends a process without running `finally:`; during a write it is an exception
    p, ready = tmp_path / "f.bin", tmp_path / "ready"
    p.write_bytes(b"old")
    code = f"""if 1:
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from lib import util
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half")
                f.flush()
                open({str(ready)!r}, "w").close()
                time.sleep(60)
        util.atomic_write({str(p)!r}, write)"""
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    _until(ready.exists, proc)
    assert len([f for f in os.listdir(tmp_path) if f.startswith(".f.bin.") and f.endswith(".tmp")]) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == f"SIGTERM: stopped while writing {p}; no temporary file is left, and no half file\n"
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "ready"] and p.read_bytes() == b"old"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # and here, after util.write_json, as it was
    util.write_json(tmp_path / "g.json", {})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_lock_dir_one_writer_stale_locks_taken_over(tmp_path, capsys):
    lock = tmp_path / "LOCK"
    with util.lock_dir(tmp_path):
        pid, host, _ = lock.read_text().split()
        assert int(pid) == os.getpid() and host == socket.gethostname()
        with pytest.raises(FileExistsError, match="already writes this run"):   # this process, twice
            with util.lock_dir(tmp_path):
                pass
    assert not lock.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for content, refused in ((f"{live.pid} {socket.gethostname()} {util._start_time(live.pid)}\n", f"pid {live.pid}"),
                                 (f"{live.pid} {socket.gethostname()}\n", f"pid {live.pid}"),       # no start time
                                 (f"{live.pid} elsewhere -\n", f"pid {live.pid} on host elsewhere"),  # cannot be checked
                                 (f"{dead.pid} {socket.gethostname()} 1\n", None),
                                 (f"{live.pid} {socket.gethostname()} 1\n", None),   # the pid, reused by another process
                                 (f"{os.getpid()} {socket.gethostname()} -\n", None),   # reused by this one (containers)
                                 ("", None)):                                          # a holder killed before it wrote
            lock.write_text(content)
            os.utime(lock, (time.time() - 10,) * 2)
            if refused:
                with pytest.raises(FileExistsError, match=f"{tmp_path}: another rigsa.py \\({refused}\\) is writing "
                                                          f"this run; wait for it, or delete {lock}"):
                    with util.lock_dir(tmp_path):
                        pass
                assert lock.read_text() == content            # left as it was
                continue
            capsys.readouterr()
            with pytest.raises(KeyError):                     # taken over, and released on an error too
                with util.lock_dir(tmp_path):
                    assert lock.read_text().split()[0] == str(os.getpid())
                    raise KeyError
            assert not lock.exists() and os.listdir(tmp_path) == []
            err = capsys.readouterr().err
            pid = content.split()[0] if content else None
            assert err == (f"note: {lock}: stale lock of pid {pid} (not running); taken over\n" if pid else
                           f"note: {lock}: empty lock (its process was stopped before it wrote its line); taken over\n")
        lock.write_text("")   # a fresh empty LOCK: its maker, before its line; taken, but it is not a stale one's
        capsys.readouterr()
        with util.lock_dir(tmp_path):
            pass
        assert capsys.readouterr().err == "" and os.listdir(tmp_path) == []
        for content, age in (("my notes on locks\n", 3600), ("x", 0), (f"{dead.pid}\n", -3600), (b"\xff\xfe", 3600)):
            # a file of the user's, however new (or dated in the future): refused, kept as it is
            (lock.write_bytes if isinstance(content, bytes) else lock.write_text)(content)
            os.utime(lock, (time.time() - age,) * 2)
            with pytest.raises(FileExistsError, match=f"^{lock}: not a lock file of rigsa's \\(it holds something "
                                                      f"other than 'pid host start'\\); move it away"):
                with util.lock_dir(tmp_path):
                    pass
            assert (lock.read_bytes() if isinstance(content, bytes) else lock.read_text()) == content
        lock.unlink()
    finally:
        live.kill()
        live.wait()


LOCK_WORKER = """
import os, random, socket, sys, time
sys.path.insert(0, {root!r})
from lib import util
folder, seed, dead = sys.argv[1], int(sys.argv[2]), sys.argv[3]
random.seed(seed)
read = util._lock_holder
def slow(lock):   # a wider window between reading a LOCK and acting on it, as a busy machine gives
    held = read(lock)
    time.sleep(random.random() * 0.01)
    return held
util._lock_holder = slow
both = 0
for _ in range(60):
    try:
        with util.lock_dir(folder):
            try:
                os.close(os.open(os.path.join(folder, "in"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:   # another process holds it too
                both += 1
                continue
            time.sleep(random.random() * 0.002)
            os.remove(os.path.join(folder, "in"))
            if random.random() < 0.5:   # killed while holding it: its LOCK names a dead process
                with open(os.path.join(folder, "LOCK"), "w") as f:
                    f.write(f"{{dead}} {{socket.gethostname()}} 1\\n")
    except FileExistsError:
        pass
print(both)
"""


@pytest.mark.skipif(util.fcntl is None, reason="no flock on this platform")
def test_a_lock_replaced_between_its_open_and_its_flock_is_not_held(tmp_path, monkeypatch):
    # the holder before us removes LOCK as it ends, and a third process makes and flocks a new one, between our
    # open and our flock: our flock then holds a file no longer in the folder, and only the inode check (the file
    # in the folder against the one open) sends us round again, to find the third one's and be refused
    lock, other, flock = tmp_path / "LOCK", [], util.fcntl.flock

    def swapped(f, op):
        if not other:   # once: the file we opened goes, and another process's LOCK takes its place, flocked
            lock.unlink()
            other.append(open(lock, "w"))
            flock(other[0], util.fcntl.LOCK_EX)
            other[0].write(f"{os.getppid()} {socket.gethostname()} -\n")
            other[0].flush()
        return flock(f, op)
    monkeypatch.setattr(util.fcntl, "flock", swapped)
    try:
        with pytest.raises(FileExistsError, match=rf"another rigsa.py \(pid {os.getppid()}\) is writing this run"):
            with util.lock_dir(tmp_path):
                pass
        assert lock.read_text() == f"{os.getppid()} {socket.gethostname()} -\n"   # the other's, untouched
    finally:
        for f in other:
            f.close()


def test_lock_dir_stale_takeovers_racing_leave_one_writer(tmp_path):
    # four processes take one folder's lock in turn, and half of the holders "die" with it (their LOCK
    # names a dead pid), so the others race to take over stale locks: never two inside at once. (A
    # read-then-rename takeover let a third process's fresh lock be removed: two writers, most runs)
    worker = tmp_path / "worker.py"
    worker.write_text(LOCK_WORKER.format(root=str(Path(__file__).resolve().parent.parent)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "run"), str(seed), str(dead.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for seed in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sum(int(o) for o in outs) == 0


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
    bar.last_print_t = time.time() - 15   # 15 s ago: within the interval, no line
    bar.update(0)
    bar.last_print_t = 0.0   # as if 30 s had passed
    bar.update(1)
    bar.set_postfix(loss=1.5, refresh=False)
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "2/4" in lines[0] and "4/4" in lines[1] and "loss=1.5" in lines[1]
    assert all("\r" not in line and line == line.rstrip() for line in lines)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals here")
def test_progress_bar_on_a_terminal_of_size_zero(monkeypatch):
    # a pseudo-terminal nobody sized (`script`, `docker run -t`) reports 0x0, under which tqdm draws nothing
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    master, slave = os.openpty()
    with open(slave, "w") as tty:
        if os.get_terminal_size(slave).columns:   # the premise: a platform whose new terminals come sized has no case
            pytest.skip("a new pseudo-terminal has a size here")
        monkeypatch.setattr(sys, "stderr", tty)
        bar = util.progress(total=3, desc="docs", unit="doc")
        bar.update(3)
        bar.close()
        tty.flush()
        seen = b""
        while select.select([master], [], [], 0.2)[0]:   # all the bar wrote (the slave still open: no EIO)
            seen += os.read(master, 4096)
    os.close(master)
    seen = seen.decode()
    assert "docs" in seen and "3/3" in seen and "doc/s" in seen, repr(seen)


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


# ---- downloads, against a server on 127.0.0.1 that this test starts and stops ----

@pytest.fixture
def server():
    """A local HTTP server of one file, /f (bytes 0..255 x 40), whose behaviour each test sets:
    mode ok (honours Range), short (closes after half of what it announced), norange (ignores
    Range), 404, slow (ok, over half a second). Bounded: it serves only while the test runs."""
    import http.server
    import threading
    body = bytes(range(256)) * 40
    state = {"mode": "ok", "ranges": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            state["ranges"].append(start)
            if state["mode"] == "404":
                return self.send_error(404)
            if start and state["mode"] == "ok":
                if start >= len(body):
                    return self.send_error(416)
                self.send_response(206)
            else:
                self.send_response(200)
                start = 0
            part = state.get("body", body)[start:]
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if state["mode"] == "slow":                # in 10 pieces over half a second
                for i in range(10):
                    self.wfile.write(part[i * len(part) // 10:(i + 1) * len(part) // 10])
                    self.wfile.flush()
                    time.sleep(0.05)
                return
            self.wfile.write(part[:len(part) // 2] if state["mode"] == "short" else part)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", body, state
    srv.shutdown()
    srv.server_close()


def test_download_resumes_restarts_checks_and_names_the_url(server, tmp_path, monkeypatch):
    url, body, state = server
    dest = tmp_path / "d" / "f"
    state["mode"] = "short"                        # closes early: an error naming the URL, the .tmp kept
    with pytest.raises(OSError, match=f"{url}/f: download failed \\(the connection closed early\\); run again"):
        util.download(f"{url}/f", dest)
    assert not dest.exists() and (tmp_path / "d" / "f.tmp").stat().st_size == len(body) // 2
    state["mode"] = "ok"                           # the next try asks for the rest only
    util.download(f"{url}/f", dest)
    assert dest.read_bytes() == body and state["ranges"][-1] == len(body) // 2 and not (tmp_path / "d" / "f.tmp").exists()
    (tmp_path / "d" / "g.tmp").write_bytes(b"stale")
    state["mode"] = "norange"                      # a server that ignores the range: from the start
    util.download(f"{url}/f", tmp_path / "d" / "g")
    assert (tmp_path / "d" / "g").read_bytes() == body
    (tmp_path / "d" / "s.tmp").write_bytes(b"stale")  # the same with a file smaller than a write buffer
    state["body"] = body[:1000]
    util.download(f"{url}/f", tmp_path / "d" / "s")
    assert (tmp_path / "d" / "s").read_bytes() == body[:1000]

    def same(n):   # the check sees the whole file, as it is on disk (PIQA's 3,676-byte labels were checked as empty)
        def check(path):
            if path.read_bytes() != body[:n]:
                raise ValueError(f"{path.stat().st_size} bytes on disk of {n}")
        return check
    for n in (100, 3676, 5000):
        state["body"] = body[:n]
        util.download(f"{url}/f", tmp_path / "d" / f"small{n}", same(n))
    del state["body"]
    (tmp_path / "d" / "h.tmp").write_bytes(body)   # a whole .tmp: 416, then checked and renamed
    state["mode"] = "ok"
    util.download(f"{url}/f", tmp_path / "d" / "h")
    assert (tmp_path / "d" / "h").read_bytes() == body

    def wrong(path):
        raise ValueError("not the pinned file")
    with pytest.raises(ValueError, match="not the pinned file"):   # a bad file is deleted, never renamed
        util.download(f"{url}/f", tmp_path / "d" / "i", wrong)
    assert not (tmp_path / "d" / "i").exists() and not (tmp_path / "d" / "i.tmp").exists()
    state["mode"] = "404"
    with pytest.raises(OSError, match=f"{url}/x: HTTP 404"):
        util.download(f"{url}/x", tmp_path / "d" / "j")
    monkeypatch.setenv("RIGSA_DATA_MIRROR", url + "/")            # one variable points every dataset at a mirror
    assert util.data_url("https://example.org/a/test.jsonl", "gsm8k/test.jsonl") == f"{url}/gsm8k/test.jsonl"
    monkeypatch.delenv("RIGSA_DATA_MIRROR")
    assert util.data_url("https://example.org/a/test.jsonl", "gsm8k/test.jsonl") == "https://example.org/a/test.jsonl"


def test_two_downloads_of_one_file_take_turns(server, tmp_path, capsys):
    # two data commands started at once fetch the same file: the second waits for the first's lock
    # on the .tmp and then finds the file in place, where both used to write the same .tmp (garbled,
    # then refused by its checksum as if the mirror had served another file); whole, no .tmp left
    import threading
    url, body, state = server
    state["mode"] = "slow"
    dest, tmp = tmp_path / "d" / "f", tmp_path / "d" / "f.tmp"
    got, errors = [], []

    def whole(path):
        if path.read_bytes() != body:
            raise ValueError("garbled")

    def fetch():
        try:
            got.append(util.download(f"{url}/f", dest, whole))
        except Exception as e:  # noqa: BLE001  (asserted empty below)
            errors.append(e)
    first = threading.Thread(target=fetch)
    first.start()
    for _ in range(200):                               # until the first is streaming (its .tmp open)
        if tmp.exists():
            break
        time.sleep(0.01)
    second = threading.Thread(target=fetch)
    second.start()
    first.join(10)
    second.join(10)
    assert not errors and got == [dest, dest] and dest.read_bytes() == body and not tmp.exists()
    assert capsys.readouterr().err.count("another process is downloading it; waiting") == 1


def test_file_hash_kinds(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello\n")
    assert util.file_hash(p, "gitsha1") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    assert util.file_hash(p, "sha256") == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert util.file_hash(p, "md5") == "b1946ac92492d2347c6235b4d2611184"


def test_ensure_files_fetches_checks_and_names_what_is_missing(server, tmp_path, monkeypatch):
    import hashlib
    url, body, state = server
    monkeypatch.setenv("RIGSA_DATA_MIRROR", url)                   # the server answers every path with body
    good = ("a.bin", "https://example.invalid/a.bin", "sha256", hashlib.sha256(body).hexdigest(), len(body))
    got = util.ensure_files("toy", "toy", tmp_path / "toy", [good])
    assert got == {"a.bin": tmp_path / "toy" / "a.bin"} and got["a.bin"].read_bytes() == body
    assert state["ranges"] == [0]
    util.ensure_files("toy", "toy", tmp_path / "toy", [good])     # there and right: not fetched again
    assert state["ranges"] == [0]
    wrong = ("b.bin", good[1], "md5", "0" * 32, None)              # a download that is not the pinned file
    with pytest.raises(ValueError, match=rf"{url}/toy/b.bin: served a file that is not the original toy b.bin \(md5 [0-9a-f]{{32}}, "
                                         r"expected 0{32}\); fix the mirror or unset RIGSA_DATA_MIRROR"):
        util.ensure_files("toy", "toy", tmp_path / "toy", [wrong])
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["a.bin"]   # nothing half-written
    (tmp_path / "toy" / "c.bin").write_bytes(body[:-1])            # a present file of another size
    with pytest.raises(ValueError, match=f"{len(body) - 1} bytes, expected {len(body)}.*delete it to download it again"):
        util.ensure_files("toy", "toy", tmp_path / "toy", [("c.bin", *good[1:])])
    assert util.ensure_files("toy", "toy", tmp_path / "toy", [("c.bin", *good[1:])], verify=False)   # stand-in data
    missing = [("d.bin", "https://example.invalid/d.bin", "md5", "0" * 32, None), ("e.bin", "https://x.invalid/e", "md5", "", None)]
    with pytest.raises(FileNotFoundError) as e:                     # offline: every missing file, in one line
        util.ensure_files("toy", "toy", tmp_path / "toy", missing, fetch=False)
    msg = str(e.value)
    assert msg.startswith("toy: missing data files (offline); put them at: ") and "\n" not in msg
    assert f"{tmp_path / 'toy' / 'd.bin'} <- {url}/toy/d.bin (from RIGSA_DATA_MIRROR, a copy of https://example.invalid/d.bin)" \
        in msg and "x.invalid/e" in msg
    monkeypatch.setenv("RIGSA_DATA_MIRROR", "no-scheme")           # a mirror that is no URL: named, with each file
    with pytest.raises(FileNotFoundError, match=r"d.bin <- no-scheme/toy/d.bin \(from RIGSA_DATA_MIRROR, .*\): not a URL"):
        util.ensure_files("toy", "toy", tmp_path / "toy2", missing)
    assert not (tmp_path / "toy2").exists()                        # nothing fetched: no folder made
    (tmp_path / "toy" / "f.bin").mkdir()                           # a folder, or a broken link, where a file should be
    (tmp_path / "toy" / "g.bin").symlink_to(tmp_path / "nowhere")
    for name in ("f.bin", "g.bin"):
        with pytest.raises(ValueError, match=f"toy/{name}: not a file"):
            util.ensure_files("toy", "toy", tmp_path / "toy", [(name, *good[1:])], verify=False)
    assert (tmp_path / "toy" / "g.bin").is_symlink()
    (tmp_path / "afile").write_text("")                            # a file where the folder goes: said, not fetched
    with pytest.raises(ValueError, match=f"{tmp_path / 'afile'}: not a directory; the toy files go in "):
        util.ensure_files("toy", "toy", tmp_path / "afile" / "toy", missing)
    monkeypatch.setenv("RIGSA_DATA_MIRROR", url)
    state["mode"] = "404"                                          # unreachable: the failure says why
    with pytest.raises(FileNotFoundError, match=r"d.bin <- http://127.0.0.1:\d+/toy/d.bin \(from RIGSA_DATA_MIRROR, a copy of "
                                                r"https://example.invalid/d.bin\): HTTP 404"):
        util.ensure_files("toy", "toy", tmp_path / "toy", missing[:1])


def test_git_commit_is_this_checkouts_whatever_git_dir_says(tmp_path, monkeypatch):
    # a git hook or `rebase -x` exports GIT_DIR: the run recorded that repository's commit as its own
    here = util.git_commit()
    other = tmp_path / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "f.txt").write_text("theirs")   # a tracked file: asked about the other repository, this checkout is dirty
    subprocess.run(["git", "-C", str(other), "add", "f.txt"], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"],
                   check=True)
    theirs = subprocess.run(["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for var in ("GIT_DIR", "GIT_COMMON_DIR"):   # a hook's quarantine exports the latter
        with monkeypatch.context() as m:
            m.setenv(var, str(other / ".git"))
            assert util.git_commit() == here and not here.startswith(theirs), var


def test_the_code_version_moves_with_the_sources_only(tmp_path):
    # recorded with every run and evaluation: a source edit is another version, a README's is not
    repo = Path(util.__file__).resolve().parent.parent
    tree = tmp_path / "tree"
    files = util.code_files(repo)
    assert {p.relative_to(repo).as_posix() for p in files} >= {"rigsa.py", "model.py", "qlora.py", "cli.py",
                                                               "lib/util.py", "evals/run.py", "evals/tasks.py"}
    for p in files + [repo / "README.md"]:
        (tree / p.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, tree / p.relative_to(repo))
    assert util.code_hash(tree) == util.code_version()   # as imported: this checkout's sources
    (tree / "README.md").write_text("edited")
    for other in ("reproduce.py", "conftest.py", "test_mine.py", "lib/test_mine.py", "tests/x.py", "bench/x.py",
                  "docs/x.py", "data/x.py", "runs/x/x.py", ".hidden/x.py", "lib/env/lib/x.py", "lib/env/pyvenv.cfg",
                  "conda/lib/python3.11/site-packages/pkg/__init__.py", "build/lib/rigsa.py", ".x.py", "lib/.x.py"):
        (tree / other).parent.mkdir(parents=True, exist_ok=True)   # what no number passes through
        (tree / other).write_text("x = 1\n")
    os.symlink(tree / "gone", tree / ".#rigsa.py")   # an editor's lock: a link to nothing
    os.symlink(tree / "gone", tree / "lib" / "dangling.py")
    assert util.code_hash(tree) == util.code_version()
    for helper in ("criteria.py", "lib/ext/criteria.py", "mine/__init__.py"):   # what rigsa.py may import
        (tree / helper).parent.mkdir(parents=True, exist_ok=True)
        (tree / helper).write_text("x = 1\n")
        assert util.code_hash(tree) != util.code_version(), helper
        (tree / helper).unlink()
    assert util.code_hash(tree) == util.code_version()
    (tree / "lib" / "util.py").write_text((tree / "lib" / "util.py").read_text() + "\n# an edit\n")
    assert util.code_hash(tree) != util.code_version()


@pytest.fixture
def handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    interrupts.stop_as_interrupt(False)
    for s, h in before.items():
        signal.signal(s, h)


def test_stop_as_interrupt_puts_back_what_it_found(handlers):
    mine = lambda s, f: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    interrupts.stop_as_interrupt()
    interrupts.stop_as_interrupt()   # twice: what it found the first time goes back, not its own handler
    interrupts.stop_as_interrupt(False)
    assert signal.getsignal(signal.SIGTERM) is mine
    interrupts.early()   # early()'s line says "nothing was kept": once the work is done, the default instead
    interrupts.stop_as_interrupt()
    interrupts.stop_as_interrupt(False)
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    interrupts.SIGNALS.append(signal.SIGTERM)   # an earlier command's signal is not this one's
    interrupts.stop_as_interrupt()
    assert interrupts.interrupted() == 0
