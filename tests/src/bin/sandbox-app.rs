//! The sandbox's application: an echo server and a client, run inside pods.
//!
//! serve PORT                      -> "listening", then "accepted PEER" per connection
//! greet PORT                      -> as serve, but each connection first gets GREETING, unasked
//!                                    (server-first protocols: SMTP, MySQL, SSH)
//! abort PORT                      -> "listening"; greets each connection, then resets it (RST)
//! await ADDR [--to-end]           -> connects and reads without writing: "greeted TEXT", or an
//!                                    error as connect; with --to-end, then how the connection
//!                                    ended: "then closed" | "then reset" | "then timeout"
//! connect ADDR BYTES [--mark M]   -> "peer ADDR" (getpeername), "local ADDR" (getsockname), then one of
//!                                    "echoed N" | "refused" | "reset" | "timeout" | "error MSG"
//! rr ADDR COUNT [SIZE]            -> "rr P50 P99 P90 P99.9" (us): closed-loop ping-pong of SIZE bytes
//! rro ADDR SIZE RATE SECONDS      -> "rro P50 P99 P90 P99.9 RATE": open loop, latency from each
//!                                    request's scheduled time (no coordinated omission)
//! rrob ADDR SINK SIZE RATE SECONDS -> as rro, while one connection streams bulk to SINK (from a
//!                                    second before the first request to after the last)
//! bulk ADDR MIB                   -> "bulk GBIT_PER_S": MIB MiB each way through the echo server
//! sink PORT                       -> "listening"; reads and discards each connection to its end
//! stall PORT                      -> "listening"; accepts connections and never reads them
//! send ADDR SECONDS STREAMS [MS]  -> "send GBIT_PER_S": one-way bulk to a sink over STREAMS connections,
//!                                    opened MS milliseconds apart (default 0)
//! cps ADDR SECONDS                -> "cps N ERRORS": new connections per second (connect, 1-byte
//!                                    echo, close) and how many attempts failed
//! idle ADDR SECONDS               -> "idle": one connection, one echoed byte, then held open quietly
//! hold ADDR N                     -> "held N": N concurrent connections, each echoing a byte
//! loaded ADDR N MIB SECONDS       -> "loaded N": N connections, one after another, each echoing MIB
//!                                    MiB, then all held open quietly for SECONDS
//! stream ADDR SECONDS             -> "streamed N": one connection, a byte ping-pong every 10 ms
//! probe ADDR SECONDS              -> "ok" once a new connection (connect, 1-byte echo, close)
//!                                    succeeded, then a new one every millisecond until one fails:
//!                                    "refused" | "reset" | "timeout" | "error MSG" (as connect)

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", port] => serve(port.parse().expect("port"), b""),
        ["greet", port] => serve(port.parse().expect("port"), GREETING),
        ["abort", port] => abort(port.parse().expect("port")),
        ["await", addr, rest @ ..] => await_greeting(addr.parse().expect("address"), rest == ["--to-end"]),
        ["connect", addr, bytes, rest @ ..] => {
            let mark = match rest {
                ["--mark", m] => Some(parse_u32(m)),
                _ => None,
            };
            connect(addr.parse().expect("address"), bytes.parse().expect("byte count"), mark);
        }
        ["rr", addr, count] => ping_pong(addr.parse().expect("address"), count.parse().expect("count"), 1),
        ["rr", addr, count, size] => ping_pong(
            addr.parse().expect("address"),
            count.parse().expect("count"),
            size.parse().expect("size"),
        ),
        ["rro", addr, size, rate, secs] => open_loop(
            addr.parse().expect("address"),
            size.parse().expect("size"),
            rate.parse().expect("rate"),
            secs.parse().expect("seconds"),
        ),
        ["rrob", addr, sink, size, rate, secs] => {
            let bulk = Bulk::start(sink.parse().expect("sink address"));
            std::thread::sleep(Duration::from_secs(1));
            open_loop(
                addr.parse().expect("address"),
                size.parse().expect("size"),
                rate.parse().expect("rate"),
                secs.parse().expect("seconds"),
            );
            bulk.stop();
        }
        ["sink", port] => sink(port.parse().expect("port")),
        ["stall", port] => stall(port.parse().expect("port")),
        ["send", addr, secs, streams, rest @ ..] => send(
            addr.parse().expect("address"),
            secs.parse().expect("seconds"),
            streams.parse().expect("streams"),
            Duration::from_millis(rest.first().map_or(0, |ms| ms.parse().expect("milliseconds apart"))),
        ),
        ["idle", addr, secs] => idle(addr.parse().expect("address"), secs.parse().expect("seconds")),
        ["cps", addr, secs, rest @ ..] => new_connections(
            addr.parse().expect("address"),
            secs.parse().expect("seconds"),
            rest.first().map(|r| r.parse().expect("rate")),
        ),
        ["hold", addr, n] => hold(addr.parse().expect("address"), n.parse().expect("count")),
        ["loaded", addr, n, mib, secs] => loaded(
            addr.parse().expect("address"),
            n.parse().expect("count"),
            mib.parse().expect("MiB"),
            secs.parse().expect("seconds"),
        ),
        ["stream", addr, secs] => stream(addr.parse().expect("address"), secs.parse().expect("seconds")),
        ["probe", addr, secs] => probe(addr.parse().expect("address"), secs.parse().expect("seconds")),
        ["bulk", addr, mib] => bulk(addr.parse().expect("address"), mib.parse().expect("MiB")),
        _ => {
            eprintln!(
                "usage: sandbox-app MODE ARGS, MODE one of serve, greet, abort, await, connect, rr, rro, rrob, bulk, sink, stall, send, cps, idle, hold, loaded, stream, probe"
            );
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn parse_u32(s: &str) -> u32 {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).expect("hex mark"),
        None => s.parse().expect("mark"),
    }
}

/// Listens on `[::]:port`, which takes IPv4 too (dual-stack): the pods of the sandbox have both.
/// Where IPv6 is disabled (a container without it), on `0.0.0.0:port`.
fn listen(port: u16) -> TcpListener {
    TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port))).expect("bind")
}

/// What `greet` sends first on each connection.
const GREETING: &[u8] = b"220 sandbox ready\n";

/// Echoes every connection, after sending it `greeting` (if any).
fn serve(port: u16, greeting: &'static [u8]) {
    let listener = listen(port);
    println!("listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Like Go's net package and most RPC servers: without it, an echo written while the previous
        // one is still unacknowledged waits for the next request's ACK (Nagle and delayed ACK), and
        // an open-loop client then measures every round trip one request interval late.
        let _ = stream.set_nodelay(true);
        // A connection reset before this point has no peer any more; the server carries on.
        match stream.peer_addr() {
            // IPv4 peers as themselves, not as `::ffff:a.b.c.d`.
            Ok(peer) => println!("accepted {}", SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            Err(_) => continue,
        }
        std::thread::spawn(move || {
            if stream.write_all(greeting).is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
}

fn connect(addr: SocketAddr, bytes: usize, mark: Option<u32>) {
    // An IPv6 ADDR gets an IPv6 socket: `[::ffff:a.b.c.d]:port` connects to an IPv4 address the
    // way dual-stack runtimes (Java, .NET) do.
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
        .expect("socket");
    if let Some(mark) = mark {
        socket.set_mark(mark).expect("SO_MARK");
    }
    if let Err(e) = socket.connect_timeout(&addr.into(), Duration::from_secs(5)) {
        report_error(&e);
        return;
    }
    let mut stream: TcpStream = socket.into();
    // Reset right after the handshake (e.g. denied by policy): no peer any more.
    match stream.peer_addr() {
        Ok(peer) => println!("peer {peer}"),
        Err(e) => return report_error(&e),
    }
    if let Ok(local) = stream.local_addr() {
        println!("local {local}");
    }
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    // Write and read concurrently so large payloads cannot deadlock on full buffers.
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)?;
        Ok::<_, std::io::Error>(payload)
    });
    let mut echoed = Vec::with_capacity(bytes);
    let read = stream.read_to_end(&mut echoed);
    let sent = sender.join().expect("sender thread");
    match (read, sent) {
        (Err(e), _) | (_, Err(e)) => report_error(&e),
        (Ok(_), Ok(payload)) if echoed == payload => println!("echoed {}", echoed.len()),
        (Ok(_), Ok(_)) => println!("error echo mismatch: got {} bytes", echoed.len()),
    }
}

/// Greets each connection, then resets it: a server that fails mid-connection.
fn abort(port: u16) {
    let listener = listen(port);
    println!("listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.write_all(GREETING);
        // Closing with a zero linger time sends RST, not FIN.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

/// A client of a server-first protocol: it says nothing until the server has spoken.
fn await_greeting(addr: SocketAddr, to_end: bool) {
    // A blocking connect: connect_timeout's (non-blocking, then poll) reads the socket's error
    // once it is writable, and so fails a connection that a server already greeted and reset.
    let mut stream = match TcpStream::connect(addr) {
        Ok(stream) => stream,
        Err(e) => return report_error(&e),
    };
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while !greeting.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => return println!("error closed after {:?}", String::from_utf8_lossy(&greeting)),
            Ok(_) => greeting.push(byte[0]),
            Err(e) => return report_error(&e),
        }
    }
    println!("greeted {}", String::from_utf8_lossy(&greeting).trim_end());
    if to_end {
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => println!("then closed"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => println!("then reset"),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                println!("then timeout")
            }
            Err(e) => println!("then error {e}"),
        }
    }
}

fn report_error(e: &std::io::Error) {
    match e.kind() {
        ErrorKind::ConnectionRefused => println!("refused"),
        ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted
        | ErrorKind::NotConnected => {
            println!("reset")
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => println!("timeout"),
        _ => println!("error {e}"),
    }
}

/// p50, p99, p90, p99.9 in microseconds (p50 and p99 first: older callers read two).
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    format!("{:.1} {:.1} {:.1} {:.1}", at(0.5), at(0.99), at(0.9), at(0.999))
}

fn ping_pong(addr: SocketAddr, count: usize, size: usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut rtts: Vec<Duration> = Vec::with_capacity(count);
    let mut message = vec![1u8; size];
    for _ in 0..count {
        let start = Instant::now();
        stream.write_all(&message).expect("write");
        stream.read_exact(&mut message).expect("read");
        rtts.push(start.elapsed());
    }
    println!("rr {}", percentiles(rtts));
}

/// Requests go out on a fixed schedule whatever the responses do; each latency counts from the
/// request's scheduled time, so a stall delays every request behind it (no coordinated omission).
fn open_loop(addr: SocketAddr, size: usize, rate: u64, seconds: u64) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        // Sleeps end up to the thread's timer slack (50 us by default) late, which would add a
        // constant to every latency, the load generator's error rather than the network's.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let message = vec![2u8; size];
        for i in 0..total {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            writer.write_all(&message).expect("write");
        }
    });
    let mut reader = stream;
    let mut response = vec![0u8; size];
    let mut latencies = Vec::with_capacity(total);
    for i in 0..total {
        reader.read_exact(&mut response).expect("read");
        latencies.push(Instant::now().saturating_duration_since(start + interval * i as u32));
    }
    sender.join().expect("sender");
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    println!("rro {} {achieved:.0}", percentiles(latencies));
}

/// One connection sending as fast as it can until stopped.
struct Bulk {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<()>,
}

impl Bulk {
    fn start(sink: SocketAddr) -> Bulk {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let mut stream = TcpStream::connect(sink).expect("connect to sink");
        let sender = std::thread::spawn(move || {
            let chunk = vec![3u8; 256 * 1024];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                stream.write_all(&chunk).expect("bulk write");
            }
        });
        Bulk { stop, sender }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sender.join().expect("bulk sender");
    }
}

fn sink(port: u16) {
    let listener = listen(port);
    println!("listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
}

/// An app that stops reading: its connections fill up and stay so.
fn stall(port: u16) {
    let listener = listen(port);
    println!("listening");
    // Keeps every connection open, unread (the listener never ends).
    let _held: Vec<_> = listener.incoming().collect();
}

/// Sends for `seconds` over `streams` connections, opened `apart` one after another; the clock
/// stops when the sink has read it all.
fn send(addr: SocketAddr, seconds: u64, streams: usize, apart: Duration) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..streams)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(apart * i as u32);
                let mut stream = TcpStream::connect(addr).expect("connect");
                let chunk = vec![3u8; 256 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    stream.write_all(&chunk).expect("write");
                    sent += chunk.len() as u64;
                }
                stream.shutdown(Shutdown::Write).expect("shutdown");
                // The sink closes once it has read everything.
                let _ = stream.read(&mut [0u8; 1]);
                sent
            })
        })
        .collect();
    let bytes: u64 = workers.into_iter().map(|w| w.join().expect("sender")).sum();
    println!("send {:.3}", bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9);
}

/// Completed connections per second, and how many failed (they count against the rate). With a
/// `rate`, connections start at most that many per second (a long churn at full speed would run
/// out of ephemeral ports to TIME_WAIT, with or without a proxy).
fn new_connections(addr: SocketAddr, seconds: u64, rate: Option<u64>) {
    let start = Instant::now();
    let (mut count, mut errors) = (0u64, 0u64);
    let mut byte = [0u8; 1];
    while start.elapsed() < Duration::from_secs(seconds) {
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64((count + errors) as f64 / rate as f64);
            std::thread::sleep(due.saturating_sub(start.elapsed()));
        }
        let attempt = TcpStream::connect(addr).and_then(|mut stream| {
            stream.set_nodelay(true)?;
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)
        });
        match attempt {
            Ok(()) => count += 1,
            Err(e) => {
                errors += 1;
                eprintln!("cps: {e}");
            }
        }
    }
    println!("cps {:.0} {errors}", count as f64 / start.elapsed().as_secs_f64());
}

fn bulk(addr: SocketAddr, mib: usize) {
    let stream = TcpStream::connect(addr).expect("connect");
    let start = std::time::Instant::now();
    let received = echo_bulk(&stream, mib * 1024 * 1024, true);
    let secs = start.elapsed().as_secs_f64();
    println!("bulk {:.2}", received as f64 * 8.0 / secs / 1e9);
}

/// Sends `total` bytes through an echo server while reading them back; returns how many came back.
/// With `finish`, half-closes once all is sent (the echo server then closes too). A transfer
/// that stalls for 10 s panics (the process fails) rather than hanging.
fn echo_bulk(stream: &TcpStream, total: usize, finish: bool) -> usize {
    let stall = Some(Duration::from_secs(10));
    stream.set_read_timeout(stall).and_then(|()| stream.set_write_timeout(stall)).expect("timeouts");
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let chunk = vec![7u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            writer.write_all(&chunk[..n]).expect("write");
            sent += n;
        }
        if finish {
            writer.shutdown(Shutdown::Write).expect("shutdown");
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    let mut reader = stream;
    while received < total {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) => panic!("read: {e}"),
        }
    }
    sender.join().expect("sender");
    received
}

fn loaded(addr: SocketAddr, n: usize, mib: usize, seconds: u64) {
    let streams: Vec<TcpStream> = (0..n)
        .map(|_| {
            let stream = TcpStream::connect(addr).expect("connect");
            assert_eq!(echo_bulk(&stream, mib * 1024 * 1024, false), mib * 1024 * 1024, "echo cut short");
            stream
        })
        .collect();
    println!("loaded {}", streams.len());
    std::thread::sleep(Duration::from_secs(seconds));
}

fn hold(addr: SocketAddr, n: usize) {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        stream.write_all(b"x").expect("write");
        streams.push(stream);
    }
    for stream in &mut streams {
        let mut byte = [0u8; 1];
        if let Err(e) = stream.read_exact(&mut byte) {
            report_error(&e);
            return;
        }
    }
    println!("held {}", streams.len());
}

fn stream(addr: SocketAddr, seconds: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut count = 0u64;
    let mut byte = [0u8; 1];
    while std::time::Instant::now() < deadline {
        byte[0] = (count % 256) as u8;
        let sent = byte[0];
        if let Err(e) = stream.write_all(&byte).and_then(|()| stream.read_exact(&mut byte)) {
            report_error(&e);
            return;
        }
        if byte[0] != sent {
            println!("error echo mismatch after {count}");
            return;
        }
        count += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("streamed {count}");
}

/// Times a change that makes connections fail (a policy that denies them): the caller starts it,
/// waits for "ok", makes the change, and reads the next line when the change has taken effect.
/// No failure within `seconds` is reported as "timeout".
fn probe(addr: SocketAddr, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut succeeded = false;
    while Instant::now() < deadline {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut byte = [0u8; 1];
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)
        });
        match attempt {
            Ok(()) if !succeeded => {
                succeeded = true;
                println!("ok");
            }
            Ok(()) => {}
            // Before the first success too: the caller expects "ok" and reports what came instead.
            Err(e) => return report_error(&e),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("timeout");
}

fn idle(addr: SocketAddr, seconds: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut byte = [0u8; 1];
    stream.write_all(&byte).expect("write");
    stream.read_exact(&mut byte).expect("read");
    println!("idle");
    std::thread::sleep(Duration::from_secs(seconds));
}
