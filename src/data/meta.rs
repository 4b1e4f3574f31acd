//! `meta.json`: the description of a data directory's vocabulary.
//!
//! nanoGPT writes `meta.pkl` (a Python pickle) for character-level datasets; this system
//! writes the same facts as JSON:
//!
//! ```json
//! {"vocab_size": 65, "itos": ["\n", " ", "!", ...], "tokenizer": "char"}
//! ```
//!
//! `itos[i]` is the character with id `i`. A data directory without `meta.json` holds
//! GPT-2 BPE tokens (vocabulary 50257), as nanoGPT assumes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DataError, GPT2_VOCAB_SIZE};
use crate::fsutil;

/// File name of the vocabulary description inside a data directory.
pub const META_FILE: &str = "meta.json";

/// The contents of `meta.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub vocab_size: usize,
    /// Id -> character (each entry is exactly one Unicode scalar value). Empty for "gpt2".
    #[serde(default)]
    pub itos: Vec<String>,
    /// `"char"` (character vocabulary in `itos`) or `"gpt2"` (GPT-2 BPE).
    pub tokenizer: String,
}

impl Meta {
    /// A character-vocabulary description: `itos[i]` is the character with id `i`.
    pub fn char_vocab(itos: &[char]) -> Meta {
        Meta {
            vocab_size: itos.len(),
            itos: itos.iter().map(|c| c.to_string()).collect(),
            tokenizer: "char".to_string(),
        }
    }

    /// Path of `meta.json` inside `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(META_FILE)
    }

    /// Reads and validates a `meta.json` file.
    pub fn load(path: &Path) -> Result<Meta, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io("cannot read", path, e))?;
        let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| DataError::MalformedMeta {
            path: path.to_path_buf(),
            reason: format!("not a valid meta.json ({e})"),
        })?;
        meta.validate().map_err(|reason| DataError::MalformedMeta {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(meta)
    }

    /// `data_dir/meta.json` if it exists (`None` when absent; an error when malformed).
    pub fn load_opt(data_dir: &Path) -> Result<Option<Meta>, DataError> {
        let path = Meta::path(data_dir);
        match std::fs::metadata(&path) {
            Ok(_) => Meta::load(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataError::io("cannot read", path, e)),
        }
    }

    /// Writes `data_dir/meta.json` atomically (one line of JSON).
    pub fn save(&self, data_dir: &Path) -> Result<PathBuf, DataError> {
        let path = Meta::path(data_dir);
        let mut bytes = serde_json::to_vec(self).map_err(|e| DataError::MalformedMeta {
            path: path.clone(),
            reason: format!("cannot encode as JSON ({e})"),
        })?;
        bytes.push(b'\n');
        fsutil::write_atomic(&path, &bytes).map_err(|e| DataError::io("cannot write", &path, e))?;
        Ok(path)
    }

    /// Checks internal consistency; the error text says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self.tokenizer.as_str() {
            "char" => {
                if self.vocab_size != self.itos.len() {
                    return Err(format!(
                        "vocab_size is {} but itos lists {} characters",
                        self.vocab_size,
                        self.itos.len()
                    ));
                }
                if self.vocab_size == 0 {
                    return Err("the character vocabulary is empty".to_string());
                }
                let mut seen = std::collections::HashSet::new();
                for (i, s) in self.itos.iter().enumerate() {
                    let mut chars = s.chars();
                    let (Some(c), None) = (chars.next(), chars.next()) else {
                        return Err(format!("itos[{i}] = {s:?} is not exactly one character"));
                    };
                    if !seen.insert(c) {
                        return Err(format!("itos[{i}] = {s:?} appears more than once"));
                    }
                }
                Ok(())
            }
            "gpt2" => {
                if self.vocab_size != GPT2_VOCAB_SIZE {
                    return Err(format!(
                        "tokenizer \"gpt2\" has vocab_size {GPT2_VOCAB_SIZE}, not {}",
                        self.vocab_size
                    ));
                }
                Ok(())
            }
            other => Err(format!(
                "unknown tokenizer {other:?} (expected \"char\" or \"gpt2\")"
            )),
        }
    }
}

/// Vocabulary size of the tokens in `data_dir`: `meta.json`'s `vocab_size` if present,
/// otherwise GPT-2's 50257 (nanoGPT's rule).
pub fn vocab_size_for(data_dir: &Path) -> Result<usize, DataError> {
    Ok(Meta::load_opt(data_dir)?
        .map(|m| m.vocab_size)
        .unwrap_or(GPT2_VOCAB_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_json() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::char_vocab(&['\n', ' ', 'a', 'é']);
        meta.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("meta.json")).unwrap();
        assert_eq!(
            text,
            "{\"vocab_size\":4,\"itos\":[\"\\n\",\" \",\"a\",\"é\"],\"tokenizer\":\"char\"}\n"
        );
        assert_eq!(Meta::load_opt(dir.path()).unwrap(), Some(meta));
        assert_eq!(vocab_size_for(dir.path()).unwrap(), 4);
    }

    #[test]
    fn absent_means_gpt2() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Meta::load_opt(dir.path()).unwrap(), None);
        assert_eq!(vocab_size_for(dir.path()).unwrap(), 50257);
    }

    #[test]
    fn malformed_files_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        let cases: [(&str, &str); 5] = [
            ("{not json", "not a valid meta.json"),
            (
                r#"{"vocab_size":3,"itos":["a","b"],"tokenizer":"char"}"#,
                "vocab_size is 3 but itos lists 2",
            ),
            (
                r#"{"vocab_size":2,"itos":["a","bc"],"tokenizer":"char"}"#,
                "itos[1] = \"bc\" is not exactly one character",
            ),
            (
                r#"{"vocab_size":2,"itos":["a","a"],"tokenizer":"char"}"#,
                "appears more than once",
            ),
            (
                r#"{"vocab_size":2,"itos":["a","b"],"tokenizer":"bytes"}"#,
                "unknown tokenizer \"bytes\"",
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            let err = Meta::load_opt(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(err.contains("meta.json"), "{err}");
            assert!(vocab_size_for(dir.path()).is_err());
        }
    }
}
