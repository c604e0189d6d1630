//! The storms themselves: one control plane, one daemon, N Volumes, one operator; the scenarios
//! run one after another on the same objects, each measured from outside.

use crate::Plan;
use crate::daemon::ScratchDaemon;
use crate::measure::{CpuReading, Latencies, Process, Requests};
use crate::report::{DaemonLimit, Limit, Limits, Row, Table, Together};
use crate::support::cluster::admin_client;
use crate::support::operator::{Operator, Options, SHARD_LABEL, driver_calls};
use crate::support::qmp_proxy::QmpProxy;
use crate::support::qsd::Qsd;
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use safe_detach::api::{
    AttachmentPhase, FORCE_DETACH_ANNOTATION, ForceDetachState, VOLUME_FINALIZER, Volume,
    VolumeAttachment, VolumePhase,
};
use safe_detach::config::{ConfigFile, DriverEntry};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many requests the bench itself keeps in flight: a person's `kubectl apply` of a large
/// manifest, or a controller of its own.
const CLIENT_CONCURRENCY: usize = 64;
/// The reconciles the operator runs at once (its default): the plain client's concurrency for the
/// limit, so that both are measured on the same terms.
const OPERATOR_CONCURRENCY: usize = 16;
const NODES: usize = 5;
/// The stuck storm's `stuckAfter`: the floor of its figures.
const STUCK_AFTER: Duration = Duration::from_secs(10);
/// The Volumes a person attaches from during the detach storm, one at a time.
const PERSON_VOLUMES: usize = 20;
const PERSON_INTERVAL: Duration = Duration::from_millis(250);
/// A storm's writes are over once none has landed for this long.
const TAIL_QUIET: Duration = Duration::from_secs(2);
const TAIL_LONGEST: Duration = Duration::from_secs(60);
/// The longest a storm may take before the bench stops waiting and reports what it reached:
/// `BENCH_TIMEOUT_SECS`, default 1800.
fn storm_timeout() -> Duration {
    static TIMEOUT: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
        std::env::var("BENCH_TIMEOUT_SECS")
            .ok()
            .map(|s| s.parse().expect("BENCH_TIMEOUT_SECS: seconds"))
            .map_or(Duration::from_secs(1800), Duration::from_secs)
    });
    *TIMEOUT
}

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What each attachment waits for in a storm, and when each got there.
type Check = Box<dyn Fn(Option<&VolumeAttachment>) -> bool + Send + Sync>;

struct Goal {
    since: Instant,
    reached: Option<Instant>,
    check: Arc<Check>,
}

/// Watches the shard's attachments and notes when each reaches its goal.
#[derive(Clone, Default)]
struct Tracker {
    goals: Arc<Mutex<HashMap<String, Goal>>>,
    last: Arc<Mutex<HashMap<String, VolumeAttachment>>>,
}

impl Tracker {
    fn start(api: Api<VolumeAttachment>, shard: &str) -> Self {
        let tracker = Self::default();
        let config = watcher::Config::default().labels(&format!("{SHARD_LABEL}={shard}"));
        let stream = watcher(api, config);
        let inner = tracker.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => {
                        inner.seen(&a.name_any(), Some(&a))
                    }
                    Ok(watcher::Event::Delete(a)) => inner.seen(&a.name_any(), None),
                    _ => {}
                }
            }
        });
        tracker
    }

    fn seen(&self, name: &str, attachment: Option<&VolumeAttachment>) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().expect("tracker");
            match attachment {
                Some(a) => last.insert(name.to_owned(), a.clone()),
                None => last.remove(name),
            };
        }
        let mut goals = self.goals.lock().expect("tracker");
        if let Some(goal) = goals.get_mut(name)
            && goal.reached.is_none()
            && (goal.check)(attachment)
        {
            goal.reached = Some(now);
        }
    }

    /// Sets the goal of `name` from now on; reached at once if the last state seen meets it.
    fn expect(&self, name: &str, check: Arc<Check>) {
        let now = Instant::now();
        let last = self.last.lock().expect("tracker").get(name).cloned();
        let reached = check(last.as_ref()).then_some(now);
        self.goals.lock().expect("tracker").insert(
            name.to_owned(),
            Goal {
                since: now,
                reached,
                check,
            },
        );
    }

    /// Waits until every goal of `names` is reached; their latencies and the last one's time.
    async fn wait(&self, names: &[String], timeout: Duration) -> (Latencies, Instant) {
        let give_up = Instant::now() + timeout;
        loop {
            let (done, latencies, last) = {
                let goals = self.goals.lock().expect("tracker");
                let mut latencies = Latencies::default();
                let mut last = None::<Instant>;
                for name in names {
                    if let Some(Goal {
                        since,
                        reached: Some(at),
                        ..
                    }) = goals.get(name)
                    {
                        latencies.push(at.saturating_duration_since(*since));
                        last = Some(last.map_or(*at, |l| l.max(*at)));
                    }
                }
                (latencies.len() == names.len(), latencies, last)
            };
            if done {
                return (latencies, last.unwrap_or_else(Instant::now));
            }
            assert!(
                Instant::now() < give_up,
                "only {} of {} attachments reached their goal within {timeout:?}",
                latencies.len(),
                names.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attached() -> Arc<Check> {
    Arc::new(Box::new(|a: Option<&VolumeAttachment>| {
        a.and_then(|a| a.status.as_ref())
            .is_some_and(|s| s.phase == Some(AttachmentPhase::Attached) && s.attached)
    }))
}

fn gone() -> Arc<Check> {
    Arc::new(Box::new(|a: Option<&VolumeAttachment>| a.is_none()))
}

fn forced_and_attached_again(token: String) -> Arc<Check> {
    Arc::new(Box::new(move |a: Option<&VolumeAttachment>| {
        a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
            s.phase == Some(AttachmentPhase::Attached)
                && s.attached
                && s.force_detach.as_ref().is_some_and(|f| {
                    f.token.as_deref() == Some(token.as_str())
                        && f.state == ForceDetachState::Succeeded
                })
        })
    }))
}

/// Everything a run measures against.
struct Bench {
    client: Client,
    shard: String,
    qsd: Qsd,
    proxy: QmpProxy,
    operator: Option<Operator>,
    /// How many Volumes and attachments the cluster held before the run: with none, the operator
    /// manages every object (no `--selector`), as a single replica does.
    others: usize,
    volumes: Api<Volume>,
    attachments: Api<VolumeAttachment>,
    tracker: Tracker,
    /// The attachments of the storms, by index.
    names: Vec<String>,
}

impl Bench {
    async fn start(n: usize) -> Self {
        let client = admin_client().await;
        let shard = crate::support::cluster::unique_name("bench");
        let qsd = Qsd::start();
        let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
        let attachments = Api::<VolumeAttachment>::all(client.clone());
        let tracker = Tracker::start(attachments.clone(), &shard);
        let others = objects_held(&client).await;
        let mut bench = Self {
            others,
            volumes: Api::all(client.clone()),
            attachments,
            client,
            names: (0..n).map(|i| format!("{shard}-a{i}")).collect(),
            shard,
            qsd,
            proxy,
            operator: None,
            tracker,
        };
        bench.create_volumes(n).await;
        bench.start_operator(false).await;
        bench
    }

    /// Waits until the operator has taken in every Volume (its finalizer on, its first probe
    /// recorded, `Available`), so that a storm's figures are of its attachments alone, not of
    /// the Volumes' own first writes. Returns how long that took from the operator's start.
    async fn volumes_ready(&self) -> Duration {
        let started = Instant::now();
        let selector = format!("{SHARD_LABEL}={}", self.shard);
        loop {
            let listed = self
                .volumes
                .list(&ListParams::default().labels(&selector))
                .await
                .expect("list the Volumes");
            let ready = listed
                .items
                .iter()
                .filter(|v| {
                    v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
                        && v.status.as_ref().and_then(|s| s.phase) == Some(VolumePhase::Available)
                })
                .count();
            if ready == listed.items.len() {
                eprintln!(
                    "{ready} Volumes ready in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return started.elapsed();
            }
            assert!(
                started.elapsed() < storm_timeout(),
                "only {ready} of {} Volumes ready after {:?}",
                listed.items.len(),
                storm_timeout()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// After a storm is done: how long the operator's writes go on (until none lands for two
    /// seconds, read from the apiserver's own counts), and how many land in that tail. These are
    /// the writes the storm caused after its last object reached its goal — mostly Volumes'
    /// statuses — which its row does not count.
    async fn add_writes_tail(&self, row: &mut Row) {
        let (went_on, writes) = self.writes_tail().await;
        // A count that did not move reads as a negative zero.
        let total = writes.total().max(0.0);
        row.extra.push((
            "the operator's writes after all were done, until none landed for 2 s (not in the row)"
                .to_owned(),
            format!(
                "{:.0} ({:.2} per object), the last {:.1} s after: {}",
                total,
                total / row.objects.max(1) as f64,
                went_on.as_secs_f64(),
                writes.breakdown()
            ),
        ));
    }

    async fn writes_tail(&self) -> (Duration, Requests) {
        let started = Instant::now();
        let first = self.requests().await;
        let mut last = first.writes().total();
        let mut quiet_since = Instant::now();
        let mut went_on = Duration::ZERO;
        while quiet_since.elapsed() < TAIL_QUIET && started.elapsed() < TAIL_LONGEST {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.requests().await.writes().total();
            if now > last {
                last = now;
                quiet_since = Instant::now();
                went_on = started.elapsed();
            }
        }
        (went_on, self.requests().await.since(&first).writes())
    }

    /// Starts the operator, on the daemon directly or through the proxy.
    async fn start_operator(&mut self, via_proxy: bool) {
        self.operator = None;
        let qmp = if via_proxy {
            self.proxy.socket().to_owned()
        } else {
            self.qsd.qmp_socket()
        };
        let config = ConfigFile {
            drivers: vec![DriverEntry::nbd("nbd", self.qsd.config_via(&qmp))],
            ..ConfigFile::default()
        }
        .to_text()
        .expect("the daemon's paths are UTF-8");
        let options = Options {
            every_object: self.others == 0,
            ..Options::default()
        };
        let operator = Operator::start_with(&self.shard, &config, options).await;
        self.operator = Some(operator);
    }

    fn volume_name(&self, i: usize) -> String {
        format!("{}-v{i}", self.shard)
    }

    fn person_volume(&self, i: usize) -> String {
        format!("{}-person-v{i}", self.shard)
    }

    async fn create_volumes(&mut self, n: usize) {
        let started = Instant::now();
        let names: Vec<(String, String)> = (0..n)
            .map(|i| (self.volume_name(i), format!("h{i}")))
            .chain((0..PERSON_VOLUMES).map(|i| (self.person_volume(i), format!("p{i}"))))
            .collect();
        for (_, handle) in &names {
            create_raw_image(&self.qsd.image_dir().join(handle));
        }
        let shard = self.shard.clone();
        let api = self.volumes.clone();
        futures::stream::iter(names)
            .for_each_concurrent(CLIENT_CONCURRENCY, |(name, handle)| {
                let api = api.clone();
                let shard = shard.clone();
                async move {
                    let volume: Volume = serde_json::from_value(json!({
                        "apiVersion": "safedetach.io/v1alpha1",
                        "kind": "Volume",
                        "metadata": { "name": name, "labels": { SHARD_LABEL: shard } },
                        "spec": {
                            "driver": "nbd",
                            "volumeHandle": handle,
                            "stuckAfter": format!("{}s", STUCK_AFTER.as_secs()),
                            "autoForceDetach": true,
                        },
                    }))
                    .expect("a Volume");
                    api.create(&PostParams::default(), &volume)
                        .await
                        .expect("create a Volume");
                }
            })
            .await;
        eprintln!(
            "{} Volumes created in {:.1} s",
            n + PERSON_VOLUMES,
            started.elapsed().as_secs_f64()
        );
    }

    fn processes(&self) -> Vec<Process> {
        let state = Path::new(REPO).join(".local/cluster");
        let mut processes: Vec<Process> = [
            ("kube-apiserver", "kube-apiserver.pid"),
            ("etcd", "etcd.pid"),
        ]
        .into_iter()
        .filter_map(|(name, file)| Process::from_pid_file(name, &state.join(file)))
        .collect();
        if let Some(pid) = self.qsd.pid() {
            processes.push(Process {
                name: "qemu-storage-daemon",
                pid,
            });
        }
        if let Some(pid) = self.operator.as_ref().and_then(Operator::id) {
            processes.push(Process {
                name: "safe-detach",
                pid,
            });
        }
        processes
    }

    fn operator_process(&self) -> Option<Process> {
        self.operator
            .as_ref()
            .and_then(Operator::id)
            .map(|pid| Process {
                name: "safe-detach",
                pid,
            })
    }

    async fn requests(&self) -> Requests {
        let text = self
            .client
            .request_text(
                http::Request::get("/metrics")
                    .body(Vec::new())
                    .expect("a request"),
            )
            .await
            .expect("the apiserver's metrics");
        Requests::parse(&text)
    }

    /// Runs `storm`, measuring it from outside: the time until every goal is reached, the
    /// latencies, the writes and the CPU.
    async fn measure<F, Fut>(&self, scenario: &str, names: &[String], storm: F) -> Row
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Duration>,
    {
        let processes = self.processes();
        let cpu_before = CpuReading::now(&processes);
        let requests_before = self.requests().await;
        let calls_before = self.driver_calls().await;
        let started = Instant::now();
        let issued = storm().await;
        let (latencies, last) = self.tracker.wait(names, storm_timeout()).await;
        let total = last.saturating_duration_since(started);
        let cpu = CpuReading::now(&processes).since(&cpu_before);
        let requests = self.requests().await.since(&requests_before);
        let writes = requests.writes();
        // The reads besides: the fresh reads an attach decision makes (its attachment, its
        // Volume, the Volumes naming the same backend volume) cost the apiserver too.
        let reads = requests.matching(|kind| {
            matches!(kind.verb.as_str(), "GET" | "LIST") && kind.resource != "leases"
        });
        let rss = self.operator_process().map(|p| p.memory_mib());
        let calls = self.driver_calls().await;
        let per_object = |n: f64| match names.len() {
            0 => String::new(),
            objects => format!(" ({:.1} per object)", n / objects as f64),
        };
        let calls: Vec<String> = calls
            .iter()
            .map(|(operation, n)| (operation, n - calls_before.get(operation).unwrap_or(&0.0)))
            .filter(|(_, n)| *n > 0.0)
            .map(|(operation, n)| format!("{operation} {n}{}", per_object(n)))
            .collect();
        eprintln!(
            "{scenario}: {} in {:.1} s",
            names.len(),
            total.as_secs_f64()
        );
        Row {
            scenario: scenario.to_owned(),
            objects: names.len(),
            issued,
            total,
            latencies,
            writes,
            cpu,
            rss,
            extra: vec![
                (
                    "the operator's driver calls".to_owned(),
                    if calls.is_empty() {
                        "none".to_owned()
                    } else {
                        calls.join(", ")
                    },
                ),
                (
                    format!(
                        "reads served by the apiserver ({:.1} per object, the bench's own included)",
                        reads.total() / names.len().max(1) as f64
                    ),
                    reads.breakdown(),
                ),
            ],
        }
    }

    /// The driver calls the operator made so far, by operation, from its own metrics.
    async fn driver_calls(&self) -> BTreeMap<String, f64> {
        match &self.operator {
            Some(operator) => driver_calls(operator.http_address()).await,
            None => BTreeMap::new(),
        }
    }

    async fn create_attachments(&self, indices: impl Iterator<Item = usize>, token: Option<&str>) {
        let api = self.attachments.clone();
        let shard = self.shard.clone();
        let work: Vec<(String, String, String)> = indices
            .map(|i| {
                (
                    self.names[i].clone(),
                    self.volume_name(i),
                    format!("node-{}", i % NODES),
                )
            })
            .collect();
        let token = token.map(str::to_owned);
        futures::stream::iter(work)
            .for_each_concurrent(CLIENT_CONCURRENCY, |(name, volume, node)| {
                let (api, shard, token) = (api.clone(), shard.clone(), token.clone());
                async move {
                    create_attachment(&api, &shard, &name, &volume, &node, token.as_deref()).await;
                }
            })
            .await;
    }

    async fn delete_attachments(&self, names: &[String]) {
        let api = self.attachments.clone();
        futures::stream::iter(names.to_vec())
            .for_each_concurrent(CLIENT_CONCURRENCY, |name| {
                let api = api.clone();
                async move {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            })
            .await;
    }

    /// The attach storm: every attachment created at once.
    async fn attach(&self) -> Row {
        for name in &self.names {
            self.tracker.expect(name, attached());
        }
        let mut row = self
            .measure("attach", &self.names, || async {
                let started = Instant::now();
                self.create_attachments(0..self.names.len(), None).await;
                started.elapsed()
            })
            .await;
        self.add_writes_tail(&mut row).await;
        row
    }

    /// Converged: nothing changes, nothing should be written.
    async fn quiet(&self, period: Duration) -> Row {
        // Let the last Events and the Volumes' statuses of the storm land first.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut row = self
            .measure("quiet", &[], || async {
                tokio::time::sleep(period).await;
                period
            })
            .await;
        row.total = period;
        row.objects = self.names.len();
        row
    }

    /// A new force-detach token on every attachment at once: each forced once and attached again.
    async fn token(&self) -> Row {
        let tokens: Vec<String> = (0..self.names.len())
            .map(|i| format!("bench-{i}"))
            .collect();
        for (name, token) in self.names.iter().zip(&tokens) {
            self.tracker
                .expect(name, forced_and_attached_again(token.clone()));
        }
        let mut row = self
            .measure("token", &self.names, || async {
                let started = Instant::now();
                let api = self.attachments.clone();
                futures::stream::iter(self.names.iter().cloned().zip(tokens.iter().cloned()))
                    .for_each_concurrent(CLIENT_CONCURRENCY, |(name, token)| {
                        let api = api.clone();
                        async move {
                            let patch =
                                json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: token } } });
                            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                                .await
                                .expect("annotate");
                        }
                    })
                    .await;
                started.elapsed()
            })
            .await;
        self.add_writes_tail(&mut row).await;
        row
    }

    /// The detach storm, with a person attaching one volume after another meanwhile.
    async fn detach(&self) -> Row {
        for name in &self.names {
            self.tracker.expect(name, gone());
        }
        let storming = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let person = tokio::spawn(person_attaches(
            self.attachments.clone(),
            self.tracker.clone(),
            self.shard.clone(),
            (0..PERSON_VOLUMES).map(|i| self.person_volume(i)).collect(),
            storming.clone(),
        ));
        let mut row = self
            .measure("detach", &self.names, || async {
                let started = Instant::now();
                self.delete_attachments(&self.names).await;
                started.elapsed()
            })
            .await;
        storming.store(false, std::sync::atomic::Ordering::SeqCst);
        let person = person.await.expect("the person's attaches");
        // The person's last attachment is deleted without a wait: its detach is in the tail.
        self.add_writes_tail(&mut row).await;
        row.extra.push((
            "a person's attach during the storm".to_owned(),
            format!(
                "{} attaches, p50 {}, p99 {}",
                person.len(),
                crate::measure::seconds(person.quantile(0.5)),
                crate::measure::seconds(person.quantile(0.99))
            ),
        ));
        row.extra.push((
            "exports left after the storm".to_owned(),
            self.exports_left().await,
        ));
        row
    }

    /// The exports the daemon lists as the storm ends (the person's last detaches may still be
    /// under way), and once they are gone or 30 s have passed: the second is what is left behind.
    async fn exports_left(&self) -> String {
        let at_once = self.qsd.export_ids().await.len();
        let started = Instant::now();
        let mut left = at_once;
        while left > 0 && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            left = self.qsd.export_ids().await.len();
        }
        format!(
            "{at_once} as it ended; {left} {:.1} s later",
            started.elapsed().as_secs_f64()
        )
    }

    /// The stuck storm: every safe detach refused as in use, so each attachment is forced once
    /// `stuckAfter` has passed, and released.
    async fn stuck(&mut self) -> Row {
        // Attached again first, then the operator reaches the daemon through the proxy.
        for name in &self.names {
            self.tracker.expect(name, attached());
        }
        self.create_attachments(0..self.names.len(), None).await;
        self.tracker.wait(&self.names, storm_timeout()).await;
        self.start_operator(true).await;
        self.proxy.set_in_use(true);
        for name in &self.names {
            self.tracker.expect(name, gone());
        }
        let mut row = self
            .measure("stuck", &self.names, || async {
                let started = Instant::now();
                self.delete_attachments(&self.names).await;
                started.elapsed()
            })
            .await;
        self.proxy.set_in_use(false);
        self.add_writes_tail(&mut row).await;
        let hard = self
            .proxy
            .calls_of("block-export-del")
            .iter()
            .filter(|a| a.get("mode").and_then(|m| m.as_str()) == Some("hard"))
            .count();
        row.extra.push((
            "stuckAfter (the floor)".to_owned(),
            format!("{} s", STUCK_AFTER.as_secs()),
        ));
        row.extra
            .push(("hard export deletes".to_owned(), hard.to_string()));
        row.extra.push((
            "exports left after the storm".to_owned(),
            self.exports_left().await,
        ));
        row
    }

    /// This machine's limit for the writes a storm needed: the same number of status writes by a
    /// plain client, at the operator's concurrency, to objects no operator watches. Measured both
    /// as JSON merge patches conditioned on a `resourceVersion` and as server-side applies. Then
    /// the backend's: the daemon commands of N attaches and N detaches by a plain QMP client, on
    /// a daemon of their own; and the attach storm's writes and its daemon commands at once.
    async fn limit(&self, writes: usize, attach_writes: Option<usize>) -> Limits {
        let objects = writes.clamp(1, 1000);
        let shard = format!("{}-raw", self.shard);
        let names: Vec<String> = (0..objects).map(|i| format!("{shard}-r{i}")).collect();
        let api = self.attachments.clone();
        futures::stream::iter(names.clone())
            .for_each_concurrent(CLIENT_CONCURRENCY, |name| {
                let (api, shard) = (api.clone(), shard.clone());
                async move { create_attachment(&api, &shard, &name, "raw", "node-0", None).await }
            })
            .await;
        let mut limits = Limits::default();
        for kind in [Limit::MERGE, Limit::APPLY] {
            let started = Instant::now();
            let cpu_before = CpuReading::now(&self.processes());
            self.plain_writes(&names, writes, kind).await;
            let cpu = CpuReading::now(&self.processes()).since(&cpu_before);
            limits.writes.push(Limit {
                kind,
                writes,
                elapsed: started.elapsed(),
                apiserver_cpu: cpu.0.get("kube-apiserver").copied().unwrap_or(0.0),
            });
        }

        let n = self.names.len();
        let mut scratch = ScratchDaemon::start(n).await;
        let attach = scratch.attach_all().await;
        let detach = scratch.detach_all().await;
        let together = match attach_writes {
            Some(writes) => {
                let started = Instant::now();
                let written = async {
                    self.plain_writes(&names, writes, Limit::MERGE).await;
                    started.elapsed()
                };
                let exported = async {
                    scratch.attach_all().await;
                    started.elapsed()
                };
                let (written, exported) = futures::join!(written, exported);
                Some(Together {
                    writes,
                    written,
                    exported,
                })
            }
            None => None,
        };
        limits.daemon = Some(DaemonLimit {
            attach,
            detach,
            together,
        });
        self.delete_attachments(&names).await;
        limits
    }

    /// `writes` status writes of the `kind` to the objects `names`: one writer per object, each
    /// writing on the version its last write returned, as the operator does; the objects shared
    /// out over the operator's concurrency.
    async fn plain_writes(&self, names: &[String], writes: usize, kind: &'static str) {
        let objects = names.len();
        futures::stream::iter(names.iter().enumerate())
            .for_each_concurrent(OPERATOR_CONCURRENCY, |(i, name)| {
                let api = self.attachments.clone();
                let count = writes / objects + usize::from(i < writes % objects);
                async move { raw_status_writes(&api, name, count, kind).await }
            })
            .await;
    }

    async fn clean_up(&mut self) {
        self.operator = None;
        let selector = SHARD_LABEL.to_owned();
        {
            let api = self.attachments.clone();
            let list = api
                .list_metadata(&ListParams::default().labels(&selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            for item in list.into_iter().filter(|o| {
                o.labels()
                    .get(SHARD_LABEL)
                    .is_some_and(|s| s.starts_with(&self.shard))
            }) {
                let name = item.name_any();
                let strip = json!({ "metadata": { "finalizers": null } });
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&strip))
                    .await;
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        }
        let volumes = self
            .volumes
            .list_metadata(&ListParams::default().labels(&format!("{SHARD_LABEL}={}", self.shard)))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        futures::stream::iter(volumes)
            .for_each_concurrent(CLIENT_CONCURRENCY, |v| {
                let api = self.volumes.clone();
                async move {
                    let name = v.name_any();
                    let strip = json!({ "metadata": { "finalizers": null } });
                    let _ = api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&strip))
                        .await;
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            })
            .await;
    }
}

/// How many Volumes and attachments the cluster holds.
async fn objects_held(client: &Client) -> usize {
    let params = ListParams::default();
    let volumes = Api::<Volume>::all(client.clone())
        .list_metadata(&params)
        .await
        .expect("list the cluster's Volumes");
    let attachments = Api::<VolumeAttachment>::all(client.clone())
        .list_metadata(&params)
        .await
        .expect("list the cluster's attachments");
    volumes.items.len() + attachments.items.len()
}

async fn create_attachment(
    api: &Api<VolumeAttachment>,
    shard: &str,
    name: &str,
    volume: &str,
    node: &str,
    token: Option<&str>,
) {
    let mut metadata = json!({ "name": name, "labels": { SHARD_LABEL: shard } });
    if let Some(token) = token {
        metadata["annotations"] = json!({ FORCE_DETACH_ANNOTATION: token });
    }
    let attachment: VolumeAttachment = serde_json::from_value(json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "VolumeAttachment",
        "metadata": metadata,
        "spec": { "volumeName": volume, "nodeName": node },
    }))
    .expect("a VolumeAttachment");
    api.create(&PostParams::default(), &attachment)
        .await
        .expect("create a VolumeAttachment");
}

/// `count` status writes to one object, each on the version the one before returned.
async fn raw_status_writes(api: &Api<VolumeAttachment>, name: &str, count: usize, kind: &str) {
    let mut version = api
        .get(name)
        .await
        .expect("read for plain status writes")
        .resource_version();
    for i in 0..count {
        let phase = if i % 2 == 0 { "Attaching" } else { "Pending" };
        let written = if kind == Limit::APPLY {
            let patch = json!({
                "apiVersion": "safedetach.io/v1alpha1",
                "kind": "VolumeAttachment",
                "metadata": { "resourceVersion": version },
                "status": { "phase": phase, "attached": false },
            });
            api.patch_status(
                name,
                &PatchParams::apply("bench-raw").force(),
                &Patch::Apply(&patch),
            )
            .await
        } else {
            let patch = json!({
                "metadata": { "resourceVersion": version },
                "status": { "phase": phase, "attached": false },
            });
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        };
        version = written.expect("a plain status write").resource_version();
    }
}

/// A person attaching one Volume after another while `storming`: the latency of each, from the
/// create to `Attached`.
async fn person_attaches(
    api: Api<VolumeAttachment>,
    tracker: Tracker,
    shard: String,
    volumes: Vec<String>,
    storming: Arc<std::sync::atomic::AtomicBool>,
) -> Latencies {
    let mut latencies = Latencies::default();
    let mut i = 0;
    while storming.load(std::sync::atomic::Ordering::SeqCst) {
        let name = format!("{shard}-person-a{i}");
        let volume = &volumes[i % volumes.len()];
        tracker.expect(&name, attached());
        let started = Instant::now();
        create_attachment(&api, &shard, &name, volume, "node-person", None).await;
        let (_, at) = tracker
            .wait(std::slice::from_ref(&name), storm_timeout())
            .await;
        latencies.push(at.saturating_duration_since(started));
        let _ = api.delete(&name, &DeleteParams::default()).await;
        i += 1;
        tokio::time::sleep(PERSON_INTERVAL).await;
    }
    latencies
}

/// A sparse raw image of 1 MiB: enough for an export, quick to make ten thousand of.
pub fn create_raw_image(path: &Path) {
    let file = std::fs::File::create(path).expect("create an image");
    file.set_len(1 << 20).expect("size an image");
}

/// Runs the plan's scenarios and returns the tables.
pub async fn run(plan: &Plan) -> String {
    let started = Instant::now();
    let mut bench = Bench::start(plan.n).await;
    let mut table = Table::new(plan.n);
    table.others = Some(bench.others);
    table.volumes_ready = Some(bench.volumes_ready().await);
    let wants_after_attach = ["quiet", "token", "detach"].iter().any(|s| plan.wants(s));
    if plan.wants("attach") || wants_after_attach {
        let row = bench.attach().await;
        table.push(row);
    }
    if plan.wants("quiet") {
        table.push(bench.quiet(plan.quiet).await);
    }
    if plan.wants("token") {
        table.push(bench.token().await);
    }
    if plan.wants("detach") {
        table.push(bench.detach().await);
    }
    if plan.wants("stuck") {
        if !plan.wants("detach") && (plan.wants("attach") || wants_after_attach) {
            bench.delete_attachments(&bench.names.clone()).await;
            for name in &bench.names {
                bench.tracker.expect(name, gone());
            }
            bench.tracker.wait(&bench.names, storm_timeout()).await;
        }
        table.push(bench.stuck().await);
    }
    // The limit is the machine's alone: no operator watches its writes.
    bench.operator = None;
    let most_writes = table.most_writes();
    let attach_writes = table.writes_of("attach");
    table.limits = bench.limit(most_writes, attach_writes).await;
    bench.clean_up().await;
    table.wall = started.elapsed();
    table.render()
}
