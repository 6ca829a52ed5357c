# evals/: the lm-eval protocol pieces on hand-made cases, the scoring paths against each other and
# against a naive full-logits reference, one CLI run per task on tiny files (bench/check_lm_eval.py's)
# with lm-eval's file layout and hashes as recorded from lm-eval itself, and the CLI's
# bad-input matrix. lm-eval is not needed: bench/check_lm_eval.py is the live check.
import json
import math
import os
import random
import re
import shutil
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import qlora  # noqa: E402
import rigsa  # noqa: E402
from lib import mnist, util  # noqa: E402
from evals import harness as H  # noqa: E402
from evals import run as R  # noqa: E402
from evals import tasks as T  # noqa: E402

GOLD18 = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 9*2 = 18\n#### 18"


# ----------------------------------------------------------------------------- prompts

def test_hellaswag_preprocess_cases():
    P = T.hellaswag_preprocess
    # strip BEFORE tag removal: a leading [step] leaves a leading space; " [title]" -> ". "
    assert P("[step] Get a bucket. [title] Fill it.") == " Get a bucket.. Fill it."
    assert P("[header] How to paint [title] Buy paint.") == " How to paint. Buy paint."
    assert P("a [substeps] b") == "a b"                      # tag removed, "  " -> " "
    assert P("a   b") == "a  b"                              # one non-overlapping pass only
    assert P("  x [x] [y] ") == "x "                          # tags go after the strip: space stays
    d = T.hellaswag_doc({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                         "ctx_b": "he", "endings": ["a", "b", "c", "starts pulling up roofing on a roof."],
                         "label": 3})
    assert d["query"] == "Roof shingle removal: A man is sitting on a roof. He"     # HellaSwag val ind 24
    assert d["label"] == 3 and d["choices"][3] == "starts pulling up roofing on a roof."
    # capitalize lowers the rest of ctx_b; an empty ctx_b leaves a space that the strip removes
    d = T.hellaswag_doc({"activity_label": "X", "ctx_a": "Ab.", "ctx_b": "the MAN runs", "endings": [""] * 4,
                         "label": "0"})
    assert d["query"] == "X: Ab. The man runs" and d["label"] == 0
    d = T.hellaswag_doc({"activity_label": "X", "ctx_a": "A dog runs.", "ctx_b": "", "endings": ["e"] * 4, "label": 1})
    assert d["query"] == "X: A dog runs."
    mc = T.mc_docs("hellaswag", [{"activity_label": "X", "ctx_a": "A.", "ctx_b": "", "label": 2,
                                  "endings": ["[step] Get a bucket.", "b", "c", "d"]}])[0]
    assert mc["context"] == "X: A." and mc["continuations"][0] == "  Get a bucket." and mc["target"] == 2


def test_piqa_whitespace_kept_and_files(tmp_path):
    d = tmp_path / "piqa"
    d.mkdir()
    rows = [{"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
            {"goal": "g", "sol1": " a", "sol2": "b"}]
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid-labels.lst").write_text("1\n0\n")
    docs = T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False))
    mc = T.mc_docs("piqa", docs)
    assert mc[0]["context"] == "Question: dresser\nAnswer:"
    assert mc[0]["continuations"] == [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "]
    assert mc[1]["continuations"] == ["  a", " b"] and [m["target"] for m in mc] == [1, 0]
    assert mc[0]["choices"][1] == "finish, woodgrain with  bobby pin "   # acc_norm length counts it: 34
    assert len(mc[0]["choices"][1]) == 34
    # labels out of line with questions, a malformed line: one error naming file (and line)
    (d / "valid-labels.lst").write_text("1\n")
    with pytest.raises(ValueError, match="1 labels for 2 questions"):
        T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False))
    (d / "valid.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"valid.jsonl line 2: malformed JSON"):
        T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False))


def test_missing_files_one_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        T.ensure_files("gsm8k", str(tmp_path), download=False)
    msg = str(e.value)
    assert "train.jsonl" in msg and "test.jsonl" in msg and "raw.githubusercontent.com/openai" in msg
    assert str(tmp_path / "gsm8k") in msg
    # a present file with the wrong checksum is not the pinned data
    (tmp_path / "gsm8k").mkdir(exist_ok=True)
    (tmp_path / "gsm8k" / "train.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="sha256"):
        T.ensure_files("gsm8k", str(tmp_path), download=False)


# ----------------------------------------------------------------------------- GSM8k

def test_gsm8k_fewshot_draw_matches_protocol():
    idx = T.gsm8k_fewshot_indices(1319, 7473)   # lm-eval 0.4.13's own draws (train length 7473)
    assert idx[0] == [6374, 3610, 957, 61, 742]
    assert idx[1] == [7462, 6610, 4769, 286, 5501]
    assert idx[2] == [5677, 687, 806, 6279, 2905]
    assert idx[3] == [1939, 142, 252, 6461, 129]
    assert idx[4] == [2835, 5311, 5105, 3966, 5044]
    assert idx[1318] == [220, 4179, 6064, 5599, 5541]
    assert T.gsm8k_fewshot_indices(3, 7473) == idx[:3]   # --limit keeps the draws of a full run
    train = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(7473)]
    p = T.gsm8k_prompt(train, {"question": "Q?", "answer": ""}, idx[0])
    assert p.startswith("Question: q6374\nAnswer: a6374\n#### 6374\n\nQuestion: q3610\n")
    assert p.endswith("Answer: a742\n#### 742\n\nQuestion: Q?\nAnswer:")


@pytest.mark.parametrize("gen,strict,flex,em_s,em_f", [
    # lm-eval's RegexFilter and exact_match on these (gold: final answer 18)
    (" ... 9*2=18.\n#### 18", "18", "18", 1, 1),
    (" The answer is $18.", "[invalid]", "$18.", 0, 1),
    (" #### 18.00", "18.00", "18.00", 0, 0),
    (" 9 eggs x $2 = $18\n#### $18", "[invalid]", "$18", 0, 1),
    (" #### 1,8", "1,8", "1,8", 1, 1),
    (" So she makes 18 dollars...", "[invalid]", "...", 0, 0),
    (" #### 18 dollars\nExtra 7", "18", "7", 1, 0),
    (" -18", "[invalid]", "-18", 0, 0),
    # more by hand
    (" #### 18\n#### 19", "18", "19", 1, 0),     # strict: first; flexible: last
    (" 5 - 7 = -2, so 18", "[invalid]", "18", 0, 1),
    ("", "[invalid]", "[invalid]", 0, 0),
])
def test_gsm8k_extraction(gen, strict, flex, em_s, em_f):
    assert T.strict_extract(gen) == strict and T.flexible_extract(gen) == flex
    assert T.exact_match(strict, GOLD18) == em_s and T.exact_match(flex, GOLD18) == em_f


def test_gsm8k_exact_match_reference_reduction():
    assert T.exact_match("1234", "x\n#### 1,234") == 1      # commas dropped on both sides
    assert T.exact_match("-5", "x\n#### -5") == 1
    assert T.exact_match("$2.5.", "x\n#### 2.5") == 1       # "$" and one trailing "." dropped
    assert T.exact_match("2.50", "x\n#### 2.5") == 0


# ----------------------------------------------------------------------------- metrics

def test_acc_norm_by_char_length_and_ties():
    assert T.mc_scores([-10.0, -12.0], ["ab", "abcdefgh"], 1) == (0, 1)   # -5 vs -1.5 per char
    assert T.mc_scores([-3.0, -3.0], ["a", "b"], 0) == (1, 1)             # ties: first index
    assert T.mc_scores([-6.0, -3.0], ["  a ", "b"], 0) == (0, 1)          # whitespace counts: 4 chars
    assert T.mean_stderr([1]) is None
    xs = [1, 0, 1, 1]
    assert math.isclose(T.mean_stderr(xs), math.sqrt(sum((x - 0.75) ** 2 for x in xs) / 3) / 2)


# ----------------------------------------------------------------------------- scoring

def test_encode_pair_moves_trailing_whitespace(tiny_dir):
    _, tok = M.load(str(tiny_dir))
    ctx, cont = H.encode_pair(tok, "The digit is \n", "7")
    assert ctx == tok.encode("The digit is")
    assert ctx + cont == tok.encode("The digit is")[:len(ctx)] + tok.encode("The digit is \n7")[len(ctx):]
    # chat mode: the context ends in "assistant\n", which moves into the continuation (lm-eval's chat mode)
    c = tok.chat([{"role": "user", "content": "Question: x\nAnswer:"}])
    ctx, cont = H.encode_pair(tok, c, "yes")
    assert tok.decode(ctx).endswith("<|im_start|>assistant") and tok.decode(cont) == "\nyes"


def _requests(tok):
    texts = [("Question: How do I\nAnswer:", [" The answer is 5", " the of and to in is that", " x"]),
             ("The digit is ", ["7", "8 and 9"]),
             ("system user assistant", [" Hugging Face trained", " a"]),
             ("Answer: The answer is 12345 and", [" 6", " 7 8 9 0 1 2"]),
             # continuations sharing a prefix (scored once), one a prefix of another, a 1-token one
             ("Question: x\nAnswer:", [" The answer is 5", " The answer is 7 and 8", " The answer"]),
             ("Question: y\nAnswer:", [" The answer is 5 and", " The answer is 5 or"])]
    docs = []
    for c, conts in texts:
        pairs = [H.encode_pair(tok, c, x) for x in conts]
        docs.append((pairs[0][0], [p[1] for p in pairs]))
    return docs


@torch.inference_mode()
def _naive(model, ctx, cont):
    # lm-eval's HFLM._loglikelihood_tokens for one request: full logits, log_softmax, gather, sum
    inp = torch.tensor([(ctx + cont)[:-1]])
    lp = F.log_softmax(model(inp), dim=-1)[0, -len(cont):]
    tgt = torch.tensor(cont)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def test_batched_equals_unbatched_and_naive(tiny_dir):
    model, tok = M.load(str(tiny_dir))
    reqs = [(c, x) for c, xs in _requests(tok) for x in xs]
    one = H.score_separate(model, reqs, batch_size=1)
    many = H.score_separate(model, reqs, batch_size=5)
    for (a, ga), (b, gb), (c, x) in zip(one, many, reqs, strict=True):
        ref, gref = _naive(model, c, x)
        assert abs(a - b) < 1e-4 and abs(a - ref) < 1e-4 and ga == gb == gref


@pytest.mark.parametrize("block", [512, 3])   # 3: lm_head blocks end inside shared prefixes
def test_shared_context_equals_separate(tiny_dir, tiny_mha_dir, monkeypatch, block):
    monkeypatch.setattr(H, "LOGITS_BLOCK", block)
    for d in (tiny_dir, tiny_mha_dir):
        model, tok = M.load(str(d))
        docs = _requests(tok)
        assert [H._common_prefix(cs) for _, cs in docs[-2:]] == [1, len(docs[-1][1][0]) - 1]   # tiny tokenizer
        sep = H.score_separate(model, [(c, x) for c, xs in docs for x in xs], batch_size=3)
        for bs, row_tokens in ((1, 256), (3, 1), (3, 256)):   # one row per document / all in one row
            shared = [s for doc in H.score_shared(model, docs, batch_size=bs, row_tokens=row_tokens) for s in doc]
            assert len(shared) == len(sep)
            for (a, ga), (b, gb) in zip(shared, sep):
                assert abs(a - b) < 1e-4 and ga == gb


def test_is_greedy_on_the_models_own_continuation(tiny_dir):
    # is_greedy is True only where every token is the argmax: the model's own greedy tokens, and
    # not the same tokens with the last one changed (the two share a 3-token prefix, scored once)
    model, tok = M.load(str(tiny_dir))
    ctx = tok.encode("Question: How do I\nAnswer:")
    g = M.generate_ids(model, [ctx], 4, eos_id=-1)[0]
    other = [g[:3] + [(g[3] + 1) % tok.vocab_size]]
    docs = [(ctx, [g] + other), (ctx, other + [g])]
    shared = [s for doc in H.score_shared(model, docs, batch_size=2) for s in doc]
    assert [s[1] for s in shared] == [True, False, False, True]
    for (a, ga), (c, x) in zip(shared, [(c, x) for c, xs in docs for x in xs]):
        ref, gref = _naive(model, c, x)
        assert abs(a - ref) < 1e-4 and ga == gref


def test_pack_partitions_segments_with_little_padding():
    rnd = random.Random(0)
    for n in (1, 2, 7, 40):
        lens = [rnd.randint(5, 120) for _ in range(n)]
        rows = H._pack(lens, 256)
        assert sorted(j for r in rows for j in r) == list(range(n)) and all(rows)
        width = max(sum(lens[j] for j in r) for r in rows)
        assert width <= max(256, max(lens)) and len(rows) * width < sum(lens) + 256 + max(lens)
    assert H._pack([300, 10], 256) in ([[0], [1]], [[0, 1]])   # a segment longer than the budget


def test_auto_batch_size(tiny_dir):
    model, _ = M.load(str(tiny_dir))
    a, b = H.auto_batch_size(model, 100, 4), H.auto_batch_size(model, 100, 4, cap=3)
    assert 1 <= a <= 64 and b == 3 and H.auto_batch_size(model, 10 ** 6, 4) == 1   # huge rows: one at a time
    assert H.auto_batch_size(model, 100, generate=True) == 128   # CPU generation: the cap binds on a tiny model


def test_score_shared_bf16_close(tiny_dir):
    model, tok = M.load(str(tiny_dir), dtype=torch.bfloat16)
    docs = _requests(tok)
    shared = [s[0] for doc in H.score_shared(model, docs, batch_size=4) for s in doc]
    naive = [_naive(model, c, x)[0] for c, xs in docs for x in xs]
    assert all(abs(a - b) <= 0.05 * abs(b) + 0.5 for a, b in zip(shared, naive, strict=True))   # bf16 sums are coarse


# ----------------------------------------------------------------------------- end to end

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

# lm-eval 0.4.13's task hashes (EvaluationTracker.save_results_aggregated: sha256 over every logged
# sample's doc_hash + prompt_hash + target_hash, in order) of the first 4 documents of
# bench/check_lm_eval.py's write_data files, as `python bench/check_lm_eval.py` printed them from
# lm-eval's own task objects (lm_eval/tasks/<task>/<task>.yaml on those files) on 2026-12-01
LM_EVAL_TASK_HASHES = {"piqa": "04d2c4215e5114105afd20b0a82b63dd149e702f715534ec4142a536d3a378c1",
                       "hellaswag": "e5d527e85e1c853c79a787fd4892b32f6bf07e2efdb80d42f8e448ca159ce1a3",
                       "gsm8k": "4e169f401f005a02677ca89326a47eb6ec6606aa94680b1b39ecacb780b78423"}
# the layout of lm-eval 0.4.13's files, read off the ones its evaluator and EvaluationTracker wrote
LM_EVAL_TOP = ["results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
               "config", "git_hash", "date", "task_hashes", "model_source", "model_name", "model_name_sanitized",
               "system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
               "chat_template_sha", "total_evaluation_time_seconds"]
LM_EVAL_SAMPLE = ["doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
                  "prompt_hash", "target_hash"]   # then the metrics' values
LM_EVAL_RESULTS = {"mc": ["name", "alias", "sample_len", "acc,none", "acc_stderr,none", "acc_norm,none",
                          "acc_norm_stderr,none"],
                   "gsm8k": ["name", "alias", "sample_len", "exact_match,strict-match", "exact_match_stderr,strict-match",
                             "exact_match,flexible-extract", "exact_match_stderr,flexible-extract"],
                   "mnist": ["name", "alias", "sample_len", "acc,none", "acc_stderr,none"]}


def _write_data(root):
    # the files bench/check_lm_eval.py gives lm-eval (5 documents each, GSM8k 8 train lines), and MNIST
    sys.path.insert(0, BENCH)
    import check_lm_eval
    check_lm_eval.write_data(root)
    mnist.write_synthetic_mnist(root / "mnist", n_train=20, n_test=5)   # stand-in data: read with --no-verify


def _lm_eval_files(out, task):
    res, = out.glob("*/results_*.json")
    lines = [json.loads(x) for x in next(out.glob(f"*/samples_{task}_*.jsonl")).read_text().splitlines()]
    return json.loads(res.read_text()), lines


def _make_table_reads(res):
    # what lm_eval.utils.make_table reads, without lm-eval: results[k] with an alias and "metric,filter"
    # keys each with its "metric_stderr,filter" (a float or "N/A"), versions[k], n-shot, higher_is_better
    for k, r in res["results"].items():
        assert r["alias"] == k and k in res["versions"] and k in res["n-shot"] and k in res["higher_is_better"]
        for mf, v in r.items():
            m, _, f = mf.partition(",")
            if f and not m.endswith("_stderr"):
                se = r[f"{m}_stderr,{f}"]
                assert isinstance(v, float) and (se == "N/A" or isinstance(se, float))
                assert m in res["higher_is_better"][k]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _with_positions(src, dst, n):
    """A copy of a tiny checkpoint whose config says max_position_embeddings = n (same weights)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": n}))
    return dst


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "gsm8k", "mnist", "mnist5"])
def test_cli_end_to_end(task, tiny_dir, tmp_path, monkeypatch):
    _write_data(tmp_path)
    out, lm = tmp_path / "out.json", tmp_path / "lm"
    shots = ["--num-fewshot", "5", "--seed", "7"] if task == "mnist5" else []
    if shots:   # 5-shot prompts are ~5,000 tokens: SmolLM2's 8,192 positions hold them, the tiny config's 2,048 not
        tiny_dir = _with_positions(tiny_dir, tmp_path / "tiny8k", 8192)
    task = task[:5] if task == "mnist5" else task
    prompts, real = [], rigsa.prompt
    monkeypatch.setattr(rigsa, "prompt", lambda *a: prompts.append(real(*a)) or prompts[-1])
    monkeypatch.setattr(R.time, "time", lambda: 1.8e9)   # the wall clock frozen: durations are perf_counter's
    R.main(["--task", task, "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
            "--limit", "4", "--batch-size", "4" if task == "gsm8k" else "3", "--output", str(out),
            "--output_path", str(lm), "--log_samples", "--dtype", "float32"] + shots)
    r = json.loads(out.read_text())
    assert {"task", "model", "adapter", "dtype", "num_fewshot", "limit", "seconds", "metrics", "samples"} <= set(r)
    assert r["task"] == task and r["dtype"] == "float32" and r["limit"] == 4 and r["adapter"] is None
    assert 0 < r["seconds"] < 600 and r["docs_per_s"] > 0
    assert r["code"] == util.code_version() and r["machine"] == util.machine("cpu")   # what made it, and from
    folder = {"mnist": "mnist"}.get(task, task)                                        # which files, unchecked here
    read = {"piqa": ["valid.jsonl", "valid-labels.lst"], "hellaswag": ["hellaswag_val.jsonl"],
            "gsm8k": ["test.jsonl", "train.jsonl"]}.get(task) or \
        [n for n in mnist.MNIST_FILES if shots or n.startswith("t10k")]
    assert r["data_verified"] is False and sorted(r["data_files"]) == sorted(f"{folder}/{n}" for n in read), r["data_files"]
    assert all(h == util.file_hash(tmp_path / k, "sha256") for k, h in r["data_files"].items())
    assert len(r["samples"]) == 4 and [s["doc_id"] for s in r["samples"]] == [0, 1, 2, 3]
    s = r["samples"][0]
    # lm-eval's files: DIR/<model, sanitized>/results_<date>.json and samples_<task>_<date>.jsonl
    res, lines = _lm_eval_files(lm, task)
    assert [p.parent.name for p in lm.glob("*/*")] == [re.sub(r"[/:]", "__", str(tiny_dir))] * 2
    assert set(LM_EVAL_TOP) <= set(res) and list(res["results"]) == [task]
    kind = "mc" if task in ("piqa", "hellaswag") else task
    assert list(res["results"][task]) == LM_EVAL_RESULTS[kind]
    assert res["n-samples"] == {task: {"original": 5, "effective": 4}} and res["config"]["model"] == str(tiny_dir)
    assert res["n-shot"] == {task: r["num_fewshot"]} and res["configs"][task]["num_fewshot"] == r["num_fewshot"]
    _make_table_reads(res)
    for ours, key in R.LM_KEYS.items():   # the same numbers as --output's
        if ours in r["metrics"]:
            assert res["results"][task][",".join(key)] == r["metrics"][ours]
    assert len(lines) == (8 if task == "gsm8k" else 4)   # GSM8k: each document once per filter
    for x in lines:
        assert list(x) == LM_EVAL_SAMPLE + x["metrics"] and isinstance(x["target"], str)
        assert x["doc_hash"] == R.sha256(json.dumps(x["doc"], indent=2, ensure_ascii=False))
        assert x["prompt_hash"] == R.sha256(x["arguments"]["gen_args_0"]["arg_0"])
    assert res["task_hashes"] == {task: R.task_hash(lines)}
    if task != "mnist":
        assert res["task_hashes"][task] == LM_EVAL_TASK_HASHES[task]
    if task in ("piqa", "hellaswag"):
        k = 2 if task == "piqa" else 4
        assert set(r["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert set(s) == {"doc_id", "target", "loglikelihoods", "is_greedy", "acc", "acc_norm"}
        assert len(s["loglikelihoods"]) == len(s["is_greedy"]) == k and r["num_fewshot"] == 0
        assert r["metrics"]["acc"] == sum(x["acc"] for x in r["samples"]) / 4
        assert lines[0]["filtered_resps"] == [[str(ll), str(g)] for ll, g in zip(s["loglikelihoods"], s["is_greedy"])]
        # the CLI's log-likelihoods are the naive per-request ones
        model, tok = M.load(str(tiny_dir))
        docs = T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False)) if task == "piqa" \
            else T.load_hellaswag(T.ensure_files("hellaswag", str(tmp_path), download=False, verify=False))
        d = T.mc_docs(task, docs[:1])[0]
        for ll, c in zip(s["loglikelihoods"], d["continuations"]):
            assert abs(ll - _naive(model, *H.encode_pair(tok, d["context"], c))[0]) < 1e-4
    elif task == "gsm8k":
        assert set(r["metrics"]) == {"exact_match_strict", "exact_match_strict_stderr",
                                     "exact_match_flexible", "exact_match_flexible_stderr"}
        assert {"doc_id", "generation", "target", "strict", "flexible", "exact_match_strict",
                "exact_match_flexible"} <= set(s) and r["num_fewshot"] == 5
        assert s["fewshot_ids"] == T.gsm8k_fewshot_indices(1, 8)[0]
        assert all("Question:" not in x["generation"] for x in r["samples"])
        assert [x["filter"] for x in lines] == ["strict-match"] * 4 + ["flexible-extract"] * 4
        assert lines[4]["filtered_resps"] == [s["flexible"]] and lines[0]["resps"] == [[s["generation"]]]
    else:
        assert set(r["metrics"]) == {"acc", "acc_stderr"} and r["num_fewshot"] == (5 if shots else 0)
        assert set(s) == {"doc_id", "target", "prediction", "acc"} | ({"shots"} if shots else set())
        x, y = mnist.load_mnist(tmp_path / "mnist", "test", verify=False)
        if shots:   # the training images each prompt showed: the draw of --seed (7 here) over all documents
            pool = len(mnist.load_mnist(tmp_path / "mnist", "train", verify=False)[1])
            assert [t["shots"] for t in r["samples"]] == R.shot_draws(4, pool, 5, 7)
        assert [t["target"] for t in r["samples"]] == y[:4].tolist()
        assert all(t["acc"] == int(t["prediction"] == t["target"]) for t in r["samples"])
        # the logged prompts are the ones rigsa.mnist_accuracy scored (its calls follow the length probes, before the model loads and before scoring)
        assert [x["prompt_hash"] for x in lines] == [R.sha256(p) for p in prompts[2:6]]
        assert len(set(prompts[2:6])) == 4 and res["config"]["mnist_seed"] == (7 if shots else R.SHOT_SEED)


def test_cli_all_continues_past_a_failing_task(tiny_dir, tmp_path, monkeypatch, capsys):
    # --task all with one task's data missing (found before the model loads) and one failing
    # mid-run: the others run, each is written as it finishes, one error line per failed task, exit 1
    _write_data(tmp_path)
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").unlink()
    out, lm = tmp_path / "all.json", tmp_path / "lm"
    seen = []

    def oom(*a):
        seen.append(sorted(json.loads(out.read_text())))   # what --output held when gsm8k started
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(R, "eval_gsm8k", oom)
    with pytest.raises(SystemExit) as e:
        R.main(["--task", "all", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--limit", "2", "--output", str(out), "--output_path", str(lm), "--log_samples"])
    err = capsys.readouterr().err
    assert "error: --task all: 2 of 4 tasks failed (hellaswag, gsm8k" in str(e.value.code) and "Traceback" not in err
    assert err.count("error: hellaswag:") == 1 and "hellaswag_val.jsonl" in err
    assert err.count("error: gsm8k:") == 1 and "out of memory" in err
    assert seen == [["piqa"]]
    r = json.loads(out.read_text())
    assert sorted(r) == ["mnist", "piqa"] and all(len(v["samples"]) == 2 for v in r.values())
    res, _ = _lm_eval_files(lm, "mnist")
    assert list(res["results"]) == ["piqa", "mnist"] and sorted(res["task_hashes"]) == ["mnist", "piqa"]
    assert sorted(p.name.split("_")[1] for p in lm.glob("*/samples_*")) == ["mnist", "piqa"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_cli_bad_inputs(tiny_dir, tmp_path, capsys):
    # the bad-input matrix for evals/run.py: each bad input is refused in one line that names it, with no
    # traceback and no file left behind; all but the last are found before the model loads, which
    # --model <missing> shows (the error would otherwise be about the model)
    _write_data(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, lines in (("corrupt", ['{"goal": "a", "sol1": "b", "sol2": "c"}', "{oops"]), ("empty", [])):
        (tmp_path / name / "piqa").mkdir(parents=True)
        (tmp_path / name / "piqa" / "valid.jsonl").write_text("".join(x + "\n" for x in lines))
        (tmp_path / name / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    (tmp_path / "nodata").mkdir()
    nomodel = str(tmp_path / "no-model")
    usage = [(["--limit", "-3"], "--limit"), (["--limit", "x"], "--limit"),
             (["--num-fewshot", "-1"], "--num-fewshot"), (["--batch-size", "0"], "--batch-size"),
             (["--batch-size", "many"], "--batch-size"), (["--seed", "1.5"], "--seed"),
             (["--seed", str(2 ** 64)], "--seed"), (["--log_samples"], "--log_samples"),
             (["--task", "nope"], "--task"), (["--dtype", "int8"], "--dtype")]
    fatal = [(["--output", str(tmp_path)], "--output"),
             (["--output", str(tmp_path / "file" / "r.json")], "--output"),
             (["--output_path", str(tmp_path / "file")], "--output_path"),
             (["--output_path", str(tmp_path / "file" / "d")], "--output_path"),
             (["--num-fewshot", "3"], "--num-fewshot 3: piqa is 0-shot"),
             (["--task", "all", "--num-fewshot", "5"], "piqa is 0-shot"),
             (["--task", "gsm8k", "--num-fewshot", "9"], "--num-fewshot 9"),   # 8 train lines
             (["--device", "tpu7"], "--device"),
             (["--adapter", str(tmp_path / "absent")], "absent.safetensors"),
             (["--adapter", str(tmp_path / "junk")], "junk.safetensors"),
             (["--data-dir", str(tmp_path / "nodata")], "valid.jsonl"),
             (["--data-dir", str(tmp_path / "corrupt")], "valid.jsonl line 2"),
             (["--data-dir", str(tmp_path / "empty")], "valid.jsonl: no documents"),
             (["--model", nomodel, "--model", str(tmp_path / "absent-model")], "absent-model")]  # the model itself
    if not torch.cuda.is_available():
        fatal.append((["--device", "cuda"], "--device cuda"))
    before = _tree(tmp_path)
    for extra, thing in usage + fatal:
        with pytest.raises(SystemExit) as e:
            R.main(["--task", "piqa", "--model", nomodel, "--data-dir", str(tmp_path), "--no-verify", "--offline",
                    "--limit", "2"] + extra)
        err = capsys.readouterr().err
        if (extra, thing) in usage:   # argparse: usage and the message on stderr, exit 2
            assert e.value.code == 2 and thing in err, extra
        else:                         # ours: sys.exit("error: ...") is exit 1 with that line
            msg = str(e.value.code)
            assert msg.startswith("error: ") and thing in msg and "\n" not in msg and "no-model" not in msg, (extra, msg)
        assert "Traceback" not in err and _tree(tmp_path) == before, extra


def test_cli_adapter_of_another_model_and_unwritable_output(tiny_dir, tiny_mha_dir, tmp_path, monkeypatch):
    # a real process: an adapter trained on another shape ends in one named line, exit 1, no traceback
    import subprocess
    _write_data(tmp_path)
    net, _ = M.load(str(tiny_mha_dir))
    cfg = rigsa.Config(method="dense", model=str(tiny_mha_dir))
    rigsa.install_adapters(net, cfg)
    rigsa.save_adapter(net, str(tmp_path / "mha.safetensors"), cfg)
    before = _tree(tmp_path)
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(BENCH), "evals", "run.py"), "--task", "piqa",
                        "--model", str(tiny_dir), "--adapter", str(tmp_path / "mha"), "--data-dir", str(tmp_path),
                        "--no-verify", "--offline", "--limit", "1", "--output", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr and _tree(tmp_path) == before
    assert last.startswith(f"error: --adapter {tmp_path / 'mha'}: does not fit the base model {tiny_dir}"), last
    # a disk that fills up after the checks: the write fails with the flag's name, and no .tmp stays

    def full(path, *a, **kw):
        with open(path, "w") as f:
            f.write("{")                   # half a file, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(R.Path, "write_text", full)
    with pytest.raises(SystemExit, match=r"error: --output .*o\.json: cannot write \(No space left on device\)") as e:
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--limit", "1", "--output", str(tmp_path / "o.json")])
    assert str(e.value.code).count("cannot write") == 1, e.value.code   # said once, not wrapped twice
    assert _tree(tmp_path) == before
    with pytest.raises(SystemExit, match=r"error: --output_path .*: cannot write \(No space left on device\)"):
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--limit", "1", "--output_path", str(tmp_path / "lm" / "out")])
    assert _tree(tmp_path) == before   # the folders lm-eval's layout made for the file went with it


def test_cli_adapter_base_revision_and_quantize(tiny_dir, tmp_path, monkeypatch):
    # --adapter without --model loads the adapter's recorded base at its recorded revision; --revision
    # reaches model.resolve; a QLoRA adapter's 4-bit base says "nf4" (it quantizes the base itself)
    _write_data(tmp_path)
    net, _ = M.load(str(tiny_dir))
    qlora.quantize_model(net)
    qlora.apply_lora(net, 2, 32)
    rigsa.save_adapter(net, str(tmp_path / "q.safetensors"),
                       rigsa.Config(method="qlora", model=str(tiny_dir), revision="v1.0", rank=2, lora_alpha=32))
    calls, resolve = [], M.resolve
    monkeypatch.setattr(M, "resolve", lambda name, revision=None, *a, **k: calls.append((name, revision)) or
                        resolve(name, revision, *a, **k))
    runs = {}
    for extra in (["--adapter", str(tmp_path / "q"), "--revision", "v2.0"], ["--model", str(tiny_dir), "--revision", "abc123"]):
        with pytest.raises(SystemExit, match=f"error: --revision {extra[-1]}: the model {tiny_dir} is a local directory, "
                                             f"which has no revisions"):   # as rigsa.py train refuses it
            R.main(["--task", "piqa", "--data-dir", str(tmp_path), "--no-verify", "--offline", "--limit", "1"] + extra)
    for key, extra in (("recorded", ["--adapter", str(tmp_path / "q")]), ("plain", ["--model", str(tiny_dir)])):
        out = tmp_path / f"{key}.json"
        R.main(["--task", "piqa", "--data-dir", str(tmp_path), "--no-verify", "--offline", "--limit", "1",
                "--output", str(out), "--output_path", str(tmp_path / key)] + extra)
        runs[key] = (json.loads(out.read_text()), next((tmp_path / key).glob("*/results_*.json")))
    # (the resolved directory is then loaded as a path, without a revision)
    assert [(str(n), r) for n, r in calls if r] == [(str(tiny_dir), "v1.0")]
    (r, res), (p, _) = runs["recorded"], runs["plain"]
    cfg = json.loads(res.read_text())["config"]
    assert r["model"] == str(tiny_dir) and r["quantize"] == "nf4" and p["quantize"] is None
    assert cfg["quantize"] == "nf4" and cfg["adapter"] == str(tmp_path / "q") and cfg["model_revision"] == "v1.0"
    assert res.parent.name == re.sub(r"[/:]", "__", str(tmp_path / "q"))   # lm-eval names a PEFT run by its adapter


def test_cli_adapter_in_memory(tiny_dir, tmp_path):
    # a saved adapter changes the scores, equals the in-memory adapted model, and the checkpoint is untouched
    _write_data(tmp_path)
    model, tok = M.load(str(tiny_dir))
    cfg = rigsa.Config(method="dense", model=str(tiny_dir))
    layers = rigsa.install_adapters(model, cfg)
    with torch.no_grad():
        for L in layers.values():
            L.alpha.fill_(0.5)
    rigsa.save_adapter(model, str(tmp_path / "iter1.safetensors"), cfg)
    before = (tiny_dir / "model.safetensors").read_bytes()
    runs = {}
    for name, extra in (("base", []), ("adapted", ["--adapter", str(tmp_path / "iter1")])):
        out = tmp_path / f"{name}.json"
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                "--limit", "2", "--output", str(out), "--dtype", "float32"] + extra)
        runs[name] = json.loads(out.read_text())
    assert runs["adapted"]["adapter"] == str(tmp_path / "iter1")
    d = T.mc_docs("piqa", T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False))[:1])[0]
    want = [_naive(model, *H.encode_pair(tok, d["context"], c))[0] for c in d["continuations"]]
    got, base = runs["adapted"]["samples"][0]["loglikelihoods"], runs["base"]["samples"][0]["loglikelihoods"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, want, strict=True)) and all(abs(a - b) > 1e-3 for a, b in zip(got, base, strict=True))
    assert (tiny_dir / "model.safetensors").read_bytes() == before


def test_text_model_trainer(tmp_path):
    # bench/train_text_model.py, the checkpoint behind the generation parity check: it learns (the
    # loss falls well below its start) and writes a checkpoint and tokenizer that load() reads back
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import train_text_model
    d = tmp_path / "gsm8k"
    d.mkdir()
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a in range(1, 9) for b in range(1, 5)]
    for name in ("train.jsonl", "test.jsonl"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lm"
    out.mkdir()   # an empty folder is taken; one with files is not
    argv = ["--data-dir", str(tmp_path), "--out", str(out), "--no-verify", "--steps", "40",
            "--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64",
            "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1",
            "--batch-size", "4", "--seq-len", "64", "--warmup", "2", "--lr", "1e-2"]
    train_text_model.main(argv)
    run = json.loads((out / "train_config.json").read_text())
    assert run["final_loss"] < run["first_loss"] - 2.0, run
    model, tok = M.load(str(out))
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 1
    assert tok.decode(tok.encode("Question: 12")) == "Question: 12"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k", "lm"]   # nothing partial left beside it
    before = {p: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:   # another model's folder (or this one) is never written over
        train_text_model.main(argv)
    assert e.value.code == (f"error: --out {out}: holds files; this script writes a new model's folder: choose "
                            f"another --out, or move that one away")
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(SystemExit) as e:
        train_text_model.main(argv[:3] + [str(out / "config.json")] + argv[4:])
    assert e.value.code.startswith(f"error: --out {out / 'config.json'}: is a file;")

    def stop(*a, **k):   # a run stopped while it trains leaves no folder, half-written or not
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), mock.patch.object(train_text_model.torch.nn.utils, "clip_grad_norm_", stop):
        train_text_model.main(argv[:3] + [str(tmp_path / "lm2")] + argv[4:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k", "lm"]
    with pytest.raises(SystemExit) as e:
        train_text_model.main(argv + ["--steps", "0"])
    assert e.value.code == 2
    (tmp_path / "bad" / "gsm8k").mkdir(parents=True)   # a damaged GSM8k file: one line, no traceback, nothing written
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "bad" / "gsm8k" / name).write_text("{oops\n")
    with pytest.raises(SystemExit) as e:
        train_text_model.main(["--data-dir", str(tmp_path / "bad"), "--out", str(tmp_path / "lm3"), "--no-verify"])
    assert str(e.value.code).startswith("error: ") and "train.jsonl" in str(e.value.code), e.value.code
    assert not (tmp_path / "lm3").exists()


def test_limit_0_is_every_document_and_a_limit_past_the_end_is_said(tiny_dir, tmp_path, capsys):
    _write_data(tmp_path)
    out = tmp_path / "o.json"
    n = len(T.load_piqa(T.ensure_files("piqa", tmp_path, download=False, verify=False)))
    run = ["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
           "--output", str(out)]
    R.main(run + ["--limit", "0"])
    r = json.loads(out.read_text())
    assert r["limit"] is None and r["docs"] == n
    assert "note: --limit" not in capsys.readouterr().err
    R.main(run + ["--limit", str(n + 1)])   # the whole split, as lm-eval does, and said before the model loads
    r = json.loads(out.read_text())
    assert r["limit"] == n + 1 and r["docs"] == n
    err = capsys.readouterr().err
    note = (f"note: --limit {n + 1}: piqa has {n} documents, so all of them are evaluated (the results' \"docs\" "
            f"says how many)")
    assert note in err and err.index(note) < err.index("model ")
    R.main(run + ["--limit", str(n)])   # exactly the split: nothing to say
    assert "note: --limit" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- data checked before it is scored

def _set_line(path, n, raw):
    lines = path.read_bytes().split(b"\n")
    lines[n - 1] = raw if isinstance(raw, bytes) else raw.encode()
    path.write_bytes(b"\n".join(lines))


_PIQA, _HS = {"goal": "g", "sol1": "a", "sol2": "b"}, {"activity_label": "A", "ctx_a": "c", "ctx_b": "d",
                                                       "endings": ["1", "2", "3", "4"], "label": 0}


@pytest.mark.parametrize("task,file,line,raw,said", [
    ("piqa", "valid.jsonl", 3, json.dumps({**_PIQA, "goal": None}), '"goal" is null, expected a string'),
    ("piqa", "valid.jsonl", 2, json.dumps({**_PIQA, "sol1": 5}), '"sol1" is 5, expected a string'),
    ("piqa", "valid-labels.lst", 4, "2", 'label "2" is not 0 or 1'),
    ("piqa", "valid-labels.lst", 1, "\ufeff0", 'label "\\ufeff0" is not 0 or 1'),   # a byte-order mark, shown
    ("piqa", "valid.jsonl", 4, b'{"goal": "caf\xe9", "sol1": "a", "sol2": "b"}', "byte 0xe9 is not UTF-8"),
    ("piqa", "valid-labels.lst", 2, b"\xff", "byte 0xff is not UTF-8"),
    ("piqa", "valid.jsonl", 1, "[1, 2]", "[1, 2] is not a JSON object"),
    ("hellaswag", "hellaswag_val.jsonl", 1, json.dumps({**_HS, "endings": "abcd"}),
     '"endings" is "abcd", expected a list of 4 strings'),
    ("hellaswag", "hellaswag_val.jsonl", 2, json.dumps({**_HS, "endings": ["a", "b", "c"]}), '"endings" is ["a", "b", "c"]'),
    ("hellaswag", "hellaswag_val.jsonl", 5, json.dumps({**_HS, "ctx_b": None}), '"ctx_b" is null, expected a string'),
    ("hellaswag", "hellaswag_val.jsonl", 2, json.dumps({**_HS, "label": "7"}), '"label" is "7", expected 0, 1, 2 or 3'),
    ("hellaswag", "hellaswag_val.jsonl", 3, json.dumps({**_HS, "label": True}), '"label" is true'),
    ("hellaswag", "hellaswag_val.jsonl", 3, '{"ind": 3, "ctx_a": ', "malformed JSON"),
    ("gsm8k", "test.jsonl", 3, json.dumps({"question": "q", "answer": "it is 18"}), '"answer" is "it is 18", expected'),
    ("gsm8k", "test.jsonl", 1, json.dumps({"question": "q", "answer": "#### 18 apples"}), '"answer" is "#### 18 apples"'),
    ("gsm8k", "train.jsonl", 8, json.dumps({"question": "q", "answer": "x\n## 18"}), '"answer" is "x\\n## 18"'),
    ("gsm8k", "test.jsonl", 2, json.dumps({"answer": "x\n#### 1"}), '"question" is missing, expected a string'),
], ids=["piqa-goal-null", "piqa-sol1-number", "piqa-label-2", "piqa-label-bom", "piqa-not-utf8", "piqa-labels-not-utf8",
        "piqa-not-object", "hellaswag-endings-string", "hellaswag-3-endings", "hellaswag-ctx_b-null", "hellaswag-label-7",
        "hellaswag-label-bool", "hellaswag-malformed", "gsm8k-no-final", "gsm8k-final-not-number", "gsm8k-train-no-final",
        "gsm8k-missing-question"])
def test_cli_data_checked_before_the_model_loads(task, file, line, raw, said, tmp_path, monkeypatch):
    # with --no-verify (no checksum can vouch for stand-in files) every record is still checked against
    # its task's schema, before any model loads: one line naming the task, the file, the line and the field
    _write_data(tmp_path)
    path = tmp_path / task / file
    _set_line(path, line, raw)
    monkeypatch.setattr(M, "resolve", lambda *a, **k: pytest.fail("the model was resolved before the data was checked"))
    with pytest.raises(SystemExit) as e:
        R.main(["--task", task, "--model", str(tmp_path / "no-model"), "--data-dir", str(tmp_path), "--no-verify",
                "--offline", "--limit", "2"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {task}: {path} line {line}: {said}") and "\n" not in msg, msg
    assert msg.endswith("; fix or replace the file (--no-verify skips checksums, never structure)"), msg


# ----------------------------------------------------------------------------- limits are the model's

@pytest.mark.parametrize("case", ["loglikelihood", "gsm8k", "generate", "model_cli", "mnist"])
def test_limits_are_the_models(case, tiny_dir, tmp_path, monkeypatch, capsys):
    # a model of P = 320 positions (tiny_dir's weights): loglikelihood requests and GSM8k prompts longer than
    # it are left-truncated exactly as lm-eval's HF backend does, and counted; generation stops at the limit
    # with a KV cache no larger; model.py clamps --max-new-tokens; Textual MNIST prompts that do not fit are
    # refused before anything is scored (left-truncation would cut off their instructions)
    P = 320
    short = _with_positions(tiny_dir, tmp_path / "short", P)
    model, tok = M.load(str(short))
    out = tmp_path / "out.json"
    run = ["--model", str(short), "--data-dir", str(tmp_path), "--no-verify", "--offline", "--output", str(out),
           "--dtype", "float32"]
    if case == "loglikelihood":
        _write_data(tmp_path)
        rows = [{"goal": "How do I " + "the of and to " * (90 if i % 2 == 0 else 1), "sol1": f" a {i} the of ",
                 "sol2": "b" * (i + 1)} for i in range(5)]   # documents 0, 2, 4 longer than the model
        (tmp_path / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        R.main(["--task", "piqa", "--limit", "4", "--batch-size", "3"] + run)
        r = json.loads(out.read_text())
        assert r["truncated"] == 2
        assert "warning: piqa: 2 of 4 contexts longer than the model's 320 positions were left-truncated, " \
               "as lm-eval does" in capsys.readouterr().err
        for d, s in zip(T.mc_docs("piqa", T.load_piqa(T.ensure_files("piqa", tmp_path, download=False, verify=False))),
                        r["samples"], strict=False):
            for c, ll in zip(d["continuations"], s["loglikelihoods"], strict=True):
                ctx, cont = H.encode_pair(tok, d["context"], c)
                whole = (ctx + cont)[-(P + 1):]        # lm-eval: the last P + 1 tokens, the last one not fed
                assert abs(ll - _naive(model, whole[:-len(cont)], cont)[0]) < 1e-4
    elif case == "gsm8k":
        _write_data(tmp_path)
        R.main(["--task", "gsm8k", "--limit", "2", "--batch-size", "2"] + run)
        r = json.loads(out.read_text())
        room = P - T.GSM8K_MAX_NEW    # lm-eval's generate_until: max_length - max_gen_toks
        assert r["truncated"] == 2 and f"warning: gsm8k: 2 of 2 prompts longer than {room} tokens" in capsys.readouterr().err
        train, test = T.load_gsm8k(T.ensure_files("gsm8k", tmp_path, download=False, verify=False))
        for d, shots, s in zip(test[:2], T.gsm8k_fewshot_indices(2, len(train)), r["samples"], strict=True):
            ids = tok.encode(T.gsm8k_prompt(train, d, shots))
            assert len(ids) > room
            g = tok.decode(M.generate_ids(model, [ids[-room:]], T.GSM8K_MAX_NEW, tok.eos_id)[0], skip_special_tokens=True)
            for st in T.GSM8K_UNTIL:
                g = g.split(st)[0]
            assert s["generation"] == g
    elif case == "generate":
        sizes, real = [], M.KVCache
        monkeypatch.setattr(M, "KVCache", lambda cfg, B, n, *a: sizes.append(n) or real(cfg, B, n, *a))
        prompts = [[5 + i % 40 for i in range(n)] for n in (300, 310, 12)]
        got = M.generate_ids(model, prompts, 10 ** 11, eos_id=-1)
        assert [len(g) for g in got] == [P - 300, P - 310, P - 12] and sizes == [P]
        assert M.generate_ids(model, prompts[2:], 5, eos_id=-1) == [got[2][:5]] and sizes[-1] == 12 + 5
        with pytest.raises(ValueError, match="a prompt of 320 tokens leaves no room"):
            M.generate_ids(model, [[5] * P], 1, eos_id=-1)
    elif case == "model_cli":
        M.main(["--model", str(short), "--prompt", "hi", "--max-new-tokens", "100000000000", "--device", "cpu"])
        err = capsys.readouterr().err
        n = len(tok.encode(tok.chat([{"role": "user", "content": "hi"}])))
        assert f"note: --max-new-tokens 100000000000: the prompt's {n} tokens leave room for {P - n} in the " \
               f"model's {P} positions" in err and "Traceback" not in err
        assert int(re.search(r"\[(\d+) tokens", err).group(1)) <= P - n
        with pytest.raises(SystemExit) as e:
            M.main(["--model", str(short), "--prompt", "the of and " * 200, "--device", "cpu"])
        assert str(e.value.code).startswith("error: --prompt: ") and "320 positions" in str(e.value.code)
        with pytest.raises(SystemExit) as e:   # a local folder has no revisions: refused, as by the other commands
            M.main(["--model", str(short), "--prompt", "hi", "--revision", "main", "--device", "cpu"])
        assert str(e.value.code).startswith(f"error: --revision main: the model {short} is a local directory")
    else:
        mnist.write_synthetic_mnist(tmp_path / "mnist", n_train=120, n_test=5)
        monkeypatch.setattr(rigsa, "mnist_accuracy", lambda *a, **k: pytest.fail("scored a prompt beyond the model"))
        for model_dir, positions, then in ((tiny_dir, 2048, "use --num-fewshot 1 or fewer"),
                                           (short, P, "even 0-shot needs")):
            with pytest.raises(SystemExit) as e:
                R.main(["--task", "mnist", "--num-fewshot", "100"] + run[2:] + ["--model", str(model_dir)])
            msg = str(e.value.code)
            assert msg.startswith("error: --num-fewshot 100: a 100-shot Textual MNIST prompt is ") and \
                f"more than the model's {positions} positions; {then}" in msg and "\n" not in msg, msg
        assert not out.exists()


def test_non_finite_scores_give_no_number_and_an_empty_choice_divides_as_numpy(tiny_dir, tmp_path):
    # weights a diverged training left NaN: every log-likelihood is NaN and would win numpy's argmax (an
    # "accuracy" that is the share of label 0), every greedy token is garbage; each task refuses instead
    from safetensors.torch import load_file, save_file
    _write_data(tmp_path)
    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    for task in ("piqa", "gsm8k", "mnist"):
        out = tmp_path / f"{task}.json"
        with pytest.raises(SystemExit, match="not finite"):
            R.main(["--task", task, "--model", str(bad), "--data-dir", str(tmp_path), "--no-verify", "--offline",
                    "--limit", "2", "--dtype", "float32", "--output", str(out)])
        assert not out.exists()
    # lm-eval's acc_norm is np.argmax(lls / completion_len): an empty choice gives -inf (never chosen), not an error
    assert T.mc_scores([-1.0, -2.0], ["", "ab"], 1) == (0, 1)
    assert T.mc_scores([-3.0, -3.0], ["ab", "ab"], 0) == (1, 1)   # ties: the first
