//! `nanogpt prepare parquet --dataset REPO --files GLOB` against a fake Hugging Face Hub on
//! loopback: paginated listing, download, resume after a cut connection, offline re-runs
//! from the cache, and bad answers (404, corrupt or truncated parquet) that fail clearly and
//! leave no output behind.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use common::bpe::{corpus_texts, expected, sha256_hex};

const REPO: &str = "fake-org/fake-owt";

/// The fixture corpus as `parts` parquet files (bytes), written with the arrow writer.
fn parquet_shards(parts: usize) -> Vec<Vec<u8>> {
    let texts = corpus_texts();
    texts
        .chunks(texts.len().div_ceil(parts))
        .map(|chunk| {
            let text: ArrayRef = Arc::new(StringArray::from_iter_values(chunk.iter()));
            let batch = RecordBatch::try_from_iter([("text", text)]).unwrap();
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(50))
                .build();
            let mut buf = Vec::new();
            let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            buf
        })
        .collect()
}

#[derive(Default)]
struct HubState {
    /// Repository path -> contents.
    files: Vec<(String, Vec<u8>)>,
    /// Cut the first download of this path after this many bytes.
    cut: Option<(String, usize)>,
    /// Every request: (path and query, Range header).
    log: Vec<(String, Option<String>)>,
}

struct FakeHub {
    url: String,
    state: Arc<Mutex<HubState>>,
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let mut st = state.lock().unwrap();
    st.log.push((target.clone(), range.clone()));
    let tree = format!("/api/datasets/{REPO}/tree/main?recursive=true");
    let resolve = format!("/datasets/{REPO}/resolve/main/");
    if target == tree || target == format!("{tree}&cursor=2") {
        // Two pages: the first half of the files, then the rest behind a Link header.
        let half = st.files.len() / 2;
        let (items, link) = if target == tree {
            (
                &st.files[..half],
                Some(format!("<{}&cursor=2>; rel=\"next\"", tree)),
            )
        } else {
            (&st.files[half..], None)
        };
        let json: Vec<Value> = items
            .iter()
            .map(|(p, b)| serde_json::json!({"type": "file", "path": p, "size": b.len(), "oid": "x"}))
            .chain(std::iter::once(serde_json::json!({"type": "directory", "path": "plain_text"})))
            .collect();
        let body = serde_json::to_vec(&json).unwrap();
        let mut hs = vec![
            ("Content-Type", "application/json".to_string()),
            ("Content-Length", body.len().to_string()),
        ];
        if let Some(l) = link {
            // Absolute URL, as the Hub sends it.
            let port_url = format!("http://{}", stream.local_addr().unwrap());
            hs.push(("Link", l.replace('<', &format!("<{port_url}"))));
        }
        respond(&mut stream, "200 OK", &hs, &body);
        return;
    }
    if let Some(path) = target.strip_prefix(&resolve) {
        let Some(bytes) = st
            .files
            .iter()
            .find(|(p, _)| p == path)
            .map(|f| f.1.clone())
        else {
            respond(
                &mut stream,
                "404 Not Found",
                &[("Content-Length", "0".into())],
                b"",
            );
            return;
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
            .unwrap_or(0);
        let body = &bytes[start..];
        let status = if start > 0 {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let mut hs = vec![("Content-Length", body.len().to_string())];
        if start > 0 {
            // A 206 answer names the range it carries (RFC 9110), as the Hub's CDN does.
            hs.push((
                "Content-Range",
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            ));
        }
        if let Some((p, n)) = st.cut.clone() {
            if p == path {
                st.cut = None;
                drop(st);
                // Promise the whole body, send part of it, hang up.
                respond(&mut stream, status, &hs, &body[..n]);
                return;
            }
        }
        drop(st);
        respond(&mut stream, status, &hs, body);
        return;
    }
    respond(
        &mut stream,
        "404 Not Found",
        &[("Content-Length", "0".into())],
        b"",
    );
}

impl FakeHub {
    fn start(files: Vec<(String, Vec<u8>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState {
            files,
            ..Default::default()
        }));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &s);
            }
        });
        FakeHub { url, state }
    }
}

fn shard_files(parts: usize) -> Vec<(String, Vec<u8>)> {
    let shards = parquet_shards(parts);
    let mut files: Vec<(String, Vec<u8>)> = shards
        .into_iter()
        .enumerate()
        .map(|(k, b)| (format!("plain_text/train-{k:05}-of-{parts:05}.parquet"), b))
        .collect();
    files.push(("README.md".into(), b"# fake\n".to_vec()));
    files
}

fn prepare(dir: &Path, endpoint: &str, offline: bool, extra: &[&str]) -> (bool, String) {
    prepare_to(dir, endpoint, offline, REPO, "out", extra)
}

fn prepare_to(
    dir: &Path,
    endpoint: &str,
    offline: bool,
    repo: &str,
    out: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut args = vec![
        "prepare",
        "parquet",
        "--dataset",
        repo,
        "--files",
        "plain_text/train-*.parquet",
        "--out_dir",
        out,
        "--test_size",
        "0.05",
        "--num_proc",
        "2",
    ];
    args.extend_from_slice(extra);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nanogpt"));
    cmd.current_dir(dir)
        .args(&args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", dir.join("hub-cache"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HOME");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn expected_train_sha() -> String {
    expected("0.05", "train.bin").1
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn download_resume_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(shard_files(3));
    let cut_path = "plain_text/train-00001-of-00003.parquet".to_string();
    hub.state.lock().unwrap().cut = Some((cut_path.clone(), 3000));

    // The cut connection fails this run (or is retried inside it); a re-run resumes.
    let (ok, err) = prepare(dir.path(), &hub.url, false, &[]);
    if !ok {
        assert!(err.contains("train-00001-of-00003.parquet"), "{err}");
        assert!(!dir.path().join("out/train.bin").exists());
        let (ok, err) = prepare(dir.path(), &hub.url, false, &[]);
        assert!(ok, "{err}");
    }
    let train = std::fs::read(dir.path().join("out/train.bin")).unwrap();
    assert_eq!(sha256_hex(&train), expected_train_sha());
    {
        let st = hub.state.lock().unwrap();
        let resumed = st.log.iter().any(|(t, r)| {
            t.ends_with(&cut_path) && r.as_deref().is_some_and(|r| r.starts_with("bytes=3000-"))
        });
        assert!(
            resumed,
            "no Range request resumed the cut download: {:?}",
            st.log
        );
        // Only the matching shards were downloaded, README.md was not.
        assert!(!st.log.iter().any(|(t, _)| t.ends_with("README.md")));
    }
    // No partial downloads are left in the cache.
    let cached = files_under(&dir.path().join("hub-cache"));
    assert_eq!(
        cached
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".parquet"))
            .count(),
        3,
        "{cached:?}"
    );
    assert!(
        !cached
            .iter()
            .any(|p| p.to_string_lossy().contains("incomplete")),
        "{cached:?}"
    );

    // Offline, with the server gone: prepared again from the cache.
    std::fs::remove_file(dir.path().join("out/train.bin")).unwrap();
    let (ok, err) = prepare(dir.path(), "http://127.0.0.1:1", true, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        sha256_hex(&std::fs::read(dir.path().join("out/train.bin")).unwrap()),
        expected_train_sha()
    );

    // Offline and never downloaded: a clear error naming HF_HUB_OFFLINE.
    let (ok, err) = prepare_to(
        dir.path(),
        "http://127.0.0.1:1",
        true,
        REPO,
        "other",
        &["--revision", "v2"],
    );
    assert!(!ok);
    assert!(
        err.contains("HF_HUB_OFFLINE") || err.contains("offline"),
        "{err}"
    );
    assert!(!dir.path().join("other/train.bin").exists());
}

#[test]
fn bad_answers_fail_clearly_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();

    // Unknown repository: 404 on the listing.
    let empty = FakeHub::start(vec![]);
    let (ok, err) = prepare_to(dir.path(), &empty.url, false, "nobody/nothing", "out", &[]);
    assert!(!ok);
    assert!(
        err.contains("nobody/nothing") && err.contains("404"),
        "{err}"
    );
    assert!(!dir.path().join("out/train.bin").exists());

    // Corrupt and truncated parquet files.
    for (name, damage) in [("corrupt", 0usize), ("truncated", 1)] {
        let mut files = shard_files(2);
        let victim = &mut files[1].1;
        if damage == 0 {
            let mid = victim.len() / 2;
            for b in &mut victim[mid - 200..mid + 200] {
                *b ^= 0x5a;
            }
            victim.truncate(victim.len() - 3); // and a damaged footer
        } else {
            victim.truncate(victim.len() / 2);
        }
        let hub = FakeHub::start(files);
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let (ok, err) = prepare(&sub, &hub.url, false, &[]);
        assert!(!ok, "{name}: {err}");
        assert!(
            err.contains("train-00001-of-00002.parquet") && err.contains("parquet"),
            "{name}: {err}"
        );
        assert!(
            err.contains("corrupt") || err.contains("truncated"),
            "{name}: {err}"
        );
        let out = sub.join("out");
        assert!(
            !out.join("train.bin").exists() && !out.join("val.bin").exists(),
            "{name}"
        );
        assert!(
            !out.join(".prepare-work").exists(),
            "{name}: work left behind"
        );
    }
}
