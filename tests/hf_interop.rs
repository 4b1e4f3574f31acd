//! Hugging Face GPT-2 interop against transformers: a tiny GPT2LMHeadModel saved by
//! transformers loads with the same logits, loss and greedy tokens (fixtures from
//! tools/make_hf_fixture.py); the name, dtype, prefix, shard and crop variants load the same
//! weights; bad inputs fail with errors naming the tensor or key; our export of a checkpoint
//! is the file transformers was checked to load, with transformers' logits equal to ours.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nanogpt::config::DeviceSpec;
use nanogpt::data::meta::Meta;
use nanogpt::engine::{self, Batch, Engine, OptimizerState};
use nanogpt::interop::{self, Source};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::rng::Rng;
use nanogpt::sample::{generate, SamplingParams};
use nanogpt::train::checkpoint::{self, Checkpoint, TrainingState};
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_gpt2")
}

/// A safetensors tensor as owned bytes.
#[derive(Clone)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_all(path: &Path) -> (HashMap<String, Raw>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = md.metadata().clone().unwrap_or_default();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    (tensors, meta)
}

fn write_all(path: &Path, tensors: &HashMap<String, Raw>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.data).unwrap(),
            )
        })
        .collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    std::fs::write(path, safetensors::serialize(views, &meta).unwrap()).unwrap();
}

fn f32s(r: &Raw) -> Vec<f32> {
    assert_eq!(r.dtype, Dtype::F32);
    r.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn ids(r: &Raw) -> Vec<u32> {
    assert_eq!(r.dtype, Dtype::I64);
    r.data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect()
}

fn to_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A copy of the tiny model's directory with `edit` applied to its tensors and, if given,
/// config.json replaced.
fn variant(
    edit: impl FnOnce(&mut HashMap<String, Raw>),
    config: Option<&str>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, _) = read_all(&tiny_dir().join("model.safetensors"));
    edit(&mut t);
    write_all(&dir.path().join("model.safetensors"), &t);
    let cfg = match config {
        Some(c) => c.to_string(),
        None => std::fs::read_to_string(tiny_dir().join("config.json")).unwrap(),
    };
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    dir
}

fn load_dir(dir: &Path, block: Option<usize>) -> interop::Result<interop::Pretrained> {
    interop::load_pretrained(&Source::Dir(dir.to_path_buf()), block, 0.0)
}

fn cpu(model: GptConfig, params: Vec<f32>) -> Box<dyn Engine> {
    engine::create(
        DeviceSpec::Cpu,
        nanogpt::config::Dtype::Float32,
        model,
        params,
        1,
        2,
    )
    .unwrap()
}

/// max |a - b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    num / den
}

fn logits_of(eng: &mut dyn Engine, x: &[u32], b: usize) -> Vec<f32> {
    let t = x.len() / b;
    let targets = vec![-1i32; x.len()];
    eng.logits(Batch {
        inputs: x,
        targets: &targets,
        b,
        t,
    })
    .unwrap()
}

#[test]
fn logits_loss_and_greedy_tokens_match_transformers() {
    let (exp, _) = read_all(&fixtures().join("expected.safetensors"));
    let pre = load_dir(&tiny_dir(), None).unwrap();
    assert_eq!(pre.dtypes, ["F32"]);
    assert_eq!(
        (
            pre.model.n_layer,
            pre.model.n_head,
            pre.model.n_embd,
            pre.model.block_size,
            pre.model.vocab_size,
            pre.model.padded_vocab_size,
            pre.model.bias
        ),
        (2, 4, 32, 32, 101, 101, true)
    );
    let mut eng = cpu(pre.model.clone(), pre.params.clone());
    let x = ids(&exp["x"]);
    let y: Vec<i32> = ids(&exp["y"]).into_iter().map(|v| v as i32).collect();
    let (b, t) = (exp["x"].shape[0], exp["x"].shape[1]);
    let ours = logits_of(eng.as_mut(), &x, b);
    let theirs = f32s(&exp["logits"]);
    let err = rel_err(&ours, &theirs);
    assert!(err < 1e-5, "logits relative error {err:e}");
    let loss = eng
        .loss(Batch {
            inputs: &x,
            targets: &y,
            b,
            t,
        })
        .unwrap();
    let want = f32s(&exp["loss"])[0];
    assert!(
        ((loss - want) / want).abs() < 1e-5,
        "loss {loss} vs transformers {want}"
    );

    let prompt = ids(&exp["prompt"]);
    let greedy = ids(&exp["greedy"]);
    let params = SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        stop_token: None,
    };
    let out = generate(
        eng.as_mut(),
        &prompt,
        1,
        greedy.len(),
        &params,
        &mut Rng::new(5),
    )
    .unwrap();
    assert_eq!(out[0], greedy);
}

#[test]
fn hub_style_names_buffers_and_tied_head_load_the_same_weights() {
    let base = load_dir(&tiny_dir(), None).unwrap();
    // openai-community/gpt2's file: no "transformer." prefix, attention-mask buffers, and
    // here also an explicit (tied) lm_head.weight
    let dir = variant(
        |t| {
            let old: Vec<(String, Raw)> = t.drain().collect();
            for (n, r) in old {
                t.insert(n.trim_start_matches("transformer.").to_string(), r);
            }
            let mask: Vec<f32> = (0..32 * 32)
                .map(|i| if i % 32 <= i / 32 { 1.0 } else { 0.0 })
                .collect();
            for l in 0..2 {
                let raw = Raw {
                    dtype: Dtype::F32,
                    shape: vec![1, 1, 32, 32],
                    data: to_bytes(&mask),
                };
                t.insert(format!("h.{l}.attn.bias"), raw.clone());
                t.insert(
                    format!("h.{l}.attn.masked_bias"),
                    Raw {
                        shape: vec![],
                        data: to_bytes(&[-1e4]),
                        ..raw
                    },
                );
            }
            let wte = t["wte.weight"].clone();
            t.insert("lm_head.weight".into(), wte);
        },
        None,
    );
    let pre = load_dir(dir.path(), None).unwrap();
    assert_eq!(pre.params, base.params);

    // an lm_head that is not the embedding is refused by name
    let dir = variant(
        |t| {
            let mut head = t["transformer.wte.weight"].clone();
            head.data[0] ^= 0x40;
            t.insert("lm_head.weight".into(), head);
        },
        None,
    );
    let e = load_dir(dir.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("lm_head.weight") && e.contains("wte.weight"),
        "{e}"
    );
}

#[test]
fn half_precision_weights_convert_to_f32() {
    let base = load_dir(&tiny_dir(), None).unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let dir = variant(
            |t| {
                for r in t.values_mut() {
                    let xs = f32s(r);
                    r.data = xs
                        .iter()
                        .flat_map(|&x| match dtype {
                            Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                            _ => half::bf16::from_f32(x).to_le_bytes(),
                        })
                        .collect();
                    r.dtype = dtype;
                }
            },
            None,
        );
        let pre = load_dir(dir.path(), None).unwrap();
        assert_eq!(pre.dtypes, [format!("{dtype:?}")]);
        let want: Vec<f32> = base
            .params
            .iter()
            .map(|&x| match dtype {
                Dtype::F16 => half::f16::from_f32(x).to_f32(),
                _ => half::bf16::from_f32(x).to_f32(),
            })
            .collect();
        assert_eq!(pre.params, want, "{dtype:?}");
    }
}

#[test]
fn sharded_weights_load_like_one_file() {
    let base = load_dir(&tiny_dir(), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = read_all(&tiny_dir().join("model.safetensors"));
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (n, r) in t {
        let file = if n.contains(".h.1.") {
            b.insert(n.clone(), r);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(n.clone(), r);
            "model-00001-of-00002.safetensors"
        };
        map.insert(n, serde_json::json!(file));
    }
    write_all(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    write_all(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let pre = load_dir(dir.path(), None).unwrap();
    assert_eq!(pre.params, base.params);
    assert_eq!(pre.weight_paths.len(), 2);
    // a missing shard is named
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_dir(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn smaller_block_size_crops_position_embeddings() {
    let full = load_dir(&tiny_dir(), None).unwrap();
    let crop = load_dir(&tiny_dir(), Some(12)).unwrap();
    assert_eq!(crop.model.block_size, 12);
    assert_eq!(crop.hf.n_positions, 32);
    let lf = ParamLayout::new(&full.model);
    let lc = ParamLayout::new(&crop.model);
    assert_eq!(lc.total, lf.total - 20 * 32);
    let wpe = |l: &ParamLayout, p: &[f32]| p[l.wpe..l.wpe + 12 * 32].to_vec();
    assert_eq!(wpe(&lc, &crop.params), wpe(&lf, &full.params));
    // causal attention: the first 12 positions compute the same logits either way
    let x: Vec<u32> = (0..12).map(|i| (i * 7 % 101) as u32).collect();
    let a = logits_of(cpu(full.model.clone(), full.params.clone()).as_mut(), &x, 1);
    let b = logits_of(cpu(crop.model.clone(), crop.params.clone()).as_mut(), &x, 1);
    assert_eq!(a, b);
    let e = load_dir(&tiny_dir(), Some(33)).unwrap_err().to_string();
    assert!(
        e.contains("block_size = 33") && e.contains("n_positions"),
        "{e}"
    );
}

#[test]
fn bad_inputs_fail_naming_the_file_tensor_or_key() {
    let empty = tempfile::tempdir().unwrap();
    let e = load_dir(empty.path(), None).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(
        tiny_dir().join("config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    let e = load_dir(empty.path(), None).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = load_dir(&empty.path().join("nope"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("no such directory"), "{e}");

    let missing = variant(
        |t| {
            t.remove("transformer.h.1.mlp.c_fc.bias");
        },
        None,
    );
    let e = load_dir(missing.path(), None).unwrap_err().to_string();
    assert!(e.contains("'transformer.h.1.mlp.c_fc.bias'"), "{e}");

    let transposed = variant(
        |t| {
            let r = t.get_mut("transformer.h.0.attn.c_attn.weight").unwrap();
            r.shape = vec![96, 32];
        },
        None,
    );
    let e = load_dir(transposed.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("transformer.h.0.attn.c_attn.weight")
            && e.contains("[96, 32]")
            && e.contains("[32, 96]")
            && e.contains("transposed"),
        "{e}"
    );

    let ints = variant(
        |t| {
            t.get_mut("transformer.ln_f.weight").unwrap().dtype = Dtype::I32;
        },
        None,
    );
    let e = load_dir(ints.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("transformer.ln_f.weight") && e.contains("I32"),
        "{e}"
    );

    let extra_layer = variant(
        |t| {
            let r = t["transformer.h.1.ln_1.weight"].clone();
            t.insert("transformer.h.2.ln_1.weight".into(), r);
        },
        None,
    );
    let e = load_dir(extra_layer.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("transformer.h.2.ln_1.weight") && e.contains("n_layer = 2"),
        "{e}"
    );

    let cfg = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    for (from, to, key) in [
        (
            "\"GPT2LMHeadModel\"",
            "\"LlamaForCausalLM\"",
            "architectures",
        ),
        ("\"gelu_new\"", "\"gelu\"", "activation_function"),
        ("\"n_embd\": 32", "\"n_embd\": 64", "transformer.wte.weight"),
        (
            "\"vocab_size\": 101",
            "\"vocab_size\": 50257",
            "transformer.wte.weight",
        ),
    ] {
        assert!(cfg.contains(from), "{from}");
        let dir = variant(|_| {}, Some(&cfg.replace(from, to)));
        let e = load_dir(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }

    let garbage = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        garbage.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        garbage.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let e = load_dir(garbage.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn training_refuses_data_with_another_vocabulary() {
    let cfg = nanogpt::config::TrainConfig {
        block_size: 16,
        ..Default::default()
    };
    let init_from = tiny_dir().display().to_string();
    let meta = Meta::char_vocab(&['a', 'b', 'c']);
    let e = interop::init_for_training(&init_from, &cfg, Some(&meta), Path::new("data/x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("101 tokens") && e.contains("uses 3") && e.contains("data/x"),
        "{e}"
    );
    // no meta.json means GPT-2 BPE data (50257 tokens)
    let e = interop::init_for_training(&init_from, &cfg, None, Path::new("data/x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("uses 50257"), "{e}");
    let chars: Vec<char> = (0..101u32)
        .map(|i| char::from_u32(0x4e00 + i).unwrap())
        .collect();
    let (model, params) = interop::init_for_training(
        &init_from,
        &cfg,
        Some(&Meta::char_vocab(&chars)),
        Path::new("d"),
    )
    .unwrap();
    assert_eq!((model.block_size, model.vocab_size), (16, 101));
    assert_eq!(params.len(), ParamLayout::new(&model).total);
}

// ---------------------------------------------------------------------------------------
// Export round trip

/// The checkpoint of the round-trip test: bias=false, vocabulary 70 padded to 128, weights
/// large enough that logits differ clearly.
fn roundtrip_checkpoint(dir: &Path) -> (PathBuf, Checkpoint) {
    let model = GptConfig::new(2, 2, 16, 24, 70, false, 0.1).unwrap();
    let layout = ParamLayout::new(&model);
    let mut params = layout.init_params(&model, 4242);
    let mut rng = Rng::new(77);
    for t in &layout.tensors {
        for x in &mut params[t.offset..t.offset + t.len] {
            *x = if t.shape.len() == 1 {
                1.0 + 0.1 * rng.normal() as f32
            } else {
                0.3 * rng.normal() as f32
            };
        }
    }
    // padded rows are never read; fill them with junk that must not reach the export
    params[layout.wte + 70 * 16..layout.wte + 128 * 16].fill(123.0);
    let total = layout.total;
    let ckpt = Checkpoint {
        params,
        optimizer: Some(OptimizerState {
            m: vec![0.5; total],
            v: vec![0.25; total],
            step: 3,
        }),
        state: TrainingState {
            iter_num: 250,
            best_val_loss: 1.5,
            model,
            config: serde_json::json!({"dataset": "x"}),
            engine_rng: [1, 2, 3, 4],
            loader: serde_json::json!({}),
            optimizer_step: 3,
            tokens_seen: 1000,
            world_size: 1,
        },
    };
    let path = dir.join("ckpt.safetensors");
    checkpoint::save(&path, &layout, &ckpt).unwrap();
    (path, ckpt)
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(path).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `$NANOGPT_ROUNDTRIP_DIR/export` for tools/make_hf_fixture.py.
#[test]
#[ignore = "run by tools/make_hf_fixture.py"]
fn write_roundtrip_export() {
    let out = PathBuf::from(std::env::var("NANOGPT_ROUNDTRIP_DIR").expect("NANOGPT_ROUNDTRIP_DIR"));
    let run = out.join("run");
    std::fs::create_dir_all(&run).unwrap();
    roundtrip_checkpoint(&run);
    interop::export_run(&run, None, &out.join("export")).unwrap();
}

#[test]
fn export_is_the_file_transformers_loads_with_our_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let (_, ckpt) = roundtrip_checkpoint(&run);
    let to = tmp.path().join("export");
    let report = interop::export_run(&run, None, &to).unwrap();
    assert_eq!(report.iter_num, 250);
    let (rt, meta) = read_all(&fixtures().join("roundtrip.safetensors"));
    // byte for byte the export tools/make_hf_fixture.py loaded into transformers
    assert_eq!(
        sha256_hex(&to.join("model.safetensors")),
        meta["model_sha256"]
    );
    assert_eq!(sha256_hex(&to.join("config.json")), meta["config_sha256"]);
    let (exported, st_meta) = read_all(&to.join("model.safetensors"));
    assert_eq!(st_meta["format"], "pt");
    assert_eq!(exported["transformer.wte.weight"].shape, [70, 16]);
    assert!(f32s(&exported["transformer.h.0.attn.c_attn.bias"])
        .iter()
        .all(|&x| x == 0.0));

    // transformers' logits on the export == ours on the checkpoint
    let x = ids(&rt["x"]);
    let mut model = ckpt.state.model.clone();
    model.dropout = 0.0;
    let ours = logits_of(
        cpu(model, ckpt.params.clone()).as_mut(),
        &x,
        rt["x"].shape[0],
    );
    let err = rel_err(&ours, &f32s(&rt["logits"]));
    assert!(err < 1e-5, "logits relative error {err:e}");

    // and the export loads back here with the same logits (biases are zeros now)
    let back = load_dir(&to, None).unwrap();
    assert_eq!(
        (
            back.model.vocab_size,
            back.model.block_size,
            back.model.bias
        ),
        (70, 24, true)
    );
    let again = logits_of(cpu(back.model, back.params).as_mut(), &x, rt["x"].shape[0]);
    assert!(rel_err(&again, &ours) < 1e-6);

    // a missing checkpoint is named
    let e = interop::export_run(&tmp.path().join("nope"), None, &to)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("ckpt.safetensors"), "{e}");
    let e = interop::export_run(&run, Some(Path::new("best.safetensors")), &to)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("best.safetensors") && e.contains("checkpoints there: ckpt.safetensors"),
        "{e}"
    );
}

/// Load time and peak anonymous memory of `$NANOGPT_HF_DIR` (a measurement, not a check):
/// `NANOGPT_HF_DIR=dir cargo test --release --test hf_interop -- --ignored --nocapture measure_load`
#[test]
#[ignore = "measurement; needs NANOGPT_HF_DIR"]
fn measure_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = PathBuf::from(std::env::var("NANOGPT_HF_DIR").expect("NANOGPT_HF_DIR"));
    let status_kb = |key: &str| -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let base = status_kb("RssAnon:");
    let (stop, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let (s2, p2) = (stop.clone(), peak.clone());
    let watcher = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let kb: u64 = s
                .lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            p2.fetch_max(kb, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    let t0 = std::time::Instant::now();
    let pre = load_dir(&dir, None).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let params_mb = pre.params.len() as f64 * 4.0 / 1e6;
    println!(
        "loaded {} ({} parameters, {:?}) in {secs:.2} s; f32 buffer {params_mb:.0} MB; peak anonymous memory above start {:.0} MB",
        dir.display(),
        pre.params.len(),
        pre.dtypes,
        (peak.load(Ordering::Relaxed).saturating_sub(base)) as f64 / 1e3
    );
}
