//! A randomized, fault-injecting campaign against the running operator, judged by an observer
//! of its own: seeded schedules of workload and faults ([`plan`]), run against the real system
//! ([`run`]), checked from outside the operator ([`observe`]). docs/reliability.md explains the
//! rules and how to run a seed again.

pub mod backend;
pub mod observe;
pub mod plan;
pub mod run;

use crate::support::cluster::admin_client;
use crate::support::volume_hold;
use observe::Rule;
use plan::Plan;
use run::Outcome;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// What a campaign of many schedules came to.
#[derive(Debug, Default)]
pub struct Summary {
    pub schedules: usize,
    /// Of them, those on the csi backend (the mock CSI plugin).
    pub csi_schedules: usize,
    pub ops: usize,
    pub ops_applied: usize,
    pub observations: usize,
    pub faults: BTreeMap<&'static str, usize>,
    pub hard_deletes: usize,
    pub apiserver_races: usize,
    /// Connections made behind the operator's back (orphans), as the backend answered them.
    pub orphans_made: usize,
    pub violations: BTreeMap<&'static str, Vec<u64>>,
    pub reports: Vec<String>,
    pub wall: Duration,
    pub slowest_convergence: Duration,
}

/// Runs the schedules of `seeds`, `parallel` at a time, each active for `active`.
pub async fn campaign(seeds: &[u64], parallel: usize, active: Duration) -> Summary {
    let started = std::time::Instant::now();
    // For the schedules whose Volumes are held from their creation (`Plan::hold_at_create`).
    volume_hold::install(&admin_client().await).await;
    let mut summary = Summary::default();
    for wave in seeds.chunks(parallel.max(1)) {
        let runs = wave.iter().map(|seed| {
            let plan = Plan::draw(*seed, active);
            tokio::spawn(run::run(plan))
        });
        for outcome in futures::future::join_all(runs).await {
            let outcome = outcome.expect("a schedule ran to its end");
            print_outcome(&outcome);
            add(&mut summary, outcome);
        }
    }
    summary.wall = started.elapsed();
    summary
}

fn print_outcome(outcome: &Outcome) {
    println!(
        "CAMPAIGN: seed {} backend {:?} ops {}/{} faults {:?} observations {} converged after {:?} quiet writes {} hard deletes {} apiserver races {} orphans made {} violations {} wall {:.1}s",
        outcome.seed,
        outcome.backend,
        outcome.ops_applied,
        outcome.ops,
        outcome.faults,
        outcome.observations,
        outcome.converged_after,
        outcome.quiet_writes,
        outcome.hard_deletes,
        outcome.apiserver_races,
        outcome.orphans_made,
        outcome.violations.len(),
        outcome.wall.as_secs_f64()
    );
    for report in &outcome.reports {
        println!("{report}\n");
    }
}

fn add(summary: &mut Summary, outcome: Outcome) {
    summary.schedules += 1;
    if outcome.backend == Some(plan::Backend::Csi) {
        summary.csi_schedules += 1;
    }
    summary.ops += outcome.ops;
    summary.ops_applied += outcome.ops_applied;
    summary.observations += outcome.observations;
    summary.hard_deletes += outcome.hard_deletes;
    summary.apiserver_races += outcome.apiserver_races;
    summary.orphans_made += outcome.orphans_made;
    for (kind, n) in outcome.faults {
        *summary.faults.entry(kind).or_insert(0) += n;
    }
    for v in &outcome.violations {
        let seeds = summary.violations.entry(v.rule.name()).or_default();
        if !seeds.contains(&outcome.seed) {
            seeds.push(outcome.seed);
        }
    }
    if let Some(after) = outcome.converged_after {
        summary.slowest_convergence = summary.slowest_convergence.max(after);
    }
    summary.reports.extend(outcome.reports);
}

impl Summary {
    /// The campaign as one row of the ledger in docs/reliability.md: when, on what code, which
    /// seeds, and what it found.
    pub fn ledger_row(&self, first_seed: u64, code: &str, date: &str) -> String {
        let violations: usize = self.violations.values().map(Vec::len).sum();
        let found = if violations == 0 {
            "0".to_owned()
        } else {
            let by_rule: Vec<String> = self
                .violations
                .iter()
                .map(|(rule, seeds)| format!("{rule} {seeds:?}"))
                .collect();
            format!("{violations} ({})", by_rule.join("; "))
        };
        format!(
            "| {date} | {code} | {first_seed}..={} | {} | {} | {found} | {:.0} s |",
            (first_seed + self.schedules as u64).saturating_sub(1),
            self.schedules,
            self.faults.values().sum::<usize>(),
            self.wall.as_secs_f64()
        )
    }

    /// The summary as the Markdown table docs/reliability.md keeps.
    pub fn table(&self, first_seed: u64, code: &str) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "| | |\n|---|---|");
        let _ = writeln!(t, "| code | {code} |");
        let _ = writeln!(
            t,
            "| schedules | {} (seeds {first_seed}..={}) |",
            self.schedules,
            (first_seed + self.schedules as u64).saturating_sub(1)
        );
        let _ = writeln!(
            t,
            "| of them on the csi backend (the mock CSI plugin; the rest on nbd) | {} |",
            self.csi_schedules
        );
        let _ = writeln!(
            t,
            "| operations | {} drawn, {} applied (the rest found nothing to act on) |",
            self.ops, self.ops_applied
        );
        let _ = writeln!(t, "| observation rounds | {} |", self.observations);
        for (kind, n) in &self.faults {
            let _ = writeln!(t, "| faults: {kind} | {n} |");
        }
        let _ = writeln!(
            t,
            "| hard `block-export-del` calls (forced detaches) | {} |",
            self.hard_deletes
        );
        let _ = writeln!(
            t,
            "| held Volumes the apiserver removed at once (its delete/finalizer race; schedules without the volume-hold policy) | {} |",
            self.apiserver_races
        );
        let _ = writeln!(
            t,
            "| connections made behind the operator's back (orphans on nbd) | {} |",
            self.orphans_made
        );
        for rule in Rule::ALL {
            let seeds = self.violations.get(rule.name());
            let shown = seeds.map_or("0".to_owned(), |s| format!("{} (seeds {s:?})", s.len()));
            let _ = writeln!(t, "| violations: {} | {shown} |", rule.name());
        }
        let _ = writeln!(
            t,
            "| slowest convergence after the faults stopped | {:.1} s |",
            self.slowest_convergence.as_secs_f64()
        );
        let _ = writeln!(t, "| wall time | {:.0} s |", self.wall.as_secs_f64());
        t
    }
}
