"""
Batched scoring for the evaluations, numerically the same as lm-evaluation-harness' HF backend
(../shared/reference/evals-protocol.md, "protocol §N") but without its redundant work:

- log-likelihood (protocol §5): each document's context, and the prefix its continuations share,
  is run ONCE into model.py's static KV cache; the rest of the continuations, sorted by length,
  run in little-padded batches on top of copies of the cache rows of their documents (lm-eval
  runs context+continuation per choice, at batch 1 by default). Only continuation positions go
  through lm_head/log_softmax (V = 49152 makes lm_head a fifth of a 135M model).
  score_separate() is the plain one-row-per-request path, kept as the reference for the tests.
- GSM8k: model.generate, batched greedy with the KV cache, rows stop independently.
- Batches are formed from length-sorted requests so that padding stays small.
"""
import copy
import os

import torch
import torch.nn.functional as F

from model import KVCache


def encode_pair(tok, context, continuation):
    """lm-eval TemplateLM._encode_pair (protocol §5): trailing whitespace of the context moves to the
    continuation; the whole string and the context are encoded separately and the continuation is
    whole[len(ctx):], never the continuation tokenised alone. No BOS for SmolLM2."""
    if context == "":  # not used by our tasks: lm-eval scores it after the prefix token (BOS, else EOS)
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        return [prefix], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def _cont_scores(model, h, targets):
    """h: (N, C) hidden states at the positions that predict targets (N,). Returns per-position
    log-probs (N,) in the logits' dtype and whether each target is the argmax (N,). log_softmax runs
    in the logits' dtype, as lm-eval does with softmax_dtype=None (protocol §5)."""
    lps = [torch.zeros(0, dtype=model.lm_head.weight.dtype, device=h.device)]
    greedy = [torch.zeros(0, dtype=torch.bool, device=h.device)]
    for s in range(0, h.shape[0], 1024):  # bounds the (N, V) logits tensor
        logits = model.lm_head(h[s:s + 1024])                                  # (n, V)
        t = targets[s:s + 1024]
        lps.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
    return torch.cat(lps), torch.cat(greedy)


def _collect(lp, greedy, counts):
    # per request: a dtype-native .sum() over that request's tokens, then float, as lm-eval does
    return [(float(a.sum()), bool(b.all())) for a, b in zip(lp.split(counts), greedy.split(counts))]


def _forward_rows(model, rows, cache=None, left=False):
    """Pad token-id lists into (B, T) with their attention mask and run the model -> hidden (B, T, C)."""
    dev = model.lm_head.weight.device
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        am[i, sl] = 1
    return model(ids.to(dev), am.to(dev), hidden_only=True, cache=cache)


@torch.inference_mode()
def score_separate(model, reqs, batch_size=16):
    """reqs: list of (ctx_ids, cont_ids). One row per request: ctx + cont[:-1], right padded,
    length-sorted. Returns [(loglikelihood, is_greedy)] in input order."""
    dev = model.lm_head.weight.device
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    res = [None] * len(reqs)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        h = _forward_rows(model, [(reqs[i][0] + reqs[i][1])[:-1] for i in idx])  # (B, T, C)
        ri, pi, tg, counts = [], [], [], []
        for r, i in enumerate(idx):
            lc, cont = len(reqs[i][0]), reqs[i][1]
            ri += [r] * len(cont)
            pi += range(lc - 1, lc - 1 + len(cont))   # position p predicts token p+1
            tg += cont
            counts.append(len(cont))
        lp, g = _cont_scores(model, h[torch.tensor(ri, device=dev), torch.tensor(pi, device=dev)],
                             torch.tensor(tg, device=dev))
        for i, r in zip(idx, _collect(lp, g, counts)):
            res[i] = r
    return res


def _common_prefix(conts):
    """Tokens that every continuation of a document starts with (PIQA's two solutions often share
    most of their words), leaving each continuation at least one token of its own."""
    n, m = 0, min(len(c) for c in conts) - 1
    while n < m and all(c[n] == conts[0][n] for c in conts):
        n += 1
    return n


def _chunks(order, lens, budget):
    """Cut rows sorted by decreasing length into runs of at most `budget` padded tokens, starting a
    new run when padding would pass a fifth of it: little padding, few forwards."""
    out, cur, real = [], [], 0
    for j in order:
        if cur and ((len(cur) + 1) * lens[cur[0]] > budget or (len(cur) + 1) * lens[cur[0]] > 1.25 * (real + lens[j])):
            out.append(cur)
            cur, real = [], 0
        cur.append(j)
        real += lens[j]
    return out + [cur] if cur else out


@torch.inference_mode()
def score_shared(model, docs, batch_size=16, bar=None):
    """docs: list of (ctx_ids, [cont_ids per choice]). Returns [[(loglikelihood, is_greedy) per
    choice]] in input order. Per batch of documents:
      1. context + the continuations' common prefix P, right padded (so the prefill runs the
         causal kernel), into a KVCache: (D, Lp). The last |P|+1 real positions of a row predict
         P and the first token of every continuation's remainder; its pad slots stay masked.
      2. the remainders (minus their last token), sorted by length and cut into little-padded
         chunks, right padded, on top of a copy of their documents' cache rows: (n, Lk)
    Per-row positions (model.py: cumsum of the real-token mask) make this equal to scoring each
    ctx+cont row alone (lm-eval), which test_evals.py checks."""
    dev = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    shared = [_common_prefix(cs) for _, cs in docs]
    order = sorted(range(len(docs)), key=lambda i: -(len(docs[i][0]) + shared[i]))   # little padding
    res = [None] * len(docs)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        pre = [docs[i][0] + docs[i][1][0][:shared[i]] for i in idx]
        rem = [(r, c[shared[i]:]) for r, i in enumerate(idx) for c in docs[i][1]]    # (document row, ids)
        D, Lp = len(idx), max(len(p) for p in pre)
        cache = KVCache(model.config, D, Lp + max(len(c) for _, c in rem) - 1, dev, dtype)
        h = _forward_rows(model, pre, cache)                                         # (D, Lp, C)
        # P: positions |pre|-1-n .. |pre|-2 of row r predict its n shared tokens, once for all choices
        n = [shared[i] for i in idx]
        ri = torch.tensor([r for r in range(D) for _ in range(n[r])], dtype=torch.long)
        pi = torch.tensor([len(pre[r]) - 1 - n[r] + t for r in range(D) for t in range(n[r])], dtype=torch.long)
        lpP, gP = _cont_scores(model, h[ri.to(dev), pi.to(dev)],
                               torch.tensor([t for r, i in enumerate(idx) for t in docs[i][1][0][:n[r]]], device=dev))
        lpP, gP = lpP.split(n), gP.split(n)
        # the first token of every remainder is predicted by the last prefix position
        rows = torch.tensor([r for r, _ in rem], device=dev)
        h_last = h[torch.arange(D, device=dev), torch.tensor([len(p) - 1 for p in pre], device=dev)]   # (D, C)
        lp0, g0 = _cont_scores(model, h_last[rows], torch.tensor([c[0] for _, c in rem], device=dev))
        rest = {}  # remainder j -> (log-probs, greedy) of its tokens 1..
        lens = [len(c) - 1 for _, c in rem]
        todo = sorted((j for j in range(len(rem)) if lens[j] > 0), key=lambda j: -lens[j])
        for chunk in _chunks(todo, lens, budget=64 * batch_size):
            sub = copy.copy(cache)    # keep() rebinds the copy's buffers; the prefix cache stays
            sub.keep(torch.tensor([rem[j][0] for j in chunk], device=dev))
            h = _forward_rows(model, [rem[j][1][:-1] for j in chunk], sub)             # (n, Lk, C)
            ri = torch.tensor([r for r, j in enumerate(chunk) for _ in range(lens[j])], device=dev)
            pi = torch.tensor([p for j in chunk for p in range(lens[j])], device=dev)
            lp, g = _cont_scores(model, h[ri, pi], torch.tensor([t for j in chunk for t in rem[j][1][1:]], device=dev))
            rest.update(zip(chunk, zip(lp.split([lens[j] for j in chunk]), g.split([lens[j] for j in chunk]))))
        # per request, its tokens in order [P, first, rest...], summed as lm-eval sums them
        scores = []
        for j, (r, _) in enumerate(rem):
            a, g = rest.get(j, (lp0[:0], g0[:0]))
            scores.append((float(torch.cat([lpP[r], lp0[j:j + 1], a]).sum()),
                           bool(gP[r].all()) and bool(g0[j]) and bool(g.all())))
        k0 = 0
        for i in idx:
            res[i] = scores[k0:k0 + len(docs[i][1])]
            k0 += len(docs[i][1])
        if bar is not None:
            bar.update(D)
    return res


def auto_batch_size(model, longest_tokens, rows_per_item=1, cap=None):
    """The largest batch whose activations fit in half of the free memory, from a per-token
    estimate (a few hidden-sized and MLP-sized tensors per layer in flight, plus the KV cache)."""
    cfg, p = model.config, next(model.parameters())
    dev, nbytes = p.device, p.element_size()
    per_tok = nbytes * (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
                        + 8 * cfg.hidden_size + 3 * cfg.intermediate_size
                        + 2 * cfg.num_attention_heads * longest_tokens)  # attention scores row
    per_item = per_tok * longest_tokens * rows_per_item
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        cap = cap or 512
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        cap = cap or 64  # CPU: beyond this the matmuls are already efficient; ETA granularity suffers
    return int(max(1, min(cap, free // 2 // max(per_item, 1))))
