#!/usr/bin/env bash
# gpu_check.sh: checks the CUDA engine on a GPU machine that has no Rust toolchain and no
# network, with binaries built elsewhere, and leaves every log under OUTDIR.
#
# 1. On the build machine (x86-64 Linux, same as the GPU machine), from the repository root:
#
#      scripts/gpu_check.sh --stage
#
#    which runs `cargo build --release --tests` and copies, stripped of debug info (the
#    debug builds are over 100 MB each), target/release/nanogpt and the newest
#    target/release/deps/cuda_engine-<hash> test binary to target/gpu-check/ as
#    `nanogpt` and `cuda_engine`. Carry target/gpu-check/ (about 21 MB) together with the
#    repository copy: the tests read tests/fixtures/ relative to the working directory.
#
# 2. On the GPU machine, from the repository root:
#
#      scripts/gpu_check.sh OUTDIR
#
#    Steps (each one runs even if an earlier one failed; exit codes go to OUTDIR/summary.txt):
#      doctor      nanogpt doctor --require-gpu --json      -> doctor.json, doctor.stderr
#      tests       cuda_engine --test-threads=1 --nocapture -> cuda_engine.log
#                  with NANOGPT_REQUIRE_GPU=1 (a skipped GPU test is a failure); covers
#                  float32 and bf16 (bf16_* tests: the bf16 engine against the CPU engine)
#      nccl        nccl --test-threads=1 --nocapture        -> nccl.log
#                  NCCL process group (1 rank; 2 ranks when 2+ GPUs), NANOGPT_REQUIRE_GPU=1,
#                  NANOGPT_BIN=<bin>/nanogpt for the tests that start processes
#      bench-small nanogpt bench, 6 layers x 384, T=256, B=32, float32 -> bench_small.log
#      bench-124m  nanogpt bench, gpt2 124M, T=1024, B=8, float32       -> bench_124m.log
#      bench-124m-bf16  the same in bf16 mixed precision            -> bench_124m_bf16.log
#      tests-decode cuda_decode (KV-cache decoding vs the CPU engine), like tests
#                                                               -> cuda_decode.log
#      sample-*    `nanogpt sample` speed with the KV cache: a gpt2-sized model (12 x 768,
#                  block_size 1024, character vocabulary) trained for 2 iterations on this
#                  repository's text, then 1 x 2000 and 8 x 1000 new tokens on cuda and
#                  1 x 200 on the CPU -> sample_*.log ("generated N tokens in S s (R tokens/s")
#    Compiled kernels are cached under OUTDIR/kernel-cache (XDG_CACHE_HOME).
#    The script exits 0 only when every step exited 0.
#
# NANOGPT_BIN_DIR overrides where the binaries are looked for (default target/gpu-check).
set -u

if [ "${1:-}" = "--stage" ]; then
    set -e
    cargo build --release --tests
    cargo build --release
    dest=target/gpu-check
    mkdir -p "$dest"
    test_bin=$(ls -t target/release/deps/cuda_engine-* | grep -v '\.d$' | head -n 1)
    strip --strip-debug -o "$dest/nanogpt" target/release/nanogpt
    strip --strip-debug -o "$dest/cuda_engine" "$test_bin"
    decode_bin=$(ls -t target/release/deps/cuda_decode-* | grep -v '\.d$' | head -n 1)
    strip --strip-debug -o "$dest/cuda_decode" "$decode_bin"
    nccl_bin=$(ls -t target/release/deps/nccl-* | grep -v '\.d$' | head -n 1)
    strip --strip-debug -o "$dest/nccl" "$nccl_bin"
    ls -la "$dest"
    echo "staged; carry $dest/ with the repository and run: scripts/gpu_check.sh OUTDIR"
    exit 0
fi

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR   (on the GPU machine)" >&2
    echo "       scripts/gpu_check.sh --stage  (on the build machine)" >&2
    exit 2
fi

out=$1
bin=${NANOGPT_BIN_DIR:-target/gpu-check}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
for f in "$bin/nanogpt" "$bin/cuda_engine" "$bin/cuda_decode" "$bin/nccl"; do
    if [ ! -x "$f" ]; then
        echo "missing $f: run scripts/gpu_check.sh --stage on the build machine and carry $bin/" | tee -a "$summary" >&2
        exit 2
    fi
done
export XDG_CACHE_HOME="$out/kernel-cache"
status=0

step() { # name, logfile, command...
    local name=$1 log=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name: $*" >&2
    timeout 420 "$@" > "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "$name rc=$rc ${dt}s log=$log" | tee -a "$summary" >&2
    [ $rc -eq 0 ] || status=1
}

{
    echo "host: $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
} > "$out/machine.txt"

step doctor "$out/doctor.stderr" sh -c "\"$bin/nanogpt\" doctor --require-gpu --json > \"$out/doctor.json\""
step tests "$out/cuda_engine.log" env NANOGPT_REQUIRE_GPU=1 "$bin/cuda_engine" --test-threads=1 --nocapture
step nccl "$out/nccl.log" env NANOGPT_REQUIRE_GPU=1 NANOGPT_BIN="$(cd "$bin" && pwd)/nanogpt" \
    "$bin/nccl" --test-threads=1 --nocapture
step bench-small "$out/bench_small.log" "$bin/nanogpt" bench --device=cuda --dtype=float32 \
    --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --vocab_size=65 \
    --iters=10 --warmup=2
step bench-124m "$out/bench_124m.log" "$bin/nanogpt" bench --device=cuda --dtype=float32 \
    --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --batch_size=8 --block_size=1024 \
    --iters=10 --warmup=2
step bench-124m-bf16 "$out/bench_124m_bf16.log" "$bin/nanogpt" bench --device=cuda --dtype=bfloat16 \
    --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --batch_size=8 --block_size=1024 \
    --iters=10 --warmup=2

step tests-decode "$out/cuda_decode.log" env NANOGPT_REQUIRE_GPU=1 "$bin/cuda_decode" --test-threads=1 --nocapture
cat README.md src/*.rs src/*/*.rs > "$out/sample_corpus.txt"
step sample-prepare "$out/sample_prepare.log" "$bin/nanogpt" prepare shakespeare_char \
    --input "$out/sample_corpus.txt" --out_dir "$out/sample-data"
step sample-train "$out/sample_train.log" "$bin/nanogpt" train --data_dir="$out/sample-data" \
    --out_dir="$out/sample-run" --device=cuda --dtype=float32 --n_layer=12 --n_head=12 \
    --n_embd=768 --block_size=1024 --batch_size=2 --gradient_accumulation_steps=1 --max_iters=2 \
    --eval_interval=2 --eval_iters=1 --log_interval=1 --always_save_checkpoint=True --dropout=0.0 \
    --warmup_iters=1 --lr_decay_iters=2
step sample-cuda-1x2000 "$out/sample_cuda_1x2000.log" "$bin/nanogpt" sample \
    --out_dir="$out/sample-run" --device=cuda --dtype=float32 --num_samples=1 \
    --max_new_tokens=2000 --seed=1
step sample-cuda-8x1000 "$out/sample_cuda_8x1000.log" "$bin/nanogpt" sample \
    --out_dir="$out/sample-run" --device=cuda --dtype=float32 --num_samples=8 \
    --max_new_tokens=1000 --seed=1
step sample-cpu-1x200 "$out/sample_cpu_1x200.log" "$bin/nanogpt" sample \
    --out_dir="$out/sample-run" --device=cpu --num_samples=1 --max_new_tokens=200 --seed=1
grep -h "tokens/s" "$out"/sample_c*.log >> "$summary" 2>/dev/null
rm -rf "$out/sample-run" "$out/sample-data" "$out/sample_corpus.txt" # the 1.5 GB checkpoint

echo "--- summary ($out/summary.txt)" >&2
cat "$summary" >&2
for f in cuda_engine.log cuda_decode.log nccl.log bench_small.log bench_124m.log bench_124m_bf16.log; do
    echo "--- tail of $f" >&2
    tail -n 25 "$out/$f" >&2
done
exit $status
