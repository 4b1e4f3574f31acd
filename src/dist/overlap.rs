//! Gradient reduction overlapped with the backward pass (config key `overlap_grad_reduce`),
//! bucketed as PyTorch DDP does: the backward pass reports each range of the gradient
//! buffer it has finished ([`crate::engine::Engine::forward_backward_notify`]), ranges are
//! gathered into buckets of at least `bucket_cap_mb` ([`BucketPlan`]), and each complete
//! bucket is reduced across ranks while the backward pass computes the next ones.
//!
//! Host gradients (the CPU engine, the TCP ring): the engine's reports are copied into
//! staging buffers owned by this module (the engine's buffer is never shared between
//! threads); a communication thread, which holds the process group for the duration of the
//! backward pass, reduces each bucket as it arrives; afterwards the sums are copied back.
//! Device gradients (NCCL): each complete bucket is enqueued on the group's communication
//! stream behind the compute stream's position
//! ([`ProcessGroup::enqueue_bucket_device`]), and the compute stream waits for them all
//! before the optimizer step ([`ProcessGroup::finish_buckets_device`]).
//!
//! The plan depends only on the parameter layout and `bucket_cap_mb`, which every rank
//! shares, and buckets are reduced in plan order whatever order an engine reports in, so
//! all ranks issue the same collectives. Each bucket is reduced with the whole buffer's
//! shard ranges cut to it ([`super::bucket_chunks`]): on the TCP ring every element is
//! summed in exactly the order of the reduction without overlap, so results are
//! bit-identical either way, for all-reduce (`zero_stage=0`) and reduce-scatter
//! (`zero_stage=1`) alike.

use super::{bucket_chunks, DistError, ProcessGroup};
use crate::engine::{DeviceGrads, Engine, GradReady};
use crate::model::ParamLayout;
use std::ops::Range;
use std::sync::mpsc;

/// PyTorch DDP's default bucket size (`bucket_cap_mb`), in MiB.
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

/// What a bucket's reduction leaves on each rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// Every rank gets the sum of every element (`zero_stage=0`).
    AllReduce,
    /// Each rank gets the sum of its own shard's elements (`zero_stage=1`).
    ReduceScatter,
}

/// Contiguous ranges of the gradient buffer, in the order the backward pass finishes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Range<usize>>,
    pub total: usize,
}

impl BucketPlan {
    /// Merges `segments` (ranges in the order the backward pass finishes them, covering
    /// `0..total` once) into buckets: consecutive adjacent segments are joined until a
    /// bucket holds at least `min_elems` values, so a bucket is whole segments.
    pub fn new(segments: &[Range<usize>], total: usize, min_elems: usize) -> BucketPlan {
        let mut buckets: Vec<Range<usize>> = Vec::new();
        for seg in segments.iter().filter(|s| !s.is_empty()) {
            match buckets.last_mut() {
                Some(b) if b.len() < min_elems && seg.end == b.start => b.start = seg.start,
                Some(b) if b.len() < min_elems && seg.start == b.end => b.end = seg.end,
                _ => buckets.push(seg.clone()),
            }
        }
        BucketPlan { buckets, total }
    }

    /// The plan for a GPT-2 layout: segments ln_f, blocks L-1 .. 0, then the embeddings
    /// (wte, which the tied LM head also writes, and wpe), the order of both engines'
    /// backward passes; buckets of at least `bucket_mb` MiB of f32 gradients.
    pub fn for_layout(layout: &ParamLayout, bucket_mb: f64) -> BucketPlan {
        let first_block = layout.blocks.first().map_or(layout.lnf_w, |o| o.ln1_w);
        let mut segments = Vec::with_capacity(layout.blocks.len() + 2);
        segments.push(layout.lnf_w..layout.total);
        for (l, o) in layout.blocks.iter().enumerate().rev() {
            let end = layout.blocks.get(l + 1).map_or(layout.lnf_w, |n| n.ln1_w);
            segments.push(o.ln1_w..end);
        }
        segments.push(0..first_block);
        let min_elems = (bucket_mb.max(0.0) * (1 << 20) as f64 / 4.0) as usize;
        BucketPlan::new(&segments, layout.total, min_elems)
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Staging buffers of a [`BucketPlan`] (one per bucket), kept between iterations.
#[derive(Debug, Default)]
pub struct Staging {
    bufs: Vec<Vec<f32>>,
}

impl Staging {
    fn prepare(&mut self, plan: &BucketPlan) {
        if self.bufs.len() != plan.len()
            || self
                .bufs
                .iter()
                .zip(&plan.buckets)
                .any(|(b, r)| b.len() != r.len())
        {
            self.bufs = plan.buckets.iter().map(|r| vec![0f32; r.len()]).collect();
        }
    }
}

/// Which buckets the reports so far have completed; hands them on in plan order.
struct Progress<'p> {
    plan: &'p BucketPlan,
    filled: Vec<usize>,
    next: usize,
}

impl<'p> Progress<'p> {
    fn new(plan: &'p BucketPlan) -> Self {
        Progress {
            plan,
            filled: vec![0; plan.len()],
            next: 0,
        }
    }

    /// Counts `range` as reported; calls `each(bucket, overlap in the layout)` for every
    /// bucket it meets.
    fn add(&mut self, range: Range<usize>, mut each: impl FnMut(usize, Range<usize>)) {
        for (i, b) in self.plan.buckets.iter().enumerate() {
            let (lo, hi) = (range.start.max(b.start), range.end.min(b.end));
            if lo < hi {
                self.filled[i] += hi - lo;
                each(i, lo..hi);
            }
        }
    }

    /// The next bucket in plan order, if complete (advancing past it).
    fn pop_complete(&mut self) -> Option<usize> {
        let i = self.next;
        (i < self.plan.len() && self.filled[i] >= self.plan.buckets[i].len()).then(|| {
            self.next += 1;
            i
        })
    }
}

/// Runs `backward` (a training forward + backward of `engine` that reports through the
/// hook it is given) while a communication thread reduces each bucket of `plan` over `pg`
/// as soon as the reports complete it; then writes the sums into the engine's gradients
/// (with [`Reduce::ReduceScatter`] only this rank's shard, as a reduce-scatter would).
/// Buckets no report carried host data for are read from the engine after the backward
/// pass. Returns `backward`'s result; a failed collective is the outer error. When
/// `backward` fails, the reductions still in flight finish and the gradients are left as
/// they are.
pub fn reduce_during_backward<T, X>(
    pg: &mut dyn ProcessGroup,
    plan: &BucketPlan,
    mode: Reduce,
    staging: &mut Staging,
    engine: &mut dyn Engine,
    backward: impl FnOnce(&mut dyn Engine, &mut (dyn FnMut(GradReady) + Send)) -> Result<T, X>,
) -> Result<Result<T, X>, DistError> {
    staging.prepare(plan);
    let (rank, world, total) = (pg.rank(), pg.world_size(), plan.total);
    let mut bufs: Vec<Option<Vec<f32>>> = staging.bufs.drain(..).map(Some).collect();
    let (outcome, done, comm_result) = std::thread::scope(|sc| {
        let (tx, rx) = mpsc::channel::<(usize, Vec<f32>)>();
        let comm = sc.spawn(move || {
            let mut done = Vec::new();
            let mut result = Ok(());
            for (i, mut buf) in rx {
                if result.is_ok() {
                    let chunks = bucket_chunks(total, world, &plan.buckets[i]);
                    result = match mode {
                        Reduce::AllReduce => pg.all_reduce_sum_chunks(&mut buf, &chunks),
                        Reduce::ReduceScatter => pg.reduce_scatter_sum(&mut buf, &chunks),
                    };
                }
                done.push((i, buf));
            }
            (done, result)
        });
        let mut progress = Progress::new(plan);
        let send = |bufs: &mut [Option<Vec<f32>>], i: usize| {
            if let Some(buf) = bufs[i].take() {
                // A closed channel means the communication thread stopped on an error,
                // which its join reports.
                let _ = tx.send((i, buf));
            }
        };
        let outcome = {
            let mut hook = |g: GradReady| {
                let Some(host) = g.host else { return };
                let start = g.start;
                progress.add(g.range(), |i, part| {
                    if let Some(buf) = bufs[i].as_mut() {
                        let b0 = plan.buckets[i].start;
                        buf[part.start - b0..part.end - b0]
                            .copy_from_slice(&host[part.start - start..part.end - start]);
                    }
                });
                while let Some(i) = progress.pop_complete() {
                    send(&mut bufs, i);
                }
            };
            backward(&mut *engine, &mut hook)
        };
        if outcome.is_ok() {
            // Buckets the reports did not carry (engines without host reports).
            let rest: Vec<usize> = (progress.next..plan.len()).collect();
            if !rest.is_empty() {
                let grads = engine.grads_mut();
                for i in rest {
                    if let Some(buf) = bufs[i].as_mut() {
                        buf.copy_from_slice(&grads[plan.buckets[i].clone()]);
                    }
                    send(&mut bufs, i);
                }
            }
        }
        drop(tx);
        let (done, result) = comm.join().unwrap_or_else(|_| {
            (
                Vec::new(),
                Err(DistError::Other(
                    "the gradient communication thread panicked".into(),
                )),
            )
        });
        (outcome, done, result)
    });
    for (i, buf) in done {
        bufs[i] = Some(buf);
    }
    let copy_back = outcome.is_ok() && comm_result.is_ok();
    if copy_back {
        let grads = engine.grads_mut();
        for (i, b) in plan.buckets.iter().enumerate() {
            let Some(buf) = bufs[i].as_ref() else {
                continue;
            };
            match mode {
                Reduce::AllReduce => grads[b.clone()].copy_from_slice(buf),
                Reduce::ReduceScatter => {
                    let mine = bucket_chunks(total, world, b)[rank].clone();
                    grads[b.start + mine.start..b.start + mine.end].copy_from_slice(&buf[mine]);
                }
            }
        }
    }
    staging.bufs = bufs
        .into_iter()
        .zip(&plan.buckets)
        .map(|(b, r)| b.unwrap_or_else(|| vec![0f32; r.len()]))
        .collect();
    comm_result?;
    Ok(outcome)
}

/// [`reduce_during_backward`] for gradients on a GPU (`dev`, from
/// [`Engine::device_grads`]) and a group that reduces device memory: each complete bucket
/// is enqueued on the group's communication stream behind the compute stream's position at
/// the report ([`ProcessGroup::enqueue_bucket_device`]); after the backward pass the
/// compute stream waits for all of them ([`ProcessGroup::finish_buckets_device`]), so the
/// optimizer step sees the sums.
pub fn reduce_during_backward_device<T, X>(
    pg: &mut dyn ProcessGroup,
    plan: &BucketPlan,
    mode: Reduce,
    dev: DeviceGrads,
    engine: &mut dyn Engine,
    backward: impl FnOnce(&mut dyn Engine, &mut (dyn FnMut(GradReady) + Send)) -> Result<T, X>,
) -> Result<Result<T, X>, DistError> {
    let (world, total) = (pg.world_size(), plan.total);
    let scatter = mode == Reduce::ReduceScatter;
    let mut first_err: Option<DistError> = None;
    let mut enqueue = |pg: &mut dyn ProcessGroup, i: usize, stream: u64| {
        if first_err.is_some() {
            return;
        }
        let b = &plan.buckets[i];
        let chunks = bucket_chunks(total, world, b);
        let ptr = dev.ptr + 4 * b.start as u64;
        first_err = match pg.enqueue_bucket_device(ptr, b.len(), &chunks, scatter, stream) {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(e),
            None => Some(DistError::Other(
                "this process group cannot reduce GPU gradients during the backward pass; \
                 set overlap_grad_reduce=False"
                    .into(),
            )),
        };
    };
    let mut progress = Progress::new(plan);
    let outcome = {
        let pg = &mut *pg;
        let mut hook = |g: GradReady| {
            let Some(stream) = g.stream else { return };
            progress.add(g.range(), |_, _| {});
            while let Some(i) = progress.pop_complete() {
                enqueue(&mut *pg, i, stream);
            }
        };
        backward(&mut *engine, &mut hook)
    };
    if outcome.is_ok() {
        for i in progress.next..plan.len() {
            enqueue(&mut *pg, i, dev.stream);
        }
    }
    let finished = pg.finish_buckets_device(dev.stream).unwrap_or(Ok(()));
    if let Some(e) = first_err {
        return Err(e);
    }
    finished?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptConfig;

    #[test]
    fn plans_cover_the_layout_once_in_backward_order() {
        for bias in [false, true] {
            let cfg = GptConfig::new(4, 2, 16, 8, 50, bias, 0.0).unwrap();
            let layout = ParamLayout::new(&cfg);
            // Tiny buckets: one per segment, ln_f first and the embeddings last.
            let plan = BucketPlan::for_layout(&layout, 0.0);
            assert_eq!(plan.len(), 4 + 2);
            assert_eq!(plan.buckets[0], layout.lnf_w..layout.total);
            assert_eq!(plan.buckets[1].start, layout.blocks[3].ln1_w);
            assert_eq!(*plan.buckets.last().unwrap(), 0..layout.blocks[0].ln1_w);
            for big in [0.0, 0.001, 0.01, 1.0, 25.0] {
                let plan = BucketPlan::for_layout(&layout, big);
                let mut covered = vec![0u8; layout.total];
                for w in plan.buckets.windows(2) {
                    assert_eq!(w[1].end, w[0].start, "descending and adjacent");
                }
                for b in &plan.buckets {
                    b.clone().for_each(|i| covered[i] += 1);
                }
                assert!(covered.iter().all(|&c| c == 1), "{big}");
            }
            assert_eq!(BucketPlan::for_layout(&layout, 25.0).len(), 1);
        }
    }

    #[test]
    fn complete_buckets_go_in_plan_order() {
        let plan = BucketPlan::new(&[6..10, 3..6, 0..3], 10, 1);
        let mut p = Progress::new(&plan);
        p.add(0..3, |_, _| {});
        assert_eq!(p.pop_complete(), None, "bucket 0 first");
        p.add(6..10, |_, _| {});
        assert_eq!(p.pop_complete(), Some(0));
        assert_eq!(p.pop_complete(), None);
        p.add(3..6, |_, _| {});
        assert_eq!(p.pop_complete(), Some(1));
        assert_eq!(p.pop_complete(), Some(2));
        assert_eq!(p.pop_complete(), None);
        let merged = BucketPlan::new(&[6..10, 3..6, 0..3], 10, 5);
        assert_eq!(merged.buckets, vec![3..10, 0..3]);
    }
}
