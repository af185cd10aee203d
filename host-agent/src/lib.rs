//! The FWNP host agent, `fwnp-agent`: it holds the host's identity, keeps one QUIC connection
//! to the gateway, serves local applications over a Unix socket (the local API of
//! `spec/local-api.md`), renews their leases while they hold them and mirrors every grant into
//! the host's own nftables table.
//!
//! The protocol's decisions live in `fwnp-proto` (one [`fwnp_proto::lease::LeaseMachine`] per
//! lease held for applications, the local API's frames in [`fwnp_proto::local`]); the kernel belongs to
//! `fwnp-netfilter`. This crate is the glue: [`config`] reads what the operator writes;
//! [`link`] keeps the connection to the gateway, found through [`srv`] when DNS names it;
//! [`server`] accepts applications and learns who they are; [`ports`] verifies that the port an
//! application asks for is its own; [`mirror`] keeps the host table; [`machine`] owns the
//! leases and decides, without IO and in time given to it; [`core`] carries out its decisions
//! and ties it together; [`frontend`] answers NAT-PMP, PCP and UPnP IGD for applications that
//! do not speak FWNP, as clients of the core; [`daemon`] starts and stops it all.
//!
//! It is not a firewall manager: it touches only its own table, and only for leases the gateway
//! granted.
#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod daemon;
pub mod frontend;
pub mod link;
pub mod machine;
pub mod mirror;
pub mod ports;
pub mod server;
pub mod srv;
pub mod state;
