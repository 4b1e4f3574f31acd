//! Every kernels/*.cu compiles with NVRTC alone (no toolkit headers), for the GPUs we
//! target, when NVRTC can be found the way `nanogpt doctor` finds it. Without NVRTC the
//! tests print that nothing was checked; NANOGPT_REQUIRE_NVRTC=1 turns that into a failure.

mod common;

use nanogpt::cuda::nvrtc::{Nvrtc, Target};
use nanogpt::cuda::CudaError;
use std::path::{Path, PathBuf};

/// NVRTC, or None after saying that nothing was checked.
fn nvrtc() -> Option<Nvrtc> {
    common::nvrtc::nvrtc("no kernel was compiled, this test checked nothing")
}

fn kernel_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    let Some(n) = nvrtc() else { return };
    let (major, minor) = n.version().unwrap();
    assert!(major >= 11, "NVRTC {major}.{minor}");
    let files = kernel_files();
    assert!(files.iter().any(|f| f.ends_with("doctor.cu")));
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        assert!(
            !src.contains("#include"),
            "{}: kernels bring their own helpers (no headers at run time)",
            f.display()
        );
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        // Every family is compiled with the shared helpers in front (as the engine does).
        let src = format!("{}{src}", nanogpt::engine::cuda::kernels::PRELUDE);
        for target in [
            Target::Cubin { cc: 80 },
            Target::Cubin { cc: 90 },
            Target::Ptx { cc: 80 },
        ] {
            let c = n
                .compile(&src, &name, target, &[])
                .unwrap_or_else(|e| panic!("{name} for {}: {e}", target.describe()));
            assert!(c.image.len() > 100, "{name}: empty image");
            if let Target::Ptx { .. } = target {
                let ptx = String::from_utf8_lossy(&c.image);
                assert!(ptx.contains(".target sm_80"), "{name}: PTX target");
            } else {
                assert_eq!(&c.image[..4], b"\x7fELF", "{name}: a cubin is an ELF file");
            }
        }
        eprintln!("compiled {name} for sm_80, sm_90 (cubin) and compute_80 (PTX) with NVRTC {major}.{minor}");
    }
}

#[test]
fn the_selftest_kernel_has_its_documented_entry_point_and_shuffle() {
    let Some(n) = nvrtc() else { return };
    let c = n
        .compile(
            nanogpt::doctor::DOCTOR_KERNEL,
            "doctor.cu",
            Target::Ptx { cc: 90 },
            &[],
        )
        .unwrap();
    let ptx = String::from_utf8_lossy(&c.image);
    assert!(
        ptx.contains(".entry doctor_selftest("),
        "unmangled entry point"
    );
    assert!(
        ptx.contains("shfl.sync.bfly"),
        "the warp sum uses butterfly shuffles"
    );
    // The doctor's own check, as it runs on a machine without a GPU.
    let check = nanogpt::doctor::nvrtc_compile_check(&n, 90);
    assert_eq!(check.status, nanogpt::doctor::Status::Ok, "{check:?}");
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    let Some(n) = nvrtc() else { return };
    let err = n
        .compile(
            "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
            "broken.cu",
            Target::Cubin { cc: 90 },
            &[],
        )
        .unwrap_err();
    match &err {
        CudaError::Compile { program, log } => {
            assert!(
                program.contains("broken.cu") && program.contains("sm_90"),
                "{program}"
            );
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other}"),
    }
    assert!(!n.supported_archs().unwrap().is_empty());
    assert!(n.supported_archs().unwrap().contains(&90));
}
