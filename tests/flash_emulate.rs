//! The flash-attention kernels (kernels/flash_attention.cu) run on the CPU by the emulator
//! in tools/flash_emulate (g++, one thread per CUDA thread, mma.sync emulated from the
//! documented fragment layouts): the fp32 kernels and the bf16 tensor-core forward and
//! backward against a float64 attention, the bf16 backward also against the fp32 kernels
//! and a float64 model of its own bf16 rounding (tolerances: tools/flash_emulate/main.cpp).
//! Runs the emulator's short case list (`run.sh quick`); `tools/flash_emulate/run.sh` runs
//! them all.
//!
//! Without g++ the test prints "skipped: no g++" and passes; NANOGPT_REQUIRE_EMULATOR=1
//! makes that a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn flash_kernels_pass_the_cpu_emulator() {
    let have_gxx = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_gxx {
        let required = std::env::var("NANOGPT_REQUIRE_EMULATOR").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "no g++, and NANOGPT_REQUIRE_EMULATOR=1 asks for the flash-attention emulator"
        );
        eprintln!("skipped: no g++");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/flash_emulate/run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("quick")
        .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .expect("running tools/flash_emulate/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success() && text.trim_end().ends_with("PASS"),
        "the flash-attention emulator failed (output above; rerun with \
         tools/flash_emulate/run.sh for every case)"
    );
    // The bf16 backward was exercised, with its three gradients checked.
    for part in ["dq", "dk", "dv"] {
        assert!(
            text.contains(&format!("bf16 backward {part}:")),
            "no bf16 backward {part} line:\n{text}"
        );
    }
}
