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
#                  with NANOGPT_REQUIRE_GPU=1 (a skipped GPU test is a failure)
#      bench-small nanogpt bench, 6 layers x 384, T=256, B=32, float32 -> bench_small.log
#      bench-124m  nanogpt bench, gpt2 124M, T=1024, B=8, float32       -> bench_124m.log
#      flash       cuda_flash (fused attention vs float64 and the plain path, then its
#                  kernel timings with --ignored)                        -> cuda_flash.log
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
    flash_bin=$(ls -t target/release/deps/cuda_flash-* | grep -v '\.d$' | head -n 1)
    strip --strip-debug -o "$dest/cuda_flash" "$flash_bin"
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
for f in "$bin/nanogpt" "$bin/cuda_engine"; do
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
step bench-small "$out/bench_small.log" "$bin/nanogpt" bench --device=cuda --dtype=float32 \
    --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --vocab_size=65 \
    --iters=10 --warmup=2
step bench-124m "$out/bench_124m.log" "$bin/nanogpt" bench --device=cuda --dtype=float32 \
    --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --batch_size=8 --block_size=1024 \
    --iters=10 --warmup=2

if [ -x "$bin/cuda_flash" ]; then
    step flash "$out/cuda_flash.log" sh -c "NANOGPT_REQUIRE_GPU=1 \"$bin/cuda_flash\" --test-threads=1 --nocapture && \"$bin/cuda_flash\" --ignored --nocapture flash_attention_timing"
else
    echo "flash skipped: $bin/cuda_flash missing (re-run --stage)" | tee -a "$summary" >&2
fi

echo "--- summary ($out/summary.txt)" >&2
cat "$summary" >&2
for f in cuda_engine.log bench_small.log bench_124m.log cuda_flash.log; do
    echo "--- tail of $f" >&2
    tail -n 25 "$out/$f" >&2
done
exit $status
