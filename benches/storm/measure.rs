//! What a storm costs, read from outside the operator: CPU seconds and memory of each process
//! (`/proc`), the apiserver's own count of the requests it served (`apiserver_request_total`), and
//! per-object latencies.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process whose CPU and memory a run reports.
#[derive(Clone, Debug)]
pub struct Process {
    pub name: &'static str,
    pub pid: u32,
}

impl Process {
    /// The process whose id a pid file holds.
    pub fn from_pid_file(name: &'static str, file: &Path) -> Option<Self> {
        let pid = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        Some(Self { name, pid })
    }

    /// CPU seconds used so far, user and system.
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return 0.0;
        };
        // The command may hold spaces and parentheses: fields count from the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        // Fields 14 and 15 of stat(5) (utime, stime), counted here from field 3.
        ticks(11).unwrap_or(0.0) / TICKS_PER_SECOND + ticks(12).unwrap_or(0.0) / TICKS_PER_SECOND
    }

    /// Resident memory now and its peak, in MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// CPU seconds of each process at one moment, to subtract from a later reading.
#[derive(Clone, Debug, Default)]
pub struct CpuReading(pub BTreeMap<&'static str, f64>);

impl CpuReading {
    pub fn now(processes: &[Process]) -> Self {
        Self(
            processes
                .iter()
                .map(|p| (p.name, p.cpu_seconds()))
                .collect(),
        )
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(name, seconds)| (*name, seconds - earlier.0.get(name).unwrap_or(&0.0)))
                .collect(),
        )
    }
}

/// One series of `apiserver_request_total`: what was asked of which resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKind {
    pub verb: String,
    pub resource: String,
    pub subresource: String,
    /// The answer's code when it was not a success (409, 404, 422), else empty.
    pub failure: String,
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subresource.is_empty() {
            write!(f, "{} {}", self.verb, self.resource)?;
        } else {
            write!(f, "{} {}/{}", self.verb, self.resource, self.subresource)?;
        }
        if !self.failure.is_empty() {
            write!(f, " (answered {})", self.failure)?;
        }
        Ok(())
    }
}

/// The apiserver's request counters at one moment, summed over codes and scopes.
#[derive(Clone, Debug, Default)]
pub struct Requests(pub BTreeMap<RequestKind, f64>);

/// The verbs that write.
const WRITE_VERBS: [&str; 5] = ["POST", "PUT", "PATCH", "APPLY", "DELETE"];

impl Requests {
    /// Parses the apiserver's `/metrics` text.
    pub fn parse(text: &str) -> Self {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels
                    .split("\",")
                    .find_map(|pair| pair.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let kind = RequestKind {
                verb: label("verb"),
                resource: label("resource"),
                subresource: label("subresource"),
                failure: Some(label("code"))
                    .filter(|code| !code.starts_with('2'))
                    .unwrap_or_default(),
            };
            *counts.entry(kind).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Self(counts)
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(kind, n)| (kind.clone(), n - earlier.0.get(kind).unwrap_or(&0.0)))
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        )
    }

    /// The writes among these requests, leases left out (the election's heartbeat).
    pub fn writes(&self) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(kind, _)| {
                    WRITE_VERBS.contains(&kind.verb.as_str()) && kind.resource != "leases"
                })
                .map(|(kind, n)| (kind.clone(), *n))
                .collect(),
        )
    }

    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }
}

/// Latencies of one kind of event over many objects.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn push(&mut self, latency: Duration) {
        self.0.push(latency);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.0.clone();
        sorted.sort();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied()
    }
}

/// Seconds with one decimal, or a dash.
pub fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "—".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
}
