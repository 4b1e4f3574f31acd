//! The CUDA engine (float32) against the CPU reference engine and the float64 PyTorch
//! fixtures of tools/make_reference.py: logits, loss, every parameter gradient, 10 AdamW
//! steps with clipping, dropout (identical masks), gradients edited through `grads_mut`,
//! and decoding. The bf16 mixed-precision mode against the CPU engine, with the tolerances
//! explained at [`BF16`]. Training on the GPU against itself: the same bits every run, and
//! an engine rebuilt from another's state continuing bit for bit (what resume relies on).
//!
//! Tolerances: errors are measured per tensor as max |a - b| / max |b| (relative to the
//! tensor's scale). Both engines compute in fp32 (unit roundoff 6e-8) but sum in different
//! orders (warp/block reductions, cuBLAS blocking, FMA contraction), so results differ in
//! the last bits; through a few layers and reductions of at most a few thousand terms that stays below ~1e-6 of scale. 1e-4 leaves
//! two orders of magnitude of headroom and still catches any indexing, masking or formula
//! mistake, which shows up as an O(1) error. The same bound is what the CPU engine meets
//! against the float64 reference (tests/engine_reference.rs).
//!
//! Without a GPU (or driver, NVRTC, cuBLAS) every GPU test prints "skipped: no GPU (why)"
//! and passes; NANOGPT_REQUIRE_GPU=1 makes that a failure. The tests that need only NVRTC
//! (kernel entry points) run wherever NVRTC is installed.

mod common;
mod reference;

use common::gpu::no_gpu;
use common::model::{perturbed_params, random_batch};
use common::{prepare_data, tiny_train_args, train};
use nanogpt::config::{DeviceSpec, Dtype};
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::cuda::switches::{self, Switches};
use nanogpt::engine::cuda::{kernels, stack, CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use nanogpt::train::checkpoint;
use reference::{check_engine, cosine, rel, rel_err, rel_l2, Reference, Tolerances};

const TOL: f64 = 1e-4;

/// Every tensor of `got` within TOL of `want` (both in the layout).
fn check_tensors(what: &str, layout: &ParamLayout, got: &[f32], want: &[f32]) {
    let mut worst = (0f64, String::new());
    for t in &layout.tensors {
        let r = t.offset..t.offset + t.len;
        let e = rel_err(&got[r.clone()], &want[r]);
        assert!(e < TOL, "{what}: {} relative error {e:.2e}", t.name);
        if e > worst.0 {
            worst = (e, t.name.clone());
        }
    }
    eprintln!("{what}: worst relative error {:.2e} ({})", worst.0, worst.1);
}

/// The key third of each attention's qkv bias, as ranges of the layout. Its gradient is
/// zero in exact arithmetic (a key bias adds `q . b_k` to every score of a query row, and
/// softmax ignores a shift shared by the whole row), so what either engine computes there
/// is rounding noise, and AdamW's normalised update `m / (sqrt(v) + eps)` turns noise into
/// steps of up to a few `lr` whose signs differ between engines.
fn key_bias_ranges(layout: &ParamLayout, c: usize) -> Vec<std::ops::Range<usize>> {
    layout
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("attn.c_attn.bias"))
        .map(|t| t.offset + c..t.offset + 2 * c)
        .collect()
}

/// The key biases' gradients are at the rounding-noise level (what [`key_bias_ranges`]
/// rests on): at most 1e-5 of the largest gradient of the same bias tensor.
fn check_key_bias_grads_vanish(what: &str, layout: &ParamLayout, c: usize, grads: &[f32]) {
    for r in key_bias_ranges(layout, c) {
        let whole = r.start - c..r.start + 2 * c;
        let scale = grads[whole].iter().fold(0f32, |m, g| m.max(g.abs()));
        let key = grads[r].iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(
            key <= 1e-5 * scale,
            "{what}: key bias gradient {key:.2e} is not noise next to {scale:.2e}"
        );
    }
}

/// Parameters after `steps` AdamW steps (betas of `hp`) at learning rate `lr`: every
/// tensor within TOL, the key biases (see [`key_bias_ranges`]) compared outside their key
/// third, which only has to stay within the distance two noise-driven trajectories can
/// drift apart. Adam moves a parameter by at most lr x max(1, (1 - beta1) / sqrt(1 -
/// beta2)) per step (Kingma and Ba, section 2.1; 1 for torch's and nanoGPT's betas), and
/// decoupled weight decay moves both engines alike, so they differ by at most twice that
/// per step.
fn check_trained_params(
    what: &str,
    layout: &ParamLayout,
    c: usize,
    got: &[f32],
    want: &[f32],
    (steps, lr, hp): (usize, f32, &AdamWConfig),
) {
    let keys = key_bias_ranges(layout, c);
    let in_key = |i: usize| keys.iter().any(|r| r.contains(&i));
    let per_step = ((1.0 - hp.beta1) / (1.0 - hp.beta2).sqrt()).max(1.0);
    // 1% over the bound: the parameters themselves differ by rounding.
    let drift = 2.0 * per_step * steps as f32 * lr * 1.01;
    let mut worst = (0f64, String::new());
    for t in &layout.tensors {
        let r = t.offset..t.offset + t.len;
        let scale = want[r.clone()]
            .iter()
            .fold(0f64, |m, w| m.max(w.abs() as f64));
        let mut err = 0f64;
        for i in r {
            let d = (got[i] - want[i]).abs();
            if in_key(i) {
                assert!(
                    d <= drift,
                    "{what}: {} key bias element {i} differs by {d:.2e} (bound {drift:.2e})",
                    t.name
                );
            } else {
                err = err.max(d as f64);
            }
        }
        let e = err / scale.max(1e-30);
        assert!(e < TOL, "{what}: {} relative error {e:.2e}", t.name);
        if e > worst.0 {
            worst = (e, t.name.clone());
        }
    }
    eprintln!("{what}: worst relative error {:.2e} ({})", worst.0, worst.1);
}

// ------------------------------------------------------------------ PyTorch fixtures

/// fp32 against fp32 and float64 alike (see the module docs).
const CUDA: Tolerances = Tolerances {
    logits: TOL,
    grads: TOL,
};

fn check_fixture(name: &str) {
    let r = Reference::load(name);
    let mut eng = CudaEngine::new(r.cfg.clone(), r.params.clone(), 1, 0).unwrap();
    check_engine(name, &r, &mut eng, &CUDA);
}

#[test]
fn matches_pytorch_fixtures() {
    if no_gpu("matches_pytorch_fixtures") {
        return;
    }
    for name in [
        "ref_bias.safetensors",
        "ref_nobias.safetensors",
        "ref_short.safetensors",
    ] {
        check_fixture(name);
    }
}

// ------------------------------------------------------------------ CPU vs CUDA

/// The optimisations `NANOGPT_CUDA_DISABLE` leaves on (all by default), as the engine's
/// own constructors read them: the tests below honour the variable, for debugging.
fn env_switches() -> Switches {
    Switches::from_env().unwrap_or_else(|e| panic!("NANOGPT_CUDA_DISABLE: {e}"))
}

/// Both engines over the same perturbed parameters (the CUDA engine in `precision` with
/// `switches`), plus a batch with ignored targets.
fn pair(
    cfg: &GptConfig,
    seed: u64,
    precision: Precision,
    switches: Switches,
) -> (CpuEngine, CudaEngine, Vec<u32>, Vec<i32>, usize, usize) {
    let params = perturbed_params(cfg, seed);
    let cpu = CpuEngine::new(cfg.clone(), params.clone(), seed, 2).unwrap();
    let gpu = CudaEngine::with_switches(cfg.clone(), params, seed, 0, precision, switches)
        .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}, {switches:?}): {e}"));
    let (b, t) = (3, cfg.block_size);
    let (inputs, targets) = random_batch(cfg, b, t, seed);
    (cpu, gpu, inputs, targets, b, t)
}

/// Zeroes both engines' gradients and accumulates two micro-batches (loss_scale 0.5) on
/// each, with `check(gpu loss, cpu loss)` after each.
fn accumulate_two(
    cpu: &mut CpuEngine,
    gpu: &mut CudaEngine,
    batch: Batch,
    check: impl Fn(f32, f32),
) {
    cpu.zero_grad();
    gpu.zero_grad();
    for _ in 0..2 {
        let lc = cpu.forward_backward(batch, 0.5).unwrap();
        let lg = gpu.forward_backward(batch, 0.5).unwrap();
        check(lg, lc);
    }
}

/// The learning rate and hyperparameters of [`ten_steps`]: weight decay, clipping active.
const TEN_STEPS_LR: f32 = 1e-3;
fn ten_steps_config() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.1,
        grad_clip: 0.5,
        ..Default::default()
    }
}

/// 10 AdamW steps with clipping active on both engines, with `check(step, (gpu loss, cpu
/// loss), (gpu norm, cpu norm))` after each.
fn ten_steps(
    cpu: &mut CpuEngine,
    gpu: &mut CudaEngine,
    batch: Batch,
    check: impl Fn(usize, (f32, f32), (f32, f32)),
) {
    let hp = ten_steps_config();
    for k in 0..10 {
        cpu.zero_grad();
        gpu.zero_grad();
        let lc = cpu.forward_backward(batch, 1.0).unwrap();
        let lg = gpu.forward_backward(batch, 1.0).unwrap();
        let nc = cpu.step(&hp, TEN_STEPS_LR);
        let ng = gpu.step(&hp, TEN_STEPS_LR);
        check(k, (lg, lc), (ng, nc));
    }
}

fn compare_training(cfg: GptConfig, label: &str, switches: Switches) {
    let (mut cpu, mut gpu, inputs, targets, b, t) = pair(&cfg, 7, Precision::F32, switches);
    let layout = ParamLayout::new(&cfg);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let e = rel_err(&gpu.logits(batch).unwrap(), &cpu.logits(batch).unwrap());
    assert!(e < TOL, "{label}: logits error {e:.2e}");
    let (lc, lg) = (cpu.loss(batch).unwrap(), gpu.loss(batch).unwrap());
    assert!(
        ((lg - lc) / lc).abs() < 1e-5,
        "{label}: eval loss {lg} vs {lc}"
    );

    // One accumulation of two micro-batches (loss_scale 0.5), then compare every gradient.
    accumulate_two(&mut cpu, &mut gpu, batch, |lg, lc| {
        assert!(
            ((lg - lc) / lc).abs() < 1e-5,
            "{label}: train loss {lg} vs {lc}"
        );
    });
    check_tensors(
        &format!("{label} gradients"),
        &layout,
        &gpu.grads(),
        &cpu.grads(),
    );
    check_key_bias_grads_vanish(label, &layout, cfg.n_embd, &cpu.grads());
    assert_eq!(gpu.rng_state(), cpu.rng_state(), "same dropout draws");

    ten_steps(&mut cpu, &mut gpu, batch, |k, (lg, lc), (ng, nc)| {
        assert!(
            ((lg - lc) / lc).abs() < TOL as f32,
            "{label} step {k}: loss {lg} vs {lc}"
        );
        assert!(
            ((ng - nc) / nc).abs() < TOL as f32,
            "{label} step {k}: norm {ng} vs {nc}"
        );
    });
    check_trained_params(
        &format!("{label} params after 10 steps"),
        &layout,
        cfg.n_embd,
        &gpu.params(),
        &cpu.params(),
        (10, TEN_STEPS_LR, &ten_steps_config()),
    );
    let (sc, sg) = (cpu.optimizer_state(), gpu.optimizer_state());
    assert_eq!(sc.step, sg.step);
    check_tensors(&format!("{label} AdamW m"), &layout, &sg.m, &sc.m);
}

#[test]
fn training_matches_the_cpu_engine() {
    if no_gpu("training_matches_the_cpu_engine") {
        return;
    }
    // n_embd 48 over 3 heads (hs 16), vocab 67 padded to 128, T 12.
    compare_training(
        GptConfig::new(2, 3, 48, 12, 67, true, 0.0).unwrap(),
        "bias",
        env_switches(),
    );
    compare_training(
        GptConfig::new(2, 3, 48, 12, 67, false, 0.0).unwrap(),
        "no bias",
        env_switches(),
    );
}

#[test]
fn dropout_matches_the_cpu_engine() {
    if no_gpu("dropout_matches_the_cpu_engine") {
        return;
    }
    compare_training(
        GptConfig::new(2, 2, 32, 10, 50, true, 0.2).unwrap(),
        "dropout 0.2",
        env_switches(),
    );
}

#[test]
fn gradients_edited_on_the_host_are_used_by_step() {
    if no_gpu("gradients_edited_on_the_host_are_used_by_step") {
        return;
    }
    let cfg = GptConfig::new(1, 2, 16, 8, 30, true, 0.0).unwrap();
    let (mut cpu, mut gpu, inputs, targets, b, t) = pair(&cfg, 3, Precision::F32, env_switches());
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let hp = AdamWConfig::default();
    for e in [&mut cpu as &mut dyn Engine, &mut gpu] {
        e.zero_grad();
        e.forward_backward(batch, 1.0).unwrap();
        // What an all-reduce over two identical ranks followed by averaging would do.
        e.grads_mut().iter_mut().for_each(|g| *g *= 3.0);
    }
    let e = rel_err(&gpu.grads(), &cpu.grads());
    assert!(e < TOL, "grads after host edit: {e:.2e}");
    let (nc, ng) = (cpu.step(&hp, 1e-3), gpu.step(&hp, 1e-3));
    assert!(((ng - nc) / nc).abs() < TOL as f32, "norm {ng} vs {nc}");
    check_trained_params(
        "params after host-edited step",
        cpu.layout(),
        cfg.n_embd,
        &gpu.params(),
        &cpu.params(),
        (1, 1e-3, &hp),
    );
}

/// The optimizer step leaves the clipped gradients unwritten on the GPU and keeps the
/// factor: read after the step they are the clipped ones, bit for bit the pre-step
/// gradients times clip_grad_norm_'s factor, on the host (`grads`, `grads_mut`) and on the
/// device (a micro-step accumulating onto them, a second step), as on the CPU engine.
#[test]
fn gradients_read_after_a_clipped_step_are_clipped() {
    if no_gpu("gradients_read_after_a_clipped_step_are_clipped") {
        return;
    }
    let cfg = GptConfig::new(1, 2, 16, 8, 30, true, 0.0).unwrap();
    let (mut cpu, mut gpu, inputs, targets, b, t) = pair(&cfg, 5, Precision::F32, env_switches());
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let hp = ten_steps_config();
    for e in [&mut cpu as &mut dyn Engine, &mut gpu] {
        e.zero_grad();
        e.forward_backward(batch, 1.0).unwrap();
    }
    let before = gpu.grads();
    let (nc, ng) = (cpu.step(&hp, 1e-3), gpu.step(&hp, 1e-3));
    assert!(((ng - nc) / nc).abs() < TOL as f32, "norm {ng} vs {nc}");
    let clip = nanogpt::optim::adamw::clip_coef(ng, hp.grad_clip).expect("clipping is active");
    assert!(
        clip < 0.9,
        "the test needs real clipping, got a factor of {clip}"
    );
    let after = gpu.grads();
    let want: Vec<f32> = before.iter().map(|g| g * clip).collect();
    assert!(
        after
            .iter()
            .zip(&want)
            .all(|(a, w)| a.to_bits() == w.to_bits()),
        "gradients after the step are not the pre-step ones times {clip}"
    );
    assert_eq!(rel_err(gpu.grads_mut(), &want), 0.0);
    let e = rel_err(&after, &cpu.grads());
    assert!(e < TOL, "clipped grads against the CPU engine: {e:.2e}");
    // Accumulating onto them without zero_grad, and stepping again, on both engines: once
    // after `grads_mut` (uploaded from the host), once with the factor pending on the GPU.
    for round in 0..2 {
        for e in [&mut cpu as &mut dyn Engine, &mut gpu] {
            e.forward_backward(batch, 1.0).unwrap();
        }
        let e = rel_err(&gpu.grads(), &cpu.grads());
        assert!(
            e < TOL,
            "round {round}: accumulated onto clipped grads: {e:.2e}"
        );
        let (nc, ng) = (cpu.step(&hp, 1e-3), gpu.step(&hp, 1e-3));
        assert!(
            ((ng - nc) / nc).abs() < TOL as f32,
            "round {round}: norm {ng} vs {nc}"
        );
        let e = rel_err(&gpu.grads(), &cpu.grads());
        assert!(
            e < TOL,
            "round {round}: grads after the second step: {e:.2e}"
        );
    }
    check_trained_params(
        "params after three clipped steps",
        cpu.layout(),
        cfg.n_embd,
        &gpu.params(),
        &cpu.params(),
        (3, 1e-3, &hp),
    );
}

#[test]
fn decoding_matches_the_cpu_engine() {
    if no_gpu("decoding_matches_the_cpu_engine") {
        return;
    }
    let cfg = GptConfig::new(2, 2, 32, 16, 40, true, 0.0).unwrap();
    let (mut cpu, mut gpu, _, _, _, _) = pair(&cfg, 11, Precision::F32, env_switches());
    let prompt: Vec<u32> = vec![1, 5, 9, 2, 7, 7];
    let lc = cpu.decode_prefill(&prompt, 2).unwrap();
    let lg = gpu.decode_prefill(&prompt, 2).unwrap();
    assert_eq!(lg.len(), 2 * cfg.vocab_size);
    assert!(rel_err(&lg, &lc) < TOL, "prefill logits");
    for k in 0..8u32 {
        let toks = [k % 40, (3 * k + 1) % 40];
        let lc = cpu.decode_step(&toks).unwrap();
        let lg = gpu.decode_step(&toks).unwrap();
        let e = rel_err(&lg, &lc);
        assert!(e < TOL, "decode step {k}: error {e:.2e}");
        assert_eq!(gpu.decode_len(), cpu.decode_len());
    }
    assert_eq!(gpu.decode_len(), 11);
    // From an empty cache, and running into block_size.
    gpu.decode_reset(1);
    cpu.decode_reset(1);
    for k in 0..16u32 {
        let e = rel_err(
            &gpu.decode_step(&[k]).unwrap(),
            &cpu.decode_step(&[k]).unwrap(),
        );
        assert!(e < TOL, "decode from empty, step {k}: {e:.2e}");
    }
    assert!(gpu.decode_step(&[0]).is_err(), "past block_size");
    assert!(gpu.decode_step(&[0, 1]).is_err(), "wrong number of tokens");
}

// ------------------------------------------------------------------ bf16 vs CPU

/// Tolerances of the bf16 mode against the (fp32) CPU engine.
///
/// bf16 keeps 8 significant bits: rounding an operand costs up to u = 2^-8 = 3.9e-3 of its
/// value, about u/sqrt(3) = 2.3e-3 RMS. A product rounds both operands and accumulates in
/// fp32, so each output moves by about sqrt(2/3) u = 3e-3 of the RMS size of its terms,
/// independently of the reduction length k (independent rounding errors add in quadrature,
/// like the terms themselves); errors of successive layers, and of dX feeding dW in the
/// backward pass, add up to around 1e-2 in the gradients. tools/bf16_tolerance.py models
/// exactly the rounding this engine does (bf16 GEMM operands, everything else exact) on
/// these tests' shapes; its worst case over 20 seeds:
///
/// | quantity                          | measured  | bound  |
/// |-----------------------------------|-----------|--------|
/// | logits, relative L2               | 6.5e-3    | 2e-2   |
/// | loss, relative                    | 3.5e-4    | 5e-3   |
/// | any gradient tensor, relative L2  | 1.5e-2    | 4e-2   |
/// | any gradient tensor, cosine       | 0.99989   | 0.999  |
/// | loss over 10 AdamW steps, rel.    | 8.9e-4    | 5e-3   |
/// | any parameter after 10 steps, L2  | 4.1e-3    | 1.5e-2 |
///
/// Attention runs on the bf16 tensor-core flash kernels, forward and backward, in these
/// tests (head size 16). tools/flash_emulate/attention_tolerance.py adds their rounding to
/// the model (q, k, v, P in the forward; dy, v, P, dS, q, k as backward product operands);
/// worst over the same 20 seeds: logits 7.0e-3, loss 2.4e-4, gradients 1.3e-2 and cosine
/// 0.99992, loss over 10 steps 1.1e-3 (all within the bounds above), and parameters after
/// 10 steps 3.0e-2 (worst tensor: the qkv bias). The key bias has an exact gradient of 0
/// (softmax is shift-invariant), but dS rounded to bf16 no longer sums to 0 over a row, so
/// it receives rounding noise, which AdamW's normalisation turns into steps of up to lr;
/// the parameter bound is therefore 6e-2 (2x headroom), not 1.5e-2.
///
/// The bounds leave 2x or more of headroom; an indexing, transpose or stride mistake, or
/// a stale bf16 parameter copy, moves these by O(1) (relative L2 near 1, cosine far from 1).
struct Bf16Tol {
    logits: f64,
    loss: f64,
    grads: f64,
    cosine: f64,
    params: f64,
}

const BF16: Bf16Tol = Bf16Tol {
    logits: 2e-2,
    loss: 5e-3,
    grads: 4e-2,
    cosine: 0.999,
    params: 6e-2,
};

/// Every tensor within `tol` relative L2 (and, when given, `cos` cosine) of `want`.
fn check_tensors_l2(
    what: &str,
    layout: &ParamLayout,
    got: &[f32],
    want: &[f32],
    tol: f64,
    cos: Option<f64>,
) {
    let (mut worst, mut worst_cos) = ((0f64, String::new()), (1f64, String::new()));
    for t in &layout.tensors {
        let r = t.offset..t.offset + t.len;
        let e = rel_l2(&got[r.clone()], &want[r.clone()]);
        assert!(
            e < tol,
            "{what}: {} relative L2 error {e:.2e} (bound {tol:.0e})",
            t.name
        );
        if e > worst.0 {
            worst = (e, t.name.clone());
        }
        if let Some(bound) = cos {
            let c = cosine(&got[r.clone()], &want[r]);
            assert!(
                c > bound,
                "{what}: {} cosine {c:.6} (bound {bound})",
                t.name
            );
            if c < worst_cos.0 {
                worst_cos = (c, t.name.clone());
            }
        }
    }
    eprintln!(
        "{what}: worst relative L2 {:.2e} ({}), lowest cosine {:.6} ({})",
        worst.0, worst.1, worst_cos.0, worst_cos.1
    );
}

/// Whether the emulated cuBLASLt (tools/gpu_emulate) was told to offer no bf16 algorithm
/// (`GPU_EMULATE_LT_NO_BF16=1`, the second pass of scripts/emulated_gpu_tests.sh), so that
/// every bf16 product takes the engine's fp32 fallback, as on a GPU whose cuBLASLt cannot
/// run a shape. Never set on a real GPU.
fn lt_offers_no_bf16() -> bool {
    std::env::var("GPU_EMULATE_LT_NO_BF16").is_ok_and(|v| v == "1")
}

fn bf16_engine(cfg: &GptConfig, params: Vec<f32>, seed: u64) -> CudaEngine {
    CudaEngine::with_precision(cfg.clone(), params, seed, 0, Precision::Bf16)
        .unwrap_or_else(|e| panic!("bf16 engine: {e}"))
}

/// The bf16 engine and the CPU engine over `pair`'s parameters and batch.
fn compare_bf16(cfg: GptConfig, label: &str, all_on_lt: bool, switches: Switches) {
    let (mut cpu, mut gpu, inputs, targets, b, t) = pair(&cfg, 7, Precision::Bf16, switches);
    assert_eq!(gpu.precision(), Precision::Bf16);
    assert!(gpu.device_name().contains("bf16"), "{}", gpu.device_name());
    let layout = ParamLayout::new(&cfg);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let (lg, lc) = (gpu.logits(batch).unwrap(), cpu.logits(batch).unwrap());
    let (e, c) = (rel_l2(&lg, &lc), cosine(&lg, &lc));
    eprintln!("{label}: logits relative L2 {e:.2e}, cosine {c:.6}");
    assert!(
        e < BF16.logits && c > BF16.cosine,
        "{label}: logits relative L2 {e:.2e} (bound {:.0e}), cosine {c:.6}",
        BF16.logits
    );
    let (lc, lg) = (cpu.loss(batch).unwrap(), gpu.loss(batch).unwrap());
    assert!(rel(lg, lc) < BF16.loss, "{label}: eval loss {lg} vs {lc}");

    accumulate_two(&mut cpu, &mut gpu, batch, |lg, lc| {
        assert!(rel(lg, lc) < BF16.loss, "{label}: train loss {lg} vs {lc}");
    });
    check_tensors_l2(
        &format!("{label} bf16 gradients"),
        &layout,
        &gpu.grads(),
        &cpu.grads(),
        BF16.grads,
        Some(BF16.cosine),
    );
    assert_eq!(gpu.rng_state(), cpu.rng_state(), "same dropout draws");

    ten_steps(&mut cpu, &mut gpu, batch, |k, (lg, lc), (ng, nc)| {
        assert!(
            rel(lg, lc) < BF16.loss,
            "{label} step {k}: loss {lg} vs {lc} (relative bound {:.0e})",
            BF16.loss
        );
        assert!(
            rel(ng, nc) < BF16.grads,
            "{label} step {k}: norm {ng} vs {nc}"
        );
    });
    check_tensors_l2(
        &format!("{label} bf16 params after 10 steps"),
        &layout,
        &gpu.params(),
        &cpu.params(),
        BF16.params,
        None,
    );
    let (planned, fallbacks) = gpu.lt_plan_counts();
    eprintln!(
        "{label}: {planned} product shapes on cuBLASLt, fp32 fallbacks: {:?}",
        gpu.gemm_fallbacks()
    );
    if lt_offers_no_bf16() {
        // Every product took the fp32 fallback (bf16-only LayerNorm outputs widened first).
        assert_eq!(planned, 0, "{label}: products ran on cuBLASLt in bf16");
        assert!(fallbacks > 0, "{label}: no product fell back to fp32");
        return;
    }
    assert!(planned > 0, "{label}: no product ran on cuBLASLt");
    if all_on_lt {
        assert_eq!(
            fallbacks,
            0,
            "{label}: every dimension is a multiple of 8, yet products fell back to fp32: {:?}",
            gpu.gemm_fallbacks()
        );
    }
}

#[test]
fn bf16_training_tracks_the_cpu_engine() {
    if no_gpu("bf16_training_tracks_the_cpu_engine") {
        return;
    }
    // n_embd 64 over 4 heads, vocab 96, T 16: every leading dimension a multiple of 8.
    compare_bf16(
        GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap(),
        "bf16 aligned",
        true,
        env_switches(),
    );
    // Odd vocabulary (67) and n_embd 48: unaligned bf16 rows.
    compare_bf16(
        GptConfig::new(2, 3, 48, 12, 67, true, 0.0).unwrap(),
        "bf16 odd vocab",
        false,
        env_switches(),
    );
    compare_bf16(
        GptConfig::new(2, 3, 48, 12, 67, false, 0.0).unwrap(),
        "bf16 no bias",
        false,
        env_switches(),
    );
}

/// Requirement of every optimisation: the engine still tracks the CPU engine with it
/// turned off. Each switch off in turn (and all of them off), in fp32 (the fp32 bounds)
/// and in bf16 (the bf16 bounds), over a model whose every dimension is a multiple of 8
/// (so every bf16 path applies: fused bf16 attention at head size 16, cuBLASLt epilogues),
/// without dropout (attention dropout would take the plain attention path, leaving the fused
/// one unswept; `dropout_matches_the_cpu_engine` covers dropout).
#[test]
fn every_optimisation_switched_off_still_tracks_the_cpu_engine() {
    if no_gpu("every_optimisation_switched_off_still_tracks_the_cpu_engine") {
        return;
    }
    assert_eq!(
        switches::NAMES.len(),
        16,
        "a switch was added: it is swept here"
    );
    for name in switches::NAMES {
        let off = Switches::parse(name).expect("a known switch");
        compare_training(
            GptConfig::new(2, 3, 48, 12, 67, true, 0.0).unwrap(),
            &format!("fp32, {name} off"),
            off,
        );
        compare_bf16(
            GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap(),
            &format!("bf16, {name} off"),
            true,
            off,
        );
    }
}

/// A batch of 4 x 16 positions over 8 tokens (each 8 times, spread over the batch) for a
/// model with a vocabulary of 96 or more.
fn repeated_tokens() -> (Vec<u32>, Vec<i32>, usize, usize) {
    let (b, t) = (4, 16);
    let inputs = (0..b * t).map(|i| (i * 5 % 8) as u32).collect();
    let targets = (0..b * t).map(|i| (i * 3 % 96) as i32).collect();
    (inputs, targets, b, t)
}

/// `steps` AdamW steps (weight decay, clipping) of two accumulated micro-steps each; the
/// bits of every loss and gradient norm.
fn train_steps(e: &mut CudaEngine, batch: Batch, steps: usize) -> Vec<u32> {
    let hp = ten_steps_config();
    let mut scalars = Vec::new();
    for _ in 0..steps {
        e.zero_grad();
        for _ in 0..2 {
            scalars.push(e.forward_backward(batch, 0.5).unwrap().to_bits());
        }
        scalars.push(e.step(&hp, TEN_STEPS_LR).to_bits());
    }
    scalars
}

/// The number of parameters whose bits differ between two engines.
fn params_differing(a: &CudaEngine, b: &CudaEngine) -> usize {
    let (pa, pb) = (a.params(), b.params());
    pa.iter()
        .zip(&pb)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// Training on the GPU gives the same bits every run: two engines over the same
/// parameters, three steps over a batch in which every token repeats, compared bit for bit
/// (losses, gradient norms, parameters), in fp32 and bf16. It fails for any kernel whose
/// result depends on the order its blocks run in (atomics adding into one place): on a GPU,
/// and on the emulated one, which runs each launch's blocks first to last or last to first
/// (with the token-embedding gradient's former atomics, both this test and the next fail
/// there).
#[test]
fn training_gives_the_same_bits_every_run() {
    if no_gpu("training_gives_the_same_bits_every_run") {
        return;
    }
    let cfg = GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap();
    let (inputs, targets, b, t) = repeated_tokens();
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let engine = || {
            CudaEngine::with_switches(
                cfg.clone(),
                perturbed_params(&cfg, 5),
                5,
                0,
                precision,
                env_switches(),
            )
            .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}): {e}"))
        };
        let (mut first, mut second) = (engine(), engine());
        assert_eq!(
            train_steps(&mut first, batch, 3),
            train_steps(&mut second, batch, 3),
            "{precision:?}: losses and gradient norms differ between two identical runs"
        );
        let differ = params_differing(&first, &second);
        assert_eq!(
            differ, 0,
            "{precision:?}: {differ} parameters differ between two identical runs"
        );
    }
}

/// What `init_from=resume` relies on: an engine rebuilt from another's parameters, AdamW
/// moments and step count, and dropout generator state continues bit for bit as the
/// original would have (fp32 and bf16, dropout on).
#[test]
fn a_rebuilt_engine_continues_bit_for_bit() {
    if no_gpu("a_rebuilt_engine_continues_bit_for_bit") {
        return;
    }
    let cfg = GptConfig::new(2, 4, 64, 16, 96, true, 0.1).unwrap();
    let (inputs, targets, b, t) = repeated_tokens();
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let engine = |params: Vec<f32>| {
            CudaEngine::with_switches(cfg.clone(), params, 5, 0, precision, env_switches())
                .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}): {e}"))
        };
        let mut whole = engine(perturbed_params(&cfg, 5));
        let uninterrupted = train_steps(&mut whole, batch, 4);
        let mut before = engine(perturbed_params(&cfg, 5));
        let mut resumed_run = train_steps(&mut before, batch, 2);
        let mut after = engine(before.params());
        after.set_optimizer_state(before.optimizer_state());
        after.set_rng_state(before.rng_state());
        drop(before);
        resumed_run.extend(train_steps(&mut after, batch, 2));
        assert_eq!(
            resumed_run, uninterrupted,
            "{precision:?}: the rebuilt engine's losses and gradient norms differ"
        );
        let differ = params_differing(&after, &whole);
        assert_eq!(
            differ, 0,
            "{precision:?}: {differ} parameters differ after the rebuilt engine's steps"
        );
    }
}

/// `nanogpt train --device=cuda` interrupted at a checkpoint and resumed with
/// `init_from=resume` repeats the uninterrupted run bit for bit (every training loss and
/// evaluation, the final weights and AdamW state), in fp32 and bf16, with dropout and
/// gradient accumulation on, as tests/train_resume.rs checks on the CPU.
#[test]
fn a_resumed_gpu_run_repeats_the_uninterrupted_one() {
    if no_gpu("a_resumed_gpu_run_repeats_the_uninterrupted_one") {
        return;
    }
    const K: u64 = 4;
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    for dtype in ["float32", "bfloat16"] {
        let args = |out: &std::path::Path, max_iters: u64, init_from: &str| {
            let (max, eval, init, dt) = (
                format!("--max_iters={max_iters}"),
                format!("--eval_interval={K}"),
                format!("--init_from={init_from}"),
                format!("--dtype={dtype}"),
            );
            let extra = [
                max.as_str(),
                eval.as_str(),
                init.as_str(),
                dt.as_str(),
                "--device=cuda",
                "--dropout=0.1",
                "--gradient_accumulation_steps=2",
                "--grad_clip=1.0",
                "--weight_decay=0.1",
            ];
            tiny_train_args(&data, out, &extra)
        };
        let (straight_dir, split_dir) = (root.path().join(dtype), root.path().join("split"));
        let _ = std::fs::remove_dir_all(&split_dir);
        let straight = train(&args(&straight_dir, 2 * K, "scratch")).unwrap();
        let first = train(&args(&split_dir, K, "scratch")).unwrap();
        let resumed = train(&args(&split_dir, 2 * K, "resume")).unwrap();
        let bits = |l: &[(u64, f32)]| l.iter().map(|&(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
        let mut split_losses = bits(&first.losses);
        split_losses.retain(|&(i, _)| i < K);
        split_losses.extend(bits(&resumed.losses));
        assert_eq!(
            split_losses,
            bits(&straight.losses),
            "{dtype}: training losses of the interrupted and resumed run"
        );
        let eval_bits = |e: &[(u64, f32, f32)]| {
            e.iter()
                .map(|&(i, t, v)| (i, t.to_bits(), v.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            eval_bits(&resumed.evals),
            eval_bits(&straight.evals[1..]),
            "{dtype}: evaluations from iteration {K} on"
        );
        let a = checkpoint::load(&straight_dir.join("ckpt.safetensors"), true).unwrap();
        let b = checkpoint::load(&split_dir.join("ckpt.safetensors"), true).unwrap();
        assert_eq!(a.state.iter_num, 2 * K);
        assert_eq!(a.params, b.params, "{dtype}: weights differ after resume");
        assert_eq!(
            a.optimizer, b.optimizer,
            "{dtype}: AdamW state differs after resume"
        );
    }
}

#[test]
fn bf16_master_weights_round_trip_exactly() {
    if no_gpu("bf16_master_weights_round_trip_exactly") {
        return;
    }
    let cfg = GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap();
    let (_, fp32, inputs, targets, b, t) = pair(&cfg, 5, Precision::F32, env_switches());
    let params = fp32.params();
    drop(fp32);
    // Values bf16 cannot hold: the fp32 master copy must keep every bit.
    assert!(params.iter().any(|x| x.to_bits() & 0xffff != 0));
    let mut gpu = bf16_engine(&cfg, params.clone(), 5);
    assert_eq!(gpu.params(), params, "params() right after construction");
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    gpu.zero_grad();
    gpu.forward_backward(batch, 1.0).unwrap();
    gpu.step(&AdamWConfig::default(), 1e-3);
    let stepped = gpu.params();
    assert_ne!(stepped, params, "the step moved the parameters");
    // set_params / params round trip is bit-exact, and refreshes the bf16 copy: the logits
    // equal those of a fresh engine built over the same parameters.
    let mut other = params.clone();
    other.iter_mut().step_by(3).for_each(|x| *x = -*x * 1.001);
    gpu.set_params(&other);
    assert_eq!(gpu.params(), other, "params() after set_params");
    let fresh = bf16_engine(&cfg, other.clone(), 5).logits(batch).unwrap();
    let got = gpu.logits(batch).unwrap();
    let e = rel_l2(&got, &fresh);
    assert!(
        e < 1e-5,
        "logits after set_params differ from a fresh engine: {e:.2e}"
    );
    gpu.set_params(&stepped);
    assert_eq!(gpu.params(), stepped);
}

// ------------------------------------------------------------------ no GPU needed

/// The fp32 -> bf16 rounding (and the warp reductions) of every engine kernel is the one in
/// kernels/common.cuh, the same text the doctor's self-test kernel is compiled with and
/// checks bit for bit on the GPU against src/cuda/bf16.rs.
#[test]
fn every_kernel_family_is_compiled_with_the_shared_helpers() {
    let prelude = kernels::PRELUDE;
    assert!(prelude.contains("bf16_rne(float x)") && prelude.contains("warp_sum(float v)"));
    assert!(nanogpt::doctor::DOCTOR_KERNEL.starts_with(prelude));
    for (name, src) in kernels::SOURCES {
        assert!(
            src.starts_with(prelude),
            "{name}: compiled without common.cuh"
        );
        let own = &src[prelude.len()..];
        for helper in ["bf16_rne(float", "warp_sum(float", "warp_max(float"] {
            assert!(
                !own.contains(&format!("float {helper}"))
                    && !own.contains(&format!("short {helper}")),
                "{name} defines its own {helper}: use the one in kernels/common.cuh"
            );
        }
    }
}

/// The launch bound of entry `name` in `ptx` (`.maxntid x, y, z` between its parameter list
/// and its body: x * y * z threads), if it has one.
fn launch_bound(ptx: &str, name: &str) -> Option<u32> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let head = &ptx[start..start + ptx[start..].find('{')?];
    let dims = head.split(".maxntid").nth(1)?.lines().next()?;
    dims.split(',')
        .map(|d| d.trim().parse::<u32>().ok())
        .product()
}

#[test]
fn every_engine_kernel_is_an_entry_point_of_its_sources() {
    use nanogpt::cuda::discover::{LibKind, SearchEnv, SearchPlan};
    use nanogpt::cuda::nvrtc::{Nvrtc, Target};
    let plan = SearchPlan::new(&SearchEnv::from_process());
    let Some(n) = plan
        .find(LibKind::Nvrtc)
        .found
        .and_then(|f| Nvrtc::load(&f.path).ok())
    else {
        eprintln!("skipped: NVRTC not found, kernel entry points not checked");
        return;
    };
    let programs = kernels::Program::all();
    let mut ptx_all = String::new();
    let mut on_demand_ptx = String::new();
    for program in &programs {
        let name = program.name();
        // Turing (sm_75: T4s, fp32 only), Ampere and Hopper: the bf16 kernels' sm_80
        // instructions (mma.sync bf16, ldmatrix, cp.async) must stay out of the older build.
        for target in [
            Target::Cubin { cc: 75 },
            Target::Cubin { cc: 80 },
            Target::Cubin { cc: 90 },
        ] {
            program
                .compile(&n, target)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let ptx = program
            .compile(&n, Target::Ptx { cc: 80 })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ptx = String::from_utf8_lossy(&ptx.image).into_owned();
        // A part that emits nothing is a part whose group was lost (or a count too high).
        assert!(ptx.contains(".entry "), "{name} emits no kernel");
        if program.on_demand {
            on_demand_ptx.push_str(&ptx);
        }
        ptx_all.push_str(&ptx);
    }
    // The attention kernels are compiled in parts (KERNEL_PARTS in the file).
    let flash_parts = programs
        .iter()
        .filter(|p| p.file == "flash_attention.cu")
        .count();
    assert_eq!(
        flash_parts, 13,
        "flash_attention.cu is compiled as 13 programs"
    );
    assert_eq!(programs.len(), kernels::SOURCES.len() - 1 + 13);
    // Every kernel is emitted by exactly one program: two would leave the kernel table
    // taking whichever module it searched first.
    for k in kernels::KERNEL_NAMES {
        let defined = ptx_all.matches(&format!(".entry {k}(")).count();
        assert!(
            defined == 1,
            "kernel {k} launched by the engine is defined {defined} times in kernels/*.cu's programs (must be once)"
        );
    }
    assert_eq!(kernels::KERNEL_NAMES.len(), 69);
    // The on-demand programs emit exactly the on-demand entry points (the `_expf` forms),
    // so that an engine loading without them finds every other kernel.
    for k in kernels::KERNEL_NAMES {
        let on_demand = kernels::ON_DEMAND_KERNEL_NAMES.contains(k);
        assert_eq!(
            on_demand_ptx.contains(&format!(".entry {k}(")),
            on_demand,
            "kernel {k}: emitted by an on-demand program must match being on demand"
        );
        assert_eq!(k.ends_with("_expf"), on_demand, "kernel {k}");
    }
    assert_eq!(kernels::ON_DEMAND_KERNEL_NAMES.len(), 18);
    // A kernel compiled with a launch bound (`.maxntid`) must be launched with at most that
    // many threads: a larger block fails to launch on a GPU (the emulated driver does not
    // model bounds, so this is where a mismatch shows up without one).
    use nanogpt::engine::cuda::flash::{self, AttnShape, FlashMath};
    let shape = AttnShape {
        b: 1,
        t: 256,
        c: 128,
        nh: 2,
    };
    let bf16_bwd = flash::backward_config(&shape, FlashMath::Bf16).unwrap();
    let f32_bwd = flash::backward_config(&shape, FlashMath::F32).unwrap();
    let mut bounded = 0;
    for k in kernels::KERNEL_NAMES {
        let Some(bound) = launch_bound(&ptx_all, k) else {
            continue;
        };
        bounded += 1;
        let block = match *k {
            n if n.starts_with("flash_attn_fwd_bf16") => {
                flash::forward_config(&shape, FlashMath::Bf16)
                    .unwrap()
                    .block
            }
            n if n.starts_with("flash_attn_bwd_dkdv_bf16") => bf16_bwd.dkdv.block,
            n if n.starts_with("flash_attn_bwd_dq_bf16") => bf16_bwd.dq.block,
            "flash_attn_fwd_f32" => flash::forward_config(&shape, FlashMath::F32).unwrap().block,
            "flash_attn_bwd_dkdv_f32" => f32_bwd.dkdv.block,
            "flash_attn_bwd_dq_f32" => f32_bwd.dq.block,
            "layernorm_backward" => kernels::BLOCK,
            // A block of whole warps covering a row's groups of four channels, at most
            // BLOCK (src/engine/cuda/embedding.rs, wte_launch).
            "embedding_backward_wte" => kernels::BLOCK,
            "cross_entropy_bf16" | "cross_entropy_forward_backward" => {
                nanogpt::engine::cuda::XENT_BLOCK
            }
            other => panic!("{other} has a launch bound of {bound} threads: add its launch here"),
        };
        assert!(
            block <= bound,
            "{k} is launched with {block} threads but compiled for at most {bound}"
        );
    }
    assert!(
        bounded >= 20,
        "only {bounded} kernels with a launch bound found"
    );
    let key = |p: &kernels::Program, cc| kernels::cache_key(p, Target::Cubin { cc }, (13, 0));
    let (a, b, c) = (
        key(&programs[0], 90),
        key(&programs[0], 80),
        key(&programs[1], 90),
    );
    assert!(a != b && a != c && a.len() == 16, "{a} {b} {c}");
    // Parts of one file differ only in their options: their keys must differ too.
    let parts: Vec<_> = programs.iter().filter(|p| p.part.is_some()).collect();
    assert_ne!(key(parts[0], 90), key(parts[1], 90));
}

#[test]
fn create_reports_dtype_and_missing_gpu_clearly() {
    let cfg = GptConfig::new(1, 2, 16, 8, 30, true, 0.0).unwrap();
    let params = ParamLayout::new(&cfg).init_params(&cfg, 1);
    let err = nanogpt::engine::create(
        DeviceSpec::Cuda(Some(0)),
        Dtype::Float16,
        cfg.clone(),
        params.clone(),
        1,
        1,
    )
    .err()
    .expect("fp16 on CUDA is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("fp16 is not available") && msg.contains("dtype=bfloat16"),
        "{msg}"
    );
    let bf16 = nanogpt::engine::create(
        DeviceSpec::Cuda(Some(0)),
        Dtype::BFloat16,
        cfg.clone(),
        params.clone(),
        1,
        1,
    );
    match (&bf16, stack::available_gpus()) {
        (Ok(e), Ok(_)) => assert!(e.device_name().contains("bf16"), "{}", e.device_name()),
        // A GPU older than sm_80: the error names it and suggests float32.
        (Err(e), Ok(g)) if g[0].compute_capability.0 < 8 => {
            let msg = e.to_string();
            assert!(
                msg.contains(g[0].name.trim()) && msg.contains("dtype=float32"),
                "{msg}"
            );
        }
        (Err(e), Ok(_)) => panic!("bf16 engine on an sm_80+ GPU: {e}"),
        (Ok(e), Err(_)) => panic!("bf16 engine without a GPU: {}", e.device_name()),
        (Err(e), Err(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("no usable GPU"), "{msg}");
        }
    }
    let auto = nanogpt::engine::create(
        DeviceSpec::Auto,
        Dtype::Float32,
        cfg.clone(),
        params.clone(),
        1,
        1,
    )
    .unwrap();
    match stack::available_gpus() {
        Ok(_) => assert!(
            auto.device_name().starts_with("cuda:0"),
            "{}",
            auto.device_name()
        ),
        Err(why) => {
            assert!(
                auto.device_name().starts_with("cpu"),
                "{}",
                auto.device_name()
            );
            let err =
                nanogpt::engine::create(DeviceSpec::Cuda(None), Dtype::Float32, cfg, params, 1, 1)
                    .err()
                    .expect("no GPU: cuda is refused");
            let msg = err.to_string();
            assert!(
                msg.contains("no usable GPU") && msg.contains("device=cpu"),
                "{msg}"
            );
            eprintln!("no GPU here ({why}); device=cuda says: {msg}");
        }
    }
}
