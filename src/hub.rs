//! A small Hugging Face Hub client: lists the files of a model or dataset repository and
//! downloads them into a local cache, resumably, with the environment variables the Python
//! `huggingface_hub` library reads (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE`, `HF_HOME`,
//! `HF_HUB_OFFLINE`).
//!
//! Cache layout (a simplified form of `huggingface_hub`'s):
//!
//! ```text
//! {cache}/{models|datasets}--{owner}--{name}/snapshots/{revision}/{path}
//! ```
//!
//! where `{revision}` is the revision asked for (`main`, a tag or a commit hash; a `/` in it
//! becomes `--`). A file is complete once it sits at that path: it is downloaded to
//! `{path}.incomplete` next to it and renamed into place when its size checks out, so an
//! interrupted download resumes (HTTP `Range`) from the partial file on the next attempt.
//! Files that `huggingface_hub` cached are found too: when `refs/{revision}` names a commit,
//! `snapshots/{commit}/{path}` is used. A cached file is used as is, without asking the
//! server whether the revision moved on; delete the snapshot directory to fetch it again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Whole attempts (each resuming from the partial file) made by one [`HubClient::download`].
const DOWNLOAD_ATTEMPTS: usize = 3;
/// Bytes copied per read while downloading.
const COPY_CHUNK: usize = 1 << 20;
/// Suffix of a partially downloaded file.
const INCOMPLETE_SUFFIX: &str = ".incomplete";

/// Kind of Hub repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    /// `models` / `datasets`: the API path segment and the cache folder prefix.
    fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    /// Prefix of download URLs: none for models, `datasets/` for datasets.
    fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        }
    }
}

impl std::fmt::Display for RepoType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
        })
    }
}

/// One file of a repository: its path relative to the repository root and its size in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "HF_HUB_OFFLINE is set and {repo_type} {repo} file '{path}' (revision '{revision}') is \
         not in the cache {}; unset HF_HUB_OFFLINE to download it, or copy the file there",
        cache.display()
    )]
    Offline {
        repo_type: RepoType,
        repo: String,
        revision: String,
        path: String,
        cache: PathBuf,
    },

    #[error(
        "HF_HUB_OFFLINE is set and the file list of {repo_type} {repo} (revision '{revision}') \
         is not in the cache {}; unset HF_HUB_OFFLINE to ask the Hub",
        cache.display()
    )]
    OfflineListing {
        repo_type: RepoType,
        repo: String,
        revision: String,
        cache: PathBuf,
    },

    #[error(
        "{url}: the Hub answered {status} ({}): {repo_type} {repo} is gated, private or does not \
         exist; {}",
        if *status == 401 { "unauthorized" } else { "forbidden" },
        if *token_set {
            "the token in HF_TOKEN was refused: check that it can read this repository (and that \
             you accepted its terms on the Hub)"
        } else {
            "set HF_TOKEN to an access token that can read it (https://huggingface.co/settings/tokens)"
        }
    )]
    Unauthorized {
        url: String,
        status: u16,
        repo_type: RepoType,
        repo: String,
        token_set: bool,
    },

    #[error(
        "{repo_type} {repo} has no file '{path}' at revision '{revision}' ({url} answered 404); \
         check the repository name, the revision and the file path"
    )]
    FileNotFound {
        url: String,
        repo_type: RepoType,
        repo: String,
        revision: String,
        path: String,
    },

    #[error(
        "{repo_type} {repo} at revision '{revision}' was not found ({url} answered 404); check \
         the repository name and the revision"
    )]
    RepoNotFound {
        url: String,
        repo_type: RepoType,
        repo: String,
        revision: String,
    },

    #[error("{url}: the Hub answered HTTP {status}{}; try again later", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Http {
        url: String,
        status: u16,
        detail: String,
    },

    #[error("cannot reach {url}: {reason}; check the network connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files only")]
    Network {
        url: String,
        reason: String,
        /// A dropped connection (worth another attempt), not a DNS or connect failure.
        transient: bool,
    },

    #[error(
        "download of {url} stopped after {got} of {} bytes ({reason}); run the command again to \
         resume from {}",
        expected.map_or("?".to_string(), |e| e.to_string()),
        partial.display()
    )]
    Interrupted {
        url: String,
        got: u64,
        expected: Option<u64>,
        reason: String,
        partial: PathBuf,
    },

    #[error(
        "download of {url} has {got} bytes but the server announced {expected}; the partial file \
         {} was removed, run the command again",
        partial.display()
    )]
    SizeMismatch {
        url: String,
        got: u64,
        expected: u64,
        partial: PathBuf,
    },

    #[error("{url}: unexpected answer from the Hub: {reason}")]
    Protocol { url: String, reason: String },

    #[error("invalid Hub {what} '{value}': {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot find the Hugging Face cache directory: HOME is not set; set HF_HUB_CACHE (or \
         HF_HOME) to a directory"
    )]
    NoCacheDir,
}

impl HubError {
    /// Errors that another attempt (resuming the partial file) may get past.
    fn retryable(&self) -> bool {
        matches!(
            self,
            HubError::Interrupted { .. }
                | HubError::Network {
                    transient: true,
                    ..
                }
        ) || matches!(self, HubError::Http { status, .. } if *status >= 500 || *status == 429)
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HubError {
    let path = path.to_path_buf();
    move |source| HubError::Io {
        action,
        path,
        source,
    }
}

/// Client for one Hub endpoint with one cache directory.
#[derive(Clone, Debug)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    cache_dir: PathBuf,
    offline: bool,
}

/// `1`, `true`, `yes` and `on` (any case) switch a flag on.
fn env_flag(value: Option<String>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

impl HubClient {
    /// Endpoint from HF_ENDPOINT (default <https://huggingface.co>), token from HF_TOKEN (sent as
    /// `Authorization: Bearer`; else the token file `huggingface-cli login` writes in
    /// HF_HOME), cache from HF_HUB_CACHE or HF_HOME/hub (default ~/.cache/huggingface/hub),
    /// offline from HF_HUB_OFFLINE=1 (also "true"/"yes").
    pub fn from_env() -> Result<HubClient, HubError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubClient::from_env`] over any variable lookup (for tests and embedding).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<HubClient, HubError> {
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(|d| Path::new(&d).join("huggingface"))
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
        });
        let cache_dir = match var("HF_HUB_CACHE") {
            Some(d) => PathBuf::from(d),
            None => hf_home.as_ref().ok_or(HubError::NoCacheDir)?.join("hub"),
        };
        let token = var("HF_TOKEN").or_else(|| {
            let file = hf_home.as_ref()?.join("token");
            let t = fs::read_to_string(file).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        Ok(HubClient::new(
            endpoint,
            token,
            cache_dir,
            env_flag(var("HF_HUB_OFFLINE")),
        ))
    }

    /// A client with explicit settings (no environment lookups).
    pub fn new(
        endpoint: impl Into<String>,
        token: Option<String>,
        cache_dir: PathBuf,
        offline: bool,
    ) -> HubClient {
        HubClient {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            token,
            cache_dir,
            offline,
        }
    }

    pub fn with_cache_dir(self, dir: PathBuf) -> HubClient {
        HubClient {
            cache_dir: dir,
            ..self
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// `{cache}/{models|datasets}--{owner}--{name}`.
    pub fn repo_cache_dir(&self, repo: &str, repo_type: RepoType) -> PathBuf {
        self.cache_dir.join(format!(
            "{}--{}",
            repo_type.plural(),
            repo.replace('/', "--")
        ))
    }

    /// `{repo cache}/snapshots/{revision}`: where this client stores the revision's files.
    pub fn snapshot_dir(&self, repo: &str, repo_type: RepoType, revision: &str) -> PathBuf {
        self.repo_cache_dir(repo, repo_type)
            .join("snapshots")
            .join(revision.replace('/', "--"))
    }

    /// The snapshot `huggingface_hub` recorded for `revision` (`refs/{revision}` holds a
    /// commit hash), when there is one.
    fn ref_snapshot_dir(&self, repo: &str, repo_type: RepoType, revision: &str) -> Option<PathBuf> {
        let base = self.repo_cache_dir(repo, repo_type);
        let commit = fs::read_to_string(base.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        let valid = !commit.is_empty() && commit.chars().all(|c| c.is_ascii_alphanumeric());
        valid.then(|| base.join("snapshots").join(commit))
    }

    /// The cached copy of a file, if there is a complete one.
    pub fn cached_path(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
        path: &str,
    ) -> Option<PathBuf> {
        check_names(repo, revision, Some(path)).ok()?;
        let own = self.snapshot_dir(repo, repo_type, revision).join(path);
        if own.is_file() {
            return Some(own);
        }
        let theirs = self.ref_snapshot_dir(repo, repo_type, revision)?.join(path);
        theirs.is_file().then_some(theirs)
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("nanogpt/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let req = agent.get(url);
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Files of a repo at a revision via `GET {endpoint}/api/{models|datasets}/{repo}/tree/
    /// {revision}?recursive=true`, following `Link: <...>; rel="next"` pagination; paths are
    /// relative to the repo root. Offline, the files of the cached snapshot are listed.
    pub fn list_files(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
    ) -> Result<Vec<HubFile>, HubError> {
        check_names(repo, revision, None)?;
        if self.offline {
            return self.list_cached(repo, repo_type, revision);
        }
        let agent = self.agent();
        let mut url = format!(
            "{}/api/{}/{}/tree/{}?recursive=true",
            self.endpoint,
            repo_type.plural(),
            repo,
            encode_segment(revision)
        );
        let mut files = Vec::new();
        loop {
            let resp = self
                .request(&agent, &url)
                .set("Accept", "application/json")
                .call()
                .map_err(|e| self.classify(e, &url, repo, repo_type, revision, None))?;
            let next = resp.header("Link").and_then(next_link);
            let body = resp.into_string().map_err(|e| HubError::Network {
                url: url.clone(),
                reason: e.to_string(),
                transient: true,
            })?;
            let entries: Vec<TreeEntry> =
                serde_json::from_str(&body).map_err(|e| HubError::Protocol {
                    url: url.clone(),
                    reason: format!("the file list is not the expected JSON array ({e})"),
                })?;
            files.extend(
                entries
                    .into_iter()
                    .filter(|e| e.kind == "file")
                    .map(|e| HubFile {
                        path: e.path,
                        size: e.size,
                    }),
            );
            match next {
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.endpoint),
                Some(n) => url = n,
                None => break,
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// The complete files of the cached snapshot of `revision` (offline listing).
    fn list_cached(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
    ) -> Result<Vec<HubFile>, HubError> {
        let own = self.snapshot_dir(repo, repo_type, revision);
        let dir = if own.is_dir() {
            Some(own)
        } else {
            self.ref_snapshot_dir(repo, repo_type, revision)
                .filter(|d| d.is_dir())
        };
        let Some(dir) = dir else {
            return Err(HubError::OfflineListing {
                repo_type,
                repo: repo.to_string(),
                revision: revision.to_string(),
                cache: self.cache_dir.clone(),
            });
        };
        let mut files = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).map_err(io_err("list", &d))? {
                let entry = entry.map_err(io_err("list", &d))?;
                let p = entry.path();
                // metadata() follows links (huggingface_hub's snapshots link into blobs/)
                let meta = fs::metadata(&p).map_err(io_err("read", &p))?;
                if meta.is_dir() {
                    stack.push(p);
                } else if !p.to_string_lossy().ends_with(INCOMPLETE_SUFFIX) {
                    let rel = p.strip_prefix(&dir).unwrap_or(&p);
                    let rel: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    files.push(HubFile {
                        path: rel.join("/"),
                        size: meta.len(),
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Downloads `{endpoint}/{"" | "datasets/"}{repo}/resolve/{revision}/{path}` into the
    /// cache and returns the local path. Already cached: no network. Offline: the cached path
    /// or an error naming the file and HF_HUB_OFFLINE. Interrupted transfers resume from the
    /// partial file with HTTP `Range` (a few times within one call, and on the next call).
    pub fn download(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
        path: &str,
    ) -> Result<PathBuf, HubError> {
        check_names(repo, revision, Some(path))?;
        if let Some(p) = self.cached_path(repo, repo_type, revision, path) {
            return Ok(p);
        }
        if self.offline {
            return Err(HubError::Offline {
                repo_type,
                repo: repo.to_string(),
                revision: revision.to_string(),
                path: path.to_string(),
                cache: self.cache_dir.clone(),
            });
        }
        let dest = self.snapshot_dir(repo, repo_type, revision).join(path);
        let parent = dest
            .parent()
            .expect("invariant: a snapshot file path has a parent directory");
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        // One download per file at a time (several processes of one launch may ask at once);
        // whoever waited finds the finished file.
        let lock_path = self
            .repo_cache_dir(repo, repo_type)
            .join(".locks")
            .join(revision.replace('/', "--"))
            .join(format!("{path}.lock"));
        let lock_dir = lock_path
            .parent()
            .expect("invariant: a lock file path has a parent directory");
        fs::create_dir_all(lock_dir).map_err(io_err("create directory", lock_dir))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("create", &lock_path))?;
        lock.lock().map_err(io_err("lock", &lock_path))?;
        if dest.is_file() {
            return Ok(dest);
        }
        let name = dest
            .file_name()
            .expect("invariant: checked file paths end in a file name")
            .to_string_lossy();
        let partial = parent.join(format!("{name}{INCOMPLETE_SUFFIX}"));
        let url = format!(
            "{}/{}{}/resolve/{}/{}",
            self.endpoint,
            repo_type.url_prefix(),
            repo,
            encode_segment(revision),
            path.split('/')
                .map(encode_segment)
                .collect::<Vec<_>>()
                .join("/")
        );
        let agent = self.agent();
        let ctx = FetchContext {
            repo,
            repo_type,
            revision,
            path,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.fetch(&agent, &url, &partial, &ctx) {
                Ok(()) => break,
                Err(e) if e.retryable() && attempt < DOWNLOAD_ATTEMPTS => {
                    eprintln!(
                        "warning: {e}; retrying (attempt {} of {DOWNLOAD_ATTEMPTS})",
                        attempt + 1
                    );
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                }
                Err(e) => return Err(e),
            }
        }
        fs::rename(&partial, &dest).map_err(io_err("move the finished download to", &dest))?;
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(dest)
    }

    /// One attempt: continue `partial` from its current length (or start it over when the
    /// server ignores the range), then check the size the server announced.
    fn fetch(
        &self,
        agent: &ureq::Agent,
        url: &str,
        partial: &Path,
        ctx: &FetchContext,
    ) -> Result<(), HubError> {
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        // identity: a compressed body's length would not be the file's length
        let mut req = self.request(agent, url).set("Accept-Encoding", "identity");
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if have > 0 => {
                // the partial file is not a prefix the server can continue: start over
                fs::remove_file(partial).map_err(io_err("remove", partial))?;
                return Err(HubError::Interrupted {
                    url: url.to_string(),
                    got: 0,
                    expected: None,
                    reason: "the server refused to resume the partial file".to_string(),
                    partial: partial.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(self.classify(
                    e,
                    url,
                    ctx.repo,
                    ctx.repo_type,
                    ctx.revision,
                    Some(ctx.path),
                ))
            }
        };
        let content_length = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let (start, total) = match resp.status() {
            206 => {
                let range = resp.header("Content-Range").and_then(parse_content_range);
                match range {
                    Some((first, total)) if first == have => {
                        (have, total.or(content_length.map(|n| have + n)))
                    }
                    _ => {
                        return Err(HubError::Protocol {
                            url: url.to_string(),
                            reason: format!(
                                "asked for bytes {have}- but got Content-Range {:?}",
                                resp.header("Content-Range").unwrap_or("")
                            ),
                        })
                    }
                }
            }
            _ => (0, content_length),
        };
        let mut file = if start == 0 {
            File::create(partial).map_err(io_err("create", partial))?
        } else {
            OpenOptions::new()
                .append(true)
                .open(partial)
                .map_err(io_err("open", partial))?
        };
        let bar = indicatif::ProgressBar::with_draw_target(
            total,
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        ) {
            bar.set_style(style);
        }
        bar.set_message(ctx.path.to_string());
        bar.set_position(start);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut got = start;
        let read_result: Result<(), io::Error> = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    file.write_all(&buf[..n])
                        .map_err(io_err("write", partial))?;
                    got += n as u64;
                    bar.set_position(got);
                    if total.is_some_and(|t| got > t) {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        bar.finish_and_clear();
        file.sync_all().map_err(io_err("write", partial))?;
        drop(file);
        if let Err(e) = read_result {
            return Err(HubError::Interrupted {
                url: url.to_string(),
                got,
                expected: total,
                reason: e.to_string(),
                partial: partial.to_path_buf(),
            });
        }
        match total {
            Some(t) if got < t => Err(HubError::Interrupted {
                url: url.to_string(),
                got,
                expected: total,
                reason: "the connection closed early".to_string(),
                partial: partial.to_path_buf(),
            }),
            Some(t) if got > t => {
                let _ = fs::remove_file(partial);
                Err(HubError::SizeMismatch {
                    url: url.to_string(),
                    got,
                    expected: t,
                    partial: partial.to_path_buf(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Turns a failed request into an error that says what to do.
    fn classify(
        &self,
        e: ureq::Error,
        url: &str,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
        path: Option<&str>,
    ) -> HubError {
        match e {
            ureq::Error::Status(status @ (401 | 403), _) => HubError::Unauthorized {
                url: url.to_string(),
                status,
                repo_type,
                repo: repo.to_string(),
                token_set: self.token.is_some(),
            },
            ureq::Error::Status(404, resp) => {
                let code = resp.header("X-Error-Code").unwrap_or("").to_string();
                match path {
                    Some(p) if code != "RepoNotFound" && code != "RevisionNotFound" => {
                        HubError::FileNotFound {
                            url: url.to_string(),
                            repo_type,
                            repo: repo.to_string(),
                            revision: revision.to_string(),
                            path: p.to_string(),
                        }
                    }
                    _ => HubError::RepoNotFound {
                        url: url.to_string(),
                        repo_type,
                        repo: repo.to_string(),
                        revision: revision.to_string(),
                    },
                }
            }
            ureq::Error::Status(status, resp) => {
                let detail = resp
                    .header("X-Error-Message")
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                HubError::Http {
                    url: url.to_string(),
                    status,
                    detail,
                }
            }
            ureq::Error::Transport(t) => HubError::Network {
                url: url.to_string(),
                transient: t.kind() == ureq::ErrorKind::Io,
                reason: transport_reason(&t),
            },
        }
    }
}

struct FetchContext<'a> {
    repo: &'a str,
    repo_type: RepoType,
    revision: &'a str,
    path: &'a str,
}

/// One entry of the Hub's tree listing.
#[derive(serde::Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
}

/// A transport error in words, without repeating the URL.
fn transport_reason(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s.push_str(": ");
        s.push_str(m);
    }
    if let Some(src) = std::error::Error::source(t) {
        let src = src.to_string();
        if !s.contains(&src) {
            s.push_str(": ");
            s.push_str(&src);
        }
    }
    s
}

/// Refuses names that would escape the cache directory or cannot form a URL.
fn check_names(repo: &str, revision: &str, path: Option<&str>) -> Result<(), HubError> {
    let bad = |what, value: &str, reason| {
        Err(HubError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        })
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if repo.is_empty()
        || parts.len() > 2
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'))
    {
        return bad("repository", repo, "expected a name such as owner/name");
    }
    if revision.is_empty() || revision.split('/').any(|p| p.is_empty() || p == "..") {
        return bad(
            "revision",
            revision,
            "expected a branch, tag or commit such as main",
        );
    }
    if let Some(p) = path {
        let clean = !p.is_empty()
            && !p.contains('\\')
            && Path::new(p)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !clean || p.ends_with('/') {
            return bad(
                "file path",
                p,
                "expected a path relative to the repository root, without '..'",
            );
        }
    }
    Ok(())
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `rel="next"` target of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().replace(' ', "");
            p == "rel=\"next\"" || p == "rel=next"
        });
        let target = target.trim();
        (is_next && target.starts_with('<') && target.ends_with('>'))
            .then(|| target[1..target.len() - 1].to_string())
    })
}

/// `bytes FIRST-LAST/TOTAL` -> (FIRST, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (first, _) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, total.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_and_ranges_parse() {
        let h = r#"<https://hf.co/api/models/a/b/tree/main?cursor=xyz>; rel="next""#;
        assert_eq!(
            next_link(h).as_deref(),
            Some("https://hf.co/api/models/a/b/tree/main?cursor=xyz")
        );
        assert_eq!(next_link(r#"<https://x/1>; rel="prev""#), None);
        assert_eq!(
            next_link(r#"<https://x/1>; rel="prev", </p?c=2>; rel="next""#).as_deref(),
            Some("/p?c=2")
        );
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(
            encode_segment("model-00001.safetensors"),
            "model-00001.safetensors"
        );
    }

    #[test]
    fn names_that_escape_the_cache_are_refused() {
        assert!(check_names("openai-community/gpt2", "main", Some("config.json")).is_ok());
        assert!(check_names("gpt2", "main", Some("a/b.json")).is_ok());
        for (repo, rev, path) in [
            ("../x", "main", "f"),
            ("a/b/c", "main", "f"),
            ("a/b", "..", "f"),
            ("a/b", "main", "../f"),
            ("a/b", "main", "/etc/passwd"),
            ("a/b", "main", ""),
        ] {
            let e = check_names(repo, rev, Some(path)).unwrap_err();
            assert!(matches!(e, HubError::InvalidName { .. }), "{e}");
        }
    }

    #[test]
    fn environment_rules() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = HubClient::from_vars(vars(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(c.endpoint(), DEFAULT_ENDPOINT);
        assert_eq!(c.cache_dir(), Path::new("/home/u/.cache/huggingface/hub"));
        assert!(!c.is_offline());
        let c = HubClient::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
        ]))
        .unwrap();
        assert_eq!(c.cache_dir(), Path::new("/data/hf/hub"));
        assert_eq!(c.endpoint(), "http://127.0.0.1:9");
        assert!(c.is_offline());
        let c = HubClient::from_vars(vars(&[
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_CACHE", "/fast/cache"),
            ("HF_HUB_OFFLINE", "0"),
            ("HF_TOKEN", "hf_abc"),
        ]))
        .unwrap();
        assert_eq!(c.cache_dir(), Path::new("/fast/cache"));
        assert!(!c.is_offline());
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        assert!(matches!(
            HubClient::from_vars(|_| None),
            Err(HubError::NoCacheDir)
        ));
        assert_eq!(
            c.snapshot_dir("openai-community/gpt2", RepoType::Model, "main"),
            Path::new("/fast/cache/models--openai-community--gpt2/snapshots/main")
        );
        assert_eq!(
            c.snapshot_dir("user/ds", RepoType::Dataset, "refs/convert/parquet"),
            Path::new("/fast/cache/datasets--user--ds/snapshots/refs--convert--parquet")
        );
    }
}
