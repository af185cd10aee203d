//! What the service keeps per lease beside the book, for a million leases, counted by a global
//! allocator that exists in this crate's unit tests only. The counter is the process's: each
//! part is counted by the bytes its drop frees, a few milliseconds in which tests beside this
//! one change little.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use fwnp_netfilter::Element;
use fwnp_proto::alloc_count::{allocations, freed_by};
use fwnp_proto::{LeaseId, PortRange, Protocol};
use fwnp_trust::identity::{CertificateName, Serial};

use super::credentials::LeaseCredentials;
use super::kernel::{Holders, hold_change};
use super::request_tests::{hello, load_session, open, unfiltered_service};

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
/// `--nocapture` to see the figure): 98.9 bytes measured. With smallvec's inline holder beside
/// its length instead of in a union with the heap's pointer, 106.9.
#[test]
fn a_million_elements_cost_their_holders_at_most_100_bytes_each() {
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
    assert!(per <= 100.0, "{per:.1} bytes per element");
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

/// How many heap allocations (and reallocations) the whole gateway makes for one grant: the
/// request's decoding, policy, book, store commit (writer thread and SQLite included), audit
/// record and the answer's encoding, counted over 900 Opens of one host (after 900 more) on a service with its SQLite
/// store and without a kernel filter. Each allocation is a cost on the request path and a
/// free on another thread; the bound keeps them from creeping back (run with `--nocapture`
/// to see the figure).
#[test]
fn a_grant_costs_a_bounded_number_of_allocations() {
    use fwnp_proto::{Message, codec};

    // Within the default rate limit's burst (2,000 requests of a host).
    const GRANTS: usize = 900;
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let service = unfiltered_service(dir.path()).await;
        let session = load_session();
        assert!(matches!(
            service.handle(&session, &hello(0)).await,
            Message::Welcome(_)
        ));
        // As the transport does once it has written the Welcome.
        assert!(session.welcome_written());
        let opens: Vec<Vec<u8>> = (0..2 * GRANTS).map(|i| open(i as u16)).collect();
        // The first half warms up what grows once (the book, the statements, the caches).
        let (warm, measured) = opens.split_at(GRANTS);
        for open in warm {
            assert!(matches!(
                service.handle(&session, open).await,
                Message::Granted(_)
            ));
        }
        // The counter is the process's: the fewest of nine short rounds leaves out what tests
        // beside this one allocated meanwhile (of three long ones, every one could overlap
        // another test on a loaded machine).
        let mut per = f64::MAX;
        for round in measured.chunks(GRANTS / 9) {
            let before = allocations();
            for open in round {
                let answer = service.handle(&session, open).await;
                assert!(matches!(answer, Message::Granted(_)), "{answer:?}");
                // The answer's bytes, as the stream sends them.
                assert!(!codec::encode(&answer).is_empty());
            }
            let made = allocations() - before;
            per = per.min(made as f64 / round.len() as f64);
        }
        println!("allocations per grant: {per:.1}");
        // 51 without the answer's encoding before the request path moved its writes into the
        // store's operations instead of copying them, borrowed its rate key, the host's
        // addresses and the policy's allowance, kept a lease's kernel elements inline, and the
        // codec wrote answers without a tree of values first; 37 before the request core
        // stopped copying the lease and its grants for each of their uses and the host's name
        // and the Open for its own record, and the rate limiter's key was made once per
        // connection rather than per request; 32 before the store writer's text buffers were
        // made at the size a grant's text takes instead of grown from empty.
        assert!(per <= 30.5, "{per:.1} allocations per grant");
    });
}
