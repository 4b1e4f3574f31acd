//! The CPU engine against fixtures from an independent float64 PyTorch implementation
//! (tools/make_reference.py): logits, loss, every parameter gradient, and 10 AdamW steps with
//! global-norm clipping.

use nanogpt::engine::cpu::CpuEngine;
use nanogpt::engine::{Batch, Engine};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use safetensors::SafeTensors;
use serde_json::Value;

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn open(name: &str) -> Self {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
        Fixture { bytes }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture is valid safetensors")
    }
    fn config(&self) -> Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let text = meta.metadata().as_ref().unwrap()["config"].clone();
        serde_json::from_str(&text).unwrap()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        t.data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn i32s(&self, name: &str) -> Vec<i32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// max |a - b| / max |b| over a tensor (relative to the tensor's scale).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn setup(name: &str) -> (Fixture, CpuEngine, GptConfig, AdamWConfig, f32) {
    let fx = Fixture::open(name);
    let c = fx.config();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let mut cfg = GptConfig::new(
        u("n_layer"),
        u("n_head"),
        u("n_embd"),
        u("block_size"),
        u("vocab_size"),
        c["bias"].as_bool().unwrap(),
        0.0,
    )
    .unwrap();
    cfg.padded_vocab_size = u("padded_vocab_size");
    let layout = ParamLayout::new(&cfg);
    let mut params = vec![0f32; layout.total];
    for t in &layout.tensors {
        let v = fx.f32s(&format!("param.{}", t.name));
        assert_eq!(v.len(), t.len, "{}", t.name);
        params[t.offset..t.offset + t.len].copy_from_slice(&v);
    }
    let f = |k: &str| c[k].as_f64().unwrap() as f32;
    let hp = AdamWConfig {
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        grad_clip: f("grad_clip"),
    };
    let lr = f("lr");
    let eng = CpuEngine::new(cfg.clone(), params, 1, 2).unwrap();
    (fx, eng, cfg, hp, lr)
}

fn check_fixture(name: &str) {
    let (fx, mut eng, cfg, hp, lr) = setup(name);
    let c = fx.config();
    let (b, t) = (
        c["B"].as_u64().unwrap() as usize,
        c["T"].as_u64().unwrap() as usize,
    );
    let inputs: Vec<u32> = fx.i32s("inputs").iter().map(|&x| x as u32).collect();
    let targets = fx.i32s("targets");
    assert!(targets.contains(&-1), "fixture exercises ignored targets");
    let batch = Batch {
        inputs: &inputs,
        targets: &targets,
        b,
        t,
    };

    let logits = eng.logits(batch).unwrap();
    let e = rel_err(&logits, &fx.f32s("logits"));
    assert!(e < 1e-5, "{name}: logits relative error {e:.2e}");

    eng.zero_grad();
    let loss = eng.forward_backward(batch, 1.0).unwrap();
    let want = fx.f32s("loss")[0];
    assert!(
        (loss - want).abs() < 1e-5 * want.abs(),
        "{name}: loss {loss} vs {want}"
    );
    let grads = eng.grads();
    let layout = eng.layout().clone();
    let mut worst = (0f64, String::new());
    for tspec in &layout.tensors {
        let got = &grads[tspec.offset..tspec.offset + tspec.len];
        let want = fx.f32s(&format!("grad.{}", tspec.name));
        let e = rel_err(got, &want);
        assert!(
            e < 1e-4,
            "{name}: gradient of {} relative error {e:.2e}",
            tspec.name
        );
        if e > worst.0 {
            worst = (e, tspec.name.clone());
        }
    }
    let pad = &grads
        [layout.wte + cfg.vocab_size * cfg.n_embd..layout.wte + cfg.padded_vocab_size * cfg.n_embd];
    assert!(
        pad.iter().all(|&g| g == 0.0),
        "padded vocabulary rows get no gradient"
    );
    eprintln!("{name}: worst gradient error {:.2e} ({})", worst.0, worst.1);

    // 10 AdamW steps on the same batch, with clipping.
    let norms = fx.f32s("adamw_grad_norms");
    let losses = fx.f32s("adamw_losses");
    let mut clipped = 0;
    for k in 0..norms.len() {
        eng.zero_grad();
        eng.forward_backward(batch, 1.0).unwrap();
        let norm = eng.step(&hp, lr);
        assert!(
            (norm - norms[k]).abs() < 1e-4 * norms[k],
            "{name}: step {k} grad norm {norm} vs {}",
            norms[k]
        );
        if norm > hp.grad_clip {
            clipped += 1;
        }
        let l = eng.loss(batch).unwrap();
        assert!(
            (l - losses[k]).abs() < 1e-4 * losses[k],
            "{name}: loss after step {} {l} vs {}",
            k + 1,
            losses[k]
        );
    }
    assert!(
        clipped > 0 && clipped < norms.len(),
        "clipping active on some steps only ({clipped})"
    );
    let params = eng.params();
    for tname in [
        "transformer.wte.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
    ] {
        let tspec = layout.get(tname).unwrap();
        let e = rel_err(
            &params[tspec.offset..tspec.offset + tspec.len],
            &fx.f32s(&format!("final.{tname}")),
        );
        assert!(
            e < 1e-4,
            "{name}: {tname} after 10 steps, relative error {e:.2e}"
        );
    }
}

#[test]
fn matches_pytorch_with_bias() {
    check_fixture("ref_bias.safetensors");
}

#[test]
fn matches_pytorch_without_bias() {
    check_fixture("ref_nobias.safetensors");
}

#[test]
fn matches_pytorch_with_short_sequences() {
    check_fixture("ref_short.safetensors");
}
