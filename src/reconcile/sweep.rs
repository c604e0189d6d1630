//! The resync of converged objects, by sweep: once per resync interval, each driver that can
//! answer for all of its volumes at once is asked once, and only the attachments and Volumes whose
//! record disagrees with its answer ([`crate::decide::sweep`]) are reconciled. Converged objects
//! of such a driver have no timer of their own; those of other drivers keep theirs.

use super::{Context, synced};
use crate::api::{Volume, VolumeAttachment};
use crate::decide::sweep::{attachment_disagrees, volume_disagrees};
use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::{debug, warn};

/// Where the sweep sends the objects it finds out of step.
pub struct Found {
    pub attachments: UnboundedSender<ObjectRef<VolumeAttachment>>,
    pub volumes: UnboundedSender<ObjectRef<Volume>>,
}

/// Sweeps every resync interval, while this replica may act, until the controllers stop.
pub async fn run(context: Arc<Context>, found: Found) {
    synced(&context.attachments).await;
    synced(&context.volumes).await;
    let mut every = tokio::time::interval(context.config.resync_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the objects reconciled at start need no sweep yet.
    every.tick().await;
    loop {
        every.tick().await;
        if !context.fence.permits() {
            continue;
        }
        if !sweep(&context, &found).await {
            return;
        }
    }
}

/// What one driver's sweep looks at: its Volumes, and the attachments that reach it, each with
/// the handle it reaches.
struct Targets {
    volumes: Vec<Arc<Volume>>,
    attachments: Vec<(Arc<VolumeAttachment>, String)>,
}

/// The Volumes of `driver`, and the attachments that reach it: through what they recorded
/// attaching, else through what their Volume names.
fn sweep_targets(context: &Context, driver: &str) -> Targets {
    let volumes = context.volumes.state_filter(|v| v.spec.driver == driver);
    let handle_of_volume: BTreeMap<&str, &str> = volumes
        .iter()
        .filter_map(|v| Some((v.metadata.name.as_deref()?, v.spec.volume_handle.as_str())))
        .collect();
    let attachments = context
        .attachments
        .state()
        .into_iter()
        .filter_map(|a| {
            let handle = match a.status.as_ref().and_then(|s| s.bound_to.as_ref()) {
                Some(bound) if bound.driver == driver => bound.volume_handle.clone(),
                Some(_) => return None,
                None => (*handle_of_volume.get(a.spec.volume_name.as_str())?).to_owned(),
            };
            Some((a, handle))
        })
        .collect();
    Targets {
        volumes,
        attachments,
    }
}

/// One sweep over every driver that can be asked about all of its volumes at once, one driver
/// after another. `false` once the controllers are gone.
async fn sweep(context: &Context, found: &Found) -> bool {
    for (name, driver) in &context.config.drivers {
        if found.attachments.is_closed() || found.volumes.is_closed() {
            return false;
        }
        if !driver.can_probe_many() {
            continue;
        }
        let Targets {
            volumes,
            attachments,
        } = sweep_targets(context, name);
        let handles: Vec<String> = volumes
            .iter()
            .map(|v| v.spec.volume_handle.clone())
            .chain(attachments.iter().map(|(_, handle)| handle.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if handles.is_empty() {
            continue;
        }
        let answers = match driver.probe_many(&handles).await {
            Ok(answers) => answers,
            Err(error) => {
                warn!(driver = name, %error, "the sweep could not ask the backend");
                continue;
            }
        };
        let mut out_of_step = 0;
        for (attachment, handle) in &attachments {
            if let Some(connections) = answers.get(handle)
                && attachment_disagrees(
                    attachment.status.as_ref(),
                    &attachment.spec.node_name,
                    connections,
                )
            {
                out_of_step += 1;
                let _ = found
                    .attachments
                    .unbounded_send(ObjectRef::from_obj(attachment.as_ref()));
            }
        }
        for volume in &volumes {
            if let Some(connections) = answers.get(&volume.spec.volume_handle)
                && volume_disagrees(volume.status.as_ref(), connections)
            {
                out_of_step += 1;
                let _ = found
                    .volumes
                    .unbounded_send(ObjectRef::from_obj(volume.as_ref()));
            }
        }
        debug!(
            driver = name,
            volumes = volumes.len(),
            attachments = attachments.len(),
            out_of_step,
            "swept"
        );
    }
    true
}
