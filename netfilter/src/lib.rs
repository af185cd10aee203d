//! nftables over netlink for the FWNP gateway and host agent.
//!
//! This crate is the only code in FWNP that speaks to nf_tables. The gateway and the host
//! agent hand it a desired state (a [`Layout`]: the gateway's forward filter or the host's
//! input filter) and element changes (an [`Element`], made from a grant by
//! [`Element::from_grant`]: added, renewed, removed), and never build netlink messages
//! themselves, the way mullvad's talpid-core keeps its firewall behind one interface. It owns
//! one table (`inet fwnp` or `inet fwnp_host` by default) entirely and never touches any other;
//! by default the kernel enforces that ownership (see below). It is not a general nftables
//! library: it builds exactly the tables FWNP needs, and never spawns `nft`.
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
//!   conntrack (ctnetlink) and the ruleset's generation are not libnftnl's business at all;
//! - with our own encoding every byte is unit-tested against what `nft --debug=netlink` sends,
//!   and there is no C library to build against. The only `unsafe` code is the socket itself:
//!   the few syscalls in `src/sys.rs` (socket, bind, setsockopt, getsockopt, sendto, recv),
//!   each with a `// SAFETY:` comment (the crate root denies `unsafe_code` and only
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
//!   through. Reading is not affected: `nft list ruleset` and the dumps of another handle see
//!   the table as before;
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
//! elements) and reads it back. [`Netfilter::reconcile`] with many elements (a gateway
//! restarting with its leases) flushes and refills the sets in one transaction rather than
//! listing them, which nf_tables does in time quadratic in the set's size. Repairs
//! ([`Netfilter::repair`]) list small tables, to report each element that differed, and look
//! the desired elements of large ones up one by one (a shared table's sets are then replaced
//! whole, as only a listing could find what someone else added). [`Netfilter::commit`] sends
//! element changes as one transaction per batch (split only past the socket's send buffer,
//! several megabytes), each message with NLM_F_ACK and each acknowledgement matched by
//! sequence number to the caller's change.
//! nf_tables aborts a whole transaction when one element fails; this crate then gives that
//! element its own error and sends the others again without it, so one bad element never loses
//! the others. Renewals refresh the expiry with NFTA_SET_ELEM_EXPIRATION when the kernel honours
//! it (probed once per handle, see [`RenewMethod`]), else by delete and re-add in one
//! transaction. The [`Batcher`] puts this behind an async interface and repairs a shared table
//! when someone else flushes or deletes it, or changes its elements: it notices within a tenth
//! of a second that the ruleset's generation moved on by more than its own transactions (it
//! does not listen to the nf_tables events, for which the kernel would build one message per
//! element of every batch), and the periodic checks are the net (the structure every second;
//! the elements every ten seconds by default, so that an element nobody leased lives at most
//! that long even when a change went unseen).

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod batcher;
mod coalesce;
mod conntrack;
mod element_map;
mod error;
mod key;
mod layout;
mod netfilter;
mod nl;
mod reconcile;
mod sys;

use std::net::IpAddr;
use std::time::Duration;

pub use batcher::{BatchStats, Batcher, BatcherConfig, DesiredState, RepairEvent, RepairTrigger};
pub use coalesce::Coalescing;
pub use element_map::ElementMap;
pub use error::Error;
use fwnp_proto::Grant;
pub use fwnp_proto::message::{PortRange, Prefix, Protocol};
pub use layout::{
    AlwaysAllowed, GatewayLayout, HostLayout, HostMode, Layout, LocalRedirect, Refuse,
};
pub use netfilter::{Counter, Netfilter, Ownership, RenewMethod};

/// One set element of the table: what the kernel holds for an opening granted to a host (one
/// protocol, port range and source).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
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

impl Element {
    /// The elements that carry out a grant, on the gateway and on the host alike: one per
    /// remote prefix the grant is restricted to, or one admitting any source.
    ///
    /// ```
    /// use fwnp_netfilter::{Element, PortRange, Prefix, Protocol};
    /// use fwnp_proto::Grant;
    ///
    /// let grant = Grant {
    ///     protocol: Protocol::Tcp,
    ///     ports: PortRange::single(443),
    ///     host: "198.18.1.2".parse().unwrap(),
    ///     remotes: vec!["203.0.113.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
    ///     app: None,
    /// };
    /// let elements = Element::from_grant(&grant);
    /// assert_eq!(elements.len(), 2);
    /// assert_eq!(elements[0].remote, Some("203.0.113.0/24".parse::<Prefix>().unwrap()));
    /// assert!(elements.iter().all(|e| e.host == grant.host && e.ports == grant.ports));
    /// ```
    pub fn from_grant(grant: &Grant) -> Vec<Element> {
        Self::of_grant(grant).collect()
    }

    /// The elements of [`Element::from_grant`] one by one, for a caller that collects those of
    /// several grants without a vector for each.
    ///
    /// ```
    /// use fwnp_netfilter::{Element, PortRange, Protocol};
    /// use fwnp_proto::Grant;
    ///
    /// let grant = Grant {
    ///     protocol: Protocol::Udp,
    ///     ports: PortRange::single(53),
    ///     host: "198.18.1.2".parse().unwrap(),
    ///     remotes: Vec::new(),
    ///     app: None,
    /// };
    /// let elements: Vec<Element> = Element::of_grant(&grant).collect();
    /// assert_eq!(elements, Element::from_grant(&grant));
    /// assert_eq!(elements[0].remote, None);
    /// ```
    pub fn of_grant(grant: &Grant) -> impl Iterator<Item = Element> + '_ {
        let element = move |remote| Element {
            host: grant.host,
            protocol: grant.protocol,
            ports: grant.ports,
            remote,
        };
        // No remote prefix: one element admitting any source.
        let any = grant.remotes.is_empty().then(|| element(None));
        any.into_iter()
            .chain(grant.remotes.iter().map(move |p| element(Some(*p))))
    }
}

/// An element change for [`Netfilter::commit`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// Add an element that expires after the duration; fails if it exists.
    Add(Element, Duration),
    /// Set the element's remaining time to the duration.
    Renew(Element, Duration),
    /// Remove the element at once.
    Remove(Element),
}

impl Change {
    /// The element this change is about.
    pub fn element(&self) -> &Element {
        match self {
            Change::Add(o, _) | Change::Renew(o, _) | Change::Remove(o) => o,
        }
    }
}

/// What [`Netfilter::reconcile`] changed.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Elements added (all desired ones when the table was recreated); empty when the sets
    /// were replaced (see `replaced`), which a recreated table's are from
    /// [`Netfilter::REPLACE_AT`] elements on: a start that writes a million of them needs
    /// only how many, in `added_count`.
    pub added: Vec<Element>,
    /// How many elements were added: those in `added`, or when the sets were replaced, every
    /// desired element that could be held ([`Netfilter::reconcile`]) or those of them that
    /// were missing ([`Netfilter::repair`]).
    pub added_count: usize,
    /// Elements removed because they were not desired.
    pub removed: Vec<Element>,
    /// How many elements had their timeout refreshed.
    pub refreshed: usize,
    /// Whether the table was missing or damaged and was recreated.
    pub table_recreated: bool,
    /// Whether the sets' contents were replaced whole in one transaction (see
    /// [`Netfilter::REPLACE_AT`]): then `added` and `removed` are empty, as what the kernel
    /// held before was not listed, and whatever it held that was not desired is gone.
    pub replaced: bool,
    /// Elements that could not be brought to the desired state, with the reason.
    pub failed: Vec<(Element, Error)>,
    /// Whether elements nobody desires may have stayed in the sets: a
    /// [`Netfilter::repair`] of many elements on a shared table whose one-transaction
    /// replacement the kernel refused put back and refreshed the desired ones only.
    pub undesired_may_remain: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_for_any_source_is_one_element_without_a_remote() {
        let grant = Grant {
            protocol: Protocol::Udp,
            ports: PortRange {
                first: 5000,
                last: 5010,
            },
            host: "2001:db8::7".parse().unwrap(),
            remotes: Vec::new(),
            app: Some("media".into()),
        };
        assert_eq!(
            Element::from_grant(&grant),
            vec![Element {
                host: grant.host,
                protocol: Protocol::Udp,
                ports: grant.ports,
                remote: None,
            }]
        );
    }
}
