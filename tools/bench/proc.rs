//! What a benchmark reads of a process it started, from Linux's `/proc`:
//! shared by the benchmarks of several crates (each includes this file with
//! `#[path]`; a crate of its own would be heavier than these few lines).

/// Resident memory of `pid` in KiB (0 when it cannot be read).
#[allow(dead_code)]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of `pid`, in milliseconds.
#[allow(dead_code)]
pub fn cpu_ms(pid: u32) -> u64 {
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    cpu_ticks(pid) * 10
}

/// User + system CPU time of `pid`, in clock ticks (USER_HZ: 1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}
