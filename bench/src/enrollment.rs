//! Enrollment rate with real TLS and key handling: the agent's own `agent::enroll::enroll` (new TLS connection
//! pinned to the CA, Enroll RPC, fresh X25519 key per agent) against an in-process coordinator, at several
//! concurrencies. References measured in the same run: TLS handshakes alone to the same listener
//! (`pki::tls_connect`), and `State::enroll` called directly (the store transaction, no network).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::report::Table;
use crate::sim;

pub fn run(quick: bool) -> anyhow::Result<Vec<Table>> {
    let (per_level, levels, thousand): (usize, &[usize], usize) = if quick {
        (100, &[1, 8, 32], 0)
    } else {
        (250, &[1, 4, 16, 64], 1000)
    };
    let rows = sim::in_namespace("enroll", move || measure(per_level, levels, thousand))?;
    let mut table = Table::new(
        "Enrollment rate (agent enroll code, TLS with CA pin, real coordinator)",
        &[
            "concurrent clients",
            "enrollments",
            "agents/s",
            "÷ TLS handshakes/s (same listener, same concurrency)",
            "÷ State::enroll/s (no network)",
            "p99 per enrollment ms",
        ],
    );
    for r in rows {
        table.row(r);
    }
    table.note(
        "Path measured: `agent::enroll::enroll` (token shape check, `pki::connect_pinned`: TCP + TLS 1.3 with the \
         CA pin, HTTP/2, then the Enroll RPC) against `coordinator::start` in a namespace (sled store, TUN: each \
         enrollment also adds a WireGuard peer, and writes an audit entry). One join token with enough uses for \
         everyone, as for a mass rollout: every enrollment is a compare-and-swap on that token's record, so \
         concurrent enrollments conflict and retry. Each client makes a fresh X25519 key per agent.",
    );
    table.note(
        "References (same run): TLS handshakes alone to the same listener at the same concurrency (`pki::tls_connect`, \
         connection dropped), and `State::enroll` called serially in-process. A ratio near the TLS ratio's ceiling \
         means the handshake (CPU, 2 cores shared by clients and coordinator here) limits; a low ratio to State::enroll \
         means the store transaction does.",
    );
    Ok(vec![table])
}

fn measure(per_level: usize, levels: &'static [usize], thousand: usize) -> anyhow::Result<Vec<Vec<String>>> {
    sim::raise_nofile()?;
    let rt = sim::runtime("enroll-bench", 2)?;
    rt.block_on(async move {
        let coord = sim::Coord::start().await?;
        let ctx = Arc::clone(&coord.running.ctx);
        let addr = coord.enroll_addr().to_string();
        let pin = ctx.rotations.pin();
        let total = per_level * levels.len() + thousand + per_level + 16;
        let state = Arc::clone(&ctx.state);
        let token = tokio::task::spawn_blocking(move || {
            state.create_token(
                Duration::from_secs(3600),
                u32::try_from(total).unwrap_or(u32::MAX),
                Default::default(),
                "bench".into(),
                std::time::SystemTime::now(),
            )
        })
        .await
        .context("token task")?
        .context("creating a join token")?
        .0
        .to_string_secret();

        // Reference 1: State::enroll directly, serially.
        let state = Arc::clone(&ctx.state);
        let tok = token.clone();
        let direct = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let t = Instant::now();
            for i in 0..per_level {
                let key = tunnel::keys::public_key_of(&tunnel::keys::generate_secret());
                state.enroll(
                    &tok,
                    coordinator::state::EnrollInput {
                        public_key_b64url: coordinator::context::key_id(&key),
                        hostname: format!("direct-{i}"),
                        machine_id: format!("{i:032x}"),
                        agent_version: coordinator::VERSION.into(),
                        ..Default::default()
                    },
                    std::time::SystemTime::now(),
                )?;
            }
            Ok(per_level as f64 / t.elapsed().as_secs_f64())
        })
        .await
        .context("direct enrollment task")??;

        let mut rows = Vec::new();
        let mut next = 0usize;
        let mut sizes: Vec<(usize, usize)> = levels.iter().map(|&c| (c, per_level)).collect();
        if thousand > 0 {
            sizes.push((32, thousand));
        }
        for (conc, n) in sizes {
            let hs = handshakes(&addr, pin, conc, n.min(400)).await?;
            let (rate, p99) = enrollments(&addr, pin, &token, conc, n, next).await?;
            next += n;
            rows.push(vec![
                conc.to_string(),
                if n == thousand {
                    format!("{n} (time for 1 000: {:.1} s)", n as f64 / rate)
                } else {
                    n.to_string()
                },
                format!("{rate:.0}"),
                format!("{:.2} (TLS {hs:.0}/s)", rate / hs),
                format!("{:.2} (direct {direct:.0}/s)", rate / direct),
                sim::ms(p99),
            ]);
        }
        let _dir = coord.stop().await;
        anyhow::Ok(rows)
    })
}

/// TLS handshakes per second with `conc` clients doing `n` in total.
async fn handshakes(addr: &str, pin: pki::Pin, conc: usize, n: usize) -> anyhow::Result<f64> {
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(n));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (addr, left) = (addr.to_string(), Arc::clone(&left));
        set.spawn(async move {
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |v| v.checked_sub(1),
                )
                .is_ok()
            {
                pki::tls_connect(&addr, &pin, Duration::from_secs(10)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("handshake task")?
            .context("TLS handshake to the enrollment listener")?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Enrollments per second and p99 time of one, `conc` clients doing `n` in total (host names from `first`).
async fn enrollments(
    addr: &str,
    pin: pki::Pin,
    token: &str,
    conc: usize,
    n: usize,
    first: usize,
) -> anyhow::Result<(f64, Duration)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (addr, token, next) = (addr.to_string(), token.to_string(), Arc::clone(&next));
        set.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let start = Instant::now();
                let key = tunnel::keys::public_key_of(&tunnel::keys::generate_secret());
                let facts = agent::enroll::HostFacts {
                    hostname: format!("bench-{}", first + i),
                    machine_id: format!("{:032x}", first + i),
                    node_name: String::new(),
                    agent_version: coordinator::VERSION.into(),
                    macs: Vec::new(),
                };
                agent::enroll::enroll(&addr, &pin, &token, &key, facts)
                    .await
                    .with_context(|| format!("enrollment {}", first + i))?;
                times.push(start.elapsed());
            }
            anyhow::Ok(times)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r.context("enrollment task")??);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    all.sort();
    Ok((rate, sim::percentile(&all, 99.0).unwrap_or_default()))
}
