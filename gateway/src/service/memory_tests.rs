//! What the service keeps per lease beside the book, for a million leases, counted by a global
//! allocator that exists in this crate's unit tests only. The counter is the process's: each
//! part is counted by the bytes its drop frees, a few milliseconds in which tests beside this
//! one change little.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use fwnp_netfilter::Element;
use fwnp_proto::alloc_count::freed_by;
use fwnp_proto::{LeaseId, PortRange, Protocol};
use fwnp_trust::identity::{CertificateName, Serial};

use super::credentials::LeaseCredentials;
use super::kernel::{Holders, hold_change};

fwnp_proto::count_allocations!();

const LEASES: usize = 1_000_000;
const HOSTS: usize = 100;

/// The lease of the `i`th Open of the load generator's prefill: 100 hosts, one TCP port each,
/// any source.
fn lease(i: usize) -> (LeaseId, Element) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    let element = Element {
        host: IpAddr::V4(Ipv4Addr::new(198, 18, 0, (i % HOSTS) as u8)),
        protocol: Protocol::Tcp,
        ports: PortRange::single(1024 + (i / HOSTS) as u16),
        remote: None,
    };
    (LeaseId(id), element)
}

/// The kernel elements' holders with a million leases of an element each (run with
/// `--nocapture` to see the figure).
#[test]
fn a_million_elements_cost_their_holders_at_most_110_bytes_each() {
    let mut holders = Holders::new();
    let expires = 1_800_000_000_000u64;
    for i in 0..LEASES {
        let (id, element) = lease(i);
        assert!(hold_change(&mut holders, &element, id, Some(expires), 0).is_some());
    }
    assert_eq!(holders.len(), LEASES);
    // The map reserves room for its entries up to its index's capacity (near twice as many
    // here): address space that nothing touches, which the gateway's memory does not count.
    // Counted is what holds entries.
    holders.shrink_to_fit();
    let per = freed_by(holders) as f64 / LEASES as f64;
    println!("element holders: {per:.1} bytes per element");
    assert!(per <= 110.0, "{per:.1} bytes per element");
}

/// The certificates of a million leases of 100 hosts, each host under one certificate: one
/// entry per host, none per lease (an entry per lease cost about 50 bytes each).
#[test]
fn a_million_leases_of_100_hosts_cost_their_certificates_nothing_each() {
    let certificates: Vec<Arc<CertificateName>> = (0..HOSTS)
        .map(|h| {
            Arc::new(CertificateName {
                issuer: b"CN=load CA".to_vec(),
                serial: Serial::parse(&format!("{:02X}", h + 1)).expect("serial"),
            })
        })
        .collect();
    let names: Vec<String> = (0..HOSTS)
        .map(|h| format!("host-{h:03}.load.fwnp.test"))
        .collect();
    let mut credentials = LeaseCredentials::default();
    for i in 0..LEASES {
        let (id, _) = lease(i);
        credentials.set(&names[i % HOSTS], id, &certificates[i % HOSTS]);
    }
    assert_eq!(credentials.kept_apart(), 0);
    let (id, _) = lease(7);
    assert_eq!(
        credentials.get(&names[7], &id),
        Some(&certificates[7]),
        "the lease's certificate"
    );
    let per = freed_by(credentials) as f64 / LEASES as f64;
    println!("lease certificates: {per:.2} bytes per lease");
    assert!(per < 1.0, "{per:.2} bytes per lease");
}
