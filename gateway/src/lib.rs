//! The FWNP gateway: it authenticates hosts over QUIC with mutual TLS, checks each request
//! against the operator's policy, programs its nftables filter through `fwnp-netfilter`, keeps
//! leases and the audit trail in SQLite, and serves the operator's `fwnpctl`.
//!
//! This crate is glue around `fwnp-proto`, which makes every decision that needs no IO.
//! Not yet implemented: the service, policy, store and admin API arrive with their own work.
#![forbid(unsafe_code)]

pub mod config;
pub mod identity;
pub mod pki;
pub mod policy;
pub mod tls;
pub mod store;
