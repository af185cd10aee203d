//! The gateway's request path without IO: given the time, the connection's state, the peer
//! and the bytes of one request, [`RequestCore`] decides the answer and the effects that must be
//! carried out for it (program the kernel, write the store, audit, notify other connections).
//!
//! It owns the protocol's rules of the request path: a connection's first request is Hello and
//! its only Hello (spec 11.3, connection state before validation), validation, version
//! negotiation, host address resolution, no answer above [`MAX_MESSAGE_SIZE`], reasons fitted to
//! the schema's limit, the lease book's decisions, and the Release replay rule (a Release sent
//! again with the same bytes and request id is answered as the first one was).
//!
//! Policy stays outside: the caller's policy engine reaches the core through [`Decide`]. So do
//! the rate limiter, the certificate checks and every clock: time is `now_ms` (Unix
//! milliseconds of the gateway's clock) and randomness an RNG passed in.
//!
//! # Answer only after the effects
//!
//! A request that changes a lease is not answered at once: [`RequestCore::handle`] returns a
//! [`Step::Pending`], whose effects the driver carries out in order, stopping at the first that
//! fails, and whose outcome it hands to [`RequestCore::finish`]; only that gives the answer. So a
//! Granted never leaves before the kernel acknowledged the elements and the store committed the
//! lease, and a failed effect turns the answer into a Denied (and gives back what the book took).
//!
//! A new lease's two effects, its kernel hold and its store commit, may be carried out at the
//! same time instead ([`Pending::at_once`]), so that its answer waits for the slower of the two
//! rather than for both one after the other. Neither order protects anything: a gateway killed
//! with only the store's half done leaves what one killed after both halves and before the
//! answer leaves too (a stored lease its host was not told of, which runs out at its expiry),
//! and a kernel element without a stored lease is removed by the next start's reconcile. Their
//! outcomes are joined by [`EffectFailure::joined`]. When the kernel fails after the store committed the
//! lease, the core ends the stored lease again (revoked, with an audit record saying why), so
//! that the store never keeps live a lease its host was refused.
//! A backend that may refuse a write (a cluster store that lost its quorum) fits the same way.
//! A Release too waits for its end to be stored, before its elements leave the kernel: one the
//! store refuses puts the lease back into the book, with its elements untouched.
//!
//! The effects of an [`Answer`] are carried out before it is sent too, but their failures change
//! nothing: they are reported (by the driver) and the answer stands.
//!
//! ```
//! use fwnp_proto::gateway::request::{
//!     ConnectionState, CoreConfig, Decide, Decision, HostLimits, Objection, Peer, RequestCore,
//!     Step,
//! };
//! use fwnp_proto::gateway::{LifetimePolicy, PolicyFacts};
//! use fwnp_proto::{Capabilities, Common, Grant, Hello, Message, Open, codec};
//! use rand::SeedableRng;
//! use std::net::IpAddr;
//!
//! /// Allows every opening the host asks for, on its own addresses.
//! struct AllowAll;
//! const LIFETIME: LifetimePolicy = LifetimePolicy { min: 60, max: 3600, default: 600 };
//! impl Decide for AllowAll {
//!     fn host_limits(&self, _: &str, _: &[IpAddr]) -> HostLimits {
//!         HostLimits { lifetime: LIFETIME, max_leases: 16, third_party: false }
//!     }
//!     fn evaluate(&self, _: &str, _: &[IpAddr], hosts: &[IpAddr], open: &Open) -> Decision {
//!         let fwnp_proto::Target::Ports { protocol, ports } = open.opening.target.clone() else {
//!             return Decision::denied(fwnp_proto::ResultCode::UnknownApplication, "no catalogue");
//!         };
//!         let grants = hosts
//!             .iter()
//!             .map(|&host| Grant { protocol, ports, host, remotes: Vec::new(), app: None })
//!             .collect();
//!         Decision::allowed(PolicyFacts {
//!             grants,
//!             grants_narrowed: false,
//!             lifetime: LIFETIME,
//!             max_leases: Some(16),
//!         })
//!     }
//!     fn still_allows(&self, _: &str, _: &[IpAddr], _: &[Grant]) -> Result<LifetimePolicy, Objection> {
//!         Ok(LIFETIME)
//!     }
//! }
//!
//! let mut core = RequestCore::new(CoreConfig { epoch: 7, max_streams: 8, kill_connections: false });
//! let addresses = ["192.0.2.10".parse().unwrap()];
//! let peer = Peer {
//!     identity: Some("fwnp://host/web-01"),
//!     no_identity: "",
//!     remote: "192.0.2.10:4433".parse().unwrap(),
//!     addresses: &addresses,
//! };
//! let hello = Message::Hello(Hello {
//!     common: Common { request_id: Some(1), critical: Vec::new() },
//!     versions: vec![1],
//!     capabilities: Capabilities::default(),
//!     software: None,
//! });
//! let mut rng = rand::rngs::StdRng::seed_from_u64(1);
//! let step = core.handle(1_700_000_000_000, ConnectionState::default(), &peer,
//!     &codec::encode(&hello), &AllowAll, &mut rng);
//! let Step::Answer(answer) = step else { panic!("a Hello is answered at once") };
//! assert!(matches!(answer.message, Message::Welcome(ref w) if w.epoch == 7));
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use super::{
    LeaseBook, LifetimePolicy, OpenOutcome, PolicyFacts, Refusal, Renewed, negotiate_version,
    resolve_host_addresses,
};
use crate::codec::{self, DecodeError};
use crate::message::{
    Capabilities, Common, Denied, Epoch, Grant, Granted, Hello, LeaseId, Leases, Limits, List,
    MAX_MESSAGE_SIZE, Message, Open, Release, Released, Renew, ResultCode, RevokeReason, Welcome,
};
use crate::validate::{MAX_REASON_LEN, validate_request};

/// How long a Release's answer is remembered for a retry of it, in milliseconds.
pub const RELEASE_REPLAY_WINDOW_MS: u64 = 60_000;

/// How many Release answers are remembered at most; the oldest go first beyond.
pub const RELEASE_REPLAY_CAPACITY: usize = 1_000_000;

/// A reason cut to the protocol's limit on a character boundary, marked as cut with `...`, so
/// that a long policy reason or error text never makes an answer invalid.
pub fn fit_reason(reason: impl Into<String>) -> String {
    let mut reason = reason.into();
    if reason.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN - 3;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// A Denied with `code` and `reason` (cut to the protocol's limit) for the request `request_id`.
pub fn denied(request_id: Option<u64>, code: ResultCode, reason: impl Into<String>) -> Denied {
    Denied {
        common: Common {
            request_id,
            critical: Vec::new(),
        },
        code,
        reason: Some(fit_reason(reason)),
        retry_after: None,
        lease: None,
        unsupported: Vec::new(),
    }
}

/// Whether a Granted carrying `grants` certainly fits in MAX_MESSAGE_SIZE, judged without
/// encoding it: a Granted's fixed part is under 100 bytes; a grant's own fields (protocol, two
/// ports, a 16-byte address, keys and map overhead) under 64 bytes plus its application name;
/// each remote prefix under 24 bytes (a 16-byte address, a length, array and map overhead).
fn certainly_fits(grants: &[Grant]) -> bool {
    let bound = grants.iter().fold(100usize, |sum, g| {
        sum.saturating_add(64 + g.app.as_ref().map_or(0, String::len))
            .saturating_add(24usize.saturating_mul(g.remotes.len()))
    });
    bound < MAX_MESSAGE_SIZE
}

/// The size of the largest Granted `grants` can make, or 0 when it certainly fits.
fn largest_granted(request_id: Option<u64>, grants: &[Grant]) -> usize {
    if certainly_fits(grants) {
        return 0;
    }
    codec::encode(&Message::Granted(Granted {
        common: Common {
            request_id,
            critical: Vec::new(),
        },
        lease: LeaseId([0xff; 16]),
        grants: grants.to_vec(),
        lifetime: u32::MAX,
        expires_ms: u64::MAX,
        renew_after: u32::MAX,
        epoch: Epoch::MAX,
        narrowed: true,
    }))
    .len()
}

/// The lifetime bounds and rights the policy gives a host, announced in Welcome and bounding
/// its renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// The widest lifetime bounds of the rules that apply to the host.
    pub lifetime: LifetimePolicy,
    /// The most live leases it may hold.
    pub max_leases: u32,
    /// Whether it may open addresses it does not hold.
    pub third_party: bool,
}

/// What the policy decided for one Open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The facts of an allowed Open, or the code of a refusal.
    pub verdict: Result<PolicyFacts, ResultCode>,
    /// The rule that decided, if one did.
    pub rule: Option<String>,
    /// Why, for the host, the operator and the audit trail.
    pub reason: String,
}

impl Decision {
    /// An allowance by no named rule, for tests and simple policies.
    pub fn allowed(facts: PolicyFacts) -> Self {
        Decision {
            verdict: Ok(facts),
            rule: None,
            reason: "allowed".into(),
        }
    }

    /// A refusal by no named rule, for tests and simple policies.
    pub fn denied(code: ResultCode, reason: impl Into<String>) -> Self {
        Decision {
            verdict: Err(code),
            rule: None,
            reason: reason.into(),
        }
    }
}

/// Why the current policy no longer allows a live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objection {
    /// Why, in words.
    pub reason: String,
    /// The rule that refuses it, if one does.
    pub rule: Option<String>,
}

/// The policy, as the core asks it. The gateway implements it over its compiled policy; tests
/// implement it over a few facts.
pub trait Decide {
    /// The limits announced in Welcome, for a host holding `addresses`.
    fn host_limits(&self, identity: &str, addresses: &[IpAddr]) -> HostLimits;

    /// The decision for `open` on the host addresses `hosts` (already resolved), by a host
    /// holding `addresses`. Opening an address not in `addresses` needs third-party rights,
    /// which the policy judges here.
    fn evaluate(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        hosts: &[IpAddr],
        open: &Open,
    ) -> Decision;

    /// Whether a live lease's grants are still allowed, asked at each renewal, and if so the
    /// lifetime bounds of the rules that allow them, which bound the renewed lifetime (spec
    /// Section 11.2): the narrowest where its grants are allowed by rules of different bounds,
    /// so that no grant outlives what its own rule allows.
    fn still_allows(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        grants: &[Grant],
    ) -> Result<LifetimePolicy, Objection>;
}

/// What the core is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreConfig {
    /// The gateway's epoch, told in Welcome, Granted and Leases.
    pub epoch: Epoch,
    /// The request streams a host may open at once, announced in Welcome.
    pub max_streams: u32,
    /// Whether a released or revoked lease also ends the live connections of its openings.
    pub kill_connections: bool,
}

/// The state of one connection that the request path reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionState {
    /// Whether its Hello was answered with Welcome.
    pub welcomed: bool,
}

/// Who sent a request.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The host identity its certificate names; `None` if it names none usable.
    pub identity: Option<&'a str>,
    /// Why the certificate names no identity (when `identity` is `None`).
    pub no_identity: &'a str,
    /// The connection's source address and port.
    pub remote: SocketAddr,
    /// The host addresses it may open: its certificate's IP SANs, or else the connection's
    /// source address.
    pub addresses: &'a [IpAddr],
}

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Granted and not yet ended.
    Live,
    /// The host released it.
    Released,
    /// Its lifetime ran out.
    Expired,
    /// The gateway or an operator ended it.
    Revoked,
}

impl LeaseState {
    /// The name stored and shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            LeaseState::Live => "live",
            LeaseState::Released => "released",
            LeaseState::Expired => "expired",
            LeaseState::Revoked => "revoked",
        }
    }

    /// The state with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "live" => LeaseState::Live,
            "released" => LeaseState::Released,
            "expired" => LeaseState::Expired,
            "revoked" => LeaseState::Revoked,
            _ => return None,
        })
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseEnd {
    /// The host released it.
    Released,
    /// Its lifetime ran out.
    Expired,
    /// It was revoked, for this reason.
    Revoked(RevokeReason),
}

impl LeaseEnd {
    /// The state the lease is left in.
    pub fn state(self) -> LeaseState {
        match self {
            LeaseEnd::Released => LeaseState::Released,
            LeaseEnd::Expired => LeaseState::Expired,
            LeaseEnd::Revoked(_) => LeaseState::Revoked,
        }
    }
}

/// What the audit trail records of a request or a lease's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audit {
    /// A request was refused.
    Refused {
        /// The host's identity, if its certificate names one.
        identity: Option<String>,
        /// The code of the Denied.
        code: ResultCode,
        /// Why, in words (not cut: the trail keeps it whole).
        reason: String,
        /// The policy rule that refused, if one did.
        rule: Option<String>,
        /// What was asked.
        request: Asked,
    },
    /// An Open was granted: a new lease, or a live one extended.
    Granted {
        /// The lease after the Open.
        lease: super::Lease,
        /// The Open (shared with the request's own record of it, which needs it should the
        /// answer turn into a refusal).
        open: Arc<Open>,
        /// The policy rule that allowed it.
        rule: Option<String>,
        /// Why, in words.
        reason: String,
    },
    /// A lease was renewed.
    Renewed {
        /// The lease after the renewal.
        lease: super::Lease,
    },
    /// A lease ended.
    Ended {
        /// The lease as it was.
        lease: super::Lease,
        /// How.
        end: LeaseEnd,
        /// Who ended it: the host's identity, `gateway`, the operator.
        by: Option<String>,
        /// Why, in words.
        why: Option<String>,
    },
}

/// What a refused request asked, for its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// An opening.
    Open(Box<Open>),
    /// Something about this lease (Renew, Release).
    Lease(LeaseId),
    /// Anything else (Hello, List, an undecodable item).
    Other,
}

/// One audit record, with its time and the peer it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When, Unix milliseconds.
    pub time_ms: u64,
    /// The peer's address, for records of a request.
    pub peer: Option<SocketAddr>,
    /// What happened.
    pub what: Audit,
}

/// One write to the lease store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store a new live lease.
    Insert {
        /// The lease as the book holds it.
        lease: super::Lease,
        /// The lifetime asked (`None`: the policy's default).
        requested_lifetime: Option<u32>,
        /// The address and port the host asked from.
        peer: SocketAddr,
        /// The most live leases the host may hold, this one included (`None`: no limit): the
        /// book checked it, and a store shared by several gateways checks it again across them.
        max_leases: Option<u32>,
    },
    /// Extend a live lease (a Renew, or an Open repeated).
    Renew {
        /// The lease.
        id: LeaseId,
        /// When.
        renewed_ms: u64,
        /// Its new expiry.
        expires_ms: u64,
        /// The lifetime granted this time, in seconds.
        granted_lifetime: u32,
    },
    /// End a live lease.
    End {
        /// The lease.
        id: LeaseId,
        /// How it ended.
        end: LeaseEnd,
        /// When.
        ended_ms: u64,
        /// Who ended it.
        by: Option<String>,
        /// Why, in words.
        why: Option<String>,
    },
    /// An audit record committed with the lease it describes.
    Audit(AuditRecord),
}

/// One thing the driver must do for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The connection's Hello was answered: record it as welcomed, and whether it accepts
    /// notices (only then may they be sent, spec 5.3).
    Welcomed {
        /// Whether the Hello set the NOTICES capability.
        notices: bool,
    },
    /// Program the kernel: the lease holds the elements of its grants until `expires_ms`
    /// (adding any that are missing). If the lease has left the book meanwhile (a revocation
    /// raced with it), the elements are given up again and the effect fails with
    /// [`EffectFailure::LeaseEnded`].
    Hold {
        /// The lease.
        lease: LeaseId,
        /// Its grants.
        grants: Vec<Grant>,
        /// Its expiry, Unix milliseconds.
        expires_ms: u64,
    },
    /// Program the kernel: the lease gives up the elements of its grants; those no other lease
    /// holds leave the kernel.
    Unhold {
        /// The lease.
        lease: LeaseId,
        /// Its grants.
        grants: Vec<Grant>,
        /// Whether the live connections of the elements removed are ended too.
        kill_connections: bool,
    },
    /// Write the store, in one transaction, and wait for the commit.
    Commit(Vec<Write>),
    /// Record in the audit trail without holding up the answer.
    Audit(AuditRecord),
    /// A List was answered: the driver records the first of a host's in an interval and counts
    /// the others, so that Lists cannot flood the trail.
    Listed {
        /// The host.
        identity: String,
    },
    /// Send a notice to every connection of `host` that accepts notices.
    Notify {
        /// The host's identity.
        host: Arc<str>,
        /// The notice.
        notice: Message,
    },
}

/// Why an effect of a [`Pending`] step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EffectFailure {
    /// The kernel refused.
    #[error("kernel: {0}")]
    Kernel(String),
    /// The kernel refused while the store committed the writes carried out at the same time
    /// ([`Pending::at_once`]): the store holds the new lease and its Granted record, and
    /// [`RequestCore::finish`] ends the lease there again. Told to the host as [`Self::Kernel`].
    #[error("kernel: {0}")]
    KernelAfterCommit(String),
    /// The store refused or failed.
    #[error("store: {0}")]
    Store(String),
    /// The lease ended (was revoked) while its elements were being programmed.
    #[error("the lease ended while its opening was being programmed")]
    LeaseEnded,
    /// The store refused a new lease over its host's quota as the cluster counts it (spec
    /// 12.1): the member granted it before it heard of the others' grants. Told to the host as
    /// quota-exceeded.
    #[error("{0}")]
    QuotaExceeded(String),
}

impl EffectFailure {
    /// The outcome of a kernel hold (`held`) and a store commit (`committed`) carried out at the
    /// same time ([`Pending::at_once`]), for [`RequestCore::finish`]. A kernel that refused
    /// while the store committed is [`EffectFailure::KernelAfterCommit`]; when both failed,
    /// nothing was stored and the kernel's failure is told, as when they are carried out in
    /// order. A lease that ended meanwhile stays [`EffectFailure::LeaseEnded`] whatever the
    /// store did: whoever ended it also ends it in the store.
    ///
    /// ```
    /// use fwnp_proto::gateway::request::EffectFailure;
    ///
    /// let kernel = || Err(EffectFailure::Kernel("no buffer space".into()));
    /// let store = || Err(EffectFailure::Store("disk full".into()));
    /// assert_eq!(EffectFailure::joined(Ok(()), Ok(())), Ok(()));
    /// assert_eq!(
    ///     EffectFailure::joined(kernel(), Ok(())),
    ///     Err(EffectFailure::KernelAfterCommit("no buffer space".into()))
    /// );
    /// assert_eq!(EffectFailure::joined(kernel(), store()), kernel());
    /// assert_eq!(EffectFailure::joined(Ok(()), store()), store());
    /// ```
    pub fn joined(
        held: Result<(), EffectFailure>,
        committed: Result<(), EffectFailure>,
    ) -> Result<(), EffectFailure> {
        match (held, committed) {
            (Err(EffectFailure::Kernel(e)), Ok(())) => Err(EffectFailure::KernelAfterCommit(e)),
            (Err(failure), _) | (Ok(()), Err(failure)) => Err(failure),
            (Ok(()), Ok(())) => Ok(()),
        }
    }
}

/// An answer and the effects to carry out before it is sent; their failures do not change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The answer.
    pub message: Message,
    /// What to do first.
    pub effects: Vec<Effect>,
    /// What became of the request in a word, for counters (`welcome`, `granted`, `renewed`,
    /// `released`, `listed`, or the code of a Denied); `None` for a Release answered again.
    pub label: Option<&'static str>,
}

impl Answer {
    fn new(message: Message, label: &'static str) -> Self {
        Answer {
            message,
            effects: Vec::new(),
            label: Some(label),
        }
    }
}

/// What to do next with a request.
#[derive(Debug)]
pub enum Step {
    /// Carry out the effects, then send the answer.
    Answer(Answer),
    /// Carry out the effects in order, stopping at the first failure (or at once, see
    /// [`Pending::at_once`]), then call [`RequestCore::finish`] with the outcome for the answer.
    Pending(Pending),
}

/// A request whose answer waits for its effects.
#[derive(Debug)]
pub struct Pending {
    effects: Vec<Effect>,
    ticket: Ticket,
    at_once: bool,
}

impl Pending {
    /// The effects to carry out, in order.
    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Whether the effects are a new lease's [`Effect::Hold`] and [`Effect::Commit`], which
    /// may be carried out at the same time, each whatever becomes of the other, their outcomes
    /// joined by [`EffectFailure::joined`]. In order, stopping at the first failure, is right
    /// too. A renewal, or an Open that extends a live lease, is always carried out in order:
    /// that order keeps a kernel element from outliving its stored lease should the gateway
    /// die between the two.
    ///
    /// ```
    /// # use fwnp_proto::gateway::request::*;
    /// # use fwnp_proto::gateway::{LifetimePolicy, PolicyFacts};
    /// # use fwnp_proto::{
    /// #     Common, Grant, HostAddresses, Message, Open, Opening, PortRange, Protocol, Target, codec,
    /// # };
    /// # use rand::SeedableRng;
    /// # use std::net::IpAddr;
    /// # struct Allow;
    /// # const LIFETIME: LifetimePolicy = LifetimePolicy { min: 60, max: 3600, default: 600 };
    /// # impl Decide for Allow {
    /// #     fn host_limits(&self, _: &str, _: &[IpAddr]) -> HostLimits {
    /// #         HostLimits { lifetime: LIFETIME, max_leases: 16, third_party: false }
    /// #     }
    /// #     fn evaluate(&self, _: &str, _: &[IpAddr], hosts: &[IpAddr], _: &Open) -> Decision {
    /// #         let grants = vec![Grant { protocol: Protocol::Tcp, ports: PortRange::single(7001),
    /// #             host: hosts[0], remotes: Vec::new(), app: None }];
    /// #         Decision::allowed(PolicyFacts { grants, grants_narrowed: false,
    /// #             lifetime: LIFETIME, max_leases: Some(16) })
    /// #     }
    /// #     fn still_allows(&self, _: &str, _: &[IpAddr], _: &[Grant]) -> Result<LifetimePolicy, Objection> {
    /// #         Ok(LIFETIME)
    /// #     }
    /// # }
    /// let mut core = RequestCore::new(CoreConfig { epoch: 7, max_streams: 8, kill_connections: false });
    /// let addresses = ["192.0.2.10".parse().unwrap()];
    /// let peer = Peer {
    ///     identity: Some("fwnp://host/web-01"),
    ///     no_identity: "",
    ///     remote: "192.0.2.10:4433".parse().unwrap(),
    ///     addresses: &addresses,
    /// };
    /// let open = codec::encode(&Message::Open(Open {
    ///     common: Common { request_id: Some(2), critical: Vec::new() },
    ///     opening: Opening {
    ///         target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(7001) },
    ///         host: HostAddresses::Default,
    ///         family: None,
    ///         remotes: Vec::new(),
    ///     },
    ///     lifetime: None,
    ///     app: None,
    /// }));
    /// let welcomed = ConnectionState { welcomed: true };
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    /// let Step::Pending(pending) = core.handle(1_700_000_000_000, welcomed, &peer, &open, &Allow, &mut rng)
    /// else { panic!("a new lease waits for its effects") };
    /// assert!(pending.at_once(), "a new lease: kernel and store at the same time");
    /// assert!(matches!(pending.effects(), [Effect::Hold { .. }, Effect::Commit(_)]));
    /// ```
    pub fn at_once(&self) -> bool {
        self.at_once
    }

    /// Takes the effects out, in order, leaving none: a driver that carries them out by value
    /// moves what they hold (the lease, its audit record) into its own writes instead of
    /// copying it. [`RequestCore::finish`] does not look at them.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The lease this request made or renewed.
    pub fn lease(&self) -> LeaseId {
        match &self.ticket {
            Ticket::Open { lease, .. } => *lease,
            Ticket::Renew { renewed, .. } => renewed.grant.lease.id,
            Ticket::Release { lease, .. } => lease.id,
        }
    }
}

#[derive(Debug)]
enum Ticket {
    Open {
        /// The lease made or extended.
        lease: LeaseId,
        /// Whether the Open made it (a failure then takes it out of the book again).
        new: bool,
        /// The live lease it extended instead, as it was before (a failure gives that back).
        extension: Option<Renewed>,
        /// The answer, should the effects succeed.
        granted: Granted,
        open: Arc<Open>,
        /// The host's identity, the book's shared name for it.
        identity: Arc<str>,
        peer: SocketAddr,
    },
    Renew {
        renewed: Renewed,
        renew: Renew,
        identity: Arc<str>,
        peer: SocketAddr,
    },
    Release {
        /// The lease as the book held it, put back should its end not be stored.
        lease: Box<super::Lease>,
        release: Release,
        identity: Arc<str>,
        peer: SocketAddr,
        /// Where its answer is remembered for a retry, once it is Released.
        replay: Option<ReplayKey>,
    },
}

/// A request after [`RequestCore::prepare`]: answered already, or waiting for the lease book.
#[derive(Debug)]
pub struct Prepared(Ready);

impl Prepared {
    /// The answer, if the request was decided without the lease book (it was undecodable,
    /// broke the connection's Hello rules or the protocol's, was a Hello, or the policy
    /// refused the Open); otherwise the request itself, for [`RequestCore::handle_prepared`].
    pub fn into_answer(self) -> Result<Answer, Prepared> {
        match self.0 {
            Ready::Answered(answer) => Ok(*answer),
            other => Err(Prepared(other)),
        }
    }
}

#[derive(Debug)]
enum Ready {
    /// Boxed: an answer is several times the size of a request waiting for the book.
    Answered(Box<Answer>),
    Open(Box<AllowedOpen>),
    Renew(Renew),
    /// With its bytes, for the replay rule.
    Release(Release, Arc<[u8]>),
    List(List),
}

/// An Open the policy allowed, with the facts and the words of its decision.
#[derive(Debug)]
struct AllowedOpen {
    open: Open,
    facts: PolicyFacts,
    rule: Option<String>,
    reason: String,
}

/// A Release's bytes, the answer it got and when, Unix ms.
type Remembered = (Arc<[u8]>, Message, u64);

/// A Release's place in the replay memory: (identity, request id), and the request's bytes.
type ReplayKey = ((String, u64), Arc<[u8]>);

/// The Release answers remembered for a retry, under (identity, request id).
#[derive(Debug, Default)]
struct ReplayMemory {
    answers: HashMap<(String, u64), Remembered>,
    /// Keys in the order remembered, with the time they were, to forget the oldest first.
    order: VecDeque<(u64, (String, u64))>,
}

impl ReplayMemory {
    fn forget_before(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front()
            && (now_ms.saturating_sub(*at) >= RELEASE_REPLAY_WINDOW_MS
                || self.order.len() > RELEASE_REPLAY_CAPACITY)
        {
            if let Some((at, key)) = self.order.pop_front()
                && self.answers.get(&key).is_some_and(|(_, _, t)| *t == at)
            {
                self.answers.remove(&key);
            }
        }
    }

    fn get(&mut self, now_ms: u64, key: &(String, u64), bytes: &[u8]) -> Option<Message> {
        self.forget_before(now_ms);
        self.answers
            .get(key)
            .filter(|(previous, _, _)| **previous == *bytes)
            .map(|(_, answer, _)| answer.clone())
    }

    fn insert(&mut self, now_ms: u64, key: (String, u64), bytes: Arc<[u8]>, answer: Message) {
        self.order.push_back((now_ms, key.clone()));
        self.answers.insert(key, (bytes, answer, now_ms));
        self.forget_before(now_ms);
    }
}

/// A lease revoked by the gateway or the operator: the effects that end it, and the notice
/// for its host, which the caller delivers as it needs (at once, or waiting for delivery).
#[derive(Debug)]
pub struct Revocation {
    /// The lease as it was.
    pub lease: super::Lease,
    /// Kernel and store, in order.
    pub effects: Vec<Effect>,
    /// The Revoked notice.
    pub notice: Message,
}

/// The gateway's request path: the lease book, the epoch, the Release replay memory.
#[derive(Debug)]
pub struct RequestCore {
    config: CoreConfig,
    book: LeaseBook,
    replay: ReplayMemory,
}

impl RequestCore {
    /// A core with an empty book.
    pub fn new(config: CoreConfig) -> Self {
        RequestCore {
            config,
            book: LeaseBook::new(),
            replay: ReplayMemory::default(),
        }
    }

    /// The gateway's epoch.
    pub fn epoch(&self) -> Epoch {
        self.config.epoch
    }

    /// Takes `epoch` as the gateway's from now on: the driver replaced its lease state (the
    /// book already holds the new state's leases), so Welcome, Granted and Leases tell hosts
    /// the new one. A driver that prepares requests outside the core's lock
    /// ([`RequestCore::prepare`]) prepares them with the new epoch too.
    pub fn set_epoch(&mut self, epoch: Epoch) {
        self.config.epoch = epoch;
    }

    /// The live leases.
    pub fn book(&self) -> &LeaseBook {
        &self.book
    }

    /// The live leases, to restore those of an earlier run.
    pub fn book_mut(&mut self) -> &mut LeaseBook {
        &mut self.book
    }

    /// Decides what becomes of one request: the bytes of one stream from `peer`, on a
    /// connection in state `connection`, at `now_ms`. The same as [`RequestCore::prepare`]
    /// followed by [`RequestCore::handle_prepared`], for callers that hold the core alone.
    ///
    /// Leases past their expiry are not reaped here (their ends are no business of this
    /// request's answer): the driver calls [`RequestCore::expire_due`] on its timer; until then
    /// the book already treats them as gone.
    pub fn handle<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        connection: ConnectionState,
        peer: &Peer<'_>,
        bytes: &[u8],
        decide: &dyn Decide,
        rng: &mut R,
    ) -> Step {
        let prepared = Self::prepare(&self.config, now_ms, connection, peer, bytes, decide);
        self.handle_prepared(now_ms, peer, prepared, decide, rng)
    }

    /// The part of a request's handling that needs no lease book, done once: decoding, the
    /// connection's Hello rules, validation, the answer to a Hello, the host addresses an Open
    /// names and the policy's decision on them, and the bound on the size of its Granted. It
    /// takes no core, so that a driver sharing the core between threads does it before it
    /// takes the core's lock, which it then holds only for [`RequestCore::handle_prepared`].
    ///
    /// `config` must be the core's own (a copy of what it was made with).
    ///
    /// ```
    /// # use fwnp_proto::gateway::request::*;
    /// # use fwnp_proto::{Grant, Open, codec, Message, List, Common};
    /// # use std::net::IpAddr;
    /// # struct Nothing;
    /// # impl Decide for Nothing {
    /// #     fn host_limits(&self, _: &str, _: &[IpAddr]) -> HostLimits { unreachable!() }
    /// #     fn evaluate(&self, _: &str, _: &[IpAddr], _: &[IpAddr], _: &Open) -> Decision { unreachable!() }
    /// #     fn still_allows(&self, _: &str, _: &[IpAddr], _: &[Grant]) -> Result<fwnp_proto::gateway::LifetimePolicy, Objection> { unreachable!() }
    /// # }
    /// let config = CoreConfig { epoch: 7, max_streams: 8, kill_connections: false };
    /// let addresses = ["192.0.2.10".parse().unwrap()];
    /// let peer = Peer {
    ///     identity: Some("fwnp://host/web-01"),
    ///     no_identity: "",
    ///     remote: "192.0.2.10:4433".parse().unwrap(),
    ///     addresses: &addresses,
    /// };
    /// let list = codec::encode(&Message::List(List {
    ///     common: Common { request_id: Some(3), critical: Vec::new() },
    /// }));
    /// // A List on a connection that has not said Hello is answered without the book.
    /// let prepared = RequestCore::prepare(
    ///     &config, 1_700_000_000_000, ConnectionState::default(), &peer, &list, &Nothing);
    /// let answer = prepared.into_answer().expect("refused before the book");
    /// assert!(matches!(answer.message, Message::Denied(ref d)
    ///     if d.code == fwnp_proto::ResultCode::HelloRequired));
    /// ```
    pub fn prepare(
        config: &CoreConfig,
        now_ms: u64,
        connection: ConnectionState,
        peer: &Peer<'_>,
        bytes: &[u8],
        decide: &dyn Decide,
    ) -> Prepared {
        let answered = |answer: Answer| Prepared(Ready::Answered(Box::new(answer)));
        // Who asks before what is asked (spec 4.1 and 11.3 step 3): a connection whose
        // certificate names no identity is answered not-authorized, whatever its bytes.
        let Some(identity) = peer.identity else {
            return answered(Answer::new(
                Message::Denied(denied(
                    codec::peek_request_id(bytes),
                    ResultCode::NotAuthorized,
                    format!(
                        "the certificate names no host identity: {}",
                        peer.no_identity
                    ),
                )),
                ResultCode::NotAuthorized.name(),
            ));
        };
        let msg = match codec::decode_request(bytes) {
            Ok(msg) => msg,
            Err(e) => return answered(refuse_undecodable(now_ms, peer, bytes, &e)),
        };
        let refused = |code: ResultCode, reason: String| {
            answered(refuse(now_ms, identity, peer, &msg, code, reason, None))
        };
        // The connection's state comes before the request's own validity (spec 11.3, steps 4
        // and 5): a host that skipped Hello learns that first, whatever else is wrong.
        match &msg {
            Message::Hello(_) if connection.welcomed => {
                return refused(
                    ResultCode::MalformedRequest,
                    "Hello was already answered on this connection".into(),
                );
            }
            Message::Hello(_) => {}
            _ if !connection.welcomed => {
                return refused(
                    ResultCode::HelloRequired,
                    "the first request of a connection is Hello".into(),
                );
            }
            _ => {}
        }
        if let Err(e) = validate_request(&msg) {
            return refused(e.result_code(), e.to_string());
        }
        match msg {
            Message::Hello(hello) => {
                answered(Self::hello(config, now_ms, identity, peer, &hello, decide))
            }
            Message::Open(open) => Self::prepare_open(now_ms, identity, peer, open, decide),
            Message::Renew(renew) => Prepared(Ready::Renew(renew)),
            Message::Release(release) => Prepared(Ready::Release(release, Arc::from(bytes))),
            Message::List(list) => Prepared(Ready::List(list)),
            other => {
                let reason = format!("{} is not a request", other.message_type().name());
                answered(refuse(
                    now_ms,
                    identity,
                    peer,
                    &other,
                    ResultCode::MalformedRequest,
                    reason,
                    None,
                ))
            }
        }
    }

    /// The lease book's part of a request prepared by [`RequestCore::prepare`] from the same
    /// `peer`: opening, renewing, releasing or listing leases. The policy is asked here only
    /// whether a lease being renewed is still allowed, which needs the lease's grants.
    pub fn handle_prepared<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        peer: &Peer<'_>,
        prepared: Prepared,
        decide: &dyn Decide,
        rng: &mut R,
    ) -> Step {
        let identity = match (&prepared.0, peer.identity) {
            (Ready::Answered(_), _) | (_, None) => "",
            (_, Some(identity)) => identity,
        };
        match prepared.0 {
            Ready::Answered(answer) => Step::Answer(*answer),
            Ready::Open(open) => self.open(now_ms, identity, peer, *open, rng),
            Ready::Renew(renew) => self.renew(now_ms, identity, peer, &renew, decide),
            Ready::Release(release, bytes) => {
                self.release_once(now_ms, identity, peer, release, bytes)
            }
            Ready::List(list) => Step::Answer(self.list(now_ms, identity, &list)),
        }
    }

    fn hello(
        config: &CoreConfig,
        now_ms: u64,
        identity: &str,
        peer: &Peer<'_>,
        hello: &Hello,
        decide: &dyn Decide,
    ) -> Answer {
        let version = match negotiate_version(hello) {
            Ok(version) => version,
            Err(refusal) => {
                let request = Message::Hello(hello.clone());
                return refuse(
                    now_ms,
                    identity,
                    peer,
                    &request,
                    refusal.code(),
                    refusal.to_string(),
                    None,
                );
            }
        };
        let limits = decide.host_limits(identity, peer.addresses);
        let mut capabilities = Capabilities::PORT_RANGES
            | Capabilities::REMOTE_PREFIXES
            | Capabilities::APPLICATIONS
            | Capabilities::NOTICES;
        if limits.third_party {
            capabilities |= Capabilities::THIRD_PARTY;
        }
        let mut answer = Answer::new(
            Message::Welcome(Welcome {
                common: Common {
                    request_id: hello.common.request_id,
                    critical: Vec::new(),
                },
                version,
                // What the gateway offers this host; the client's bits are informational
                // (spec 14).
                capabilities: Capabilities(capabilities),
                limits: Limits {
                    max_message_size: MAX_MESSAGE_SIZE as u32,
                    max_streams: config.max_streams,
                    min_lifetime: limits.lifetime.min,
                    max_lifetime: limits.lifetime.max,
                    max_leases: Some(limits.max_leases),
                },
                epoch: config.epoch,
                time_ms: now_ms,
                identity: identity.to_owned(),
                addresses: peer.addresses.to_vec(),
            }),
            "welcome",
        );
        answer.effects.push(Effect::Welcomed {
            notices: hello.capabilities.has(Capabilities::NOTICES),
        });
        answer
    }

    /// An Open's part that needs no book: the host addresses it names, the policy's decision
    /// on them, and the bound on its answer's size.
    fn prepare_open(
        now_ms: u64,
        identity: &str,
        peer: &Peer<'_>,
        open: Open,
        decide: &dyn Decide,
    ) -> Prepared {
        let refused = |open: Open, code: ResultCode, reason: String, rule: Option<String>| {
            let request = Message::Open(open);
            Prepared(Ready::Answered(Box::new(refuse(
                now_ms, identity, peer, &request, code, reason, rule,
            ))))
        };
        // An address the host does not hold is refused here (step 6 of spec 11.3, before the
        // policy's deny rules) unless some rule gives the host third-party rights; then the
        // policy decides, rule by rule, whether it may open that address. The host's limits
        // are asked only for such an address, off the common path.
        let foreign = open
            .opening
            .host
            .addresses()
            .iter()
            .any(|a| !peer.addresses.contains(a));
        let third_party = foreign && decide.host_limits(identity, peer.addresses).third_party;
        let hosts = match resolve_host_addresses(&open.opening, peer.addresses, third_party) {
            Ok(hosts) => hosts,
            Err(refusal) => return refused(open, refusal.code(), refusal.to_string(), None),
        };
        let decision = decide.evaluate(identity, peer.addresses, &hosts, &open);
        let facts = match decision.verdict {
            Ok(facts) => facts,
            Err(code) => return refused(open, code, decision.reason, decision.rule),
        };
        // No answer may exceed MAX_MESSAGE_SIZE (spec 5.4): measure the largest Granted these
        // grants can make before taking a lease for them.
        let largest = largest_granted(open.common.request_id, &facts.grants);
        if largest > MAX_MESSAGE_SIZE {
            return refused(
                open,
                ResultCode::DeniedByPolicy,
                format!(
                    "the grant would not fit in one answer ({largest} bytes, the limit is {MAX_MESSAGE_SIZE}): ask for fewer remote prefixes"
                ),
                decision.rule,
            );
        }
        Prepared(Ready::Open(Box::new(AllowedOpen {
            open,
            facts,
            rule: decision.rule,
            reason: decision.reason,
        })))
    }

    /// An allowed Open's part in the book.
    fn open<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        identity: &str,
        peer: &Peer<'_>,
        allowed: AllowedOpen,
        rng: &mut R,
    ) -> Step {
        let AllowedOpen {
            open,
            facts,
            rule,
            reason,
        } = allowed;
        let max_leases = facts.max_leases;
        let outcome = match self.book.open_taking(now_ms, identity, &open, facts, rng) {
            Ok(outcome) => outcome,
            Err(refusal) => {
                let request = Message::Open(open);
                return Step::Answer(refuse(
                    now_ms,
                    identity,
                    peer,
                    &request,
                    refusal.code(),
                    refusal.to_string(),
                    rule,
                ));
            }
        };
        // The lease the book gave back is the audit record's; the store's row and the kernel
        // take a copy of what they need, and the answer is made now, so that the request
        // keeps neither the lease nor its grants while its effects are carried out.
        let (grant, previous) = match outcome {
            OpenOutcome::NewLease(grant) => (grant, None),
            OpenOutcome::Extended {
                grant,
                previous_expires_ms,
                previous_lifetime,
            } => (grant, Some((previous_expires_ms, previous_lifetime))),
        };
        let previous_expires_ms = previous.map(|(expires_ms, _)| expires_ms);
        // An extension is a renewal of the lease the Open matched: one whose effects fail is
        // taken back from the book as a failed Renew is (spec 11.2: the lifetime last granted
        // is that of the last Granted sent).
        let extension = previous.map(|(previous_expires_ms, previous_lifetime)| Renewed {
            grant: grant.clone(),
            previous_expires_ms,
            previous_lifetime,
        });
        let granted = grant.to_granted(open.common.request_id, self.config.epoch);
        let lease = grant.lease;
        // In order, the kernel is written first unless the lease only grows longer: then the
        // store is, so that a gateway killed in between leaves the kernel's element no longer
        // than the stored lease (shorter at worst, which fails closed and the next start
        // repairs). A new lease's two may also be written at once (`Pending::at_once`).
        let (write, kernel_first, reason) = match previous_expires_ms {
            None => (
                Write::Insert {
                    lease: lease.clone(),
                    requested_lifetime: open.lifetime.filter(|&l| l != 0),
                    peer: peer.remote,
                    max_leases,
                },
                true,
                reason,
            ),
            Some(previous_expires_ms) => (
                Write::Renew {
                    id: lease.id,
                    renewed_ms: now_ms,
                    expires_ms: lease.expires_ms,
                    granted_lifetime: lease.lifetime,
                },
                lease.expires_ms <= previous_expires_ms,
                format!("{reason} (extends the live lease)"),
            ),
        };
        let hold = Effect::Hold {
            lease: lease.id,
            grants: lease.grants.clone(),
            expires_ms: lease.expires_ms,
        };
        let (id, identity) = (lease.id, Arc::clone(&lease.host));
        let open = Arc::new(open);
        // One record for the request, the decision that allowed it and the lease it made,
        // committed with the lease.
        let audit = Write::Audit(AuditRecord {
            time_ms: now_ms,
            peer: Some(peer.remote),
            what: Audit::Granted {
                lease,
                open: Arc::clone(&open),
                rule,
                reason,
            },
        });
        let commit = Effect::Commit(vec![write, audit]);
        let effects = if kernel_first {
            vec![hold, commit]
        } else {
            vec![commit, hold]
        };
        // A new lease is in neither the kernel nor the store yet: either may take it first,
        // and a failure of one after the other took it is undone by `finish`.
        let new = previous_expires_ms.is_none();
        Step::Pending(Pending {
            effects,
            at_once: new,
            ticket: Ticket::Open {
                lease: id,
                new,
                extension,
                granted,
                open,
                identity,
                peer: peer.remote,
            },
        })
    }

    fn renew(
        &mut self,
        now_ms: u64,
        identity: &str,
        peer: &Peer<'_>,
        renew: &Renew,
        decide: &dyn Decide,
    ) -> Step {
        let request = || Message::Renew(renew.clone());
        let Some(grants) = self
            .book
            .owned(identity, &renew.lease)
            .map(|lease| lease.grants.clone())
        else {
            return Step::Answer(refuse(
                now_ms,
                identity,
                peer,
                &request(),
                ResultCode::UnknownLease,
                Refusal::UnknownLease.to_string(),
                None,
            ));
        };
        // The current policy bounds the renewed lifetime, by the rules that allow the lease's
        // grants (not the widest of the host's rules, which would let a renewal stretch a
        // short-lived opening to another rule's maximum): a policy that shortened the maximum
        // applies at the next renewal.
        let limits = match decide.still_allows(identity, peer.addresses, &grants) {
            Ok(limits) => limits,
            Err(objection) => {
                // The policy changed under a live lease: end it now rather than at expiry.
                let mut answer = refuse(
                    now_ms,
                    identity,
                    peer,
                    &request(),
                    ResultCode::DeniedByPolicy,
                    objection.reason.clone(),
                    objection.rule,
                );
                if let Some(revocation) = self.revoke(
                    now_ms,
                    &renew.lease,
                    RevokeReason::PolicyChanged,
                    "gateway",
                    Some(objection.reason),
                ) {
                    let mut effects = revocation.effects;
                    effects.push(Effect::Notify {
                        host: revocation.lease.host.clone(),
                        notice: revocation.notice,
                    });
                    effects.append(&mut answer.effects);
                    answer.effects = effects;
                }
                return Step::Answer(answer);
            }
        };
        let renewed = match self
            .book
            .renew(now_ms, identity, &renew.lease, renew.lifetime, limits)
        {
            Ok(renewed) => renewed,
            Err(refusal) => {
                return Step::Answer(refuse(
                    now_ms,
                    identity,
                    peer,
                    &request(),
                    refusal.code(),
                    refusal.to_string(),
                    None,
                ));
            }
        };
        let lease = &renewed.grant.lease;
        let hold = Effect::Hold {
            lease: lease.id,
            grants: lease.grants.clone(),
            expires_ms: lease.expires_ms,
        };
        let commit = Effect::Commit(vec![
            Write::Renew {
                id: lease.id,
                renewed_ms: now_ms,
                expires_ms: lease.expires_ms,
                granted_lifetime: lease.lifetime,
            },
            Write::Audit(AuditRecord {
                time_ms: now_ms,
                peer: Some(peer.remote),
                what: Audit::Renewed {
                    lease: lease.clone(),
                },
            }),
        ]);
        // A renewal that shortens the lease goes to the kernel first, one that lengthens it to
        // the store first: a gateway killed in between leaves the kernel's element no longer
        // than the stored lease, so that the opening never outlives it.
        let effects = if lease.expires_ms <= renewed.previous_expires_ms {
            vec![hold, commit]
        } else {
            vec![commit, hold]
        };
        Step::Pending(Pending {
            effects,
            at_once: false,
            ticket: Ticket::Renew {
                identity: Arc::clone(&renewed.grant.lease.host),
                renewed,
                renew: renew.clone(),
                peer: peer.remote,
            },
        })
    }

    /// Takes back from the book a renewal (a Renew, or an Open that extended a live lease)
    /// whose effects failed. The store goes first when the lease grows longer, the kernel
    /// otherwise. When the first failed, neither took it, and the book gives it back. When the
    /// kernel took a shorter expiry and the store then refused it (a cluster member cut off
    /// from its quorum), the stored lease keeps its expiry, and so must the opening (spec 12.1:
    /// it closes at its expiry, not earlier): the book gives the renewal back and the returned
    /// Hold puts the kernel's element back. When the store took a longer expiry and the kernel
    /// refused it, the book keeps the store's.
    fn undo_failed_renewal(
        &mut self,
        renewed: &Renewed,
        failure: &EffectFailure,
    ) -> Option<Effect> {
        let after = &renewed.grant.lease;
        let lengthened = after.expires_ms > renewed.previous_expires_ms;
        let kernel = matches!(
            failure,
            EffectFailure::Kernel(_) | EffectFailure::KernelAfterCommit(_)
        );
        if kernel != lengthened {
            self.book.undo_renew(renewed);
            return None;
        }
        let shortened_in_kernel = !kernel && after.expires_ms < renewed.previous_expires_ms;
        (shortened_in_kernel && self.book.undo_renew(renewed)).then(|| Effect::Hold {
            lease: after.id,
            grants: after.grants.clone(),
            expires_ms: renewed.previous_expires_ms,
        })
    }

    /// The answer to a request whose effects were carried out (`Ok`) or failed (`Err`, the
    /// first failure, or [`EffectFailure::joined`]). A failed Open gives back the lease it made
    /// (the answer's effects then give up its elements, and end it in the store if the store
    /// committed it: [`EffectFailure::KernelAfterCommit`]) and is answered no-resources, as a
    /// new lease whose kernel failed is whatever the store did. A failed Release puts the lease
    /// back into the book (its elements were left as they were) and is answered no-resources
    /// with a retry-after; its answer is remembered for a retry only once it is Released.
    pub fn finish(
        &mut self,
        now_ms: u64,
        pending: Pending,
        outcome: Result<(), EffectFailure>,
    ) -> Answer {
        match pending.ticket {
            Ticket::Open {
                lease: id,
                new,
                extension,
                granted,
                open,
                identity,
                peer,
            } => match outcome {
                Ok(()) => Answer::new(Message::Granted(granted), "granted"),
                Err(failure) => {
                    let mut effects = Vec::new();
                    // An extension never shortens the lease: nothing of the kernel to put back.
                    if let Some(extension) = &extension {
                        self.undo_failed_renewal(extension, &failure);
                    }
                    // A lease already out of the book was ended by whoever took it out, in the
                    // store too (after its insert, if that was on its way).
                    if new && let Some(lease) = self.book.revoke(&id) {
                        effects.push(Effect::Unhold {
                            lease: lease.id,
                            grants: lease.grants.clone(),
                            kill_connections: false,
                        });
                        // The store holds the lease as live with its Granted record: a restart
                        // would put it in the kernel, and operators would see it live.
                        if matches!(failure, EffectFailure::KernelAfterCommit(_)) {
                            let why = format!(
                                "the kernel did not take the lease's elements when it was granted ({failure}); the host was refused"
                            );
                            effects.push(Self::end_commit(
                                now_ms,
                                lease,
                                LeaseEnd::Revoked(RevokeReason::ResourcePressure),
                                Some("gateway".into()),
                                Some(why),
                                Some(peer),
                            ));
                        }
                    }
                    let (code, reason, retry_after) = match &failure {
                        EffectFailure::QuotaExceeded(why) => {
                            (ResultCode::QuotaExceeded, why.clone(), None)
                        }
                        _ => (
                            ResultCode::NoResources,
                            format!("the gateway could not program the opening ({failure})"),
                            Some(5),
                        ),
                    };
                    let mut answer = refuse_at(
                        now_ms,
                        &identity,
                        peer,
                        &Message::Open(Arc::unwrap_or_clone(open)),
                        code,
                        reason,
                        None,
                    );
                    if let Message::Denied(d) = &mut answer.message {
                        d.retry_after = retry_after;
                    }
                    effects.append(&mut answer.effects);
                    answer.effects = effects;
                    answer
                }
            },
            Ticket::Renew {
                renewed,
                renew,
                identity,
                peer,
            } => {
                let request = Message::Renew(renew.clone());
                match outcome {
                    Ok(()) => Answer::new(
                        Message::Granted(
                            renewed
                                .grant
                                .to_granted(renew.common.request_id, self.config.epoch),
                        ),
                        "renewed",
                    ),
                    Err(EffectFailure::LeaseEnded) => refuse_at(
                        now_ms,
                        &identity,
                        peer,
                        &request,
                        ResultCode::UnknownLease,
                        Refusal::UnknownLease.to_string(),
                        None,
                    ),
                    Err(failure) => {
                        let kernel = matches!(
                            failure,
                            EffectFailure::Kernel(_) | EffectFailure::KernelAfterCommit(_)
                        );
                        let restore = self.undo_failed_renewal(&renewed, &failure);
                        // A store that refused (a cluster member cut off from its quorum) is
                        // asked again later than a busy kernel, as a refused Open is.
                        let retry_after = if kernel { 1 } else { 5 };
                        let mut answer = refuse_at(
                            now_ms,
                            &identity,
                            peer,
                            &request,
                            ResultCode::NoResources,
                            failure.to_string(),
                            None,
                        );
                        if let Message::Denied(d) = &mut answer.message {
                            d.retry_after = Some(retry_after);
                        }
                        answer.effects.extend(restore);
                        answer
                    }
                }
            }
            Ticket::Release {
                lease,
                release,
                identity,
                peer,
                replay,
            } => match outcome {
                Ok(()) => {
                    let message = Message::Released(Released {
                        common: Common {
                            request_id: release.common.request_id,
                            critical: Vec::new(),
                        },
                        lease: lease.id,
                    });
                    if let Some((key, bytes)) = replay {
                        self.replay.insert(now_ms, key, bytes, message.clone());
                    }
                    Answer::new(message, "released")
                }
                Err(failure) => {
                    self.book.apply(*lease);
                    let mut answer = refuse_at(
                        now_ms,
                        &identity,
                        peer,
                        &Message::Release(release),
                        ResultCode::NoResources,
                        format!("the release was not stored, the lease stays ({failure})"),
                        None,
                    );
                    if let Message::Denied(d) = &mut answer.message {
                        d.retry_after = Some(5);
                    }
                    answer
                }
            },
        }
    }

    /// Release, remembering its answer for a while: a Release whose answer was lost and that is
    /// sent again must get Released again, not unknown-lease. Opens and Renews need no such
    /// memory, since doing them twice has the effect of doing them once.
    fn release_once(
        &mut self,
        now_ms: u64,
        identity: &str,
        peer: &Peer<'_>,
        release: Release,
        bytes: Arc<[u8]>,
    ) -> Step {
        let key = release
            .common
            .request_id
            .map(|id| (identity.to_owned(), id));
        if let Some(key) = &key
            && let Some(message) = self.replay.get(now_ms, key, &bytes)
        {
            return Step::Answer(Answer {
                message,
                effects: Vec::new(),
                label: None,
            });
        }
        let lease = match self.book.release(now_ms, identity, &release.lease) {
            Ok(lease) => lease,
            Err(refusal) => {
                return Step::Answer(refuse(
                    now_ms,
                    identity,
                    peer,
                    &Message::Release(release),
                    refusal.code(),
                    refusal.to_string(),
                    None,
                ));
            }
        };
        // The store first: a store that refuses the end (a cluster without its quorum) leaves
        // the kernel as it was, and the lease goes back into the book, rather than an opening
        // closed here that the store still holds, and that comes back at the next listing.
        let mut effects = self.end_effects(
            now_ms,
            lease.clone(),
            LeaseEnd::Released,
            Some(identity.to_owned()),
            None,
            Some(peer.remote),
        );
        effects.reverse();
        Step::Pending(Pending {
            effects,
            at_once: false,
            ticket: Ticket::Release {
                identity: Arc::clone(&lease.host),
                lease: Box::new(lease),
                release,
                peer: peer.remote,
                replay: key.map(|key| (key, bytes)),
            },
        })
    }

    fn list(&self, now_ms: u64, identity: &str, list: &List) -> Answer {
        let leases = self
            .book
            .leases_of(identity)
            .filter(|l| l.expires_ms > now_ms)
            .map(|l| l.to_lease_info(now_ms))
            .collect();
        let mut answer = Leases {
            common: Common {
                request_id: list.common.request_id,
                critical: Vec::new(),
            },
            leases,
            epoch: self.config.epoch,
        };
        let listed = Effect::Listed {
            identity: identity.to_owned(),
        };
        if !codec::fit_leases(&mut answer) {
            let mut d = denied(
                list.common.request_id,
                ResultCode::NoResources,
                "the list of leases does not fit in one answer",
            );
            d.retry_after = Some(60);
            let mut answer = Answer::new(Message::Denied(d), ResultCode::NoResources.name());
            answer.effects.push(listed);
            return answer;
        }
        let mut answer = Answer::new(Message::Leases(answer), "listed");
        answer.effects.push(listed);
        answer
    }

    /// The effects that end a lease already out of the book: its elements, then the store.
    fn end_effects(
        &self,
        now_ms: u64,
        lease: super::Lease,
        end: LeaseEnd,
        by: Option<String>,
        why: Option<String>,
        peer: Option<SocketAddr>,
    ) -> Vec<Effect> {
        let kill_connections = match end {
            LeaseEnd::Expired => false,
            LeaseEnd::Released | LeaseEnd::Revoked(_) => self.config.kill_connections,
        };
        vec![
            Effect::Unhold {
                lease: lease.id,
                grants: lease.grants.clone(),
                kill_connections,
            },
            Self::end_commit(now_ms, lease, end, by, why, peer),
        ]
    }

    /// The store's part of a lease's end: the end and its audit record, in one commit.
    fn end_commit(
        now_ms: u64,
        lease: super::Lease,
        end: LeaseEnd,
        by: Option<String>,
        why: Option<String>,
        peer: Option<SocketAddr>,
    ) -> Effect {
        Effect::Commit(vec![
            Write::End {
                id: lease.id,
                end,
                ended_ms: now_ms,
                by: by.clone(),
                why: why.clone(),
            },
            Write::Audit(AuditRecord {
                time_ms: now_ms,
                peer,
                what: Audit::Ended {
                    lease,
                    end,
                    by,
                    why,
                },
            }),
        ])
    }

    /// Revokes a live lease: it leaves the book now; the effects take it out of the kernel and
    /// the store, and the notice is for its host. `None` if no such lease is live.
    pub fn revoke(
        &mut self,
        now_ms: u64,
        id: &LeaseId,
        reason: RevokeReason,
        by: &str,
        text: Option<String>,
    ) -> Option<Revocation> {
        let lease = self.book.revoke(id)?;
        let notice = Message::Revoked(lease.to_revoked(reason, text.clone().map(fit_reason)));
        let effects = self.end_effects(
            now_ms,
            lease.clone(),
            LeaseEnd::Revoked(reason),
            Some(by.to_owned()),
            text,
            None,
        );
        Some(Revocation {
            lease,
            effects,
            notice,
        })
    }

    /// Ends the leases whose expiry is at or before `now_ms`: the effects take them out of the
    /// kernel (where their elements' own timeouts have usually done it already) and the store.
    pub fn expire_due(&mut self, now_ms: u64) -> Vec<Effect> {
        let due = self.book.expire_due(now_ms);
        due.into_iter()
            .flat_map(|lease| {
                self.end_effects(
                    now_ms,
                    lease,
                    LeaseEnd::Expired,
                    Some("gateway".into()),
                    Some("lifetime ended".into()),
                    None,
                )
            })
            .collect()
    }

    /// The earliest expiry of a live lease, Unix milliseconds.
    pub fn next_expiry(&self) -> Option<u64> {
        self.book.next_expiry()
    }
}

/// A Denied for `msg`, with its audit record.
fn refuse(
    now_ms: u64,
    identity: &str,
    peer: &Peer<'_>,
    msg: &Message,
    code: ResultCode,
    reason: String,
    rule: Option<String>,
) -> Answer {
    refuse_at(now_ms, identity, peer.remote, msg, code, reason, rule)
}

fn refuse_at(
    now_ms: u64,
    identity: &str,
    peer: SocketAddr,
    msg: &Message,
    code: ResultCode,
    reason: String,
    rule: Option<String>,
) -> Answer {
    let (lease, request) = match msg {
        Message::Open(open) => (None, Asked::Open(Box::new(open.clone()))),
        Message::Renew(renew) => (Some(renew.lease), Asked::Lease(renew.lease)),
        Message::Release(release) => (Some(release.lease), Asked::Lease(release.lease)),
        _ => (None, Asked::Other),
    };
    let mut d = denied(msg.common().request_id, code, reason.clone());
    d.lease = lease;
    Answer {
        message: Message::Denied(d),
        effects: vec![Effect::Audit(AuditRecord {
            time_ms: now_ms,
            peer: Some(peer),
            what: Audit::Refused {
                identity: Some(identity.to_owned()),
                code,
                reason,
                rule,
                request,
            },
        })],
        label: Some(code.name()),
    }
}

fn refuse_undecodable(now_ms: u64, peer: &Peer<'_>, bytes: &[u8], e: &DecodeError) -> Answer {
    let code = e.result_code();
    let mut d = denied(codec::peek_request_id(bytes), code, e.to_string());
    d.unsupported = e.unsupported_keys().to_vec();
    fit_unsupported(&mut d);
    Answer {
        message: Message::Denied(d),
        effects: vec![Effect::Audit(AuditRecord {
            time_ms: now_ms,
            peer: Some(peer.remote),
            what: Audit::Refused {
                identity: peer.identity.map(str::to_owned),
                code,
                reason: format!("undecodable request ({} bytes): {e}", bytes.len()),
                rule: None,
                request: Asked::Other,
            },
        })],
        label: Some(code.name()),
    }
}

/// Makes a Denied `unsupported-option` fit in [`MAX_MESSAGE_SIZE`] (spec Section 5.4), as
/// [`codec::fit_unsupported`] says.
fn fit_unsupported(d: &mut Denied) {
    let mut trial = d.clone();
    codec::fit_unsupported(&mut d.unsupported, &mut d.reason, |keys, reason| {
        trial.unsupported = keys.to_vec();
        trial.reason = reason.map(str::to_owned);
        codec::encode(&Message::Denied(trial.clone())).len()
    });
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::message::{HostAddresses, Opening, PortRange, Protocol, Target};

    const NOW: u64 = 1_700_000_000_000;
    const LIFETIME: LifetimePolicy = LifetimePolicy {
        min: 60,
        max: 3600,
        default: 600,
    };

    /// Allows any port on the host's own first address.
    struct Allow;

    impl Decide for Allow {
        fn host_limits(&self, _: &str, _: &[IpAddr]) -> HostLimits {
            HostLimits {
                lifetime: LIFETIME,
                max_leases: 16,
                third_party: false,
            }
        }

        fn evaluate(&self, _: &str, _: &[IpAddr], hosts: &[IpAddr], open: &Open) -> Decision {
            let Target::Ports { protocol, ports } = open.opening.target.clone() else {
                return Decision::denied(ResultCode::UnknownApplication, "ports only");
            };
            Decision::allowed(PolicyFacts {
                grants: vec![Grant {
                    protocol,
                    ports,
                    host: hosts[0],
                    remotes: Vec::new(),
                    app: None,
                }],
                grants_narrowed: false,
                lifetime: LIFETIME,
                max_leases: Some(16),
            })
        }

        fn still_allows(
            &self,
            _: &str,
            _: &[IpAddr],
            _: &[Grant],
        ) -> Result<LifetimePolicy, Objection> {
            Ok(LIFETIME)
        }
    }

    struct Harness {
        core: RequestCore,
        rng: StdRng,
        addresses: [IpAddr; 1],
        next_id: u64,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                core: RequestCore::new(CoreConfig {
                    epoch: 7,
                    max_streams: 8,
                    kill_connections: true,
                }),
                rng: StdRng::seed_from_u64(3),
                addresses: ["192.0.2.10".parse().unwrap()],
                next_id: 1,
            }
        }

        fn step(&mut self, message: Message) -> Step {
            let peer = Peer {
                identity: Some("fwnp://host/web-01"),
                no_identity: "",
                remote: "192.0.2.10:4433".parse().unwrap(),
                addresses: &self.addresses,
            };
            self.core.handle(
                NOW,
                ConnectionState { welcomed: true },
                &peer,
                &codec::encode(&message),
                &Allow,
                &mut self.rng,
            )
        }

        fn common(&mut self) -> Common {
            self.next_id += 1;
            Common {
                request_id: Some(self.next_id),
                critical: Vec::new(),
            }
        }

        fn open(&mut self, port: u16) -> Pending {
            let common = self.common();
            let step = self.step(Message::Open(Open {
                common,
                opening: Opening {
                    target: Target::Ports {
                        protocol: Protocol::Tcp,
                        ports: PortRange::single(port),
                    },
                    host: HostAddresses::Default,
                    family: None,
                    remotes: Vec::new(),
                },
                lifetime: None,
                app: None,
            }));
            match step {
                Step::Pending(pending) => pending,
                Step::Answer(answer) => panic!("an allowed Open waits: {answer:?}"),
            }
        }

        fn granted(&mut self, port: u16) -> LeaseId {
            let pending = self.open(port);
            match self.core.finish(NOW, pending, Ok(())).message {
                Message::Granted(granted) => granted.lease,
                other => panic!("not granted: {other:?}"),
            }
        }
    }

    fn denied_of(answer: &Answer) -> &Denied {
        match &answer.message {
            Message::Denied(d) => d,
            other => panic!("not denied: {other:?}"),
        }
    }

    #[test]
    fn a_new_epoch_is_told_in_granted_and_leases_from_then_on() {
        let mut h = Harness::new();
        let pending = h.open(7001);
        let before = h.core.finish(NOW, pending, Ok(()));
        assert!(matches!(before.message, Message::Granted(ref g) if g.epoch == 7));
        h.core.set_epoch(9);
        assert_eq!(h.core.epoch(), 9);
        let pending = h.open(7002);
        let after = h.core.finish(NOW, pending, Ok(()));
        assert!(
            matches!(after.message, Message::Granted(ref g) if g.epoch == 9),
            "{:?}",
            after.message
        );
        let common = h.common();
        match h.step(Message::List(List { common })) {
            Step::Answer(answer) => {
                assert!(
                    matches!(answer.message, Message::Leases(ref l) if l.epoch == 9),
                    "{:?}",
                    answer.message
                );
            }
            Step::Pending(_) => panic!("a List is answered at once"),
        }
    }

    #[test]
    fn only_a_new_lease_is_held_and_committed_at_once() {
        let mut h = Harness::new();
        let new = h.open(7001);
        assert!(new.at_once());
        assert!(matches!(
            new.effects(),
            [Effect::Hold { .. }, Effect::Commit(writes)]
                if matches!(writes[0], Write::Insert { .. })
        ));
        let lease = match h.core.finish(NOW, new, Ok(())).message {
            Message::Granted(granted) => granted.lease,
            other => panic!("{other:?}"),
        };
        // The same Open again extends the live lease: in its order, not at once.
        let extended = h.open(7001);
        assert!(!extended.at_once(), "{:?}", extended.effects());
        h.core.finish(NOW, extended, Ok(()));
        let common = h.common();
        let Step::Pending(renewal) = h.step(Message::Renew(Renew {
            common,
            lease,
            lifetime: Some(60),
        })) else {
            panic!("a renewal waits");
        };
        assert!(!renewal.at_once());
        h.core.finish(NOW, renewal, Ok(()));
        let common = h.common();
        let Step::Pending(release) = h.step(Message::Release(Release { common, lease })) else {
            panic!("a release waits");
        };
        assert!(!release.at_once());
    }

    #[test]
    fn joined_outcomes_say_whether_the_store_kept_what_the_kernel_refused() {
        let kernel = || Err(EffectFailure::Kernel("no buffer space".into()));
        let store = || Err(EffectFailure::Store("disk full".into()));
        let ended = || Err(EffectFailure::LeaseEnded);
        assert_eq!(EffectFailure::joined(Ok(()), Ok(())), Ok(()));
        assert_eq!(
            EffectFailure::joined(kernel(), Ok(())),
            Err(EffectFailure::KernelAfterCommit("no buffer space".into()))
        );
        assert_eq!(EffectFailure::joined(kernel(), store()), kernel());
        assert_eq!(EffectFailure::joined(Ok(()), store()), store());
        assert_eq!(EffectFailure::joined(ended(), Ok(())), ended());
        assert_eq!(EffectFailure::joined(ended(), store()), ended());
        // The host is told the same either way.
        assert_eq!(
            EffectFailure::KernelAfterCommit("x".into()).to_string(),
            EffectFailure::Kernel("x".into()).to_string()
        );
    }

    /// The kernel refused while the store committed the new lease: the host gets the Denied it
    /// gets when the kernel refused first, and the stored lease is ended with a record of why.
    #[test]
    fn a_kernel_failure_after_the_commit_ends_the_stored_lease() {
        let mut h = Harness::new();
        let pending = h.open(7001);
        let id = pending.lease();
        let after_commit = h.core.finish(
            NOW,
            pending,
            Err(EffectFailure::KernelAfterCommit("no buffer space".into())),
        );
        assert!(h.core.book().is_empty(), "the book gave the lease back");

        let mut before = Harness::new();
        let pending = before.open(7001);
        let alone = before.core.finish(
            NOW,
            pending,
            Err(EffectFailure::Kernel("no buffer space".into())),
        );
        let (d, d_alone) = (denied_of(&after_commit), denied_of(&alone));
        assert_eq!((d.code, d.retry_after), (ResultCode::NoResources, Some(5)));
        assert_eq!(d.reason, d_alone.reason, "the same words either way");
        assert!(
            !alone.effects.iter().any(|e| matches!(e, Effect::Commit(_))),
            "nothing to end when the store was not written: {:?}",
            alone.effects
        );

        let [
            Effect::Unhold {
                lease: unheld,
                kill_connections: false,
                ..
            },
            Effect::Commit(writes),
            Effect::Audit(refusal),
        ] = after_commit.effects.as_slice()
        else {
            panic!("{:?}", after_commit.effects);
        };
        assert_eq!(*unheld, id);
        let [
            Write::End {
                id: ended,
                end,
                by,
                why,
                ..
            },
            Write::Audit(record),
        ] = writes.as_slice()
        else {
            panic!("{writes:?}");
        };
        assert_eq!(*ended, id);
        assert_eq!(*end, LeaseEnd::Revoked(RevokeReason::ResourcePressure));
        assert_eq!(by.as_deref(), Some("gateway"));
        let why = why.as_deref().expect("a reason");
        assert!(
            why.contains("kernel: no buffer space") && why.contains("refused"),
            "{why}"
        );
        assert!(matches!(
            &record.what,
            Audit::Ended { lease, end: LeaseEnd::Revoked(RevokeReason::ResourcePressure), why: Some(w), .. }
                if lease.id == id && w == why
        ));
        assert!(matches!(
            refusal.what,
            Audit::Refused {
                code: ResultCode::NoResources,
                ..
            }
        ));
        // The quota was not spent on it.
        for port in [7002, 7003] {
            h.granted(port);
        }
    }

    /// A lease revoked while its hold and commit were on their way is ended in the store by the
    /// revocation's own writes: the refusal adds no second end.
    #[test]
    fn a_lease_revoked_meanwhile_is_not_ended_twice() {
        for failure in [
            EffectFailure::joined(Err(EffectFailure::LeaseEnded), Ok(())),
            EffectFailure::joined(Err(EffectFailure::Kernel("gone".into())), Ok(())),
        ] {
            let mut h = Harness::new();
            let pending = h.open(7001);
            let revocation = h
                .core
                .revoke(
                    NOW,
                    &pending.lease(),
                    RevokeReason::Operator,
                    "operator",
                    None,
                )
                .expect("the lease is in the book");
            assert!(
                revocation
                    .effects
                    .iter()
                    .any(|e| matches!(e, Effect::Commit(w) if matches!(w[0], Write::End { .. })))
            );
            let answer = h.core.finish(NOW, pending, failure);
            assert_eq!(denied_of(&answer).code, ResultCode::NoResources);
            assert!(
                answer.effects.iter().all(|e| matches!(e, Effect::Audit(_))),
                "{:?}",
                answer.effects
            );
        }
    }
}
