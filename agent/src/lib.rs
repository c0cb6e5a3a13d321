//! Ferry's node agent. See docs/architecture.md for where a packet goes and which module does
//! each step.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod identity;
pub mod inpod;
pub mod policy;
pub mod proxy;
pub mod signer;
pub mod state;
pub mod telemetry;
pub mod upgrade;
