//! HBONE: HTTP/2 CONNECT over mutual TLS on port 15008, wire-compatible with Istio's ztunnel
//! (see ../shared/design/hbone.md).
//!
//! - [`proto`]: the request and the inbound checks, without I/O.
//! - [`client`]: the outbound side, with its connection pool.
//! - [`server`]: the 15008 listener of each local pod.
//! - [`stream`]: relaying a CONNECT stream to a socket, and the connections' keep-alive pings.
//! - [`window`]: the agent-wide budget for received data its apps have not read yet.

/// The HTTP/2 settings both sides use (ztunnel's values), for h2's client and server builders:
/// distinct types with the same setters. Expands in the child modules. The stream window is the
/// agent's current one ([`window`]).
macro_rules! hbone_h2_settings {
    ($builder:expr, $stream_window:expr) => {
        $builder
            .initial_window_size($stream_window)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(super::SEND_BUFFER)
    };
}

pub(super) mod client;
pub mod proto;
pub(super) mod server;
mod stream;
mod window;

pub(super) use stream::{H2Stream, relay};
pub(crate) use window::Undelivered;

use std::time::Duration;

/// HTTP/2 settings both sides use. 1 MiB frames (ztunnel's) move bulk 1.7x faster than h2's
/// default of 16 KiB; windows of 1 MiB or more made no difference to bulk (performance.md). The
/// stream window shrinks while apps leave too much unread ([`window`]).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Room for every stream's full window, as Go's HTTP/2 gives (1 GiB), where ztunnel's 16 MiB
/// holds four: a stream whose app stops reading keeps its window's worth of data undelivered,
/// and four such streams then stalled every other stream of the connection, i.e. all traffic
/// between the two pods. What stalled streams hold stays bounded by their own windows, and all
/// of them together by the agent's budget ([`window`]).
const CONNECTION_WINDOW: u32 = SERVER_MAX_CONCURRENT_STREAMS * STREAM_WINDOW;
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// What h2 holds of a stream's data before writing it to TLS (h2's default, made explicit): a
/// stream reads no more from its app than this has room for, so it is also the largest read and
/// DATA frame a stream sends, and what a sending agent holds per stream on a congested link. 2 MiB
/// made 4-stream bulk faster, not 1-stream bulk, for five times the memory (performance.md).
const SEND_BUFFER: usize = 400 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Read buffer under TLS. rustls asks for at most 4 KiB per read; without it a bulk transfer
/// costs a `recv` syscall (and often an ACK) per 4 KiB.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// The most an HBONE socket holds unsent (TCP_NOTSENT_LOWAT). Every stream between two pods
/// shares one connection, so on a congested link a request waits behind all the bulk queued
/// ahead of it: the kernel's send buffer grows to 4 MiB, 33 ms at 1 Gbit/s. Bulk is even with
/// the limit, which binds only when the link, not the agents, is the bottleneck (performance.md).
const UNSENT_LIMIT: u32 = 128 * 1024;

/// The TCP connection as TLS sees it: reads buffered, writes passed through, little left unsent.
fn buffered(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<tokio::net::TcpStream> {
    // Linux has it since 3.12; without it only latency under congestion suffers.
    let _ = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(UNSENT_LIMIT);
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a tunnel go through `buffered`, client and server alike.
    #[tokio::test]
    async fn buffered_sockets_keep_little_unsent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let default = socket2::SockRef::from(&client).tcp_notsent_lowat().unwrap();
        assert_ne!(default, UNSENT_LIMIT, "the test needs a default that differs");
        let reader = buffered(client);
        assert_eq!(socket2::SockRef::from(reader.get_ref()).tcp_notsent_lowat().unwrap(), UNSENT_LIMIT);
    }
}
