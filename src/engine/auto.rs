//! `device=auto`: use this process's GPU when there is one and the CUDA engine proves itself
//! on it, else the CPU engine.
//!
//! Before a run trusts the GPU, a small model (2 layers, 2 heads, 64 channels, block 32,
//! vocabulary 96, batch 2) is run once through forward and backward on both the CPU
//! reference engine and the CUDA engine from the same parameters and tokens, and the loss
//! and every gradient are compared. Only when they agree (bounds below) does `auto` pick
//! the GPU; otherwise it says what disagreed and stays on the CPU, where results are known
//! to be right. `device=cuda` skips the check (the user asked for the GPU).
//!
//! The GPU is the local rank's under a launcher (torchrun's LOCAL_RANK, SLURM_LOCALID, ...)
//! and GPU 0 otherwise; `dtype=bfloat16` runs bf16 mixed precision where the GPU supports
//! it (compute capability 8.0+) and float32 on older GPUs, with a note.

use super::{cuda, Batch, Engine, Result};
use crate::config::Dtype;
use crate::model::{GptConfig, ParamLayout};

/// Agreement bounds between the CUDA and CPU engines on the check model: relative error of
/// the loss and relative L2 error of the whole gradient vector. The bf16 bounds are twice
/// the GPU tests' (which `tools/bf16_tolerance.py` derives from a model of bf16 rounding),
/// so rounding never fails the check, while a wrong kernel (errors of order 1) always does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub loss_rel: f64,
    pub grads_rel_l2: f64,
}

impl Bounds {
    pub fn for_precision(precision: cuda::Precision) -> Bounds {
        match precision {
            cuda::Precision::F32 => Bounds {
                loss_rel: 1e-4,
                grads_rel_l2: 1e-3,
            },
            cuda::Precision::Bf16 => Bounds {
                loss_rel: 4e-2,
                grads_rel_l2: 8e-2,
            },
        }
    }
}

/// One engine's answer on the check model.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutput {
    pub loss: f32,
    pub grads: Vec<f32>,
}

/// `Ok` when `gpu` agrees with the reference `cpu` within `bounds`, else what disagreed.
pub fn judge(
    cpu: &CheckOutput,
    gpu: &CheckOutput,
    bounds: Bounds,
) -> std::result::Result<(), String> {
    if !gpu.loss.is_finite() {
        return Err(format!(
            "loss is {} (CPU engine: {:.6})",
            gpu.loss, cpu.loss
        ));
    }
    if gpu.grads.len() != cpu.grads.len() {
        return Err(format!(
            "{} gradients instead of {}",
            gpu.grads.len(),
            cpu.grads.len()
        ));
    }
    if let Some(i) = gpu.grads.iter().position(|g| !g.is_finite()) {
        return Err(format!("gradient {i} is {}", gpu.grads[i]));
    }
    let loss_rel = ((gpu.loss - cpu.loss).abs() / cpu.loss.abs().max(1e-12)) as f64;
    if loss_rel > bounds.loss_rel {
        return Err(format!(
            "loss {:.6} vs the CPU engine's {:.6} (relative error {loss_rel:.2e}, bound {:.0e})",
            gpu.loss, cpu.loss, bounds.loss_rel
        ));
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&g, &c) in gpu.grads.iter().zip(&cpu.grads) {
        diff += (g as f64 - c as f64).powi(2);
        norm += (c as f64).powi(2);
    }
    let rel = (diff / norm.max(1e-300)).sqrt();
    if rel > bounds.grads_rel_l2 {
        return Err(format!(
            "gradients differ from the CPU engine's by {rel:.2e} (relative L2, bound {:.0e})",
            bounds.grads_rel_l2
        ));
    }
    Ok(())
}

/// The check model and its batch: a deterministic function of nothing.
fn check_case() -> (GptConfig, Vec<f32>, Vec<u32>, Vec<i32>) {
    let cfg =
        GptConfig::new(2, 2, 64, 32, 96, true, 0.0).expect("the self-check model's shape is valid");
    let params = ParamLayout::new(&cfg).init_params(&cfg, 1234);
    let n: u32 = 2 * 32;
    let inputs: Vec<u32> = (0..n).map(|i| (i * 37 + 11) % 96).collect();
    let targets: Vec<i32> = (0..n).map(|i| ((i * 53 + 5) % 96) as i32).collect();
    (cfg, params, inputs, targets)
}

fn run_check(engine: &mut dyn Engine, inputs: &[u32], targets: &[i32]) -> Result<CheckOutput> {
    engine.zero_grad();
    let batch = Batch {
        inputs,
        targets,
        b: 2,
        t: 32,
    };
    let loss = engine.forward_backward(batch, 1.0)?;
    Ok(CheckOutput {
        loss,
        grads: engine.grads(),
    })
}

/// Runs the check on GPU `index` in `precision`: `Ok` when the CUDA engine agrees with the
/// CPU engine, else why not (including any CUDA error on the way).
pub fn self_check(index: usize, precision: cuda::Precision) -> std::result::Result<(), String> {
    let (cfg, params, inputs, targets) = check_case();
    let mut cpu = super::cpu::CpuEngine::new(cfg.clone(), params.clone(), 1, 1)
        .map_err(|e| format!("CPU engine: {e}"))?;
    let reference =
        run_check(&mut cpu, &inputs, &targets).map_err(|e| format!("CPU engine: {e}"))?;
    // A CUDA failure inside a trait method without a Result panics with the CUDA error;
    // here that is an answer ("the GPU does not work"), not a crash.
    let gpu = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut eng = cuda::CudaEngine::with_precision(cfg, params, 1, index, precision)
            .map_err(|e| e.to_string())?;
        run_check(&mut eng, &inputs, &targets).map_err(|e| e.to_string())
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the CUDA engine stopped".into())
    })??;
    judge(&reference, &gpu, Bounds::for_precision(precision))
}

/// The precision `dtype` asks for on a GPU of `compute_capability`, and a note when it
/// differs from the request (fp16 is not available; bf16 needs 8.0+).
pub fn precision_for(
    dtype: Dtype,
    compute_capability: (u32, u32),
) -> (cuda::Precision, Option<String>) {
    match dtype {
        Dtype::Float32 => (cuda::Precision::F32, None),
        Dtype::BFloat16 if compute_capability.0 >= 8 => (cuda::Precision::Bf16, None),
        Dtype::BFloat16 => (
            cuda::Precision::F32,
            Some(format!(
                "dtype=bfloat16 needs compute capability 8.0 or newer (this GPU: {}.{}); using float32",
                compute_capability.0, compute_capability.1
            )),
        ),
        Dtype::Float16 => (
            cuda::Precision::F32,
            Some("dtype=float16 is not available in this build; using float32".into()),
        ),
    }
}

/// This process's GPU index on its node: the launcher's local rank, else 0.
fn local_rank() -> usize {
    crate::dist::env::detect(crate::dist::env::EnvChoice::Auto)
        .map(|info| info.local_rank)
        .unwrap_or(0)
}

/// What `device=auto` runs on: `Some((gpu index, precision))` for the CUDA engine, `None`
/// for the CPU engine. Says on stderr why a present GPU is not used.
pub fn choose(dtype: Dtype) -> Option<(usize, cuda::Precision)> {
    let gpus = cuda::stack::available_gpus().ok()?;
    let index = local_rank();
    let Some(gpu) = gpus.get(index) else {
        eprintln!(
            "device=auto: this process is local rank {index} but the node has {} GPU(s); using the CPU",
            gpus.len()
        );
        return None;
    };
    let (precision, note) = precision_for(dtype, gpu.compute_capability);
    if let Some(note) = note {
        eprintln!("device=auto: {note}");
    }
    let started = std::time::Instant::now();
    match self_check(index, precision) {
        Ok(()) => {
            eprintln!(
                "device=auto: using cuda:{index} ({}); the CUDA engine matched the CPU engine on a \
                 check model in {:.1} s",
                gpu.name,
                started.elapsed().as_secs_f64()
            );
            Some((index, precision))
        }
        Err(why) => {
            eprintln!(
                "device=auto: the CUDA engine on cuda:{index} ({}) failed its check against the \
                 CPU engine: {why}; using the CPU. device=cuda uses the GPU anyway; \
                 `nanogpt doctor` checks the GPU stack",
                gpu.name
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(loss: f32, grads: &[f32]) -> CheckOutput {
        CheckOutput {
            loss,
            grads: grads.to_vec(),
        }
    }

    #[test]
    fn agreement_within_bounds_passes_and_each_kind_of_disagreement_is_named() {
        let b = Bounds::for_precision(cuda::Precision::Bf16);
        let cpu = out(4.0, &[1.0, -2.0, 3.0]);
        assert_eq!(judge(&cpu, &out(4.01, &[1.01, -2.0, 2.99]), b), Ok(()));
        let e = judge(&cpu, &out(4.5, &[1.0, -2.0, 3.0]), b).unwrap_err();
        assert!(e.contains("loss 4.500000") && e.contains("4.000000"), "{e}");
        let e = judge(&cpu, &out(4.0, &[1.0, 2.0, 3.0]), b).unwrap_err();
        assert!(e.contains("gradients differ"), "{e}");
        let e = judge(&cpu, &out(f32::NAN, &[1.0, -2.0, 3.0]), b).unwrap_err();
        assert!(e.contains("loss is NaN"), "{e}");
        let e = judge(&cpu, &out(4.0, &[1.0, f32::INFINITY, 3.0]), b).unwrap_err();
        assert!(e.contains("gradient 1 is inf"), "{e}");
        let e = judge(&cpu, &out(4.0, &[1.0]), b).unwrap_err();
        assert!(e.contains("1 gradients instead of 3"), "{e}");
    }

    #[test]
    fn fp32_bounds_are_tighter_than_bf16() {
        let cpu = out(4.0, &[1.0, -2.0, 3.0]);
        let gpu = out(4.01, &[1.0, -2.0, 3.0]);
        assert!(judge(&cpu, &gpu, Bounds::for_precision(cuda::Precision::F32)).is_err());
        assert!(judge(&cpu, &gpu, Bounds::for_precision(cuda::Precision::Bf16)).is_ok());
    }

    #[test]
    fn precision_follows_dtype_and_the_gpu_generation() {
        assert_eq!(
            precision_for(Dtype::BFloat16, (9, 0)),
            (cuda::Precision::Bf16, None)
        );
        assert_eq!(
            precision_for(Dtype::Float32, (9, 0)),
            (cuda::Precision::F32, None)
        );
        let (p, note) = precision_for(Dtype::BFloat16, (7, 5));
        assert_eq!(p, cuda::Precision::F32);
        assert!(note.unwrap().contains("7.5"));
        let (p, note) = precision_for(Dtype::Float16, (9, 0));
        assert_eq!(p, cuda::Precision::F32);
        assert!(note.unwrap().contains("float16"));
    }

    #[test]
    fn the_check_case_runs_on_the_cpu_engine_and_is_deterministic() {
        let (cfg, params, inputs, targets) = check_case();
        let run = || {
            let mut e =
                crate::engine::cpu::CpuEngine::new(cfg.clone(), params.clone(), 1, 1).unwrap();
            run_check(&mut e, &inputs, &targets).unwrap()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        // An untrained 96-token model starts near ln(96) = 4.56.
        assert!((a.loss - 96f32.ln()).abs() < 0.3, "loss {}", a.loss);
        assert!(a.grads.iter().any(|&g| g != 0.0));
        assert!(judge(&a, &b, Bounds::for_precision(cuda::Precision::F32)).is_ok());
    }
}
