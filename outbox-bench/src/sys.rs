//! Readings from `/proc`: CPU time of a database server and of this process, and this
//! process's resident memory. Linux only; elsewhere they read as zero.

use std::time::Duration;

/// Clock ticks per second of `/proc/*/stat` times.
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// utime + stime (+ the children's, when `children`) of one `/proc/<pid>/stat`, in ticks.
fn stat_ticks(stat: &str, children: bool) -> Option<(String, u64)> {
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is field 14, cstime 17.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let mut ticks = field(14)? + field(15)?;
    if children {
        ticks += field(16)? + field(17)?;
    }
    Some((comm, ticks))
}

/// CPU time used so far by every process named `postgres` on this machine, including the
/// backends that already exited (their time is in the postmaster's children's time).
pub fn postgres_cpu() -> Duration {
    server_cpu("postgres")
}

/// CPU time used so far by every process named `name` (`/proc/*/comm`, such as `postgres` or
/// `mariadbd`), their exited children's included.
pub fn server_cpu(name: &str) -> Duration {
    let mut ticks = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let pid = entry.file_name();
            if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((comm, t)) = stat_ticks(&stat, true) {
                if comm == name {
                    ticks += t;
                }
            }
        }
    }
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// CPU time used so far by this process.
pub fn own_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_ticks(&s, false))
        .map_or(0, |(_, t)| t);
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// This process's resident memory now.
#[cfg(test)]
pub fn rss() -> u64 {
    status_bytes("VmRSS")
}

/// This process's peak resident memory since the last [`reset_peak_rss`].
pub fn peak_rss() -> u64 {
    status_bytes("VmHWM")
}

/// Starts a new peak-RSS window (writing 5 to `clear_refs` resets `VmHWM` to the current RSS).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The machine: CPU model and count, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown CPU")
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} × {model}, {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_holds_spaces_and_parentheses() {
        let stat = "42 (post gres (x)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 11 13 20 0 1 0";
        assert_eq!(stat_ticks(stat, false), Some(("post gres (x)".into(), 10)));
        assert_eq!(stat_ticks(stat, true), Some(("post gres (x)".into(), 34)));
    }

    #[test]
    fn reads_this_process() {
        assert!(rss() > 0);
        reset_peak_rss();
        assert!(peak_rss() >= rss() / 2);
    }
}
