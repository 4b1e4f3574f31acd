//! Subcommand bodies behind the thin `main.rs`: each turns parsed arguments into library
//! calls and prints results for people.

use crate::bench::{self, BenchSpec};
use crate::config::{BenchConfig, SampleConfig, TrainConfig};
use crate::data::prepare;
use crate::engine;
use crate::model::ParamLayout;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub fn prepare(dataset: &str, input: Option<PathBuf>, out_dir: Option<PathBuf>) -> Result<()> {
    let out_dir = out_dir.unwrap_or_else(|| Path::new("data").join(dataset));
    match dataset {
        "shakespeare_char" => {
            let r = prepare::prepare_char(input.as_deref(), &out_dir)?;
            eprintln!("{r}");
            Ok(())
        }
        other => bail!(
            "unknown dataset '{other}'; this version prepares: shakespeare_char \
             (use --input FILE for your own text)"
        ),
    }
}

pub fn train(args: &[String]) -> Result<()> {
    let cfg = TrainConfig::load(args)?;
    let summary = crate::train::train(&cfg)?;
    eprintln!(
        "done: {} iterations in {:.1} s, best val loss {:.4}",
        summary.final_iter, summary.wall_seconds, summary.best_val_loss
    );
    Ok(())
}

pub fn sample(args: &[String]) -> Result<()> {
    let cfg = SampleConfig::load(args)?;
    crate::sample::run(&cfg)
}

/// `nanogpt export`: a checkpoint of `out_dir` as a Hugging Face GPT-2 directory `to`.
pub fn export(out_dir: &Path, checkpoint: Option<&Path>, to: &Path) -> Result<()> {
    let report = crate::interop::export_run(out_dir, checkpoint, to)?;
    eprintln!("{report}");
    Ok(())
}

pub fn bench(args: &[String]) -> Result<()> {
    let cfg = BenchConfig::load(args)?;
    if cfg.sgemm > 0 {
        let threads = crate::config::resolve_threads(cfg.threads);
        let (ms, gflops) = bench::sgemm(cfg.sgemm, threads, cfg.iters as usize);
        println!(
            "sgemm {n}x{n}x{n} on {threads} threads: median {ms:.2} ms, {gflops:.1} GFLOP/s",
            n = cfg.sgemm
        );
        return Ok(());
    }
    let model = cfg.model_config()?;
    let params = ParamLayout::new(&model).init_params(&model, cfg.seed);
    let mut eng = engine::create(
        cfg.device_spec()?,
        model.clone(),
        params,
        cfg.seed,
        cfg.threads,
    )?;
    let spec = BenchSpec {
        batch_size: cfg.batch_size,
        block_size: cfg.block_size,
        grad_accum: cfg.gradient_accumulation_steps,
        iters: cfg.iters as usize,
        warmup: cfg.warmup as usize,
        learning_rate: cfg.learning_rate as f32,
        adamw: cfg.adamw(),
        seed: cfg.seed,
    };
    eprintln!(
        "bench: {} layers, {} heads, {} channels, block {}, batch {}, vocab {} (padded {}), {:.2}M parameters, {}",
        model.n_layer,
        model.n_head,
        model.n_embd,
        model.block_size,
        cfg.batch_size,
        model.vocab_size,
        model.padded_vocab_size,
        model.num_params_non_embedding() as f64 / 1e6,
        eng.device_name()
    );
    let r = bench::run(eng.as_mut(), &spec)?;
    let mfu = cfg
        .peak_flops
        .map(|p| format!(", mfu {:.2}%", 100.0 * r.gflops * 1e9 / p))
        .unwrap_or_default();
    println!(
        "median {:.2} ms/iter (min {:.2}, max {:.2}), {:.0} tokens/s, {:.1} GFLOP/s{mfu}",
        r.median_ms, r.min_ms, r.max_ms, r.tokens_per_s, r.gflops
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// The offline-capable quick start: prepare data/shakespeare_char, train nanoGPT's CPU
/// recipe for a few minutes, then print samples.
pub fn quickstart(input: Option<PathBuf>, overrides: &[String]) -> Result<()> {
    let data_dir = Path::new("data/shakespeare_char");
    if !data_dir.join("train.bin").exists() || input.is_some() {
        prepare("shakespeare_char", input, Some(data_dir.to_path_buf()))?;
    }
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/train_shakespeare_char.toml");
    let mut args: Vec<String> = Vec::new();
    if config.exists() {
        args.push(config.display().to_string());
    }
    let recipe = [
        "--dataset=shakespeare_char",
        "--out_dir=out-quickstart",
        "--device=cpu",
        "--eval_interval=250",
        "--eval_iters=20",
        "--log_interval=50",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        "--max_iters=2000",
        "--lr_decay_iters=2000",
        "--dropout=0.0",
        "--learning_rate=1e-3",
        "--min_lr=1e-4",
        "--beta2=0.99",
        "--warmup_iters=100",
        "--always_save_checkpoint=false",
        "--gradient_accumulation_steps=1",
        "--keep_checkpoints_at=every 500",
    ];
    args.extend(recipe.iter().map(|s| s.to_string()));
    args.extend(overrides.iter().cloned());
    let cfg = TrainConfig::load(&args)?;
    let summary = crate::train::train(&cfg)?;
    eprintln!(
        "trained {} iterations in {:.1} s; best val loss {:.4}. Samples:",
        summary.final_iter, summary.wall_seconds, summary.best_val_loss
    );
    let sample_args: Vec<String> = [
        format!("--out_dir={}", cfg.out_dir),
        "--num_samples=2".into(),
        "--max_new_tokens=300".into(),
        "--device=cpu".into(),
    ]
    .into();
    sample(&sample_args)
}

/// `nanogpt launch`: runs this node's ranks and exits with the launcher's code (the first
/// failing rank's, 130 after Ctrl-C).
pub fn launch(spec: crate::dist::launch::LaunchSpec) -> Result<()> {
    let code = crate::dist::launch::run(&spec)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `nanogpt doctor`: prints the report (text or JSON) and exits 1 when a requested check
/// did not pass.
pub fn doctor(cpu_only: bool, require_gpu: bool, json: bool, gemm_size: usize) -> Result<()> {
    use crate::doctor::{Mode, Options};
    if gemm_size == 0 || !gemm_size.is_multiple_of(8) {
        bail!("--gemm-size={gemm_size}: use a positive multiple of 8 (e.g. 4096)");
    }
    let opts = Options {
        mode: if cpu_only {
            Mode::CpuOnly
        } else if require_gpu {
            Mode::RequireGpu
        } else {
            Mode::Auto
        },
        gemm_size,
        ..Options::default()
    };
    let report = crate::doctor::run(&opts, &crate::cuda::discover::SearchEnv::from_process());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::doctor::render::text(&report));
    }
    if report.exit_code != 0 {
        std::process::exit(report.exit_code);
    }
    Ok(())
}
