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

/// Nodes in display order: by zone, then name.
fn ordered(m: &LatencyMatrix) -> Vec<&str> {
    let mut nodes: Vec<&str> = m
        .pairs
        .iter()
        .flat_map(|p| [p.from_node.as_str(), p.to_node.as_str()])
        .collect();
    let zone = |n: &str| m.zones.get(n).map(String::as_str).unwrap_or("-");
    nodes.sort_by(|a, b| (zone(a), *a).cmp(&(zone(b), *b)));
    nodes.dedup();
    nodes
}

/// The newest p50 of `from → to`, if measured.
fn p50(m: &LatencyMatrix, from: &str, to: &str) -> Option<u64> {
    m.pairs
        .iter()
        .find(|p| p.from_node == from && p.to_node == to)
        .and_then(|p| p.window.as_ref())
        .filter(|w| w.samples > 0)
        .map(|w| w.p50_ns)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG heatmap of p50 RTT: green under 0.5 ms (one zone), yellow under 2 ms (zone budget), red above.
pub fn svg(m: &LatencyMatrix) -> String {
    const CELL: usize = 56;
    const LABEL: usize = 140;
    let nodes = ordered(m);
    let n = nodes.len();
    let (w, h) = (LABEL + n * CELL + 20, LABEL + n * CELL + 60);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" \
         font-size=\"11\">\n<title>p50 RTT between nodes (ms)</title>\n"
    );
    for (i, name) in nodes.iter().enumerate() {
        let zone = m.zones.get(*name).map(|z| format!(" [{z}]")).unwrap_or_default();
        let label = esc(&format!("{name}{zone}"));
        let (row_y, col_x) = (LABEL + i * CELL + CELL / 2 + 4, LABEL + i * CELL + CELL / 2);
        out += &format!(
            "<text x=\"{}\" y=\"{row_y}\" text-anchor=\"end\">{label}</text>\n",
            LABEL - 6
        );
        out += &format!(
            "<text transform=\"translate({col_x},{}) rotate(-45)\">{label}</text>\n",
            LABEL - 6
        );
    }
    for (r, from) in nodes.iter().enumerate() {
        for (c, to) in nodes.iter().enumerate() {
            let (x, y) = (LABEL + c * CELL, LABEL + r * CELL);
            let (fill, text) = match (from == to, p50(m, from, to)) {
                (true, _) => ("#eeeeee", String::new()),
                (false, None) => ("#ffffff", "-".to_string()),
                (false, Some(ns)) if ns < 500_000 => ("#7bc67b", ms(ns)),
                (false, Some(ns)) if ns < ZONE_BUDGET_NS => ("#f2d35c", ms(ns)),
                (false, Some(ns)) => ("#e06666", ms(ns)),
            };
            let (tx, ty) = (x + CELL / 2, y + CELL / 2 + 4);
            out += &format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{CELL}\" height=\"{CELL}\" fill=\"{fill}\" stroke=\"#999\"/>\
                 <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"middle\">{text}</text>\n"
            );
        }
    }
    out += &format!(
        "<text x=\"10\" y=\"{}\">green &lt; 0.5 ms (one zone) · yellow &lt; 2 ms (zone budget) · red ≥ 2 ms</text>\n</svg>\n",
        h - 20
    );
    out
}

/// The matrix as text; `color` adds green/red against [`ZONE_BUDGET_NS`].
pub fn matrix(m: &LatencyMatrix, color: bool) -> String {
    let zone = |n: &str| m.zones.get(n).map(String::as_str).unwrap_or("-");
    let nodes = ordered(m);
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
        let source = m.zone_sources.get(*from).map(|s| format!(" ({s})")).unwrap_or_default();
        let mut row = vec![Cell::new(from), Cell::new(format!("{}{source}", zone(from)))];
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
    let mut out = format!("{t}\n");
    for f in &m.findings {
        out += &format!("! {f}\n");
    }
    out
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
                samples: 10 - lost,
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
            findings: vec!["zone-b is 5 ms from zone-a".into()],
            ..Default::default()
        };
        let out = matrix(&m, false);
        let a_line = out.lines().position(|l| l.trim_start().starts_with("a1")).unwrap();
        let b_line = out.lines().position(|l| l.trim_start().starts_with("b1")).unwrap();
        assert!(a_line < b_line, "zone-a first:\n{out}");
        assert!(out.contains("5.00/5.10 30%"), "{out}");
        assert!(out.contains("5.00/5.20"), "{out}");
        assert!(out.contains("! zone-b is 5 ms from zone-a"), "{out}");
        assert!(matrix(&LatencyMatrix::default(), false).contains("no latency measured yet"));
        let svg = svg(&m);
        assert!(
            svg.starts_with("<svg") && svg.contains("5.00") && svg.contains("#e06666"),
            "{svg}"
        );
        assert!(svg.contains("a1 [zone-a]"), "{svg}");
    }
}
