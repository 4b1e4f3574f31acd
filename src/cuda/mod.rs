//! The CUDA stack, loaded at run time: which library files to use ([`discover`]), thin
//! dynamically-loaded bindings for the few entry points we call ([`driver`], [`graph`], [`nvrtc`],
//! [`cublaslt`], [`nccl`], [`cublas`]), the bf16 reference conversions the kernels are
//! checked against ([`bf16`]) and the table of GPU peak FLOP/s used for MFU ([`peak`]).
//!
//! Nothing here links against CUDA: the binary builds and runs on machines without a GPU
//! or toolkit, and every library is opened by the absolute path [`discover`] chose. The
//! libraries are opened with `RTLD_GLOBAL` and never closed, so a library that later asks
//! the loader for the same soname (cuBLASLt's internal runtime asking for `libcuda.so.1`,
//! NVRTC asking for its builtins) gets the file chosen here.

pub mod bf16;
pub mod cublas;
pub mod cublaslt;
pub mod discover;
mod dl;
pub mod driver;
pub mod graph;
pub mod nccl;
pub mod nvrtc;
pub mod peak;

use std::path::PathBuf;

/// Everything that can go wrong while loading or calling a CUDA library.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("could not load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path} has no symbol {symbol} (library too old or not the expected one): {reason}")]
    Symbol {
        path: PathBuf,
        symbol: &'static str,
        reason: String,
    },
    #[error("{call} failed: {name} ({code}): {message}")]
    Driver {
        call: &'static str,
        code: i32,
        name: String,
        message: String,
    },
    #[error("{call} failed: {message} ({code})")]
    Nvrtc {
        call: &'static str,
        code: i32,
        message: String,
    },
    #[error("NVRTC could not compile {program}:\n{log}")]
    Compile { program: String, log: String },
    #[error("{call} failed: {name} ({code})")]
    Cublas {
        call: &'static str,
        code: i32,
        name: String,
    },
    #[error("{call} failed: {message} ({code})")]
    Nccl {
        call: &'static str,
        code: i32,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}
