//! AdamW and global-norm clipping over the flat parameter buffer, with exactly
//! torch.optim.AdamW's and torch.nn.utils.clip_grad_norm_'s arithmetic. This is the
//! reference implementation; the CPU engine runs it directly (rayon over fixed chunks,
//! deterministic). [`shard_step`] is the step of one ZeRO-1 shard, and with the whole
//! buffer as the shard the step of every engine's unsharded `step`.

use super::AdamWConfig;
use rayon::prelude::*;
use std::ops::Range;

const CHUNK: usize = 1 << 14;

/// Sum of squares of `grads` in f64, summed per fixed chunk then in order
/// (deterministic whatever the thread count).
pub fn grad_sumsq(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>()
}

/// The L2 norm from a sum of squares (as [`grad_norm`] rounds it).
pub fn norm_from_sumsq(sumsq: f64) -> f32 {
    sumsq.sqrt() as f32
}

/// L2 norm of `grads`, summed per fixed chunk in f64 then in order (deterministic).
pub fn grad_norm(grads: &[f32]) -> f32 {
    norm_from_sumsq(grad_sumsq(grads))
}

/// clip_grad_norm_'s factor for a pre-clip `norm`: `min(1, max_norm / (norm + 1e-6))`, or
/// `None` when nothing is scaled (`max_norm <= 0`, or a factor of 1).
pub fn clip_coef(norm: f32, max_norm: f32) -> Option<f32> {
    if max_norm <= 0.0 {
        return None;
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    (coef < 1.0).then_some(coef)
}

/// Scales `grads` as clip_grad_norm_ would for a pre-clip norm of `norm` (the norm of the
/// whole gradient, of which `grads` may be a part).
pub fn clip_to_norm(grads: &mut [f32], norm: f32, max_norm: f32) {
    if let Some(coef) = clip_coef(norm, max_norm) {
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
    }
}

/// clip_grad_norm_: scales grads by min(1, max_norm / (norm + 1e-6)); returns the norm
/// before clipping. `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    clip_to_norm(grads, norm, max_norm);
    norm
}

/// The parts of `runs` = (offset, len, decays) inside `range`, with offsets relative to
/// `range.start` (the weight-decay runs of one optimizer shard).
pub fn runs_within(
    runs: &[(usize, usize, bool)],
    range: &Range<usize>,
) -> Vec<(usize, usize, bool)> {
    runs.iter()
        .filter_map(|&(off, len, decays)| {
            let (a, b) = (off.max(range.start), (off + len).min(range.end));
            (a < b).then_some((a - range.start, b - a, decays))
        })
        .collect()
}

/// The moments of shard `new` from those of shard `old` (`buf`, `old.len()` values):
/// values in both shards are kept, the rest of `new` starts at zero.
pub fn reshard(buf: &[f32], old: &Range<usize>, new: &Range<usize>) -> Vec<f32> {
    let mut out = vec![0f32; new.len()];
    let (a, b) = (old.start.max(new.start), old.end.min(new.end));
    if a < b {
        out[a - new.start..b - new.start].copy_from_slice(&buf[a - old.start..b - old.start]);
    }
    out
}

/// The optimizer step of one shard (ZeRO-1) or of the whole buffer: clips
/// `grads[range]` for the global pre-clip `norm`, then runs AdamW over `params[range]`
/// with the shard's moments `m`, `v` (`range.len()` values each). `step` is the 1-based
/// step count after this update. Every element's arithmetic is the same whatever the
/// range, so sharded and unsharded training agree bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn shard_step(
    params: &mut [f32],
    grads: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    runs: &[(usize, usize, bool)],
    range: Range<usize>,
    norm: f32,
    hp: &AdamWConfig,
    lr: f32,
    step: u64,
) {
    assert!(
        m.len() == range.len() && v.len() == range.len(),
        "AdamW moments ({} and {} values) must cover the shard {range:?}",
        m.len(),
        v.len()
    );
    let grads = &mut grads[range.clone()];
    clip_to_norm(grads, norm, hp.grad_clip);
    let runs = runs_within(runs, &range);
    adamw_step(&mut params[range], grads, m, v, &runs, hp, lr, step);
}

/// One AdamW step (`step` is the 1-based step count after this update) over tensors
/// described by `runs` = (offset, len, decays).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    runs: &[(usize, usize, bool)],
    hp: &AdamWConfig,
    lr: f32,
    step: u64,
) {
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step as i32);
    let step_size = (lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    for &(off, len, decays) in runs {
        let decay = if decays {
            1.0 - lr * hp.weight_decay
        } else {
            1.0
        };
        let r = off..off + len;
        params[r.clone()]
            .par_chunks_mut(CHUNK)
            .zip(grads[r.clone()].par_chunks(CHUNK))
            .zip(m[r.clone()].par_chunks_mut(CHUNK))
            .zip(v[r].par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i];
                    p[i] *= decay;
                    m[i] += (gi - m[i]) * (1.0 - b1);
                    v[i] = v[i] * b2 + (1.0 - b2) * gi * gi;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_scales_only_above_threshold() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        let after = grad_norm(&g);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_decays_matrices_only() {
        // After one step with bias correction, m_hat/sqrt(v_hat) = sign(g): each parameter
        // moves by lr (minus eps effects), and decay multiplies by (1 - lr*wd) first.
        let hp = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut p = vec![1.0f32, 1.0, 1.0, 1.0];
        let g = vec![0.3f32, -2.0, 0.3, -2.0];
        let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 4]);
        adamw_step(
            &mut p,
            &g,
            &mut m,
            &mut v,
            &[(0, 2, true), (2, 2, false)],
            &hp,
            0.1,
            1,
        );
        let want = [0.95 - 0.1, 0.95 + 0.1, 1.0 - 0.1, 1.0 + 0.1];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn reshard_keeps_the_overlap() {
        let buf: Vec<f32> = (10..20).map(|x| x as f32).collect(); // shard 10..20
        assert_eq!(
            reshard(&buf, &(10..20), &(15..25))[..5],
            [15.0, 16.0, 17.0, 18.0, 19.0]
        );
        assert_eq!(reshard(&buf, &(10..20), &(15..25))[5..], [0.0; 5]);
        assert_eq!(reshard(&buf, &(10..20), &(0..3)), vec![0.0; 3]);
        assert_eq!(reshard(&buf, &(10..20), &(12..14)), vec![12.0, 13.0]);
    }

    #[test]
    fn runs_within_a_shard_are_clipped_and_relative() {
        let runs = [(0, 10, true), (10, 5, false), (15, 20, true)];
        assert_eq!(runs_within(&runs, &(0..35)), runs.to_vec());
        assert_eq!(
            runs_within(&runs, &(8..20)),
            vec![(0, 2, true), (2, 5, false), (7, 5, true)]
        );
        assert_eq!(runs_within(&runs, &(12..14)), vec![(0, 2, false)]);
        assert!(runs_within(&runs, &(5..5)).is_empty());
    }

    #[test]
    fn sharded_steps_equal_the_whole_step_bit_for_bit() {
        let hp = AdamWConfig {
            grad_clip: 0.5,
            ..Default::default()
        };
        let n = 100;
        let runs = [(0, 40, true), (40, 13, false), (53, 47, true)];
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g0: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos() * 0.2).collect();
        let (m0, v0): (Vec<f32>, Vec<f32>) = (
            (0..n).map(|i| i as f32 * 1e-3).collect(),
            (0..n).map(|i| i as f32 * 1e-5).collect(),
        );
        // Whole buffer: clip_grad_norm + adamw_step, as the engines did before sharding.
        let (mut p, mut g, mut m, mut v) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
        let norm = clip_grad_norm(&mut g, hp.grad_clip);
        assert!(norm > hp.grad_clip, "the test must clip");
        adamw_step(&mut p, &g, &mut m, &mut v, &runs, &hp, 0.01, 3);
        // Three shards, each with its own moments and the global norm from shard sums.
        let shards = [0..16, 16..64, 64..100];
        let sumsq: f64 = shards.iter().map(|r| grad_sumsq(&g0[r.clone()])).sum();
        let gnorm = norm_from_sumsq(sumsq);
        assert_eq!(gnorm.to_bits(), norm.to_bits());
        let (mut ps, mut gs) = (p0.clone(), g0.clone());
        for r in shards {
            let (mut ms, mut vs) = (m0[r.clone()].to_vec(), v0[r.clone()].to_vec());
            shard_step(
                &mut ps,
                &mut gs,
                &mut ms,
                &mut vs,
                &runs,
                r.clone(),
                gnorm,
                &hp,
                0.01,
                3,
            );
            assert_eq!(ms, m[r.clone()].to_vec());
            assert_eq!(vs, v[r].to_vec());
        }
        assert_eq!(ps, p);
        assert_eq!(gs, g);
    }
}
