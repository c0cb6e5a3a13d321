//! The sandbox's application: an echo server and a client, run inside pods.
//!
//! serve PORT                      -> "listening", then "accepted PEER" per connection
//! connect ADDR BYTES [--mark M]   -> "peer ADDR" (getpeername), then one of
//!                                    "echoed N" | "refused" | "reset" | "timeout" | "error MSG"
//! rr ADDR COUNT                   -> "rr P50_US P99_US": 1-byte ping-pong round trips
//! bulk ADDR MIB                   -> "bulk GBIT_PER_S": MIB MiB each way through the echo server
//! hold ADDR N                     -> "held N": N concurrent connections, each echoing a byte
//! stream ADDR SECONDS             -> "streamed N": one connection, a byte ping-pong every 10 ms

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", port] => serve(port.parse().expect("port")),
        ["connect", addr, bytes, rest @ ..] => {
            let mark = match rest {
                ["--mark", m] => Some(parse_u32(m)),
                _ => None,
            };
            connect(addr.parse().expect("address"), bytes.parse().expect("byte count"), mark);
        }
        ["rr", addr, count] => ping_pong(addr.parse().expect("address"), count.parse().expect("count")),
        ["hold", addr, n] => hold(addr.parse().expect("address"), n.parse().expect("count")),
        ["stream", addr, secs] => stream(addr.parse().expect("address"), secs.parse().expect("seconds")),
        ["bulk", addr, mib] => bulk(addr.parse().expect("address"), mib.parse().expect("MiB")),
        _ => {
            eprintln!(
                "usage: sandbox-app serve PORT | connect ADDR BYTES [--mark M] | rr ADDR COUNT | bulk ADDR MIB | hold ADDR N | stream ADDR SECONDS"
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

fn serve(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        println!("accepted {}", stream.peer_addr().expect("peer"));
        std::thread::spawn(move || {
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
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if let Some(mark) = mark {
        socket.set_mark(mark).expect("SO_MARK");
    }
    if let Err(e) = socket.connect_timeout(&addr.into(), Duration::from_secs(5)) {
        report_error(&e);
        return;
    }
    let mut stream: TcpStream = socket.into();
    let peer = stream.peer_addr().expect("getpeername");
    println!("peer {peer}");
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

fn report_error(e: &std::io::Error) {
    match e.kind() {
        ErrorKind::ConnectionRefused => println!("refused"),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            println!("reset")
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => println!("timeout"),
        _ => println!("error {e}"),
    }
}

fn ping_pong(addr: SocketAddr, count: usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut rtts: Vec<Duration> = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let start = std::time::Instant::now();
        stream.write_all(&byte).expect("write");
        stream.read_exact(&mut byte).expect("read");
        rtts.push(start.elapsed());
    }
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize].as_micros();
    println!("rr {} {}", at(0.5), at(0.99));
}

fn bulk(addr: SocketAddr, mib: usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let total = mib * 1024 * 1024;
    let start = std::time::Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk = vec![7u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            writer.write_all(&chunk[..n]).expect("write");
            sent += n;
        }
        writer.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    while received < total {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) => panic!("read: {e}"),
        }
    }
    sender.join().expect("sender");
    let secs = start.elapsed().as_secs_f64();
    println!("bulk {:.2}", received as f64 * 8.0 / secs / 1e9);
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
