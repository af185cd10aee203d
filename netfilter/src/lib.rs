//! nftables over netlink for the FWNP gateway and host agent.
//!
//! This crate is the only code in FWNP that speaks to nf_tables. The gateway and the host
//! agent hand it a desired state (a [`Layout`]: the gateway's forward filter or the host's
//! input filter) and element changes (an [`Opening`] added, renewed, removed), and never build
//! netlink messages themselves, the way mullvad's talpid-core keeps its firewall behind one
//! interface. It owns one table (`inet fwnp` or `inet fwnp_host` by default) entirely and never
//! touches any other; by default the kernel enforces that ownership (see below). It is not a general nftables library: it builds exactly the tables FWNP
//! needs, and never spawns `nft`.
//!
//! # How it talks to the kernel, and why not libnftnl
//!
//! The design named libnftnl (through the `nftnl` crate) as `nft` itself uses. We encode the
//! nf_tables netlink messages ourselves instead (module `nl`, a builder and a bounds-checked
//! attribute walker of a few hundred lines), because for this crate that is clearly smaller and
//! safer:
//! - `nftnl` 0.9 has no set or element timeouts, no concatenated keys, no interval sets, no
//!   32-bit registers (its expressions always write NFT_REG_1) and forces NLM_F_EXCL on element
//!   messages: every set, every element message and half the rule expressions would go through
//!   raw `nftnl-sys` calls with manual allocation and freeing, an `unsafe` block each;
//! - reading elements back must be a plain attribute walk anyway (fast on 100,000 elements), and
//!   conntrack (ctnetlink) and the nf_tables event stream are not libnftnl's business at all;
//! - with our own encoding every byte is unit-tested against what `nft --debug=netlink` sends,
//!   and there is no C library to build against. The only `unsafe` code is the socket itself:
//!   the few syscalls in `src/sys.rs` (socket, bind, setsockopt, getsockopt, sendto, recv,
//!   gettid), each with a `// SAFETY:` comment (the crate root denies `unsafe_code` and only
//!   that module allows it).
//!
//! # Tables
//!
//! Both layouts use four sets: `lease4`/`lease6`, hash sets keyed
//! `addr . inet_proto . inet_service` with `flags timeout` for the common opening (one port,
//! any source), and `range4`/`range6`, concatenated interval sets (the kernel's pipapo backend)
//! keyed `addr . inet_proto . inet_service . saddr` with `flags interval, timeout` for port
//! ranges and source prefixes, "any source" being the whole address space. The running kernel
//! (6.18) accepts per-element timeouts in the interval sets, so ranges are held as single
//! elements rather than a bounded expansion into ports: a lease for 10,000 ports is one element.
//! Interval elements of one host and protocol must not overlap unless identical: the kernel
//! answers EEXIST for both, and the crate tells them apart ([`Error::ElementExists`] for the
//! same element, [`Error::ElementConflicts`] for an overlap).
//!
//! Reading a table back compares its base chains (hook, priority, policy), its sets (flags, key
//! length), its counters and every rule's expressions with the layout, so a rule replaced or a
//! policy changed by someone else counts as damage, not only a deleted table.
//!
//! The gateway's chain `forward` (policy accept) passes established and related traffic, sends
//! guarded traffic (towards `protected` prefixes and/or arriving on `inbound_interfaces`) to
//! chain `guard`, which accepts it if a lease set matches and otherwise drops or rejects it;
//! everything else falls through untouched. The host's chain `input` passes loopback,
//! established and related traffic, IPv6 neighbour discovery and the always-allowed entries,
//! then leases; the rest is dropped (enforce) or counted and accepted (monitor). Each verdict
//! counts into a named counter ([`Netfilter::counters`]).
//!
//! # Ownership: what a flush or a delete by someone else does
//!
//! A firewall reload (`nft flush ruleset`, `nft -f` of a file that starts with a flush) or an
//! operator's `nft delete table` used to remove our table, and the protected network was open
//! until the [`Batcher`] had put it back: of 20,000 UDP datagrams sent to a port with no lease
//! during five flushes and five deletes, 2,064 passed (25 to 31 ms per repair). So the
//! table is created with the nf_tables flags `owner` and `persist` ([`Ownership::Owned`], the
//! default):
//! - while the handle that created it (or claimed it) is open, only its netlink socket may
//!   change or delete it: `nft delete table`, `nft flush chain`, `nft add element` and the like
//!   fail with EPERM, another handle gets [`Error::TableOwned`] or [`Error::PermissionDenied`],
//!   and `nft flush ruleset` passes it by, so that the same measurement lets no datagram
//!   through. Reading is not affected: `nft list ruleset`, the dumps of another handle and the
//!   batcher's event socket (which only listens) see the table as before;
//! - when that socket closes (the gateway or agent stops or dies), the table stays, with its
//!   elements still counting down their timeouts, so the system keeps failing closed; it is then
//!   an ordinary table that anyone may change, a flush included, until a new handle claims it
//!   (its first [`Netfilter::reconcile`] does, before anything else; [`Netfilter::apply`]
//!   replaces it). A table made without `persist` (by an older version) is recreated instead.
//!
//! A second table at a later priority that drops what the first did not mark as accepted was
//! weighed and set aside: `nft flush ruleset` removes both tables, so it only helps against
//! a delete of the first table alone, which ownership already refuses; and it would cost a mark
//! on every accepted packet. Kernels before 6.9 do not know `persist`: there [`Netfilter::apply`]
//! falls back to [`Ownership::Shared`] (logged), an ordinary table that a flush removes and the
//! batcher repairs within milliseconds, the protected network being open meanwhile.
//!
//! # Transactions
//!
//! [`Netfilter::apply`] replaces the table in one transaction (delete if present, create,
//! elements) and reads it back. [`Netfilter::commit`] sends element changes as one transaction
//! per batch (split only past the socket's send buffer, several megabytes), each message with
//! NLM_F_ACK and each acknowledgement matched by sequence number to the caller's change.
//! nf_tables aborts a whole transaction when one element fails; this crate then gives that
//! element its own error and sends the others again without it, so one bad element never loses
//! the others. Renewals refresh the expiry with NFTA_SET_ELEM_EXPIRATION when the kernel honours
//! it (probed once per handle, see [`RenewMethod`]), else by delete and re-add in one
//! transaction. The [`Batcher`] puts this behind an async interface and repairs a shared table
//! when someone else flushes or deletes it, or changes its elements: it hears of it from the
//! nf_tables events within milliseconds, and the periodic checks are the net (the structure
//! every second; the elements every ten seconds by default, so that an element nobody leased
//! lives at most that long even when events were missed).

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod batcher;
mod conntrack;
mod error;
mod key;
mod layout;
mod netfilter;
mod nl;
mod reconcile;
mod sys;

#[cfg(feature = "lab")]
pub mod lab;

use std::net::IpAddr;
use std::time::Duration;

pub use batcher::{BatchStats, Batcher, BatcherConfig, RepairEvent, RepairTrigger};
pub use error::Error;
pub use fwnp_proto::message::{PortRange, Prefix, Protocol};
pub use layout::{
    AlwaysAllowed, GatewayLayout, HostLayout, HostMode, Layout, LocalRedirect, Refuse,
};
pub use netfilter::{Counter, Netfilter, Ownership, RenewMethod};

/// One opening as the kernel holds it: a set element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Opening {
    /// The protected host's address: on the gateway the destination of the connections, on
    /// the host its own address being opened.
    pub host: IpAddr,
    /// The transport protocol.
    pub protocol: Protocol,
    /// The destination ports, `first..=last`.
    pub ports: PortRange,
    /// The sources that may connect; `None`: any source.
    pub remote: Option<Prefix>,
}

/// An element change for [`Netfilter::commit`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// Add an opening that expires after the duration; fails if it exists.
    Add(Opening, Duration),
    /// Set the opening's remaining time to the duration.
    Renew(Opening, Duration),
    /// Remove the opening at once.
    Remove(Opening),
}

impl Change {
    /// The opening this change is about.
    pub fn opening(&self) -> &Opening {
        match self {
            Change::Add(o, _) | Change::Renew(o, _) | Change::Remove(o) => o,
        }
    }
}

/// What [`Netfilter::reconcile`] changed.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Openings added (all desired ones when the table was recreated).
    pub added: Vec<Opening>,
    /// Openings removed because they were not desired.
    pub removed: Vec<Opening>,
    /// How many openings had their timeout refreshed.
    pub refreshed: usize,
    /// Whether the table was missing or damaged and was recreated.
    pub table_recreated: bool,
    /// Openings that could not be brought to the desired state, with the reason.
    pub failed: Vec<(Opening, Error)>,
}
