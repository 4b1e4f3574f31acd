//! Exactness against Python references (`tools/make_bpe_fixtures.py` writes the fixtures):
//! GPT-2 BPE ids from Python tiktoken, and numpy's `default_rng(seed).permutation(n)`.

use std::path::PathBuf;

use nanogpt::data::shuffle::{permutation, split_sizes};
use nanogpt::tokenizer::{Gpt2Bpe, Tokenizer};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bpe")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gpt2_matches_python_tiktoken_on_tricky_strings() {
    let fx = fixture("tokenizer.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 60);
    let bpe = Gpt2Bpe::new();
    let tok = Tokenizer::gpt2();
    let mut total = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(bpe.encode(text), expected, "text {text:?}");
        // Decoding gives the text back, and the special-token text is never id 50256.
        assert_eq!(tok.decode(&expected), text);
        assert!(!expected.contains(&50256));
        total += expected.len();
    }
    assert!(total > 5000, "{total}");
    assert_eq!(tok.decode(&[50256]), "<|endoftext|>");
}

fn sha256_u32le(p: &[u32]) -> String {
    let mut h = Sha256::new();
    for chunk in p.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn permutation_matches_numpy_default_rng() {
    let fx = fixture("permutation.json");
    let seed = fx["seed"].as_u64().unwrap() as u128;
    for (n, expected) in fx["small"].as_object().unwrap() {
        let n: usize = n.parse().unwrap();
        assert_eq!(permutation(n, seed), ids(expected), "n = {n}");
    }
    for (s, expected) in fx["other_seeds_n50"].as_object().unwrap() {
        let s: u128 = s.parse().unwrap();
        assert_eq!(permutation(50, s), ids(expected), "seed = {s}");
    }
    for (n, h) in fx["hashes"].as_object().unwrap() {
        let n: usize = n.parse().unwrap();
        let p = permutation(n, seed);
        assert_eq!(&p[..8], &ids(&h["first"])[..], "n = {n}");
        assert_eq!(&p[n - 8..], &ids(&h["last"])[..], "n = {n}");
        assert_eq!(
            sha256_u32le(&p),
            h["sha256_u32le"].as_str().unwrap(),
            "n = {n}"
        );
    }
    let owt = &fx["openwebtext_split"];
    let n = owt["n"].as_u64().unwrap() as usize;
    let (train, test) = split_sizes(n, owt["test_size"].as_f64().unwrap());
    assert_eq!(train as u64, owt["n_train"].as_u64().unwrap());
    assert_eq!(test as u64, owt["n_test"].as_u64().unwrap());
    assert_eq!((train, test), (8_009_762, 4_007));
}
