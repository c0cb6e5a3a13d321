//! The independent HBONE peer (peers/hbone_peer.py: PyPI h2 + Python's ssl) and certificates for
//! it, issued with `ferry ca issue`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Netns, Sandbox, ferry_bin};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/hbone_peer.py");
const METRICS_PARSER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/parse_metrics.py");

/// One sample of a metrics exposition, as an independent parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

/// Parses an OpenMetrics exposition with PyPI's prometheus_client (strict); fails if malformed.
pub fn parse_metrics(exposition: &str) -> Result<Vec<Sample>> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg(METRICS_PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(exposition.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("exposition rejected by prometheus_client: {}", String::from_utf8_lossy(&output.stderr));
    }
    let samples: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    Ok(samples
        .into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap_or_default().to_owned(),
            labels: s["labels"].as_object().cloned().unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect())
}

/// The sum of the samples named `name` whose labels include all of `labels`.
pub fn sum_samples(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).and_then(Value::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// A certificate chain and key in PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The Python HBONE server; collects the JSON lines it prints.
pub struct PeerServer {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl PeerServer {
    /// Waits up to `timeout` for `n` printed events (requests or TLS errors).
    pub fn wait_events(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandbox {
    /// Issues a certificate for `identity` from the CA in `ca_dir` into the sandbox's directory.
    pub fn issue_cert(&self, ca_dir: &Path, identity: &str, name: &str) -> Result<CertFiles> {
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        let status = Command::new(ferry_bin()?)
            .args(["ca", "issue"])
            .arg(ca_dir)
            .arg(identity)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("ferry ca issue {identity} failed");
        }
        Ok(files)
    }

    /// A second, unrelated CA in the sandbox's directory.
    pub fn other_ca(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        let status =
            Command::new(ferry_bin()?).args(["ca", "init"]).arg(&dir).stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("ferry ca init {} failed", dir.display());
        }
        Ok(dir)
    }
}

fn python(args: &[&str], cert: Option<&CertFiles>, ca_dir: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(PEER).args(args).arg("--ca").arg(ca_dir.join("root-cert.pem"));
    if let Some(files) = cert {
        cmd.arg("--cert").arg(&files.cert).arg("--key").arg(&files.key);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

/// Runs the Python HBONE client from `netns` against `connect`; returns its JSON lines (the TLS
/// line first, then one per request).
pub fn hbone_client(
    netns: &Netns,
    connect: SocketAddr,
    cert: Option<&CertFiles>,
    ca_dir: &Path,
    requests: &[&str],
) -> Result<Vec<Value>> {
    hbone_client_with(netns, connect, cert, ca_dir, &[], requests)
}

/// Like [`hbone_client`], with more client flags: `--alpn LIST` (comma-separated, or `none`)
/// offers other ALPN protocols; `--idle SECS` stays silent after the TLS handshake and reports
/// when the server closed.
pub fn hbone_client_with(
    netns: &Netns,
    connect: SocketAddr,
    cert: Option<&CertFiles>,
    ca_dir: &Path,
    flags: &[&str],
    requests: &[&str],
) -> Result<Vec<Value>> {
    let addr = connect.to_string();
    let mut cmd = python(&["client", "--connect", &addr], cert, ca_dir);
    cmd.args(flags);
    for request in requests {
        cmd.arg("--request").arg(request);
    }
    let output = netns.spawn(cmd, None)?.wait_with_output()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("peer printed {l:?}")))
        .collect()
}

/// Starts the Python HBONE server in `netns` on `listen` with `cert` and `extra` flags (e.g.
/// `--answer-after-data`); waits until it listens.
pub fn hbone_server(
    netns: &Netns,
    listen: SocketAddr,
    cert: &CertFiles,
    ca_dir: &Path,
    extra: &[&str],
) -> Result<PeerServer> {
    let addr = listen.to_string();
    let args: Vec<&str> = ["server", "--listen", &addr].into_iter().chain(extra.iter().copied()).collect();
    let mut child = netns.spawn(python(&args, Some(cert), ca_dir), None)?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line.contains("listening") => {}
        other => bail!("HBONE peer server did not start: {other:?}"),
    }
    let collected = Arc::new(Mutex::new(Vec::new()));
    let sink = collected.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                sink.lock().unwrap().push(value);
            }
        }
    });
    Ok(PeerServer { child, lines: collected })
}
