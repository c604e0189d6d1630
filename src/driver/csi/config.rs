//! Where the plugin listens, as the operator's configuration file gives it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the plugin listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CsiConfig {
    /// The plugin's unix socket: a path, or `unix://` followed by a path.
    pub endpoint: PathBuf,
    /// Whether to trust the plugin's published-node report (default true). Set it to false for a
    /// plugin whose report does not follow ControllerPublish (the hostpath plugin reports the
    /// nodes of NodePublish; the Kubernetes mock plugin reports its node for every volume): the
    /// operator then never probes, and confirmation rests on the CSI spec's guarantee that an OK
    /// ControllerPublish or ControllerUnpublish means published or unpublished.
    #[serde(default = "trust_by_default")]
    pub trust_published_nodes: bool,
}

fn trust_by_default() -> bool {
    true
}

impl CsiConfig {
    /// The socket path, without a `unix://` prefix.
    pub fn socket_path(&self) -> PathBuf {
        match self
            .endpoint
            .to_str()
            .and_then(|s| s.strip_prefix("unix://"))
        {
            Some(path) => PathBuf::from(path),
            None => self.endpoint.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_camel_case_and_rejects_unknown_fields() {
        let config: CsiConfig =
            serde_json::from_str(r#"{"endpoint": "unix:///run/csi/csi.sock"}"#).unwrap();
        assert_eq!(config.socket_path(), PathBuf::from("/run/csi/csi.sock"));
        let plain: CsiConfig = serde_json::from_str(r#"{"endpoint": "/run/csi.sock"}"#).unwrap();
        assert_eq!(plain.socket_path(), PathBuf::from("/run/csi.sock"));
        assert!(serde_json::from_str::<CsiConfig>(r#"{"endpoint": "/x", "other": 1}"#).is_err());
        assert!(serde_json::from_str::<CsiConfig>("{}").is_err());
    }
}
