//! Exact resume: a run interrupted at a checkpoint and resumed with `init_from=resume`
//! reproduces the uninterrupted run bit for bit (every training loss, every evaluation),
//! with dropout and gradient accumulation active so that the dropout generator, the data
//! loader streams and the AdamW state all have to be restored exactly.

mod common;

use common::{prepare_data, tiny_train_args, train};
use nanogpt::train::checkpoint;
use std::collections::BTreeMap;
use std::path::Path;

const K: u64 = 20;

/// Settings shared by every leg: only max_iters and init_from differ between runs.
fn args(data: &Path, out: &Path, max_iters: u64, init_from: &str) -> Vec<String> {
    let max = format!("--max_iters={max_iters}");
    let eval = format!("--eval_interval={K}");
    let init = format!("--init_from={init_from}");
    tiny_train_args(
        data,
        out,
        &[
            &max,
            &eval,
            &init,
            "--eval_iters=2",
            "--dropout=0.1",
            "--gradient_accumulation_steps=2",
            "--always_save_checkpoint=True",
            "--warmup_iters=5",
            "--lr_decay_iters=60",
            "--weight_decay=0.1",
            "--grad_clip=1.0",
            "--log_interval=1",
        ],
    )
}

fn losses_by_iter(losses: &[(u64, f32)]) -> BTreeMap<u64, f32> {
    let mut m = BTreeMap::new();
    for &(it, l) in losses {
        assert!(
            m.insert(it, l).is_none(),
            "iteration {it} trained twice in one run"
        );
    }
    m
}

/// (kind, iter, losses and lr as bit patterns) of every metrics.jsonl record.
fn metric_records(out_dir: &Path) -> Vec<(String, u64, Vec<u64>)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let nums = ["loss", "train_loss", "val_loss", "lr", "grad_norm"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(|x| x.as_f64()).map(f64::to_bits))
                .collect();
            (
                v["kind"].as_str().unwrap_or_default().to_string(),
                v["iter"].as_u64().unwrap(),
                nums,
            )
        })
        .collect()
}

fn assert_bit_equal(what: &str, it: u64, a: f32, b: f32) {
    assert_eq!(
        a.to_bits(),
        b.to_bits(),
        "{what} at iteration {it} differs: straight run {a:e}, resumed run {b:e}"
    );
}

#[test]
fn resumed_run_matches_straight_run_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    let straight_dir = root.path().join("straight");
    let split_dir = root.path().join("split");

    // Straight: iterations 0..=2K in one go.
    let straight = train(&args(&data, &straight_dir, 2 * K, "scratch")).unwrap();
    let s_losses = losses_by_iter(&straight.losses);
    assert_eq!(
        s_losses.keys().copied().collect::<Vec<_>>(),
        (0..=2 * K).collect::<Vec<_>>(),
        "max_iters = {} trains iterations 0..={}",
        2 * K,
        2 * K
    );
    let s_eval_iters: Vec<u64> = straight.evals.iter().map(|e| e.0).collect();
    assert_eq!(s_eval_iters, vec![0, K, 2 * K]);
    assert_eq!(straight.final_iter, 2 * K + 1);
    for &(it, l) in &straight.losses {
        assert!(l.is_finite() && l > 0.0, "loss {l} at iteration {it}");
    }
    // Training makes progress on this tiny corpus: later losses are lower than the first.
    let first = s_losses[&0];
    let last = s_losses[&(2 * K)];
    assert!(last < first, "loss did not decrease: {first} -> {last}");

    // Split: 0..=K (the checkpoint at K holds the state before step K), then resume.
    let leg1 = train(&args(&data, &split_dir, K, "scratch")).unwrap();
    let ckpt = checkpoint::read_state(&split_dir.join("ckpt.safetensors")).unwrap();
    assert_eq!(
        ckpt.iter_num, K,
        "checkpoint at iteration K holds iter_num K"
    );
    assert_eq!(
        ckpt.tokens_seen,
        K * 4 * 16 * 2,
        "tokens_seen counts the K steps before the checkpoint"
    );
    let leg2 = train(&args(&data, &split_dir, 2 * K, "resume")).unwrap();
    assert_eq!(leg2.final_iter, 2 * K + 1);
    let l1 = losses_by_iter(&leg1.losses);
    let l2 = losses_by_iter(&leg2.losses);
    assert_eq!(
        l1.keys().copied().collect::<Vec<_>>(),
        (0..=K).collect::<Vec<_>>()
    );
    assert_eq!(
        l2.keys().copied().collect::<Vec<_>>(),
        (K..=2 * K).collect::<Vec<_>>(),
        "the resumed run starts by repeating iteration K"
    );
    for (&it, &l) in l1.iter().chain(l2.iter()) {
        assert_bit_equal("training loss", it, s_losses[&it], l);
    }

    // Evaluations: the resumed run repeats the evaluation at K with the same batches.
    let s_evals: BTreeMap<u64, (f32, f32)> = straight
        .evals
        .iter()
        .map(|&(i, t, v)| (i, (t, v)))
        .collect();
    let r_evals: Vec<(u64, f32, f32)> = leg1.evals.iter().chain(&leg2.evals).copied().collect();
    let r_iters: Vec<u64> = r_evals.iter().map(|e| e.0).collect();
    assert_eq!(r_iters, vec![0, K, K, 2 * K]);
    for (it, t, v) in r_evals {
        let (st, sv) = s_evals[&it];
        assert_bit_equal("eval train loss", it, st, t);
        assert_bit_equal("eval val loss", it, sv, v);
    }

    // metrics.jsonl of the resumed run was trimmed at the checkpoint, so it holds exactly
    // the records of the straight run (timings aside).
    let records = metric_records(&straight_dir);
    let count = |kind: &str| records.iter().filter(|r| r.0 == kind).count() as u64;
    assert_eq!((count("train"), count("eval")), (2 * K + 1, 3));
    assert_eq!(
        metric_records(&split_dir),
        records,
        "metrics.jsonl after resume"
    );

    // The final checkpoints of both runs hold identical weights and optimizer state.
    let a = checkpoint::load(&straight_dir.join("ckpt.safetensors"), true).unwrap();
    let b = checkpoint::load(&split_dir.join("ckpt.safetensors"), true).unwrap();
    assert_eq!(a.state.iter_num, 2 * K);
    assert_eq!(a.params, b.params, "weights differ after resume");
    assert_eq!(a.optimizer, b.optimizer, "AdamW state differs after resume");
    assert_eq!(a.state.engine_rng, b.state.engine_rng);
    assert_eq!(a.state.loader, b.state.loader);
    assert_eq!(a.state.tokens_seen, b.state.tokens_seen);
    assert_eq!(
        a.state.best_val_loss.to_bits(),
        b.state.best_val_loss.to_bits()
    );
}

#[test]
fn chained_resumes_match_straight_run() {
    // Three legs of 10 iterations each (resumed twice) against one run of 30.
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    let mk = |out: &Path, max: u64, init: &str| {
        tiny_train_args(
            &data,
            out,
            &[
                &format!("--max_iters={max}"),
                &format!("--init_from={init}"),
                "--eval_interval=10",
                "--dropout=0.2",
                "--gradient_accumulation_steps=3",
                "--batch_size=2",
            ],
        )
    };
    let straight_dir = root.path().join("straight");
    let chain_dir = root.path().join("chain");
    let straight = train(&mk(&straight_dir, 30, "scratch")).unwrap();
    let s = losses_by_iter(&straight.losses);
    let mut resumed = BTreeMap::new();
    for (max, init) in [(10, "scratch"), (20, "resume"), (30, "resume")] {
        let leg = train(&mk(&chain_dir, max, init)).unwrap();
        // The last iteration of a leg is trained again by the next leg: keep the later one.
        resumed.extend(leg.losses);
    }
    assert_eq!(resumed.len(), s.len());
    for (it, l) in resumed {
        assert_bit_equal("training loss", it, s[&it], l);
    }
}

#[test]
fn resume_without_checkpoint_names_the_missing_file() {
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    let out = root.path().join("empty_run");
    let err = train(&tiny_train_args(&data, &out, &["--init_from=resume"])).unwrap_err();
    let msg = format!("{err:#}");
    common::assert_contains_all(&msg, &["ckpt.safetensors", "init_from=scratch"]);
}

/// An edit of a checkpoint in memory.
type Alteration = Box<dyn Fn(&mut checkpoint::Checkpoint)>;

/// The exact-resume test above would be vacuous if the dropout generator or the data loader
/// state had no effect: resuming from a checkpoint whose dropout state (or loader state)
/// was altered must change the losses.
#[test]
fn resume_depends_on_saved_dropout_and_loader_state() {
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    let base = root.path().join("base");
    let leg1 = args(&data, &base, K, "scratch");
    train(&leg1).unwrap();
    let reference = losses_by_iter(&train(&args(&data, &base, K + 3, "resume")).unwrap().losses);

    let ckpt_path = base.join("ckpt.safetensors");
    // Run 1 left its checkpoint at K; the resumed run above overwrote it only at evaluation
    // iterations (none after K up to K + 3), so it still holds iteration K.
    let ckpt = checkpoint::load(&ckpt_path, true).unwrap();
    assert_eq!(ckpt.state.iter_num, K);
    let layout = nanogpt::model::ParamLayout::new(&ckpt.state.model);

    let variants: [(&str, Alteration); 2] = [
        (
            "dropout generator",
            Box::new(|c| c.state.engine_rng[0] ^= 0x9e37_79b9_7f4a_7c15),
        ),
        (
            "data loader",
            Box::new(|c| {
                let mut ls: nanogpt::data::LoaderState =
                    serde_json::from_value(c.state.loader.clone()).unwrap();
                ls.train = nanogpt::rng::Rng::new(42);
                c.state.loader = serde_json::to_value(&ls).unwrap();
            }),
        ),
    ];
    for (name, alter) in variants {
        let dir = root.path().join(name.replace(' ', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = ckpt.clone();
        alter(&mut c);
        checkpoint::save(&dir.join("ckpt.safetensors"), &layout, &c).unwrap();
        let altered = losses_by_iter(&train(&args(&data, &dir, K + 3, "resume")).unwrap().losses);
        assert_eq!(altered.len(), reference.len());
        let differ = altered
            .iter()
            .filter(|(it, l)| l.to_bits() != reference[it].to_bits())
            .count();
        assert!(
            differ > 0,
            "changing the saved {name} state did not change any loss; the exact-resume test \
             would not notice if it were lost"
        );
    }
}
