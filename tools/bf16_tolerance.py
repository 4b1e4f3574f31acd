#!/usr/bin/env python3
"""How far bf16 mixed precision moves a small GPT-2 from the exact result: the error model
behind the tolerances of the bf16 tests in tests/cuda_engine.rs.

The model is the CUDA engine's bf16 mode written in PyTorch on the CPU: every linear layer
(qkv, attention projection, fc, MLP projection) and the tied LM head rounds both GEMM
operands to bf16 (round to nearest even) and accumulates in float64, in the forward pass
and in both backward products (dX = dY W^T and dW = X^T dY); everything else (LayerNorm,
softmax, attention products, GELU, cross-entropy, AdamW) is float64. The reference is the
same model entirely in float64 (the CPU engine's fp32 is 1e-6 from it, far below what is
measured here).

For the test's shapes (2 layers, parameters = GPT-2 init + N(0, 0.1) noise, B = 3) and many
seeds it prints the worst relative L2 error and lowest cosine similarity of the logits and of
every gradient tensor, the relative loss error, and the relative loss error over 10 AdamW
steps. Run: python3 tools/bf16_tolerance.py [seeds]
"""
import math
import sys

import torch

torch.set_default_dtype(torch.float64)


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float64)


class Bf16Matmul(torch.autograd.Function):
    """y = x @ w with both operands rounded to bf16, in forward and backward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return bf16(x) @ bf16(w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dyb = bf16(dy)
        dx = dyb @ bf16(w).transpose(-1, -2)
        dw = bf16(x).reshape(-1, x.shape[-1]).transpose(0, 1) @ dyb.reshape(-1, dy.shape[-1])
        return dx, dw


def mm(x, w, low):
    return Bf16Matmul.apply(x, w) if low else x @ w


def init(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    L, C, V, T = cfg["L"], cfg["C"], cfg["V"], cfg["T"]

    def n(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    p = {"wte": n(V, C), "wpe": n(T, C), "lnf_w": torch.ones(C), "lnf_b": torch.zeros(C)}
    for l in range(L):
        p[f"{l}.ln1_w"] = torch.ones(C)
        p[f"{l}.ln1_b"] = torch.zeros(C)
        p[f"{l}.qkv_w"] = n(C, 3 * C)
        p[f"{l}.qkv_b"] = torch.zeros(3 * C)
        p[f"{l}.proj_w"] = n(C, C, std=0.02 / math.sqrt(2 * L))
        p[f"{l}.proj_b"] = torch.zeros(C)
        p[f"{l}.ln2_w"] = torch.ones(C)
        p[f"{l}.ln2_b"] = torch.zeros(C)
        p[f"{l}.fc_w"] = n(C, 4 * C)
        p[f"{l}.fc_b"] = torch.zeros(4 * C)
        p[f"{l}.mlp_w"] = n(4 * C, C, std=0.02 / math.sqrt(2 * L))
        p[f"{l}.mlp_b"] = torch.zeros(C)
    for k in p:
        p[k] = (p[k] + torch.randn(p[k].shape, generator=g) * 0.1).requires_grad_(True)
    return p


def attention(q, k, v, mask, low):
    """Causal attention of q, k, v (B, H, T, hs) under the boolean (T, T) `mask`: exact
    whether `low` or not (tools/flash_emulate/attention_tolerance.py replaces it with the
    bf16 rounding of the fused kernels)."""
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def forward(p, cfg, idx, low):
    L, H, C = cfg["L"], cfg["H"], cfg["C"]
    B, T = idx.shape
    x = p["wte"][idx] + p["wpe"][:T]
    ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b, 1e-5)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(L):
        h = mm(ln(x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"]), p[f"{l}.qkv_w"], low) + p[f"{l}.qkv_b"]
        q, k, v = h.split(C, dim=-1)
        sh = lambda t: t.view(B, T, H, C // H).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        y = attention(q, k, v, mask, low).transpose(1, 2).reshape(B, T, C)
        x = x + mm(y, p[f"{l}.proj_w"], low) + p[f"{l}.proj_b"]
        h = mm(ln(x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"]), p[f"{l}.fc_w"], low) + p[f"{l}.fc_b"]
        h = torch.nn.functional.gelu(h, approximate="tanh")
        x = x + mm(h, p[f"{l}.mlp_w"], low) + p[f"{l}.mlp_b"]
    x = ln(x, p["lnf_w"], p["lnf_b"])
    return mm(x, p["wte"].transpose(0, 1), low)


def loss_of(logits, tgt):
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1
    )


def rel_l2(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cosine(a, b):
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-30)).item()


def run(cfg, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    B, T, V = 3, cfg["T"], cfg["V"]
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    tgt[0, 1] = -1
    tgt[-1, -1] = -1
    out = {}
    grads = {}
    for low in (False, True):
        p = init(cfg, seed)
        logits = forward(p, cfg, idx, low)
        loss = loss_of(logits, tgt)
        loss.backward()
        grads[low] = (logits.detach(), loss.item(), {k: v.grad.clone() for k, v in p.items()})
    (lr_, l_ref, g_ref), (lb, l_bf, g_bf) = grads[False], grads[True]
    out["logits_rel_l2"] = rel_l2(lb, lr_)
    out["logits_cos"] = cosine(lb, lr_)
    out["loss_rel"] = abs(l_bf - l_ref) / l_ref
    out["grad_rel_l2"] = max(rel_l2(g_bf[k], g_ref[k]) for k in g_ref)
    out["grad_worst"] = max(g_ref, key=lambda k: rel_l2(g_bf[k], g_ref[k]))
    out["grad_cos"] = min(cosine(g_bf[k], g_ref[k]) for k in g_ref)
    # 10 AdamW steps (torch arithmetic, clip 0.5, wd 0.1 on 2-D tensors), lr 1e-3.
    losses, finals = {}, {}
    for low in (False, True):
        p = init(cfg, seed)
        decay = [v for v in p.values() if v.dim() >= 2]
        other = [v for v in p.values() if v.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
            lr=1e-3,
        )
        ls = []
        for _ in range(10):
            opt.zero_grad()
            loss = loss_of(forward(p, cfg, idx, low), tgt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(p.values()), 0.5)
            opt.step()
            ls.append(loss.item())
        losses[low] = ls
        finals[low] = {k: v.detach().clone() for k, v in p.items()}
    out["steps_loss_rel"] = max(abs(a - b) / b for a, b in zip(losses[True], losses[False]))
    out["steps_param_rel_l2"] = max(rel_l2(finals[True][k], finals[False][k]) for k in finals[False])
    return out


def main():
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    configs = {
        "L2 H4 C64 V96 T16": {"L": 2, "H": 4, "C": 64, "V": 96, "T": 16},
        "L2 H3 C48 V67 T12": {"L": 2, "H": 3, "C": 48, "V": 67, "T": 12},
    }
    for name, cfg in configs.items():
        rs = [run(cfg, s) for s in range(seeds)]
        worst = lambda k, f=max: f(r[k] for r in rs)
        print(f"{name}, {seeds} seeds:")
        print(f"  logits  rel L2 max {worst('logits_rel_l2'):.2e}  cos min {worst('logits_cos', min):.6f}")
        print(f"  loss    rel max {worst('loss_rel'):.2e}")
        print(f"  grads   rel L2 max {worst('grad_rel_l2'):.2e} "
              f"(worst tensor {max(rs, key=lambda r: r['grad_rel_l2'])['grad_worst']})"
              f"  cos min {worst('grad_cos', min):.6f}")
        print(f"  10 AdamW steps: loss rel max {worst('steps_loss_rel'):.2e}, "
              f"parameter rel L2 max {worst('steps_param_rel_l2'):.2e}")


if __name__ == "__main__":
    main()
