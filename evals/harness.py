"""
Batched scoring for the evaluations, numerically the same as lm-evaluation-harness' HF backend
(lm_eval/models/huggingface.py, HFLM; docs/evaluation.md) but without its redundant work:

- log-likelihood (HFLM._loglikelihood_tokens): each document's context, and the prefix its
  continuations share, is computed ONCE. A document is laid out as one segment [context+shared |
  rest of choice 1 | rest of choice 2 ...] whose branches see the shared part and themselves only,
  at the positions they would have alone; segments are packed side by side into rows of ~256 tokens,
  so a forward pass is almost all real tokens (lm-eval runs context+continuation per choice, at
  batch 1 by default). Only continuation positions go through lm_head/log_softmax (V = 49152 makes
  lm_head a fifth of a 135M model). score_separate() is the plain one-row-per-request path, kept as
  the reference for the tests.
- GSM8k: model.generate, batched greedy with the KV cache, rows stop independently.
"""
import os

import torch
import torch.nn.functional as F


def encode_pair(tok, context, continuation):
    """lm-eval TemplateLM._encode_pair (lm_eval/api/model.py): trailing whitespace of the context moves
    to the continuation; the whole string and the context are encoded separately and the
    continuation is whole[len(ctx):], never the continuation tokenised alone. No BOS for
    SmolLM2."""
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


def left_truncate(ctx, cont, max_length):
    """A request longer than the model, as lm-eval's HF backend scores it (_loglikelihood_tokens):
    the model reads the last max_length + 1 tokens of ctx + cont less the last one and the whole
    continuation is scored, i.e. the context keeps its last max_length + 1 - len(cont) tokens.
    -> the context as scored (ctx itself when the request fits)."""
    if len(cont) > max_length:   # lm-eval asserts this away
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's {max_length} positions; "
                         f"it cannot be scored")
    keep = max_length + 1 - len(cont)
    return ctx[-keep:] if len(ctx) > keep else ctx


# positions per lm_head block: (512, V) logits, 100 MB in float32; 3% faster on PIQA than 128 or
# 1024 in an early scratch run on the CPU (no make target varies it)
LOGITS_BLOCK = 512


def _cont_scores(model, h, at, targets, softmax_dtype=None):
    """h: (U, C) hidden states at distinct predicting positions; target k (N targets) is scored
    from row at[k] of h (choices that share a prefix share those rows, and lm_head runs once per
    row). Returns per-target log-probs (N,) in the logits' dtype and whether each target is the
    argmax (N,). log_softmax runs in the logits' dtype, as lm-eval does with softmax_dtype=None
    (HFLM._loglikelihood_tokens), or in `softmax_dtype` (lm-eval's model_args softmax_dtype=float32):
    then the per-token log-probs and their sums are float32 too."""
    lp = torch.empty(len(targets), dtype=softmax_dtype or model.lm_head.weight.dtype, device=h.device)
    greedy = torch.empty(len(targets), dtype=torch.bool, device=h.device)
    n = LOGITS_BLOCK
    for s in range(0, h.shape[0], n):
        logits = model.lm_head(h[s:s + n])                                     # (n, V)
        k = ((at >= s) & (at < s + n)).nonzero()[:, 0]                        # targets scored here
        u, t = at[k] - s, targets[k]
        lp[k] = F.log_softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)[u, t]
        greedy[k] = logits.max(-1).indices[u] == t  # = argmax (the first maximum), and faster on CPU
    return lp, greedy


def _collect(lp, greedy, counts):
    # per request: a dtype-native .sum() over that request's tokens, then float, as lm-eval does
    return [(float(a.sum()), bool(b.all())) for a, b in zip(lp.split(counts), greedy.split(counts))]


def _forward_rows(model, rows):
    """Right-pad token-id lists into (B, T) with their attention mask and run the model -> hidden (B, T, C)."""
    dev = model.lm_head.weight.device
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, :len(r)] = 1
    return model(ids.to(dev), am.to(dev), hidden_only=True)


@torch.inference_mode()
def score_separate(model, reqs, batch_size=16, softmax_dtype=None):
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
                             torch.arange(len(tg), device=dev), torch.tensor(tg, device=dev), softmax_dtype)
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


def _segment(ctx, conts):
    """One document as a tree laid out flat: [ P | r_1[:-1] | r_2[:-1] | ... ] with P the context
    plus the continuations' common prefix and r_k the rest of continuation k. Returns the token
    ids, their positions (each r_k continues from |P|, as if it followed P alone), their branch
    (0 for P, k for r_k) and, per continuation, the indices whose hidden state predicts each of
    its tokens (position i predicts token i+1 of its sequence)."""
    if not ctx or not all(conts):
        raise ValueError("every request needs a non-empty context and continuation")
    s = _common_prefix(conts)
    n, P = len(ctx), ctx + conts[0][:s]
    ids, pos, br, preds = list(P), list(range(len(P))), [0] * len(P), []
    for k, c in enumerate(conts):
        r = c[s:-1]                            # the last token is predicted, never fed
        start = len(ids)
        ids += r
        pos += range(len(P), len(P) + len(r))
        br += [k + 1] * len(r)
        # c[:s] from P's positions n-1 .. n+s-2, c[s] from P's last one, the rest from r_k
        preds.append(list(range(n - 1, n + s)) + list(range(start, start + len(r))))
    return ids, pos, br, preds


def _pack(lens, budget):
    """Segment lengths -> rows (lists of segment indices) for one (R, T) batch with little padding.
    Two greedy packings, longest segment first, and the one with fewer slots R*T wins: first fit
    into rows of max(budget, longest) tokens, and each segment into the emptiest of as many rows
    as the budget needs (balanced rows: less padding; BENCHMARKS.md, make bench-evals)."""
    order = sorted(range(len(lens)), key=lambda j: -lens[j])
    cap = max(budget, max(lens))
    first, room = [], []
    for j in order:
        r = next((r for r in range(len(first)) if lens[j] <= room[r]), None)
        if r is None:
            first.append([])
            room.append(cap)
            r = len(first) - 1
        first[r].append(j)
        room[r] -= lens[j]
    R = -(-sum(lens) // budget)
    even, fill = [[] for _ in range(R)], [0] * R
    for j in order:
        r = min(range(R), key=fill.__getitem__)
        even[r].append(j)
        fill[r] += lens[j]
    slots = lambda rows: len(rows) * max(sum(lens[j] for j in row) for row in rows)  # noqa: E731
    return min(first, [r for r in even if r], key=slots)


@torch.inference_mode()
def score_shared(model, docs, batch_size=16, bar=None, row_tokens=256, softmax_dtype=None):
    """docs: list of (ctx_ids, [cont_ids per choice]). Returns [[(loglikelihood, is_greedy) per
    choice]] in input order. Each document's context, and the prefix its continuations share, is
    computed ONCE: the document is one segment (_segment) in which every continuation's rest
    attends to that shared part and to itself only, at the positions it would have alone. The
    segments of a batch of documents are packed side by side into rows of about row_tokens
    tokens, (R, T) with a block mask (R, T, T), so one forward pass with almost no padding scores
    them all; only the predicting positions go through lm_head. Equal to scoring each ctx+cont
    row alone (lm-eval) up to float summation order, which test_evals.py checks."""
    dev = model.lm_head.weight.device
    segs = [_segment(c, cs) for c, cs in docs]
    order = sorted(range(len(docs)), key=lambda i: -len(segs[i][0]))
    res = [None] * len(docs)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = _pack([len(segs[i][0]) for i in idx], row_tokens)
        R, T = len(rows), max(sum(len(segs[idx[j]][0]) for j in row) for row in rows)
        ids = torch.zeros(R, T, dtype=torch.long)
        pos = torch.zeros(R, T, dtype=torch.long)
        seg = torch.full((R, T), -1, dtype=torch.long)  # padding: a segment of its own
        br = torch.zeros(R, T, dtype=torch.long)
        ri, pi, at, tg, counts = [], [], [], [], []  # distinct predicting (row, index); per target: which
        for r, row in enumerate(rows):
            o = 0
            for j in row:
                i = idx[j]
                t_ids, t_pos, t_br, preds = segs[i]
                sl = slice(o, o + len(t_ids))
                ids[r, sl], pos[r, sl], br[r, sl] = torch.tensor(t_ids), torch.tensor(t_pos), torch.tensor(t_br)
                seg[r, sl] = j
                # the shared prefix's tokens are predicted from the same positions for every choice:
                # one lm_head row each
                where = {q: len(pi) + u for u, q in enumerate(sorted({q for p in preds for q in p}))}
                ri += [r] * len(where)
                pi += [o + q for q in where]
                for p, c in zip(preds, docs[i][1]):
                    at += [where[q] for q in p]
                    tg += c
                    counts.append(len(c))
                o += len(t_ids)
        seg, br = seg.to(dev), br.to(dev)
        ar = torch.arange(T, device=dev)
        mask = ((seg[:, :, None] == seg[:, None, :]) & (ar[:, None] >= ar[None, :]) &  # own segment, causal
                ((br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])))         # key in P or own branch
        h = model(ids.to(dev), mask, hidden_only=True, position_ids=pos.to(dev))       # (R, T, C)
        lp, g = _cont_scores(model, h[torch.tensor(ri, device=dev), torch.tensor(pi, device=dev)],
                             torch.tensor(at, device=dev), torch.tensor(tg, device=dev), softmax_dtype)
        flat = iter(_collect(lp, g, counts))
        for row in rows:        # the same order as counts was built in
            for j in row:
                res[idx[j]] = [next(flat) for _ in docs[idx[j]][1]]
        if bar is not None:
            bar.update(len(idx))
    return res


def auto_batch_size(model, longest_tokens, rows_per_item=1, cap=None, generate=False):
    """The largest batch that fits in half of the free memory, from a per-token estimate: a few
    hidden-sized and MLP-sized activations per layer in flight, an attention-scores row, and the
    KV cache. generate=True (model.generate_ids): prompts are prefilled one at a time, so only the
    KV cache (longest_tokens slots per row) grows with the batch; one row's activations are set aside."""
    cfg, p = model.config, next(model.parameters())
    dev, nbytes = p.device, p.element_size()
    kv = nbytes * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim       # per token
    act = nbytes * (8 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * cfg.num_attention_heads * longest_tokens)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        cap = cap or 512
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        # CPU: scoring's matmuls are already efficient at 64; GSM8k decoding gains a little up to
        # 128 rows (BENCHMARKS.md, make bench-evals). Beyond that, ETA granularity suffers
        cap = cap or (128 if generate else 64)
    if generate:
        free -= 2 * act * longest_tokens
        per_item = kv * longest_tokens
    else:
        per_item = (kv + act) * longest_tokens * rows_per_item
    return int(max(1, min(cap, free // 2 // max(per_item, 1))))
