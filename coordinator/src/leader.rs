//! Leader election for coordinator replicas, with fencing (issue 11, "Replicas").
//!
//! Singleton work (rollout driving, planners, token and key rotation) runs only on the leader. With several
//! replicas on etcd, [`Leadership::etcd`] campaigns for the key `<prefix>leader` ([`LEADER_KEY`] in the
//! store's namespace); with sled (one coordinator) [`Leadership::single`] is always the leader, behind the
//! same API.
//!
//! # Election (etcd)
//! * **Campaign**: grant a lease (TTL [`LeaderOptions::ttl`], default 10 s) and, in one etcd transaction
//!   conditioned on the key being absent (`create_revision == 0`), put the key with that lease. The value is
//!   the [`LeaderToken`], unique per term: `<replica id>/<lease id hex>/<random nonce hex>`.
//! * **Keep**: the leader renews the lease every TTL/3 and re-reads the key. It counts its lease as valid
//!   until `send time of the last answered renewal + TTL`, which is never later than etcd's own expiry. It steps
//!   down at once — before etcd could hand the key to another replica — when that deadline passes without an
//!   answer, when etcd says the lease is gone, when the key is gone or holds another token, when a fenced write
//!   was refused ([`Leadership::commit`]), or when it resigns. After stepping down it revokes its lease (so
//!   another replica can take over immediately) and campaigns again like any follower.
//! * **Follow**: a follower reads the key, reports the leader's id, watches the key and campaigns as soon as
//!   it is deleted (lease expired or revoked); it also re-checks every TTL in case a watch event was missed.
//! * **Notify**: [`Leadership::subscribe`] gives a `tokio::sync::watch::Receiver<Role>` with every transition;
//!   each transition is logged at info. Tokens are not secrets (anyone who can read etcd sees them).
//!
//! # Fencing
//! A paused old leader (GC pause, SIGSTOP, a partitioned host) may wake up still believing it leads. So every
//! write for singleton work must be a transaction conditioned on the leader key still holding this replica's
//! token of the current term: [`Leadership::fence`] gives that [`Compare`], [`Leadership::fenced`] adds it to a
//! [`Txn`], and [`Leadership::commit`] runs a fenced transaction. Once another replica has won, the key holds
//! its token (or is absent), so the old leader's fenced transaction fails (`Ok(false)`) and nothing is applied.
//!
//! **A refused fenced transaction means: stop the singleton work and step down.** `commit` does that itself
//! when it finds the key no longer holds this term's token (the role becomes `Follower` at once); a caller that
//! runs fenced transactions itself must check [`Leadership::is_leader`] after every `Ok(false)` (a refusal may
//! also come from the caller's own compares) and call [`Leadership::step_down`] when the leader key is not
//! its token any more. The local lease deadline is also checked by `fence`, so a leader past its deadline
//! refuses to fence even before its background task noticed.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{Notify, oneshot, watch};

use crate::store::{Compare, EtcdStore, Store, StoreError, Txn};

/// The leader key, in the store's namespace (`nimbus/leader` with the default etcd prefix).
pub const LEADER_KEY: &[u8] = b"leader";
/// Default lease TTL: a new leader takes over at most this long after the old one stopped renewing.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Shortest TTL accepted (etcd itself raises shorter leases to about 2 s with default timing).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest TTL accepted.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// The leader key's value for one term: `<replica id>/<lease id hex>/<nonce hex>`. Not a secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaderToken {
    value: Vec<u8>,
    lease: i64,
    revision: i64,
}

impl LeaderToken {
    /// The bytes stored in the leader key (what fenced transactions compare against).
    pub fn as_bytes(&self) -> &[u8] {
        &self.value
    }

    /// The etcd lease of this term (0 for [`Leadership::single`]).
    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The etcd revision that created the leader key for this term (0 for [`Leadership::single`]).
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

impl fmt::Debug for LeaderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaderToken({:?})", String::from_utf8_lossy(&self.value))
    }
}

impl fmt::Display for LeaderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.value))
    }
}

/// This replica's role, as published by [`Leadership::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// This replica leads the current term; fence singleton writes with `token`.
    Leader { token: LeaderToken },
    /// Another replica leads (`leader` is its id), or nobody is known to lead right now (`None`).
    Follower { leader: Option<String> },
}

impl Role {
    /// Whether this is [`Role::Leader`].
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// Election settings of one replica.
#[derive(Clone, Debug)]
pub struct LeaderOptions {
    /// This replica's id, unique among the replicas: 1–128 of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Lease TTL (whole seconds, rounded up; [`MIN_TTL`]..=[`MAX_TTL`]). Default [`DEFAULT_TTL`].
    pub ttl: Duration,
    /// Pause before retrying after an etcd error. Default 500 ms.
    pub retry: Duration,
}

impl LeaderOptions {
    /// Options for replica `id` with the defaults.
    pub fn new(id: impl Into<String>) -> Self {
        LeaderOptions {
            id: id.into(),
            ttl: DEFAULT_TTL,
            retry: Duration::from_millis(500),
        }
    }

    /// Sets the lease TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

/// Errors of leader election and fenced writes.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The replica id cannot be used in the leader token.
    #[error(
        "replica id {id:?} cannot be used for leader election ({why}); give every replica a unique id of 1-128 \
         letters, digits, '.', '_' or '-'"
    )]
    InvalidId { id: String, why: &'static str },
    /// The TTL is out of range.
    #[error("leader lease TTL {ttl:?} is out of range; use 1 s to 1 h (default 10 s)")]
    InvalidTtl { ttl: Duration },
    /// Singleton work was attempted on a replica that does not lead.
    #[error(
        "replica {id} is not the leader (leader: {}); singleton work runs only on the leader, skip it here",
        leader.as_deref().unwrap_or("none known yet")
    )]
    NotLeader { id: String, leader: Option<String> },
    /// The etcd store is being dropped.
    #[error("the etcd store is shutting down, so leader election cannot run; reconnect to etcd and retry")]
    StoreClosed,
    /// The store failed (a fenced write's outcome is then unknown, as with any store error).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// State shared by the [`Leadership`] handle and its background task.
struct Shared {
    id: String,
    /// Always the leader (sled, one coordinator).
    single: bool,
    role: watch::Sender<Role>,
    /// While leading: the local lease deadline. `None` when not leading.
    valid_until: Mutex<Option<Instant>>,
    /// Asks the task to step down (a fenced write found the key taken, or [`Leadership::step_down`]).
    step_down: Notify,
}

impl Shared {
    fn deadline(&self) -> Option<Instant> {
        *self.valid_until.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_deadline(&self, d: Option<Instant>) {
        *self.valid_until.lock().unwrap_or_else(PoisonError::into_inner) = d;
    }

    fn became_leader(&self, token: LeaderToken, valid_until: Instant, ttl: Duration) {
        self.set_deadline(Some(valid_until));
        tracing::info!(
            replica = %self.id,
            lease = %format_args!("{:x}", token.lease),
            revision = token.revision,
            ttl_s = ttl.as_secs(),
            "became leader"
        );
        self.role.send_replace(Role::Leader { token });
    }

    /// Leaves the leader role (if held) and publishes `Follower { leader }`.
    fn stepped_down(&self, reason: &str, leader: Option<String>) {
        self.set_deadline(None);
        let was_leader = self.role.borrow().is_leader();
        if was_leader {
            tracing::info!(replica = %self.id, reason, new_leader = ?leader, "stepped down from leader");
        }
        self.follow(leader);
    }

    /// Publishes `Follower { leader }` when it changed.
    fn follow(&self, leader: Option<String>) {
        let new = Role::Follower { leader };
        let changed = self.role.send_if_modified(|r| {
            if *r == new {
                false
            } else {
                *r = new.clone();
                true
            }
        });
        if changed && let Role::Follower { leader: Some(l) } = &new {
            tracing::info!(replica = %self.id, leader = %l, "following leader");
        }
    }
}

/// This replica's part in leader election: its [`Role`], and fencing for singleton writes.
///
/// Dropping it stops campaigning and revokes the lease in the background (if the store is still alive);
/// [`Leadership::resign`] does the same and waits for it.
pub struct Leadership {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    request_timeout: Duration,
    // Keeps the store's runtime (which runs the election task) alive.
    _store: Option<Arc<EtcdStore>>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("id", &self.shared.id)
            .field("single", &self.shared.single)
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Leadership {
    /// Leadership of a single coordinator (sled): always the leader; fencing adds no compare.
    pub fn single(id: impl Into<String>) -> Leadership {
        let id = id.into();
        let token = LeaderToken {
            value: format!("single/{id}").into_bytes(),
            lease: 0,
            revision: 0,
        };
        let (role, _) = watch::channel(Role::Leader { token });
        let (stop, _) = watch::channel(false);
        Leadership {
            shared: Arc::new(Shared {
                id,
                single: true,
                role,
                valid_until: Mutex::new(None),
                step_down: Notify::new(),
            }),
            stop,
            done: Mutex::new(None),
            request_timeout: Duration::from_secs(1),
            _store: None,
        }
    }

    /// Starts campaigning on `store` (its prefix and connection) in the background; returns at once as a
    /// follower. Use the same store (or one with the same prefix) for fenced writes.
    pub fn etcd(store: Arc<EtcdStore>, opts: LeaderOptions) -> Result<Leadership, LeaderError> {
        validate_id(&opts.id)?;
        if opts.ttl < MIN_TTL || opts.ttl > MAX_TTL {
            return Err(LeaderError::InvalidTtl { ttl: opts.ttl });
        }
        let ttl_secs = i64::try_from(opts.ttl.as_secs() + u64::from(opts.ttl.subsec_nanos() > 0)).unwrap_or(3600);
        let handle = store.runtime_handle().ok_or(LeaderError::StoreClosed)?;
        let (role, _) = watch::channel(Role::Follower { leader: None });
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            id: opts.id.clone(),
            single: false,
            role,
            valid_until: Mutex::new(None),
            step_down: Notify::new(),
        });
        let task = Task {
            shared: shared.clone(),
            client: store.client(),
            key: store.full_key(LEADER_KEY),
            endpoints: store.endpoints().to_owned(),
            ttl_secs,
            retry: opts.retry.max(Duration::from_millis(10)),
            request_timeout: store.request_timeout(),
            stop: stop_rx,
        };
        handle.spawn(async move {
            task.run().await;
            let _ = done_tx.send(());
        });
        tracing::info!(replica = %opts.id, ttl_s = ttl_secs, "campaigning for leadership on etcd");
        Ok(Leadership {
            shared,
            stop,
            done: Mutex::new(Some(done_rx)),
            request_timeout: store.request_timeout(),
            _store: Some(store),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The current role. A leader whose local lease deadline has passed reports `Follower { leader: None }`
    /// even before its background task noticed.
    pub fn role(&self) -> Role {
        let role = self.shared.role.borrow().clone();
        if role.is_leader() && !self.lease_valid() {
            return Role::Follower { leader: None };
        }
        role
    }

    /// Whether this replica leads now (see [`Leadership::role`]).
    pub fn is_leader(&self) -> bool {
        self.role().is_leader()
    }

    /// Every role transition (the current role first).
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.shared.role.subscribe()
    }

    /// Waits until this replica leads or `timeout` passes; returns the token of the term if it leads.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<LeaderToken> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                if let Role::Leader { token } = self.role() {
                    return Some(token);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// The compare that fences a singleton write to this term: `Equals(leader key, token)`; `Ok(None)` for
    /// [`Leadership::single`] (nothing to compare). Refused when this replica does not lead.
    pub fn fence(&self) -> Result<Option<Compare>, LeaderError> {
        match self.role() {
            Role::Leader { .. } if self.shared.single => Ok(None),
            Role::Leader { token } => Ok(Some(Compare::Equals(LEADER_KEY.to_vec(), token.value))),
            Role::Follower { leader } => Err(LeaderError::NotLeader {
                id: self.shared.id.clone(),
                leader,
            }),
        }
    }

    /// `txn` with this term's fence added (see [`Leadership::fence`]).
    pub fn fenced(&self, txn: Txn) -> Result<Txn, LeaderError> {
        Ok(match self.fence()? {
            Some(c) => txn.when(c),
            None => txn,
        })
    }

    /// Runs `txn` fenced to this term on `store` (the store this leadership campaigns on, or the sled store
    /// of a single coordinator). `Ok(false)` when a compare failed; if the fence was the one that failed, this
    /// replica has already stepped down when this returns (`is_leader()` is false). Blocking, like every
    /// [`Store`] call: from async code use `spawn_blocking`.
    pub fn commit(&self, store: &dyn Store, txn: Txn) -> Result<bool, LeaderError> {
        let Role::Leader { token } = self.role() else {
            return Err(LeaderError::NotLeader {
                id: self.shared.id.clone(),
                leader: self.leader_of_role(),
            });
        };
        let txn = self.fenced(txn)?;
        if store.txn(txn)? {
            return Ok(true);
        }
        if !self.shared.single {
            // Was it the fence? Then another replica leads (or nobody): stop now.
            match store.get(LEADER_KEY) {
                Ok(v) if v.as_deref() != Some(token.as_bytes()) => {
                    // Unless the task has already moved on to a new term of its own meanwhile.
                    let same_term = matches!(&*self.shared.role.borrow(), Role::Leader { token: t } if *t == token);
                    if same_term {
                        let leader = v.as_deref().and_then(leader_id);
                        self.lose("a fenced write was refused: the leader key holds another term", leader);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    replica = %self.shared.id,
                    error = %e,
                    "a fenced write was refused and the leader key could not be re-read; the election task will \
                     step down if leadership is lost"
                ),
            }
        }
        Ok(false)
    }

    /// Steps down now (after a refused fenced write, or to hand over), revokes the lease and campaigns again
    /// like a follower. No-op for [`Leadership::single`].
    pub fn step_down(&self, reason: &str) {
        if !self.shared.single {
            self.lose(reason, None);
        }
    }

    /// Stops campaigning: steps down if leading, revokes the lease, and waits (a few seconds at most) for it.
    pub async fn resign(&self) {
        self.stop.send_replace(true);
        let done = self.done.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(done) = done {
            let _ = tokio::time::timeout(self.request_timeout + Duration::from_secs(1), done).await;
        }
    }

    fn lose(&self, reason: &str, leader: Option<String>) {
        self.shared.stepped_down(reason, leader);
        self.shared.step_down.notify_one();
    }

    fn leader_of_role(&self) -> Option<String> {
        match &*self.shared.role.borrow() {
            Role::Follower { leader } => leader.clone(),
            Role::Leader { .. } => None,
        }
    }

    fn lease_valid(&self) -> bool {
        self.shared.single || self.shared.deadline().is_some_and(|d| Instant::now() < d)
    }
}

fn validate_id(id: &str) -> Result<(), LeaderError> {
    let why = if id.is_empty() {
        "it is empty"
    } else if id.len() > 128 {
        "it is longer than 128 bytes"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "it contains other characters than letters, digits, '.', '_' and '-'"
    } else {
        return Ok(());
    };
    Err(LeaderError::InvalidId { id: id.to_owned(), why })
}

/// The replica id in a leader key's value.
fn leader_id(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?;
    let id = s.split('/').next()?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// Why a term ended.
#[derive(Debug)]
enum Lost {
    Resigned,
    /// Asked by the handle (a refused fenced write, or `step_down`); already published.
    Asked,
    /// No renewal answered within the TTL.
    Expired,
    /// etcd says the lease does not exist any more.
    LeaseGone,
    /// The key is gone or holds another token.
    KeyTaken(Option<String>),
}

enum Campaign {
    Won {
        token: LeaderToken,
        ttl: Duration,
        granted_at: Instant,
    },
    /// The key exists: `leader` holds it; watch from `revision` + 1.
    Taken { leader: Option<String>, revision: i64 },
}

struct Task {
    shared: Arc<Shared>,
    client: Client,
    key: Vec<u8>,
    endpoints: String,
    ttl_secs: i64,
    retry: Duration,
    request_timeout: Duration,
    stop: watch::Receiver<bool>,
}

type EtcdResult<T> = Result<T, etcd_client::Error>;

impl Task {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Bounds an etcd call by `limit` (and the request timeout).
    async fn bounded<T>(&self, limit: Duration, fut: impl Future<Output = EtcdResult<T>>) -> Result<T, String> {
        match tokio::time::timeout(limit.min(self.request_timeout), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("etcd at {} did not answer in time", self.endpoints)),
        }
    }

    async fn run(mut self) {
        // A lease of a term that ended while etcd was unreachable: revoke it once etcd answers.
        let mut stale_lease: Option<i64> = None;
        // Warn once per outage, not on every retry.
        let mut failing = false;
        while !self.stopping() {
            if let Some(lease) = stale_lease {
                let mut c = self.client.clone();
                if self.bounded(self.request_timeout, c.lease_revoke(lease)).await.is_ok() {
                    tracing::debug!(lease = %format_args!("{lease:x}"), "revoked the lease of an ended term");
                    stale_lease = None;
                }
            }
            let round = self.campaign().await;
            if round.is_ok() && failing {
                failing = false;
                tracing::info!(replica = %self.shared.id, "leader election: etcd answers again");
            }
            match round {
                Ok(Campaign::Won { token, ttl, granted_at }) => {
                    let lease = token.lease;
                    let lost = self.lead(token, ttl, granted_at).await;
                    match &lost {
                        Lost::Asked => {}
                        Lost::Resigned => self.shared.stepped_down("resigned", None),
                        Lost::Expired => self.shared.stepped_down(
                            "lease not renewed within its TTL (etcd unreachable or this process was paused)",
                            None,
                        ),
                        Lost::LeaseGone => self.shared.stepped_down("etcd reports the lease expired", None),
                        Lost::KeyTaken(leader) => self.shared.stepped_down(
                            "the leader key was deleted or holds another replica's token",
                            leader.clone(),
                        ),
                    }
                    let mut c = self.client.clone();
                    if self.bounded(self.request_timeout, c.lease_revoke(lease)).await.is_err() {
                        stale_lease = Some(lease);
                    }
                }
                Ok(Campaign::Taken { leader, revision }) => {
                    self.shared.follow(leader);
                    self.wait_for_change(revision).await;
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(replica = %self.shared.id, error = %e, "leader election: etcd call failed");
                    } else {
                        failing = true;
                        tracing::warn!(
                            replica = %self.shared.id,
                            error = %e,
                            "leader election: etcd call failed; retrying until it answers (check etcd's health)"
                        );
                    }
                    self.pause(self.retry).await;
                }
            }
        }
        self.shared.stepped_down("resigned", None);
    }

    /// Sleeps `d`, or less when asked to stop.
    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
    }

    /// One campaign round: the key's holder, or this replica after creating the key.
    async fn campaign(&self) -> Result<Campaign, String> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(self.request_timeout, c.get(self.key.clone(), None))
            .await?;
        if let Some(kv) = resp.kvs().first() {
            return Ok(Campaign::Taken {
                leader: leader_id(kv.value()),
                revision: kv.mod_revision(),
            });
        }
        let granted_at = Instant::now();
        let grant = self
            .bounded(self.request_timeout, c.lease_grant(self.ttl_secs, None))
            .await?;
        let lease = grant.id();
        let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0).max(1));
        let nonce: u64 = rand::random();
        let value = format!("{}/{lease:x}/{nonce:x}", self.shared.id).into_bytes();
        let txn = EtcdTxn::new()
            .when([EtcdCompare::create_revision(self.key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                self.key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.clone(), None::<GetOptions>)]);
        let resp = match self.bounded(self.request_timeout, c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                // The put may have happened: revoking the lease deletes the key then.
                let _ = self.bounded(self.request_timeout, c.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(Campaign::Won {
                token: LeaderToken { value, lease, revision },
                ttl,
                granted_at,
            });
        }
        let _ = self.bounded(self.request_timeout, c.lease_revoke(lease)).await;
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (leader_id(kv.value()), kv.mod_revision())),
            _ => None,
        });
        Ok(match holder {
            Some((leader, revision)) => Campaign::Taken { leader, revision },
            // Deleted between the compare and now: try again at once.
            None => Campaign::Taken {
                leader: None,
                revision: 0,
            },
        })
    }

    /// As a follower: returns when the key changed (deleted: time to campaign), after one TTL (re-check), on
    /// a watch error (after a pause), or when asked to stop.
    async fn wait_for_change(&mut self, revision: i64) {
        if revision <= 0 {
            return;
        }
        let ttl = Duration::from_secs(u64::try_from(self.ttl_secs).unwrap_or(1));
        let mut c = self.client.clone();
        let opts = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = match self
            .bounded(self.request_timeout, c.watch(self.key.clone(), Some(opts)))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the leader key; re-checking after a pause");
                self.pause(self.retry).await;
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + ttl;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.stop.changed() => return,
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            return;
                        }
                        for ev in resp.events() {
                            match ev.event_type() {
                                EventType::Delete => return,
                                EventType::Put => {
                                    if let Some(kv) = ev.kv() {
                                        self.shared.follow(leader_id(kv.value()));
                                    }
                                }
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        self.pause(self.retry).await;
                        return;
                    }
                },
            }
        }
    }

    /// Leads one term until it ends.
    async fn lead(&mut self, token: LeaderToken, ttl: Duration, granted_at: Instant) -> Lost {
        let lease = token.lease;
        let ours = token.value.clone();
        let mut valid_until = granted_at + ttl;
        self.shared.became_leader(token, valid_until, ttl);
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        // Send times of unanswered renewals, oldest first (answers come in order).
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: the lease was just granted.
        loop {
            let left = valid_until.saturating_duration_since(Instant::now());
            tokio::select! {
                biased;
                _ = self.stop.changed() => return Lost::Resigned,
                _ = self.shared.step_down.notified() => return Lost::Asked,
                _ = tokio::time::sleep(left) => return Lost::Expired,
                msg = next_keepalive(&mut keeper) => match msg {
                    Ok(Some(resp)) => {
                        let at = sent.pop_front();
                        if resp.ttl() <= 0 {
                            return Lost::LeaseGone;
                        }
                        if let Some(at) = at {
                            let until = at + Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
                            if until > valid_until {
                                valid_until = until;
                                self.shared.set_deadline(Some(valid_until));
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!(replica = %self.shared.id, "lease keep-alive stream ended; reopening");
                        keeper = None;
                        sent.clear();
                    }
                },
                _ = tick.tick() => {
                    if let Err(lost) = self.renew(lease, &ours, &mut keeper, &mut sent, &mut valid_until).await {
                        return lost;
                    }
                }
            }
        }
    }

    /// One renewal round: (re)open the keep-alive stream or send a renewal, and re-read the key.
    async fn renew(
        &self,
        lease: i64,
        ours: &[u8],
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        sent: &mut VecDeque<Instant>,
        valid_until: &mut Instant,
    ) -> Result<(), Lost> {
        let left = valid_until.saturating_duration_since(Instant::now());
        match keeper {
            None => {
                let at = Instant::now();
                let mut c = self.client.clone();
                match tokio::time::timeout(left.min(self.request_timeout), c.lease_keep_alive(lease)).await {
                    // Opening the stream renews once and waits for the answer.
                    Ok(Ok((k, s))) => {
                        *keeper = Some((k, s));
                        let ttl = Duration::from_secs(u64::try_from(self.ttl_secs).unwrap_or(1));
                        // etcd renews to the granted TTL; count from the send time.
                        if at + ttl > *valid_until {
                            *valid_until = at + ttl;
                            self.shared.set_deadline(Some(*valid_until));
                        }
                    }
                    Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                        return Err(Lost::LeaseGone);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(replica = %self.shared.id, error = %e, "cannot renew the leader lease yet");
                    }
                    Err(_) => tracing::debug!(replica = %self.shared.id, "renewing the leader lease timed out"),
                }
            }
            Some((k, _)) => {
                sent.push_back(Instant::now());
                if k.keep_alive().await.is_err() {
                    *keeper = None;
                    sent.clear();
                }
            }
        }
        // The key must still be ours (an operator may delete it; etcd may have lost it).
        let left = valid_until.saturating_duration_since(Instant::now());
        let mut c = self.client.clone();
        if let Ok(resp) = self.bounded(left, c.get(self.key.clone(), None)).await {
            match resp.kvs().first() {
                Some(kv) if kv.value() == ours => {}
                Some(kv) => return Err(Lost::KeyTaken(leader_id(kv.value()))),
                None => return Err(Lost::KeyTaken(None)),
            }
        }
        Ok(())
    }
}

/// The next keep-alive answer, or never when no stream is open.
async fn next_keepalive(
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> EtcdResult<Option<etcd_client::LeaseKeepAliveResponse>> {
    match keeper {
        Some((_, stream)) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// A [`Store`] whose every transaction is fenced to the current leader term ([`Leadership::commit`]): the
/// store singleton work writes through (see `Ctx::singleton`). Reads pass through. A transaction on a replica
/// that does not lead fails with a store error naming the leader, and applies nothing.
pub struct FencedStore {
    inner: Arc<dyn Store>,
    leadership: Arc<Leadership>,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn Store>, leadership: Arc<Leadership>) -> FencedStore {
        FencedStore { inner, leadership }
    }
}

impl Store for FencedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<crate::store::KeyValue>, StoreError> {
        self.inner.scan_prefix(prefix)
    }
    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        match self.leadership.commit(self.inner.as_ref(), txn) {
            Ok(applied) => {
                if !applied && !self.leadership.is_leader() {
                    return Err(StoreError::Backend(
                        "a fenced write was refused: this replica no longer leads; its singleton work stops".into(),
                    ));
                }
                Ok(applied)
            }
            Err(LeaderError::Store(e)) => Err(e),
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_always_leads_and_fences_with_nothing() {
        let l = Leadership::single("solo");
        assert!(l.is_leader());
        assert_eq!(l.id(), "solo");
        assert_eq!(l.fence().unwrap(), None);
        let t = Txn::new().put("k", "v");
        assert_eq!(l.fenced(t.clone()).unwrap(), t);
        l.step_down("ignored");
        assert!(l.is_leader());
        assert!(l.subscribe().borrow().is_leader());
    }

    #[test]
    fn single_commits_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let l = Leadership::single("solo");
        assert!(l.commit(&store, Txn::new().put("work/x", "1")).unwrap());
        assert!(
            !l.commit(&store, Txn::new().if_absent("work/x").put("work/x", "2"))
                .unwrap()
        );
        assert!(l.is_leader());
        assert_eq!(store.get(b"work/x").unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn ids_are_validated_with_what_to_do() {
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            let err = validate_id(bad).unwrap_err().to_string();
            assert!(err.contains("unique id"), "{err}");
        }
        validate_id("replica-1.eu_west").unwrap();
    }

    #[test]
    fn leader_id_is_the_first_part_of_the_token() {
        assert_eq!(leader_id(b"r1/abc/def").as_deref(), Some("r1"));
        assert_eq!(leader_id(b"/x"), None);
        assert_eq!(leader_id(&[0xff, b'/']), None);
    }

    #[test]
    fn not_leader_error_names_the_leader() {
        let e = LeaderError::NotLeader {
            id: "r2".into(),
            leader: Some("r1".into()),
        };
        assert!(e.to_string().contains("leader: r1"), "{e}");
    }
}
