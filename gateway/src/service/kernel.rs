//! The kernel side of leases: the elements of a grant, the leases that hold each element, and
//! the changes that bring the kernel to them.

use fwnp_netfilter::{DesiredState, ElementMap};
use smallvec::SmallVec;

use super::*;

/// Kernel elements and the leases that hold them, with each lease's expiry. There is an element
/// per live lease or more, so the map keeps its entries side by side and hashes only their
/// positions: a hash table of whole entries stays up to half empty, and its empty slots cost an
/// entry's size each (a million elements: about 150 bytes each in a `HashMap` of `Vec`s, 100 in
/// this); and it grows a part at a time, with the lock held for well under a millisecond.
/// Nearly every element has one holder, kept inline instead of on the heap.
pub(super) type Holders = ElementMap<SmallVec<[(LeaseId, u64); 1]>>;

/// Sets (`Some` expiry) or drops (`None`) a lease's hold on an element, and says what the
/// kernel must do for it: set its timeout to the latest expiry of its holders when that
/// changed, remove it when nobody holds it any more.
pub(super) fn hold_change(
    holders: &mut Holders,
    element: &Element,
    lease: LeaseId,
    expires_ms: Option<u64>,
    now: u64,
) -> Option<Change> {
    let held = holders.get_or_default(element);
    let before = held.iter().map(|(_, expires)| *expires).max();
    held.retain(|(holder, _)| *holder != lease);
    if let Some(expires) = expires_ms {
        held.push((lease, expires));
    }
    let after = held.iter().map(|(_, expires)| *expires).max();
    if held.is_empty() {
        holders.remove(element);
    }
    match (before, after) {
        (Some(_), None) => Some(Change::Remove(element.clone())),
        // The kernel never takes a zero timeout (it would mean "forever").
        (_, Some(latest)) if before != after => Some(Change::Renew(
            element.clone(),
            remaining(latest, now).max(Duration::from_millis(1)),
        )),
        _ => None,
    }
}

/// Why the elements of a renewed or extended lease were not refreshed.
#[derive(Debug, thiserror::Error)]
pub(super) enum RefreshError {
    /// The kernel refused.
    #[error(transparent)]
    Kernel(#[from] fwnp_netfilter::Error),
    /// The lease was revoked while its elements were being refreshed.
    #[error("the lease ended while its opening was being programmed")]
    LeaseEnded,
}

/// The kernel elements of a lease's grants, in the form the kernel holds them (so that two
/// grants the kernel holds as one element share its holders); nearly every lease has one or
/// two, kept inline. An element the kernel cannot hold stays as it is, for the kernel to refuse.
pub(super) fn elements_of_all(grants: &[Grant]) -> SmallVec<[Element; 2]> {
    grants
        .iter()
        .flat_map(Element::of_grant)
        .map(|element| element.canonical().unwrap_or(element))
        .collect()
}

/// The elements held at `now_ms`, each with the time left to its latest holder's expiry.
pub(super) fn held_openings(holders: &Holders, now_ms: u64) -> Vec<(Element, Duration)> {
    // Made room for at once: grown by doubling, a million elements' list freed some 60 MB of
    // outgrown copies at a start, which the allocator keeps.
    let mut openings = Vec::with_capacity(holders.len());
    openings.extend(holders.iter().filter_map(|(element, held)| {
        let latest = held.iter().map(|(_, expires)| *expires).max()?;
        (latest > now_ms).then(|| (element.clone(), remaining(latest, now_ms)))
    }));
    openings
}

/// The kernel batcher's desired state is what the leases hold: read from the holders when the
/// batcher repairs the table, instead of kept as a second copy of every element in the batcher
/// (75 bytes an element). Every new element is asked for with `Renew` (see [`hold_change`]),
/// which the batcher's [`DesiredState`] asks of an owner.
pub(super) struct HeldElements(pub(super) Arc<Mutex<Holders>>);

impl DesiredState for HeldElements {
    fn count(&self) -> usize {
        lock(&self.0).len()
    }

    fn openings(&self) -> Vec<(Element, Duration)> {
        let now = now_ms();
        held_openings(&lock(&self.0), now)
    }
}

pub(super) fn remaining(expires_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(expires_ms.saturating_sub(now_ms))
}

impl Service {
    /// Sets (`Some` expiry) or drops (`None`) a lease's hold on its elements and brings the
    /// kernel to the result (see [`hold_change`]). The changes are queued under the lock, so
    /// that the kernel sees them in the order they were decided, whoever decided them. Returns
    /// the elements it removed from the kernel, and the first failure.
    pub(super) async fn hold(
        &self,
        lease: &LeaseId,
        elements: &[Element],
        expires_ms: Option<u64>,
    ) -> (Vec<Element>, Option<fwnp_netfilter::Error>) {
        let Some(filter) = &self.filter else {
            return (Vec::new(), None);
        };
        let now = now_ms();
        let queued: SmallVec<[_; 2]> = {
            let mut holders = lock(&self.holders);
            elements
                .iter()
                .filter_map(|element| hold_change(&mut holders, element, *lease, expires_ms, now))
                .map(|change| (change.clone(), filter.submit(change)))
                .collect()
        };
        let mut removed = Vec::new();
        let mut failure = None;
        for (change, outcome) in queued {
            match (change, outcome.await) {
                (
                    Change::Remove(element),
                    Ok(()) | Err(fwnp_netfilter::Error::ElementMissing(_)),
                ) => removed.push(element),
                // A kernel that renews by delete and add fails on an element that is gone. It
                // is added again only if a lease still holds it, and under the lock like every
                // change: a revocation that gave it up meanwhile has its removal queued before
                // this add is decided, and one that comes after queues its removal after it.
                // Added outside the lock, a removal queued in between would be undone, and the
                // element would stay until the renewed expiry with no lease holding it.
                (Change::Renew(element, _), Err(fwnp_netfilter::Error::ElementMissing(_))) => {
                    let add = {
                        let holders = lock(&self.holders);
                        holders
                            .get(&element)
                            .and_then(|held| held.iter().map(|(_, expires)| *expires).max())
                            .map(|latest| {
                                let timeout =
                                    remaining(latest, now_ms()).max(Duration::from_millis(1));
                                filter.submit(Change::Add(element, timeout))
                            })
                    };
                    if let Some(add) = add {
                        match add.await {
                            Ok(()) | Err(fwnp_netfilter::Error::ElementExists(_)) => {}
                            Err(e) => failure = failure.or(Some(e)),
                        }
                    }
                }
                (_, Ok(())) => {}
                (_, Err(e)) => failure = failure.or(Some(e)),
            }
        }
        (removed, failure)
    }

    /// Makes a live lease hold its elements until `expires_ms` (adding any that are missing).
    /// A revocation may have ended the lease meanwhile and given its elements up before they
    /// were taken again here: then they are given up again, and the answer is `LeaseEnded`.
    pub(super) async fn refresh(
        &self,
        lease: &LeaseId,
        elements: &[Element],
        expires_ms: u64,
    ) -> Result<(), RefreshError> {
        let (_, failure) = self.hold(lease, elements, Some(expires_ms)).await;
        // A revocation takes the lease out of the book before it gives up the elements, so a
        // lease still in the book now cannot have lost them to one.
        if lock(&self.core).book().get(lease).is_none() {
            let _ = self.hold(lease, elements, None).await;
            return Err(RefreshError::LeaseEnded);
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Gives up an ended lease's elements; those no other lease holds leave the kernel, and
    /// (`kill`) their live connections are ended.
    pub(super) async fn remove_elements(&self, lease: &LeaseId, grants: &[Grant], kill: bool) {
        let Some(filter) = &self.filter else { return };
        let (removed, failure) = self.hold(lease, &elements_of_all(grants), None).await;
        if let Some(e) = failure {
            warn!(lease = %lease, "removing elements from the kernel failed: {e}");
        }
        if kill {
            for element in removed {
                if let Err(e) = filter.kill_connections(element.clone()).await {
                    warn!("ending the connections of {element:?} failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Change, Element, Holders, elements_of_all, held_openings, hold_change};
    use fwnp_proto::{Grant, LeaseId, PortRange, Protocol};
    use std::time::Duration;

    /// Two grants the kernel holds as one element (a remote prefix of length 0 admits every
    /// source, as no prefix does) are one element to their holders: the kernel's element stays
    /// while either lease holds it. Held apart, the first lease to end removed the other's
    /// opening from the kernel.
    #[test]
    fn grants_the_kernel_holds_as_one_element_share_its_holders() {
        let grant = |remotes: Vec<fwnp_proto::Prefix>| Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(443),
            host: "10.0.0.1".parse().unwrap(),
            remotes,
            app: None,
        };
        let anyone = elements_of_all(&[grant(Vec::new())]);
        let everyone = elements_of_all(&[grant(vec!["0.0.0.0/0".parse().unwrap()])]);
        assert_eq!(anyone, everyone);
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let mut holders = Holders::new();
        assert!(hold_change(&mut holders, &anyone[0], a, Some(60_000), 0).is_some());
        assert_eq!(
            hold_change(&mut holders, &everyone[0], b, Some(60_000), 0),
            None
        );
        assert_eq!(hold_change(&mut holders, &anyone[0], a, None, 1_000), None);
        assert_eq!(
            held_openings(&holders, 1_000),
            vec![(everyone[0].clone(), Duration::from_millis(59_000))]
        );
        assert_eq!(
            hold_change(&mut holders, &everyone[0], b, None, 1_000),
            Some(Change::Remove(everyone[0].clone()))
        );
    }

    #[test]
    fn the_held_openings_leave_out_those_whose_holders_have_all_expired() {
        let element = |port| Element {
            host: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            remote: None,
        };
        let mut holders = Holders::new();
        hold_change(&mut holders, &element(80), LeaseId([1; 16]), Some(5_000), 0);
        hold_change(
            &mut holders,
            &element(81),
            LeaseId([2; 16]),
            Some(10_000),
            0,
        );
        hold_change(&mut holders, &element(81), LeaseId([3; 16]), Some(4_000), 0);
        assert_eq!(
            held_openings(&holders, 5_000),
            vec![(element(81), Duration::from_millis(5_000))]
        );
    }

    #[test]
    fn an_element_follows_the_latest_expiry_of_its_holders_and_goes_with_the_last() {
        let element = Element {
            host: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange::single(80),
            remote: None,
        };
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let mut holders = Holders::new();
        let renew = |ms: u64| Some(Change::Renew(element.clone(), Duration::from_millis(ms)));
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(60_000), 0),
            renew(60_000)
        );
        // A later holder lengthens it; an earlier one changes nothing.
        assert_eq!(
            hold_change(&mut holders, &element, b, Some(600_000), 0),
            renew(600_000)
        );
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(90_000), 0),
            None
        );
        // The latest holder goes: cut back to the other's expiry, not removed.
        assert_eq!(
            hold_change(&mut holders, &element, b, None, 1_000),
            renew(89_000)
        );
        // Giving up what one does not hold changes nothing; the last holder removes it.
        assert_eq!(hold_change(&mut holders, &element, b, None, 1_000), None);
        assert_eq!(
            hold_change(&mut holders, &element, a, None, 1_000),
            Some(Change::Remove(element.clone()))
        );
        assert!(holders.is_empty());
        // An expiry already past still gives the kernel a timeout it accepts.
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(500), 1_000),
            renew(1)
        );
    }
}
