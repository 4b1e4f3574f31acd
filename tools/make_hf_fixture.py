#!/usr/bin/env python3
"""Hugging Face GPT-2 fixtures for tests/hf_interop.rs and tests/hub_client.rs.

Writes tests/fixtures/hf/:

  tiny_gpt2/            a tiny random GPT2LMHeadModel saved with save_pretrained
                        (config.json, model.safetensors, generation_config.json)
  expected.safetensors  its logits and loss on fixed tokens and a greedy continuation,
                        computed by transformers
  roundtrip.safetensors logits that transformers computes from our export of a checkpoint
                        (written by `cargo test --test hf_interop -- --ignored
                        write_roundtrip_export`), with the sha256 of the exported files

Runs offline (no downloads): the model is built from a GPT2Config. Needs torch,
safetensors and transformers (pip install transformers). Usage, from the repository root:

    python3 tools/make_hf_fixture.py
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")

# The tiny model: 2 layers, 4 heads, 32 channels, 32 positions, vocabulary 101.
N_LAYER, N_HEAD, N_EMBD, N_POSITIONS, VOCAB = 2, 4, 32, 32, 101
B, T = 2, 16  # logits / loss batch
PROMPT_LEN, NEW_TOKENS = 8, 20  # greedy continuation


def tiny_model():
    torch.manual_seed(1234)
    cfg = GPT2Config(
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=N_EMBD,
        n_positions=N_POSITIONS,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 is outside this vocabulary
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(cfg).eval()
    # Larger weights than GPT-2's init, so that logits spread out and greedy choices are
    # clear-cut (no near ties for float rounding to flip).
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name in ("wte.weight", "wpe.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def greedy(model, prompt):
    """Greedy continuation by hand (argmax of the full forward), checked against generate()."""
    seq = prompt.clone()
    margins = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(seq).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert torch.equal(gen, seq), (gen, seq)
    assert min(margins) > 1e-3, f"near tie in the greedy continuation: {min(margins)}"
    return seq[0, PROMPT_LEN:]


def write_tiny():
    model = tiny_model()
    d = os.path.join(OUT, "tiny_gpt2")
    model.save_pretrained(d)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        out = model(x)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        # transformers' own shifted loss on the full sequences agrees
        hf_loss = model(tokens, labels=tokens).loss
    assert abs(float(hf_loss) - float(loss)) < 1e-5, (float(hf_loss), float(loss))
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=g)
    cont = greedy(model, prompt)
    save_file(
        {
            "x": x.contiguous(),
            "y": y.contiguous(),
            "logits": logits.contiguous(),
            "loss": loss.reshape(1).float(),
            "prompt": prompt[0].contiguous(),
            "greedy": cont.contiguous(),
        },
        os.path.join(OUT, "expected.safetensors"),
        metadata={"note": "transformers logits/loss/greedy tokens of tiny_gpt2"},
    )
    print(f"tiny_gpt2: loss {float(loss):.6f}, greedy {cont.tolist()}")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_roundtrip():
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NANOGPT_ROUNDTRIP_DIR=tmp)
        subprocess.run(
            [
                "cargo", "test", "--release", "--test", "hf_interop", "--",
                "--ignored", "--exact", "write_roundtrip_export",
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
        with open(os.path.join(tmp, "export", "config.json")) as f:
            cfg = json.load(f)
        # from_pretrained must take every tensor and say nothing about the files
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        handler = Keep(level=logging.WARNING)
        hf_logging.get_logger().addHandler(handler)
        hf_logging.set_verbosity_warning()
        model, info = GPT2LMHeadModel.from_pretrained(
            os.path.join(tmp, "export"), output_loading_info=True
        )
        hf_logging.get_logger().removeHandler(handler)
        model.eval()
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(k), (k, info[k])
        assert not records, records
        vocab = cfg["vocab_size"]
        g = torch.Generator().manual_seed(11)
        x = torch.randint(0, vocab, (2, 12), generator=g)
        with torch.no_grad():
            logits = model(x).logits
        save_file(
            {"x": x.contiguous(), "logits": logits.contiguous()},
            os.path.join(OUT, "roundtrip.safetensors"),
            metadata={
                "model_sha256": sha256(os.path.join(tmp, "export", "model.safetensors")),
                "config_sha256": sha256(os.path.join(tmp, "export", "config.json")),
            },
        )
        print(f"roundtrip: vocab {vocab}, logits {tuple(logits.shape)}, no loading warnings")


def main():
    os.makedirs(OUT, exist_ok=True)
    write_tiny()
    if "--no-roundtrip" not in sys.argv:
        write_roundtrip()


if __name__ == "__main__":
    main()
