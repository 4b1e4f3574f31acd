//! The fixtures of the GPT-2 BPE preparation tests (tests/fixtures/bpe): the synthetic
//! corpus, and the token counts and SHA-256 digests of nanoGPT's prepare.py for it.

use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// tests/fixtures/bpe in the source tree.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpe")
}

/// The documents of the fixture corpus (corpus.jsonl's "text" fields), in order.
pub fn corpus_texts() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// (tokens, SHA-256) of the `file` nanoGPT's prepare.py writes from the corpus with
/// `test_size`.
pub fn expected(test_size: &str, file: &str) -> (u64, String) {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("corpus_expected.json")).unwrap(),
    )
    .unwrap();
    let e = &v["expected"][test_size][file];
    (
        e["tokens"].as_u64().unwrap(),
        e["sha256"].as_str().unwrap().to_string(),
    )
}

/// The SHA-256 of `bytes` in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
