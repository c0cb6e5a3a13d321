//! A network-namespace sandbox for Ferry: "nodes" and "pods" as network namespaces (pods also get
//! a cgroup v2 directory), joined by veths, with Ferry agents running in the node namespaces.
//! Used by the end-to-end tests and by `cargo xtask demo`.
//!
//! Everything created is owned by a guard that removes it on drop, also while a test panics.
//! Names carry a per-process prefix so concurrent tests never collide.

mod app;
mod capture;
pub mod cluster;
pub mod kube;
mod peer;
mod sys;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub use app::{ConnectOutcome, Probe, Server};
pub use capture::{Capture, Segment};
pub use peer::{
    CertFiles, PeerServer, Sample, hbone_client, hbone_client_with, hbone_server, parse_metrics, sum_samples,
};
pub use sys::{Cgroup, Netns, ProcUsage, Process};

/// The cgroup v2 hierarchy of this machine (hybrid layout).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// The underlay subnet joining the nodes: node i (from 1) is 10.200.0.i.
const UNDERLAY_PREFIX: [u8; 3] = [10, 200, 0];

/// How to lay out a sandbox: nodes, each with pods.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Listed in the config as meshed (captured); unmeshed pods are not listed at all.
    pub meshed: bool,
    /// The pod's cgroup, relative to the sandbox's cgroup directory (default: its name), e.g.
    /// `kubepods/besteffort/pod<uid>` for a pod the agent finds the way a kubelet lays it out.
    pub cgroup: Option<String>,
}

impl PodSpec {
    pub fn meshed(name: &str, service_account: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: service_account.into(),
            meshed: true,
            cgroup: None,
        }
    }
    pub fn unmeshed(name: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            meshed: false,
            cgroup: None,
        }
    }
}

pub struct Pod {
    pub spec: PodSpec,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Every pod is dual-stack on the wire; the config lists this address only where a test asks
    /// for it ([`Sandbox::dual_stack_config_for`]).
    pub ip6: Ipv6Addr,
    pub netns: Netns,
    pub cgroup: Cgroup,
}

pub struct Node {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_ip6: Ipv6Addr,
    pub netns: Netns,
    agent: Option<Agent>,
    /// Agents that handed over to a newer one and are draining.
    retired: Vec<Agent>,
    /// Extra environment of the node's agents (e.g. KUBECONFIG).
    agent_env: Vec<(String, String)>,
    /// The open-files limit (soft, hard) the node's agents start with, if not the test's own.
    agent_open_files: Option<(u64, u64)>,
}

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    // Field order is drop order: agents and pods go before the nodes and the cgroup parent.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    _cgroup: Cgroup,
}

/// A unique short prefix per sandbox: netns and cgroup names must not collide across tests.
fn unique_id(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("fy{}{}-{label}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Sandbox {
    /// Builds the topology: nodes joined by one underlay bridge-less veth chain (two nodes: one
    /// veth pair), pods with /32 addresses routed by their node.
    pub fn new(label: &str, layout: &[(&str, Vec<PodSpec>)]) -> Result<Sandbox> {
        Sandbox::named(&unique_id(label), layout)
    }

    /// Like [`Sandbox::new`] with a fixed id, for a sandbox that outlives its process (the demo's
    /// `--keep`); [`teardown`] removes it by id. Leftovers of the same id are removed first.
    pub fn named(id: &str, layout: &[(&str, Vec<PodSpec>)]) -> Result<Sandbox> {
        sys::require_root()?;
        teardown(id);
        let id = id.to_owned();
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let cgroup = Cgroup::create(&Path::new(CGROUP2_ROOT).join(&id))?;
        let mut sandbox =
            Sandbox { id: id.clone(), dir, pods: Vec::new(), nodes: Vec::new(), _cgroup: cgroup };
        if layout.len() > 2 {
            bail!("the sandbox supports one or two nodes");
        }
        for (i, (node_name, _)) in layout.iter().enumerate() {
            let netns = Netns::create(&format!("{id}-{node_name}"))?;
            let underlay_ip =
                Ipv4Addr::new(UNDERLAY_PREFIX[0], UNDERLAY_PREFIX[1], UNDERLAY_PREFIX[2], i as u8 + 1);
            netns.ip(&["link", "set", "lo", "up"])?;
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            sandbox.nodes.push(Node {
                name: node_name.to_string(),
                underlay_ip,
                underlay_ip6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, i as u16 + 1),
                netns,
                agent: None,
                retired: Vec::new(),
                agent_env: Vec::new(),
                agent_open_files: None,
            });
        }
        if sandbox.nodes.len() == 2 {
            let (a, b) = (&sandbox.nodes[0], &sandbox.nodes[1]);
            a.netns.ip(&[
                "link",
                "add",
                "ul",
                "type",
                "veth",
                "peer",
                "name",
                "ul",
                "netns",
                b.netns.name(),
            ])?;
            for node in [a, b] {
                node.netns.ip(&["addr", "add", &format!("{}/24", node.underlay_ip), "dev", "ul"])?;
                let underlay6 = format!("{}/64", node.underlay_ip6);
                node.netns.ip(&["-6", "addr", "add", &underlay6, "dev", "ul", "nodad"])?;
                node.netns.ip(&["link", "set", "ul", "up"])?;
            }
            for (from, to) in [(0, 1), (1, 0)] {
                let (from, to) = (&sandbox.nodes[from], &sandbox.nodes[to]);
                let index = to_index(&sandbox, &to.name);
                let (via, via6) = (to.underlay_ip.to_string(), to.underlay_ip6.to_string());
                from.netns.ip(&["route", "add", &pod_subnet(index), "via", &via])?;
                from.netns.ip(&["-6", "route", "add", &pod_subnet6(index), "via", &via6])?;
            }
        }
        for (node_index, (node_name, pods)) in layout.iter().enumerate() {
            for (pod_index, spec) in pods.iter().enumerate() {
                let pod = sandbox.add_pod(node_index, node_name, pod_index, spec.clone())?;
                sandbox.pods.push(pod);
            }
        }
        Ok(sandbox)
    }

    fn add_pod(&self, node_index: usize, node_name: &str, pod_index: usize, spec: PodSpec) -> Result<Pod> {
        let node = &self.nodes[node_index];
        let netns = Netns::create(&format!("{}-{}", self.id, spec.name))?;
        // Connections opened back to back (the new-connections benchmark) would otherwise run the
        // pod out of ephemeral ports within seconds, every closed one waiting in TIME_WAIT. Above
        // the agent's and the apps' listening ports.
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        netns.sysctl("net.ipv4.ip_local_port_range", "20000 65535")?;
        let cgroup = Cgroup::create(
            &Path::new(CGROUP2_ROOT).join(&self.id).join(spec.cgroup.as_deref().unwrap_or(&spec.name)),
        )?;
        let ip = Ipv4Addr::new(10, node_index as u8 + 1, 0, pod_index as u8 + 2);
        let gateway = Ipv4Addr::new(10, node_index as u8 + 1, 0, 1).to_string();
        let ip6 = Ipv6Addr::new(0xfd00, node_index as u16 + 1, 0, 0, 0, 0, 0, pod_index as u16 + 2);
        let gateway6 = Ipv6Addr::new(0xfd00, node_index as u16 + 1, 0, 0, 0, 0, 0, 1).to_string();
        let host_side = format!("p{pod_index}");
        node.netns.ip(&[
            "link",
            "add",
            &host_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        node.netns.ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_side])?;
        node.netns.ip(&["link", "set", &host_side, "up"])?;
        node.netns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_side])?;
        node.netns.ip(&["-6", "addr", "add", &format!("{gateway6}/128"), "dev", &host_side, "nodad"])?;
        node.netns.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_side])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["-6", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        netns.ip(&["-6", "route", "add", &gateway6, "dev", "eth0"])?;
        netns.ip(&["-6", "route", "add", "default", "via", &gateway6, "dev", "eth0"])?;
        Ok(Pod { spec, node: node_name.to_string(), ip, ip6, netns, cgroup })
    }

    /// The layout most tests use: node1 with meshed a (sa-a) and b (sa-b) and unmeshed u; node2
    /// with meshed c (sa-c). No agent runs yet.
    pub fn two_nodes(label: &str) -> Result<Sandbox> {
        Sandbox::new(
            label,
            &[
                (
                    "node1",
                    vec![PodSpec::meshed("a", "sa-a"), PodSpec::meshed("b", "sa-b"), PodSpec::unmeshed("u")],
                ),
                ("node2", vec![PodSpec::meshed("c", "sa-c")]),
            ],
        )
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.spec.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The static config for one node's agent: every meshed pod of the sandbox, with netns and
    /// cgroup for the node's own.
    pub fn config_for(&self, node: &str) -> String {
        let mut yaml = format!(
            "node: {node}\ncaDir: {}\nadminSocket: {}\nupgradeSocket: {}\nbpfPinDir: {}\nworkloads:\n",
            self.ca_dir().display(),
            self.admin_socket(node).display(),
            self.dir.join(format!("{node}-upgrade.sock")).display(),
            bpf_pin_root(&self.id).join(node).display()
        );
        for pod in self.pods.iter().filter(|p| p.spec.meshed) {
            let _ = write!(
                yaml,
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    ips: [{}]\n    node: {}\n",
                pod.spec.name, pod.spec.namespace, pod.spec.service_account, pod.ip, pod.node
            );
            if pod.node == node {
                let _ = write!(
                    yaml,
                    "    netns: {}\n    cgroup: {}\n",
                    pod.netns.path().display(),
                    pod.cgroup.path().display()
                );
            }
        }
        yaml
    }

    /// [`Sandbox::config_for`] with every pod dual-stack: its IPv6 address listed after its IPv4
    /// one.
    pub fn dual_stack_config_for(&self, node: &str) -> String {
        self.pods.iter().fold(self.config_for(node), |config, pod| {
            config.replace(&format!("ips: [{}]", pod.ip), &format!("ips: [{}, \"{}\"]", pod.ip, pod.ip6))
        })
    }

    /// The file CA every node of the sandbox shares (created by `ferry ca init` on first start).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The node agent's admin API socket.
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}-admin.sock"))
    }

    /// Runs the `ferry` CLI against the node's agent; returns (exit code, stdout, stderr).
    pub fn ferry(&self, node: &str, args: &[&str]) -> Result<(i32, String, String)> {
        let output =
            Command::new(ferry_bin()?).arg("--admin").arg(self.admin_socket(node)).args(args).output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Like [`Sandbox::ferry`] with `-o json`, parsed; fails unless it exits 0.
    pub fn ferry_json(&self, node: &str, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let (code, stdout, stderr) = self.ferry(node, &all)?;
        if code != 0 {
            bail!("ferry {args:?} exited {code}: {stderr}");
        }
        Ok(serde_json::from_str(&stdout)?)
    }

    pub fn config_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.yaml"))
    }

    pub fn log_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.log"))
    }

    /// The sandbox's CA directory, created now if no agent has created it yet.
    pub fn ca_dir_created(&self) -> Result<PathBuf> {
        if !self.ca_dir().exists() {
            let status = Command::new(ferry_bin()?)
                .arg("ca")
                .arg("init")
                .arg(self.ca_dir())
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("ferry ca init {} failed", self.ca_dir().display());
            }
        }
        Ok(self.ca_dir())
    }

    /// Writes the node's config (from [`Sandbox::config_for`] unless given) and starts its agent,
    /// waiting until it reports ready.
    pub fn start_agent(&mut self, node: &str, config: Option<&str>) -> Result<()> {
        self.start_agent_with(node, config, &[])
    }

    /// Like [`Sandbox::start_agent`], with extra `ferry agent` arguments (e.g. `--log-format json`).
    pub fn start_agent_with(&mut self, node: &str, config: Option<&str>, args: &[&str]) -> Result<()> {
        self.start_agent_until(node, config, args, "ready", |status, _| status == 200)
    }

    /// Like [`Sandbox::start_agent_with`], for an agent that serves but is not ready yet (e.g. its
    /// certificates come by CSR and no signer runs): waits until its readiness answers 503 saying
    /// `why`.
    pub fn start_agent_not_ready(
        &mut self,
        node: &str,
        config: &str,
        args: &[&str],
        why: &str,
    ) -> Result<()> {
        let what = format!("serving and not ready ({why})");
        self.start_agent_until(node, Some(config), args, &what, |status, body| {
            status == 503 && body.contains(why)
        })
    }

    fn start_agent_until(
        &mut self,
        node: &str,
        config: Option<&str>,
        args: &[&str],
        what: &str,
        reached: impl Fn(u16, &str) -> bool,
    ) -> Result<()> {
        self.ca_dir_created()?;
        let config_path = self.config_path(node);
        std::fs::write(&config_path, config.map_or_else(|| self.config_for(node), str::to_owned))?;
        let agent = self.spawn_agent(node, args)?;
        let log_path = agent.log_path.clone();
        self.node_mut(node).agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((status, body)) = self.node(node).http_get(15021, "/healthz/ready")
                && reached(status, &body)
            {
                return Ok(());
            }
            let n = self.node_mut(node);
            if let Some(status) = n.agent.as_mut().and_then(|a| a.child.try_wait().ok().flatten()) {
                n.agent = None;
                bail!(
                    "agent on {node} exited with {status}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {node} not {what} after 20 s:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            // Fine-grained: the benchmark times startup by this.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts `ferry agent` on the node with its current config file, logging to the node's log.
    fn spawn_agent(&self, node: &str, args: &[&str]) -> Result<Agent> {
        let log_path = self.log_path(node);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(ferry_bin()?);
        cmd.arg("agent").arg("--config").arg(self.config_path(node)).args(args);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(self.node(node).agent_env.iter().map(|(k, v)| (k, v)));
        if let Some((soft, hard)) = self.node(node).agent_open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            // SAFETY: one async-signal-safe syscall on a value prepared beforehand.
            unsafe {
                cmd.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        let child = self.node(node).netns.spawn(cmd, None)?;
        std::fs::write(self.dir.join(format!("{node}.pid")), child.id().to_string())?;
        Ok(Agent { child, log_path })
    }

    /// Starts the node's agents from now on with this open-files limit, as a container runtime
    /// may (containerd 2: soft 1024).
    pub fn set_agent_open_files(&mut self, node: &str, soft: u64, hard: u64) {
        self.node_mut(node).agent_open_files = Some((soft, hard));
    }

    /// Sets an environment variable for the node's agents started from now on.
    pub fn set_agent_env(&mut self, node: &str, key: &str, value: &str) {
        self.node_mut(node).agent_env.push((key.to_owned(), value.to_owned()));
    }

    /// Upgrades the node's agent the way a rolling update does: starts a new one beside it and
    /// waits until it has taken over; the old one drains and exits on its own.
    pub fn upgrade_agent(&mut self, node: &str) -> Result<()> {
        self.upgrade_agent_with(node, &[])
    }

    /// Like [`Sandbox::upgrade_agent`], with extra `ferry agent` arguments (e.g. `--kube`).
    pub fn upgrade_agent_with(&mut self, node: &str, args: &[&str]) -> Result<()> {
        const TOOK_OVER: &str = "took over from the previous agent";
        let before = self.agent_log(node).matches(TOOK_OVER).count();
        let mut agent = self.spawn_agent(node, args)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.agent_log(node).matches(TOOK_OVER).count() <= before {
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("new agent on {node} exited with {status}:\n{}", self.agent_log(node));
            }
            if Instant::now() > deadline {
                bail!("new agent on {node} did not take over in 20 s:\n{}", self.agent_log(node));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = self.node_mut(node);
        if let Some(old) = n.agent.replace(agent) {
            n.retired.push(old);
        }
        Ok(())
    }

    /// Waits up to `timeout` for the node's retired agents to exit; their exit statuses.
    pub fn wait_retired(&mut self, node: &str, timeout: Duration) -> Result<Vec<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut statuses = Vec::new();
        for mut agent in std::mem::take(&mut self.node_mut(node).retired) {
            loop {
                if let Some(status) = agent.child.try_wait()? {
                    statuses.push(status);
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "a retired agent on {node} still runs after {timeout:?}:\n{}",
                        self.agent_log(node)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(statuses)
    }

    /// Kills the node's agent with SIGKILL (a crash: no clean shutdown) and waits for it.
    pub fn kill_agent(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        self.node_mut(node).agent.take().map(|mut agent| {
            let _ = agent.child.kill();
            agent.child.wait().expect("wait for killed agent")
        })
    }

    /// Stops the node's agent with SIGTERM and waits for it to exit; returns its exit status.
    pub fn stop_agent(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        self.node_mut(node).agent.take().map(|mut agent| agent.terminate())
    }

    /// The pid of the node's agent, while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.node(node).agent.as_ref().map(|a| a.child.id())
    }

    /// Sends SIGHUP (config reload) to the node's agent after writing `config`.
    pub fn reload_agent(&self, node: &str, config: &str) -> Result<()> {
        std::fs::write(self.config_path(node), config)?;
        let agent = self.node(node).agent.as_ref().context("agent not running")?;
        sys::signal(&agent.child, libc::SIGHUP)
    }

    /// The agent's log so far.
    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    /// Waits up to 5 s until the agent's log holds `text` at least `count` times.
    pub fn wait_for_log(&self, node: &str, text: &str, count: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.agent_log(node).matches(text).count() < count {
            if Instant::now() > deadline {
                bail!("no {text:?} x{count} in the log of {node}:\n{}", self.agent_log(node));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Scrapes the node agent's Prometheus endpoint.
    pub fn metrics(&self, node: &str) -> Result<String> {
        let (status, body) = self.node(node).http_get(15020, "/metrics")?;
        if status != 200 {
            bail!("metrics on {node}: HTTP {status}");
        }
        Ok(body)
    }

    /// One sample value of the node's metrics, 0 when the series does not exist (yet).
    pub fn metric(&self, node: &str, series: &str) -> Result<f64> {
        let text = self.metrics(node)?;
        Ok(metric_value(&text, series).unwrap_or(0.0))
    }
}

/// The value of the series written exactly as `name{labels}` (or bare `name`) in an exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split_whitespace().next()?.parse().ok()
    })
}

fn to_index(sandbox: &Sandbox, node: &str) -> usize {
    sandbox.nodes.iter().position(|n| n.name == node).expect("node exists")
}

fn pod_subnet(node_index: usize) -> String {
    format!("10.{}.0.0/24", node_index + 1)
}

fn pod_subnet6(node_index: usize) -> String {
    format!("fd00:{}::/64", node_index + 1)
}

impl Node {
    /// A tiny HTTP/1.1 GET to the node's agent on 127.0.0.1, from inside the node's netns.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        self.http(port, "GET", path)
    }

    /// A tiny HTTP/1.1 request without body to the node's agent on 127.0.0.1 (node's netns).
    pub fn http(&self, port: u16, method: &str, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream =
            self.netns.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split_whitespace().nth(1).context("empty HTTP response")?.parse()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }
}

struct Agent {
    child: Child,
    log_path: PathBuf,
}

impl Agent {
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = sys::signal(&self.child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("agent did not stop on SIGTERM within 10 s; killing it (log: {})", self.log_path.display());
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

impl Sandbox {
    /// Leaves everything running (agents, servers, namespaces) when the guard goes away.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

/// Removes whatever a sandbox of this id left behind: agents (by pid file), pod processes (by
/// cgroup), namespaces, cgroups and the work directory. Safe to call when nothing is there.
pub fn teardown(id: &str) {
    let dir = std::env::temp_dir().join(id);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "pid")
            && let Some(pid) = std::fs::read_to_string(entry.path()).ok().and_then(|p| p.trim().parse().ok())
        {
            sys::terminate_pid(pid);
        }
    }
    let cgroup_root = Path::new(CGROUP2_ROOT).join(id);
    sys::kill_cgroup_tree(&cgroup_root);
    sys::delete_netns_with_prefix(&format!("{id}-"));
    // Links a killed agent left pinned: removing the pins detaches them.
    let _ = std::fs::remove_dir_all(bpf_pin_root(id));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where a sandbox's agents pin their links (fail-closed mode).
pub fn bpf_pin_root(id: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(id)
}

/// [`teardown`] of every sandbox whose id starts with `prefix` (e.g. after killed test runs).
pub fn teardown_prefix(prefix: &str) {
    let ids = std::fs::read_dir(CGROUP2_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| name.starts_with(prefix));
    for id in ids {
        teardown(&id);
    }
    sys::delete_netns_with_prefix(prefix);
    for pins in std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        if pins.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(pins.path());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.agent = None;
        }
        let _ = std::fs::remove_dir_all(bpf_pin_root(&self.id));
        self.pods.clear();
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node's config (see [`Sandbox::config_for`]) with `labels`, a YAML flow map such as
/// `{app: c}`, on pod `pod`'s entry.
pub fn with_labels(config: &str, pod: &str, labels: &str) -> String {
    let entry = format!("  - name: {pod}\n");
    config.replace(&entry, &format!("{entry}    labels: {labels}\n"))
}

/// The `ferry` binary: $FERRY_BIN, else beside (or one level above) the running executable, as
/// cargo lays out target/<profile>/ and target/<profile>/deps/.
pub fn ferry_bin() -> Result<PathBuf> {
    sibling_bin("FERRY_BIN", "ferry")
}

/// The sandbox's helper app (echo server / client).
pub fn app_bin() -> Result<PathBuf> {
    sibling_bin("FERRY_SANDBOX_APP", "sandbox-app")
}

fn sibling_bin(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    [dir.join(name), dir.parent().map(|d| d.join(name)).unwrap_or_default()]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "`{name}` not found next to {}: build it first (cargo build --workspace) or set {env}",
                exe.display()
            )
        })
}
