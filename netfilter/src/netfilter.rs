//! The synchronous handle: opening, applying a layout, reconciling, ownership; element
//! transactions, dumps and verification are in the modules below, behind the same handle.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use fwnp_proto::message::{PortRange, Protocol};

use crate::error::{TABLE_ATTR_OFFSET, from_ack};
use crate::key::{ALL_SETS, ElementKey, SetId, decode, encode};
use crate::layout::{
    ChainProps, Expected, Layout, NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST, Op, Sequencer,
    write_table,
};
use crate::nl::*;
use crate::reconcile::{Plan, needs_refresh, plan};
use crate::sys::NetlinkSocket;
use crate::{Change, Element, Error, ReconcileReport};

mod dump;
mod transaction;
mod verify;

use self::transaction::*;
use self::verify::*;

/// How a renewal refreshes an element's expiry on the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RenewMethod {
    /// Re-add without NLM_F_EXCL, carrying NFTA_SET_ELEM_EXPIRATION equal to the timeout (what
    /// `nft add element ... timeout T expires T` does). One message per renewal.
    Expiration,
    /// Delete and re-add the element in one transaction: works on every kernel, but a renewal
    /// of an element that has already expired fails with [`Error::ElementMissing`].
    DeleteAdd,
}

/// Whether our table belongs to the netlink socket of the handle that created or claimed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Ownership {
    /// The table carries the flags `owner` and `persist`: while the handle lives, no other
    /// socket (another process, `nft`, or another handle of this process) may change or delete
    /// it, and `nft flush ruleset` passes it by; when the handle's socket closes, the table
    /// stays with its elements counting down, until a new handle claims it
    /// ([`Netfilter::reconcile`] does). Needs kernel 6.9; older kernels fall back to
    /// [`Ownership::Shared`].
    #[default]
    Owned,
    /// An ordinary table: anyone with CAP_NET_ADMIN may change or delete it, a flush of the
    /// ruleset removes it, and the [`crate::Batcher`] repairs it afterwards.
    Shared,
}

/// One named counter of our table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Counter {
    /// The counter's name (see [`Layout::counter_names`]).
    pub name: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// Requested socket buffers. The send buffer bounds one transaction (a batch must fit it
/// whole); the receive buffer must hold one acknowledgement per message of a batch.
const SEND_BUFFER: usize = 8 << 20;
const RECV_BUFFER: usize = 32 << 20;
/// Upper bound of one transaction in bytes, whatever the socket allows: larger batches cost
/// more per element (see notes) and hold the kernel's nft mutex longer.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// An element nest may not exceed the 16-bit attribute length; keep clear of it.
const MAX_ELEMENTS_NEST: usize = 60_000;
/// Largest element we write (IPv6 interval key and end, timeout and expiration), for sizing.
const MAX_ELEMENT_BYTES: usize = 160;
/// How long to wait for the kernel's replies; it answers within sendmsg, so this only bounds a
/// misbehaving kernel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds of retrying a batch without its failed elements before giving up.
const MAX_ROUNDS: usize = 8;
/// What a reconcile or a repair does when the kernel does not take a replacement batch, for the
/// log.
const LISTING: &str = "listing the sets instead";

/// A synchronous handle on nf_tables in the network namespace it was opened in.
///
/// It only ever touches the table named by the layout it is given (family `inet`).
#[derive(Debug)]
pub struct Netfilter {
    socket: NetlinkSocket,
    seq: u32,
    max_batch_bytes: usize,
    recv_buf: Vec<u8>,
    renew_method: Option<RenewMethod>,
    ownership: Ownership,
    /// Transactions of this handle the kernel committed, each of which moved the ruleset's
    /// generation on by one.
    committed: u64,
}

pub(crate) fn next_seq(seq: &mut u32) -> u32 {
    bump(seq)
}

/// The openings a refused replacement gives back, and those it set aside with the reason.
type Refused = (Vec<(Element, Duration)>, Vec<(Element, Error)>);

/// What a desired opening lacks in the kernel, as a repair's lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lack {
    /// It is held with about the desired time.
    Nothing,
    /// It is not held.
    Element,
    /// It is held for a time far from the desired one.
    Time,
}

/// Takes the time since `since` off the desired openings' lifetimes, and drops those whose
/// lifetime ran out meanwhile (with what they lack), so that nothing written outlives what is
/// desired by the time a repair's lookups took; `since` becomes now.
fn age(desired: &mut Vec<(Element, Duration)>, lacks: &mut Vec<Lack>, since: &mut Instant) {
    let elapsed = since.elapsed();
    *since = Instant::now();
    let mut kept = 0;
    for at in 0..desired.len() {
        let Some(left) = desired[at].1.checked_sub(elapsed).filter(|t| !t.is_zero()) else {
            continue;
        };
        desired[at].1 = left;
        desired.swap(kept, at);
        if at < lacks.len() {
            lacks.swap(kept, at);
        }
        kept += 1;
    }
    desired.truncate(kept);
    lacks.truncate(kept);
}

impl Netfilter {
    /// Opens a netlink socket in the calling thread's network namespace and raises its buffers.
    pub fn open() -> Result<Self, Error> {
        let socket = NetlinkSocket::open()?;
        let granted = socket.set_buffers(SEND_BUFFER, RECV_BUFFER)?;
        socket.set_recv_timeout(Some(REPLY_TIMEOUT))?;
        // netlink_sendmsg refuses a datagram larger than the send buffer less 32 bytes.
        let max_batch_bytes = granted
            .saturating_sub(4096)
            .clamp(64 * 1024, MAX_BATCH_BYTES);
        Ok(Netfilter {
            socket,
            seq: 0,
            max_batch_bytes,
            recv_buf: vec![0u8; 1 << 20],
            renew_method: None,
            ownership: Ownership::Owned,
            committed: 0,
        })
    }

    /// Whether the tables this handle creates belong to it (the default) or are shared; see
    /// [`Ownership`]. Takes effect at the next [`Netfilter::apply`] or [`Netfilter::reconcile`].
    pub fn set_ownership(&mut self, ownership: Ownership) {
        self.ownership = ownership;
    }

    /// The ownership of the tables this handle creates: [`Ownership::Shared`] after the kernel
    /// refused the ownership flags.
    pub fn ownership(&self) -> Ownership {
        self.ownership
    }

    fn table_flags(&self) -> u32 {
        match self.ownership {
            Ownership::Owned => NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST,
            Ownership::Shared => 0,
        }
    }

    /// Takes ownership of our table if it is orphaned (its owner's socket closed: a gateway or
    /// agent that stopped or died). `Ok(false)`: the table cannot be owned as it stands (it was
    /// created without `persist`) and must be recreated. Does nothing for shared tables.
    fn claim(&mut self, table: &str) -> Result<bool, Error> {
        if self.ownership == Ownership::Shared {
            return Ok(true);
        }
        let mut txn = self.new_txn();
        let mut seq = TxnSequencer {
            next_seq: &mut self.seq,
            metas: &mut txn.metas,
        };
        let s = seq.next(Op::CreateTable);
        // NEWTABLE on an existing table (no NLM_F_CREATE) updates its flags: setting `owner`
        // on an orphaned persistent table makes this socket its owner.
        let m = txn
            .b
            .begin_nft(NFT_MSG_NEWTABLE, NLM_F_REQUEST | NLM_F_ACK, s, NFPROTO_INET);
        txn.b.put_str(NFTA_TABLE_NAME, table);
        txn.b
            .put_u32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST);
        txn.b.end_msg(m);
        let outcome = self.run(txn)?;
        if outcome.ok() {
            return Ok(true);
        }
        match outcome.acks.first().map(|a| a.errno) {
            Some(libc::EOPNOTSUPP) => Ok(false),
            Some(libc::EPERM) => Err(Error::TableOwned {
                table: table.to_string(),
            }),
            Some(libc::ENOENT) => Err(Error::TableMissing {
                table: table.to_string(),
            }),
            _ => Err(first_error(&outcome, table)),
        }
    }

    /// The renewal method found by probing the kernel (after the first [`Netfilter::apply`] or
    /// renewal), or `None` before that.
    pub fn renew_method(&self) -> Option<RenewMethod> {
        self.renew_method
    }

    /// The largest transaction this handle sends, in bytes (bounded by the socket's send
    /// buffer); larger commits are split into several transactions.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    /// Replaces our table atomically: one transaction deletes it if present and creates the
    /// table, its counters, sets, chains and rules and the given elements; then it is read
    /// back and compared with the layout. Applying twice is harmless.
    ///
    /// Elements are put back as they are given (a repeated opening once, the last timeout
    /// wins). If they do not fit one transaction (several megabytes, hundreds of thousands of
    /// elements), the rest follow in further transactions right after the table's.
    pub fn apply(
        &mut self,
        layout: &Layout,
        elements: &[(Element, Duration)],
    ) -> Result<(), Error> {
        let asked = Instant::now();
        crate::layout::validate(layout)?;
        let table = layout.table().to_string();
        let mut keys: Vec<(ElementKey, Duration)> = Vec::with_capacity(elements.len());
        // The positions of the distinct keys in `keys`, by the key's hash. A map of the keys
        // themselves held a copy of each: applying a million elements took 311 MB more at its
        // peak, now 148 MB.
        let hasher = RandomState::new();
        let mut seen: hashbrown::HashTable<usize> =
            hashbrown::HashTable::with_capacity(elements.len());
        for (opening, timeout) in elements {
            check_timeout(*timeout)?;
            let key = encode(opening)?;
            let hash = hasher.hash_one(&key);
            match seen.find(hash, |&at| keys[at].0 == key) {
                Some(&at) => keys[at].1 = *timeout,
                None => {
                    seen.insert_unique(hash, keys.len(), |&at| hasher.hash_one(&keys[at].0));
                    keys.push((key, *timeout));
                }
            }
        }
        drop(seen);
        let writes: Vec<ElementWrite<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, (key, timeout))| ElementWrite {
                change: i,
                key,
                op: ElementOp::AddOrKeep,
                timeout: Some(*timeout),
            })
            .collect();

        let mut attempt = 0;
        let (expected, written) = loop {
            attempt += 1;
            let exists = self.table_exists(&table)?;
            let mut txn = self.new_txn();
            txn.timeouts_from = asked;
            if exists {
                let mut seq = TxnSequencer {
                    next_seq: &mut self.seq,
                    metas: &mut txn.metas,
                };
                let s = seq.next(Op::DeleteTable);
                let m =
                    txn.b
                        .begin_nft(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, s, NFPROTO_INET);
                txn.b.put_str(NFTA_TABLE_NAME, &table);
                txn.b.end_msg(m);
            }
            let flags = self.table_flags();
            let expected = {
                let mut seq = TxnSequencer {
                    next_seq: &mut self.seq,
                    metas: &mut txn.metas,
                };
                write_table(layout, &mut txn.b, &mut seq, flags)?
            };
            let written = self.write_elements(&mut txn, &table, &writes);
            let outcome = self.run(txn)?;
            if outcome.ok() {
                break (expected, written);
            }
            let refused = |op: Op, errno: i32| {
                outcome
                    .acks
                    .iter()
                    .zip(&outcome.ops)
                    .any(|(a, o)| *o == op && a.errno == errno)
            };
            if exists && refused(Op::DeleteTable, libc::EPERM) {
                return Err(Error::TableOwned { table });
            }
            if flags != 0 && refused(Op::CreateTable, libc::EOPNOTSUPP) && attempt < 3 {
                // A kernel before 6.9 knows no `persist`: an ordinary table, repaired by the
                // batcher after a flush, is the best it offers.
                tracing::warn!(
                    table,
                    "the kernel refuses owned persistent tables; this table can be flushed by others"
                );
                self.ownership = Ownership::Shared;
                continue;
            }
            // Someone deleted the table between our check and our transaction: once more.
            let delete_raced = outcome
                .acks
                .first()
                .is_some_and(|a| a.errno == libc::ENOENT)
                && exists;
            if delete_raced && attempt < 2 {
                continue;
            }
            return Err(first_error(&outcome, &table));
        };
        // Elements that did not fit the table's transaction.
        let mut rest = &writes[written..];
        while !rest.is_empty() {
            let mut txn = self.new_txn();
            txn.timeouts_from = asked;
            let n = self.write_elements(&mut txn, &table, rest);
            let outcome = self.run(txn)?;
            if !outcome.ok() {
                return Err(first_error(&outcome, &table));
            }
            rest = &rest[n.max(1)..];
        }
        self.verify(layout, &expected)?;
        if self.renew_method.is_none() {
            self.renew_method = Some(self.probe_renew(&table)?);
        }
        Ok(())
    }

    /// Brings our table to `desired`: recreates it if it is missing or damaged (with the
    /// desired elements), otherwise adds what is missing, removes what is not desired, and
    /// refreshes elements whose remaining time is far from the desired one. From
    /// [`Netfilter::REPLACE_AT`] desired elements on, the sets are not listed: their contents
    /// are replaced by the desired elements in one transaction, with the same outcome.
    ///
    /// `desired` is taken by value (a slice is copied): its openings become the list of what
    /// to add, so that a million of them at a start are not held twice.
    pub fn reconcile(
        &mut self,
        layout: &Layout,
        desired: impl Into<Vec<(Element, Duration)>>,
    ) -> Result<ReconcileReport, Error> {
        self.reconcile_with(layout, desired.into(), true)
    }

    /// [`Netfilter::reconcile`] that always lists the sets, however many elements are
    /// desired, and reports each element that differed (a replacement cannot). The kernel
    /// lists a set in time quadratic in its size: [`Netfilter::repair`] lists small tables
    /// only.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), fwnp_netfilter::Error> {
    /// let mut nf = fwnp_netfilter::Netfilter::open()?;
    /// let layout = fwnp_netfilter::Layout::Gateway(fwnp_netfilter::GatewayLayout::default());
    /// let report = nf.reconcile_listing(&layout, &[])?;
    /// assert!(!report.replaced);
    /// # Ok(())
    /// # }
    /// ```
    pub fn reconcile_listing(
        &mut self,
        layout: &Layout,
        desired: impl Into<Vec<(Element, Duration)>>,
    ) -> Result<ReconcileReport, Error> {
        self.reconcile_with(layout, desired.into(), false)
    }

    fn reconcile_with(
        &mut self,
        layout: &Layout,
        desired: Vec<(Element, Duration)>,
        may_replace: bool,
    ) -> Result<ReconcileReport, Error> {
        let asked = Instant::now();
        // A table left by an earlier run is orphaned: it is claimed before anything else, so
        // that from now on nobody else can change it.
        if !self.table_present(layout)? || !self.claim(layout.table())? {
            return self.recreate(layout, desired);
        }
        let (desired, mut failed) = if may_replace && desired.len() >= Self::REPLACE_AT {
            // The plan owns the openings now; a replacement the kernel refuses gives them back
            // (those it could hold) for the listing below, with those it could not.
            match self.replace_elements(layout, plan(&[], desired), asked, LISTING)? {
                Ok(report) => return Ok(report),
                Err(refused) => (refused.add, refused.invalid),
            }
        } else {
            (desired, Vec::new())
        };
        let current = self.elements(layout)?;
        let plan = plan(&current, desired);
        failed.extend(plan.invalid);
        let mut changes =
            Vec::with_capacity(plan.add.len() + plan.remove.len() + plan.refresh.len());
        changes.extend(plan.remove.into_iter().map(Change::Remove));
        changes.extend(plan.add.into_iter().map(|(o, t)| Change::Add(o, t)));
        changes.extend(plan.refresh.into_iter().map(|(o, t)| Change::Renew(o, t)));
        let results = self.commit(layout, &changes)?;
        let mut report = ReconcileReport {
            failed,
            ..ReconcileReport::default()
        };
        for (change, result) in changes.into_iter().zip(results) {
            match (change, result) {
                (Change::Remove(o), Ok(())) => report.removed.push(o),
                // It expired on its own meanwhile: the outcome is what was wanted.
                (Change::Remove(o), Err(Error::ElementMissing(_))) => report.removed.push(o),
                (Change::Add(o, _), Ok(())) => {
                    report.added_count += 1;
                    report.added.push(o);
                }
                (Change::Renew(..), Ok(())) => report.refreshed += 1,
                (change, Err(e)) => report.failed.push((change.element().clone(), e)),
            }
        }
        Ok(report)
    }

    /// Recreates our table from the layout with the desired elements.
    ///
    /// From [`Netfilter::REPLACE_AT`] desired elements on, the table is created empty and its
    /// sets are then filled as a replacement fills them: in one transaction whose keys are
    /// encoded a few thousand at a time, where [`Netfilter::apply`] holds every key at once (two
    /// buffers an element). The report then counts the elements added without listing them
    /// (as `replaced`). A table someone deleted under a million elements (a shared table, which
    /// `nft flush ruleset` deletes) was recreated with 366 MB more at its peak, now 111 MB, in
    /// about the same time (2.3-2.7 s, now 2.8 s), and the allocator keeps what a peak took.
    fn recreate(
        &mut self,
        layout: &Layout,
        desired: Vec<(Element, Duration)>,
    ) -> Result<ReconcileReport, Error> {
        let asked = Instant::now();
        let mut plan = plan(&[], desired);
        if plan.add.len() >= Self::REPLACE_AT {
            self.apply(layout, &[])?;
            match self.replace_elements(
                layout,
                plan,
                asked,
                "writing them with the table's apply instead",
            )? {
                Ok(report) => {
                    return Ok(ReconcileReport {
                        table_recreated: true,
                        ..report
                    });
                }
                Err(refused) => plan = refused,
            }
        }
        self.apply(layout, &plan.add)?;
        Ok(ReconcileReport {
            added_count: plan.add.len(),
            added: plan.add.into_iter().map(|(o, _)| o).collect(),
            table_recreated: true,
            failed: plan.invalid,
            ..ReconcileReport::default()
        })
    }

    /// Repairs our table after someone else changed it, as the [`crate::Batcher`] does: the
    /// outcome of [`Netfilter::reconcile`], in time linear in the number of elements.
    ///
    /// Below [`Netfilter::REPLACE_AT`] desired elements this is
    /// [`Netfilter::reconcile_listing`], whose report says exactly what differed. From there
    /// on the sets are not listed (the kernel lists a set in time quadratic in its size):
    /// each desired element is looked up instead, which tells how many were missing
    /// (`added_count`) and how many had a remaining time far from the desired one
    /// (`refreshed`), and then
    /// - a shared table's sets are replaced whole by the desired elements in one transaction
    ///   (`replaced`), which also removes whatever else anyone put there, uncounted: only a
    ///   listing could name it. If the kernel refuses that transaction, the missing elements
    ///   are added and the others refreshed, each with its own error, and the replacement is
    ///   tried once more without the elements refused there (one such element aborts a whole
    ///   replacement); refused again, `undesired_may_remain` says that elements nobody
    ///   desires may have stayed;
    /// - an owned table's elements can only have been changed through this handle, and get
    ///   the missing and refreshed elements alone.
    ///
    /// What is written is given the time left when it is written: the lookups take seconds
    /// for a million elements, and no opening may outlive what is desired by that long.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), fwnp_netfilter::Error> {
    /// use std::time::Duration;
    /// use fwnp_netfilter::{Element, GatewayLayout, Layout, Netfilter, PortRange, Protocol};
    ///
    /// let mut nf = Netfilter::open()?;
    /// let layout = Layout::Gateway(GatewayLayout::default());
    /// let desired: Vec<(Element, Duration)> = (0..50_000u32)
    ///     .map(|i| {
    ///         let opening = Element {
    ///             host: std::net::Ipv4Addr::from(0x0a00_0000 + i / 1000).into(),
    ///             protocol: Protocol::Tcp,
    ///             ports: PortRange::single(1000 + (i % 1000) as u16),
    ///             remote: None,
    ///         };
    ///         (opening, Duration::from_secs(600))
    ///     })
    ///     .collect();
    /// let report = nf.repair(&layout, desired)?;
    /// println!("{} put back, {} refreshed", report.added_count, report.refreshed);
    /// # Ok(())
    /// # }
    /// ```
    pub fn repair(
        &mut self,
        layout: &Layout,
        desired: impl Into<Vec<(Element, Duration)>>,
    ) -> Result<ReconcileReport, Error> {
        let desired = desired.into();
        if desired.len() < Self::REPLACE_AT {
            return self.reconcile_with(layout, desired, false);
        }
        if !self.table_present(layout)? || !self.claim(layout.table())? {
            return self.recreate(layout, desired);
        }
        let table = layout.table().to_string();
        let mut since = Instant::now();
        let plan = plan(&[], desired);
        let mut failed = plan.invalid;
        let mut desired = plan.add;
        // What the kernel cannot hold is set aside first (as a replacement would), so that the
        // replacement keeps every opening it is given, in order, beside what each lacks.
        desired.retain(|(opening, timeout)| {
            match check_timeout(*timeout).and_then(|()| encode(opening)) {
                Ok(_) => true,
                Err(e) => {
                    failed.push((opening.clone(), e));
                    false
                }
            }
        });
        // What each desired opening lacks in the kernel; keys are encoded a chunk at a time,
        // as a million of them at once would cost a few hundred megabytes.
        const CHUNK: usize = 4096;
        let mut lacks = Vec::with_capacity(desired.len());
        for chunk in desired.chunks(CHUNK) {
            let keys = chunk
                .iter()
                .map(|(opening, _)| encode(opening))
                .collect::<Result<Vec<ElementKey>, Error>>()?;
            let found = self.look_up(&table, &keys)?;
            lacks.extend(
                found
                    .into_iter()
                    .zip(chunk)
                    .map(|(remaining, (_, lifetime))| match remaining {
                        None => Lack::Element,
                        Some(remaining) if needs_refresh(remaining, *lifetime) => Lack::Time,
                        Some(_) => Lack::Nothing,
                    }),
            );
        }
        let count = |lacks: &[Lack], lack: Lack| lacks.iter().filter(|l| **l == lack).count();
        let mut undesired_may_remain = false;
        if self.ownership == Ownership::Shared {
            age(&mut desired, &mut lacks, &mut since);
            let (restored, refreshed) = (count(&lacks, Lack::Element), count(&lacks, Lack::Time));
            match self.replace(layout, desired, failed)? {
                Ok(report) => {
                    return Ok(ReconcileReport {
                        added_count: restored,
                        refreshed,
                        ..report
                    });
                }
                Err(refused) => {
                    (desired, failed) = refused;
                    undesired_may_remain = true;
                }
            }
            if desired.len() != lacks.len() {
                return Err(Error::UnexpectedReply(
                    "the refused replacement gave back other openings".into(),
                ));
            }
        }
        age(&mut desired, &mut lacks, &mut since);
        let changes: Vec<Change> = desired
            .iter()
            .zip(&lacks)
            .filter_map(|((opening, timeout), lack)| match lack {
                Lack::Element => Some(Change::Add(opening.clone(), *timeout)),
                Lack::Time => Some(Change::Renew(opening.clone(), *timeout)),
                Lack::Nothing => None,
            })
            .collect();
        drop(lacks);
        let results = self.commit(layout, &changes)?;
        let mut report = ReconcileReport {
            failed,
            undesired_may_remain,
            ..ReconcileReport::default()
        };
        let mut refused = HashSet::new();
        for (change, result) in changes.into_iter().zip(results) {
            match (change, result) {
                (Change::Add(o, _), Ok(())) => {
                    report.added_count += 1;
                    report.added.push(o);
                }
                (Change::Renew(..), Ok(())) => report.refreshed += 1,
                // Not sent: nothing is removed without a listing that names it.
                (Change::Remove(o), Ok(())) => report.removed.push(o),
                (change, Err(e)) => {
                    refused.insert(change.element().clone());
                    report.failed.push((change.element().clone(), e));
                }
            }
        }
        if undesired_may_remain && !refused.is_empty() {
            // One element the kernel refuses aborts a whole replacement, and the changes above
            // named each one: without them, the replacement is tried once more. Refused again
            // (for the kernel's memory, say), what nobody desires may remain.
            desired.retain(|(opening, _)| !refused.contains(opening));
            let mut lacks = vec![Lack::Nothing; desired.len()];
            age(&mut desired, &mut lacks, &mut since);
            if self.replace(layout, desired, Vec::new())?.is_ok() {
                report.replaced = true;
                report.undesired_may_remain = false;
            }
        }
        Ok(report)
    }

    /// [`Netfilter::replace_elements`] of `desired`: the report, or the openings given back
    /// by a refused replacement with those set aside as ones the kernel cannot hold (added to
    /// `failed`).
    fn replace(
        &mut self,
        layout: &Layout,
        desired: Vec<(Element, Duration)>,
        failed: Vec<(Element, Error)>,
    ) -> Result<Result<ReconcileReport, Refused>, Error> {
        let asked = Instant::now();
        let plan = Plan {
            add: desired,
            invalid: failed,
            ..Plan::default()
        };
        Ok(self
            .replace_elements(layout, plan, asked, LISTING)?
            .map_err(|refused| (refused.add, refused.invalid)))
    }

    /// From how many desired elements [`Netfilter::reconcile`] replaces the contents of our
    /// sets in one transaction instead of listing them and changing the difference, and
    /// [`Netfilter::repair`] looks them up one by one instead of listing the sets.
    ///
    /// Listing a set is quadratic in the kernel: a dump answers at most 32 KiB per message
    /// (netlink caps the buffer of every dump message there, whatever the receive buffer),
    /// and for each next message nf_tables walks the set's hash table from its start again,
    /// skipping what it already sent. A million elements take about 3,000 messages and tens
    /// of seconds; the same million written in one batch take a few seconds. Below this
    /// count listing costs little, changes only what differs and reports it precisely.
    ///
    /// ```
    /// assert!(fwnp_netfilter::Netfilter::REPLACE_AT > 1_000);
    /// ```
    pub const REPLACE_AT: usize = 20_000;

    /// Replaces the elements of our sets by `plan.add` in one transaction: each set is
    /// flushed and refilled in the same batch, which the kernel commits whole or not at all,
    /// so no packet ever meets a set without a live opening or with an ended one. The batch
    /// is as large as the elements need (tens of megabytes for a million); the socket's send
    /// buffer is raised for it and put back afterwards.
    ///
    /// `Ok(Err(plan))` when the kernel did not take the batch (too large for its memory, or
    /// an element it refuses, which aborts the whole batch): nothing changed, and the caller
    /// writes the elements another way (what it does is `fallback`, for the log), which gives
    /// each refused element its own error; the plan gives back the openings to add and those
    /// that cannot be held. `plan.add`'s timeouts count from `asked`.
    fn replace_elements(
        &mut self,
        layout: &Layout,
        plan: Plan,
        asked: Instant,
        fallback: &str,
    ) -> Result<Result<ReconcileReport, Plan>, Error> {
        let table = layout.table().to_string();
        let mut failed = plan.invalid;
        // The keys are encoded twice, once here to keep the openings that have one and once
        // as they are written, a few thousand at a time: a million keys held at once with
        // their writes cost about 200 bytes an opening beside the batch itself, and the
        // allocator keeps what a start used at its peak.
        let mut add = plan.add;
        let mut sets = Vec::with_capacity(add.len());
        let mut element_bytes = 0;
        add.retain(|(opening, timeout)| {
            match check_timeout(*timeout).and_then(|()| encode(opening)) {
                Ok(key) => {
                    sets.push(key.set);
                    element_bytes += added_element_bytes(&key);
                    true
                }
                Err(e) => {
                    failed.push((opening.clone(), e));
                    false
                }
            }
        });
        const CHUNK: usize = 4096;
        let mut txn = self.new_txn();
        txn.timeouts_from = asked;
        for set in ALL_SETS {
            // DELSETELEM without a list of elements flushes the set.
            let seq = bump(&mut self.seq);
            let m = txn.b.begin_nft(
                NFT_MSG_DELSETELEM,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                NFPROTO_INET,
            );
            txn.b.put_str(NFTA_SET_ELEM_LIST_TABLE, &table);
            txn.b.put_str(NFTA_SET_ELEM_LIST_SET, set.name());
            txn.b.end_msg(m);
            txn.metas.push(MsgMeta {
                seq,
                op: Op::RemoveElement,
                changes: Vec::new(),
                element_offsets: Vec::new(),
                set_attr_offset: None,
            });
        }
        // The batch's buffer is allocated once: grown by doubling, a batch of a million
        // elements (about 50 MB) held its old buffer and the new one at once as it grew,
        // and the allocator keeps what a start used at its peak. A message holds up to
        // MAX_ELEMENTS_NEST bytes of elements, with its headers beside them, and each chunk
        // written below begins a message of its own.
        let messages = element_bytes / (MAX_ELEMENTS_NEST - MAX_ELEMENT_BYTES)
            + add.len() / CHUNK
            + 2 * ALL_SETS.len();
        txn.b
            .reserve(element_bytes + messages * element_message_bytes(&table) + 4096);
        // One transaction, however large: lift the per-transaction budget while writing.
        let budget = std::mem::replace(&mut self.max_batch_bytes, usize::MAX / 2);
        let mut all_written = true;
        let mut keys: Vec<(usize, ElementKey, Duration)> = Vec::with_capacity(CHUNK);
        'sets: for set in ALL_SETS {
            let mut members = add
                .iter()
                .zip(&sets)
                .enumerate()
                .filter(|(_, (_, of))| **of == set)
                .map(|(i, ((opening, timeout), _))| (i, opening, *timeout));
            loop {
                keys.clear();
                keys.extend(
                    members
                        .by_ref()
                        .take(CHUNK)
                        .filter_map(|(i, opening, timeout)| {
                            encode(opening).ok().map(|key| (i, key, timeout))
                        }),
                );
                if keys.is_empty() {
                    break;
                }
                let writes: Vec<ElementWrite<'_>> = keys
                    .iter()
                    .map(|(i, key, timeout)| ElementWrite {
                        change: *i,
                        key,
                        op: ElementOp::AddExclusive,
                        timeout: Some(*timeout),
                    })
                    .collect();
                if self.write_elements(&mut txn, &table, &writes) != writes.len() {
                    all_written = false;
                    break 'sets;
                }
            }
        }
        self.max_batch_bytes = budget;
        drop(keys);
        drop(sets);
        if !all_written {
            return Err(Error::UnexpectedReply(
                "the elements did not fit one replacement batch".into(),
            ));
        }
        // The batch end still follows; netlink refuses a datagram larger than the send
        // buffer less 32 bytes.
        let needed = txn.b.len() + 4096;
        let granted = self
            .socket
            .set_buffers(needed.max(SEND_BUFFER), RECV_BUFFER)
            .map_err(Error::Io)?;
        let outcome = if granted >= needed {
            Some(self.run(txn))
        } else {
            None
        };
        self.socket
            .set_buffers(SEND_BUFFER, RECV_BUFFER)
            .map_err(Error::Io)?;
        let outcome = match outcome {
            None => {
                tracing::warn!(
                    table,
                    needed,
                    granted,
                    "the send buffer cannot hold the replacement batch; {fallback}"
                );
                return Ok(Err(Plan {
                    add,
                    invalid: failed,
                    ..Plan::default()
                }));
            }
            // Too large for the kernel's memory: nothing was committed.
            Some(Err(Error::MessageTooLong)) => {
                tracing::warn!(
                    table,
                    needed,
                    "the replacement batch is too large; {fallback}"
                );
                return Ok(Err(Plan {
                    add,
                    invalid: failed,
                    ..Plan::default()
                }));
            }
            Some(Err(Error::Io(e)))
                if matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS)) =>
            {
                tracing::warn!(
                    table,
                    needed,
                    "no kernel memory for the replacement batch ({e}); {fallback}"
                );
                return Ok(Err(Plan {
                    add,
                    invalid: failed,
                    ..Plan::default()
                }));
            }
            Some(result) => result?,
        };
        if !outcome.ok() {
            let error = first_error(&outcome, &table);
            if matches!(
                error,
                Error::TableMissing { .. } | Error::TableOwned { .. } | Error::PermissionDenied
            ) {
                return Err(error);
            }
            tracing::warn!(
                table,
                %error,
                "the kernel refused the replacement batch; {fallback}"
            );
            return Ok(Err(Plan {
                add,
                invalid: failed,
                ..Plan::default()
            }));
        }
        Ok(Ok(ReconcileReport {
            added_count: add.len(),
            added: Vec::new(),
            removed: Vec::new(),
            refreshed: 0,
            table_recreated: false,
            replaced: true,
            failed,
            undesired_may_remain: false,
        }))
    }

    /// Finds out how renewals refresh an expiry on this kernel, with a probe element in our own
    /// table (host 0.0.0.0, which is never a destination) that is removed afterwards.
    fn probe_renew(&mut self, table: &str) -> Result<RenewMethod, Error> {
        let probe = Element {
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            protocol: Protocol::Tcp,
            ports: PortRange::single(0),
            remote: None,
        };
        let key = encode(&probe)?;
        let long = Duration::from_secs(600);
        // Created with 600 s of timeout but only 1 s left...
        let mut txn = self.new_txn();
        self.write_probe(&mut txn, table, &key, long, Duration::from_secs(1));
        let outcome = self.run(txn)?;
        if !outcome.ok() {
            let error = first_error(&outcome, table);
            if matches!(error, Error::TableMissing { .. } | Error::PermissionDenied) {
                return Err(error);
            }
            return Ok(RenewMethod::DeleteAdd);
        }
        // ...then renewed with the expiration attribute.
        let mut txn = self.new_txn();
        self.write_probe(&mut txn, table, &key, long, long);
        let renewed = self.run(txn)?.ok();
        let remaining = self
            .get_element(table, &key)?
            .and_then(|found| found.remaining);
        let mut txn = self.new_txn();
        let writes = [ElementWrite {
            change: 0,
            key: &key,
            op: ElementOp::Remove,
            timeout: None,
        }];
        self.write_elements(&mut txn, table, &writes);
        let _ = self.run(txn)?;
        let refreshed = renewed && remaining.is_some_and(|r| r > Duration::from_secs(60));
        Ok(if refreshed {
            RenewMethod::Expiration
        } else {
            RenewMethod::DeleteAdd
        })
    }

    fn write_probe(
        &mut self,
        txn: &mut Txn,
        table: &str,
        key: &ElementKey,
        timeout: Duration,
        expiration: Duration,
    ) {
        let seq = bump(&mut self.seq);
        txn.metas.push(MsgMeta {
            seq,
            op: Op::RenewElement,
            changes: vec![0],
            element_offsets: Vec::new(),
            set_attr_offset: None,
        });
        let msg = txn.b.begin_nft(
            NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
        );
        txn.b.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        txn.b.put_str(NFTA_SET_ELEM_LIST_SET, key.set.name());
        let nest = txn.b.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        let elem = txn.b.nest_start(NFTA_LIST_ELEM);
        txn.b.put_data_value(NFTA_SET_ELEM_KEY, &key.key);
        txn.b.put_u64(NFTA_SET_ELEM_TIMEOUT, millis(timeout));
        txn.b.put_u64(NFTA_SET_ELEM_EXPIRATION, millis(expiration));
        txn.b.nest_end(elem);
        txn.b.nest_end(nest);
        txn.b.end_msg(msg);
    }

    /// Ends the live connections that match an opening (conntrack entries whose original
    /// direction goes to the opening's host, protocol and ports, from its remote prefix);
    /// returns how many were ended. Use after removing the opening, so they cannot come back.
    pub fn kill_connections(&mut self, opening: &Element) -> Result<usize, Error> {
        let opening = opening.canonical()?;
        crate::conntrack::kill(self, &opening)
    }

    pub(crate) fn socket_and_buf(&mut self) -> (&NetlinkSocket, &mut Vec<u8>, &mut u32) {
        (&self.socket, &mut self.recv_buf, &mut self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> Element {
        Element {
            host: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
            remote: None,
        }
    }

    #[test]
    fn ageing_takes_the_time_off_and_drops_what_ran_out_with_its_lack() {
        let mut desired = vec![
            (tcp(1), Duration::from_millis(50)),
            (tcp(2), Duration::from_secs(60)),
            (tcp(3), Duration::from_millis(10)),
            (tcp(4), Duration::from_secs(30)),
        ];
        let mut lacks = vec![Lack::Element, Lack::Time, Lack::Element, Lack::Nothing];
        let mut since = Instant::now() - Duration::from_secs(1);
        age(&mut desired, &mut lacks, &mut since);
        assert_eq!(
            desired.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>(),
            vec![tcp(2), tcp(4)]
        );
        assert_eq!(lacks, vec![Lack::Time, Lack::Nothing]);
        assert!(desired[0].1 <= Duration::from_secs(59));
        assert!(desired[1].1 <= Duration::from_secs(29));
        assert!(since.elapsed() < Duration::from_secs(1));
    }
}
