"""
GSM8k-shaped batched generation alone (model.generate_ids, no lm-eval): seconds per document for
the first N 5-shot prompts, decoded in one batch, on a random SmolLM2-shaped model.

    python bench/bench_generate.py --data-dir data [--docs 64] [--stop-after 60,200]

A random model never stops on its own. --stop-after LO,HI ends each row after a number of new
tokens drawn uniformly from [LO, HI] (seed 0), as a real model stops at "Question:", so rows leave
the batch at different steps (KVCache.drop). Prefill, decode and the rest are timed apart.
"""
import argparse
import os
import platform
import random
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import model as M  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402
from evals import tasks as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="data", help="holds gsm8k/train.jsonl and gsm8k/test.jsonl")
    ap.add_argument("--no-verify", action="store_true", help="skip the GSM8k files' checksums")
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--docs", type=util.number(int, 1), default=64, help="the first N test documents, one batch")
    ap.add_argument("--stop-after", default=None, help="LO,HI: each row stops after U[LO, HI] new tokens")
    a = ap.parse_args()
    stop = None
    if a.stop_after:
        try:
            lo, hi = (int(x) for x in a.stop_after.split(","))
            if not 1 <= lo <= hi:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--stop-after {a.stop_after!r}: expected LO,HI, two integers with 1 <= LO <= HI")
        rnd = random.Random(0)
        stop = [rnd.randint(lo, hi) for _ in range(a.docs)]
    try:   # no data/ (MissingData), a damaged file: one line, as the commands say it, not a traceback
        train, test = T.load_gsm8k(T.ensure_files("gsm8k", a.data_dir, download=False, verify=not a.no_verify))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    util.keep_freed_memory()
    with tempfile.TemporaryDirectory() as mdir:
        cfg = M.PRESETS[a.preset]
        tiny.write_tokenizer(mdir, cfg.vocab_size, [d["question"] + "\n" + d["answer"] for d in train + test])
        tiny.write_random_checkpoint(mdir, cfg, seed=0)
        model, tok = M.load(mdir, device="cpu", dtype=torch.float32)
    shots = T.gsm8k_fewshot_indices(len(test), len(train))
    prompts = [tok.encode(T.gsm8k_prompt(train, d, s, None)) for d, s in zip(test[:a.docs], shots)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))   # as model.generate does
    t = {"prefill": 0.0, "decode": 0.0}
    forward = model.forward

    def timed(ids, *args, **kw):  # model(...) calls: a prompt's prefill (T > 1) or a decode step
        t0 = time.perf_counter()
        out = forward(ids, *args, **kw)
        t["prefill" if ids.shape[1] > 1 else "decode"] += time.perf_counter() - t0
        return out
    model.forward = timed
    stop_fn = (lambda i, new: len(new) >= stop[order[i]]) if stop else None
    t0 = time.perf_counter()
    out = M.generate_ids(model, [prompts[i] for i in order], 256, eos_id=-1, stop_fn=stop_fn)
    total = time.perf_counter() - t0
    n = a.docs
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{a.preset}, {n} GSM8k prompts in one batch, {sum(map(len, out))} new tokens"
          f"{f', stop after U[{a.stop_after}]' if stop else ''}")
    print(f"total {total:.1f} s = {total / n:.3f} s/doc: prefill {t['prefill']:.1f} s, decode steps "
          f"{t['decode']:.1f} s, the rest (cache allocation, lm_head, rows leaving) "
          f"{total - t['prefill'] - t['decode']:.1f} s")


if __name__ == "__main__":
    main()
