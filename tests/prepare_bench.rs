//! Tokenizer throughput (ignored by default; `tools/bench_bpe.py` runs it beside Python
//! tiktoken on the same corpus): `BPE_BENCH_CORPUS=path cargo test --release --test
//! prepare_bench -- --ignored --nocapture` prints one JSON line.

use std::time::Instant;

use nanogpt::tokenizer::Gpt2Bpe;

#[test]
#[ignore = "measurement; run by tools/bench_bpe.py"]
fn tokenizer_throughput() {
    let path = std::env::var("BPE_BENCH_CORPUS")
        .unwrap_or_else(|_| "/work/shared/data/tinyshakespeare.txt".to_string());
    let text = std::fs::read_to_string(&path).unwrap();
    let repeats: usize = std::env::var("BPE_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // Documents: blank-line separated paragraphs, as a batch encoder sees them.
    let docs: Vec<&str> = text.split("\n\n").collect();
    let bpe = Gpt2Bpe::new();
    let _ = bpe.encode("warm up the vocabulary");
    let mut out = Vec::new();
    let mut best: f64 = f64::MAX;
    let mut tokens = 0;
    for _ in 0..repeats {
        // A fresh thread each round, so the piece cache starts empty every time.
        let (t, n) = std::thread::scope(|s| {
            s.spawn(|| {
                let t0 = Instant::now();
                let mut n = 0;
                for d in &docs {
                    out.clear();
                    bpe.encode_into(d, &mut out);
                    n += out.len();
                }
                (t0.elapsed().as_secs_f64(), n)
            })
            .join()
            .unwrap()
        });
        best = best.min(t);
        tokens = n;
    }
    let core = tiktoken_rs::r50k_base_singleton();
    let t0 = Instant::now();
    let mut n_rs = 0;
    for d in &docs {
        n_rs += core.encode_ordinary(d).len();
    }
    let t_rs = t0.elapsed().as_secs_f64();
    assert_eq!(n_rs, tokens);
    println!(
        "{{\"impl\": \"nanogpt\", \"bytes\": {}, \"docs\": {}, \"tokens\": {tokens}, \"seconds\": {best:.4}, \"tokens_per_s\": {:.0}, \"tiktoken_rs_tokens_per_s\": {:.0}}}",
        text.len(),
        docs.len(),
        tokens as f64 / best,
        n_rs as f64 / t_rs
    );
}
