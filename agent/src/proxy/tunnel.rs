//! Node-to-node transport for meshed destinations on other nodes: an HBONE CONNECT stream to the
//! destination pod's 15008, authenticated as the source workload, expecting the destination's
//! identity.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use ferry_common::HBONE_PORT;

use super::{
    LocalPod, Proxy,
    hbone::{
        client::{HboneStream, PoolKey, TunnelError},
        proto,
    },
};
use crate::state::Workload;

/// Opens the stream for the app's connection `downstream` (from `client`) to `target`.
pub(super) async fn connect(
    proxy: &Proxy,
    source: &LocalPod,
    client: SocketAddr,
    target: SocketAddr,
    destination: &Workload,
    service_host: Option<&str>,
    downstream: &mut TcpStream,
) -> Result<HboneStream, TunnelError> {
    let key = PoolKey {
        source: source.identity.clone(),
        destination: destination.identity(source.identity.trust_domain()),
        source_ip: client.ip(),
        hbone_addr: SocketAddr::new(target.ip(), HBONE_PORT),
    };
    let request = proto::connect_request(
        target,
        client,
        service_host,
        &source.workload,
        rand::random(),
        rand::random(),
    );
    let inner = &proxy.inner;
    inner.pool.connect(&key, &source.netns, &inner.certs, &inner.telemetry.proxy, request, downstream).await
}
