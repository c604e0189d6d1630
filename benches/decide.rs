//! How fast the decision core decides: one `decide` plus the status it produces, for the states a
//! reconcile meets most. The operator's own cost per reconcile is this plus its API and driver
//! calls, which the end-to-end figures in docs/benchmarks.md measure.
//!
//! Run: `cargo bench --bench decide`.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use safe_detach::api::{AttachmentPhase, VolumeAttachmentStatus};
use safe_detach::decide::status::after_step;
use safe_detach::decide::{Basis, Input, ProbeAnswer, Request, Turn, VolumePolicy, decide};
use safe_detach::driver::Connections;
use std::hint::black_box;
use std::time::{Duration, Instant};

const ROUNDS: u32 = 200_000;

fn main() {
    let policy = VolumePolicy {
        multi_attach: false,
        stuck_after: Duration::from_secs(120),
        auto_force_detach: true,
    };
    let now = Timestamp::now();
    let cases = [
        (
            "converged (Attached, connected)",
            AttachmentPhase::Attached,
            vec!["node-a"],
            false,
        ),
        (
            "stuck Detaching, connected (case 4)",
            AttachmentPhase::Detaching,
            vec!["node-a"],
            true,
        ),
        (
            "Pending, held elsewhere (blocked)",
            AttachmentPhase::Pending,
            vec!["node-b"],
            false,
        ),
    ];
    println!("| state | decide + status, ns per call |");
    println!("|---|---|");
    for (name, phase, nodes, stuck) in cases {
        let since = if stuck {
            now - Duration::from_secs(600)
        } else {
            now
        };
        let status = VolumeAttachmentStatus {
            phase: Some(phase),
            phase_since: Some(Time(since)),
            ..Default::default()
        };
        let backend = ProbeAnswer::Answered(Connections::to(nodes));
        let request = Request::None;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let input = Input {
                deleting: false,
                has_finalizer: true,
                node: "node-a",
                status: black_box(&status),
                request: &request,
                volume: Ok(&policy),
                target: None,
                sibling: None,
                claimed_elsewhere: None,
                backend: Some(&backend),
                basis: Basis::Fresh,
                turn: Turn::Ours,
                generation: Some(1),
                resync: Duration::from_secs(60),
                now,
            };
            let step = decide(&input);
            black_box(after_step(&input, &step));
        }
        let per_call = started.elapsed().as_nanos() / u128::from(ROUNDS);
        println!("| {name} | {per_call} |");
    }
}
