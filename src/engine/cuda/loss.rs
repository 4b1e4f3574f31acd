//! The CUDA engine's loss: cross-entropy over the logits (with their gradient written in
//! place for training), the per-row losses' copy to the host, and their mean.

use super::acts::logits_ld;
use super::kernels::Arg;
use super::{CResult, CudaEngine, STAGE_LOSSES, STAGE_TARGETS};

/// Threads per block of the cross-entropy kernels (kernels/cross_entropy.cu, XENT_THREADS,
/// their launch bound): two blocks of 512 on a multiprocessor, so that the rows read at
/// once stay in L2 for the gradient pass.
pub const XENT_BLOCK: u32 = 512;

/// A loss enqueued by [`CudaEngine::cross_entropy`]: `rows` per-row losses on their way to
/// the host, `count` of them counted (target not -1).
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingLoss {
    pub(super) rows: usize,
    pub(super) count: usize,
}

impl CudaEngine {
    /// Cross-entropy over the logits of the last forward pass; with `grad_scale` the logits
    /// become d(mean loss * scale)/d(logits) (bf16 logits: in bf16, in place), or, with fp32
    /// logits and bf16 activations ([`CudaEngine::bf16_grad`]), that gradient goes in bf16
    /// to the gradient scratch (the logits stay). Enqueued with
    /// the copy of the per-row losses to pinned memory; [`CudaEngine::mean_loss`] waits for
    /// them, so the backward pass can be enqueued first.
    pub(super) fn cross_entropy(
        &self,
        targets: &[i32],
        grad_scale: Option<f32>,
    ) -> CResult<PendingLoss> {
        let a = self
            .acts
            .as_ref()
            .expect("cross-entropy runs after forward");
        let n = targets.len();
        let count = targets.iter().filter(|&&t| t >= 0).count();
        let inv = if count > 0 { 1.0 / count as f32 } else { 0.0 };
        a.staged[STAGE_TARGETS].upload(targets, &a.targets, &self.stream)?;
        let v = self.cfg.vocab_size;
        let (grad_k, write_grad) = (
            Arg::F32(grad_scale.map_or(0.0, |s| s * inv)),
            Arg::I32(grad_scale.is_some() as i32),
        );
        // The two kernels' parameters after the logits (and the fp32 kernel's bf16 gradient).
        let rest = [
            Arg::Ptr(a.row_loss.ptr),
            Arg::Ptr(a.targets.ptr),
            Arg::I32(n as i32),
            Arg::I32(v as i32),
            Arg::I32(logits_ld(v) as i32),
            grad_k,
            write_grad,
        ];
        let logits = Arg::Ptr(a.logits.ptr);
        let (kernel, args) = if a.storage.logits {
            // bf16 logits: the gradient goes over them in place.
            let args: Vec<Arg> = std::iter::once(logits).chain(rest).collect();
            (self.k.cross_entropy_bf16, args)
        } else {
            let grad_bf16 = match grad_scale {
                Some(_) => self.bf16_grad(n * logits_ld(v))?.unwrap_or(0),
                None => 0,
            };
            let args: Vec<Arg> = [logits, Arg::Ptr(grad_bf16)]
                .into_iter()
                .chain(rest)
                .collect();
            (self.k.cross_entropy_forward_backward, args)
        };
        self.run_block(kernel, (n as u32, 1, 1), XENT_BLOCK, &args)?;
        a.staged[STAGE_LOSSES].download(&a.row_loss, 8 * n, &self.stream)?;
        Ok(PendingLoss { rows: n, count })
    }

    /// The mean loss over counted positions of a [`CudaEngine::cross_entropy`], once its
    /// per-row losses have reached the host.
    pub(super) fn mean_loss(&self, pending: PendingLoss) -> CResult<f32> {
        let a = self.acts.as_ref().expect("a loss follows a forward pass");
        let mut losses = vec![0f64; pending.rows];
        a.staged[STAGE_LOSSES].read(&mut losses)?;
        let sum: f64 = losses.iter().sum();
        Ok(if pending.count > 0 {
            (sum / pending.count as f64) as f32
        } else {
            0.0
        })
    }
}
