//! Runs one schedule against the real system: its backend (a qemu-storage-daemon behind the
//! fault-injecting QMP proxy, or a mock CSI plugin behind the gRPC proxy), one or two operator
//! processes (under `--leader-elect` when two) reaching the
//! apiserver through the API proxy (which records their writes, lags their watches and
//! partitions them), the workload and the faults of the plan, and the
//! observer beside them. Then the faults stop, the workload tidies up as a person would, and the
//! schedule is judged: convergence, quiet once converged, no panic, and the Events.

use super::backend::{Backend, BackendReader, CSI_METHODS, Pair, plugin_down};
use super::observe::{
    CreateWindow, History, Observer, OrphanMade, Orphans, Record, Rule, Violation, VolumeCreate,
    VolumeDelete, judge_orphan_forces,
};
use super::plan::{Backend as BackendKind, FaultOp, ORPHAN_NODE, Op, Plan, SLOTS, VolumePlan};
use crate::support::api_proxy::ApiProxy;
use crate::support::cluster::{TestObjects, admin_client, unique_name};
use crate::support::operator::{Operator, Options, SHARD_LABEL};
use crate::support::qmp::QmpError;
use crate::support::qmp_proxy::Call;
use crate::support::qsd::{self, NbdClient};
use crate::support::volume_hold::{HOLD_LABEL, HOLD_VALUE};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use safe_detach::api::{
    AttachmentPhase, FORCE_DETACH_ANNOTATION, VOLUME_FINALIZER, Volume, VolumeAttachment,
};
use safe_detach::config::ConfigFile;
use safe_detach::driver::nbd::NbdConfig;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Every Volume's stuck clock is the scenarios' (the CRD's minimum), so that forces happen within
/// a schedule; the resync too.
pub use crate::support::harness::STUCK_AFTER;
use crate::support::harness::{LEASE_NAMESPACE, RESYNC};
const LEASE_DURATION: &str = "5s";
/// How long the system may take to converge once the faults stop: a lease to expire, a backoff
/// or two, a stuck clock and a resync, with room to spare on a loaded machine.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(90);
/// How long a converged system is watched for writes, and how many it may make meanwhile. The
/// watch begins a while after convergence: a token set just before the faults stopped may still
/// be acted on then (a force and an attach, a burst of writes that ends), a hot loop goes on.
const QUIET_SETTLE: Duration = Duration::from_secs(3);
const QUIET_WINDOW: Duration = Duration::from_secs(6);
const QUIET_WRITES: usize = 6;
const OBSERVE_EVERY: Duration = Duration::from_millis(100);
/// How long the workload waits for a connection it makes behind the operator's back (the
/// daemon's monitor serves one client at a time: the operator's session may hold it).
const ORPHAN_WITHIN: Duration = Duration::from_secs(5);

/// The fault kind under which a crash of the backend's process that no fault caused is counted.
pub const BACKEND_CRASH: &str = "backend crash, not injected";

/// What one schedule came to.
#[derive(Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    pub backend: Option<BackendKind>,
    pub ops: usize,
    pub ops_applied: usize,
    pub faults: BTreeMap<&'static str, usize>,
    pub violations: Vec<Violation>,
    /// Each violation with the seed, the rule and the history around it.
    pub reports: Vec<String>,
    pub wall: Duration,
    pub observations: usize,
    pub converged_after: Option<Duration>,
    pub quiet_writes: usize,
    pub hard_deletes: usize,
    /// Volumes the apiserver removed at once though they were held (its delete/finalizer race).
    pub apiserver_races: usize,
    /// Connections made behind the operator's back that the backend answered made.
    pub orphans_made: usize,
}

struct Replica {
    operator: Operator,
    identity: String,
    /// Started again by the watchdog once this has passed (a process that exits by itself, as
    /// on losing its lease, is started again at once, as a Deployment would).
    down_until: Option<Instant>,
}

struct World {
    plan: Plan,
    client: Client,
    attachments: Api<VolumeAttachment>,
    volumes: Api<Volume>,
    volume_names: Vec<String>,
    slot_names: Vec<Vec<String>>,
    shard: String,
    history: History,
    creates: Arc<Mutex<Vec<CreateWindow>>>,
    /// Each Volume's backend volume handle, as the backend has it.
    handles: Vec<String>,
    /// The operator's driver for the backend.
    driver: &'static str,
    backend: BackendReader,
    /// Counts the starts and ends of the backend's restarts (see `Round::backend_epoch`).
    backend_epoch: Arc<AtomicUsize>,
    volume_uids: Mutex<BTreeMap<String, usize>>,
    /// Volume name → when its latest create was sent.
    volume_creates: Arc<Mutex<BTreeMap<String, VolumeCreate>>>,
    /// The workload's DELETEs of Volumes, with the apiserver's answers.
    volume_deletes: Arc<Mutex<Vec<VolumeDelete>>>,
    /// The nbd daemon past the proxy, for the connections made behind the operator's back.
    daemon: Option<NbdConfig>,
    /// The connections made behind the operator's back.
    orphans: Orphans,
}

impl World {
    fn labels(&self) -> serde_json::Value {
        json!({ SHARD_LABEL: self.shard })
    }

    /// The shard's label, and the one the volume-hold policy's tests' binding selects when the
    /// schedule runs under it.
    fn volume_labels(&self) -> serde_json::Value {
        let mut labels = self.labels();
        if self.plan.hold_at_create {
            labels[HOLD_LABEL] = json!(HOLD_VALUE);
        }
        labels
    }

    /// The connections made behind the operator's back, or perhaps made, of the Volumes under
    /// `orphanPolicy: Report`: the operator leaves them in place.
    fn orphans_left_in_place(&self) -> BTreeSet<Pair> {
        self.orphans
            .made
            .lock()
            .expect("orphans made")
            .iter()
            .filter(|m| m.made != Some(false))
            .filter(|m| {
                self.handles
                    .iter()
                    .position(|h| *h == m.handle)
                    .is_some_and(|i| !self.plan.volumes[i].orphan_detach)
            })
            .map(|m| (m.handle.clone(), ORPHAN_NODE.to_owned()))
            .collect()
    }

    async fn create_volume(&self, index: usize) -> Result<(), kube::Error> {
        let plan: &VolumePlan = &self.plan.volumes[index];
        let name = &self.volume_names[index];
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": name, "labels": self.volume_labels() },
            "spec": {
                "driver": self.driver,
                "volumeHandle": self.handles[index],
                "multiAttach": plan.multi_attach,
                "autoForceDetach": plan.auto_force_detach,
                "orphanPolicy": if plan.orphan_detach { "Detach" } else { "Report" },
                "stuckAfter": format!("{}s", STUCK_AFTER.as_secs()),
            },
        });
        let volume: Volume = serde_json::from_value(object).expect("a Volume");
        self.volume_creates.lock().expect("volume creates").insert(
            name.clone(),
            VolumeCreate {
                sent: Instant::now(),
                version: None,
            },
        );
        let created = self.volumes.create(&PostParams::default(), &volume).await?;
        // Under the policy the apiserver's answer carries the finalizer; without it, the schedule
        // would run without the hold it claims to test.
        assert!(
            !self.plan.hold_at_create || created.finalizers().iter().any(|f| f == VOLUME_FINALIZER),
            "Volume {name} was created without the volume-hold policy's finalizer: {:?}",
            created.finalizers()
        );
        if let Some(create) = self
            .volume_creates
            .lock()
            .expect("volume creates")
            .get_mut(name)
        {
            create.version = created.resource_version().and_then(|v| v.parse().ok());
        }
        self.history.note(format!(
            "created Volume {name} uid {} at resourceVersion {}",
            created.uid().unwrap_or_default(),
            created.resource_version().unwrap_or_default()
        ));
        self.volume_uids
            .lock()
            .expect("uids")
            .insert(created.uid().unwrap_or_default(), index);
        Ok(())
    }
}

/// Runs `plan` and judges it.
pub async fn run(plan: Plan) -> Outcome {
    let started = Instant::now();
    let history = History::new();
    let mut objects = TestObjects::default();
    let (backend, on_backend) = Backend::start(&plan).await;
    let handles: Vec<String> = plan
        .volumes
        .iter()
        .map(|v| on_backend[&v.handle].clone())
        .collect();
    let reader = backend.reader(&on_backend);
    let daemon = backend.daemon();
    let shard = unique_name("campaign");
    let config = ConfigFile {
        default_stuck_after: Some(format!("{}s", STUCK_AFTER.as_secs())),
        resync_interval: Some(format!("{}s", RESYNC.as_secs())),
        drivers: vec![backend.driver_entry()],
        ..ConfigFile::default()
    }
    .to_text()
    .expect("the daemon's paths are UTF-8");
    let api = Arc::new(ApiProxy::start().await);
    let lease = unique_name("campaign-lease");
    let replica_count = if plan.faults.replicas { 2 } else { 1 };
    let mut replicas = Vec::new();
    for i in 0..replica_count {
        let identity = format!("r{i}-{lease}");
        let mut args = Vec::new();
        if plan.faults.replicas {
            args = [
                "--leader-elect",
                "--lease-name",
                &lease,
                "--lease-duration",
                LEASE_DURATION,
                "--identity",
                &identity,
            ]
            .map(str::to_owned)
            .to_vec();
        }
        let options = Options {
            args,
            kubeconfig: Some(api.kubeconfig.clone()),
            ..Options::default()
        };
        replicas.push(Replica {
            operator: Operator::start_with(&shard, &config, options).await,
            identity,
            down_until: None,
        });
    }
    let replicas = Arc::new(tokio::sync::Mutex::new(replicas));

    let client = admin_client().await;
    let volume_names: Vec<String> = (0..plan.volumes.len())
        .map(|i| objects.volume(&format!("cv{i}")))
        .collect();
    let slot_names: Vec<Vec<String>> = (0..plan.volumes.len())
        .map(|v| {
            (0..SLOTS)
                .map(|s| objects.attachment(&format!("ca{v}s{s}")))
                .collect()
        })
        .collect();
    let forced_first = volume_names
        .iter()
        .zip(&plan.volumes)
        .filter(|(_, v)| v.orphan_detach)
        .map(|(n, _)| n.clone())
        .collect();
    let world = Arc::new(World {
        plan: plan.clone(),
        attachments: Api::all(client.clone()),
        volumes: Api::all(client.clone()),
        client: client.clone(),
        volume_names,
        slot_names,
        shard: shard.clone(),
        history: history.clone(),
        creates: Arc::default(),
        handles,
        driver: backend.driver_name(),
        backend: reader,
        backend_epoch: Arc::default(),
        volume_uids: Mutex::default(),
        volume_creates: Arc::default(),
        volume_deletes: Arc::default(),
        daemon,
        orphans: Orphans {
            forced_first,
            made: Arc::default(),
        },
    });
    history.note(format!(
        "seed {} backend {:?} volumes {:?} handles {:?} nodes {:?} faults {:?} held at create {}",
        plan.seed,
        plan.backend,
        plan.volumes,
        world.handles,
        plan.nodes,
        plan.faults,
        plan.hold_at_create
    ));
    for (i, name) in world.volume_names.iter().enumerate() {
        history.note(format!("volume {i} is {name}"));
        world
            .create_volume(i)
            .await
            .unwrap_or_else(|e| panic!("create Volume {name}: {e}"));
    }

    // The observer.
    let stop = Arc::new(AtomicBool::new(false));
    let observer = {
        let handles = world
            .volume_names
            .iter()
            .zip(&world.handles)
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect();
        let single = world
            .volume_names
            .iter()
            .zip(&plan.volumes)
            .filter(|(_, v)| !v.multi_attach)
            .map(|(n, _)| n.clone())
            .collect();
        let mut observer = Observer::new(
            handles,
            single,
            world.creates.clone(),
            world.volume_creates.clone(),
            world.volume_deletes.clone(),
            plan.hold_at_create,
            history.clone(),
        );
        observer.orphans = world.orphans.clone();
        // Every intent to attach, as a watch delivers it: a round's list can miss one written
        // and followed by `Attached` between two rounds.
        let intents = observer.intents.clone();
        let attachments = world.attachments.clone();
        let selector = format!("{SHARD_LABEL}={}", world.shard);
        let intent_watch = tokio::spawn(async move {
            let mut events = watcher(attachments, watcher::Config::default().labels(&selector))
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(watcher::Event::Apply(attachment) | watcher::Event::InitApply(attachment)) =
                    event
                else {
                    continue;
                };
                let record = Record::of(&attachment);
                if record.phase == Some(AttachmentPhase::Attaching) && !record.attach_failed {
                    intents.lock().expect("intents").push(record);
                }
            }
        });
        let world = world.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let selector = format!("{SHARD_LABEL}={}", world.shard);
            while !stop.load(Ordering::SeqCst) {
                observer
                    .round(
                        &world.attachments,
                        &world.volumes,
                        &selector,
                        &world.backend,
                        &world.backend_epoch,
                    )
                    .await;
                tokio::time::sleep(OBSERVE_EVERY).await;
            }
            intent_watch.abort();
            observer.finish();
            observer
        })
    };

    // The watchdog: starts stopped replicas again, as a Deployment would.
    let watchdog = {
        let replicas = replicas.clone();
        let stop = stop.clone();
        let history = history.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let mut replicas = replicas.lock().await;
                for replica in replicas.iter_mut() {
                    let due = replica.down_until.is_none_or(|d| Instant::now() >= d);
                    if due && !replica.operator.is_running() {
                        replica.operator.restart();
                        replica.down_until = None;
                        history.note(format!("started {} again", replica.identity));
                    }
                }
                drop(replicas);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The workload and the faults, side by side.
    let applied = Arc::new(AtomicUsize::new(0));
    let workload = {
        let world = world.clone();
        let applied = applied.clone();
        tokio::spawn(async move { workload(world, started, applied).await })
    };
    let faults = {
        let world = world.clone();
        let replicas = replicas.clone();
        let api = api.clone();
        let lease = lease.clone();
        tokio::task::spawn(async move {
            let mut backend = backend;
            let counts = inject(
                &world,
                started,
                &replicas,
                &mut backend,
                api.as_ref(),
                &lease,
            )
            .await;
            (backend, counts)
        })
    };
    let clients = workload.await.expect("the workload task");
    let (mut backend, mut fault_counts) = faults.await.expect("the fault task");
    // The backend is a real one and can crash by itself (QEMU 7.2 has segfaulted here): its
    // supervisor starts it again, and the crash is counted, so that what follows judges the
    // operator and not a backend no one restarted.
    let mut crashed = false;
    if let Some(status) = backend.exited() {
        crashed = true;
        let recovered = backend.recover();
        history.note(format!(
            "the backend exited by itself ({status}); started again, as its supervisor would: {recovered}"
        ));
        eprintln!(
            "seed {}: the backend exited by itself ({status})",
            plan.seed
        );
        *fault_counts.entry(BACKEND_CRASH).or_insert(0) += 1;
    }

    // The faults stop: nothing armed, the backend answers, every replica may run.
    backend.heal().await;
    api.thaw();
    api.set_watch_delay(Duration::ZERO);
    for replica in replicas.lock().await.iter_mut() {
        replica.down_until = None;
    }
    history.note("faults stop; clients close");
    for (_, client) in clients {
        let _ = tokio::time::timeout(Duration::from_secs(3), client.close()).await;
    }

    let quiesced = Instant::now();
    let mut crashes = 0;
    let converged = converge(&world, &mut backend, &mut crashes).await;
    if crashes > 0 {
        crashed = true;
        *fault_counts.entry(BACKEND_CRASH).or_insert(0) += crashes;
    }
    let mut late = Vec::new();
    let mut quiet_writes = 0;
    match converged {
        Ok(()) => {
            history.note("converged");
            tokio::time::sleep(QUIET_SETTLE).await;
            let at = Instant::now();
            tokio::time::sleep(QUIET_WINDOW).await;
            let writes: Vec<_> = api
                .writes_since(at)
                .into_iter()
                .filter(|w| w.to_safedetach() || w.to_event())
                .collect();
            quiet_writes = writes.len();
            if writes.len() > QUIET_WRITES {
                late.push((
                    Rule::HotLoop,
                    format!(
                        "{} writes in {QUIET_WINDOW:?}, {QUIET_SETTLE:?} after convergence (at most {QUIET_WRITES}): {:?}",
                        writes.len(),
                        writes
                            .iter()
                            .map(|w| format!("{} {}", w.method, w.path))
                            .collect::<Vec<_>>()
                    ),
                ));
            }
        }
        Err(state) => late.push((
            Rule::NoConvergence,
            format!(
                "not converged {CONVERGE_WITHIN:?} after the faults stopped: {state}{}",
                backend
                    .exited()
                    .map(|s| format!(" (the backend exited by itself meanwhile: {s})"))
                    .unwrap_or_default()
            ),
        )),
    }
    let converged_after = late
        .iter()
        .all(|(rule, _)| *rule != Rule::NoConvergence)
        .then(|| {
            quiesced
                .elapsed()
                .saturating_sub(QUIET_SETTLE + QUIET_WINDOW)
        });

    stop.store(true, Ordering::SeqCst);
    let mut observer = observer.await.expect("the observer task");
    crashed |= backend.exited().is_some();
    if crashed {
        // A crash takes every connection with it, unannounced: no cut is the operator's then.
        let cuts = observer
            .violations
            .iter()
            .filter(|v| v.rule == Rule::CutWhileAttached)
            .count();
        observer
            .violations
            .retain(|v| v.rule != Rule::CutWhileAttached);
        history.note(format!(
            "the backend crashed: {cuts} connections cut while attached are its doing, not judged"
        ));
    }
    let _ = watchdog.await;
    let mut replicas = Arc::try_unwrap(replicas)
        .ok()
        .expect("no other owner of the replicas")
        .into_inner();
    for replica in &mut replicas {
        replica.operator.kill();
        let log = replica.operator.log();
        if let Some(at) = log.find("panicked at") {
            let end = (at + 600).min(log.len());
            let start = log[..at].rfind('\n').map_or(0, |n| n + 1);
            late.push((
                Rule::Panic,
                format!("{} panicked: {}", replica.identity, &log[start..end]),
            ));
        }
    }
    let now = Instant::now();
    for (rule, detail) in late {
        observer.violate(rule, now, detail);
    }
    check_events(&world, &mut observer).await;
    if let Some(proxy) = backend.qmp_proxy() {
        check_orphan_forces(&world, &proxy.calls(), &mut observer);
    }

    let hard_deletes = backend.hard_deletes();
    let backend_log = backend
        .log_tail()
        .map(|log| format!("\n--- the backend's log, its end ---\n{log}"))
        .unwrap_or_default();
    let reports = observer
        .violations
        .iter()
        .map(|v| {
            format!(
                "VIOLATION seed {} rule {} at {:.3}s: {}\n--- history (seed {}; reproduce: make campaign SCHEDULES=1 SEED={} ACTIVE={}) ---\n{}\n--- operator log: the lines that name the objects of the violation, then the end ---\n{}",
                plan.seed,
                v.rule.name(),
                history.offset(v.at),
                v.detail,
                plan.seed,
                plan.seed,
                plan.active.as_secs(),
                history.around(v.at, 60, 10),
                replicas
                    .iter()
                    .map(|r| {
                        let log = r.operator.log();
                        format!(
                            "[{}]\n{}\n...\n{}",
                            r.identity,
                            tail(&naming(&log, &v.detail), 80),
                            tail(&log, 30)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            ) + &backend_log
        })
        .collect();

    // Clean up: the operators are dead, so nothing puts a finalizer back.
    let leases = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE);
    let _ = leases.delete(&lease, &DeleteParams::default()).await;
    // Dropping these waits for processes and for the clean-up's own thread: not on a worker.
    tokio::task::block_in_place(move || {
        drop(replicas);
        drop(objects);
        drop(backend);
    });
    let counts = fault_counts;
    Outcome {
        seed: plan.seed,
        backend: Some(plan.backend),
        ops: plan.ops.len(),
        ops_applied: applied.load(Ordering::SeqCst),
        faults: counts,
        violations: observer.violations.clone(),
        reports,
        wall: started.elapsed(),
        observations: observer.rounds,
        converged_after,
        quiet_writes,
        hard_deletes,
        apiserver_races: observer.apiserver_races,
        orphans_made: world
            .orphans
            .made
            .lock()
            .expect("orphans made")
            .iter()
            .filter(|m| m.made == Some(true))
            .count(),
    }
}

/// The last `lines` lines of a log, its terminal colour codes taken out.
/// The lines of `log` that name an object `detail` names (a campaign Volume or attachment).
fn naming(log: &str, detail: &str) -> String {
    let names: BTreeSet<&str> = detail
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| (word.starts_with("cv") || word.starts_with("ca")) && word.contains('-'))
        .collect();
    log.lines()
        .filter(|line| names.iter().any(|name| line.contains(name)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    let mut plain = String::new();
    let mut escape = false;
    for c in all[all.len().saturating_sub(lines)..].join("\n").chars() {
        match (escape, c) {
            (false, '\u{1b}') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}

/// Runs the plan's workload operations at their times; returns the NBD clients still open.
async fn workload(
    world: Arc<World>,
    started: Instant,
    applied: Arc<AtomicUsize>,
) -> BTreeMap<(usize, usize), NbdClient> {
    let mut clients: BTreeMap<(usize, usize), NbdClient> = BTreeMap::new();
    for (at, op) in world.plan.ops.clone() {
        tokio::time::sleep_until(started + at).await;
        let outcome = apply(&world, &op, &mut clients).await;
        if outcome.starts_with("ok") {
            applied.fetch_add(1, Ordering::SeqCst);
        }
        world.history.note(format!("op {op:?}: {outcome}"));
    }
    tokio::time::sleep_until(started + world.plan.active).await;
    clients
}

async fn apply(
    world: &World,
    op: &Op,
    clients: &mut BTreeMap<(usize, usize), NbdClient>,
) -> String {
    let said = |result: Result<(), kube::Error>| match result {
        Ok(()) => "ok".to_owned(),
        Err(kube::Error::Api(status)) => format!("refused {} {}", status.code, status.reason),
        Err(e) => format!("error {e}"),
    };
    match op {
        Op::Create {
            volume,
            slot,
            node,
            token,
        } => create(world, *volume, *slot, *node, token.as_deref()).await,
        Op::CreateAll { volume, nodes } => {
            let creates = nodes
                .iter()
                .enumerate()
                .map(|(slot, node)| create(world, *volume, slot, *node, None));
            futures::future::join_all(creates).await.join("; ")
        }
        Op::Delete { volume, slot } => {
            let name = &world.slot_names[*volume][*slot];
            said(
                world
                    .attachments
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            )
        }
        Op::Annotate {
            volume,
            slot,
            token,
            ..
        } => {
            let name = &world.slot_names[*volume][*slot];
            let patch =
                json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: token } } });
            said(
                world
                    .attachments
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
            )
        }
        Op::Connect { .. } if world.plan.backend == BackendKind::Csi => {
            "skipped: no data path on the csi backend".into()
        }
        Op::Connect { volume, slot } => {
            if clients.contains_key(&(*volume, *slot)) {
                return "skipped: a client is connected".into();
            }
            let name = &world.slot_names[*volume][*slot];
            let Ok(Some(attachment)) = world.attachments.get_opt(name).await else {
                return "skipped: no attachment".into();
            };
            let status = attachment.status.unwrap_or_default();
            let Some(uri) = status.connection_info.get("uri").cloned() else {
                return "skipped: no uri".into();
            };
            if status.phase != Some(AttachmentPhase::Attached) {
                return format!("skipped: phase {:?}", status.phase);
            }
            match tokio::time::timeout(Duration::from_secs(3), NbdClient::connect_uri(&uri)).await {
                Ok(Ok(client)) => {
                    clients.insert((*volume, *slot), client);
                    format!("ok connected to {uri}")
                }
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "failed: connect timed out".into(),
            }
        }
        Op::Disconnect { volume, slot } => match clients.remove(&(*volume, *slot)) {
            Some(client) => {
                let _ = tokio::time::timeout(Duration::from_secs(3), client.close()).await;
                "ok".into()
            }
            None => "skipped: no client".into(),
        },
        Op::DeleteVolume { volume } => {
            let sent = Instant::now();
            let answer = match world
                .volumes
                .delete(&world.volume_names[*volume], &DeleteParams::default())
                .await
            {
                Ok(answer) => answer,
                Err(e) => return said(Err(e)),
            };
            // A `Status`: the apiserver removed it at once, having found no finalizer when it read
            // it. The object: it is marked deleting.
            let (uid, removed_at_once) =
                answer.either(|v| (v.uid(), false), |s| (s.details.map(|d| d.uid), true));
            let delete = VolumeDelete {
                uid: uid.unwrap_or_default(),
                sent,
                removed_at_once,
            };
            let line = format!(
                "ok: {}, uid {}",
                if delete.removed_at_once {
                    "removed at once"
                } else {
                    "deleting"
                },
                delete.uid
            );
            world
                .volume_deletes
                .lock()
                .expect("volume deletes")
                .push(delete);
            line
        }
        Op::Orphan { volume } => make_orphan(world, *volume).await,
        Op::RecreateVolume { volume } => {
            match world.volumes.get_opt(&world.volume_names[*volume]).await {
                Ok(None) => said(world.create_volume(*volume).await),
                Ok(Some(_)) => "skipped: exists".into(),
                Err(e) => said(Err(e)),
            }
        }
    }
}

/// Exports the backend volume of `volume` to [`ORPHAN_NODE`] behind the operator's back, while
/// the Volume is there and not being deleted (the workload runs one operation at a time, so it
/// stays so until the export is asked for), and records the attempt and its answer.
async fn make_orphan(world: &World, volume: usize) -> String {
    let Some(daemon) = &world.daemon else {
        return "skipped: no daemon to reach past the operator".into();
    };
    match world.volumes.get_opt(&world.volume_names[volume]).await {
        Ok(Some(v)) if v.metadata.deletion_timestamp.is_none() => {}
        Ok(Some(_)) => return "skipped: the Volume is being deleted".into(),
        Ok(None) => return "skipped: no Volume".into(),
        Err(e) => return format!("skipped: {e}"),
    }
    let handle = &world.handles[volume];
    let began = Instant::now();
    let answer = tokio::time::timeout(
        ORPHAN_WITHIN,
        qsd::export_out_of_band(daemon, handle, ORPHAN_NODE, false),
    )
    .await;
    let (made, sent, line) = match answer {
        Ok(Ok(export)) => (
            Some(true),
            Instant::from_std(export.asked),
            format!("ok exported to {ORPHAN_NODE}: {}", export.uri),
        ),
        Ok(Err(QmpError::Refused(error))) => (Some(false), began, format!("refused: {error}")),
        Ok(Err(error)) => (None, began, format!("unknown: {error}")),
        Err(_) => (
            None,
            began,
            format!("unknown: no answer within {ORPHAN_WITHIN:?}"),
        ),
    };
    world
        .orphans
        .made
        .lock()
        .expect("orphans made")
        .push(OrphanMade {
            handle: handle.clone(),
            sent,
            made,
        });
    line
}

/// Creates the attachment of `slot` of `volume` on `node` (an index into the plan's nodes, taken
/// modulo their number), with `token` already set if given.
async fn create(
    world: &World,
    volume: usize,
    slot: usize,
    node: usize,
    token: Option<&str>,
) -> String {
    let name = &world.slot_names[volume][slot];
    let node = &world.plan.nodes[node % world.plan.node_count()];
    let mut metadata = json!({ "name": name, "labels": world.labels() });
    if let Some(token) = token {
        metadata["annotations"] = json!({ FORCE_DETACH_ANNOTATION: token });
    }
    let object: VolumeAttachment = serde_json::from_value(json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "VolumeAttachment",
        "metadata": metadata,
        "spec": { "volumeName": world.volume_names[volume], "nodeName": node },
    }))
    .expect("a VolumeAttachment");
    let index = {
        let mut creates = world.creates.lock().expect("creates");
        creates.push(CreateWindow {
            volume: world.volume_names[volume].clone(),
            node: node.clone(),
            sent: Instant::now(),
            answered: None,
            uid: None,
        });
        creates.len() - 1
    };
    let result = world
        .attachments
        .create(&PostParams::default(), &object)
        .await;
    {
        let mut creates = world.creates.lock().expect("creates");
        creates[index].answered = Some(Instant::now());
        creates[index].uid = result.as_ref().ok().and_then(|created| created.uid());
    }
    match result {
        Ok(created) => format!("ok uid {}", created.uid().unwrap_or_default()),
        Err(kube::Error::Api(status)) => format!("refused {} {}", status.code, status.reason),
        Err(e) => format!("error {e}"),
    }
}

/// Runs the plan's faults at their times; returns how many of each kind were injected.
#[allow(clippy::too_many_arguments)]
async fn inject(
    world: &World,
    started: Instant,
    replicas: &tokio::sync::Mutex<Vec<Replica>>,
    backend: &mut Backend,
    api: &ApiProxy,
    lease: &str,
) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for (at, fault) in world.plan.fault_ops.clone() {
        tokio::time::sleep_until(started + at).await;
        let note = match &fault {
            FaultOp::Qmp { command, fault } => {
                let proxy = backend.qmp_proxy().expect("QMP faults on the nbd backend");
                proxy.arm(command, *fault);
                "armed".to_owned()
            }
            FaultOp::Outage(lasting) => {
                let proxy = backend.qmp_proxy().expect("QMP faults on the nbd backend");
                world.history.note(format!("fault {fault}: begins"));
                proxy.set_refusing(true).await;
                tokio::time::sleep(*lasting).await;
                proxy.set_refusing(false).await;
                "over".to_owned()
            }
            FaultOp::Grpc {
                method,
                fault: call_fault,
                lasting,
            } => {
                let proxy = backend.grpc_proxy().expect("CSI faults on the csi backend");
                world.history.note(format!("fault {fault}: begins"));
                proxy.arm(method, call_fault.clone());
                tokio::time::sleep(*lasting).await;
                proxy.disarm(method);
                "over".to_owned()
            }
            FaultOp::PluginOutage(lasting) => {
                let proxy = backend.grpc_proxy().expect("CSI faults on the csi backend");
                world.history.note(format!("fault {fault}: begins"));
                for method in CSI_METHODS {
                    proxy.arm(method, plugin_down());
                }
                tokio::time::sleep(*lasting).await;
                for method in CSI_METHODS {
                    proxy.disarm(method);
                }
                "over".to_owned()
            }
            FaultOp::Kill { replica, down } => {
                let mut replicas = replicas.lock().await;
                let index = replica % replicas.len();
                let target = &mut replicas[index];
                target.operator.kill();
                target.down_until = Some(Instant::now() + *down);
                format!("killed {}", target.identity)
            }
            FaultOp::HandOver { down } => {
                let holder = Api::<Lease>::namespaced(world.client.clone(), LEASE_NAMESPACE)
                    .get_opt(lease)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.holder_identity);
                let mut replicas = replicas.lock().await;
                match replicas
                    .iter_mut()
                    .find(|r| Some(&r.identity) == holder.as_ref())
                {
                    Some(leader) => {
                        let how = stop_gracefully(&mut leader.operator).await;
                        leader.down_until = Some(Instant::now() + *down);
                        format!("stopped leader {}: {how}", leader.identity)
                    }
                    None => format!("skipped: no leader ({holder:?})"),
                }
            }
            FaultOp::RestartQsd => {
                world.backend_epoch.fetch_add(1, Ordering::SeqCst);
                assert!(
                    backend.restart_daemon(),
                    "a daemon restart on the nbd backend"
                );
                world.backend_epoch.fetch_add(1, Ordering::SeqCst);
                "restarted".to_owned()
            }
            FaultOp::WatchLag { lag, lasting } => {
                // The watches lag, and the lists of attachments (a restart's first, the Volume
                // controller's fresh one) come as late: a replica started meanwhile knows its
                // Volumes before its attachments.
                api.set_watch_delay(*lag);
                api.set_list_delay("volumeattachments", *lag);
                tokio::time::sleep(*lasting).await;
                api.set_watch_delay(Duration::ZERO);
                api.set_list_delay("volumeattachments", Duration::ZERO);
                "over".to_owned()
            }
            FaultOp::Partition(lasting) => {
                api.freeze();
                tokio::time::sleep(*lasting).await;
                api.thaw();
                "over".to_owned()
            }
            FaultOp::RestartApiserver(down) => {
                api.restart(*down);
                tokio::time::sleep(*down).await;
                "up again".to_owned()
            }
        };
        if !note.starts_with("skipped") {
            *counts.entry(fault.kind()).or_insert(0) += 1;
        }
        world.history.note(format!("fault {fault}: {note}"));
    }
    counts
}

/// How long a SIGTERM'd replica may take to exit before it is killed, as Kubernetes' grace period.
const GRACE: Duration = Duration::from_secs(20);

/// SIGTERM, then waiting without blocking the runtime (the replica's last requests go through the
/// API proxy, which runs on it), then SIGKILL after the grace period.
async fn stop_gracefully(operator: &mut Operator) -> String {
    let Some(pid) = operator.id() else {
        return "not running".into();
    };
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if !sent.is_ok_and(|s| s.success()) {
        return format!("kill -TERM {pid} failed");
    }
    let given_up = Instant::now() + GRACE;
    while operator.is_running() {
        if Instant::now() >= given_up {
            operator.kill();
            return format!("did not exit within {GRACE:?} of SIGTERM: killed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "exited".into()
}

/// Tidies up as a person would, then waits until everything is converged: each attachment
/// Attached and confirmed, each deleted one and each deleted Volume gone, and the backend
/// exporting exactly the attached (volume, node) pairs. Returns what was still off on timeout.
async fn converge(world: &World, backend: &mut Backend, crashes: &mut usize) -> Result<(), String> {
    let selector = format!("{SHARD_LABEL}={}", world.shard);
    let give_up = Instant::now() + CONVERGE_WITHIN;
    let mut tidied = false;
    let mut decided = false;
    let begun = Instant::now();
    loop {
        // The backend's process can crash by itself meanwhile too: its supervisor starts it
        // again, and the crash is counted (and no cut judged), as after the workload.
        if let Some(status) = backend.exited() {
            world.backend_epoch.fetch_add(1, Ordering::SeqCst);
            let recovered = backend.recover();
            world.backend_epoch.fetch_add(1, Ordering::SeqCst);
            world.history.note(format!(
                "the backend exited by itself while converging ({status}); started again, as its supervisor would: {recovered}"
            ));
            *crashes += 1;
        }
        let (attachments, volumes) = shard_objects(world, &selector).await?;
        // An attachment whose Volume is gone cannot confirm its detach (by design); a person
        // creates the Volume again so that it can. What can converge depends on the Volumes
        // there are (a single-attach one makes its backend volume exclusive), so the tidy step
        // comes after, and again after each Volume created later.
        for (index, name) in world.volume_names.iter().enumerate() {
            let named = attachments.iter().any(|a| a.spec.volume_name == *name);
            if named && !volumes.iter().any(|v| v.name_any() == *name) {
                let created = world.create_volume(index).await;
                world.history.note(format!(
                    "a person creates Volume {name} again: {:?}",
                    created.as_ref().map(|_| ())
                ));
                if created.is_ok() {
                    tidied = false;
                }
            }
        }
        if !tidied {
            // Read again: the tidy step judges the Volumes as they are now.
            let (attachments, volumes) = shard_objects(world, &selector).await?;
            tidy(world, &attachments, &volumes).await;
            tidied = true;
            continue;
        }
        // A person decides for a detach that waits for one (autoForceDetach: false): its client
        // is gone now, but the safe retries may be backed off for minutes.
        if !decided && begun.elapsed() > Duration::from_secs(15) {
            decided = true;
            for attachment in attachments
                .iter()
                .filter(|a| a.metadata.deletion_timestamp.is_some())
            {
                let patch = json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: format!("decided-{}", world.plan.seed) } } });
                let _ = world
                    .attachments
                    .patch(
                        &attachment.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
                world
                    .history
                    .note(format!("a person decides for {}", attachment.name_any()));
            }
        }
        let connections = world.backend.connections().await;
        // An orphan of a Volume under `orphanPolicy: Detach` that is gone (deleted before the
        // operator held it, or removed by the apiserver's delete/finalizer race): a person creates
        // the Volume again, so that the operator forces the orphan off.
        if let Ok(connections) = &connections {
            let mut created = false;
            for (index, name) in world.volume_names.iter().enumerate() {
                let orphan = (world.handles[index].clone(), ORPHAN_NODE.to_owned());
                if world.plan.volumes[index].orphan_detach
                    && connections.pairs.contains(&orphan)
                    && !volumes.iter().any(|v| v.name_any() == *name)
                {
                    let result = world.create_volume(index).await;
                    world.history.note(format!(
                        "a person creates Volume {name} again for its orphan: {:?}",
                        result.as_ref().map(|_| ())
                    ));
                    created |= result.is_ok();
                }
            }
            if created {
                tidied = false;
                continue;
            }
        }
        let mut off = Vec::new();
        let mut wanted = BTreeSet::new();
        for a in &attachments {
            let status = a.status.as_ref();
            let phase = status.and_then(|s| s.phase);
            let attached = status.is_some_and(|s| s.attached);
            if a.metadata.deletion_timestamp.is_some()
                || phase != Some(AttachmentPhase::Attached)
                || !attached
            {
                off.push(format!(
                    "{} {}@{} phase {phase:?} attached {attached} deleting {}",
                    a.name_any(),
                    a.spec.volume_name,
                    a.spec.node_name,
                    a.metadata.deletion_timestamp.is_some()
                ));
            }
            let handle = world
                .volume_names
                .iter()
                .position(|n| *n == a.spec.volume_name)
                .map(|i| world.handles[i].clone())
                .unwrap_or_default();
            wanted.insert((handle, a.spec.node_name.clone()));
        }
        for v in volumes
            .iter()
            .filter(|v| v.metadata.deletion_timestamp.is_some())
        {
            off.push(format!("Volume {} still being deleted", v.name_any()));
        }
        // A connection made behind the operator's back stays under `orphanPolicy: Report`.
        let left_in_place = world.orphans_left_in_place();
        match &connections {
            Ok(connections) => {
                let judged: BTreeSet<Pair> = connections
                    .pairs
                    .difference(&left_in_place)
                    .cloned()
                    .collect();
                if judged != wanted || !connections.unparsed.is_empty() {
                    off.push(format!(
                        "the backend connects {:?} (and lists {:?}), attachments want {wanted:?}",
                        connections.pairs, connections.unparsed
                    ));
                }
            }
            Err(e) => off.push(format!("backend unreadable: {e}")),
        }
        if off.is_empty() {
            return Ok(());
        }
        if Instant::now() >= give_up {
            return Err(off.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The schedule's attachments and Volumes as the apiserver has them now.
async fn shard_objects(
    world: &World,
    selector: &str,
) -> Result<(Vec<VolumeAttachment>, Vec<Volume>), String> {
    let params = ListParams::default().labels(selector);
    let attachments = world
        .attachments
        .list(&params)
        .await
        .map_err(|e| e.to_string())?;
    let volumes = world
        .volumes
        .list(&params)
        .await
        .map_err(|e| e.to_string())?;
    Ok((attachments.items, volumes.items))
}

/// Deletes what can never converge to Attached: attachments of a Volume being deleted or gone,
/// of an alias (a Volume naming a backend volume an older live Volume names), or bound to a
/// Volume replaced since, all but one node's attachments of a backend volume any single-attach
/// Volume names, and duplicates of a (backend volume, node).
async fn tidy(world: &World, attachments: &[VolumeAttachment], volumes: &[Volume]) {
    let live: Vec<&VolumeAttachment> = attachments
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .collect();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut kept_pairs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut single_node: BTreeMap<String, String> = BTreeMap::new();
    // The owner of a backend volume once the Volumes being deleted are gone: the oldest of the
    // others, by creation time and then name, as the operator orders them.
    let owner = |handle: &str| {
        volumes
            .iter()
            .filter(|v| v.spec.volume_handle == handle && v.metadata.deletion_timestamp.is_none())
            .min_by_key(|v| {
                (
                    v.metadata.creation_timestamp.clone().map(|t| t.0),
                    v.name_any(),
                )
            })
            .map(|v| v.name_any())
    };
    let exclusive = |handle: &str| {
        volumes
            .iter()
            .any(|v| v.spec.volume_handle == handle && !v.spec.multi_attach)
    };
    // Attached ones first, so that what is kept is what already works.
    let mut ordered = live.clone();
    ordered.sort_by_key(|a| {
        let attached = a.status.as_ref().is_some_and(|s| s.attached);
        (!attached, a.name_any())
    });
    for a in ordered {
        let volume = &a.spec.volume_name;
        let Some(v) = volumes
            .iter()
            .find(|v| v.name_any() == *volume && v.metadata.deletion_timestamp.is_none())
        else {
            continue;
        };
        // Bound to a Volume that was replaced under it: it waits for a person to delete it.
        let bound_uid = a
            .status
            .as_ref()
            .and_then(|s| s.bound_to.as_ref())
            .map(|b| &b.volume_uid);
        if bound_uid.is_some_and(|uid| Some(uid) != v.metadata.uid.as_ref()) {
            continue;
        }
        let handle = &v.spec.volume_handle;
        if owner(handle).as_ref() != Some(volume) {
            continue;
        }
        if exclusive(handle) {
            let node = single_node
                .entry(handle.clone())
                .or_insert_with(|| a.spec.node_name.clone());
            if *node != a.spec.node_name {
                continue;
            }
        }
        if kept_pairs.insert((handle.clone(), a.spec.node_name.clone())) {
            keep.insert(a.name_any());
        }
    }
    for a in live {
        if !keep.contains(&a.name_any()) {
            let _ = world
                .attachments
                .delete(&a.name_any(), &DeleteParams::default())
                .await;
            world.history.note(format!("tidy: delete {}", a.name_any()));
        }
    }
}

/// The Events' rules: each token forces at most once on an object; no automatic force before
/// `stuckAfter` or where the Volume does not allow it; no orphan forced under `orphanPolicy:
/// Report`.
async fn check_events(world: &World, observer: &mut Observer) {
    let events = Api::<Event>::namespaced(world.client.clone(), "default");
    let Ok(list) = events.list(&ListParams::default()).await else {
        return;
    };
    let volume_uids = world.volume_uids.lock().expect("uids").clone();
    // (uid, token) → (the latest force's time, each force).
    let mut per_token: BTreeMap<(String, String), (Option<jiff::Timestamp>, Vec<String>)> =
        BTreeMap::new();
    let mut found: Vec<(Rule, Option<jiff::Timestamp>, String)> = Vec::new();
    for event in list.items {
        let Some(regarding) = event.regarding.as_ref() else {
            continue;
        };
        let uid = regarding.uid.clone().unwrap_or_default();
        let reason = event.reason.clone().unwrap_or_default();
        let note = event.note.clone().unwrap_or_default();
        let time = event.event_time.as_ref().map(|t| t.0);
        if let Some(index) = volume_uids.get(&uid) {
            let plan = &world.plan.volumes[*index];
            if !plan.orphan_detach && reason.starts_with("ForceDetach") {
                found.push((
                    Rule::EarlyOrUnallowedForce,
                    time,
                    format!(
                        "orphanPolicy Report, yet {reason} on Volume {}: {note}",
                        world.volume_names[*index]
                    ),
                ));
            }
            continue;
        }
        let Some(versions) = observer.seen.get(&uid) else {
            continue;
        };
        let record = versions.last().expect("seen").1.clone();
        if reason != "ForceDetaching" {
            continue;
        }
        let count = event.series.as_ref().map_or(1, |s| s.count);
        if let Some(token) = token_of(&note) {
            let entry = per_token.entry((uid.clone(), token.clone())).or_default();
            entry.0 = entry.0.max(time);
            for _ in 0..count {
                entry.1.push(format!("{} {time:?}: {note}", record.name));
            }
        }
        let stuck_phase = if note.contains("reason StuckDetaching") {
            Some(AttachmentPhase::Detaching)
        } else if note.contains("reason StuckAttaching") {
            Some(AttachmentPhase::Attaching)
        } else {
            None
        };
        if let Some(phase) = stuck_phase {
            let index = world.volume_names.iter().position(|n| *n == record.volume);
            let allowed = index.is_some_and(|i| world.plan.volumes[i].auto_force_detach);
            if !allowed {
                found.push((
                    Rule::EarlyOrUnallowedForce,
                    time,
                    format!(
                        "autoForceDetach false, yet {} was forced automatically: {note}",
                        record.name
                    ),
                ));
            }
            if let Some(time) = time
                && let Some(since) = observer.phase_since_before(&uid, time, phase)
            {
                let stuck = jiff::SignedDuration::try_from(STUCK_AFTER).expect("small");
                // phaseSince has whole seconds, event times microseconds: a second of slack.
                if time < since + stuck - jiff::SignedDuration::from_secs(1) {
                    found.push((
                        Rule::EarlyOrUnallowedForce,
                        Some(time),
                        format!(
                            "{} forced at {time} though in {phase:?} only since {since} (stuckAfter {STUCK_AFTER:?}): {note}",
                            record.name
                        ),
                    ));
                }
            }
        }
    }
    for ((_, token), (first, notes)) in per_token {
        if notes.len() > 1 {
            found.push((
                Rule::TokenReplayed,
                first,
                format!("token {token:?} forced {} times: {notes:#?}", notes.len()),
            ));
        }
    }
    // History is kept in monotonic time: an Event's wall time is placed by its distance from now.
    let (now, wall) = (Instant::now(), jiff::Timestamp::now());
    for (rule, time, detail) in found {
        let ago = time
            .map(|t| wall.duration_since(t))
            .filter(|d| d.is_positive())
            .map_or(Duration::ZERO, |d| d.unsigned_abs());
        observer.violate(rule, now.checked_sub(ago).unwrap_or(now), detail);
    }
}

/// The rules of the forces of orphans ([`judge_orphan_forces`]), on the QMP proxy's record of
/// what the operator sent.
fn check_orphan_forces(world: &World, calls: &[Call], observer: &mut Observer) {
    let made = world.orphans.made.lock().expect("orphans made").clone();
    let forces: Vec<(String, Instant)> = calls
        .iter()
        .filter(|c| c.command == "block-export-del")
        .filter_map(|c| {
            let id = c.arguments["id"].as_str()?;
            let (handle, node) = safe_detach::driver::nbd::parse_export_id(id)?;
            (node == ORPHAN_NODE).then(|| (handle.to_owned(), Instant::from_std(c.at)))
        })
        .collect();
    let detach_policy = |handle: &str| {
        let index = world.handles.iter().position(|h| h == handle)?;
        Some(world.plan.volumes[index].orphan_detach)
    };
    let now = Instant::now();
    for detail in judge_orphan_forces(detach_policy, &made, &forces, STUCK_AFTER) {
        observer.violate(Rule::EarlyOrUnallowedForce, now, detail);
    }
}

/// The token a force-detach Event names (`..., token "t1", attempt 1`).
fn token_of(note: &str) -> Option<String> {
    let start = note.find("token \"")? + "token \"".len();
    let end = note[start..].find('"')? + start;
    Some(note[start..end].to_owned())
}
