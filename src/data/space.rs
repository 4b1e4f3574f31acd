//! Free disk space: what a preparation needs, what the file system has, and a clear refusal
//! when it does not fit.

use std::path::{Path, PathBuf};

use super::DataError;

/// Bytes a step needs under `path` (on the file system that holds it).
#[derive(Clone, Debug)]
pub struct Need {
    pub path: PathBuf,
    pub bytes: u64,
    pub what: String,
}

/// Bytes available to this user on the file system holding `path` (or its nearest existing
/// ancestor); `None` where it cannot be told.
pub fn available_bytes(path: &Path) -> Option<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    statvfs_available(if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    })
}

#[cfg(unix)]
fn statvfs_available(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn statvfs_available(_path: &Path) -> Option<u64> {
    None
}

#[cfg(unix)]
fn device_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    std::fs::metadata(if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    })
    .ok()
    .map(|m| m.dev())
}

#[cfg(not(unix))]
fn device_of(_path: &Path) -> Option<u64> {
    None
}

/// `12.3 GB`.
pub fn human(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// Prints each need beside the space available, summing needs that share a file system,
/// and refuses when one does not fit.
pub fn check(needs: &[Need]) -> Result<(), DataError> {
    let mut groups: Vec<(Option<u64>, Vec<&Need>)> = Vec::new();
    for n in needs {
        let dev = device_of(&n.path);
        match groups.iter_mut().find(|g| g.0.is_some() && g.0 == dev) {
            Some(g) => g.1.push(n),
            None => groups.push((dev, vec![n])),
        }
    }
    for (_, group) in groups {
        let total: u64 = group.iter().map(|n| n.bytes).sum();
        let path = &group[0].path;
        let parts: Vec<String> = group
            .iter()
            .map(|n| format!("{} for {} in {}", human(n.bytes), n.what, n.path.display()))
            .collect();
        match available_bytes(path) {
            Some(avail) => {
                eprintln!(
                    "disk space: needs about {} ({}), {} available",
                    human(total),
                    parts.join("; "),
                    human(avail)
                );
                if avail < total {
                    return Err(DataError::Prepare(format!(
                        "not enough disk space: about {} needed ({}) but only {} available on \
                         the file system of {}; free space, or point --out_dir / --cache_dir \
                         (or HF_HOME / HF_HUB_CACHE) at a larger disk (--skip_space_check \
                         proceeds anyway)",
                        human(total),
                        parts.join("; "),
                        human(avail),
                        path.display()
                    )));
                }
            }
            None => eprintln!(
                "disk space: needs about {} ({}); free space unknown",
                human(total),
                parts.join("; ")
            ),
        }
    }
    Ok(())
}
