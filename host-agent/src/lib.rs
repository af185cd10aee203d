//! The FWNP host agent: it holds the host's identity, keeps one QUIC connection to the gateway,
//! serves local applications over a Unix socket, renews their leases while they hold them and
//! mirrors every grant into the host's own nftables table.
//!
//! Not yet implemented: the agent arrives with its own work.
#![forbid(unsafe_code)]
