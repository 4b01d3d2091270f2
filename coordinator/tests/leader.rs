//! Leader election and fencing (`coordinator::leader`) against a real etcd (`common::Etcd`: Debian's
//! etcd-server on loopback, killed by PID when the test ends).
//!
//! The pause and crash tests run the old leader in a child process (this test binary re-run with
//! `--exact child_leader`, configured through environment variables) so that it can be SIGSTOPped and
//! SIGKILLed like a real replica; the child is killed by PID at the end.
//!
//! Without /usr/bin/etcd each test prints a note and passes, unless NIMBUS_REQUIRE_ROOT_TESTS=1 (CI).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::Etcd;
use coordinator::leader::{LEADER_KEY, LeaderError, LeaderOptions, Leadership, Role};
use coordinator::store::{EtcdStore, Store, Txn};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TTL: Duration = Duration::from_secs(2);
/// Slack on top of the TTL for a takeover: etcd checks lease expiry every 500 ms, plus the watch and the
/// campaign round trips.
const MARGIN: Duration = Duration::from_secs(3);

fn opts(id: &str, ttl: Duration) -> LeaderOptions {
    let mut o = LeaderOptions::new(id).with_ttl(ttl);
    o.retry = Duration::from_millis(100);
    o
}

fn candidate(etcd: &Etcd, id: &str, ttl: Duration) -> (Arc<EtcdStore>, Leadership) {
    let store = Arc::new(etcd.store("nimbus/"));
    let l = Leadership::etcd(store.clone(), opts(id, ttl)).unwrap();
    (store, l)
}

/// Polls `cond` every 20 ms until it holds (returns the time it took) or `timeout` passes (panics with `what`).
fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn leader_of(role: &Role) -> Option<&str> {
    match role {
        Role::Follower { leader } => leader.as_deref(),
        Role::Leader { .. } => None,
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn two_candidates_elect_exactly_one_and_fenced_writes_follow_the_leader() {
    let Some(etcd) = Etcd::start() else { return };
    let (sa, a) = candidate(&etcd, "a", TTL);
    let (sb, b) = candidate(&etcd, "b", TTL);
    wait_for(Duration::from_secs(10), "a leader", || a.is_leader() || b.is_leader());
    // Exactly one, stably.
    for _ in 0..25 {
        assert!(a.is_leader() ^ b.is_leader(), "a: {:?}, b: {:?}", a.role(), b.role());
        std::thread::sleep(Duration::from_millis(40));
    }
    let ((ls, l), (fs, f)) = if a.is_leader() {
        ((sa, a), (sb, b))
    } else {
        ((sb, b), (sa, a))
    };
    let leader_id = l.id().to_owned();
    wait_for(Duration::from_secs(5), "the follower to know the leader", || {
        leader_of(&f.role()) == Some(leader_id.as_str())
    });

    // The leader key holds the leader's token; the leader's fenced writes go through.
    let Role::Leader { token } = l.role() else {
        panic!("not leader")
    };
    assert_eq!(ls.get(LEADER_KEY).unwrap().as_deref(), Some(token.as_bytes()));
    assert!(token.to_string().starts_with(&format!("{leader_id}/")), "{token}");
    assert!(l.commit(&*ls, Txn::new().put("work/x", "1")).unwrap());
    // A fenced write whose own compare fails is refused without losing leadership.
    assert!(
        !l.commit(&*ls, Txn::new().if_absent("work/x").put("work/x", "2"))
            .unwrap()
    );
    assert!(l.is_leader());
    // The follower may not fence at all.
    match f.commit(&*fs, Txn::new().put("work/x", "3")) {
        Err(LeaderError::NotLeader { leader, .. }) => assert_eq!(leader.as_deref(), Some(leader_id.as_str())),
        other => panic!("follower commit: {other:?}"),
    }
    assert!(f.fence().is_err());
    let old_fence = l.fence().unwrap().unwrap();

    // Drop the leader (and its connection): the other takes over within TTL + margin.
    let dropped = Instant::now();
    drop(l);
    drop(ls);
    wait_for(TTL + MARGIN, "the follower to take over", || f.is_leader());
    eprintln!("takeover after drop: {:?}", dropped.elapsed());
    assert!(f.commit(&*fs, Txn::new().put("work/x", "4")).unwrap());
    // The old term's fence no longer holds.
    assert!(!fs.txn(Txn::new().when(old_fence).put("work/x", "stale")).unwrap());
    assert_eq!(fs.get(b"work/x").unwrap().as_deref(), Some(&b"4"[..]));
}

#[test]
fn resigning_hands_over_at_once_and_subscribers_see_every_transition() {
    let Some(etcd) = Etcd::start() else { return };
    // A long TTL: the handover must not wait for the lease to expire.
    let ttl = Duration::from_secs(30);
    let (_sa, a) = candidate(&etcd, "a", ttl);
    wait_for(Duration::from_secs(10), "a to lead", || a.is_leader());
    let (_sb, b) = candidate(&etcd, "b", ttl);
    let mut rx = b.subscribe();
    wait_for(Duration::from_secs(5), "b to follow a", || {
        leader_of(&b.role()) == Some("a")
    });
    let started = Instant::now();
    block_on(a.resign());
    wait_for(Duration::from_secs(5), "b to take over after a resigned", || {
        b.is_leader()
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The watch channel saw b become leader.
    let seen = block_on(async {
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if rx.borrow_and_update().is_leader() {
                    return true;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
    });
    assert_eq!(seen, Ok(true));
    // b leads with a fence on its own token.
    let Role::Leader { token } = b.role() else { panic!() };
    assert_eq!(
        b.fence().unwrap(),
        Some(coordinator::store::Compare::Equals(
            LEADER_KEY.to_vec(),
            token.as_bytes().to_vec()
        ))
    );
    // Stepping down voluntarily revokes the lease; b campaigns again and, alone, wins a new term.
    b.step_down("test");
    wait_for(
        Duration::from_secs(5),
        "b to lead again",
        || matches!(b.role(), Role::Leader { token: t } if t != token),
    );
}

#[test]
fn invalid_options_are_refused_with_what_to_do() {
    let Some(etcd) = Etcd::start() else { return };
    let store = Arc::new(etcd.store("nimbus/"));
    let err = Leadership::etcd(store.clone(), opts("a/b", TTL))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unique id"), "{err}");
    let err = Leadership::etcd(store, opts("a", Duration::from_millis(10)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TTL"), "{err}");
}

/// The old leader, run in a child process.
struct ChildLeader {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl ChildLeader {
    fn spawn(etcd: &Etcd, id: &str) -> ChildLeader {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_leader", "--nocapture", "--test-threads=1"])
            .env("NIMBUS_LEADER_CHILD_ENDPOINT", etcd.endpoint())
            .env("NIMBUS_LEADER_CHILD_ID", id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("child: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildLeader { child, stdin, lines }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// The next line starting with `prefix` within `timeout`.
    fn expect(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no {prefix:?} line from the child within {timeout:?}: {e}"),
            }
        }
    }

    /// One line for each of `prefixes`, in whatever order the child prints them, within `timeout`.
    fn expect_all(&self, prefixes: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(i) = (0..prefixes.len()).find(|&i| found[i].is_none() && l.starts_with(prefixes[i])) {
                        found[i] = Some(l);
                    }
                }
                Err(e) => panic!("no lines {prefixes:?} from the child within {timeout:?} (got {found:?}): {e}"),
            }
        }
        found.into_iter().flatten().collect()
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for ChildLeader {
    fn drop(&mut self) {
        // It may be stopped: continue it so that SIGKILL is delivered promptly, then reap it.
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test of its own: the body of the child process of the pause/crash tests (returns at once otherwise).
/// Prints `ROLE leader <token>` / `ROLE follower <leader|->` on every change, and answers `stale` (a write
/// fenced with the fence taken when it last led) with `STALE <result>` and `commit` (a write through
/// `Leadership::commit`) with `COMMIT <result>`.
#[test]
fn child_leader() {
    let Ok(endpoint) = std::env::var("NIMBUS_LEADER_CHILD_ENDPOINT") else {
        return;
    };
    let id = std::env::var("NIMBUS_LEADER_CHILD_ID").unwrap();
    let mut o = coordinator::store::EtcdOptions::new([endpoint]).with_prefix("nimbus/");
    o.connect_timeout = Duration::from_secs(2);
    o.request_timeout = Duration::from_secs(5);
    let store = Arc::new(EtcdStore::connect(o).unwrap());
    let l = Arc::new(Leadership::etcd(store.clone(), opts(&id, TTL)).unwrap());
    let (cmd_tx, cmd_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line).is_err() {
                break;
            }
        }
        // stdin closed: the parent is gone.
        std::process::exit(0);
    });
    let mut last = None;
    let mut fence = None;
    loop {
        let role = l.role();
        if last.as_ref() != Some(&role) {
            match &role {
                Role::Leader { token } => {
                    fence = l.fence().ok().flatten();
                    println!("ROLE leader {token}");
                }
                Role::Follower { leader } => println!("ROLE follower {}", leader.as_deref().unwrap_or("-")),
            }
            last = Some(role);
        }
        while let Ok(cmd) = cmd_rx.try_recv() {
            match cmd.as_str() {
                "stale" => {
                    let t = Txn::new().when(fence.clone().unwrap()).put("work/stale", id.as_str());
                    match store.txn(t) {
                        Ok(ok) => println!("STALE {ok}"),
                        Err(e) => println!("STALE error {e}"),
                    }
                }
                "commit" => match l.commit(&*store, Txn::new().put("work/commit", id.as_str())) {
                    Ok(ok) => println!("COMMIT {ok}"),
                    Err(LeaderError::NotLeader { .. }) => println!("COMMIT notleader"),
                    Err(e) => println!("COMMIT error {e}"),
                },
                other => println!("UNKNOWN {other}"),
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_sigstopped_leader_is_replaced_and_its_writes_are_refused_after_sigcont() {
    let Some(etcd) = Etcd::start() else { return };
    let mut old = ChildLeader::spawn(&etcd, "old");
    old.expect("ROLE leader old/", Duration::from_secs(15));
    let (store, new) = candidate(&etcd, "new", TTL);
    wait_for(Duration::from_secs(5), "new to follow old", || {
        leader_of(&new.role()) == Some("old")
    });

    kill(old.pid(), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    wait_for(TTL + MARGIN, "new to take over from the stopped leader", || {
        new.is_leader()
    });
    eprintln!("takeover after SIGSTOP: {:?}", stopped.elapsed());
    assert!(new.commit(&*store, Txn::new().put("work/by", "new")).unwrap());

    // Queue the stale writes before it wakes: the first thing the old leader does is try them.
    old.send("stale");
    old.send("commit");
    kill(old.pid(), Signal::SIGCONT).unwrap();
    // The child prints its role change and the answers in whatever order its threads get there.
    let got = old.expect_all(&["STALE", "COMMIT", "ROLE follower new"], Duration::from_secs(10));
    assert_eq!(got[0], "STALE false");
    assert!(got[1] == "COMMIT false" || got[1] == "COMMIT notleader", "{}", got[1]);
    assert_eq!(store.get(b"work/stale").unwrap(), None);
    assert_eq!(store.get(b"work/commit").unwrap(), None);
    assert!(new.is_leader());
    assert!(new.commit(&*store, Txn::new().put("work/by", "new-again")).unwrap());
}

#[test]
fn a_killed_leader_process_is_replaced_within_the_ttl() {
    let Some(etcd) = Etcd::start() else { return };
    let old = ChildLeader::spawn(&etcd, "old");
    old.expect("ROLE leader old/", Duration::from_secs(15));
    let (store, new) = candidate(&etcd, "new", TTL);
    wait_for(Duration::from_secs(5), "new to follow old", || {
        leader_of(&new.role()) == Some("old")
    });
    kill(old.pid(), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    wait_for(TTL + MARGIN, "new to take over from the killed leader", || {
        new.is_leader()
    });
    eprintln!("takeover after SIGKILL: {:?}", killed.elapsed());
    assert!(new.commit(&*store, Txn::new().put("work/by", "new")).unwrap());
    drop(old);
}

/// Appends to `fencing/log/<n>` the token of the term it writes in, fenced by a raw compare on the leader key
/// (and a counter CAS, so the log is in commit order).
fn fenced_appender(
    store: Arc<EtcdStore>,
    l: Arc<Leadership>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Role::Leader { token } = l.role() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let cur = match store.get(b"fencing/ctr") {
                Ok(v) => v,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let n: u64 = cur
                .as_deref()
                .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
                .unwrap_or(0);
            let t = match &cur {
                Some(v) => Txn::new().if_equals("fencing/ctr", v.clone()),
                None => Txn::new().if_absent("fencing/ctr"),
            }
            .if_equals(LEADER_KEY, token.as_bytes())
            .put("fencing/ctr", (n + 1).to_string())
            .put(format!("fencing/log/{:08}", n + 1), token.as_bytes());
            if let Ok(true) = store.txn(t) {
                written.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

#[test]
fn etcd_restarts_never_give_two_leaders_and_a_leader_is_back_afterwards() {
    let Some(mut etcd) = Etcd::start() else { return };
    let ttl = Duration::from_secs(3);
    let (sa, a) = candidate(&etcd, "a", ttl);
    let (sb, b) = candidate(&etcd, "b", ttl);
    let (a, b) = (Arc::new(a), Arc::new(b));
    wait_for(Duration::from_secs(10), "a leader", || a.is_leader() || b.is_leader());

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers = [
        fenced_appender(sa.clone(), a.clone(), stop.clone(), written.clone()),
        fenced_appender(sb.clone(), b.clone(), stop.clone(), written.clone()),
    ];
    // Sample both roles all along: never both leaders.
    let overlaps = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (a, b, stop, overlaps) = (a.clone(), b.clone(), stop.clone(), overlaps.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if a.is_leader() && b.is_leader() {
                    overlaps.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let progress = |what: &str| {
        let before = written.load(Ordering::Relaxed);
        wait_for(ttl * 3 + MARGIN, what, || written.load(Ordering::Relaxed) >= before + 5);
    };
    progress("fenced writes before the restarts");

    // A short outage (under the TTL): the leader may keep its term.
    etcd.kill();
    std::thread::sleep(Duration::from_millis(500));
    etcd.spawn();
    progress("fenced writes after a short etcd outage");
    wait_for(ttl * 3 + MARGIN, "a leader after a short outage", || {
        a.is_leader() || b.is_leader()
    });

    // A long outage (over the TTL): both must step down while etcd is away.
    etcd.kill();
    wait_for(ttl + Duration::from_secs(1), "both replicas to step down", || {
        !a.is_leader() && !b.is_leader()
    });
    std::thread::sleep(Duration::from_secs(1));
    etcd.spawn();
    wait_for(ttl * 3 + MARGIN, "a leader after a long outage", || {
        a.is_leader() || b.is_leader()
    });
    progress("fenced writes after a long etcd outage");

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    sampler.join().unwrap();
    assert_eq!(
        overlaps.load(Ordering::Relaxed),
        0,
        "both replicas were leader at the same time"
    );

    // In commit order, the terms never interleave: once a term's writes stop, it never writes again.
    let log = sa.scan_prefix(b"fencing/log/").unwrap();
    // A transaction that failed with an error (etcd went away mid-request) may still have been applied.
    assert!(log.len() >= written.load(Ordering::Relaxed));
    let mut terms: Vec<Vec<u8>> = Vec::new();
    for (_, token) in &log {
        if terms.last() != Some(token) {
            terms.push(token.clone());
        }
    }
    let distinct: BTreeSet<_> = terms.iter().collect();
    assert_eq!(
        distinct.len(),
        terms.len(),
        "a term wrote again after another term: {terms:?}"
    );
    eprintln!(
        "{} fenced writes in {} terms: {:?}",
        log.len(),
        terms.len(),
        terms
            .iter()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect::<Vec<_>>()
    );
    // The long outage ended the first term: at least two terms wrote.
    assert!(terms.len() >= 2, "{terms:?}");
}

#[test]
fn a_refused_fenced_commit_steps_down_at_once_and_the_replica_campaigns_again() {
    let Some(etcd) = Etcd::start() else { return };
    let (store, a) = candidate(&etcd, "a", TTL);
    wait_for(Duration::from_secs(10), "a to lead", || a.is_leader());
    let mut rx = a.subscribe();
    rx.borrow_and_update();
    // Something else now holds the leader key (no lease: it stays until deleted).
    assert!(store.txn(Txn::new().put(LEADER_KEY, "intruder/1/2")).unwrap());
    assert!(!a.commit(&*store, Txn::new().put("work/x", "1")).unwrap());
    // Stepped down before commit returned, and told subscribers.
    assert_eq!(
        a.role(),
        Role::Follower {
            leader: Some("intruder".to_owned())
        }
    );
    assert!(rx.has_changed().unwrap());
    assert!(matches!(
        a.commit(&*store, Txn::new().put("work/x", "1")),
        Err(LeaderError::NotLeader { .. })
    ));
    assert_eq!(store.get(b"work/x").unwrap(), None);
    // Once the key is gone, a wins a new term.
    assert!(store.txn(Txn::new().delete(LEADER_KEY)).unwrap());
    wait_for(Duration::from_secs(5), "a to lead again", || a.is_leader());
    assert!(a.commit(&*store, Txn::new().put("work/x", "2")).unwrap());
}

#[test]
fn a_fenced_store_writes_only_for_the_leader_of_the_current_term() {
    use coordinator::leader::FencedStore;
    let Some(etcd) = Etcd::start() else { return };
    let (sa, a) = candidate(&etcd, "a", TTL);
    let a = Arc::new(a);
    wait_for(Duration::from_secs(10), "a to lead", || a.is_leader());
    let (sb, b) = candidate(&etcd, "b", TTL);
    let b = Arc::new(b);
    let fa = FencedStore::new(sa.clone(), Arc::clone(&a));
    let fb = FencedStore::new(sb.clone(), Arc::clone(&b));
    assert!(fa.txn(Txn::new().put("work/y", "a1")).unwrap(), "the leader writes");
    let e = fb.txn(Txn::new().put("work/y", "b1")).unwrap_err();
    assert!(e.to_string().contains("not the leader"), "{e}");
    // Reads pass through on any replica.
    assert_eq!(fb.get(b"work/y").unwrap().as_deref(), Some(&b"a1"[..]));

    // a hands over; b leads; a's store refuses from then on and nothing of it is applied.
    block_on(a.resign());
    wait_for(TTL + MARGIN, "b to take over", || b.is_leader());
    assert!(
        fa.txn(Txn::new().put("work/y", "a2")).is_err(),
        "an old leader's write is refused"
    );
    assert!(fb.txn(Txn::new().put("work/y", "b2")).unwrap());
    assert_eq!(sa.get(b"work/y").unwrap().as_deref(), Some(&b"b2"[..]));
}
