"""
Speed of model.py against transformers' LlamaForCausalLM on the same weights, in one run.

    python bench/bench_model.py [--preset SmolLM2-135M-Instruct] [--dtype float32] [--device cpu]

Prefill: tokens/s of one forward over an 850-token prompt (about a 5-shot GSM8k prompt).
Decode: batched greedy generation of 256 new tokens (eos ignored) at batch 1 and 8, new tokens/s.
Weights are random (no download), written once in the official layout and read by both.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as M  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402


def timeit(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=util.number(int, 1), default=850)
    ap.add_argument("--new-tokens", type=util.number(int, 1), default=256)
    ap.add_argument("--batches", type=util.numbers(int, 1), default="1,8", help="decode batch sizes, comma-separated")
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after the models are built
        a.device = str(util.pick_device(a.device))   # "auto" resolved: the rest reads a device name
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()  # both sides: they share this process
    from transformers import LlamaForCausalLM
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    cfg = M.PRESETS[a.preset]
    with tempfile.TemporaryDirectory() as d:
        tiny.write_random_checkpoint(d, cfg, seed=0)
        tiny.write_tokenizer(d)  # load() wants a tokenizer; the benchmark feeds ids directly
        ours, _ = M.load(d, device=dev, dtype=dtype)
        ref = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    ids = torch.randint(3, cfg.vocab_size, (1, a.prompt_len), generator=g).to(dev)
    with torch.inference_mode():
        assert (ours(ids[:, :64]) - ref(input_ids=ids[:, :64]).logits).abs().max() < 1e-3  # same weights
        t_ours = timeit(lambda: ours(ids), 3)
        t_ref = timeit(lambda: ref(input_ids=ids, logits_to_keep=0), 3)
    rows.append(("prefill, 1 x %d tokens" % a.prompt_len, a.prompt_len / t_ours, a.prompt_len / t_ref))
    for B in a.batches if isinstance(a.batches, tuple) else (a.batches,):   # util.numbers: one, or a tuple
        prompts = [torch.randint(3, cfg.vocab_size, (64 + 8 * i,), generator=g).tolist() for i in range(B)]
        N = a.new_tokens

        def run_ours():
            out = M.generate_ids(ours, prompts, N, eos_id=-1)
            assert all(len(o) == N for o in out)

        def run_ref():
            L = max(len(p) for p in prompts)
            x = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=dev)
            am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
            out = ref.generate(input_ids=x, attention_mask=am, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == L + N

        t_ours, t_ref = timeit(run_ours, 1), timeit(run_ref, 1)
        rows.append((f"greedy decode, batch {B} x {N} new", B * N / t_ours, B * N / t_ref))
    print(f"\n{a.preset}-shaped random model, {a.dtype}, {a.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}\n")
    print("| measurement | model.py tokens/s | transformers tokens/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, o, r in rows:
        print(f"| {name} | {o:,.1f} | {r:,.1f} | {o / r:.2f}x |")


if __name__ == "__main__":
    main()
