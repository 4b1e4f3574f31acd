//! The one loader behind `TrainConfig::load`, `SampleConfig::load` and `BenchConfig::load`,
//! in the manner of nanoGPT's configurator.py: start from the defaults, apply TOML config
//! files in order, then `--key=value` (or `--key value`) overrides; every value is
//! type-checked against its key, then the whole config is validated.
//!
//! It works on any [`ConfigSchema`]: the defaults are serialized to a TOML table, which also
//! gives each key's type; values are merged into that table and the table is deserialized
//! back into the struct.

use super::{ConfigError, ConfigSchema};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The type of a config key, taken from its default value. Integer keys are unsigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Bool,
    Int,
    Float,
    Str,
    /// A list such as `keep_checkpoints_at` (a TOML array, or a string form).
    List,
}

impl ValueKind {
    /// What to write, for error messages.
    pub fn expected(self) -> &'static str {
        match self {
            ValueKind::Bool => "a boolean (True or False)",
            ValueKind::Int => "a non-negative integer (e.g. 12)",
            ValueKind::Float => "a number (e.g. 6e-4)",
            ValueKind::Str => "a string",
            ValueKind::List => {
                "a list (e.g. [10000, 20000, \"every 50000\"] or \"10000,20000,every 50000\")"
            }
        }
    }

    fn of(v: &Value) -> Option<ValueKind> {
        match v {
            Value::Boolean(_) => Some(ValueKind::Bool),
            Value::Integer(_) => Some(ValueKind::Int),
            Value::Float(_) => Some(ValueKind::Float),
            Value::String(_) => Some(ValueKind::Str),
            Value::Array(_) => Some(ValueKind::List),
            Value::Table(_) | Value::Datetime(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct KeyInfo {
    kind: ValueKind,
    /// Absent by default (an `Option` that is `None`); `none` clears it.
    optional: bool,
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy, Debug)]
enum Origin<'a> {
    File(&'a str),
    CommandLine,
}

impl Origin<'_> {
    fn location(self) -> String {
        match self {
            Origin::File(name) => format!(" in {name}"),
            Origin::CommandLine => String::new(),
        }
    }
}

/// The defaults of one config struct and the type of each key.
struct Schema {
    defaults: Table,
    keys: BTreeMap<String, KeyInfo>,
}

impl Schema {
    fn of<T: ConfigSchema>() -> Schema {
        let defaults = match Value::try_from(T::default()) {
            Ok(Value::Table(t)) => t,
            other => unreachable!(
                "config defaults must serialize to a TOML table of scalars and lists, got {other:?}"
            ),
        };
        let mut keys = BTreeMap::new();
        for (k, v) in &defaults {
            let kind = ValueKind::of(v)
                .unwrap_or_else(|| unreachable!("config key '{k}' must be a scalar or a list"));
            keys.insert(
                k.clone(),
                KeyInfo {
                    kind,
                    optional: false,
                },
            );
        }
        for &(k, kind) in T::OPTIONAL_KEYS {
            keys.insert(
                k.to_string(),
                KeyInfo {
                    kind,
                    optional: true,
                },
            );
        }
        Schema { defaults, keys }
    }

    fn lookup(&self, key: &str, origin: Origin) -> Result<KeyInfo, ConfigError> {
        self.keys
            .get(key)
            .copied()
            .ok_or_else(|| ConfigError::UnknownKey {
                key: key.to_string(),
                location: origin.location(),
                hint: suggestion_hint(key, self.keys.keys().map(String::as_str)),
            })
    }
}

/// `"; did you mean 'batch_size'?"`, or the list of known keys when nothing is close.
fn suggestion_hint<'a>(key: &str, known: impl Iterator<Item = &'a str> + Clone) -> String {
    match closest_key(key, known.clone()) {
        Some(best) => format!("; did you mean '{best}'?"),
        None => format!("; known keys: {}", known.collect::<Vec<_>>().join(", ")),
    }
}

/// The known key closest to `key` by edit distance, if it is close enough to be a typo.
pub fn closest_key<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let key_l = key.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let d = edit_distance(&key_l, k);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    let (d, k) = best?;
    let limit = (key.chars().count() / 3).max(2);
    (d <= limit).then_some(k)
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn is_none_word(s: &str) -> bool {
    matches!(s.trim(), "" | "none" | "None" | "null")
}

/// Checks a TOML value against its key's type; an integer is accepted for a float key.
/// `Ok(None)` clears an optional key.
fn coerce(
    key: &str,
    info: KeyInfo,
    value: Value,
    origin: Origin,
) -> Result<Option<Value>, ConfigError> {
    if info.optional {
        if let Value::String(s) = &value {
            if is_none_word(s) {
                return Ok(None);
            }
        }
    }
    let ok = match (info.kind, value) {
        (ValueKind::Bool, v @ Value::Boolean(_))
        | (ValueKind::Int, v @ Value::Integer(0..))
        | (ValueKind::Str, v @ Value::String(_))
        | (ValueKind::List, v @ (Value::Array(_) | Value::String(_) | Value::Integer(_))) => v,
        (ValueKind::Float, Value::Integer(i)) => Value::Float(i as f64),
        (ValueKind::Float, Value::Float(f)) if f.is_finite() => Value::Float(f),
        (kind, v) => return Err(type_error(key, &v.to_string(), kind, origin)),
    };
    Ok(Some(ok))
}

fn type_error(key: &str, value: &str, kind: ValueKind, origin: Origin) -> ConfigError {
    ConfigError::Type {
        key: key.to_string(),
        value: value.to_string(),
        expected: kind.expected(),
        location: origin.location(),
    }
}

/// Parses a command-line value in nanoGPT's (Python) spelling: `True`/`False`, `12`,
/// `6e-4`, `'out'`, `"out"` or `out`.
fn parse_cli_value(key: &str, info: KeyInfo, raw: &str) -> Result<Value, ConfigError> {
    let err = || type_error(key, raw, info.kind, Origin::CommandLine);
    let t = raw.trim();
    if info.optional && is_none_word(t) {
        return Ok(Value::String(String::new()));
    }
    Ok(match info.kind {
        ValueKind::Bool => match t {
            "True" | "true" => Value::Boolean(true),
            "False" | "false" => Value::Boolean(false),
            _ => return Err(err()),
        },
        ValueKind::Int => Value::Integer(parse_int(t).ok_or_else(err)?),
        ValueKind::Float => match parse_int(t) {
            Some(i) => Value::Integer(i),
            None => {
                let f: f64 = number_text(t).ok_or_else(err)?.parse().map_err(|_| err())?;
                if !f.is_finite() {
                    return Err(err());
                }
                Value::Float(f)
            }
        },
        // Strings are kept exactly as typed (nanoGPT's configurator does the same), so
        // `--start="ROMEO: "` and `--start=the ` both keep their spaces.
        ValueKind::Str => Value::String(if t.starts_with(['"', '\'']) {
            unquote(t)
        } else {
            raw.to_string()
        }),
        ValueKind::List if t.starts_with('[') => {
            let mut table: Table = format!("v = {t}").parse().map_err(|_| err())?;
            table.remove("v").ok_or_else(err)?
        }
        ValueKind::List => Value::String(unquote(t)),
    })
}

/// Digits with Python's `_` separators removed; `None` for text that is not a plain number
/// (this keeps Rust-only spellings such as `inf` or `NaN` out).
fn number_text(t: &str) -> Option<String> {
    let s: String = t.chars().filter(|&c| c != '_').collect();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E'))
        && s.chars().any(|c| c.is_ascii_digit());
    plain.then_some(s)
}

fn parse_int(t: &str) -> Option<i64> {
    let s = number_text(t)?;
    if s.contains(['.', 'e', 'E']) {
        return None;
    }
    s.parse().ok()
}

/// Removes one level of matching `'...'` or `"..."` quotes and resolves Python escapes
/// (`\n`, `\t`, `\r`, `\\`, `\'`, `\"`) inside them. Unquoted text is taken as written.
pub fn unquote(t: &str) -> String {
    let quoted = t.len() >= 2
        && (t.starts_with('"') && t.ends_with('"') || t.starts_with('\'') && t.ends_with('\''));
    if !quoted {
        return t.to_string();
    }
    let inner = &t[1..t.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(e @ ('\\' | '\'' | '"')) => out.push(e),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// One table being built up from the defaults.
struct Builder<T> {
    schema: Schema,
    table: Table,
    _config: std::marker::PhantomData<T>,
}

impl<T: ConfigSchema> Builder<T> {
    fn new() -> Self {
        let schema = Schema::of::<T>();
        let table = schema.defaults.clone();
        Builder {
            schema,
            table,
            _config: std::marker::PhantomData,
        }
    }

    /// Sets one key (already type-checked by kind), then checks that the struct still
    /// deserializes, so values of richer types (lists, unsigned integers) are checked too
    /// and the error names the key.
    fn set(&mut self, key: &str, value: Value, origin: Origin) -> Result<(), ConfigError> {
        let info = self.schema.lookup(key, origin)?;
        let shown = match &value {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let previous = match coerce(key, info, value, origin)? {
            Some(v) => self.table.insert(key.to_string(), v),
            None => self.table.remove(key),
        };
        if let Err(e) = Value::Table(self.table.clone()).try_into::<T>() {
            match previous {
                Some(p) => self.table.insert(key.to_string(), p),
                None => self.table.remove(key),
            };
            return Err(ConfigError::Invalid {
                key: key.to_string(),
                value: shown,
                reason: format!("{}{}", e.message().trim(), origin.location()),
            });
        }
        Ok(())
    }

    fn apply_table(&mut self, table: Table, name: &str) -> Result<(), ConfigError> {
        for (k, v) in table {
            self.set(&k, v, Origin::File(name))?;
        }
        Ok(())
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        if path.extension().is_some_and(|e| e == "py") {
            return Err(ConfigError::BadArgument {
                arg: name,
                hint: "nanoGPT's Python config files are not read; use the TOML file of the same name in configs/ (e.g. configs/train_shakespeare_char.toml)".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let table = parse_table(&text, &name)?;
        self.apply_table(table, &name)
    }

    fn finish(self) -> Result<T, ConfigError> {
        let cfg: T = Value::Table(self.table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                key: "(config)".into(),
                value: String::new(),
                reason: e.message().to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_table(text: &str, name: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        path: PathBuf::from(name),
        message: e.to_string().trim().to_string(),
    })
}

/// A parsed command line: config files, then overrides.
struct Args {
    files: Vec<PathBuf>,
    overrides: Vec<(String, String)>,
}

fn split_args(args: &[String], schema: &Schema) -> Result<Args, ConfigError> {
    let mut files = Vec::new();
    let mut overrides = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if let Some(body) = arg.strip_prefix("--") {
            let (key, value) = match body.split_once('=') {
                Some((k, v)) => (k.replace('-', "_"), Some(v.to_string())),
                None => (body.replace('-', "_"), None),
            };
            if key.is_empty() {
                return Err(ConfigError::BadArgument {
                    arg: arg.clone(),
                    hint: "write overrides as --key=value".into(),
                });
            }
            let info = schema.lookup(&key, Origin::CommandLine)?;
            let value = match value {
                Some(v) => v,
                None => match args.get(i) {
                    Some(next) if !next.starts_with("--") => {
                        i += 1;
                        next.clone()
                    }
                    // A bare boolean flag, e.g. `--eval_only`, means True.
                    _ if info.kind == ValueKind::Bool => "True".to_string(),
                    _ => return Err(ConfigError::MissingValue { key }),
                },
            };
            overrides.push((key, value));
        } else if arg.starts_with('-') {
            return Err(ConfigError::BadArgument {
                arg: arg.clone(),
                hint: "overrides are written --key=value; other arguments are TOML config files"
                    .into(),
            });
        } else if arg.contains('=') && !Path::new(arg).exists() {
            return Err(ConfigError::BadArgument {
                arg: arg.clone(),
                hint: format!("this is not a config file; write overrides as --{arg}"),
            });
        } else {
            files.push(PathBuf::from(arg));
        }
    }
    Ok(Args { files, overrides })
}

/// Defaults, then each config file in order, then each override in order; validated.
pub fn load<T: ConfigSchema>(args: &[String]) -> Result<T, ConfigError> {
    let mut b = Builder::<T>::new();
    let parsed = split_args(args, &b.schema)?;
    for f in &parsed.files {
        b.apply_file(f)?;
    }
    for (key, raw) in &parsed.overrides {
        let info = b.schema.lookup(key, Origin::CommandLine)?;
        let value = parse_cli_value(key, info, raw)?;
        b.set(key, value, Origin::CommandLine)?;
    }
    b.finish()
}

/// Defaults overlaid with one TOML document (`name` is used in error messages).
pub fn from_toml_str<T: ConfigSchema>(text: &str, name: &str) -> Result<T, ConfigError> {
    let mut b = Builder::<T>::new();
    let table = parse_table(text, name)?;
    b.apply_table(table, name)?;
    b.finish()
}

/// The names of all keys, sorted.
pub fn known_keys<T: ConfigSchema>() -> Vec<String> {
    Schema::of::<T>().keys.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_values() {
        assert_eq!(edit_distance("batchsize", "batch_size"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn closest_key_picks_typos_only() {
        let keys = ["batch_size", "block_size", "learning_rate", "n_layer"];
        assert_eq!(
            closest_key("batchsize", keys.iter().copied()),
            Some("batch_size")
        );
        assert_eq!(
            closest_key("n_layers", keys.iter().copied()),
            Some("n_layer")
        );
        assert_eq!(
            closest_key("learningrate", keys.iter().copied()),
            Some("learning_rate")
        );
        assert_eq!(closest_key("zzzzzzzzzzzzzz", keys.iter().copied()), None);
    }

    #[test]
    fn unquote_python_strings() {
        assert_eq!(unquote("'out'"), "out");
        assert_eq!(unquote("\"out\""), "out");
        assert_eq!(unquote("out"), "out");
        assert_eq!(unquote("'a\\nb'"), "a\nb");
        assert_eq!(unquote("a\\nb"), "a\\nb");
        assert_eq!(unquote("'"), "'");
        assert_eq!(unquote("'it\\'s'"), "it's");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_int("600_000"), Some(600_000));
        assert_eq!(parse_int("-3"), Some(-3));
        assert_eq!(parse_int("1.0"), None);
        assert_eq!(parse_int("6e5"), None);
        assert_eq!(parse_int("abc"), None);
        assert_eq!(number_text("inf"), None);
        assert_eq!(number_text("6e-4").as_deref(), Some("6e-4"));
    }
}
