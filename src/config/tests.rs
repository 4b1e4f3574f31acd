//! Tests of the config structs, the loader and the files in configs/.

use super::*;
use std::path::Path;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn train(list: &[&str]) -> Result<TrainConfig, ConfigError> {
    TrainConfig::load(&args(list))
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn config_file(name: &str) -> String {
    configs_dir().join(name).display().to_string()
}

#[test]
fn train_defaults_are_nanogpts() {
    let c = train(&[]).unwrap();
    assert_eq!(c, TrainConfig::default());
    assert_eq!(c.out_dir, "out");
    assert_eq!(
        (c.eval_interval, c.log_interval, c.eval_iters),
        (2000, 1, 200)
    );
    assert!(!c.eval_only && c.always_save_checkpoint);
    assert_eq!(c.init_from, "scratch");
    assert!(!c.wandb_log);
    assert_eq!(
        (c.wandb_project.as_str(), c.wandb_run_name.as_str()),
        ("owt", "gpt2")
    );
    assert_eq!(c.dataset, "openwebtext");
    assert_eq!(
        (c.gradient_accumulation_steps, c.batch_size, c.block_size),
        (40, 12, 1024)
    );
    assert_eq!((c.n_layer, c.n_head, c.n_embd), (12, 12, 768));
    assert_eq!(c.dropout, 0.0);
    assert!(!c.bias);
    assert_eq!(c.learning_rate, 6e-4);
    assert_eq!(c.max_iters, 600_000);
    assert_eq!(
        (c.weight_decay, c.beta1, c.beta2, c.grad_clip),
        (0.1, 0.9, 0.95, 1.0)
    );
    assert!(c.decay_lr);
    assert_eq!(
        (c.warmup_iters, c.lr_decay_iters, c.min_lr),
        (2000, 600_000, 6e-5)
    );
    assert_eq!(
        (c.backend.as_str(), c.device.as_str(), c.dtype.as_str()),
        ("nccl", "auto", "bfloat16")
    );
    assert!(c.compile);
    assert_eq!(c.seed, 1337);
    assert_eq!(c.data_dir_resolved(), PathBuf::from("data/openwebtext"));
    assert!(c.keep_checkpoints_at.is_empty());
    assert_eq!(c.peak_flops, None);
    assert_eq!(c.threads, 0);
    assert_eq!(c.device_spec().unwrap(), DeviceSpec::Auto);
    assert_eq!(c.dtype_kind().unwrap(), Dtype::BFloat16);
    assert!(c.warnings().is_empty());
}

#[test]
fn sample_and_bench_defaults() {
    let s = SampleConfig::load(&[]).unwrap();
    assert_eq!(s, SampleConfig::default());
    assert_eq!(
        (s.init_from.as_str(), s.out_dir.as_str(), s.start.as_str()),
        ("resume", "out", "\n")
    );
    assert_eq!(
        (s.num_samples, s.max_new_tokens, s.top_k, s.seed),
        (10, 500, 200, 1337)
    );
    assert_eq!(s.temperature, 0.8);
    assert!(!s.compile && !s.stop_at_eot);
    assert_eq!(
        s.checkpoint_selection().unwrap(),
        CheckpointSelection::Latest
    );
    assert_eq!(s.top_k_opt(), Some(200));
    assert_eq!(s.start_text().unwrap(), "\n");

    let b = BenchConfig::load(&[]).unwrap();
    assert_eq!(b, BenchConfig::default());
    assert_eq!(
        (
            b.vocab_size,
            b.gradient_accumulation_steps,
            b.iters,
            b.warmup
        ),
        (50304, 1, 20, 3)
    );
    let m = b.model_config().unwrap();
    assert_eq!((m.n_layer, m.n_embd, m.padded_vocab_size), (12, 768, 50304));
}

#[test]
fn overrides_in_every_spelling() {
    let c = train(&[
        "--compile=False",
        "--eval_only=True",
        "--bias=true",
        "--decay_lr=false",
        "--out_dir='out-a'",
        "--dataset=\"shakespeare\"",
        "--init_from=resume",
        "--learning_rate=6e-4",
        "--min_lr=1",
        "--weight_decay=.05",
        "--max_iters=600_000",
        "--batch_size",
        "4",
        "--device",
        "cuda:1",
        "--always-save-checkpoint=False",
        "--peak_flops=989e12",
    ])
    .unwrap();
    assert!(!c.compile && c.eval_only && c.bias && !c.decay_lr && !c.always_save_checkpoint);
    assert_eq!(c.out_dir, "out-a");
    assert_eq!(c.dataset, "shakespeare");
    assert_eq!(c.init_from, "resume");
    assert_eq!(c.learning_rate, 6e-4);
    assert_eq!(c.min_lr, 1.0);
    assert_eq!(c.weight_decay, 0.05);
    assert_eq!(c.max_iters, 600_000);
    assert_eq!(c.batch_size, 4);
    assert_eq!(c.device_spec().unwrap(), DeviceSpec::Cuda(Some(1)));
    assert_eq!(c.peak_flops, Some(989e12));

    // The last override wins; `none` clears an optional key; a bare boolean flag is True.
    let c = train(&[
        "--batch_size=4",
        "--batch_size=8",
        "--peak_flops=1e12",
        "--peak_flops=none",
        "--eval_only",
    ])
    .unwrap();
    assert_eq!(c.batch_size, 8);
    assert_eq!(c.peak_flops, None);
    assert!(c.eval_only);

    let s = SampleConfig::load(&args(&[
        "--start='To be\\nor not'",
        "--top_k=0",
        "--temperature=1",
        "--checkpoints=all",
        "--stop_at_eot=True",
    ]))
    .unwrap();
    assert_eq!(s.start_text().unwrap(), "To be\nor not");
    assert_eq!(s.top_k_opt(), None);
    assert_eq!(s.temperature, 1.0);
    assert_eq!(s.checkpoint_selection().unwrap(), CheckpointSelection::All);
    assert!(s.stop_at_eot);
    let s = SampleConfig::load(&args(&["--checkpoints=2000, 1000"])).unwrap();
    assert_eq!(
        s.checkpoint_selection().unwrap(),
        CheckpointSelection::Iters(vec![2000, 1000])
    );
}

#[test]
fn type_errors_name_key_value_and_type() {
    let msg = |a: &[&str]| train(a).unwrap_err().to_string();
    let m = msg(&["--batch_size=abc"]);
    assert!(
        m.contains("'batch_size'") && m.contains("'abc'") && m.contains("integer"),
        "{m}"
    );
    let m = msg(&["--batch_size=1.5"]);
    assert!(
        m.contains("'batch_size'") && m.contains("'1.5'") && m.contains("integer"),
        "{m}"
    );
    let m = msg(&["--learning_rate=fast"]);
    assert!(m.contains("'learning_rate'") && m.contains("number"), "{m}");
    let m = msg(&["--learning_rate=inf"]);
    assert!(m.contains("'learning_rate'"), "{m}");
    let m = msg(&["--compile=yes"]);
    assert!(
        m.contains("'compile'") && m.contains("True or False"),
        "{m}"
    );
    let m = msg(&["--compile=1"]);
    assert!(m.contains("'compile'"), "{m}");
    let m = msg(&["--max_iters=-5"]);
    assert!(m.contains("'max_iters'") && m.contains("-5"), "{m}");
    let m = msg(&["--batch_size"]);
    assert!(m.contains("missing value for --batch_size"), "{m}");
    assert!(matches!(
        train(&["--seed=x"]),
        Err(ConfigError::Type { .. })
    ));
}

#[test]
fn file_values_are_type_checked() {
    let err = TrainConfig::from_toml_str("batch_size = 1.5", "my.toml").unwrap_err();
    let m = err.to_string();
    assert!(
        m.contains("'batch_size'") && m.contains("my.toml") && m.contains("integer"),
        "{m}"
    );
    let err = TrainConfig::from_toml_str("max_iters = -1", "my.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Type { .. }), "{err}");
    let err = TrainConfig::from_toml_str("compile = \"False\"", "my.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Type { .. }), "{err}");
    // An integer where a float is expected is fine.
    let c = TrainConfig::from_toml_str("learning_rate = 1\ndropout = 0", "my.toml").unwrap();
    assert_eq!((c.learning_rate, c.dropout), (1.0, 0.0));
    let err = TrainConfig::from_toml_str("batch_size = ", "bad.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }) && err.to_string().contains("bad.toml"));
}

#[test]
fn unknown_keys_suggest_the_closest() {
    let m = train(&["--batchsize=4"]).unwrap_err().to_string();
    assert_eq!(
        m,
        "unknown config key 'batchsize'; did you mean 'batch_size'?"
    );
    let m = TrainConfig::from_toml_str("n_layers = 4", "x.toml")
        .unwrap_err()
        .to_string();
    assert_eq!(
        m,
        "unknown config key 'n_layers' in x.toml; did you mean 'n_layer'?"
    );
    let m = SampleConfig::load(&args(&["--topk=5"]))
        .unwrap_err()
        .to_string();
    assert!(m.contains("did you mean 'top_k'?"), "{m}");
    let m = train(&["--completely_unrelated_name=1"])
        .unwrap_err()
        .to_string();
    assert!(m.contains("known keys:") && m.contains("batch_size"), "{m}");
    // Sample-only keys are unknown to train.
    assert!(matches!(
        train(&["--num_samples=3"]),
        Err(ConfigError::UnknownKey { .. })
    ));
}

#[test]
fn bad_arguments_and_missing_files() {
    let m = train(&["no/such/config.toml"]).unwrap_err().to_string();
    assert!(m.contains("no/such/config.toml"), "{m}");
    let m = train(&["batch_size=4"]).unwrap_err().to_string();
    assert!(m.contains("--batch_size=4"), "{m}");
    let m = train(&["-x"]).unwrap_err().to_string();
    assert!(m.contains("'-x'"), "{m}");
    let m = train(&["config/train_shakespeare_char.py"])
        .unwrap_err()
        .to_string();
    assert!(m.contains("TOML"), "{m}");
}

#[test]
fn validation_after_merge() {
    let err = |a: &[&str]| train(a).unwrap_err();
    for (arg, key) in [
        ("--batch_size=0", "batch_size"),
        (
            "--gradient_accumulation_steps=0",
            "gradient_accumulation_steps",
        ),
        ("--dtype=float8", "dtype"),
        ("--device=gpu", "device"),
        ("--device=cuda:x", "device"),
        ("--dropout=1.0", "dropout"),
        ("--dropout=-0.1", "dropout"),
        ("--n_head=5", "n_embd"),
        ("--init_from=gpt3", "init_from"),
        ("--beta2=1.5", "beta2"),
        ("--peak_flops=0", "peak_flops"),
        ("--backend=mpi", "backend"),
        ("--eval_interval=0", "eval_interval"),
        ("--keep_checkpoints_at=every 0", "keep_checkpoints_at"),
        ("--keep_checkpoints_at=abc", "keep_checkpoints_at"),
    ] {
        let e = err(&[arg]);
        assert!(
            matches!(&e, ConfigError::Invalid { key: k, .. } if k == key),
            "{arg}: {e}"
        );
    }
    for ok in [
        "--device=cpu",
        "--device=cuda",
        "--device=cuda:0",
        "--dtype=float16",
        "--dtype=float32",
    ] {
        train(&[ok]).unwrap();
    }
    let s = |a: &[&str]| SampleConfig::load(&args(a));
    assert!(s(&["--temperature=0"]).is_err());
    assert!(s(&["--checkpoints=latest,x"]).is_err());
    assert!(s(&["--init_from=scratch"]).is_err());
    assert!(BenchConfig::load(&args(&["--vocab_size=70000"])).is_err());
    assert!(BenchConfig::load(&args(&["--iters=0"])).is_err());
}

#[test]
fn keep_schedule_from_command_line_and_file() {
    let c = train(&["--keep_checkpoints_at=10000,20000,every 50000"]).unwrap();
    let k = &c.keep_checkpoints_at;
    assert_eq!(k.iters, vec![10000, 20000]);
    assert_eq!(k.every, Some(50000));
    assert!(k.keeps(10000) && k.keeps(100000) && !k.keeps(30000));
    let c = train(&["--keep_checkpoints_at=[5, \"every 7\"]"]).unwrap();
    assert!(c.keep_checkpoints_at.keeps(5) && c.keep_checkpoints_at.keeps(14));
    let c = TrainConfig::from_toml_str(
        "keep_checkpoints_at = [1000, \"every 2500\", \"3000,4000\"]",
        "k.toml",
    )
    .unwrap();
    assert_eq!(c.keep_checkpoints_at.iters, vec![1000, 3000, 4000]);
    assert_eq!(c.keep_checkpoints_at.every, Some(2500));
    let c = train(&["--keep_checkpoints_at=''"]).unwrap();
    assert!(c.keep_checkpoints_at.is_empty());
}

#[test]
fn round_trip_through_toml() {
    let dir = tempfile::tempdir().unwrap();
    let c = train(&[
        "--keep_checkpoints_at=10000,20000,every 50000",
        "--peak_flops=989e12",
        "--learning_rate=3e-5",
        "--min_lr=1e-7",
        "--dropout=0.1",
        "--beta2=0.99",
        "--data_dir=/data/x y",
        "--wandb_run_name=ft-1700000000.123",
        "--threads=3",
        "--seed=42",
    ])
    .unwrap();
    let path = dir.path().join("run").join("config.toml");
    c.write_toml(&path).unwrap();
    let back = TrainConfig::load(&[path.display().to_string()]).unwrap();
    assert_eq!(back, c);
    assert_eq!(
        TrainConfig::from_toml_str(&c.to_toml_string(), "s").unwrap(),
        c
    );
    assert!(c
        .to_toml_string()
        .contains("keep_checkpoints_at = [10000, 20000, \"every 50000\"]"));

    let d = TrainConfig::default();
    assert_eq!(
        TrainConfig::from_toml_str(&d.to_toml_string(), "d").unwrap(),
        d
    );
    let s = SampleConfig {
        start: "line one\n\"two\"\t'3'".into(),
        checkpoints: "1000,2000".into(),
        ..SampleConfig::default()
    };
    assert_eq!(
        SampleConfig::from_toml_str(&s.to_toml_string(), "s").unwrap(),
        s
    );
    let b = BenchConfig {
        peak_flops: Some(312e12),
        ..BenchConfig::default()
    };
    assert_eq!(
        BenchConfig::from_toml_str(&b.to_toml_string(), "b").unwrap(),
        b
    );
}

#[test]
fn start_text_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("prompt.txt");
    std::fs::write(&p, "ROMEO:\n").unwrap();
    let s = SampleConfig::load(&args(&[&format!("--start=FILE:{}", p.display())])).unwrap();
    assert_eq!(s.start_text().unwrap(), "ROMEO:\n");
    let missing = SampleConfig {
        start: "FILE:/no/such/prompt.txt".into(),
        ..SampleConfig::default()
    };
    let m = missing.start_text().unwrap_err().to_string();
    assert!(m.contains("/no/such/prompt.txt"), "{m}");
}

#[test]
fn nanogpt_readme_command() {
    let mut a = vec![config_file("train_shakespeare_char.toml")];
    a.extend(args(&[
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--log_interval=1",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        "--max_iters=2000",
        "--lr_decay_iters=2000",
        "--dropout=0.0",
    ]));
    let c = TrainConfig::load(&a).unwrap();
    assert_eq!(c.device_spec().unwrap(), DeviceSpec::Cpu);
    assert!(!c.compile);
    assert_eq!(
        (c.eval_iters, c.log_interval, c.block_size, c.batch_size),
        (20, 1, 64, 12)
    );
    assert_eq!((c.n_layer, c.n_head, c.n_embd), (4, 4, 128));
    assert_eq!(
        (c.max_iters, c.lr_decay_iters, c.dropout),
        (2000, 2000, 0.0)
    );
    // From the file, untouched by overrides.
    assert_eq!(c.out_dir, "out-shakespeare-char");
    assert_eq!(
        c.data_dir_resolved(),
        PathBuf::from("data/shakespeare_char")
    );
    assert_eq!(
        (c.learning_rate, c.min_lr, c.beta2, c.warmup_iters),
        (1e-3, 1e-4, 0.99, 100)
    );
    assert_eq!(c.gradient_accumulation_steps, 1);
    let m = c.model_config(65).unwrap();
    assert_eq!(
        (m.vocab_size, m.padded_vocab_size, m.block_size),
        (65, 128, 64)
    );
    let lr = c.lr_schedule();
    assert!((lr.lr_at(100) - 1e-3).abs() < 1e-15);
    assert_eq!(c.adamw().beta2, 0.99f32);
}

#[test]
fn files_apply_in_order_then_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, "batch_size = 2\nn_layer = 3\n").unwrap();
    std::fs::write(&b, "batch_size = 5\n").unwrap();
    let c = train(&[
        "--n_layer=7",
        &a.display().to_string(),
        &b.display().to_string(),
    ])
    .unwrap();
    assert_eq!((c.batch_size, c.n_layer), (5, 7));
}

#[test]
fn every_shipped_config_loads() {
    let mut names: Vec<String> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "eval_gpt2.toml",
            "eval_gpt2_large.toml",
            "eval_gpt2_medium.toml",
            "eval_gpt2_xl.toml",
            "finetune_shakespeare.toml",
            "train_gpt2.toml",
            "train_shakespeare_char.toml",
        ]
    );
    let load = |n: &str| TrainConfig::load(&[config_file(n)]).unwrap();
    for n in &names {
        load(n);
    }

    let g = load("train_gpt2.toml");
    assert_eq!(
        (g.batch_size, g.block_size, g.gradient_accumulation_steps),
        (12, 1024, 40)
    );
    assert_eq!((g.max_iters, g.lr_decay_iters), (600_000, 600_000));
    assert_eq!(
        (g.eval_interval, g.eval_iters, g.log_interval),
        (1000, 200, 10)
    );
    assert_eq!(g.weight_decay, 0.1);
    assert!(g.wandb_log);
    assert_eq!(g.wandb_run_name, "gpt2-124M");
    assert_eq!(g.warnings().len(), 1);

    let s = load("train_shakespeare_char.toml");
    assert_eq!(s.out_dir, "out-shakespeare-char");
    assert_eq!(
        (s.eval_interval, s.eval_iters, s.log_interval),
        (250, 200, 10)
    );
    assert!(!s.always_save_checkpoint && !s.wandb_log);
    assert_eq!(
        (s.wandb_project.as_str(), s.wandb_run_name.as_str()),
        ("shakespeare-char", "mini-gpt")
    );
    assert_eq!(s.dataset, "shakespeare_char");
    assert_eq!(
        (s.gradient_accumulation_steps, s.batch_size, s.block_size),
        (1, 64, 256)
    );
    assert_eq!((s.n_layer, s.n_head, s.n_embd, s.dropout), (6, 6, 384, 0.2));
    assert_eq!(
        (s.learning_rate, s.max_iters, s.lr_decay_iters, s.min_lr),
        (1e-3, 5000, 5000, 1e-4)
    );
    assert_eq!((s.beta2, s.warmup_iters), (0.99, 100));

    for (file, init) in [
        ("eval_gpt2.toml", "gpt2"),
        ("eval_gpt2_medium.toml", "gpt2-medium"),
        ("eval_gpt2_large.toml", "gpt2-large"),
        ("eval_gpt2_xl.toml", "gpt2-xl"),
    ] {
        let e = load(file);
        assert_eq!(e.init_from, init, "{file}");
        assert_eq!((e.batch_size, e.eval_iters), (8, 500), "{file}");
        assert!(e.eval_only && !e.wandb_log, "{file}");
    }

    let f = load("finetune_shakespeare.toml");
    assert_eq!(f.out_dir, "out-shakespeare");
    assert_eq!((f.eval_interval, f.eval_iters), (5, 40));
    assert!(!f.wandb_log && !f.always_save_checkpoint && !f.decay_lr);
    assert_eq!(
        (f.wandb_project.as_str(), f.wandb_run_name.as_str()),
        ("shakespeare", "ft")
    );
    assert_eq!(
        (f.dataset.as_str(), f.init_from.as_str()),
        ("shakespeare", "gpt2-xl")
    );
    assert_eq!(
        (f.batch_size, f.gradient_accumulation_steps, f.max_iters),
        (1, 32, 20)
    );
    assert_eq!(f.learning_rate, 3e-5);
}

#[test]
fn known_keys_lists_every_field() {
    let keys = TrainConfig::known_keys();
    assert_eq!(keys.len(), 44);
    assert!(keys.iter().any(|k| k == "zero_stage"));
    assert!(keys.iter().any(|k| k == "overlap_grad_reduce"));
    assert!(keys.iter().any(|k| k == "bucket_cap_mb"));
    assert!(keys.iter().any(|k| k == "recompute"));
    assert!(keys.iter().any(|k| k == "peak_flops"));
    assert!(keys.iter().any(|k| k == "dist_timeout"));
    assert!(keys.iter().any(|k| k == "dist_env"));
    assert!(keys.iter().any(|k| k == "keep_checkpoints_at"));
    assert_eq!(SampleConfig::known_keys().len(), 14);
    assert_eq!(BenchConfig::known_keys().len(), 30);
    for k in [
        "data_dir",
        "profile",
        "profile_out",
        "json",
        "gemm_tflops",
        "copy_gbps",
        "batch_sizes",
    ] {
        assert!(BenchConfig::known_keys().iter().any(|x| x == k), "{k}");
    }
}

#[test]
fn bench_profile_keys() {
    let b = |a: &[&str]| BenchConfig::load(&args(a));
    let c = b(&[
        "--profile",
        "--gemm_tflops=760.5",
        "--copy_gbps=3000",
        "--batch_sizes=4, 8,16",
    ])
    .unwrap();
    assert!(c.profile && c.profiling() && !c.json);
    assert_eq!((c.gemm_tflops, c.copy_gbps), (Some(760.5), Some(3000.0)));
    assert_eq!(c.batch_size_list().unwrap(), vec![4, 8, 16]);
    assert_eq!(
        BenchConfig::from_toml_str(&c.to_toml_string(), "b").unwrap(),
        c
    );
    // profile_out alone asks for the profile; no batch_sizes = batch_size.
    let c = b(&["--profile_out=p.json", "--batch_size=3"]).unwrap();
    assert!(!c.profile && c.profiling());
    assert_eq!(c.batch_size_list().unwrap(), vec![3]);
    let err = b(&["--batch_sizes=4,x"]).unwrap_err().to_string();
    assert!(err.contains("batch_sizes") && err.contains("'x'"), "{err}");
    assert!(b(&["--batch_sizes=4,0"]).is_err());
    let err = b(&["--gemm_tflops=0"]).unwrap_err().to_string();
    assert!(err.contains("gemm_tflops"), "{err}");
    assert!(b(&["--copy_gbps=-1"]).is_err());
    assert_eq!(b(&["--gemm_tflops=none"]).unwrap().gemm_tflops, None);
}

#[test]
fn zero_stage_is_0_or_1() {
    let load = |a: &[&str]| TrainConfig::load(&args(a));
    assert_eq!(load(&[]).unwrap().zero_stage, 0);
    assert_eq!(load(&["--zero_stage=1"]).unwrap().zero_stage, 1);
    for bad in ["--zero_stage=2", "--zero_stage=3"] {
        let err = load(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("zero_stage") && err.contains("expected 0 (off) or 1"),
            "{err}"
        );
    }
    let err = load(&["--zero_stage=one"]).unwrap_err().to_string();
    assert!(err.contains("zero_stage"), "{err}");
}

#[test]
fn overlap_grad_reduce_is_on_by_default_with_25_mib_buckets() {
    let load = |a: &[&str]| TrainConfig::load(&args(a));
    let c = load(&[]).unwrap();
    assert!(c.overlap_grad_reduce);
    assert_eq!(c.bucket_cap_mb, 25.0);
    let c = load(&["--overlap_grad_reduce=False", "--bucket_cap_mb=0.5"]).unwrap();
    assert!(!c.overlap_grad_reduce);
    assert_eq!(c.bucket_cap_mb, 0.5);
    let err = load(&["--bucket_cap_mb=-1"]).unwrap_err().to_string();
    assert!(err.contains("bucket_cap_mb"), "{err}");
}

#[test]
fn recompute_takes_levels_0_to_2() {
    use crate::engine::Recompute;
    assert_eq!(
        train(&[]).unwrap().recompute_level().unwrap(),
        Recompute::Nothing
    );
    for (v, level) in [
        ("0", Recompute::Nothing),
        ("1", Recompute::Gelu),
        ("2", Recompute::GeluLayerNorm),
    ] {
        let arg = format!("--recompute={v}");
        assert_eq!(train(&[&arg]).unwrap().recompute_level().unwrap(), level);
        let b = BenchConfig::load(&args(&[&arg])).unwrap();
        assert_eq!(b.recompute_level().unwrap(), level);
    }
    let e = train(&["--recompute=3"]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { key, value, .. } if key == "recompute" && value == "3"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("expected 0") && msg.contains("1 (recompute the GELU"),
        "{msg}"
    );
    let e = BenchConfig::load(&args(&["--recompute=7"])).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { key, .. } if key == "recompute"),
        "{e}"
    );
    // Negative and non-integer values are type errors naming the key.
    for bad in ["--recompute=-1", "--recompute=yes", "--recompute=1.5"] {
        let e = train(&[bad]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Type { key, .. } if key == "recompute"),
            "{bad}: {e}"
        );
    }
    let from_file = TrainConfig::from_toml_str("recompute = 2\n", "t.toml").unwrap();
    assert_eq!(from_file.recompute, 2);
    assert!(TrainConfig::from_toml_str("recompute = 5\n", "t.toml").is_err());
}
