//! Where a profiled training step's time goes: the per-operation table's rows gathered into
//! the parts of the step (the transformer blocks' matrix products, the LM head's, the fused
//! attention, LayerNorm, cross-entropy, the optimizer, ...), each with its roofline floor
//! and the time above it, and the operations furthest above their floors. The part with the
//! most time above its floor is the step's bottleneck; the report names it and what would
//! go after it next.

use super::{share_of, ProfileRow};
use serde::Serialize;

/// A part of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The linear layers of the transformer blocks (qkv, attention projection, fc, MLP
    /// projection), forward and both gradients.
    BlockProducts,
    /// The tied LM head's three products: the step's largest.
    LmHeadProducts,
    /// The plain attention's batched per-head products (the `flash` switch off).
    AttentionProducts,
    /// The fused attention, forward and backward.
    FusedAttention,
    /// The plain attention's softmax kernels.
    AttentionSoftmax,
    /// LayerNorm forward and backward (with the residual add where it is fused).
    LayerNorm,
    /// The fused softmax, loss and logits gradient.
    CrossEntropy,
    /// The gradient norm and the AdamW update.
    Optimizer,
    /// The token and position embeddings, forward and backward.
    Embeddings,
    /// Bias gradients and other column reductions.
    Reductions,
    /// GELU, residual adds, dropout and casts run as kernels of their own.
    Elementwise,
    /// Anything else (a product of a shape the model does not have, a kernel without a
    /// name the table knows).
    Other,
}

impl Part {
    /// The part an operation of the table belongs to, from its kind and name.
    pub fn of(row: &ProfileRow) -> Part {
        let name = row.op.as_str();
        match row.kind {
            "attention" => return Part::FusedAttention,
            "gemm" => {
                let role = name.strip_prefix("gemm ").unwrap_or(name);
                return if role.starts_with("lm_head ") {
                    Part::LmHeadProducts
                } else if role.starts_with("attn ") && !role.starts_with("attn proj ") {
                    Part::AttentionProducts
                } else if ["qkv ", "attn proj ", "fc ", "mlp proj "]
                    .iter()
                    .any(|p| role.starts_with(p))
                {
                    Part::BlockProducts
                } else {
                    Part::Other
                };
            }
            _ => {}
        }
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
        if starts(&["layernorm", "residual_layernorm"]) {
            Part::LayerNorm
        } else if starts(&["cross_entropy"]) {
            Part::CrossEntropy
        } else if starts(&["adamw", "sumsq"]) {
            Part::Optimizer
        } else if starts(&["embedding"]) {
            Part::Embeddings
        } else if starts(&["colsum", "reduce_parts"]) {
            Part::Reductions
        } else if starts(&["causal_softmax"]) {
            Part::AttentionSoftmax
        } else if starts(&["gelu", "add_", "bias_", "dropout", "cast_"]) {
            Part::Elementwise
        } else {
            Part::Other
        }
    }

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Part::BlockProducts => "matrix products, transformer blocks",
            Part::LmHeadProducts => "matrix products, LM head",
            Part::AttentionProducts => "matrix products, plain attention",
            Part::FusedAttention => "fused attention",
            Part::AttentionSoftmax => "plain attention softmax",
            Part::LayerNorm => "LayerNorm (and fused residual adds)",
            Part::CrossEntropy => "cross-entropy (softmax, loss, logits gradient)",
            Part::Optimizer => "optimizer (gradient norm, AdamW)",
            Part::Embeddings => "embeddings",
            Part::Reductions => "bias gradients and reductions",
            Part::Elementwise => "elementwise kernels and casts",
            Part::Other => "other",
        }
    }

    /// What would go after this part next, were it the bottleneck.
    pub fn next_step(self) -> &'static str {
        match self {
            Part::BlockProducts | Part::LmHeadProducts | Part::AttentionProducts => {
                "the products run below the bf16 GEMM rate of the floor: compare the \
                 algorithms cuBLASLt offers for these shapes (its heuristic's first choice is \
                 what runs), and larger batches (more rows per product)"
            }
            Part::FusedAttention => {
                "the attention kernels run below the GEMM rate their (optimistic) floor \
                 assumes: compare flash_hs64, flash_async and flash_exp2 off in the same run, \
                 then larger tiles or more warps per block, or a Hopper kernel (wgmma, TMA)"
            }
            Part::AttentionSoftmax => {
                "the plain attention materialises B x NH x T x T: turn the fused attention \
                 back on (the flash switch)"
            }
            Part::LayerNorm => {
                "memory-bound passes over the residual stream: fewer bytes per value (a bf16 \
                 residual stream) or fusing into the neighbouring products"
            }
            Part::CrossEntropy => {
                "the logits go through memory between the LM head product and this kernel: \
                 fuse the softmax into the product (chunks of rows) so they never reach it"
            }
            Part::Optimizer => {
                "one pass over parameters, gradients and both moments per optimizer step: \
                 share it over more tokens (gradient accumulation, larger batches) or store \
                 fewer bytes per parameter"
            }
            Part::Embeddings => {
                "the token-embedding gradient adds each token's rows in order: frequent tokens \
                 make long rows (compare the prose profile with the uniform one)"
            }
            Part::Reductions => {
                "fold the bias gradients into the weight-gradient products' epilogue"
            }
            Part::Elementwise => {
                "kernels of their own for work an epilogue could do: see which switch is off \
                 or which product was refused its epilogue (the list of how the products ran)"
            }
            Part::Other => "name the operation in the profile, then decide",
        }
    }
}

/// One part of the step, all its operations summed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartRow {
    pub part: Part,
    pub calls: usize,
    pub ms: f64,
    /// Fraction of the profiled step's wall time.
    pub share: f64,
    /// Sum of the floors of its operations that have one.
    pub floor_ms: f64,
    /// Time of those operations above their floors.
    pub above_floor_ms: f64,
    /// Time of its operations without a floor (no formula or no ceiling).
    pub unfloored_ms: f64,
}

/// An operation and how far above its floor it ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gap {
    pub op: String,
    pub ms: f64,
    pub floor_ms: f64,
    /// `ms - floor_ms` as a fraction of the step's wall time.
    pub share_of_step: f64,
}

/// The step's time by part, and where it is furthest from the roofline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Breakdown {
    /// Most time first.
    pub parts: Vec<PartRow>,
    /// The step's wall time outside every timed operation (launches, synchronisation, host
    /// copies).
    pub outside_ms: f64,
    pub wall_ms: f64,
    /// The operations most above their floors, at most [`Breakdown::TOP_GAPS`].
    pub gaps: Vec<Gap>,
    /// The part with the most time above its floor, counting the time outside the timed
    /// operations as a part whose floor is zero (`None`: nothing has a floor).
    pub bottleneck: Option<Bottleneck>,
}

/// The part of the step a next optimisation should go after.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bottleneck {
    /// The part's label, or `time outside the timed operations`.
    pub what: String,
    pub above_floor_ms: f64,
    pub next_step: String,
}

/// What the launch gaps would need, were they the bottleneck.
const OUTSIDE_NEXT_STEP: &str = "the GPU waits for the host between operations: check that \
     the micro-step ran as a CUDA graph (the launch report above), and look for host \
     synchronisations inside the step";

impl Breakdown {
    /// How many operations the gap list names.
    pub const TOP_GAPS: usize = 5;

    /// Gathers `rows` (a profile table's, the whole step) into parts; `wall_ms` is the
    /// profiled step's wall time.
    pub fn new(rows: &[ProfileRow], wall_ms: f64) -> Breakdown {
        let share = |ms: f64| share_of(ms, wall_ms);
        let mut parts: Vec<PartRow> = Vec::new();
        let mut gaps = Vec::new();
        for r in rows {
            let part = Part::of(r);
            let i = match parts.iter().position(|p| p.part == part) {
                Some(i) => i,
                None => {
                    parts.push(PartRow {
                        part,
                        calls: 0,
                        ms: 0.0,
                        share: 0.0,
                        floor_ms: 0.0,
                        above_floor_ms: 0.0,
                        unfloored_ms: 0.0,
                    });
                    parts.len() - 1
                }
            };
            let p = &mut parts[i];
            p.calls += r.calls;
            p.ms += r.total_ms;
            match r.floor_ms {
                Some(floor) => {
                    p.floor_ms += floor;
                    p.above_floor_ms += (r.total_ms - floor).max(0.0);
                    gaps.push(Gap {
                        op: r.op.clone(),
                        ms: r.total_ms,
                        floor_ms: floor,
                        share_of_step: share((r.total_ms - floor).max(0.0)),
                    });
                }
                None => p.unfloored_ms += r.total_ms,
            }
        }
        for p in &mut parts {
            p.share = share(p.ms);
        }
        parts.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        gaps.sort_by(|a, b| (b.ms - b.floor_ms).total_cmp(&(a.ms - a.floor_ms)));
        gaps.truncate(Self::TOP_GAPS);
        let outside_ms = (wall_ms - rows.iter().map(|r| r.total_ms).sum::<f64>()).max(0.0);
        let worst_part = parts
            .iter()
            .filter(|p| p.ms > p.unfloored_ms)
            .max_by(|a, b| a.above_floor_ms.total_cmp(&b.above_floor_ms));
        let bottleneck = worst_part.map(|p| {
            if outside_ms > p.above_floor_ms {
                Bottleneck {
                    what: "time outside the timed operations".into(),
                    above_floor_ms: outside_ms,
                    next_step: OUTSIDE_NEXT_STEP.into(),
                }
            } else {
                Bottleneck {
                    what: p.part.label().into(),
                    above_floor_ms: p.above_floor_ms,
                    next_step: p.part.next_step().into(),
                }
            }
        });
        Breakdown {
            parts,
            outside_ms,
            wall_ms,
            gaps,
            bottleneck,
        }
    }

    /// The parts as a Markdown table, the time outside the operations, the largest gaps and
    /// the bottleneck.
    pub fn to_markdown(&self) -> String {
        let pct = |ms: f64| share_of(100.0 * ms, self.wall_ms);
        let mut s = String::from("Where the step's time goes, by part:\n\n");
        s.push_str("| part | calls | ms | share | floor ms | above floor ms | no floor ms |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.parts {
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.3} |\n",
                p.part.label(),
                p.calls,
                p.ms,
                100.0 * p.share,
                p.floor_ms,
                p.above_floor_ms,
                p.unfloored_ms
            ));
        }
        s.push_str(&format!(
            "| time outside the timed operations |  | {:.3} | {:.1}% |  |  |  |\n",
            self.outside_ms,
            pct(self.outside_ms)
        ));
        if !self.gaps.is_empty() {
            s.push_str("\nFurthest above their floors:\n");
            for g in &self.gaps {
                s.push_str(&format!(
                    "- {}: {:.3} ms against a floor of {:.3} ms ({:.1}% of the step above it)\n",
                    g.op,
                    g.ms,
                    g.floor_ms,
                    100.0 * g.share_of_step
                ));
            }
        }
        match &self.bottleneck {
            Some(b) => s.push_str(&format!(
                "\nBottleneck: {}, {:.3} ms ({:.1}% of the step) above its floor. Next: {}.\n",
                b.what,
                b.above_floor_ms,
                pct(b.above_floor_ms),
                b.next_step
            )),
            None => s.push_str(
                "\nBottleneck: unknown, no operation has a floor (pass --gemm_tflops and \
                 --copy_gbps from `nanogpt doctor`).\n",
            ),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(op: &str, kind: &'static str, ms: f64, floor: Option<f64>) -> ProfileRow {
        ProfileRow {
            op: op.into(),
            kind,
            calls: 2,
            total_ms: ms,
            share: 0.0,
            tflops: None,
            gbps: None,
            floor_ms: floor,
        }
    }

    #[test]
    fn operations_fall_into_the_parts_of_the_step() {
        let part = |op: &str, kind: &'static str| Part::of(&row(op, kind, 1.0, None));
        assert_eq!(
            part("gemm qkv fwd 8192x2304x768 bf16", "gemm"),
            Part::BlockProducts
        );
        assert_eq!(
            part("gemm attn proj dW 768x768x8192 bf16", "gemm"),
            Part::BlockProducts
        );
        assert_eq!(
            part("gemm mlp proj dX 8192x3072x768 bf16", "gemm"),
            Part::BlockProducts
        );
        assert_eq!(
            part("gemm lm_head dW 50304x768x8192 bf16", "gemm"),
            Part::LmHeadProducts
        );
        assert_eq!(
            part("gemm attn qk fwd 1024x1024x64 x12 fp32", "gemm"),
            Part::AttentionProducts
        );
        assert_eq!(part("gemm 10x20x30 fp32", "gemm"), Part::Other);
        assert_eq!(
            part("flash_attn_bwd (bf16 mma, bf16 io)", "attention"),
            Part::FusedAttention
        );
        assert_eq!(
            part("residual_layernorm_forward", "kernel"),
            Part::LayerNorm
        );
        assert_eq!(part("layernorm_backward_dx", "kernel"), Part::LayerNorm);
        assert_eq!(part("cross_entropy_bf16", "kernel"), Part::CrossEntropy);
        assert_eq!(part("sumsq_parts", "kernel"), Part::Optimizer);
        assert_eq!(part("adamw_update", "kernel"), Part::Optimizer);
        assert_eq!(part("embedding_backward_wte", "kernel"), Part::Embeddings);
        assert_eq!(part("reduce_parts_add", "kernel"), Part::Reductions);
        assert_eq!(part("colsum_parts", "kernel"), Part::Reductions);
        assert_eq!(
            part("causal_softmax_backward", "kernel"),
            Part::AttentionSoftmax
        );
        assert_eq!(part("gelu_forward_bf16", "kernel"), Part::Elementwise);
        assert_eq!(part("cast_f32_to_bf16", "kernel"), Part::Elementwise);
        assert_eq!(part("add_inplace", "kernel"), Part::Elementwise);
        assert_eq!(part("kernel@0x1", "kernel"), Part::Other);
    }

    fn rows() -> Vec<ProfileRow> {
        vec![
            row("gemm fc fwd 8x64x16 bf16", "gemm", 4.0, Some(3.5)),
            row("gemm qkv fwd 8x48x16 bf16", "gemm", 2.0, Some(1.5)),
            row("gemm lm_head fwd 8x32x16 bf16", "gemm", 1.5, Some(1.4)),
            row("layernorm_forward", "kernel", 1.0, Some(0.2)),
            row("flash_attn_fwd (bf16 mma)", "attention", 0.5, Some(0.4)),
            row("kernel@0x1", "kernel", 0.25, None),
        ]
    }

    #[test]
    fn parts_sum_their_operations_and_name_the_bottleneck() {
        let b = Breakdown::new(&rows(), 10.0);
        let labels: Vec<Part> = b.parts.iter().map(|p| p.part).collect();
        assert_eq!(
            labels,
            [
                Part::BlockProducts,
                Part::LmHeadProducts,
                Part::LayerNorm,
                Part::FusedAttention,
                Part::Other
            ],
            "most time first"
        );
        let blocks = &b.parts[0];
        assert_eq!(blocks.calls, 4);
        assert!((blocks.ms - 6.0).abs() < 1e-12);
        assert!((blocks.share - 0.6).abs() < 1e-12);
        assert!((blocks.floor_ms - 5.0).abs() < 1e-12);
        assert!((blocks.above_floor_ms - 1.0).abs() < 1e-12);
        let other = b.parts.last().unwrap();
        assert!((other.unfloored_ms - 0.25).abs() < 1e-12);
        assert!((b.outside_ms - 0.75).abs() < 1e-12);
        // The blocks' products are 1.0 ms above their floors, LayerNorm 0.8 ms: the
        // largest single gap is LayerNorm's, the largest part's the products'.
        assert_eq!(b.gaps[0].op, "layernorm_forward");
        assert!((b.gaps[0].share_of_step - 0.08).abs() < 1e-12);
        assert_eq!(b.gaps.len(), 5);
        let bottleneck = b.bottleneck.as_ref().unwrap();
        assert_eq!(bottleneck.what, Part::BlockProducts.label());
        assert!((bottleneck.above_floor_ms - 1.0).abs() < 1e-12);
        assert_eq!(bottleneck.next_step, Part::BlockProducts.next_step());
    }

    #[test]
    fn launch_gaps_can_be_the_bottleneck() {
        let b = Breakdown::new(&rows(), 20.0);
        let bottleneck = b.bottleneck.unwrap();
        assert_eq!(bottleneck.what, "time outside the timed operations");
        assert!((bottleneck.above_floor_ms - 10.75).abs() < 1e-12);
    }

    #[test]
    fn without_floors_there_is_no_bottleneck() {
        let unfloored: Vec<ProfileRow> = rows()
            .into_iter()
            .map(|r| ProfileRow {
                floor_ms: None,
                ..r
            })
            .collect();
        let b = Breakdown::new(&unfloored, 10.0);
        assert_eq!(b.bottleneck, None);
        assert!(b.gaps.is_empty());
        assert!(b.to_markdown().contains("Bottleneck: unknown"));
    }

    #[test]
    fn markdown_lists_parts_gaps_and_the_bottleneck() {
        let md = Breakdown::new(&rows(), 10.0).to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[2],
            "| part | calls | ms | share | floor ms | above floor ms | no floor ms |"
        );
        assert_eq!(
            lines[4],
            "| matrix products, transformer blocks | 4 | 6.000 | 60.0% | 5.000 | 1.000 | 0.000 |"
        );
        assert!(md.contains("| time outside the timed operations |  | 0.750 | 7.5% |  |  |  |"));
        assert!(md.contains(
            "- layernorm_forward: 1.000 ms against a floor of 0.200 ms (8.0% of the step above it)"
        ));
        assert!(md.contains(
            "Bottleneck: matrix products, transformer blocks, 1.000 ms (10.0% of the step) above its floor. Next: the products"
        ));
        for l in lines.iter().filter(|l| l.starts_with('|')) {
            assert_eq!(l.matches('|').count(), 8, "{l}");
        }
    }
}
