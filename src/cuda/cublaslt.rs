//! cuBLASLt (`libcublasLt.so.*`): the bf16 matrix multiply with fp32 accumulation behind
//! every linear layer of the CUDA engine. cuBLASLt is column-major; [`CublasLt::matmul_tn`]
//! takes row-major operands the way the engine stores them.

use super::dl::{api, c_str};
use super::driver::{CuDevicePtr, CuStream, Stream};
use super::CudaError;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

type Status = c_int;
type Handle = *mut c_void;
type Desc = *mut c_void;

pub const CUDA_R_32F: c_int = 0;
pub const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;

/// `cublasLtMatmulHeuristicResult_t` (opaque to callers).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeuristicResult {
    algo: [u64; 8],
    workspace_size: usize,
    state: Status,
    waves_count: f32,
    reserved: [c_int; 4],
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

/// `D[m, n] = sum_k X[m, k] * W[n, k]` with row-major bf16 X (m x k) and W (n x k), fp32
/// accumulation, D stored row-major with element type `d_type` (fp32 or bf16): the
/// linear-layer forward `y = x W^T`. Descriptors and the chosen algorithm are kept so the
/// same product can be run repeatedly.
pub struct MatmulTn<'a> {
    lt: &'a CublasLt,
    handle: Handle,
    op: Desc,
    a: Desc,
    b: Desc,
    d: Desc,
    pref: Desc,
    algo: HeuristicResult,
    pub workspace_bytes: usize,
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

    /// Plans the product for these sizes (a CUDA context must be current).
    pub fn plan_tn(
        &self,
        m: usize,
        n: usize,
        k: usize,
        d_type: c_int,
        workspace_bytes: usize,
    ) -> Result<MatmulTn<'_>, CudaError> {
        let mut p = MatmulTn {
            lt: self,
            handle: std::ptr::null_mut(),
            op: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            pref: std::ptr::null_mut(),
            algo: HeuristicResult {
                algo: [0; 8],
                workspace_size: 0,
                state: 0,
                waves_count: 0.0,
                reserved: [0; 4],
            },
            workspace_bytes,
        };
        let api = &self.api;
        // SAFETY (all calls below): each writes one handle or reads the given buffer of
        // the stated size; handles are destroyed by MatmulTn's Drop.
        unsafe {
            self.check((api.cublasLtCreate)(&mut p.handle), "cublasLtCreate")?;
            self.check(
                (api.cublasLtMatmulDescCreate)(&mut p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                "cublasLtMatmulDescCreate",
            )?;
            // Column-major view: D^T (n x m) = op_T(W^T as k x n) * (X^T as k x m).
            let (ta, tb) = (CUBLAS_OP_T, CUBLAS_OP_N);
            self.check(
                (api.cublasLtMatmulDescSetAttribute)(
                    p.op,
                    DESC_TRANSA,
                    &ta as *const i32 as *const c_void,
                    4,
                ),
                "cublasLtMatmulDescSetAttribute(TRANSA)",
            )?;
            self.check(
                (api.cublasLtMatmulDescSetAttribute)(
                    p.op,
                    DESC_TRANSB,
                    &tb as *const i32 as *const c_void,
                    4,
                ),
                "cublasLtMatmulDescSetAttribute(TRANSB)",
            )?;
            let (m, n, k) = (m as u64, n as u64, k as u64);
            self.check(
                (api.cublasLtMatrixLayoutCreate)(&mut p.a, CUDA_R_16BF, k, n, k as i64),
                "cublasLtMatrixLayoutCreate(A)",
            )?;
            self.check(
                (api.cublasLtMatrixLayoutCreate)(&mut p.b, CUDA_R_16BF, k, m, k as i64),
                "cublasLtMatrixLayoutCreate(B)",
            )?;
            self.check(
                (api.cublasLtMatrixLayoutCreate)(&mut p.d, d_type, n, m, n as i64),
                "cublasLtMatrixLayoutCreate(D)",
            )?;
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
                    8,
                ),
                "cublasLtMatmulPreferenceSetAttribute",
            )?;
            let mut returned = 0;
            self.check(
                (api.cublasLtMatmulAlgoGetHeuristic)(
                    p.handle,
                    p.op,
                    p.a,
                    p.b,
                    p.d,
                    p.d,
                    p.pref,
                    1,
                    &mut p.algo,
                    &mut returned,
                ),
                "cublasLtMatmulAlgoGetHeuristic",
            )?;
            if returned < 1 || p.algo.state != 0 {
                return Err(CudaError::Invalid(format!(
                    "cuBLASLt has no algorithm for a bf16 {m}x{n}x{k} product on this GPU"
                )));
            }
        }
        Ok(p)
    }
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
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers cover the planned shapes (the caller allocated them).
        let s = unsafe {
            (self.lt.api.cublasLtMatmul)(
                self.handle,
                self.op,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                self.a,
                x as *const c_void,
                self.b,
                &beta as *const f32 as *const c_void,
                d as *const c_void,
                self.d,
                d as *mut c_void,
                self.d,
                self.algo.algo.as_ptr() as *const c_void,
                workspace as *mut c_void,
                self.workspace_bytes,
                stream.s,
            )
        };
        self.lt.check(s, "cublasLtMatmul")
    }
}

impl Drop for MatmulTn<'_> {
    fn drop(&mut self) {
        let api = &self.lt.api;
        // SAFETY: destroys the handles created in plan_tn (null ones skipped).
        unsafe {
            for l in [self.a, self.b, self.d] {
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
            if !self.handle.is_null() {
                (api.cublasLtDestroy)(self.handle);
            }
        }
    }
}
