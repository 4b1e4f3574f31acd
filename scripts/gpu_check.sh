#!/usr/bin/env bash
# gpu_check.sh: checks the CUDA engine on a GPU machine that has no Rust toolchain and no
# network, with binaries built elsewhere, and leaves every log under OUTDIR.
#
# 1. On the build machine (x86-64 Linux, same as the GPU machine), from the repository root:
#
#      scripts/gpu_check.sh --stage
#
#    which runs `cargo build --release --tests` and copies, stripped of debug info,
#    target/release/nanogpt and the newest cuda_engine, cuda_decode, cuda_flash,
#    cuda_switches, cuda_graphs, cuda_epilogues, cuda_profile, cuda_auto, cuda_recompute, cuda_overlap, zero and nccl test binaries (target/release/deps/<name>-<hash>) to
#    target/gpu-check/, and packs that directory into target/gpu-check.tar.gz (about 25 MB;
#    the stripped binaries themselves are over 60 MB). Carry either together with the
#    repository copy (the tests read tests/fixtures/ relative to the working directory):
#    when target/gpu-check/ is missing on the GPU machine, the script unpacks the archive.
#
# 2. On the GPU machine, from the repository root:
#
#      scripts/gpu_check.sh OUTDIR
#
#    Steps, most important first, each run even if an earlier one failed, within a total
#    time budget (GPU_CHECK_BUDGET, default 520 s); exit codes go to OUTDIR/summary.txt.
#    Test binaries run with NANOGPT_REQUIRE_GPU=1 (a skipped GPU test is a failure):
#      doctor          nanogpt doctor --require-gpu --json       -> doctor.json, doctor.stderr
#      first-start     a one-layer bench with the kernel cache empty: how long NVRTC takes
#                      to compile the engine's kernels on this machine's CPUs (its line
#                      "compiled N of N kernel programs ... in S s" goes to summary.txt)
#                                                                 -> first_start.log
#      tests           cuda_engine: fp32 and bf16 engines vs the PyTorch fixtures and the
#                      CPU engine; the same bits run to run and after a rebuild from saved
#                      state (resume)                             -> cuda_engine.log
#      auto            cuda_auto: device=auto's check of the CUDA engine against the CPU
#                      engine passes, and auto then picks the GPU -> cuda_auto.log
#      tests-decode    cuda_decode: KV-cache decoding vs the CPU engine -> cuda_decode.log
#      flash           cuda_flash: fused attention vs float64 and the plain path
#                                                                 -> cuda_flash.log
#      switches        cuda_switches: the engine with fused attention on vs off
#                      (NANOGPT_CUDA_DISABLE=flash), fp32 and bf16 -> cuda_switches.log
#      graphs          cuda_graphs: training micro-steps replayed as CUDA graphs give the
#                      same bits as launch by launch, fp32 and bf16 -> cuda_graphs.log
#      epilogues       cuda_epilogues: cuBLASLt epilogues vs float64, fused vs unfused
#                      bf16 engine, fused bf16 vs the CPU engine -> cuda_epilogues.log
#      recompute       cuda_recompute: recompute=1 and 2 vs 0 (fp32, bf16), bit-identical
#                      gradients and the memory report's savings -> cuda_recompute.log
#      nccl            nccl: the NCCL process group (1 rank; 2 when 2+ GPUs) -> nccl.log
#      overlap         cuda_overlap: the CUDA engine's gradient reports and a 1-rank NCCL
#                      reduction overlapped with the backward pass -> cuda_overlap.log
#      bench-124m-bf16 nanogpt bench, gpt2 124M, T=1024, B=8, bf16 -> bench_124m_bf16.log
#                      (summary.txt ends with its tokens/s next to the PyTorch reference)
#      torch-ref-124m  the PyTorch reference in the same invocation: bench/torch_reference.py,
#                      bf16 autocast, torch.compile, scaled_dot_product_attention, fused
#                      AdamW, same model and batch -> torch_ref_124m_bf16.log (last line JSON)
#      bench-profile   the same with --profile: per-operation table (Markdown) and roofline
#                      floors from the GEMM rate and copy bandwidth doctor measured, the
#                      time by part of the step and the bottleneck (its line goes to
#                      summary.txt) -> bench_profile_124m_bf16.log, profile_124m_bf16.json
#      prose           bench-profile again on GPT-2 BPE tokens of English prose (this
#                      repository's README.md and BENCHMARKS.md, prepared here): real text
#                      repeats tokens far more than the uniform random tokens above, and
#                      the token-embedding gradient's time depends on that (its
#                      embedding_backward_wte row against bench-profile's)
#                      -> prose_prepare.log, bench_profile_124m_bf16_prose.log,
#                         profile_124m_bf16_prose.json
#      flash-timing    attention kernel times at gpt2 124M's shape: fused vs plain, and the
#                      bf16-storage kernels per form (head size 64 or generic, cp.async or
#                      synchronous loads) in TFLOP/s -> cuda_flash_timing.log
#      bench-124m-bf16-v50257  bench-124m-bf16 with GPT-2's real vocabulary (50257, as
#                      `nanogpt train` on OpenWebText) -> bench_124m_bf16_v50257.log
#      bench-124m-bf16-accum8, torch-ref-124m-accum8  both again with 8 micro-steps per
#                      optimizer step (how nanoGPT and llm.c train; AdamW shared by 8)
#                      -> bench_124m_bf16_accum8.log, torch_ref_124m_bf16_accum8.log
#      tests-profile   cuda_profile: the profile and memory report of a small model
#                                                                 -> cuda_profile.log
#      bench-memory    gpt2 124M bf16 at B = 4, 8, 16, 32, 64 (T=1024): time and GPU memory
#                      per batch size (64 is llm.c's GPT-2 124M setting: AdamW's pass over
#                      the parameters shared by 8x the tokens of B = 8)
#                      -> bench_memory_124m_bf16.log
#      bench-memory-r2 B = 16, 32, 64 with --recompute=2 -> bench_memory_124m_bf16_r2.log
#      bench-acts-off  bench-124m-bf16 with NANOGPT_CUDA_DISABLE=bf16_acts (LayerNorm outputs
#                      and the logits and qkv gradients in fp32 with cast passes): what bf16
#                      activation storage is worth -> bench_124m_bf16_acts_off.log
#      bench-mlp-off   the same with NANOGPT_CUDA_DISABLE=bf16_mlp (the MLP's pre-activation,
#                      GELU output and gradient in fp32) -> bench_124m_bf16_mlp_off.log
#      bench-logits-off  the same with NANOGPT_CUDA_DISABLE=bf16_logits (fp32 logits)
#                      -> bench_124m_bf16_logits_off.log
#      bench-attn-off  the same with NANOGPT_CUDA_DISABLE=bf16_attn (q, k, v, the attention
#                      output and its gradient in fp32) -> bench_124m_bf16_attn_off.log
#      bench-dln-off   the same with NANOGPT_CUDA_DISABLE=bf16_dln (the LayerNorm outputs'
#                      gradients in fp32) -> bench_124m_bf16_dln_off.log
#      bench-fresh-off the same with NANOGPT_CUDA_DISABLE=fresh_grads (zero_grad zeroes the
#                      gradient buffer, every micro-step adds to it)
#                      -> bench_124m_bf16_fresh_off.log
#      bench-hs64-off  the same with NANOGPT_CUDA_DISABLE=flash_hs64 (the generic bf16
#                      attention kernels instead of the head-size-64 ones)
#                      -> bench_124m_bf16_hs64_off.log
#      bench-async-off the same with NANOGPT_CUDA_DISABLE=flash_async (the bf16 attention
#                      kernels' tiles loaded synchronously instead of by cp.async)
#                      -> bench_124m_bf16_async_off.log
#      bench-exp2-off  the same with NANOGPT_CUDA_DISABLE=flash_exp2 (the bf16 attention
#                      kernels' softmax with the accurate expf instead of base-2 ex2)
#                      -> bench_124m_bf16_exp2_off.log
#      bench-residual-off the same with NANOGPT_CUDA_DISABLE=fused_residual (the residual
#                      adds by the LayerNorm kernels instead of the projection products)
#                      -> bench_124m_bf16_residual_off.log
#      bench-124m      the same in float32                        -> bench_124m.log
#      bench-small     6 layers x 384, T=256, B=32, float32       -> bench_small.log
#      bench-small-bf16, bench-small-graphs-off, bench-124m-graphs-off: what CUDA graphs
#                      are worth: nanoGPT's Shakespeare model size (6 x 384, T=256, B=64,
#                      bf16) with and without them, and gpt2 124M bf16 without them
#                      -> bench_small_bf16.log, bench_small_bf16_graphs_off.log,
#                         bench_124m_bf16_graphs_off.log
#      sample-*        `nanogpt sample` speed with the KV cache: a gpt2-sized model (12 x 768,
#                      block 1024, character vocabulary) trained 2 iterations on this
#                      repository's text, then 1 x 2000 and 8 x 1000 new tokens on cuda and
#                      1 x 200 on the CPU -> sample_*.log ("generated N tokens ... tokens/s")
#    At the end, scripts/gpu_report.py gathers the results as Markdown for BENCHMARKS.md
#    (OUTDIR/report.md: throughput and MFU per run with its ratio to the default, the
#    PyTorch ratio, the profiles, memory, attention and sampling figures, failed steps).
#    Compiled kernels are cached under OUTDIR/kernel-cache (XDG_CACHE_HOME).
#    The script exits 0 only when every step it ran exited 0.
#
#    To rerun part of it (after a fix, with what is left of a GPU session's time):
#    GPU_CHECK_ONLY=tests,flash runs only the steps named (comma-separated, the names
#    above), GPU_CHECK_SKIP=doctor,torch-ref-124m runs all but those. Steps left out are
#    listed in summary.txt as "not selected" and do not fail the run. The sample-* steps go
#    together, selected by the name "sample", and prose-prepare with bench-profile-prose
#    by the name "prose".
#
# NANOGPT_BIN_DIR overrides where the binaries are looked for (default target/gpu-check);
# GPU_CHECK_LIMIT_SCALE (a whole number, default 1) multiplies every step's own limit (for
# the emulated rehearsal, scripts/gpu_check_rehearsal.sh; the total budget still holds).
set -u

# The test binaries staged and run (each a tests/<name>.rs).
test_binaries=(cuda_engine cuda_auto cuda_decode cuda_flash cuda_switches cuda_graphs
    cuda_epilogues cuda_recompute nccl cuda_overlap zero cuda_profile)

if [ "${1:-}" = "--stage" ]; then
    set -e
    cargo build --release --tests
    cargo build --release
    dest=target/gpu-check
    mkdir -p "$dest"
    strip --strip-debug -o "$dest/nanogpt" target/release/nanogpt
    for name in "${test_binaries[@]}"; do
        newest=$(ls -t target/release/deps/"$name"-* | grep -v '\.d$' | head -n 1)
        strip --strip-debug -o "$dest/$name" "$newest"
    done
    tar -C target -czf target/gpu-check.tar.gz.tmp gpu-check
    mv target/gpu-check.tar.gz.tmp target/gpu-check.tar.gz
    ls -la "$dest" target/gpu-check.tar.gz
    echo "staged; carry target/gpu-check.tar.gz (or $dest/) with the repository and run:" \
        "scripts/gpu_check.sh OUTDIR"
    exit 0
fi

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR   (on the GPU machine)" >&2
    echo "       scripts/gpu_check.sh --stage  (on the build machine)" >&2
    exit 2
fi

out=$1
bin=${NANOGPT_BIN_DIR:-target/gpu-check}
if [ -z "${NANOGPT_BIN_DIR:-}" ] && [ ! -x "$bin/nanogpt" ] && [ -f target/gpu-check.tar.gz ]; then
    tar -C target -xzf target/gpu-check.tar.gz
fi
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
for f in "$bin/nanogpt" "${test_binaries[@]/#/$bin/}"; do
    if [ ! -x "$f" ]; then
        echo "missing $f: run scripts/gpu_check.sh --stage on the build machine and carry $bin/" | tee -a "$summary" >&2
        exit 2
    fi
done
export XDG_CACHE_HOME="$out/kernel-cache"
status=0
# Steps run in order of importance within a total budget (GPU_CHECK_BUDGET seconds, default
# 520): a step gets at most its own limit and never more than what is left; steps past the
# budget are listed as skipped.
budget=${GPU_CHECK_BUDGET:-520}
limit_scale=${GPU_CHECK_LIMIT_SCALE:-1}
started=$(date +%s)

# Whether step $1 is selected by GPU_CHECK_ONLY / GPU_CHECK_SKIP (every name asked about is
# remembered, so that a name in those lists that matches no step is reported at the end).
known_steps=","
selected() {
    known_steps="$known_steps$1,"
    local only=",${GPU_CHECK_ONLY:-},"
    [ -z "${GPU_CHECK_ONLY:-}" ] || [[ $only == *",$1,"* ]] || return 1
    [[ ",${GPU_CHECK_SKIP:-}," != *",$1,"* ]]
}

step() { # name, limit seconds, logfile, command...
    local name=$1 limit=$(( $2 * limit_scale )) log=$3
    shift 3
    if [ -z "${in_group:-}" ] && ! selected "$name"; then
        echo "$name not selected (GPU_CHECK_ONLY / GPU_CHECK_SKIP)" >> "$summary"
        return
    fi
    local left=$(( budget - ($(date +%s) - started) ))
    if [ $left -lt 15 ]; then
        echo "$name skipped: time budget spent" | tee -a "$summary" >&2
        status=1
        return
    fi
    [ $limit -le $left ] || limit=$left
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >&2
    timeout "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "$name rc=$rc ${dt}s log=$log" | tee -a "$summary" >&2
    [ $rc -eq 0 ] || status=1
}

{
    echo "host: $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
} > "$out/machine.txt"

gpu_test() { # name, limit, binary, log
    step "$1" "$2" "$out/$4" env NANOGPT_REQUIRE_GPU=1 NANOGPT_BIN="$(cd "$bin" && pwd)/nanogpt" \
        "$bin/$3" --test-threads=1 --nocapture
}
bench() { # name, limit, log, dtype, model flags...
    local name=$1 limit=$2 log=$3 dtype=$4
    shift 4
    step "$name" "$limit" "$out/$log" "$bin/nanogpt" bench --device=cuda --dtype="$dtype" \
        --iters=10 --warmup=2 "$@"
}
bench_off() { # name, limit, log, switches to turn off (NANOGPT_CUDA_DISABLE), model flags...
    local name=$1 limit=$2 log=$3 off=$4
    shift 4
    step "$name" "$limit" "$out/$log" env NANOGPT_CUDA_DISABLE="$off" "$bin/nanogpt" bench \
        --device=cuda --dtype=bfloat16 --iters=10 --warmup=2 "$@"
}
torch_ref() { # name, limit, log, flags...: the PyTorch reference on gpt2 124M, bf16, B=8
    local name=$1 limit=$2 log=$3
    shift 3
    if ! command -v python3 > /dev/null; then
        selected "$name" || true # (a known step name all the same)
        echo "$name skipped: no python3" | tee -a "$summary" >&2
        return
    fi
    step "$name" "$limit" "$out/$log" python3 bench/torch_reference.py bench --device=cuda \
        --dtype=bfloat16 --compile=True --sdpa=True --fused_adamw=True --n_layer=12 --n_head=12 \
        --n_embd=768 --vocab_size=50304 --block_size=1024 --batch_size=8 "$@"
}
gpt2=(--n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --batch_size=8 --block_size=1024)

step doctor 90 "$out/doctor.stderr" sh -c "\"$bin/nanogpt\" doctor --require-gpu --json > \"$out/doctor.json\""
step first-start 60 "$out/first_start.log" "$bin/nanogpt" bench --device=cuda --dtype=bfloat16 \
    --n_layer=1 --n_head=2 --n_embd=128 --block_size=64 --batch_size=1 --vocab_size=256 \
    --iters=1 --warmup=0
grep -h "kernel programs" "$out/first_start.log" >> "$summary" 2>/dev/null
# The profiles' roofline floors from the GEMM rate and copy bandwidth doctor measured on this
# GPU (from the data sheet when doctor measured neither).
ceilings=()
if command -v python3 > /dev/null && [ -s "$out/doctor.json" ]; then
    read -r -a ceilings < <(python3 scripts/gpu_report.py --ceilings "$out" 2>/dev/null) || true
fi
echo "profile ceilings: ${ceilings[*]:-from the data sheet}" >> "$summary"
gpu_test tests 150 cuda_engine cuda_engine.log
gpu_test auto 45 cuda_auto cuda_auto.log
gpu_test tests-decode 90 cuda_decode cuda_decode.log
gpu_test flash 90 cuda_flash cuda_flash.log
gpu_test switches 45 cuda_switches cuda_switches.log
gpu_test graphs 45 cuda_graphs cuda_graphs.log
gpu_test epilogues 60 cuda_epilogues cuda_epilogues.log
gpu_test recompute 45 cuda_recompute cuda_recompute.log
gpu_test nccl 60 nccl nccl.log
gpu_test overlap 45 cuda_overlap cuda_overlap.log
gpu_test zero 45 zero zero.log
bench bench-124m-bf16 60 bench_124m_bf16.log bfloat16 "${gpt2[@]}"
torch_ref torch-ref-124m 150 torch_ref_124m_bf16.log --iters=10 --warmup=3
bench bench-profile 45 bench_profile_124m_bf16.log bfloat16 "${gpt2[@]}" --iters=3 --warmup=1 \
    --profile --profile_out="$out/profile_124m_bf16.json" ${ceilings[@]+"${ceilings[@]}"}
grep -h "^Bottleneck:" "$out/bench_profile_124m_bf16.log" >> "$summary" 2>/dev/null
# The same profile on real text's token frequencies (the two steps depend on each other:
# selected together, as "prose").
if selected prose; then
    in_group=1
    cat README.md BENCHMARKS.md > "$out/prose.txt"
    step prose-prepare 20 "$out/prose_prepare.log" "$bin/nanogpt" prepare text \
        --input "$out/prose.txt" --sample_by paragraph --out_dir "$out/prose-data"
    bench bench-profile-prose 45 bench_profile_124m_bf16_prose.log bfloat16 "${gpt2[@]}" \
        --iters=3 --warmup=1 --profile --profile_out="$out/profile_124m_bf16_prose.json" \
        --data_dir="$out/prose-data" ${ceilings[@]+"${ceilings[@]}"}
    grep -h "tokens from" "$out/bench_profile_124m_bf16_prose.log" >> "$summary" 2>/dev/null
    in_group=
else
    echo "prose not selected (GPU_CHECK_ONLY / GPU_CHECK_SKIP)" >> "$summary"
fi
# Attention kernel times and TFLOP/s per form (head size 64 or generic, cp.async or not).
step flash-timing 40 "$out/cuda_flash_timing.log" "$bin/cuda_flash" --ignored --nocapture flash_attention_timing
# GPT-2's real vocabulary (what `nanogpt train` uses on OpenWebText: 50257 real tokens, the
# embedding padded to 50304): the LM head's products over 50257 columns, rows padded to
# 50264 values, against the 50304 of the line above.
bench bench-124m-bf16-v50257 60 bench_124m_bf16_v50257.log bfloat16 --n_layer=12 --n_head=12 \
    --n_embd=768 --vocab_size=50257 --batch_size=8 --block_size=1024
# As nanoGPT trains: several micro-steps per optimizer step (its GPT-2 recipe accumulates 40
# on one GPU; llm.c's GPT-2 figures also accumulate to a 0.5M-token batch), so AdamW's pass
# over the parameters is shared by 8 micro-steps. Both engines, same model and batch.
bench bench-124m-bf16-accum8 60 bench_124m_bf16_accum8.log bfloat16 "${gpt2[@]}" \
    --gradient_accumulation_steps=8 --iters=5 --warmup=1
torch_ref torch-ref-124m-accum8 120 torch_ref_124m_bf16_accum8.log \
    --gradient_accumulation_steps=8 --iters=5 --warmup=2
gpu_test tests-profile 60 cuda_profile cuda_profile.log
bench bench-memory 75 bench_memory_124m_bf16.log bfloat16 "${gpt2[@]}" --iters=2 --warmup=1 \
    --batch_sizes=4,8,16,32,64
bench bench-memory-r2 60 bench_memory_124m_bf16_r2.log bfloat16 "${gpt2[@]}" --iters=2 --warmup=1 \
    --batch_sizes=16,32,64 --recompute=2
bench_off bench-acts-off 60 bench_124m_bf16_acts_off.log bf16_acts "${gpt2[@]}"
bench_off bench-mlp-off 60 bench_124m_bf16_mlp_off.log bf16_mlp "${gpt2[@]}"
bench_off bench-logits-off 60 bench_124m_bf16_logits_off.log bf16_logits "${gpt2[@]}"
bench_off bench-attn-off 60 bench_124m_bf16_attn_off.log bf16_attn "${gpt2[@]}"
bench_off bench-dln-off 60 bench_124m_bf16_dln_off.log bf16_dln "${gpt2[@]}"
bench_off bench-fresh-off 60 bench_124m_bf16_fresh_off.log fresh_grads "${gpt2[@]}"
bench_off bench-hs64-off 60 bench_124m_bf16_hs64_off.log flash_hs64 "${gpt2[@]}"
bench_off bench-async-off 60 bench_124m_bf16_async_off.log flash_async "${gpt2[@]}"
bench_off bench-exp2-off 60 bench_124m_bf16_exp2_off.log flash_exp2 "${gpt2[@]}"
bench_off bench-residual-off 60 bench_124m_bf16_residual_off.log fused_residual "${gpt2[@]}"
small=(--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=64 --vocab_size=65)
bench bench-small-bf16 30 bench_small_bf16.log bfloat16 "${small[@]}"
bench_off bench-small-graphs-off 30 bench_small_bf16_graphs_off.log graphs "${small[@]}"
bench_off bench-124m-graphs-off 60 bench_124m_bf16_graphs_off.log graphs "${gpt2[@]}"
bench bench-124m 60 bench_124m.log float32 "${gpt2[@]}"
bench bench-small 40 bench_small.log float32 --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 \
    --batch_size=32 --vocab_size=65
# The sample-* steps depend on each other: selected together, as "sample".
if selected sample; then
    in_group=1
    cat README.md src/*.rs src/*/*.rs > "$out/sample_corpus.txt"
    step sample-prepare 20 "$out/sample_prepare.log" "$bin/nanogpt" prepare shakespeare_char \
        --input "$out/sample_corpus.txt" --out_dir "$out/sample-data"
    step sample-train 60 "$out/sample_train.log" "$bin/nanogpt" train --data_dir="$out/sample-data" \
        --out_dir="$out/sample-run" --device=cuda --dtype=bfloat16 --n_layer=12 --n_head=12 \
        --n_embd=768 --block_size=1024 --batch_size=2 --gradient_accumulation_steps=1 --max_iters=2 \
        --eval_interval=2 --eval_iters=1 --log_interval=1 --always_save_checkpoint=True --dropout=0.0 \
        --warmup_iters=1 --lr_decay_iters=2
    step sample-cuda-1x2000 60 "$out/sample_cuda_1x2000.log" "$bin/nanogpt" sample \
        --out_dir="$out/sample-run" --device=cuda --dtype=float32 --num_samples=1 \
        --max_new_tokens=2000 --seed=1
    step sample-cuda-8x1000 60 "$out/sample_cuda_8x1000.log" "$bin/nanogpt" sample \
        --out_dir="$out/sample-run" --device=cuda --dtype=float32 --num_samples=8 \
        --max_new_tokens=1000 --seed=1
    step sample-cpu-1x200 40 "$out/sample_cpu_1x200.log" "$bin/nanogpt" sample \
        --out_dir="$out/sample-run" --device=cpu --num_samples=1 --max_new_tokens=200 --seed=1
    grep -h "tokens/s" "$out"/sample_c*.log >> "$summary" 2>/dev/null
    rm -rf "$out/sample-run" "$out/sample-data" "$out/sample_corpus.txt" # the 1.5 GB checkpoint
    in_group=
else
    echo "sample not selected (GPU_CHECK_ONLY / GPU_CHECK_SKIP)" >> "$summary"
fi

# A misspelt name in GPU_CHECK_ONLY / GPU_CHECK_SKIP would silently select nothing.
asked="${GPU_CHECK_ONLY:-},${GPU_CHECK_SKIP:-}"
for name in ${asked//,/ }; do
    if [[ $known_steps != *",$name,"* ]]; then
        echo "GPU_CHECK_ONLY / GPU_CHECK_SKIP: no step is called $name" | tee -a "$summary" >&2
        status=1
    fi
done

# Side by side: the last JSON line of our bf16 benches and of the PyTorch reference's.
if command -v python3 > /dev/null; then
    python3 - "$out" >> "$summary" 2>&1 <<'PY'
import json, os, sys
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(sys.argv[1], name)) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
for what, suffix in (("B=8", ""), ("B=8 x 8 accumulated", "_accum8")):
    ours = last_json(f"bench_124m_bf16{suffix}.log")
    ref = last_json(f"torch_ref_124m_bf16{suffix}.log")
    if ours and ref:
        print(f"gpt2 124M bf16 {what} T=1024: nanogpt {ours['tokens_per_s']:.0f} tok/s, "
              f"PyTorch+compile {ref['tokens_per_s']:.0f} tok/s, ratio "
              f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    else:
        print(f"side-by-side ({what}): a bench log has no JSON line (see the logs)")
PY
fi
echo "--- summary ($out/summary.txt)" >&2
cat "$summary" >&2
for f in cuda_engine.log cuda_auto.log cuda_decode.log cuda_flash.log cuda_switches.log cuda_graphs.log \
    cuda_epilogues.log cuda_recompute.log nccl.log cuda_overlap.log zero.log bench_124m_bf16.log torch_ref_124m_bf16.log \
    bench_profile_124m_bf16.log cuda_profile.log bench_memory_124m_bf16.log bench_memory_124m_bf16_r2.log \
    bench_124m.log cuda_flash_timing.log bench_small.log bench_small_bf16.log \
    bench_small_bf16_graphs_off.log bench_124m_bf16_graphs_off.log; do
    [ -f "$out/$f" ] || continue
    echo "--- tail of $f" >&2
    tail -n 25 "$out/$f" >&2
done
# Everything above as Markdown for BENCHMARKS.md.
if command -v python3 > /dev/null; then
    python3 scripts/gpu_report.py "$out" > "$out/report.md" ||
        echo "scripts/gpu_report.py failed; the logs are all there" >&2
    echo "--- Markdown report: $out/report.md" >&2
fi
exit $status
