//! Node-to-node transport for meshed destinations on other nodes.
//!
//! Plain TCP from the source pod's netns to the destination pod's address: the destination node's
//! datapath steers it to that pod's inbound listener (15006). HBONE over mTLS replaces this.

use std::{io, net::SocketAddr};

use tokio::net::TcpStream;

use super::LocalPod;

pub(super) async fn connect(source: &LocalPod, dst: SocketAddr) -> io::Result<TcpStream> {
    source.netns.connect(dst).await
}
