//! The operator's HTTP endpoints: `/metrics` for Prometheus, `/healthz` (the process serves) and
//! `/readyz` (a follower standing by; an acting replica once its caches are synced and its
//! drivers answer).

use super::metrics::Metrics;
use crate::api::{Volume, VolumeAttachment};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use jiff::Timestamp;
use kube::runtime::reflector::Store;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What the endpoints report, shared with the controllers.
#[derive(Default)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// The drivers that did not answer their last check, with why.
    unreachable: Mutex<Vec<String>>,
    caches: OnceLock<(Store<VolumeAttachment>, Store<Volume>)>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Records which drivers did not answer their last check (`driver: why`).
    pub fn set_unreachable(&self, drivers: Vec<String>) {
        *self
            .unreachable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = drivers;
    }

    /// Ready: caches synced and, for an acting replica, every driver answering.
    fn readiness(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("not ready: caches syncing".into());
        }
        let unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if unreachable.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "not ready: drivers unreachable: {}",
                unreachable.join("; ")
            ))
        }
    }

    /// Gives the metrics the controllers' caches, from which the per-phase, stuck and orphan
    /// gauges are computed at each scrape.
    pub fn observe(&self, attachments: Store<VolumeAttachment>, volumes: Store<Volume>) {
        let _ = self.caches.set((attachments, volumes));
    }
}

/// Serves the endpoints on `address` until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(health): State<Arc<Health>>) -> Result<String, StatusCode> {
    if let Some((attachments, volumes)) = health.caches.get() {
        health
            .metrics
            .observe_attachments(&attachments.state(), Timestamp::now());
        health.metrics.observe_volumes(&volumes.state());
    }
    health
        .metrics
        .encode()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.readiness() {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
