//! Per-operation timing of one training step on the CUDA engine, and its memory accounting.
//!
//! While a `Profiler` is installed (only inside `CudaEngine::profiled_step`), every kernel
//! launch (`CudaEngine::run`) and every matrix product (`CudaEngine::gemm`, and the cuBLASLt
//! call of `CudaEngine::mm`) is bracketed by a pair of CUDA events on the engine's stream.
//! Without one, the hooks cost one branch on `Option::None`. Work launched some other way
//! (e.g. through `flash.rs`'s own launcher) is timed by wrapping it in `region`.
//!
//! What each operation moved and computed is estimated from its arguments: matrix products
//! do `2 m n k` FLOPs per matrix and move their operands once; each kernel family has a
//! bytes-read-plus-written formula in [`kernel_bytes`] (the minimum traffic, every element
//! read or written once). The event times include any time the GPU waited for the host to
//! launch the operation, so a step that is launch-bound shows it as slow operations.

use super::kernels::Arg;
use super::{cuda_err, CResult, CudaEngine};
use crate::cuda::cublaslt::{ElemType, MatmulShape, Ran};
use crate::cuda::driver::{Context, CuFunction, Driver, Event, Stream};
use crate::engine::{Batch, EngineError, Result};
use crate::optim::AdamWConfig;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Which part of the training step an operation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Forward,
    Backward,
    Step,
}

/// A row-major matrix product `C (m x n) = op(A) op(B) (+ C)`, `batch` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Bytes per element of A and B (2: bf16, 4: fp32).
    pub ab_bytes: usize,
    /// Bytes per element of C (2: a bf16 output, 4: fp32).
    pub c_bytes: usize,
    /// C is read as well as written (beta != 0).
    pub accumulate: bool,
}

impl GemmShape {
    /// `2 m n k` per matrix of the batch.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }

    /// A and B read once, C written (and read when accumulating) once.
    pub fn bytes(&self) -> f64 {
        let (m, n, k) = (self.m as f64, self.n as f64, self.k as f64);
        let ab = self.ab_bytes as f64 * (m * k + k * n);
        let c = self.c_bytes as f64 * m * n * if self.accumulate { 2.0 } else { 1.0 };
        (ab + c) * self.batch as f64
    }

    /// `bf16` or `fp32`, the operands' type.
    pub fn dtype(&self) -> &'static str {
        if self.ab_bytes == 2 {
            "bf16"
        } else {
            "fp32"
        }
    }
}

/// The model and batch dimensions that name the products of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelDims {
    /// Rows of the activations, B * T.
    pub rows: usize,
    /// Sequence length T.
    pub t: usize,
    /// Channels C.
    pub c: usize,
    /// Real vocabulary (the LM head's width).
    pub vocab: usize,
    pub n_head: usize,
}

/// What a product does in GPT-2 (`qkv fwd`, `fc dW`, `lm_head dX`, `attn qk fwd`, ...),
/// recognised from its shape, transposes and phase; `None` for a shape the model does not
/// have. Linear layer `inp (rows, ic) @ W (ic, oc)`: forward `rows x oc x ic`, weight
/// gradient `inp^T dout` = `ic x oc x rows` (A transposed), input gradient `dout W^T` =
/// `rows x ic x oc` (B transposed). The tied LM head stores W as `(vocab, C)`, so its forward
/// has B transposed, its input gradient none, and its weight gradient is `vocab x C x rows`.
/// When two layers have the same shape (a model with vocab == 3C, say) the first listed wins.
pub fn gemm_role(d: &ModelDims, g: &GemmShape, phase: Phase) -> Option<String> {
    let (c, r, v, t) = (d.c, d.rows, d.vocab, d.t);
    let hs = c / d.n_head.max(1);
    let shape = (g.m, g.n, g.k, g.trans_a, g.trans_b);
    if g.batch == d.n_head {
        // Attention's per-row products, batched over heads (see attention_fwd/_bwd).
        let role = match (shape, phase) {
            ((m, n, k, false, true), Phase::Forward) if (m, n, k) == (t, t, hs) => "attn qk fwd",
            ((m, n, k, false, false), Phase::Forward) if (m, n, k) == (t, hs, t) => "attn pv fwd",
            ((m, n, k, false, true), Phase::Backward) if (m, n, k) == (t, t, hs) => "attn dP bwd",
            ((m, n, k, true, false), Phase::Backward) if (m, n, k) == (t, hs, t) => {
                "attn dV/dK bwd"
            }
            ((m, n, k, false, false), Phase::Backward) if (m, n, k) == (t, hs, t) => "attn dQ bwd",
            _ => "",
        };
        if !role.is_empty() {
            return Some(role.to_string());
        }
    }
    if g.batch != 1 {
        return None;
    }
    let linears = [
        ("qkv", c, 3 * c),
        ("attn proj", c, c),
        ("fc", c, 4 * c),
        ("mlp proj", 4 * c, c),
    ];
    for (name, ic, oc) in linears {
        let role = match shape {
            (m, n, k, false, false) if (m, n, k) == (r, oc, ic) => "fwd",
            (m, n, k, true, false) if (m, n, k) == (ic, oc, r) => "dW",
            (m, n, k, false, true) if (m, n, k) == (r, ic, oc) => "dX",
            _ => continue,
        };
        return Some(format!("{name} {role}"));
    }
    let role = match shape {
        (m, n, k, false, true) if (m, n, k) == (r, v, c) => "fwd",
        (m, n, k, false, false) if (m, n, k) == (r, c, v) => "dX",
        (m, n, k, true, false) if (m, n, k) == (v, c, r) => "dW",
        _ => return None,
    };
    Some(format!("lm_head {role}"))
}

/// The table name of a product: `gemm fc fwd 8192x3072x768 bf16` (`x12` after the shape for
/// a batch of 12), or `gemm 10x20x30 fp32` when the role is not recognised.
pub fn gemm_label(d: &ModelDims, g: &GemmShape, phase: Phase) -> String {
    let batch = if g.batch > 1 {
        format!(" x{}", g.batch)
    } else {
        String::new()
    };
    let role = gemm_role(d, g, phase).map_or(String::new(), |r| format!("{r} "));
    format!("gemm {role}{}x{}x{}{batch} {}", g.m, g.n, g.k, g.dtype())
}

/// Integer argument `i` as f64 (`None` for a pointer or float, or past the end).
fn int(args: &[Arg], i: usize) -> Option<f64> {
    match args.get(i)? {
        Arg::I32(v) => Some(*v as f64),
        Arg::I64(v) => Some(*v as f64),
        Arg::U32(v) => Some(*v as f64),
        Arg::U64(v) => Some(*v as f64),
        Arg::Ptr(_) | Arg::F32(_) => None,
    }
}

/// 1.0 when pointer argument `i` is not null, else 0.0.
fn present(args: &[Arg], i: usize) -> Option<f64> {
    match args.get(i)? {
        Arg::Ptr(p) => Some(if *p != 0 { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// Bytes per value of a LayerNorm backward's dout: 2 when its bf16 pointer (argument `i`)
/// is given, else 4.
fn dout_bytes(args: &[Arg], i: usize) -> Option<f64> {
    Some(4.0 - 2.0 * present(args, i)?)
}

/// Bytes read plus written by one launch of kernel `name` with `args` (the parameter lists of
/// `kernels/*.cu`) on `grid`: each element counted once, fp32 = 4 bytes. `None` for kernels
/// without a formula (decoding, fused attention) or arguments that do not fit the formula.
pub fn kernel_bytes(name: &str, grid: (u32, u32, u32), args: &[Arg]) -> Option<f64> {
    let a = |i| int(args, i);
    let f = 4.0;
    let parts = |rows: f64, per_part: f64| (rows / per_part.max(1.0)).ceil();
    Some(match name {
        // x = wte[tok] + wpe[pos]: tokens, two table rows read, x written.
        "embedding_forward" => {
            let (n, c) = (a(4)?, a(6)?);
            f * n + 3.0 * f * n * c
        }
        // dwte[tok] += dx: the row table and dx read, the batch's rows of dwte (at most
        // one per row of dx) read and written once each.
        "embedding_backward_wte" => {
            let (n, c) = (a(3)?, a(4)?);
            f * (3.0 * n + 2.0) + 3.0 * f * n * c
        }
        // dwpe += sum over b of dx (dwpe read only when accumulating).
        "embedding_backward_wpe" => {
            let (b, t, c, acc) = (a(2)?, a(3)?, a(4)?, a(5)?);
            f * b * t * c + (1.0 + acc) * f * t * c
        }
        // x read, out written (fp32 and/or bf16), mean and rstd written, weight (and bias)
        // read.
        "layernorm_forward" => {
            let (n, c) = (a(7)?, a(8)?);
            let out = f * present(args, 0)? + 2.0 * present(args, 1)?;
            (f + out) * n * c + 2.0 * f * n + f * c * (1.0 + present(args, 6)?)
        }
        // a and b read, res written, then LayerNorm(res) as layernorm_forward (res read back
        // by the lane that wrote it: from cache, not counted).
        "residual_layernorm_forward" => {
            let (n, c) = (a(9)?, a(10)?);
            let out = f * present(args, 1)? + 2.0 * present(args, 2)?;
            (3.0 * f + out) * n * c + 2.0 * f * n + f * c * (1.0 + present(args, 8)?)
        }
        // x, mean and rstd read, out written (fp32 and/or bf16), weight (and bias) read.
        "layernorm_recompute" => {
            let (n, c) = (a(7)?, a(8)?);
            let out = f * present(args, 0)? + 2.0 * present(args, 1)?;
            (f + out) * n * c + 2.0 * f * n + f * c * (1.0 + present(args, 6)?)
        }
        // dout (fp32, or bf16 when dout_bf16 is given) and x read, dx read and written (+=)
        // and, when given, written in bf16 too; mean, rstd and weight read.
        "layernorm_backward_dx" => {
            let (n, c) = (a(8)?, a(9)?);
            (3.0 * f + dout_bytes(args, 3)? + 2.0 * present(args, 1)?) * n * c + 2.0 * f * n + f * c
        }
        // layernorm_backward_dx's traffic, and two partial sums per column per block.
        "layernorm_backward" => {
            let (n, c) = (a(9)?, a(10)?);
            (3.0 * f + dout_bytes(args, 4)? + 2.0 * present(args, 1)?) * n * c
                + 2.0 * f * n
                + f * c
                + 2.0 * f * c * grid.0 as f64
        }
        // dout (fp32 or bf16), x, mean, rstd read; two partial sums per column per part
        // written.
        "layernorm_backward_parts" => {
            let (n, c, rpp) = (a(6)?, a(7)?, a(8)?);
            (f + dout_bytes(args, 2)?) * n * c + 2.0 * f * n + 2.0 * f * c * parts(n, rpp)
        }
        "gelu_forward" | "dropout_apply" => 2.0 * f * a(2)?,
        "gelu_backward_inplace" | "add_inplace" => 3.0 * f * a(2)?,
        "bias_broadcast" => {
            let (rows, cols) = (a(2)?, a(3)?);
            f * rows * cols + f * cols * present(args, 1)?
        }
        "colsum_parts" => {
            let (rows, cols, rpp) = (a(2)?, a(3)?, a(4)?);
            f * rows * cols + f * cols * parts(rows, rpp)
        }
        "reduce_parts_add" => {
            let (np, cols, acc) = (a(2)?, a(3)?, a(5)?);
            f * np * cols + (1.0 + acc) * f * cols
        }
        // Row i of a T x T block reads its i+1 causal scores and writes all T.
        "causal_softmax_forward" => {
            let (rows, t) = (a(1)?, a(2)?);
            f * rows * ((t + 1.0) / 2.0 + t)
        }
        // Reads the causal part of P and dP, writes all of dS.
        "causal_softmax_backward" => {
            let (rows, t) = (a(2)?, a(3)?);
            f * rows * ((t + 1.0) + t)
        }
        // Logits read (and overwritten by their gradient, or the gradient written in bf16),
        // targets read, f64 losses written.
        // bf16 logits read, and overwritten by their bf16 gradient with write_grad.
        "cross_entropy_bf16" => {
            let (n, v, grad) = (a(3)?, a(4)?, a(7)?);
            (2.0 + 2.0 * grad.min(1.0)) * n * v + f * n + 8.0 * n
        }
        "cross_entropy_forward_backward" => {
            let (n, v, grad) = (a(4)?, a(5)?, a(8)?);
            let grad_bytes = if present(args, 1)? > 0.0 { 2.0 } else { f };
            f * n * v + grad.min(1.0) * grad_bytes * n * v + f * n + 8.0 * n
        }
        // Gradients read; one f64 partial per block written.
        "sumsq_parts" => f * a(2)? + 8.0 * grid.0 as f64,
        // p, g, m, v read; p, m, v written; g written when clipping (clip != 1) and asked
        // to store it; the bf16 copy written when there is one; the weight-decay runs
        // (16 bytes each) read.
        "adamw_update" => {
            let (n, runs) = (a(4)?, a(6)?);
            let clipping = match args.get(8)? {
                Arg::F32(clip) => *clip != 1.0,
                _ => return None,
            };
            let stores_g = (clipping && a(15)? != 0.0) as u8 as f64;
            (7.0 + stores_g) * f * n + 2.0 * n * present(args, 14)? + 16.0 * runs
        }
        "cast_f32_to_bf16" | "cast_bf16_to_f32" => 6.0 * a(2)?,
        // bf16 GELU written; the saved bf16 pre-activation written when asked for; the
        // input read in fp32 or bf16.
        "gelu_forward_bf16" => {
            let n = a(4)?;
            let pre_out = present(args, 1)?;
            n * (2.0 + 2.0 * pre_out + f * present(args, 2)? + 2.0 * present(args, 3)?)
        }
        // fp32 gradient and bf16 pre-activation read, bf16 gradient written.
        "gelu_backward_bf16" => (f + 4.0) * a(3)?,
        _ => return None,
    })
}

/// One timed operation of a profiled step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    /// Kernel name, or the product's label ([`gemm_label`]).
    pub name: String,
    /// `kernel`, `gemm`, or `attention` (the fused attention, [`flash_work`]).
    pub kind: &'static str,
    pub phase: Phase,
    /// GPU milliseconds between the events around it.
    pub ms: f64,
    /// Floating-point operations (matrix products and the fused attention).
    pub flops: Option<f64>,
    /// Bytes read plus written, where there is a formula.
    pub bytes: Option<f64>,
    /// Operand type of a matrix product, or the fused attention's arithmetic (`bf16`,
    /// `fp32`): the rate its floor assumes.
    pub gemm_dtype: Option<&'static str>,
}

/// Every operation of one profiled training step, in launch order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepProfile {
    pub device: String,
    pub dims: ModelDims,
    pub ops: Vec<OpTime>,
    /// Host wall-clock milliseconds of the whole step (zero_grad, forward + backward per
    /// micro-step, optimizer step, including its final synchronisation).
    pub wall_ms: f64,
    /// How the bf16 mode's products ran: each product with an epilogue ("... fused" or
    /// "... unfused: why"), then each one cuBLASLt had no bf16 algorithm for (run in
    /// fp32). Empty in fp32 mode.
    pub products: Vec<String>,
}

/// Device memory: the engine's own allocations by purpose, and what the driver reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryReport {
    /// (what, bytes) for each group of the engine's buffers.
    pub items: Vec<(String, u64)>,
    /// `cuMemGetInfo` right now, when the engine can ask the driver.
    pub device_free: Option<u64>,
    pub device_total: Option<u64>,
    /// (what, bytes) the engine allocates at its first training pass, beyond `items`: the
    /// gradients and the AdamW moments of its optimizer shard, while not allocated yet.
    pub before_first_pass: Vec<(String, u64)>,
}

/// The [`MemoryReport`] items that hold activations (what a training step's shape and
/// the `recompute` level decide, as opposed to parameters and optimizer state).
pub const ACTIVATION_ITEMS: [&str; 6] = [
    "activations (saved for backward)",
    "recompute buffers (shared by all layers)",
    "logits and loss",
    "backward scratch",
    "attention T x T matrices (plain path)",
    "fused attention logsumexp and scratch",
];

impl MemoryReport {
    /// Sum of [`MemoryReport::items`].
    pub fn accounted(&self) -> u64 {
        self.items.iter().map(|(_, b)| b).sum()
    }

    /// Sum of the [`ACTIVATION_ITEMS`].
    pub fn activation_bytes(&self) -> u64 {
        self.items
            .iter()
            .filter(|(what, _)| ACTIVATION_ITEMS.contains(&what.as_str()))
            .map(|(_, b)| b)
            .sum()
    }
}

// ------------------------------------------------------------------------------ recording

enum RawOp {
    Kernel {
        f: CuFunction,
        grid: (u32, u32, u32),
        args: Vec<Arg>,
    },
    Gemm(GemmShape),
    /// A region of work named by the caller ([`region`]), with what it computes and moves.
    Named(&'static str, Work),
}

struct Record {
    op: RawOp,
    phase: Phase,
    start: Event<'static>,
    end: Event<'static>,
}

/// Event pairs around each operation, while one step is being profiled.
pub(super) struct Profiler {
    drv: &'static Driver,
    records: RefCell<Vec<Record>>,
    phase: Cell<Phase>,
    /// The cross-entropy kernels (fp32 and bf16 logits): the backward pass starts after
    /// either.
    loss_kernels: [CuFunction; 2],
}

impl Profiler {
    fn new(drv: &'static Driver, loss_kernels: [CuFunction; 2]) -> Profiler {
        Profiler {
            drv,
            records: RefCell::new(Vec::with_capacity(4096)),
            phase: Cell::new(Phase::Forward),
            loss_kernels,
        }
    }

    /// Runs `work` (which enqueues on `stream`) between two events; the record is dropped
    /// when `keep` says nothing was enqueued.
    fn time<R>(
        &self,
        stream: &Stream,
        op: RawOp,
        work: impl FnOnce() -> CResult<R>,
        keep: impl FnOnce(&R) -> bool,
    ) -> CResult<R> {
        let start = Event::new(self.drv)?;
        let end = Event::new(self.drv)?;
        start.record(stream)?;
        let r = work()?;
        end.record(stream)?;
        if keep(&r) {
            self.records.borrow_mut().push(Record {
                op,
                phase: self.phase.get(),
                start,
                end,
            });
        }
        Ok(r)
    }

    /// Waits for the last event and turns the records into timed operations.
    fn finish(self, dims: &ModelDims) -> CResult<Vec<OpTime>> {
        let records = self.records.into_inner();
        if let Some(last) = records.last() {
            last.end.synchronize()?;
        }
        let mut names: HashMap<usize, String> = HashMap::new();
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let ms = r.start.elapsed_ms(&r.end)? as f64;
            out.push(match r.op {
                RawOp::Kernel { f, grid, args } => {
                    let name = names
                        .entry(f as usize)
                        .or_insert_with(|| {
                            // SAFETY: `f` was launched from one of the engine's modules,
                            // which stay loaded while the engine lives.
                            unsafe { self.drv.function_name(f) }
                                .unwrap_or_else(|| format!("kernel@{:#x}", f as usize))
                        })
                        .clone();
                    OpTime {
                        bytes: kernel_bytes(&name, grid, &args),
                        name,
                        kind: "kernel",
                        phase: r.phase,
                        ms,
                        flops: None,
                        gemm_dtype: None,
                    }
                }
                RawOp::Named(name, w) => OpTime {
                    name: name.to_string(),
                    kind: if w.flops.is_some() {
                        "attention"
                    } else {
                        "kernel"
                    },
                    phase: r.phase,
                    ms,
                    flops: w.flops,
                    bytes: w.bytes,
                    gemm_dtype: w.dtype,
                },
                RawOp::Gemm(g) => OpTime {
                    name: gemm_label(dims, &g, r.phase),
                    kind: "gemm",
                    phase: r.phase,
                    ms,
                    flops: Some(g.flops()),
                    bytes: Some(g.bytes()),
                    gemm_dtype: Some(g.dtype()),
                },
            });
        }
        Ok(out)
    }
}

/// The hook of `CudaEngine::run`: `go` launches kernel `f`; timed when profiling.
#[inline]
pub(super) fn kernel(
    p: &Option<Profiler>,
    stream: &Stream,
    f: CuFunction,
    grid: (u32, u32, u32),
    args: &[Arg],
    go: impl FnOnce() -> CResult<()>,
) -> CResult<()> {
    let Some(p) = p else {
        return go();
    };
    let op = RawOp::Kernel {
        f,
        grid,
        args: args.to_vec(),
    };
    p.time(stream, op, go, |_| true)?;
    if p.loss_kernels.contains(&f) {
        p.phase.set(Phase::Backward);
    }
    Ok(())
}

/// Times `go` (work it enqueues on `stream`) as one operation called `name` that does
/// `work`, for launches that do not go through `CudaEngine::run` (e.g. `region(&self.profiler,
/// &self.stream, "flash_attn_bwd (bf16 mma)", work, || unsafe { flash::flash_backward(..) })`).
/// (Not used by the plain path, whose launches all go through `run`.)
#[inline]
pub(super) fn region<R>(
    p: &Option<Profiler>,
    stream: &Stream,
    name: &'static str,
    work: Work,
    go: impl FnOnce() -> CResult<R>,
) -> CResult<R> {
    match p {
        None => go(),
        Some(p) => p.time(stream, RawOp::Named(name, work), go, |_| true),
    }
}

/// What an operation timed as a named `region` computes and moves, where known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub flops: Option<f64>,
    pub bytes: Option<f64>,
    /// The arithmetic's type (`bf16`, `fp32`): the rate of the floor, with `flops`.
    pub dtype: Option<&'static str>,
}

/// The useful work of the fused causal attention over `shape` (forward, or `backward`),
/// with q, k, v, the output and its gradient stored in `io_bytes` per value, the gradient
/// of q, k, v written in `grad_bytes`, and bf16 (`bf16_math`) or fp32 arithmetic.
///
/// FLOPs: query i sees keys 0..=i, so a head of T tokens has T (T + 1) / 2 (query, key)
/// pairs, and each product over them costs 2 hs FLOPs per pair. The forward computes two
/// (S = Q K^T, O = P V); the backward seven: the dk/dv kernel recomputes S and dP = dY V^T
/// and computes dV = P^T dY and dK = dS^T Q, the dq kernel recomputes S and dP and computes
/// dQ = dS K. The masked halves of the diagonal tiles, which the kernels also compute, are
/// not counted: this is the work a perfect kernel would do.
///
/// Bytes (each tensor once, the floor): forward, q, k, v read, the output and the
/// logsumexp written; backward, q, k, v, the output and its gradient read, the logsumexp
/// read, D written and read back, the gradient of q, k, v written.
pub fn flash_work(
    shape: &super::flash::AttnShape,
    bf16_math: bool,
    io_bytes: usize,
    grad_bytes: usize,
    backward: bool,
) -> Work {
    let (b, t, c, nh) = (
        shape.b as f64,
        shape.t as f64,
        shape.c as f64,
        shape.nh as f64,
    );
    let hs = shape.hs() as f64;
    let pairs = b * nh * t * (t + 1.0) / 2.0;
    let (n, e, rows) = (b * t, io_bytes as f64, b * nh * t);
    let (products, bytes) = if backward {
        let read = e * n * (3.0 * c + c + c);
        (
            7.0,
            read + grad_bytes as f64 * n * 3.0 * c + 4.0 * rows * 3.0,
        )
    } else {
        (2.0, e * n * (3.0 * c + c) + 4.0 * rows)
    };
    Work {
        flops: Some(products * 2.0 * hs * pairs),
        bytes: Some(bytes),
        dtype: Some(if bf16_math { "bf16" } else { "fp32" }),
    }
}

/// The hook of `CudaEngine::gemm` (cuBLAS sgemm, fp32 operands).
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    p: &Option<Profiler>,
    stream: &Stream,
    (m, n, k): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    beta: f32,
    batch: usize,
    go: impl FnOnce() -> CResult<()>,
) -> CResult<()> {
    let Some(p) = p else {
        return go();
    };
    let g = GemmShape {
        m,
        n,
        k,
        batch,
        trans_a,
        trans_b,
        ab_bytes: 4,
        c_bytes: 4,
        accumulate: beta != 0.0,
    };
    p.time(stream, RawOp::Gemm(g), go, |_| true)
}

/// The hook of the cuBLASLt product in `CudaEngine::mm`; a shape cuBLASLt refused enqueued
/// nothing and is not recorded (its fp32 fallback is, through [`sgemm`]).
#[inline]
pub(super) fn lt(
    p: &Option<Profiler>,
    stream: &Stream,
    shape: &MatmulShape,
    beta: f32,
    go: impl FnOnce() -> CResult<Ran>,
) -> CResult<Ran> {
    let Some(p) = p else {
        return go();
    };
    let g = GemmShape {
        m: shape.m,
        n: shape.n,
        k: shape.k,
        batch: 1,
        trans_a: shape.trans_a,
        trans_b: shape.trans_b,
        ab_bytes: match shape.ab {
            ElemType::Bf16 => 2,
            ElemType::F32 => 4,
        },
        c_bytes: match shape.c {
            ElemType::Bf16 => 2,
            ElemType::F32 => 4,
        },
        accumulate: beta != 0.0,
    };
    p.time(stream, RawOp::Gemm(g), go, |r| matches!(r, Ran::Lt))
}

// ------------------------------------------------------------------------------ the engine

impl CudaEngine {
    /// One training step (zero_grad, `micro_steps` x forward_backward, optimizer step) with
    /// every operation timed; see the module docs.
    pub(super) fn profiled_step(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        micro_steps: usize,
        hp: &AdamWConfig,
        lr: f32,
    ) -> Result<StepProfile> {
        use crate::engine::Engine;
        self.ctx.make_current().map_err(cuda_err)?;
        self.stream.synchronize().map_err(cuda_err)?;
        let drv: &'static Driver = self.ctx.drv;
        self.profiler = Some(Profiler::new(
            drv,
            [
                self.k.cross_entropy_forward_backward,
                self.k.cross_entropy_bf16,
            ],
        ));
        let start = std::time::Instant::now();
        let ran = (|| -> Result<()> {
            self.zero_grad();
            for _ in 0..micro_steps.max(1) {
                if let Some(p) = &self.profiler {
                    p.phase.set(Phase::Forward);
                }
                self.forward_backward(batch, loss_scale)?;
            }
            if let Some(p) = &self.profiler {
                p.phase.set(Phase::Step);
            }
            // step_inner ends with a stream synchronisation.
            self.step_inner(hp, lr).map_err(cuda_err)?;
            Ok(())
        })();
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        let profiler = self
            .profiler
            .take()
            .expect("the profiler installed above is only removed here");
        ran?;
        let dims = ModelDims {
            rows: batch.b * batch.t,
            t: batch.t,
            c: self.cfg.n_embd,
            vocab: self.cfg.vocab_size,
            n_head: self.cfg.n_head,
        };
        let ops = profiler.finish(&dims).map_err(cuda_err)?;
        let mut products = self.epilogue_report();
        products.extend(
            self.gemm_fallbacks()
                .into_iter()
                .map(|s| format!("{s}: no bf16 algorithm, run in fp32")),
        );
        Ok(StepProfile {
            device: self.name.clone(),
            dims,
            ops,
            wall_ms,
            products,
        })
    }

    /// The engine's device buffers by purpose, and the driver's free/total figures.
    pub(super) fn memory(&self) -> MemoryReport {
        let mut items: Vec<(String, u64)> = Vec::new();
        let mut add = |what: &str, bytes: usize| {
            if bytes > 0 {
                items.push((what.to_string(), bytes as u64));
            }
        };
        add("parameters (fp32)", self.params.bytes);
        add(
            "gradients (fp32)",
            self.grads.as_ref().map_or(0, |g| g.bytes),
        );
        add("AdamW moments (fp32)", self.moments.device_bytes());
        add("gradient-norm partials", self.norm_parts.bytes);
        if let Some(bf) = &self.bf {
            add("parameters (bf16 copy)", bf.params.bytes);
            add("cuBLASLt workspace", bf.workspace.bytes);
            let scratch: usize = bf
                .scratch
                .iter()
                .map(|s| s.borrow().as_ref().map_or(0, |b| b.bytes))
                .sum();
            add("bf16 operand scratch", scratch);
        }
        if let Some(a) = &self.acts {
            let opt = |b: &Option<crate::cuda::driver::DeviceBuffer<'static>>| {
                b.as_ref().map_or(0, |b| b.bytes)
            };
            let saved: usize = a
                .layers
                .iter()
                .map(|l| {
                    [
                        &l.ln1_mean,
                        &l.ln1_rstd,
                        &l.qkv,
                        &l.atty,
                        &l.res2,
                        &l.ln2_mean,
                        &l.ln2_rstd,
                        &l.fch,
                        &l.res3,
                    ]
                    .iter()
                    .map(|b| b.bytes)
                    .sum::<usize>()
                        + opt(&l.ln1)
                        + opt(&l.ln2)
                        + opt(&l.fch_gelu)
                })
                .sum::<usize>()
                + [&a.encoded, &a.lnf, &a.lnf_mean, &a.lnf_rstd]
                    .iter()
                    .map(|b| b.bytes)
                    .sum::<usize>();
            add(ACTIVATION_ITEMS[0], saved);
            add(ACTIVATION_ITEMS[1], opt(&a.gelu_shared) + opt(&a.ln_shared));
            add(
                ACTIVATION_ITEMS[2],
                a.logits.bytes
                    + a.row_loss.bytes
                    + a.inputs.bytes
                    + a.targets.bytes
                    + a.token_rows.bytes,
            );
            add(
                ACTIVATION_ITEMS[3],
                [
                    &a.dres,
                    &a.dtmp,
                    &a.dln,
                    &a.dfch,
                    &a.dqkv,
                    &a.ln_parts,
                    &a.bias_parts,
                ]
                .iter()
                .map(|b| b.bytes)
                .sum(),
            );
        }
        if let Some(a) = &self.acts {
            // Allocated on first use: the plain attention path's T x T matrices, and the
            // fused path's logsumexp and scratch vectors.
            let lazy = |c: &std::cell::OnceCell<crate::cuda::driver::DeviceBuffer<'static>>| {
                c.get().map_or(0, |b| b.bytes)
            };
            let tt: usize = a.layers.iter().map(|l| lazy(&l.att)).sum::<usize>()
                + lazy(&a.datt)
                + lazy(&a.patt);
            add(ACTIVATION_ITEMS[4], tt);
            let fused: usize = a.layers.iter().map(|l| lazy(&l.lse)).sum::<usize>() + lazy(&a.dvec);
            add(ACTIVATION_ITEMS[5], fused);
        }
        let info = self.ctx.mem_info().ok();
        MemoryReport {
            items,
            device_free: info.map(|i| i.0),
            device_total: info.map(|i| i.1),
            before_first_pass: [
                (
                    "gradients",
                    self.grads.as_ref().map_or(4 * self.layout.total, |_| 0),
                ),
                (
                    "AdamW moments",
                    self.moments.bytes_to_allocate(self.opt_shard.len()),
                ),
            ]
            .into_iter()
            .filter(|&(_, bytes)| bytes > 0)
            .map(|(what, bytes)| (what.to_string(), bytes as u64))
            .collect(),
        }
    }
}

/// Device memory in use on a GPU before an engine is created there, with its primary context
/// held (so that the context's own memory counts as already in use, and stays so).
pub struct MemoryBaseline {
    _ctx: Context<'static>,
    /// total - free when it was taken.
    pub used: u64,
    pub total: u64,
}

/// Takes a [`MemoryBaseline`] on GPU `device`.
pub fn memory_baseline(device: usize) -> std::result::Result<MemoryBaseline, EngineError> {
    let stack = super::stack::stack().map_err(EngineError::Other)?;
    let ctx = stack.driver.context(device).map_err(cuda_err)?;
    let (free, total) = ctx.mem_info().map_err(cuda_err)?;
    Ok(MemoryBaseline {
        _ctx: ctx,
        used: total.saturating_sub(free),
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2 124M at B = 8, T = 1024.
    const GPT2: ModelDims = ModelDims {
        rows: 8192,
        t: 1024,
        c: 768,
        vocab: 50257,
        n_head: 12,
    };

    fn g(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            batch: 1,
            trans_a: ta,
            trans_b: tb,
            ab_bytes: 2,
            c_bytes: 4,
            accumulate: false,
        }
    }

    #[test]
    fn a_bf16_output_counts_two_bytes_per_value() {
        let fp32 = g(4, 8, 16, false, false);
        let bf16 = GemmShape { c_bytes: 2, ..fp32 };
        // A 4 x 16 and B 16 x 8 in bf16: 2 * (64 + 128) bytes; C 4 x 8.
        assert_eq!(fp32.bytes(), 384.0 + 4.0 * 32.0);
        assert_eq!(bf16.bytes(), 384.0 + 2.0 * 32.0);
        let acc = GemmShape {
            accumulate: true,
            ..bf16
        };
        assert_eq!(acc.bytes(), 384.0 + 2.0 * 2.0 * 32.0);
    }

    #[test]
    fn flash_attention_work_counts_the_causal_pairs() {
        use super::super::flash::AttnShape;
        // One head of T = 2 tokens, hs = 16: pairs (0,0), (1,0), (1,1).
        let s = AttnShape {
            b: 1,
            t: 2,
            c: 16,
            nh: 1,
        };
        let fwd = flash_work(&s, true, 2, 0, false);
        assert_eq!(fwd.flops, Some(2.0 * 2.0 * 16.0 * 3.0));
        // q, k, v (2 x 48) read and y (2 x 16) written in bf16, lse (2 floats) written.
        assert_eq!(fwd.bytes, Some(2.0 * (96.0 + 32.0) + 8.0));
        assert_eq!(fwd.dtype, Some("bf16"));
        let bwd = flash_work(&s, false, 4, 4, true);
        assert_eq!(bwd.flops, Some(7.0 * 2.0 * 16.0 * 3.0));
        // q, k, v, y, dy read (2 x 80 fp32), dq, dk, dv written (2 x 48 fp32), lse read,
        // D written and read (3 x 2 floats).
        assert_eq!(bwd.bytes, Some(4.0 * 160.0 + 4.0 * 96.0 + 24.0));
        assert_eq!(bwd.dtype, Some("fp32"));
        // GPT-2 124M at B = 8, T = 1024, one layer's forward: 2 products x 2 x 64 FLOPs
        // over 8 x 12 x 1024 x 1025 / 2 pairs, 12.9 GFLOP.
        let gpt2 = AttnShape {
            b: 8,
            t: 1024,
            c: 768,
            nh: 12,
        };
        let f = flash_work(&gpt2, true, 2, 2, false).flops.unwrap();
        assert_eq!(f, 4.0 * 64.0 * 8.0 * 12.0 * 1024.0 * 1025.0 / 2.0);
    }

    #[test]
    fn every_linear_product_of_gpt2_is_named() {
        let f = Phase::Forward;
        let b = Phase::Backward;
        let name = |s: GemmShape, p| gemm_role(&GPT2, &s, p);
        let cases = [
            (g(8192, 2304, 768, false, false), f, "qkv fwd"),
            (g(768, 2304, 8192, true, false), b, "qkv dW"),
            (g(8192, 768, 2304, false, true), b, "qkv dX"),
            (g(8192, 768, 768, false, false), f, "attn proj fwd"),
            (g(768, 768, 8192, true, false), b, "attn proj dW"),
            (g(8192, 768, 768, false, true), b, "attn proj dX"),
            (g(8192, 3072, 768, false, false), f, "fc fwd"),
            (g(768, 3072, 8192, true, false), b, "fc dW"),
            (g(8192, 768, 3072, false, true), b, "fc dX"),
            (g(8192, 768, 3072, false, false), f, "mlp proj fwd"),
            (g(3072, 768, 8192, true, false), b, "mlp proj dW"),
            (g(8192, 3072, 768, false, true), b, "mlp proj dX"),
            (g(8192, 50257, 768, false, true), f, "lm_head fwd"),
            (g(8192, 768, 50257, false, false), b, "lm_head dX"),
            (g(50257, 768, 8192, true, false), b, "lm_head dW"),
        ];
        for (s, p, want) in cases {
            assert_eq!(name(s, p).as_deref(), Some(want), "{s:?}");
        }
        assert_eq!(name(g(7, 8, 9, false, false), f), None);
    }

    #[test]
    fn attention_products_are_told_apart_by_phase() {
        let at = |m, n, k, ta, tb| GemmShape {
            batch: 12,
            ab_bytes: 4,
            c_bytes: 4,
            ..g(m, n, k, ta, tb)
        };
        let r = |s, p| gemm_role(&GPT2, &s, p);
        assert_eq!(
            r(at(1024, 1024, 64, false, true), Phase::Forward).as_deref(),
            Some("attn qk fwd")
        );
        assert_eq!(
            r(at(1024, 64, 1024, false, false), Phase::Forward).as_deref(),
            Some("attn pv fwd")
        );
        assert_eq!(
            r(at(1024, 1024, 64, false, true), Phase::Backward).as_deref(),
            Some("attn dP bwd")
        );
        assert_eq!(
            r(at(1024, 64, 1024, true, false), Phase::Backward).as_deref(),
            Some("attn dV/dK bwd")
        );
        assert_eq!(
            r(at(1024, 64, 1024, false, false), Phase::Backward).as_deref(),
            Some("attn dQ bwd")
        );
        assert_eq!(
            gemm_label(&GPT2, &at(1024, 1024, 64, false, true), Phase::Forward),
            "gemm attn qk fwd 1024x1024x64 x12 fp32"
        );
        assert_eq!(
            gemm_label(&GPT2, &g(8192, 3072, 768, false, false), Phase::Forward),
            "gemm fc fwd 8192x3072x768 bf16"
        );
        assert_eq!(
            gemm_label(&GPT2, &g(3, 4, 5, false, false), Phase::Forward),
            "gemm 3x4x5 bf16"
        );
    }

    #[test]
    fn gemm_flops_and_bytes() {
        let s = g(8192, 3072, 768, false, false);
        assert_eq!(s.flops(), 2.0 * 8192.0 * 3072.0 * 768.0);
        assert_eq!(
            s.bytes(),
            2.0 * (8192.0 * 768.0 + 768.0 * 3072.0) + 4.0 * 8192.0 * 3072.0
        );
        let acc = GemmShape {
            accumulate: true,
            ab_bytes: 4,
            c_bytes: 4,
            batch: 3,
            ..g(2, 3, 4, true, false)
        };
        assert_eq!(acc.flops(), 3.0 * 2.0 * 24.0);
        assert_eq!(acc.bytes(), 3.0 * (4.0 * (8.0 + 12.0) + 8.0 * 6.0));
    }

    #[test]
    fn kernel_byte_formulas() {
        use Arg::*;
        let one = (1, 1, 1);
        let kb = |name, args: &[Arg]| kernel_bytes(name, one, args);
        // n = 8192 rows, c = 768.
        let (n, c) = (8192.0, 768.0);
        assert_eq!(
            kb(
                "layernorm_forward",
                &[
                    Ptr(1),
                    Ptr(0),
                    Ptr(3),
                    Ptr(4),
                    Ptr(5),
                    Ptr(6),
                    Ptr(0),
                    I32(8192),
                    I32(768)
                ]
            ),
            Some(8.0 * n * c + 8.0 * n + 4.0 * c)
        );
        // bf16 output only: x read in fp32, out written in bf16.
        assert_eq!(
            kb(
                "layernorm_forward",
                &[
                    Ptr(0),
                    Ptr(2),
                    Ptr(3),
                    Ptr(4),
                    Ptr(5),
                    Ptr(6),
                    Ptr(7),
                    I32(8192),
                    I32(768)
                ]
            ),
            Some(6.0 * n * c + 8.0 * n + 8.0 * c)
        );
        // The residual add and the next LayerNorm, bf16 output, no bias: a, b read, res
        // written (fp32), out written (bf16).
        let ptrs = |p: [u64; 9]| p.map(Ptr);
        let mut args = ptrs([1, 0, 3, 4, 5, 6, 7, 8, 0]).to_vec();
        args.extend([I32(8192), I32(768)]);
        assert_eq!(
            kb("residual_layernorm_forward", &args),
            Some(14.0 * n * c + 8.0 * n + 4.0 * c)
        );
        // The recomputation (fp32 output, bias): x read, out written.
        let mut args = ptrs([1, 0, 3, 4, 5, 6, 7, 0, 0])[..7].to_vec();
        args.extend([I32(8192), I32(768)]);
        assert_eq!(
            kb("layernorm_recompute", &args),
            Some(8.0 * n * c + 8.0 * n + 8.0 * c)
        );
        // The LayerNorm backward, bf16 copy of dx written: dout (fp32: 4 bytes; bf16: 2) and
        // x read, dx read and written, dx_bf16 written; the one-pass kernel adds its parts.
        for (dout, dout_bf16, dout_bytes) in [(Ptr(3), Ptr(0), 4.0), (Ptr(0), Ptr(4), 2.0)] {
            let row = (12.0 + dout_bytes + 2.0) * n * c + 8.0 * n + 4.0 * c;
            let mut dx = vec![
                Ptr(1),
                Ptr(2),
                dout,
                dout_bf16,
                Ptr(5),
                Ptr(6),
                Ptr(7),
                Ptr(8),
            ];
            dx.extend([I32(8192), I32(768)]);
            assert_eq!(kb("layernorm_backward_dx", &dx), Some(row));
            let mut fused = dx.clone();
            fused.insert(2, Ptr(9));
            assert_eq!(
                kernel_bytes("layernorm_backward", (256, 1, 1), &fused),
                Some(row + 8.0 * c * 256.0)
            );
            let mut parts = vec![Ptr(9), dout, dout_bf16, Ptr(5), Ptr(7), Ptr(8)];
            parts.extend([I32(8192), I32(768), I32(64)]);
            assert_eq!(
                kb("layernorm_backward_parts", &parts),
                Some((4.0 + dout_bytes) * n * c + 8.0 * n + 8.0 * c * 128.0)
            );
        }
        // Gradient writers: dst read too only when they add (accumulate 1).
        for acc in [0, 1] {
            let more = 4.0 * acc as f64;
            assert_eq!(
                kb(
                    "reduce_parts_add",
                    &[Ptr(1), Ptr(2), I32(64), I32(768), I32(768), I32(acc)]
                ),
                Some(4.0 * 64.0 * 768.0 + 4.0 * 768.0 + more * 768.0)
            );
            assert_eq!(
                kb(
                    "embedding_backward_wpe",
                    &[Ptr(1), Ptr(2), I32(8), I32(1024), I32(768), I32(acc)]
                ),
                Some(4.0 * 8.0 * 1024.0 * 768.0 + (4.0 + more) * 1024.0 * 768.0)
            );
        }
        assert_eq!(
            kb("gelu_forward", &[Ptr(1), Ptr(2), I64(1000)]),
            Some(8000.0)
        );
        assert_eq!(
            kb("gelu_backward_inplace", &[Ptr(1), Ptr(2), I64(1000)]),
            Some(12000.0)
        );
        // fp32 input with the saved pre-activation: 4 + 2 + 2 bytes per value; recomputed
        // from the bf16 one: 2 + 2.
        assert_eq!(
            kb(
                "gelu_forward_bf16",
                &[Ptr(1), Ptr(2), Ptr(3), Ptr(0), I64(1000)]
            ),
            Some(8000.0)
        );
        assert_eq!(
            kb(
                "gelu_forward_bf16",
                &[Ptr(1), Ptr(0), Ptr(0), Ptr(3), I64(1000)]
            ),
            Some(4000.0)
        );
        assert_eq!(
            kb("gelu_backward_bf16", &[Ptr(1), Ptr(2), Ptr(3), I64(1000)]),
            Some(8000.0)
        );
        // 3 rows of 100 bf16 logits read and overwritten; targets (4 bytes) and the f64
        // losses.
        assert_eq!(
            kb(
                "cross_entropy_bf16",
                &[
                    Ptr(1),
                    Ptr(2),
                    Ptr(3),
                    I32(3),
                    I32(100),
                    I32(104),
                    F32(0.5),
                    I32(1)
                ]
            ),
            Some(4.0 * 300.0 + 12.0 + 24.0)
        );
        assert_eq!(
            kb("cast_bf16_to_f32", &[Ptr(1), Ptr(2), I64(10)]),
            Some(60.0)
        );
        assert_eq!(
            kb("cast_f32_to_bf16", &[Ptr(1), Ptr(2), I64(10)]),
            Some(60.0)
        );
        assert_eq!(
            kb(
                "dropout_apply",
                &[Ptr(1), Ptr(2), I64(10), U64(7), U32(9), F32(1.1)]
            ),
            Some(80.0)
        );
        // 4 rows of t = 3: each row reads (3+1)/2 = 2 scores on average, writes 3.
        assert_eq!(
            kb(
                "causal_softmax_forward",
                &[Ptr(1), I64(4), I32(3), F32(0.1)]
            ),
            Some(4.0 * 4.0 * 5.0)
        );
        assert_eq!(
            kb(
                "cross_entropy_forward_backward",
                &[
                    Ptr(1),
                    Ptr(0),
                    Ptr(2),
                    Ptr(3),
                    I32(2),
                    I32(5),
                    I32(8),
                    F32(0.5),
                    I32(1)
                ]
            ),
            Some(4.0 * 10.0 * 2.0 + 8.0 + 16.0)
        );
        // The gradient in bf16: 4 bytes read, 2 written per logit.
        assert_eq!(
            kb(
                "cross_entropy_forward_backward",
                &[
                    Ptr(1),
                    Ptr(9),
                    Ptr(2),
                    Ptr(3),
                    I32(2),
                    I32(5),
                    I32(8),
                    F32(0.5),
                    I32(1)
                ]
            ),
            Some(6.0 * 10.0 + 8.0 + 16.0)
        );
        assert_eq!(
            kernel_bytes("sumsq_parts", (1024, 1, 1), &[Ptr(1), Ptr(2), I64(100)]),
            Some(400.0 + 8.0 * 1024.0)
        );
        let adamw = |clip: f32, bf: u64, store_g: i32| {
            let mut a = vec![Ptr(1), Ptr(2), Ptr(3), Ptr(4), I64(10), Ptr(5), I32(2)];
            a.extend([F32(1.0), F32(clip)]);
            a.extend([F32(1.0); 5]);
            a.extend([Ptr(bf), I32(store_g)]);
            kb("adamw_update", &a)
        };
        assert_eq!(adamw(1.0, 0, 1), Some(280.0 + 32.0));
        assert_eq!(adamw(1.0, 9, 1), Some(300.0 + 32.0));
        assert_eq!(adamw(0.5, 0, 1), Some(320.0 + 32.0));
        // The clipped gradients not stored: no write of g.
        assert_eq!(adamw(0.5, 0, 0), Some(280.0 + 32.0));
        // 10 rows in parts of 4 rows: 3 parts.
        assert_eq!(
            kb("colsum_parts", &[Ptr(1), Ptr(2), I32(10), I32(6), I32(4)]),
            Some(4.0 * 60.0 + 4.0 * 6.0 * 3.0)
        );
        assert_eq!(kb("flash_attn_fwd_bf16", &[]), None);
        assert_eq!(kb("gelu_forward", &[Ptr(1)]), None, "missing argument");
    }
}
