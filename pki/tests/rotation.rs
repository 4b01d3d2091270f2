//! Certificate rotation: a hot-swapped enrollment certificate, and CA rotation with an overlap
//! in which clients pinning either CA connect. Real TLS handshakes over loopback TCP.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use pki::ca::{CA_CERT_FILE, CA_KEY_FILE, CROSS_CERT_FILE, NEXT_CERT_FILE, NEXT_KEY_FILE};
use pki::{CertificateAuthority, Pin, PkiError, ServerIdentity, SwappableServerCert};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A tokio-rustls server resolving its certificate through `cert`; echoes one read.
async fn swappable_server(cert: &Arc<SwappableServerCert>) -> String {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config(&[b"h2"]).unwrap());
    common::echo_server(acceptor).await
}

/// Connects with `pin`, checks the connection carries data, returns the presented chain.
async fn connect(addr: &str, pin: &Pin) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut tls = pki::tls_connect(addr, pin, TIMEOUT).await?;
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect())
}

/// The serial number of a DER certificate (Certificate → TBSCertificate → [0] version →
/// INTEGER serialNumber), read by hand: the tests need no X.509 parser for one field.
fn serial(der: &CertificateDer<'_>) -> Vec<u8> {
    /// (header length, content length) of the TLV at the start of `b`.
    fn tlv(b: &[u8]) -> (usize, usize) {
        let first = b[1];
        if first < 0x80 {
            return (2, usize::from(first));
        }
        let n = usize::from(first & 0x7f);
        let len = b[2..2 + n].iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
        (2 + n, len)
    }
    let b: &[u8] = der.as_ref();
    let (h, _) = tlv(b); // Certificate SEQUENCE
    let b = &b[h..];
    let (h, _) = tlv(b); // TBSCertificate SEQUENCE
    let mut b = &b[h..];
    if b[0] == 0xa0 {
        let (h, l) = tlv(b); // [0] EXPLICIT version
        b = &b[h + l..];
    }
    assert_eq!(b[0], 0x02, "serialNumber is an INTEGER");
    let (h, l) = tlv(b);
    b[h..h + l].to_vec()
}

fn leaf(id: &ServerIdentity) -> CertificateDer<'static> {
    id.cert_chain().unwrap().remove(0)
}

#[tokio::test]
async fn enrollment_certificate_is_swapped_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let first = ca.issue_server_identity(&["127.0.0.1".into()]).unwrap();
    let cert = SwappableServerCert::new(&first).unwrap();
    let addr = swappable_server(&cert).await;
    assert!(!format!("{cert:?}").contains("PRIVATE KEY"));

    let before = connect(&addr, &ca.pin()).await.unwrap();
    assert_eq!(before[0], leaf(&first));

    let second = ca.issue_server_identity(&["127.0.0.1".into()]).unwrap();
    cert.replace(&second).unwrap();
    assert_eq!(cert.leaf_pin(), Some(Pin::of_der(&leaf(&second))));
    let after = connect(&addr, &ca.pin()).await.unwrap();
    assert_eq!(after[0], leaf(&second), "new connections get the new certificate");
    assert_ne!(serial(&before[0]), serial(&after[0]), "a new serial");

    // A broken identity is refused and the served certificate stays.
    let broken = ServerIdentity {
        cert_chain_pem: second.cert_chain_pem.clone(),
        key_pem: first.key_pem.clone(),
    };
    assert!(matches!(cert.replace(&broken), Err(PkiError::BadPem { .. })));
    assert_eq!(connect(&addr, &ca.pin()).await.unwrap()[0], leaf(&second));
}

#[tokio::test]
async fn ca_rotation_accepts_both_pins_during_the_overlap_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let old_pin = ca.pin();
    let cert = SwappableServerCert::new(&ca.issue_server_identity(&[]).unwrap()).unwrap();
    let addr = swappable_server(&cert).await;
    connect(&addr, &old_pin).await.unwrap();
    assert!(!ca.rotation_in_progress());
    assert!(matches!(ca.finish_rotation(), Err(PkiError::CaRotation { .. })));

    // Start: a new CA, cross-signed by the old one, persisted.
    let new_pin = ca.rotate().unwrap();
    assert_ne!(new_pin, old_pin);
    assert_eq!(ca.pin(), new_pin);
    assert_eq!(ca.previous_pin(), Some(old_pin));
    assert_eq!(ca.accepted_pins(), vec![new_pin, old_pin]);
    assert!(matches!(ca.rotate(), Err(PkiError::CaRotation { .. })));
    let mode = |f: &str| fs::metadata(dir.path().join(f)).unwrap().mode() & 0o777;
    assert_eq!(mode(NEXT_KEY_FILE), 0o600);
    assert_eq!(mode(CA_KEY_FILE), 0o600);
    assert_eq!(mode(NEXT_CERT_FILE), 0o644);
    assert_eq!(mode(CROSS_CERT_FILE), 0o644);
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));

    // Until the served identity is reissued, nothing changes for old-pin clients.
    connect(&addr, &old_pin).await.unwrap();

    let overlap_id = ca.issue_server_identity(&[]).unwrap();
    assert_eq!(overlap_id.ca_pin().unwrap(), new_pin);
    cert.replace(&overlap_id).unwrap();
    let chain = connect(&addr, &old_pin).await.unwrap();
    assert_eq!(chain.len(), 4, "leaf, cross, previous CA, new CA");
    assert_eq!(
        Pin::of_pem(&ca.cross_cert_pem().unwrap()).unwrap(),
        Pin::of_der(&chain[1])
    );
    connect(&addr, &new_pin).await.unwrap();
    // A foreign pin still fails.
    let other = tempfile::tempdir().unwrap();
    let foreign = CertificateAuthority::load_or_create(other.path()).unwrap().pin();
    assert!(connect(&addr, &foreign).await.unwrap_err().is_pin_mismatch());

    // A restart sees the rotation in progress.
    let mut reloaded = CertificateAuthority::load_or_create(dir.path()).unwrap();
    assert!(reloaded.rotation_in_progress());
    assert_eq!(reloaded.pin(), new_pin);
    assert_eq!(reloaded.previous_pin(), Some(old_pin));
    let reissued = reloaded.issue_server_identity(&[]).unwrap();
    cert.replace(&reissued).unwrap();
    connect(&addr, &old_pin).await.unwrap();
    connect(&addr, &new_pin).await.unwrap();

    // Finish: only the new CA; old-pinned clients get a pin mismatch.
    reloaded.finish_rotation().unwrap();
    assert!(!reloaded.rotation_in_progress());
    assert_eq!(reloaded.pin(), new_pin);
    assert_eq!(reloaded.accepted_pins(), vec![new_pin]);
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![CA_CERT_FILE, CA_KEY_FILE]);
    cert.replace(&reloaded.issue_server_identity(&[]).unwrap()).unwrap();
    let chain = connect(&addr, &new_pin).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf and new CA");
    let err = connect(&addr, &old_pin).await.unwrap_err();
    assert!(err.is_pin_mismatch(), "{err:?}");

    let again = CertificateAuthority::load_or_create(dir.path()).unwrap();
    assert!(!again.rotation_in_progress());
    assert_eq!(again.pin(), new_pin);
}

#[test]
fn interrupted_rotation_steps_are_recovered_on_load() {
    // finish_rotation cut between its two renames: completed on load.
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let new_pin = ca.rotate().unwrap();
    fs::rename(dir.path().join(NEXT_CERT_FILE), dir.path().join(CA_CERT_FILE)).unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    assert!(!ca.rotation_in_progress());
    assert_eq!(ca.pin(), new_pin);
    assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    assert!(!dir.path().join(CROSS_CERT_FILE).exists());
    ca.issue_server_identity(&[]).unwrap();

    // rotate cut before its commit point (no ca-next.crt): leftovers removed, old CA kept.
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let old_pin = ca.pin();
    ca.rotate().unwrap();
    fs::remove_file(dir.path().join(NEXT_CERT_FILE)).unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    assert!(!ca.rotation_in_progress());
    assert_eq!(ca.pin(), old_pin);
    assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    assert!(!dir.path().join(CROSS_CERT_FILE).exists());

    // A rotation whose cross certificate vanished is reported, not silently dropped.
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    ca.rotate().unwrap();
    fs::remove_file(dir.path().join(CROSS_CERT_FILE)).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, PkiError::IncompleteCa { .. }), "{err:?}");
}
