//! Finite-difference gradient checks and dropout behaviour of the CPU engine on micro models.

use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::{Batch, Engine};
use nanogpt::model::GptConfig;
use nanogpt::rng::Rng;

fn micro(bias: bool, dropout: f32) -> (CpuEngine, Vec<u32>, Vec<i32>) {
    let cfg = GptConfig::new(2, 2, 8, 6, 11, bias, dropout).unwrap();
    let eng = CpuEngine::from_seed(cfg, 5, 2).unwrap();
    // Larger init than 0.02 so that every path carries visible gradient.
    let mut params = eng.params();
    let mut rng = Rng::new(9);
    for x in params.iter_mut() {
        *x += (rng.normal() * 0.3) as f32;
    }
    let mut eng = eng;
    eng.set_params(&params);
    let inputs: Vec<u32> = vec![1, 4, 2, 9, 9, 0, 3, 3, 7, 10, 5, 2];
    let targets: Vec<i32> = vec![4, 2, 9, -1, 0, 3, 3, 7, 10, 5, 2, 8];
    (eng, inputs, targets)
}

fn check(bias: bool, dropout: f32) {
    let (mut eng, inputs, targets) = micro(bias, dropout);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t: 6,
    };
    let rng0 = eng.rng_state();
    eng.zero_grad();
    let loss0 = eng.forward_backward(batch, 1.0).unwrap();
    let grads = eng.grads();
    let params = eng.params();
    // Loss as a function of the parameters with the same dropout masks (same RNG state).
    let mut loss_at = |p: &[f32]| -> f64 {
        eng.set_params(p);
        eng.set_rng_state(rng0);
        eng.forward_backward(batch, 1.0).unwrap() as f64
    };
    assert!(
        (loss_at(&params) - loss0 as f64).abs() < 1e-6,
        "same masks, same loss"
    );
    let mut rng = Rng::new(1);
    let mut checked = 0;
    let mut worst = 0f64;
    for _ in 0..400 {
        let i = rng.below(params.len() as u64) as usize;
        let h = 1e-2f32;
        let mut p = params.clone();
        p[i] = params[i] + h;
        let up = loss_at(&p);
        p[i] = params[i] - h;
        let down = loss_at(&p);
        let fd = (up - down) / (2.0 * h as f64);
        let an = grads[i] as f64;
        let err = (fd - an).abs() / (an.abs() + fd.abs()).max(2e-2);
        worst = worst.max(err);
        assert!(
            err < 2e-2,
            "param {i}: analytic {an} vs finite difference {fd} (bias={bias}, dropout={dropout})"
        );
        checked += 1;
    }
    assert_eq!(checked, 400);
    eprintln!("gradcheck bias={bias} dropout={dropout}: worst normalised error {worst:.2e}");
}

#[test]
fn gradients_match_finite_differences() {
    check(true, 0.0);
    check(false, 0.0);
}

#[test]
fn gradients_match_finite_differences_with_dropout() {
    check(true, 0.2);
}

#[test]
fn dropout_is_seeded_and_inactive_in_evaluation() {
    let (mut a, inputs, targets) = micro(true, 0.3);
    let (mut b, _, _) = micro(true, 0.3);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t: 6,
    };
    let la: Vec<f32> = (0..3)
        .map(|_| a.forward_backward(batch, 1.0).unwrap())
        .collect();
    let lb: Vec<f32> = (0..3)
        .map(|_| b.forward_backward(batch, 1.0).unwrap())
        .collect();
    assert_eq!(la, lb, "same seed, same dropout masks");
    assert_eq!(a.grads(), b.grads());
    assert_ne!(la[0], la[1], "masks change from step to step");
    // Evaluation ignores dropout: equal to a model with dropout 0 and the same weights.
    let (mut no_drop, _, _) = micro(true, 0.0);
    no_drop.set_params(&a.params());
    let e1 = a.loss(batch).unwrap();
    let e2 = a.loss(batch).unwrap();
    assert_eq!(e1, e2);
    assert_eq!(e1, no_drop.loss(batch).unwrap());
    // Training loss with dropout differs from the evaluation loss.
    assert_ne!(a.forward_backward(batch, 1.0).unwrap(), e1);
}

#[test]
fn gradients_accumulate_across_micro_steps() {
    let (mut eng, inputs, targets) = micro(true, 0.0);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: 2,
        t: 6,
    };
    eng.zero_grad();
    eng.forward_backward(batch, 1.0).unwrap();
    let once = eng.grads();
    eng.zero_grad();
    eng.forward_backward(batch, 0.5).unwrap();
    eng.forward_backward(batch, 0.5).unwrap();
    for (a, b) in once.iter().zip(eng.grads()) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "{a} vs {b}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    for bias in [true, false] {
        let (mut eng, inputs, _) = micro(bias, 0.0);
        let t = 6;
        let no_targets = vec![0i32; 2 * t];
        let full = eng
            .logits(Batch {
                inputs: &inputs,
                targets: &no_targets,
                b: 2,
                t,
            })
            .unwrap();
        let v = eng.config().vocab_size;
        eng.decode_reset(2);
        for pos in 0..t {
            let step = eng.decode_step(&[inputs[pos], inputs[t + pos]]).unwrap();
            for s in 0..2 {
                let want = &full[(s * t + pos) * v..][..v];
                for (a, b) in step[s * v..(s + 1) * v].iter().zip(want) {
                    assert!((a - b).abs() < 1e-4, "pos {pos} seq {s}: {a} vs {b}");
                }
            }
        }
        assert_eq!(eng.decode_len(), t);
        assert!(
            eng.decode_step(&[1, 1]).is_err(),
            "cache full at block_size"
        );
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let (mut eng, inputs, targets) = micro(true, 0.0);
    let bad_tok: Vec<u32> = inputs.iter().map(|&x| x + 20).collect();
    let e = eng
        .loss(Batch {
            inputs: &bad_tok,
            targets: &targets,
            b: 2,
            t: 6,
        })
        .unwrap_err();
    assert!(e.to_string().contains("vocabulary"), "{e}");
    let e = eng
        .loss(Batch {
            inputs: &inputs,
            targets: &targets,
            b: 3,
            t: 6,
        })
        .unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let long = vec![0u32; 14];
    let e = eng
        .loss(Batch {
            inputs: &long,
            targets: &[0; 14],
            b: 1,
            t: 14,
        })
        .unwrap_err();
    assert!(e.to_string().contains("block_size"), "{e}");
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // Bigger than the micro model so that every kernel really splits work across threads.
    let cfg = GptConfig::new(2, 4, 64, 32, 300, true, 0.1).unwrap();
    let mut rng = Rng::new(11);
    let (b, t) = (6, 32);
    let inputs: Vec<u32> = (0..b * t).map(|_| rng.below(300) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|_| rng.below(300) as i32).collect();
    let run = |threads: usize| {
        let mut eng = CpuEngine::from_seed(cfg.clone(), 3, threads).unwrap();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
        };
        let mut losses = Vec::new();
        for _ in 0..3 {
            eng.zero_grad();
            losses.push(eng.forward_backward(batch, 1.0).unwrap());
            eng.step(&Default::default(), 1e-3);
        }
        (losses, eng.params())
    };
    let (l1, p1) = run(1);
    for threads in [2, 3] {
        let (l, p) = run(threads);
        assert_eq!(l1, l, "losses with {threads} threads");
        assert!(p1 == p, "parameters with {threads} threads differ");
    }
}
