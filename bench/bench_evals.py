"""
evals/ against lm-evaluation-harness' HF backend, same model, same documents, same machine, same run:
throughput (docs/s) and parity (log-likelihoods, predictions, generations, extracted answers).

    python bench/bench_evals.py [--data-dir data] [--limit-piqa 200] [--limit-hellaswag 20]
                                [--limit-gsm8k 128] [--limit-gsm8k-lm-eval 8] [--repeats 3]

The model is SmolLM2-135M-shaped (--preset) with random weights (std 0.02), written once in the
official layout, float32 on CPU for both (bfloat16 with --device cuda). A random model never emits
a stop string, so every GSM8k generation runs the full 256 tokens: the worst case for both sides.
--model DIR takes a trained checkpoint instead (bench/train_text_model.py makes one whose generations
are text: numbers, "####" answers, stops at "Question:"), for generation parity beyond the first token.
The GPU target, the full three-task evaluation of a 1.7B-shaped model:

    python bench/bench_evals.py --preset SmolLM2-1.7B-Instruct --device cuda --ours-only \
        --limit-piqa 0 --limit-hellaswag 0 --limit-gsm8k 0

The tokenizer is a byte-level BPE with SmolLM2's pipeline (Digits then ByteLevel, ChatML specials
0/1/2) trained here on the evaluation text (the real tokenizer.json is not available offline);
lm-eval gets it as a PreTrainedTokenizerFast so that transformers 5 keeps the digit splitting
(AutoTokenizer's GPT2Tokenizer rebuilds the pipeline without the Digits step). lm-eval reads local
json through custom task yamls made from its own installed piqa/hellaswag/gsm8k yamls (only the
dataset lines change); it never touches the hub.
PIQA and GSM8k need their files under --data-dir; HellaSwag uses hellaswag_val.jsonl there when
present, otherwise HellaSwag-shaped documents synthesised from GSM8k text (marked in the output).
--check-requests only compares, on every document, the requests lm-eval's own task objects build
(plain and --apply_chat_template) with evals/tasks.py; no model runs.
Needs `pip install -r requirements-bench.txt` (lm-eval 0.4.13, accelerate).
"""
import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import model as M  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402
from evals import run as R  # noqa: E402
from evals import tasks as T  # noqa: E402


def synth_hellaswag(test, n, seed=0):
    # HellaSwag-shaped documents from GSM8k sentences: label, ctx_a, a lower-case ctx_b fragment,
    # four sentence endings, some with WikiHow tags, so that lengths and preprocessing are exercised
    rnd = random.Random(seed)
    sents = [s.strip() for d in test for s in re.split(r"(?<=[.?!])\s+", d["question"]) if len(s) > 20]
    docs = []
    for i in range(n):
        a, b = rnd.sample(sents, 2)
        words = b.split()
        ctx_b = rnd.choice([" ".join(words[:4]).lower()] * 4 + ["", "THE man", "he [title] x", "a  b"])
        docs.append({"ind": i, "activity_label": "Word problems", "ctx_a": a, "ctx_b": ctx_b,
                     "endings": [rnd.choice(["", "", "", "[step] ", "[header] a [title] ", "  "]) +
                                 " ".join(rnd.choice(sents).split()[:18]) for _ in range(4)],
                     "label": rnd.randrange(4), "split": "val"})
    return docs


def make_task_dir(tmp, task, files):
    """A copy of lm-eval's own task yaml with the dataset read from local json files."""
    import lm_eval
    src = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", task)
    y = open(os.path.join(src, f"{task}.yaml")).read()
    y = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", y)
    y = re.sub(r"(?m)^task: .*$", f"task: bench_{task}", y)
    y = re.sub(r"(?m)^dataset_path: .*$", "dataset_path: json", y)
    y = re.sub(r"(?m)^dataset_name: .*$", "dataset_name: null", y)
    if "train" not in files:
        y = re.sub(r"(?m)^training_split: .*$", "training_split: null", y)
    y += "dataset_kwargs:\n  data_files:\n" + "".join(f"    {k}: {v}\n" for k, v in files.items())
    d = os.path.join(tmp, "tasks", task)
    os.makedirs(d)
    open(os.path.join(d, f"{task}.yaml"), "w").write(y)
    if os.path.exists(os.path.join(src, "utils.py")):  # hellaswag's process_docs, used as installed
        shutil.copy(os.path.join(src, "utils.py"), d)


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


def check_requests(tmp, tok, train, test, piqa, hs):
    """lm-eval's own ConfigurableTask requests (plain and --apply_chat_template with multi-turn
    few-shot) against evals/tasks.py, on every document: contexts, continuations, targets."""
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=tok.path, bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = tiny.CHAT_TEMPLATE
    lm_chat = lambda msgs, add_generation_prompt=True: hf.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    my_chat = lambda msgs: tok.chat(msgs, add_generation_prompt=True)  # noqa: E731
    tm = TaskManager(include_path=os.path.join(tmp, "tasks"))
    ok = True
    for chat in (False, True):
        for name, task in get_task_dict(["bench_piqa", "bench_hellaswag", "bench_gsm8k"], tm).items():
            task.set_fewshot_seed(seed=1234)
            task.build_all_requests(apply_chat_template=chat, fewshot_as_multiturn=chat,
                                    chat_template=lm_chat if chat else None)
            theirs = [tuple(i.arguments) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]
            if name == "bench_gsm8k":
                shots = T.gsm8k_fewshot_indices(len(test), len(train))
                mine = [T.gsm8k_prompt(train, d, sh, my_chat if chat else None) for d, sh in zip(test, shots)]
                same = mine == [t[0] for t in theirs] and all(t[1]["until"] == T.GSM8K_UNTIL for t in theirs)
            else:
                mc = T.mc_docs(name[6:], piqa if name == "bench_piqa" else hs, my_chat if chat else None)
                same = [(d["context"], c) for d in mc for c in d["continuations"]] == theirs and \
                    [d["target"] for d in mc] == [task.doc_to_target(x) for x in task.eval_docs]
            print(f"requests {name[6:]:<9} {'chat ' if chat else 'plain'} {len(theirs):>5} equal to lm-eval's: {same}")
            ok &= same
    return ok


TASKS = ("piqa", "hellaswag", "gsm8k")


def lm_eval_batch(s):
    """--lm-eval-batch-size: what lm-eval's HFLM takes, a count from 1, auto or auto:N; kept a string."""
    if s != "auto":
        util.number(int, 1)(s.removeprefix("auto:"))   # not a count: its ArgumentTypeError, one line
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.path.join(REPO, "data"))
    ap.add_argument("--limit-piqa", type=util.number(int, 0), default=200, help="0: every document")
    ap.add_argument("--limit-hellaswag", type=util.number(int, 0), default=20, help="0: every document")
    ap.add_argument("--limit-gsm8k", type=util.number(int, 0), default=128, help="0: every document (128: one full batch on CPU)")
    ap.add_argument("--limit-gsm8k-lm-eval", type=util.number(int, 0), default=8,
                    help="lm-eval on only the first M of those docs (0: all): at batch 1 it handles "
                         "documents one by one, so its docs/s does not depend on how many it gets")
    ap.add_argument("--preset", default="SmolLM2-135M-Instruct", choices=list(M.PRESETS), help="model shape")
    ap.add_argument("--model", default=None,
                    help="a checkpoint directory with its tokenizer.json instead of the random --preset model, "
                         "e.g. bench/train_text_model.py's, whose generations are text")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both sides")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--also-float32", action="store_true",
                    help="also time evals/ with float32 weights in the same run (the exact reference), and compare "
                         "both bfloat16 sides' predictions and log-likelihoods with it (with --dtype bfloat16)")
    ap.add_argument("--ours-only", action="store_true",
                    help="time evals/ alone (no lm-eval), e.g. the full three-task run on a GPU")
    ap.add_argument("--batch-size", type=util.number(int, 1, auto=True), default="auto", help="ours")   # as evals/run.py's
    ap.add_argument("--lm-eval-batch-size", type=lm_eval_batch, default="1", help="lm-eval's (its default is 1)")
    ap.add_argument("--tasks", type=util.comma_list(TASKS, "task"), default="piqa,hellaswag,gsm8k")
    ap.add_argument("--threads", type=util.number(int, 1), default=None, help="torch threads for both sides")
    ap.add_argument("--repeats", type=util.number(int, 1), default=3, help="alternating runs per side; the fastest counts")
    ap.add_argument("--repeats-gsm8k", type=util.number(int, 1), default=1, help="the same for gsm8k (minutes per run)")
    ap.add_argument("--output", default=None, help="write the numbers as JSON")
    ap.add_argument("--no-verify", action="store_true",
                    help="accept data files whose checksum differs from the pin (a partial copy); marked in the header")
    ap.add_argument("--check-requests", action="store_true",
                    help="only compare every document's requests with lm-eval's own (no model runs)")
    a = ap.parse_args()
    try:   # a typo, or cuda without CUDA: one line now, not torch's traceback after the data and the model
        a.device = str(util.pick_device(a.device))   # "auto" resolved: the rest reads a device name
    except ValueError as e:
        sys.exit(f"error: {e}")
    util.keep_freed_memory()  # both sides: they share this process
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype_name = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if not a.ours_only:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
        except ImportError as e:
            raise SystemExit(f"bench_evals needs lm-eval: pip install -r requirements-bench.txt ({e})")
    tasks = a.tasks.split(",")
    tmp = tempfile.mkdtemp(prefix="bench_evals_")
    try:
        # ---- data: local json for both sides
        vf = not a.no_verify
        try:   # no data/ (MissingData), a damaged file: one line, as the commands say it, not a traceback
            train, test = T.load_gsm8k(T.ensure_files("gsm8k", a.data_dir, verify=vf))
            piqa = T.load_piqa(T.ensure_files("piqa", a.data_dir, verify=vf))
            hs_path = os.path.join(a.data_dir, "hellaswag", "hellaswag_val.jsonl")
            hs_real = os.path.exists(hs_path)
            hs = T.load_hellaswag(T.ensure_files("hellaswag", a.data_dir, verify=vf)) if hs_real \
                else synth_hellaswag(test, a.limit_hellaswag or 10042)   # the real file's 10042 documents
        except (OSError, ValueError) as e:
            sys.exit(f"error: {' '.join(str(e).split())}")
        ddir = os.path.join(tmp, "data")
        for t in ("piqa", "hellaswag", "gsm8k"):
            os.makedirs(os.path.join(ddir, t))
        write_jsonl(os.path.join(ddir, "piqa", "valid.jsonl"), [{k: d[k] for k in ("goal", "sol1", "sol2")} for d in piqa])
        open(os.path.join(ddir, "piqa", "valid-labels.lst"), "w").write("".join(f"{d['label']}\n" for d in piqa))
        write_jsonl(os.path.join(ddir, "piqa", "lm_eval.jsonl"), piqa)
        write_jsonl(os.path.join(ddir, "hellaswag", "hellaswag_val.jsonl"), hs)
        shutil.copy(os.path.join(a.data_dir, "gsm8k", "train.jsonl"), os.path.join(ddir, "gsm8k"))
        shutil.copy(os.path.join(a.data_dir, "gsm8k", "test.jsonl"), os.path.join(ddir, "gsm8k"))
        if not a.ours_only:
            make_task_dir(tmp, "piqa", {"validation": os.path.join(ddir, "piqa", "lm_eval.jsonl")})
            make_task_dir(tmp, "hellaswag", {"validation": os.path.join(ddir, "hellaswag", "hellaswag_val.jsonl")})
            make_task_dir(tmp, "gsm8k", {"train": os.path.join(ddir, "gsm8k", "train.jsonl"),
                                         "test": os.path.join(ddir, "gsm8k", "test.jsonl")})

        if a.check_requests:
            tdir = tiny.write_tiny_checkpoint(os.path.join(tmp, "tiny"))  # only its tokenizer's chat() is used
            _, ttok = M.load(str(tdir))
            hs_all = T.load_hellaswag({"hellaswag_val.jsonl": os.path.join(ddir, "hellaswag", "hellaswag_val.jsonl")})
            raise SystemExit(0 if check_requests(tmp, ttok, train, test, piqa, hs_all) else 1)

        # ---- model: SmolLM2-shaped, random, official layout; a BPE trained on the evaluation text
        if a.model:
            mdir = a.model
        else:
            mdir = os.path.join(tmp, "model")
            os.makedirs(mdir)
            cfg = M.PRESETS[a.preset]
            texts = [d["question"] + "\n" + d["answer"] for d in train + test] + \
                    [d["goal"] + " " + d["sol1"] + " " + d["sol2"] for d in piqa]
            tiny.write_tokenizer(mdir, cfg.vocab_size, texts)
            tiny.write_random_checkpoint(mdir, cfg, seed=0)
        try:
            ours, tok = M.load(mdir, device=a.device, dtype=dtype)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise SystemExit(f"--model: {e}")
        cfg = ours.config
        ours32 = M.load(mdir, device=a.device, dtype=torch.float32)[0] if a.also_float32 else None
        what = f"{mdir} ({cfg.hidden_size} wide, {cfg.num_hidden_layers} layers)" if a.model else \
            f"{a.preset}-shaped random model"
        sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
        if not a.ours_only:
            hf = LlamaForCausalLM.from_pretrained(mdir, dtype=dtype).to(a.device).eval()
            hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(mdir, "tokenizer.json"), bos_token="<|im_start|>",
                                             eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
            lm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=a.lm_eval_batch_size, device=a.device)
            from lm_eval.tasks import TaskManager
            tm = TaskManager(include_path=os.path.join(tmp, "tasks"))
        dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else (platform.processor() or platform.machine())
        print(f"# {what}, {dtype_name}, {a.device} ({dev_name}), {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}" + ("" if a.ours_only else f", lm_eval {lm_eval.__version__}") +
              f"; tokenizer vocab {tok.vocab_size}, model vocab {cfg.vocab_size}; hellaswag {'real' if hs_real else 'SYNTHETIC'}"
              + ("; data checksums NOT verified (--no-verify)" if a.no_verify else ""), flush=True)

        def our_args(limit, softmax="float32"):
            return SimpleNamespace(limit=limit, chat=False, no_verify=True, offline=True, batch_size=a.batch_size, seed=None,
                                   model=mdir, adapter=None, quantize=None, num_fewshot=None, data_dir=ddir,
                                   softmax_dtype=softmax)

        data = {}

        def ours_run(task, limit, model=None, softmax="float32"):
            args = our_args(limit, softmax)
            if task not in data:   # read once, as evals/run.py does before the model loads
                data[task] = R.load_data(task, args)[0]
            info = {"model": mdir, "dtype": "float32" if model else dtype_name, "quantize": None}
            sync()
            r = R.run_task(task, data[task], model or ours, tok, args, info)[0]
            sync()
            return r

        # warm-up of both sides (first-call allocations and thread pools cost seconds on CPU)
        ours_run("piqa", 2)
        if not a.ours_only:
            lm_eval.simple_evaluate(model=lm, tasks=["bench_piqa"], task_manager=tm, limit=1, bootstrap_iters=0)
        rows = []
        for task in tasks:
            limit = getattr(a, f"limit_{task}") or None
            if a.ours_only:
                mine = ours_run(task, limit)
                row = {"task": task, "docs": mine["docs"], "ours_s": mine["seconds"],
                       "ours_docs_per_s": round(mine["docs_per_s"], 4), "ours_batch": mine["batch_size"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            ref_limit = (a.limit_gsm8k_lm_eval or limit) if task == "gsm8k" else limit
            # alternate the two sides `repeats` times and keep each one's fastest: other processes on
            # a shared machine then slow both alike instead of whichever ran at the wrong moment
            t_ours, t_ref, t_32 = [], [], []
            for _ in range(a.repeats_gsm8k if task == "gsm8k" else a.repeats):
                mine = ours_run(task, limit)
                t_ours.append(mine["seconds"])
                if ours32 is not None:
                    exact = ours_run(task, limit, ours32)
                    t_32.append(exact["seconds"])
                sync()
                t0 = time.time()
                res = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{task}"], task_manager=tm, limit=ref_limit,
                                              log_samples=True, bootstrap_iters=0)
                sync()
                t_ref.append(time.time() - t0)
            ref = sorted(res["samples"][f"bench_{task}"], key=lambda s: s["doc_id"])
            n_ours, n_ref = mine["docs"], len({r["doc_id"] for r in ref})
            mine["seconds"], t_refs, t_ref = min(t_ours), t_ref, min(t_ref)
            ours_rate, ref_rate = n_ours / mine["seconds"], n_ref / t_ref
            row = {"task": task, "docs": n_ours, "lm_eval_docs": n_ref, "ours_s": mine["seconds"],
                   "lm_eval_s": round(t_ref, 3), "ours_docs_per_s": round(ours_rate, 4),
                   "lm_eval_docs_per_s": round(ref_rate, 4), "speedup": round(ours_rate / ref_rate, 2),
                   "ours_batch": mine["batch_size"], "lm_eval_batch": a.lm_eval_batch_size,
                   "ours_runs_s": t_ours, "lm_eval_runs_s": [round(t, 3) for t in t_refs]}
            if ours32 is not None:   # both bfloat16 sides against the float32 reference, on the same documents
                row.update(ours_float32_s=min(t_32), speedup_vs_float32=round(min(t_32) / mine["seconds"], 2))
                if task in ("piqa", "hellaswag"):
                    ex = {s["doc_id"]: s for s in exact["samples"]}
                    for side, samples in (("ours", mine["samples"]),
                                          ("lm_eval", [{"doc_id": r["doc_id"], "acc": r["acc"],
                                                        "loglikelihoods": [x[0] for x in r["filtered_resps"]]} for r in ref])):
                        d = [abs(x - y) for s in samples for x, y in zip(s["loglikelihoods"], ex[s["doc_id"]]["loglikelihoods"])]
                        flips = sum(s["acc"] != ex[s["doc_id"]]["acc"] for s in samples)
                        row[f"{side}_vs_float32"] = dict(flips=flips, mean_abs_dll=round(sum(d) / len(d), 4),
                                                         max_abs_dll=round(max(d), 4))
                    f32 = ours_run(task, limit, softmax="model")   # ours, the log-softmax in bfloat16 as lm-eval's
                    d = [abs(x - y) for s in f32["samples"] for x, y in zip(s["loglikelihoods"], ex[s["doc_id"]]["loglikelihoods"])]
                    row["ours_softmax_model_vs_float32"] = dict(
                        flips=sum(s["acc"] != ex[s["doc_id"]]["acc"] for s in f32["samples"]),
                        mean_abs_dll=round(sum(d) / len(d), 4), max_abs_dll=round(max(d), 4), seconds=f32["seconds"])
                else:
                    ex = {s["doc_id"]: s["generation"] for s in exact["samples"]}
                    row["ours_vs_float32"] = dict(same_generations=sum(s["generation"] == ex[s["doc_id"]]
                                                                       for s in mine["samples"]))
            if task in ("piqa", "hellaswag"):
                diffs, same = [], 0
                for s, r in zip(mine["samples"], ref):
                    lls = [x[0] for x in r["filtered_resps"]]
                    diffs += [abs(x - y) for x, y in zip(s["loglikelihoods"], lls)]
                    same += (s["acc"] == r["acc"]) and (s["acc_norm"] == r["acc_norm"])
                row.update(max_abs_ll_diff=max(diffs), same_predictions=f"{same}/{len(ref)}",
                           acc=[mine["metrics"]["acc"], res["results"][f"bench_{task}"]["acc,none"]])
            else:
                by = {}
                for r in ref:
                    by.setdefault(r["doc_id"], {})[r["filter"]] = r
                same_gen = same_ext = 0
                for s in mine["samples"][:n_ref]:
                    r = by[s["doc_id"]]
                    same_gen += s["generation"] == r["strict-match"]["resps"][0][0]
                    same_ext += (s["strict"] == r["strict-match"]["filtered_resps"][0]) and \
                                (s["flexible"] == r["flexible-extract"]["filtered_resps"][0])
                # what the generations exercised: a random model repeats one token, so nothing is found
                gens = [s["generation"] for s in mine["samples"][:n_ref]]
                row.update(same_generations=f"{same_gen}/{n_ref}", same_extracted=f"{same_ext}/{n_ref}",
                           distinct_generations=len(set(gens)),
                           strict_found=sum(s["strict"] != "[invalid]" for s in mine["samples"][:n_ref]),
                           exact_match_strict=[mine["metrics"]["exact_match_strict"],
                                               res["results"]["bench_gsm8k"]["exact_match,strict-match"]])
            print(json.dumps(row), flush=True)
            rows.append(row)
        if a.ours_only:
            print(f"\n{'task':<10} {'docs':>6} {'seconds':>9} {'docs/s':>8}")
            for r in rows:
                print(f"{r['task']:<10} {r['docs']:>6} {r['ours_s']:>9.1f} {r['ours_docs_per_s']:>8.2f}")
            print(f"{'total':<10} {sum(r['docs'] for r in rows):>6} {sum(r['ours_s'] for r in rows):>9.1f}")
        else:
            print(f"\n{'task':<10} {'docs':>9} {'ours s':>8} {'lm-eval s':>10} {'ours doc/s':>11} {'lm-eval doc/s':>14} "
                  f"{'speedup':>8}  parity")
            for r in rows:
                par = (f"max|dll|={r['max_abs_ll_diff']:.2e} same={r['same_predictions']}" if "max_abs_ll_diff" in r
                       else f"generations={r['same_generations']} extracted={r['same_extracted']}")
                print(f"{r['task']:<10} {r['docs']:>4}/{r['lm_eval_docs']:<4} {r['ours_s']:>8.1f} {r['lm_eval_s']:>10.1f} "
                      f"{r['ours_docs_per_s']:>11.3f} {r['lm_eval_docs_per_s']:>14.3f} {r['speedup']:>7.2f}x  {par}")
        if a.output:
            R.write_json(a.output, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
