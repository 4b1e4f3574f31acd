//! The CUDA engine's activation memory: what a training step keeps for the backward pass
//! and its scratch ([`Acts`], one [`LayerActs`] per block), which of it is stored in bf16
//! ([`Bf16Storage`]), and the byte count the engine plans and reports
//! ([`activation_bytes`]).

use super::embedding::table_len;
use super::flash::FlashIo;
use super::{Buf, CResult, LnOut, Out, Src, PARTS};
use crate::cuda::driver::{Context, Staging};
use crate::engine::dropout::DropoutSeeds;
use crate::engine::Recompute;
use crate::model::GptConfig;
use std::cell::OnceCell;

/// Which activations the bf16 mode stores in bf16 only: the LayerNorm outputs (`ln`,
/// switch `bf16_acts`; `LnOut`), the MLP's pre-activation, GELU output and
/// pre-activation gradient (`mlp`, switch `bf16_mlp`), and the logits with their gradient
/// in place (`logits`, switch `bf16_logits`), and the attention's q, k, v, output and
/// output gradient (`attn`, switch `bf16_attn`, with the bf16 fused attention only), and
/// the LayerNorm outputs' gradients (`dln`, switch `bf16_dln`). All false in fp32 mode.
/// `dln` changes traffic, not memory: the `dln` buffer keeps its fp32 size, as it also
/// holds the fp32 attention output's gradient when `attn` is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bf16Storage {
    pub ln: bool,
    pub mlp: bool,
    pub logits: bool,
    pub attn: bool,
    pub dln: bool,
}

impl Bf16Storage {
    /// Bytes per value of an activation stored in bf16 (`bf16`) or fp32.
    pub(super) fn value_bytes(bf16: bool) -> usize {
        if bf16 {
            2
        } else {
            4
        }
    }
    pub(super) fn ln_bytes(self) -> usize {
        Self::value_bytes(self.ln)
    }
    pub(super) fn mlp_bytes(self) -> usize {
        Self::value_bytes(self.mlp)
    }
    pub(super) fn logits_bytes(self) -> usize {
        Self::value_bytes(self.logits)
    }
    pub(super) fn attn_bytes(self) -> usize {
        Self::value_bytes(self.attn)
    }
    /// How the fused attention's tensors are stored.
    pub(super) fn attn_io(self) -> FlashIo {
        if self.attn {
            FlashIo::Bf16
        } else {
            FlashIo::F32
        }
    }
}

/// Saved activations of one transformer block. `ln1`, `ln2` (level 2) and `fch_gelu`
/// (levels 1 and 2) are `None` when recomputed (see [`Acts::gelu_shared`]).
pub(super) struct LayerActs {
    pub(super) ln1: Option<Buf>,
    pub(super) ln1_mean: Buf,
    pub(super) ln1_rstd: Buf,
    pub(super) qkv: Buf,
    /// Attention probabilities (B, NH, T, T): plain path only, allocated on first use.
    pub(super) att: OnceCell<Buf>,
    /// Per-row logsumexp (B, NH, T): fused path only, allocated on first use.
    pub(super) lse: OnceCell<Buf>,
    pub(super) atty: Buf,
    pub(super) res2: Buf,
    pub(super) ln2: Option<Buf>,
    pub(super) ln2_mean: Buf,
    pub(super) ln2_rstd: Buf,
    pub(super) fch: Buf,
    pub(super) fch_gelu: Option<Buf>,
    pub(super) res3: Buf,
}

/// Activation and backward scratch memory for `b` rows of up to `t_cap` tokens.
pub(super) struct Acts {
    pub(super) b: usize,
    pub(super) t_cap: usize,
    pub(super) recompute: Recompute,
    /// LayerNorm outputs (ln1, ln2, lnf, `ln_shared`) are bf16 ([`LnOut::Bf16`]) with
    /// `ln`; fch, the GELU outputs and dfch with `mlp`.
    pub(super) storage: Bf16Storage,
    pub(super) inputs: Buf,
    pub(super) targets: Buf,
    pub(super) encoded: Buf,
    pub(super) layers: Vec<LayerActs>,
    pub(super) lnf: Buf,
    pub(super) lnf_mean: Buf,
    pub(super) lnf_rstd: Buf,
    pub(super) logits: Buf,
    pub(super) row_loss: Buf,
    /// Pinned host staging of the token inputs, the targets, the per-row losses, the
    /// dropout seed table and the token rows: the host hands a micro-batch over and asks
    /// for its loss without waiting for the GPU (see `CudaEngine::train_step`).
    pub(super) staged: [Staging<'static>; 5],
    /// The rows of a training micro-batch grouped by token (`embedding::token_rows`), for
    /// the token-embedding gradient.
    pub(super) token_rows: Buf,
    /// The dropout seeds of the current training pass, by slot
    /// ([`crate::engine::dropout::DropoutSeeds::table`]), which `dropout_apply` reads.
    pub(super) seeds: Buf,
    pub(super) dres: Buf,
    pub(super) dtmp: Buf,
    pub(super) dln: Buf,
    pub(super) dfch: Buf,
    pub(super) dqkv: Buf,
    /// (B, NH, T, T) gradient of the probabilities: plain backward only, on first use.
    pub(super) datt: OnceCell<Buf>,
    /// (B, NH, T, T) dropout-masked probabilities: plain path with attention dropout only.
    pub(super) patt: OnceCell<Buf>,
    /// (B, NH, T) scratch of the fused backward, on first use.
    pub(super) dvec: OnceCell<Buf>,
    pub(super) ln_parts: Buf,
    pub(super) bias_parts: Buf,
    /// The GELU output (N, 4C) of the layer being computed, levels 1 and 2.
    pub(super) gelu_shared: Option<Buf>,
    /// ln1 or ln2 (N, C) of the layer being computed, level 2 (never both at once).
    pub(super) ln_shared: Option<Buf>,
}

impl Acts {
    pub(super) fn new(
        ctx: &Context<'static>,
        cfg: &GptConfig,
        b: usize,
        t_cap: usize,
        recompute: Recompute,
        storage: Bf16Storage,
    ) -> CResult<Acts> {
        let (n, c) = (b * t_cap, cfg.n_embd);
        let z = |len: usize| ctx.alloc(4 * len);
        // LayerNorm outputs and the MLP chain: fp32, or bf16 (see Bf16Storage).
        let zl = |len: usize| ctx.alloc(storage.ln_bytes() * len);
        let zm = |len: usize| ctx.alloc(storage.mlp_bytes() * len);
        let za = |len: usize| ctx.alloc(storage.attn_bytes() * len);
        // A LayerNorm output buffer of `len` values when `keep`, else none.
        let opt_ln = |keep: bool, len: usize| if keep { zl(len).map(Some) } else { Ok(None) };
        // A GELU output buffer of `len` values when `keep`, else none.
        let opt_mlp = |keep: bool, len: usize| if keep { zm(len).map(Some) } else { Ok(None) };
        let (ln_own, gelu_own) = (!recompute.layernorm(), !recompute.gelu());
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerActs {
                ln1: opt_ln(ln_own, n * c)?,
                ln1_mean: z(n)?,
                ln1_rstd: z(n)?,
                qkv: za(n * 3 * c)?,
                att: OnceCell::new(),
                lse: OnceCell::new(),
                atty: za(n * c)?,
                res2: z(n * c)?,
                ln2: opt_ln(ln_own, n * c)?,
                ln2_mean: z(n)?,
                ln2_rstd: z(n)?,
                fch: zm(n * 4 * c)?,
                fch_gelu: opt_mlp(gelu_own, n * 4 * c)?,
                res3: z(n * c)?,
            });
        }
        Ok(Acts {
            b,
            t_cap,
            recompute,
            storage,
            inputs: z(n)?,
            targets: z(n)?,
            encoded: z(n * c)?,
            layers,
            lnf: zl(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: z(n)?,
            logits: {
                // Zeroed once: the padding columns past the vocabulary are never written.
                let buf = ctx.alloc(storage.logits_bytes() * n * logits_ld(cfg.vocab_size))?;
                buf.zero()?;
                buf
            },
            row_loss: ctx.alloc(8 * n)?,
            staged: [
                Staging::new(ctx, 4 * n)?,
                Staging::new(ctx, 4 * n)?,
                Staging::new(ctx, 8 * n)?,
                Staging::new(ctx, 8 * DropoutSeeds::slots(cfg.n_layer))?,
                Staging::new(ctx, 4 * table_len(n))?,
            ],
            token_rows: ctx.alloc(4 * table_len(n))?,
            seeds: ctx.alloc(8 * DropoutSeeds::slots(cfg.n_layer))?,
            dres: z(n * c)?,
            dtmp: z(n * c)?,
            dln: z(n * c)?,
            dfch: zm(n * 4 * c)?,
            dqkv: z(n * 3 * c)?,
            datt: OnceCell::new(),
            patt: OnceCell::new(),
            dvec: OnceCell::new(),
            ln_parts: z(ln_parts_len(n, c))?,
            bias_parts: z(PARTS * 4 * c)?,
            gelu_shared: opt_mlp(!gelu_own, n * 4 * c)?,
            ln_shared: opt_ln(!ln_own, n * c)?,
        })
    }

    /// Bytes [`Acts::new`] allocates for `b` rows of `t_cap` tokens at `recompute`, plus
    /// the attention buffers a training step allocates on first use: the fused path's
    /// logsumexp and scratch vector (`fused`), else the plain path's T x T matrices (and
    /// the dropout-masked copy when `attn_dropout`), with the activations `storage` names
    /// in bf16. The GPU test of recomputation checks it against
    /// [`memory_report`](crate::engine::Engine::memory_report)'s figures.
    pub(super) fn planned_bytes(
        cfg: &GptConfig,
        b: usize,
        t_cap: usize,
        recompute: Recompute,
        fused: bool,
        attn_dropout: bool,
        storage: Bf16Storage,
    ) -> u64 {
        let (n, c, nh, l) = (b * t_cap, cfg.n_embd, cfg.n_head, cfg.n_layer);
        // LayerNorm outputs (values): per layer ln1 and ln2, or the shared one; lnf.
        let ln_values = if recompute.layernorm() {
            n * c
        } else {
            l * 2 * n * c
        } + n * c;
        // The MLP chain (values): fch per layer, the GELU outputs per layer or the shared
        // one, dfch.
        let gelu_values = if recompute.gelu() { 1 } else { l } * n * 4 * c;
        let mlp_values = l * n * 4 * c + gelu_values + n * 4 * c;
        // ln stats (4N), res2, res3; qkv and atty (attention values)
        let layer = 4 * n + 2 * n * c;
        let attn_values = l * 4 * n * c;
        let once = 2 * n // inputs, targets
            + table_len(n) // token rows
            + n * c // encoded
            + 2 * n // lnf's mean, rstd
            + 3 * n * c + n * 3 * c // dres, dtmp, dln, dqkv
            + ln_parts_len(n, c) + PARTS * 4 * c;
        let tt = b * nh * t_cap * t_cap;
        let attention = if fused {
            (l + 1) * b * nh * t_cap
        } else {
            l * tt + tt + if attn_dropout { tt } else { 0 }
        };
        (4 * (l * layer + once + attention)
            + storage.ln_bytes() * ln_values
            + storage.mlp_bytes() * mlp_values
            + storage.logits_bytes() * n * logits_ld(cfg.vocab_size)
            + storage.attn_bytes() * attn_values
            + 8 * n) as u64 // row_loss: f64
    }

    pub(super) fn ln1(&self, l: usize) -> LnOut {
        self.ln_out(self.own_or_shared(self.layers[l].ln1.as_ref(), &self.ln_shared))
    }
    pub(super) fn ln2(&self, l: usize) -> LnOut {
        self.ln_out(self.own_or_shared(self.layers[l].ln2.as_ref(), &self.ln_shared))
    }
    pub(super) fn lnf(&self) -> LnOut {
        self.ln_out(self.lnf.ptr)
    }
    pub(super) fn ln_out(&self, ptr: u64) -> LnOut {
        if self.storage.ln {
            LnOut::Bf16(ptr)
        } else {
            LnOut::F32(ptr)
        }
    }
    /// The gradient of a LayerNorm output (`dln`) as the input-gradient products write it:
    /// bf16 with [`Bf16Storage::dln`], else fp32.
    pub(super) fn dln_out(&self) -> Out {
        if self.storage.dln {
            Out::Bf16(self.dln.ptr)
        } else {
            Out::F32(self.dln.ptr)
        }
    }
    /// The same gradient as the LayerNorm backward reads it.
    pub(super) fn dln_in(&self) -> LnOut {
        if self.storage.dln {
            LnOut::Bf16(self.dln.ptr)
        } else {
            LnOut::F32(self.dln.ptr)
        }
    }
    pub(super) fn gelu(&self, l: usize) -> u64 {
        self.own_or_shared(self.layers[l].fch_gelu.as_ref(), &self.gelu_shared)
    }
    /// The attention output (`atty`) as a product operand.
    pub(super) fn attn_src(&self, ptr: u64) -> Src {
        if self.storage.attn {
            Src::Bf16(ptr)
        } else {
            Src::Act(ptr)
        }
    }
    /// An attention activation (q, k, v; the output's gradient) as a product output.
    pub(super) fn attn_out(&self, ptr: u64) -> Out {
        if self.storage.attn {
            Out::Bf16(ptr)
        } else {
            Out::F32(ptr)
        }
    }
    /// An activation of the MLP chain (fch, GELU output, dfch) as a product output.
    pub(super) fn mlp_out(&self, ptr: u64) -> Out {
        if self.storage.mlp {
            Out::Bf16(ptr)
        } else {
            Out::F32(ptr)
        }
    }
    /// An activation of the MLP chain (fch, GELU output, dfch) as a product operand.
    pub(super) fn mlp_src(&self, ptr: u64) -> Src {
        if self.storage.mlp {
            Src::Bf16(ptr)
        } else {
            Src::Act(ptr)
        }
    }

    /// The layer's own buffer, or the shared one when the layer keeps none.
    pub(super) fn own_or_shared(&self, own: Option<&Buf>, shared: &Option<Buf>) -> u64 {
        own.or(shared.as_ref())
            .expect(
                "Acts::new allocates a shared buffer for every activation a layer does not keep",
            )
            .ptr
    }
}

/// Rows per block of the fused LayerNorm backward (`layernorm_backward`, LNB_ROWS in
/// kernels/layernorm.cu), and the largest C it takes (LNB_MAX_GROUPS x 128).
pub(super) const LN_BWD_ROWS: usize = 32;
pub(super) const LN_BWD_MAX_C: usize = 1024;

/// Row stride of the logits (and of their gradient) for a vocabulary of `v`: `v` rounded up
/// to a multiple of 8 values, so that every row starts 16-byte aligned (bf16) and the LM
/// head's three products get cuBLASLt's aligned kernels (GPT-2's 50257 is odd). The
/// padding columns take part in no result.
pub(super) fn logits_ld(v: usize) -> usize {
    v.div_ceil(8) * 8
}

/// Floats of the LayerNorm backward's partial sums for `n` rows of `c` channels: two rows
/// of `c` per part, for the fused kernel's blocks or the two-kernel path's parts.
pub(super) fn ln_parts_len(n: usize, c: usize) -> usize {
    n.div_ceil(LN_BWD_ROWS).max(PARTS) * 2 * c
}

/// Bytes of the activation buffers a training step on `b` rows of `t` tokens allocates on
/// the GPU at level `recompute` (what [`Engine::activation_bytes`] reports): with the
/// fused attention (`fused`), or the plain one (with `attn_dropout`, its masked copy too),
/// with the activations `storage` names in bf16.
///
/// [`Engine::activation_bytes`]: crate::engine::Engine::activation_bytes
pub fn activation_bytes(
    cfg: &GptConfig,
    b: usize,
    t: usize,
    recompute: Recompute,
    fused: bool,
    attn_dropout: bool,
    storage: Bf16Storage,
) -> u64 {
    Acts::planned_bytes(cfg, b, t, recompute, fused, attn_dropout, storage)
}
