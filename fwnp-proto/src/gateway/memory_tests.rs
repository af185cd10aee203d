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

/// Held by each test here while it counts: each allocates enough to spoil the other's count.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn counting() -> std::sync::MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(|e| e.into_inner())
}

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
/// for both the host and (host, grants), its entries carrying their fingerprint, 224; with the
/// leases in chunks and the id index's entries carrying their hash, so that the book grows
/// without stopping, 228.
#[test]
fn a_million_leases_cost_the_book_at_most_232_bytes_each() {
    let _counting = counting();
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
        ("by id (positions, hashes)", freed_by(by_id)),
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

/// Allows every opening on the host's own addresses, as the load generator's policy does.
struct AllowAll;

const LIFETIME: LifetimePolicy = LifetimePolicy {
    min: 1,
    max: 86_400,
    default: 3600,
};

impl request::Decide for AllowAll {
    fn host_limits(&self, _: &str, _: &[IpAddr]) -> request::HostLimits {
        request::HostLimits {
            lifetime: LIFETIME,
            max_leases: 100_000,
            third_party: false,
        }
    }

    fn evaluate(&self, _: &str, _: &[IpAddr], hosts: &[IpAddr], open: &Open) -> request::Decision {
        let Target::Ports { protocol, ports } = open.opening.target.clone() else {
            return request::Decision::denied(ResultCode::UnknownApplication, "no catalogue");
        };
        let grants = hosts
            .iter()
            .map(|&host| Grant {
                protocol,
                ports,
                host,
                remotes: Vec::new(),
                app: None,
            })
            .collect();
        request::Decision {
            rule: Some("load-any-tcp".into()),
            ..request::Decision::allowed(PolicyFacts {
                grants,
                grants_narrowed: false,
                lifetime: LIFETIME,
                max_leases: Some(100_000),
            })
        }
    }

    fn still_allows(
        &self,
        _: &str,
        _: &[IpAddr],
        _: &[Grant],
    ) -> Result<LifetimePolicy, request::Objection> {
        Ok(LIFETIME)
    }
}

/// How many heap allocations the request core makes for one new lease, from the Open's bytes
/// to its Granted answer, with the effects the driver carries out dropped (their contents are
/// the driver's to move on): the request decoded, the policy's grants, the lease the book keeps
/// and the one it gives back, the store's row and the audit record's copies of it, the kernel's
/// grants and the answer. The counter is the process's: the fewest of 150 short rounds leaves
/// out what tests beside this one allocated meanwhile (of thirty, every one overlapped another
/// test once, on a loaded machine; run with `--nocapture` to see the figure).
#[test]
fn a_new_lease_costs_the_request_core_a_bounded_number_of_allocations() {
    use crate::alloc_count::allocations;
    use crate::codec;
    use crate::message::Message;
    use request::{ConnectionState, CoreConfig, Peer, RequestCore, Step};

    const OPENS: usize = 3000;
    let _counting = counting();
    let mut core = RequestCore::new(CoreConfig {
        epoch: 7,
        max_streams: 100,
        kill_connections: false,
    });
    let addresses = [IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))];
    let peer = Peer {
        identity: Some("fwnp://host/load-0"),
        no_identity: "",
        remote: "198.18.0.1:50000".parse().expect("address"),
        addresses: &addresses,
    };
    let opens: Vec<Vec<u8>> = (0..2 * OPENS)
        .map(|i| {
            codec::encode(&Message::Open(Open {
                common: Common {
                    request_id: Some(i as u64 + 1),
                    critical: Vec::new(),
                },
                opening: Opening {
                    target: Target::Ports {
                        protocol: Protocol::Tcp,
                        ports: PortRange::single(1024 + i as u16),
                    },
                    host: None.into(),
                    family: None,
                    remotes: Vec::new(),
                },
                lifetime: Some(3600),
                app: None,
            }))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(18);
    let now = 1_800_000_000_000u64;
    let welcomed = ConnectionState { welcomed: true };
    let mut grant = |core: &mut RequestCore, open: &[u8]| {
        let Step::Pending(mut pending) =
            core.handle(now, welcomed, &peer, open, &AllowAll, &mut rng)
        else {
            panic!("a new lease waits for its effects");
        };
        drop(pending.take_effects());
        let answer = core.finish(now, pending, Ok(()));
        assert!(matches!(answer.message, Message::Granted(_)), "{answer:?}");
    };
    // The first half grows the book to where the second half's inserts rarely grow it.
    let (warm, measured) = opens.split_at(OPENS);
    for open in warm {
        grant(&mut core, open);
    }
    let mut per = f64::MAX;
    for round in measured.chunks(OPENS / 150) {
        let before = allocations();
        for open in round {
            grant(&mut core, open);
        }
        per = per.min((allocations() - before) as f64 / round.len() as f64);
    }
    println!("request core allocations per new lease: {per:.2}");
    assert_eq!(core.book().len(), 2 * OPENS);
    // 20.2 when the core copied the lease and its grants for each of its uses, and the Open
    // and the host's name for its own record.
    assert!(per <= 16.5, "{per:.2} allocations per new lease");
}
