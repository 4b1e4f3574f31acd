//! Hugging Face Hub client: list a repository's files and download them into the local
//! cache (resumable, atomic, with a progress bar), honouring HF_ENDPOINT, HF_TOKEN,
//! HF_HUB_CACHE / HF_HOME and HF_HUB_OFFLINE.
//!
//! Cache layout: `{cache}/{datasets|models}--{owner}--{name}/snapshots/{revision}/{path}`;
//! a download in progress is `{path}.incomplete` beside it and continues with an HTTP Range
//! request next time.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors from the Hub client.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(
        "{file} is not in the local cache {} and HF_HUB_OFFLINE is set; run once with network \
         access (unset HF_HUB_OFFLINE) to download it",
        cache.display()
    )]
    Offline { file: String, cache: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A file of a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    pub path: String,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    offline: bool,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

impl HubClient {
    /// Endpoint from HF_ENDPOINT (default https://huggingface.co), token from HF_TOKEN, cache
    /// from HF_HUB_CACHE or HF_HOME/hub (default ~/.cache/huggingface/hub), offline from
    /// HF_HUB_OFFLINE=1.
    pub fn from_env() -> Result<HubClient, HubError> {
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let cache = match (env_nonempty("HF_HUB_CACHE"), env_nonempty("HF_HOME")) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(h)) => PathBuf::from(h).join("hub"),
            (None, None) => env_nonempty("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/huggingface/hub"),
        };
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Ok(HubClient {
            endpoint,
            token: env_nonempty("HF_TOKEN"),
            cache,
            offline,
        })
    }

    pub fn with_cache_dir(self, dir: PathBuf) -> HubClient {
        HubClient { cache: dir, ..self }
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(60))
            .build()
    }

    fn get(&self, url: &str, range_from: u64) -> Result<ureq::Response, HubError> {
        let mut req = self.agent().get(url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if range_from > 0 {
            req = req.set("Range", &format!("bytes={range_from}-"));
        }
        req.call().map_err(|e| HubError::Http {
            url: url.to_string(),
            reason: match e {
                ureq::Error::Status(404, _) => {
                    "not found (404): check the repository, revision and file names".into()
                }
                ureq::Error::Status(401 | 403, _) => {
                    "access denied: set HF_TOKEN to a token that can read this repository".into()
                }
                ureq::Error::Status(code, _) => format!("the server answered HTTP {code}"),
                other => other.to_string(),
            },
        })
    }

    /// Files of a repo at a revision (paginated tree listing).
    pub fn list_files(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
    ) -> Result<Vec<HubFile>, HubError> {
        if self.offline {
            return Err(HubError::Offline {
                file: format!("the file list of {repo}@{revision}"),
                cache: self.cache.clone(),
            });
        }
        let mut url = Some(format!(
            "{}/api/{}/{repo}/tree/{revision}?recursive=true",
            self.endpoint,
            repo_type.plural()
        ));
        let mut files = Vec::new();
        while let Some(u) = url.take() {
            let resp = self.get(&u, 0)?;
            url = resp.header("Link").and_then(next_link);
            let text = resp.into_string().map_err(|e| HubError::Http {
                url: u.clone(),
                reason: format!("reading the file list failed: {e}"),
            })?;
            let body: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| HubError::Http {
                    url: u.clone(),
                    reason: format!("the file list is not JSON: {e}"),
                })?;
            let items = body.as_array().ok_or_else(|| HubError::Http {
                url: u.clone(),
                reason: "the file list is not a JSON array".into(),
            })?;
            for it in items {
                if it["type"] == "file" {
                    if let Some(p) = it["path"].as_str() {
                        files.push(HubFile {
                            path: p.to_string(),
                            size: it["size"].as_u64().unwrap_or(0),
                        });
                    }
                }
            }
        }
        Ok(files)
    }

    fn local_path(&self, repo: &str, repo_type: RepoType, revision: &str, path: &str) -> PathBuf {
        let kind = &repo_type.plural()[..repo_type.plural().len() - 1];
        self.cache
            .join(format!("{kind}s--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(revision)
            .join(path)
    }

    /// Downloads a file into the cache (resuming a partial download) and returns its path.
    pub fn download(
        &self,
        repo: &str,
        repo_type: RepoType,
        revision: &str,
        path: &str,
    ) -> Result<PathBuf, HubError> {
        let dest = self.local_path(repo, repo_type, revision, path);
        if dest.exists() {
            return Ok(dest);
        }
        if self.offline {
            return Err(HubError::Offline {
                file: path.to_string(),
                cache: self.cache.clone(),
            });
        }
        let io = |action, p: &Path| {
            let p = p.to_path_buf();
            move |source| HubError::Io {
                action,
                path: p,
                source,
            }
        };
        let dir = dest.parent().expect("cache paths have a parent");
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let partial = dest.with_file_name(format!(
            "{}.incomplete",
            dest.file_name().expect("file").to_string_lossy()
        ));
        let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        let prefix = match repo_type {
            RepoType::Dataset => "datasets/",
            RepoType::Model => "",
        };
        let url = format!("{}/{prefix}{repo}/resolve/{revision}/{path}", self.endpoint);
        let resp = self.get(&url, have)?;
        let resumed = resp.status() == 206;
        let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
        let start = if resumed { have } else { 0 };
        let mut file = OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(&partial)
            .map_err(io("cannot write", &partial))?;
        let bar = indicatif::ProgressBar::with_draw_target(
            len.map(|l| l + start),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        ) {
            bar.set_style(style);
        }
        bar.set_message(path.to_string());
        bar.set_position(start);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.abandon();
                    return Err(HubError::Http {
                        url,
                        reason: format!(
                            "the download was cut off after {} bytes ({e}); run again to resume it",
                            start + got
                        ),
                    });
                }
            };
            file.write_all(&buf[..n])
                .map_err(io("cannot write", &partial))?;
            got += n as u64;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        if let Some(l) = len {
            if got != l {
                return Err(HubError::Http {
                    url,
                    reason: format!(
                        "the download was cut off after {} of {} bytes; run again to resume it",
                        start + got,
                        start + l
                    ),
                });
            }
        }
        file.sync_all().map_err(io("cannot write", &partial))?;
        fs::rename(&partial, &dest).map_err(io("cannot move into place", &dest))?;
        Ok(dest)
    }
}

/// The `rel="next"` URL of a Link header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, rest) = part.split_once(';')?;
        rest.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}
