//! The leases a start's restore found live in the store and did not load into the lease book:
//! a second row with an id the book already holds, a lease beyond the most a book holds, or
//! one whose expiry passed between the store's read and the book's. None of them is enforced
//! by this gateway, so none may vanish without a word: each is logged with its id and why,
//! counted in the metrics and audited, as the leases that expired while the gateway was
//! stopped are.

use super::*;
use fwnp_proto::gateway::{Lease, RestoreReport};

/// Why a restored lease was not loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unloaded {
    Duplicate,
    OverCapacity,
    Expired,
}

impl Unloaded {
    /// The metric's label.
    fn name(self) -> &'static str {
        match self {
            Unloaded::Duplicate => "duplicate",
            Unloaded::OverCapacity => "over-capacity",
            Unloaded::Expired => "expired",
        }
    }

    /// For the operator.
    fn why(self) -> &'static str {
        match self {
            Unloaded::Duplicate => "the store holds another live lease with this id",
            Unloaded::OverCapacity => "the lease book is full",
            Unloaded::Expired => "it expired while the gateway was starting",
        }
    }
}

impl Service {
    /// Says what `report` did not load (logs, metrics, audit); returns how many.
    pub(super) fn unloaded_at_restore(&self, report: &RestoreReport, now: u64) -> usize {
        let groups = [
            (Unloaded::Duplicate, &report.duplicates),
            (Unloaded::OverCapacity, &report.over_capacity),
            (Unloaded::Expired, &report.expired),
        ];
        let mut count = 0;
        for (why, leases) in groups {
            for lease in leases.iter() {
                self.unloaded(lease, why, now);
            }
            count += leases.len();
        }
        count
    }

    fn unloaded(&self, lease: &Lease, why: Unloaded, now: u64) {
        warn!(
            lease = %lease.id,
            host = %lease.host,
            why = why.why(),
            "a lease the store holds live was not restored and is not enforced"
        );
        self.metrics
            .restore_unloaded
            .with_label_values(&[why.name()])
            .inc();
        let mut event = AuditEvent::new(now, AuditKind::Reconcile);
        event.actor = Some("gateway".into());
        event.outcome = Some(Outcome::Error);
        event.identity = Some(lease.host.to_string());
        event.lease = Some(lease.id);
        event.grants = lease.grants.clone();
        event.reason = Some(format!("start: lease not restored: {}", why.why()));
        self.record(event);
    }
}
