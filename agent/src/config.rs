//! The static configuration file (the embedded default's source of truth).
//!
//! Parsing is strict: unknown fields, bad addresses and missing paths are errors that name the
//! field (with its line) or the path, so a typo never silently changes what is meshed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    datapath::FailMode,
    policy::{AuthorizationPolicy, Policy},
};

/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// This node's name; workloads whose `node` matches are local and get captured. May be left
    /// out when `ferry agent --node` (or `$NODE_NAME`) gives it, as a DaemonSet does.
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The file CA: root-cert.pem + root-key.pem (created on first use), optional trust-bundle.pem.
    #[serde(default = "default_ca_dir")]
    pub ca_dir: PathBuf,
    /// Lifetime of workload certificates; they are re-issued at half-life.
    #[serde(default = "default_cert_ttl", with = "humantime_serde")]
    pub cert_ttl: Duration,
    /// Prometheus metrics listener (in the agent's netns).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Readiness listener (`/healthz/ready`).
    #[serde(default = "default_readiness_addr")]
    pub readiness_addr: SocketAddr,
    /// Admin API on a unix socket (mode 0600); the `ferry` CLI's default.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Admin API on TCP too (loopback of the agent's netns).
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// Unix socket (mode 0600) on which a new agent takes this one's listeners over (hitless
    /// upgrade). One per node agent.
    #[serde(default = "default_upgrade_socket")]
    pub upgrade_socket: PathBuf,
    #[serde(default)]
    /// Shared with the state built from it, and in Kubernetes mode kept from one update to the
    /// next while its pod is unchanged: a large cluster's workloads are not copied per update.
    pub workloads: Vec<Arc<Workload>>,
    /// Virtual IPs (Kubernetes ClusterIPs) balanced over the workloads their selector picks.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Capture when the agent dies without a clean shutdown: `closed` (default: meshed pods' new
    /// connections fail until an agent is back) or `open` (pods talk directly, unmeshed).
    #[serde(default = "default_fail_mode")]
    pub fail_mode: FailMode,
    /// Connections into a meshed pod from this node's own addresses (the kubelet's probes).
    #[serde(default)]
    pub node_traffic: NodeTraffic,
    /// Where the shared maps (and, fail-closed, the links) are pinned: a directory on a bpffs;
    /// /sys/fs/bpf is mounted if needed. One per node agent.
    #[serde(default = "default_bpf_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    /// Resource bounds of the proxy.
    #[serde(default)]
    pub limits: Limits,
    /// Kubernetes mode: the cgroup v2 directory holding the kubelet's `kubepods` (or
    /// `kubepods.slice`) tree, where local pods are found by UID.
    #[serde(default = "default_pod_cgroup_root")]
    pub pod_cgroup_root: PathBuf,
    /// AuthorizationPolicy objects, in the schema of Istio's (and Ferry's) CRD.
    #[serde(default)]
    pub policies: Vec<AuthorizationPolicy>,
    /// The policies, checked and compiled by [`Config::parse`].
    #[serde(skip)]
    pub compiled_policies: Vec<Policy>,
}

/// Bounds that keep a busy or hostile peer from exhausting the agent. Read at start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Limits {
    /// TCP connections accepted at once on one pod's listeners (15001, 15006, 15008 together).
    pub max_connections_per_pod: usize,
    /// TCP connections accepted at once on the whole node.
    pub max_connections_per_node: usize,
    /// A relayed connection with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A TCP connect the agent makes for an app (to a peer's 15008, a destination outside the
    /// mesh, the app in its pod) that gets no answer for this long is given up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A TLS handshake on 15008 (or to a peer's) that takes longer is cut off: silent or slow
    /// peers cannot hold connections open.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// On shutdown or after handing over to a new agent: how long open connections may run to
    /// their end before the rest are cut.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Data received over HBONE that apps have not read yet, over all streams, above which
    /// streams get smaller windows (proxy/hbone/window.rs). In MiB.
    #[serde(rename = "undeliveredMiB")]
    pub undelivered_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_pod: 10_000,
            max_connections_per_node: 100_000,
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            undelivered_mib: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    /// What it is an instance of, as Istio names workloads in metrics (`source_workload`,
    /// `destination_workload`): in Kubernetes the pod's controller (a Deployment, StatefulSet,
    /// DaemonSet, CronJob...), so that metrics survive a rollout's new pod names. Default: `name`.
    #[serde(default)]
    pub workload_name: Option<String>,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// False for a known workload that does not take part in the mesh (gets plain TCP).
    #[serde(default = "default_true")]
    pub meshed: bool,
    /// False while it should not get service connections (in Kubernetes: the pod is not Ready).
    #[serde(default = "default_true")]
    pub ready: bool,
    /// Local workloads only: the pod's network namespace file (e.g. /run/netns/NAME).
    pub netns: Option<PathBuf>,
    /// Local workloads only: the pod's cgroup v2 directory.
    pub cgroup: Option<PathBuf>,
    /// Its named ports (in Kubernetes: named TCP container ports), for services whose
    /// `targetPort` is a name.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

/// A service: connections to one of its virtual IPs and ports go to one of its endpoints (the
/// workloads of its namespace whose labels match its selector), chosen per connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// No selector: no endpoints (as in Kubernetes, where they would be managed by hand).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `Local`: a client is sent only to endpoints on its own node (Kubernetes'
    /// `internalTrafficPolicy`, e.g. for a node-local cache); `Cluster`: to any.
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// `ClientIP`: a client keeps getting the endpoint it got first, as long as that endpoint
    /// serves and the client comes back within `sessionAffinityTimeout` (Kubernetes'
    /// `sessionAffinity`); `None`: an endpoint per connection.
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default = "default_session_affinity_timeout", with = "humantime_serde")]
    pub session_affinity_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`: three hours.
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

fn default_session_affinity_timeout() -> Duration {
    DEFAULT_SESSION_AFFINITY_TIMEOUT
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: TargetPort,
}

/// Where a service port's connections go on an endpoint: a port number, or the name of one of
/// the endpoint's ports, resolved per endpoint (pods may number a named port differently).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a port number or the name of a port of the endpoints")]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl TargetPort {
    /// The port on an endpoint with these named ports; `None` if it has no port of that name
    /// (it is then no endpoint of this service port, as in Kubernetes).
    pub fn on(&self, named: &BTreeMap<String, u16>) -> Option<u16> {
        match self {
            TargetPort::Number(port) => Some(*port),
            TargetPort::Name(name) => named.get(name).copied(),
        }
    }
}

impl std::fmt::Display for TargetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetPort::Number(port) => write!(f, "{port}"),
            TargetPort::Name(name) => f.write_str(name),
        }
    }
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_ca_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry/ca")
}
const fn default_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_service_account() -> String {
    "default".to_owned()
}
fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}
/// How policy treats plaintext connections into a meshed pod from this node's own addresses:
/// the kubelet's health probes, and anything else on the host network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeTraffic {
    /// Let through without policy, as Istio ambient (and Cilium) let the kubelet's probes in, so
    /// policies that allow only meshed identities do not fail every probe.
    #[default]
    Allowed,
    /// Subject to policy like any other plaintext client (allow the node with `ipBlocks`).
    Policy,
}

impl NodeTraffic {
    /// Whether a connection a process on the node opened skips policy.
    pub fn exempts(self, opened_on_node: bool) -> bool {
        opened_on_node && self == NodeTraffic::Allowed
    }
}

const fn default_fail_mode() -> FailMode {
    FailMode::Closed
}
fn default_bpf_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/ferry")
}
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/ferry/admin.sock";
fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
fn default_pod_cgroup_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mount_point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}
fn default_upgrade_socket() -> PathBuf {
    PathBuf::from("/var/run/ferry/upgrade.sock")
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_readiness_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}
const fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {}{source}", policy.as_ref().map(|p| format!("policy {p}: ")).unwrap_or_default())]
    Syntax { path: PathBuf, policy: Option<String>, source: serde_yaml::Error },
    #[error("{path}: {field}: {problem}")]
    Invalid { path: PathBuf, field: String, problem: String },
}

impl Config {
    /// The settings read only at start whose value in `reloaded` differs from this config's:
    /// a reload cannot apply them (workloads, services, policies and `nodeTraffic` it can).
    pub fn changed_at_start_only(&self, reloaded: &Config) -> Vec<&'static str> {
        let fields = [
            ("node", self.node != reloaded.node),
            ("trustDomain", self.trust_domain != reloaded.trust_domain),
            ("caDir", self.ca_dir != reloaded.ca_dir),
            ("certTtl", self.cert_ttl != reloaded.cert_ttl),
            ("metricsAddr", self.metrics_addr != reloaded.metrics_addr),
            ("readinessAddr", self.readiness_addr != reloaded.readiness_addr),
            ("adminSocket", self.admin_socket != reloaded.admin_socket),
            ("adminAddr", self.admin_addr != reloaded.admin_addr),
            ("upgradeSocket", self.upgrade_socket != reloaded.upgrade_socket),
            ("failMode", self.fail_mode != reloaded.fail_mode),
            ("bpfPinDir", self.bpf_pin_dir != reloaded.bpf_pin_dir),
            ("limits", self.limits != reloaded.limits),
            ("podCgroupRoot", self.pod_cgroup_root != reloaded.pod_cgroup_root),
        ];
        fields.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name).collect()
    }

    /// Reads, parses and validates a config file; `node`, if given, overrides the file's.
    pub fn load(path: &Path, node: Option<&str>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse_for(&text, path, node)
    }

    /// Parses and validates config text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_for(text, path, None)
    }

    fn parse_for(text: &str, path: &Path, node: Option<&str>) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            policy: policy_named_in(&source, text),
            source,
        })?;
        if let Some(node) = node {
            config.node = node.to_owned();
        }
        let invalid = |(field, problem)| ConfigError::Invalid { path: path.to_owned(), field, problem };
        config.validate().map_err(invalid)?;
        config.compiled_policies = config
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let name = format!("policies[{i}] ({}/{})", p.metadata.namespace, p.metadata.name);
                p.compile().map_err(|problem| invalid((name, problem)))
            })
            .collect::<Result<_, _>>()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.node.is_empty() {
            return Err(("node".into(), "required (in the file, or with --node / $NODE_NAME)".into()));
        }
        if self.cert_ttl < Duration::from_secs(2) {
            return Err(("certTtl".into(), "must be at least 2s".into()));
        }
        if !(1..=1 << 20).contains(&self.limits.undelivered_mib) {
            return Err(("limits.undeliveredMiB".into(), "must be between 1 and 1048576".into()));
        }
        crate::identity::SpiffeId::parse(&format!("spiffe://{}/ns/a/sa/b", self.trust_domain)).map_err(
            |_| ("trustDomain".to_owned(), format!("{:?} is not a valid trust domain", self.trust_domain)),
        )?;
        let mut seen_ips = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let field = |name: &str| format!("workloads[{i}].{name} ({}/{})", w.namespace, w.name);
            if w.ips.is_empty() {
                return Err((field("ips"), "a workload needs at least one IP".into()));
            }
            for ip in &w.ips {
                if let Some(other) = seen_ips.insert(*ip, i) {
                    return Err((field("ips"), format!("{ip} is also used by workloads[{other}]")));
                }
            }
            // Only what this agent captures needs a netns and a cgroup.
            if w.node != self.node || !w.meshed {
                continue;
            }
            for (name, path) in [("netns", &w.netns), ("cgroup", &w.cgroup)] {
                match path {
                    None => {
                        return Err((field(name), "required for a meshed workload on this node".into()));
                    }
                    Some(p) if !p.exists() => {
                        return Err((field(name), format!("{} does not exist", p.display())));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Workloads on this node that are captured.
    pub fn local_meshed_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter().filter(|w| w.node == self.node && w.meshed)
    }
}

/// For a syntax error inside `policies[N]`, that policy's `namespace/name`, read from the raw YAML.
fn policy_named_in(error: &serde_yaml::Error, text: &str) -> Option<String> {
    let index: usize = error.to_string().strip_prefix("policies[")?.split(']').next()?.parse().ok()?;
    let raw: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    let metadata = raw.get("policies")?.get(index)?.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    let namespace = metadata.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    Some(format!("{namespace}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    const REMOTE_ONLY: &str = "
node: n1
workloads:
  - name: a
    namespace: default
    serviceAccount: sa-a
    ips: [10.0.0.1]
    node: n2
";

    #[test]
    fn parses_defaults() {
        let c = parse(REMOTE_ONLY).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.metrics_addr.port(), 15020);
        assert!(c.workloads[0].meshed);
        assert_eq!(c.local_meshed_workloads().count(), 0);
    }

    #[test]
    fn a_reload_names_the_settings_it_cannot_apply() {
        let running = parse(REMOTE_ONLY).unwrap();
        let same_settings = parse(&format!("{REMOTE_ONLY}nodeTraffic: policy\npolicies: []\n")).unwrap();
        assert_eq!(running.changed_at_start_only(&same_settings), Vec::<&str>::new());
        let changed =
            parse(&format!("{REMOTE_ONLY}limits: {{idleTimeout: 5m}}\ncertTtl: 1h\nfailMode: open\n"))
                .unwrap();
        assert_eq!(running.changed_at_start_only(&changed), ["certTtl", "failMode", "limits"]);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = parse(&REMOTE_ONLY.replace("    node: n2", "    node: n2\n    colour: red")).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.contains("line 9"), "{err}");
        assert!(err.starts_with("test.yaml"), "{err}");
    }

    #[test]
    fn bad_ip_is_named() {
        let err = parse(&REMOTE_ONLY.replace("10.0.0.1", "10.0.0.300")).unwrap_err();
        assert!(err.contains("workloads[0].ips"), "{err}");
        assert!(err.contains("invalid IP address"), "{err}");
    }

    #[test]
    fn local_workload_needs_netns() {
        let err = parse(&REMOTE_ONLY.replace("node: n2", "node: n1")).unwrap_err();
        assert!(err.contains("workloads[0].netns (default/a)"), "{err}");
        assert!(err.contains("required"), "{err}");
    }

    #[test]
    fn missing_paths_are_named() {
        let local = REMOTE_ONLY
            .replace("node: n2", "node: n1\n    netns: /proc/self/ns/net\n    cgroup: /nonexistent/cg");
        let err = parse(&local).unwrap_err();
        assert!(err.contains("workloads[0].cgroup"), "{err}");
        assert!(err.contains("/nonexistent/cg does not exist"), "{err}");
        let local = local.replace("/proc/self/ns/net", "/run/netns/nope-ferry");
        let err = parse(&local).unwrap_err();
        assert!(err.contains("workloads[0].netns"), "{err}");
    }

    #[test]
    fn duplicate_ip_is_an_error() {
        let twice = format!("{REMOTE_ONLY}{}", &REMOTE_ONLY["\nnode: n1\nworkloads:\n".len()..]);
        let err = parse(&twice).unwrap_err();
        assert!(err.contains("also used by workloads[0]"), "{err}");
    }

    #[test]
    fn cert_ttl_is_a_duration() {
        let c = parse(&REMOTE_ONLY.replace("node: n1\n", "node: n1\ncertTtl: 90s\n")).unwrap();
        assert_eq!(c.cert_ttl, Duration::from_secs(90));
        let err = parse(&REMOTE_ONLY.replace("node: n1\n", "node: n1\ncertTtl: soon\n")).unwrap_err();
        assert!(err.contains("certTtl") || err.contains("line 3"), "{err}");
    }

    #[test]
    fn undelivered_budget_is_in_mib_and_not_zero() {
        let with = |value: &str| parse(&format!("{REMOTE_ONLY}limits: {{undeliveredMiB: {value}}}\n"));
        assert_eq!(with("16").unwrap().limits.undelivered_mib, 16);
        let err = with("0").unwrap_err();
        assert!(err.contains("limits.undeliveredMiB") && err.contains("between 1 and"), "{err}");
    }

    #[test]
    fn bad_policy_is_named_with_field_and_line() {
        let with_policy = |spec: &str| {
            format!(
                "{REMOTE_ONLY}policies:\n  - metadata: {{name: deny-b, namespace: shop}}\n    spec: {spec}\n"
            )
        };
        let err = parse(&with_policy("{action: DENNY}")).unwrap_err();
        assert!(
            err.starts_with(
                "test.yaml: policy shop/deny-b: policies[0].spec.action: unknown variant `DENNY`"
            ),
            "{err}"
        );
        assert!(err.contains("line 11"), "{err}");
        let err = parse(&with_policy("{rules: [{when: [{key: source.colour}]}]}")).unwrap_err();
        assert_eq!(
            err,
            "test.yaml: policies[0] (shop/deny-b): spec.rules[0].when[0].key: unknown key \"source.colour\""
        );
        let ok = parse(&with_policy("{action: DENY, rules: [{}]}")).unwrap();
        assert_eq!(ok.compiled_policies[0].key(), "shop/deny-b");
    }

    #[test]
    fn missing_required_field() {
        let err = parse(&REMOTE_ONLY.replace("    namespace: default\n", "")).unwrap_err();
        assert!(err.contains("missing field `namespace`"), "{err}");
    }
}
