//! Our hand-written CUDA bindings (src/cuda/) against the real CUDA headers and libraries,
//! without a GPU: tools/ffi_check/ffi_check.py generates a C++ file of static_asserts over
//! cuda.h, nvrtc.h, cublas_v2.h, cublasLt.h and nccl.h (symbol names, parameter and return
//! ABI classes, constants, struct layouts), compiles it with `g++ -fsyntax-only`, and checks
//! that each library found the way `nanogpt doctor` finds it exports what we bind.
//!
//! Headers are looked for in `include` next to every library directory `nanogpt doctor`
//! searches (CUDA_HOME, /usr/local/cuda, the Python environment's nvidia/*/lib, ...) and in
//! the Python environment's site-packages/nvidia/*/include. Without g++, python3 or the
//! headers the test prints "CUDA HEADERS NOT FOUND: checked nothing" and passes;
//! NANOGPT_REQUIRE_CUDA_HEADERS=1 (every header) or =driver,nvrtc (those groups) turns a
//! missing header into a failure.

use nanogpt::cuda::discover::{LibKind, SearchEnv, SearchPlan};
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ffi_check/ffi_check.py")
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The value of NANOGPT_REQUIRE_CUDA_HEADERS as the script's `--require` argument.
fn required() -> Option<String> {
    match std::env::var("NANOGPT_REQUIRE_CUDA_HEADERS") {
        Ok(v) if v == "1" => Some("all".into()),
        Ok(v) if !v.is_empty() && v != "0" => Some(v),
        _ => None,
    }
}

fn not_found(what: &str) {
    let msg = format!("CUDA HEADERS NOT FOUND: checked nothing ({what})");
    if let Some(r) = required() {
        panic!("{msg}; NANOGPT_REQUIRE_CUDA_HEADERS asks for {r}");
    }
    eprintln!("{msg}");
}

fn group(kind: LibKind) -> &'static str {
    match kind {
        LibKind::Driver => "driver",
        LibKind::Nvrtc => "nvrtc",
        LibKind::Cublas => "cublas",
        LibKind::CublasLt => "cublaslt",
        LibKind::Nccl => "nccl",
    }
}

/// (include directories, `GROUP=PATH` of every library found).
fn search() -> (Vec<PathBuf>, Vec<String>) {
    let env = SearchEnv::from_process();
    let plan = SearchPlan::new(&env);
    let mut includes: Vec<PathBuf> = Vec::new();
    for home in [&env.cuda_home, &env.cuda_path].into_iter().flatten() {
        includes.push(Path::new(home).join("include"));
    }
    includes.push(env.default_cuda.join("include"));
    for d in plan.dirs.iter().filter(|d| d.exists) {
        // lib64 -> include, nvidia/cu13/lib -> nvidia/cu13/include,
        // targets/x86_64-linux/lib -> targets/x86_64-linux/include.
        if let Some(parent) = d.dir.parent() {
            includes.push(parent.join("include"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    includes.retain(|d| d.is_dir() && d != Path::new("/usr/include") && seen.insert(d.clone()));
    let libs = LibKind::ALL
        .iter()
        .filter_map(|&k| {
            let found = plan.find(k).found?;
            // A bare name is the loader's last resort: no file to read the exports of.
            if !found.path.is_absolute() || !found.path.is_file() {
                return None;
            }
            Some(format!("{}={}", group(k), found.path.display()))
        })
        .collect();
    (includes, libs)
}

#[test]
fn bindings_match_the_cuda_headers_and_libraries() {
    if !have("python3") || !have("g++") {
        not_found("python3 and g++ are needed to run tools/ffi_check");
        return;
    }
    let (includes, libs) = search();
    let mut cmd = Command::new("python3");
    cmd.arg(script()).arg("check").arg("--python-env");
    for d in &includes {
        cmd.arg("--include").arg(d);
    }
    for l in &libs {
        cmd.arg("--lib").arg(l);
    }
    if let Some(r) = required() {
        cmd.arg("--require").arg(r);
    }
    let out = cmd.output().expect("python3 ran a moment ago");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "NANOGPT_REQUIRE_CUDA_HEADERS names headers that were not found or do not compile \
             (see 'not checked' above; searched {includes:?})"
        ),
        _ => panic!(
            "our CUDA bindings do not match the headers or libraries (details above); fix the \
             declaration in src/cuda/, or the mapping in tools/ffi_check/ffi_check.py when it \
             is the mapping that is stale"
        ),
    }
    let checked = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ffi_check: headers checked: "))
        .expect("the checker prints which headers it checked");
    let (yes, no) = checked
        .split_once("; headers not checked: ")
        .expect("checked; not checked");
    if yes == "none" {
        not_found(&format!("no usable header in {includes:?}"));
    } else if no != "none" {
        eprintln!("CUDA HEADERS NOT FOUND for {no}: those bindings were not checked");
    }
}

#[test]
fn checker_selftest_catches_each_kind_of_mismatch() {
    if !have("python3") {
        eprintln!("skipped: no python3");
        return;
    }
    let out = Command::new("python3")
        .arg(script())
        .arg("selftest")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ffi_check selftest failed:\n{text}");
    if !have("g++") {
        eprintln!("note: no g++, the generated-check half of the selftest was skipped");
    }
}

/// The parser reads what rustc compiles: struct layouts, public constant values and the
/// number of entry points of every api! struct agree with the compiled crate.
#[test]
fn checker_parses_what_the_compiler_sees() {
    use nanogpt::cuda::{cublas, cublaslt, driver, nccl, nvrtc};
    use std::mem::size_of;
    if !have("python3") {
        eprintln!("skipped: no python3");
        return;
    }
    let out = Command::new("python3")
        .arg(script())
        .arg("dump")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffi_check dump failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let structs = &v["structs"];
    assert_eq!(
        structs["HeuristicResult"]["size"],
        size_of::<cublaslt::HeuristicResult>()
    );
    assert_eq!(
        structs["HeuristicResult"]["align"],
        std::mem::align_of::<cublaslt::HeuristicResult>()
    );
    assert_eq!(structs["UniqueId"]["size"], size_of::<nccl::UniqueId>());
    let consts = v["constants"].as_array().unwrap();
    let value = |name: &str| -> i64 {
        let hits: Vec<i64> = consts
            .iter()
            .filter(|c| c["name"] == name)
            .map(|c| c["value"].as_i64().unwrap())
            .collect();
        assert_eq!(hits.len(), 1, "{name} parsed once");
        hits[0]
    };
    assert_eq!(value("CUDA_R_32F"), cublaslt::CUDA_R_32F as i64);
    assert_eq!(value("CUDA_R_16BF"), cublaslt::CUDA_R_16BF as i64);
    assert_eq!(
        value("CUDA_ERROR_NO_DEVICE"),
        driver::CUDA_ERROR_NO_DEVICE as i64
    );
    assert_eq!(
        value("CUDA_ERROR_NOT_READY"),
        nccl::CUDA_ERROR_NOT_READY as i64
    );
    assert_eq!(value("NCCL_SUCCESS"), nccl::NCCL_SUCCESS as i64);
    assert_eq!(value("NCCL_IN_PROGRESS"), nccl::NCCL_IN_PROGRESS as i64);
    assert_eq!(value("NCCL_FLOAT32"), nccl::NCCL_FLOAT32 as i64);
    assert_eq!(value("NCCL_SUM"), nccl::NCCL_SUM as i64);
    assert_eq!(value("NCCL_AVG"), nccl::NCCL_AVG as i64);
    assert_eq!(
        value("NCCL_UNIQUE_ID_BYTES"),
        nccl::NCCL_UNIQUE_ID_BYTES as i64
    );
    // Every api! struct is the library handle plus one 8-byte function pointer per entry
    // point, so size - 8 * (entry points parsed) is the same for all of them exactly when
    // the parser found every entry point.
    let fns = v["functions"].as_array().unwrap();
    let count = |s: &str| fns.iter().filter(|f| f["struct"] == s).count();
    let handle: Vec<(&str, usize)> = [
        ("DriverApi", size_of::<driver::DriverApi>()),
        ("NvrtcApi", size_of::<nvrtc::NvrtcApi>()),
        ("CublasApi", size_of::<cublas::CublasApi>()),
        ("CublasGemmApi", size_of::<cublas::CublasGemmApi>()),
        ("CublasLtApi", size_of::<cublaslt::CublasLtApi>()),
        ("NcclApi", size_of::<nccl::NcclApi>()),
    ]
    .into_iter()
    .map(|(name, size)| (name, size - 8 * count(name)))
    .collect();
    assert!(
        handle.iter().all(|&(_, h)| h == handle[0].1),
        "entry points missed by the parser: {handle:?} (struct, size minus parsed pointers)"
    );
    assert!(count("DriverApi") >= 30 && count("NcclApi") >= 10);
    let looked_up: Vec<&str> = fns
        .iter()
        .filter(|f| f["struct"].is_null())
        .map(|f| f["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(
        looked_up,
        [
            "cuEventElapsedTime_v2",
            "cuFuncGetName",
            "cuStreamQuery",
            "cuCtxGetDevice"
        ]
    );
}
