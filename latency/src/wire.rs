//! The probe datagram (version 1): fixed 76 bytes, big-endian, authenticated with a truncated HMAC-SHA256.
//!
//! ```text
//! offset len  field
//!      0   2  magic 0x4E 0x4C ("NL")
//!      2   1  version = 1
//!      3   1  kind: 1 = request, 2 = response
//!      4   4  key id (u32): generation of the probe key that made the MAC
//!      8  16  sender wire id   (first 16 bytes of SHA-256 over the node id, see `WireId`)
//!     24  16  receiver wire id
//!     40   8  sequence number (u64), per prober and peer
//!     48   8  send time (u64): the prober's CLOCK_MONOTONIC in ns; a response echoes it unchanged
//!     56   4  responder hold (u32, ns): time the responder held the request before answering, saturating;
//!             0 in requests
//!     60  16  MAC: HMAC-SHA256(probe key, bytes 0..60), first 16 bytes
//!     76      end
//! ```
//!
//! In a response, *sender* is the responder and *receiver* the prober; sequence number and send time are the
//! request's. Requests and responses have the same length, so a response is never larger than the request
//! that caused it. Any datagram that is not exactly 76 bytes, has another magic, version or kind, names a
//! key id that is not accepted, or fails the MAC is rejected; the MAC is compared in constant time
//! (`hmac::Mac::verify_truncated_left`).
//!
//! MAC choice: HMAC-SHA256 from RustCrypto's `hmac` 0.12 over the workspace's `sha2` 0.10 — both widely used and
//! maintained, already in the dependency tree (boringtun), and HMAC-SHA256 truncated to 128 bits is a standard
//! construction (RFC 2104, RFC 4868 §2.3 truncates it to 128 bits for IPsec). BLAKE3 keyed mode would be faster,
//! but at a few hundred probes per second the MAC costs well under a millisecond of CPU per second, and one
//! fewer crate is worth more.

use hmac::Mac;

use crate::id::{WIRE_ID_LEN, WireId};
use crate::key::{KeyRing, ProbeKey};

/// Length of every probe datagram, request or response.
pub const PROBE_LEN: usize = 76;
/// First two bytes of every probe.
pub const MAGIC: [u8; 2] = *b"NL";
/// The wire format version this crate speaks.
pub const VERSION: u8 = 1;
/// Length of the truncated MAC.
pub const MAC_LEN: usize = 16;

const OFF_VERSION: usize = 2;
const OFF_KIND: usize = 3;
const OFF_KEY_ID: usize = 4;
const OFF_SENDER: usize = 8;
const OFF_RECEIVER: usize = OFF_SENDER + WIRE_ID_LEN;
const OFF_SEQ: usize = OFF_RECEIVER + WIRE_ID_LEN;
const OFF_SENT: usize = OFF_SEQ + 8;
const OFF_HOLD: usize = OFF_SENT + 8;
const OFF_MAC: usize = OFF_HOLD + 4;
const _: () = assert!(OFF_MAC + MAC_LEN == PROBE_LEN);

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sent by a prober; answered by the receiver's responder.
    Request,
    /// Sent by a responder back to the prober.
    Response,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Response => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            _ => None,
        }
    }
}

/// The fields of a probe (everything but the MAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Request or response.
    pub kind: Kind,
    /// Id of the key that signs (or signed) the probe.
    pub key_id: u32,
    /// Who sent this datagram.
    pub sender: WireId,
    /// Who it is for.
    pub receiver: WireId,
    /// The prober's sequence number for this peer.
    pub seq: u64,
    /// The prober's monotonic send time, ns.
    pub sent_mono_ns: u64,
    /// Responder hold time, ns (0 in requests).
    pub hold_ns: u32,
}

/// Why a datagram is not a valid probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong size.
    #[error(
        "datagram is {got} bytes, a version-1 probe is exactly {PROBE_LEN}; the sender speaks another format or this is not a probe"
    )]
    Length {
        /// Bytes received.
        got: usize,
    },
    /// Not our magic.
    #[error("datagram does not start with the probe magic \"NL\"; it is not a latency probe (check the probe port)")]
    Magic,
    /// Another version.
    #[error("probe version {got} is not supported (this node speaks {VERSION}); upgrade the older agent")]
    Version {
        /// Version byte received.
        got: u8,
    },
    /// Unknown kind byte.
    #[error("probe kind {got} is neither request (1) nor response (2); the datagram is malformed")]
    Kind {
        /// Kind byte received.
        got: u8,
    },
    /// The key id is not current, nor previous within its grace period.
    #[error(
        "probe signed with key id {key_id}, which this node does not accept now; the two nodes hold different probe keys (check key distribution)"
    )]
    UnknownKey {
        /// Key id received.
        key_id: u32,
    },
    /// MAC mismatch.
    #[error("probe MAC does not verify; it was forged, corrupted, or signed with another secret under the same key id")]
    BadMac,
}

impl Probe {
    /// Serializes and signs the probe with `key`; `key_id` is taken from the key.
    pub fn encode(&self, key: &ProbeKey) -> [u8; PROBE_LEN] {
        let mut b = [0u8; PROBE_LEN];
        b[..2].copy_from_slice(&MAGIC);
        b[OFF_VERSION] = VERSION;
        b[OFF_KIND] = self.kind.to_byte();
        b[OFF_KEY_ID..OFF_SENDER].copy_from_slice(&key.id().to_be_bytes());
        b[OFF_SENDER..OFF_RECEIVER].copy_from_slice(&self.sender.0);
        b[OFF_RECEIVER..OFF_SEQ].copy_from_slice(&self.receiver.0);
        b[OFF_SEQ..OFF_SENT].copy_from_slice(&self.seq.to_be_bytes());
        b[OFF_SENT..OFF_HOLD].copy_from_slice(&self.sent_mono_ns.to_be_bytes());
        b[OFF_HOLD..OFF_MAC].copy_from_slice(&self.hold_ns.to_be_bytes());
        let mut mac = key.mac();
        mac.update(&b[..OFF_MAC]);
        let tag = mac.finalize().into_bytes();
        b[OFF_MAC..].copy_from_slice(&tag[..MAC_LEN]);
        b
    }

    /// Parses the fields without checking the MAC: exact length, magic, version and kind only. For cheap checks
    /// (is it for me, from a known peer) before [`Probe::verify`], and for dispatching requests and responses.
    /// Nothing parsed here may be trusted until `verify` succeeds.
    pub fn parse_unverified(datagram: &[u8]) -> Result<Probe, WireError> {
        let b: &[u8; PROBE_LEN] = datagram
            .try_into()
            .map_err(|_| WireError::Length { got: datagram.len() })?;
        if b[..2] != MAGIC {
            return Err(WireError::Magic);
        }
        if b[OFF_VERSION] != VERSION {
            return Err(WireError::Version { got: b[OFF_VERSION] });
        }
        let kind = Kind::from_byte(b[OFF_KIND]).ok_or(WireError::Kind { got: b[OFF_KIND] })?;
        Ok(Probe {
            kind,
            key_id: u32::from_be_bytes(arr(&b[OFF_KEY_ID..OFF_SENDER])),
            sender: WireId(arr(&b[OFF_SENDER..OFF_RECEIVER])),
            receiver: WireId(arr(&b[OFF_RECEIVER..OFF_SEQ])),
            seq: u64::from_be_bytes(arr(&b[OFF_SEQ..OFF_SENT])),
            sent_mono_ns: u64::from_be_bytes(arr(&b[OFF_SENT..OFF_HOLD])),
            hold_ns: u32::from_be_bytes(arr(&b[OFF_HOLD..OFF_MAC])),
        })
    }

    /// Checks the MAC of `datagram` (already parsed into `self` by [`Probe::parse_unverified`]) against the key
    /// its key id names, if `keys` accepts that id at `now_mono_ns`. Returns the key that verified it.
    pub fn verify<'k>(&self, datagram: &[u8], keys: &'k KeyRing, now_mono_ns: u64) -> Result<&'k ProbeKey, WireError> {
        if datagram.len() != PROBE_LEN {
            return Err(WireError::Length { got: datagram.len() });
        }
        let key = keys
            .accepted(self.key_id, now_mono_ns)
            .ok_or(WireError::UnknownKey { key_id: self.key_id })?;
        let mut mac = key.mac();
        mac.update(&datagram[..OFF_MAC]);
        mac.verify_truncated_left(&datagram[OFF_MAC..])
            .map_err(|_| WireError::BadMac)?;
        Ok(key)
    }

    /// Parses and verifies in one step.
    pub fn decode<'k>(
        datagram: &[u8],
        keys: &'k KeyRing,
        now_mono_ns: u64,
    ) -> Result<(Probe, &'k ProbeKey), WireError> {
        let p = Self::parse_unverified(datagram)?;
        let k = p.verify(datagram, keys, now_mono_ns)?;
        Ok((p, k))
    }
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DEFAULT_KEY_GRACE, KEY_LEN};

    fn sample() -> Probe {
        Probe {
            kind: Kind::Request,
            key_id: 0,
            sender: WireId([1; 16]),
            receiver: WireId([2; 16]),
            seq: 0x0102_0304_0506_0708,
            sent_mono_ns: 0x1112_1314_1516_1718,
            hold_ns: 0,
        }
    }

    fn dec(b: &[u8], keys: &KeyRing, now: u64) -> Result<Probe, WireError> {
        Probe::decode(b, keys, now).map(|(p, _)| p)
    }

    fn ring() -> KeyRing {
        KeyRing::new(ProbeKey::new(0xA0B0_C0D0, [7; KEY_LEN]), DEFAULT_KEY_GRACE)
    }

    #[test]
    fn layout_is_as_documented() {
        let keys = ring();
        let b = sample().encode(keys.current());
        assert_eq!(b.len(), 76);
        assert_eq!(&b[0..4], &[b'N', b'L', 1, 1]);
        assert_eq!(&b[4..8], &[0xA0, 0xB0, 0xC0, 0xD0]);
        assert_eq!(&b[8..24], &[1; 16]);
        assert_eq!(&b[24..40], &[2; 16]);
        assert_eq!(&b[40..48], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[48..56], &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        assert_eq!(&b[56..60], &[0, 0, 0, 0]);
        // The MAC is HMAC-SHA256 over bytes 0..60, truncated to 16 bytes.
        let mut mac = keys.current().mac();
        mac.update(&b[..60]);
        assert_eq!(&b[60..], &mac.finalize().into_bytes()[..16]);
    }

    #[test]
    fn roundtrip() {
        let keys = ring();
        let mut p = sample();
        p.kind = Kind::Response;
        p.hold_ns = 12_345;
        let b = p.encode(keys.current());
        let (q, k) = Probe::decode(&b, &keys, 0).unwrap();
        assert_eq!(
            q,
            Probe {
                key_id: 0xA0B0_C0D0,
                ..p
            }
        );
        assert_eq!(k.id(), 0xA0B0_C0D0);
    }

    #[test]
    fn hostile_datagrams_are_rejected() {
        let keys = ring();
        let good = sample().encode(keys.current());
        assert_eq!(dec(&good[..75], &keys, 0), Err(WireError::Length { got: 75 }));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(dec(&long, &keys, 0), Err(WireError::Length { got: 77 }));
        assert_eq!(dec(&[], &keys, 0), Err(WireError::Length { got: 0 }));
        let mut b = good;
        b[0] = b'X';
        assert_eq!(dec(&b, &keys, 0), Err(WireError::Magic));
        let mut b = good;
        b[2] = 2;
        assert_eq!(dec(&b, &keys, 0), Err(WireError::Version { got: 2 }));
        let mut b = good;
        b[3] = 3;
        assert_eq!(dec(&b, &keys, 0), Err(WireError::Kind { got: 3 }));
        let mut b = good;
        b[7] ^= 1;
        assert_eq!(dec(&b, &keys, 0), Err(WireError::UnknownKey { key_id: 0xA0B0_C0D1 }));
        // Flipping any bit of the authenticated fields or the MAC breaks the MAC.
        for i in 8..PROBE_LEN {
            let mut b = good;
            b[i] ^= 0x80;
            assert_eq!(dec(&b, &keys, 0), Err(WireError::BadMac), "byte {i}");
        }
        // Flipping the kind to the other valid value is caught by the MAC too.
        let mut b = good;
        b[3] = 2;
        assert_eq!(dec(&b, &keys, 0), Err(WireError::BadMac));
        // Same key id, other secret.
        let other = KeyRing::new(ProbeKey::new(0xA0B0_C0D0, [8; KEY_LEN]), DEFAULT_KEY_GRACE);
        assert_eq!(dec(&good, &other, 0), Err(WireError::BadMac));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let keys = ring();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..200 {
            let mut buf = vec![0u8; len];
            for b in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if len >= 4 {
                buf[..4].copy_from_slice(&[b'N', b'L', 1, 1 + (x & 1) as u8]);
            }
            assert!(dec(&buf, &keys, 0).is_err());
        }
    }
}
