//! The NCCL process group and the choice of process group.
//!
//! Everywhere: a missing or broken libnccl (fake library directories, as in
//! tests/doctor_discovery.rs) is an error naming what to install and `backend=gloo`; two
//! CPU ranks with `backend=nccl` train over the TCP ring and rank 0 says so once.
//!
//! With a GPU (else "skipped: no GPU"; NANOGPT_REQUIRE_GPU=1 makes that a failure): a
//! 1-rank NCCL group sums a device buffer and a CUDA engine's gradients in place (the sum
//! over one rank is the input, bit for bit), including gradients edited on the host first.
//! With 2 or more GPUs: 2 ranks as threads sum device buffers exactly, and 2 ranks as
//! processes (`nanogpt launch`) train with `backend=nccl` along the same loss trajectory as
//! with `backend=gloo` (host all-reduce) on the same GPUs.

mod common;

use common::dist::{metrics, run_ranks};
use common::gpu::{no_gpu, on_two_gpus, one_rank_nccl, small_cfg, two_gpus};
use common::model::{first_diff, patterned_batch};
use common::{nanogpt, prepare_data, stderr, tiny_train_args};
use nanogpt::cuda::discover::{SearchEnv, SearchPlan};
use nanogpt::dist::nccl;
use nanogpt::dist::ProcessGroup;
use nanogpt::engine::cuda::{stack, CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine};
use std::path::Path;
use std::process::Output;

// ------------------------------------------------------------------ no GPU needed

/// A search that sees only `root` (no system directories, no loader fallback).
fn plan(root: &Path) -> SearchPlan {
    SearchPlan::new(&SearchEnv {
        ld_library_path: Some(root.join("ld").display().to_string()),
        default_cuda: root.join("usr-local-cuda"),
        system_dirs: vec![root.join("system-lib")],
        loader_fallback: false,
        ..SearchEnv::default()
    })
}

fn assert_says_what_to_do(msg: &str) {
    for needle in [
        "backend=nccl",
        "libnccl.so.2",
        "pip install nvidia-nccl-cu13",
        "LD_LIBRARY_PATH",
        "backend=gloo",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
}

#[test]
fn a_missing_or_broken_nccl_says_what_to_install_and_that_gloo_works_without_it() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("ld")).unwrap();
    std::fs::create_dir_all(root.path().join("system-lib")).unwrap();
    let err = nccl::load_nccl(&plan(root.path()))
        .err()
        .expect("no libnccl anywhere")
        .to_string();
    assert_says_what_to_do(&err);
    assert!(err.contains("was not found"), "{err}");

    // A file with the right name that is not a library.
    std::fs::write(root.path().join("ld/libnccl.so.2"), b"not a library").unwrap();
    let err = nccl::load_nccl(&plan(root.path()))
        .err()
        .expect("a broken libnccl is refused")
        .to_string();
    assert_says_what_to_do(&err);
    assert!(
        err.contains("could not be loaded") && err.contains("libnccl.so.2"),
        "{err}"
    );
}

#[test]
fn selection_follows_backend_engine_and_world_size() {
    use nccl::Backend::*;
    let cases = [
        ("nccl", true, 1, Single),
        ("nccl", false, 1, Single),
        ("gloo", true, 1, Single),
        ("nccl", true, 2, Nccl),
        ("nccl", false, 2, Tcp),
        ("gloo", true, 2, Tcp),
        ("gloo", false, 4, Tcp),
        ("tcp", true, 3, Tcp),
    ];
    for (backend, gpu, world, want) in cases {
        let s = nccl::select(backend, gpu, world).unwrap();
        assert_eq!(s.backend, want, "backend={backend} gpu={gpu} world={world}");
        assert_eq!(s.note.is_some(), backend == "nccl" && !gpu && world > 1);
    }
}

/// Two CPU ranks of `nanogpt train` over loopback (torchrun's variables).
fn two_cpu_ranks(cwd: &Path, out: &str, backend: &str) -> Vec<Output> {
    let data = prepare_data(&cwd.join("data"));
    let args = tiny_train_args(
        &data,
        &cwd.join(out),
        &[
            &format!("--backend={backend}"),
            "--gradient_accumulation_steps=2",
            "--max_iters=2",
            "--eval_interval=2",
            "--dist_timeout=20",
        ],
    );
    run_ranks(cwd, 2, |_| args.clone())
}

#[test]
fn nccl_with_the_cpu_engine_uses_the_tcp_ring_and_says_so_once() {
    let root = tempfile::tempdir().unwrap();
    let outs = two_cpu_ranks(root.path(), "out", "nccl");
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", stderr(o));
    }
    let (e0, e1) = (stderr(&outs[0]), stderr(&outs[1]));
    assert_eq!(e0.matches("backend=nccl needs GPUs").count(), 1, "{e0}");
    assert!(
        !e1.contains("backend=nccl needs GPUs"),
        "only rank 0 notes: {e1}"
    );
    assert!(
        e0.contains("data parallel over 2 ranks (tcp ring, 2 ranks)"),
        "{e0}"
    );
}

// ------------------------------------------------------------------ GPU

/// A tiny CUDA engine on `device` with gradients from one training batch.
fn engine_with_grads(device: usize) -> CudaEngine {
    let mut eng = common::gpu::engine(&small_cfg(), device, Precision::F32);
    let (b, t) = (2, 16);
    let (inputs, targets) = patterned_batch(b * t, 0);
    eng.zero_grad();
    eng.forward_backward(
        Batch {
            inputs: &inputs,
            targets: &targets,
            b,
            t,
        },
        0.5,
    )
    .unwrap();
    eng
}

#[test]
fn one_rank_nccl_group_sums_device_buffers_and_engine_gradients_in_place() {
    let test = "one_rank_nccl_group";
    if no_gpu(test) {
        return;
    }
    // The engine's context is current after device_grads, as in the trainer.
    let mut eng = engine_with_grads(0);
    let before = eng.grads();
    assert!(
        before.iter().any(|&g| g != 0.0),
        "the batch produced gradients"
    );
    assert!(eng.device_grads().is_some());
    let mut pg = one_rank_nccl(test);
    assert_eq!((pg.rank(), pg.world_size(), pg.device()), (0, 1, 0));
    let d = pg.describe();
    assert!(d.starts_with("nccl 2.") && d.contains("cuda:0"), "{d}");

    // Gradients on the device: the sum over one rank is the input, bit for bit.
    let g = eng.device_grads().unwrap();
    assert_eq!(g.len, before.len());
    pg.all_reduce_sum_device(g.ptr, g.len, g.stream)
        .expect("the NCCL group reduces device memory")
        .unwrap();
    assert_eq!(
        first_diff(&eng.grads(), &before),
        None,
        "1-rank NCCL sum changed the gradients"
    );

    // Host edits through grads_mut reach the device before the reduction.
    eng.grads_mut()[5] = 123.25;
    let g = eng.device_grads().unwrap();
    pg.all_reduce_sum_device(g.ptr, g.len, g.stream)
        .unwrap()
        .unwrap();
    let after = eng.grads();
    assert_eq!(after[5], 123.25, "the host edit was lost");
    assert_eq!(after[6].to_bits(), before[6].to_bits());

    // A plain device buffer over several MiB, with an odd length.
    let ctx = stack::stack().unwrap().driver.context(0).unwrap();
    let n = (3 << 20) + 5;
    let input: Vec<f32> = (0..n).map(|i| (i % 997) as f32 * 0.25 - 50.0).collect();
    let buf = ctx.upload(&input).unwrap();
    let stream = ctx.stream().unwrap();
    pg.all_reduce_sum_device(buf.ptr, n, stream.s as u64)
        .unwrap()
        .unwrap();
    let mut out = vec![0f32; n];
    buf.copy_to_host(&mut out).unwrap();
    let differs = out.iter().zip(&input).position(|(a, b)| a != b);
    assert_eq!(differs, None, "1-rank NCCL sum of a device buffer");

    // Host collectives still work, and finish tears the communicator down.
    let mut host = [1.5f32, -2.0];
    pg.all_reduce_sum(&mut host).unwrap();
    assert_eq!(host, [1.5, -2.0]);
    pg.finish().unwrap();
    let err = pg
        .all_reduce_sum_device(buf.ptr, n, stream.s as u64)
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("after finish"), "{err}");
}

#[test]
fn two_ranks_as_threads_sum_device_buffers_exactly() {
    let test = "two_ranks_as_threads";
    if !two_gpus(test) {
        return;
    }
    let n = (1 << 20) + 3;
    let outs = on_two_gpus(test, move |r, ctx, mut pg| {
        assert_eq!(pg.device(), r);
        // Integers below 2^24 sum exactly in f32 whatever NCCL's order.
        let input: Vec<f32> = (0..n).map(|i| ((i * (r + 3)) % 4099) as f32).collect();
        let buf = ctx.upload(&input).unwrap();
        let stream = ctx.stream().unwrap();
        for _ in 0..3 {
            buf.copy_from_host(&input).unwrap();
            pg.all_reduce_sum_device(buf.ptr, n, stream.s as u64)
                .unwrap()
                .unwrap();
        }
        let mut out = vec![0f32; n];
        buf.copy_to_host(&mut out).unwrap();
        let mut host = [r as f32 + 1.0];
        pg.all_reduce_sum(&mut host).unwrap();
        pg.finish().unwrap();
        (out, host[0])
    });
    for (r, (out, host)) in outs.iter().enumerate() {
        assert_eq!(*host, 3.0, "rank {r}: host sum");
        for (i, &x) in out.iter().enumerate() {
            let want = ((i * 3) % 4099 + (i * 4) % 4099) as f32;
            assert_eq!(x, want, "rank {r}: element {i} of the NCCL sum");
        }
    }
}

/// The training losses and validation losses of `out_dir`'s metrics.jsonl.
fn train_and_val_losses(out_dir: &Path) -> Vec<(String, u64, f64)> {
    let mut t = metrics(out_dir);
    t.retain(|r| r.0 != "train_loss");
    t
}

#[test]
fn two_gpu_processes_train_the_same_with_nccl_as_with_gloo() {
    let test = "two_gpu_processes";
    if !two_gpus(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    // Two micro-steps per rank (the first writes the gradients, the second adds and is
    // reduced during its backward pass), then one (written and reduced during the same
    // backward pass: the device buffer is handed to NCCL before it is written).
    let run = |backend: &str, accum: usize| {
        let out = cwd.join(format!("{backend}_{accum}"));
        let mut args = vec![
            "launch".to_string(),
            "--nproc_per_node=2".into(),
            format!("--master_port={}", nanogpt::dist::test_port()),
            "--".into(),
            "train".into(),
        ];
        args.extend(tiny_train_args(
            &data,
            &out,
            &[
                "--device=cuda",
                &format!("--backend={backend}"),
                &format!("--gradient_accumulation_steps={accum}"),
                "--max_iters=6",
                "--eval_interval=3",
                "--log_interval=1",
                "--dist_timeout=60",
            ],
        ));
        let o = nanogpt(cwd)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .args(&args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "{backend}: {err}");
        (train_and_val_losses(&out), err)
    };
    for accum in [4, 2] {
        let (with_nccl, err) = run("nccl", accum);
        assert!(err.contains("(nccl 2."), "the NCCL group was used: {err}");
        let (with_gloo, err) = run("gloo", accum);
        assert!(err.contains("(tcp ring, 2 ranks)"), "{err}");
        assert_eq!(with_nccl.len(), with_gloo.len());
        for (a, b) in with_nccl.iter().zip(&with_gloo) {
            assert_eq!((&a.0, a.1), (&b.0, b.1));
            // Same gradients summed in a different order: equal up to fp32 rounding.
            assert!(
                (a.2 - b.2).abs() <= 1e-4 * b.2.abs().max(1.0),
                "accumulation {accum}: {} at iter {}: nccl {} vs gloo {}",
                a.0,
                a.1,
                a.2,
                b.2
            );
        }
    }
}
