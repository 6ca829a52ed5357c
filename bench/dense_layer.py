"""
The gated layer as it was before its storage became compact: a plain autograd graph over a dense dW
and a bool mask, y = x (W0 + alpha (dW * mask))^T. The reference that test_rigsa.py trains bitwise
against rigsa.GatedSparseLinear, and the dense side of bench_layer.py and bench_memory.py.
"""
import torch
import torch.nn as nn

import rigsa


class DenseGatedLinear(nn.Module):
    """The reference: the gated layer as it was before its storage became compact, a plain
    autograd graph over a dense dW and a bool mask: y = x (W0 + alpha (dW * mask))^T (float32)."""
    def __init__(self, base, init_seed, init="uniform", init_std=0.02, alpha_init=1e-6, gated=True):
        super().__init__()
        self.weight = base.weight
        self.init_seed, self.init, self.init_std, self.gated = init_seed, init, init_std, gated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.delta = nn.Parameter(self.init_delta())
        self.alpha = nn.Parameter(torch.tensor(alpha_init if gated else 1.0), requires_grad=gated)
        self.register_buffer("mask", torch.ones_like(self.delta, dtype=torch.bool))

    init_delta = rigsa.GatedSparseLinear.init_delta   # dW0 from the same seed, the same way

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight + self.alpha * (self.delta * self.mask))
