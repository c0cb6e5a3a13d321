//! A real kube-apiserver (and the rest of a one-node cluster: controller-manager, scheduler,
//! kubelet, kube-proxy, and the pause container) for the Kubernetes-mode tests, built from Debian's
//! own `kubernetes` source package (no registry ships the binaries; see
//! ../shared/design/kubernetes.md) and cached, so only the first run pays the ~10 minutes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// What Debian bookworm's source package builds.
const VERSION: &str = "1.20.2";
const BINARIES: [&str; 5] =
    ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"];
/// The pod sandbox's process, compiled statically from the same tree.
const PAUSE: &str = "pause";
/// Debian's reflect2 1.0.2; the 1.0.1 vendored in the tree crashes on Go >= 1.18.
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

/// The directory holding the cluster's binaries, built now if not cached.
pub(crate) fn binaries(tools: &Path) -> Result<PathBuf> {
    let bin = tools.join(format!("kubernetes-{VERSION}/bin"));
    if BINARIES.iter().chain([&PAUSE]).all(|b| bin.join(b).exists()) {
        return Ok(bin);
    }
    eprintln!("setup: building Kubernetes {VERSION} from Debian's source package (about 10 minutes, once)");
    enable_deb_src()?;
    let scratch = tools.join(format!("kubernetes-{VERSION}/build"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    run(Command::new("apt-get").args(["source", "--download-only", "kubernetes"]).current_dir(&scratch))?;
    let orig = std::fs::read_dir(&scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".orig.tar")))
        .context("no kubernetes orig tarball downloaded")?;
    let tree = scratch.join("src");
    std::fs::create_dir_all(&tree)?;
    run(Command::new("tar").arg("xf").arg(&orig).arg("--strip-components=1").arg("-C").arg(&tree))?;
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    for entry in std::fs::read_dir(&vendored)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".go") || name.ends_with(".s") {
            std::fs::remove_file(entry.path())?;
        }
    }
    for entry in
        std::fs::read_dir(REFLECT2).with_context(|| format!("{REFLECT2} (reflect2 1.0.2)"))?.flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".go") && !name.ends_with("_test.go")) || name.ends_with(".s") {
            std::fs::copy(entry.path(), vendored.join(&name))?;
        }
    }
    let home = scratch.join("home");
    run(Command::new("make")
        .arg(format!("WHAT={}", BINARIES.map(|b| format!("cmd/{b}")).join(" ")))
        .current_dir(&tree)
        .env("GOPATH", home.join("go"))
        .env("GOCACHE", home.join("cache"))
        .env("HOME", &home))?;
    std::fs::create_dir_all(&bin)?;
    for binary in BINARIES {
        let built = find_built(&tree, binary)?;
        std::fs::copy(&built, bin.join(binary))?;
    }
    run(Command::new("gcc")
        .args(["-Os", "-static", "-o"])
        .arg(bin.join(PAUSE))
        .arg(
            walk(&tree.join("build/pause"))
                .into_iter()
                .find(|p| p.ends_with("pause.c"))
                .context("no pause.c")?,
        )
        .arg(format!("-DVERSION={VERSION}")))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(bin)
}

/// `apt-get source` needs deb-src entries: the same archives as the binary ones.
fn enable_deb_src() -> Result<()> {
    let src = Path::new("/etc/apt/sources.list.d/debian-src.sources");
    if src.exists() {
        return Ok(());
    }
    let binary = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .context("reading /etc/apt/sources.list.d/debian.sources")?;
    std::fs::write(src, binary.replace("Types: deb\n", "Types: deb-src\n"))?;
    run(Command::new("apt-get").arg("update"))
}

fn find_built(tree: &Path, binary: &str) -> Result<PathBuf> {
    let output = tree.join("_output");
    let found = walk(&output).into_iter().find(|p| {
        p.file_name().is_some_and(|n| n == binary) && p.parent().is_some_and(|d| d.ends_with("bin"))
    });
    found.with_context(|| format!("{binary} not found under {}", output.display()))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
