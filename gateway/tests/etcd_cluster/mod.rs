//! The testkit's etcd cluster ([`fwnp_testkit::etcd`]) as the gateway's tests use it: the
//! store configuration of a gateway inside the cluster's namespace.

#![allow(dead_code, unused_imports)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fwnp_gateway::config::EtcdConfig;
pub(crate) use fwnp_testkit::etcd::{EtcdCluster, EtcdOptions, MemberTls, available};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, tcp};

/// A gateway's store configuration on a testkit cluster.
pub(crate) trait StoreConfig {
    /// A store configuration for a gateway named `site`, with `timeout` per request.
    fn config(&self, site: &str, timeout: Duration) -> EtcdConfig;
}

impl StoreConfig for EtcdCluster {
    fn config(&self, site: &str, timeout: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints(),
            prefix: "/fwnp-test".into(),
            site: site.into(),
            timeout,
            tls: None,
        }
    }
}

/// Runs `body` on the runtime `runtime` builds, in the namespace of a one-member cluster
/// started for `test` (named after `short`), or skips `test` where etcd cannot run: for a test
/// that loses no member of etcd (those that do start three themselves). The runtime is built inside the namespace, so that its threads' sockets are there.
pub(crate) fn in_cluster(
    test: &str,
    short: &str,
    runtime: fn() -> tokio::runtime::Runtime,
    body: impl AsyncFnOnce(&EtcdCluster) + Send,
) {
    if !available(test) {
        return;
    }
    let cluster = EtcdCluster::single(short).unwrap_or_else(|e| panic!("{e}"));
    cluster.run(|| runtime().block_on(body(&cluster)));
}

/// A runtime of two workers, as a gateway's machine of two cores runs it.
pub(crate) fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The cluster's published policy under the tests' prefix (`/fwnp-test/policy`), with how many
/// times its key was written; `None` when none is published.
pub(crate) async fn published_policy(
    endpoints: &[String],
) -> Option<(fwnp_gateway::cluster::policy::StoredPolicy, i64)> {
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("etcd client");
    let answer = client
        .get("/fwnp-test/policy", None)
        .await
        .expect("read the policy");
    let kv = answer.kvs().first()?;
    let stored = fwnp_gateway::cluster::policy::decode(kv.value()).expect("a published policy");
    Some((stored, kv.version()))
}

/// TCP relays from 127.0.0.1 to each member, the one way a gateway reaches etcd: cutting them
/// cuts that gateway off and nothing else.
pub(crate) struct Link {
    /// The relays' addresses, one per member, for the gateway's configuration.
    pub(crate) endpoints: Vec<String>,
    cut: tokio::sync::watch::Sender<Cut>,
    /// Set once what held connections hold may go on to etcd.
    released: tokio::sync::watch::Sender<bool>,
    /// The connection halves a silent or deaf cut holds open and mute: they end only with the
    /// link.
    muted: Muted,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What cuts hold open and mute: connections or their halves, of any type.
type Muted = Arc<Mutex<Vec<Box<dyn std::any::Any + Send>>>>;

/// How a [`Link`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Not cut: bytes pass.
    No,
    /// Its connections end, and new ones are closed at once: the gateway is told.
    Closed,
    /// Nothing passes any more, in either direction, and nothing tells: its connections stay
    /// open and mute for good, and new ones are accepted and mute too, as behind a network
    /// that drops every packet (a connection that lived through such a cut stays dead after
    /// it, as one does whose peer or middlebox forgot it meanwhile). Only connections made
    /// after the cut pass again.
    Silent,
    /// Requests reach etcd, and no answer comes back: etcd applies what it is sent, and the
    /// gateway never hears of it. As with a silent cut, the connections stay so for good, and
    /// only those made after the cut pass again.
    Deaf,
    /// Requests are held on their way to etcd, not lost: a connection open during the cut
    /// (or made during it) passes nothing towards etcd until [`Link::release_held`] lets what
    /// it holds go on, even after the gateway gave the connection up, without the
    /// cancellations the gateway sent meanwhile. Answers pass. As with a silent cut, only
    /// connections made after the cut pass at once.
    Held,
}

impl Link {
    pub(crate) async fn start(members: &[String]) -> Link {
        let (cut, _) = tokio::sync::watch::channel(Cut::No);
        let (released, _) = tokio::sync::watch::channel(false);
        let muted: Muted = Arc::new(Mutex::new(Vec::new()));
        let mut endpoints = Vec::new();
        let mut tasks = Vec::new();
        for member in members {
            let target: SocketAddr = member
                .trim_start_matches("http://")
                .parse()
                .expect("a member's address");
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .expect("bind a relay");
            endpoints.push(format!(
                "http://{}",
                listener.local_addr().expect("relay address")
            ));
            let state = cut.subscribe();
            let release = released.subscribe();
            let muted = muted.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let now = *state.borrow();
                    if now == Cut::Closed {
                        continue;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    match now {
                        Cut::Silent => {
                            // Accepted, and never answered: held open without a byte read.
                            muted
                                .lock()
                                .unwrap()
                                .push(Box::new((in_read, in_write, out_read, out_write)));
                            continue;
                        }
                        // Requests pass (below), answers are held.
                        Cut::Deaf => muted.lock().unwrap().push(Box::new((out_read, in_write))),
                        Cut::No | Cut::Closed | Cut::Held => {
                            tokio::spawn(relay(
                                out_read,
                                in_write,
                                false,
                                state.clone(),
                                release.clone(),
                                muted.clone(),
                            ));
                        }
                    }
                    tokio::spawn(relay(
                        in_read,
                        out_write,
                        true,
                        state.clone(),
                        release.clone(),
                        muted.clone(),
                    ));
                }
            }));
        }
        Link {
            endpoints,
            cut,
            released,
            muted,
            tasks,
        }
    }

    pub(crate) fn set_cut(&self, cut: Cut) {
        self.cut.send_replace(cut);
    }

    /// Lets what the connections a held cut held go on to etcd.
    pub(crate) fn release_held(&self) {
        self.released.send_replace(true);
    }
}

/// Copies one direction of a relayed connection until either end closes it or the link is cut:
/// closed, the direction goes (and with the other, the connection); silent, it is held open and
/// mute. A deaf cut holds the answers (the direction from etcd) and lets the requests pass; a
/// held cut holds the requests until `release` says they may go on.
async fn relay(
    mut from: tcp::OwnedReadHalf,
    mut to: tcp::OwnedWriteHalf,
    towards_etcd: bool,
    mut state: tokio::sync::watch::Receiver<Cut>,
    mut release: tokio::sync::watch::Receiver<bool>,
    muted: Muted,
) {
    let stops = |cut: &Cut| match cut {
        Cut::No => false,
        Cut::Deaf => !towards_etcd,
        Cut::Held => towards_etcd,
        Cut::Closed | Cut::Silent => true,
    };
    let cut = tokio::select! {
        _ = tokio::io::copy(&mut from, &mut to) => return,
        cut = state.wait_for(stops) => cut.map_or(Cut::Closed, |c| *c),
    };
    match cut {
        Cut::Closed => {}
        Cut::Held => {
            // What comes is kept, even once the gateway has closed its side, until released.
            let mut held = Vec::new();
            let mut ended = false;
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    read = from.read(&mut chunk), if !ended => match read {
                        Ok(0) | Err(_) => ended = true,
                        Ok(n) => held.extend_from_slice(&chunk[..n]),
                    },
                    _ = release.wait_for(|released| *released) => break,
                }
            }
            if to.write_all(&without_cancellations(&held)).await.is_ok() {
                if ended {
                    // Kept open: etcd takes in what was held, not an end of the connection.
                    muted.lock().unwrap().push(Box::new((from, to)));
                } else {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                }
            }
        }
        _ => muted.lock().unwrap().push(Box::new((from, to))),
    }
}

/// HTTP/2 frames as a client sent them (the connection's preface already passed), without
/// the RST_STREAM and GOAWAY frames: what a held cut releases reaches etcd as requests whose
/// cancellation was lost, so that each one applies as it would have, had it come in time.
/// A frame cut short at the end is kept as it is.
fn without_cancellations(bytes: &[u8]) -> Vec<u8> {
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    let mut kept = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let Some(frame) = rest.get(..9 + length) else {
            break;
        };
        if !matches!(frame[3], RST_STREAM | GOAWAY) {
            kept.extend_from_slice(frame);
        }
        rest = &rest[frame.len()..];
    }
    kept.extend_from_slice(rest);
    kept
}

impl Drop for Link {
    fn drop(&mut self) {
        self.set_cut(Cut::Closed);
        for task in &self.tasks {
            task.abort();
        }
        self.muted.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
