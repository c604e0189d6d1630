//! The run's figures as Markdown tables, the way docs/benchmarks.md shows them.

use crate::daemon::Phase;
use crate::measure::{CpuReading, Latencies, Requests, seconds};
use std::fmt::Write;
use std::time::Duration;

/// One scenario's figures.
pub struct Row {
    pub scenario: String,
    pub objects: usize,
    /// How long the bench took to send its own requests (the creates, the deletes).
    pub issued: Duration,
    /// From the first request to the last object reaching its goal.
    pub total: Duration,
    pub latencies: Latencies,
    /// The writes the apiserver served meanwhile, the bench's own included.
    pub writes: Requests,
    pub cpu: CpuReading,
    /// The operator's resident memory at the end, and its peak, in MiB.
    pub rss: Option<(f64, f64)>,
    pub extra: Vec<(String, String)>,
}

impl Row {
    /// The writes the operator made: all of them but the bench's own creates, deletes and
    /// annotations, which the scenario knows.
    fn operator_writes(&self) -> f64 {
        let own = match self.scenario.as_str() {
            "attach" | "detach" | "token" | "stuck" => self.objects as f64,
            _ => 0.0,
        };
        // The person's attaches are the bench's too: a create and a delete each.
        let person = self
            .extra
            .iter()
            .find(|(k, _)| k.starts_with("a person's"))
            .and_then(|(_, v)| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        (self.writes.total() - own - 2.0 * person).max(0.0)
    }
}

/// A plain client's status writes: the machine's own limit.
pub struct Limit {
    pub kind: &'static str,
    pub writes: usize,
    pub elapsed: Duration,
    pub apiserver_cpu: f64,
}

/// The limits measured in the run: the apiserver's, the daemon's, and both at once.
#[derive(Default)]
pub struct Limits {
    pub writes: Vec<Limit>,
    pub daemon: Option<DaemonLimit>,
}

/// The daemon commands of N attaches and of N detaches by a plain QMP client.
pub struct DaemonLimit {
    pub attach: Phase,
    pub detach: Phase,
    pub together: Option<Together>,
}

impl DaemonLimit {
    /// The daemon's own time for what a scenario asks of it, where it is one of these.
    fn for_scenario(&self, scenario: &str) -> Option<Duration> {
        match scenario {
            "attach" => Some(self.attach.elapsed),
            "detach" | "stuck" => Some(self.detach.elapsed),
            "token" => Some(self.attach.elapsed + self.detach.elapsed),
            _ => None,
        }
    }
}

/// The attach storm's writes (merge patches) and its daemon commands, by the plain clients at
/// once, each timed from the common start.
pub struct Together {
    pub writes: usize,
    pub written: Duration,
    pub exported: Duration,
}

impl Limit {
    pub const MERGE: &'static str = "merge patch on a resourceVersion";
    pub const APPLY: &'static str = "server-side apply on a resourceVersion";

    fn per_second(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub struct Table {
    n: usize,
    rows: Vec<Row>,
    pub limits: Limits,
    pub wall: Duration,
    /// How long the operator took, from its start, to take in the N Volumes the storms use.
    pub volumes_ready: Option<Duration>,
    /// How many Volumes and attachments the cluster held before the run (see `Bench`).
    pub others: Option<usize>,
}

impl Table {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            rows: Vec::new(),
            limits: Limits::default(),
            wall: Duration::ZERO,
            volumes_ready: None,
            others: None,
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// The most writes any scenario needed: what the limit is measured with.
    pub fn most_writes(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.operator_writes() as usize)
            .max()
            .unwrap_or(0)
            .max(100)
    }

    /// The operator's writes in the scenario, if it ran.
    pub fn writes_of(&self, scenario: &str) -> Option<usize> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario)
            .map(|r| r.operator_writes() as usize)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let commit = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "### N = {} on nbd (commit {commit}, release build, {} cores)\n",
            self.n,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        match self.others {
            Some(0) => {
                let _ = writeln!(
                    out,
                    "The operator managed every object (no `--selector`), as a single replica does.\n"
                );
            }
            Some(others) => {
                let _ = writeln!(
                    out,
                    "The operator managed the run's shard only (`--selector`): the cluster held {others} other Volumes and attachments. It watched every attachment beside its shard, for the claims of a connection.\n"
                );
            }
            None => {}
        }
        if let Some(ready) = self.volumes_ready {
            let _ = writeln!(
                out,
                "Before the storms, the operator took in the {} Volumes (finalizer, first probe, `Available`) in {:.1} s from its start; their writes are in no row.\n",
                self.n,
                ready.as_secs_f64()
            );
        }
        let merge = self.limits.writes.iter().find(|l| l.kind == Limit::MERGE);
        let _ = writeln!(
            out,
            "| scenario | requests sent in | all done | p50 | p99 | operator writes (per attachment) | the same writes by a plain client | ratio | the daemon's commands by a plain client | ratio | CPU s: apiserver / etcd / daemon / operator | operator RSS now / peak |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let writes = row.operator_writes();
            let per = writes / row.objects.max(1) as f64;
            let (plain, ratio) = match merge {
                Some(limit) if writes > 0.0 => {
                    let plain = writes / limit.per_second();
                    (
                        format!("{plain:.1} s"),
                        format!("{:.2}×", row.total.as_secs_f64() / plain),
                    )
                }
                _ => ("—".to_owned(), "—".to_owned()),
            };
            let (daemon, daemon_ratio) = match self
                .limits
                .daemon
                .as_ref()
                .and_then(|d| d.for_scenario(&row.scenario))
            {
                Some(own) => (
                    format!("{:.1} s", own.as_secs_f64()),
                    format!(
                        "{:.2}×",
                        row.total.as_secs_f64() / own.as_secs_f64().max(1e-9)
                    ),
                ),
                None => ("—".to_owned(), "—".to_owned()),
            };
            let cpu = |name: &str| {
                row.cpu
                    .0
                    .get(name)
                    .map_or("—".to_owned(), |s| format!("{s:.1}"))
            };
            let rss = row.rss.map_or("—".to_owned(), |(now, peak)| {
                format!("{now:.0} / {peak:.0} MiB")
            });
            let (p50, p99) = if row.latencies.len() > 0 {
                (
                    seconds(row.latencies.quantile(0.5)),
                    seconds(row.latencies.quantile(0.99)),
                )
            } else {
                ("—".to_owned(), "—".to_owned())
            };
            let _ = writeln!(
                out,
                "| {} ({}) | {:.1} s | {:.1} s | {p50} | {p99} | {writes:.0} ({per:.2}) | {plain} | {ratio} | {daemon} | {daemon_ratio} | {} / {} / {} / {} | {rss} |",
                row.scenario,
                row.objects,
                row.issued.as_secs_f64(),
                row.total.as_secs_f64(),
                cpu("kube-apiserver"),
                cpu("etcd"),
                cpu("qemu-storage-daemon"),
                cpu("safe-detach"),
            );
        }
        let _ = writeln!(
            out,
            "\nWrites by kind (the bench's own creates, deletes and annotations included):\n"
        );
        let _ = writeln!(out, "| scenario | writes |\n|---|---|");
        for row in &self.rows {
            let _ = writeln!(out, "| {} | {} |", row.scenario, row.writes.breakdown());
        }
        let extras: Vec<String> = self
            .rows
            .iter()
            .flat_map(|row| {
                row.extra
                    .iter()
                    .map(move |(k, v)| format!("| {} | {k} | {v} |", row.scenario))
            })
            .collect();
        if !extras.is_empty() {
            let _ = writeln!(out, "\n| scenario | also measured | |\n|---|---|---|");
            for line in extras {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = writeln!(
            out,
            "\nThe limit, in the same run: status writes by a plain client at the operator's concurrency (16), to objects no operator watches:\n"
        );
        let _ = writeln!(
            out,
            "| write | writes | time | per second | apiserver CPU s |\n|---|---|---|---|---|"
        );
        for limit in &self.limits.writes {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} s | {:.0} | {:.1} |",
                limit.kind,
                limit.writes,
                limit.elapsed.as_secs_f64(),
                limit.per_second(),
                limit.apiserver_cpu
            );
        }
        if let Some(daemon) = &self.limits.daemon {
            let _ = writeln!(
                out,
                "\nThe backend's limit, in the same run: the daemon commands of {n} attaches (`blockdev-add`, `block-export-add`) and of {n} detaches (`block-export-del`, `blockdev-del`), by a plain QMP client on one connection to a daemon of its own:\n",
                n = self.n
            );
            let _ = writeln!(
                out,
                "| commands | count | time | per second | daemon CPU s |\n|---|---|---|---|---|"
            );
            for (what, phase) in [("attach", daemon.attach), ("detach", daemon.detach)] {
                let _ = writeln!(
                    out,
                    "| {what} | {} | {:.1} s | {:.0} | {:.1} |",
                    phase.commands,
                    phase.elapsed.as_secs_f64(),
                    phase.commands as f64 / phase.elapsed.as_secs_f64().max(1e-9),
                    phase.daemon_cpu
                );
            }
            if let Some(together) = &daemon.together {
                let both = together.written.max(together.exported);
                let storm = self
                    .rows
                    .iter()
                    .find(|r| r.scenario == "attach")
                    .map(|r| {
                        format!(
                            " The attach storm took {:.2}× that.",
                            r.total.as_secs_f64() / both.as_secs_f64().max(1e-9)
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\nBoth at once, the attach storm's {} writes (merge patches) and its daemon commands: the writes done after {:.1} s, the daemon's after {:.1} s.{storm}",
                    together.writes,
                    together.written.as_secs_f64(),
                    together.exported.as_secs_f64(),
                );
            }
        }
        let _ = writeln!(
            out,
            "\nWall time of the run: {:.0} s.",
            self.wall.as_secs_f64()
        );
        out
    }
}
