//! The fused attention kernels (kernels/flash_attention.cu through
//! `engine::cuda::flash`) against a float64 causal attention computed here, forward
//! (y and the per-row logsumexp) and backward (dq, dk, dv), for several shapes; and against
//! the engine's plain attention (cuBLAS GEMMs + the masked-softmax kernels, rebuilt here
//! from the same public pieces the engine uses); the bf16 kernels both with their base-2
//! exponentials and with the accurate expf (`flash_exp2` off), each against float64 and
//! against the other. An `--ignored` test prints kernel times.
//!
//! Tolerances (errors are max |a - b| / max |b| per tensor): the fp32 kernels sum at most
//! T + hs products per output in fp32 (unit roundoff 6e-8), in a different order from the
//! reference; errors stay near 1e-6 of scale for T = 1024, so 1e-4 has two orders of
//! magnitude of headroom while any masking, indexing or softmax mistake is O(1). The bf16
//! forward rounds q, k, v and P to bf16 (relative 2^-9 = 2e-3 per element); the rounding
//! errors of a dot of hs terms partly cancel, giving ~3e-3 of scale, so it gets 2e-2. The
//! bf16 backward (from the bf16 forward's y and lse) rounds q, k, v, dy and, as product
//! operands, P and dS: the CPU emulator (tools/flash_emulate) measures at most 7.9e-3 of
//! scale against float64 and against the fp32 kernels over 18 shapes, so it gets 2e-2 as
//! well. At T = 1, dq and dk are exactly 0 and bf16 leaves rounding noise there (dP = dy . v
//! and D = dy . y round differently), so errors at T = 1 are relative to the largest of
//! dq, dk and dv.
//!
//! Without a GPU every test prints "skipped: no GPU (why)" and passes; NANOGPT_REQUIRE_GPU=1
//! makes that a failure.

use nanogpt::cuda::bf16::{bf16_bits_to_f32, f32_to_bf16_bits};
use nanogpt::cuda::cublas::{Operand, Sgemm};
use nanogpt::cuda::driver::{Context, CuFunction, DeviceBuffer, Stream};
use nanogpt::cuda::nvrtc::Target;
use nanogpt::engine::cuda::flash::{self, AttnShape, FlashIo, FlashMath};
use nanogpt::engine::cuda::kernels::{self, grid_rows, Arg, Kernels, OnDemand};
use nanogpt::engine::cuda::profile;
use nanogpt::engine::cuda::stack;
use nanogpt::rng::Rng;

const TOL_F32: f64 = 1e-4;
const TOL_BF16: f64 = 2e-2;
/// The bf16 kernels with the accurate expf (`flash_exp2` off) against their base-2 forms.
/// The two compute each probability within a few units in the last place of fp32 of each
/// other (ex2.approx's ~2^-22, and the change of base's one rounding); what can move an
/// output more is such a difference flipping P's rounding to bf16 for the next product,
/// one value in ~10^4 by 2^-8 of itself. The emulated GPU (exact exp2) measures a worst
/// 4.7e-5 of scale over the shapes here; 2e-3 leaves 40x for the hardware's ex2 and stays
/// below the bf16 kernels' own error against float64 (2e-3 to 7e-3), while a base mixed
/// up between the running max and the exponentials is O(1).
const TOL_BASES: f64 = 2e-3;

/// Context, stream and kernels (fields drop in this order: kernels and stream before the
/// context).
struct Gpu {
    k: Kernels,
    target: Target,
    stream: Stream<'static>,
    ctx: Context<'static>,
}

/// GPU 0's context, stream and kernels when a GPU is usable (see `stack::gpus_for_test`).
fn gpu(test: &str) -> Option<Gpu> {
    let info = &stack::gpus_for_test(test)?[0];
    let s = stack::stack().expect("a usable GPU implies a loaded CUDA stack");
    let ctx = s.driver.context(0).expect("context on GPU 0");
    let stream = ctx.stream().expect("stream");
    let (ma, mi) = info.compute_capability;
    let target = kernels::target_for(s, ma * 10 + mi).expect("NVRTC target");
    let k = Kernels::load(s, &ctx, target, OnDemand::ALL).expect("kernels compile and load");
    Some(Gpu {
        k,
        target,
        stream,
        ctx,
    })
}

impl Gpu {
    /// Another copy of the kernels (from the compile cache), to repoint entry points in.
    fn kernels(&self) -> Kernels {
        let s = stack::stack().expect("loaded above");
        Kernels::load(s, &self.ctx, self.target, OnDemand::ALL).expect("kernels load")
    }
    fn upload(&self, data: &[f32]) -> DeviceBuffer<'static> {
        self.ctx.upload(data).expect("upload")
    }
    /// A buffer of `n` NaNs: anything a kernel fails to write shows up in the comparison.
    fn nans(&self, n: usize) -> DeviceBuffer<'static> {
        self.upload(&vec![f32::NAN; n])
    }
    fn download(&self, buf: &DeviceBuffer, n: usize) -> Vec<f32> {
        self.stream.synchronize().expect("kernels ran");
        let mut out = vec![0f32; n];
        buf.copy_to_host(&mut out).expect("download");
        out
    }
    /// bf16 values (their bits).
    fn upload_bf16(&self, bits: &[u16]) -> DeviceBuffer<'static> {
        self.ctx.upload(bits).expect("upload")
    }
    fn download_bf16(&self, buf: &DeviceBuffer, n: usize) -> Vec<u16> {
        self.stream.synchronize().expect("kernels ran");
        let mut out = vec![0u16; n];
        buf.copy_to_host(&mut out).expect("download");
        out
    }
}

/// max |got - want| / max |want|; infinite when `got` holds a NaN.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    rel_err_floor(got, want, 0.0)
}

/// [`rel_err`] with the denominator at least `floor`.
fn rel_err_floor(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, floor);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num = num.max((g as f64 - w).abs());
        den = den.max(w.abs());
    }
    num / den.max(1e-30)
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// float64 causal attention: (y, lse, dqkv) for qkv (B*T, 3C) and dy (B*T, C).
fn reference(s: &AttnShape, qkv: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (t, c, nh, hs) = (s.t, s.c, s.nh, s.hs());
    let c3 = 3 * c;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut y = vec![0f64; s.b * t * c];
    let mut lse = vec![0f64; s.rows()];
    let mut dqkv = vec![0f64; s.b * t * c3];
    for b in 0..s.b {
        for h in 0..nh {
            let at = |row: usize, part: usize, d: usize| {
                qkv[(b * t + row) * c3 + part * c + h * hs + d] as f64
            };
            let g = |row: usize, d: usize| dy[(b * t + row) * c + h * hs + d] as f64;
            for i in 0..t {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| (0..hs).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() * scale)
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                lse[(b * nh + h) * t + i] = mx + sum.ln();
                let p: Vec<f64> = sc.iter().map(|v| (v - mx).exp() / sum).collect();
                for d in 0..hs {
                    y[(b * t + i) * c + h * hs + d] = (0..=i).map(|j| p[j] * at(j, 2, d)).sum();
                }
                // dP = dy v^T, D = sum_j P dP, dS = P (dP - D).
                let dp: Vec<f64> = (0..=i)
                    .map(|j| (0..hs).map(|d| g(i, d) * at(j, 2, d)).sum())
                    .collect();
                let dd: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - dd) * scale;
                    for d in 0..hs {
                        dqkv[(b * t + i) * c3 + h * hs + d] += ds * at(j, 1, d);
                        dqkv[(b * t + j) * c3 + c + h * hs + d] += ds * at(i, 0, d);
                        dqkv[(b * t + j) * c3 + 2 * c + h * hs + d] += p[j] * g(i, d);
                    }
                }
            }
        }
    }
    (y, lse, dqkv)
}

/// Part `part` (0 = q, 1 = k, 2 = v) of each (3C)-wide row.
fn third<T: Copy>(v: &[T], c: usize, part: usize) -> Vec<T> {
    v.chunks(3 * c)
        .flat_map(|r| r[part * c..(part + 1) * c].to_vec())
        .collect()
}

/// (B, T, NH, hs) of the shapes checked: T not a multiple of any tile, T = 1, head sizes
/// 16 to 128 (40 is not a multiple of 16: fp32 only).
const SHAPES: [(usize, usize, usize, usize); 8] = [
    (1, 1, 1, 16),
    (2, 7, 2, 16),
    (1, 64, 2, 64),
    (2, 100, 3, 64),
    (1, 100, 2, 128),
    (1, 37, 2, 40),
    (1, 1024, 1, 64),
    (1, 200, 1, 128),
];

#[test]
fn flash_attention_matches_float64_attention() {
    let Some(g) = gpu("flash_attention_matches_float64_attention") else {
        return;
    };
    let mut rng = Rng::new(11);
    // The bf16 kernels' forms with the accurate expf (the `flash_exp2` switch off).
    let mut accurate = g.kernels();
    accurate
        .use_accurate_exponentials()
        .expect("loaded with OnDemand::ALL");
    // How far apart the two bases' outputs are (worst over the shapes) and how many
    // values differ at all (the switch must select other kernels).
    let (mut base_gap, mut base_differ) = (0f64, 0usize);
    for (b, t, nh, hs) in SHAPES {
        let s = AttnShape {
            b,
            t,
            c: nh * hs,
            nh,
        };
        let n = b * t;
        let qkv = randn(&mut rng, n * 3 * s.c);
        let dy = randn(&mut rng, n * s.c);
        let (y_ref, lse_ref, dqkv_ref) = reference(&s, &qkv, &dy);
        let d_qkv = g.upload(&qkv);
        let d_dy = g.upload(&dy);
        let forms: &[(FlashMath, &Kernels, &str)] = if hs.is_multiple_of(16) {
            &[
                (FlashMath::F32, &g.k, "fp32"),
                (FlashMath::Bf16, &g.k, "bf16"),
                (FlashMath::Bf16, &accurate, "bf16 expf"),
            ]
        } else {
            &[(FlashMath::F32, &g.k, "fp32")]
        };
        let mut fp32_dqkv = Vec::new();
        let mut base2 = None;
        for &(math, k, form) in forms {
            let tol = if math == FlashMath::F32 {
                TOL_F32
            } else {
                TOL_BF16
            };
            let d_y = g.nans(n * s.c);
            let d_lse = g.nans(s.rows());
            // SAFETY: buffers sized for `s` as flash.rs documents, all in g's context.
            unsafe {
                flash::flash_forward(
                    &g.stream,
                    k,
                    math,
                    FlashIo::F32,
                    d_qkv.ptr,
                    d_y.ptr,
                    d_lse.ptr,
                    s,
                )
            }
            .expect("forward launch");
            let y = g.download(&d_y, n * s.c);
            let lse = g.download(&d_lse, s.rows());
            let (ey, el) = (rel_err(&y, &y_ref), rel_err(&lse, &lse_ref));
            eprintln!("{s:?} {form} forward: y {ey:.2e}, lse {el:.2e}");
            assert!(
                ey < tol,
                "{s:?} {form}: y relative error {ey:.2e} (tolerance {tol:.0e})"
            );
            assert!(
                el < tol,
                "{s:?} {form}: lse relative error {el:.2e} (tolerance {tol:.0e})"
            );
            let d_dvec = g.nans(s.rows());
            let d_dqkv = g.nans(n * 3 * s.c);
            // SAFETY: as above; lse and y come from the forward with the same math.
            unsafe {
                flash::flash_backward(
                    &g.stream,
                    k,
                    math,
                    FlashIo::F32,
                    d_qkv.ptr,
                    d_y.ptr,
                    d_lse.ptr,
                    d_dy.ptr,
                    d_dvec.ptr,
                    d_dqkv.ptr,
                    0,
                    s,
                )
            }
            .expect("backward launch");
            let dqkv = g.download(&d_dqkv, n * 3 * s.c);
            // At T = 1 dq and dk are exactly 0: errors relative to the largest gradient.
            let floor = if t == 1 {
                dqkv_ref.iter().fold(0f64, |m, v| m.max(v.abs()))
            } else {
                0.0
            };
            for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let want = third(&dqkv_ref, s.c, part);
                let e = rel_err_floor(&third(&dqkv, s.c, part), &want, floor);
                eprintln!("{s:?} {form} backward: {name} {e:.2e}");
                assert!(
                    e < tol,
                    "{s:?} {form}: {name} relative error {e:.2e} (tolerance {tol:.0e})"
                );
            }
            if math == FlashMath::F32 {
                fp32_dqkv = dqkv;
                continue;
            }
            // The accurate expf against base 2: each within rounding of the other.
            match &base2 {
                None => base2 = Some((y.clone(), lse.clone(), dqkv.clone())),
                Some((y2, lse2, dqkv2)) => {
                    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                    for (name, got, want) in
                        [("y", &y, y2), ("lse", &lse, lse2), ("dqkv", &dqkv, dqkv2)]
                    {
                        let e = rel_err(got, &wide(want));
                        eprintln!("{s:?} expf vs base 2: {name} {e:.2e}");
                        assert!(
                            e < TOL_BASES,
                            "{s:?}: expf vs base-2 {name} relative error {e:.2e} (tolerance \
                             {TOL_BASES:.0e})"
                        );
                        base_gap = base_gap.max(e);
                        base_differ += differing(got, want, f32::to_bits);
                    }
                }
            }
            // The bf16 backward against the fp32 one on the same inputs.
            for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let want: Vec<f64> = third(&fp32_dqkv, s.c, part)
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let e = rel_err_floor(&third(&dqkv, s.c, part), &want, floor);
                eprintln!("{s:?} {form} vs fp32 backward: {name} {e:.2e}");
                assert!(
                    e < TOL_BF16,
                    "{s:?}: {form} vs fp32 backward {name} relative error {e:.2e} (tolerance \
                     {TOL_BF16:.0e})"
                );
            }
        }
    }
    eprintln!("expf vs base 2: worst {base_gap:.2e}, {base_differ} values differ");
    assert!(
        base_differ > 0,
        "the accurate-expf kernels gave every bit of the base-2 ones: the switch selects nothing"
    );
}

/// The exact f32 values of bf16 bits.
fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16_bits_to_f32(b)).collect()
}

/// How many elements differ in their bits.
fn differing<T: Copy, U: PartialEq>(a: &[T], b: &[T], bits: impl Fn(T) -> U) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(&x, &y)| bits(x) != bits(y))
        .count()
}

/// bf16 storage ([`FlashIo::Bf16`]: qkv, y, dy and the gradient in bf16, the bf16 mode's
/// attention storage) against fp32 storage with the bf16 kernels, on inputs that already
/// hold bf16 values: both run the same arithmetic on the same bf16 operands, so they must
/// agree bit for bit. The forward's y is the fp32-storage y rounded to bf16 and its lse the
/// same; the backward (D from the bf16 y and dy, then dq, dk, dv in bf16) is the
/// fp32-storage backward's bf16 gradient given the bf16 forward's y widened and its lse.
/// Bf16 storage with the fp32 kernels is an error.
#[test]
fn flash_attention_bf16_storage_matches_fp32_storage() {
    let Some(g) = gpu("flash_attention_bf16_storage_matches_fp32_storage") else {
        return;
    };
    let mut rng = Rng::new(13);
    for (b, t, nh, hs) in SHAPES {
        if !hs.is_multiple_of(16) {
            continue;
        }
        let s = AttnShape {
            b,
            t,
            c: nh * hs,
            nh,
        };
        let n = b * t;
        let to_bf16 =
            |v: Vec<f32>| -> Vec<u16> { v.iter().map(|&x| f32_to_bf16_bits(x)).collect() };
        let qkv = to_bf16(randn(&mut rng, n * 3 * s.c));
        let dy = to_bf16(randn(&mut rng, n * s.c));
        let (d_qkv16, d_dy16) = (g.upload_bf16(&qkv), g.upload_bf16(&dy));
        let (d_qkv, d_dy) = (g.upload(&widen(&qkv)), g.upload(&widen(&dy)));
        let math = FlashMath::Bf16;

        // Forward: bf16 storage (y filled with NaN bits) and fp32 storage.
        let d_y16 = g.upload_bf16(&vec![0xffff; n * s.c]);
        let (d_lse16, d_y, d_lse) = (g.nans(s.rows()), g.nans(n * s.c), g.nans(s.rows()));
        // SAFETY: buffers sized for `s` (bf16 ones in bf16 values), all in g's context.
        unsafe {
            flash::flash_forward(
                &g.stream,
                &g.k,
                math,
                FlashIo::Bf16,
                d_qkv16.ptr,
                d_y16.ptr,
                d_lse16.ptr,
                s,
            )
            .expect("bf16-storage forward launch");
            flash::flash_forward(
                &g.stream,
                &g.k,
                math,
                FlashIo::F32,
                d_qkv.ptr,
                d_y.ptr,
                d_lse.ptr,
                s,
            )
            .expect("fp32-storage forward launch");
        }
        let y16 = g.download_bf16(&d_y16, n * s.c);
        let lse16 = g.download(&d_lse16, s.rows());
        let (y, lse) = (g.download(&d_y, n * s.c), g.download(&d_lse, s.rows()));
        assert!(
            y.iter().chain(&lse).chain(&lse16).all(|v| v.is_finite()),
            "{s:?}: forward output not finite (unwritten?)"
        );
        let rounded: Vec<u16> = y.iter().map(|&v| f32_to_bf16_bits(v)).collect();
        let ey = differing(&y16, &rounded, |v| v);
        let el = differing(&lse16, &lse, f32::to_bits);
        eprintln!(
            "{s:?} bf16 storage forward: y {ey} / {} differ, lse {el} / {} differ",
            y.len(),
            lse.len()
        );
        assert_eq!(
            ey, 0,
            "{s:?}: bf16-storage y is not the fp32-storage y rounded"
        );
        assert_eq!(
            el, 0,
            "{s:?}: bf16-storage lse differs from the fp32-storage lse"
        );

        // Backward: bf16 storage, and fp32 storage writing a bf16 gradient from the bf16
        // forward's y (widened) and lse. Different fills: an element neither writes differs.
        let d_yw = g.upload(&widen(&y16));
        let (d_dvec16, d_dvec) = (g.nans(s.rows()), g.nans(s.rows()));
        let d_dqkv16 = g.upload_bf16(&vec![0xffff; n * 3 * s.c]);
        let d_dqkv_ref = g.upload_bf16(&vec![0xfffe; n * 3 * s.c]);
        // SAFETY: as above; both backward passes read the bf16-storage forward's lse.
        unsafe {
            flash::flash_backward(
                &g.stream,
                &g.k,
                math,
                FlashIo::Bf16,
                d_qkv16.ptr,
                d_y16.ptr,
                d_lse16.ptr,
                d_dy16.ptr,
                d_dvec16.ptr,
                0,
                d_dqkv16.ptr,
                s,
            )
            .expect("bf16-storage backward launch");
            flash::flash_backward(
                &g.stream,
                &g.k,
                math,
                FlashIo::F32,
                d_qkv.ptr,
                d_yw.ptr,
                d_lse16.ptr,
                d_dy.ptr,
                d_dvec.ptr,
                0,
                d_dqkv_ref.ptr,
                s,
            )
            .expect("fp32-storage backward launch");
        }
        let (dvec16, dvec) = (
            g.download(&d_dvec16, s.rows()),
            g.download(&d_dvec, s.rows()),
        );
        assert!(
            dvec16.iter().all(|v| v.is_finite()),
            "{s:?}: D not finite (unwritten?)"
        );
        let ed = differing(&dvec16, &dvec, f32::to_bits);
        eprintln!("{s:?} bf16 storage D: {ed} / {} differ", dvec.len());
        assert_eq!(
            ed, 0,
            "{s:?}: D from bf16 y and dy differs from D from them widened"
        );
        let dqkv16 = g.download_bf16(&d_dqkv16, n * 3 * s.c);
        let dqkv_ref = g.download_bf16(&d_dqkv_ref, n * 3 * s.c);
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let (got, want) = (third(&dqkv16, s.c, part), third(&dqkv_ref, s.c, part));
            let e = differing(&got, &want, |v| v);
            eprintln!(
                "{s:?} bf16 storage backward: {name} {e} / {} differ",
                got.len()
            );
            assert_eq!(
                e, 0,
                "{s:?}: bf16-storage {name} differs from the fp32-storage bf16 {name}"
            );
        }
    }

    // Bf16 storage with the fp32 kernels: an error from both entry points, not a panic.
    let s = AttnShape {
        b: 1,
        t: 4,
        c: 32,
        nh: 2,
    };
    let qkv = g.upload_bf16(&vec![0; 4 * 3 * s.c]);
    let dy = g.upload_bf16(&vec![0; 4 * s.c]);
    let y = g.upload_bf16(&vec![0; 4 * s.c]);
    let dqkv = g.upload_bf16(&vec![0; 4 * 3 * s.c]);
    let (lse, dvec) = (g.nans(s.rows()), g.nans(s.rows()));
    // SAFETY: buffers sized for `s`; nothing is launched (the calls are refused).
    let fwd = unsafe {
        flash::flash_forward(
            &g.stream,
            &g.k,
            FlashMath::F32,
            FlashIo::Bf16,
            qkv.ptr,
            y.ptr,
            lse.ptr,
            s,
        )
    };
    assert!(
        fwd.is_err(),
        "forward: bf16 storage with the fp32 kernels was accepted"
    );
    // SAFETY: as above.
    let bwd = unsafe {
        flash::flash_backward(
            &g.stream,
            &g.k,
            FlashMath::F32,
            FlashIo::Bf16,
            qkv.ptr,
            y.ptr,
            lse.ptr,
            dy.ptr,
            dvec.ptr,
            0,
            dqkv.ptr,
            s,
        )
    };
    assert!(
        bwd.is_err(),
        "backward: bf16 storage with the fp32 kernels was accepted"
    );
}

/// The engine's plain attention (see `CudaEngine::attention_fwd` / `attention_bwd`, no
/// dropout), rebuilt from the same cuBLAS GEMMs and softmax kernels.
struct Plain<'a> {
    g: &'a Gpu,
    blas: Sgemm,
    s: AttnShape,
    att: DeviceBuffer<'static>,
    datt: DeviceBuffer<'static>,
}

fn at(ptr: u64, elems: usize) -> u64 {
    ptr + 4 * elems as u64
}

impl<'a> Plain<'a> {
    fn new(g: &'a Gpu, s: AttnShape) -> Plain<'a> {
        let st = stack::stack().expect("stack");
        let blas = Sgemm::new(&st.cublas, &g.stream).expect("cuBLAS");
        let tt = s.b * s.nh * s.t * s.t;
        let att = g.ctx.alloc(4 * tt).expect("att");
        let datt = g.ctx.alloc(4 * tt).expect("datt");
        Plain {
            g,
            blas,
            s,
            att,
            datt,
        }
    }

    /// `batch` products C (m x n) = A (m x k) B (k x n) (see `Sgemm::gemm`).
    fn gemm(&self, mnk: (usize, usize, usize), a: Operand, b: Operand, c: Operand, batch: usize) {
        let (m, n, k) = mnk;
        self.blas
            .gemm(m, n, k, 1.0, a, b, 0.0, c, batch)
            .expect("gemm");
    }

    /// Launches the causal-softmax kernel `f` over the B * NH * T rows of T, with the
    /// pointers `bufs` before the rows, T and the scale 1/sqrt(hs).
    fn softmax(&self, f: CuFunction, bufs: &[u64], what: &str) {
        let AttnShape { b, t, c, nh } = self.s;
        let rows = b * nh * t;
        let scale = 1.0 / ((c / nh) as f32).sqrt();
        let mut args: Vec<Arg> = bufs.iter().map(|&p| Arg::Ptr(p)).collect();
        args.extend([Arg::I64(rows as i64), Arg::I32(t as i32), Arg::F32(scale)]);
        // SAFETY: causal_softmax_forward(att, rows, T, scale) or
        // causal_softmax_backward(dp, att, rows, T, scale) over this shape's rows x T buffers.
        unsafe { kernels::launch(&self.g.stream, f, grid_rows(rows), kernels::BLOCK, &args) }
            .expect(what);
    }

    fn forward(&self, qkv: u64, y: u64) {
        let AttnShape { b, t, c, nh } = self.s;
        let (hs, c3) = (c / nh, 3 * c);
        for bi in 0..b {
            let q = at(qkv, bi * t * c3);
            self.gemm(
                (t, t, hs),
                Operand::n(q, c3).batched(hs),
                Operand::t(at(q, c), c3).batched(hs),
                Operand::n(at(self.att.ptr, bi * nh * t * t), t).batched(t * t),
                nh,
            );
        }
        let k = &self.g.k;
        self.softmax(k.causal_softmax_forward, &[self.att.ptr], "softmax");
        for bi in 0..b {
            let q = at(qkv, bi * t * c3);
            self.gemm(
                (t, hs, t),
                Operand::n(at(self.att.ptr, bi * nh * t * t), t).batched(t * t),
                Operand::n(at(q, 2 * c), c3).batched(hs),
                Operand::n(at(y, bi * t * c), c).batched(hs),
                nh,
            );
        }
    }

    fn backward(&self, qkv: u64, dy: u64, dqkv: u64) {
        let AttnShape { b, t, c, nh } = self.s;
        let (hs, c3) = (c / nh, 3 * c);
        for bi in 0..b {
            let q = at(qkv, bi * t * c3);
            let dq = at(dqkv, bi * t * c3);
            let dyb = at(dy, bi * t * c);
            let datt = at(self.datt.ptr, bi * nh * t * t);
            self.gemm(
                (t, t, hs),
                Operand::n(dyb, c).batched(hs),
                Operand::t(at(q, 2 * c), c3).batched(hs),
                Operand::n(datt, t).batched(t * t),
                nh,
            );
            self.gemm(
                (t, hs, t),
                Operand::t(at(self.att.ptr, bi * nh * t * t), t).batched(t * t),
                Operand::n(dyb, c).batched(hs),
                Operand::n(at(dq, 2 * c), c3).batched(hs),
                nh,
            );
        }
        let (k, bufs) = (&self.g.k, [self.datt.ptr, self.att.ptr]);
        self.softmax(k.causal_softmax_backward, &bufs, "softmax backward");
        for bi in 0..b {
            let q = at(qkv, bi * t * c3);
            let dq = at(dqkv, bi * t * c3);
            let datt = at(self.datt.ptr, bi * nh * t * t);
            self.gemm(
                (t, hs, t),
                Operand::n(datt, t).batched(t * t),
                Operand::n(at(q, c), c3).batched(hs),
                Operand::n(dq, c3).batched(hs),
                nh,
            );
            self.gemm(
                (t, hs, t),
                Operand::t(datt, t).batched(t * t),
                Operand::n(q, c3).batched(hs),
                Operand::n(at(dq, c), c3).batched(hs),
                nh,
            );
        }
    }
}

#[test]
fn flash_attention_matches_the_plain_path() {
    let Some(g) = gpu("flash_attention_matches_the_plain_path") else {
        return;
    };
    let mut rng = Rng::new(5);
    for (b, t, nh, hs) in [(2, 100, 3, 64), (1, 33, 2, 128), (2, 70, 2, 32)] {
        let s = AttnShape {
            b,
            t,
            c: nh * hs,
            nh,
        };
        let n = b * t;
        let d_qkv = g.upload(&randn(&mut rng, n * 3 * s.c));
        let d_dy = g.upload(&randn(&mut rng, n * s.c));
        let plain = Plain::new(&g, s);
        let (py, pd) = (g.nans(n * s.c), g.nans(n * 3 * s.c));
        plain.forward(d_qkv.ptr, py.ptr);
        plain.backward(d_qkv.ptr, d_dy.ptr, pd.ptr);
        for (math, tol) in [(FlashMath::F32, TOL_F32), (FlashMath::Bf16, TOL_BF16)] {
            let (fy, flse, fdvec, fd) = (
                g.nans(n * s.c),
                g.nans(s.rows()),
                g.nans(s.rows()),
                g.nans(n * 3 * s.c),
            );
            // SAFETY: buffers sized for `s`.
            unsafe {
                flash::flash_forward(
                    &g.stream,
                    &g.k,
                    math,
                    FlashIo::F32,
                    d_qkv.ptr,
                    fy.ptr,
                    flse.ptr,
                    s,
                )
                .unwrap();
                flash::flash_backward(
                    &g.stream,
                    &g.k,
                    math,
                    FlashIo::F32,
                    d_qkv.ptr,
                    fy.ptr,
                    flse.ptr,
                    d_dy.ptr,
                    fdvec.ptr,
                    fd.ptr,
                    0,
                    s,
                )
                .unwrap();
            }
            let y_want: Vec<f64> = g.download(&py, n * s.c).iter().map(|&v| v as f64).collect();
            let e = rel_err(&g.download(&fy, n * s.c), &y_want);
            eprintln!("{s:?} {math:?} flash vs plain: y {e:.2e}");
            assert!(
                e < tol,
                "{s:?} {math:?}: flash vs plain y relative error {e:.2e}"
            );
            let (fd, pd) = (g.download(&fd, n * 3 * s.c), g.download(&pd, n * 3 * s.c));
            for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let want: Vec<f64> = third(&pd, s.c, part).iter().map(|&v| v as f64).collect();
                let e = rel_err(&third(&fd, s.c, part), &want);
                eprintln!("{s:?} {math:?} flash vs plain: {name} {e:.2e}");
                assert!(
                    e < tol,
                    "{s:?} {math:?}: flash vs plain {name} relative error {e:.2e}"
                );
            }
        }
    }
}

/// Kernel times, GPT-2 small's attention (B=8, T=1024, NH=12, hs=64):
/// `cargo test --release --test cuda_flash -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run with --ignored --nocapture on a GPU machine"]
fn flash_attention_timing() {
    let Some(g) = gpu("flash_attention_timing") else {
        return;
    };
    let s = AttnShape {
        b: 8,
        t: 1024,
        c: 768,
        nh: 12,
    };
    let n = s.b * s.t;
    let mut rng = Rng::new(3);
    let qkv = g.upload(&randn(&mut rng, n * 3 * s.c));
    let dy = g.upload(&randn(&mut rng, n * s.c));
    let (y, lse, dvec, dqkv) = (
        g.nans(n * s.c),
        g.nans(s.rows()),
        g.nans(s.rows()),
        g.nans(n * 3 * s.c),
    );
    let plain = Plain::new(&g, s);
    const REPS: usize = 10;
    let time = |label: &str, f: &dyn Fn()| {
        f(); // warm-up
        let ms = g
            .stream
            .time(|| {
                for _ in 0..REPS {
                    f();
                }
                Ok(())
            })
            .expect("timing")
            / REPS as f64;
        println!("attention {s:?} {label}: {ms:.3} ms");
        ms
    };
    // The same in bf16 storage (the bf16 mode's default).
    let bits = |v: Vec<f32>| v.into_iter().map(f32_to_bf16_bits).collect::<Vec<u16>>();
    let qkv16 = g.upload_bf16(&bits(randn(&mut rng, n * 3 * s.c)));
    let dy16 = g.upload_bf16(&bits(randn(&mut rng, n * s.c)));
    let (y16, dqkv16) = (
        g.upload_bf16(&vec![0; n * s.c]),
        g.upload_bf16(&vec![0; n * 3 * s.c]),
    );
    // SAFETY: buffers sized for `s` in `io`'s storage; the backward reads the y and lse of
    // the forward in the same storage.
    let forward = |k: &Kernels, math, io| unsafe {
        let (qkv, y) = match io {
            FlashIo::F32 => (qkv.ptr, y.ptr),
            FlashIo::Bf16 => (qkv16.ptr, y16.ptr),
        };
        flash::flash_forward(&g.stream, k, math, io, qkv, y, lse.ptr, s).unwrap()
    };
    // SAFETY: as above.
    let backward = |k: &Kernels, math, io| unsafe {
        let (qkv, y, dy, dqkv, dqkv_bf16) = match io {
            FlashIo::F32 => (qkv.ptr, y.ptr, dy.ptr, dqkv.ptr, 0),
            FlashIo::Bf16 => (qkv16.ptr, y16.ptr, dy16.ptr, 0, dqkv16.ptr),
        };
        let d = dvec.ptr;
        flash::flash_backward(
            &g.stream, k, math, io, qkv, y, lse.ptr, dy, d, dqkv, dqkv_bf16, s,
        )
        .unwrap()
    };
    let f32_io = FlashIo::F32;
    let ff = time("flash forward fp32", &|| {
        forward(&g.k, FlashMath::F32, f32_io)
    });
    let fb16 = time("flash forward bf16", &|| {
        forward(&g.k, FlashMath::Bf16, f32_io)
    });
    let fbb16 = time("flash backward bf16", &|| {
        backward(&g.k, FlashMath::Bf16, f32_io)
    });
    forward(&g.k, FlashMath::F32, f32_io);
    let fb = time("flash backward fp32", &|| {
        backward(&g.k, FlashMath::F32, f32_io)
    });
    let pf = time("plain forward", &|| plain.forward(qkv.ptr, y.ptr));
    let pb = time("plain backward", &|| {
        plain.backward(qkv.ptr, dy.ptr, dqkv.ptr)
    });
    println!(
        "attention per layer, forward+backward: flash fp32 {:.3} ms, flash bf16 {:.3} ms, \
         plain {:.3} ms",
        ff + fb,
        fb16 + fbb16,
        pf + pb
    );

    // bf16 storage, per form of the kernels: head size 64 or generic (switch flash_hs64),
    // tiles by cp.async or loaded synchronously (flash_async), exponentials in base 2 or
    // the accurate expf (flash_exp2).
    let work = |backward| {
        profile::flash_work(&s, true, 2, 2, backward)
            .flops
            .expect("attention FLOPs")
    };
    let (fwd_flops, bwd_flops) = (work(false), work(true));
    let bf16 = (FlashMath::Bf16, FlashIo::Bf16);
    for (label, synchronous, generic, accurate) in [
        ("head size 64, cp.async (the default)", false, false, false),
        ("head size 64, cp.async, expf", false, false, true),
        ("head size 64, synchronous loads", true, false, false),
        ("generic, cp.async", false, true, false),
        ("generic, synchronous loads", true, true, false),
    ] {
        let mut k = g.kernels();
        if accurate {
            k.use_accurate_exponentials()
                .expect("loaded with OnDemand::ALL");
        }
        if synchronous {
            k.use_synchronous_attention_loads();
        }
        if generic {
            k.use_generic_attention();
        }
        let f = time(&format!("bf16 storage forward, {label}"), &|| {
            forward(&k, bf16.0, bf16.1)
        });
        let b = time(&format!("bf16 storage backward, {label}"), &|| {
            backward(&k, bf16.0, bf16.1)
        });
        println!(
            "attention bf16 storage, {label}: forward {:.1} TFLOP/s, backward {:.1} TFLOP/s \
             (causal pairs only)",
            fwd_flops / f / 1e9,
            bwd_flops / b / 1e9
        );
    }
}
