//! The CUDA engine's per-operation profile (`Engine::profile_step`, behind `nanogpt bench
//! --profile`) and memory report, on a small model in fp32 and bf16: every kernel family
//! of a training step appears with a resolved name and a positive time, every matrix
//! product is recognised by role, the per-op sum stays within the step's wall time, the
//! profiled step computes what an unprofiled one does, and the memory accounting matches
//! the buffers' sizes; and where a bf16 step's residual adds run (in the projection
//! products, or, where a product cannot add them, in the LayerNorm after it).
//!
//! Without a GPU every test prints "skipped: no GPU (why)" and passes; NANOGPT_REQUIRE_GPU=1
//! makes that a failure.

use nanogpt::bench::{Ceilings, ProfileTable};
use nanogpt::engine::cuda::profile::{Phase, StepProfile};
use nanogpt::engine::cuda::switches::Switches;
use nanogpt::engine::cuda::{stack, CudaEngine, Precision};
use nanogpt::engine::{Batch, Engine};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use nanogpt::rng::Rng;

/// The GPU's compute capability major when one is usable (see `stack::gpus_for_test`).
fn gpu(test: &str) -> Option<u32> {
    stack::gpus_for_test(test).map(|g| g[0].compute_capability.0)
}

fn cfg() -> GptConfig {
    // bias on, so the bias-gradient kernels run too.
    GptConfig::new(2, 2, 64, 32, 96, true, 0.0).unwrap()
}

fn tokens(cfg: &GptConfig, b: usize, t: usize) -> (Vec<u32>, Vec<i32>) {
    let mut rng = Rng::new(5);
    let n = b * t;
    let toks: Vec<u32> = (0..n + 1)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let targets = toks[1..].iter().map(|&x| x as i32).collect();
    (toks[..n].to_vec(), targets)
}

fn engine(cfg: &GptConfig, precision: Precision) -> CudaEngine {
    let params = ParamLayout::new(cfg).init_params(cfg, 3);
    CudaEngine::with_precision(cfg.clone(), params, 3, 0, precision)
        .unwrap_or_else(|e| panic!("creating the {precision:?} engine: {e}"))
}

fn check_profile(label: &str, p: &StepProfile, precision: Precision) {
    let names: Vec<&str> = p.ops.iter().map(|o| o.name.as_str()).collect();
    let unnamed: Vec<&&str> = names.iter().filter(|n| n.starts_with("kernel@")).collect();
    assert!(
        unnamed.is_empty(),
        "{label}: kernel names not resolved through cuFuncGetName: {unnamed:?}"
    );
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let mut families = vec![
        "embedding_forward",
        "embedding_backward_wte",
        "embedding_backward_wpe",
        "layernorm_",
        "sumsq_parts",
        "adamw_update",
        "reduce_parts_add",
        "gemm qkv fwd",
        "gemm qkv dW",
        "gemm qkv dX",
        "gemm attn proj fwd",
        "gemm fc fwd",
        "gemm fc dW",
        "gemm mlp proj dX",
        "gemm lm_head fwd",
        "gemm lm_head dX",
        "gemm lm_head dW",
    ];
    if precision == Precision::F32 {
        families.extend([
            "gelu_forward",
            "gelu_backward_inplace",
            "cross_entropy_forward_backward",
        ]);
    } else {
        // bf16 logits (the default): the cross-entropy over them.
        families.push("cross_entropy_bf16");
        // The bf16 mode's default storage leaves no cast pass in a step: every bf16 operand
        // is written in bf16 by the kernel or product that computes it (LayerNorm outputs,
        // q, k, v and the attention output, the MLP chain, the logits and every gradient a
        // product reads, the residual-stream gradient's copy by the LayerNorm backward),
        // and AdamW refreshes the parameters' bf16 copy itself. Where cuBLASLt declines
        // an epilogue or a bf16 output (listed in `products`), the product goes through
        // fp32 scratch and a cast instead, the same values.
        let casts: Vec<&&str> = names.iter().filter(|n| n.starts_with("cast_")).collect();
        if p.products.iter().all(|l| l.ends_with(": fused")) {
            assert!(
                casts.is_empty(),
                "{label}: cast passes in a default bf16 step: {casts:?}"
            );
        } else {
            eprintln!("{label}: casts {casts:?} for products {:?}", p.products);
        }
    }
    for f in families {
        assert!(
            has(f),
            "{label}: no operation named {f}* in the profile: {names:?}"
        );
    }
    assert!(
        has("causal_softmax_forward") || has("flash_attn_fwd"),
        "{label}: no attention kernel in {names:?}"
    );
    for o in &p.ops {
        assert!(
            o.ms > 0.0 && o.ms.is_finite(),
            "{label}: {} took {} ms",
            o.name,
            o.ms
        );
        if o.name.starts_with("flash_attn_") {
            // The fused attention carries its FLOPs and bytes (profile::flash_work).
            assert_eq!(o.kind, "attention", "{label}: {}", o.name);
            assert!(
                o.flops.is_some_and(|f| f > 0.0) && o.bytes.is_some_and(|b| b > 0.0),
                "{label}: {} without its work: {o:?}",
                o.name
            );
        }
        if o.kind == "gemm" {
            let flops = o.flops.expect("products carry FLOPs");
            assert!(flops > 0.0, "{label}: {}", o.name);
            // Every product of the model is recognised by role (shape x shape x shape
            // straight after "gemm " means it was not).
            let second = o.name.split(' ').nth(1).unwrap_or("");
            assert!(
                !second.contains('x') || second.starts_with("attn"),
                "{label}: unrecognised product {}",
                o.name
            );
        }
    }
    for phase in [Phase::Forward, Phase::Backward, Phase::Step] {
        assert!(
            p.ops.iter().any(|o| o.phase == phase),
            "{label}: no operation in phase {phase:?}"
        );
    }
    assert_eq!(
        p.ops
            .iter()
            .find(|o| o.phase == Phase::Step)
            .map(|o| o.name.as_str()),
        Some("sumsq_parts"),
        "{label}: the optimizer step starts with the gradient norm"
    );
    let sum: f64 = p.ops.iter().map(|o| o.ms).sum();
    assert!(
        sum <= p.wall_ms * 1.05,
        "{label}: per-op sum {sum:.3} ms exceeds the step's wall time {:.3} ms",
        p.wall_ms
    );
    // The table over it is consistent.
    let t = ProfileTable::new(
        p,
        Ceilings::resolve(&p.device, Some(100.0), Some(1000.0)),
        None,
    );
    assert_eq!(t.rows.iter().map(|r| r.calls).sum::<usize>(), p.ops.len());
    // bf16: how every product with an epilogue ran is listed (fp32 has none).
    let with_epilogue = p.products.iter().filter(|l| l.contains("fused")).count();
    assert_eq!(
        with_epilogue > 0,
        precision == Precision::Bf16,
        "{label}: {:?}",
        p.products
    );
    eprintln!("{label}:\n{}", t.to_markdown());
}

fn profile_matches_plain_step(precision: Precision, label: &str) {
    let cfg = cfg();
    let (b, t) = (4, cfg.block_size);
    let (inputs, targets) = tokens(&cfg, b, t);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let hp = AdamWConfig::default();
    let (mut plain, mut profiled) = (engine(&cfg, precision), engine(&cfg, precision));
    assert!(
        profiled.memory_report().is_some(),
        "{label}: the CUDA engine reports its memory"
    );
    // A first step on both (activations allocated, kernels warm), then the profiled one.
    for e in [&mut plain, &mut profiled] {
        e.zero_grad();
        e.forward_backward(batch, 1.0).unwrap();
        e.step(&hp, 1e-3);
    }
    plain.zero_grad();
    plain.forward_backward(batch, 1.0).unwrap();
    plain.step(&hp, 1e-3);
    let p = profiled
        .profile_step(batch, 1.0, 1, &hp, 1e-3)
        .expect("the CUDA engine profiles")
        .unwrap_or_else(|e| panic!("{label}: profiled step failed: {e}"));
    check_profile(label, &p, precision);
    // Same arithmetic with and without the timers: the same bits (no kernel of a step
    // depends on the order its blocks run in).
    let (a, bb) = (plain.params(), profiled.params());
    let differ = a
        .iter()
        .zip(&bb)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differ, 0,
        "{label}: the profiled step changed {differ} parameters' bits"
    );
    // Profiling is off again afterwards: a plain step still works.
    profiled.zero_grad();
    profiled.forward_backward(batch, 1.0).unwrap();

    let mem = profiled.memory_report().unwrap();
    let get = |what: &str| {
        mem.items
            .iter()
            .find(|(w, _)| w == what)
            .map(|x| x.1)
            .unwrap_or_else(|| panic!("{label}: no '{what}' in {:?}", mem.items))
    };
    let total = ParamLayout::new(&cfg).total as u64;
    assert_eq!(get("parameters (fp32)"), 4 * total);
    assert_eq!(get("gradients (fp32)"), 4 * total);
    assert_eq!(get("AdamW moments (fp32)"), 8 * total);
    assert!(get("activations (saved for backward)") > 0);
    if precision == Precision::Bf16 {
        assert_eq!(get("parameters (bf16 copy)"), 2 * total);
    }
    let (free, all) = (mem.device_free.unwrap(), mem.device_total.unwrap());
    assert!(
        free < all && all - free >= mem.accounted(),
        "{label}: {mem:?}"
    );
}

#[test]
fn profile_of_an_fp32_step() {
    if gpu("profile_of_an_fp32_step").is_none() {
        return;
    }
    profile_matches_plain_step(Precision::F32, "fp32");
}

#[test]
fn profile_of_a_bf16_step() {
    match gpu("profile_of_a_bf16_step") {
        None => {}
        Some(major) if major < 8 => eprintln!("profile_of_a_bf16_step: skipped: bf16 needs sm_80"),
        Some(_) => profile_matches_plain_step(Precision::Bf16, "bf16"),
    }
}

/// The forward kernels of one profiled bf16 step with `switches`, by name, in order.
fn forward_kernels(switches: Switches) -> Vec<String> {
    let cfg = cfg();
    let (b, t) = (2, cfg.block_size);
    let (inputs, targets) = tokens(&cfg, b, t);
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };
    let params = ParamLayout::new(&cfg).init_params(&cfg, 3);
    let mut e = CudaEngine::with_switches(cfg, params, 3, 0, Precision::Bf16, switches)
        .unwrap_or_else(|e| panic!("creating the bf16 engine ({switches:?}): {e}"));
    let hp = AdamWConfig::default();
    let p = e
        .profile_step(batch, 1.0, 1, &hp, 1e-3)
        .expect("the CUDA engine profiles")
        .unwrap_or_else(|e| panic!("profiled step ({switches:?}): {e}"));
    p.ops
        .iter()
        .filter(|o| o.phase == Phase::Forward)
        .map(|o| o.name.clone())
        .collect()
}

#[test]
fn residual_adds_run_in_the_products_or_else_in_the_layernorms() {
    match gpu("residual_adds_run_in_the_products_or_else_in_the_layernorms") {
        None => return,
        Some(major) if major < 8 => {
            eprintln!("residual_adds_run_in_the_products_or_else_in_the_layernorms: skipped: bf16 needs sm_80");
            return;
        }
        Some(_) => {}
    }
    let layers = cfg().n_layer;
    let count = |names: &[String], name: &str| names.iter().filter(|n| *n == name).count();
    // Default: both adds of every block inside the projection products; every LayerNorm
    // (two per block and the final one) only normalises.
    let on = forward_kernels(Switches::default());
    assert_eq!(
        (
            count(&on, "layernorm_forward"),
            count(&on, "residual_layernorm_forward"),
            count(&on, "add_inplace")
        ),
        (2 * layers + 1, 0, 0),
        "default bf16 forward: {on:?}"
    );
    // With the epilogues off the biased projections cannot add the residual in the
    // product: each add goes to the LayerNorm after it (one kernel), never a pass of
    // its own.
    for disable in ["epilogues", "fused_residual"] {
        let off = Switches::parse(disable).expect("a known switch");
        let names = forward_kernels(off);
        assert_eq!(
            (
                count(&names, "layernorm_forward"),
                count(&names, "residual_layernorm_forward"),
                count(&names, "add_inplace")
            ),
            (1, 2 * layers, 0),
            "bf16 forward with {disable} off: {names:?}"
        );
    }
}
