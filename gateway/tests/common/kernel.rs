//! A gateway's filter in the router namespace of a [`Topology`], guarding its host, where an
//! echo server answers on the test's TCP ports: whether the router's nf_tables holds an
//! element for a port, and whether the outside's traffic to it passes.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fwnp_testkit::netns::{self as lab, TcpEchoServer, Topology};

use super::STEP;

/// The gateway's filter, when the test has a kernel: it guards the topology's host network.
pub(crate) const FILTER: &str = "[filter]\nenabled = true\ntable = \"fwnp\"\nprotected = [\"198.51.100.0/24\"]\nrefuse = \"drop\"";

/// Below TCP's first SYN retransmission: a connection made within it was let through at once.
const FIRST_SYN: Duration = Duration::from_millis(800);

/// The namespaces, and the echo server on the host.
pub(crate) struct Kernel {
    pub(crate) topology: Topology,
    _echo: TcpEchoServer,
}

impl Kernel {
    /// The namespaces, with an echo server on the host's TCP `ports`.
    pub(crate) fn new(ports: &[u16]) -> Kernel {
        let topology = Topology::new().expect("build the namespaces");
        let echo = TcpEchoServer::start_ports(&topology.host().netns, ports).expect("echo server");
        Kernel {
            topology,
            _echo: echo,
        }
    }

    /// The address the host's certificate names, which its leases open.
    pub(crate) fn host(&self) -> IpAddr {
        self.topology.host().v4
    }

    /// Whether the router's table holds an element for the host's TCP `port`.
    pub(crate) fn holds(&self, port: u16) -> bool {
        router_holds(&self.topology, port)
    }

    /// Whether a connection from the outside reaches the host's `port` with its first SYN.
    pub(crate) fn passes(&self, port: u16) -> bool {
        let to = SocketAddr::new(self.host(), port);
        tokio::task::block_in_place(|| {
            lab::tcp_connects(&self.topology.outside, to, None, FIRST_SYN)
        })
    }

    /// Whether the table and the traffic agree on `open` for `port` within [`STEP`].
    pub(crate) async fn settles(&self, port: u16, open: bool) -> bool {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if self.holds(port) == open && self.passes(port) == open {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether the router's table `fwnp` in `topology` holds an element for its host's TCP `port`.
pub(crate) fn router_holds(topology: &Topology, port: u16) -> bool {
    let table = topology
        .gateway
        .exec_checked(&["nft", "list", "table", "inet", "fwnp"])
        .expect("nft list table");
    let host = topology.host().v4.to_string();
    let needles = [
        format!("{host} . tcp . {port}"),
        format!("{host} . 6 . {port}"),
    ];
    table.lines().any(|line| {
        needles.iter().any(|n| {
            line.match_indices(n.as_str()).any(|(at, _)| {
                !line[at + n.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
        })
    })
}
