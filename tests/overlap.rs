//! Gradient reduction overlapped with the backward pass (`overlap_grad_reduce`) over the
//! TCP ring on loopback: overlap on and off give bit-identical losses and checkpoints on 2
//! and 3 ranks, with zero_stage 0 and 1, gradient accumulation, dropout and many small
//! buckets; the CPU engine reports every gradient element exactly once, in backward order,
//! with its final value (recompute 0 and 2); a rank killed during training still stops the
//! others with an error naming it.

mod common;

use common::dist::{
    assert_same_checkpoint, assert_stopped_naming_rank_1, fault_in_rank_1, loss_bits, run_ranks_ok,
    UNTIL_A_FAULT,
};
use common::{prepare_data, tiny_train_args};
use nanogpt::dist::overlap::BucketPlan;
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::{Batch, Engine, GradReady, Recompute};
use nanogpt::model::{GptConfig, ParamLayout};
use std::path::Path;
use std::time::Duration;

fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (x, y) = (loss_bits(a), loss_bits(b));
    assert_eq!(x.len(), 5 + 3 * 2, "{what}: {x:?}");
    assert_eq!(x, y, "{what}: losses differ");
    assert_same_checkpoint(a, b, what);
}

/// A 4-block model, 2 micro-steps per rank, dropout and clipping active.
fn run_args(data: &Path, out: &Path, world: usize, extra: &[&str]) -> Vec<String> {
    let accum = format!("--gradient_accumulation_steps={}", 2 * world);
    let mut e = vec![
        "--n_layer=4",
        accum.as_str(),
        "--batch_size=2",
        "--max_iters=4",
        "--eval_interval=2",
        "--eval_iters=2",
        "--log_interval=1",
        "--dropout=0.1",
        "--grad_clip=0.05",
        "--dist_timeout=20",
    ];
    e.extend_from_slice(extra);
    tiny_train_args(data, out, &e)
}

#[test]
fn overlap_on_and_off_agree_bit_for_bit_on_2_and_3_ranks_with_zero_0_and_1() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    for world in [2usize, 3] {
        for zero in ["0", "1"] {
            let z = format!("--zero_stage={zero}");
            let off = cwd.join(format!("off_w{world}_z{zero}"));
            let on = cwd.join(format!("on_w{world}_z{zero}"));
            let log_off = run_ranks_ok(
                cwd,
                world,
                &run_args(&data, &off, world, &[&z, "--overlap_grad_reduce=False"]),
            );
            assert!(!log_off.contains("overlapped"), "{log_off}");
            // bucket_cap_mb=0: one bucket per block, plus ln_f and the embeddings.
            let log_on = run_ranks_ok(
                cwd,
                world,
                &run_args(&data, &on, world, &[&z, "--bucket_cap_mb=0"]),
            );
            assert!(
                log_on
                    .contains("gradient reduction overlapped with the backward pass in 6 buckets"),
                "{log_on}"
            );
            assert_same_run(&off, &on, &format!("{world} ranks, zero_stage {zero}"));
        }
    }
    // Default buckets (25 MiB): the tiny model is one bucket.
    let one = cwd.join("on_w2_default");
    let log = run_ranks_ok(cwd, 2, &run_args(&data, &one, 2, &[]));
    assert!(log.contains("in 1 buckets"), "{log}");
    assert_same_run(&cwd.join("off_w2_z0"), &one, "2 ranks, one bucket");
}

/// Reports of one `forward_backward_notify`: (start, host values at the report).
fn reports(engine: &mut CpuEngine, batch: Batch) -> (f32, Vec<(usize, Vec<f32>)>) {
    let mut seen = Vec::new();
    let mut hook = |g: GradReady| {
        let host = g.host.expect("the CPU engine reports host gradients");
        assert_eq!(host.len(), g.len);
        seen.push((g.start, host.to_vec()));
    };
    let loss = engine
        .forward_backward_notify(batch, 0.5, &mut hook)
        .unwrap();
    (loss, seen)
}

#[test]
fn the_cpu_engine_reports_every_gradient_once_in_backward_order_with_final_values() {
    for bias in [false, true] {
        let cfg = GptConfig::new(3, 2, 16, 8, 50, bias, 0.1).unwrap();
        let layout = ParamLayout::new(&cfg);
        let inputs: Vec<u32> = (0..16).map(|i| (i * 7 % 50) as u32).collect();
        let targets: Vec<i32> = (0..16).map(|i| i * 11 % 50).collect();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b: 2,
            t: 8,
        };
        for rc in [Recompute::Nothing, Recompute::GeluLayerNorm] {
            let mut plain = CpuEngine::from_seed(cfg.clone(), 5, 2).unwrap();
            let mut notified = CpuEngine::from_seed(cfg.clone(), 5, 2).unwrap();
            plain.set_recompute(rc);
            notified.set_recompute(rc);
            // Two micro-steps: the reports of the second carry the accumulated sums.
            let l0 = plain.forward_backward(batch, 0.5).unwrap();
            let l1 = plain.forward_backward(batch, 0.5).unwrap();
            assert_eq!(notified.forward_backward(batch, 0.5).unwrap(), l0);
            let (loss, seen) = reports(&mut notified, batch);
            assert_eq!(loss.to_bits(), l1.to_bits(), "{rc:?}");
            let grads = notified.grads();
            let want = plain.grads();
            assert!(
                grads == want,
                "{rc:?} bias {bias}: notify changed the gradients"
            );
            // Coverage: each element exactly once; ranges descend (backward order).
            let mut covered = vec![0u8; layout.total];
            for (start, vals) in &seen {
                (*start..start + vals.len()).for_each(|i| covered[i] += 1);
                // Nothing is written after its report.
                assert!(
                    vals[..] == grads[*start..start + vals.len()],
                    "{rc:?}: range at {start} changed after its report"
                );
            }
            assert!(covered.iter().all(|&c| c == 1), "{rc:?} bias {bias}");
            for w in seen.windows(2) {
                assert_eq!(w[1].0 + w[1].1.len(), w[0].0, "adjacent, descending");
            }
            assert_eq!(seen.len(), cfg.n_layer + 2);
            assert_eq!(seen[0].0, layout.lnf_w, "ln_f first");
            assert_eq!(seen.last().unwrap().0, 0, "embeddings last");
            // The plan's segments are the engine's reports.
            let plan = BucketPlan::for_layout(&layout, 0.0);
            let starts: Vec<usize> = seen.iter().map(|s| s.0).collect();
            let plan_starts: Vec<usize> = plan.buckets.iter().map(|b| b.start).collect();
            assert_eq!(starts, plan_starts);
        }
    }
}

#[test]
fn a_killed_rank_stops_the_others_during_overlapped_training() {
    let args = |data: &Path, out: &Path| {
        let mut e = UNTIL_A_FAULT.to_vec();
        e.push("--bucket_cap_mb=0");
        run_args(data, out, 3, &e)
    };
    let limit = Duration::from_secs(3);
    let after = fault_in_rank_1(args, |c| c.kill().unwrap(), limit);
    let rank0 = &after.stderr[0];
    assert!(
        rank0.contains("overlapped with the backward pass"),
        "{rank0}"
    );
    assert_stopped_naming_rank_1(&after, "exited", limit);
}
