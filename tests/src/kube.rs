//! A real Kubernetes control plane for the Kubernetes-mode tests: etcd and kube-apiserver (built
//! from Debian's source package by `cargo xtask setup`) on the loopback of a sandbox node's netns,
//! where that node's agent reaches them.
//!
//! `FERRY_KUBE_BIN` names the directory of the kube binaries; without it [`ApiServer::start`]
//! returns `None` and the tests that need it skip (a bare `cargo test` has no apiserver).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Netns, sys::spawn_in};

/// The token of the test's cluster admin (group system:masters).
pub const ADMIN_TOKEN: &str = "ferry-test-admin";

/// Loopback ports in the node's netns (each test has its own netns).
const ETCD_CLIENT: u16 = 2379;
const ETCD_PEER: u16 = 2380;
const SECURE: u16 = 6443;
/// Service ClusterIPs, and the `kubernetes` Service's (the first). The cluster is dual-stack,
/// IPv4 first: a Service is IPv4 unless its `ipFamilies` ask for IPv6.
pub const SERVICE_RANGE: &str = "10.96.0.0/16";
/// IPv6 ClusterIPs (1.20 takes at most a /108).
const SERVICE_RANGE6: &str = "fd00:96::/112";
const SERVICE_IP: &str = "10.96.0.1";

pub struct ApiServer {
    // Field order is drop order: the apiserver before etcd.
    apiserver: Option<Child>,
    bin: PathBuf,
    etcd: Child,
    dir: PathBuf,
    /// The netns everything runs in (a sandbox node's).
    netns: PathBuf,
    /// Where pods reach it (the `kubernetes` Service's endpoint); it listens on every address
    /// unless this is loopback.
    advertise: Ipv4Addr,
    pub url: String,
    /// A kubeconfig for the admin (kubectl --kubeconfig).
    pub kubeconfig: PathBuf,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver on the loopback of `netns` with state under `dir`; `None`
    /// when `FERRY_KUBE_BIN` is unset.
    pub fn start(dir: &Path, netns: &Netns) -> Result<Option<ApiServer>> {
        ApiServer::start_at(dir, netns, Ipv4Addr::LOCALHOST)
    }

    /// [`ApiServer::start`], advertised to pods at `advertise`.
    pub fn start_at(dir: &Path, netns: &Netns, advertise: Ipv4Addr) -> Result<Option<ApiServer>> {
        let Some(bin) = std::env::var_os("FERRY_KUBE_BIN").map(PathBuf::from) else {
            eprintln!("FERRY_KUBE_BIN not set: skipping (cargo xtask test builds and sets it)");
            return Ok(None);
        };
        let dir = dir.join("kube");
        std::fs::create_dir_all(&dir)?;
        let (etcd_client, etcd_peer) = (ETCD_CLIENT, ETCD_PEER);
        let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
        let mut etcd = Command::new("etcd");
        etcd.arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"))
            .stdout(log("etcd.log")?)
            .stderr(log("etcd.log")?);
        let etcd = netns.spawn(etcd, None).context("starting etcd (Debian package etcd-server)")?;
        // A CA and a serving certificate it signs (rustls refuses a CA certificate as a server's).
        std::fs::write(
            dir.join("serving.ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,IP:{advertise},IP:{SERVICE_IP},DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default,DNS:kubernetes\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        for args in [
            "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ferry-test-ca -keyout ca.key -out ca.crt",
            "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout serving.key -out serving.csr",
            "x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile serving.ext \
             -out serving.crt",
            "genrsa -out sa.key 2048",
            "rsa -in sa.key -pubout -out sa.pub",
        ] {
            openssl(&dir, &args.split_whitespace().collect::<Vec<_>>())?;
        }
        std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin,system:masters\n"))?;
        let url = format!("https://127.0.0.1:{SECURE}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, &dir.join("ca.crt"), ADMIN_TOKEN))?;
        let netns = netns.path().to_owned();
        let mut server = ApiServer { apiserver: None, bin, etcd, dir, netns, advertise, url, kubeconfig };
        server.restart()?;
        Ok(Some(server))
    }

    /// Stops kube-apiserver (etcd keeps the cluster's state): the API is unreachable.
    pub fn stop(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            let _ = apiserver.kill();
            let _ = apiserver.wait();
        }
    }

    /// Starts kube-apiserver (again) and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let path = |name: &str| self.dir.join(name).display().to_string();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("apiserver.log"))?;
        let mut apiserver = Command::new(self.bin.join("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT}"))
            .arg(format!(
                "--bind-address={}",
                if self.advertise.is_loopback() { self.advertise } else { Ipv4Addr::UNSPECIFIED }
            ))
            .arg(format!("--advertise-address={}", self.advertise))
            .arg(format!("--secure-port={SECURE}"))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", path("serving.crt")))
            .arg(format!("--tls-private-key-file={}", path("serving.key")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--service-account-key-file={}", path("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", path("sa.key")))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-cluster-ip-range={SERVICE_RANGE},{SERVICE_RANGE6}"))
            // Dual-stack Pods and Services are alpha in 1.20.
            .arg("--feature-gates=IPv6DualStack=true")
            .stdout(log.try_clone()?)
            .stderr(log);
        self.apiserver = Some(spawn_in(&self.netns, apiserver, None).context("starting kube-apiserver")?);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((0, out, _)) = self.kubectl(&["get", "--raw", "/readyz"], None)
                && out.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 60 s; log: {}",
                    self.dir.join("apiserver.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs kubectl as the admin, with `stdin` piped in if given; (exit code, stdout, stderr).
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<(i32, String, String)> {
        self.kubectl_as(&self.kubeconfig, args, stdin)
    }

    /// Runs kubectl with the credentials of `kubeconfig`.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(i32, String, String)> {
        let mut kubectl = Command::new("kubectl");
        kubectl
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_in(&self.netns, kubectl, None).context("running kubectl")?;
        if let Some(input) = stdin {
            child.stdin.take().context("kubectl stdin")?.write_all(input.as_bytes())?;
        }
        drop(child.stdin.take());
        let output = child.wait_with_output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// A file of the control plane's state directory (certificates, keys, logs).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A kubeconfig (written under the test's directory) that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig_yaml(&self.url, &self.dir.join("ca.crt"), token))?;
        Ok(path)
    }

    /// `kubectl apply -f -` of `yaml`; fails with kubectl's message unless it succeeds.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let (code, _, stderr) = self.kubectl(&["apply", "-f", "-"], Some(yaml))?;
        if code != 0 {
            bail!("kubectl apply failed: {stderr}");
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("etcd"));
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl").args(args).current_dir(dir).output().context("running openssl")?;
    if !output.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// A kubeconfig that authenticates with `token` and trusts the apiserver's self-signed `ca`.
pub fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    \
         certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  \
         context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        ca.display()
    )
}

/// The install manifests `cargo xtask manifests` writes, by file name under deploy/: the CRD
/// `ferry crd` generates, then deploy/base.yaml; `ferry-hitless.yaml` with the DaemonSet's
/// rolling update starting the new agent first (Kubernetes 1.22+).
pub fn manifests() -> Result<Vec<(&'static str, String)>> {
    let crd = Command::new(crate::ferry_bin()?).arg("crd").output().context("running ferry crd")?;
    if !crd.status.success() {
        bail!("ferry crd failed: {}", String::from_utf8_lossy(&crd.stderr));
    }
    let base = std::fs::read_to_string(deploy_dir().join("base.yaml"))?;
    let one_at_a_time = "      maxUnavailable: 1\n";
    if !base.contains(one_at_a_time) {
        bail!("deploy/base.yaml: the DaemonSet's rollingUpdate must read {one_at_a_time:?}");
    }
    let manifest = |base: &str| {
        format!(
            "# Generated by `cargo xtask manifests` from deploy/base.yaml and `ferry crd`: edit those.\n\
             # Install: kubectl apply -f deploy/<this file> (see deploy/README.md).\n{}---\n{base}",
            String::from_utf8_lossy(&crd.stdout)
        )
    };
    let surge = base.replace(one_at_a_time, "      maxSurge: 1\n      maxUnavailable: 0\n");
    Ok(vec![("ferry.yaml", manifest(&base)), ("ferry-hitless.yaml", manifest(&surge))])
}

/// The repository's deploy/ directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}
