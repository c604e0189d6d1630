//! Leader election through a `coordination.k8s.io` Lease: of several replicas, one acts; the
//! others wait. A replica that loses the lease stops acting at once.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// This replica's standing in the election, kept up to date by a background task that renews the
/// lease while held and takes it when it falls free.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    identity: String,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

/// Joins the election for the Lease `namespace/name` under `identity`. A leader that stops renewing
/// is replaced once `lease` has passed.
pub async fn join(
    client: Client,
    namespace: &str,
    name: &str,
    identity: String,
    lease: Duration,
) -> Result<Leadership, LeaseManagerError> {
    let seconds = lease.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity.clone())
        .with_duration(seconds)
        // Renew when a third of the lease is left, so a slow API call does not cost the lease.
        .with_grace((seconds / 3).max(1))
        .with_field_manager(crate::MANAGER)
        .build()
        .await?;
    // The renewal task lives as long as the receiver, and releases the lease once it is dropped.
    let (leading, task) = manager.watch().await;
    Ok(Leadership {
        leading,
        identity,
        task,
    })
}

impl Leadership {
    /// Resolves once this replica holds the lease.
    pub async fn acquired(&mut self) {
        if self.leading.wait_for(|leading| *leading).await.is_ok() {
            info!(identity = %self.identity, "acquired the lease: acting");
        }
    }

    /// Resolves when this replica no longer holds the lease (or can no longer tell).
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|leading| !*leading).await;
    }

    /// Gives the lease up on the way out (a rolling update, a SIGTERM): the lease is free at
    /// once, and a waiting replica takes it at its next look, which kube-lease-manager schedules
    /// at the expiry it last read — so the hand-over still takes up to one lease duration.
    pub async fn release(self) {
        let Self { leading, task, .. } = self;
        drop(leading);
        match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
            Ok(Ok(Ok(_))) => info!("released the lease"),
            Ok(Ok(Err(error))) => warn!(%error, "cannot release the lease; it expires on its own"),
            Ok(Err(_)) | Err(_) => warn!("cannot release the lease in time; it expires on its own"),
        }
    }
}
