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
//! sent nothing ([`DriverError::Unreachable`]), and carries a deadline, sent to the plugin as the
//! gRPC timeout and enforced here. Status codes map as the external-attacher reads them:
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

pub mod proto;

use super::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use proto::controller_client::ControllerClient;
use proto::controller_service_capability::rpc::Type as Rpc;
use proto::identity_client::IdentityClient;
use proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
use serde::Deserialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// The key of [`ConnectionInfo`] that names the node the volume was published to.
pub const NODE_ID_KEY: &str = "csi.nodeId";
/// The key of [`ConnectionInfo`] that names the plugin (its `GetPluginInfo` name).
pub const DRIVER_KEY: &str = "csi.driver";
/// The deadline of each gRPC call unless [`CsiDriver::with_call_timeout`] sets another.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// At most this many `ListVolumes` pages are read for one probe.
const MAX_LIST_PAGES: usize = 10_000;

/// Where the plugin listens.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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

/// What the plugin said about itself when the driver connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// `GetPluginInfo.name`, e.g. `hostpath.csi.k8s.io`.
    pub name: String,
    pub vendor_version: String,
    /// The controller capabilities this driver cares about.
    pub capabilities: ControllerCapabilities,
}

/// The controller capabilities (`ControllerGetCapabilities`) that change what the driver does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControllerCapabilities {
    pub publish_unpublish_volume: bool,
    pub publish_readonly: bool,
    pub get_volume: bool,
    pub list_volumes: bool,
    pub list_volumes_published_nodes: bool,
}

/// How [`Driver::probe`] asks the plugin where a volume is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMethod {
    /// `ControllerGetVolume`: `GET_VOLUME` and `LIST_VOLUMES_PUBLISHED_NODES`.
    GetVolume,
    /// `ListVolumes`, paged: `LIST_VOLUMES` and `LIST_VOLUMES_PUBLISHED_NODES`.
    ListVolumes,
    /// The plugin does not report published nodes: every probe fails.
    Unsupported,
}

impl ControllerCapabilities {
    /// The probe the capabilities allow.
    pub fn probe_method(&self) -> ProbeMethod {
        match *self {
            Self {
                list_volumes_published_nodes: true,
                get_volume: true,
                ..
            } => ProbeMethod::GetVolume,
            Self {
                list_volumes_published_nodes: true,
                list_volumes: true,
                ..
            } => ProbeMethod::ListVolumes,
            _ => ProbeMethod::Unsupported,
        }
    }
}

/// A CSI controller plugin as a [`Driver`].
#[derive(Clone, Debug)]
pub struct CsiDriver {
    socket: PathBuf,
    call_timeout: Duration,
    plugin: PluginInfo,
    trust_published_nodes: bool,
}

/// How a call ended when it did not succeed: a gRPC status from the plugin (or from the transport
/// after sending), or a failure already classified (nothing sent, or the deadline passed).
enum Failure {
    Status(Status),
    Driver(DriverError),
}

impl CsiDriver {
    /// Connects to the plugin and reads `GetPluginInfo` and `ControllerGetCapabilities`, with
    /// [`DEFAULT_CALL_TIMEOUT`] on each. Fails with [`DriverError::Invalid`] when the plugin lacks
    /// `PUBLISH_UNPUBLISH_VOLUME`: such a plugin has nothing to attach or detach.
    pub async fn connect(config: &CsiConfig) -> Result<Self, DriverError> {
        Self::connect_with_timeout(config, DEFAULT_CALL_TIMEOUT).await
    }

    /// [`CsiDriver::connect`] with another deadline for each call, now and later.
    pub async fn connect_with_timeout(
        config: &CsiConfig,
        call_timeout: Duration,
    ) -> Result<Self, DriverError> {
        let mut driver = Self {
            socket: config.socket_path(),
            call_timeout,
            trust_published_nodes: config.trust_published_nodes,
            plugin: PluginInfo {
                name: String::new(),
                vendor_version: String::new(),
                capabilities: ControllerCapabilities::default(),
            },
        };
        let info = driver
            .call("GetPluginInfo", |channel| async move {
                IdentityClient::new(channel)
                    .get_plugin_info(driver_request(proto::GetPluginInfoRequest {}, call_timeout))
                    .await
            })
            .await
            .map_err(|failure| driver.classify("GetPluginInfo", failure))?;
        let reply = driver
            .call("ControllerGetCapabilities", |channel| async move {
                ControllerClient::new(channel)
                    .controller_get_capabilities(driver_request(
                        proto::ControllerGetCapabilitiesRequest {},
                        call_timeout,
                    ))
                    .await
            })
            .await
            .map_err(|failure| driver.classify("ControllerGetCapabilities", failure))?;

        let mut capabilities = ControllerCapabilities::default();
        for capability in reply.capabilities {
            let Some(proto::controller_service_capability::Type::Rpc(rpc)) = capability.r#type
            else {
                continue;
            };
            match Rpc::try_from(rpc.r#type) {
                Ok(Rpc::PublishUnpublishVolume) => capabilities.publish_unpublish_volume = true,
                Ok(Rpc::PublishReadonly) => capabilities.publish_readonly = true,
                Ok(Rpc::GetVolume) => capabilities.get_volume = true,
                Ok(Rpc::ListVolumes) => capabilities.list_volumes = true,
                Ok(Rpc::ListVolumesPublishedNodes) => {
                    capabilities.list_volumes_published_nodes = true
                }
                _ => {}
            }
        }
        driver.plugin = PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            capabilities,
        };
        if !capabilities.publish_unpublish_volume {
            return Err(DriverError::Invalid(format!(
                "CSI plugin {} at {} does not advertise PUBLISH_UNPUBLISH_VOLUME: it has no \
                 controller attach to manage",
                driver.plugin.name,
                driver.socket.display()
            )));
        }
        tracing::info!(
            plugin = %driver.plugin.name,
            version = %driver.plugin.vendor_version,
            socket = %driver.socket.display(),
            probe = ?capabilities.probe_method(),
            ?capabilities,
            "connected to CSI plugin"
        );
        Ok(driver)
    }

    /// The same driver with another deadline for each call.
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// What the plugin said about itself.
    pub fn plugin(&self) -> &PluginInfo {
        &self.plugin
    }

    /// The plugin's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The deadline of each call.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Opens a connection, makes one call on it within the deadline, and closes it.
    async fn call<T, F, Fut>(&self, operation: &'static str, make_call: F) -> Result<T, Failure>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let deadline = self.call_timeout;
        let channel = tokio::time::timeout(deadline, connect(&self.socket))
            .await
            .map_err(|_| {
                Failure::Driver(DriverError::Unreachable(format!(
                    "no connection to CSI plugin at {} within {deadline:?}",
                    self.socket.display()
                )))
            })?
            .map_err(Failure::Driver)?;
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, make_call(channel)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // The client gives up at the gRPC timeout it sent, with CANCELLED.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= deadline =>
            {
                Err(Failure::Driver(DriverError::Timeout {
                    operation,
                    deadline,
                }))
            }
            Ok(Err(status)) => Err(Failure::Status(status)),
            Err(_) => Err(Failure::Driver(DriverError::Timeout {
                operation,
                deadline,
            })),
        }
    }

    /// The classification every call shares; callers handle their own `NOT_FOUND` and
    /// `FAILED_PRECONDITION` first.
    fn classify(&self, operation: &'static str, failure: Failure) -> DriverError {
        let status = match failure {
            Failure::Driver(error) => return error,
            Failure::Status(status) => status,
        };
        let message = describe(&status);
        // A status with a source was made here from a transport failure (the connection broke
        // after the request went out), not sent by the plugin: its reply is lost.
        if let Some(source) = std::error::Error::source(&status) {
            return DriverError::LostReply {
                operation,
                message: format!("{message} ({})", error_chain(source)),
            };
        }
        match status.code() {
            Code::DeadlineExceeded => DriverError::Timeout {
                operation,
                deadline: self.call_timeout,
            },
            Code::Cancelled | Code::Unavailable | Code::Aborted | Code::ResourceExhausted => {
                DriverError::LostReply { operation, message }
            }
            Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented => {
                DriverError::Invalid(format!("{operation}: {message}"))
            }
            _ => DriverError::Refused(format!("{operation}: {message}")),
        }
    }

    async fn unpublish(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        check_ids(volume_handle, node)?;
        let timeout = self.call_timeout;
        let request = proto::ControllerUnpublishVolumeRequest {
            volume_id: volume_handle.to_owned(),
            node_id: node.to_owned(),
            secrets: Default::default(),
        };
        let result = self
            .call("ControllerUnpublishVolume", |channel| async move {
                ControllerClient::new(channel)
                    .controller_unpublish_volume(driver_request(request, timeout))
                    .await
            })
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
            Err(failure) => Err(self.classify("ControllerUnpublishVolume", failure)),
        }
    }

    async fn get_volume(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        let timeout = self.call_timeout;
        let request = proto::ControllerGetVolumeRequest {
            volume_id: volume_handle.to_owned(),
        };
        let reply = self
            .call("ControllerGetVolume", |channel| async move {
                ControllerClient::new(channel)
                    .controller_get_volume(driver_request(request, timeout))
                    .await
            })
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
        let timeout = self.call_timeout;
        let mut token = String::new();
        for _ in 0..MAX_LIST_PAGES {
            let request = proto::ListVolumesRequest {
                max_entries: 0,
                starting_token: token.clone(),
            };
            let page = self
                .call("ListVolumes", |channel| async move {
                    ControllerClient::new(channel)
                        .list_volumes(driver_request(request, timeout))
                        .await
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
                // With LIST_VOLUMES_PUBLISHED_NODES an absent status means "published nowhere".
                let nodes = entry
                    .status
                    .map(|status| status.published_node_ids)
                    .unwrap_or_default();
                return Ok(published(nodes));
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
            failure => self.classify(operation, failure),
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

    async fn check(&self) -> Result<(), DriverError> {
        let timeout = self.call_timeout;
        self.call("Probe", |channel| async move {
            IdentityClient::new(channel)
                .probe(driver_request(proto::ProbeRequest {}, timeout))
                .await
        })
        .await
        .map(drop)
        .map_err(|failure| self.classify("Probe", failure))
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
        let timeout = self.call_timeout;
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
            .call("ControllerPublishVolume", |channel| async move {
                ControllerClient::new(channel)
                    .controller_publish_volume(driver_request(publish, timeout))
                    .await
            })
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
            Err(failure) => Err(self.classify("ControllerPublishVolume", failure)),
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

/// A request carrying the call's deadline as its gRPC timeout.
fn driver_request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// An error and its causes, `: `-separated.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// `CODE: message`, for error messages.
fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A fresh HTTP/2 connection over the plugin's socket. A failure here happened before any request
/// was sent.
async fn connect(socket: &Path) -> Result<Channel, DriverError> {
    let stream = UnixStream::connect(socket).await.map_err(|error| {
        DriverError::Unreachable(format!("CSI plugin socket {}: {error}", socket.display()))
    })?;
    let stream = Arc::new(Mutex::new(Some(stream)));
    // The URI is required by the HTTP/2 layer and otherwise unused: the stream is the socket.
    Endpoint::from_static("http://csi.plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.lock().ok().and_then(|mut slot| slot.take());
            async move {
                stream.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the connection to the CSI plugin was closed",
                    )
                })
            }
        }))
        .await
        .map_err(|error| {
            DriverError::Unreachable(format!(
                "CSI plugin socket {}: HTTP/2 handshake: {error}",
                socket.display()
            ))
        })
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

    #[test]
    fn probe_needs_published_nodes() {
        let caps =
            |get_volume, list_volumes, list_volumes_published_nodes| ControllerCapabilities {
                publish_unpublish_volume: true,
                publish_readonly: false,
                get_volume,
                list_volumes,
                list_volumes_published_nodes,
            };
        assert_eq!(
            caps(true, true, true).probe_method(),
            ProbeMethod::GetVolume
        );
        assert_eq!(
            caps(false, true, true).probe_method(),
            ProbeMethod::ListVolumes
        );
        // hostpath: GET_VOLUME and LIST_VOLUMES, but no LIST_VOLUMES_PUBLISHED_NODES.
        assert_eq!(
            caps(true, true, false).probe_method(),
            ProbeMethod::Unsupported
        );
        assert_eq!(
            caps(false, false, false).probe_method(),
            ProbeMethod::Unsupported
        );
    }

    fn driver() -> CsiDriver {
        CsiDriver {
            socket: PathBuf::from("/nonexistent"),
            call_timeout: Duration::from_secs(3),
            trust_published_nodes: true,
            plugin: PluginInfo {
                name: "test".into(),
                vendor_version: "0".into(),
                capabilities: ControllerCapabilities::default(),
            },
        }
    }

    #[test]
    fn status_codes_map_to_classes() {
        use crate::driver::ErrorClass::*;
        let driver = driver();
        let class = |code| {
            driver
                .classify("op", Failure::Status(Status::new(code, "m")))
                .class()
        };
        for code in [
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unavailable,
            Code::Aborted,
            Code::ResourceExhausted,
        ] {
            assert_eq!(class(code), UnknownOutcome, "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::OutOfRange, Code::Unimplemented] {
            assert_eq!(class(code), Final, "{code:?}");
        }
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ] {
            assert_eq!(class(code), Retryable, "{code:?}");
        }
        assert!(matches!(
            driver.classify("op", Failure::Status(Status::deadline_exceeded("late"))),
            DriverError::Timeout {
                operation: "op",
                ..
            }
        ));
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
