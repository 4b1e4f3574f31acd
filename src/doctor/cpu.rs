//! What the doctor reports about the CPU: model, cores, and the SIMD features the CPU
//! engine uses.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct CpuInfo {
    pub model: String,
    /// Logical CPUs online.
    pub logical_cpus: usize,
    /// CPUs this process may run on (affinity and cgroup limits applied).
    pub available_cpus: usize,
    /// SIMD features detected, in the order listed.
    pub simd: Vec<String>,
    /// What the CPU engine uses of them.
    pub engine_path: String,
}

pub fn detect() -> CpuInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "cpu model").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH));
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let available = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (simd, engine_path) = simd();
    CpuInfo {
        model,
        logical_cpus: if online > 0 {
            online as usize
        } else {
            available
        },
        available_cpus: available,
        simd,
        engine_path,
    }
}

#[cfg(target_arch = "x86_64")]
fn simd() -> (Vec<String>, String) {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {$(
            if std::arch::is_x86_feature_detected!($name) {
                f.push($name.to_string());
            }
        )*};
    }
    probe!("sse2", "sse4.2", "avx", "avx2", "fma", "f16c", "avx512f");
    let engine = if crate::engine::cpu::simd::has_avx2_fma() {
        "AVX2+FMA: element-wise kernels (run-time dispatch) and matmuls (gemm crate)"
    } else {
        "baseline SSE2 (no AVX2+FMA): expect several times slower training"
    };
    let mut engine = engine.to_string();
    if f.iter().any(|x| x == "avx512f") {
        engine.push_str("; AVX-512 present but not used by this build");
    }
    (f, engine)
}

#[cfg(target_arch = "aarch64")]
fn simd() -> (Vec<String>, String) {
    (
        vec!["neon".to_string()],
        "NEON (compiler auto-vectorisation; matmuls via the gemm crate)".to_string(),
    )
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn simd() -> (Vec<String>, String) {
    (Vec::new(), "scalar".to_string())
}
