//! `nanogpt bench`: training-step throughput (forward + backward + AdamW) on synthetic
//! tokens, reported as the median over timed iterations after warm-up, with model FLOP/s
//! by nanoGPT's FLOPs-per-token formula (6N + 12*L*H*Q*T).

use crate::engine::{Batch, Engine};
use crate::optim::AdamWConfig;
use crate::rng::Rng;
use std::time::Instant;

/// What to run: the engine is built by the caller; this drives it.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub batch_size: usize,
    pub block_size: usize,
    pub grad_accum: usize,
    pub iters: usize,
    pub warmup: usize,
    pub learning_rate: f32,
    pub adamw: AdamWConfig,
    pub seed: u64,
}

/// Timings of one benchmark; `step_ms` holds every timed iteration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub tokens_per_iter: usize,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub flops_per_token: f64,
    pub step_ms: Vec<f64>,
    pub last_loss: f32,
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Runs `warmup + iters` training steps on random tokens and times the last `iters`.
pub fn run(
    engine: &mut dyn Engine,
    spec: &BenchSpec,
) -> Result<BenchResult, crate::engine::EngineError> {
    let (b, t) = (spec.batch_size, spec.block_size);
    let vocab = engine.config().vocab_size as u64;
    let mut rng = Rng::new(spec.seed);
    let tokens: Vec<u32> = (0..b * t + 1).map(|_| rng.below(vocab) as u32).collect();
    let inputs = &tokens[..b * t];
    let targets: Vec<i32> = tokens[1..].iter().map(|&x| x as i32).collect();
    let batch = Batch {
        inputs,
        targets: &targets,
        b,
        t,
    };
    let scale = 1.0 / spec.grad_accum as f32;
    let mut times = Vec::with_capacity(spec.iters);
    let mut last_loss = 0.0;
    for i in 0..spec.warmup + spec.iters {
        let start = Instant::now();
        engine.zero_grad();
        for _ in 0..spec.grad_accum {
            last_loss = engine.forward_backward(batch, scale)?;
        }
        engine.step(&spec.adamw, spec.learning_rate);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i >= spec.warmup {
            times.push(ms);
        }
    }
    let tokens_per_iter = b * t * spec.grad_accum;
    let med = median(&times);
    let flops_per_token = engine.config().flops_per_token(t);
    let tokens_per_s = tokens_per_iter as f64 / (med / 1e3);
    Ok(BenchResult {
        median_ms: med,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        max_ms: times.iter().cloned().fold(0.0, f64::max),
        tokens_per_iter,
        tokens_per_s,
        gflops: flops_per_token * tokens_per_s / 1e9,
        flops_per_token,
        step_ms: times,
        last_loss,
    })
}

/// Times `out = a @ b` for n x n matrices with the CPU engine's matrix product on `threads`
/// threads; returns (median ms, GFLOP/s) over `iters` runs after one warm-up.
pub fn sgemm(n: usize, threads: usize, iters: usize) -> (f64, f64) {
    use crate::engine::cpu::matmul::{matmul, Op};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build();
    let run = || {
        let mut rng = Rng::new(1);
        let a: Vec<f32> = (0..n * n).map(|_| rng.next_f32() - 0.5).collect();
        let b: Vec<f32> = (0..n * n).map(|_| rng.next_f32() - 0.5).collect();
        let mut out = vec![0f32; n * n];
        let mut times = Vec::with_capacity(iters);
        for i in 0..=iters {
            let start = Instant::now();
            matmul(&mut out, &a, &b, n, n, n, Op::NN, false, threads.max(1));
            if i > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(&times);
        (ms, 2.0 * (n as f64).powi(3) / (ms / 1e3) / 1e9)
    };
    match pool {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    }
}
