//! A process's CPU and memory, read from `/proc`: what the benchmarks and the peer's smoke test
//! report of the programs they run.

use std::path::Path;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process whose CPU and memory a run reports.
#[derive(Clone, Debug)]
pub struct Process {
    pub name: &'static str,
    pub pid: u32,
}

impl Process {
    /// The process whose id a pid file holds.
    pub fn from_pid_file(name: &'static str, file: &Path) -> Option<Self> {
        let pid = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        Some(Self { name, pid })
    }

    /// CPU seconds used so far, user and system.
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return 0.0;
        };
        // The command may hold spaces and parentheses: fields count from the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        // Fields 14 and 15 of stat(5) (utime, stime), counted here from field 3.
        ticks(11).unwrap_or(0.0) / TICKS_PER_SECOND + ticks(12).unwrap_or(0.0) / TICKS_PER_SECOND
    }

    /// Resident memory now and its peak, in MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}
