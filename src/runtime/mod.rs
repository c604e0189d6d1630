//! What runs around the controllers: logs, metrics, health endpoints and leader election.

pub mod api_rate;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod telemetry;
