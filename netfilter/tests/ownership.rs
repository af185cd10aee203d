//! The table belongs to the handle that made it: a firewall reload (`nft flush ruleset`) or a
//! `nft delete table` by someone else never opens the protected network, not even for the
//! milliseconds a repair would take; the table outlives its owner (a dead gateway still fails
//! closed) and a new handle claims it.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fwnp_netfilter::{
    Batcher, BatcherConfig, Element, Error, Layout, Netfilter, Ownership, Refuse,
};
use fwnp_testkit::netns::{Netns, TcpEchoServer, UdpEchoServer, require_root, wait_until};

/// Datagrams sent while others break the table.
const DATAGRAMS: u64 = 20_000;
/// Bound of the whole burst.
const BURST_LIMIT: Duration = Duration::from_secs(10);
/// The port nobody leased.
const CLOSED_PORT: u16 = 7400;
/// The port a lease opens after the burst.
const LEASED_PORT: u16 = 7401;

fn start(ns: &Netns, layout: &Layout) -> Batcher {
    ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        nf.apply(layout, &[]).expect("apply");
        Batcher::start(nf, layout.clone(), BatcherConfig::default()).expect("batcher")
    })
}

/// Counts the datagrams that reach `port` on the host while `breaker` runs in the gateway
/// namespace, with datagrams sent from the outside all along.
fn datagrams_through(
    topo: &fwnp_testkit::netns::Topology,
    port: u16,
    breaker: impl FnOnce(),
) -> u64 {
    let receiver = topo.host().netns.run(|| {
        let socket = UdpSocket::bind(SocketAddr::new(topo.host().v4, port)).expect("bind receiver");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        socket
    });
    let sender = topo.outside.run(|| {
        let socket = UdpSocket::bind(SocketAddr::new(topo.outside_v4, 0)).expect("bind sender");
        socket
            .connect(SocketAddr::new(topo.host().v4, port))
            .expect("connect");
        socket
    });
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let counter = {
        let (received, done) = (received.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + BURST_LIMIT + Duration::from_secs(2);
            while Instant::now() < deadline {
                match receiver.recv(&mut buf) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        })
    };
    let sending = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + BURST_LIMIT;
            let mut sent = 0u64;
            while sent < DATAGRAMS && Instant::now() < deadline {
                // ENOBUFS and the like are lost datagrams, as on a wire.
                let _ = sender.send(&sent.to_be_bytes());
                sent += 1;
                if sent.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            // Let the last ones arrive, then stop the counter.
            std::thread::sleep(Duration::from_millis(200));
            done.store(true, Ordering::Relaxed);
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    breaker();
    let sent = sending.join().expect("sender");
    counter.join().expect("counter");
    assert!(sent > 1000, "only {sent} datagrams sent");
    received.load(Ordering::Relaxed)
}

fn nft_refuses(ns: &Netns, cmd: &[&str]) -> bool {
    !ns.exec(cmd).expect("run nft").status.success()
}

#[test]
fn a_flush_or_a_delete_by_someone_else_never_opens_the_protected_network() {
    if !require_root("a_flush_or_a_delete_by_someone_else_never_opens_the_protected_network") {
        return;
    }
    let topo = topology();
    let _server = UdpEchoServer::start(&topo.host().netns, LEASED_PORT).expect("server");
    let layout = gateway_layout(Refuse::Drop);
    let batcher = start(&topo.gateway, &layout);
    let gateway = &topo.gateway;
    let passed = datagrams_through(&topo, CLOSED_PORT, || {
        for _ in 0..5 {
            // A firewall reload, and an operator deleting the table: both run as they would,
            // and whatever they do, nothing may pass.
            let _ = gateway
                .exec(&["nft", "flush", "ruleset"])
                .expect("nft flush ruleset");
            let _ = gateway
                .exec(&["nft", "delete", "table", "inet", "fwnp"])
                .expect("nft delete table");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert_eq!(
        passed, 0,
        "{passed} datagrams to a port with no lease passed while the table was being flushed or deleted"
    );
    // The table is still ours and intact; the others were refused or passed it by.
    assert!(nft_refuses(
        gateway,
        &["nft", "delete", "table", "inet", "fwnp"]
    ));
    assert!(nft_refuses(
        gateway,
        &["nft", "flush", "chain", "inet", "fwnp", "guard"]
    ));
    assert!(
        nft_objects(&nft_json(gateway), "table", "fwnp").len() == 1,
        "nft no longer lists the table"
    );
    // Leases still work.
    runtime().block_on(async {
        batcher
            .add(udp(topo.host().v4, LEASED_PORT), Duration::from_secs(30))
            .await
            .expect("add");
    });
    assert!(
        outside_udp(&topo, topo.host().v4, LEASED_PORT),
        "a lease no longer opens"
    );
}

#[test]
fn the_table_outlives_its_owner_and_a_new_handle_claims_it() {
    if !require_root("the_table_outlives_its_owner_and_a_new_handle_claims_it") {
        return;
    }
    let topo = topology();
    let _server = UdpEchoServer::start_ports(&topo.host().netns, &[LEASED_PORT, LEASED_PORT + 1])
        .expect("server");
    let layout = gateway_layout(Refuse::Drop);
    let batcher = start(&topo.gateway, &layout);
    let open = udp(topo.host().v4, LEASED_PORT);
    runtime().block_on(async {
        batcher
            .add(open.clone(), Duration::from_secs(3))
            .await
            .expect("add");
    });
    // Another handle of the same process reads the table (as `nft list` does) but cannot
    // change it.
    topo.gateway.run(|| {
        let mut other = Netfilter::open().expect("handle");
        assert_eq!(
            other
                .elements(&layout)
                .expect("read by another handle")
                .len(),
            1
        );
        assert!(
            other
                .table_present(&layout)
                .expect("check by another handle")
        );
        let refused = other
            .commit(&layout, &[fwnp_netfilter::Change::Remove(open.clone())])
            .expect("commit");
        assert!(
            matches!(
                refused[0],
                Err(Error::PermissionDenied | Error::TableOwned { .. })
            ),
            "{refused:?}"
        );
        let replaced = other.apply(&layout, &[]);
        assert!(
            matches!(replaced, Err(Error::TableOwned { .. })),
            "{replaced:?}"
        );
    });

    // The owner goes (its socket closes, as when the gateway dies): the table stays, and so
    // does the element, which still ends by its own timeout.
    runtime().block_on(batcher.shutdown());
    assert!(
        wait_until(Duration::from_secs(3), POLL, || !nft_refuses(
            &topo.gateway,
            &[
                "nft",
                "add",
                "element",
                "inet",
                "fwnp",
                "lease4",
                "{ 198.51.100.99 . tcp . 1 timeout 1s }"
            ]
        )),
        "the table stayed owned after its owner closed"
    );
    assert!(
        outside_udp(&topo, topo.host().v4, LEASED_PORT),
        "the opening went with its owner"
    );
    assert!(
        !outside_udp(&topo, topo.host().v4, LEASED_PORT + 1),
        "the orphaned table lets unleased traffic in"
    );
    assert!(
        until(Duration::from_secs(5), false, || outside_udp(
            &topo,
            topo.host().v4,
            LEASED_PORT
        ))
        .is_some(),
        "the element outlived its timeout in the orphaned table"
    );

    // A new handle (a restarted gateway) claims it in its reconcile, keeps its structure, and
    // nobody else can change it again.
    let batcher = topo.gateway.run(|| {
        let nf = Netfilter::open().expect("handle");
        assert_eq!(nf.ownership(), Ownership::Owned);
        Batcher::start(nf, layout.clone(), BatcherConfig::default()).expect("batcher")
    });
    let report = runtime()
        .block_on(batcher.reconcile(vec![(
            udp(topo.host().v4, LEASED_PORT + 1),
            Duration::from_secs(30),
        )]))
        .expect("reconcile");
    assert!(!report.table_recreated, "{report:?}");
    assert!(
        nft_refuses(&topo.gateway, &["nft", "delete", "table", "inet", "fwnp"]),
        "the claimed table can be deleted by others"
    );
    assert!(outside_udp(&topo, topo.host().v4, LEASED_PORT + 1));
}

#[test]
fn a_shared_table_is_an_ordinary_table() {
    if !require_root("a_shared_table_is_an_ordinary_table") {
        return;
    }
    let topo = topology();
    let layout = gateway_layout(Refuse::Drop);
    let _nf = topo.gateway.run(|| {
        let mut nf = Netfilter::open().expect("handle");
        nf.set_ownership(Ownership::Shared);
        nf.apply(&layout, &[]).expect("apply");
        nf
    });
    assert!(!nft_refuses(
        &topo.gateway,
        &["nft", "delete", "table", "inet", "fwnp"]
    ));
}

#[test]
fn the_host_table_is_owned_too() {
    if !require_root("the_host_table_is_owned_too") {
        return;
    }
    let topo = topology();
    let _server =
        fwnp_testkit::netns::TcpEchoServer::start(&topo.host().netns, 8080).expect("server");
    let layout = host_layout(fwnp_netfilter::HostMode::Enforce, Vec::new());
    let _nf = open_and_apply(&topo.host().netns, &layout, &[]);
    assert!(!outside_tcp(&topo, topo.host().v4, 8080));
    let _ = topo
        .host()
        .netns
        .exec(&["nft", "flush", "ruleset"])
        .expect("nft flush ruleset");
    assert!(nft_refuses(
        &topo.host().netns,
        &["nft", "delete", "table", "inet", "fwnp_host"]
    ));
    assert_eq!(
        nft_objects(&nft_json(&topo.host().netns), "table", "fwnp_host").len(),
        1
    );
    assert!(
        !outside_tcp(&topo, topo.host().v4, 8080),
        "the host is open after a flush"
    );
}

#[test]
fn a_restart_with_many_elements_replaces_the_sets_without_a_gap() {
    if !require_root("a_restart_with_many_elements_replaces_the_sets_without_a_gap") {
        return;
    }
    const LIVE: u16 = 7410;
    const STALE: u16 = 7411;
    let topo = topology();
    let _server = TcpEchoServer::start_ports(&topo.host().netns, &[LIVE, STALE]).expect("server");
    let layout = gateway_layout(Refuse::Drop);
    let host = topo.host().v4;
    let long = Duration::from_secs(600);
    // Enough other leases that reconcile replaces the sets rather than listing them.
    let fillers: Vec<(Element, Duration)> = (0..Netfilter::REPLACE_AT)
        .map(|i| {
            let port = 10_000 + u16::try_from(i % 50_000).expect("port");
            let addr = std::net::Ipv4Addr::new(10, 9, (i / 50_000) as u8, 1);
            (tcp(IpAddr::V4(addr), port), Duration::from_secs(120))
        })
        .collect();
    let stale = [
        tcp(host, STALE),
        udp(topo.host().v6, 53),
        tcp_range(host, 20_000, 20_100),
    ];
    let mut before: Vec<(Element, Duration)> =
        fillers.iter().map(|(o, _)| (o.clone(), long)).collect();
    before.push((tcp(host, LIVE), long));
    before.extend(stale.iter().map(|o| (o.clone(), long)));
    // The gateway that held these leases stops: its table stays, owned by nobody.
    let first = open_and_apply(&topo.gateway, &layout, &before);
    drop(first);
    // Someone adds an element of their own once the table is free (one more stale element).
    assert!(
        wait_until(Duration::from_secs(3), POLL, || !nft_refuses(
            &topo.gateway,
            &[
                "nft",
                "add",
                "element",
                "inet",
                "fwnp",
                "lease4",
                "{ 198.51.100.99 . tcp . 1 timeout 1h }"
            ]
        )),
        "the table stayed owned after its owner closed"
    );
    assert!(outside_tcp(&topo, host, LIVE));
    assert!(outside_tcp(&topo, host, STALE));

    // The restarted gateway wants the live lease with its remaining 30 s, and the fillers.
    let mut desired = fillers.clone();
    desired.push((tcp(host, LIVE), Duration::from_secs(30)));
    let done = AtomicBool::new(false);
    let (report, failures, attempts, reconciled_at) = std::thread::scope(|scope| {
        // New connections through the live lease, all along the reconcile.
        let prober = scope.spawn(|| {
            let (mut failures, mut attempts) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(30);
            while attempts < 2_000 && Instant::now() < deadline {
                let finished = done.load(Ordering::Relaxed);
                attempts += 1;
                if !outside_tcp(&topo, host, LIVE) {
                    failures += 1;
                }
                if finished {
                    break;
                }
            }
            (failures, attempts)
        });
        std::thread::sleep(Duration::from_millis(100));
        let (report, nf) = topo.gateway.run(|| {
            let mut nf = Netfilter::open().expect("handle");
            let report = nf.reconcile(&layout, desired.clone()).expect("reconcile");
            (report, nf)
        });
        let reconciled_at = Instant::now();
        done.store(true, Ordering::Relaxed);
        let (failures, attempts) = prober.join().expect("prober");
        (report, failures, attempts, (reconciled_at, nf))
    });
    let (reconciled_at, mut nf) = reconciled_at;
    assert!(report.replaced, "{report:?}");
    assert!(!report.table_recreated, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.added_count, desired.len());
    assert_eq!(
        failures, 0,
        "{failures} of {attempts} connections through a live lease failed during the replacement"
    );
    assert!(attempts >= 2, "only {attempts} connections tried");

    // Exactly the desired elements, with their desired remaining times.
    let listed = nf.elements(&layout).expect("elements");
    assert_eq!(listed.len(), desired.len());
    let listed: std::collections::HashMap<Element, Duration> = listed.into_iter().collect();
    for opening in &stale {
        assert!(
            !listed.contains_key(opening),
            "{opening:?} outlived its lease"
        );
    }
    let elapsed = reconciled_at.elapsed() + Duration::from_secs(1);
    for (opening, timeout) in &desired {
        let remaining = listed
            .get(opening)
            .unwrap_or_else(|| panic!("{opening:?} missing after the replacement"));
        assert!(
            *remaining <= *timeout && *remaining + elapsed >= *timeout,
            "{opening:?}: remaining {remaining:?}, desired {timeout:?}"
        );
    }
    assert!(outside_tcp(&topo, host, LIVE));
    assert!(
        !outside_tcp(&topo, host, STALE),
        "an ended lease still opens"
    );
    // The table is owned again: nobody else changes it.
    assert!(nft_refuses(
        &topo.gateway,
        &["nft", "delete", "table", "inet", "fwnp"]
    ));
}

/// Someone else's transactions on other tables move the ruleset's generation, which the
/// batcher watches: an owned table, which nobody else can change, is then checked for its
/// structure only, and its elements are not compared (with a million of them, seconds of the
/// batcher's thread for every rule another firewall adds). A shared table's are.
#[test]
fn someone_else_s_transactions_elsewhere_make_no_comparison_of_an_owned_table_s_elements() {
    if !require_root(
        "someone_else_s_transactions_elsewhere_make_no_comparison_of_an_owned_table_s_elements",
    ) {
        return;
    }
    let layout = gateway_layout(Refuse::Drop);
    for ownership in [Ownership::Owned, Ownership::Shared] {
        let topo = topology();
        let _server =
            TcpEchoServer::start_ports(&topo.host().netns, &[LEASED_PORT]).expect("server");
        let batcher = topo.gateway.run(|| {
            let mut nf = Netfilter::open().expect("netfilter handle");
            nf.set_ownership(ownership);
            nf.apply(&layout, &[]).expect("apply");
            assert_eq!(nf.ownership(), ownership);
            Batcher::start(nf, layout.clone(), BatcherConfig::default()).expect("batcher")
        });
        let owner = Arc::new(Owner::default());
        batcher.desired_by(owner.clone());
        runtime().block_on(async {
            let opening = tcp(topo.host().v4, LEASED_PORT);
            owner.want(opening.clone(), Instant::now() + Duration::from_secs(60));
            batcher
                .renew(opening, Duration::from_secs(60))
                .await
                .expect("renew");
            for _ in 0..3 {
                for verb in ["add", "delete"] {
                    topo.gateway
                        .exec_checked(&["nft", verb, "table", "inet", "elsewhere"])
                        .expect("nft changes another table");
                    // Three watch intervals: the generation is read in between.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            assert!(
                outside_tcp(&topo, topo.host().v4, LEASED_PORT),
                "the lease stays open"
            );
            batcher.shutdown().await;
        });
        match ownership {
            Ownership::Owned => {
                assert_eq!(owner.reads(), 0, "an owned table's elements were compared")
            }
            Ownership::Shared => assert!(
                owner.reads() > 0,
                "a shared table's elements were not compared"
            ),
        }
    }
}
