//! # nimbus-proto
//!
//! Generated tonic/prost code for the `nimbus.v1` contract in
//! `proto/nimbus/v1/nimbus.proto`. Only this crate runs code generation; every
//! other crate uses the types re-exported here.
//!
//! # Layout
//!
//! - [`v1`]: the generated messages, clients and servers (re-exported at the root).
//! - [`compat`]: the wire-compatibility check of the current contract against the last released one
//!   (`released/`), run as a test so a breaking change fails CI.
//! - [`skew`]: which agent versions a coordinator serves, checked at enrollment and at Hello.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("nimbus.v1");
}

pub mod compat;
pub mod skew;

pub use v1::*;

/// The current contract as a serialized `FileDescriptorSet` (the build's protoc output).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nimbus.binpb"));
/// The last released contract (`released/<version>/`) as a serialized `FileDescriptorSet`.
pub const RELEASED_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/released.binpb"));
