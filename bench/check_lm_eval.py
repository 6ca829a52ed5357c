"""
Our lm-eval-shaped files, read by lm-evaluation-harness 0.4.13 itself. Run it from the
bench environment, the one with lm-eval installed (not the test environment):

    python bench/check_lm_eval.py                                  # tiny model, tiny data written here
    python bench/check_lm_eval.py --data-dir data --model DIR --limit 50   # the real files

For each of PIQA, HellaSwag and GSM8k it
1. runs evals/run.py --output_path --log_samples (the tiny random model unless --model);
2. prints that results_<date>.json through lm_eval.utils.make_table, which must not fail;
3. builds lm-eval's own task from lm_eval/tasks/<task>/<task>.yaml on the same data files (datasets'
   json loader instead of the hub), answers its requests with our model's answers (a replay LM: a
   request we did not make is an error), runs lm_eval.evaluator.evaluate with log_samples and
   writes its files with its EvaluationTracker; then compares every sample line (fields, their order,
   doc_hash, prompt_hash, target_hash, arguments, responses, metrics), the task hash, the results
   (metrics, stderrs, n-samples, versions, n-shot, higher_is_better) and our configs subset.
It exits 1 on any difference. It prints the task hashes that tests/test_evals.py pins.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ["piqa", "hellaswag", "gsm8k"]


def write_data(root, n=5):
    """Tiny data/<task>/ files with what moves a hash or a request: text beyond ASCII (lm-eval dumps
    documents with ensure_ascii=False), whitespace kept inside and around choices, HellaSwag's [tags]
    and int labels, GSM8k's 5 shots drawn from 8 train lines. tests/test_evals.py runs on them and
    pins the task hashes this script prints."""
    root = Path(root)
    for t in TASKS:
        (root / t).mkdir(parents=True, exist_ok=True)
    with open(root / "piqa" / "valid.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"goal": f"How do I {i}? café", "sol1": f"The answer is {i} ", "sol2": "the of  and"}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    with open(root / "hellaswag" / "hellaswag_val.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"ind": i, "activity_label": "Digits", "ctx_a": "The digit is", "ctx_b": "a",
                                "endings": [f"[step] {i}", "x [title] y", "is  is", "the"], "label": i % 4}) + "\n")
    for split, m in (("train", 8), ("test", n)):
        with open(root / "gsm8k" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(m):
                f.write(json.dumps({"question": f"What is {i} and {i}? Janet’s", "answer": f"{i} and {i}\n#### {2 * i}"})
                        + "\n")
    return root


def run_ours(py, task, model, data_dir, limit, out, no_verify):
    cmd = [py, str(REPO / "evals" / "run.py"), "--task", task, "--model", str(model), "--data-dir", str(data_dir),
           "--offline", "--limit", str(limit), "--output_path", str(out), "--log_samples"] + ["--no-verify"] * no_verify
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    res = json.loads(Path(glob.glob(f"{out}/*/results_*.json")[0]).read_text())
    samples = [json.loads(line) for line in open(glob.glob(f"{out}/*/samples_{task}_*.jsonl")[0], encoding="utf-8")]
    return res, samples


def lm_eval_task(task, data_dir, tmp):
    """lm-eval's task from its own yaml, reading our files: the hub dataset_path becomes datasets'
    json loader (how our prompts were checked against lm-eval's on the real files). PIQA's hub copy
    is valid.jsonl's rows with int(label) from valid-labels.lst; the train split a 0-shot task never
    reads is the eval file."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / task / f"{task}.yaml")
    d = Path(data_dir) / task
    if task == "piqa":
        rows = [json.loads(line) for line in open(d / "valid.jsonl", encoding="utf-8") if line.strip()]
        labels = (d / "valid-labels.lst").read_text().split()
        f = Path(tmp) / "piqa.jsonl"
        f.write_text("".join(json.dumps({**r, "label": int(y)}) + "\n" for r, y in zip(rows, labels)), encoding="utf-8")
        files = {"train": str(f), "validation": str(f)}
    elif task == "hellaswag":
        files = {"train": str(d / "hellaswag_val.jsonl"), "validation": str(d / "hellaswag_val.jsonl")}
    else:
        files = {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl")}
    cfg.pop("dataset_name", None)
    t = ConfigurableTask(config={**cfg, "dataset_path": "json", "dataset_kwargs": {"data_files": files}})
    if t.get_config("num_fewshot") is None:   # what simple_evaluate does before evaluate
        t.set_config(key="num_fewshot", value=0)
    t.set_fewshot_seed(seed=1234)   # simple_evaluate's fewshot_random_seed default
    return t


def replay_lm(samples, missing):
    """An lm-eval LM that answers with what our run answered, keyed by the document and the request
    itself (the same request in two documents can differ in the last float bits: our batches pack
    documents differently, docs/evaluation.md)."""
    from lm_eval.api.model import LM
    lls, gens = {}, {}
    for s in samples:
        for a, r in zip(s["arguments"].values(), s["filtered_resps"]):
            if isinstance(a["arg_1"], str):
                lls[(s["doc_id"], a["arg_0"], a["arg_1"])] = (float(r[0]), r[1] == "True")
            else:
                gens[(s["doc_id"], a["arg_0"])] = s["resps"][0][0]

    class Replay(LM):
        def loglikelihood(self, reqs):
            keys = [(r.doc_id, *r.args) for r in reqs]
            missing.extend(k for k in keys if k not in lls)
            return [lls.get(k, (0.0, False)) for k in keys]

        def generate_until(self, reqs):
            keys = [(r.doc_id, r.args[0]) for r in reqs]
            missing.extend(k for k in keys if k not in gens)
            return [gens.get(k, "") for k in keys]

        def loglikelihood_rolling(self, reqs):
            raise NotImplementedError
    return Replay()


def run_lm_eval(task, data_dir, limit, samples, model_name, tmp):
    from lm_eval import evaluator
    from lm_eval.loggers import EvaluationTracker
    missing = []
    t = lm_eval_task(task, data_dir, tmp)
    res = evaluator.evaluate(lm=replay_lm(samples, missing), task_dict={"tasks": {task: t}}, limit=limit,
                             log_samples=True, bootstrap_iters=100000)
    tr = EvaluationTracker(output_path=str(Path(tmp) / "lm-eval"))
    tr.general_config_tracker.log_experiment_args(model_source="hf", model_args=f"pretrained={model_name}",
                                                  system_instruction=None, chat_template=None,
                                                  fewshot_as_multiturn=False)
    logged = res.pop("samples")
    tr.save_results_aggregated(results=res, samples=logged)
    tr.save_results_samples(task_name=task, samples=logged[task])
    path = glob.glob(f"{tmp}/lm-eval/*/samples_{task}_*.jsonl")[0]
    theirs = [json.loads(line) for line in open(path, encoding="utf-8")]
    return json.loads(Path(glob.glob(f"{tmp}/lm-eval/*/results_*.json")[0]).read_text()), theirs, missing


def subset_diff(ours, theirs, where):
    """Keys of ours whose value differs from lm-eval's (dicts compared key by key, recursively)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in ours for d in subset_diff(ours[k], theirs.get(k, "<absent>"), f"{where}.{k}")]
    return [] if ours == theirs else [f"{where}: ours {ours!r}, lm-eval's {theirs!r}"]


def compare(task, res, samples, lres, lsamples, missing):
    bad = [f"lm-eval asked for a request we did not make: {m!r}"[:300] for m in missing[:3]]
    if len(samples) != len(lsamples):
        bad.append(f"{len(samples)} sample lines, lm-eval {len(lsamples)}")
    for s, ls in zip(samples, lsamples):
        if list(s) != list(ls):
            bad.append(f"doc {s['doc_id']}: fields {list(s)}, lm-eval's {list(ls)}")
        for k in ls:
            same = abs(s[k] - ls[k]) < 1e-12 if isinstance(ls[k], float) else s.get(k) == ls[k]
            if not same:
                bad.append(f"doc {ls['doc_id']} ({ls['filter']}): {k}: ours {str(s.get(k))[:120]!r}, "
                           f"lm-eval's {str(ls[k])[:120]!r}")
    if res["task_hashes"] != lres["task_hashes"]:
        bad.append(f"task_hashes: ours {res['task_hashes']}, lm-eval's {lres['task_hashes']}")
    r, lr = res["results"][task], lres["results"][task]
    if list(r) != list(lr):
        bad.append(f"results keys {list(r)}, lm-eval's {list(lr)}")
    for k in lr:
        same = abs(r[k] - lr[k]) < 1e-12 if isinstance(lr[k], float) else r.get(k) == lr[k]
        bad += [] if same else [f"results.{task}.{k}: ours {r.get(k)!r}, lm-eval's {lr[k]!r}"]
    for key in ("n-samples", "versions", "n-shot", "higher_is_better", "group_subtasks"):
        bad += [] if res[key] == lres[key] else [f"{key}: ours {res[key]}, lm-eval's {lres[key]}"]
    ours_cfg = {k: v for k, v in res["configs"][task].items() if k not in ("dataset_path", "dataset_name")}
    bad += subset_diff(ours_cfg, lres["configs"][task], f"configs.{task}")
    bad += [f"top-level key {k!r} missing" for k in lres if k not in res]
    return bad


def count(s):
    """--limit: a whole number from 1 (lib.util.number's words; lib/ is imported only after lm-eval is)."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer >= 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s} is out of range: expected an integer >= 1")
    return n


def task_list(s):
    """--tasks: a comma-separated list of TASKS, spaces around them dropped -> the same list, cleaned; an
    unknown task is named before anything runs (lib.util.comma_list's words, for the reason count gives)."""
    got = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in got if t not in TASKS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or repr(s)}: not a task; the tasks are "
                                         f"{', '.join(TASKS)} (comma-separated)")
    return ",".join(got)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: a tiny random one)")
    ap.add_argument("--data-dir", default=None, help="data root with <task>/ files (default: tiny files written here)")
    ap.add_argument("--limit", type=count, default=4, help="documents per task (default 4)")
    ap.add_argument("--tasks", type=task_list, default=",".join(TASKS))
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs evals/run.py")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="check-lm-eval-")
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tmp, "datasets"))   # before datasets is imported
    from lm_eval.utils import make_table
    sys.path.insert(0, str(REPO))
    if a.model is None:
        from lib import tiny
        a.model = tiny.write_tiny_checkpoint(Path(tmp) / "tiny", shape="gqa", seed=0)
    data_dir, stand_in = (a.data_dir, False) if a.data_dir else (write_data(Path(tmp) / "data"), True)
    failures, hashes = 0, {}
    for task in a.tasks.split(","):
        work = Path(tmp) / task
        work.mkdir()
        res, samples = run_ours(a.python, task, a.model, data_dir, a.limit, work / "ours", stand_in)
        print(make_table(res))
        lres, lsamples, missing = run_lm_eval(task, data_dir, a.limit, samples, str(a.model), work)
        bad = compare(task, res, samples, lres, lsamples, missing)
        hashes[task] = res["task_hashes"][task]
        print(f"{task}: {len(samples)} sample lines, {len(lsamples)} from lm-eval; " +
              ("every field, hash and metric equal" if not bad else f"{len(bad)} differences:"))
        for b in bad[:20]:
            print("   ", b)
        failures += bool(bad)
    print(f"task hashes ({'tiny data, limit %d' % a.limit if stand_in else data_dir}): {json.dumps(hashes, indent=1)}")
    print(f"files in {tmp}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
