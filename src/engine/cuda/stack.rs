//! The CUDA libraries the engine runs on, loaded once per process by the same discovery as
//! `nanogpt doctor` (absolute paths, never unloaded), and the question "is there a usable
//! GPU?" answered with a reason when there is not.

use crate::cuda::discover::{LibKind, SearchEnv, SearchPlan};
use crate::cuda::driver::{DeviceInfo, Driver, CUDA_ERROR_NO_DEVICE};
use crate::cuda::nvrtc::Nvrtc;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The loaded libraries. cuBLAS's GEMM entry points are loaded per engine from `cublas`.
pub struct Stack {
    pub driver: Driver,
    pub nvrtc: Nvrtc,
    /// Kept loaded so that libcublas resolves this libcublasLt (same order as the doctor).
    pub cublaslt: crate::cuda::cublaslt::CublasLt,
    pub cublas: PathBuf,
    pub gpus: Vec<DeviceInfo>,
}

static STACK: OnceLock<Result<Stack, String>> = OnceLock::new();

fn find(plan: &SearchPlan, kind: LibKind) -> Result<PathBuf, String> {
    plan.find(kind).found.map(|f| f.path).ok_or_else(|| {
        format!(
            "the CUDA library lib{}.so was not found; {} (run `nanogpt doctor` to see where it \
             was looked for)",
            kind.stem(),
            kind.advice()
        )
    })
}

fn load() -> Result<Stack, String> {
    let plan = SearchPlan::new(&SearchEnv::from_process());
    let with_advice = |kind: LibKind, e: crate::cuda::CudaError| {
        format!("{e}; {} (run `nanogpt doctor` for details)", kind.advice())
    };
    let driver = Driver::load(&find(&plan, LibKind::Driver)?)
        .map_err(|e| with_advice(LibKind::Driver, e))?;
    match driver.init() {
        0 => {}
        CUDA_ERROR_NO_DEVICE => {
            return Err(
                "the NVIDIA driver is installed but reports no GPU (cuInit: \
                        CUDA_ERROR_NO_DEVICE); check nvidia-smi and CUDA_VISIBLE_DEVICES"
                    .into(),
            )
        }
        code => {
            let e = driver.check(code, "cuInit").err().map(|e| e.to_string());
            return Err(format!(
                "the NVIDIA driver failed to initialise: {}; run `nanogpt doctor` for details",
                e.unwrap_or_default()
            ));
        }
    }
    let n = driver.device_count().map_err(|e| e.to_string())?;
    if n == 0 {
        return Err(
            "the NVIDIA driver reports no GPU; check nvidia-smi and CUDA_VISIBLE_DEVICES".into(),
        );
    }
    let gpus = (0..n)
        .map(|i| driver.device_info(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let nvrtc =
        Nvrtc::load(&find(&plan, LibKind::Nvrtc)?).map_err(|e| with_advice(LibKind::Nvrtc, e))?;
    let cublaslt = crate::cuda::cublaslt::CublasLt::load(&find(&plan, LibKind::CublasLt)?)
        .map_err(|e| with_advice(LibKind::CublasLt, e))?;
    let cublas = find(&plan, LibKind::Cublas)?;
    Ok(Stack {
        driver,
        nvrtc,
        cublaslt,
        cublas,
        gpus,
    })
}

/// The process's CUDA stack, or why it cannot be used (missing driver or library, no GPU),
/// with what to do about it.
pub fn stack() -> Result<&'static Stack, String> {
    STACK.get_or_init(load).as_ref().map_err(|e| e.clone())
}

/// The GPUs the engine can run on; `Err` says why there are none.
pub fn available_gpus() -> Result<&'static [DeviceInfo], String> {
    stack().map(|s| s.gpus.as_slice())
}

/// The gate of the GPU tests: the usable GPUs (the first one is announced), or `None` after
/// printing "skipped: no GPU" and why; with `NANOGPT_REQUIRE_GPU=1` a missing GPU is a
/// panic instead, so that a GPU machine never passes a test that did not run.
#[doc(hidden)]
pub fn gpus_for_test(test: &str) -> Option<&'static [DeviceInfo]> {
    match available_gpus() {
        Ok(g) => {
            eprintln!(
                "{test}: {} GPU(s), running on {} ({})",
                g.len(),
                g[0].name,
                g[0].sm_arch()
            );
            Some(g)
        }
        Err(why) => {
            if std::env::var("NANOGPT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: NANOGPT_REQUIRE_GPU=1 but no GPU is usable: {why}");
            }
            eprintln!("{test}: skipped: no GPU ({why})");
            None
        }
    }
}
