//! Shared support for the end-to-end tests: the real control plane, a real qemu-storage-daemon,
//! and fault injection in front of it. Each test binary uses a part of it.
#![allow(dead_code)]

pub mod api_proxy;
pub mod campaign;
pub mod cluster;
pub mod conformance;
pub mod csi;
pub mod grpc_proxy;
pub mod harness;
pub mod operator;
pub mod peer;
pub mod process;
pub mod qmp;
pub mod qmp_proxy;
pub mod qsd;
pub mod scenario;
pub mod volume_hold;
