//! The CUDA engine's forward pass: embeddings, the blocks (LayerNorms, products,
//! attention, residual adds) and the LM head, up to the logits.

use super::acts::logits_ld;
use super::embedding::token_rows;
use super::kernels::{grid_vec, Arg};
use super::products::{Lin, Out, Post, Src};
use super::{CResult, CudaEngine, STAGE_INPUTS, STAGE_SEEDS, STAGE_TOKEN_ROWS};
use crate::engine::dropout::{Dropout, DropoutSeeds};

/// Where a block's projection product writes its branch: into `res`, to which
/// [`CudaEngine::residual_then_layernorm`] then adds the residual stream, or, `fused`
/// (switch `fused_residual`), `res = branch + stream` written by the product itself
/// where it can (the product says whether it did).
fn residual_branch(fused: bool, res: u64, stream: u64) -> Out {
    if fused {
        Out::F32Residual {
            out: res,
            residual: stream,
        }
    } else {
        Out::F32(res)
    }
}

impl CudaEngine {
    /// Forward pass up to the logits (N, V). `drop` is None in evaluation; `training` says
    /// whether a backward pass follows (see [`CudaEngine::fused_attention`]). `t_cap` is the
    /// sequence capacity to allocate if the activations must be (re)allocated.
    pub(super) fn forward(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        drop: Option<DropoutSeeds>,
        training: bool,
        t_cap: usize,
    ) -> CResult<()> {
        self.ctx.make_current()?;
        self.ensure_acts(b, t, t_cap)?;
        let a = self
            .acts
            .as_ref()
            .expect("activations allocated just above");
        let cfg = &self.cfg;
        let lay = &self.layout;
        let (c, n) = (cfg.n_embd, b * t);
        a.staged[STAGE_INPUTS].upload(inputs, &a.inputs, &self.stream)?;
        if training {
            // For the token-embedding gradient at the end of the backward pass.
            let table = token_rows(inputs);
            a.staged[STAGE_TOKEN_ROWS].upload(&table, &a.token_rows, &self.stream)?;
        }
        if let Some(d) = drop {
            a.staged[STAGE_SEEDS].upload(&d.table(cfg.n_layer), &a.seeds, &self.stream)?;
        }
        self.run(
            self.k.embedding_forward,
            grid_vec(n * c),
            &[
                Arg::Ptr(a.encoded.ptr),
                Arg::Ptr(a.inputs.ptr),
                Arg::Ptr(self.p(lay.wte)),
                Arg::Ptr(self.p(lay.wpe)),
                Arg::I32(n as i32),
                Arg::I32(t as i32),
                Arg::I32(c as i32),
            ],
        )?;
        if let Some(d) = drop {
            self.dropout(a.encoded.ptr, a.encoded.ptr, n * c, d.embedding())?;
        }
        // Each block ends with its residual add and the next LayerNorm (the next block's
        // ln1, or the final one) in one step; only the first LayerNorm runs on its own.
        // With `fused_residual` the projection products add the residual stream themselves
        // where they can (see `residual_branch`) and the LayerNorms after them only
        // normalise.
        let fused_residual = self.bf.is_some() && self.switches().fused_residual && drop.is_none();
        let mut ln_done = false;
        for (l, o) in lay.blocks.iter().enumerate() {
            let x = if l == 0 {
                a.encoded.ptr
            } else {
                a.layers[l - 1].res3.ptr
            };
            let la = &a.layers[l];
            if !ln_done {
                self.layernorm_fwd(
                    a.ln1(l),
                    la.ln1_mean.ptr,
                    la.ln1_rstd.ptr,
                    x,
                    o.ln1_w,
                    o.ln1_b,
                    n,
                )?;
            }
            self.linear_fwd(
                a.attn_out(la.qkv.ptr),
                a.ln1(l).src(),
                o.qkv_w,
                o.qkv_b,
                c,
                3 * c,
                n,
            )?;
            let attn_drop = drop.map_or(Dropout::off(), |d| d.attn_probs(l));
            self.attention_fwd(a, la, b, t, attn_drop, training)?;
            let added = self.linear_fwd(
                residual_branch(fused_residual, la.res2.ptr, x),
                a.attn_src(la.atty.ptr),
                o.attn_proj_w,
                o.attn_proj_b,
                c,
                c,
                n,
            )?;
            if let Some(d) = drop {
                self.dropout(la.res2.ptr, la.res2.ptr, n * c, d.attn_resid(l))?;
            }
            let ln2 = (a.ln2(l), la.ln2_mean.ptr, la.ln2_rstd.ptr, o.ln2_w, o.ln2_b);
            self.residual_then_layernorm(added, la.res2.ptr, x, ln2, n)?;
            let gelu = a.gelu(l);
            self.linear_gelu_fwd(
                a.mlp_out(gelu),
                la.fch.ptr,
                a.ln2(l).src(),
                o.fc_w,
                o.fc_b,
                c,
                4 * c,
                n,
            )?;
            let added = self.linear_fwd(
                residual_branch(fused_residual, la.res3.ptr, la.res2.ptr),
                a.mlp_src(gelu),
                o.mlp_proj_w,
                o.mlp_proj_b,
                4 * c,
                c,
                n,
            )?;
            if let Some(d) = drop {
                self.dropout(la.res3.ptr, la.res3.ptr, n * c, d.mlp_resid(l))?;
            }
            // At level 2 the next block's ln1 goes to the shared buffer: this block's ln2
            // there has been consumed by the fc product above.
            let next_ln = match (a.layers.get(l + 1), lay.blocks.get(l + 1)) {
                (Some(nl), Some(no)) => (
                    a.ln1(l + 1),
                    nl.ln1_mean.ptr,
                    nl.ln1_rstd.ptr,
                    no.ln1_w,
                    no.ln1_b,
                ),
                _ => (
                    a.lnf(),
                    a.lnf_mean.ptr,
                    a.lnf_rstd.ptr,
                    lay.lnf_w,
                    lay.lnf_b,
                ),
            };
            self.residual_then_layernorm(added, la.res3.ptr, la.res2.ptr, next_ln, n)?;
            ln_done = true;
        }
        if !ln_done {
            self.layernorm_fwd(
                a.lnf(),
                a.lnf_mean.ptr,
                a.lnf_rstd.ptr,
                a.encoded.ptr,
                lay.lnf_w,
                lay.lnf_b,
                n,
            )?;
        }
        let v = cfg.vocab_size;
        let logits = if a.storage.logits {
            Out::Bf16(a.logits.ptr)
        } else {
            Out::F32(a.logits.ptr)
        };
        self.mm_ep(
            n,
            v,
            c,
            Lin::n(a.lnf().src(), c),
            Lin::t(Src::Param(lay.wte), c),
            0.0,
            logits,
            logits_ld(v),
            Post::None,
        )?;
        Ok(())
    }
}
