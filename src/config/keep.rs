//! [`KeepSchedule`]: which training iterations keep their checkpoint for good (the
//! `keep_checkpoints_at` key). Written as explicit iterations plus an optional
//! "every N" rule, in TOML as `[10000, 20000, "every 50000"]` or on the command line as
//! `--keep_checkpoints_at="10000,20000,every 50000"`.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Iterations whose checkpoints are kept: the listed ones, plus every multiple of `every`
/// (iteration 0 excluded). The default keeps none beyond the latest checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepSchedule {
    /// Explicit iterations, sorted and without duplicates.
    pub iters: Vec<u64>,
    /// Keep every `every`-th iteration (`every >= 1`).
    pub every: Option<u64>,
}

impl KeepSchedule {
    /// Whether the checkpoint written at iteration `iter` is kept.
    pub fn keeps(&self, iter: u64) -> bool {
        self.iters.binary_search(&iter).is_ok()
            || self
                .every
                .is_some_and(|n| iter > 0 && iter.is_multiple_of(n))
    }

    /// True when no checkpoint is kept beyond the latest one.
    pub fn is_empty(&self) -> bool {
        self.iters.is_empty() && self.every.is_none()
    }

    /// Adds one item: an iteration (`"10000"`, `"10_000"`) or a rule (`"every 50000"`).
    fn add_item(&mut self, item: &str) -> Result<(), String> {
        let item = item.trim();
        if item.is_empty() {
            return Ok(());
        }
        let lower = item.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("every") {
            let n = parse_u64(rest.trim()).ok_or_else(|| {
                format!("'{item}' is not a rule; write it as \"every N\" with N a positive integer")
            })?;
            if n == 0 {
                return Err(format!("'{item}': N in \"every N\" must be at least 1"));
            }
            if let Some(old) = self.every.filter(|&old| old != n) {
                return Err(format!(
                    "two \"every\" rules (every {old} and every {n}); keep one and list other iterations explicitly"
                ));
            }
            self.every = Some(n);
        } else {
            let it = parse_u64(item).ok_or_else(|| {
                format!("'{item}' is neither an iteration (a non-negative integer) nor a rule like \"every 50000\"")
            })?;
            self.add_iter(it);
        }
        Ok(())
    }

    fn add_iter(&mut self, it: u64) {
        if let Err(pos) = self.iters.binary_search(&it) {
            self.iters.insert(pos, it);
        }
    }

    /// Adds a comma-separated list of items.
    fn add_list(&mut self, text: &str) -> Result<(), String> {
        text.split(',').try_for_each(|item| self.add_item(item))
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let digits: String = s.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl FromStr for KeepSchedule {
    type Err = String;

    /// Parses `"10000,20000,every 50000"`; the empty string is the empty schedule.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut k = KeepSchedule::default();
        k.add_list(s)?;
        Ok(k)
    }
}

impl fmt::Display for KeepSchedule {
    /// The command-line form, e.g. `10000,20000,every 50000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.iters.iter().map(|i| i.to_string()).collect();
        if let Some(n) = self.every {
            parts.push(format!("every {n}"));
        }
        f.write_str(&parts.join(","))
    }
}

impl Serialize for KeepSchedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = self.iters.len() + usize::from(self.every.is_some());
        let mut seq = serializer.serialize_seq(Some(len))?;
        for it in &self.iters {
            seq.serialize_element(it)?;
        }
        if let Some(n) = self.every {
            seq.serialize_element(&format!("every {n}"))?;
        }
        seq.end()
    }
}

/// One array element: an iteration number or a string item (which may itself be a list).
enum Item {
    Int(i64),
    Str(String),
}

struct ItemVisitor;

impl Visitor<'_> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an iteration number or a rule such as \"every 50000\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
        Ok(Item::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
        i64::try_from(v)
            .map(Item::Int)
            .map_err(|_| E::custom(format!("iteration {v} is too large")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(Item::Str(v.to_string()))
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

struct KeepVisitor;

impl<'de> Visitor<'de> for KeepVisitor {
    type Value = KeepSchedule;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of iterations and \"every N\" rules, e.g. [10000, 20000, \"every 50000\"] or \"10000,20000,every 50000\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeepSchedule, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeepSchedule, E> {
        let mut k = KeepSchedule::default();
        add_int(&mut k, v).map_err(E::custom)?;
        Ok(k)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeepSchedule, E> {
        let mut k = KeepSchedule::default();
        k.add_iter(v);
        Ok(k)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeepSchedule, A::Error> {
        let mut k = KeepSchedule::default();
        while let Some(item) = seq.next_element::<Item>()? {
            match item {
                Item::Int(v) => add_int(&mut k, v),
                Item::Str(s) => k.add_list(&s),
            }
            .map_err(de::Error::custom)?;
        }
        Ok(k)
    }
}

fn add_int(k: &mut KeepSchedule, v: i64) -> Result<(), String> {
    let it = u64::try_from(v).map_err(|_| format!("iteration {v} is negative"))?;
    k.add_iter(it);
    Ok(())
}

impl<'de> Deserialize<'de> for KeepSchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeepVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iterations_and_rule() {
        let k: KeepSchedule = "20000, 10000,every 50000,10_000".parse().unwrap();
        assert_eq!(k.iters, vec![10000, 20000]);
        assert_eq!(k.every, Some(50000));
        assert!(k.keeps(10000) && k.keeps(20000) && k.keeps(50000) && k.keeps(150000));
        assert!(!k.keeps(0) && !k.keeps(30000) && !k.keeps(50001));
        assert_eq!(k.to_string(), "10000,20000,every 50000");
        assert_eq!(k.to_string().parse::<KeepSchedule>().unwrap(), k);
    }

    #[test]
    fn empty_keeps_nothing() {
        let k: KeepSchedule = "".parse().unwrap();
        assert!(k.is_empty());
        assert!(!k.keeps(0) && !k.keeps(1000));
        assert_eq!(k.to_string(), "");
    }

    #[test]
    fn rejects_bad_items() {
        for bad in [
            "abc",
            "every",
            "every 0",
            "every x",
            "-5",
            "1.5",
            "every 10,every 20",
        ] {
            let err = bad.parse::<KeepSchedule>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        // Repeating the same rule is harmless.
        let k: KeepSchedule = "every 10, every 10".parse().unwrap();
        assert_eq!(k.every, Some(10));
    }

    #[test]
    fn toml_array_forms() {
        #[derive(Deserialize, Serialize)]
        struct W {
            k: KeepSchedule,
        }
        let w: W = toml::from_str(r#"k = [30, 10, "every 100", "5,7"]"#).unwrap();
        assert_eq!(w.k.iters, vec![5, 7, 10, 30]);
        assert_eq!(w.k.every, Some(100));
        let text = toml::to_string(&w).unwrap();
        assert_eq!(text.trim(), r#"k = [5, 7, 10, 30, "every 100"]"#);
        let w2: W = toml::from_str(r#"k = "10,every 4""#).unwrap();
        assert!(w2.k.keeps(8) && w2.k.keeps(10) && !w2.k.keeps(9));
        let w3: W = toml::from_str("k = 40").unwrap();
        assert_eq!(w3.k.iters, vec![40]);
        assert!(toml::from_str::<W>("k = [-1]").is_err());
        assert!(toml::from_str::<W>("k = [1.5]").is_err());
    }
}
