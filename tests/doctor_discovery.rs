//! Library discovery on fake directory trees: which file wins across the search order and
//! within a directory, soname rules (libnccl.so.2, libcuda.so.1), Python environments found
//! without running Python, and the advice given for missing or broken pieces.

use nanogpt::cuda::discover::{best_in_dir, LibKind, SearchEnv, SearchPlan};
use nanogpt::doctor::{self, Mode, Options, Status};
use std::fs;
use std::path::{Path, PathBuf};

/// Creates `dir/name` (and its parents) holding a few bytes.
fn touch(dir: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, b"not a real library").unwrap();
    p
}

/// An environment that sees only what the test puts under `root` (no system directories,
/// no loader fallback, no /etc/ld.so.conf.d).
fn env(root: &Path) -> SearchEnv {
    SearchEnv {
        default_cuda: root.join("usr-local-cuda"),
        system_dirs: vec![root.join("system-lib")],
        loader_fallback: false,
        ..SearchEnv::default()
    }
}

#[test]
fn first_directory_in_search_order_wins_and_later_copies_are_shadowed() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let ld = r.join("ld");
    let home = r.join("cuda-home");
    let venv = r.join("venv");
    let venv_lib = venv.join("lib/python3.12/site-packages/nvidia/cu13/lib");
    touch(&ld, "libcublasLt.so.13");
    touch(&home.join("lib64"), "libcublasLt.so.13");
    touch(&home.join("lib64"), "libnvrtc.so.13");
    touch(&home.join("lib64"), "libnvrtc-builtins.so.13.0");
    touch(&venv_lib, "libnvrtc.so.13");
    touch(&venv_lib, "libnvrtc-builtins.so.13.0");
    touch(&venv_lib, "libcublasLt.so.13");
    touch(&r.join("usr-local-cuda/lib64"), "libcublasLt.so.12");
    touch(&r.join("system-lib"), "libnccl.so.2");

    let mut e = env(r);
    e.ld_library_path = Some(format!("{}::{}", ld.display(), r.join("nowhere").display()));
    e.cuda_home = Some(home.display().to_string());
    e.virtual_env = Some(venv.display().to_string());
    let plan = SearchPlan::new(&e);

    // The order: LD_LIBRARY_PATH, CUDA_HOME, /usr/local/cuda, python, system.
    let sources: Vec<&str> = plan.dirs.iter().map(|d| d.source.as_str()).collect();
    let pos = |s: &str| sources.iter().position(|x| x.starts_with(s)).unwrap();
    assert!(pos("LD_LIBRARY_PATH") < pos("CUDA_HOME"));
    assert!(pos("CUDA_HOME") < pos(&r.join("usr-local-cuda").display().to_string()));
    assert!(pos(&r.join("usr-local-cuda").display().to_string()) < pos("python"));
    assert!(pos("python") < pos("system"));
    assert!(
        !plan.dirs[1].exists,
        "a listed but absent directory is shown as absent"
    );
    assert!(plan.notes.iter().any(|n| n == "CUDA_PATH: unset"));

    let lt = plan.find(LibKind::CublasLt);
    let f = lt.found.unwrap();
    assert_eq!(f.path, ld.join("libcublasLt.so.13"));
    assert_eq!(f.source, "LD_LIBRARY_PATH");
    assert_eq!(f.name_version, vec![13]);
    assert_eq!(
        lt.shadowed,
        vec![
            home.join("lib64/libcublasLt.so.13"),
            r.join("usr-local-cuda/lib64/libcublasLt.so.12"),
            venv_lib.join("libcublasLt.so.13"),
        ]
    );

    let nv = plan.find(LibKind::Nvrtc);
    assert_eq!(nv.found.unwrap().path, home.join("lib64/libnvrtc.so.13"));
    assert_eq!(nv.shadowed, vec![venv_lib.join("libnvrtc.so.13")]);
    assert!(nv.warnings.is_empty(), "builtins sit next to libnvrtc");

    let nccl = plan.find(LibKind::Nccl);
    let f = nccl.found.unwrap();
    assert_eq!(f.path, r.join("system-lib/libnccl.so.2"));
    assert_eq!(f.source, "system");

    let drv = plan.find(LibKind::Driver);
    assert!(drv.found.is_none() && drv.shadowed.is_empty());
    assert!(drv.advice().contains("libcuda.so.1"));
}

#[test]
fn within_a_directory_the_newest_soname_wins_and_names_are_not_confused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for n in [
        "libnvrtc.so",
        "libnvrtc.so.12",
        "libnvrtc.so.13",
        "libnvrtc.so.13.0.88",
        "libnvrtc-builtins.so.13.0",
        "libnvrtc.so.13.bak", // not a version: ignored
        "libcublasLt.so.13",
        "libcublas.so.12",
        "libnccl.so",
        "libnccl.so.2",
        "libnccl_device.bc",
        "libcuda.so",
        "libcuda.so.580.95.05",
    ] {
        touch(d, n);
    }
    let best = |k| best_in_dir(d, k).map(|(p, v)| (p.file_name().unwrap().to_owned(), v));
    assert_eq!(
        best(LibKind::Nvrtc),
        Some(("libnvrtc.so.13".into(), vec![13]))
    );
    // cuBLAS and cuBLASLt share a prefix but are different libraries.
    assert_eq!(
        best(LibKind::Cublas),
        Some(("libcublas.so.12".into(), vec![12]))
    );
    assert_eq!(
        best(LibKind::CublasLt),
        Some(("libcublasLt.so.13".into(), vec![13]))
    );
    // NCCL's soname is libnccl.so.2 (not the CUDA major).
    assert_eq!(best(LibKind::Nccl), Some(("libnccl.so.2".into(), vec![2])));
    // The driver's soname is libcuda.so.1; the versioned file is not the one to open, and
    // without libcuda.so.1 the unversioned link is used.
    assert_eq!(best(LibKind::Driver), Some(("libcuda.so".into(), vec![])));
    touch(d, "libcuda.so.1");
    assert_eq!(
        best(LibKind::Driver),
        Some(("libcuda.so.1".into(), vec![1]))
    );

    // Only the unversioned development link: it is used.
    let only = tempfile::tempdir().unwrap();
    touch(only.path(), "libnccl.so");
    touch(only.path(), "libnccl.so.3"); // some other ABI: ignored
    assert_eq!(
        best_in_dir(only.path(), LibKind::Nccl),
        Some((only.path().join("libnccl.so"), vec![]))
    );

    // A dangling link is not a library.
    let dangling = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        dangling.path().join("gone"),
        dangling.path().join("libnvrtc.so.13"),
    )
    .unwrap();
    assert_eq!(best_in_dir(dangling.path(), LibKind::Nvrtc), None);
}

#[test]
fn python_environments_are_found_without_running_python() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    // A conda prefix, a plain interpreter on PATH, and a pyenv shim.
    let conda = r.join("conda");
    touch(
        &conda.join("lib/python3.11/site-packages/nvidia/nccl/lib"),
        "libnccl.so.2",
    );
    let prefix = r.join("opt/py");
    touch(&prefix.join("bin"), "python3");
    touch(
        &prefix.join("lib64/python3.10/site-packages/nvidia/cuda_nvrtc/lib"),
        "libnvrtc.so.12",
    );
    let pyenv = r.join("pyenv");
    touch(&pyenv.join("shims"), "python3");
    fs::create_dir_all(pyenv.join("versions")).unwrap();
    fs::write(pyenv.join("version"), "3.11.7\n").unwrap();
    touch(
        &pyenv.join("versions/3.11.7/lib/python3.11/site-packages/nvidia/cu13/lib"),
        "libcublasLt.so.13",
    );

    let mut e = env(r);
    e.conda_prefix = Some(conda.display().to_string());
    e.path = Some(format!(
        "{}:{}",
        r.join("empty-bin").display(),
        prefix.join("bin").display()
    ));
    let plan = SearchPlan::new(&e);
    assert_eq!(
        plan.find(LibKind::Nccl).found.unwrap().source,
        format!("python {}", conda.display())
    );
    let nv = plan.find(LibKind::Nvrtc);
    assert_eq!(
        nv.found.unwrap().source,
        format!("python {}", prefix.display())
    );
    assert_eq!(
        nv.warnings.len(),
        1,
        "no libnvrtc-builtins next to libnvrtc"
    );
    assert!(
        nv.warnings[0].contains("libnvrtc-builtins"),
        "{:?}",
        nv.warnings
    );

    // The pyenv shim resolves to the selected version ($PYENV_VERSION wins over the file).
    let mut e = env(r);
    e.path = Some(pyenv.join("shims").display().to_string());
    let plan = SearchPlan::new(&e);
    let lt = plan.find(LibKind::CublasLt).found.unwrap();
    assert_eq!(
        lt.source,
        format!("python {}", pyenv.join("versions/3.11.7").display())
    );
    e.pyenv_version = Some("3.9.1".into());
    let plan = SearchPlan::new(&e);
    assert!(plan.find(LibKind::CublasLt).found.is_none());
    assert!(plan
        .notes
        .iter()
        .any(|n| n.contains("3.9.1") && n.contains("no site-packages")));
}

#[test]
fn ld_so_conf_directories_are_searched_before_the_standard_ones() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let nvidia = r.join("usr-local-nvidia/lib64");
    touch(&nvidia, "libcuda.so.1");
    touch(&r.join("system-lib"), "libcuda.so.1");
    let conf = r.join("ld.so.conf.d");
    fs::create_dir_all(&conf).unwrap();
    fs::write(
        conf.join("000_nvidia.conf"),
        format!(
            "# driver libraries\n{}\ninclude other.conf\n",
            nvidia.display()
        ),
    )
    .unwrap();
    fs::write(conf.join("README"), "/not/a/conf/file\n").unwrap();
    let mut e = env(r);
    e.ld_conf_dir = Some(conf);
    let plan = SearchPlan::new(&e);
    let d = plan.find(LibKind::Driver);
    let f = d.found.unwrap();
    assert_eq!(f.path, nvidia.join("libcuda.so.1"));
    assert_eq!(f.source, "ld.so.conf.d");
    assert_eq!(d.shadowed, vec![r.join("system-lib/libcuda.so.1")]);
    assert!(!plan
        .dirs
        .iter()
        .any(|d| d.dir == Path::new("/not/a/conf/file")));
}

#[test]
fn the_loader_fallback_is_the_last_resort() {
    let t = tempfile::tempdir().unwrap();
    let mut e = env(t.path());
    e.loader_fallback = true;
    let plan = SearchPlan::new(&e);
    let f = plan.find(LibKind::Nccl).found.unwrap();
    assert_eq!(f.path, PathBuf::from("libnccl.so.2"));
    assert_eq!(f.source, "system loader (by name)");
    assert_eq!(
        plan.find(LibKind::Driver).found.unwrap().path,
        PathBuf::from("libcuda.so.1")
    );
    assert_eq!(
        plan.find(LibKind::Nvrtc).found.unwrap().path,
        PathBuf::from("libnvrtc.so")
    );
}

/// The names of the report's failing checks.
fn failing_checks(rep: &doctor::Report) -> Vec<&str> {
    rep.checks
        .iter()
        .filter(|c| c.is_failure())
        .map(|c| c.name.as_str())
        .collect()
}

#[test]
fn missing_and_broken_libraries_get_the_right_status_advice_and_exit_code() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    // A file named like NVRTC that is not a library; nothing else.
    let ld = r.join("ld");
    touch(&ld, "libnvrtc.so.13");
    touch(&ld, "libnvrtc-builtins.so.13.0");
    let mut e = env(r);
    e.ld_library_path = Some(ld.display().to_string());

    let run = |mode| {
        doctor::run(
            &Options {
                mode,
                ..Options::default()
            },
            &e,
        )
    };
    let rep = run(Mode::Auto);
    let lib = |name: &str| {
        rep.libraries
            .iter()
            .find(|l| l.name == name)
            .unwrap()
            .clone()
    };
    let nv = lib("nvrtc");
    assert_eq!(nv.status, Status::Failed);
    assert_eq!(nv.path, Some(ld.join("libnvrtc.so.13")));
    assert!(
        nv.error.as_deref().unwrap().contains("libnvrtc.so.13"),
        "{nv:?}"
    );
    assert!(nv.advice.as_deref().unwrap().contains("does not load"));
    for name in ["driver", "cublaslt", "nccl"] {
        let l = lib(name);
        assert_eq!(l.status, Status::Missing, "{name}");
        assert!(l.path.is_none());
    }
    assert!(lib("nccl").advice.unwrap().contains("nvidia-nccl-cu13"));
    assert!(lib("cublaslt").advice.unwrap().contains("nvidia-cublas"));
    assert!(lib("driver").advice.unwrap().contains("NVIDIA driver"));
    assert!(rep.gpus.is_empty());
    // Found-but-broken counts by default; missing GPU pieces do not without a GPU.
    assert_eq!(rep.exit_code, 1);
    let failing = failing_checks(&rep);
    assert_eq!(failing, vec!["nvrtc"]);
    let compile = rep
        .checks
        .iter()
        .find(|c| c.name == "nvrtc compile")
        .unwrap();
    assert_eq!(compile.status, Status::Skipped, "never reported as passed");
    let text = doctor::render::text(&rep);
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("NOT OK"), "{text}");

    // --cpu-only: the same findings, exit 0.
    let rep = run(Mode::CpuOnly);
    assert_eq!(rep.exit_code, 0);
    assert!(rep.ok);
    assert!(rep.summary.contains("no GPU"), "{}", rep.summary);
    // --require-gpu: every missing piece counts.
    let rep = run(Mode::RequireGpu);
    assert_eq!(rep.exit_code, 1);
    let failing = failing_checks(&rep);
    for name in ["driver", "nvrtc", "cublaslt", "nccl", "gpus"] {
        assert!(failing.contains(&name), "{name} not failing: {failing:?}");
    }
    assert!(rep
        .checks
        .iter()
        .any(|c| c.name == "gpu self-tests" && c.status == Status::Skipped));
}
