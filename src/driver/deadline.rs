//! A deadline on every driver call. A call that runs past it has an unknown outcome: the backend
//! may still carry it out, so the caller must probe before deciding anything.

use super::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Wraps a driver so that each call gives up after `deadline` with [`DriverError::Timeout`].
pub struct Deadlined {
    inner: Arc<dyn Driver>,
    deadline: Duration,
}

impl Deadlined {
    pub fn new(inner: Arc<dyn Driver>, deadline: Duration) -> Self {
        Self { inner, deadline }
    }

    async fn run<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        tokio::time::timeout(self.deadline, call)
            .await
            .unwrap_or(Err(DriverError::Timeout {
                operation,
                deadline: self.deadline,
            }))
    }
}

#[async_trait]
impl Driver for Deadlined {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        self.run("probe", self.inner.probe(volume_handle)).await
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
