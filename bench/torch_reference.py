#!/usr/bin/env python3
"""PyTorch eager float32 reference for side-by-side CPU benchmarks of nanogpt-rs.

The model follows nanoGPT's model.py (nn.Linear layers, tied LM head, nanoGPT's init and
optimizer groups) with GPT-2's tanh-approximated GELU, the activation nanogpt-rs uses.
Three subcommands, each taking nanoGPT-style `--key=value` options:

  bench   forward + backward + clip_grad_norm_ + AdamW step on random tokens: ms/iter,
          tokens/s and GFLOP/s by nanoGPT's FLOPs estimate
  train   nanoGPT's train.py loop on CPU (fp32, eager) over DIR/train.bin and DIR/val.bin
  sample  nanoGPT's generate() on a randomly initialised model: tokens/s

Progress goes to stderr; a human summary line and then a JSON line go to stdout.
Run `python3 bench/torch_reference.py <command> --help` for the keys and defaults.
"""

import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# model (nanoGPT's model.py, written out again)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm always has one)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.n_head, self.n_embd, self.dropout = cfg["n_head"], c, cfg["dropout"]
        self.c_attn = nn.Linear(c, 3 * c, bias=cfg["bias"])
        self.c_proj = nn.Linear(c, c, bias=cfg["bias"])
        self.resid_dropout = nn.Dropout(cfg["dropout"])

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.c_fc = nn.Linear(c, 4 * c, bias=cfg["bias"])
        self.c_proj = nn.Linear(4 * c, c, bias=cfg["bias"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg["n_embd"], cfg["bias"])
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg["n_embd"], cfg["bias"])
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """cfg keys: n_layer, n_head, n_embd, block_size, vocab_size, bias, dropout, pad_vocab.

    With pad_vocab the embedding table has vocab_size rounded up to a multiple of 64 rows
    (as nanogpt-rs builds it); the padded logits are cut off before the loss and sampling."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        v = cfg["vocab_size"]
        self.vocab_size = v
        self.padded_vocab_size = (v + 63) // 64 * 64 if cfg["pad_vocab"] else v
        c = cfg["n_embd"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab_size, c),
            wpe=nn.Embedding(cfg["block_size"], c),
            drop=nn.Dropout(cfg["dropout"]),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg["n_layer"])]),
            ln_f=LayerNorm(c, cfg["bias"]),
        ))
        self.lm_head = nn.Linear(c, self.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        proj_std = 0.02 / math.sqrt(2 * cfg["n_layer"])
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=proj_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count as nanoGPT reports it (tied wte counted once, wpe excluded)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """nanoGPT's estimate: 6N + 12*L*H*Q*T, N without wpe, T = block_size."""
        c = self.cfg
        return (6 * self.num_params()
                + 12 * c["n_layer"] * c["n_head"] * (c["n_embd"] // c["n_head"]) * c["block_size"])

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        if t > self.cfg["block_size"]:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.cfg['block_size']}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)[..., :self.vocab_size]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :])[..., :self.vocab_size], None

    def configure_optimizer(self, weight_decay, learning_rate, betas):
        """nanoGPT's groups: weight decay on tensors of two or more dimensions only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """nanoGPT's generate(): no KV cache, full forward over the cropped context."""
        for _ in range(max_new_tokens):
            bs = self.cfg["block_size"]
            idx_cond = idx if idx.size(1) <= bs else idx[:, -bs:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# ----------------------------------------------------------------------------------------
# options


MODEL_KEYS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304,
                  bias=False, dropout=0.0, pad_vocab=False)

DEFAULTS = {
    "bench": dict(MODEL_KEYS, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                  dropout=0.0, iters=20, warmup=3, learning_rate=6e-4, beta1=0.9, beta2=0.95,
                  weight_decay=0.1, grad_clip=1.0, seed=1337, threads=0),
    # nanoGPT's config/train_shakespeare_char.py on top of train.py's defaults
    "train": dict(MODEL_KEYS, data_dir="", vocab_size=0, dropout=0.2,
                  batch_size=64, gradient_accumulation_steps=1, max_iters=5000,
                  learning_rate=1e-3, min_lr=1e-4, decay_lr=True, warmup_iters=100,
                  lr_decay_iters=5000, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                  eval_interval=250, eval_iters=200, log_interval=10, eval_only=False,
                  seed=1337, threads=0),
    "sample": dict(MODEL_KEYS, block_size=64, vocab_size=65, max_new_tokens=500, num_samples=1,
                   temperature=0.8, top_k=200, start_token=0, seed=1337, threads=0),
}

HELP = {
    "bench": "forward + backward + clip + AdamW step on random tokens",
    "train": "nanoGPT's training loop on DIR/train.bin, DIR/val.bin (uint16) and DIR/meta.json",
    "sample": "nanoGPT's generate() on a randomly initialised model",
}


class UsageError(Exception):
    pass


def parse_value(key, text, default):
    if isinstance(default, bool):
        if text in ("True", "true", "1"):
            return True
        if text in ("False", "false", "0"):
            return False
        raise UsageError(f"--{key}={text}: expected True or False")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise UsageError(f"--{key}={text}: expected {kind}") from None
    return text


def parse_args(argv):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in DEFAULTS:
        lines = [f"  {c:7s} {HELP[c]}" for c in DEFAULTS]
        msg = "usage: torch_reference.py {bench,train,sample} [--key=value ...]\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            raise UsageError(f"unknown command '{argv[0]}'\n{msg}")
        print(msg)
        sys.exit(0)
    cmd, cfg = argv[0], dict(DEFAULTS[argv[0]])
    for arg in argv[1:]:
        if arg in ("-h", "--help"):
            print(f"{cmd}: {HELP[cmd]}\nkeys and defaults:")
            for k, v in cfg.items():
                print(f"  --{k}={v}")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(f"'{arg}': options are written --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in cfg:
            raise UsageError(f"unknown key '{key}' for {cmd}; known keys: {', '.join(cfg)}")
        cfg[key] = parse_value(key, text, DEFAULTS[cmd][key])
    return cmd, cfg


def check_model_cfg(cfg):
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if cfg[k] < 1:
            raise UsageError(f"--{k}={cfg[k]}: must be at least 1")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UsageError(f"--n_embd={cfg['n_embd']}: must be divisible by n_head={cfg['n_head']}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise UsageError(f"--dropout={cfg['dropout']}: must be in [0, 1)")


def set_threads(cfg):
    n = cfg["threads"] if cfg["threads"] > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def model_desc(cfg):
    return (f"{cfg['n_layer']}L/{cfg['n_head']}H/{cfg['n_embd']}C, block {cfg['block_size']}, "
            f"vocab {cfg['vocab_size']}{' (padded)' if cfg['pad_vocab'] else ''}, "
            f"bias {cfg['bias']}")


def report(human, record):
    print(human, flush=True)
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------
# bench


def cmd_bench(cfg):
    check_model_cfg(cfg)
    if cfg["iters"] < 1 or cfg["warmup"] < 0 or cfg["batch_size"] < 1:
        raise UsageError("--iters and --batch_size must be at least 1, --warmup at least 0")
    threads = set_threads(cfg)
    torch.manual_seed(cfg["seed"])
    model = GPT(cfg)
    model.train()
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                    (cfg["beta1"], cfg["beta2"]))
    b, t = cfg["batch_size"], cfg["block_size"]
    data = torch.randint(cfg["vocab_size"], (b, t + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    log(f"bench: {model_desc(cfg)}, batch {b}, {model.num_params() / 1e6:.2f}M params "
        f"(no wpe), {threads} threads")
    times, loss = [], None
    for i in range(cfg["warmup"] + cfg["iters"]):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        lossf = loss.item()
        dt = time.perf_counter() - t0
        if i >= cfg["warmup"]:
            times.append(dt)
        log(f"  iter {i}{' (warmup)' if i < cfg['warmup'] else ''}: loss {lossf:.4f}, "
            f"{dt * 1e3:.1f} ms")
    ms = statistics.median(times) * 1e3
    tps = b * t / (ms / 1e3)
    fpt = model.flops_per_token()
    gflops = fpt * tps / 1e9
    report(f"torch eager fp32 bench: {model_desc(cfg)}, batch {b}, {threads} threads: "
           f"median {ms:.2f} ms/iter, {tps:.0f} tokens/s, {gflops:.2f} GFLOP/s",
           {"ms_per_iter": ms, "tokens_per_s": tps, "gflops": gflops,
            "flops_per_token": fpt, "params": model.num_params(), "threads": threads,
            "iters": cfg["iters"], "final_loss": lossf})


# ----------------------------------------------------------------------------------------
# train


def read_vocab_size(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        log(f"no {path}: using GPT-2's padded vocabulary 50304 (as nanoGPT does)")
        return 50304
    try:
        with open(path) as f:
            v = json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: cannot read an integer 'vocab_size' ({e}); "
                         "write it as {\"vocab_size\": N}") from None
    if not isinstance(v, int) or v < 1:
        raise UsageError(f"{path}: vocab_size = {v!r} must be a positive integer")
    log(f"vocab_size = {v} (from {path})")
    return v


def open_split(data_dir, split, block_size):
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise UsageError(f"{path} not found; --data_dir must hold train.bin and val.bin "
                         "(uint16 token ids), as written by `nanogpt prepare`")
    n = os.path.getsize(path) // 2
    if n <= block_size + 1:
        raise UsageError(f"{path} holds {n} tokens, fewer than block_size + 2 = {block_size + 2}")
    return path


def lr_at(it, cfg):
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    if it < cfg["warmup_iters"]:
        return lr * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return min_lr
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def cmd_train(cfg):
    if not cfg["data_dir"]:
        raise UsageError("train needs --data_dir=DIR holding train.bin, val.bin and meta.json")
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = read_vocab_size(cfg["data_dir"])
    check_model_cfg(cfg)
    for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
              "log_interval"):
        if cfg[k] < 1:
            raise UsageError(f"--{k}={cfg[k]}: must be at least 1")
    threads = set_threads(cfg)
    bs, b = cfg["block_size"], cfg["batch_size"]
    paths = {s: open_split(cfg["data_dir"], s, bs) for s in ("train", "val")}
    torch.manual_seed(cfg["seed"])

    def get_batch(split):
        # a fresh memmap per batch, as nanoGPT does (avoids a memory leak with np.memmap)
        data = np.memmap(paths[split], dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - bs, (b,))
        x = torch.stack([torch.from_numpy(data[i:i + bs].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + bs].astype(np.int64)) for i in ix])
        return x, y

    model = GPT(cfg)
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                    (cfg["beta1"], cfg["beta2"]))
    gas = cfg["gradient_accumulation_steps"]
    tokens_per_iter = gas * b * bs
    log(f"train: {model_desc(cfg)}, {model.num_params() / 1e6:.2f}M params (no wpe), "
        f"{tokens_per_iter} tokens/iter, {threads} threads")

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                x, y = get_batch(split)
                losses[k] = model(x, y)[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    x, y = get_batch("train")
    start = t0 = time.perf_counter()
    iter_num, step_times, losses, evals = 0, [], None, []
    while True:
        lr = lr_at(iter_num, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        evaluated = False
        if iter_num % cfg["eval_interval"] == 0:
            losses = estimate_loss()
            evals.append({"iter": iter_num, **losses})
            evaluated = True
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if iter_num == 0 and cfg["eval_only"]:
            break
        for _ in range(gas):
            _, loss = model(x, y)
            loss = loss / gas
            x, y = get_batch("train")  # prefetch, as nanoGPT does
            loss.backward()
        if cfg["grad_clip"] != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        if not evaluated:
            step_times.append(dt)
        if iter_num % cfg["log_interval"] == 0:
            lossf = loss.item() * gas
            log(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1e3:.2f}ms, lr {lr:.3e}, "
                f"{tokens_per_iter / dt:.0f} tok/s")
        iter_num += 1
        if iter_num > cfg["max_iters"]:
            break
    # one more evaluation of the final weights (nanoGPT's last one precedes its last step)
    if not cfg["eval_only"]:
        losses = estimate_loss()
        evals.append({"iter": iter_num, **losses})
        log(f"final (after {iter_num} steps): train loss {losses['train']:.4f}, "
            f"val loss {losses['val']:.4f}")
    wall = time.perf_counter() - start
    ms = statistics.median(step_times) * 1e3 if step_times else float("nan")
    tps = tokens_per_iter / (ms / 1e3)
    report(f"torch eager fp32 train: {model_desc(cfg)}, {iter_num} steps, train loss "
           f"{losses['train']:.4f}, val loss {losses['val']:.4f}, {wall:.1f} s wall, "
           f"median {ms:.1f} ms/iter ({tps:.0f} tokens/s), {threads} threads",
           {"train_loss": losses["train"], "val_loss": losses["val"], "wall_s": wall,
            "steps": iter_num, "ms_per_iter": ms, "tokens_per_s": tps,
            "gflops": model.flops_per_token() * tps / 1e9, "threads": threads, "evals": evals})


# ----------------------------------------------------------------------------------------
# sample


def cmd_sample(cfg):
    check_model_cfg(cfg)
    if cfg["max_new_tokens"] < 1 or cfg["num_samples"] < 1 or cfg["temperature"] <= 0:
        raise UsageError("--max_new_tokens and --num_samples must be at least 1, "
                         "--temperature above 0")
    if not 0 <= cfg["start_token"] < cfg["vocab_size"]:
        raise UsageError(f"--start_token={cfg['start_token']}: must be below vocab_size")
    threads = set_threads(cfg)
    torch.manual_seed(cfg["seed"])
    model = GPT(cfg)
    model.eval()
    log(f"sample: {model_desc(cfg)}, random weights, {threads} threads")
    total, n = 0.0, 0
    for k in range(cfg["num_samples"]):
        idx = torch.tensor([[cfg["start_token"]]], dtype=torch.long)
        t0 = time.perf_counter()
        out = model.generate(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"])
        total += time.perf_counter() - t0
        n += cfg["max_new_tokens"]
        log(f"sample {k}: {out[0, 1:].tolist()[:32]}{' ...' if cfg['max_new_tokens'] > 32 else ''}")
    tps = n / total
    report(f"torch eager fp32 sample: {model_desc(cfg)}, {n} tokens in {total:.2f} s: "
           f"{tps:.1f} tokens/s, {threads} threads",
           {"tokens_per_s": tps, "ms_per_token": 1e3 / tps, "tokens": n, "threads": threads})


def main(argv):
    try:
        cmd, cfg = parse_args(argv)
        {"bench": cmd_bench, "train": cmd_train, "sample": cmd_sample}[cmd](cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
