//! Rendering a node's full inventory (the `inventory_document` JSON of the
//! nimbus-inventory crate) for people. The document is read as untyped JSON so
//! that nimbusctl shows whatever a newer agent reports.

use comfy_table::{Table, presets};
use serde_json::Value;

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k)).filter(|v| !v.is_null())
}

fn text(v: &Value, path: &[&str]) -> String {
    match s(v, path) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// Sizes as operators read them: 1.7T, 100G, 512M (binary units).
pub fn size(bytes: Option<u64>) -> String {
    let Some(b) = bytes else { return "-".into() };
    let units = ["", "K", "M", "G", "T", "P"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}{}", units[i])
    } else {
        format!("{v:.1}{}", units[i])
    }
}

/// The parsed document, or `None` when the node has not reported one (or it is not JSON).
pub fn document(bytes: &[u8]) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// Lines for `nimbusctl node show`.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18} {v}\n"));
    let platform = [
        text(doc, &["platform", "kind"]),
        s(doc, &["platform", "hypervisor"])
            .map(|h| format!("({})", h.as_str().unwrap_or("?")))
            .unwrap_or_default(),
        s(doc, &["platform", "instance_type"])
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        match (s(doc, &["platform", "region"]), s(doc, &["platform", "zone"])) {
            (Some(r), Some(z)) => format!("{} / {}", r.as_str().unwrap_or("?"), z.as_str().unwrap_or("?")),
            (Some(r), None) => r.as_str().unwrap_or("?").to_string(),
            _ => String::new(),
        },
    ]
    .into_iter()
    .filter(|x| !x.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    line("platform", platform);
    line("platform-evidence", text(doc, &["platform", "evidence"]));
    line(
        "cpu",
        format!(
            "{} {} — {} sockets, {} cores, {} threads, {} NUMA nodes; flags {}",
            text(doc, &["cpu", "vendor"]),
            text(doc, &["cpu", "model"]),
            text(doc, &["cpu", "sockets"]),
            text(doc, &["cpu", "cores"]),
            text(doc, &["cpu", "threads"]),
            text(doc, &["cpu", "numa_nodes"]),
            text(doc, &["cpu", "flags"]),
        ),
    );
    let huge: Vec<String> = s(doc, &["memory", "hugepages"])
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|h| {
                    format!(
                        "{}×{}",
                        size(h.get("size_bytes").and_then(Value::as_u64)),
                        text(h, &["total"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    line(
        "memory",
        format!(
            "{} (swap {}, hugepages {})",
            size(s(doc, &["memory", "total_bytes"]).and_then(Value::as_u64)),
            size(s(doc, &["memory", "swap_total_bytes"]).and_then(Value::as_u64)),
            if huge.is_empty() { "-".into() } else { huge.join(" ") }
        ),
    );
    line(
        "os",
        format!(
            "{} (kernel {}, {})",
            text(doc, &["os", "pretty_name"]),
            text(doc, &["os", "kernel"]),
            text(doc, &["os", "arch"])
        ),
    );
    let pkgs: Vec<String> = s(doc, &["os", "packages"])
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|p| format!("{} {}", text(p, &["name"]), text(p, &["version"])))
                .collect()
        })
        .unwrap_or_default();
    line(
        "kubernetes",
        if pkgs.is_empty() {
            "kubelet, kubeadm, containerd: not installed".into()
        } else {
            pkgs.join(", ")
        },
    );

    let mut disks = Table::new();
    disks.load_preset(presets::NOTHING).set_header(vec![
        "DISK",
        "SIZE",
        "TRANSPORT",
        "CLASS",
        "MODEL",
        "SERIAL",
        "WWN",
        "ROT",
        "ROOT",
        "SIGNATURE",
        "PARTS",
        "MOUNTS",
    ]);
    for d in s(doc, &["disks"]).and_then(Value::as_array).into_iter().flatten() {
        let parts = d
            .get("partitions")
            .and_then(Value::as_array)
            .map(|p| p.len())
            .unwrap_or(0);
        let mut mounts: Vec<String> = d
            .get("mount_points")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().map(str::to_string))
            .collect();
        for p in d.get("partitions").and_then(Value::as_array).into_iter().flatten() {
            for m in p.get("mount_points").and_then(Value::as_array).into_iter().flatten() {
                if let Some(m) = m.as_str() {
                    mounts.push(format!("{}:{m}", text(p, &["name"])));
                }
            }
        }
        disks.add_row(vec![
            text(d, &["name"]),
            size(d.get("size_bytes").and_then(Value::as_u64)),
            text(d, &["transport"]),
            text(d, &["class"]),
            text(d, &["model"]),
            text(d, &["serial"]),
            text(d, &["wwn"]),
            text(d, &["rotational"]),
            if d.get("holds_root").and_then(Value::as_bool) == Some(true) {
                "yes".into()
            } else {
                "".into()
            },
            text(d, &["signature", "kind"]),
            parts.to_string(),
            mounts.join(","),
        ]);
    }
    out.push_str("disks:\n");
    out.push_str(&format!("{disks}\n"));

    let mut nics = Table::new();
    nics.load_preset(presets::NOTHING).set_header(vec![
        "NIC",
        "MAC",
        "DRIVER",
        "SPEED",
        "MTU",
        "STATE",
        "ADDRESSES",
        "DEFAULT-ROUTE",
    ]);
    for n in s(doc, &["nics"]).and_then(Value::as_array).into_iter().flatten() {
        let default = match (
            n.get("default_route_v4").and_then(Value::as_bool),
            n.get("default_route_v6").and_then(Value::as_bool),
        ) {
            (Some(true), Some(true)) => "v4,v6",
            (Some(true), _) => "v4",
            (_, Some(true)) => "v6",
            _ => "",
        };
        nics.add_row(vec![
            text(n, &["name"]),
            text(n, &["mac"]),
            if n.get("virtual").and_then(Value::as_bool) == Some(true) {
                "(virtual)".into()
            } else {
                text(n, &["driver"])
            },
            s(n, &["speed_mbps"])
                .map(|v| format!("{v}Mb/s"))
                .unwrap_or_else(|| "-".into()),
            text(n, &["mtu"]),
            text(n, &["operstate"]),
            text(n, &["addresses"]),
            default.into(),
        ]);
    }
    out.push_str("nics:\n");
    out.push_str(&format!("{nics}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_lsblk() {
        assert_eq!(size(Some(1_900_000_000_000)), "1.7T");
        assert_eq!(size(Some(100 << 30)), "100G");
        assert_eq!(size(Some(512 << 20)), "512M");
        assert_eq!(size(None), "-");
    }

    #[test]
    fn renders_disks_and_nics() {
        let doc = serde_json::json!({
            "platform": {"kind": "aws", "hypervisor": "nitro", "instance_type": "i3en.2xlarge", "region": "eu-west-1", "zone": "eu-west-1a", "evidence": ["dmi"]},
            "cpu": {"threads": 8, "flags": ["aes", "avx2"]},
            "memory": {"total_bytes": 68719476736u64, "hugepages": []},
            "os": {"pretty_name": "Ubuntu", "kernel": "6.1", "packages": [{"name": "kubelet", "version": "1.30.2"}]},
            "disks": [{"name": "nvme1n1", "size_bytes": 2500000000000u64, "transport": "nvme", "class": "local-instance-store",
                       "model": "Amazon EC2 NVMe Instance Storage", "holds_root": false, "partitions": [], "mount_points": []}],
            "nics": [{"name": "ens5", "mac": "02:00:00:00:00:01", "driver": "ena", "mtu": 9001, "operstate": "up",
                      "addresses": ["10.0.0.5/24"], "default_route_v4": true, "virtual": false}]
        });
        let out = render(&doc);
        for needle in [
            "aws (nitro) i3en.2xlarge eu-west-1 / eu-west-1a",
            "nvme1n1",
            "2.3T",
            "local-instance-store",
            "ens5",
            "10.0.0.5/24",
            "v4",
            "kubelet 1.30.2",
        ] {
            assert!(out.contains(needle), "{needle} missing in:\n{out}");
        }
    }
}
