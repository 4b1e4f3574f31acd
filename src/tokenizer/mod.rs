//! Tokenizers: GPT-2 BPE (OpenAI's `gpt2` encoding, exact) and character vocabularies.
//!
//! [`Tokenizer::for_data_dir`] picks the one a data directory was prepared with: the
//! character vocabulary in `meta.json` when present, GPT-2 BPE otherwise (nanoGPT's rule).
//!
//! GPT-2 BPE lives in [`gpt2`] (merges) and [`pretokenize`] (the pre-tokenizer split); it
//! is checked against Python tiktoken by `tests/prepare_tokenizer.rs` and against
//! `tiktoken-rs` on random text.
//!
//! GPT-2 encoding uses "ordinary" semantics: the text `<|endoftext|>` inside an input is
//! encoded as ordinary characters, never as the special end-of-text token 50256, so user
//! text cannot inject document boundaries. [`Tokenizer::eot_token`] gives the id for
//! callers that place boundaries themselves.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use crate::data::{DataError, Meta, GPT2_VOCAB_SIZE};

pub mod gpt2;
pub mod pretokenize;

pub use gpt2::Gpt2Ranks;

/// GPT-2's `<|endoftext|>` token id.
pub const GPT2_EOT: u32 = 50256;

/// Errors from building a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "character {ch:?} (U+{code:04X}) at character position {position} is not in the \
         character vocabulary of {vocab_size} characters; use only characters that occur in \
         the training corpus",
        code = *ch as u32
    )]
    UnknownChar {
        ch: char,
        position: usize,
        vocab_size: usize,
    },

    #[error("invalid character vocabulary: {0}")]
    InvalidVocab(String),

    #[error(transparent)]
    Data(#[from] DataError),
}

/// A character vocabulary: id `i` is the `i`-th character of the sorted set of distinct
/// characters of the corpus (sorted by Unicode code point, like Python's `sorted(set(text))`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharVocab {
    itos: Vec<char>,
    stoi: HashMap<char, u32>,
}

impl CharVocab {
    /// A vocabulary with `itos[i]` as the character of id `i`. Characters must be distinct.
    pub fn new(itos: Vec<char>) -> Result<CharVocab, TokenizerError> {
        if itos.is_empty() {
            return Err(TokenizerError::InvalidVocab(
                "the vocabulary is empty".to_string(),
            ));
        }
        let mut stoi = HashMap::with_capacity(itos.len());
        for (i, &c) in itos.iter().enumerate() {
            if stoi.insert(c, i as u32).is_some() {
                return Err(TokenizerError::InvalidVocab(format!(
                    "character {c:?} appears more than once"
                )));
            }
        }
        Ok(CharVocab { itos, stoi })
    }

    /// The vocabulary of `text`: its distinct characters sorted by code point.
    /// (Empty text gives an empty vocabulary, which encodes nothing.)
    pub fn from_text(text: &str) -> CharVocab {
        let set: std::collections::BTreeSet<char> = text.chars().collect();
        let itos: Vec<char> = set.into_iter().collect();
        let stoi = itos
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        CharVocab { itos, stoi }
    }

    /// The vocabulary described by a `"char"` meta.json.
    pub fn from_meta(meta: &Meta) -> Result<CharVocab, TokenizerError> {
        meta.validate().map_err(TokenizerError::InvalidVocab)?;
        let itos = meta
            .itos
            .iter()
            .filter_map(|s| s.chars().next())
            .collect::<Vec<char>>();
        CharVocab::new(itos)
    }

    /// The `meta.json` description of this vocabulary.
    pub fn to_meta(&self) -> Meta {
        Meta::char_vocab(&self.itos)
    }

    pub fn len(&self) -> usize {
        self.itos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.itos.is_empty()
    }

    /// Id -> character table.
    pub fn chars(&self) -> &[char] {
        &self.itos
    }

    pub fn id(&self, c: char) -> Option<u32> {
        self.stoi.get(&c).copied()
    }

    /// Ids of every character of `text`; an unknown character is an error naming it and its
    /// position (in characters).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len());
        for (position, ch) in text.chars().enumerate() {
            match self.stoi.get(&ch) {
                Some(&id) => out.push(id),
                None => {
                    return Err(TokenizerError::UnknownChar {
                        ch,
                        position,
                        vocab_size: self.itos.len(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Text of `ids`; an id outside the vocabulary decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.itos.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }
}

/// OpenAI's GPT-2 BPE (`gpt2` / `r50k_base` encoding), see [`gpt2`].
#[derive(Clone, Copy)]
pub struct Gpt2Bpe {
    ranks: &'static Gpt2Ranks,
}

impl fmt::Debug for Gpt2Bpe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gpt2Bpe")
    }
}

impl Gpt2Bpe {
    /// The GPT-2 encoding (ranks are built into the binary; first use parses them once).
    pub fn new() -> Gpt2Bpe {
        Gpt2Bpe {
            ranks: Gpt2Ranks::get(),
        }
    }

    /// Ordinary encoding: special-token text is encoded as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.ranks.encode_into(text, &mut out);
        out
    }

    /// Appends the ordinary encoding of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        self.ranks.encode_into(text, out)
    }

    /// The bytes of `ids`; an id outside the vocabulary contributes the UTF-8 bytes of U+FFFD.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.ranks.decode_into(ids, &mut out);
        out
    }
}

impl Default for Gpt2Bpe {
    fn default() -> Self {
        Gpt2Bpe::new()
    }
}

/// A tokenizer: character vocabulary or GPT-2 BPE.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    Char(CharVocab),
    Gpt2(Gpt2Bpe),
}

impl Tokenizer {
    /// GPT-2 BPE.
    pub fn gpt2() -> Tokenizer {
        Tokenizer::Gpt2(Gpt2Bpe::new())
    }

    /// The tokenizer a `meta.json` describes.
    pub fn from_meta(meta: &Meta) -> Result<Tokenizer, TokenizerError> {
        match meta.tokenizer.as_str() {
            "gpt2" => {
                meta.validate().map_err(TokenizerError::InvalidVocab)?;
                Ok(Tokenizer::gpt2())
            }
            _ => Ok(Tokenizer::Char(CharVocab::from_meta(meta)?)),
        }
    }

    /// The tokenizer of a data directory: its `meta.json` if present, GPT-2 otherwise.
    pub fn for_data_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        match Meta::load_opt(dir)? {
            Some(meta) => Tokenizer::from_meta(&meta).map_err(|e| match e {
                TokenizerError::InvalidVocab(reason) => DataError::MalformedMeta {
                    path: Meta::path(dir),
                    reason,
                }
                .into(),
                other => other,
            }),
            None => Ok(Tokenizer::gpt2()),
        }
    }

    /// `"char"` or `"gpt2"` (as in meta.json).
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Char(_) => "char",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Char(v) => v.encode(text),
            Tokenizer::Gpt2(b) => Ok(b.encode(text)),
        }
    }

    /// Raw bytes of `ids` (for streaming output that joins BPE tokens which split a
    /// multi-byte character).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        match self {
            Tokenizer::Char(v) => v.decode(ids).into_bytes(),
            Tokenizer::Gpt2(b) => b.decode_bytes(ids),
        }
    }

    /// Text of `ids`; incomplete UTF-8 from BPE byte tokens and unknown ids become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Char(v) => v.decode(ids),
            Tokenizer::Gpt2(b) => String::from_utf8_lossy(&b.decode_bytes(ids)).into_owned(),
        }
    }

    /// End-of-text token (50256 for GPT-2; none for character vocabularies).
    pub fn eot_token(&self) -> Option<u32> {
        match self {
            Tokenizer::Char(_) => None,
            Tokenizer::Gpt2(_) => Some(GPT2_EOT),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(v) => v.len(),
            Tokenizer::Gpt2(_) => GPT2_VOCAB_SIZE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_known_ids() {
        let t = Tokenizer::gpt2();
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.encode(" the").unwrap(), vec![262]);
        assert_eq!(t.encode("\n").unwrap(), vec![198]);
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(t.eot_token(), Some(50256));
        assert_eq!(t.name(), "gpt2");
    }

    #[test]
    fn gpt2_special_text_is_ordinary() {
        let t = Tokenizer::gpt2();
        let ids = t.encode("<|endoftext|>").unwrap();
        assert_eq!(ids, vec![27, 91, 437, 1659, 5239, 91, 29]);
        assert!(!ids.contains(&50256));
        assert_eq!(t.decode(&ids), "<|endoftext|>");
        assert_eq!(t.decode(&[50256]), "<|endoftext|>");
    }

    #[test]
    fn gpt2_round_trip_and_lossy_partial_utf8() {
        let t = Tokenizer::gpt2();
        let text = "Ünïcödé text — with emoji 🦀 and\ttabs\n\nnew lines.";
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text);
        // The crab is 4 UTF-8 bytes split over byte tokens; a prefix decodes lossily.
        let crab = t.encode("🦀").unwrap();
        assert!(crab.len() > 1, "{crab:?}");
        assert_eq!(t.decode_bytes(&crab), "🦀".as_bytes());
        assert!(t.decode(&crab[..1]).contains('\u{FFFD}'));
        // Ids outside the vocabulary never panic.
        assert_eq!(t.decode(&[15496, 60000]), "Hello\u{FFFD}");
    }

    #[test]
    fn char_vocab_sorted_by_code_point_round_trip() {
        let v = CharVocab::from_text("héllo\nwörld é!");
        assert_eq!(
            v.chars(),
            &['\n', ' ', '!', 'd', 'h', 'l', 'o', 'r', 'w', 'é', 'ö']
        );
        let t = Tokenizer::Char(v);
        assert_eq!(t.encode("héllo").unwrap(), vec![4, 9, 5, 5, 6]);
        let text = "wörld\nhé!";
        assert_eq!(t.decode(&t.encode(text).unwrap()), text);
        assert_eq!(t.decode(&[0, 99]), "\n\u{FFFD}");
        assert_eq!(t.eot_token(), None);
        assert_eq!(t.vocab_size(), 11);
    }

    #[test]
    fn char_unknown_character_names_it_and_position() {
        let t = Tokenizer::Char(CharVocab::from_text("abc"));
        let err = t.encode("abxc").unwrap_err();
        match &err {
            TokenizerError::UnknownChar {
                ch,
                position,
                vocab_size,
            } => {
                assert_eq!((*ch, *position, *vocab_size), ('x', 2, 3));
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("'x'") && msg.contains("position 2"), "{msg}");
    }

    #[test]
    fn from_meta_and_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Tokenizer::for_data_dir(dir.path()).unwrap().name(), "gpt2");
        let vocab = CharVocab::from_text("ba\n");
        vocab.to_meta().save(dir.path()).unwrap();
        let t = Tokenizer::for_data_dir(dir.path()).unwrap();
        assert_eq!(t.name(), "char");
        assert_eq!(t.encode("ab\n").unwrap(), vec![1, 2, 0]);
        std::fs::write(
            dir.path().join("meta.json"),
            r#"{"vocab_size":2,"itos":["a","a"],"tokenizer":"char"}"#,
        )
        .unwrap();
        let err = Tokenizer::for_data_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("meta.json") && err.contains("more than once"),
            "{err}"
        );
        let gpt2 = Meta {
            vocab_size: 50257,
            itos: vec![],
            tokenizer: "gpt2".into(),
        };
        assert_eq!(Tokenizer::from_meta(&gpt2).unwrap().vocab_size(), 50257);
    }
}
