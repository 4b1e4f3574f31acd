//! Helpers of the GPU tests: whether a GPU is usable (without one a test prints "skipped:
//! no GPU (why)" and passes; NANOGPT_REQUIRE_GPU=1 makes that a failure), NCCL where a GPU
//! is, and a small CUDA engine.

use nanogpt::cuda::nccl::Nccl;
use nanogpt::dist::nccl;
use nanogpt::engine::cuda::{stack, CudaEngine, Precision};
use nanogpt::model::{GptConfig, ParamLayout};

/// True when no GPU is usable (see `stack::gpus_for_test`): the test `test` then returns.
pub fn no_gpu(test: &str) -> bool {
    stack::gpus_for_test(test).is_none()
}

/// The number of GPUs when one is usable (see `stack::gpus_for_test`).
pub fn gpu_count(test: &str) -> Option<usize> {
    stack::gpus_for_test(test).map(|g| g.len())
}

/// NCCL, which a machine with a GPU must have.
pub fn nccl_or_panic(test: &str) -> &'static Nccl {
    nccl::nccl().unwrap_or_else(|e| panic!("{test}: a GPU is present but NCCL is not: {e}"))
}

/// 2 layers, 2 heads, n_embd 32, block 16, vocabulary 50, biases, no dropout.
pub fn small_cfg() -> GptConfig {
    GptConfig::new(2, 2, 32, 16, 50, true, 0.0).unwrap()
}

/// A CUDA engine on GPU `device` over `cfg`'s GPT-2 initialisation (seed 3).
pub fn engine(cfg: &GptConfig, device: usize, precision: Precision) -> CudaEngine {
    let params = ParamLayout::new(cfg).init_params(cfg, 3);
    CudaEngine::with_precision(cfg.clone(), params, 3, device, precision)
        .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}) on GPU {device}: {e}"))
}
