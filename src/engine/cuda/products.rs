//! The linear-layer products of the CUDA engine: one entry point ([`CudaEngine::mm_ep`])
//! for every matrix product of the linear layers and the LM head, in fp32 (cuBLAS sgemm) or
//! bf16 (cuBLASLt on bf16 operands, fp32 accumulation), with what runs around it (bias,
//! GELU and its derivative, bias gradient: cuBLASLt epilogues or separate kernels), where
//! its operands come from ([`Src`]) and what its output is ([`Out`]); and the linear
//! layers built on it (`linear_fwd`, `linear_gelu_fwd`, `linear_bwd`).

use super::kernels::{grid_vec, Arg};
use super::{at, profile, Bf16State, Buf, CResult, CudaEngine, GradWrite, SLOT_ACT, SLOT_GRAD};
use crate::cuda::cublas::Operand;
use crate::cuda::cublaslt::{Cd, ElemType, Epilogue, EpilogueArgs, MatmulShape, Ran};
use std::cell::RefCell;

/// Where an operand of a linear-layer product comes from (see [`CudaEngine::mm`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Src {
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
/// rounded by a separate cast pass. The same two forms serve the gradient of a LayerNorm
/// output as the LayerNorm backward reads it (bf16 with the `bf16_dln` switch).
#[derive(Clone, Copy, Debug)]
pub(super) enum LnOut {
    F32(u64),
    Bf16(u64),
}

impl LnOut {
    /// The kernels' `out, out_bf16` arguments (the unused one null).
    pub(super) fn args(self) -> [Arg; 2] {
        match self {
            LnOut::F32(p) => [Arg::Ptr(p), Arg::Ptr(0)],
            LnOut::Bf16(p) => [Arg::Ptr(0), Arg::Ptr(p)],
        }
    }
    /// The output as a product operand.
    pub(super) fn src(self) -> Src {
        match self {
            LnOut::F32(p) => Src::Act(p),
            LnOut::Bf16(p) => Src::Bf16(p),
        }
    }
}

/// A linear-layer product operand: source, used transposed or not, row stride.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lin {
    pub(super) src: Src,
    pub(super) trans: bool,
    pub(super) ld: usize,
}

impl Lin {
    pub(super) fn n(src: Src, ld: usize) -> Lin {
        Lin {
            src,
            trans: false,
            ld,
        }
    }
    pub(super) fn t(src: Src, ld: usize) -> Lin {
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
pub(super) enum Post {
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
    /// `dW += X^T dY`; `db =` with `write` [`GradWrite::Overwrite`]. `tmp` holds
    /// `PARTS * n` fp32 values.
    BiasGrad { db: u64, tmp: u64, write: GradWrite },
}

/// The output C of a linear-layer product ([`CudaEngine::mm_ep`]): fp32, or, in the bf16
/// mode, bf16 (cuBLASLt writes it rounded; unfused, the fp32 values go through scratch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Out {
    F32(u64),
    Bf16(u64),
    /// fp32 `out = product (+ bias) + residual`, the residual (fp32, same shape) left as it
    /// was: on cuBLASLt one call (`D = A B + bias + C`, C the residual, D apart from it).
    /// Where the product cannot add it, `out` gets the product (+ bias) only and
    /// [`CudaEngine::mm_ep`] says so, leaving the add to the caller (which folds it into
    /// the LayerNorm that follows rather than spend a pass on it).
    F32Residual {
        out: u64,
        residual: u64,
    },
}

/// A bias vector (0 = none): the fp32 parameter, and its bf16 copy for a fused epilogue
/// on a product with a bf16 C (0 in fp32 mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BiasPtrs {
    pub(super) f32: u64,
    pub(super) bf16: u64,
}

/// The cuBLASLt epilogue of `post` on a product with `n` columns (None: nothing to fuse).
/// The bias gradient is the sum over k of the row-major B (`dY` in `dW = X^T dY`), which
/// cuBLASLt sees as its A: `BGRADA`. cuBLASLt writes it (never accumulates), so it goes to
/// `tmp` and is then added to the fp32 gradient, which accumulates over micro-steps.
/// `bf16_out`: C is bf16 (the GELU's bias is then the bf16 copy).
pub(super) fn epilogue_args(post: Post, n: usize, bf16_out: bool) -> Option<EpilogueArgs> {
    let (ep, bias, aux) = match post {
        Post::None => return None,
        Post::Bias(b) => (Epilogue::Bias, if bf16_out { b.bf16 } else { b.f32 }, 0),
        Post::Gelu { bias, pre } => {
            let b = if bf16_out { bias.bf16 } else { bias.f32 };
            (Epilogue::GeluAux { bias: b != 0 }, b, pre)
        }
        Post::DGelu { pre } => (Epilogue::DGelu, 0, pre),
        // cuBLASLt overwrites its bias-gradient output: straight into db when that is what
        // the pass wants, else into tmp, added to db after.
        Post::BiasGrad { db, tmp, write } => {
            let out = match write {
                GradWrite::Overwrite => db,
                GradWrite::Add => tmp,
            };
            (Epilogue::BiasGradB, out, 0)
        }
    };
    Some(EpilogueArgs {
        ep,
        bias,
        aux,
        aux_ld: if aux != 0 { n } else { 0 },
    })
}

impl CudaEngine {
    pub(super) fn cast_bf16(&self, out: u64, inp: u64, n: usize) -> CResult<()> {
        self.run(
            self.k.cast_f32_to_bf16,
            grid_vec(n),
            &[Arg::Ptr(out), Arg::Ptr(inp), Arg::I64(n as i64)],
        )
    }

    /// bf16 scratch `slot` with room for `elems` values, grown (after the stream has
    /// finished with the old buffer) when too small.
    pub(super) fn scratch(&self, bf: &Bf16State, slot: usize, elems: usize) -> CResult<u64> {
        self.grown(&bf.scratch[slot], 2 * elems)
    }

    /// The buffer in `cell`, replaced (after the stream has finished with the old one) by
    /// a larger one when it holds fewer than `bytes`.
    pub(super) fn grown(&self, cell: &RefCell<Option<Buf>>, bytes: usize) -> CResult<u64> {
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
    pub(super) fn wide_out(&self, elems: usize) -> CResult<u64> {
        let bf = self
            .bf
            .as_ref()
            .expect("bf16 outputs exist only in the bf16 mode");
        self.grown(&bf.wide_out, 4 * elems)
    }

    /// The fp32 tensor at `ptr` (`elems` values) as a product operand; the bf16 mode rounds
    /// it once into the gradient scratch, for use by several products.
    pub(super) fn rounded(&self, ptr: u64, elems: usize) -> CResult<Src> {
        let Some(bf) = &self.bf else {
            return Ok(Src::Act(ptr));
        };
        let q = self.scratch(bf, SLOT_GRAD, elems)?;
        self.cast_bf16(q, ptr, elems)?;
        Ok(Src::Rounded(ptr, q))
    }

    /// The bf16 address of operand `o`, stored `rows x cols` with row stride `o.ld`.
    pub(super) fn bf16_operand(
        &self,
        bf: &Bf16State,
        o: Lin,
        (rows, cols): (usize, usize),
    ) -> CResult<u64> {
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
    pub(super) fn fp32_operand(
        &self,
        o: Lin,
        (rows, cols): (usize, usize),
        slot: usize,
    ) -> CResult<Lin> {
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
    pub(super) fn fusing(&self) -> bool {
        self.bf.is_some() && self.switches().epilogues
    }

    /// The products with a fused epilogue planned so far, each ending in "fused" or
    /// `"unfused: <why>"` (then computed by separate kernels); empty in fp32 mode or with
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
    pub(super) fn mm(
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
        self.mm_ep(m, n, k, a, b, beta, Out::F32(c), ldc, Post::None)?;
        Ok(())
    }

    /// [`CudaEngine::mm`] into `c` (fp32, or in the bf16 mode bf16: beta 0, contiguous),
    /// followed by `post`. With [`CudaEngine::fusing`] the product and `post` are one
    /// cuBLASLt call (an epilogue), so the output is written once and not read back, and a
    /// bf16 C is always written by the product itself; otherwise, or when cuBLASLt cannot
    /// run that epilogue or output on this shape, the separate kernels run around the
    /// product (the same bf16 operands, rounded once; a bf16 C gets its values through
    /// fp32 scratch).
    ///
    /// Returns whether the residual of an [`Out::F32Residual`] was added (always false
    /// for the other outputs): when not, `out` holds the product and bias only.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mm_ep(
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
    ) -> CResult<bool> {
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
        let (c_ptr, c_bf16, residual) = match c {
            Out::F32(p) => (p, false, None),
            Out::Bf16(p) => (p, true, None),
            Out::F32Residual { out, residual } => {
                assert!(
                    beta == 0.0 && ldc == n && matches!(post, Post::None | Post::Bias(_)),
                    "a residual output: overwritten, contiguous, at most a bias epilogue"
                );
                (out, false, Some(residual))
            }
        };
        assert!(
            !c_bf16
                || (self.bf.is_some()
                    && beta == 0.0
                    && (ldc == n || post == Post::None)
                    && !matches!(post, Post::BiasGrad { .. })),
            "a bf16 C: bf16 mode, overwritten, contiguous with an epilogue, no bias gradient"
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
            if args.is_some() || (post == Post::None && (c_bf16 || residual.is_some())) {
                let shape = MatmulShape {
                    c: if c_bf16 {
                        ElemType::Bf16
                    } else {
                        ElemType::F32
                    },
                    ..shape
                };
                // A residual is the product's C (beta 1), D the output apart from it.
                let (beta, cd) = match residual {
                    Some(r) => (1.0, Cd { c: r, d: c_ptr }),
                    None => (beta, Cd::in_place(c_ptr)),
                };
                // SAFETY: pa, pb and c cover the shape (as in the plain product below), the
                // residual too (the caller's m x n buffer, not overlapping the output); the
                // bias is the layer's bias of C's type (n values) or `tmp` (at least n fp32
                // values), the GELU input an m x n activation of C's type, row stride n.
                let ran = unsafe { self.lt_product(bf, shape, (pa, pb), beta, cd, args)? };
                if ran == Ran::Lt {
                    if let Post::BiasGrad {
                        db,
                        tmp,
                        write: GradWrite::Add,
                    } = post
                    {
                        self.add(db, tmp, n)?;
                    }
                    return Ok(residual.is_some());
                }
            }
        }
        // Unfused: the separate kernels around the product, which writes fp32 (a bf16 C
        // gets its values from an fp32 scratch).
        // (A residual output is computed as an fp32 one, the residual left to the caller.)
        let (out, beta) = match (post, c) {
            (Post::Bias(bias), Out::F32(c) | Out::F32Residual { out: c, .. }) => {
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
            // (Rows ldc apart: the columns past n go through the cast unused.)
            (_, Out::Bf16(_)) => (self.wide_out(m * ldc)?, 0.0),
            (_, Out::F32(c) | Out::F32Residual { out: c, .. }) => (c, beta),
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
                let ran =
                    unsafe { self.lt_product(bf, shape, (pa, pb), beta, Cd::in_place(out), None)? };
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
        // The epilogue's work as separate kernels.
        let epilogue = match (post, c) {
            (Post::None | Post::Bias(_), Out::Bf16(c)) => self.cast_bf16(c, out, m * ldc),
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
            (Post::BiasGrad { db, tmp, write }, _) => {
                let wb = self.fp32_operand(b, sb, 1)?;
                self.colsum_add(db, fp32(wb).ptr, k, n, tmp, write)
            }
            (Post::None | Post::Bias(_), Out::F32(_) | Out::F32Residual { .. }) => Ok(()),
            (Post::Gelu { .. } | Post::DGelu { .. }, Out::F32Residual { .. }) => {
                unreachable!("a residual output takes at most a bias (asserted above)")
            }
        };
        epilogue.map(|()| false)
    }

    /// One cuBLASLt product `D = op(a) op(b) + beta C` (`cd`) on the bf16 operands `ab`,
    /// with the epilogue `args` when given, timed by the profiler when one runs.
    ///
    /// # Safety
    /// As [`MatmulCache::matmul_ep`] (with `args`) or [`MatmulCache::matmul`]: the operands
    /// and C cover `shape`; the workspace is the bf16 state's, of LT_WORKSPACE bytes.
    ///
    /// [`MatmulCache::matmul_ep`]: crate::cuda::cublaslt::MatmulCache::matmul_ep
    /// [`MatmulCache::matmul`]: crate::cuda::cublaslt::MatmulCache::matmul
    pub(super) unsafe fn lt_product(
        &self,
        bf: &Bf16State,
        shape: MatmulShape,
        (a, b): (u64, u64),
        beta: f32,
        cd: Cd,
        args: Option<EpilogueArgs>,
    ) -> CResult<Ran> {
        let ws = bf.workspace.ptr;
        // The calls below are the caller's contract (this function's Safety section).
        profile::lt(&self.profiler, &self.stream, &shape, beta, || match args {
            Some(args) => bf
                .lt
                .matmul_ep(shape, 1.0, a, b, beta, cd, ws, &self.stream, args),
            None => bf.lt.matmul(shape, 1.0, a, b, beta, cd, ws, &self.stream),
        })
    }

    /// out (rows, oc) = inp (rows, ic) @ W [ic, oc] + b. Fused: the bias is the product's
    /// epilogue, and without a bias the product simply overwrites `out`. Returns whether
    /// the residual of an [`Out::F32Residual`] was added (as [`CudaEngine::mm_ep`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_fwd(
        &self,
        out: Out,
        inp: Src,
        w: usize,
        b: Option<usize>,
        ic: usize,
        oc: usize,
        rows: usize,
    ) -> CResult<bool> {
        let (x, wl) = (Lin::n(inp, ic), Lin::n(Src::Param(w), oc));
        let post = b.map_or(Post::None, |_| Post::Bias(self.bias_ptrs(b)));
        match (post, out) {
            (Post::None, Out::F32(out)) if self.fusing() => {
                self.mm(rows, oc, ic, x, wl, 0.0, out, oc)?;
                Ok(false)
            }
            (Post::None, Out::F32(out)) => {
                self.bias_broadcast(out, 0, rows, oc)?;
                self.mm(rows, oc, ic, x, wl, 1.0, out, oc)?;
                Ok(false)
            }
            _ => self.mm_ep(rows, oc, ic, x, wl, 0.0, out, oc, post),
        }
    }

    /// The bias at `b` (None: no bias) as an epilogue takes it: fp32, and its bf16 copy in
    /// the bf16 mode.
    pub(super) fn bias_ptrs(&self, b: Option<usize>) -> BiasPtrs {
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
    pub(super) fn linear_gelu_fwd(
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
        )?;
        Ok(())
    }

    /// dW += inp^T dout; db += column sums of dout (`=` for both with `write`
    /// [`GradWrite::Overwrite`]); dinp = dout W^T (overwritten), or with
    /// `dgelu` a [`Post::DGelu`] (the layer's input was gelu(pre)) dinp = (dout W^T) *
    /// gelu'(pre), the gradient of the pre-activation. Fused: the bias gradient is the
    /// `BGRADA` epilogue of the dW product (written to `scratch`, then added to the
    /// gradient; or written over the gradient) and the GELU derivative the `DGELU` epilogue of the dinp product.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_bwd(
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
        write: GradWrite,
    ) -> CResult<()> {
        let d = match dout {
            Src::Act(p) => self.rounded(p, rows * oc)?,
            other => other,
        };
        let bias_grad = b.map_or(Post::None, |bo| Post::BiasGrad {
            db: self.g(bo),
            tmp: scratch,
            write,
        });
        self.mm_ep(
            ic,
            oc,
            rows,
            Lin::t(inp, ic),
            Lin::n(d, oc),
            write.beta(),
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
        )?;
        Ok(())
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
        // written to the scratch vector, never straight into the accumulating gradient,
        // unless the pass writes the gradients rather than adding to them.
        let bg = |write| {
            epilogue_args(
                Post::BiasGrad {
                    db: 0x3000,
                    tmp: 0x4000,
                    write,
                },
                64,
                false,
            )
            .unwrap()
        };
        let (add, over) = (bg(GradWrite::Add), bg(GradWrite::Overwrite));
        assert_eq!(
            (add.ep, add.bias, add.aux),
            (Epilogue::BiasGradB, 0x4000, 0)
        );
        assert_eq!((over.ep, over.bias), (Epilogue::BiasGradB, 0x3000));
        assert_eq!(add.ep.lt_value(), crate::cuda::cublaslt::EPILOGUE_BGRADA);
    }
}
