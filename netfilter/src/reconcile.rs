//! The pure part of reconciling: what to change so that the kernel holds what is desired.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use hashbrown::HashTable;

use crate::{Element, Error};

/// The changes that bring `current` to `desired`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plan {
    /// Desired but absent.
    pub(crate) add: Vec<(Element, Duration)>,
    /// Present but not desired.
    pub(crate) remove: Vec<Element>,
    /// Present and desired, but the remaining time is longer than the desired one (by more
    /// than [`OVERSHOOT`]) or far shorter (by more than [`tolerance`]).
    pub(crate) refresh: Vec<(Element, Duration)>,
    /// Desired openings that cannot be held, with the reason.
    pub(crate) invalid: Vec<(Element, Error)>,
}

/// How far the kernel's remaining time may fall short of the desired one before it is
/// refreshed: a twentieth of the desired lifetime, and at least two seconds (a dump and a commit
/// take time, and renewing for nothing costs a kernel transaction). Falling short closes an
/// opening early, which the next renewal or repair corrects.
pub(crate) fn tolerance(desired: Duration) -> Duration {
    (desired / 20).max(Duration::from_secs(2))
}

/// How far the kernel's remaining time may exceed the desired one: an opening must not outlive
/// its lease by more than about a second, whether or not the process that keeps it is alive
/// (a renewal that reached the kernel but not the store, for example). What the kernel reports
/// is read after the desired times were computed, so it only ever comes out shorter for an
/// element that matches; half a second absorbs the kernel's rounding to jiffies.
pub(crate) const OVERSHOOT: Duration = Duration::from_millis(500);

/// Whether an element the kernel holds with `remaining` time must be refreshed to the desired
/// `lifetime`: it would outlive it by more than [`OVERSHOOT`], or fall short of it by more
/// than [`tolerance`].
pub(crate) fn needs_refresh(remaining: Duration, lifetime: Duration) -> bool {
    let too_long = remaining > lifetime.saturating_add(OVERSHOOT);
    let too_short = lifetime.saturating_sub(remaining) > tolerance(lifetime);
    too_long || too_short
}

/// Compares canonical openings. `current` is what the kernel reported (already canonical);
/// `desired` may repeat an opening (the last lifetime counts, in the order of its first
/// appearance) or be non-canonical.
///
/// `desired` is taken by value and becomes the list of what to add: its openings are made
/// canonical and deduplicated where they lie, with a table of their positions beside them,
/// so that a million openings at a start are held once rather than in a list, a map of the
/// wanted ones and a list of what to add, each a copy of the one before.
pub(crate) fn plan(current: &[(Element, Duration)], mut desired: Vec<(Element, Duration)>) -> Plan {
    let mut out = Plan::default();
    desired.retain_mut(|(opening, _)| match opening.canonical() {
        Ok(canonical) => {
            *opening = canonical;
            true
        }
        Err(e) => {
            out.invalid.push((opening.clone(), e));
            false
        }
    });
    // The positions of the distinct openings, by the opening's hash; the distinct ones are
    // moved to the front as they are met, so a position is final once it is in the table.
    let hasher = RandomState::new();
    let mut positions: HashTable<usize> = HashTable::with_capacity(desired.len());
    let mut kept = 0;
    for next in 0..desired.len() {
        let hash = hasher.hash_one(&desired[next].0);
        if let Some(&first) = positions.find(hash, |&at| desired[at].0 == desired[next].0) {
            desired[first].1 = desired[next].1;
            continue;
        }
        desired.swap(kept, next);
        positions.insert_unique(hash, kept, |&at| hasher.hash_one(&desired[at].0));
        kept += 1;
    }
    desired.truncate(kept);
    if current.is_empty() {
        out.add = desired;
        return out;
    }
    let mut present: HashMap<&Element, Duration> = HashMap::with_capacity(current.len());
    for (opening, remaining) in current {
        present.insert(opening, *remaining);
        let hash = hasher.hash_one(opening);
        if positions
            .find(hash, |&at| desired[at].0 == *opening)
            .is_none()
        {
            out.remove.push(opening.clone());
        }
    }
    drop(positions);
    desired.retain(|(opening, lifetime)| match present.get(opening) {
        None => true,
        Some(remaining) => {
            if needs_refresh(*remaining, *lifetime) {
                out.refresh.push((opening.clone(), *lifetime));
            }
            false
        }
    });
    out.add = desired;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::{PortRange, Prefix, Protocol};

    fn tcp(port: u16) -> Element {
        Element {
            host: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            remote: None,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn adds_removes_and_refreshes() {
        let current = vec![(tcp(1), secs(100)), (tcp(2), secs(100)), (tcp(3), secs(10))];
        let desired = vec![(tcp(1), secs(101)), (tcp(3), secs(100)), (tcp(4), secs(50))];
        let plan = plan(&current, desired);
        assert_eq!(plan.add, vec![(tcp(4), secs(50))]);
        assert_eq!(plan.remove, vec![tcp(2)]);
        assert_eq!(plan.refresh, vec![(tcp(3), secs(100))]);
        assert!(plan.invalid.is_empty());
    }

    #[test]
    fn a_remaining_time_longer_than_desired_is_brought_down() {
        // Within the old symmetric tolerance (180 s for an hour) but 100 s past the lease.
        let current = vec![
            (tcp(1), secs(3700)),
            (tcp(2), secs(3600)),
            (tcp(3), Duration::MAX),
        ];
        let desired = vec![
            (tcp(1), secs(3600)),
            (tcp(2), Duration::from_millis(3_599_700)),
            (tcp(3), secs(60)),
        ];
        let plan = plan(&current, desired);
        assert_eq!(plan.refresh, vec![(tcp(1), secs(3600)), (tcp(3), secs(60))]);
    }

    #[test]
    fn nothing_to_do_when_equal() {
        // The kernel a little short of the desired time (it is read later): left alone.
        let current = vec![(tcp(1), secs(3590))];
        let plan = plan(&current, vec![(tcp(1), secs(3600))]);
        assert!(
            plan.add.is_empty()
                && plan.remove.is_empty()
                && plan.refresh.is_empty()
                && plan.invalid.is_empty()
        );
    }

    #[test]
    fn compares_canonical_forms_and_dedups() {
        let mut messy = tcp(5);
        messy.remote = Some(Prefix {
            addr: "0.0.0.0".parse().unwrap(),
            len: 0,
        });
        let current = vec![(tcp(5), secs(60))];
        let plan = plan(&current, vec![(messy.clone(), secs(60)), (messy, secs(60))]);
        assert!(
            plan.add.is_empty()
                && plan.remove.is_empty()
                && plan.refresh.is_empty()
                && plan.invalid.is_empty()
        );
    }

    #[test]
    fn reports_invalid_desired_openings() {
        let mut bad = tcp(6);
        bad.ports = PortRange { first: 9, last: 1 };
        let plan = plan(&[], vec![(bad.clone(), secs(5))]);
        assert_eq!(plan.invalid.len(), 1);
        assert_eq!(plan.invalid[0].0, bad);
        assert!(plan.add.is_empty());
    }

    #[test]
    fn tolerance_grows_with_lifetime() {
        assert_eq!(tolerance(secs(10)), secs(2));
        assert_eq!(tolerance(secs(3600)), secs(180));
    }
}
