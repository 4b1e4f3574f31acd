//! Whether an engine's state (its parameters; at the first training pass the gradients and
//! AdamW moments) and a training step's activations fit in the GPU memory that is free,
//! checked before they are allocated, and what to change when they do not: the
//! messages name what is needed, what is free, and for activations the settings that would
//! fit (a higher `recompute` level, a smaller `batch_size` with more gradient
//! accumulation), each with the figure it would need.

use crate::engine::{memory_size, Recompute};

/// A training step's activation memory, as the engine plans it.
pub(super) struct StepShape<'a> {
    /// The device, for the message (`cuda:0 (NVIDIA H100 ...)`).
    pub device: &'a str,
    pub b: usize,
    pub t: usize,
    pub recompute: Recompute,
    /// Bytes of the activations for `b` rows at a recompute level.
    pub bytes_at: &'a dyn Fn(usize, Recompute) -> u64,
}

/// The share of the free memory a suggested setting may plan for: the rest is left for
/// what a step allocates besides its activations (bf16 operand scratch, the libraries'
/// workspaces, allocation rounding).
const HEADROOM: f64 = 0.9;

/// The message for activations that need more than `free` bytes (of `total`), with the
/// settings that would fit in [`HEADROOM`] of `free`.
pub(super) fn does_not_fit(s: &StepShape, free: u64, total: u64) -> String {
    let need = (s.bytes_at)(s.b, s.recompute);
    let room = (free as f64 * HEADROOM) as u64;
    let mut options = Vec::new();
    for rc in [Recompute::Gelu, Recompute::GeluLayerNorm] {
        let bytes = (s.bytes_at)(s.b, rc);
        if rc > s.recompute && bytes <= room {
            options.push(format!("recompute={} ({})", rc.level(), memory_size(bytes)));
            break; // the lowest level that fits recomputes least
        }
    }
    // The largest batch below this one that fits at `rc` (the bytes grow with the batch).
    let fits = |rc: Recompute| {
        let (mut lo, mut hi) = (0, s.b); // fits(lo) or lo == 0; hi does not fit
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if (s.bytes_at)(mid, rc) <= room {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo > 0).then_some(lo)
    };
    if let Some(b) = fits(s.recompute) {
        options.push(format!(
            "batch_size={b} ({}) with gradient_accumulation_steps raised to keep the tokens \
             per optimizer step ({} x {} now)",
            memory_size((s.bytes_at)(b, s.recompute)),
            s.b,
            s.t
        ));
    }
    // A smaller batch at recompute 2, when it keeps at least a tenth more rows than a
    // smaller batch alone (and the whole batch does not fit at recompute 2, offered above).
    let top = Recompute::GeluLayerNorm;
    if s.recompute < top && (s.bytes_at)(s.b, top) > room {
        let alone = fits(s.recompute).unwrap_or(0);
        if let Some(b) = fits(top).filter(|&b| 10 * b >= 11 * alone) {
            options.push(format!(
                "batch_size={b} with recompute=2 ({})",
                memory_size((s.bytes_at)(b, Recompute::GeluLayerNorm))
            ));
        }
    }
    let advice = if options.is_empty() {
        format!(
            "even batch_size=1 at recompute=2 needs {}: use a smaller model or block_size, or \
             a GPU with more memory",
            memory_size((s.bytes_at)(1, Recompute::GeluLayerNorm))
        )
    } else {
        format!("to fit, set {}", options.join(", or "))
    };
    let mem = Free {
        device: s.device,
        free,
        total,
    };
    format!(
        "out of GPU memory: a training step on a {} x {} micro-batch needs {} of activations \
         at recompute={}, and {} ({} already in use: this engine's parameters, gradients, \
         AdamW moments and workspaces, and anything else on the GPU); {advice}",
        s.b,
        s.t,
        memory_size(need),
        s.recompute.level(),
        mem.has(),
        mem.in_use(),
    )
}

/// A device's memory as the driver reported it, for the messages below.
pub(super) struct Free<'a> {
    /// The device, for the message (`cuda:0 (NVIDIA H100 ...)`).
    pub device: &'a str,
    pub free: u64,
    pub total: u64,
}

impl Free<'_> {
    /// `Err(message(self))` when `bytes` exceed the free memory in `mem_info` (the driver's
    /// free and total), else `Ok`; also `Ok` where the driver cannot say, and the
    /// allocation decides.
    pub(super) fn check<E>(
        device: &str,
        mem_info: std::result::Result<(u64, u64), E>,
        bytes: u64,
        message: impl FnOnce(&Free) -> String,
    ) -> std::result::Result<(), String> {
        match mem_info {
            Ok((free, total)) if bytes > free => Err(message(&Free {
                device,
                free,
                total,
            })),
            _ => Ok(()),
        }
    }

    /// "<device> has X free of Y".
    fn has(&self) -> String {
        format!(
            "{} has {} free of {}",
            self.device,
            memory_size(self.free),
            memory_size(self.total)
        )
    }

    fn in_use(&self) -> String {
        memory_size(self.total.saturating_sub(self.free))
    }
}

/// The message for an engine whose fixed state (`bytes`: the parameters, their bf16 copy
/// and workspaces of a model with `params` parameters) does not fit `mem`.
pub(super) fn state_does_not_fit(mem: &Free, params: usize, bytes: u64) -> String {
    format!(
        "out of GPU memory: the model's {:.1}M parameters need {} on the GPU before any \
         gradient, activation or optimizer state (fp32 parameters are 4 bytes each, the \
         bf16 mode's copy 2 more), and {}; use a smaller model (n_layer, n_embd) or a GPU \
         with more memory",
        params as f64 / 1e6,
        memory_size(bytes),
        mem.has()
    )
}

/// The message for the fp32 gradients (`bytes`) of a model with `params` parameters that
/// do not fit `mem` when training starts.
pub(super) fn gradients_do_not_fit(mem: &Free, params: usize, bytes: u64) -> String {
    format!(
        "out of GPU memory: training the model's {:.1}M parameters needs their fp32 \
         gradients, {}, and {} ({} already in use by the parameters and anything else); use \
         a smaller model (n_layer, n_embd) or a GPU with more memory (sampling needs no \
         gradients)",
        params as f64 / 1e6,
        memory_size(bytes),
        mem.has(),
        mem.in_use()
    )
}

/// The message for AdamW moments (`bytes`, for `shard` of the model's `params`
/// parameters) that do not fit `mem`.
pub(super) fn moments_do_not_fit(mem: &Free, shard: usize, params: usize, bytes: u64) -> String {
    let whole = shard == params;
    format!(
        "out of GPU memory: the AdamW moments of {} parameters need {} (two fp32 values \
         each), and {} ({} already in use by the parameters, gradients and anything else); \
         {}",
        if whole {
            format!("all {:.1}M", params as f64 / 1e6)
        } else {
            format!(
                "this rank's {:.1}M of {:.1}M",
                shard as f64 / 1e6,
                params as f64 / 1e6
            )
        },
        memory_size(bytes),
        mem.has(),
        mem.in_use(),
        if whole {
            "on several GPUs, zero_stage=1 shards them over the ranks (1/W each); else use a \
             smaller model (n_layer, n_embd) or a GPU with more memory"
        } else {
            "more ranks make each shard smaller; else use a smaller model (n_layer, n_embd) \
             or GPUs with more memory"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// 100 MiB per row at recompute 0, 60 at 1, 40 at 2.
    fn bytes_at(b: usize, rc: Recompute) -> u64 {
        b as u64
            * MIB
            * match rc {
                Recompute::Nothing => 100,
                Recompute::Gelu => 60,
                Recompute::GeluLayerNorm => 40,
            }
    }

    fn shape(b: usize, recompute: Recompute) -> StepShape<'static> {
        StepShape {
            device: "cuda:0 (test GPU)",
            b,
            t: 1024,
            recompute,
            bytes_at: &bytes_at,
        }
    }

    #[test]
    fn names_the_need_what_is_free_and_the_settings_that_fit() {
        // 8 rows need 800 MiB; 550 MiB free, 495 of it to plan for: recompute=1 needs
        // 480, 4 rows 400 (5 would need 500).
        let m = does_not_fit(&shape(8, Recompute::Nothing), 550 * MIB, 1000 * MIB);
        assert!(m.starts_with("out of GPU memory: a training step on a 8 x 1024 micro-batch needs 800.0 MiB of activations at recompute=0, and cuda:0 (test GPU) has 550.0 MiB free of 1000.0 MiB (450.0 MiB already in use"), "{m}");
        assert!(m.contains("to fit, set recompute=1 (480.0 MiB), or batch_size=4 (400.0 MiB) with gradient_accumulation_steps raised"), "{m}");
        // The whole batch fits at recompute 1, so no smaller batch at recompute 2.
        assert!(m.ends_with("(8 x 1024 now)"), "{m}");
    }

    #[test]
    fn only_the_levels_above_the_current_one_are_offered() {
        // At recompute 1, 8 rows need 480 MiB; 300 to plan for: recompute=2 needs 320.
        let m = does_not_fit(&shape(8, Recompute::Gelu), 334 * MIB, 1000 * MIB);
        assert!(!m.contains("recompute=1 ("), "{m}");
        assert!(!m.contains("set recompute=2"), "{m}");
        assert!(m.contains("set batch_size=5 (300.0 MiB)"), "{m}");
        assert!(
            m.ends_with(", or batch_size=7 with recompute=2 (280.0 MiB)"),
            "{m}"
        );
        // Already at recompute 2: only a smaller batch.
        let m = does_not_fit(&shape(8, Recompute::GeluLayerNorm), 112 * MIB, 1000 * MIB);
        assert!(m.ends_with("to fit, set batch_size=2 (80.0 MiB) with gradient_accumulation_steps raised to keep the tokens per optimizer step (8 x 1024 now)"), "{m}");
    }

    #[test]
    fn says_when_nothing_fits() {
        let m = does_not_fit(&shape(4, Recompute::Nothing), 10 * MIB, 1000 * MIB);
        assert!(
            m.ends_with("even batch_size=1 at recompute=2 needs 40.0 MiB: use a smaller model or block_size, or a GPU with more memory"),
            "{m}"
        );
    }

    #[test]
    fn the_state_message_names_the_need_and_what_is_free() {
        let mem = Free {
            device: "cuda:0 (test GPU)",
            free: 20 << 30,
            total: 24 << 30,
        };
        let m = state_does_not_fit(&mem, 1_500_000_000, 27 << 30);
        assert_eq!(
            m,
            "out of GPU memory: the model's 1500.0M parameters need 27.00 GiB on the GPU before \
             any gradient, activation or optimizer state (fp32 parameters are 4 bytes each, the \
             bf16 mode's copy 2 more), and cuda:0 (test GPU) has 20.00 GiB free of 24.00 GiB; \
             use a smaller model (n_layer, n_embd) or a GPU with more memory"
        );
    }

    #[test]
    fn the_gradients_message_names_the_need_and_what_is_free() {
        let mem = Free {
            device: "cuda:0 (test GPU)",
            free: 3 << 30,
            total: 16 << 30,
        };
        let m = gradients_do_not_fit(&mem, 1 << 30, 4 << 30);
        assert_eq!(
            m,
            "out of GPU memory: training the model's 1073.7M parameters needs their fp32 \
             gradients, 4.00 GiB, and cuda:0 (test GPU) has 3.00 GiB free of 16.00 GiB (13.00 \
             GiB already in use by the parameters and anything else); use a smaller model \
             (n_layer, n_embd) or a GPU with more memory (sampling needs no gradients)"
        );
    }

    #[test]
    fn the_moments_message_suggests_sharding_them_or_more_ranks() {
        let mem = |device, free| Free {
            device,
            free,
            total: 40 << 30,
        };
        let whole = moments_do_not_fit(
            &mem("cuda:0 (test GPU)", 12 << 30),
            3 << 30,
            3 << 30,
            24 << 30,
        );
        assert_eq!(
            whole,
            "out of GPU memory: the AdamW moments of all 3221.2M parameters need 24.00 GiB (two \
             fp32 values each), and cuda:0 (test GPU) has 12.00 GiB free of 40.00 GiB (28.00 GiB \
             already in use by the parameters, gradients and anything else); on several GPUs, \
             zero_stage=1 shards them over the ranks (1/W each); else use a smaller model \
             (n_layer, n_embd) or a GPU with more memory"
        );
        let shard = moments_do_not_fit(
            &mem("cuda:1 (test GPU)", 4 << 30),
            1 << 30,
            3 << 30,
            8 << 30,
        );
        assert!(
            shard.contains("of this rank's 1073.7M of 3221.2M parameters need 8.00 GiB"),
            "{shard}"
        );
        assert!(shard.ends_with("more ranks make each shard smaller; else use a smaller model (n_layer, n_embd) or GPUs with more memory"), "{shard}");
    }
}
