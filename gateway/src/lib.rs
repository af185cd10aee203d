//! The FWNP gateway: it authenticates hosts over QUIC with mutual TLS, checks each request
//! against the operator's policy, programs its nftables filter through `fwnp-netfilter`, keeps
//! leases and the audit trail in SQLite, and serves the operator's `fwnpctl`.
//!
//! This crate is glue around `fwnp-proto`, which makes every decision that needs no IO: the
//! modules here read files, hold sockets and talk to the kernel and the database. The map:
//! [`config`] and [`policy`] are what the operator writes; who may connect is read by
//! `fwnp-trust` (certificates, identities, TLS); [`server`] moves the bytes of the protocol and [`service`] answers
//! them; [`store`] keeps leases and the audit trail, [`tally`] bounds what floods put in it; [`admin`] and [`metrics`] serve the
//! operator; [`daemon`] starts and stops it all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod server;
pub mod service;
pub mod store;
pub mod tally;
