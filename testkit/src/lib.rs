//! What FWNP's tests, the lab demo and the load generator share, so that each is written once:
//! network namespaces and the [`Topology`](netns::Topology) of an outside network, a gateway
//! and hosts, with echo servers and bounded probes ([`netns`]); a test certificate authority
//! ([`pki`]); an etcd cluster of real processes (three members, or one), reachable from other namespaces
//! ([`etcd`]); the workspace's binaries, built and found for tests of another package
//! ([`binaries`]); and guards for the daemons run as child processes ([`process`]).
//!
//! Not part of the product (`publish = false`): the daemons never depend on it, only tests,
//! `fwnp-lab` and `fwnp-load` do. Everything it creates is removed again when its guard drops,
//! also when a test panics, and every wait is bounded.
#![forbid(unsafe_code)]

pub mod binaries;
pub mod etcd;
pub mod netns;
pub mod pki;
pub mod process;

/// A fresh directory named after `label`, removed when dropped whatever the outcome of the test.
///
/// ```
/// let dir = fwnp_testkit::temp_dir("example");
/// assert!(dir.path().is_dir());
/// ```
pub fn temp_dir(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fwnp-{label}-"))
        .tempdir()
        .expect("create a temporary directory")
}
