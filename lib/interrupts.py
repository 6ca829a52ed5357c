"""
interrupts.py: Ctrl-C and SIGTERM are ordinary ways to stop a command: one line (what was kept, and
the command that continues), exit 130 / 143, no traceback. Standard library only, so that the
scripts can call early() before torch loads.

  early                  from the scripts' first lines: a signal while the imports run (a second or two)
  stop_as_interrupt      from main(): both signals raise KeyboardInterrupt, so that cleanups run
  interrupted            the signal that stopped this process (an error after it is not a broken file)
  finished               the work done and whole: a signal until the exit is ignored (not a 143 for a complete merge)
  env_count, torchrun    the launcher's counts (WORLD_SIZE, ...) read or refused by name; whether torchrun started us
  command, exit_interrupted   the pasteable command line (torchrun's where it ran on it), and the one line at
                         the end (rank 0's alone: speaks)
"""
import os
import shlex
import shutil
import signal
import sys


SIGNALS = []   # the stopping signals this process received, in order


_BEFORE = {}   # the handlers stop_as_interrupt replaced, put back by stop_as_interrupt(False)


def stop_as_interrupt(on_=True):
    """From here on SIGINT and SIGTERM (a job scheduler's, `kill`) raise KeyboardInterrupt, so that
    every `finally` and cleanup runs on both (SIGTERM's default ends the process on the spot), and
    are remembered: an error that surfaces after one (a read cut short) is the interrupt, not a
    broken file (interrupted()). on_=False, once the work is done: the handlers as they were."""
    def on(signum, frame):
        SIGNALS.append(signum)
        raise KeyboardInterrupt
    try:
        if not on_:
            for s, h in _BEFORE.items():   # early()'s line says "nothing was kept": not once the work is done
                if signal.getsignal(s) is not signal.SIG_IGN:   # finished(): ignored until the exit
                    signal.signal(s, signal.SIG_DFL if h is _early else h)
            _BEFORE.clear()
            return
        SIGNALS.clear()
        for s in (signal.SIGINT, signal.SIGTERM):
            _BEFORE.setdefault(s, signal.getsignal(s))
            signal.signal(s, on)
    except ValueError:   # not the main thread: signals stay as they are
        pass


def finished():
    """The command's work is done and whole (a merge renamed into place, the demo's table printed): a
    signal from here to the process's end changes nothing, so it is ignored, rather than ending a
    complete command with 130 / 143, which a script reads as a failure, and without a word. Only where
    the process is the command's (run as a script), from inside its handlers' span, so that there is no
    moment between them and this with the default's 143."""
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    except ValueError:   # not the main thread
        pass


def interrupted():
    """The signal that stopped this process (0: none): 128 + it is the exit code shells expect."""
    return SIGNALS[-1] if SIGNALS else 0


def python_cmd():
    """How to call this interpreter from a shell: `python` when that is the one on PATH, else its path."""
    w = shutil.which("python")
    return "python" if w and os.path.abspath(w) == os.path.abspath(sys.executable) else sys.executable


COUNTS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")   # what a launcher puts in the environment


def env_count(name, default, strict=True):
    """A count a launcher puts in the environment (COUNTS) as an int; one that is no whole number is a
    ValueError naming the variable, not int()'s words (strict=False: the default, for the signal
    handlers, which must not raise; init_distributed has refused such a value before any work)."""
    value = os.environ.get(name, "")
    if value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        if not strict:
            return default
        raise ValueError(f"{name}={value!r} in the environment: not a whole number (torchrun sets it for each process "
                         f"it starts); unset it to run one process") from None


def torchrun():
    """Whether torchrun started this process (it sets TORCHELASTIC_RUN_ID), rather than variables such as
    WORLD_SIZE and RANK left in the shell, or another launcher's."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def launcher():
    """How this process was launched, after the interpreter: nothing in one process; on torchrun
    (WORLD_SIZE > 1) torchrun with as many processes per machine, so that the line continues the run
    as it ran (another count is taken, but the last bits differ) and says so on each machine."""
    n = env_count("WORLD_SIZE", 1, strict=False)
    local = env_count("LOCAL_WORLD_SIZE", n, strict=False)
    if n <= 1:
        return []
    nodes = ["--standalone"] if n == local else [f"--nnodes={n // max(local, 1)}"]   # more machines: their rendezvous too
    return ["-m", "torch.distributed.run", *nodes, f"--nproc-per-node={local}"]


def speaks():
    """Whether this process prints the stopping lines: one process, or torchrun's rank 0 (from the
    environment: a signal handler makes no collective call); each process where torchrun did not start
    them (a RANK left in the shell stays silent no more)."""
    return env_count("WORLD_SIZE", 1, strict=False) <= 1 or os.environ.get("RANK", "0") == "0" or not torchrun()


def command(script, argv):
    """`python <script> <argv>` (on torchrun: `python -m torch.distributed.run ... <script> <argv>`) as a
    shell line to paste in the current directory."""
    rel = os.path.relpath(script)
    return _line([os.path.abspath(script) if rel.startswith("..") else rel, *map(str, argv)])


def _line(words):
    n = env_count("WORLD_SIZE", 1, strict=False)
    several = n > env_count("LOCAL_WORLD_SIZE", n, strict=False)   # machines: each types it, with its rendezvous flags
    return ("on each machine, with the rendezvous flags it started with: " if several else "") + \
        shlex.join([python_cmd(), *launcher(), *words])


def exit_interrupted(what):
    """The CLIs' end on Ctrl-C or SIGTERM: one line (the signal, then `what`: what was kept and the
    command that continues), exit 128 + the signal (130, 143), no traceback."""
    sig = interrupted() or signal.SIGINT
    if not os.environ.get("RIGSA_QUIET_STOP") and speaks():   # reproduce.py's steps: it says what to do, once
        print(f"{signal.Signals(sig).name}: stopped; {what}", file=sys.stderr)
    sys.exit(128 + sig)


def _early(signum, frame):
    if not os.environ.get("RIGSA_QUIET_STOP") and speaks():
        print(f"{signal.Signals(signum).name}: stopped; nothing was kept; run again with: "
              f"{_line(sys.argv)}", file=sys.stderr)
    sys.exit(128 + signum)


def early():
    """A script's first lines, before its heavy imports: a signal then ends it in one line."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _early)
