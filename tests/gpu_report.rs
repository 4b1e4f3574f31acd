//! scripts/gpu_report.py, which turns a `scripts/gpu_check.sh OUTDIR` run into Markdown for
//! BENCHMARKS.md: it must read what `nanogpt bench` really prints (two real CPU benchmarks
//! stand in for the GPU's), take each run's ratio to the default, the PyTorch ratio, the
//! failed steps and the ceilings `nanogpt doctor` measured, and lead with a headline.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// `nanogpt bench` (tiny, CPU) with `extra`, its stdout and stderr written to `log` in `out`
/// as gpu_check.sh writes them; the tokens/s of its JSON line.
fn bench_log(out: &Path, log: &str, extra: &[&str]) -> f64 {
    let mut args = vec![
        "bench",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--batch_size=2",
        "--iters=2",
        "--warmup=0",
        "--vocab_size=64",
        "--device=cpu",
        "--threads=1",
        "--peak_flops=1e9",
    ];
    args.extend(extra);
    let o = run(out, &args);
    let text = expect_ok(&o);
    std::fs::write(out.join(log), format!("{}{}", stderr(&o), text)).unwrap();
    let json = text.lines().rev().find(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["tokens_per_s"].as_f64().unwrap()
}

fn report(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu_report.py");
    let o = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 runs scripts/gpu_report.py (install python3)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_report_reads_the_benchmarks_ratios_failures_and_ceilings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let base = bench_log(out, "bench_124m_bf16.log", &[]);
    let off = bench_log(out, "bench_124m_bf16_mlp_off.log", &["--batch_size=1"]);
    // The PyTorch reference's last line (bench/torch_reference.py's record).
    std::fs::write(
        out.join("torch_ref_124m_bf16.log"),
        format!(
            "torch bench: ...\n{}\n",
            serde_json::json!({"tokens_per_s": base / 1.25, "mfu": 0.375, "ms_per_iter": 1.0})
        ),
    )
    .unwrap();
    std::fs::write(
        out.join("doctor.json"),
        serde_json::json!({"checks": [
            {"name": "gemm", "gpu": 0, "status": "ok", "value": 781.25},
            {"name": "copy", "gpu": 0, "status": "ok", "value": 3912.6},
            {"name": "nccl 1-rank", "gpu": 0, "status": "ok", "value": 12.0},
        ]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        out.join("summary.txt"),
        "tests rc=0 20s log=x\nflash rc=1 3s log=y\nbench-small skipped: time budget spent\n",
    )
    .unwrap();
    // A profile's closing line (what `nanogpt bench --profile` prints last).
    std::fs::write(
        out.join("bench_profile_124m_bf16.log"),
        "Per-operation profile, ...\n\nBottleneck: fused attention, 1.500 ms (10.0% of the \
         step) above its floor. Next: larger tiles.\n",
    )
    .unwrap();
    let md = report(&[out.to_str().unwrap()]);
    assert!(md.starts_with("## Headline\n"), "{md}");
    assert_contains_all(
        &md,
        &[
            &format!("- GPT-2 124M, bf16, B=8, T=1024 (the default): {base:.0} tokens/s, MFU "),
            "- against PyTorch + torch.compile, B=8: 1.25x",
            "- against PyTorch + torch.compile, B=8 x 8 accumulated: no result",
            "- profile on uniform random tokens: Bottleneck: fused attention, 1.500 ms (10.0% of \
             the step) above its floor. Next: larger tiles.",
            "- profile on GPT-2 BPE of English prose (--data_dir): no bottleneck line",
            "bf16 GEMM 781 TFLOP/s, device copy 3913 GB/s",
            "- `flash rc=1 3s log=y`",
            "- `bench-small skipped: time budget spent`",
            &format!("| {:.0} |", base),
            "| 1.000x |",
            &format!("| {:.3}x |", off / base),
            // --peak_flops=1e9 gives an MFU; the table carries it.
            "% | 1.000x |",
            "| B=8 | ",
            "| 37.5% | 1.25x |",
            "`bench_124m.log`) | no result",
        ],
    );
    assert!(
        !md.contains("tests rc=0"),
        "a step that passed is not listed:\n{md}"
    );
    assert_eq!(
        report(&["--ceilings", out.to_str().unwrap()]).trim(),
        "--gemm_tflops=781.2 --copy_gbps=3913"
    );
    std::fs::remove_file(out.join("doctor.json")).unwrap();
    assert_eq!(report(&["--ceilings", out.to_str().unwrap()]).trim(), "");
}
