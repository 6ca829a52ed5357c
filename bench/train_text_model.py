"""
A small SmolLM2-shaped model trained for a few minutes on GSM8k's training set, written in the
official layout with its tokenizer, for generation parity with lm-eval on text:

    python bench/train_text_model.py --data-dir data --out runs/text-model
    python bench/bench_evals.py --data-dir data --model runs/text-model --tasks gsm8k \
        --limit-gsm8k 256 --limit-gsm8k-lm-eval 256

Why: the random 135M-shaped model of bench_evals.py greedily repeats one token for all 256 new
tokens, so "identical generations" there only checks each document's first argmax: no stop string,
no number to extract, no row leaving the batch early. This model has learnt lm-eval's few-shot
format ("Question: ...\nAnswer: ... #### 42\n\n"), so its generations carry numbers and "####"
answers and most stop at "Question:" at different lengths. It is a test instrument, not a method
of the paper; nothing in rigsa.py or evals/ imports it. Plain PyTorch: AdamW on random windows of
the concatenated training text, cosine learning rate, a few minutes on 2 CPU cores by default.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402
from lib import tiny  # noqa: E402
from lib import util  # noqa: E402
from evals import tasks as T  # noqa: E402


@dataclass
class TextModelConfig:
    vocab_size: int = 4096          # a BPE trained on GSM8k's text: small, so the embedding trains fast
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4    # GQA, as SmolLM2-135M (head_dim 64)
    num_key_value_heads: int = 2
    steps: int = 400
    batch_size: int = 16            # windows per step
    seq_len: int = 512              # tokens per window: a few whole Q/A pairs
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0


def get_lr(step, c):
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    return c.lr * 0.5 * (1 + math.cos(math.pi * (step - c.warmup) / max(1, c.steps - c.warmup)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(REPO, "data"), help="holds gsm8k/train.jsonl")
    ap.add_argument("--out", required=True, help="the checkpoint directory to write")
    ap.add_argument("--no-verify", action="store_true", help="skip the GSM8k files' checksums")
    for k, v in asdict(TextModelConfig()).items():   # sizes and steps from 1; the seed, warmup and decay from 0
        lo = 0 if k in ("seed", "warmup", "weight_decay") or type(v) is float else 1
        ap.add_argument("--" + k.replace("_", "-"), type=util.number(type(v), lo, lo_open=k == "lr"), default=v)
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)   # a new model's folder: another's is never written over, nor half-written
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out) or os.listdir(out)):
        sys.exit(f"error: --out {a.out}: {'is a file' if not os.path.isdir(out) or os.path.islink(out) else 'holds files'}"
                 f"; this script writes a new model's folder: choose another --out, or move that one away")
    c = TextModelConfig(**{k: getattr(a, k) for k in asdict(TextModelConfig())})
    print(json.dumps(asdict(c)))
    torch.manual_seed(c.seed)
    try:   # no data/ (MissingData), a damaged file: one line, as the commands say it
        train, test = T.load_gsm8k(T.ensure_files("gsm8k", a.data_dir, verify=not a.no_verify))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    tmp = f"{out}.partial-{os.getpid()}"   # renamed to --out when complete; removed if the run stops before
    try:
        train_into(tmp, c, train, test)
        os.replace(tmp, out)   # onto nothing, or onto the empty folder it was
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # a look at what the written checkpoint generates: the first test question with lm-eval's 5 shots
    model, tok = M.load(out, device="cpu", dtype=torch.float32)
    shots = T.gsm8k_fewshot_indices(1, len(train))[0]
    gen = M.generate(model, tok, [T.gsm8k_prompt(train, test[0], shots)], stop=T.GSM8K_UNTIL, progress_bar=False)[0]
    print(f"test document 0 generates {gen!r}")


def train_into(folder, c, train, test):
    """The tokenizer, the model trained, its checkpoint and train_config.json, written into `folder`."""
    # the tokenizer: SmolLM2's pipeline (digits split, byte-level), trained on GSM8k's text
    os.makedirs(folder)
    tiny.write_tokenizer(folder, c.vocab_size, [d["question"] + "\n" + d["answer"] for d in train + test])
    tok = M.load_tokenizer(folder)
    # the training text in lm-eval's few-shot format, shots joined by "\n\n" (evals/tasks.py)
    text = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in train)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    print(f"{len(ids):,} training tokens, {c.steps * c.batch_size * c.seq_len / len(ids):.1f} epochs")

    cfg = M.SmolLM2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    model = M.Model(cfg)
    model.load_state_dict(tiny.random_state_dict(cfg, seed=c.seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]   # matrices decay; norm gains do not
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95))
    bar = util.progress(total=c.steps, desc="train", unit="step")
    t0, losses = time.time(), []
    for step in range(c.steps):
        starts = torch.randint(0, len(ids) - c.seq_len - 1, (c.batch_size,))
        x = torch.stack([ids[s:s + c.seq_len + 1] for s in starts])           # (B, T+1)
        logits = model(x[:, :-1])                                              # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        for g in opt.param_groups:
            g["lr"] = get_lr(step, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update()
    bar.close()
    M.save_checkpoint(folder, M.hf_config(cfg), model.state_dict())   # bfloat16, as SmolLM2's own checkpoints
    util.write_json(os.path.join(folder, "train_config.json"),
                    {**asdict(c), "first_loss": losses[0], "final_loss": losses[-1], "seconds": round(time.time() - t0, 1)})
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
