//! The run's machine-readable metrics: one JSON object per line in `out_dir/metrics.jsonl`,
//! e.g. `{"kind":"train","iter":100,"loss":3.2,"lr":6e-4,"grad_norm":0.9,"ms":412.0,
//! "tokens_per_s":118000.0,"mfu":0.41}` and `{"kind":"eval","iter":250,"train_loss":3.1,
//! "val_loss":3.3}`. The trainer decides the fields; this module appends lines (each one
//! flushed to the operating system as it is written), trims the log on resume so a
//! crash-and-resume never duplicates points, and reads loss points back for plotting.
//!
//! Non-finite numbers are written as `null` (JSON has no NaN) and are skipped when read.

use crate::fsutil;
use serde::Serialize;
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File name of the metrics log inside `out_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot {action} {}: {source}; check that out_dir exists and is writable", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode a metrics record for {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, MetricsError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MetricsError {
    let path = path.to_path_buf();
    move |source| MetricsError::Io {
        action,
        path,
        source,
    }
}

/// An open metrics log that appends one JSON line per record.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

/// Whether a metrics line survives a resume from `iter`: lines whose `iter` is at most
/// `iter` and lines without an iteration are kept; lines that do not parse (the partial
/// last line of a crashed run) are dropped.
fn keep_line(line: &str, iter: u64) -> bool {
    match serde_json::from_str::<Value>(line) {
        Ok(v) => match v.get("iter").and_then(Value::as_u64) {
            Some(i) => i <= iter,
            None => v.is_object(),
        },
        Err(_) => false,
    }
}

impl MetricsLog {
    /// Opens `out_dir/metrics.jsonl` for appending.
    ///
    /// - `None` (a new run): the log starts empty, replacing any log of an earlier run.
    /// - `Some(iter)` (a resumed run): the existing log is rewritten atomically keeping only
    ///   records with `iter <= iter` (and records without an iteration), so records that
    ///   the crashed run wrote after its checkpoint are not duplicated. Pass the last
    ///   iteration whose records the resumed run will not write again (if it re-evaluates
    ///   the checkpoint's own iteration first, that is the checkpoint's iteration minus 1).
    pub fn open(out_dir: &Path, resume_from_iter: Option<u64>) -> Result<Self> {
        let path = out_dir.join(METRICS_FILE);
        let kept = match resume_from_iter {
            None => String::new(),
            Some(iter) => match fs::read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let mut kept = String::with_capacity(text.len());
                    for line in text.lines().filter(|l| keep_line(l, iter)) {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                    kept
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io_err("read", &path)(e)),
            },
        };
        fsutil::write_atomic(&path, kept.as_bytes()).map_err(io_err("write", &path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(MetricsLog { path, file })
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` (a JSON object such as a `serde_json::Value` or a serialisable
    /// struct) as one line, written with a single call so readers never see half a line.
    pub fn log<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|source| MetricsError::Encode {
            path: self.path.clone(),
            source,
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(io_err("append to", &self.path))
    }
}

/// Loss curves read back from a metrics log, each sorted by iteration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossPoints {
    /// `(iter, loss)` of every `"kind":"train"` record.
    pub train: Vec<(u64, f64)>,
    /// `(iter, train_loss, val_loss)` of every `"kind":"eval"` record.
    pub evals: Vec<(u64, f64, f64)>,
}

fn finite(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// Reads the train and eval loss points of a metrics log. Lines that do not parse, other
/// kinds, and points with missing or non-finite values are skipped.
pub fn read_points(path: &Path) -> Result<LossPoints> {
    let bytes = fs::read(path).map_err(io_err("read", path))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut points = LossPoints::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(iter) = v.get("iter").and_then(Value::as_u64) else {
            continue;
        };
        match v.get("kind").and_then(Value::as_str) {
            Some("train") => {
                if let Some(loss) = finite(&v, "loss") {
                    points.train.push((iter, loss));
                }
            }
            Some("eval") => {
                if let (Some(t), Some(val)) = (finite(&v, "train_loss"), finite(&v, "val_loss")) {
                    points.evals.push((iter, t, val));
                }
            }
            _ => {}
        }
    }
    points.train.sort_by_key(|p| p.0);
    points.evals.sort_by_key(|p| p.0);
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn train(iter: u64, loss: f64) -> Value {
        json!({"kind": "train", "iter": iter, "loss": loss, "lr": 6e-4, "ms": 10.0})
    }

    fn eval(iter: u64, t: f64, v: f64) -> Value {
        json!({"kind": "eval", "iter": iter, "train_loss": t, "val_loss": v})
    }

    #[test]
    fn appends_lines_and_reads_points() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        log.log(&json!({"kind": "start", "device": "cpu"})).unwrap();
        for i in 0..5u64 {
            log.log(&train(i, 4.0 - i as f64 * 0.5)).unwrap();
        }
        log.log(&eval(0, 4.1, 4.2)).unwrap();
        log.log(&eval(4, 2.1, f64::NAN)).unwrap();
        log.log(&train(5, f64::INFINITY)).unwrap();
        log.log(&eval(5, 1.9, 2.05)).unwrap();
        let text = fs::read_to_string(log.path()).unwrap();
        assert_eq!(text.lines().count(), 10);
        assert!(text.ends_with('\n'));
        assert!(text.contains(r#""val_loss":null"#), "{text}");
        let p = read_points(log.path()).unwrap();
        assert_eq!(
            p.train,
            vec![(0, 4.0), (1, 3.5), (2, 3.0), (3, 2.5), (4, 2.0)]
        );
        assert_eq!(p.evals, vec![(0, 4.1, 4.2), (5, 1.9, 2.05)]);
    }

    #[test]
    fn resume_drops_later_records_and_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        log.log(&json!({"kind": "start"})).unwrap();
        for i in 0..40u64 {
            log.log(&train(i, 3.0)).unwrap();
            if i % 10 == 0 {
                log.log(&eval(i, 3.0, 3.1)).unwrap();
            }
        }
        let path = log.path().to_path_buf();
        drop(log);
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"kind":"train","iter":40,"lo"#).unwrap();
        drop(f);

        let mut log = MetricsLog::open(dir.path(), Some(20)).unwrap();
        let p = read_points(&path).unwrap();
        assert_eq!(p.train.len(), 21);
        assert_eq!(p.train.last().unwrap().0, 20);
        assert_eq!(
            p.evals.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0, 10, 20]
        );
        log.log(&train(21, 2.0)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(r#"{"kind":"start"}"#), "{text}");
        assert_eq!(text.lines().count(), 1 + 21 + 3 + 1);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()));
        assert_eq!(read_points(&path).unwrap().train.last(), Some(&(21, 2.0)));

        // Resuming with no log yet, then a new run starting afresh.
        let other = tempfile::tempdir().unwrap();
        MetricsLog::open(other.path(), Some(7)).unwrap();
        assert_eq!(
            read_points(&other.path().join(METRICS_FILE)).unwrap(),
            LossPoints::default()
        );
        drop(log);
        MetricsLog::open(dir.path(), None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn missing_log_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_points(&dir.path().join(METRICS_FILE)).unwrap_err();
        assert!(err.to_string().contains(METRICS_FILE), "{err}");
        let err = MetricsLog::open(&dir.path().join("a/file-not-dir\0"), None).unwrap_err();
        assert!(matches!(err, MetricsError::Io { .. }));
    }
}
