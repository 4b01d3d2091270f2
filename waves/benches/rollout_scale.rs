//! Issue 9's rollout benchmark (not a test): a [`waves::Rollout`] of 1 000 and 10 000 simulated nodes over 50
//! pools and 3 zones, canary 1, at most 10 % of a pool and 5 % of a zone in flight, driven to completion by a
//! simulated fleet that answers every `Apply` with `NodeDone` and every `WaitHealthy` with `NodeHealthy`.
//!
//! Measured (criterion): one `handle` call that starts a wave (the `NodeHealthy` settling the previous wave, at
//! mid-rollout), one ordinary `NodeHealthy` of the same state for contrast, a whole rollout (`Rollout::new` +
//! every event from `Started` to `Completed`), and `serde_json::to_vec` of the mid-rollout state (what the
//! coordinator stores after every event). Printed once, not measured by criterion: the stored JSON size and
//! the heap the rollout holds, counted by a global allocator wrapper in this binary. A markdown table of it
//! all comes last.
//!
//! Run: `cargo bench -p nimbus-waves --bench rollout_scale -- --quick` (the defaults set here already keep
//! measurement short: 10 samples, 2 s each).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use waves::{Action, Event, Limits, Phase, Rollout, Target};

// ---- heap accounting -----------------------------------------------------------------------------------------

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (hence from `System`) with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes that `make` allocates and keeps in what it returns.
fn heap_of<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let value = make();
    let after = LIVE.load(Ordering::Relaxed);
    (value, after.saturating_sub(before))
}

// ---- the simulated fleet -------------------------------------------------------------------------------------

const POOLS: usize = 50;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const SIZES: [usize; 2] = [1_000, 10_000];

/// `nodes` disruptive targets spread evenly over the pools and zones.
fn fleet(nodes: usize) -> Vec<Target> {
    (0..nodes)
        .map(|i| Target {
            node: format!("node-{i:05}"),
            pool: format!("pool-{:02}", i % POOLS),
            zone: Some(ZONES[(i / POOLS) % ZONES.len()].to_string()),
            disruptive: true,
        })
        .collect()
}

/// Canary 1, then at most 10 % of each pool and 5 % of each zone in flight.
fn limits(nodes: usize) -> Limits {
    Limits {
        default_max_unavailable: (nodes / POOLS / 10).max(1) as u32,
        max_unavailable_per_zone: (nodes / ZONES.len() / 20).max(1) as u32,
        canary: 1,
        ..Limits::default()
    }
}

/// A rollout and the events the fleet has yet to send it: each `Apply` is answered by `NodeDone`, each
/// `WaitHealthy` by `NodeHealthy`, in order (a wave's nodes finish applying, then report healthy).
#[derive(Clone)]
struct Sim {
    rollout: Rollout,
    queue: VecDeque<Event>,
    handled: usize,
    waves: u32,
}

impl Sim {
    fn new(targets: Vec<Target>, limits: Limits) -> Sim {
        Sim {
            rollout: Rollout::new(targets, limits).expect("the bench's targets and limits are valid"),
            queue: VecDeque::from([Event::Started]),
            handled: 0,
            waves: 0,
        }
    }

    /// Handles the next event; `None` when the fleet has nothing more to say.
    fn step(&mut self) -> Option<Vec<Action>> {
        let event = self.queue.pop_front()?;
        let actions = self.rollout.handle(event);
        self.handled += 1;
        for action in &actions {
            match action {
                Action::Apply { node, .. } => self.queue.push_back(Event::NodeDone { node: node.clone() }),
                Action::WaitHealthy { node } => self.queue.push_back(Event::NodeHealthy { node: node.clone() }),
                Action::WaveStarted { .. } => self.waves += 1,
                _ => {}
            }
        }
        Some(actions)
    }

    fn run(&mut self) {
        while self.step().is_some() {}
    }

    fn next_event(&self) -> Event {
        self.queue.front().cloned().expect("the simulation has an event left")
    }
}

/// One fleet size, prepared once: the states the per-event benches start from, and what the table prints.
struct Case {
    nodes: usize,
    targets: Vec<Target>,
    limits: Limits,
    /// Just before the `NodeHealthy` that settles the middle wave and starts the next.
    before_decision: Sim,
    /// Just before an ordinary `NodeHealthy` (the previous node's) in that same wave.
    before_ordinary: Sim,
    waves: u32,
    events: usize,
    stored_bytes: usize,
    /// The same record gzip-compressed as the coordinator stores records over 64 KiB (`Compression::fast`).
    stored_gzip: usize,
    heap_bytes: usize,
}

impl Case {
    fn new(nodes: usize) -> Case {
        let targets = fleet(nodes);
        let limits = limits(nodes);

        // Pass 1: which events start a wave, and the totals.
        let mut sim = Sim::new(targets.clone(), limits.clone());
        let mut deciding = Vec::new();
        let mut stored_bytes = 0;
        while let Some(actions) = sim.step() {
            if actions.iter().any(|a| matches!(a, Action::WaveStarted { .. })) {
                deciding.push(sim.handled - 1);
            }
        }
        assert_eq!(sim.rollout.phase(), Phase::Completed, "the simulated rollout completes");
        stored_bytes = stored_bytes.max(json_len(&sim.rollout));

        // Pass 2 (the engine is deterministic): stop before the middle decision. `deciding[0]` is `Started`.
        let target = deciding[deciding.len() / 2];
        let mut sim2 = Sim::new(targets.clone(), limits.clone());
        while sim2.handled + 1 < target {
            sim2.step();
        }
        let before_ordinary = sim2.clone();
        sim2.step();
        let before_decision = sim2;
        assert!(matches!(before_ordinary.next_event(), Event::NodeHealthy { .. }));
        assert!(matches!(before_decision.next_event(), Event::NodeHealthy { .. }));
        assert!(
            before_decision
                .rollout
                .clone()
                .handle(before_decision.next_event())
                .iter()
                .any(|a| matches!(a, Action::WaveStarted { .. })),
            "the chosen event starts a wave"
        );
        stored_bytes = stored_bytes
            .max(json_len(&before_decision.rollout))
            .max(json_len(&Rollout::new(targets.clone(), limits.clone()).expect("valid")));
        let stored_gzip = gz_len(&before_decision.rollout);
        let (held, heap_bytes) = heap_of(|| before_decision.rollout.clone());
        drop(held);

        Case {
            nodes,
            targets,
            limits,
            before_decision,
            before_ordinary,
            waves: sim.waves,
            events: sim.handled,
            stored_bytes,
            stored_gzip,
            heap_bytes,
        }
    }
}

fn gz_len(rollout: &Rollout) -> usize {
    use std::io::Write as _;
    let json = serde_json::to_vec(rollout).expect("a rollout serializes");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).expect("in memory");
    gz.finish().expect("in memory").len()
}

fn json_len(rollout: &Rollout) -> usize {
    serde_json::to_vec(rollout).expect("a rollout serializes").len()
}

// ---- measurement ---------------------------------------------------------------------------------------------

/// Per-iteration times of every criterion sample, by benchmark id, for the table.
#[derive(Default)]
struct Samples(RefCell<BTreeMap<String, Vec<Duration>>>);

impl Samples {
    fn record(&self, id: &str, iters: u64, total: Duration) {
        let per_iter = total.div_f64(iters.max(1) as f64);
        self.0.borrow_mut().entry(id.to_string()).or_default().push(per_iter);
    }

    /// The median of the samples' per-iteration times.
    fn median(&self, id: &str) -> Option<Duration> {
        let mut v = self.0.borrow().get(id)?.clone();
        v.sort();
        v.get(v.len() / 2).copied()
    }
}

/// Times `handle(next event)` on a fresh clone of `sim` per iteration (cloning and dropping untimed).
fn time_handle(sim: &Sim, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut rollout = sim.rollout.clone();
        let event = sim.next_event();
        let start = Instant::now();
        let actions = rollout.handle(black_box(event));
        total += start.elapsed();
        black_box(actions);
    }
    total
}

fn bench(c: &mut Criterion, cases: &[Case], samples: &Samples) {
    let mut group = c.benchmark_group("rollout");
    for case in cases {
        let n = case.nodes;
        let id = format!("wave-decision/{n}");
        group.bench_function(BenchmarkId::new("wave-decision", n), |b| {
            b.iter_custom(|iters| {
                let t = time_handle(&case.before_decision, iters);
                samples.record(&id, iters, t);
                t
            })
        });
        let id = format!("other-event/{n}");
        group.bench_function(BenchmarkId::new("other-event", n), |b| {
            b.iter_custom(|iters| {
                let t = time_handle(&case.before_ordinary, iters);
                samples.record(&id, iters, t);
                t
            })
        });
        let id = format!("store/{n}");
        group.bench_function(BenchmarkId::new("store", n), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(serde_json::to_vec(black_box(&case.before_decision.rollout)).expect("serializes"));
                }
                let t = start.elapsed();
                samples.record(&id, iters, t);
                t
            })
        });
    }
    group.finish();

    // Whole rollouts take long enough that criterion's default linear sampling would run too many.
    let mut group = c.benchmark_group("rollout");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases {
        let n = case.nodes;
        let id = format!("whole/{n}");
        group.bench_function(BenchmarkId::new("whole", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let targets = case.targets.clone();
                    let limits = case.limits.clone();
                    let start = Instant::now();
                    let mut sim = Sim::new(targets, limits);
                    sim.run();
                    total += start.elapsed();
                    assert_eq!(sim.rollout.phase(), Phase::Completed);
                }
                samples.record(&id, iters, total);
                total
            })
        });
    }
    group.finish();
}

fn fmt_time(d: Option<Duration>) -> String {
    match d {
        None => "–".into(),
        Some(d) if d < Duration::from_micros(1) => format!("{} ns", d.as_nanos()),
        Some(d) if d < Duration::from_millis(1) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

fn fmt_bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

fn table(cases: &[Case], samples: &Samples) {
    println!();
    println!(
        "Rollout at scale: {POOLS} pools, {} zones, canary 1, ≤10 % of a pool and ≤5 % of a zone in flight; \
         times are medians of criterion's samples.",
        ZONES.len()
    );
    println!();
    println!(
        "| nodes | waves | events | per-wave decision | other event | whole rollout | store (to_vec) | stored bytes | gzip (mid-rollout) | heap |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for case in cases {
        let n = case.nodes;
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} |",
            case.waves,
            case.events,
            fmt_time(samples.median(&format!("wave-decision/{n}"))),
            fmt_time(samples.median(&format!("other-event/{n}"))),
            fmt_time(samples.median(&format!("whole/{n}"))),
            fmt_time(samples.median(&format!("store/{n}"))),
            fmt_bytes(case.stored_bytes),
            case.stored_bytes,
            fmt_bytes(case.stored_gzip),
            fmt_bytes(case.heap_bytes),
        );
    }
    println!();
    println!(
        "waves include the canary; events = every event handled (Started + NodeDone + NodeHealthy per node); \
         stored bytes = the largest serde_json form seen (at completion, mid-rollout or before the start); heap = \
         bytes a clone of the mid-rollout state allocates (counting global allocator in this bench binary)."
    );
}

fn main() {
    let cases: Vec<Case> = SIZES.iter().map(|&n| Case::new(n)).collect();
    let samples = Samples::default();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c, &cases, &samples);
    c.final_summary();
    table(&cases, &samples);
    if !std::env::args().any(|a| a == "--bench") {
        println!("(criterion test mode, e.g. `cargo test --benches`: one iteration each, not a measurement)");
    }
}
