//! The operator's HTTP endpoints: `/metrics` for Prometheus, `/healthz` (the process serves) and
//! `/readyz` (a follower standing by; an acting replica once its caches are synced and its
//! drivers answer). [`Health`] is the readiness the controllers report; the metrics are their
//! own ([`Metrics`]), served beside it.

use super::metrics::{CONTENT_TYPE, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The operator's readiness, as the controllers report it.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// The drivers that did not answer their last check, with why.
    unreachable: Mutex<Vec<String>>,
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
}

/// Serves the endpoints on `address` until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Endpoints { health, metrics });
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// What the endpoints serve.
#[derive(Clone)]
struct Endpoints {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(endpoints)
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match endpoints.metrics.encode() {
        Ok(text) => Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text)),
        Err(_) => Err(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

async fn readyz(State(endpoints): State<Endpoints>) -> (StatusCode, String) {
    match endpoints.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(health: &Arc<Health>, path: &str) -> (StatusCode, Option<String>, String) {
        let request = http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let endpoints = Endpoints {
            health: health.clone(),
            metrics: Arc::new(Metrics::default()),
        };
        let response = router(endpoints).oneshot(request).await.unwrap();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics() {
        let health = Arc::new(Health::default());
        let (status, content_type, body) = get(&health, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(CONTENT_TYPE));
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn readiness_follows_the_caches_and_the_drivers() {
        let health = Arc::new(Health::default());
        assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&health, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready(true);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);
        health.set_unreachable(vec!["nbd: no answer".into()]);
        let (status, _, body) = get(&health, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("nbd: no answer"), "{body}");
    }
}
