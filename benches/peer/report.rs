//! The Markdown the run prints and writes: one table per phase (rows: the controllers and the
//! raw limit), the definitions of its columns, and what was noticed.

use crate::measure::{CpuReading, Latencies};
use crate::run::{
    CLIENT_CONCURRENCY, Controller, Machine, PhaseResult, RAW_CONCURRENCY, Raw, Run, SETTLE_MAX,
};
use std::fmt::Write;
use std::time::Duration;

/// Everything one run of the bench produced.
pub struct Report {
    pub n: usize,
    pub command: String,
    pub context: Vec<String>,
    pub runs: Vec<Run>,
    /// The raw limit for each phase's writes (attach, detach).
    pub raw: Option<(Raw, Raw)>,
    /// Whose writes the raw limit repeats.
    pub raw_of: Option<Controller>,
    pub timeout: Duration,
    pub wall: Duration,
    pub date: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Attach,
    Detach,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let n = self.n;
        let _ = writeln!(
            out,
            "# safe-detach beside the CSI external-attacher: {n} attachments\n"
        );
        let _ = writeln!(out, "Reproduce: `{}`\n", self.command);
        let _ = writeln!(
            out,
            "Measured {} in {:.1} min, on {}. One Kubernetes mock CSI plugin process \
             (`csi-mock-plugin`, driver `mock.csi.safedetach.io`, one node) and the local \
             control plane of `hack/cluster.sh` serve every run; the controllers run alone, one \
             after another, each with {n} volumes of its own on the plugin, and everything is \
             deleted between them. A phase of the external-attacher at its defaults may take {} \
             s at most, the others' {} s.\n",
            self.date,
            self.wall.as_secs_f64() / 60.0,
            self.context.join("; "),
            self.timeout.as_secs(),
            crate::OTHERS_TIMEOUT.as_secs(),
        );
        for run in &self.runs {
            let _ = writeln!(out, "- {}: {}", run.controller.title(), run.setup);
        }
        out.push('\n');
        for phase in [Phase::Attach, Phase::Detach] {
            self.table(&mut out, phase);
        }
        let _ = writeln!(out, "## Columns\n");
        let _ = writeln!(
            out,
            "- **create phase** / **delete phase**: from the bench's first request to the answer \
             to its last: {n} Volumes (safe-detach) or PersistentVolumes (external-attacher), \
             then {n} VolumeAttachments, {CLIENT_CONCURRENCY} requests in flight; or the {n} \
             deletes of the VolumeAttachments."
        );
        let _ = writeln!(
            out,
            "- **all attached** / **all gone**: from the first request until the bench's watch \
             of the attachments saw the last one attached (safe-detach: `status.phase: \
             Attached` and `status.attached: true`; storage.k8s.io: `status.attached: true`) or \
             gone (its finalizer released, the object deleted)."
        );
        let _ = writeln!(
            out,
            "- **p50**, **p99**: per attachment, from the bench sending its create (delete) to \
             the watch seeing it attached (gone); nearest rank over all {n}, so `> T` where \
             fewer than that share got there within the phase's T."
        );
        let _ = writeln!(
            out,
            "- **writes / attachment**: the writes (create, update, patch, apply, delete) the \
             apiserver's flow control dispatched under the controller's own identity during the \
             phase (a ServiceAccount and a FlowSchema of its own, routed to `workload-low` as any \
             ServiceAccount's requests are: `apiserver_flowcontrol_dispatched_requests_total`), \
             divided by {n}; so neither the bench's creates (the Volumes' or PVs' included) and \
             deletes nor other clients of the apiserver count. The notes break the phase's writes \
             down by kind (`apiserver_request_total`, which counts everyone's)."
        );
        let _ = writeln!(
            out,
            "- **CPU**: user and system seconds (`/proc/<pid>/stat`) of kube-apiserver, etcd, \
             the plugin and the controller over the phase: from the first request until the \
             controller's writes stopped for a second after the last attachment got there (at \
             most {} s more), or until the phase's time ran out.",
            SETTLE_MAX.as_secs()
        );
        let _ = writeln!(
            out,
            "- **RSS peak**: the controller process's `VmHWM` at the end of the phase (its \
             peak since it started)."
        );
        let _ = writeln!(
            out,
            "- **× raw**: all attached (gone) divided by the raw limit's time. The raw limit, \
             measured in the same run once the controllers were done: as many writes as {} \
             made in that phase, by a plain client at concurrency {RAW_CONCURRENCY} (the \
             reconciles safe-detach runs at once), JSON merge patches of the `status` of \
             safe-detach VolumeAttachments that no operator serves, each changing the status, \
             under safe-detach's identity.\n",
            self.raw_of.map_or("the first controller", |c| c.title())
        );
        let _ = writeln!(out, "## Notes\n");
        for run in &self.runs {
            let _ = writeln!(out, "{}:\n", run.controller.title());
            for (label, phase) in [("attach", &run.attach), ("detach", &run.detach)] {
                let _ = writeln!(
                    out,
                    "- {label}: {:.0} writes by the controller (under its identity), {} by the \
                     bench; `apiserver_request_total` counted {:.0} writes of the controller's \
                     kinds, {:.0} once the bench's are taken off (anyone's, so more than the \
                     controller's when others wrote these kinds too): {}",
                    phase.controller_writes(),
                    phase.bench_writes,
                    phase.kinds(run.controller).total(),
                    phase.kinds(run.controller).total() - phase.bench_writes as f64,
                    phase.kinds(run.controller).breakdown()
                );
                let _ = writeln!(
                    out,
                    "- {label}: {:.0} reads (get, list, watch) by the controller; the apiserver's \
                     count of reads of its kinds, anyone's: {}",
                    phase.own_reads,
                    phase.reads.breakdown()
                );
                if !phase.operator.is_empty() {
                    let counters: Vec<String> = phase
                        .operator
                        .iter()
                        .map(|(series, n)| format!("`{series}` +{n:.0}"))
                        .collect();
                    let _ = writeln!(
                        out,
                        "- {label}: the operator's own counters: {}",
                        counters.join(", ")
                    );
                }
                let _ = writeln!(
                    out,
                    "- {label}: the machine was busy {:.1} CPU-s of {:.1} core-s; the measured \
                     processes and the bench {:.1}, other processes {:.1}",
                    phase.machine.busy,
                    phase.machine.available,
                    phase.machine.measured,
                    phase.machine.others()
                );
                if let Some(waited) = phase.not_quiet {
                    let _ = writeln!(
                        out,
                        "- {label}: others were still writing after {:.0} s of waiting for a \
                         quiet apiserver",
                        waited.as_secs_f64()
                    );
                }
                if phase.others() > 0.0 {
                    let _ = writeln!(
                        out,
                        "- {label}: other clients of the apiserver wrote {:.0} times meanwhile \
                         (their CPU is in the apiserver's and etcd's figures); all writes: {}",
                        phase.others(),
                        phase.all.breakdown()
                    );
                }
            }
            for note in &run.notes {
                let _ = writeln!(out, "- {note}");
            }
            out.push('\n');
        }
        if let Some((attach, detach)) = &self.raw {
            for (label, raw) in [("attach", attach), ("detach", detach)] {
                let _ = writeln!(
                    out,
                    "- raw limit for the {label} phase: {} status writes to {} objects in {:.2} \
                     s ({:.0} writes/s); flow control counted {:.0} under its identity, and {:.0} \
                     writes by others meanwhile",
                    raw.writes,
                    raw.objects,
                    raw.elapsed.as_secs_f64(),
                    raw.writes as f64 / raw.elapsed.as_secs_f64().max(1e-9),
                    raw.counted,
                    raw.others
                );
                let _ = writeln!(
                    out,
                    "- raw limit for the {label} phase: the machine was busy {:.1} CPU-s of {:.1} \
                     core-s; the measured processes and the bench {:.1}, other processes {:.1}",
                    raw.machine.busy,
                    raw.machine.available,
                    raw.machine.measured,
                    raw.machine.others()
                );
            }
        }
        out
    }

    fn table(&self, out: &mut String, phase: Phase) {
        let (title, issue, done) = match phase {
            Phase::Attach => ("Attach", "create phase", "all attached"),
            Phase::Detach => ("Detach", "delete phase", "all gone"),
        };
        let _ = writeln!(out, "## {title}: {} attachments\n", self.n);
        let _ = writeln!(
            out,
            "| controller | {issue} | {done} | p50 | p99 | writes / attachment | CPU apiserver | \
             CPU etcd | CPU plugin | CPU controller | RSS peak | × raw |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let raw = self.raw.as_ref().map(|(attach, detach)| match phase {
            Phase::Attach => attach,
            Phase::Detach => detach,
        });
        let mut shared = Vec::new();
        let mut unfinished = Vec::new();
        for run in &self.runs {
            let result = match phase {
                Phase::Attach => &run.attach,
                Phase::Detach => &run.detach,
            };
            let busy = shared_note(
                result.others(),
                result.own + result.bench_writes as f64,
                &result.machine,
            );
            if let Some(note) = &busy {
                shared.push(format!("{}: {note}", run.controller.title()));
            }
            let mut title = run.controller.title().to_owned();
            if phase == Phase::Detach && !run.attach.complete() {
                title.push_str(" ‡");
                unfinished.push(format!(
                    "{}: its attach phase did not finish, and its detach phase began with {} of \
                     {} attached",
                    run.controller.title(),
                    run.attach.progress.done,
                    run.attach.n
                ));
            }
            let _ = writeln!(out, "{}", row(&title, result, raw, busy.is_some()));
        }
        if let Some(raw) = raw {
            let busy = shared_note(raw.others, raw.writes as f64, &raw.machine);
            let mark = if busy.is_some() { " †" } else { "" };
            if let Some(note) = busy {
                shared.push(format!("the raw limit: {note}"));
            }
            let _ = writeln!(
                out,
                "| raw limit: {} status merge patches, {RAW_CONCURRENCY} in flight | — | {} | — | \
                 — | — | {}{mark} | {}{mark} | — | — | — | 1.0× |",
                raw.writes,
                secs(raw.elapsed),
                cpu(&raw.cpu, "kube-apiserver"),
                cpu(&raw.cpu, "etcd"),
            );
        }
        if !shared.is_empty() {
            let _ = writeln!(
                out,
                "\n† The machine or the apiserver was shared during the phase, so that its CPU \
                 figures include others' work and its times may suffer from it — {}.",
                shared.join("; ")
            );
        }
        if !unfinished.is_empty() {
            let _ = writeln!(out, "\n‡ {}.", unfinished.join("; "));
        }
        out.push('\n');
    }
}

/// What others did during a phase, when it was enough to matter: their writes on the apiserver
/// above 5 % of the phase's own, or other processes' CPU above 10 % of the machine.
fn shared_note(others_writes: f64, own_writes: f64, machine: &Machine) -> Option<String> {
    let mut parts = Vec::new();
    if others_writes > 0.05 * own_writes {
        parts.push(format!(
            "{others_writes:.0} writes by other clients of the apiserver"
        ));
    }
    if machine.others() > 0.1 * machine.available {
        parts.push(format!(
            "{:.1} CPU-s of other processes in {:.1} core-s",
            machine.others(),
            machine.available
        ));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn row(title: &str, result: &PhaseResult, raw: Option<&Raw>, busy: bool) -> String {
    let mark = if busy { " †" } else { "" };
    let n = result.n;
    let done = match result.finished {
        Some(finished) => secs(finished),
        None => format!(
            "did not finish: {} of {n} after {}",
            result.progress.done,
            secs(result.waited)
        ),
    };
    let writes = if result.complete() {
        format!("{:.2}", result.controller_writes() / n.max(1) as f64)
    } else {
        format!(
            "{:.0} for {} done",
            result.controller_writes(),
            result.progress.done
        )
    };
    let ratio = match (raw, result.finished) {
        (Some(raw), Some(finished)) => format!(
            "{:.1}×",
            finished.as_secs_f64() / raw.elapsed.as_secs_f64().max(1e-9)
        ),
        (Some(raw), None) => format!(
            "> {:.0}×",
            result.waited.as_secs_f64() / raw.elapsed.as_secs_f64().max(1e-9)
        ),
        (None, _) => "—".to_owned(),
    };
    format!(
        "| {title} | {} | {done} | {} | {} | {writes} | {}{mark} | {}{mark} | {} | {} | {} | {ratio} |",
        secs(result.issued),
        quantile(result, 0.5),
        quantile(result, 0.99),
        cpu(&result.cpu, "kube-apiserver"),
        cpu(&result.cpu, "etcd"),
        cpu(&result.cpu, "plugin"),
        cpu(&result.cpu, "controller"),
        result
            .rss_peak
            .map_or_else(|| "—".to_owned(), |mib| format!("{mib:.1} MiB")),
    )
}

/// The `q` quantile of the latencies over all `n` attachments, nearest rank: those that never
/// got there count as slower than the phase's wait.
fn quantile(result: &PhaseResult, q: f64) -> String {
    let latencies = &result.progress.latencies;
    if result.complete() {
        let mut all = Latencies::default();
        for latency in latencies {
            all.push(*latency);
        }
        return all.quantile(q).map_or_else(|| "—".to_owned(), secs);
    }
    let rank = ((q * result.n as f64).ceil() as usize).clamp(1, result.n.max(1));
    let mut sorted = latencies.clone();
    sorted.sort();
    match sorted.get(rank - 1) {
        Some(latency) => secs(*latency),
        None => format!("> {}", secs(result.waited)),
    }
}

fn secs(duration: Duration) -> String {
    let s = duration.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

fn cpu(reading: &CpuReading, name: &str) -> String {
    reading
        .0
        .get(name)
        .map_or_else(|| "—".to_owned(), |s| format!("{s:.2} s"))
}
