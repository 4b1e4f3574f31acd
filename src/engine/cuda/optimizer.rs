//! The CUDA engine's optimizer step: the global gradient norm (deterministic block sums),
//! clipping and AdamW over the flat buffers in one launch (`kernels/adamw.cu`), on the whole
//! layout or on one ZeRO-1 shard, and the AdamW moments' trips to and from the host.

use super::kernels::{grid_vec, Arg};
use super::{at, Buf, CResult, CudaEngine, NORM_PARTS};
use crate::cuda::CudaError;
use crate::optim::AdamWConfig;

impl CudaEngine {
    /// Clipping and AdamW over the whole layout's shard; returns the pre-clip global norm.
    pub(super) fn step_inner(&mut self, hp: &AdamWConfig, lr: f32) -> CResult<f32> {
        let norm = crate::optim::adamw::norm_from_sumsq(self.sumsq_inner(0..self.layout.total)?);
        self.step_shard_inner(hp, lr, norm)?;
        Ok(norm)
    }

    /// Sum of squares of `grads[range]`: `NORM_PARTS` block sums in f64, added in order on
    /// the host (deterministic for a given range).
    pub(super) fn sumsq_inner(&mut self, range: std::ops::Range<usize>) -> CResult<f64> {
        self.sync_grads()?;
        self.run(
            self.k.sumsq_parts,
            (NORM_PARTS as u32, 1, 1),
            &[
                Arg::Ptr(self.norm_parts.ptr),
                Arg::Ptr(at(self.grad_buf().ptr, range.start)),
                Arg::I64(range.len() as i64),
            ],
        )?;
        let mut parts = vec![0f64; NORM_PARTS];
        self.norm_parts.copy_to_host(&mut parts)?;
        Ok(parts.iter().sum::<f64>())
    }

    /// Clip for the global pre-clip `norm`, then AdamW over `opt_shard` (the moments hold
    /// exactly that range; parameter, gradient and bf16-copy pointers are offset to it).
    ///
    /// Enqueued, not waited for: the host goes on to the next micro-batch (its staging, row
    /// table and launches) while the GPU runs the update, and the next micro-step's kernels
    /// queue up behind it on the same stream, as do collectives given the engine's stream.
    /// Whatever reads a result on the host waits for the stream first (the loss, and
    /// `params`, `grads`, the moments through `download`).
    pub(super) fn step_shard_inner(&mut self, hp: &AdamWConfig, lr: f32, norm: f32) -> CResult<()> {
        self.sync_grads()?;
        let shard = self.opt_shard.clone();
        self.step += 1;
        if shard.is_empty() {
            return Ok(());
        }
        let clip = crate::optim::adamw::clip_coef(norm, hp.grad_clip).unwrap_or(1.0);
        let bc1 = 1.0 - (hp.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(self.step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (runs, n_runs) = self.adamw_runs(&shard)?;
        let (m, v) = self.moments_on_device()?;
        // One launch over the shard: clipping, weight decay where it applies, the update
        // and the bf16 copy (see kernels/adamw.cu). The clipped gradients are not written
        // back: the factor is kept instead ([`CudaEngine::sync_grads`] applies it if they
        // are read before the next `zero_grad`).
        self.grads_clip_pending = (clip != 1.0).then(|| (shard.clone(), clip));
        self.run(
            self.k.adamw_update,
            grid_vec(shard.len()),
            &[
                Arg::Ptr(at(self.params.ptr, shard.start)),
                Arg::Ptr(at(self.grad_buf().ptr, shard.start)),
                Arg::Ptr(m),
                Arg::Ptr(v),
                Arg::I64(shard.len() as i64),
                Arg::Ptr(runs),
                Arg::I32(n_runs as i32),
                Arg::F32(1.0 - lr * hp.weight_decay),
                Arg::F32(clip),
                Arg::F32(hp.beta1),
                Arg::F32(hp.beta2),
                Arg::F32(hp.eps),
                Arg::F32(step_size),
                Arg::F32(bc2_sqrt),
                Arg::Ptr(self.bf.as_ref().map_or(0, |bf| bf.param(shard.start))),
                Arg::I32(0),
            ],
        )
    }

    /// The device table of `shard`'s weight-decay runs for `adamw_update` (address, count),
    /// built on first use and again when the shard changes.
    pub(super) fn adamw_runs(&mut self, shard: &std::ops::Range<usize>) -> CResult<(u64, usize)> {
        if !matches!(&self.adamw_runs, Some((r, _, _)) if r == shard) {
            let table: Vec<i64> = crate::optim::adamw::runs_within(&self.runs, shard)
                .into_iter()
                .flat_map(|(off, _, decays)| [off as i64, decays as i64])
                .collect();
            let buf = self.ctx.upload(&table)?;
            self.adamw_runs = Some((shard.clone(), buf, table.len() / 2));
        }
        let (_, buf, n) = self.adamw_runs.as_ref().expect("built just above");
        Ok((buf.ptr, *n))
    }

    /// The moments of `opt_shard` on the host.
    pub(super) fn moments_to_host(&self) -> CResult<(Vec<f32>, Vec<f32>)> {
        let n = self.opt_shard.len();
        match &self.moments {
            Moments::Host(Some((m, v))) => Ok((m.clone(), v.clone())),
            Moments::Host(None) => Ok((vec![0f32; n], vec![0f32; n])),
            Moments::Device { m: dm, v: dv } => {
                self.ctx.make_current()?;
                self.stream.synchronize()?;
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                if n > 0 {
                    dm.copy_to_host(&mut m)?;
                    dv.copy_to_host(&mut v)?;
                }
                Ok((m, v))
            }
        }
    }

    /// Makes `m` and `v` the moments of `range`: on the device if they are there already
    /// (the old buffers freed first, so that the peak is the larger of the two), else kept
    /// on the host until [`CudaEngine::moments_on_device`].
    pub(super) fn set_moments(
        &mut self,
        range: std::ops::Range<usize>,
        m: Vec<f32>,
        v: Vec<f32>,
    ) -> CResult<()> {
        debug_assert!(m.len() == range.len() && v.len() == range.len());
        self.opt_shard = range;
        let on_device = matches!(self.moments, Moments::Device { .. });
        if on_device {
            self.ctx.make_current()?;
            self.stream.synchronize()?;
        }
        self.moments = Moments::Host(Some((m, v)));
        if on_device {
            self.moments_on_device()?;
        }
        Ok(())
    }

    /// The device addresses of the moments of `opt_shard`, allocated (and filled with
    /// what was set on the host, else zeros) on first use, after checking that they fit.
    pub(super) fn moments_on_device(&mut self) -> CResult<(u64, u64)> {
        if let Moments::Host(host) = &self.moments {
            self.ctx.make_current()?;
            let n = self.opt_shard.len();
            let bytes = 8 * n as u64;
            let params = self.layout.total;
            super::fit::Free::check(&self.name, self.ctx.mem_info(), bytes, |mem| {
                super::fit::moments_do_not_fit(mem, n, params, bytes)
            })
            .map_err(CudaError::Invalid)?;
            // The host copy stays until both are filled: a failure leaves the state as set.
            let (dm, dv) = (self.ctx.alloc(4 * n)?, self.ctx.alloc(4 * n)?);
            match host {
                _ if n == 0 => {}
                Some((m, v)) => {
                    dm.copy_from_host(m)?;
                    dv.copy_from_host(v)?;
                }
                None => {
                    dm.zero()?;
                    dv.zero()?;
                }
            }
            self.moments = Moments::Device { m: dm, v: dv };
        }
        match &self.moments {
            Moments::Device { m, v } => Ok((m.ptr, v.ptr)),
            Moments::Host(_) => unreachable!("moved to the device just above"),
        }
    }
}

/// AdamW's two moments over the engine's optimizer shard. They stay on the host (zeros
/// until a state is set) until the first training pass or step needs them on the GPU. A
/// ZeRO-1 rank learns its shard only after construction, and a resumed run sets the whole
/// model's state before it is narrowed to the shard, so allocating at construction would
/// need the whole model's moments on every rank; this way a rank only ever allocates its
/// shard's, and an engine that only samples allocates none.
pub(super) enum Moments {
    /// Not on the device yet; `None` is zeros.
    Host(Option<(Vec<f32>, Vec<f32>)>),
    /// On the device, for `opt_shard`.
    Device { m: Buf, v: Buf },
}

impl Moments {
    /// Device bytes held.
    pub(super) fn device_bytes(&self) -> usize {
        match self {
            Moments::Host(_) => 0,
            Moments::Device { m, v } => m.bytes + v.bytes,
        }
    }

    /// Device bytes still to be allocated for a shard of `n` parameters.
    pub(super) fn bytes_to_allocate(&self, n: usize) -> usize {
        match self {
            Moments::Host(_) => 8 * n,
            Moments::Device { .. } => 0,
        }
    }
}

/// The layout's weight-decay runs `(offset, len, decays)` with adjacent runs of the same kind
/// merged (GPT-2's alternate: weights decay, biases and LayerNorm parameters do not).
pub(super) fn merge_runs(runs: Vec<(usize, usize, bool)>) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (off, len, d) in runs {
        match out.last_mut() {
            Some(last) if last.2 == d && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, d)),
        }
    }
    out
}
