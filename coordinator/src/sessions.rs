//! Live fleet sessions: which node has an open stream right now, a sender to
//! push messages down it, and last-seen times kept in memory and written to
//! the store in batches (never one disk write per heartbeat).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use nimbus_proto::CoordinatorMessage;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};

struct Session {
    id: u64,
    tx: mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>,
    /// Tells the stream's task to end (revocation, replacement).
    cancel: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    sessions: HashMap<String, Session>,
    last_seen: HashMap<String, SystemTime>,
    dirty: HashSet<String>,
}

/// Registry of open fleet streams, keyed by node id.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

/// Proof of registration; pass it back to [`Sessions::close`] so a newer
/// stream of the same node is not removed by an older one ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId(u64);

impl SessionId {
    /// The stream's number (unique within this coordinator's life).
    pub fn number(self) -> u64 {
        self.0
    }
}

impl Sessions {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the maps stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a stream for `node_id`, ending any older stream of the same
    /// node. The returned `Notify` fires when the stream must end.
    pub fn open(
        &self,
        node_id: &str,
        tx: mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>,
        now: SystemTime,
    ) -> (SessionId, Arc<Notify>) {
        let mut g = self.lock();
        g.next_id += 1;
        let id = g.next_id;
        let cancel = Arc::new(Notify::new());
        if let Some(old) = g.sessions.insert(
            node_id.to_string(),
            Session {
                id,
                tx,
                cancel: Arc::clone(&cancel),
            },
        ) {
            old.cancel.notify_one();
        }
        g.last_seen.insert(node_id.to_string(), now);
        g.dirty.insert(node_id.to_string());
        (SessionId(id), cancel)
    }

    /// Remove the stream if it is still the registered one.
    pub fn close(&self, node_id: &str, sid: SessionId) {
        let mut g = self.lock();
        if g.sessions.get(node_id).is_some_and(|s| s.id == sid.0) {
            g.sessions.remove(node_id);
        }
    }

    /// End the stream of `node_id` whatever it is (revocation).
    pub fn kick(&self, node_id: &str) {
        if let Some(s) = self.lock().sessions.remove(node_id) {
            s.cancel.notify_one();
        }
    }

    /// Whether `node_id` had a stream (or activity) since this coordinator started: a new stream from it is
    /// a reconnect.
    pub fn seen_before(&self, node_id: &str) -> bool {
        self.lock().last_seen.contains_key(node_id)
    }

    pub fn is_connected(&self, node_id: &str) -> bool {
        self.lock().sessions.contains_key(node_id)
    }

    pub fn connected_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Record activity (in memory only).
    pub fn touch(&self, node_id: &str, now: SystemTime) {
        let mut g = self.lock();
        g.last_seen.insert(node_id.to_string(), now);
        g.dirty.insert(node_id.to_string());
    }

    pub fn last_seen(&self, node_id: &str) -> Option<SystemTime> {
        self.lock().last_seen.get(node_id).copied()
    }

    /// Take the last-seen entries changed since the previous call.
    pub fn take_dirty(&self) -> Vec<(String, SystemTime)> {
        let mut g = self.lock();
        let dirty = std::mem::take(&mut g.dirty);
        dirty
            .into_iter()
            .filter_map(|id| g.last_seen.get(&id).map(|t| (id, *t)))
            .collect()
    }

    /// Put entries back after a failed flush so they are retried.
    pub fn restore_dirty(&self, batch: &[(String, SystemTime)]) {
        let mut g = self.lock();
        for (id, _) in batch {
            g.dirty.insert(id.clone());
        }
    }

    /// Queue `msg` for every open stream (those with a full queue miss it). Returns how many took it.
    pub fn broadcast(&self, msg: &CoordinatorMessage) -> usize {
        let txs: Vec<_> = self.lock().sessions.values().map(|s| s.tx.clone()).collect();
        txs.iter().filter(|tx| tx.try_send(Ok(msg.clone())).is_ok()).count()
    }

    /// Queue a message for the node's stream. Returns false when the node has
    /// no open stream or its queue is full.
    pub fn send(&self, node_id: &str, msg: CoordinatorMessage) -> bool {
        let tx = self.lock().sessions.get(node_id).map(|s| s.tx.clone());
        match tx {
            Some(tx) => tx.try_send(Ok(msg)).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_stream_survives_older_close() {
        let s = Sessions::new();
        let (tx1, _r1) = mpsc::channel(1);
        let (tx2, _r2) = mpsc::channel(1);
        let now = SystemTime::now();
        assert!(!s.seen_before("n1"));
        let (a, cancel_a) = s.open("n1", tx1, now);
        assert!(s.seen_before("n1"), "a second stream is a reconnect");
        let (b, _) = s.open("n1", tx2, now);
        // The older stream is told to end when replaced.
        tokio_test_notified(&cancel_a);
        s.close("n1", a);
        assert!(s.is_connected("n1"));
        s.close("n1", b);
        assert!(!s.is_connected("n1"));
    }

    fn tokio_test_notified(n: &Notify) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), n.notified())
                .await
                .expect("notified")
        });
    }

    #[tokio::test]
    async fn kick_tells_the_stream_to_end() {
        let s = Sessions::new();
        let (tx, _rx) = mpsc::channel(1);
        let (_, cancel) = s.open("n1", tx, SystemTime::now());
        s.kick("n1");
        assert!(!s.is_connected("n1"));
        tokio::time::timeout(std::time::Duration::from_secs(1), cancel.notified())
            .await
            .expect("notified");
    }

    #[test]
    fn dirty_last_seen_is_batched_once() {
        let s = Sessions::new();
        let now = SystemTime::now();
        s.touch("a", now);
        s.touch("a", now);
        s.touch("b", now);
        let mut batch = s.take_dirty();
        batch.sort();
        assert_eq!(batch.len(), 2);
        assert!(s.take_dirty().is_empty());
        s.restore_dirty(&batch);
        assert_eq!(s.take_dirty().len(), 2);
    }

    #[tokio::test]
    async fn broadcast_reaches_every_open_stream() {
        let s = Sessions::new();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        s.open("n1", tx1, SystemTime::now());
        s.open("n2", tx2, SystemTime::now());
        assert_eq!(s.broadcast(&CoordinatorMessage::default()), 2);
        assert!(rx1.recv().await.is_some() && rx2.recv().await.is_some());
    }

    #[tokio::test]
    async fn send_reaches_the_stream() {
        let s = Sessions::new();
        let (tx, mut rx) = mpsc::channel(4);
        s.open("n1", tx, SystemTime::now());
        assert!(s.send("n1", CoordinatorMessage::default()));
        assert!(rx.recv().await.is_some());
        assert!(!s.send("other", CoordinatorMessage::default()));
    }
}
