//! AdamW hyper-parameters and nanoGPT's learning-rate schedule.

pub mod adamw;

use serde::{Deserialize, Serialize};

/// torch.optim.AdamW settings plus global-norm clipping (`grad_clip <= 0` disables it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_clip: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// nanoGPT's schedule: linear warmup lr*(it+1)/(warmup_iters+1), cosine decay to `min_lr`
/// at `lr_decay_iters`, then `min_lr`. With `decay_lr == false` the rate is constant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub learning_rate: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub decay_lr: bool,
}

impl LrSchedule {
    pub fn lr_at(&self, it: u64) -> f64 {
        if !self.decay_lr {
            return self.learning_rate;
        }
        if it < self.warmup_iters {
            return self.learning_rate * (it + 1) as f64 / (self.warmup_iters + 1) as f64;
        }
        if it > self.lr_decay_iters {
            return self.min_lr;
        }
        let span = (self.lr_decay_iters - self.warmup_iters).max(1) as f64;
        let ratio = (it - self.warmup_iters) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.learning_rate - self.min_lr)
    }
}

/// The startup line on AdamW state memory: bytes per rank (fp32 first and second
/// moments, 8 bytes per parameter), and with ZeRO-1 the largest shard of `world`.
pub fn adamw_memory_line(total: usize, world: usize, zero: bool) -> String {
    let mib = |params: usize| (8 * params) as f64 / (1 << 20) as f64;
    if !zero {
        return format!(
            "AdamW state: {:.1} MiB per rank (moments of all {total} parameters)",
            mib(total)
        );
    }
    let largest = (0..world)
        .map(|r| crate::dist::shard_range(total, world, r).len())
        .max()
        .unwrap_or(total);
    format!(
        "AdamW state: {:.1} MiB per rank (zero_stage=1: moments of at most {largest} of the \
         {total} parameters on each of {world} ranks; {:.1} MiB unsharded)",
        mib(largest),
        mib(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_nanogpt() {
        let s = LrSchedule {
            learning_rate: 6e-4,
            min_lr: 6e-5,
            warmup_iters: 2000,
            lr_decay_iters: 600_000,
            decay_lr: true,
        };
        assert!((s.lr_at(0) - 6e-4 / 2001.0).abs() < 1e-15);
        assert!((s.lr_at(1999) - 6e-4 * 2000.0 / 2001.0).abs() < 1e-15);
        assert!((s.lr_at(2000) - 6e-4).abs() < 1e-15);
        assert!((s.lr_at(301_000) - (6e-5 + 0.5 * (6e-4 - 6e-5))).abs() < 1e-12);
        assert!((s.lr_at(600_000) - 6e-5).abs() < 1e-15);
        assert_eq!(s.lr_at(700_000), 6e-5);
        let flat = LrSchedule {
            decay_lr: false,
            ..s
        };
        assert_eq!(flat.lr_at(5), 6e-4);
    }
}
