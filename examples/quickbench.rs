use nanogpt::bench::*;
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::model::GptConfig;
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (l, h, c, t, b, th) = (a[0], a[1], a[2], a[3], a[4], a[5]);
    let cfg = GptConfig::new(l, h, c, t, 50257, false, 0.0).unwrap();
    let mut e = CpuEngine::from_seed(cfg, 1, th).unwrap();
    let spec = BenchSpec {
        batch_size: b,
        block_size: t,
        grad_accum: 1,
        iters: a.get(6).copied().unwrap_or(10),
        warmup: 2,
        learning_rate: 6e-4,
        adamw: Default::default(),
        seed: 1,
        tokens: None,
    };
    let r = run(&mut e, &spec).unwrap();
    println!(
        "{:.1} ms/iter {:.0} tok/s {:.1} GFLOP/s loss {}",
        r.median_ms, r.tokens_per_s, r.gflops, r.last_loss
    );
}
