//! The training loop (nanoGPT's train.py): warmup + cosine LR, gradient accumulation,
//! clipping, periodic evaluation, logging with throughput and MFU, checkpoints with exact
//! resume, and data-parallel training over several ranks. The loop talks only to the
//! [`Engine`] and [`ProcessGroup`] traits and is independent of the device.
//!
//! Data parallelism follows nanoGPT's DDP recipe: `gradient_accumulation_steps` counts
//! micro-steps over all ranks and each of the W ranks runs `1/W` of them; gradients are
//! summed across ranks once, in the last micro-step; rank 0 alone logs and writes
//! files. With `overlap_grad_reduce` (the default) that sum runs bucket by bucket during
//! the last micro-step's backward pass ([`dist::overlap`]), with the same result bits.
//!
//! ZeRO stage 1 (`zero_stage=1`, more than one rank): each rank keeps the AdamW moments
//! of one contiguous shard of the parameters ([`dist::shard_ranges`]) instead of all of
//! them. A step reduce-scatters the gradients (each rank gets its shard's sum), forms the
//! global gradient norm from every rank's sum of squares, clips and updates its shard, and
//! all-gathers the parameters. Checkpoints hold the whole optimizer state (gathered before
//! saving), so a run resumes on any world size with either ZeRO stage.
//!
//! Unlike nanoGPT, the data a run draws does not depend on its world size. Every rank
//! holds the same base generators (the loader's train and val streams, the engine's
//! dropout stream, all saved in checkpoints); each iteration draws one key from each, and
//! global micro-step `j` reads its batch (and dropout masks) from a generator derived from
//! `(key, j)`, whichever rank runs it; evaluation batch `k` likewise. So 1 rank and W
//! ranks follow the same loss trajectory (up to float summation order), ranks never read
//! the same windows, and a run resumes exactly on any world size that divides
//! `gradient_accumulation_steps`.

use super::checkpoint::{self, Checkpoint, CheckpointPaths, TrainingState};
use super::metrics::MetricsLog;
use super::plot;
use crate::config::TrainConfig;
use crate::data::loader::{DataLoader, LoaderState};
use crate::data::meta::Meta;
use crate::data::Split;
use crate::dist::{self, overlap, DistOptions, LaunchInfo, ProcessGroup, SingleProcess};
use crate::engine::{self, Batch, Engine, GradReady, OptimizerState};
use crate::model::GptConfig;
use crate::optim::adamw;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

/// What a finished run reports (also used by tests of exact resume).
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    /// (iteration, training loss) for every step run: the mean over the iteration's
    /// micro-steps on all ranks.
    pub losses: Vec<(u64, f32)>,
    /// (iteration, train loss, val loss) for every evaluation run.
    pub evals: Vec<(u64, f32, f32)>,
    pub final_iter: u64,
    pub best_val_loss: f64,
    pub wall_seconds: f64,
}

/// The model, data loader and bookkeeping of one run.
struct Run {
    cfg: TrainConfig,
    model: GptConfig,
    engine: Box<dyn Engine>,
    loader: DataLoader,
    paths: CheckpointPaths,
    iter_num: u64,
    best_val_loss: f64,
    tokens_seen: u64,
    resumed_at: Option<u64>,
    /// World size of the run that wrote the checkpoint this run resumed from.
    resumed_world: Option<u64>,
    pg: Box<dyn ProcessGroup>,
    /// ZeRO-1 is on (`zero_stage=1` and more than one rank): every rank's range of the
    /// parameter layout, in rank order ([`dist::shard_ranges`]); this rank holds the AdamW
    /// moments of its own range and updates those parameters only.
    zero: Option<Vec<Range<usize>>>,
    /// `overlap_grad_reduce` is on (and more than one rank): the gradients are reduced
    /// bucket by bucket during the last micro-step's backward pass.
    overlap: Option<Overlap>,
}

/// The buckets of an overlapped gradient reduction ([`overlap`]).
struct Overlap {
    plan: overlap::BucketPlan,
    staging: overlap::Staging,
    /// The gradients live on the GPU and the group reduces them there (NCCL).
    device: bool,
}

/// RNG stream labels of the evaluation batches (see the module documentation).
const EVAL_TRAIN: u64 = 0x6576_616c_2e74_726e; // "eval.trn"
const EVAL_VAL: u64 = 0x6576_616c_2e76_616c; // "eval.val"

/// Draws this iteration's key from a base generator (advancing it by one step).
fn next_key(base: &mut Rng) -> u64 {
    base.next_u64()
}

/// Base generator states as bytes (for the broadcast from rank 0).
fn rng_bytes(states: &[[u64; 4]]) -> Vec<u8> {
    states
        .iter()
        .flat_map(|s| s.iter().flat_map(|w| w.to_le_bytes()))
        .collect()
}

fn rng_from_bytes(bytes: &[u8], k: usize) -> [u64; 4] {
    let mut s = [0u64; 4];
    for (i, w) in s.iter_mut().enumerate() {
        let o = 32 * k + 8 * i;
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        *w = u64::from_le_bytes(b);
    }
    s
}

/// Settings of this rank that differ from the shared config: the CPU cores are shared
/// between the ranks of a node, and `device=cuda` means the local rank's GPU.
fn rank_config(cfg: &TrainConfig, info: &LaunchInfo) -> TrainConfig {
    let mut c = cfg.clone();
    if c.threads == 0 && info.local_world_size > 1 {
        c.threads = (crate::config::resolve_threads(0) / info.local_world_size).max(1);
    }
    if c.device == "cuda" && info.world_size > 1 {
        c.device = format!("cuda:{}", info.local_rank);
    }
    c
}

/// What every rank must agree on: the config (less the per-rank keys `device` and
/// `threads`) and the model shape, as key/value pairs.
fn fingerprint(cfg: &TrainConfig, model: &GptConfig) -> Vec<(String, String)> {
    let mut fp: Vec<(String, String)> = match serde_json::to_value(cfg) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter(|(k, _)| k != "device" && k != "threads")
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        _ => Vec::new(),
    };
    fp.push((
        "model".into(),
        serde_json::to_string(model).unwrap_or_default(),
    ));
    fp.sort();
    fp
}

/// Runs `nanogpt train` with an effective configuration.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let started = Instant::now();
    let info = dist::env::detect(cfg.dist_env.parse()?)?;
    let world = info.world_size;
    if !cfg.gradient_accumulation_steps.is_multiple_of(world) {
        bail!(
            "gradient_accumulation_steps = {} is not divisible by the world size {world}: it counts \
             micro-steps over all ranks (as in nanoGPT), and each rank runs an equal share; set it \
             to a multiple of {world}",
            cfg.gradient_accumulation_steps
        );
    }
    let master = info.is_master();
    let out_dir = PathBuf::from(&cfg.out_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create out_dir {}", out_dir.display()))?;
    if master {
        for note in cfg.warnings() {
            eprintln!("note: {note}");
        }
        for path in crate::fsutil::remove_stale_temp_files(&out_dir) {
            eprintln!("removed {} (left by an interrupted write)", path.display());
        }
    }
    let rank_cfg = rank_config(cfg, &info);
    let mut run = Run::start(&rank_cfg, info.rank)?;
    if info.launcher != dist::Launcher::None {
        eprintln!(
            "rank {} (local rank {}) of world {}: host {}, device {} [{}]",
            info.rank,
            info.local_rank,
            world,
            dist::env::hostname(),
            run.engine.device_name(),
            info.launcher
        );
    }
    if world > 1 {
        let opts = DistOptions {
            timeout: std::time::Duration::from_secs(cfg.dist_timeout),
            fingerprint: fingerprint(cfg, &run.model),
        };
        // Asking the engine for its device gradients also makes its GPU context current,
        // which NCCL's communicator setup needs.
        let on_gpu = run.engine.device_grads().is_some();
        run.pg = dist::init_for_backend(&info, &opts, &cfg.backend, on_gpu)?;
        // Every rank starts from rank 0's parameters (as DDP does).
        let mut params = run.engine.params();
        run.pg.broadcast_f32(&mut params, 0)?;
        run.engine.set_params(&params);
        // ... and the same base generators (see the module documentation).
        let ls = run.loader.state();
        let mut rngs = rng_bytes(&[ls.train.state, ls.val.state, run.engine.rng_state()]);
        run.pg.broadcast(&mut rngs, 0)?;
        run.loader.set_state(&LoaderState {
            train: Rng {
                state: rng_from_bytes(&rngs, 0),
            },
            val: Rng {
                state: rng_from_bytes(&rngs, 1),
            },
        });
        run.engine.set_rng_state(rng_from_bytes(&rngs, 2));
        if master {
            eprintln!(
                "data parallel over {world} ranks ({}): {} micro-steps per rank per iteration",
                run.pg.describe(),
                cfg.gradient_accumulation_steps / world
            );
        }
        if cfg.zero_stage >= 1 {
            let ranges = dist::shard_ranges(run.engine.layout().total, world);
            run.engine.set_optimizer_shard(ranges[info.rank].clone());
            run.zero = Some(ranges);
        }
        if cfg.overlap_grad_reduce {
            if on_gpu && !run.pg.overlaps_device() {
                if master {
                    eprintln!(
                        "note: overlap_grad_reduce: the {} reduces GPU gradients through a host \
                         copy, so they are reduced after the backward pass (backend=nccl \
                         overlaps them)",
                        run.pg.describe()
                    );
                }
            } else {
                let plan = overlap::BucketPlan::for_layout(run.engine.layout(), cfg.bucket_cap_mb);
                if master {
                    let biggest = plan.buckets.iter().map(|b| b.len()).max().unwrap_or(0);
                    eprintln!(
                        "gradient reduction overlapped with the backward pass in {} buckets \
                         (largest {:.1} MiB; bucket_cap_mb = {})",
                        plan.len(),
                        biggest as f64 * 4.0 / (1 << 20) as f64,
                        cfg.bucket_cap_mb
                    );
                }
                run.overlap = Some(Overlap {
                    plan,
                    staging: overlap::Staging::default(),
                    device: on_gpu,
                });
            }
        }
    } else if cfg.zero_stage >= 1 && master {
        eprintln!(
            "note: zero_stage = {} with a single rank: there is nothing to shard, so the full \
             AdamW state stays on this rank (as with zero_stage = 0)",
            cfg.zero_stage
        );
    }
    if master {
        eprintln!(
            "{}",
            crate::optim::adamw_memory_line(run.engine.layout().total, world, run.zero.is_some())
        );
    }
    // After the optimizer shard is known: the free memory it gives is net of this rank's
    // moments.
    let (b, t) = (rank_cfg.batch_size, rank_cfg.block_size);
    if let Some(line) = engine::activation_summary(run.engine.as_ref(), b, t) {
        eprintln!("{line}");
    }
    if let Some(w) = run.resumed_world.filter(|w| *w != world as u64 && master) {
        eprintln!(
            "note: the checkpoint was written by a run of world size {w}; continuing on {world}. \
             Batches depend only on (seed, iteration, micro-step), so the run continues as it \
             would have on {w} ranks (up to float rounding)"
        );
    }
    if master {
        eprintln!("effective config:\n{}", cfg.to_toml_string());
        cfg.write_toml(&out_dir.join("config.toml"))?;
    }
    let mut summary = run.train_loop()?;
    run.pg.finish()?;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

impl Run {
    fn start(cfg: &TrainConfig, rank: usize) -> Result<Run> {
        let data_dir = cfg.data_dir_resolved();
        let out_dir = PathBuf::from(&cfg.out_dir);
        let paths = CheckpointPaths::new(&out_dir);
        let device = cfg.device_spec()?;
        let meta = Meta::load_opt(&data_dir)?;
        // Parameters come from the checkpoint or pretrained weights, or are initialised once
        // the data is known good.
        let mut pretrained: Option<Vec<f32>> = None;
        let (model, resume): (GptConfig, Option<Checkpoint>) = match cfg.init_from.as_str() {
            "scratch" => {
                let vocab = match &meta {
                    Some(m) => {
                        eprintln!("found vocab_size = {} (inside {})", m.vocab_size, Meta::path(&data_dir).display());
                        m.vocab_size
                    }
                    None => {
                        eprintln!("no meta.json in {}: using GPT-2's vocabulary of 50257 (padded to 50304)", data_dir.display());
                        50257
                    }
                };
                eprintln!("initializing a new model from scratch");
                (cfg.model_config(vocab)?, None)
            }
            "resume" => {
                let path = paths.latest();
                eprintln!("resuming training from {}", path.display());
                let ckpt = checkpoint::load(&path, true)?;
                let mut model = ckpt.state.model.clone();
                warn_model_overrides(cfg, &model);
                model.dropout = cfg.dropout as f32;
                (model, Some(ckpt))
            }
            // gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hub) or a Hugging Face GPT-2 directory;
            // the optimizer starts fresh
            other if crate::interop::Source::parse(other).is_some() => {
                let (model, params) =
                    crate::interop::init_for_training(other, cfg, meta.as_ref(), &data_dir)?;
                pretrained = Some(params);
                (model, None)
            }
            other => bail!("init_from={other:?} is not one of: scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a directory holding a Hugging Face GPT-2"),
        };
        if cfg.block_size > model.block_size {
            bail!(
                "block_size = {} is larger than the model's block_size {} (from the checkpoint)",
                cfg.block_size,
                model.block_size
            );
        }
        eprintln!(
            "number of parameters: {:.2}M",
            model.num_params_non_embedding() as f64 / 1e6
        );
        let mut loader = DataLoader::new(
            &data_dir,
            cfg.batch_size,
            cfg.block_size,
            model.vocab_size,
            cfg.seed,
            0, // every rank holds rank 0's base streams; ranks differ by micro-step index
        )
        .with_context(|| format!("loading training data from {}", data_dir.display()))?;
        let mut resume = resume;
        let params = match (resume.as_mut(), pretrained) {
            (Some(ckpt), _) => std::mem::take(&mut ckpt.params),
            (None, Some(p)) => p,
            (None, None) => crate::model::ParamLayout::new(&model).init_params(&model, cfg.seed),
        };
        let mut engine = engine::create(
            device,
            cfg.dtype_kind()?,
            model.clone(),
            params,
            cfg.seed,
            cfg.threads,
        )?;
        eprintln!("device: {}", engine.device_name());
        engine.set_recompute(cfg.recompute_level()?);
        engine.allocate_gradients()?;
        if let Some(m) = meta.as_ref().filter(|_| rank == 0) {
            m.save(&out_dir)?; // the sampler finds the vocabulary next to the checkpoints
        }
        let (mut iter_num, mut best_val_loss, mut tokens_seen, mut resumed_at) = (0, 1e9, 0, None);
        let mut resumed_world = None;
        if let Some(ckpt) = resume {
            let st = ckpt.state;
            let optimizer = ckpt.optimizer.context(
                "the checkpoint has no optimizer state, so training cannot resume exactly",
            )?;
            engine.set_optimizer_state(optimizer);
            engine.set_rng_state(st.engine_rng);
            let ls: LoaderState = serde_json::from_value(st.loader)
                .context("the checkpoint's data loader state is unreadable")?;
            loader.set_state(&ls);
            iter_num = st.iter_num;
            best_val_loss = st.best_val_loss;
            tokens_seen = st.tokens_seen;
            resumed_at = Some(iter_num);
            resumed_world = Some(st.world_size);
        }
        Ok(Run {
            cfg: cfg.clone(),
            model,
            engine,
            loader,
            paths,
            iter_num,
            best_val_loss,
            tokens_seen,
            resumed_at,
            resumed_world,
            pg: Box::new(SingleProcess),
            zero: None,
            overlap: None,
        })
    }

    fn estimate_loss(
        &mut self,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<i32>,
    ) -> Result<(f32, f32)> {
        // The eval_iters batches of each split are shared out over the ranks; batch k of the
        // evaluation at iteration i is the same whatever the world size.
        let mut sums = [0f32; 2];
        let (b, t) = (self.cfg.batch_size, self.cfg.block_size);
        let (rank, world) = (self.pg.rank() as u64, self.pg.world_size() as u64);
        let mut base = self.loader.state();
        let key = next_key(&mut base.val);
        for (k, split) in [Split::Train, Split::Val].into_iter().enumerate() {
            let mut sum = 0f64;
            for j in (rank..self.cfg.eval_iters).step_by(world as usize) {
                self.loader.set_state(&LoaderState {
                    train: Rng::derive(key ^ EVAL_TRAIN, j),
                    val: Rng::derive(key ^ EVAL_VAL, j),
                });
                self.loader.next_batch(split, inputs, targets)?;
                sum += self.engine.loss(Batch {
                    inputs,
                    targets,
                    b,
                    t,
                })? as f64;
            }
            sums[k] = sum as f32;
        }
        self.loader.set_state(&base);
        self.pg.all_reduce_sum(&mut sums)?;
        let n = self.cfg.eval_iters.max(1) as f32;
        Ok((sums[0] / n, sums[1] / n))
    }

    /// The AdamW state of the whole model on rank 0, which writes the checkpoints (`None`
    /// on the other ranks): this engine's, or with ZeRO-1 every rank's shard gathered (a
    /// collective: every rank must call it). Checkpoints always hold the whole state, so
    /// they do not depend on the world size or the ZeRO stage.
    ///
    /// The shards go to rank 0 one broadcast each (rooted at their rank), not an
    /// all-gather, so no other rank ever holds more than its own shard and one other: a
    /// whole copy per rank would need 8 bytes of host memory per parameter on each of them
    /// (12.5 GB each for GPT-2 XL) for a state only rank 0 writes.
    fn full_optimizer_state(&mut self) -> Result<Option<OptimizerState>> {
        let root = self.pg.rank() == 0;
        let Some(ranges) = &self.zero else {
            return Ok(root.then(|| self.engine.optimizer_state()));
        };
        let st = self.engine.optimizer_state();
        let (rank, total) = (self.pg.rank(), self.engine.layout().total);
        let mut gather = |part: &[f32]| -> Result<Vec<f32>> {
            let mut whole = vec![0f32; if root { total } else { 0 }];
            for (r, range) in ranges.iter().enumerate() {
                let mut piece = match r == rank {
                    true => part.to_vec(),
                    false => vec![0f32; range.len()],
                };
                self.pg
                    .broadcast_f32(&mut piece, r)
                    .context("gathering the sharded AdamW state for a checkpoint")?;
                if root {
                    whole[range.clone()].copy_from_slice(&piece);
                }
            }
            Ok(whole)
        };
        let (m, v) = (gather(&st.m)?, gather(&st.v)?);
        Ok(root.then_some(OptimizerState {
            m,
            v,
            step: st.step,
        }))
    }

    fn checkpoint(&self, loader: &LoaderState, optimizer: OptimizerState) -> Checkpoint {
        Checkpoint {
            params: self.engine.params(),
            state: TrainingState {
                iter_num: self.iter_num,
                best_val_loss: self.best_val_loss,
                model: self.model.clone(),
                config: serde_json::to_value(&self.cfg).unwrap_or_default(),
                engine_rng: self.engine.rng_state(),
                loader: serde_json::to_value(loader).unwrap_or_default(),
                optimizer_step: optimizer.step,
                tokens_seen: self.tokens_seen,
                world_size: self.pg.world_size() as u64,
            },
            optimizer: Some(optimizer),
        }
    }

    /// Rank 0 writes the checkpoint files; the other ranks wait for it at a barrier.
    fn save(&mut self, targets: &[PathBuf], loader: &LoaderState) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let Some(optimizer) = self.full_optimizer_state()? else {
            self.pg.barrier()?; // rank 0 writes; the others wait for it
            return Ok(());
        };
        let t0 = Instant::now();
        checkpoint::save_to_all(
            targets,
            self.engine.layout(),
            &self.checkpoint(loader, optimizer),
        )?;
        let names: Vec<String> = targets
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        eprintln!(
            "saved checkpoint at iter {} to {} ({} ms)",
            self.iter_num,
            names.join(", "),
            t0.elapsed().as_millis()
        );
        self.pg.barrier()?;
        Ok(())
    }

    /// ZeRO-1's optimizer step: reduce-scatter the gradients (each rank gets the sum of
    /// its own range; already done when `reduced`, by the overlapped reduction), the global pre-clip norm from every rank's sum of squares, AdamW on
    /// this rank's range, then all-gather the updated parameters. Each gradient is summed
    /// in the same order as the all-reduce of zero_stage 0 (on the TCP ring), and the
    /// clipped AdamW arithmetic is the same per element, so the two agree bit for bit
    /// (barring a one-ulp difference of the norm's f64 sum, which reaches the f32 norm
    /// only when it sits on a rounding boundary). Returns the pre-clip norm.
    fn zero_step(
        &mut self,
        ranges: &[Range<usize>],
        loss_sum: &mut [f32; 1],
        hp: &crate::optim::AdamWConfig,
        lr: f32,
        reduced: bool,
    ) -> Result<f32> {
        let shard = ranges[self.pg.rank()].clone();
        if !reduced {
            let on_device = self.engine.device_grads().and_then(|g| {
                self.pg
                    .reduce_scatter_sum_device(g.ptr, g.len, ranges, g.stream)
            });
            match on_device {
                Some(r) => r?,
                None => self
                    .pg
                    .reduce_scatter_sum(self.engine.grads_mut(), ranges)?,
            }
        }
        self.pg.all_reduce_sum(loss_sum)?;
        let local = self.engine.grad_sumsq(shard);
        let norm = adamw::norm_from_sumsq(dist::all_reduce_sum_f64(&mut *self.pg, local)?);
        self.engine.step_shard(hp, lr, norm);
        // The updated parameters: on the GPU when both can, else in the host buffer (in
        // place when the engine keeps its parameters there).
        let on_device = self
            .engine
            .device_params()
            .and_then(|p| self.pg.all_gather_device(p.ptr, p.len, ranges, p.stream));
        match on_device {
            Some(r) => {
                r?;
                self.engine.device_params_written();
            }
            None => match self.engine.params_mut() {
                Some(params) => self.pg.all_gather(params, ranges)?,
                None => {
                    let mut params = self.engine.params();
                    self.pg.all_gather(&mut params, ranges)?;
                    self.engine.set_params(&params);
                }
            },
        }
        Ok(norm)
    }

    fn train_loop(&mut self) -> Result<TrainSummary> {
        let cfg = self.cfg.clone();
        let out_dir = PathBuf::from(&cfg.out_dir);
        let schedule = cfg.lr_schedule();
        let hp = cfg.adamw();
        let (b, t, accum) = (
            cfg.batch_size,
            cfg.block_size,
            cfg.gradient_accumulation_steps,
        );
        let (rank, world) = (self.pg.rank(), self.pg.world_size());
        let master = rank == 0;
        let local_accum = accum / world;
        // Tokens, FLOPs and throughput count all ranks; MFU divides by all ranks' peak.
        let tokens_per_iter = (b * t * accum) as u64;
        if master {
            eprintln!("tokens per iteration will be: {tokens_per_iter}");
        }
        let flops_per_iter = self.model.flops_per_token(t) * tokens_per_iter as f64;
        // MFU against peak_flops when given, else the GPU's peak from the table.
        let peak_source = match (cfg.peak_flops, self.engine.peak_flops()) {
            (Some(p), _) => Some((p, "peak_flops")),
            (None, Some(p)) => Some((p, "this GPU's dense bf16 peak")),
            (None, None) => None,
        };
        if master {
            match peak_source {
                Some((p, from)) => eprintln!(
                    "MFU is measured against {:.1} TFLOP/s per rank ({from})",
                    p / 1e12
                ),
                None => eprintln!(
                    "no peak FLOP/s known for {}: logs show achieved GFLOP/s (set peak_flops for an MFU)",
                    self.engine.device_name()
                ),
            }
        }
        let peak = peak_source.map(|(p, _)| p * world as f64);
        // A resumed run starts by repeating the checkpoint iteration: drop its old records.
        let mut metrics = if master {
            Some(MetricsLog::open(
                &out_dir,
                self.resumed_at.map(|n| n.saturating_sub(1)),
            )?)
        } else {
            None
        };
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut summary = TrainSummary::default();
        let progress = if master {
            progress_bar(self.iter_num, cfg.max_iters)
        } else {
            indicatif::ProgressBar::hidden()
        };
        loop {
            let it = self.iter_num;
            let lr = schedule.lr_at(it) as f32;
            let mut save_to = Vec::new();
            // Checkpoints record the loader state from before this iteration's evaluation, so
            // a resumed run repeats the evaluation (as nanoGPT does) with the same batches.
            let loader_state = self.loader.state();
            if it.is_multiple_of(cfg.eval_interval.max(1)) {
                // Eval draws from its own loader streams; the prefetched train batch is kept.
                let (mut ei, mut et) = (Vec::new(), Vec::new());
                let (tl, vl) = self.estimate_loss(&mut ei, &mut et)?;
                if let Some(metrics) = metrics.as_mut() {
                    say(
                        &progress,
                        format!("step {it}: train loss {tl:.4}, val loss {vl:.4}"),
                    );
                    metrics.log(&json!({"kind": "eval", "iter": it, "train_loss": tl, "val_loss": vl, "lr": lr}))?;
                }
                summary.evals.push((it, tl, vl));
                // The same figures on every rank (reduced): all stop together.
                for (what, loss) in [("the train loss", tl), ("the val loss", vl)] {
                    if !loss.is_finite() {
                        return Err(diverged(
                            it,
                            &format!("{what} of the evaluation"),
                            loss,
                            &out_dir,
                        ));
                    }
                }
                let improved = (vl as f64) < self.best_val_loss;
                if improved {
                    self.best_val_loss = vl as f64;
                }
                if it > 0 && (improved || cfg.always_save_checkpoint) {
                    save_to.push(self.paths.latest());
                }
                if it > 0 && improved {
                    save_to.push(self.paths.best());
                }
                if let Some(Err(e)) = metrics
                    .as_ref()
                    .map(|m| plot::plot_metrics(m.path(), &out_dir.join(plot::LOSS_PLOT_FILE)))
                {
                    say(&progress, format!("warning: could not draw loss.png: {e}"));
                }
            }
            if it > 0 && cfg.keep_checkpoints_at.keeps(it) {
                save_to.push(self.paths.kept(it));
            }
            self.save(&save_to, &loader_state)?;
            if it == 0 && cfg.eval_only {
                break;
            }
            // One optimisation step: this rank's share of the micro-steps (global indices
            // rank*local_accum ..), each scaled by 1/accum so that the sum over ranks is the
            // mean over all micro-steps; one all-reduce of the gradients; clip; AdamW (with
            // ZeRO-1: reduce-scatter, clip and AdamW on this rank's shard, all-gather).
            let step_start = Instant::now();
            self.engine.zero_grad();
            let mut loss_sum = [0f32];
            let mut data_base = self.loader.state();
            let mut drop_base = Rng {
                state: self.engine.rng_state(),
            };
            let (data_key, drop_key) = (next_key(&mut data_base.train), next_key(&mut drop_base));
            // Set once the last micro-step's backward pass has reduced the gradients.
            let mut reduced = false;
            for j in 0..local_accum {
                let g = (rank * local_accum + j) as u64;
                self.loader.set_state(&LoaderState {
                    train: Rng::derive(data_key, g),
                    val: data_base.val.clone(),
                });
                self.engine.set_rng_state(Rng::derive(drop_key, g).state);
                self.loader
                    .next_batch(Split::Train, &mut inputs, &mut targets)?;
                let batch = Batch {
                    inputs: &inputs,
                    targets: &targets,
                    b,
                    t,
                };
                let scale = 1.0 / accum as f32;
                let last = j + 1 == local_accum;
                loss_sum[0] += match self.overlap.as_mut().filter(|_| last) {
                    // The last micro-step: reduce each bucket as the backward finishes it.
                    Some(ov) => {
                        let mode = match self.zero {
                            Some(_) => overlap::Reduce::ReduceScatter,
                            None => overlap::Reduce::AllReduce,
                        };
                        let fb = |e: &mut dyn Engine, hook: &mut (dyn FnMut(GradReady) + Send)| {
                            e.forward_backward_notify(batch, scale, hook)
                        };
                        // Read by the collectives only as the backward pass writes it.
                        let dev = self
                            .engine
                            .device_grads_for_backward()
                            .filter(|_| ov.device);
                        let out = match dev {
                            Some(dev) => overlap::reduce_during_backward_device(
                                &mut *self.pg,
                                &ov.plan,
                                mode,
                                dev,
                                &mut *self.engine,
                                fb,
                            ),
                            None => overlap::reduce_during_backward(
                                &mut *self.pg,
                                &ov.plan,
                                mode,
                                &mut ov.staging,
                                &mut *self.engine,
                                fb,
                            ),
                        };
                        reduced = true;
                        out??
                    }
                    None => self.engine.forward_backward(batch, scale)?,
                };
            }
            self.loader.set_state(&data_base);
            self.engine.set_rng_state(drop_base.state);
            let norm = match self.zero.clone() {
                Some(ranges) => self.zero_step(&ranges, &mut loss_sum, &hp, lr, reduced)?,
                None => {
                    if world > 1 {
                        // On the GPU when both the engine and the group can (NCCL), else on
                        // the host; already done when overlapped with the backward pass.
                        let on_device = self
                            .engine
                            .device_grads()
                            .filter(|_| !reduced)
                            .and_then(|g| self.pg.all_reduce_sum_device(g.ptr, g.len, g.stream));
                        match on_device {
                            Some(r) => r?,
                            None if reduced => {}
                            None => self.pg.all_reduce_sum(self.engine.grads_mut())?,
                        }
                        self.pg.all_reduce_sum(&mut loss_sum)?;
                    }
                    self.engine.step(&hp, lr)
                }
            };
            let loss = loss_sum[0] / accum as f32;
            // The loss is reduced over the ranks and the norm is global: all stop together.
            for (what, value) in [("the training loss", loss), ("the gradient norm", norm)] {
                if !value.is_finite() {
                    return Err(diverged(it, what, value, &out_dir));
                }
            }
            self.tokens_seen += tokens_per_iter;
            summary.losses.push((it, loss));
            let dt = step_start.elapsed().as_secs_f64();
            if let Some(metrics) = metrics
                .as_mut()
                .filter(|_| it.is_multiple_of(cfg.log_interval.max(1)))
            {
                let tok_s = tokens_per_iter as f64 / dt;
                let achieved = flops_per_iter / dt;
                let perf = match peak {
                    Some(p) => format!("mfu {:.2}%", 100.0 * achieved / p),
                    None => format!("{:.1} GFLOP/s", achieved / 1e9),
                };
                let rss = rss_mb();
                say(&progress, format!(
                    "iter {it}: loss {loss:.4}, lr {lr:.2e}, norm {norm:.4}, time {:.2}ms, {tok_s:.0} tok/s, {perf}",
                    dt * 1e3
                ));
                metrics.log(&json!({
                    "kind": "train", "iter": it, "loss": loss, "lr": lr, "grad_norm": norm,
                    "ms": dt * 1e3, "tokens_per_s": tok_s, "flops_per_s": achieved,
                    "mfu": peak.map(|p| achieved / p), "rss_mb": rss,
                }))?;
            }
            progress.inc(1);
            self.iter_num += 1;
            if self.iter_num > cfg.max_iters {
                break;
            }
        }
        progress.finish_and_clear();
        summary.final_iter = self.iter_num;
        summary.best_val_loss = self.best_val_loss;
        Ok(summary)
    }
}

fn progress_bar(start: u64, max_iters: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(max_iters + 1);
    pb.set_position(start);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} iters  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// nanoGPT resumes with the checkpoint's architecture; say so when the config disagrees.
fn warn_model_overrides(cfg: &TrainConfig, model: &GptConfig) {
    let pairs = [
        ("n_layer", cfg.n_layer, model.n_layer),
        ("n_head", cfg.n_head, model.n_head),
        ("n_embd", cfg.n_embd, model.n_embd),
    ];
    for (k, want, have) in pairs {
        if want != have {
            eprintln!("note: {k} = {want} in the config, but the checkpoint's model has {have}; using {have}");
        }
    }
    if cfg.block_size < model.block_size {
        eprintln!(
            "note: training on windows of block_size = {} tokens; the checkpoint's model was built for {}",
            cfg.block_size, model.block_size
        );
    }
}

/// Prints a log line above the progress bar, or plainly when there is no terminal.
fn say(progress: &indicatif::ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// The error that stops a run whose loss or gradient norm stopped being finite at
/// iteration `it`: before anything of that state is saved, so the checkpoints in `out_dir`
/// are all from before it (a checkpoint written at the next evaluation would hold
/// parameters that give NaN, over the last good one).
fn diverged(it: u64, what: &str, value: f32, out_dir: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!(
        "training diverged at iter {it}: {what} is {value}. Nothing from this point on was \
         saved: the checkpoints in {} are from before it. Lower learning_rate, raise \
         warmup_iters, set grad_clip (1.0 in nanoGPT's recipes) or check the data, then \
         resume from the last checkpoint (init_from=resume)",
        out_dir.display()
    )
}
