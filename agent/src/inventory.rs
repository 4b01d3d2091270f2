//! Basic inventory read from `/proc` and `/etc` under a root path (so tests
//! use fixture trees). The full hardware inventory comes with its own issue.

use std::path::Path;

use nimbus_proto::Inventory;

/// Read hostname, CPU count, memory, kernel and OS release under `root`.
pub fn collect(root: &Path, hostname: &str) -> Inventory {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    let cpus = read("proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u32;
    let memory_bytes = read("proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let kernel = read("proc/sys/kernel/osrelease").trim().to_string();
    let os_release = parse_os_release(&read("etc/os-release"));
    Inventory {
        hostname: hostname.to_string(),
        cpus,
        memory_bytes,
        kernel,
        os_release,
    }
}

fn parse_os_release(text: &str) -> String {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    get("PRETTY_NAME").or_else(|| get("NAME")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fixture_tree() {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, s).unwrap();
        };
        w("proc/cpuinfo", "processor\t: 0\nmodel name\t: X\n\nprocessor\t: 1\n");
        w("proc/meminfo", "MemTotal:       2048 kB\nMemFree: 1 kB\n");
        w("proc/sys/kernel/osrelease", "6.1.0-test\n");
        w(
            "etc/os-release",
            "NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        let inv = collect(d.path(), "h1");
        assert_eq!(inv.cpus, 2);
        assert_eq!(inv.memory_bytes, 2048 * 1024);
        assert_eq!(inv.kernel, "6.1.0-test");
        assert_eq!(inv.os_release, "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn missing_files_give_empty_values() {
        let d = tempfile::tempdir().unwrap();
        let inv = collect(d.path(), "h");
        assert_eq!((inv.cpus, inv.memory_bytes, inv.kernel.as_str()), (0, 0, ""));
    }
}
