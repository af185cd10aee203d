//! The FWNP protocol, without IO: the messages of `spec/fwnp.md`, their CBOR codec, the rules a
//! valid request follows, the client's lease state machine with its renewal schedule and its
//! connection timing, and the gateway's decisions that need no socket, store or policy file.
//!
//! Like `quinn-proto`, this crate never reads a clock, opens a socket or draws global
//! randomness: time is an argument (`now`), randomness comes from an RNG the caller passes in,
//! and the caller moves the bytes. That keeps every rule of the protocol testable in
//! microseconds with simulated time. The daemons (`fwnp-gateway`, `fwnp-agent`) are thin glue
//! around it; policy evaluation, storage and the kernel filter belong to them, not here.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(any(test, feature = "alloc-count"))]
pub mod alloc_count;
pub mod codec;
pub mod duration;
pub mod gateway;
pub mod lease;
pub mod link;
pub mod local;
pub mod message;
pub mod validate;

pub use message::*;
