//! The library applications use to ask the local FWNP host agent for a time-limited opening of
//! a port or an application, and to hold it for as long as they need it.
//!
//! Not yet implemented: the SDK arrives with the host agent.
#![forbid(unsafe_code)]
