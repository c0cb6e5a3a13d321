//! Discovery: where the agent learns about workloads. The static file is the embedded default;
//! each read yields a whole new config, turned into [`State`](crate::state::State) by the agent.
//! With `--kube`, [`kube`] supplies the workloads instead (the file still gives the settings), and
//! [`marks`] tells agents on other nodes which of this node's pods are captured; [`objects`] are
//! the API's objects as the agent reads them.

pub mod kube;
pub mod marks;
mod objects;

use std::path::PathBuf;

use crate::config::{Config, ConfigError};

/// The static YAML config file, re-read on SIGHUP.
#[derive(Debug, Clone)]
pub struct StaticFile {
    pub path: PathBuf,
    /// This node's name, if given outside the file.
    pub node: Option<String>,
}

impl StaticFile {
    pub fn read(&self) -> Result<Config, ConfigError> {
        Config::load(&self.path, self.node.as_deref())
    }
}
