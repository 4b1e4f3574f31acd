#!/usr/bin/env python3
"""Writes tests/fixtures/bpe/: reference values for the GPT-2 BPE data pipeline.

- tokenizer.json: tricky strings and their ids from Python tiktoken's GPT-2 encoding
  (encode_ordinary, so "<|endoftext|>" inside text is ordinary text).
- corpus.jsonl + corpus_expected.json: a small synthetic corpus (generated here, no
  third-party text) and the sha256 / token counts of the train.bin and val.bin that
  nanoGPT's prepare.py steps (tools/nanogpt_prepare_reference.py, via Hugging Face
  datasets) write for it.
- permutation.json: numpy.random.default_rng(seed).permutation(n) for several n (full
  arrays for small n, sha256 of the little-endian uint32 array for large n, including
  OpenWebText's 8,013,769 documents), plus the train/test split that Hugging Face
  datasets' train_test_split(test_size=0.0005, seed=2357) makes (checked against the
  datasets library when it is installed).

Needs: pip install tiktoken numpy (and optionally datasets). tiktoken normally downloads its
ranks; offline, this script builds the encoding from a local copy of OpenAI's
gpt2.tiktoken ranks file, e.g. the one PyPI's openai-whisper ships
(`pip install --no-deps openai-whisper` -> whisper/assets/gpt2.tiktoken), found via
--ranks, $GPT2_TIKTOKEN, or the installed whisper package.

Usage: python3 tools/make_bpe_fixtures.py [--ranks PATH] [--out tests/fixtures/bpe]
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys

import numpy as np

# tiktoken's pattern for the gpt2 / r50k_base encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def find_ranks(explicit):
    candidates = [explicit, os.environ.get("GPT2_TIKTOKEN")]
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "assets", "gpt2.tiktoken"))
    for c in candidates:
        if c and os.path.exists(c):
            return c
    sys.exit("gpt2.tiktoken not found: pass --ranks PATH or `pip install --no-deps openai-whisper`")


def gpt2_encoding(ranks_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    with open(ranks_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        sys.exit(f"{ranks_path}: sha256 {digest} is not OpenAI's gpt2.tiktoken ({GPT2_RANKS_SHA256})")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(ranks_path),
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


def tricky_strings():
    s = [
        "",
        "Hello world",
        "Hello, world! How's it going? I'm fine; we'll see, they've, you're, I'd.",
        "SHOUTING'S 'TIS CAN'T WON'T 'S 'Ll 'LL",
        "'s's's 'ss ''s '''",
        "<|endoftext|>",
        "before<|endoftext|>after <|endoftext|> <|endoftext|>\n<|endoftext|><|endoftext|>",
        "<|endoftext",
        "  leading spaces",
        "trailing spaces   ",
        "a" + " " * 40 + "b",
        " " * 300,
        "\n" * 50 + "x" + "\n" * 3,
        "\t\t tabs\t and \r\n windows\r\nlines\r",
        "mixed \u00a0 non-breaking\u00a0space and \u3000 ideographic\u3000\u3000space",
        "\u2028line separator\u2029paragraph\u0085next line\u000b\u000c",
        "0123456789 12 345 6789 3.14159 1e-10 -42 +7 1,000,000 0x1F 2024-05-20",
        "9" * 500,
        "Ⅻ ½ ¾ ² ٣٤٥ ४५६ 一二三 ①②③",
        "naïve café résumé Ünïcödé — “quotes” ‘single’ «guillemets» …",
        "e\u0301 a\u0308 n\u0303 combining marks: \u0300\u0301\u0302",
        "Здравствуй, мир! Привет. Ελληνικά. עברית ‏RTL‏ العربية",
        "日本語のテキスト、中文文本。한국어 텍스트.",
        "emoji 🦀🐍 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ 🇺🇸🇩🇪 🦀🦀🦀🦀🦀🦀🦀🦀",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟘𝟙𝟚 astral letters and digits",
        "\ufffd replacement \ufeff BOM \u200b zero width \u200d joiner \ue000 private",
        "invalid-looking: \\xff\\xfe Ã©Ã¨ Ã¼ â€™ â€œ mojibake \x00\x01\x1f\x7f control",
        "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@```~~~|||\\\\\\///",
        "https://example.com/path?query=1&x=%20#frag user@example.org",
        "def f(x):\n    return x ** 2  # comment\n\n\tif x != 0: print('x')\n",
        "{\"json\": [1, 2.5, null, true], \"key\": \"value\"}",
        "HTML <div class=\"a\">text</div> &amp; &lt; &#x27;",
        "CamelCaseIdentifiersAndsnake_case_names_and-kebab-case",
        "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "ab" * 200,
        "=" * 257,
        " ?!" * 60,
        "  \n  \n\n   \t\n",
        "x \n y  \n\n z",
        "end with space ",
        " ",
        "\n",
        "a",
        "'",
    ]
    # A deterministic mix of all of the above pieces.
    rng = np.random.default_rng(20240520)
    atoms = ["the", " the", "'s", " ", "  ", "\n", "12", "é", "日本", "🦀", "!?", "<|endoftext|>",
             "\u00a0", "\u0301", "ABC", "'ll", "\t", "€", "٣", "x"]
    for k in range(20):
        idx = rng.integers(0, len(atoms), size=40 + 10 * k)
        s.append("".join(atoms[i] for i in idx))
    return s


def permutation_fixtures():
    small = {}
    for n in [1, 2, 3, 5, 10, 31, 100, 257, 1000]:
        small[str(n)] = np.random.default_rng(2357).permutation(n).tolist()
    other_seeds = {}
    for seed in [0, 1, 42, 2**32 - 1, 2**32, 2**63 + 5]:
        other_seeds[str(seed)] = np.random.default_rng(seed).permutation(50).tolist()
    hashes = {}
    for n in [4097, 65536, 100_003, 1_000_000, 8_013_769]:
        p = np.random.default_rng(2357).permutation(n).astype("<u4")
        hashes[str(n)] = {
            "sha256_u32le": hashlib.sha256(p.tobytes()).hexdigest(),
            "first": p[:8].tolist(),
            "last": p[-8:].tolist(),
        }
    n = 8_013_769
    n_test = math.ceil(0.0005 * n)
    split = {"n": n, "test_size": 0.0005, "seed": 2357, "n_test": n_test, "n_train": n - n_test}
    check_datasets_split()
    return {"seed": 2357, "small": small, "other_seeds_n50": other_seeds, "hashes": hashes,
            "openwebtext_split": split}


def check_datasets_split():
    """Confirms that datasets' train_test_split takes permutation[:n_test] as test."""
    try:
        import datasets
    except ImportError:
        print("datasets not installed: split semantics not cross-checked", file=sys.stderr)
        return
    n = 2003
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    sp = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    perm = np.random.default_rng(2357).permutation(n)
    n_test = math.ceil(0.0005 * n)
    assert sp["test"]["i"] == perm[:n_test].tolist(), "datasets test split differs"
    assert sp["train"]["i"] == perm[n_test:].tolist(), "datasets train split differs"
    print(f"datasets {datasets.__version__}: train_test_split semantics confirmed", file=sys.stderr)


def synthetic_corpus(n_docs=600):
    rng = np.random.default_rng(7)
    syll = ["ka", "to", "ri", "an", "the", "ing", "ed", "qu", "ix", "zo", "é", "ü", "日", "語", "Д", "ж"]
    punct = [".", ",", "!", "?", ";", " -", " (", ")", "'s", "'ll", " 🦀", " <|endoftext|>", " 42", " 3.14", "\n", "\n\n", "  "]
    docs = []
    for _ in range(n_docs):
        words = []
        for _ in range(int(rng.integers(1, 40))):
            w = "".join(syll[i] for i in rng.integers(0, len(syll), size=int(rng.integers(1, 4))))
            if rng.random() < 0.1:
                w = w.capitalize()
            words.append(w)
            if rng.random() < 0.2:
                words[-1] += punct[int(rng.integers(0, len(punct)))]
        docs.append(" ".join(words))
    return docs


def write_corpus(out_dir):
    import subprocess
    import tempfile

    path = os.path.join(out_dir, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(synthetic_corpus()):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    expected = {}
    for test_size in ["0.0005", "0.05"]:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(tmp, "cache"), HF_HUB_OFFLINE="1")
            out = subprocess.run(
                [sys.executable, os.path.join(os.path.dirname(__file__), "nanogpt_prepare_reference.py"),
                 "json", path, os.path.join(tmp, "out"), "--test_size", test_size],
                check=True, capture_output=True, text=True, env=env).stdout
        res = {}
        for line in out.splitlines():
            name, tokens, _, _, digest = line.split()
            res[name] = {"tokens": int(tokens), "sha256": digest}
        expected[test_size] = res
    with open(os.path.join(out_dir, "corpus_expected.json"), "w") as f:
        json.dump({"source": "tools/nanogpt_prepare_reference.py (nanoGPT prepare.py steps via datasets)",
                   "expected": expected}, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bpe"))
    args = ap.parse_args()
    enc = gpt2_encoding(find_ranks(args.ranks))
    cases = [{"text": t, "ids": enc.encode_ordinary(t)} for t in tricky_strings()]
    os.makedirs(args.out, exist_ok=True)
    import tiktoken
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump({"source": f"tiktoken {tiktoken.__version__} encode_ordinary, gpt2 ranks sha256 {GPT2_RANKS_SHA256}",
                   "cases": cases}, f, ensure_ascii=True, indent=0)
        f.write("\n")
    with open(os.path.join(args.out, "permutation.json"), "w") as f:
        json.dump({"source": f"numpy {np.__version__} default_rng(seed).permutation(n)", **permutation_fixtures()}, f)
        f.write("\n")
    write_corpus(args.out)
    print(f"wrote {len(cases)} tokenizer cases and permutation fixtures to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
