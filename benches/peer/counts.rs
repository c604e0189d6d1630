//! The apiserver's own count of the requests it served, from its `/metrics`:
//! `apiserver_request_total`, kept by API group as well as resource (safe-detach's
//! VolumeAttachments, `safedetach.io`, and the storage API's, `storage.k8s.io`, share a resource
//! name), and `apiserver_flowcontrol_dispatched_requests_total` by FlowSchema, which tells one
//! client's writes from everyone else's (see `identity.rs`).

use kube::Client;
use std::collections::BTreeMap;

/// One series of `apiserver_request_total`, summed over codes, scopes and versions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Kind {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.verb)?;
        if !self.group.is_empty() {
            write!(f, "{}/", self.group)?;
        }
        write!(f, "{}", self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        Ok(())
    }
}

/// The verbs that write.
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// The request counters at one moment, or the difference of two moments.
#[derive(Clone, Debug, Default)]
pub struct Counts(pub BTreeMap<Kind, f64>);

/// The apiserver's counters at one moment (or the difference of two): requests by kind, and
/// requests dispatched by flow control, by FlowSchema.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub requests: Counts,
    pub flows: BTreeMap<String, f64>,
}

impl Snapshot {
    /// Reads the apiserver's `/metrics` now.
    pub async fn read(client: &Client) -> Self {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a metrics request");
        let text = client
            .request_text(request)
            .await
            .expect("the apiserver's /metrics");
        let mut flows = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_flowcontrol_dispatched_requests_total{")
            else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let Some(schema) = labels
                .split("\",")
                .find_map(|pair| pair.strip_prefix("flow_schema=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
            else {
                continue;
            };
            *flows.entry(schema).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Self {
            requests: Counts::parse(&text),
            flows,
        }
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            requests: self.requests.since(&earlier.requests),
            flows: self
                .flows
                .iter()
                .map(|(name, n)| (name.clone(), n - earlier.flows.get(name).unwrap_or(&0.0)))
                .collect(),
        }
    }

    /// The requests flow control dispatched under the FlowSchema `name`.
    pub fn flow(&self, name: &str) -> f64 {
        self.flows.get(name).copied().unwrap_or(0.0)
    }
}

impl Counts {
    /// Parses the `/metrics` text.
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
            let kind = Kind {
                verb: label("verb"),
                group: label("group"),
                resource: label("resource"),
                subresource: label("subresource"),
            };
            *counts.entry(kind).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Self(counts)
    }

    /// What was counted after `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(kind, n)| (kind.clone(), n - earlier.0.get(kind).unwrap_or(&0.0)))
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        )
    }

    /// The writes among these requests, leases left out (elections' heartbeats, not ours).
    pub fn writes(&self) -> Self {
        self.matching(|kind| WRITE_VERBS.contains(&kind.verb.as_str()) && kind.resource != "leases")
    }

    /// The requests of the kinds `keep` accepts.
    pub fn matching(&self, keep: impl Fn(&Kind) -> bool) -> Self {
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
        let mut kinds: Vec<(&Kind, &f64)> = self.0.iter().collect();
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
