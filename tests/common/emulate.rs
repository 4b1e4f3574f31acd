//! Running the CPU emulators of the CUDA kernels (tools/*_emulate/run.sh, built with g++):
//! the check for g++ with its "skipped: no g++" message (a failure under
//! NANOGPT_REQUIRE_EMULATOR=1), and one run of an emulator script.

use std::path::Path;
use std::process::Command;

/// Whether g++ runs here. Without it, prints "skipped: no g++" (the caller then returns)
/// unless NANOGPT_REQUIRE_EMULATOR=1, which makes it a failure naming `emulator`.
pub fn have_gxx(emulator: &str) -> bool {
    let have = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let required = std::env::var("NANOGPT_REQUIRE_EMULATOR").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "no g++, and NANOGPT_REQUIRE_EMULATOR=1 asks for {emulator}"
        );
        eprintln!("skipped: no g++");
    }
    have
}

/// Runs `bash <script> <args>` (`script` relative to the source tree) with its build in
/// cargo's temporary directory and prints its output. Returns whether it succeeded with a
/// last line "PASS", and its stdout followed by its stderr.
pub fn run(script: &str, args: &[&str]) -> (bool, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (
        out.status.success() && text.trim_end().ends_with("PASS"),
        text,
    )
}
