"""Tests for model.resolve and model.load against the hub: a mock of the few hub endpoints that
huggingface_hub 2.4 calls for one tiny checkpoint, on 127.0.0.1 only (HF_ENDPOINT), answering
as told: ok, 404, 500, a short body, a dropped connection, a corrupted byte, never, or never for
files only. The cache is a temporary directory (HF_HOME); nothing here reaches the network.

What model.resolve asks for (read from huggingface_hub 2.4: hf_api.model_info, file_download):
  GET  /api/models/<repo>[/revision/<rev>]?blobs=True   commit sha, files with size, blobId, lfs.sha256
  HEAD /<repo>/resolve/<sha>/<file>  (twice if not cached) X-Repo-Commit, ETag (X-Linked-Etag/-Size for LFS)
  GET  /<repo>/resolve/<sha>/<file>                     the bytes (Range: resume after a dropped connection)
"""
import errno
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import model as M
from lib import tiny

REPO = "mock-org/tiny-smollm2"
SHA = "0123456789abcdef0123456789abcdef01234567"       # the commit the mock reports for main
LFS = {"model.safetensors"}                           # stored in git LFS on the real hub


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class MockHub:
    """A thread serving `files` ({name: bytes}) as repo REPO at commit SHA. mode: ok, 404, 500,
    short (model.safetensors' body is half of what HEAD announced), dropped (the connection closes
    halfway through it once; a Range request resumes), corrupt (one byte of its tensor data changed,
    while the metadata gives the true sha256), never (accepts, reads the request, never answers),
    stall (answers model_info, never a file request).
    Stops itself at close() or after `lifetime` seconds; records each request as (method, path)."""
    def __init__(self, files, mode="ok", lifetime=60):
        self.files, self.mode, self.requests, self.release = files, mode, [], threading.Event()
        self.drops = 1
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.daemon = True
        self.timer.start()

    def close(self):
        self.release.set()
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def send(self, h, status, headers, data=b"", body=True, length=None):
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data) if length is None else length)}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def error(self, h, status, code, message, body):
        data = json.dumps({"error": message}).encode()
        self.send(h, status, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
                  data, body)

    def answer(self, h, body):
        if h.path.startswith("/api/agent-harnesses"):  # huggingface_hub's once-a-process telemetry: not the hub's files
            return self.error(h, 404, "EntryNotFound", "Entry not found", body)
        self.requests.append((h.command, h.path))
        if self.mode == "never" or (self.mode == "stall" and "/resolve/" in h.path):
            self.release.wait(30)  # until close(): the client must give up on its own timeout
            return
        if self.mode == "404":
            return self.error(h, 404, "RepoNotFound", "Repository not found", body)
        if self.mode == "500":
            return self.error(h, 500, "InternalError", "Internal Error", body)
        path = h.path.split("?")[0]
        if path == f"/api/models/{REPO}" or path.startswith(f"/api/models/{REPO}/revision/"):
            rev = path.rsplit("/", 1)[-1] if "/revision/" in path else "main"
            if rev not in ("main", SHA):
                return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            siblings = [{"rfilename": f, "size": len(d), "blobId": git_blob_id(d),
                         **({"lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                            if f in LFS else {})} for f, d in self.files.items()]
            data = json.dumps({"id": REPO, "modelId": REPO, "sha": SHA, "private": False, "siblings": siblings}).encode()
            return self.send(h, 200, {"Content-Type": "application/json"}, data, body)
        prefix = f"/{REPO}/resolve/"
        if not path.startswith(prefix) or path[len(prefix):].split("/", 1)[1] not in self.files:
            return self.error(h, 404, "EntryNotFound", "Entry not found", body)
        f = path[len(prefix):].split("/", 1)[1]
        data = self.files[f]
        etag = hashlib.sha256(data).hexdigest() if f in LFS else git_blob_id(data)
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if f in LFS:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if not body:
            return self.send(h, 200, headers, data, body=False)
        if f in LFS and self.mode == "short":
            return self.send(h, 200, headers, data[:len(data) // 2])
        if f in LFS and self.mode == "corrupt":
            data = bytearray(data)
            data[-1] ^= 0x01  # the last byte: inside a tensor, past the header that safetensors checks
            data = bytes(data)
        rng = h.headers.get("Range")
        if rng:  # "bytes=N-": the rest of the file
            start = int(rng.split("=")[1].split("-")[0])
            return self.send(h, 206, {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                             data[start:])
        if f in LFS and self.mode == "dropped" and self.drops:
            self.drops -= 1
            return self.send(h, 200, headers, data[:len(data) // 2], length=len(data))  # then closes
        return self.send(h, 200, headers, data)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("hub_src"), shape="gqa", seed=0)
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.fixture
def hub(ckpt, tmp_path, monkeypatch):
    """Start a mock hub: hub(mode) -> MockHub. The cache is tmp_path/hf (HF_HOME), online for this
    test only, with 1 s timeouts. huggingface_hub reads its environment once, at import, so its
    constants are patched as well as the variables (which a subprocess reads)."""
    from huggingface_hub import constants
    servers = []

    def start(mode="ok"):
        s = MockHub(dict(ckpt), mode)
        servers.append(s)
        set_endpoint(s.url)
        return s

    def set_endpoint(url):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    cache = tmp_path / "hf" / "hub"
    for k, v in {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "1",
                 "HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(k, v)
    for k, v in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": False, "HF_HUB_ETAG_TIMEOUT": 1,
                 "HF_HUB_DOWNLOAD_TIMEOUT": 1, "HF_HUB_DISABLE_XET": True}.items():
        monkeypatch.setattr(constants, k, v)
    start.cache, start.set_endpoint = cache, set_endpoint
    yield start
    for s in servers:
        s.close()


def refused_url():
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(REPO + ": "), msg
    return msg


def test_download_then_the_cache_answers(hub, ckpt, tmp_path):
    s = hub("ok")
    path = M.resolve(REPO)
    assert M.hub_commit(path) == SHA and path.name == SHA and path.parent.name == "snapshots"
    assert {f: (path / f).read_bytes() for f in ckpt} == ckpt
    src = tmp_path / "src"
    src.mkdir()
    for f, d in ckpt.items():
        (src / f).write_bytes(d)
    assert M.hub_commit(src) is None
    (a, tok), (b, _) = M.load(REPO), M.load(src)
    ids = torch.tensor([tok.encode("The digit is 7")])
    assert torch.equal(a(ids), b(ids))
    # cached: one request (which commit is main?) and no download; a pinned commit needs none at all
    n = len(s.requests)
    assert M.resolve(REPO) == path and len(s.requests) == n + 1 and "/api/models/" in s.requests[-1][1]
    assert M.resolve(REPO, revision=SHA) == path and len(s.requests) == n + 1
    assert M.resolve(REPO, revision="main") == path
    # offline, both by branch (the refs/main that resolve wrote) and by the commit a run recorded
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True  # the fixture's monkeypatch restores it
    assert M.resolve(REPO) == path and M.resolve(REPO, revision=SHA) == path
    assert len(s.requests) == n + 2


@pytest.mark.parametrize("mode,expect", [
    ("404", ["repository not found", "404", "/api/models/" + REPO, "check the id"]),
    ("500", ["server error", "500", "/api/models/" + REPO, "nothing is cached", "local directory"]),
    ("never", ["no answer from the hub", "within 1 s", "/api/models/" + REPO, "HF_HUB_ETAG_TIMEOUT"]),
    ("stall", ["no answer from the hub", "while downloading config.json within 1 s", f"/resolve/{SHA}/config.json"]),
    ("refused", ["cannot connect to the hub", "offline", "nothing is cached", "Connection refused", "local directory"]),
    ("offline", ["offline (HF_HUB_OFFLINE=1)", "not in the cache", "unset HF_HUB_OFFLINE", "local directory"]),
    ("--offline", ["offline (--offline)", "not in the cache", "drop --offline", "local directory"]),
    ("revision", ["revision 'v9' not found", "404", "/revision/v9", "check --revision"]),
])
def test_hub_errors_are_one_line(hub, mode, expect):
    s = hub("ok" if mode in ("refused", "offline", "--offline", "revision") else mode)
    if mode == "refused":
        hub.set_endpoint(refused_url())
    if mode == "offline":
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    t = time.time()
    n = len(s.requests)
    with pytest.raises(RuntimeError) as e:
        M.resolve(REPO, revision="v9" if mode == "revision" else None, offline=mode == "--offline")
    assert time.time() - t < 5
    if mode in ("offline", "--offline"):
        assert len(s.requests) == n   # not one request  # "never", "stall": the 1 s timeout, not a hang (nor huggingface_hub's 60 s retries)
    msg = one_line(e)
    for x in expect + ([s.url] if mode in ("404", "500", "never", "stall", "revision") else []):
        assert x in msg, (x, msg)


def test_a_cache_this_machine_cannot_use_is_said_as_such(tmp_path):
    # HF_HOME a file (or a cache that is read-only, full): "asking the hub failed (...); run again", which repeats it
    e = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(tmp_path / "hffile" / "token"))
    msg = M._hub_error(REPO, None, e, 10)
    assert msg.startswith(f"{REPO}: huggingface_hub cannot use its files on this machine (NotADirectoryError: [Errno 20] "
                          f"Not a directory: '{tmp_path / 'hffile' / 'token'}'); check HF_HOME and HF_HUB_CACHE") \
        and "run again" not in msg, msg
    assert "run again" in M._hub_error(REPO, None, OSError(errno.EPIPE, "broken pipe"), 10)   # the network's: again


@pytest.mark.parametrize("mode", ["500", "never", "refused", "offline"])
def test_unreachable_hub_falls_back_to_the_cache(hub, mode, capsys):
    s = hub("ok")
    path = M.resolve(REPO)
    capsys.readouterr()
    s.mode = mode
    if mode == "refused":
        hub.set_endpoint(refused_url())
    if mode == "offline":
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    t = time.time()
    assert M.resolve(REPO) == path
    assert time.time() - t < 5
    err = capsys.readouterr().err.splitlines()
    if mode == "offline":   # asked for: no warning
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith(f"warning: {REPO}: no answer from the hub (") and str(path) in err[0]
    M.load(REPO)


def test_a_short_body_is_one_error_and_leaves_nothing(hub):
    s = hub("short")
    with pytest.raises(RuntimeError) as e:
        M.resolve(REPO)
    msg = one_line(e)
    assert "downloading model.safetensors" in msg and "Consistency check failed" in msg and "run again" in msg
    blobs = hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert not [b for b in blobs.iterdir() if b.stat().st_size == len(s.files["model.safetensors"]) // 2]
    assert not list(blobs.glob("*.incomplete"))
    s.mode = "ok"
    M.load(REPO)


def test_a_dropped_connection_resumes(hub):
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # its "Trying to resume download..." would go to a stream pytest closed
    try:
        s = hub("dropped")
        path = M.resolve(REPO, verify=True)
    finally:
        logging.set_verbosity_warning()
    gets = [p for m, p in s.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(gets) == 2 and (path / "model.safetensors").read_bytes() == s.files["model.safetensors"]


def test_a_corrupted_byte_is_found_by_verify_only(hub, capsys):
    s = hub("corrupt")
    M.load(REPO)  # safetensors cannot see a changed byte inside the tensor data: it loads
    for offline in (False, True):  # the hub's sha256, then the one the cache recorded as the blob's name
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = offline
        with pytest.raises(ValueError) as e:
            M.resolve(REPO, verify=True)
        msg = str(e.value)
        assert "\n" not in msg and "model.safetensors: corrupt cached file of " + REPO in msg and "sha256" in msg
        blob = msg.split("delete ")[1].split(" (its blob")[0]
        assert Path(blob).parent.name == "blobs"
    # doing what it says mends it
    constants.HF_HUB_OFFLINE = False
    os.remove(blob)
    s.mode = "ok"
    path = M.resolve(REPO, verify=True)
    assert (path / "model.safetensors").read_bytes() == s.files["model.safetensors"]
    assert f"{REPO}: 5 files match the hub's checksums" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_damaged_cached_file_names_the_blob_to_delete(hub, damage):
    hub("ok")
    path = M.resolve(REPO)
    blob = Path(os.path.realpath(path / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    else:
        data[10] ^= 0x20  # inside the JSON header
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    if damage == "truncate":  # the hub answers: its size tells, before anything is read
        with pytest.raises(ValueError, match=f"model.safetensors: corrupt cached file of {REPO} "
                                             fr"\({len(data)} bytes where the hub has {len(data) + 100}\)"):
            M.resolve(REPO)
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True  # offline: safetensors' own checks
    with pytest.raises(ValueError) as e:
        M.load(REPO)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors: corrupt or truncated safetensors file" in msg
    assert f"delete {blob} (its blob in the hub cache)" in msg
    blob.unlink()
    constants.HF_HUB_OFFLINE = False
    M.load(REPO)


def test_cli_hub_errors(hub, tmp_path, capsys):
    s = hub("404")  # a subprocess, to see the exit code and that no traceback is printed; it reads the fixture's env
    r = subprocess.run([sys.executable, "model.py", "--model", REPO, "--prompt", "hi"], cwd=Path(__file__).parent.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {REPO}: repository not found")
    assert s.url in r.stderr and "404" in r.stderr
    # in-process for the rest: --verify-model on a corrupted download, then a pinned revision that works
    s.mode = "corrupt"
    with pytest.raises(SystemExit) as e:
        M.main(["--model", REPO, "--prompt", "hi", "--verify-model"])
    assert str(e.value.code).startswith("error: ") and "model.safetensors: corrupt cached file" in str(e.value.code)
    s.mode = "ok"
    with pytest.raises(SystemExit) as e:
        M.main(["--model", REPO, "--prompt", "hi", "--revision", "v9"])
    assert str(e.value.code).startswith(f"error: {REPO}: revision 'v9' not found")
    capsys.readouterr()
    M.main(["--model", REPO, "--prompt", "hi", "--revision", SHA, "--max-new-tokens", "3"])
    assert re.fullmatch(r"dtype: \w+ \(.*\)\n\[[0-3] tokens, .* tokens/s\]\n", capsys.readouterr().err)


def test_hub_commit_reads_the_cache_layout(tmp_path):
    snap = tmp_path / "models--org--name" / "snapshots" / SHA
    snap.mkdir(parents=True)
    assert M.hub_commit(snap) == SHA and M.hub_commit(str(snap) + "/") == SHA
    assert M.hub_commit(tmp_path) is None and M.hub_commit(tmp_path / "snapshots" / SHA) is None
    with pytest.raises(ValueError, match="not a hub download; drop --verify-model"):
        M.resolve(str(tmp_path), verify=True)
