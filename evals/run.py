"""
Evaluate a SmolLM2 checkpoint, optionally with an adapter, on the paper's source tasks (PIQA,
HellaSwag 0-shot, GSM8k 5-shot; paper §4.3, Table 3, Figures 2-3) and its target task (Textual
MNIST; paper §4.2, Table 2), giving the numbers lm-evaluation-harness 0.4.x would give.

    python evals/run.py --task piqa --model HuggingFaceTB/SmolLM2-1.7B-Instruct --limit 100
    python evals/run.py --task all --adapter runs/rigsa/iter3 --output results.json

Plain-text prompts are the default and match the paper, which says it used the LM Evaluation
Harness (paper §5.2) and mentions no chat template; lm-eval's default is plain text too.
--chat reproduces lm-eval's --apply_chat_template (multi-turn few-shot, its default since 0.4.10).
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make model.py, rigsa.py, qlora.py and evals/ importable
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import model as M  # noqa: E402
import qlora  # noqa: E402
import rigsa  # noqa: E402
import util  # noqa: E402
from evals import harness as H  # noqa: E402
from evals import tasks as T  # noqa: E402

TASKS = ["piqa", "hellaswag", "gsm8k", "mnist"]
DEFAULT_SHOTS = {"piqa": 0, "hellaswag": 0, "gsm8k": T.GSM8K_SHOTS, "mnist": 0}  # Table 2 also has 5-shot MNIST


def batch_size_for(args, model, longest, rows_per_item, generate=False):
    if args.batch_size == "auto":
        return H.auto_batch_size(model, longest, rows_per_item, generate=generate)
    return int(args.batch_size)


def eval_mc(task, model, tok, args, data_dir):
    paths = T.ensure_files(task, data_dir, download=not args.offline, verify=not args.no_verify)
    docs = T.load_piqa(paths) if task == "piqa" else T.load_hellaswag(paths)
    docs = docs[:args.limit] if args.limit else docs
    chat = (lambda msgs: tok.chat(msgs, add_generation_prompt=True)) if args.chat else None
    mc = T.mc_docs(task, docs, chat)
    enc = []
    for d in mc:
        pairs = [H.encode_pair(tok, d["context"], c) for c in d["continuations"]]
        # the context is the same string for every choice, hence the same ids: score it once
        enc.append((pairs[0][0], [p[1] for p in pairs]))
    longest = max(len(c) + max(len(x) for x in xs) for c, xs in enc)
    bs = batch_size_for(args, model, longest, max(len(xs) for _, xs in enc))
    bar = util.progress(total=len(enc), desc=task, unit="doc")
    scores = H.score_shared(model, enc, batch_size=bs, bar=bar)
    bar.close()
    samples, accs, norms = [], [], []
    for i, (d, sc) in enumerate(zip(mc, scores)):
        lls = [s[0] for s in sc]
        acc, acc_norm = T.mc_scores(lls, d["choices"], d["target"])
        accs.append(acc)
        norms.append(acc_norm)
        samples.append({"doc_id": i, "target": d["target"], "loglikelihoods": lls,
                        "is_greedy": [s[1] for s in sc], "acc": acc, "acc_norm": acc_norm})
    metrics = {"acc": T.mean(accs), "acc_stderr": T.mean_stderr(accs),
               "acc_norm": T.mean(norms), "acc_norm_stderr": T.mean_stderr(norms)}
    return metrics, samples, bs


def eval_gsm8k(model, tok, args, data_dir, k):
    paths = T.ensure_files("gsm8k", data_dir, download=not args.offline, verify=not args.no_verify)
    train, test = T.load_gsm8k(paths)
    test = test[:args.limit] if args.limit else test
    chat = (lambda msgs: tok.chat(msgs, add_generation_prompt=True)) if args.chat else None
    shots = T.gsm8k_fewshot_indices(len(test), len(train), k)
    prompts = [T.gsm8k_prompt(train, d, s, chat) for d, s in zip(test, shots)]
    # lm-eval adds the decoded EOS to `until` when missing (<|im_end|> for the Instruct models)
    until = list(T.GSM8K_UNTIL)
    eos = tok.decode([tok.eos_id])
    if eos not in until:
        until.append(eos)
    longest = len(tok.encode(max(prompts, key=len))) + T.GSM8K_MAX_NEW
    bs = batch_size_for(args, model, longest, 1, generate=True)
    gens = M.generate(model, tok, prompts, max_new_tokens=T.GSM8K_MAX_NEW, stop=until, batch_size=bs,
                      progress_bar=True)
    samples, strict, flex = [], [], []
    for i, (d, g) in enumerate(zip(test, gens)):
        s, f = T.strict_extract(g), T.flexible_extract(g)
        es, ef = T.exact_match(s, d["answer"]), T.exact_match(f, d["answer"])
        strict.append(es)
        flex.append(ef)
        samples.append({"doc_id": i, "generation": g, "target": d["answer"], "strict": s, "flexible": f,
                        "exact_match_strict": es, "exact_match_flexible": ef, "fewshot_ids": shots[i]})
    metrics = {"exact_match_strict": T.mean(strict), "exact_match_strict_stderr": T.mean_stderr(strict),
               "exact_match_flexible": T.mean(flex), "exact_match_flexible_stderr": T.mean_stderr(flex)}
    return metrics, samples, bs


def eval_mnist(model, tok, args, data_dir, k):
    folder = rigsa.mnist_dir(data_dir)  # rigsa.py owns MNIST's files, prompt and scoring (§4.2)
    kw = dict(download=not args.offline, verify=not args.no_verify)
    images, labels = rigsa.load_mnist(folder, "test", **kw)
    pool = rigsa.load_mnist(folder, "train", **kw) if k else None   # the shots come from the train split
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    longest = len(tok.encode(rigsa.prompt(tok, images[0], [(images[0], 0)] * k)))  # all prompts ~ equal length
    bs = batch_size_for(args, model, longest, 1)
    seed = {} if args.seed is None else {"seed": args.seed}  # default: rigsa's shot-draw seed
    _, preds = rigsa.mnist_accuracy(model, tok, images, labels, shots=k, batch_size=bs, shot_pool=pool, **seed)
    samples, accs = [], []
    for i, (y, p) in enumerate(zip(labels.tolist(), preds.tolist())):
        accs.append(int(p == y))  # p = -1: the next token was not a digit, counted wrong (paper §4.2)
        samples.append({"doc_id": i, "target": y, "prediction": p, "acc": accs[-1]})
    return {"acc": T.mean(accs), "acc_stderr": T.mean_stderr(accs)}, samples, bs


def run_task(task, model, tok, args, dtype_name):
    k = DEFAULT_SHOTS[task] if args.num_fewshot is None else args.num_fewshot
    if task in ("piqa", "hellaswag") and k != 0:
        raise ValueError(f"--num-fewshot {k}: {task} is 0-shot here (paper §4.3; its train split is not among the pinned files)")
    t0 = time.time()
    if task in ("piqa", "hellaswag"):
        metrics, samples, bs = eval_mc(task, model, tok, args, args.data_dir)
    elif task == "gsm8k":
        metrics, samples, bs = eval_gsm8k(model, tok, args, args.data_dir, k)
    else:
        metrics, samples, bs = eval_mnist(model, tok, args, args.data_dir, k)
    dt = time.time() - t0
    return {"task": task, "model": args.model, "adapter": args.adapter, "dtype": dtype_name, "num_fewshot": k,
            "limit": args.limit, "seconds": round(dt, 3), "metrics": metrics, "samples": samples,
            "docs": len(samples), "docs_per_s": len(samples) / max(dt, 1e-9), "batch_size": bs,
            "chat": args.chat, "quantize": args.quantize, "device": str(next(model.parameters()).device),
            "protocol": "lm-evaluation-harness 0.4.x, " + ("--apply_chat_template" if args.chat else "plain text")}


def print_table(results):
    print(f"{'task':<10} {'metric':<22} {'value':>8} {'stderr':>8} {'docs':>6} {'seconds':>9} {'docs/s':>8}")
    for r in results:
        for name, v in r["metrics"].items():
            if name.endswith("_stderr"):
                continue
            se = r["metrics"].get(name + "_stderr")
            print(f"{r['task']:<10} {name:<22} {v:>8.4f} {'N/A' if se is None else f'{se:.4f}':>8} "
                  f"{r['docs']:>6} {r['seconds']:>9.1f} {r['docs_per_s']:>8.2f}")


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    util.write_json(path, obj, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description="PIQA / HellaSwag / GSM8k (lm-eval protocol) and Textual MNIST.")
    ap.add_argument("--task", required=True, choices=TASKS + ["all"])
    ap.add_argument("--model", default=M.DEFAULT_MODEL, help=f"hub id or local directory (default {M.DEFAULT_MODEL})")
    ap.add_argument("--adapter", default=None, help="adapter saved by rigsa.py/qlora.py (RUN/iterK), installed in memory")
    ap.add_argument("--quantize", default=None, choices=["nf4"], help="NF4 base weights (the QLoRA baseline)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents, as lm-eval --limit N")
    ap.add_argument("--batch-size", default="auto", help="documents per batch, or 'auto' (default)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="default: gsm8k 5, others 0")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "data"), help="holds <task>/ folders (default data/)")
    ap.add_argument("--output", default=None, help="write results JSON here")
    ap.add_argument("--chat", action="store_true", help="lm-eval --apply_chat_template mode (the paper used plain)")
    ap.add_argument("--seed", type=int, default=None, help="Textual MNIST few-shot draw (default: rigsa's)")
    ap.add_argument("--no-verify", action="store_true", help="skip checksums of files already present")
    ap.add_argument("--offline", action="store_true", help="never download: missing data files are an error")
    args = ap.parse_args(argv)
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        ap.error(f"--batch-size {args.batch_size!r}: expected a positive integer or 'auto'")
    if args.limit is not None and args.limit <= 0:
        ap.error(f"--limit {args.limit}: expected a positive integer")
    util.keep_freed_memory()
    try:
        return evaluate(args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")


def evaluate(args):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = M.load(args.model, args.device, dtype)
    method = rigsa.read_adapter(args.adapter)[2].method if args.adapter else None
    if args.quantize and method != "qlora":  # a qlora adapter quantizes its base itself
        qlora.quantize_model(model)
    if args.adapter:
        rigsa.load_adapter(model, args.adapter)  # in memory only: nothing is merged on disk
    dtype_name = str(model.lm_head.weight.dtype).replace("torch.", "")
    print(f"model {args.model} adapter {args.adapter} dtype {dtype_name} device "
          f"{model.lm_head.weight.device} chat {args.chat} quantize {args.quantize}", file=sys.stderr)

    results = [run_task(t, model, tok, args, dtype_name) for t in (TASKS if args.task == "all" else [args.task])]
    print_table(results)
    if args.output:
        write_json(args.output, results[0] if args.task != "all" else {r["task"]: r for r in results})
    return results


if __name__ == "__main__":
    main()
