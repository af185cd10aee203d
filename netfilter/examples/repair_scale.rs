//! How long a repair of a large shared table takes, and where the time goes.
//!
//! For each size, a fresh network namespace gets the gateway layout with that many elements
//! (single TCP ports, one-hour timeouts) behind a [`Batcher`]. A second handle then breaks the
//! table as an outside change would: it removes a hundred of the batcher's elements and adds
//! one of its own. The batcher's watch sees the outside transaction and repairs; the time from
//! the change to the repair event is printed, with a listing of the sets by a third handle
//! (the kernel's dump and our parsing: the thread's system and user time, read from
//! `/proc/thread-self/stat`, say which).
//!
//! Run as root: `cargo run -p fwnp-netfilter --example repair_scale [SIZE...]`
//! (default sizes 100000 200000 400000). The namespaces are removed at the end of each size.
//! `FWNP_LIST_UP_TO` bounds the sizes that are listed too (default 400000).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use fwnp_netfilter::{
    Batcher, BatcherConfig, Change, Element, GatewayLayout, Layout, Netfilter, Ownership,
    PortRange, Prefix, Protocol, Refuse,
};
use fwnp_testkit::netns::{Netns, require_root};

const TIMEOUT: Duration = Duration::from_secs(3600);

fn layout() -> Layout {
    Layout::Gateway(GatewayLayout {
        protected: vec![Prefix {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
            len: 8,
        }],
        refuse: Refuse::Drop,
        ..GatewayLayout::default()
    })
}

/// `count` distinct single-port TCP openings: hosts 10.x.y.z, 1,000 ports each.
fn openings(count: usize) -> Vec<(Element, Duration)> {
    (0..count)
        .map(|i| {
            let host = u32::try_from(i / 1000).expect("element count fits u32");
            let port = 1000 + u16::try_from(i % 1000).expect("below 1000");
            let opening = Element {
                host: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host + 1)),
                protocol: Protocol::Tcp,
                ports: PortRange::single(port),
                remote: None,
            };
            (opening, TIMEOUT)
        })
        .collect()
}

/// The calling thread's user and system CPU time so far (clock ticks of 10 ms).
fn thread_times() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // The fields after the command's closing parenthesis, the first being the third of the
    // line: utime and stime are the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let tick = |i: usize| Duration::from_millis(10 * fields.get(i).copied().unwrap_or(0));
    (tick(11), tick(12))
}

/// Lists the sets once, as a repair used to, and says how long the kernel's dump and our
/// parsing took.
fn list(ns: &Netns, layout: &Layout, size: usize) {
    let (listing, user, system, listed) = ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        let (user0, system0) = thread_times();
        let started = Instant::now();
        let listed = nf.elements(layout).expect("elements").len();
        let took = started.elapsed();
        let (user1, system1) = thread_times();
        (took, user1 - user0, system1 - system0, listed)
    });
    println!(
        "{size} elements: listing {listed} took {listing:.2?} (system {system:.2?}, user {user:.2?})"
    );
}

/// Up to which size the sets are listed too (`FWNP_LIST_UP_TO`, default 400,000: a listing
/// of 800,000 elements takes about a minute).
fn list_up_to() -> usize {
    std::env::var("FWNP_LIST_UP_TO")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000)
}

fn measure(size: usize) {
    let ns = Netns::new("fwrs").expect("network namespace");
    let layout = layout();
    let desired = openings(size);
    let batcher = ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        nf.set_ownership(Ownership::Shared);
        let report = nf.reconcile(&layout, desired.clone()).expect("reconcile");
        assert_eq!(report.added_count, size);
        Batcher::start(nf, layout.clone(), BatcherConfig::default()).expect("batcher")
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        // The batcher must know the elements as desired: the reconcile above was its handle's.
        let report = batcher.reconcile(desired.clone()).await.expect("reconcile");
        assert!(report.failed.is_empty(), "{report:?}");
    });

    if size <= list_up_to() {
        list(&ns, &layout, size);
    }

    let mut repairs = batcher.repairs();
    let foreign = Element {
        host: IpAddr::V4(Ipv4Addr::new(10, 255, 255, 1)),
        protocol: Protocol::Udp,
        ports: PortRange::single(9),
        remote: None,
    };
    let mut breaker = ns.run(|| Netfilter::open().expect("netfilter handle"));
    let mut changes: Vec<Change> = desired
        .iter()
        .step_by((size / 100).max(1))
        .take(100)
        .map(|(o, _)| Change::Remove(o.clone()))
        .collect();
    let removed = changes.len();
    changes.push(Change::Add(foreign, TIMEOUT));
    let broken_at = Instant::now();
    let results = ns.run(|| breaker.commit(&layout, &changes).expect("commit"));
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let event = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(600), repairs.recv())
            .await
            .expect("a repair within ten minutes")
            .expect("a repair event")
    });
    println!(
        "{size} elements: {removed} removed and 1 added outside, repaired after {:.2?}: {event:?}",
        broken_at.elapsed()
    );
    let after = ns.run(|| breaker.elements(&layout).expect("elements").len());
    assert_eq!(after, size, "the repair left {after} elements");
    runtime.block_on(batcher.shutdown());
}

fn main() {
    if !require_root("repair_scale") {
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a size is a number"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000, 200_000, 400_000]
    } else {
        sizes
    };
    for size in sizes {
        measure(size);
    }
}
