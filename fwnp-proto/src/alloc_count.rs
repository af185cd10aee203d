//! Counting the heap in memory tests, shared by the crates whose tests assert what a structure
//! holds (the lease book here, the gateway's per-lease parts and idle connections, the
//! batcher's desired state). Only in this crate's tests and behind the `alloc-count` feature,
//! which the other crates turn on for their tests alone.
//!
//! The count is the process's: a test binary declares the counting allocator once with
//! [`count_allocations!`](crate::count_allocations) and reads [`live`] around what it
//! measures. The counter lives in `stats_alloc`'s static, so these functions need no handle
//! on the declaration.
//!
//! ```
//! fwnp_proto::count_allocations!();
//!
//! let held = vec![0u8; 4096];
//! assert_eq!(fwnp_proto::alloc_count::freed_by(held), 4096);
//! ```

pub use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

/// Declares the counting allocator as the global allocator of the binary it is written in
/// (once per binary: a library that declared it would clash with any other allocator of every
/// binary that links it).
///
/// ```
/// fwnp_proto::count_allocations!();
///
/// let before = fwnp_proto::alloc_count::live();
/// let kept = Box::new([0u64; 16]);
/// assert_eq!(fwnp_proto::alloc_count::live() - before, 128);
/// # drop(kept);
/// ```
#[macro_export]
macro_rules! count_allocations {
    () => {
        #[global_allocator]
        static COUNTING: &$crate::alloc_count::StatsAlloc<::std::alloc::System> =
            &$crate::alloc_count::INSTRUMENTED_SYSTEM;
    };
}

/// Bytes allocated and not freed yet, by the whole process, since it started; stays 0 in a
/// binary that did not declare [`count_allocations!`](crate::count_allocations).
///
/// ```
/// fwnp_proto::count_allocations!();
///
/// let before = fwnp_proto::alloc_count::live();
/// let kept = vec![0u8; 1000];
/// assert_eq!(fwnp_proto::alloc_count::live() - before, 1000);
/// # drop(kept);
/// ```
pub fn live() -> i64 {
    let stats = INSTRUMENTED_SYSTEM.stats();
    stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
}

/// Allocations and reallocations made by the whole process since it started (0 in a binary
/// that did not declare [`count_allocations!`](crate::count_allocations)); the difference of
/// two readings counts what ran between them.
///
/// ```
/// fwnp_proto::count_allocations!();
///
/// let before = fwnp_proto::alloc_count::allocations();
/// let kept = vec![0u8; 16];
/// assert!(fwnp_proto::alloc_count::allocations() - before >= 1);
/// # drop(kept);
/// ```
pub fn allocations() -> u64 {
    let stats = INSTRUMENTED_SYSTEM.stats();
    (stats.allocations + stats.reallocations) as u64
}

/// Bytes freed by dropping `value` (0 if the process's count rose meanwhile).
///
/// ```
/// fwnp_proto::count_allocations!();
///
/// assert_eq!(fwnp_proto::alloc_count::freed_by(String::from("lease")), 5);
/// ```
pub fn freed_by<T>(value: T) -> usize {
    let before = live();
    drop(value);
    usize::try_from(before - live()).unwrap_or(0)
}
