//! `cargo xtask setup`: rust-src, bpf-linker built against the toolchain's own libLLVM, and the
//! Debian packages the tests use. Each step checks first, so a second run takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the sandbox, tests and bench use, by the command (or file) that shows them.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("setpriv", "util-linux"),
    ("openssl", "openssl"),
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    // The real API server of the Kubernetes tests: etcd, and what builds kube-apiserver.
    ("etcd", "etcd-server"),
    ("go", "golang-go"),
    (
        "/usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go",
        "golang-github-modern-go-reflect2-dev",
    ),
    ("rsync", "rsync"),
    ("jq", "jq"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
    // The one-node cluster: container runtime, CNI plugins, kube-proxy's iptables.
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
];

/// PyPI packages of the independent test peers (tests/peers/), by the module that shows them.
const PYTHON_PACKAGES: &[(&str, &str)] = &[("h2", "h2"), ("prometheus_client", "prometheus_client")];

pub(crate) fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    debian_packages()?;
    python_packages()?;
    kube_bin_dir()?;
    Ok(())
}

/// kube-apiserver and kube-controller-manager for the Kubernetes tests (built once, cached).
pub(crate) fn kube_bin_dir() -> Result<PathBuf> {
    crate::kubernetes::binaries(&tools_dir())
}

fn python_packages() -> Result<()> {
    for (module, package) in PYTHON_PACKAGES {
        let present =
            Command::new("python3").args(["-c", &format!("import {module}")]).output()?.status.success();
        if !present {
            eprintln!("setup: pip install {package}");
            let status = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--root-user-action=ignore", package])
                .status()?;
            if !status.success() {
                bail!("pip install {package} failed");
            }
        }
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?))
}

/// Where tools are installed: $FERRY_TOOLS, else ~/.cache/ferry-tools (agent/build.rs looks there).
fn tools_dir() -> PathBuf {
    std::env::var_os("FERRY_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/ferry-tools")
    })
}

fn rust_src() -> Result<()> {
    let sysroot = sysroot()?;
    let marker = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if marker.exists() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src");
    let rustup = Command::new("timeout").args(["120", "rustup", "component", "add", "rust-src"]).status();
    if rustup.is_ok_and(|s| s.success()) && marker.exists() {
        return Ok(());
    }
    // Offline fallback: the tarball kept beside the repository.
    let script = crate::workspace_root().join("../shared/toolchain/install-rust-src.sh");
    if script.exists() && Command::new("bash").arg(&script).status()?.success() && marker.exists() {
        return Ok(());
    }
    bail!("cannot install rust-src: rustup failed and {} did not help", script.display())
}

fn bpf_linker() -> Result<()> {
    let binary = bpf_linker_dir().join("bpf-linker");
    let root = bpf_linker_dir().parent().context("bpf-linker dir")?.to_owned();
    if Command::new(&binary).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against the toolchain's libLLVM (1-3 min)");
    // bpf-linker's build wants an LLVM prefix; the Rust toolchain ships libLLVM 22, which is
    // enough once it is visible under the names llvm-sys looks for.
    let sysroot = sysroot()?;
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.22")))
        .context("the Rust toolchain has no libLLVM.so.22.*")?;
    let prefix = tools_dir().join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    std::fs::create_dir_all(prefix.join("bin"))?;
    for name in [std::ffi::OsString::from("libLLVM.so"), lib.file_name().context("lib name")?.to_owned()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    let llvm_config = prefix.join("bin/llvm-config");
    // Never run; its presence satisfies the build script's probe.
    std::fs::write(&llvm_config, "#!/bin/sh\n")?;
    std::fs::set_permissions(&llvm_config, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Where `cargo fuzz` is installed; callers put it on PATH.
pub(crate) fn cargo_fuzz_dir() -> PathBuf {
    tools_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}/bin"))
}

/// The bpf-linker the agent's build script uses, for commands that build the agent elsewhere.
pub(crate) fn bpf_linker_dir() -> PathBuf {
    tools_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}/bin"))
}

fn cargo_fuzz() -> Result<()> {
    let dir = cargo_fuzz_dir();
    if Command::new(dir.join("cargo-fuzz")).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION, "--root"])
        .arg(dir.parent().context("cargo-fuzz dir")?)
        .status()?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(command, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    let update = Command::new("apt-get").arg("update").status()?;
    let install =
        Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(&missing).status()?;
    if !update.success() || !install.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
