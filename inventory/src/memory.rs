//! Memory facts: `proc/meminfo` (`MemTotal`, `SwapTotal`, `Hugepagesize`) and
//! `sys/kernel/mm/hugepages/hugepages-<size>kB/{nr_hugepages,free_hugepages}`.

use crate::model::{HugePages, Memory};
use crate::reader::Ctx;

pub(crate) fn collect(ctx: &mut Ctx<'_>) -> Memory {
    let mut mem = Memory::default();
    if let Some(meminfo) = ctx.required("memory.total_bytes", "proc/meminfo") {
        mem.total_bytes = meminfo_kib(&meminfo, "MemTotal");
        mem.swap_total_bytes = meminfo_kib(&meminfo, "SwapTotal");
        mem.hugepage_default_size_bytes = meminfo_kib(&meminfo, "Hugepagesize");
        if mem.total_bytes.is_none() {
            let path = ctx.path("proc/meminfo");
            ctx.warn("memory.total_bytes", path, "no parsable MemTotal line");
        }
    }

    let base = "sys/kernel/mm/hugepages";
    for name in ctx.dir_names(Some("memory.hugepages"), base) {
        let Some(kib) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")) else {
            continue;
        };
        let Ok(kib) = kib.parse::<u64>() else { continue };
        let field = format!("memory.hugepages[{name}]");
        mem.hugepages.push(HugePages {
            size_bytes: kib.saturating_mul(1024),
            total: ctx.parse(&field, format!("{base}/{name}/nr_hugepages")),
            free: ctx.parse(&field, format!("{base}/{name}/free_hugepages")),
        });
    }
    mem.hugepages.sort_by_key(|h| h.size_bytes);
    mem
}

/// `Key:   1234 kB` → bytes.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") | None => n.checked_mul(1024),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values_are_bytes() {
        let m = "MemTotal:       16384 kB\nMemFree: 1 kB\nHugepagesize:    2048 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(16384 * 1024));
        assert_eq!(meminfo_kib(m, "Hugepagesize"), Some(2 * 1024 * 1024));
        assert_eq!(meminfo_kib(m, "SwapTotal"), None);
        assert_eq!(meminfo_kib("MemTotal: x kB", "MemTotal"), None);
    }
}
