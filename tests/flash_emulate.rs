//! The flash-attention kernels (kernels/flash_attention.cu) run on the CPU by the emulator
//! in tools/flash_emulate (g++, one thread per CUDA thread, mma.sync emulated from the
//! documented fragment layouts): the fp32 kernels and the bf16 tensor-core forward and
//! backward against a float64 attention, the bf16 backward also against the fp32 kernels
//! and a float64 model of its own bf16 rounding (tolerances: tools/flash_emulate/main.cpp),
//! and the bf16-storage (io) kernels bit for bit against the fp32-storage bf16 kernels and
//! against their forms with synchronous tile loads, under three schedules of the cp.async
//! copies and the warps (tools/flash_emulate/run.sh).
//! Runs the emulator's short case list (`run.sh quick`); `tools/flash_emulate/run.sh` runs
//! them all.
//!
//! Without g++ the test prints "skipped: no g++" and passes; NANOGPT_REQUIRE_EMULATOR=1
//! makes that a failure.

mod common;

use common::emulate;

#[test]
fn flash_kernels_pass_the_cpu_emulator() {
    if !emulate::have_gxx("the flash-attention emulator") {
        return;
    }
    let (passed, text) = emulate::run("tools/flash_emulate/run.sh", &["quick"]);
    assert!(
        passed,
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
    // The bf16-storage (io) kernels were checked bit for bit against the fp32-storage ones.
    assert!(
        text.contains("bf16 storage (io kernels):"),
        "no bf16 storage line:\n{text}"
    );
    // The cp.async tile loads were checked against synchronous ones, under each of the
    // three schedules of copies and warps (run.sh).
    assert!(
        text.contains("synchronous tile loads (io_sync kernels):"),
        "no synchronous tile loads line:\n{text}"
    );
    for schedule in ["schedule 1/3", "schedule 2/3", "schedule 3/3"] {
        assert!(text.contains(schedule), "{schedule} did not run:\n{text}");
    }
}
