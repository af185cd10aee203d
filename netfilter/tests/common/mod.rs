//! Helpers shared by the real-kernel tests: layouts over the lab topology, openings, probes with
//! readable failures, and reading our table with the `nft` binary.

#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fwnp_netfilter::{
    AlwaysAllowed, DesiredState, Element, GatewayLayout, HostLayout, HostMode, Layout, Netfilter,
    Ownership, PortRange, Prefix, Protocol, Refuse,
};
use fwnp_testkit::netns::{
    GATEWAY_OUTSIDE_IF, Netns, Topology, tcp_connects, udp_roundtrip, wait_until,
};

/// Bound of one probe: a connection (or datagram) that is not through by then is refused.
pub const PROBE: Duration = Duration::from_secs(1);
/// How often a bounded wait polls.
pub const POLL: Duration = Duration::from_millis(50);

/// A test's world: the topology and nothing else.
pub fn topology() -> Topology {
    Topology::new().expect("building the namespace topology")
}

pub fn prefix(addr: IpAddr, len: u8) -> Prefix {
    Prefix { addr, len }
}

pub fn prefix_str(s: &str) -> Prefix {
    let (addr, len) = s.split_once('/').expect("prefix with a length");
    Prefix {
        addr: addr.parse().expect("prefix address"),
        len: len.parse().expect("prefix length"),
    }
}

/// The gateway layout protecting the host's two subnets.
pub fn gateway_layout(refuse: Refuse) -> Layout {
    Layout::Gateway(GatewayLayout {
        protected: vec![prefix_str("198.51.100.0/24"), prefix_str("fd00:2::/64")],
        refuse,
        ..GatewayLayout::default()
    })
}

/// The gateway layout that guards what arrives on its outside interface, with no prefix.
pub fn gateway_layout_by_interface(refuse: Refuse) -> Layout {
    Layout::Gateway(GatewayLayout {
        inbound_interfaces: vec![GATEWAY_OUTSIDE_IF.to_string()],
        refuse,
        ..GatewayLayout::default()
    })
}

pub fn host_layout(mode: HostMode, always_allowed: Vec<AlwaysAllowed>) -> Layout {
    Layout::Host(HostLayout {
        mode,
        always_allowed,
        ..HostLayout::default()
    })
}

pub fn tcp(host: IpAddr, port: u16) -> Element {
    Element {
        host,
        protocol: Protocol::Tcp,
        ports: PortRange::single(port),
        remote: None,
    }
}

pub fn udp(host: IpAddr, port: u16) -> Element {
    Element {
        host,
        protocol: Protocol::Udp,
        ports: PortRange::single(port),
        remote: None,
    }
}

pub fn tcp_range(host: IpAddr, first: u16, last: u16) -> Element {
    Element {
        host,
        protocol: Protocol::Tcp,
        ports: PortRange { first, last },
        remote: None,
    }
}

pub fn tcp_from(host: IpAddr, port: u16, remote: Prefix) -> Element {
    Element {
        remote: Some(remote),
        ..tcp(host, port)
    }
}

/// Opens a netfilter handle inside `ns` and applies `layout` with `elements`.
pub fn open_and_apply(ns: &Netns, layout: &Layout, elements: &[(Element, Duration)]) -> Netfilter {
    ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        nf.apply(layout, elements).expect("apply layout");
        nf
    })
}

/// [`open_and_apply`] with a shared table (see [`Ownership`]), which others can change: for the
/// tests of detecting and repairing what they did.
pub fn open_shared_and_apply(
    ns: &Netns,
    layout: &Layout,
    elements: &[(Element, Duration)],
) -> Netfilter {
    ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        nf.set_ownership(Ownership::Shared);
        nf.apply(layout, elements).expect("apply layout");
        nf
    })
}

/// Whether a TCP connection from the outside namespace (from its main address) reaches
/// `addr:port` and echoes.
pub fn outside_tcp(topo: &Topology, addr: IpAddr, port: u16) -> bool {
    tcp_connects(&topo.outside, SocketAddr::new(addr, port), None, PROBE)
}

/// The same from a chosen outside source address.
pub fn outside_tcp_from(topo: &Topology, from: IpAddr, addr: IpAddr, port: u16) -> bool {
    tcp_connects(
        &topo.outside,
        SocketAddr::new(addr, port),
        Some(from),
        PROBE,
    )
}

pub fn outside_udp(topo: &Topology, addr: IpAddr, port: u16) -> bool {
    udp_roundtrip(&topo.outside, SocketAddr::new(addr, port), None, PROBE)
}

/// Polls `probe` until it gives `want`, within `limit`; returns how long that took, or `None`.
pub fn until(limit: Duration, want: bool, mut probe: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    wait_until(limit, POLL, || probe() == want).then(|| started.elapsed())
}

/// Someone else's change to the gateway table's IPv4 lease set: `nft VERB element inet fwnp
/// lease4 { ELEMENT }`, with `verb` "add" or "delete" and `element` such as
/// `198.51.100.2 . tcp . 8080 timeout 1h`.
pub fn foreign_lease4(ns: &Netns, verb: &str, element: &str) {
    ns.exec_checked(&[
        "nft",
        verb,
        "element",
        "inet",
        "fwnp",
        "lease4",
        &format!("{{ {element} }}"),
    ])
    .unwrap_or_else(|e| panic!("nft {verb} element {element}: {e}"));
}

/// `nft -j list ruleset` inside `ns`, parsed.
pub fn nft_json(ns: &Netns) -> serde_json::Value {
    let out = ns
        .exec_checked(&["nft", "-j", "list", "ruleset"])
        .expect("nft -j list ruleset");
    serde_json::from_str(&out).expect("nft's JSON")
}

/// The objects of one kind (`"rule"`, `"set"`, `"counter"`, `"table"`...) of table `inet
/// TABLE` in `nft -j list ruleset` output.
pub fn nft_objects(ruleset: &serde_json::Value, kind: &str, table: &str) -> Vec<serde_json::Value> {
    ruleset["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get(kind))
        .filter(|obj| {
            // A table names itself in "name"; everything else names its table in "table".
            let owner = if kind == "table" {
                &obj["name"]
            } else {
                &obj["table"]
            };
            owner == table && obj["family"] == "inet"
        })
        .cloned()
        .collect()
}

/// The packet count of a named counter of `inet TABLE`, as `nft -j` reports it.
pub fn nft_counter_packets(ns: &Netns, table: &str, name: &str) -> Option<u64> {
    nft_objects(&nft_json(ns), "counter", table)
        .into_iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["packets"].as_u64())
}

/// How many elements `nft` lists in set `inet TABLE SET`.
pub fn nft_set_len(ns: &Netns, table: &str, set: &str) -> usize {
    let out = ns
        .exec_checked(&["nft", "-j", "list", "set", "inet", table, set])
        .expect("nft list set");
    let value: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("set"))
        .map(|set| set["elem"].as_array().map_or(0, Vec::len))
        .sum()
}

/// A current-thread tokio runtime for the async tests (the batcher has its own threads).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A batcher's owner that keeps the openings it wants, with when they expire
/// ([`fwnp_netfilter::Batcher::desired_by`]), and counts how often the batcher read them.
#[derive(Default)]
pub struct Owner {
    openings: std::sync::Mutex<Vec<(Element, Instant)>>,
    reads: std::sync::atomic::AtomicUsize,
}

impl Owner {
    pub fn want(&self, opening: Element, expires: Instant) {
        self.openings
            .lock()
            .expect("owner")
            .push((opening, expires));
    }

    /// How often the batcher read the openings.
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl DesiredState for Owner {
    fn count(&self) -> usize {
        self.openings.lock().expect("owner").len()
    }

    fn openings(&self) -> Vec<(Element, Duration)> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let now = Instant::now();
        let openings = self.openings.lock().expect("owner");
        openings
            .iter()
            .filter(|(_, expires)| *expires > now)
            .map(|(opening, expires)| (opening.clone(), *expires - now))
            .collect()
    }
}
