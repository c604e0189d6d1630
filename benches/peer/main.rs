//! safe-detach beside the Kubernetes CSI external-attacher, on the same mock CSI plugin process
//! and the same apiserver: N attachments created at once and then deleted, each controller alone
//! in turn — safe-detach's `csi` driver at its defaults (its own Volumes and VolumeAttachments),
//! then `csi-attacher` v4.13.0 at its defaults and tuned (PersistentVolumes and storage.k8s.io
//! VolumeAttachments) — measured from outside: times and per-attachment latencies from a watch,
//! API writes from the apiserver's own counters (each controller runs under an identity of its
//! own, a ServiceAccount with its RBAC and FlowSchemas that count its requests apart from the
//! other clients of a shared control plane), CPU and memory from `/proc`. Each figure stands
//! beside the raw limit measured in the same run: as many plain status writes as safe-detach
//! needed.
//!
//! Run: `make bench-peer N=1000`, or `hack/build-peers.sh && BENCH_N=1000 cargo bench --bench
//! peer`. Environment: `BENCH_N` (attachments, default 1000), `BENCH_CONTROLLERS` (a comma-
//! separated subset of `safe-detach,attacher-default,attacher-tuned`, default all),
//! `BENCH_PEER_TIMEOUT_SECS` (the most a phase of the attacher at its defaults may take, default
//! 600: it writes 5 times a second; the others' phases may take 30 minutes), `BENCH_OUT` (the Markdown file, default
//! `target/bench/peer-<N>.md`; the controllers' logs are kept beside it).

mod support;

#[path = "../storm/measure.rs"]
// Shared with the storm bench; its unit tests do not run under this bench (no harness).
#[allow(dead_code, unused_imports)]
mod measure;

mod counts;
mod identity;
mod report;
mod run;
mod track;

use run::{Bench, Controller};
use std::path::Path;
use std::time::{Duration, Instant};

/// What one run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub n: usize,
    pub controllers: Vec<Controller>,
    /// How long a phase of the external-attacher at its defaults may take.
    pub timeout: Duration,
}

/// How long a phase of the other controllers may take: far more than they need, so that a run
/// never hangs.
pub const OTHERS_TIMEOUT: Duration = Duration::from_secs(1800);

impl Plan {
    fn from_env() -> Self {
        let n = std::env::var("BENCH_N")
            .ok()
            .map(|n| n.parse().expect("BENCH_N: a number of attachments"))
            .unwrap_or(1000);
        let controllers = match std::env::var("BENCH_CONTROLLERS") {
            Err(_) => Controller::ALL.to_vec(),
            Ok(list) => {
                let wanted: Vec<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                for name in &wanted {
                    assert!(
                        Controller::ALL.iter().any(|c| c.id() == *name),
                        "BENCH_CONTROLLERS: unknown {name:?}; known: safe-detach, \
                         attacher-default, attacher-tuned"
                    );
                }
                Controller::ALL
                    .into_iter()
                    .filter(|c| wanted.contains(&c.id()))
                    .collect()
            }
        };
        let timeout = std::env::var("BENCH_PEER_TIMEOUT_SECS")
            .ok()
            .map(|s| s.parse().expect("BENCH_PEER_TIMEOUT_SECS: seconds"))
            .map_or(Duration::from_secs(600), Duration::from_secs);
        Self {
            n,
            controllers,
            timeout,
        }
    }

    /// How long a phase of `controller` may take.
    pub fn timeout_for(&self, controller: Controller) -> Duration {
        match controller {
            Controller::AttacherDefault => self.timeout,
            _ => OTHERS_TIMEOUT,
        }
    }

    /// The command that runs this plan again.
    fn command(&self) -> String {
        let mut env = vec![format!("BENCH_N={}", self.n)];
        for key in ["BENCH_CONTROLLERS", "BENCH_PEER_TIMEOUT_SECS", "BENCH_OUT"] {
            if let Ok(value) = std::env::var(key) {
                env.push(format!("{key}={value}"));
            }
        }
        format!(
            "hack/build-peers.sh && {} cargo bench --bench peer",
            env.join(" ")
        )
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let plan = Plan::from_env();
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| {
        format!(
            "{}/target/bench/peer-{}.md",
            env!("CARGO_MANIFEST_DIR"),
            plan.n
        )
    });
    let dir = Path::new(&out)
        .parent()
        .map_or_else(|| Path::new(".").to_owned(), Path::to_owned);
    std::fs::create_dir_all(&dir).expect("the output folder");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let text = runtime.block_on(async {
        let started = Instant::now();
        let date = jiff::Timestamp::now()
            .strftime("%Y-%m-%d %H:%M UTC")
            .to_string();
        let bench = Bench::start(plan.clone(), dir.clone()).await;
        let context = bench.context().await;
        let mut runs = Vec::new();
        for controller in &plan.controllers {
            eprintln!("== {} ({} attachments)", controller.title(), plan.n);
            runs.push(bench.run(*controller).await);
        }
        // The raw limit repeats safe-detach's writes, or the first controller's without it.
        let reference = runs
            .iter()
            .find(|r| r.controller == Controller::SafeDetach)
            .or(runs.first());
        let raw = match reference {
            Some(run) => {
                let attach = bench
                    .raw(run.attach.controller_writes().round() as usize)
                    .await;
                let detach = bench
                    .raw(run.detach.controller_writes().round() as usize)
                    .await;
                Some((attach, detach))
            }
            None => None,
        };
        report::Report {
            n: plan.n,
            command: plan.command(),
            context,
            raw_of: reference.map(|r| r.controller),
            runs,
            raw,
            timeout: plan.timeout,
            wall: started.elapsed(),
            date,
        }
        .render()
    });
    std::fs::write(&out, &text).expect("write the tables");
    println!("{text}");
    println!("written to {out}");
}
