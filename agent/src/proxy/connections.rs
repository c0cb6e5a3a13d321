//! Live connections: what `ferry connections` lists, and what a policy change re-checks. The
//! destination side decides, so inbound and same-node connections carry the decision's inputs and
//! are closed when a new policy set denies them (as ztunnel does).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use tokio::sync::watch;

use super::relay::Flow;
use crate::{
    identity::SpiffeId,
    policy::{Decision, Request, Verdict},
    state::{State, StateHandle, Workload},
    telemetry::{ConnectionCounters, LiveBytes},
};

/// The inputs of the authorization decision a connection was admitted with.
#[derive(Debug, Clone)]
pub(super) struct Admission {
    pub(super) src_ip: IpAddr,
    pub(super) src_identity: Option<SpiffeId>,
    pub(super) dst: SocketAddr,
    /// The local workload the connection is for (its namespace and labels scope the policies).
    pub(super) destination: Arc<Workload>,
    /// A process on this node opened it (see `Proxy::opened_on_node`).
    pub(super) from_node: bool,
    /// [`Tracker::rechecks`] when it was decided: if a re-check ran before the connection was
    /// registered, the re-check missed it, and registering decides again.
    pub(super) rechecks: u64,
}

impl Admission {
    pub(super) fn evaluate(&self, state: &State) -> Decision {
        // The destination as `state` knows it, so a relabelled pod is judged by its new labels:
        // on a re-check, and for a stream that reaches a pooled HBONE connection, which holds
        // the pod as it was served then, before the connection is retired (GOAWAY) for the pod
        // served anew.
        let destination = state
            .workload_by_ip(self.dst.ip())
            .filter(|w| w.namespace == self.destination.namespace && w.name == self.destination.name)
            .unwrap_or(&self.destination);
        state.policies.evaluate(&Request {
            src_ip: self.src_ip,
            src_identity: self.src_identity.as_ref(),
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
            dst_namespace: &destination.namespace,
            dst_labels: &destination.labels,
            node_exempt: state.node_traffic.exempts(self.from_node),
        })
    }
}

/// A snapshot of one live connection (`ferry connections`).
#[derive(Debug, Clone, Serialize)]
pub struct LiveConnection {
    pub id: u64,
    pub direction: &'static str,
    pub route: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<SpiffeId>,
    pub dst_identity: Option<SpiffeId>,
    pub bytes_src_to_dst: u64,
    pub bytes_dst_to_src: u64,
    pub age_ms: u64,
}

struct Tracked {
    info: LiveConnection,
    opened: Instant,
    bytes: Arc<ByteCounts>,
    /// Shared so that a re-check evaluates outside the table's lock.
    admitted: Option<Arc<Admitted>>,
}

/// An admitted connection, as a policy change re-checks it.
struct Admitted {
    admission: Admission,
    revoke: watch::Sender<Option<Decision>>,
}

impl Admitted {
    /// Decides again; revokes the connection if `state` denies it. Whether it did (a connection
    /// that has closed meanwhile has no receiver left).
    fn revoke_if_denied(&self, state: &State) -> bool {
        let decision = self.admission.evaluate(state);
        decision.verdict == Verdict::Deny && self.revoke.send(Some(decision)).is_ok()
    }
}

/// Bytes relayed so far, updated as they flow, and how many of them the byte counters have.
#[derive(Debug)]
pub(super) struct ByteCounts {
    pub(super) src_to_dst: AtomicU64,
    pub(super) dst_to_src: AtomicU64,
    counted_src_to_dst: AtomicU64,
    counted_dst_to_src: AtomicU64,
    /// The connection's counters, by its labels.
    pub(super) counters: ConnectionCounters,
}

impl ByteCounts {
    fn new(counters: ConnectionCounters) -> ByteCounts {
        ByteCounts {
            src_to_dst: AtomicU64::new(0),
            dst_to_src: AtomicU64::new(0),
            counted_src_to_dst: AtomicU64::new(0),
            counted_dst_to_src: AtomicU64::new(0),
            counters,
        }
    }

    /// (source to destination, destination to source) so far.
    pub(super) fn totals(&self) -> (u64, u64) {
        (self.src_to_dst.load(Ordering::Relaxed), self.dst_to_src.load(Ordering::Relaxed))
    }

    /// Adds what moved since the last call to the byte counters. A scrape and the connection's
    /// close may race: each byte is still added once, as `fetch_max` hands every increment of
    /// `counted` to exactly one caller.
    pub(super) fn count(&self) {
        let (received, sent) = self.totals();
        let new = |counted: &AtomicU64, total: u64| {
            total.saturating_sub(counted.fetch_max(total, Ordering::Relaxed))
        };
        self.counters.relayed(new(&self.counted_src_to_dst, received), new(&self.counted_dst_to_src, sent));
    }
}

#[derive(Default)]
pub struct Tracker {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
    /// Re-checks started so far.
    rechecks: AtomicU64,
}

/// Keeps a connection listed while it lives; tells it when a policy change revokes it.
pub(super) struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
    revoked: watch::Receiver<Option<Decision>>,
    pub(super) bytes: Arc<ByteCounts>,
}

impl Registration {
    /// Resolves with the denying decision when a policy change revokes the connection.
    pub(super) async fn revoked(&self) -> Decision {
        let mut revoked = self.revoked.clone();
        loop {
            if let Some(decision) = revoked.borrow_and_update().clone() {
                return decision;
            }
            if revoked.changed().await.is_err() {
                // The tracker entry is gone only when this registration drops: never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl Tracker {
    /// To be read before the state a connection is admitted against is loaded, and kept in
    /// its [`Admission`].
    pub(super) fn rechecks(&self) -> u64 {
        self.rechecks.load(Ordering::SeqCst)
    }

    /// Lists the connection. One admitted before a re-check that could not see it yet (it was
    /// still connecting to its destination) is decided again against `state`, so that a policy
    /// change cannot miss a connection that was being set up meanwhile.
    pub(super) fn register(
        self: &Arc<Self>,
        flow: &Flow,
        counters: ConnectionCounters,
        state: &StateHandle,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = watch::channel(None);
        let admitted = flow.admission.clone().map(|admission| Arc::new(Admitted { admission, revoke }));
        let info = LiveConnection {
            id,
            direction: flow.direction.as_str(),
            route: flow.route,
            src: flow.src,
            dst: flow.dst,
            src_identity: flow.src_identity.clone(),
            dst_identity: flow.dst_identity.clone(),
            bytes_src_to_dst: 0,
            bytes_dst_to_src: 0,
            age_ms: 0,
        };
        let bytes = Arc::new(ByteCounts::new(counters));
        let tracked =
            Tracked { info, opened: Instant::now(), bytes: bytes.clone(), admitted: admitted.clone() };
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tracked);
        // A re-check that took its list before the insert counted itself before that: this load
        // sees it (the table's lock orders the two), and the state it re-checked against.
        if let Some(admitted) = admitted
            && admitted.admission.rechecks != self.rechecks()
        {
            admitted.revoke_if_denied(&state.load());
        }
        Registration { tracker: self.clone(), id, revoked, bytes }
    }

    /// Re-evaluates every admitted connection against `state`'s policies; closes those now
    /// denied. Returns how many were closed. The policies are evaluated outside the lock, which
    /// every new and closing connection takes: with many connections and policies a re-check
    /// takes milliseconds, and connections keep opening meanwhile.
    pub fn recheck(&self, state: &State) -> usize {
        self.rechecks.fetch_add(1, Ordering::SeqCst);
        let admitted: Vec<Arc<Admitted>> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.values().filter_map(|tracked| tracked.admitted.clone()).collect()
        };
        admitted.iter().filter(|admitted| admitted.revoke_if_denied(state)).count()
    }

    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<LiveConnection> = live
            .values()
            .map(|t| {
                let (bytes_src_to_dst, bytes_dst_to_src) = t.bytes.totals();
                LiveConnection {
                    bytes_src_to_dst,
                    bytes_dst_to_src,
                    age_ms: t.opened.elapsed().as_millis() as u64,
                    ..t.info.clone()
                }
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }
}

impl LiveBytes for Tracker {
    fn count_bytes(&self) {
        // Counted outside the lock, which new and closing connections take.
        let live: Vec<Arc<ByteCounts>> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.values().map(|tracked| tracked.bytes.clone()).collect()
        };
        for bytes in live {
            bytes.count();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::{config::Config, telemetry::Direction};

    const DENY_ALL: &str =
        "[{metadata: {name: deny-all, namespace: shop}, spec: {action: DENY, rules: [{}]}}]";
    const DENY_LOCKED: &str = "[{metadata: {name: deny-locked, namespace: shop}, spec: {selector: {matchLabels: {locked: 'yes'}}, action: DENY, rules: [{}]}}]";

    /// Local pod web (labels `web`), a pod on another node (labels `remote`), `policies`.
    fn state_with(web: &str, remote: &str, policies: &str) -> State {
        let config = format!(
            "node: n1
workloads:
  - {{name: web, namespace: shop, labels: {web}, ips: [10.0.1.2], node: n1, meshed: false}}
  - {{name: db, namespace: shop, labels: {remote}, ips: [10.0.2.5], node: n2}}
policies: {policies}
"
        );
        State::from_config(&Config::parse(&config, Path::new("t.yaml")).unwrap())
    }

    fn state(policies: &str) -> State {
        state_with("{app: web}", "{app: db}", policies)
    }

    fn admitted_flow(state: &State, rechecks: u64) -> Flow {
        let dst: SocketAddr = "10.0.1.2:8080".parse().unwrap();
        let mut flow = Flow::new(Direction::Inbound, "test", "10.0.2.9:40000".parse().unwrap(), dst);
        let destination = state.workload_by_ip(dst.ip()).unwrap().clone();
        let admission = Admission {
            src_ip: flow.src.ip(),
            src_identity: None,
            dst,
            destination,
            from_node: false,
            rechecks,
        };
        assert_eq!(admission.evaluate(state).verdict, Verdict::Allow);
        flow.admission = Some(admission);
        flow
    }

    fn counters(flow: &Flow) -> ConnectionCounters {
        crate::telemetry::ProxyMetrics::default().counters(flow.labels())
    }

    async fn revocation(registration: &Registration) -> Option<Decision> {
        tokio::time::timeout(Duration::from_millis(100), registration.revoked()).await.ok()
    }

    #[tokio::test]
    async fn a_policy_change_reaches_connections_still_being_set_up() {
        let tracker = Arc::new(Tracker::default());
        let handle = StateHandle::new(state("[]"));
        let open = admitted_flow(&handle.load(), tracker.rechecks());
        let open = tracker.register(&open, counters(&open), &handle);
        // Admitted, then connecting to its destination while the policies change.
        let connecting = admitted_flow(&handle.load(), tracker.rechecks());

        handle.store(state(DENY_ALL));
        assert_eq!(tracker.recheck(&handle.load()), 1, "only the registered connection is listed");
        let decision = revocation(&open).await.expect("the open connection is revoked");
        assert_eq!(decision.reason.policy.as_deref(), Some("shop/deny-all"));

        let connected = tracker.register(&connecting, counters(&connecting), &handle);
        let decision = revocation(&connected).await.expect("revoked as it registers, after the re-check");
        assert_eq!(decision.verdict, Verdict::Deny);

        drop((open, connected));
        assert_eq!(tracker.recheck(&handle.load()), 0, "closed connections are not counted");
    }

    #[tokio::test]
    async fn a_destination_relabelled_into_a_deny_policy_is_decided_by_its_new_labels() {
        let tracker = Arc::new(Tracker::default());
        let before = state(DENY_LOCKED);
        let handle = StateHandle::new(state(DENY_LOCKED));
        let open = admitted_flow(&before, tracker.rechecks());
        let open = tracker.register(&open, counters(&open), &handle);

        let remote_relabelled = state_with("{app: web}", "{app: db, locked: 'yes'}", DENY_LOCKED);
        assert!(!remote_relabelled.changes_decisions_since(&before), "no open connection goes to db");
        assert!(!state(DENY_LOCKED).changes_decisions_since(&before));

        let locked = state_with("{app: web, locked: 'yes'}", "{app: db}", DENY_LOCKED);
        assert!(locked.changes_decisions_since(&before));
        assert_eq!(tracker.recheck(&locked), 1);
        let decision = revocation(&open).await.expect("revoked by the destination's new labels");
        assert_eq!(decision.reason.policy.as_deref(), Some("shop/deny-locked"));
    }
}
