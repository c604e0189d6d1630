//! Storms on the `nbd` driver: thousands of attachments at once, against the real control plane
//! and a real `qemu-storage-daemon`, with a release build of the operator. Each figure is shown
//! beside what this machine's apiserver does with the same number of plain writes, measured in
//! the same run.
//!
//! Run: `make bench N=1000 SCENARIOS=attach,quiet,token,detach,stuck` (docs/benchmarks.md).
//! Environment: `BENCH_N` (attachments, default 1000), `BENCH_SCENARIOS` (a comma-separated
//! subset of `attach,quiet,token,detach,stuck`, default all), `BENCH_QUIET_SECS` (the converged
//! period, default 300), `BENCH_TIMEOUT_SECS` (the longest a storm may take, default 1800),
//! `BENCH_OUT` (a file for the Markdown tables, default `target/bench/storm-<N>.md`).

#[path = "../../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod daemon;
mod measure;
mod report;
mod storm;

use std::time::Duration;

/// What one run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub n: usize,
    pub scenarios: Vec<String>,
    pub quiet: Duration,
}

impl Plan {
    fn from_env() -> Self {
        let n = std::env::var("BENCH_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        let scenarios = std::env::var("BENCH_SCENARIOS")
            .unwrap_or_else(|_| "attach,quiet,token,detach,stuck".to_owned())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let quiet = std::env::var("BENCH_QUIET_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        Self {
            n,
            scenarios,
            quiet,
        }
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let plan = Plan::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let tables = runtime.block_on(storm::run(&plan));
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| {
        format!(
            "{}/target/bench/storm-{}.md",
            env!("CARGO_MANIFEST_DIR"),
            plan.n
        )
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("the output folder");
    }
    std::fs::write(&out, &tables).expect("write the tables");
    println!("{tables}");
    println!("written to {out}");
}
