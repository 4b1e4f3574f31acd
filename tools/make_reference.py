#!/usr/bin/env python3
"""Writes the reference fixtures that pin the CPU engine's numbers (tests/fixtures/ref_*.safetensors).

An independent PyTorch implementation of the GPT-2 model used by nanogpt-rs, computed in
float64 on the CPU and stored as float32 (token ids as int32):

  * parameters named and shaped like Hugging Face GPT-2 (Conv1D matrices are [in, out]),
    the token embedding padded to `padded_vocab_size` rows, LM head tied to wte;
  * logits (real vocabulary only), the mean cross-entropy loss (targets of -1 ignored),
    and the gradient of that loss for every parameter;
  * ten steps of torch.optim.AdamW with global-norm clipping (torch.nn.utils.clip_grad_norm_)
    on the same batch: the gradient norm before each step, the loss after each step, and a
    few parameter tensors after the last step.

The script checks itself before writing anything: the hand-written model is compared with a
second formulation built from torch.nn.functional (layer_norm, scaled_dot_product_attention,
gelu(approximate='tanh'), cross_entropy), a few gradient entries are compared with central
finite differences, and the padded embedding rows are shown to have no effect on the loss.

Usage:  python3 tools/make_reference.py [--out-dir tests/fixtures]
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

DT = torch.float64
LN_EPS = 1e-5

# AdamW settings stored in every fixture (grad_clip is chosen per fixture, see choose_clip).
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, steps=10)

# name, model/batch config, seed
FIXTURES = [
    ("ref_bias", dict(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=97,
                      padded_vocab_size=128, bias=True, B=4, T=16), 1001),
    ("ref_nobias", dict(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=97,
                        padded_vocab_size=128, bias=False, B=4, T=16), 2002),
    # T < block_size: catches position-embedding and causal-mask indexing bugs.
    ("ref_short", dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97,
                       padded_vocab_size=128, bias=True, B=2, T=9), 3003),
]

# Final parameter tensors stored after the AdamW steps.
FINAL_NAMES = ["transformer.wte.weight", "transformer.h.1.mlp.c_proj.weight",
               "transformer.ln_f.weight"]


# ----------------------------------------------------------------------------------------
# parameters


def param_shapes(cfg):
    """Ordered (name, shape) list, the same order as the Rust ParamLayout."""
    c, vp, bias = cfg["n_embd"], cfg["padded_vocab_size"], cfg["bias"]
    out = [("transformer.wte.weight", (vp, c)), ("transformer.wpe.weight", (cfg["block_size"], c))]
    for l in range(cfg["n_layer"]):
        p = f"transformer.h.{l}."
        block = [
            ("ln_1.weight", (c,)), ("ln_1.bias", (c,)),
            ("attn.c_attn.weight", (c, 3 * c)), ("attn.c_attn.bias", (3 * c,)),
            ("attn.c_proj.weight", (c, c)), ("attn.c_proj.bias", (c,)),
            ("ln_2.weight", (c,)), ("ln_2.bias", (c,)),
            ("mlp.c_fc.weight", (c, 4 * c)), ("mlp.c_fc.bias", (4 * c,)),
            ("mlp.c_proj.weight", (4 * c, c)), ("mlp.c_proj.bias", (c,)),
        ]
        out += [(p + n, s) for n, s in block if bias or not n.endswith(".bias")]
    out.append(("transformer.ln_f.weight", (c,)))
    if bias:
        out.append(("transformer.ln_f.bias", (c,)))
    return out


def init_params(cfg, gen):
    """Seeded init: N(0, 0.02) matrices/embeddings, c_proj N(0, 0.02/sqrt(2L)), biases
    N(0, 0.02), LayerNorm weights 1 + N(0, 0.1). Padded wte rows get random nonzero values.
    Values are rounded to float32 first so that the stored parameters are exactly the ones
    the reference computed with."""
    params = {}
    proj_std = 0.02 / math.sqrt(2 * cfg["n_layer"])
    for name, shape in param_shapes(cfg):
        z = torch.randn(shape, generator=gen, dtype=DT)
        if name.endswith("c_proj.weight"):
            t = z * proj_std
        elif ".ln_" in name and name.endswith(".weight"):
            t = 1.0 + 0.1 * z
        else:  # matrices, embeddings, biases (LayerNorm biases included)
            t = 0.02 * z
        params[name] = t.to(torch.float32).to(DT)
    return params


# ----------------------------------------------------------------------------------------
# model, written out by hand


def layer_norm_manual(x, w, b):
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = xc / torch.sqrt(var + LN_EPS) * w
    return y + b if b is not None else y


def gelu_tanh_manual(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention_manual(q, k, v):
    """q, k, v: [B, NH, T, hs]; causal softmax attention with scale 1/sqrt(hs)."""
    t, hs = q.shape[-2], q.shape[-1]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = att - att.max(dim=-1, keepdim=True).values
    e = torch.exp(att)
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def cross_entropy_manual(logits, targets):
    """Mean over positions with target != -1 of -log softmax(logits)[target]."""
    flat = logits.reshape(-1, logits.shape[-1])
    tg = targets.reshape(-1)
    m = flat.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(flat - m).sum(dim=-1))
    valid = tg != -1
    picked = flat[valid].gather(1, tg[valid].unsqueeze(1)).squeeze(1)
    return (lse[valid] - picked).sum() / valid.sum()


def gpt_forward(params, cfg, idx, targets, functional=False):
    """Returns (logits over the real vocabulary [B, T, V], mean loss).

    functional=False: hand-written ops. functional=True: torch.nn.functional building blocks
    (an independent formulation used to check the first)."""
    b, t = idx.shape
    c, nh, v = cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]
    hs = c // nh
    g = params.get

    def ln(x, prefix):
        w, bb = params[prefix + ".weight"], g(prefix + ".bias")
        if functional:
            return F.layer_norm(x, (c,), w, bb, LN_EPS)
        return layer_norm_manual(x, w, bb)

    def lin(x, prefix):  # Conv1D: x @ W[in, out] + b
        y = x @ params[prefix + ".weight"]
        bb = g(prefix + ".bias")
        return y + bb if bb is not None else y

    wte = params["transformer.wte.weight"]
    x = wte[idx] + params["transformer.wpe.weight"][:t].unsqueeze(0)
    for l in range(cfg["n_layer"]):
        p = f"transformer.h.{l}."
        qkv = lin(ln(x, p + "ln_1"), p + "attn.c_attn")
        q, k, vv = qkv.split(c, dim=-1)
        q, k, vv = (z.view(b, t, nh, hs).transpose(1, 2) for z in (q, k, vv))
        if functional:
            y = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
        else:
            y = attention_manual(q, k, vv)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        x = x + lin(y, p + "attn.c_proj")
        h = lin(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = F.gelu(h, approximate="tanh") if functional else gelu_tanh_manual(h)
        x = x + lin(h, p + "mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    logits = (x @ wte.t())[..., :v]  # padded rows never reach softmax or loss
    if functional:
        loss = F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), ignore_index=-1)
    else:
        loss = cross_entropy_manual(logits, targets)
    return logits, loss


def loss_and_grads(params, cfg, idx, targets, functional=False):
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    logits, loss = gpt_forward(leaves, cfg, idx, targets, functional)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.detach() for n, p in leaves.items()}


# ----------------------------------------------------------------------------------------
# self-checks


def assert_close(name, a, b, rtol=1e-10, atol=1e-12):
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"self-check failed: {name}: max abs diff {err:.3e}")


def self_check(params, cfg, idx, targets, logits, loss, grads, gen):
    # 1. independent formulation (torch.nn.functional) gives the same logits, loss, grads
    logits_f, loss_f, grads_f = loss_and_grads(params, cfg, idx, targets, functional=True)
    assert_close("logits vs functional", logits, logits_f)
    assert_close("loss vs functional", loss, loss_f)
    for n in grads:
        assert_close(f"grad {n} vs functional", grads[n], grads_f[n], rtol=1e-9, atol=1e-13)

    # 2. central finite differences on a few entries of every tensor
    h = 1e-6
    with torch.no_grad():
        for n, p in params.items():
            rows = p.shape[0] if n != "transformer.wte.weight" else cfg["vocab_size"]
            for _ in range(3):
                i = int(torch.randint(rows, (1,), generator=gen))
                j = int(torch.randint(p.shape[1], (1,), generator=gen)) if p.dim() == 2 else None
                at = (i, j) if j is not None else (i,)
                orig = p[at].item()
                p[at] = orig + h
                lp = gpt_forward(params, cfg, idx, targets)[1].item()
                p[at] = orig - h
                lm = gpt_forward(params, cfg, idx, targets)[1].item()
                p[at] = orig
                fd = (lp - lm) / (2 * h)
                an = grads[n][at].item()
                if abs(fd - an) > 1e-6 + 1e-4 * abs(an):
                    raise AssertionError(f"finite differences: {n}{list(at)}: {fd} vs {an}")

    # 3. padded vocabulary rows: zero gradient, and changing them changes nothing
    v = cfg["vocab_size"]
    wte = "transformer.wte.weight"
    assert torch.all(grads[wte][v:] == 0), "padded wte rows must get zero gradient"
    assert torch.all(params[wte][v:] != 0), "padded wte rows should be nonzero in the fixture"
    moved = dict(params)
    moved[wte] = params[wte].clone()
    moved[wte][v:] += 5.0
    with torch.no_grad():
        _, loss_moved = gpt_forward(moved, cfg, idx, targets)
    assert loss_moved.item() == loss.item(), "padded wte rows changed the loss"

    # 4. causality: changing the last input token leaves earlier logits unchanged
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % v
    with torch.no_grad():
        logits2, _ = gpt_forward(params, cfg, idx2, targets)
    assert_close("causal mask", logits[:, :-1], logits2[:, :-1], rtol=0, atol=1e-13)
    assert not torch.allclose(logits[:, -1], logits2[:, -1]), "last position should change"


# ----------------------------------------------------------------------------------------
# AdamW on the same batch


def run_adamw(params, cfg, idx, targets, grad_clip, dtype=DT):
    """torch.optim.AdamW (two groups: decay for ndim >= 2, none otherwise) preceded by
    clip_grad_norm_. Returns (grad norms before clipping, loss after each step, final params,
    which steps clipped)."""
    a = ADAMW
    leaves = {n: torch.nn.Parameter(p.detach().clone().to(dtype)) for n, p in params.items()}
    decay = [p for p in leaves.values() if p.dim() >= 2]
    no_decay = [p for p in leaves.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"])
    norms, losses, clipped = [], [], []
    for _ in range(a["steps"]):
        opt.zero_grad(set_to_none=True)
        _, loss = gpt_forward(leaves, cfg, idx, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(leaves.values()), grad_clip)
        norms.append(norm.item())
        clipped.append(grad_clip / (norm.item() + 1e-6) < 1.0)
        opt.step()
        with torch.no_grad():
            losses.append(gpt_forward(leaves, cfg, idx, targets)[1].item())
    return norms, losses, {n: p.detach() for n, p in leaves.items()}, clipped


def choose_clip(params, cfg, idx, targets):
    """A clip threshold that is active on some steps but not all: the median of the norms of
    an unclipped run, rounded to two significant digits; other quantiles if that fails."""
    norms, _, _, _ = run_adamw(params, cfg, idx, targets, grad_clip=float("inf"))
    for q in (0.5, 0.4, 0.6, 0.3, 0.7):
        c = float(f"{torch.tensor(norms).quantile(q).item():.2g}")
        clipped = run_adamw(params, cfg, idx, targets, c)[3]
        norms_c = run_adamw(params, cfg, idx, targets, c)[0]
        # every norm well away from the threshold, so a float32 engine clips the same steps
        margin = min(abs(n - c) / c for n in norms_c)
        if any(clipped) and not all(clipped) and margin > 1e-3:
            return c
    raise AssertionError(f"no clip threshold gives a mix of clipped steps; norms {norms}")


# ----------------------------------------------------------------------------------------


def make_fixture(name, cfg, seed, out_dir):
    gen = torch.Generator().manual_seed(seed)
    params = init_params(cfg, gen)
    b, t, v = cfg["B"], cfg["T"], cfg["vocab_size"]
    assert t <= cfg["block_size"]
    idx = torch.randint(v, (b, t), generator=gen)
    targets = torch.randint(v, (b, t), generator=gen)
    # a few ignored targets, including the first and last position of some rows
    targets[0, 0] = -1
    targets[1 % b, t - 1] = -1
    targets[b - 1, t // 2] = -1

    logits, loss, grads = loss_and_grads(params, cfg, idx, targets)
    self_check(params, cfg, idx, targets, logits, loss, grads, gen)

    clip = choose_clip(params, cfg, idx, targets)
    norms, losses, final, clipped = run_adamw(params, cfg, idx, targets, clip)
    assert losses[-1] < loss.item(), "AdamW on one batch should lower its loss"

    # How far a float32 computation of the same thing lands (guidance for test tolerances).
    p32 = {n: p.to(torch.float32) for n, p in params.items()}
    leaves32 = {n: p.clone().requires_grad_(True) for n, p in p32.items()}
    logits32, loss32 = gpt_forward(leaves32, cfg, idx, targets)
    loss32.backward()
    gdiff = max((leaves32[n].grad.to(DT) - grads[n]).abs().max().item() for n in grads)
    norms32, losses32, final32, _ = run_adamw(p32, cfg, idx, targets, clip, dtype=torch.float32)
    fdiff = max((final32[n].to(DT) - final[n]).abs().max().item() for n in FINAL_NAMES)

    config = dict(cfg)
    config.update(ADAMW)
    config["grad_clip"] = clip
    tensors = {f"param.{n}": p.to(torch.float32) for n, p in params.items()}
    tensors["inputs"] = idx.to(torch.int32)
    tensors["targets"] = targets.to(torch.int32)
    tensors["logits"] = logits.to(torch.float32)
    tensors["loss"] = loss.reshape(1).to(torch.float32)
    tensors.update({f"grad.{n}": g.to(torch.float32) for n, g in grads.items()})
    tensors["adamw_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors.update({f"final.{n}": final[n].to(torch.float32) for n in FINAL_NAMES})
    tensors = {k: x.contiguous() for k, x in tensors.items()}

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.safetensors")
    tmp = path + ".tmp"
    # a single metadata key: safetensors orders several keys differently from run to run
    save_file(tensors, tmp, metadata={"config": json.dumps(config, sort_keys=True)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

    print(f"{path}: {os.path.getsize(path)} bytes, loss {loss.item():.6f}", file=sys.stderr)
    print(f"  grad_clip {clip}: clipped at steps "
          f"{[k for k, c in enumerate(clipped) if c]} of {len(clipped)}; "
          f"norms {[round(x, 4) for x in norms]}", file=sys.stderr)
    print(f"  losses after each step {[round(x, 5) for x in losses]}", file=sys.stderr)
    print(f"  float32 vs float64: logits {(logits32.to(DT) - logits).abs().max().item():.2e}, "
          f"loss {abs(loss32.item() - loss.item()):.2e}, grads {gdiff:.2e}, "
          f"norms {max(abs(x - y) for x, y in zip(norms32, norms)):.2e}, "
          f"losses {max(abs(x - y) for x, y in zip(losses32, losses)):.2e}, "
          f"final params {fdiff:.2e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    torch.use_deterministic_algorithms(True)
    for name, cfg, seed in FIXTURES:
        make_fixture(name, cfg, seed, os.path.normpath(args.out_dir))


if __name__ == "__main__":
    main()
