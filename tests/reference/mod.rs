//! The PyTorch reference fixtures (tests/fixtures/ref_*.safetensors, written by
//! tools/make_reference.py) and one check that any engine must pass against them: logits,
//! loss, every gradient, and ten AdamW steps with clipping.
#![allow(dead_code)] // each test file uses a different subset of these helpers

use nanogpt::engine::{Batch, Engine};
use nanogpt::model::{GptConfig, ParamLayout};
use nanogpt::optim::AdamWConfig;
use safetensors::SafeTensors;
use serde_json::Value;

pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        // The source tree this binary was built from, else tests/fixtures under the working
        // directory (a test binary carried to another machine runs from the repository copy).
        let built = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let path = if std::path::Path::new(&built).exists() {
            built
        } else {
            format!("tests/fixtures/{name}")
        };
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
        Fixture { bytes }
    }
    pub fn config(&self) -> Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let text = meta.metadata().as_ref().unwrap()["config"].clone();
        serde_json::from_str(&text).unwrap()
    }
    fn raw(&self, name: &str) -> Vec<[u8; 4]> {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture is valid safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        t.data().chunks(4).map(|b| b.try_into().unwrap()).collect()
    }
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name).into_iter().map(f32::from_le_bytes).collect()
    }
    pub fn i32s(&self, name: &str) -> Vec<i32> {
        self.raw(name).into_iter().map(i32::from_le_bytes).collect()
    }
    /// A tensor per parameter, `{prefix}.{name}`, gathered into the flat layout.
    pub fn flat(&self, prefix: &str, layout: &ParamLayout) -> Vec<f32> {
        let mut out = vec![0f32; layout.total];
        for t in &layout.tensors {
            let v = self.f32s(&format!("{prefix}.{}", t.name));
            assert_eq!(v.len(), t.len, "{}", t.name);
            out[t.offset..t.offset + t.len].copy_from_slice(&v);
        }
        out
    }
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite value {x}");
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

/// Cosine similarity of two tensors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-300)
}

/// |a - b| / |b| of two scalars.
pub fn rel(a: f32, b: f32) -> f64 {
    ((a as f64 - b as f64) / b as f64).abs()
}

/// max |a - b| / max |b| over a tensor (relative to the tensor's scale).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale
}

/// A fixture's model, its parameters and the AdamW settings it was stepped with.
pub struct Reference {
    pub fx: Fixture,
    pub cfg: GptConfig,
    pub params: Vec<f32>,
    pub hp: AdamWConfig,
    pub lr: f32,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let fx = Fixture::open(name);
        let c = fx.config();
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let f = |k: &str| c[k].as_f64().unwrap() as f32;
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
        let params = fx.flat("param", &ParamLayout::new(&cfg));
        let hp = AdamWConfig {
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
            grad_clip: f("grad_clip"),
        };
        Reference {
            fx,
            cfg,
            params,
            hp,
            lr: f("lr"),
        }
    }
}

/// Relative-error bounds of one engine against the float64 reference.
pub struct Tolerances {
    pub logits: f64,
    /// Gradients, gradient norms, losses after each step and the final weights.
    pub grads: f64,
}

/// Runs `eng` (built from `r.params`) through the fixture and checks everything it records.
pub fn check_engine(name: &str, r: &Reference, eng: &mut dyn Engine, tol: &Tolerances) {
    let (fx, cfg) = (&r.fx, &r.cfg);
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

    let e = rel_err(&eng.logits(batch).unwrap(), &fx.f32s("logits"));
    assert!(e < tol.logits, "{name}: logits relative error {e:.2e}");

    eng.zero_grad();
    let loss = eng.forward_backward(batch, 1.0).unwrap();
    let want = fx.f32s("loss")[0];
    assert!(
        (loss - want).abs() < 1e-5 * want.abs(),
        "{name}: loss {loss} vs {want}"
    );
    let grads = eng.grads();
    let layout = eng.layout().clone();
    let want_grads = fx.flat("grad", &layout);
    let mut worst = (0f64, String::new());
    for tspec in &layout.tensors {
        let r = tspec.offset..tspec.offset + tspec.len;
        let e = rel_err(&grads[r.clone()], &want_grads[r]);
        assert!(
            e < tol.grads,
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
    let rel = tol.grads as f32;
    let mut clipped = 0;
    for k in 0..norms.len() {
        eng.zero_grad();
        eng.forward_backward(batch, 1.0).unwrap();
        let norm = eng.step(&r.hp, r.lr);
        assert!(
            (norm - norms[k]).abs() < rel * norms[k],
            "{name}: step {k} grad norm {norm} vs {}",
            norms[k]
        );
        if norm > r.hp.grad_clip {
            clipped += 1;
        }
        let l = eng.loss(batch).unwrap();
        assert!(
            (l - losses[k]).abs() < rel * losses[k],
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
            e < tol.grads,
            "{name}: {tname} after 10 steps, relative error {e:.2e}"
        );
    }
    assert_eq!(eng.optimizer_state().step, norms.len() as u64);
}
