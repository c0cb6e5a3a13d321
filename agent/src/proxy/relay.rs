//! Copies bytes both ways between two connected sockets, keeping half-closes, and reports the
//! connection when it ends.

use std::{net::SocketAddr, time::Duration, time::Instant};

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};

use crate::telemetry::{Direction, FailureReason, ProxyMetrics};

/// Copy buffer per direction. tokio's 8 KiB default halves bulk throughput.
const BUFFER_SIZE: usize = 64 * 1024;

/// One proxied connection, for metrics and the access log.
#[derive(Debug)]
pub(super) struct Flow {
    pub(super) direction: Direction,
    route: &'static str,
    pod: String,
    src: SocketAddr,
    dst: SocketAddr,
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
        Flow { direction, route, pod, src, dst, started: Instant::now() }
    }

    /// The connection could not be set up: tell the app with a reset, count and log why.
    pub(super) fn fail(
        self,
        downstream: TcpStream,
        metrics: &ProxyMetrics,
        reason: FailureReason,
        error: &dyn std::fmt::Display,
    ) {
        reset(&downstream);
        metrics.failed(self.direction, reason);
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(), route = self.route, pod = %self.pod,
            src = %self.src, dst = %self.dst, error = %error, reason = reason.as_str(),
            "connection failed"
        );
    }

    /// Relays until both directions are closed, or resets both ends on error.
    pub(super) async fn relay(
        self,
        mut downstream: TcpStream,
        mut upstream: TcpStream,
        metrics: &ProxyMetrics,
    ) {
        metrics.opened(self.direction, self.route);
        let result =
            copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER_SIZE, BUFFER_SIZE).await;
        let duration = self.started.elapsed();
        metrics.closed(self.direction, self.route);
        match result {
            Ok((sent, received)) => self.log_closed(sent, received, duration, None),
            Err(e) => {
                // One side failed mid-stream: pass the failure on as a reset, never as a clean EOF.
                reset(&downstream);
                reset(&upstream);
                metrics.failed(self.direction, FailureReason::Relay);
                self.log_closed(0, 0, duration, Some(&e));
            }
        }
    }

    fn log_closed(&self, sent: u64, received: u64, duration: Duration, error: Option<&std::io::Error>) {
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(), route = self.route, pod = %self.pod,
            src = %self.src, dst = %self.dst, bytes_sent = sent, bytes_received = received,
            duration_ms = duration.as_millis() as u64, error = error.map(tracing::field::display),
            "connection closed"
        );
    }
}

/// Makes the next close send RST instead of FIN.
pub(super) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
