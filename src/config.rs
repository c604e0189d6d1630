//! The operator's configuration file: its drivers and defaults, read and validated once at start
//! so that a mistake stops the operator with a clear message instead of failing attachments later.
//!
//! ```yaml
//! defaultStuckAfter: 2m      # a Volume's stuckAfter when it sets none
//! resyncInterval: 60s        # how often converged objects are checked against the backend
//! concurrency: 16            # reconciles at once: of attachments being deleted, and of other
//!                            # attachments, each; and of Volumes
//! drivers:
//!   - name: nbd              # what Volume.spec.driver names
//!     deadline: 30s          # every call to this driver gives up after this (unknown outcome)
//!     nbd:
//!       qmpSocket: /run/qsd/qmp.sock
//!       nbdSocket: /run/qsd/nbd.sock
//!       imageDir: /var/lib/safe-detach/images
//!   - name: csi
//!     csi:
//!       endpoint: unix:///csi/csi.sock     # a CSI controller plugin's socket
//! ```

use crate::api::{DurationError, parse_duration};
use crate::driver::csi::{CsiConfig, CsiDriver};
use crate::driver::nbd::{NbdConfig, NbdDriver};
use crate::driver::{CallObserver, Deadlined, Driver};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {source}")]
    Duration {
        field: String,
        source: DurationError,
    },
    #[error("driver {name:?}: {message}")]
    Driver { name: String, message: String },
    #[error("no drivers configured: add at least one under `drivers`")]
    NoDrivers,
    #[error("concurrency: {0} is not between 1 and {MAX_CONCURRENCY}")]
    Concurrency(usize),
}

/// The configuration file as written, before it is validated: what [`Config::parse`] reads, and
/// what a program that writes one for the operator (a test, a deployment tool) builds. Its JSON
/// ([`ConfigFile::to_text`]) is a valid file too, since YAML reads JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_stuck_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    pub drivers: Vec<DriverEntry>,
}

/// One entry of `drivers`: a name Volumes use, a deadline, and exactly one backend section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriverEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CsiConfig>,
}

impl ConfigFile {
    /// The file's text. Fails only on a path that is not UTF-8.
    pub fn to_text(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

impl DriverEntry {
    pub fn nbd(name: impl Into<String>, nbd: NbdConfig) -> Self {
        Self {
            name: name.into(),
            deadline: None,
            nbd: Some(nbd),
            csi: None,
        }
    }

    pub fn csi(name: impl Into<String>, csi: CsiConfig) -> Self {
        Self {
            name: name.into(),
            deadline: None,
            nbd: None,
            csi: Some(csi),
        }
    }

    /// The same entry with its calls bounded by `deadline` (`5s`, `500ms`).
    pub fn with_deadline(mut self, deadline: impl Into<String>) -> Self {
        self.deadline = Some(deadline.into());
        self
    }
}

/// The validated configuration the operator runs with.
pub struct Config {
    pub default_stuck_after: Duration,
    pub resync_interval: Duration,
    /// How many reconciles run at once, in each of two lanes: attachments being deleted, and the
    /// other attachments; and as many Volume reconciles.
    pub concurrency: usize,
    /// Drivers by the name Volumes use, each call bounded by its deadline.
    pub drivers: BTreeMap<String, Arc<dyn Driver>>,
}

const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(120);
const DEFAULT_RESYNC: Duration = Duration::from_secs(60);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Reconciles at once per lane: 36 in all with the Volumes', well under the apiserver's default
/// of 200 mutating requests in flight, and enough to keep a storm at the apiserver's pace.
const DEFAULT_CONCURRENCY: usize = 16;
/// A bound on `concurrency`: the controller's own limit is a `u16`.
const MAX_CONCURRENCY: usize = 1024;

impl Config {
    /// Reads, validates and connects: a CSI plugin is asked for its identity and capabilities
    /// here, so that a wrong socket stops the operator at start. Every driver call is reported to
    /// `observer`.
    pub async fn load(path: &Path, observer: Arc<dyn CallObserver>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, observer)
            .await
            .map_err(|error| match error {
                ConfigError::Parse { message, .. } => ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                },
                other => other,
            })
    }

    pub async fn parse(text: &str, observer: Arc<dyn CallObserver>) -> Result<Self, ConfigError> {
        let file: ConfigFile = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        if file.drivers.is_empty() {
            return Err(ConfigError::NoDrivers);
        }
        let mut drivers = BTreeMap::new();
        for entry in file.drivers {
            let field = format!("drivers[{}].deadline", entry.name);
            let deadline = duration_or(&entry.deadline, DEFAULT_DEADLINE, &field)?;
            let driver_error = |message: String| ConfigError::Driver {
                name: entry.name.clone(),
                message,
            };
            let driver: Arc<dyn Driver> = match (entry.nbd, entry.csi) {
                (Some(nbd), None) => {
                    Arc::new(NbdDriver::new(nbd).map_err(|e| driver_error(e.to_string()))?)
                }
                // The plugin is told the same deadline the operator holds each call to, as the
                // gRPC timeout, so that it gives up when the operator does.
                (None, Some(csi)) => Arc::new(
                    CsiDriver::connect_with_timeout(&csi, deadline)
                        .await
                        .map_err(|e| driver_error(e.to_string()))?,
                ),
                _ => {
                    return Err(driver_error(
                        "give exactly one backend section: `nbd:` or `csi:`".into(),
                    ));
                }
            };
            let driver = Deadlined::new(driver, deadline).observed_by(observer.clone());
            if drivers
                .insert(entry.name.clone(), Arc::new(driver) as Arc<dyn Driver>)
                .is_some()
            {
                return Err(driver_error("configured twice".into()));
            }
        }
        Ok(Self {
            default_stuck_after: duration_or(
                &file.default_stuck_after,
                DEFAULT_STUCK_AFTER,
                "defaultStuckAfter",
            )?,
            resync_interval: duration_or(&file.resync_interval, DEFAULT_RESYNC, "resyncInterval")?,
            concurrency: match file.concurrency {
                None => DEFAULT_CONCURRENCY,
                Some(n @ 1..=MAX_CONCURRENCY) => n,
                Some(n) => return Err(ConfigError::Concurrency(n)),
            },
            drivers,
        })
    }
}

fn duration_or(
    text: &Option<String>,
    default: Duration,
    field: &str,
) -> Result<Duration, ConfigError> {
    text.as_deref()
        .map_or(Ok(default), parse_duration)
        .map_err(|source| ConfigError::Duration {
            field: field.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_file_reads_back_as_written() {
        let file = ConfigFile {
            default_stuck_after: Some("30s".into()),
            resync_interval: Some("5s".into()),
            concurrency: None,
            drivers: vec![
                DriverEntry::nbd(
                    "nbd",
                    NbdConfig {
                        qmp_socket: "/run/qsd/qmp.sock".into(),
                        nbd_socket: "/run/qsd/nbd.sock".into(),
                        image_dir: "/var/lib/images".into(),
                    },
                )
                .with_deadline("5s"),
                DriverEntry::csi(
                    "csi",
                    CsiConfig {
                        endpoint: "unix:///csi/csi.sock".into(),
                        trust_published_nodes: false,
                    },
                ),
            ],
        };
        let text = file.to_text().unwrap();
        assert!(text.contains("\"qmpSocket\""), "{text}");
        assert!(!text.contains("concurrency"), "{text}");
        let read: ConfigFile = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(read, file);
    }
}
