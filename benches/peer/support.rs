//! The part of the end-to-end tests' support the bench uses: the control plane, the mock CSI
//! plugin, the operator's process, the external-attacher peer and `/proc` readings.
#![allow(dead_code)]

#[path = "../../tests/support/cluster.rs"]
pub mod cluster;
#[path = "../../tests/support/csi.rs"]
pub mod csi;
#[path = "../../tests/support/operator.rs"]
pub mod operator;
#[path = "../../tests/support/peer.rs"]
pub mod peer;
#[path = "../../tests/support/process.rs"]
pub mod process;
