//! Dataset preparation: corpus -> tokens -> `train.bin` / `val.bin` (+ `meta.json`).
//!
//! [`prepare_char`] is `nanogpt prepare shakespeare_char`. Its output is byte-identical to
//! nanoGPT's `data/shakespeare_char/prepare.py`:
//!
//! - the text is read as Python's `open(path, 'r').read()` reads it (UTF-8, universal
//!   newlines: `\r\n` and lone `\r` become `\n`);
//! - the vocabulary is the distinct characters sorted by code point (`sorted(set(text))`),
//!   and a character's id is its index in that list;
//! - the first `int(n * 0.9)` characters are the train split, the rest the val split;
//! - both are written as raw little-endian uint16.
//!
//! nanoGPT's `meta.pkl` is replaced by `meta.json` (see [`super::meta`]). Every file is
//! written atomically.
//!
//! Without an input file the corpus is tiny Shakespeare, downloaded once (with a progress
//! bar on stderr), checked against its sha256 and kept as `out_dir/input.txt`. When the
//! download is impossible (no network) the corpus falls back to a small text built into the
//! binary (this program's own source text), with a warning on stderr: the pipeline still
//! runs end to end, but losses and samples differ from tiny Shakespeare's.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{meta::META_FILE, DataError, Split, MAX_UINT16_VOCAB};
use crate::fsutil;
use crate::tokenizer::CharVocab;

/// Where tiny Shakespeare is downloaded from.
pub const TINY_SHAKESPEARE_URL: &str =
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
/// sha256 of tiny Shakespeare's `input.txt` (1,115,394 bytes).
pub const TINY_SHAKESPEARE_SHA256: &str =
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed";
/// Name of the cached corpus inside the output directory (as nanoGPT names it).
pub const INPUT_FILE: &str = "input.txt";

/// Largest download accepted (tiny Shakespeare is about 1 MiB).
const MAX_DOWNLOAD_BYTES: u64 = 64 << 20;

/// What a preparation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareReport {
    /// Where the corpus came from, in words.
    pub source: String,
    /// Why the built-in fallback corpus was used instead of the download, if it was.
    pub fallback_reason: Option<String>,
    /// Characters in the corpus.
    pub chars: usize,
    pub vocab_size: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// `train.bin`, `val.bin` and `meta.json`, as written.
    pub files: Vec<PathBuf>,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source: {}", self.source)?;
        if let Some(reason) = &self.fallback_reason {
            writeln!(
                f,
                "NOTE: built-in fallback corpus used (download failed: {reason}); \
                 results will differ from tiny Shakespeare"
            )?;
        }
        writeln!(f, "length of dataset in characters: {}", group(self.chars))?;
        writeln!(f, "vocab size: {}", self.vocab_size)?;
        writeln!(f, "train has {} tokens", group(self.train_tokens))?;
        write!(f, "val has {} tokens", group(self.val_tokens))?;
        for p in &self.files {
            write!(f, "\nwrote {}", p.display())?;
        }
        Ok(())
    }
}

/// `1234567` -> `"1,234,567"`.
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `nanogpt prepare shakespeare_char`: character-level `train.bin`, `val.bin` and
/// `meta.json` in `out_dir`, from `input` or (when `None`) from tiny Shakespeare.
pub fn prepare_char(input: Option<&Path>, out_dir: &Path) -> Result<PrepareReport, DataError> {
    let corpus = match input {
        Some(path) => Corpus {
            text: read_text(path)?,
            source: format!("{}", path.display()),
            fallback_reason: None,
        },
        None => tiny_shakespeare(TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256, out_dir)?,
    };
    let mut report = prepare_char_text(&corpus.text, &corpus.source, out_dir)?;
    report.fallback_reason = corpus.fallback_reason;
    Ok(report)
}

/// Character-level preparation of `text` (already decoded) into `out_dir`; `source`
/// describes the text in the report and in errors.
pub fn prepare_char_text(
    text: &str,
    source: &str,
    out_dir: &Path,
) -> Result<PrepareReport, DataError> {
    let vocab = CharVocab::from_text(text);
    if vocab.len() > MAX_UINT16_VOCAB {
        return Err(DataError::VocabTooLarge {
            source_desc: source.to_string(),
            size: vocab.len(),
        });
    }
    let ids: Vec<u16> = text
        .chars()
        .map(|c| {
            // Every character of `text` is in its own vocabulary, and ids fit u16 (checked).
            vocab.id(c).expect("vocabulary built from this text") as u16
        })
        .collect();
    let n = ids.len();
    if n < 2 {
        return Err(DataError::CorpusTooSmall {
            source_desc: source.to_string(),
            chars: n,
        });
    }
    // Python: int(n * 0.9), computed in f64 and truncated.
    let split = ((n as f64) * 0.9) as usize;
    let (train, val) = ids.split_at(split);
    let train_path = out_dir.join(Split::Train.file_name());
    let val_path = out_dir.join(Split::Val.file_name());
    write_u16_file(&train_path, train)?;
    write_u16_file(&val_path, val)?;
    let meta_path = vocab.to_meta().save(out_dir)?;
    debug_assert!(meta_path.ends_with(META_FILE));
    Ok(PrepareReport {
        source: source.to_string(),
        fallback_reason: None,
        chars: n,
        vocab_size: vocab.len(),
        train_tokens: train.len(),
        val_tokens: val.len(),
        files: vec![train_path, val_path, meta_path],
    })
}

/// Writes `tokens` as raw little-endian uint16, atomically.
pub fn write_u16_file(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    fsutil::write_atomic_with(path, |w| {
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in tokens.chunks(1 << 15) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
            w.write_all(&buf)?;
        }
        Ok(())
    })
    .map_err(|e| DataError::io("cannot write", path, e))
}

/// Reads a text file the way Python's `open(path, 'r').read()` does on a UTF-8 system.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("cannot read", path, e))?;
    decode_text(bytes, path)
}

fn decode_text(bytes: Vec<u8>, path: &Path) -> Result<String, DataError> {
    let text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    Ok(universal_newlines(text))
}

/// Python's text-mode newline translation: `\r\n` -> `\n`, then lone `\r` -> `\n`.
fn universal_newlines(text: String) -> String {
    if !text.contains('\r') {
        return text;
    }
    text.replace("\r\n", "\n").replace('\r', "\n")
}

struct Corpus {
    text: String,
    source: String,
    fallback_reason: Option<String>,
}

/// Tiny Shakespeare from `out_dir/input.txt` if it is already there (and verified), else
/// downloaded from `url` and verified against `sha256`; the built-in corpus if the
/// download fails.
fn tiny_shakespeare(url: &str, sha256: &str, out_dir: &Path) -> Result<Corpus, DataError> {
    let cached = out_dir.join(INPUT_FILE);
    if cached.exists() {
        let bytes = std::fs::read(&cached).map_err(|e| DataError::io("cannot read", &cached, e))?;
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(DataError::ExistingInputMismatch {
                path: cached,
                actual,
                expected: sha256.to_string(),
            });
        }
        eprintln!("using tiny Shakespeare already at {}", cached.display());
        return Ok(Corpus {
            text: decode_text(bytes, &cached)?,
            source: format!("tiny Shakespeare ({})", cached.display()),
            fallback_reason: None,
        });
    }
    eprintln!("downloading tiny Shakespeare from {url}");
    match download(url) {
        Ok(bytes) => {
            let actual = sha256_hex(&bytes);
            if actual != sha256 {
                return Err(DataError::ChecksumMismatch {
                    url: url.to_string(),
                    actual,
                    expected: sha256.to_string(),
                });
            }
            fsutil::write_atomic(&cached, &bytes)
                .map_err(|e| DataError::io("cannot write", &cached, e))?;
            eprintln!(
                "saved {} ({} bytes, sha256 verified)",
                cached.display(),
                bytes.len()
            );
            Ok(Corpus {
                text: decode_text(bytes, &cached)?,
                source: format!("tiny Shakespeare (downloaded to {})", cached.display()),
                fallback_reason: None,
            })
        }
        Err(reason) => {
            let text = fallback_corpus();
            eprintln!(
                "WARNING: could not download tiny Shakespeare: {reason}\n\
                 WARNING: using the built-in fallback corpus instead (this program's own source \
                 text, {} characters).\n\
                 WARNING: losses and samples will differ from tiny Shakespeare's. To prepare \
                 tiny Shakespeare without network access, copy its input.txt to {} or pass \
                 it with --input.",
                text.chars().count(),
                cached.display()
            );
            Ok(Corpus {
                text,
                source: "built-in fallback corpus (this program's own source text)".to_string(),
                fallback_reason: Some(reason),
            })
        }
    }
}

/// Downloads `url` into memory with a progress bar on stderr. Errors are described in
/// words (they decide the fallback, they are not returned to the caller as such).
fn download(url: &str) -> Result<Vec<u8>, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(60))
        .build();
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    // A compressed body's Content-Length is not the length we read.
    let total = match response.header("Content-Encoding") {
        Some(_) => None,
        None => response
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok()),
    };
    let bar = match total {
        Some(n) => {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(n),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            ) {
                bar.set_style(style);
            }
            bar
        }
        None => {
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
        }
    };
    let mut reader = response.into_reader().take(MAX_DOWNLOAD_BYTES + 1);
    let mut body = Vec::with_capacity(total.unwrap_or(1 << 20).min(MAX_DOWNLOAD_BYTES) as usize);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(format!("reading the response failed: {e}"));
            }
        };
        body.extend_from_slice(&chunk[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if body.len() as u64 > MAX_DOWNLOAD_BYTES {
        return Err(format!(
            "response is larger than {MAX_DOWNLOAD_BYTES} bytes"
        ));
    }
    if let Some(n) = total {
        if body.len() as u64 != n {
            return Err(format!("response ended after {} of {n} bytes", body.len()));
        }
    }
    Ok(body)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The built-in corpus used when tiny Shakespeare cannot be downloaded: this program's own
/// source text (so it carries no third-party text).
pub fn fallback_corpus() -> String {
    const PARTS: [&str; 7] = [
        include_str!("../model/mod.rs"),
        include_str!("../engine/mod.rs"),
        include_str!("mod.rs"),
        include_str!("loader.rs"),
        include_str!("meta.rs"),
        include_str!("prepare.rs"),
        include_str!("../tokenizer/mod.rs"),
    ];
    PARTS.concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn read_u16(path: &Path) -> Vec<u16> {
        std::fs::read(path)
            .unwrap()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    #[test]
    fn synthetic_text_exact_bytes() {
        // Non-ASCII characters sort by code point after ASCII: 'é' U+00E9 < 'ö' U+00F6 <
        // '中' U+4E2D < '🦀' U+1F980. CRLF and a lone CR become LF, as in Python text mode.
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "ab\r\nbé中\rö🦀a").unwrap();
        let out = dir.path().join("out");
        let report = prepare_char(Some(&input), &out).unwrap();
        // Text after newline translation: "ab\nbé中\nö🦀a" = 11 characters.
        // Vocab: ['\n', 'a', 'b', 'é', 'ö', '中', '🦀'].
        // Ids:   a=1 b=2 \n=0 b=2 é=3 中=5 \n=0 ö=4 🦀=6 a=1.
        assert_eq!(report.chars, 10);
        assert_eq!(report.vocab_size, 7);
        // int(10 * 0.9) = 9 train tokens, 1 val token.
        assert_eq!((report.train_tokens, report.val_tokens), (9, 1));
        assert_eq!(report.fallback_reason, None);
        let train = std::fs::read(out.join("train.bin")).unwrap();
        assert_eq!(
            train,
            vec![1, 0, 2, 0, 0, 0, 2, 0, 3, 0, 5, 0, 0, 0, 4, 0, 6, 0]
        );
        assert_eq!(std::fs::read(out.join("val.bin")).unwrap(), vec![1, 0]);
        assert_eq!(
            std::fs::read_to_string(out.join("meta.json")).unwrap(),
            "{\"vocab_size\":7,\"itos\":[\"\\n\",\"a\",\"b\",\"é\",\"ö\",\"中\",\"🦀\"],\"tokenizer\":\"char\"}\n"
        );
        // No temporary files are left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["meta.json", "train.bin", "val.bin"]);
        let shown = report.to_string();
        assert!(shown.contains("vocab size: 7") && shown.contains("train has 9 tokens"));
    }

    #[test]
    fn split_point_matches_python_int_of_float() {
        // n = 1,115,394 -> int(n * 0.9) = 1,003,854 (tiny Shakespeare); n = 10 -> 9;
        // n = 19 -> int(17.1) = 17.
        for (n, want) in [(1_115_394usize, 1_003_854usize), (10, 9), (19, 17), (2, 1)] {
            assert_eq!(((n as f64) * 0.9) as usize, want);
        }
        let dir = tempfile::tempdir().unwrap();
        let text: String = "xyz".repeat(1000).chars().take(1234).collect();
        let r = prepare_char_text(&text, "test", dir.path()).unwrap();
        assert_eq!((r.train_tokens, r.val_tokens), (1110, 124));
        assert_eq!(read_u16(&dir.path().join("val.bin")).len(), 124);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latin1.txt");
        std::fs::write(&p, b"caf\xe9").unwrap();
        let err = prepare_char(Some(&p), dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("offset 3"),
            "{err}"
        );
        std::fs::write(&p, "a").unwrap();
        let err = prepare_char(Some(&p), dir.path()).unwrap_err().to_string();
        assert!(err.contains("1 characters"), "{err}");
        let missing = dir.path().join("missing.txt");
        let err = prepare_char(Some(&missing), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.txt"), "{err}");
    }

    /// Serves `body` once on a loopback port; returns the URL.
    fn serve_once(body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut req = [0u8; 4096];
                let _ = stream.read(&mut req);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}/input.txt")
    }

    #[test]
    fn download_verifies_caches_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"To be, or not to be\n".repeat(50);
        let sha = sha256_hex(&body);
        let url = serve_once(body.clone());
        let corpus = tiny_shakespeare(&url, &sha, dir.path()).unwrap();
        assert!(corpus.fallback_reason.is_none());
        assert_eq!(corpus.text.as_bytes(), &body[..]);
        assert_eq!(std::fs::read(dir.path().join(INPUT_FILE)).unwrap(), body);
        // Second time: no server needed, the cached file is verified and reused.
        let again = tiny_shakespeare("http://127.0.0.1:1/unused", &sha, dir.path()).unwrap();
        assert_eq!(again.text, corpus.text);
        assert!(again.source.contains("input.txt"));
        // A cached file with another hash is not silently replaced or used.
        let err = tiny_shakespeare(&url, TINY_SHAKESPEARE_SHA256, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("input.txt") && err.contains("--input"),
            "{err}"
        );
    }

    #[test]
    fn download_with_wrong_hash_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let url = serve_once(b"not shakespeare".to_vec());
        let err = tiny_shakespeare(&url, TINY_SHAKESPEARE_SHA256, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(TINY_SHAKESPEARE_SHA256) && err.contains(&url),
            "{err}"
        );
        assert!(!dir.path().join(INPUT_FILE).exists());
    }

    #[test]
    fn unreachable_download_falls_back_to_built_in_corpus() {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 on loopback: connection refused at once, no network involved.
        let corpus = tiny_shakespeare(
            "http://127.0.0.1:1/input.txt",
            TINY_SHAKESPEARE_SHA256,
            dir.path(),
        )
        .unwrap();
        assert!(corpus.fallback_reason.is_some());
        assert_eq!(corpus.text, fallback_corpus());
        assert!(!dir.path().join(INPUT_FILE).exists());
        let report = prepare_char_text(&corpus.text, &corpus.source, dir.path()).unwrap();
        assert!(
            report.vocab_size > 60 && report.vocab_size < 200,
            "{report}"
        );
        assert!(report.val_tokens > 1000, "{report}");
    }

    /// Optional: needs the tiny Shakespeare corpus at ../shared/data/tinyshakespeare.txt
    /// (beside the project checkout) or /work/shared/data/tinyshakespeare.txt; skips with a
    /// message otherwise. The sha256 values were produced by nanoGPT's prepare.py algorithm
    /// (Python + numpy) on the same file.
    #[test]
    fn optional_tiny_shakespeare_matches_nanogpt_bytes() {
        let candidates = [
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt"),
            PathBuf::from("/work/shared/data/tinyshakespeare.txt"),
        ];
        let Some(input) = candidates.iter().find(|p| p.exists()) else {
            eprintln!("skipped: tiny Shakespeare corpus not found at {candidates:?}");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let r = prepare_char(Some(input), dir.path()).unwrap();
        assert_eq!(
            (r.chars, r.vocab_size, r.train_tokens, r.val_tokens),
            (1_115_394, 65, 1_003_854, 111_540)
        );
        let sha = |name: &str| sha256_hex(&std::fs::read(dir.path().join(name)).unwrap());
        assert_eq!(sha("train.bin"), TRAIN_SHA256_REF);
        assert_eq!(sha("val.bin"), VAL_SHA256_REF);
    }

    const TRAIN_SHA256_REF: &str =
        "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f";
    const VAL_SHA256_REF: &str = "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1";
}
