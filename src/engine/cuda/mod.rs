//! CUDA engine, float32 or bf16 mixed precision: parameters, gradients, AdamW moments and
//! activations in fp32 on one GPU, mirroring the CPU reference engine (`engine::cpu`) operation for operation: the same
//! flat [`ParamLayout`] (HF Conv1D `[in, out]` weights, a bias right after its weight), tied
//! LM head over the real vocabulary only (padded rows never reach softmax or the loss),
//! targets of -1 skipped, tanh GELU, LayerNorm eps 1e-5, causal attention scaled by
//! 1/sqrt(hs), dropout masks from the CPU engine's counter-based hash (bit-identical masks
//! for the same seed), AdamW with torch's arithmetic and global-norm clipping.
//!
//! GEMMs run through cuBLAS sgemm (`CUBLAS_DEFAULT_MATH`: no TF32), on row-major operands
//! (see [`crate::cuda::cublas::Sgemm`]).
//!
//! bf16 mixed precision ([`Precision::Bf16`], `dtype=bfloat16`) is what torch autocast does
//! to GPT-2: the master parameters, gradients and AdamW moments stay fp32, and a bf16 copy
//! of the parameters is refreshed by every optimizer step (fused into `adamw_update`) and
//! every `set_params`. Every linear layer (qkv, attention projection, fc, MLP projection)
//! and the tied LM head runs its products through cuBLASLt with bf16 operands and fp32
//! accumulation (`CUBLAS_COMPUTE_32F`), forward and backward (dX, and dW accumulated into the
//! fp32 gradients with beta = 1); the fp32 activations that feed those products are rounded
//! into bf16 scratch buffers (`kernels/cast.cu`) right before each one, except the LayerNorm
//! outputs (ln1, ln2, lnf), which only products read: the LayerNorm kernels write them in
//! bf16 alone ([`LnOut`], switch `bf16_acts`; the same bits as rounding an fp32 output, at
//! half the memory and with no cast pass), and the logits gradient, which the cross-entropy
//! kernel writes in bf16 for the LM head's two backward products, and, on the bf16 fused
//! attention path, the qkv gradient, which the attention backward kernels write in bf16
//! for the qkv backward products (same switch, same bits; the fp32 gradients are never
//! written). The LayerNorm backward writes the residual-stream gradient in bf16 as well
//! as in fp32 (the fp32 one accumulates over the layers) for the next layer's backward
//! products, so no cast pass reads it again (same switch, same bits). The MLP chain is bf16 too (switch `bf16_mlp`, [`Bf16Storage`]): the fc product
//! writes its pre-activation and GELU output in bf16 (`GELU_AUX_BIAS` with a bf16 output,
//! adding the bias's bf16 copy as autocast does; the GELU is taken before rounding), the
//! MLP projection reads the GELU output as it is, and its input-gradient product writes the
//! pre-activation gradient in bf16 for the fc backward products (`DGELU`, the derivative
//! taken at the bf16 pre-activation, as llm.c does: the one value this switch changes).
//! Unfused, the same values come from the product in fp32 scratch and `gelu_forward_bf16`
//! / `gelu_backward_bf16`. The LM head writes the logits in bf16 (switch `bf16_logits`;
//! torch autocast's logits are bf16 too), the cross-entropy kernel `cross_entropy_bf16`
//! reads them widened and writes their gradient over them in bf16, which the LM head's
//! backward products read: half the bytes of the largest activation and no separate
//! gradient buffer. With the bf16 fused attention (every pass of the shape takes it: no
//! attention dropout) the attention's inputs and outputs are bf16 too (switch
//! `bf16_attn`, [`Bf16Storage::attn`]): the qkv product writes q, k, v in bf16 (`BIAS`
//! with a bf16 output, the bias's bf16 copy), the attention kernels read them as they are
//! and write their output in bf16 (`flash::FlashIo::Bf16`), the projection reads it as it
//! is, and the projection's input-gradient product writes the attention output's gradient
//! in bf16 for the attention backward, whose `D = y . dy` then sums bf16 values. LayerNorm,
//! softmax,
//! GELU, residuals, cross-entropy and AdamW stay fp32; attention's forward runs on the bf16
//! tensor-core fused kernel where it applies (below), otherwise in fp32. Both precisions share one code path: the
//! linear-layer products go through [`CudaEngine::mm`], which dispatches on the precision.
//! A product shape cuBLASLt has no bf16 algorithm for runs in fp32 instead (said once on
//! stderr; [`CudaEngine::gemm_fallbacks`] lists them).
//!
//! Fewer passes over memory (switches in [`switches`], `NANOGPT_CUDA_DISABLE`): in the bf16
//! mode the linear layers fuse their elementwise work into the cuBLASLt product as
//! epilogues (`epilogues`): the forward bias (`BIAS`), the MLP's `fc` bias and GELU with
//! the pre-activation saved for the backward pass (`GELU_AUX_BIAS`, tanh GELU), the GELU
//! derivative in the MLP projection's input gradient (`DGELU`), and the bias gradients in
//! the weight-gradient products (`BGRADA`; cuBLASLt overwrites its bias-gradient output,
//! so it lands in scratch and is then added to the fp32 gradient, which accumulates over
//! micro-steps). An epilogue cuBLASLt cannot run on a shape falls back to the separate
//! kernels ([`CudaEngine::epilogue_report`]). In both precisions every residual add
//! runs fused with the LayerNorm that follows it (`fused_ln`; the backward pass is
//! unfused).
//!
//! Attention has two forms. The fused one ([`flash`], `kernels/flash_attention.cu`) never
//! stores the `T x T` matrix: the forward keeps one logsumexp per (row, head, position) and
//! the backward recomputes the probabilities from it. In bf16 mode, when the head size is a
//! multiple of 16, forward and backward run on bf16 tensor cores (the backward recomputes
//! the scores from the same bf16 operands as the forward, so its logsumexp matches);
//! otherwise, in fp32 mode, or with the `flash_bf16` switch off, both are fp32 SIMT.
//! The plain form is, per batch row, one strided-batched GEMM over heads for `q k^T`, a
//! masked-softmax kernel, one for `P v`; the backward pass mirrors it. A pass uses the fused
//! form when it is switched on (`NANOGPT_CUDA_DISABLE`, [`switches`]), attention dropout is
//! inactive (dropout = 0, and every evaluation pass) and the kernels support the shape (head
//! size at most 128: [`flash::AttnShape::validate`]); otherwise the plain one. The forward
//! and backward of one step always take the same form (the choice depends only on the
//! shape and the dropout draw they share).
//!
//! Memory: the per-layer `T x T` probabilities (`att`), and the shared dropout-masked copy
//! (`patt`) and gradient (`datt`), are allocated the first time a plain pass needs them; a
//! run that only ever takes the fused form (dropout = 0) never holds them. The fused form
//! needs a logsumexp buffer per layer and one shared scratch vector of B * NH * T floats.
//! For GPT-2 124M (12 layers, 12 heads, C 768, vocabulary 50257) at B = 8, T = 1024 the
//! activations take 6.32 GiB with the fused form and every activation in fp32: 12 x 384
//! MiB of per-layer (B*T, k*C) tensors, 1.53 GiB of logits, 0.23 GiB of backward scratch
//! and 4.9 MiB of logsumexp and scratch vectors; the bf16 mode's default storage (bf16
//! LayerNorm outputs, MLP chain, logits and attention inputs and outputs) takes 3.53 GiB.
//! The plain form adds 384 MiB per layer for `att` (8 * 12 * 1024^2 floats) and 384 MiB
//! for `datt`: 11.19 GiB, and 11.57 GiB with attention dropout (`patt`). (Parameters, gradients and AdamW moments come on top: 4 x 0.46 GiB.)
//!
//! Activation recomputation ([`Recompute`], config key `recompute`) works as in the CPU
//! engine: at level 1 the GELU output, at level 2 also ln1 and ln2, live in one buffer
//! shared by all layers ([`Acts::gelu_shared`], [`Acts::ln_shared`]) instead of one per
//! layer. The forward pass writes them there (the fc product's GELU epilogue, the fused
//! residual + LayerNorm kernel) and the next product consumes them at once; the backward
//! pass recomputes each right before the weight gradient that reads it: the GELU with
//! `gelu_forward` from the saved pre-activation, a LayerNorm with `layernorm_recompute`
//! from its saved input, mean and rstd (the forward's own element arithmetic, so the same
//! bits). For GPT-2 124M at T = 1024 level 1 saves 11 x B x 12 MiB and level 2 another
//! 23 x B x 3 MiB (see BENCHMARKS.md). One exception to bit-identical gradients: where the
//! fc product runs cuBLASLt's GELU epilogue (bf16 with `epilogues` on), the forward's GELU is
//! cuBLASLt's and the recomputed one `gelu_forward`'s, and with the bf16 MLP chain the
//! forward's GELU is taken at the fp32 pre-activation and the recomputed one at its saved
//! bf16 rounding; so the MLP projection's weight gradient can differ where the two round a
//! value to different bf16 neighbours; the loss and every other gradient stay
//! bit-identical.
//!
//! Host and GPU overlap across micro-steps: the token inputs and targets reach the GPU
//! through pinned staging buffers (`cuMemcpyHtoDAsync` on the compute stream) and the
//! per-row losses come back the same way, read only after the backward pass has been
//! enqueued ([`CudaEngine::train_step`]). The host therefore waits for the forward pass
//! and the loss, never for the backward: while the GPU runs it, the trainer fetches the
//! next micro-batch and enqueues its copies and kernels behind it, so the GPU does not go
//! idle between micro-steps (before, a synchronous copy of the inputs waited for the
//! previous backward pass and the loss read stalled the backward's launches). The copies
//! are a few tens of KiB per micro-step, in stream order, so they need no copy stream of
//! their own.
//!
//! The other kernels (`kernels/*.cu`) are compiled by NVRTC for
//! the GPU when the engine starts and cached on disk ([`kernels`]).
//!
//! Activation layout per layer (N = B*T rows) is the CPU engine's: ln1 (N,C) -> qkv (N,3C)
//! -> att (B,NH,T,T) (plain) or lse (B,NH,T) (fused) -> atty (N,C) -> res2 -> ln2 ->
//! fch (N,4C) -> gelu -> res3. Activation buffers are sized for a (B, T capacity) and
//! reused for any shorter T.
//!
//! Differences from the CPU engine that tests must allow for: fp32 sums run in a different
//! order (warp and block reductions, cuBLAS blocking), the token-embedding gradient is
//! accumulated with atomics (order not fixed), and kernels may contract `a*b+c` into FMAs.
//!
//! Decoding (`decode_*`) keeps a KV cache on the GPU (`decode.rs`): the prompt goes through
//! the layers once, then each new token runs one position per sequence and attends over
//! the cached keys and values (O(current length) per token), with the CPU engine's
//! semantics (a full cache refuses further steps; the sampler re-prefills a cropped window).
//!
//! Trait methods without a `Result` (`step`, `params`, `grads`, ...) panic with the CUDA
//! error if the GPU fails underneath them (a lost device cannot be recovered from).

mod decode;
pub mod flash;
pub mod kernels;
pub mod profile;
pub mod stack;
pub mod switches;

use super::dropout::{Dropout, DropoutSeeds};
use super::{Batch, Engine, EngineError, OptimizerState, Recompute, Result};
use crate::cuda::bf16::bf16_bits_to_f32;
use crate::cuda::cublas::{Operand, Sgemm};
use crate::cuda::cublaslt::{ElemType, Epilogue, EpilogueArgs, MatmulCache, MatmulShape, Ran};
use crate::cuda::driver::{Context, DeviceBuffer, Staging, Stream};
use crate::cuda::CudaError;
use crate::model::{GptConfig, ParamLayout};
use crate::optim::AdamWConfig;
use crate::rng::Rng;
use decode::DecodeState;
use flash::{AttnShape, FlashIo, FlashMath};
use kernels::{grid_cols4, grid_rows, grid_vec, launch, Arg, Kernels, BLOCK};
use stack::Stack;
use std::cell::{Cell, OnceCell, RefCell};
use switches::Switches;

type Buf = DeviceBuffer<'static>;
type CResult<T> = std::result::Result<T, CudaError>;

/// Row groups for deterministic column sums (bias and LayerNorm weight gradients).
const PARTS: usize = 64;
/// Blocks of the gradient-norm reduction (fixed, so the sum order does not depend on the GPU).
const NORM_PARTS: usize = 1024;
/// cuBLASLt workspace of the bf16 mode (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;
/// bf16 scratch slots: the activation operand of a product, and a gradient rounded once for
/// the two products of a backward step.
const SLOT_ACT: usize = 0;
const SLOT_GRAD: usize = 1;
/// [`Acts::staged`]: token inputs, targets, per-row losses.
const STAGE_INPUTS: usize = 0;
const STAGE_TARGETS: usize = 1;
const STAGE_LOSSES: usize = 2;

/// The arithmetic of the linear layers and the LM head (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// The bf16 mode's state: cuBLASLt plans, their workspace, the bf16 parameter copy and the
/// scratch the activations are rounded into.
struct Bf16State {
    lt: MatmulCache<'static>,
    workspace: Buf,
    params: Buf,
    scratch: [RefCell<Option<Buf>>; 2],
    /// fp32 copies of bf16-only operands ([`Src::Bf16`]; A, B) for a product cuBLASLt
    /// cannot run in bf16 (computed in fp32 instead).
    widened: [RefCell<Option<Buf>>; 2],
    /// The fp32 values of a bf16 product output (the bf16 MLP chain) when the product and
    /// its GELU run unfused ([`CudaEngine::wide_out`]); allocated on first use.
    wide_out: RefCell<Option<Buf>>,
    warned: Cell<bool>,
}

impl Bf16State {
    /// Address of element `off` of the bf16 parameter copy (the layout's offsets).
    fn param(&self, off: usize) -> u64 {
        self.params.ptr + 2 * off as u64
    }
}

/// Where an operand of a linear-layer product comes from (see [`CudaEngine::mm`]).
#[derive(Clone, Copy, Debug)]
enum Src {
    /// An fp32 activation; the bf16 mode rounds it into scratch first.
    Act(u64),
    /// The parameter tensor at this offset of the layout (bf16 mode: its bf16 copy).
    Param(usize),
    /// An fp32 tensor (first) already rounded to bf16 (second) by [`CudaEngine::rounded`].
    Rounded(u64, u64),
    /// An activation stored in bf16 only (the bf16 mode's LayerNorm outputs, [`LnOut`]).
    Bf16(u64),
}

/// Where a LayerNorm writes its output (`kernels/layernorm.cu`): an fp32 buffer, or, in the
/// bf16 mode with the `bf16_acts` switch on, a bf16 buffer. A LayerNorm output is read only
/// by matrix products (the next linear layer forward, its weight gradient backward), which
/// take bf16 operands in that mode: stored in bf16 it is written at half the bytes and never
/// rounded by a separate cast pass.
#[derive(Clone, Copy, Debug)]
enum LnOut {
    F32(u64),
    Bf16(u64),
}

impl LnOut {
    /// The kernels' `out, out_bf16` arguments (the unused one null).
    fn args(self) -> [Arg; 2] {
        match self {
            LnOut::F32(p) => [Arg::Ptr(p), Arg::Ptr(0)],
            LnOut::Bf16(p) => [Arg::Ptr(0), Arg::Ptr(p)],
        }
    }
    /// The output as a product operand.
    fn src(self) -> Src {
        match self {
            LnOut::F32(p) => Src::Act(p),
            LnOut::Bf16(p) => Src::Bf16(p),
        }
    }
}

/// A linear-layer product operand: source, used transposed or not, row stride.
#[derive(Clone, Copy, Debug)]
struct Lin {
    src: Src,
    trans: bool,
    ld: usize,
}

impl Lin {
    fn n(src: Src, ld: usize) -> Lin {
        Lin {
            src,
            trans: false,
            ld,
        }
    }
    fn t(src: Src, ld: usize) -> Lin {
        Lin {
            src,
            trans: true,
            ld,
        }
    }
}

/// What a linear-layer product does besides `C = op(A) op(B) + beta C` (see
/// [`CudaEngine::mm_ep`]). Fused into the cuBLASLt product as an epilogue in the bf16 mode
/// (switch `epilogues`), else separate kernels around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Post {
    /// Nothing more.
    None,
    /// `C = op(A) op(B) + bias`, the bias broadcast over the rows (beta 0, ldc = n): the
    /// fp32 parameter, or, with a bf16 C, its bf16 copy (cuBLASLt's bias has C's type; the
    /// unfused path adds the same widened copy).
    Bias(BiasPtrs),
    /// `pre = op(A) op(B) (+ bias)`, `C = gelu(pre)` (beta 0, ldc = n; `pre` m x n, of C's
    /// type). With a bf16 C (the bf16 MLP chain) `pre` and C are both rounded from the fp32
    /// value, the GELU taken before rounding, and the fused epilogue adds the bias's bf16
    /// copy (cuBLASLt's bias has C's type).
    Gelu { bias: BiasPtrs, pre: u64 },
    /// `C = (op(A) op(B)) * gelu'(pre)` (beta 0, ldc = n; `pre` of C's type).
    DGelu { pre: u64 },
    /// `C = op(A) op(B) + beta C` and `db += column sums of B` (B stored k x n with row
    /// stride n, not transposed): the bias gradient next to the weight gradient
    /// `dW += X^T dY`. `tmp` holds `PARTS * n` fp32 values.
    BiasGrad { db: u64, tmp: u64 },
}

/// The output C of a linear-layer product ([`CudaEngine::mm_ep`]): fp32, or, in the bf16
/// mode, bf16 (cuBLASLt writes it rounded; unfused, the fp32 values go through scratch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    F32(u64),
    Bf16(u64),
}

/// A bias vector (0 = none): the fp32 parameter, and its bf16 copy for a fused epilogue
/// on a product with a bf16 C (0 in fp32 mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BiasPtrs {
    f32: u64,
    bf16: u64,
}

/// The cuBLASLt epilogue of `post` on a product with `n` columns (None: nothing to fuse).
/// The bias gradient is the sum over k of the row-major B (`dY` in `dW = X^T dY`), which
/// cuBLASLt sees as its A: `BGRADA`. cuBLASLt writes it (never accumulates), so it goes to
/// `tmp` and is then added to the fp32 gradient, which accumulates over micro-steps.
/// `bf16_out`: C is bf16 (the GELU's bias is then the bf16 copy).
fn epilogue_args(post: Post, n: usize, bf16_out: bool) -> Option<EpilogueArgs> {
    let (ep, bias, aux) = match post {
        Post::None => return None,
        Post::Bias(b) => (Epilogue::Bias, if bf16_out { b.bf16 } else { b.f32 }, 0),
        Post::Gelu { bias, pre } => {
            let b = if bf16_out { bias.bf16 } else { bias.f32 };
            (Epilogue::GeluAux { bias: b != 0 }, b, pre)
        }
        Post::DGelu { pre } => (Epilogue::DGelu, 0, pre),
        Post::BiasGrad { tmp, .. } => (Epilogue::BiasGradB, tmp, 0),
    };
    Some(EpilogueArgs {
        ep,
        bias,
        aux,
        aux_ld: if aux != 0 { n } else { 0 },
    })
}

fn cuda_err(e: CudaError) -> EngineError {
    EngineError::Other(format!("CUDA: {e}"))
}

/// Address of element `elems` of an f32 buffer starting at `ptr`.
fn at(ptr: u64, elems: usize) -> u64 {
    ptr + 4 * elems as u64
}

/// Which activations the bf16 mode stores in bf16 only: the LayerNorm outputs (`ln`,
/// switch `bf16_acts`; [`LnOut`]), the MLP's pre-activation, GELU output and
/// pre-activation gradient (`mlp`, switch `bf16_mlp`), and the logits with their gradient
/// in place (`logits`, switch `bf16_logits`), and the attention's q, k, v, output and
/// output gradient (`attn`, switch `bf16_attn`, with the bf16 fused attention only). All
/// false in fp32 mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bf16Storage {
    pub ln: bool,
    pub mlp: bool,
    pub logits: bool,
    pub attn: bool,
}

impl Bf16Storage {
    /// Bytes per value of an activation stored in bf16 (`bf16`) or fp32.
    fn value_bytes(bf16: bool) -> usize {
        if bf16 {
            2
        } else {
            4
        }
    }
    fn ln_bytes(self) -> usize {
        Self::value_bytes(self.ln)
    }
    fn mlp_bytes(self) -> usize {
        Self::value_bytes(self.mlp)
    }
    fn logits_bytes(self) -> usize {
        Self::value_bytes(self.logits)
    }
    fn attn_bytes(self) -> usize {
        Self::value_bytes(self.attn)
    }
    /// How the fused attention's tensors are stored.
    fn attn_io(self) -> FlashIo {
        if self.attn {
            FlashIo::Bf16
        } else {
            FlashIo::F32
        }
    }
}

/// Saved activations of one transformer block. `ln1`, `ln2` (level 2) and `fch_gelu`
/// (levels 1 and 2) are `None` when recomputed (see [`Acts::gelu_shared`]).
struct LayerActs {
    ln1: Option<Buf>,
    ln1_mean: Buf,
    ln1_rstd: Buf,
    qkv: Buf,
    /// Attention probabilities (B, NH, T, T): plain path only, allocated on first use.
    att: OnceCell<Buf>,
    /// Per-row logsumexp (B, NH, T): fused path only, allocated on first use.
    lse: OnceCell<Buf>,
    atty: Buf,
    res2: Buf,
    ln2: Option<Buf>,
    ln2_mean: Buf,
    ln2_rstd: Buf,
    fch: Buf,
    fch_gelu: Option<Buf>,
    res3: Buf,
}

/// Activation and backward scratch memory for `b` rows of up to `t_cap` tokens.
struct Acts {
    b: usize,
    t_cap: usize,
    recompute: Recompute,
    /// LayerNorm outputs (ln1, ln2, lnf, `ln_shared`) are bf16 ([`LnOut::Bf16`]) with
    /// `ln`; fch, the GELU outputs and dfch with `mlp`.
    storage: Bf16Storage,
    inputs: Buf,
    targets: Buf,
    encoded: Buf,
    layers: Vec<LayerActs>,
    lnf: Buf,
    lnf_mean: Buf,
    lnf_rstd: Buf,
    logits: Buf,
    row_loss: Buf,
    /// Pinned host staging of the token inputs, the targets and the per-row losses: the
    /// host hands a micro-batch over and asks for its loss without waiting for the GPU
    /// (see [`CudaEngine::train_step`]).
    staged: [Staging<'static>; 3],
    dres: Buf,
    dtmp: Buf,
    dln: Buf,
    dfch: Buf,
    dqkv: Buf,
    /// (B, NH, T, T) gradient of the probabilities: plain backward only, on first use.
    datt: OnceCell<Buf>,
    /// (B, NH, T, T) dropout-masked probabilities: plain path with attention dropout only.
    patt: OnceCell<Buf>,
    /// (B, NH, T) scratch of the fused backward, on first use.
    dvec: OnceCell<Buf>,
    ln_parts: Buf,
    bias_parts: Buf,
    /// The GELU output (N, 4C) of the layer being computed, levels 1 and 2.
    gelu_shared: Option<Buf>,
    /// ln1 or ln2 (N, C) of the layer being computed, level 2 (never both at once).
    ln_shared: Option<Buf>,
}

impl Acts {
    fn new(
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
            logits: ctx.alloc(storage.logits_bytes() * n * cfg.vocab_size)?,
            row_loss: ctx.alloc(8 * n)?,
            staged: [
                Staging::new(ctx, 4 * n)?,
                Staging::new(ctx, 4 * n)?,
                Staging::new(ctx, 8 * n)?,
            ],
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
    /// [`CudaEngine::memory_report`]'s figures.
    fn planned_bytes(
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
            + storage.logits_bytes() * n * cfg.vocab_size
            + storage.attn_bytes() * attn_values
            + 8 * n) as u64 // row_loss: f64
    }

    fn ln1(&self, l: usize) -> LnOut {
        self.ln_out(self.own_or_shared(self.layers[l].ln1.as_ref(), &self.ln_shared))
    }
    fn ln2(&self, l: usize) -> LnOut {
        self.ln_out(self.own_or_shared(self.layers[l].ln2.as_ref(), &self.ln_shared))
    }
    fn lnf(&self) -> LnOut {
        self.ln_out(self.lnf.ptr)
    }
    fn ln_out(&self, ptr: u64) -> LnOut {
        if self.storage.ln {
            LnOut::Bf16(ptr)
        } else {
            LnOut::F32(ptr)
        }
    }
    fn gelu(&self, l: usize) -> u64 {
        self.own_or_shared(self.layers[l].fch_gelu.as_ref(), &self.gelu_shared)
    }
    /// The attention output (`atty`) as a product operand.
    fn attn_src(&self, ptr: u64) -> Src {
        if self.storage.attn {
            Src::Bf16(ptr)
        } else {
            Src::Act(ptr)
        }
    }
    /// An attention activation (q, k, v; the output's gradient) as a product output.
    fn attn_out(&self, ptr: u64) -> Out {
        if self.storage.attn {
            Out::Bf16(ptr)
        } else {
            Out::F32(ptr)
        }
    }
    /// An activation of the MLP chain (fch, GELU output, dfch) as a product output.
    fn mlp_out(&self, ptr: u64) -> Out {
        if self.storage.mlp {
            Out::Bf16(ptr)
        } else {
            Out::F32(ptr)
        }
    }
    /// An activation of the MLP chain (fch, GELU output, dfch) as a product operand.
    fn mlp_src(&self, ptr: u64) -> Src {
        if self.storage.mlp {
            Src::Bf16(ptr)
        } else {
            Src::Act(ptr)
        }
    }

    /// The layer's own buffer, or the shared one when the layer keeps none.
    fn own_or_shared(&self, own: Option<&Buf>, shared: &Option<Buf>) -> u64 {
        own.or(shared.as_ref())
            .expect(
                "Acts::new allocates a shared buffer for every activation a layer does not keep",
            )
            .ptr
    }
}

/// Rows per block of the fused LayerNorm backward (`layernorm_backward`, LNB_ROWS in
/// kernels/layernorm.cu), and the largest C it takes (LNB_MAX_GROUPS x 128).
const LN_BWD_ROWS: usize = 32;
const LN_BWD_MAX_C: usize = 1024;

/// Floats of the LayerNorm backward's partial sums for `n` rows of `c` channels: two rows
/// of `c` per part, for the fused kernel's blocks or the two-kernel path's parts.
fn ln_parts_len(n: usize, c: usize) -> usize {
    n.div_ceil(LN_BWD_ROWS).max(PARTS) * 2 * c
}

/// Bytes of the activation buffers a training step on `b` rows of `t` tokens allocates on
/// the GPU at level `recompute` (what [`Engine::activation_bytes`] reports): with the fused
/// attention (`fused`), or the plain one (with `attn_dropout`, its masked copy too), with
/// the activations `storage` names in bf16.
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

/// A loss enqueued by [`CudaEngine::cross_entropy`]: `rows` per-row losses on their way to
/// the host, `count` of them counted (target not -1).
#[derive(Clone, Copy, Debug)]
struct PendingLoss {
    rows: usize,
    count: usize,
}

/// The CUDA engine (float32 or bf16 mixed precision). See the module docs.
pub struct CudaEngine {
    // Device memory and handles first: fields drop in order, and all of these must go
    // while the context (last) is still alive.
    /// Event timers around every operation, while `profile_step` runs (see [`profile`]).
    profiler: Option<profile::Profiler>,
    decode: Option<DecodeState>,
    bf: Option<Bf16State>,
    acts: Option<Acts>,
    params: Buf,
    grads: Buf,
    /// AdamW moments of `opt_shard` (the whole layout unless ZeRO-1 narrowed it).
    m: Buf,
    v: Buf,
    opt_shard: std::ops::Range<usize>,
    /// The weight-decay runs of the shard they were built for, as `adamw_update` reads
    /// them: (start, decays) pairs of i64 relative to the shard, and their count.
    adamw_runs: Option<(std::ops::Range<usize>, Buf, usize)>,
    norm_parts: Buf,
    blas: Sgemm,
    k: Kernels,
    stream: Stream<'static>,
    ctx: Context<'static>,
    cfg: GptConfig,
    layout: ParamLayout,
    /// (offset, len, decays) with adjacent tensors of the same decay merged.
    runs: Vec<(usize, usize, bool)>,
    host_grads: Vec<f32>,
    /// `host_grads` was handed out by `grads_mut` and may differ from the device copy.
    host_grads_dirty: bool,
    step: u64,
    rng: Rng,
    name: String,
    /// The GPU's dense bf16 peak (bf16 mode on a GPU the table knows).
    peak: Option<f64>,
    /// The optimisations in use (read from `NANOGPT_CUDA_DISABLE` at construction).
    switches: Switches,
    recompute: Recompute,
}

// SAFETY: the engine owns its CUDA context, stream, handles and memory exclusively; CUDA
// handles may be used from any thread once the context is current, and every method that
// touches the GPU makes it current first.
unsafe impl Send for CudaEngine {}

fn merge_runs(runs: Vec<(usize, usize, bool)>) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (off, len, d) in runs {
        match out.last_mut() {
            Some(last) if last.2 == d && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, d)),
        }
    }
    out
}

impl CudaEngine {
    /// A float32 engine on GPU `device` over `params` (flat, in [`ParamLayout`] order).
    pub fn new(cfg: GptConfig, params: Vec<f32>, seed: u64, device: usize) -> Result<Self> {
        Self::with_precision(cfg, params, seed, device, Precision::F32)
    }

    /// An engine on GPU `device` over `params` computing its linear layers in `precision`.
    /// bf16 needs a GPU of compute capability 8.0 or newer. The optimisations come from
    /// `NANOGPT_CUDA_DISABLE` ([`switches`]); an unknown name there is an error.
    pub fn with_precision(
        cfg: GptConfig,
        params: Vec<f32>,
        seed: u64,
        device: usize,
        precision: Precision,
    ) -> Result<Self> {
        let switches = Switches::from_env().map_err(|e| {
            EngineError::Other(format!(
                "{e} (a comma-separated list; unset the variable to use every optimisation)"
            ))
        })?;
        Self::with_switches(cfg, params, seed, device, precision, switches)
    }

    /// As [`CudaEngine::with_precision`] with the optimisations given explicitly instead of
    /// read from the environment (for comparing them, e.g. in tests).
    pub fn with_switches(
        cfg: GptConfig,
        params: Vec<f32>,
        seed: u64,
        device: usize,
        precision: Precision,
        switches: Switches,
    ) -> Result<Self> {
        let layout = super::layout_for(&cfg, params.len())?;
        let stack: &'static Stack = stack::stack().map_err(EngineError::Other)?;
        let Some(info) = stack.gpus.get(device) else {
            return Err(EngineError::Other(format!(
                "device=cuda:{device}: this machine has {} GPU(s) (cuda:0 to cuda:{}); pick one \
                 of those or check CUDA_VISIBLE_DEVICES",
                stack.gpus.len(),
                stack.gpus.len().saturating_sub(1)
            )));
        };
        let (ma, mi) = info.compute_capability;
        if precision == Precision::Bf16 && ma < 8 {
            return Err(EngineError::Other(format!(
                "device=cuda:{device} dtype=bfloat16: {} is sm_{ma}{mi}, and bf16 matrix \
                 products need sm_80 or newer (A100, RTX 30xx, H100 and later); use \
                 dtype=float32 on this GPU",
                info.name.trim()
            )));
        }
        let ctx = stack.driver.context(device).map_err(cuda_err)?;
        let stream = ctx.stream().map_err(cuda_err)?;
        let target = kernels::target_for(stack, ma * 10 + mi).map_err(cuda_err)?;
        let k = Kernels::load(stack, &ctx, target).map_err(cuda_err)?;
        let blas = Sgemm::new(&stack.cublas, &stream).map_err(|e| {
            EngineError::Other(format!(
                "CUDA: {e}; {} (run `nanogpt doctor` for details)",
                crate::cuda::discover::LibKind::Cublas.advice()
            ))
        })?;
        let total = layout.total;
        let oom = |what: &str, e: CudaError| {
            EngineError::Other(format!(
                "CUDA: cannot allocate the {what} ({} MiB) on cuda:{device} ({}): {e}",
                (total * 4) >> 20,
                info.name
            ))
        };
        let p = ctx.upload(&params).map_err(|e| oom("parameters", e))?;
        let zeros = |what: &str| -> Result<Buf> {
            let b = ctx.alloc(4 * total).map_err(|e| oom(what, e))?;
            b.zero().map_err(cuda_err)?;
            Ok(b)
        };
        let grads = zeros("gradients")?;
        let m = zeros("AdamW first moments")?;
        let v = zeros("AdamW second moments")?;
        let norm_parts = ctx.alloc(8 * NORM_PARTS).map_err(cuda_err)?;
        let bf = match precision {
            Precision::F32 => None,
            Precision::Bf16 => {
                let lt = MatmulCache::new(&stack.cublaslt, LT_WORKSPACE).map_err(|e| {
                    EngineError::Other(format!(
                        "CUDA: {e}; {} (run `nanogpt doctor` for details)",
                        crate::cuda::discover::LibKind::CublasLt.advice()
                    ))
                })?;
                Some(Bf16State {
                    lt,
                    workspace: ctx
                        .alloc(LT_WORKSPACE)
                        .map_err(|e| oom("cuBLASLt workspace", e))?,
                    params: ctx
                        .alloc(2 * total)
                        .map_err(|e| oom("bf16 parameter copy", e))?,
                    scratch: [RefCell::new(None), RefCell::new(None)],
                    widened: [RefCell::new(None), RefCell::new(None)],
                    wide_out: RefCell::new(None),
                    warned: Cell::new(false),
                })
            }
        };
        let tag = match precision {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        };
        let off: String = switches
            .disabled()
            .iter()
            .map(|o| format!(", {o} off"))
            .collect();
        let name = format!(
            "cuda:{device} ({}, sm_{ma}{mi}, {tag}{off})",
            info.name.trim()
        );
        let peak = match precision {
            Precision::Bf16 => crate::cuda::peak::bf16_peak(&info.name).map(|p| p.flops()),
            Precision::F32 => None,
        };
        let engine = CudaEngine {
            bf,
            acts: None,
            params: p,
            grads,
            m,
            v,
            opt_shard: 0..total,
            adamw_runs: None,
            norm_parts,
            blas,
            k,
            stream,
            ctx,
            runs: merge_runs(layout.decay_runs()),
            layout,
            cfg,
            host_grads: Vec::new(),
            host_grads_dirty: false,
            step: 0,
            rng: Rng::derive(seed, 0xD50F),
            decode: None,
            name,
            peak,
            switches,
            profiler: None,
            recompute: Recompute::Nothing,
        };
        engine.refresh_bf16_params().map_err(cuda_err)?;
        Ok(engine)
    }

    /// The optimisations this engine uses.
    pub fn switches(&self) -> Switches {
        self.switches
    }

    /// Which attention a pass over `b` rows of `t` tokens takes: `Some(math)` for the fused
    /// kernels with that forward arithmetic, `None` for the plain path. `training` says
    /// whether a backward pass follows (a `forward_backward` pass, with attention dropout
    /// when the model's dropout is above 0). The forward and backward of a pass use the same
    /// arithmetic: each backward recomputes the probabilities the way its forward computed
    /// the scores, from the forward's logsumexp (mixing them would leave rows that do not
    /// sum to 1). bf16 mode uses the bf16 tensor-core kernels, for every pass, when the head
    /// size is a multiple of 16 and the `flash_bf16` switch is on.
    pub fn fused_attention(&self, b: usize, t: usize, training: bool) -> Option<FlashMath> {
        if !self.switches.flash || (training && self.cfg.dropout > 0.0) {
            return None;
        }
        let shape = self.attn_shape(b, t);
        shape.validate(FlashMath::F32).ok()?;
        if self.switches.flash_bf16 && self.bf.is_some() && shape.validate(FlashMath::Bf16).is_ok()
        {
            Some(FlashMath::Bf16)
        } else {
            Some(FlashMath::F32)
        }
    }

    /// Bytes of `T x T` attention buffers allocated so far (the plain path's `att` of
    /// every layer, `patt` and `datt`); 0 while only the fused path has run.
    pub fn attention_matrix_bytes(&self) -> usize {
        self.acts.as_ref().map_or(0, |a| {
            let layers: usize = a
                .layers
                .iter()
                .filter_map(|la| la.att.get())
                .map(|b| b.bytes)
                .sum();
            layers
                + [&a.patt, &a.datt]
                    .iter()
                    .filter_map(|c| c.get())
                    .map(|b| b.bytes)
                    .sum::<usize>()
        })
    }

    /// The arithmetic of the linear layers and the LM head.
    pub fn precision(&self) -> Precision {
        if self.bf.is_some() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// The product shapes the bf16 mode computed in fp32 because cuBLASLt has no bf16
    /// algorithm for them (empty in fp32 mode).
    pub fn gemm_fallbacks(&self) -> Vec<String> {
        self.bf
            .as_ref()
            .map_or_else(Vec::new, |bf| bf.lt.unsupported())
    }

    /// (shapes planned on cuBLASLt, shapes computed in fp32 instead); (0, 0) in fp32 mode.
    pub fn lt_plan_counts(&self) -> (usize, usize) {
        self.bf.as_ref().map_or((0, 0), |bf| bf.lt.counts())
    }

    /// bf16 mode: rounds the fp32 parameters into their bf16 copy (no-op in fp32).
    fn refresh_bf16_params(&self) -> CResult<()> {
        let Some(bf) = &self.bf else {
            return Ok(());
        };
        self.ctx.make_current()?;
        self.cast_bf16(bf.params.ptr, self.params.ptr, self.layout.total)?;
        self.stream.synchronize()
    }

    fn cast_bf16(&self, out: u64, inp: u64, n: usize) -> CResult<()> {
        self.run(
            self.k.cast_f32_to_bf16,
            grid_vec(n),
            &[Arg::Ptr(out), Arg::Ptr(inp), Arg::I64(n as i64)],
        )
    }

    /// bf16 scratch `slot` with room for `elems` values, grown (after the stream has
    /// finished with the old buffer) when too small.
    fn scratch(&self, bf: &Bf16State, slot: usize, elems: usize) -> CResult<u64> {
        self.grown(&bf.scratch[slot], 2 * elems)
    }

    /// The buffer in `cell`, replaced (after the stream has finished with the old one) by
    /// a larger one when it holds fewer than `bytes`.
    fn grown(&self, cell: &RefCell<Option<Buf>>, bytes: usize) -> CResult<u64> {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|b| b.bytes < bytes) {
            self.stream.synchronize()?;
            *cell = None;
            *cell = Some(self.ctx.alloc(bytes)?);
        }
        Ok(cell.as_ref().expect("allocated just above").ptr)
    }

    /// fp32 scratch for `elems` values of a product whose output is stored in bf16 (and
    /// its bias), when the product runs without its fused epilogue (the bf16 mode only).
    fn wide_out(&self, elems: usize) -> CResult<u64> {
        let bf = self
            .bf
            .as_ref()
            .expect("bf16 outputs exist only in the bf16 mode");
        self.grown(&bf.wide_out, 4 * elems)
    }

    /// The fp32 tensor at `ptr` (`elems` values) as a product operand; the bf16 mode rounds
    /// it once into the gradient scratch, for use by several products.
    fn rounded(&self, ptr: u64, elems: usize) -> CResult<Src> {
        let Some(bf) = &self.bf else {
            return Ok(Src::Act(ptr));
        };
        let q = self.scratch(bf, SLOT_GRAD, elems)?;
        self.cast_bf16(q, ptr, elems)?;
        Ok(Src::Rounded(ptr, q))
    }

    /// The bf16 address of operand `o`, stored `rows x cols` with row stride `o.ld`.
    fn bf16_operand(&self, bf: &Bf16State, o: Lin, (rows, cols): (usize, usize)) -> CResult<u64> {
        Ok(match o.src {
            Src::Param(off) => bf.param(off),
            Src::Rounded(_, q) | Src::Bf16(q) => q,
            Src::Act(p) => {
                let n = MatmulShape::extent(rows, cols, o.ld);
                let q = self.scratch(bf, SLOT_ACT, n)?;
                self.cast_bf16(q, p, n)?;
                q
            }
        })
    }

    /// Operand `o` (stored `rows x cols`) with an fp32 source: a [`Src::Bf16`] activation is
    /// widened (exactly) into the bf16 mode's fp32 scratch `slot` (0 for A, 1 for B); the
    /// others have one already.
    fn fp32_operand(&self, o: Lin, (rows, cols): (usize, usize), slot: usize) -> CResult<Lin> {
        let Src::Bf16(q) = o.src else {
            return Ok(o);
        };
        let bf = self
            .bf
            .as_ref()
            .expect("bf16-only activations exist only in the bf16 mode");
        let n = MatmulShape::extent(rows, cols, o.ld);
        let wide = self.grown(&bf.widened[slot], 4 * n)?;
        self.run(
            self.k.cast_bf16_to_f32,
            grid_vec(n),
            &[Arg::Ptr(wide), Arg::Ptr(q), Arg::I64(n as i64)],
        )?;
        Ok(Lin {
            src: Src::Act(wide),
            ..o
        })
    }

    /// Whether linear-layer products fuse their bias, GELU and bias gradient as cuBLASLt
    /// epilogues: the bf16 mode with the `epilogues` switch on.
    fn fusing(&self) -> bool {
        self.bf.is_some() && self.switches().epilogues
    }

    /// The products with a fused epilogue planned so far, each ending in "fused" or
    /// "unfused: <why>" (then computed by separate kernels); empty in fp32 mode or with
    /// the `epilogues` switch off.
    pub fn epilogue_report(&self) -> Vec<String> {
        self.bf
            .as_ref()
            .map_or_else(Vec::new, |bf| bf.lt.epilogue_report())
    }

    /// The one GEMM entry point of the linear layers and the LM head: row-major
    /// `C (m x n, fp32, row stride ldc) = op(A) op(B) + beta C`. fp32: cuBLAS sgemm on the
    /// fp32 tensors. bf16: cuBLASLt on bf16 copies (parameters: the bf16 copy; activations:
    /// rounded into scratch) with fp32 accumulation and fp32 C. At most one operand may be
    /// an [`Src::Act`] (one activation scratch slot).
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Lin,
        b: Lin,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> CResult<()> {
        self.mm_ep(m, n, k, a, b, beta, Out::F32(c), ldc, Post::None)
    }

    /// [`CudaEngine::mm`] into `c` (fp32, or in the bf16 mode bf16: beta 0, contiguous),
    /// followed by `post`. With [`CudaEngine::fusing`] the product and `post` are one
    /// cuBLASLt call (an epilogue), so the output is written once and not read back, and a
    /// bf16 C is always written by the product itself; otherwise, or when cuBLASLt cannot
    /// run that epilogue or output on this shape, the separate kernels run around the
    /// product (the same bf16 operands, rounded once; a bf16 C gets its values through
    /// fp32 scratch).
    #[allow(clippy::too_many_arguments)]
    fn mm_ep(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Lin,
        b: Lin,
        beta: f32,
        c: Out,
        ldc: usize,
        post: Post,
    ) -> CResult<()> {
        match post {
            Post::None => {}
            Post::BiasGrad { .. } => assert!(
                !b.trans && b.ld == n && !matches!(b.src, Src::Param(_)),
                "a bias gradient sums an activation gradient B stored k x n"
            ),
            _ => assert!(
                beta == 0.0 && ldc == n,
                "bias and GELU epilogues overwrite a contiguous C"
            ),
        }
        let (c_ptr, c_bf16) = match c {
            Out::F32(p) => (p, false),
            Out::Bf16(p) => (p, true),
        };
        assert!(
            !c_bf16
                || (self.bf.is_some()
                    && beta == 0.0
                    && ldc == n
                    && !matches!(post, Post::BiasGrad { .. })),
            "a bf16 C: bf16 mode, overwritten, contiguous, no bias (gradient) epilogue"
        );
        // An fp32 view of an operand that has one (not Src::Bf16: see fp32_operand).
        let fp32 = |o: Lin| Operand {
            ptr: match o.src {
                Src::Act(p) | Src::Rounded(p, _) => p,
                Src::Param(off) => self.p(off),
                Src::Bf16(_) => unreachable!("a bf16-only operand is widened first"),
            },
            trans: o.trans,
            ld: o.ld,
            stride: 0,
        };
        // The product as cuBLASLt plans it (bf16 A and B, fp32 C); its stored operand sizes
        // also serve the fp32 fallback.
        let shape = MatmulShape {
            m,
            n,
            k,
            trans_a: a.trans,
            trans_b: b.trans,
            lda: a.ld,
            ldb: b.ld,
            ldc,
            ab: ElemType::Bf16,
            c: ElemType::F32,
            align: [0; 3],
        };
        let [sa, sb, _] = shape.stored();
        let lt = match &self.bf {
            None => None,
            Some(bf) => {
                debug_assert!(
                    !(matches!(a.src, Src::Act(_)) && matches!(b.src, Src::Act(_))),
                    "one activation scratch slot: at most one Src::Act operand per product"
                );
                crate::cuda::cublaslt::col_major(&shape)?;
                let pa = self.bf16_operand(bf, a, sa)?;
                let pb = self.bf16_operand(bf, b, sb)?;
                Some((bf, shape, pa, pb))
            }
        };
        if let Some((bf, shape, pa, pb)) = lt {
            // One cuBLASLt call: the product with its epilogue fused, or, with nothing to
            // fuse, a bf16 C written by the product itself.
            let args = epilogue_args(post, n, c_bf16).filter(|_| self.switches().epilogues);
            if args.is_some() || (c_bf16 && post == Post::None) {
                let shape = MatmulShape {
                    c: if c_bf16 {
                        ElemType::Bf16
                    } else {
                        ElemType::F32
                    },
                    ..shape
                };
                // SAFETY: pa, pb and c cover the shape (as in the plain product below); the
                // bias is the layer's bias of C's type (n values) or `tmp` (at least n fp32
                // values), the GELU input an m x n activation of C's type, row stride n.
                let ran = unsafe { self.lt_product(bf, shape, (pa, pb), beta, c_ptr, args)? };
                if ran == Ran::Lt {
                    if let Post::BiasGrad { db, tmp } = post {
                        self.add(db, tmp, n)?;
                    }
                    return Ok(());
                }
            }
        }
        // Unfused: the separate kernels around the product, which writes fp32 (a bf16 C
        // gets its values from an fp32 scratch).
        let (out, beta) = match (post, c) {
            (Post::Bias(bias), Out::F32(c)) => {
                self.bias_broadcast(c, bias.f32, m, n)?;
                (c, 1.0)
            }
            (Post::Gelu { bias, pre }, Out::F32(_)) => {
                self.bias_broadcast(pre, bias.f32, m, n)?;
                (pre, 1.0)
            }
            (Post::Bias(bias) | Post::Gelu { bias, .. }, Out::Bf16(_)) => {
                // The values in fp32 scratch, then the bias: its bf16 copy widened (what
                // the fused epilogue adds) into the n values past them.
                let out = self.wide_out(m * n + n)?;
                let b32 = if bias.bf16 != 0 {
                    let b32 = at(out, m * n);
                    self.run(
                        self.k.cast_bf16_to_f32,
                        grid_vec(n),
                        &[Arg::Ptr(b32), Arg::Ptr(bias.bf16), Arg::I64(n as i64)],
                    )?;
                    b32
                } else {
                    0
                };
                self.bias_broadcast(out, b32, m, n)?;
                (out, 1.0)
            }
            (_, Out::Bf16(_)) => (self.wide_out(m * n)?, 0.0),
            (_, Out::F32(c)) => (c, beta),
        };
        let sgemm = || -> CResult<()> {
            let (wa, wb) = (self.fp32_operand(a, sa, 0)?, self.fp32_operand(b, sb, 1)?);
            self.gemm(m, n, k, fp32(wa), fp32(wb), beta, Operand::n(out, ldc), 1)
        };
        match lt {
            None => sgemm()?,
            Some((bf, shape, pa, pb)) => {
                // SAFETY: pa, pb and out cover the shape (bf16 copies of the fp32 operands
                // the caller passed, and the caller's fp32 C, GELU input or scratch).
                let ran = unsafe { self.lt_product(bf, shape, (pa, pb), beta, out, None)? };
                if ran == Ran::Unsupported {
                    if !bf.warned.replace(true) {
                        eprintln!(
                            "note: cuBLASLt has no bf16 algorithm for {}; such products run \
                             in fp32",
                            crate::cuda::cublaslt::describe(&shape)
                        );
                    }
                    sgemm()?;
                }
            }
        }
        let len = Arg::I64((m * n) as i64);
        match (post, c) {
            (Post::None | Post::Bias(_), Out::Bf16(c)) => self.cast_bf16(c, out, m * n),
            (Post::Gelu { pre, .. }, Out::F32(c)) => self.run(
                self.k.gelu_forward,
                grid_vec(m * n),
                &[Arg::Ptr(c), Arg::Ptr(pre), len],
            ),
            (Post::Gelu { pre, .. }, Out::Bf16(c)) => self.run(
                self.k.gelu_forward_bf16,
                grid_vec(m * n),
                &[Arg::Ptr(c), Arg::Ptr(pre), Arg::Ptr(out), Arg::Ptr(0), len],
            ),
            (Post::DGelu { pre }, Out::F32(c)) => self.run(
                self.k.gelu_backward_inplace,
                grid_vec(m * n),
                &[Arg::Ptr(c), Arg::Ptr(pre), len],
            ),
            (Post::DGelu { pre }, Out::Bf16(c)) => self.run(
                self.k.gelu_backward_bf16,
                grid_vec(m * n),
                &[Arg::Ptr(c), Arg::Ptr(out), Arg::Ptr(pre), len],
            ),
            (Post::BiasGrad { db, tmp }, _) => {
                let wb = self.fp32_operand(b, sb, 1)?;
                self.colsum_add(db, fp32(wb).ptr, k, n, tmp)
            }
            (Post::None | Post::Bias(_), Out::F32(_)) => Ok(()),
        }
    }

    /// One cuBLASLt product `c = op(a) op(b) + beta c` on the bf16 operands `ab`, with the
    /// epilogue `args` when given, timed by the profiler when one runs.
    ///
    /// # Safety
    /// As [`MatmulCache::matmul_ep`] (with `args`) or [`MatmulCache::matmul`]: the operands
    /// and C cover `shape`; the workspace is the bf16 state's, of LT_WORKSPACE bytes.
    unsafe fn lt_product(
        &self,
        bf: &Bf16State,
        shape: MatmulShape,
        (a, b): (u64, u64),
        beta: f32,
        c: u64,
        args: Option<EpilogueArgs>,
    ) -> CResult<Ran> {
        let ws = bf.workspace.ptr;
        // The calls below are the caller's contract (this function's Safety section).
        profile::lt(&self.profiler, &self.stream, &shape, beta, || match args {
            Some(args) => bf
                .lt
                .matmul_ep(shape, 1.0, a, b, beta, c, ws, &self.stream, args),
            None => bf.lt.matmul(shape, 1.0, a, b, beta, c, ws, &self.stream),
        })
    }

    // ---------------------------------------------------------------- small helpers

    fn p(&self, off: usize) -> u64 {
        at(self.params.ptr, off)
    }
    fn g(&self, off: usize) -> u64 {
        at(self.grads.ptr, off)
    }
    fn p_opt(&self, off: Option<usize>) -> u64 {
        off.map_or(0, |o| self.p(o))
    }

    fn run(
        &self,
        f: crate::cuda::driver::CuFunction,
        grid: (u32, u32, u32),
        args: &[Arg],
    ) -> CResult<()> {
        // SAFETY: every call site passes the kernel's documented parameter list (see
        // kernels/*.cu) with buffers sized for the launch.
        let go = || unsafe { launch(&self.stream, f, grid, BLOCK, args) };
        profile::kernel(&self.profiler, &self.stream, f, grid, args, go)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        batch: usize,
    ) -> CResult<()> {
        let go = || self.blas.gemm(m, n, k, 1.0, a, b, beta, c, batch);
        profile::sgemm(
            &self.profiler,
            &self.stream,
            (m, n, k),
            (a.trans, b.trans),
            beta,
            batch,
            go,
        )
    }

    fn dropout(&self, out: u64, inp: u64, n: usize, d: Dropout) -> CResult<()> {
        if !d.active() {
            return Ok(());
        }
        self.run(
            self.k.dropout_apply,
            grid_vec(n),
            &[
                Arg::Ptr(out),
                Arg::Ptr(inp),
                Arg::I64(n as i64),
                Arg::U64(d.seed),
                Arg::U32(d.threshold()),
                Arg::F32(d.scale()),
            ],
        )
    }

    fn add(&self, dst: u64, src: u64, n: usize) -> CResult<()> {
        self.run(
            self.k.add_inplace,
            grid_vec(n),
            &[Arg::Ptr(dst), Arg::Ptr(src), Arg::I64(n as i64)],
        )
    }

    /// Row groups for column sums over `rows` rows: (groups, rows per group).
    fn parts(rows: usize) -> (usize, usize) {
        let rpp = rows.div_ceil(PARTS.min(rows).max(1)).max(1);
        (rows.div_ceil(rpp), rpp)
    }

    /// dst[c] += sum over rows of m[r, c] (deterministic two-pass column sum).
    fn colsum_add(&self, dst: u64, m: u64, rows: usize, cols: usize, scratch: u64) -> CResult<()> {
        let (np, rpp) = Self::parts(rows);
        self.run(
            self.k.colsum_parts,
            (grid_cols4(cols), np as u32, 1),
            &[
                Arg::Ptr(scratch),
                Arg::Ptr(m),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::I32(rpp as i32),
            ],
        )?;
        self.run(
            self.k.reduce_parts_add,
            grid_vec(cols),
            &[
                Arg::Ptr(dst),
                Arg::Ptr(scratch),
                Arg::I32(np as i32),
                Arg::I32(cols as i32),
                Arg::I32(cols as i32),
            ],
        )
    }

    /// out[r, c] = bias[c] (0 when `bias` is 0), out contiguous `rows x cols`.
    fn bias_broadcast(&self, out: u64, bias: u64, rows: usize, cols: usize) -> CResult<()> {
        self.run(
            self.k.bias_broadcast,
            grid_vec(rows * cols),
            &[
                Arg::Ptr(out),
                Arg::Ptr(bias),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
            ],
        )
    }

    /// out (rows, oc) = inp (rows, ic) @ W [ic, oc] + b. Fused: the bias is the product's
    /// epilogue, and without a bias the product simply overwrites `out`.
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(
        &self,
        out: Out,
        inp: Src,
        w: usize,
        b: Option<usize>,
        ic: usize,
        oc: usize,
        rows: usize,
    ) -> CResult<()> {
        let (x, wl) = (Lin::n(inp, ic), Lin::n(Src::Param(w), oc));
        let post = b.map_or(Post::None, |_| Post::Bias(self.bias_ptrs(b)));
        match (post, out) {
            (Post::None, Out::F32(out)) if self.fusing() => {
                self.mm(rows, oc, ic, x, wl, 0.0, out, oc)
            }
            (Post::None, Out::F32(out)) => {
                self.bias_broadcast(out, 0, rows, oc)?;
                self.mm(rows, oc, ic, x, wl, 1.0, out, oc)
            }
            _ => self.mm_ep(rows, oc, ic, x, wl, 0.0, out, oc, post),
        }
    }

    /// The bias at `b` (None: no bias) as an epilogue takes it: fp32, and its bf16 copy in
    /// the bf16 mode.
    fn bias_ptrs(&self, b: Option<usize>) -> BiasPtrs {
        BiasPtrs {
            f32: self.p_opt(b),
            bf16: match (&self.bf, b) {
                (Some(bf), Some(off)) => bf.param(off),
                _ => 0,
            },
        }
    }

    /// pre (rows, oc) = inp (rows, ic) @ W [ic, oc] + b; out = gelu(pre). Fused: one
    /// cuBLASLt call writes both (`GELU_AUX_BIAS`, or `GELU_AUX` without a bias). `pre`
    /// has `out`'s type (bf16 in the bf16 MLP chain, [`Post::Gelu`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_gelu_fwd(
        &self,
        out: Out,
        pre: u64,
        inp: Src,
        w: usize,
        b: Option<usize>,
        ic: usize,
        oc: usize,
        rows: usize,
    ) -> CResult<()> {
        let bias = self.bias_ptrs(b);
        self.mm_ep(
            rows,
            oc,
            ic,
            Lin::n(inp, ic),
            Lin::n(Src::Param(w), oc),
            0.0,
            out,
            oc,
            Post::Gelu { bias, pre },
        )
    }

    /// dW += inp^T dout; db += column sums of dout; dinp = dout W^T (overwritten), or with
    /// `dgelu` a [`Post::DGelu`] (the layer's input was gelu(pre)) dinp = (dout W^T) *
    /// gelu'(pre), the gradient of the pre-activation. Fused: the bias gradient is the
    /// `BGRADA` epilogue of the dW product (written to `scratch`, then added to the
    /// gradient) and the GELU derivative the `DGELU` epilogue of the dinp product.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dinp: Out,
        dout: Src,
        inp: Src,
        w: usize,
        b: Option<usize>,
        dgelu: Post,
        ic: usize,
        oc: usize,
        rows: usize,
        scratch: u64,
    ) -> CResult<()> {
        let d = match dout {
            Src::Act(p) => self.rounded(p, rows * oc)?,
            other => other,
        };
        let bias_grad = b.map_or(Post::None, |bo| Post::BiasGrad {
            db: self.g(bo),
            tmp: scratch,
        });
        self.mm_ep(
            ic,
            oc,
            rows,
            Lin::t(inp, ic),
            Lin::n(d, oc),
            1.0,
            Out::F32(self.g(w)),
            oc,
            bias_grad,
        )?;
        assert!(
            matches!(dgelu, Post::None | Post::DGelu { .. }),
            "the input gradient takes only the GELU derivative"
        );
        self.mm_ep(
            rows,
            ic,
            oc,
            Lin::n(d, oc),
            Lin::t(Src::Param(w), oc),
            0.0,
            dinp,
            ic,
            dgelu,
        )
    }

    /// res = a + b (res may be a or b), then LayerNorm(res) into out, mean, rstd.
    /// With the `fused_ln` switch one kernel does both; otherwise the residual add and
    /// [`CudaEngine::layernorm_fwd`] (same arithmetic, same result).
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_fwd(
        &self,
        res: u64,
        a: u64,
        b: u64,
        out: LnOut,
        mean: u64,
        rstd: u64,
        w: usize,
        bias: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        if !self.switches().fused_ln {
            if res == a {
                self.add(res, b, rows * c)?;
            } else {
                assert_eq!(res, b, "the residual sum overwrites one of its terms");
                self.add(res, a, rows * c)?;
            }
            return self.layernorm_fwd(out, mean, rstd, res, w, bias, rows);
        }
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.residual_layernorm_forward,
            grid_rows(rows),
            &[
                Arg::Ptr(res),
                out_f32,
                out_bf16,
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(a),
                Arg::Ptr(b),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(bias)),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        out: LnOut,
        mean: u64,
        rstd: u64,
        x: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.layernorm_forward,
            grid_rows(rows),
            &[
                out_f32,
                out_bf16,
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(x),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(b)),
                Arg::I32(rows as i32),
                Arg::I32(self.cfg.n_embd as i32),
            ],
        )
    }

    /// dx += LayerNorm input gradient; dW, db += weight and bias gradients.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dx: u64,
        dx_bf16: u64,
        dout: u64,
        x: u64,
        mean: u64,
        rstd: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
        scratch: u64,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        let (dx_args, stats) = (
            [Arg::Ptr(dx), Arg::Ptr(dx_bf16)],
            [
                Arg::Ptr(dout),
                Arg::Ptr(x),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        );
        let np = if self.switches.fused_ln && c <= LN_BWD_MAX_C {
            // One pass: dx and the partial sums of the weight and bias gradients.
            let np = rows.div_ceil(LN_BWD_ROWS);
            let mut args = dx_args.to_vec();
            args.push(Arg::Ptr(scratch));
            args.extend(stats);
            self.run(self.k.layernorm_backward, (np as u32, 1, 1), &args)?;
            np
        } else {
            let mut args = dx_args.to_vec();
            args.extend(stats);
            self.run(self.k.layernorm_backward_dx, grid_rows(rows), &args)?;
            let (np, rpp) = Self::parts(rows);
            self.run(
                self.k.layernorm_backward_parts,
                (grid_cols4(c), np as u32, 1),
                &[
                    Arg::Ptr(scratch),
                    Arg::Ptr(dout),
                    Arg::Ptr(x),
                    Arg::Ptr(mean),
                    Arg::Ptr(rstd),
                    Arg::I32(rows as i32),
                    Arg::I32(c as i32),
                    Arg::I32(rpp as i32),
                ],
            )?;
            np
        };
        // The parts hold the weight's sums, then the bias's: one reduction when the bias
        // follows the weight in the layout (as it does in GPT-2's), else one each.
        let targets = match b {
            Some(bo) if bo == w + c => vec![(w, 0, 2 * c)],
            Some(bo) => vec![(w, 0, c), (bo, c, c)],
            None => vec![(w, 0, c)],
        };
        for (dst, from, cols) in targets {
            self.run(
                self.k.reduce_parts_add,
                grid_vec(cols),
                &[
                    Arg::Ptr(self.g(dst)),
                    Arg::Ptr(at(scratch, from)),
                    Arg::I32(np as i32),
                    Arg::I32(cols as i32),
                    Arg::I32(2 * c as i32),
                ],
            )?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- attention

    fn attn_shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape {
            b,
            t,
            c: self.cfg.n_embd,
            nh: self.cfg.n_head,
        }
    }

    /// The buffer in `cell`, allocated with `elems` floats the first time it is asked for
    /// (`what` names it in an out-of-memory error).
    fn lazy(&self, cell: &OnceCell<Buf>, elems: usize, what: &str) -> CResult<u64> {
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
    fn tt_elems(&self, a: &Acts) -> usize {
        a.b * self.cfg.n_head * a.t_cap * a.t_cap
    }

    /// y (N, C) from qkv (N, 3C); saves what the backward needs: lse (B, NH, T) on the
    /// fused path, att = P (B, NH, T, T) on the plain one.
    /// The plain attention reads and writes fp32 q, k, v and output: refused when the
    /// activations store them in bf16 ([`Bf16Storage::attn`], chosen only where every pass
    /// takes the bf16 fused attention, so this never fires unless that choice is wrong).
    fn plain_attention_allowed(a: &Acts) -> CResult<()> {
        if a.storage.attn {
            return Err(CudaError::Invalid(
                "internal: the plain attention path met bf16 attention storage".into(),
            ));
        }
        Ok(())
    }

    fn attention_fwd(
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
    fn attention_bwd(
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

    // ---------------------------------------------------------------- passes

    fn ensure_acts(&mut self, b: usize, t: usize, t_cap: usize) -> CResult<()> {
        let (rc, st) = (self.recompute, self.bf16_storage(b, t_cap.max(t)));
        if !matches!(&self.acts,
            Some(a) if a.b == b && a.t_cap >= t && a.recompute == rc && a.storage == st)
        {
            self.acts = None; // free the old shape first
            self.acts = Some(Acts::new(&self.ctx, &self.cfg, b, t_cap.max(t), rc, st)?);
        }
        Ok(())
    }

    /// The activations stored in bf16 only: none in fp32 mode, else those the `bf16_*`
    /// switches leave on, for passes over `b` rows of up to `t` tokens (the attention's
    /// storage depends on the path those passes take: bf16 only where every one of them,
    /// training or not, takes the bf16 fused attention).
    fn bf16_storage(&self, b: usize, t: usize) -> Bf16Storage {
        let bf16 = self.bf.is_some();
        Bf16Storage {
            ln: bf16 && self.switches.bf16_acts,
            mlp: bf16 && self.switches.bf16_mlp,
            logits: bf16 && self.switches.bf16_logits,
            attn: bf16
                && self.switches.bf16_attn
                && self.fused_attention(b, t, true) == Some(FlashMath::Bf16),
        }
    }

    /// Whether activations only products read are stored in bf16 (LayerNorm outputs,
    /// [`LnOut`]; the qkv gradient and, with fp32 logits, the logits gradient,
    /// [`CudaEngine::bf16_grad`]): the bf16 mode with
    /// the `bf16_acts` switch on.
    fn bf16_acts(&self) -> bool {
        self.bf.is_some() && self.switches.bf16_acts
    }

    /// Where a kernel writes a gradient of `elems` values that only the next products read,
    /// in bf16: the gradient scratch, with bf16 activations ([`CudaEngine::bf16_acts`]); else
    /// `None` (the gradient stays fp32 and the products round it).
    fn bf16_grad(&self, elems: usize) -> CResult<Option<u64>> {
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
    fn dres_bf16(&self, next_reads: bool, elems: usize) -> CResult<u64> {
        match &self.bf {
            Some(bf) if next_reads && self.bf16_acts() => self.scratch(bf, SLOT_GRAD, elems),
            _ => Ok(0),
        }
    }

    /// The gradient of a residual branch's output (`elems` values) as its backward products
    /// read it: `dropout(dres)` in `dtmp` when residual dropout is active, else dres, with
    /// its bf16 copy when the LayerNorm backward wrote one (`dres_bf16`,
    /// [`CudaEngine::dres_bf16`]).
    fn branch_grad(
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

    /// The recomputation of ln1 / ln2 (`recompute=2`): `out` (rows, C) from the LayerNorm
    /// input `x` and the forward's saved `mean` and `rstd`, the same bits as the forward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_recompute(
        &self,
        out: LnOut,
        x: u64,
        mean: u64,
        rstd: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.layernorm_recompute,
            grid_vec(rows * c),
            &[
                out_f32,
                out_bf16,
                Arg::Ptr(x),
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(b)),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        )
    }

    /// Forward pass up to the logits (N, V). `drop` is None in evaluation; `training` says
    /// whether a backward pass follows (see [`CudaEngine::fused_attention`]). `t_cap` is the
    /// sequence capacity to allocate if the activations must be (re)allocated.
    fn forward(
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
            self.linear_fwd(
                Out::F32(la.res2.ptr),
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
            self.residual_layernorm_fwd(
                la.res2.ptr,
                la.res2.ptr,
                x,
                a.ln2(l),
                la.ln2_mean.ptr,
                la.ln2_rstd.ptr,
                o.ln2_w,
                o.ln2_b,
                n,
            )?;
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
            self.linear_fwd(
                Out::F32(la.res3.ptr),
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
            let (ln, mean, rstd, w, bias) = match (a.layers.get(l + 1), lay.blocks.get(l + 1)) {
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
            self.residual_layernorm_fwd(
                la.res3.ptr,
                la.res3.ptr,
                la.res2.ptr,
                ln,
                mean,
                rstd,
                w,
                bias,
                n,
            )?;
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
            v,
            Post::None,
        )
    }

    /// Backward from dlogits (already in `logits`) to all parameter gradients (accumulated).
    /// The backward pass, enqueued on the compute stream; `ready` hears of each finished
    /// range of the gradient buffer right after its last write is enqueued (see
    /// [`Engine::forward_backward_notify`]).
    fn backward(
        &self,
        b: usize,
        t: usize,
        drop: Option<DropoutSeeds>,
        ready: Option<&mut (dyn FnMut(super::GradReady) + Send)>,
    ) -> CResult<()> {
        let mut ready = ready;
        let stream = self.stream.s as u64;
        let mut report = |range: std::ops::Range<usize>| {
            if let Some(f) = ready.as_mut() {
                f(super::GradReady {
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
        // LM head (tied): dlnf = dlogits @ wte ; dwte += dlogits^T @ lnf. The cross-entropy
        // kernel wrote dlogits over bf16 logits, or in bf16 to the gradient scratch with
        // bf16 activations (see `cross_entropy`); otherwise it is in `logits`, rounded here
        // in the bf16 mode.
        let dlogits = if a.storage.logits {
            Src::Bf16(a.logits.ptr)
        } else {
            match self.bf16_grad(n * v)? {
                Some(q) => Src::Bf16(q),
                None => self.rounded(a.logits.ptr, n * v)?,
            }
        };
        self.mm(
            n,
            c,
            v,
            Lin::n(dlogits, v),
            Lin::n(Src::Param(lay.wte), c),
            0.0,
            a.dln.ptr,
            c,
        )?;
        self.mm(
            v,
            c,
            n,
            Lin::t(dlogits, v),
            Lin::n(a.lnf().src(), c),
            1.0,
            self.g(lay.wte),
            c,
        )?;
        a.dres.zero()?;
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
            a.dln.ptr,
            last,
            a.lnf_mean.ptr,
            a.lnf_rstd.ptr,
            lay.lnf_w,
            lay.lnf_b,
            n,
            a.ln_parts.ptr,
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
                Out::F32(a.dln.ptr),
                a.mlp_src(a.dfch.ptr),
                a.ln2(l).src(),
                o.fc_w,
                o.fc_b,
                Post::None,
                c,
                4 * c,
                n,
                bias_scratch,
            )?;
            dres_bf16 = self.dres_bf16(!branch_dropout(l, false), n * c)?;
            self.layernorm_bwd(
                a.dres.ptr,
                dres_bf16,
                a.dln.ptr,
                la.res2.ptr,
                la.ln2_mean.ptr,
                la.ln2_rstd.ptr,
                o.ln2_w,
                o.ln2_b,
                n,
                a.ln_parts.ptr,
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
                Out::F32(a.dln.ptr),
                dqkv,
                a.ln1(l).src(),
                o.qkv_w,
                o.qkv_b,
                Post::None,
                c,
                3 * c,
                n,
                bias_scratch,
            )?;
            // Below block 0 only the embeddings read dres: no copy.
            dres_bf16 = match l {
                0 => 0,
                l => self.dres_bf16(!branch_dropout(l - 1, true), n * c)?,
            };
            self.layernorm_bwd(
                a.dres.ptr,
                dres_bf16,
                a.dln.ptr,
                x,
                la.ln1_mean.ptr,
                la.ln1_rstd.ptr,
                o.ln1_w,
                o.ln1_b,
                n,
                a.ln_parts.ptr,
            )?;
            report(o.ln1_w..block_end(l));
        }
        if let Some(d) = drop {
            self.dropout(a.dres.ptr, a.dres.ptr, n * c, d.embedding())?;
        }
        self.run(
            self.k.embedding_backward_wte,
            grid_vec(n * c),
            &[
                Arg::Ptr(self.g(lay.wte)),
                Arg::Ptr(a.dres.ptr),
                Arg::Ptr(a.inputs.ptr),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
            ],
        )?;
        self.run(
            self.k.embedding_backward_wpe,
            grid_vec(t * c),
            &[
                Arg::Ptr(self.g(lay.wpe)),
                Arg::Ptr(a.dres.ptr),
                Arg::I32(b as i32),
                Arg::I32(t as i32),
                Arg::I32(c as i32),
            ],
        )?;
        // wte (also written by the tied LM head) and wpe: the start of the layout.
        report(0..lay.blocks.first().map_or(lay.lnf_w, |o| o.ln1_w));
        Ok(())
    }

    /// Cross-entropy over the logits of the last forward pass; with `grad_scale` the logits
    /// become d(mean loss * scale)/d(logits) (bf16 logits: in bf16, in place), or, with fp32
    /// logits and bf16 activations ([`CudaEngine::bf16_grad`]), that gradient goes in bf16
    /// to the gradient scratch (the logits stay). Enqueued with
    /// the copy of the per-row losses to pinned memory; [`CudaEngine::mean_loss`] waits for
    /// them, so the backward pass can be enqueued first.
    fn cross_entropy(&self, targets: &[i32], grad_scale: Option<f32>) -> CResult<PendingLoss> {
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
        let (loss, tgt) = (Arg::Ptr(a.row_loss.ptr), Arg::Ptr(a.targets.ptr));
        let (rows, cols) = (Arg::I32(n as i32), Arg::I32(v as i32));
        if a.storage.logits {
            // bf16 logits: the gradient goes over them in place.
            self.run(
                self.k.cross_entropy_bf16,
                (n as u32, 1, 1),
                &[
                    Arg::Ptr(a.logits.ptr),
                    loss,
                    tgt,
                    rows,
                    cols,
                    grad_k,
                    write_grad,
                ],
            )?;
        } else {
            let grad_bf16 = match grad_scale {
                Some(_) => self.bf16_grad(n * v)?.unwrap_or(0),
                None => 0,
            };
            self.run(
                self.k.cross_entropy_forward_backward,
                (n as u32, 1, 1),
                &[
                    Arg::Ptr(a.logits.ptr),
                    Arg::Ptr(grad_bf16),
                    loss,
                    tgt,
                    rows,
                    cols,
                    grad_k,
                    write_grad,
                ],
            )?;
        }
        a.staged[STAGE_LOSSES].download(&a.row_loss, 8 * n, &self.stream)?;
        Ok(PendingLoss { rows: n, count })
    }

    /// The mean loss over counted positions of a [`CudaEngine::cross_entropy`], once its
    /// per-row losses have reached the host.
    fn mean_loss(&self, pending: PendingLoss) -> CResult<f32> {
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

    fn dropout_seeds(&mut self) -> Option<DropoutSeeds> {
        DropoutSeeds::draw(&mut self.rng, self.cfg.dropout)
    }

    /// Uploads gradients edited on the host through `grads_mut`.
    fn sync_grads(&mut self) -> CResult<()> {
        self.ctx.make_current()?;
        if self.host_grads_dirty {
            self.grads.copy_from_host(&self.host_grads)?;
            self.host_grads_dirty = false;
        }
        Ok(())
    }

    fn step_inner(&mut self, hp: &AdamWConfig, lr: f32) -> CResult<f32> {
        let norm = crate::optim::adamw::norm_from_sumsq(self.sumsq_inner(0..self.layout.total)?);
        self.step_shard_inner(hp, lr, norm)?;
        Ok(norm)
    }

    /// Sum of squares of `grads[range]`: `NORM_PARTS` block sums in f64, added in order on
    /// the host (deterministic for a given range).
    fn sumsq_inner(&mut self, range: std::ops::Range<usize>) -> CResult<f64> {
        self.sync_grads()?;
        self.run(
            self.k.sumsq_parts,
            (NORM_PARTS as u32, 1, 1),
            &[
                Arg::Ptr(self.norm_parts.ptr),
                Arg::Ptr(at(self.grads.ptr, range.start)),
                Arg::I64(range.len() as i64),
            ],
        )?;
        let mut parts = vec![0f64; NORM_PARTS];
        self.norm_parts.copy_to_host(&mut parts)?;
        Ok(parts.iter().sum::<f64>())
    }

    /// Clip for the global pre-clip `norm`, then AdamW over `opt_shard` (the moments hold
    /// exactly that range; parameter, gradient and bf16-copy pointers are offset to it).
    fn step_shard_inner(&mut self, hp: &AdamWConfig, lr: f32, norm: f32) -> CResult<()> {
        self.sync_grads()?;
        let shard = self.opt_shard.clone();
        self.step += 1;
        if shard.is_empty() {
            return self.stream.synchronize();
        }
        let clip = crate::optim::adamw::clip_coef(norm, hp.grad_clip).unwrap_or(1.0);
        let bc1 = 1.0 - (hp.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(self.step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (runs, n_runs) = self.adamw_runs(&shard)?;
        // One launch over the shard: clipping, weight decay where it applies, the update
        // and the bf16 copy (see kernels/adamw.cu).
        self.run(
            self.k.adamw_update,
            grid_vec(shard.len()),
            &[
                Arg::Ptr(at(self.params.ptr, shard.start)),
                Arg::Ptr(at(self.grads.ptr, shard.start)),
                Arg::Ptr(self.m.ptr),
                Arg::Ptr(self.v.ptr),
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
            ],
        )?;
        self.stream.synchronize()
    }

    /// The device table of `shard`'s weight-decay runs for `adamw_update` (address, count),
    /// built on first use and again when the shard changes.
    fn adamw_runs(&mut self, shard: &std::ops::Range<usize>) -> CResult<(u64, usize)> {
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
    fn moments_to_host(&self) -> CResult<(Vec<f32>, Vec<f32>)> {
        self.ctx.make_current()?;
        self.stream.synchronize()?;
        let n = self.opt_shard.len();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        if n > 0 {
            self.m.copy_to_host(&mut m)?;
            self.v.copy_to_host(&mut v)?;
        }
        Ok((m, v))
    }

    /// Replaces the moment buffers with ones for `range` holding `m` and `v`.
    fn moments_from_host(
        &mut self,
        range: std::ops::Range<usize>,
        m: &[f32],
        v: &[f32],
    ) -> CResult<()> {
        self.ctx.make_current()?;
        self.stream.synchronize()?;
        // Free the old buffers first, so that the peak is the larger of the two.
        self.m = self.ctx.alloc(0)?;
        self.v = self.ctx.alloc(0)?;
        let up = |data: &[f32]| -> CResult<Buf> {
            let b = self.ctx.alloc(4 * data.len())?;
            if !data.is_empty() {
                b.copy_from_host(data)?;
            }
            Ok(b)
        };
        self.m = up(m)?;
        self.v = up(v)?;
        self.opt_shard = range;
        Ok(())
    }

    fn download(&self, buf: &Buf) -> CResult<Vec<f32>> {
        self.ctx.make_current()?;
        self.stream.synchronize()?;
        let mut out = vec![0f32; self.layout.total];
        buf.copy_to_host(&mut out)?;
        Ok(out)
    }

    fn upload(&self, buf: &Buf, data: &[f32], what: &str) {
        assert_eq!(
            data.len(),
            self.layout.total,
            "{what}: layout size mismatch"
        );
        let r = self
            .ctx
            .make_current()
            .and_then(|_| self.stream.synchronize())
            .and_then(|_| buf.copy_from_host(data));
        if let Err(e) = r {
            panic!("CUDA error while uploading the {what}: {e}");
        }
    }
}

impl CudaEngine {
    /// Forward and backward of one training micro-batch (see
    /// [`Engine::forward_backward_notify`] for `ready`). The host waits only for the loss:
    /// the inputs and targets go through pinned staging ([`Staging`]) and the backward pass
    /// is enqueued before the loss is read, so when this returns the GPU is still running
    /// the backward pass while the caller fetches the next micro-batch, whose copies and
    /// kernels queue up behind it: no idle gap between micro-steps.
    fn train_step(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        ready: Option<&mut (dyn FnMut(super::GradReady) + Send)>,
    ) -> Result<f32> {
        super::check_batch(&self.cfg, &batch, true)?;
        self.sync_grads().map_err(cuda_err)?;
        let drop = self.dropout_seeds();
        self.forward(batch.inputs, batch.b, batch.t, drop, true, batch.t)
            .map_err(cuda_err)?;
        let pending = self
            .cross_entropy(batch.targets, Some(loss_scale))
            .map_err(cuda_err)?;
        self.backward(batch.b, batch.t, drop, ready)
            .map_err(cuda_err)?;
        self.mean_loss(pending).map_err(cuda_err)
    }
}

impl Engine for CudaEngine {
    fn config(&self) -> &GptConfig {
        &self.cfg
    }
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn device_name(&self) -> String {
        self.name.clone()
    }
    fn peak_flops(&self) -> Option<f64> {
        self.peak
    }

    fn forward_backward(&mut self, batch: Batch, loss_scale: f32) -> Result<f32> {
        self.train_step(batch, loss_scale, None)
    }

    fn forward_backward_notify(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        ready: &mut (dyn FnMut(super::GradReady) + Send),
    ) -> Result<f32> {
        self.train_step(batch, loss_scale, Some(ready))
    }

    fn loss(&mut self, batch: Batch) -> Result<f32> {
        super::check_batch(&self.cfg, &batch, true)?;
        self.forward(batch.inputs, batch.b, batch.t, None, false, batch.t)
            .map_err(cuda_err)?;
        let pending = self.cross_entropy(batch.targets, None).map_err(cuda_err)?;
        self.mean_loss(pending).map_err(cuda_err)
    }

    fn logits(&mut self, batch: Batch) -> Result<Vec<f32>> {
        super::check_batch(&self.cfg, &batch, false)?;
        self.forward(batch.inputs, batch.b, batch.t, None, false, batch.t)
            .map_err(cuda_err)?;
        let a = self.acts.as_ref().expect("forward allocated activations");
        let len = batch.b * batch.t * self.cfg.vocab_size;
        if a.storage.logits {
            let mut bits = vec![0u16; len];
            a.logits.copy_to_host(&mut bits).map_err(cuda_err)?;
            return Ok(bits.into_iter().map(bf16_bits_to_f32).collect());
        }
        let mut out = vec![0f32; len];
        a.logits.copy_to_host(&mut out).map_err(cuda_err)?;
        Ok(out)
    }

    fn zero_grad(&mut self) {
        self.host_grads_dirty = false;
        let r = self.ctx.make_current().and_then(|_| self.grads.zero());
        if let Err(e) = r {
            panic!("CUDA error while zeroing the gradients: {e}");
        }
    }

    fn step(&mut self, hp: &AdamWConfig, lr: f32) -> f32 {
        match self.step_inner(hp, lr) {
            Ok(n) => n,
            Err(e) => panic!("CUDA error in the optimizer step: {e}"),
        }
    }

    fn params(&self) -> Vec<f32> {
        self.download(&self.params)
            .unwrap_or_else(|e| panic!("CUDA error while reading the parameters: {e}"))
    }
    fn set_params(&mut self, params: &[f32]) {
        self.upload(&self.params, params, "parameters");
        if let Err(e) = self.refresh_bf16_params() {
            panic!("CUDA error while refreshing the bf16 parameter copy: {e}");
        }
    }
    fn grads(&self) -> Vec<f32> {
        if self.host_grads_dirty {
            return self.host_grads.clone();
        }
        self.download(&self.grads)
            .unwrap_or_else(|e| panic!("CUDA error while reading the gradients: {e}"))
    }
    fn grads_mut(&mut self) -> &mut [f32] {
        if !self.host_grads_dirty {
            self.host_grads = self
                .download(&self.grads)
                .unwrap_or_else(|e| panic!("CUDA error while reading the gradients: {e}"));
            self.host_grads_dirty = true;
        }
        &mut self.host_grads
    }
    fn device_grads(&mut self) -> Option<super::DeviceGrads> {
        if let Err(e) = self.sync_grads() {
            panic!("CUDA error while uploading the gradients: {e}");
        }
        Some(super::DeviceGrads {
            ptr: self.grads.ptr,
            len: self.layout.total,
            stream: self.stream.s as u64,
        })
    }
    fn optimizer_state(&self) -> OptimizerState {
        let (m, v) = self
            .moments_to_host()
            .unwrap_or_else(|e| panic!("CUDA error while reading the AdamW state: {e}"));
        OptimizerState {
            m,
            v,
            step: self.step,
        }
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) {
        let n = self.opt_shard.len();
        assert!(
            state.m.len() == n && state.v.len() == n,
            "optimizer state of {} and {} values for an optimizer shard of {n}",
            state.m.len(),
            state.v.len()
        );
        let r = self.ctx.make_current().and_then(|_| {
            self.stream.synchronize()?;
            if n > 0 {
                self.m.copy_from_host(&state.m)?;
                self.v.copy_from_host(&state.v)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            panic!("CUDA error while uploading the AdamW state: {e}");
        }
        self.step = state.step;
    }
    fn grad_sumsq(&mut self, range: std::ops::Range<usize>) -> f64 {
        assert!(
            range.start <= range.end && range.end <= self.layout.total,
            "gradient range {range:?} outside the {} parameters",
            self.layout.total
        );
        self.sumsq_inner(range)
            .unwrap_or_else(|e| panic!("CUDA error in the gradient norm: {e}"))
    }
    fn step_shard(&mut self, hp: &AdamWConfig, lr: f32, norm: f32) {
        if let Err(e) = self.step_shard_inner(hp, lr, norm) {
            panic!("CUDA error in the optimizer step: {e}");
        }
    }
    fn optimizer_shard(&self) -> std::ops::Range<usize> {
        self.opt_shard.clone()
    }
    fn set_optimizer_shard(&mut self, range: std::ops::Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.layout.total,
            "optimizer shard {range:?} outside the {} parameters",
            self.layout.total
        );
        let r = self.moments_to_host().and_then(|(m, v)| {
            let old = self.opt_shard.clone();
            let reshard = crate::optim::adamw::reshard;
            let (m, v) = (reshard(&m, &old, &range), reshard(&v, &old, &range));
            self.moments_from_host(range.clone(), &m, &v)
        });
        if let Err(e) = r {
            panic!("CUDA error while resizing the AdamW state to {range:?}: {e}");
        }
    }
    fn device_params(&mut self) -> Option<super::DeviceGrads> {
        if let Err(e) = self.ctx.make_current() {
            panic!("CUDA error while making the context current: {e}");
        }
        Some(super::DeviceGrads {
            ptr: self.params.ptr,
            len: self.layout.total,
            stream: self.stream.s as u64,
        })
    }
    fn device_params_written(&mut self) {
        if let Err(e) = self.refresh_bf16_params() {
            panic!("CUDA error while refreshing the bf16 parameter copy: {e}");
        }
    }
    fn rng_state(&self) -> [u64; 4] {
        self.rng.state
    }
    fn set_rng_state(&mut self, state: [u64; 4]) {
        self.rng.state = state;
    }

    fn decode_reset(&mut self, n_seq: usize) {
        DecodeState::reset(&mut self.decode, n_seq);
    }

    fn decode_prefill(&mut self, tokens: &[u32], n_seq: usize) -> Result<Vec<f32>> {
        self.kv_prefill(tokens, n_seq)
    }

    fn decode_step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.kv_step(tokens)
    }

    fn decode_len(&self) -> usize {
        self.decode.as_ref().map_or(0, |s| s.len())
    }

    fn profile_step(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        micro_steps: usize,
        hp: &AdamWConfig,
        lr: f32,
    ) -> Option<Result<profile::StepProfile>> {
        Some(self.profiled_step(batch, loss_scale, micro_steps, hp, lr))
    }

    fn memory_report(&self) -> Option<profile::MemoryReport> {
        Some(self.memory())
    }

    fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }
    fn recompute(&self) -> Recompute {
        self.recompute
    }
    fn activation_bytes(&self, b: usize, t: usize, recompute: Recompute) -> Option<u64> {
        let fused = self.fused_attention(b, t, true).is_some();
        let attn_dropout = self.cfg.dropout > 0.0;
        Some(activation_bytes(
            &self.cfg,
            b,
            t,
            recompute,
            fused,
            attn_dropout,
            self.bf16_storage(b, t),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_post_step_maps_to_its_epilogue() {
        assert_eq!(epilogue_args(Post::None, 8, false), None);
        // The bias in C's type (fp32 parameter, or its bf16 copy for a bf16 C).
        let bias = BiasPtrs {
            f32: 0x1000,
            bf16: 0x5000,
        };
        let b = epilogue_args(Post::Bias(bias), 96, false).unwrap();
        assert_eq!(
            (b.ep, b.bias, b.aux, b.aux_ld),
            (Epilogue::Bias, 0x1000, 0, 0)
        );
        let b = epilogue_args(Post::Bias(bias), 96, true).unwrap();
        assert_eq!((b.ep, b.bias, b.aux), (Epilogue::Bias, 0x5000, 0));
        // fc: GELU input saved with the output's row stride (n = 4C).
        let g = epilogue_args(Post::Gelu { bias, pre: 0x2000 }, 192, false).unwrap();
        assert_eq!(
            (g.ep, g.bias, g.aux, g.aux_ld),
            (Epilogue::GeluAux { bias: true }, 0x1000, 0x2000, 192)
        );
        let g = epilogue_args(Post::Gelu { bias, pre: 0x2000 }, 192, true).unwrap();
        assert_eq!((g.ep, g.bias), (Epilogue::GeluAux { bias: true }, 0x5000));
        let g = epilogue_args(
            Post::Gelu {
                bias: BiasPtrs { f32: 0, bf16: 0 },
                pre: 0x2000,
            },
            192,
            true,
        )
        .unwrap();
        assert_eq!(g.ep, Epilogue::GeluAux { bias: false });
        assert_eq!(g.ep.lt_value(), crate::cuda::cublaslt::EPILOGUE_GELU_AUX);
        for bf16 in [false, true] {
            let d = epilogue_args(Post::DGelu { pre: 0x2000 }, 192, bf16).unwrap();
            assert_eq!((d.ep, d.aux, d.aux_ld), (Epilogue::DGelu, 0x2000, 192));
        }
        // dW = X^T dY: the bias gradient sums the row-major B (dY), cuBLASLt's A, and is
        // written to the scratch vector, never straight into the accumulating gradient.
        let bg = epilogue_args(
            Post::BiasGrad {
                db: 0x3000,
                tmp: 0x4000,
            },
            64,
            false,
        )
        .unwrap();
        assert_eq!((bg.ep, bg.bias, bg.aux), (Epilogue::BiasGradB, 0x4000, 0));
        assert_eq!(bg.ep.lt_value(), crate::cuda::cublaslt::EPILOGUE_BGRADA);
    }
}
