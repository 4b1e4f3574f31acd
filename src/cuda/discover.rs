//! Which CUDA library files this process uses, and why.
//!
//! Search order (first directory holding a matching file wins, as with the system loader;
//! later copies are reported as shadowed):
//!
//! 1. every directory of `LD_LIBRARY_PATH`, in order;
//! 2. `$CUDA_HOME` then `$CUDA_PATH`: `lib64`, `lib`, `targets/<arch>-linux/lib`;
//! 3. `/usr/local/cuda`: the same three;
//! 4. Python environments, in order `$VIRTUAL_ENV`, `$CONDA_PREFIX`, the prefix of the
//!    `python3`/`python` found on `PATH` (a pyenv shim resolves through `$PYENV_VERSION` or
//!    `$PYENV_ROOT/version`), then `~/.local`: each `lib*/python3*/site-packages/nvidia/*/lib`
//!    (where the NVIDIA pip wheels and PyTorch put them);
//! 5. the system directories: those listed in `/etc/ld.so.conf.d/*.conf`, then
//!    `/usr/lib/<arch>-linux-gnu`, `/usr/lib64`, `/usr/lib`, `/lib/<arch>-linux-gnu`,
//!    `/lib64`, `/usr/lib/wsl/lib`;
//! 6. last resort: the bare file name handed to the system loader (its cache included).
//!
//! Within one directory the preferred file is the soname the code was written against
//! (`libcuda.so.1`, `libnccl.so.2`), else the versioned file with the highest major version
//! (`libnvrtc.so.13` before `libnvrtc.so.12`), else the unversioned development link.

use serde::Serialize;
use std::path::{Path, PathBuf};

/// The libraries the CUDA engine and the doctor need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LibKind {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
    Nccl,
}

impl LibKind {
    pub const ALL: [LibKind; 5] = [
        LibKind::Driver,
        LibKind::Nvrtc,
        LibKind::CublasLt,
        LibKind::Cublas,
        LibKind::Nccl,
    ];

    /// Short name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            LibKind::Driver => "driver",
            LibKind::Nvrtc => "nvrtc",
            LibKind::Cublas => "cublas",
            LibKind::CublasLt => "cublaslt",
            LibKind::Nccl => "nccl",
        }
    }

    /// The `lib<stem>.so` stem of the library's files.
    pub fn stem(self) -> &'static str {
        match self {
            LibKind::Driver => "cuda",
            LibKind::Nvrtc => "nvrtc",
            LibKind::Cublas => "cublas",
            LibKind::CublasLt => "cublasLt",
            LibKind::Nccl => "nccl",
        }
    }

    /// The one soname major accepted, for libraries whose ABI major never moves.
    fn fixed_major(self) -> Option<u32> {
        match self {
            LibKind::Driver => Some(1),
            LibKind::Nccl => Some(2),
            _ => None,
        }
    }

    /// The file name handed to the system loader as the last resort.
    pub fn loader_name(self) -> String {
        match self.fixed_major() {
            Some(m) => format!("lib{}.so.{m}", self.stem()),
            None => format!("lib{}.so", self.stem()),
        }
    }

    /// What to install or set when the library is missing.
    pub fn advice(self) -> &'static str {
        match self {
            LibKind::Driver => {
                "install the NVIDIA driver (it provides libcuda.so.1); in a container, start \
                 it with GPU access (e.g. docker --gpus all or the NVIDIA container toolkit)"
            }
            LibKind::Nvrtc => {
                "pip install nvidia-cuda-nvrtc (CUDA 13) in the active Python environment, or \
                 install the CUDA toolkit and set CUDA_HOME, or add the directory holding \
                 libnvrtc.so.* to LD_LIBRARY_PATH"
            }
            LibKind::Cublas | LibKind::CublasLt => {
                "pip install nvidia-cublas (CUDA 13) in the active Python environment, or \
                 install the CUDA toolkit and set CUDA_HOME, or add the directory holding \
                 libcublasLt.so.* to LD_LIBRARY_PATH"
            }
            LibKind::Nccl => {
                "pip install nvidia-nccl-cu13 in the active Python environment, or install \
                 libnccl2, or add the directory holding libnccl.so.2 to LD_LIBRARY_PATH"
            }
        }
    }

    /// The major version encoded in file name `name`, `Some(None)` for the unversioned
    /// `lib<stem>.so`, `None` when the file is not this library.
    fn parse(self, name: &str) -> Option<Option<Vec<u32>>> {
        let base = format!("lib{}.so", self.stem());
        let rest = name.strip_prefix(&base)?;
        if rest.is_empty() {
            return Some(None);
        }
        let rest = rest.strip_prefix('.')?;
        let parts: Option<Vec<u32>> = rest.split('.').map(|p| p.parse().ok()).collect();
        let parts = parts?;
        if let Some(fixed) = self.fixed_major() {
            if parts.first() != Some(&fixed) {
                return None;
            }
        }
        Some(Some(parts))
    }
}

/// The process environment discovery reads; tests build one by hand.
#[derive(Clone, Debug, Default)]
pub struct SearchEnv {
    pub ld_library_path: Option<String>,
    pub cuda_home: Option<String>,
    pub cuda_path: Option<String>,
    pub virtual_env: Option<String>,
    pub conda_prefix: Option<String>,
    pub path: Option<String>,
    pub pyenv_root: Option<String>,
    pub pyenv_version: Option<String>,
    pub home: Option<String>,
    /// `/usr/local/cuda` on a real system.
    pub default_cuda: PathBuf,
    /// Directory of `*.conf` files naming extra loader directories (`/etc/ld.so.conf.d`).
    pub ld_conf_dir: Option<PathBuf>,
    /// Standard system library directories.
    pub system_dirs: Vec<PathBuf>,
    /// Whether to end with the loader's own search by bare name.
    pub loader_fallback: bool,
}

fn arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "aarch64"
    } else {
        "x86_64"
    }
}

impl SearchEnv {
    /// The environment of this process and the standard system locations.
    pub fn from_process() -> SearchEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let a = arch();
        SearchEnv {
            ld_library_path: var("LD_LIBRARY_PATH"),
            cuda_home: var("CUDA_HOME"),
            cuda_path: var("CUDA_PATH"),
            virtual_env: var("VIRTUAL_ENV"),
            conda_prefix: var("CONDA_PREFIX"),
            path: var("PATH"),
            pyenv_root: var("PYENV_ROOT"),
            pyenv_version: var("PYENV_VERSION"),
            home: var("HOME"),
            default_cuda: PathBuf::from("/usr/local/cuda"),
            ld_conf_dir: Some(PathBuf::from("/etc/ld.so.conf.d")),
            system_dirs: [
                format!("/usr/lib/{a}-linux-gnu"),
                "/usr/lib64".into(),
                "/usr/lib".into(),
                format!("/lib/{a}-linux-gnu"),
                "/lib64".into(),
                "/usr/lib/wsl/lib".into(),
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            loader_fallback: true,
        }
    }
}

/// One directory of the search order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchDir {
    /// Why it is searched: `LD_LIBRARY_PATH`, `CUDA_HOME`, `python <prefix>`, `system`, ...
    pub source: String,
    pub dir: PathBuf,
    pub exists: bool,
}

/// The ordered list of directories searched for every library.
#[derive(Clone, Debug, Serialize)]
pub struct SearchPlan {
    pub dirs: Vec<SearchDir>,
    /// Sources that contributed nothing, with the reason (`CUDA_HOME: unset`).
    pub notes: Vec<String>,
    pub loader_fallback: bool,
}

/// Where a library was found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Found {
    /// The file to open: an absolute path, or a bare name for the loader's own search.
    pub path: PathBuf,
    pub source: String,
    /// Version numbers in the file name (`[13]` for `libnvrtc.so.13`), empty if none.
    pub name_version: Vec<u32>,
}

/// The outcome of searching for one library.
#[derive(Clone, Debug, Serialize)]
pub struct Discovery {
    pub kind: LibKind,
    /// The winner; with `loader_fallback` this may be a bare name the loader resolves.
    pub found: Option<Found>,
    /// Other matching files further down the search order, which the winner shadows.
    pub shadowed: Vec<PathBuf>,
    /// Problems noticed next to the winner (e.g. NVRTC's builtins library missing).
    pub warnings: Vec<String>,
}

impl Discovery {
    /// The advice line to print when the library is missing.
    pub fn advice(&self) -> &'static str {
        self.kind.advice()
    }
}

impl SearchPlan {
    pub fn new(env: &SearchEnv) -> SearchPlan {
        let mut dirs: Vec<SearchDir> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let push = |source: &str, dir: PathBuf, dirs: &mut Vec<SearchDir>| {
            if dirs.iter().any(|d| d.dir == dir) {
                return;
            }
            let exists = dir.is_dir();
            dirs.push(SearchDir {
                source: source.to_string(),
                dir,
                exists,
            });
        };
        match &env.ld_library_path {
            Some(v) => {
                for d in v.split(':').filter(|d| !d.is_empty()) {
                    push("LD_LIBRARY_PATH", PathBuf::from(d), &mut dirs);
                }
            }
            None => notes.push("LD_LIBRARY_PATH: unset".into()),
        }
        let toolkit_dirs = |root: &Path| {
            vec![
                root.join("lib64"),
                root.join("lib"),
                root.join("targets")
                    .join(format!("{}-linux", arch()))
                    .join("lib"),
            ]
        };
        for (name, value) in [("CUDA_HOME", &env.cuda_home), ("CUDA_PATH", &env.cuda_path)] {
            match value {
                Some(v) => {
                    for d in toolkit_dirs(Path::new(v)) {
                        push(name, d, &mut dirs);
                    }
                }
                None => notes.push(format!("{name}: unset")),
            }
        }
        let default_cuda = env.default_cuda.display().to_string();
        for d in toolkit_dirs(&env.default_cuda) {
            push(&default_cuda, d, &mut dirs);
        }
        for prefix in python_prefixes(env, &mut notes) {
            let source = format!("python {}", prefix.display());
            let found = nvidia_lib_dirs(&prefix);
            if found.is_empty() {
                notes.push(format!(
                    "{source}: no site-packages/nvidia/*/lib (no NVIDIA pip wheels installed)"
                ));
            }
            for d in found {
                push(&source, d, &mut dirs);
            }
        }
        if let Some(conf) = &env.ld_conf_dir {
            for d in ld_conf_dirs(conf) {
                push("ld.so.conf.d", d, &mut dirs);
            }
        }
        for d in &env.system_dirs {
            push("system", d.clone(), &mut dirs);
        }
        SearchPlan {
            dirs,
            notes,
            loader_fallback: env.loader_fallback,
        }
    }

    /// Searches every directory, in order, for `kind`.
    pub fn find(&self, kind: LibKind) -> Discovery {
        let mut hits: Vec<(PathBuf, &SearchDir, Vec<u32>)> = Vec::new();
        for d in self.dirs.iter().filter(|d| d.exists) {
            if let Some((file, version)) = best_in_dir(&d.dir, kind) {
                hits.push((file, d, version));
            }
        }
        let mut warnings = Vec::new();
        let found = hits.first().map(|(path, d, v)| Found {
            path: path.clone(),
            source: d.source.clone(),
            name_version: v.clone(),
        });
        if let (Some(f), LibKind::Nvrtc) = (&found, kind) {
            let dir = f.path.parent().unwrap_or(Path::new("."));
            if !dir_has_prefix(dir, "libnvrtc-builtins.so") {
                warnings.push(format!(
                    "{} has no libnvrtc-builtins.so.* next to libnvrtc: compiling will fail; \
                     reinstall the same NVRTC package (it ships both files)",
                    dir.display()
                ));
            }
        }
        let shadowed = hits.iter().skip(1).map(|(p, _, _)| p.clone()).collect();
        let found = found.or_else(|| {
            self.loader_fallback.then(|| Found {
                path: PathBuf::from(kind.loader_name()),
                source: "system loader (by name)".into(),
                name_version: Vec::new(),
            })
        });
        Discovery {
            kind,
            found,
            shadowed,
            warnings,
        }
    }
}

/// Python prefixes to scan, in search order, without running Python.
fn python_prefixes(env: &SearchEnv, notes: &mut Vec<String>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let add = |p: PathBuf, out: &mut Vec<PathBuf>| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    match &env.virtual_env {
        Some(v) => add(PathBuf::from(v), &mut out),
        None => notes.push("VIRTUAL_ENV: unset".into()),
    }
    match &env.conda_prefix {
        Some(v) => add(PathBuf::from(v), &mut out),
        None => notes.push("CONDA_PREFIX: unset".into()),
    }
    match python_on_path(env) {
        Some(p) => add(p, &mut out),
        None => notes.push("python3 on PATH: not found".into()),
    }
    if let Some(home) = &env.home {
        add(Path::new(home).join(".local"), &mut out);
    }
    out
}

/// The prefix of the first `python3` (or `python`) on PATH: the parent of its `bin`
/// directory after following links; for a pyenv shim, the selected pyenv version.
fn python_on_path(env: &SearchEnv) -> Option<PathBuf> {
    let path = env.path.as_deref()?;
    for name in ["python3", "python"] {
        for dir in path.split(':').filter(|d| !d.is_empty()) {
            let exe = Path::new(dir).join(name);
            if !exe.is_file() {
                continue;
            }
            let is_shim = Path::new(dir).file_name().is_some_and(|n| n == "shims")
                && Path::new(dir)
                    .parent()
                    .is_some_and(|p| p.join("versions").is_dir());
            if is_shim {
                let root = Path::new(dir).parent()?.to_path_buf();
                let version = env.pyenv_version.clone().or_else(|| {
                    let f = std::fs::read_to_string(root.join("version")).ok()?;
                    f.lines().next().map(|l| l.trim().to_string())
                })?;
                let version = version.split(':').next().unwrap_or("").to_string();
                if version.is_empty() || version == "system" {
                    return None;
                }
                return Some(root.join("versions").join(version));
            }
            let real = std::fs::canonicalize(&exe).unwrap_or(exe);
            let bin = real.parent()?;
            return bin.parent().map(Path::to_path_buf);
        }
    }
    None
}

/// `<prefix>/lib*/python3*/site-packages/nvidia/*/lib`, sorted.
fn nvidia_lib_dirs(prefix: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys {
            let nvidia = py.join("site-packages").join("nvidia");
            let Ok(pkgs) = std::fs::read_dir(&nvidia) else {
                continue;
            };
            let mut libs: Vec<PathBuf> = pkgs
                .flatten()
                .map(|e| e.path().join("lib"))
                .filter(|p| p.is_dir())
                .collect();
            libs.sort();
            out.extend(libs);
        }
    }
    out
}

/// Absolute directories listed in `conf_dir/*.conf` (comments and `include` lines skipped).
fn ld_conf_dirs(conf_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(conf_dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.starts_with('/') {
                out.push(PathBuf::from(line));
            }
        }
    }
    out
}

fn dir_has_prefix(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
    })
}

/// The preferred file for `kind` in `dir` and the version in its name: the soname with
/// the highest major version (shortest name among equals), else the unversioned link.
pub fn best_in_dir(dir: &Path, kind: LibKind) -> Option<(PathBuf, Vec<u32>)> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<(Vec<u32>, String)> = None;
    let mut plain: Option<String> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A dangling link is not a library.
        if !e.path().is_file() {
            continue;
        }
        match kind.parse(&name) {
            None => {}
            Some(None) => plain = Some(name),
            Some(Some(v)) => {
                let better = match &best {
                    None => true,
                    Some((bv, bname)) => {
                        v[0] > bv[0] || (v[0] == bv[0] && (v.len(), &name) < (bv.len(), bname))
                    }
                };
                if better {
                    best = Some((v, name));
                }
            }
        }
    }
    match (best, plain) {
        (Some((v, name)), _) => Some((dir.join(name), v)),
        (None, Some(name)) => Some((dir.join(name), Vec::new())),
        (None, None) => None,
    }
}
