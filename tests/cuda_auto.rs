//! `device=auto` on a GPU machine: the CUDA engine passes its check against the CPU engine
//! (`engine::auto::self_check`) in fp32 and, on compute capability 8.0+, bf16, and
//! `engine::create` with `device=auto` then returns the CUDA engine. A failed check would
//! leave users on the CPU without an error, so on a GPU machine the check must pass.
//!
//! Without a GPU: `device=auto` builds the CPU engine, and the GPU tests print "skipped: no
//! GPU (why)" and pass; NANOGPT_REQUIRE_GPU=1 makes that a failure.

use nanogpt::config::{DeviceSpec, Dtype};
use nanogpt::engine::auto::{precision_for, self_check};
use nanogpt::engine::cuda::{stack, Precision};
use nanogpt::engine::{self, Batch};
use nanogpt::model::{GptConfig, ParamLayout};

fn small() -> (GptConfig, Vec<f32>) {
    let cfg = GptConfig::new(2, 2, 32, 16, 50, true, 0.0).unwrap();
    let params = ParamLayout::new(&cfg).init_params(&cfg, 7);
    (cfg, params)
}

#[test]
fn the_cuda_engine_passes_the_auto_check_in_both_precisions() {
    let Some(gpus) = stack::gpus_for_test("cuda_auto") else {
        return;
    };
    self_check(0, Precision::F32).unwrap_or_else(|why| panic!("fp32 check failed: {why}"));
    let (p, note) = precision_for(Dtype::BFloat16, gpus[0].compute_capability);
    if p == Precision::Bf16 {
        self_check(0, p).unwrap_or_else(|why| panic!("bf16 check failed: {why}"));
    } else {
        eprintln!("bf16 check not run: {}", note.unwrap_or_default());
    }
}

#[test]
fn device_auto_uses_the_gpu_when_present_and_the_cpu_otherwise() {
    let (cfg, params) = small();
    let mut eng = engine::create(DeviceSpec::Auto, Dtype::Float32, cfg, params, 1, 1).unwrap();
    let name = eng.device_name();
    let on_gpu = eng.device_grads().is_some();
    match stack::gpus_for_test("cuda_auto") {
        Some(gpus) => assert!(
            on_gpu && name.contains(gpus[0].name.trim()),
            "device=auto chose {name} on a machine with {}",
            gpus[0].name
        ),
        None => assert!(
            !on_gpu && name.starts_with("cpu"),
            "device=auto chose {name}"
        ),
    }
    // Whatever it chose computes: a finite loss near ln(50) for an untrained model.
    let inputs: Vec<u32> = (0..32).map(|i| i % 50).collect();
    let targets: Vec<i32> = (0..32).map(|i| (i * 7 + 3) % 50).collect();
    let loss = eng
        .loss(Batch {
            inputs: &inputs,
            targets: &targets,
            b: 2,
            t: 16,
        })
        .unwrap();
    assert!((loss - 50f32.ln()).abs() < 0.5, "loss {loss}");
}
