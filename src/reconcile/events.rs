//! Publishes the notices of the decision core as Kubernetes Events (events.k8s.io/v1).
//!
//! Each notice becomes an Event of its own. The core already emits a notice only when what it
//! reports flips, so there is nothing to aggregate, and aggregation would hide what differs
//! between two notices of the same reason: the token of a second force-detach, a new error.

use crate::MANAGER;
use crate::decide::events::{Notice, Severity};
use jiff::Timestamp;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client, Resource};
use tracing::warn;

/// Where the Events of cluster-scoped objects go, as kubectl and kube-runtime expect them.
const CLUSTER_EVENTS_NAMESPACE: &str = "default";

pub struct Publisher {
    client: Client,
    instance: String,
}

impl Publisher {
    pub fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// Publishes `notice` about `object`. A failure is logged, never allowed to stop a reconcile.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, object: &K, notice: &Notice) {
        let regarding = object.object_ref(&());
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| CLUSTER_EVENTS_NAMESPACE.to_owned());
        let name = regarding.name.clone().unwrap_or_default();
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                // The name kubectl and kube-runtime give Events: the object's, then a time stamp.
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match notice.severity {
                    Severity::Normal => "Normal",
                    Severity::Warning => "Warning",
                }
                .to_owned(),
            ),
            reason: Some(notice.reason.clone()),
            note: Some(notice.message.clone()),
            action: Some("Reconcile".to_owned()),
            reporting_controller: Some(format!("safedetach.io/{MANAGER}")),
            reporting_instance: Some(self.instance.clone()),
            regarding: Some(regarding),
            ..Event::default()
        };
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            warn!(%error, reason = %notice.reason, "cannot publish event");
        }
    }
}
