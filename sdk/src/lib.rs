//! The library applications use to ask the local FWNP host agent (`fwnp-agent`) for a
//! time-limited inbound opening (a port, a port range or an application from the gateway's
//! catalogue) and to hold it for exactly as long as they need it. It speaks the host's local
//! API (`spec/local-api.md`, frames from `fwnp_proto::local`) over the agent's Unix socket; it
//! never talks to the gateway itself, holds no credentials and does not renew: the agent does
//! that for as long as the application holds the [`Lease`]. The `fwnp` command in this package
//! does the same for programs that do not link this library.
//!
//! ```no_run
//! use std::time::Duration;
//! use fwnp_sdk::{Client, Error, LeaseEvent, Opening};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     // $FWNP_AGENT_SOCKET, else /run/fwnp/agent.sock.
//!     let client = Client::connect().await?;
//!     let mut lease = match client
//!         .open(Opening::tcp(8080).from("198.51.100.0/24").lifetime(Duration::from_secs(600)))
//!         .await
//!     {
//!         Ok(lease) => lease,
//!         Err(Error::DeniedByPolicy { reason }) => {
//!             eprintln!("not allowed: {}", reason.unwrap_or_default());
//!             return Ok(());
//!         }
//!         Err(e) => return Err(e),
//!     };
//!     println!("open: lease {} until {:?}", lease.id(), lease.expires());
//!     tokio::select! {
//!         _ = tokio::signal::ctrl_c() => lease.release().await?,
//!         Some(event) = lease.next_event() => eprintln!("lease: {event}"),
//!     }
//!     Ok(())
//! }
//! ```
//!
//! What is where:
//! - [`Client`]: the connection to the agent; [`Client::open`], [`Client::leases`],
//!   [`Client::status`], [`Client::release`].
//! - [`Opening`]: what to open, built with [`Opening::tcp`] and friends; remote prefixes as
//!   text or [`ipnet::IpNet`] through [`Remote`].
//! - [`Lease`]: what was granted, its expiry, its [`LeaseEvent`]s; released by
//!   [`Lease::release`] or by dropping it.
//! - [`Error`]: refusals mapped from the protocol's result codes and the local API's own codes,
//!   with [`Error::is_transient`] and [`Error::retry_after`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod lease;
mod opening;

pub use client::{
    AgentStatus, Client, DEFAULT_REQUEST_TIMEOUT, LeaseSummary, REQUIRED_API_VERSION,
};
pub use error::Error;
pub use lease::{Lease, LeaseEvent};
pub use opening::{Opening, OpeningError, Remote};

pub use fwnp_proto::local::{DenialCode, LocalCode};
pub use fwnp_proto::validate::ValidationError;
pub use fwnp_proto::{
    Epoch, Family, Grant, LeaseId, PortRange, Prefix, PrefixParseError, Protocol, ResultCode,
    Target,
};
pub use ipnet;
