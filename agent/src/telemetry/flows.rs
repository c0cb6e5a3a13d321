//! Flow events: a bounded ring of recent connection events (opened, closed, denied, failed) that
//! the admin API serves and streams. Memory stays bounded whatever the connection rate.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::identity::SpiffeId;

/// Events kept for `ferry flows`.
const CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    Opened,
    Closed,
    Denied,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub kind: FlowKind,
    pub direction: &'static str,
    pub route: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub src_identity: Option<SpiffeId>,
    pub dst_identity: Option<SpiffeId>,
    /// The policy that decided, for denials (and allows decided by a policy).
    pub policy: Option<String>,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// Request direction: what the source sent.
    pub bytes_src_to_dst: u64,
    /// Response direction: what the destination sent.
    pub bytes_dst_to_src: u64,
    pub duration_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
pub struct FlowLog {
    ring: Mutex<VecDeque<FlowEvent>>,
    live: broadcast::Sender<FlowEvent>,
}

impl Default for FlowLog {
    fn default() -> Self {
        FlowLog { ring: Mutex::new(VecDeque::with_capacity(CAPACITY)), live: broadcast::channel(CAPACITY).0 }
    }
}

impl FlowLog {
    pub fn push(&self, event: FlowEvent) {
        let _ = self.live.send(event.clone());
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The recent events, oldest first.
    pub fn recent(&self) -> Vec<FlowEvent> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Events from now on; a slow reader skips what it could not keep up with.
    pub fn subscribe(&self) -> broadcast::Receiver<FlowEvent> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> FlowEvent {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        FlowEvent {
            time_ms: n,
            kind: FlowKind::Closed,
            direction: "inbound",
            route: "hbone",
            src: addr,
            dst: addr,
            src_workload: None,
            dst_workload: None,
            src_identity: None,
            dst_identity: None,
            policy: None,
            reason: None,
            bytes_src_to_dst: 0,
            bytes_dst_to_src: 0,
            duration_ms: 0,
        }
    }

    #[test]
    fn ring_is_bounded_and_keeps_the_newest() {
        let log = FlowLog::default();
        let mut live = log.subscribe();
        for n in 0..(CAPACITY as u64 + 10) {
            log.push(event(n));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent.first().unwrap().time_ms, 10);
        assert_eq!(recent.last().unwrap().time_ms, CAPACITY as u64 + 9);
        // A subscriber that fell behind is told so, then continues with what is left.
        assert!(live.try_recv().is_err());
        assert!(live.try_recv().is_ok());
    }
}
