//! `nanogpt sample`: text from a checkpoint (or from several side by side) with a KV cache,
//! sample.py's keys: start, num_samples, max_new_tokens, temperature, top_k, seed.
//!
//! All `num_samples` continuations are decoded together as one batch. When a sequence
//! reaches block_size tokens the cache is rebuilt from the last block_size/2 tokens, so each
//! token costs O(block_size) amortised (nanoGPT re-runs the whole window for every token).

use crate::config::{CheckpointSelection, SampleConfig};
use crate::engine::{self, Engine};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, CheckpointPaths};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How to pick each next token.
#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub stop_token: Option<u32>,
}

/// Draws one token from `logits` (real vocabulary) with temperature and top-k, in f64 so
/// that small temperatures (0.01) neither overflow nor produce NaN.
pub fn sample_token(
    logits: &[f32],
    p: &SamplingParams,
    rng: &mut Rng,
    scratch: &mut Vec<f64>,
) -> u32 {
    let temp = p.temperature.max(1e-6);
    scratch.clear();
    scratch.extend(logits.iter().map(|&x| x as f64 / temp));
    if let Some(k) = p.top_k.filter(|&k| k > 0 && k < scratch.len()) {
        let mut sorted: Vec<f64> = scratch.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        for x in scratch.iter_mut() {
            if *x < kth {
                *x = f64::NEG_INFINITY;
            }
        }
    }
    let mx = scratch.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in scratch.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    let mut r = rng.next_f64() * sum;
    for (i, &w) in scratch.iter().enumerate() {
        if r < w {
            return i as u32;
        }
        r -= w;
    }
    // rounding left r >= 0 after the last positive weight: take the most likely token
    scratch
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// Generates `max_new_tokens` after `prompt` for `n` sequences at once. Returns the new
/// tokens of each sequence (cut at the stop token when one is set).
pub fn generate(
    engine: &mut dyn Engine,
    prompt: &[u32],
    n: usize,
    max_new_tokens: usize,
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<Vec<Vec<u32>>> {
    if prompt.is_empty() {
        bail!("the start text encodes to no tokens; give a non-empty start");
    }
    let block = engine.config().block_size;
    let v = engine.config().vocab_size;
    let mut seqs: Vec<Vec<u32>> = vec![prompt.to_vec(); n];
    // Where each sequence stopped (after its stop token); all sequences keep growing in step
    // so that the batch stays rectangular.
    let mut stopped: Vec<Option<usize>> = vec![None; n];
    let mut scratch = Vec::new();
    // Feed the context (at most block_size - 1 tokens so that one new token fits).
    let mut logits = refill(engine, &seqs, block.saturating_sub(1).max(1))?;
    for _ in 0..max_new_tokens {
        let mut next = Vec::with_capacity(n);
        for (s, seq) in seqs.iter_mut().enumerate() {
            let tok = sample_token(&logits[s * v..(s + 1) * v], params, rng, &mut scratch);
            seq.push(tok);
            if stopped[s].is_none() && Some(tok) == params.stop_token {
                stopped[s] = Some(seq.len());
            }
            next.push(tok);
        }
        if stopped.iter().all(|s| s.is_some()) {
            break;
        }
        logits = if engine.decode_len() >= block {
            refill(engine, &seqs, block / 2)?
        } else {
            engine.decode_step(&next)?
        };
    }
    Ok(seqs
        .into_iter()
        .zip(stopped)
        .map(|(s, stop)| s[prompt.len()..stop.unwrap_or(s.len())].to_vec())
        .collect())
}

/// Rebuilds the cache from the last `keep` tokens of every sequence in one batched pass;
/// returns the logits after the last one. Sequences always have equal lengths.
fn refill(engine: &mut dyn Engine, seqs: &[Vec<u32>], keep: usize) -> Result<Vec<f32>> {
    let len = seqs[0].len();
    let keep = keep.min(len).max(1);
    let tokens: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s[len - keep..].iter().copied())
        .collect();
    Ok(engine.decode_prefill(&tokens, seqs.len())?)
}

/// The tokenizer for a run directory: out_dir/meta.json (written by `nanogpt train`), else
/// the dataset's meta.json recorded in the checkpoint's config, else GPT-2 BPE.
fn tokenizer_for(out_dir: &Path, config: &serde_json::Value) -> Result<Tokenizer> {
    if out_dir.join("meta.json").exists() {
        return Ok(Tokenizer::for_data_dir(out_dir)?);
    }
    let data_dir = match config.get("data_dir").and_then(|v| v.as_str()) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let ds = config
                .get("dataset")
                .and_then(|v| v.as_str())
                .unwrap_or("openwebtext");
            Path::new("data").join(ds)
        }
    };
    Ok(Tokenizer::for_data_dir(&data_dir)?)
}

/// Generates `cfg.num_samples` continuations of the start text and prints them (after
/// `header`, if any), each followed by a separator line as sample.py does; reports the
/// generation speed on stderr.
fn sample_and_print(
    cfg: &SampleConfig,
    engine: &mut dyn Engine,
    tok: &Tokenizer,
    text: &str,
    header: Option<String>,
    out: &mut impl Write,
) -> Result<()> {
    let prompt = tok.encode(text)?;
    let params = SamplingParams {
        temperature: cfg.temperature,
        top_k: cfg.top_k_opt(),
        stop_token: if cfg.stop_at_eot {
            tok.eot_token()
        } else {
            None
        },
    };
    let mut rng = Rng::new(cfg.seed);
    let started = std::time::Instant::now();
    let samples = generate(
        engine,
        &prompt,
        cfg.num_samples,
        cfg.max_new_tokens,
        &params,
        &mut rng,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let produced: usize = samples.iter().map(|s| s.len()).sum();
    eprintln!(
        "generated {produced} tokens in {secs:.3} s ({:.0} tokens/s, {})",
        produced as f64 / secs.max(1e-9),
        engine.device_name()
    );
    if let Some(h) = header {
        writeln!(out, "{h}")?;
    }
    for s in samples {
        let mut all = prompt.clone();
        all.extend(s);
        writeln!(out, "{}", tok.decode(&all))?;
        writeln!(out, "---------------")?;
    }
    out.flush()?;
    Ok(())
}

/// Runs `nanogpt sample`.
pub fn run(cfg: &SampleConfig) -> Result<()> {
    if cfg.init_from != "resume" {
        // OpenAI GPT-2 weights (gpt2, gpt2-medium, ...) or a Hugging Face GPT-2 directory
        let (pre, tok) = crate::interop::load_for_sampling(&cfg.init_from)?;
        let mut engine = engine::create(
            cfg.device_spec()?,
            cfg.dtype_kind()?,
            pre.model,
            pre.params,
            cfg.seed,
            cfg.threads,
        )?;
        let mut out = std::io::stdout().lock();
        sample_and_print(
            cfg,
            engine.as_mut(),
            &tok,
            &cfg.start_text()?,
            None,
            &mut out,
        )?;
        return Ok(());
    }
    let out_dir = PathBuf::from(&cfg.out_dir);
    let paths = CheckpointPaths::new(&out_dir);
    let targets: Vec<(Option<u64>, PathBuf)> = match cfg.checkpoint_selection()? {
        CheckpointSelection::Latest => {
            let latest = paths.latest();
            if !latest.exists() {
                bail!(
                    "no checkpoint at {}: set out_dir to a training run's directory (one that \
                     `nanogpt train` wrote), or sample OpenAI's weights with init_from=gpt2",
                    latest.display()
                );
            }
            vec![(None, latest)]
        }
        CheckpointSelection::All => {
            let kept = paths.list_kept()?;
            if kept.is_empty() {
                bail!(
                    "checkpoints=all: no kept checkpoints (ckpt_NNNNNN.safetensors) in {}; \
                     train with keep_checkpoints_at set, or sample the latest with checkpoints=\"\"",
                    out_dir.display()
                );
            }
            kept.into_iter().map(|(i, p)| (Some(i), p)).collect()
        }
        CheckpointSelection::Iters(iters) => {
            let kept = paths.list_kept()?;
            let mut chosen = Vec::new();
            for i in iters {
                match kept.iter().find(|(k, _)| *k == i) {
                    Some((_, p)) => chosen.push((Some(i), p.clone())),
                    None => {
                        let have: Vec<String> = kept.iter().map(|(k, _)| k.to_string()).collect();
                        bail!(
                            "no checkpoint {} (iteration {i}) in {}; kept iterations: {}; \
                             use one of those, checkpoints=all, or checkpoints=\"\" for the latest",
                            paths
                                .kept(i)
                                .file_name()
                                .unwrap_or_default()
                                .to_string_lossy(),
                            out_dir.display(),
                            if have.is_empty() {
                                "none".to_string()
                            } else {
                                have.join(", ")
                            }
                        );
                    }
                }
            }
            chosen
        }
    };
    let device = cfg.device_spec()?;
    let text = cfg.start_text()?;
    let mut out = std::io::stdout().lock();
    for (label, path) in &targets {
        let ckpt = checkpoint::load(path, false)
            .with_context(|| format!("loading checkpoint {}", path.display()))?;
        let tok = tokenizer_for(&out_dir, &ckpt.state.config)?;
        let mut model = ckpt.state.model.clone();
        model.dropout = 0.0;
        if tok.vocab_size() > model.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model in {} has a vocabulary of {}; \
                 out_dir/meta.json does not belong to this checkpoint",
                tok.vocab_size(),
                path.display(),
                model.vocab_size
            );
        }
        let mut engine = engine::create(
            device,
            cfg.dtype_kind()?,
            model,
            ckpt.params,
            cfg.seed,
            cfg.threads,
        )?;
        let header = (targets.len() > 1 || label.is_some()).then(|| {
            let iter = label.unwrap_or(ckpt.state.iter_num);
            format!("=== iter {iter} ({}) ===", path.display())
        });
        sample_and_print(cfg, engine.as_mut(), &tok, &text, header, &mut out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_temperature_is_greedy_and_finite() {
        let logits = vec![1.0f32, 30.0, 29.9, -5.0];
        let p = SamplingParams {
            temperature: 0.01,
            top_k: None,
            stop_token: None,
        };
        let mut rng = Rng::new(1);
        let mut scratch = Vec::new();
        for _ in 0..100 {
            assert_eq!(sample_token(&logits, &p, &mut rng, &mut scratch), 1);
        }
    }

    #[test]
    fn top_k_restricts_choices_and_distribution_follows_softmax() {
        let logits = vec![0.0f32, 1.0, 2.0, 3.0];
        let mut rng = Rng::new(2);
        let mut scratch = Vec::new();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            stop_token: None,
        };
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[sample_token(&logits, &p, &mut rng, &mut scratch) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[1], 0);
        let ratio = counts[3] as f64 / counts[2] as f64; // e^1
        assert!((ratio - std::f64::consts::E).abs() < 0.15, "{counts:?}");
    }
}
