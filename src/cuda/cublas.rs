//! cuBLAS (`libcublas.so.*`): the version check of `nanogpt doctor` and the fp32 GEMMs
//! ([`Sgemm`]) of the CUDA engine's float32 path, on row-major operands.

use super::dl::api;
use super::CudaError;
use std::ffi::c_int;
use std::path::Path;

api! {
    /// Entry points of `libcublas.so.*`.
    pub struct CublasApi {
        fn cublasGetProperty(kind: c_int, value: *mut c_int) -> c_int;
    }
}

/// The library's (major, minor, patch).
pub fn version(path: &Path) -> Result<(CublasApi, (i32, i32, i32)), CudaError> {
    let api = CublasApi::load(path)?;
    let mut v = [0; 3];
    for (kind, slot) in v.iter_mut().enumerate() {
        // SAFETY: writes one int; kinds 0..3 are MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL.
        let s = unsafe { (api.cublasGetProperty)(kind as c_int, slot) };
        if s != 0 {
            return Err(CudaError::Cublas {
                call: "cublasGetProperty",
                code: s,
                name: format!("status {s}"),
            });
        }
    }
    Ok((api, (v[0], v[1], v[2])))
}

type Handle = *mut std::ffi::c_void;
const CUBLAS_OP_N: c_int = 0;
const CUBLAS_OP_T: c_int = 1;
/// `CUBLAS_DEFAULT_MATH`: fp32 products stay fp32 (no TF32 tensor cores).
const CUBLAS_DEFAULT_MATH: c_int = 0;

api! {
    /// The fp32 GEMM entry points of `libcublas.so.*` used by the CUDA engine.
    pub struct CublasGemmApi {
        fn cublasGetStatusName(s: c_int) -> *const std::ffi::c_char;
        fn cublasCreate_v2(h: *mut Handle) -> c_int;
        fn cublasDestroy_v2(h: Handle) -> c_int;
        fn cublasSetStream_v2(h: Handle, s: crate::cuda::driver::CuStream) -> c_int;
        fn cublasSetMathMode(h: Handle, mode: c_int) -> c_int;
        fn cublasSgemm_v2(
            h: Handle, ta: c_int, tb: c_int, m: c_int, n: c_int, k: c_int,
            alpha: *const f32, a: *const f32, lda: c_int,
            b: *const f32, ldb: c_int,
            beta: *const f32, c: *mut f32, ldc: c_int,
        ) -> c_int;
        fn cublasSgemmStridedBatched(
            h: Handle, ta: c_int, tb: c_int, m: c_int, n: c_int, k: c_int,
            alpha: *const f32, a: *const f32, lda: c_int, stride_a: i64,
            b: *const f32, ldb: c_int, stride_b: i64,
            beta: *const f32, c: *mut f32, ldc: c_int, stride_c: i64,
            batch: c_int,
        ) -> c_int;
    }
}

/// One operand of a row-major product: device address, whether it is used transposed, and
/// its row stride (elements between consecutive rows as stored).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub trans: bool,
    pub ld: usize,
    /// Elements between consecutive matrices of a batch (0 when not batched).
    pub stride: usize,
}

impl Operand {
    pub fn n(ptr: u64, ld: usize) -> Operand {
        Operand {
            ptr,
            trans: false,
            ld,
            stride: 0,
        }
    }
    pub fn t(ptr: u64, ld: usize) -> Operand {
        Operand {
            ptr,
            trans: true,
            ld,
            stride: 0,
        }
    }
    pub fn batched(mut self, stride: usize) -> Operand {
        self.stride = stride;
        self
    }
}

/// A cuBLAS handle bound to one stream, for fp32 GEMMs on row-major matrices.
///
/// cuBLAS is column-major; a row-major matrix is the column-major view of its transpose, so
/// row-major `C = op(A) op(B)` is computed as column-major `C^T = op(B)^T op(A)^T`: the
/// operands are swapped and `m`/`n` exchanged, leading dimensions are the row strides.
pub struct Sgemm {
    pub api: CublasGemmApi,
    handle: Handle,
}

fn to_int(v: usize, what: &str) -> Result<c_int, CudaError> {
    c_int::try_from(v).map_err(|_| {
        CudaError::Invalid(format!(
            "GEMM {what} = {v} does not fit cuBLAS's 32-bit int"
        ))
    })
}

impl Sgemm {
    /// Loads the GEMM entry points from `path` and creates a handle on `stream` (the
    /// device's context must be current).
    pub fn new(path: &Path, stream: &crate::cuda::driver::Stream) -> Result<Sgemm, CudaError> {
        let api = CublasGemmApi::load(path)?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: writes one handle.
        let s = unsafe { (api.cublasCreate_v2)(&mut handle) };
        let g = Sgemm { api, handle };
        g.check(s, "cublasCreate")?;
        // SAFETY: live handle and stream.
        let s = unsafe { (g.api.cublasSetStream_v2)(g.handle, stream.s) };
        g.check(s, "cublasSetStream")?;
        let s = unsafe { (g.api.cublasSetMathMode)(g.handle, CUBLAS_DEFAULT_MATH) };
        g.check(s, "cublasSetMathMode")?;
        Ok(g)
    }

    /// Makes the handle enqueue its work on `stream` from now on.
    pub fn set_stream(&self, stream: &crate::cuda::driver::Stream) -> Result<(), CudaError> {
        // SAFETY: live handle and stream.
        let s = unsafe { (self.api.cublasSetStream_v2)(self.handle, stream.s) };
        self.check(s, "cublasSetStream")
    }

    fn check(&self, s: c_int, call: &'static str) -> Result<(), CudaError> {
        if s == 0 {
            return Ok(());
        }
        // SAFETY: returns a static string.
        let name = super::dl::c_str(unsafe { (self.api.cublasGetStatusName)(s) });
        Err(CudaError::Cublas {
            call,
            code: s,
            name,
        })
    }

    /// Row-major `C (m x n) = alpha op(A) (m x k) op(B) (k x n) + beta C`, `batch` times with
    /// the operands' strides (`batch == 1`: a single product).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        batch: usize,
    ) -> Result<(), CudaError> {
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (mi, ni, ki) = (to_int(m, "m")?, to_int(n, "n")?, to_int(k, "k")?);
        let (lda, ldb, ldc) = (
            to_int(a.ld, "lda")?,
            to_int(b.ld, "ldb")?,
            to_int(c.ld, "ldc")?,
        );
        // SAFETY: the caller's operands cover the stated shapes, strides and batch.
        let s = unsafe {
            if batch == 1 {
                (self.api.cublasSgemm_v2)(
                    self.handle,
                    op(b.trans),
                    op(a.trans),
                    ni,
                    mi,
                    ki,
                    &alpha,
                    b.ptr as *const f32,
                    ldb,
                    a.ptr as *const f32,
                    lda,
                    &beta,
                    c.ptr as *mut f32,
                    ldc,
                )
            } else {
                (self.api.cublasSgemmStridedBatched)(
                    self.handle,
                    op(b.trans),
                    op(a.trans),
                    ni,
                    mi,
                    ki,
                    &alpha,
                    b.ptr as *const f32,
                    ldb,
                    b.stride as i64,
                    a.ptr as *const f32,
                    lda,
                    a.stride as i64,
                    &beta,
                    c.ptr as *mut f32,
                    ldc,
                    c.stride as i64,
                    to_int(batch, "batch")?,
                )
            }
        };
        self.check(
            s,
            if batch == 1 {
                "cublasSgemm"
            } else {
                "cublasSgemmStridedBatched"
            },
        )
    }
}

impl Drop for Sgemm {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: destroys the handle created in `new`, once.
            unsafe { (self.api.cublasDestroy_v2)(self.handle) };
        }
    }
}
