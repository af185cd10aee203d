//! A stand-in for the core behind a [`Seam`], for the front ends' tests: it grants every Open
//! with the lifetime asked (an opening it holds already under the lease it holds it with, as
//! the gateway merges them) and answers every Release, as the core answers the seam, and keeps
//! what it holds for the test to look at.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use fwnp_proto::local::{LocalMessage, encode_frame};
use fwnp_proto::{
    Family, Grant, Granted, HostAddresses, LeaseId, Message, Opening, PortRange, Prefix, Released,
    Target,
};
use tokio::task::JoinHandle;

use super::Seam;
use crate::core::CoreInput;

/// What the stand-in core holds.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The live leases and what each opens.
    pub(crate) live: Vec<(LeaseId, Opening)>,
    /// How many Opens it granted.
    pub(crate) opened: usize,
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

    fn of_port(&self, port: u16) -> impl Iterator<Item = &(LeaseId, Opening)> {
        self.live.iter().filter(move |(_, o)| {
            matches!(o.target, Target::Ports { ports, .. } if ports == PortRange::single(port))
        })
    }
}

/// A seam in front of the stand-in core, with the seam's sweep running (it releases what its
/// clients did not refresh in time); the uid of the test may use the agent, root or not. The
/// tasks end when aborted.
pub(crate) fn granting_seam() -> (Arc<Seam>, Arc<Mutex<Held>>, Vec<JoinHandle<()>>) {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("the test's own uid");
    let config = crate::config::AgentConfig::parse(
        "state_dir = \"/var/lib/fwnp-agent\"\n[gateway]\naddress = \"gw.example.org:4433\"\n\
         server_name = \"gw.example.org\"\ncertificate = \"/c.pem\"\nkey = \"/k.pem\"\n\
         ca = \"/ca.pem\"\n",
        "agent.toml",
    )
    .expect("a valid configuration");
    let mut local = config.local;
    local.allowed_uids.push(uid);
    let (core, mut inputs) = tokio::sync::mpsc::unbounded_channel();
    let seam = Seam::new(core, local);
    let held = Arc::new(Mutex::new(Held::default()));
    let state = held.clone();
    let stand_in = tokio::spawn(async move {
        let mut outboxes = std::collections::HashMap::new();
        let mut next = 0u8;
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
                        let lease = merged.unwrap_or_else(|| {
                            next = next.wrapping_add(1);
                            LeaseId([next; 16])
                        });
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
                        Message::Released(Released {
                            common: release.common,
                            lease: release.lease,
                        })
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
