//! Platform detection without network access.
//!
//! Sources, in the order they are trusted:
//! - DMI (`sys/class/dmi/id`, Documentation/ABI/testing/sysfs-class-dmi): AWS Nitro sets `sys_vendor`,
//!   `bios_vendor` and `board_vendor` to `Amazon EC2`, `product_name` to the instance type and `board_asset_tag`
//!   to the instance id (AWS "Detect whether a host is an EC2 instance"); AWS Xen instances have a system UUID
//!   starting with `ec2` and BIOS/product versions ending in `.amazon`; every Azure VM carries the chassis asset
//!   tag `7783-7084-3265-9085-8269-3286-77`; VMware sets `VMware, Inc.`, `VMware7,1`/`VMware Virtual Platform`
//!   and serials `VMware-…`.
//! - `sys/hypervisor/{type,uuid}` (Xen guests; AWS Xen UUIDs start with `ec2`).
//! - OpenNebula contextualization: `run/one-context/one_env` (or under `var/run`), an ISO 9660 volume labelled
//!   `CONTEXT` on a CD-ROM (found by the disk signature probe, or `dev/disk/by-label/CONTEXT`), and — weakest —
//!   the `etc/one-context.d` directory of the one-context package on an otherwise virtual machine.
//! - The `hypervisor` flag in `proc/cpuinfo`, and when the root is `/` on x86-64 the CPUID hypervisor vendor
//!   leaf 0x4000_0000 (`KVMKVMKVM`, `Microsoft Hv`, `VMwareVMware`, `XenVMMXenVMM`, …).

use crate::cpu::CpuInfo;
use crate::model::{Disk, Dmi, Platform, PlatformKind, SignatureKind};
use crate::reader::Ctx;

/// The SMBIOS chassis asset tag of every Azure VM.
pub const AZURE_CHASSIS_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// Placeholder strings firmware writes into unused DMI fields.
const DMI_PLACEHOLDERS: &[&str] = &[
    "not specified",
    "not applicable",
    "to be filled by o.e.m.",
    "default string",
    "no asset tag",
    "not available",
    "none",
];

pub(crate) fn read_dmi(ctx: &mut Ctx<'_>) -> Dmi {
    let base = "sys/class/dmi/id";
    let mut get = |f: &str| {
        ctx.attr(&format!("platform.dmi.{f}"), format!("{base}/{f}"))
            .filter(|v| !DMI_PLACEHOLDERS.contains(&v.to_ascii_lowercase().as_str()))
    };
    Dmi {
        sys_vendor: get("sys_vendor"),
        product_name: get("product_name"),
        product_version: get("product_version"),
        product_serial: get("product_serial"),
        product_uuid: get("product_uuid"),
        board_vendor: get("board_vendor"),
        board_name: get("board_name"),
        board_asset_tag: get("board_asset_tag"),
        bios_vendor: get("bios_vendor"),
        bios_version: get("bios_version"),
        chassis_vendor: get("chassis_vendor"),
        chassis_asset_tag: get("chassis_asset_tag"),
    }
}

/// Everything the decision uses; gathered from files, decided by [`decide`] (pure).
#[derive(Debug, Default, Clone)]
pub(crate) struct Signals {
    pub dmi: Dmi,
    pub sys_hypervisor_type: Option<String>,
    pub sys_hypervisor_uuid: Option<String>,
    pub cpu_hypervisor_flag: bool,
    pub cpuid_vendor: Option<String>,
    /// (evidence text) for strong OpenNebula markers.
    pub one_context: Vec<String>,
    pub one_vmid: Option<String>,
    pub one_context_package: bool,
}

pub(crate) fn gather(ctx: &mut Ctx<'_>, dmi: Dmi, cpuinfo: Option<&CpuInfo>, disks: &[Disk]) -> Signals {
    let mut s = Signals {
        dmi,
        sys_hypervisor_type: ctx.attr("platform.hypervisor", "sys/hypervisor/type"),
        sys_hypervisor_uuid: ctx.attr("platform.hypervisor", "sys/hypervisor/uuid"),
        cpu_hypervisor_flag: cpuinfo.is_some_and(|c| c.has_flag("hypervisor")),
        cpuid_vendor: if ctx.is_live() { cpuid_hypervisor_vendor() } else { None },
        ..Signals::default()
    };
    for rel in ["run/one-context/one_env", "var/run/one-context/one_env"] {
        if let Some(env) = ctx.file("platform.instance_id", rel) {
            s.one_context.push(format!("OpenNebula context file {rel}"));
            // Only VMID is read: the file also carries user-supplied context values that may be secrets.
            s.one_vmid = env.lines().find_map(|l| {
                let l = l.trim().trim_start_matches("export ").trim();
                let v = l.strip_prefix("VMID=")?.trim_matches(|c| c == '"' || c == '\'');
                (!v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.to_string())
            });
            break;
        }
    }
    for d in disks {
        let labelled = d
            .signature
            .iter()
            .chain(d.partitions.iter().filter_map(|p| p.signature.as_ref()))
            .any(|sig| sig.kind == SignatureKind::Iso9660 && sig.label.as_deref() == Some("CONTEXT"));
        if labelled {
            s.one_context
                .push(format!("ISO 9660 volume labelled CONTEXT on {}", d.name));
        }
    }
    if ctx.exists("dev/disk/by-label/CONTEXT") {
        s.one_context.push("dev/disk/by-label/CONTEXT exists".to_string());
    }
    s.one_context_package = ctx.exists("etc/one-context.d");
    s
}

fn eq(v: &Option<String>, want: &str) -> bool {
    v.as_deref().is_some_and(|v| v.eq_ignore_ascii_case(want))
}

fn has(v: &Option<String>, needle: &str) -> bool {
    v.as_deref()
        .is_some_and(|v| v.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()))
}

fn show(name: &str, v: &Option<String>) -> String {
    format!("dmi {name} {:?}", v.as_deref().unwrap_or(""))
}

/// Hypervisor named by DMI strings, with the evidence.
fn dmi_hypervisor(dmi: &Dmi) -> Option<(&'static str, String)> {
    let table: &[(&str, &Option<String>, &str, &str)] = &[
        ("sys_vendor", &dmi.sys_vendor, "vmware", "vmware"),
        ("product_name", &dmi.product_name, "vmware", "vmware"),
        ("product_serial", &dmi.product_serial, "vmware-", "vmware"),
        ("sys_vendor", &dmi.sys_vendor, "qemu", "kvm"),
        ("product_name", &dmi.product_name, "kvm", "kvm"),
        ("product_name", &dmi.product_name, "rhev", "kvm"),
        ("product_name", &dmi.product_name, "openstack", "kvm"),
        ("product_name", &dmi.product_name, "google compute engine", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "digitalocean", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "hetzner", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "alibaba cloud", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "nutanix", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "ovirt", "kvm"),
        ("bios_vendor", &dmi.bios_vendor, "seabios", "kvm"),
        ("chassis_vendor", &dmi.chassis_vendor, "qemu", "kvm"),
        ("sys_vendor", &dmi.sys_vendor, "xen", "xen"),
        ("product_name", &dmi.product_name, "hvm domu", "xen"),
        ("sys_vendor", &dmi.sys_vendor, "innotek", "virtualbox"),
        ("product_name", &dmi.product_name, "virtualbox", "virtualbox"),
        ("sys_vendor", &dmi.sys_vendor, "parallels", "parallels"),
        ("sys_vendor", &dmi.sys_vendor, "bhyve", "bhyve"),
        ("chassis_vendor", &dmi.chassis_vendor, "bochs", "bochs"),
    ];
    for (name, value, needle, hv) in table {
        if has(value, needle) {
            return Some((hv, show(name, value)));
        }
    }
    if eq(&dmi.sys_vendor, "Microsoft Corporation") && eq(&dmi.product_name, "Virtual Machine") {
        return Some((
            "hyperv",
            format!(
                "{} and {}",
                show("sys_vendor", &dmi.sys_vendor),
                show("product_name", &dmi.product_name)
            ),
        ));
    }
    None
}

fn cpuid_name(vendor: &str) -> Option<&'static str> {
    Some(match vendor.trim_end_matches('\0').trim() {
        "KVMKVMKVM" => "kvm",
        "Microsoft Hv" => "hyperv",
        "VMwareVMware" => "vmware",
        "XenVMMXenVMM" => "xen",
        "TCGTCGTCGTCG" => "qemu",
        "bhyve bhyve" => "bhyve",
        "lrpepyh  vr" => "parallels",
        "VBoxVBoxVBox" => "virtualbox",
        "ACRNACRNACRN" => "acrn",
        _ => return None,
    })
}

/// AWS instance types look like `i3en.2xlarge`, `m7g.medium`, `u-6tb1.metal`.
fn looks_like_instance_type(s: &str) -> bool {
    let Some((family, size)) = s.split_once('.') else {
        return false;
    };
    s.len() <= 32
        && family.starts_with(|c: char| c.is_ascii_lowercase())
        && family
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !size.is_empty()
        && size
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn looks_like_instance_id(s: &str) -> bool {
    s.strip_prefix("i-")
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Decide the platform from the gathered signals.
pub(crate) fn decide(s: Signals) -> Platform {
    let dmi = &s.dmi;
    let mut p = Platform::default();
    let mut ev: Vec<String> = Vec::new();
    let generic_hv = s
        .cpuid_vendor
        .as_deref()
        .and_then(|v| cpuid_name(v).map(|n| (n, format!("CPUID hypervisor vendor {:?}", v.trim_end_matches('\0')))))
        .or_else(|| dmi_hypervisor(dmi))
        .or_else(|| {
            s.sys_hypervisor_type.as_deref().map(|t| {
                (
                    if t == "xen" { "xen" } else { "unknown" },
                    format!("sys/hypervisor/type {t:?}"),
                )
            })
        });
    let virtual_machine = s.cpu_hypervisor_flag || generic_hv.is_some();

    // AWS Nitro (and *.metal): DMI vendor strings.
    let amazon: Vec<String> = [
        ("sys_vendor", &dmi.sys_vendor),
        ("bios_vendor", &dmi.bios_vendor),
        ("board_vendor", &dmi.board_vendor),
    ]
    .iter()
    .filter(|(_, v)| eq(v, "Amazon EC2"))
    .map(|(n, v)| show(n, v))
    .collect();
    // AWS Xen: hypervisor or system UUID starting with ec2, *.amazon firmware versions.
    let mut aws_xen: Vec<String> = Vec::new();
    if s.sys_hypervisor_uuid
        .as_deref()
        .is_some_and(|u| u.to_ascii_lowercase().starts_with("ec2"))
    {
        aws_xen.push("sys/hypervisor/uuid starts with ec2".to_string());
    }
    if dmi
        .product_uuid
        .as_deref()
        .is_some_and(|u| u.to_ascii_lowercase().starts_with("ec2"))
    {
        aws_xen.push("dmi product_uuid starts with ec2".to_string());
    }
    for (n, v) in [
        ("product_version", &dmi.product_version),
        ("bios_version", &dmi.bios_version),
    ] {
        if v.as_deref()
            .is_some_and(|v| v.to_ascii_lowercase().ends_with(".amazon"))
        {
            aws_xen.push(show(n, v));
        }
    }

    if !amazon.is_empty() {
        p.kind = PlatformKind::Aws;
        ev.extend(amazon);
        if s.cpu_hypervisor_flag || s.cpuid_vendor.is_some() {
            p.hypervisor = Some("nitro".into());
            ev.push("hypervisor present on an Amazon EC2 machine: Nitro".into());
        } else {
            ev.push("no hypervisor CPU flag: bare-metal instance".into());
        }
        if let Some(pn) = dmi.product_name.as_deref().filter(|pn| looks_like_instance_type(pn)) {
            p.instance_type = Some(pn.to_string());
            ev.push(format!("dmi product_name {pn:?} is the instance type"));
        }
        p.instance_id = dmi.board_asset_tag.clone().filter(|t| looks_like_instance_id(t));
    } else if !aws_xen.is_empty() {
        p.kind = PlatformKind::Aws;
        p.hypervisor = Some("xen".into());
        ev.extend(aws_xen);
    } else if eq(&dmi.chassis_asset_tag, AZURE_CHASSIS_ASSET_TAG) {
        p.kind = PlatformKind::Azure;
        p.hypervisor = Some("hyperv".into());
        ev.push(format!("dmi chassis_asset_tag {AZURE_CHASSIS_ASSET_TAG:?} (Azure)"));
    } else if !s.one_context.is_empty() || (s.one_context_package && virtual_machine) {
        p.kind = PlatformKind::Opennebula;
        ev.extend(s.one_context.iter().cloned());
        if s.one_context.is_empty() {
            ev.push("etc/one-context.d (one-context package) on a virtual machine".into());
        }
        p.hypervisor = generic_hv.as_ref().map(|(n, _)| n.to_string());
        p.instance_id = s.one_vmid.clone();
    } else if let Some((hv, why)) = generic_hv.as_ref().filter(|(n, _)| *n == "vmware") {
        p.kind = PlatformKind::Vmware;
        p.hypervisor = Some(hv.to_string());
        ev.push(why.clone());
        if let Some(serial) = dmi.product_serial.as_deref().filter(|s| s.starts_with("VMware-")) {
            ev.push(format!("dmi product_serial {serial:?}"));
        }
    } else if virtual_machine {
        p.kind = PlatformKind::OtherVirtual;
        p.hypervisor = generic_hv
            .as_ref()
            .map(|(n, _)| n.to_string())
            .filter(|n| *n != "unknown");
    } else {
        p.kind = PlatformKind::Baremetal;
        ev.push(if dmi.sys_vendor.is_some() {
            format!("{}; no hypervisor marker", show("sys_vendor", &dmi.sys_vendor))
        } else {
            "no DMI and no hypervisor marker".to_string()
        });
    }
    if p.kind != PlatformKind::Baremetal {
        if let Some((_, why)) = &generic_hv
            && !ev.contains(why)
        {
            ev.push(why.clone());
        }
        if s.cpu_hypervisor_flag {
            ev.push("cpuinfo flag hypervisor".into());
        }
    }
    p.evidence = ev;
    p.dmi = s.dmi;
    p
}

/// CPUID leaf 0x4000_0000: the hypervisor vendor signature (x86-64, live system only).
#[cfg(target_arch = "x86_64")]
fn cpuid_hypervisor_vendor() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    // Leaf 1 ECX bit 31 is the "hypervisor present" bit; the 0x4000_0000 leaves are only defined when it is set.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86-64 CPU and has no side effects.
    let leaf1 = unsafe { __cpuid(1) };
    if leaf1.ecx & (1 << 31) == 0 {
        return None;
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above.
    let r = unsafe { __cpuid(0x4000_0000) };
    let mut bytes = Vec::with_capacity(12);
    for reg in [r.ebx, r.ecx, r.edx] {
        bytes.extend_from_slice(&reg.to_le_bytes());
    }
    let s: String = bytes
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|&b| b as char)
        .collect();
    (!s.trim().is_empty()).then_some(s)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_hypervisor_vendor() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmi(f: impl FnOnce(&mut Dmi)) -> Signals {
        let mut d = Dmi::default();
        f(&mut d);
        Signals {
            dmi: d,
            ..Signals::default()
        }
    }

    #[test]
    fn aws_metal_has_no_hypervisor() {
        let p = decide(dmi(|d| {
            d.sys_vendor = Some("Amazon EC2".into());
            d.product_name = Some("i3.metal".into());
        }));
        assert_eq!(p.kind, PlatformKind::Aws);
        assert_eq!(p.hypervisor, None);
        assert_eq!(p.instance_type.as_deref(), Some("i3.metal"));
    }

    #[test]
    fn plain_hyperv_is_other_virtual() {
        let mut s = dmi(|d| {
            d.sys_vendor = Some("Microsoft Corporation".into());
            d.product_name = Some("Virtual Machine".into());
        });
        s.cpu_hypervisor_flag = true;
        let p = decide(s);
        assert_eq!(
            (p.kind, p.hypervisor.as_deref()),
            (PlatformKind::OtherVirtual, Some("hyperv"))
        );
    }

    #[test]
    fn cpuid_names_firecracker_style_kvm_without_dmi() {
        let s = Signals {
            cpu_hypervisor_flag: true,
            cpuid_vendor: Some("KVMKVMKVM".into()),
            ..Signals::default()
        };
        let p = decide(s);
        assert_eq!(
            (p.kind, p.hypervisor.as_deref()),
            (PlatformKind::OtherVirtual, Some("kvm"))
        );
        assert!(p.evidence.iter().any(|e| e.contains("KVMKVMKVM")), "{:?}", p.evidence);
    }

    #[test]
    fn one_context_package_alone_on_bare_metal_is_not_opennebula() {
        let s = Signals {
            one_context_package: true,
            ..Signals::default()
        };
        assert_eq!(decide(s).kind, PlatformKind::Baremetal);
    }

    #[test]
    fn instance_type_and_id_shapes() {
        assert!(looks_like_instance_type("i3en.2xlarge"));
        assert!(looks_like_instance_type("u-6tb1.metal"));
        assert!(!looks_like_instance_type("HVM domU"));
        assert!(!looks_like_instance_type("Standard PC (i440FX + PIIX, 1996)"));
        assert!(looks_like_instance_id("i-0123456789abcdef0"));
        assert!(!looks_like_instance_id("i-xyz"));
    }
}
