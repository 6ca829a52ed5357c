"""
sparse.py: the arithmetic of m * dW held at its free entries only (the storage itself, `delta` and the
packed `mask`, is rigsa.py's GatedSparseLinear's, §3.2), and the gated layer's product computed from it. It knows the layer only by what it holds (weight,
delta, alpha, mask, the shape), so rigsa.py imports it, not the other way round.

  free_index, dense, merged     the free entries' positions, m * dW as a dense tensor, W0 + alpha m dW
  GatedDelta                    y = x (W0 + alpha (m * dW))^T as one autograd Function: saves x and the
                                positions, rebuilds m * dW in each pass, one layer at a time
Why the storage costs what it does: docs/memory.md. The low-precision GEMM count: BENCHMARKS.md.
"""
import numpy as np
import torch
import torch.nn.functional as F

from lib import adapter_files as AF


def free_index(mask, numel):
    """Flat row-major positions (k,) of the free entries of a packed mask, in `delta`'s order; None if
    the mask is None (every entry free). From the packed mask at each use (a kept int64 index costs 8
    bytes per entry); numpy's nonzero on the CPU, several times faster than torch's."""
    if mask is None:
        return None
    if mask.device.type == "cpu":
        return torch.from_numpy(np.nonzero(np.unpackbits(mask.numpy(), count=numel).view(bool))[0])
    return AF.unpack_bits(mask, numel).nonzero().view(-1)


def dense(delta, index, shape):
    """m * dW as a dense (out, in) float32 tensor, the pruned entries exactly 0 (index None: all free)."""
    if index is None:
        return delta.view(shape)
    md = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=delta.device)
    return md.index_copy_(0, index, delta).view(shape)


def merged(weight, delta, alpha, index):
    """W0 + alpha * (m * dW) in float32, the same numbers however it is formed (addition commutes):
    under a quarter of the entries free, a scatter-add into a copy of W0; above, alpha md + W0 in
    streaming passes, which are then faster (make bench-layer)."""
    if index is None:
        return weight + alpha * delta.view(weight.shape)
    if len(index) > weight.numel() // 4:
        return dense(delta, index, weight.shape).mul_(alpha).add_(weight)
    w = weight.clone()
    w.view(-1).index_add_(0, index, alpha * delta)
    return w


def exact(x, weight):
    """float32 weights and input without autocast: one GEMM on the merged weight is exact."""
    return x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


class GatedDelta(torch.autograd.Function):
    """y = x (W0 + alpha (m * dW))^T, saving for backward only x and the free entries' positions:
    m * dW is rebuilt from the compact storage in each pass, one layer at a time (docs/memory.md).
    float32: the ops of a plain autograd graph over W0 + alpha (m * dW), so gradients are bitwise
    the dense layer's. Low precision: the delta keeps its own GEMM, as W0 + alpha dW formed in
    bfloat16 would round away deltas under half an ulp of W0."""
    @staticmethod
    def forward(ctx, x, delta, alpha, layer):                  # x (B, T, in) -> (B, T, out)
        index = free_index(layer.mask, layer.weight.numel())   # (k,) or None (every entry free)
        ctx.layer = layer
        # the positions as int32 (4 bytes per free entry until the backward, not 8): int64 again there
        ctx.save_for_backward(x, delta, alpha, None if index is None else index.int())
        if exact(x, layer.weight):
            return F.linear(x, merged(layer.weight, delta, alpha, index))
        md = dense(delta, index, layer.weight.shape)           # (out, in) float32, pruned entries 0
        # x W0^T + alpha x md^T: the delta's own GEMM, then one rounding of the sum (addcmul)
        return torch.addcmul(F.linear(x, layer.weight.to(x.dtype)), F.linear(x, md.to(x.dtype)), alpha.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, delta, alpha, index = ctx.saved_tensors
        W0 = ctx.layer.weight
        out_features, in_features = W0.shape
        index = None if index is None else index.long()
        md = dense(delta, index, W0.shape)                     # (out, in)
        gy2, x2 = gy.reshape(-1, out_features), x.reshape(-1, in_features)   # (B*T, out), (B*T, in)
        gx = None
        if exact(x, W0):
            # the forward's W0 + alpha md, from md (needed below for alpha's gradient): alpha md + W0
            # is the same sum (addition commutes), in two passes instead of a copy and a scatter
            if ctx.needs_input_grad[0]:
                gx = gy2.mm(torch.mul(md, alpha).add_(W0)).view_as(x)
            gw = gy2.t().mm(x2)                                # (out, in): the gradient of W0 + alpha md
            g_alpha = (gw * md).sum() if ctx.needs_input_grad[2] else None
            g = gw.view(-1) if index is None else gw.view(-1).index_select(0, index)
            return gx, g * alpha, g_alpha, None                # dW's gradient only at the free entries
        # low precision: one GEMM on W0 + alpha md in the input's dtype, where gy W0 + alpha gy md would
        # take two; a delta under half an ulp of W0 is lost to that rounding here as W0's own bits are
        # (the forward keeps it: its own GEMM). Weight-sized passes are fused: they cost as much as a GEMM
        if ctx.needs_input_grad[0]:
            w = torch.addcmul(W0.to(x.dtype), md.to(x.dtype), alpha.to(x.dtype))   # (out, in)
            gx = gy2.mm(w).view_as(x)
        gw = gy2.t().mm(x2).float().view(-1)                   # one weight-gradient GEMM, fp32 from here
        g_alpha = torch.dot(gw, md.reshape(-1)) if ctx.needs_input_grad[2] else None
        g = gw.mul_(alpha) if index is None else gw.index_select(0, index).mul_(alpha)
        return gx, g, g_alpha, None
