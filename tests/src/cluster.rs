//! A real one-node Kubernetes cluster for the install test: etcd, kube-apiserver,
//! controller-manager, scheduler, containerd, kubelet and kube-proxy (built from Debian's source
//! package by `cargo xtask setup`; see ../shared/design/kubernetes.md), every daemon in one node
//! netns, pods on a CNI bridge hanging off it. Images are built locally from binaries (no
//! registry is reachable) and imported into containerd.
//!
//! Host-wide traces are undone on drop: the kubelet's sysctls, its `kubepods` cgroups, the pods'
//! mounts and netns pins, containerd's state.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Netns, kube::ApiServer, sys::run};

/// The node's address (on the node netns' loopback): the API server's advertised address and
/// the kubelet's node IP.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const POD_SUBNET: &str = "10.244.0.0/24";
pub const NODE_NAME: &str = "node1";
/// The kubelet's host-wide sysctls, restored on drop.
const KUBELET_SYSCTLS: [&str; 3] = ["kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory"];

pub struct Cluster {
    // Field order is drop order: node daemons, then the control plane, then the netns.
    daemons: Vec<(&'static str, Child)>,
    pub api: ApiServer,
    pub netns: Netns,
    pub dir: PathBuf,
    containerd_socket: PathBuf,
    sysctls: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Starts the cluster with its state and logs in `dir` (removed on drop unless the test
    /// failed); `None` when `FERRY_KUBE_BIN` is unset. Returns once the node is Ready.
    pub fn start(dir: &Path, name: &str) -> Result<Option<Cluster>> {
        let Some(bin) = std::env::var_os("FERRY_KUBE_BIN").map(PathBuf::from) else {
            eprintln!("FERRY_KUBE_BIN not set: skipping (cargo xtask test builds and sets it)");
            return Ok(None);
        };
        crate::sys::require_root()?;
        let dir = dir.to_owned();
        std::fs::create_dir_all(&dir)?;
        let netns = Netns::create(name)?;
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        // No default route (nothing may leave), but the node's own processes must route to
        // ClusterIPs for kube-proxy's DNAT to apply (pods' packets arrive routed anyway).
        netns.ip(&["route", "add", "local", crate::kube::SERVICE_RANGE, "dev", "lo"])?;
        mount_bpffs()?;
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .map(|k| Ok((*k, std::fs::read_to_string(Path::new("/proc/sys").join(k))?.trim().to_owned())))
            .collect::<Result<_>>()?;
        let api = ApiServer::start_at(&dir, &netns, NODE_IP)?.context("FERRY_KUBE_BIN is set")?;
        let mut cluster = Cluster {
            daemons: Vec::new(),
            api,
            netns,
            containerd_socket: dir.join("containerd/containerd.sock"),
            dir,
            sysctls,
        };
        cluster.start_daemons(&bin)?;
        cluster.wait_node_ready()?;
        Ok(Some(cluster))
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = self.netns.spawn(cmd, None).with_context(|| format!("starting {name}"))?;
        self.daemons.push((name, child));
        Ok(())
    }

    fn start_daemons(&mut self, bin: &Path) -> Result<()> {
        let kubeconfig = self.api.kubeconfig.clone();
        let mut controllers = Command::new(bin.join("kube-controller-manager"));
        controllers
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--service-account-private-key-file={}", self.api.file("sa.key").display()))
            .arg(format!("--root-ca-file={}", self.api.file("ca.crt").display()))
            .args(["--leader-elect=false", "--port=0", "--use-service-account-credentials=true"]);
        self.spawn("controller-manager", controllers)?;
        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--leader-elect=false", "--port=0"]);
        self.spawn("scheduler", scheduler)?;

        let containerd = self.write_containerd_config()?;
        let mut runtime = Command::new("containerd");
        runtime.arg("--config").arg(&containerd);
        self.spawn("containerd", runtime)?;
        self.wait_for(Duration::from_secs(20), "containerd", |c| Ok(c.containerd_socket.exists()))?;
        self.import_images(bin)?;

        let kubelet_dir = self.dir.join("kubelet");
        std::fs::create_dir_all(&kubelet_dir)?;
        let config = kubelet_dir.join("config.yaml");
        std::fs::write(
            &config,
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: cgroupfs\n\
             failSwapOn: false\nreadOnlyPort: 0\nauthentication: {anonymous: {enabled: true}, webhook: {enabled: false}}\n\
             authorization: {mode: AlwaysAllow}\nclusterDomain: cluster.local\n\
             evictionHard: {memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}\n",
        )?;
        let mut kubelet = Command::new(bin.join("kubelet"));
        kubelet
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", kubelet_dir.join("root").display()))
            .arg(format!("--cert-dir={}", kubelet_dir.join("pki").display()))
            .arg(format!("--container-runtime-endpoint=unix://{}", self.containerd_socket.display()))
            .args([
                "--container-runtime=remote",
                "--oom-score-adj=0",
                "--pod-infra-container-image=localhost/pause:1",
            ])
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"));
        self.spawn("kubelet", kubelet)?;
        let mut proxy = Command::new(bin.join("kube-proxy"));
        proxy
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .args(["--proxy-mode=iptables", "--oom-score-adj=0", "--conntrack-max-per-core=0"])
            .arg("--cluster-cidr=10.244.0.0/16")
            .args(["--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256"]);
        self.spawn("kube-proxy", proxy)
    }

    /// containerd with its state under the test's directory, the CRI plugin's CNI on a bridge.
    fn write_containerd_config(&self) -> Result<PathBuf> {
        let dir = self.dir.join("containerd");
        let cni = self.dir.join("cni");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(cni.join("net.d"))?;
        std::fs::write(
            cni.join("net.d/10-bridge.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "ferry-test", "plugins": [{{"type": "bridge", "bridge": "cni0",
 "isGateway": true, "ipMasq": false, "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_SUBNET}"}}]],
 "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}}]}}"#,
                cni.join("ipam").display()
            ),
        )?;
        let config = dir.join("config.toml");
        let mut toml = String::new();
        let _ = write!(
            toml,
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{socket}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"localhost/pause:1\"\n  \
             restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{cni}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = self.containerd_socket.display(),
            cni = cni.join("net.d").display(),
        );
        std::fs::write(&config, toml)?;
        Ok(config)
    }

    /// Images of one layer each, made from local binaries and imported into containerd:
    /// `localhost/ferry:dev`, `localhost/app:1` (the sandbox app) and `localhost/pause:1`.
    fn import_images(&self, bin: &Path) -> Result<()> {
        for (tag, binary, entry) in [
            ("localhost/ferry:dev", crate::ferry_bin()?, "/usr/local/bin/ferry"),
            ("localhost/app:1", crate::app_bin()?, "/usr/local/bin/sandbox-app"),
            ("localhost/pause:1", bin.join("pause"), "/pause"),
        ] {
            let archive = build_image(&self.dir.join("images"), tag, &binary, entry)?;
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&self.containerd_socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(&archive)
                .output()?;
            if !out.status.success() {
                bail!("ctr images import {tag}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    fn wait_node_ready(&self) -> Result<()> {
        self.wait_for(Duration::from_secs(90), "node Ready", |c| {
            let (_, out, _) = c.api.kubectl(
                &[
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
                None,
            )?;
            Ok(out.trim() == "True")
        })
    }

    /// Polls `ready` every 200 ms until it holds; on timeout the error names the daemons' logs.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&Cluster) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready(self)? {
            if Instant::now() > deadline {
                bail!("{what}: not after {timeout:?}; daemon logs in {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Runs `args` in the first container of pod `namespace/pod` (through containerd, as
    /// `kubectl exec` would); (exit code, stdout, stderr).
    pub fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<(i32, String, String)> {
        let (_, id, _) = self.api.kubectl(
            &[
                "get",
                "pod",
                pod,
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.containerStatuses[0].containerID}",
            ],
            None,
        )?;
        let id = id.trim().trim_start_matches("containerd://");
        if id.is_empty() {
            bail!("pod {namespace}/{pod} has no running container");
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let exec_id = format!("test{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io", "tasks", "exec", "--exec-id", &exec_id, id])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Pods first, so their containers and mounts go while the kubelet still runs.
        let _ = self
            .api
            .kubectl(&["delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force"], None);
        for (_, mut daemon) in self.daemons.drain(..).rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // The pods' processes and containerd's shims outlive the daemons.
        let _ = std::fs::write("/sys/fs/cgroup/unified/kubepods/cgroup.kill", "1");
        let shims = format!("containerd-shim.*{}", self.containerd_socket.display());
        let _ = Command::new("pkill").args(["-KILL", "-f", &shims]).status();
        std::thread::sleep(Duration::from_millis(300));
        unmount_under(&self.dir);
        for cgroup_root in [
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/cpuset",
            "/sys/fs/cgroup/cpuacct",
            "/sys/fs/cgroup/blkio",
            "/sys/fs/cgroup/devices",
            "/sys/fs/cgroup/freezer",
            "/sys/fs/cgroup/systemd",
        ] {
            remove_cgroup_tree(&Path::new(cgroup_root).join("kubepods"));
        }
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("cni-") {
                let _ = Command::new("ip").arg("netns").arg("del").arg(entry.file_name()).status();
            }
        }
        for (key, value) in &self.sysctls {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
        }
        // The daemons' logs stay for a failed test to show.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The agents pin into /sys/fs/bpf through a hostPath with HostToContainer propagation: it must
/// be the host's bpffs, and a shared mount (as systemd hosts have it).
fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    run(Command::new("mount").args(["--make-shared", "/sys/fs/bpf"]))
}

/// Lazily unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A docker-archive image of one layer: `binary` at `entry` (its entrypoint) with the shared
/// libraries `ldd` lists.
fn build_image(dir: &Path, tag: &str, binary: &Path, entry: &str) -> Result<PathBuf> {
    let name = tag.replace(['/', ':'], "-");
    let work = dir.join(&name);
    let rootfs = work.join("rootfs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&rootfs)?;
    let mut files = vec![(binary.to_owned(), PathBuf::from(entry))];
    let ldd = Command::new("ldd").arg(binary).output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
            let real = std::fs::canonicalize(path)?;
            files.push((real, PathBuf::from(path)));
        }
    }
    for (from, to) in &files {
        let target = rootfs.join(to.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        std::fs::copy(from, &target).with_context(|| format!("copying {}", from.display()))?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    run(Command::new("tar").arg("-cf").arg(work.join("layer.tar")).arg("-C").arg(&rootfs).arg("."))?;
    let digest = sha256(&work.join("layer.tar"))?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["{entry}"],"Env":["PATH=/usr/local/bin:/usr/bin:/bin"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{digest}"]}}}}"#
    );
    std::fs::write(work.join("config.json"), config)?;
    std::fs::write(
        work.join("manifest.json"),
        format!(r#"[{{"Config":"config.json","RepoTags":["{tag}"],"Layers":["layer.tar"]}}]"#),
    )?;
    let archive = dir.join(format!("{name}.tar"));
    run(Command::new("tar").arg("-cf").arg(&archive).arg("-C").arg(&work).args([
        "manifest.json",
        "config.json",
        "layer.tar",
    ]))?;
    Ok(archive)
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(file).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().context("sha256sum printed nothing")?.to_owned())
}
