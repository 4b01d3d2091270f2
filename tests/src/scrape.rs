//! Helpers of the metrics and log tests: `GET` a daemon's HTTP endpoint from inside its namespace, read
//! samples out of the Prometheus text format, and the metric names a document, a rule file or a dashboard
//! mentions.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::Netns;

/// The coordinator's default metrics address (in its namespace).
pub const COORDINATOR_METRICS: &str = "127.0.0.1:9464";
/// The agent's default metrics address (in its namespace).
pub const AGENT_METRICS: &str = "127.0.0.1:9465";

/// `GET path` at `addr` from inside `ns` (HTTP/1.0): the whole response, status line included.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<String, String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    ns.run_in(move || http_get_here(&addr, &path))
        .map_err(|e| e.to_string())?
}

/// [`http_get`] from this thread's namespace.
pub fn http_get_here(addr: &str, path: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// `GET /metrics` at `addr` in `ns`: the body of a 200 response.
pub fn scrape(ns: &Netns, addr: &str) -> Result<String, String> {
    let text = http_get(ns, addr, "/metrics")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text}"))?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(format!("not a 200 response: {head}"));
    }
    Ok(body.to_string())
}

/// The value of the sample `name` whose labels include every `key="value"` of `labels` (all of them when
/// `labels` is empty: the first such sample).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        value.parse().ok()
    })
}

/// The sum of every sample `name` (all label sets).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Metric names as queried: counters with `_total`, gauges and histograms by their family name.
pub fn family_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            })
        })
        .collect()
}

/// The metric names documented in docs/metrics.md: the backticked `nimbus_*` name that starts a table row.
pub fn documented_names(docs: &str) -> BTreeSet<String> {
    docs.lines()
        .filter_map(|l| l.strip_prefix("| `nimbus_"))
        .filter_map(|l| l.split_once('`').map(|(n, _)| format!("nimbus_{n}")))
        .collect()
}

/// Every `nimbus_*` metric name in a PromQL expression, with histogram suffixes (`_bucket`, `_sum`,
/// `_count`) taken off.
pub fn expr_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("nimbus_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            let name = &expr[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// `args` with the value after `--log-format` set to `json` and `--log-level debug` added (the harness starts
/// the daemons with text logs; clap refuses a flag given twice).
pub fn json_debug_logs(mut args: Vec<String>) -> Vec<String> {
    if let Some(i) = args.iter().position(|a| a == "--log-format")
        && let Some(v) = args.get_mut(i + 1)
    {
        *v = "json".into();
    } else {
        args.extend(["--log-format".into(), "json".into()]);
    }
    args.extend(["--log-level".into(), "debug".into()]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE nimbus_nodes gauge\nnimbus_nodes{state=\"active\"} 2\nnimbus_nodes{state=\"revoked\"} 1\n\
                        # TYPE nimbus_heartbeats counter\nnimbus_heartbeats_total 7\n";

    #[test]
    fn samples_are_found_by_name_and_labels() {
        assert_eq!(sample(TEXT, "nimbus_nodes", &[("state", "revoked")]), Some(1.0));
        assert_eq!(sample(TEXT, "nimbus_heartbeats_total", &[]), Some(7.0));
        assert_eq!(sample(TEXT, "nimbus_nodes", &[("state", "pending")]), None);
        assert_eq!(sum(TEXT, "nimbus_nodes"), 3.0);
        assert_eq!(
            family_names(TEXT).into_iter().collect::<Vec<_>>(),
            vec!["nimbus_heartbeats_total", "nimbus_nodes"]
        );
    }

    #[test]
    fn expression_names_drop_histogram_suffixes() {
        let names = expr_names(
            "histogram_quantile(0.99, sum by (le) (rate(nimbus_rpc_duration_seconds_bucket[5m]))) > 1 and \
             up{job=\"x\"} and nimbus_nodes{state=\"active\"}",
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["nimbus_nodes", "nimbus_rpc_duration_seconds"]
        );
    }

    #[test]
    fn log_flags_are_replaced_not_repeated() {
        let args = json_debug_logs(vec!["--log-format".into(), "text".into(), "--x".into()]);
        assert_eq!(args, ["--log-format", "json", "--x", "--log-level", "debug"]);
    }
}
