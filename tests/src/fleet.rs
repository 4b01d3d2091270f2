//! The polynimbus fixture: a coordinator and N agents on a [`Lab`] (one bridge) or on a [`DelayLab`] (zones
//! behind the userspace delay router, [`Layout::Zones`]), driven through `nimbusctl`.
//!
//! Shared by the end-to-end tests (temp work dir, everything removed on drop, logs dumped on panic) and by
//! `nimbus-lab` (fixed work dir, detached processes, state journaled to a file after every step).
//!
//! # Coordinator replicas
//! On a bridge fleet whose coordinator keeps its state in etcd ([`FleetOptions::coordinator_args`] or
//! [`Fleet::extend_coordinator_args`] with `--etcd-endpoints`, `--kek-file` ...), [`Fleet::start_replica`]`(n)`
//! (n ≥ 2) adds host `coord-n` at underlay `.200+n` ([`REPLICA_HOST_BASE`]) and runs another coordinator there
//! with its own data dir, admin socket and addresses and the same extra arguments. Replica 1 is the fleet's
//! coordinator: every `*_on(n, ...)` / `replica*(n)` helper accepts `n = 1` and then means it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::delay::{DelayLab, DelayLabBuilder};
use crate::env::{Binaries, bin_dir};
use crate::error::{HarnessError, Result};
use crate::netns::Netns;
use crate::process::{COMMAND_TIMEOUT, Process, ProcessBuilder, describe, run_with_timeout};
use crate::state::{LabState, ProcessRecord, STATE_FORMAT, now_unix};
use crate::topology::{Lab, LabBuilder, TEST_SUBNET, host_addr};
use crate::wait::{Attempt, DEFAULT_POLL, patience, poll_until};
use crate::work::Work;

/// Host role of the coordinator.
pub const COORD_ROLE: &str = "coord";
/// Enrollment (TCP/TLS) port on the underlay.
pub const ENROLL_PORT: u16 = 7443;
/// WireGuard (UDP) port on the underlay.
pub const WG_PORT: u16 = 51820;
/// Fleet gRPC port, on the coordinator's overlay address only.
pub const FLEET_PORT: u16 = 7000;
/// The coordinator's overlay address (first host of the default overlay 100.96.0.0/16).
pub const OVERLAY_COORDINATOR: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// TUN device name used on every host.
pub const TUN_NAME: &str = "nimbus0";
/// Underlay host number of the coordinator (`.1`).
pub const COORD_HOST: u8 = 1;
/// Agent `i` gets underlay host number `AGENT_HOST_BASE + i` (`.11`, `.12`, ...).
pub const AGENT_HOST_BASE: u8 = 10;
/// Most agents a fleet can have (the /24 ends at .254).
pub const MAX_AGENTS: usize = 200;
/// Coordinator replica `n` (n ≥ 2) gets underlay host number `REPLICA_HOST_BASE + n` (`.202`, `.203`, ...).
pub const REPLICA_HOST_BASE: u8 = 200;
/// Most coordinator replicas a fleet can have (`.254` is the last host address).
pub const MAX_REPLICAS: usize = 54;
/// The file in an agent's state dir that holds its enrolled identity.
pub const IDENTITY_FILE: &str = "identity.json";
/// Environment variable: set to `1` to keep a test fleet's temp work dir (logs, data) after it is dropped.
pub const KEEP_ENV: &str = "NIMBUS_E2E_KEEP";

/// Node name of agent `i` (1-based): `agent-i`.
pub fn agent_name(i: usize) -> String {
    format!("agent-{i}")
}

/// Host role (and process name) of coordinator replica `n`: `coord` for 1 (the fleet's coordinator),
/// `coord-n` for the others.
pub fn replica_role(n: usize) -> String {
    if n == 1 {
        COORD_ROLE.to_string()
    } else {
        format!("{COORD_ROLE}-{n}")
    }
}

/// `nimbusctl -o json replicas` through replica `n`, as a message on error.
pub fn replica_view(fleet: &Fleet, n: usize) -> std::result::Result<Vec<Value>, String> {
    fleet
        .try_replicas_on(n)
        .map_err(|e| format!("replicas through {}: {e}", replica_role(n)))
}

/// The ids of the entries of a replica view marked leader.
pub fn replica_leaders(view: &[Value]) -> Vec<String> {
    view.iter()
        .filter(|r| r["leader"] == true)
        .map(|r| str_field(r, "id").to_string())
        .collect()
}

/// The entry of a replica view for the replica that answered (`this`).
pub fn replica_this(view: &[Value]) -> Option<&Value> {
    view.iter().find(|r| r["this"] == true)
}

/// Replicas 1 and 2 both list both (same ids), each marks itself `this`, and all agree on exactly one
/// leader. Returns (replica number → id, the leader's replica number), or what is not so yet.
pub fn settled_replica_pair(fleet: &Fleet) -> std::result::Result<(BTreeMap<usize, String>, usize), String> {
    let mut ids = BTreeMap::new();
    let mut seen_leaders = BTreeSet::new();
    let mut sets = Vec::new();
    for n in [1, 2] {
        let v = replica_view(fleet, n)?;
        let me = replica_this(&v).ok_or_else(|| format!("{} marks no entry as `this`: {v:?}", replica_role(n)))?;
        ids.insert(n, str_field(me, "id").to_string());
        let l = replica_leaders(&v);
        if l.len() != 1 {
            return Err(format!("{} sees {} leaders ({l:?}): {v:?}", replica_role(n), l.len()));
        }
        seen_leaders.extend(l);
        sets.push(
            v.iter()
                .map(|r| str_field(r, "id").to_string())
                .collect::<BTreeSet<_>>(),
        );
    }
    if sets.iter().any(|s| s.len() != 2) || sets[0] != sets[1] {
        return Err(format!("the replicas do not both list the same two replicas: {sets:?}"));
    }
    if seen_leaders.len() != 1 {
        return Err(format!("the replicas disagree on the leader: {seen_leaders:?}"));
    }
    let leader_id = seen_leaders.into_iter().next().unwrap_or_default();
    let leader = ids
        .iter()
        .find(|(_, id)| **id == leader_id)
        .map(|(n, _)| *n)
        .ok_or_else(|| format!("the leader {leader_id} is neither replica: {ids:?}"))?;
    Ok((ids, leader))
}

/// Whether `ip` is in the default overlay 100.96.0.0/16.
pub fn in_overlay(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && o[1] == 96
}

/// The `overlay_ip` of a node object, accepting `"100.96.0.2"` or `"100.96.0.2/32"`.
pub fn overlay_ip(node: &Value) -> std::result::Result<Ipv4Addr, String> {
    let text = node
        .get("overlay_ip")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("node without overlay_ip: {node}"))?;
    let addr = text.split('/').next().unwrap_or(text);
    addr.parse()
        .map_err(|e| format!("overlay_ip {text:?} is not an IPv4 address: {e}"))
}

/// A string field of a JSON object, or "" (for messages and comparisons).
pub fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A join token as returned by `nimbusctl -o json token create`.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinToken {
    /// The secret token string passed to `nimbus-agent --token`.
    pub token: String,
    /// Its id, for `token list` / `token revoke`.
    pub id: String,
    /// `sha256:HEX` pin of the coordinator's CA, for `--ca-pin`.
    pub ca_pin: String,
    /// The full JSON answer.
    pub json: Value,
}

impl JoinToken {
    /// A copy with another token string (e.g. a malformed one).
    pub fn with_token(&self, token: &str) -> JoinToken {
        JoinToken {
            token: token.to_string(),
            ..self.clone()
        }
    }

    /// A copy with another CA pin (e.g. a wrong one).
    pub fn with_pin(&self, pin: &str) -> JoinToken {
        JoinToken {
            ca_pin: pin.to_string(),
            ..self.clone()
        }
    }
}

/// The network a [`Fleet`] runs on.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Layout {
    /// Every host on one bridge, no added delay.
    #[default]
    Bridge,
    /// Hosts in zones behind the userspace delay router ([`crate::delay`]): every packet between two hosts
    /// crosses it and is held for the configured delay of its zone pair.
    Zones(ZoneLayout),
}

/// Zones of a [`Layout::Zones`] fleet. Hosts keep the fleet's addresses (coordinator `.1`, agent `i` `.10+i`).
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneLayout {
    /// Zone of each agent, in agent order (`agent_zones[0]` is agent-1's); its length is the agent count.
    pub agent_zones: Vec<String>,
    /// Zone of the coordinator's host.
    pub coordinator_zone: String,
    /// Symmetric one-way delays between zones (`(a, a, d)`: inside zone `a`); unlisted pairs have none.
    pub delays: Vec<(String, String, Duration)>,
    /// The router binary (default: `nimbus-delay-router` in the fleet's binary directory).
    pub router_binary: Option<PathBuf>,
}

impl ZoneLayout {
    /// `agents` agents dealt round-robin over `zones` (agent-1 to the first zone, agent-2 to the second, ...),
    /// the coordinator in the first zone, no delays yet.
    pub fn round_robin<S: AsRef<str>>(zones: &[S], agents: usize) -> ZoneLayout {
        let names: Vec<String> = zones.iter().map(|z| z.as_ref().to_string()).collect();
        ZoneLayout {
            agent_zones: (0..agents)
                .filter_map(|i| names.get(i % names.len().max(1)).cloned())
                .collect(),
            coordinator_zone: names.first().cloned().unwrap_or_default(),
            delays: Vec::new(),
            router_binary: None,
        }
    }

    /// Adds a symmetric one-way delay between zones `a` and `b` (`a == b`: inside the zone).
    pub fn delay(mut self, a: &str, b: &str, one_way: Duration) -> ZoneLayout {
        self.delays.push((a.to_string(), b.to_string(), one_way));
        self
    }

    /// Zone names in first-use order: the coordinator's, the agents', then those only delays name (zones may
    /// be empty, e.g. more zones than agents).
    pub fn zones(&self) -> Vec<String> {
        let mut out: Vec<String> = vec![self.coordinator_zone.clone()];
        let named = self.delays.iter().flat_map(|(a, b, _)| [a, b]);
        for z in self.agent_zones.iter().chain(named) {
            if !out.contains(z) {
                out.push(z.clone());
            }
        }
        out
    }
}

/// The topology under a fleet.
#[derive(Debug)]
enum Net {
    Bridge(Lab),
    Zones(Box<DelayLab>),
}

impl Net {
    fn ns(&self, role: &str) -> Result<&Netns> {
        match self {
            Net::Bridge(lab) => Ok(lab.try_host(role)?.ns()),
            Net::Zones(lab) => Ok(lab.try_host(role)?.ns()),
        }
    }

    fn prefix(&self) -> &str {
        match self {
            Net::Bridge(lab) => lab.prefix(),
            Net::Zones(lab) => lab.prefix(),
        }
    }

    fn namespaces(&self) -> Vec<String> {
        match self {
            Net::Bridge(lab) => lab.namespaces(),
            Net::Zones(lab) => lab.namespaces(),
        }
    }

    /// The delay router, which a state file must stop too.
    fn router(&self) -> Option<ProcessRecord> {
        match self {
            Net::Bridge(_) => None,
            Net::Zones(lab) => lab.router_process().ok().map(Process::record),
        }
    }

    fn teardown(&mut self) -> Result<()> {
        match self {
            Net::Bridge(lab) => lab.teardown(),
            Net::Zones(lab) => lab.teardown(),
        }
    }

    fn persist(self) -> Result<()> {
        match self {
            Net::Bridge(lab) => {
                lab.persist();
                Ok(())
            }
            Net::Zones(lab) => lab.detach().map(|_| ()),
        }
    }
}

/// How to build a [`Fleet`].
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Agent hosts to create (`agent-1..=agents`); agents themselves start with [`Fleet::start_agent`].
    pub agents: usize,
    /// The underlay /24 (default [`TEST_SUBNET`]).
    pub subnet: Ipv4Addr,
    /// Namespace prefix (default unique per test, `nbe2e-PID-N`).
    pub prefix: Option<String>,
    /// Work dir for data, state, logs and the admin socket (default: a fresh temp dir, removed on drop).
    pub work_dir: Option<PathBuf>,
    /// Where the daemon binaries are (default [`bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// Spawn daemons in their own session so [`Fleet::detach`] can leave them running (the lab).
    pub detached: bool,
    /// Journal the state here after every step, so `teardown_from_state` can undo a half-finished `up`.
    pub state_file: Option<PathBuf>,
    /// Start the coordinator (and wait for its admin socket) while building.
    pub start_coordinator: bool,
    /// Extra coordinator arguments.
    pub coordinator_args: Vec<String>,
    /// Bridge (default) or zones behind the delay router.
    pub layout: Layout,
}

impl FleetOptions {
    /// Defaults for a test: `agents` hosts on 192.0.2.0/24, unique names, temp dir, coordinator started.
    pub fn test(agents: usize) -> FleetOptions {
        FleetOptions {
            agents,
            subnet: TEST_SUBNET,
            prefix: None,
            work_dir: None,
            bin_dir: None,
            detached: false,
            state_file: None,
            start_coordinator: true,
            coordinator_args: Vec::new(),
            layout: Layout::Bridge,
        }
    }

    /// [`FleetOptions::test`] on zones: as many agents as `zones.agent_zones` names.
    pub fn zones(zones: ZoneLayout) -> FleetOptions {
        FleetOptions {
            layout: Layout::Zones(zones.clone()),
            ..FleetOptions::test(zones.agent_zones.len())
        }
    }
}

#[derive(Debug, Clone)]
struct LogEntry {
    name: String,
    path: PathBuf,
    command_line: String,
}

/// A coordinator and agents in a lab. Dropping it stops every process (agents first), deletes the
/// topology, and — if the thread is panicking — prints every process log first.
#[derive(Debug)]
pub struct Fleet {
    opts: FleetOptions,
    bins: Binaries,
    // Declared before `lab` and `work`, but Drop stops processes explicitly anyway.
    coordinator: Option<Process>,
    /// Coordinator replicas 2.. ([`Fleet::start_replica`]); replica 1 is `coordinator`.
    replicas: BTreeMap<usize, Process>,
    agents: BTreeMap<usize, Process>,
    lab: Option<Net>,
    work: Option<Work>,
    logs: Vec<LogEntry>,
    id_seed: u64,
    /// Environment given to every daemon started from now on (e.g. a fake `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
}

/// A topology planned but not built yet.
enum Planned {
    Bridge(LabBuilder),
    Zones(Box<DelayLabBuilder>),
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Fleet {
    /// Topology with `n_agents` agent hosts, coordinator started and answering `nimbusctl`.
    ///
    /// # Panics
    /// On any setup error (message says what to do, e.g. build the binaries).
    pub fn start(n_agents: usize) -> Fleet {
        Fleet::new(FleetOptions::test(n_agents)).unwrap_or_else(|e| panic!("starting the fleet: {e}"))
    }

    /// Topology only (no coordinator), for tests that run the coordinator themselves.
    ///
    /// # Panics
    /// On any setup error.
    pub fn setup(n_agents: usize) -> Fleet {
        let opts = FleetOptions {
            start_coordinator: false,
            ..FleetOptions::test(n_agents)
        };
        Fleet::new(opts).unwrap_or_else(|e| panic!("setting up the lab: {e}"))
    }

    /// [`Fleet::start`], then a token with `n_agents` uses, all agents started and connected.
    ///
    /// # Panics
    /// On any error or when the agents do not connect within the patience.
    pub fn with_connected_agents(n_agents: usize) -> (Fleet, JoinToken) {
        let mut fleet = Fleet::start(n_agents);
        let uses = u32::try_from(n_agents.max(1)).unwrap_or(u32::MAX);
        let token = fleet.create_token("1h", uses);
        for i in 1..=n_agents {
            fleet.start_agent(i, Some(&token), &[]);
        }
        let names: Vec<String> = (1..=n_agents).map(agent_name).collect();
        fleet.wait_connected(&names);
        (fleet, token)
    }

    /// Builds the fleet as `opts` says.
    pub fn new(opts: FleetOptions) -> Result<Fleet> {
        if opts.agents > MAX_AGENTS {
            return Err(HarnessError::Misuse(format!(
                "{} agents requested: at most {MAX_AGENTS} fit the /24 underlay",
                opts.agents
            )));
        }
        let bins = Binaries::in_dir(&opts.bin_dir.clone().unwrap_or_else(bin_dir))?;
        let work = Work::create(opts.work_dir.as_ref(), "nimbus-e2e-")?;
        let planned = match &opts.layout {
            Layout::Bridge => Planned::Bridge(Fleet::bridge_builder(&opts)),
            Layout::Zones(zones) => Planned::Zones(Box::new(Fleet::zones_builder(&opts, zones, &bins, work.path())?)),
        };
        let mut fleet = Fleet {
            bins,
            coordinator: None,
            replicas: BTreeMap::new(),
            agents: BTreeMap::new(),
            lab: None,
            work: Some(work),
            logs: Vec::new(),
            id_seed: 0,
            env: Vec::new(),
            opts,
        };
        let planned_namespaces = match &planned {
            Planned::Bridge(b) => b.planned_namespaces(),
            Planned::Zones(b) => b.planned_namespaces(),
        };
        // Never adopt (and later delete) namespaces that someone else created under a fixed prefix.
        if fleet.opts.prefix.is_some()
            && let Some(taken) = planned_namespaces.iter().find(|n| Netns::exists(n))
        {
            return Err(HarnessError::NamespaceExists(taken.clone()));
        }
        // Journal the planned namespaces before creating any, so an interrupted `up` can be undone.
        if fleet.opts.state_file.is_some() && fleet.opts.prefix.is_some() {
            let mut state = fleet.state();
            state.namespaces = planned_namespaces;
            fleet.save_state(&state)?;
        }
        let net = match planned {
            Planned::Bridge(b) => Net::Bridge(b.build()?),
            Planned::Zones(b) => Net::Zones(Box::new(b.build()?)),
        };
        fleet.id_seed = fnv1a(net.prefix());
        fleet.lab = Some(net);
        fleet.journal()?;
        if fleet.opts.start_coordinator {
            fleet.try_start_coordinator()?;
        }
        Ok(fleet)
    }

    fn bridge_builder(opts: &FleetOptions) -> LabBuilder {
        let mut builder: LabBuilder = Lab::builder().host(COORD_ROLE, host_addr(opts.subnet, COORD_HOST));
        if let Some(prefix) = &opts.prefix {
            builder = builder.prefix(prefix.clone());
        }
        for i in 1..=opts.agents {
            builder = builder.host(agent_name(i), Fleet::agent_ip_in(opts.subnet, i));
        }
        builder
    }

    fn zones_builder(opts: &FleetOptions, zones: &ZoneLayout, bins: &Binaries, work: &Path) -> Result<DelayLabBuilder> {
        if zones.agent_zones.len() != opts.agents {
            return Err(HarnessError::Misuse(format!(
                "the zone layout places {} agents but the fleet has {}: give every agent a zone",
                zones.agent_zones.len(),
                opts.agents
            )));
        }
        let router = match &zones.router_binary {
            Some(p) => p.clone(),
            None => {
                let dir = bins.coordinator.parent().map_or_else(bin_dir, Path::to_path_buf);
                crate::env::binary_in(&dir, crate::delay::ROUTER_BIN)?
            }
        };
        let mut builder = DelayLab::builder()
            .router_binary(router)
            .work_dir(work)
            .detached(opts.detached)
            .host(&zones.coordinator_zone, COORD_ROLE, host_addr(opts.subnet, COORD_HOST));
        if let Some(prefix) = &opts.prefix {
            builder = builder.prefix(prefix.clone());
        }
        for zone in zones.zones() {
            builder = builder.zone(&zone, 0);
        }
        for (i, zone) in zones.agent_zones.iter().enumerate() {
            builder = builder.host(zone, agent_name(i + 1), Fleet::agent_ip_in(opts.subnet, i + 1));
        }
        for (a, b, d) in &zones.delays {
            builder = builder.delay(a, b, *d);
        }
        Ok(builder)
    }

    fn agent_ip_in(subnet: Ipv4Addr, i: usize) -> Ipv4Addr {
        let host = u8::try_from(usize::from(AGENT_HOST_BASE) + i).unwrap_or(u8::MAX);
        host_addr(subnet, host)
    }

    // ----- layout -------------------------------------------------------------------------------

    fn net(&self) -> &Net {
        match &self.lab {
            Some(net) => net,
            None => panic!("the fleet was detached"),
        }
    }

    /// The bridge topology.
    ///
    /// # Panics
    /// If the fleet runs on zones (use [`Fleet::delay_lab`]) or was detached.
    pub fn lab(&self) -> &Lab {
        match &self.lab {
            Some(Net::Bridge(lab)) => lab,
            Some(Net::Zones(_)) => panic!("this fleet runs on zones: use Fleet::delay_lab()"),
            None => panic!("the fleet was detached"),
        }
    }

    /// The bridge topology, mutable (e.g. to add an intruder host).
    ///
    /// # Panics
    /// If the fleet runs on zones or was detached.
    pub fn lab_mut(&mut self) -> &mut Lab {
        match &mut self.lab {
            Some(Net::Bridge(lab)) => lab,
            Some(Net::Zones(_)) => panic!("this fleet runs on zones: use Fleet::delay_lab_mut()"),
            None => panic!("the fleet was detached"),
        }
    }

    /// The zones topology (delays, loss, the router).
    ///
    /// # Panics
    /// If the fleet runs on a bridge or was detached.
    pub fn delay_lab(&self) -> &DelayLab {
        match &self.lab {
            Some(Net::Zones(lab)) => lab,
            Some(Net::Bridge(_)) => panic!("this fleet runs on a bridge: build it with Layout::Zones"),
            None => panic!("the fleet was detached"),
        }
    }

    /// The zones topology, mutable (e.g. [`DelayLab::apply`] new delays).
    ///
    /// # Panics
    /// If the fleet runs on a bridge or was detached.
    pub fn delay_lab_mut(&mut self) -> &mut DelayLab {
        match &mut self.lab {
            Some(Net::Zones(lab)) => lab,
            Some(Net::Bridge(_)) => panic!("this fleet runs on a bridge: build it with Layout::Zones"),
            None => panic!("the fleet was detached"),
        }
    }

    /// Agent `i`'s zone on a zones layout (`None` on a bridge).
    pub fn agent_zone(&self, i: usize) -> Option<&str> {
        match &self.opts.layout {
            Layout::Zones(z) => z.agent_zones.get(i.checked_sub(1)?).map(String::as_str),
            Layout::Bridge => None,
        }
    }

    /// The binaries in use.
    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// The work dir (data, state, logs, admin socket).
    pub fn work_dir(&self) -> &Path {
        self.work.as_ref().map_or(Path::new("/nonexistent"), Work::path)
    }

    /// Directory of all process logs.
    pub fn log_dir(&self) -> PathBuf {
        self.work_dir().join("logs")
    }

    /// The coordinator's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.work_dir().join("admin.sock")
    }

    /// The coordinator's data dir.
    pub fn coordinator_data_dir(&self) -> PathBuf {
        self.work_dir().join("coordinator").join("data")
    }

    /// The coordinator's underlay address (`.1`).
    pub fn coordinator_ip(&self) -> Ipv4Addr {
        host_addr(self.opts.subnet, COORD_HOST)
    }

    /// The enrollment endpoint agents dial (`COORD_IP:7443`).
    pub fn enroll_endpoint(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.coordinator_ip(), ENROLL_PORT))
    }

    /// The Fleet service endpoint inside the tunnel (`100.96.0.1:7000`).
    pub fn fleet_endpoint(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(OVERLAY_COORDINATOR, FLEET_PORT))
    }

    /// The coordinator's namespace.
    pub fn coordinator_ns(&self) -> &Netns {
        self.net().ns(COORD_ROLE).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Agent `i`'s namespace.
    pub fn agent_ns(&self, i: usize) -> &Netns {
        self.net().ns(&agent_name(i)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Agent `i`'s underlay address (`.10+i`).
    pub fn agent_ip(&self, i: usize) -> Ipv4Addr {
        Fleet::agent_ip_in(self.opts.subnet, i)
    }

    /// Agent `i`'s state dir.
    pub fn agent_state_dir(&self, i: usize) -> PathBuf {
        self.work_dir().join(agent_name(i)).join("state")
    }

    /// Agent `i`'s machine id (32 hex chars, distinct per agent and per lab).
    pub fn agent_machine_id(&self, i: usize) -> String {
        format!("{:016x}{:016x}", self.id_seed, i)
    }

    fn next_log(&mut self, name: &str) -> PathBuf {
        let runs = self.logs.iter().filter(|l| l.name == name).count();
        let file = if runs == 0 {
            format!("{name}.log")
        } else {
            format!("{name}.{}.log", runs + 1)
        };
        self.log_dir().join(file)
    }

    /// Set `key=value` in the environment of every daemon started after this call.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    fn spawn(&mut self, name: &str, ns: &str, program: &Path, args: &[String]) -> Result<Process> {
        let log = self.next_log(name);
        let mut builder = ProcessBuilder::new(name, program, &log)
            .netns_name(ns)
            .args(args)
            .detached(self.opts.detached);
        // The daemons read NIMBUS_* (config file, data dir, ...) from the environment: a developer's
        // shell settings must not leak into the fleet. Flags alone define it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("NIMBUS_") {
                builder = builder.env_remove(key);
            }
        }
        for (k, v) in &self.env {
            builder = builder.env(k, v);
        }
        let process = builder.spawn()?;
        self.logs.push(LogEntry {
            name: name.to_string(),
            path: log,
            command_line: process.command_line().to_string(),
        });
        Ok(process)
    }

    // ----- coordinator --------------------------------------------------------------------------

    /// The coordinator's command-line arguments for data dir `data_dir` (ports, advertise address, admin
    /// socket, TUN name, text logs, plus [`FleetOptions::coordinator_args`]).
    pub fn coordinator_args(&self, data_dir: &Path) -> Vec<String> {
        self.coordinator_args_at(self.coordinator_ip(), data_dir, &self.admin_socket())
    }

    fn coordinator_args_at(&self, ip: Ipv4Addr, data_dir: &Path, admin_socket: &Path) -> Vec<String> {
        let mut args = vec![
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--enroll-listen".into(),
            format!("{ip}:{ENROLL_PORT}"),
            "--wg-listen".into(),
            format!("{ip}:{WG_PORT}"),
            "--advertise-address".into(),
            ip.to_string(),
            "--admin-socket".into(),
            admin_socket.display().to_string(),
            "--tun-name".into(),
            TUN_NAME.into(),
            "--log-format".into(),
            "text".into(),
        ];
        args.extend(self.opts.coordinator_args.iter().cloned());
        args
    }

    /// Appends `args` to [`FleetOptions::coordinator_args`] for every coordinator (and replica) started from
    /// now on, e.g. the etcd endpoint of an etcd started after the lab, or a KEK file made in the work dir.
    pub fn extend_coordinator_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.opts.coordinator_args.extend(args.into_iter().map(Into::into));
    }

    /// Writes a new key-encryption key to `WORK/kek` with `nimbus-coordinator kek generate` (mode 0600) and
    /// returns its path; an existing one is kept. Give it to every replica with `--kek-file`.
    pub fn generate_kek(&self) -> Result<PathBuf> {
        let path = self.work_dir().join("kek");
        if path.exists() {
            return Ok(path);
        }
        let mut cmd = Command::new(&self.bins.coordinator);
        cmd.args(["kek", "generate"]).arg(&path);
        crate::process::run_checked(&mut cmd)?;
        Ok(path)
    }

    /// The replica tests' store: etcd on the coordinator host (on loopback and its underlay address, so replicas
    /// on other lab hosts reach it), a fresh KEK, and every coordinator started from now on pointed at both
    /// under `prefix` (plain HTTP: a test etcd).
    pub fn with_shared_etcd(&mut self, prefix: &str) -> Result<crate::etcd::Etcd> {
        let etcd = crate::etcd::Etcd::start_reachable(
            self.coordinator_ns(),
            self.coordinator_ip(),
            &self.work_dir().join("etcd"),
        )?;
        let kek = self.generate_kek()?;
        self.extend_coordinator_args([
            "--etcd-endpoints".to_string(),
            etcd.endpoint(),
            "--etcd-plaintext".into(),
            "true".into(),
            "--etcd-prefix".into(),
            prefix.to_string(),
            "--kek-file".into(),
            kek.display().to_string(),
        ]);
        Ok(etcd)
    }

    /// A [`Command`] running the coordinator in its namespace with `args` (for startup-failure tests).
    pub fn coordinator_command(&self, args: &[String]) -> Command {
        let mut cmd = self.coordinator_ns().exec(&self.bins.coordinator);
        cmd.args(args);
        cmd
    }

    /// Starts (or restarts) the coordinator with the fleet's data dir and waits until `nimbusctl nodes`
    /// answers. Fails at once if it exits.
    pub fn try_start_coordinator(&mut self) -> Result<&Process> {
        if self.coordinator.as_ref().is_some_and(Process::is_running) {
            return Err(HarnessError::Misuse(
                "the coordinator is already running: kill or terminate it first".into(),
            ));
        }
        let data_dir = self.coordinator_data_dir();
        if let Some(parent) = data_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| HarnessError::io(format!("creating {}", parent.display()), e))?;
        }
        let args = self.coordinator_args(&data_dir);
        let ns = self.coordinator_ns().name().to_string();
        let program = self.bins.coordinator.clone();
        let process = self.spawn("coordinator", &ns, &program, &args)?;
        self.coordinator = Some(process);
        self.journal()?;
        poll_until(
            "the coordinator's admin socket to answer `nimbusctl nodes`",
            patience(),
            DEFAULT_POLL,
            || {
                if let Some(p) = &self.coordinator
                    && let Some(status) = p.try_status()
                {
                    return Attempt::Fail(format!(
                        "the coordinator exited ({}); its log:\n{}",
                        Process::describe_status(Some(status)),
                        tail(&p.log(), 40)
                    ));
                }
                match self.try_ctl_json(&["nodes"]) {
                    Ok(_) => Attempt::Done(()),
                    Err(e) => Attempt::Retry(e.to_string()),
                }
            },
        )?;
        self.coordinator.as_ref().ok_or_else(|| HarnessError::GaveUp {
            what: "the coordinator".into(),
            reason: "vanished".into(),
        })
    }

    /// [`Fleet::try_start_coordinator`], panicking on error.
    pub fn start_coordinator(&mut self) -> &Process {
        if let Err(e) = self.try_start_coordinator() {
            panic!("starting the coordinator: {e}");
        }
        self.coordinator()
    }

    /// The coordinator process.
    ///
    /// # Panics
    /// If it was never started.
    pub fn coordinator(&self) -> &Process {
        match &self.coordinator {
            Some(p) => p,
            None => panic!("the coordinator was not started"),
        }
    }

    // ----- coordinator replicas -----------------------------------------------------------------

    fn check_replica(&self, n: usize) -> Result<()> {
        if n == 0 || n > MAX_REPLICAS {
            return Err(HarnessError::Misuse(format!(
                "replica {n}: replicas are numbered 1..={MAX_REPLICAS} (1 is the fleet's coordinator)"
            )));
        }
        if n >= 2 && usize::from(AGENT_HOST_BASE) + self.opts.agents >= usize::from(REPLICA_HOST_BASE) + n {
            return Err(HarnessError::Misuse(format!(
                "replica {n} would take underlay .{} which agent hosts use: use fewer agents or replicas",
                usize::from(REPLICA_HOST_BASE) + n
            )));
        }
        Ok(())
    }

    /// Replica `n`'s underlay address: the coordinator's (`.1`) for 1, `.200+n` for the others.
    pub fn replica_ip(&self, n: usize) -> Ipv4Addr {
        if n <= 1 {
            return self.coordinator_ip();
        }
        let host = u8::try_from(usize::from(REPLICA_HOST_BASE) + n).unwrap_or(u8::MAX);
        host_addr(self.opts.subnet, host)
    }

    /// The enrollment endpoint of replica `n` (`IP:7443`).
    pub fn replica_enroll_endpoint(&self, n: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.replica_ip(n), ENROLL_PORT))
    }

    /// Replica `n`'s admin socket ([`Fleet::admin_socket`] for 1, `WORK/coord-n/admin.sock` for the others).
    pub fn replica_admin_socket(&self, n: usize) -> PathBuf {
        if n <= 1 {
            self.admin_socket()
        } else {
            self.work_dir().join(replica_role(n)).join("admin.sock")
        }
    }

    /// Replica `n`'s data dir ([`Fleet::coordinator_data_dir`] for 1, `WORK/coord-n/data` for the others).
    pub fn replica_data_dir(&self, n: usize) -> PathBuf {
        if n <= 1 {
            self.coordinator_data_dir()
        } else {
            self.work_dir().join(replica_role(n)).join("data")
        }
    }

    /// Replica `n`'s namespace.
    ///
    /// # Panics
    /// If its host was never added (replica never started).
    pub fn replica_ns(&self, n: usize) -> &Netns {
        self.net().ns(&replica_role(n)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Replica `n`'s command-line arguments ([`Fleet::coordinator_args`] with its own addresses, data dir and
    /// admin socket; the same [`FleetOptions::coordinator_args`]).
    pub fn replica_args(&self, n: usize) -> Vec<String> {
        self.coordinator_args_at(
            self.replica_ip(n),
            &self.replica_data_dir(n),
            &self.replica_admin_socket(n),
        )
    }

    /// Starts (or restarts, on the same data dir) coordinator replica `n` and waits until its admin socket
    /// answers `nimbusctl nodes`; fails at once if it exits. For n ≥ 2 the host `coord-n` is added to the
    /// bridge at the first start (bridge layout only). `n = 1` is [`Fleet::try_start_coordinator`].
    pub fn try_start_replica(&mut self, n: usize) -> Result<&Process> {
        self.check_replica(n)?;
        if n == 1 {
            return self.try_start_coordinator();
        }
        let role = replica_role(n);
        if self.replicas.get(&n).is_some_and(Process::is_running) {
            return Err(HarnessError::Misuse(format!(
                "{role} is already running: kill or stop it first"
            )));
        }
        if self.net().ns(&role).is_err() {
            let ip = self.replica_ip(n);
            match &mut self.lab {
                Some(Net::Bridge(lab)) => {
                    lab.add_host(&role, ip)?;
                }
                Some(Net::Zones(_)) => {
                    return Err(HarnessError::Misuse(
                        "coordinator replicas need the bridge layout (this fleet runs on zones)".into(),
                    ));
                }
                None => return Err(HarnessError::Misuse("the fleet was detached".into())),
            }
        }
        let data_dir = self.replica_data_dir(n);
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", data_dir.display()), e))?;
        let args = self.replica_args(n);
        let ns = self.replica_ns(n).name().to_string();
        let program = self.bins.coordinator.clone();
        let process = self.spawn(&role, &ns, &program, &args)?;
        self.replicas.insert(n, process);
        self.journal()?;
        poll_until(
            &format!("{role}'s admin socket to answer `nimbusctl nodes`"),
            patience(),
            DEFAULT_POLL,
            || {
                if let Some(p) = self.replicas.get(&n)
                    && let Some(status) = p.try_status()
                {
                    return Attempt::Fail(format!(
                        "{role} exited ({}); its log:\n{}",
                        Process::describe_status(Some(status)),
                        tail(&p.log(), 40)
                    ));
                }
                match self.try_ctl_json_on(n, &["nodes"]) {
                    Ok(_) => Attempt::Done(()),
                    Err(e) => Attempt::Retry(e.to_string()),
                }
            },
        )?;
        self.replicas.get(&n).ok_or_else(|| HarnessError::GaveUp {
            what: role,
            reason: "vanished".into(),
        })
    }

    /// [`Fleet::try_start_replica`], panicking on error.
    pub fn start_replica(&mut self, n: usize) -> &Process {
        if let Err(e) = self.try_start_replica(n) {
            panic!("starting coordinator replica {n}: {e}");
        }
        self.replica(n)
    }

    /// Replica `n`'s current process (the coordinator for 1).
    ///
    /// # Panics
    /// If it was never started.
    pub fn replica(&self, n: usize) -> &Process {
        if n == 1 {
            return self.coordinator();
        }
        self.replicas
            .get(&n)
            .unwrap_or_else(|| panic!("coordinator replica {n} was not started"))
    }

    fn try_replica(&self, n: usize) -> Option<&Process> {
        if n == 1 {
            self.coordinator.as_ref()
        } else {
            self.replicas.get(&n)
        }
    }

    /// SIGKILLs replica `n` (by its PID; a stopped one too) and waits for it to exit. Its data dir stays, so
    /// [`Fleet::start_replica`] brings it back.
    ///
    /// # Panics
    /// If it was never started or does not die within 10 s.
    pub fn kill_replica(&self, n: usize) -> ExitStatus {
        let p = self.replica(n);
        let _ = p.kill9();
        p.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} (pid {}) did not die on SIGKILL", replica_role(n), p.pid()))
    }

    /// Stops replica `n`: SIGCONT (in case it was stopped), SIGTERM, SIGKILL after `grace`.
    ///
    /// # Panics
    /// If it was never started.
    pub fn stop_replica(&self, n: usize, grace: Duration) -> Option<ExitStatus> {
        let p = self.replica(n);
        let _ = p.signal(Signal::SIGCONT);
        p.stop(grace)
    }

    /// `nimbusctl -o json replicas` through replica `n`'s admin socket: one object per live replica (`id`,
    /// `overlay_ip`, `wg_endpoint`, `enroll_endpoint`, `leader`, `this`, `agents`).
    pub fn try_replicas_on(&self, n: usize) -> Result<Vec<Value>> {
        match self.try_ctl_json_on(n, &["replicas"])? {
            Value::Array(items) => Ok(items),
            other => Err(HarnessError::BadOutput {
                what: "nimbusctl -o json replicas".into(),
                reason: format!("expected a JSON array, got {other}"),
            }),
        }
    }

    /// `nimbusctl -o json nodes` through replica `n`.
    pub fn try_nodes_on(&self, n: usize) -> Result<Vec<Value>> {
        match self.try_ctl_json_on(n, &["nodes"])? {
            Value::Array(nodes) => Ok(nodes),
            other => Err(HarnessError::BadOutput {
                what: "nimbusctl -o json nodes".into(),
                reason: format!("expected a JSON array, got {other}"),
            }),
        }
    }

    /// [`Fleet::try_nodes_on`], panicking on error.
    pub fn nodes_on(&self, n: usize) -> Vec<Value> {
        self.try_nodes_on(n).unwrap_or_else(|e| panic!("{e}"))
    }

    // ----- nimbusctl ----------------------------------------------------------------------------

    /// Runs `nimbusctl --socket SOCK ARGS...` (from the root namespace), with a 30 s limit.
    pub fn try_ctl(&self, args: &[&str]) -> Result<Output> {
        self.try_ctl_on(1, args)
    }

    /// [`Fleet::try_ctl`] through replica `n`'s admin socket ([`Fleet::replica_admin_socket`]).
    pub fn try_ctl_on(&self, n: usize, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bins.ctl);
        cmd.arg("--socket").arg(self.replica_admin_socket(n)).args(args);
        run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
    }

    /// [`Fleet::try_ctl_on`]; the [`Output`] is returned whatever the exit status.
    ///
    /// # Panics
    /// If nimbusctl cannot be run or hangs.
    pub fn ctl_on(&self, n: usize, args: &[&str]) -> Output {
        self.try_ctl_on(n, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Fleet::try_ctl`]; the [`Output`] is returned whatever the exit status.
    ///
    /// # Panics
    /// If nimbusctl cannot be run or hangs.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.try_ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `nimbusctl -o json ARGS...`, requiring exit 0 and JSON on stdout.
    pub fn try_ctl_json(&self, args: &[&str]) -> Result<Value> {
        self.try_ctl_json_on(1, args)
    }

    /// [`Fleet::ctl_json`] through replica `n`, panicking on error.
    pub fn ctl_json_on(&self, n: usize, args: &[&str]) -> Value {
        self.try_ctl_json_on(n, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Fleet::try_ctl_json`] through replica `n`'s admin socket.
    pub fn try_ctl_json_on(&self, n: usize, args: &[&str]) -> Result<Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.try_ctl_on(n, &full)?;
        let what = format!("nimbusctl {}", full.join(" "));
        if !out.status.success() {
            let mut cmd = Command::new(&self.bins.ctl);
            if n != 1 {
                cmd.arg("--socket").arg(self.replica_admin_socket(n));
            }
            cmd.args(&full);
            return Err(HarnessError::CommandFailed {
                command: describe(&cmd),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::BadOutput {
            what,
            reason: format!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        })
    }

    /// [`Fleet::try_ctl_json`], panicking on error.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        self.try_ctl_json(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `nimbusctl -o json token create --ttl TTL --uses USES`.
    /// Waits (patiently) until the last rollout of disruptive changes has `phase` (e.g. `completed`) and returns
    /// `nimbusctl rollout status` as JSON plus each node's wave, in the status's order.
    pub fn wait_rollout(&self, phase: &str) -> (Value, Vec<u64>) {
        let status = crate::eventually_patiently(|| {
            let st = self.ctl_json(&["rollout", "status"]);
            if st["phase"] == phase {
                Ok(st)
            } else {
                Err(format!("{st}"))
            }
        });
        let waves = status["nodes"]
            .as_array()
            .map(|ns| ns.iter().filter_map(|n| n["wave"].as_u64()).collect())
            .unwrap_or_default();
        (status, waves)
    }

    pub fn try_create_token(&self, ttl: &str, uses: u32) -> Result<JoinToken> {
        self.try_create_labelled_token(ttl, uses, "")
    }

    /// `nimbusctl -o json token create --ttl TTL --uses USES --labels LABELS` (`k=v,k2=v2`; none when empty):
    /// nodes enrolled with it carry the labels.
    pub fn try_create_labelled_token(&self, ttl: &str, uses: u32, labels: &str) -> Result<JoinToken> {
        let uses = uses.to_string();
        let mut args = vec!["--ttl", ttl, "--uses", &uses];
        if !labels.is_empty() {
            args.extend(["--labels", labels]);
        }
        self.try_create_token_with(&args)
    }

    /// `nimbusctl token create ARGS...` (e.g. `--bind-mac`), parsed.
    pub fn try_create_token_with(&self, args: &[&str]) -> Result<JoinToken> {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let json = self.try_ctl_json(&all)?;
        let field = |key: &str| -> Result<String> {
            json.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| HarnessError::BadOutput {
                    what: "nimbusctl -o json token create".into(),
                    reason: format!("no string field {key:?} in {json}"),
                })
        };
        Ok(JoinToken {
            token: field("token")?,
            id: field("token_id")?,
            ca_pin: field("ca_pin")?,
            json: json.clone(),
        })
    }

    /// [`Fleet::try_create_token`], panicking on error.
    pub fn create_token(&self, ttl: &str, uses: u32) -> JoinToken {
        self.try_create_token(ttl, uses)
            .unwrap_or_else(|e| panic!("creating a token: {e}"))
    }

    /// [`Fleet::try_create_labelled_token`], panicking on error.
    pub fn create_labelled_token(&self, ttl: &str, uses: u32, labels: &str) -> JoinToken {
        self.try_create_labelled_token(ttl, uses, labels)
            .unwrap_or_else(|e| panic!("creating a token with labels {labels}: {e}"))
    }

    /// `nimbusctl -o json token list`.
    pub fn tokens(&self) -> Vec<Value> {
        as_array(self.ctl_json(&["token", "list"]), "token list")
    }

    /// The `token list` entry with id `id`.
    ///
    /// # Panics
    /// If there is none.
    pub fn token(&self, id: &str) -> Value {
        let tokens = self.tokens();
        tokens
            .iter()
            .find(|t| str_field(t, "id") == id)
            .cloned()
            .unwrap_or_else(|| panic!("token {id} not in `token list`: {tokens:?}"))
    }

    /// `nimbusctl -o json nodes`.
    pub fn try_nodes(&self) -> Result<Vec<Value>> {
        let value = self.try_ctl_json(&["nodes"])?;
        match value {
            Value::Array(nodes) => Ok(nodes),
            other => Err(HarnessError::BadOutput {
                what: "nimbusctl -o json nodes".into(),
                reason: format!("expected a JSON array, got {other}"),
            }),
        }
    }

    /// [`Fleet::try_nodes`], panicking on error.
    pub fn nodes(&self) -> Vec<Value> {
        self.try_nodes().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The node called `name` from `nodes`, if listed.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.nodes().into_iter().find(|n| str_field(n, "name") == name)
    }

    // ----- agents -------------------------------------------------------------------------------

    /// Agent `i`'s arguments: enrollment endpoint, token and pin (if given), state dir, node name,
    /// machine id, TUN name, text logs, then `extra`.
    pub fn agent_args(&self, i: usize, token: Option<&JoinToken>, extra: &[&str]) -> Vec<String> {
        self.agent_args_via(1, i, token, extra)
    }

    /// [`Fleet::agent_args`] enrolling through replica `n` ([`Fleet::replica_enroll_endpoint`]).
    pub fn agent_args_via(&self, n: usize, i: usize, token: Option<&JoinToken>, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--coordinator".to_string(), self.replica_enroll_endpoint(n).to_string()];
        if let Some(t) = token {
            args.extend([
                "--token".to_string(),
                t.token.clone(),
                "--ca-pin".into(),
                t.ca_pin.clone(),
            ]);
        }
        args.extend([
            "--state-dir".to_string(),
            self.agent_state_dir(i).display().to_string(),
            "--node-name".into(),
            agent_name(i),
            "--machine-id".into(),
            self.agent_machine_id(i),
            "--tun-name".into(),
            TUN_NAME.into(),
            "--log-format".into(),
            "text".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts agent `i` in its namespace (replacing, i.e. stopping, a previous process for it).
    /// Without a token it relies on the identity in its state dir.
    pub fn try_start_agent(&mut self, i: usize, token: Option<&JoinToken>, extra: &[&str]) -> Result<&Process> {
        self.spawn_agent(1, i, token, None, extra)
    }

    /// [`Fleet::try_start_agent`] enrolling through coordinator replica `n` (its `--coordinator` is replica
    /// `n`'s enrollment endpoint).
    pub fn try_start_agent_via(
        &mut self,
        n: usize,
        i: usize,
        token: Option<&JoinToken>,
        extra: &[&str],
    ) -> Result<&Process> {
        self.spawn_agent(n, i, token, None, extra)
    }

    /// [`Fleet::try_start_agent_via`], panicking on error.
    pub fn start_agent_via(&mut self, n: usize, i: usize, token: Option<&JoinToken>, extra: &[&str]) -> &Process {
        if let Err(e) = self.try_start_agent_via(n, i, token, extra) {
            panic!("starting {} through replica {n}: {e}", agent_name(i));
        }
        self.agent(i)
    }

    /// Starts agent `i` the way its systemd unit does: under `nimbus-agent launch` (the upgrade launcher) with
    /// `launch` options (e.g. `--deadline 5s`), its state dir as the launcher's, and the agent arguments of
    /// [`Fleet::agent_args`]. The [`Process`] is the launcher; its child is the running agent version.
    pub fn start_agent_launched(
        &mut self,
        i: usize,
        token: Option<&JoinToken>,
        launch: &[&str],
        extra: &[&str],
    ) -> &Process {
        self.start_agent_launched_via(1, i, token, launch, extra)
    }

    /// [`Fleet::start_agent_launched`] enrolling through coordinator replica `n` (its `--coordinator` is
    /// replica `n`'s enrollment endpoint).
    pub fn start_agent_launched_via(
        &mut self,
        n: usize,
        i: usize,
        token: Option<&JoinToken>,
        launch: &[&str],
        extra: &[&str],
    ) -> &Process {
        if let Err(e) = self.spawn_agent(n, i, token, Some(launch), extra) {
            panic!("starting {} under the launcher through replica {n}: {e}", agent_name(i));
        }
        self.agent(i)
    }

    fn spawn_agent(
        &mut self,
        via: usize,
        i: usize,
        token: Option<&JoinToken>,
        launch: Option<&[&str]>,
        extra: &[&str],
    ) -> Result<&Process> {
        if let Some(old) = self.agents.remove(&i) {
            old.stop(crate::process::STOP_GRACE);
        }
        let state_dir = self.agent_state_dir(i);
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", state_dir.display()), e))?;
        let mut args = self.agent_args_via(via, i, token, extra);
        if let Some(launch) = launch {
            let mut wrapped = vec![
                "launch".to_string(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--package-binary".into(),
                self.bins.agent.display().to_string(),
            ];
            wrapped.extend(launch.iter().map(|s| s.to_string()));
            wrapped.push("--".into());
            wrapped.append(&mut args);
            args = wrapped;
        }
        let ns = self.net().ns(&agent_name(i))?.name().to_string();
        let program = self.bins.agent.clone();
        let process = self.spawn(&agent_name(i), &ns, &program, &args)?;
        self.agents.insert(i, process);
        self.journal()?;
        self.agents.get(&i).ok_or_else(|| HarnessError::GaveUp {
            what: agent_name(i),
            reason: "vanished".into(),
        })
    }

    /// [`Fleet::try_start_agent`], panicking on error.
    pub fn start_agent(&mut self, i: usize, token: Option<&JoinToken>, extra: &[&str]) -> &Process {
        if let Err(e) = self.try_start_agent(i, token, extra) {
            panic!("starting {}: {e}", agent_name(i));
        }
        self.agent(i)
    }

    /// Agent `i`'s current process.
    ///
    /// # Panics
    /// If it was never started.
    pub fn agent(&self, i: usize) -> &Process {
        self.agents
            .get(&i)
            .unwrap_or_else(|| panic!("{} was not started", agent_name(i)))
    }

    /// Waits (patience) for agent `i` to exit, then checks the exit code and that its log mentions `needle`
    /// (case-insensitive). Returns the log.
    ///
    /// # Panics
    /// If it is still running, exits differently, or the log lacks `needle` (the message includes the log).
    pub fn expect_agent_exit(&self, i: usize, code: i32, needle: &str) -> String {
        let agent = self.agent(i);
        let status = agent.wait_exit(patience());
        let log = agent.log();
        let name = agent_name(i);
        match status.and_then(|s| s.code()) {
            Some(c) if c == code => {}
            _ => panic!(
                "{name}: expected exit code {code}, got {} after {:?}; log:\n{}",
                Process::describe_status(status),
                patience(),
                tail(&log, 60)
            ),
        }
        assert!(
            log.to_lowercase().contains(&needle.to_lowercase()),
            "{name} exited {code} but its log does not mention {needle:?}:\n{}",
            tail(&log, 60)
        );
        log
    }

    /// Whether agent `i`'s state dir holds an identity ([`IDENTITY_FILE`]).
    pub fn agent_has_identity(&self, i: usize) -> bool {
        self.agent_state_dir(i).join(IDENTITY_FILE).exists()
    }

    /// Agent `i`'s enrolled identity ([`IDENTITY_FILE`], no secrets: node id, overlay address, the coordinator
    /// replicas it knows with their public keys, ...) as JSON.
    pub fn agent_identity(&self, i: usize) -> Result<Value> {
        let path = self.agent_state_dir(i).join(IDENTITY_FILE);
        let text = std::fs::read(&path).map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|e| HarnessError::BadOutput {
            what: path.display().to_string(),
            reason: format!("not JSON: {e}"),
        })
    }

    /// Waits until every node in `names` is listed as `connected`; fails early when one of our agent
    /// processes (or the coordinator) exits. `progress` gets a status line on every poll.
    pub fn try_wait_connected(
        &self,
        names: &[String],
        timeout: Duration,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Value>> {
        self.try_wait_connected_on(1, names, timeout, progress)
    }

    /// [`Fleet::try_wait_connected`] as replica `n` sees it (its `nimbusctl nodes`); fails early when that
    /// replica or one of the named agents exits.
    pub fn try_wait_connected_on(
        &self,
        n: usize,
        names: &[String],
        timeout: Duration,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Value>> {
        let what = if n == 1 {
            format!("{} to be connected", names.join(", "))
        } else {
            format!("{} to be connected (as {} sees it)", names.join(", "), replica_role(n))
        };
        let who = if n == 1 {
            "the coordinator".to_string()
        } else {
            replica_role(n)
        };
        poll_until(&what, timeout, DEFAULT_POLL, || {
            if let Some(c) = self.try_replica(n)
                && let Some(status) = c.try_status()
            {
                return Attempt::Fail(format!("{who} exited ({})", Process::describe_status(Some(status))));
            }
            for (i, p) in &self.agents {
                if names.contains(&agent_name(*i))
                    && let Some(status) = p.try_status()
                {
                    return Attempt::Fail(format!(
                        "{} exited ({}); its log:\n{}",
                        agent_name(*i),
                        Process::describe_status(Some(status)),
                        tail(&p.log(), 40)
                    ));
                }
            }
            let nodes = match self.try_nodes_on(n) {
                Ok(nodes) => nodes,
                Err(e) => return Attempt::Retry(e.to_string()),
            };
            let mut found = Vec::new();
            let mut waiting = Vec::new();
            for name in names {
                match nodes.iter().find(|n| str_field(n, "name") == name) {
                    Some(n) if str_field(n, "state") == "connected" => found.push(n.clone()),
                    Some(n) => waiting.push(format!("{name} is {:?}", str_field(n, "state"))),
                    None => waiting.push(format!("{name} is not listed")),
                }
            }
            let line = format!(
                "{}/{} connected{}",
                found.len(),
                names.len(),
                if waiting.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", waiting.join(", "))
                }
            );
            progress(&line);
            if waiting.is_empty() {
                Attempt::Done(found)
            } else {
                Attempt::Retry(line)
            }
        })
    }

    /// Waits (patience) until every node in `names` is `connected`; returns their node objects in order.
    ///
    /// # Panics
    /// On timeout or when an agent exits, with the reason.
    pub fn wait_connected<S: AsRef<str>>(&self, names: &[S]) -> Vec<Value> {
        self.wait_connected_on(1, names)
    }

    /// [`Fleet::wait_connected`] as replica `n` sees it.
    ///
    /// # Panics
    /// On timeout or when an agent or that replica exits, with the reason.
    pub fn wait_connected_on<S: AsRef<str>>(&self, n: usize, names: &[S]) -> Vec<Value> {
        let names: Vec<String> = names.iter().map(|s| s.as_ref().to_string()).collect();
        self.try_wait_connected_on(n, &names, patience(), &mut |_| {})
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits (patience) until node `name` has state `state`.
    ///
    /// # Panics
    /// On timeout.
    pub fn wait_node_state(&self, name: &str, state: &str) -> Value {
        let what = format!("{name} to be {state}");
        poll_until(&what, patience(), DEFAULT_POLL, || match self.try_nodes() {
            Err(e) => Attempt::Retry(e.to_string()),
            Ok(nodes) => match nodes.into_iter().find(|n| str_field(n, "name") == name) {
                Some(n) if str_field(&n, "state") == state => Attempt::Done(n),
                Some(n) => Attempt::Retry(format!("{name} is {:?}", str_field(&n, "state"))),
                None => Attempt::Retry(format!("{name} is not listed")),
            },
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    // ----- logs and state -----------------------------------------------------------------------

    /// Every log written so far (including earlier runs of restarted processes), last 200 lines each.
    pub fn dump_logs(&self) -> String {
        let mut out = String::new();
        for entry in &self.logs {
            let text = std::fs::read(&entry.path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            out.push_str(&format!(
                "===== {} ({}) =====\n$ {}\n{}\n",
                entry.name,
                entry.path.display(),
                entry.command_line,
                tail(&text, 200)
            ));
        }
        out
    }

    /// A snapshot of what exists now, as a [`LabState`].
    pub fn state(&self) -> LabState {
        let mut processes: Vec<_> = self.coordinator.iter().map(Process::record).collect();
        processes.extend(self.replicas.values().map(Process::record));
        processes.extend(self.agents.values().map(Process::record));
        // The router last: stopped after the daemons whose packets it carries.
        processes.extend(self.lab.as_ref().and_then(Net::router));
        let mut data_dirs = vec![self.work_dir().join("coordinator")];
        data_dirs.extend(self.replicas.keys().map(|n| self.work_dir().join(replica_role(*n))));
        data_dirs.extend((1..=self.opts.agents).map(|i| self.work_dir().join(agent_name(i))));
        LabState {
            format: STATE_FORMAT,
            created_at_unix: now_unix(),
            work_dir: self.work_dir().to_path_buf(),
            admin_socket: self.admin_socket(),
            nimbusctl: self.bins.ctl.clone(),
            namespaces: self.lab.as_ref().map(Net::namespaces).unwrap_or_default(),
            processes,
            data_dirs,
            log_dir: self.log_dir(),
        }
    }

    fn save_state(&self, state: &LabState) -> Result<()> {
        match &self.opts.state_file {
            Some(path) => state.save(path),
            None => Ok(()),
        }
    }

    fn journal(&self) -> Result<()> {
        self.save_state(&self.state())
    }

    /// Leaves everything running (processes must have been spawned detached), writes the final state
    /// file if one is configured, and returns the state.
    pub fn detach(mut self) -> Result<LabState> {
        if !self.opts.detached {
            return Err(HarnessError::Misuse(
                "only a fleet built with `detached: true` can be detached".into(),
            ));
        }
        let state = self.state();
        self.save_state(&state)?;
        if let Some(c) = self.coordinator.take() {
            c.detach()?;
        }
        for (_, r) in std::mem::take(&mut self.replicas) {
            r.detach()?;
        }
        for (_, a) in std::mem::take(&mut self.agents) {
            a.detach()?;
        }
        if let Some(net) = self.lab.take() {
            net.persist()?;
        }
        if let Some(w) = self.work.take() {
            w.keep();
        }
        Ok(state)
    }

    /// Stops every process: SIGTERM to all agents, then to the coordinator and its replicas (each after a
    /// SIGCONT, in case a test left it stopped); SIGKILL after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for agent in self.agents.values() {
            let _ = agent.terminate();
        }
        let deadline = Instant::now() + grace;
        for agent in self.agents.values() {
            let left = deadline.saturating_duration_since(Instant::now());
            if agent.wait_exit(left).is_none() {
                agent.stop(Duration::ZERO);
            }
        }
        self.agents.clear();
        let coordinators: Vec<Process> = self
            .coordinator
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.replicas).into_values())
            .collect();
        for c in &coordinators {
            let _ = c.signal(Signal::SIGCONT);
            let _ = c.terminate();
        }
        let deadline = Instant::now() + grace;
        for c in &coordinators {
            let left = deadline.saturating_duration_since(Instant::now());
            if c.wait_exit(left).is_none() {
                c.stop(Duration::ZERO);
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Stop first, so the dump includes what the daemons logged while shutting down.
        self.stop_all(crate::process::STOP_GRACE);
        if std::thread::panicking() && !self.logs.is_empty() {
            eprintln!("\n----- process logs (test failed) -----\n{}", self.dump_logs());
        }
        if let Some(mut lab) = self.lab.take()
            && let Err(e) = lab.teardown()
        {
            eprintln!("nimbus-e2e: warning: {e}");
        }
        if let Some(w) = self.work.take() {
            w.finish();
        }
    }
}

fn as_array(value: Value, what: &str) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        other => panic!("nimbusctl -o json {what}: expected a JSON array, got {other}"),
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlay_ip_accepts_plain_and_cidr_forms() {
        assert_eq!(
            overlay_ip(&json!({"overlay_ip": "100.96.0.7"})),
            Ok(Ipv4Addr::new(100, 96, 0, 7))
        );
        assert_eq!(
            overlay_ip(&json!({"overlay_ip": "100.96.1.2/32"})),
            Ok(Ipv4Addr::new(100, 96, 1, 2))
        );
        assert!(overlay_ip(&json!({"overlay_ip": "nope"})).is_err());
        assert!(overlay_ip(&json!({})).is_err());
        assert!(in_overlay(Ipv4Addr::new(100, 96, 255, 1)));
        assert!(!in_overlay(Ipv4Addr::new(100, 97, 0, 1)));
    }

    #[test]
    fn replica_roles_name_the_coordinator_host_and_numbered_ones() {
        assert_eq!(replica_role(1), COORD_ROLE);
        assert_eq!(replica_role(2), "coord-2");
        assert_eq!(replica_role(12), "coord-12");
        let last = usize::from(REPLICA_HOST_BASE) + MAX_REPLICAS;
        assert_eq!(last, 254, "the last replica takes the last host address of the /24");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "[... 1 earlier lines ...]\nb\nc");
        assert_eq!(tail("a\nb", 5), "a\nb");
    }

    #[test]
    fn join_token_variants_keep_other_fields() {
        let t = JoinToken {
            token: "nimbus1.x".into(),
            id: "t1".into(),
            ca_pin: "sha256:aa".into(),
            json: json!({}),
        };
        assert_eq!(t.with_token("nimbus1.zz").ca_pin, "sha256:aa");
        assert_eq!(t.with_pin("sha256:bb").token, "nimbus1.x");
    }

    #[test]
    fn machine_ids_are_32_hex_chars() {
        let id = format!("{:016x}{:016x}", fnv1a("nbe2e-1-0"), 3usize);
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(fnv1a("nbe2e-1-0"), fnv1a("nbe2e-1-1"));
    }
}
