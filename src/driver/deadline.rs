//! A deadline on every driver call. A call that runs past it has an unknown outcome: the backend
//! may still carry it out, so the caller must probe before deciding anything. Each call's
//! duration and outcome is also reported to an optional observer (the operator's metrics).

use super::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Told of every finished driver call.
pub trait CallObserver: Send + Sync {
    /// `result` is `ok` or the error's [`DriverError::reason`].
    fn call_finished(&self, driver: &str, operation: &'static str, result: &str, elapsed: Duration);
}

/// Wraps a driver so that each call gives up after `deadline` with [`DriverError::Timeout`].
pub struct Deadlined {
    inner: Arc<dyn Driver>,
    deadline: Duration,
    observer: Option<Arc<dyn CallObserver>>,
}

impl Deadlined {
    pub fn new(inner: Arc<dyn Driver>, deadline: Duration) -> Self {
        Self {
            inner,
            deadline,
            observer: None,
        }
    }

    /// Reports every call to `observer`.
    pub fn observed_by(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    async fn run<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(self.deadline, call)
            .await
            .unwrap_or(Err(DriverError::Timeout {
                operation,
                deadline: self.deadline,
            }));
        if let Some(observer) = &self.observer {
            let outcome = result.as_ref().map_or_else(DriverError::reason, |_| "ok");
            observer.call_finished(self.inner.kind(), operation, outcome, started.elapsed());
        }
        result
    }
}

#[async_trait]
impl Driver for Deadlined {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn can_probe(&self) -> bool {
        self.inner.can_probe()
    }

    fn settles_within(&self) -> Duration {
        self.inner.settles_within()
    }

    /// A call runs until its deadline, and may be carried out for as long as the backend
    /// settles after that.
    fn lands_within(&self) -> Duration {
        match self.inner.settles_within() {
            within if within.is_zero() => Duration::ZERO,
            within => self.deadline + within,
        }
    }

    async fn health_check(&self) -> Result<(), DriverError> {
        self.run("health_check", self.inner.health_check()).await
    }

    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        self.run("probe", self.inner.probe(volume_handle)).await
    }

    fn can_probe_many(&self) -> bool {
        self.inner.can_probe_many()
    }

    async fn probe_many(
        &self,
        volume_handles: &[String],
    ) -> Result<BTreeMap<String, Connections>, DriverError> {
        self.run("probe_many", self.inner.probe_many(volume_handles))
            .await
    }

    async fn attach(&self, request: &AttachRequest) -> Result<ConnectionInfo, DriverError> {
        self.run("attach", self.inner.attach(request)).await
    }

    async fn terminate_connection(
        &self,
        volume_handle: &str,
        node: &str,
    ) -> Result<(), DriverError> {
        self.run(
            "terminate_connection",
            self.inner.terminate_connection(volume_handle, node),
        )
        .await
    }

    async fn detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        self.run("detach", self.inner.detach(volume_handle, node))
            .await
    }

    async fn force_detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        self.run("force_detach", self.inner.force_detach(volume_handle, node))
            .await
    }
}
