//! Throughput of the TCP ring all-reduce over loopback for a GPT-2 124M fp32 gradient
//! (124,475,904 floats, 498 MB), 2 and 3 ranks as threads of this process. Ignored by
//! default (it moves gigabytes); run with
//! `cargo test --release --test dist_allreduce_bench -- --ignored --nocapture`.

mod common;

use common::dist::on_ring;
use nanogpt::dist::ProcessGroup;
use std::time::{Duration, Instant};

/// Parameters of GPT-2 124M with the padded vocabulary (nanoGPT's count).
const N: usize = 124_475_904;

fn ring(world: usize, reps: usize) -> Vec<f64> {
    on_ring(world, Duration::from_secs(60), move |_, mut pg| {
        let mut g = vec![1.0f32; N];
        pg.all_reduce_sum(&mut g).unwrap(); // warm-up: page faults, socket buffers
        let mut times = Vec::new();
        for _ in 0..reps {
            pg.barrier().unwrap();
            let t0 = Instant::now();
            pg.all_reduce_sum(&mut g).unwrap();
            times.push(t0.elapsed().as_secs_f64());
        }
        assert!(g[N / 2].is_finite());
        times
    })
    .swap_remove(0)
}

#[test]
#[ignore]
fn ring_all_reduce_124m_fp32_over_loopback() {
    let bytes = (N * 4) as f64;
    for world in [2usize, 3] {
        let mut t = ring(world, 3);
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = t[t.len() / 2];
        let algbw = bytes / med / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        println!(
            "world {world}: median {:.3} s per all-reduce of {:.0} MB; algbw {algbw:.2} GB/s, busbw {busbw:.2} GB/s",
            med,
            bytes / 1e6
        );
    }
}
