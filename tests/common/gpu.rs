//! Helpers of the GPU tests: whether a GPU (or two) is usable (without one a test prints
//! "skipped: no GPU (why)" and passes; NANOGPT_REQUIRE_GPU=1 makes that a failure), NCCL
//! groups of one rank and of two ranks as threads, and a small CUDA engine.

use std::time::Duration;

use nanogpt::cuda::driver::Context;
use nanogpt::cuda::nccl::Nccl;
use nanogpt::dist::nccl::{self, NcclProcessGroup};
use nanogpt::dist::SingleProcess;
use nanogpt::engine::cuda::{stack, CudaEngine, Precision};
use nanogpt::model::{GptConfig, ParamLayout};

use super::dist::on_ring;

/// True when no GPU is usable (see `stack::gpus_for_test`): the test `test` then returns.
pub fn no_gpu(test: &str) -> bool {
    stack::gpus_for_test(test).is_none()
}

/// The number of GPUs when one is usable (see `stack::gpus_for_test`).
pub fn gpu_count(test: &str) -> Option<usize> {
    stack::gpus_for_test(test).map(|g| g.len())
}

/// True when 2 or more GPUs are usable; otherwise says why the test `test` is skipped.
pub fn two_gpus(test: &str) -> bool {
    let Some(n_gpus) = gpu_count(test) else {
        return false;
    };
    if n_gpus < 2 {
        eprintln!("{test}: skipped: needs 2 GPUs, this machine has {n_gpus}");
        return false;
    }
    true
}

/// NCCL, which a machine with a GPU must have.
pub fn nccl_or_panic(test: &str) -> &'static Nccl {
    nccl::nccl().unwrap_or_else(|e| panic!("{test}: a GPU is present but NCCL is not: {e}"))
}

/// A 1-rank NCCL group on GPU 0 (the CUDA context current on this thread).
pub fn one_rank_nccl(test: &str) -> NcclProcessGroup {
    let st = stack::stack().unwrap();
    NcclProcessGroup::new(
        Box::new(SingleProcess),
        nccl_or_panic(test),
        &st.driver,
        Duration::from_secs(30),
    )
    .unwrap()
}

/// Runs `f(rank, context on GPU rank, NCCL group)` on 2 threads, whose NCCL group has a
/// TCP ring on loopback for its host side; returns the results in rank order.
pub fn on_two_gpus<T: Send + 'static>(
    test: &str,
    f: impl Fn(usize, Context<'static>, NcclProcessGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let nccl = nccl_or_panic(test);
    let timeout = Duration::from_secs(60);
    on_ring(2, timeout, move |r, host| {
        let st = stack::stack().unwrap();
        let ctx = st.driver.context(r).unwrap();
        let pg = NcclProcessGroup::new(Box::new(host), nccl, &st.driver, timeout).unwrap();
        f(r, ctx, pg)
    })
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
