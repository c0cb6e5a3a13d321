//! One CONNECT stream carrying one tunnelled connection: its bytes are the stream's DATA frames.
//! [`relay`] moves them between the stream and the kernel socket at the other end without a copy
//! of its own: bytes read from the socket are handed to h2 as they are, and received frames are
//! written to the socket from h2's buffers.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{Ping, PingPong, RecvStream, SendStream};
use tokio::{
    io::AsyncReadExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{PING_INTERVAL, PING_TIMEOUT, Undelivered};

/// Bytes read from the socket at once (and so the largest DATA frame queued) until a read fills
/// that much: then the connection is moving bulk and reads up to [`READ_BULK`], all that h2
/// takes of a stream at once, until a read takes less again. Fewer, larger reads and frames mean
/// fewer wake-ups on both agents (cross-node mTLS bulk +29%).
const READ_START: usize = 64 * 1024;
const READ_BULK: usize = super::SEND_BUFFER;
/// Small reads share one allocation; a fresh one is taken when less than this is left.
const READ_MIN: usize = 4 * 1024;

pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Sent with the request, before the relay started (the client's first bytes).
    sent_early: u64,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, sent_early: u64) -> H2Stream {
        H2Stream { send, recv, sent_early }
    }
}

fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

/// Relays both ways until both directions have ended; an end of stream is passed on as a
/// half-close (END_STREAM one way, FIN the other). Counts bytes as they move.
///
/// Resets follow hbone.md and RFC 9113 section 8.5: a peer's RST_STREAM with NO_ERROR or CANCEL
/// ends the stream both ways like an end of stream (ztunnel cancels streams it is done with), any
/// other reason is an error (the caller resets the socket); a failing socket (e.g. the app reset
/// its connection) resets the stream with CONNECT_ERROR, after what was read before the failure.
pub(crate) async fn relay(
    tcp: &mut TcpStream,
    stream: H2Stream,
    tcp_to_stream: &AtomicU64,
    stream_to_tcp: &AtomicU64,
    undelivered: &Undelivered,
) -> io::Result<()> {
    let H2Stream { send, mut recv, sent_early } = stream;
    let mut send = ResetUnlessDone { send, done: false };
    tcp_to_stream.fetch_add(sent_early, Ordering::Relaxed);
    let (mut reader, writer) = tcp.split();
    let relayed = async {
        let outbound = socket_to_stream(&mut reader, &mut send.send, tcp_to_stream);
        let inbound = stream_to_socket(&mut recv, &writer, stream_to_tcp, undelivered);
        tokio::pin!(outbound, inbound);
        let (mut sent_all, mut received_all) = (false, false);
        while !(sent_all && received_all) {
            tokio::select! {
                sent = &mut outbound, if !sent_all => match sent? {
                    Sent::Refused(Some(e)) if received_all && !cancelled_by_peer(&e) => return Err(io_error(e)),
                    // Otherwise the receiving half says how the stream ended, once it has written
                    // out what arrived before.
                    Sent::All | Sent::Refused(_) => sent_all = true,
                },
                received = &mut inbound, if !received_all => match received? {
                    StreamEnd::EndOfStream => received_all = true,
                    StreamEnd::Cancelled => return Ok(()),
                },
            }
        }
        Ok(())
    }
    .await;
    if relayed.is_err() {
        // DATA still queued in h2 would be dropped by the reset: let the connection's task write
        // it out first (one turn of the runtime; best effort, as a TCP reset is).
        tokio::task::yield_now().await;
    } else {
        send.done = true;
    }
    relayed
}

/// The stream's sending half, reset with CONNECT_ERROR when dropped before the relay ended well:
/// on an error, and when the relay is cut short (idle timeout, a policy that now denies the
/// connection), which h2 would pass on as CANCEL, an orderly end to ztunnel and to Ferry.
struct ResetUnlessDone {
    send: SendStream<Bytes>,
    done: bool,
}

impl Drop for ResetUnlessDone {
    fn drop(&mut self) {
        if !self.done {
            self.send.send_reset(h2::Reason::CONNECT_ERROR);
        }
    }
}

/// How the socket's side of the relay ended.
enum Sent {
    /// The socket's end, passed on as END_STREAM.
    All,
    /// The stream takes no more (reset by the peer, or its connection failed), with h2's error
    /// if it gave one.
    Refused(Option<h2::Error>),
}

/// How the stream's receiving side ended.
enum StreamEnd {
    /// END_STREAM: the peer's half-close.
    EndOfStream,
    /// RST_STREAM with NO_ERROR or CANCEL: the peer is done with the stream both ways.
    Cancelled,
}

/// Whether a stream error is the peer's orderly reset (hbone.md: RST_STREAM NO_ERROR or CANCEL
/// means EOF).
fn cancelled_by_peer(e: &h2::Error) -> bool {
    e.is_reset() && e.is_remote() && matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL))
}

/// Socket errors are errors; the stream's are [`Sent::Refused`].
///
/// While the app is quiet the stream holds neither a share of the connection's window nor a read
/// buffer: every stream reserves window before it reads, and what a stream reserved is taken
/// from the window all streams of the HBONE connection share. Kept by idle streams, it would be
/// lent to nobody (with the 16 MiB of ztunnel's window, sixteen streams that had moved bulk held
/// all of it and stalled the rest); a buffer kept would hold 1 MiB of memory per such stream.
async fn socket_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    moved: &AtomicU64,
) -> io::Result<Sent> {
    let mut buf = BytesMut::new();
    let mut read_size = READ_START;
    loop {
        // Nothing is reserved until the app has bytes for the stream (see above).
        tcp.readable().await?;
        // Read no more than the peer's window admits: a slow receiver slows the sender.
        let room = match capacity(send, read_size, &mut buf).await {
            Ok(room) => room,
            Err(refused) => return Ok(refused),
        };
        let read = read_buf(tcp, &mut buf, room.min(read_size)).await?;
        let n = read.len;
        let (data, end) = if n == 0 { (Bytes::new(), true) } else { (buf.split_to(n).freeze(), false) };
        if let Err(e) = send.send_data(data, end) {
            return Ok(Sent::Refused(Some(e)));
        }
        if end {
            return Ok(Sent::All);
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        read_size = if n >= READ_START { READ_BULK } else { READ_START };
        if read.drained {
            // Keeps only the window for what is still queued; the buffer goes once h2 has
            // written out what was read into it.
            send.reserve_capacity(0);
            buf = BytesMut::new();
        }
    }
}

/// Asks for `wanted` bytes of the peer's window; waits until the stream may send at least one
/// byte, and returns how many it may. Waits without the read buffer `buf`: the peer's app may
/// not be reading, and the stream then keeps nothing but its socket.
async fn capacity(send: &mut SendStream<Bytes>, wanted: usize, buf: &mut BytesMut) -> Result<usize, Sent> {
    send.reserve_capacity(wanted);
    loop {
        let room = send.capacity();
        if room > 0 {
            return Ok(room);
        }
        *buf = BytesMut::new();
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Sent::Refused(Some(e))),
            None => return Err(Sent::Refused(None)),
        }
    }
}

/// What one read took from the socket.
pub(super) struct Read {
    pub(super) len: usize,
    /// The read took less than it had room for: the socket is drained (or at its end), and the
    /// next read waits for the app.
    pub(super) drained: bool,
}

/// One read of up to `limit` bytes, appended to `buf`, which gets `limit` of room once there is
/// something to read if it has less than [`READ_MIN`] left. Cancel-safe: nothing is read until the
/// socket is ready.
///
/// Read through `AsyncRead`, which takes a read that did not fill the buffer as proof that the
/// socket is drained (its readiness is edge-triggered): the next read waits for the next edge
/// instead of first trying a `recv` that would fail with EAGAIN, one system call per app read.
pub(super) async fn read_buf(tcp: &mut ReadHalf<'_>, buf: &mut BytesMut, limit: usize) -> io::Result<Read> {
    tcp.readable().await?;
    if buf.capacity() - buf.len() < limit.min(READ_MIN) {
        // Reuses the previous allocation if h2 has written out everything read into it.
        buf.reserve(limit);
    }
    let room = (buf.capacity() - buf.len()).min(limit);
    let len = tcp.read_buf(&mut (&mut *buf).limit(limit)).await?;
    Ok(Read { len, drained: len < room })
}

/// Writes the stream's data to the socket. Data is taken off h2 as soon as it arrives, also
/// while the socket is full, so that the agent's budget ([`Undelivered`]) counts all of it.
async fn stream_to_socket(
    recv: &mut RecvStream,
    tcp: &WriteHalf<'_>,
    moved: &AtomicU64,
    undelivered: &Undelivered,
) -> io::Result<StreamEnd> {
    let mut waiting = Waiting { frames: VecDeque::new(), undelivered };
    // How the stream ended, acted on once what arrived before has been written.
    let mut ended = None;
    loop {
        tokio::select! {
            // Writes first: while the socket takes the data, h2 is asked for more only when the
            // relay has none.
            biased;
            written = write_some(tcp, waiting.frames.front()), if !waiting.frames.is_empty() => {
                let n = written?;
                waiting.written(n);
                // Only what reached the socket opens the window again.
                let _ = recv.flow_control().release_capacity(n);
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            data = poll_fn(|cx| recv.poll_data(cx)), if ended.is_none() => match data {
                Some(Ok(data)) => waiting.arrived(data),
                Some(Err(e)) if cancelled_by_peer(&e) => ended = Some(Ok(StreamEnd::Cancelled)),
                Some(Err(e)) => ended = Some(Err(io_error(e))),
                None => ended = Some(Ok(StreamEnd::EndOfStream)),
            },
            else => break,
        }
    }
    let end = ended.expect("the loop ends with the stream")?;
    socket2::SockRef::from(tcp.as_ref()).shutdown(Shutdown::Write)?;
    Ok(end)
}

/// Received frames not yet (fully) written to the socket, counted in the agent's budget while
/// they wait.
struct Waiting<'a> {
    frames: VecDeque<Bytes>,
    undelivered: &'a Undelivered,
}

impl Waiting<'_> {
    fn arrived(&mut self, data: Bytes) {
        self.undelivered.received(data.len());
        self.frames.push_back(data);
    }

    fn written(&mut self, n: usize) {
        self.undelivered.delivered(n);
        let Some(front) = self.frames.front_mut() else { return };
        front.advance(n);
        if front.is_empty() {
            self.frames.pop_front();
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.undelivered.delivered(self.frames.iter().map(Bytes::len).sum());
    }
}

/// One write of what the socket takes of `data`, once it takes any. (`None` when there is
/// nothing to write: `select!` makes the future of a disabled branch too, and never polls it.)
async fn write_some(tcp: &WriteHalf<'_>, data: Option<&Bytes>) -> io::Result<usize> {
    let data = data.map_or(&[][..], |d| &d[..]);
    loop {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            written => return written,
        }
    }
}

/// Pings the peer every [`PING_INTERVAL`]; returns when one goes unanswered for [`PING_TIMEOUT`]
/// (the connection is dead: the caller drops it) or pinging fails.
pub(super) async fn keep_alive(mut ping_pong: PingPong) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
