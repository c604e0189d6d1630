//! Prometheus metrics: what an operator of safe-detach alerts on (stuck attachments, forced
//! detaches) and what tells a slow backend from a slow operator (driver call latency).

use crate::api::types::STUCK;
use crate::api::{AttachmentPhase, Volume, VolumeAttachment, is_true};
use crate::driver::CallObserver;
use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForceLabels {
    pub reason: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub driver: String,
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

type HistogramFamily = Family<CallLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    force_detaches: Family<ForceLabels, Counter>,
    driver_calls: HistogramFamily,
    reconciles: Family<KindLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    write_conflicts: Family<KindLabels, Counter>,
    attachments: Family<PhaseLabels, Gauge>,
    stuck: Gauge,
    oldest_stuck_seconds: Gauge<f64, AtomicU64>,
    orphans: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("safedetach");
        let force_detaches = Family::<ForceLabels, Counter>::default();
        registry.register(
            "force_detaches",
            "Forced detaches, by reason (Requested, StuckAttaching, StuckDetaching, Orphan) and result",
            force_detaches.clone(),
        );
        let driver_calls: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register(
            "driver_call_duration_seconds",
            "Driver call latency, by driver, operation and result",
            driver_calls.clone(),
        );
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciles, by kind", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason",
            reconcile_errors.clone(),
        );
        let write_conflicts = Family::<KindLabels, Counter>::default();
        registry.register(
            "status_write_conflicts",
            "Status writes the apiserver refused as decided on an older version of the object, by kind",
            write_conflicts.clone(),
        );
        let attachments = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "attachments",
            "VolumeAttachments, by phase",
            attachments.clone(),
        );
        let stuck = Gauge::default();
        registry.register(
            "stuck_attachments",
            "VolumeAttachments whose Stuck condition is True",
            stuck.clone(),
        );
        let oldest_stuck_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_stuck_attachment_seconds",
            "How long the longest-stuck VolumeAttachment has been in its phase (0 when none is stuck)",
            oldest_stuck_seconds.clone(),
        );
        let orphans = Gauge::default();
        registry.register(
            "orphans",
            "Backend connections that no VolumeAttachment claims",
            orphans.clone(),
        );
        // Every forced-detach series exists from the start, at zero, so that `increase()` sees
        // the first forced detach too.
        for reason in ["Requested", "StuckAttaching", "StuckDetaching", "Orphan"] {
            for result in ["Succeeded", "Failed"] {
                let labels = ForceLabels {
                    reason: reason.into(),
                    result: result.into(),
                };
                drop(force_detaches.get_or_create(&labels));
            }
        }
        Self {
            registry,
            force_detaches,
            driver_calls,
            reconciles,
            reconcile_errors,
            write_conflicts,
            attachments,
            stuck,
            oldest_stuck_seconds,
            orphans,
        }
    }
}

impl Metrics {
    pub fn force_detach(&self, reason: &str, result: &str) {
        let labels = ForceLabels {
            reason: reason.into(),
            result: result.into(),
        };
        self.force_detaches.get_or_create(&labels).inc();
    }

    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn reconcile_failed(&self, kind: &str, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A status write refused as decided on an older version: the object is read again.
    pub fn write_conflict(&self, kind: &str) {
        self.write_conflicts
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Recomputes the gauges that describe the attachments, from the controller's cache.
    pub fn observe_attachments(&self, attachments: &[Arc<VolumeAttachment>], now: Timestamp) {
        self.attachments.clear();
        let mut stuck = 0;
        let mut oldest = Duration::ZERO;
        for attachment in attachments {
            let Some(status) = &attachment.status else {
                continue;
            };
            let phase = status.phase.unwrap_or(AttachmentPhase::Pending);
            self.attachments
                .get_or_create(&PhaseLabels {
                    phase: format!("{phase:?}"),
                })
                .inc();
            if is_true(&status.conditions, STUCK) {
                stuck += 1;
                if let Some(since) = &status.phase_since {
                    oldest = oldest.max(now.duration_since(since.0).unsigned_abs());
                }
            }
        }
        self.stuck.set(stuck);
        self.oldest_stuck_seconds.set(oldest.as_secs_f64());
    }

    /// Recomputes the orphan gauge from the Volume cache.
    pub fn observe_volumes(&self, volumes: &[Arc<Volume>]) {
        let orphans: usize = volumes
            .iter()
            .filter_map(|v| v.status.as_ref())
            .map(|s| s.orphans.len())
            .sum();
        self.orphans.set(i64::try_from(orphans).unwrap_or(i64::MAX));
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl CallObserver for Metrics {
    fn call_finished(
        &self,
        driver: &str,
        operation: &'static str,
        result: &str,
        elapsed: Duration,
    ) {
        let labels = CallLabels {
            driver: driver.into(),
            operation: operation.into(),
            result: result.into(),
        };
        self.driver_calls
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}
