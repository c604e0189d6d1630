//! What a plugin says about itself, and what of it changes what the driver does.

use super::proto;
use proto::controller_service_capability::rpc::Type as Rpc;

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

/// How [`Driver::probe`](crate::driver::Driver::probe) asks the plugin where a volume is published.
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

    /// The capabilities of a `ControllerGetCapabilities` answer this driver cares about; the
    /// others (and any this build does not know) are left out.
    pub fn from_reply(reply: &proto::ControllerGetCapabilitiesResponse) -> Self {
        let mut capabilities = Self::default();
        for capability in &reply.capabilities {
            let Some(proto::controller_service_capability::Type::Rpc(rpc)) = &capability.r#type
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
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn unknown_and_unrelated_capabilities_are_left_out() {
        let rpc = |r#type: i32| proto::ControllerServiceCapability {
            r#type: Some(proto::controller_service_capability::Type::Rpc(
                proto::controller_service_capability::Rpc { r#type },
            )),
        };
        let reply = proto::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Rpc::PublishUnpublishVolume.into()),
                rpc(Rpc::CreateDeleteVolume.into()),
                rpc(Rpc::ListVolumesPublishedNodes.into()),
                rpc(9_999),
                proto::ControllerServiceCapability { r#type: None },
            ],
        };
        assert_eq!(
            ControllerCapabilities::from_reply(&reply),
            ControllerCapabilities {
                publish_unpublish_volume: true,
                list_volumes_published_nodes: true,
                ..ControllerCapabilities::default()
            }
        );
    }
}
