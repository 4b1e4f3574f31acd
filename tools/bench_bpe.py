#!/usr/bin/env python3
"""GPT-2 BPE data-preparation benchmark, side by side in one invocation:

1. tokenization, one core: Python tiktoken's encode_ordinary_batch(num_threads=1) against
   nanogpt's tokenizer (tests/prepare_bench.rs) on the same documents (blank-line
   separated paragraphs of the corpus);
2. the whole pipeline: `nanogpt prepare jsonl` on the corpus repeated --repeat times
   (MB/s of text, peak RSS), and a projection for OpenWebText (~38 GB of text... 9.04e9
   tokens) on 8 and 32 cores from the measured per-core rate.

Usage: python3 tools/bench_bpe.py [--corpus /work/shared/data/tinyshakespeare.txt] [--repeat 40]
Needs: pip install tiktoken numpy, the gpt2 ranks (see make_bpe_fixtures.py), a release build.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from make_bpe_fixtures import find_ranks, gpt2_encoding  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
OWT_TEXT_BYTES = 38e9  # OpenWebText: ~38 GB of text, 9.04e9 GPT-2 tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="/work/shared/data/tinyshakespeare.txt")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--ranks")
    args = ap.parse_args()
    text = open(args.corpus, encoding="utf-8").read()
    docs = text.split("\n\n")
    enc = gpt2_encoding(find_ranks(args.ranks))

    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        out = enc.encode_ordinary_batch(docs, num_threads=1)
        best = min(best, time.perf_counter() - t)
    py_tokens = sum(map(len, out))
    py_rate = py_tokens / best

    env = dict(os.environ, BPE_BENCH_CORPUS=os.path.abspath(args.corpus))
    res = subprocess.run(["cargo", "test", "--release", "--test", "prepare_bench", "--", "--ignored", "--nocapture"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    line = next(l for l in res.stdout.splitlines() if l.startswith("{"))
    ours = json.loads(line)
    assert ours["tokens"] == py_tokens, (ours["tokens"], py_tokens)

    # Whole pipeline on a larger jsonl corpus.
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for r in range(args.repeat):
                for i, d in enumerate(docs):
                    f.write(json.dumps({"text": f"{r} {d}"}) + "\n")
        size = os.path.getsize(corpus)
        exe = os.path.join(ROOT, "target", "release", "nanogpt")
        t = time.perf_counter()
        errf = open(os.path.join(tmp, "stderr.txt"), "w+")
        p = subprocess.Popen([exe, "prepare", "jsonl", "--input", corpus, "--out_dir", os.path.join(tmp, "out")],
                             stdout=subprocess.DEVNULL, stderr=errf)
        _, status, usage = os.wait4(p.pid, 0)  # resource usage of this child alone
        wall = time.perf_counter() - t
        errf.seek(0)
        stderr = errf.read()
        if status != 0:
            sys.exit(stderr)
        rss_mb = usage.ru_maxrss / 1024
        cores = os.cpu_count()
        tail = [l for l in stderr.splitlines() if "tokens" in l or "MB/s" in l]

    per_core_bps = size / wall / cores  # whole pipeline, per core
    result = {
        "corpus": args.corpus,
        "documents": len(docs),
        "tokens": py_tokens,
        "python_tiktoken_tokens_per_s_1core": round(py_rate),
        "nanogpt_tokens_per_s_1core": round(ours["tokens_per_s"]),
        "tiktoken_rs_tokens_per_s_1core": round(ours["tiktoken_rs_tokens_per_s"]),
        "speedup_vs_python_tiktoken": round(ours["tokens_per_s"] / py_rate, 2),
        "pipeline_corpus_MB": round(size / 1e6, 1),
        "pipeline_wall_s": round(wall, 2),
        "pipeline_MB_per_s": round(size / 1e6 / wall, 1),
        "pipeline_cores": cores,
        "pipeline_peak_rss_MB": round(rss_mb),
        "pipeline_report": tail,
        "owt_projection_hours_8_cores": round(OWT_TEXT_BYTES / (per_core_bps * 8) / 3600, 2),
        "owt_projection_hours_32_cores": round(OWT_TEXT_BYTES / (per_core_bps * 32) / 3600, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
