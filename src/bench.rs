//! `nanogpt bench`: training-step throughput (forward + backward + AdamW) on synthetic
//! tokens or a prepared dataset's first training batch, reported as the median over timed
//! iterations after warm-up, with model FLOP/s by nanoGPT's FLOPs-per-token formula
//! (6N + 12*L*H*Q*T); with `--profile`, one more step timed per operation and summarised
//! against a roofline ([`ProfileTable`]) and gathered by part of the step, naming the
//! bottleneck ([`breakdown`]); device memory in use and the engine's own accounting of it
//! ([`memory_summary`]).

pub mod breakdown;

use crate::engine::cuda::profile::{MemoryReport, StepProfile};
use crate::engine::{memory_size, Batch, Engine};
use crate::optim::AdamWConfig;
use crate::rng::Rng;
use serde::Serialize;
use std::time::Instant;

/// What to run: the engine is built by the caller; this drives it.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub batch_size: usize,
    pub block_size: usize,
    pub grad_accum: usize,
    pub iters: usize,
    pub warmup: usize,
    pub learning_rate: f32,
    pub adamw: AdamWConfig,
    pub seed: u64,
    /// Inputs and targets of the batch (`batch_size * block_size` each), e.g. read from a
    /// prepared dataset ([`crate::data::first_train_batch`]); `None`: uniform random tokens
    /// from `seed`.
    pub tokens: Option<(Vec<u32>, Vec<i32>)>,
}

/// Timings of one benchmark; `step_ms` holds every timed iteration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub tokens_per_iter: usize,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub flops_per_token: f64,
    pub step_ms: Vec<f64>,
    pub last_loss: f32,
    /// The `recompute` level the engine ran at.
    pub recompute: u8,
    /// The engine's activation buffers for this shape and level (`None`: unknown).
    pub activation_bytes: Option<u64>,
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Runs `warmup + iters` training steps on the benchmark's batch and times the last `iters`.
pub fn run(
    engine: &mut dyn Engine,
    spec: &BenchSpec,
) -> Result<BenchResult, crate::engine::EngineError> {
    let (b, t) = (spec.batch_size, spec.block_size);
    let (inputs, targets) = batch_tokens(engine, spec);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let scale = 1.0 / spec.grad_accum as f32;
    let mut times = Vec::with_capacity(spec.iters);
    let mut last_loss = 0.0;
    for i in 0..spec.warmup + spec.iters {
        let start = Instant::now();
        engine.zero_grad();
        for _ in 0..spec.grad_accum {
            last_loss = engine.forward_backward(batch, scale)?;
        }
        engine.step(&spec.adamw, spec.learning_rate);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i >= spec.warmup {
            times.push(ms);
        }
    }
    let tokens_per_iter = b * t * spec.grad_accum;
    let med = median(&times);
    let flops_per_token = engine.config().flops_per_token(t);
    let tokens_per_s = tokens_per_iter as f64 / (med / 1e3);
    Ok(BenchResult {
        median_ms: med,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        max_ms: times.iter().cloned().fold(0.0, f64::max),
        tokens_per_iter,
        tokens_per_s,
        gflops: flops_per_token * tokens_per_s / 1e9,
        flops_per_token,
        step_ms: times,
        last_loss,
        recompute: engine.recompute().level(),
        activation_bytes: engine.activation_bytes(b, t, engine.recompute()),
    })
}

/// The benchmark's inputs and next-token targets: `spec.tokens`, or uniform random tokens
/// from `spec.seed`.
fn batch_tokens(engine: &dyn Engine, spec: &BenchSpec) -> (Vec<u32>, Vec<i32>) {
    if let Some(tokens) = &spec.tokens {
        return tokens.clone();
    }
    let n = spec.batch_size * spec.block_size;
    let vocab = engine.config().vocab_size as u64;
    let mut rng = Rng::new(spec.seed);
    let tokens: Vec<u32> = (0..n + 1).map(|_| rng.below(vocab) as u32).collect();
    let targets = tokens[1..].iter().map(|&x| x as i32).collect();
    (tokens[..n].to_vec(), targets)
}

/// How often tokens repeat in `inputs`: distinct tokens and the most frequent one's share
/// (what the token-embedding gradient's time depends on), as a line for the report.
pub fn token_summary(inputs: &[u32]) -> String {
    let mut sorted = inputs.to_vec();
    sorted.sort_unstable();
    let (mut distinct, mut longest, mut run) = (0usize, 0usize, 0usize);
    for (i, tok) in sorted.iter().enumerate() {
        if i == 0 || sorted[i - 1] != *tok {
            distinct += 1;
            run = 0;
        }
        run += 1;
        longest = longest.max(run);
    }
    let share = 100.0 * longest as f64 / inputs.len().max(1) as f64;
    format!(
        "{} tokens, {distinct} distinct, the most frequent {longest} times ({share:.1}%)",
        inputs.len()
    )
}

/// One more training step of `spec` with every operation timed, or `None` when the engine
/// has no per-operation timers.
pub fn profile(
    engine: &mut dyn Engine,
    spec: &BenchSpec,
) -> Option<Result<StepProfile, crate::engine::EngineError>> {
    let (inputs, targets) = batch_tokens(engine, spec);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b: spec.batch_size,
        t: spec.block_size,
    };
    let scale = 1.0 / spec.grad_accum as f32;
    engine.profile_step(
        batch,
        scale,
        spec.grad_accum,
        &spec.adamw,
        spec.learning_rate,
    )
}

// ------------------------------------------------------------------------------ roofline

/// The ceilings of a roofline: matrix-product rate by operand type and copy bandwidth
/// (bytes read plus written per second, as `nanogpt doctor` measures it).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ceilings {
    pub bf16_tflops: Option<f64>,
    pub fp32_tflops: Option<f64>,
    pub copy_gbps: Option<f64>,
    /// Where the numbers come from, for the report.
    pub source: String,
}

/// Data-sheet figures of a known GPU: (model, dense bf16 TFLOP/s, fp32 TFLOP/s without
/// tensor cores, memory bandwidth GB/s).
pub fn gpu_spec(device_name: &str) -> Option<(&'static str, f64, f64, f64)> {
    // The engine's name wraps the GPU's in punctuation ("cuda:0 (NVIDIA H100 80GB HBM3, ...").
    let clean: String = device_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                ' '
            }
        })
        .collect();
    let peak = crate::cuda::peak::bf16_peak(&clean)?;
    let upper = clean.to_ascii_uppercase();
    let (fp32, gbps) = match peak.model {
        "H100 SXM" => (67.0, 3350.0),
        "H100 PCIe" => (51.0, 2000.0),
        "H200" => (67.0, 4800.0),
        "A100" if upper.contains("80GB") => (19.5, 2039.0),
        "A100" => (19.5, 1555.0),
        "L4" => (30.3, 300.0),
        "RTX 4090" => (82.6, 1008.0),
        _ => return None,
    };
    Some((peak.model, peak.bf16_tflops, fp32, gbps))
}

impl Ceilings {
    /// `gemm_tflops` (bf16 products, e.g. `nanogpt doctor`'s cuBLASLt figure) and
    /// `copy_gbps` as given; what is not given comes from the data sheet of the GPU named in
    /// `device_name` when it is known, else stays unknown. fp32 products always use the
    /// data sheet's fp32 rate.
    pub fn resolve(device_name: &str, gemm_tflops: Option<f64>, copy_gbps: Option<f64>) -> Self {
        let spec = gpu_spec(device_name);
        let mut from = Vec::new();
        if gemm_tflops.is_some() || copy_gbps.is_some() {
            from.push("given (--gemm_tflops / --copy_gbps)".to_string());
        }
        if let Some((model, ..)) = spec {
            if gemm_tflops.is_none() || copy_gbps.is_none() {
                from.push(format!("{model} data sheet"));
            }
        }
        Ceilings {
            bf16_tflops: gemm_tflops.or(spec.map(|s| s.1)),
            fp32_tflops: spec.map(|s| s.2),
            copy_gbps: copy_gbps.or(spec.map(|s| s.3)),
            source: if from.is_empty() {
                "unknown GPU: pass --gemm_tflops and --copy_gbps (from `nanogpt doctor`)".into()
            } else {
                from.join(", ")
            },
        }
    }

    /// Roofline floor of one operation in ms: a product is bound by its FLOPs at the rate
    /// of its operand type and by its bytes at the copy bandwidth (when known); a kernel
    /// by its bytes. The fused attention gets a product's floor at the GEMM rate of its
    /// arithmetic: optimistic (its softmax and tile bookkeeping run beside the tensor-core
    /// products), so its share of the gap to the floor is an upper bound of what better
    /// kernels could win. `None` when a needed ceiling or formula is missing.
    pub fn floor_ms(&self, op: &crate::engine::cuda::profile::OpTime) -> Option<f64> {
        let mem = match (op.bytes, self.copy_gbps) {
            (Some(b), Some(bw)) => Some(b / (bw * 1e9) * 1e3),
            _ => None,
        };
        match op.flops {
            Some(flops) => {
                let rate = match op.gemm_dtype {
                    Some("bf16") => self.bf16_tflops,
                    _ => self.fp32_tflops,
                }?;
                let compute = flops / (rate * 1e12) * 1e3;
                Some(mem.map_or(compute, |m| m.max(compute)))
            }
            None => mem,
        }
    }
}

/// `ms` as a fraction of a step's `wall_ms` (0 for a step that took no time).
pub fn share_of(ms: f64, wall_ms: f64) -> f64 {
    if wall_ms > 0.0 {
        ms / wall_ms
    } else {
        0.0
    }
}

/// One line of the per-operation table: every call with the same name summed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileRow {
    pub op: String,
    pub kind: &'static str,
    pub calls: usize,
    pub total_ms: f64,
    /// Fraction of the profiled step's wall time.
    pub share: f64,
    /// Achieved rate (matrix products and the fused attention).
    pub tflops: Option<f64>,
    /// Achieved bytes read plus written per second (kernels with a formula).
    pub gbps: Option<f64>,
    /// Roofline floor of all its calls.
    pub floor_ms: Option<f64>,
}

/// The per-operation summary of one profiled step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileTable {
    pub device: String,
    /// Slowest first.
    pub rows: Vec<ProfileRow>,
    pub calls: usize,
    /// Sum of every operation's time.
    pub sum_ms: f64,
    /// Host wall time of the profiled step.
    pub wall_ms: f64,
    /// Median of the un-instrumented timed steps, for comparison.
    pub timed_median_ms: Option<f64>,
    /// Sum of the floors of the operations that have one, and their measured time.
    pub floor_ms: f64,
    pub floor_covers_ms: f64,
    pub ceilings: Ceilings,
    /// How the products ran ([`StepProfile::products`]).
    pub products: Vec<String>,
    /// The rows by part of the step, and the bottleneck.
    pub breakdown: breakdown::Breakdown,
}

impl ProfileTable {
    pub fn new(p: &StepProfile, ceilings: Ceilings, timed_median_ms: Option<f64>) -> Self {
        let mut rows: Vec<ProfileRow> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        // Per row: flops and bytes summed over calls (None once one call lacks them).
        let mut work: Vec<(Option<f64>, Option<f64>)> = Vec::new();
        let (mut floor_ms, mut floor_covers_ms) = (0.0, 0.0);
        for op in &p.ops {
            let i = *index.entry(op.name.as_str()).or_insert_with(|| {
                rows.push(ProfileRow {
                    op: op.name.clone(),
                    kind: op.kind,
                    calls: 0,
                    total_ms: 0.0,
                    share: 0.0,
                    tflops: None,
                    gbps: None,
                    floor_ms: Some(0.0),
                });
                work.push((Some(0.0), Some(0.0)));
                rows.len() - 1
            });
            let r = &mut rows[i];
            r.calls += 1;
            r.total_ms += op.ms;
            let floor = ceilings.floor_ms(op);
            r.floor_ms = r.floor_ms.zip(floor).map(|(a, b)| a + b);
            if let Some(f) = floor {
                floor_ms += f;
                floor_covers_ms += op.ms;
            }
            let w = &mut work[i];
            w.0 = w.0.zip(op.flops).map(|(a, b)| a + b);
            w.1 = w.1.zip(op.bytes).map(|(a, b)| a + b);
        }
        let wall = p.wall_ms;
        for (r, (flops, bytes)) in rows.iter_mut().zip(work) {
            let secs = r.total_ms / 1e3;
            r.share = share_of(r.total_ms, wall);
            if secs > 0.0 {
                // Products and the fused attention: TFLOP/s; kernels (and the attention,
                // whose traffic matters too): GB/s.
                r.tflops = flops.map(|f| f / secs / 1e12);
                if r.kind != "gemm" {
                    r.gbps = bytes.map(|b| b / secs / 1e9);
                }
            }
        }
        rows.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        let breakdown = breakdown::Breakdown::new(&rows, wall);
        ProfileTable {
            device: p.device.clone(),
            calls: p.ops.len(),
            sum_ms: p.ops.iter().map(|o| o.ms).sum(),
            wall_ms: wall,
            timed_median_ms,
            floor_ms,
            floor_covers_ms,
            ceilings,
            rows,
            products: p.products.clone(),
            breakdown,
        }
    }

    /// The table as Markdown (for BENCHMARKS.md), followed by the summary lines.
    pub fn to_markdown(&self) -> String {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
        let mut s = String::new();
        s.push_str("| op | calls | total ms | share | TFLOP/s | GB/s | floor ms |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.1}% | {} | {} | {} |\n",
                r.op,
                r.calls,
                r.total_ms,
                100.0 * r.share,
                opt(r.tflops, 1),
                opt(r.gbps, 0),
                opt(r.floor_ms, 3),
            ));
        }
        let share = |ms: f64| share_of(100.0 * ms, self.wall_ms);
        s.push_str(&format!(
            "| **all operations** | {} | {:.3} | {:.1}% |  |  | {:.3} |\n",
            self.calls,
            self.sum_ms,
            share(self.sum_ms),
            self.floor_ms
        ));
        s.push('\n');
        let gap = self.wall_ms - self.sum_ms;
        s.push_str(&format!(
            "Sum of per-op times {:.3} ms vs the profiled step's wall time {:.3} ms: {:.3} ms \
             ({:.1}%) outside the timed operations (launch and synchronisation overhead, host \
             copies, the event recording itself).\n",
            self.sum_ms,
            self.wall_ms,
            gap,
            share(gap)
        ));
        if let Some(m) = self.timed_median_ms {
            s.push_str(&format!(
                "Un-instrumented step (median of the timed iterations): {m:.3} ms.\n"
            ));
        }
        let c = &self.ceilings;
        let show =
            |v: Option<f64>, unit: &str| v.map_or("unknown".to_string(), |v| format!("{v} {unit}"));
        s.push_str(&format!(
            "Roofline floor {:.3} ms for the operations with a formula ({:.3} ms of measured \
             time{}); ceilings: bf16 products {}, fp32 products {}, copy {} ({}).\n",
            self.floor_ms,
            self.floor_covers_ms,
            if self.floor_covers_ms > 0.0 {
                format!(
                    ": those operations run at {:.0}% of roofline speed",
                    100.0 * self.floor_ms / self.floor_covers_ms
                )
            } else {
                String::new()
            },
            show(c.bf16_tflops, "TFLOP/s"),
            show(c.fp32_tflops, "TFLOP/s"),
            show(c.copy_gbps, "GB/s"),
            c.source
        ));
        if !self.products.is_empty() {
            s.push_str("\nHow the bf16 products ran (epilogues fused into cuBLASLt or not):\n");
            for line in &self.products {
                s.push_str(&format!("- {line}\n"));
            }
        }
        s.push('\n');
        s.push_str(&self.breakdown.to_markdown());
        s
    }
}

// ------------------------------------------------------------------------------ memory

/// Device memory as the bench reports it: in use (`total - free`) now, and the part of it
/// that was not in use before the engine was created (`baseline_used`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemorySummary {
    pub in_use_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub before_engine_bytes: Option<u64>,
    /// in_use - before_engine.
    pub engine_bytes: Option<u64>,
    /// The engine's own accounting.
    pub accounted_bytes: u64,
    pub items: Vec<(String, u64)>,
}

/// Combines the engine's report with the usage measured before it was created.
pub fn memory_summary(report: &MemoryReport, baseline_used: Option<u64>) -> MemorySummary {
    let in_use = report
        .device_free
        .zip(report.device_total)
        .map(|(f, t)| t.saturating_sub(f));
    MemorySummary {
        in_use_bytes: in_use,
        total_bytes: report.device_total,
        before_engine_bytes: baseline_used,
        engine_bytes: in_use.zip(baseline_used).map(|(u, b)| u.saturating_sub(b)),
        accounted_bytes: report.accounted(),
        items: report.items.clone(),
    }
}

impl MemorySummary {
    /// Human-readable lines.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if let (Some(u), Some(t)) = (self.in_use_bytes, self.total_bytes) {
            s.push_str(&format!(
                "GPU memory in use after the step: {} of {}",
                memory_size(u),
                memory_size(t)
            ));
            if let (Some(b), Some(e)) = (self.before_engine_bytes, self.engine_bytes) {
                s.push_str(&format!(
                    "; {} before the engine was created, so {} for the engine",
                    memory_size(b),
                    memory_size(e)
                ));
            }
            s.push('\n');
        }
        let parts: Vec<String> = self
            .items
            .iter()
            .map(|(what, b)| format!("{what} {}", memory_size(*b)))
            .collect();
        s.push_str(&format!(
            "engine buffers: {} (total {})",
            parts.join(", "),
            memory_size(self.accounted_bytes)
        ));
        if let Some(e) = self.engine_bytes {
            let rest = e as i64 - self.accounted_bytes as i64;
            s.push_str(&format!(
                "; the other {} of the engine's share is cuBLAS/cuBLASLt workspaces, loaded \
                 kernels and allocation rounding",
                if rest >= 0 {
                    memory_size(rest as u64)
                } else {
                    format!("-{}", memory_size(rest.unsigned_abs()))
                }
            ));
        }
        s.push('\n');
        s
    }
}

/// Times `out = a @ b` for n x n matrices with the CPU engine's matrix product on `threads`
/// threads; returns (median ms, GFLOP/s) over `iters` runs after one warm-up.
pub fn sgemm(n: usize, threads: usize, iters: usize) -> (f64, f64) {
    use crate::engine::cpu::matmul::{matmul, Op};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build();
    let run = || {
        let mut rng = Rng::new(1);
        let a: Vec<f32> = (0..n * n).map(|_| rng.next_f32() - 0.5).collect();
        let b: Vec<f32> = (0..n * n).map(|_| rng.next_f32() - 0.5).collect();
        let mut out = vec![0f32; n * n];
        let mut times = Vec::with_capacity(iters);
        for i in 0..=iters {
            let start = Instant::now();
            matmul(&mut out, &a, &b, n, n, n, Op::NN, false, threads.max(1));
            if i > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(&times);
        (ms, 2.0 * (n as f64).powi(3) / (ms / 1e3) / 1e9)
    };
    match pool {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::profile::{ModelDims, OpTime, Phase};

    fn op(name: &str, ms: f64, flops: Option<f64>, bytes: Option<f64>) -> OpTime {
        OpTime {
            name: name.into(),
            kind: if flops.is_some() { "gemm" } else { "kernel" },
            phase: Phase::Forward,
            ms,
            flops,
            bytes,
            gemm_dtype: flops.map(|_| "bf16"),
        }
    }

    fn ceilings() -> Ceilings {
        Ceilings {
            bf16_tflops: Some(500.0),
            fp32_tflops: Some(50.0),
            copy_gbps: Some(2000.0),
            source: "test".into(),
        }
    }

    #[test]
    fn roofline_floor_is_the_slower_of_compute_and_traffic() {
        let c = ceilings();
        // 1e12 FLOPs at 500 TFLOP/s = 2 ms; 1e9 bytes at 2000 GB/s = 0.5 ms.
        let g = op("gemm", 3.0, Some(1e12), Some(1e9));
        assert!((c.floor_ms(&g).unwrap() - 2.0).abs() < 1e-12);
        // Traffic-bound product: 1e10 bytes = 5 ms.
        let g2 = op("gemm", 3.0, Some(1e12), Some(1e10));
        assert!((c.floor_ms(&g2).unwrap() - 5.0).abs() < 1e-12);
        // fp32 operands use the fp32 rate: 1e12 / 50e12 s = 20 ms.
        let g3 = OpTime {
            gemm_dtype: Some("fp32"),
            ..g.clone()
        };
        assert!((c.floor_ms(&g3).unwrap() - 20.0).abs() < 1e-12);
        // A kernel: bytes over bandwidth; none without a formula.
        let k = op("gelu_forward", 1.0, None, Some(4e9));
        assert!((c.floor_ms(&k).unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(c.floor_ms(&op("x", 1.0, None, None)), None);
        // Unknown ceilings leave the floor blank.
        let none = Ceilings::resolve("Some Unknown GPU", None, None);
        assert_eq!(none.floor_ms(&g), None);
        assert_eq!(none.floor_ms(&k), None);
        assert!(none.source.contains("--gemm_tflops"), "{}", none.source);
    }

    #[test]
    fn ceilings_come_from_arguments_then_the_data_sheet() {
        let c = Ceilings::resolve("cuda:0 (NVIDIA H100 80GB HBM3, sm_90, bf16)", None, None);
        assert_eq!(
            (c.bf16_tflops, c.fp32_tflops, c.copy_gbps),
            (Some(989.0), Some(67.0), Some(3350.0))
        );
        assert!(c.source.contains("H100 SXM"), "{}", c.source);
        let c = Ceilings::resolve(
            "cuda:0 (NVIDIA H200, sm_90, bf16)",
            Some(780.0),
            Some(4300.0),
        );
        assert_eq!((c.bf16_tflops, c.copy_gbps), (Some(780.0), Some(4300.0)));
        assert!(!c.source.contains("data sheet"), "{}", c.source);
        let c = Ceilings::resolve("NVIDIA A100-SXM4-40GB", None, Some(1400.0));
        assert_eq!((c.bf16_tflops, c.copy_gbps), (Some(312.0), Some(1400.0)));
        assert_eq!(gpu_spec("NVIDIA A100-SXM4-80GB").map(|s| s.3), Some(2039.0));
    }

    fn profile() -> StepProfile {
        StepProfile {
            device: "cuda:0 (test)".into(),
            dims: ModelDims {
                rows: 8,
                t: 4,
                c: 16,
                vocab: 32,
                n_head: 2,
            },
            ops: vec![
                op("layernorm_forward", 0.5, None, Some(1e9)),
                op("gemm fc fwd 8x64x16 bf16", 2.0, Some(1e12), Some(1e6)),
                op("layernorm_forward", 0.25, None, Some(1e9)),
                op("gemm fc fwd 8x64x16 bf16", 2.0, Some(1e12), Some(1e6)),
                op("kernel@0x1", 0.25, None, None),
            ],
            wall_ms: 10.0,
            products: vec!["GeluAux { bias: true } on a product: fused".into()],
        }
    }

    #[test]
    fn table_groups_calls_and_computes_rates() {
        let t = ProfileTable::new(&profile(), ceilings(), Some(6.0));
        assert_eq!(t.calls, 5);
        assert!((t.sum_ms - 5.0).abs() < 1e-12);
        let names: Vec<&str> = t.rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(
            names,
            [
                "gemm fc fwd 8x64x16 bf16",
                "layernorm_forward",
                "kernel@0x1"
            ],
            "slowest first"
        );
        let g = &t.rows[0];
        assert_eq!((g.calls, g.total_ms), (2, 4.0));
        assert!((g.share - 0.4).abs() < 1e-12);
        // 2e12 FLOPs in 4 ms = 500 TFLOP/s; floor 2 x 2 ms.
        assert!((g.tflops.unwrap() - 500.0).abs() < 1e-9);
        assert_eq!(g.gbps, None);
        assert!((g.floor_ms.unwrap() - 4.0).abs() < 1e-12);
        let l = &t.rows[1];
        // 2e9 bytes in 0.75 ms.
        assert!((l.gbps.unwrap() - 2e9 / 0.75e-3 / 1e9).abs() < 1e-6);
        assert_eq!(l.tflops, None);
        assert!((l.floor_ms.unwrap() - 1.0).abs() < 1e-12);
        let u = &t.rows[2];
        assert_eq!((u.gbps, u.floor_ms), (None, None));
        assert!((t.floor_ms - 5.0).abs() < 1e-12);
        assert!((t.floor_covers_ms - 4.75).abs() < 1e-12);
    }

    #[test]
    fn fused_attention_rows_get_a_rate_traffic_and_a_product_floor() {
        // 1e12 FLOPs in bf16 and 1e9 bytes over two calls of 1 ms.
        let attn = OpTime {
            kind: "attention",
            ..op("flash_attn_fwd (bf16 mma)", 1.0, Some(5e11), Some(5e8))
        };
        let p = StepProfile {
            ops: vec![attn.clone(), attn],
            ..profile()
        };
        let t = ProfileTable::new(&p, ceilings(), None);
        let a = t.rows.iter().find(|r| r.kind == "attention").unwrap();
        assert_eq!((a.op.as_str(), a.calls), ("flash_attn_fwd (bf16 mma)", 2));
        // 1e12 FLOPs in 2 ms = 500 TFLOP/s, 1e9 bytes in 2 ms = 500 GB/s.
        assert!((a.tflops.unwrap() - 500.0).abs() < 1e-9);
        assert!((a.gbps.unwrap() - 500.0).abs() < 1e-9);
        // Compute-bound at the bf16 GEMM rate: 2 x 5e11 / 500e12 s = 2 x 1 ms.
        assert!((a.floor_ms.unwrap() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn markdown_table_and_summary_lines() {
        let md = ProfileTable::new(&profile(), ceilings(), Some(6.0)).to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| op | calls | total ms | share | TFLOP/s | GB/s | floor ms |"
        );
        assert_eq!(lines[1], "|---|---:|---:|---:|---:|---:|---:|");
        assert_eq!(
            lines[2],
            "| gemm fc fwd 8x64x16 bf16 | 2 | 4.000 | 40.0% | 500.0 |  | 4.000 |"
        );
        assert_eq!(
            lines[3],
            "| layernorm_forward | 2 | 0.750 | 7.5% |  | 2667 | 1.000 |"
        );
        assert_eq!(lines[4], "| kernel@0x1 | 1 | 0.250 | 2.5% |  |  |  |");
        assert_eq!(
            lines[5],
            "| **all operations** | 5 | 5.000 | 50.0% |  |  | 5.000 |"
        );
        assert!(md.contains("Sum of per-op times 5.000 ms vs the profiled step's wall time 10.000 ms: 5.000 ms (50.0%)"), "{md}");
        assert!(
            md.contains("Un-instrumented step (median of the timed iterations): 6.000 ms"),
            "{md}"
        );
        assert!(md.contains("Roofline floor 5.000 ms"), "{md}");
        assert!(
            md.contains(
                "- GeluAux { bias: true } on a product: fused\n\nWhere the step's time goes"
            ),
            "{md}"
        );
        assert!(md.contains("\nBottleneck: "), "{md}");
        // Every table line has the same number of cells.
        for l in &lines[..6] {
            assert_eq!(l.matches('|').count(), 8, "{l}");
        }
    }

    #[test]
    fn token_summary_counts_distinct_tokens_and_the_most_frequent() {
        assert_eq!(
            token_summary(&[5, 1, 5, 9, 5, 1, 0, 5]),
            "8 tokens, 4 distinct, the most frequent 4 times (50.0%)"
        );
        assert_eq!(
            token_summary(&[3]),
            "1 tokens, 1 distinct, the most frequent 1 times (100.0%)"
        );
    }

    #[test]
    fn memory_summary_subtracts_the_baseline() {
        let report = MemoryReport {
            items: vec![
                ("parameters (fp32)".into(), 500 << 20),
                ("activations (saved for backward)".into(), 3 << 30),
            ],
            device_free: Some(70 << 30),
            device_total: Some(80 << 30),
            before_first_pass: Vec::new(),
        };
        let m = memory_summary(&report, Some(1 << 30));
        assert_eq!(m.in_use_bytes, Some(10 << 30));
        assert_eq!(m.engine_bytes, Some(9 << 30));
        assert_eq!(m.accounted_bytes, (3 << 30) + (500 << 20));
        let text = m.to_text();
        assert!(text.contains("GPU memory in use after the step: 10.00 GiB of 80.00 GiB; 1.00 GiB before the engine was created, so 9.00 GiB for the engine"), "{text}");
        assert!(text.contains("parameters (fp32) 500.0 MiB"), "{text}");
        assert!(text.contains("total 3.49 GiB"), "{text}");
        assert!(text.contains("the other 5.51 GiB"), "{text}");
        // No driver figures: only the accounting.
        let host = MemoryReport {
            device_free: None,
            device_total: None,
            ..report
        };
        let m = memory_summary(&host, None);
        assert_eq!((m.in_use_bytes, m.engine_bytes), (None, None));
        assert!(m.to_text().starts_with("engine buffers:"));
    }
}
