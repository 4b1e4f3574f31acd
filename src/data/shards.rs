//! llm.c's token shard format, and finding the token files of a split.
//!
//! An llm.c shard (as written by llm.c's `dev/data/*.py`, e.g. `fineweb_train_000001.bin`)
//! is a header of 256 little-endian int32 — magic 20240520, version 1, token count, then
//! zeros — followed by that many little-endian uint16 tokens. nanoGPT's `train.bin` is the
//! tokens alone. [`TokenFile`](super::TokenFile) reads both (the header is recognised by its
//! magic, version and matching length); [`write_llmc_shard`] writes one.
//!
//! [`split_files`] finds a split's files from a data path: `DIR/train.bin`, or the shards
//! `DIR/*_train_*.bin` / `DIR/train_*.bin` (likewise `val`), or a glob whose matches are
//! sorted into splits by name.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{DataError, Split};
use crate::fsutil;

pub const LLMC_MAGIC: i32 = 20240520;
pub const LLMC_VERSION: i32 = 1;
/// 256 int32.
pub const LLMC_HEADER_BYTES: usize = 1024;

/// Token count from an llm.c header, when `bytes` starts with one that matches a file of
/// `file_len` bytes.
pub fn llmc_token_count(bytes: &[u8], file_len: u64) -> Option<u64> {
    if bytes.len() < LLMC_HEADER_BYTES {
        return None;
    }
    let word = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) != LLMC_MAGIC || word(1) != LLMC_VERSION || word(2) < 0 {
        return None;
    }
    let count = word(2) as u64;
    (LLMC_HEADER_BYTES as u64 + 2 * count == file_len).then_some(count)
}

/// Writes `tokens` as an llm.c shard, atomically. At most `i32::MAX` tokens.
pub fn write_llmc_shard(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    if tokens.len() > i32::MAX as usize {
        return Err(DataError::Prepare(format!(
            "{}: {} tokens do not fit one llm.c shard (at most {}); write several shards",
            path.display(),
            tokens.len(),
            i32::MAX
        )));
    }
    let mut header = [0u8; LLMC_HEADER_BYTES];
    header[0..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&LLMC_VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    fsutil::write_atomic_with(path, |w| {
        w.write_all(&header)?;
        for chunk in tokens.chunks(1 << 15) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
            w.write_all(&bytes)?;
        }
        Ok(())
    })
    .map_err(|e| DataError::io("cannot write", path, e))
}

fn is_split_shard(name: &str, split: Split) -> bool {
    let s = split.as_str();
    name.ends_with(".bin")
        && (name.contains(&format!("_{s}_")) || name.starts_with(&format!("{s}_")))
}

/// The token files of `split` for the data path `data` (directory or glob), sorted.
pub fn split_files(data: &Path, split: Split) -> Result<Vec<PathBuf>, DataError> {
    let plain = data.join(split.file_name());
    if data.is_dir() {
        if plain.exists() {
            return Ok(vec![plain]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(data)
            .map_err(|e| DataError::io("cannot list", data, e))?
            .filter_map(|e| e.ok())
            .filter(|e| is_split_shard(&e.file_name().to_string_lossy(), split))
            .map(|e| e.path())
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(DataError::MissingTokenFile { path: plain });
        }
        return Ok(found);
    }
    let pattern = data.to_string_lossy();
    if pattern.contains(['*', '?', '[']) {
        let mut found: Vec<PathBuf> = glob::glob(&pattern)
            .map_err(|e| DataError::InvalidSetting(format!("data path {pattern:?}: {e}")))?
            .filter_map(|p| p.ok())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(split.as_str()))
            })
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(DataError::InvalidSetting(format!(
                "no {split} token files match {pattern:?} (a shard's name must contain \
                 \"{split}\", as in fineweb_{split}_000001.bin)"
            )));
        }
        return Ok(found);
    }
    Err(DataError::MissingTokenFile { path: plain })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_split_discovery() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fineweb_train_000001.bin");
        write_llmc_shard(&p, &[1, 2, 50256]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), 1024 + 6);
        assert_eq!(
            &bytes[0..12],
            &[0x88, 0xd8, 0x34, 0x01, 1, 0, 0, 0, 3, 0, 0, 0]
        );
        assert_eq!(llmc_token_count(&bytes, 1030), Some(3));
        assert_eq!(llmc_token_count(&bytes, 1032), None);
        write_llmc_shard(&dir.path().join("fineweb_train_000002.bin"), &[4]).unwrap();
        write_llmc_shard(&dir.path().join("fineweb_val_000000.bin"), &[5]).unwrap();
        let train = split_files(dir.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 2);
        assert!(train[0].ends_with("fineweb_train_000001.bin"));
        let val = split_files(&dir.path().join("fineweb_*.bin"), Split::Val).unwrap();
        assert_eq!(val.len(), 1);
        let err = split_files(&dir.path().join("nothing"), Split::Val).unwrap_err();
        assert!(err.to_string().contains("val.bin"), "{err}");
    }
}
