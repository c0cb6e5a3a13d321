//! Driving the sandbox's helper app (src/bin/sandbox-app.rs) inside pods.

use std::{
    io::{BufRead, BufReader, Lines},
    net::SocketAddr,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{Pod, Process, app_bin};

/// An echo server running in a pod; records the peer of every connection it accepts.
pub struct Server {
    _process: Process,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Server {
    /// Peers of the connections accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap().clone()
    }

    /// Forgets the connections accepted so far.
    pub fn clear(&self) {
        self.accepted.lock().unwrap().clear();
    }

    /// Waits up to `timeout` for at least `n` accepted connections.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n || std::time::Instant::now() > deadline {
                return accepted;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What a client connection in a pod saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected, the echo came back intact. `peer` is what getpeername() said.
    Echoed {
        peer: SocketAddr,
        bytes: usize,
    },
    /// connect() was refused.
    Refused,
    /// Connected (to the proxy), then reset.
    Reset {
        peer: Option<SocketAddr>,
    },
    TimedOut,
    Other(String),
}

impl Pod {
    /// Starts `sandbox-app ARGS` in this pod (its netns and cgroup) with stdout piped.
    pub fn spawn_app(&self, args: &[&str]) -> Result<Process> {
        self.app(args).map(Process::new)
    }

    fn app(&self, args: &[&str]) -> Result<Child> {
        let mut cmd = Command::new(app_bin()?);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        self.netns.spawn(cmd, Some(&self.cgroup))
    }

    /// Starts an echo server on `[::]:port` (IPv4 and IPv6) in this pod and waits until it listens.
    pub fn serve(&self, port: u16) -> Result<Server> {
        self.serve_mode("serve", port)
    }

    /// Starts an echo server on `[::]:port` that greets each connection first, unasked (as
    /// server-first protocols do).
    pub fn serve_greeting(&self, port: u16) -> Result<Server> {
        self.serve_mode("greet", port)
    }

    /// Connects from this pod to `to` and waits for a greeting without sending anything: what
    /// `sandbox-app await` printed ("greeted TEXT", or an error as [`Pod::connect`]'s).
    pub fn await_greeting(&self, to: SocketAddr) -> Result<String> {
        let output = self.app(&["await", &to.to_string()])?.wait_with_output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned())
    }

    /// Like [`Pod::await_greeting`], then reads to the connection's end: the greeting line and
    /// "then closed" | "then reset" | "then timeout".
    pub fn await_greeting_to_end(&self, to: SocketAddr) -> Result<String> {
        let output = self.app(&["await", &to.to_string(), "--to-end"])?.wait_with_output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned())
    }

    /// Starts a server on `[::]:port` that greets each connection, then resets it.
    pub fn serve_then_reset(&self, port: u16) -> Result<Server> {
        self.serve_mode("abort", port)
    }

    /// Starts a discarding server (for one-way bulk) on `[::]:port`.
    pub fn serve_sink(&self, port: u16) -> Result<Server> {
        self.serve_mode("sink", port)
    }

    /// Starts a server on `[::]:port` that accepts connections and never reads them.
    pub fn serve_stalled(&self, port: u16) -> Result<Server> {
        self.serve_mode("stall", port)
    }

    fn serve_mode(&self, mode: &str, port: u16) -> Result<Server> {
        let (process, lines) = self.start(&[mode, &port.to_string()], "listening")?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let sink = accepted.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(peer) = line.strip_prefix("accepted ").and_then(|p| p.parse().ok()) {
                    sink.lock().unwrap().push(peer);
                }
            }
        });
        Ok(Server { _process: process, accepted })
    }

    /// Runs `sandbox-app ARGS` in this pod until it prints `first`: its process (killed when
    /// dropped, also when it printed something else) and the lines that follow.
    fn start(&self, args: &[&str], first: &str) -> Result<(Process, Lines<BufReader<ChildStdout>>)> {
        let mut process = Process::new(self.app(args)?);
        let stdout = process.child().stdout.take().context("sandbox-app stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line == first => Ok((process, lines)),
            other => bail!("sandbox-app {args:?} in {} printed {other:?}, not {first:?}", self.spec.name),
        }
    }

    /// Connects from this pod to `to`, sends `bytes` bytes and checks they are echoed back.
    pub fn connect(&self, to: SocketAddr, bytes: usize) -> Result<ConnectOutcome> {
        self.connect_with(to, bytes, &[])
    }

    /// Like [`Pod::connect`], with extra flags of `sandbox-app connect` (e.g. `--mark`).
    pub fn connect_with(&self, to: SocketAddr, bytes: usize, extra: &[&str]) -> Result<ConnectOutcome> {
        parse_outcome(&self.connect_output(to, bytes, extra)?)
    }

    /// Like [`Pod::connect`], and the connection's own address as the app saw it (getsockname()).
    pub fn connect_from(&self, to: SocketAddr, bytes: usize) -> Result<(ConnectOutcome, SocketAddr)> {
        let output = self.connect_output(to, bytes, &[])?;
        let local = output.lines().find_map(|line| line.strip_prefix("local ")).context("no local line")?;
        Ok((parse_outcome(&output)?, local.parse()?))
    }

    fn connect_output(&self, to: SocketAddr, bytes: usize, extra: &[&str]) -> Result<String> {
        let mut args = vec!["connect".to_owned(), to.to_string(), bytes.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.app(&args)?.wait_with_output()?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Pod {
    /// Median and 99th percentile round trip, in microseconds, of `count` 1-byte ping-pongs
    /// to an echo server.
    pub fn ping_pong(&self, to: SocketAddr, count: usize) -> Result<(u64, u64)> {
        let line = self.measure(&["rr", &to.to_string(), &count.to_string()], "rr")?;
        let mut values = line.split_whitespace().map(str::parse::<f64>);
        match (values.next(), values.next()) {
            (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50.round() as u64, p99.round() as u64)),
            _ => bail!("bad rr output {line:?}"),
        }
    }

    /// Throughput in Gbit/s of `mib` MiB sent to an echo server and read back concurrently.
    pub fn bulk(&self, to: SocketAddr, mib: usize) -> Result<f64> {
        Ok(self.measure(&["bulk", &to.to_string(), &mib.to_string()], "bulk")?.trim().parse()?)
    }

    /// Opens `n` concurrent connections to an echo server, each echoing a byte; all are open at once.
    pub fn hold(&self, to: SocketAddr, n: usize) -> Result<usize> {
        Ok(self.measure(&["hold", &to.to_string(), &n.to_string()], "held")?.trim().parse()?)
    }

    /// Opens `n` connections to an echo server one after another, echoes `mib` MiB over each, and
    /// holds them all open for `seconds`; returns once all have echoed.
    pub fn load(&self, to: SocketAddr, n: usize, mib: usize, seconds: u64) -> Result<Process> {
        let args = [to.to_string(), n.to_string(), mib.to_string(), seconds.to_string()];
        let (process, _) =
            self.start(&["loaded", &args[0], &args[1], &args[2], &args[3]], &format!("loaded {n}"))?;
        Ok(process)
    }

    /// Keeps one connection busy with a byte ping-pong every 10 ms for `seconds`; the count.
    pub fn stream(&self, to: SocketAddr, seconds: u64) -> Result<u64> {
        Ok(self.measure(&["stream", &to.to_string(), &seconds.to_string()], "streamed")?.trim().parse()?)
    }

    /// Like [`Pod::stream`], returning the app's last line whatever it is ("streamed N", "reset", ...).
    pub fn measure_stream(&self, to: SocketAddr, seconds: u64) -> String {
        match self
            .app(&["stream", &to.to_string(), &seconds.to_string()])
            .and_then(|c| Ok(c.wait_with_output()?))
        {
            Ok(output) => {
                String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().to_owned()
            }
            Err(e) => format!("error {e}"),
        }
    }

    /// Runs `sandbox-app ARGS` in this pod and returns what follows `word` on its result line.
    pub fn measure(&self, args: &[&str], word: &str) -> Result<String> {
        let output = self.app(args)?.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(word).map(str::to_owned))
            .with_context(|| format!("sandbox-app {args:?} printed {stdout:?}"))
    }
}

/// New connections from a pod, one every millisecond, until one fails (`sandbox-app probe`).
pub struct Probe {
    _process: Process,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Probe {
    /// Blocks until a connection failed, or the probe gave up: "reset", "refused", "timeout", ...
    pub fn failure(mut self) -> Result<String> {
        Ok(self.lines.next().context("the probe ended without a word")??)
    }
}

impl Pod {
    /// Starts probing `to` for up to `seconds`; returns once a first connection succeeded.
    pub fn probe(&self, to: SocketAddr, seconds: u64) -> Result<Probe> {
        let (process, lines) = self.start(&["probe", &to.to_string(), &seconds.to_string()], "ok")?;
        Ok(Probe { _process: process, lines })
    }
}

fn parse_outcome(output: &str) -> Result<ConnectOutcome> {
    let mut peer = None;
    for line in output.lines() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "peer" => peer = Some(rest.parse()?),
            "echoed" => {
                return Ok(ConnectOutcome::Echoed {
                    peer: peer.context("no peer line")?,
                    bytes: rest.parse()?,
                });
            }
            "refused" => return Ok(ConnectOutcome::Refused),
            "reset" => return Ok(ConnectOutcome::Reset { peer }),
            "timeout" => return Ok(ConnectOutcome::TimedOut),
            "error" => return Ok(ConnectOutcome::Other(rest.to_owned())),
            _ => {}
        }
    }
    bail!("sandbox-app printed no outcome: {output:?}")
}
