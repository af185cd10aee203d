//! FWNP's trust layer, what the gateway and the host agent both need to know who is at the other
//! end of a connection: the identity and addresses a peer certificate names ([`identity`]), the
//! TLS 1.3 configurations of the gateway (server) and the host (client) with their PEM and CRL
//! loaders ([`tls`]), and, behind the `issue` feature, the small certificate authority that
//! `fwnpctl pki` drives ([`pki`]).
//!
//! Nothing here depends on either daemon, so that the host agent carries none of the gateway's
//! store, admin API or metrics, and certificate issuance (rcgen) is built only where it is used.
#![forbid(unsafe_code)]

pub mod identity;
#[cfg(feature = "issue")]
pub mod pki;
pub mod tls;
