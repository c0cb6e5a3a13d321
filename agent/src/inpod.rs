//! Sockets inside pod network namespaces.
//!
//! The agent stays in the node's netns. A socket keeps the netns it was created in, so to listen or
//! connect *as the pod* the creating thread briefly enters the pod's netns with `setns(2)`, makes
//! the socket, and returns before doing anything else. Everything after creation (bind, connect,
//! accept) happens on ordinary tokio sockets.

use std::{
    fs::File,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
    sync::OnceLock,
    time::Duration,
};

use ferry_common::AGENT_MARK;
use socket2::{Domain, Protocol, Socket, Type};

/// `SO_NETNS_COOKIE` (not yet in every libc crate release).
const SO_NETNS_COOKIE: libc::c_int = 71;
const LISTEN_BACKLOG: i32 = 1024;

/// An open handle on a pod's network namespace and its kernel cookie.
#[derive(Debug)]
pub struct PodNetns {
    file: File,
    cookie: u64,
}

impl PodNetns {
    /// Opens a netns file (e.g. /run/netns/NAME or /proc/PID/ns/net) and reads its cookie. The
    /// agent's own netns is refused: capturing it would capture the node itself (its inbound
    /// connections steered, its own listeners on the node's address).
    pub fn open(path: &Path) -> io::Result<PodNetns> {
        let file = File::open(path)?;
        let cookie = cookie_of(file.as_fd())?;
        if cookie == cookie_of(home_netns().as_fd())? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is the agent's own network namespace, the node's (a hostNetwork pod?): not captured",
            ));
        }
        Ok(PodNetns { file, cookie })
    }

    /// The kernel's identifier of this netns, as `bpf_get_netns_cookie()` sees it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A non-blocking listener bound inside this netns.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = in_netns(self.as_fd(), || new_tcp_socket(addr))?;
        // Says which port: the pod's own app may hold one of the agent's.
        let listener =
            listen_on(socket, addr).map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// Connects from inside this netns, with the agent's mark so capture ignores it. Gives up
    /// after `timeout`: a destination that drops SYNs would otherwise hold the app, whose own
    /// connect already succeeded (to the agent), for the kernel's SYN retries, about two minutes.
    pub async fn connect(&self, dst: SocketAddr, timeout: Duration) -> io::Result<tokio::net::TcpStream> {
        let socket = in_netns(self.as_fd(), || new_tcp_socket(dst))?;
        socket.set_mark(AGENT_MARK)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&dst.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
            _ => {}
        }
        let stream = tokio::net::TcpStream::from_std(socket.into())?;
        tokio::time::timeout(timeout, connected(stream)).await.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {dst} within {timeout:?}")))
        })
    }
}

/// Waits for a non-blocking connect to finish: the stream, or why it failed.
async fn connected(stream: tokio::net::TcpStream) -> io::Result<tokio::net::TcpStream> {
    stream.writable().await?;
    let socket = socket2::SockRef::from(&stream);
    if socket.peer_addr().is_ok() {
        return Ok(stream);
    }
    // Not connected, or no longer: established, then reset before we looked (a server that speaks
    // first, then fails) leaves what it sent queued ahead of the reset, which the relay passes
    // on in order. Else reading gives the error (refused, reset).
    match socket.peek(&mut [MaybeUninit::uninit()]) {
        Ok(n) if n > 0 => Ok(stream),
        Ok(_) => Err(io::ErrorKind::NotConnected.into()),
        Err(e) => Err(e),
    }
}

/// Binds `socket` to `addr` and listens. TCP_NODELAY is set on the listener because accepted
/// sockets inherit it: no `setsockopt` per accepted connection.
fn listen_on(socket: Socket, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Beside the IPv4 listener on the same port, not in its way.
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Non-blocking, and close-on-exec from the start (socket2 asks `socket(2)` for `SOCK_CLOEXEC`).
fn new_tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

fn cookie_of(netns: BorrowedFd<'_>) -> io::Result<u64> {
    let probe = in_netns(netns, || Socket::new(Domain::IPV4, Type::STREAM, None))?;
    netns_cookie(&probe)
}

fn netns_cookie(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The netns the agent lives in, opened once before any thread moves.
fn home_netns() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").expect("cannot open the agent's own netns"))
}

/// Runs `f` on the current thread while it is inside `netns`, then returns to the agent's netns.
/// `f` must only create sockets: it must not block or yield.
fn in_netns<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = home_netns();
    setns(netns)?;
    let result = f();
    // A worker thread left in a pod's netns would open later sockets in the wrong pod: never go on.
    if let Err(e) = setns(home.as_fd()) {
        eprintln!("ferry: cannot return to the agent's netns: {e}; aborting");
        std::process::abort();
    }
    result
}

fn setns(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure the agent's own netns is recorded before threads start entering pods.
pub fn init() {
    home_netns();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sockets made in a pod must not leak into a process the agent executes (the hitless
    /// upgrade's successor gets its sockets explicitly), nor block a runtime worker.
    #[test]
    fn pod_sockets_are_close_on_exec_and_non_blocking() {
        let socket = new_tcp_socket("127.0.0.1:80".parse().unwrap()).unwrap();
        // SAFETY: plain fcntl queries on a valid fd.
        let (fd_flags, status_flags) = unsafe {
            (libc::fcntl(socket.as_raw_fd(), libc::F_GETFD), libc::fcntl(socket.as_raw_fd(), libc::F_GETFL))
        };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_ne!(status_flags & libc::O_NONBLOCK, 0);
    }

    /// The proxy relies on it: it does not set TCP_NODELAY on the connections it accepts.
    #[test]
    fn accepted_sockets_have_no_delay() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let listener = listen_on(new_tcp_socket(addr).unwrap(), addr).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
