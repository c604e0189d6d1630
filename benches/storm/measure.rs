//! What a storm costs, read from outside the operator: CPU seconds and memory of each process
//! (`/proc`), the apiserver's own count of the requests it served (`apiserver_request_total`), and
//! per-object latencies.

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::support::process::Process;

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
    /// The API group: safe-detach's VolumeAttachments (`safedetach.io`) and the storage API's
    /// (`storage.k8s.io`) share a resource name.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// The answer's code when it was not a success (409, 404, 422), else empty.
    pub failure: String,
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.verb)?;
        if !self.group.is_empty() {
            write!(f, "{}/", self.group)?;
        }
        write!(f, "{}", self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
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
                group: label("group"),
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

    /// The writes among these requests, leases left out (the elections' heartbeats).
    pub fn writes(&self) -> Self {
        self.matching(|kind| {
            crate::support::cluster::WRITE_VERBS.contains(&kind.verb.as_str())
                && kind.resource != "leases"
        })
    }

    /// The requests of the kinds `keep` accepts.
    pub fn matching(&self, keep: impl Fn(&RequestKind) -> bool) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(kind, _)| keep(kind))
                .map(|(kind, n)| (kind.clone(), *n))
                .collect(),
        )
    }

    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// `count kind, count kind, …`, largest first.
    pub fn breakdown(&self) -> String {
        let mut kinds: Vec<(&RequestKind, &f64)> = self.0.iter().collect();
        kinds.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = kinds
            .iter()
            .map(|(kind, n)| format!("{n:.0} {kind}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
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
