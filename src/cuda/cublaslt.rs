//! cuBLASLt (`libcublasLt.so.*`): the bf16 matrix products with fp32 accumulation behind the
//! CUDA engine's bf16 mode and the GEMM check of `nanogpt doctor`.
//!
//! cuBLASLt is column-major; [`MatmulShape`] describes a product on row-major operands (the
//! way the engine stores them) and [`col_major`] turns it into the column-major problem
//! cuBLASLt solves: row-major `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so the
//! operands swap places, `m` and `n` exchange, and each leading dimension is the row stride.
//! A [`Matmul`] is one planned product (operation and layout descriptors plus the algorithm
//! the heuristic chose); [`MatmulCache`] owns a handle and keeps one plan per shape.
//!
//! Constants are the values of the enums in `cublasLt.h`, `cublas_api.h` and
//! `library_types.h` (CUDA 11 to 13; none of them changed in that range).

use super::dl::{api, c_str};
use super::driver::{CuDevicePtr, CuStream, Stream};
use super::CudaError;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

type Status = c_int;
type Handle = *mut c_void;
type Desc = *mut c_void;

/// `cudaDataType_t` (library_types.h): `CUDA_R_32F = 0`.
pub const CUDA_R_32F: c_int = 0;
/// `cudaDataType_t` (library_types.h): `CUDA_R_16BF = 14`.
pub const CUDA_R_16BF: c_int = 14;
/// `cublasComputeType_t` (cublas_api.h): `CUBLAS_COMPUTE_32F = 68` (fp32 accumulation, no
/// TF32 or reduced-precision shortcuts).
const CUBLAS_COMPUTE_32F: c_int = 68;
/// `cublasOperation_t` (cublas_api.h).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
/// `cublasLtMatmulDescAttributes_t`: `CUBLASLT_MATMUL_DESC_TRANSA = 3`, `TRANSB = 4`
/// (values of type `int32_t`, a `cublasOperation_t`).
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
/// `cublasLtMatmulPreferenceAttributes_t`: `CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1`
/// (`uint64_t`), `MIN_ALIGNMENT_A_BYTES = 5`, `B = 6`, `C = 7`, `D = 8` (`uint32_t`).
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;
const PREF_MIN_ALIGNMENT_A_BYTES: c_int = 5;
const PREF_MIN_ALIGNMENT_B_BYTES: c_int = 6;
const PREF_MIN_ALIGNMENT_C_BYTES: c_int = 7;
const PREF_MIN_ALIGNMENT_D_BYTES: c_int = 8;
/// `cublasLtMatmulDescAttributes_t` (cublasLt.h) of the fused epilogues:
/// `CUBLASLT_MATMUL_DESC_EPILOGUE = 7` (`uint32_t`, a `cublasLtEpilogue_t`),
/// `_BIAS_POINTER = 8` (bias, or bias-gradient output; its value also tells the heuristic
/// the vector's alignment), `_EPILOGUE_AUX_POINTER = 11` (GELU input: written by
/// `GELU_AUX*`, read by `DGELU*`), `_EPILOGUE_AUX_LD = 12` (`int64_t`, in elements, at least
/// the rows of the column-major D and divisible by 8 for GELU), `_EPILOGUE_AUX_DATA_TYPE =
/// 22` and `_BIAS_DATA_TYPE = 26` (`int32_t` `cudaDataType`, default -1: the type of D). The
/// engine leaves both data types at their default, which is what it needs (fp32 bias and
/// GELU input with an fp32 D); the header warns that setting them for a combination that
/// does not support it makes `cublasLtMatmul` fail.
pub const DESC_EPILOGUE: c_int = 7;
pub const DESC_BIAS_POINTER: c_int = 8;
pub const DESC_EPILOGUE_AUX_POINTER: c_int = 11;
pub const DESC_EPILOGUE_AUX_LD: c_int = 12;
pub const DESC_EPILOGUE_AUX_DATA_TYPE: c_int = 22;
pub const DESC_BIAS_DATA_TYPE: c_int = 26;
/// `cublasLtEpilogue_t` (cublasLt.h): `DEFAULT = 1`, `BIAS = 4`, `GELU = 32`,
/// `GELU_AUX = GELU | 128`, `GELU_AUX_BIAS = GELU_AUX | BIAS`, `DGELU = 64 | 128`,
/// `BGRADA = 256` (bias gradient: sums of the column-major A over k, one per row of D),
/// `BGRADB = 512` (sums of B over k, one per column of D).
pub const EPILOGUE_DEFAULT: u32 = 1;
pub const EPILOGUE_BIAS: u32 = 4;
pub const EPILOGUE_GELU_AUX: u32 = 32 | 128;
pub const EPILOGUE_GELU_AUX_BIAS: u32 = 32 | 128 | 4;
pub const EPILOGUE_DGELU: u32 = 64 | 128;
pub const EPILOGUE_BGRADA: u32 = 256;
pub const EPILOGUE_BGRADB: u32 = 512;
/// `cublasStatus_t` (cublas_api.h): `CUBLAS_STATUS_INVALID_VALUE = 7`, what
/// `cublasLtMatmul` answers for an epilogue configuration it cannot run.
const CUBLAS_STATUS_INVALID_VALUE: Status = 7;
/// `cublasStatus_t` (cublas_api.h): `CUBLAS_STATUS_NOT_SUPPORTED = 15`, what the heuristic
/// may answer when it has no algorithm for a configuration.
const CUBLAS_STATUS_NOT_SUPPORTED: Status = 15;

/// `cublasLtMatmulHeuristicResult_t`: `cublasLtMatmulAlgo_t algo` (`uint64_t data[8]`),
/// `size_t workspaceSize`, `cublasStatus_t state`, `float wavesCount`, `int reserved[4]`
/// (96 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeuristicResult {
    algo: [u64; 8],
    workspace_size: usize,
    state: Status,
    waves_count: f32,
    reserved: [c_int; 4],
}

impl HeuristicResult {
    fn zeroed() -> HeuristicResult {
        HeuristicResult {
            algo: [0; 8],
            workspace_size: 0,
            state: 0,
            waves_count: 0.0,
            reserved: [0; 4],
        }
    }
}

api! {
    /// Entry points of `libcublasLt.so.*`.
    pub struct CublasLtApi {
        fn cublasLtGetVersion() -> usize;
        fn cublasLtGetStatusName(s: Status) -> *const c_char;
        fn cublasLtCreate(h: *mut Handle) -> Status;
        fn cublasLtDestroy(h: Handle) -> Status;
        fn cublasLtMatmulDescCreate(d: *mut Desc, compute: c_int, scale: c_int) -> Status;
        fn cublasLtMatmulDescDestroy(d: Desc) -> Status;
        fn cublasLtMatmulDescSetAttribute(d: Desc, attr: c_int, buf: *const c_void, size: usize) -> Status;
        fn cublasLtMatrixLayoutCreate(l: *mut Desc, ty: c_int, rows: u64, cols: u64, ld: i64) -> Status;
        fn cublasLtMatrixLayoutDestroy(l: Desc) -> Status;
        fn cublasLtMatmulPreferenceCreate(p: *mut Desc) -> Status;
        fn cublasLtMatmulPreferenceDestroy(p: Desc) -> Status;
        fn cublasLtMatmulPreferenceSetAttribute(p: Desc, attr: c_int, buf: *const c_void, size: usize) -> Status;
        fn cublasLtMatmulAlgoGetHeuristic(
            h: Handle, op: Desc, a: Desc, b: Desc, c: Desc, d: Desc, pref: Desc,
            requested: c_int, results: *mut HeuristicResult, returned: *mut c_int,
        ) -> Status;
        fn cublasLtMatmul(
            h: Handle, op: Desc, alpha: *const c_void,
            a: *const c_void, a_desc: Desc,
            b: *const c_void, b_desc: Desc,
            beta: *const c_void,
            c: *const c_void, c_desc: Desc,
            d: *mut c_void, d_desc: Desc,
            algo: *const c_void, workspace: *mut c_void, workspace_bytes: usize, stream: CuStream,
        ) -> Status;
    }
}

pub struct CublasLt {
    pub api: CublasLtApi,
}

/// Element type of a matrix in a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    Bf16,
}

impl ElemType {
    /// The `cudaDataType_t` value.
    pub fn cuda(self) -> c_int {
        match self {
            ElemType::F32 => CUDA_R_32F,
            ElemType::Bf16 => CUDA_R_16BF,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::Bf16 => 2,
        }
    }
    fn from_cuda(t: c_int) -> Result<ElemType, CudaError> {
        match t {
            CUDA_R_32F => Ok(ElemType::F32),
            CUDA_R_16BF => Ok(ElemType::Bf16),
            _ => Err(CudaError::Invalid(format!(
                "cuBLASLt output type {t} is neither CUDA_R_32F (0) nor CUDA_R_16BF (14)"
            ))),
        }
    }
}

/// The largest power of two (at most 256) dividing a device address: what the heuristic is
/// told about an operand's alignment (it assumes 256 bytes unless told otherwise).
pub fn alignment(ptr: CuDevicePtr) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

/// Where a product reads C (when beta is not 0) and writes D: one buffer (in place), or D
/// apart from C (`D = alpha op(A) op(B) + beta C` with C left as it was: a residual added
/// by the product). Both have the shape's C layout; apart, they must not overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cd {
    pub c: CuDevicePtr,
    pub d: CuDevicePtr,
}

impl Cd {
    /// C and D the same buffer.
    pub fn in_place(p: CuDevicePtr) -> Cd {
        Cd { c: p, d: p }
    }

    /// The alignment both pointers have (what the plan may assume of C and D).
    fn alignment(&self) -> u32 {
        alignment(self.c).min(alignment(self.d))
    }
}

/// A product on row-major operands: `C (m x n) = alpha op(A) op(B) + beta C`, with `op(A)`
/// `m x k` (stored `k x m` when `trans_a`), `op(B)` `k x n` (stored `n x k` when `trans_b`),
/// leading dimensions the row strides as stored, `A` and `B` of type `ab`, `C` of type `c`,
/// accumulation in fp32. The alignments (bytes, from [`alignment`]) are part of the shape:
/// a plan chosen for 256-byte-aligned operands may not run on less aligned ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub ab: ElemType,
    pub c: ElemType,
    /// Alignment of A, B and C (= D) in bytes.
    pub align: [u32; 3],
}

/// One matrix as cuBLASLt sees it: column-major `rows x cols` with leading dimension `ld`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColLayout {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
}

/// The column-major problem of a [`MatmulShape`]: cuBLASLt's A is the row-major B and its B
/// the row-major A (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColMajor {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: ColLayout,
    pub b: ColLayout,
    pub c: ColLayout,
}

impl MatmulShape {
    /// (rows, cols) of A, B and C as stored row-major.
    pub fn stored(&self) -> [(usize, usize); 3] {
        let a = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [a, b, (self.m, self.n)]
    }

    /// Elements an operand spans in memory (rows, cols, ld as stored): `(rows - 1) ld + cols`.
    pub fn extent(rows: usize, cols: usize, ld: usize) -> usize {
        if rows == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        }
    }
}

/// The column-major problem for `s`, after checking its sizes and strides.
pub fn col_major(s: &MatmulShape) -> Result<ColMajor, CudaError> {
    if s.m == 0 || s.n == 0 || s.k == 0 {
        return Err(CudaError::Invalid(format!(
            "empty product {}x{}x{} (every dimension must be at least 1)",
            s.m, s.n, s.k
        )));
    }
    let [a, b, c] = s.stored();
    for (name, (_, cols), ld) in [("A", a, s.lda), ("B", b, s.ldb), ("C", c, s.ldc)] {
        if ld < cols {
            return Err(CudaError::Invalid(format!(
                "matrix {name} of a {}x{}x{} product has {cols} columns but row stride {ld}",
                s.m, s.n, s.k
            )));
        }
    }
    // A row-major (rows x cols, ld) matrix is the column-major (cols x rows, ld) matrix of
    // its transpose.
    let view = |(rows, cols): (usize, usize), ld: usize| ColLayout {
        rows: cols as u64,
        cols: rows as u64,
        ld: ld as i64,
    };
    Ok(ColMajor {
        trans_a: s.trans_b,
        trans_b: s.trans_a,
        a: view(b, s.ldb),
        b: view(a, s.lda),
        c: view(c, s.ldc),
    })
}

/// A fused epilogue, described on the row-major product of a [`MatmulShape`]
/// (`C (m x n) = op(A) op(B) + beta C`). Bias vectors, bias gradients and the GELU input
/// have the type of C (cuBLASLt's default for an fp32 D). GELU is the tanh form
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, the one GPT-2 and this crate use:
/// cublasLt.h does not spell the formula out; PyTorch relies on it being the tanh form
/// (`torch._addmm_activation(use_gelu=True)` on CUDA is `gelu(approximate="tanh")`), and
/// the GPU test `cublaslt_gelu_epilogue_is_the_tanh_form` checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `C = op(A) op(B) + beta C + bias`, `bias[j]` added to column `j` (length `n`).
    Bias,
    /// `aux = op(A) op(B) + beta C (+ bias)`, `C = gelu(aux)`: the GELU input is kept for
    /// the backward pass (`aux` is `m x n` with row stride `aux_ld`).
    GeluAux { bias: bool },
    /// `C = (op(A) op(B)) * gelu'(aux)`, `aux` the GELU input [`Epilogue::GeluAux`] saved.
    DGelu,
    /// `C = op(A) op(B) + beta C` and `bias[j] = sum over p of op(B)[p, j]` (length `n`,
    /// overwritten, never accumulated): the bias gradient of a linear layer's weight-
    /// gradient product `dW = X^T dY`, whose B is `dY`.
    BiasGradB,
    /// `C = op(A) op(B) + beta C` and `bias[i] = sum over p of op(A)[i, p]` (length `m`,
    /// overwritten).
    BiasGradA,
}

impl Epilogue {
    /// The `cublasLtEpilogue_t` value. cuBLASLt's A is the row-major B (see [`col_major`]),
    /// so the bias gradient of the row-major B is `BGRADA` and that of A is `BGRADB`.
    pub fn lt_value(self) -> u32 {
        match self {
            Epilogue::Bias => EPILOGUE_BIAS,
            Epilogue::GeluAux { bias: false } => EPILOGUE_GELU_AUX,
            Epilogue::GeluAux { bias: true } => EPILOGUE_GELU_AUX_BIAS,
            Epilogue::DGelu => EPILOGUE_DGELU,
            Epilogue::BiasGradB => EPILOGUE_BGRADA,
            Epilogue::BiasGradA => EPILOGUE_BGRADB,
        }
    }
    /// Whether `BIAS_POINTER` is used (bias input or bias-gradient output).
    pub fn uses_bias(self) -> bool {
        !matches!(self, Epilogue::DGelu | Epilogue::GeluAux { bias: false })
    }
    /// Whether the GELU input matrix (`EPILOGUE_AUX_POINTER`, `_AUX_LD`) is used.
    pub fn uses_aux(self) -> bool {
        matches!(self, Epilogue::GeluAux { .. } | Epilogue::DGelu)
    }
}

/// An epilogue with the pointers of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpilogueArgs {
    pub ep: Epilogue,
    /// The bias, or where the bias gradient goes; 0 when the epilogue uses none.
    pub bias: CuDevicePtr,
    /// The GELU input (`m x n`, row stride `aux_ld`); 0 when unused.
    pub aux: CuDevicePtr,
    pub aux_ld: usize,
}

/// The plan key of a product with an epilogue: the shape (alignments of A, B, C filled
/// in), the epilogue, the GELU input's stride and the alignments of the bias and GELU
/// input pointers (the heuristic chooses by them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EpilogueKey {
    pub shape: MatmulShape,
    pub ep: Epilogue,
    pub aux_ld: usize,
    pub align: [u32; 2],
}

/// Whether cuBLASLt's documented limits allow `args` on `s` (`Ok`), or why not (a limit,
/// so the caller computes the product another way). Missing pointers are the caller's
/// mistake: [`CudaError::Invalid`].
pub fn epilogue_fits(
    s: &MatmulShape,
    args: &EpilogueArgs,
) -> Result<Result<(), String>, CudaError> {
    let ep = args.ep;
    if ep.uses_bias() && args.bias == 0 {
        return Err(CudaError::Invalid(format!(
            "epilogue {ep:?} needs a bias pointer"
        )));
    }
    if ep.uses_aux() && args.aux == 0 {
        return Err(CudaError::Invalid(format!(
            "epilogue {ep:?} needs the GELU input pointer"
        )));
    }
    if ep.uses_aux() {
        // The column-major D has n rows; cublasLt.h: the GELU input's leading dimension is
        // at least that and divisible by 8.
        if args.aux_ld < s.n || !args.aux_ld.is_multiple_of(8) {
            return Ok(Err(format!(
                "the GELU input's row stride {} must be at least {} and a multiple of 8",
                args.aux_ld, s.n
            )));
        }
    }
    Ok(Ok(()))
}

/// One planned product: descriptors and the algorithm the heuristic chose for a shape.
pub struct Matmul<'a> {
    lt: &'a CublasLt,
    pub shape: MatmulShape,
    op: Desc,
    a: Desc,
    b: Desc,
    c: Desc,
    pref: Desc,
    algo: HeuristicResult,
    workspace_bytes: usize,
}

impl CublasLt {
    pub fn load(path: &Path) -> Result<CublasLt, CudaError> {
        Ok(CublasLt {
            api: CublasLtApi::load(path)?,
        })
    }

    /// The library version, e.g. 130100 for 13.1.0.
    pub fn version(&self) -> usize {
        // SAFETY: no preconditions.
        unsafe { (self.api.cublasLtGetVersion)() }
    }

    fn check(&self, s: Status, call: &'static str) -> Result<(), CudaError> {
        if s == 0 {
            return Ok(());
        }
        // SAFETY: returns a static string.
        let name = c_str(unsafe { (self.api.cublasLtGetStatusName)(s) });
        Err(CudaError::Cublas {
            call,
            code: s,
            name,
        })
    }

    /// A new handle (a CUDA context must be current); the caller destroys it.
    fn create_handle(&self) -> Result<Handle, CudaError> {
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: writes one handle.
        self.check(
            unsafe { (self.api.cublasLtCreate)(&mut h) },
            "cublasLtCreate",
        )?;
        Ok(h)
    }

    /// Plans `shape` on `handle` for a workspace of `workspace_bytes`. Fails with
    /// [`CudaError::Invalid`] naming the shape when the heuristic has no algorithm for it.
    fn plan(
        &self,
        handle: *mut c_void,
        shape: MatmulShape,
        workspace_bytes: usize,
    ) -> Result<Matmul<'_>, CudaError> {
        self.plan_ep(handle, shape, workspace_bytes, None)
    }

    /// [`CublasLt::plan`] with a fused epilogue (its pointers set before the heuristic,
    /// which reads their alignment). An epilogue attribute this cuBLASLt refuses is
    /// [`CudaError::Invalid`], like a missing algorithm.
    fn plan_ep(
        &self,
        handle: *mut c_void,
        shape: MatmulShape,
        workspace_bytes: usize,
        ep: Option<&EpilogueArgs>,
    ) -> Result<Matmul<'_>, CudaError> {
        let cm = col_major(&shape)?;
        let mut p = Matmul {
            lt: self,
            shape,
            op: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            pref: std::ptr::null_mut(),
            algo: HeuristicResult::zeroed(),
            workspace_bytes,
        };
        let api = &self.api;
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (ta, tb) = (op(cm.trans_a), op(cm.trans_b));
        // SAFETY (all calls below): each writes one handle or reads the given buffer of the
        // stated size; the handles are destroyed by Matmul's Drop, also on early return.
        unsafe {
            self.check(
                (api.cublasLtMatmulDescCreate)(&mut p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                "cublasLtMatmulDescCreate",
            )?;
            for (attr, v, call) in [
                (DESC_TRANSA, &ta, "cublasLtMatmulDescSetAttribute(TRANSA)"),
                (DESC_TRANSB, &tb, "cublasLtMatmulDescSetAttribute(TRANSB)"),
            ] {
                self.check(
                    (api.cublasLtMatmulDescSetAttribute)(
                        p.op,
                        attr,
                        v as *const i32 as *const c_void,
                        std::mem::size_of::<i32>(),
                    ),
                    call,
                )?;
            }
            if let Some(args) = ep {
                let v = args.ep.lt_value();
                let s = (api.cublasLtMatmulDescSetAttribute)(
                    p.op,
                    DESC_EPILOGUE,
                    &v as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                );
                if s != 0 {
                    return Err(CudaError::Invalid(format!(
                        "cuBLASLt refuses epilogue {:?} (status {s})",
                        args.ep
                    )));
                }
                p.set_epilogue_pointers(args)?;
                if args.ep.uses_aux() {
                    let ld = args.aux_ld as i64;
                    let s = (api.cublasLtMatmulDescSetAttribute)(
                        p.op,
                        DESC_EPILOGUE_AUX_LD,
                        &ld as *const i64 as *const c_void,
                        std::mem::size_of::<i64>(),
                    );
                    if s != 0 {
                        return Err(CudaError::Invalid(format!(
                            "cuBLASLt refuses GELU input stride {ld} (status {s})"
                        )));
                    }
                }
            }
            for (slot, l, ty, call) in [
                (&mut p.a, cm.a, shape.ab, "cublasLtMatrixLayoutCreate(A)"),
                (&mut p.b, cm.b, shape.ab, "cublasLtMatrixLayoutCreate(B)"),
                (&mut p.c, cm.c, shape.c, "cublasLtMatrixLayoutCreate(C)"),
            ] {
                self.check(
                    (api.cublasLtMatrixLayoutCreate)(slot, ty.cuda(), l.rows, l.cols, l.ld),
                    call,
                )?;
            }
            self.check(
                (api.cublasLtMatmulPreferenceCreate)(&mut p.pref),
                "cublasLtMatmulPreferenceCreate",
            )?;
            let ws = workspace_bytes as u64;
            self.check(
                (api.cublasLtMatmulPreferenceSetAttribute)(
                    p.pref,
                    PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                ),
                "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)",
            )?;
            // cuBLASLt's A is the row-major B (see col_major); C and D are the same matrix.
            let [al_a, al_b, al_c] = shape.align;
            for (attr, v) in [
                (PREF_MIN_ALIGNMENT_A_BYTES, al_b),
                (PREF_MIN_ALIGNMENT_B_BYTES, al_a),
                (PREF_MIN_ALIGNMENT_C_BYTES, al_c),
                (PREF_MIN_ALIGNMENT_D_BYTES, al_c),
            ] {
                self.check(
                    (api.cublasLtMatmulPreferenceSetAttribute)(
                        p.pref,
                        attr,
                        &v as *const u32 as *const c_void,
                        std::mem::size_of::<u32>(),
                    ),
                    "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)",
                )?;
            }
            let mut returned = 0;
            let status = (api.cublasLtMatmulAlgoGetHeuristic)(
                handle,
                p.op,
                p.a,
                p.b,
                p.c,
                p.c,
                p.pref,
                1,
                &mut p.algo,
                &mut returned,
            );
            if status != CUBLAS_STATUS_NOT_SUPPORTED {
                self.check(status, "cublasLtMatmulAlgoGetHeuristic")?;
            }
            if status == CUBLAS_STATUS_NOT_SUPPORTED || returned < 1 || p.algo.state != 0 {
                return Err(CudaError::Invalid(format!(
                    "cuBLASLt has no algorithm for {}",
                    describe(&shape)
                )));
            }
        }
        Ok(p)
    }

    /// Plans `D[m, n] = X[m, k] W[n, k]^T` (row-major bf16 X and W, D of type `d_type`,
    /// `CUDA_R_32F` or `CUDA_R_16BF`) on a handle of its own: the linear-layer forward that
    /// `nanogpt doctor` checks and times.
    pub fn plan_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        d_type: c_int,
        workspace_bytes: usize,
    ) -> Result<MatmulTn<'_>, CudaError> {
        let shape = MatmulShape {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            lda: k,
            ldb: k,
            ldc: n,
            ab: ElemType::Bf16,
            c: ElemType::from_cuda(d_type)?,
            align: [256; 3],
        };
        let handle = self.create_handle()?;
        let plan = match self.plan(handle, shape, workspace_bytes) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: destroys the handle created above, once.
                unsafe { (self.api.cublasLtDestroy)(handle) };
                return Err(e);
            }
        };
        Ok(MatmulTn {
            lt: self,
            plan: Some(plan),
            handle,
            workspace_bytes,
        })
    }
}

/// A shape in words, for error messages.
pub fn describe(s: &MatmulShape) -> String {
    format!(
        "a {:?} {}x{}x{} product (A{} ld {}, B{} ld {}, C {:?} ld {}, alignments {:?} bytes)",
        s.ab,
        s.m,
        s.n,
        s.k,
        if s.trans_a { "^T" } else { "" },
        s.lda,
        if s.trans_b { "^T" } else { "" },
        s.ldb,
        s.c,
        s.ldc,
        s.align
    )
}

impl Matmul<'_> {
    /// Points the operation descriptor's epilogue at this call's bias and GELU input (the
    /// descriptor is read when the product is enqueued). A refusal is
    /// [`CudaError::Invalid`].
    fn set_epilogue_pointers(&self, args: &EpilogueArgs) -> Result<(), CudaError> {
        let api = &self.lt.api;
        let mut attrs = Vec::with_capacity(2);
        if args.ep.uses_bias() {
            attrs.push((DESC_BIAS_POINTER, args.bias, "bias"));
        }
        if args.ep.uses_aux() {
            attrs.push((DESC_EPILOGUE_AUX_POINTER, args.aux, "GELU input"));
        }
        for (attr, ptr, what) in attrs {
            // SAFETY: reads one pointer-sized value; the descriptor is live (owned by self).
            let s = unsafe {
                (api.cublasLtMatmulDescSetAttribute)(
                    self.op,
                    attr,
                    &ptr as *const CuDevicePtr as *const c_void,
                    std::mem::size_of::<CuDevicePtr>(),
                )
            };
            if s != 0 {
                return Err(CudaError::Invalid(format!(
                    "cuBLASLt refuses the {what} pointer of epilogue {:?} (status {s})",
                    args.ep
                )));
            }
        }
        Ok(())
    }

    /// Enqueues `c = alpha op(a) op(b) + beta c` on `stream` (row-major, as planned).
    ///
    /// # Safety
    /// `a`, `b`, C and D (`cd`) must cover the planned shape (see [`MatmulShape::extent`])
    /// with at least the planned alignments, `workspace` must hold the planned workspace
    /// bytes, and `handle` must be a live handle of the current context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        handle: *mut c_void,
        alpha: f32,
        a: CuDevicePtr,
        b: CuDevicePtr,
        beta: f32,
        cd: Cd,
        workspace: CuDevicePtr,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        // cuBLASLt's A is the row-major B (see col_major); C and D share one layout.
        let s = (self.lt.api.cublasLtMatmul)(
            handle,
            self.op,
            &alpha as *const f32 as *const c_void,
            b as *const c_void,
            self.a,
            a as *const c_void,
            self.b,
            &beta as *const f32 as *const c_void,
            cd.c as *const c_void,
            self.c,
            cd.d as *mut c_void,
            self.c,
            self.algo.algo.as_ptr() as *const c_void,
            workspace as *mut c_void,
            self.workspace_bytes,
            stream.s,
        );
        self.lt.check(s, "cublasLtMatmul")
    }
}

impl Drop for Matmul<'_> {
    fn drop(&mut self) {
        let api = &self.lt.api;
        // SAFETY: destroys the descriptors created in `plan` (null ones skipped), once.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    (api.cublasLtMatrixLayoutDestroy)(l);
                }
            }
            if !self.pref.is_null() {
                (api.cublasLtMatmulPreferenceDestroy)(self.pref);
            }
            if !self.op.is_null() {
                (api.cublasLtMatmulDescDestroy)(self.op);
            }
        }
    }
}

/// The doctor's product `D = X W^T` with its own handle (see [`CublasLt::plan_tn`]).
pub struct MatmulTn<'a> {
    lt: &'a CublasLt,
    plan: Option<Matmul<'a>>,
    handle: Handle,
    pub workspace_bytes: usize,
}

impl MatmulTn<'_> {
    /// Enqueues `d = x w^T` on `stream`.
    pub fn run(
        &self,
        x: CuDevicePtr,
        w: CuDevicePtr,
        d: CuDevicePtr,
        workspace: CuDevicePtr,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        let plan = self
            .plan
            .as_ref()
            .expect("a MatmulTn holds its plan until dropped");
        // SAFETY: the caller allocated x, w, d and the workspace for the planned shape.
        unsafe {
            plan.run(
                self.handle,
                1.0,
                x,
                w,
                0.0,
                Cd::in_place(d),
                workspace,
                stream,
            )
        }
    }
}

impl Drop for MatmulTn<'_> {
    fn drop(&mut self) {
        self.plan = None;
        // SAFETY: destroys the handle created in plan_tn, once, after its plan.
        unsafe { (self.lt.api.cublasLtDestroy)(self.handle) };
    }
}

/// What [`MatmulCache::matmul`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// The product ran on cuBLASLt.
    Lt,
    /// cuBLASLt has no algorithm for this shape (remembered; the caller computes it another
    /// way). Nothing was enqueued.
    Unsupported,
}

/// A cuBLASLt handle and one plan per [`MatmulShape`], planned on first use. A CUDA context
/// must be current when it is created and whenever it is used.
pub struct MatmulCache<'a> {
    lt: &'a CublasLt,
    handle: Handle,
    workspace_bytes: usize,
    plans: RefCell<HashMap<MatmulShape, Option<Matmul<'a>>>>,
    /// Plans with a fused epilogue (`Err`: why cuBLASLt cannot run it).
    ep_plans: RefCell<HashMap<EpilogueKey, Result<Matmul<'a>, String>>>,
}

impl<'a> MatmulCache<'a> {
    /// A new handle with an empty cache; products may use up to `workspace_bytes` of the
    /// workspace passed to [`MatmulCache::matmul`].
    pub fn new(lt: &'a CublasLt, workspace_bytes: usize) -> Result<MatmulCache<'a>, CudaError> {
        Ok(MatmulCache {
            lt,
            handle: lt.create_handle()?,
            workspace_bytes,
            plans: RefCell::new(HashMap::new()),
            ep_plans: RefCell::new(HashMap::new()),
        })
    }

    /// [`MatmulCache::matmul`] with the fused epilogue `args`: enqueues the product and
    /// its epilogue, planning it on first use. Returns [`Ran::Unsupported`] without
    /// enqueuing anything when cuBLASLt cannot run this epilogue on this shape (no
    /// algorithm, an attribute it refuses, a documented limit such as the GELU input's
    /// stride, or the heuristic or `cublasLtMatmul` answering `NOT_SUPPORTED`/`INVALID_VALUE`, after
    /// which the key is not tried again); the caller then computes it unfused.
    ///
    /// # Safety
    /// As [`MatmulCache::matmul`]; besides, the bias (length `n` for `Bias`, `GeluAux` and
    /// `BiasGradB`, `m` for `BiasGradA`, of C's type) and the GELU input (`m` rows of row
    /// stride `aux_ld`, C's type) must be allocated where the epilogue uses them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_ep(
        &self,
        mut shape: MatmulShape,
        alpha: f32,
        a: CuDevicePtr,
        b: CuDevicePtr,
        beta: f32,
        cd: Cd,
        workspace: CuDevicePtr,
        stream: &Stream,
        args: EpilogueArgs,
    ) -> Result<Ran, CudaError> {
        shape.align = [alignment(a), alignment(b), cd.alignment()];
        col_major(&shape)?;
        let fits = epilogue_fits(&shape, &args)?;
        let key = EpilogueKey {
            shape,
            ep: args.ep,
            aux_ld: if args.ep.uses_aux() { args.aux_ld } else { 0 },
            align: [
                if args.ep.uses_bias() {
                    alignment(args.bias)
                } else {
                    0
                },
                if args.ep.uses_aux() {
                    alignment(args.aux)
                } else {
                    0
                },
            ],
        };
        let mut plans = self.ep_plans.borrow_mut();
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(match fits {
                Err(why) => Err(why),
                Ok(()) => {
                    match self
                        .lt
                        .plan_ep(self.handle, shape, self.workspace_bytes, Some(&args))
                    {
                        Ok(p) => Ok(p),
                        Err(CudaError::Invalid(why)) => Err(why),
                        Err(CudaError::Cublas { call, code, name })
                            if code == CUBLAS_STATUS_NOT_SUPPORTED
                                || code == CUBLAS_STATUS_INVALID_VALUE =>
                        {
                            Err(format!("{call} answered {name} ({code})"))
                        }
                        Err(e) => return Err(e),
                    }
                }
            }),
        };
        let Ok(p) = plan else {
            return Ok(Ran::Unsupported);
        };
        let r = p
            .set_epilogue_pointers(&args)
            .and_then(|_| p.run(self.handle, alpha, a, b, beta, cd, workspace, stream));
        match r {
            Ok(()) => Ok(Ran::Lt),
            Err(CudaError::Invalid(why)) => {
                *plan = Err(why);
                Ok(Ran::Unsupported)
            }
            Err(CudaError::Cublas { code, name, .. })
                if code == CUBLAS_STATUS_NOT_SUPPORTED || code == CUBLAS_STATUS_INVALID_VALUE =>
            {
                *plan = Err(format!("cublasLtMatmul answered {name} ({code})"));
                Ok(Ran::Unsupported)
            }
            Err(e) => Err(e),
        }
    }

    /// Every product with an epilogue planned so far, in words, each ending in
    /// `"fused"` or `"unfused: <why>"`, sorted.
    pub fn epilogue_report(&self) -> Vec<String> {
        let plans = self.ep_plans.borrow();
        let mut v: Vec<String> = plans
            .iter()
            .map(|(k, p)| {
                let what = match p {
                    Ok(_) => "fused".to_string(),
                    Err(why) => format!("unfused: {why}"),
                };
                format!("{:?} on {}: {what}", k.ep, describe(&k.shape))
            })
            .collect();
        v.sort();
        v
    }

    /// (products with an epilogue cuBLASLt runs, those it cannot).
    pub fn epilogue_counts(&self) -> (usize, usize) {
        let plans = self.ep_plans.borrow();
        let ok = plans.values().filter(|p| p.is_ok()).count();
        (ok, plans.len() - ok)
    }

    /// Enqueues `D = alpha op(a) op(b) + beta C` on `stream` for the row-major product
    /// `shape` (C and D: `cd`; its `align` is filled in from the pointers), planning it on
    /// first use.
    /// Returns [`Ran::Unsupported`] without enqueuing anything when cuBLASLt has no
    /// algorithm for the shape.
    ///
    /// # Safety
    /// `a`, `b`, C and D must cover the shape (see [`MatmulShape::extent`]), C and D either
    /// the same buffer or not overlapping, and `workspace` must hold the cache's workspace
    /// bytes, all in the current context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        mut shape: MatmulShape,
        alpha: f32,
        a: CuDevicePtr,
        b: CuDevicePtr,
        beta: f32,
        cd: Cd,
        workspace: CuDevicePtr,
        stream: &Stream,
    ) -> Result<Ran, CudaError> {
        shape.align = [alignment(a), alignment(b), cd.alignment()];
        // Shape errors are the caller's; after this check `plan`'s Invalid means "no
        // algorithm".
        col_major(&shape)?;
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(
                match self.lt.plan(self.handle, shape, self.workspace_bytes) {
                    Ok(p) => Some(p),
                    Err(CudaError::Invalid(_)) => None,
                    Err(e) => return Err(e),
                },
            ),
        };
        match plan {
            Some(p) => {
                p.run(self.handle, alpha, a, b, beta, cd, workspace, stream)?;
                Ok(Ran::Lt)
            }
            None => Ok(Ran::Unsupported),
        }
    }

    /// (planned shapes, shapes cuBLASLt has no algorithm for).
    pub fn counts(&self) -> (usize, usize) {
        let plans = self.plans.borrow();
        let bad = plans.values().filter(|p| p.is_none()).count();
        (plans.len() - bad, bad)
    }

    /// The shapes cuBLASLt has no algorithm for, in words.
    pub fn unsupported(&self) -> Vec<String> {
        let plans = self.plans.borrow();
        let mut v: Vec<String> = plans
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(s, _)| describe(s))
            .collect();
        v.sort();
        v
    }
}

impl Drop for MatmulCache<'_> {
    fn drop(&mut self) {
        self.plans.get_mut().clear();
        self.ep_plans.get_mut().clear();
        if !self.handle.is_null() {
            // SAFETY: destroys the handle created in `new`, once, after every plan.
            unsafe { (self.lt.api.cublasLtDestroy)(self.handle) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(m: usize, n: usize, k: usize, ta: bool, tb: bool, pad: usize) -> MatmulShape {
        let ac = if ta { m } else { k };
        let bc = if tb { k } else { n };
        MatmulShape {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            lda: ac + pad,
            ldb: bc + pad,
            ldc: n + pad,
            ab: ElemType::Bf16,
            c: ElemType::F32,
            align: [256; 3],
        }
    }

    /// Column-major `C = alpha op(A) op(B) + beta C` exactly as cuBLASLt defines it, over
    /// flat buffers and the layouts of a [`ColMajor`].
    fn col_major_gemm(cm: &ColMajor, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
        let el = |buf: &[f64], l: &ColLayout, trans: bool, i: u64, j: u64| {
            let (r, col) = if trans { (j, i) } else { (i, j) };
            assert!(r < l.rows && col < l.cols, "index outside the layout");
            buf[(col as i64 * l.ld + r as i64) as usize]
        };
        let (m, k) = if cm.trans_a {
            (cm.a.cols, cm.a.rows)
        } else {
            (cm.a.rows, cm.a.cols)
        };
        let n = if cm.trans_b { cm.b.rows } else { cm.b.cols };
        let kb = if cm.trans_b { cm.b.cols } else { cm.b.rows };
        assert_eq!(k, kb, "inner dimensions agree");
        assert_eq!((cm.c.rows, cm.c.cols), (m, n), "C is m x n");
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += el(a, &cm.a, cm.trans_a, i, p) * el(b, &cm.b, cm.trans_b, p, j);
                }
                let idx = (j as i64 * cm.c.ld + i as i64) as usize;
                c[idx] = acc + beta * c[idx];
            }
        }
    }

    #[test]
    fn column_major_problem_computes_the_row_major_product() {
        let mut rng = crate::rng::Rng::new(5);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for pad in [0, 3] {
                let (m, n, k) = (5, 7, 4);
                let s = shape(m, n, k, ta, tb, pad);
                let [(ar, _), (br, _), _] = s.stored();
                let a: Vec<f64> = (0..ar * s.lda).map(|_| rng.normal()).collect();
                let b: Vec<f64> = (0..br * s.ldb).map(|_| rng.normal()).collect();
                let c0: Vec<f64> = (0..m * s.ldc).map(|_| rng.normal()).collect();
                // Row-major reference: C = op(A) op(B) + 0.5 C.
                let ea = |i: usize, p: usize| {
                    if ta {
                        a[p * s.lda + i]
                    } else {
                        a[i * s.lda + p]
                    }
                };
                let eb = |p: usize, j: usize| {
                    if tb {
                        b[j * s.ldb + p]
                    } else {
                        b[p * s.ldb + j]
                    }
                };
                let mut want = c0.clone();
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|p| ea(i, p) * eb(p, j)).sum();
                        want[i * s.ldc + j] = dot + 0.5 * c0[i * s.ldc + j];
                    }
                }
                let cm = col_major(&s).unwrap();
                let mut got = c0.clone();
                // cuBLASLt's A is the row-major B and its B the row-major A.
                col_major_gemm(&cm, &b, &a, 0.5, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-12,
                        "ta {ta} tb {tb} pad {pad}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn doctor_product_keeps_its_layouts() {
        // D = X W^T with X (m x k), W (n x k): W as k x n transposed, X as k x m, D as n x m.
        let s = MatmulShape {
            trans_a: false,
            trans_b: true,
            lda: 64,
            ldb: 64,
            ldc: 32,
            ..shape(16, 32, 64, false, true, 0)
        };
        let cm = col_major(&s).unwrap();
        assert!(cm.trans_a && !cm.trans_b);
        assert_eq!(
            cm.a,
            ColLayout {
                rows: 64,
                cols: 32,
                ld: 64
            }
        );
        assert_eq!(
            cm.b,
            ColLayout {
                rows: 64,
                cols: 16,
                ld: 64
            }
        );
        assert_eq!(
            cm.c,
            ColLayout {
                rows: 32,
                cols: 16,
                ld: 32
            }
        );
    }

    #[test]
    fn bad_shapes_are_refused_with_the_matrix_named() {
        let mut s = shape(4, 4, 4, false, false, 0);
        s.ldb = 3;
        let e = col_major(&s).unwrap_err().to_string();
        assert!(e.contains("matrix B") && e.contains("row stride 3"), "{e}");
        let e = col_major(&shape(0, 4, 4, false, false, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty product"), "{e}");
        assert_eq!(MatmulShape::extent(3, 5, 8), 21);
        assert_eq!(MatmulShape::extent(0, 5, 8), 0);
    }

    /// `NAME = expr` enumerators of `cublasLt.h`, with `expr` an integer, an earlier name,
    /// or `|` of those (in parentheses or not): every form the epilogue enum uses.
    fn header_enums(text: &str) -> HashMap<String, i64> {
        let mut vals: HashMap<String, i64> = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if !line.starts_with("CUBLAS") {
                continue;
            }
            let Some((name, rest)) = line.split_once('=') else {
                continue;
            };
            let expr = rest.trim().trim_end_matches(',').replace(['(', ')'], " ");
            let mut v = 0i64;
            let mut ok = true;
            for tok in expr.split('|').map(str::trim) {
                match tok.parse::<i64>() {
                    Ok(x) => v |= x,
                    Err(_) => match vals.get(tok) {
                        Some(&x) => v |= x,
                        None => ok = false,
                    },
                }
            }
            if ok {
                vals.insert(name.trim().to_string(), v);
            }
        }
        vals
    }

    /// `cublasLt.h` next to the cuBLASLt library this machine would load (a PyTorch or
    /// pip install keeps `include/` beside `lib/`), else under `$CUDA_HOME` or
    /// `/usr/local/cuda`.
    fn find_header() -> Option<std::path::PathBuf> {
        use crate::cuda::discover::{LibKind, SearchEnv, SearchPlan};
        let mut dirs = Vec::new();
        let plan = SearchPlan::new(&SearchEnv::from_process());
        if let Some(f) = plan.find(LibKind::CublasLt).found {
            if let Some(lib) = f.path.parent() {
                dirs.push(lib.join("../include"));
            }
        }
        if let Some(h) = std::env::var_os("CUDA_HOME") {
            dirs.push(std::path::PathBuf::from(h).join("include"));
        }
        dirs.push("/usr/local/cuda/include".into());
        dirs.into_iter()
            .map(|d| d.join("cublasLt.h"))
            .find(|p| p.is_file())
    }

    #[test]
    fn epilogue_constants_match_the_header() {
        let want: [(&str, i64); 14] = [
            ("CUBLASLT_MATMUL_DESC_TRANSA", DESC_TRANSA as i64),
            ("CUBLASLT_MATMUL_DESC_TRANSB", DESC_TRANSB as i64),
            ("CUBLASLT_MATMUL_DESC_EPILOGUE", DESC_EPILOGUE as i64),
            (
                "CUBLASLT_MATMUL_DESC_BIAS_POINTER",
                DESC_BIAS_POINTER as i64,
            ),
            (
                "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER",
                DESC_EPILOGUE_AUX_POINTER as i64,
            ),
            (
                "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD",
                DESC_EPILOGUE_AUX_LD as i64,
            ),
            (
                "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE",
                DESC_EPILOGUE_AUX_DATA_TYPE as i64,
            ),
            (
                "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE",
                DESC_BIAS_DATA_TYPE as i64,
            ),
            ("CUBLASLT_EPILOGUE_DEFAULT", EPILOGUE_DEFAULT as i64),
            ("CUBLASLT_EPILOGUE_BIAS", EPILOGUE_BIAS as i64),
            ("CUBLASLT_EPILOGUE_GELU_AUX", EPILOGUE_GELU_AUX as i64),
            (
                "CUBLASLT_EPILOGUE_GELU_AUX_BIAS",
                EPILOGUE_GELU_AUX_BIAS as i64,
            ),
            ("CUBLASLT_EPILOGUE_DGELU", EPILOGUE_DGELU as i64),
            ("CUBLASLT_EPILOGUE_BGRADA", EPILOGUE_BGRADA as i64),
        ];
        // The values as written in this file (checked against cublasLt.h of CUDA 13.0).
        assert_eq!(
            (
                EPILOGUE_DEFAULT,
                EPILOGUE_BIAS,
                EPILOGUE_GELU_AUX,
                EPILOGUE_GELU_AUX_BIAS
            ),
            (1, 4, 160, 164)
        );
        assert_eq!(
            (EPILOGUE_DGELU, EPILOGUE_BGRADA, EPILOGUE_BGRADB),
            (192, 256, 512)
        );
        assert_eq!(
            (DESC_EPILOGUE, DESC_BIAS_POINTER, DESC_EPILOGUE_AUX_POINTER),
            (7, 8, 11)
        );
        assert_eq!(
            (
                DESC_EPILOGUE_AUX_LD,
                DESC_EPILOGUE_AUX_DATA_TYPE,
                DESC_BIAS_DATA_TYPE
            ),
            (12, 22, 26)
        );
        let Some(path) = find_header() else {
            eprintln!("skipped: cublasLt.h not found, constants not compared with it");
            return;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let vals = header_enums(&text);
        for (name, v) in want.into_iter().chain([("CUBLASLT_EPILOGUE_BGRADB", 512)]) {
            assert_eq!(vals.get(name), Some(&v), "{name} in {}", path.display());
        }
        eprintln!("epilogue constants match {}", path.display());
    }

    #[test]
    fn epilogue_values_follow_the_operand_swap() {
        assert_eq!(Epilogue::Bias.lt_value(), EPILOGUE_BIAS);
        assert_eq!(Epilogue::GeluAux { bias: true }.lt_value(), 164);
        assert_eq!(Epilogue::GeluAux { bias: false }.lt_value(), 160);
        assert_eq!(Epilogue::DGelu.lt_value(), 192);
        // The row-major B is cuBLASLt's A.
        assert_eq!(Epilogue::BiasGradB.lt_value(), EPILOGUE_BGRADA);
        assert_eq!(Epilogue::BiasGradA.lt_value(), EPILOGUE_BGRADB);
        assert!(Epilogue::Bias.uses_bias() && !Epilogue::Bias.uses_aux());
        assert!(!Epilogue::DGelu.uses_bias() && Epilogue::DGelu.uses_aux());
        assert!(!Epilogue::GeluAux { bias: false }.uses_bias());
        assert!(Epilogue::GeluAux { bias: true }.uses_bias());
        assert!(Epilogue::BiasGradB.uses_bias() && !Epilogue::BiasGradB.uses_aux());
    }

    /// What cublasLt.h says the epilogues compute, on the column-major problem of a
    /// row-major shape: the bias has one value per row of D, BGRADA sums A over k (one
    /// value per row of D), BGRADB sums B over k (one per column of D). On the row-major
    /// product that is: bias over columns, BGRADA = column sums of the row-major B (the
    /// bias gradient of `dW = X^T dY`), BGRADB = row sums of op(A).
    #[test]
    fn column_major_epilogue_vectors_are_the_row_major_ones() {
        let mut rng = crate::rng::Rng::new(9);
        // dW (ic x oc) = X^T (ic x rows) dY (rows x oc): m = ic, n = oc, k = rows.
        let (ic, oc, rows) = (5, 7, 6);
        let s = MatmulShape {
            lda: ic,
            ldb: oc,
            ldc: oc,
            ..shape(ic, oc, rows, true, false, 0)
        };
        let x: Vec<f64> = (0..rows * ic).map(|_| rng.normal()).collect();
        let dy: Vec<f64> = (0..rows * oc).map(|_| rng.normal()).collect();
        let cm = col_major(&s).unwrap();
        let el = |buf: &[f64], l: &ColLayout, trans: bool, i: u64, j: u64| {
            let (r, c) = if trans { (j, i) } else { (i, j) };
            buf[(c as i64 * l.ld + r as i64) as usize]
        };
        // D is cm.c.rows x cm.c.cols; op(A) is rows(D) x k, op(B) is k x cols(D).
        let k = if cm.trans_a { cm.a.rows } else { cm.a.cols };
        assert_eq!(k as usize, rows);
        assert_eq!(
            cm.c.rows as usize, oc,
            "the bias vector is as long as D has rows"
        );
        for i in 0..cm.c.rows {
            let bgrada: f64 = (0..k).map(|p| el(&dy, &cm.a, cm.trans_a, i, p)).sum();
            let col_sum: f64 = (0..rows).map(|r| dy[r * oc + i as usize]).sum();
            assert!((bgrada - col_sum).abs() < 1e-12, "column {i}");
        }
        for j in 0..cm.c.cols {
            let bgradb: f64 = (0..k).map(|p| el(&x, &cm.b, cm.trans_b, p, j)).sum();
            let row_sum: f64 = (0..rows).map(|r| x[r * ic + j as usize]).sum();
            assert!((bgradb - row_sum).abs() < 1e-12, "row {j} of op(A)");
        }
    }

    #[test]
    fn epilogue_limits_are_checked_before_planning() {
        let s = shape(16, 24, 8, false, false, 0);
        let args = |ep, bias, aux, aux_ld| EpilogueArgs {
            ep,
            bias,
            aux,
            aux_ld,
        };
        let fits = |a: EpilogueArgs| epilogue_fits(&s, &a);
        assert_eq!(fits(args(Epilogue::Bias, 0x100, 0, 0)).unwrap(), Ok(()));
        assert!(fits(args(Epilogue::Bias, 0, 0, 0)).is_err(), "missing bias");
        assert!(
            fits(args(Epilogue::DGelu, 0, 0, 24)).is_err(),
            "missing aux"
        );
        let g = Epilogue::GeluAux { bias: false };
        assert_eq!(fits(args(g, 0, 0x100, 24)).unwrap(), Ok(()));
        assert_eq!(fits(args(g, 0, 0x100, 32)).unwrap(), Ok(()));
        let e = fits(args(g, 0, 0x100, 20)).unwrap().unwrap_err();
        assert!(e.contains("at least 24"), "{e}");
        assert!(
            fits(args(g, 0, 0x100, 28)).unwrap().is_err(),
            "not a multiple of 8"
        );
    }

    #[test]
    fn constants_and_alignment() {
        assert_eq!(std::mem::size_of::<HeuristicResult>(), 96);
        assert_eq!((CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F), (0, 14, 68));
        assert_eq!(
            (DESC_TRANSA, DESC_TRANSB, PREF_MAX_WORKSPACE_BYTES),
            (3, 4, 1)
        );
        assert_eq!(ElemType::Bf16.cuda(), 14);
        assert_eq!(ElemType::from_cuda(0).unwrap(), ElemType::F32);
        assert!(ElemType::from_cuda(2).is_err());
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100 + 96), 32);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0604), 4);
    }
}
