"""Data-parallel training and evaluation on torchrun: 2 gloo processes on the CPU give
the single-process run's adapters (masks identical, values within float32 reduction-order noise)
and its evaluation (the same predictions, generations and answers; log-likelihoods within 1e-4)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import rigsa
from lib import mnist
from lib import util
from conftest import one_thread
from evals import run as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository, above tests/
# measured (tiny model, lr 2e-2, 4 steps an iteration): the dW values of a 2-process run differ from
# the single process's by a median of 0 to 4e-9 (the last bit of values near 0.1) and at most
# 1.1e-4, where AdamW divides a near-zero gradient by its near-zero second moment and the last bit
# of an all-reduced sum moves the update by up to lr; the gates by 4e-6 relative
TOL_MAX, TOL_MEDIAN, TOL_ALPHA = 1e-3, 1e-7, 1e-4


def torchrun(n, script, args, cwd):
    """`torchrun --standalone --nproc-per-node n script args`, one thread a process, on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           os.path.join(REPO, script), *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def close(a_dir, b_dir, iters):
    for k in range(1, iters + 1):
        a, b = load_file(a_dir / f"iter{k}.safetensors"), load_file(b_dir / f"iter{k}.safetensors")
        assert a.keys() == b.keys()
        for n in a:
            if n.endswith((".mask", ".init_seed", ".init_check")):
                assert torch.equal(a[n], b[n]), (k, n)                  # the masks: identical
        d = torch.cat([(a[n] - b[n]).abs().flatten() for n in a if n.endswith((".delta", ".weight"))])
        ref = max(a[n].abs().max().item() for n in a if n.endswith((".delta", ".weight")))
        assert d.max() <= TOL_MAX * ref and d.median() <= TOL_MEDIAN, (k, d.max().item(), d.median().item())
        for n in (n for n in a if n.endswith(".alpha")):
            assert (a[n] - b[n]).abs().item() <= TOL_ALPHA * a[n].abs().item(), (k, n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mnist.write_synthetic_mnist(d / "mnist", n_train=40, n_test=6, size=8)
    return d


def args_for(tiny_dir, data, method, **kw):
    a = dict(model=str(tiny_dir), data_dir=str(data), device="cpu", dtype="float32", steps=4, warmup=2, batch_size=4, micro_batch=1, val_frac=0.1,
             limit=6, log_every=1, save_every=0, offline=True, verify=False, method=method)
    a.update({"iters": 2} if rigsa.METHODS[method]["prunes"] else {})
    a.update({"rank": 2, "lora_lr": 1e-2} if rigsa.METHODS[method]["lora"] else {"lr": 2e-2})
    a.update(kw)
    flags = []
    for k, v in a.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    return a, flags


@pytest.mark.parametrize("method", ["rigsa", "lt-sft", "qlora"])
def test_two_processes_train_the_single_process_adapters(tiny_dir, data, tmp_path, method):
    cfg, flags = args_for(tiny_dir, data, method)
    with one_thread():
        rigsa.train(rigsa.Config(**cfg, out=str(tmp_path / "one")))
    p = torchrun(2, "rigsa.py", ["train", *flags, "--out", str(tmp_path / "two")], tmp_path)
    close(tmp_path / "one", tmp_path / "two", rigsa.n_iters(rigsa.Config(**cfg)))
    assert p.stdout.count("config: ") == 1 and "2 processes, 2-2 sequences each a step" in p.stdout  # rank 0 speaks
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["processes"] == 2 and not list((tmp_path / "two").glob("*.tmp"))


def test_a_run_resumed_on_another_number_of_processes(tiny_dir, data, tmp_path):
    # halted on 2 processes in the first iteration, resumed on 1: it continues from resume.pt (the
    # global state and the global sample order), and ends with the single-process run's adapters
    cfg, flags = args_for(tiny_dir, data, "rigsa")
    with one_thread():
        rigsa.train(rigsa.Config(**cfg, out=str(tmp_path / "one")))
    torchrun(2, "rigsa.py", ["train", *flags, "--out", str(tmp_path / "run"), "--halt-after", "3"], tmp_path)
    assert (tmp_path / "run" / "resume.pt").exists() and not (tmp_path / "run" / "iter1.safetensors").exists()
    with one_thread():
        rigsa.train(rigsa.Config(out=str(tmp_path / "run"), resume=True))
    close(tmp_path / "one", tmp_path / "run", 2)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())   # where it started, and where it went on
    assert saved["processes"] == 2 and saved["resumed_on"] == [{**saved["resumed_on"][0], "processes": 1}]


def test_each_process_resumes_its_own_random_state(tiny_dir, data, tmp_path):
    # LoRA dropout draws from each process's generator, and with 3 sequences a step the two ranks draw
    # different amounts (1 and 2 sequences): a resume restores each rank's own state (rank 0's for
    # both gave rank 1 other dropout masks), so halted and resumed = uninterrupted, bit for bit
    _, flags = args_for(tiny_dir, data, "lora", lora_dropout=0.3, batch_size=3, steps=5)
    torchrun(2, "rigsa.py", ["train", *flags, "--out", str(tmp_path / "one")], tmp_path)
    torchrun(2, "rigsa.py", ["train", *flags, "--out", str(tmp_path / "run"), "--halt-after", "2"], tmp_path)
    assert (tmp_path / "run" / "resume.pt").exists()
    p = torchrun(2, "rigsa.py", ["train", "--out", str(tmp_path / "run"), "--resume"], tmp_path)
    assert "2 processes, 1-2 sequences each a step" in p.stdout
    a, b = (load_file(tmp_path / d / "iter1.safetensors") for d in ("one", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    losses = [[json.loads(x).get("loss") for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "run")]
    assert losses[0] == losses[1]


def test_a_resume_pt_of_either_form_restores_the_random_state():
    # rng_states' per-rank list (here one process), and an earlier version's bare CPU state
    from lib import rundir
    cpu = torch.device("cpu")
    for form in (rundir.rng_states, lambda _: torch.get_rng_state()):
        saved = form(cpu)
        want = torch.rand(4)
        rundir.set_rng_states(saved, cpu)
        assert torch.equal(torch.rand(4), want)


def test_evaluation_on_two_processes_equals_one(tiny_dir, tmp_path):
    # documents sharded across ranks, the few-shot draws over all of them first (1 shot: 2 would pass the tiny
    # model's 2,048 positions), rank 0 gathering:
    # the same samples as one process, log-likelihoods within 1e-4
    sys.path.insert(0, os.path.join(REPO, "evals"))
    import test_evals
    test_evals._write_data(tmp_path)
    common = ["--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline", "--limit", "5",
              "--batch-size", "2", "--dtype", "float32"]   # the exact path, on any CPU (auto: bfloat16 on some)
    one, two = {}, {}
    for name, task in (("all", ["--task", "all"]), ("mnist5", ["--task", "mnist", "--num-fewshot", "1"])):
        with one_thread():
            R.main(common + task + ["--output", str(tmp_path / f"one-{name}.json")])
        torchrun(2, "evals/run.py", common + task + ["--output", str(tmp_path / f"two-{name}.json")], tmp_path)
        for d, n in ((one, "one"), (two, "two")):
            r = json.loads((tmp_path / f"{n}-{name}.json").read_text())
            r = {r["task"]: r} if "task" in r else r          # one task: its result itself
            d.update({f"{t}-{name}": v for t, v in r.items()})
    assert one.keys() == two.keys() == {"piqa-all", "hellaswag-all", "gsm8k-all", "mnist-all", "mnist-mnist5"}
    assert one["mnist-mnist5"]["num_fewshot"] == 1
    for task in one:
        for a, b in zip(one[task]["samples"], two[task]["samples"], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if k == "loglikelihoods":
                    assert max(abs(x - y) for x, y in zip(a[k], b[k])) < 1e-4
                else:
                    assert a[k] == b[k], (task, k)
        assert one[task]["metrics"] == two[task]["metrics"]
    # --task all with one task's data missing: every rank skips it (rank 0 found it missing, the
    # others were told), the other tasks run and are written, the summary is said once, exit 1
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(REPO, "evals/run.py"), *common, "--task", "all", "--output", str(tmp_path / "part.json")]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and p.stderr.count("error: --task all: 1 of 4 tasks failed (hellaswag") == 1, p.stderr[-3000:]
    assert sorted(json.loads((tmp_path / "part.json").read_text())) == ["gsm8k", "mnist", "piqa"]


def test_rank_zero_first_stops_the_others_when_rank_zero_fails(tmp_path):
    script = tmp_path / "rzf.py"
    script.write_text(f"""import sys, torch.distributed as dist
sys.path.insert(0, {REPO!r})
from lib import util
dist.init_process_group("gloo")
rank = dist.get_rank()
def fn():
    print(f"fn ran on rank {{rank}}", flush=True)
    if rank == 0:
        raise OSError("the download failed")
    return 1
try:
    util.rank_zero_first(fn)
except (OSError, RuntimeError) as e:
    print(f"rank {{rank}} raised {{type(e).__name__}}: {{e}}", flush=True)
dist.destroy_process_group()
""")
    out = torchrun(2, str(script), [], tmp_path).stdout
    assert "fn ran on rank 0" in out and "fn ran on rank 1" not in out   # no second download after a failure
    assert "rank 0 raised OSError: the download failed" in out
    assert "rank 1 raised RuntimeError: rank 1: rank 0 failed" in out


def test_the_end_of_a_run_waits_for_every_rank_and_exits_with_its_code(tmp_path):
    # util.exit_distributed: two gloo processes started by hand (not torchrun, which would kill the
    # survivor): both finish -> both exit with the code given, unflushed output kept; one fails after
    # the last collective -> the other, done with code 0, says so in one line and exits 1 instead, no
    # traceback, no hang
    import socket
    script = tmp_path / "end.py"
    script.write_text(f"""import sys; sys.path.insert(0, {REPO!r})
import signal
import torch.distributed as dist
from lib import util
mine = lambda *a: None
signal.signal(signal.SIGINT, mine)
util.init_distributed("cpu")   # the handshake takes the default handlers: the process's own again after it
assert signal.getsignal(signal.SIGINT) is mine, signal.getsignal(signal.SIGINT)
dist.barrier()   # the last collective: both joined (a rank gone during the other's join is gloo's own error)
if sys.argv[1] == "fail" and dist.get_rank() == 0:
    util.abandon_distributed()
    sys.exit("error: rank 0 failed")
print("done", dist.get_rank(), end="")   # no newline: only a flush before the exit writes it
util.exit_distributed(3 if sys.argv[1] == "ok" else 0)
""")
    for mode in ("ok", "fail"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONUNBUFFERED", None)   # a pipe is block-buffered, as in a batch job's log
        ps = [subprocess.Popen([sys.executable, str(script), mode], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=120) for p in ps]
        codes = [p.returncode for p in ps]
        if mode == "ok":
            assert codes == [3, 3] and [o for o, _ in outs] == ["done 0", "done 1"], (codes, outs)
        else:
            assert codes == [1, 1] and "error: rank 0 failed" in outs[0][1], (codes, outs)
            err = outs[1][1]
            assert "error: rank 1: another process stopped before the end" in err and "Traceback" not in err, err


def test_processes_given_other_flags_are_refused_and_one_process_commands_say_so(tiny_dir, data, tmp_path,
                                                                                  monkeypatch):
    # each node of a multi-node job types its own command: a --limit of 40 on one and 200 on the other
    # sharded one evaluation by the other's numbers (accuracy 0.50 printed, 0.95 true), another --iters left
    # rank 0 waiting at a collective for 30 minutes. Two processes started by hand, as two nodes, with other
    # flags: refused on each, naming the flag, before any model loads
    import socket
    ev = ["evals/run.py", "--task", "mnist", "--model", str(tiny_dir), "--data-dir", str(data), "--offline",
          "--no-verify", "--device", "cpu", "--limit"]
    tr = ["rigsa.py", "train", *args_for(tiny_dir, data, "rigsa", out=str(tmp_path / "run"))[1], "--iters"]
    for argv, flag, said in ((ev, ["2", "4"], "--limit (2 on rank 0, 4 on rank 1)"),
                             (tr, ["1", "3"], "--iters (1 on rank 0, 3 on rank 1)")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        ps = [subprocess.Popen([sys.executable, os.path.join(REPO, argv[0]), *argv[1:], flag[r]], cwd=tmp_path,
                               env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        errs = [p.communicate(timeout=120)[1] for p in ps]
        assert [p.returncode for p in ps] == [1, 1] and all(
            f"error: torchrun: the processes were not given the same {said}; every process must run the same command"
            in e for e in errs), errs
    assert not (tmp_path / "run").exists()
    import cli   # the commands that run in one process say so, once, rather than race for one --out
    said = "error: rigsa.py merge runs in one process; run it without torchrun"
    shell = "error: rigsa.py merge runs in one process; unset WORLD_SIZE (in the environment, not torchrun's)"
    monkeypatch.setenv("WORLD_SIZE", "2")
    # torchrun's rank 1 leaves the line to rank 0; a RANK=1 left in the shell (no torchrun) exited 1 without a word
    for rank, run_id, code in (("0", "1", said), ("1", "1", 1), ("1", "", shell), ("0", "", shell)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        with pytest.raises(SystemExit) as e:
            cli.main(["merge", "--adapter", str(tmp_path / "a" / "iter1"), "--out", str(tmp_path / "m")])
        assert e.value.code == code
    from lib import interrupts
    for name in ("LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):   # each launcher count, before any wait or work
        with monkeypatch.context() as m:
            m.setenv("TORCHELASTIC_RUN_ID", "1")
            m.setenv(name, "abc")
            with pytest.raises(ValueError, match=f"^{name}='abc' in the environment: not a whole number"):
                util.init_distributed("cpu")
            assert interrupts.speaks() in (True, False) and interrupts.launcher()   # the handlers' reads never raise
    monkeypatch.setenv("WORLD_SIZE", "abc")   # int()'s words, and a traceback in rigsa.py
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", "--adapter", str(tmp_path / "a" / "iter1"), "--out", str(tmp_path / "m")])
    assert e.value.code == ("error: WORLD_SIZE='abc' in the environment: not a whole number (torchrun sets it for "
                            "each process it starts); unset it to run one process")
    assert not (tmp_path / "m").exists()


def test_torchrun_variables_left_in_the_shell_are_said_and_a_signal_ends_the_wait(tiny_dir, data, tmp_path):
    # WORLD_SIZE=2 RANK=0 MASTER_ADDR/PORT left in the shell, no torchrun: train waited for a rank 1 that never came,
    # without a word, and SIGTERM and Ctrl-C did nothing (gloo's C++ wait runs no Python handler): only SIGKILL
    # ended it, after 10 minutes. Now the wait is said, and either signal ends it; nothing is written
    import select
    import socket
    argv = [sys.executable, os.path.join(REPO, "rigsa.py"), "train", "--model", str(tiny_dir), "--data-dir", str(data),
            "--offline", "--no-verify", "--out", str(tmp_path / "run")]
    for sig in (signal.SIGINT, signal.SIGTERM):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": "0",
               "OMP_NUM_THREADS": "1"}
        env.pop("TORCHELASTIC_RUN_ID", None)
        p = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert select.select([p.stderr], [], [], 60)[0], "nothing said within 60 s"   # fails, not hangs, without it
            line = p.stderr.readline()
            assert line == (f"note: WORLD_SIZE=2 and RANK=0 in the environment (not torchrun): waiting at 127.0.0.1:"
                            f"{port} for 1 other process; Ctrl-C stops, and unsetting WORLD_SIZE runs one process\n"), line
            time.sleep(0.5)   # inside the handshake's wait
            p.send_signal(sig)
            assert p.wait(timeout=20) == -sig and not (tmp_path / "run").exists()
        finally:   # a wait that ignores the signal is the bug: not left behind
            p.kill()
            p.stderr.close()
    env.pop("MASTER_ADDR")   # nothing to wait at: one line, no wait, no torch words
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == ("error: WORLD_SIZE=2 in the environment without MASTER_ADDR: not "
                                              "torchrun's processes (its variables left in the shell?); unset WORLD_SIZE "
                                              "to run one process, or start them with torchrun\n"), r.stderr

def test_two_processes_in_bfloat16_follow_one(tiny_dir, data, tmp_path):
    # the low-precision path on torchrun: each rank's share of a batch in bfloat16, the float32 gradients
    # summed across ranks; the losses follow the single process's within bfloat16's rounding, and IMP
    # keeps the same number of entries (the masks may differ where scores tie within that rounding)
    cfg, flags = args_for(tiny_dir, data, "rigsa", dtype="bfloat16")
    with one_thread():
        one = rigsa.train(rigsa.Config(**cfg, out=str(tmp_path / "one")))
    torchrun(2, "rigsa.py", ["train", *flags, "--out", str(tmp_path / "two")], tmp_path)
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    loss = lambda log: [r["loss"] for r in log if "loss" in r]
    assert len(loss(one)) == len(loss(two)) and all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(loss(one), loss(two)))
    dens = lambda log: [r["density"] for r in log if r.get("event") == "prune"]
    assert dens(one) == dens(two) and json.loads((tmp_path / "two" / "config.json").read_text())["config"]["dtype"] == "bfloat16"
