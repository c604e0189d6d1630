//! The part of the end-to-end tests' support the bench uses: the control plane, the mock CSI
//! plugin, the operator's process and the external-attacher peer.
#![allow(dead_code)]

#[path = "../../tests/support/cluster.rs"]
pub mod cluster;
#[path = "../../tests/support/csi.rs"]
pub mod csi;
#[path = "../../tests/support/operator.rs"]
pub mod operator;
#[path = "../../tests/support/peer.rs"]
pub mod peer;
