//! `cargo xtask ...`: setup, tests and the demo sandbox.

mod bench;
mod demo;
mod kubernetes;
mod setup;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Ferry's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent; seconds when all is there).
    Setup,
    /// Setup, format check, clippy -D warnings, build (eBPF included), unit and end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the config parser, the policy engine and HBONE request handling (cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Measure Ferry against direct TCP in the sandbox (see docs/performance.md).
    Bench {
        /// A one-minute smoke run.
        #[arg(long)]
        quick: bool,
        /// Only the cases whose "<path> <workload>" contains this (e.g. "new connections",
        /// "mTLS rr 1B"); no scale cases, docs untouched. For profiling one case.
        #[arg(long)]
        only: Option<String>,
        /// Another build of the `ferry` binary to run as the agent (A/B against a change).
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
        /// Keep every CPU out of idle with a SCHED_IDLE busy loop, as on a node busy with other
        /// work: shows what waking halted (v)CPUs adds to round trips. Docs untouched.
        #[arg(long)]
        awake: bool,
    },
    /// Regenerate deploy/ferry.yaml and deploy/ferry-hitless.yaml from deploy/base.yaml and `ferry crd`.
    Manifests,
    /// Two nodes with two pods each in network namespaces; traffic through the agents.
    Demo {
        #[command(subcommand)]
        action: Option<demo::Action>,
        /// Leave the sandbox running and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Demo { action, keep } => demo::run(action, keep),
        Task::Bench { quick, only, agent, awake } => {
            use_release_binaries()?;
            if let Some(agent) = agent {
                // SAFETY: still before any other thread exists.
                unsafe { std::env::set_var("FERRY_BIN", std::fs::canonicalize(agent)?) };
            }
            bench::run(quick, only.as_deref(), awake)
        }
        Task::Manifests => {
            cargo(&["build", "--bin", "ferry"])?;
            for (name, text) in ferry_sandbox::kube::manifests()? {
                let path = ferry_sandbox::kube::deploy_dir().join(name);
                std::fs::write(&path, text)?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Task::Fuzz { seconds } => {
            setup::run()?;
            fuzz(seconds)
        }
    }
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("FERRY_KUBE_BIN", setup::kube_bin_dir()?) };
    // Leftovers of test runs that were killed (their guards never ran).
    ferry_sandbox::teardown_prefix("fy");
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["fmt", "--manifest-path", "ebpf/programs/Cargo.toml", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])?;
    cargo(&["build", "--workspace", "--bins"])?;
    fuzz(FUZZ_SECONDS_IN_TEST)?;
    let mut test_args = vec!["test", "--workspace", "--no-fail-fast"];
    test_args.extend(args.iter().map(String::as_str));
    run_tests(&test_args)
}

/// Fuzz targets (fuzz/fuzz_targets), each run from its seeds plus the corpus of earlier runs.
const FUZZ_TARGETS: &[&str] = &["config", "policy", "hbone_request"];
/// A short run in `cargo xtask test`: enough to catch regressions on the seeds and their mutations.
const FUZZ_SECONDS_IN_TEST: u64 = 5;

fn fuzz(seconds: u64) -> Result<()> {
    let root = workspace_root();
    let path = std::env::join_paths(
        [setup::cargo_fuzz_dir(), setup::bpf_linker_dir()]
            .into_iter()
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    for target in FUZZ_TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        let seeds = root.join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&seeds)?;
        eprintln!("+ cargo fuzz run {target} ({seconds} s)");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&root)
            .env("PATH", &path)
            // cargo-fuzz passes nightly-only sanitizer flags; the stable toolchain accepts them so.
            .env("RUSTC_BOOTSTRAP", "1")
            .status()?;
        if !status.success() {
            bail!("fuzz target {target} failed: the crash input is in fuzz/artifacts/{target}/");
        }
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one line that sums every test binary.
fn run_tests(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                summary
                    .split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Setup, a release build, and the sandbox pointed at the release binaries (the demo and the
/// bench measure speed). Call before any thread is started.
pub(crate) fn use_release_binaries() -> Result<()> {
    setup::run()?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let bin_dir = workspace_root().join("target/release");
    // SAFETY: called first thing in main's task, before any other thread exists.
    unsafe {
        std::env::set_var("FERRY_BIN", bin_dir.join("ferry"));
        std::env::set_var("FERRY_SANDBOX_APP", bin_dir.join("sandbox-app"));
    }
    Ok(())
}

/// Runs cargo in the workspace root, failing on a non-zero exit.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ is in the root").to_owned()
}
