//! The node-local proxy: one set of listeners inside each meshed pod's netns, one process.
//!
//! - [`outbound`]: the pod's app connected somewhere; eBPF redirected it to 127.0.0.1:15001.
//! - [`tunnel`]: carries an outbound connection to the destination's node.
//! - [`inbound`]: plaintext connections arriving for the pod (15006), delivered to the app.
//! - [`hbone`]: the mTLS tunnel: client side for [`tunnel`], server side on the pod's 15008.
//! - [`relay`]: moves bytes both ways once both ends are connected ([`splice`] when both are
//!   kernel sockets).

mod balance;
mod connections;
pub mod hbone;
mod inbound;
mod outbound;
mod relay;
mod route;
mod splice;
mod tunnel;

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use rustls::ServerConfig;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub use connections::{LiveConnection, Tracker};
pub use route::Route;

use crate::{
    config::Limits,
    datapath::OrigDstTable,
    identity::{CertManager, IdentityError, SpiffeId, tls},
    inpod::PodNetns,
    policy::{Decision, Verdict},
    state::{StateHandle, Workload},
    telemetry::{AcceptBackoff, Direction, FailureReason, LiveBytes, Telemetry, VerdictKind},
    upgrade::PodFds,
};
use connections::Admission;
use relay::Flow;

/// A meshed pod on this node, as the proxy sees it.
#[derive(Debug)]
pub struct LocalPod {
    pub workload: Arc<Workload>,
    pub identity: SpiffeId,
    pub netns: PodNetns,
    /// HBONE server side: presents this pod's current certificate.
    tls: Arc<ServerConfig>,
    /// One per accepted connection, up to the per-pod limit.
    permits: Arc<Semaphore>,
    /// Cancelled when the pod is no longer served as this `LocalPod` (released, or served anew
    /// under a new spec): its pooled HBONE connections then take no new streams.
    released: CancellationToken,
}

/// The proxy's listeners inside one pod's netns, bound before capture is attached: a set for
/// IPv4, and one for IPv6 if the pod has an IPv6 address.
#[derive(Debug)]
pub struct PodListeners {
    v4: ListenerSet,
    v6: Option<ListenerSet>,
}

/// One address family's listeners.
#[derive(Debug)]
struct ListenerSet {
    outbound: TcpListener,
    /// Registered with the datapath so sk_lookup can steer inbound connections to it.
    inbound_plaintext: TcpListener,
    hbone: TcpListener,
}

impl ListenerSet {
    /// On `loopback` for outbound, on the family's wildcard address for the others.
    fn bind(netns: &PodNetns, loopback: IpAddr) -> io::Result<ListenerSet> {
        let any = |port| match loopback {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        };
        Ok(ListenerSet {
            outbound: netns.listen(SocketAddr::new(loopback, OUTBOUND_PORT))?,
            inbound_plaintext: netns.listen(any(INBOUND_PLAINTEXT_PORT))?,
            hbone: netns.listen(any(HBONE_PORT))?,
        })
    }

    /// Takes over a previous agent's listeners (outbound, inbound plaintext, HBONE), checking
    /// each is what it claims to be.
    fn adopt(fds: impl IntoIterator<Item = OwnedFd>, ipv6: bool) -> io::Result<ListenerSet> {
        let mut fds = fds.into_iter();
        let mut adopt = |port: u16| -> io::Result<TcpListener> {
            let fd = fds.next().ok_or_else(|| io::Error::other("missing inherited listener"))?;
            let listener = std::net::TcpListener::from(fd);
            let local = listener.local_addr()?;
            if local.port() != port || local.is_ipv6() != ipv6 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "inherited listener is on {local}, expected an {} one on port {port}",
                        if ipv6 { "IPv6" } else { "IPv4" }
                    ),
                ));
            }
            listener.set_nonblocking(true)?;
            // Accepted sockets inherit it (see `PodNetns::listen`); an older agent's listener
            // may not have it.
            socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
            TcpListener::from_std(listener)
        };
        Ok(ListenerSet {
            outbound: adopt(OUTBOUND_PORT)?,
            inbound_plaintext: adopt(INBOUND_PLAINTEXT_PORT)?,
            hbone: adopt(HBONE_PORT)?,
        })
    }
}

impl PodListeners {
    /// Binds the IPv4 set, and the IPv6 set if `ipv6`.
    pub fn bind(netns: &PodNetns, ipv6: bool) -> io::Result<PodListeners> {
        let v4 = ListenerSet::bind(netns, IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let v6 = ipv6.then(|| ListenerSet::bind(netns, IpAddr::V6(Ipv6Addr::LOCALHOST))).transpose()?;
        Ok(PodListeners { v4, v6 })
    }

    /// Takes over the listeners a previous agent bound in this pod: the IPv4 set, then the IPv6
    /// set if it had one. One that had none (an agent from before IPv6, or a pod that gained an
    /// IPv6 address) gets a new IPv6 set if `ipv6`; one that lost its IPv6 address has that set
    /// closed.
    pub fn adopt(netns: &PodNetns, fds: PodFds<OwnedFd>, ipv6: bool) -> io::Result<PodListeners> {
        let mut fds = fds.into_iter();
        let v4 = ListenerSet::adopt(fds.by_ref().take(LISTENERS_PER_FAMILY), false)?;
        let rest: Vec<OwnedFd> = fds.collect();
        let v6 = match (ipv6, rest.is_empty()) {
            (true, false) => Some(ListenerSet::adopt(rest, true)?),
            (true, true) => Some(ListenerSet::bind(netns, IpAddr::V6(Ipv6Addr::LOCALHOST))?),
            (false, _) => None,
        };
        Ok(PodListeners { v4, v6 })
    }

    /// The inbound plaintext listeners, IPv4 and IPv6 (if bound), for sk_lookup to steer to.
    pub fn inbound_plaintext(&self) -> (BorrowedFd<'_>, Option<BorrowedFd<'_>>) {
        (self.v4.inbound_plaintext.as_fd(), self.v6.as_ref().map(|v6| v6.inbound_plaintext.as_fd()))
    }

    /// Every listener with what it serves, IPv4 set first, each set in hand-over order.
    fn into_roles(self) -> Vec<(TcpListener, Role)> {
        std::iter::once(self.v4)
            .chain(self.v6)
            .flat_map(|set| {
                [
                    (set.outbound, Role::Outbound),
                    (set.inbound_plaintext, Role::Plaintext),
                    (set.hbone, Role::Hbone),
                ]
            })
            .collect()
    }
}

/// Listeners per address family: outbound, inbound plaintext, HBONE.
pub const LISTENERS_PER_FAMILY: usize = 3;

/// What a pod listener accepts.
#[derive(Clone, Copy)]
enum Role {
    Outbound,
    Plaintext,
    Hbone,
}

impl Role {
    fn direction(self) -> Direction {
        match self {
            Role::Outbound => Direction::Outbound,
            Role::Plaintext | Role::Hbone => Direction::Inbound,
        }
    }
}

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateHandle,
    local_pods: RwLock<HashMap<IpAddr, Arc<LocalPod>>>,
    orig_dst: OrigDstTable,
    telemetry: Arc<Telemetry>,
    tracker: Arc<Tracker>,
    certs: Arc<CertManager>,
    pool: Arc<hbone::client::Pool>,
    /// Data received over HBONE that apps have not read yet, and the windows granted for it.
    undelivered: Arc<hbone::Undelivered>,
    /// Becomes true when the agent shuts down or hands over: HBONE servers send GOAWAY.
    draining: watch::Receiver<bool>,
    drain: watch::Sender<bool>,
    limits: Limits,
    /// One per accepted connection, up to the per-node limit.
    node_permits: Arc<Semaphore>,
    /// Picks service endpoints.
    balancer: balance::Balancer,
    limit_warning: LimitWarning,
    node_addresses: inbound::NodeAddresses,
}

/// Serving one pod; dropping it closes the pod's listeners (open connections run to their end).
pub struct PodHandle {
    proxy: Proxy,
    pod: Arc<LocalPod>,
    /// In hand-over order (see [`PodListeners::adopt`]); shared with the accept loops.
    listeners: Vec<Arc<TcpListener>>,
    accept_loops: JoinSet<()>,
}

impl PodHandle {
    /// The pod's listening sockets, to hand to a new agent.
    pub fn listener_fds(&self) -> PodFds<BorrowedFd<'_>> {
        self.listeners.iter().map(|l| l.as_fd()).collect()
    }

    /// New descriptors of the pod's listening sockets, which outlive this handle.
    pub fn clone_listeners(&self) -> io::Result<PodFds<OwnedFd>> {
        self.listeners.iter().map(|l| l.as_fd().try_clone_to_owned()).collect()
    }

    /// Stops accepting (a new agent accepts from the same sockets now); open connections and
    /// the pod's routing stay until the handle drops.
    pub fn stop_accepting(&mut self) {
        self.accept_loops.abort_all();
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        self.pod.released.cancel();
        let mut pods = self.proxy.inner.local_pods.write().unwrap_or_else(|e| e.into_inner());
        for ip in &self.pod.workload.ips {
            if pods.get(ip).is_some_and(|p| Arc::ptr_eq(p, &self.pod)) {
                pods.remove(ip);
            }
        }
    }
}

impl Proxy {
    pub fn new(
        state: StateHandle,
        orig_dst: OrigDstTable,
        telemetry: Arc<Telemetry>,
        certs: Arc<CertManager>,
        limits: Limits,
    ) -> Proxy {
        let (drain, draining) = watch::channel(false);
        let undelivered = Arc::new(hbone::Undelivered::new(limits.undelivered_mib << 20, &telemetry.proxy));
        let pool = Arc::new(hbone::client::Pool::new(
            limits.connect_timeout,
            limits.handshake_timeout,
            undelivered.clone(),
        ));
        tokio::spawn(pool.clone().release_idle());
        let tracker = Arc::new(Tracker::default());
        let live: Arc<dyn LiveBytes> = tracker.clone();
        telemetry.count_live_bytes(Arc::downgrade(&live));
        Proxy {
            inner: Arc::new(Inner {
                state,
                local_pods: RwLock::default(),
                orig_dst,
                telemetry,
                tracker,
                certs,
                pool,
                undelivered,
                draining,
                drain,
                node_permits: Arc::new(Semaphore::new(limits.max_connections_per_node)),
                balancer: balance::Balancer::default(),
                limit_warning: LimitWarning::default(),
                node_addresses: inbound::NodeAddresses::read(),
                limits,
            }),
        }
    }

    /// Starts accepting on a pod's listeners. Its certificate may still be on its way: HBONE, in
    /// and out, waits for it.
    pub fn serve_pod(
        &self,
        workload: Arc<Workload>,
        identity: SpiffeId,
        netns: PodNetns,
        listeners: PodListeners,
    ) -> Result<PodHandle, IdentityError> {
        let tls = tls::server_config(&self.inner.certs, identity.clone())?;
        let permits = Arc::new(Semaphore::new(self.inner.limits.max_connections_per_pod));
        let released = CancellationToken::new();
        let pod = Arc::new(LocalPod { workload, identity, netns, tls, permits, released });
        {
            let mut pods = self.inner.local_pods.write().unwrap_or_else(|e| e.into_inner());
            for ip in &pod.workload.ips {
                pods.insert(*ip, pod.clone());
            }
        }
        let mut loops = JoinSet::new();
        let inner = &self.inner;
        let mut handles = Vec::new();
        for (listener, role) in listeners.into_roles() {
            let listener = Arc::new(listener);
            handles.push(listener.clone());
            let (on, pod, inner) = ((listener, role.direction()), pod.clone(), inner.clone());
            match role {
                Role::Outbound => loops.spawn(accept_loop(on, pod, inner, outbound::handle)),
                Role::Plaintext => loops.spawn(accept_loop(on, pod, inner, inbound::handle_plaintext)),
                Role::Hbone => loops.spawn(accept_loop(on, pod, inner, hbone::server::handle)),
            };
        }
        Ok(PodHandle { proxy: self.clone(), pod, listeners: handles, accept_loops: loops })
    }

    /// Asks every HBONE server connection to wind down (GOAWAY) and waits, up to `deadline`,
    /// for every accepted connection to finish. Returns how many were still open then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let _ = self.inner.drain.send(true);
        let until = tokio::time::Instant::now() + deadline;
        while self.open_connections() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.open_connections()
    }

    /// Accepted connections (on any pod listener) not finished yet.
    fn open_connections(&self) -> usize {
        self.inner.limits.max_connections_per_node - self.inner.node_permits.available_permits()
    }

    /// Re-checks open connections against the current policies; closes those now denied.
    pub fn recheck_policies(&self) -> usize {
        self.inner.tracker.recheck(&self.inner.state.load())
    }

    /// The connections being relayed now.
    pub fn connections(&self) -> Vec<LiveConnection> {
        self.inner.tracker.snapshot()
    }

    /// Bytes received over HBONE that apps have not read yet, and the stream window granted.
    pub fn undelivered(&self) -> (u64, u32) {
        self.inner.undelivered.now()
    }

    /// The destination side's decision: may `flow`'s source (`src_ip`, the authenticated peer
    /// address) reach local pod `pod`? Counts the verdict, reports dry-run differences and
    /// remembers the inputs on the flow for later re-checks.
    fn authorize(&self, pod: &LocalPod, flow: &mut Flow, src_ip: IpAddr) -> Decision {
        let admission = Admission {
            rechecks: self.inner.tracker.rechecks(),
            src_ip,
            src_identity: flow.src_identity.clone(),
            dst: flow.dst,
            destination: pod.workload.clone(),
            // Only plaintext can come from the node: HBONE peers are other agents, identified.
            from_node: flow.src_identity.is_none() && self.opened_on_node(flow.src, flow.dst),
        };
        let decision = admission.evaluate(&self.inner.state.load());
        let metrics = &self.inner.telemetry.proxy;
        let kind = if decision.verdict == Verdict::Allow { VerdictKind::Allow } else { VerdictKind::Deny };
        metrics.verdict(kind, decision.reason.policy.as_deref());
        if let Some((shadow, reason)) = &decision.dry_run {
            let kind =
                if *shadow == Verdict::Deny { VerdictKind::DryRunDeny } else { VerdictKind::DryRunAllow };
            metrics.verdict(kind, reason.policy.as_deref());
            tracing::info!(
                target: "access",
                src = %flow.src, dst = %flow.dst, policy = reason.policy.as_deref(),
                "dry-run: would be {} ({}), enforced: {decision}",
                if *shadow == Verdict::Deny { "denied" } else { "allowed" },
                reason.explanation,
            );
        }
        flow.policy = decision.reason.policy.clone();
        flow.admission = Some(admission);
        decision
    }

    /// Whether `ip` is one of this node's own addresses (the kubelet's probes come from one).
    pub fn from_node(&self, ip: IpAddr) -> bool {
        self.inner.node_addresses.contains(ip)
    }

    /// Whether a process on this node opened the connection from `src` to `dst` (a kubelet
    /// probe), rather than the node forwarding it under its own address.
    fn opened_on_node(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        if !self.from_node(src.ip()) {
            return false;
        }
        inbound::opened_on_node(src, dst).unwrap_or_else(|e| {
            tracing::warn!(%src, %dst, "looking up the node's socket: {e}; treated as forwarded");
            false
        })
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<LocalPod>> {
        self.inner.local_pods.read().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned()
    }
}

/// Accepts on one listener, within the pod's and the node's connection limits; a connection over
/// a limit is reset at once and counted.
async fn accept_loop<F, Fut>(
    (listener, direction): (Arc<TcpListener>, Direction),
    pod: Arc<LocalPod>,
    inner: Arc<Inner>,
    handler: F,
) where
    F: Fn(Proxy, Arc<LocalPod>, tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let proxy = Proxy { inner };
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let permits = (
                    pod.permits.clone().try_acquire_owned(),
                    proxy.inner.node_permits.clone().try_acquire_owned(),
                );
                let (Ok(pod_permit), Ok(node_permit)) = permits else {
                    relay::Abort::abort(&stream);
                    proxy.inner.telemetry.proxy.failed(direction, FailureReason::Limit, None);
                    proxy.inner.limit_warning.refused(&pod, peer);
                    continue;
                };
                // Boxed: a connection's future is kilobytes, and tokio moves a task's future
                // by value several times as it spawns and finishes it.
                let work = Box::pin(handler(proxy.clone(), pod.clone(), stream, peer));
                tokio::spawn(async move {
                    work.await;
                    drop((pod_permit, node_permit));
                });
            }
            Err(e) => {
                let listener = format!("{} {}", pod.workload.key(), direction.as_str());
                backoff.failed(&listener, &e).await;
            }
        }
    }
}

/// Logs connections refused for a connection limit at most once a second, with how many: a
/// flood of them must not become a flood of log lines (the metric counts each one).
#[derive(Default)]
struct LimitWarning {
    last: Mutex<Option<Instant>>,
    /// Refused since the last line.
    refused: AtomicU64,
}

impl LimitWarning {
    const EVERY: Duration = Duration::from_secs(1);

    fn refused(&self, pod: &LocalPod, peer: SocketAddr) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Self::EVERY) {
            *last = Some(Instant::now());
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(pod = %pod.workload.key(), %peer, refused, "connection refused: connection limit reached");
        }
    }
}

/// Ports of the proxy itself: a connection *to* one of them on the app's behalf would loop.
fn is_proxy_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | HBONE_PORT)
}
