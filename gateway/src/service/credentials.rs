//! The certificate that last opened or renewed each live lease, so that a CRL reload can revoke
//! the leases of a revoked certificate whose host is not connected.
//!
//! A host opens and renews nearly all its leases under one certificate, so that certificate is
//! kept once per host (its usual one), and a lease is kept on its own only when its certificate
//! is another one, or none is known (a lease stored by a gateway of schema 1, or taken outside a
//! TLS connection). With a million leases of a hundred hosts, an entry per lease cost about 50
//! bytes each; the usual certificates cost nothing per lease.

use std::collections::HashMap;
use std::sync::Arc;

use fwnp_proto::LeaseId;
use fwnp_proto::gateway::LeaseBook;
use fwnp_trust::identity::CertificateName;

/// The certificate of each live lease: each host's usual one, and the leases whose certificate
/// is not their host's usual one.
#[derive(Debug, Default)]
pub(super) struct LeaseCredentials {
    /// The certificate of each host's leases that are not among `others`: the first one seen
    /// for the host since it last held no lease.
    usual: HashMap<Arc<str>, Arc<CertificateName>>,
    /// The leases whose certificate is not their host's usual one (`None`: not known).
    others: HashMap<LeaseId, Option<Arc<CertificateName>>>,
}

impl LeaseCredentials {
    /// Records that `certificate` opened or renewed `lease` of `host`.
    pub(super) fn set(&mut self, host: &str, lease: LeaseId, certificate: &Arc<CertificateName>) {
        let usual = match self.usual.get(host) {
            Some(usual) => usual,
            None => self
                .usual
                .entry(Arc::from(host))
                .or_insert_with(|| certificate.clone()),
        };
        if Arc::ptr_eq(usual, certificate) || **usual == **certificate {
            self.others.remove(&lease);
        } else {
            self.others.insert(lease, Some(certificate.clone()));
        }
    }

    /// Records that no certificate is known for `lease`, so that it is not taken for one of
    /// its host's usual certificate.
    pub(super) fn set_unknown(&mut self, lease: LeaseId) {
        self.others.insert(lease, None);
    }

    /// Forgets an ended lease.
    pub(super) fn forget(&mut self, lease: &LeaseId) {
        self.others.remove(lease);
    }

    /// The certificate that last opened or renewed `lease` of `host`, if known.
    pub(super) fn get(&self, host: &str, lease: &LeaseId) -> Option<&Arc<CertificateName>> {
        match self.others.get(lease) {
            Some(certificate) => certificate.as_ref(),
            None => self.usual.get(host),
        }
    }

    /// Forgets the leases `book` no longer holds (ended by a path that raced with their
    /// renewal) and the usual certificate of each host that holds none, so that the next
    /// certificate of such a host becomes its usual one.
    pub(super) fn retain_in(&mut self, book: &LeaseBook) {
        self.others.retain(|id, _| book.get(id).is_some());
        self.usual.retain(|host, _| book.lease_count(host) > 0);
    }

    /// How many leases are kept on their own, not by their host's usual certificate.
    #[cfg(test)]
    pub(super) fn kept_apart(&self) -> usize {
        self.others.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_trust::identity::Serial;

    fn certificate(serial: &str) -> Arc<CertificateName> {
        Arc::new(CertificateName {
            issuer: b"issuer".to_vec(),
            serial: Serial::parse(serial).expect("serial"),
        })
    }

    #[test]
    fn a_lease_has_the_certificate_that_last_opened_or_renewed_it() {
        let (first, second) = (certificate("01"), certificate("02"));
        let (a, b, c) = (LeaseId([1; 16]), LeaseId([2; 16]), LeaseId([3; 16]));
        let mut credentials = LeaseCredentials::default();
        credentials.set("h", a, &first);
        credentials.set("h", b, &first);
        assert_eq!(credentials.get("h", &a), Some(&first));
        assert_eq!(credentials.kept_apart(), 0);
        // An equal name in another Arc is the same certificate.
        credentials.set("h", b, &certificate("01"));
        assert_eq!(credentials.kept_apart(), 0);
        // Renewed under another certificate: that one, for this lease only.
        credentials.set("h", b, &second);
        assert_eq!(credentials.get("h", &b), Some(&second));
        assert_eq!(credentials.get("h", &a), Some(&first));
        // Back under the usual one.
        credentials.set("h", b, &first);
        assert_eq!(credentials.get("h", &b), Some(&first));
        assert_eq!(credentials.kept_apart(), 0);
        // A lease of no known certificate stays unknown whatever its host's others have.
        credentials.set_unknown(c);
        assert_eq!(credentials.get("h", &c), None);
        // Another host's usual certificate is its own.
        credentials.set("g", c, &second);
        assert_eq!(credentials.get("g", &c), Some(&second));
        credentials.forget(&c);
        assert_eq!(credentials.get("g", &c), Some(&second));
        // Unknown host, unknown lease.
        assert_eq!(credentials.get("x", &LeaseId([9; 16])), None);
    }

    #[test]
    fn a_host_without_leases_takes_its_next_certificate_as_usual() {
        let (first, second) = (certificate("01"), certificate("02"));
        let mut credentials = LeaseCredentials::default();
        credentials.set("h", LeaseId([1; 16]), &first);
        credentials.forget(&LeaseId([1; 16]));
        credentials.retain_in(&LeaseBook::new());
        credentials.set("h", LeaseId([2; 16]), &second);
        assert_eq!(credentials.get("h", &LeaseId([2; 16])), Some(&second));
        assert_eq!(credentials.kept_apart(), 0);
    }
}
