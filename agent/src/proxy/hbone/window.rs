//! The agent's budget for undelivered data. Bytes that arrive on an HBONE stream wait in the
//! agent until the app at its end reads them, up to the stream's window; an app that reads slowly
//! or not at all keeps that much here for as long as its connection lives, and many of them
//! would take the agent past its memory limit (4 MiB each, 64 of them fill 256 MiB). Past
//! `limits.undeliveredMiB` over all streams, every HBONE connection of the agent grants
//! [`PRESSED_WINDOW`] per stream instead (a SETTINGS change, which shrinks the windows of open
//! streams too, so their senders stop until their backlog drains), and back to the full window
//! once less than half that budget is waiting.

use std::{sync::atomic::Ordering, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::watch, time::Instant};

use super::STREAM_WINDOW;
use crate::telemetry::ProxyMetrics;

/// The window each stream is granted while the budget is spent: room for a round trip at a few
/// Gbit/s between nodes of one zone, so streams still move.
const PRESSED_WINDOW: u32 = 64 * 1024;
/// A SETTINGS change must wait for the peer to acknowledge the one before.
const SETTINGS_RETRY: Duration = Duration::from_millis(50);

pub(crate) struct Undelivered {
    /// Bytes received on HBONE streams and not yet written to their apps' sockets.
    bytes: Gauge,
    /// The stream window granted now, for the connections to follow.
    window: watch::Sender<u32>,
    /// The same, exported; the relay's accounting reads it to tell without a lock that nothing
    /// needs to change.
    window_gauge: Gauge,
    high: i64,
    low: i64,
}

impl Undelivered {
    pub(crate) fn new(budget_bytes: u64, metrics: &ProxyMetrics) -> Undelivered {
        let high = i64::try_from(budget_bytes).unwrap_or(i64::MAX);
        metrics.stream_window.set(i64::from(STREAM_WINDOW));
        Undelivered {
            bytes: metrics.undelivered.clone(),
            window: watch::channel(STREAM_WINDOW).0,
            window_gauge: metrics.stream_window.clone(),
            high,
            low: high / 2,
        }
    }

    /// `n` bytes arrived for an app.
    pub(super) fn received(&self, n: usize) {
        let waiting = self.bytes.inner().fetch_add(n as i64, Ordering::SeqCst) + n as i64;
        if waiting > self.high && !self.pressed() {
            self.follow_backlog();
        }
    }

    /// `n` bytes reached their app's socket, or were dropped with their stream.
    pub(super) fn delivered(&self, n: usize) {
        let waiting = self.bytes.inner().fetch_sub(n as i64, Ordering::SeqCst) - n as i64;
        if waiting < self.low && self.pressed() {
            self.follow_backlog();
        }
    }

    /// Sets the window for the backlog as it is now, under the channel's lock: callers decided
    /// on a count other streams may have moved since. Checks again once the window is stored: a
    /// stream that moved the count the other way after it was read here may have seen the old
    /// window and left the change to this call (the orderings are sequentially consistent
    /// for that reason).
    fn follow_backlog(&self) {
        while self.set_window_for_backlog() {
            let (waiting, pressed) = (self.waiting(), self.pressed());
            if !((pressed && waiting < self.low) || (!pressed && waiting > self.high)) {
                return;
            }
        }
    }

    fn waiting(&self) -> i64 {
        self.bytes.inner().load(Ordering::SeqCst)
    }

    fn pressed(&self) -> bool {
        self.window_gauge.inner().load(Ordering::SeqCst) == i64::from(PRESSED_WINDOW)
    }

    /// Whether the window changed.
    fn set_window_for_backlog(&self) -> bool {
        self.window.send_if_modified(|window| {
            let waiting = self.waiting();
            let wanted = if waiting > self.high {
                PRESSED_WINDOW
            } else if waiting < self.low {
                STREAM_WINDOW
            } else {
                return false;
            };
            if *window == wanted {
                return false;
            }
            *window = wanted;
            self.window_gauge.inner().store(i64::from(wanted), Ordering::SeqCst);
            let mib = waiting >> 20;
            if wanted == PRESSED_WINDOW {
                tracing::warn!(
                    "{mib} MiB received over HBONE wait for apps to read them, more than limits.undeliveredMiB: streams get {} KiB windows until half of it has drained",
                    wanted >> 10
                );
            } else {
                tracing::info!("{mib} MiB wait for apps to read them: streams get their full window again");
            }
            true
        })
    }

    /// Bytes waiting for their apps now, and the stream window granted.
    pub(crate) fn now(&self) -> (u64, u32) {
        (self.waiting().max(0) as u64, *self.window.borrow())
    }

    /// The stream window a new HBONE connection grants, and what tells it of changes.
    pub(super) fn follow(&self) -> WindowFollower {
        let wanted = self.window.subscribe();
        let granted = *wanted.borrow();
        WindowFollower { wanted, granted, retry_at: None }
    }
}

/// One HBONE connection's view of the agent's stream window.
pub(super) struct WindowFollower {
    wanted: watch::Receiver<u32>,
    granted: u32,
    /// When to try again after a refused change: a deadline, not a delay, since the connection's
    /// other work (a stream per app connection) restarts `changed` at every turn.
    retry_at: Option<Instant>,
}

impl WindowFollower {
    /// What the connection announced (or, before its handshake, will announce).
    pub(super) fn granted(&self) -> u32 {
        self.granted
    }

    /// Resolves with the window to announce once the agent's differs from the connection's.
    /// Cancel-safe.
    pub(super) async fn changed(&mut self) -> u32 {
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
        }
        loop {
            let wanted = *self.wanted.borrow_and_update();
            if wanted != self.granted {
                return wanted;
            }
            if self.wanted.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The outcome of announcing `window` (h2 refuses while the last SETTINGS is unacknowledged).
    pub(super) fn announced(&mut self, window: u32, result: Result<(), h2::Error>) {
        match result {
            Ok(()) => (self.granted, self.retry_at) = (window, None),
            Err(_) => self.retry_at = Some(Instant::now() + SETTINGS_RETRY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn windows_shrink_past_the_budget_and_grow_back_below_half_of_it() {
        let metrics = ProxyMetrics::default();
        let undelivered = Undelivered::new(8 * MIB as u64, &metrics);
        let window = || metrics.stream_window.get() as u32;
        undelivered.received(8 * MIB);
        assert_eq!(window(), STREAM_WINDOW, "at the budget, not past it");
        undelivered.received(1);
        assert_eq!(window(), PRESSED_WINDOW);
        undelivered.delivered(4 * MIB + 1);
        assert_eq!(window(), PRESSED_WINDOW, "4 MiB still wait: not below half the budget");
        undelivered.delivered(1);
        assert_eq!(window(), STREAM_WINDOW);
        assert_eq!(metrics.undelivered.get(), 4 * MIB as i64 - 1);
    }

    #[tokio::test]
    async fn connections_follow_the_window_and_retry_a_refused_change() {
        let undelivered = Undelivered::new(MIB as u64, &ProxyMetrics::default());
        let mut follower = undelivered.follow();
        assert_eq!(follower.granted(), STREAM_WINDOW);
        undelivered.received(2 * MIB);
        let wanted = follower.changed().await;
        assert_eq!(wanted, PRESSED_WINDOW);
        follower.announced(wanted, Err(h2::Reason::INTERNAL_ERROR.into()));
        assert_eq!(follower.granted(), STREAM_WINDOW, "refused: still the old one");
        assert_eq!(follower.changed().await, PRESSED_WINDOW, "asked again");
        follower.announced(wanted, Ok(()));
        assert_eq!(follower.granted(), PRESSED_WINDOW);
        undelivered.delivered(2 * MIB);
        assert_eq!(follower.changed().await, STREAM_WINDOW);
    }
}
