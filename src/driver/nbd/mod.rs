//! The `nbd` driver: volumes served by QEMU's storage daemon, one NBD export per (volume, node).
