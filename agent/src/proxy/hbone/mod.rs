//! HBONE: HTTP/2 CONNECT over mutual TLS on port 15008, wire-compatible with Istio's ztunnel
//! (see ../shared/design/hbone.md).
//!
//! - [`proto`]: the request and the inbound checks, without I/O.
//! - [`client`]: the outbound side, with its connection pool.
//! - [`server`]: the 15008 listener of each local pod.
//! - [`stream`]: a CONNECT stream as a byte stream, and the connections' keep-alive pings.

/// The HTTP/2 settings both sides use (ztunnel's values), for h2's client and server builders:
/// distinct types with the same setters. Expands in the child modules.
macro_rules! hbone_h2_settings {
    ($builder:expr) => {
        $builder
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
    };
}

pub(super) mod client;
pub mod proto;
pub(super) mod server;
mod stream;

use std::time::Duration;

/// HTTP/2 settings both sides use (ztunnel's values).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
