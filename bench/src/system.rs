//! The process's resident memory and a description of the machine, read from `/proc` (Linux;
//! elsewhere the figures are absent rather than wrong).

use std::fs;

use serde::{Deserialize, Serialize};

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_field(name: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Resident memory now, bytes.
pub fn rss() -> Option<u64> {
    status_field("VmRSS")
}

/// The peak resident memory since the last [`reset_peak`], bytes.
pub fn peak_rss() -> Option<u64> {
    status_field("VmHWM")
}

/// Starts a new peak measurement (writing `5` to `clear_refs` resets `VmHWM` to the current
/// resident size, Linux 4.0 and later); returns whether the kernel allowed it.
pub fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes to MiB, for the table.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What the figures were measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// The CPU model.
    pub cpu: String,
    /// Cores this process may use.
    pub cores: usize,
    /// Physical memory, GiB.
    pub memory_gib: f64,
    /// The kernel release.
    pub kernel: String,
    /// When the run started (UTC, RFC 3339).
    pub started: String,
    /// The workspace commit, when run inside its git checkout.
    pub commit: Option<String>,
}

impl Machine {
    /// Reads the description off this machine.
    pub fn describe() -> Self {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| std::env::consts::OS.into());
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib,
            kernel,
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            commit,
        }
    }
}
