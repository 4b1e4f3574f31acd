//! The CPU engine against fixtures from an independent float64 PyTorch implementation
//! (tools/make_reference.py): logits, loss, every parameter gradient, and 10 AdamW steps with
//! global-norm clipping.

mod reference;

use nanogpt::engine::cpu::CpuEngine;
use reference::{check_engine, Reference, Tolerances};

/// fp32 against float64: logits to 1e-5, gradients and optimizer results to 1e-4 (of each
/// tensor's largest value).
const CPU: Tolerances = Tolerances {
    logits: 1e-5,
    grads: 1e-4,
};

fn check_fixture(name: &str) {
    let r = Reference::load(name);
    let mut eng = CpuEngine::new(r.cfg.clone(), r.params.clone(), 1, 2).unwrap();
    check_engine(name, &r, &mut eng, &CPU);
}

#[test]
fn matches_pytorch_with_bias() {
    check_fixture("ref_bias.safetensors");
}

#[test]
fn matches_pytorch_without_bias() {
    check_fixture("ref_nobias.safetensors");
}

#[test]
fn matches_pytorch_with_short_sequences() {
    check_fixture("ref_short.safetensors");
}
