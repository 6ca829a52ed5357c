"""Tests for model.py: parity with transformers (a test-only reference), cache and padding
invariants, loader errors. CPU only, no network, tiny checkpoints written by the tests (conftest.py)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import model as M
from lib import tiny
from conftest import hf_model


def left_pad(rows, pad_id):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, am


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_mha_dir"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ref = hf_model(path)
    m, tok = M.load(path)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rows = [tok.encode("The digit is 7. Question: How do I"), tok.encode("Answer: 12 34")]
    ids, am = left_pad(rows, tok.pad_id)
    with torch.no_grad():
        ours = m(ids, am)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
        single = ref(input_ids=torch.tensor([rows[0]])).logits
    real = am.bool()
    assert (ours - theirs)[real].abs().max() <= 1e-4
    assert (m(torch.tensor([rows[0]])) - single).abs().max() <= 1e-4


def test_bf16_logits_match_transformers_bitwise(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    m, tok = M.load(tiny_dir, dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("Below is a digit as text. Which digit is it? 0123")])
    with torch.no_grad():
        assert torch.equal(m(ids), ref(input_ids=ids).logits)


def test_padded_row_equals_row_alone(tiny_dir):
    m, tok = M.load(tiny_dir)
    a, b = tok.encode("the of and to 5"), tok.encode("Question: How do I 1 2 3 4 5 6 7")
    ids, am = left_pad([a, b], tok.pad_id)
    with torch.no_grad():
        batch = m(ids, am)
        alone = m(torch.tensor([a]))
    assert (batch[0, -len(a):] - alone[0]).abs().max() < 1e-5
    # right padding too: positions are per row
    ids_r = torch.tensor([a + [tok.pad_id] * (len(b) - len(a)), b])
    am_r = torch.tensor([[1] * len(a) + [0] * (len(b) - len(a)), [1] * len(b)])
    with torch.no_grad():
        assert (m(ids_r, am_r)[0, :len(a)] - alone[0]).abs().max() < 1e-5


def test_a_left_padded_batch_is_exact_where_a_query_seeing_no_key_gives_nan(tiny_dir, monkeypatch):
    # this CPU's kernel gives 0 for a query row masked whole; others give NaN, which a pad position's value would
    # carry into every real token through 0 * NaN in the next layer: so a pad query always sees itself
    sdpa = M.F.scaled_dot_product_attention

    def nan_kernel(q, k, v, attn_mask=None, **kw):
        y = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            y = y.masked_fill(~attn_mask.any(-1, keepdim=True), float("nan"))
        return y
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", nan_kernel)
    m, tok = M.load(tiny_dir)
    a, b = tok.encode("the of and to 5"), tok.encode("Question: How do I 1 2 3 4 5 6 7")
    with torch.no_grad():
        batch = m(*left_pad([a, b], tok.pad_id))
        alone = m(torch.tensor([a]))
    assert (batch[0, -len(a):] - alone[0]).abs().max() < 1e-5


def test_cached_greedy_equals_full_forward(tiny_dir):
    m, tok = M.load(tiny_dir)
    prompts = [tok.encode("The digit is"), tok.encode("Question: How do I 3 4")]
    cached = M.generate_ids(m, prompts, 12, eos_id=-1)
    for p, got in zip(prompts, cached):
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        assert got == ids[len(p):]


def test_packed_rows_equal_rows_alone(tiny_dir):
    # a | b c1 | c2 in one row: sequence a, then b followed by two alternative continuations that
    # both start at position len(b) and do not see each other. A (B, T, T) mask and explicit
    # positions make each part equal to its own row alone (harness.score_shared's layout)
    m, tok = M.load(tiny_dir)
    a, b = tok.encode("the of and to 5"), tok.encode("Question: How do I 1 2")
    c1, c2 = tok.encode(" 7 8 9"), tok.encode(" the digit")
    n, k = len(a), len(b)
    ids = torch.tensor([a + b + c1 + c2])
    pos = torch.tensor([list(range(n)) + list(range(k)) + list(range(k, k + len(c1))) + list(range(k, k + len(c2)))])
    seg = torch.tensor([0] * n + [1] * (k + len(c1) + len(c2)))
    br = torch.tensor([0] * (n + k) + [1] * len(c1) + [2] * len(c2))
    ar = torch.arange(len(seg))
    mask = (seg[:, None] == seg[None]) & (ar[:, None] >= ar[None]) & ((br[None] == 0) | (br[:, None] == br[None]))
    with torch.no_grad():
        out = m(ids, mask[None], position_ids=pos)[0]
        assert (out[:n] - m(torch.tensor([a]))[0]).abs().max() < 1e-5
        assert (out[n:n + k + len(c1)] - m(torch.tensor([b + c1]))[0]).abs().max() < 1e-5
        assert (out[n + k + len(c1):] - m(torch.tensor([b + c2]))[0, k:]).abs().max() < 1e-5
        with pytest.raises(ValueError, match="position_ids"):
            m(ids, mask[None])


def test_ragged_cache_decode_equals_rows_alone(tiny_dir, tiny_mha_dir, monkeypatch):
    # prompts of five lengths decode side by side, each at its own next slot, in groups of 2 rows
    # that each read only their own longest row's slots; every row equals its greedy run alone,
    # and its cached logits equal a full forward pass (GQA like 135M/360M, MHA like 1.7B)
    monkeypatch.setattr(M, "DECODE_GROUP", 2)
    for d in (tiny_dir, tiny_mha_dir):
        m, tok = M.load(d)
        prompts = [tok.encode(s) for s in ["Question: How do I 1 2 3 4 5 6", "The digit is", "Answer: 7",
                                           "the of and to in is that for it", "5"]]
        got = M.generate_ids(m, prompts, 6, eos_id=-1)
        assert got == [M.generate_ids(m, [p], 6, eos_id=-1)[0] for p in prompts]
        cache = M.KVCache(m.config, len(prompts), 40, "cpu", torch.float32)
        with torch.no_grad():
            for i, p in enumerate(prompts):
                m(torch.tensor([p]), cache=cache.row(i))
            step = m(torch.tensor([[g[0]] for g in got]), cache=cache)[:, 0]           # (B, V)
            for p, g, row in zip(prompts, got, step):
                assert (row - m(torch.tensor([p + g[:1]]))[0, -1]).abs().max() < 1e-5
        assert cache.len.tolist() == [len(p) + 1 for p in prompts]
        with pytest.raises(ValueError, match="empty rows"):   # a second multi-token input
            m(torch.tensor([[5, 6]] * len(prompts)), cache=cache)
    cache = M.KVCache(m.config, 2, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="padding"):
        m(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 1]]), cache=cache)


def test_rows_that_stop_leave_the_batch_without_disturbing_the_rest(tiny_dir, monkeypatch):
    # rows stop at different steps (a stop function, or the end token) and leave the batch: a
    # block's last live row moves into each place that opens before it (KVCache.drop). Every row
    # still equals its greedy run alone, cut where it stopped
    monkeypatch.setattr(M, "DECODE_GROUP", 3)
    m, tok = M.load(tiny_dir)
    prompts = [tok.encode(s) for s in ["Question: How do I 1 2 3 4 5 6", "The digit is", "Answer: 7",
                                       "the of and to in is that for it", "5", "Question: 9 8", "The"]]
    alone = [M.generate_ids(m, [p], 7, eos_id=-1)[0] for p in prompts]
    stop_after = [2, 7, 1, 5, 3, 7, 4]
    got = M.generate_ids(m, prompts, 7, eos_id=-1, stop_fn=lambda i, new: len(new) >= stop_after[i])
    assert got == [a[:k] for a, k in zip(alone, stop_after)]
    eos = alone[0][3]   # a token some row emits: rows stop before its first occurrence
    got = M.generate_ids(m, prompts, 7, eos_id=eos)
    assert got == [a[:a.index(eos)] if eos in a else a for a in alone]
    # the move itself: blocks [0, 3) and [3, 5); rows 0 and 4 leave, row 2 takes row 0's place
    cache = M.KVCache(m.config, 5, 8, "cpu", torch.float32)
    for r in range(5):
        cache.len[r] = r + 1
        for buf in cache.k + cache.v:
            buf[r, :, :r + 1] = r
    assert cache.drop([0, 4]) == {2: 0}
    assert cache.live() == [0, 1, 3] and cache.blocks == [[0, 2], [3, 1]]
    assert cache.len[0] == 3 and all(bool((buf[0, :, :3] == 2).all()) for buf in cache.k + cache.v)
    with pytest.raises(ValueError, match="live rows"):
        m(torch.tensor([[5]] * 5), cache=cache)


def test_generate_stops_each_row_independently(tiny_dir):
    m, tok = M.load(tiny_dir)
    prompts = ["The digit is", "Answer: The answer is 42 and"]
    free = M.generate(m, tok, prompts, 16, progress_bar=False)
    stop = free[0][3:6]  # a stop string that occurs in row 0's continuation
    assert stop and stop in free[0]
    got = M.generate(m, tok, prompts, 16, stop=[stop], batch_size=2, progress_bar=False)
    assert got[0] == free[0].split(stop)[0]
    assert got[1] == free[1].split(stop)[0]
    assert got == [M.generate(m, tok, [p], 16, stop=[stop], progress_bar=False)[0] for p in prompts]


def test_tokenizer_matches_file_pipeline(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    tok = M.load_tokenizer(tiny_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    for s in ["a\n\n5", "0  1", "The digit is 7", "<|im_start|>user\nHi<|im_end|>\n", "12345 héllo  wörld"]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    # digits are single tokens, also after several whitespace characters
    assert len(tok.encode("0123456789")) == 10
    assert tok.encode("a  5")[-1] == tok.encode("5")[0]


def test_chat_renders_smollm2_template(tiny_dir):
    tok = M.load_tokenizer(tiny_dir)
    sys_ = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tok.chat([{"role": "user", "content": "Hello"}]) == \
        sys_ + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"}]) == \
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    ref.chat_template = tiny.CHAT_TEMPLATE
    for add in (True, False):
        assert tok.chat(msgs, add) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)


# SmolLM2's template in both spellings, one with another system prompt, one that injects none
ESCAPED = tiny.CHAT_TEMPLATE                       # \n escapes inside the Jinja strings
REAL_NEWLINES = tiny.CHAT_TEMPLATE.replace("\\n", "\n")  # what the official tokenizer_config.json decodes to
OTHER_SYSTEM = REAL_NEWLINES.replace(M.DEFAULT_SYSTEM, "You are terse.\nAnswer in one word.")
NO_SYSTEM = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
             "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
INDENTED = ("{% for message in messages %}\n"   # a hub template's layout: blocks on lines of their own, indented
            "    {% if loop.first and messages[0]['role'] != 'system' %}\n"
            "{{ '<|im_start|>system\nYou are terse.<|im_end|>\n' -}}\n"
            "    {% endif %}\n"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}\n"
            "{{ '<|im_start|>assistant\n' -}}\n"
            "{% endif %}")
CONVERSATIONS = [[{"role": "user", "content": "Hello"}],
                 [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"}],
                 [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c\nd"}]]


def tokenizer_dir(tiny_dir, path, template=None, jinja_file=None):
    """tiny_dir's tokenizer with `template` in tokenizer_config.json (None: no chat_template), and
    optionally a chat_template.jinja file."""
    path.mkdir()
    shutil.copy(tiny_dir / "tokenizer.json", path)
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, **({"chat_template": template} if template else {})}))
    if jinja_file:
        (path / "chat_template.jinja").write_text(jinja_file)
    return path


@pytest.mark.parametrize("template,system", [(ESCAPED, M.DEFAULT_SYSTEM), (REAL_NEWLINES, M.DEFAULT_SYSTEM),
                                             (OTHER_SYSTEM, "You are terse.\nAnswer in one word."), (NO_SYSTEM, None),
                                             (INDENTED, "You are terse.")])   # its indentation stripped, as transformers does
def test_chat_equals_the_rendered_template(tiny_dir, tmp_path, capsys, template, system):
    assert ("\n" in template) != ("\\n" in template)  # one spelling or the other
    tok = M.load_tokenizer(tokenizer_dir(tiny_dir, tmp_path / "tok", template))
    assert tok.system_prompt == system and capsys.readouterr().err == ""
    cases = [(msgs, add) for msgs in CONVERSATIONS for add in (True, False)]
    rendered = [M.render_chat_template(template, m, add, bos_token="<|im_start|>", eos_token="<|im_end|>") for m, add in cases]
    assert [tok.chat(m, add) for m, add in cases] == rendered
    transformers = pytest.importorskip("transformers")  # and our rendering is transformers'
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    ref.chat_template = template
    assert [ref.apply_chat_template(m, tokenize=False, add_generation_prompt=add) for m, add in cases] == rendered


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['content'] }",                            # not Jinja
    "{{ raise_exception('this template needs tools') }}",                  # raises
    "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",  # not ChatML
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",                # the sandbox refuses
])
def test_a_template_not_understood_warns_once_and_falls_back(tiny_dir, tmp_path, capsys, template):
    tok = M.load_tokenizer(tokenizer_dir(tiny_dir, tmp_path / "tok", template))
    assert tok.system_prompt == M.DEFAULT_SYSTEM and tok.template_unread
    M.load_tokenizer(tmp_path / "tok")   # the commands read it before the load, then in it: said once
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path / 'tok' / 'tokenizer_config.json'}: chat_template")


def test_template_sources(tiny_dir, tmp_path, capsys):
    # no template: SmolLM2's default, silently; chat_template.jinja wins over tokenizer_config.json, as in transformers
    assert M.load_tokenizer(tokenizer_dir(tiny_dir, tmp_path / "none")).system_prompt == M.DEFAULT_SYSTEM
    tok = M.load_tokenizer(tokenizer_dir(tiny_dir, tmp_path / "jinja", ESCAPED, jinja_file=OTHER_SYSTEM))
    assert tok.system_prompt == "You are terse.\nAnswer in one word." and capsys.readouterr().err == ""
    # a list of named templates (tool use beside the default, as some hub models have): the one named "default"
    named = [{"name": "tool_use", "template": NO_SYSTEM}, {"name": "default", "template": OTHER_SYSTEM}]
    tok = M.load_tokenizer(tokenizer_dir(tiny_dir, tmp_path / "named", named))
    assert tok.system_prompt == "You are terse.\nAnswer in one word." and tok.chat_template == OTHER_SYSTEM
    assert capsys.readouterr().err == ""


def test_json_files_are_read_as_utf8_whatever_the_locale(tiny_dir, tmp_path):
    # a hub model's JSON read in the locale's encoding: under an ASCII locale (PYTHONUTF8=0, LC_ALL=C) a valid
    # UTF-8 tokenizer_config.json was refused as "not valid JSON"; under Latin-1 its template would read garbled
    system = "Tu es SmolLM — réponds en français."
    template = OTHER_SYSTEM.replace("You are terse.\nAnswer in one word.", system)
    d = tokenizer_dir(tiny_dir, tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_bytes())
    (d / "tokenizer_config.json").write_bytes(json.dumps({**cfg, "chat_template": template}, ensure_ascii=False).encode())
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(M.__file__)!r}); import locale, model; "
                        f"print(locale.getpreferredencoding(False)); print(model.load_tokenizer({str(d)!r}).system_prompt)"],
                       capture_output=True, text=True, encoding="utf-8", env=env)
    assert r.returncode == 0 and r.stdout.split("\n", 1)[1] == system + "\n", r.stdout + r.stderr
    assert r.stdout.split("\n")[0] in ("ANSI_X3.4-1968", "ascii", "US-ASCII"), r.stdout   # the premise


def test_the_pad_token_is_the_tokenizer_configs(tiny_dir, tmp_path):
    # evaluations record the pad token: a model whose pad is not its eos must be described as it is (pad = eos only
    # when tokenizer_config.json names none)
    d = tokenizer_dir(tiny_dir, tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for pad in ("<|endoftext|>", {"content": "<|endoftext|>", "special": True}, None):
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": pad}))
        tok = M.load_tokenizer(d)
        assert tok.pad_id == (tok.tok.token_to_id("<|endoftext|>") if pad else tok.eos_id), pad
    assert tok.tok.token_to_id("<|endoftext|>") != tok.eos_id   # the premise: another token than eos


def test_config_rope_theta_locations(tiny_dir, tmp_path):
    d = json.loads((tiny_dir / "config.json").read_text())
    theta = d.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps({**d, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}))
    assert M.SmolLM2Config.from_json(tmp_path / "config.json").rope_theta == theta
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_theta"):
        M.SmolLM2Config.from_json(tmp_path / "config.json")


def test_presets_count_parameters():
    with torch.device("meta"):
        n = {k: sum(p.numel() for p in M.Model(c).parameters()) for k, c in M.PRESETS.items()}
    assert n == {"SmolLM2-135M-Instruct": 134_515_008, "SmolLM2-360M-Instruct": 361_821_120,
                 "SmolLM2-1.7B-Instruct": 1_711_376_384}
    # and the numbers no count sees, as the official config.json files hold them (tiny checkpoints carry their own)
    keys = ("rope_theta", "rms_norm_eps", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings")
    assert {k: tuple(getattr(c, f) for f in keys) for k, c in M.PRESETS.items()} == {
        "SmolLM2-135M-Instruct": (100000.0, 1e-5, 3, True, 8192), "SmolLM2-360M-Instruct": (100000.0, 1e-5, 5, True, 8192),
        "SmolLM2-1.7B-Instruct": (130000.0, 1e-5, 32, True, 8192)}


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_tensors(fn):
    def edit(d):
        from safetensors.torch import load_file, save_file
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, str(d / "model.safetensors"))
    return edit


def _edit_config(key, value):   # value None: the key removed, or written as null for a number
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        if value is None and key == "tie_word_embeddings":
            c.pop(key)
        else:
            c[key] = value
        (d / "config.json").write_text(json.dumps(c))
    return edit


@pytest.mark.parametrize("edit,msg", [
    (_edit_tensors(lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")), "'model.layers.1.mlp.up_proj.weight' missing"),
    (_edit_tensors(lambda sd: sd.update(extra=torch.zeros(2))), "unexpected tensor 'extra'"),
    (_edit_tensors(lambda sd: sd.update({"model.norm.weight": torch.ones(3)})), r"model.safetensors: tensor 'model.norm.weight' has shape \(3,\)"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "model.safetensors: corrupt or truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: checkpoint file not found"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})),
     "not a Llama architecture"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: tokenizer file not found"),
    (lambda d: (d / "tokenizer_config.json").write_text("{"), "tokenizer_config.json: not valid JSON"),
    # what a crash can leave: zeros (json.loads of the bytes took them for UTF-32, the codec's words, no file named)
    (lambda d: (d / "config.json").write_bytes(bytes(4097)), "config.json: not valid JSON"),
    (lambda d: (d / "tokenizer_config.json").write_bytes(bytes(4097)), "tokenizer_config.json: not valid JSON"),
    # a changed byte in the header is safetensors' to find (one in the tensor data is not: test_hub.py, --verify-model)
    (lambda d: (d / "model.safetensors").write_bytes(_flip((d / "model.safetensors").read_bytes(), 10)),
     "model.safetensors: corrupt or truncated safetensors file .*; replace it with a good copy"),
    # numbers that are not numbers: one line naming the field, not a TypeError (nor 64.7 read as 64)
    *[(_edit_config(k, v), rf"config.json: field '{k}' is {re.escape(json.dumps(v))}, expected a positive {w}")
      for k, v, w in (("rms_norm_eps", None, "number"), ("max_position_embeddings", None, "whole number"),
                      ("num_attention_heads", None, "whole number"), ("rope_theta", "abc", "number"),
                      ("hidden_size", 64.7, "whole number"), ("vocab_size", "512", "whole number"),
                      ("head_dim", [16], "whole number"), ("intermediate_size", True, "whole number"),
                      ("num_attention_heads", 0, "whole number"), ("vocab_size", -3, "whole number"),
                      ("rms_norm_eps", float("nan"), "number"), ("max_position_embeddings", 0, "whole number"))],
    (_edit_config("tie_word_embeddings", "false"), "field 'tie_word_embeddings' is \"false\", expected true or false"),
    # the head: absent key = untied (transformers' reading), so the file must hold one; a tied config with a head of its own
    (_edit_config("tie_word_embeddings", None), r"tensor 'lm_head.weight' missing from the checkpoint \(config.json's "
                                                 r"tie_word_embeddings is false, or absent"),
    (_edit_tensors(lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"] + 1})),
     "config.json ties lm_head to the embeddings .* hold an lm_head.weight of their own"),
    (_edit_tensors(lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int8)})),
     "model.safetensors: tensor 'model.norm.weight' is int8, not a floating-point weight"),
    (lambda d: (d / "tokenizer_config.json").write_text("[1, 2]"), "tokenizer_config.json: a JSON list, not a tokenizer's"),
    (lambda d: (d / "chat_template.jinja").write_bytes(b"{{ \xff }}"), "chat_template.jinja: not UTF-8 text"),
    (lambda d: [(d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}})),
                (d / "model.safetensors").rename(d / "one.safetensors")], "model.safetensors.index.json: not a safetensors index"),
])
def test_loader_errors_name_the_thing(tiny_dir, tmp_path, edit, msg):
    d = broken_copy(tiny_dir, tmp_path / "ckpt", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        M.load(d)


def _flip(data, i):
    data = bytearray(data)
    data[i] ^= 0x20
    return bytes(data)


def test_hub_unreachable_is_one_clear_error(monkeypatch, tmp_path):
    # offline (conftest.py) with an empty cache; the hub's own answers are in test_hub.py
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match=r"^no-such-org/no-such-model: offline \(HF_HUB_OFFLINE=1\) and revision "
                                           r"main is not in the cache .*; unset HF_HUB_OFFLINE .* local directory"):
        M.load("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        M.load(str(tmp_path / "missing"))


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    for model, msg in [(tmp_path / "missing", "no such model directory"),
                       (broken_copy(tiny_dir, tmp_path / "bad", lambda d: (d / "model.safetensors").write_bytes(b"x")),
                        "model.safetensors: corrupt or truncated safetensors file")]:
        with pytest.raises(SystemExit) as e:
            M.main(["--model", str(model), "--prompt", "hi"])
        assert e.value.code.startswith(f"error: {model}") and msg in e.value.code and "\n" not in e.value.code
        assert capsys.readouterr().err == ""   # the one line alone: no dtype line for a model it cannot load
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit 2
        M.main(["--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "0"])
    assert e.value.code == 2 and "--max-new-tokens: 0 is out of range: expected an integer >= 1" in capsys.readouterr().err


def test_sharded_checkpoint_loads_like_single(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = broken_copy(tiny_dir, tmp_path / "sharded", lambda d: None)
    sd = load_file(d / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for f, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / f))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    a, tok = M.load(tiny_dir)
    b, _ = M.load(d)
    ids = torch.tensor([tok.encode("Question: 12")])
    assert torch.equal(a(ids), b(ids))


def test_an_older_checkpoints_rotary_buffers_are_dropped(tiny_dir, tmp_path):
    # transformers once saved each layer's rotary_emb.inv_freq: a buffer computed from the config, not a weight;
    # such a checkpoint loads, with the frequencies computed (not refused as an unexpected tensor, nor read)
    cfg = M.SmolLM2Config.from_json(tiny_dir / "config.json")
    d = broken_copy(tiny_dir, tmp_path / "old", _edit_tensors(lambda sd: sd.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(cfg.head_dim // 2)
         for i in range(cfg.num_hidden_layers)})))
    a, tok = M.load(tiny_dir)
    b, _ = M.load(d)
    ids = torch.tensor([tok.encode("Question: 12")])
    assert torch.equal(a(ids), b(ids))


def test_both_layouts_in_one_folder_read_the_single_file_as_transformers_does(tiny_dir, tmp_path, capsys):
    # a re-save that left the shards beside model.safetensors: transformers reads model.safetensors, so does load, and says so
    from safetensors.torch import load_file, save_file
    d = broken_copy(tiny_dir, tmp_path / "both", lambda d: None)
    sd = load_file(d / "model.safetensors")
    save_file({k: v * 2 for k, v in sd.items()}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors"
                                                                               for k in sd}}))
    a, tok = M.load(tiny_dir)
    capsys.readouterr()
    b, _ = M.load(d)
    ids = torch.tensor([tok.encode("Question: 12")])
    assert torch.equal(a(ids), b(ids))
    assert capsys.readouterr().err.startswith(f"note: {d} holds both model.safetensors and the shards")
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    torch.testing.assert_close(ref(ids).logits, b(ids), rtol=1e-4, atol=1e-4)


def test_an_untied_head_is_read_as_transformers_reads_it(tiny_dir, tmp_path):
    # config.json without tie_word_embeddings (transformers: false) and a head of its own: that head, not the embeddings
    from safetensors.torch import load_file, save_file
    d = broken_copy(tiny_dir, tmp_path / "untied", _edit_config("tie_word_embeddings", None))
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "lm_head.weight": torch.randn_like(sd["model.embed_tokens.weight"]) * 0.05}, str(d / "model.safetensors"))
    m, tok = M.load(d)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    ids = torch.tensor([tok.encode("Question: 12")])
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    torch.testing.assert_close(ref(ids).logits, m(ids), rtol=1e-4, atol=1e-4)
    # the same head as the embeddings under a tied config: dropped, as before (torch .bin files always hold both)
    t = broken_copy(tiny_dir, tmp_path / "tied", _edit_tensors(lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()})))
    assert torch.equal(M.load(t)[0](ids), M.load(tiny_dir)[0](ids))


def test_no_sequence_runs_past_the_models_positions(tiny_dir):
    # RoPE would go on past max_position_embeddings without a word; a KV cache checks its own slots. Packed rows
    # (evals' shared contexts, several documents a row) restart their positions: theirs count, not the row's length
    m, tok = M.load(tiny_dir)
    P = m.config.max_position_embeddings
    m(torch.zeros(1, P, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"a sequence of {P + 1} tokens, more than the model's {P} positions"):
        m(torch.zeros(1, P + 1, dtype=torch.long))
    two = torch.cat([torch.arange(P), torch.arange(8)])[None]           # two segments in one row of P + 8 tokens
    mask = (two[0, :, None] >= two[0, None, :]) & (torch.arange(P + 8)[:, None] // P == torch.arange(P + 8)[None] // P)
    m(torch.zeros(1, P + 8, dtype=torch.long), attention_mask=mask[None], position_ids=two)
    with pytest.raises(ValueError, match=rf"a sequence of {P + 1} tokens"):
        m(torch.zeros(1, P + 8, dtype=torch.long), attention_mask=mask[None], position_ids=two + 1)


def test_the_base_fingerprint_covers_every_file_the_loaders_read(tmp_path, monkeypatch):
    # adapters and runs are checked against it: a file that changes the numbers (chat_template.jinja sets the
    # system prompt of every chat prompt) must change it; a base without a newly covered file keeps its old value
    import hashlib
    import io
    d = tiny.write_tiny_checkpoint(tmp_path / "m", seed=0)
    h = hashlib.sha256()   # the formula before chat_template.jinja was covered (recorded in earlier runs' files)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        h.update(name.encode() + b"\n" + (d / name).read_bytes())
    w = d / "model.safetensors"
    h.update(f"{w.name}:{w.stat().st_size}\n".encode())
    with open(w, "rb") as f:
        for i in range(16):
            f.seek(max(0, w.stat().st_size - (1 << 16)) * i // 15)
            h.update(f.read(1 << 16))
    before = M.base_identity(d)["fingerprint"]
    assert before == h.hexdigest()[:16]
    read, real = [], io.open
    monkeypatch.setattr(io, "open", lambda f, *a, **k: read.append(os.path.abspath(f)) or real(f, *a, **k))
    shutil.copytree(d, tmp_path / "j")
    (tmp_path / "j" / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if messages[0]['role'] != 'system' %}{% endif %}")
    M.load_tokenizer(tmp_path / "j")
    M.load(tmp_path / "j")
    monkeypatch.undo()
    read = {os.path.basename(n) for n in read if os.path.dirname(n) == str(tmp_path / "j")}
    assert "chat_template.jinja" in read and {n for n in read if not n.endswith(".safetensors")} <= set(M.READ_FILES)
    assert set(M.READ_FILES) <= set(M.HUB_FILES)   # each file read is also downloaded from the hub
    for name in M.READ_FILES:   # each one, added or changed, is another base
        c = tmp_path / name
        shutil.copytree(d, c)
        (c / name).write_bytes(((c / name).read_bytes() if (c / name).exists() else b"") + b" ")
        assert M.base_identity(c)["fingerprint"] != before, name


@pytest.mark.parametrize("system,want", [("", "<|im_start|>system\n<|im_end|>\n"), (None, f"<|im_start|>system\n{M.DEFAULT_SYSTEM}")])
def test_chat_sends_the_system_prompt_asked_for(tiny_dir, monkeypatch, system, want):
    # --system "" is an empty system message (as transformers renders it), not the model's default
    seen = []

    tok = M.load_tokenizer(tiny_dir)

    def fake(model, prompts, new, eos_id, stop_fn):
        seen.append(tok.decode(prompts[0]))
        return [[]]
    monkeypatch.setattr(M, "generate_ids", fake)
    M.main(["--model", str(tiny_dir), "--prompt", "hi", "--device", "cpu"] + (["--system", system] if system is not None else []))
    assert seen[0].startswith(want), seen


def test_chat_prints_what_generate_gives_with_a_bar_over_its_tokens(tiny_dir, capsys, monkeypatch):
    # model.py's one reply: generate()'s text, and a bar over the tokens while it comes (a minute at 1.7B on a CPU)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    M.main(["--model", str(tiny_dir), "--prompt", "hi", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    model, tok = M.load(tiny_dir, "cpu", torch.float32)
    stats = {}
    monkeypatch.setattr(time, "time", lambda: 1.8e9)   # the wall clock frozen: the rate is perf_counter's
    want = M.generate(model, tok, [tok.chat([{"role": "user", "content": "hi"}])], 12, stop=["<|im_end|>"],
                      progress_bar=False, stats=stats)[0]
    assert out == want + "\n" and stats["new_tokens"] > 0 and 0 < stats["seconds"] < 600 and stats["tokens_per_s"] > 0
    assert "generate: 100%" in err and f"{stats['new_tokens']}/{stats['new_tokens']}" in err and "tok" in err, err
    assert err.splitlines()[-1].startswith(f"[{stats['new_tokens']} tokens, ") and err.endswith(" tokens/s]\n"), err


def test_tiny_checkpoints_are_seeded_with_unit_norms_and_head_dim_as_smollm2_writes_it(tmp_path):
    cfg = M.SmolLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    a = tiny.random_state_dict(cfg, seed=3)
    torch.rand(3)
    b, c = tiny.random_state_dict(cfg, seed=3), tiny.random_state_dict(cfg, seed=4)
    assert all(a[k].equal(b[k]) for k in a) and not a["model.embed_tokens.weight"].equal(c["model.embed_tokens.weight"])
    assert all(v.eq(1).all() for k, v in a.items() if k.endswith("norm.weight"))
    for shape, has in (("gqa", True), ("mha", False)):   # 135M/360M write head_dim; 1.7B does not
        d = tiny.write_tiny_checkpoint(tmp_path / shape, shape=shape)
        assert ("head_dim" in json.loads((d / "config.json").read_text())) == has
