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
    /// Manage the file CA of the embedded default.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA (EC P-256) in DIR, unless DIR already holds one; print its certificate.
    ///
    /// DIR gets root-cert.pem and root-key.pem (mode 0600). To use an existing root instead, put
    /// its PEM certificate and PKCS#8 key (EC P-256 or RSA >= 2048) there under those names.
    /// Extra roots to trust go in DIR/trust-bundle.pem.
    ///
    /// Example: ferry ca init /var/lib/ferry/ca
    Init {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue a workload certificate from the CA in DIR, e.g. for a peer outside the mesh agent.
    ///
    /// Example: ferry ca issue /var/lib/ferry/ca spiffe://cluster.local/ns/default/sa/web \
    ///            --cert web.pem --key web-key.pem --ttl 1h
    Issue {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The identity, spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
        #[arg(value_name = "SPIFFE_ID")]
        identity: String,
        /// Where to write the certificate chain (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Where to write the private key (PKCS#8 PEM, mode 0600).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Validity, e.g. 24h, 30m.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}
