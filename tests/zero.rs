//! ZeRO stage 1 (`zero_stage=1`) over the TCP ring on loopback: 2 and 3 ranks give the
//! same losses, parameters and AdamW moments as `zero_stage=0` on as many ranks, bit for
//! bit; runs resume across ZeRO stages (and world sizes) from the whole-state checkpoints;
//! one rank accepts the key with a note; the startup log reports the AdamW memory per rank
//! (and for GPT-2 124M on 8 ranks, the numbers this computes). On GPUs: sharded steps equal
//! the whole step; an engine holds only its shard's moments on the device; and a model
//! whose whole moments do not fit one (emulated, 48 MiB) GPU trains and resumes on two.

mod common;

use common::dist::{assert_same_checkpoint, loss_bits, run_ranks_ok, short_run_args, train_alone};
use common::prepare_data;
use std::path::Path;

fn assert_same_loss_bits(a: &Path, b: &Path, what: &str) {
    let (x, y) = (loss_bits(a), loss_bits(b));
    assert_eq!(x.len(), 7 + 3 * 2, "{what}: {x:?}");
    for (p, q) in x.iter().zip(&y) {
        assert_eq!(
            p,
            q,
            "{what}: {} at iter {}: {} vs {}",
            p.0,
            p.1,
            f32::from_bits(p.2),
            f32::from_bits(q.2)
        );
    }
    assert_eq!(x.len(), y.len(), "{what}");
}

/// Parameters, AdamW moments and step of `out_dir`'s latest checkpoint are identical, the
/// whole moments were saved, and every rank's shard of them was updated.
fn assert_same_whole_checkpoint(a: &Path, b: &Path, what: &str) {
    let (x, _) = assert_same_checkpoint(a, b, what);
    let ox = x.optimizer.unwrap();
    assert_eq!(
        ox.m.len(),
        x.params.len(),
        "{what}: whole first moments saved"
    );
    // Every rank's shard was updated (rows of unused tokens keep zero moments).
    for r in nanogpt::dist::shard_ranges(ox.v.len(), 3) {
        assert!(
            ox.v[r.clone()].iter().any(|v| *v > 0.0),
            "{what}: {r:?} never updated"
        );
    }
}

/// The short data-parallel run with clipping active (grad_clip 0.05 is below the norms of
/// this model) as well as dropout.
fn run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut e = vec!["--grad_clip=0.05"];
    e.extend_from_slice(extra);
    short_run_args(data, out, &e)
}

#[test]
fn zero1_matches_zero0_bit_for_bit_on_2_and_3_ranks_and_resumes_across_stages() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let dir = |name: &str| cwd.join(name);

    for world in [2usize, 3] {
        let z0 = dir(&format!("z0w{world}"));
        let z1 = dir(&format!("z1w{world}"));
        let log0 = run_ranks_ok(cwd, world, &run_args(&data, &z0, &[]));
        let log1 = run_ranks_ok(cwd, world, &run_args(&data, &z1, &["--zero_stage=1"]));
        assert!(
            log0.contains("AdamW state: ") && log0.contains("(moments of all"),
            "{log0}"
        );
        assert!(
            log1.contains("zero_stage=1: moments of at most")
                && log1.contains(&format!("on each of {world} ranks")),
            "{log1}"
        );
        assert!(log1.contains("norm "), "{log1}");
        assert_same_loss_bits(&z0, &z1, &format!("{world} ranks, zero_stage 0 vs 1"));
        assert_same_whole_checkpoint(&z0, &z1, &format!("{world} ranks, zero_stage 0 vs 1"));
    }

    // Stage 0 to iteration 3, then stage 1 to 6: the straight stage-0 run, bit for bit.
    let a = dir("z0then1");
    run_ranks_ok(cwd, 2, &run_args(&data, &a, &["--max_iters=3"]));
    run_ranks_ok(
        cwd,
        2,
        &run_args(&data, &a, &["--zero_stage=1", "--init_from=resume"]),
    );
    assert_same_loss_bits(&dir("z0w2"), &a, "zero_stage 0 then 1 (resumed at 3)");
    assert_same_whole_checkpoint(&dir("z0w2"), &a, "zero_stage 0 then 1 (resumed at 3)");

    // Stage 1 to 3, then stage 0 to 6; and stage 1 on 2 ranks, resumed with stage 1 on 3.
    let b = dir("z1then0");
    run_ranks_ok(
        cwd,
        2,
        &run_args(&data, &b, &["--max_iters=3", "--zero_stage=1"]),
    );
    run_ranks_ok(cwd, 2, &run_args(&data, &b, &["--init_from=resume"]));
    assert_same_loss_bits(&dir("z0w2"), &b, "zero_stage 1 then 0 (resumed at 3)");
    assert_same_whole_checkpoint(&dir("z0w2"), &b, "zero_stage 1 then 0 (resumed at 3)");
    let c = dir("z1w2then3");
    run_ranks_ok(
        cwd,
        2,
        &run_args(&data, &c, &["--max_iters=3", "--zero_stage=1"]),
    );
    run_ranks_ok(
        cwd,
        3,
        &run_args(&data, &c, &["--zero_stage=1", "--init_from=resume"]),
    );
    // Same as stage 1 on 3 ranks from the start, except for float summation order across
    // the first three iterations' 2-rank sums: compare within rounding.
    let (x, y) = (loss_bits(&dir("z1w3")), loss_bits(&c));
    assert_eq!(x.len(), y.len());
    for (p, q) in x.iter().zip(&y) {
        let (u, v) = (f32::from_bits(p.2), f32::from_bits(q.2));
        assert!(
            (u - v).abs() <= 1e-5 * u.abs(),
            "{} at {}: {u} vs {v}",
            p.0,
            p.1
        );
    }
}

#[test]
fn one_rank_accepts_zero_stage_1_with_a_note_and_trains_as_stage_0() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let (a, b) = (cwd.join("a"), cwd.join("b"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = run_args(&data, out, &["--dist_env=none", "--max_iters=3"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = train_alone(cwd, &args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    run(&a, &[]);
    let err = run(&b, &["--zero_stage=1"]);
    assert!(err.contains("zero_stage = 1 with a single rank"), "{err}");
    assert!(err.contains("(moments of all"), "{err}");
    assert_eq!(loss_bits(&a), loss_bits(&b));

    let o = train_alone(
        cwd,
        &run_args(&data, &a, &["--dist_env=none", "--zero_stage=2"]),
    );
    let err = common::expect_clean_failure(&o);
    common::assert_contains_all(&err, &["zero_stage", "expected 0 (off) or 1"]);
}

#[test]
fn adamw_memory_per_rank_for_gpt2_124m_on_8_ranks() {
    let cfg = nanogpt::model::GptConfig::new(12, 12, 768, 1024, 50304, false, 0.0).unwrap();
    let total = nanogpt::model::ParamLayout::new(&cfg).total;
    let shards = nanogpt::dist::shard_ranges(total, 8);
    let sizes: Vec<usize> = shards.iter().map(|r| r.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), total);
    let largest = *sizes.iter().max().unwrap();
    assert!(largest - sizes.iter().min().unwrap() <= 16);
    let unsharded = nanogpt::optim::adamw_memory_line(total, 8, false);
    let sharded = nanogpt::optim::adamw_memory_line(total, 8, true);
    eprintln!("gpt2 124M ({total} parameters), 8 ranks:\n  zero_stage=0: {unsharded}\n  zero_stage=1: {sharded}");
    assert_eq!(largest, total.div_ceil(8 * 16) * 16);
    assert!(sharded.contains(&format!(
        "{:.1} MiB per rank",
        (8 * largest) as f64 / 1048576.0
    )));
    assert!(unsharded.contains(&format!(
        "{:.1} MiB per rank",
        (8 * total) as f64 / 1048576.0
    )));
}

// ------------------------------------------------------------------ GPU
//
// Without a GPU these print "skipped: no GPU (why)" and pass; NANOGPT_REQUIRE_GPU=1 makes
// that a failure.

mod gpu {
    use crate::common::gpu::{self, no_gpu, on_two_gpus, one_rank_nccl, small_cfg, two_gpus};
    use crate::common::model::{first_diff, patterned_batch};
    use crate::common::{nanogpt, prepare_data, stderr, tiny_train_args};
    use nanogpt::dist::{shard_ranges, ProcessGroup};
    use nanogpt::engine::cuda::{CudaEngine, Precision};
    use nanogpt::engine::{Batch, Engine, OptimizerState};
    use nanogpt::optim::{adamw, AdamWConfig};

    const B: usize = 2;
    const T: usize = 16;

    fn engine(precision: Precision) -> CudaEngine {
        gpu::engine(&small_cfg(), 0, precision)
    }

    fn loss(e: &mut CudaEngine, seed: usize) -> f32 {
        let (inputs, targets) = patterned_batch(B * T, seed);
        e.loss(Batch {
            inputs: &inputs,
            targets: &targets,
            b: B,
            t: T,
        })
        .unwrap()
    }

    /// Three engines, each holding one shard's moments, step their shards with the global
    /// norm; their parameters and moments must equal one engine's whole step bit for bit
    /// (the same adamw_update kernel on offset pointers), and after gathering the
    /// parameters every engine computes the same loss as the whole-step engine.
    #[test]
    fn cuda_sharded_steps_equal_the_whole_step() {
        let test = "cuda_sharded_steps_equal_the_whole_step";
        if no_gpu(test) {
            return;
        }
        for precision in [Precision::F32, Precision::Bf16] {
            let hp = AdamWConfig {
                grad_clip: 0.05,
                ..Default::default()
            };
            let mut whole = engine(precision);
            let total = whole.layout().total;
            let ranges = shard_ranges(total, 3);
            let mut shards: Vec<CudaEngine> = (0..3).map(|_| engine(precision)).collect();
            for (s, r) in shards.iter_mut().zip(&ranges) {
                s.set_optimizer_shard(r.clone());
                assert_eq!(s.optimizer_state().m.len(), r.len());
            }
            for it in 0..3 {
                // The same gradients everywhere: set on the host (uploaded before use).
                let grads: Vec<f32> = (0..total)
                    .map(|i| ((i * 31 + it * 17) % 101) as f32 * 1e-3 - 0.05)
                    .collect();
                whole.grads_mut().copy_from_slice(&grads);
                let norm = whole.step(&hp, 1e-2);
                assert!(norm > hp.grad_clip, "{precision:?}: the test must clip");
                let mut sumsq = 0f64;
                for (s, r) in shards.iter_mut().zip(&ranges) {
                    s.grads_mut().copy_from_slice(&grads);
                    sumsq += s.grad_sumsq(r.clone());
                }
                let shard_norm = adamw::norm_from_sumsq(sumsq);
                assert!(
                    (shard_norm - norm).abs() <= 1e-6 * norm,
                    "{precision:?} iter {it}: norm from shard sums {shard_norm} vs {norm}"
                );
                for s in shards.iter_mut() {
                    s.step_shard(&hp, 1e-2, norm);
                }
                let (wp, wo) = (whole.params(), whole.optimizer_state());
                let mut gathered = vec![0f32; total];
                for (k, (s, r)) in shards.iter().zip(&ranges).enumerate() {
                    let (p, o) = (s.params(), s.optimizer_state());
                    assert_eq!(o.step, wo.step);
                    let what = format!("{precision:?} iter {it} shard {k} {r:?}");
                    assert_eq!(
                        first_diff(&p[r.clone()], &wp[r.clone()]),
                        None,
                        "{what}: params"
                    );
                    assert_eq!(first_diff(&o.m, &wo.m[r.clone()]), None, "{what}: m");
                    assert_eq!(first_diff(&o.v, &wo.v[r.clone()]), None, "{what}: v");
                    gathered[r.clone()].copy_from_slice(&p[r.clone()]);
                }
                for s in shards.iter_mut() {
                    s.set_params(&gathered);
                }
            }
            let want = loss(&mut whole, 1);
            for (k, s) in shards.iter_mut().enumerate() {
                let got = loss(s, 1);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{precision:?} shard engine {k}: loss {got} vs {want}"
                );
            }
            // Undoing the sharding keeps this shard's moments and zeroes the rest.
            let s = &mut shards[1];
            let part = s.optimizer_state();
            s.set_optimizer_shard(0..total);
            let full = s.optimizer_state();
            assert_eq!(full.m[ranges[1].clone()], part.m[..]);
            assert!(full.m[ranges[0].clone()].iter().all(|&x| x == 0.0));
        }
    }

    /// The device bytes the engine's memory report gives its AdamW moments.
    fn moment_bytes(e: &CudaEngine) -> u64 {
        let report = e
            .memory_report()
            .expect("the CUDA engine reports its memory");
        report
            .items
            .iter()
            .filter(|(what, _)| what.starts_with("AdamW moments"))
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// A ZeRO-1 rank only ever holds its shard's moments on the GPU: not at construction,
    /// not when a checkpoint's whole state is set before the shard (as a resumed run
    /// does), and after the first step exactly 8 bytes per parameter of the shard. The
    /// state set on the host reaches the device intact.
    #[test]
    fn a_sharded_engine_allocates_only_its_shards_moments() {
        let test = "a_sharded_engine_allocates_only_its_shards_moments";
        if no_gpu(test) {
            return;
        }
        let hp = AdamWConfig::default();
        let mut e = engine(Precision::Bf16);
        let total = e.layout().total;
        assert_eq!(moment_bytes(&e), 0, "moments allocated at construction");
        let ranges = shard_ranges(total, 4);
        let r = ranges[2].clone();
        let m: Vec<f32> = (0..total).map(|i| (i % 7) as f32 * 1e-3).collect();
        let v: Vec<f32> = (0..total).map(|i| (i % 5) as f32 * 1e-6).collect();
        e.set_optimizer_state(OptimizerState {
            m: m.clone(),
            v: v.clone(),
            step: 3,
        });
        assert_eq!(
            moment_bytes(&e),
            0,
            "a whole state set before the shard went to the GPU"
        );
        e.set_optimizer_shard(r.clone());
        loss(&mut e, 0);
        assert_eq!(moment_bytes(&e), 8 * r.len() as u64, "after a pass");
        e.step_shard(&hp, 0.0, 1.0);
        assert_eq!(moment_bytes(&e), 8 * r.len() as u64, "after a step");
        // With zero gradients the moments only decay, m by beta1 and v by beta2, from
        // the values set (the kernel's m + (g - m)(1 - beta1) may round differently).
        let st = e.optimizer_state();
        assert_eq!(st.step, 4);
        for (k, i) in r.clone().enumerate() {
            let want_m = hp.beta1 * m[i];
            assert!(
                (st.m[k] - want_m).abs() <= 1e-6 * want_m,
                "m[{i}] {} vs {want_m}",
                st.m[k]
            );
            assert_eq!(st.v[k], hp.beta2 * v[i], "v[{i}]");
        }
    }

    /// Where ZeRO-1 matters: a model whose whole AdamW moments do not fit on one GPU
    /// beside its parameters and gradients trains on two with its moments sharded, and
    /// resumes so (the checkpoint's whole state is narrowed to each rank's shard on the
    /// host). One rank fails before training, naming the moments and `zero_stage=1`.
    ///
    /// Needs GPUs of 48 MiB, which only the emulated ones can be (GPU_EMULATE_MEMORY_MIB):
    /// 3.17M parameters take 24.2 MiB with their gradients, their moments 24.2 MiB more
    /// (48.4: too many), half of those 12.1 MiB, and a 4 x 16 micro-batch's activations
    /// 5.1 MiB.
    #[test]
    fn zero_stage_1_trains_a_model_whose_whole_moments_do_not_fit_one_gpu() {
        let test = "zero_stage_1_trains_a_model_whose_whole_moments_do_not_fit_one_gpu";
        if !two_gpus(test) {
            return;
        }
        if !engine(Precision::F32).device_name().contains("emulation") {
            eprintln!("{test}: skipped: needs GPUs of 48 MiB, which only the emulated GPUs can be");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let cwd = root.path();
        let data = prepare_data(&cwd.join("data"));
        let out = cwd.join("out");
        let args = |extra: &[&str]| -> Vec<String> {
            let mut all = vec![
                "--device=cuda",
                "--n_layer=4",
                "--n_head=4",
                "--n_embd=256",
                "--gradient_accumulation_steps=2",
                "--eval_interval=2",
                "--eval_iters=1",
            ];
            all.extend_from_slice(extra);
            tiny_train_args(&data, &out, &all)
        };
        let small_gpus = |args: &[String]| {
            nanogpt(cwd)
                .env("GPU_EMULATE_MEMORY_MIB", "48")
                .env_remove("RANK")
                .env_remove("WORLD_SIZE")
                .args(args)
                .output()
                .unwrap()
        };
        let mut one = vec!["train".to_string()];
        one.extend(args(&["--max_iters=2"]));
        let o = small_gpus(&one);
        let err = stderr(&o);
        assert!(!o.status.success(), "one 48 MiB GPU should not fit: {err}");
        assert!(
            err.contains(
                "out of GPU memory: the AdamW moments of all 3.2M parameters need 24.2 MiB"
            ),
            "{err}"
        );
        assert!(
            err.contains("zero_stage=1 shards them over the ranks"),
            "{err}"
        );
        for (max_iters, resume) in [
            ("--max_iters=2", ""),
            ("--max_iters=4", "--init_from=resume"),
        ] {
            let mut two = vec![
                "launch".to_string(),
                "--nproc_per_node=2".into(),
                format!("--master_port={}", nanogpt::dist::test_port()),
                "--".into(),
                "train".into(),
            ];
            let mut extra = vec![max_iters, "--zero_stage=1", "--backend=nccl"];
            extra.extend([resume].iter().filter(|r| !r.is_empty()));
            two.extend(args(&extra));
            let o = small_gpus(&two);
            let err = stderr(&o);
            assert!(o.status.success(), "{max_iters} {resume}: {err}");
            assert!(err.contains("AdamW state: 12.1 MiB per rank"), "{err}");
            assert!(
                err.contains(&format!("saved checkpoint at iter {}", &max_iters[12..])),
                "{err}"
            );
        }
    }

    /// A 1-rank NCCL group: the grouped ncclReduce / ncclBroadcast calls run and leave the
    /// buffers as they were; the engine's bf16 copy follows parameters written on the GPU.
    #[test]
    fn one_rank_nccl_reduce_scatter_and_all_gather_on_the_device() {
        let test = "one_rank_nccl_reduce_scatter_and_all_gather";
        if no_gpu(test) {
            return;
        }
        let mut eng = engine(Precision::Bf16);
        let (inputs, targets) = patterned_batch(B * T, 0);
        eng.zero_grad();
        eng.forward_backward(
            Batch {
                inputs: &inputs,
                targets: &targets,
                b: B,
                t: T,
            },
            1.0,
        )
        .unwrap();
        let before = eng.grads();
        let g = eng.device_grads().unwrap();
        let mut pg = one_rank_nccl(test);
        let ranges = shard_ranges(g.len, 1);
        pg.reduce_scatter_sum_device(g.ptr, g.len, &ranges, g.stream)
            .expect("the NCCL group reduce-scatters device memory")
            .unwrap();
        assert_eq!(
            first_diff(&eng.grads(), &before),
            None,
            "1-rank reduce-scatter"
        );
        let loss0 = loss(&mut eng, 2);
        let p = eng.device_params().unwrap();
        pg.all_gather_device(p.ptr, p.len, &ranges, p.stream)
            .expect("the NCCL group all-gathers device memory")
            .unwrap();
        eng.device_params_written();
        assert_eq!(
            loss(&mut eng, 2).to_bits(),
            loss0.to_bits(),
            "1-rank all-gather"
        );
        let err = pg
            .all_gather_device(p.ptr, p.len, &shard_ranges(p.len, 2), p.stream)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 ranges given"), "{err}");
        pg.finish().unwrap();
    }

    /// 2 GPUs, 2 ranks as threads: uneven shards are reduced onto their owners and
    /// gathered back exactly (integer values sum exactly in any order).
    #[test]
    fn two_ranks_reduce_scatter_and_all_gather_device_buffers_exactly() {
        let test = "two_ranks_reduce_scatter_and_all_gather";
        if !two_gpus(test) {
            return;
        }
        let n = (1 << 20) + 21;
        let outs = on_two_gpus(test, move |r, ctx, mut pg| {
            let ranges = shard_ranges(n, 2);
            let input: Vec<f32> = (0..n).map(|i| ((i * (r + 3)) % 4099) as f32).collect();
            let buf = ctx.upload(&input).unwrap();
            let stream = ctx.stream().unwrap();
            pg.reduce_scatter_sum_device(buf.ptr, n, &ranges, stream.s as u64)
                .unwrap()
                .unwrap();
            let mut summed = vec![0f32; n];
            buf.copy_to_host(&mut summed).unwrap();
            let mine = summed[ranges[r].clone()].to_vec();
            // Each rank writes a marker into its own range, then all gather.
            let mut mark = summed.clone();
            mark[ranges[r].clone()].iter_mut().for_each(|x| *x += 0.5);
            buf.copy_from_host(&mark).unwrap();
            pg.all_gather_device(buf.ptr, n, &ranges, stream.s as u64)
                .unwrap()
                .unwrap();
            let mut gathered = vec![0f32; n];
            buf.copy_to_host(&mut gathered).unwrap();
            pg.finish().unwrap();
            (mine, gathered, ranges)
        });
        let want = |i: usize| ((i * 3) % 4099 + (i * 4) % 4099) as f32;
        for (r, (mine, gathered, ranges)) in outs.iter().enumerate() {
            for (k, &x) in mine.iter().enumerate() {
                let i = ranges[r].start + k;
                assert_eq!(x, want(i), "rank {r}: reduce-scatter element {i}");
            }
            for (i, &x) in gathered.iter().enumerate() {
                assert_eq!(x, want(i) + 0.5, "rank {r}: all-gather element {i}");
            }
        }
    }
}
