//! Fused causal attention (flash-attention style, `kernels/flash_attention.cu`): launch
//! configuration as pure functions (tile sizes, dynamic shared memory, grids) and the two
//! entry points [`flash_forward`] / [`flash_backward`] over the engine's buffers.
//!
//! Buffers (device pointers; fp32, or bf16 with [`FlashIo::Bf16`]): `qkv` (B*T, 3C) =
//! q | k | v with head h in columns h*hs.. of each third; `y` (B*T, C); `lse` (B, NH, T),
//! the per-row logsumexp written by the forward and read by the backward (fp32); `dy`
//! (B*T, C); `dvec` (B, NH, T) fp32 scratch; `dqkv` (B*T, 3C), overwritten. Scale 1/sqrt(hs), causal mask, hs <= 128.
//!
//! Attention dropout is not supported: callers keep the plain path (GEMMs + masked softmax)
//! when attention dropout is active. Forward and backward each have an fp32 SIMT and a bf16
//! tensor-core ([`FlashMath::Bf16`], sm_80+, hs a multiple of 16) variant; a backward must
//! use the `lse` of a forward with the same [`FlashMath`] (each recomputes the scores the
//! way its forward computed them).
//!
//! Every configuration stays within the 48 KiB of dynamic shared memory a launch gets
//! without opting in, so no `cuFuncSetAttribute(f,
//! CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8, bytes)` call is needed (the value 8
//! is the enumerator's in cuda.h's `CUfunction_attribute`; the driver bindings do not load
//! that entry point).

use super::kernels::{Arg, Kernels};
use crate::cuda::driver::{CuFunction, Stream};
use crate::cuda::CudaError;

type CResult<T> = std::result::Result<T, CudaError>;

/// Threads per block of the fp32 kernels (8 warps).
pub const THREADS: u32 = 256;
/// Threads per block of `flash_attn_bwd_dkdv_bf16` (4 warps of 16 key rows).
pub const BF16_KEY_THREADS: u32 = 128;
/// Key rows per block of `flash_attn_bwd_dkdv_bf16`.
pub const BF16_KEY_ROWS: usize = 64;
/// Threads per block of the bf16 forward and of `flash_attn_bwd_dq_bf16` (8 warps of 16
/// query rows: each K and V tile loaded serves 128 query rows).
pub const BF16_QUERY_THREADS: u32 = 256;
/// Query rows per block of the bf16 forward and of `flash_attn_bwd_dq_bf16`.
pub const BF16_QUERY_ROWS: usize = 128;
/// Rows of the tiles the bf16 backward kernels loop over (queries for dk/dv, keys for dq).
pub const BF16_BWD_COLS: usize = 32;
/// Largest head size the kernels handle (4 columns per lane of a warp).
pub const MAX_HEAD_SIZE: usize = 128;
/// The head size the bf16 kernels have a specialised form for (`*_hs64`: register arrays,
/// loops and shared tiles fixed at compile time, the same arithmetic and bits as the
/// generic form): GPT-2's, at every model size. Compiled for sm_90: 127-160 registers per
/// thread against 198-255 for the generic form, and half the shared memory, so more
/// blocks fit on a multiprocessor.
pub const SPECIALISED_HEAD_SIZE: usize = 64;
/// Dynamic shared memory a launch may use without opting in.
pub const SHARED_LIMIT: usize = 48 * 1024;
/// Query rows per block of the fp32 forward.
pub const FWD_ROWS: usize = 32;
/// Tile sizes tried, largest first (multiples of 8, at most 32: see the kernel header).
const TILES: [usize; 3] = [32, 16, 8];

/// Which arithmetic the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashMath {
    /// fp32 SIMT: products and sums in fp32 (matches the plain path to ~1e-6 of scale).
    F32,
    /// bf16 tensor cores (mma.sync m16n8k16) with fp32 accumulation, softmax and dS;
    /// inputs, and P and dS as product operands, are rounded to bf16 (relative error
    /// ~1e-3 to 1e-2).
    Bf16,
}

/// How the attention's tensors (`qkv`, `y`, `dy`, and the gradient `dqkv`) are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashIo {
    /// fp32 (the bf16 kernels round them to bf16 as they load tiles; the bf16 backward may
    /// still write its gradient in bf16, see [`flash_backward`]).
    F32,
    /// All bf16, read and written as they are: the bf16 mode's attention storage
    /// (`flash_attn_*_bf16_io`, `flash_attn_bwd_dot_bf16`; [`FlashMath::Bf16`] only). The
    /// same values as the fp32-storage kernels given inputs that already hold bf16 values,
    /// except `D = y . dy`, which then sums the bf16 y and dy.
    Bf16,
}

impl FlashIo {
    /// Bytes per stored value.
    pub fn value_bytes(self) -> usize {
        match self {
            FlashIo::F32 => 4,
            FlashIo::Bf16 => 2,
        }
    }
}

/// Attention geometry: batch rows, tokens per row, channels, heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub nh: usize,
}

impl AttnShape {
    /// Head size C / NH.
    pub fn hs(&self) -> usize {
        self.c / self.nh.max(1)
    }

    /// Elements of `lse` and `dvec`: B * NH * T.
    pub fn rows(&self) -> usize {
        self.b * self.nh * self.t
    }

    /// Checks that the kernels can run this shape (sizes, head size, grid and index limits).
    pub fn validate(&self, math: FlashMath) -> CResult<()> {
        let bad = |why: String| {
            Err(CudaError::Invalid(format!(
                "flash attention {self:?}: {why}"
            )))
        };
        if self.b == 0 || self.t == 0 || self.c == 0 || self.nh == 0 {
            return bad("every size must be at least 1".into());
        }
        if !self.c.is_multiple_of(self.nh) {
            return bad(format!(
                "n_embd={} is not a multiple of n_head={}",
                self.c, self.nh
            ));
        }
        let hs = self.hs();
        if hs > MAX_HEAD_SIZE {
            return bad(format!(
                "head size {hs} exceeds {MAX_HEAD_SIZE}; use the plain attention path"
            ));
        }
        if math == FlashMath::Bf16 && !hs.is_multiple_of(16) {
            return bad(format!(
                "the bf16 kernel needs a head size that is a multiple of 16 (got {hs}); use FlashMath::F32"
            ));
        }
        // Grid y/z limits (65535) and the kernels' int arguments (T, 3C, rows / 8 blocks).
        if self.nh > 65535 || self.b > 65535 {
            return bad("n_head and the batch size must be at most 65535".into());
        }
        let int_max = i32::MAX as usize;
        if self.t > int_max || 3 * self.c > int_max || self.rows().div_ceil(8) > int_max {
            return bad("too large for 32-bit kernel arguments".into());
        }
        Ok(())
    }
}

/// One kernel launch: grid, threads per block, dynamic shared memory, tile sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
    /// Rows of the tile each block owns (queries for the forward and dq, keys for dk/dv).
    pub tile_rows: usize,
    /// Rows of the tiles each block loops over (0 where unused).
    pub tile_cols: usize,
}

/// Dynamic shared memory of `flash_attn_fwd_f32` (see the kernel header).
pub fn fwd_shared_bytes(br: usize, bc: usize, hs: usize) -> usize {
    4 * (br * (hs + 1) + bc * (hs + 1) + bc * hs + br * (bc + 1) + 3 * br)
}

/// Dynamic shared memory of `flash_attn_bwd_dkdv_f32` (and, rounded up, `_dq_f32`).
pub fn bwd_shared_bytes(bt: usize, hs: usize) -> usize {
    4 * (4 * bt * (hs + 1) + 2 * bt * (bt + 1) + 2 * bt)
}

/// Static shared memory of `flash_attn_bwd_dkdv_bf16` (sized for hs = 128; see the kernel
/// header): the staging of the block's K and V rows (bf16), which the loop's two buffers of
/// Q and dY tiles reuse (every tile row-major: the kernels read transposed operands with
/// ldmatrix.trans), then lse and D of each buffer's queries (fp32).
pub const BF16_DKDV_SHARED: usize =
    2 * 2 * BF16_KEY_ROWS * (MAX_HEAD_SIZE + 8) + 2 * 4 * 2 * BF16_BWD_COLS;

/// Static shared memory of `flash_attn_bwd_dq_bf16`: the staging of the block's Q rows, then
/// its dY rows (bf16), which the loop's two buffers of K and V tiles reuse.
pub const BF16_DQ_SHARED: usize = 2 * BF16_QUERY_ROWS * (MAX_HEAD_SIZE + 8);

fn grid_tiles(shape: &AttnShape, rows: usize) -> (u32, u32, u32) {
    (
        shape.t.div_ceil(rows) as u32,
        shape.nh as u32,
        shape.b as u32,
    )
}

/// The forward launch for `shape`.
pub fn forward_config(shape: &AttnShape, math: FlashMath) -> CResult<LaunchConfig> {
    shape.validate(math)?;
    let hs = shape.hs();
    match math {
        FlashMath::Bf16 => Ok(LaunchConfig {
            grid: grid_tiles(shape, BF16_QUERY_ROWS),
            block: BF16_QUERY_THREADS,
            shared_bytes: 0, // static shared memory only
            tile_rows: BF16_QUERY_ROWS,
            tile_cols: 64,
        }),
        FlashMath::F32 => {
            let bc = TILES
                .into_iter()
                .find(|&bc| fwd_shared_bytes(FWD_ROWS, bc, hs) <= SHARED_LIMIT)
                .ok_or_else(|| CudaError::Invalid(format!("no forward tile fits hs={hs}")))?;
            Ok(LaunchConfig {
                grid: grid_tiles(shape, FWD_ROWS),
                block: THREADS,
                shared_bytes: fwd_shared_bytes(FWD_ROWS, bc, hs) as u32,
                tile_rows: FWD_ROWS,
                tile_cols: bc,
            })
        }
    }
}

/// The three backward launches for `shape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardConfig {
    /// `flash_attn_bwd_dot`: one warp per (b, h, t) row.
    pub dot: LaunchConfig,
    pub dkdv: LaunchConfig,
    pub dq: LaunchConfig,
}

/// The backward launches for `shape` with `math`.
pub fn backward_config(shape: &AttnShape, math: FlashMath) -> CResult<BackwardConfig> {
    shape.validate(math)?;
    let dot = LaunchConfig {
        grid: (shape.rows().div_ceil(8) as u32, 1, 1),
        block: THREADS,
        shared_bytes: 0,
        tile_rows: 8,
        tile_cols: 0,
    };
    if math == FlashMath::Bf16 {
        let tiled = |rows, block| LaunchConfig {
            grid: grid_tiles(shape, rows),
            block,
            shared_bytes: 0, // static shared memory only
            tile_rows: rows,
            tile_cols: BF16_BWD_COLS,
        };
        return Ok(BackwardConfig {
            dot,
            dkdv: tiled(BF16_KEY_ROWS, BF16_KEY_THREADS),
            dq: tiled(BF16_QUERY_ROWS, BF16_QUERY_THREADS),
        });
    }
    let hs = shape.hs();
    let bt = TILES
        .into_iter()
        .find(|&bt| bwd_shared_bytes(bt, hs) <= SHARED_LIMIT)
        .ok_or_else(|| CudaError::Invalid(format!("no backward tile fits hs={hs}")))?;
    let tiled = LaunchConfig {
        grid: grid_tiles(shape, bt),
        block: THREADS,
        shared_bytes: bwd_shared_bytes(bt, hs) as u32,
        tile_rows: bt,
        tile_cols: bt,
    };
    Ok(BackwardConfig {
        dot,
        dkdv: tiled,
        dq: tiled,
    })
}

/// Launches `f` with dynamic shared memory.
///
/// # Safety
/// As [`super::kernels::launch`].
unsafe fn launch(stream: &Stream, f: CuFunction, cfg: &LaunchConfig, args: &[Arg]) -> CResult<()> {
    super::kernels::launch_shared(stream, f, cfg.grid, cfg.block, cfg.shared_bytes, args)
}

/// Refuses bf16 storage with the fp32 kernels (they exist for fp32 storage only), and, for
/// the bf16 kernels, inputs that are not 16-byte aligned: they load tiles 16 bytes at a
/// time (every row start is then aligned too, since the head size is a multiple of 16).
fn check_io(math: FlashMath, io: FlashIo, inputs: &[(&str, u64)]) -> CResult<()> {
    if io == FlashIo::Bf16 && math != FlashMath::Bf16 {
        return Err(CudaError::Invalid(
            "flash attention: bf16 storage needs the bf16 tensor-core kernels".into(),
        ));
    }
    if math == FlashMath::Bf16 {
        if let Some((what, p)) = inputs.iter().find(|(_, p)| p % 16 != 0) {
            return Err(CudaError::Invalid(format!(
                "flash attention: the bf16 kernels need 16-byte aligned inputs; {what} is at \
                 {p:#x}"
            )));
        }
    }
    Ok(())
}

fn scale(shape: &AttnShape) -> f32 {
    1.0 / (shape.hs() as f32).sqrt()
}

/// y (B*T, C) and lse (B, NH, T) from qkv (B*T, 3C), stored as `io` says, enqueued on
/// `stream`.
///
/// # Safety
/// Every pointer must be a live device allocation of at least the size the module docs give
/// for `shape` (in `io`'s value size), in the stream's context; `y`/`lse` must not overlap
/// `qkv`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flash_forward(
    stream: &Stream,
    k: &Kernels,
    math: FlashMath,
    io: FlashIo,
    qkv: u64,
    y: u64,
    lse: u64,
    shape: AttnShape,
) -> CResult<()> {
    check_io(math, io, &[("qkv", qkv)])?;
    let cfg = forward_config(&shape, math)?;
    let (t, c, nh) = (shape.t as i32, shape.c as i32, shape.nh as i32);
    let common = [
        Arg::Ptr(qkv),
        Arg::Ptr(y),
        Arg::Ptr(lse),
        Arg::I32(t),
        Arg::I32(c),
        Arg::I32(nh),
    ];
    match math {
        FlashMath::F32 => {
            let mut args = common.to_vec();
            args.extend([
                Arg::I32(cfg.tile_rows as i32),
                Arg::I32(cfg.tile_cols as i32),
                Arg::F32(scale(&shape)),
            ]);
            launch(stream, k.flash_attn_fwd_f32, &cfg, &args)
        }
        FlashMath::Bf16 => {
            let mut args = common.to_vec();
            args.push(Arg::F32(scale(&shape)));
            let f = match (io, shape.hs() == SPECIALISED_HEAD_SIZE) {
                (FlashIo::F32, false) => k.flash_attn_fwd_bf16,
                (FlashIo::F32, true) => k.flash_attn_fwd_bf16_hs64,
                (FlashIo::Bf16, false) => k.flash_attn_fwd_bf16_io,
                (FlashIo::Bf16, true) => k.flash_attn_fwd_bf16_io_hs64,
            };
            launch(stream, f, &cfg, &args)
        }
    }
}

/// dqkv (B*T, 3C, overwritten) from dy (B*T, C), using the forward's y and lse (from a
/// forward with the same `math`); `dvec` (B*NH*T floats) is scratch. Enqueued on `stream`.
/// With `dqkv_bf16` not 0 (only for [`FlashMath::Bf16`]) the gradient goes there in bf16
/// instead (the same values rounded to nearest even) and `dqkv` is not written. With
/// [`FlashIo::Bf16`] (qkv, y and dy in bf16) the gradient always goes to `dqkv_bf16`.
///
/// # Safety
/// As [`flash_forward`]; `dqkv` and `dvec` must not overlap any input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flash_backward(
    stream: &Stream,
    k: &Kernels,
    math: FlashMath,
    io: FlashIo,
    qkv: u64,
    y: u64,
    lse: u64,
    dy: u64,
    dvec: u64,
    dqkv: u64,
    dqkv_bf16: u64,
    shape: AttnShape,
) -> CResult<()> {
    check_io(math, io, &[("qkv", qkv), ("dy", dy)])?;
    assert!(
        dqkv_bf16 == 0 || math == FlashMath::Bf16,
        "only the bf16 backward kernels write a bf16 gradient"
    );
    assert!(
        io == FlashIo::F32 || (dqkv == 0 && dqkv_bf16 != 0),
        "bf16 storage: the gradient goes to dqkv_bf16"
    );
    let cfg = backward_config(&shape, math)?;
    let (b, t, c, nh) = (
        shape.b as i32,
        shape.t as i32,
        shape.c as i32,
        shape.nh as i32,
    );
    let dot = match io {
        FlashIo::F32 => k.flash_attn_bwd_dot,
        FlashIo::Bf16 => k.flash_attn_bwd_dot_bf16,
    };
    launch(
        stream,
        dot,
        &cfg.dot,
        &[
            Arg::Ptr(y),
            Arg::Ptr(dy),
            Arg::Ptr(dvec),
            Arg::I32(b),
            Arg::I32(t),
            Arg::I32(c),
            Arg::I32(nh),
        ],
    )?;
    let common = [
        Arg::Ptr(qkv),
        Arg::Ptr(dy),
        Arg::Ptr(lse),
        Arg::Ptr(dvec),
        Arg::Ptr(dqkv),
        Arg::I32(t),
        Arg::I32(c),
        Arg::I32(nh),
    ];
    if math == FlashMath::Bf16 {
        // (.., dqkv, dqkv_bf16, T, C, NH, scale), or with bf16 storage (.., dqkv_bf16, T,
        // C, NH, scale): the tile sizes are compiled in.
        let mut args = common.to_vec();
        let hs64 = shape.hs() == SPECIALISED_HEAD_SIZE;
        let (dkdv, dq) = match io {
            FlashIo::F32 => {
                args.insert(5, Arg::Ptr(dqkv_bf16));
                match hs64 {
                    false => (k.flash_attn_bwd_dkdv_bf16, k.flash_attn_bwd_dq_bf16),
                    true => (
                        k.flash_attn_bwd_dkdv_bf16_hs64,
                        k.flash_attn_bwd_dq_bf16_hs64,
                    ),
                }
            }
            FlashIo::Bf16 => {
                args[4] = Arg::Ptr(dqkv_bf16);
                match hs64 {
                    false => (k.flash_attn_bwd_dkdv_bf16_io, k.flash_attn_bwd_dq_bf16_io),
                    true => (
                        k.flash_attn_bwd_dkdv_bf16_io_hs64,
                        k.flash_attn_bwd_dq_bf16_io_hs64,
                    ),
                }
            }
        };
        args.push(Arg::F32(scale(&shape)));
        launch(stream, dkdv, &cfg.dkdv, &args)?;
        return launch(stream, dq, &cfg.dq, &args);
    }
    let tiled = |bt: usize| {
        let mut args = common.to_vec();
        args.extend([Arg::I32(bt as i32), Arg::F32(scale(&shape))]);
        args
    };
    launch(
        stream,
        k.flash_attn_bwd_dkdv_f32,
        &cfg.dkdv,
        &tiled(cfg.dkdv.tile_rows),
    )?;
    launch(
        stream,
        k.flash_attn_bwd_dq_f32,
        &cfg.dq,
        &tiled(cfg.dq.tile_rows),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(b: usize, t: usize, c: usize, nh: usize) -> AttnShape {
        AttnShape { b, t, c, nh }
    }

    #[test]
    fn forward_grid_covers_every_row_and_fits_shared_memory() {
        for hs in [1, 8, 16, 24, 40, 64, 96, 128] {
            for t in [1, 7, 31, 32, 33, 64, 100, 1024, 1025] {
                let s = shape(3, t, 2 * hs, 2);
                let f = forward_config(&s, FlashMath::F32).unwrap();
                assert_eq!(f.block, THREADS);
                assert!(f.shared_bytes as usize <= SHARED_LIMIT, "hs={hs}: {f:?}");
                assert_eq!(
                    f.shared_bytes as usize,
                    fwd_shared_bytes(32, f.tile_cols, hs)
                );
                assert!(f.tile_cols.is_multiple_of(8) && f.tile_cols <= 32 && f.tile_rows == 32);
                let rows = f.grid.0 as usize * f.tile_rows;
                assert!(rows >= t && rows < t + f.tile_rows, "t={t}: {f:?}");
                assert_eq!((f.grid.1, f.grid.2), (2, 3));
                let bw = backward_config(&s, FlashMath::F32).unwrap();
                for l in [bw.dkdv, bw.dq] {
                    assert!(l.shared_bytes as usize <= SHARED_LIMIT, "hs={hs}: {l:?}");
                    let rows = l.grid.0 as usize * l.tile_rows;
                    assert!(rows >= t && rows < t + l.tile_rows, "t={t}: {l:?}");
                    assert!(l.tile_rows.is_multiple_of(8) && l.tile_rows <= 32);
                }
                assert!(bw.dot.grid.0 as usize * 8 >= s.rows());
                assert!((bw.dot.grid.0 as usize - 1) * 8 < s.rows());
            }
        }
    }

    #[test]
    fn largest_tiles_are_chosen_for_common_head_sizes() {
        // hs=64 (GPT-2): 32x32 tiles everywhere; hs=128: the key tiles shrink to 16.
        let f = forward_config(&shape(8, 1024, 768, 12), FlashMath::F32).unwrap();
        assert_eq!((f.tile_rows, f.tile_cols, f.grid), (32, 32, (32, 12, 8)));
        assert_eq!(f.shared_bytes, 4 * (32 * 65 * 2 + 32 * 64 + 32 * 33 + 96));
        let b = backward_config(&shape(8, 1024, 768, 12), FlashMath::F32).unwrap();
        assert_eq!(b.dkdv.tile_rows, 32);
        assert_eq!(b.dot.grid, (8 * 12 * 1024 / 8, 1, 1));
        let f = forward_config(&shape(1, 100, 256, 2), FlashMath::F32).unwrap();
        assert_eq!(f.tile_cols, 16);
        assert_eq!(
            backward_config(&shape(1, 100, 256, 2), FlashMath::F32)
                .unwrap()
                .dkdv
                .tile_rows,
            16
        );
        let g = forward_config(&shape(2, 100, 256, 2), FlashMath::Bf16).unwrap();
        assert_eq!((g.grid, g.block, g.shared_bytes), ((1, 2, 2), 256, 0));
    }

    #[test]
    fn the_bf16_kernels_static_shared_memory_fits() {
        // The forward's K and V tiles: 64 x (128 + 8) bf16 each (see the kernel), which
        // first stage its 128 Q rows.
        let bytes = 2 * 2 * 64 * (MAX_HEAD_SIZE + 8);
        assert!(bytes <= SHARED_LIMIT, "{bytes}");
        // The backward kernels' arrays (kernel header: 35328 and 34816 bytes at hs = 128).
        assert_eq!(BF16_DKDV_SHARED, 35328);
        assert_eq!(BF16_DQ_SHARED, 34816);
        const { assert!(BF16_DKDV_SHARED <= SHARED_LIMIT && BF16_DQ_SHARED <= SHARED_LIMIT) };
        // The dk/dv kernel stages the block's K and V rows through its tile bytes.
        const { assert!(2 * 2 * BF16_KEY_ROWS * (MAX_HEAD_SIZE + 8) <= BF16_DKDV_SHARED) };
    }

    #[test]
    fn bf16_grids_cover_every_row() {
        for hs in [16, 32, 64, 128] {
            for t in [1, 31, 63, 64, 65, 100, 127, 128, 129, 1024, 1025] {
                let s = shape(2, t, 3 * hs, 3);
                let f = forward_config(&s, FlashMath::Bf16).unwrap();
                assert_eq!((f.block, f.shared_bytes), (BF16_QUERY_THREADS, 0));
                let rows = f.grid.0 as usize * BF16_QUERY_ROWS;
                assert!(rows >= t && rows < t + BF16_QUERY_ROWS, "t={t}: {f:?}");
                assert_eq!((f.grid.1, f.grid.2), (3, 2));
                let bw = backward_config(&s, FlashMath::Bf16).unwrap();
                for (l, block, tile) in [
                    (bw.dkdv, BF16_KEY_THREADS, BF16_KEY_ROWS),
                    (bw.dq, BF16_QUERY_THREADS, BF16_QUERY_ROWS),
                ] {
                    assert_eq!((l.block, l.shared_bytes, l.tile_rows), (block, 0, tile));
                    let rows = l.grid.0 as usize * tile;
                    assert!(rows >= t && rows < t + tile, "t={t}: {l:?}");
                    assert_eq!((l.grid.1, l.grid.2), (3, 2));
                }
                assert_eq!(bw.dot, backward_config(&s, FlashMath::F32).unwrap().dot);
            }
        }
    }

    #[test]
    fn unsupported_shapes_are_refused_with_the_reason() {
        let err = |s: AttnShape, m| forward_config(&s, m).unwrap_err().to_string();
        assert!(err(shape(1, 8, 258, 1), FlashMath::F32).contains("head size 258 exceeds 128"));
        assert!(err(shape(1, 8, 10, 3), FlashMath::F32).contains("not a multiple of n_head=3"));
        assert!(err(shape(1, 0, 64, 1), FlashMath::F32).contains("at least 1"));
        assert!(err(shape(1, 8, 40, 1), FlashMath::Bf16).contains("multiple of 16"));
        assert!(forward_config(&shape(1, 8, 40, 1), FlashMath::F32).is_ok());
        assert!(backward_config(&shape(70000, 8, 64, 1), FlashMath::F32).is_err());
        assert!(backward_config(&shape(1, 8, 40, 1), FlashMath::Bf16)
            .unwrap_err()
            .to_string()
            .contains("multiple of 16"));
    }
}
