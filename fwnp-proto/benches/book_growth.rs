//! How long a request waits on the lease book while the book grows: a book filled by
//! 2,000,000 Opens from 100 hosts, each Open timed alone. The slowest Opens are those that
//! found an index or the leases' storage full; a request's task holds the book's lock
//! meanwhile, so every other request waits as long.
//!
//! Run: `cargo bench -p fwnp-proto --bench book_growth` (prints the slowest Opens, with the
//! book's size when each happened, and how many took over 100 µs and over 1 ms). The gateway's
//! allocator is used, as built for the gateway.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use fwnp_proto::gateway::{LeaseBook, LifetimePolicy, PolicyFacts};
use fwnp_proto::message::{Common, Grant, Open, Opening, PortRange, Protocol, Target};
use rand::SeedableRng;
use rand::rngs::StdRng;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const OPENS: usize = 2_000_000;
const HOSTS: usize = 100;

fn main() {
    let lifetime = LifetimePolicy {
        min: 1,
        max: 86_400,
        default: 3600,
    };
    let names: Vec<String> = (0..HOSTS)
        .map(|h| format!("host-{h:03}.load.fwnp.test"))
        .collect();
    let mut rng = StdRng::seed_from_u64(18);
    let mut book = LeaseBook::new();
    let start = 1_800_000_000_000u64;
    let mut times: Vec<(Duration, usize)> = Vec::with_capacity(OPENS);
    let began = Instant::now();
    for i in 0..OPENS {
        let host = i % HOSTS;
        let port = 1024 + ((i / HOSTS) % 60_000) as u16;
        let address = IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            (i / HOSTS / 60_000) as u8,
            host as u8,
        ));
        let facts = PolicyFacts {
            grants: vec![Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(port),
                host: address,
                remotes: Vec::new(),
                app: None,
            }],
            grants_narrowed: false,
            lifetime,
            max_leases: None,
        };
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
        let opened = Instant::now();
        let outcome = book.open(now, &names[host], &open, &facts, &mut rng);
        times.push((opened.elapsed(), book.len()));
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let total = began.elapsed();
    assert_eq!(book.len(), OPENS);
    let resident = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });

    let over = |limit: Duration| times.iter().filter(|(t, _)| *t > limit).count();
    println!(
        "{OPENS} Opens in {:.2} s ({:.2} µs each on average)",
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / OPENS as f64
    );
    if let Some(kib) = resident {
        // The timings' own record (48 MB) included.
        println!("resident: {:.1} MiB", kib as f64 / 1024.0);
    }
    println!(
        "over 100 µs: {}, over 1 ms: {}, over 10 ms: {}",
        over(Duration::from_micros(100)),
        over(Duration::from_millis(1)),
        over(Duration::from_millis(10))
    );
    times.sort_unstable_by_key(|&(time, _)| std::cmp::Reverse(time));
    println!("slowest Opens:");
    for (time, size) in times.iter().take(8) {
        println!("  {:9.3} ms at {size} leases", time.as_secs_f64() * 1e3);
    }
}
