//! Room in the kernel's IPv4 neighbour (ARP) table for a lab of many namespaces.
//!
//! The neighbour table is one table for every network namespace of the kernel: its garbage-collection
//! thresholds (`net.ipv4.neigh.default.gc_thresh1..3`, writable only in the initial namespace) bound the
//! entries of all namespaces together. A lab of N hosts on one bridge in which every host talks to every other
//! host (the latency probe mesh: each agent probes all the others) needs about N² entries; at 65 agents and a
//! coordinator that is ~4 400, far past the default hard limit of 1 024. The kernel then refuses new neighbours
//! (`neighbour: arp_cache: neighbor table overflow!` in the kernel log, `ENOBUFS` on send), which also cuts the
//! agents' WireGuard path to the coordinator: every fleet stream drops and no probe window is ever reported.
//! Real hosts each have their own table (64 probe peers need 64 entries), so this is a lab artefact; the bench
//! raises the thresholds for the run and puts the old values back afterwards.

use std::path::PathBuf;

use anyhow::Context;

const DIR: &str = "/proc/sys/net/ipv4/neigh/default";

/// Raised neighbour-table thresholds; the previous values come back on drop.
#[derive(Debug)]
pub struct NeighbourRoom {
    /// (sysctl file, value before, value we wrote), in the order they were written.
    changed: Vec<(PathBuf, u64, u64)>,
}

impl NeighbourRoom {
    /// Makes room for at least `entries` neighbours without garbage collection (`gc_thresh2`) and twice that as
    /// the hard limit (`gc_thresh3`). Thresholds already higher are left alone.
    pub fn reserve(entries: u64) -> anyhow::Result<NeighbourRoom> {
        let mut room = NeighbourRoom { changed: Vec::new() };
        // The hard limit first, so the soft one never exceeds it in between.
        for (name, want) in [("gc_thresh3", entries.saturating_mul(2)), ("gc_thresh2", entries)] {
            let path = PathBuf::from(DIR).join(name);
            let before = read(&path)?;
            if before >= want {
                continue;
            }
            std::fs::write(&path, want.to_string()).with_context(|| {
                format!(
                    "raising {} from {before} to {want} (the lab's hosts share the kernel's neighbour table); \
                     run as root",
                    path.display()
                )
            })?;
            room.changed.push((path, before, want));
        }
        Ok(room)
    }

    /// What was raised, for the report (`gc_thresh3 1024 → 8800`).
    pub fn describe(&self) -> String {
        if self.changed.is_empty() {
            return "neighbour table thresholds already large enough".to_string();
        }
        self.changed
            .iter()
            .map(|(p, before, want)| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("net.ipv4.neigh.default.{name} {before} → {want}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for NeighbourRoom {
    fn drop(&mut self) {
        // Soft limit first (the reverse order), and only values nobody changed since.
        for (path, before, want) in self.changed.iter().rev() {
            match read(path) {
                Ok(now) if now == *want => {
                    if let Err(e) = std::fs::write(path, before.to_string()) {
                        eprintln!(
                            "nimbus-bench: warning: could not restore {} to {before}: {e}",
                            path.display()
                        );
                    }
                }
                _ => eprintln!(
                    "nimbus-bench: {} changed during the run; left as it is (was {before})",
                    path.display()
                ),
            }
        }
    }
}

fn read(path: &PathBuf) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {:?}, not a number", path.display(), text.trim()))
}
