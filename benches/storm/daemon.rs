//! The backend's own limit: the daemon commands a storm needs, sent by a plain QMP client on one
//! connection to a daemon of their own, one after another (the monitor serves one at a time).

use crate::measure::Process;
use crate::support::qmp::Session;
use crate::support::qsd::Qsd;
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
    session: Session,
    n: usize,
}

impl ScratchDaemon {
    pub async fn start(n: usize) -> Self {
        let qsd = Qsd::start();
        for i in 0..n {
            crate::storm::create_raw_image(&qsd.image_dir().join(handle(i)));
        }
        let mut session = Session::connect(&qsd.qmp_socket())
            .await
            .expect("a QMP session with the scratch daemon");
        let socket = qsd.nbd_socket();
        session
            .execute(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": socket } } }),
            )
            .await
            .expect("nbd-server-start");
        Self { qsd, session, n }
    }

    /// What the driver asks of the daemon to attach each volume to a node the first time: its
    /// block node, then its export.
    pub async fn attach_all(&mut self) -> Phase {
        let image_dir = self.qsd.image_dir();
        let meter = self.meter();
        for i in 0..self.n {
            let (handle, id) = (handle(i), export(i));
            self.session
                .execute(
                    "blockdev-add",
                    json!({
                        "driver": "raw",
                        "node-name": format!("sd-{handle}"),
                        "file": { "driver": "file", "filename": image_dir.join(&handle) },
                    }),
                )
                .await
                .expect("blockdev-add");
            self.session
                .execute(
                    "block-export-add",
                    json!({
                        "type": "nbd", "id": id, "name": id,
                        "node-name": format!("sd-{handle}"), "writable": true,
                    }),
                )
                .await
                .expect("block-export-add");
        }
        meter.phase(2 * self.n)
    }

    /// What the driver asks of the daemon to detach each volume from its only node: the export's
    /// safe delete (no client is connected, so it is gone before the reply), then the block node.
    pub async fn detach_all(&mut self) -> Phase {
        let meter = self.meter();
        for i in 0..self.n {
            self.session
                .execute(
                    "block-export-del",
                    json!({ "id": export(i), "mode": "safe" }),
                )
                .await
                .expect("block-export-del");
            self.session
                .execute(
                    "blockdev-del",
                    json!({ "node-name": format!("sd-{}", handle(i)) }),
                )
                .await
                .expect("blockdev-del");
        }
        meter.phase(2 * self.n)
    }

    fn meter(&self) -> Meter {
        let process = Process {
            name: "qemu-storage-daemon",
            pid: self.qsd.pid().expect("the scratch daemon runs"),
        };
        Meter {
            cpu_before: process.cpu_seconds(),
            process,
            started: Instant::now(),
        }
    }
}

/// The clock and the daemon's CPU at the start of a phase.
struct Meter {
    process: Process,
    cpu_before: f64,
    started: Instant,
}

impl Meter {
    fn phase(&self, commands: usize) -> Phase {
        Phase {
            commands,
            elapsed: self.started.elapsed(),
            daemon_cpu: self.process.cpu_seconds() - self.cpu_before,
        }
    }
}

fn handle(i: usize) -> String {
    format!("h{i}")
}

fn export(i: usize) -> String {
    format!("sd_h{i}__node-{}", i % 5)
}
