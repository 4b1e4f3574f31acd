//! Subcommand bodies behind the thin `main.rs`: each turns parsed arguments into library
//! calls and prints results for people.

use crate::bench::{self, BenchSpec};
use crate::config::{BenchConfig, SampleConfig, TrainConfig};
use crate::data::bpe as prepare_bpe;
use crate::data::prepare;
use crate::engine;
use crate::model::ParamLayout;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Options of `nanogpt prepare`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// What to prepare: shakespeare_char, openwebtext, or the format of your corpus (text,
    /// jsonl, parquet) given with --input GLOB or --dataset REPO --files GLOB
    pub dataset: String,
    /// Corpus file(s): a path or a quoted glob (shakespeare_char: one text file)
    #[arg(long)]
    pub input: Option<String>,
    /// Where to write train.bin, val.bin (default data/DATASET)
    #[arg(long = "out_dir", alias = "out-dir")]
    pub out_dir: Option<PathBuf>,
    /// Hugging Face Hub dataset repository to read (e.g. HuggingFaceFW/fineweb)
    #[arg(long = "dataset")]
    pub hub_dataset: Option<String>,
    /// With --dataset: glob of repository files (e.g. 'sample/10BT/*.parquet')
    #[arg(long)]
    pub files: Option<String>,
    /// With --dataset or openwebtext: repository revision (branch, tag or commit)
    #[arg(long)]
    pub revision: Option<String>,
    /// Hub download cache (default HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)
    #[arg(long = "cache_dir", alias = "cache-dir")]
    pub cache_dir: Option<PathBuf>,
    /// Tokenizer threads (default: all cores)
    #[arg(long = "num_proc", alias = "num-proc", default_value_t = 0)]
    pub num_proc: usize,
    /// jsonl / parquet: the field or column holding the text
    #[arg(long, default_value = "text")]
    pub column: String,
    /// text: one document per file (document), per blank-line paragraph, or per line
    #[arg(long = "sample_by", alias = "sample-by", default_value = "document")]
    pub sample_by: String,
    /// Fraction of documents in val.bin (nanoGPT: 0.0005)
    #[arg(long = "test_size", alias = "test-size", default_value_t = prepare_bpe::NANOGPT_TEST_SIZE)]
    pub test_size: f64,
    /// Seed of the split's shuffle (nanoGPT: 2357)
    #[arg(long, default_value_t = prepare_bpe::NANOGPT_SEED)]
    pub seed: u64,
    /// Output format: nanogpt (train.bin/val.bin) or llmc (headered shards)
    #[arg(long, default_value = "nanogpt")]
    pub format: String,
    /// llmc format: tokens per shard
    #[arg(
        long = "shard_size",
        alias = "shard-size",
        default_value_t = 100_000_000
    )]
    pub shard_size: u64,
    /// Do not refuse when the disk looks too small
    #[arg(long = "skip_space_check", alias = "skip-space-check")]
    pub skip_space_check: bool,
}

impl PrepareArgs {
    /// Arguments for `dataset` with every option at its default.
    pub fn for_dataset(dataset: &str) -> PrepareArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: PrepareArgs,
        }
        Wrap::parse_from(["prepare", dataset]).args
    }
}

pub fn prepare(dataset: &str, input: Option<PathBuf>, out_dir: Option<PathBuf>) -> Result<()> {
    let mut args = PrepareArgs::for_dataset(dataset);
    args.input = input.map(|p| p.display().to_string());
    args.out_dir = out_dir;
    prepare_with(&args)
}

/// `nanogpt prepare`: character-level Shakespeare, or GPT-2 BPE of OpenWebText / any corpus.
pub fn prepare_with(a: &PrepareArgs) -> Result<()> {
    use crate::data::hub_source;
    use crate::data::sources::{Format, SampleBy, Source};
    let dataset = a.dataset.as_str();
    let out_dir = a.out_dir.clone().unwrap_or_else(|| {
        let name = match (&a.hub_dataset, dataset) {
            (Some(repo), "text" | "jsonl" | "parquet") => {
                repo.rsplit('/').next().unwrap_or(repo).to_lowercase()
            }
            _ => dataset.to_string(),
        };
        Path::new("data").join(name)
    });
    let format = match dataset {
        "shakespeare_char" => {
            let r = prepare::prepare_char(a.input.as_deref().map(Path::new), &out_dir)?;
            eprintln!("{r}");
            return Ok(());
        }
        "openwebtext" | "parquet" => Format::Parquet,
        "jsonl" => Format::Jsonl,
        "text" => Format::Text(a.sample_by.parse::<SampleBy>().map_err(anyhow::Error::msg)?),
        other => bail!(
            "unknown dataset '{other}'; this version prepares: shakespeare_char, openwebtext,              and text|jsonl|parquet corpora (--input GLOB, or --dataset REPO --files GLOB)"
        ),
    };
    let output = match a.format.as_str() {
        "nanogpt" => prepare_bpe::OutputFormat::NanoGpt,
        "llmc" => prepare_bpe::OutputFormat::Llmc {
            name: out_dir
                .file_name()
                .map_or("data".into(), |n| n.to_string_lossy().into_owned()),
            shard_tokens: a.shard_size.clamp(1, i32::MAX as u64),
        },
        other => bail!("--format {other:?} is not one of: nanogpt, llmc"),
    };
    let hub = match (dataset, &a.hub_dataset, &a.files) {
        ("openwebtext", None, None) => Some(hub_source::openwebtext(a.revision.as_deref())),
        ("openwebtext", _, _) => bail!("openwebtext reads Skylion007/openwebtext; use `nanogpt prepare parquet --dataset REPO --files GLOB` for other repositories"),
        (_, Some(repo), Some(files)) => Some(hub_source::HubDataset {
            repo: repo.clone(),
            revision: a.revision.clone().unwrap_or_else(|| "main".into()),
            files: files.clone(),
        }),
        (_, Some(repo), None) => bail!("--dataset {repo} needs --files GLOB (e.g. --files 'sample/10BT/*.parquet')"),
        (_, None, Some(_)) => bail!("--files needs --dataset REPO"),
        (_, None, None) => None,
    };
    let files = match (&hub, &a.input) {
        (Some(_), Some(_)) => bail!("give either --input or --dataset, not both"),
        (Some(ds), None) => {
            let mut client = crate::hub::HubClient::from_env()
                .map_err(|e| anyhow::anyhow!("Hugging Face Hub settings: {e}"))?;
            let cache_dir = match &a.cache_dir {
                Some(d) => {
                    client = client.with_cache_dir(d.clone());
                    d.clone()
                }
                None => default_hub_cache(),
            };
            hub_source::fetch(&client, ds, &out_dir, &cache_dir, 1.3, a.skip_space_check)?
        }
        (None, Some(glob)) => Source::local_files(glob)?,
        (None, None) => {
            bail!("{dataset}: give the corpus with --input GLOB or --dataset REPO --files GLOB")
        }
    };
    let job = prepare_bpe::BpeJob {
        source: Source {
            format,
            files,
            column: a.column.clone(),
        },
        out_dir,
        test_size: a.test_size,
        seed: a.seed,
        num_proc: a.num_proc,
        output,
        skip_space_check: a.skip_space_check,
        interrupt: None,
    };
    let report = prepare_bpe::run(&job)?;
    eprintln!("{report}");
    Ok(())
}

/// The Hub cache the client uses without --cache_dir (for the space check).
fn default_hub_cache() -> PathBuf {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("HF_HUB_CACHE"), var("HF_HOME")) {
        (Some(c), _) => PathBuf::from(c),
        (None, Some(h)) => PathBuf::from(h).join("hub"),
        (None, None) => var("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache/huggingface/hub"),
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

/// `nanogpt bench`: training-step throughput; with `--profile` a per-operation table, with
/// `--batch_sizes` one run per batch size and a time and memory table.
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
    let sizes = cfg.batch_size_list()?;
    if cfg.batch_sizes.trim().is_empty() {
        bench_one(&cfg, cfg.batch_size, None)?;
        return Ok(());
    }
    let mut rows = Vec::new();
    for &b in &sizes {
        let outcome = bench_one(&cfg, b, Some(sizes.len()));
        if let Err(e) = &outcome {
            eprintln!("bench: batch_size={b} failed: {e:#}");
        }
        rows.push((b, outcome));
    }
    print!("{}", bench_sweep_markdown(&cfg, &rows));
    if cfg.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(b, o)| match o {
                Ok((r, m)) => serde_json::json!({"batch_size": b, "result": r, "memory": m}),
                Err(e) => serde_json::json!({"batch_size": b, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", serde_json::json!({ "batch_sweep": v }));
    }
    if rows.iter().all(|(_, o)| o.is_err()) {
        bail!(
            "every batch size in --batch_sizes={} failed (see above)",
            cfg.batch_sizes
        );
    }
    Ok(())
}

/// The first training batch of `--data_dir` (with a line on how often its tokens repeat),
/// or `None` for random tokens.
fn bench_data(
    cfg: &BenchConfig,
    batch_size: usize,
    vocab_size: usize,
) -> Result<Option<(Vec<u32>, Vec<i32>)>> {
    if cfg.data_dir.is_empty() {
        return Ok(None);
    }
    let dir = Path::new(&cfg.data_dir);
    let (inputs, targets) =
        crate::data::first_train_batch(dir, batch_size, cfg.block_size, vocab_size, cfg.seed)
            .with_context(|| format!("bench --data_dir: reading a batch from {}", dir.display()))?;
    eprintln!(
        "bench: tokens from {}: {}",
        dir.display(),
        bench::token_summary(&inputs)
    );
    Ok(Some((inputs, targets)))
}

type BenchOutcome = (bench::BenchResult, Option<bench::MemorySummary>);

/// One benchmark run at `batch_size` (a fresh engine): timings, the profile when asked for,
/// and device memory. `sweep` is the number of sizes when part of `--batch_sizes`.
fn bench_one(cfg: &BenchConfig, batch_size: usize, sweep: Option<usize>) -> Result<BenchOutcome> {
    use crate::config::DeviceSpec;
    let model = cfg.model_config()?;
    let device = cfg.device_spec()?;
    // Memory in use before the engine exists (its context held, so it is not counted).
    let baseline = match device {
        DeviceSpec::Cuda(n) => engine::cuda::profile::memory_baseline(n.unwrap_or(0)).ok(),
        _ => None,
    };
    let params = ParamLayout::new(&model).init_params(&model, cfg.seed);
    let mut eng = engine::create(
        device,
        cfg.dtype_kind()?,
        model.clone(),
        params,
        cfg.seed,
        cfg.threads,
    )?;
    eng.set_recompute(cfg.recompute_level()?);
    let spec = BenchSpec {
        batch_size,
        block_size: cfg.block_size,
        grad_accum: cfg.gradient_accumulation_steps,
        iters: cfg.iters as usize,
        warmup: cfg.warmup as usize,
        learning_rate: cfg.learning_rate as f32,
        adamw: cfg.adamw(),
        seed: cfg.seed,
        tokens: bench_data(cfg, batch_size, model.vocab_size)?,
    };
    eprintln!(
        "bench: {} layers, {} heads, {} channels, block {}, batch {}, vocab {} (padded {}), {:.2}M parameters, {}",
        model.n_layer,
        model.n_head,
        model.n_embd,
        model.block_size,
        batch_size,
        model.vocab_size,
        model.padded_vocab_size,
        model.num_params_non_embedding() as f64 / 1e6,
        eng.device_name()
    );
    if let Some(line) = engine::activation_summary(eng.as_ref(), batch_size, cfg.block_size) {
        eprintln!("bench: {line}");
    }
    let r = bench::run(eng.as_mut(), &spec)?;
    // MFU against peak_flops when given, else the GPU's bf16 peak from the table.
    let mfu = cfg
        .peak_flops
        .or_else(|| eng.peak_flops())
        .map(|p| {
            format!(
                ", mfu {:.2}% of {:.0} TFLOP/s",
                100.0 * r.gflops * 1e9 / p,
                p / 1e12
            )
        })
        .unwrap_or_default();
    println!(
        "median {:.2} ms/iter (min {:.2}, max {:.2}), {:.0} tokens/s, {:.1} GFLOP/s{mfu}",
        r.median_ms, r.min_ms, r.max_ms, r.tokens_per_s, r.gflops
    );
    println!("{}", serde_json::to_string(&r)?);
    if let Some(line) = eng.launch_report() {
        eprintln!("bench: {line}");
    }
    if cfg.profiling() {
        match bench::profile(eng.as_mut(), &spec) {
            None => eprintln!(
                "bench --profile: per-operation timing needs the CUDA engine (--device=cuda); \
                 {} has no per-operation timers, so there is no profile table",
                eng.device_name()
            ),
            Some(Err(e)) => bail!("bench --profile: the profiled step failed: {e}"),
            Some(Ok(p)) => {
                let ceilings = bench::Ceilings::resolve(&p.device, cfg.gemm_tflops, cfg.copy_gbps);
                let table = bench::ProfileTable::new(&p, ceilings, Some(r.median_ms));
                println!(
                    "\nPer-operation profile, {} (batch {batch_size}, block {}):\n",
                    p.device, cfg.block_size
                );
                println!("{}", table.to_markdown());
                if cfg.json {
                    println!("{}", serde_json::json!({ "profile": &table }));
                }
                if !cfg.profile_out.is_empty() {
                    let path = profile_path(&cfg.profile_out, batch_size, sweep);
                    let text = serde_json::to_string_pretty(&table)?;
                    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot write the profile to {} (profile_out): {e}; check that the \
                             directory exists and is writable",
                            path.display()
                        )
                    })?;
                    eprintln!("bench: profile written to {}", path.display());
                }
            }
        }
    }
    let memory = eng
        .memory_report()
        .map(|rep| bench::memory_summary(&rep, baseline.as_ref().map(|b| b.used)));
    if let Some(m) = &memory {
        print!("{}", m.to_text());
        if cfg.json {
            println!("{}", serde_json::json!({ "memory": m }));
        }
    }
    drop(eng);
    drop(baseline);
    Ok((r, memory))
}

/// `profile_out` as given, or with `-b<batch>` before the extension in a batch-size sweep.
fn profile_path(out: &str, batch_size: usize, sweep: Option<usize>) -> PathBuf {
    let p = PathBuf::from(out);
    if sweep.is_none_or(|n| n <= 1) {
        return p;
    }
    let stem = p
        .file_stem()
        .map_or("profile".into(), |s| s.to_string_lossy().into_owned());
    let name = match p.extension() {
        Some(ext) => format!("{stem}-b{batch_size}.{}", ext.to_string_lossy()),
        None => format!("{stem}-b{batch_size}"),
    };
    p.with_file_name(name)
}

/// The `--batch_sizes` summary as a Markdown table.
fn bench_sweep_markdown(cfg: &BenchConfig, rows: &[(usize, Result<BenchOutcome>)]) -> String {
    let gib = |b: Option<u64>| {
        b.map_or(String::new(), |b| {
            format!("{:.2}", b as f64 / (1u64 << 30) as f64)
        })
    };
    let mut s = format!(
        "\nBatch sizes at block {} ({} layers, {} channels, dtype {}, device {}, recompute {}):\n\n",
        cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.dtype, cfg.device, cfg.recompute
    );
    s.push_str("| batch | tokens/iter | ms/iter | tokens/s | GPU GiB in use | engine GiB | engine buffers GiB | activations GiB |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (b, o) in rows {
        match o {
            Ok((r, m)) => s.push_str(&format!(
                "| {b} | {} | {:.2} | {:.0} | {} | {} | {} | {} |\n",
                r.tokens_per_iter,
                r.median_ms,
                r.tokens_per_s,
                gib(m.as_ref().and_then(|m| m.in_use_bytes)),
                gib(m.as_ref().and_then(|m| m.engine_bytes)),
                gib(m.as_ref().map(|m| m.accounted_bytes)),
                gib(r.activation_bytes),
            )),
            Err(e) => {
                let msg = format!("{e:#}").replace('|', "/");
                let short: String = msg.chars().take(120).collect();
                s.push_str(&format!("| {b} | failed: {short} |  |  |  |  |  |  |\n"));
            }
        }
    }
    s
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
