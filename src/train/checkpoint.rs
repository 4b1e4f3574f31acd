//! Training checkpoints: one safetensors file per checkpoint holding the model weights
//! (f32, Hugging Face GPT-2 names and shapes), optionally the AdamW moments, and the
//! training state needed for an exact resume, so the whole checkpoint is replaced
//! atomically and its parts can never disagree after a crash.
//!
//! File layout (standard safetensors, readable by any safetensors reader):
//!
//! ```text
//! u64 little-endian header length N
//! N bytes of JSON, padded with spaces to a multiple of 8:
//!   { "<tensor name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...
//!     "__metadata__": { "format": "nanogpt-rs-checkpoint", "format_version": "1",
//!                       "state": "<TrainingState as JSON>", "crc32": "<8 hex digits>" } }
//! tensor data: every tensor of the ParamLayout in layout order (so the data section starts
//!   with the flat parameter buffer), then "optimizer.exp_avg" [total] and
//!   "optimizer.exp_avg_sq" [total] when optimizer state is saved
//! ```
//!
//! `crc32` is the CRC-32 (IEEE) of the whole data section. Files in a run directory
//! (see [`CheckpointPaths`]): `ckpt.safetensors` (latest), `best.safetensors` (best
//! validation loss) and kept iterations `ckpt_{iter:06}.safetensors`. Several of these
//! names may be hard links to one file; that is safe because every write replaces a
//! name by renaming a new file over it and never modifies a file in place.

use crate::engine::OptimizerState;
use crate::fsutil;
use crate::model::{GptConfig, ParamLayout};
use crc32fast::Hasher;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// `format` metadata value that marks a nanogpt-rs checkpoint.
pub const FORMAT: &str = "nanogpt-rs-checkpoint";
/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: &str = "1";
/// Tensor name of the AdamW first moment, flat `[total]` in the parameter layout.
pub const EXP_AVG: &str = "optimizer.exp_avg";
/// Tensor name of the AdamW second moment, flat `[total]` in the parameter layout.
pub const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq";
/// File name of the latest checkpoint in a run directory.
pub const LATEST_NAME: &str = "ckpt.safetensors";
/// File name of the best-validation-loss checkpoint in a run directory.
pub const BEST_NAME: &str = "best.safetensors";

/// Largest header accepted (the safetensors limit); a 1.5B-parameter model needs ~40 kB.
const MAX_HEADER_LEN: u64 = 100 << 20;
/// Floats converted per buffer while streaming tensor data.
const STREAM_CHUNK: usize = 1 << 16;
/// Floats per parallel task when checksumming or converting.
const PAR_CHUNK: usize = 1 << 20;

/// Everything besides tensors that an exact resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// The next iteration to run (nanoGPT's `iter_num` at save time).
    pub iter_num: u64,
    /// Best validation loss so far; stored as JSON `null` while it is not finite.
    #[serde(with = "finite_or_null")]
    pub best_val_loss: f64,
    /// The model architecture; loading rebuilds the parameter layout from it.
    pub model: GptConfig,
    /// The effective training configuration (opaque to this module).
    pub config: Value,
    /// State of the engine's dropout generator.
    pub engine_rng: [u64; 4],
    /// Data loader state (opaque to this module).
    pub loader: Value,
    /// AdamW step count; on save it is taken from the optimizer state when one is present.
    pub optimizer_step: u64,
    pub tokens_seen: u64,
    pub world_size: u64,
}

/// Serialises non-finite floats (e.g. the initial `inf` best loss) as `null`, which reads
/// back as `+inf`.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// One checkpoint in memory: the flat parameter buffer (in `ParamLayout` order), optional
/// AdamW state and the training state.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub params: Vec<f32>,
    pub optimizer: Option<OptimizerState>,
    pub state: TrainingState,
}

/// What [`inspect`] learns from a checkpoint's header without reading its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub state: TrainingState,
    /// Whether the file holds AdamW state (required to resume training exactly).
    pub has_optimizer: bool,
    /// Size of the file in bytes.
    pub file_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "no checkpoint at {}: to start a new run set init_from=scratch, or set out_dir to \
         the directory that holds {LATEST_NAME}",
        path.display()
    )]
    Missing { path: PathBuf },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} is truncated: it has {size} bytes but its header needs {expected}; the file is \
         incomplete (an interrupted copy or a full disk); {hint}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        size: u64,
        expected: u64,
        hint: String,
    },

    #[error(
        "{} is corrupt: the checksum of its tensor data is {found:08x} but its header \
         records {expected:08x}; {hint}",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        expected: u32,
        found: u32,
        hint: String,
    },

    #[error(
        "{} is not a nanogpt-rs checkpoint ({reason}); to start from Hugging Face GPT-2 \
         weights set init_from=<dir> to the directory that holds that model.safetensors and \
         its config.json",
        path.display()
    )]
    Foreign { path: PathBuf, reason: String },

    #[error(
        "{} has a damaged checkpoint header: {reason}; load an earlier checkpoint instead",
        path.display()
    )]
    Malformed { path: PathBuf, reason: String },

    #[error(
        "{} has no tensor '{tensor}', which the model in its header needs; the file was not \
         written by this program or was edited",
        path.display()
    )]
    MissingTensor { path: PathBuf, tensor: String },

    #[error(
        "{}: tensor '{tensor}' has shape {found:?} but the model in its header needs \
         {expected:?}; the file was not written by this program or was edited",
        path.display()
    )]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{}: tensor '{tensor}' has dtype {found}; checkpoints store F32", path.display())]
    Dtype {
        path: PathBuf,
        tensor: String,
        found: String,
    },

    #[error(
        "{} has checkpoint format_version \"{found}\" but this build reads version \
         {FORMAT_VERSION}; use the nanogpt release that wrote it",
        path.display()
    )]
    Version { path: PathBuf, found: String },

    #[error(
        "{} holds no optimizer state, so training cannot resume from it exactly; use it to \
         sample or to seed a new run, or resume from a checkpoint saved with optimizer state",
        path.display()
    )]
    NoOptimizer { path: PathBuf },

    #[error("cannot save a checkpoint to {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        action,
        path,
        source,
    }
}

// ----------------------------------------------------------------------------------------
// Paths

/// Checkpoint file names inside a run directory (`out_dir`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPaths {
    dir: PathBuf,
}

impl CheckpointPaths {
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        CheckpointPaths {
            dir: out_dir.into(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `out_dir/ckpt.safetensors`: the latest checkpoint, the one `init_from=resume` reads.
    pub fn latest(&self) -> PathBuf {
        self.dir.join(LATEST_NAME)
    }

    /// `out_dir/best.safetensors`: the checkpoint with the best validation loss.
    pub fn best(&self) -> PathBuf {
        self.dir.join(BEST_NAME)
    }

    /// `out_dir/ckpt_{iter:06}.safetensors`, e.g. `ckpt_010000.safetensors`.
    pub fn kept(&self, iter: u64) -> PathBuf {
        self.dir.join(format!("ckpt_{iter:06}.safetensors"))
    }

    /// Kept checkpoints in this directory, sorted by iteration; see [`list_kept`].
    pub fn list_kept(&self) -> Result<Vec<(u64, PathBuf)>> {
        list_kept(&self.dir)
    }
}

/// Iteration of a kept-checkpoint file name (`ckpt_<digits>.safetensors`), else `None`.
fn kept_iter(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt_")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Kept checkpoints `ckpt_{iter:06}.safetensors` in `out_dir`, sorted by iteration.
/// Temporary files of interrupted writes and other files are ignored; a directory that
/// does not exist holds none.
pub fn list_kept(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(out_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list the directory", out_dir)(e)),
    };
    let mut kept = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list the directory", out_dir))?;
        let name = entry.file_name();
        if let Some(iter) = name.to_str().and_then(kept_iter) {
            kept.push((iter, entry.path()));
        }
    }
    kept.sort();
    Ok(kept)
}

/// Deletes all but the `keep_last` newest kept checkpoints in `out_dir` and returns the
/// deleted paths. `ckpt.safetensors` and `best.safetensors` are never touched.
pub fn prune_kept(out_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    let kept = list_kept(out_dir)?;
    let n_remove = kept.len().saturating_sub(keep_last);
    let mut removed = Vec::with_capacity(n_remove);
    for (_, path) in kept.into_iter().take(n_remove) {
        fs::remove_file(&path).map_err(io_err("delete old checkpoint", &path))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Text for error messages: where else an intact checkpoint may be found.
fn previous_hint(path: &Path) -> String {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let paths = CheckpointPaths::new(&dir);
    let mut others: Vec<PathBuf> = Vec::new();
    for p in [paths.latest(), paths.best()] {
        if p.is_file() {
            others.push(p);
        }
    }
    if let Ok(kept) = list_kept(&dir) {
        others.extend(kept.into_iter().rev().map(|(_, p)| p));
    }
    let same = |p: &PathBuf| p.file_name() == path.file_name();
    let others: Vec<String> = others
        .iter()
        .filter(|p| !same(p))
        .map(|p| p.display().to_string())
        .collect();
    if others.is_empty() {
        format!(
            "no other checkpoint is in {}; start again with init_from=scratch",
            dir.display()
        )
    } else {
        format!("a previous checkpoint may be at {}", others.join(", "))
    }
}

// ----------------------------------------------------------------------------------------
// Checksums and conversions

/// CRC-32 of `data` as little-endian bytes, computed in parallel.
fn crc_f32(data: &[f32]) -> Hasher {
    let parts: Vec<Hasher> = data
        .par_chunks(PAR_CHUNK)
        .map(|chunk| {
            let mut h = Hasher::new();
            let mut buf = Vec::with_capacity(STREAM_CHUNK * 4);
            for sub in chunk.chunks(STREAM_CHUNK) {
                buf.clear();
                for x in sub {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                h.update(&buf);
            }
            h
        })
        .collect();
    combine(parts)
}

/// CRC-32 of `data`, computed in parallel.
fn crc_bytes(data: &[u8]) -> Hasher {
    let parts: Vec<Hasher> = data
        .par_chunks(PAR_CHUNK * 4)
        .map(|chunk| {
            let mut h = Hasher::new();
            h.update(chunk);
            h
        })
        .collect();
    combine(parts)
}

fn combine(parts: Vec<Hasher>) -> Hasher {
    let mut h = Hasher::new();
    for p in &parts {
        h.combine(p);
    }
    h
}

/// Streams `data` as little-endian bytes without a full second copy.
fn write_f32<W: Write>(w: &mut W, data: &[f32]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(STREAM_CHUNK * 4);
    for chunk in data.chunks(STREAM_CHUNK) {
        buf.clear();
        for x in chunk {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Decodes little-endian f32 bytes into `dst` (`src.len() == 4 * dst.len()`), in parallel.
fn read_f32(src: &[u8], dst: &mut [f32]) {
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK * 4))
        .for_each(|(d, s)| {
            for (x, b) in d.iter_mut().zip(s.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        });
}

// ----------------------------------------------------------------------------------------
// Save

/// The header JSON, padded with spaces to a multiple of 8 bytes.
fn build_header(
    layout: &ParamLayout,
    with_optimizer: bool,
    state: &TrainingState,
    crc: u32,
) -> std::result::Result<Vec<u8>, serde_json::Error> {
    let mut header = Map::new();
    let mut entry = |name: &str, shape: &[usize], begin: usize, len: usize| {
        header.insert(
            name.to_string(),
            json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [begin * 4, (begin + len) * 4],
            }),
        );
    };
    for t in &layout.tensors {
        entry(&t.name, &t.shape, t.offset, t.len);
    }
    let total = layout.total;
    if with_optimizer {
        entry(EXP_AVG, &[total], total, total);
        entry(EXP_AVG_SQ, &[total], 2 * total, total);
    }
    let metadata = json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state": serde_json::to_string(state)?,
        "crc32": format!("{crc:08x}"),
    });
    header.insert("__metadata__".to_string(), metadata);
    let mut bytes = serde_json::to_vec(&Value::Object(header))?;
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// Writes the header length, header and tensor data of a validated checkpoint.
fn write_body<W: Write>(w: &mut W, header: &[u8], ckpt: &Checkpoint) -> io::Result<()> {
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header)?;
    write_f32(w, &ckpt.params)?;
    if let Some(opt) = &ckpt.optimizer {
        write_f32(w, &opt.m)?;
        write_f32(w, &opt.v)?;
    }
    Ok(())
}

/// Checks a checkpoint against its layout and returns the header to write.
fn prepare(path: &Path, layout: &ParamLayout, ckpt: &Checkpoint) -> Result<Vec<u8>> {
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if *layout != ParamLayout::new(&ckpt.state.model) {
        return Err(invalid(
            "the parameter layout does not belong to the model config in the training state".into(),
        ));
    }
    if ckpt.params.len() != layout.total {
        return Err(invalid(format!(
            "{} parameters given but the model has {}",
            ckpt.params.len(),
            layout.total
        )));
    }
    let mut state = ckpt.state.clone();
    if let Some(opt) = &ckpt.optimizer {
        if opt.m.len() != layout.total || opt.v.len() != layout.total {
            return Err(invalid(format!(
                "optimizer moments have {} and {} values but the model has {} parameters",
                opt.m.len(),
                opt.v.len(),
                layout.total
            )));
        }
        state.optimizer_step = opt.step;
    }
    let mut crc = crc_f32(&ckpt.params);
    if let Some(opt) = &ckpt.optimizer {
        crc.combine(&crc_f32(&opt.m));
        crc.combine(&crc_f32(&opt.v));
    }
    build_header(layout, ckpt.optimizer.is_some(), &state, crc.finalize())
        .map_err(|e| invalid(format!("cannot encode the training state: {e}")))
}

/// Writes `ckpt` to `path` as one safetensors file, atomically (temporary file, fsync,
/// rename): after a crash `path` holds either the previous checkpoint or this one.
/// `layout` must be `ParamLayout::new(&ckpt.state.model)`.
pub fn save(path: &Path, layout: &ParamLayout, ckpt: &Checkpoint) -> Result<()> {
    let header = prepare(path, layout, ckpt)?;
    fsutil::write_atomic_with(path, |w| write_body(w, &header, ckpt))
        .map_err(io_err("write checkpoint", path))
}

/// Writes `ckpt` once to `paths[0]`, then gives every other path the same file (hard link
/// where the file system allows it, else a copy), each replaced atomically. Duplicate
/// paths are written once. Typical use: `[latest(), kept(iter)]` or `[latest(), best()]`.
pub fn save_to_all(paths: &[PathBuf], layout: &ParamLayout, ckpt: &Checkpoint) -> Result<()> {
    let Some((first, rest)) = paths.split_first() else {
        return Ok(());
    };
    save(first, layout, ckpt)?;
    for (i, p) in rest.iter().enumerate() {
        if p != first && !rest[..i].contains(p) {
            link_or_copy(first, p)?;
        }
    }
    Ok(())
}

/// Atomically makes `dst` a copy of `src`: a hard link to a temporary sibling renamed over
/// `dst`, or, where hard links are not possible, an atomic copy.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let tmp = fsutil::temp_path(dst);
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(src, &tmp).is_ok() {
        let renamed = fs::rename(&tmp, dst);
        // rename() between two names of one file succeeds without removing the source.
        let _ = fs::remove_file(&tmp);
        renamed.map_err(io_err("replace", dst))?;
        if let Some(dir) = dst.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        return Ok(());
    }
    let mut from = File::open(src).map_err(io_err("read", src))?;
    fsutil::write_atomic_with(dst, |w| io::copy(&mut from, w).map(|_| ()))
        .map_err(io_err("copy checkpoint to", dst))
}

// ----------------------------------------------------------------------------------------
// Load

/// One tensor entry of a safetensors header.
#[derive(Debug)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// A parsed, validated header.
struct Header {
    state: TrainingState,
    crc: u32,
    tensors: Map<String, Value>,
    /// Offset of the data section in the file.
    data_start: u64,
    /// Length of the data section (the largest tensor end offset).
    data_len: u64,
    file_bytes: u64,
}

impl Header {
    fn entry(&self, path: &Path, name: &str) -> Result<Option<Entry>> {
        let Some(v) = self.tensors.get(name) else {
            return Ok(None);
        };
        parse_entry(path, name, v).map(Some)
    }
}

fn parse_entry(path: &Path, name: &str, v: &Value) -> Result<Entry> {
    let malformed = || CheckpointError::Malformed {
        path: path.to_path_buf(),
        reason: format!("the entry of tensor '{name}' is not a safetensors tensor description"),
    };
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(malformed)?;
    let shape = v
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(malformed)?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(malformed)?;
    let offs = v
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(malformed)?;
    let (begin, end) = match offs.as_slice() {
        [b, e] => (
            b.as_u64().ok_or_else(malformed)?,
            e.as_u64().ok_or_else(malformed)?,
        ),
        _ => return Err(malformed()),
    };
    if end < begin {
        return Err(malformed());
    }
    Ok(Entry {
        dtype: dtype.to_string(),
        shape,
        begin,
        end,
    })
}

fn open(path: &Path) -> Result<(File, u64)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("open checkpoint", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("read", path))?;
    if meta.is_dir() {
        return Err(CheckpointError::Foreign {
            path: path.to_path_buf(),
            reason: "it is a directory".into(),
        });
    }
    Ok((file, meta.len()))
}

/// Reads and checks the header: safetensors framing, nanogpt-rs metadata, format version,
/// training state, tensor entries, and that the file is as long as the header says.
fn read_header(path: &Path, file: &mut File, size: u64) -> Result<Header> {
    let truncated = |expected: u64| CheckpointError::Truncated {
        path: path.to_path_buf(),
        size,
        expected,
        hint: previous_hint(path),
    };
    let foreign = |reason: &str| CheckpointError::Foreign {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let malformed = |reason: String| CheckpointError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let mut first = [0u8; 9];
    let n_first = (size as usize).min(9);
    file.read_exact(&mut first[..n_first])
        .map_err(io_err("read", path))?;
    if n_first == 9 && first[8] != b'{' {
        return Err(foreign("it is not a safetensors file"));
    }
    if size < 9 {
        return Err(truncated(9));
    }
    let n = u64::from_le_bytes([
        first[0], first[1], first[2], first[3], first[4], first[5], first[6], first[7],
    ]);
    if !(2..=MAX_HEADER_LEN).contains(&n) {
        return Err(foreign("it is not a safetensors file"));
    }
    let data_start = 8 + n;
    if size < data_start {
        return Err(truncated(data_start));
    }
    let mut header = vec![0u8; n as usize];
    header[0] = b'{';
    file.read_exact(&mut header[1..])
        .map_err(io_err("read", path))?;
    let mut tensors: Map<String, Value> = match serde_json::from_slice(&header) {
        Ok(Value::Object(m)) => m,
        _ => return Err(foreign("its safetensors header is not a JSON object")),
    };
    let meta = match tensors.remove("__metadata__") {
        Some(Value::Object(m)) => m,
        _ => return Err(foreign("it has no nanogpt-rs metadata")),
    };
    let meta_str = |key: &str| meta.get(key).and_then(Value::as_str);
    if meta_str("format") != Some(FORMAT) {
        return Err(foreign(
            "its metadata has no format=nanogpt-rs-checkpoint entry",
        ));
    }
    match meta_str("format_version") {
        Some(FORMAT_VERSION) => {}
        other => {
            return Err(CheckpointError::Version {
                path: path.to_path_buf(),
                found: other.unwrap_or("<missing>").to_string(),
            })
        }
    }
    let state: TrainingState = meta_str("state")
        .ok_or_else(|| malformed("the training state is missing".into()))
        .and_then(|s| {
            serde_json::from_str(s)
                .map_err(|e| malformed(format!("the training state does not parse: {e}")))
        })?;
    state
        .model
        .validate()
        .map_err(|e| malformed(format!("the model config is not valid: {e}")))?;
    let crc = meta_str("crc32")
        .filter(|s| s.len() == 8)
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| malformed("the crc32 entry is missing or not 8 hex digits".into()))?;
    let mut data_len = 0u64;
    for (name, v) in &tensors {
        data_len = data_len.max(parse_entry(path, name, v)?.end);
    }
    let expected = data_start
        .checked_add(data_len)
        .ok_or_else(|| malformed("tensor offsets overflow".into()))?;
    if size < expected {
        return Err(truncated(expected));
    }
    Ok(Header {
        state,
        crc,
        tensors,
        data_start,
        data_len,
        file_bytes: size,
    })
}

/// Checks one tensor's dtype and shape; returns its byte range in the data section.
fn check_tensor(path: &Path, h: &Header, name: &str, shape: &[usize]) -> Result<Option<Entry>> {
    let Some(e) = h.entry(path, name)? else {
        return Ok(None);
    };
    if e.dtype != "F32" {
        return Err(CheckpointError::Dtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            found: e.dtype,
        });
    }
    if e.shape != shape {
        return Err(CheckpointError::Shape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            found: e.shape,
        });
    }
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    if e.end - e.begin != numel * 4 {
        return Err(CheckpointError::Malformed {
            path: path.to_path_buf(),
            reason: format!(
                "tensor '{name}' spans {} bytes but its shape needs {}",
                e.end - e.begin,
                numel * 4
            ),
        });
    }
    Ok(Some(e))
}

/// The header of a checkpoint: training state and whether optimizer state is present.
/// Reads only the header (cheap even for large checkpoints) but does check that the file
/// is as long as the header says.
pub fn inspect(path: &Path) -> Result<CheckpointInfo> {
    let (mut file, size) = open(path)?;
    let h = read_header(path, &mut file, size)?;
    Ok(CheckpointInfo {
        has_optimizer: h.tensors.contains_key(EXP_AVG) && h.tensors.contains_key(EXP_AVG_SQ),
        state: h.state,
        file_bytes: h.file_bytes,
    })
}

/// The training state of a checkpoint, from its header only.
pub fn read_state(path: &Path) -> Result<TrainingState> {
    inspect(path).map(|i| i.state)
}

/// Loads a checkpoint: rebuilds the parameter layout from the model config in its header,
/// checks every tensor's presence, dtype and shape, verifies the checksum of the whole
/// data section, and copies the weights (and, with `with_optimizer`, the AdamW moments,
/// which must then be present) into memory. `OptimizerState::step` is the state's
/// `optimizer_step`.
pub fn load(path: &Path, with_optimizer: bool) -> Result<Checkpoint> {
    let (mut file, size) = open(path)?;
    let h = read_header(path, &mut file, size)?;
    let layout = ParamLayout::new(&h.state.model);
    let mut entries = Vec::with_capacity(layout.tensors.len());
    for t in &layout.tensors {
        match check_tensor(path, &h, &t.name, &t.shape)? {
            Some(e) => entries.push(e),
            None => {
                return Err(CheckpointError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                })
            }
        }
    }
    let total = layout.total;
    let opt_entries = if with_optimizer {
        let m = check_tensor(path, &h, EXP_AVG, &[total])?;
        let v = check_tensor(path, &h, EXP_AVG_SQ, &[total])?;
        match (m, v) {
            (Some(m), Some(v)) => Some((m, v)),
            _ => {
                return Err(CheckpointError::NoOptimizer {
                    path: path.to_path_buf(),
                })
            }
        }
    } else {
        None
    };

    // SAFETY: the mapping is read-only and this program never modifies a checkpoint in
    // place (every write renames a new file over the name), so the mapped bytes stay
    // fixed while they are read; the checksum below catches any outside modification.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("map", path))?;
    let start = h.data_start as usize;
    let data = mmap
        .get(start..start + h.data_len as usize)
        .ok_or_else(|| CheckpointError::Truncated {
            path: path.to_path_buf(),
            size: mmap.len() as u64,
            expected: h.data_start + h.data_len,
            hint: previous_hint(path),
        })?;
    let found = crc_bytes(data).finalize();
    if found != h.crc {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            expected: h.crc,
            found,
            hint: previous_hint(path),
        });
    }
    let bytes = |e: &Entry| &data[e.begin as usize..e.end as usize];
    let mut params = vec![0f32; total];
    for (t, e) in layout.tensors.iter().zip(&entries) {
        read_f32(bytes(e), &mut params[t.offset..t.offset + t.len]);
    }
    let optimizer = opt_entries.map(|(em, ev)| {
        let mut m = vec![0f32; total];
        let mut v = vec![0f32; total];
        read_f32(bytes(&em), &mut m);
        read_f32(bytes(&ev), &mut v);
        OptimizerState {
            m,
            v,
            step: h.state.optimizer_step,
        }
    });
    Ok(Checkpoint {
        params,
        optimizer,
        state: h.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (GptConfig, ParamLayout) {
        let cfg = GptConfig::new(2, 4, 64, 16, 97, true, 0.0).unwrap();
        let layout = ParamLayout::new(&cfg);
        (cfg, layout)
    }

    fn sample(with_opt: bool) -> (ParamLayout, Checkpoint) {
        let (cfg, layout) = tiny();
        let params = layout.init_params(&cfg, 7);
        let optimizer = with_opt.then(|| OptimizerState {
            m: (0..layout.total).map(|i| i as f32 * 1e-3).collect(),
            v: (0..layout.total).map(|i| (i % 13) as f32 * 0.5).collect(),
            step: 42,
        });
        let state = TrainingState {
            iter_num: 1234,
            best_val_loss: 2.5,
            model: cfg,
            config: json!({"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare"}),
            engine_rng: [1, u64::MAX, 3, 0x0123_4567_89ab_cdef],
            loader: json!({"rng": [5, 6, 7, 8]}),
            optimizer_step: 42,
            tokens_seen: 9_876_543_210,
            world_size: 1,
        };
        (
            layout,
            Checkpoint {
                params,
                optimizer,
                state,
            },
        )
    }

    /// Byte offset of the data section of a checkpoint file.
    fn data_start(bytes: &[u8]) -> usize {
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    }

    fn replace_once(bytes: &mut [u8], from: &str, to: &str) {
        assert_eq!(from.len(), to.len());
        let pos = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("'{from}' not in file"));
        bytes[pos..pos + to.len()].copy_from_slice(to.as_bytes());
    }

    #[test]
    fn round_trip_with_and_without_optimizer() {
        let dir = tempfile::tempdir().unwrap();
        for with_opt in [true, false] {
            let (layout, ckpt) = sample(with_opt);
            let path = dir.path().join(format!("c{with_opt}.safetensors"));
            save(&path, &layout, &ckpt).unwrap();
            let got = load(&path, with_opt).unwrap();
            assert_eq!(got, ckpt);
            let info = inspect(&path).unwrap();
            assert_eq!(info.has_optimizer, with_opt);
            assert_eq!(info.state, ckpt.state);
            let n_bytes = 4 * layout.total * if with_opt { 3 } else { 1 };
            assert_eq!(
                info.file_bytes as usize,
                data_start(&fs::read(&path).unwrap()) + n_bytes
            );
            // The weights alone can always be loaded.
            let weights = load(&path, false).unwrap();
            assert_eq!(weights.params, ckpt.params);
            assert!(weights.optimizer.is_none());
        }
        let path = dir.path().join("cfalse.safetensors");
        let err = load(&path, true).unwrap_err();
        assert!(matches!(err, CheckpointError::NoOptimizer { .. }), "{err}");
    }

    #[test]
    fn infinite_best_loss_and_step_from_optimizer() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, mut ckpt) = sample(true);
        ckpt.state.best_val_loss = f64::INFINITY;
        ckpt.optimizer.as_mut().unwrap().step = 77;
        let path = dir.path().join("c.safetensors");
        save(&path, &layout, &ckpt).unwrap();
        let got = load(&path, true).unwrap();
        assert_eq!(got.state.best_val_loss, f64::INFINITY);
        assert_eq!(got.state.optimizer_step, 77);
        assert_eq!(got.optimizer.unwrap().step, 77);
    }

    #[test]
    fn file_is_standard_safetensors_with_hf_names() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, ckpt) = sample(true);
        let path = dir.path().join("c.safetensors");
        save(&path, &layout, &ckpt).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(data_start(&bytes) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let qkv = st.tensor("transformer.h.1.attn.c_attn.weight").unwrap();
        assert_eq!(qkv.shape(), &[64, 192]);
        assert_eq!(qkv.dtype(), safetensors::Dtype::F32);
        let spec = layout.get("transformer.h.1.attn.c_attn.weight").unwrap();
        let first = f32::from_le_bytes(qkv.data()[..4].try_into().unwrap());
        assert_eq!(first, ckpt.params[spec.offset]);
        assert_eq!(st.tensor(EXP_AVG_SQ).unwrap().shape(), &[layout.total]);
        assert_eq!(st.len(), layout.tensors.len() + 2);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta["format"], FORMAT);
        assert_eq!(meta["format_version"], "1");
        let crc = crc32fast::hash(&bytes[data_start(&bytes)..]);
        assert_eq!(meta["crc32"], format!("{crc:08x}"));
    }

    #[test]
    fn missing_file_suggests_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let err = load(&path, true).unwrap_err();
        assert!(matches!(err, CheckpointError::Missing { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("init_from=scratch") && msg.contains("ckpt.safetensors"),
            "{msg}"
        );
        assert!(matches!(
            read_state(&path),
            Err(CheckpointError::Missing { .. })
        ));
    }

    #[test]
    fn truncated_files_are_reported_with_a_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, ckpt) = sample(true);
        let paths = CheckpointPaths::new(dir.path());
        save_to_all(&[paths.latest(), paths.kept(500)], &layout, &ckpt).unwrap();
        let full = fs::read(paths.latest()).unwrap();
        let start = data_start(&full);
        let damaged = dir.path().join("damaged.safetensors");
        for len in [0, 5, 8, 100, start - 1, start, start + 1000, full.len() - 1] {
            fs::write(&damaged, &full[..len]).unwrap();
            let err = load(&damaged, true).unwrap_err();
            match &err {
                CheckpointError::Truncated { size, expected, .. } => {
                    assert_eq!(*size as usize, len);
                    assert!(*expected as usize > len);
                }
                other => panic!("length {len}: expected truncation, got {other}"),
            }
            let msg = err.to_string();
            assert!(msg.contains("incomplete"), "{msg}");
            assert!(msg.contains("ckpt_000500.safetensors"), "{msg}");
            if len >= start {
                // The header is complete, so read_state works but still sees the short file.
                assert!(matches!(
                    read_state(&damaged),
                    Err(CheckpointError::Truncated { .. })
                ));
            }
        }
    }

    #[test]
    fn flipped_data_byte_is_a_checksum_error() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, ckpt) = sample(true);
        let path = dir.path().join("ckpt.safetensors");
        save(&path, &layout, &ckpt).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let start = data_start(&bytes);
        for pos in [start, start + 4 * layout.total + 17, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[pos] ^= 0x10;
            fs::write(&path, &b).unwrap();
            let err = load(&path, false).unwrap_err();
            assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("corrupt"), "{err}");
        }
        bytes[start + 3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        // The header is intact: the state is still readable.
        assert_eq!(read_state(&path).unwrap(), ckpt.state);
    }

    #[test]
    fn foreign_files_point_at_init_from_dir() {
        let dir = tempfile::tempdir().unwrap();
        // A Hugging Face style model.safetensors: no nanogpt-rs metadata.
        let data: Vec<u8> = [0.5f32, -1.0, 2.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data)
            .unwrap();
        let hf = safetensors::serialize([("wte.weight", view)], &None).unwrap();
        let path = dir.path().join("model.safetensors");
        fs::write(&path, hf).unwrap();
        let err = load(&path, false).unwrap_err();
        assert!(matches!(err, CheckpointError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains("init_from=<dir>"), "{err}");
        assert!(matches!(
            read_state(&path),
            Err(CheckpointError::Foreign { .. })
        ));
        // A PyTorch zip archive (nanoGPT's ckpt.pt).
        let pt = dir.path().join("ckpt.pt");
        fs::write(&pt, b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl").unwrap();
        let err = load(&pt, true).unwrap_err();
        assert!(matches!(err, CheckpointError::Foreign { .. }), "{err}");
        // A directory.
        let err = load(dir.path(), true).unwrap_err();
        assert!(matches!(err, CheckpointError::Foreign { .. }), "{err}");
    }

    #[test]
    fn header_edits_give_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, ckpt) = sample(true);
        let path = dir.path().join("ckpt.safetensors");
        save(&path, &layout, &ckpt).unwrap();
        let bytes = fs::read(&path).unwrap();

        let mut b = bytes.clone();
        replace_once(&mut b, "[64,192]", "[192,64]");
        fs::write(&path, &b).unwrap();
        match load(&path, true).unwrap_err() {
            CheckpointError::Shape {
                tensor,
                expected,
                found,
                ..
            } => {
                assert!(tensor.ends_with("attn.c_attn.weight"), "{tensor}");
                assert_eq!(expected, vec![64, 192]);
                assert_eq!(found, vec![192, 64]);
            }
            other => panic!("expected a shape error, got {other}"),
        }

        let mut b = bytes.clone();
        replace_once(&mut b, "transformer.ln_f.bias", "transformer.ln_f.biaz");
        fs::write(&path, &b).unwrap();
        match load(&path, true).unwrap_err() {
            CheckpointError::MissingTensor { tensor, .. } => {
                assert_eq!(tensor, "transformer.ln_f.bias")
            }
            other => panic!("expected a missing tensor, got {other}"),
        }

        let mut b = bytes.clone();
        replace_once(
            &mut b,
            "\"format_version\":\"1\"",
            "\"format_version\":\"9\"",
        );
        fs::write(&path, &b).unwrap();
        let err = load(&path, true).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Version { found, .. } if found == "9"),
            "{err}"
        );

        let mut b = bytes.clone();
        replace_once(&mut b, "\"dtype\":\"F32\"", "\"dtype\":\"F16\"");
        fs::write(&path, &b).unwrap();
        let err = load(&path, true).unwrap_err();
        assert!(matches!(err, CheckpointError::Dtype { .. }), "{err}");
    }

    /// A writer that fails after `left` bytes, like a disk that fills up.
    struct FailAfter<'a, W: Write> {
        inner: &'a mut W,
        left: usize,
    }

    impl<W: Write> Write for FailAfter<'_, W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("no space left on device"));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            self.inner.write(&buf[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn failed_write_keeps_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, ckpt) = sample(true);
        let path = CheckpointPaths::new(dir.path()).latest();
        save(&path, &layout, &ckpt).unwrap();

        let mut next = ckpt.clone();
        next.state.iter_num += 250;
        next.params.iter_mut().for_each(|x| *x += 1.0);
        let header = prepare(&path, &layout, &next).unwrap();
        let err = fsutil::write_atomic_with(&path, |w| {
            write_body(
                &mut FailAfter {
                    inner: w,
                    left: 5000,
                },
                &header,
                &next,
            )
        });
        assert!(err.is_err());
        assert_eq!(load(&path, true).unwrap(), ckpt);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );

        // Invalid input is refused before anything is written.
        let mut bad = next.clone();
        bad.params.pop();
        let err = save(&path, &layout, &bad).unwrap_err();
        assert!(matches!(err, CheckpointError::Invalid { .. }), "{err}");
        let other = ParamLayout::new(&GptConfig::new(1, 4, 64, 16, 97, true, 0.0).unwrap());
        assert!(matches!(
            save(&path, &other, &next),
            Err(CheckpointError::Invalid { .. })
        ));
        assert_eq!(load(&path, true).unwrap(), ckpt);
    }

    #[test]
    fn paths_listing_linking_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CheckpointPaths::new(dir.path());
        assert_eq!(
            paths.kept(10_000).file_name().unwrap(),
            "ckpt_010000.safetensors"
        );
        assert_eq!(
            paths.kept(1_234_567).file_name().unwrap(),
            "ckpt_1234567.safetensors"
        );
        assert_eq!(paths.latest().file_name().unwrap(), "ckpt.safetensors");
        assert_eq!(paths.best().file_name().unwrap(), "best.safetensors");
        assert!(list_kept(&dir.path().join("absent")).unwrap().is_empty());

        let (layout, mut ckpt) = sample(false);
        for iter in [2000u64, 500, 10_000, 1500] {
            ckpt.state.iter_num = iter;
            save_to_all(
                &[
                    paths.latest(),
                    paths.kept(iter),
                    paths.best(),
                    paths.latest(),
                ],
                &layout,
                &ckpt,
            )
            .unwrap();
        }
        for junk in [
            ".ckpt_000700.safetensors.tmp123",
            "ckpt_.safetensors",
            "ckpt_12a.safetensors",
            "ckpt_000800.safetensors.bak",
            "metrics.jsonl",
        ] {
            fs::write(dir.path().join(junk), b"x").unwrap();
        }
        let kept = paths.list_kept().unwrap();
        let iters: Vec<u64> = kept.iter().map(|(i, _)| *i).collect();
        assert_eq!(iters, vec![500, 1500, 2000, 10_000]);
        assert_eq!(kept[0].1, paths.kept(500));
        // Each kept file still holds its own iteration even though later saves replaced
        // the latest and best names that were linked to it.
        for (iter, p) in &kept {
            assert_eq!(read_state(p).unwrap().iter_num, *iter);
        }
        assert_eq!(read_state(&paths.latest()).unwrap().iter_num, 1500);
        assert_eq!(read_state(&paths.best()).unwrap().iter_num, 1500);
        // Linking again onto the same file leaves no temporary behind.
        link_or_copy(&paths.latest(), &paths.best()).unwrap();
        let removed = prune_kept(dir.path(), 2).unwrap();
        assert_eq!(removed, vec![paths.kept(500), paths.kept(1500)]);
        let iters: Vec<u64> = list_kept(dir.path()).unwrap().iter().map(|k| k.0).collect();
        assert_eq!(iters, vec![2000, 10_000]);
        assert!(paths.latest().is_file() && paths.best().is_file());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp") && !n.starts_with(".ckpt_000700"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
