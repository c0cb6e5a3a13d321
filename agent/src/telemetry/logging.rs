//! Log output: `tracing` to stderr, as text or JSON (one object per line, fields at top level),
//! with a filter that the admin API can change at run time.

use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// Log format of the agent's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Changes the log filter of the running agent.
#[derive(Debug, Clone)]
pub struct LogControl(reload::Handle<EnvFilter, Registry>);

impl LogControl {
    /// Sets the filter, in RUST_LOG syntax (`debug`, `info,access=warn`, ...).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(directives).map_err(|e| format!("invalid log filter {directives:?}: {e}"))?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }

    pub fn current(&self) -> String {
        self.0.with_current(ToString::to_string).unwrap_or_default()
    }
}

/// Installs the global tracing subscriber (RUST_LOG overrides the default `info`). eBPF log lines
/// arrive through the `log` facade and are bridged in.
pub fn init_logging(format: LogFormat) -> LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let output: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => output.boxed(),
        LogFormat::Json => output.json().flatten_event(true).with_current_span(false).boxed(),
    };
    let _ = tracing_subscriber::registry().with(output.with_filter(filter)).try_init();
    LogControl(handle)
}
