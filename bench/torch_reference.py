#!/usr/bin/env python3
"""PyTorch reference for side-by-side benchmarks of nanogpt-rs, on the CPU or a CUDA GPU.

The model follows nanoGPT's model.py (nn.Linear layers, tied LM head, nanoGPT's init and
optimizer groups) with GPT-2's tanh-approximated GELU, the activation nanogpt-rs uses.
Three subcommands, each taking nanoGPT-style `--key=value` options:

  bench   forward + backward + clip_grad_norm_ + AdamW step on random tokens: ms/iter,
          tokens/s, GFLOP/s by nanoGPT's FLOPs estimate, and on a GPU MFU and peak memory
  train   nanoGPT's train.py loop over DIR/train.bin and DIR/val.bin
  sample  nanoGPT's generate() on a randomly initialised model: tokens/s

The defaults are eager float32 on the CPU. `--device=cuda`, `--dtype=bfloat16` (autocast
over fp32 master weights, as nanoGPT does), `--compile=True`, `--sdpa=True|False` and
`--fused_adamw=True|False` turn it into the GPU reference (nanoGPT's own fast settings).

Progress goes to stderr; a human summary line and then a JSON line go to stdout.
Run `python3 bench/torch_reference.py <command> --help` for the keys and defaults.
"""

import contextlib
import gc
import json
import math
import os
import re
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
    """With cfg["sdpa"] (the default) attention is one scaled_dot_product_attention call
    (flash attention on a GPU); without it, nanoGPT's explicit masked softmax."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.n_head, self.n_embd, self.dropout = cfg["n_head"], c, cfg["dropout"]
        self.sdpa = cfg.get("sdpa", True)
        self.c_attn = nn.Linear(c, 3 * c, bias=cfg["bias"])
        self.c_proj = nn.Linear(c, c, bias=cfg["bias"])
        self.attn_dropout = nn.Dropout(cfg["dropout"])
        self.resid_dropout = nn.Dropout(cfg["dropout"])
        if not self.sdpa:
            bs = cfg["block_size"]
            mask = torch.tril(torch.ones(bs, bs, dtype=torch.bool)).view(1, 1, bs, bs)
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
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
    """cfg keys: n_layer, n_head, n_embd, block_size, vocab_size, bias, dropout, pad_vocab,
    and optionally sdpa (default True).

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

    def configure_optimizer(self, weight_decay, learning_rate, betas, fused=False):
        """nanoGPT's groups: weight decay on tensors of two or more dimensions only.
        fused=True asks for PyTorch's fused AdamW kernel (as nanoGPT does on CUDA)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

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

# where and how the model runs; "auto" means: decided by the device (True on cuda)
RUN_KEYS = dict(device="cpu", dtype="float32", sdpa=True, tf32=True)
TRAINING_RUN_KEYS = dict(RUN_KEYS, compile=False, fused_adamw="auto")
AUTO_BOOL_KEYS = ("fused_adamw",)

DEFAULTS = {
    "bench": dict(MODEL_KEYS, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                  gradient_accumulation_steps=1, dropout=0.0, iters=20, warmup=3, learning_rate=6e-4, beta1=0.9, beta2=0.95,
                  weight_decay=0.1, grad_clip=1.0, seed=1337, threads=0, **TRAINING_RUN_KEYS,
                  peak_flops=0.0),
    # nanoGPT's config/train_shakespeare_char.py on top of train.py's defaults
    "train": dict(MODEL_KEYS, data_dir="", vocab_size=0, dropout=0.2,
                  batch_size=64, gradient_accumulation_steps=1, max_iters=5000,
                  learning_rate=1e-3, min_lr=1e-4, decay_lr=True, warmup_iters=100,
                  lr_decay_iters=5000, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                  eval_interval=250, eval_iters=200, log_interval=10, eval_only=False,
                  seed=1337, threads=0, **TRAINING_RUN_KEYS),
    "sample": dict(MODEL_KEYS, block_size=64, vocab_size=65, max_new_tokens=500, num_samples=1,
                   temperature=0.8, top_k=200, start_token=0, seed=1337, threads=0, **RUN_KEYS),
}

# dense bf16 tensor-core peak FLOP/s by torch.cuda.get_device_name(), first match wins;
# MFU is measured against it whatever --dtype is (as nanoGPT's estimate_mfu does)
PEAK_FLOPS = [
    (r"H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12),
]

AUTO_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)

HELP = {
    "bench": "forward + backward + clip + AdamW step on random tokens "
             "(--batch_size=auto on cuda)",
    "train": "nanoGPT's training loop on DIR/train.bin, DIR/val.bin (uint16) and DIR/meta.json",
    "sample": "nanoGPT's generate() on a randomly initialised model",
}


class UsageError(Exception):
    pass


def parse_value(key, text, default):
    if key in AUTO_BOOL_KEYS:
        if text in ("auto", "Auto"):
            return "auto"
        default = False
    if isinstance(default, bool):
        if text in ("True", "true", "1"):
            return True
        if text in ("False", "false", "0"):
            return False
        extra = " or auto" if key in AUTO_BOOL_KEYS else ""
        raise UsageError(f"--{key}={text}: expected True or False{extra}")
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
        if cmd == "bench" and key == "batch_size" and text == "auto":
            cfg[key] = "auto"
        else:
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


class Runtime:
    """Where and how the model runs: device, autocast dtype, torch.compile, fused AdamW."""

    def __init__(self, cfg):
        dev = cfg["device"]
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", dev):
            raise UsageError(f"--device={dev}: expected cpu, cuda or cuda:N")
        if cfg["dtype"] not in ("float32", "bfloat16"):
            raise UsageError(f"--dtype={cfg['dtype']}: expected float32 or bfloat16")
        self.cuda = dev.startswith("cuda")
        self.device = torch.device(dev)
        self.device_type = "cuda" if self.cuda else "cpu"
        self.bf16 = cfg["dtype"] == "bfloat16"
        self.training = "compile" in cfg  # bench and train; sample has no optimizer
        self.compile = cfg.get("compile", False)
        fused = cfg.get("fused_adamw", False)
        self.fused_adamw = self.cuda if fused == "auto" else fused
        self.device_name = "cpu"
        if self.cuda:
            if not torch.cuda.is_available():
                raise UsageError(
                    f"--device={dev}: PyTorch sees no CUDA GPU (torch {torch.__version__}, "
                    f"CUDA build {torch.version.cuda or 'none'}); run on a machine with an "
                    "NVIDIA GPU and a CUDA build of PyTorch, or use --device=cpu")
            n = torch.cuda.device_count()
            if self.device.index is not None and self.device.index >= n:
                raise UsageError(f"--device={dev}: only {n} CUDA device(s) visible "
                                 f"(cuda:0 to cuda:{n - 1})")
            torch.cuda.set_device(self.device)
            # nanoGPT's setting: TF32 tensor cores for fp32 matmuls and convolutions
            torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
            torch.backends.cudnn.allow_tf32 = cfg["tf32"]
            self.device_name = torch.cuda.get_device_name(self.device)
            if self.bf16 and not torch.cuda.is_bf16_supported():
                raise UsageError(f"--dtype=bfloat16: {self.device_name} has no bfloat16 "
                                 "support; use --dtype=float32")
        if self.compile and not hasattr(torch, "compile"):
            raise UsageError(f"--compile=True: torch {torch.__version__} has no torch.compile "
                             "(needs PyTorch 2.0 or newer); use --compile=False")

    def autocast(self):
        """Mixed precision as nanoGPT runs it: bf16 autocast, fp32 master weights."""
        if self.bf16:
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wrap(self, model):
        """The callable that runs the model: torch.compile(model) or the model itself."""
        return torch.compile(model) if self.compile else model

    def label(self):
        """'torch eager fp32' on the CPU (as before), plus the GPU's name on cuda."""
        text = (f"torch {'compiled' if self.compile else 'eager'} "
                f"{'bf16 autocast' if self.bf16 else 'fp32'}")
        return f"{text} on {self.device_name}" if self.cuda else text

    def record(self):
        rec = {"device": str(self.device), "device_name": self.device_name,
               "dtype": "bfloat16" if self.bf16 else "float32"}
        if self.training:
            rec.update(compile=self.compile, fused_adamw=self.fused_adamw)
        return rec


def peak_flops_for(rt, cfg):
    """--peak_flops if given, else the table entry for the GPU's name, else None."""
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"]
    if not rt.cuda:
        return None
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, rt.device_name):
            return flops
    log(f"no peak FLOP/s known for '{rt.device_name}': pass --peak_flops=F (dense bf16 "
        "FLOP/s) to get MFU")
    return None


def is_compile_error(e):
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "Compile" in type(e).__name__


def first_line(e, limit=400):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def model_desc(cfg):
    return (f"{cfg['n_layer']}L/{cfg['n_head']}H/{cfg['n_embd']}C, block {cfg['block_size']}, "
            f"vocab {cfg['vocab_size']}{' (padded)' if cfg['pad_vocab'] else ''}, "
            f"bias {cfg['bias']}")


def report(human, record):
    print(human, flush=True)
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------
# bench


def bench_run(cfg, rt, b, iters, warmup, compiled=True, quiet=False):
    """Builds the model and optimizer for batch size b and times iters steps after warmup,
    each of gradient_accumulation_steps micro-steps (loss scaled by their count, as nanoGPT
    trains) and one optimizer step.
    Returns (model, median seconds, first-step seconds, final loss, peak bytes or None)."""
    torch.manual_seed(cfg["seed"])
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    model = GPT(cfg).to(rt.device)
    model.train()
    run = rt.wrap(model) if compiled else model
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                    (cfg["beta1"], cfg["beta2"]), fused=rt.fused_adamw)
    t = cfg["block_size"]
    data = torch.randint(cfg["vocab_size"], (b, t + 1))
    x, y = data[:, :-1].contiguous().to(rt.device), data[:, 1:].contiguous().to(rt.device)
    times, first, lossf = [], None, None
    gas = cfg["gradient_accumulation_steps"]
    for i in range(warmup + iters):
        rt.sync()
        t0 = time.perf_counter()
        for _ in range(gas):
            with rt.autocast():
                _, loss = run(x, y)
                loss = loss / gas
            loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        rt.sync()
        lossf = loss.item() * gas
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
        if not quiet:
            log(f"  iter {i}{' (warmup)' if i < warmup else ''}: loss {lossf:.4f}, "
                f"{dt * 1e3:.1f} ms")
    peak = torch.cuda.max_memory_allocated(rt.device) if rt.cuda else None
    median = statistics.median(times) if times else None
    return model, median, first, lossf, peak


def release_memory():
    gc.collect()
    torch.cuda.empty_cache()


def auto_batch_size(cfg, rt):
    """Largest of AUTO_BATCH_SIZES for which two eager steps fit in GPU memory."""
    best = None
    for b in AUTO_BATCH_SIZES:
        try:
            _, _, _, _, peak = bench_run(cfg, rt, b, iters=0, warmup=2, compiled=False,
                                         quiet=True)
            log(f"batch_size=auto: batch {b} x {cfg['block_size']} fits "
                f"(peak {peak / 2**30:.2f} GiB allocated)")
            best = b
        except torch.OutOfMemoryError:
            log(f"batch_size=auto: batch {b} x {cfg['block_size']} is out of GPU memory")
            break
        finally:
            release_memory()
    if best is None:
        raise UsageError(f"--batch_size=auto: even batch size 1 at block_size "
                         f"{cfg['block_size']} does not fit in GPU memory; use a smaller model "
                         "or --block_size")
    log(f"batch_size=auto: using batch size {best}")
    return best


def cmd_bench(cfg):
    check_model_cfg(cfg)
    auto = cfg["batch_size"] == "auto"
    if cfg["iters"] < 1 or cfg["warmup"] < 0 or (not auto and cfg["batch_size"] < 1):
        raise UsageError("--iters and --batch_size must be at least 1, --warmup at least 0")
    if cfg["gradient_accumulation_steps"] < 1:
        raise UsageError(f"--gradient_accumulation_steps={cfg['gradient_accumulation_steps']}: "
                         "must be at least 1")
    if cfg["peak_flops"] < 0:
        raise UsageError(f"--peak_flops={cfg['peak_flops']}: must be positive (FLOP/s)")
    rt = Runtime(cfg)
    if auto and not rt.cuda:
        raise UsageError("--batch_size=auto searches GPU memory and needs --device=cuda; "
                         "give a number on the CPU")
    threads = set_threads(cfg)
    warmup = cfg["warmup"]
    if rt.compile and warmup == 0:
        warmup = 1
        log("--compile=True: the first step compiles, so it is run as a warmup step")
    peak_flops = peak_flops_for(rt, cfg)
    b = auto_batch_size(cfg, rt) if auto else cfg["batch_size"]
    t = cfg["block_size"]
    while True:
        log(f"bench: {model_desc(cfg)}, batch {b}, {rt.label()}, "
            f"sdpa {cfg['sdpa']}, fused AdamW {rt.fused_adamw}, {threads} threads")
        try:
            model, median, first, lossf, peak = bench_run(cfg, rt, b, cfg["iters"], warmup)
            break
        except torch.OutOfMemoryError as e:
            msg = first_line(e)
        release_memory()
        if auto and b > 1:
            log(f"batch {b} is out of GPU memory in the timed configuration; halving it")
            b //= 2
            continue
        raise UsageError(f"--batch_size={b}: out of GPU memory at block_size {t} ({msg}); "
                         "use a smaller --batch_size or --batch_size=auto")
    ms = median * 1e3
    gas = cfg["gradient_accumulation_steps"]
    tps = b * t * gas / median
    fpt = model.flops_per_token()
    gflops = fpt * tps / 1e9
    mfu = fpt * tps / peak_flops if peak_flops else None
    extra = ""
    if mfu is not None:
        extra += f", MFU {mfu * 100:.1f}% of {peak_flops / 1e12:.0f} TFLOP/s"
    if peak is not None:
        extra += f", peak memory {peak / 2**30:.2f} GiB"
    accum = f" x {gas} accumulated" if gas > 1 else ""
    report(f"{rt.label()} bench: {model_desc(cfg)}, batch {b}{accum}, {threads} threads: "
           f"median {ms:.2f} ms/iter, {tps:.0f} tokens/s, {gflops:.2f} GFLOP/s{extra}",
           {"ms_per_iter": ms, "tokens_per_s": tps, "gflops": gflops,
            "flops_per_token": fpt, "params": model.num_params(), "threads": threads,
            "iters": cfg["iters"], "final_loss": lossf, "batch_size": b, "block_size": t,
            "gradient_accumulation_steps": gas,
            **rt.record(), "sdpa": cfg["sdpa"], "mfu": mfu, "peak_flops": peak_flops,
            "peak_memory_bytes": peak, "first_iter_ms": first * 1e3})


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
    rt = Runtime(cfg)
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
        if rt.cuda:  # pinned memory and an asynchronous copy, as nanoGPT does
            return (x.pin_memory().to(rt.device, non_blocking=True),
                    y.pin_memory().to(rt.device, non_blocking=True))
        return x, y

    model = GPT(cfg).to(rt.device)
    run = rt.wrap(model)
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"],
                                    (cfg["beta1"], cfg["beta2"]), fused=rt.fused_adamw)
    gas = cfg["gradient_accumulation_steps"]
    tokens_per_iter = gas * b * bs
    log(f"train: {model_desc(cfg)}, {model.num_params() / 1e6:.2f}M params (no wpe), "
        f"{tokens_per_iter} tokens/iter, {rt.label()}, sdpa {cfg['sdpa']}, "
        f"fused AdamW {rt.fused_adamw}, {threads} threads")

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                x, y = get_batch(split)
                with rt.autocast():
                    losses[k] = run(x, y)[1].item()
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
            with rt.autocast():
                _, loss = run(x, y)
                loss = loss / gas
            x, y = get_batch("train")  # prefetch, as nanoGPT does
            loss.backward()
        if cfg["grad_clip"] != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        rt.sync()
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
    report(f"{rt.label()} train: {model_desc(cfg)}, {iter_num} steps, train loss "
           f"{losses['train']:.4f}, val loss {losses['val']:.4f}, {wall:.1f} s wall, "
           f"median {ms:.1f} ms/iter ({tps:.0f} tokens/s), {threads} threads",
           {"train_loss": losses["train"], "val_loss": losses["val"], "wall_s": wall,
            "steps": iter_num, "ms_per_iter": ms, "tokens_per_s": tps,
            "gflops": model.flops_per_token() * tps / 1e9, "threads": threads, "evals": evals,
            **rt.record(), "sdpa": cfg["sdpa"]})


# ----------------------------------------------------------------------------------------
# sample


def cmd_sample(cfg):
    check_model_cfg(cfg)
    if cfg["max_new_tokens"] < 1 or cfg["num_samples"] < 1 or cfg["temperature"] <= 0:
        raise UsageError("--max_new_tokens and --num_samples must be at least 1, "
                         "--temperature above 0")
    if not 0 <= cfg["start_token"] < cfg["vocab_size"]:
        raise UsageError(f"--start_token={cfg['start_token']}: must be below vocab_size")
    rt = Runtime(cfg)
    threads = set_threads(cfg)
    torch.manual_seed(cfg["seed"])
    model = GPT(cfg).to(rt.device)
    model.eval()
    log(f"sample: {model_desc(cfg)}, random weights, {rt.label()}, sdpa {cfg['sdpa']}, "
        f"{threads} threads")
    total, n = 0.0, 0
    for k in range(cfg["num_samples"]):
        idx = torch.tensor([[cfg["start_token"]]], dtype=torch.long, device=rt.device)
        rt.sync()
        t0 = time.perf_counter()
        with rt.autocast():
            out = model.generate(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"])
        rt.sync()
        total += time.perf_counter() - t0
        n += cfg["max_new_tokens"]
        log(f"sample {k}: {out[0, 1:].tolist()[:32]}{' ...' if cfg['max_new_tokens'] > 32 else ''}")
    tps = n / total
    report(f"{rt.label()} sample: {model_desc(cfg)}, {n} tokens in {total:.2f} s: "
           f"{tps:.1f} tokens/s, {threads} threads",
           {"tokens_per_s": tps, "ms_per_token": 1e3 / tps, "tokens": n, "threads": threads,
            **rt.record(), "sdpa": cfg["sdpa"]})


def main(argv):
    cfg = {}
    try:
        cmd, cfg = parse_args(argv)
        {"bench": cmd_bench, "train": cmd_train, "sample": cmd_sample}[cmd](cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({first_line(e)}); use a smaller --batch_size, "
              "--block_size or model", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - only compiler failures get a one-line message
        if not (cfg.get("compile") and is_compile_error(e)):
            raise
        print(f"error: --compile=True: torch.compile failed ({type(e).__name__}: "
              f"{first_line(e)}); check that a working C++ compiler is on PATH (CPU) or that "
              "Triton matches this PyTorch (GPU), or use --compile=False", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
