//! safe-detach: resolves stuck volume attachments, changing the record only after the storage
//! backend confirms.
//!
//! - [`api`]: the custom resources, the public API.
//! - [`decide`]: the pure decision core — what to do next, and what the status becomes.
//! - [`driver`]: storage backends behind one trait, knowing nothing of Kubernetes.
//! - [`reconcile`]: the controllers that execute decisions against the cluster and the backend.
//! - [`config`], [`runtime`]: the configuration and what runs around the controllers.

pub mod api;
pub mod config;
pub mod decide;
pub mod driver;
pub mod reconcile;
pub mod runtime;

/// The name the operator writes under: status field manager, event reporter, lease field manager.
pub const MANAGER: &str = "safe-detach";
