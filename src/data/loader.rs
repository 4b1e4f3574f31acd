//! Token files and the batch sampler.
//!
//! [`TokenFile`] memory-maps a flat little-endian uint16 token file (nanoGPT's `train.bin` /
//! `val.bin`, or an llm.c shard with its 1024-byte header, see [`super::shards`]) and
//! validates it on open; files are never read whole into memory.
//!
//! A split is one file or several shards (`DIR/train.bin`, or `DIR/*_train_*.bin`, or a
//! glob). With shards, a window never crosses a shard boundary: the start is drawn uniformly
//! over all valid starts of all shards (for one file this is nanoGPT's draw exactly).
//!
//! [`DataLoader`] samples batches exactly as nanoGPT's `get_batch` does: for each row a
//! start `i` uniform in `[0, len - block_size)`, inputs `data[i..i+T]`, targets
//! `data[i+1..i+T+1]`. Train and val draw from separate RNG streams, so evaluating never
//! changes the training stream, and both streams are saved in [`LoaderState`] for exact
//! resume. Seeds are offset by the rank so that every rank reads different windows.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::{DataError, Split};
use crate::rng::Rng;

/// Number of tokens the vocabulary check on open reads at most.
const VOCAB_CHECK_TOKENS: usize = 1 << 20;
/// The check reads evenly spaced windows of this many contiguous tokens (contiguous reads
/// touch few pages, so the check stays cheap on multi-GB files).
const VOCAB_CHECK_WINDOW: usize = 4096;

/// RNG stream labels for the two splits.
const TRAIN_STREAM: u64 = 0x6461_7461_2e74_726e; // "data.trn"
const VAL_STREAM: u64 = 0x6461_7461_2e76_616c; // "data.val"

/// A memory-mapped file of little-endian uint16 tokens.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the first token (1024 for llm.c shards, 0 for raw files).
    offset: usize,
    len: usize,
}

impl TokenFile {
    /// Maps `path` and checks it: present, non-empty, an even number of bytes, and a sample
    /// of its tokens (up to ~1M, spread over the file, including the first and last token)
    /// below `vocab_size`.
    pub fn open(path: &Path, vocab_size: usize) -> Result<TokenFile, DataError> {
        let file = TokenFile::open_unchecked(path)?;
        file.check_vocab_sample(vocab_size)?;
        Ok(file)
    }

    /// Maps `path` and checks its shape only (present, non-empty, even length).
    pub fn open_unchecked(path: &Path) -> Result<TokenFile, DataError> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingTokenFile {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(DataError::io("cannot open", path, e)),
        };
        let bytes = f
            .metadata()
            .map_err(|e| DataError::io("cannot read metadata of", path, e))?
            .len();
        if bytes == 0 {
            return Err(DataError::EmptyTokenFile {
                path: path.to_path_buf(),
            });
        }
        if bytes % 2 != 0 {
            return Err(DataError::OddLength {
                path: path.to_path_buf(),
                bytes,
            });
        }
        // SAFETY: the map is read-only; token files are written by atomic rename, so a file
        // being prepared again replaces the directory entry and leaves this mapping intact.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| DataError::io("cannot map", path, e))?;
        #[cfg(unix)]
        {
            // Batches read random windows; kernel read-ahead would mostly be wasted. Advice
            // is only a hint, so failure is harmless.
            let _ = mmap.advise(memmap2::Advice::Random);
        }
        let (offset, len) = match super::shards::llmc_token_count(&mmap, bytes) {
            Some(count) => (super::shards::LLMC_HEADER_BYTES, count as usize),
            None => (0, mmap.len() / 2),
        };
        if len == 0 {
            return Err(DataError::EmptyTokenFile {
                path: path.to_path_buf(),
            });
        }
        Ok(TokenFile {
            path: path.to_path_buf(),
            mmap,
            offset,
            len,
        })
    }

    /// The token bytes (after any header).
    #[inline]
    fn data(&self) -> &[u8] {
        &self.mmap[self.offset..self.offset + 2 * self.len]
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token at index `i` (panics if `i >= len()`, like slice indexing).
    #[inline]
    pub fn get(&self, i: usize) -> u16 {
        let d = self.data();
        u16::from_le_bytes([d[2 * i], d[2 * i + 1]])
    }

    /// Tokens `start..end` (panics if the range is outside the file).
    pub fn tokens(&self, start: usize, end: usize) -> impl Iterator<Item = u16> + '_ {
        self.data()[2 * start..2 * end]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// Checks every token in `start..end` against `vocab_size`.
    pub fn check_range(
        &self,
        start: usize,
        end: usize,
        vocab_size: usize,
    ) -> Result<(), DataError> {
        for (k, id) in self.tokens(start, end).enumerate() {
            if id as usize >= vocab_size {
                return Err(self.out_of_vocab(start + k, id, vocab_size));
            }
        }
        Ok(())
    }

    /// Checks up to ~1M tokens, in evenly spaced windows that include the first and last
    /// token, against `vocab_size`.
    pub fn check_vocab_sample(&self, vocab_size: usize) -> Result<(), DataError> {
        if vocab_size >= super::MAX_UINT16_VOCAB {
            return Ok(());
        }
        if self.len <= VOCAB_CHECK_TOKENS {
            return self.check_range(0, self.len, vocab_size);
        }
        let windows = VOCAB_CHECK_TOKENS / VOCAB_CHECK_WINDOW;
        let span = self.len - VOCAB_CHECK_WINDOW;
        for k in 0..windows {
            let start = ((span as u128 * k as u128) / (windows - 1) as u128) as usize;
            self.check_range(start, start + VOCAB_CHECK_WINDOW, vocab_size)?;
        }
        Ok(())
    }

    fn out_of_vocab(&self, index: usize, id: u16, vocab_size: usize) -> DataError {
        DataError::TokenOutOfVocab {
            path: self.path.clone(),
            index: index as u64,
            id: id as u32,
            vocab_size,
        }
    }
}

/// Both RNG streams of a [`DataLoader`]; restoring it replays the same batches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub train: Rng,
    pub val: Rng,
}

/// The files of one split, with the number of window starts each offers.
#[derive(Debug)]
struct SplitFiles {
    files: Vec<TokenFile>,
    /// `starts[k]`: valid window starts in files `0..k` (prefix sums; last = total).
    starts: Vec<u64>,
}

impl SplitFiles {
    fn new(files: Vec<TokenFile>, block_size: usize) -> SplitFiles {
        let mut starts = vec![0u64];
        for f in &files {
            let s = (f.len() - block_size) as u64;
            starts.push(starts.last().copied().unwrap_or(0) + s);
        }
        SplitFiles { files, starts }
    }

    /// The file and in-file start of global start `u`.
    fn locate(&self, u: u64) -> (&TokenFile, usize) {
        let k = self.starts.partition_point(|&s| s <= u) - 1;
        (&self.files[k], (u - self.starts[k]) as usize)
    }

    fn total_starts(&self) -> u64 {
        *self.starts.last().expect("prefix sums start with 0")
    }

    /// Opens `split` of `data_dir` (see [`DataLoader::new`]): every file checked against
    /// `vocab_size` and at least `block_size + 1` tokens long.
    fn open(
        data_dir: &Path,
        split: Split,
        block_size: usize,
        vocab_size: usize,
    ) -> Result<SplitFiles, DataError> {
        let mut files = Vec::new();
        for path in super::shards::split_files(data_dir, split)? {
            let file = TokenFile::open(&path, vocab_size)?;
            if file.len() < block_size + 1 {
                return Err(DataError::TooShort {
                    path: file.path().to_path_buf(),
                    tokens: file.len(),
                    block_size,
                });
            }
            files.push(file);
        }
        Ok(SplitFiles::new(files, block_size))
    }

    /// Fills `inputs` and `targets` (`b` rows of `t` tokens) from windows drawn with `rng`
    /// (see [`DataLoader::next_batch`]).
    fn fill(
        &self,
        rng: &mut Rng,
        (b, t): (usize, usize),
        vocab: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<i32>,
    ) -> Result<(), DataError> {
        inputs.resize(b * t, 0);
        targets.resize(b * t, 0);
        let starts = self.total_starts();
        for row in 0..b {
            let (file, i) = self.locate(rng.below(starts));
            let window = &file.data()[2 * i..2 * (i + t + 1)];
            let x = &mut inputs[row * t..(row + 1) * t];
            let y = &mut targets[row * t..(row + 1) * t];
            let mut prev = u16::from_le_bytes([window[0], window[1]]);
            if prev as usize >= vocab {
                return Err(file.out_of_vocab(i, prev, vocab));
            }
            for (k, pair) in window[2..].chunks_exact(2).enumerate() {
                let id = u16::from_le_bytes([pair[0], pair[1]]);
                if id as usize >= vocab {
                    return Err(file.out_of_vocab(i + k + 1, id, vocab));
                }
                x[k] = prev as u32;
                y[k] = id as i32;
                prev = id;
            }
        }
        Ok(())
    }
}

/// The first training batch a [`DataLoader`] with these arguments (rank 0) gives, opening
/// only the train split: inputs and targets, `batch_size * block_size` each.
pub fn first_train_batch(
    data_dir: &Path,
    batch_size: usize,
    block_size: usize,
    vocab_size: usize,
    seed: u64,
) -> Result<(Vec<u32>, Vec<i32>), DataError> {
    check_batch_shape(batch_size, block_size, vocab_size)?;
    let train = SplitFiles::open(data_dir, Split::Train, block_size, vocab_size)?;
    let mut rng = Rng::derive(seed, TRAIN_STREAM);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    train.fill(
        &mut rng,
        (batch_size, block_size),
        vocab_size,
        &mut inputs,
        &mut targets,
    )?;
    Ok((inputs, targets))
}

/// Every size of a batch must be at least 1.
fn check_batch_shape(
    batch_size: usize,
    block_size: usize,
    vocab_size: usize,
) -> Result<(), DataError> {
    for (key, v) in [
        ("batch_size", batch_size),
        ("block_size", block_size),
        ("vocab_size", vocab_size),
    ] {
        if v == 0 {
            return Err(DataError::InvalidSetting(format!(
                "{key} is 0; it must be at least 1"
            )));
        }
    }
    Ok(())
}

/// Random-window batch sampler over `train.bin` and `val.bin` of a data directory (or the
/// llm.c shards of each split).
#[derive(Debug)]
pub struct DataLoader {
    train: SplitFiles,
    val: SplitFiles,
    batch_size: usize,
    block_size: usize,
    vocab_size: usize,
    train_rng: Rng,
    val_rng: Rng,
}

impl DataLoader {
    /// Opens `data_dir/train.bin` and `data_dir/val.bin` (or each split's llm.c shards in
    /// `data_dir`, or the shards a glob `data_dir` matches) for batches of `batch_size` rows
    /// of `block_size` tokens. Each file must hold at least `block_size + 1` tokens. The RNG
    /// streams are derived from `seed + rank`.
    pub fn new(
        data_dir: &Path,
        batch_size: usize,
        block_size: usize,
        vocab_size: usize,
        seed: u64,
        rank: u64,
    ) -> Result<DataLoader, DataError> {
        check_batch_shape(batch_size, block_size, vocab_size)?;
        let train = SplitFiles::open(data_dir, Split::Train, block_size, vocab_size)?;
        let val = SplitFiles::open(data_dir, Split::Val, block_size, vocab_size)?;
        let base = seed.wrapping_add(rank);
        Ok(DataLoader {
            train,
            val,
            batch_size,
            block_size,
            vocab_size,
            train_rng: Rng::derive(base, TRAIN_STREAM),
            val_rng: Rng::derive(base, VAL_STREAM),
        })
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The (first) token file of `split`.
    pub fn file(&self, split: Split) -> &TokenFile {
        &self.files(split)[0]
    }

    /// All token files of `split` (one, or its shards in order).
    pub fn files(&self, split: Split) -> &[TokenFile] {
        match split {
            Split::Train => &self.train.files,
            Split::Val => &self.val.files,
        }
    }

    /// Tokens in `split`, over all its files.
    pub fn tokens(&self, split: Split) -> u64 {
        self.files(split).iter().map(|f| f.len() as u64).sum()
    }

    /// Fills `inputs` and `targets` with `batch_size * block_size` tokens (row-major
    /// `[B, T]`) from random windows of `split`. The buffers are resized once and reused.
    /// A token outside the vocabulary is an error naming the file and offset.
    pub fn next_batch(
        &mut self,
        split: Split,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<i32>,
    ) -> Result<(), DataError> {
        let (split_files, rng) = match split {
            Split::Train => (&self.train, &mut self.train_rng),
            Split::Val => (&self.val, &mut self.val_rng),
        };
        split_files.fill(
            rng,
            (self.batch_size, self.block_size),
            self.vocab_size,
            inputs,
            targets,
        )
    }

    /// Both RNG states (save in a checkpoint).
    pub fn state(&self) -> LoaderState {
        LoaderState {
            train: self.train_rng.clone(),
            val: self.val_rng.clone(),
        }
    }

    /// Restores RNG states saved by [`DataLoader::state`].
    pub fn set_state(&mut self, state: &LoaderState) {
        self.train_rng = state.train.clone();
        self.val_rng = state.val.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn write_tokens(path: &Path, tokens: impl IntoIterator<Item = u16>) {
        let bytes: Vec<u8> = tokens.into_iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
    }

    /// A data dir whose token at index i is `i % modulus`.
    fn counting_dir(train_len: usize, val_len: usize, modulus: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_tokens(
            &dir.path().join("train.bin"),
            (0..train_len).map(|i| (i % modulus) as u16),
        );
        write_tokens(
            &dir.path().join("val.bin"),
            (0..val_len).map(|i| (i % modulus) as u16),
        );
        dir
    }

    #[test]
    fn the_first_train_batch_is_the_loaders_and_needs_no_val_split() {
        let dir = counting_dir(5000, 40, 1000);
        let mut loader = DataLoader::new(dir.path(), 3, 16, 1000, 7, 0).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        loader.next_batch(Split::Train, &mut x, &mut y).unwrap();
        let first = first_train_batch(dir.path(), 3, 16, 1000, 7).unwrap();
        assert_eq!(first, (x, y));
        // A val split shorter than a window stops the loader, not the first batch.
        assert!(DataLoader::new(dir.path(), 3, 64, 1000, 7, 0).is_err());
        std::fs::remove_file(dir.path().join("val.bin")).unwrap();
        let (x, y) = first_train_batch(dir.path(), 3, 64, 1000, 7).unwrap();
        assert_eq!((x.len(), y.len()), (192, 192));
        assert!(x.iter().zip(&y).all(|(&a, &b)| (a + 1) % 1000 == b as u32));
        let err = first_train_batch(dir.path(), 0, 64, 1000, 7).unwrap_err();
        assert!(err.to_string().contains("batch_size is 0"), "{err}");
    }

    #[test]
    fn open_validates_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.bin");
        let err = TokenFile::open(&p, 65).unwrap_err().to_string();
        assert!(
            err.contains("train.bin") && err.contains("nanogpt prepare"),
            "{err}"
        );

        std::fs::write(&p, b"").unwrap();
        let err = TokenFile::open(&p, 65).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");

        std::fs::write(&p, [1u8, 0, 2]).unwrap();
        let err = TokenFile::open(&p, 65).unwrap_err().to_string();
        assert!(err.contains("3 bytes") && err.contains("uint16"), "{err}");

        write_tokens(&p, [1, 2, 0x0102]);
        let f = TokenFile::open(&p, 300).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!((f.get(0), f.get(1), f.get(2)), (1, 2, 258));
        assert_eq!(f.tokens(1, 3).collect::<Vec<_>>(), vec![2, 258]);
    }

    #[test]
    fn vocab_check_names_file_offset_id_and_vocab() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("val.bin");
        write_tokens(&p, [3, 4, 5, 64, 65, 7]);
        let err = TokenFile::open(&p, 65).unwrap_err();
        match &err {
            DataError::TokenOutOfVocab {
                index,
                id,
                vocab_size,
                ..
            } => assert_eq!((*index, *id, *vocab_size), (4, 65, 65)),
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("val.bin")
                && msg.contains("offset 4")
                && msg.contains("id 65")
                && msg.contains("vocabulary of 65")
                && msg.contains("different tokenizer"),
            "{msg}"
        );
        assert!(TokenFile::open(&p, 66).is_ok());
    }

    #[test]
    fn vocab_check_on_large_file_sees_last_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.bin");
        let n = 3 * VOCAB_CHECK_TOKENS + 17;
        write_tokens(&p, (0..n).map(|i| if i == n - 1 { 9000 } else { 5 }));
        let err = TokenFile::open(&p, 50).unwrap_err();
        assert!(
            matches!(err, DataError::TokenOutOfVocab { index, id: 9000, .. } if index == n as u64 - 1),
            "{err}"
        );
        assert!(TokenFile::open(&p, 50257).is_ok());
    }

    #[test]
    fn too_short_names_file_and_both_numbers() {
        let dir = counting_dir(100, 8, 50);
        let err = DataLoader::new(dir.path(), 2, 8, 50, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("val.bin") && err.contains("holds 8 tokens") && err.contains("at least 9"),
            "{err}"
        );
        assert!(DataLoader::new(dir.path(), 2, 7, 50, 0, 0).is_ok());
        assert!(DataLoader::new(dir.path(), 0, 7, 50, 0, 0).is_err());
    }

    #[test]
    fn batches_are_shifted_windows_in_range() {
        // Counting tokens: a window starting at i holds i, i+1, ... so y = x + 1 and the
        // start is recoverable from the first input.
        let (len, t, b) = (1000usize, 16usize, 8usize);
        let dir = counting_dir(len, 300, 60_000);
        let mut dl = DataLoader::new(dir.path(), b, t, 60_000, 1337, 0).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut max_start = 0;
        let mut min_start = usize::MAX;
        for _ in 0..2000 {
            dl.next_batch(Split::Train, &mut x, &mut y).unwrap();
            assert_eq!((x.len(), y.len()), (b * t, b * t));
            for row in 0..b {
                let start = x[row * t] as usize;
                max_start = max_start.max(start);
                min_start = min_start.min(start);
                for k in 0..t {
                    assert_eq!(x[row * t + k] as usize, start + k);
                    assert_eq!(y[row * t + k] as usize, start + k + 1);
                }
            }
        }
        // Starts cover [0, len - t) and never reach len - t.
        assert_eq!(min_start, 0);
        assert_eq!(max_start, len - t - 1);
    }

    #[test]
    fn bad_token_in_batch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_tokens(&dir.path().join("train.bin"), [1, 2, 3, 4, 5]);
        write_tokens(&dir.path().join("val.bin"), [1, 2, 3, 4, 5]);
        let mut dl = DataLoader::new(dir.path(), 4, 4, 10, 0, 0).unwrap();
        // Replace the train file with one that holds an id the open-time check would have
        // caught, to exercise the per-batch check.
        dl.train = SplitFiles::new(
            vec![TokenFile::open_unchecked(&{
                let p = dir.path().join("bad.bin");
                write_tokens(&p, [1, 2, 3, 4, 12]);
                p
            })
            .unwrap()],
            4,
        );
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let err = dl.next_batch(Split::Train, &mut x, &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfVocab {
                    index: 4,
                    id: 12,
                    vocab_size: 10,
                    ..
                }
            ),
            "{err}"
        );
        dl.next_batch(Split::Val, &mut x, &mut y).unwrap();
    }

    #[test]
    fn eval_does_not_change_train_stream_and_state_resumes_exactly() {
        let dir = counting_dir(5000, 2000, 60_000);
        let new = |rank| DataLoader::new(dir.path(), 4, 32, 60_000, 7, rank).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut train_only = new(0);
        let mut a = Vec::new();
        for _ in 0..10 {
            train_only.next_batch(Split::Train, &mut x, &mut y).unwrap();
            a.push(x.clone());
        }
        let mut mixed = new(0);
        let mut b = Vec::new();
        let mut saved = None;
        for step in 0..10 {
            if step == 5 {
                saved = Some(mixed.state());
            }
            mixed.next_batch(Split::Val, &mut x, &mut y).unwrap();
            mixed.next_batch(Split::Train, &mut x, &mut y).unwrap();
            b.push(x.clone());
        }
        assert_eq!(a, b);

        // Resume from the state saved before step 5 (through JSON, as in a checkpoint).
        let json = serde_json::to_string(&saved.unwrap()).unwrap();
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        let mut resumed = new(0);
        resumed.set_state(&state);
        for expected in &b[5..] {
            resumed.next_batch(Split::Val, &mut x, &mut y).unwrap();
            resumed.next_batch(Split::Train, &mut x, &mut y).unwrap();
            assert_eq!(&x, expected);
        }

        // Another rank reads different windows.
        let mut other = new(1);
        other.next_batch(Split::Train, &mut x, &mut y).unwrap();
        assert_ne!(x, a[0]);
    }

    #[test]
    fn llmc_shards_load_and_windows_stay_inside_a_shard() {
        use crate::data::shards::write_llmc_shard;
        let dir = tempfile::tempdir().unwrap();
        // Shard k holds tokens 1000*k .. 1000*k + 40 (counting), so a window's first token
        // tells its shard and start.
        for k in 1..=3u16 {
            let toks: Vec<u16> = (0..40).map(|i| 1000 * k + i).collect();
            write_llmc_shard(&dir.path().join(format!("fw_train_{k:06}.bin")), &toks).unwrap();
        }
        write_llmc_shard(
            &dir.path().join("fw_val_000000.bin"),
            &(0..20).collect::<Vec<_>>(),
        )
        .unwrap();
        let mut dl = DataLoader::new(dir.path(), 4, 8, 50257, 0, 0).unwrap();
        assert_eq!(dl.files(Split::Train).len(), 3);
        assert_eq!((dl.tokens(Split::Train), dl.tokens(Split::Val)), (120, 20));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            dl.next_batch(Split::Train, &mut x, &mut y).unwrap();
            for row in 0..4 {
                let first = x[row * 8];
                let (k, i) = (first / 1000, first % 1000);
                assert!((1..=3).contains(&k) && i < 32, "{first}");
                assert_eq!(y[row * 8 + 7] as u32, first + 8);
                seen.insert(k);
            }
        }
        assert_eq!(seen.len(), 3);
        // A single llm.c file opens as a plain token file of its count.
        let f = TokenFile::open(&dir.path().join("fw_val_000000.bin"), 50257).unwrap();
        assert_eq!((f.len(), f.get(19)), (20, 19));
    }

    #[test]
    fn million_token_file_loads_and_batches_fast() {
        let dir = counting_dir(1_000_000, 100_000, 50257);
        let t0 = Instant::now();
        let mut dl = DataLoader::new(dir.path(), 16, 1024, 50257, 0, 0).unwrap();
        assert_eq!(dl.file(Split::Train).len(), 1_000_000);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        dl.next_batch(Split::Train, &mut x, &mut y).unwrap();
        let (px, py) = (x.as_ptr(), y.as_ptr());
        for _ in 0..100 {
            dl.next_batch(Split::Train, &mut x, &mut y).unwrap();
        }
        // Buffers are reused, not reallocated.
        assert_eq!((x.as_ptr(), y.as_ptr()), (px, py));
        let elapsed = t0.elapsed();
        // Open + vocab check of 1M tokens + 1.6M sampled tokens: milliseconds; the bound is
        // loose for busy machines.
        assert!(elapsed.as_secs_f64() < 2.0, "took {elapsed:?}");
        for row in 0..16 {
            let s = x[row * 1024] as usize;
            assert_eq!(y[row * 1024 + 1023] as usize, (s + 1024) % 50257);
        }
    }
}
