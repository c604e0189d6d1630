//! A schedule drawn from a seed: the Volumes, the nodes, which faults are on, and a timeline of
//! workload operations and faults. The timeline is drawn in full before anything runs, from the
//! seed alone, so a seed names one schedule: a failing seed is run again as it was.

use super::super::csi::DRIVER_NAME as CSI_NODE;
use super::super::grpc_proxy::Fault as GrpcFault;
use super::super::qmp_proxy::Fault;
use super::backend::CSI_METHODS;
use std::fmt;
use std::time::Duration;

/// splitmix64: small, fast, and the same numbers on every machine for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    /// One of `weights.len()` choices, each as likely as its weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut roll = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if roll < *w {
                return i;
            }
            roll -= w;
        }
        unreachable!("the roll is below the sum of the weights")
    }
}

/// The backend a schedule runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A qemu-storage-daemon behind the QMP proxy, through the `nbd` driver.
    Nbd,
    /// The Kubernetes mock CSI plugin behind the gRPC proxy, through the `csi` driver (which
    /// confirms on its calls' answers: the mock's listing is a superset). The plugin has one
    /// node, its own, so every attachment of such a schedule names it: no two nodes race there,
    /// but every other rule and fault applies.
    Csi,
}

/// A Volume of the schedule.
#[derive(Clone, Debug)]
pub struct VolumePlan {
    pub handle: String,
    pub multi_attach: bool,
    pub auto_force_detach: bool,
    /// `orphanPolicy: Detach` (else `Report`).
    pub orphan_detach: bool,
}

/// Which kinds of fault a schedule injects.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitches {
    /// Lost and late driver replies through the backend's proxy (on the csi backend, refused
    /// calls too).
    pub qmp_replies: bool,
    /// The backend refusing calls for a while: every driver call fails.
    pub qmp_outage: bool,
    /// SIGKILL of an operator process, restarted after a pause.
    pub kill: bool,
    /// Two replicas under `--leader-elect`, the leader stopped with SIGTERM now and then.
    pub replicas: bool,
    /// The qemu-storage-daemon killed and started again: every export gone at once (nbd only: the
    /// mock CSI plugin keeps its publish record in memory, and a real backend does not forget its
    /// connections on a restart).
    pub qsd_restart: bool,
    /// The operator's watch streams lag (the API proxy in front of the operators).
    pub watch_lag: bool,
    /// The operators cut off from the apiserver for a while (the API proxy).
    pub partition: bool,
    /// The apiserver restarting, as the operators see it (the API proxy): every watch ends,
    /// writes under way land but their answers are lost, and every request is refused a while.
    pub apiserver_restart: bool,
}

/// One step of the workload. Volumes and slots are indexes; a slot is a VolumeAttachment name
/// of a Volume, re-used across creates.
#[derive(Clone, Debug)]
pub enum Op {
    Create {
        volume: usize,
        slot: usize,
        node: usize,
        /// A force-detach token already on the object when it is created.
        token: Option<String>,
    },
    /// Creates every slot of a Volume at once, each on another node: the race of attachments
    /// that all see the volume free.
    CreateAll {
        volume: usize,
        nodes: Vec<usize>,
    },
    Delete {
        volume: usize,
        slot: usize,
    },
    Annotate {
        volume: usize,
        slot: usize,
        token: String,
        /// How the token was drawn: new, repeated, or reverted to an earlier one.
        kind: TokenKind,
    },
    /// An NBD client (qemu-io) opens the slot's recorded export and holds it.
    Connect {
        volume: usize,
        slot: usize,
    },
    Disconnect {
        volume: usize,
        slot: usize,
    },
    DeleteVolume {
        volume: usize,
    },
    /// Creates the Volume again once it is gone (skipped while it exists).
    RecreateVolume {
        volume: usize,
    },
    /// Exports the Volume's backend volume to [`ORPHAN_NODE`] behind the operator's back: a
    /// connection no VolumeAttachment claims (case 5), left by a node that was lost with it.
    /// Skipped while the Volume is missing or being deleted.
    Orphan {
        volume: usize,
    },
}

/// The node of the connections the workload makes behind the operator's back. No attachment
/// names it, so each such connection stays an orphan until the operator forces it off.
pub const ORPHAN_NODE: &str = "lost0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    New,
    Repeated,
    Reverted,
}

/// One fault of the timeline.
#[derive(Clone, Debug)]
pub enum FaultOp {
    /// Spoil the next QMP command of that name.
    Qmp {
        command: &'static str,
        fault: Fault,
    },
    /// QMP refuses connections for this long.
    Outage(Duration),
    /// Calls of one CSI method meet `fault` for `lasting` (the gRPC proxy).
    Grpc {
        method: &'static str,
        fault: GrpcFault,
        lasting: Duration,
    },
    /// The CSI plugin answers every call `UNAVAILABLE` for this long.
    PluginOutage(Duration),
    /// SIGKILL of one replica (index), started again after `down`.
    Kill {
        replica: usize,
        down: Duration,
    },
    /// SIGTERM of whichever replica holds the lease, started again after `down`.
    HandOver {
        down: Duration,
    },
    RestartQsd,
    /// The operator's watch streams lag by this much, for `lasting`.
    WatchLag {
        lag: Duration,
        lasting: Duration,
    },
    /// The operator cannot reach the apiserver for this long.
    Partition(Duration),
    /// The apiserver restarts, as the operator sees it, and answers nothing for this long.
    RestartApiserver(Duration),
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Qmp { command, fault } => write!(f, "qmp {command} {fault:?}"),
            Self::Outage(d) => write!(f, "qmp outage {d:?}"),
            Self::Grpc {
                method,
                fault,
                lasting,
            } => write!(f, "csi {method} {fault:?} for {lasting:?}"),
            Self::PluginOutage(d) => write!(f, "csi outage {d:?}"),
            Self::Kill { replica, down } => write!(f, "SIGKILL replica {replica}, down {down:?}"),
            Self::HandOver { down } => write!(f, "SIGTERM leader, down {down:?}"),
            Self::RestartQsd => write!(f, "restart qemu-storage-daemon"),
            Self::WatchLag { lag, lasting } => write!(f, "watch lag {lag:?} for {lasting:?}"),
            Self::Partition(d) => write!(f, "partition {d:?}"),
            Self::RestartApiserver(d) => write!(f, "restart the apiserver, down {d:?}"),
        }
    }
}

impl FaultOp {
    /// The kind, as the summary counts it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Qmp {
                fault: Fault::DropReply,
                ..
            } => "qmp lost reply",
            Self::Qmp { .. } => "qmp late reply",
            Self::Outage(_) => "qmp outage",
            Self::Grpc {
                fault: GrpcFault::Drop,
                ..
            } => "csi lost reply",
            Self::Grpc {
                fault: GrpcFault::Delay(_),
                ..
            } => "csi late reply",
            Self::Grpc {
                fault: GrpcFault::Late(_),
                ..
            } => "csi late call",
            Self::Grpc { .. } => "csi refused call",
            Self::PluginOutage(_) => "csi outage",
            Self::Kill { .. } => "operator SIGKILL",
            Self::HandOver { .. } => "leader SIGTERM",
            Self::RestartQsd => "qsd restart",
            Self::WatchLag { .. } => "watch lag",
            Self::Partition(_) => "partition",
            Self::RestartApiserver(_) => "apiserver restart",
        }
    }
}

/// Mixed into the seed for the draw of aliases.
const ALIAS_STREAM: u64 = 0xa11a_5e5d;
/// Mixed into the seed for the draw of the admission policy's hold.
const HOLD_STREAM: u64 = 0x401d_a7c0;
/// Mixed into the seed for the draw of the apiserver's restarts.
const RESTART_STREAM: u64 = 0x5e7a_47ed;
/// Mixed into the seed for the draw of the backend, and of the csi backend's faults.
const BACKEND_STREAM: u64 = 0xc51_ba5e;
/// The share of schedules on the csi backend, in percent.
const CSI_SHARE: u64 = 30;
/// Mixed into the seed for the draw of the csi faults that become late calls.
const LATE_STREAM: u64 = 0x1a7e_ca11;
/// The share of csi call faults that are late calls, in percent.
const LATE_SHARE: u64 = 20;
/// Mixed into the seed for the draw of the connections made behind the operator's back.
const ORPHAN_STREAM: u64 = 0x0e9a_4a11;
/// The share of schedules with such connections, among those that can have them, in percent.
const ORPHAN_SHARE: u64 = 80;

/// Slots (VolumeAttachment names) per Volume.
pub const SLOTS: usize = 3;

/// A whole schedule.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub backend: Backend,
    pub volumes: Vec<VolumePlan>,
    pub nodes: Vec<String>,
    pub faults: FaultSwitches,
    /// Workload operations at their offsets from the start, in order.
    pub ops: Vec<(Duration, Op)>,
    /// Faults at their offsets from the start, in order.
    pub fault_ops: Vec<(Duration, FaultOp)>,
    /// How long operations and faults go on; convergence is judged after.
    pub active: Duration,
    /// Whether the schedule's Volumes carry the operator's finalizer from their creation, as
    /// deploy/volume-hold-policy.yaml makes them; otherwise the operator adds it, as on a cluster
    /// without the policy.
    pub hold_at_create: bool,
}

/// QMP commands the nbd driver sends, any of which a fault may spoil.
const QMP_COMMANDS: [&str; 6] = [
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "blockdev-add",
    "blockdev-del",
    "nbd-server-start",
];

impl Plan {
    /// Draws the schedule of `seed`.
    pub fn draw(seed: u64, active: Duration) -> Self {
        let mut rng = Rng::new(seed);
        let mut nodes: Vec<String> = (0..3 + rng.below(3)).map(|i| format!("n{i}")).collect();
        let volume_count = 2 + rng.index(2);
        let mut volumes: Vec<VolumePlan> = (0..volume_count)
            .map(|i| VolumePlan {
                handle: format!("h{i}"),
                multi_attach: rng.chance(30),
                auto_force_detach: rng.chance(60),
                orphan_detach: rng.chance(50),
            })
            .collect();
        // Every schedule has a single-attach Volume: the double attach is the rule most worth
        // attacking.
        volumes[0].multi_attach = false;
        // A quarter of the schedules alias: their last Volume names the first one's backend
        // volume, and attaches nothing while the first is there. Drawn on a stream of its own, so
        // that every other draw of a seed is what it was before aliases were drawn.
        if Rng::new(seed ^ ALIAS_STREAM).chance(25) {
            let last = volumes.len() - 1;
            volumes[last].handle = volumes[0].handle.clone();
        }
        let mut faults = FaultSwitches {
            qmp_replies: rng.chance(60),
            qmp_outage: rng.chance(40),
            kill: rng.chance(50),
            replicas: rng.chance(40),
            qsd_restart: rng.chance(25),
            watch_lag: rng.chance(30),
            partition: rng.chance(20),
            apiserver_restart: false,
        };
        let mut ops = draw_ops(&mut rng, &volumes, active);
        let mut fault_ops = draw_faults(&mut rng, &faults, active);
        // Restarts of the apiserver in a third of the schedules, on a stream of their own.
        let mut restarts = Rng::new(seed ^ RESTART_STREAM);
        faults.apiserver_restart = restarts.chance(33);
        if faults.apiserver_restart {
            let ms = active.as_millis() as u64;
            for _ in 0..1 + restarts.below(2) {
                let down = restarts.millis(200, 3000);
                fault_ops.push((restarts.millis(0, ms), FaultOp::RestartApiserver(down)));
            }
            fault_ops.sort_by_key(|(at, _)| *at);
        }
        // Half the schedules run under the policy; a stream of its own keeps the other draws.
        let hold_at_create = Rng::new(seed ^ HOLD_STREAM).chance(50);
        // Some on the csi backend, on a stream of their own: a seed drawn for nbd is the schedule
        // it was before the csi backend was drawn.
        let mut backend_rng = Rng::new(seed ^ BACKEND_STREAM);
        let backend = if backend_rng.chance(CSI_SHARE) {
            Backend::Csi
        } else {
            Backend::Nbd
        };
        if backend == Backend::Csi {
            nodes = vec![CSI_NODE.to_owned()];
            faults.qsd_restart = false;
            fault_ops = for_the_plugin(&mut backend_rng, fault_ops);
            fault_ops = some_late(&mut Rng::new(seed ^ LATE_STREAM), fault_ops);
        }
        if backend == Backend::Nbd {
            let orphans = draw_orphans(&mut Rng::new(seed ^ ORPHAN_STREAM), &volumes, active);
            ops.extend(orphans);
            ops.sort_by_key(|(at, _)| *at);
        }
        Self {
            seed,
            backend,
            volumes,
            nodes,
            faults,
            ops,
            fault_ops,
            active,
            hold_at_create,
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// The faults of a schedule on the csi backend: each QMP fault drawn becomes a fault of a CSI
/// call at the same time, drawn on `rng`; a QMP outage becomes the plugin's; the daemon's restart
/// goes.
fn for_the_plugin(rng: &mut Rng, drawn: Vec<(Duration, FaultOp)>) -> Vec<(Duration, FaultOp)> {
    drawn
        .into_iter()
        .filter_map(|(at, fault)| {
            let fault = match fault {
                FaultOp::Qmp { .. } => {
                    let method = CSI_METHODS[rng.index(CSI_METHODS.len())];
                    let fault = match rng.weighted(&[35, 35, 30]) {
                        0 => GrpcFault::Drop,
                        // Some beyond the driver's deadline of 2 s: a timeout, an unknown outcome.
                        1 => GrpcFault::Delay(rng.millis(200, 3000)),
                        _ => {
                            let codes = [
                                tonic::Code::Unavailable,
                                tonic::Code::Internal,
                                tonic::Code::Aborted,
                                tonic::Code::FailedPrecondition,
                            ];
                            GrpcFault::Fail {
                                code: codes[rng.index(codes.len())],
                                message: "injected by the campaign".into(),
                            }
                        }
                    };
                    FaultOp::Grpc {
                        method,
                        fault,
                        lasting: rng.millis(100, 1000),
                    }
                }
                FaultOp::Outage(lasting) => FaultOp::PluginOutage(lasting),
                FaultOp::RestartQsd => return None,
                other => other,
            };
            Some((at, fault))
        })
        .collect()
}

/// Some of the csi call faults drawn become late calls: the call reaches the plugin after the
/// driver's deadline of 2 s (its outcome unknown to the operator), and is carried out then. Each
/// lands within one deadline of the operator's giving up, the time the operator leaves a plugin
/// to carry out a call it started: 2.2–3.5 s after it was sent, half a second before that time
/// runs out, for a timer that fires late on a loaded machine. Drawn on a stream of their own, so
/// that the rest of the schedule is what it was without them.
fn some_late(rng: &mut Rng, drawn: Vec<(Duration, FaultOp)>) -> Vec<(Duration, FaultOp)> {
    drawn
        .into_iter()
        .map(|(at, fault)| match fault {
            FaultOp::Grpc {
                method, lasting, ..
            } if rng.chance(LATE_SHARE) => (
                at,
                FaultOp::Grpc {
                    method,
                    fault: GrpcFault::Late(rng.millis(2200, 3500)),
                    lasting,
                },
            ),
            other => (at, other),
        })
        .collect()
}

fn draw_ops(rng: &mut Rng, volumes: &[VolumePlan], active: Duration) -> Vec<(Duration, Op)> {
    // The generator's own model of each slot's annotation history, so that "repeat" and "revert"
    // name real earlier tokens. Drawn tokens are unique in the schedule.
    let mut history: Vec<Vec<Vec<String>>> = vec![vec![Vec::new(); SLOTS]; volumes.len()];
    let mut next_token = 0;
    let new_token = |next: &mut usize| {
        *next += 1;
        format!("t{next}")
    };
    let mut ops = Vec::new();
    let mut at = rng.millis(0, 300);
    while at < active {
        let volume = rng.index(volumes.len());
        let slot = rng.index(SLOTS);
        let op = match rng.weighted(&[30, 16, 16, 16, 8, 3, 4, 5]) {
            0 => {
                let token = rng.chance(15).then(|| new_token(&mut next_token));
                if let Some(token) = &token {
                    history[volume][slot].push(token.clone());
                }
                Op::Create {
                    volume,
                    slot,
                    node: rng.index(5),
                    token,
                }
            }
            1 => Op::Delete { volume, slot },
            2 => {
                let seen = &mut history[volume][slot];
                let (token, kind) = match rng.weighted(&[6, 2, 2]) {
                    1 if !seen.is_empty() => {
                        (seen.last().expect("seen").clone(), TokenKind::Repeated)
                    }
                    2 if seen.len() >= 2 => (seen[seen.len() - 2].clone(), TokenKind::Reverted),
                    _ => (new_token(&mut next_token), TokenKind::New),
                };
                seen.push(token.clone());
                Op::Annotate {
                    volume,
                    slot,
                    token,
                    kind,
                }
            }
            3 => Op::Connect { volume, slot },
            4 => Op::Disconnect { volume, slot },
            5 => Op::DeleteVolume { volume },
            6 => Op::RecreateVolume { volume },
            _ => {
                let first = rng.index(5);
                Op::CreateAll {
                    volume,
                    nodes: (0..SLOTS).map(|i| first + i).collect(),
                }
            }
        };
        ops.push((at, op));
        at += rng.millis(80, 600);
    }
    ops
}

/// Connections made behind the operator's back, on a stream of their own (a seed drawn before
/// them is the schedule it was, plus these): one or two, at any time of the schedule, to Volumes
/// that may have them without changing what the other rules judge. Such a Volume is
/// multi-attach, so that the connection blocks no attach (a blocked attach under `Report` would
/// never converge, and a connection made beside an attachment of a single-attach volume would be
/// a double attach of the workload's making), and the only Volume of its backend volume, so that
/// no single-attach alias makes it exclusive.
fn draw_orphans(rng: &mut Rng, volumes: &[VolumePlan], active: Duration) -> Vec<(Duration, Op)> {
    let eligible: Vec<usize> = (0..volumes.len())
        .filter(|&i| {
            volumes[i].multi_attach
                && volumes
                    .iter()
                    .filter(|v| v.handle == volumes[i].handle)
                    .count()
                    == 1
        })
        .collect();
    if eligible.is_empty() || !rng.chance(ORPHAN_SHARE) {
        return Vec::new();
    }
    let ms = active.as_millis() as u64;
    (0..1 + rng.below(2))
        .map(|_| {
            let volume = eligible[rng.index(eligible.len())];
            (rng.millis(0, ms), Op::Orphan { volume })
        })
        .collect()
}

fn draw_faults(
    rng: &mut Rng,
    faults: &FaultSwitches,
    active: Duration,
) -> Vec<(Duration, FaultOp)> {
    let mut drawn = Vec::new();
    let ms = active.as_millis() as u64;
    if faults.qmp_replies {
        let mut at = rng.millis(100, 1500);
        while at < active {
            let command = QMP_COMMANDS[rng.index(QMP_COMMANDS.len())];
            let fault = if rng.chance(50) {
                Fault::DropReply
            } else {
                // Some beyond the driver's deadline of 2 s: a timeout, an unknown outcome.
                Fault::DelayReply(rng.millis(200, 3000))
            };
            drawn.push((at, FaultOp::Qmp { command, fault }));
            at += rng.millis(300, 1500);
        }
    }
    if faults.qmp_outage {
        for _ in 0..1 + rng.below(2) {
            drawn.push((rng.millis(0, ms), FaultOp::Outage(rng.millis(500, 3000))));
        }
    }
    let replicas = if faults.replicas { 2 } else { 1 };
    if faults.kill {
        for _ in 0..1 + rng.below(2) {
            let replica = rng.index(replicas);
            let down = rng.millis(100, 2000);
            drawn.push((rng.millis(0, ms), FaultOp::Kill { replica, down }));
        }
    }
    if faults.replicas {
        for _ in 0..1 + rng.below(2) {
            let down = rng.millis(200, 2000);
            drawn.push((rng.millis(ms / 5, ms), FaultOp::HandOver { down }));
        }
    }
    if faults.qsd_restart {
        drawn.push((rng.millis(ms / 4, ms), FaultOp::RestartQsd));
    }
    if faults.watch_lag {
        let lag = rng.millis(200, 3000);
        let lasting = rng.millis(1000, 5000);
        drawn.push((rng.millis(0, ms), FaultOp::WatchLag { lag, lasting }));
    }
    if faults.partition {
        drawn.push((
            rng.millis(0, ms),
            FaultOp::Partition(rng.millis(1000, 6000)),
        ));
    }
    drawn.sort_by_key(|(at, _)| *at);
    drawn
}
