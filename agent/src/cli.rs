//! Command line of the `ferry` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Ferry: sidecarless service-mesh node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: capture meshed pods on this node and proxy their traffic.
    ///
    /// Example: ferry agent --config /etc/ferry/config.yaml
    Agent {
        /// Static configuration file (YAML). Re-read on SIGHUP.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log output format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
}
