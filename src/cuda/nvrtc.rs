//! NVRTC (`libnvrtc.so.*`): compiles the CUDA C sources in `kernels/` to PTX or cubin at
//! run time. Needs no GPU, so every kernel can be compile-checked on any machine.

use super::dl::{api, c_str, cstring};
use super::CudaError;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

type NvrtcResult = c_int;
type Program = *mut c_void;

api! {
    /// Entry points of `libnvrtc.so.*`.
    pub struct NvrtcApi {
        fn nvrtcGetErrorString(r: NvrtcResult) -> *const c_char;
        fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> NvrtcResult;
        fn nvrtcGetNumSupportedArchs(n: *mut c_int) -> NvrtcResult;
        fn nvrtcGetSupportedArchs(archs: *mut c_int) -> NvrtcResult;
        fn nvrtcCreateProgram(
            p: *mut Program,
            src: *const c_char,
            name: *const c_char,
            num_headers: c_int,
            headers: *const *const c_char,
            include_names: *const *const c_char,
        ) -> NvrtcResult;
        fn nvrtcDestroyProgram(p: *mut Program) -> NvrtcResult;
        fn nvrtcCompileProgram(p: Program, num_options: c_int, options: *const *const c_char) -> NvrtcResult;
        fn nvrtcGetProgramLogSize(p: Program, size: *mut usize) -> NvrtcResult;
        fn nvrtcGetProgramLog(p: Program, log: *mut c_char) -> NvrtcResult;
        fn nvrtcGetPTXSize(p: Program, size: *mut usize) -> NvrtcResult;
        fn nvrtcGetPTX(p: Program, ptx: *mut c_char) -> NvrtcResult;
        fn nvrtcGetCUBINSize(p: Program, size: *mut usize) -> NvrtcResult;
        fn nvrtcGetCUBIN(p: Program, cubin: *mut c_char) -> NvrtcResult;
    }
}

/// What to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// PTX for a virtual architecture (`compute_90`), JIT-compiled by the driver.
    Ptx { cc: u32 },
    /// Machine code for one real architecture (`sm_90`): loads on a driver older than
    /// this NVRTC, which PTX does not.
    Cubin { cc: u32 },
}

impl Target {
    pub fn arch_flag(&self) -> String {
        match self {
            Target::Ptx { cc } => format!("--gpu-architecture=compute_{cc}"),
            Target::Cubin { cc } => format!("--gpu-architecture=sm_{cc}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Ptx { cc } => format!("compute_{cc} PTX"),
            Target::Cubin { cc } => format!("sm_{cc} cubin"),
        }
    }
}

/// A compiled program: the image to hand to `cuModuleLoadData` (PTX NUL-terminated).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub image: Vec<u8>,
    pub target: Target,
    pub log: String,
}

pub struct Nvrtc {
    pub api: NvrtcApi,
}

impl Nvrtc {
    pub fn load(path: &Path) -> Result<Nvrtc, CudaError> {
        Ok(Nvrtc {
            api: NvrtcApi::load(path)?,
        })
    }

    fn check(&self, r: NvrtcResult, call: &'static str) -> Result<(), CudaError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: returns a static string.
        let message = c_str(unsafe { (self.api.nvrtcGetErrorString)(r) });
        Err(CudaError::Nvrtc {
            call,
            code: r,
            message,
        })
    }

    /// (major, minor), e.g. (13, 0).
    pub fn version(&self) -> Result<(i32, i32), CudaError> {
        let (mut a, mut b) = (0, 0);
        // SAFETY: writes two ints.
        self.check(
            unsafe { (self.api.nvrtcVersion)(&mut a, &mut b) },
            "nvrtcVersion",
        )?;
        Ok((a, b))
    }

    /// The real architectures this NVRTC can compile for (`[75, 80, 86, 89, 90, ...]`).
    pub fn supported_archs(&self) -> Result<Vec<u32>, CudaError> {
        let mut n = 0;
        // SAFETY: writes one int, then `n` ints into a buffer of that size.
        self.check(
            unsafe { (self.api.nvrtcGetNumSupportedArchs)(&mut n) },
            "nvrtcGetNumSupportedArchs",
        )?;
        let mut v = vec![0 as c_int; n.max(0) as usize];
        self.check(
            unsafe { (self.api.nvrtcGetSupportedArchs)(v.as_mut_ptr()) },
            "nvrtcGetSupportedArchs",
        )?;
        Ok(v.into_iter().map(|a| a.max(0) as u32).collect())
    }

    /// Compiles `source` (named `name` in messages) for `target` with extra `options`.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        target: Target,
        options: &[&str],
    ) -> Result<Compiled, CudaError> {
        let src = cstring(source)?;
        let cname = cstring(name)?;
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings; no headers.
        self.check(
            unsafe {
                (self.api.nvrtcCreateProgram)(
                    &mut prog,
                    src.as_ptr(),
                    cname.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            },
            "nvrtcCreateProgram",
        )?;
        let result = self.compile_program(prog, name, target, options);
        // SAFETY: destroys the program created above, once.
        unsafe { (self.api.nvrtcDestroyProgram)(&mut prog) };
        result
    }

    fn compile_program(
        &self,
        prog: Program,
        name: &str,
        target: Target,
        options: &[&str],
    ) -> Result<Compiled, CudaError> {
        let mut opts = vec![cstring(&target.arch_flag())?];
        for o in options {
            opts.push(cstring(o)?);
        }
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: `ptrs` points at live NUL-terminated strings.
        let r = unsafe { (self.api.nvrtcCompileProgram)(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
        let log = self.log(prog)?;
        if r != 0 {
            // SAFETY: returns a static string.
            let message = c_str(unsafe { (self.api.nvrtcGetErrorString)(r) });
            return Err(CudaError::Compile {
                program: format!("{name} for {} ({message})", target.describe()),
                log,
            });
        }
        let image = match target {
            Target::Ptx { .. } => {
                let mut size = 0;
                // SAFETY: size query, then a buffer of that size (includes the NUL).
                self.check(
                    unsafe { (self.api.nvrtcGetPTXSize)(prog, &mut size) },
                    "nvrtcGetPTXSize",
                )?;
                let mut buf = vec![0u8; size];
                self.check(
                    unsafe { (self.api.nvrtcGetPTX)(prog, buf.as_mut_ptr() as *mut c_char) },
                    "nvrtcGetPTX",
                )?;
                buf
            }
            Target::Cubin { .. } => {
                let mut size = 0;
                // SAFETY: size query, then a buffer of that size.
                self.check(
                    unsafe { (self.api.nvrtcGetCUBINSize)(prog, &mut size) },
                    "nvrtcGetCUBINSize",
                )?;
                let mut buf = vec![0u8; size];
                self.check(
                    unsafe { (self.api.nvrtcGetCUBIN)(prog, buf.as_mut_ptr() as *mut c_char) },
                    "nvrtcGetCUBIN",
                )?;
                buf
            }
        };
        Ok(Compiled { image, target, log })
    }

    fn log(&self, prog: Program) -> Result<String, CudaError> {
        let mut size = 0;
        // SAFETY: size query, then a buffer of that size.
        self.check(
            unsafe { (self.api.nvrtcGetProgramLogSize)(prog, &mut size) },
            "nvrtcGetProgramLogSize",
        )?;
        let mut buf = vec![0u8; size.max(1)];
        self.check(
            unsafe { (self.api.nvrtcGetProgramLog)(prog, buf.as_mut_ptr() as *mut c_char) },
            "nvrtcGetProgramLog",
        )?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).trim().to_string())
    }
}
