//! End-to-end: the coordinator enforces the version-skew rule at enrollment (`nimbus_proto::skew`): an agent newer
//! than the coordinator, or with a version that is not one, is refused with FAILED_PRECONDITION and a message that
//! says what to do, before its token is spent. (A binary of another version cannot be built here, so the call is
//! made with the agent's own request type; the Hello check uses the same function.)
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::{Fleet, require_root};
use nimbus_proto::EnrollRequest;
use nimbus_proto::enrollment_client::EnrollmentClient;

#[test]
fn agents_outside_the_supported_skew_are_refused_before_their_token_is_used() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1);
    let endpoint = fleet.enroll_endpoint().to_string();
    let pin = pki::Pin::parse(&token.ca_pin).unwrap();
    let secret = token.token.clone();
    let refusals = fleet
        .agent_ns(1)
        .block_on(move || async move {
            let channel = pki::connect_pinned(&endpoint, &pin, Duration::from_secs(10))
                .await
                .unwrap();
            let mut client = EnrollmentClient::new(channel);
            let mut out = Vec::new();
            for version in ["0.2.0", "99.0.0", "latest"] {
                let req = EnrollRequest {
                    token: secret.clone(),
                    wg_public_key: vec![7; 32],
                    hostname: "skewed".into(),
                    machine_id: "0123456789abcdef0123456789abcdef".into(),
                    agent_version: version.into(),
                    node_name: "skewed".into(),
                    macs: vec![],
                };
                let status = client.enroll(req).await.unwrap_err();
                out.push((version, status.code(), status.message().to_string()));
            }
            out
        })
        .unwrap();
    for (version, code, message) in &refusals {
        assert_eq!(*code, tonic::Code::FailedPrecondition, "{version}: {message}");
    }
    assert!(refusals[0].2.contains("upgrade the coordinator first"), "{refusals:?}");
    assert!(refusals[1].2.contains("upgrade the coordinator first"), "{refusals:?}");
    assert!(refusals[2].2.contains("not a semantic version"), "{refusals:?}");
    // The single-use token was not spent by the refusals: the real agent enrolls with it.
    fleet.start_agent(1, Some(&token), &[]);
    fleet.wait_connected(&["agent-1"]);
}
