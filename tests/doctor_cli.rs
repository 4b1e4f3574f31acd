//! `nanogpt doctor` through the binary: the no-GPU path (`--cpu-only` exits 0 and says so,
//! `--require-gpu` exits non-zero), the JSON shape, and flag errors. On a machine with a
//! GPU the no-GPU assertions are replaced by the GPU ones.

use serde_json::Value;
use std::process::{Command, Output};

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanogpt"))
        .arg("doctor")
        .args(args)
        .env("NCCL_DEBUG", "WARN")
        .output()
        .expect("running nanogpt doctor")
}

fn json(args: &[&str]) -> (Value, i32) {
    let out = doctor(args);
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (v, out.status.code().unwrap())
}

#[test]
fn json_has_the_documented_keys() {
    let (v, code) = json(&["--json", "--cpu-only"]);
    for key in [
        "mode",
        "ok",
        "exit_code",
        "summary",
        "cpu",
        "search_order",
        "search_notes",
        "libraries",
        "gpus",
        "checks",
    ] {
        assert!(v.get(key).is_some(), "missing key {key}: {v}");
    }
    assert_eq!(v["mode"], "cpu-only");
    assert_eq!(v["exit_code"].as_i64().unwrap() as i32, code);
    assert!(v["cpu"]["logical_cpus"].as_u64().unwrap() >= 1);
    assert!(v["cpu"]["model"].as_str().is_some());
    let dirs = v["search_order"].as_array().unwrap();
    assert!(!dirs.is_empty());
    for d in dirs {
        assert!(d["source"].is_string() && d["dir"].is_string() && d["exists"].is_boolean());
    }
    let libs = v["libraries"].as_array().unwrap();
    let names: Vec<&str> = libs.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["driver", "nvrtc", "cublaslt", "cublas", "nccl"]);
    for l in libs {
        let status = l["status"].as_str().unwrap();
        assert!(["ok", "failed", "missing"].contains(&status), "{l}");
        if status == "ok" {
            assert!(l["path"].is_string() && l["version"].is_string(), "{l}");
        } else {
            assert!(l["advice"].is_string(), "{l}");
        }
    }
    for c in v["checks"].as_array().unwrap() {
        for key in ["name", "status", "required", "detail"] {
            assert!(c.get(key).is_some(), "check without {key}: {c}");
        }
        assert!(["ok", "failed", "missing", "skipped"].contains(&c["status"].as_str().unwrap()));
    }
}

#[test]
fn no_gpu_path_and_exit_codes() {
    let (v, _) = json(&["--json", "--cpu-only"]);
    let has_gpu = !v["gpus"].as_array().unwrap().is_empty();

    let out = doctor(&["--cpu-only"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "--cpu-only must exit 0:\n{text}"
    );
    assert!(text.contains("CUDA library search order"), "{text}");
    assert!(text.contains("Checks"), "{text}");
    if !has_gpu {
        assert!(text.contains("no GPU"), "{text}");
        assert!(text.contains("skipped: no GPU"), "{text}");
        let out = doctor(&["--require-gpu"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "--require-gpu without a GPU:\n{text}"
        );
        assert!(text.contains("NOT OK"), "{text}");
        assert!(text.contains("gpus"), "{text}");
        let (v, code) = json(&["--json", "--require-gpu"]);
        assert_eq!(code, 1);
        assert_eq!(v["ok"], false);
        assert!(v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "gpus" && c["status"] != "ok" && c["required"] == true));
    } else {
        eprintln!("a GPU is present: checking the GPU path instead of the no-GPU path");
        let (v, code) = json(&["--json", "--gemm-size=1024"]);
        assert_eq!(v["exit_code"].as_i64().unwrap() as i32, code);
        let checks = v["checks"].as_array().unwrap();
        for name in ["kernel", "gemm", "copy", "nccl 1-rank"] {
            assert!(checks.iter().any(|c| c["name"] == name), "no {name} check");
        }
    }
}

#[test]
fn flag_errors_are_usage_errors() {
    let out = doctor(&["--cpu-only", "--require-gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let out = doctor(&["--gemm-size=100", "--cpu-only"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gemm-size=100"));
}
