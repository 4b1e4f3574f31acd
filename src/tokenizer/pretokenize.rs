//! GPT-2's pre-tokenizer: splits text into the pieces that BPE encodes one by one.
//!
//! The split is the one OpenAI's regular expression defines (tiktoken's `r50k_base`/`gpt2`
//! pattern):
//!
//! ```text
//! '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//! ```
//!
//! implemented as a hand-written scanner instead of a backtracking regex engine. The
//! Unicode classes (`\p{L}`, `\p{N}`, `\s`) come from `regex-syntax`, the tables the regex
//! crates behind tiktoken use, so both agree on every code point.

use std::sync::LazyLock;

/// Character class of a code point, as far as the GPT-2 pattern cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    /// Neither a letter, a number nor white space (`[^\s\p{L}\p{N}]`).
    Other = 0,
    /// `\p{L}`.
    Letter = 1,
    /// `\p{N}`.
    Number = 2,
    /// `\s` (Unicode White_Space).
    Space = 3,
}

struct ClassTable {
    /// Class of every code point below U+10000.
    bmp: Vec<u8>,
    /// Sorted, non-overlapping `(start, end_inclusive, class)` ranges above U+FFFF.
    astral: Vec<(u32, u32, u8)>,
}

static TABLE: LazyLock<ClassTable> = LazyLock::new(build_table);

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(true)
        .build()
        .parse(pattern)
        .expect("the built-in class pattern is valid");
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => unreachable!("a Unicode class pattern parses to a class, got {other:?}"),
    }
}

fn build_table() -> ClassTable {
    let mut bmp = vec![Class::Other as u8; 0x10000];
    let mut astral = Vec::new();
    for (pattern, class) in [
        (r"\p{L}", Class::Letter),
        (r"\p{N}", Class::Number),
        (r"\s", Class::Space),
    ] {
        for (start, end) in unicode_ranges(pattern) {
            for cp in start..=end.min(0xFFFF) {
                bmp[cp as usize] = class as u8;
            }
            if end > 0xFFFF {
                astral.push((start.max(0x10000), end, class as u8));
            }
        }
    }
    astral.sort_unstable();
    ClassTable { bmp, astral }
}

/// The class of `c`.
#[inline]
pub fn class_of(c: char) -> Class {
    let cp = c as u32;
    let t = &*TABLE;
    let code = if cp < 0x10000 {
        t.bmp[cp as usize]
    } else {
        match t.astral.binary_search_by(|&(s, e, _)| {
            if e < cp {
                std::cmp::Ordering::Less
            } else if s > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => t.astral[i].2,
            Err(_) => Class::Other as u8,
        }
    };
    match code {
        1 => Class::Letter,
        2 => Class::Number,
        3 => Class::Space,
        _ => Class::Other,
    }
}

/// Class of the ASCII bytes (the common case, without touching the big table).
static ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            1
        } else if c.is_ascii_digit() {
            2
        } else if matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            3
        } else {
            0
        };
        b += 1;
    }
    t
};

/// Class and byte length of the character starting at byte `i` of `s` (a char boundary).
#[inline(always)]
fn char_at(s: &str, i: usize) -> (Class, usize) {
    let b = s.as_bytes()[i];
    if b < 0x80 {
        let class = match ASCII[b as usize] {
            1 => Class::Letter,
            2 => Class::Number,
            3 => Class::Space,
            _ => Class::Other,
        };
        return (class, 1);
    }
    // `i` is a char boundary of a valid &str, so a character starts here.
    let c = s[i..]
        .chars()
        .next()
        .expect("a char boundary inside the text");
    (class_of(c), c.len_utf8())
}

/// End (exclusive byte offset) of the run of characters of `class` starting at `i`.
#[inline(always)]
fn run_end(s: &str, mut i: usize, class: Class) -> usize {
    let bytes = s.as_bytes();
    while i < bytes.len() {
        let (c, len) = char_at(s, i);
        if c != class {
            break;
        }
        i += len;
    }
    i
}

/// Iterator over the pieces of `text` (consecutive, non-empty, covering the whole text).
pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

/// Splits `text` into GPT-2 pre-tokenizer pieces.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let s = self.text;
        let i = self.pos;
        if i >= s.len() {
            return None;
        }
        let end = piece_end(s, i);
        self.pos = end;
        Some(&s[i..end])
    }
}

/// End of the piece that starts at byte `i` (leftmost-first alternation of the pattern).
#[inline]
fn piece_end(s: &str, i: usize) -> usize {
    let bytes = s.as_bytes();
    let n = bytes.len();
    let b = bytes[i];
    // '(?:[sdmt]|ll|ve|re)
    if b == b'\'' && i + 1 < n {
        match bytes[i + 1] {
            b's' | b'd' | b'm' | b't' => return i + 2,
            b'l' if i + 2 < n && bytes[i + 2] == b'l' => return i + 3,
            b'v' | b'r' if i + 2 < n && bytes[i + 2] == b'e' => return i + 3,
            _ => {}
        }
    }
    let (class, len) = char_at(s, i);
    match class {
        Class::Letter | Class::Number | Class::Other => run_end(s, i + len, class),
        Class::Space => {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a space glued to the next run.
            if b == b' ' && i + 1 < n {
                let (next, next_len) = char_at(s, i + 1);
                if next != Class::Space {
                    return run_end(s, i + 1 + next_len, next);
                }
            }
            // `\s+(?!\S)|\s+`: a run of white space; when a non-space follows, the last
            // white-space character is left to start the next piece (unless it is the only one).
            let mut j = i + len;
            let mut last = i;
            while j < n {
                let (c, l) = char_at(s, j);
                if c != Class::Space {
                    break;
                }
                last = j;
                j += l;
            }
            if j == n || last == i {
                j
            } else {
                last
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn splits_like_the_gpt2_pattern() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(
            split("I'm can't we'll 'S"),
            ["I", "'m", " can", "'t", " we", "'ll", " '", "S"]
        );
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(split("x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(split("x\ny  "), ["x", "\n", "y", "  "]);
        assert_eq!(split("12345 678"), ["12345", " 678"]);
        assert_eq!(split("!!'s ?!"), ["!!'", "s", " ?!"]);
        assert_eq!(split("日本語 text"), ["日本語", " text"]);
        assert_eq!(split("e\u{301}"), ["e", "\u{301}"]);
        assert_eq!(split("\u{3000}\u{3000}x"), ["\u{3000}", "\u{3000}", "x"]);
        assert_eq!(split(""), Vec::<&str>::new());
        assert_eq!(class_of('𝔘'), Class::Letter);
        assert_eq!(class_of('🦀'), Class::Other);
        assert_eq!(class_of('٣'), Class::Number);
        assert_eq!(class_of('\u{85}'), Class::Space);
    }
}
