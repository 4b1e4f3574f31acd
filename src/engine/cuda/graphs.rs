//! The training micro-step as one CUDA graph (switch `graphs`): the forward pass, the loss
//! and the backward pass of a micro-batch, a few hundred kernel launches and matrix
//! products, are recorded once ([`crate::cuda::graph`]) and then replayed with one launch
//! (and likewise an evaluation pass, forward and loss, in a graph of its own),
//! so that the host's launch costs (several microseconds each) stop bounding small models,
//! whose kernels run for a few microseconds.
//!
//! A replay reruns the same launches with the same arguments and pointers, so the engine
//! captures only what repeats exactly:
//! - the same `StepKey` (batch shape, loss scale, number of counted targets, activation
//!   recomputation, whether the backward pass writes or adds the gradients), since those
//!   are baked into kernel arguments;
//! - the same memory: the engine's buffers grow on first use, so a micro-step first runs
//!   launch by launch, and the next one with the same key is captured only if no memory
//!   was allocated or freed in between ([`crate::cuda::driver::Context::memory_epoch`]); a
//!   graph is dropped as soon as memory changes, and recaptured the same way;
//! - no gradient buckets handed out during the backward pass (the host acts between
//!   launches there);
//! - the token inputs, the targets and the dropout seeds (new every micro-step: the
//!   dropout kernel reads them from a table in device memory, not from its arguments)
//!   reach the GPU through the pinned staging buffers, whose recorded copies read them at
//!   each replay: the host fills them before each launch.
//!
//! Each staging copy is captured with its completion event as a node right after it
//! ([`crate::cuda::driver::Staging`]), so a replay tells the host when the loss has
//! arrived, and when the inputs' copies are done, without waiting for the rest of the
//! graph: as launch by launch, the host returns the loss while the backward pass runs, and
//! prepares and launches the next micro-step behind it.
//!
//! A capture that fails (a driver without graphs, or a call the capture refuses) is said
//! once on stderr per kind of pass (training, evaluation) and the key is never captured
//! again: the micro-step runs launch by
//! launch, with the same results. Replays give the same bits as launch-by-launch runs (the
//! same kernels in the same order); tests/cuda_graphs.rs checks it.

use super::GradWrite;
use crate::cuda::graph::GraphExec;
use crate::engine::Recompute;

/// What a captured micro-step depends on besides memory: a replay is valid only for the
/// same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StepKey {
    /// A training micro-step (forward, loss, backward), or an evaluation pass (forward and
    /// loss: `Engine::loss`, which nanoGPT's `estimate_loss` runs `eval_iters` times per split).
    pub train: bool,
    pub b: usize,
    pub t: usize,
    /// The loss scale's bits (the gradient's factor is a kernel argument).
    pub loss_scale: u32,
    /// Targets that count in the loss (not -1): the mean's divisor is a kernel argument.
    pub counted: usize,
    pub recompute: Recompute,
    /// How the backward pass puts the gradients in their buffer: written (the first
    /// micro-step after `zero_grad`, switch `fresh_grads`) or added (evaluation: `Add`).
    pub write: GradWrite,
}

/// Where the engine keeps the graphs of each kind of pass: `graphs[StepKey::slot()]`.
/// The two kinds of training micro-step each keep theirs, so that accumulating several
/// micro-steps per optimizer step (one that writes the gradients, then ones that add)
/// replays both rather than recapturing one at every switch.
pub(super) const EVAL: usize = 0;
pub(super) const TRAIN: usize = 1;
pub(super) const TRAIN_FRESH: usize = 2;
pub(super) const SLOTS: usize = 3;

impl StepKey {
    /// [`TRAIN`], [`TRAIN_FRESH`] or [`EVAL`].
    pub fn slot(&self) -> usize {
        match (self.train, self.write) {
            (false, _) => EVAL,
            (true, GradWrite::Add) => TRAIN,
            (true, GradWrite::Overwrite) => TRAIN_FRESH,
        }
    }
}

/// How the micro-steps of this engine ran, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Micro-steps recorded into a new graph (each then launched once).
    pub captures: u64,
    /// Micro-steps run as one graph launch (captures included).
    pub replays: u64,
    /// Micro-steps run launch by launch.
    pub direct: u64,
}

impl std::ops::Add for GraphCounts {
    type Output = GraphCounts;
    fn add(self, o: GraphCounts) -> GraphCounts {
        GraphCounts {
            captures: self.captures + o.captures,
            replays: self.replays + o.replays,
            direct: self.direct + o.direct,
        }
    }
}

/// The engine's captured micro-step and what decides when to capture.
#[derive(Default)]
pub(super) struct StepGraphs {
    /// The graph, its key, and the memory epoch it was captured in.
    current: Option<(StepKey, u64, GraphExec<'static>)>,
    /// The last micro-step run launch by launch (its key and the memory epoch after it).
    last_direct: Option<(StepKey, u64)>,
    /// Keys whose capture failed: never tried again.
    refused: Vec<StepKey>,
    pub counts: GraphCounts,
}

/// What to do with a micro-step.
pub(super) enum Plan<'g> {
    /// Launch this graph.
    Replay(&'g GraphExec<'static>),
    /// Record the micro-step into a graph, then launch it.
    Capture,
    /// Run it launch by launch.
    Direct,
}

impl StepGraphs {
    /// The plan for a micro-step with `key` when memory is at `epoch`.
    pub fn plan(&mut self, key: StepKey, epoch: u64) -> Plan<'_> {
        if matches!(&self.current, Some((k, e, _)) if (*k, *e) != (key, epoch)) {
            self.current = None;
        }
        if let Some((_, _, exec)) = &self.current {
            return Plan::Replay(exec);
        }
        if self.last_direct == Some((key, epoch)) && !self.refused.contains(&key) {
            Plan::Capture
        } else {
            Plan::Direct
        }
    }

    /// A micro-step with `key` ran launch by launch; memory is now at `epoch`.
    pub fn ran_direct(&mut self, key: Option<StepKey>, epoch: u64) {
        self.counts.direct += 1;
        self.last_direct = key.map(|k| (k, epoch));
    }

    /// A capture of `key` at `epoch` succeeded: keeps `exec` and hands it back to launch.
    pub fn captured(
        &mut self,
        key: StepKey,
        epoch: u64,
        exec: GraphExec<'static>,
    ) -> &GraphExec<'static> {
        self.counts.captures += 1;
        &self.current.insert((key, epoch, exec)).2
    }

    /// A capture of `key` failed: it is never tried again.
    pub fn refuse(&mut self, key: StepKey) {
        self.refused.push(key);
        self.last_direct = None;
    }

    /// Whether any capture here has failed (the first failure is said, the rest not).
    pub fn refused_any(&self) -> bool {
        !self.refused.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: usize) -> StepKey {
        StepKey {
            train: true,
            b,
            t: 64,
            loss_scale: 1f32.to_bits(),
            counted: b * 64,
            recompute: Recompute::Nothing,
            write: GradWrite::Add,
        }
    }

    #[test]
    fn captures_only_the_second_step_of_a_shape_with_unchanged_memory() {
        let mut g = StepGraphs::default();
        assert!(matches!(g.plan(key(2), 5), Plan::Direct));
        g.ran_direct(Some(key(2)), 6); // memory grew during the first step
        assert!(matches!(g.plan(key(2), 7), Plan::Direct)); // and again since
        g.ran_direct(Some(key(2)), 7);
        assert!(matches!(g.plan(key(4), 7), Plan::Direct)); // another shape
        g.ran_direct(Some(key(4)), 7);
        assert!(matches!(g.plan(key(4), 7), Plan::Capture));
        // (a capture is recorded by the engine; without one the plan stays Capture)
        assert!(matches!(g.plan(key(4), 7), Plan::Capture));
        assert!(!g.refused_any());
        g.refuse(key(4));
        assert!(g.refused_any());
        g.refuse(key(2));
        g.ran_direct(Some(key(4)), 7);
        assert!(matches!(g.plan(key(4), 7), Plan::Direct)); // refused keys stay direct
        g.ran_direct(None, 7);
        assert!(matches!(g.plan(key(2), 7), Plan::Direct));
        assert_eq!(g.counts.direct, 5);
    }
}
