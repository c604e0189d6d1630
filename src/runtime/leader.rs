//! Leader election through a `coordination.k8s.io` Lease: of several replicas, one acts; the
//! others wait. A replica that loses the lease stops acting at once.
//!
//! A leader cut off from the apiserver cannot learn that it lost the lease, and kube-lease-manager
//! keeps saying it leads while its renewals fail. So the replica fences itself: it confirms
//! each renewal by reading the Lease back, and acts only while the last renewal it saw there is
//! younger than the renew deadline, three quarters of the lease. Another replica takes over no
//! sooner than a whole lease after that renewal, so the fenced replica has stopped calling drivers
//! by then (see [`Fence`]); it then stops altogether.
//!
//! kube-lease-manager renews and takes the lease. A waiting replica of it looks at the lease
//! again only when the term it last saw would end, so a lease that a leader gave up on its way
//! out would stay free for up to a whole term; the waiting replica here also checks every second
//! whether the lease is free, and if so joins again at once.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
const FREE_LEASE_CHECK: Duration = Duration::from_secs(1);
/// How often a new leader looks whether its first renewal has been read back.
const FENCE_POLL: Duration = Duration::from_millis(50);

/// This replica's standing in the election, kept up to date by a background task that renews the
/// lease while held and takes it when it falls free.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    identity: String,
    fence: Fence,
    task: JoinHandle<()>,
    confirmations: JoinHandle<()>,
}

/// Whether this replica may act on the backend now. Without leader election it always may; a
/// candidate may while the last renewal of its lease that it read back is younger than the renew
/// deadline, by its own clock (the clock kube-lease-manager and every other replica judge the
/// lease by).
#[derive(Clone, Debug)]
pub struct Fence {
    /// The renew time of the lease as last read back while this replica held it; `None` once
    /// it is known not to hold it. Absent for a replica without election.
    renewed: Option<watch::Receiver<Option<Timestamp>>>,
    deadline: Duration,
}

impl Fence {
    /// The fence of a replica that runs alone: always open.
    pub fn open() -> Self {
        Self {
            renewed: None,
            deadline: Duration::ZERO,
        }
    }

    /// Whether a driver call may start now.
    pub fn permits(&self) -> bool {
        self.left().is_some_and(|left| !left.is_zero())
    }

    /// How long the fence stays open without another confirmed renewal; `None` once closed.
    fn left(&self) -> Option<Duration> {
        let Some(renewed) = &self.renewed else {
            return Some(Duration::MAX);
        };
        let renewed = (*renewed.borrow())?;
        let age = Timestamp::now().duration_since(renewed);
        // A renewal stamped ahead of this clock is no younger than now.
        let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
        Some(self.deadline.saturating_sub(age))
    }

    /// Resolves once the fence is closed: no renewal confirmed within the renew deadline, or
    /// the lease seen held by another replica. Never, for a replica without election.
    pub async fn closed(&self) {
        let Some(renewed) = &self.renewed else {
            return std::future::pending().await;
        };
        let mut renewed = renewed.clone();
        loop {
            match self.left() {
                Some(left) if !left.is_zero() => {
                    tokio::select! {
                        _ = tokio::time::sleep(left) => {}
                        changed = renewed.changed() => if changed.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }
}

/// What it takes to join the election again.
#[derive(Clone)]
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
            // Renew at half the lease: the renewal is then read back well within the renew
            // deadline (three quarters), and a slow API call does not cost the lease.
            .with_grace((self.seconds / 2).max(1))
            // One field manager per candidate, as the library requires: candidates must not
            // take each other's fields silently.
            .with_field_manager(format!("{}-{}", crate::MANAGER, self.identity))
            .build()
            .await
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Whether nobody holds the lease (it was given up, or never taken).
    async fn lease_is_free(&self) -> bool {
        match self.leases().get_opt(&self.name).await {
            Ok(Some(lease)) => lease
                .spec
                .and_then(|spec| spec.holder_identity)
                .is_none_or(|holder| holder.is_empty()),
            Ok(None) | Err(_) => false,
        }
    }

    /// Waits until a lease this identity already holds has run out. Only an earlier process of
    /// the same identity can hold it (a container restarted in its pod keeps the pod's name),
    /// one that did not give it up: it died, or left the lease to run out on purpose with driver
    /// calls still under way. Taken over as is, the lease would let this process act while those
    /// calls land; it waits as any other replica would.
    async fn wait_out_an_earlier_holding(&self) {
        // Asked until answered: an earlier process that stopped over a flaky apiserver is most
        // likely followed by a failed read. Unanswered for a whole lease, any lease it held has
        // run out by now.
        let asked = std::time::Instant::now();
        let lease = loop {
            match self.leases().get_opt(&self.name).await {
                Ok(lease) => break lease,
                Err(error) if asked.elapsed() < Duration::from_secs(self.seconds) => {
                    warn!(%error, "cannot read the lease yet; asking again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
        };
        let Some(lease) = lease else {
            return;
        };
        let Some(spec) = lease.spec else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        let Some(renewed) = spec.renew_time.or(spec.acquire_time) else {
            return;
        };
        let seconds = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(self.seconds);
        let Ok(lasting) = jiff::SignedDuration::try_from(Duration::from_secs(seconds)) else {
            return;
        };
        let runs_out = renewed.0.saturating_add(lasting).unwrap_or(renewed.0);
        let left = runs_out.duration_since(Timestamp::now());
        if let Ok(left) = Duration::try_from(left)
            && !left.is_zero()
        {
            warn!(
                identity = %self.identity,
                "the lease names this identity from an earlier process, which may have left driver calls under way: waiting {left:?} for it to run out"
            );
            tokio::time::sleep(left).await;
        }
    }

    /// The renew deadline: how long after its last confirmed renewal a leader still acts.
    fn renew_deadline(&self) -> Duration {
        Duration::from_secs(self.seconds) * 3 / 4
    }

    /// Reads the lease back every tenth of its term (at least every second, so that a new
    /// leader starts soon) and publishes its renew time while this candidate holds it. A read
    /// that fails or hangs publishes nothing, so the fence closes on its own once the renew
    /// deadline passes.
    async fn confirm_renewals(self, renewed: watch::Sender<Option<Timestamp>>) {
        let every = (Duration::from_secs(self.seconds) / 10)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            if let Ok(Ok(lease)) = tokio::time::timeout(every, self.leases().get(&self.name)).await
            {
                let spec = lease.spec.unwrap_or_default();
                let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let confirmed = spec.renew_time.filter(|_| ours).map(|time| time.0);
                renewed.send_if_modified(|last| {
                    let changed = *last != confirmed;
                    *last = confirmed;
                    changed
                });
            }
            if renewed.is_closed() {
                return;
            }
            tokio::time::sleep(every).await;
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
    candidate.wait_out_an_earlier_holding().await;
    // The first manager is built here, so that a Lease that cannot be used stops the start.
    let manager = candidate.manager().await?;
    let (renewed_sender, renewed) = watch::channel(None);
    let fence = Fence {
        renewed: Some(renewed),
        deadline: candidate.renew_deadline(),
    };
    let confirmations = tokio::spawn(candidate.clone().confirm_renewals(renewed_sender));
    let (sender, leading) = watch::channel(false);
    let task = tokio::spawn(campaign(candidate, manager, sender));
    Ok(Leadership {
        leading,
        identity,
        fence,
        task,
        confirmations,
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
    /// Resolves once this replica holds the lease and has read its renewal back (true), or the
    /// election has ended without it (false): then this replica must not act.
    pub async fn acquired(&mut self) -> bool {
        loop {
            if self.leading.wait_for(|leading| *leading).await.is_err() {
                return false;
            }
            if self.fence.permits() {
                info!(identity = %self.identity, "acquired the lease: acting");
                return true;
            }
            tokio::time::sleep(FENCE_POLL).await;
        }
    }

    /// What the controllers check before each driver call.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Resolves when this replica no longer holds the lease, or can no longer be sure it does.
    pub async fn lost(&mut self) {
        let fence = self.fence.clone();
        tokio::select! {
            _ = self.leading.wait_for(|leading| !*leading) => {}
            _ = fence.closed() => {
                warn!(identity = %self.identity, "no renewal of the lease confirmed within the renew deadline");
            }
        }
    }

    /// Gives the lease up on the way out (a rolling update, a SIGTERM), so that a waiting replica
    /// takes over within a second instead of after the lease has run out.
    pub async fn release(self) {
        let Self {
            leading,
            task,
            confirmations,
            ..
        } = self;
        confirmations.abort();
        drop(leading);
        if tokio::time::timeout(RELEASE_TIMEOUT * 2, task)
            .await
            .is_err()
        {
            warn!("cannot release the lease in time; it expires on its own");
        }
    }
}
