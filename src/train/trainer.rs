//! The training loop (nanoGPT's train.py): warmup + cosine LR, gradient accumulation,
//! clipping, periodic evaluation, logging with throughput and MFU, checkpoints with exact
//! resume. The loop talks only to the [`Engine`] trait and is independent of the device.

use super::checkpoint::{self, Checkpoint, CheckpointPaths, TrainingState};
use super::metrics::MetricsLog;
use super::plot;
use crate::config::TrainConfig;
use crate::data::loader::{DataLoader, LoaderState};
use crate::data::meta::Meta;
use crate::data::Split;
use crate::engine::{self, Batch, Engine};
use crate::model::GptConfig;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports (also used by tests of exact resume).
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    /// (iteration, training loss of that iteration's last micro-step) for every step run.
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
}

/// Runs `nanogpt train` with an effective configuration.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let started = Instant::now();
    let out_dir = PathBuf::from(&cfg.out_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create out_dir {}", out_dir.display()))?;
    for note in cfg.warnings() {
        eprintln!("note: {note}");
    }
    remove_stale_temp_files(&out_dir);
    let mut run = Run::start(cfg)?;
    eprintln!("effective config:\n{}", cfg.to_toml_string());
    cfg.write_toml(&out_dir.join("config.toml"))?;
    let mut summary = run.train_loop()?;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

impl Run {
    fn start(cfg: &TrainConfig) -> Result<Run> {
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
            0,
        )
        .with_context(|| format!("loading training data from {}", data_dir.display()))?;
        let mut resume = resume;
        let params = match (resume.as_mut(), pretrained) {
            (Some(ckpt), _) => std::mem::take(&mut ckpt.params),
            (None, Some(p)) => p,
            (None, None) => crate::model::ParamLayout::new(&model).init_params(&model, cfg.seed),
        };
        let mut engine = engine::create(device, model.clone(), params, cfg.seed, cfg.threads)?;
        eprintln!("device: {}", engine.device_name());
        if let Some(m) = &meta {
            m.save(&out_dir)?; // the sampler finds the vocabulary next to the checkpoints
        }
        let (mut iter_num, mut best_val_loss, mut tokens_seen, mut resumed_at) = (0, 1e9, 0, None);
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
        })
    }

    fn estimate_loss(
        &mut self,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<i32>,
    ) -> Result<(f32, f32)> {
        let mut out = [0f32; 2];
        let (b, t) = (self.cfg.batch_size, self.cfg.block_size);
        for (k, split) in [Split::Train, Split::Val].into_iter().enumerate() {
            let mut sum = 0f64;
            for _ in 0..self.cfg.eval_iters {
                self.loader.next_batch(split, inputs, targets)?;
                sum += self.engine.loss(Batch {
                    inputs,
                    targets,
                    b,
                    t,
                })? as f64;
            }
            out[k] = (sum / self.cfg.eval_iters.max(1) as f64) as f32;
        }
        Ok((out[0], out[1]))
    }

    fn checkpoint(&self, loader: &LoaderState) -> Checkpoint {
        Checkpoint {
            params: self.engine.params(),
            optimizer: Some(self.engine.optimizer_state()),
            state: TrainingState {
                iter_num: self.iter_num,
                best_val_loss: self.best_val_loss,
                model: self.model.clone(),
                config: serde_json::to_value(&self.cfg).unwrap_or_default(),
                engine_rng: self.engine.rng_state(),
                loader: serde_json::to_value(loader).unwrap_or_default(),
                optimizer_step: self.engine.optimizer_state().step,
                tokens_seen: self.tokens_seen,
                world_size: 1,
            },
        }
    }

    fn save(&self, targets: &[PathBuf], loader: &LoaderState) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        checkpoint::save_to_all(targets, self.engine.layout(), &self.checkpoint(loader))?;
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
        Ok(())
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
        let tokens_per_iter = (b * t * accum) as u64;
        eprintln!("tokens per iteration will be: {tokens_per_iter}");
        let flops_per_iter = self.model.flops_per_token(t) * tokens_per_iter as f64;
        let peak = cfg.peak_flops;
        // A resumed run starts by repeating the checkpoint iteration: drop its old records.
        let mut metrics = MetricsLog::open(&out_dir, self.resumed_at.map(|n| n.saturating_sub(1)))?;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut summary = TrainSummary::default();
        let progress = progress_bar(self.iter_num, cfg.max_iters);
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
                say(
                    &progress,
                    format!("step {it}: train loss {tl:.4}, val loss {vl:.4}"),
                );
                metrics.log(&json!({"kind": "eval", "iter": it, "train_loss": tl, "val_loss": vl, "lr": lr}))?;
                summary.evals.push((it, tl, vl));
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
                if let Err(e) =
                    plot::plot_metrics(metrics.path(), &out_dir.join(plot::LOSS_PLOT_FILE))
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
            // One optimisation step: accumulate over micro-steps, clip, AdamW. Batches are
            // drawn here (not prefetched) so a checkpoint's loader state is exactly the state
            // before this step's data.
            let step_start = Instant::now();
            self.engine.zero_grad();
            let mut loss = 0f32;
            for _ in 0..accum {
                self.loader
                    .next_batch(Split::Train, &mut inputs, &mut targets)?;
                loss = self.engine.forward_backward(
                    Batch {
                        inputs: &inputs,
                        targets: &targets,
                        b,
                        t,
                    },
                    1.0 / accum as f32,
                )?;
            }
            let norm = self.engine.step(&hp, lr);
            if !loss.is_finite() {
                bail!("loss became {loss} at iter {it}; lower learning_rate or check the data");
            }
            self.tokens_seen += tokens_per_iter;
            summary.losses.push((it, loss));
            let dt = step_start.elapsed().as_secs_f64();
            if it.is_multiple_of(cfg.log_interval.max(1)) {
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

/// Removes temporary files that a killed run left behind while writing into `out_dir`
/// (`.<name>.tmp<pid>`); complete files are never touched.
fn remove_stale_temp_files(out_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            && name.contains(".tmp")
            && std::fs::remove_file(entry.path()).is_ok()
        {
            {
                eprintln!(
                    "removed {} (left by an interrupted write)",
                    entry.path().display()
                );
            }
        }
    }
}

/// Path of the checkpoint a resumed run reads.
pub fn resume_path(out_dir: &Path) -> PathBuf {
    CheckpointPaths::new(out_dir).latest()
}

/// Prints a log line above the progress bar, or plainly when there is no terminal.
fn say(progress: &indicatif::ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}
