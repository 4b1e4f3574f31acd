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


def forward(p, cfg, idx, low):
    """bt.forward with Bf16Attn in place of the exact attention when `low`."""
    L, H, C = cfg["L"], cfg["H"], cfg["C"]
    B, T = idx.shape
    x = p["wte"][idx] + p["wpe"][:T]
    ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b, 1e-5)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mm = bt.mm
    for l in range(L):
        h = mm(ln(x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"]), p[f"{l}.qkv_w"], low) + p[f"{l}.qkv_b"]
        q, k, v = h.split(C, dim=-1)
        sh = lambda t: t.view(B, T, H, C // H).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        scale = 1 / math.sqrt(C // H)
        if low:
            y = Bf16Attn.apply(q, k, v, mask, scale)
        else:
            att = (q @ k.transpose(-1, -2)) * scale
            y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + mm(y, p[f"{l}.proj_w"], low) + p[f"{l}.proj_b"]
        h = mm(ln(x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"]), p[f"{l}.fc_w"], low) + p[f"{l}.fc_b"]
        h = torch.nn.functional.gelu(h, approximate="tanh")
        x = x + mm(h, p[f"{l}.mlp_w"], low) + p[f"{l}.mlp_b"]
    x = ln(x, p["lnf_w"], p["lnf_b"])
    return mm(x, p["wte"].transpose(0, 1), low)


if __name__ == "__main__":
    bt.forward = forward
    bt.main()
