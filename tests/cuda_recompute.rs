//! Activation recomputation on the CUDA engine (`recompute` = 1, 2 against 0), fp32 and
//! bf16: losses, every parameter gradient and (where exact) several AdamW steps, with the
//! fused attention (dropout 0) and the plain one (dropout on); the engine's memory report
//! shows the activation buffers shrinking by exactly what the levels drop, and agrees with
//! [`Engine::activation_bytes`].
//!
//! Exactness. The recomputed GELU (`gelu_forward`) and LayerNorm (`layernorm_recompute`,
//! the forward's own `ln_apply`) reproduce the forward's bits, and every other kernel and
//! product runs on the same inputs in the same order, so the results are bit-identical,
//! with two provisos the tests arrange for or allow:
//! - (the batches here hold each token at most once, a permutation of the vocabulary; the
//!   token-embedding gradient adds a repeated token's rows in row order, without atomics,
//!   so it would be bit-identical with repeats too);
//! - with cuBLASLt's GELU epilogue (bf16, `epilogues` on) the forward's GELU comes from
//!   cuBLASLt and the recomputed one from `gelu_forward`; they may differ in the last bits,
//!   which moves the bf16-rounded operand of the MLP projection's weight gradient by one
//!   bf16 step where a value sits near a rounding boundary. Only the tensors
//!   `h.*.mlp.c_proj.weight` may then differ: relative L2 below 1e-2 and cosine above
//!   0.9999 (one bf16 step is 2^-8 relative, on a small fraction of the operand values);
//!   the loss and every other gradient must still be bit-identical, and the AdamW steps
//!   (which would carry the difference everywhere) are compared only in the exact modes.
//!   The same holds for the bf16 MLP chain (`bf16_mlp`, even unfused): the forward's GELU
//!   is taken at the fp32 pre-activation, the recomputed one at its saved bf16 rounding.
//!   The bf16 engine with `epilogues` and `bf16_mlp` off is exact.
//!
//! Without a GPU every GPU test prints "skipped: no GPU (why)" and passes;
//! NANOGPT_REQUIRE_GPU=1 makes that a failure. The memory arithmetic for GPT-2 124M needs
//! no GPU and always runs.

mod common;
mod reference;

use common::gpu::no_gpu;
use common::model::perturbed_params;
use nanogpt::engine::cuda::switches::Switches;
use nanogpt::engine::cuda::{self, CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine, Recompute};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use nanogpt::rng::Rng;
use reference::{cosine, rel_l2};

const LEVELS: [Recompute; 3] = [
    Recompute::Nothing,
    Recompute::Gelu,
    Recompute::GeluLayerNorm,
];

/// `b * t` distinct tokens (a shuffled prefix of the vocabulary) and random targets.
fn data(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let n = b * t;
    assert!(n <= cfg.vocab_size, "distinct tokens need vocab >= B * T");
    let mut rng = Rng::new(seed);
    let mut tokens: Vec<u32> = (0..cfg.vocab_size as u32).collect();
    for i in (1..tokens.len()).rev() {
        tokens.swap(i, rng.below(i as u64 + 1) as usize);
    }
    tokens.truncate(n);
    let v = cfg.vocab_size as u64;
    let mut targets: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
    targets[1] = -1;
    (tokens, targets)
}

fn engine(
    cfg: &GptConfig,
    p: &[f32],
    precision: Precision,
    s: Switches,
    rc: Recompute,
) -> CudaEngine {
    let mut e = CudaEngine::with_switches(cfg.clone(), p.to_vec(), 5, 0, precision, s)
        .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}, {s:?}): {e}"));
    e.set_recompute(rc);
    e
}

/// Whether `name` is allowed to differ (see the module docs): the MLP projection's weight
/// when the recomputed GELU may differ from the forward's (`gelu_differs`).
fn gelu_epilogue_tensor(name: &str, gelu_differs: bool) -> bool {
    gelu_differs && name.ends_with(".mlp.c_proj.weight")
}

/// Every tensor of `got` bit-identical to `want`, except the ones the module docs allow
/// (then within their bound). Returns how many such tensors differed.
fn check_grads(
    what: &str,
    layout: &ParamLayout,
    got: &[f32],
    want: &[f32],
    gelu_differs: bool,
) -> usize {
    let mut near = 0;
    for t in &layout.tensors {
        let r = t.offset..t.offset + t.len;
        let (g, w) = (&got[r.clone()], &want[r]);
        let diff = g
            .iter()
            .zip(w)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        let Some(i) = diff else { continue };
        if gelu_epilogue_tensor(&t.name, gelu_differs) {
            let (e, c) = (rel_l2(g, w), cosine(g, w));
            assert!(
                e < 1e-2 && c > 0.9999,
                "{what}: {} relative L2 {e:.2e} (bound 1e-2), cosine {c:.6} (bound 0.9999)",
                t.name
            );
            eprintln!(
                "{what}: {} differs (recomputed GELU): relative L2 {e:.2e}",
                t.name
            );
            near += 1;
        } else {
            panic!(
                "{what}: {}[{i}] is {} but {} with recompute=0 (expected the same bits)",
                t.name, g[i], w[i]
            );
        }
    }
    near
}

/// Levels 1 and 2 against 0 on `precision`/`switches`: `steps` training steps of two
/// accumulated micro-batches each, then the memory report.
fn compare(
    label: &str,
    cfg: GptConfig,
    b: usize,
    t: usize,
    precision: Precision,
    switches: Switches,
    steps: usize,
) {
    // The recomputed GELU may differ from the forward's (see the module docs).
    let gelu_differs = precision == Precision::Bf16 && (switches.epilogues || switches.bf16_mlp);
    let layout = ParamLayout::new(&cfg);
    let p = perturbed_params(&cfg, 3);
    let hp = AdamWConfig {
        grad_clip: 1.0,
        ..AdamWConfig::default()
    };
    let mut engines: Vec<CudaEngine> = LEVELS
        .iter()
        .map(|&rc| engine(&cfg, &p, precision, switches, rc))
        .collect();
    let steps = if gelu_differs { 1 } else { steps };
    for step in 0..steps {
        let (inputs, targets) = data(&cfg, b, t, 40 + step as u64);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
        };
        let mut out = Vec::new();
        for e in engines.iter_mut() {
            e.zero_grad();
            let l1 = e.forward_backward(batch, 0.5).unwrap();
            let l2 = e.forward_backward(batch, 0.5).unwrap();
            let g = e.grads();
            let norm = e.step(&hp, 1e-2);
            out.push((l1, l2, g, norm, e.params()));
        }
        let want = &out[0];
        assert!(want.0.is_finite(), "{label}: loss {}", want.0);
        for (rc, got) in LEVELS.iter().zip(&out).skip(1) {
            let what = format!("{label} {precision:?} step {step} recompute={}", rc.level());
            assert_eq!(
                got.0.to_bits(),
                want.0.to_bits(),
                "{what}: loss {} vs {}",
                got.0,
                want.0
            );
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "{what}: second loss");
            let near = check_grads(&what, &layout, &got.2, &want.2, gelu_differs);
            if near == 0 {
                assert_eq!(got.3.to_bits(), want.3.to_bits(), "{what}: gradient norm");
                check_grads(
                    &format!("{what} parameters"),
                    &layout,
                    &got.4,
                    &want.4,
                    false,
                );
            }
        }
    }
    // Memory: the report matches the planned figure, and the levels drop exactly the
    // per-layer GELU (N x 4C) and LayerNorm (2 x N x C) outputs, less one shared copy. The
    // LayerNorm outputs are bf16 in the bf16 mode with `bf16_acts` on, the GELU outputs
    // with `bf16_mlp` on.
    let (l, n, c) = (cfg.n_layer as u64, (b * t) as u64, cfg.n_embd as u64);
    let bytes = |on: bool| {
        if precision == Precision::Bf16 && on {
            2
        } else {
            4
        }
    };
    let (ln, mlp) = (bytes(switches.bf16_acts), bytes(switches.bf16_mlp));
    let mut reported = Vec::new();
    for (rc, e) in LEVELS.iter().zip(&engines) {
        let rep = e
            .memory_report()
            .expect("the CUDA engine reports its memory");
        let act = rep.activation_bytes();
        let planned = e
            .activation_bytes(b, t, *rc)
            .expect("the CUDA engine plans");
        assert_eq!(
            act,
            planned,
            "{label} recompute={}: report {:?}",
            rc.level(),
            rep.items
        );
        let shared = rep
            .items
            .iter()
            .find(|(w, _)| w.starts_with("recompute buffers"))
            .map_or(0, |(_, b)| *b);
        let want_shared = match rc {
            Recompute::Nothing => 0,
            Recompute::Gelu => mlp * n * 4 * c,
            Recompute::GeluLayerNorm => mlp * n * 4 * c + ln * n * c,
        };
        assert_eq!(shared, want_shared, "{label} recompute={}", rc.level());
        reported.push(act);
    }
    assert_eq!(
        reported[0] - reported[1],
        mlp * (l - 1) * n * 4 * c,
        "{label}: level 1 saving"
    );
    assert_eq!(
        reported[1] - reported[2],
        ln * (2 * l - 1) * n * c,
        "{label}: level 2 saving"
    );
    eprintln!(
        "{label} {precision:?}: activations {} / {} / {} bytes at recompute 0 / 1 / 2",
        reported[0], reported[1], reported[2]
    );
}

fn small(bias: bool, dropout: f32) -> GptConfig {
    GptConfig::new(3, 2, 64, 32, 200, bias, dropout).expect("a valid small model")
}

#[test]
fn fp32_recompute_is_bit_identical() {
    if no_gpu("fp32_recompute_is_bit_identical") {
        return;
    }
    // Fused attention (dropout 0), then the plain path with attention dropout.
    compare(
        "fused attention",
        small(true, 0.0),
        2,
        32,
        Precision::F32,
        Switches::default(),
        3,
    );
    compare(
        "dropout 0.1",
        small(false, 0.1),
        3,
        32,
        Precision::F32,
        Switches::default(),
        3,
    );
    // Separate residual add and LayerNorm kernels.
    let unfused = Switches::parse("fused_ln").expect("a known switch");
    compare(
        "fused_ln off",
        small(true, 0.0),
        2,
        32,
        Precision::F32,
        unfused,
        2,
    );
}

#[test]
fn bf16_recompute_matches() {
    if no_gpu("bf16_recompute_matches") {
        return;
    }
    // cuBLASLt epilogues on: everything but the MLP projection weights bit-identical.
    compare(
        "epilogues",
        small(true, 0.0),
        2,
        32,
        Precision::Bf16,
        Switches::default(),
        1,
    );
    compare(
        "epilogues, dropout",
        small(false, 0.1),
        2,
        32,
        Precision::Bf16,
        Switches::default(),
        1,
    );
    // Separate bias/GELU kernels with the bf16 MLP chain: the GELU recomputed from the
    // bf16 pre-activation.
    let off = Switches::parse("epilogues").expect("a known switch");
    compare(
        "epilogues off",
        small(true, 0.0),
        2,
        32,
        Precision::Bf16,
        off,
        1,
    );
    // Separate kernels, fp32 MLP chain: exact, over several steps.
    let off = Switches::parse("epilogues,bf16_mlp").expect("known switches");
    compare(
        "epilogues and bf16_mlp off",
        small(true, 0.0),
        2,
        32,
        Precision::Bf16,
        off,
        3,
    );
}

/// The activation memory of GPT-2 124M at T = 1024 on the GPU (fused attention, no
/// dropout), as BENCHMARKS.md quotes it: level 1 saves 11 x 12 MiB per batch row, level 2
/// another 23 x 3 MiB (fp32 LayerNorm outputs); bf16 LayerNorm outputs (the bf16 mode with
/// `bf16_acts`) halve the 25 of them (ln1, ln2 per layer, lnf) at level 0, and the bf16 MLP
/// chain (`bf16_mlp`) the 25 (N, 4C) ones (fch and the GELU output per layer, dfch),
/// bf16 logits (`bf16_logits`) the (N, V) logits, and bf16 attention storage (`bf16_attn`)
/// q, k, v and the attention output of every layer (4C values per token).
#[test]
fn gpt2_activation_memory_per_level() {
    use cuda::Bf16Storage;
    let cfg = GptConfig::new(12, 12, 768, 1024, 50257, false, 0.0).unwrap();
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    let fp32 = Bf16Storage::default();
    let ln = Bf16Storage { ln: true, ..fp32 };
    let mlp = Bf16Storage { mlp: true, ..ln };
    let logits = Bf16Storage {
        logits: true,
        ..mlp
    };
    let all = Bf16Storage {
        attn: true,
        ..logits
    };
    for b in [8usize, 16, 24, 32] {
        let level0 =
            |st| cuda::activation_bytes(&cfg, b, 1024, Recompute::Nothing, true, false, st);
        let row = (b * 1024 * 768) as u64;
        assert_eq!(level0(fp32) - level0(ln), 25 * row * 2, "B={b}");
        assert_eq!(level0(ln) - level0(mlp), 25 * 4 * row * 2, "B={b}");
        // The logits rows are padded to 50264 values (a multiple of 8) for aligned products.
        assert_eq!(level0(mlp) - level0(logits), row / 768 * 50264 * 2, "B={b}");
        assert_eq!(level0(logits) - level0(all), 12 * 4 * row * 2, "B={b}");
        eprintln!(
            "gpt2 B={b} T=1024, recompute 0: {:.2} GiB fp32 storage, {:.2} GiB bf16 (default)",
            gib(level0(fp32)),
            gib(level0(all))
        );
        let bytes = |rc| cuda::activation_bytes(&cfg, b, 1024, rc, true, false, fp32);
        let (b0, b1, b2) = (
            bytes(Recompute::Nothing),
            bytes(Recompute::Gelu),
            bytes(Recompute::GeluLayerNorm),
        );
        assert_eq!((b0 - b1) >> 20, 11 * 12 * b as u64, "B={b}");
        assert_eq!((b1 - b2) >> 20, 23 * 3 * b as u64, "B={b}");
        eprintln!(
            "gpt2 B={b} T=1024: {:.2} / {:.2} / {:.2} GiB at recompute 0 / 1 / 2",
            gib(b0),
            gib(b1),
            gib(b2)
        );
    }
    // The module docs' figures for B = 8 at level 0 with the fused attention: 6.32 GiB in
    // fp32 storage, 4.86 GiB with bf16 LayerNorm outputs and MLP chain, 4.09 GiB with the
    // logits in bf16 too, 3.53 GiB with the attention's q, k, v and output in bf16 as well
    // (the bf16 mode's default).
    let b0 = |st| {
        gib(cuda::activation_bytes(
            &cfg,
            8,
            1024,
            Recompute::Nothing,
            true,
            false,
            st,
        ))
    };
    assert!((b0(fp32) - 6.32).abs() < 0.01, "{:.3} GiB", b0(fp32));
    assert!((b0(mlp) - 4.86).abs() < 0.01, "{:.3} GiB", b0(mlp));
    assert!((b0(logits) - 4.09).abs() < 0.01, "{:.3} GiB", b0(logits));
    assert!((b0(all) - 3.53).abs() < 0.01, "{:.3} GiB", b0(all));
}

/// A batch whose activations need more than the whole GPU fails before anything is
/// allocated, naming what it needs, what is free and the settings that would fit; the
/// engine then trains a batch that fits as if nothing had happened.
#[test]
fn a_batch_too_large_for_the_gpu_says_what_would_fit() {
    if no_gpu("a_batch_too_large_for_the_gpu_says_what_would_fit") {
        return;
    }
    // The logits dominate: one row of 64 tokens over 50304 values.
    let cfg = GptConfig::new(1, 2, 64, 64, 50304, true, 0.0).expect("a valid model");
    let p = perturbed_params(&cfg, 3);
    let mut e = engine(
        &cfg,
        &p,
        Precision::Bf16,
        Switches::default(),
        Recompute::Nothing,
    );
    let total = e
        .memory_report()
        .and_then(|m| m.device_total)
        .expect("the driver reports the GPU's memory");
    let t = 64;
    let row = e.activation_bytes(1, t, Recompute::Nothing).unwrap();
    let b = (2 * total / row) as usize + 1;
    assert!(e.activation_bytes(b, t, Recompute::Nothing).unwrap() > total);
    let inputs: Vec<u32> = (0..b * t).map(|i| (i % 50304) as u32).collect();
    let targets: Vec<i32> = inputs.iter().map(|&x| ((x + 1) % 50304) as i32).collect();
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let err = e
        .forward_backward(batch, 1.0)
        .expect_err("a batch twice the GPU's memory")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains(&format!(
            "out of GPU memory: a training step on a {b} x {t} micro-batch needs"
        )),
        "{err}"
    );
    assert!(err.contains("at recompute=0"), "{err}");
    assert!(err.contains("to fit, set batch_size="), "{err}");
    assert!(
        err.contains("with gradient_accumulation_steps raised"),
        "{err}"
    );
    // Nothing was lost: a batch that fits trains, and its loss is the one a fresh engine
    // gives.
    let (inputs, targets) = data(&cfg, 2, t, 9);
    let small = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t,
    };
    let loss = e.forward_backward(small, 1.0).expect("a batch that fits");
    let mut fresh = engine(
        &cfg,
        &p,
        Precision::Bf16,
        Switches::default(),
        Recompute::Nothing,
    );
    let want = fresh.forward_backward(small, 1.0).unwrap();
    assert_eq!(loss.to_bits(), want.to_bits());
}

/// The stderr of a failed `nanogpt train` of a 3.17M-parameter model (fp32; 12.1 MiB of
/// parameters, as much again of gradients, twice that of AdamW moments, 5.1 MiB of
/// activations for its 4 x 16 micro-batch) on an emulated GPU of `mib` MiB of which
/// `unseen` are in use unreported (GPU_EMULATE_MEMORY_MIB, GPU_EMULATE_UNSEEN_MIB); `None`
/// (with the reason printed) on a real GPU, whose memory cannot be set.
fn train_failing_on_a_small_gpu(test: &str, mib: u32, unseen: u32) -> Option<String> {
    if no_gpu(test) {
        return None;
    }
    let cfg = GptConfig::new(1, 2, 64, 16, 64, true, 0.0).expect("a valid model");
    let probe = engine(
        &cfg,
        &ParamLayout::new(&cfg).init_params(&cfg, 1),
        Precision::F32,
        Switches::default(),
        Recompute::Nothing,
    );
    if !probe.device_name().contains("emulation") {
        eprintln!("{test}: skipped: needs a GPU of {mib} MiB, which only the emulated one can be");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = common::prepare_data(&cwd.join("data"));
    let args = common::tiny_train_args(
        &data,
        &cwd.join("out"),
        &[
            "--device=cuda",
            "--n_layer=4",
            "--n_head=4",
            "--n_embd=256",
            "--max_iters=2",
        ],
    );
    let o = common::nanogpt(cwd)
        .env("GPU_EMULATE_MEMORY_MIB", mib.to_string())
        .env("GPU_EMULATE_UNSEEN_MIB", unseen.to_string())
        .arg("train")
        .args(&args)
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert!(!o.status.success(), "{mib} MiB should not be enough: {err}");
    assert!(!err.contains("panicked"), "{err}");
    Some(err)
}

/// An allocation that fails although the free memory looked sufficient (another process
/// took memory between the engine's query and its allocation) gets the same advice, for
/// what is free after the failure, with the driver's error appended; not a bare "out of
/// memory". A GPU of 60 MiB with 10 of them hidden in use: the activations pass the check
/// (11.6 MiB look free) and then fail to allocate (1.6 MiB are).
#[test]
fn an_allocation_failing_despite_the_check_gives_the_same_advice() {
    let test = "an_allocation_failing_despite_the_check_gives_the_same_advice";
    let Some(err) = train_failing_on_a_small_gpu(test, 60, 10) else {
        return;
    };
    assert!(
        err.contains("11.6 MiB free of 60.0 MiB on the GPU"),
        "the startup line shows the misleading figure: {err}"
    );
    assert!(
        err.contains(
            "out of GPU memory: a training step on a 4 x 16 micro-batch needs 5.1 MiB of \
             activations at recompute=0, and cuda:0"
        ),
        "{err}"
    );
    assert!(err.contains("has 1.6 MiB free of 60.0 MiB"), "{err}");
    assert!(err.contains("to fit, set batch_size="), "{err}");
    assert!(err.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{err}");
}

/// Gradients that do not fit beside the parameters stop training before it starts, with
/// the figures (they are allocated when training starts, not with the parameters, so
/// that sampling holds none): a GPU of 20 MiB.
#[test]
fn gradients_that_do_not_fit_stop_training_before_it_starts() {
    let test = "gradients_that_do_not_fit_stop_training_before_it_starts";
    let Some(err) = train_failing_on_a_small_gpu(test, 20, 0) else {
        return;
    };
    assert!(
        err.contains(
            "out of GPU memory: training the model's 3.2M parameters needs their fp32 \
             gradients, 12.1 MiB, and cuda:0"
        ),
        "{err}"
    );
    assert!(err.contains("has 7.9 MiB free of 20.0 MiB"), "{err}");
    assert!(!err.contains("step 0:"), "nothing should have run: {err}");
}
