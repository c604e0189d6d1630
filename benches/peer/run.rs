//! The runs: one mock CSI plugin, one apiserver, and each controller alone on them in turn, each
//! with volumes of its own on the plugin, measured from outside (the apiserver's request counters,
//! `/proc`, and a watch of the attachments).

use crate::Plan;
use crate::counts::Snapshot;
use crate::identity::{Grant, Identity};
use crate::measure::{CpuReading, Process, RequestKind, Requests};
use crate::support::cluster::{admin_client, admin_kubeconfig, unique_name};
use crate::support::csi::{CsiPlugin, DRIVER_NAME, channel};
use crate::support::operator::{Operator, Options, SHARD_LABEL, counters, http_get};
use crate::support::peer::{self, ExternalAttacher, PeerObjects, RUN_LABEL, TUNED};
use crate::track::{Goal, Progress, Tracker};
use futures::{StreamExt, stream};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::storage::v1 as storage;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use safe_detach::api::{AttachmentPhase, Volume, VolumeAttachment, find_condition};
use safe_detach::config::{ConfigFile, DriverEntry};
use safe_detach::driver::csi::CsiConfig;
use safe_detach::driver::csi::proto;
use safe_detach::driver::csi::proto::controller_client::ControllerClient;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The requests the bench keeps in flight when it creates or deletes: a large `kubectl apply`.
pub const CLIENT_CONCURRENCY: usize = 64;
/// The plain client's concurrency for the raw limit: the reconciles safe-detach runs at once.
pub const RAW_CONCURRENCY: usize = 16;
/// After the last attachment reached its goal, the phase's counters are read once the
/// controller's writes stop (none for a second), at most this long after.
pub const SETTLE_MAX: Duration = Duration::from_secs(15);
const SETTLE_STEP: Duration = Duration::from_secs(1);
/// How long safe-detach may take to delete the Volumes at the end of its run (not measured).
const VOLUME_CLEANUP: Duration = Duration::from_secs(90);
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The label of the raw limit's objects (with a shard label no operator serves).
const RAW_LABEL: &str = "safedetach.io/peer-bench-raw";
/// How long a phase waits for the other clients of a shared apiserver to stop writing.
const QUIET_MAX: Duration = Duration::from_secs(15);

/// The controllers compared, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    SafeDetach,
    AttacherDefault,
    AttacherTuned,
}

impl Controller {
    pub const ALL: [Controller; 3] = [
        Controller::SafeDetach,
        Controller::AttacherDefault,
        Controller::AttacherTuned,
    ];

    /// The name `BENCH_CONTROLLERS` uses.
    pub fn id(self) -> &'static str {
        match self {
            Controller::SafeDetach => "safe-detach",
            Controller::AttacherDefault => "attacher-default",
            Controller::AttacherTuned => "attacher-tuned",
        }
    }

    /// The row's name in the tables.
    pub fn title(self) -> &'static str {
        match self {
            Controller::SafeDetach => "safe-detach (csi driver, defaults)",
            Controller::AttacherDefault => "external-attacher v4.13.0, defaults",
            Controller::AttacherTuned => "external-attacher v4.13.0, tuned",
        }
    }

    /// Whether a write is to what this controller (or the bench, for it) writes: the rest of the
    /// apiserver's writes in a phase are someone else's.
    fn writes_of(self, kind: &RequestKind) -> bool {
        let events = kind.resource == "events";
        match self {
            Controller::SafeDetach => events || kind.group == "safedetach.io",
            Controller::AttacherDefault | Controller::AttacherTuned => {
                events
                    || (kind.group.is_empty() && kind.resource == "persistentvolumes")
                    || (kind.group == "storage.k8s.io"
                        && ["volumeattachments", "csinodes"].contains(&kind.resource.as_str()))
            }
        }
    }
}

/// The controller process a phase measures.
#[derive(Clone, Copy, Debug)]
struct Subject {
    controller: Controller,
    pid: u32,
    /// Where it serves its Prometheus metrics (safe-detach's operator).
    metrics: Option<SocketAddr>,
}

/// CPU seconds the whole machine spent busy (`/proc/stat`: user, nice, system, irq, softirq,
/// steal), to tell how much of it went to processes the bench does not measure.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0.0))
        .collect();
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    (field(0) + field(1) + field(2) + field(5) + field(6) + field(7)) / 100.0
}

/// The machine's CPU over a phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Machine {
    /// CPU seconds the machine was busy.
    pub busy: f64,
    /// Of which: the measured processes and the bench itself.
    pub measured: f64,
    /// Core-seconds available (cores × the phase's duration).
    pub available: f64,
}

impl Machine {
    /// CPU seconds of processes the bench does not measure: other work on the machine.
    pub fn others(&self) -> f64 {
        (self.busy - self.measured).max(0.0)
    }
}

/// One phase of one controller's run, as measured.
#[derive(Clone, Debug)]
pub struct PhaseResult {
    pub n: usize,
    /// The bench's creates (or deletes), from the first sent to the last answered.
    pub issued: Duration,
    pub progress: Progress,
    /// From the first request to the last attachment reaching the goal, when all did.
    pub finished: Option<Duration>,
    /// How long the bench waited (the timeout, when not all reached the goal).
    pub waited: Duration,
    /// The controller's own writes: those flow control dispatched under its identity's
    /// FlowSchema.
    pub own: f64,
    /// Every write the apiserver counted in the window (leases left out), by kind: the
    /// controller's, the bench's and anyone else's.
    pub all: Requests,
    /// The bench's own writes (its creates or deletes, as the admin).
    pub bench_writes: usize,
    /// How long the bench waited for a quiet apiserver before the phase, when it was not.
    pub not_quiet: Option<Duration>,
    /// The controller's reads (get, list, watch), counted under its identity.
    pub own_reads: f64,
    /// The reads of the controller's kinds, by kind (anyone's).
    pub reads: Requests,
    /// What the controller's own counters say about the phase (safe-detach's `/metrics`).
    pub operator: Vec<(String, f64)>,
    pub machine: Machine,
    pub cpu: CpuReading,
    /// The controller's peak resident memory so far (MiB).
    pub rss_peak: Option<f64>,
}

impl PhaseResult {
    /// The controller's own writes, counted under its identity.
    pub fn controller_writes(&self) -> f64 {
        self.own
    }

    /// The writes of the controller's kinds, by kind (anyone's).
    pub fn kinds(&self, controller: Controller) -> Requests {
        self.all.matching(|kind| controller.writes_of(kind))
    }

    /// The writes in the window that were neither the controller's nor the bench's: other
    /// clients of a shared apiserver.
    pub fn others(&self) -> f64 {
        (self.all.total() - self.own - self.bench_writes as f64).max(0.0)
    }

    pub fn complete(&self) -> bool {
        self.progress.done == self.n
    }
}

/// One controller's run: its setup, its two phases and what was noticed.
#[derive(Debug)]
pub struct Run {
    pub controller: Controller,
    pub setup: String,
    pub attach: PhaseResult,
    pub detach: PhaseResult,
    pub notes: Vec<String>,
}

/// The raw limit: `writes` merge patches of safe-detach VolumeAttachments' status by a plain
/// client, `RAW_CONCURRENCY` in flight.
#[derive(Clone, Debug)]
pub struct Raw {
    pub writes: usize,
    pub objects: usize,
    pub elapsed: Duration,
    pub cpu: CpuReading,
    /// What flow control counted under the writer's identity.
    pub counted: f64,
    /// Writes by anyone else meanwhile.
    pub others: f64,
    pub machine: Machine,
}

/// Everything the runs share.
pub struct Bench {
    pub plan: Plan,
    client: Client,
    plugin: CsiPlugin,
    plugin_pid: Option<u32>,
    control_plane: Vec<Process>,
    log_dir: PathBuf,
    /// safe-detach's identity (deploy/rbac.yaml's ClusterRole); the raw limit writes under it too.
    operator_identity: Identity,
    /// The external-attacher's identity (its upstream RBAC).
    attacher_identity: Identity,
}

impl Bench {
    pub async fn start(plan: Plan, log_dir: PathBuf) -> Self {
        admin_kubeconfig().await;
        let client = admin_client().await;
        let plugin = CsiPlugin::start().await;
        let plugin_pid = pid_of_plugin(plugin.socket());
        let state = Path::new(REPO).join(".local/cluster");
        let control_plane = [
            ("kube-apiserver", "kube-apiserver.pid"),
            ("etcd", "etcd.pid"),
        ]
        .into_iter()
        .filter_map(|(name, file)| Process::from_pid_file(name, &state.join(file)))
        .collect();
        let operator_identity = Identity::create(
            &client,
            &unique_name("peer-bench-safe-detach"),
            Grant::ClusterRole("safe-detach"),
        )
        .await;
        let attacher_identity = Identity::create(
            &client,
            &unique_name("peer-bench-csi-attacher"),
            Grant::Rules(attacher_rules()),
        )
        .await;
        Self {
            plan,
            client,
            plugin,
            plugin_pid,
            control_plane,
            log_dir,
            operator_identity,
            attacher_identity,
        }
    }

    fn identity(&self, controller: Controller) -> &Identity {
        match controller {
            Controller::SafeDetach => &self.operator_identity,
            Controller::AttacherDefault | Controller::AttacherTuned => &self.attacher_identity,
        }
    }

    /// What the run's output should say about the machine and the control plane.
    pub async fn context(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        lines.push(format!("{cores} cores"));
        lines.extend(source_version());
        if self.control_plane.len() < 2 {
            lines.push(
                "the apiserver's or etcd's pid file was not found: their CPU is not reported"
                    .to_owned(),
            );
        }
        if self.plugin_pid.is_none() {
            lines.push("the plugin's process was not found: its CPU is not reported".to_owned());
        }
        let counts = [
            (
                "safe-detach VolumeAttachments",
                count(&Api::<VolumeAttachment>::all(self.client.clone())).await,
            ),
            (
                "safe-detach Volumes",
                count(&Api::<Volume>::all(self.client.clone())).await,
            ),
            (
                "storage.k8s.io VolumeAttachments",
                count(&Api::<storage::VolumeAttachment>::all(self.client.clone())).await,
            ),
            (
                "PersistentVolumes",
                count(&Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(
                    self.client.clone(),
                ))
                .await,
            ),
        ];
        let counts: Vec<String> = counts
            .iter()
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
        lines.push(format!(
            "the apiserver held, before the first run, {} (everyone's: other runs' and \
             tests' objects included)",
            counts.join(", ")
        ));
        let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone());
        if let Ok(Some(_)) = bindings.get_opt("safe-detach-status-writer").await {
            lines.push(
                "the admission policy `safe-detach-status-writer` is bound: every status write \
                 of safe-detach's objects (the operator's and the raw limit's) passes its CEL check"
                    .to_owned(),
            );
        }
        lines
    }

    fn processes(&self, controller: Option<u32>) -> Vec<Process> {
        let mut processes = self.control_plane.clone();
        if let Some(pid) = self.plugin_pid {
            processes.push(Process {
                name: "plugin",
                pid,
            });
        }
        if let Some(pid) = controller {
            processes.push(Process {
                name: "controller",
                pid,
            });
        }
        processes.push(Process {
            name: "bench",
            pid: std::process::id(),
        });
        processes
    }

    /// Runs one phase: `issue` sends the bench's requests (noting each in the tracker) and
    /// returns how many writes it sent; then the phase waits until every one of `names` reached
    /// `goal`, or the plan's timeout.
    async fn phase<F, Fut>(
        &self,
        subject: Subject,
        tracker: &Tracker,
        names: &[String],
        goal: Goal,
        issue: F,
    ) -> PhaseResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = usize>,
    {
        let Subject {
            controller,
            pid: controller_pid,
            metrics,
        } = subject;
        let not_quiet = self.quiet().await;
        let flow = self.identity(controller).writes_flow().to_owned();
        let reads_flow = self.identity(controller).reads_flow();
        let processes = self.processes(Some(controller_pid));
        let operator_before = match metrics {
            Some(address) => counters(address).await,
            None => BTreeMap::new(),
        };
        let cpu_before = CpuReading::now(&processes);
        let busy_before = machine_busy_seconds();
        let before = Snapshot::read(&self.client).await;
        let started = Instant::now();
        let bench_writes = issue().await;
        let issued = started.elapsed();
        let timeout = self.plan.timeout_for(controller);
        let progress = tracker.wait(names, goal, started + timeout).await;
        let waited = started.elapsed();
        let complete = progress.done == names.len();
        let finished = complete.then(|| {
            progress.last.map_or(Duration::ZERO, |last| {
                last.saturating_duration_since(started)
            })
        });
        if complete {
            self.settle(&flow).await;
        }
        let cpu = CpuReading::now(&processes).since(&cpu_before);
        let busy = machine_busy_seconds() - busy_before;
        let elapsed = started.elapsed();
        let counted = Snapshot::read(&self.client).await.since(&before);
        let operator = match metrics {
            Some(address) => {
                let after = counters(address).await;
                after
                    .iter()
                    .map(|(series, n)| {
                        (
                            series.clone(),
                            n - operator_before.get(series).unwrap_or(&0.0),
                        )
                    })
                    .filter(|(_, n)| *n > 0.0)
                    .collect()
            }
            None => Vec::new(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let machine = Machine {
            busy,
            measured: cpu.0.values().sum(),
            available: cores as f64 * elapsed.as_secs_f64(),
        };
        let controller_process = Process {
            name: "controller",
            pid: controller_pid,
        };
        let (_, peak) = controller_process.memory_mib();
        eprintln!(
            "{} {goal:?}: {} of {} in {:.1} s",
            controller.id(),
            progress.done,
            names.len(),
            finished.unwrap_or(waited).as_secs_f64()
        );
        PhaseResult {
            n: names.len(),
            issued,
            progress,
            finished,
            waited,
            own: counted.flow(&flow),
            own_reads: counted.flow(&reads_flow),
            reads: counted
                .requests
                .matching(|k| ["GET", "LIST", "WATCH"].contains(&k.verb.as_str()))
                .matching(|k| controller.writes_of(k)),
            operator,
            machine,
            all: counted.requests.writes(),
            bench_writes,
            not_quiet,
            cpu,
            rss_peak: (peak > 0.0).then_some(peak),
        }
    }

    /// Waits until nobody has written for two seconds (at most `QUIET_MAX`): other clients of a
    /// shared apiserver would cost it CPU inside the phase. Returns how long it waited when the
    /// apiserver did not get quiet.
    async fn quiet(&self) -> Option<Duration> {
        let started = Instant::now();
        let writes = |s: Snapshot| s.requests.writes().total();
        let mut last = writes(Snapshot::read(&self.client).await);
        let mut calm = 0;
        while started.elapsed() < QUIET_MAX {
            tokio::time::sleep(SETTLE_STEP).await;
            let now = writes(Snapshot::read(&self.client).await);
            calm = if now == last { calm + 1 } else { 0 };
            if calm >= 2 {
                return None;
            }
            last = now;
        }
        eprintln!(
            "the apiserver did not get quiet in {} s: others are writing",
            QUIET_MAX.as_secs()
        );
        Some(started.elapsed())
    }

    /// Waits until the controller's identity has not written for a second, at most
    /// `SETTLE_MAX`.
    async fn settle(&self, flow: &str) {
        let mut last = Snapshot::read(&self.client).await.flow(flow);
        let give_up = Instant::now() + SETTLE_MAX;
        while Instant::now() < give_up {
            tokio::time::sleep(SETTLE_STEP).await;
            let now = Snapshot::read(&self.client).await.flow(flow);
            if now == last {
                return;
            }
            last = now;
        }
    }

    pub async fn run(&self, controller: Controller) -> Run {
        let run = match controller {
            Controller::SafeDetach => self.safe_detach().await,
            Controller::AttacherDefault | Controller::AttacherTuned => {
                self.attacher(controller).await
            }
        };
        // Let the apiserver and etcd finish what the clean-up started before the next run.
        tokio::time::sleep(Duration::from_secs(3)).await;
        run
    }

    async fn safe_detach(&self) -> Run {
        let controller = Controller::SafeDetach;
        let n = self.plan.n;
        let shard = unique_name("peer-bench");
        let selector = format!("{SHARD_LABEL}={shard}");
        let _guard = ShardGuard {
            selector: selector.clone(),
        };
        let handles =
            peer::create_plugin_volumes(&self.plugin, &shard, n, CLIENT_CONCURRENCY).await;
        // The mock lists its node as published for every volume, so that the driver must not
        // trust its published nodes (docs/drivers.md); everything else is at its defaults.
        let config = ConfigFile {
            drivers: vec![DriverEntry::csi(
                "csi",
                CsiConfig {
                    trust_published_nodes: false,
                    ..self.plugin.config()
                },
            )],
            ..ConfigFile::default()
        }
        .to_text()
        .expect("the plugin's socket path is UTF-8");
        let options = Options {
            kubeconfig: Some(self.operator_identity.kubeconfig().to_owned()),
            ..Options::default()
        };
        let mut operator = Operator::start_with(&shard, &config, options).await;
        wait_ready(&mut operator).await;
        let subject = Subject {
            controller,
            pid: operator.id().expect("the operator runs"),
            metrics: Some(operator.http_address()),
        };
        let volumes = Api::<Volume>::all(self.client.clone());
        let attachments = Api::<VolumeAttachment>::all(self.client.clone());
        let tracker = Tracker::start(attachments.clone(), &selector, |a: &VolumeAttachment| {
            a.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(AttachmentPhase::Attached) && s.attached)
        });
        tracker.synced(Duration::from_secs(30)).await;
        let volume_names: Vec<String> = (0..n).map(|i| format!("{shard}-v{i}")).collect();
        let names: Vec<String> = (0..n).map(|i| format!("{shard}-a{i}")).collect();
        let mut notes = Vec::new();

        let attach = self
            .phase(subject, &tracker, &names, Goal::Attached, || async {
                let sent = AtomicUsize::new(0);
                let sent = &sent;
                stream::iter(volume_names.iter().zip(&handles))
                    .for_each_concurrent(CLIENT_CONCURRENCY, |(name, handle)| {
                        let volume: Volume = serde_json::from_value(json!({
                            "apiVersion": "safedetach.io/v1alpha1",
                            "kind": "Volume",
                            "metadata": { "name": name, "labels": { SHARD_LABEL: shard } },
                            "spec": { "driver": "csi", "volumeHandle": handle },
                        }))
                        .expect("a Volume");
                        let volumes = &volumes;
                        async move {
                            sent.fetch_add(1, Ordering::Relaxed);
                            volumes
                                .create(&PostParams::default(), &volume)
                                .await
                                .unwrap_or_else(|e| panic!("create Volume {name}: {e}"));
                        }
                    })
                    .await;
                stream::iter(names.iter().zip(&volume_names))
                    .for_each_concurrent(CLIENT_CONCURRENCY, |(name, volume)| {
                        let attachment: VolumeAttachment = serde_json::from_value(json!({
                            "apiVersion": "safedetach.io/v1alpha1",
                            "kind": "VolumeAttachment",
                            "metadata": { "name": name, "labels": { SHARD_LABEL: shard } },
                            "spec": { "volumeName": volume, "nodeName": self.plugin.node() },
                        }))
                        .expect("a VolumeAttachment");
                        let (attachments, tracker) = (&attachments, &tracker);
                        async move {
                            sent.fetch_add(1, Ordering::Relaxed);
                            tracker.requesting(name, Goal::Attached);
                            attachments
                                .create(&PostParams::default(), &attachment)
                                .await
                                .unwrap_or_else(|e| panic!("create VolumeAttachment {name}: {e}"));
                        }
                    })
                    .await;
                sent.load(Ordering::Relaxed)
            })
            .await;
        let published = self.published(&handles).await;
        notes.push(format!(
            "after the attach phase the plugin's own record has {published} of {n} volumes \
             published"
        ));
        if !attach.complete() {
            notes.extend(safe_detach_stragglers(&attachments, &selector).await);
        }

        let detach = self
            .phase(subject, &tracker, &names, Goal::Gone, || {
                delete_timed(&attachments, &tracker, &names)
            })
            .await;
        let published = self.published(&handles).await;
        notes.push(format!(
            "after the detach phase the plugin's own record has {published} of {n} volumes \
             published"
        ));
        if !detach.complete() {
            notes.extend(safe_detach_stragglers(&attachments, &selector).await);
        }
        drop(tracker);
        let measured_log = operator.log().len();

        // Clean-up, not measured: the Volumes go while the operator runs, so that it releases
        // their finalizers itself.
        let cleanup = Instant::now();
        let _ = volumes
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&selector),
            )
            .await;
        let mut left = usize::MAX;
        while cleanup.elapsed() < VOLUME_CLEANUP {
            left = volumes
                .list_metadata(&ListParams::default().labels(&selector))
                .await
                .map_or(usize::MAX, |list| list.items.len());
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if left != 0 {
            notes.push(format!(
                "{left} Volumes were still there {} s after their deletion (stripped by the bench)",
                VOLUME_CLEANUP.as_secs()
            ));
        } else {
            eprintln!(
                "safe-detach: {n} Volumes deleted and released in {:.1} s (not measured)",
                cleanup.elapsed().as_secs_f64()
            );
        }
        operator.kill();
        let log = operator.log();
        notes.extend(self.keep_log(controller, &log, measured_log, |line| {
            line.contains(" WARN ") || line.contains(" ERROR ")
        }));
        drop(operator);
        cleanup_selector(&self.client, &selector).await;
        notes.extend(self.release_plugin_volumes(&handles).await);
        Run {
            controller,
            setup: format!(
                "`safe-detach run` (release build) as `{}` (deploy/rbac.yaml's ClusterRole), \
                 configuration `{}`",
                self.operator_identity.user(),
                config.replace('\n', "⏎ ").trim_end_matches("⏎ ")
            ),
            attach,
            detach,
            notes,
        }
    }

    async fn attacher(&self, controller: Controller) -> Run {
        let n = self.plan.n;
        let flags: &[&str] = if controller == Controller::AttacherTuned {
            TUNED
        } else {
            &[]
        };
        let prefix = unique_name(controller.id());
        let handles =
            peer::create_plugin_volumes(&self.plugin, &prefix, n, CLIENT_CONCURRENCY).await;
        // Declared before the attacher, so that the attacher is killed first should this panic.
        let mut objects = PeerObjects::create(DRIVER_NAME, self.plugin.node()).await;
        let kubeconfig = self.attacher_identity.kubeconfig();
        let mut attacher = ExternalAttacher::start(self.plugin.socket(), kubeconfig, flags).await;
        let subject = Subject {
            controller,
            pid: attacher.pid(),
            metrics: None,
        };
        let setup = format!(
            "as `{}` (the upstream RBAC), `csi-attacher {}`",
            self.attacher_identity.user(),
            attacher
                .args()
                .iter()
                .filter(|a| !a.starts_with("--kubeconfig") && !a.starts_with("--csi-address"))
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        );
        let api = Api::<storage::VolumeAttachment>::all(self.client.clone());
        let tracker = Tracker::start(api.clone(), &objects.selector(), |va| {
            va.status.as_ref().is_some_and(|s| s.attached)
        });
        tracker.synced(Duration::from_secs(30)).await;
        let names: Vec<String> = (0..n).map(|i| objects.attachment_name(i)).collect();
        let mut notes = Vec::new();

        let attach = self
            .phase(subject, &tracker, &names, Goal::Attached, || async {
                let pvs = objects.create_pvs(&handles, CLIENT_CONCURRENCY).await;
                let (api, tracker, objects) = (&api, &tracker, &objects);
                stream::iter(names.iter().zip(&pvs))
                    .for_each_concurrent(CLIENT_CONCURRENCY, |(name, pv)| async move {
                        let attachment = storage_attachment(objects, name, pv);
                        tracker.requesting(name, Goal::Attached);
                        api.create(&PostParams::default(), &attachment)
                            .await
                            .unwrap_or_else(|e| panic!("create VolumeAttachment {name}: {e}"));
                    })
                    .await;
                pvs.len() + names.len()
            })
            .await;
        let published = self.published(&handles).await;
        notes.push(format!(
            "after the attach phase the plugin's own record has {published} of {n} volumes \
             published"
        ));
        let errors = objects.attach_errors().await;
        if let Some((name, error)) = errors.iter().next() {
            notes.push(format!(
                "{} attachments reported an attach error, e.g. {name}: {error}",
                errors.len()
            ));
        }

        let detach = self
            .phase(subject, &tracker, &names, Goal::Gone, || {
                delete_timed(&api, &tracker, &names)
            })
            .await;
        let published = self.published(&handles).await;
        notes.push(format!(
            "after the detach phase the plugin's own record has {published} of {n} volumes \
             published"
        ));
        drop(tracker);
        let running = attacher.is_running();
        attacher.kill().await;
        if !running {
            notes.push("the attacher had exited before the end of its run".to_owned());
        }
        let log = attacher.log();
        notes.extend(self.keep_log(controller, &log, log.len(), |line| {
            line.starts_with('E') || line.starts_with('W')
        }));
        drop(attacher);
        objects.cleanup().await;
        notes.extend(self.release_plugin_volumes(&handles).await);
        Run {
            controller,
            setup,
            attach,
            detach,
            notes,
        }
    }

    /// Keeps a controller's log beside the tables and says what its lines that `notable` picks
    /// say, by kind of message: in the measured phases (the first `measured` bytes) and in the
    /// clean-up after them.
    fn keep_log(
        &self,
        controller: Controller,
        log: &str,
        measured: usize,
        notable: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let path = self
            .log_dir
            .join(format!("peer-{}-{}.log", self.plan.n, controller.id()));
        let place = match std::fs::write(&path, log) {
            Ok(()) => format!(" (log: `{}`)", path.display()),
            Err(_) => String::new(),
        };
        let measured = measured.min(log.len());
        let (during, after) = log.split_at(measured);
        let mut notes = Vec::new();
        for (when, part) in [
            ("during the phases", during),
            ("during the clean-up", after),
        ] {
            let mut kinds: BTreeMap<String, (usize, String)> = BTreeMap::new();
            for line in part.lines().filter(|line| notable(line)) {
                let entry = kinds
                    .entry(message_kind(line))
                    .or_insert_with(|| (0, line.chars().take(400).collect()));
                entry.0 += 1;
            }
            let total: usize = kinds.values().map(|(n, _)| n).sum();
            if total == 0 {
                notes.push(format!("its log has no warnings or errors {when}{place}"));
                continue;
            }
            let mut kinds: Vec<(usize, String)> = kinds.into_values().collect();
            kinds.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
            let examples: Vec<String> = kinds
                .iter()
                .take(3)
                .map(|(n, line)| format!("{n}× `{line}`"))
                .collect();
            notes.push(format!(
                "its log has {total} warning or error lines {when}{place}, of {} kinds; the \
                 most frequent: {}",
                kinds.len(),
                examples.join("; ")
            ));
        }
        notes
    }

    /// How many of `handles` the plugin's own record says are controller-published: the volume
    /// context keys `<node>/dev` its `ControllerPublishVolume` sets (as
    /// `CsiPlugin::controller_published_nodes` reads them), over one connection.
    async fn published(&self, handles: &[String]) -> usize {
        let controller = self.plugin_client().await;
        stream::iter(handles)
            .map(|handle| {
                let mut controller = controller.clone();
                async move {
                    let reply = controller
                        .controller_get_volume(proto::ControllerGetVolumeRequest {
                            volume_id: handle.clone(),
                        })
                        .await
                        .expect("ControllerGetVolume")
                        .into_inner();
                    reply.volume.is_some_and(|volume| {
                        volume
                            .volume_context
                            .iter()
                            .any(|(key, device)| key.ends_with("/dev") && !device.is_empty())
                    })
                }
            })
            .buffer_unordered(16)
            .filter(|published| std::future::ready(*published))
            .count()
            .await
    }

    /// Unpublishes (where a run left a volume published) and deletes a run's plugin volumes.
    async fn release_plugin_volumes(&self, handles: &[String]) -> Vec<String> {
        let controller = self.plugin_client().await;
        let failed = stream::iter(handles)
            .map(|handle| {
                let mut controller = controller.clone();
                async move {
                    let _ = controller
                        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                            volume_id: handle.clone(),
                            node_id: DRIVER_NAME.to_owned(),
                            ..Default::default()
                        })
                        .await;
                    controller
                        .delete_volume(proto::DeleteVolumeRequest {
                            volume_id: handle.clone(),
                            ..Default::default()
                        })
                        .await
                        .is_err()
                }
            })
            .buffer_unordered(16)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        if failed == 0 {
            Vec::new()
        } else {
            vec![format!(
                "{failed} of the run's plugin volumes could not be deleted afterwards"
            )]
        }
    }

    async fn plugin_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(
            channel(self.plugin.socket())
                .await
                .expect("connect to the plugin"),
        )
    }

    /// The raw limit: `writes` merge patches of status by a plain client with the operator's
    /// identity (the only one the admission policy lets write these statuses), `RAW_CONCURRENCY`
    /// in flight, to safe-detach VolumeAttachments no operator serves; each patch changes the
    /// status (`observedGeneration`), so each is a real write to etcd.
    pub async fn raw(&self, writes: usize) -> Raw {
        let objects = writes.clamp(1, self.plan.n.max(1));
        let id = unique_name("peer-raw");
        let selector = format!("{RAW_LABEL}={id}");
        let _guard = ShardGuard {
            selector: selector.clone(),
        };
        let admin = Api::<VolumeAttachment>::all(self.client.clone());
        let names: Vec<String> = (0..objects).map(|i| format!("{id}-{i}")).collect();
        stream::iter(&names)
            .for_each_concurrent(CLIENT_CONCURRENCY, |name| {
                let attachment: VolumeAttachment = serde_json::from_value(json!({
                    "apiVersion": "safedetach.io/v1alpha1",
                    "kind": "VolumeAttachment",
                    "metadata": {
                        "name": name,
                        "labels": { RAW_LABEL: id, SHARD_LABEL: format!("{id}-none") },
                    },
                    "spec": { "volumeName": format!("{id}-none"), "nodeName": "raw" },
                }))
                .expect("a VolumeAttachment");
                let admin = &admin;
                async move {
                    admin
                        .create(&PostParams::default(), &attachment)
                        .await
                        .unwrap_or_else(|e| panic!("create VolumeAttachment {name}: {e}"));
                }
            })
            .await;
        let writer = Api::<VolumeAttachment>::all(self.operator_identity.client().await);
        let processes = self.processes(None);
        self.quiet().await;
        let before = Snapshot::read(&self.client).await;
        let cpu_before = CpuReading::now(&processes);
        let busy_before = machine_busy_seconds();
        let started = Instant::now();
        stream::iter(0..writes)
            .for_each_concurrent(RAW_CONCURRENCY, |i| {
                let (writer, name) = (&writer, &names[i % objects]);
                async move {
                    let patch = json!({ "status": { "observedGeneration": i + 1 } });
                    writer
                        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .unwrap_or_else(|e| panic!("a plain status write to {name}: {e}"));
                }
            })
            .await;
        let elapsed = started.elapsed();
        let cpu = CpuReading::now(&processes).since(&cpu_before);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let machine = Machine {
            busy: machine_busy_seconds() - busy_before,
            measured: cpu.0.values().sum(),
            available: cores as f64 * elapsed.as_secs_f64(),
        };
        let counted = Snapshot::read(&self.client).await.since(&before);
        let own = counted.flow(self.operator_identity.writes_flow());
        let others = (counted.requests.writes().total() - own).max(0.0);
        cleanup_selector(&self.client, &selector).await;
        eprintln!(
            "raw limit: {writes} status writes in {:.2} s",
            elapsed.as_secs_f64()
        );
        Raw {
            writes,
            objects,
            elapsed,
            cpu,
            counted: own,
            others,
            machine,
        }
    }
}

/// The bench's deletes, `CLIENT_CONCURRENCY` in flight, each noted in the tracker as it is sent;
/// returns how many it sent.
async fn delete_timed<K>(api: &Api<K>, tracker: &Tracker, names: &[String]) -> usize
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    stream::iter(names)
        .for_each_concurrent(CLIENT_CONCURRENCY, |name| async move {
            tracker.requesting(name, Goal::Gone);
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(e) => panic!("delete {name}: {e}"),
            }
        })
        .await;
    names.len()
}

/// A storage.k8s.io VolumeAttachment of the run's PV to its node, as `PeerObjects` makes them.
fn storage_attachment(objects: &PeerObjects, name: &str, pv: &str) -> storage::VolumeAttachment {
    storage::VolumeAttachment {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                RUN_LABEL.to_owned(),
                objects.run().to_owned(),
            )])),
            ..Default::default()
        },
        spec: storage::VolumeAttachmentSpec {
            attacher: objects.driver().to_owned(),
            node_name: objects.node().to_owned(),
            source: storage::VolumeAttachmentSource {
                persistent_volume_name: Some(pv.to_owned()),
                ..Default::default()
            },
        },
        status: None,
    }
}

/// What the attachments that did not get there say: how many in each phase, and the first one's
/// `Ready` condition.
async fn safe_detach_stragglers(api: &Api<VolumeAttachment>, selector: &str) -> Vec<String> {
    let Ok(list) = api.list(&ListParams::default().labels(selector)).await else {
        return Vec::new();
    };
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut example = None;
    for attachment in &list.items {
        let status = attachment.status.clone().unwrap_or_default();
        if status.phase == Some(AttachmentPhase::Attached) && status.attached {
            continue;
        }
        let phase = status
            .phase
            .map_or_else(|| "no status".to_owned(), |p| format!("{p:?}"));
        *phases.entry(phase).or_default() += 1;
        if example.is_none() {
            let ready = find_condition(&status.conditions, "Ready")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            example = Some(format!("{}: {ready}", attachment.name_any()));
        }
    }
    let mut notes = vec![format!(
        "not there at the end of the phase, by phase: {phases:?}"
    )];
    notes.extend(example.map(|e| format!("for example {e}")));
    notes
}

/// A log line with its time, names and numbers left out, to count lines by what they say.
fn message_kind(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let mut kind = String::new();
    for word in words.iter().take(12) {
        let plain = word
            .chars()
            .all(|c| c.is_ascii_alphabetic() || "=:_.()\"".contains(c));
        kind.push_str(if plain { word } else { "_" });
        kind.push(' ');
    }
    kind
}

/// Which commit the operator was built from, and whether the tree had changes to what goes into
/// it.
fn source_version() -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(REPO)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    let changed = git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "build.rs",
        "proto",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .unwrap_or_default();
    let changed = changed.lines().count();
    Some(if changed == 0 {
        format!("safe-detach built from commit {head}")
    } else {
        format!("safe-detach built from commit {head} with {changed} files of it changed")
    })
}

/// How many objects of a kind the apiserver holds (one page of one, and the count of the rest).
async fn count<K>(api: &Api<K>) -> usize
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(list) => {
            list.items.len() + list.metadata.remaining_item_count.unwrap_or(0).max(0) as usize
        }
        Err(_) => 0,
    }
}

/// What the external-attacher may do: its upstream `deploy/kubernetes/rbac.yaml` (v4.13.0), less
/// the leases of the leader election it runs without here.
fn attacher_rules() -> serde_json::Value {
    json!([
        { "apiGroups": [""], "resources": ["persistentvolumes"],
          "verbs": ["get", "list", "watch", "patch"] },
        { "apiGroups": ["storage.k8s.io"], "resources": ["csinodes"],
          "verbs": ["get", "list", "watch"] },
        { "apiGroups": ["storage.k8s.io"], "resources": ["volumeattachments"],
          "verbs": ["get", "list", "watch", "patch"] },
        { "apiGroups": ["storage.k8s.io"], "resources": ["volumeattachments/status"],
          "verbs": ["patch"] },
    ])
}

/// Waits until the operator serves `/readyz` with 200: its caches synced, and its wait for calls
/// an earlier process may have left under way over (twice the csi driver's deadline).
async fn wait_ready(operator: &mut Operator) {
    let address = operator.http_address();
    let give_up = Instant::now() + Duration::from_secs(180);
    loop {
        if ready(address).await {
            return;
        }
        assert!(
            operator.is_running(),
            "the operator exited:\n{}",
            operator.log()
        );
        assert!(
            Instant::now() < give_up,
            "the operator was not ready within 180 s:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(address: SocketAddr) -> bool {
    http_get(address, "/readyz")
        .await
        .is_some_and(|(code, _)| code == 200)
}

/// The mock plugin's process: the one started with the plugin's socket as its endpoint.
fn pid_of_plugin(socket: &Path) -> Option<u32> {
    let endpoint = format!("--endpoint=unix://{}", socket.display());
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == endpoint.as_bytes())
            .then_some(pid)
    })
}

/// Deletes the safe-detach objects `selector` selects, attachments first, and strips their
/// finalizers (once deleted, nothing can add one back).
async fn cleanup_selector(client: &Client, selector: &str) {
    delete_and_strip(&Api::<VolumeAttachment>::all(client.clone()), selector).await;
    delete_and_strip(&Api::<Volume>::all(client.clone()), selector).await;
}

async fn delete_and_strip<K>(api: &Api<K>, selector: &str)
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let list = ListParams::default().labels(selector);
    let _ = api.delete_collection(&DeleteParams::default(), &list).await;
    let strip = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    let remaining = api
        .list_metadata(&list)
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    stream::iter(remaining)
        .for_each_concurrent(16, |object| {
            let strip = &strip;
            async move {
                let _ = api
                    .patch(&object.name_any(), &PatchParams::default(), strip)
                    .await;
            }
        })
        .await;
}

/// Cleans up a run's safe-detach objects should the run end early (a panic): a run that ends
/// normally has already done so, and this finds nothing.
struct ShardGuard {
    selector: String,
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let selector = self.selector.clone();
        // `drop` cannot await: a thread with a runtime and a client of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async { cleanup_selector(&admin_client().await, &selector).await })
        })
        .join();
    }
}
