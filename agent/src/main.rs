use std::process::ExitCode;

use clap::Parser;
use ferry::{
    agent,
    cli::{Cli, Command},
    inpod, telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, log_format } => {
            // Before any thread exists: the agent's own netns, to come back to from pods.
            inpod::init();
            telemetry::init_logging(log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("ferry: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
