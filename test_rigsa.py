"""Tests for rigsa: CPU only, no network, tiny checkpoints written by the tests (conftest.py).
Correctness is parity with transformers (a test-only reference) plus invariants."""
import json
import shutil

import pytest
import torch

import model as M

# ---- model.py: parity with transformers, cache and padding invariants, loader errors ----

def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
    ref.chat_template = M.CHAT_TEMPLATE
    for add in (True, False):
        assert tok.chat(msgs, add) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)


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
])
def test_loader_errors_name_the_thing(tiny_dir, tmp_path, edit, msg):
    d = broken_copy(tiny_dir, tmp_path / "ckpt", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        M.load(d)


def test_hub_unreachable_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match="no-such-org/no-such-model: cannot download"):
        M.load("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        M.load(str(tmp_path / "missing"))


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
