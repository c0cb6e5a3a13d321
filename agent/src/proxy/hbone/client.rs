//! Outbound HBONE: mTLS + HTTP/2 to the destination pod's 15008, one CONNECT stream per app
//! connection, over pooled connections.
//!
//! Pool rules (hbone.md): one pool entry per (source identity, destination identity, source IP,
//! destination IP:15008); a connection carries up to 100 streams; one dial per key at a time;
//! idle connections are released after 5 minutes.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::StatusCode;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    Undelivered,
    stream::{H2Stream, keep_alive, read_buf},
    window::WindowFollower,
};
use crate::{
    identity::{CertManager, IdentityError, Issued, SpiffeId, tls},
    inpod::PodNetns,
    telemetry::{FailureReason, ProxyMetrics, Side},
};

const MAX_STREAMS_PER_CONNECTION: usize = 100;
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) source: SpiffeId,
    pub(crate) destination: SpiffeId,
    pub(crate) source_ip: IpAddr,
    /// The destination pod's HBONE address, ip:15008.
    pub(crate) hbone_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("dialing {0}: {1}")]
    Dial(SocketAddr, io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, io::Error),
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("HTTP/2: {0}")]
    Http(#[from] h2::Error),
    #[error("CONNECT refused with {0}")]
    Status(StatusCode),
    #[error("no answer to the CONNECT from {0} within {1:?}")]
    Unanswered(SocketAddr, Duration),
    #[error("reading the app's connection: {0}")]
    Client(io::Error),
}

impl TunnelError {
    pub(crate) fn reason(&self) -> FailureReason {
        match self {
            TunnelError::Tls(_, e) if e.to_string().contains(tls::IDENTITY_MISMATCH) => {
                FailureReason::Identity
            }
            TunnelError::Tls(..) | TunnelError::HandshakeTimeout(_) => FailureReason::TlsHandshake,
            TunnelError::Identity(_) => FailureReason::Identity,
            TunnelError::Dial(..) | TunnelError::Http(_) | TunnelError::Unanswered(..) => {
                FailureReason::Connect
            }
            TunnelError::Status(_) => FailureReason::Rejected,
            TunnelError::Client(_) => FailureReason::Relay,
        }
    }

    /// Whether the destination failed us (and a balancer should pass over it for a while), not
    /// the app's own connection.
    pub(crate) fn blames_destination(&self) -> bool {
        !matches!(self, TunnelError::Client(_))
    }
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    /// The connection's task has ended (closed by either side, or its pings went unanswered).
    closed: Arc<AtomicBool>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The peer sent GOAWAY (it drains, e.g. its agent is being upgraded): open streams go on,
    /// new ones go to a new connection.
    going_away: AtomicBool,
    /// The source's certificate it was made with and the roots its peer was verified against
    /// ([`CertManager::trust_changes`]): once either is replaced, new streams go to a new
    /// connection and this one closes when its last stream ends.
    issued: Arc<Issued>,
    trust: u64,
}

impl PooledConnection {
    fn current(&self, issued: Option<&Arc<Issued>>, trust: u64) -> bool {
        self.trust == trust && issued.is_some_and(|issued| Arc::ptr_eq(issued, &self.issued))
    }
}

/// Holds one stream's place on its connection until dropped.
pub(crate) struct StreamSlot(Arc<PooledConnection>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// An established CONNECT stream: the app's bytes go in and out of `io`; `slot` holds the
/// stream's place on its pooled connection and must live as long.
pub(crate) struct HboneStream {
    pub(crate) io: H2Stream,
    pub(crate) slot: StreamSlot,
}

pub(crate) struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<PooledConnection>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    /// Decides the stream window the connections grant.
    undelivered: Arc<Undelivered>,
}

impl Pool {
    pub(crate) fn new(
        connect_timeout: Duration,
        handshake_timeout: Duration,
        undelivered: Arc<Undelivered>,
    ) -> Pool {
        Pool {
            connections: Mutex::default(),
            dialing: Mutex::default(),
            connect_timeout,
            handshake_timeout,
            undelivered,
        }
    }

    /// Opens a CONNECT stream for `request` to the key's destination, dialing if no pooled
    /// connection has room. What `client` sends meanwhile goes out behind the request (see
    /// [`EarlyData`]).
    pub(crate) async fn connect(
        &self,
        key: &PoolKey,
        netns: &PodNetns,
        certs: &Arc<CertManager>,
        metrics: &ProxyMetrics,
        request: http::Request<()>,
        client: &mut TcpStream,
    ) -> Result<HboneStream, TunnelError> {
        let mut early = EarlyData::default();
        let mut slot = self.checkout(key, netns, certs, metrics).await?;
        let mut sent = self.send(key, &slot, &request, client, &mut early).await;
        if let Err(TunnelError::Http(e)) = &sent
            && unprocessed(e)
        {
            // The connection is going away and the peer never saw this stream: safe to send
            // again, early data included, on a connection that is not.
            slot.0.going_away.store(true, Ordering::Release);
            slot = self.checkout(key, netns, certs, metrics).await?;
            sent = self.send(key, &slot, &request, client, &mut early).await;
        }
        let (response, send_stream) = sent?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Status(response.status()));
        }
        let io = H2Stream::new(send_stream, response.into_body(), early.len() as u64);
        Ok(HboneStream { io, slot })
    }

    /// [`send`], bounded by the connect timeout: the answer is the peer's own connect to the app,
    /// which a peer bounds the same way. A peer that keeps its connection alive (it answers pings)
    /// but never answers the stream would otherwise hold the app's connection for ever; dropping
    /// the stream resets it (RST_STREAM CANCEL).
    async fn send(
        &self,
        key: &PoolKey,
        slot: &StreamSlot,
        request: &http::Request<()>,
        client: &mut TcpStream,
        early: &mut EarlyData,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), TunnelError> {
        tokio::time::timeout(self.connect_timeout, send(slot, request, client, early))
            .await
            .unwrap_or_else(|_| Err(TunnelError::Unanswered(key.hbone_addr, self.connect_timeout)))
    }

    async fn checkout(
        &self,
        key: &PoolKey,
        netns: &PodNetns,
        certs: &Arc<CertManager>,
        metrics: &ProxyMetrics,
    ) -> Result<StreamSlot, TunnelError> {
        if let Some(slot) = self.reuse(key, certs) {
            return Ok(slot);
        }
        let no_certificate = || IdentityError::NoCertificate(key.source.clone());
        // A pod captured moments ago may still be waiting for its first certificate. Waited for
        // before the dial lock, so that connections queued behind it do not wait one after another.
        certs.wait_for(&key.source, self.connect_timeout).await.ok_or_else(no_certificate)?;
        let dial_lock =
            self.dialing.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        let _dialing = dial_lock.lock().await;
        // Whoever held the lock before may have dialed a connection with room for us.
        if let Some(slot) = self.reuse(key, certs) {
            return Ok(slot);
        }
        // Read before the handshake: a change during it retires this connection at once.
        let trust = certs.trust_generation();
        let issued = certs.current(&key.source).ok_or_else(no_certificate)?;
        let window = self.undelivered.follow();
        let (sender, closed) =
            dial(key, netns, certs, &issued, self.connect_timeout, self.handshake_timeout, window).await?;
        metrics.hbone_connection(Side::Client);
        let connection = Arc::new(PooledConnection {
            sender,
            closed,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            going_away: AtomicBool::new(false),
            issued,
            trust,
        });
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(connection.clone());
        Ok(StreamSlot(connection))
    }

    fn reuse(&self, key: &PoolKey, certs: &CertManager) -> Option<StreamSlot> {
        let (issued, trust) = (certs.current(&key.source), certs.trust_generation());
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let list = connections.get_mut(key)?;
        // A retired connection leaves the pool once no stream uses it.
        list.retain(|c| {
            !c.closed.load(Ordering::Acquire)
                && (c.current(issued.as_ref(), trust) || c.active.load(Ordering::Acquire) > 0)
        });
        // Increments happen only under the pool lock, so the limit holds.
        let connection = list.iter().find(|c| {
            c.current(issued.as_ref(), trust)
                && !c.going_away.load(Ordering::Acquire)
                && c.active.load(Ordering::Acquire) < MAX_STREAMS_PER_CONNECTION
        })?;
        connection.active.fetch_add(1, Ordering::AcqRel);
        Some(StreamSlot(connection.clone()))
    }

    /// Releases connections idle for longer than the idle timeout, forever.
    pub(crate) async fn release_idle(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let now = Instant::now();
            let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            for list in connections.values_mut() {
                list.retain(|c| {
                    let idle = c.active.load(Ordering::Acquire) == 0
                        && now.duration_since(*c.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
                            > IDLE_TIMEOUT;
                    !idle && !c.closed.load(Ordering::Acquire)
                });
            }
            connections.retain(|_, list| !list.is_empty());
            self.dialing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, lock| Arc::strong_count(lock) > 1);
        }
    }
}

/// What the client sends while its CONNECT waits for an answer (a request, a TLS ClientHello):
/// sent at once behind the request, so the destination has it a round trip earlier, and kept
/// (shared, not copied) to send again if the stream must be retried on another connection.
#[derive(Default)]
struct EarlyData {
    chunks: Vec<Bytes>,
    /// The client half-closed; the relay sees that again on its first read.
    ended: bool,
}

impl EarlyData {
    fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }
}

/// Bounds what is kept for a retry; more waits in the client's socket for the answer.
const EARLY_DATA_LIMIT: usize = 64 * 1024;

/// Sends the CONNECT and the early data on the slot's connection; returns the response and the
/// stream to write to.
async fn send(
    slot: &StreamSlot,
    request: &http::Request<()>,
    client: &mut TcpStream,
    early: &mut EarlyData,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), TunnelError> {
    let mut sender = slot.0.sender.clone().ready().await?;
    let (response, mut send_stream) = sender.send_request(copy(request), false)?;
    for chunk in &early.chunks {
        send_stream.send_data(chunk.clone(), false)?;
    }
    tokio::pin!(response);
    let mut buf = BytesMut::new();
    let (mut client, _) = client.split();
    loop {
        let room = EARLY_DATA_LIMIT - early.len();
        tokio::select! {
            biased;
            response = &mut response => return Ok((response?, send_stream)),
            read = read_buf(&mut client, &mut buf, room), if room > 0 && !early.ended => {
                match read.map_err(TunnelError::Client)?.len {
                    0 => early.ended = true,
                    n => {
                        let chunk = buf.split_to(n).freeze();
                        send_stream.send_data(chunk.clone(), false)?;
                        early.chunks.push(chunk);
                    }
                }
            }
        }
    }
}

/// The CONNECT request again (requests are not `Clone`; a retry sends it again).
fn copy(request: &http::Request<()>) -> http::Request<()> {
    let mut copy = http::Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether a failed request is known not to have reached the peer's application: refused by the
/// peer's GOAWAY (streams above its last stream id) or with REFUSED_STREAM.
fn unprocessed(error: &h2::Error) -> bool {
    error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// TCP from inside the source pod (marked), mTLS with `issued`, HTTP/2 handshake. The
/// connection runs on its own task, which sets the returned flag when it ends.
async fn dial(
    key: &PoolKey,
    netns: &PodNetns,
    certs: &CertManager,
    issued: &Issued,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    mut window: WindowFollower,
) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), TunnelError> {
    let addr = key.hbone_addr;
    let tcp = netns.connect(addr, connect_timeout).await.map_err(|e| TunnelError::Dial(addr, e))?;
    let _ = socket2::SockRef::from(&tcp).set_keepalive(true);
    let config = tls::client_config(certs, issued, key.destination.clone())?;
    let handshake = TlsConnector::from(config).connect(tls::server_name(addr.ip()), super::buffered(tcp));
    let tls = tokio::time::timeout(handshake_timeout, handshake)
        .await
        .map_err(|_| TunnelError::HandshakeTimeout(addr))?
        .map_err(|e| TunnelError::Tls(addr, e))?;
    let (sender, mut connection) =
        hbone_h2_settings!(h2::client::Builder::new(), window.granted()).handshake(tls).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping_pong = connection.ping_pong();
    let ended = closed.clone();
    tokio::spawn(async move {
        let pinged = async {
            match ping_pong {
                Some(ping_pong) => keep_alive(ping_pong).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(pinged);
        loop {
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!("HBONE connection to {addr} ended: {e}");
                    }
                    break;
                }
                () = &mut pinged => break tracing::debug!("HBONE connection to {addr}: pings unanswered, closing"),
                size = window.changed() => window.announced(size, connection.set_initial_window_size(size)),
            }
        }
        ended.store(true, Ordering::Release);
    });
    Ok((sender, closed))
}
