//! Relay between two kernel TCP sockets (same-node, plaintext inbound, passthrough). Small
//! messages are copied through a buffer of the worker thread: one `recv` and one `send`, and a
//! `recv` that did not fill the buffer proves the socket drained, so none is tried in vain. Once
//! a read fills the buffer the direction moves bulk and switches to `splice(2)`, which moves the
//! bytes socket -> pipe -> socket inside the kernel, never through the proxy's memory. HBONE
//! streams are not sockets and use the copying relay.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::{
    net::RecvFlags,
    pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size},
};
use tokio::{io::Interest, net::TcpStream};

/// The copying step, and the read that makes a direction bulk. A buffer per worker thread,
/// none per connection: 100,000 open connections hold no relay memory.
const COPY_STEP: usize = 16 * 1024;
/// A pipe's default capacity: what a direction that just turned bulk starts with.
const PIPE_START: usize = 64 * 1024;
/// What a direction that fills its pipe grows it to: 4x bulk steps per syscall and wake-up
/// (same-node bulk 0.50x -> 0.84x direct), kernel memory only for the connections that move bulk.
const PIPE_BULK: usize = 1024 * 1024;

thread_local! {
    static COPY_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_STEP].into_boxed_slice());
}

/// Relays both ways until both directions have ended; like `copy_bidirectional`, an end of
/// stream is passed on as a half-close. Counts bytes as they move.
pub(super) async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(one_way(a, b, a_to_b), one_way(b, a, b_to_a)).map(|_| ())
}

async fn one_way(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    // What the receiver did not take at once: written before anything else is read.
    let mut unsent = Vec::new();
    loop {
        if !unsent.is_empty() {
            write_all(to, &unsent, moved).await?;
            unsent = Vec::new();
        }
        from.readable().await?;
        match COPY_BUFFER.with_borrow_mut(|buf| copy_once(from, to, buf, &mut unsent, moved)) {
            Ok(Copied::End) => return finish(to),
            Ok(Copied::Drained) => {}
            Ok(Copied::Full) => {
                write_all(to, &unsent, moved).await?;
                return splice_from_now_on(from, to, moved).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

enum Copied {
    /// The sender finished.
    End,
    /// Less than a [`COPY_STEP`]: the socket is drained.
    Drained,
    /// A whole [`COPY_STEP`]: the direction moves bulk.
    Full,
}

/// One read into `buf` and one write of it; what the receiver does not take goes to `unsent`.
/// Runs without yielding, so the worker's buffer is free again when it returns.
fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut [u8],
    unsent: &mut Vec<u8>,
    moved: &AtomicU64,
) -> io::Result<Copied> {
    let n = read_draining(from, buf)?;
    if n == 0 {
        return Ok(Copied::End);
    }
    let written = match to.try_write(&buf[..n]) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    moved.fetch_add(written as u64, Ordering::Relaxed);
    unsent.extend_from_slice(&buf[written..n]);
    Ok(if n == buf.len() { Copied::Full } else { Copied::Drained })
}

/// One non-blocking read. A read that does not fill `buf` proves the socket drained, so it also
/// clears the socket's readiness (tokio clears it only on EAGAIN; readiness is edge-triggered, so
/// bytes that arrive later make it ready again), as tokio's own `AsyncRead` does.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut drained = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = rustix::net::recv(from, &mut *buf, RecvFlags::empty())?.0;
        if n > 0 && n < buf.len() {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, drained) {
        (_, Some(n)) => Ok(n),
        (read, None) => read,
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], moved: &AtomicU64) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(written) => {
                moved.fetch_add(written as u64, Ordering::Relaxed);
                data = &data[written..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The sender finished: finish our side towards the receiver too.
fn finish(to: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)
}

async fn splice_from_now_on(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe()?;
    let mut capacity = PIPE_START;
    loop {
        let filled =
            from.async_io(Interest::READABLE, || splice(from.as_fd(), pipe_in.as_fd(), capacity)).await?;
        if filled == 0 {
            return finish(to);
        }
        let mut left = filled;
        while left > 0 {
            left -= to.async_io(Interest::WRITABLE, || splice(pipe_out.as_fd(), to.as_fd(), left)).await?;
        }
        moved.fetch_add(filled as u64, Ordering::Relaxed);
        // Best effort: without it (limits on pipe memory), the relay just takes smaller steps.
        if filled == capacity && capacity < PIPE_BULK && fcntl_setpipe_size(&pipe_in, PIPE_BULK).is_ok() {
            capacity = PIPE_BULK;
        }
    }
}

/// A non-blocking pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?)
}

/// One non-blocking splice; `WouldBlock` makes tokio wait for readiness again. A short splice
/// does not prove the socket drained (the pipe may have run out of slots), so the splicing relay
/// reads until EAGAIN.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    Ok(rustix::pipe::splice(from, None, to, None, len, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Both ends of one loopback connection: (the app's, the relay's).
    async fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (relay, _) = listener.accept().await.unwrap();
        (app, relay)
    }

    /// A relay between a client and a server app, counting what it moved each way.
    async fn relayed() -> (TcpStream, TcpStream, tokio::task::JoinHandle<io::Result<(u64, u64)>>) {
        let (client, downstream) = connection().await;
        let (server, upstream) = connection().await;
        let relay = tokio::spawn(async move {
            let (to_server, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
            bidirectional(&downstream, &upstream, &to_server, &to_client).await?;
            Ok((to_server.into_inner(), to_client.into_inner()))
        });
        (client, server, relay)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Small messages are copied one read at a time; a receiver that reads late leaves the relay
    /// with part of one it could not write, and then, once it reads, a backlog that fills whole
    /// reads and turns the relay to splice midway. Nothing is lost or reordered on the way.
    #[tokio::test]
    async fn small_messages_to_a_late_reader_arrive_whole_copied_then_spliced() {
        const MESSAGE: usize = 1000;
        const TOTAL: usize = 4 * 1024 * 1024;
        let (mut client, mut server, relay) = relayed().await;
        let sent = pattern(TOTAL);
        let writer = tokio::spawn(async move {
            for message in sent.chunks(MESSAGE) {
                client.write_all(message).await.unwrap();
                // One message per read of the relay while the receiver takes them.
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(received == pattern(TOTAL), "{} of {TOTAL} bytes, or out of order", received.len());

        drop(server);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap().unwrap(), (TOTAL as u64, 0));
    }

    /// Each side's end of stream reaches the other as a half-close, after its bytes, and the
    /// relay ends once both have ended.
    #[tokio::test]
    async fn each_end_of_stream_is_passed_on_as_a_half_close() {
        let (mut client, mut server, relay) = relayed().await;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"ping");

        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
        assert_eq!(relay.await.unwrap().unwrap(), (4, 4));
    }
}
