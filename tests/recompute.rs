//! Activation recomputation on the CPU engine (`recompute` = 0, 1, 2): the loss, the
//! logits and every parameter gradient are bit-identical across the levels, with dropout on
//! and off, with and without biases, at T = block_size and a shorter T, over accumulated
//! micro-steps and several AdamW steps; switching the level on a live engine keeps it so;
//! and the activation memory shrinks by exactly the buffers that are no longer kept.

mod common;

use common::model::perturbed_params;
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::{Batch, Engine, Recompute};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use nanogpt::rng::Rng;

const LEVELS: [Recompute; 3] = [
    Recompute::Nothing,
    Recompute::Gelu,
    Recompute::GeluLayerNorm,
];

fn cfg(bias: bool, dropout: f32) -> GptConfig {
    GptConfig::new(3, 2, 32, 16, 67, bias, dropout).expect("a valid small model")
}

fn data(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = Rng::new(seed);
    let v = cfg.vocab_size as u64;
    let inputs = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|_| rng.below(v) as i32).collect();
    targets[0] = -1;
    (inputs, targets)
}

fn engine(cfg: &GptConfig, p: &[f32], rc: Recompute) -> CpuEngine {
    let mut e = CpuEngine::new(cfg.clone(), p.to_vec(), 11, 2).expect("a CPU engine");
    e.set_recompute(rc);
    assert_eq!(e.recompute(), rc);
    e
}

/// `got` and `want` hold the same bits; a mismatch names the first tensor and element.
fn same_bits(what: &str, layout: &ParamLayout, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        let t = layout
            .tensors
            .iter()
            .find(|t| (t.offset..t.offset + t.len).contains(&i))
            .map_or("?".to_string(), |t| format!("{}[{}]", t.name, i - t.offset));
        panic!("{what}: {t} is {} but {} with recompute=0", got[i], want[i]);
    }
}

fn same_vec(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {} but {}", got[i], want[i]);
    }
}

/// Every level against level 0: two accumulated micro-steps at each T in `ts` (one
/// engine, activations reallocated for each shape), an AdamW step after each, then the
/// evaluation loss and logits.
fn check(bias: bool, dropout: f32, b: usize, ts: &[usize]) {
    let cfg = cfg(bias, dropout);
    let layout = ParamLayout::new(&cfg);
    let p = perturbed_params(&cfg, 3);
    let hp = AdamWConfig {
        grad_clip: 1.0,
        ..AdamWConfig::default()
    };
    let mut engines: Vec<CpuEngine> = LEVELS.iter().map(|&rc| engine(&cfg, &p, rc)).collect();
    for (step, &t) in ts.iter().enumerate() {
        let label = format!("bias={bias} dropout={dropout} B={b} T={t} step {step}");
        let (inputs, targets) = data(&cfg, b, t, 100 + step as u64);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
        };
        let mut results = Vec::new();
        for e in engines.iter_mut() {
            e.zero_grad();
            let l1 = e.forward_backward(batch, 0.5).unwrap();
            let l2 = e.forward_backward(batch, 0.5).unwrap();
            let grads = e.grads();
            let norm = e.step(&hp, 1e-2);
            results.push((l1, l2, grads, norm, e.params()));
        }
        let want = &results[0];
        assert!(
            want.0.is_finite() && want.0 > 0.0,
            "{label}: loss {}",
            want.0
        );
        assert!(
            want.2.iter().any(|&g| g != 0.0),
            "{label}: all-zero gradients"
        );
        for (rc, got) in LEVELS.iter().zip(&results).skip(1) {
            let what = format!("{label} recompute={}", rc.level());
            assert_eq!(got.0.to_bits(), want.0.to_bits(), "{what}: first loss");
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "{what}: second loss");
            same_bits(&format!("{what} gradient"), &layout, &got.2, &want.2);
            assert_eq!(got.3.to_bits(), want.3.to_bits(), "{what}: gradient norm");
            same_bits(
                &format!("{what} parameters after AdamW"),
                &layout,
                &got.4,
                &want.4,
            );
        }
    }
    let t = ts[0];
    let (inputs, targets) = data(&cfg, b, t, 7);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let want_loss = engines[0].loss(batch).unwrap();
    let want_logits = engines[0].logits(batch).unwrap();
    for (rc, e) in LEVELS.iter().zip(engines.iter_mut()).skip(1) {
        let what = format!("bias={bias} dropout={dropout} recompute={}", rc.level());
        assert_eq!(
            e.loss(batch).unwrap().to_bits(),
            want_loss.to_bits(),
            "{what}: eval loss"
        );
        same_vec(
            &format!("{what} logits"),
            &e.logits(batch).unwrap(),
            &want_logits,
        );
    }
}

#[test]
fn gradients_are_bit_identical_without_dropout() {
    check(true, 0.0, 2, &[16, 16, 9]);
    check(false, 0.0, 3, &[16, 5, 16]);
}

#[test]
fn gradients_are_bit_identical_with_dropout() {
    check(true, 0.2, 2, &[16, 16, 11]);
    check(false, 0.1, 2, &[16, 7]);
}

/// The level changed on a live engine takes effect at the next pass and keeps the results
/// on the level-0 engine's track.
#[test]
fn switching_levels_between_steps() {
    let cfg = cfg(true, 0.1);
    let layout = ParamLayout::new(&cfg);
    let p = perturbed_params(&cfg, 9);
    let hp = AdamWConfig::default();
    let mut base = engine(&cfg, &p, Recompute::Nothing);
    let mut moving = engine(&cfg, &p, Recompute::GeluLayerNorm);
    for (step, rc) in [
        Recompute::GeluLayerNorm,
        Recompute::Nothing,
        Recompute::Gelu,
        Recompute::GeluLayerNorm,
    ]
    .into_iter()
    .enumerate()
    {
        moving.set_recompute(rc);
        let (inputs, targets) = data(&cfg, 2, 16, 50 + step as u64);
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b: 2,
            t: 16,
        };
        base.zero_grad();
        moving.zero_grad();
        let lb = base.forward_backward(batch, 1.0).unwrap();
        let lm = moving.forward_backward(batch, 1.0).unwrap();
        assert_eq!(lm.to_bits(), lb.to_bits(), "step {step}: loss");
        let what = format!("step {step} (recompute={})", rc.level());
        same_bits(&what, &layout, &moving.grads(), &base.grads());
        base.step(&hp, 3e-3);
        moving.step(&hp, 3e-3);
    }
    same_bits(
        "final parameters",
        &layout,
        &moving.params(),
        &base.params(),
    );
}

/// Level 1 drops every layer's N x 4C GELU output for one shared buffer, level 2 also the
/// 2 x N x C LayerNorm outputs for one shared N x C buffer.
#[test]
fn activation_memory_shrinks_by_the_recomputed_buffers() {
    let cfg = cfg(false, 0.0);
    let e = engine(&cfg, &perturbed_params(&cfg, 1), Recompute::Nothing);
    let (l, c) = (cfg.n_layer as u64, cfg.n_embd as u64);
    for (b, t) in [(2usize, 16usize), (4, 8)] {
        let n = (b * t) as u64;
        let bytes = |rc| e.activation_bytes(b, t, rc).expect("the CPU engine knows");
        let (b0, b1, b2) = (
            bytes(Recompute::Nothing),
            bytes(Recompute::Gelu),
            bytes(Recompute::GeluLayerNorm),
        );
        assert_eq!(b0 - b1, 4 * (l - 1) * n * 4 * c, "B={b} T={t}: level 1");
        assert_eq!(b1 - b2, 4 * (2 * l - 1) * n * c, "B={b} T={t}: level 2");
    }
    // gpt2 124M at T = 1024: 11 x 12 MiB per row at level 1, another 23 x 3 MiB at level
    // 2 (the figures BENCHMARKS.md quotes).
    let gpt2 = GptConfig::new(12, 12, 768, 1024, 50257, false, 0.0).unwrap();
    for b in [8usize, 16, 32] {
        let bytes = |rc| nanogpt::engine::cpu::activation_bytes(&gpt2, b, 1024, rc);
        let mib = |x: u64| x >> 20;
        let (b0, b1, b2) = (
            bytes(Recompute::Nothing),
            bytes(Recompute::Gelu),
            bytes(Recompute::GeluLayerNorm),
        );
        assert_eq!(mib(b0 - b1), 11 * 12 * b as u64, "B={b}");
        assert_eq!(mib(b1 - b2), 23 * 3 * b as u64, "B={b}");
        eprintln!(
            "gpt2 B={b} T=1024 CPU activations: {:.2} / {:.2} / {:.2} GiB at recompute 0 / 1 / 2",
            b0 as f64 / (1u64 << 30) as f64,
            b1 as f64 / (1u64 << 30) as f64,
            b2 as f64 / (1u64 << 30) as f64
        );
    }
}
