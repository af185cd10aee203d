//! Fuzzes the gateway's request path without sockets: the input is read as a script of steps
//! (requests from a few host identities, time passing, reconnections, the expiry timer, policy
//! reloads), and every request is decided by the gateway's own request core with a policy
//! compiled by the real policy compiler, its effects carried out as the service carries them
//! out: the store writes on the in-memory lease store (through the service's own mapping of
//! the core's writes), the kernel elements on a map of what each lease holds, and any effect
//! of a grant or a renewal made to fail where the script says.
//!
//! Besides "no panic", each answer is checked against what the gateway promises: it echoes the
//! request id, validates and encodes within MAX_MESSAGE_SIZE; a Granted grants no more than was
//! asked (ports, host addresses as resolved, remotes, lifetime) and than the policy allows, and
//! never after a failed effect; a host never holds more leases than its rule's max_leases lets
//! it take; no host renews, releases or lists another host's lease; the store takes every
//! write the core asks for; and the book, the kernel and the store agree with a plain model of
//! the leases there should be.
//!
//! The service's other IO (the rate limiter with its real clock, the Revoked notices on the
//! wire) is not driven: see the fuzzing notes in the README.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::UNIX_EPOCH;

use fwnp_gateway::policy::{Policy, Request as PolicyRequest, Verdict};
use fwnp_gateway::service::write_op;
use fwnp_gateway::store::{LeaseStore, MemoryStore, StoreQueries, WriteError, WriteFuture};
use fwnp_proto::codec;
use fwnp_proto::gateway::request::{
    ConnectionState, CoreConfig, Effect, EffectFailure, Peer, RequestCore, Step, Write,
};
use fwnp_proto::gateway::resolve_host_addresses;
use fwnp_proto::message::*;
use fwnp_proto::validate::validate_message;
use fwnp_trust::identity::{
    CertificateName, Fingerprint, IdentityKind, PeerIdentity, Serial, allowed_addresses,
};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

const EPOCH: Epoch = 0x0123_4567_89ab_cdef;
const START_MS: u64 = 1_700_000_000_000;
const MAX_STREAMS: u32 = 16;

/// A second policy besides the shipped example: small quotas, narrow lifetimes, overlapping
/// allow and deny rules, third-party rights limited to a prefix, a group that needs both an
/// identity and an address.
const TIGHT_POLICY: &str = r#"
[defaults]
lifetime = "2m"
min_lifetime = "10s"
max_lifetime = "5m"
max_leases = 2

[applications]
https = ["tcp/443", "udp/443"]
ssh = ["tcp/22"]
rtp = ["udp/16384-16483"]
many = ["tcp/1-100", "udp/1-100", "sctp/1-100", "udplite/1-100"]

[[group]]
name = "web"
identities = ["fwnp://host/web-*"]
addresses = ["192.0.2.0/24", "2001:db8:0:1::/64"]

[[group]]
name = "any-db"
identities = ["**.internal.example.org"]

[[group]]
name = "relays"
identities = ["spiffe://example.org/relay/**"]

[[group]]
name = "lab"
addresses = ["198.51.100.0/24"]

[[rule]]
name = "no-telnet"
groups = ["web", "lab", "any-db", "relays"]
deny = "tcp/23"
from = ["0.0.0.0/0"]

[[rule]]
name = "web"
groups = ["web"]
allow = ["app:https", "tcp/80", "tcp/8000-8100", "app:many"]
max_leases = 3
lifetime = "1m"

[[rule]]
name = "db"
groups = ["any-db"]
allow = ["tcp/5432", "tcp/*"]
from = ["10.20.0.0/16", "2001:db8:20::/48"]
max_leases = 1
min_lifetime = "1m"
max_lifetime = "1h"

[[rule]]
name = "relays"
groups = ["relays"]
allow = ["app:rtp", "udp/3478", "udp/*"]
third_party = true
third_party_addresses = ["203.0.113.0/24", "2001:db8:3::/48"]
min_lifetime = "5m"
max_lifetime = "2h"

[[rule]]
name = "lab"
groups = ["lab"]
allow = ["tcp/*", "udp/*", "sctp/*", "udplite/*"]
from = ["10.0.0.0/8", "fd00::/8"]
max_leases = 5
max_lifetime = "7d"
"#;

fn policies() -> &'static [Policy] {
    static POLICIES: OnceLock<Vec<Policy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        vec![
            Policy::from_str(include_str!("../../examples/policy.toml"), "policy.toml")
                .expect("the example policy compiles"),
            Policy::from_str(TIGHT_POLICY, "tight.toml").expect("the tight policy compiles"),
            Policy::deny_all(),
        ]
    })
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(segments: [u16; 8]) -> IpAddr {
    let [a, b, c, d, e, f, g, h] = segments;
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// The hosts that connect: (identity, kind, certificate IP SANs, connection source).
fn hosts() -> Vec<(Option<&'static str>, IdentityKind, Vec<IpAddr>, IpAddr)> {
    vec![
        (
            Some("fwnp://host/web-01"),
            IdentityKind::Uri,
            vec![v4(192, 0, 2, 10), v6([0x2001, 0xdb8, 0, 1, 0, 0, 0, 0x10])],
            v4(192, 0, 2, 10),
        ),
        (
            Some("db-1.internal.example.org"),
            IdentityKind::Dns,
            vec![],
            v4(10, 20, 0, 7),
        ),
        (
            Some("spiffe://example.org/relay/r1"),
            IdentityKind::Uri,
            vec![v4(203, 0, 113, 5)],
            v4(203, 0, 113, 5),
        ),
        (
            Some("fwnp://host/lab-1"),
            IdentityKind::Uri,
            vec![],
            // An IPv4-mapped source, as a dual-stack socket reports it.
            IpAddr::V6(Ipv4Addr::new(198, 51, 100, 9).to_ipv6_mapped()),
        ),
        (
            Some("fwnp://host/web-02"),
            IdentityKind::Uri,
            vec![v6([0x2001, 0xdb8, 0, 1, 0, 0, 0, 0x20])],
            v6([0x2001, 0xdb8, 0, 1, 0, 0, 0, 0x20]),
        ),
        // A certificate that names no identity.
        (None, IdentityKind::Uri, vec![], v4(192, 0, 2, 99)),
    ]
}

/// Reads the script; every read past the end gives zeros and marks the input as exhausted.
struct Script<'a> {
    data: &'a [u8],
    exhausted: bool,
}

impl Script<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => {
                self.exhausted = true;
                0
            }
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }
    fn text(&mut self) -> String {
        let n = usize::from(self.u8() % 80);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
}

struct Session {
    peer: Option<PeerIdentity>,
    remote: SocketAddr,
    connection: ConnectionState,
}

/// What the book should hold, kept without any of its indexes, from the answers and the
/// store writes alone.
#[derive(Debug, Clone)]
struct ModelLease {
    host: String,
    grants: Vec<Grant>,
    expires_ms: u64,
}

/// Which effect of a pending request fails, and how, as the script chose.
#[derive(Debug, Clone, Copy)]
struct Failure {
    at: usize,
    failure: u8,
}

struct Gateway {
    policy: usize,
    core: RequestCore,
    /// The lease store, written only through the core's effects.
    store: MemoryStore,
    /// The kernel as the effects programmed it: the grants each lease holds, until when.
    kernel: HashMap<LeaseId, (Vec<Grant>, u64)>,
    rng: StdRng,
    sessions: Vec<Session>,
    now_ms: u64,
    model: HashMap<LeaseId, ModelLease>,
    /// Every lease id ever granted, so that scripts can name old and foreign leases.
    issued: Vec<LeaseId>,
    next_request_id: u64,
}

fn ports_within(inner: PortRange, outer: PortRange) -> bool {
    outer.first <= inner.first && inner.last <= outer.last
}

/// The memory store answers at once; its futures are ready when made.
fn now<T>(future: WriteFuture<'_, T>) -> Result<T, WriteError> {
    let mut future = future;
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the memory store kept a write waiting"),
    }
}

impl Gateway {
    fn new(policy: usize, seed: u64) -> Gateway {
        let sessions = hosts()
            .into_iter()
            .enumerate()
            .map(|(i, (identity, kind, ip_sans, remote))| Session {
                peer: identity.map(|identity| PeerIdentity {
                    identity: identity.to_owned(),
                    kind,
                    ip_sans,
                    certificate: Arc::new(CertificateName {
                        issuer: b"fuzz CA".to_vec(),
                        serial: Serial::from_der_bytes(&[i as u8 + 1]),
                    }),
                    fingerprint: Fingerprint([i as u8; 32]),
                    not_after: UNIX_EPOCH,
                }),
                remote: SocketAddr::new(remote, 40_000 + i as u16),
                connection: ConnectionState::default(),
            })
            .collect();
        Gateway {
            policy,
            core: RequestCore::new(CoreConfig {
                epoch: EPOCH,
                max_streams: MAX_STREAMS,
                kill_connections: true,
            }),
            store: MemoryStore::new(EPOCH),
            kernel: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            sessions,
            now_ms: START_MS,
            model: HashMap::new(),
            issued: Vec::new(),
            next_request_id: 1,
        }
    }

    fn policy(&self) -> &'static Policy {
        &policies()[self.policy]
    }

    fn addresses(&self, who: usize) -> Vec<IpAddr> {
        let session = &self.sessions[who];
        session
            .peer
            .as_ref()
            .map(|p| allowed_addresses(p, session.remote.ip()))
            .unwrap_or_default()
    }

    /// Carries out one effect as the service does, for the connection of host `who`. The
    /// store must take every write the core asks for: a lease inserted twice, or renewed or
    /// ended when not live, is a fault of the core.
    fn carry_out(&mut self, who: usize, effect: &Effect) {
        match effect {
            Effect::Welcomed { .. } => self.sessions[who].connection.welcomed = true,
            Effect::Hold {
                lease,
                grants,
                expires_ms,
            } => {
                assert!(
                    self.core.book().get(lease).is_some(),
                    "the kernel holds a lease the book does not"
                );
                self.kernel.insert(*lease, (grants.clone(), *expires_ms));
            }
            Effect::Unhold { lease, grants, .. } => {
                if let Some((held, _)) = self.kernel.remove(lease) {
                    assert_eq!(&held, grants, "the kernel gives up other grants");
                }
            }
            Effect::Commit(writes) => {
                for write in writes {
                    if let Write::End { id, .. } = write {
                        self.model.remove(id);
                    }
                }
                let ops = writes.iter().map(|w| write_op(w, None)).collect();
                now(self.store.commit(ops))
                    .unwrap_or_else(|e| panic!("the store refused the core's writes: {e}"));
            }
            Effect::Audit(record) => self
                .store
                .record(vec![write_op(&Write::Audit(record.clone()), None)])
                .expect("an audit record is stored"),
            Effect::Listed { identity } => {
                assert_eq!(
                    self.sessions[who].peer.as_ref().map(|p| p.identity.as_str()),
                    Some(identity.as_str())
                );
            }
            Effect::Notify { host, notice } => {
                assert!(matches!(notice, Message::Revoked(_)), "{notice:?}");
                assert!(
                    self.sessions
                        .iter()
                        .any(|s| s.peer.as_ref().is_some_and(|p| *p.identity == **host)),
                    "a notice for a host that never connected"
                );
                check_encodes(notice);
            }
        }
    }

    /// The expiry timer firing: the core ends exactly the leases whose time is up.
    fn expire(&mut self) {
        let mut expected: Vec<_> = self
            .model
            .iter()
            .filter(|(_, l)| l.expires_ms <= self.now_ms)
            .map(|(id, _)| *id)
            .collect();
        expected.sort();
        let effects = self.core.expire_due(self.now_ms);
        let mut ended: Vec<_> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Unhold { lease, .. } => Some(*lease),
                _ => None,
            })
            .collect();
        ended.sort();
        assert_eq!(ended, expected, "expire_due ended other leases than are due");
        for effect in &effects {
            self.carry_out(0, effect);
        }
    }

    /// A policy reload: every lease the new policy no longer allows is revoked, judged by its
    /// host's addresses as the service judges it.
    fn reload(&mut self, policy: usize) {
        self.policy = policy;
        let leases: Vec<_> = self.core.book().iter().cloned().collect();
        for lease in leases {
            let who = self
                .sessions
                .iter()
                .position(|s| s.peer.as_ref().is_some_and(|p| *p.identity == *lease.host));
            let addresses = who
                .map(|who| self.addresses(who))
                .unwrap_or_else(|| lease.grants.iter().map(|g| g.host).collect());
            if let Err(e) = self
                .policy()
                .still_allows(&lease.host, &addresses, &lease.grants)
            {
                let revocation = self
                    .core
                    .revoke(
                        self.now_ms,
                        &lease.id,
                        RevokeReason::PolicyChanged,
                        "policy-reload",
                        Some(e.to_string()),
                    )
                    .expect("a lease of the book is revoked");
                for effect in &revocation.effects {
                    self.carry_out(0, effect);
                }
                assert!(
                    !self.model.contains_key(&lease.id),
                    "a revoked lease stays in the store"
                );
                check_encodes(&revocation.notice);
            }
        }
    }

    /// One request from host `who`, as bytes off its stream, decided by the request core with
    /// the compiled policy, its effects carried out (the one `failure` names failing).
    fn handle(&mut self, who: usize, bytes: &[u8], failure: Option<Failure>) -> Message {
        let addresses = self.addresses(who);
        let identity = self.sessions[who].peer.as_ref().map(|p| p.identity.clone());
        let held_before = identity
            .as_deref()
            .map_or(0, |i| self.core.book().lease_count(i));
        let peer = Peer {
            identity: identity.as_deref(),
            no_identity: "the certificate names no URI or DNS identity",
            remote: self.sessions[who].remote,
            addresses: &addresses,
        };
        let connection = self.sessions[who].connection;
        let policy = self.policy();
        let step = self
            .core
            .handle(self.now_ms, connection, &peer, bytes, policy, &mut self.rng);
        let (answer, failed) = match step {
            Step::Answer(answer) => {
                for effect in &answer.effects {
                    self.carry_out(who, effect);
                }
                (answer.message, false)
            }
            Step::Pending(pending) => {
                let lease = pending.lease();
                let mut outcome = Ok(());
                let effects = pending.effects().to_vec();
                if pending.at_once() && failure.is_some_and(|f| f.failure % 4 == 3) {
                    // Held and committed at once: the store committed while the kernel
                    // refused, and finish must end the stored lease again.
                    for effect in effects.iter() {
                        if !matches!(effect, Effect::Hold { .. }) {
                            self.carry_out(who, effect);
                        }
                    }
                    outcome = EffectFailure::joined(
                        Err(EffectFailure::Kernel("the kernel refused".into())),
                        Ok(()),
                    );
                }
                for (i, effect) in effects.iter().enumerate() {
                    if outcome.is_err() {
                        break;
                    }
                    // Only the kernel's and the store's steps can fail, each in its own ways,
                    // as the gateway's driver carries them out; the others cannot.
                    let failed = failure.filter(|f| f.at == i).and_then(|f| match effect {
                        Effect::Hold { .. } if f.failure % 2 == 0 => {
                            Some(EffectFailure::Kernel("the kernel refused".into()))
                        }
                        Effect::Hold { .. } => Some(EffectFailure::LeaseEnded),
                        Effect::Commit(_) => Some(EffectFailure::Store("no quorum".into())),
                        _ => None,
                    });
                    if let Some(failed) = failed {
                        outcome = Err(failed);
                        break;
                    }
                    self.carry_out(who, effect);
                }
                let failed = outcome.is_err();
                let answer = self.core.finish(self.now_ms, pending, outcome);
                for effect in &answer.effects {
                    self.carry_out(who, effect);
                }
                if failed {
                    // An extension or a renewal that failed keeps the book's new expiry
                    // (the kernel or the store may lag it, never lead it): follow the book.
                    if let Some(l) = self.core.book().get(&lease) {
                        if let Some(model) = self.model.get_mut(&lease) {
                            model.expires_ms = l.expires_ms;
                        }
                    } else {
                        assert!(
                            !self.store.leases().iter().any(|s| s.id == lease
                                && s.state == fwnp_gateway::store::LeaseState::Live),
                            "a failed grant left its lease in the store"
                        );
                    }
                }
                (answer.message, failed)
            }
        };
        let Ok(request) = codec::decode(bytes) else {
            return answer;
        };
        let Some(identity) = identity else {
            return answer;
        };
        match (&request, &answer) {
            (Message::Open(open), Message::Granted(granted)) => {
                assert!(!failed, "granted though an effect failed");
                self.check_open_granted(&identity, &addresses, held_before, open, granted);
            }
            (Message::Renew(renew), Message::Granted(granted)) => {
                assert!(!failed, "renewed though an effect failed");
                self.check_renewed(&identity, &addresses, renew, granted);
            }
            (Message::Release(release), Message::Released(_)) => {
                assert!(
                    !self.model.contains_key(&release.lease),
                    "a released lease stays in the store"
                );
                assert!(self.core.book().get(&release.lease).is_none());
            }
            (Message::List(_), Message::Leases(leases)) => {
                let mut expected: Vec<_> = self
                    .model
                    .iter()
                    .filter(|(_, l)| l.host == identity && l.expires_ms > self.now_ms)
                    .map(|(id, _)| *id)
                    .collect();
                expected.sort();
                let mut listed: Vec<_> = leases.leases.iter().map(|l| l.lease).collect();
                listed.sort();
                assert_eq!(
                    listed, expected,
                    "List shows other leases than the host's live ones"
                );
            }
            (Message::Renew(renew), Message::Denied(d)) if d.code == ResultCode::UnknownLease => {
                assert!(
                    self.model
                        .get(&renew.lease)
                        .is_none_or(|l| l.host != identity || l.expires_ms <= self.now_ms)
                        || failed,
                    "a live lease of this host is unknown"
                );
            }
            _ => {}
        }
        answer
    }

    /// A Granted for an Open grants no more than was asked and than the policy allows, on the
    /// addresses resolved for it, within the host's quota.
    fn check_open_granted(
        &mut self,
        identity: &str,
        addresses: &[IpAddr],
        held_before: usize,
        open: &Open,
        granted: &Granted,
    ) {
        let policy = self.policy();
        let hosts = resolve_host_addresses(&open.opening, addresses, true)
            .expect("a granted opening resolves");
        // Each address alone, as explain sees it, must decide as the whole opening does when
        // it is the only address.
        if let [host_address] = hosts[..] {
            let policy_request = PolicyRequest::for_opening(
                identity,
                addresses,
                host_address,
                &open.opening,
                open.lifetime,
            );
            assert_eq!(
                policy.explain(&policy_request).decision,
                policy.evaluate(&policy_request),
                "explain decides otherwise than evaluate"
            );
        }
        let decision = policy.evaluate_addresses(identity, addresses, &hosts, open);
        let Verdict::Allowed(allowance) = decision.verdict else {
            panic!("granted what the policy denies: {}", decision.reason);
        };
        assert_eq!(granted.epoch, EPOCH);
        assert!(!granted.grants.is_empty());
        let asked = &open.opening;
        for grant in &granted.grants {
            assert!(hosts.contains(&grant.host), "a grant on an address not asked for");
            match &asked.target {
                Target::Ports { protocol, ports } => {
                    assert_eq!(grant.protocol, *protocol, "a grant of another protocol");
                    assert!(ports_within(grant.ports, *ports), "more ports than asked");
                    assert_eq!(grant.app, None);
                }
                Target::App(id) => {
                    assert_eq!(grant.app.as_deref(), Some(id.as_str()));
                    let entries = policy.application(id).expect("a known application");
                    assert!(
                        entries
                            .iter()
                            .any(|(p, r)| *p == grant.protocol && ports_within(grant.ports, *r)),
                        "a grant outside the application's entries"
                    );
                }
            }
            if !asked.remotes.is_empty() {
                assert!(
                    !grant.remotes.is_empty()
                        && grant.remotes.iter().all(|r| asked.remotes.contains(r)),
                    "remotes beyond those asked: {:?} for {:?}",
                    grant.remotes,
                    asked.remotes
                );
            }
        }
        policy
            .still_allows(identity, addresses, &granted.grants)
            .unwrap_or_else(|e| panic!("granted what the policy does not allow: {e}"));
        let bounds = allowance.lifetime;
        let max = bounds.max_secs.clamp(1, MAX_LIFETIME_SECS);
        assert!(granted.lifetime >= 1 && granted.lifetime <= max);
        assert!(granted.lifetime >= bounds.min_secs.min(max));
        if let Some(asked) = open.lifetime.filter(|&l| l != 0) {
            assert!(
                granted.lifetime <= asked.max(bounds.min_secs),
                "a longer lifetime than asked"
            );
            if granted.lifetime != asked {
                assert!(granted.narrowed, "a changed lifetime not marked narrowed");
            }
        }
        if allowance.remotes_narrowed {
            assert!(granted.narrowed, "narrowed remotes not marked narrowed");
        }
        assert_eq!(granted.renew_after, granted.lifetime / 2);
        let now = self.now_ms;
        match self.model.get_mut(&granted.lease) {
            None => {
                assert!(
                    held_before < allowance.max_leases as usize,
                    "a new lease beyond max_leases"
                );
                assert_eq!(self.core.book().lease_count(identity), held_before + 1);
                assert_eq!(granted.expires_ms, now + u64::from(granted.lifetime) * 1000);
                assert!(
                    !self.issued.contains(&granted.lease),
                    "a lease id used twice"
                );
                self.model.insert(
                    granted.lease,
                    ModelLease {
                        host: identity.to_owned(),
                        grants: granted.grants.clone(),
                        expires_ms: granted.expires_ms,
                    },
                );
                self.issued.push(granted.lease);
            }
            Some(model) => {
                // A repeated Open extends the live lease it matches.
                assert_eq!(self.core.book().lease_count(identity), held_before);
                assert_eq!(model.host, identity, "extended another host's lease");
                assert_eq!(model.grants, granted.grants);
                assert!(model.expires_ms > now, "extended a lease past its expiry");
                assert!(granted.expires_ms >= model.expires_ms);
                model.expires_ms = granted.expires_ms;
            }
        }
    }

    /// A Granted for a Renew renews that lease of this host, within the policy's bounds.
    fn check_renewed(
        &mut self,
        identity: &str,
        addresses: &[IpAddr],
        renew: &Renew,
        granted: &Granted,
    ) {
        let now = self.now_ms;
        assert_eq!(granted.lease, renew.lease);
        let limits = self.policy().limits_for(identity, addresses).lifetime;
        let model = self
            .model
            .get_mut(&renew.lease)
            .expect("a renewed lease is one the model holds");
        assert_eq!(model.host, identity, "renewed another host's lease");
        assert!(model.expires_ms > now, "renewed a lease past its expiry");
        assert_eq!(model.grants, granted.grants, "a renewal changed the grants");
        assert_eq!(granted.expires_ms, now + u64::from(granted.lifetime) * 1000);
        model.expires_ms = granted.expires_ms;
        let max = limits.max_secs.clamp(1, MAX_LIFETIME_SECS);
        assert!(granted.lifetime >= 1 && granted.lifetime <= max);
        if let Some(asked) = renew.lifetime.filter(|&l| l != 0) {
            assert!(granted.lifetime <= asked.max(limits.min_secs));
            assert_eq!(granted.narrowed, granted.lifetime != asked);
        }
    }

    /// The book, the kernel and the store agree with the model, and no host holds more than
    /// any rule lets it take.
    fn check_book(&self) {
        let book = self.core.book();
        assert_eq!(book.len(), self.model.len());
        for (id, model) in &self.model {
            let lease = book.get(id).expect("the book holds every model lease");
            assert_eq!(*lease.host, model.host);
            assert_eq!(lease.expires_ms, model.expires_ms);
            assert_eq!(lease.grants, model.grants);
            let (held, _) = self
                .kernel
                .get(id)
                .expect("the kernel holds every live lease");
            assert_eq!(held, &lease.grants);
        }
        assert_eq!(self.kernel.len(), book.len(), "the kernel holds an ended lease");
        let stored = self
            .store
            .live_leases()
            .expect("the memory store answers");
        assert_eq!(stored.len(), book.len(), "the store's live leases are not the book's");
        for lease in &stored {
            let held = book.get(&lease.id).expect("a stored live lease is in the book");
            assert_eq!(lease.identity, *held.host);
            assert_eq!(lease.grants, held.grants);
            // Expiries may differ after a failed renewal: a shortening one that reached the
            // kernel but not the store leaves the stored lease longer, as the service intends.
        }
        assert_eq!(
            self.core.next_expiry(),
            self.model.values().map(|l| l.expires_ms).min()
        );
        let most = policies()
            .iter()
            .flat_map(|p| p.rules().filter_map(|(r, _)| r.max_leases))
            .chain(policies().iter().map(|p| p.defaults().max_leases))
            .max()
            .unwrap_or(0);
        for session in &self.sessions {
            if let Some(peer) = &session.peer {
                assert!(book.lease_count(&peer.identity) <= most as usize);
            }
        }
    }
}

fn check_encodes(answer: &Message) {
    let bytes = codec::encode(answer);
    assert!(
        bytes.len() <= MAX_MESSAGE_SIZE,
        "an answer of {} bytes: {answer:?}",
        bytes.len()
    );
    assert_eq!(
        validate_message(answer),
        Ok(()),
        "an invalid answer: {answer:?}"
    );
    assert_eq!(codec::decode(&bytes).as_ref(), Ok(answer));
}

fn check_answer(request: &[u8], answer: &Message) {
    check_encodes(answer);
    assert!(
        matches!(
            answer,
            Message::Welcome(_)
                | Message::Granted(_)
                | Message::Denied(_)
                | Message::Leases(_)
                | Message::Released(_)
        ),
        "not an answer: {answer:?}"
    );
    if let Ok(msg) = codec::decode(request) {
        assert_eq!(
            answer.common().request_id,
            msg.common().request_id,
            "the request id is not echoed"
        );
        match (&msg, answer) {
            // The lease is optional in a Denied (a refusal before the request is judged, such
            // as not-authorized, may leave it out), but never another lease, and always there
            // when it is the lease that is unknown.
            (Message::Renew(Renew { lease, .. }), Message::Denied(d))
            | (Message::Release(Release { lease, .. }), Message::Denied(d)) => {
                assert!(d.lease.is_none_or(|l| l == *lease), "another lease named");
                if d.code == ResultCode::UnknownLease {
                    assert_eq!(d.lease, Some(*lease));
                }
            }
            (Message::Release(r), Message::Released(d)) => assert_eq!(d.lease, r.lease),
            (Message::Renew(r), Message::Granted(g)) => assert_eq!(g.lease, r.lease),
            (Message::Hello(_), Message::Welcome(_))
            | (Message::Open(_), Message::Granted(_))
            | (Message::List(_), Message::Leases(_))
            | (_, Message::Denied(_)) => {}
            (request, answer) => panic!("{answer:?} does not answer {request:?}"),
        }
    } else {
        assert!(matches!(answer, Message::Denied(_)));
    }
}

const PORTS: [u16; 14] = [
    1, 22, 23, 80, 100, 443, 3478, 5432, 8000, 8100, 16384, 16483, 65534, 65535,
];

fn protocol(b: u8) -> Protocol {
    match b % 4 {
        0 => Protocol::Tcp,
        1 => Protocol::Udp,
        2 => Protocol::Sctp,
        _ => Protocol::UdpLite,
    }
}

fn address(s: &mut Script<'_>, gw: &Gateway, who: usize) -> IpAddr {
    match s.u8() % 8 {
        0 | 1 => {
            let own = gw.addresses(who);
            let i = usize::from(s.u8());
            own.get(i % own.len().max(1))
                .copied()
                .unwrap_or(v4(192, 0, 2, 1))
        }
        2 => v4(203, 0, 113, s.u8()),
        3 => v4(192, 0, 2, s.u8()),
        4 => v6([0x2001, 0xdb8, 3, 0, 0, 0, 0, s.u16()]),
        5 => IpAddr::V6(Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped()),
        6 => IpAddr::V4(Ipv4Addr::from(s.u32())),
        _ => {
            let mut b = [0u8; 16];
            for x in &mut b {
                *x = s.u8();
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
    }
}

fn prefix(s: &mut Script<'_>) -> Prefix {
    let (addr, len) = match s.u8() % 10 {
        0 => (v4(10, 99, 0, 0), 16),
        1 => (v4(10, 99, 1, 0), 24),
        2 => (v4(10, 20, 0, 0), 16),
        3 => (v4(10, 20, 3, 4), 32),
        4 => (v6([0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0]), 48),
        5 => (v6([0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0]), 64),
        6 => (v4(0, 0, 0, 0), 0),
        7 => (v4(10, 0, 0, 0), 8),
        8 => (IpAddr::V4(Ipv4Addr::from(s.u32())), s.u8() % 40),
        _ => {
            let mut b = [0u8; 16];
            for x in &mut b {
                *x = s.u8();
            }
            (IpAddr::V6(Ipv6Addr::from(b)), s.u8() % 140)
        }
    };
    Prefix { addr, len }
}

fn lifetime(s: &mut Script<'_>) -> Option<u32> {
    match s.u8() % 9 {
        0 => None,
        1 => Some(0),
        2 => Some(1),
        3 => Some(30),
        4 => Some(600),
        5 => Some(86_400),
        6 => Some(MAX_LIFETIME_SECS),
        7 => Some(MAX_LIFETIME_SECS + 1),
        _ => Some(s.u32()),
    }
}

fn common(s: &mut Script<'_>, gw: &mut Gateway) -> Common {
    let request_id = match s.u8() % 4 {
        0 => None,
        1 => Some(u64::from(s.u8())),
        _ => {
            gw.next_request_id += 1;
            Some(gw.next_request_id)
        }
    };
    let critical = if s.u8().is_multiple_of(16) {
        vec![u64::from(s.u8())]
    } else {
        Vec::new()
    };
    Common {
        request_id,
        critical,
    }
}

fn lease_id(s: &mut Script<'_>, gw: &Gateway) -> LeaseId {
    let pick = s.u8();
    if pick < 240 && !gw.issued.is_empty() {
        // Mostly recent ones, so that scripts keep reaching live leases.
        let back = usize::from(pick) % gw.issued.len();
        gw.issued[gw.issued.len() - 1 - back]
    } else {
        let mut id = [0u8; 16];
        for x in &mut id {
            *x = s.u8();
        }
        LeaseId(id)
    }
}

fn open(s: &mut Script<'_>, gw: &mut Gateway, who: usize) -> Message {
    let common = common(s, gw);
    let t = s.u8();
    let target = if t & 1 == 1 {
        const APPS: [&str; 7] = [
            "https",
            "ssh",
            "postgres",
            "rtp",
            "dev-servers",
            "many",
            "nope",
        ];
        match APPS.get(usize::from(t >> 1) % (APPS.len() + 1)) {
            Some(app) => Target::App((*app).to_owned()),
            None => Target::App(s.text()),
        }
    } else {
        let first = match s.u8() % 3 {
            0 => PORTS[usize::from(s.u8()) % PORTS.len()],
            1 => s.u16(),
            _ => 0,
        };
        let last = match s.u8() % 4 {
            0 => first,
            1 => first.saturating_add(u16::from(s.u8())),
            2 => PORTS[usize::from(s.u8()) % PORTS.len()],
            _ => s.u16(),
        };
        Target::Ports {
            protocol: protocol(t >> 1),
            ports: PortRange { first, last },
        }
    };
    let host = match s.u8() % 4 {
        0 => HostAddresses::Default,
        1 => HostAddresses::List((0..s.u8() % 4).map(|_| address(s, gw, who)).collect()),
        _ => HostAddresses::One(address(s, gw, who)),
    };
    let family = match s.u8() % 4 {
        0 => Some(Family::Ipv4),
        1 => Some(Family::Ipv6),
        _ => None,
    };
    let remotes = (0..s.u8() % 4).map(|_| prefix(s)).collect();
    let lifetime = lifetime(s);
    let app = if s.u8().is_multiple_of(4) {
        Some(AppInfo {
            name: Some(s.text()),
            executable: None,
            uid: Some(1000),
            pid: Some(u32::from(s.u16())),
        })
    } else {
        None
    };
    Message::Open(Open {
        common,
        opening: Opening {
            target,
            host,
            family,
            remotes,
        },
        lifetime,
        app,
    })
}

fn step(s: &mut Script<'_>, gw: &mut Gateway) {
    let op = s.u8();
    let who = usize::from(s.u8()) % gw.sessions.len();
    let request = match op % 12 {
        0 => {
            let n = usize::from(s.u16() % 2048);
            s.bytes(n).to_vec()
        }
        1 => {
            let versions = match s.u8() % 4 {
                0 => vec![VERSION],
                1 => vec![],
                2 => vec![s.u16(), VERSION],
                _ => vec![s.u16()],
            };
            let common = common(s, gw);
            codec::encode(&Message::Hello(Hello {
                common,
                versions,
                capabilities: Capabilities(u64::from(s.u8() & 0x1f)),
                software: None,
            }))
        }
        2..=4 => codec::encode(&open(s, gw, who)),
        5 | 6 => {
            let common = common(s, gw);
            codec::encode(&Message::Renew(Renew {
                common,
                lease: lease_id(s, gw),
                lifetime: lifetime(s),
            }))
        }
        7 => {
            let common = common(s, gw);
            codec::encode(&Message::Release(Release {
                common,
                lease: lease_id(s, gw),
            }))
        }
        8 => {
            let common = common(s, gw);
            codec::encode(&Message::List(List { common }))
        }
        9 => {
            // Time passes; the expiry timer may lag behind it.
            let ms = match s.u8() % 4 {
                0 => u64::from(s.u16()),
                1 => u64::from(s.u16()) * 1000,
                2 => u64::from(s.u32()),
                _ => u64::from(s.u8()) * 60_000,
            };
            gw.now_ms += ms;
            if s.u8().is_multiple_of(2) {
                gw.expire();
            }
            return;
        }
        10 => {
            // A new connection for this host: it must say Hello again.
            gw.sessions[who].connection = ConnectionState::default();
            return;
        }
        _ => {
            let policy = usize::from(s.u8()) % policies().len();
            gw.reload(policy);
            return;
        }
    };
    // Now and then an effect of a grant or a renewal fails, as a kernel or a store may.
    let failure = match s.u8() {
        f @ 0..=23 => Some(Failure {
            at: usize::from(f % 2),
            failure: f / 2,
        }),
        _ => None,
    };
    let answer = gw.handle(who, &request, failure);
    if trace() {
        eprintln!(
            "host {who} at {}: {:?}\n  -> {answer:?}",
            gw.now_ms,
            codec::decode(&request)
        );
    }
    check_answer(&request, &answer);
    gw.check_book();
}

/// Whether to print each request and answer (FWNP_FUZZ_TRACE=1), to read a finding.
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FWNP_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script {
        data,
        exhausted: false,
    };
    let policy = usize::from(s.u8()) % policies().len();
    let seed = u64::from(s.u8());
    let mut gw = Gateway::new(policy, seed);
    // Bounded, so that one input cannot run for long.
    for _ in 0..256 {
        step(&mut s, &mut gw);
        if s.exhausted {
            break;
        }
    }
});
