//! The memory-bound kernels (elementwise, cast, LayerNorm, cross-entropy, embedding, AdamW,
//! KV-cache append) with their vectorised 16-byte accesses and scalar fallbacks:
//!
//! - run on the CPU by the emulator in tools/kernel_emulate (g++, the real kernels/*.cu with
//!   kernels/common.cuh in front), each against a C++ reference, with aligned pointers,
//!   pointers one element off (all of them, or only the first) and lengths that are not
//!   multiples of 4 (tolerances and situations: tools/kernel_emulate/main.cpp), under three
//!   schedules of the warps of a block (in step, and each warp as far ahead as its barriers
//!   allow, first warp first and last warp first: a missing `__syncthreads` shows up as a
//!   wrong result). Without g++
//!   the test prints "skipped: no g++" and passes; NANOGPT_REQUIRE_EMULATOR=1 makes that a
//!   failure.
//! - compiled by NVRTC to PTX, where every one of them must contain 16-byte (or, for bf16
//!   stores, 8-byte) global accesses: the vector path exists in the code the GPU runs.
//!   Without NVRTC the test says so and passes; NANOGPT_REQUIRE_NVRTC=1 makes that a failure.

mod common;

use common::emulate;
use common::nvrtc::nvrtc;
use nanogpt::cuda::nvrtc::Target;
use nanogpt::engine::cuda::kernels::{OPTIONS, SOURCES};

/// Every kernel the emulator checks (one "ok" line each).
const CHECKED: &[&str] = &[
    "adamw_update",
    "add_inplace",
    "bias_broadcast",
    "cast_bf16_to_f32",
    "cast_f32_to_bf16",
    "colsum_parts",
    "cross_entropy_forward_backward",
    "decode_kv_append",
    "dropout_apply",
    "embedding_backward_wpe",
    "embedding_backward_wte",
    "embedding_forward",
    "gelu_backward_inplace",
    "gelu_forward",
    "layernorm_backward",
    "layernorm_backward_dx",
    "layernorm_backward_parts",
    "layernorm_forward",
    "layernorm_recompute",
    "reduce_parts_add",
    "residual_layernorm_forward",
    "sumsq_parts",
];

#[test]
fn memory_bound_kernels_pass_the_cpu_emulator() {
    if !emulate::have_gxx("the kernel emulator") {
        return;
    }
    let (passed, text) = emulate::run("tools/kernel_emulate/run.sh", &[]);
    assert!(
        passed,
        "the kernel emulator failed (output above; rerun with tools/kernel_emulate/run.sh)"
    );
    for schedule in ["round robin", "warps", "warps_reversed"] {
        assert!(
            text.lines().any(|l| l == format!("schedule: {schedule}")),
            "schedule {schedule} did not run:\n{text}"
        );
    }
    assert_eq!(
        text.lines().filter(|l| *l == "PASS").count(),
        3,
        "a schedule did not pass:\n{text}"
    );
    for k in CHECKED {
        let line = text
            .lines()
            .find(|l| l.starts_with("ok ") && l.contains(&format!(" {k}: ")))
            .unwrap_or_else(|| panic!("no ok line for {k}:\n{text}"));
        // The aligned cases took the vector path.
        let vec: u64 = line
            .split(", ")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no vector access count in {line:?}"));
        assert!(
            vec > 0,
            "{k}: no vector access in the aligned cases: {line}"
        );
    }
}

/// The PTX text of entry `name` (from `.entry name(` to the next `.entry`).
fn entry<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start + 1..];
    Some(&ptx[start..start + 1 + rest.find(".entry").unwrap_or(rest.len())])
}

#[test]
fn vectorised_kernels_emit_wide_global_accesses() {
    let Some(n) = nvrtc("the PTX of the vectorised kernels was not checked") else {
        return;
    };
    let mut ptx = String::new();
    for (name, src) in SOURCES {
        if name == "flash_attention.cu" {
            continue;
        }
        let c = n
            .compile(src, name, Target::Ptx { cc: 80 }, &OPTIONS)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        ptx.push_str(&String::from_utf8_lossy(&c.image));
    }
    // (kernel, the wide store it must contain, or "" for none); each has a 16-byte load.
    let stores_v4 = "st.global.v4.f32";
    let table: &[(&str, &str)] = &[
        ("gelu_forward", stores_v4),
        ("gelu_backward_inplace", stores_v4),
        ("add_inplace", stores_v4),
        ("dropout_apply", stores_v4),
        ("bias_broadcast", stores_v4),
        ("colsum_parts", stores_v4),
        ("reduce_parts_add", stores_v4),
        ("adamw_update", stores_v4),
        ("sumsq_parts", ""),
        ("cast_f32_to_bf16", "st.global.v2.u32"),
        ("layernorm_forward", stores_v4),
        ("layernorm_backward", stores_v4),
        ("layernorm_backward_dx", stores_v4),
        ("layernorm_backward_parts", stores_v4),
        ("residual_layernorm_forward", stores_v4),
        ("layernorm_recompute", stores_v4),
        ("cross_entropy_forward_backward", stores_v4),
        ("embedding_forward", stores_v4),
        ("embedding_backward_wte", stores_v4),
        ("embedding_backward_wpe", stores_v4),
        ("decode_kv_append", stores_v4),
    ];
    for (k, store) in table {
        let body = entry(&ptx, k).unwrap_or_else(|| panic!("no entry {k} in the PTX"));
        assert!(
            body.lines()
                .any(|l| l.contains("ld.global") && l.contains(".v4.f32")),
            "{k}: no 16-byte load in its PTX"
        );
        // A 16-byte store of four 32-bit values; the compiler may type the registers as
        // .u32 or .b32 when it moves the same bits (e.g. a value computed once for two stores).
        let wide = |t: &str| body.contains(&store.replace(".f32", t));
        assert!(
            store.is_empty() || body.contains(store) || wide(".u32") || wide(".b32"),
            "{k}: no {store} (or .u32/.b32) in its PTX"
        );
    }
    // Read-only inputs go through the non-coherent (__ldg) path.
    let gelu = entry(&ptx, "gelu_forward").expect("gelu_forward entry");
    assert!(
        gelu.contains("ld.global.nc.v4.f32"),
        "gelu_forward: no __ldg of x"
    );
    // adamw_update also writes the bf16 copy with one 8-byte store per four elements.
    let adamw = entry(&ptx, "adamw_update").expect("adamw_update entry");
    assert!(
        adamw.contains("st.global.v2.u32"),
        "adamw_update: no 8-byte bf16 store"
    );
    // The LayerNorm kernels' bf16 outputs and the bf16 logits gradient (the bf16 mode): one
    // 8-byte store per four.
    for k in [
        "layernorm_forward",
        "residual_layernorm_forward",
        "layernorm_recompute",
        "cross_entropy_forward_backward",
    ] {
        let body = entry(&ptx, k).unwrap_or_else(|| panic!("no entry {k} in the PTX"));
        assert!(
            body.contains("st.global.v2.u32"),
            "{k}: no 8-byte bf16 store"
        );
    }
    // The LayerNorm backward kernels' bf16 dout (switch `bf16_dln`): one 8-byte load per four.
    for k in [
        "layernorm_backward",
        "layernorm_backward_dx",
        "layernorm_backward_parts",
    ] {
        let body = entry(&ptx, k).unwrap_or_else(|| panic!("no entry {k} in the PTX"));
        assert!(
            body.lines()
                .any(|l| l.contains("ld.global") && l.contains(".v2.u32")),
            "{k}: no 8-byte bf16 load in its PTX"
        );
    }
    eprintln!("checked the PTX of {} vectorised kernels", table.len());
}
