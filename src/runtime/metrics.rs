//! Prometheus metrics: what an operator of safe-detach alerts on (stuck attachments, forced
//! detaches) and what tells a slow backend from a slow operator (driver call and reconcile
//! latency). Served in the OpenMetrics text format ([`CONTENT_TYPE`]), durations with their unit.
//! The gauges that describe the objects are read off the controllers' caches at each scrape.

use crate::api::types::STUCK;
use crate::api::{AttachmentPhase, Volume, VolumeAttachment, is_true};
use crate::driver::CallObserver;
use jiff::Timestamp;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForceCallLabels {
    pub reason: String,
    pub result: String,
}

/// Why a detach is forced: the `reason` label of the force-detach metrics.
const FORCE_REASONS: [&str; 4] = ["Requested", "StuckAttaching", "StuckDetaching", "Orphan"];

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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets from half a millisecond to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    force_detaches: Family<ReasonLabels, Counter>,
    force_detach_calls: Family<ForceCallLabels, Counter>,
    driver_calls: HistogramFamily<CallLabels>,
    reconciles: Family<KindLabels, Counter>,
    reconcile_durations: HistogramFamily<KindLabels>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    write_conflicts: Family<KindLabels, Counter>,
    caches: Arc<CacheGauges>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("safedetach");
        // Two units of work, one family each: a forced detach done (once per operation), and a
        // call of the driver's force_detach (once per attempt, retries included).
        let force_detaches = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "force_detaches",
            "Forced detaches done, once each, when the backend confirmed the connection gone and \
             (for an attachment) the confirmation was recorded, by reason (Requested, \
             StuckAttaching, StuckDetaching, Orphan)",
            force_detaches.clone(),
        );
        let force_detach_calls = Family::<ForceCallLabels, Counter>::default();
        registry.register(
            "force_detach_calls",
            "Calls of a driver's force_detach, retries included, by reason and result (ok, error)",
            force_detach_calls.clone(),
        );
        let driver_calls: HistogramFamily<CallLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "driver_call_duration",
            "Driver call latency, by driver, operation and result",
            Unit::Seconds,
            driver_calls.clone(),
        );
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register("reconciles", "Reconciles, by kind", reconciles.clone());
        let reconcile_durations: HistogramFamily<KindLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "reconcile_duration",
            "How long the work of a reconcile took once its turn came, by kind",
            Unit::Seconds,
            reconcile_durations.clone(),
        );
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
        let caches = Arc::new(CacheGauges::default());
        registry.register_collector(Box::new(caches.clone()));
        // Every force-detach series exists from the start, at zero, so that `increase()` sees
        // the first one too.
        for reason in FORCE_REASONS {
            drop(force_detaches.get_or_create(&ReasonLabels {
                reason: reason.into(),
            }));
            for result in ["ok", "error"] {
                drop(force_detach_calls.get_or_create(&ForceCallLabels {
                    reason: reason.into(),
                    result: result.into(),
                }));
            }
        }
        Self {
            registry,
            force_detaches,
            force_detach_calls,
            driver_calls,
            reconciles,
            reconcile_durations,
            reconcile_errors,
            write_conflicts,
            caches,
        }
    }
}

impl Metrics {
    /// One forced detach done: the backend confirmed the connection gone (and, for an
    /// attachment, the confirmation is stored). Counted once per operation.
    pub fn force_detached(&self, reason: &str) {
        self.force_detaches
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// One call of a driver's force_detach for `reason`, and whether it returned OK (which alone
    /// confirms nothing).
    pub fn force_detach_called(&self, reason: &str, returned_ok: bool) {
        let labels = ForceCallLabels {
            reason: reason.into(),
            result: if returned_ok { "ok" } else { "error" }.into(),
        };
        self.force_detach_calls.get_or_create(&labels).inc();
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

    /// How long the work of one reconcile took.
    pub fn reconcile_took(&self, kind: &str, elapsed: Duration) {
        self.reconcile_durations
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(elapsed.as_secs_f64());
    }

    /// Gives the metrics the controllers' caches, from which the per-phase, stuck and orphan
    /// gauges are computed at each scrape. Until then those gauges are left out.
    pub fn observe(&self, attachments: Store<VolumeAttachment>, volumes: Store<Volume>) {
        let _ = self.caches.stores.set((attachments, volumes));
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
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

/// What the attachments' gauges say, computed from a list of attachments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttachmentGauges {
    /// Attachments with a status, by phase; phases no attachment is in are left out.
    pub by_phase: BTreeMap<String, i64>,
    /// Attachments whose Stuck condition is True.
    pub stuck: i64,
    /// How long the longest-stuck attachment has been in its phase; zero when none is stuck.
    pub oldest_stuck: Duration,
}

impl AttachmentGauges {
    pub fn of(attachments: &[Arc<VolumeAttachment>], now: Timestamp) -> Self {
        let mut gauges = Self::default();
        for attachment in attachments {
            let Some(status) = &attachment.status else {
                continue;
            };
            let phase = status.phase.unwrap_or(AttachmentPhase::Pending);
            *gauges.by_phase.entry(format!("{phase:?}")).or_default() += 1;
            if is_true(&status.conditions, STUCK) {
                gauges.stuck += 1;
                if let Some(since) = &status.phase_since {
                    gauges.oldest_stuck = gauges
                        .oldest_stuck
                        .max(now.duration_since(since.0).unsigned_abs());
                }
            }
        }
        gauges
    }
}

/// The backend connections no attachment claims, as the Volumes report them.
fn orphan_count(volumes: &[Arc<Volume>]) -> i64 {
    let orphans: usize = volumes
        .iter()
        .filter_map(|volume| volume.status.as_ref())
        .map(|status| status.orphans.len())
        .sum();
    i64::try_from(orphans).unwrap_or(i64::MAX)
}

/// The gauges read off the controllers' caches when Prometheus scrapes, so that nothing is kept
/// up to date between scrapes and a scrape never sees a half-refilled family.
#[derive(Default)]
struct CacheGauges {
    stores: OnceLock<(Store<VolumeAttachment>, Store<Volume>)>,
}

impl std::fmt::Debug for CacheGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheGauges")
            .field("observing", &self.stores.get().is_some())
            .finish()
    }
}

impl Collector for CacheGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((attachments, volumes)) = self.stores.get() else {
            return Ok(());
        };
        let gauges = AttachmentGauges::of(&attachments.state(), Timestamp::now());
        let gauge = |value: i64| ConstGauge::new(value);
        let mut by_phase = encoder.encode_descriptor(
            "attachments",
            "VolumeAttachments, by phase",
            None,
            gauge(0).metric_type(),
        )?;
        for (phase, count) in &gauges.by_phase {
            let labels = PhaseLabels {
                phase: phase.clone(),
            };
            gauge(*count).encode(by_phase.encode_family(&labels)?)?;
        }
        gauge(gauges.stuck).encode(encoder.encode_descriptor(
            "stuck_attachments",
            "VolumeAttachments whose Stuck condition is True",
            None,
            gauge(0).metric_type(),
        )?)?;
        let oldest = ConstGauge::new(gauges.oldest_stuck.as_secs_f64());
        oldest.encode(encoder.encode_descriptor(
            "oldest_stuck_attachment",
            "How long the longest-stuck VolumeAttachment has been in its phase (0 when none is stuck)",
            Some(&Unit::Seconds),
            oldest.metric_type(),
        )?)?;
        gauge(orphan_count(&volumes.state())).encode(encoder.encode_descriptor(
            "orphans",
            "Backend connections that no VolumeAttachment claims",
            None,
            gauge(0).metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        ConditionStatus, VolumeAttachmentSpec, VolumeAttachmentStatus, set_condition,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::{reflector, watcher};

    fn attachment(
        name: &str,
        phase: AttachmentPhase,
        stuck_since: Option<Timestamp>,
    ) -> VolumeAttachment {
        let mut attachment = VolumeAttachment::new(
            name,
            VolumeAttachmentSpec {
                volume_name: "v".into(),
                node_name: "n".into(),
                connector: None,
                read_only: None,
            },
        );
        let mut status = VolumeAttachmentStatus {
            phase: Some(phase),
            ..VolumeAttachmentStatus::default()
        };
        if let Some(since) = stuck_since {
            status.phase_since = Some(Time(since));
            set_condition(
                &mut status.conditions,
                STUCK,
                ConditionStatus::True,
                "StuckDetaching",
                "",
                None,
                Time(since),
            );
        }
        attachment.status = Some(status);
        attachment
    }

    #[test]
    fn attachment_gauges_count_phases_and_the_longest_stuck() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let attachments = [
            attachment("a", AttachmentPhase::Attached, None),
            attachment("b", AttachmentPhase::Attached, None),
            attachment(
                "c",
                AttachmentPhase::Detaching,
                Some("2026-01-01T00:08:00Z".parse().unwrap()),
            ),
            attachment(
                "d",
                AttachmentPhase::Detaching,
                Some("2026-01-01T00:09:30Z".parse().unwrap()),
            ),
        ]
        .map(Arc::new);
        let gauges = AttachmentGauges::of(&attachments, now);
        assert_eq!(
            gauges.by_phase,
            BTreeMap::from([("Attached".to_owned(), 2), ("Detaching".to_owned(), 2)])
        );
        assert_eq!(gauges.stuck, 2);
        assert_eq!(gauges.oldest_stuck, Duration::from_secs(120));
        assert_eq!(AttachmentGauges::of(&[], now), AttachmentGauges::default());
    }

    #[test]
    fn the_text_is_openmetrics_with_units_and_gauges_read_at_scrape_time() {
        let metrics = Metrics::default();
        metrics.call_finished("nbd", "attach", "ok", Duration::from_millis(3));
        metrics.reconcile_took("VolumeAttachment", Duration::from_millis(7));
        let before = metrics.encode().unwrap();
        assert!(before.ends_with("# EOF\n"), "{before}");
        assert!(
            before.contains("# UNIT safedetach_driver_call_duration_seconds seconds"),
            "{before}"
        );
        assert!(
            before.contains(
                "safedetach_reconcile_duration_seconds_count{kind=\"VolumeAttachment\"} 1"
            ),
            "{before}"
        );
        // Each force-detach series is there from the start; a failed call is an attempt, not a
        // forced detach.
        assert!(
            before.contains("safedetach_force_detaches_total{reason=\"Orphan\"} 0"),
            "{before}"
        );
        metrics.force_detach_called("Requested", false);
        metrics.force_detach_called("Requested", true);
        metrics.force_detached("Requested");
        let counted = metrics.encode().unwrap();
        for series in [
            "safedetach_force_detach_calls_total{reason=\"Requested\",result=\"error\"} 1",
            "safedetach_force_detach_calls_total{reason=\"Requested\",result=\"ok\"} 1",
            "safedetach_force_detaches_total{reason=\"Requested\"} 1",
            "safedetach_force_detaches_total{reason=\"StuckDetaching\"} 0",
        ] {
            assert!(counted.contains(series), "no {series} in:\n{counted}");
        }
        // Before the caches are handed over nothing is known of the objects.
        assert!(!before.contains("safedetach_attachments"), "{before}");

        let (attachments, mut attachment_writer) = reflector::store::<VolumeAttachment>();
        let (volumes, _volume_writer) = reflector::store::<Volume>();
        metrics.observe(attachments, volumes);
        attachment_writer.apply_watcher_event(&watcher::Event::Apply(attachment(
            "a",
            AttachmentPhase::Attached,
            None,
        )));
        let after = metrics.encode().unwrap();
        assert!(
            after.contains("safedetach_attachments{phase=\"Attached\"} 1"),
            "{after}"
        );
        assert!(after.contains("safedetach_stuck_attachments 0"), "{after}");
        assert!(
            after.contains("# UNIT safedetach_oldest_stuck_attachment_seconds seconds"),
            "{after}"
        );
        assert!(after.contains("safedetach_orphans 0"), "{after}");

        // The next scrape reads the cache again: a phase nothing is in any more is gone.
        attachment_writer.apply_watcher_event(&watcher::Event::Apply(attachment(
            "a",
            AttachmentPhase::Detaching,
            None,
        )));
        let later = metrics.encode().unwrap();
        assert!(!later.contains("phase=\"Attached\""), "{later}");
        assert!(
            later.contains("safedetach_attachments{phase=\"Detaching\"} 1"),
            "{later}"
        );
    }
}
