//! The gateway's decisions that need no IO: version negotiation, host address resolution,
//! lifetime clamping, and the in-memory [`LeaseBook`] with idempotent re-open, quotas,
//! ownership, renewal, release, revocation and expiry.
//!
//! Policy evaluation is not here: the daemon evaluates its policy and passes in the facts it
//! produced ([`PolicyFacts`], [`LifetimePolicy`]). Storage, the kernel filter and the audit trail
//! are not here either: every operation returns exactly what changed (a new lease, an extended
//! one, a renewal, a removal, with the lease record), so the daemon can program the kernel,
//! write its store and audit from that.
//!
//! Time is `now_ms`, Unix milliseconds on the gateway's clock, passed in: the gateway persists
//! expiries, so they are wall-clock values. Lease ids come from the RNG passed in.
//!
//! The book is built for a million leases: leases are found by id in a hash index, by host and
//! (host, grants) for idempotent re-open in a per-host hash index, and by expiry in an ordered
//! set, so that every operation costs O(log n) (or O(1)) and nothing scans the whole book. The
//! leases themselves lie side by side in chunks that never move and the indexes hold their
//! 4-byte positions: a hash table keeps up to half its slots empty, and empty slots of positions
//! cost little where empty slots of whole leases cost a lease's size; an entry of the expiry set
//! is 16 bytes with a position where it was 24 with an id. Nor does the book ever stop to grow
//! as a whole (see `layout`). Call
//! [`LeaseBook::expire_due`] before handling requests at a given `now_ms`, so that a lease past
//! its expiry is never counted, renewed or extended.
//!
//! [`request`] is the request path built on these: a request's bytes in, the answer and the
//! effects to carry out (kernel, store, audit, notices) out.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;

use hashbrown::HashTable;
use std::net::IpAddr;
use std::sync::Arc;

use rand::Rng;

pub mod request;

mod layout;
#[cfg(test)]
mod memory_tests;

use layout::{IdHash, IdIndex, LeaseChunks};

use crate::message::{
    AppInfo, Common, Denied, Epoch, Family, Grant, Granted, Hello, LeaseId, LeaseInfo, Leases,
    MAX_LIFETIME_SECS, Open, Opening, ResultCode, RevokeReason, Revoked, VERSION,
};

/// Why the gateway refuses a request; each variant maps to one [`ResultCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Hello lists no version at all.
    #[error("hello lists no protocol version")]
    NoVersions,
    /// Hello lists no version this gateway speaks.
    #[error("no version in common: the client speaks {offered:?}, the gateway speaks {VERSION}")]
    UnsupportedVersion {
        /// The versions the client offered.
        offered: Vec<u16>,
    },
    /// The lifetime asked is above [`MAX_LIFETIME_SECS`].
    #[error("lifetime {asked} s is above the protocol maximum of {MAX_LIFETIME_SECS} s")]
    LifetimeOutOfRange {
        /// The lifetime asked, in seconds.
        asked: u32,
    },
    /// The opening names a host address this host may not open, and it has no third-party
    /// rights.
    #[error("host address {address} is not one this host may open")]
    AddressMismatch {
        /// The address asked.
        address: IpAddr,
    },
    /// The opening names an IPv4-mapped IPv6 address, which validation refuses; checked again
    /// here so that no caller can turn one into an IPv6 opening for an IPv4 host.
    #[error("{address} is an IPv4-mapped IPv6 address; name the IPv4 address as 4 bytes")]
    MappedAddress {
        /// The address asked.
        address: IpAddr,
    },
    /// The opening names no address and the host holds none (of the family asked).
    #[error("the host holds no address{} it may open", family_text(*.family))]
    NoAddress {
        /// The family asked, if any.
        family: Option<Family>,
    },
    /// The policy granted nothing for this opening.
    #[error("policy grants nothing for this opening")]
    NothingGranted,
    /// The host already holds as many live leases as policy allows.
    #[error("the host holds {held} leases, the most policy allows is {max}")]
    QuotaExceeded {
        /// Live leases the host holds.
        held: usize,
        /// The most it may hold.
        max: u32,
    },
    /// No lease with this id belongs to this host (it may not exist at all, or belong to
    /// another host: the answer is the same).
    #[error("no such lease for this host")]
    UnknownLease,
    /// The RNG kept producing ids already in use.
    #[error("no free lease id could be drawn")]
    NoFreeLeaseId,
}

fn family_text(family: Option<Family>) -> &'static str {
    match family {
        Some(Family::Ipv4) => " of family IPv4",
        Some(Family::Ipv6) => " of family IPv6",
        None => "",
    }
}

impl Refusal {
    /// The result code a Denied answer carries for this refusal.
    pub fn code(&self) -> ResultCode {
        match self {
            Refusal::NoVersions => ResultCode::MalformedRequest,
            Refusal::UnsupportedVersion { .. } => ResultCode::UnsupportedVersion,
            Refusal::LifetimeOutOfRange { .. } => ResultCode::LifetimeOutOfRange,
            Refusal::AddressMismatch { .. } | Refusal::NoAddress { .. } => {
                ResultCode::AddressMismatch
            }
            Refusal::MappedAddress { .. } => ResultCode::MalformedOption,
            Refusal::NothingGranted => ResultCode::DeniedByPolicy,
            Refusal::QuotaExceeded { .. } => ResultCode::QuotaExceeded,
            Refusal::UnknownLease => ResultCode::UnknownLease,
            Refusal::NoFreeLeaseId => ResultCode::NoResources,
        }
    }

    /// The Denied answer for this refusal, echoing `request_id` and naming `lease` if the
    /// request named one.
    pub fn to_denied(&self, request_id: Option<u64>, lease: Option<LeaseId>) -> Denied {
        Denied {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            code: self.code(),
            // Cut to the schema's 512 bytes: a Hello offering very many versions must not make
            // a Denied its client cannot decode.
            reason: Some(crate::codec::reason_text(&self.to_string())),
            retry_after: None,
            lease,
            unsupported: Vec::new(),
        }
    }
}

/// Chooses the version for a Hello: [`VERSION`] if the client speaks it.
pub fn negotiate_version(hello: &Hello) -> Result<u16, Refusal> {
    if hello.versions.is_empty() {
        return Err(Refusal::NoVersions);
    }
    if hello.versions.contains(&VERSION) {
        Ok(VERSION)
    } else {
        Err(Refusal::UnsupportedVersion {
            offered: hello.versions.clone(),
        })
    }
}

/// The host addresses an opening opens (spec section 9.2), given the addresses the host may
/// open (its certificate's IP SANs, or its connection's source address) and whether policy
/// grants it third-party rights.
///
/// Every named address must be one of `allowed`, unless `third_party`, and is never IPv4-mapped
/// (even with third-party rights). With no address, the
/// opening covers every allowed address of the family asked (key 5), or with no family, of the
/// remote prefixes' family, or with neither, of both families, in the order of `allowed`; if
/// that leaves none, the host lacks the family: address-mismatch. The opening is expected to be
/// valid ([`crate::validate::validate_opening`]): its prefixes share one family.
pub fn resolve_host_addresses(
    opening: &Opening,
    allowed: &[IpAddr],
    third_party: bool,
) -> Result<Vec<IpAddr>, Refusal> {
    let named = opening.host.addresses();
    if !named.is_empty() {
        if let Some(&address) = named
            .iter()
            .find(|a| crate::validate::validate_address(**a).is_err())
        {
            return Err(Refusal::MappedAddress { address });
        }
        if let Some(&address) = named.iter().find(|a| !third_party && !allowed.contains(a)) {
            return Err(Refusal::AddressMismatch { address });
        }
        return Ok(named.to_vec());
    }
    let family = opening
        .family
        .or_else(|| opening.remotes.first().map(|p| Family::of(p.addr)));
    let addresses: Vec<IpAddr> = allowed
        .iter()
        .filter(|a| family.is_none_or(|f| Family::of(**a) == f))
        .copied()
        .collect();
    if addresses.is_empty() {
        return Err(Refusal::NoAddress { family });
    }
    Ok(addresses)
}

/// The lifetime bounds policy sets for an opening, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifetimePolicy {
    /// The shortest lifetime granted.
    pub min: u32,
    /// The longest lifetime granted (values above [`MAX_LIFETIME_SECS`] count as it).
    pub max: u32,
    /// The lifetime granted to an Open that asks for none (or 0).
    pub default: u32,
}

/// A lifetime after clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClampedLifetime {
    /// The lifetime granted, in seconds (at least 1).
    pub secs: u32,
    /// Whether it differs from what was asked (or, with no ask, from the fallback).
    pub narrowed: bool,
}

/// Checks an asked lifetime against the protocol's maximum. `None` and 0 both mean "no ask"
/// and give `None`.
pub fn check_asked_lifetime(asked: Option<u32>) -> Result<Option<u32>, Refusal> {
    // The daemon validates decoded requests already; the book checks again with the same rule
    // so that it never grants beyond the protocol's maximum whatever the caller did.
    crate::validate::validate_lifetime(asked).map_err(|_| Refusal::LifetimeOutOfRange {
        asked: asked.unwrap_or(0),
    })?;
    Ok(asked.filter(|&secs| secs != 0))
}

/// Clamps `asked` (or, with no ask, `fallback`: the policy's default for an Open, the lease's own
/// lifetime for a Renew) to `[policy.min, policy.max]`, itself within
/// `[1, MAX_LIFETIME_SECS]`. An ask above [`MAX_LIFETIME_SECS`] is refused.
pub fn clamp_lifetime(
    asked: Option<u32>,
    fallback: u32,
    policy: LifetimePolicy,
) -> Result<ClampedLifetime, Refusal> {
    let wanted = check_asked_lifetime(asked)?.unwrap_or(fallback);
    // Written out instead of `u32::clamp`, which panics when a policy has min > max: then the
    // max wins, the safer of the two.
    let max = policy.max.clamp(1, MAX_LIFETIME_SECS);
    let min = policy.min.max(1);
    let secs = wanted.max(min).min(max);
    Ok(ClampedLifetime {
        secs,
        narrowed: secs != wanted,
    })
}

/// What policy decided for one Open, as facts the book applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFacts {
    /// What policy grants, concrete (resolved host address included).
    pub grants: Vec<Grant>,
    /// Whether the grants are narrower than the opening asked (ports or prefixes).
    pub grants_narrowed: bool,
    /// The lifetime bounds and default.
    pub lifetime: LifetimePolicy,
    /// The most live leases the host may hold; `None` for no limit.
    pub max_leases: Option<u32>,
}

/// One lease in the gateway's book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease id.
    pub id: LeaseId,
    /// The identity of the host that owns it.
    pub host: Arc<str>,
    /// What it grants, in canonical order (sorted, without duplicates).
    pub grants: Vec<Grant>,
    /// The lifetime last granted, in seconds (a Renew asking for none gets it again).
    pub lifetime: u32,
    /// When it was created, Unix milliseconds.
    pub created_ms: u64,
    /// When it expires, Unix milliseconds.
    pub expires_ms: u64,
    /// What the host told about the application.
    pub app: Option<Box<AppInfo>>,
}

impl Lease {
    /// The renew-after hint: half the lifetime, in seconds.
    pub fn renew_after(&self) -> u32 {
        self.lifetime / 2
    }

    /// The seconds left at `now_ms` (0 once expired), rounded down.
    pub fn remaining_secs(&self, now_ms: u64) -> u32 {
        u32::try_from(self.expires_ms.saturating_sub(now_ms) / 1000).unwrap_or(u32::MAX)
    }

    /// The entry of a Leases answer for this lease.
    pub fn to_lease_info(&self, now_ms: u64) -> LeaseInfo {
        LeaseInfo {
            lease: self.id,
            grants: self.grants.clone(),
            remaining: self.remaining_secs(now_ms),
            expires_ms: self.expires_ms,
            app: self.app.as_deref().cloned(),
        }
    }

    /// The Granted answer for this lease.
    pub fn to_granted(&self, request_id: Option<u64>, epoch: Epoch, narrowed: bool) -> Granted {
        Granted {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            lease: self.id,
            grants: self.grants.clone(),
            lifetime: self.lifetime,
            expires_ms: self.expires_ms,
            renew_after: self.renew_after(),
            epoch,
            narrowed,
        }
    }

    /// The Revoked notice to push to the owning host.
    pub fn to_revoked(&self, reason: RevokeReason, text: Option<String>) -> Revoked {
        Revoked {
            common: Common::default(),
            lease: self.id,
            reason,
            text,
        }
    }
}

/// A granted lease and whether it is narrower than asked: what the Granted answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The lease, as it is in the book after the operation.
    pub lease: Lease,
    /// Whether lifetime, ports or prefixes are narrower than asked.
    pub narrowed: bool,
}

impl LeaseGrant {
    /// The Granted answer.
    pub fn to_granted(&self, request_id: Option<u64>, epoch: Epoch) -> Granted {
        self.lease.to_granted(request_id, epoch, self.narrowed)
    }
}

/// What an Open did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    /// A new lease: the kernel gets new elements, the store a new row.
    NewLease(LeaseGrant),
    /// The host already held a live lease with exactly these grants: it was extended (same
    /// id, expiry `max(old, now + lifetime)`), and no quota was used.
    Extended {
        /// The lease after extension.
        grant: LeaseGrant,
        /// Its expiry before, Unix milliseconds.
        previous_expires_ms: u64,
        /// Its lifetime before, in seconds.
        previous_lifetime: u32,
    },
}

impl OpenOutcome {
    /// The lease and its narrowed flag, whichever happened.
    pub fn grant(&self) -> &LeaseGrant {
        match self {
            OpenOutcome::NewLease(grant) | OpenOutcome::Extended { grant, .. } => grant,
        }
    }
}

/// What a Renew did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// The lease after renewal.
    pub grant: LeaseGrant,
    /// Its expiry before, Unix milliseconds.
    pub previous_expires_ms: u64,
    /// Its lifetime before, in seconds.
    pub previous_lifetime: u32,
}

/// What [`LeaseBook::restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Leases now live in the book.
    pub restored: usize,
    /// Leases already past their expiry: not loaded; the daemon records them as expired.
    pub expired: Vec<Lease>,
    /// Leases whose id was already in the book: not loaded.
    pub duplicates: Vec<Lease>,
    /// Leases beyond the most a book holds (about 4 billion): not loaded.
    pub over_capacity: Vec<Lease>,
}

/// What [`LeaseBook::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The book did not hold the lease: it does now.
    Inserted,
    /// The book held the lease with another expiry, lifetime or application: it has the new.
    Changed {
        /// Its expiry before, Unix milliseconds.
        previous_expires_ms: u64,
    },
    /// The book held the lease as it is.
    Unchanged,
    /// The book is full (about 4 billion leases): not inserted.
    OverCapacity,
}

/// The gateway's live leases, indexed by id, host, (host, grants) and expiry.
#[derive(Debug, Default)]
pub struct LeaseBook {
    /// The leases, in no order, in chunks that never move; a removal moves the last one into
    /// the hole, so there is none.
    leases: LeaseChunks,
    /// Positions in `leases`, hashed by lease id.
    by_id: IdIndex,
    /// (expires_ms, position in `leases`): the next lease to expire is the first. Positions
    /// make an entry 16 bytes instead of 24, and a node of the tree fit a smaller size class.
    expiry: BTreeSet<(u64, u32)>,
    /// Each host's leases, hashed by the fingerprint of (host, grants) for idempotent re-open
    /// (leases of equal fingerprint are separate entries); the key is the one shared `Arc` of
    /// that host's identity. One index serves both, and its entries carry their fingerprint, so
    /// that growing it rehashes without reading a lease: rehashing by a lease's id or grants
    /// read every lease the index held, each a cache miss in a large book.
    hosts: HashMap<Arc<str>, HashTable<Held>>,
    /// Keys both hashes, so that a host cannot aim collisions at another's leases.
    hash_keys: RandomState,
}

/// The most leases a book holds: positions are 4 bytes. Far beyond what a gateway's memory
/// holds (about 4 billion leases).
const MAX_LEASES: usize = u32::MAX as usize;

impl LeaseBook {
    /// An empty book.
    pub fn new() -> Self {
        LeaseBook::default()
    }

    /// An empty book with room for `leases` leases, so that a gateway restoring or expecting
    /// many leases does not rehash its indexes while serving.
    pub fn with_capacity(leases: usize) -> Self {
        let mut book = LeaseBook::default();
        book.reserve(leases);
        book
    }

    /// Makes room in the id index for `additional` more leases at once, as a restore that
    /// knows how many it reads does: grown lease by lease, the index frees what it outgrows
    /// behind it, and the allocator keeps that memory. (The leases' own chunks are allocated as
    /// they fill.)
    ///
    /// ```
    /// use fwnp_proto::gateway::LeaseBook;
    ///
    /// let mut book = LeaseBook::new();
    /// book.reserve(1_000);
    /// assert!(book.is_empty());
    /// ```
    pub fn reserve(&mut self, additional: usize) {
        let additional = additional.min(MAX_LEASES.saturating_sub(self.leases.len()));
        self.by_id.reserve(additional);
    }

    /// The Leases answer to a List from `host`: its live leases, ordered by id.
    pub fn leases_answer(
        &self,
        now_ms: u64,
        host: &str,
        request_id: Option<u64>,
        epoch: Epoch,
    ) -> Leases {
        Leases {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            leases: self
                .leases_of(host)
                .filter(|lease| lease.expires_ms > now_ms)
                .map(|lease| lease.to_lease_info(now_ms))
                .collect(),
            epoch,
        }
    }

    /// How many live leases the book holds.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the book holds no lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// How many hosts hold at least one lease.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// The lease with this id, whoever owns it (for the operator's tools; requests from hosts
    /// go through [`owned`](Self::owned)).
    pub fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.position(id).and_then(|at| self.leases.get(at))
    }

    /// The lease with this id if `host` owns it.
    pub fn owned(&self, host: &str, id: &LeaseId) -> Option<&Lease> {
        self.get(id).filter(|lease| &*lease.host == host)
    }

    /// How many leases `host` holds.
    pub fn lease_count(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, HashTable::len)
    }

    /// The leases `host` holds, ordered by id.
    pub fn leases_of<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Lease> + 'a {
        // The index holds positions in no order: sorting a host's leases when they are asked
        // for costs less than keeping an ordered set of ids for every lease.
        let mut leases: Vec<&Lease> = self
            .hosts
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|held| self.leases.get(held.at as usize))
            .collect();
        leases.sort_unstable_by_key(|lease| lease.id);
        leases.into_iter()
    }

    /// Every lease, in no particular order (for reconciliation and policy reload).
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter()
    }

    /// The earliest expiry in the book, Unix milliseconds: when to call
    /// [`expire_due`](Self::expire_due) next.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|&(expires_ms, _)| expires_ms)
    }

    /// Removes and returns every lease whose expiry is at or before `now_ms`, earliest first.
    pub fn expire_due(&mut self, now_ms: u64) -> Vec<Lease> {
        let mut expired = Vec::new();
        while let Some(&(expires_ms, at)) = self.expiry.first() {
            if expires_ms > now_ms {
                break;
            }
            let id = self.leases.get(at as usize).map(|lease| lease.id);
            match id.and_then(|id| self.remove(&id)) {
                Some(lease) => expired.push(lease),
                // An index entry without its lease cannot happen; drop it rather than loop.
                None => {
                    self.expiry.pop_first();
                }
            }
        }
        expired
    }

    /// Handles an Open from `host` at `now_ms`, with the facts its policy produced for it.
    ///
    /// In order: the asked lifetime is checked and clamped; an empty grant list is refused; a
    /// live lease of the same host with exactly the same grants is extended (no quota used);
    /// otherwise the quota is checked and a new lease with a fresh random id is created.
    pub fn open<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        host: &str,
        open: &Open,
        facts: &PolicyFacts,
        rng: &mut R,
    ) -> Result<OpenOutcome, Refusal> {
        self.open_with(now_ms, host, open, facts, facts.grants.clone(), rng)
    }

    /// As [`open`](Self::open), taking the facts: their grants become the lease's instead of
    /// being copied, once per Open on the request path.
    pub(crate) fn open_taking<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        host: &str,
        open: &Open,
        mut facts: PolicyFacts,
        rng: &mut R,
    ) -> Result<OpenOutcome, Refusal> {
        let grants = std::mem::take(&mut facts.grants);
        self.open_with(now_ms, host, open, &facts, grants, rng)
    }

    /// An Open granting `grants` (the facts' own, which are not looked at).
    fn open_with<R: Rng + ?Sized>(
        &mut self,
        now_ms: u64,
        host: &str,
        open: &Open,
        facts: &PolicyFacts,
        grants: Vec<Grant>,
        rng: &mut R,
    ) -> Result<OpenOutcome, Refusal> {
        let lifetime = clamp_lifetime(open.lifetime, facts.lifetime.default, facts.lifetime)?;
        if grants.is_empty() {
            return Err(Refusal::NothingGranted);
        }
        let narrowed = facts.grants_narrowed || lifetime.narrowed;
        let grants = into_canonical(grants);
        let new_expiry = expiry_after(now_ms, lifetime.secs);
        let fingerprint = self.fingerprint(host, &grants);
        // The host's index, found once for the re-open, the quota and the shared name.
        let (same, held, name) = match self.hosts.get_key_value(host) {
            Some((name, index)) => (
                self.find_same(index, now_ms, fingerprint, &grants),
                index.len(),
                Some(Arc::clone(name)),
            ),
            None => (None, 0, None),
        };

        if let Some(id) = same {
            let (previous_expires_ms, previous_lifetime) =
                self.get(&id).map_or((0, 0), |l| (l.expires_ms, l.lifetime));
            let expires_ms = previous_expires_ms.max(new_expiry);
            self.set_expiry(&id, expires_ms);
            if let Some(lease) = self.get_mut(&id) {
                lease.lifetime = lifetime.secs;
                if let Some(app) = &open.app {
                    lease.app = Some(Box::new(app.clone()));
                }
                let grant = LeaseGrant {
                    lease: lease.clone(),
                    narrowed,
                };
                return Ok(OpenOutcome::Extended {
                    grant,
                    previous_expires_ms,
                    previous_lifetime,
                });
            }
        }

        if let Some(max) = facts.max_leases {
            let max_held = usize::try_from(max).unwrap_or(usize::MAX);
            // The quota counts live leases (spec 11.3 step 11): one past its expiry that the
            // expiry timer has not taken out yet is not held. Counted only at the quota, so
            // that the common Open does not walk the host's leases.
            let held = match held >= max_held {
                true => self.live_count(host, now_ms),
                false => held,
            };
            if held >= max_held {
                return Err(Refusal::QuotaExceeded { held, max });
            }
        }
        if self.leases.len() >= MAX_LEASES {
            return Err(Refusal::NoFreeLeaseId);
        }
        let id = self.fresh_id(now_ms, rng)?;
        let lease = Lease {
            id,
            host: name.unwrap_or_else(|| Arc::from(host)),
            grants,
            lifetime: lifetime.secs,
            created_ms: now_ms,
            expires_ms: new_expiry,
            app: open.app.clone().map(Box::new),
        };
        self.insert_indexed(lease.clone(), fingerprint);
        Ok(OpenOutcome::NewLease(LeaseGrant { lease, narrowed }))
    }

    /// Handles a Renew from `host` of lease `id` asking for `asked` seconds (`None` or 0: the
    /// lease's own lifetime), clamped again by the current policy's bounds. The lease then
    /// expires `now + lifetime`. A lease that is not this host's, does not exist or is past its
    /// expiry is unknown-lease.
    pub fn renew(
        &mut self,
        now_ms: u64,
        host: &str,
        id: &LeaseId,
        asked: Option<u32>,
        policy: LifetimePolicy,
    ) -> Result<Renewed, Refusal> {
        check_asked_lifetime(asked)?;
        let lease = self.live_owned(now_ms, host, id)?;
        let lifetime = clamp_lifetime(asked, lease.lifetime, policy)?;
        let (previous_expires_ms, previous_lifetime) = (lease.expires_ms, lease.lifetime);
        self.set_expiry(id, expiry_after(now_ms, lifetime.secs));
        let lease = self.get_mut(id).ok_or(Refusal::UnknownLease)?;
        lease.lifetime = lifetime.secs;
        let grant = LeaseGrant {
            lease: lease.clone(),
            narrowed: lifetime.narrowed,
        };
        Ok(Renewed {
            grant,
            previous_expires_ms,
            previous_lifetime,
        })
    }

    /// Takes back a renewal that was not carried out (its first effect failed), so that the
    /// book holds the lease as the kernel and the store still do. Does nothing when the lease
    /// has gone or changed since (another renewal of it came after this one), and says whether
    /// it took the renewal back.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use fwnp_proto::LeaseId;
    /// use fwnp_proto::gateway::{Lease, LeaseBook, LifetimePolicy};
    ///
    /// let mut book = LeaseBook::new();
    /// let id = LeaseId([1; 16]);
    /// let host = "fwnp://host/web-01";
    /// book.apply(Lease {
    ///     id,
    ///     host: Arc::from(host),
    ///     grants: Vec::new(),
    ///     lifetime: 60,
    ///     created_ms: 1_000,
    ///     expires_ms: 61_000,
    ///     app: None,
    /// });
    /// let policy = LifetimePolicy { min: 1, max: 3600, default: 600 };
    /// let renewed = book.renew(2_000, host, &id, Some(600), policy).unwrap();
    /// assert_eq!(book.get(&id).unwrap().expires_ms, 602_000);
    /// assert!(book.undo_renew(&renewed));
    /// assert_eq!((book.get(&id).unwrap().expires_ms, book.get(&id).unwrap().lifetime), (61_000, 60));
    /// assert!(!book.undo_renew(&renewed), "the book no longer holds what the renewal made");
    /// ```
    pub fn undo_renew(&mut self, renewed: &Renewed) -> bool {
        let after = &renewed.grant.lease;
        let unchanged = self.get(&after.id).is_some_and(|lease| {
            lease.expires_ms == after.expires_ms && lease.lifetime == after.lifetime
        });
        if !unchanged {
            return false;
        }
        self.set_expiry(&after.id, renewed.previous_expires_ms);
        if let Some(lease) = self.get_mut(&after.id) {
            lease.lifetime = renewed.previous_lifetime;
        }
        true
    }

    /// Handles a Release from `host` of lease `id`: removes it and returns it. A lease that is
    /// not this host's, does not exist or is past its expiry is unknown-lease.
    pub fn release(&mut self, now_ms: u64, host: &str, id: &LeaseId) -> Result<Lease, Refusal> {
        self.live_owned(now_ms, host, id)?;
        self.remove(id).ok_or(Refusal::UnknownLease)
    }

    /// Revokes lease `id` (an operator or a policy change): removes it and returns it, so the
    /// daemon can remove its elements and push [`Lease::to_revoked`] to its host.
    pub fn revoke(&mut self, id: &LeaseId) -> Option<Lease> {
        self.remove(id)
    }

    /// Loads leases from the store at start. Those already expired at `now_ms` are not loaded
    /// and are returned as expired; quotas are not applied (they were when the leases were
    /// granted).
    pub fn restore(
        &mut self,
        now_ms: u64,
        leases: impl IntoIterator<Item = Lease>,
    ) -> RestoreReport {
        let mut report = RestoreReport::default();
        for mut lease in leases {
            if lease.expires_ms <= now_ms {
                report.expired.push(lease);
                continue;
            }
            if self.position(&lease.id).is_some() {
                report.duplicates.push(lease);
                continue;
            }
            if self.leases.len() >= MAX_LEASES {
                report.over_capacity.push(lease);
                continue;
            }
            lease.grants = canonical_grants(&lease.grants);
            lease.host = self.intern_host(&lease.host);
            let fingerprint = self.fingerprint(&lease.host, &lease.grants);
            self.insert_indexed(lease, fingerprint);
            report.restored += 1;
        }
        report
    }

    /// Takes in a lease as another gateway of a cluster stored it (or as this one's own write
    /// comes back from the cluster store): a lease the book lacks is inserted, whatever its
    /// expiry (one already past is then ended by the next [`expire_due`](Self::expire_due), so
    /// that an end the cluster missed is carried out); a lease the book holds takes the stored
    /// expiry, lifetime and application. Quotas are not applied: the store applied them.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use fwnp_proto::LeaseId;
    /// use fwnp_proto::gateway::{Applied, Lease, LeaseBook};
    ///
    /// let mut book = LeaseBook::new();
    /// let lease = Lease {
    ///     id: LeaseId([1; 16]),
    ///     host: Arc::from("fwnp://host/web-01"),
    ///     grants: Vec::new(),
    ///     lifetime: 60,
    ///     created_ms: 1_000,
    ///     expires_ms: 61_000,
    ///     app: None,
    /// };
    /// assert_eq!(book.apply(lease.clone()), Applied::Inserted);
    /// assert_eq!(book.apply(lease.clone()), Applied::Unchanged);
    /// let renewed = Lease { expires_ms: 91_000, ..lease };
    /// assert_eq!(book.apply(renewed), Applied::Changed { previous_expires_ms: 61_000 });
    /// assert_eq!(book.next_expiry(), Some(91_000));
    /// ```
    pub fn apply(&mut self, mut lease: Lease) -> Applied {
        if let Some(held) = self.get(&lease.id) {
            if held.expires_ms == lease.expires_ms
                && held.lifetime == lease.lifetime
                && held.app == lease.app
            {
                return Applied::Unchanged;
            }
            let previous_expires_ms = held.expires_ms;
            self.set_expiry(&lease.id, lease.expires_ms);
            if let Some(held) = self.get_mut(&lease.id) {
                held.lifetime = lease.lifetime;
                held.app = lease.app;
            }
            return Applied::Changed {
                previous_expires_ms,
            };
        }
        if self.leases.len() >= MAX_LEASES {
            return Applied::OverCapacity;
        }
        lease.grants = canonical_grants(&lease.grants);
        lease.host = self.intern_host(&lease.host);
        let fingerprint = self.fingerprint(&lease.host, &lease.grants);
        self.insert_indexed(lease, fingerprint);
        Applied::Inserted
    }

    fn live_owned(&self, now_ms: u64, host: &str, id: &LeaseId) -> Result<&Lease, Refusal> {
        self.owned(host, id)
            .filter(|lease| lease.expires_ms > now_ms)
            .ok_or(Refusal::UnknownLease)
    }

    fn fingerprint(&self, host: &str, grants: &[Grant]) -> u64 {
        fingerprint(&self.hash_keys, host, grants)
    }

    /// Where the lease with this id lies in `leases`.
    fn position(&self, id: &LeaseId) -> Option<usize> {
        let leases = &self.leases;
        self.by_id.find(self.id_hash(id), |at| {
            leases.get(at).is_some_and(|lease| lease.id == *id)
        })
    }

    fn id_hash(&self, id: &LeaseId) -> IdHash {
        IdHash::of(self.hash_keys.hash_one(id))
    }

    fn get_mut(&mut self, id: &LeaseId) -> Option<&mut Lease> {
        let at = self.position(id)?;
        self.leases.get_mut(at)
    }

    /// The live lease in a host's `index` with exactly `grants`, if any. A lease past its
    /// expiry that [`expire_due`](Self::expire_due) has not reaped yet is not extended: its
    /// kernel element may already be gone, and the expiry must be reported as such.
    /// The leases of `host` still live at `now_ms`.
    fn live_count(&self, host: &str, now_ms: u64) -> usize {
        self.hosts.get(host).map_or(0, |index| {
            index
                .iter()
                .filter_map(|held| self.leases.get(held.at as usize))
                .filter(|lease| lease.expires_ms > now_ms)
                .count()
        })
    }

    fn find_same(
        &self,
        index: &HashTable<Held>,
        now_ms: u64,
        fingerprint: u64,
        grants: &[Grant],
    ) -> Option<LeaseId> {
        let folded = Held::fold(fingerprint);
        index
            .iter_hash(Held::hash_of(folded))
            .filter(|held| held.fingerprint == folded)
            .filter_map(|held| self.leases.get(held.at as usize))
            .find(|lease| lease.expires_ms > now_ms && lease.grants == grants)
            .map(|lease| lease.id)
    }

    /// A new lease id (spec section 11.1): the creation time in milliseconds, 6 bytes
    /// big-endian, then 80 random bits. Ids made later sort later, so a store indexing them
    /// appends instead of touching a random page of its index for every grant (measured under
    /// load: the gateway's store writer spent about 30 % less time per grant); the random part
    /// keeps them unguessable.
    fn fresh_id<R: Rng + ?Sized>(&self, now_ms: u64, rng: &mut R) -> Result<LeaseId, Refusal> {
        // With 80 random bits a collision within one millisecond is not expected in the life of
        // the universe; the bound only keeps a broken RNG from hanging the gateway.
        for _ in 0..16 {
            let mut id = [0u8; 16];
            id[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
            rng.fill(&mut id[6..]);
            let id = LeaseId(id);
            if self.position(&id).is_none() {
                return Ok(id);
            }
        }
        Err(Refusal::NoFreeLeaseId)
    }

    /// The shared `Arc` of this host's identity, so a million leases do not hold a million
    /// copies of a few thousand names.
    fn intern_host(&self, host: &str) -> Arc<str> {
        match self.hosts.get_key_value(host) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(host),
        }
    }

    /// Adds a lease whose id is not in the book yet; the caller checked [`MAX_LEASES`].
    fn insert_indexed(&mut self, lease: Lease, fingerprint: u64) {
        let id = lease.id;
        let Ok(at) = u32::try_from(self.leases.len()) else {
            return;
        };
        self.expiry.insert((lease.expires_ms, at));
        let host = Arc::clone(&lease.host);
        self.leases.push(lease);
        let held = Held {
            at,
            fingerprint: Held::fold(fingerprint),
        };
        self.hosts.entry(host).or_default().insert_unique(
            Held::hash_of(held.fingerprint),
            held,
            |held| Held::hash_of(held.fingerprint),
        );
        self.by_id.insert(self.id_hash(&id), at);
    }

    fn set_expiry(&mut self, id: &LeaseId, expires_ms: u64) {
        let Some(at) = self.position(id) else {
            return;
        };
        let Ok(at32) = u32::try_from(at) else {
            return;
        };
        if let Some(lease) = self.leases.get_mut(at) {
            self.expiry.remove(&(lease.expires_ms, at32));
            lease.expires_ms = expires_ms;
            self.expiry.insert((expires_ms, at32));
        }
    }

    fn remove(&mut self, id: &LeaseId) -> Option<Lease> {
        let at = self.position(id)?;
        let at32 = u32::try_from(at).ok()?;
        let (fingerprint, expires_ms) = {
            let lease = self.leases.get(at)?;
            (
                self.fingerprint(&lease.host, &lease.grants),
                lease.expires_ms,
            )
        };
        self.by_id.remove(self.id_hash(id), at32);
        self.expiry.remove(&(expires_ms, at32));
        let lease = self.leases.swap_remove(at)?;
        if let Some(index) = self.hosts.get_mut(&lease.host) {
            let folded = Held::fold(fingerprint);
            if let Ok(entry) = index.find_entry(Held::hash_of(folded), |held| held.at == at32) {
                entry.remove();
            }
            if index.is_empty() {
                self.hosts.remove(&lease.host);
            }
        }
        // The last lease moved into the hole: point its index entries at its new place.
        if let Some(moved) = self.leases.get(at) {
            let from = u32::try_from(self.leases.len()).ok()?;
            let moved_fingerprint = Held::fold(self.fingerprint(&moved.host, &moved.grants));
            self.by_id.moved(self.id_hash(&moved.id), from, at32);
            if let Some(held) = self.hosts.get_mut(&moved.host).and_then(|index| {
                index.find_mut(Held::hash_of(moved_fingerprint), |held| held.at == from)
            }) {
                held.at = at32;
            }
            if self.expiry.remove(&(moved.expires_ms, from)) {
                self.expiry.insert((moved.expires_ms, at32));
            }
        }
        Some(lease)
    }
}

fn fingerprint(keys: &RandomState, host: &str, grants: &[Grant]) -> u64 {
    keys.hash_one((host, grants))
}

/// A lease in its host's index: its position in the book's vector, and the fingerprint of its
/// (host, grants) folded to 32 bits, which the index hashes by. 8 bytes an entry, where
/// positions alone took 4 in two indexes (by host, and by (host, grants)).
#[derive(Debug, Clone, Copy)]
struct Held {
    at: u32,
    fingerprint: u32,
}

impl Held {
    /// A fingerprint folded to the 32 bits an entry keeps.
    fn fold(fingerprint: u64) -> u32 {
        (fingerprint ^ (fingerprint >> 32)) as u32
    }

    /// The index's hash of a folded fingerprint: the table picks a slot by the low bits and
    /// tells entries apart by the top seven, so both halves carry all 32 bits.
    fn hash_of(folded: u32) -> u64 {
        (u64::from(folded) << 32) | u64::from(folded)
    }
}

/// Grants in canonical form: each grant's remote prefixes sorted and deduplicated, the grants
/// sorted and deduplicated, so that the same opening always compares equal.
pub fn canonical_grants(grants: &[Grant]) -> Vec<Grant> {
    into_canonical(grants.to_vec())
}

/// [`canonical_grants`] in place.
fn into_canonical(mut grants: Vec<Grant>) -> Vec<Grant> {
    for grant in &mut grants {
        grant.remotes.sort();
        grant.remotes.dedup();
    }
    grants.sort();
    grants.dedup();
    grants
}

fn expiry_after(now_ms: u64, secs: u32) -> u64 {
    now_ms.saturating_add(u64::from(secs) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Capabilities, HostAddresses, PortRange, Prefix, Protocol, Target};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const POLICY: LifetimePolicy = LifetimePolicy {
        min: 60,
        max: 3600,
        default: 600,
    };

    fn hello(versions: Vec<u16>) -> Hello {
        Hello {
            common: Common::default(),
            versions,
            capabilities: Capabilities::default(),
            software: None,
        }
    }

    fn opening(host: Option<IpAddr>, family: Option<Family>) -> Opening {
        Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
            },
            host: host.into(),
            family,
            remotes: Vec::new(),
        }
    }

    fn with_remotes(opening: Opening, remotes: &[&str]) -> Opening {
        let remotes = remotes
            .iter()
            .map(|r| {
                let (addr, len) = r.split_once('/').unwrap();
                Prefix {
                    addr: addr.parse().unwrap(),
                    len: len.parse().unwrap(),
                }
            })
            .collect();
        Opening { remotes, ..opening }
    }

    /// The host's index is found by fingerprint and keeps the fingerprint of each entry: it
    /// stays right while it grows (rehashed from its entries alone) and while removals move
    /// the book's last lease into the hole they leave.
    #[test]
    fn re_opens_find_their_lease_while_the_host_index_grows_and_leases_move() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut book = LeaseBook::new();
        let host = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let facts = |port: u16| PolicyFacts {
            grants: vec![Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(port),
                host,
                remotes: Vec::new(),
                app: None,
            }],
            grants_narrowed: false,
            lifetime: POLICY,
            max_leases: None,
        };
        let open = Open {
            common: Common::default(),
            opening: opening(None, None),
            lifetime: Some(600),
            app: None,
        };
        let hosts = ["fwnp://host/a", "fwnp://host/b"];
        // Thousands of leases a host: its index grows (and rehashes) many times over.
        const PORTS: u16 = 3000;
        let mut ids = HashMap::new();
        for port in 1..=PORTS {
            for host in hosts {
                match book.open(1_000, host, &open, &facts(port), &mut rng) {
                    Ok(OpenOutcome::NewLease(grant)) => {
                        ids.insert((host, port), grant.lease.id);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(book.lease_count(hosts[0]), usize::from(PORTS));
        // Every third lease of host a goes: each removal moves the last lease of the book.
        for port in (1..=PORTS).filter(|port| port % 3 == 0) {
            let id = ids.remove(&(hosts[0], port)).expect("id");
            assert!(book.release(2_000, hosts[0], &id).is_ok());
        }
        // Each lease left is found again by its host and grants, under its own id; the others
        // are opened anew.
        for port in 1..=PORTS {
            for host in hosts {
                let outcome = book.open(3_000, host, &open, &facts(port), &mut rng);
                match (ids.get(&(host, port)), outcome) {
                    (Some(id), Ok(OpenOutcome::Extended { grant, .. })) => {
                        assert_eq!(grant.lease.id, *id);
                    }
                    (None, Ok(OpenOutcome::NewLease(_))) => {}
                    (id, outcome) => panic!("{host} port {port} ({id:?}): {outcome:?}"),
                }
            }
        }
        assert_eq!(book.len(), 2 * usize::from(PORTS));
        assert_eq!(book.lease_count(hosts[0]), usize::from(PORTS));
        assert_eq!(book.leases_of(hosts[1]).count(), usize::from(PORTS));
    }

    #[test]
    fn an_applied_lease_joins_every_index_and_an_applied_end_past_is_reaped() {
        let mut book = LeaseBook::new();
        let grant = |port| Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            host: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            remotes: Vec::new(),
            app: None,
        };
        let lease = Lease {
            id: LeaseId([3; 16]),
            host: Arc::from("fwnp://host/a"),
            // Not in canonical order: the book sorts them, as it does its own.
            grants: vec![grant(443), grant(80)],
            lifetime: 60,
            created_ms: 0,
            expires_ms: 60_000,
            app: None,
        };
        assert_eq!(book.apply(lease.clone()), Applied::Inserted);
        assert!(book.owned("fwnp://host/a", &lease.id).is_some());
        assert!(book.owned("fwnp://host/b", &lease.id).is_none());
        assert_eq!(book.lease_count("fwnp://host/a"), 1);
        assert_eq!(
            book.get(&lease.id).map(|l| l.grants.clone()),
            Some(vec![grant(80), grant(443)])
        );
        // A renewal made elsewhere that shortens the lease is taken as it is.
        let shorter = Lease {
            expires_ms: 30_000,
            lifetime: 30,
            ..lease.clone()
        };
        assert_eq!(
            book.apply(shorter.clone()),
            Applied::Changed {
                previous_expires_ms: 60_000
            }
        );
        assert_eq!(book.next_expiry(), Some(30_000));
        assert_eq!(book.apply(shorter), Applied::Unchanged);
        // Renew from its host works on the applied lease.
        let renewed = book
            .renew(10_000, "fwnp://host/a", &lease.id, Some(120), POLICY)
            .expect("renewed");
        assert_eq!(renewed.previous_expires_ms, 30_000);
        // A lease stored with an expiry already past is taken, and the next reaping ends it.
        let past = Lease {
            id: LeaseId([4; 16]),
            expires_ms: 5_000,
            ..lease
        };
        assert_eq!(book.apply(past.clone()), Applied::Inserted);
        let reaped = book.expire_due(6_000);
        assert_eq!(
            reaped.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![past.id]
        );
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(&hello(vec![3, 1])), Ok(1));
        assert_eq!(
            negotiate_version(&hello(vec![2])).map_err(|r| r.code()),
            Err(ResultCode::UnsupportedVersion)
        );
        assert_eq!(negotiate_version(&hello(vec![])), Err(Refusal::NoVersions));
    }

    #[test]
    fn lifetime_clamping() {
        let c = |asked, fallback| clamp_lifetime(asked, fallback, POLICY);
        assert_eq!(
            c(None, 600),
            Ok(ClampedLifetime {
                secs: 600,
                narrowed: false
            })
        );
        assert_eq!(
            c(Some(0), 600),
            Ok(ClampedLifetime {
                secs: 600,
                narrowed: false
            })
        );
        assert_eq!(
            c(Some(120), 600),
            Ok(ClampedLifetime {
                secs: 120,
                narrowed: false
            })
        );
        assert_eq!(
            c(Some(10), 600),
            Ok(ClampedLifetime {
                secs: 60,
                narrowed: true
            })
        );
        assert_eq!(
            c(Some(7200), 600),
            Ok(ClampedLifetime {
                secs: 3600,
                narrowed: true
            })
        );
        assert_eq!(c(Some(MAX_LIFETIME_SECS), 600).map(|l| l.secs), Ok(3600));
        assert_eq!(
            c(Some(MAX_LIFETIME_SECS + 1), 600),
            Err(Refusal::LifetimeOutOfRange {
                asked: MAX_LIFETIME_SECS + 1
            })
        );
        // A policy with min > max must not panic; the max wins.
        let odd = LifetimePolicy {
            min: 500,
            max: 100,
            default: 300,
        };
        assert_eq!(clamp_lifetime(None, 300, odd).map(|l| l.secs), Ok(100));
        // A zero lifetime is never granted.
        let zero = LifetimePolicy {
            min: 0,
            max: 0,
            default: 0,
        };
        assert_eq!(clamp_lifetime(None, 0, zero).map(|l| l.secs), Ok(1));
    }

    #[test]
    fn host_address_resolution() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10));
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        let allowed = [v4, v6];
        let resolve = |o: &Opening, allowed: &[IpAddr], third_party| {
            resolve_host_addresses(o, allowed, third_party)
        };
        assert_eq!(
            resolve(&opening(Some(v6), None), &allowed, false),
            Ok(vec![v6])
        );
        assert_eq!(
            resolve(&opening(Some(other), None), &allowed, false),
            Err(Refusal::AddressMismatch { address: other })
        );
        assert_eq!(
            resolve(&opening(Some(other), None), &allowed, true),
            Ok(vec![other])
        );
        // No address named: every allowed address, both families, in Welcome's order.
        assert_eq!(
            resolve(&opening(None, None), &allowed, false),
            Ok(vec![v4, v6])
        );
        assert_eq!(
            resolve(&opening(None, Some(Family::Ipv6)), &allowed, false),
            Ok(vec![v6])
        );
        let err = resolve(&opening(None, Some(Family::Ipv6)), &[v4], false);
        assert_eq!(err.map_err(|r| r.code()), Err(ResultCode::AddressMismatch));
        assert!(resolve(&opening(None, None), &[], true).is_err());
    }

    #[test]
    fn several_host_addresses_are_each_checked() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10));
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 99));
        let both = Opening {
            host: HostAddresses::List(vec![v6, v4]),
            ..opening(None, None)
        };
        assert_eq!(
            resolve_host_addresses(&both, &[v4, v6], false),
            Ok(vec![v6, v4])
        );
        let with_other = Opening {
            host: HostAddresses::List(vec![v4, other]),
            ..opening(None, None)
        };
        assert_eq!(
            resolve_host_addresses(&with_other, &[v4, v6], false),
            Err(Refusal::AddressMismatch { address: other })
        );
        assert_eq!(
            resolve_host_addresses(&with_other, &[v4, v6], true),
            Ok(vec![v4, other])
        );
    }

    /// Spec section 9.2: with remote prefixes and neither an address nor a family, the
    /// prefixes' family chooses the addresses, whatever the order of the allowed addresses.
    #[test]
    fn remote_prefixes_choose_the_family() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd18, 1, 0, 0, 0, 0, 0, 10));
        let v6_remotes = with_remotes(opening(None, None), &["fd18:1::2/128"]);
        let v4_remotes = with_remotes(opening(None, None), &["198.51.100.0/24"]);
        assert_eq!(
            resolve_host_addresses(&v6_remotes, &[v4, v6], false),
            Ok(vec![v6])
        );
        assert_eq!(
            resolve_host_addresses(&v4_remotes, &[v6, v4], false),
            Ok(vec![v4])
        );
        // The opening is valid: the prefixes agree with the address chosen.
        assert_eq!(crate::validate::validate_opening(&v6_remotes), Ok(()));
    }

    /// Spec section 9.2: a host with no address of the remote prefixes' family is refused with
    /// address-mismatch (the family is missing on the host), not malformed-option (the opening
    /// itself is well-formed).
    #[test]
    fn remote_prefixes_of_a_family_the_host_lacks() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let v6_remotes = with_remotes(opening(None, None), &["fd18:1::2/128"]);
        assert_eq!(crate::validate::validate_opening(&v6_remotes), Ok(()));
        let refusal = resolve_host_addresses(&v6_remotes, &[v4], false).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::NoAddress {
                family: Some(Family::Ipv6)
            }
        );
        assert_eq!(refusal.code(), ResultCode::AddressMismatch);
        assert_eq!(
            refusal.to_string(),
            "the host holds no address of family IPv6 it may open"
        );
    }

    #[test]
    fn canonical_grants_sort_and_dedup() {
        let host = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let p = |a: u8| Prefix {
            addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, a)),
            len: 32,
        };
        let g = |port: u16, remotes: Vec<Prefix>| Grant {
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            host,
            remotes,
            app: None,
        };
        let messy = vec![g(443, vec![p(2), p(1), p(2)]), g(80, vec![]), g(80, vec![])];
        let clean = canonical_grants(&messy);
        assert_eq!(clean, vec![g(80, vec![]), g(443, vec![p(1), p(2)])]);
    }

    #[test]
    fn refusal_to_denied_carries_code_and_reason() {
        let denied = Refusal::QuotaExceeded { held: 3, max: 3 }.to_denied(Some(9), None);
        assert_eq!(denied.code, ResultCode::QuotaExceeded);
        assert_eq!(denied.common.request_id, Some(9));
        assert!(denied.reason.is_some_and(|r| r.contains('3')));
    }

    #[test]
    fn a_refusal_naming_many_versions_still_makes_a_denied_a_client_can_decode() {
        let refusal = Refusal::UnsupportedVersion {
            offered: vec![65535; 300],
        };
        let denied = refusal.to_denied(Some(1), None);
        let bytes = crate::codec::encode(&crate::Message::Denied(denied));
        assert!(
            crate::codec::decode(&bytes).is_ok(),
            "the reason is cut to the schema's 512 bytes"
        );
    }

    #[test]
    fn lease_record_stays_small() {
        // The book holds up to a million of these; keep the inline record compact.
        assert!(
            std::mem::size_of::<Lease>() <= 96,
            "{}",
            std::mem::size_of::<Lease>()
        );
    }
}
