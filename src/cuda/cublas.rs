//! cuBLAS (`libcublas.so.*`): found and version-checked only; the engine's products go
//! through [`super::cublaslt`].

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
