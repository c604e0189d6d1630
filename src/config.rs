//! The operator's configuration file: its drivers and defaults, read and validated once at start
//! so that a mistake stops the operator with a clear message instead of failing attachments later.
//!
//! ```yaml
//! defaultStuckAfter: 2m      # a Volume's stuckAfter when it sets none
//! resyncInterval: 60s        # how often converged objects are checked against the backend
//! concurrency: 16            # reconciles at once: of attachments being deleted, and of other
//!                            # attachments, each; and of Volumes
//! kubeApiQps: 500            # requests a second to the Kubernetes API, on average; 0: no limit
//! kubeApiBurst: 1000         # requests at once after a quiet spell; unset: twice kubeApiQps
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
use std::num::NonZeroU32;
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
    #[error("kubeApiQps: {0} is more than {MAX_QPS}; 0 turns the limit off")]
    Qps(u32),
    #[error("kubeApiBurst: {0} is not at least 1")]
    Burst(u32),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_api_qps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_api_burst: Option<u32>,
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
    /// The client-side bound on the controllers' requests to the Kubernetes API; `None`: the
    /// apiserver's own priority and fairness alone.
    pub api_rate: Option<ApiRate>,
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
/// Requests a second by default: the rate of the CSI external-attacher's tuned flags, below the
/// ~625 status writes a second a 2-core control plane takes from a plain client, and above what
/// the operator sends in a storm there (~300), so that it binds only on a smaller apiserver's
/// behalf or when set lower.
const DEFAULT_QPS: u32 = 500;
/// A bound on `kubeApiQps`: past it the bucket's refill would round to no wait at all.
const MAX_QPS: u32 = 100_000;

/// A token bucket for the requests to the Kubernetes API: `qps` a second on average, up to
/// `burst` at once after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiRate {
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
}

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
        one_entry_per_backend(&file.drivers)?;
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
            api_rate: api_rate(file.kube_api_qps, file.kube_api_burst)?,
            drivers,
        })
    }
}

/// The rate limit `kubeApiQps` and `kubeApiBurst` ask for: none for a rate of 0; unset, a burst
/// of two seconds' worth, as client-go's defaults (5 and 10) and the external-attacher's tuned
/// flags (500 and 1000) have it.
fn api_rate(qps: Option<u32>, burst: Option<u32>) -> Result<Option<ApiRate>, ConfigError> {
    let qps = qps.unwrap_or(DEFAULT_QPS);
    if qps > MAX_QPS {
        return Err(ConfigError::Qps(qps));
    }
    let Some(qps) = NonZeroU32::new(qps) else {
        return Ok(None);
    };
    let burst = match burst {
        None => NonZeroU32::new(qps.get().saturating_mul(2)).unwrap_or(qps),
        Some(n) => NonZeroU32::new(n).ok_or(ConfigError::Burst(n))?,
    };
    Ok(Some(ApiRate { qps, burst }))
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

/// Refuses two entries that reach one backend (the same QMP socket, or the same CSI endpoint)
/// under two names. The operator knows a backend volume by its driver's name and handle: two
/// names for one backend would make two volumes of one, each taking turns of its own, each
/// cutting the other's connections on a detach and forcing them off as orphans.
fn one_entry_per_backend(entries: &[DriverEntry]) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for entry in entries {
        let address = match (&entry.nbd, &entry.csi) {
            (Some(nbd), _) => format!("qmpSocket {}", same_file(&nbd.qmp_socket).display()),
            (None, Some(csi)) => {
                let endpoint = csi.endpoint.to_string_lossy();
                let path = endpoint.strip_prefix("unix://").unwrap_or(&endpoint);
                format!("endpoint {}", same_file(Path::new(path)).display())
            }
            (None, None) => continue,
        };
        if let Some(first) = seen.insert(address.clone(), &entry.name) {
            return Err(ConfigError::Driver {
                name: entry.name.clone(),
                message: format!(
                    "{address} is driver {first:?}'s too: one backend under two names would let each cut the other's connections; give each backend one entry"
                ),
            });
        }
    }
    Ok(())
}

/// One name for every way of writing a socket's path: its symbolic links and `..` resolved as
/// far as it exists already (a plugin may create its socket after the operator starts), its `.`
/// and repeated `/` dropped beyond that.
fn same_file(path: &Path) -> PathBuf {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return resolved;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            same_file(parent).join(name)
        }
        _ => path.components().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_backend_under_two_names_is_refused() {
        let nbd = |name: &str, qmp: &str| {
            DriverEntry::nbd(
                name,
                NbdConfig {
                    qmp_socket: qmp.into(),
                    nbd_socket: "/run/qsd/nbd.sock".into(),
                    image_dir: "/var/lib/images".into(),
                },
            )
        };
        let csi = |name: &str, endpoint: &str| {
            DriverEntry::csi(
                name,
                CsiConfig {
                    endpoint: endpoint.into(),
                    trust_published_nodes: true,
                },
            )
        };
        let refused =
            one_entry_per_backend(&[nbd("a", "/run/qmp.sock"), nbd("b", "/run/qmp.sock")])
                .expect_err("one QMP socket under two names");
        assert!(
            refused
                .to_string()
                .contains("qmpSocket /run/qmp.sock is driver \"a\"'s too"),
            "{refused}"
        );
        // `unix://`, `//`, `.` and a symbolic link are only ways of writing the same socket.
        assert!(
            one_entry_per_backend(&[csi("a", "unix:///csi/c.sock"), csi("b", "/csi/c.sock")])
                .is_err()
        );
        assert!(
            one_entry_per_backend(&[csi("a", "/csi//./c.sock"), csi("b", "/csi/c.sock")]).is_err()
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("qmp.sock");
        std::fs::write(&socket, "").expect("a file");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&socket, &link).expect("a symbolic link");
        // A socket not made yet, in a directory reached through a link.
        let linked_dir = dir.path().join("run");
        std::os::unix::fs::symlink(dir.path(), &linked_dir).expect("a symbolic link");
        assert!(
            one_entry_per_backend(&[
                csi("a", dir.path().join("later.sock").to_str().expect("UTF-8")),
                csi("b", linked_dir.join("later.sock").to_str().expect("UTF-8")),
            ])
            .is_err()
        );
        assert!(
            one_entry_per_backend(&[
                nbd("a", socket.to_str().expect("UTF-8")),
                nbd("b", link.to_str().expect("UTF-8")),
            ])
            .is_err()
        );
        assert!(
            one_entry_per_backend(&[
                nbd("a", "/run/a.sock"),
                nbd("b", "/run/b.sock"),
                csi("c", "unix:///csi/c.sock"),
                csi("d", "/csi/d.sock"),
            ])
            .is_ok()
        );
    }

    #[test]
    fn a_built_file_reads_back_as_written() {
        let file = ConfigFile {
            default_stuck_after: Some("30s".into()),
            resync_interval: Some("5s".into()),
            concurrency: None,
            kube_api_qps: Some(50),
            kube_api_burst: None,
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

    #[test]
    fn the_api_rate_is_500_a_second_unless_set_and_none_at_zero() {
        let rate = |qps: u32, burst: u32| ApiRate {
            qps: NonZeroU32::new(qps).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        assert_eq!(api_rate(None, None).unwrap(), Some(rate(500, 1000)));
        assert_eq!(api_rate(Some(50), None).unwrap(), Some(rate(50, 100)));
        assert_eq!(api_rate(Some(50), Some(10)).unwrap(), Some(rate(50, 10)));
        assert_eq!(api_rate(Some(0), Some(10)).unwrap(), None);
        assert!(matches!(
            api_rate(Some(50), Some(0)),
            Err(ConfigError::Burst(0))
        ));
        assert!(matches!(
            api_rate(Some(2_000_000_000), None),
            Err(ConfigError::Qps(2_000_000_000))
        ));
    }
}
