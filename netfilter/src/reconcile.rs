//! The pure part of reconciling: what to change so that the kernel holds what is desired.

use std::collections::HashMap;
use std::time::Duration;

use crate::{Error, Opening};

/// The changes that bring `current` to `desired`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plan {
    /// Desired but absent.
    pub(crate) add: Vec<(Opening, Duration)>,
    /// Present but not desired.
    pub(crate) remove: Vec<Opening>,
    /// Present and desired, but the remaining time is far from the desired one.
    pub(crate) refresh: Vec<(Opening, Duration)>,
    /// Desired openings that cannot be held, with the reason.
    pub(crate) invalid: Vec<(Opening, Error)>,
}

/// How far the kernel's remaining time may drift from the desired one before it is refreshed:
/// a twentieth of the desired lifetime, and at least two seconds (a dump and a commit take
/// time, and renewing for nothing costs a kernel transaction).
pub(crate) fn tolerance(desired: Duration) -> Duration {
    (desired / 20).max(Duration::from_secs(2))
}

/// Compares canonical openings. `current` is what the kernel reported (already canonical);
/// `desired` may repeat an opening (the last one counts) or be non-canonical.
pub(crate) fn plan(current: &[(Opening, Duration)], desired: &[(Opening, Duration)]) -> Plan {
    let mut out = Plan::default();
    let mut wanted: HashMap<Opening, Duration> = HashMap::with_capacity(desired.len());
    let mut order: Vec<Opening> = Vec::with_capacity(desired.len());
    for (opening, lifetime) in desired {
        match opening.canonical() {
            Ok(canonical) => {
                if wanted.insert(canonical.clone(), *lifetime).is_none() {
                    order.push(canonical);
                }
            }
            Err(e) => out.invalid.push((opening.clone(), e)),
        }
    }
    let mut present: HashMap<&Opening, Duration> = HashMap::with_capacity(current.len());
    for (opening, remaining) in current {
        present.insert(opening, *remaining);
        if !wanted.contains_key(opening) {
            out.remove.push(opening.clone());
        }
    }
    for opening in order {
        let Some(lifetime) = wanted.get(&opening).copied() else {
            continue;
        };
        match present.get(&opening) {
            None => out.add.push((opening, lifetime)),
            Some(remaining) => {
                if remaining.abs_diff(lifetime) > tolerance(lifetime) {
                    out.refresh.push((opening, lifetime));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::{PortRange, Prefix, Protocol};

    fn tcp(port: u16) -> Opening {
        Opening {
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
        let plan = plan(&current, &desired);
        assert_eq!(plan.add, vec![(tcp(4), secs(50))]);
        assert_eq!(plan.remove, vec![tcp(2)]);
        assert_eq!(plan.refresh, vec![(tcp(3), secs(100))]);
        assert!(plan.invalid.is_empty());
    }

    #[test]
    fn nothing_to_do_when_equal() {
        let current = vec![(tcp(1), secs(3600))];
        let plan = plan(&current, &[(tcp(1), secs(3590))]);
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
        let plan = plan(&current, &[(messy.clone(), secs(60)), (messy, secs(60))]);
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
        let plan = plan(&[], &[(bad.clone(), secs(5))]);
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
