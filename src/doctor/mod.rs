//! `nanogpt doctor`: finds the GPU stack (driver, NVRTC, cuBLAS/cuBLASLt, NCCL), says where
//! it looked and what it found, and proves each piece works with short self-tests on every
//! GPU. Also reports the CPU the CPU engine runs on.
//!
//! Checks and exit code: every check ends `ok`, `failed`, `missing` or `skipped`. A check is
//! *required* depending on the mode: with `--require-gpu` everything is; by default the GPU
//! stack is required when a GPU is present, and anything found but broken is always
//! required; with `--cpu-only` only the CPU is. The exit code is 0 exactly when no required
//! check failed or is missing. Skipped checks never count as passed.
//!
//! Modules: [`check`] (host references and pass rules), [`cpu`], [`gpu`] (the self-tests),
//! [`render`] (the text report).

pub mod check;
pub mod cpu;
pub mod gpu;
pub mod render;

use crate::cuda::cublaslt::CublasLt;
use crate::cuda::discover::{Discovery, LibKind, SearchDir, SearchEnv, SearchPlan};
use crate::cuda::driver::{DeviceInfo, Driver, CUDA_ERROR_NO_DEVICE};
use crate::cuda::nccl::Nccl;
use crate::cuda::nvrtc::{Nvrtc, Target};
use crate::cuda::{peak, CudaError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The self-test kernel, compiled at run time by NVRTC.
pub const DOCTOR_KERNEL: &str = crate::kernel_source!("doctor.cu").1;
pub const DOCTOR_KERNEL_NAME: &str = "kernels/doctor.cu";

/// Which checks are requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// GPU stack required when a GPU is present; no GPU is not an error.
    Auto,
    /// Only the CPU: GPU libraries are listed but not required and GPUs are not tested.
    CpuOnly,
    /// A working GPU stack is required.
    RequireGpu,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// Side of the square bf16 GEMM self-test.
    pub gemm_size: usize,
    /// Size of each buffer of the device copy test, MiB.
    pub copy_mib: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            gemm_size: 4096,
            copy_mib: 256,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Missing,
    Skipped,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    /// GPU index for per-GPU checks.
    pub gpu: Option<usize>,
    pub status: Status,
    /// Whether this check decides the exit code in the chosen mode.
    pub required: bool,
    pub detail: String,
    /// What to install or set, for checks that did not pass.
    pub advice: Option<String>,
    /// The measurement, if the check measures something.
    pub value: Option<f64>,
    pub unit: Option<String>,
}

impl Check {
    pub fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            gpu: None,
            status,
            required: false,
            detail: detail.into(),
            advice: None,
            value: None,
            unit: None,
        }
    }
    pub fn on_gpu(mut self, gpu: usize) -> Check {
        self.gpu = Some(gpu);
        self
    }
    pub fn advice(mut self, a: impl Into<String>) -> Check {
        self.advice = Some(a.into());
        self
    }
    pub fn measured(mut self, value: f64, unit: &str) -> Check {
        self.value = Some(value);
        self.unit = Some(unit.to_string());
        self
    }
    pub fn required(mut self, r: bool) -> Check {
        self.required = r;
        self
    }
    /// Counts against the exit code.
    pub fn is_failure(&self) -> bool {
        self.required && matches!(self.status, Status::Failed | Status::Missing)
    }
}

/// One library: where it was looked for, what was found and loaded.
#[derive(Clone, Debug, Serialize)]
pub struct LibraryReport {
    pub name: &'static str,
    pub status: Status,
    /// The file loaded (after following links), or the file that failed to load.
    pub path: Option<PathBuf>,
    /// Which search-order entry it came from.
    pub source: Option<String>,
    /// Version as reported by the library itself.
    pub version: Option<String>,
    pub shadowed: Vec<PathBuf>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    pub advice: Option<String>,
}

/// One GPU.
#[derive(Clone, Debug, Serialize)]
pub struct GpuReport {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: String,
    pub sm_count: u32,
    pub clock_mhz: u32,
    /// Dense bf16 peak used for MFU; null when the model is unknown.
    pub bf16_peak_tflops: Option<f64>,
    pub peak_model: Option<String>,
}

/// Everything `nanogpt doctor` found; `--json` prints exactly this.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub ok: bool,
    pub exit_code: i32,
    pub summary: String,
    pub cpu: cpu::CpuInfo,
    pub search_order: Vec<SearchDir>,
    pub search_notes: Vec<String>,
    pub libraries: Vec<LibraryReport>,
    pub gpus: Vec<GpuReport>,
    pub checks: Vec<Check>,
}

/// The libraries that loaded, for the GPU self-tests.
pub struct Loaded {
    pub driver: Option<Driver>,
    pub nvrtc: Option<Nvrtc>,
    pub cublaslt: Option<CublasLt>,
    pub nccl: Option<Nccl>,
}

fn version_cuda(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

fn version_code(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

/// Loads one discovered library with `load`, filling its report entry.
fn load_lib<T>(
    d: &Discovery,
    load: impl FnOnce(&Path) -> Result<(T, String), CudaError>,
    resolved: impl FnOnce(&T) -> Option<PathBuf>,
) -> (Option<T>, LibraryReport) {
    let mut rep = LibraryReport {
        name: d.kind.name(),
        status: Status::Missing,
        path: None,
        source: None,
        version: None,
        shadowed: d.shadowed.clone(),
        warnings: d.warnings.clone(),
        error: None,
        advice: None,
    };
    let Some(found) = &d.found else {
        rep.advice = Some(d.advice().to_string());
        return (None, rep);
    };
    let by_name = !found.path.is_absolute();
    match load(&found.path) {
        Ok((lib, version)) => {
            rep.status = Status::Ok;
            rep.path = resolved(&lib).or_else(|| Some(found.path.clone()));
            rep.source = Some(found.source.clone());
            rep.version = Some(version);
            (Some(lib), rep)
        }
        Err(e) if by_name => {
            // Not in any searched directory and unknown to the loader: missing.
            rep.error = Some(e.to_string());
            rep.advice = Some(d.advice().to_string());
            (None, rep)
        }
        Err(e) => {
            rep.status = Status::Failed;
            rep.path = Some(found.path.clone());
            rep.source = Some(found.source.clone());
            rep.error = Some(e.to_string());
            rep.advice = Some(format!(
                "the file is there but does not load: check that it is complete and built for \
                 this machine, or remove it from the search path; otherwise {}",
                d.advice()
            ));
            (None, rep)
        }
    }
}

/// Runs the doctor: discovery with `env`, library loading, and the checks `opts` asks for.
pub fn run(opts: &Options, env: &SearchEnv) -> Report {
    let cpu = cpu::detect();
    let plan = SearchPlan::new(env);
    let disc = |k: LibKind| plan.find(k);
    let mut libraries = Vec::new();
    let mut checks = Vec::new();

    checks.push(Check::new(
        "cpu",
        Status::Ok,
        format!(
            "{}, {} CPUs ({} available), {}",
            cpu.model, cpu.logical_cpus, cpu.available_cpus, cpu.engine_path
        ),
    ));

    let (driver, rep) = load_lib(
        &disc(LibKind::Driver),
        |p| {
            let d = Driver::load(p)?;
            let v = d.version()?;
            Ok((d, format!("CUDA {}", version_cuda(v))))
        },
        |d: &Driver| d.api.lib.resolved_path("cuInit"),
    );
    libraries.push(rep);
    let (nvrtc, rep) = load_lib(
        &disc(LibKind::Nvrtc),
        |p| {
            let n = Nvrtc::load(p)?;
            let (a, b) = n.version()?;
            Ok((n, format!("{a}.{b}")))
        },
        |n: &Nvrtc| n.api.lib.resolved_path("nvrtcVersion"),
    );
    libraries.push(rep);
    // cuBLASLt before cuBLAS: libcublas needs libcublasLt by soname and must get this one.
    let (cublaslt, rep) = load_lib(
        &disc(LibKind::CublasLt),
        |p| {
            let l = CublasLt::load(p)?;
            let v = version_code(l.version());
            Ok((l, v))
        },
        |l: &CublasLt| l.api.lib.resolved_path("cublasLtGetVersion"),
    );
    libraries.push(rep);
    let (_cublas, rep) = load_lib(
        &disc(LibKind::Cublas),
        |p| {
            let (api, (a, b, c)) = crate::cuda::cublas::version(p)?;
            Ok((api, format!("{a}.{b}.{c}")))
        },
        |c| c.lib.resolved_path("cublasGetProperty"),
    );
    libraries.push(rep);
    let (nccl, rep) = load_lib(
        &disc(LibKind::Nccl),
        |p| {
            let n = Nccl::load(p)?;
            let v = version_code(n.version()?.max(0) as usize);
            Ok((n, v))
        },
        |n: &Nccl| n.api.lib.resolved_path("ncclGetVersion"),
    );
    libraries.push(rep);

    // GPUs.
    let mut gpus: Vec<DeviceInfo> = Vec::new();
    let mut gpu_error: Option<String> = None;
    if let Some(d) = &driver {
        match d.init() {
            0 => match d.device_count() {
                Ok(n) => {
                    for i in 0..n {
                        match d.device_info(i) {
                            Ok(info) => gpus.push(info),
                            Err(e) => gpu_error = Some(e.to_string()),
                        }
                    }
                }
                Err(e) => gpu_error = Some(e.to_string()),
            },
            CUDA_ERROR_NO_DEVICE => {}
            code => {
                gpu_error = Some(
                    d.check(code, "cuInit")
                        .err()
                        .map_or_else(String::new, |e| e.to_string()),
                )
            }
        }
    }
    let gpu_present = !gpus.is_empty();
    let mode = opts.mode;
    let gpu_required = match mode {
        Mode::RequireGpu => true,
        Mode::Auto => gpu_present,
        Mode::CpuOnly => false,
    };
    let broken_required = mode != Mode::CpuOnly;

    for lib in &libraries {
        let name = lib.name;
        let c = match lib.status {
            Status::Ok => Check::new(
                name,
                Status::Ok,
                format!(
                    "{} ({}) from {}",
                    lib.path.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                    lib.version.clone().unwrap_or_default(),
                    lib.source.clone().unwrap_or_default()
                ),
            ),
            Status::Failed => Check::new(name, Status::Failed, lib.error.clone().unwrap_or_default())
                .required(broken_required),
            _ => Check::new(
                name,
                Status::Missing,
                format!(
                    "no lib{}.so* in the {} directories searched, and the system loader does not know it",
                    LibKind::ALL.iter().find(|k| k.name() == name).map_or("", |k| k.stem()),
                    plan.dirs.len()
                ),
            )
            .required(gpu_required && name != "cublas"),
        };
        let c = match (&lib.advice, lib.status) {
            (Some(a), Status::Failed | Status::Missing) => c.advice(a.clone()),
            _ => c,
        };
        checks.push(c);
        for w in &lib.warnings {
            checks.push(
                Check::new(format!("{name} files"), Status::Failed, w.clone())
                    .required(broken_required && lib.status == Status::Ok),
            );
        }
    }

    // The GPU list itself.
    if let Some(e) = &gpu_error {
        checks.push(
            Check::new(
                "gpus",
                Status::Failed,
                format!("the driver loaded but cannot list GPUs: {e}"),
            )
            .required(broken_required)
            .advice(
                "check that the kernel module matches the driver library (nvidia-smi), that \
                     /dev/nvidia* are accessible, and that CUDA_VISIBLE_DEVICES is not empty",
            ),
        );
    } else if driver.is_some() && !gpu_present {
        checks.push(
            Check::new("gpus", Status::Missing, "the driver reports no CUDA device")
                .required(mode == Mode::RequireGpu)
                .advice("check nvidia-smi and CUDA_VISIBLE_DEVICES"),
        );
    } else if driver.is_none() {
        checks.push(
            Check::new(
                "gpus",
                Status::Missing,
                "no GPU: no CUDA driver on this machine",
            )
            .required(mode == Mode::RequireGpu)
            .advice(LibKind::Driver.advice()),
        );
    } else {
        checks.push(Check::new(
            "gpus",
            Status::Ok,
            format!("{} CUDA device(s)", gpus.len()),
        ));
    }

    // NVRTC compile check: needs no GPU; targets the first GPU's architecture, else sm_90.
    match &nvrtc {
        Some(n) => {
            let cc = gpus
                .first()
                .map(|g| g.compute_capability.0 * 10 + g.compute_capability.1)
                .unwrap_or(90);
            checks.push(nvrtc_compile_check(n, cc).required(broken_required));
        }
        None => checks.push(Check::new(
            "nvrtc compile",
            Status::Skipped,
            format!("{DOCTOR_KERNEL_NAME} not compiled: NVRTC not loaded"),
        )),
    }

    let loaded = Loaded {
        driver,
        nvrtc,
        cublaslt,
        nccl,
    };
    if gpu_present {
        if mode == Mode::CpuOnly {
            checks.push(Check::new(
                "gpu self-tests",
                Status::Skipped,
                format!("{} GPU(s) present, not tested with --cpu-only", gpus.len()),
            ));
        } else {
            for c in gpu::run_all(&loaded, &gpus, opts) {
                checks.push(c.required(true));
            }
        }
    } else {
        checks.push(Check::new(
            "gpu self-tests",
            Status::Skipped,
            "no GPU to run the kernel, GEMM, copy and NCCL tests on",
        ));
    }

    let gpu_reports: Vec<GpuReport> = gpus
        .iter()
        .map(|g| {
            let p = peak::bf16_peak(&g.name);
            GpuReport {
                index: g.index,
                name: g.name.clone(),
                memory_bytes: g.memory_bytes,
                compute_capability: format!(
                    "{}.{}",
                    g.compute_capability.0, g.compute_capability.1
                ),
                sm_count: g.sm_count,
                clock_mhz: g.clock_mhz,
                bf16_peak_tflops: p.map(|p| p.bf16_tflops),
                peak_model: p.map(|p| p.model.to_string()),
            }
        })
        .collect();
    for g in &gpu_reports {
        if g.bf16_peak_tflops.is_none() {
            checks.push(
                Check::new(
                    "mfu peak",
                    Status::Skipped,
                    format!(
                        "'{}' is not in the bf16 peak table: MFU is not reported",
                        g.name
                    ),
                )
                .on_gpu(g.index)
                .advice("pass --peak_flops=<dense bf16 FLOP/s of this GPU> to train and bench"),
            );
        }
    }

    let failures: Vec<&Check> = checks.iter().filter(|c| c.is_failure()).collect();
    let ok = failures.is_empty();
    let summary = if !ok {
        let names: Vec<String> = failures
            .iter()
            .map(|c| match c.gpu {
                Some(g) => format!("{} (GPU {g})", c.name),
                None => c.name.clone(),
            })
            .collect();
        format!(
            "{} required check(s) did not pass: {}",
            failures.len(),
            names.join(", ")
        )
    } else if gpu_present && mode != Mode::CpuOnly {
        format!("all checks passed on {} GPU(s)", gpus.len())
    } else if gpu_present {
        "CPU checks passed (GPUs present but not tested: --cpu-only)".to_string()
    } else {
        format!(
            "no GPU found: training runs on the CPU engine (searched {} directories{}; \
             --require-gpu makes this an error)",
            plan.dirs.len(),
            if plan.loader_fallback {
                " and the system loader"
            } else {
                ""
            }
        )
    };
    Report {
        mode,
        ok,
        exit_code: if ok { 0 } else { 1 },
        summary,
        cpu,
        search_order: plan.dirs.clone(),
        search_notes: plan.notes.clone(),
        libraries,
        gpus: gpu_reports,
        checks,
    }
}

/// Compiles the self-test kernel for `sm_<cc>` and checks the image holds the kernel.
pub fn nvrtc_compile_check(n: &Nvrtc, cc: u32) -> Check {
    let target = Target::Cubin { cc };
    let t = Instant::now();
    match n.compile(DOCTOR_KERNEL, DOCTOR_KERNEL_NAME, target, &[]) {
        Ok(c) => {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let has_kernel = c
                .image
                .windows(b"doctor_selftest".len())
                .any(|w| w == b"doctor_selftest");
            if has_kernel {
                Check::new(
                    "nvrtc compile",
                    Status::Ok,
                    format!(
                        "{DOCTOR_KERNEL_NAME} -> {} ({} bytes) in {ms:.0} ms",
                        target.describe(),
                        c.image.len()
                    ),
                )
                .measured(ms, "ms")
            } else {
                Check::new(
                    "nvrtc compile",
                    Status::Failed,
                    format!(
                        "the {} image has no doctor_selftest kernel",
                        target.describe()
                    ),
                )
            }
        }
        Err(e) => {
            let supported = n.supported_archs().unwrap_or_default();
            let advice = if !supported.is_empty() && !supported.contains(&cc) {
                let list: Vec<String> = supported.iter().map(|a| format!("sm_{a}")).collect();
                format!(
                    "this NVRTC compiles for {} but not sm_{cc}: install an NVRTC that \
                     supports this GPU (pip install -U nvidia-cuda-nvrtc)",
                    list.join(", ")
                )
            } else {
                "reinstall NVRTC (libnvrtc and libnvrtc-builtins must come from the same package)"
                    .to_string()
            };
            Check::new("nvrtc compile", Status::Failed, e.to_string()).advice(advice)
        }
    }
}
