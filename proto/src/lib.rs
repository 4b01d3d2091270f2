//! # nimbus-proto
//!
//! Generated tonic/prost code for the `nimbus.v1` contract in
//! `proto/nimbus/v1/nimbus.proto`. Only this crate runs code generation; every
//! other crate uses the types re-exported here.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("nimbus.v1");
}

pub use v1::*;
