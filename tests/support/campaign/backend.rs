//! The backend of a schedule: started and faulted by the run ([`Backend`]), read by the observer
//! and the convergence check straight from the source, never through the proxy the operator
//! goes through ([`BackendReader`]).
//!
//! - nbd: a qemu-storage-daemon of the schedule's own; its exports are `query-block-exports` on
//!   the daemon's own QMP socket.
//! - csi: a Kubernetes mock CSI plugin of the schedule's own; its connections are its own publish
//!   record (`CsiPlugin::controller_published_nodes`), asked on the plugin's own socket.

use super::plan::{Backend as Kind, Plan};
use crate::support::csi::{self, CsiPlugin};
use crate::support::grpc_proxy::{Fault as GrpcFault, GrpcProxy};
use crate::support::qmp_proxy::QmpProxy;
use crate::support::qsd::Qsd;
use safe_detach::config::DriverEntry;
use safe_detach::driver::csi::CsiConfig;
use safe_detach::driver::nbd::NbdConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// A (backend volume handle, node) pair the backend connects.
pub type Pair = (String, String);

/// The driver calls' deadline, as the operator's configuration writes it.
const DEADLINE: &str = "2s";
/// How long the observer waits for the backend's answer before it counts the round's reading as
/// failed.
const READ_WITHIN: Duration = Duration::from_secs(2);

pub enum Backend {
    Nbd {
        qsd: Qsd,
        proxy: Arc<QmpProxy>,
    },
    Csi {
        plugin: Box<CsiPlugin>,
        proxy: GrpcProxy,
    },
}

impl Backend {
    /// Starts the backend of `plan` with its backend volumes; returns it and the handle each plan
    /// handle has on it (the plan's own on nbd, the plugin's volume id on csi).
    pub async fn start(plan: &Plan) -> (Self, BTreeMap<String, String>) {
        let handles: BTreeSet<&String> = plan.volumes.iter().map(|v| &v.handle).collect();
        let mut on_backend = BTreeMap::new();
        match plan.backend {
            Kind::Nbd => {
                let qsd = Qsd::start();
                for handle in handles {
                    qsd.create_image(handle);
                    on_backend.insert(handle.clone(), handle.clone());
                }
                let proxy = Arc::new(
                    QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await,
                );
                (Self::Nbd { qsd, proxy }, on_backend)
            }
            Kind::Csi => {
                let plugin = CsiPlugin::start().await;
                for handle in handles {
                    let id = plugin
                        .create_volume(&format!("campaign-{}-{handle}", plan.seed))
                        .await;
                    on_backend.insert(handle.clone(), id);
                }
                let proxy = GrpcProxy::start(plugin.socket(), &plugin.dir().join("proxy.sock"));
                (
                    Self::Csi {
                        plugin: Box::new(plugin),
                        proxy,
                    },
                    on_backend,
                )
            }
        }
    }

    /// The operator's driver, named as the Volumes name it, reaching the backend through the
    /// proxy.
    pub fn driver_entry(&self) -> DriverEntry {
        match self {
            Self::Nbd { qsd, proxy } => {
                DriverEntry::nbd(self.driver_name(), qsd.config_via(proxy.socket()))
            }
            // The mock lists every volume as published on its node, so the driver does not
            // trust its listing: it confirms on an OK publish and unpublish.
            Self::Csi { proxy, .. } => DriverEntry::csi(
                self.driver_name(),
                CsiConfig {
                    endpoint: proxy.socket().to_owned(),
                    trust_published_nodes: false,
                },
            ),
        }
        .with_deadline(DEADLINE)
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            Self::Nbd { .. } => "nbd",
            Self::Csi { .. } => "csi",
        }
    }

    /// The nbd daemon as reached past the proxy: for what the workload does behind the
    /// operator's back.
    pub fn daemon(&self) -> Option<NbdConfig> {
        match self {
            Self::Nbd { qsd, .. } => Some(qsd.config()),
            Self::Csi { .. } => None,
        }
    }

    /// The reader the observer and the convergence check use.
    pub fn reader(&self, handles: &BTreeMap<String, String>) -> BackendReader {
        match self {
            Self::Nbd { qsd, .. } => BackendReader::Qmp(qsd.qmp_socket()),
            Self::Csi { plugin, .. } => BackendReader::Csi {
                socket: plugin.socket().to_owned(),
                handles: handles.values().cloned().collect(),
            },
        }
    }

    /// Every fault lifted: nothing armed, every call answered.
    pub async fn heal(&self) {
        match self {
            Self::Nbd { proxy, .. } => {
                proxy.disarm();
                proxy.set_refusing(false).await;
            }
            Self::Csi { proxy, .. } => {
                for method in CSI_METHODS {
                    proxy.disarm(method);
                }
            }
        }
    }

    /// The nbd daemon's proxy, for its faults.
    pub fn qmp_proxy(&self) -> Option<&QmpProxy> {
        match self {
            Self::Nbd { proxy, .. } => Some(proxy),
            Self::Csi { .. } => None,
        }
    }

    /// The csi plugin's proxy, for its faults.
    pub fn grpc_proxy(&self) -> Option<&GrpcProxy> {
        match self {
            Self::Csi { proxy, .. } => Some(proxy),
            Self::Nbd { .. } => None,
        }
    }

    /// Kills the daemon and starts it again (nbd).
    pub fn restart_daemon(&mut self) -> bool {
        match self {
            Self::Nbd { qsd, .. } => {
                tokio::task::block_in_place(|| qsd.restart());
                true
            }
            Self::Csi { .. } => false,
        }
    }

    /// How the backend's process exited by itself, if it did: a real backend can crash (QEMU 7.2
    /// has segfaulted here), and its supervisor would start it again ([`Backend::recover`]).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self {
            Self::Nbd { qsd, .. } => qsd.exited(),
            Self::Csi { plugin, .. } => plugin.exited(),
        }
    }

    /// Starts the crashed daemon again. The mock plugin cannot be: it would forget what it
    /// published, which no real backend does, so a crashed plugin stays a failed schedule.
    pub fn recover(&mut self) -> bool {
        self.restart_daemon()
    }

    /// How many forced detaches reached the backend: the nbd driver's hard `block-export-del`
    /// (the csi driver's force is the same unpublish as its detach, not told apart).
    pub fn hard_deletes(&self) -> usize {
        match self {
            Self::Nbd { proxy, .. } => proxy
                .calls()
                .iter()
                .filter(|c| c.command == "block-export-del" && c.arguments["mode"] == "hard")
                .count(),
            Self::Csi { .. } => 0,
        }
    }

    /// What the backend itself logged, for a report (the plugin's; the daemon logs nothing of
    /// use here).
    pub fn log_tail(&self) -> Option<String> {
        match self {
            Self::Csi { plugin, .. } => {
                let log = plugin.log();
                let lines: Vec<&str> = log.lines().collect();
                Some(lines[lines.len().saturating_sub(30)..].join("\n"))
            }
            Self::Nbd { .. } => None,
        }
    }
}

/// The CSI methods the `csi` driver calls on the schedule's plugin.
pub const CSI_METHODS: [&str; 2] = [
    "/csi.v1.Controller/ControllerPublishVolume",
    "/csi.v1.Controller/ControllerUnpublishVolume",
];

/// Every CSI call answered `UNAVAILABLE`, as by a plugin that is down.
pub fn plugin_down() -> GrpcFault {
    GrpcFault::Fail {
        code: tonic::Code::Unavailable,
        message: "the plugin is down (injected by the campaign)".into(),
    }
}

/// How the observer reads the backend: straight from the source.
#[derive(Clone, Debug)]
pub enum BackendReader {
    /// The daemon's own QMP socket.
    Qmp(PathBuf),
    /// The plugin's own socket, and the volume ids of the schedule.
    Csi {
        socket: PathBuf,
        handles: BTreeSet<String>,
    },
}

/// What the backend connects: the pairs, and what it lists that is no pair (an export id the
/// nbd driver would not have made).
#[derive(Clone, Debug, Default)]
pub struct Connections {
    pub pairs: BTreeSet<Pair>,
    pub unparsed: Vec<String>,
}

impl BackendReader {
    pub async fn connections(&self) -> Result<Connections, String> {
        match self {
            Self::Qmp(socket) => {
                let ids = super::observe::query_exports(socket).await?;
                let mut connections = Connections::default();
                for id in ids {
                    match safe_detach::driver::nbd::parse_export_id(&id) {
                        Some((handle, node)) => {
                            connections
                                .pairs
                                .insert((handle.to_owned(), node.to_owned()));
                        }
                        None => connections.unparsed.push(id),
                    }
                }
                Ok(connections)
            }
            Self::Csi { socket, handles } => {
                let mut connections = Connections::default();
                for handle in handles {
                    let nodes =
                        tokio::time::timeout(READ_WITHIN, csi::published_nodes(socket, handle))
                            .await
                            .map_err(|_| {
                                format!("the plugin did not answer within {READ_WITHIN:?}")
                            })??;
                    for node in nodes {
                        connections.pairs.insert((handle.clone(), node));
                    }
                }
                Ok(connections)
            }
        }
    }
}
