//! NVRTC for the tests that compile the kernels, found the way `nanogpt doctor` finds it.

use nanogpt::cuda::discover::{LibKind, SearchEnv, SearchPlan};
use nanogpt::cuda::nvrtc::Nvrtc;

/// NVRTC when it can be found and loaded. Otherwise prints "NVRTC NOT FOUND: `unchecked`
/// (how to install it)" and returns None, or fails under NANOGPT_REQUIRE_NVRTC=1.
pub fn nvrtc(unchecked: &str) -> Option<Nvrtc> {
    let plan = SearchPlan::new(&SearchEnv::from_process());
    let d = plan.find(LibKind::Nvrtc);
    let loaded = d.found.as_ref().and_then(|f| Nvrtc::load(&f.path).ok());
    if loaded.is_none() {
        let msg = format!("NVRTC NOT FOUND: {unchecked} ({})", LibKind::Nvrtc.advice());
        assert!(
            !std::env::var("NANOGPT_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "{msg}"
        );
        eprintln!("{msg}");
    }
    loaded
}
