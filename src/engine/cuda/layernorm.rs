//! The CUDA engine's LayerNorm launches (`kernels/layernorm.cu`): the forward alone or
//! fused with the residual add before it, the backward (one pass, or two kernels where C is
//! too wide), and the recomputation of a LayerNorm output from its saved statistics.

use super::acts::{LN_BWD_MAX_C, LN_BWD_ROWS};
use super::kernels::{grid_cols4, grid_rows, grid_vec, Arg};
use super::products::LnOut;
use super::{at, CResult, CudaEngine, GradWrite};

/// A LayerNorm's destination: output, mean, rstd, and the offsets of its weight and bias.
pub(super) type LnTarget = (LnOut, u64, u64, usize, Option<usize>);

impl CudaEngine {
    /// After a block's projection product (written as `forward::residual_branch` says): `res +=
    /// stream` unless the product `added` it, then the LayerNorm `ln` of `res` (one
    /// kernel for both with `fused_ln`).
    pub(super) fn residual_then_layernorm(
        &self,
        added: bool,
        res: u64,
        stream: u64,
        (out, mean, rstd, w, bias): LnTarget,
        rows: usize,
    ) -> CResult<()> {
        if added {
            self.layernorm_fwd(out, mean, rstd, res, w, bias, rows)
        } else {
            self.residual_layernorm_fwd(res, res, stream, out, mean, rstd, w, bias, rows)
        }
    }

    /// res = a + b (res may be a or b), then LayerNorm(res) into out, mean, rstd.
    /// With the `fused_ln` switch one kernel does both; otherwise the residual add and
    /// [`CudaEngine::layernorm_fwd`] (same arithmetic, same result).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn residual_layernorm_fwd(
        &self,
        res: u64,
        a: u64,
        b: u64,
        out: LnOut,
        mean: u64,
        rstd: u64,
        w: usize,
        bias: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        if !self.switches().fused_ln {
            if res == a {
                self.add(res, b, rows * c)?;
            } else {
                assert_eq!(res, b, "the residual sum overwrites one of its terms");
                self.add(res, a, rows * c)?;
            }
            return self.layernorm_fwd(out, mean, rstd, res, w, bias, rows);
        }
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.residual_layernorm_forward,
            grid_rows(rows),
            &[
                Arg::Ptr(res),
                out_f32,
                out_bf16,
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(a),
                Arg::Ptr(b),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(bias)),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn layernorm_fwd(
        &self,
        out: LnOut,
        mean: u64,
        rstd: u64,
        x: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.layernorm_forward,
            grid_rows(rows),
            &[
                out_f32,
                out_bf16,
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(x),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(b)),
                Arg::I32(rows as i32),
                Arg::I32(self.cfg.n_embd as i32),
            ],
        )
    }

    /// dx += LayerNorm input gradient; dW, db += weight and bias gradients (or `=`, with
    /// `write` [`GradWrite::Overwrite`]). `dout`, the output's gradient, is fp32 or bf16
    /// ([`Bf16Storage::dln`](super::Bf16Storage::dln)).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layernorm_bwd(
        &self,
        dx: u64,
        dx_bf16: u64,
        dout: LnOut,
        x: u64,
        mean: u64,
        rstd: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
        scratch: u64,
        write: GradWrite,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        let [dout, dout_bf16] = dout.args();
        let (dx_args, stats) = (
            [Arg::Ptr(dx), Arg::Ptr(dx_bf16)],
            [
                dout,
                dout_bf16,
                Arg::Ptr(x),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        );
        let np = if self.switches.fused_ln && c <= LN_BWD_MAX_C {
            // One pass: dx and the partial sums of the weight and bias gradients.
            let np = rows.div_ceil(LN_BWD_ROWS);
            let mut args = dx_args.to_vec();
            args.push(Arg::Ptr(scratch));
            args.extend(stats);
            self.run(self.k.layernorm_backward, (np as u32, 1, 1), &args)?;
            np
        } else {
            let mut args = dx_args.to_vec();
            args.extend(stats);
            self.run(self.k.layernorm_backward_dx, grid_rows(rows), &args)?;
            let (np, rpp) = Self::parts(rows);
            self.run(
                self.k.layernorm_backward_parts,
                (grid_cols4(c), np as u32, 1),
                &[
                    Arg::Ptr(scratch),
                    dout,
                    dout_bf16,
                    Arg::Ptr(x),
                    Arg::Ptr(mean),
                    Arg::Ptr(rstd),
                    Arg::I32(rows as i32),
                    Arg::I32(c as i32),
                    Arg::I32(rpp as i32),
                ],
            )?;
            np
        };
        // The parts hold the weight's sums, then the bias's: one reduction when the bias
        // follows the weight in the layout (as it does in GPT-2's), else one each.
        let targets = match b {
            Some(bo) if bo == w + c => vec![(w, 0, 2 * c)],
            Some(bo) => vec![(w, 0, c), (bo, c, c)],
            None => vec![(w, 0, c)],
        };
        for (dst, from, cols) in targets {
            self.run(
                self.k.reduce_parts_add,
                grid_vec(cols),
                &[
                    Arg::Ptr(self.g(dst)),
                    Arg::Ptr(at(scratch, from)),
                    Arg::I32(np as i32),
                    Arg::I32(cols as i32),
                    Arg::I32(2 * c as i32),
                    write.accumulate(),
                ],
            )?;
        }
        Ok(())
    }

    /// The recomputation of ln1 / ln2 (`recompute=2`): `out` (rows, C) from the LayerNorm
    /// input `x` and the forward's saved `mean` and `rstd`, the same bits as the forward.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layernorm_recompute(
        &self,
        out: LnOut,
        x: u64,
        mean: u64,
        rstd: u64,
        w: usize,
        b: Option<usize>,
        rows: usize,
    ) -> CResult<()> {
        let c = self.cfg.n_embd;
        let [out_f32, out_bf16] = out.args();
        self.run(
            self.k.layernorm_recompute,
            grid_vec(rows * c),
            &[
                out_f32,
                out_bf16,
                Arg::Ptr(x),
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(self.p(w)),
                Arg::Ptr(self.p_opt(b)),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
            ],
        )
    }
}
