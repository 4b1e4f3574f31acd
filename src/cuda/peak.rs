//! Dense bf16 peak FLOP/s of known GPUs (tensor cores, fp32 accumulation, no sparsity),
//! matched by the device name the driver reports; used for MFU.

/// A GPU the table knows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// The model as it is usually written (`H100 SXM`).
    pub model: &'static str,
    /// Dense bf16 TFLOP/s.
    pub bf16_tflops: f64,
}

impl Peak {
    pub fn flops(&self) -> f64 {
        self.bf16_tflops * 1e12
    }
}

/// The peak for a device named `name` (as `cuDeviceGetName` gives it, e.g.
/// `NVIDIA H100 80GB HBM3`), or `None` when the model is not in the table: then pass
/// `--peak_flops` to get an MFU.
pub fn bf16_peak(name: &str) -> Option<Peak> {
    let upper = name.to_ascii_uppercase();
    let tokens: Vec<&str> = upper
        .split(|c: char| c.is_whitespace() || c == '-')
        .filter(|t| !t.is_empty())
        .collect();
    let has = |t: &str| tokens.contains(&t);
    let peak = |model, bf16_tflops| Some(Peak { model, bf16_tflops });
    if has("H200") {
        return peak("H200", 989.0);
    }
    if has("H100") {
        if has("PCIE") {
            return peak("H100 PCIe", 756.0);
        }
        if has("HBM3") || has("SXM") || has("SXM5") || upper.contains("SXM") {
            return peak("H100 SXM", 989.0);
        }
        return None;
    }
    if has("A100") {
        return peak("A100", 312.0);
    }
    if has("L4") {
        return peak("L4", 121.0);
    }
    if has("RTX") && has("4090") {
        return peak("RTX 4090", 165.0);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_driver_names() {
        let t = |n: &str| bf16_peak(n).map(|p| p.bf16_tflops);
        assert_eq!(t("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(t("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(t("NVIDIA H200"), Some(989.0));
        assert_eq!(t("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(t("NVIDIA A100-PCIE-40GB"), Some(312.0));
        assert_eq!(t("NVIDIA L4"), Some(121.0));
        assert_eq!(t("NVIDIA GeForce RTX 4090"), Some(165.0));
        // Similar names that are other GPUs stay unknown rather than guessed.
        assert_eq!(t("NVIDIA L40S"), None);
        assert_eq!(t("NVIDIA H100 NVL"), None);
        assert_eq!(t("NVIDIA GeForce RTX 3090"), None);
        assert_eq!(bf16_peak("NVIDIA H100 80GB HBM3").unwrap().flops(), 989e12);
    }
}
