//! Probe keys and the key ring that handles rotation.
//!
//! The coordinator hands every agent the fleet's probe key over the fleet channel: a 32-byte secret and a
//! 32-bit key id (a generation number). Probes are signed with the current key; a node accepts probes and
//! responses under the current key and, for a grace period after a rotation, under the previous one, so probes
//! in flight and peers that got the new key a little later keep being answered.

use std::fmt;
use std::time::Duration;

use hmac::Hmac;
use sha2::Sha256;

use crate::clock::duration_ns;

/// Length of a probe key secret in bytes.
pub const KEY_LEN: usize = 32;

/// How long the previous key stays accepted after a rotation. Default 60 s: long enough for the coordinator to
/// reach every agent and for probes in flight to land, short enough that a retired key soon stops working.
pub const DEFAULT_KEY_GRACE: Duration = Duration::from_secs(60);

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// A probe key: a key id (generation) and a 32-byte secret. `Debug` never shows the secret.
#[derive(Clone)]
pub struct ProbeKey {
    id: u32,
    secret: [u8; KEY_LEN],
    /// HMAC state with the key already absorbed (saves two SHA-256 compressions per MAC).
    mac: HmacSha256,
}

impl ProbeKey {
    /// A key from its id and secret.
    pub fn new(id: u32, secret: [u8; KEY_LEN]) -> Self {
        // HMAC pads a key shorter than the hash block (64 bytes) with zeros (RFC 2104), so this is HMAC with the
        // 32-byte secret as key, built without the fallible `new_from_slice`.
        let mut block = [0u8; 64];
        block[..KEY_LEN].copy_from_slice(&secret);
        let mac = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
        Self { id, secret, mac }
    }

    /// A new random key with the given id, from the operating system's random source.
    pub fn generate(id: u32) -> Self {
        use rand::RngCore;
        let mut secret = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        Self::new(id, secret)
    }

    /// The key id carried in every probe.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The secret, for handing the key to agents over the (encrypted, authenticated) fleet channel. Never log it.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    pub(crate) fn mac(&self) -> HmacSha256 {
        self.mac.clone()
    }
}

impl fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The current key plus, for a grace period, the previous one.
#[derive(Clone, Debug)]
pub struct KeyRing {
    current: ProbeKey,
    previous: Option<(ProbeKey, u64)>,
    grace_ns: u64,
}

impl KeyRing {
    /// A ring holding only `current`, with the given grace period for future rotations.
    pub fn new(current: ProbeKey, grace: Duration) -> Self {
        Self {
            current,
            previous: None,
            grace_ns: duration_ns(grace),
        }
    }

    /// The key new probes are signed with.
    pub fn current(&self) -> &ProbeKey {
        &self.current
    }

    /// Makes `new` the current key; the old current key stays accepted until `now_mono_ns + grace`.
    /// Installing a key with the current key's id replaces the secret without keeping the old one (a key id
    /// names one secret; reusing it is a coordinator bug that should not leave two secrets valid).
    pub fn rotate(&mut self, new: ProbeKey, now_mono_ns: u64) {
        if new.id == self.current.id {
            tracing::warn!(
                key_id = new.id,
                "probe key re-installed under the same key id; not keeping the old secret"
            );
            self.current = new;
            return;
        }
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some((old, now_mono_ns.saturating_add(self.grace_ns)));
    }

    /// The key with this id, if it is accepted at `now_mono_ns`: the current key, or the previous key before its
    /// grace period ends.
    pub fn accepted(&self, key_id: u32, now_mono_ns: u64) -> Option<&ProbeKey> {
        if key_id == self.current.id {
            return Some(&self.current);
        }
        match &self.previous {
            Some((k, until)) if k.id == key_id && now_mono_ns < *until => Some(k),
            _ => None,
        }
    }

    /// Ids of the keys accepted at `now_mono_ns` (current first).
    pub fn accepted_ids(&self, now_mono_ns: u64) -> Vec<u32> {
        let mut ids = vec![self.current.id];
        if let Some((k, until)) = &self.previous
            && now_mono_ns < *until
        {
            ids.push(k.id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_hmac_sha256_with_the_32_byte_secret() {
        use hmac::Mac;
        let k = ProbeKey::new(1, [0x5A; KEY_LEN]);
        let mut a = k.mac();
        a.update(b"probe");
        let mut b = HmacSha256::new_from_slice(&[0x5A; KEY_LEN]).unwrap();
        b.update(b"probe");
        assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
    }

    #[test]
    fn debug_hides_secret() {
        let k = ProbeKey::new(7, [0xAB; KEY_LEN]);
        let s = format!("{k:?} {:?}", KeyRing::new(k.clone(), DEFAULT_KEY_GRACE));
        assert!(!s.to_lowercase().contains("ab, ab") && !s.contains("171"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn rotation_keeps_previous_for_grace_only() {
        let mut ring = KeyRing::new(ProbeKey::new(1, [1; KEY_LEN]), Duration::from_secs(10));
        assert!(ring.accepted(1, 0).is_some());
        assert!(ring.accepted(2, 0).is_none());
        ring.rotate(ProbeKey::new(2, [2; KEY_LEN]), 1_000);
        assert_eq!(ring.current().id(), 2);
        assert!(ring.accepted(2, 1_000).is_some());
        assert!(ring.accepted(1, 1_000).is_some());
        assert!(ring.accepted(1, 1_000 + 9_999_999_999).is_some());
        assert!(ring.accepted(1, 1_000 + 10_000_000_000).is_none());
        assert_eq!(ring.accepted_ids(1_000), vec![2, 1]);
        // A second rotation retires key 1 at once.
        ring.rotate(ProbeKey::new(3, [3; KEY_LEN]), 2_000);
        assert!(ring.accepted(1, 2_000).is_none());
        assert!(ring.accepted(2, 2_000).is_some());
    }

    #[test]
    fn same_id_rotation_does_not_keep_old_secret() {
        let mut ring = KeyRing::new(ProbeKey::new(1, [1; KEY_LEN]), Duration::from_secs(10));
        ring.rotate(ProbeKey::new(1, [9; KEY_LEN]), 0);
        assert_eq!(ring.current().expose_secret(), &[9; KEY_LEN]);
        assert_eq!(ring.accepted_ids(0), vec![1]);
    }
}
