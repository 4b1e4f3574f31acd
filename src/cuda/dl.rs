//! Opening a shared library by absolute path and resolving its entry points, with errors
//! that name the file and the symbol. Libraries are opened `RTLD_NOW | RTLD_GLOBAL` and
//! deliberately never closed (unloading CUDA libraries while their threads run crashes).

use super::CudaError;
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};

/// An open library that stays loaded for the life of the process.
pub struct Lib {
    lib: std::mem::ManuallyDrop<Library>,
    pub path: PathBuf,
}

impl Lib {
    /// Opens `path` (absolute: exactly that file; a bare name: the loader's own search).
    pub fn open(path: &Path) -> Result<Lib, CudaError> {
        // SAFETY: loading a library runs its initialisers; the CUDA libraries' initialisers
        // have no preconditions on the calling program.
        let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
            CudaError::Load {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Lib {
            lib: std::mem::ManuallyDrop::new(lib),
            path: path.to_path_buf(),
        })
    }

    /// The address of `symbol`, to be transmuted by the caller to its C signature.
    pub fn sym(&self, symbol: &'static str) -> Result<*mut c_void, CudaError> {
        // SAFETY: the symbol is read as an untyped pointer; the caller gives it its type.
        let s = unsafe { self.lib.get::<*mut c_void>(symbol.as_bytes()) };
        match s {
            Ok(s) => Ok(*s),
            Err(e) => Err(CudaError::Symbol {
                path: self.path.clone(),
                symbol,
                reason: e.to_string(),
            }),
        }
    }

    /// The file the loader actually mapped for this library, found through `symbol`
    /// (differs from `path` when `path` was a bare name or a symbolic link).
    pub fn resolved_path(&self, symbol: &'static str) -> Option<PathBuf> {
        let addr = self.sym(symbol).ok()?;
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr only reads the address and fills `info`.
        let ok = unsafe { libc::dladdr(addr as *const c_void, &mut info) };
        if ok == 0 || info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_fname) };
        let p = PathBuf::from(name.to_string_lossy().into_owned());
        Some(std::fs::canonicalize(&p).unwrap_or(p))
    }
}

/// A C string from a static message pointer returned by a library (empty when null).
pub fn c_str(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the libraries return NUL-terminated static strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `s` as a C string; interior NULs (never in our inputs) become an error.
pub fn cstring(s: &str) -> Result<CString, CudaError> {
    CString::new(s).map_err(|_| CudaError::Invalid(format!("text contains a NUL byte: {s:?}")))
}

/// Declares a struct of C entry points loaded from one library:
/// `api! { pub struct Name { fn cuInit(flags: u32) -> i32; ... } }`.
macro_rules! api {
    ($(#[$meta:meta])* pub struct $name:ident { $( fn $f:ident ( $($a:ident : $t:ty),* $(,)? ) $(-> $r:ty)? ; )* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        pub struct $name {
            pub lib: $crate::cuda::dl::Lib,
            $( pub $f: unsafe extern "C" fn($($t),*) $(-> $r)?, )*
        }
        impl $name {
            /// Opens the library at `path` and resolves every entry point.
            pub fn load(path: &std::path::Path) -> Result<Self, $crate::cuda::CudaError> {
                let lib = $crate::cuda::dl::Lib::open(path)?;
                $(
                    let ptr = lib.sym(stringify!($f))?;
                    // SAFETY: the symbol has this C signature in the library's headers.
                    #[allow(non_snake_case)]
                    let $f = unsafe {
                        std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn($($t),*) $(-> $r)?>(ptr)
                    };
                )*
                Ok($name { lib, $( $f, )* })
            }
        }
    };
}
pub(crate) use api;
