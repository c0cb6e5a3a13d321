//! Log output: `tracing` to stderr, as text or JSON (one object per line, fields at top level),
//! with a filter that the admin API can change at run time.
//!
//! Lines reach stderr through [`Batcher`]: the thread that logs (a proxy worker, for the access
//! log) only appends to a buffer, and one writer thread writes what gathered in one system call.
//! Proxy workers never block on a stalled stderr (a full pipe to a slow log collector): lines
//! that do not fit are dropped and counted (`ferry_log_lines_dropped_total`).

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, fmt::format::JsonFields, layer::SubscriberExt, reload,
    util::SubscriberInitExt,
};

use super::log_format::{JsonLines, TextFields, Timestamp};

/// How long the writer lets lines gather after the first one of a batch.
const BATCH_DELAY: Duration = Duration::from_millis(5);
/// Lines waiting beyond this (stderr is not keeping up) are dropped and counted.
const MAX_PENDING_BYTES: usize = 4 << 20;
/// How long an exiting agent waits for a stuck output before it leaves the last lines behind.
const EXIT_PATIENCE: Duration = Duration::from_secs(2);
/// A batch buffer larger than this after a burst is given back.
const KEEP_CAPACITY: usize = 64 << 10;

/// Log format of the agent's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Changes the log filter of the running agent.
#[derive(Debug, Clone)]
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    dropped: Counter,
}

impl LogControl {
    /// Sets the filter, in RUST_LOG syntax (`debug`, `info,access=warn`, ...).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(directives).map_err(|e| format!("invalid log filter {directives:?}: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }

    pub fn current(&self) -> String {
        self.filter.with_current(ToString::to_string).unwrap_or_default()
    }

    /// Lines dropped because stderr was not keeping up.
    pub fn dropped_lines(&self) -> Counter {
        self.dropped.clone()
    }
}

/// Installs the global tracing subscriber (RUST_LOG overrides the default `info`). eBPF log lines
/// arrive through the `log` facade and are bridged in.
pub fn init_logging(format: LogFormat) -> LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let batcher = BATCHER.get_or_init(|| Batcher::start(Box::new(io::stderr()), format, MAX_PENDING_BYTES));
    let output =
        tracing_subscriber::fmt::layer().with_timer(Timestamp).with_ansi(ansi).with_writer(batcher.clone());
    let output: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => output.fmt_fields(TextFields).boxed(),
        LogFormat::Json => output.fmt_fields(JsonFields::new()).event_format(JsonLines).boxed(),
    };
    let _ = tracing_subscriber::registry().with(output.with_filter(filter)).try_init();
    LogControl { filter: handle, dropped: batcher.dropped.clone() }
}

static BATCHER: OnceLock<Arc<Batcher>> = OnceLock::new();

/// Writes out the lines still waiting; the process calls it before it exits.
pub fn flush_logs() {
    if let Some(batcher) = BATCHER.get() {
        batcher.write_out(EXIT_PATIENCE);
    }
}

/// Log lines on their way to the output, in the order they were logged. `Arc<Batcher>` is the
/// formatter's writer: each line is one `write` of `&Batcher`.
struct Batcher {
    pending: Mutex<Pending>,
    arrived: Condvar,
    output: Mutex<Box<dyn Write + Send>>,
    /// For the line that reports dropped lines.
    format: LogFormat,
    max_pending: usize,
    dropped: Counter,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// Dropped since the last batch: the next batch says so.
    dropped: u64,
}

impl Batcher {
    fn start(output: Box<dyn Write + Send>, format: LogFormat, max_pending: usize) -> Arc<Batcher> {
        let batcher = Arc::new(Batcher {
            pending: Mutex::default(),
            arrived: Condvar::new(),
            output: Mutex::new(output),
            format,
            max_pending,
            dropped: Counter::default(),
        });
        let writer = batcher.clone();
        std::thread::Builder::new()
            .name("ferry-log".into())
            .spawn(move || writer.run())
            .expect("cannot start the log writer thread");
        batcher
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each line is one `write` from tracing's formatter: it is queued whole or dropped whole.
    fn push(&self, line: &[u8]) {
        let mut pending = self.pending();
        if pending.lines.len() + line.len() > self.max_pending {
            pending.dropped += 1;
            self.dropped.inc();
            return;
        }
        let first = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        drop(pending);
        // Only the first line of a batch wakes the writer.
        if first {
            self.arrived.notify_one();
        }
    }

    fn run(&self) {
        let mut batch = Vec::new();
        loop {
            let mut pending = self.pending();
            while pending.lines.is_empty() && pending.dropped == 0 {
                pending = self.arrived.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            drop(pending);
            std::thread::sleep(BATCH_DELAY);
            let mut output = self.output.lock().unwrap_or_else(|e| e.into_inner());
            self.write_batch(&mut **output, &mut batch);
        }
    }

    /// Writes out what is waiting, unless the writer thread has been stuck in a write for
    /// `patience`: exiting must not hang on a stalled stderr.
    fn write_out(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        let mut output = loop {
            match self.output.try_lock() {
                Ok(output) => break output,
                Err(TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TryLockError::WouldBlock) => return,
            }
        };
        self.write_batch(&mut **output, &mut Vec::new());
    }

    /// Takes what is waiting into `batch` (kept for its capacity) and writes it to `output`,
    /// which the caller holds locked so batches never interleave.
    fn write_batch(&self, output: &mut dyn Write, batch: &mut Vec<u8>) {
        let dropped = {
            let mut pending = self.pending();
            std::mem::swap(batch, &mut pending.lines);
            std::mem::take(&mut pending.dropped)
        };
        if dropped > 0 {
            batch.extend_from_slice(self.dropped_notice(dropped).as_bytes());
        }
        // Nowhere to report a failing stderr: the lines are lost, the agent goes on.
        let _ = output.write_all(batch).and_then(|()| output.flush());
        batch.clear();
        batch.shrink_to(KEEP_CAPACITY);
    }

    /// A warning line in the output's format, after the lines that made it.
    fn dropped_notice(&self, dropped: u64) -> String {
        let time = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let (target, message) = (module_path!(), "log lines dropped: the log output was not keeping up");
        match self.format {
            LogFormat::Text => format!("{time}  WARN {target}: {message} dropped={dropped}\n"),
            LogFormat::Json => {
                let line = serde_json::json!({
                    "timestamp": time.to_string(), "level": "WARN", "message": message,
                    "dropped": dropped, "target": target,
                });
                format!("{line}\n")
            }
        }
    }
}

impl Write for &Batcher {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Each held write says it has begun, then waits to be released.
    type Hold = Arc<Mutex<(mpsc::Sender<()>, mpsc::Receiver<()>)>>;

    /// An output that records each write, and can hold writes until released.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        hold: Option<Hold>,
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }

        fn wait_for(&self, done: impl Fn(&str) -> bool) -> String {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done(&self.text()) {
                assert!(Instant::now() < deadline, "never written: {:?}", self.text());
                std::thread::sleep(Duration::from_millis(5));
            }
            self.text()
        }
    }

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if let Some(hold) = &self.hold {
                let (entered, release) = &*hold.lock().unwrap();
                entered.send(()).unwrap();
                release.recv().unwrap();
            }
            self.writes.lock().unwrap().push(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_in_few_writes() {
        let output = Recorder::default();
        let batcher = Batcher::start(Box::new(output.clone()), LogFormat::Text, MAX_PENDING_BYTES);
        let lines: Vec<String> = (0..1000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            (&*batcher).write_all(line.as_bytes()).unwrap();
        }
        let expected = lines.concat();
        assert_eq!(output.wait_for(|text| text.len() >= expected.len()), expected);
        let writes = output.writes.lock().unwrap().len();
        assert!(writes < 100, "{writes} writes for 1000 lines");
    }

    #[test]
    fn a_stalled_output_blocks_no_logger_and_drops_are_counted() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let output =
            Recorder { hold: Some(Arc::new(Mutex::new((entered_tx, release_rx)))), ..Default::default() };
        let batcher = Batcher::start(Box::new(output.clone()), LogFormat::Json, 1000);
        (&*batcher).write_all(b"first\n").unwrap();
        // The writer is now stuck writing the first batch, as on a full pipe.
        entered.recv_timeout(Duration::from_secs(5)).expect("the writer never wrote");

        let logger = {
            let batcher = batcher.clone();
            let line = format!("{}\n", "x".repeat(99));
            std::thread::spawn(move || (0..50).for_each(|_| (&*batcher).write_all(line.as_bytes()).unwrap()))
        };
        let started = Instant::now();
        while !logger.is_finished() {
            assert!(started.elapsed() < Duration::from_secs(5), "logging blocked on a stalled output");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(batcher.dropped.get(), 40, "1000 bytes hold 10 lines of 100");
        let exiting = Instant::now();
        batcher.write_out(Duration::from_millis(100));
        assert!(exiting.elapsed() < Duration::from_secs(2), "exiting hung on the stalled output");

        // Released: the first batch, then the ten kept lines and the count of the dropped ones.
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        let text = output.wait_for(|text| text.contains("dropped"));
        assert!(text.starts_with("first\n"), "{text}");
        assert_eq!(text.matches(&"x".repeat(99)).count(), 10, "{text}");
        let notice: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (notice["level"].as_str(), notice["dropped"].as_u64()),
            (Some("WARN"), Some(40)),
            "{text}"
        );
    }
}
