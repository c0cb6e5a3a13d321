//! Builds Ferry's eBPF programs (ebpf/programs, their own workspace) for bpfel-unknown-none and
//! puts the object in OUT_DIR, so building the agent is the only step. Needs rust-src and
//! bpf-linker, which `cargo xtask setup` installs.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("agent/ lives in the workspace root");
    let ebpf = root.join("ebpf");
    for path in
        ["programs/src", "programs/Cargo.toml", "programs/Cargo.lock", "common/src", "common/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", ebpf.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_TOOLS");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // Shared by every profile of the agent, so the eBPF build is not repeated for each.
    let target_dir = root.join("target").join("ebpf");
    let linker_dir = bpf_linker_dir().unwrap_or_else(|| {
        panic!(
            "bpf-linker {BPF_LINKER_VERSION} not found on PATH or in {}: run `cargo xtask setup`",
            tools_dir().display()
        )
    });
    let path = env::join_paths(
        std::iter::once(linker_dir).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "-Z", "build-std=core", "--target", BPF_TARGET])
        .arg("--manifest-path")
        .arg(ebpf.join("programs/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path);
    // Settings of the outer (host) build must not leak into the eBPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || matches!(
                key.as_ref(),
                "RUSTC_WORKSPACE_WRAPPER" | "RUSTC_WRAPPER" | "RUSTFLAGS" | "RUSTDOCFLAGS"
            );
        if outer {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("cannot run cargo for the eBPF programs");
    assert!(
        status.success(),
        "building the eBPF programs failed (see above); `cargo xtask setup` installs what they need"
    );

    let object = target_dir.join(BPF_TARGET).join("release").join("ferry-ebpf");
    std::fs::copy(&object, out_dir.join("ferry-ebpf"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}

/// Where `cargo xtask setup` installs tools: $FERRY_TOOLS, else ~/.cache/ferry-tools.
fn tools_dir() -> PathBuf {
    env::var_os("FERRY_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/ferry-tools")
    })
}

fn bpf_linker_dir() -> Option<PathBuf> {
    let installed = tools_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}/bin"));
    std::iter::once(installed)
        .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default()))
        .find(|dir| dir.join("bpf-linker").is_file())
}
