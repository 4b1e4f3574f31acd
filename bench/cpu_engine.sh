#!/usr/bin/env bash
# CPU training-step throughput, nanogpt vs the PyTorch eager reference, interleaved
# (A B A B) in one invocation, plus the sgemm ceiling. Usage: bench/cpu_engine.sh [threads] [rounds]
set -euo pipefail
threads=${1:-$(nproc)}
rounds=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/nanogpt
ref=$root/bench/torch_reference.py
declare -A cfg
cfg[a]="--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --vocab_size=50304 --iters=10 --warmup=2"
cfg[b]="--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=64 --vocab_size=65 --iters=5 --warmup=1"
cfg[c]="--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=1 --vocab_size=50304 --iters=4 --warmup=1"
for th in 1 $threads; do
  "$bin" bench --sgemm=2048 --threads="$th" --iters=5
  python3 -c "
import torch, time
torch.set_num_threads($th)
a = torch.randn(2048, 2048); b = torch.randn(2048, 2048); a @ b
ts = []
for _ in range(5):
    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
ts.sort(); print('torch sgemm 2048x2048x2048 on $th threads: %.1f GFLOP/s' % (2 * 2048**3 / ts[2] / 1e9))"
done
for name in a b c; do
  for r in $(seq "$rounds"); do
    pad=""; [ "$name" = b ] && pad="--pad_vocab=True"
    py=$(python3 "$ref" bench ${cfg[$name]} --bias=False --dropout=0 --threads="$threads" $pad 2>/dev/null | tail -1)
    rs=$("$bin" bench ${cfg[$name]} --bias=false --dropout=0 --threads="$threads" 2>/dev/null | tail -1)
    python3 -c "
import json, sys
py, rs = json.loads('''$py'''), json.loads('''$rs''')
print('($name) round $r: pytorch %.1f ms/iter %.0f tok/s %.1f GFLOP/s | nanogpt %.1f ms/iter %.0f tok/s %.1f GFLOP/s | speedup %.2fx' % (
    py['ms_per_iter'], py['tokens_per_s'], py['gflops'], rs['median_ms'], rs['tokens_per_s'], rs['gflops'], rs['tokens_per_s'] / py['tokens_per_s']))"
  done
done
