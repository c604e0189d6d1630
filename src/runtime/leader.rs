//! Leader election through a `coordination.k8s.io` Lease: of several replicas, one acts; the
//! others wait. A replica that loses the lease stops acting at once.
//!
//! kube-lease-manager renews and takes the lease. A waiting replica of it looks at the lease
//! again only when the term it last saw would end, so a lease that a leader gave up on its way
//! out would stay free for up to a whole term; the waiting replica here also checks every second
//! whether the lease is free, and if so joins again at once.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
const FREE_LEASE_CHECK: Duration = Duration::from_secs(1);

/// This replica's standing in the election, kept up to date by a background task that renews the
/// lease while held and takes it when it falls free.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    identity: String,
    task: JoinHandle<()>,
}

/// What it takes to join the election again.
struct Candidate {
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    seconds: u64,
}

impl Candidate {
    async fn manager(&self) -> Result<LeaseManager, LeaseManagerError> {
        LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(self.identity.clone())
            .with_duration(self.seconds)
            // Renew when a third of the lease is left, so a slow API call does not cost the lease.
            .with_grace((self.seconds / 3).max(1))
            .with_field_manager(crate::MANAGER)
            .build()
            .await
    }

    /// Whether nobody holds the lease (it was given up, or never taken).
    async fn lease_is_free(&self) -> bool {
        let leases = Api::<Lease>::namespaced(self.client.clone(), &self.namespace);
        match leases.get_opt(&self.name).await {
            Ok(Some(lease)) => lease
                .spec
                .and_then(|spec| spec.holder_identity)
                .is_none_or(|holder| holder.is_empty()),
            Ok(None) | Err(_) => false,
        }
    }
}

/// Joins the election for the Lease `namespace/name` under `identity`. A leader that stops renewing
/// is replaced once `lease` has passed; one that gives the lease up, at once.
pub async fn join(
    client: Client,
    namespace: &str,
    name: &str,
    identity: String,
    lease: Duration,
) -> Result<Leadership, LeaseManagerError> {
    let candidate = Candidate {
        client,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        identity: identity.clone(),
        seconds: lease.as_secs().max(2),
    };
    // The first manager is built here, so that a Lease that cannot be used stops the start.
    let manager = candidate.manager().await?;
    let (sender, leading) = watch::channel(false);
    let task = tokio::spawn(campaign(candidate, manager, sender));
    Ok(Leadership {
        leading,
        identity,
        task,
    })
}

/// Runs the election until `Leadership` is dropped or released, then gives the lease up.
async fn campaign(candidate: Candidate, mut manager: LeaseManager, leading: watch::Sender<bool>) {
    loop {
        // The manager's task renews the lease while its receiver lives, and releases it after.
        let (mut state, task) = manager.watch().await;
        let rejoin = loop {
            tokio::select! {
                _ = leading.closed() => break false,
                changed = state.changed() => match changed {
                    Ok(()) => {
                        leading.send_replace(*state.borrow());
                    }
                    Err(_) => break false,
                },
                _ = tokio::time::sleep(FREE_LEASE_CHECK), if !*state.borrow() => {
                    if candidate.lease_is_free().await {
                        break true;
                    }
                }
            }
        };
        drop(state);
        match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
            Ok(Ok(Ok(_))) if !rejoin => info!("released the lease"),
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(error))) => warn!(%error, "cannot release the lease; it expires on its own"),
            Ok(Err(_)) | Err(_) => warn!("cannot release the lease in time; it expires on its own"),
        }
        if !rejoin {
            return;
        }
        // A fresh manager looks at the lease now, rather than at the end of the term it last saw.
        manager = loop {
            match candidate.manager().await {
                Ok(manager) => break manager,
                Err(error) => {
                    warn!(%error, "cannot rejoin the election; trying again");
                    tokio::time::sleep(FREE_LEASE_CHECK).await;
                }
            }
        };
    }
}

impl Leadership {
    /// Resolves once this replica holds the lease (true), or the election has ended without it
    /// (false): then this replica must not act.
    pub async fn acquired(&mut self) -> bool {
        let acquired = self.leading.wait_for(|leading| *leading).await.is_ok();
        if acquired {
            info!(identity = %self.identity, "acquired the lease: acting");
        }
        acquired
    }

    /// Resolves when this replica no longer holds the lease (or can no longer tell).
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|leading| !*leading).await;
    }

    /// Gives the lease up on the way out (a rolling update, a SIGTERM), so that a waiting replica
    /// takes over within a second instead of after the lease has run out.
    pub async fn release(self) {
        let Self { leading, task, .. } = self;
        drop(leading);
        if tokio::time::timeout(RELEASE_TIMEOUT * 2, task)
            .await
            .is_err()
        {
            warn!("cannot release the lease in time; it expires on its own");
        }
    }
}
