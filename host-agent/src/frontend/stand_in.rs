//! A stand-in for the core behind a [`Seam`], for the front ends' tests: it grants every Open
//! with the lifetime asked (an opening it holds already under the lease it holds it with, as
//! the gateway merges them), answers every Release and Watch, as the core answers the seam, and
//! keeps what it holds for the test to look at. A test ends or re-opens a lease through
//! [`Held::revoke`] and [`Held::reopen`], which tell the connections that hold and watch it,
//! as the core's Events do (local API 6.3).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use fwnp_proto::local::{Event, EventKind, LocalMessage, Watching, encode_frame};
use fwnp_proto::{
    Common, Family, Grant, Granted, HostAddresses, LeaseId, Message, Opening, PortRange, Prefix,
    Released, Target,
};
use tokio::task::JoinHandle;

use super::Seam;
use crate::core::{ConnId, CoreInput};
use crate::server::Outbox;

/// What the stand-in core holds.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The live leases and what each opens.
    pub(crate) live: Vec<(LeaseId, Opening)>,
    /// How many Opens it granted.
    pub(crate) opened: usize,
    /// The connections that were granted each live lease.
    holders: HashMap<LeaseId, HashSet<ConnId>>,
    /// The connections that watch their leases, and where their frames go.
    watching: HashMap<ConnId, Outbox>,
    /// The last lease id handed out.
    last_id: u8,
}

impl Held {
    /// The live openings of `port`, by their host addresses and families, IPv4 first.
    pub(crate) fn openings(&self, port: u16) -> Vec<(HostAddresses, Option<Family>)> {
        let mut openings: Vec<_> = self
            .of_port(port)
            .map(|(_, o)| (o.host.clone(), o.family))
            .collect();
        openings.sort_by_key(|(_, family)| *family != Some(Family::Ipv4));
        openings
    }

    /// The remote prefixes of the live openings of `port`, in order.
    pub(crate) fn remotes(&self, port: u16) -> Vec<Vec<Prefix>> {
        let mut remotes: Vec<_> = self.of_port(port).map(|(_, o)| o.remotes.clone()).collect();
        remotes.sort();
        remotes
    }

    /// Ends `lease` as the gateway's revocation does: it is no longer live, and each
    /// connection that holds it and watches hears a revoked Event.
    pub(crate) fn revoke(&mut self, lease: LeaseId) {
        self.live.retain(|(id, _)| *id != lease);
        self.tell(
            lease,
            Event {
                common: Common::default(),
                lease,
                kind: EventKind::Revoked,
                expires_in_ms: None,
                reason: Some("revoked by the stand-in".to_owned()),
                code: None,
                new_lease: None,
            },
        );
        self.holders.remove(&lease);
    }

    /// Re-opens `lease` under a new id, as the agent does when the gateway lost it: each
    /// connection that holds it and watches hears a reopened Event. Returns the new id.
    pub(crate) fn reopen(&mut self, lease: LeaseId) -> LeaseId {
        let new = self.fresh_id();
        for (id, _) in &mut self.live {
            if *id == lease {
                *id = new;
            }
        }
        self.tell(
            lease,
            Event {
                common: Common::default(),
                lease,
                kind: EventKind::Reopened,
                expires_in_ms: Some(60_000),
                reason: None,
                code: None,
                new_lease: Some(new),
            },
        );
        if let Some(holders) = self.holders.remove(&lease) {
            self.holders.insert(new, holders);
        }
        new
    }

    /// Sends `event` to the connections that hold `lease` and watch.
    fn tell(&self, lease: LeaseId, event: Event) {
        let frame = encode_frame(&LocalMessage::Event(event));
        for conn in self.holders.get(&lease).into_iter().flatten() {
            if let Some(out) = self.watching.get(conn) {
                out.send(frame.clone());
            }
        }
    }

    fn fresh_id(&mut self) -> LeaseId {
        self.last_id = self.last_id.wrapping_add(1);
        LeaseId([self.last_id; 16])
    }

    fn of_port(&self, port: u16) -> impl Iterator<Item = &(LeaseId, Opening)> {
        self.live.iter().filter(move |(_, o)| {
            matches!(o.target, Target::Ports { ports, .. } if ports == PortRange::single(port))
        })
    }
}

/// The local API's settings of a minimal agent configuration, the defaults.
pub(crate) fn local_config() -> crate::config::LocalConfig {
    crate::config::AgentConfig::parse(
        "state_dir = \"/var/lib/fwnp-agent\"\n[gateway]\naddress = \"gw.example.org:4433\"\n\
         server_name = \"gw.example.org\"\ncertificate = \"/c.pem\"\nkey = \"/k.pem\"\n\
         ca = \"/ca.pem\"\n",
        "agent.toml",
    )
    .expect("a valid configuration")
    .local
}

/// A seam in front of the stand-in core, with the seam's sweep running (it releases what its
/// clients did not refresh in time); the uid of the test may use the agent, root or not. The
/// tasks end when aborted.
pub(crate) fn granting_seam() -> (Arc<Seam>, Arc<Mutex<Held>>, Vec<JoinHandle<()>>) {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("the test's own uid");
    let mut local = local_config();
    local.allowed_uids.push(uid);
    let (core, mut inputs) = tokio::sync::mpsc::unbounded_channel();
    let seam = Seam::new(core, local);
    let held = Arc::new(Mutex::new(Held::default()));
    let state = held.clone();
    let stand_in = tokio::spawn(async move {
        let mut outboxes = HashMap::new();
        while let Some(input) = inputs.recv().await {
            let (conn, message) = match input {
                CoreInput::LocalConnected { conn, out, .. } => {
                    outboxes.insert(conn, out);
                    continue;
                }
                CoreInput::LocalRequest { conn, message, .. } => (conn, message),
                _ => continue,
            };
            let answer = {
                let mut held = state.lock().expect("the stand-in's state");
                match message {
                    LocalMessage::Wire(Message::Open(open)) => {
                        // An opening it holds already is granted under its lease, as the
                        // gateway merges them.
                        let merged = held
                            .live
                            .iter()
                            .find(|(_, opening)| *opening == open.opening)
                            .map(|(lease, _)| *lease);
                        let lease = merged.unwrap_or_else(|| held.fresh_id());
                        let Target::Ports { protocol, ports } = open.opening.target else {
                            continue;
                        };
                        let host = match open.opening.host {
                            HostAddresses::One(host) => host,
                            _ => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                        };
                        let grant = Grant {
                            protocol,
                            ports,
                            host,
                            remotes: open.opening.remotes.clone(),
                            app: None,
                        };
                        if merged.is_none() {
                            held.live.push((lease, open.opening));
                        }
                        held.opened += 1;
                        held.holders.entry(lease).or_default().insert(conn);
                        Message::Granted(Granted {
                            common: open.common,
                            lease,
                            grants: vec![grant],
                            lifetime: open.lifetime.unwrap_or(60),
                            expires_ms: 0,
                            renew_after: 30,
                            epoch: 1,
                            narrowed: false,
                        })
                    }
                    LocalMessage::Wire(Message::Release(release)) => {
                        held.live.retain(|(lease, _)| *lease != release.lease);
                        held.holders.remove(&release.lease);
                        Message::Released(Released {
                            common: release.common,
                            lease: release.lease,
                        })
                    }
                    LocalMessage::Watch(watch) => {
                        if let Some(out) = outboxes.get(&conn) {
                            held.watching.insert(conn, Outbox::clone(out));
                            out.send(encode_frame(&LocalMessage::Watching(Watching {
                                common: watch.common,
                            })));
                        }
                        continue;
                    }
                    _ => continue,
                }
            };
            if let Some(out) = outboxes.get(&conn) {
                out.send(encode_frame(&LocalMessage::Wire(answer)));
            }
        }
    });
    let sweep = tokio::spawn(seam.clone().sweep());
    (seam, held, vec![sweep, stand_in])
}
