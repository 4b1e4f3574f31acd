#!/usr/bin/env bash
# kernel_cache_cold_start.sh: N processes (default 4, as the ranks of a node) start the CUDA
# engine at once on one empty kernel cache, and the wall time until all have run a one-layer
# bench step is printed with each process's "compiled ... kernel programs" line. Without a
# GPU it runs on the CUDA emulation (tools/gpu_emulate, built by scripts/emulated_gpu_tests.sh
# or tools/gpu_emulate/build.sh target/gpu_emulate); on a GPU machine set NANOGPT_BIN to the
# binary and EMULATE=0.
#
#     tools/kernel_cache_cold_start.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4}
bin=${NANOGPT_BIN:-$PWD/target/release/nanogpt}
if [ "${EMULATE:-1}" = 1 ]; then
    export LD_LIBRARY_PATH="$PWD/target/gpu_emulate${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s.%N)
for i in $(seq "$n"); do
    XDG_CACHE_HOME="$work/cache" "$bin" bench --device=cuda --dtype=bfloat16 --n_layer=1 \
        --n_head=2 --n_embd=64 --vocab_size=256 --block_size=64 --batch_size=1 --iters=1 \
        --warmup=0 > "$work/$i.log" 2>&1 &
done
wait
end=$(date +%s.%N)
echo "$n processes, one empty kernel cache: $(echo "$end - $start" | bc) s"
grep -h "kernel programs" "$work"/*.log || true
