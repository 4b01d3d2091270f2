//! `nimbusctl audit [--since] [-o json]` and `nimbusctl audit verify [--against FILE]`: the coordinator's
//! tamper-evident audit log, listed and checked on this machine (the hashes and signatures are recomputed
//! here, not taken from the coordinator's word).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nimbus_proto::ListAuditRequest;

/// The audit log: who changed what, when, from where, with what result; `audit verify` checks it
///
/// Every state-changing call is recorded: tokens, enrollments, node accept/revoke/decommission, policy
/// apply/rollback, rollouts, releases (dry runs and reads are not).
///
/// Lists entries as a table: SEQ, TIME (UTC), WHO (uid:N for the local socket, cert:SUBJECT, oidc:SUB,
/// system:…), FROM (unix or the peer address), ACTION, TARGET, RESULT (ok, refused: why, failed: why).
/// With -o json: one entry per line, exactly as hashed (seq, at_unix_ms, who, from, action, target, result,
/// detail, prev, hash), ready for jq or a log shipper.
///
/// Each entry holds the hash of the one before it, and the coordinator signs checkpoints ("entry N has hash
/// H") that also go to its audit sink (--audit-file, syslog). `nimbusctl audit verify` recomputes all of it.
///
/// Example:
///   nimbusctl audit --since 1h
///   nimbusctl audit --since 2024-05-01T00:00:00Z -o json | jq 'select(.action == "node.revoke")'
///   nimbusctl audit verify --against /var/log/nimbus/audit.jsonl
///
/// Exit codes: 0 listed (or verified), 1 failed (or verification found a problem).
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, verbatim_doc_comment)]
pub struct AuditArgs {
    /// Only entries from this time on: a duration back from now (30m, 1h, 7d) or an RFC 3339 time
    /// (2024-05-01T12:00:00Z).
    #[arg(long, value_parser = parse_since)]
    since: Option<SystemTime>,
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
}

#[derive(clap::Subcommand, Debug)]
enum AuditCmd {
    /// Check the whole log: every entry's hash, every link to the entry before, no gaps, every checkpoint's
    /// signature, and that no signed checkpoint points past the end or at another hash
    ///
    /// Detects an entry edited in the store (named by its seq), removed or reordered entries, and forged
    /// checkpoints. Truncating the tail (deleting the newest entries, checkpoints included) can only be seen
    /// from a copy kept outside the store: give the coordinator's audit sink file with --against (the JSON
    /// lines of --audit-file, or the same lines collected by fluentd/syslog), whose signed checkpoints the log
    /// must still reach.
    ///
    /// Prints `audit log OK: …` with the counts, or every problem found, one per line.
    ///
    /// Example:
    ///   nimbusctl audit verify
    ///   nimbusctl audit verify --against /var/log/nimbus/audit.jsonl
    ///   nimbusctl -o json audit verify --public-key "$(cat audit-key.pub)"
    ///
    /// Exit codes: 0 verified, 1 a problem was found (or the log could not be read).
    #[command(verbatim_doc_comment)]
    Verify {
        /// The audit sink (JSON lines: entries and signed checkpoints) to check the log against.
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
        /// Trust only this Ed25519 public key (base64 or hex) for checkpoints, instead of the one the
        /// coordinator reports (record it once: `nimbusctl -o json audit verify | jq -r .public_key`).
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
    },
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{s:?} reaches back before 1970"));
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("{s:?} is neither a duration (30m, 1h, 7d) nor an RFC 3339 time (2024-05-01T12:00:00Z)"))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Everything the coordinator holds (entries from `since_unix_ms` on), fetched page by page.
struct Fetched {
    entries: Vec<audit::Entry>,
    checkpoints: Vec<audit::Checkpoint>,
    public_key: String,
    key_id: String,
}

async fn fetch(c: &mut crate::context::Client, since_unix_ms: u64) -> Result<Fetched> {
    let mut after_seq = 0;
    let mut entries = Vec::new();
    loop {
        let page = c
            .list_audit(ListAuditRequest {
                since_unix_ms,
                after_seq,
                limit: 0,
            })
            .await
            .map_err(crate::status_err)?
            .into_inner();
        let mut last = after_seq;
        for raw in &page.entries_json {
            let e: audit::Entry = serde_json::from_slice(raw).with_context(|| {
                format!(
                    "the coordinator sent an audit entry that is not valid JSON: {}",
                    String::from_utf8_lossy(raw)
                )
            })?;
            last = last.max(e.seq);
            entries.push(e);
        }
        // Stop at the head, on an empty page, or when a (tampered) page does not move forward.
        if page.entries_json.is_empty() || last >= page.head_seq || last <= after_seq {
            let checkpoints = page
                .checkpoints_json
                .iter()
                .map(|raw| serde_json::from_slice(raw))
                .collect::<Result<Vec<audit::Checkpoint>, _>>()
                .context("the coordinator sent an audit checkpoint that is not valid JSON")?;
            return Ok(Fetched {
                entries,
                checkpoints,
                public_key: page.public_key,
                key_id: page.key_id,
            });
        }
        after_seq = last;
    }
}

/// `nimbusctl audit …`.
pub async fn run(c: &mut crate::context::Client, args: AuditArgs, json: bool) -> Result<ExitCode> {
    match args.cmd {
        None => {
            let f = fetch(c, args.since.map_or(0, unix_ms)).await?;
            if json {
                let mut out = String::new();
                for e in &f.entries {
                    out.push_str(&serde_json::to_string(e)?);
                    out.push('\n');
                }
                crate::emit(&out)?;
            } else {
                crate::emit(&table(&f.entries))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(AuditCmd::Verify { against, public_key }) => {
            let f = fetch(c, 0).await?;
            let key_text = public_key.as_deref().unwrap_or(&f.public_key);
            let key = audit::decode_public_key(key_text)?;
            let key_id = audit::key_id(&key);
            if public_key.is_none() && key_id != f.key_id {
                bail!(
                    "the coordinator reports key id {} for public key {}, which hashes to {key_id}; \
                     is this a nimbus coordinator of the same version?",
                    f.key_id,
                    f.public_key
                );
            }
            let mut checkpoints = f.checkpoints.clone();
            let outside = match &against {
                Some(path) => audit::read_sink_checkpoints(path)?,
                None => Vec::new(),
            };
            checkpoints.extend(outside.iter().cloned());
            let report = audit::verify(&f.entries, &checkpoints, &[(key_id.clone(), key)]);
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["messages"] = report.problems.iter().map(ToString::to_string).collect();
                v["public_key"] = key_text.into();
                v["key_id"] = key_id.into();
                v["sink_checkpoints"] = outside.len().into();
                crate::print_json(&v)?;
            } else {
                let mut text = format!("{report}\n");
                if report.ok {
                    match &against {
                        Some(p) => {
                            text += &format!(
                                "checked against {} ({} signed checkpoints)\n",
                                p.display(),
                                outside.len()
                            )
                        }
                        None => {
                            text += "not checked against the audit sink: a truncated tail is only detectable with \
                                     --against FILE\n"
                        }
                    }
                }
                crate::emit(&text)?;
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn time(at_unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_unix_ms)).to_string()
}

fn table(entries: &[audit::Entry]) -> String {
    if entries.is_empty() {
        return "no audit entries (in that time range)\n".into();
    }
    let mut t = crate::table(&["SEQ", "TIME", "WHO", "FROM", "ACTION", "TARGET", "RESULT"]);
    for e in entries {
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        t.add_row(vec![
            e.seq.to_string(),
            time(e.at_unix_ms),
            e.who.to_string(),
            dash(&e.from),
            e.action.clone(),
            dash(&e.target),
            e.result.to_string(),
        ]);
    }
    format!("{t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_rfc3339() {
        let t = parse_since("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(unix_ms(t), 1_714_564_800_000);
        let back = parse_since("1h").unwrap();
        let d = SystemTime::now().duration_since(back).unwrap();
        assert!(d >= Duration::from_secs(3599) && d < Duration::from_secs(3700), "{d:?}");
        let err = parse_since("yesterday").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn the_table_shows_who_from_action_target_and_result() {
        let e = audit::Entry::seal(
            7,
            1_714_564_800_000,
            audit::GENESIS_PREV,
            audit::Record::new(audit::Principal::uid(0), "token.revoke", "token/abc")
                .with_from("unix")
                .with_result(audit::Outcome::refused("no such token")),
        );
        let text = table(&[e]);
        for want in [
            "SEQ",
            "7",
            "2024-05-01T12:00:00Z",
            "uid:0",
            "unix",
            "token.revoke",
            "token/abc",
            "refused: no such token",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        assert!(table(&[]).contains("no audit entries"));
    }
}
