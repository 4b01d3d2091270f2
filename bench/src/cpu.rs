//! CPU time of threads, from procfs (`/proc/PID/task/*/schedstat`: nanoseconds on CPU).

/// CPU time (ns) of the threads of process `pid` whose name (`comm`) starts with `prefix`; every
/// thread with `""`; 0 if the process is gone.
pub fn threads_cpu_ns(pid: u32, prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with(prefix)))
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// CPU time (ns) of this process's threads whose name starts with `prefix`.
pub fn own_threads_cpu_ns(prefix: &str) -> u64 {
    threads_cpu_ns(std::process::id(), prefix)
}
