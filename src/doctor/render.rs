//! The human-readable doctor report: CPU, search order, libraries, GPUs, then one line per
//! check (`ok` / `FAILED: ... — advice`).

use super::{Report, Status};
use std::fmt::Write;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let mode = match r.mode {
        super::Mode::Auto => "default",
        super::Mode::CpuOnly => "--cpu-only",
        super::Mode::RequireGpu => "--require-gpu",
    };
    let _ = writeln!(s, "nanogpt doctor ({mode})");
    let _ = writeln!(s, "\nCPU");
    let _ = writeln!(s, "  model    {}", r.cpu.model);
    let _ = writeln!(
        s,
        "  cores    {} logical, {} available to this process",
        r.cpu.logical_cpus, r.cpu.available_cpus
    );
    let _ = writeln!(s, "  SIMD     {}", r.cpu.simd.join(" "));
    let _ = writeln!(s, "  engine   {}", r.cpu.engine_path);

    let _ = writeln!(s, "\nCUDA library search order (first match wins)");
    for (i, d) in r.search_order.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:>2}. {:<9} {}{}",
            i + 1,
            if d.exists { "" } else { "(absent)" },
            d.dir.display(),
            format_args!("  [{}]", d.source)
        );
    }
    let _ = writeln!(
        s,
        "  {:>2}. then the system loader by file name (ld.so.cache)",
        r.search_order.len() + 1
    );
    for n in &r.search_notes {
        let _ = writeln!(s, "      {n}");
    }

    let _ = writeln!(s, "\nCUDA libraries");
    for l in &r.libraries {
        match l.status {
            Status::Ok => {
                let _ = writeln!(
                    s,
                    "  {:<9} {} {}  [{}]",
                    l.name,
                    l.version.as_deref().unwrap_or(""),
                    l.path
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    l.source.as_deref().unwrap_or("")
                );
                for sh in &l.shadowed {
                    let _ = writeln!(s, "            (also at {}, not used)", sh.display());
                }
            }
            Status::Failed => {
                let _ = writeln!(
                    s,
                    "  {:<9} FAILED to load {}",
                    l.name,
                    l.path
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            _ => {
                let _ = writeln!(s, "  {:<9} not found", l.name);
            }
        }
    }

    let _ = writeln!(s, "\nGPUs");
    if r.gpus.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for g in &r.gpus {
        let peak = match (g.bf16_peak_tflops, &g.peak_model) {
            (Some(p), Some(m)) => format!("bf16 peak {p:.0} TFLOP/s ({m})"),
            _ => "bf16 peak unknown (use --peak_flops)".to_string(),
        };
        let _ = writeln!(
            s,
            "  [{}] {}, {}, compute capability {}, {} SMs, {}",
            g.index,
            g.name,
            gib(g.memory_bytes),
            g.compute_capability,
            g.sm_count,
            peak
        );
    }

    let _ = writeln!(s, "\nChecks");
    for c in &r.checks {
        let name = match c.gpu {
            Some(g) => format!("{} [GPU {g}]", c.name),
            None => c.name.clone(),
        };
        let line = match c.status {
            Status::Ok => format!("ok: {}", c.detail),
            Status::Failed => format!("FAILED: {}", c.detail),
            Status::Missing => format!("MISSING: {}", c.detail),
            Status::Skipped => format!("skipped: {}", c.detail),
        };
        let mut line = line;
        if let Some(a) = &c.advice {
            if c.status != Status::Ok {
                line.push_str(" — ");
                line.push_str(a);
            }
        }
        if !c.required && matches!(c.status, Status::Failed | Status::Missing) {
            line.push_str(" (not required in this mode)");
        }
        let _ = writeln!(s, "  {name:<22} {line}");
    }
    let _ = writeln!(s, "\n{}: {}", if r.ok { "OK" } else { "NOT OK" }, r.summary);
    s
}
