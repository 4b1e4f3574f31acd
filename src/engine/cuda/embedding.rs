//! The token-embedding gradient without atomics: the host groups each micro-batch's rows
//! by token ([`token_rows`], uploaded through pinned staging with the inputs), and
//! `embedding_backward_wte` (kernels/embedding.cu) gives each token's row of the gradient
//! to one thread block, which adds that token's rows in increasing order, as the CPU engine
//! does. The gradient is then the same bits from run to run (atomics add repeated tokens
//! in whatever order the GPU runs them), so a resumed run on the GPU repeats the losses of
//! an uninterrupted one. The most frequent tokens come first in the table, so that their
//! blocks, the longest chains of additions, start first.

use super::kernels::{Arg, BLOCK};
use super::{CResult, CudaEngine};

/// Values of the row table for `n` rows (see kernels/embedding.cu).
pub(super) fn table_len(n: usize) -> usize {
    3 * n + 2
}

/// The row table of `tokens` (kernels/embedding.cu, `embedding_backward_wte`): the number
/// of distinct tokens U; where each token's rows start (and N after the last); the tokens;
/// the row indices grouped by token, increasing within a token. The tokens with the most
/// rows come first (ties: the smaller token first): a GPU starts blocks roughly in index
/// order, so the longest chains of additions start first instead of last. Entries past
/// U's are left 0 (the kernel never reads them).
pub(super) fn token_rows(tokens: &[u32]) -> Vec<u32> {
    let n = tokens.len();
    // (token, row) in one key: sorting the keys groups the rows by token, in row order.
    let mut keys: Vec<u64> = tokens
        .iter()
        .enumerate()
        .map(|(row, &tok)| (u64::from(tok) << 32) | row as u64)
        .collect();
    keys.sort_unstable();
    // Each token's keys as a range of `keys`, in increasing token order.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if keys[g.start] >> 32 == key >> 32 => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    // Most rows first; a stable sort, so tokens with as many rows stay in increasing order.
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
    let mut table = vec![0u32; table_len(n)];
    let (head, rest) = table.split_at_mut(n + 2);
    let (distinct, rows) = rest.split_at_mut(n);
    let mut at = 0usize;
    for (u, g) in groups.iter().enumerate() {
        head[1 + u] = at as u32;
        distinct[u] = (keys[g.start] >> 32) as u32;
        for key in &keys[g.clone()] {
            rows[at] = *key as u32;
            at += 1;
        }
    }
    head[0] = groups.len() as u32;
    head[1 + groups.len()] = n as u32;
    table
}

/// `embedding_backward_wte`'s blocks per token and threads per block for `c` channels of a
/// gradient at address `dwte`: one thread per group of four channels (kernels/common.cuh;
/// an extra group when `dwte` is not 16-byte aligned), in whole warps, at most [`BLOCK`]
/// (GPT-2's 768 channels: one block of 192). A block no wider than the row leaves no warp
/// idle, and more blocks fit on a multiprocessor.
pub(super) fn wte_launch(c: usize, dwte: u64) -> (u32, u32) {
    let shift = (dwte % 16 / 4) as usize;
    let groups = (c + shift).div_ceil(4);
    let block = groups.div_ceil(32).clamp(1, BLOCK as usize / 32) * 32;
    (groups.div_ceil(block) as u32, block as u32)
}

impl CudaEngine {
    /// `dwte[tok] += dx[n]` over the `n` rows of the micro-batch whose row table is in
    /// `table` (uploaded by the forward pass), `c` channels.
    pub(super) fn embedding_wte_backward(
        &self,
        dwte: u64,
        dx: u64,
        table: u64,
        n: usize,
        c: usize,
    ) -> CResult<()> {
        let (grid_y, block) = wte_launch(c, dwte);
        self.run_block(
            self.k.embedding_backward_wte,
            (n as u32, grid_y, 1),
            block,
            &[
                Arg::Ptr(dwte),
                Arg::Ptr(dx),
                Arg::Ptr(table),
                Arg::I32(n as i32),
                Arg::I32(c as i32),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient the table describes: `dwte[tok] += dx[row]` row by row in table order.
    fn apply(table: &[u32], n: usize, dx: &[f32], dwte: &mut [f32], c: usize) {
        let u = table[0] as usize;
        let (starts, tokens, rows) = (&table[1..], &table[n + 2..], &table[2 * n + 2..]);
        for b in 0..u {
            let tok = tokens[b] as usize;
            for &r in &rows[starts[b] as usize..starts[b + 1] as usize] {
                for j in 0..c {
                    dwte[tok * c + j] += dx[r as usize * c + j];
                }
            }
        }
    }

    #[test]
    fn the_row_table_groups_rows_by_token_in_row_order_most_rows_first() {
        let tokens = [7u32, 3, 7, 0, 3, 7, 50303];
        let t = token_rows(&tokens);
        let n = tokens.len();
        assert_eq!(t.len(), table_len(n));
        assert_eq!(t[0], 4, "distinct tokens");
        // Most rows first: 7 (3 rows), 3 (2), then 0 and 50303 (1 each) in token order.
        assert_eq!(&t[1..6], &[0, 3, 5, 6, 7], "starts, then N");
        assert_eq!(&t[n + 2..n + 6], &[7, 3, 0, 50303], "tokens");
        assert_eq!(&t[2 * n + 2..], &[0, 2, 5, 1, 4, 3, 6], "rows");
        assert!(t[6..n + 2].iter().all(|&x| x == 0), "unused starts stay 0");
    }

    #[test]
    fn the_gradient_launch_covers_the_row_in_whole_warps() {
        assert_eq!(
            wte_launch(768, 1 << 20),
            (1, 192),
            "GPT-2: 192 groups of four"
        );
        assert_eq!(
            wte_launch(768, (1 << 20) + 4),
            (1, 224),
            "shifted: 193 groups"
        );
        assert_eq!(wte_launch(1, 0), (1, 32));
        assert_eq!(wte_launch(1024, 0), (1, 256));
        assert_eq!(wte_launch(1600, 0), (2, 256), "GPT-2 XL: 400 groups");
        for c in 1..3000 {
            for shift in 0..4u64 {
                let (y, block) = wte_launch(c, 4096 + 4 * shift);
                // Group g holds channels [4g - shift, 4g - shift + 4).
                let groups = (c as u32 + shift as u32).div_ceil(4);
                assert!(block % 32 == 0 && block <= BLOCK, "c = {c}");
                assert!(
                    y * block >= groups,
                    "c = {c}, shift {shift}: a channel left out"
                );
                assert!(
                    (y - 1) * block < groups,
                    "c = {c}: a block with nothing to do"
                );
            }
        }
    }

    #[test]
    fn the_table_adds_every_row_once_in_the_cpu_engines_order() {
        // The CPU engine adds dx row by row (increasing n) into dwte: the table's order must
        // give the same bits, repeated tokens included.
        let (n, c, vocab) = (64usize, 3usize, 5u64);
        let mut rng = crate::rng::Rng::new(11);
        let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let dx: Vec<f32> = (0..n * c).map(|_| rng.normal() as f32).collect();
        let start: Vec<f32> = (0..vocab as usize * c)
            .map(|_| rng.normal() as f32)
            .collect();
        let mut want = start.clone();
        for (r, &tok) in tokens.iter().enumerate() {
            for j in 0..c {
                want[tok as usize * c + j] += dx[r * c + j];
            }
        }
        let mut got = start;
        apply(&token_rows(&tokens), n, &dx, &mut got, c);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(token_rows(&[]), vec![0, 0], "an empty batch");
    }
}
