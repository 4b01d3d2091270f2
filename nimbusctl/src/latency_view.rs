//! `nimbusctl latency`: the measured matrix, nodes grouped by zone, each cell
//! `p50/p99` in ms, colored against the 2 ms availability-zone budget.

use std::collections::BTreeMap;

use comfy_table::{Cell, Color, Table, presets};
use nimbus_proto::LatencyMatrix;

/// Sites closer than this (RTT) can form one availability zone.
pub const ZONE_BUDGET_NS: u64 = 2_000_000;

fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

/// The matrix as text; `color` adds green/red against [`ZONE_BUDGET_NS`].
pub fn matrix(m: &LatencyMatrix, color: bool) -> String {
    let mut nodes: Vec<&str> = m
        .pairs
        .iter()
        .flat_map(|p| [p.from_node.as_str(), p.to_node.as_str()])
        .collect();
    let zone = |n: &str| m.zones.get(n).map(String::as_str).unwrap_or("-");
    nodes.sort_by(|a, b| (zone(a), *a).cmp(&(zone(b), *b)));
    nodes.dedup();
    if nodes.is_empty() {
        return "no latency measured yet (agents report a window every probe window, 30 s by default)\n".into();
    }
    let cells: BTreeMap<(&str, &str), (u64, u64, u32, u32)> = m
        .pairs
        .iter()
        .filter_map(|p| {
            let w = p.window.as_ref()?;
            Some((
                (p.from_node.as_str(), p.to_node.as_str()),
                (w.p50_ns, w.p99_ns, w.lost, w.sent),
            ))
        })
        .collect();
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    let mut header = vec![Cell::new("FROM \\ TO (p50/p99 ms)"), Cell::new("ZONE")];
    header.extend(nodes.iter().map(Cell::new));
    t.set_header(header);
    for from in &nodes {
        let mut row = vec![Cell::new(from), Cell::new(zone(from))];
        for to in &nodes {
            let cell = match cells.get(&(*from, *to)) {
                _ if from == to => Cell::new("·"),
                None => Cell::new("-"),
                Some((_, _, lost, sent)) if *sent > 0 && lost == sent => {
                    let c = Cell::new("lost");
                    if color { c.fg(Color::Red) } else { c }
                }
                Some((p50, p99, lost, sent)) => {
                    let loss = if *lost > 0 && *sent > 0 {
                        format!(" {:.0}%", 100.0 * f64::from(*lost) / f64::from(*sent))
                    } else {
                        String::new()
                    };
                    let c = Cell::new(format!("{}/{}{loss}", ms(*p50), ms(*p99)));
                    match (color, *p99 < ZONE_BUDGET_NS) {
                        (false, _) => c,
                        (true, true) => c.fg(Color::Green),
                        (true, false) => c.fg(Color::Red),
                    }
                }
            };
            row.push(cell);
        }
        t.add_row(row);
    }
    format!("{t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::{LatencyPair, LatencyWindow};

    #[test]
    fn groups_by_zone_and_shows_p50_p99_and_loss() {
        let pair = |a: &str, b: &str, p50, p99, lost| LatencyPair {
            from_node: a.into(),
            to_node: b.into(),
            window: Some(LatencyWindow {
                p50_ns: p50,
                p99_ns: p99,
                lost,
                sent: 10,
                ..Default::default()
            }),
        };
        let m = LatencyMatrix {
            pairs: vec![
                pair("b1", "a1", 5_000_000, 5_200_000, 0),
                pair("a1", "b1", 5_000_000, 5_100_000, 3),
            ],
            zones: [
                ("a1".to_string(), "zone-a".to_string()),
                ("b1".to_string(), "zone-b".to_string()),
            ]
            .into(),
        };
        let out = matrix(&m, false);
        let a_line = out.lines().position(|l| l.trim_start().starts_with("a1")).unwrap();
        let b_line = out.lines().position(|l| l.trim_start().starts_with("b1")).unwrap();
        assert!(a_line < b_line, "zone-a first:\n{out}");
        assert!(out.contains("5.00/5.10 30%"), "{out}");
        assert!(out.contains("5.00/5.20"), "{out}");
        assert!(matrix(&LatencyMatrix::default(), false).contains("no latency measured yet"));
    }
}
