"""
Data files, prompts, filters and metrics of the four evaluations, following lm-evaluation-harness
0.4.x to the character (docs/evaluation.md; the lm-eval source each part follows is named where it is).

Nothing here touches a model: every function maps documents to strings, or strings to numbers,
so each piece can be checked against lm-eval's own outputs on its own.
  piqa       0-shot multiple choice, "Question: {goal}\nAnswer:" + " " + sol     (lm_eval/tasks/piqa)
  hellaswag  0-shot multiple choice, preprocessed "{label}: {ctx}" + " " + ending (lm_eval/tasks/hellaswag)
  gsm8k      5-shot generation, shots drawn by one random.Random(1234) over the train split (lm_eval/tasks/gsm8k)
  mnist      Textual MNIST (paper §4.2); its files are lib/mnist.py's, its prompt and scoring rigsa.py's
"""

import io
import json
import math
import os
import random
import re

import numpy as np

from lib import util

# -----------------------------------------------------------------------------
# data files: (path under data/<task>/, url, hash kind, hash)
# sha256 values were checked on the real files unless noted.

_GSM = "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/"
_PIQA = "https://raw.githubusercontent.com/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/"
_HSWAG = "https://raw.githubusercontent.com/rowanz/hellaswag/a29ff8e9a04bba4bd6588223785ce105328adc57/data/"
FILES = {
    "gsm8k": [
        ("train.jsonl", _GSM + "train.jsonl", "sha256", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
        ("test.jsonl", _GSM + "test.jsonl", "sha256", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    ],
    "piqa": [
        ("valid.jsonl", _PIQA + "valid.jsonl", "sha256", "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
        ("valid-labels.lst", _PIQA + "valid-labels.lst", "sha256", "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    ],
    # The file could not be obtained here, so no sha256 of it could be checked. What is known is its
    # git blob id in rowanz/hellaswag @ a29ff8e9, and a git blob id is a checksum of
    # the content: sha1(b"blob <size>\0" + bytes). We pin that.
    "hellaswag": [
        ("hellaswag_val.jsonl", _HSWAG + "hellaswag_val.jsonl", "gitsha1", "0f5ee25d72216f12317d5d8a7b92deafa423d81e"),
    ],
    # mnist: rigsa.py owns its four files (ensure_mnist: sizes and md5s pinned, same mirror)
}


def ensure_files(task, data_dir, download=True, verify=True, names=None):
    """{name: path} of the task's files under data_dir/<task>/, the missing ones downloaded and the
    present ones checked against their pinned hashes (util.ensure_files); verify=False skips the
    check (tests write tiny stand-in files); names: only these files."""
    files = [(name, url, kind, digest, None) for name, url, kind, digest in FILES[task] if names is None or name in names]
    return {name: str(path) for name, path in
            util.ensure_files(task, task, os.path.join(data_dir, task), files, download, verify).items()}


# -----------------------------------------------------------------------------
# reading: every record checked against its task's schema before any model loads, with or without
# --no-verify (a checksum vouches for the pinned file, not for stand-in data); one error line names
# the file, the line and the field

FIX = "fix or replace the file (--no-verify skips checksums, never structure)"


def _final_answer(v):
    # exact_match compares what follows the last "#### " (gsm8k.yaml regexes_to_ignore): a number
    return isinstance(v, str) and "#### " in v and \
        re.fullmatch(r"-?[0-9][0-9,]*(\.[0-9]+)?", v.rsplit("#### ", 1)[1].strip()) is not None


STRING = (lambda v: isinstance(v, str), "a string")
SCHEMAS = {   # field: (check, what it must be); fields a task does not read are not checked
    "piqa": {"goal": STRING, "sol1": STRING, "sol2": STRING},
    "hellaswag": {"activity_label": STRING, "ctx_a": STRING, "ctx_b": STRING,
                  "endings": (lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(e, str) for e in v),
                              "a list of 4 strings"),
                  # an int in the original jsonl, a string in HF Rowan/hellaswag; never a bool
                  "label": (lambda v: (type(v) is int and 0 <= v <= 3) or v in ("0", "1", "2", "3"),
                            "0, 1, 2 or 3 (a number or a one-digit string)")},
    "gsm8k": {"question": STRING, "answer": (_final_answer, 'a string ending in "#### <number>" (the final answer)')},
}


def _shown(v):
    # unprintable characters escaped: a byte-order mark or a zero-width space would show as nothing
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in json.dumps(v, ensure_ascii=False))
    return s if len(s) <= 40 else s[:37] + "..."


def read_lines(task, path):
    """The file's lines as open(path, encoding="utf-8") reads them (universal newlines), or one error
    naming the line of its first byte that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{task}: {path} line {line}: byte 0x{data[e.start]:02x} is not "
                         f"UTF-8 text; {FIX}") from None
    return list(io.StringIO(text, newline=None))


def read_jsonl(task, path, schema):
    docs = []
    for i, line in enumerate(read_lines(task, path), 1):
        if not line.strip():
            continue
        where = f"{task}: {path} line {i}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); {FIX}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: {_shown(doc)} is not a JSON object; {FIX}")
        for k, (ok, want) in schema.items():
            if k not in doc:
                raise ValueError(f'{where}: "{k}" is missing, expected {want}; {FIX}')
            if not ok(doc[k]):
                raise ValueError(f'{where}: "{k}" is {_shown(doc[k])}, expected {want}; {FIX}')
        docs.append(doc)
    if not docs:  # an empty (or truncated-to-nothing) file would fail later as an unnamed max() of nothing
        raise ValueError(f"{task}: {path}: no documents (the file is empty); delete it to download it again, "
                         f"or put the real file there")
    return docs


def load_piqa(paths):
    # lm_eval/tasks/piqa/piqa.yaml: {goal, sol1, sol2} from valid.jsonl, label = int(line) of valid-labels.lst
    docs = read_jsonl("piqa", paths["valid.jsonl"], SCHEMAS["piqa"])
    path = paths["valid-labels.lst"]
    labels = [x.rstrip("\n") for x in read_lines("piqa", path)]
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {path}: {len(labels)} labels for {len(docs)} questions in valid.jsonl; {FIX}")
    for i, (doc, lab) in enumerate(zip(docs, labels), 1):
        if lab.strip() not in ("0", "1"):
            raise ValueError(f"piqa: {path} line {i}: label {_shown(lab)} is not 0 or 1; {FIX}")
        doc["label"] = int(lab)
    return docs


def load_hellaswag(paths):
    return read_jsonl("hellaswag", paths["hellaswag_val.jsonl"], SCHEMAS["hellaswag"])


def load_gsm8k(paths):
    return tuple(read_jsonl("gsm8k", paths[f], SCHEMAS["gsm8k"]) for f in ("train.jsonl", "test.jsonl"))


# -----------------------------------------------------------------------------
# multiple choice: (context, continuations, gold, choices) per document

def hellaswag_preprocess(text):
    # lm_eval/tasks/hellaswag/utils.py, in this order; the strip comes BEFORE the tag
    # removal, so "[step] Get ..." keeps a leading space, and "  " -> " " is a single pass.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()  # str.capitalize lowers the rest, as lm-eval
    return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "label": int(doc["label"])}


def mc_docs(task, docs, chat=None):
    """-> list of dict(context, continuations, target, choices). chat: None for plain text (lm-eval's
    default), or a function messages -> rendered ChatML string for --chat (lm-eval's --apply_chat_template)."""
    out = []
    for doc in docs:
        if task == "piqa":
            text, choices, target = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
        else:
            d = hellaswag_doc(doc)
            text, choices, target = d["query"], d["choices"], d["label"]
        if chat is None:
            ctx, delim = text, " "  # target_delimiter " " (TaskConfig's default); choices NOT stripped
        else:
            ctx, delim = chat([{"role": "user", "content": text}]), ""  # chat: lm-eval drops the delimiter
        out.append({"context": ctx, "continuations": [delim + c for c in choices],
                    "target": target, "choices": choices, "doc": lm_eval_doc(task, doc)})
    return out


def lm_eval_doc(task, doc):
    """The document as lm-eval's task holds it, which its samples log and its doc_hash hashes:
    the data file's row (PIQA: valid.jsonl's keys and the label) and, for HellaSwag, process_docs'
    three columns after the row's own (datasets' map appends them)."""
    if task != "hellaswag":
        return doc
    d = hellaswag_doc(doc)
    return {**doc, "query": d["query"], "choices": d["choices"], "gold": d["label"]}


# -----------------------------------------------------------------------------
# GSM8k (lm_eval/tasks/gsm8k/gsm8k.yaml)

GSM8K_SEED = 1234  # lm-eval fewshot_random_seed
GSM8K_SHOTS = 5    # gsm8k.yaml num_fewshot
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]
GSM8K_MAX_NEW = 256  # no max_gen_toks in the yaml -> HFLM default
GSM8K_GEN_KWARGS = {"until": GSM8K_UNTIL, "do_sample": False, "temperature": 0.0}  # the yaml's, in each request


def gsm8k_fewshot_indices(n_docs, n_train, k=GSM8K_SHOTS, seed=GSM8K_SEED):
    # ONE Random(1234) consumed in document order: doc i gets the (i+1)-th draw. The current doc is
    # not excluded (fewshot_split != test_split). --limit N gives the first N draws of a full run.
    rnd = random.Random(seed)
    return [rnd.sample(range(n_train), k) for _ in range(n_docs)]


def gsm8k_prompt(train, doc, shots, chat=None):
    q = lambda d: f"Question: {d['question']}\nAnswer:"
    if chat is None:  # plain text: shot + " " + full answer + "\n\n", then the question
        return "".join(q(train[j]) + " " + train[j]["answer"] + "\n\n" for j in shots) + q(doc)
    # --chat: lm-eval >= 0.4.10 with --apply_chat_template turns fewshot_as_multiturn on
    msgs = []
    for j in shots:
        msgs += [{"role": "user", "content": q(train[j])}, {"role": "assistant", "content": train[j]["answer"]}]
    return chat(msgs + [{"role": "user", "content": q(doc)}])


STRICT_RX = r"#### (\-?[0-9\.\,]+)"            # gsm8k.yaml filter_list "strict-match", then take_first
FLEX_RX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"         # "flexible-extract": group_select -1, then take_first


def strict_extract(s):
    m = re.findall(STRICT_RX, s)  # first match
    return m[0].strip() if m else "[invalid]"


def flexible_extract(s):
    m = re.findall(FLEX_RX, s)
    if not m:
        return "[invalid]"
    groups = [g for g in m[-1] if g]  # last match, first non-empty group
    return groups[0].strip() if groups else "[invalid]"


_EM_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # gsm8k.yaml regexes_to_ignore, applied in order


def exact_match(pred, ref):
    for rx in _EM_IGNORE:
        pred, ref = re.sub(rx, "", pred), re.sub(rx, "", ref)
    return int(pred.lower() == ref.lower())  # ignore_case: true, ignore_punctuation: false


# -----------------------------------------------------------------------------
# lm-eval 0.4.13's own description of each task, as its results file carries it: the `configs`
# entries (TaskConfig.to_dict of lm_eval/tasks/<task>/<task>.yaml; the keys that say how a number
# was made, without process_docs' source, fewshot_config and dataset_kwargs), `versions`
# (metadata.version) and `higher_is_better`. bench/check_lm_eval.py compares them with lm-eval's.

_MC_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
_COMMON = {"description": "", "target_delimiter": " ", "fewshot_delimiter": "\n\n", "repeats": 1}  # TaskConfig defaults
LM_EVAL_CONFIGS = {
    "piqa": {"task": "piqa", "dataset_path": "baber/piqa", "training_split": "train", "validation_split": "validation",
             "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
             **_COMMON, "num_fewshot": 0, "metric_list": _MC_METRICS, "output_type": "multiple_choice",
             "should_decontaminate": True, "doc_to_decontamination_query": "goal", "metadata": {"version": 1.0}},
    "hellaswag": {"task": "hellaswag", "tag": ["multiple_choice"], "dataset_path": "Rowan/hellaswag",
                  "training_split": "train", "validation_split": "validation", "doc_to_text": "{{query}}",
                  "doc_to_target": "{{label}}", "doc_to_choice": "choices", **_COMMON, "num_fewshot": 0,
                  "metric_list": _MC_METRICS, "output_type": "multiple_choice", "should_decontaminate": False,
                  "metadata": {"version": 1.0}},
    "gsm8k": {"task": "gsm8k", "tag": ["math_word_problems"], "dataset_path": "openai/gsm8k", "dataset_name": "main",
              "training_split": "train", "test_split": "test", "fewshot_split": "train",
              "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}", **_COMMON,
              "num_fewshot": GSM8K_SHOTS,
              "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                               "ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": _EM_IGNORE}],
              "output_type": "generate_until", "generation_kwargs": GSM8K_GEN_KWARGS,
              "filter_list": [{"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": STRICT_RX},
                                                                  {"function": "take_first"}]},
                              {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                                       "regex_pattern": FLEX_RX},
                                                                      {"function": "take_first"}]}],
              "should_decontaminate": False, "metadata": {"version": 3.0}},
    # not an lm-eval task: the same shape, for the paper's target task (§4.2; its files are lib/mnist.py's)
    "mnist": {"task": "mnist", "dataset_path": "mnist (IDX files; mnist.load_mnist)", "test_split": "test",
              "fewshot_split": "train", "num_fewshot": 0, "output_type": "generate_until",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}},
}


def lm_eval_higher_is_better(task):
    return {m["metric"]: m["higher_is_better"] for m in LM_EVAL_CONFIGS[task]["metric_list"]}


# -----------------------------------------------------------------------------
# metrics (lm_eval/api/metrics.py)

def mc_scores(lls, choices, target):
    # ConfigurableTask.process_results: np.argmax(lls) and np.argmax(lls / completion_len), the
    # first maximum winning ties; acc_norm divides by the character length of the choice as
    # doc_to_choice returns it (no delimiter, inner/outer whitespace counted). An empty choice
    # divides by 0 as numpy does (-inf for a log-likelihood below 0: never chosen), not an error
    lls = np.asarray(lls, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = lls / np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls) == target), int(np.argmax(norm) == target)


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def mean_stderr(xs):
    # sample stddev (ddof=1) / sqrt(n); lm-eval reports "N/A" for n < 2, we write null
    if len(xs) < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
