//! `ferry agent`: wires discovery -> state -> datapath + proxy, and runs until SIGTERM or until
//! a new agent takes over (see [`crate::upgrade`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};

use crate::{
    admin::{Admin, LocalPodView, LocalView},
    config::{self, Config},
    datapath::Datapath,
    discovery::{
        self, StaticFile,
        kube::{Discovered, RefusedPolicy},
        marks::CaptureMarks,
    },
    identity::{CertManager, FileCa, ROOT_KEY_FILE, Signer, WorkloadCert, csr::CsrClient, load_roots},
    inpod::PodNetns,
    proxy::{PodHandle, PodListeners, Proxy},
    state::{State, StateHandle},
    telemetry::{self, LogControl, Telemetry},
    upgrade::{self, Inherited, Offer, SecretPem, Successor, UpgradeListener},
};

/// A local workload being captured and served.
struct RunningPod {
    spec: Arc<config::Workload>,
    netns_cookie: u64,
    handle: PodHandle,
}

struct Agent {
    node: String,
    datapath: Datapath,
    proxy: Proxy,
    state: StateHandle,
    certs: Arc<CertManager>,
    telemetry: Arc<Telemetry>,
    admin: Arc<Admin>,
    admin_socket: PathBuf,
    upgrade_socket: PathBuf,
    drain_timeout: Duration,
    pods: HashMap<String, RunningPod>,
    /// Local meshed workloads whose capture failed, with the reason: their traffic bypasses the
    /// mesh, so they are tried again (`capture_retry`) until captured or gone.
    uncaptured: BTreeMap<String, String>,
    /// When to try the failed captures again, and the backoff that led there.
    capture_retry: Option<(Instant, Duration)>,
    /// Kubernetes mode: running local meshed pods discovery cannot find the cgroup of (it looks
    /// again itself), reported with the failed captures.
    unlocated: BTreeMap<String, String>,
    /// Kubernetes mode: the pods captured, told to agents on other nodes.
    marks: Option<CaptureMarks>,
    /// Listeners received from the agent this one upgrades, adopted by the first reconcile.
    inherited: Inherited,
    /// Metrics, readiness and admin TCP, by handover name.
    node_listeners: Vec<(&'static str, Arc<TcpListener>)>,
    /// Accept loops of the node listeners and the admin socket.
    node_loops: JoinSet<()>,
}

/// How long a new agent may take, from receiving the listeners, to be ready.
const SUCCESSOR_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopping agent waits for its pods' capture marks to be removed.
const MARKS_CLEAR_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new agent taking over waits for its workloads' certificates before it serves.
const TAKEOVER_CERTIFICATES_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed captures are tried again after this, doubling up to `CAPTURE_RETRY_MAX`.
const CAPTURE_RETRY_FIRST: Duration = Duration::from_secs(1);
const CAPTURE_RETRY_MAX: Duration = Duration::from_secs(30);

/// How the agent was started: `ferry agent --config FILE [--node NAME] [--kube]`.
pub struct Options {
    pub config: PathBuf,
    pub node: Option<String>,
    pub kube: bool,
}

pub async fn run(options: Options, log: LogControl) -> anyhow::Result<()> {
    let Options { config: config_path, node, kube } = options;
    let source = StaticFile { path: config_path.clone(), node };
    let mut file = source.read()?;
    let client = match kube {
        true => Some(kube::Client::try_default().await.context("connecting to the Kubernetes API")?),
        false => None,
    };
    // Kubernetes mode: the API's updates, and its latest picture.
    let (mut updates, mut api) = match &client {
        Some(client) => {
            let (updates, first) = watch_kubernetes(client.clone(), &file).await?;
            (Some(updates), Some(first))
        }
        None => (None, None),
    };
    let config = effective(&file, api.as_ref());
    raise_open_files_limit(config.limits.max_connections_per_node);
    let mut takeover = {
        let (path, node) = (config.upgrade_socket.clone(), config.node.clone());
        tokio::task::spawn_blocking(move || upgrade::request(&path, &node))
            .await?
            .with_context(|| format!("taking over from the agent at {}", config.upgrade_socket.display()))?
    };
    let mut inherited = Inherited::default();
    if let Some(takeover) = &mut takeover {
        inherited = std::mem::take(&mut takeover.inherited);
        tracing::info!(pods = inherited.pods(), "taking over from the running agent");
    }
    let (datapath, orig_dst, counters) =
        Datapath::load(config.fail_mode, &config.bpf_pin_dir).context("loading the eBPF programs")?;
    let marks = client.as_ref().map(|client| CaptureMarks::start(client.clone(), &config.node));
    let certs = Arc::new(cert_manager(client, &config)?);
    tracing::info!(signer = %certs.signer_name(), "workload certificates");
    adopt_certificates(&certs, std::mem::take(&mut inherited.certificates));
    tokio::spawn(certs.clone().rotate());
    tokio::spawn(certs.clone().follow_ca_dir(config.ca_dir.clone()));
    let telemetry = Telemetry::new(counters.clone(), certs.clone(), &log);
    let mut node_loops = JoinSet::new();
    let mut node_listeners = Vec::new();
    for (name, addr) in [(upgrade::METRICS, config.metrics_addr), (upgrade::READINESS, config.readiness_addr)]
    {
        let listener = node_listener(&mut inherited, name, addr).await?;
        node_loops.spawn(telemetry::serve(telemetry.clone(), listener.clone()));
        node_listeners.push((name, listener));
    }
    let state = StateHandle::new(State::from_config(&config));
    let proxy = Proxy::new(state.clone(), orig_dst, telemetry.clone(), certs.clone(), config.limits.clone());
    let admin = Arc::new(Admin {
        node: config.node.clone(),
        config_path,
        started: Instant::now(),
        state: state.clone(),
        proxy: proxy.clone(),
        certs: certs.clone(),
        telemetry: telemetry.clone(),
        counters,
        log,
        local: Default::default(),
        refused_policies: Default::default(),
    });
    let admin_tcp = node_listener(&mut inherited, upgrade::ADMIN, config.admin_addr).await?;
    node_listeners.push((upgrade::ADMIN, admin_tcp.clone()));
    admin
        .clone()
        .serve(&config.admin_socket, Some(admin_tcp), &mut node_loops)
        .await
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;
    let mut agent = Agent {
        node: config.node.clone(),
        datapath,
        proxy,
        state,
        certs,
        telemetry,
        admin,
        admin_socket: config.admin_socket.clone(),
        upgrade_socket: config.upgrade_socket.clone(),
        drain_timeout: config.limits.drain_timeout,
        pods: HashMap::new(),
        uncaptured: BTreeMap::new(),
        capture_retry: None,
        unlocated: BTreeMap::new(),
        marks,
        inherited,
        node_listeners,
        node_loops,
    };
    if let Some(api) = &api {
        agent.show_refused_policies(&api.refused_policies);
        agent.set_unlocated(api.unlocated.clone());
    }
    agent.warn_of_policies(&config);
    if takeover.is_some() {
        // The running agent serves until this one confirms, so this one first obtains the
        // certificates it was not handed (by CSR, e.g. from an agent too old to hand them over),
        // and none of its connections has to wait for one.
        agent.want_certificates(&config);
        let pending = agent.certs.wait_for_all(TAKEOVER_CERTIFICATES_TIMEOUT).await;
        if pending > 0 {
            tracing::warn!(
                pending,
                "taking over without every workload certificate: their HBONE connections wait for them"
            );
        }
    }
    agent.reconcile(&config);
    // Links and map entries a crashed or previous agent left for pods that are gone now.
    agent.datapath.remove_orphans();
    agent.telemetry.set_serving(true);
    if let Some(takeover) = takeover {
        tokio::task::spawn_blocking(move || takeover.confirm())
            .await?
            .context("telling the previous agent to stop accepting")?;
        tracing::info!("took over from the previous agent");
    }
    let upgrades = UpgradeListener::bind(&config.upgrade_socket)
        .with_context(|| format!("upgrade socket {}", config.upgrade_socket.display()))?;
    // `/healthz/ready` also waits for any certificate still pending.
    tracing::info!(
        node = %config.node,
        workloads = agent.pods.len(),
        certificates_pending = agent.certs.pending(),
        "serving"
    );

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // A new agent that has the listeners and is getting ready.
    let mut successor: Option<JoinHandle<std::io::Result<()>>> = None;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                // The CA directory given at start (a changed `caDir` takes a restart).
                agent.certs.check_ca_dir(&config.ca_dir);
                match source.read() {
                    Ok(reloaded) => {
                        let ignored = config.changed_at_start_only(&reloaded);
                        if !ignored.is_empty() {
                            tracing::warn!(
                                "config reloaded, except {}: read only at start, they change when the agent restarts or is upgraded",
                                ignored.join(", ")
                            );
                        }
                        file = reloaded;
                        agent.apply(&effective(&file, api.as_ref()), "config reloaded");
                    }
                    Err(e) => tracing::error!("config reload rejected, the previous config stays in force: {e}"),
                }
            }
            Some(update) = async { updates.as_mut().expect("guarded").recv().await }, if updates.is_some() => {
                agent.show_refused_policies(&update.refused_policies);
                agent.set_unlocated(update.unlocated.clone());
                api = Some(update);
                agent.apply(&effective(&file, api.as_ref()), "the Kubernetes API changed");
            }
            conn = upgrades.accept(), if successor.is_none() => match conn.and_then(|c| agent.offer(c)) {
                Ok(next) => {
                    tracing::info!("a new agent took the listeners; serving until it is ready");
                    successor = Some(tokio::task::spawn_blocking(move || next.ready(SUCCESSOR_READY_TIMEOUT)));
                }
                Err(e) => tracing::warn!("upgrade request failed, this agent carries on: {e}"),
            },
            ready = async { successor.as_mut().expect("guarded").await }, if successor.is_some() => {
                successor = None;
                if handed_over(ready) {
                    agent.retire().await;
                    return Ok(());
                }
            }
            _ = capture_retry_due(agent.capture_retry) => {
                agent.reconcile(&effective(&file, api.as_ref()));
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Stopped in the middle of an upgrade: whether the new agent gets ready decides.
    if let Some(next) = successor
        && handed_over(next.await)
    {
        agent.retire().await;
        return Ok(());
    }
    agent.shutdown().await;
    Ok(())
}

/// Takes the certificates the previous agent handed over (chain and key, PEM), so that its
/// workloads need not wait for new ones.
fn adopt_certificates(certs: &CertManager, pems: Vec<(String, SecretPem)>) {
    if pems.is_empty() {
        return;
    }
    let offered = pems.len();
    let parsed = pems.iter().filter_map(|(chain, SecretPem(key))| {
        WorkloadCert::from_pem(chain, key)
            .inspect_err(|e| tracing::warn!("a certificate handed over does not parse, asking anew: {e}"))
            .ok()
    });
    let taken = certs.adopt(parsed.collect());
    tracing::info!(taken, offered, "took over the previous agent's workload certificates");
}

/// Starts watching the Kubernetes API; returns its updates and, once it has it, its first
/// complete picture.
async fn watch_kubernetes(
    client: kube::Client,
    file: &Config,
) -> anyhow::Result<(mpsc::Receiver<Discovered>, Discovered)> {
    let mut updates = discovery::kube::spawn(client, file.node.clone(), file.pod_cgroup_root.clone()).await;
    tracing::info!("waiting for the Kubernetes API's namespaces, pods and policies");
    let first = updates.recv().await.context("the Kubernetes watch ended")?;
    Ok((updates, first))
}

/// Certificates from the file CA in `caDir`; in Kubernetes mode, when `caDir` holds no root key
/// (the deploy manifests mount only the signer's root certificate there), by
/// CertificateSigningRequest.
fn cert_manager(client: Option<kube::Client>, config: &Config) -> anyhow::Result<CertManager> {
    let certs = match client {
        Some(client) if !config.ca_dir.join(ROOT_KEY_FILE).exists() => {
            let roots = load_roots(&config.ca_dir)?;
            CertManager::new(
                Signer::Kubernetes(CsrClient::new(client, &config.node)),
                roots,
                config.cert_ttl,
            )?
        }
        _ => CertManager::with_file_ca(FileCa::init(&config.ca_dir)?, config.cert_ttl)?,
    };
    Ok(certs)
}

/// The config in force: the file's, with the API's workloads and services instead of the file's
/// and the API's policies beside the file's.
fn effective(file: &Config, api: Option<&Discovered>) -> Config {
    let mut config = file.clone();
    if let Some(api) = api {
        config.workloads = api.workloads.clone();
        config.services = api.services.clone();
        config.compiled_policies.extend(api.policies.iter().cloned());
    }
    config
}

/// Whether a captured workload's new spec needs it served anew (and maybe captured again, see
/// [`needs_recapture`]). Readiness only decides whether it takes service connections, which the
/// state answers.
fn needs_serving_anew(running: &config::Workload, wanted: &config::Workload) -> bool {
    config::Workload { ready: running.ready, ..wanted.clone() } != *running
}

/// Whether a captured workload's new spec moves what its capture is attached to (netns, cgroup,
/// addresses). Other changes (labels, service account, ports) are served with capture kept.
fn needs_recapture(running: &config::Workload, wanted: &config::Workload) -> bool {
    running.netns != wanted.netns || running.cgroup != wanted.cgroup || running.ips != wanted.ips
}

/// Whether the new agent reported ready (else this agent carries on).
fn handed_over(ready: Result<std::io::Result<()>, tokio::task::JoinError>) -> bool {
    match ready {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("the new agent did not get ready, this agent carries on: {e}");
            false
        }
        Err(e) => {
            tracing::warn!("waiting for the new agent: {e}; this agent carries on");
            false
        }
    }
}

/// Descriptors one proxied connection may hold: the app's socket, the agent's socket to the
/// other end, and a splice pipe (two descriptors) for each direction that moves bulk.
const FDS_PER_CONNECTION: u64 = 6;

/// Raises the soft open-files limit to the hard one, as a proxy must: container runtimes may start
/// the agent at 1024 (containerd 2's default soft limit), a few hundred connections. Warns when
/// even the hard limit falls short of `limits.maxConnectionsPerNode`.
fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // The kernel caps the hard limit at fs.nr_open: it is never unlimited for open files.
    let Some(hard) = limit.maximum else { return };
    if limit.current != Some(hard) {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
            Ok(()) => tracing::info!(from = limit.current, to = hard, "open files limit raised"),
            Err(e) => tracing::warn!("raising the open files limit to {hard}: {e}"),
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(hard);
    if soft / FDS_PER_CONNECTION < max_connections as u64 {
        tracing::warn!(
            "the open files limit ({soft}) allows about {} connections at once (up to {FDS_PER_CONNECTION} descriptors each), fewer than limits.maxConnectionsPerNode ({max_connections}): more wait in their listeners' backlogs; raise the container runtime's nofile limit or lower maxConnectionsPerNode",
            soft / FDS_PER_CONNECTION
        );
    }
}

/// Sleeps until failed captures are due to be tried again; forever while none failed.
async fn capture_retry_due(retry: Option<(Instant, Duration)>) {
    match retry {
        Some((at, _)) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A node-level listener: the previous agent's if it listens on `addr`, else a new one.
async fn node_listener(
    inherited: &mut Inherited,
    name: &'static str,
    addr: SocketAddr,
) -> anyhow::Result<Arc<TcpListener>> {
    if let Some(fd) = inherited.take_node(name) {
        let listener = std::net::TcpListener::from(fd);
        if listener.local_addr().ok() == Some(addr) {
            listener.set_nonblocking(true)?;
            return Ok(Arc::new(TcpListener::from_std(listener)?));
        }
        tracing::info!(listener = name, %addr, "address changed: not adopting the previous agent's listener");
    }
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr} ({name})"))?;
    Ok(Arc::new(listener))
}

impl Agent {
    /// Counts the policy objects refused as invalid, and lists them in `ferry policies`.
    fn show_refused_policies(&self, refused: &[RefusedPolicy]) {
        self.telemetry.policies_refused.set(refused.len() as i64);
        *self.admin.refused_policies.write().unwrap_or_else(|e| e.into_inner()) = refused.to_vec();
    }

    /// Takes the running local pods discovery cannot find the cgroup of; logs each once per reason.
    fn set_unlocated(&mut self, unlocated: BTreeMap<String, String>) {
        for (key, why) in &unlocated {
            if self.unlocated.get(key) != Some(why) {
                tracing::error!(workload = %key, "cannot capture workload, its traffic bypasses the mesh until it is found: {why}");
            }
        }
        self.unlocated = unlocated;
    }

    /// Makes state, capture and open connections follow a new config.
    fn apply(&mut self, config: &Config, why: &str) {
        self.warn_of_policies(config);
        let state = State::from_config(config);
        // Most updates are pods coming and going, which cannot change the decision for an open
        // connection: only new policies, or new labels on its destination pod, can.
        let recheck = state.changes_decisions_since(&self.state.load());
        self.state.store(state);
        self.reconcile(config);
        let closed = if recheck { self.proxy.recheck_policies() } else { 0 };
        tracing::info!(
            workloads = self.pods.len(),
            policies = config.compiled_policies.len(),
            closed_by_policy = closed,
            "{why}"
        );
    }

    /// What the policies in force cannot enforce as written (e.g. L7 fields), once per config.
    fn warn_of_policies(&self, config: &Config) {
        for policy in &config.compiled_policies {
            for warning in &policy.warnings {
                tracing::warn!(policy = %policy.key(), "{warning}");
            }
        }
    }

    /// Makes the captured pods match the config's local meshed workloads.
    fn reconcile(&mut self, config: &Config) {
        let desired: HashMap<String, &Arc<config::Workload>> =
            config.local_meshed_workloads().map(|w| (format!("{}/{}", w.namespace, w.name), w)).collect();
        self.want_certificates(config);
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|w| needs_serving_anew(&pod.spec, w)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(spec) = desired.get(&key)
                && !needs_recapture(&self.pods[&key].spec, spec)
            {
                match self.serve_anew(&key, spec, &config.trust_domain) {
                    Ok(()) => {
                        tracing::info!(workload = %key, "workload served with its new spec, capture kept");
                        continue;
                    }
                    Err(e) => tracing::warn!(workload = %key, "capturing the workload again: {e:#}"),
                }
            }
            // A pod captured again right away keeps its listening sockets: binding new ones
            // could race the old ones' closing, and connections in their backlogs would be lost.
            if desired.contains_key(&key)
                && let Some(pod) = self.pods.get(&key)
                && let Ok(fds) = pod.handle.clone_listeners()
            {
                self.inherited.keep_pod(pod.netns_cookie, fds);
            }
            self.stop_pod(&key);
        }
        self.uncaptured.retain(|key, _| desired.contains_key(key));
        for (key, spec) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.start_pod(spec, &config.trust_domain) {
                Ok(pod) => {
                    // Captured even while its certificate is still requested by CSR: connections
                    // that need it wait for it, and the rest (policy on plaintext inbound, same
                    // node, passthrough) need none, so nothing goes around the mesh meanwhile.
                    let certified = self.certs.current(&spec.identity(&config.trust_domain)).is_some();
                    tracing::info!(workload = %key, netns_cookie = pod.netns_cookie, certified, "workload captured");
                    self.uncaptured.remove(&key);
                    self.pods.insert(key, pod);
                }
                // One bad workload must not keep the others from being served.
                Err(e) => {
                    let reason = format!("{e:#}");
                    // Logged when it starts failing, or fails otherwise, not at every retry.
                    if self.uncaptured.get(&key) != Some(&reason) {
                        tracing::error!(workload = %key, "cannot capture workload, its traffic bypasses the mesh until it is captured (retried): {reason}");
                    }
                    self.uncaptured.insert(key, reason);
                }
            }
        }
        self.capture_retry = match (self.uncaptured.is_empty(), self.capture_retry) {
            (true, _) => None,
            (false, None) => Some((Instant::now() + CAPTURE_RETRY_FIRST, CAPTURE_RETRY_FIRST)),
            // Due, so this was the retry (or an update came just as it fell due): back off.
            (false, Some((at, backoff))) if at <= Instant::now() => {
                let backoff = (backoff * 2).min(CAPTURE_RETRY_MAX);
                Some((Instant::now() + backoff, backoff))
            }
            (false, pending) => pending,
        };
        // Kept listeners no pod took (and, after an upgrade, the previous agent's): closed now.
        self.inherited = Inherited::default();
        self.telemetry.meshed_workloads.set(self.pods.len() as i64);
        self.publish();
    }

    /// Asks for the certificates of the config's local meshed workloads (and drops the others').
    fn want_certificates(&self, config: &Config) {
        let identities: BTreeSet<_> =
            config.local_meshed_workloads().map(|w| w.identity(&config.trust_domain)).collect();
        if let Err(e) = self.certs.set_wanted(identities) {
            tracing::error!("issuing workload certificates: {e}");
        }
    }

    /// Gives the admin API the current picture of what this loop owns.
    fn publish(&self) {
        let pods = self
            .pods
            .iter()
            .map(|(key, pod)| LocalPodView {
                workload: key.clone(),
                netns: pod.spec.netns.clone().unwrap_or_default(),
                netns_cookie: pod.netns_cookie,
                cgroup: pod.spec.cgroup.clone().unwrap_or_default(),
                programs: ferry_common::programs::ALL.to_vec(),
            })
            .collect();
        let mut uncaptured = self.uncaptured.clone();
        uncaptured.extend(self.unlocated.iter().map(|(key, why)| (key.clone(), why.clone())));
        self.telemetry.workloads_uncaptured.set(uncaptured.len() as i64);
        *self.admin.local.write().unwrap_or_else(|e| e.into_inner()) =
            LocalView { pods, uncaptured, datapath: self.datapath.view() };
        if let Some(marks) = &self.marks {
            marks.set(
                self.pods.values().map(|pod| (pod.spec.namespace.clone(), pod.spec.name.clone())).collect(),
            );
        }
    }

    fn start_pod(&mut self, spec: &Arc<config::Workload>, trust_domain: &str) -> anyhow::Result<RunningPod> {
        // Config validation guarantees both paths for local workloads.
        let netns_path = spec.netns.as_deref().context("no netns")?;
        let cgroup = spec.cgroup.as_deref().context("no cgroup")?;
        let netns =
            PodNetns::open(netns_path).with_context(|| format!("opening netns {}", netns_path.display()))?;
        let ipv6 = spec.ips.iter().any(IpAddr::is_ipv6);
        let listeners = match self.inherited.take_pod(netns.cookie()) {
            Some(fds) => {
                PodListeners::adopt(&netns, fds, ipv6).context("adopting the previous agent's listeners")?
            }
            None => PodListeners::bind(&netns, ipv6).context("binding the pod's listeners")?,
        };
        let identity = spec.identity(trust_domain);
        // Listeners are bound: connections captured from here on wait in their backlog.
        self.datapath.attach_pod(&netns, cgroup, &spec.ips, listeners.inbound_plaintext())?;
        let netns_cookie = netns.cookie();
        match self.proxy.serve_pod(spec.clone(), identity, netns, listeners) {
            Ok(handle) => Ok(RunningPod { spec: spec.clone(), netns_cookie, handle }),
            Err(e) => {
                self.datapath.detach_pod(netns_cookie);
                Err(e.into())
            }
        }
    }

    /// Serves a captured pod under its new spec on the same listeners, its capture left attached:
    /// detaching and attaching again would let its connections bypass the mesh in between. The
    /// previous serving's HBONE connections take no new streams from then on.
    fn serve_anew(
        &mut self,
        key: &str,
        spec: &Arc<config::Workload>,
        trust_domain: &str,
    ) -> anyhow::Result<()> {
        let pod = self.pods.get_mut(key).context("not captured")?;
        let netns_path = spec.netns.as_deref().context("no netns")?;
        let netns =
            PodNetns::open(netns_path).with_context(|| format!("opening netns {}", netns_path.display()))?;
        anyhow::ensure!(netns.cookie() == pod.netns_cookie, "{} is another netns now", netns_path.display());
        let identity = spec.identity(trust_domain);
        let ipv6 = spec.ips.iter().any(IpAddr::is_ipv6);
        let listeners = PodListeners::adopt(&netns, pod.handle.clone_listeners()?, ipv6)?;
        pod.handle = self.proxy.serve_pod(spec.clone(), identity, netns, listeners)?;
        pod.spec = spec.clone();
        Ok(())
    }

    fn stop_pod(&mut self, key: &str) {
        if let Some(pod) = self.pods.remove(key) {
            // Detach first so no new connection is redirected to listeners about to close.
            self.datapath.detach_pod(pod.netns_cookie);
            tracing::info!(workload = %key, "workload released");
        }
    }

    /// Sends a new agent (connected on the upgrade socket) every listener this one accepts on.
    fn offer(&self, conn: OwnedFd) -> std::io::Result<Successor> {
        let offer = Offer {
            node: self.node_listeners.iter().map(|(name, listener)| (*name, listener.as_fd())).collect(),
            pods: self.pods.values().map(|pod| (pod.netns_cookie, pod.handle.listener_fds())).collect(),
            certificates: self
                .certs
                .all()
                .iter()
                .map(|issued| issued.cert.to_pem())
                .map(|(chain, key)| (chain, SecretPem(key)))
                .collect(),
        };
        upgrade::offer(conn, &self.node, &offer)
    }

    /// A clean stop: drains, then detaches capture and removes every pin (pods talk directly).
    async fn shutdown(mut self) {
        self.telemetry.set_serving(false);
        // Agents elsewhere stop tunnelling to these pods: capture is about to go.
        if let Some(marks) = &self.marks {
            marks.clear(MARKS_CLEAR_TIMEOUT).await;
        }
        let cut = self.proxy.drain(self.drain_timeout).await;
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            self.stop_pod(&key);
        }
        self.datapath.unpin_maps();
        let _ = std::fs::remove_file(&self.admin_socket);
        let _ = std::fs::remove_file(&self.upgrade_socket);
        tracing::info!(attached = self.datapath.attached_pods(), cut, "stopped");
    }

    /// After a new agent took over: stops accepting, lets this agent's connections finish (up
    /// to the drain timeout) and leaves capture, maps, pins and sockets to the new agent.
    async fn retire(mut self) {
        self.telemetry.set_serving(false);
        self.node_loops.abort_all();
        for pod in self.pods.values_mut() {
            pod.handle.stop_accepting();
        }
        tracing::info!("handed over to the new agent; draining this agent's connections");
        let cut = self.proxy.drain(self.drain_timeout).await;
        tracing::info!(cut, "drained; exiting");
    }
}
