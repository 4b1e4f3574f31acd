//! Host references for what the GPU kernels compute, bit for bit: f32 -> bf16 conversion
//! with round-to-nearest-even (the same integer recipe `kernels/doctor.cu` uses) and the
//! 32-lane butterfly (`__shfl_xor_sync`) warp sum.

/// The bf16 bit pattern nearest to `x`, ties to even; NaN stays NaN (sign and top payload
/// bits kept, quiet bit set), overflow rounds to infinity.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x0040) as u16;
    }
    let lsb = (u >> 16) & 1;
    (u.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// The f32 value of bf16 bits `b` (exact).
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// What lane 0 holds after `for o in [16, 8, 4, 2, 1] { v += shfl_xor(v, o) }` over
/// `lanes` (32 values): the exact f32 result of the GPU's reduction order.
pub fn warp_butterfly_sum(lanes: &[f32; 32]) -> f32 {
    let mut v = *lanes;
    let mut offset = 16;
    while offset > 0 {
        let prev = v;
        for (l, x) in v.iter_mut().enumerate() {
            *x = prev[l] + prev[l ^ offset];
        }
        offset >>= 1;
    }
    v[0]
}

/// The expected outputs of the `doctor_selftest` kernel for input `x`: bf16 bits of every
/// element and, per warp of 32 consecutive elements, the butterfly sum of the rounded
/// values (lanes past the end contribute +0.0).
pub fn selftest_reference(x: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = x.iter().map(|&v| f32_to_bf16_bits(v)).collect();
    let sums = bits
        .chunks(32)
        .map(|chunk| {
            let mut lanes = [0.0f32; 32];
            for (l, &b) in chunk.iter().enumerate() {
                lanes[l] = bf16_bits_to_f32(b);
            }
            warp_butterfly_sum(&lanes)
        })
        .collect();
    (bits, sums)
}

/// Same value, NaNs equal to each other (the GPU's NaN payloads differ from the CPU's).
pub fn same_f32(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn conversion_matches_half_crate_and_rounds_ties_to_even() {
        let mut rng = Rng::new(7);
        for _ in 0..200_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            let want = half::bf16::from_f32(x).to_bits();
            assert_eq!(f32_to_bf16_bits(x), want, "x bits {:#010x}", x.to_bits());
        }
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie -> even (up)
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // overflow -> inf
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0); // NaN stays NaN
        assert_eq!(bf16_bits_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn butterfly_sum_is_the_shuffle_order() {
        // Values whose sum depends on the order: the butterfly pairs lane l with l^16 first.
        let mut lanes = [0.0f32; 32];
        lanes[0] = 1.0e8;
        lanes[16] = -1.0e8;
        lanes[1] = 1.0;
        let s = warp_butterfly_sum(&lanes);
        assert_eq!(s, 1.0);
        let seq: f32 = lanes.iter().sum();
        assert_eq!(
            seq, 0.0,
            "sequential order loses the 1.0; the butterfly does not"
        );
        let ones = [1.0f32; 32];
        assert_eq!(warp_butterfly_sum(&ones), 32.0);
    }

    #[test]
    fn reference_pads_the_last_warp_with_zeros() {
        let x: Vec<f32> = (0..40).map(|i| i as f32 * 0.5).collect();
        let (bits, sums) = selftest_reference(&x);
        assert_eq!(bits.len(), 40);
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], (0..32).map(|i| i as f32 * 0.5).sum::<f32>());
        assert_eq!(sums[1], (32..40).map(|i| i as f32 * 0.5).sum::<f32>());
        assert!(same_f32(f32::NAN, -f32::NAN));
        assert!(!same_f32(0.0, -0.0));
    }
}
