//! The CUDA engine's fused attention switches (`NANOGPT_CUDA_DISABLE=flash` and
//! `flash_bf16`): engines built with the fused attention on and off
//! ([`CudaEngine::with_switches`]) give the same logits,
//! losses and every parameter gradient, in fp32 and bf16 mode, for T = block_size,
//! T < block_size (activations reused at a shorter T), a head size the fused kernels do not
//! support (both fall back to the plain path), and attention dropout (training takes the
//! plain path, evaluation the fused one). The fused path also against the float64 PyTorch
//! fixtures (tests/reference) and the CPU engine. The `T x T` attention buffers are checked
//! to be allocated only where a plain pass needs them.
//!
//! Tolerances. fp32 mode: both paths compute attention in fp32 and differ only in the order
//! of their sums (the fused kernels sum at most T + hs products per output, and rebuild the
//! probabilities from the saved logsumexp; tests/cuda_flash.rs measures ~1e-6 of scale
//! against float64), so the per-tensor error max |a - b| / max |b| gets the 1e-4 bound of
//! tests/cuda_engine.rs: two orders of magnitude of headroom, while a wrong path, stride,
//! mask or a stale buffer is an O(1) error. bf16 mode: the linear layers are bf16 on both
//! sides, and the fused forward also rounds q, k, v and the probabilities to bf16. A float64
//! model of the fused forward with an fp32 backward from its logsumexp against the same
//! model with the plain attention, on this file's bf16 shapes over 20 seeds, gave at worst:
//! logits relative L2 5.6e-3, loss relative 3.2e-4, any gradient tensor relative L2 8.9e-3,
//! cosine 0.99996. The backward is now the bf16 tensor-core one too (q, k, v, dy, and P and
//! dS as product operands, rounded to bf16): on its own it is ~4e-3 relative L2 from float64
//! in dq, dk and dv (tools/flash_emulate), the size of the rounding of one bf16 GEMM of the
//! backward pass, so it adds to the gradients' error in quadrature with the ~10 bf16
//! products per layer already there. The bounds below ([`BF16`]) leave 3x headroom over the
//! forward-only measurement; a path or indexing mistake moves them by O(1). With
//! `flash_bf16` off the fused path is fp32 SIMT in bf16 mode too, and gets the same bounds.
//!
//! Without a GPU every GPU test prints "skipped: no GPU (why)" and passes;
//! NANOGPT_REQUIRE_GPU=1 makes that a failure.

mod common;
mod reference;

use common::gpu::no_gpu;
use common::model::{perturbed_params, random_batch};
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::cuda::flash::FlashMath;
use nanogpt::engine::cuda::switches::Switches;
use nanogpt::engine::cuda::{CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use reference::{check_engine, rel_err, Reference, Tolerances};

/// fp32 bound, max |a - b| / max |b| per tensor (see the module docs).
const TOL: f64 = 1e-4;

/// bf16-mode bounds of the fused path against the plain one (see the module docs).
struct Bf16Bounds {
    logits: f64,
    loss: f64,
    grads: f64,
    cosine: f64,
}

const BF16: Bf16Bounds = Bf16Bounds {
    logits: 2e-2,
    loss: 2e-3,
    grads: 3e-2,
    cosine: 0.999,
};

fn flash_off() -> Switches {
    Switches::parse("flash").expect("flash is a known optimisation")
}

fn flash_bf16_off() -> Switches {
    Switches::parse("flash_bf16").expect("flash_bf16 is a known optimisation")
}

fn engine(cfg: &GptConfig, p: &[f32], precision: Precision, s: Switches) -> CudaEngine {
    CudaEngine::with_switches(cfg.clone(), p.to_vec(), 5, 0, precision, s)
        .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}, {s:?}): {e}"))
}

/// ||a - b|| / ||b|| and the cosine of a and b.
fn l2_cos(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut d, mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite() && y.is_finite(), "non-finite value");
        let (x, y) = (x as f64, y as f64);
        d += (x - y).powi(2);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    (
        (d / bb.max(1e-300)).sqrt(),
        ab / (aa.sqrt() * bb.sqrt()).max(1e-300),
    )
}

/// `got` close to `want` under the precision's bound for `kind` ("logits" or "grads").
fn close(what: &str, precision: Precision, got: &[f32], want: &[f32], kind: &str) -> f64 {
    match precision {
        Precision::F32 => {
            let e = rel_err(got, want);
            assert!(e < TOL, "{what}: relative error {e:.2e} (bound {TOL:.0e})");
            e
        }
        Precision::Bf16 => {
            let bound = if kind == "logits" {
                BF16.logits
            } else {
                BF16.grads
            };
            let (e, c) = l2_cos(got, want);
            assert!(
                e < bound && c > BF16.cosine,
                "{what}: relative L2 error {e:.2e} (bound {bound:.0e}), cosine {c:.6} (bound {})",
                BF16.cosine
            );
            e
        }
    }
}

fn close_loss(what: &str, precision: Precision, got: f32, want: f32) {
    let bound = match precision {
        Precision::F32 => 1e-5,
        Precision::Bf16 => BF16.loss,
    };
    let e = ((got as f64 - want as f64) / want as f64).abs();
    assert!(e < bound, "{what}: loss {got} vs {want} (relative {e:.2e})");
}

/// A model and the rows it is compared on: `b` rows of each length in `ts`, in that order.
struct Case {
    label: &'static str,
    cfg: GptConfig,
    b: usize,
    ts: &'static [usize],
}

impl Case {
    fn new(label: &'static str, cfg: GptConfig, b: usize, ts: &'static [usize]) -> Case {
        Case { label, cfg, b, ts }
    }
}

/// hs 16, T = block 16 then T = 11 on the same activations.
fn hs16() -> Case {
    let cfg = GptConfig::new(2, 4, 64, 16, 67, true, 0.0).unwrap();
    Case::new("hs16", cfg, 3, &[16, 11])
}

/// The fused-on and fused-off engines over the same parameters, through the rows of `case`
/// (on the same engines: the activations of the first length, the longest, are reused):
/// logits, evaluation loss, two accumulated training passes, every gradient. `fused` is
/// what the on-engine must pick for evaluation (training takes the plain path when
/// attention dropout is active).
fn compare(
    case: &Case,
    precision: Precision,
    fused: Option<FlashMath>,
) -> (CudaEngine, CudaEngine) {
    compare_with(case, precision, fused, Switches::default())
}

/// [`compare`] with `on_switches` for the fused-on engine.
fn compare_with(
    case: &Case,
    precision: Precision,
    fused: Option<FlashMath>,
    on_switches: Switches,
) -> (CudaEngine, CudaEngine) {
    let (label, cfg, b, ts) = (case.label, &case.cfg, case.b, case.ts);
    let p = perturbed_params(cfg, 7);
    let mut on = engine(cfg, &p, precision, on_switches);
    let mut off = engine(cfg, &p, precision, flash_off());
    assert!(
        !on.device_name().contains("flash off"),
        "{}",
        on.device_name()
    );
    assert!(
        off.device_name().contains("flash off"),
        "{}",
        off.device_name()
    );
    let layout = ParamLayout::new(cfg);
    let dropout = cfg.dropout > 0.0;
    for &t in ts {
        let label = format!("{label} {precision:?} T={t}");
        assert_eq!(on.fused_attention(b, t, false), fused, "{label}: eval path");
        assert_eq!(off.fused_attention(b, t, false), None, "{label}: flash off");
        // Passes with a backward use the same arithmetic as evaluation (forward and
        // backward alike), unless attention dropout sends them to the plain path.
        let train_path = on.fused_attention(b, t, true);
        let want = if dropout { None } else { fused };
        assert_eq!(train_path, want, "{label}");
        let (inputs, targets) = random_batch(cfg, b, t, t as u64);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
        };
        let e = close(
            &format!("{label} logits"),
            precision,
            &on.logits(batch).unwrap(),
            &off.logits(batch).unwrap(),
            "logits",
        );
        eprintln!("{label}: logits error {e:.2e}");
        let (lon, loff) = (on.loss(batch).unwrap(), off.loss(batch).unwrap());
        close_loss(&format!("{label} eval"), precision, lon, loff);
        on.zero_grad();
        off.zero_grad();
        for k in 0..2 {
            let lon = on.forward_backward(batch, 0.5).unwrap();
            let loff = off.forward_backward(batch, 0.5).unwrap();
            close_loss(&format!("{label} train pass {k}"), precision, lon, loff);
        }
        let (gon, goff) = (on.grads(), off.grads());
        let mut worst = (0f64, String::new());
        for tensor in &layout.tensors {
            let r = tensor.offset..tensor.offset + tensor.len;
            let what = format!("{label} gradient of {}", tensor.name);
            let e = close(&what, precision, &gon[r.clone()], &goff[r], "grads");
            if e > worst.0 {
                worst = (e, tensor.name.clone());
            }
        }
        eprintln!(
            "{label}: worst gradient error {:.2e} ({})",
            worst.0, worst.1
        );
        assert_eq!(
            on.rng_state(),
            off.rng_state(),
            "{label}: same dropout draws"
        );
    }
    // The T x T buffers exist exactly where a plain pass ran.
    let (mb_on, mb_off) = (on.attention_matrix_bytes(), off.attention_matrix_bytes());
    eprintln!("{label}: T x T attention buffers: fused on {mb_on} bytes, off {mb_off} bytes");
    assert!(mb_off > 0, "{label}: the plain path allocated its buffers");
    if fused.is_some() && !dropout {
        assert_eq!(mb_on, 0, "{label}: a fused-only run holds no T x T buffer");
    } else {
        assert_eq!(
            mb_on, mb_off,
            "{label}: the plain path ran in the on-engine"
        );
    }
    (on, off)
}

#[test]
fn fused_attention_matches_the_plain_path_in_fp32() {
    if no_gpu("fused_attention_matches_the_plain_path_in_fp32") {
        return;
    }
    compare(&hs16(), Precision::F32, Some(FlashMath::F32));
    // GPT-2's head size 64, T across the 32-row tiles (40 = 32 + 8, then 33), no biases.
    let cfg = GptConfig::new(1, 2, 128, 40, 50, false, 0.0).unwrap();
    let hs64 = Case::new("hs64", cfg, 2, &[40, 33]);
    compare(&hs64, Precision::F32, Some(FlashMath::F32));
}

#[test]
fn fused_attention_matches_the_plain_path_in_bf16() {
    if no_gpu("fused_attention_matches_the_plain_path_in_bf16") {
        return;
    }
    // hs 16: the bf16 tensor-core forward and backward.
    compare(&hs16(), Precision::Bf16, Some(FlashMath::Bf16));
    // hs 40 is not a multiple of 16: the fused path with the fp32 forward.
    let cfg = GptConfig::new(1, 2, 80, 12, 50, true, 0.0).unwrap();
    let hs40 = Case::new("hs40", cfg, 2, &[12, 7]);
    compare(&hs40, Precision::Bf16, Some(FlashMath::F32));
}

#[test]
fn flash_bf16_off_keeps_the_fused_attention_in_fp32() {
    if no_gpu("flash_bf16_off_keeps_the_fused_attention_in_fp32") {
        return;
    }
    // hs 16 in bf16 mode: the fp32 SIMT kernels, forward and backward, against the plain
    // path; in fp32 mode the switch changes nothing.
    let case = Case {
        label: "hs16 flash_bf16 off",
        ..hs16()
    };
    let (on, _) = compare_with(
        &case,
        Precision::Bf16,
        Some(FlashMath::F32),
        flash_bf16_off(),
    );
    assert!(
        on.device_name().contains("flash_bf16 off") && !on.device_name().contains("flash off"),
        "{}",
        on.device_name()
    );
    let case = Case { ts: &[16], ..case };
    compare_with(
        &case,
        Precision::F32,
        Some(FlashMath::F32),
        flash_bf16_off(),
    );
}

#[test]
fn an_unsupported_head_size_falls_back_to_the_plain_path() {
    if no_gpu("an_unsupported_head_size_falls_back_to_the_plain_path") {
        return;
    }
    // hs 136 > 128, the fused kernels' limit.
    let cfg = GptConfig::new(1, 1, 136, 8, 40, true, 0.0).unwrap();
    let hs136 = Case::new("hs136", cfg, 2, &[8, 5]);
    for precision in [Precision::F32, Precision::Bf16] {
        compare(&hs136, precision, None);
    }
}

#[test]
fn attention_dropout_trains_on_the_plain_path() {
    if no_gpu("attention_dropout_trains_on_the_plain_path") {
        return;
    }
    // With dropout 0.2 the training passes are plain on both engines (the same masks: the
    // gradients agree); evaluation is fused on one and plain on the other.
    let cfg = GptConfig::new(2, 2, 32, 10, 50, true, 0.2).unwrap();
    let dropout = Case::new("dropout", cfg, 3, &[10, 6]);
    for (precision, math) in [
        (Precision::F32, FlashMath::F32),
        (Precision::Bf16, FlashMath::Bf16),
    ] {
        compare(&dropout, precision, Some(math));
    }
}

#[test]
fn fused_attention_matches_pytorch_and_the_cpu_engine() {
    if no_gpu("fused_attention_matches_pytorch_and_the_cpu_engine") {
        return;
    }
    // The float64 PyTorch fixtures: T = block (hs 16) and T = 9 < block 16 (hs 8).
    let tol = Tolerances {
        logits: TOL,
        grads: TOL,
    };
    for name in ["ref_bias.safetensors", "ref_short.safetensors"] {
        let r = Reference::load(name);
        let mut eng = engine(&r.cfg, &r.params, Precision::F32, Switches::default());
        let c = r.fx.config();
        let (b, t) = (c["B"].as_u64().unwrap(), c["T"].as_u64().unwrap());
        let path = eng.fused_attention(b as usize, t as usize, false);
        assert_eq!(path, Some(FlashMath::F32), "{name}");
        check_engine(name, &r, &mut eng, &tol);
        assert_eq!(eng.attention_matrix_bytes(), 0, "{name}: fused only");
    }
    // The CPU engine, T < block.
    let cfg = GptConfig::new(2, 4, 64, 24, 67, true, 0.0).unwrap();
    let p = perturbed_params(&cfg, 3);
    let mut cpu = CpuEngine::new(cfg.clone(), p.clone(), 5, 2).unwrap();
    let mut gpu = engine(&cfg, &p, Precision::F32, Switches::default());
    let (b, t) = (2, 19);
    assert_eq!(gpu.fused_attention(b, t, false), Some(FlashMath::F32));
    let (inputs, targets) = random_batch(&cfg, b, t, 9);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let e = rel_err(&gpu.logits(batch).unwrap(), &cpu.logits(batch).unwrap());
    assert!(e < TOL, "CPU vs fused: logits error {e:.2e}");
    cpu.zero_grad();
    gpu.zero_grad();
    let (lc, lg) = (
        cpu.forward_backward(batch, 1.0).unwrap(),
        gpu.forward_backward(batch, 1.0).unwrap(),
    );
    close_loss("CPU vs fused", Precision::F32, lg, lc);
    let (gc, gg) = (cpu.grads(), gpu.grads());
    for tensor in &ParamLayout::new(&cfg).tensors {
        let r = tensor.offset..tensor.offset + tensor.len;
        let e = rel_err(&gg[r.clone()], &gc[r]);
        assert!(
            e < TOL,
            "CPU vs fused: gradient of {} relative error {e:.2e}",
            tensor.name
        );
    }
    assert_eq!(gpu.attention_matrix_bytes(), 0);
}

/// Needs no GPU: the variable is read before anything touches CUDA. The engine is built in
/// a child process of this test binary that gets the variable, so that this process never
/// changes its own environment while other tests run.
#[test]
fn an_unknown_name_in_nanogpt_cuda_disable_is_an_error() {
    const TEST: &str = "an_unknown_name_in_nanogpt_cuda_disable_is_an_error";
    if std::env::var_os("NANOGPT_SWITCHES_CHILD").is_some() {
        let cfg = GptConfig::new(1, 2, 16, 8, 30, true, 0.0).unwrap();
        let p = perturbed_params(&cfg, 1);
        let msg = CudaEngine::new(cfg, p, 1, 0)
            .err()
            .expect("an unknown name is refused")
            .to_string();
        assert!(
            msg.contains("NANOGPT_CUDA_DISABLE")
                && msg.contains("\"flsh\"")
                && msg.contains("epilogues"),
            "{msg}"
        );
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("NANOGPT_SWITCHES_CHILD", "1")
        .env("NANOGPT_CUDA_DISABLE", "flash,flsh")
        .output()
        .expect("running the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child test failed:\n{text}"
    );
}

/// `bf16_acts` changes where a LayerNorm output is rounded to bf16 (in the LayerNorm
/// kernel, or by a cast right before the product), not what it is rounded to: the bf16
/// engine gives the same bits with it on and off, in losses, every gradient and the
/// parameters after AdamW steps, with the LayerNorm outputs kept (recompute 0) and
/// recomputed in the backward pass (recompute 2), for T = block size and a shorter T.
#[test]
fn bf16_layernorm_outputs_give_the_same_bits_as_rounding_before_each_product() {
    if no_gpu("bf16_layernorm_outputs_give_the_same_bits_as_rounding_before_each_product") {
        return;
    }
    use nanogpt::engine::Recompute;
    let cfg = GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap();
    let p = perturbed_params(&cfg, 11);
    // With bf16 logits (the default; the logits gradient in place) and with fp32 logits
    // (the gradient in bf16 scratch with `bf16_acts`, rounded before the products without).
    for (base, rc) in [
        ("", Recompute::Nothing),
        ("", Recompute::GeluLayerNorm),
        ("bf16_logits", Recompute::Nothing),
    ] {
        let on = Switches::parse(base).expect("known optimisations");
        let off = Switches::parse(&format!("{base},bf16_acts")).expect("known optimisations");
        let mut on_e = engine(&cfg, &p, Precision::Bf16, on);
        let mut off_e = engine(&cfg, &p, Precision::Bf16, off);
        for e in [&mut on_e, &mut off_e] {
            e.set_recompute(rc);
        }
        for (step, t) in [16usize, 11].into_iter().enumerate() {
            let (inputs, targets) = random_batch(&cfg, 2, t, 20 + step as u64);
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                b: 2,
                t,
            };
            let what = format!("off: {base:?} recompute={} T={t}", rc.level());
            let mut seen = Vec::new();
            for e in [&mut on_e, &mut off_e] {
                e.zero_grad();
                let loss = e.forward_backward(batch, 1.0).unwrap();
                let eval = e.loss(batch).unwrap();
                let norm = e.step(&AdamWConfig::default(), 1e-2);
                seen.push((loss, eval, e.grads(), norm, e.params()));
            }
            let (a, b) = (&seen[0], &seen[1]);
            assert_eq!(
                a.0.to_bits(),
                b.0.to_bits(),
                "{what}: loss {} vs {}",
                a.0,
                b.0
            );
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "{what}: eval loss");
            assert!(a.2 == b.2, "{what}: gradients differ");
            assert_eq!(a.3.to_bits(), b.3.to_bits(), "{what}: gradient norm");
            assert!(a.4 == b.4, "{what}: parameters after the step differ");
        }
    }
}

/// `flash_hs64` off: the generic bf16 attention kernels instead of their head-size-64 forms,
/// on a model with head size 64 (where the forms apply), in both attention storages: the
/// same logits, losses and gradients, bit for bit.
#[test]
fn head_size_64_kernels_give_the_generic_kernels_bits() {
    if no_gpu("head_size_64_kernels_give_the_generic_kernels_bits") {
        return;
    }
    attention_switch_keeps_the_bits("flash_hs64", &["", ",bf16_attn"]);
}

/// `flash_async` off: the bf16-storage attention kernels load their tiles synchronously
/// instead of by cp.async, with the head-size-64 kernels and the generic ones: the same
/// logits, losses and gradients, bit for bit.
#[test]
fn asynchronous_tile_loads_give_the_synchronous_loads_bits() {
    if no_gpu("asynchronous_tile_loads_give_the_synchronous_loads_bits") {
        return;
    }
    attention_switch_keeps_the_bits("flash_async", &["", ",flash_hs64"]);
}

/// `flash_exp2` off: the bf16 attention kernels' softmax takes the accurate expf instead of
/// base-2 exponentials, on a model with head size 64 in both attention storages. Unlike
/// the switches above this changes bits: the probabilities agree within a few units in the
/// last place of fp32, and where that flips a value's rounding to bf16 (P and dS before
/// their products, the output in bf16 storage) the flip spreads through the bf16 network
/// like any other bf16 rounding. Measured on the emulated GPU (B = 4, T = 128): logits
/// 7.0e-4 - 7.5e-4 relative L2 apart, the worst gradient 4.4e-3 (a LayerNorm weight's). The
/// bounds are the bf16 noise floor of tests/cuda_epilogues.rs (`bf16_attn` on against
/// off): 1e-2 on logits, 3e-2 on gradients; tests/cuda_flash.rs bounds the kernels
/// themselves much closer (2e-3 of scale). Something must differ (the switch selects other
/// kernels; at this size hundreds of logits do), and a base mixed up between the running
/// max and the exponentials is O(1).
#[test]
fn accurate_exponentials_stay_within_rounding_of_base_2() {
    if no_gpu("accurate_exponentials_stay_within_rounding_of_base_2") {
        return;
    }
    use reference::rel_l2;
    let cfg = GptConfig::new(2, 2, 128, 128, 96, true, 0.0).unwrap();
    let p = perturbed_params(&cfg, 23);
    let (b, t) = (4, 128);
    let (inputs, targets) = random_batch(&cfg, b, t, 24);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    for extra in ["", ",bf16_attn"] {
        let on = Switches::parse(extra.trim_start_matches(',')).unwrap();
        let off = Switches::parse(&format!("flash_exp2{extra}")).unwrap();
        let mut base2 = engine(&cfg, &p, Precision::Bf16, on);
        let mut accurate = engine(&cfg, &p, Precision::Bf16, off);
        assert!(accurate.fused_attention(b, t, true) == Some(FlashMath::Bf16));
        let (la, lb) = (
            accurate.logits(batch).unwrap(),
            base2.logits(batch).unwrap(),
        );
        let e = rel_l2(&la, &lb);
        let differ = la.iter().zip(&lb).filter(|(x, y)| x != y).count();
        eprintln!("flash_exp2 off{extra}: logits relative L2 {e:.2e}, {differ} differ");
        assert!(
            e < 1e-2,
            "flash_exp2 off{extra}: logits relative L2 {e:.2e}"
        );
        assert!(
            differ > 0,
            "flash_exp2 off{extra}: every logit the same bits: the switch selected nothing"
        );
        let (l1, l2) = (
            accurate.forward_backward(batch, 1.0).unwrap(),
            base2.forward_backward(batch, 1.0).unwrap(),
        );
        assert!(
            (l1 - l2).abs() <= 2e-3 * l2.abs(),
            "flash_exp2 off{extra}: loss {l1} vs {l2}"
        );
        let (ga, gb) = (accurate.grads(), base2.grads());
        let mut worst = (0f64, "");
        for tensor in &accurate.layout().tensors {
            let r = tensor.offset..tensor.offset + tensor.len;
            let e = rel_l2(&ga[r.clone()], &gb[r]);
            assert!(
                e < 3e-2,
                "flash_exp2 off{extra}: gradient of {} relative L2 {e:.2e}",
                tensor.name
            );
            if e > worst.0 {
                worst = (e, tensor.name.as_str());
            }
        }
        eprintln!(
            "flash_exp2 off{extra}: worst gradient relative L2 {:.2e} ({})",
            worst.0, worst.1
        );
    }
}

/// Engines with `switch` off and on (each also with the switches in `extras` off), on a
/// bf16 model with head size 64 and the bf16 fused attention: logits, loss and gradients
/// bit for bit the same.
fn attention_switch_keeps_the_bits(switch: &str, extras: &[&str]) {
    let cfg = GptConfig::new(2, 2, 128, 32, 96, true, 0.0).unwrap();
    let p = perturbed_params(&cfg, 21);
    let (b, t) = (2, 32);
    let (inputs, targets) = random_batch(&cfg, b, t, 22);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    for extra in extras {
        let off = Switches::parse(&format!("{switch}{extra}")).unwrap();
        let on = Switches::parse(extra.trim_start_matches(',')).unwrap();
        assert!(on != off && off.disabled().contains(&switch));
        let mut with = engine(&cfg, &p, Precision::Bf16, on);
        let mut without = engine(&cfg, &p, Precision::Bf16, off);
        assert!(with.fused_attention(b, t, true) == Some(FlashMath::Bf16));
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert!(
            bits(with.logits(batch).unwrap()) == bits(without.logits(batch).unwrap()),
            "{switch} off, switches {extra:?}: logits differ"
        );
        let (la, lb) = (
            with.forward_backward(batch, 1.0).unwrap(),
            without.forward_backward(batch, 1.0).unwrap(),
        );
        assert_eq!(
            la.to_bits(),
            lb.to_bits(),
            "{switch} off, switches {extra:?}: loss"
        );
        let (ga, gb) = (with.grads(), without.grads());
        assert!(ga.iter().any(|&g| g != 0.0));
        assert!(
            bits(ga) == bits(gb),
            "{switch} off, switches {extra:?}: gradients differ"
        );
    }
}

/// `fresh_grads`: the first micro-step after `zero_grad` writes the gradients instead of
/// adding them to a zeroed buffer. Against the switch off, in fp32 and bf16, with dropout,
/// a vocabulary padded past its tokens (67 -> 128 embedding rows no logit reaches) and
/// passes shorter than the block (T = 8 of 12: position rows past T no pass writes), and
/// the fresh engine's gradient buffer filled with NaN before its first `zero_grad` (an
/// element a fresh pass failed to write would keep it): four optimizer steps of two
/// micro-steps each (clipping and weight decay on) give the same losses, gradient norms
/// and parameters bit for bit, and equal gradients after every micro-step (as values: an
/// exact zero may keep the sign a product gave it, which no later value can tell). Both
/// kinds of micro-step are captured as CUDA graphs once and replayed after, each in a graph
/// of its own. Gradients read
/// or edited on the host between `zero_grad` and the first micro-step are zeros, and
/// edits are added to.
#[test]
fn fresh_gradients_give_the_bits_of_zeroed_ones() {
    if no_gpu("fresh_gradients_give_the_bits_of_zeroed_ones") {
        return;
    }
    let cfg = GptConfig::new(2, 3, 48, 12, 67, true, 0.1).unwrap();
    assert!(cfg.padded_vocab_size > cfg.vocab_size);
    let p = perturbed_params(&cfg, 31);
    let (b, t) = (3, 8);
    let (inputs, targets) = random_batch(&cfg, b, t, 32);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let hp = AdamWConfig {
        weight_decay: 0.1,
        grad_clip: 0.5,
        ..Default::default()
    };
    let zeroed_switches = Switches::parse("fresh_grads").unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut fresh = engine(&cfg, &p, precision, Switches::default());
        let mut zeroed = engine(&cfg, &p, precision, zeroed_switches);
        let total = fresh.layout().total;
        fresh.grads_mut().fill(f32::NAN);
        assert!(
            fresh.grad_sumsq(0..total).is_nan(),
            "the NaN reached the GPU"
        );
        let mut scalars = [Vec::new(), Vec::new()];
        for step in 0..4 {
            for e in [&mut fresh, &mut zeroed] {
                e.zero_grad();
            }
            assert!(
                fresh.grads().iter().all(|&g| g == 0.0),
                "{precision:?}: gradients read after zero_grad are not zeros"
            );
            for micro in 0..2 {
                for (e, s) in [&mut fresh, &mut zeroed].into_iter().zip(&mut scalars) {
                    s.push(e.forward_backward(batch, 0.5).unwrap().to_bits());
                }
                let (gf, gz) = (fresh.grads(), zeroed.grads());
                let bad = gf.iter().zip(&gz).filter(|(f, z)| f != z).count();
                assert!(
                    bad == 0,
                    "{precision:?}, step {step}, micro-step {micro}: {bad} gradients differ \
                     ({} NaN)",
                    gf.iter().filter(|g| g.is_nan()).count()
                );
            }
            for (e, s) in [&mut fresh, &mut zeroed].into_iter().zip(&mut scalars) {
                s.push(e.step(&hp, 1e-3).to_bits());
            }
        }
        assert_eq!(
            scalars[0], scalars[1],
            "{precision:?}: losses or gradient norms differ"
        );
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert!(
            bits(fresh.params()) == bits(zeroed.params()),
            "{precision:?}: parameters differ"
        );
        let counts = fresh.graph_counts();
        // Steps 1 and 2 run launch by launch (the first optimizer step allocates its state,
        // which ends any graph's validity), step 3 captures each kind, step 4 replays both.
        assert_eq!(
            (counts.captures, counts.replays, counts.direct),
            (2, 4, 4),
            "{precision:?}: each kind of micro-step is captured once and replayed after"
        );
        // Edited on the host after zero_grad: zeros plus the edit, which the next
        // micro-step adds to.
        for e in [&mut fresh, &mut zeroed] {
            e.zero_grad();
            let g = e.grads_mut();
            assert!(g.iter().all(|&x| x == 0.0));
            g[0] = 1.5;
            e.forward_backward(batch, 0.5).unwrap();
        }
        let (gf, gz) = (fresh.grads(), zeroed.grads());
        assert!(
            gf.iter().zip(&gz).all(|(f, z)| f == z),
            "{precision:?}: a host edit after zero_grad is not added to"
        );
    }
}
