//! Command line of the `ferry` binary: `ferry agent` runs the agent; the other commands ask a
//! running agent through its admin API and print a table (or JSON with `-o json`).
//!
//! Exit codes: 0 success, 1 `policy check` denied, 2 usage error, 3 agent not reachable,
//! 4 permission denied on the admin socket, 5 the agent refused the request.

mod client;
mod commands;
mod render;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use commands::run;

use crate::{config::DEFAULT_ADMIN_SOCKET, telemetry::LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: sidecarless service-mesh node agent",
    long_about = "Ferry: sidecarless service-mesh node agent.\n\n`ferry agent` runs the agent on a node. The \
                  other commands inspect a running agent through its admin API (a unix socket, \
                  root only, or 127.0.0.1:15000).",
    after_help = "Examples:\n  ferry status\n  ferry workloads -o json\n  ferry flows --follow --denied\n  \
                  ferry policy check --from default/frontend --to default/backend:8080"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The agent's admin API: a unix socket path, or host:port.
    #[arg(long, global = true, env = "FERRY_ADMIN", default_value = DEFAULT_ADMIN_SOCKET, value_name = "ADDR")]
    pub admin: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables for people.
    Table,
    /// The admin API's JSON, for scripts.
    Json,
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
        /// Take workloads, services and policies from the Kubernetes API (in-cluster config, or
        /// $KUBECONFIG) instead of the config file's `workloads`.
        #[arg(long)]
        kube: bool,
        /// This node's name, instead of the config file's `node` (a DaemonSet passes
        /// spec.nodeName through $NODE_NAME).
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
    },
    /// Run the cluster's workload certificate signer (a Deployment in Kubernetes mode): approve and
    /// sign the agents' CertificateSigningRequests for ferry.dev/workload, or deny them with a
    /// reason. The root key lives only in its Secret; the root certificate is published in a
    /// ConfigMap for the agents.
    ///
    /// Example: ferry signer --namespace ferry-system
    Signer {
        /// Namespace of the CA Secret, the root ConfigMap and the agents' service account.
        #[arg(long, env = "POD_NAMESPACE", default_value = "ferry-system")]
        namespace: String,
        /// Secret with root-cert.pem and root-key.pem (and optionally trust-bundle.pem); created
        /// with a new root if absent.
        #[arg(long, default_value = "ferry-ca")]
        ca_secret: String,
        /// ConfigMap the root certificate is published in (the agents' caDir).
        #[arg(long, default_value = "ferry-ca-root")]
        root_config_map: String,
        /// The agents' service account (in --namespace): the only requester served.
        #[arg(long, default_value = "ferry-agent")]
        agent_service_account: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity of the certificates signed, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        cert_ttl: std::time::Duration,
        /// Where `/metrics` (certificates signed, requests refused by reason) and
        /// `/healthz/ready` are served.
        #[arg(long, default_value = "0.0.0.0:15014")]
        metrics_addr: std::net::SocketAddr,
        /// Requests still unanswered this long after they were made are deleted instead of
        /// answered: their agent stopped waiting after 60 s and asked again. So the requests
        /// made while the signer was down neither pile up nor delay the fresh ones after it.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        abandoned_after: std::time::Duration,
        /// Log output format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Manage the file CA of the embedded default.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Summary of the agent: node, uptime, workloads, policies, connections.
    ///
    /// Example: ferry status
    Status,
    /// Workloads the agent knows, whether they are meshed and captured here, with identity and netns.
    ///
    /// Example: ferry workloads -o json
    Workloads,
    /// Services the agent knows (Kubernetes mode).
    ///
    /// Example: ferry services
    Services,
    /// Authorization policies in force, with warnings (e.g. L7 fields that L4 cannot enforce).
    ///
    /// Example: ferry policies
    Policies,
    /// Certificates of the local workloads: identity, serial, validity, root.
    ///
    /// Example: ferry certs
    Certs,
    /// Connections being proxied now: addresses, identities, bytes, age, path.
    ///
    /// Example: ferry connections
    Connections,
    /// Recent connection events (opened, closed, denied, failed).
    ///
    /// Example: ferry flows --follow --denied
    Flows {
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
        /// Only denied connections.
        #[arg(long)]
        denied: bool,
    },
    /// Ask the policy engine about a connection.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The agent's Prometheus metrics.
    ///
    /// Example: ferry metrics | grep istio_tcp
    Metrics,
    /// Print the CustomResourceDefinition of Ferry's AuthorizationPolicy (generated from the
    /// policy types: the deploy manifests embed this output).
    ///
    /// Example: ferry crd | kubectl apply -f -
    Crd,
    /// Print a shell completion script.
    ///
    /// Example: ferry completions bash > /etc/bash_completion.d/ferry
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// What the policy engine would decide, and which policy and rule decide it. Exits 1 on deny.
    ///
    /// Example: ferry policy check --from default/frontend --to default/backend:8080
    Check {
        /// The source: namespace/serviceaccount (an mTLS identity) or an IP.
        #[arg(long, value_name = "NS/SA|IP")]
        from: String,
        /// The destination: ip:port or namespace/workload:port.
        #[arg(long, value_name = "IP:PORT|NS/NAME:PORT")]
        to: String,
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
