//! CPU facts: `proc/cpuinfo` (first processor block only: later blocks repeat it, and on large hosts generating
//! them costs milliseconds), `sys/devices/system/cpu/{online,cpuN/topology/*}` and
//! `sys/devices/system/node/online`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};

use crate::model::Cpu;
use crate::reader::{Ctx, count_list};

/// CPU flags reported in [`Cpu::flags`], in this order. x86 names; on Arm `aes` comes from `Features`.
pub const TRACKED_CPU_FLAGS: &[&str] = &["aes", "avx", "avx2", "avx512f", "sha_ni", "vmx", "svm", "hypervisor"];

/// The first processor block of `proc/cpuinfo`, as key/value pairs.
pub(crate) struct CpuInfo {
    pub fields: Vec<(String, String)>,
}

impl CpuInfo {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// x86 `flags` or Arm `Features`, split on whitespace.
    pub fn flags(&self) -> impl Iterator<Item = &str> {
        self.get("flags")
            .or_else(|| self.get("Features"))
            .unwrap_or("")
            .split_whitespace()
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags().any(|f| f == flag)
    }
}

/// Read the first block of `proc/cpuinfo`.
pub(crate) fn read_cpuinfo(ctx: &mut Ctx<'_>) -> Option<CpuInfo> {
    let path = ctx.path("proc/cpuinfo");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            ctx.warn("cpu", path, e.to_string());
            return None;
        }
    };
    let mut fields = Vec::new();
    let mut seen_key = false;
    for line in BufReader::new(file).lines().take(200) {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                ctx.warn("cpu", path, e.to_string());
                return None;
            }
        };
        if line.trim().is_empty() {
            if seen_key {
                break;
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            seen_key = true;
            fields.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(CpuInfo { fields })
}

pub(crate) fn collect(ctx: &mut Ctx<'_>, info: Option<&CpuInfo>) -> Cpu {
    let mut cpu = Cpu::default();
    if let Some(info) = info {
        cpu.vendor = info.get("vendor_id").map(str::to_string).or_else(|| {
            info.get("CPU implementer")
                .map(|imp| arm_implementer(imp).unwrap_or(imp).to_string())
        });
        cpu.model = info
            .get("model name")
            .or_else(|| info.get("Model Name"))
            .map(str::to_string);
        let flags: BTreeSet<&str> = info.flags().collect();
        cpu.flags = TRACKED_CPU_FLAGS
            .iter()
            .filter(|f| flags.contains(**f))
            .map(|f| f.to_string())
            .collect();
    }

    let online = ctx.attr("cpu.threads", "sys/devices/system/cpu/online");
    cpu.threads = match online.as_deref().map(count_list) {
        Some(Some(n)) if n > 0 => Some(n),
        Some(_) => {
            let path = ctx.path("sys/devices/system/cpu/online");
            ctx.warn("cpu.threads", path, "unexpected CPU list");
            None
        }
        None => {
            let path = ctx.path("sys/devices/system/cpu/online");
            ctx.warn("cpu.threads", path, "missing");
            None
        }
    };

    // Topology of every CPU directory that has one (offline CPUs have none).
    let mut packages = BTreeSet::new();
    let mut cores = BTreeSet::new();
    let mut any = false;
    for name in ctx.dir_names(Some("cpu.sockets"), "sys/devices/system/cpu") {
        let Some(idx) = name.strip_prefix("cpu") else { continue };
        if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let topo = format!("sys/devices/system/cpu/{name}/topology");
        let Some(pkg) = ctx.parse::<i64>("cpu.sockets", format!("{topo}/physical_package_id")) else {
            continue;
        };
        let core = ctx.parse::<i64>("cpu.cores", format!("{topo}/core_id")).unwrap_or(-1);
        let die = ctx
            .attr_quiet(format!("{topo}/die_id"))
            .and_then(|d| d.parse::<i64>().ok())
            .unwrap_or(0);
        // Some Arm firmware reports -1 for the package: one socket.
        let pkg = pkg.max(0);
        packages.insert(pkg);
        cores.insert((pkg, die, core));
        any = true;
    }
    if any {
        cpu.sockets = u32::try_from(packages.len()).ok();
        cpu.cores = u32::try_from(cores.len()).ok();
    }

    let nodes = ctx.attr("cpu.numa_nodes", "sys/devices/system/node/online");
    cpu.numa_nodes = nodes.as_deref().and_then(count_list).filter(|n| *n > 0);
    cpu
}

/// Arm `CPU implementer` codes (from the Arm ARM MIDR_EL1 register description).
fn arm_implementer(code: &str) -> Option<&'static str> {
    let code = u32::from_str_radix(code.trim_start_matches("0x"), 16).ok()?;
    Some(match code {
        0x41 => "ARM",
        0x42 => "Broadcom",
        0x43 => "Cavium",
        0x46 => "Fujitsu",
        0x48 => "HiSilicon",
        0x4e => "NVIDIA",
        0x50 => "APM",
        0x51 => "Qualcomm",
        0x61 => "Apple",
        0xc0 => "Ampere",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_implementer_names_known_codes() {
        assert_eq!(arm_implementer("0x41"), Some("ARM"));
        assert_eq!(arm_implementer("0xc0"), Some("Ampere"));
        assert_eq!(arm_implementer("0x99"), None);
    }
}
