//! `ferry agent`: wires discovery -> state -> datapath + proxy, and runs until SIGTERM.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    admin::{Admin, LocalPodView, LocalView},
    config::{self, Config},
    datapath::Datapath,
    discovery::StaticFile,
    identity::{CertManager, FileCa},
    inpod::PodNetns,
    proxy::{PodHandle, PodListeners, Proxy},
    state::{State, StateHandle, Workload},
    telemetry::{LogControl, Telemetry},
};

/// A local workload being captured and served.
struct RunningPod {
    spec: config::Workload,
    netns_cookie: u64,
    _handle: PodHandle,
}

struct Agent {
    datapath: Datapath,
    proxy: Proxy,
    state: StateHandle,
    certs: Arc<CertManager>,
    telemetry: Arc<Telemetry>,
    admin: Arc<Admin>,
    admin_socket: PathBuf,
    pods: HashMap<String, RunningPod>,
}

/// How long shutdown waits for HBONE peers to finish their streams after GOAWAY.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

pub async fn run(config_path: PathBuf, log: LogControl) -> anyhow::Result<()> {
    let source = StaticFile { path: config_path.clone() };
    let config = source.read()?;
    let (datapath, orig_dst, counters) =
        Datapath::load(config.fail_mode, &config.bpf_pin_dir).context("loading the eBPF programs")?;
    let ca = FileCa::init(&config.ca_dir)?;
    let certs = Arc::new(CertManager::new(ca, config.cert_ttl)?);
    tokio::spawn(certs.clone().rotate());
    let telemetry = Telemetry::new(counters.clone(), certs.clone());
    for addr in [config.metrics_addr, config.readiness_addr] {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        tokio::spawn(telemetry.clone().serve(listener));
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
    });
    let admin_tcp = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding {}", config.admin_addr))?;
    admin
        .clone()
        .serve(&config.admin_socket, Some(admin_tcp))
        .await
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;
    let admin_socket = config.admin_socket.clone();
    let mut agent =
        Agent { datapath, proxy, state, certs, telemetry, admin, admin_socket, pods: HashMap::new() };
    agent.reconcile(&config);
    // Links a crashed agent left for pods that are gone now.
    agent.datapath.remove_orphan_pins();
    agent.telemetry.set_ready(true);
    tracing::info!(node = %config.node, workloads = agent.pods.len(), "ready");

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => match source.read() {
                Ok(config) => {
                    agent.state.store(State::from_config(&config));
                    agent.reconcile(&config);
                    let closed = agent.proxy.recheck_policies();
                    tracing::info!(
                        workloads = agent.pods.len(),
                        policies = config.compiled_policies.len(),
                        closed_by_policy = closed,
                        "config reloaded"
                    );
                }
                Err(e) => tracing::error!("config reload rejected, the previous config stays in force: {e}"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    agent.shutdown().await;
    Ok(())
}

impl Agent {
    /// Makes the captured pods match the config's local meshed workloads.
    fn reconcile(&mut self, config: &Config) {
        for policy in &config.compiled_policies {
            for warning in &policy.warnings {
                tracing::warn!(policy = %policy.key(), "{warning}");
            }
        }
        let desired: HashMap<String, &config::Workload> =
            config.local_meshed_workloads().map(|w| (format!("{}/{}", w.namespace, w.name), w)).collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|w| **w != pod.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.stop_pod(&key);
        }
        let identities: BTreeSet<_> =
            desired.values().map(|w| Workload::from(*w).identity(&config.trust_domain)).collect();
        if let Err(e) = self.certs.set_wanted(identities) {
            tracing::error!("issuing workload certificates: {e}");
        }
        for (key, spec) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.start_pod(spec, &config.trust_domain) {
                Ok(pod) => {
                    tracing::info!(workload = %key, netns_cookie = pod.netns_cookie, "workload captured");
                    self.pods.insert(key, pod);
                }
                // One bad workload must not keep the others from being served.
                Err(e) => tracing::error!(workload = %key, "cannot capture workload: {e:#}"),
            }
        }
        self.telemetry.meshed_workloads.set(self.pods.len() as i64);
        self.publish();
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
        *self.admin.local.write().unwrap_or_else(|e| e.into_inner()) =
            LocalView { pods, datapath: self.datapath.view() };
    }

    fn start_pod(&mut self, spec: &config::Workload, trust_domain: &str) -> anyhow::Result<RunningPod> {
        // Config validation guarantees both paths for local workloads.
        let netns_path = spec.netns.as_deref().context("no netns")?;
        let cgroup = spec.cgroup.as_deref().context("no cgroup")?;
        let netns =
            PodNetns::open(netns_path).with_context(|| format!("opening netns {}", netns_path.display()))?;
        let listeners = PodListeners::bind(&netns).context("binding the pod's listeners")?;
        let workload = Arc::new(Workload::from(spec));
        let identity = workload.identity(trust_domain);
        if self.certs.current(&identity).is_none() {
            anyhow::bail!("no certificate for {identity}");
        }
        // Listeners are bound: connections captured from here on wait in their backlog.
        self.datapath.attach_pod(&netns, cgroup, &spec.ips, &listeners.inbound_plaintext)?;
        let netns_cookie = netns.cookie();
        match self.proxy.serve_pod(workload, identity, netns, listeners) {
            Ok(handle) => Ok(RunningPod { spec: spec.clone(), netns_cookie, _handle: handle }),
            Err(e) => {
                self.datapath.detach_pod(netns_cookie);
                Err(e.into())
            }
        }
    }

    fn stop_pod(&mut self, key: &str) {
        if let Some(pod) = self.pods.remove(key) {
            // Detach first so no new connection is redirected to listeners about to close.
            self.datapath.detach_pod(pod.netns_cookie);
            tracing::info!(workload = %key, "workload released");
        }
    }

    async fn shutdown(mut self) {
        self.telemetry.set_ready(false);
        self.proxy.drain(DRAIN_DEADLINE).await;
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            self.stop_pod(&key);
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        tracing::info!(attached = self.datapath.attached_pods(), "stopped");
    }
}
