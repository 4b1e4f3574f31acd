#!/usr/bin/env python3
"""nanoGPT's data/openwebtext/prepare.py, on local parquet/jsonl files, as a reference.

Runs the same steps as nanoGPT (Hugging Face datasets' train_test_split(test_size, seed=2357,
shuffle=True), test renamed val, tiktoken gpt2 encode_ordinary + <|endoftext|> per document,
concatenated into uint16 train.bin / val.bin) and prints the sha256 and token count of
each file, so that `nanogpt prepare` can be compared byte for byte.

Usage: python3 tools/nanogpt_prepare_reference.py parquet|json 'files*' OUT_DIR [--test_size 0.0005]
Needs: pip install datasets tiktoken numpy (+ the gpt2 ranks, see make_bpe_fixtures.py).
"""
import argparse
import glob
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from make_bpe_fixtures import find_ranks, gpt2_encoding  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("builder", choices=["parquet", "json"])
    ap.add_argument("files")
    ap.add_argument("out_dir")
    ap.add_argument("--test_size", type=float, default=0.0005)
    ap.add_argument("--column", default="text")
    ap.add_argument("--ranks")
    args = ap.parse_args()
    from datasets import load_dataset

    enc = gpt2_encoding(find_ranks(args.ranks))
    files = sorted(glob.glob(args.files))
    dataset = load_dataset(args.builder, data_files=files)
    split_dataset = dataset["train"].train_test_split(test_size=args.test_size, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = enc.encode_ordinary(example[args.column])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(process, remove_columns=dataset["train"].column_names, desc="tokenizing")
    os.makedirs(args.out_dir, exist_ok=True)
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        filename = os.path.join(args.out_dir, f"{split}.bin")
        arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches = min(1024, len(dset))
        idx = 0
        for batch_idx in range(total_batches):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        with open(filename, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        print(f"{split}.bin {int(arr_len)} tokens sha256 {digest}")


if __name__ == "__main__":
    main()
