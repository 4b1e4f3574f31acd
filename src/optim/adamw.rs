//! AdamW and global-norm clipping over the flat parameter buffer, with exactly
//! torch.optim.AdamW's and torch.nn.utils.clip_grad_norm_'s arithmetic. This is the
//! reference implementation; the CPU engine runs it directly (rayon over fixed chunks,
//! deterministic).

use super::AdamWConfig;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// L2 norm of `grads`, summed per fixed chunk in f64 then in order (deterministic).
pub fn grad_norm(grads: &[f32]) -> f32 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt() as f32
}

/// clip_grad_norm_: scales grads by min(1, max_norm / (norm + 1e-6)); returns the norm
/// before clipping. `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            grads
                .par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
        }
    }
    norm
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
}
