//! The client's connection timing: how quickly it notices that the gateway is gone, and when it
//! tries to connect again.
//!
//! A lease outlives its connection, but not a gateway outage longer than what is left of it: a
//! host holding a 10 s lease must notice a dead gateway within about a second and connect to the
//! restarted one as soon as it listens again, or the renewal comes too late. The rules here size
//! those timers to the leases at stake; the spec's sections on transport parameters and on the
//! connection lifecycle state them.
//!
//! - [`TransportTimers::for_min_lifetime`]: QUIC keep-alive and idle timeout for a connection,
//!   from the shortest lifetime the gateway grants the host (Welcome limits key 3): the idle
//!   timeout is an eighth of it, between [`MIN_IDLE_TIMEOUT`] and [`DEFAULT_IDLE_TIMEOUT`], and a
//!   PING goes out after a third of that of silence. A connection whose timers are slower than
//!   the Welcome's minimum lifetime needs is replaced by one with suitable timers
//!   ([`TransportTimers::suits`]).
//! - [`Reconnect`]: when to try again after a connection or an attempt ended. A stateless reset
//!   means a gateway answers on that address again: the next attempt is at once. After a
//!   GoingAway, the wait it asked for plus a random part of up to half of it (at least up to
//!   1 s), as the gateway asked. Otherwise the
//!   usual backoff (1 s doubling to 60 s, +-20 % jitter), but while leases are held never more
//!   than a sixteenth of the shortest remaining lifetime, and an attempt's handshake is given up
//!   after the same sixteenth (at least [`MIN_HANDSHAKE_TIMEOUT`]), so that attempts keep coming
//!   while the lease can still be saved.
//!
//! Like the lease machine it reads no clock: `now` and the earliest lease expiry are arguments.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fwnp_proto::link::{Ending, Reconnect, TransportTimers};
//! use rand::{SeedableRng, rngs::StdRng};
//!
//! // A policy that grants 10 s leases: the gateway is declared gone after 1.25 s of silence.
//! let timers = TransportTimers::for_min_lifetime(Some(10));
//! assert_eq!(timers.idle_timeout, Duration::from_millis(1250));
//! assert!(timers.keep_alive < timers.idle_timeout / 2);
//!
//! let mut rng = StdRng::seed_from_u64(1);
//! let mut reconnect = Reconnect::new();
//! let now = Instant::now();
//! // A lease expires in 8 s: the next attempt comes within half a second, not after 1 s.
//! let expiry = now + Duration::from_secs(8);
//! let next = reconnect.next_attempt(now, Ending::Lost, Some(expiry), &mut rng);
//! assert!(next <= now + Duration::from_millis(600));
//! // A stateless reset: the gateway is back, connect at once.
//! assert_eq!(reconnect.next_attempt(now, Ending::Reset, None, &mut rng), now);
//! ```

use std::time::{Duration, Instant};

use rand::Rng;

/// The QUIC idle timeout without a known minimum lifetime (and the longest one used).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest idle timeout the client asks for, whatever the lifetimes.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// The first reconnection delay.
pub const FIRST_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The longest reconnection delay.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(60);
/// The shortest delay between two attempts while leases are held (the lease bound shrinks
/// towards zero as the expiry nears).
pub const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// How long a handshake may take without leases at stake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest handshake timeout, whatever the lifetimes.
pub const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(250);
/// The relative jitter of every reconnection delay.
pub const RECONNECT_JITTER: f64 = 0.2;
/// While leases are held, attempts are at most this fraction (1/N) of the shortest remaining
/// lifetime apart.
pub const LEASE_FRACTION: u32 = 16;
/// A connection that lived at least this long resets the backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How many keep-alive intervals fit in an idle timeout (see [`TransportTimers::keep_alive`]).
pub const KEEP_ALIVES_PER_IDLE_TIMEOUT: u32 = 4;

/// The QUIC timers of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportTimers {
    /// Send a PING after this long without hearing from the gateway: a quarter of the idle
    /// timeout. Spec 3.4 asks for one whenever a third of it passed without sending; quinn
    /// counts its keep-alive from the last packet received, which comes a round trip and an
    /// acknowledgement delay after the last one sent, and the quarter leaves room for that.
    pub keep_alive: Duration,
    /// The `max_idle_timeout` transport parameter: the connection is dead after this long
    /// without hearing from the gateway.
    pub idle_timeout: Duration,
}

impl TransportTimers {
    /// The timers for a gateway whose shortest lifetime is `min_lifetime` seconds (`None`: not
    /// known yet): idle timeout `min_lifetime / 8` within `[1 s, 30 s]`, keep-alive a quarter of
    /// it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use fwnp_proto::link::TransportTimers;
    /// let usual = TransportTimers::for_min_lifetime(None);
    /// assert_eq!((usual.keep_alive, usual.idle_timeout), (Duration::from_millis(7500), Duration::from_secs(30)));
    /// assert_eq!(TransportTimers::for_min_lifetime(Some(3600)), usual);
    /// assert_eq!(TransportTimers::for_min_lifetime(Some(1)).idle_timeout, Duration::from_secs(1));
    /// ```
    pub fn for_min_lifetime(min_lifetime: Option<u32>) -> Self {
        let idle_timeout = match min_lifetime {
            None => DEFAULT_IDLE_TIMEOUT,
            Some(seconds) => (Duration::from_secs(u64::from(seconds)) / 8)
                .clamp(MIN_IDLE_TIMEOUT, DEFAULT_IDLE_TIMEOUT),
        };
        TransportTimers {
            keep_alive: idle_timeout / KEEP_ALIVES_PER_IDLE_TIMEOUT,
            idle_timeout,
        }
    }

    /// Whether a connection with these timers notices a lost gateway quickly enough for leases
    /// of `min_lifetime` seconds (a connection with quicker timers suits as well).
    ///
    /// ```
    /// use fwnp_proto::link::TransportTimers;
    /// let usual = TransportTimers::for_min_lifetime(None);
    /// assert!(usual.suits(600));
    /// assert!(!usual.suits(10));
    /// assert!(TransportTimers::for_min_lifetime(Some(10)).suits(600));
    /// ```
    pub fn suits(&self, min_lifetime: u32) -> bool {
        let needed = Self::for_min_lifetime(Some(min_lifetime));
        self.idle_timeout <= needed.idle_timeout && self.keep_alive <= needed.keep_alive
    }
}

/// How a connection, or an attempt to make one, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending {
    /// The gateway answered with a stateless reset: it listens again (it restarted) and has
    /// no state for the old connection.
    Reset,
    /// The gateway sent GoingAway asking to wait this long.
    GoingAway(Duration),
    /// The gateway refused the attempt's Hello (rate-limited) with this retry-after: the next
    /// attempt comes no sooner, and no later than the backoff would have it otherwise.
    RetryAfter(Duration),
    /// The connection was lost (idle timeout, closed) or the attempt failed.
    Lost,
}

/// The reconnection schedule of one client. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Duration,
    connected_at: Option<Instant>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconnect {
    /// A schedule whose first delay is [`FIRST_RECONNECT_DELAY`].
    pub fn new() -> Self {
        Reconnect {
            backoff: FIRST_RECONNECT_DELAY,
            connected_at: None,
        }
    }

    /// A connection was made (its Welcome received) at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// When to make the next attempt, the connection (or the attempt) having ended at `now` as
    /// `ending` says, while the earliest expiry of the leases held is `earliest_expiry`.
    pub fn next_attempt<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        ending: Ending,
        earliest_expiry: Option<Instant>,
        rng: &mut R,
    ) -> Instant {
        if let Some(at) = self.connected_at.take()
            && now.saturating_duration_since(at) >= STABLE_CONNECTION
        {
            self.backoff = FIRST_RECONNECT_DELAY;
        }
        let delay = match ending {
            Ending::Reset => return now,
            // The gateway asked for this wait, and no sooner: its own random spread, not
            // bounded by the leases.
            Ending::GoingAway(after) => {
                let spread = (after / 2).max(Duration::from_secs(1));
                return now + after + spread.mul_f64(rng.random_range(0.0..=1.0));
            }
            Ending::RetryAfter(after) => {
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_RECONNECT_DELAY);
                let jitter = rng.random_range((1.0 - RECONNECT_JITTER)..=(1.0 + RECONNECT_JITTER));
                return now + after.max(delay.mul_f64(jitter));
            }
            Ending::Lost => {
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_RECONNECT_DELAY);
                delay
            }
        };
        let delay = match lease_bound(now, earliest_expiry) {
            Some(bound) => delay.min(bound.max(MIN_RECONNECT_DELAY)),
            None => delay,
        };
        now + delay.mul_f64(rng.random_range((1.0 - RECONNECT_JITTER)..=(1.0 + RECONNECT_JITTER)))
    }

    /// How long an attempt started at `now` may wait for its handshake: [`HANDSHAKE_TIMEOUT`],
    /// but while leases are held a sixteenth of the shortest remaining lifetime (at least
    /// [`MIN_HANDSHAKE_TIMEOUT`]), so that a gateway that comes back is tried again soon.
    pub fn handshake_timeout(now: Instant, earliest_expiry: Option<Instant>) -> Duration {
        match lease_bound(now, earliest_expiry) {
            Some(bound) => bound.clamp(MIN_HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT),
            None => HANDSHAKE_TIMEOUT,
        }
    }
}

/// A sixteenth of the time left before `earliest_expiry`, if a lease is held that has not
/// expired.
fn lease_bound(now: Instant, earliest_expiry: Option<Instant>) -> Option<Duration> {
    let left = earliest_expiry?.checked_duration_since(now)?;
    (!left.is_zero()).then(|| left / LEASE_FRACTION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_doubles_to_the_cap_without_leases() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut reconnect = Reconnect::new();
        let now = Instant::now();
        let bases: Vec<f64> = (0..8)
            .map(|_| {
                let at = reconnect.next_attempt(now, Ending::Lost, None, &mut rng);
                at.duration_since(now).as_secs_f64()
            })
            .collect();
        for (delay, base) in bases
            .iter()
            .zip([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        {
            assert!(*delay >= base * 0.8 && *delay <= base * 1.2, "{bases:?}");
        }
    }

    #[test]
    fn a_stable_connection_resets_the_backoff() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut reconnect = Reconnect::new();
        let now = Instant::now();
        for _ in 0..5 {
            reconnect.next_attempt(now, Ending::Lost, None, &mut rng);
        }
        reconnect.connected(now);
        let later = now + STABLE_CONNECTION;
        let next = reconnect.next_attempt(later, Ending::Lost, None, &mut rng);
        assert!(next <= later + FIRST_RECONNECT_DELAY.mul_f64(1.2));
    }

    #[test]
    fn leases_bound_the_delay_and_the_handshake() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut reconnect = Reconnect::new();
        let now = Instant::now();
        for _ in 0..6 {
            reconnect.next_attempt(now, Ending::Lost, None, &mut rng);
        }
        let expiry = now + Duration::from_secs(32);
        let next = reconnect.next_attempt(now, Ending::Lost, Some(expiry), &mut rng);
        assert!(next <= now + Duration::from_secs(2).mul_f64(1.2));
        assert_eq!(
            Reconnect::handshake_timeout(now, Some(expiry)),
            Duration::from_secs(2)
        );
        // Close to the expiry the floors hold.
        let soon = now + Duration::from_millis(100);
        let next = reconnect.next_attempt(now, Ending::Lost, Some(soon), &mut rng);
        assert!(next >= now + MIN_RECONNECT_DELAY.mul_f64(0.8));
        assert_eq!(
            Reconnect::handshake_timeout(now, Some(soon)),
            MIN_HANDSHAKE_TIMEOUT
        );
        // An expiry already past bounds nothing.
        assert_eq!(
            Reconnect::handshake_timeout(now, Some(now)),
            HANDSHAKE_TIMEOUT
        );
        // A GoingAway's wait is the gateway's: no sooner, whatever the leases, and spread by
        // up to half of it.
        for _ in 0..100 {
            let next = reconnect.next_attempt(
                now,
                Ending::GoingAway(Duration::from_secs(30)),
                Some(expiry),
                &mut rng,
            );
            assert!(next >= now + Duration::from_secs(30));
            assert!(next <= now + Duration::from_secs(45));
        }
        let next = reconnect.next_attempt(now, Ending::GoingAway(Duration::ZERO), None, &mut rng);
        assert!(next <= now + Duration::from_secs(1));
    }

    /// A Hello refused rate-limited: the next attempt waits for the gateway's retry-after,
    /// whatever the leases, and the backoff when that is longer.
    #[test]
    fn a_retry_after_is_waited_for_and_the_backoff_still_grows() {
        let mut rng = StdRng::seed_from_u64(4);
        let now = Instant::now();
        let mut reconnect = Reconnect::new();
        let soon = now + Duration::from_secs(2);
        let after = Duration::from_secs(30);
        let next = reconnect.next_attempt(now, Ending::RetryAfter(after), Some(soon), &mut rng);
        assert_eq!(next, now + after);
        for _ in 0..8 {
            reconnect.next_attempt(now, Ending::Lost, None, &mut rng);
        }
        let next = reconnect.next_attempt(now, Ending::RetryAfter(after), None, &mut rng);
        assert!(next >= now + MAX_RECONNECT_DELAY.mul_f64(1.0 - RECONNECT_JITTER));
    }
}
