//! Causal self-attention in the CUDA engine's passes: the fused kernels ([`super::flash`])
//! where a pass can take them ([`CudaEngine::fused_attention`]), else the plain path
//! (strided-batched GEMMs over heads, the masked softmax kernels, the `T x T` matrices
//! allocated on first use); forward and backward over a layer's saved activations.

use super::acts::{Acts, LayerActs};
use super::flash::{self, AttnShape, FlashIo, FlashMath};
use super::kernels::{grid_rows, Arg};
use super::products::Src;
use super::{at, profile, Buf, CResult, CudaEngine, SLOT_GRAD};
use crate::cuda::cublas::Operand;
use crate::cuda::CudaError;
use crate::engine::dropout::Dropout;
use std::cell::OnceCell;

impl CudaEngine {
    pub(super) fn attn_shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape {
            b,
            t,
            c: self.cfg.n_embd,
            nh: self.cfg.n_head,
        }
    }

    /// The buffer in `cell`, allocated with `elems` floats the first time it is asked for
    /// (`what` names it in an out-of-memory error).
    pub(super) fn lazy(&self, cell: &OnceCell<Buf>, elems: usize, what: &str) -> CResult<u64> {
        if let Some(buf) = cell.get() {
            return Ok(buf.ptr);
        }
        let buf = self.ctx.alloc(4 * elems).map_err(|e| {
            CudaError::Invalid(format!(
                "cannot allocate {what} ({} MiB): {e}; use a smaller batch_size or \
                 block_size{}",
                (4 * elems) >> 20,
                if self.switches.flash {
                    ", or dropout=0.0 (the fused attention needs no T x T matrices)"
                } else {
                    ", or leave the fused attention on (NANOGPT_CUDA_DISABLE without flash)"
                }
            ))
        })?;
        let ptr = buf.ptr;
        assert!(cell.set(buf).is_ok(), "the cell was empty just above");
        Ok(ptr)
    }

    /// Elements of a (B, NH, T, T) buffer of `a`'s capacity.
    pub(super) fn tt_elems(&self, a: &Acts) -> usize {
        a.b * self.cfg.n_head * a.t_cap * a.t_cap
    }

    /// y (N, C) from qkv (N, 3C); saves what the backward needs: lse (B, NH, T) on the
    /// fused path, att = P (B, NH, T, T) on the plain one.
    /// The plain attention reads and writes fp32 q, k, v and output: refused when the
    /// activations store them in bf16 ([`Bf16Storage::attn`], chosen only where every
    /// pass takes the bf16 fused attention, so this never fires unless that choice is
    /// wrong).
    ///
    /// [`Bf16Storage::attn`]: super::Bf16Storage::attn
    pub(super) fn plain_attention_allowed(a: &Acts) -> CResult<()> {
        if a.storage.attn {
            return Err(CudaError::Invalid(
                "internal: the plain attention path met bf16 attention storage".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn attention_fwd(
        &self,
        a: &Acts,
        la: &LayerActs,
        b: usize,
        t: usize,
        drop: Dropout,
        training: bool,
    ) -> CResult<()> {
        if let Some(math) = self.fused_attention(b, t, training) {
            let shape = self.attn_shape(b, t);
            let rows = self.attn_shape(a.b, a.t_cap).rows();
            let lse = self.lazy(&la.lse, rows, "the attention logsumexp")?;
            // SAFETY: qkv (N, 3C) and atty (N, C) are sized for (a.b, a.t_cap) >= (b, t);
            // lse holds B * NH * t_cap floats; all live in this context, and y/lse do not
            // overlap qkv.
            let io = a.storage.attn_io();
            let name = match (math, io) {
                (FlashMath::F32, _) => "flash_attn_fwd (fp32)",
                (FlashMath::Bf16, FlashIo::F32) => "flash_attn_fwd (bf16 mma)",
                (FlashMath::Bf16, FlashIo::Bf16) => "flash_attn_fwd (bf16 mma, bf16 io)",
            };
            let work = profile::flash_work(
                &shape,
                math == FlashMath::Bf16,
                io.value_bytes(),
                0, // no gradient in the forward
                false,
            );
            return profile::region(&self.profiler, &self.stream, name, work, || unsafe {
                flash::flash_forward(
                    &self.stream,
                    &self.k,
                    math,
                    io,
                    la.qkv.ptr,
                    la.atty.ptr,
                    lse,
                    shape,
                )
            });
        }
        Self::plain_attention_allowed(a)?;
        let tt = self.tt_elems(a);
        let att = self.lazy(&la.att, tt, "the attention matrix")?;
        let (c, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let hs = c / nh;
        let c3 = 3 * c;
        let scale = 1.0 / (hs as f32).sqrt();
        for bi in 0..b {
            let qkv = at(la.qkv.ptr, bi * t * c3);
            self.gemm(
                t,
                t,
                hs,
                Operand::n(qkv, c3).batched(hs),
                Operand::t(at(qkv, c), c3).batched(hs),
                0.0,
                Operand::n(at(att, bi * nh * t * t), t).batched(t * t),
                nh,
            )?;
        }
        let rows = b * nh * t;
        self.run(
            self.k.causal_softmax_forward,
            grid_rows(rows),
            &[
                Arg::Ptr(att),
                Arg::I64(rows as i64),
                Arg::I32(t as i32),
                Arg::F32(scale),
            ],
        )?;
        let probs = if drop.active() {
            let patt = self.lazy(&a.patt, tt, "the dropped-out attention matrix")?;
            self.dropout(patt, att, rows * t, drop)?;
            patt
        } else {
            att
        };
        for bi in 0..b {
            let qkv = at(la.qkv.ptr, bi * t * c3);
            self.gemm(
                t,
                hs,
                t,
                Operand::n(at(probs, bi * nh * t * t), t).batched(t * t),
                Operand::n(at(qkv, 2 * c), c3).batched(hs),
                0.0,
                Operand::n(at(la.atty.ptr, bi * t * c), c).batched(hs),
                nh,
            )?;
        }
        Ok(())
    }

    /// dqkv (N, 3C, overwritten) from dy (N, C), on the path the forward took (the same
    /// `b`, `t` and `drop` choose it).
    /// The attention backward: the gradient of qkv from `dy`, in `dqkv` (fp32), or, on the
    /// bf16 fused path with bf16 activations, in bf16 in the gradient scratch, for the qkv
    /// backward products (same bits as rounding the fp32 gradient). Returns where it is.
    pub(super) fn attention_bwd(
        &self,
        a: &Acts,
        la: &LayerActs,
        dy: u64,
        b: usize,
        t: usize,
        drop: Dropout,
    ) -> CResult<Src> {
        if let Some(math) = self.fused_attention(b, t, true) {
            let shape = self.attn_shape(b, t);
            let lse = la
                .lse
                .get()
                .expect("the fused forward of this pass wrote the logsumexp")
                .ptr;
            let rows = self.attn_shape(a.b, a.t_cap).rows();
            let dvec = self.lazy(&a.dvec, rows, "the attention backward scratch")?;
            // SAFETY: as in attention_fwd; dy (N, C) and dqkv (N, 3C) are sized for the
            // activations' capacity, dvec holds B * NH * t_cap floats, and neither dqkv nor
            // dvec overlaps an input.
            let io = a.storage.attn_io();
            let name = match (math, io) {
                (FlashMath::F32, _) => "flash_attn_bwd (fp32)",
                (FlashMath::Bf16, FlashIo::F32) => "flash_attn_bwd (bf16 mma)",
                (FlashMath::Bf16, FlashIo::Bf16) => "flash_attn_bwd (bf16 mma, bf16 io)",
            };
            let elems = b * t * 3 * self.cfg.n_embd;
            let bf16_out = match (math, &self.bf) {
                // bf16 storage: the gradient is bf16 whatever `bf16_acts` says.
                (FlashMath::Bf16, Some(bf)) if io == FlashIo::Bf16 => {
                    Some(self.scratch(bf, SLOT_GRAD, elems)?)
                }
                (FlashMath::Bf16, _) => self.bf16_grad(elems)?,
                (FlashMath::F32, _) => None,
            };
            let grad_bytes = if bf16_out.is_some() { 2 } else { 4 };
            let work = profile::flash_work(
                &shape,
                math == FlashMath::Bf16,
                io.value_bytes(),
                grad_bytes,
                true,
            );
            profile::region(&self.profiler, &self.stream, name, work, || unsafe {
                flash::flash_backward(
                    &self.stream,
                    &self.k,
                    math,
                    io,
                    la.qkv.ptr,
                    la.atty.ptr,
                    lse,
                    dy,
                    dvec,
                    if io == FlashIo::Bf16 { 0 } else { a.dqkv.ptr },
                    bf16_out.unwrap_or(0),
                    shape,
                )
            })?;
            return Ok(bf16_out.map_or(Src::Act(a.dqkv.ptr), Src::Bf16));
        }
        Self::plain_attention_allowed(a)?;
        let tt = self.tt_elems(a);
        let att = la
            .att
            .get()
            .expect("the plain forward of this pass wrote the attention matrix")
            .ptr;
        let datt_buf = self.lazy(&a.datt, tt, "the attention matrix gradient")?;
        let (c, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let hs = c / nh;
        let c3 = 3 * c;
        let scale = 1.0 / (hs as f32).sqrt();
        let rows = b * nh * t;
        let probs = if drop.active() {
            let patt = self.lazy(&a.patt, tt, "the dropped-out attention matrix")?;
            self.dropout(patt, att, rows * t, drop)?;
            patt
        } else {
            att
        };
        for bi in 0..b {
            let qkv = at(la.qkv.ptr, bi * t * c3);
            let dqkv = at(a.dqkv.ptr, bi * t * c3);
            let dyb = at(dy, bi * t * c);
            let datt = at(datt_buf, bi * nh * t * t);
            // dPd = dy v^T
            self.gemm(
                t,
                t,
                hs,
                Operand::n(dyb, c).batched(hs),
                Operand::t(at(qkv, 2 * c), c3).batched(hs),
                0.0,
                Operand::n(datt, t).batched(t * t),
                nh,
            )?;
            // dv = Pd^T dy
            self.gemm(
                t,
                hs,
                t,
                Operand::t(at(probs, bi * nh * t * t), t).batched(t * t),
                Operand::n(dyb, c).batched(hs),
                0.0,
                Operand::n(at(dqkv, 2 * c), c3).batched(hs),
                nh,
            )?;
        }
        self.dropout(datt_buf, datt_buf, rows * t, drop)?;
        self.run(
            self.k.causal_softmax_backward,
            grid_rows(rows),
            &[
                Arg::Ptr(datt_buf),
                Arg::Ptr(att),
                Arg::I64(rows as i64),
                Arg::I32(t as i32),
                Arg::F32(scale),
            ],
        )?;
        for bi in 0..b {
            let qkv = at(la.qkv.ptr, bi * t * c3);
            let dqkv = at(a.dqkv.ptr, bi * t * c3);
            let datt = at(datt_buf, bi * nh * t * t);
            // dq = dS k ; dk = dS^T q
            self.gemm(
                t,
                hs,
                t,
                Operand::n(datt, t).batched(t * t),
                Operand::n(at(qkv, c), c3).batched(hs),
                0.0,
                Operand::n(dqkv, c3).batched(hs),
                nh,
            )?;
            self.gemm(
                t,
                hs,
                t,
                Operand::t(datt, t).batched(t * t),
                Operand::n(qkv, c3).batched(hs),
                0.0,
                Operand::n(at(dqkv, c), c3).batched(hs),
                nh,
            )?;
        }
        Ok(Src::Act(a.dqkv.ptr))
    }
}
