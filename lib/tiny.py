"""
tiny.py: stand-ins that need no download, for the offline demo (rigsa.py demo), the tests and the
benches: a byte-level BPE tokenizer with SmolLM2's structure, and random SmolLM2-shaped
checkpoints in the official layout (written by model.save_checkpoint, read by model.load and by
transformers alike).
"""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import model as M

TINY_SHAPES = {
    # GQA like 135M/360M (head_dim written in the config), MHA like 1.7B (head_dim absent)
    "gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mha": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    # wide enough that torch's CPU math splits its sums between threads (the thread count shows in the last bits)
    "wide": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
}
# SmolLM2-Instruct's ChatML template, its newlines as '\n' escapes inside the template's string literals
# (model.load_tokenizer renders this spelling and the official file's real newlines; test_model tests both)
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\n" + M.DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY_CORPUS = ["Below is a digit as text. Which digit is it?", "The digit is", "Question: How do I",
               "Answer: The answer is", "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
               "system user assistant", "the of and to in is that for it with as on was"]


def write_tokenizer(path, vocab_size=512, texts=None, chat_template=CHAT_TEMPLATE):
    """A byte-level BPE with SmolLM2's structure: digits split one per token, ChatML specials at
    0, 1, 2; trained on `texts` (default: a few lines of the prompts). -> its vocabulary size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or TINY_CORPUS * 4, trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer", "chat_template": chat_template,
        "model_max_length": 8192}, indent=2))
    return tok.get_vocab_size()


def random_state_dict(cfg, seed=0, std=0.02, norm_jitter=0.0, device="cpu"):
    """Random weights for a config: N(0, std) matrices, norms 1 + jitter, drawn on `device` (a GPU
    draws the 1.7B shape in a second where the CPU takes a minute; its numbers are not the CPU's)."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = M.Model(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1.0 + norm_jitter * torch.randn_like(p) if n.endswith("norm.weight") else std * torch.randn_like(p))
    return m.state_dict()


def write_random_checkpoint(path, cfg, seed=0, std=0.02, norm_jitter=0.0, head_dim_in_config=True, device="cpu"):
    """Random weights for cfg in the official layout (bfloat16, as SmolLM2's own files)."""
    path = Path(path)
    sd = {k: v.cpu() for k, v in random_state_dict(cfg, seed, std, norm_jitter, device).items()}
    M.save_checkpoint(path, M.hf_config(cfg, head_dim_in_config), sd)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}))
    return path


def write_tiny_checkpoint(path, shape="gqa", seed=0, num_hidden_layers=None):
    """A random tiny SmolLM2-shaped model with a SmolLM2-structured tokenizer, in the official layout."""
    V = write_tokenizer(path)
    kw = dict(TINY_SHAPES[shape])
    if num_hidden_layers:
        kw["num_hidden_layers"] = num_hidden_layers
    cfg = M.SmolLM2Config(vocab_size=V, head_dim=kw["hidden_size"] // kw["num_attention_heads"],
                          max_position_embeddings=2048, **kw)
    # weights larger than the usual 0.02 and jittered norms, so that logits are not flat
    return write_random_checkpoint(path, cfg, seed, std=0.08, norm_jitter=0.1, head_dim_in_config=(shape == "gqa"))
