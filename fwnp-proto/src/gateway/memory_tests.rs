//! What a million leases cost the book, by index, counted by a global allocator that exists in
//! this crate's unit tests only. The counter is the process's: each part is counted by the bytes
//! its drop frees, a few milliseconds in which tests beside this one change little.

use std::net::{IpAddr, Ipv4Addr};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::alloc_count::{freed_by, live};
use crate::message::{Opening, PortRange, Protocol, Target};

crate::count_allocations!();

const LEASES: usize = 1_000_000;
const HOSTS: usize = 100;

/// A book the way the load generator's prefill leaves it: a million Opens from 100 hosts, one
/// TCP port each, no remote restriction, no application.
fn full_book() -> LeaseBook {
    let facts = |host: usize, port: u16| PolicyFacts {
        grants: vec![Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            host: IpAddr::V4(Ipv4Addr::new(198, 18, 0, host as u8)),
            remotes: Vec::new(),
            app: None,
        }],
        grants_narrowed: false,
        lifetime: LifetimePolicy {
            min: 1,
            max: 86_400,
            default: 3600,
        },
        max_leases: None,
    };
    let names: Vec<String> = (0..HOSTS)
        .map(|h| format!("host-{h:03}.load.fwnp.test"))
        .collect();
    let mut rng = StdRng::seed_from_u64(18);
    let mut book = LeaseBook::new();
    let start = 1_800_000_000_000u64;
    for i in 0..LEASES {
        let host = i % HOSTS;
        let port = 1024 + (i / HOSTS) as u16;
        let open = Open {
            common: Common::default(),
            opening: Opening {
                target: Target::Ports {
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(port),
                },
                host: None.into(),
                family: None,
                remotes: Vec::new(),
            },
            lifetime: Some(3600),
            app: None,
        };
        let now = start + (i / 20) as u64;
        let outcome = book.open(now, &names[host], &open, &facts(host, port), &mut rng);
        assert!(
            matches!(outcome, Ok(OpenOutcome::NewLease(_))),
            "{outcome:?}"
        );
    }
    book
}

/// The book's own share of a gateway's memory with a million live leases, by index (run with
/// `--nocapture` to see the figures). A book whose leases lay in a hash map keyed by id, with a
/// map of fingerprints to ids beside, took 438 bytes per lease here; with ids in its expiry set
/// and ordered sets of ids by host, 262; with positions in both, 228; with one index by host
/// for both the host and (host, grants), its entries carrying their fingerprint, 224.
#[test]
fn a_million_leases_cost_the_book_at_most_232_bytes_each() {
    let before = live();
    let book = full_book();
    let filled = usize::try_from(live() - before).unwrap_or(0);
    assert_eq!(book.len(), LEASES);

    let LeaseBook {
        leases,
        by_id,
        expiry,
        hosts,
        hash_keys: _,
    } = book;
    let records = leases.capacity() * std::mem::size_of::<Lease>();
    let with_grants = freed_by(leases);
    let parts = [
        ("lease records (vector)", records),
        ("grants (heap of each lease)", with_grants - records),
        ("by id (positions)", freed_by(by_id)),
        ("by expiry (ordered set of positions)", freed_by(expiry)),
        ("by host, (host, grants) (positions)", freed_by(hosts)),
    ];
    let per = |bytes: usize| bytes as f64 / LEASES as f64;
    for (part, bytes) in parts {
        println!("{part:32} {:7.1} bytes per lease", per(bytes));
    }
    let total: usize = parts.iter().map(|(_, bytes)| bytes).sum();
    println!("{:32} {:7.1} bytes per lease", "total", per(total));
    // What filling the book left allocated is the parts and a few host names (give or take
    // what tests beside this one held meanwhile): nothing big escapes the count.
    println!(
        "{:32} {:7.1} bytes per lease",
        "(left allocated by filling)",
        per(filled)
    );
    assert!(per(filled.abs_diff(total)) < 8.0, "{filled} vs {total}");
    assert!(per(total) <= 232.0, "{:.1} bytes per lease", per(total));
}
