//! The CSI v1 protocol (`proto/csi.proto`, spec v1.12.0), generated at build time: messages,
//! clients (`identity_client`, `controller_client`, `node_client`) and server traits.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::all,
    unused_qualifications
)]

tonic::include_proto!("csi.v1");
