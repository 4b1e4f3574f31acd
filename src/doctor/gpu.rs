//! The GPU self-tests, run on every GPU: an NVRTC-compiled kernel (bf16 conversion and a
//! warp reduction, checked bit for bit), a cuBLASLt bf16 GEMM with fp32 accumulation
//! (checked on sampled elements, timed), a device-to-device copy (checked, timed) and a
//! 1-rank NCCL all-reduce; then one all-reduce across all GPUs when there are several.

use super::check::{self, GemmCheck};
use super::{Check, Loaded, Options, Status, DOCTOR_KERNEL, DOCTOR_KERNEL_NAME};
use crate::cuda::cublaslt::{CublasLt, CUDA_R_32F};
use crate::cuda::driver::{Context, DeviceInfo, Driver, Stream};
use crate::cuda::nccl::Nccl;
use crate::cuda::nvrtc::{Nvrtc, Target};
use crate::cuda::CudaError;
use std::ffi::c_void;
use std::time::Instant;

/// Elements of the kernel self-test.
const KERNEL_N: usize = 1 << 16;
const BLOCK: u32 = 256;
/// Floats per GPU in the all-reduce tests (64 MiB).
const ALLREDUCE_COUNT: usize = 16 << 20;
/// cuBLASLt workspace (what Hopper's fastest kernels ask for).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Runs every self-test on every GPU in `gpus`.
pub fn run_all(loaded: &Loaded, gpus: &[DeviceInfo], opts: &Options) -> Vec<Check> {
    let mut out = Vec::new();
    let Some(drv) = &loaded.driver else {
        return out;
    };
    for g in gpus {
        let i = g.index;
        let ctx = match drv.context(i) {
            Ok(c) => c,
            Err(e) => {
                out.push(
                    Check::new("context", Status::Failed, e.to_string())
                        .on_gpu(i)
                        .advice("check nvidia-smi for this GPU's state (compute mode, errors)"),
                );
                continue;
            }
        };
        let stream = match ctx.stream() {
            Ok(s) => s,
            Err(e) => {
                out.push(Check::new("stream", Status::Failed, e.to_string()).on_gpu(i));
                continue;
            }
        };
        out.push(match &loaded.nvrtc {
            Some(n) => kernel_check(n, &ctx, &stream, g).on_gpu(i),
            None => Check::new("kernel", Status::Skipped, "NVRTC not loaded").on_gpu(i),
        });
        out.push(match &loaded.cublaslt {
            Some(lt) => gemm_check(lt, &ctx, &stream, opts.gemm_size).on_gpu(i),
            None => Check::new("gemm", Status::Skipped, "cuBLASLt not loaded").on_gpu(i),
        });
        out.push(copy_check(&ctx, &stream, opts.copy_mib << 20).on_gpu(i));
        out.push(match &loaded.nccl {
            Some(n) => nccl_single_check(n, &ctx, &stream).on_gpu(i),
            None => Check::new("nccl 1-rank", Status::Skipped, "NCCL not loaded").on_gpu(i),
        });
    }
    if gpus.len() > 1 {
        out.push(match &loaded.nccl {
            Some(n) => nccl_all_check(drv, n, gpus),
            None => Check::new("nccl all GPUs", Status::Skipped, "NCCL not loaded"),
        });
    }
    out
}

/// The first differing element: (index, got, expected).
type Mismatch<T> = Option<(usize, T, T)>;
/// The first differing element on some GPU: (rank, index, got, expected).
type RankMismatch = Option<(usize, usize, f32, f32)>;

fn fail(name: &str, e: CudaError) -> Check {
    Check::new(name, Status::Failed, e.to_string())
}

/// Compiles `kernels/doctor.cu` for this GPU, runs it and compares with the CPU.
fn kernel_check(nvrtc: &Nvrtc, ctx: &Context, stream: &Stream, g: &DeviceInfo) -> Check {
    let name = "kernel";
    let cc = g.compute_capability.0 * 10 + g.compute_capability.1;
    let compiled = match nvrtc.compile(DOCTOR_KERNEL, DOCTOR_KERNEL_NAME, Target::Cubin { cc }, &[])
    {
        Ok(c) => c,
        Err(e) => {
            return fail(name, e).advice(format!(
                "NVRTC cannot compile for sm_{cc}: install an NVRTC that supports this GPU \
                 (pip install -U nvidia-cuda-nvrtc)"
            ))
        }
    };
    let module =
        match ctx.load_module(&compiled.image) {
            Ok(m) => m,
            Err(e) => return fail(name, e).advice(
                "the driver cannot load code from this NVRTC: update the NVIDIA driver, or use \
                 an NVRTC no newer than the driver's CUDA version",
            ),
        };
    let run = || -> Result<Result<(), String>, CudaError> {
        let f = module.function("doctor_selftest")?;
        let x = check::selftest_inputs(KERNEL_N, 0x5eed);
        let warps = KERNEL_N.div_ceil(32);
        let dx = ctx.upload(&x)?;
        let dbits = ctx.alloc(KERNEL_N * 2)?;
        let dsums = ctx.alloc(warps * 4)?;
        dbits.zero()?;
        dsums.zero()?;
        let (mut px, mut pb, mut ps, mut pn) = (dx.ptr, dbits.ptr, dsums.ptr, KERNEL_N as i32);
        let mut params: [*mut c_void; 4] = [
            &mut px as *mut u64 as *mut c_void,
            &mut pb as *mut u64 as *mut c_void,
            &mut ps as *mut u64 as *mut c_void,
            &mut pn as *mut i32 as *mut c_void,
        ];
        let grid = (KERNEL_N as u32).div_ceil(BLOCK);
        // SAFETY: the arguments match doctor_selftest(const float*, unsigned short*,
        // float*, int) and the buffers hold n, n and ceil(n/32) elements.
        unsafe { stream.launch(f, (grid, 1, 1), (BLOCK, 1, 1), 0, &mut params)? };
        stream.synchronize()?;
        let mut bits = vec![0u16; KERNEL_N];
        let mut sums = vec![0f32; warps];
        dbits.copy_to_host(&mut bits)?;
        dsums.copy_to_host(&mut sums)?;
        Ok(check::compare_selftest(&x, &bits, &sums))
    };
    match run() {
        Ok(Ok(())) => Check::new(
            name,
            Status::Ok,
            format!(
                "{DOCTOR_KERNEL_NAME} ({}) ran: bf16 conversion of {KERNEL_N} values and {} \
                 warp sums match the CPU bit for bit",
                compiled.target.describe(),
                KERNEL_N / 32
            ),
        ),
        Ok(Err(mismatch)) => Check::new(name, Status::Failed, mismatch).advice(
            "the GPU computed different results from the CPU reference: report this with the \
             GPU model and driver version",
        ),
        Err(e) => fail(name, e),
    }
}

/// bf16 `n x n x n` GEMM with fp32 accumulation: checked, then timed.
fn gemm_check(lt: &CublasLt, ctx: &Context, stream: &Stream, size: usize) -> Check {
    let name = "gemm";
    let (m, n, k) = (size, size, size);
    let run = || -> Result<(GemmCheck, f64), CudaError> {
        let x = check::random_bf16(m * k, 11);
        let w = check::random_bf16(n * k, 12);
        let dx = ctx.upload(&x)?;
        let dw = ctx.upload(&w)?;
        let dd = ctx.alloc(m * n * 4)?;
        let ws = ctx.alloc(WORKSPACE_BYTES)?;
        dd.zero()?;
        let plan = lt.plan_tn(m, n, k, CUDA_R_32F, WORKSPACE_BYTES)?;
        plan.run(dx.ptr, dw.ptr, dd.ptr, ws.ptr, stream)?;
        stream.synchronize()?;
        let mut d = vec![0f32; m * n];
        dd.copy_to_host(&mut d)?;
        let pts = check::gemm_sample_points(m, n, 13);
        let c = check::check_gemm(&x, &w, &d, (m, n, k), &pts);
        // Warm-up, then the timed run.
        for _ in 0..3 {
            plan.run(dx.ptr, dw.ptr, dd.ptr, ws.ptr, stream)?;
        }
        let iters = check::gemm_iters(m, n, k);
        let ms = stream.time(|| {
            for _ in 0..iters {
                plan.run(dx.ptr, dw.ptr, dd.ptr, ws.ptr, stream)?;
            }
            Ok(())
        })?;
        Ok((c, check::tflops(m, n, k, iters, ms)))
    };
    match run() {
        Ok((c, tf)) if c.ok() => Check::new(
            name,
            Status::Ok,
            format!(
                "cuBLASLt bf16 {m}x{n}x{k}, fp32 accumulate: {tf:.1} TFLOP/s; {} sampled \
                 elements match the CPU (worst error {:.1e} of sum|x*w|)",
                c.checked, c.worst_ratio
            ),
        )
        .measured(tf, "TFLOP/s"),
        Ok((c, _)) => Check::new(
            name,
            Status::Failed,
            format!(
                "wrong result: D[{}][{}] = {} but the CPU gives {} (error {:.1e} of sum|x*w|, \
                 tolerance {:.1e})",
                c.worst.0,
                c.worst.1,
                c.worst.2,
                c.worst.3,
                c.worst_ratio,
                check::GEMM_REL_TOL
            ),
        )
        .advice("report this with the GPU model, driver and cuBLASLt versions"),
        Err(e) => fail(name, e).advice(
            "cuBLASLt could not run a bf16 GEMM here: use a cuBLASLt built for this driver's \
             CUDA major version (pip install nvidia-cublas matching `nanogpt doctor`'s driver line)",
        ),
    }
}

/// Device-to-device copy of `bytes`: checked, then timed.
fn copy_check(ctx: &Context, stream: &Stream, bytes: usize) -> Check {
    let name = "copy";
    let words = bytes / 4;
    let run = || -> Result<(Mismatch<u32>, f64), CudaError> {
        let pattern = check::copy_pattern(words, 0x9e37_79b9);
        let src = ctx.upload(&pattern)?;
        let dst = ctx.alloc(words * 4)?;
        dst.zero()?;
        stream.copy_d2d(&dst, &src, words * 4)?;
        stream.synchronize()?;
        let mut back = vec![0u32; words];
        dst.copy_to_host(&mut back)?;
        let diff = check::first_difference(&back, &pattern);
        drop(back);
        stream.copy_d2d(&dst, &src, words * 4)?;
        let iters = 20;
        let ms = stream.time(|| {
            for _ in 0..iters {
                stream.copy_d2d(&dst, &src, words * 4)?;
            }
            Ok(())
        })?;
        Ok((diff, check::copy_gbps(words * 4, iters, ms)))
    };
    match run() {
        Ok((None, gbps)) => Check::new(
            name,
            Status::Ok,
            format!(
                "device-to-device copy of {} MiB: {gbps:.0} GB/s (read + write); contents verified",
                bytes >> 20
            ),
        )
        .measured(gbps, "GB/s"),
        Ok((Some((i, got, want)), _)) => Check::new(
            name,
            Status::Failed,
            format!("copied data differs at word {i}: {got:#x} instead of {want:#x}"),
        )
        .advice("the GPU memory or driver misbehaves: check nvidia-smi -q for ECC errors"),
        Err(e) => fail(name, e),
    }
}

/// A 1-rank all-reduce on the current GPU (the result must equal the input).
fn nccl_single_check(nccl: &Nccl, ctx: &Context, stream: &Stream) -> Check {
    let name = "nccl 1-rank";
    let run = || -> Result<(Mismatch<f32>, f64), CudaError> {
        let input = check::allreduce_input(ALLREDUCE_COUNT, 0);
        let send = ctx.upload(&input)?;
        let recv = ctx.alloc(ALLREDUCE_COUNT * 4)?;
        recv.zero()?;
        let t = Instant::now();
        let comm = nccl.comm_single()?;
        let init_ms = t.elapsed().as_secs_f64() * 1e3;
        let r = (|| {
            nccl.all_reduce_sum_f32(send.ptr, recv.ptr, ALLREDUCE_COUNT, &comm, stream)?;
            stream.synchronize()?;
            let mut out = vec![0f32; ALLREDUCE_COUNT];
            recv.copy_to_host(&mut out)?;
            Ok(check::first_difference(&out, &input))
        })();
        drop(comm);
        Ok((r?, init_ms))
    };
    match run() {
        Ok((None, init_ms)) => Check::new(
            name,
            Status::Ok,
            format!(
                "all-reduce of {} MiB on one rank returns its input (communicator set up in {init_ms:.0} ms)",
                (ALLREDUCE_COUNT * 4) >> 20
            ),
        ),
        Ok((Some((i, got, want)), _)) => Check::new(
            name,
            Status::Failed,
            format!("all-reduce result differs at {i}: {got} instead of {want}"),
        ),
        Err(e) => fail(name, e).advice(
            "NCCL could not run: set NCCL_DEBUG=INFO for details; use an NCCL built for this \
             CUDA major version (pip install nvidia-nccl-cu13)",
        ),
    }
}

/// One all-reduce across every local GPU (one communicator per GPU, this process).
fn nccl_all_check(drv: &Driver, nccl: &Nccl, gpus: &[DeviceInfo]) -> Check {
    let name = "nccl all GPUs";
    let ranks = gpus.len();
    let run = || -> Result<(RankMismatch, f64), CudaError> {
        let mut ctxs = Vec::new();
        let mut streams = Vec::new();
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for (r, g) in gpus.iter().enumerate() {
            let ctx = drv.context(g.index)?;
            sends.push(ctx.upload(&check::allreduce_input(ALLREDUCE_COUNT, r))?);
            let recv = ctx.alloc(ALLREDUCE_COUNT * 4)?;
            recv.zero()?;
            recvs.push(recv);
            streams.push(ctx.stream()?);
            ctxs.push(ctx);
        }
        let devs: Vec<i32> = gpus.iter().map(|g| g.index as i32).collect();
        let comms = nccl.comm_all(&devs)?;
        let once = || -> Result<(), CudaError> {
            nccl.group(|| {
                for r in 0..ranks {
                    ctxs[r].make_current()?;
                    nccl.all_reduce_sum_f32(
                        sends[r].ptr,
                        recvs[r].ptr,
                        ALLREDUCE_COUNT,
                        &comms[r],
                        &streams[r],
                    )?;
                }
                Ok(())
            })?;
            for r in 0..ranks {
                ctxs[r].make_current()?;
                streams[r].synchronize()?;
            }
            Ok(())
        };
        let result = (|| {
            once()?;
            let want = check::allreduce_expected(ALLREDUCE_COUNT, ranks);
            let mut out = vec![0f32; ALLREDUCE_COUNT];
            for r in 0..ranks {
                ctxs[r].make_current()?;
                recvs[r].copy_to_host(&mut out)?;
                if let Some((i, got, w)) = check::first_difference(&out, &want) {
                    return Ok((Some((r, i, got, w)), 0.0));
                }
            }
            let iters = 5;
            let t = Instant::now();
            for _ in 0..iters {
                once()?;
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            let bytes = (ALLREDUCE_COUNT * 4) as f64;
            let busbw = bytes * 2.0 * (ranks - 1) as f64 / ranks as f64 / s / 1e9;
            Ok((None, busbw))
        })();
        drop(comms);
        result
    };
    match run() {
        Ok((None, busbw)) => Check::new(
            name,
            Status::Ok,
            format!(
                "all-reduce of {} MiB across {ranks} GPUs is exact; bus bandwidth {busbw:.0} GB/s",
                (ALLREDUCE_COUNT * 4) >> 20
            ),
        )
        .measured(busbw, "GB/s"),
        Ok((Some((r, i, got, want)), _)) => Check::new(
            name,
            Status::Failed,
            format!("GPU {r}: all-reduce result differs at {i}: {got} instead of {want}"),
        )
        .advice("check the GPU links (nvidia-smi topo -m) and run with NCCL_DEBUG=INFO"),
        Err(e) => fail(name, e).advice(
            "NCCL could not join the local GPUs: run with NCCL_DEBUG=INFO; try NCCL_P2P_DISABLE=1 \
             to rule out peer-to-peer problems",
        ),
    }
}
