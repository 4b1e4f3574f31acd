//! The CUDA engine's KV-cache decoding against the CPU engine's: prefill then decode steps
//! for several sequences side by side (different prompts per sequence), driven greedily the
//! way `sample::generate` drives an engine, including the re-prefill of a cropped window
//! when the context reaches block_size; head sizes below a warp, above a warp and above the
//! attention kernel's 256 threads; contexts longer than the kernel's 1024-position tile;
//! resets that reuse (stale) cache memory; and the errors of the decode contract.
//!
//! Tolerance: logits are compared per sequence as max |a - b| / max |b|. Both engines run in
//! fp32 (unit roundoff 6e-8) and differ only in summation order (warp/block reductions,
//! cuBLAS blocking, the attention kernel's grouped sums, FMA contraction), which keeps the
//! difference near 1e-6 of scale through a few layers; 1e-4 leaves two orders of magnitude
//! of headroom while any indexing, position or cache mistake shows up as an O(1) error.
//! Greedy tokens must agree wherever the CPU's two best logits are more than 1e-3 of scale
//! apart (closer calls are counted and reported, and the CPU's token is used for both).
//!
//! Without a GPU every test prints "skipped: no GPU (why)" and passes;
//! NANOGPT_REQUIRE_GPU=1 makes that a failure.

mod common;
mod reference;

use common::gpu::no_gpu;
use common::model::perturbed_params;
use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::cuda::CudaEngine;
use nanogpt::engine::{Engine, EngineError};
use nanogpt::model::GptConfig;
use nanogpt::rng::Rng;
use nanogpt::sample::{generate, SamplingParams};
use reference::rel_err;

const TOL: f64 = 1e-4;
const TIE: f64 = 1e-3;

/// (index of the largest logit, gap to the second largest relative to max |x|).
fn argmax(row: &[f32]) -> (u32, f64) {
    let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > best.1 {
            second = best.1;
            best = (i, x);
        } else if x > second {
            second = x;
        }
    }
    let scale = row.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-30);
    (best.0 as u32, ((best.1 - second) / scale) as f64)
}

/// Both engines over the same perturbed parameters (perturbed so that logits spread out
/// and greedy choices are clear).
fn engines(cfg: &GptConfig, seed: u64) -> (CpuEngine, CudaEngine) {
    let params = perturbed_params(cfg, seed);
    let cpu = CpuEngine::new(cfg.clone(), params.clone(), seed, 2).unwrap();
    let gpu = CudaEngine::new(cfg.clone(), params, seed, 0).unwrap();
    (cpu, gpu)
}

/// Each sequence's logits within TOL; returns the worst error.
fn compare(what: &str, got: &[f32], want: &[f32], n_seq: usize) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: logit counts");
    let v = want.len() / n_seq;
    let mut worst = 0f64;
    for s in 0..n_seq {
        let r = s * v..(s + 1) * v;
        let e = rel_err(&got[r.clone()], &want[r]);
        assert!(
            e < TOL,
            "{what}, sequence {s}: CUDA logits differ from the CPU engine's by {e:.2e} of scale"
        );
        worst = worst.max(e);
    }
    worst
}

/// Greedy decoding of `n_seq` different prompts of `prompt_len` tokens for `steps` new
/// tokens on both engines in lock step; when the context is full both are re-prefilled
/// with the last block_size/2 tokens (what `sample::generate` does). Returns the number of
/// re-prefills.
fn lockstep(cfg: &GptConfig, label: &str, n_seq: usize, prompt_len: usize, steps: usize) -> usize {
    let (mut cpu, mut gpu) = engines(cfg, 11);
    let (v, block) = (cfg.vocab_size, cfg.block_size);
    let mut rng = Rng::new(5);
    let mut seqs: Vec<Vec<u32>> = (0..n_seq)
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.below(v as u64) as u32)
                .collect()
        })
        .collect();
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let lc = cpu.decode_prefill(&flat, n_seq).unwrap();
    let lg = gpu.decode_prefill(&flat, n_seq).unwrap();
    assert_eq!(
        lg.len(),
        n_seq * v,
        "{label}: prefill returns [n_seq, vocab_size]"
    );
    let mut worst = compare(&format!("{label}: prefill"), &lg, &lc, n_seq);
    assert_eq!(
        gpu.decode_len(),
        prompt_len,
        "{label}: length after prefill"
    );
    let (mut lc, mut lg) = (lc, lg);
    let (mut refills, mut close_calls) = (0, 0);
    for step in 0..steps {
        let mut next = Vec::with_capacity(n_seq);
        for s in 0..n_seq {
            let (tc, gap) = argmax(&lc[s * v..(s + 1) * v]);
            let (tg, _) = argmax(&lg[s * v..(s + 1) * v]);
            if gap > TIE {
                assert_eq!(
                    tg, tc,
                    "{label}, step {step}, sequence {s}: greedy token differs (CPU gap {gap:.2e})"
                );
            } else {
                close_calls += 1;
            }
            next.push(tc);
            seqs[s].push(tc);
        }
        let what = format!("{label}: step {step}");
        if cpu.decode_len() >= block {
            assert_eq!(gpu.decode_len(), block, "{what}: GPU cache full too");
            assert!(
                matches!(gpu.decode_step(&next), Err(EngineError::TooLong { .. })),
                "{what}: a step with a full cache is refused"
            );
            let keep = block / 2;
            let window: Vec<u32> = seqs
                .iter()
                .flat_map(|r| r[r.len() - keep..].iter().copied())
                .collect();
            lc = cpu.decode_prefill(&window, n_seq).unwrap();
            lg = gpu.decode_prefill(&window, n_seq).unwrap();
            refills += 1;
        } else {
            lc = cpu.decode_step(&next).unwrap();
            lg = gpu.decode_step(&next).unwrap();
        }
        worst = worst.max(compare(&what, &lg, &lc, n_seq));
        assert_eq!(gpu.decode_len(), cpu.decode_len(), "{what}: decode_len");
    }
    eprintln!(
        "{label}: {n_seq} sequences, prompt {prompt_len}, {steps} steps, {refills} re-prefills: \
         worst relative logit error {worst:.2e}; {close_calls} near-tied greedy choices"
    );
    refills
}

#[test]
fn prefill_and_steps_match_the_cpu_engine_past_block_size() {
    if no_gpu("prefill_and_steps_match_the_cpu_engine_past_block_size") {
        return;
    }
    // head size 16 (below a warp), block_size 24: prompt 10 + 30 steps re-prefills once.
    let cfg = GptConfig::new(2, 4, 64, 24, 97, true, 0.0).unwrap();
    assert!(lockstep(&cfg, "hs 16, bias", 3, 10, 30) >= 1);
    // head size 96: 2 groups of 96 threads in the attention kernel, 64 threads idle.
    let cfg = GptConfig::new(2, 1, 96, 16, 61, false, 0.0).unwrap();
    assert!(lockstep(&cfg, "hs 96, no bias", 3, 5, 30) >= 2);
    // head size 320 (more than the kernel's 256 threads): threads loop over dimensions.
    let cfg = GptConfig::new(1, 1, 320, 12, 50, true, 0.0).unwrap();
    assert!(lockstep(&cfg, "hs 320", 2, 3, 20) >= 1);
}

#[test]
fn contexts_longer_than_one_attention_tile_match() {
    if no_gpu("contexts_longer_than_one_attention_tile_match") {
        return;
    }
    // Prefill 1030 positions (queries beyond the 1024-position tile), decode into the
    // second tile up to block_size 1100, re-prefill 550 and go on.
    let cfg = GptConfig::new(1, 2, 32, 1100, 40, true, 0.0).unwrap();
    assert_eq!(lockstep(&cfg, "long context", 2, 1030, 80), 1);
}

#[test]
fn sampler_output_is_the_same_greedy_text_on_both_engines() {
    if no_gpu("sampler_output_is_the_same_greedy_text_on_both_engines") {
        return;
    }
    let cfg = GptConfig::new(2, 2, 48, 16, 67, true, 0.0).unwrap();
    let (mut cpu, mut gpu) = engines(&cfg, 3);
    let params = SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        stop_token: None,
    };
    let prompt = [3u32, 14, 15, 9, 26];
    let run = |e: &mut dyn Engine| {
        let mut rng = Rng::new(9);
        generate(e, &prompt, 3, 40, &params, &mut rng).unwrap()
    };
    let (tc, tg) = (run(&mut cpu), run(&mut gpu));
    assert_eq!(tc.len(), 3);
    assert!(tc.iter().all(|s| s.len() == 40));
    assert_eq!(
        tg, tc,
        "greedy samples (40 tokens past block_size 16) differ between the CUDA and CPU engines"
    );
    // Sampling allocated neither gradients nor AdamW moments: they wait for a training
    // pass (4 and 8 bytes per parameter).
    let report = gpu
        .memory_report()
        .expect("the CUDA engine reports its memory");
    let held: Vec<&str> = report.items.iter().map(|(what, _)| what.as_str()).collect();
    assert!(
        !held
            .iter()
            .any(|w| w.starts_with("gradients") || w.starts_with("AdamW")),
        "{held:?}"
    );
    let total = gpu.layout().total as u64;
    assert_eq!(
        report.before_first_pass,
        vec![
            ("gradients".to_string(), 4 * total),
            ("AdamW moments".to_string(), 8 * total)
        ]
    );
}

#[test]
fn resets_and_batch_size_changes_start_from_a_clean_cache() {
    if no_gpu("resets_and_batch_size_changes_start_from_a_clean_cache") {
        return;
    }
    let cfg = GptConfig::new(2, 2, 32, 12, 40, true, 0.0).unwrap();
    let (mut cpu, mut gpu) = engines(&cfg, 21);
    let v = cfg.vocab_size;
    // Fill the cache of 2 sequences, then reset: the stale keys must not be attended to.
    let first: Vec<Vec<f32>> = (0..2)
        .map(|round| {
            gpu.decode_reset(2);
            cpu.decode_reset(2);
            assert_eq!(gpu.decode_len(), 0);
            let mut out = Vec::new();
            for k in 0..12u32 {
                let toks = [(k * 7 + round) % 40, (k * 3 + 1) % 40];
                let lg = gpu.decode_step(&toks).unwrap();
                let lc = cpu.decode_step(&toks).unwrap();
                compare(&format!("from empty, round {round}, step {k}"), &lg, &lc, 2);
                out.extend(lg);
            }
            assert!(matches!(
                gpu.decode_step(&[0, 0]),
                Err(EngineError::TooLong {
                    t: 13,
                    block_size: 12
                })
            ));
            out
        })
        .collect();
    assert_ne!(first[0], first[1], "different tokens, different logits");
    // A prefill for another number of sequences, a full-length prefill, then one of 3 again.
    for (n_seq, t) in [(3, 4), (1, 12), (3, 7)] {
        let toks: Vec<u32> = (0..n_seq * t).map(|i| (i * 13 % v) as u32).collect();
        let lg = gpu.decode_prefill(&toks, n_seq).unwrap();
        let lc = cpu.decode_prefill(&toks, n_seq).unwrap();
        compare(&format!("prefill {n_seq} x {t}"), &lg, &lc, n_seq);
        assert_eq!(gpu.decode_len(), t);
        if t < cfg.block_size {
            let next: Vec<u32> = (0..n_seq as u32).collect();
            let lg = gpu.decode_step(&next).unwrap();
            let lc = cpu.decode_step(&next).unwrap();
            compare(
                &format!("step after prefill {n_seq} x {t}"),
                &lg,
                &lc,
                n_seq,
            );
        } else {
            assert!(
                gpu.decode_step(&[1]).is_err(),
                "full after a block_size prefill"
            );
        }
    }
}

#[test]
fn decode_errors_follow_the_engine_contract() {
    if no_gpu("decode_errors_follow_the_engine_contract") {
        return;
    }
    let cfg = GptConfig::new(1, 2, 16, 8, 30, true, 0.0).unwrap();
    let (_, mut gpu) = engines(&cfg, 1);
    let e = gpu.decode_step(&[1]).unwrap_err();
    assert!(e.to_string().contains("before decode_reset"), "{e}");
    assert_eq!(gpu.decode_len(), 0);
    gpu.decode_reset(2);
    assert!(matches!(gpu.decode_step(&[1]), Err(EngineError::Shape(_))));
    assert!(matches!(
        gpu.decode_step(&[1, 30]),
        Err(EngineError::TokenOutOfRange { id: 30, .. })
    ));
    assert_eq!(
        gpu.decode_len(),
        0,
        "refused steps leave the cache as it was"
    );
    assert!(
        gpu.decode_prefill(&[1, 2, 3], 2).is_err(),
        "rows of unequal length"
    );
    assert!(matches!(
        gpu.decode_prefill(&[0; 9], 1),
        Err(EngineError::TooLong {
            t: 9,
            block_size: 8
        })
    ));
    assert!(gpu.decode_prefill(&[1, 2], 2).is_ok());
    assert_eq!(gpu.decode_len(), 1);
}
