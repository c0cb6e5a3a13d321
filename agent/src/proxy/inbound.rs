//! Inbound: connections for a meshed pod, delivered to its app from inside its netns.
//! Plaintext (15006) is here; HBONE (15008) is in [`super::hbone::server`].

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use super::{
    LocalPod, Proxy, is_proxy_port,
    relay::{Abort, Flow},
};
use crate::{
    policy::Verdict,
    telemetry::{Direction, FailureReason},
};

/// 15006: plaintext connections steered here by sk_lookup; the socket's local address is the
/// destination the client asked for. Denied connections are reset before the app sees a byte.
pub(super) async fn handle_plaintext(proxy: Proxy, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let telemetry = &proxy.inner.telemetry;
    let dst = client.local_addr().unwrap_or(peer);
    let source = proxy.inner.state.load().workload_by_ip(peer.ip()).cloned();
    let mut flow = Flow::new(Direction::Inbound, "plaintext", peer, dst)
        .source(source, None)
        .destination(Some(pod.workload.clone()), Some(pod.identity.clone()));
    if is_proxy_port(dst.port()) {
        return flow.reset(&client, telemetry, FailureReason::Recursion, &"destination is a proxy port");
    }
    let decision = proxy.authorize(&pod, &mut flow, peer.ip());
    if decision.verdict == Verdict::Deny {
        client.abort();
        return flow.deny(telemetry, &decision);
    }
    match deliver(&pod, dst, proxy.inner.limits.connect_timeout).await {
        Ok(app) => flow.relay_tcp(client, app, &proxy).await,
        Err(e) => flow.reset(&client, telemetry, FailureReason::Connect, &e),
    }
}

/// Connects to the app from inside its pod, marked so capture leaves it alone. The destination
/// is the pod's own address, which sk_lookup treats as local and does not steer again.
pub(super) async fn deliver(pod: &LocalPod, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    pod.netns.connect(dst, timeout).await
}

/// This node's own addresses, those of the agent's netns (the host's), where the kubelet's
/// probes come from. Read again on a miss, at most once per [`NodeAddresses::REREAD`], so an
/// address added later is found without a read per connection.
pub(super) struct NodeAddresses {
    known: Mutex<(HashSet<IpAddr>, Instant)>,
}

impl NodeAddresses {
    const REREAD: Duration = Duration::from_secs(1);

    pub(super) fn read() -> NodeAddresses {
        NodeAddresses { known: Mutex::new((interface_addresses(), Instant::now())) }
    }

    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if !known.0.contains(&ip) && known.1.elapsed() >= Self::REREAD {
            *known = (interface_addresses(), Instant::now());
        }
        known.0.contains(&ip)
    }
}

/// The addresses of the calling thread's netns. Proxy threads enter pods' netns only around
/// creating a socket, so here that is the agent's.
fn interface_addresses() -> HashSet<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces
            .filter_map(|interface| interface.address)
            .filter_map(|address| {
                let v4 = address.as_sockaddr_in().map(|a| IpAddr::V4(a.ip()));
                v4.or_else(|| address.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
            })
            .collect(),
        Err(e) => {
            tracing::warn!("reading this node's addresses: {e}; node traffic gets no exemption");
            HashSet::new()
        }
    }
}

/// Whether a process on the node opened this connection: a TCP socket from `src` to `dst`
/// exists in the calling thread's netns (the agent's, the host's). The kubelet's probes have one;
/// traffic the node only forwards, masqueraded to its own address, has none. One exact
/// `SOCK_DIAG_BY_FAMILY` lookup, as `ss` makes; a listener that happens to match does not count.
pub(super) fn opened_on_node(src: SocketAddr, dst: SocketAddr) -> io::Result<bool> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const TCP_LISTEN: u8 = 10;
    const HEADER: usize = 16;

    // Addresses as inet_diag_sockid holds them: sixteen bytes, an IPv4 one in the first four.
    let (family, src_ip, dst_ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let padded = |ip: std::net::Ipv4Addr| {
                let mut bytes = [0; 16];
                bytes[..4].copy_from_slice(&ip.octets());
                bytes
            };
            (libc::AF_INET, padded(s), padded(d))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => (libc::AF_INET6, s.octets(), d.octets()),
        _ => return Ok(false),
    };
    // nlmsghdr, then inet_diag_req_v2 whose socket id names the node's end as the source.
    let mut request = Vec::with_capacity(HEADER + 56);
    request.extend_from_slice(&((HEADER + 56) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&[0; 8]); // sequence number, port id
    request.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    request.extend_from_slice(&src.port().to_be_bytes());
    request.extend_from_slice(&dst.port().to_be_bytes());
    request.extend_from_slice(&src_ip);
    request.extend_from_slice(&dst_ip);
    request.extend_from_slice(&[0; 4]); // any interface
    request.extend_from_slice(&[0xff; 8]); // no cookie
    let netlink = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    sendto(netlink.as_raw_fd(), &request, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut answer = [0u8; 512];
    let n = recv(netlink.as_raw_fd(), &mut answer, MsgFlags::empty())?;
    if n < HEADER + 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer"));
    }
    match u16::from_ne_bytes([answer[4], answer[5]]) {
        // The payload is inet_diag_msg: family, then state.
        SOCK_DIAG_BY_FAMILY => Ok(answer[HEADER + 1] != TCP_LISTEN),
        NLMSG_ERROR => match -i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]) {
            libc::ENOENT => Ok(false),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag answered type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_opened_here_is_found_and_a_listener_is_not() {
        for (loopback, other) in [("127.0.0.1:0", "127.0.0.2:9"), ("[::1]:0", "[::2]:9")] {
            let listener = std::net::TcpListener::bind(loopback).unwrap();
            let server = listener.local_addr().unwrap();
            let client = std::net::TcpStream::connect(server).unwrap();
            let local = client.local_addr().unwrap();
            assert!(opened_on_node(local, server).unwrap(), "{local} -> {server}");
            // No socket from another port to the server.
            assert!(!opened_on_node(SocketAddr::new(local.ip(), 1), server).unwrap());
            // The kernel's lookup also finds a listener on the source address: not a connection.
            assert!(!opened_on_node(server, other.parse().unwrap()).unwrap());
        }
    }
}
