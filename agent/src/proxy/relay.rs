//! Copies bytes both ways between two connected streams, keeping half-closes, and reports the
//! connection when it ends.

use std::{net::SocketAddr, time::Duration, time::Instant};

use tokio::{
    io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes},
    net::TcpStream,
};

use crate::{
    identity::SpiffeId,
    telemetry::{Direction, FailureReason, ProxyMetrics},
};

/// Copy buffer per direction. tokio's 8 KiB default halves bulk throughput.
const BUFFER_SIZE: usize = 64 * 1024;

/// A stream that can be cut so the other end sees a failure, not a clean end.
pub(super) trait Abort {
    fn abort(&self);
}

impl Abort for TcpStream {
    /// The next close sends RST instead of FIN.
    fn abort(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

/// One proxied connection, for metrics and the access log.
#[derive(Debug)]
pub(super) struct Flow {
    direction: Direction,
    route: &'static str,
    pod: String,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: Option<SpiffeId>,
    dst_identity: Option<SpiffeId>,
    started: Instant,
}

impl Flow {
    pub(super) fn new(
        direction: Direction,
        route: &'static str,
        pod: String,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Flow {
        Flow {
            direction,
            route,
            pod,
            src,
            dst,
            src_identity: None,
            dst_identity: None,
            started: Instant::now(),
        }
    }

    /// The authenticated identities of both ends, when the connection has them.
    pub(super) fn identities(mut self, src: Option<SpiffeId>, dst: Option<SpiffeId>) -> Flow {
        self.src_identity = src;
        self.dst_identity = dst;
        self
    }

    /// The connection could not be set up: count and log why. The caller tells its peer.
    pub(super) fn fail(self, metrics: &ProxyMetrics, reason: FailureReason, error: &dyn std::fmt::Display) {
        metrics.failed(self.direction, reason);
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(), route = self.route, pod = %self.pod,
            src = %self.src, dst = %self.dst,
            src_identity = self.src_identity.as_ref().map(tracing::field::display),
            dst_identity = self.dst_identity.as_ref().map(tracing::field::display),
            error = %error, reason = reason.as_str(),
            "connection failed"
        );
    }

    /// Like [`Flow::fail`], resetting `downstream` first.
    pub(super) fn reset(
        self,
        downstream: &impl Abort,
        metrics: &ProxyMetrics,
        reason: FailureReason,
        error: &dyn std::fmt::Display,
    ) {
        downstream.abort();
        self.fail(metrics, reason, error);
    }

    /// Relays until both directions are closed, or aborts both ends on error.
    pub(super) async fn relay<A, B>(self, mut downstream: A, mut upstream: B, metrics: &ProxyMetrics)
    where
        A: AsyncRead + AsyncWrite + Unpin + Abort,
        B: AsyncRead + AsyncWrite + Unpin + Abort,
    {
        metrics.opened(self.direction, self.route);
        let result =
            copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER_SIZE, BUFFER_SIZE).await;
        let duration = self.started.elapsed();
        metrics.closed(self.direction, self.route);
        match result {
            Ok((sent, received)) => self.log_closed(sent, received, duration, None),
            Err(e) => {
                // One side failed mid-stream: pass the failure on, never as a clean end.
                downstream.abort();
                upstream.abort();
                metrics.failed(self.direction, FailureReason::Relay);
                self.log_closed(0, 0, duration, Some(&e));
            }
        }
    }

    fn log_closed(&self, sent: u64, received: u64, duration: Duration, error: Option<&std::io::Error>) {
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(), route = self.route, pod = %self.pod,
            src = %self.src, dst = %self.dst,
            src_identity = self.src_identity.as_ref().map(tracing::field::display),
            dst_identity = self.dst_identity.as_ref().map(tracing::field::display),
            bytes_sent = sent, bytes_received = received,
            duration_ms = duration.as_millis() as u64, error = error.map(tracing::field::display),
            "connection closed"
        );
    }
}
