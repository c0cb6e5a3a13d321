//! Hitless upgrade: a new agent takes over the running agent's listening sockets.
//!
//! The running agent listens on a unix SEQPACKET socket (`upgradeSocket`, mode 0600). A new agent
//! for the same node connects, says hello, and receives with SCM_RIGHTS every listener the old one
//! accepts on: the node's (metrics, readiness, admin) and each pod's three. They are the same
//! kernel sockets, so connections waiting in their backlogs are not lost, and the eBPF maps (pinned,
//! shared by both generations) keep pointing at them. The new agent attaches its programs, then
//! says it is ready; only then does the old one stop accepting, drain its own connections and
//! exit. If the new agent goes away before that, the old one carries on as if nothing happened.
//!
//! The old agent also hands over its workloads' certificates with their keys: the keys exist only
//! in memory, and without them the new agent would have to ask the signer for every one again
//! before it could serve HBONE (and could not, with the signer down).
//!
//! The exchange is a handful of small messages on a local socket, so it uses blocking calls with
//! timeouts.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt::Timeout,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::proxy::LISTENERS_PER_FAMILY;

/// Bumped when the messages below change; agents of different versions refuse each other.
const PROTOCOL_VERSION: u32 = 1;
/// Every fd-carrying message holds at most this many descriptors (a pod's six listeners).
const MAX_FDS_PER_MESSAGE: usize = 2 * LISTENERS_PER_FAMILY;
/// Room for a certificate chain and its key as PEM.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long one send or receive of the exchange may block.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Message {
    /// New -> old: who asks.
    Hello {
        version: u32,
        node: String,
        /// Takes IPv6 listener sets. Agents from before IPv6 do not send it (and ignore it), so
        /// an agent rolled back to one gets the IPv4 sets only, which is all it serves.
        #[serde(default)]
        ipv6_listeners: bool,
        /// Takes the workloads' certificates (agents from before do not, and would refuse the
        /// messages).
        #[serde(default)]
        certificates: bool,
    },
    /// Old -> new: no handover (wrong node or version).
    Refused { reason: String },
    /// Old -> new, with one listener.
    NodeListener { name: String },
    /// Old -> new, with the pod's outbound, inbound plaintext and HBONE listeners, in that order,
    /// for IPv4, then for IPv6 if the pod has them and the new agent takes them.
    PodListeners { netns_cookie: u64 },
    /// Old -> new: a workload's certificate chain and key, PEM.
    Certificate { chain: String, key: SecretPem },
    /// Old -> new: that was all.
    End,
    /// New -> old: capture and listeners are taken over; stop accepting.
    Ready,
}

/// A private key: kept out of `Debug` output (and so out of error messages).
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretPem(pub String);

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<private key>")
    }
}

/// The node-level listeners an agent hands over, by name.
pub const METRICS: &str = "metrics";
pub const READINESS: &str = "readiness";
pub const ADMIN: &str = "admin";

/// A pod's listeners: outbound, inbound plaintext, HBONE, for IPv4 and then maybe IPv6.
pub type PodFds<T> = Vec<T>;

/// Everything a running agent listens on, borrowed for handing over.
#[derive(Default)]
pub struct Offer<'a> {
    pub node: Vec<(&'static str, BorrowedFd<'a>)>,
    pub pods: Vec<(u64, PodFds<BorrowedFd<'a>>)>,
    /// The workloads' certificates: chain and key, PEM.
    pub certificates: Vec<(String, SecretPem)>,
}

/// Listeners to adopt instead of binding new ones: received from the agent this one upgrades, or
/// kept from a pod being captured again.
#[derive(Debug, Default)]
pub struct Inherited {
    node: HashMap<String, OwnedFd>,
    pods: HashMap<u64, PodFds<OwnedFd>>,
    /// The previous agent's workload certificates: chain and key, PEM.
    pub certificates: Vec<(String, SecretPem)>,
}

impl Inherited {
    pub fn take_node(&mut self, name: &str) -> Option<OwnedFd> {
        self.node.remove(name)
    }

    pub fn take_pod(&mut self, netns_cookie: u64) -> Option<PodFds<OwnedFd>> {
        self.pods.remove(&netns_cookie)
    }

    pub fn pods(&self) -> usize {
        self.pods.len()
    }

    /// Keeps a pod's listeners for the next capture of the same netns (a pod captured again).
    pub fn keep_pod(&mut self, netns_cookie: u64, fds: PodFds<OwnedFd>) {
        self.pods.insert(netns_cookie, fds);
    }
}

/// The new agent's side of a handover in progress.
pub struct Takeover {
    conn: OwnedFd,
    pub inherited: Inherited,
}

/// Asks the agent listening on `path` (if any) for its listeners. `Ok(None)`: no agent runs, a
/// normal start.
pub fn request(path: &Path, node: &str) -> io::Result<Option<Takeover>> {
    let conn = seqpacket(SocketFlags::CLOEXEC)?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&conn, &addr) {
        Ok(()) => {}
        // No socket, or one a dead agent left behind.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    set_timeouts(&conn)?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        node: node.to_owned(),
        ipv6_listeners: true,
        certificates: true,
    };
    send(&conn, &hello, &[])?;
    let mut inherited = Inherited::default();
    loop {
        let (message, fds) = receive(&conn)?;
        match message {
            Message::NodeListener { name } => {
                let fd = exactly::<1>(fds, &name)?;
                let [fd] = fd;
                inherited.node.insert(name, fd);
            }
            Message::PodListeners { netns_cookie } => {
                if fds.len() != LISTENERS_PER_FAMILY && fds.len() != 2 * LISTENERS_PER_FAMILY {
                    let problem = format!("pod netns {netns_cookie}: {} descriptors", fds.len());
                    return Err(protocol_error(problem));
                }
                inherited.pods.insert(netns_cookie, fds);
            }
            Message::Certificate { chain, key } => inherited.certificates.push((chain, key)),
            Message::End => return Ok(Some(Takeover { conn, inherited })),
            Message::Refused { reason } => {
                return Err(protocol_error(format!("the running agent refused the handover: {reason}")));
            }
            other => return Err(protocol_error(format!("unexpected {other:?}"))),
        }
    }
}

impl Takeover {
    /// Tells the old agent to stop accepting: from now on this agent serves every new connection.
    pub fn confirm(self) -> io::Result<()> {
        send(&self.conn, &Message::Ready, &[])
    }
}

/// The running agent's side: where new agents ask for its listeners.
pub struct UpgradeListener {
    socket: AsyncFd<OwnedFd>,
}

/// A new agent that asked for the listeners and got them.
pub struct Successor {
    conn: OwnedFd,
}

impl UpgradeListener {
    /// Binds `path` (replacing whatever file is there), mode 0600.
    pub fn bind(path: &Path) -> io::Result<UpgradeListener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let socket = seqpacket(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)?;
        rustix::net::bind(&socket, &SocketAddrUnix::new(path)?)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        rustix::net::listen(&socket, 4)?;
        // SAFETY: the AsyncFd owns the socket, so the fd stays open as long as it is registered.
        let socket = unsafe { AsyncFd::register(socket) }?;
        Ok(UpgradeListener { socket })
    }

    /// Waits for a new agent to connect.
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut ready = self.socket.readable().await?;
            match ready.try_io(|s| Ok(rustix::net::accept_with(s.get_ref(), SocketFlags::CLOEXEC)?)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads the new agent's hello and, if it is for `node`, sends `offer`. The old agent keeps
/// accepting meanwhile: both may accept from the same sockets until [`Successor::ready`].
pub fn offer(conn: OwnedFd, node: &str, offer: &Offer<'_>) -> io::Result<Successor> {
    set_timeouts(&conn)?;
    let (hello, _) = receive(&conn)?;
    let refusal = match &hello {
        Message::Hello { version, .. } if *version != PROTOCOL_VERSION => {
            Some(format!("protocol version {version}, this agent speaks {PROTOCOL_VERSION}"))
        }
        Message::Hello { node: asker, .. } if asker != node => {
            Some(format!("this agent serves node {node}, not {asker}"))
        }
        Message::Hello { .. } => None,
        other => Some(format!("expected hello, got {other:?}")),
    };
    if let Some(reason) = refusal {
        let _ = send(&conn, &Message::Refused { reason: reason.clone() }, &[]);
        return Err(protocol_error(reason));
    }
    let takes_ipv6 = matches!(hello, Message::Hello { ipv6_listeners: true, .. });
    let takes_certificates = matches!(hello, Message::Hello { certificates: true, .. });
    for (name, fd) in &offer.node {
        send(&conn, &Message::NodeListener { name: (*name).to_owned() }, &[*fd])?;
    }
    for (netns_cookie, fds) in &offer.pods {
        let fds = if takes_ipv6 { fds } else { &fds[..fds.len().min(LISTENERS_PER_FAMILY)] };
        send(&conn, &Message::PodListeners { netns_cookie: *netns_cookie }, fds)?;
    }
    if takes_certificates {
        for (chain, key) in &offer.certificates {
            let certificate = Message::Certificate { chain: chain.clone(), key: SecretPem(key.0.clone()) };
            send(&conn, &certificate, &[])?;
        }
    }
    send(&conn, &Message::End, &[])?;
    Ok(Successor { conn })
}

impl Successor {
    /// Blocks until the new agent is ready (`Ok`), or gone or silent for `timeout` (`Err`).
    pub fn ready(self, timeout: Duration) -> io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(&self.conn, Timeout::Recv, Some(timeout))?;
        match receive(&self.conn)?.0 {
            Message::Ready => Ok(()),
            other => Err(protocol_error(format!("expected ready, got {other:?}"))),
        }
    }
}

fn seqpacket(flags: SocketFlags) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)?)
}

fn set_timeouts(conn: &OwnedFd) -> io::Result<()> {
    rustix::net::sockopt::set_socket_timeout(conn, Timeout::Recv, Some(STEP_TIMEOUT))?;
    rustix::net::sockopt::set_socket_timeout(conn, Timeout::Send, Some(STEP_TIMEOUT))?;
    Ok(())
}

fn send(conn: &OwnedFd, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(protocol_error(format!("{} descriptors do not fit one message", fds.len())));
    }
    rustix::net::sendmsg(conn.as_fd(), &[IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

fn receive(conn: &OwnedFd) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut bytes = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent closed the connection"));
    }
    if received.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
        return Err(protocol_error("message or descriptors truncated".into()));
    }
    let message = serde_json::from_slice(&bytes[..received.bytes])
        .map_err(|e| protocol_error(format!("bad message: {e}")))?;
    Ok((message, fds))
}

fn exactly<const N: usize>(fds: Vec<OwnedFd>, what: &str) -> io::Result<[OwnedFd; N]> {
    let count = fds.len();
    fds.try_into().map_err(|_| protocol_error(format!("{what}: expected {N} descriptors, got {count}")))
}

fn protocol_error(problem: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("upgrade handover: {problem}"))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// The whole exchange over a real socket pair of processes-in-miniature: the listeners
    /// arrive as the same sockets (same local address), and a wrong node is refused.
    #[tokio::test]
    async fn listeners_cross_and_wrong_node_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-upgrade-test-{}", std::process::id()));
        let path = dir.join("upgrade.sock");
        let listener = UpgradeListener::bind(&path).unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
        // An IPv4 and an IPv6 set.
        let pod: Vec<TcpListener> = (0..6).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();

        let asker = std::thread::spawn({
            let path = path.clone();
            move || {
                let takeover = request(&path, "node-a").unwrap().expect("an agent listens");
                let refused = request(&path, "node-b").map(|_| ()).unwrap_err();
                (takeover, refused)
            }
        });
        let conn = listener.accept().await.unwrap();
        let offered = Offer {
            node: vec![(METRICS, metrics.as_fd())],
            pods: vec![(7, pod.iter().map(|l| l.as_fd()).collect())],
            certificates: vec![("CHAIN".into(), SecretPem("KEY".into()))],
        };
        let successor = offer(conn, "node-a", &offered).unwrap();
        let conn = listener.accept().await.unwrap();
        let wrong = offer(conn, "node-a", &Offer::default()).map(|_| ()).unwrap_err();
        assert!(wrong.to_string().contains("not node-b"), "{wrong}");

        let (mut takeover, refused) = asker.join().unwrap();
        assert!(refused.to_string().contains("serves node node-a"), "{refused}");
        let got = TcpListener::from(takeover.inherited.take_node(METRICS).unwrap());
        assert_eq!(got.local_addr().unwrap(), metrics.local_addr().unwrap());
        let got = takeover.inherited.take_pod(7).unwrap().into_iter().map(TcpListener::from);
        let addrs: Vec<_> = got.map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(addrs, pod.iter().map(|l| l.local_addr().unwrap()).collect::<Vec<_>>());
        let certificates: Vec<_> =
            takeover.inherited.certificates.iter().map(|(c, k)| (c.as_str(), k.0.as_str())).collect();
        assert_eq!(certificates, [("CHAIN", "KEY")]);
        let message = Message::Certificate { chain: "CHAIN".into(), key: SecretPem("KEY".into()) };
        assert!(!format!("{message:?}").contains("KEY"), "a key in Debug output: {message:?}");
        takeover.confirm().unwrap();
        successor.ready(Duration::from_secs(5)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An agent from before IPv6 and certificate handover (its hello without `ipv6_listeners`
    /// and `certificates`) gets each pod's IPv4 set only, and no certificate message it would
    /// refuse: a rollback is a handover too.
    #[tokio::test]
    async fn an_agent_from_before_ipv6_gets_the_ipv4_listeners_and_no_certificates() {
        let dir = std::env::temp_dir().join(format!("ferry-upgrade-v4-{}", std::process::id()));
        let path = dir.join("upgrade.sock");
        let listener = UpgradeListener::bind(&path).unwrap();
        let pod: Vec<TcpListener> = (0..6).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let asker = std::thread::spawn({
            let path = path.clone();
            move || {
                let conn = seqpacket(SocketFlags::CLOEXEC).unwrap();
                rustix::net::connect(&conn, &SocketAddrUnix::new(&path).unwrap()).unwrap();
                let hello = br#"{"type":"hello","version":1,"node":"node-a"}"#;
                rustix::net::send(&conn, hello, SendFlags::empty()).unwrap();
                let mut received = Vec::new();
                loop {
                    match receive(&conn).unwrap() {
                        (Message::End, _) => return received,
                        (message, fds) => received.push((format!("{message:?}"), fds.len())),
                    }
                }
            }
        });
        let conn = listener.accept().await.unwrap();
        let offered = Offer {
            node: vec![],
            pods: vec![(7, pod.iter().map(|l| l.as_fd()).collect())],
            certificates: vec![("CHAIN".into(), SecretPem("KEY".into()))],
        };
        let _successor = offer(conn, "node-a", &offered).unwrap();
        assert_eq!(asker.join().unwrap(), [("PodListeners { netns_cookie: 7 }".to_owned(), 3)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_running_agent_is_a_normal_start() {
        let path = std::env::temp_dir().join(format!("ferry-upgrade-none-{}.sock", std::process::id()));
        assert!(request(&path, "node-a").unwrap().is_none());
    }
}
