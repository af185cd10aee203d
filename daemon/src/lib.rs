//! What the two FWNP daemons, `fwnp-gateway` and `fwnp-agent`, do alike around their own work:
//! reading a configuration file and reporting what is wrong in it by line and reason
//! ([`config`]).
//!
//! Neither daemon may depend on the other, so what both repeat lives here, and nothing else
//! does: the protocol's rules are in `fwnp-proto`, certificates and TLS in `fwnp-trust`.
#![forbid(unsafe_code)]

pub mod config;
