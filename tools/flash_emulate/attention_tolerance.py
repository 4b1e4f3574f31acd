#!/usr/bin/env python3
"""tools/bf16_tolerance.py's error model with the fused attention's bf16 tensor-core
kernels added (kernels/flash_attention.cu, bf16 forward and backward): the bounds of the
bf16 tests in tests/cuda_engine.rs when attention runs on tensor cores.

On top of the bf16 GEMM operands of every linear layer, attention rounds q and k for
S = q k^T, P (unnormalised) and v for P v, and in the backward dy and v for dP = dy v^T,
P and dy for dv = P^T dy, dS and k for dq = dS k, dS and q for dk = dS^T q; softmax, the
logsumexp, D = dy . y and dS = P (dP - D) stay float64. Run:
python3 tools/flash_emulate/attention_tolerance.py [seeds]
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bf16_tolerance as bt  # noqa: E402

bf16 = bt.bf16


class Bf16Attn(torch.autograd.Function):
    """Causal attention as the bf16 flash kernels round it."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        s = (bf16(q) @ bf16(k).transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        l = e.sum(-1, keepdim=True)
        y = (bf16(e) @ bf16(v)) / l
        ctx.save_for_backward(q, k, v, y, m + torch.log(l), mask)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse, mask = ctx.saved_tensors
        sc = ctx.scale
        s = (bf16(q) @ bf16(k).transpose(-1, -2)) * sc
        p = torch.exp(s - lse).masked_fill(~mask, 0.0)
        dp = bf16(dy) @ bf16(v).transpose(-1, -2)
        ds = p * (dp - (dy * y).sum(-1, keepdim=True))
        dv = bf16(p).transpose(-1, -2) @ bf16(dy)
        dq = (bf16(ds) @ bf16(k)) * sc
        dk = (bf16(ds).transpose(-1, -2) @ bf16(q)) * sc
        return dq, dk, dv, None, None


exact_attention = bt.attention


def attention(q, k, v, mask, low):
    """bt.attention, with the rounding of the bf16 flash kernels when `low`."""
    if low:
        return Bf16Attn.apply(q, k, v, mask, 1 / math.sqrt(q.shape[-1]))
    return exact_attention(q, k, v, mask, low)


if __name__ == "__main__":
    bt.attention = attention
    bt.main()
