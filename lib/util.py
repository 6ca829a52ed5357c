"""
util.py: the chores every entry point shares, each written once. It knows nothing of models,
tasks or the method (of a checkpoint folder only the dtype record a merge leaves in it, which
--dtype auto honours everywhere, model.py's chat included); model.py, qlora.py, rigsa.py, evals/
and the scripts import it.

  atomic_write, write_json   a file appears whole or not at all (write a temporary, then rename); read_json: UTF-8
  append_line, disk_full     a log's line likewise; a full disk said as one, whatever the writer's words
  umask, file_mode           new files and folders get the modes the user's umask says
  sigterm_cleanup            while active, SIGTERM runs the `finally:` blocks (temporaries removed), exit 143
  lock_dir                   one process writes a run directory at a time (<dir>/LOCK: pid, host; stale ones taken over)
  download                   a data file: streamed, resumable, checked, renamed; RIGSA_DATA_MIRROR
  ensure_files, file_hash    pinned data files: there and right, or fetched; md5 / sha256 / git blob id
  progress                   tqdm with a rate and ETA; in a log file one line per interval
  ArgumentParser, number     one-line usage errors; numeric flags checked where they are parsed (nonempty: paths;
                             comma_list: names)
  pick_device, on_device     "auto" -> cuda if available ("cuda" without CUDA is an error); constants per device
  native_bf16, auto_dtype    --dtype auto: bfloat16 where the device computes it natively (CUDA, AMX, AVX512-BF16)
  merge_record, merge_dtype  ... but a float32 merge (its rigsa-merge.json says so) stays float32
  machine, KERNEL_VARS       what a run's last bits depend on beyond torch: device, CPU kernels, math-library variables
  init_distributed, world    torchrun: one process per GPU (gloo processes on the CPU); say: rank 0 prints
  exit_distributed           torchrun: all ranks done, then the process group left and the process ended
  keep_freed_memory          CPU runs: glibc keeps freed blocks for reuse
  kth_largest                an exact k-th largest over chunks of floats (IMP's threshold), nothing concatenated
  all_reduce_grads           torchrun: the gradients summed across ranks after an accumulated batch
"""
import argparse
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

try:
    import fcntl          # POSIX: downloads take turns on a file (download)
except ImportError:       # Windows: no lock
    fcntl = None

import torch
import torch.distributed as dist
from tqdm import tqdm

from lib import interrupts

# -----------------------------------------------------------------------------
# files: written whole or not at all

def umask():
    """The process's umask, read without changing it (/proc/self/status; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(folder=False):
    """The mode open() or mkdir() would give a new file (0666) or folder (0777) under the umask; for
    what is made through tempfile (0600 / 0700, whatever the umask) and then renamed into place."""
    return (0o777 if folder else 0o666) & ~umask()


def check_writable(folder):
    """A file made in `folder` and removed at once; OSError if it cannot be. os.access is not asked: it
    says yes to root on a read-only or root-squashed mount, where the real write fails after the work."""
    fd, probe = tempfile.mkstemp(prefix=".rigsa-probe.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def atomic_write(path, write):
    """write(tmp) writes the file's content to a temporary path beside it (`.NAME.XXXXXXXX.tmp`, a name
    of its own, so that no file of the user's and no concurrent write of the same file is touched),
    which then replaces `path` in one rename: a reader never sees half a file; a failed or
    interrupted write (SIGTERM included: sigterm_cleanup) removes it, and only a hard kill leaves one.
    A symbolic link is written through (its target replaced, the link kept). The file gets the mode
    of the one it replaces, or if new the umask's (some writers, safetensors among them, create
    0600). The content is on disk before the rename, and the rename before this returns (fsync of
    both): a power cut leaves the old file or the new one, never an empty one."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    tmp = None
    folder, name = os.path.split(os.path.abspath(path))
    with sigterm_cleanup(f"stopped while writing {path}; no temporary file is left, and no half file"):
        try:
            try:
                mode = os.stat(path).st_mode & 0o7777
            except OSError:
                mode = file_mode()
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as e:
            # a writer's own failure (safetensors', torch.save's), not a bug of ours, on a disk with nothing left,
            # asked before the temporary's bytes are freed
            full = (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError") and disk_full(folder)
            if tmp is not None and os.path.lexists(tmp):
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            if isinstance(e, OSError) and e.errno is not None:   # a full disk, a read-only folder, ...
                raise OSError(f"{path}: cannot write ({e.strerror}); free space or choose another path") from None
            if full:   # safetensors' and torch.save's writers say it in their own words, or not at all
                raise OSError(f"{path}: cannot write (no space left on its disk: {' '.join(str(e).split())[:100]}); "
                              f"free space or choose another path") from None
            raise
    try:   # the rename itself (best effort: some file systems cannot fsync a folder)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def disk_full(folder):
    """Whether the disk that holds `folder` has under 1 MiB left: what makes a writer fail that names no
    errno (safetensors' SafetensorError, torch.save's "unexpected pos")."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def append_line(path, line):
    """One line appended to a log whole, or not at all: a write that fails (a full disk) cuts the file back
    to where it was and is one OSError naming it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)   # the umask's mode, as open(path, "a")
    try:
        at, rest = os.lseek(fd, 0, os.SEEK_END), memoryview((line + "\n").encode())
        try:
            while rest:   # a write may take part of it, the next one fail
                rest = rest[os.write(fd, rest):]
        except BaseException as e:   # a full disk, or a signal between two parts: cut back all the same
            with contextlib.suppress(OSError):
                os.ftruncate(fd, at)
            if isinstance(e, OSError):
                raise OSError(f"{path}: cannot write ({e.strerror or e}); free space or choose another path") from None
            raise
    finally:
        os.close(fd)


def read_json(path):
    """A JSON file as UTF-8, as RFC 8259 has it (a BOM allowed), whatever the locale's encoding: a hub
    model's tokenizer_config.json beyond ASCII was refused under an ASCII locale, and read garbled under
    Latin-1. Its errors are read_text()'s and json.loads()'s: ValueError (UnicodeDecodeError, JSONDecodeError)."""
    return json.loads(Path(path).read_bytes().decode("utf-8-sig"))


def write_json(path, obj, indent=2):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
    return atomic_write(path, write)

# -----------------------------------------------------------------------------
# SIGTERM: the temporaries go on that way out too

class Terminated(SystemExit):
    """SIGTERM, raised where the program was by sigterm_cleanup's handler: a SystemExit with status
    143, so `finally:` and `except BaseException:` cleanups run, and `except Exception` does not stop it."""


def _terminated(signum, frame):
    signal.signal(signum, signal.SIG_IGN)   # a second one would cut the cleanup short; restored after it
    raise Terminated(128 + signum)


@contextlib.contextmanager
def sigterm_cleanup(what):
    """While active, SIGTERM (`kill`, a job scheduler's stop), whose default action ends the process
    without running any Python, raises Terminated instead: the temporary files are removed on the way
    out, one line `SIGTERM: <what>` is printed, and the process exits 143. Only in the main thread and
    where SIGTERM still has its default action: a handler a caller installed (training's: finish the
    step, then save) is left as it is, and so is an enclosing sigterm_cleanup, which speaks."""
    old = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        old = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    except Terminated:
        if old is not None:
            print(f"SIGTERM: {what}", file=sys.stderr)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

# -----------------------------------------------------------------------------
# a run directory: one writer at a time

_HELD = set()   # the folders this process holds


def _start_time(pid):
    """The process's start time (clock ticks since boot, /proc/<pid>/stat), or None where unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_holder(lock):
    """(pid, host, start time or None) from a LOCK file; None if it is gone; () if unreadable."""
    try:
        with open(lock) as f:
            fields = f.read().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ()
    return _lock_fields(fields)


def _lock_fields(fields):
    """A LOCK's words -> (pid, host, start time or None), or () if they are not a lock's line."""
    try:
        return int(fields[0]), fields[1], fields[2] if len(fields) > 2 else None
    except (IndexError, ValueError):
        return ()


def _running(pid, start):
    """Whether process pid (started at `start`, where known) runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


@contextlib.contextmanager
def lock_dir(path, what="rigsa.py"):
    """Hold <path>/LOCK while the block runs, so that one process writes the folder at a time. The
    file holds `pid host start-time`, and on POSIX an flock from the open to the release, so that the
    kernel, not a read then a rename, decides between processes that race for it. A LOCK whose process
    runs (its flock held; or, where nothing holds one, its pid alive on this host, or any pid on
    another host, which cannot be checked) -> FileExistsError naming its pid; one whose process is
    gone (a kill) is stale: taken over with one note line. A LOCK that is not one (the user's own
    file of that name) is refused, and left as it is. Released (the file removed, if still ours)
    on every way out, SIGTERM included (sigterm_cleanup)."""
    folder = os.path.abspath(path)
    lock = os.path.join(folder, "LOCK")
    host = socket.gethostname()
    me = f"{os.getpid()} {host} {_start_time(os.getpid()) or '-'}\n"
    if folder in _HELD:
        raise FileExistsError(f"{path}: this process already writes this run; a run directory has one writer")

    def refuse(held):
        pid, where = (held[0], held[1]) if held else ("?", host)
        on = f" on host {where}" if where != host else ""
        raise FileExistsError(f"{path}: another {what} (pid {pid}{on}) is writing this run; wait for it, or delete "
                              f"{lock} if that process " + ("has ended" if on else f"is not {what}"))

    def take():
        """-> (the open LOCK, the stale holder it replaced: None, (pid, host, start) or () unreadable),
        or None to try again (the file went or changed under us)."""
        new = True
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            new = False
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:   # released meanwhile
                return None
            except OSError as e:
                raise OSError(f"{path}: cannot write {lock} ({e.strerror}); the run's folder must be writable") from None
        except OSError as e:   # a read-only folder, ...
            raise OSError(f"{path}: cannot write {lock} ({e.strerror}); the run's folder must be writable") from None
        with contextlib.ExitStack() as on_error:
            f = on_error.enter_context(os.fdopen(fd, "r+"))
            if fcntl is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:   # a live holder, which may be writing its line this moment
                    for _ in range(40):
                        if held := _lock_holder(lock):
                            break
                        threading.Event().wait(0.05)
                    refuse(held)
                try:   # the holder before us may have removed the file since our open
                    if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                        return None
                except FileNotFoundError:
                    return None
            held = None if new else _lock_holder(lock)
            if held is None and not new:   # removed between the open and the read
                return None
            if held == ():   # unreadable as a lock: only an empty file (what a maker killed before its line
                f.seek(0)      # leaves) may be ours; anything else is the user's, however new or old
                try:
                    text = f.read()
                except UnicodeDecodeError:   # bytes that are no text: not a lock's line either
                    text = "?"
                if text.strip():
                    if _lock_fields(text.split()):   # its maker wrote its line meanwhile: read it again
                        return None
                    raise FileExistsError(f"{lock}: not a lock file of rigsa's (it holds something other than 'pid host "
                                          f"start'); move it away, since {what} keeps a file of that name in {path} "
                                          f"while it writes there")
            if held == () and time_since_change(lock) < 2:   # its maker, before its flock or its line: not stale
                held = None
            if held:
                pid, where, start = held
                # no flock holds it, but its process may be writing: one on another host (which cannot be
                # checked), or one that takes no flock (an older rigsa; no fcntl). Not a pid reused since
                if where != host or _running(pid, None if start == "-" else start) and pid != os.getpid():
                    refuse(held)
            f.seek(0)
            f.truncate()
            f.write(me)
            f.flush()
            on_error.pop_all()
            return f, held

    for _ in range(100):
        if (took := take()) is not None:
            break
    else:
        raise FileExistsError(f"{path}: could not take {lock} (other processes keep taking it); try again")
    f, stale = took
    if stale is not None:
        print(f"note: {lock}: " + (f"stale lock of pid {stale[0]} (not running)" if stale else
                                   "empty lock (its process was stopped before it wrote its line)")
              + "; taken over", file=sys.stderr)
    _HELD.add(folder)
    try:
        with sigterm_cleanup(f"stopped; {lock} released"):
            yield
    finally:
        _HELD.discard(folder)
        with contextlib.suppress(OSError):   # removed while the flock is held, so no one takes a file that goes
            with open(lock) as g:
                ours = g.read() == me and os.fstat(g.fileno()).st_ino == os.fstat(f.fileno()).st_ino
            if ours:
                os.remove(lock)
        f.close()


def hold_folder(path):
    """An flock on the folder itself, held until the returned descriptor is closed (None without fcntl):
    a writer's temporary folder says it is in use, so that a later writer removes only a killed one's
    (held_by_nobody)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:   # a file system without flock: no mark of use, and held_by_nobody cannot tell either
        os.close(fd)
        return None
    return fd


def held_by_nobody(path):
    """True if no process holds `path`'s flock (hold_folder): the writer that made it was killed. False
    where it cannot be told (no fcntl, no access)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (OSError, AttributeError):   # held (BlockingIOError), or no fcntl
        return False
    finally:
        os.close(fd)


def time_since_change(path):
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0

# -----------------------------------------------------------------------------
# downloads of data files (MNIST, GSM8k, PIQA, HellaSwag)

DATA_MIRROR = "RIGSA_DATA_MIRROR"  # env: a base URL laid out like data/ (<task>/<file>), used instead of the origins


def data_url(url, rel):
    """The URL to fetch data file `rel` (e.g. 'gsm8k/test.jsonl') from: its origin, or the mirror."""
    mirror = os.environ.get(DATA_MIRROR)
    return f"{mirror.rstrip('/')}/{rel}" if mirror else url


class _Local(OSError):
    """A download that failed on this machine's side (its folder), not the network's."""


def download(url, dest, check=None, timeout=60):
    """Fetch url into dest, whole or not at all: the bytes stream into dest.tmp (resumed with an
    HTTP Range request when an interrupted download left one; restarted if the server ignores
    the range), check(tmp) raises ValueError if they are not the expected file (the .tmp is then
    deleted), and only then is dest renamed into place. Network faults raise OSError naming the
    URL; the .tmp stays for the next try to resume. Two processes fetching the same file take
    turns: the writer holds a lock on the .tmp (flock, where there is one) until dest is in place,
    and the other waits, then finds dest there (or, if the first failed, resumes its .tmp)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    while not _fetch(url, dest, tmp, check, timeout):
        if dest.exists():
            break                                          # another process fetched it meanwhile
    return dest


def _fetch(url, dest, tmp, check, timeout):
    """One try of download(). -> True with dest in place, or False when another process held the
    .tmp or wrote to it while this request went out (nothing written then: the caller looks again)."""
    try:
        have = asked = tmp.stat().st_size
    except FileNotFoundError:                              # none yet (or another process just renamed it)
        have = asked = 0
    try:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    except ValueError as e:   # 'unknown url type', a malformed host: nothing to connect to
        raise OSError(f"{url}: not a URL that can be fetched ({e})") from None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if have and getattr(r, "status", None) != 206:
                have = 0                                   # the range was ignored: from the start
            size = r.headers.get("Content-Length")
            try:   # only once there is something to write
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _Local(f"{dest.parent}: cannot create it ({e.strerror}); choose another data folder") from None
            with open(tmp, "ab") as f:                     # "ab": never truncate what another process writes
                if not _my_turn(f, tmp, dest, asked):
                    return False
                with progress(total=int(size) + have if size else None, desc=dest.name, unit="B") as bar:
                    bar.update(have)
                    f.truncate(have)
                    f.seek(have)                           # "ab" and _my_turn left it at the old end
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                    if size and f.tell() != have + int(size):  # the server closed early: http.client does not say
                        raise http.client.IncompleteRead(b"", have + int(size) - f.tell())
                f.flush()                                  # the check reads the file: a file under one write
                os.fsync(f.fileno())                       # buffer (4 KiB) was still all in memory here
                _finish(tmp, dest, check)                  # still holding the .tmp's lock
                return True
    except _Local:
        raise
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):                  # 416 with a .tmp: it is already whole
            raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if getattr(e, "filename", None) == str(tmp):      # writing the .tmp here failed, not the network
            raise OSError(f"{tmp}: cannot write ({e.strerror}); free space or choose another data folder") from None
        why = "the connection closed early" if isinstance(e, http.client.IncompleteRead) else \
            getattr(e, "reason", None) or f"{type(e).__name__} {e}".strip()
        again = f"; run again to resume {tmp.name}" if tmp.exists() and tmp.stat().st_size else ""
        raise OSError(f"{url}: download failed ({why}){again}") from None
    with open(tmp, "ab") as f:                             # the 416: check the whole .tmp and rename it
        if not _my_turn(f, tmp, dest, asked):
            return False
        _finish(tmp, dest, check)
    return True


def _my_turn(f, tmp, dest, asked):
    """Lock the open .tmp f for this process (flock; waiting, with one note, while another process
    holds it). -> whether it is this process's to write: False if it had to wait, if dest is in
    place by now, or if the .tmp is no longer `asked` bytes long (another process wrote to it)."""
    waited = False
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: {dest}: another process is downloading it; waiting", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            waited = True
    end = f.seek(0, os.SEEK_END)
    try:   # still the file at the .tmp's path (not one that another process renamed or deleted meanwhile)
        ours = os.stat(tmp).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        ours = False
    if ours and end == 0 and dest.exists():
        tmp.unlink()                                       # the empty .tmp this open made after the other's rename
    return ours and not (waited or dest.exists() or end != asked)


def _finish(tmp, dest, check):
    if check is not None:
        try:
            check(tmp)
        except ValueError:
            tmp.unlink()
            raise
    os.replace(tmp, dest)


def file_hash(path, kind):
    """A file's checksum, read in 16 MB chunks: md5 | sha256 | gitsha1 (git's blob id, the sha1 of
    b"blob <size>\\0" + the bytes, which the hub and git record for files they do not sha256)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)) if kind == "gitsha1" else hashlib.new(kind)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class MissingData(FileNotFoundError):
    """Data files that are not there and could not be fetched: `failed` lists each as 'path <- where
    it comes from[: why]', so that a caller checking several datasets (what=None) can name them all
    in one line."""
    def __init__(self, what, failed, fetch, hint=""):
        self.failed, self.fetch, self.hint = failed, fetch, hint
        super().__init__(f"{what + ': ' if what else ''}missing data files{'' if fetch else ' (offline)'}; put them at: "
                         + "; ".join(failed) + hint)


def ensure_files(what, key, folder, files, fetch=True, verify=True):
    """{name: path} of pinned data files in folder, fetching the missing ones (download():
    resumable, checked, renamed into place; from the mirror's <key>/<name> under RIGSA_DATA_MIRROR).
    files: [(name, url, kind, digest, size or None)]. A file that is there with another size or
    checksum is an error (it is not the pinned data); verify=False accepts the files there as they
    are (stand-in data: the demo, the tests). Missing files that could not be fetched are named all
    at once, each with where to put it and where it comes from (MissingData). `what` names the data
    in errors."""
    folder = Path(folder)
    for d in (folder, *folder.parents):   # a file where the folder or one above it should be: no fetch can help
        if d.exists():
            if not d.is_dir():
                raise ValueError(f"{d}: not a directory; the {what} files go in {folder}")
            break
    mirror = os.environ.get(DATA_MIRROR)
    paths, failed = {}, []
    for name, url, kind, digest, size in files:
        path = paths[name] = folder / name

        def differs(p, kind=kind, digest=digest, size=size):
            have = os.path.getsize(p)
            if size is not None and have != size:   # the size first: a cheap check
                return f"{have} bytes, expected {size}"
            got = file_hash(p, kind)
            return None if got == digest else f"{kind} {got}, expected {digest}"
        if path.exists() or path.is_symlink():
            if not path.is_file():   # a folder, a broken link, a named pipe (its read would wait forever)
                raise ValueError(f"{path}: not a file" + (" (a broken link)" if not path.exists() else "")
                                 + f"; put the {what} file {name} there (from {url})")
            if verify and (bad := differs(path)):
                raise ValueError(f"{path}: not the original {what} file ({bad}; pinned from {url}); "
                                 + ("delete it to download it again" if fetch else "replace it with the original")
                                 + ", or pass --no-verify for stand-in data")
            continue
        src = data_url(url, f"{key}/{name}")

        def check(p, src=src, name=name, path=path):
            if bad := differs(p):
                raise ValueError(f"{src}: served a file that is not the original {what} {name} ({bad}); "
                                 + (f"fix the mirror or unset {DATA_MIRROR}" if mirror else f"put the original at {path}"))
        where = f"{src} (from {DATA_MIRROR}, a copy of {url})" if mirror else url
        if not fetch:
            failed.append(f"{path} <- {where}")
            continue
        try:
            download(src, path, check)
        except OSError as e:  # offline or unreachable: listed below, all at once
            why = str(e)
            failed.append(f"{path} <- {where}: {why[len(src) + 2:] if why.startswith(src + ': ') else why}")
    if failed:
        raise MissingData(what, failed, fetch, f" (or set {DATA_MIRROR} to a mirror holding {key}/<file>)"
                          if fetch and not mirror else "")
    return paths


# -----------------------------------------------------------------------------
# progress: tqdm on a terminal; in a log file, one whole line per interval

class _LogLines:
    """A file for tqdm when stderr is not a terminal: each redraw ('\\r' + status) becomes one
    line, the empty first draw (n = 0) and exact repeats are dropped."""
    def __init__(self, f):
        self.f, self.last, self.first = f, None, True

    def write(self, s):
        s = s.lstrip("\r").rstrip()
        if not s:
            return
        if self.first or s == self.last:
            self.first = False
            return
        self.last = s
        self.f.write(s + "\n")

    def flush(self):
        self.f.flush()


def progress(iterable=None, total=None, desc="", unit="it", enabled=True):
    """tqdm with a rate and ETA on stderr. On a terminal it redraws in place at the terminal's
    width; in a log it writes one line every 30 s and a last line at close. TQDM_DISABLE=1 (or
    enabled=False) turns it off. Use set_postfix(..., refresh=False) so a postfix does not
    force a line."""
    tty = sys.stderr.isatty()
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false") or world()[0] != 0
    try:   # a terminal of size 0x0 (`script`, `docker run -t`) hides tqdm's bar: 100 columns, 24 rows instead
        sized = tty and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        sized = False
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=off,
                file=sys.stderr if tty else _LogLines(sys.stderr), dynamic_ncols=sized,
                **({} if sized or not tty else {"ncols": 100, "nrows": 24}), ascii=not tty,
                mininterval=0.5 if tty else 30.0, miniters=None if tty else 1)  # a log: exactly one line per 30 s

# -----------------------------------------------------------------------------
# command lines: one error style (error: <thing>: <what is wrong>; <what to do>)

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: <what>; see <prog> --help`, exit 2 (not
    the usage block, which for `rigsa.py train` is sixty flags long). Subcommands inherit it."""
    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def number(kind=int, lo=None, hi=None, lo_open=False, hi_open=False, auto=False):
    """An argparse type: a `kind` (int or float) in the interval from lo to hi (None: unbounded;
    *_open: the bound itself excluded), or the word 'auto' if allowed. argparse names the flag."""
    want = ("an integer" if kind is int else "a number") + "".join(
        f" {op} {b}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi)) if b is not None)
    want += " or 'auto'" if auto else ""

    def parse(s):
        if auto and s == "auto":
            return s
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {want}") from None
        if x != x or x in (float("inf"), float("-inf")) or (lo is not None and (x < lo or lo_open and x == lo)) or \
                (hi is not None and (x > hi or hi_open and x == hi)):
            raise argparse.ArgumentTypeError(f"{s} is out of range: expected {want}")
        return x
    parse.want = want   # for --help
    return parse


def comma_list(choices, noun):
    """An argparse type: a comma-separated list of `choices`, spaces around them dropped -> the same list,
    cleaned; a name that is none of them (a `noun`) is named before anything runs, rather than running
    nothing and exiting 0."""
    def parse(s):
        got = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in got if x not in choices]
        if bad or not got:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or repr(s)}: not a {noun}; the {noun}s are "
                                             f"{', '.join(choices)} (comma-separated)")
        return ",".join(got)
    return parse


def nonempty(what):
    """An argparse type: the string as typed, refused when empty (an empty path is the current directory,
    an empty --model or --adapter the default or none: each unasked); `what` says what to name instead."""
    def parse(s):
        if not s.strip():
            raise argparse.ArgumentTypeError(f"empty; name {what}")
        return s
    return parse


def numbers(kind=int, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type for a number (as number()) or a comma-separated list of them: one value,
    or a tuple (a schedule). A tuple survives JSON as a list: configs turn lists back into tuples."""
    one = number(kind, lo, hi, lo_open, hi_open)

    def parse(s):
        s = str(s).strip("()[] ").replace(" ", "")
        xs = tuple(one(x) for x in s.split(",") if x) if "," in s else (one(s),)
        if not xs:
            raise argparse.ArgumentTypeError(f"{s!r} is not {one.want}, or a comma-separated list of them")
        return xs[0] if len(xs) == 1 else xs
    parse.want = one.want + ", or a comma-separated list of them"
    return parse

# -----------------------------------------------------------------------------
# the device, and CPU memory

def pick_device(name=None):
    """None or "auto" -> cuda if available, else cpu; "cuda" (or "cuda:1") without CUDA is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):   # meta, mps, xpu, ...: not devices this toolkit runs on
        raise ValueError(f"--device {name!r}: not a device this toolkit runs on; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def native_bf16(device):
    """Why `device` computes bfloat16 natively, or None: "CUDA", or a CPU with "AMX" or "AVX512-BF16"
    (read at run time: the same wheel runs on CPUs with and without them, where bfloat16 is emulated
    and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        for why, has in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
            if getattr(torch.cpu, has, lambda: False)():
                return why
    return None


# environment variables that make a math library take other kernels than its own choice, per device: MKL's
# and oneDNN's instruction sets and reproducibility modes on the CPU, cuBLAS's TF32 for float32 on CUDA
KERNEL_VARS = {"cpu": ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
                       "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"),
               "cuda": ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")}


def fp32_matmuls(device):
    """How the device's float32 matmuls are allowed to compute, if below full precision: "bf16" or
    "tf32" (torch.backends.{mkldnn,cuda}.matmul.fp32_precision, which set_float32_matmul_precision also
    sets), else None. The legacy getter raises once the per-backend API has been used."""
    backend = {"cpu": "mkldnn", "cuda": "cuda"}.get(torch.device(device).type)
    try:
        p = getattr(torch.backends, backend).matmul.fp32_precision
    except (AttributeError, TypeError):   # a torch without the per-backend API
        try:
            p = {"highest": None}.get(torch.get_float32_matmul_precision(), "below float32")
        except RuntimeError:
            p = None
    return None if p in (None, "none", "ieee") else p


def machine(device):
    """What, beyond torch's version, a run's last bits depend on: the device's kind and model, and on a
    CPU the instructions its kernels use: torch's vector kernels (AVX2 and AVX512 round a softmax
    differently) and AMX or AVX512-BF16. A cloud VM's model name alone ("Intel(R) Xeon(R) Processor")
    can stand for CPUs with and without AVX-512. Then the device's KERNEL_VARS that are set and float32
    matmuls allowed below full precision (fp32_matmuls): MKL_ENABLE_INSTRUCTIONS=AVX2 moves a trained
    adapter by 1e-4 while the CPU reads the same. "cpu: AMD EPYC (AVX512, AVX512-BF16)",
    "cpu: Intel(R) Xeon(R) Processor (AVX512; MKL_CBWR=COMPATIBLE)", "cuda: NVIDIA H200". Records made
    before 2026-12-06 lack the kernel level ("cpu: AMD EPYC (AVX512-BF16)")."""
    device = torch.device(device)
    env = [f"{k}={os.environ[k]}" for k in KERNEL_VARS.get(device.type, ()) if os.environ.get(k)]
    env += [f"float32 matmuls in {p}"] if (p := fp32_matmuls(device)) else []
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}" + (f" ({'; '.join(env)})" if env else "")
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    has = ", ".join(h for h in (getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(), native_bf16(device)) if h)
    said = "; ".join(([has] if has else []) + env)
    return f"{device.type}: {name}" + (f" ({said})" if said else "")


def emulated(dtype, device):
    """What to add to a dtype's reason where `device` is a CPU that computes it without native
    instructions ('' elsewhere): it is taken, as asked or as a run started, and said. float16 on a
    CPU without AMX-FP16 is converted around float32 kernels: 2-4x slower than float32 (AVX512-BF16 EPYC)."""
    if torch.device(device).type != "cpu":
        return ""
    if dtype == torch.bfloat16 and not native_bf16(device):
        return "; emulated on this cpu (no AMX or AVX512-BF16): many times slower than float32"
    if dtype == torch.float16 and not getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)():
        return "; emulated on this cpu (no AMX-FP16): slower than float32"
    return ""


def auto_dtype(name, device):
    """A --dtype flag's value -> (torch dtype, why): auto is bfloat16 where `device` computes it natively
    (mixed precision: autocast, float32 master weights and optimizer state), else float32; any other
    name is itself, as asked."""
    if name not in (None, "auto"):
        return getattr(torch, name), "as asked" + emulated(getattr(torch, name), device)
    why = native_bf16(device)
    return (torch.bfloat16, f"auto: {why}") if why else (torch.float32, f"auto: no native bfloat16 on this {torch.device(device).type}")


def merge_record(path):
    """rigsa-merge.json, the record write_merged leaves in a merged model's folder, as a dict. Not to be
    deleted when damaged: without it a float32 merge is taken for any checkpoint (merge_dtype)."""
    fix = "merge again, or pass --dtype float32 (or bfloat16) to choose the dtype yourself"
    try:
        d = read_json(Path(path))
    except (OSError, ValueError) as e:   # ValueError: not JSON, not UTF-8
        raise ValueError(f"{path}: not readable as rigsa.py merge's record ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); {fix}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not rigsa.py merge's record (a {type(d).__name__}, not a JSON object); {fix}")
    return d


def merge_dtype(flag, dtype, why, path):
    """--dtype `flag`, resolved to (dtype, why) by auto_dtype, for the model folder `path`: a float32
    merge (its rigsa-merge.json says so) holds deltas that bfloat16 would round away (rigsa.py merge
    --dtype bfloat16 says how much), so auto keeps it in float32, for evaluation and for training on it
    alike (a damaged record is refused: which it is cannot be told); bfloat16 typed is taken, as asked,
    with a note."""
    merged = Path(path) / "rigsa-merge.json"
    auto = flag in (None, "auto")
    if dtype != torch.bfloat16 or not merged.is_file():
        return dtype, why
    try:
        if merge_record(merged).get("dtype") != "float32":
            return dtype, why
    except ValueError:
        if auto:
            raise
        return dtype, why   # bfloat16 as asked, whatever the merge was
    if auto:
        return torch.float32, "auto: a float32 merge of an adapter, whose small deltas bfloat16 would round away"
    say(f"note: --dtype bfloat16: {path} is a float32 merge of an adapter, whose small deltas bfloat16 rounds "
             f"away (rigsa.py merge --dtype bfloat16 says how much); --dtype auto keeps it in float32", file=sys.stderr)
    return dtype, why


# -----------------------------------------------------------------------------
# torchrun: several processes (one per GPU, or gloo processes on the CPU); rank 0 speaks and writes

def init_distributed(device=None):
    """Under torchrun (WORLD_SIZE > 1), join the process group once: NCCL when the device is CUDA
    (this rank's own GPU, LOCAL_RANK), gloo on the CPU. -> this process's device. Where torchrun did not
    start the process (WORLD_SIZE, RANK, MASTER_ADDR left in the shell, or another launcher), the wait
    for the others is said first; and in any case Ctrl-C and SIGTERM end the wait at once (their
    default: the handshake's C++ wait never runs a Python handler, and nothing is written yet)."""
    dev = pick_device(device)
    if dev.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        dev = torch.device("cuda", interrupts.env_count("LOCAL_RANK", 0))
        torch.cuda.set_device(dev)
    if (n := interrupts.env_count("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        for name in interrupts.COUNTS:   # each a number, before any work (the signal handlers read them leniently)
            interrupts.env_count(name, 0)
        if lack := [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]:
            raise ValueError(f"WORLD_SIZE={n} in the environment without {', '.join(lack)}: not torchrun's processes "
                             f"(its variables left in the shell?); unset WORLD_SIZE to run one process, or start "
                             f"them with torchrun")
        main = threading.current_thread() is threading.main_thread()   # signal.signal's only thread
        handlers = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM) if main}
        try:
            if not interrupts.torchrun():
                print(f"note: WORLD_SIZE={n} and RANK={os.environ['RANK']} in the environment (not torchrun): waiting "
                      f"at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} for {n - 1} other "
                      f"process{'es' * (n > 2)}; Ctrl-C stops, and unsetting WORLD_SIZE runs one process",
                      file=sys.stderr, flush=True)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    return dev


def exit_distributed(code=0):
    """Under torchrun, at the end of a run that every rank finished: wait for the others, leave the
    process group and end the process with `code` at once, flushing stdout and stderr first; a
    single process returns. Measured on the CPU: a rank that left while another still had its
    connections open aborted at exit ("terminate called without an active exception", SIGABRT) in
    4 of 25 two-process evaluations; with the barrier alone, still once in about 70 (always in the
    interpreter's finalization, where gloo's threads are torn down, as pytorch/pytorch#179291
    describes). Nothing is left to run at that point: the files are written and closed."""
    if not dist.is_initialized():
        return
    rank = dist.get_rank()   # asked before the group is gone
    try:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])   # this rank's GPU, not a guess
        else:
            dist.barrier()
        dist.destroy_process_group()
    except RuntimeError:   # another rank failed after the last collective and left: it said why
        print(f"error: rank {rank}: another process stopped before the end (its error is above)",
              file=sys.stderr)
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def abandon_distributed():
    """On an error: leave the process group without waiting for the others (they may be waiting in
    another collective, or have failed too); the process then exits with its error."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world():
    """(this process's rank, the number of processes): torchrun's, or (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_zero_first(fn):
    """fn() on rank 0, then on the other ranks once rank 0 has succeeded: a download happens once
    instead of every rank writing the same .tmp file, and the others find it (checking it as
    usual). If rank 0 fails, it raises its error and the others stop with a line pointing at it.
    Single process: fn()."""
    rank, ranks = world()
    if ranks == 1:
        return fn()
    ok = [False]
    if rank == 0:
        try:
            out = fn()
            ok = [True]
            return out
        finally:
            dist.broadcast_object_list(ok, src=0)
    dist.broadcast_object_list(ok, src=0)
    if not ok[0]:
        raise RuntimeError(f"rank {rank}: rank 0 failed to fetch or check the files (its error is above)")
    return fn()


def say(*args, **kw):
    """print, on rank 0 only (every rank computes the same thing; one says it)."""
    if world()[0] == 0:
        print(*args, **kw)


def shard(n):
    """This rank's contiguous share of n items, as a slice (the shares in rank order are the whole)."""
    rank, size = world()
    return slice(rank * n // size, (rank + 1) * n // size)


def gather(part):
    """Every rank's `part` (a list), joined in rank order, on every rank: with shard() the whole list."""
    if world()[1] == 1:
        return part
    parts = [None] * world()[1]
    dist.all_gather_object(parts, part)
    return [x for p in parts for x in p]


def same_on_every_rank(settings):
    """Under torchrun every process runs one command: `settings` ({name: value}, as this process has
    them) must be rank 0's. Nodes launched with another flag (a --limit, a --data-dir, an --lr) would
    shard one run by another's numbers and print a wrong accuracy, or wait at a collective the others
    never reach. -> None; else ValueError, on every rank, naming what differs."""
    if world()[1] == 1:
        return
    every = [json.loads(s) for s in gather([json.dumps(settings, sort_keys=True, default=str)])]
    differ = {}   # name -> the first rank whose value is not rank 0's
    for r, d in enumerate(every[1:], 1):
        for k in sorted(set(d) | set(every[0])):
            if d.get(k) != every[0].get(k):
                differ.setdefault(k, r)
    if differ:
        raise ValueError("torchrun: the processes were not given the same " + "; ".join(
            f"{k} ({every[0].get(k)!r} on rank 0, {every[r].get(k)!r} on rank {r})" for k, r in sorted(differ.items()))
            + "; every process must run the same command, on every node")


def all_reduce_grads(params, loss, device):
    """The gradients of `params` and the float `loss` summed across ranks, after a whole accumulated
    batch: one all-reduce per tensor, without wrapping the model in DDP (a pruning replaces the
    compact layers' tensors, and DDP's buckets with them). A tensor this rank's rows gave no gradient
    joins with zeros. -> (the summed loss, the seconds it took)."""
    t0 = time.perf_counter()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    t = torch.tensor(loss, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item(), time.perf_counter() - t0   # ends with a host sync (.item()): the transfers are done


def kth_largest(chunks, k):
    """The k-th largest value of non-negative float32 tensors (a callable yielding them, so that
    nothing is concatenated): two histogram passes over the bit patterns, whose integer order is
    the float order for x >= 0. Exact, memory O(largest chunk), any number of elements."""
    hist = torch.zeros(1 << 16, dtype=torch.long)
    for x in chunks():
        hist += torch.bincount((x.view(torch.int32) >> 16).long(), minlength=1 << 16).cpu()
    at_least = hist.flip(0).cumsum(0).flip(0)               # [b] = count with high bits >= b
    hi = int((at_least >= k).nonzero().max())
    above = int(at_least[hi + 1]) if hi + 1 < (1 << 16) else 0
    hist = torch.zeros(1 << 16, dtype=torch.long)
    for x in chunks():
        bits = x.view(torch.int32)
        hist += torch.bincount((bits[(bits >> 16) == hi] & 0xFFFF).long(), minlength=1 << 16).cpu()
    at_least = hist.flip(0).cumsum(0).flip(0) + above
    lo = int((at_least >= k).nonzero().max())
    return torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()


_on_device = {}


def on_device(t, device):
    """A small constant table (a module-level tensor) on `device`, copied there once, not per call."""
    key = (id(t), str(device))
    if key not in _on_device:
        _on_device[key] = t.to(device)
    return _on_device[key]


def keep_freed_memory():
    """CPU runs: glibc hands big freed blocks back to the OS (mmap above a threshold, heap trim),
    so every forward pass page-faults its activations afresh (BENCHMARKS.md, make bench-evals).
    Keep freed memory for reuse instead, as tcmalloc/jemalloc would. The CLIs call this at start;
    a no-op where libc is not glibc. Returns whether both settings took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 31))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def git_commit():
    """The commit of this checkout (-dirty with uncommitted changes), for the runs' provenance: git asked
    from here, whatever GIT_* variables a git hook or `rebase -x` exports (another repository's)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}   # GIT_DIR, GIT_COMMON_DIR, ...
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, env=env)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, env=env)
        return (sha.stdout.strip() or "none") + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


# the folders whose sources compute numbers, beside the top level's own .py files; a folder of one's own
# counts too where it is a package (its __init__.py): an environment, a build or a copy of the checkout is not
CODE_DIRS = ("lib", "evals")
NOT_CODE_FILES = {"reproduce.py", "conftest.py"}   # reproduce.py only orders the commands (a run records their code)


def code_files(root):
    """Every .py file a number may pass through: rigsa.py, model.py, qlora.py, cli.py and any module a
    researcher adds beside them (a helper rigsa.py imports changes the numbers as an edit of rigsa.py
    does), and lib/, evals/ and any package folder at the top, with their subfolders; not tests/, bench/,
    docs/, data/, runs/, NOT_CODE_FILES, test_*.py, hidden files and folders, links to nothing, or a
    folder with a pyvenv.cfg (an environment)."""
    root = Path(root)

    def wanted(folder, f):
        return (f.endswith(".py") and not f.startswith((".", "test_")) and os.path.isfile(os.path.join(folder, f))
                and not (f in NOT_CODE_FILES and folder == str(root)))
    found = [root / f for f in os.listdir(root) if wanted(str(root), f)]
    tops = [d for d in sorted(os.listdir(root)) if not d.startswith(".") and os.path.isdir(root / d)
            and not os.path.islink(root / d) and (d in CODE_DIRS or os.path.isfile(root / d / "__init__.py"))
            and d not in ("tests", "bench", "docs", "data", "runs")]
    for top in tops:
        for here, dirs, files in os.walk(root / top):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                       and not os.path.exists(os.path.join(here, d, "pyvenv.cfg"))]
            found += [Path(here) / f for f in files if wanted(here, f)]
    return sorted(found)


def code_hash(root):
    """The sources under `root` that compute a number (code_files), as the first 12 hex digits of one
    sha256 over their paths and bytes."""
    h = hashlib.sha256()
    for p in code_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


_CODE = code_hash(Path(__file__).resolve().parent.parent)   # at import: the code this process runs, even if a
                                                            # git pull changes the files during hours of work


def code_version():
    """What a run and an evaluation record of the code that made them (code_hash of this checkout, as
    imported), so that results of other code are told apart. The git commit is recorded too, but it moves
    with every commit (a README's too), reads "-dirty" for an edit of any tracked file, and is unknown
    outside a git checkout."""
    return _CODE
