//! Waiting a little for more work before a batch is committed, while much more is on its way.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a thread that commits batches (the batcher's kernel transactions, a store's group
/// commits) waits for more work before it commits what it has.
///
/// A transaction costs about the same whatever it carries: the kernel's begin, end and
/// acknowledgement, a database's commit and the pages it rewrites. A thread that commits
/// whatever is queued the moment it wakes commits many small transactions under load (three or
/// four kernel changes a batch with hundreds of requests in flight), and the CPU those cost is
/// taken from the requests themselves. So while `busy` says that many more are on their way, a
/// batch smaller than `enough` waits up to `wait` for them, as PostgreSQL's `commit_delay` does
/// while `commit_siblings` other transactions are active. An idle or lightly loaded caller is
/// never made to wait: `busy` is false then.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
/// use fwnp_netfilter::Coalescing;
///
/// let in_flight = Arc::new(AtomicUsize::new(0));
/// let seen = in_flight.clone();
/// let coalescing = Coalescing {
///     busy: Arc::new(move || seen.load(Ordering::Relaxed) >= 64),
///     enough: 128,
///     // A gateway waits half a millisecond; a second here, so that a busy machine's late
///     // wake-up does not end the wait before the second arrival.
///     wait: Duration::from_secs(1),
/// };
/// // Not busy: the batch of one is committed at once, nothing more is asked for.
/// let mut asked = 0;
/// assert_eq!(coalescing.gather(1, || { asked += 1; Some(1) }), 1);
/// assert_eq!(asked, 0);
/// // Busy: it waits, taking what arrives, until it has enough.
/// in_flight.store(500, Ordering::Relaxed);
/// let mut queued = 1;
/// assert_eq!(coalescing.gather(1, || { queued += 100; Some(queued) }), 201);
/// ```
#[derive(Clone)]
pub struct Coalescing {
    /// Whether many more are on their way: asked before each wait.
    pub busy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// A batch this large is committed without waiting.
    pub enough: usize,
    /// The longest a batch waits, in all.
    pub wait: Duration,
}

impl Coalescing {
    /// Waits for more while [`Coalescing::busy`] holds and the batch is smaller than
    /// [`Coalescing::enough`], at most [`Coalescing::wait`] in all, and returns the size the
    /// batch reached. The thread sleeps in slices (a quarter of the wait, at most half a
    /// millisecond) rather than waiting on its queue:
    /// a waiting receiver would be woken by every sender, at the cost of a system call on each
    /// side per arrival, which is the cost the wait saves. After each slice `take` moves what
    /// arrived into the batch and returns the batch's size, or `None` when the batch must go
    /// now (a command that must not wait behind it, a close).
    pub fn gather(&self, size: usize, mut take: impl FnMut() -> Option<usize>) -> usize {
        let started = Instant::now();
        // Short enough to see a batch filled or the load gone soon after; long enough that
        // the sleeps cost little beside the transactions they save.
        let slice = (self.wait / 4).clamp(Duration::from_micros(50), Duration::from_micros(500));
        let mut size = size;
        while size < self.enough && (self.busy)() {
            let left = self.wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(slice));
            match take() {
                Some(now) => size = now,
                None => break,
            }
        }
        size
    }
}

impl fmt::Debug for Coalescing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalescing")
            .field("enough", &self.enough)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}
