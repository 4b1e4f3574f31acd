//! The Hub client against a loopback HTTP server that behaves like the Hugging Face Hub
//! (tree listing with Link pagination, resolve downloads with Range, 401/404 answers, cut
//! connections), and `init_from=gpt2` end to end through the `nanogpt` binary with the tiny
//! transformers fixture served as openai-community/gpt2 (HF_ENDPOINT, HF_HUB_CACHE,
//! HF_HUB_OFFLINE).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use nanogpt::hub::{HubClient, HubError, HubFile, RepoType};

/// One request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    /// "models/owner/name/file" or "datasets/owner/name/file" -> bytes
    files: HashMap<String, Vec<u8>>,
    /// resolve path -> how many more responses to cut off halfway
    cuts: HashMap<String, usize>,
    ignore_range: bool,
    /// token that repositories under "private/" require
    token: String,
    seen: Vec<Seen>,
}

struct Hub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start(files: &[(&str, Vec<u8>)]) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            token: "hf_secret".into(),
            ..Default::default()
        }));
        let st = state.clone();
        let ep = endpoint.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                let ep = ep.clone();
                std::thread::spawn(move || serve(conn, &st, &ep));
            }
        });
        Hub { endpoint, state }
    }

    fn client(&self, cache: &Path) -> HubClient {
        HubClient::new(&self.endpoint, None, cache.to_path_buf(), false)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn downloads_of(&self, file: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/resolve/") && s.path.ends_with(file))
            .collect()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, endpoint: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        path: target.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    let len = |n: usize| vec![("Content-Length".to_string(), n.to_string())];
    if target.contains("/private/")
        && headers.get("authorization") != Some(&format!("Bearer {}", st.token))
    {
        return respond(&mut conn, "401 Unauthorized", &len(0), b"");
    }
    // GET /api/{models|datasets}/{owner}/{name}/tree/main?recursive=true[&cursor=N]
    if let Some(rest) = target.strip_prefix("/api/") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let Some((repo, _rev)) = path.split_once("/tree/") else {
            return respond(&mut conn, "404 Not Found", &len(0), b"");
        };
        let prefix = format!("{repo}/");
        let mut entries: Vec<(String, usize)> = st
            .files
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_string(), v.len())))
            .collect();
        if entries.is_empty() {
            return respond(
                &mut conn,
                "404 Not Found",
                &[
                    ("X-Error-Code".into(), "RepoNotFound".into()),
                    ("Content-Length".into(), "0".into()),
                ],
                b"",
            );
        }
        entries.sort();
        let cursor: usize = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("cursor="))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let page: Vec<serde_json::Value> = entries
            .iter()
            .skip(cursor)
            .take(2)
            .flat_map(|(p, n)| {
                let mut v = vec![serde_json::json!({"type": "file", "oid": "x", "size": n, "path": p})];
                if let Some((dir, _)) = p.rsplit_once('/') {
                    v.insert(0, serde_json::json!({"type": "directory", "oid": "y", "size": 0, "path": dir}));
                }
                v
            })
            .collect();
        let body = serde_json::to_vec(&page).unwrap();
        let mut hs = len(body.len());
        if cursor + 2 < entries.len() {
            hs.push((
                "Link".into(),
                format!(
                    "<{endpoint}/api/{path}?recursive=true&cursor={}>; rel=\"next\"",
                    cursor + 2
                ),
            ));
        }
        return respond(&mut conn, "200 OK", &hs, &body);
    }
    // GET /[datasets/]{owner}/{name}/resolve/{rev}/{path}
    let (kind, rest) = match target.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r.to_string()),
        None => ("models", target[1..].to_string()),
    };
    let Some((repo, tail)) = rest.split_once("/resolve/") else {
        return respond(&mut conn, "404 Not Found", &len(0), b"");
    };
    let file = tail.split_once('/').map(|(_, f)| f).unwrap_or("");
    let Some(body) = st.files.get(&format!("{kind}/{repo}/{file}")).cloned() else {
        return respond(
            &mut conn,
            "404 Not Found",
            &[
                ("X-Error-Code".into(), "EntryNotFound".into()),
                ("Content-Length".into(), "0".into()),
            ],
            b"",
        );
    };
    let start = match (&headers.get("range"), st.ignore_range) {
        (Some(r), false) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let part = &body[start.min(body.len())..];
    let mut hs = len(part.len());
    let status = if start > 0 {
        hs.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let cut = st.cuts.get_mut(&target).filter(|n| **n > 0).map(|n| {
        *n -= 1;
    });
    drop(st);
    match cut {
        Some(()) => respond(&mut conn, status, &hs, &part[..part.len() / 2]),
        None => respond(&mut conn, status, &hs, part),
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn lists_files_across_pages_and_downloads_into_the_cache() {
    let hub = Hub::start(&[
        ("models/acme/tiny/config.json", b"{}".to_vec()),
        ("models/acme/tiny/model.safetensors", blob(300_000, 1)),
        ("models/acme/tiny/sub/dir/a.txt", blob(10, 2)),
        ("models/acme/tiny/z.bin", blob(7, 3)),
        ("models/acme/tiny/y.bin", blob(5, 4)),
        (
            "datasets/acme/corpus/data/train-00000.parquet",
            blob(1234, 5),
        ),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let c = hub.client(cache.path());
    let files = c.list_files("acme/tiny", RepoType::Model, "main").unwrap();
    let want: Vec<HubFile> = [
        ("config.json", 2),
        ("model.safetensors", 300_000),
        ("sub/dir/a.txt", 10),
        ("y.bin", 5),
        ("z.bin", 7),
    ]
    .iter()
    .map(|(p, s)| HubFile {
        path: p.to_string(),
        size: *s,
    })
    .collect();
    assert_eq!(files, want);
    let pages = hub
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/api/models/acme/tiny/tree/main"))
        .count();
    assert_eq!(pages, 3, "5 files, 2 per page");

    let p = c
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap();
    assert_eq!(
        p,
        cache
            .path()
            .join("models--acme--tiny/snapshots/main/model.safetensors")
    );
    assert_eq!(std::fs::read(&p).unwrap(), blob(300_000, 1));
    let p = c
        .download("acme/tiny", RepoType::Model, "main", "sub/dir/a.txt")
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), blob(10, 2));
    // cached: no new request
    let before = hub.seen().len();
    c.download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap();
    assert_eq!(hub.seen().len(), before);

    // datasets live under /datasets/ and /api/datasets/
    let ds = c
        .list_files("acme/corpus", RepoType::Dataset, "main")
        .unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].path, "data/train-00000.parquet");
    let p = c
        .download(
            "acme/corpus",
            RepoType::Dataset,
            "main",
            "data/train-00000.parquet",
        )
        .unwrap();
    assert_eq!(
        p,
        cache
            .path()
            .join("datasets--acme--corpus/snapshots/main/data/train-00000.parquet")
    );
    assert_eq!(std::fs::read(&p).unwrap(), blob(1234, 5));
    assert!(hub
        .seen()
        .iter()
        .any(|s| s.path == "/datasets/acme/corpus/resolve/main/data/train-00000.parquet"));
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let data = blob(200_000, 9);
    let hub = Hub::start(&[("models/acme/tiny/model.safetensors", data.clone())]);
    let url = "/acme/tiny/resolve/main/model.safetensors".to_string();
    let cache = tempfile::tempdir().unwrap();
    let c = hub.client(cache.path());

    // cut once: the same call resumes from the 100000 bytes it has
    hub.state.lock().unwrap().cuts.insert(url.clone(), 1);
    let p = c
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let reqs = hub.downloads_of("model.safetensors");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=100000-"));
    assert!(!p.with_file_name("model.safetensors.incomplete").exists());

    // cut on every attempt of one call: the error says how far it got, the partial file
    // stays, and the next call continues from it
    let cache = tempfile::tempdir().unwrap();
    let c = hub.client(cache.path());
    hub.state.lock().unwrap().seen.clear();
    hub.state.lock().unwrap().cuts.insert(url.clone(), 3);
    let e = c
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap_err();
    assert!(matches!(e, HubError::Interrupted { .. }), "{e}");
    assert!(e.to_string().contains("175000 of 200000 bytes"), "{e}");
    let partial = cache
        .path()
        .join("models--acme--tiny/snapshots/main/model.safetensors.incomplete");
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 175_000);
    let p = c
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let reqs = hub.downloads_of("model.safetensors");
    let ranges: Vec<Option<&str>> = reqs.iter().map(|s| s.range.as_deref()).collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=100000-"),
            Some("bytes=150000-"),
            Some("bytes=175000-")
        ]
    );
    assert!(!partial.exists());

    // a server that ignores Range: the file starts over and still comes out right
    let cache = tempfile::tempdir().unwrap();
    let c = hub.client(cache.path());
    {
        let mut st = hub.state.lock().unwrap();
        st.ignore_range = true;
        st.cuts.insert(url.clone(), 1);
    }
    let p = c
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
}

#[test]
fn not_found_unauthorized_and_offline_errors_say_what_to_do() {
    let hub = Hub::start(&[
        ("models/acme/tiny/config.json", b"{\"a\": 1}".to_vec()),
        ("models/private/gated/config.json", b"{}".to_vec()),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let c = hub.client(cache.path());
    let e = c
        .download("acme/tiny", RepoType::Model, "v2", "nope.bin")
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::FileNotFound { .. }), "{msg}");
    assert!(
        msg.contains("acme/tiny") && msg.contains("'nope.bin'") && msg.contains("'v2'"),
        "{msg}"
    );
    let e = c
        .list_files("acme/none", RepoType::Model, "main")
        .unwrap_err();
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    assert!(e.to_string().contains("acme/none"), "{e}");

    let e = c
        .download("private/gated", RepoType::Model, "main", "config.json")
        .unwrap_err();
    assert!(e.to_string().contains("set HF_TOKEN"), "{e}");
    let with_token = HubClient::new(
        &hub.endpoint,
        Some("hf_wrong".into()),
        cache.path().into(),
        false,
    );
    let e = with_token
        .download("private/gated", RepoType::Model, "main", "config.json")
        .unwrap_err();
    assert!(
        e.to_string().contains("token in HF_TOKEN was refused"),
        "{e}"
    );
    let with_token = HubClient::new(
        &hub.endpoint,
        Some("hf_secret".into()),
        cache.path().into(),
        false,
    );
    with_token
        .download("private/gated", RepoType::Model, "main", "config.json")
        .unwrap();
    assert_eq!(
        hub.seen().last().unwrap().auth.as_deref(),
        Some("Bearer hf_secret")
    );

    // offline: cached files only, no request at all
    c.download("acme/tiny", RepoType::Model, "main", "config.json")
        .unwrap();
    let before = hub.seen().len();
    let off = HubClient::new(&hub.endpoint, None, cache.path().into(), true);
    let p = off
        .download("acme/tiny", RepoType::Model, "main", "config.json")
        .unwrap();
    assert_eq!(std::fs::read(p).unwrap(), b"{\"a\": 1}");
    let listed = off
        .list_files("acme/tiny", RepoType::Model, "main")
        .unwrap();
    assert_eq!(
        listed,
        [HubFile {
            path: "config.json".into(),
            size: 8
        }]
    );
    let e = off
        .download("acme/tiny", RepoType::Model, "main", "model.safetensors")
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("model.safetensors"),
        "{msg}"
    );
    let e = off
        .list_files("acme/other", RepoType::Model, "main")
        .unwrap_err();
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    assert_eq!(hub.seen().len(), before);

    // huggingface_hub's own cache (refs/main -> snapshots/<commit>) is used as well
    let repo = cache.path().join("models--acme--cached");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/0123abcd")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::write(repo.join("snapshots/0123abcd/config.json"), "{}").unwrap();
    let p = off
        .download("acme/cached", RepoType::Model, "main", "config.json")
        .unwrap();
    assert_eq!(p, repo.join("snapshots/0123abcd/config.json"));
}

// ---------------------------------------------------------------------------------------
// init_from=gpt2 through the binary, with the tiny transformers model as openai-community/gpt2

fn tiny_gpt2_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny_gpt2");
    vec![
        (
            "models/openai-community/gpt2/config.json",
            std::fs::read(dir.join("config.json")).unwrap(),
        ),
        (
            "models/openai-community/gpt2/model.safetensors",
            std::fs::read(dir.join("model.safetensors")).unwrap(),
        ),
    ]
}

fn nanogpt(args: &[&str], env: &[(&str, &Path)], endpoint: &str, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanogpt"));
    cmd.args(args)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HOME")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" });
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn sample_from_gpt2_downloads_once_then_works_offline() {
    let hub = Hub::start(&tiny_gpt2_files());
    let cache = tempfile::tempdir().unwrap();
    let env = [("HF_HUB_CACHE", cache.path())];
    let args = [
        "sample",
        "--init_from=gpt2",
        "--start=!",
        "--num_samples=1",
        "--max_new_tokens=12",
        "--top_k=1",
        "--device=cpu",
        "--threads=1",
    ];
    let online = nanogpt(&args, &env, &hub.endpoint, false);
    assert!(online.status.success(), "{}", text(&online.stderr));
    let out = text(&online.stdout);
    assert!(
        out.starts_with('!') && out.contains("---------------"),
        "{out}"
    );
    assert!(
        text(&online.stderr).contains("F32 weights"),
        "{}",
        text(&online.stderr)
    );
    assert_eq!(hub.downloads_of("model.safetensors").len(), 1);
    assert!(cache
        .path()
        .join("models--openai-community--gpt2/snapshots/main/model.safetensors")
        .is_file());

    // offline, with no server at all: the same text from the cache
    let offline = nanogpt(&args, &env, "http://127.0.0.1:1", true);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert_eq!(text(&offline.stdout), out);

    // offline with an empty cache: the error names the file and HF_HUB_OFFLINE
    let empty = tempfile::tempdir().unwrap();
    let failed = nanogpt(
        &args,
        &[("HF_HUB_CACHE", empty.path())],
        "http://127.0.0.1:1",
        true,
    );
    assert!(!failed.status.success());
    let err = text(&failed.stderr);
    assert!(
        err.contains("HF_HUB_OFFLINE")
            && err.contains("config.json")
            && err.contains("openai-community/gpt2"),
        "{err}"
    );
}

/// A character corpus with exactly 101 distinct characters, so its vocabulary matches the
/// tiny model's.
fn corpus_101() -> String {
    let chars: Vec<char> = (0..101u32)
        .map(|i| char::from_u32(0x21 + i).unwrap())
        .collect();
    let mut s = String::new();
    let mut x: u64 = 12345;
    for i in 0..4000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = if i < chars.len() {
            chars[i]
        } else {
            chars[(x >> 33) as usize % chars.len()]
        };
        s.push(c);
    }
    s
}

#[test]
fn eval_only_from_gpt2_prints_losses_and_writes_no_checkpoint() {
    let hub = Hub::start(&tiny_gpt2_files());
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    nanogpt::data::prepare::prepare_char_text(&corpus_101(), "test corpus", &data).unwrap();
    let out_dir = work.path().join("out");
    let data_arg = format!("--data_dir={}", data.display());
    let out_arg = format!("--out_dir={}", out_dir.display());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/eval_gpt2.toml");
    let config = config.to_str().unwrap();
    let args = [
        "train",
        config,
        &data_arg,
        &out_arg,
        "--block_size=16",
        "--batch_size=2",
        "--eval_iters=3",
        "--device=cpu",
        "--threads=1",
        "--dtype=float32",
        "--compile=False",
    ];
    let env = [("HF_HUB_CACHE", cache.path())];
    let o = nanogpt(&args, &env, &hub.endpoint, false);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("step 0: train loss"))
        .unwrap_or_else(|| panic!("no eval line in {err}"));
    let losses: Vec<f64> = line
        .split([',', ' '])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(losses.len(), 2, "{line}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{line}");
    assert!(err.contains("cropped from 32 to block_size 16"), "{err}");
    let written: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !written
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "safetensors")),
        "{written:?}"
    );

    // data with another vocabulary is refused from config.json alone, before the weights
    // are downloaded (a fresh cache here)
    let fresh = tempfile::tempdir().unwrap();
    let env = [("HF_HUB_CACHE", fresh.path())];
    let weights_before = hub.downloads_of("model.safetensors").len();
    let other = work.path().join("other");
    nanogpt::data::prepare::prepare_char_text("abcabcabcabcabcabcabcabcabcabcabc", "t", &other)
        .unwrap();
    let o = nanogpt(
        &[
            "train",
            "--init_from=gpt2",
            &format!("--data_dir={}", other.display()),
            &out_arg,
            "--block_size=8",
            "--device=cpu",
        ],
        &env,
        &hub.endpoint,
        false,
    );
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("101 tokens") && err.contains("uses 3"),
        "{err}"
    );
    assert!(err.contains("init_from=gpt2"), "{err}");
    assert_eq!(hub.downloads_of("model.safetensors").len(), weights_before);
    assert_eq!(hub.downloads_of("config.json").len(), 2);
}
