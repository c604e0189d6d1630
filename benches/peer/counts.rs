//! The apiserver's own count of the requests it served, from its `/metrics`:
//! `apiserver_request_total` (read by the storm bench's `measure::Requests`), and
//! `apiserver_flowcontrol_dispatched_requests_total` by FlowSchema, which tells one client's
//! writes from everyone else's (see `identity.rs`).

use crate::measure::Requests;
use kube::Client;
use std::collections::BTreeMap;

/// The apiserver's counters at one moment (or the difference of two): requests by kind, and
/// requests dispatched by flow control, by FlowSchema.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub requests: Requests,
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
            requests: Requests::parse(&text),
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
