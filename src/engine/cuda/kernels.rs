//! The engine's CUDA C sources (`kernels/*.cu`, embedded in the binary), compiled by NVRTC
//! for the GPU's architecture when the engine starts, cached on disk, and launched with
//! typed arguments.
//!
//! Cache: `$XDG_CACHE_HOME/nanogpt/kernels` (else `~/.cache/nanogpt/kernels`), one file per
//! program named `<file>-<key>.cubin` (`<file>-p<part>-<key>.cubin` for a part of a file
//! compiled in parts), the key a SHA-256 of (source, NVRTC options, target, NVRTC version).
//! A cold program is compiled under a lock (`<file>.lock` beside it), so that processes
//! starting together on one machine compile it once between them. A cache that cannot be
//! read or written only costs a recompile.

use super::stack::Stack;
use crate::cuda::driver::{Context, CuFunction, Module, Stream};
use crate::cuda::nvrtc::{Compiled, Nvrtc, Target};
use crate::cuda::CudaError;
use sha2::{Digest, Sha256};
use std::ffi::c_void;
use std::path::{Path, PathBuf};

/// `(file name, source)` of `kernels/<file>`, the source with `kernels/common.cuh` (the
/// shared device helpers) in front of it: NVRTC runs without headers, so the kernels
/// include nothing and every family is compiled with the prelude instead.
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_source {
    ($file:literal) => {
        (
            $file,
            concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.cuh")),
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/", $file)),
            ),
        )
    };
}

/// `kernels/common.cuh`, compiled in front of every kernel family.
pub const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// (file name, source with the prelude) of every kernel family the engine uses.
pub const SOURCES: [(&str, &str); 9] = [
    kernel_source!("embedding.cu"),
    kernel_source!("layernorm.cu"),
    kernel_source!("elementwise.cu"),
    kernel_source!("attention.cu"),
    kernel_source!("cross_entropy.cu"),
    kernel_source!("adamw.cu"),
    kernel_source!("decode.cu"),
    kernel_source!("cast.cu"),
    kernel_source!("flash_attention.cu"),
];

/// NVRTC options for every engine kernel.
pub const OPTIONS: [&str; 1] = ["--std=c++17"];

/// One NVRTC program of the engine: a kernel family (`kernels/<file>` with the prelude), or
/// one part of a family compiled as several programs. A file that declares
/// `#define KERNEL_PARTS <n>` is compiled n times, with `-DKERNEL_PART=0` .. `n-1`, each
/// emitting its share of the entry points (`KERNEL_IN_PART` in kernels/common.cuh), so that
/// the parts compile on separate threads.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// The kernel file, e.g. `flash_attention.cu`.
    pub file: &'static str,
    /// Its source, with the prelude.
    pub source: &'static str,
    /// Which part of a file compiled in parts; `None`: the whole file.
    pub part: Option<u32>,
    /// Compiled only when an engine asks for it (a part from the file's
    /// `KERNEL_PARTS_ON_DEMAND` on: the attention kernels' `_expf` forms).
    pub on_demand: bool,
}

/// The programs compiled only on demand that an engine wants besides the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnDemand {
    /// The bf16 attention kernels' forms with the accurate `expf` (the `flash_exp2` switch
    /// off; see [`Kernels::use_accurate_exponentials`]).
    pub accurate_exponentials: bool,
}

impl OnDemand {
    /// None of them: what a default engine compiles.
    pub const NONE: OnDemand = OnDemand {
        accurate_exponentials: false,
    };
    /// All of them.
    pub const ALL: OnDemand = OnDemand {
        accurate_exponentials: true,
    };
}

impl Program {
    /// Every program of the engine: one per kernel family, or one per part.
    pub fn all() -> Vec<Program> {
        SOURCES
            .iter()
            .flat_map(|&(file, source)| {
                let parts = parts_of(source);
                let on_demand_from = define_of(source, "KERNEL_PARTS_ON_DEMAND");
                let whole = Program {
                    file,
                    source,
                    part: None,
                    on_demand: false,
                };
                let split = (0..parts.unwrap_or(0)).map(move |k| Program {
                    part: Some(k),
                    on_demand: on_demand_from.is_some_and(|from| k >= from),
                    ..whole
                });
                parts.is_none().then_some(whole).into_iter().chain(split)
            })
            .collect()
    }

    /// The programs an engine wanting `wanted` compiles: all but the on-demand ones it does
    /// not want (the only on-demand programs are the `_expf` attention forms).
    pub fn wanted(wanted: OnDemand) -> Vec<Program> {
        Program::all()
            .into_iter()
            .filter(|p| !p.on_demand || wanted.accurate_exponentials)
            .collect()
    }

    /// NVRTC options: [`OPTIONS`], and the part's `-DKERNEL_PART`.
    pub fn options(&self) -> Vec<String> {
        let mut o: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
        if let Some(k) = self.part {
            o.push(format!("-DKERNEL_PART={k}"));
        }
        o
    }

    /// The program's name in messages and NVRTC logs: `kernels/<file>`, with its part.
    pub fn name(&self) -> String {
        match self.part {
            None => format!("kernels/{}", self.file),
            Some(k) => format!("kernels/{} (part {k})", self.file),
        }
    }

    /// Compiles it with `nvrtc` for `target`.
    pub fn compile(&self, nvrtc: &Nvrtc, target: Target) -> Result<Compiled, CudaError> {
        let options = self.options();
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        nvrtc.compile(self.source, &self.name(), target, &options)
    }

    /// The start of its cache file's name: the file's stem, and `-p<k>` for a part.
    fn cache_stem(&self) -> String {
        let stem = self.file.trim_end_matches(".cu");
        match self.part {
            None => stem.to_string(),
            Some(k) => format!("{stem}-p{k}"),
        }
    }
}

/// The part count a source declares (`#define KERNEL_PARTS <n>`, n >= 1), if any.
pub fn parts_of(source: &str) -> Option<u32> {
    define_of(source, "KERNEL_PARTS").filter(|&n| n >= 1)
}

/// The number a source `#define`s `name` as (`#define <name> <n>`, a comment after it
/// allowed), if any.
fn define_of(source: &str, name: &str) -> Option<u32> {
    source.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("#define ")?.trim_start();
        let value = rest.strip_prefix(name)?;
        if !value.starts_with(char::is_whitespace) {
            return None;
        }
        value.split("//").next()?.trim().parse::<u32>().ok()
    })
}

/// Threads per block of the 1-D and warp-per-row kernels (see each `.cu` header).
pub const BLOCK: u32 = 256;

/// Where compiled kernels are cached.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("nanogpt").join("kernels"))
}

/// The cache key of one program for one target: a SHA-256 of its source, its NVRTC
/// options, the target and NVRTC's version.
pub fn cache_key(program: &Program, target: Target, nvrtc_version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(program.source.as_bytes());
    for o in program.options() {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.update([0u8]);
    h.update(target.arch_flag().as_bytes());
    h.update(format!("nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    let d = h.finalize();
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The target for a GPU of compute capability `cc` (e.g. 90): a cubin when this NVRTC
/// knows the architecture, else PTX for the newest one it knows (JIT-compiled by the driver).
pub fn target_for(stack: &Stack, cc: u32) -> Result<Target, CudaError> {
    let archs = stack.nvrtc.supported_archs()?;
    if archs.contains(&cc) {
        return Ok(Target::Cubin { cc });
    }
    archs
        .iter()
        .copied()
        .filter(|&a| a <= cc)
        .max()
        .map(|a| Target::Ptx { cc: a })
        .ok_or_else(|| {
            CudaError::Invalid(format!(
                "this NVRTC cannot compile for sm_{cc} or any older architecture (it supports \
                 {archs:?}); install an NVRTC that supports this GPU (pip install -U \
                 nvidia-cuda-nvrtc)"
            ))
        })
}

/// One program's image, and whether it was compiled now (not read from the cache).
struct Image {
    bytes: Vec<u8>,
    compiled: bool,
}

/// Compiles one program (or reads it from the cache).
fn compiled_image(stack: &Stack, program: &Program, target: Target) -> Result<Image, CudaError> {
    let version = stack.nvrtc.version()?;
    let key = cache_key(program, target, version);
    let file = cache_dir().map(|d| {
        let ext = match target {
            Target::Cubin { .. } => "cubin",
            Target::Ptx { .. } => "ptx",
        };
        d.join(format!("{}-{key}.{ext}", program.cache_stem()))
    });
    cached_or_compiled(file.as_deref(), || {
        Ok(program.compile(&stack.nvrtc, target)?.image)
    })
}

/// The image cached in `file`, or, when there is none, `compile`'s, written there for the
/// next start. Processes starting together on one machine (the ranks of a node) would
/// otherwise all compile the same programs at once, each slowing the others: a cold one
/// takes an exclusive lock on `<file>.lock` first (flock: released if the process dies),
/// and whoever gets it second reads what the first wrote. Without a cache directory, or
/// where the lock cannot be taken (a read-only or lockless file system), it compiles
/// unlocked.
fn cached_or_compiled(
    file: Option<&Path>,
    compile: impl FnOnce() -> Result<Vec<u8>, CudaError>,
) -> Result<Image, CudaError> {
    let cached = |f: &Path| {
        let bytes = std::fs::read(f).ok().filter(|b| !b.is_empty())?;
        Some(Image {
            bytes,
            compiled: false,
        })
    };
    let compiled = |bytes| Image {
        bytes,
        compiled: true,
    };
    let Some(f) = file else {
        return compile().map(compiled);
    };
    if let Some(image) = cached(f) {
        return Ok(image);
    }
    let _lock = f
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| {
            let mut name = f.as_os_str().to_owned();
            name.push(".lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(PathBuf::from(name))?;
            lock.lock()?;
            Ok(lock)
        })
        .ok();
    if let Some(image) = cached(f) {
        return Ok(image);
    }
    let bytes = compile()?;
    if let Err(e) = crate::fsutil::write_atomic(f, &bytes) {
        eprintln!(
            "note: could not cache compiled kernels in {}: {e} (they will be recompiled next time)",
            f.display()
        );
    }
    Ok(compiled(bytes))
}

/// Declares the kernel table: every entry point, looked up by name after loading; those
/// after `accurate_exponentials:` only when their programs were wanted ([`OnDemand`]).
macro_rules! kernel_table {
    ($($f:ident),* $(,)?; accurate_exponentials: $($o:ident),* $(,)?) => {
        /// The names of every entry point the engine launches (the on-demand ones last).
        pub const KERNEL_NAMES: &[&str] = &[$(stringify!($f),)* $(stringify!($o)),*];

        /// The names of the entry points compiled only on demand.
        pub const ON_DEMAND_KERNEL_NAMES: &[&str] = &[$(stringify!($o)),*];

        /// Every entry point of the engine's kernels, resolved in the loaded modules.
        pub struct Kernels {
            $(pub $f: CuFunction,)*
            /// Loaded only when wanted ([`OnDemand::accurate_exponentials`]).
            pub accurate_exponentials: Option<AccurateExponentialKernels>,
            _modules: Vec<Module<'static>>,
        }

        /// The bf16 attention kernels' forms with the accurate `expf`.
        #[derive(Clone, Copy)]
        pub struct AccurateExponentialKernels {
            $(pub $o: CuFunction,)*
        }
        impl Kernels {
            /// Compiles (or reads from the cache) every [`Program`] for `target` but the
            /// on-demand ones not `wanted`, one thread per program (NVRTC compiles separate
            /// programs concurrently: a first start takes about as long as the largest
            /// program), and loads them.
            pub fn load(
                stack: &Stack,
                ctx: &Context<'static>,
                target: Target,
                wanted: OnDemand,
            ) -> Result<Kernels, CudaError> {
                let started = std::time::Instant::now();
                let images: Vec<Result<Image, CudaError>> = std::thread::scope(|scope| {
                    let compiles: Vec<_> = Program::wanted(wanted)
                        .into_iter()
                        .map(|p| scope.spawn(move || compiled_image(stack, &p, target)))
                        .collect();
                    compiles
                        .into_iter()
                        .map(|c| c.join().expect("a kernel compile thread panicked"))
                        .collect()
                });
                let images = images.into_iter().collect::<Result<Vec<Image>, CudaError>>()?;
                let compiled = images.iter().filter(|i| i.compiled).count();
                if compiled > 0 {
                    let cache = cache_dir().map_or("no cache directory: set HOME or XDG_CACHE_HOME".to_string(), |d| {
                        format!("cached in {}; later starts read them", d.display())
                    });
                    eprintln!(
                        "compiled {compiled} of {} kernel programs for {} in {:.1} s ({cache})",
                        images.len(),
                        target.describe(),
                        started.elapsed().as_secs_f64()
                    );
                }
                let mut modules = Vec::new();
                for image in &images {
                    modules.push(ctx.load_module(&image.bytes)?);
                }
                let find = |f: &str| -> Result<CuFunction, CudaError> {
                    for m in &modules {
                        if let Ok(func) = m.function(f) {
                            return Ok(func);
                        }
                    }
                    Err(CudaError::Invalid(format!("kernel {f} is in none of kernels/*.cu")))
                };
                $(let $f = find(stringify!($f))?;)*
                let accurate_exponentials = if wanted.accurate_exponentials {
                    Some(AccurateExponentialKernels { $($o: find(stringify!($o))?,)* })
                } else {
                    None
                };
                Ok(Kernels { $($f,)* accurate_exponentials, _modules: modules })
            }
        }
    };
}

kernel_table!(
    embedding_forward,
    embedding_backward_wte,
    embedding_backward_wpe,
    layernorm_forward,
    layernorm_backward_dx,
    layernorm_backward,
    layernorm_backward_parts,
    residual_layernorm_forward,
    layernorm_recompute,
    gelu_forward,
    gelu_backward_inplace,
    gelu_forward_bf16,
    gelu_backward_bf16,
    bias_broadcast,
    add_inplace,
    dropout_apply,
    colsum_parts,
    reduce_parts_add,
    causal_softmax_forward,
    causal_softmax_backward,
    cross_entropy_forward_backward,
    cross_entropy_bf16,
    sumsq_parts,
    adamw_update,
    decode_kv_append,
    decode_attention,
    cast_f32_to_bf16,
    cast_bf16_to_f32,
    flash_attn_fwd_f32,
    flash_attn_fwd_bf16,
    flash_attn_bwd_dot,
    flash_attn_bwd_dkdv_f32,
    flash_attn_bwd_dq_f32,
    flash_attn_bwd_dkdv_bf16,
    flash_attn_bwd_dq_bf16,
    flash_attn_fwd_bf16_io,
    flash_attn_bwd_dot_bf16,
    flash_attn_bwd_dkdv_bf16_io,
    flash_attn_bwd_dq_bf16_io,
    flash_attn_fwd_bf16_hs64,
    flash_attn_fwd_bf16_io_hs64,
    flash_attn_bwd_dkdv_bf16_hs64,
    flash_attn_bwd_dq_bf16_hs64,
    flash_attn_bwd_dkdv_bf16_io_hs64,
    flash_attn_bwd_dq_bf16_io_hs64,
    flash_attn_fwd_bf16_io_sync,
    flash_attn_bwd_dkdv_bf16_io_sync,
    flash_attn_bwd_dq_bf16_io_sync,
    flash_attn_fwd_bf16_io_sync_hs64,
    flash_attn_bwd_dkdv_bf16_io_sync_hs64,
    flash_attn_bwd_dq_bf16_io_sync_hs64;
    accurate_exponentials:
    flash_attn_fwd_bf16_expf,
    flash_attn_bwd_dkdv_bf16_expf,
    flash_attn_bwd_dq_bf16_expf,
    flash_attn_fwd_bf16_io_expf,
    flash_attn_bwd_dkdv_bf16_io_expf,
    flash_attn_bwd_dq_bf16_io_expf,
    flash_attn_fwd_bf16_hs64_expf,
    flash_attn_fwd_bf16_io_hs64_expf,
    flash_attn_bwd_dkdv_bf16_hs64_expf,
    flash_attn_bwd_dq_bf16_hs64_expf,
    flash_attn_bwd_dkdv_bf16_io_hs64_expf,
    flash_attn_bwd_dq_bf16_io_hs64_expf,
    flash_attn_fwd_bf16_io_sync_expf,
    flash_attn_bwd_dkdv_bf16_io_sync_expf,
    flash_attn_bwd_dq_bf16_io_sync_expf,
    flash_attn_fwd_bf16_io_sync_hs64_expf,
    flash_attn_bwd_dkdv_bf16_io_sync_hs64_expf,
    flash_attn_bwd_dq_bf16_io_sync_hs64_expf,
);

impl Kernels {
    /// Points every bf16 attention entry point at its form with the accurate `expf` in
    /// natural units instead of base-2 exponentials on the special-function unit (the
    /// `flash_exp2` switch off): probabilities within a few units in the last place of fp32
    /// of the base-2 ones, not the same bits. Before the other two, which then choose among
    /// these.
    pub fn use_accurate_exponentials(&mut self) -> Result<(), CudaError> {
        let e = self.accurate_exponentials.ok_or_else(|| {
            CudaError::Invalid(
                "the accurate-expf attention kernels were not loaded (Kernels::load without \
                 OnDemand::accurate_exponentials)"
                    .to_string(),
            )
        })?;
        self.flash_attn_fwd_bf16 = e.flash_attn_fwd_bf16_expf;
        self.flash_attn_bwd_dkdv_bf16 = e.flash_attn_bwd_dkdv_bf16_expf;
        self.flash_attn_bwd_dq_bf16 = e.flash_attn_bwd_dq_bf16_expf;
        self.flash_attn_fwd_bf16_io = e.flash_attn_fwd_bf16_io_expf;
        self.flash_attn_bwd_dkdv_bf16_io = e.flash_attn_bwd_dkdv_bf16_io_expf;
        self.flash_attn_bwd_dq_bf16_io = e.flash_attn_bwd_dq_bf16_io_expf;
        self.flash_attn_fwd_bf16_hs64 = e.flash_attn_fwd_bf16_hs64_expf;
        self.flash_attn_fwd_bf16_io_hs64 = e.flash_attn_fwd_bf16_io_hs64_expf;
        self.flash_attn_bwd_dkdv_bf16_hs64 = e.flash_attn_bwd_dkdv_bf16_hs64_expf;
        self.flash_attn_bwd_dq_bf16_hs64 = e.flash_attn_bwd_dq_bf16_hs64_expf;
        self.flash_attn_bwd_dkdv_bf16_io_hs64 = e.flash_attn_bwd_dkdv_bf16_io_hs64_expf;
        self.flash_attn_bwd_dq_bf16_io_hs64 = e.flash_attn_bwd_dq_bf16_io_hs64_expf;
        self.flash_attn_fwd_bf16_io_sync = e.flash_attn_fwd_bf16_io_sync_expf;
        self.flash_attn_bwd_dkdv_bf16_io_sync = e.flash_attn_bwd_dkdv_bf16_io_sync_expf;
        self.flash_attn_bwd_dq_bf16_io_sync = e.flash_attn_bwd_dq_bf16_io_sync_expf;
        self.flash_attn_fwd_bf16_io_sync_hs64 = e.flash_attn_fwd_bf16_io_sync_hs64_expf;
        self.flash_attn_bwd_dkdv_bf16_io_sync_hs64 = e.flash_attn_bwd_dkdv_bf16_io_sync_hs64_expf;
        self.flash_attn_bwd_dq_bf16_io_sync_hs64 = e.flash_attn_bwd_dq_bf16_io_sync_hs64_expf;
        Ok(())
    }

    /// Points the bf16-storage attention entry points at their forms that load tiles
    /// synchronously instead of by cp.async (the `flash_async` switch off): the same
    /// results. Before [`Kernels::use_generic_attention`], which then keeps them.
    pub fn use_synchronous_attention_loads(&mut self) {
        self.flash_attn_fwd_bf16_io = self.flash_attn_fwd_bf16_io_sync;
        self.flash_attn_bwd_dkdv_bf16_io = self.flash_attn_bwd_dkdv_bf16_io_sync;
        self.flash_attn_bwd_dq_bf16_io = self.flash_attn_bwd_dq_bf16_io_sync;
        self.flash_attn_fwd_bf16_io_hs64 = self.flash_attn_fwd_bf16_io_sync_hs64;
        self.flash_attn_bwd_dkdv_bf16_io_hs64 = self.flash_attn_bwd_dkdv_bf16_io_sync_hs64;
        self.flash_attn_bwd_dq_bf16_io_hs64 = self.flash_attn_bwd_dq_bf16_io_sync_hs64;
    }

    /// Points the head-size-64 attention entry points at the generic kernels (the
    /// `flash_hs64` switch off): the same results, the generic kernels' speed.
    pub fn use_generic_attention(&mut self) {
        self.flash_attn_fwd_bf16_hs64 = self.flash_attn_fwd_bf16;
        self.flash_attn_fwd_bf16_io_hs64 = self.flash_attn_fwd_bf16_io;
        self.flash_attn_bwd_dkdv_bf16_hs64 = self.flash_attn_bwd_dkdv_bf16;
        self.flash_attn_bwd_dq_bf16_hs64 = self.flash_attn_bwd_dq_bf16;
        self.flash_attn_bwd_dkdv_bf16_io_hs64 = self.flash_attn_bwd_dkdv_bf16_io;
        self.flash_attn_bwd_dq_bf16_io_hs64 = self.flash_attn_bwd_dq_bf16_io;
    }
}

/// One kernel argument, with the exact C type of the parameter it fills.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer (`float*`, `const int*`, ...); 0 is `nullptr`.
    Ptr(u64),
    /// `int`
    I32(i32),
    /// `long long`
    I64(i64),
    /// `unsigned int`
    U32(u32),
    /// `unsigned long long`
    U64(u64),
    /// `float`
    F32(f32),
}

/// Launches `f` with `args` on `stream`.
///
/// # Safety
/// `args` must match the kernel's parameter list in order and type, and every pointer must
/// cover what the kernel touches for this geometry (see the `.cu` headers).
pub unsafe fn launch(
    stream: &Stream,
    f: CuFunction,
    grid: (u32, u32, u32),
    block: u32,
    args: &[Arg],
) -> Result<(), CudaError> {
    launch_shared(stream, f, grid, block, 0, args)
}

/// [`launch`] with `shared_bytes` of dynamic shared memory per block.
///
/// # Safety
/// As [`launch`]; the kernel must fit `shared_bytes` in the GPU's per-block limit.
pub unsafe fn launch_shared(
    stream: &Stream,
    f: CuFunction,
    grid: (u32, u32, u32),
    block: u32,
    shared_bytes: u32,
    args: &[Arg],
) -> Result<(), CudaError> {
    let mut vals: Vec<Arg> = args.to_vec();
    let mut ptrs: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => p as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        })
        .collect();
    stream.launch(f, grid, (block, 1, 1), shared_bytes, &mut ptrs)
}

/// Blocks for a 1-D launch over `n` elements.
pub fn grid_1d(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1)
}

/// Blocks for a launch over `n` elements of a kernel that moves four elements per thread
/// (kernels/common.cuh, "vectorised access"): ceil((n + 3) / 4) threads, enough for the
/// groups of four of any alignment shift (0 to 3 elements).
pub fn grid_vec(n: usize) -> (u32, u32, u32) {
    grid_1d((n + 3).div_ceil(4))
}

/// Blocks in x of a launch where each thread owns four consecutive columns of `cols`.
pub fn grid_cols4(cols: usize) -> u32 {
    cols.div_ceil(4).div_ceil(BLOCK as usize).max(1) as u32
}

/// Blocks for a warp-per-row launch over `rows` rows.
pub fn grid_rows(rows: usize) -> (u32, u32, u32) {
    (rows.div_ceil((BLOCK / 32) as usize).max(1) as u32, 1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_program_is_compiled_once_by_processes_starting_together() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernels").join("x-0123.cubin");
        let compiles = AtomicUsize::new(0);
        let compile = || {
            compiles.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(vec![7u8; 16])
        };
        // Four starts at once (threads: each opens the lock file itself, so they exclude
        // each other as processes do): one compiles, the others read its file.
        let images: Vec<Image> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| cached_or_compiled(Some(&file), compile).unwrap()))
                .collect();
            starts.into_iter().map(|s| s.join().unwrap()).collect()
        });
        assert_eq!(compiles.load(Ordering::SeqCst), 1);
        assert_eq!(images.iter().filter(|i| i.compiled).count(), 1);
        assert!(images.iter().all(|i| i.bytes == vec![7u8; 16]));
        // A warm start reads it; no cache directory compiles every time.
        let warm = cached_or_compiled(Some(&file), || panic!("compiled again")).unwrap();
        assert!(!warm.compiled && warm.bytes == vec![7u8; 16]);
        let uncached = cached_or_compiled(None, compile).unwrap();
        assert!(uncached.compiled);
        assert_eq!(compiles.load(Ordering::SeqCst), 2);
        // An empty file (a cut write from before atomic writes) is not an image.
        std::fs::write(&file, b"").unwrap();
        assert!(cached_or_compiled(Some(&file), compile).unwrap().compiled);
    }

    #[test]
    fn a_file_declares_its_part_count() {
        assert_eq!(parts_of("x\n#define KERNEL_PARTS 7\ny"), Some(7));
        assert_eq!(parts_of("  #define KERNEL_PARTS 3  // three\n"), Some(3));
        assert_eq!(parts_of("#define KERNEL_PARTS 0\n"), None);
        assert_eq!(parts_of("#define KERNEL_PARTSX 2\n#define FA 4\n"), None);
        assert_eq!(parts_of("// KERNEL_IN_PART(n) ...\n"), None);
        // Another define starting with the same name is not the count.
        assert_eq!(
            parts_of("#define KERNEL_PARTS_ON_DEMAND 7\n#define KERNEL_PARTS 13\n"),
            Some(13)
        );
        assert_eq!(
            define_of(
                "#define  KERNEL_PARTS_ON_DEMAND 7 // x",
                "KERNEL_PARTS_ON_DEMAND"
            ),
            Some(7)
        );
        // The prelude only uses the count: it declares none (else every file would split).
        assert_eq!(parts_of(PRELUDE), None);
        let programs = Program::all();
        let flash: Vec<_> = programs
            .iter()
            .filter(|p| p.file == "flash_attention.cu")
            .collect();
        assert_eq!(flash.len(), 13);
        assert!(flash
            .iter()
            .enumerate()
            .all(|(k, p)| p.part == Some(k as u32)));
        assert_eq!(flash[3].options().last().unwrap(), "-DKERNEL_PART=3");
        // Parts 7-12 (the `_expf` forms) only on demand; nothing else is.
        assert!(flash.iter().all(|p| p.on_demand == (p.part.unwrap() >= 7)));
        assert_eq!(programs.iter().filter(|p| p.on_demand).count(), 6);
        assert_eq!(Program::wanted(OnDemand::NONE).len(), programs.len() - 6);
        assert_eq!(Program::wanted(OnDemand::ALL).len(), programs.len());
        assert_eq!(flash[3].cache_stem(), "flash_attention-p3");
        let whole = programs.iter().find(|p| p.file == "layernorm.cu").unwrap();
        assert_eq!(
            (whole.part, whole.cache_stem()),
            (None, "layernorm".to_string())
        );
        assert_eq!(whole.options(), OPTIONS);
    }
}
