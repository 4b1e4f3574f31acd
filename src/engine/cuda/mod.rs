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
//! bf16 alone (`LnOut`, switch `bf16_acts`; the same bits as rounding an fp32 output, at
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
//! in bf16 for the attention backward, whose `D = y . dy` then sums bf16 values. The input
//! gradients of the qkv and fc products and of the LM head, the gradients of the LayerNorm
//! outputs, are written in bf16 too (switch `bf16_dln`, [`Bf16Storage::dln`]), as torch
//! autocast's bf16 linear layers return them, and the LayerNorm backward reads them so.
//! LayerNorm,
//! softmax,
//! GELU, residuals, cross-entropy and AdamW stay fp32; attention's forward runs on the bf16
//! tensor-core fused kernel where it applies (below), otherwise in fp32. Both precisions share one code path: the
//! linear-layer products go through `CudaEngine::mm`, which dispatches on the precision.
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
//! kernels ([`CudaEngine::epilogue_report`]). In bf16 mode without dropout the residual
//! adds are done by the attention and MLP projection products themselves
//! (`D = A B + bias + C`, C the residual stream, D the new one: `fused_residual`), so the
//! LayerNorm after each only normalises; otherwise, and wherever a product cannot add it
//! (cuBLASLt declines, or `epilogues` is off), every residual add runs fused with the
//! LayerNorm that follows it (`fused_ln`). The LayerNorm backward is one pass over its
//! inputs (`fused_ln`).
//!
//! `zero_grad` leaves the gradient buffer as it is and the next micro-step writes every
//! gradient rather than adding it to zeros (`GradWrite::Overwrite`, `fresh_grads`: the
//! weight-gradient products with beta 0, the bias gradients straight from their epilogue,
//! the other gradient kernels told not to read what they write), as PyTorch's first
//! backward after `zero_grad(set_to_none=True)` does: no pass zeroing the buffer and no
//! read of it; the micro-steps after add to it. Whatever reads the gradients first zeroes
//! them, so callers never see the difference.
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
//! shared by all layers (`Acts::gelu_shared`, `Acts::ln_shared`) instead of one per
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
//! enqueued (`CudaEngine::train_step`). The host therefore waits for the forward pass
//! and the loss, never for the backward: while the GPU runs it, the trainer fetches the
//! next micro-batch and enqueues its copies and kernels behind it, so the GPU does not go
//! idle between micro-steps (before, a synchronous copy of the inputs waited for the
//! previous backward pass and the loss read stalled the backward's launches). The copies
//! are a few tens of KiB per micro-step, in stream order, so they need no copy stream of
//! their own.
//!
//! Launch overhead: a micro-step is a few hundred kernel launches and matrix products. Where
//! it repeats exactly (same shape, no dropout, no gradient buckets handed out during the
//! backward pass) it is captured once as a CUDA graph and then replayed with one launch
//! ([`graphs`], switch `graphs`), with the same bits; the host then only fills the pinned
//! input buffers and waits for the loss.
//!
//! The other kernels (`kernels/*.cu`) are compiled by NVRTC for
//! the GPU when the engine starts and cached on disk ([`kernels`]).
//!
//! Activation layout per layer (N = B*T rows) is the CPU engine's: ln1 (N,C) -> qkv (N,3C)
//! -> att (B,NH,T,T) (plain) or lse (B,NH,T) (fused) -> atty (N,C) -> res2 -> ln2 ->
//! fch (N,4C) -> gelu -> res3. Activation buffers are sized for a (B, T capacity) and
//! reused for any shorter T. The logits (N, V) have rows padded to a multiple of 8 values
//! (`acts::logits_ld`), so that the LM head's products see 16-byte-aligned rows whatever
//! the vocabulary (GPT-2's 50257 is odd); the padding takes part in no result.
//!
//! Differences from the CPU engine that tests must allow for: fp32 sums run in a different
//! order (warp and block reductions, cuBLAS blocking), and kernels may contract `a*b+c`
//! into FMAs. No kernel uses atomics (the token-embedding gradient adds each token's rows
//! in row order, `embedding.rs`), so a step gives the same bits from run to run.
//!
//! Decoding (`decode_*`) keeps a KV cache on the GPU (`decode.rs`): the prompt goes through
//! the layers once, then each new token runs one position per sequence and attends over
//! the cached keys and values (O(current length) per token), with the CPU engine's
//! semantics (a full cache refuses further steps; the sampler re-prefills a cropped window).
//!
//! Trait methods without a `Result` (`step`, `params`, `grads`, ...) panic with the CUDA
//! error if the GPU fails underneath them (a lost device cannot be recovered from).
//!
//! Layout of the code: this file holds the engine's state, construction, the small
//! element-wise launches and the training step around the passes (staging, CUDA graphs, the
//! `Engine` methods); `forward.rs`, `backward.rs` and `loss.rs` the passes themselves,
//! `layernorm.rs` the LayerNorm launches; `products.rs` the linear-layer products and their
//! epilogues, `attention.rs` the attention of a pass (fused or plain), `acts.rs` the
//! activation buffers and their bf16 storage, `optimizer.rs` the gradient norm and AdamW
//! step, `decode.rs` KV-cache decoding, `flash.rs` the fused attention's launches,
//! `kernels.rs` the CUDA C sources and launches, `profile.rs` the per-operation profile,
//! `switches.rs` the optimisation switches.

mod acts;
mod attention;
mod backward;
mod decode;
mod embedding;
mod fit;
pub mod flash;
mod forward;
pub mod graphs;
pub mod kernels;
mod layernorm;
mod loss;
mod optimizer;
mod products;
pub mod profile;
pub mod stack;
pub mod switches;

use super::dropout::{Dropout, DropoutSeeds};
use super::{Batch, Engine, EngineError, OptimizerState, Recompute, Result};
use crate::cuda::bf16::bf16_bits_to_f32;
use crate::cuda::cublas::{Operand, Sgemm};
use crate::cuda::cublaslt::MatmulCache;
use crate::cuda::driver::{Context, DeviceBuffer, Stream};
use crate::cuda::CudaError;
use crate::model::{GptConfig, ParamLayout};
use crate::optim::AdamWConfig;
use crate::rng::Rng;
pub use acts::{activation_bytes, Bf16Storage};
use acts::{logits_ld, Acts};
use decode::DecodeState;
use flash::FlashMath;
use kernels::{grid_cols4, grid_vec, launch, Arg, Kernels, BLOCK};
use loss::PendingLoss;
pub use loss::XENT_BLOCK;
use optimizer::merge_runs;
use products::{LnOut, Out, Src};
use stack::Stack;
use std::cell::{Cell, RefCell};
use switches::Switches;

type Buf = DeviceBuffer<'static>;
type CResult<T> = std::result::Result<T, CudaError>;

/// Row groups for deterministic column sums (bias and LayerNorm weight gradients).
const PARTS: usize = 64;
/// Blocks of the gradient-norm reduction (fixed, so the sum order does not depend on the GPU).
const NORM_PARTS: usize = 1024;
/// cuBLASLt workspace of the bf16 mode (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
const OUT_OF_MEMORY: i32 = 2;
/// bf16 scratch slots: the activation operand of a product, and a gradient rounded once for
/// the two products of a backward step.
const SLOT_ACT: usize = 0;
const SLOT_GRAD: usize = 1;
/// [`Acts::staged`]: token inputs, targets, per-row losses, dropout seeds, and the token
/// rows of a training micro-batch (`embedding::token_rows`).
const STAGE_INPUTS: usize = 0;
const STAGE_TARGETS: usize = 1;
const STAGE_LOSSES: usize = 2;
const STAGE_SEEDS: usize = 3;
const STAGE_TOKEN_ROWS: usize = 4;

/// How a backward pass puts the parameter gradients into the gradient buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GradWrite {
    /// Adds to what the buffer holds (a zeroed buffer, or earlier micro-steps' sums).
    Add,
    /// Writes over it, never reading it: the first micro-step after `zero_grad` with the
    /// `fresh_grads` switch, which leaves the buffer unwritten. Every element of the
    /// buffer is written exactly once by such a pass, with the bits adding to zeros gives
    /// (up to the sign of an exact zero from a product).
    Overwrite,
}

impl GradWrite {
    /// The beta of a weight-gradient product (`C = A B + beta C`).
    fn beta(self) -> f32 {
        match self {
            GradWrite::Add => 1.0,
            GradWrite::Overwrite => 0.0,
        }
    }
    /// The `accumulate` argument of the kernels that write gradients.
    fn accumulate(self) -> Arg {
        Arg::I32((self == GradWrite::Add) as i32)
    }
}

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

fn cuda_err(e: CudaError) -> EngineError {
    EngineError::Other(format!("CUDA: {e}"))
}

/// Address of element `elems` of an f32 buffer starting at `ptr`.
fn at(ptr: u64, elems: usize) -> u64 {
    ptr + 4 * elems as u64
}

/// The CUDA engine (float32 or bf16 mixed precision). See the module docs.
pub struct CudaEngine {
    // Device memory and handles first: fields drop in order, and all of these must go
    // while the context (last) is still alive.
    /// The captured training micro-step and evaluation pass ([`graphs`]); first, as they
    /// point into the rest.
    /// By [`graphs::StepKey::slot`]: evaluation passes, training micro-steps that add to
    /// the gradients, and those that write them.
    graphs: [graphs::StepGraphs; graphs::SLOTS],
    /// Event timers around every operation, while `profile_step` runs (see [`profile`]).
    profiler: Option<profile::Profiler>,
    decode: Option<DecodeState>,
    bf: Option<Bf16State>,
    acts: Option<Acts>,
    params: Buf,
    /// The fp32 gradients: allocated by the first training pass (or whatever else needs
    /// them on the device: [`CudaEngine::sync_grads`]), so that an engine that only
    /// samples holds none. Until then they read as zeros (`grads_unwritten`).
    grads: Option<Buf>,
    /// AdamW moments of `opt_shard` (the whole layout unless ZeRO-1 narrowed it), on the
    /// device from the first training pass or step on.
    moments: optimizer::Moments,
    opt_shard: std::ops::Range<usize>,
    /// The weight-decay runs of the shard they were built for, as `adamw_update` reads
    /// them: (start, decays) pairs of i64 relative to the shard, and their count.
    adamw_runs: Option<(std::ops::Range<usize>, Buf, usize)>,
    norm_parts: Buf,
    blas: Sgemm,
    k: Kernels,
    stream: Stream<'static>,
    /// Where a micro-step is recorded into a graph ([`graphs`]): a non-blocking stream, so
    /// that the capture has no implicit tie to the legacy default stream, which other
    /// threads (and the engine between micro-steps) use for copies and memsets. It is
    /// swapped in as `stream` while the capture records.
    capture_stream: Stream<'static>,
    ctx: Context<'static>,
    cfg: GptConfig,
    layout: ParamLayout,
    /// (offset, len, decays) with adjacent tensors of the same decay merged.
    runs: Vec<(usize, usize, bool)>,
    host_grads: Vec<f32>,
    /// `host_grads` was handed out by `grads_mut` and may differ from the device copy.
    host_grads_dirty: bool,
    /// `zero_grad` ran with `fresh_grads` and left the device gradients as they were (or
    /// they are not allocated yet): they read as zeros, the next training micro-step writes
    /// them ([`GradWrite::Overwrite`]), and anything else that reads them zeroes them first
    /// ([`CudaEngine::sync_grads`]).
    grads_unwritten: bool,
    /// The clipping factor the last optimizer step applied to the gradients of its range
    /// without writing them back (`adamw_update` with `store_g` 0): they read as clipped,
    /// as after clip_grad_norm_, and anything that reads them on the device before
    /// `zero_grad` scales them first ([`CudaEngine::sync_grads`]). Training zeroes them
    /// next, so the pass writing them back is saved.
    grads_clip_pending: Option<(std::ops::Range<usize>, f32)>,
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
        let capture_stream = ctx.stream_non_blocking().map_err(cuda_err)?;
        let target = kernels::target_for(stack, ma * 10 + mi).map_err(cuda_err)?;
        let wanted = kernels::OnDemand {
            accurate_exponentials: !switches.flash_exp2,
        };
        let mut k = Kernels::load(stack, &ctx, target, wanted).map_err(cuda_err)?;
        if !switches.flash_exp2 {
            k.use_accurate_exponentials().map_err(cuda_err)?;
        }
        if !switches.flash_async {
            k.use_synchronous_attention_loads();
        }
        if !switches.flash_hs64 {
            k.use_generic_attention();
        }
        let blas = Sgemm::new(&stack.cublas, &stream).map_err(|e| {
            EngineError::Other(format!(
                "CUDA: {e}; {} (run `nanogpt doctor` for details)",
                crate::cuda::discover::LibKind::Cublas.advice()
            ))
        })?;
        let total = layout.total;
        // What is allocated below: the fp32 parameters, the norm's partial sums, and in bf16
        // mode the parameters' bf16 copy and cuBLASLt's workspace. (The gradients and the
        // AdamW moments wait for the first training pass: `grads`, `optimizer::Moments`.)
        let state_bytes = (4 * total
            + 8 * NORM_PARTS
            + match precision {
                Precision::F32 => 0,
                Precision::Bf16 => 2 * total + LT_WORKSPACE,
            }) as u64;
        let here = format!("cuda:{device} ({})", info.name.trim());
        fit::Free::check(&here, ctx.mem_info(), state_bytes, |mem| {
            fit::state_does_not_fit(mem, total, state_bytes)
        })
        .map_err(|m| EngineError::Other(format!("CUDA: {m}")))?;
        let oom = |what: &str, e: CudaError| {
            EngineError::Other(format!(
                "CUDA: cannot allocate the {what} ({} MiB) on cuda:{device} ({}): {e}",
                (total * 4) >> 20,
                info.name
            ))
        };
        let p = ctx.upload(&params).map_err(|e| oom("parameters", e))?;
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
            graphs: Default::default(),
            bf,
            acts: None,
            params: p,
            grads: None,
            moments: optimizer::Moments::Host(None),
            opt_shard: 0..total,
            adamw_runs: None,
            norm_parts,
            blas,
            k,
            stream,
            capture_stream,
            ctx,
            runs: merge_runs(layout.decay_runs()),
            layout,
            cfg,
            host_grads: Vec::new(),
            host_grads_dirty: false,
            grads_unwritten: true,
            grads_clip_pending: None,
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

    /// How this engine's training micro-steps ran so far: captured into a CUDA graph,
    /// replayed as one, or launch by launch ([`graphs`]).
    pub fn graph_counts(&self) -> graphs::GraphCounts {
        self.graphs[graphs::TRAIN].counts + self.graphs[graphs::TRAIN_FRESH].counts
    }

    /// The same for its evaluation passes (`Engine::loss`).
    pub fn eval_graph_counts(&self) -> graphs::GraphCounts {
        self.graphs[graphs::EVAL].counts
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

    // ---------------------------------------------------------------- small helpers

    fn p(&self, off: usize) -> u64 {
        at(self.params.ptr, off)
    }
    fn g(&self, off: usize) -> u64 {
        at(self.grad_buf().ptr, off)
    }

    /// The device gradients, which [`CudaEngine::sync_grads`] allocates before any use on
    /// the device.
    fn grad_buf(&self) -> &Buf {
        self.grads
            .as_ref()
            .expect("the gradients are allocated (sync_grads) before the device uses them")
    }

    /// Allocates the gradients on first use, after checking that they fit. Their contents
    /// are not set: until then they are `grads_unwritten` (or edited on the host), so the
    /// caller overwrites them (a training micro-step's [`GradWrite::Overwrite`]) or
    /// [`CudaEngine::sync_grads`] zeroes or uploads them.
    fn grads_on_device(&mut self) -> CResult<()> {
        if self.grads.is_none() {
            let total = self.layout.total;
            let bytes = 4 * total as u64;
            fit::Free::check(&self.name, self.ctx.mem_info(), bytes, |mem| {
                fit::gradients_do_not_fit(mem, total, bytes)
            })
            .map_err(CudaError::Invalid)?;
            self.grads = Some(self.ctx.alloc(4 * total)?);
        }
        Ok(())
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
        self.run_block(f, grid, BLOCK, args)
    }

    /// [`Self::run`] with `block` threads per block instead of [`BLOCK`].
    fn run_block(
        &self,
        f: crate::cuda::driver::CuFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> CResult<()> {
        // SAFETY: every call site passes the kernel's documented parameter list (see
        // kernels/*.cu) with buffers sized for the launch.
        let go = || unsafe { launch(&self.stream, f, grid, block, args) };
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
        // The seed comes from the pass's table on the GPU (uploaded by `forward`).
        let seeds = self
            .acts
            .as_ref()
            .expect("dropout runs in a pass")
            .seeds
            .ptr;
        self.run(
            self.k.dropout_apply,
            grid_vec(n),
            &[
                Arg::Ptr(out),
                Arg::Ptr(inp),
                Arg::I64(n as i64),
                Arg::Ptr(seeds),
                Arg::I32(d.slot as i32),
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

    /// `dst[c] += sum over rows of m[r, c]` (deterministic two-pass column sum), or `=`
    /// with [`GradWrite::Overwrite`].
    fn colsum_add(
        &self,
        dst: u64,
        m: u64,
        rows: usize,
        cols: usize,
        scratch: u64,
        write: GradWrite,
    ) -> CResult<()> {
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
                write.accumulate(),
            ],
        )
    }

    /// `out[r, c] = bias[c]` (0 when `bias` is 0), out contiguous `rows x cols`.
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

    // ---------------------------------------------------------------- passes

    fn ensure_acts(&mut self, b: usize, t: usize, t_cap: usize) -> CResult<()> {
        let (rc, st) = (self.recompute, self.bf16_storage(b, t_cap.max(t)));
        if !matches!(&self.acts,
            Some(a) if a.b == b && a.t_cap >= t && a.recompute == rc && a.storage == st)
        {
            // Free the old shape first; then the gradients and moments, so that the
            // activations are planned for what is left.
            self.acts = None;
            self.grads_on_device()?;
            self.moments_on_device()?;
            let t_cap = t_cap.max(t);
            if let Some(advice) = self.activations_do_not_fit(b, t_cap, true) {
                return Err(CudaError::Invalid(advice));
            }
            let acts = Acts::new(&self.ctx, &self.cfg, b, t_cap, rc, st).map_err(|e| {
                // Free memory that did not allocate (fragmentation, another process): the
                // same advice, for what is free now.
                match (&e, self.activations_do_not_fit(b, t_cap, false)) {
                    (
                        CudaError::Driver {
                            code: OUT_OF_MEMORY,
                            ..
                        },
                        Some(advice),
                    ) => CudaError::Invalid(format!("{advice} ({e})")),
                    _ => e,
                }
            })?;
            self.acts = Some(acts);
        }
        Ok(())
    }

    /// What to change (a higher `recompute` level, a smaller batch) when the activations of
    /// a training step on `b` rows of `t` tokens need more than the device's free memory
    /// (`only_if_over`; else whatever they need), checked before any of them is allocated:
    /// an allocation failing halfway would say only "out of memory". `None` where they fit,
    /// or where the driver cannot say what is free (the allocation decides).
    fn activations_do_not_fit(&self, b: usize, t: usize, only_if_over: bool) -> Option<String> {
        let (free, total) = self.ctx.mem_info().ok()?;
        let bytes_at = |b: usize, rc: Recompute| self.activation_bytes(b, t, rc).unwrap_or(0);
        if only_if_over && bytes_at(b, self.recompute) <= free {
            return None;
        }
        let shape = fit::StepShape {
            device: &self.name,
            b,
            t,
            recompute: self.recompute,
            bytes_at: &bytes_at,
        };
        Some(fit::does_not_fit(&shape, free, total))
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
            dln: bf16 && self.switches.bf16_dln,
        }
    }

    /// Whether activations only products read are stored in bf16 (LayerNorm outputs,
    /// [`LnOut`]; the qkv gradient and, with fp32 logits, the logits gradient,
    /// [`CudaEngine::bf16_grad`]): the bf16 mode with
    /// the `bf16_acts` switch on.
    fn bf16_acts(&self) -> bool {
        self.bf.is_some() && self.switches.bf16_acts
    }

    fn dropout_seeds(&mut self) -> Option<DropoutSeeds> {
        DropoutSeeds::draw(&mut self.rng, self.cfg.dropout)
    }

    /// The gradient buffer as collectives address it.
    fn grads_location(&self) -> super::DeviceGrads {
        super::DeviceGrads {
            ptr: self.grad_buf().ptr,
            len: self.layout.total,
            stream: self.stream.s as u64,
        }
    }

    /// Makes the device gradients what the engine's callers see: clipped if the last
    /// optimizer step left its clipping pending, zeroed if `zero_grad` left them unwritten,
    /// or the ones edited on the host through `grads_mut`.
    fn sync_grads(&mut self) -> CResult<()> {
        self.ctx.make_current()?;
        self.grads_on_device()?;
        if self.grads_clip_pending.is_some() {
            // Only off the training loop's path (a read of the gradients on the device, or
            // accumulation onto them, after a step and before `zero_grad`): through the
            // host, with the kernel's arithmetic (one fp32 product per element).
            let g = self.clipped_grads()?;
            self.grad_buf().copy_from_host(&g)?;
            self.grads_clip_pending = None;
        }
        if std::mem::take(&mut self.grads_unwritten) {
            self.stream.zero(self.grad_buf())?;
        }
        if self.host_grads_dirty {
            self.grad_buf().copy_from_host(&self.host_grads)?;
            self.host_grads_dirty = false;
        }
        Ok(())
    }

    /// The device gradients on the host, with any pending clipping applied.
    fn clipped_grads(&self) -> CResult<Vec<f32>> {
        let mut g = self.download(self.grad_buf())?;
        if let Some((range, clip)) = &self.grads_clip_pending {
            for x in &mut g[range.clone()] {
                *x *= clip;
            }
        }
        Ok(g)
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
    ///
    /// [`Staging`]: crate::cuda::driver::Staging
    fn train_step(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        ready: Option<&mut (dyn FnMut(super::GradReady) + Send)>,
    ) -> Result<f32> {
        super::check_batch(&self.cfg, &batch, true)?;
        // Unwritten gradients (`fresh_grads`) are written by this micro-step, not zeroed.
        let write = match std::mem::take(&mut self.grads_unwritten) {
            true => GradWrite::Overwrite,
            false => GradWrite::Add,
        };
        self.sync_grads().map_err(cuda_err)?;
        let drop = self.dropout_seeds();
        let key = self
            .graph_key(&batch, Some((loss_scale, write)))
            .filter(|_| ready.is_none());
        if let Some(key) = key {
            if let Some(loss) = self.graph_step(key, &batch, drop).map_err(cuda_err)? {
                return Ok(loss);
            }
        }
        self.forward(batch.inputs, batch.b, batch.t, drop, true, batch.t)
            .map_err(cuda_err)?;
        let pending = self
            .cross_entropy(batch.targets, Some(loss_scale))
            .map_err(cuda_err)?;
        self.backward(batch.b, batch.t, drop, ready, write)
            .map_err(cuda_err)?;
        let slot = key.map_or(graphs::TRAIN, |k| k.slot());
        self.graphs[slot].ran_direct(key, self.ctx.memory_epoch());
        self.mean_loss(pending).map_err(cuda_err)
    }

    /// The graph key of a training micro-step (its loss scale and how it writes the
    /// gradients given) or an evaluation pass over `batch`; `None` where graphs do not
    /// apply (switched off, profiling, a driver without them).
    fn graph_key(&self, batch: &Batch, train: Option<(f32, GradWrite)>) -> Option<graphs::StepKey> {
        (self.switches.graphs && self.profiler.is_none() && self.ctx.drv.graphs.is_some()).then(
            || graphs::StepKey {
                train: train.is_some(),
                b: batch.b,
                t: batch.t,
                loss_scale: train.map_or(0.0, |(s, _)| s).to_bits(),
                counted: batch.targets.iter().filter(|&&t| t >= 0).count(),
                recompute: self.recompute,
                write: train.map_or(GradWrite::Add, |(_, w)| w),
            },
        )
    }

    /// The micro-step or evaluation pass of `key` as one graph launch (captured first when
    /// [`graphs`] says so); `None` when it is to run launch by launch instead.
    fn graph_step(
        &mut self,
        key: graphs::StepKey,
        batch: &Batch,
        drop: Option<DropoutSeeds>,
    ) -> CResult<Option<f32>> {
        self.ctx.make_current()?;
        let epoch = self.ctx.memory_epoch();
        let pending = PendingLoss {
            rows: batch.b * batch.t,
            count: key.counted,
        };
        match self.graphs[key.slot()].plan(key, epoch) {
            graphs::Plan::Direct => return Ok(None),
            graphs::Plan::Replay(exec) => {
                let a = self.acts.as_ref().expect("a captured step has activations");
                a.staged[STAGE_INPUTS].fill(batch.inputs, &a.inputs)?;
                a.staged[STAGE_TARGETS].fill(batch.targets, &a.targets)?;
                if key.train {
                    let table = embedding::token_rows(batch.inputs);
                    a.staged[STAGE_TOKEN_ROWS].fill(&table, &a.token_rows)?;
                }
                if let Some(d) = drop {
                    a.staged[STAGE_SEEDS].fill(&d.table(self.cfg.n_layer), &a.seeds)?;
                }
                exec.launch(&self.stream)?;
            }
            graphs::Plan::Capture => {
                // Recording fills the staging buffers with this micro-batch as it goes.
                let exec = match self.capture_step(batch, key, drop) {
                    Ok(exec) if self.ctx.memory_epoch() == epoch => exec,
                    outcome => {
                        let why = match outcome {
                            Err(e) => e.to_string(),
                            Ok(_) => "memory was allocated while recording".into(),
                        };
                        // Said once per kind of pass: the two training slots are one kind.
                        let said_before = match key.train {
                            true => {
                                self.graphs[graphs::TRAIN].refused_any()
                                    || self.graphs[graphs::TRAIN_FRESH].refused_any()
                            }
                            false => self.graphs[graphs::EVAL].refused_any(),
                        };
                        self.graphs[key.slot()].refuse(key);
                        if !said_before {
                            let what = match key.train {
                                true => "the training step",
                                false => "the evaluation pass",
                            };
                            eprintln!(
                                "CUDA graphs: {what} could not be captured ({why}); running it \
                                 launch by launch (NANOGPT_CUDA_DISABLE=graphs does so from \
                                 the start)"
                            );
                        }
                        return Ok(None);
                    }
                };
                self.graphs[key.slot()]
                    .captured(key, epoch, exec)
                    .launch(&self.stream)?;
            }
        }
        self.graphs[key.slot()].counts.replays += 1;
        let a = self.acts.as_ref().expect("a captured step has activations");
        for staged in &a.staged {
            staged.launched(&self.stream)?;
        }
        self.mean_loss(pending).map(Some)
    }

    /// Records forward, loss and (training) backward of `batch` into a graph (nothing
    /// runs).
    fn capture_step(
        &mut self,
        batch: &Batch,
        key: graphs::StepKey,
        drop: Option<DropoutSeeds>,
    ) -> CResult<crate::cuda::graph::GraphExec<'static>> {
        let loss_scale = f32::from_bits(key.loss_scale);
        let staging = |engine: &Self, on: bool| -> CResult<()> {
            if let Some(a) = &engine.acts {
                for staged in &a.staged {
                    staged.set_capturing(on)?;
                }
            }
            Ok(())
        };
        // The first micro-step of this key ran launch by launch, so the activations exist.
        staging(self, true)?;
        std::mem::swap(&mut self.stream, &mut self.capture_stream);
        let exec = self.blas.set_stream(&self.stream).and_then(|()| {
            self.stream.begin_capture()?;
            let recorded = (|| {
                if !key.train {
                    self.forward(batch.inputs, batch.b, batch.t, None, false, batch.t)?;
                    return self.cross_entropy(batch.targets, None).map(|_| ());
                }
                self.forward(batch.inputs, batch.b, batch.t, drop, true, batch.t)?;
                self.cross_entropy(batch.targets, Some(loss_scale))?;
                self.backward(batch.b, batch.t, drop, None, key.write)
            })();
            self.stream.end_capture(recorded)
        });
        std::mem::swap(&mut self.stream, &mut self.capture_stream);
        self.blas.set_stream(&self.stream)?;
        staging(self, false)?;
        exec
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
        let key = self.graph_key(&batch, None);
        if let Some(key) = key {
            if let Some(loss) = self.graph_step(key, &batch, None).map_err(cuda_err)? {
                return Ok(loss);
            }
        }
        self.forward(batch.inputs, batch.b, batch.t, None, false, batch.t)
            .map_err(cuda_err)?;
        let pending = self.cross_entropy(batch.targets, None).map_err(cuda_err)?;
        self.graphs[graphs::EVAL].ran_direct(key, self.ctx.memory_epoch());
        self.mean_loss(pending).map_err(cuda_err)
    }

    fn logits(&mut self, batch: Batch) -> Result<Vec<f32>> {
        super::check_batch(&self.cfg, &batch, false)?;
        self.forward(batch.inputs, batch.b, batch.t, None, false, batch.t)
            .map_err(cuda_err)?;
        let a = self.acts.as_ref().expect("forward allocated activations");
        let v = self.cfg.vocab_size;
        let (rows, ld) = (batch.b * batch.t, logits_ld(v));
        // Rows are `ld` apart on the GPU: keep the first `v` values of each.
        let unpad = |all: Vec<f32>| -> Vec<f32> {
            all.chunks(ld).flat_map(|row| row[..v].to_vec()).collect()
        };
        if a.storage.logits {
            let mut bits = vec![0u16; rows * ld];
            a.logits.copy_to_host(&mut bits).map_err(cuda_err)?;
            return Ok(unpad(bits.into_iter().map(bf16_bits_to_f32).collect()));
        }
        let mut out = vec![0f32; rows * ld];
        a.logits.copy_to_host(&mut out).map_err(cuda_err)?;
        Ok(unpad(out))
    }

    fn zero_grad(&mut self) {
        self.host_grads_dirty = false;
        self.grads_clip_pending = None;
        let Some(grads) = self.grads.as_ref().filter(|_| !self.switches.fresh_grads) else {
            // Nothing to do on the GPU: the next micro-step writes them (or a reader zeroes
            // them first).
            self.grads_unwritten = true;
            return;
        };
        let r = self.ctx.make_current().and_then(|_| grads.zero());
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
        if self.grads_unwritten {
            return vec![0.0; self.layout.total];
        }
        self.clipped_grads()
            .unwrap_or_else(|e| panic!("CUDA error while reading the gradients: {e}"))
    }
    fn grads_mut(&mut self) -> &mut [f32] {
        if !self.host_grads_dirty {
            // Unwritten gradients read as zeros; the edited copy is uploaded before the
            // next micro-step, which then adds to it.
            self.host_grads = match std::mem::take(&mut self.grads_unwritten) {
                true => vec![0.0; self.layout.total],
                false => self
                    .clipped_grads()
                    .unwrap_or_else(|e| panic!("CUDA error while reading the gradients: {e}")),
            };
            // Uploaded whole before the gradients are next used on the device.
            self.grads_clip_pending = None;
            self.host_grads_dirty = true;
        }
        &mut self.host_grads
    }
    fn allocate_gradients(&mut self) -> Result<()> {
        self.ctx
            .make_current()
            .and_then(|_| self.grads_on_device())
            .map_err(cuda_err)
    }
    fn device_grads(&mut self) -> Option<super::DeviceGrads> {
        if let Err(e) = self.sync_grads() {
            panic!("CUDA error while uploading the gradients: {e}");
        }
        Some(self.grads_location())
    }
    fn device_grads_for_backward(&mut self) -> Option<super::DeviceGrads> {
        if !self.grads_unwritten {
            return self.device_grads();
        }
        // Left unwritten (`fresh_grads`): the next micro-step writes them, so zeroing them
        // here would only cost the pass that micro-step saves. (No host edits are pending:
        // `grads_mut` clears `grads_unwritten`.)
        if let Err(e) = self.ctx.make_current().and_then(|_| self.grads_on_device()) {
            panic!("CUDA error while preparing the gradients: {e}");
        }
        Some(self.grads_location())
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
        if let Err(e) = self.set_moments(self.opt_shard.clone(), state.m, state.v) {
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
            self.set_moments(range.clone(), m, v)
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

    fn launch_report(&self) -> Option<String> {
        let (c, e) = (self.graph_counts(), self.eval_graph_counts());
        let evals = match e.replays + e.direct {
            0 => String::new(),
            n => format!("; {n} evaluation passes: {} replayed", e.replays),
        };
        Some(format!(
            "{} training micro-steps: {} replayed as CUDA graphs ({} captured), {} launched \
             kernel by kernel{evals}{}",
            c.replays + c.direct,
            c.replays,
            c.captures,
            c.direct,
            if self.switches.graphs {
                ""
            } else {
                " (graphs switched off)"
            }
        ))
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
