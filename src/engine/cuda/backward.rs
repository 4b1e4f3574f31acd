//! The CUDA engine's backward pass: from the logits gradient to every parameter gradient,
//! block by block in reverse, with the gradient ranges reported as they finish (for the
//! overlapped all-reduce), and the bf16 copies of gradients the products read.

use super::acts::{logits_ld, Acts};
use super::kernels::{grid_vec, Arg};
use super::products::{Lin, Post, Src};
use super::{CResult, CudaEngine, GradWrite, SLOT_GRAD};
use crate::engine::dropout::{Dropout, DropoutSeeds};

impl CudaEngine {
    /// Where a kernel writes a gradient of `elems` values that only the next products read,
    /// in bf16: the gradient scratch, with bf16 activations ([`CudaEngine::bf16_acts`]); else
    /// `None` (the gradient stays fp32 and the products round it).
    pub(super) fn bf16_grad(&self, elems: usize) -> CResult<Option<u64>> {
        match &self.bf {
            Some(bf) if self.bf16_acts() => self.scratch(bf, SLOT_GRAD, elems).map(Some),
            _ => Ok(None),
        }
    }

    /// Where a LayerNorm backward also writes the residual-stream gradient `dres` (`elems`
    /// values) in bf16, for the two backward products of the next linear layer when it
    /// reads dres itself (`next_reads`: no residual dropout in between): the gradient
    /// scratch, in the bf16 mode with `bf16_acts` (the bits a cast pass would give, without
    /// the pass); else 0 (the products round dres themselves, [`CudaEngine::linear_bwd`]).
    pub(super) fn dres_bf16(&self, next_reads: bool, elems: usize) -> CResult<u64> {
        match &self.bf {
            Some(bf) if next_reads && self.bf16_acts() => self.scratch(bf, SLOT_GRAD, elems),
            _ => Ok(0),
        }
    }

    /// The gradient of a residual branch's output (`elems` values) as its backward products
    /// read it: `dropout(dres)` in `dtmp` when residual dropout is active, else dres, with
    /// its bf16 copy when the LayerNorm backward wrote one (`dres_bf16`,
    /// [`CudaEngine::dres_bf16`]).
    pub(super) fn branch_grad(
        &self,
        a: &Acts,
        drop: Option<Dropout>,
        dres_bf16: u64,
        elems: usize,
    ) -> CResult<Src> {
        Ok(match drop {
            Some(d) if d.active() => {
                self.dropout(a.dtmp.ptr, a.dres.ptr, elems, d)?;
                Src::Act(a.dtmp.ptr)
            }
            _ if dres_bf16 != 0 => Src::Rounded(a.dres.ptr, dres_bf16),
            _ => Src::Act(a.dres.ptr),
        })
    }

    /// Backward from dlogits (already in `logits`) to all parameter gradients, added to
    /// the gradient buffer or, with `write` [`GradWrite::Overwrite`], written over every
    /// element of it. The backward pass, enqueued on the compute stream; `ready` hears of
    /// each finished range of the gradient buffer right after its last write is enqueued
    /// (see [`Engine::forward_backward_notify`](crate::engine::Engine::forward_backward_notify)).
    pub(super) fn backward(
        &self,
        b: usize,
        t: usize,
        drop: Option<DropoutSeeds>,
        ready: Option<&mut (dyn FnMut(crate::engine::GradReady) + Send)>,
        write: GradWrite,
    ) -> CResult<()> {
        let mut ready = ready;
        let stream = self.stream.s as u64;
        let mut report = |range: std::ops::Range<usize>| {
            if let Some(f) = ready.as_mut() {
                f(crate::engine::GradReady {
                    start: range.start,
                    len: range.len(),
                    host: None,
                    stream: Some(stream),
                });
            }
        };
        let a = self.acts.as_ref().expect("backward runs after forward");
        let cfg = &self.cfg;
        let lay = &self.layout;
        let (c, n, v) = (cfg.n_embd, b * t, cfg.vocab_size);
        let ld = logits_ld(v);
        if write == GradWrite::Overwrite {
            // The two parts of the buffer no product or kernel below writes: the embedding
            // rows past the vocabulary (padding, never a token or a logit) and the position
            // rows past this pass's T. Zero, as they would be had zero_grad zeroed them.
            let f = std::mem::size_of::<f32>();
            let pad_rows = cfg.padded_vocab_size - v;
            self.stream
                .zero_range(self.grad_buf(), f * (lay.wte + v * c), f * pad_rows * c)?;
            let tail_rows = cfg.block_size - t;
            self.stream
                .zero_range(self.grad_buf(), f * (lay.wpe + t * c), f * tail_rows * c)?;
        }
        // LM head (tied): dlnf = dlogits @ wte ; dwte += dlogits^T @ lnf. The cross-entropy
        // kernel wrote dlogits over bf16 logits, or in bf16 to the gradient scratch with
        // bf16 activations (see `cross_entropy`); otherwise it is in `logits`, rounded here
        // in the bf16 mode (rows `ld` apart: the padding columns round along, unread).
        let dlogits = if a.storage.logits {
            Src::Bf16(a.logits.ptr)
        } else {
            match self.bf16_grad(n * ld)? {
                Some(q) => Src::Bf16(q),
                None => self.rounded(a.logits.ptr, n * ld)?,
            }
        };
        self.mm_ep(
            n,
            c,
            v,
            Lin::n(dlogits, ld),
            Lin::n(Src::Param(lay.wte), c),
            0.0,
            a.dln_out(),
            c,
            Post::None,
        )?;
        self.mm(
            v,
            c,
            n,
            Lin::t(dlogits, ld),
            Lin::n(a.lnf().src(), c),
            write.beta(),
            self.g(lay.wte),
            c,
        )?;
        self.stream.zero(&a.dres)?;
        // Whether residual dropout sits between dres and the branch of layer l that reads it
        // (the MLP branch, `mlp`, or the attention branch).
        let branch_dropout = |l: usize, mlp: bool| {
            drop.is_some_and(|d| {
                if mlp {
                    d.mlp_resid(l).active()
                } else {
                    d.attn_resid(l).active()
                }
            })
        };
        let last = a.layers.last().map_or(a.encoded.ptr, |la| la.res3.ptr);
        let mut dres_bf16 = match cfg.n_layer {
            0 => 0,
            l => self.dres_bf16(!branch_dropout(l - 1, true), n * c)?,
        };
        self.layernorm_bwd(
            a.dres.ptr,
            dres_bf16,
            a.dln_in(),
            last,
            a.lnf_mean.ptr,
            a.lnf_rstd.ptr,
            lay.lnf_w,
            lay.lnf_b,
            n,
            a.ln_parts.ptr,
            write,
        )?;
        // ln_f is the end of the layout; block l runs up to block l + 1 (or ln_f).
        let block_end = |l: usize| lay.blocks.get(l + 1).map_or(lay.lnf_w, |o| o.ln1_w);
        report(lay.lnf_w..lay.total);
        let bias_scratch = a.bias_parts.ptr;
        for l in (0..cfg.n_layer).rev() {
            let o = &lay.blocks[l];
            let x = if l == 0 {
                a.encoded.ptr
            } else {
                a.layers[l - 1].res3.ptr
            };
            let la = &a.layers[l];
            if la.fch_gelu.is_none() {
                // Recomputed with the forward's unfused kernel (see the module docs for the
                // fused GELU epilogue and the bf16 MLP chain).
                let len = Arg::I64((n * 4 * c) as i64);
                let (gelu, pre) = (Arg::Ptr(a.gelu(l)), Arg::Ptr(la.fch.ptr));
                if a.storage.mlp {
                    self.run(
                        self.k.gelu_forward_bf16,
                        grid_vec(n * 4 * c),
                        &[gelu, Arg::Ptr(0), Arg::Ptr(0), pre, len],
                    )?;
                } else {
                    self.run(self.k.gelu_forward, grid_vec(n * 4 * c), &[gelu, pre, len])?;
                }
            }
            // ---- MLP branch: res3 = res2 + dropout(gelu(ln2 @ Wfc + bfc) @ Wp + bp)
            let gbranch = self.branch_grad(a, drop.map(|d| d.mlp_resid(l)), dres_bf16, n * c)?;
            // dfch = d(pre-activation of the GELU)
            self.linear_bwd(
                a.mlp_out(a.dfch.ptr),
                gbranch,
                a.mlp_src(a.gelu(l)),
                o.mlp_proj_w,
                o.mlp_proj_b,
                Post::DGelu { pre: la.fch.ptr },
                4 * c,
                c,
                n,
                bias_scratch,
                write,
            )?;
            if la.ln2.is_none() {
                self.layernorm_recompute(
                    a.ln2(l),
                    la.res2.ptr,
                    la.ln2_mean.ptr,
                    la.ln2_rstd.ptr,
                    o.ln2_w,
                    o.ln2_b,
                    n,
                )?;
            }
            self.linear_bwd(
                a.dln_out(),
                a.mlp_src(a.dfch.ptr),
                a.ln2(l).src(),
                o.fc_w,
                o.fc_b,
                Post::None,
                c,
                4 * c,
                n,
                bias_scratch,
                write,
            )?;
            dres_bf16 = self.dres_bf16(!branch_dropout(l, false), n * c)?;
            self.layernorm_bwd(
                a.dres.ptr,
                dres_bf16,
                a.dln_in(),
                la.res2.ptr,
                la.ln2_mean.ptr,
                la.ln2_rstd.ptr,
                o.ln2_w,
                o.ln2_b,
                n,
                a.ln_parts.ptr,
                write,
            )?;
            // ---- attention branch: res2 = x + dropout(attn(ln1) @ Wproj + bproj)
            let gbranch = self.branch_grad(a, drop.map(|d| d.attn_resid(l)), dres_bf16, n * c)?;
            // The attention output's gradient: in bf16 over the first half of dln with bf16
            // attention storage (the attention backward reads it so).
            self.linear_bwd(
                a.attn_out(a.dln.ptr),
                gbranch,
                a.attn_src(la.atty.ptr),
                o.attn_proj_w,
                o.attn_proj_b,
                Post::None,
                c,
                c,
                n,
                bias_scratch,
                write,
            )?;
            let attn_drop = drop.map_or(Dropout::off(), |d| d.attn_probs(l));
            let dqkv = self.attention_bwd(a, la, a.dln.ptr, b, t, attn_drop)?;
            if la.ln1.is_none() {
                self.layernorm_recompute(
                    a.ln1(l),
                    x,
                    la.ln1_mean.ptr,
                    la.ln1_rstd.ptr,
                    o.ln1_w,
                    o.ln1_b,
                    n,
                )?;
            }
            self.linear_bwd(
                a.dln_out(),
                dqkv,
                a.ln1(l).src(),
                o.qkv_w,
                o.qkv_b,
                Post::None,
                c,
                3 * c,
                n,
                bias_scratch,
                write,
            )?;
            // Below block 0 only the embeddings read dres: no copy.
            dres_bf16 = match l {
                0 => 0,
                l => self.dres_bf16(!branch_dropout(l - 1, true), n * c)?,
            };
            self.layernorm_bwd(
                a.dres.ptr,
                dres_bf16,
                a.dln_in(),
                x,
                la.ln1_mean.ptr,
                la.ln1_rstd.ptr,
                o.ln1_w,
                o.ln1_b,
                n,
                a.ln_parts.ptr,
                write,
            )?;
            report(o.ln1_w..block_end(l));
        }
        if let Some(d) = drop {
            self.dropout(a.dres.ptr, a.dres.ptr, n * c, d.embedding())?;
        }
        self.embedding_wte_backward(self.g(lay.wte), a.dres.ptr, a.token_rows.ptr, n, c)?;
        self.run(
            self.k.embedding_backward_wpe,
            grid_vec(t * c),
            &[
                Arg::Ptr(self.g(lay.wpe)),
                Arg::Ptr(a.dres.ptr),
                Arg::I32(b as i32),
                Arg::I32(t as i32),
                Arg::I32(c as i32),
                write.accumulate(),
            ],
        )?;
        // wte (also written by the tied LM head) and wpe: the start of the layout.
        report(0..lay.blocks.first().map_or(lay.lnf_w, |o| o.ln1_w));
        Ok(())
    }
}
