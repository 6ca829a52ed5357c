# evals/: the lm-eval protocol pieces on hand-made cases, the scoring paths against each other and
# against a naive full-logits reference, and one CLI run per task on tiny files written here.
import json
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
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
    assert d["query"] == "Roof shingle removal: A man is sitting on a roof. He"     # protocol §3, ind 24
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
    with pytest.raises(ValueError, match=r"valid.jsonl:2: malformed JSON"):
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


def test_git_blob_hash(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello\n")
    assert T.file_hash(str(p), "gitsha1") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


# ----------------------------------------------------------------------------- GSM8k

def test_gsm8k_fewshot_draw_matches_protocol():
    idx = T.gsm8k_fewshot_indices(1319, 7473)   # protocol §4 table (train length 7473)
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
    # protocol §4 vectors (gold: final answer 18)
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
    # chat mode: the context ends in "assistant\n", which moves into the continuation (protocol §8)
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
    for (a, ga), (b, gb), (c, x) in zip(one, many, reqs):
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
    assert all(abs(a - b) <= 0.05 * abs(b) + 0.5 for a, b in zip(shared, naive))   # bf16 sums are coarse


# ----------------------------------------------------------------------------- end to end

def _write_data(root, n=5):
    os.makedirs(root / "piqa")
    with open(root / "piqa" / "valid.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"goal": f"How do I {i}?", "sol1": f"The answer is {i} ", "sol2": "the of and"}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    os.makedirs(root / "hellaswag")
    with open(root / "hellaswag" / "hellaswag_val.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"ind": i, "activity_label": "Digits", "ctx_a": "The digit is", "ctx_b": "a",
                                "endings": [f"[step] {i}", "x [title] y", "is  is", "the"], "label": i % 4}) + "\n")
    os.makedirs(root / "gsm8k")
    for split, m in (("train", 8), ("test", n)):
        with open(root / "gsm8k" / f"{split}.jsonl", "w") as f:
            for i in range(m):
                f.write(json.dumps({"question": f"What is {i} and {i}?", "answer": f"{i} and {i}\n#### {2 * i}"}) + "\n")
    import rigsa
    rigsa.write_synthetic_mnist(root / "mnist", n_train=20, n_test=n)   # stand-in data: read with --no-verify


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "gsm8k", "mnist", "mnist5"])
def test_cli_end_to_end(task, tiny_dir, tmp_path):
    _write_data(tmp_path)
    out = tmp_path / "out.json"
    shots = ["--num-fewshot", "5"] if task == "mnist5" else []
    task = task[:5] if task == "mnist5" else task
    R.main(["--task", task, "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
            "--limit", "4", "--batch-size", "4" if task == "gsm8k" else "3", "--output", str(out)] + shots)
    r = json.loads(out.read_text())
    assert {"task", "model", "adapter", "dtype", "num_fewshot", "limit", "seconds", "metrics", "samples"} <= set(r)
    assert r["task"] == task and r["dtype"] == "float32" and r["limit"] == 4 and r["adapter"] is None
    assert len(r["samples"]) == 4 and [s["doc_id"] for s in r["samples"]] == [0, 1, 2, 3]
    s = r["samples"][0]
    if task in ("piqa", "hellaswag"):
        k = 2 if task == "piqa" else 4
        assert set(r["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert set(s) == {"doc_id", "target", "loglikelihoods", "is_greedy", "acc", "acc_norm"}
        assert len(s["loglikelihoods"]) == len(s["is_greedy"]) == k and r["num_fewshot"] == 0
        assert r["metrics"]["acc"] == sum(x["acc"] for x in r["samples"]) / 4
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
    else:
        import rigsa
        assert set(r["metrics"]) == {"acc", "acc_stderr"} and r["num_fewshot"] == (5 if shots else 0)
        assert set(s) == {"doc_id", "target", "prediction", "acc"}
        x, y = rigsa.load_mnist(tmp_path / "mnist", "test", verify=False)
        assert [t["target"] for t in r["samples"]] == y[:4].tolist()
        assert all(t["acc"] == int(t["prediction"] == t["target"]) for t in r["samples"])


def test_cli_all_and_bad_flags(tiny_dir, tmp_path, capsys):
    _write_data(tmp_path)
    out = tmp_path / "all.json"
    R.main(["--task", "all", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify", "--offline",
            "--limit", "2", "--output", str(out)])
    r = json.loads(out.read_text())
    assert sorted(r) == ["gsm8k", "hellaswag", "mnist", "piqa"] and all(len(v["samples"]) == 2 for v in r.values())
    for bad, msg in ((["--batch-size", "0"], "--batch-size"), (["--limit", "0"], "--limit")):
        with pytest.raises(SystemExit) as e:    # usage errors: exit 2, the message on stderr
            R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify",
                    "--offline"] + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: --num-fewshot 3: piqa is 0-shot"):
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-verify",
                "--offline", "--num-fewshot", "3"])
    with pytest.raises(SystemExit, match="missing data files"):
        R.main(["--task", "piqa", "--model", str(tiny_dir), "--data-dir", str(tmp_path / "none"), "--offline"])


def test_cli_adapter_in_memory(tiny_dir, tmp_path):
    # a saved adapter changes the scores, equals the in-memory adapted model, and the checkpoint is untouched
    import rigsa
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
                "--limit", "2", "--output", str(out)] + extra)
        runs[name] = json.loads(out.read_text())
    assert runs["adapted"]["adapter"] == str(tmp_path / "iter1")
    d = T.mc_docs("piqa", T.load_piqa(T.ensure_files("piqa", str(tmp_path), download=False, verify=False))[:1])[0]
    want = [_naive(model, *H.encode_pair(tok, d["context"], c))[0] for c in d["continuations"]]
    got, base = runs["adapted"]["samples"][0]["loglikelihoods"], runs["base"]["samples"][0]["loglikelihoods"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, want)) and all(abs(a - b) > 1e-3 for a, b in zip(got, base))
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
    train_text_model.main(["--data-dir", str(tmp_path), "--out", str(out), "--no-verify", "--steps", "40",
                           "--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64",
                           "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1",
                           "--batch-size", "4", "--seq-len", "64", "--warmup", "2", "--lr", "1e-2"])
    run = json.loads((out / "train_config.json").read_text())
    assert run["final_loss"] < run["first_loss"] - 2.0, run
    model, tok = M.load(str(out))
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 1
    assert tok.decode(tok.encode("Question: 12")) == "Question: 12"
