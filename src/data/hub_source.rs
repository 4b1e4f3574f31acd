//! Corpus files from a Hugging Face Hub dataset: pick the files of a repository revision
//! that match a glob, check the disk space, download them into the Hub cache (through
//! [`crate::hub`]) and hand back their local paths, sorted by repository path.
//!
//! The file list is also saved as `.hub-files-*.json` in the output directory, so that a
//! re-run with HF_HUB_OFFLINE=1 finds the same files in the cache without the network.
//!
//! [`openwebtext`] is nanoGPT's OpenWebText: `Skylion007/openwebtext`,
//! `plain_text/train-*.parquet`, column `text`.

use std::path::{Path, PathBuf};

use globset::GlobBuilder;
use serde::{Deserialize, Serialize};

use super::space::{self, Need};
use super::DataError;
use crate::fsutil;
use crate::hub::{HubClient, HubFile, RepoType};

/// A set of files of a Hub dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubDataset {
    pub repo: String,
    pub revision: String,
    /// Glob over paths relative to the repository root, e.g. `sample/10BT/*.parquet`.
    pub files: String,
}

/// Revision of `Skylion007/openwebtext` that `nanogpt prepare openwebtext` reads (override
/// with `--revision`).
pub const OPENWEBTEXT_REVISION: &str = "main";

/// nanoGPT's OpenWebText on the Hub.
pub fn openwebtext(revision: Option<&str>) -> HubDataset {
    HubDataset {
        repo: "Skylion007/openwebtext".into(),
        revision: revision.unwrap_or(OPENWEBTEXT_REVISION).into(),
        files: "plain_text/train-*.parquet".into(),
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    repo: String,
    revision: String,
    files_glob: String,
    files: Vec<(String, u64)>,
}

fn manifest_path(dir: &Path, ds: &HubDataset) -> PathBuf {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    dir.join(format!(
        ".hub-files-{}-{}-{}.json",
        clean(&ds.repo),
        clean(&ds.revision),
        clean(&ds.files)
    ))
}

fn hub_err(ds: &HubDataset, e: impl std::fmt::Display) -> DataError {
    DataError::Prepare(format!(
        "Hugging Face Hub, dataset {}@{}: {e}",
        ds.repo, ds.revision
    ))
}

/// Lists, checks space for, and downloads the files of `ds`; returns local paths in
/// repository-path order. `manifest_dir` keeps the file list for offline re-runs;
/// `output_factor` estimates the prepared output size from the download size.
pub fn fetch(
    client: &HubClient,
    ds: &HubDataset,
    manifest_dir: &Path,
    cache_dir: &Path,
    output_factor: f64,
    skip_space_check: bool,
) -> Result<Vec<PathBuf>, DataError> {
    let manifest = manifest_path(manifest_dir, ds);
    let listed = client.list_files(&ds.repo, RepoType::Dataset, &ds.revision);
    let all: Vec<HubFile> = match listed {
        Ok(files) => files,
        Err(e) => match std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
        {
            Some(m) => {
                eprintln!(
                    "cannot list {}@{} ({e}); using the file list saved in {}",
                    ds.repo,
                    ds.revision,
                    manifest.display()
                );
                m.files
                    .into_iter()
                    .map(|(path, size)| HubFile { path, size })
                    .collect()
            }
            None => return Err(hub_err(ds, e)),
        },
    };
    let glob = GlobBuilder::new(&ds.files)
        .literal_separator(true)
        .build()
        .map_err(|e| hub_err(ds, format!("invalid --files glob {:?}: {e}", ds.files)))?
        .compile_matcher();
    let mut files: Vec<HubFile> = all
        .iter()
        .filter(|f| glob.is_match(&f.path))
        .cloned()
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.is_empty() {
        let some: Vec<&str> = all.iter().take(12).map(|f| f.path.as_str()).collect();
        return Err(hub_err(
            ds,
            format!(
                "no file matches {:?} among its {} files (e.g. {}); fix --files",
                ds.files,
                all.len(),
                some.join(", ")
            ),
        ));
    }
    let m = Manifest {
        repo: ds.repo.clone(),
        revision: ds.revision.clone(),
        files_glob: ds.files.clone(),
        files: files.iter().map(|f| (f.path.clone(), f.size)).collect(),
    };
    std::fs::create_dir_all(manifest_dir)
        .map_err(|e| DataError::io("cannot create", manifest_dir, e))?;
    fsutil::write_atomic(
        &manifest,
        &serde_json::to_vec_pretty(&m).expect("manifest serializes"),
    )
    .map_err(|e| DataError::io("cannot write", &manifest, e))?;

    let total: u64 = files.iter().map(|f| f.size).sum();
    eprintln!(
        "{}@{}: {} files matching {:?}, {}",
        ds.repo,
        ds.revision,
        files.len(),
        ds.files,
        space::human(total)
    );
    if !skip_space_check {
        // Files already in the cache (standard layout) need no new space.
        let snapshot = cache_dir
            .join(format!("datasets--{}", ds.repo.replace('/', "--")))
            .join("snapshots")
            .join(&ds.revision);
        let missing: u64 = files
            .iter()
            .filter(|f| !snapshot.join(&f.path).exists())
            .map(|f| f.size)
            .sum();
        space::check(&[
            Need {
                path: cache_dir.to_path_buf(),
                bytes: missing,
                what: format!("downloading {} of {} files", files.len(), ds.repo),
            },
            Need {
                path: manifest_dir.to_path_buf(),
                bytes: (total as f64 * output_factor) as u64,
                what: "the prepared tokens (estimated)".into(),
            },
        ])?;
    }
    let mut local = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        eprintln!("[{}/{}] {}", i + 1, files.len(), f.path);
        let p = client
            .download(&ds.repo, RepoType::Dataset, &ds.revision, &f.path)
            .map_err(|e| hub_err(ds, e))?;
        local.push(p);
    }
    Ok(local)
}
