//! The FWNP gateway: it authenticates hosts over QUIC with mutual TLS, checks each request
//! against the operator's policy, programs its nftables filter through `fwnp-netfilter`, keeps
//! leases and the audit trail in SQLite, and serves the operator's `fwnpctl`.
//!
//! This crate is the driver of `fwnp-proto`'s request core (`fwnp_proto::gateway::request`),
//! which makes every decision that needs no IO: the modules here read files, hold sockets and
//! talk to the kernel and the database. Who may connect (certificates, identities, TLS
//! configurations, the CRL) is `fwnp-trust`'s. The map: [`config`] and [`policy`] are what the
//! operator writes; [`server`] moves the bytes of the protocol, [`sessions`] are its
//! connections as the service sees them, and [`service`] carries out what the core decides;
//! [`store`] keeps leases and the audit trail behind two seams, `LeaseStore` (writes) and
//! `StoreQueries` (reads), [`tally`] bounds what floods put in it; [`api`] is the admin API's
//! typed requests and answers, served by [`admin`] and asked by [`admin_client`]; [`metrics`],
//! [`explain`] and [`report`] serve the operator; [`daemon`] starts and stops it all.
//! [`cluster`] is a gateway's membership of an etcd cluster (members, the one policy, the
//! cluster's audit trail), and [`audit_export`] copies the audit trail to a SIEM.
//!
//! The modules depend on each other one way only (an arrow reads "uses"; no cycle; `trust` is
//! the fwnp-trust crate):
//!
//! ```text
//! daemon ──> admin ──> service ──> sessions ──> trust
//!   │          │         │  ├────> store ─────> api, trust
//!   │          └──> api  │  ├────> policy, explain ──> api, policy, report ──> policy, store
//!   │                    │  ├────> config ────> trust
//!   │                    │  └────> api, metrics, tally, trust
//!   ├──> server ──> service, sessions, trust
//!   └──> config, policy, store, trust
//! admin_client (used by fwnpctl) ──> api
//! ```
//!
//! HTTP stays in [`admin`] (it maps [`api::AdminError`] to statuses) and QUIC in [`server`]
//! (a session reaches its connection through [`sessions::HostLink`]), so the service speaks
//! neither.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod api;
pub mod audit_export;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod server;
pub mod service;
pub mod sessions;
pub mod store;
pub mod tally;
