//! The backend's own limit: the daemon commands a storm needs, sent by a plain QMP client on one
//! connection to a daemon of their own, one after another (the monitor serves one at a time).

use crate::measure::Process;
use crate::support::qsd::{QmpSession, Qsd};
use serde_json::json;
use std::time::{Duration, Instant};

/// One run of commands: how many, how long, and the daemon's CPU meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    pub commands: usize,
    pub elapsed: Duration,
    pub daemon_cpu: f64,
}

/// A daemon with N images, ready to export them.
pub struct ScratchDaemon {
    qsd: Qsd,
    session: QmpSession,
    n: usize,
}

impl ScratchDaemon {
    pub fn start(n: usize) -> Self {
        let qsd = Qsd::start();
        for i in 0..n {
            crate::storm::create_raw_image(&qsd.image_dir().join(handle(i)));
        }
        let mut session = qsd.session();
        let socket = qsd.nbd_socket();
        session
            .execute(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": socket } } }),
            )
            .expect("nbd-server-start");
        Self { qsd, session, n }
    }

    /// What the driver asks of the daemon to attach each volume to a node the first time: its
    /// block node, then its export.
    pub fn attach_all(&mut self) -> Phase {
        let image_dir = self.qsd.image_dir();
        self.timed(|i, session| {
            let (handle, id) = (handle(i), export(i));
            session
                .execute(
                    "blockdev-add",
                    json!({
                        "driver": "raw",
                        "node-name": format!("sd-{handle}"),
                        "file": { "driver": "file", "filename": image_dir.join(&handle) },
                    }),
                )
                .expect("blockdev-add");
            session
                .execute(
                    "block-export-add",
                    json!({
                        "type": "nbd", "id": id, "name": id,
                        "node-name": format!("sd-{handle}"), "writable": true,
                    }),
                )
                .expect("block-export-add");
        })
    }

    /// What the driver asks of the daemon to detach each volume from its only node: the export's
    /// safe delete (no client is connected, so it is gone before the reply), then the block node.
    pub fn detach_all(&mut self) -> Phase {
        self.timed(|i, session| {
            session
                .execute(
                    "block-export-del",
                    json!({ "id": export(i), "mode": "safe" }),
                )
                .expect("block-export-del");
            session
                .execute(
                    "blockdev-del",
                    json!({ "node-name": format!("sd-{}", handle(i)) }),
                )
                .expect("blockdev-del");
        })
    }

    fn timed(&mut self, mut each: impl FnMut(usize, &mut QmpSession)) -> Phase {
        let process = Process {
            name: "qemu-storage-daemon",
            pid: self.qsd.pid().expect("the scratch daemon runs"),
        };
        let cpu_before = process.cpu_seconds();
        let started = Instant::now();
        for i in 0..self.n {
            each(i, &mut self.session);
        }
        Phase {
            commands: 2 * self.n,
            elapsed: started.elapsed(),
            daemon_cpu: process.cpu_seconds() - cpu_before,
        }
    }
}

fn handle(i: usize) -> String {
    format!("h{i}")
}

fn export(i: usize) -> String {
    format!("sd_h{i}__node-{}", i % 5)
}
