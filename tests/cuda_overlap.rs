//! `overlap_grad_reduce` on a GPU (else "skipped: no GPU"; NANOGPT_REQUIRE_GPU=1 makes that a
//! failure): the CUDA engine reports every gradient element exactly once, in backward order,
//! with its compute stream, and its gradients are those of a plain backward pass; a 1-rank
//! NCCL group reduces them bucket by bucket on its communication stream during the backward
//! pass (all-reduce and reduce-scatter buckets), which over one rank must leave every
//! gradient bit unchanged, and a training step after it matches a step without overlap.

mod common;

use common::gpu::{no_gpu, one_rank_nccl};
use common::model::{first_diff, patterned_batch};
use nanogpt::dist::overlap::{self, BucketPlan, Reduce};
use nanogpt::dist::ProcessGroup;
use nanogpt::engine::cuda::{CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine, GradReady};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;

fn engine(cfg: &GptConfig) -> CudaEngine {
    common::gpu::engine(cfg, 0, Precision::F32)
}

#[test]
fn cuda_reports_and_one_rank_nccl_overlap_leave_the_gradients_and_step_unchanged() {
    let test = "cuda_overlap";
    if no_gpu(test) {
        return;
    }
    let cfg = GptConfig::new(3, 2, 32, 16, 50, true, 0.1).unwrap();
    let layout = ParamLayout::new(&cfg);
    let (b, t) = (2, 16);
    let (inputs, targets) = patterned_batch(b * t, 0);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };

    // Reports: coverage, order and stream; gradients as without reports.
    let mut plain = engine(&cfg);
    let mut notified = engine(&cfg);
    plain.zero_grad();
    notified.zero_grad();
    let l0 = plain.forward_backward(batch, 0.5).unwrap();
    let stream = notified.device_grads().unwrap().stream;
    let mut seen = Vec::new();
    let l1 = notified
        .forward_backward_notify(batch, 0.5, &mut |g: GradReady| {
            assert!(
                g.host.is_none(),
                "the CUDA engine keeps gradients on the GPU"
            );
            assert_eq!(g.stream, Some(stream), "reports carry the compute stream");
            seen.push(g.range());
        })
        .unwrap();
    assert_eq!(l0.to_bits(), l1.to_bits());
    let (g0, g1) = (plain.grads(), notified.grads());
    assert_eq!(first_diff(&g0, &g1), None, "reports changed the gradients");
    let mut covered = vec![0u8; layout.total];
    for r in &seen {
        r.clone().for_each(|i| covered[i] += 1);
    }
    assert!(
        covered.iter().all(|&c| c == 1),
        "reports must cover every gradient exactly once: {seen:?}"
    );
    let plan = BucketPlan::for_layout(&layout, 0.0);
    assert_eq!(
        seen, plan.buckets,
        "reports in backward order, one per block"
    );

    // A 1-rank NCCL group: buckets enqueued during the backward pass (tiny buckets, then
    // reduce-scatter buckets), then a step; the same as a step without overlap.
    let mut pg = one_rank_nccl(test);
    assert!(pg.overlaps_device());
    let hp = AdamWConfig::default();
    for (mode, mb) in [(Reduce::AllReduce, 0.0), (Reduce::ReduceScatter, 0.0005)] {
        let mut plain = engine(&cfg);
        let mut over = engine(&cfg);
        plain.zero_grad();
        over.zero_grad();
        plain.forward_backward(batch, 0.5).unwrap();
        let plan = BucketPlan::for_layout(&layout, mb);
        let dev = over.device_grads().unwrap();
        let loss = overlap::reduce_during_backward_device(
            &mut pg,
            &plan,
            mode,
            dev,
            &mut over,
            |e: &mut dyn Engine, hook: &mut (dyn FnMut(GradReady) + Send)| {
                e.forward_backward_notify(batch, 0.5, hook)
            },
        )
        .unwrap_or_else(|e| panic!("{mode:?}: overlapped NCCL reduction failed: {e}"))
        .unwrap();
        assert_eq!(loss.to_bits(), l0.to_bits());
        assert_eq!(
            first_diff(&plain.grads(), &over.grads()),
            None,
            "{mode:?}, {} buckets: a 1-rank overlapped reduction changed the gradients",
            plan.len()
        );
        let (n0, n1) = (plain.step(&hp, 1e-3), over.step(&hp, 1e-3));
        assert_eq!(n0.to_bits(), n1.to_bits(), "{mode:?}: gradient norm");
        assert_eq!(
            first_diff(&plain.params(), &over.params()),
            None,
            "{mode:?}: parameters after the step"
        );
    }
    pg.finish().unwrap();
}
