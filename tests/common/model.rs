//! Parameters and batches the engine tests compare engines on, and bit-exact comparison.

use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::rng::Rng;

/// GPT-2 initialisation plus N(0, 0.1) noise (drawn from seed + 1), so that attention is far
/// from uniform, LayerNorm weights and biases are not trivial and logits spread out.
pub fn perturbed_params(cfg: &GptConfig, seed: u64) -> Vec<f32> {
    let mut p = ParamLayout::new(cfg).init_params(cfg, seed);
    let mut rng = Rng::new(seed + 1);
    p.iter_mut().for_each(|x| *x += (rng.normal() * 0.1) as f32);
    p
}

/// Random tokens and targets (drawn from seed + 2) for `b` rows of `t`, with two ignored
/// targets (the second and the last).
pub fn random_batch(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = Rng::new(seed + 2);
    let v = cfg.vocab_size as u64;
    let inputs = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|_| rng.below(v) as i32).collect();
    targets[1] = -1;
    targets[b * t - 1] = -1;
    (inputs, targets)
}

/// `n` inputs `(7 i + seed) % 50` and targets `(11 i + seed) % 50`: a batch for a model
/// with a vocabulary of 50 or more.
pub fn patterned_batch(n: usize, seed: usize) -> (Vec<u32>, Vec<i32>) {
    let inputs = (0..n).map(|i| ((i * 7 + seed) % 50) as u32).collect();
    let targets = (0..n).map(|i| ((i * 11 + seed) % 50) as i32).collect();
    (inputs, targets)
}

/// The first index where `a` and `b` differ in their bits, with both values.
pub fn first_diff(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}
