#!/usr/bin/env bash
# Tokens/s of `nanogpt train` on 1 rank versus 2 ranks (`nanogpt launch`) on this machine,
# same global batch (nanoGPT's CPU Shakespeare model, gradient_accumulation_steps=4).
# Prints the median tokens/s (all ranks counted) of iterations 3.. of each run.
# Usage: tools/bench_dist_scaling.sh [path/to/nanogpt]
set -euo pipefail
BIN=${1:-target/release/nanogpt}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat src/*.rs src/*/*.rs src/*/*/*.rs > "$WORK/corpus.txt"
"$BIN" prepare shakespeare_char --input "$WORK/corpus.txt" --out_dir "$WORK/data" 2>/dev/null
ARGS=(--data_dir="$WORK/data" --device=cpu --dtype=float32 --n_layer=4 --n_head=4 --n_embd=128
      --block_size=64 --batch_size=12 --gradient_accumulation_steps=4 --dropout=0.0
      --max_iters=15 --eval_interval=100000 --eval_iters=1 --log_interval=1
      --always_save_checkpoint=False)
median() {
  python3 -c "import json,sys,statistics; r=[json.loads(l) for l in open(sys.argv[1])]; \
print(round(statistics.median(x['tokens_per_s'] for x in r if x['kind']=='train' and x['iter']>=3)))" "$1"
}
"$BIN" train "${ARGS[@]}" --out_dir="$WORK/one_t1" --threads=1 --dist_env=none 2>/dev/null
"$BIN" train "${ARGS[@]}" --out_dir="$WORK/one_t2" --threads=2 --dist_env=none 2>/dev/null
"$BIN" launch --nproc_per_node=2 -- train "${ARGS[@]}" --out_dir="$WORK/two_t1" --threads=1 2>/dev/null
echo "1 rank, 1 thread:          $(median "$WORK/one_t1/metrics.jsonl") tokens/s"
echo "1 rank, 2 threads:         $(median "$WORK/one_t2/metrics.jsonl") tokens/s"
echo "2 ranks, 1 thread each:    $(median "$WORK/two_t1/metrics.jsonl") tokens/s"
