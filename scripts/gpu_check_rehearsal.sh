#!/usr/bin/env bash
# gpu_check_rehearsal.sh: runs scripts/gpu_check.sh on a machine without a GPU, on the CPU
# emulation of the CUDA stack (tools/gpu_emulate, as scripts/emulated_gpu_tests.sh uses it),
# with every model of its benchmarks and samples shrunk to one small layer so that the
# emulator finishes them. What it checks is the script: that each step's binary exists and
# accepts its flags, that the steps that depend on each other (prepare, train, sample) find
# what the one before wrote, and that the summary and logs come out, so that a short GPU
# session is not spent on a typo. It measures nothing.
#
# Left out (GPU_CHECK_SKIP): doctor (its GEMM and copy ceilings take minutes emulated),
# flash-timing (times attention kernels at GPT-2 124M's shape), torch-ref-124m and
# torch-ref-124m-accum8 (need PyTorch with CUDA). GPU_CHECK_ONLY and further GPU_CHECK_SKIP
# names pass through.
#
# Usage, from the repository root, after scripts/gpu_check.sh --stage:
#     scripts/gpu_check_rehearsal.sh OUTDIR        (about 6 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check_rehearsal.sh OUTDIR  (after scripts/gpu_check.sh --stage)" >&2
    exit 2
fi
out=$1
staged=$PWD/target/gpu-check
if [ ! -x "$staged/nanogpt" ]; then
    echo "no staged binaries in $staged: run scripts/gpu_check.sh --stage first" >&2
    exit 2
fi
emu=$(tools/gpu_emulate/build.sh "$PWD/target/gpu_emulate")

# A binary directory for gpu_check.sh: the staged test binaries as they are, and a nanogpt
# that passes its arguments on with the model sizes, batch sizes and lengths made small.
bin=$PWD/target/gpu-check-rehearsal
rm -rf "$bin"
mkdir -p "$bin"
for f in "$staged"/*; do
    [ "$(basename "$f")" = nanogpt ] || ln -s "$f" "$bin/$(basename "$f")"
done
# A run on a prepared dataset keeps its vocabulary (GPT-2 BPE ids go up to 50256). A run on
# an emulated GPU of a set size (GPU_EMULATE_MEMORY_MIB: the tests of the out-of-memory
# messages) keeps every size, as its figures depend on them.
cat > "$bin/nanogpt" <<EOF
#!/usr/bin/env bash
[ -z "\${GPU_EMULATE_MEMORY_MIB:-}" ] || exec "$staged/nanogpt" "\$@"
args=()
data=
for a in "\$@"; do
    case "\$a" in --data_dir=*) data=1 ;; esac
done
for a in "\$@"; do
    case "\$a" in
        --vocab_size=50257) [ -n "\$data" ] || a=--vocab_size=251 ;;
        --vocab_size=*) [ -n "\$data" ] || a=--vocab_size=256 ;;
        --n_layer=*) a=--n_layer=1 ;;
        --n_head=*) a=--n_head=2 ;;
        --n_embd=*) a=--n_embd=64 ;;
        --block_size=*) a=--block_size=64 ;;
        --batch_size=*) a=--batch_size=1 ;;
        --batch_sizes=*) a=--batch_sizes=1,2 ;;
        --iters=*) a=--iters=1 ;;
        --warmup=*) a=--warmup=0 ;;
        --max_new_tokens=*) a=--max_new_tokens=20 ;;
    esac
    args+=("\$a")
done
exec "$staged/nanogpt" "\${args[@]}"
EOF
chmod +x "$bin/nanogpt"

export LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GPU_EMULATE_DEVICES=2
export GPU_CHECK_SKIP="doctor,flash-timing,torch-ref-124m,torch-ref-124m-accum8${GPU_CHECK_SKIP:+,$GPU_CHECK_SKIP}"
export GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-1800}
# The emulation runs the test binaries far slower than a GPU (cuda_engine: ~2.5 minutes).
export GPU_CHECK_LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-4}
rc=0
NANOGPT_BIN_DIR="$bin" scripts/gpu_check.sh "$out" || rc=$?
echo "rehearsal: scripts/gpu_check.sh exited $rc; summary in $out/summary.txt" >&2
exit $rc
