#!/bin/bash
# How long the other ranks of a 3-rank CPU job take to stop, with a message naming rank 1,
# after rank 1 is killed (KILL) or frozen (STOP), with dist_timeout=3.
# usage: tools/fault_timing.sh KILL|STOP DATA_DIR   (DATA_DIR: a prepared shakespeare_char)
set -u
sig=${1:?usage: tools/fault_timing.sh KILL|STOP DATA_DIR}
data=${2:?usage: tools/fault_timing.sh KILL|STOP DATA_DIR}
B=$(cd "$(dirname "$0")/.." && pwd)/target/release/nanogpt
port=$((24000 + RANDOM % 1000))
out=$(mktemp -d)
pids=()
for r in 0 1 2; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  $B train --data_dir="$data" --out_dir=$out/o --device=cpu --threads=1 \
    --n_layer=2 --n_head=2 --n_embd=32 --block_size=16 --batch_size=2 --gradient_accumulation_steps=6 \
    --max_iters=1000000 --eval_interval=1000000 --eval_iters=1 --dist_timeout=3 --log_interval=1 --backend=gloo \
    > $out/r$r.log 2>&1 &
  pids+=($!)
done
until grep -q "^iter 3:" $out/r0.log 2>/dev/null; do sleep 0.05; done
t0=$(date +%s.%N)
kill -$sig ${pids[1]}
wait ${pids[0]}; t_0=$(date +%s.%N)
wait ${pids[2]}; t_2=$(date +%s.%N)
kill -9 ${pids[1]} 2>/dev/null
printf "%s: rank0 exited after %.2f s, rank2 after %.2f s\n" $sig $(echo "$t_0 - $t0" | bc) $(echo "$t_2 - $t0" | bc)
grep -h "^error" $out/r0.log $out/r2.log
rm -rf "$out"
