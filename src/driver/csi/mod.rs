//! The `csi` driver: any CSI controller plugin, over its gRPC unix socket.
//!
//! - [`Driver::attach`] is `ControllerPublishVolume` to the request's node, with a mount capability
//!   in `SINGLE_NODE_WRITER` mode (the volume belongs to one node at a time) and the request's
//!   `read_only` flag. The request's connector map travels as the call's `volume_context`: it
//!   describes the initiator, it is not a secret. The answer is the plugin's `publish_context`,
//!   plus [`NODE_ID_KEY`] and [`DRIVER_KEY`].
//! - [`Driver::terminate_connection`] is `ControllerUnpublishVolume`; [`Driver::detach`] does
//!   nothing. CSI has one call for both halves, and doing it in `terminate_connection` means the
//!   connection is gone as soon as the first half returns, which is what a probe after it expects.
//!   A publish reserves nothing else that `detach` would release.
//! - [`Driver::force_detach`] is `ControllerUnpublishVolume` too: CSI has no "hard" variant. Like
//!   every unpublish, it cannot cut off a node's users: the plugin may refuse
//!   (`FAILED_PRECONDITION`, reported as [`DriverError::InUse`]).
//! - [`Driver::probe`] needs the plugin's `LIST_VOLUMES_PUBLISHED_NODES` capability: only then
//!   does the spec oblige `published_node_ids` to be filled in (in `ControllerGetVolume` as in
//!   `ListVolumes`). With it, probe asks `ControllerGetVolume` when the plugin has `GET_VOLUME`, else
//!   pages through `ListVolumes`. Without it, probe fails with [`DriverError::Invalid`] ("cannot be
//!   probed"): the plugin's empty list would mean nothing, and nothing may be concluded from it.
//!   The spec lets a plugin list nodes it is not published to; the answer can only err towards
//!   "connected", never towards "detached".
//!
//! Every call opens its own connection to the socket, so a failure to connect is known to have
//! sent nothing ([`DriverError::Unreachable`]), and carries a deadline (the driver entry's
//! configured `deadline`), sent to the plugin as the gRPC timeout and enforced here. Status codes
//! map as the external-attacher reads them:
//! `DEADLINE_EXCEEDED` is a [`DriverError::Timeout`]; `CANCELLED`, `UNAVAILABLE`, `ABORTED`,
//! `RESOURCE_EXHAUSTED` and a connection lost after sending are a [`DriverError::LostReply`] (the call
//! may have happened); `INVALID_ARGUMENT`, `OUT_OF_RANGE` and `UNIMPLEMENTED` are
//! [`DriverError::Invalid`]; `NOT_FOUND` is [`DriverError::UnknownVolume`] for a publish or a probe
//! (or [`DriverError::Invalid`] when `ControllerGetVolume` shows the volume exists, so the node was
//! unknown); for an unpublish it is [`DriverError::Refused`], never success, since the spec says
//! it does not mean unpublished; `FAILED_PRECONDITION` is [`DriverError::InUse`] for an
//! unpublish and [`DriverError::HeldElsewhere`] for an exclusive publish; anything else is a
//! definite failure, [`DriverError::Refused`].
//!
//! The Kubernetes project's hostpath plugin cannot be probed: it advertises `GET_VOLUME` and
//! `LIST_VOLUMES` but not `LIST_VOLUMES_PUBLISHED_NODES`; the node it lists is the one recorded by
//! `NodePublishVolume`, not by `ControllerPublishVolume`; and (in its recent sources) its
//! `ControllerGetVolume` answers an unknown volume with success and no nodes, which read naively
//! would be "detached".
//!
//! The parts: `config` (where the plugin listens), `capabilities` (what the plugin says about
//! itself), `transport` (one connection and one deadline per call, and how a failed call is
//! classified) and, here, the driver.

mod capabilities;
mod config;
pub mod proto;
mod transport;

pub use capabilities::{ControllerCapabilities, PluginInfo, ProbeMethod};
pub use config::CsiConfig;

use super::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use proto::controller_client::ControllerClient;
use proto::identity_client::IdentityClient;
use proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
use std::path::Path;
use std::time::Duration;
use tonic::{Code, Status};
use transport::{Failure, Transport, describe};

/// The key of [`ConnectionInfo`] that names the node the volume was published to.
pub const NODE_ID_KEY: &str = "csi.nodeId";
/// The key of [`ConnectionInfo`] that names the plugin (its `GetPluginInfo` name).
pub const DRIVER_KEY: &str = "csi.driver";
/// The deadline of each gRPC call unless [`CsiDriver::with_call_timeout`] sets another.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// At most this many `ListVolumes` pages are read for one probe.
const MAX_LIST_PAGES: usize = 10_000;
/// A CSI controller plugin as a [`Driver`].
#[derive(Clone, Debug)]
pub struct CsiDriver {
    transport: Transport,
    plugin: PluginInfo,
    trust_published_nodes: bool,
}

impl CsiDriver {
    /// Connects to the plugin and reads `GetPluginInfo` and `ControllerGetCapabilities`, with
    /// [`DEFAULT_CALL_TIMEOUT`] on each. Fails with [`DriverError::Invalid`] when the plugin lacks
    /// `PUBLISH_UNPUBLISH_VOLUME`: such a plugin has nothing to attach or detach.
    pub async fn connect(config: &CsiConfig) -> Result<Self, DriverError> {
        Self::connect_with_timeout(config, DEFAULT_CALL_TIMEOUT).await
    }

    /// [`CsiDriver::connect`] with another deadline for each call, now and later: the operator
    /// gives the driver's configured `deadline`.
    pub async fn connect_with_timeout(
        config: &CsiConfig,
        call_timeout: Duration,
    ) -> Result<Self, DriverError> {
        let transport = Transport {
            socket: config.socket_path(),
            call_timeout,
        };
        let info = transport
            .call(
                "GetPluginInfo",
                proto::GetPluginInfoRequest {},
                |channel, request| async move {
                    IdentityClient::new(channel).get_plugin_info(request).await
                },
            )
            .await
            .map_err(|failure| transport.classify("GetPluginInfo", failure))?;
        let reply = transport
            .call(
                "ControllerGetCapabilities",
                proto::ControllerGetCapabilitiesRequest {},
                |channel, request| async move {
                    ControllerClient::new(channel)
                        .controller_get_capabilities(request)
                        .await
                },
            )
            .await
            .map_err(|failure| transport.classify("ControllerGetCapabilities", failure))?;
        let capabilities = ControllerCapabilities::from_reply(&reply);
        let plugin = PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            capabilities,
        };
        if !capabilities.publish_unpublish_volume {
            return Err(DriverError::Invalid(format!(
                "CSI plugin {} at {} does not advertise PUBLISH_UNPUBLISH_VOLUME: it has no \
                 controller attach to manage",
                plugin.name,
                transport.socket.display()
            )));
        }
        tracing::info!(
            plugin = %plugin.name,
            version = %plugin.vendor_version,
            socket = %transport.socket.display(),
            deadline = ?transport.call_timeout,
            probe = ?capabilities.probe_method(),
            ?capabilities,
            "connected to CSI plugin"
        );
        Ok(Self {
            transport,
            plugin,
            trust_published_nodes: config.trust_published_nodes,
        })
    }

    /// The same driver with another deadline for each call.
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.transport.call_timeout = call_timeout;
        self
    }

    /// What the plugin said about itself.
    pub fn plugin(&self) -> &PluginInfo {
        &self.plugin
    }

    /// The plugin's socket.
    pub fn socket(&self) -> &Path {
        &self.transport.socket
    }

    /// The deadline of each call.
    pub fn call_timeout(&self) -> Duration {
        self.transport.call_timeout
    }
    async fn unpublish(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        check_ids(volume_handle, node)?;
        let request = proto::ControllerUnpublishVolumeRequest {
            volume_id: volume_handle.to_owned(),
            node_id: node.to_owned(),
            secrets: Default::default(),
        };
        let result = self
            .transport
            .call(
                "ControllerUnpublishVolume",
                request,
                |channel, request| async move {
                    ControllerClient::new(channel)
                        .controller_unpublish_volume(request)
                        .await
                },
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // The spec: "the volume or node does not exist and the volume is *not* assumed
            // unpublished". A plugin that can regard it unpublished answers OK; this is no word
            // of "detached", and the call is retried.
            Err(Failure::Status(status)) if status.code() == Code::NotFound => {
                Err(DriverError::Refused(format!(
                    "ControllerUnpublishVolume answered NOT_FOUND ({}): the plugin does not know the volume or the node, and does not say it is unpublished",
                    describe(&status)
                )))
            }
            Err(Failure::Status(status)) if status.code() == Code::FailedPrecondition => {
                Err(DriverError::InUse {
                    volume: volume_handle.to_owned(),
                    node: node.to_owned(),
                    message: describe(&status),
                })
            }
            Err(failure) => Err(self
                .transport
                .classify("ControllerUnpublishVolume", failure)),
        }
    }

    async fn get_volume(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        let request = proto::ControllerGetVolumeRequest {
            volume_id: volume_handle.to_owned(),
        };
        let reply = self
            .transport
            .call(
                "ControllerGetVolume",
                request,
                |channel, request| async move {
                    ControllerClient::new(channel)
                        .controller_get_volume(request)
                        .await
                },
            )
            .await
            .map_err(|failure| self.probe_error("ControllerGetVolume", volume_handle, failure))?;
        let status = reply.status.ok_or_else(|| {
            DriverError::Refused(format!(
                "ControllerGetVolume of {volume_handle:?} answered without the required status: \
                 the published nodes are unknown"
            ))
        })?;
        Ok(published(status.published_node_ids))
    }

    async fn list_volumes(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        let mut token = String::new();
        for _ in 0..MAX_LIST_PAGES {
            let request = proto::ListVolumesRequest {
                max_entries: 0,
                starting_token: token.clone(),
            };
            let page = self
                .transport
                .call("ListVolumes", request, |channel, request| async move {
                    ControllerClient::new(channel).list_volumes(request).await
                })
                .await
                .map_err(|failure| self.probe_error("ListVolumes", volume_handle, failure))?;
            let entry = page.entries.into_iter().find(|entry| {
                entry
                    .volume
                    .as_ref()
                    .is_some_and(|volume| volume.volume_id == volume_handle)
            });
            if let Some(entry) = entry {
                // With LIST_VOLUMES_PUBLISHED_NODES the spec requires the status; without it the
                // published nodes are unknown, as for ControllerGetVolume, not "none".
                let status = entry.status.ok_or_else(|| {
                    DriverError::Refused(format!(
                        "ListVolumes answered {volume_handle:?} without the required status: \
                         the published nodes are unknown"
                    ))
                })?;
                return Ok(published(status.published_node_ids));
            }
            if page.next_token.is_empty() {
                return Err(DriverError::UnknownVolume(volume_handle.to_owned()));
            }
            token = page.next_token;
        }
        Err(DriverError::Refused(format!(
            "ListVolumes did not end within {MAX_LIST_PAGES} pages"
        )))
    }

    fn probe_error(&self, operation: &'static str, volume: &str, failure: Failure) -> DriverError {
        match failure {
            Failure::Status(status) if status.code() == Code::NotFound => {
                DriverError::UnknownVolume(volume.to_owned())
            }
            failure => self.transport.classify(operation, failure),
        }
    }

    /// After a publish answered `NOT_FOUND`, which CSI uses for an unknown volume and an unknown
    /// node alike: asks `ControllerGetVolume`, where the plugin has it, which of the two it was.
    async fn not_found_on_publish(&self, request: &AttachRequest, status: &Status) -> DriverError {
        let unknown_node = || {
            DriverError::Invalid(format!(
                "CSI plugin {} does not know node {:?}: {}",
                self.plugin.name,
                request.node,
                describe(status)
            ))
        };
        if self.plugin.capabilities.get_volume {
            match self.get_volume(&request.volume_handle).await {
                Ok(_) => return unknown_node(),
                Err(DriverError::UnknownVolume(volume)) => {
                    return DriverError::UnknownVolume(volume);
                }
                // The question stays open; the volume is the likelier cause and either is final.
                Err(_) => {}
            }
        }
        DriverError::UnknownVolume(request.volume_handle.clone())
    }
}

#[async_trait]
impl Driver for CsiDriver {
    fn kind(&self) -> &'static str {
        "csi"
    }

    fn can_probe(&self) -> bool {
        self.trust_published_nodes
            && self.plugin.capabilities.probe_method() != ProbeMethod::Unsupported
    }

    /// The plugin was told the call's deadline as its gRPC timeout and should give up by then,
    /// but an operation it started (a cloud API's request) may outlive the cancelled call: one
    /// deadline more, after the call's deadline.
    fn settles_within(&self) -> Duration {
        self.transport.call_timeout
    }

    async fn health_check(&self) -> Result<(), DriverError> {
        self.transport
            .call(
                "Probe",
                proto::ProbeRequest {},
                |channel, request| async move { IdentityClient::new(channel).probe(request).await },
            )
            .await
            .map(drop)
            .map_err(|failure| self.transport.classify("Probe", failure))
    }

    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        if volume_handle.is_empty() {
            return Err(DriverError::Invalid("empty volume handle".into()));
        }
        match self.plugin.capabilities.probe_method() {
            ProbeMethod::GetVolume => self.get_volume(volume_handle).await,
            ProbeMethod::ListVolumes => self.list_volumes(volume_handle).await,
            ProbeMethod::Unsupported => Err(DriverError::Invalid(format!(
                "CSI plugin {} cannot be probed: it does not advertise LIST_VOLUMES_PUBLISHED_NODES, \
                 so it is not bound to report where volumes are published",
                self.plugin.name
            ))),
        }
    }

    async fn attach(&self, request: &AttachRequest) -> Result<ConnectionInfo, DriverError> {
        check_ids(&request.volume_handle, &request.node)?;
        if request.read_only && !self.plugin.capabilities.publish_readonly {
            return Err(DriverError::Invalid(format!(
                "CSI plugin {} cannot publish read-only (no PUBLISH_READONLY capability)",
                self.plugin.name
            )));
        }
        let publish = proto::ControllerPublishVolumeRequest {
            volume_id: request.volume_handle.clone(),
            node_id: request.node.clone(),
            volume_capability: Some(proto::VolumeCapability {
                // A single-node mode is the plugin's promise to refuse a second node, checked
                // where the publish records live: the exclusivity check and the publish are one.
                access_mode: Some(AccessMode {
                    mode: if request.exclusive {
                        Mode::SingleNodeWriter.into()
                    } else {
                        Mode::MultiNodeMultiWriter.into()
                    },
                }),
                access_type: Some(AccessType::Mount(MountVolume::default())),
            }),
            readonly: request.read_only,
            secrets: Default::default(),
            volume_context: request
                .connector
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let result = self
            .transport
            .call(
                "ControllerPublishVolume",
                publish,
                |channel, request| async move {
                    ControllerClient::new(channel)
                        .controller_publish_volume(request)
                        .await
                },
            )
            .await;
        match result {
            Ok(reply) => {
                let mut info: ConnectionInfo = reply.publish_context.into_iter().collect();
                info.insert(NODE_ID_KEY.to_owned(), request.node.clone());
                info.insert(DRIVER_KEY.to_owned(), self.plugin.name.clone());
                Ok(info)
            }
            Err(Failure::Status(status)) if status.code() == Code::NotFound => {
                Err(self.not_found_on_publish(request, &status).await)
            }
            // FAILED_PRECONDITION: "published at another node and does not have MULTI_NODE
            // volume capability" (the spec's only meaning of it for this call).
            Err(Failure::Status(status))
                if status.code() == Code::FailedPrecondition && request.exclusive =>
            {
                Err(DriverError::HeldElsewhere {
                    volume: request.volume_handle.clone(),
                    holders: Vec::new(),
                })
            }
            // ALREADY_EXISTS: published here incompatibly.
            Err(failure) => Err(self.transport.classify("ControllerPublishVolume", failure)),
        }
    }

    async fn terminate_connection(
        &self,
        volume_handle: &str,
        node: &str,
    ) -> Result<(), DriverError> {
        self.unpublish(volume_handle, node).await
    }

    /// Nothing to do: `terminate_connection` already unpublished, and CSI reserves nothing else.
    async fn detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        check_ids(volume_handle, node)
    }

    async fn force_detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        self.unpublish(volume_handle, node).await
    }
}
/// The nodes of a `published_node_ids` list. An empty string names no node (some plugins list
/// one for a volume published nowhere), so it is left out.
fn published(node_ids: Vec<String>) -> Connections {
    Connections::to(node_ids.into_iter().filter(|node| !node.is_empty()))
}

/// An empty node id would ask the plugin to unpublish from every node; an empty volume id is
/// never valid. Neither is sent.
fn check_ids(volume_handle: &str, node: &str) -> Result<(), DriverError> {
    if volume_handle.is_empty() {
        return Err(DriverError::Invalid("empty volume handle".into()));
    }
    if node.is_empty() {
        return Err(DriverError::Invalid("empty node id".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn driver() -> CsiDriver {
        CsiDriver {
            transport: Transport {
                socket: PathBuf::from("/nonexistent"),
                call_timeout: Duration::from_secs(3),
            },
            trust_published_nodes: true,
            plugin: PluginInfo {
                name: "test".into(),
                vendor_version: "0".into(),
                capabilities: ControllerCapabilities::default(),
            },
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let driver = driver();
        assert!(matches!(
            driver.unpublish("v", "n").await,
            Err(DriverError::Unreachable(_))
        ));
        let config = CsiConfig {
            endpoint: "/nonexistent/csi.sock".into(),
            trust_published_nodes: true,
        };
        assert!(matches!(
            CsiDriver::connect(&config).await,
            Err(DriverError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn empty_ids_are_never_sent() {
        let driver = driver();
        // Not Unreachable: rejected before connecting.
        assert!(matches!(
            driver.terminate_connection("v", "").await,
            Err(DriverError::Invalid(_))
        ));
        assert!(matches!(
            driver.force_detach("", "n").await,
            Err(DriverError::Invalid(_))
        ));
        assert!(matches!(
            driver.probe("").await,
            Err(DriverError::Invalid(_))
        ));
    }
}
