//! The training micro-step as a CUDA graph (`NANOGPT_CUDA_DISABLE=graphs` turns it off):
//! an engine with graphs and one without, over the same parameters and batches, give the
//! same bits (losses, gradients, parameters after AdamW) through several optimizer steps
//! with gradient accumulation, while the batch shape, the number of counted targets and the
//! activation recomputation change (each a new capture), with evaluation passes in between,
//! in fp32 and bf16 mode, and with dropout (new seeds every micro-step, handed to the replay
//! through device memory). Graphs are checked to be really used (micro-steps and
//! evaluation passes replayed, a capture per new shape).
//!
//! Without a GPU every GPU test prints "skipped: no GPU (why)" and passes;
//! NANOGPT_REQUIRE_GPU=1 makes that a failure.

mod common;

use common::gpu::no_gpu;
use common::model::{first_diff, perturbed_params, random_batch};
use nanogpt::engine::cuda::graphs::GraphCounts;
use nanogpt::engine::cuda::switches::Switches;
use nanogpt::engine::cuda::{CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine, Recompute};
use nanogpt::model::GptConfig;
use nanogpt::optim::AdamWConfig;

fn engine(cfg: &GptConfig, p: &[f32], precision: Precision, graphs: bool) -> CudaEngine {
    let s = if graphs {
        Switches::default()
    } else {
        Switches::parse("graphs").expect("graphs is a known optimisation")
    };
    CudaEngine::with_switches(cfg.clone(), p.to_vec(), 5, 0, precision, s)
        .unwrap_or_else(|e| panic!("CUDA engine ({precision:?}, {s:?}): {e}"))
}

fn same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some((i, a, b)) = first_diff(got, want) {
        panic!("{what}: element {i} is {a:e} with graphs and {b:e} without");
    }
}

/// One phase of the schedule: `steps` optimizer steps of `accum` micro-steps over `b` rows
/// of `t` tokens, every target counted or not, with this recomputation.
struct Phase {
    b: usize,
    t: usize,
    accum: usize,
    steps: usize,
    all_counted: bool,
    recompute: Recompute,
}

/// Runs `phases` on an engine with graphs and one without and compares every loss,
/// gradient and parameter bit for bit; returns the graph engine's counts (training
/// micro-steps, evaluation passes).
fn compare(
    label: &str,
    cfg: &GptConfig,
    precision: Precision,
    phases: &[Phase],
) -> (GraphCounts, GraphCounts) {
    let p = perturbed_params(cfg, 11);
    let mut with = engine(cfg, &p, precision, true);
    let mut without = engine(cfg, &p, precision, false);
    let hp = AdamWConfig::default();
    let mut seed = 100;
    for (k, ph) in phases.iter().enumerate() {
        with.set_recompute(ph.recompute);
        without.set_recompute(ph.recompute);
        for step in 0..ph.steps {
            let what = format!("{label}, phase {k} (B={} T={}), step {step}", ph.b, ph.t);
            with.zero_grad();
            without.zero_grad();
            for micro in 0..ph.accum {
                seed += 1;
                let (inputs, mut targets) = random_batch(cfg, ph.b, ph.t, seed);
                if ph.all_counted {
                    targets.iter_mut().for_each(|t| *t = t.abs());
                }
                let batch = Batch {
                    inputs: &inputs,
                    targets: &targets,
                    b: ph.b,
                    t: ph.t,
                };
                let scale = 1.0 / ph.accum as f32;
                let a = with.forward_backward(batch, scale).unwrap();
                let b = without.forward_backward(batch, scale).unwrap();
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{what}, micro-step {micro}: loss {a} vs {b}"
                );
            }
            same(
                &format!("{what}: gradients"),
                &with.grads(),
                &without.grads(),
            );
            let na = with.step(&hp, 1e-3);
            let nb = without.step(&hp, 1e-3);
            assert_eq!(na.to_bits(), nb.to_bits(), "{what}: gradient norm");
            // An evaluation pass between steps (same buffers, no backward).
            let (inputs, targets) = random_batch(cfg, ph.b, ph.t, seed + 1000);
            let batch = Batch {
                inputs: &inputs,
                targets: &targets,
                b: ph.b,
                t: ph.t,
            };
            let (ea, eb) = (with.loss(batch).unwrap(), without.loss(batch).unwrap());
            assert_eq!(ea.to_bits(), eb.to_bits(), "{what}: evaluation loss");
        }
        same(
            &format!("{label}, after phase {k}: parameters"),
            &with.params(),
            &without.params(),
        );
    }
    for off in [without.graph_counts(), without.eval_graph_counts()] {
        assert_eq!(
            (off.captures, off.replays),
            (0, 0),
            "{label}: graphs switched off were used"
        );
    }
    (with.graph_counts(), with.eval_graph_counts())
}

fn schedule() -> Vec<Phase> {
    let phase = |b, t, accum, steps, all_counted, recompute| Phase {
        b,
        t,
        accum,
        steps,
        all_counted,
        recompute,
    };
    vec![
        phase(2, 16, 3, 3, true, Recompute::Nothing),
        // A shorter sequence (activations reused), then the first shape again.
        phase(2, 8, 2, 2, true, Recompute::Nothing),
        phase(2, 16, 2, 2, true, Recompute::Nothing),
        // Ignored targets (another divisor of the loss), then recomputation.
        phase(2, 16, 2, 2, false, Recompute::Nothing),
        phase(2, 16, 2, 2, false, Recompute::GeluLayerNorm),
    ]
}

fn check_modes(label: &str, cfg: &GptConfig) {
    for precision in [Precision::F32, Precision::Bf16] {
        let phases = schedule();
        let micro: u64 = phases.iter().map(|p| (p.accum * p.steps) as u64).sum();
        let (c, e) = compare(label, cfg, precision, &phases);
        eprintln!("{label} {precision:?}: {c:?} of {micro} micro-steps; evaluation {e:?}");
        // One evaluation pass per step; the second of a phase (same shape, same memory)
        // is captured.
        let evals: u64 = phases.iter().map(|p| p.steps as u64).sum();
        assert_eq!(e.replays + e.direct, evals, "{label} {precision:?}: {e:?}");
        assert!(
            e.replays >= phases.len() as u64,
            "{label} {precision:?}: {e:?}"
        );
        assert_eq!(c.replays + c.direct, micro, "{label} {precision:?}: {c:?}");
        // Every phase changes the key, so each captures at least once, after at least one
        // micro-step run launch by launch. A phase has two kinds of micro-step, each with
        // a graph of its own (the first after zero_grad writes the gradients, the others
        // add to them: `fresh_grads`), and a kind is captured again where the engine's
        // buffers grew after its capture (e.g. at the optimizer's first step).
        assert!(
            c.captures >= phases.len() as u64 && c.captures <= 4 * phases.len() as u64,
            "{label} {precision:?}: {c:?}"
        );
        assert!(
            c.replays >= micro / 2,
            "{label} {precision:?}: too few replays: {c:?}"
        );
    }
}

#[test]
fn graphs_give_the_same_bits_as_launch_by_launch() {
    if no_gpu("graphs_give_the_same_bits_as_launch_by_launch") {
        return;
    }
    check_modes(
        "bias",
        &GptConfig::new(2, 4, 64, 16, 96, true, 0.0).unwrap(),
    );
    check_modes(
        "no bias, odd sizes",
        &GptConfig::new(2, 3, 48, 16, 67, false, 0.0).unwrap(),
    );
}

#[test]
fn dropout_draws_new_masks_in_every_replay() {
    if no_gpu("dropout_draws_new_masks_in_every_replay") {
        return;
    }
    let cfg = GptConfig::new(2, 4, 64, 16, 96, true, 0.1).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let phases = [Phase {
            b: 2,
            t: 16,
            accum: 2,
            steps: 4,
            all_counted: true,
            recompute: Recompute::Nothing,
        }];
        let (c, e) = compare("dropout", &cfg, precision, &phases);
        assert!(e.replays >= 1, "{precision:?}: evaluation {e:?}");
        assert_eq!(c.replays + c.direct, 8, "{precision:?}: {c:?}");
        assert!(c.captures >= 1 && c.replays >= 4, "{precision:?}: {c:?}");
    }
}
