use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use ferry::{
    agent,
    cli::{CaCommand, Cli, Command},
    identity::{FileCa, ROOT_CERT_FILE, SpiffeId, write_private},
    inpod,
    signer::{self, review::Authority},
    telemetry,
};

/// jemalloc instead of glibc's malloc: with many threads, glibc keeps freed memory in per-thread
/// arenas, so the agent's RSS ratchets up with every connection peak and never comes back.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A background thread returns pages freed for a second to the kernel even when the agent idles
/// (otherwise purging waits for the next allocation). Each thread keeps freed blocks of up to
/// 64 KiB for reuse (jemalloc's default stops at 32 KiB): every proxied connection takes a
/// 64 KiB read buffer, which otherwise goes to and from the shared arena.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000,tcache_max:65536\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            use kube::CustomResourceExt;
            match serde_yaml::to_string(&ferry::policy::AuthorizationPolicyResource::crd()) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ferry crd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Agent { config, log_format, kube, node } => {
            // Before any thread exists: the agent's own netns, to come back to from pods.
            inpod::init();
            let log = telemetry::init_logging(log_format);
            serve(agent::run(agent::Options { config, node, kube }, log))
        }
        Command::Signer {
            namespace,
            ca_secret,
            root_config_map,
            agent_service_account,
            trust_domain,
            cert_ttl,
            metrics_addr,
            abandoned_after,
            log_format,
        } => {
            telemetry::init_logging(log_format);
            let authority =
                Authority { trust_domain, agent_namespace: namespace.clone(), agent_service_account };
            let options = signer::Options {
                namespace,
                ca_secret,
                root_config_map,
                authority,
                cert_ttl,
                metrics_addr,
                abandoned_after,
            };
            serve(signer::run(options))
        }
        Command::Ca { command } => match ca(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => ferry::cli::run(cli),
    }
}

/// Runs a long-lived command on a multi-threaded runtime; its error is logged, and the log
/// written out before the process exits.
fn serve(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let workers = std::env::var("FERRY_WORKER_THREADS").ok().and_then(|v| v.parse().ok());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.unwrap_or_else(default_workers))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry::flush_logs();
    code
}

/// Half the CPUs this process may use, at least one and at most two (ztunnel's default): the
/// node's cores are for its pods. On two cores one worker is faster too: a second one mostly
/// wakes up to find nothing to steal, and each such wake-up is a futex call and an IPI
/// (cross-node new connections +13%, same-node +8%, round trips unchanged).
fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).clamp(1, 2)
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir } => {
            FileCa::init(&dir)?;
            println!("CA ready: {}", dir.join(ROOT_CERT_FILE).display());
        }
        CaCommand::Issue { dir, identity, cert, key, ttl } => {
            let id = SpiffeId::parse(&identity)?;
            let issued = FileCa::load(&dir)?.issue(&id, ttl)?;
            let (chain_pem, key_pem) = issued.to_pem();
            std::fs::write(&cert, chain_pem).with_context(|| format!("writing {}", cert.display()))?;
            write_private(&key, &key_pem).with_context(|| format!("writing {}", key.display()))?;
            println!("issued {id} (serial {}) to {}", issued.serial, cert.display());
        }
    }
    Ok(())
}
