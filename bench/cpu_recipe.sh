#!/usr/bin/env bash
# nanoGPT's CPU recipe on tiny Shakespeare, nanogpt vs the PyTorch eager reference, in one
# invocation: wall time and final val loss of each, then sampling speed (500 new tokens).
# Usage: bench/cpu_recipe.sh path/to/tinyshakespeare.txt [threads]
set -euo pipefail
input=${1:?usage: bench/cpu_recipe.sh path/to/tinyshakespeare.txt [threads]}
threads=${2:-$(nproc)}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/nanogpt
work=$(mktemp -d)
cd "$work"
"$bin" prepare shakespeare_char --input "$input" --out_dir data/shakespeare_char >/dev/null 2>&1
recipe=(--eval_iters=20 --log_interval=100 --block_size=64 --batch_size=12
        --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0)
echo "== nanogpt train (threads=$threads)"
start=$(date +%s.%N)
"$bin" train "$root/configs/train_shakespeare_char.toml" --device=cpu --compile=False "${recipe[@]}" --threads="$threads" \
    --out_dir=out-rs 2>&1 | grep -E "^step|^done"
rs_s=$(echo "$(date +%s.%N) - $start" | bc)
python3 -c "
import json
for line in open('out-rs/metrics.jsonl'):
    r = json.loads(line)
    if r.get('kind') == 'train' and r['iter'] in (100, 1000, 2000):
        print('resident memory at iter %d: %.1f MB' % (r['iter'], r['rss_mb']))"
echo "== PyTorch eager train (threads=$threads)"
start=$(date +%s.%N)
python3 "$root/bench/torch_reference.py" train --data_dir=data/shakespeare_char --pad_vocab=True "${recipe[@]}" \
    --threads="$threads" 2>&1 | grep -E "^step|val loss|wall" | tail -12
py_s=$(echo "$(date +%s.%N) - $start" | bc)
printf 'wall seconds: nanogpt %.1f, pytorch %.1f, ratio (pytorch/nanogpt) %.2fx\n' "$rs_s" "$py_s" "$(echo "$py_s / $rs_s" | bc -l)"
echo "== sampling 500 new tokens"
"$bin" sample --out_dir=out-rs --num_samples=1 --max_new_tokens=500 --threads="$threads" --device=cpu 2>&1 >/dev/null | grep generated
python3 "$root/bench/torch_reference.py" sample --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 \
    --vocab_size=65 --pad_vocab=True --max_new_tokens=500 --num_samples=1 --threads="$threads" 2>&1 | tail -2 | head -1
rm -rf "$work"
