//! GPT-2 byte-pair encoding, exact to OpenAI's `gpt2` encoding (tiktoken's `r50k_base`).
//!
//! Text is split into pieces by [`super::pretokenize`]; a piece that is itself a token is
//! looked up once; any other piece is merged pair by pair, always merging the adjacent pair
//! whose merged bytes have the lowest rank (the leftmost on ties), until no pair merges —
//! the rule tiktoken applies. Short pieces use a small array scan (as tiktoken does), long
//! ones a heap, so runs of many thousand digits or symbols stay O(n log n). Recent merged
//! pieces are cached per thread.
//!
//! The ranks are the 50,256 byte sequences bundled with `tiktoken-rs` (the same file as
//! OpenAI's `gpt2.tiktoken`), plus `<|endoftext|>` = 50256 for decoding.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::LazyLock;

use rustc_hash::FxHashMap;

use super::pretokenize::pieces;
use super::GPT2_EOT;

/// Pieces up to this many bytes merge with the array scan; longer ones use the heap.
const SCAN_MERGE_MAX: usize = 96;
/// Pieces up to this many bytes are cached.
const CACHE_PIECE_MAX: usize = 48;
/// Cache entries per thread before the cache is cleared (bounds its memory to a few MB).
const CACHE_ENTRIES_MAX: usize = 1 << 15;

/// The GPT-2 vocabulary: byte sequence <-> rank (= token id).
pub struct Gpt2Ranks {
    encoder: FxHashMap<Vec<u8>, u32>,
    /// `decoder[id]`: byte range of token `id` inside `bytes`.
    decoder: Vec<(u32, u32)>,
    bytes: Vec<u8>,
}

static RANKS: LazyLock<Gpt2Ranks> = LazyLock::new(Gpt2Ranks::load);

/// Per-thread cache: piece bytes -> token ids.
type PieceCache = FxHashMap<Box<[u8]>, Box<[u32]>>;

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(FxHashMap::default());
}

impl Gpt2Ranks {
    /// The shared GPT-2 vocabulary (built on first use, a few tens of milliseconds).
    pub fn get() -> &'static Gpt2Ranks {
        &RANKS
    }

    fn load() -> Gpt2Ranks {
        let core = tiktoken_rs::r50k_base_singleton();
        let mut encoder = FxHashMap::default();
        encoder.reserve(GPT2_EOT as usize);
        let mut decoder = Vec::with_capacity(GPT2_EOT as usize + 1);
        let mut bytes = Vec::with_capacity(400_000);
        for id in 0..=GPT2_EOT {
            let token = core
                .decode_bytes(&[id])
                .expect("every id up to 50256 is in the bundled GPT-2 vocabulary");
            decoder.push((bytes.len() as u32, token.len() as u32));
            bytes.extend_from_slice(&token);
            if id < GPT2_EOT {
                encoder.insert(token, id);
            }
        }
        Gpt2Ranks {
            encoder,
            decoder,
            bytes,
        }
    }

    /// Rank of a byte sequence, if it is a token.
    #[inline]
    pub fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.encoder.get(bytes).copied()
    }

    /// Bytes of token `id` (`None` outside the vocabulary).
    #[inline]
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let &(start, len) = self.decoder.get(id as usize)?;
        Some(&self.bytes[start as usize..(start + len) as usize])
    }

    /// Appends the ordinary encoding of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            for piece in pieces(text) {
                let piece = piece.as_bytes();
                if let Some(&id) = self.encoder.get(piece) {
                    out.push(id);
                    continue;
                }
                if piece.len() <= CACHE_PIECE_MAX {
                    if let Some(ids) = cache.get(piece) {
                        out.extend_from_slice(ids);
                        continue;
                    }
                    let start = out.len();
                    self.merge(piece, out);
                    if cache.len() >= CACHE_ENTRIES_MAX {
                        cache.clear();
                    }
                    cache.insert(piece.into(), out[start..].into());
                } else {
                    self.merge(piece, out);
                }
            }
        });
    }

    #[inline]
    fn pair_rank(&self, piece: &[u8], start: usize, end: usize) -> u32 {
        self.encoder
            .get(&piece[start..end])
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// Byte-pair merges of `piece` (at least 2 bytes, not itself a token); appends the ids.
    fn merge(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() <= SCAN_MERGE_MAX {
            self.merge_scan(piece, out)
        } else {
            self.merge_heap(piece, out)
        }
    }

    /// tiktoken's algorithm: `parts[k] = (start, rank of the pair starting at part k)`.
    fn merge_scan(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(n + 1);
        for i in 0..n - 1 {
            parts.push((i, self.pair_rank(piece, i, i + 2)));
        }
        parts.push((n - 1, u32::MAX));
        parts.push((n, u32::MAX));
        loop {
            let mut best = (u32::MAX, 0usize);
            for (k, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < best.0 {
                    best = (rank, k);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let k = best.1;
            // Merge parts k and k+1; the pairs that change start at k-1 and k.
            let rank_at = |parts: &Vec<(usize, u32)>, k: usize| {
                if k + 3 < parts.len() {
                    self.pair_rank(piece, parts[k].0, parts[k + 3].0)
                } else {
                    u32::MAX
                }
            };
            if k > 0 {
                parts[k - 1].1 = rank_at(&parts, k - 1);
            }
            parts[k].1 = rank_at(&parts, k);
            parts.remove(k + 1);
        }
        for w in parts.windows(2) {
            out.push(self.token_id(&piece[w[0].0..w[1].0]));
        }
    }

    /// The same merges with a heap keyed by (rank, start): O(n log n) for long pieces.
    fn merge_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        // Parts are identified by their start byte; `next[s]` is the start of the following
        // part (n at the end), `prev[s]` the start of the previous one.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.pair_rank(piece, i, i + 2);
            if r != u32::MAX {
                heap.push(Reverse((r, i, i + 2)));
            }
        }
        let end_of_next = |next: &Vec<usize>, s: usize| {
            let j = next[s];
            if j >= n {
                None
            } else {
                Some(next[j])
            }
        };
        while let Some(Reverse((_, s, end))) = heap.pop() {
            // Stale entries: the part was merged away, or its neighbour grew.
            if !alive[s] || end_of_next(&next, s) != Some(end) {
                continue;
            }
            let j = next[s];
            alive[j] = false;
            next[s] = end;
            if end < n {
                prev[end] = s;
            }
            let p = prev[s];
            if p != usize::MAX {
                let r = self.pair_rank(piece, p, end);
                if r != u32::MAX {
                    heap.push(Reverse((r, p, end)));
                }
            }
            if end < n {
                let e2 = next[end];
                let r = self.pair_rank(piece, s, e2);
                if r != u32::MAX {
                    heap.push(Reverse((r, s, e2)));
                }
            }
        }
        let mut s = 0;
        while s < n {
            out.push(self.token_id(&piece[s..next[s]]));
            s = next[s];
        }
    }

    #[inline]
    fn token_id(&self, bytes: &[u8]) -> u32 {
        // Every part is a single byte or the result of a merge of two tokens, both tokens.
        self.rank(bytes)
            .expect("BPE parts are always tokens (single bytes or merged tokens)")
    }

    /// Appends the bytes of `ids` to `out`; an id outside the vocabulary contributes the
    /// UTF-8 bytes of U+FFFD.
    pub fn decode_into(&self, ids: &[u32], out: &mut Vec<u8>) {
        for &id in ids {
            match self.token_bytes(id) {
                Some(b) => out.extend_from_slice(b),
                None => out.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic text mixing every kind of piece (letters, digits, symbols, Unicode,
    /// spaces, contractions, the special-token text).
    fn random_text(seed: u64, len: usize) -> String {
        const ATOMS: &[&str] = &[
            "a",
            "b",
            "e",
            "t",
            "the",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            "'s",
            "'ll",
            "'",
            "0",
            "1",
            "42",
            "!",
            "?",
            ".",
            ",",
            "-",
            "é",
            "ü",
            "ß",
            "日",
            "本",
            "語",
            "🦀",
            "😀",
            "\u{301}",
            "\u{3000}",
            "\u{a0}",
            "Д",
            "ж",
            "٣",
            "½",
            "<|endoftext|>",
            "http://",
            "ing",
            "ed",
            "\r\n",
            "$",
            "€",
            "🏳️‍🌈",
            "\u{200d}",
            "A",
            "Z",
        ];
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut s = String::new();
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push_str(ATOMS[(state % ATOMS.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn matches_tiktoken_rs_on_random_text() {
        let ranks = Gpt2Ranks::get();
        let core = tiktoken_rs::r50k_base_singleton();
        for seed in 0..300u64 {
            let text = random_text(seed, 1 + (seed as usize * 7) % 400);
            let mut ours = Vec::new();
            ranks.encode_into(&text, &mut ours);
            assert_eq!(ours, core.encode_ordinary(&text), "text {text:?}");
        }
    }

    #[test]
    fn heap_and_scan_merges_agree_on_long_pieces() {
        let ranks = Gpt2Ranks::get();
        let core = tiktoken_rs::r50k_base_singleton();
        let long = [
            "1234567890".repeat(40),
            "!?".repeat(150),
            "abcdefghij".repeat(30),
            " ".repeat(500) + "x",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_string(),
            "🦀".repeat(60),
            "€—".repeat(70),
        ];
        for text in &long {
            let mut scan = Vec::new();
            let mut heap = Vec::new();
            let bytes = text.as_bytes();
            ranks.merge_scan(bytes, &mut scan);
            ranks.merge_heap(bytes, &mut heap);
            assert_eq!(scan, heap, "{text:?}");
            let mut ours = Vec::new();
            ranks.encode_into(text, &mut ours);
            assert_eq!(ours, core.encode_ordinary(text), "{text:?}");
        }
    }
}
