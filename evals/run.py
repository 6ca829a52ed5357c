"""
Evaluate a SmolLM2 checkpoint, optionally with an adapter, on the paper's source tasks (PIQA,
HellaSwag 0-shot, GSM8k 5-shot; paper §4.3, Table 3, Figures 2-3) and its target task (Textual
MNIST; paper §4.2, Table 2), giving the numbers lm-evaluation-harness 0.4.x would give.

    python evals/run.py --task piqa --model HuggingFaceTB/SmolLM2-1.7B-Instruct --limit 100
    python evals/run.py --task all --adapter runs/rigsa/iter3 --output results.json
    python evals/run.py --task gsm8k --output_path lm-eval-out --log_samples   # lm-eval's own files

Plain-text prompts are the default and match the paper, which says it used the LM Evaluation
Harness (paper §5.2) and mentions no chat template; lm-eval's default is plain text too.
--chat reproduces lm-eval's --apply_chat_template (multi-turn few-shot, its default since 0.4.10).

Everything that can be wrong with the flags, the output paths, the adapter file, the device and
the data files is found before the model loads, and said in one line:
`error: <thing>: <what is wrong>; <what to do>` (exit 1; argparse's usage errors exit 2).
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: make model.py, rigsa.py, cli.py, qlora.py, lib/ and evals/ importable
    sys.path.insert(0, REPO)

from lib import interrupts  # noqa: E402  (standard library only)

if __name__ == "__main__":   # a signal while torch loads (a second or two): one line, no traceback; main() then takes over
    interrupts.early()

import torch  # noqa: E402

import cli  # noqa: E402
import model as M  # noqa: E402
import qlora  # noqa: E402
import rigsa  # noqa: E402
from lib import adapter_files as AF  # noqa: E402
from lib import mnist  # noqa: E402
from lib import util  # noqa: E402
from evals import harness as H  # noqa: E402
from evals import tasks as T  # noqa: E402

TASKS = ["piqa", "hellaswag", "gsm8k", "mnist"]
DEFAULT_SHOTS = {"piqa": 0, "hellaswag": 0, "gsm8k": T.GSM8K_SHOTS, "mnist": 0}  # Table 2 also has 5-shot MNIST


def batch_size_for(args, model, longest, rows_per_item, generate=False):
    if args.batch_size == "auto":
        return H.auto_batch_size(model, longest, rows_per_item, generate=generate)
    return int(args.batch_size)


def chat_fn(tok, args):
    return (lambda msgs: tok.chat(msgs, add_generation_prompt=True)) if args.chat else None

# -----------------------------------------------------------------------------
# the tasks: documents in (read before the model loads, load_data), metrics and samples out

def warn_truncated(task, n, m, what):
    if n:
        util.say(f"warning: {task}: {n} of {m} {what} were left-truncated, as lm-eval does", file=sys.stderr)


def eval_mc(task, docs, model, tok, args):
    docs = docs[:args.limit] if args.limit else docs
    mc = T.mc_docs(task, docs, chat_fn(tok, args))
    P = model.config.max_position_embeddings
    enc, owner, truncated = [], [], 0   # owner: the document each scored item belongs to
    for i, d in enumerate(mc):
        pairs = [H.encode_pair(tok, d["context"], c) for c in d["continuations"]]
        try:
            ctxs = [H.left_truncate(c, x, P) for c, x in pairs]
        except ValueError as e:
            raise ValueError(f"{task}: document {i}: {e}") from None
        if all(c is p[0] for c, p in zip(ctxs, pairs)):
            # the context is the same string for every choice, hence the same ids: score it once
            enc.append((pairs[0][0], [p[1] for p in pairs]))
            owner.append(i)
        else:   # longer than the model: each choice's context is cut to fit beside that choice (lm-eval)
            truncated += 1
            enc += [(c, [p[1]]) for c, p in zip(ctxs, pairs)]
            owner += [i] * len(pairs)
    warn_truncated(task, truncated, len(mc), f"contexts longer than the model's {P} positions")
    longest = max(len(c) + max(len(x) for x in xs) for c, xs in enc)
    bs = batch_size_for(args, model, longest, max(len(xs) for _, xs in enc))
    part = enc[util.shard(len(enc))]       # on torchrun this rank's documents; every rank's, gathered
    bar = util.progress(total=len(part), desc=task, unit="doc")
    soft = None if args.softmax_dtype == "model" else getattr(torch, args.softmax_dtype)
    scored = util.gather(H.score_shared(model, part, batch_size=bs, bar=bar, softmax_dtype=soft))
    bar.close()
    scores = [[] for _ in mc]
    for i, sc in zip(owner, scored):
        scores[i] += sc
    bad = sum(not all(math.isfinite(s[0]) for s in sc) for sc in scores)
    if bad:   # NaN would win every argmax (numpy's, lm-eval's): an accuracy that measures nothing
        raise ValueError(f"{task}: {bad} of {len(mc)} documents have a log-likelihood that is not finite (NaN or "
                         f"inf): the model's weights{', or the adapter,' if args.adapter else ''} are broken (a "
                         f"diverged training?); no result is given")
    samples, logged, accs, norms = [], [], [], []
    for i, (d, sc) in enumerate(zip(mc, scores)):
        lls = [s[0] for s in sc]
        acc, acc_norm = T.mc_scores(lls, d["choices"], d["target"])
        accs.append(acc)
        norms.append(acc_norm)
        samples.append({"doc_id": i, "target": d["target"], "loglikelihoods": lls,
                        "is_greedy": [s[1] for s in sc], "acc": acc, "acc_norm": acc_norm})
        # lm-eval: one loglikelihood request (context, " " + choice) per choice, answered (ll, is_greedy)
        logged.append(lm_sample(i, d["doc"], d["target"], [(d["context"], c) for c in d["continuations"]],
                                [[list(s)] for s in sc], [list(s) for s in sc], "none",
                                {"acc": acc, "acc_norm": acc_norm}))
    metrics = {"acc": T.mean(accs), "acc_stderr": T.mean_stderr(accs),
               "acc_norm": T.mean(norms), "acc_norm_stderr": T.mean_stderr(norms)}
    return metrics, samples, bs, logged, truncated


def eval_gsm8k(data, model, tok, args, k):
    train, test = data
    test = test[:args.limit] if args.limit else test
    shots = T.gsm8k_fewshot_indices(len(test), len(train), k)
    prompts = [T.gsm8k_prompt(train, d, s, chat_fn(tok, args)) for d, s in zip(test, shots)]
    # lm-eval adds the decoded EOS to `until` when missing (<|im_end|> for the Instruct models)
    until = list(T.GSM8K_UNTIL)
    eos = tok.decode([tok.eos_id])
    if eos not in until:
        until.append(eos)
    # lm-eval's generate_until keeps a prompt's last max_length - max_gen_toks tokens
    P = model.config.max_position_embeddings
    room = P - T.GSM8K_MAX_NEW
    if room <= 0:
        raise ValueError(f"gsm8k: the model's {P} positions leave no room for a prompt beside the {T.GSM8K_MAX_NEW} "
                         f"tokens it generates; use a model with more positions")
    truncated = sum(len(tok.encode(p)) > room for p in prompts)
    warn_truncated("gsm8k", truncated, len(prompts),
                   f"prompts longer than {room} tokens (the model's {P} positions less {T.GSM8K_MAX_NEW} to generate)")
    longest = min(len(tok.encode(max(prompts, key=len))) + T.GSM8K_MAX_NEW, P)
    bs = batch_size_for(args, model, longest, 1, generate=True)
    # the shots were drawn over every document first (above): on torchrun each rank generates its share
    gens = util.gather(M.generate(model, tok, prompts[util.shard(len(prompts))], max_new_tokens=T.GSM8K_MAX_NEW,
                                  stop=until, batch_size=bs, progress_bar=True, left_truncate=room))
    samples, strict, flex = [], [], []
    for i, (d, g) in enumerate(zip(test, gens)):
        s, f = T.strict_extract(g), T.flexible_extract(g)
        es, ef = T.exact_match(s, d["answer"]), T.exact_match(f, d["answer"])
        strict.append(es)
        flex.append(ef)
        samples.append({"doc_id": i, "generation": g, "target": d["answer"], "strict": s, "flexible": f,
                        "exact_match_strict": es, "exact_match_flexible": ef, "fewshot_ids": shots[i]})
    # lm-eval logs each document once per filter, all of the first filter's lines first
    logged = [lm_sample(i, d, d["answer"], [(p, T.GSM8K_GEN_KWARGS)], [[s["generation"]]], [s[key]], name,
                        {"exact_match": s["exact_match_" + key]})
              for name, key in (("strict-match", "strict"), ("flexible-extract", "flexible"))
              for i, (d, p, s) in enumerate(zip(test, prompts, samples))]
    metrics = {"exact_match_strict": T.mean(strict), "exact_match_strict_stderr": T.mean_stderr(strict),
               "exact_match_flexible": T.mean(flex), "exact_match_flexible_stderr": T.mean_stderr(flex)}
    return metrics, samples, bs, logged, truncated


def mnist_fits(images, tok, P, k):
    """The k-shot prompt's length in tokens (every prompt has it: one token per pixel digit), or a
    ValueError if it passes the model's P positions: left-truncation (lm-eval's way) would cut off
    the instructions, so it is refused, not scored."""
    n_tokens = lambda j: len(tok.encode(rigsa.prompt(tok, images[0], [(images[0], 0)] * j)))  # noqa: E731
    longest = n_tokens(k)
    if longest > P:
        base, most = n_tokens(0), 0
        if base <= P:
            most = (P - base) // (n_tokens(1) - base)
            while most and n_tokens(most) > P:
                most -= 1
        raise ValueError(f"--num-fewshot {k}: a {k}-shot Textual MNIST prompt is {longest} tokens, more than the "
                         f"model's {P} positions; " + (f"use --num-fewshot {most} or fewer" if base <= P else
                                                      f"even 0-shot needs {base}: use a model with more positions"))
    return longest


SHOT_SEED = 1234  # the few-shot draw's seed (Table 2's 5-shot column; the paper does not give one)


def shot_draws(n, pool_size, shots, seed=SHOT_SEED):
    """Each of n images' `shots` training examples, without replacement: one generator seeded `seed`,
    one randperm per image, drawn over every image before a rank takes its share."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(pool_size, generator=g)[:shots].tolist() for _ in range(n)]


def eval_mnist(data, model, tok, args, k):
    (images, labels), pool = data
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    longest = mnist_fits(images, tok, model.config.max_position_embeddings, k)
    bs = batch_size_for(args, model, longest, 1)
    seed = SHOT_SEED if args.seed is None else args.seed
    draws = shot_draws(len(images), len(pool[0]), k, seed) if k else None   # over every image, first
    part = util.shard(len(images))                                        # then this rank's share
    shots = [[(pool[0][j], pool[1][j]) for j in d] for d in draws[part]] if k else None
    _, preds = rigsa.mnist_accuracy(model, tok, images[part], labels[part], shots, batch_size=bs)
    preds = torch.tensor(util.gather(preds.tolist()), dtype=torch.long)
    draws = draws if k else [[]] * len(images)   # every rank drew them all
    samples, accs = [], []
    for i, (y, p) in enumerate(zip(labels.tolist(), preds.tolist())):
        accs.append(int(p == y))  # p = -1: the next token was not a digit, counted wrong (paper §4.2)
        samples.append({"doc_id": i, "target": y, "prediction": p, "acc": accs[-1]} | ({"shots": draws[i]} if k else {}))
    logged = []
    if args.log_samples:  # the prompts are long (a 5-shot one is ~4,000 digits): only when asked for
        for i, s in enumerate(samples):
            text = rigsa.prompt(tok, images[i], [(pool[0][j], pool[1][j]) for j in draws[i]])
            answer = str(s["prediction"]) if s["prediction"] >= 0 else "[not a digit]"
            logged.append(lm_sample(i, {"index": i, "label": s["target"]}, s["target"],
                                    [(text, {"max_gen_toks": 1, "do_sample": False})], [[answer]], [answer], "none",
                                    {"acc": s["acc"]}))
    return {"acc": T.mean(accs), "acc_stderr": T.mean_stderr(accs)}, samples, bs, logged, 0


def n_docs(task, data):
    """The documents of the split --limit takes its first N of (load_data's layout)."""
    return len(data) if task in ("piqa", "hellaswag") else len(data[1]) if task == "gsm8k" else len(data[0][1])


def run_task(task, data, model, tok, args, info):
    """-> (the --output result, what lm-eval's files need: its metrics, document count and samples)."""
    k = shots_for(task, args)
    t0 = time.perf_counter()
    if task in ("piqa", "hellaswag"):
        metrics, samples, bs, logged, cut = eval_mc(task, data, model, tok, args)
    elif task == "gsm8k":
        metrics, samples, bs, logged, cut = eval_gsm8k(data, model, tok, args, k)
    else:
        metrics, samples, bs, logged, cut = eval_mnist(data, model, tok, args, k)
    n_all = n_docs(task, data)
    dt = time.perf_counter() - t0
    fewshot_seed = None if not k else T.GSM8K_SEED if task == "gsm8k" else SHOT_SEED if args.seed is None else args.seed
    result = {"task": task, "model": info["model"], "adapter": args.adapter, "dtype": info["dtype"],
              "dtype_choice": info.get("dtype_choice"),   # why: as asked, or --dtype auto's reason
              "softmax_dtype": args.softmax_dtype if task in ("piqa", "hellaswag") else None,
              "num_fewshot": k, "fewshot_seed": fewshot_seed, "limit": args.limit or None, "seconds": round(dt, 3),
              "metrics": metrics, "samples": samples,
              "docs": len(samples), "docs_per_s": len(samples) / max(dt, 1e-9), "batch_size": bs,
              "truncated": cut,   # documents longer than the model, left-truncated as lm-eval does
              "chat": args.chat, "quantize": info["quantize"], "device": str(next(model.parameters()).device),
              "machine": util.machine(next(model.parameters()).device), "torch": torch.__version__,   # the last bits'
              "code": util.code_version(),   # rigsa's sources' sha256 (util.code_files): results of other code told apart
              "adapter_code": info.get("adapter_code"),   # and the code that trained the adapter, as its file records
              "adapter_dtype": info.get("adapter_dtype"),  # and the dtype it trained in (its file's config)
              "protocol": "lm-evaluation-harness 0.4.x, " + ("--apply_chat_template" if args.chat else "plain text")}
    return result, {"task": task, "k": k, "n_all": n_all, "samples": logged, "batch_size": bs,
                    "results": {"name": task, "alias": task, "sample_len": len(samples), **lm_metrics(metrics)}}


def print_table(results):
    print(f"{'task':<10} {'metric':<22} {'value':>8} {'stderr':>8} {'docs':>6} {'seconds':>9} {'docs/s':>8}")
    for r in results:
        for name, v in r["metrics"].items():
            if name.endswith("_stderr"):
                continue
            se = r["metrics"].get(name + "_stderr")
            print(f"{r['task']:<10} {name:<22} {v:>8.4f} {'N/A' if se is None else f'{se:.4f}':>8} "
                  f"{r['docs']:>6} {r['seconds']:>9.1f} {r['docs_per_s']:>8.2f}")

# -----------------------------------------------------------------------------
# lm-eval 0.4.13's files (--output_path, --log_samples), read by its tools (lm_eval.utils.make_table)

LM_KEYS = {"acc": ("acc", "none"), "acc_norm": ("acc_norm", "none"),   # ours -> (lm-eval metric, filter)
           "exact_match_strict": ("exact_match", "strict-match"),
           "exact_match_flexible": ("exact_match", "flexible-extract")}


def lm_metrics(metrics):
    # lm-eval's evaluator_utils._compute_task_aggregations: "metric,filter" then "metric_stderr,filter",
    # and "N/A" where lm-eval cannot compute a stderr (one document)
    out = {}
    for ours, (m, f) in LM_KEYS.items():
        if ours in metrics:
            se = metrics[ours + "_stderr"]
            out[f"{m},{f}"], out[f"{m}_stderr,{f}"] = metrics[ours], "N/A" if se is None else se
    return out


def sha256(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()  # lm_eval.utils.hash_string


def _strings(x):
    # lm_eval.utils.sanitize_list: every leaf of the responses written as str
    return [_strings(v) for v in x] if isinstance(x, (list, tuple)) else str(x)


def lm_sample(doc_id, doc, target, arguments, resps, filtered, filter_name, metrics):
    """One line of lm-eval's samples_<task>_<date>.jsonl: the record evaluator.evaluate logs, as
    EvaluationTracker.save_results_samples writes it (arguments as {gen_args_i: {arg_j}}, responses
    and the target as strings). The hashes are sha256 of the document's json.dumps(indent=2,
    ensure_ascii=False), of the first request's context (the prompt) and of str(target)."""
    return {"doc_id": doc_id, "doc": doc, "target": str(target),
            "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                          for i, arg in enumerate(arguments)},
            "resps": _strings(resps), "filtered_resps": _strings(filtered), "filter": filter_name,
            "metrics": list(metrics), "doc_hash": sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
            "prompt_hash": sha256(arguments[0][0]), "target_hash": sha256(str(target)),
            **{k: float(v) for k, v in metrics.items()}}


def task_hash(samples):
    # EvaluationTracker.save_results_aggregated: one hash over every logged sample's three, in order
    return sha256("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))


def lm_eval_name(model, adapter):
    # GeneralConfigTracker._get_model_name: a PEFT adapter names the run before its base does
    name = adapter or model
    return name, re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)   # lm_eval.utils.sanitize_model_name


def lm_eval_paths(output_path, sanitized, date):
    """EvaluationTracker's layout: DIR/<model name, sanitized>/results_<date>.json with the samples
    beside it, or, for a path ending in .json, <stem>_<date>.json with the samples in its folder."""
    p = Path(output_path)
    if p.suffix == ".json":
        return p.with_name(f"{p.stem}_{date}.json"), p.parent
    return p / sanitized / f"results_{date}.json", p / sanitized


def lm_eval_results(done, info, args):
    """results_<date>.json as lm-eval 0.4.13 writes it: evaluator.evaluate's keys (EvalAcc.
    _to_eval_results), simple_evaluate's config, and EvaluationTracker's task hashes and model
    fields. make_table reads results (alias, "metric,filter"), versions, n-shot, higher_is_better."""
    cfgs = {d["task"]: {**T.LM_EVAL_CONFIGS[d["task"]], "num_fewshot": d["k"]} for d in done}
    name, sanitized = lm_eval_name(info["model"], args.adapter)
    return {
        "results": {d["task"]: d["results"] for d in done},    # in evaluation order, the rest sorted
        "group_subtasks": {},
        "configs": dict(sorted(cfgs.items())),
        "versions": {t: cfgs[t]["metadata"]["version"] for t in sorted(cfgs)},
        "n-shot": {t: cfgs[t]["num_fewshot"] for t in sorted(cfgs)},
        "higher_is_better": {t: T.lm_eval_higher_is_better(t) for t in sorted(cfgs)},
        "n-samples": {d["task"]: {"original": d["n_all"], "effective": d["results"]["sample_len"]} for d in done},
        "config": {**info["config"], "batch_sizes": [d["batch_size"] for d in done]},
        "git_hash": info["git_hash"], "date": info["start"],
        **info["tokenizer"],
        "task_hashes": {d["task"]: task_hash(d["samples"]) for d in done} if args.log_samples else {},
        "model_source": "rigsa", "model_name": name, "model_name_sanitized": sanitized,
        "system_instruction": None, "system_instruction_sha": None, "fewshot_as_multiturn": args.chat,
        "chat_template": None, "chat_template_sha": None,
        "total_evaluation_time_seconds": str(time.perf_counter() - info["clock"]),
    }


def run_info(args, model, tok, name, revision, quantize, device):
    """What every output records about the run (lm-eval's config / tokenizer fields where they exist)."""
    dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
    model_args = ",".join(f"{k}={v}" for k, v in (("pretrained", name), ("peft", args.adapter),
                                                  ("revision", revision), ("dtype", dtype),
                                                  ("softmax_dtype", args.softmax_dtype != "model"
                                                   and dtype != "float32" and args.softmax_dtype)) if v)
    tokens = {f"tokenizer_{w}_token": [tok.decode([i]), str(i)]
              for w, i in (("pad", tok.pad_id), ("eos", tok.eos_id), ("bos", tok.bos_id))}
    return {"model": name, "dtype": dtype, "quantize": quantize, "start": time.time(), "git_hash": util.git_commit(),
            "clock": time.perf_counter(),   # durations from a clock that NTP or a user cannot step back
            "date_id": datetime.datetime.now().isoformat().replace(":", "-"),   # EvaluationTracker's file stamp
            "tokenizer": {**tokens, "eot_token_id": tok.eos_id, "max_length": model.config.max_position_embeddings},
            "config": {"model": name, "model_args": model_args, "adapter": args.adapter, "quantize": quantize,
                       "chat": args.chat, "model_num_parameters": sum(p.numel() for p in model.parameters()),
                       "model_dtype": f"torch.{dtype}", "model_revision": revision or "main",
                       "batch_size": str(args.batch_size), "device": str(device), "limit": args.limit or None,
                       "bootstrap_iters": 100000,   # lm-eval's default; means get the closed form
                       "gen_kwargs": None, "fewshot_seed": T.GSM8K_SEED,
                       "mnist_seed": SHOT_SEED if args.seed is None else args.seed}}


def write_file(flag, path, write):
    """Atomic (util.atomic_write: no half file, no .tmp left), and a failure named as the flag's; the
    folders it made for the file go again with a file that could not be written (a full disk)."""
    folder = os.path.dirname(os.path.abspath(path))
    made, up = [], folder   # the folders this write makes, deepest first
    while not os.path.exists(up):
        made.append(up)
        up = os.path.dirname(up)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot create its folder ({e.strerror or e}); choose another path") from None
    try:
        util.atomic_write(path, write)
    except OSError as e:   # atomic_write's message already names the path and what to do
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise OSError(f"{flag} {e}") from None


def write_json(flag, path, obj, indent=1):
    """UTF-8, text beyond ASCII kept (as lm-eval writes it)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    write_file(flag, path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_outputs(args, results, done, info):
    """After each finished task: --output (one result, or for --task all the {task: result} dict so
    far) and --output_path (results_<date>.json so far; the finished task's samples)."""
    if args.output:
        write_json("--output", args.output, results[0] if args.task != "all" else {r["task"]: r for r in results})
    if args.output_path:
        res_path, folder = lm_eval_paths(args.output_path, lm_eval_name(info["model"], args.adapter)[1],
                                         info["date_id"])
        if args.log_samples:
            d = done[-1]
            lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in d["samples"])
            write_file("--output_path", folder / f"samples_{d['task']}_{info['date_id']}.jsonl",
                       lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
        write_json("--output_path", res_path, lm_eval_results(done, info, args), indent=2)

# -----------------------------------------------------------------------------
# flags, each checked where it is parsed; then everything else before the model loads

def parse_args(argv):
    ap = util.ArgumentParser(prog="evals/run.py", description="PIQA / HellaSwag / GSM8k (lm-eval protocol) and Textual MNIST.")
    ap.add_argument("--task", required=True, choices=TASKS + ["all"])
    ap.add_argument("--model", default=None, type=util.nonempty("a hub id or a model folder, or drop the flag"),
                    help=f"hub id or local directory (default: the adapter's recorded base, else {M.DEFAULT_MODEL})")
    ap.add_argument("--revision", default=None,
                    help="hub revision of --model (default: the adapter's recorded one for its base, else the latest)")
    ap.add_argument("--adapter", default=None, type=util.nonempty("an adapter (RUN/iterK), or drop the flag"),
                    help="an adapter rigsa.py train wrote (RUN/iterK, any method), installed in memory")
    ap.add_argument("--quantize", default=None, choices=["nf4"], help="NF4 base weights (the QLoRA baseline)")
    ap.add_argument("--allow-other-base", action="store_true",
                    help="apply --adapter to a base other than the one it was trained on (said, and recorded in "
                         "the results as base_check)")
    ap.add_argument("--limit", type=util.number(int, 0), default=None, help="first N documents, as lm-eval --limit N (0: all; more than a split has: all, with a note)")
    ap.add_argument("--batch-size", type=util.number(int, 1, auto=True), default="auto",
                    help="documents per batch, or 'auto' (default)")
    ap.add_argument("--num-fewshot", type=util.number(int, 0), default=None, help="default: gsm8k 5, others 0")
    ap.add_argument("--softmax-dtype", default=None, choices=["float32", "model"],   # None: not typed (float32)
                    help="PIQA/HellaSwag: the log-softmax and the log-likelihood sums in float32 (default; lm-eval's "
                         "model_args softmax_dtype=float32), or in the logits' dtype as lm-eval's default does "
                         "(model). Equal in float32; in bfloat16, float32 is ~30x closer to the float32 numbers")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the weights' dtype: auto (default) is bfloat16 where the device computes it natively (CUDA, "
                         "a CPU with AMX or AVX512-BF16), else, and for a float32 merge, float32, the exact reference")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "data"), type=util.nonempty("a folder"), help="holds <task>/ folders (default data/)")
    ap.add_argument("--output", default=None, help="write results JSON here")
    ap.add_argument("--output_path", "--output-path", dest="output_path", default=None,
                    help="lm-eval's layout: DIR/<model>/results_<date>.json (and samples with --log_samples)")
    ap.add_argument("--log_samples", "--log-samples", dest="log_samples", action="store_true",
                    help="with --output_path: lm-eval's samples_<task>_<date>.jsonl, one line per document")
    ap.add_argument("--chat", action="store_true", help="lm-eval --apply_chat_template mode (the paper used plain)")
    # a torch CPU generator keeps the low 32 bits of its seed: a larger one would repeat a smaller one's draw
    ap.add_argument("--seed", type=util.number(int, 0, 2 ** 32 - 1), default=None,
                    help="Textual MNIST few-shot draw (default: rigsa's)")
    ap.add_argument("--no-verify", action="store_true", help="skip checksums of files already present")
    ap.add_argument("--offline", action="store_true", help="never download (data files, the base model): a missing one is an error")
    args = ap.parse_args(argv)
    if args.log_samples and not args.output_path:
        ap.error("--log_samples: needs --output_path, where lm-eval's samples files go")
    for flag in ("output", "output_path"):   # an empty one would write nothing, silently
        if getattr(args, flag) == "":
            ap.error(f"--{flag}: empty; name a {'file' if flag == 'output' else 'folder'}, or drop the flag")
    return args


def shots_for(task, args):
    k = DEFAULT_SHOTS[task] if args.num_fewshot is None else args.num_fewshot
    if task in ("piqa", "hellaswag") and k != 0:
        raise ValueError(f"--num-fewshot {k}: {task} is 0-shot here (paper §4.3; its train split is not among the "
                         f"pinned files); drop --num-fewshot, or use it with --task gsm8k or mnist")
    return k


def run_inputs(args, tasks):
    """[(what, path, is a folder)]: the files this run reads that an output must not replace: the
    --adapter file, a local model directory (--model, or the adapter's recorded base) and everything
    in it, and each task's pinned data files (there yet or to be downloaded)."""
    found = []
    if args.adapter:
        try:
            found.append(("the --adapter file", str(AF.adapter_path(args.adapter)), False))
        except OSError:
            pass   # said where the adapter is read
    model = args.model
    if model is None and found:
        try:   # the recorded base, from the metadata alone
            model = AF.read(args.adapter, tensors=False)[2].get("model")
        except (ValueError, OSError):
            pass   # not an adapter: said where the adapter is read
    if model and os.path.isdir(model):
        found.append(("in the model directory", model, True))
    for t in tasks:
        names = mnist.MNIST_FILES if t == "mnist" else [f[0] for f in T.FILES[t]]
        found += [(f"a data file of --task {t}", os.path.join(args.data_dir, t, n), False) for n in names]
    return found


def same(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)   # a hard link too


def ours(path):
    """Whether an existing file is one evals/run.py may replace: empty, or a results JSON it wrote
    (--output's {task, metrics, ...}, --task all's {task: {...}}, or lm-eval's results_<date>.json)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
            if not head:
                return True
            if not head.startswith(b"{"):   # a safetensors file, a text file: not JSON, and not read further
                return False
            f.seek(0)
            d = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):   # ValueError: not JSON, not UTF-8
        return False
    result = lambda r: isinstance(r, dict) and "task" in r and "metrics" in r   # noqa: E731
    return isinstance(d, dict) and (result(d) or d.get("model_source") == "rigsa" and "results" in d   # not lm-eval's own
                                    or bool(d) and all(result(r) for r in d.values()))


def check_output(flag, path, folder, inputs=()):
    """Before any work: the path is not of the wrong kind, it is none of the run's inputs (nor in the
    model directory), an existing file there is one this script wrote (results JSON: anything else is
    refused, not replaced), and its nearest existing parent is a writable directory (nothing is
    created until there is something to write)."""
    p = os.path.abspath(path)
    if folder and os.path.isfile(p):
        raise ValueError(f"{flag} {path}: is a file, not a directory; pass a folder (lm-eval's layout goes in it)")
    if not folder and os.path.isdir(p):
        raise ValueError(f"{flag} {path}: is a directory; pass a file name, e.g. {os.path.join(path, 'results.json')}")
    if not folder and os.path.exists(p) and not os.path.isfile(p):   # a device, a pipe: never replaced by a file
        raise ValueError(f"{flag} {path}: is not a regular file (a device, a pipe, ...); pass a file name")
    target = p if folder or flag == "--output" else os.path.dirname(p)   # --output_path x.json: files beside it
    for what, q, is_dir in inputs:
        real = os.path.realpath(q)
        if same(target, q) or is_dir and os.path.realpath(target).startswith(real.rstrip(os.sep) + os.sep):
            raise ValueError(f"{flag} {path}: is {what} {q}, which this run reads; choose another path")
    if not folder and flag == "--output" and os.path.isfile(p) and not ours(p):
        raise ValueError(f"{flag} {path}: exists and is not a results file of evals/run.py, so it is not replaced; "
                         f"delete it or choose another path")
    parent = p if folder else os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    try:
        util.check_writable(parent)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); choose another path") from None


def check_lm_eval_layout(args, name):
    """--output_path's folder for this model (lm_eval_paths), before any work: not a file, a name the
    file system takes, and not --output (nor a folder --output would be)."""
    _, folder = lm_eval_paths(args.output_path, lm_eval_name(name, args.adapter)[1], "x")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_path {args.output_path}: {folder} is a file, where lm-eval's layout puts this "
                         f"model's folder; move it, or choose another --output_path")
    try:   # the file system's longest name, where the folder's parent exists (else the usual 255)
        limit = os.pathconf(os.path.dirname(os.path.abspath(folder)), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(folder.name.encode()) > limit:
        raise ValueError(f"--output_path {args.output_path}: the folder lm-eval's layout names after the model "
                         f"({len(folder.name.encode())} bytes) is longer than this file system allows ({limit}); "
                         f"pass a path ending in .json, which puts the files beside it")
    if args.output:
        o, f = os.path.realpath(args.output), os.path.realpath(folder)
        if f == o or f.startswith(o.rstrip(os.sep) + os.sep):
            raise ValueError(f"--output {args.output}: is where --output_path puts its folder {folder}; give the two "
                             f"flags different paths")


def load_data(task, args):
    """Every file the task reads: present (downloaded if missing), checksummed and parsed, so that
    a missing or corrupt one stops the run before the model loads. -> (the data, {<folder>/<file>:
    sha256} of the files read: the results record them, checked or stand-in alike)."""
    kw = dict(download=not args.offline, verify=not args.no_verify)
    k = shots_for(task, args)
    if task == "mnist":
        folder = mnist.mnist_dir(args.data_dir)  # lib/mnist.py owns MNIST's files; rigsa.py its prompt and scoring (§4.2)
        test = mnist.load_mnist(folder, "test", **kw)
        pool = mnist.load_mnist(folder, "train", **kw) if k else None   # the shots come from the train split
        if k:   # shots of another size than the test digits: other prompts, longer than mnist_fits measures
            mnist.check_sizes(folder, pool[0], test[0])
        n_pool = len(pool[0]) if k else 0
        data = (test, pool)
        read = [folder / n for n in mnist.MNIST_FILES if k or n.startswith("t10k")]
    else:
        paths = T.ensure_files(task, args.data_dir, **kw)
        data = T.load_piqa(paths) if task == "piqa" else T.load_hellaswag(paths) if task == "hellaswag" \
            else T.load_gsm8k(paths)
        n_pool = len(data[0]) if task == "gsm8k" else 0
        read = [Path(p) for p in paths.values()]
    if k > n_pool and task in ("gsm8k", "mnist"):
        raise ValueError(f"--num-fewshot {k}: {task}'s training split has only {n_pool} examples to draw from; "
                         f"use at most {n_pool}")
    return data, {f"{p.parent.name}/{p.name}": util.file_hash(p, "sha256") for p in read}


def base_model(args, acfg, ameta=None):
    """--model, else the adapter's recorded base, else the default; --revision, else the adapter's
    recorded revision when the base is the one it was trained on."""
    name = args.model or (acfg.model if acfg else M.DEFAULT_MODEL)
    if not args.model and acfg is not None:
        cli.check_recorded_base(acfg, (ameta or {}).get("base"), args.adapter)
    revision = args.revision
    M.check_revision(name, revision)   # as rigsa.py train and merge refuse it
    if revision is None and acfg is not None and name == acfg.model:
        revision = acfg.revision or None
    return name, revision


def install_adapter(model, spec, base, check=None, read=None):
    try:
        cli.load_adapter(model, spec, read=read)  # in memory only: nothing is merged on disk (the base was checked before)
    except (ValueError, RuntimeError) as e:  # another base's adapter: layer names, shapes or dW0 differ
        why = " ".join(str(e).split())
        if "does not regenerate" in why:   # dW0 drawn otherwise here: no fault of the file, nor of the base
            raise ValueError(f"--adapter {spec}: {why}; use the code (and platform) that trained it") from None
        if check == "same":   # its own base: the file is damaged or edited
            raise ValueError(f"--adapter {spec}: does not fit the base model {base}, the very one it was trained on "
                             f"({why}); the file is damaged or edited: use the one its run wrote") from None
        raise ValueError(f"--adapter {spec}: does not fit the base model {base} ({why}); evaluate it on the model "
                         f"it was trained on (without --model, its recorded base is used)") from None


def task_error(task, e):
    msg = " ".join(str(e).split())   # one line
    return msg if msg.startswith(task + ":") else f"{task}: {msg}"


def main(argv=None, shell=False):
    """shell: run as a script, the process is this evaluation's (a Python caller's signals stay its own)."""
    args = parse_args(argv)
    util.keep_freed_memory()
    interrupts.stop_as_interrupt()
    FINISHED.clear()
    try:
        result = evaluate(args)
        if shell and util.world()[1] == 1:   # its files written: a signal until the exit is ignored, not a silent 143
            interrupts.finished()
    except (ValueError, RuntimeError, OSError) as e:   # OSError includes FileNotFoundError
        util.abandon_distributed()
        sys.exit(f"error: {' '.join(str(e).split())}")   # one line
    except SystemExit as e:   # --task all with failed tasks: every rank went through the same tasks
        if util.world()[1] > 1:
            if isinstance(e.code, str):
                util.say(e.code, file=sys.stderr)     # the summary line, once
            util.exit_distributed(0 if e.code in (None, 0) else 1)
        raise
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM: one line, what was kept, how to continue
        util.abandon_distributed()
        kept = (f"kept: {', '.join(FINISHED)} in {' and '.join(x for x in (args.output, args.output_path) if x)}"
                if FINISHED and (args.output or args.output_path) else "nothing was written")
        interrupts.exit_interrupted(f"{kept}; run again with: {interrupts.command(__file__, sys.argv[1:] if argv is None else argv)}")
    finally:
        interrupts.stop_as_interrupt(False)
    util.exit_distributed()
    return result


FINISHED = []   # the tasks whose results are written, for the line an interrupt prints


def evaluate(args):
    tasks = TASKS if args.task == "all" else [args.task]
    for t in tasks:
        shots_for(t, args)
    if args.seed is not None and not ("mnist" in tasks and shots_for("mnist", args)):   # a flag that would not act
        raise ValueError(f"--seed {args.seed}: only Textual MNIST's few-shot draw uses it (--task mnist with "
                         f"--num-fewshot 5; GSM8k's shots are lm-eval's own draw); drop it")
    if args.softmax_dtype is not None and not {"piqa", "hellaswag"} & set(tasks):   # typed, at its default or not
        raise ValueError(f"--softmax-dtype {args.softmax_dtype}: only PIQA's and HellaSwag's log-likelihoods use it, "
                         f"and --task {args.task} has neither; drop it")
    args.softmax_dtype = args.softmax_dtype or "float32"
    if args.allow_other_base and not args.adapter:
        raise ValueError("--allow-other-base: lets an --adapter apply to another base, and there is no --adapter; "
                         "drop it")
    inputs = run_inputs(args, tasks) if args.output or args.output_path else ()
    if args.output:
        check_output("--output", args.output, folder=False, inputs=inputs)
    if args.output_path:
        check_output("--output_path", args.output_path, folder=not args.output_path.endswith(".json"), inputs=inputs)
    device = util.init_distributed(args.device)   # torchrun: this rank's process group and device
    util.same_on_every_rank({f"--{k.replace('_', '-')}": v for k, v in vars(args).items()})   # and one command
    try:
        _, ameta, acfg = rigsa.read_adapter(args.adapter, tensors=False) if args.adapter else (None, None, None)
    except (ValueError, OSError) as e:
        raise ValueError(f"--adapter: {e}") from None
    if args.quantize and acfg is not None and not rigsa.METHODS[acfg.method]["nf4"]:   # it would land in no layer, or another kind
        raise ValueError(f"--quantize {args.quantize}: --adapter {args.adapter} is a {acfg.method} adapter of the "
                         f"unquantized base; drop --quantize (only a qlora adapter sits on the 4-bit base)")
    name, revision = base_model(args, acfg, ameta)
    if args.output_path:
        check_lm_eval_layout(args, name)
    data, files, failed = {}, {}, []
    for t in tasks:
        try:
            data[t], files[t] = util.rank_zero_first(lambda: load_data(t, args))   # torchrun: one download
        except (ValueError, OSError, RuntimeError) as e:   # RuntimeError: rank 0 failed (torchrun's other ranks)
            if args.task != "all":
                raise
            failed.append(t)
            util.say(f"error: {task_error(t, e)}", file=sys.stderr)   # --task all: said now, the others still run
    if not data:
        raise ValueError("--task all: no task has its data (each said why above); fix those, then run again")
    for t in data:   # lm-eval takes a --limit past a split's end as the whole split without a word; said here
        if args.limit and args.limit > n_docs(t, data[t]):
            util.say(f"note: --limit {args.limit}: {t} has {n_docs(t, data[t])} documents, so all of them are "
                     f"evaluated (the results' \"docs\" says how many)", file=sys.stderr)

    path = util.rank_zero_first(lambda: M.resolve(name, revision, offline=args.offline))
    AF.check_not_adapter(path, name)
    tok0 = M.load_tokenizer(path) if args.chat or "mnist" in data else None   # for the checks before the model loads
    if args.chat and tok0.chat_template is None:   # lm-eval's --apply_chat_template refuses it too
        raise ValueError(f"--chat: the model {name} has no chat template (tokenizer_config.json's chat_template, or "
                         f"chat_template.jinja), so its chat format is unknown; drop --chat (the paper's plain prompts)")
    if args.chat and tok0.template_unread:   # lm-eval renders the model's own template; ours writes SmolLM2's ChatML
        raise ValueError(f"--chat: {tok0.template_unread}, so the ChatML this code writes is not what lm-eval's "
                         f"--apply_chat_template would score for this model; drop --chat (the paper's plain prompts)")
    dtype, why = util.auto_dtype(args.dtype, device)   # auto: bfloat16 where the device computes it natively
    dtype, why = util.merge_dtype(args.dtype, dtype, why, path)   # but a float32 merge stays float32
    base = {"model": name, **M.base_identity(path)}
    mcfg, _, qc = qlora.check_model(path)   # what the base's load would refuse, said before the adapter's read
    if args.adapter:   # its layers and shapes, from its header: a base of other shapes is said before it loads
        cli.check_fits(args.adapter, acfg, ameta, mcfg, path, base, qc.get("load_in_4bit"))
    check = (AF.check_base(ameta["base"], base, f"--adapter {args.adapter}", args.allow_other_base)
             if args.adapter else None)   # before the model loads: an adapter applies to its own base
    if "mnist" in data:   # a prompt past the model's positions is refused now, not after the other tasks ran
        try:
            P = M.SmolLM2Config.from_json(path / "config.json").max_position_embeddings
            mnist_fits(data["mnist"][0][0], tok0, P, shots_for("mnist", args))
        except ValueError as e:
            if args.task != "all" or len(data) == 1:
                raise
            failed.append(data.pop("mnist") and "mnist")
            util.say(f"error: {task_error('mnist', e)}", file=sys.stderr)
    if qc.get("load_in_4bit") and args.quantize:   # a --quantize that would not act
        raise ValueError(f"--quantize {args.quantize}: {name} is a 4-bit checkpoint already (its config.json's "
                         f"quantization_config), so it would not act; drop it")
    try:   # the adapter's tensors, checksum checked, before the base loads (minutes at 1.7B)
        read = rigsa.read_adapter(args.adapter) if args.adapter else None
    except (ValueError, OSError) as e:
        raise ValueError(f"--adapter: {e}") from None
    model, tok = qlora.load_model(str(path), str(device), dtype)   # model.load, or a bnb-4bit checkpoint
    if args.quantize and (acfg is None or not rigsa.METHODS[acfg.method]["nf4"]):  # a qlora adapter quantizes its base itself
        qlora.quantize_model(model)
    if args.adapter:
        install_adapter(model, args.adapter, name, check, read)
    read = None   # what the layers did not take (on CUDA, all of it: a host copy) is freed now, not at the end
    quantize = "nf4" if qlora.is_quantized(model) else None   # --quantize, a QLoRA adapter or a 4-bit checkpoint
    info = run_info(args, model, tok, name, revision, quantize, device)
    info["dtype_choice"] = why
    info["adapter_code"] = (ameta or {}).get("code")   # the code that trained it (None: an older file's)
    # and the dtype it last trained in, as its file's own config says (not a default standing in for a missing key)
    trained = json.loads(ameta["config"]) if ameta and isinstance(ameta.get("config"), str) else {}
    trained = trained.get("dtype") if isinstance(trained, dict) else None
    info["adapter_dtype"] = trained if trained in ("float32", "bfloat16", "float16") else None
    if info["adapter_code"] not in (None, util.code_version()):   # its prompt (§4.2) is this code's, not its own
        util.say(f"note: --adapter {args.adapter} was trained by another version of rigsa's code "
                 f"({info['adapter_code']}) than this evaluation runs ({util.code_version()}): its Textual MNIST "
                 f"prompts are this version's", file=sys.stderr)
    util.say(f"model {name} adapter {args.adapter} dtype {info['dtype']} ({why.removeprefix('auto: ')}) device {model.lm_head.weight.device} "
             f"chat {args.chat} quantize {quantize}" + (f" processes {util.world()[1]}" if util.world()[1] > 1 else ""),
             file=sys.stderr)

    results, done = [], []
    for t in data:
        try:
            r, lm = run_task(t, data[t], model, tok, args, info)
        except (ValueError, RuntimeError, OSError) as e:   # e.g. out of memory: the finished tasks are kept
            if args.task != "all":
                raise
            failed.append(t)
            util.say(f"error: {task_error(t, e)}", file=sys.stderr)
            continue
        r.update(base=base, base_check=check,    # what it ran on, and whether the adapter was made there
                 data_files=files[t], data_verified=not args.no_verify)   # and on which files, checked or not
        results.append(r)
        done.append(lm)
        if util.world()[0] == 0:                   # every rank holds the gathered results; one writes them
            write_outputs(args, results, done, info)   # each task as it finishes: nothing is lost to a later one
        FINISHED.append(t)
    if util.world()[0] == 0:
        print_table(results)
    if failed:
        sys.exit(f"error: --task all: {len(failed)} of {len(tasks)} tasks failed ({', '.join(failed)}; each said why "
                 f"above) and the others finished; fix those, then run each with --task")
    return results


if __name__ == "__main__":
    main(shell=True)
