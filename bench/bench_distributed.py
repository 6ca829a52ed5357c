"""
Data parallel on this CPU: the same training steps and the same evaluation in 1 process
of 1 thread, and on torchrun in 2 gloo processes of 1 thread each; the speed-up, and the share of
the 2-process training step spent in the gradients' all-reduce (metrics.jsonl's comm_s).

    python bench/bench_distributed.py [--layers 4] [--steps 6] [--docs 40]

The model is SmolLM2-135M's layer shape (576 wide, 9/3 heads, MLP 1536; --layers of them) with
random weights and a byte-level tokenizer (no download); the training data are synthetic 28x28
digits, so a prompt is a Textual MNIST prompt's length (about 850 tokens); the evaluation is PIQA-
shaped, synthetic (--docs documents). Both sides run the same commands, only torchrun differs.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as M  # noqa: E402
import rigsa  # noqa: E402
from lib import mnist  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402


def run(n, script, args, cwd):
    """Seconds of `script args` in one process, or on torchrun in n processes; one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd + [os.path.join(REPO, script), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: {script} on {n} process(es) failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=util.number(int, 1), default=4, help="decoder layers of the 135M shape [default: 4]")
    ap.add_argument("--steps", type=util.number(int, 1), default=6, help="optimizer steps (batch 4, micro-batch 1) [default: 6]")
    ap.add_argument("--docs", type=util.number(int, 1), default=40, help="PIQA-shaped documents evaluated [default: 40]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"], help="rigsa.py's and evals/run.py's --dtype [default: float32, as the "
                    "recorded tables; auto: bfloat16 on a CPU that computes it]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = ["".join(str(i % 10) for i in range(28)) + "\n", "Question: How do I open a jar? Answer: twist the lid"]
        V = tiny.write_tokenizer(os.path.join(tmp, "m"), vocab_size=512, texts=texts * 50)
        cfg = M.SmolLM2Config(**{**M.PRESETS["SmolLM2-135M-Instruct"].__dict__, "num_hidden_layers": a.layers,
                                 "vocab_size": V})
        tiny.write_random_checkpoint(os.path.join(tmp, "m"), cfg, seed=0)
        mnist.write_synthetic_mnist(os.path.join(tmp, "data", "mnist"), n_train=64, n_test=8, size=28)
        os.makedirs(os.path.join(tmp, "data", "piqa"))
        with open(os.path.join(tmp, "data", "piqa", "valid.jsonl"), "w") as f:
            for i in range(a.docs):
                f.write(json.dumps({"goal": f"How do I open jar number {i} that is stuck?",
                                    "sol1": "Twist the lid under hot water, then use a towel for grip.",
                                    "sol2": "Hit the jar on the floor until the lid comes off by itself."}) + "\n")
        with open(os.path.join(tmp, "data", "piqa", "valid-labels.lst"), "w") as f:
            f.write("".join(f"{i % 2}\n" for i in range(a.docs)))
        train = ["train", "--model", os.path.join(tmp, "m"), "--data-dir", os.path.join(tmp, "data"), "--device", "cpu",
                 "--dtype", a.dtype, "--offline", "--no-verify", "--method", "rigsa", "--iters", "1", "--steps", str(a.steps), "--warmup", "2",
                 "--batch-size", "4", "--micro-batch", "1", "--limit", "2", "--no-eval-test", "--save-every", "0",
                 "--log-every", str(a.steps)]
        ev = ["--task", "piqa", "--model", os.path.join(tmp, "m"), "--data-dir", os.path.join(tmp, "data"),
              "--no-verify", "--offline", "--batch-size", "8", "--dtype", a.dtype]
        t = {}
        for n in (1, 2):
            t["train", n] = run(n, "rigsa.py", train + ["--out", os.path.join(tmp, f"run{n}")], tmp)
            t["eval", n] = run(n, "evals/run.py", ev + ["--output", os.path.join(tmp, f"ev{n}.json")], tmp)
        tok = M.load_tokenizer(os.path.join(tmp, "m"))
        x, y = mnist.load_mnist(os.path.join(tmp, "data", "mnist"), "test", verify=False)
        T = len(rigsa.encode_example(tok, x[0], y[0], rigsa.digit_ids(tok), rigsa.end_id(tok))[0])
        last = {n: [json.loads(r) for r in open(os.path.join(tmp, f"run{n}", "metrics.jsonl")) if '"step"' in r][-1]
                for n in (1, 2)}
        ev = {n: json.load(open(os.path.join(tmp, f"ev{n}.json"))) for n in (1, 2)}
    loop2 = a.steps * 4 * T / last[2]["tok_s"]                   # seconds of the 2-process training loop
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{a.dtype}, {a.layers} layers of the 135M shape, {a.steps} steps of 4 sequences of {T} tokens (micro-batch 1); "
          f"PIQA-shaped, {a.docs} documents\n")
    print("| work | 1 process (1 thread) | 2 gloo processes (1 thread each) | speed-up | all-reduce share |")
    print("|---|---:|---:|---:|---:|")
    print(f"| training loop, tokens/s | {last[1]['tok_s']:.0f} | {last[2]['tok_s']:.0f} | "
          f"{last[2]['tok_s'] / last[1]['tok_s']:.2f}x | {last[2]['comm_s'] / loop2:.1%} |")
    print(f"| training, whole command, s | {t['train', 1]:.1f} | {t['train', 2]:.1f} | {t['train', 1] / t['train', 2]:.2f}x | |")
    print(f"| PIQA, documents/s | {ev[1]['docs_per_s']:.2f} | {ev[2]['docs_per_s']:.2f} | "
          f"{ev[2]['docs_per_s'] / ev[1]['docs_per_s']:.2f}x | |")
    print(f"| PIQA, whole command, s | {t['eval', 1]:.1f} | {t['eval', 2]:.1f} | {t['eval', 1] / t['eval', 2]:.2f}x | |")
    same = all(max(abs(u - v) for u, v in zip(p["loglikelihoods"], q["loglikelihoods"])) < 1e-4
               for p, q in zip(ev[1]["samples"], ev[2]["samples"]))
    print(f"\nthe 2-process PIQA samples equal the 1-process ones (log-likelihoods within 1e-4): {same}; "
          f"the all-reduce took {last[2]['comm_s']:.2f} s of the 2-process loop's {loop2:.1f} s")

if __name__ == "__main__":
    main()
