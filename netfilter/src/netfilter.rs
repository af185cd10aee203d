//! The synchronous handle: transactions, acknowledgements, dumps, verification.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use fwnp_proto::message::{PortRange, Protocol};

use crate::error::{TABLE_ATTR_OFFSET, from_ack};
use crate::key::{ALL_SETS, ElementKey, SetId, decode, encode};
use crate::layout::{
    ChainProps, Expected, Layout, NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST, Op, Sequencer,
    write_table,
};
use crate::nl::*;
use crate::reconcile::plan;
use crate::sys::NetlinkSocket;
use crate::{Change, Element, Error, ReconcileReport};

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

/// Metadata of one message of a transaction, to map its acknowledgement back.
#[derive(Debug, Clone)]
struct MsgMeta {
    seq: u32,
    op: Op,
    /// The caller's changes this message carries (indices), in element order.
    changes: Vec<usize>,
    /// Offset of each element's attribute within the message, parallel to `changes`.
    element_offsets: Vec<u32>,
    /// Offset of the set-name attribute within the message (element messages).
    set_attr_offset: Option<u32>,
}

/// A transaction being built.
#[derive(Debug)]
struct Txn {
    b: Builder,
    begin_seq: u32,
    metas: Vec<MsgMeta>,
}

struct TxnSequencer<'a> {
    next_seq: &'a mut u32,
    metas: &'a mut Vec<MsgMeta>,
}

impl Sequencer for TxnSequencer<'_> {
    fn next(&mut self, op: Op) -> u32 {
        let seq = bump(self.next_seq);
        self.metas.push(MsgMeta {
            seq,
            op,
            changes: Vec::new(),
            element_offsets: Vec::new(),
            set_attr_offset: None,
        });
        seq
    }
}

fn bump(seq: &mut u32) -> u32 {
    *seq = seq.wrapping_add(1).max(1);
    *seq
}

/// The outcome of one transaction.
#[derive(Debug)]
struct TxnOutcome {
    /// One acknowledgement per message, in message order.
    acks: Vec<Ack>,
    /// What each message did, parallel to `acks`.
    ops: Vec<Op>,
    /// An error the kernel reported against the whole batch (commit failure, no memory).
    batch_error: Option<Ack>,
}

impl TxnOutcome {
    fn ok(&self) -> bool {
        self.batch_error.is_none() && self.acks.iter().all(|a| a.errno == 0)
    }
}

/// What one element message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ElementOp {
    /// NEWSETELEM with NLM_F_EXCL: an existing element is an error.
    AddExclusive,
    /// NEWSETELEM without EXCL: creates or leaves in place.
    AddOrKeep,
    /// NEWSETELEM without EXCL, with the expiration: creates or refreshes.
    Refresh,
    /// DELSETELEM.
    Remove,
}

impl ElementOp {
    fn op(self) -> Op {
        match self {
            ElementOp::AddExclusive | ElementOp::AddOrKeep => Op::AddElement,
            ElementOp::Refresh => Op::RenewElement,
            ElementOp::Remove => Op::RemoveElement,
        }
    }
}

/// One element to write.
#[derive(Debug, Clone, Copy)]
struct ElementWrite<'a> {
    change: usize,
    key: &'a ElementKey,
    op: ElementOp,
    timeout: Option<Duration>,
}

fn millis(d: Duration) -> u64 {
    // Round up: a lease of 1.5 ms must not become 1 ms, nor 0 (which means "never expires").
    let ms = d
        .as_millis()
        .saturating_add(u128::from(!d.subsec_nanos().is_multiple_of(1_000_000)));
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

fn check_timeout(timeout: Duration) -> Result<(), Error> {
    if timeout.is_zero() {
        return Err(Error::InvalidTimeout(
            "zero (the kernel would keep the element forever)".into(),
        ));
    }
    // The kernel converts to jiffies and refuses what overflows; a century is far inside it.
    if timeout > Duration::from_secs(100 * 365 * 24 * 3600) {
        return Err(Error::InvalidTimeout(format!(
            "{timeout:?} is longer than a century"
        )));
    }
    Ok(())
}

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

    fn new_txn(&mut self) -> Txn {
        let mut b = Builder::new();
        let begin_seq = bump(&mut self.seq);
        b.batch_begin(begin_seq);
        Txn {
            b,
            begin_seq,
            metas: Vec::new(),
        }
    }

    /// Sends a transaction in one datagram and collects one acknowledgement per message.
    fn run(&mut self, mut txn: Txn) -> Result<TxnOutcome, Error> {
        let end_seq = bump(&mut self.seq);
        txn.b.batch_end(end_seq);
        let bytes = txn.b.into_bytes();
        self.socket.send(&bytes).map_err(|e| {
            if e.raw_os_error() == Some(libc::EMSGSIZE) {
                Error::MessageTooLong
            } else {
                Error::Io(e)
            }
        })?;
        let index: HashMap<u32, usize> = txn
            .metas
            .iter()
            .enumerate()
            .map(|(i, m)| (m.seq, i))
            .collect();
        let mut acks: Vec<Option<Ack>> = vec![None; txn.metas.len()];
        let mut missing = txn.metas.len();
        let mut batch_error = None;
        while missing > 0 && batch_error.is_none() {
            let n = match self.socket.recv(&mut self.recv_buf, false) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::UnexpectedReply(format!(
                        "{missing} acknowledgements never arrived"
                    )));
                }
                Err(e) => return Err(Error::Io(e)),
            };
            for msg in messages(&self.recv_buf[..n]) {
                let Some(ack) = parse_ack(&msg) else { continue };
                if ack.seq == txn.begin_seq || ack.seq == end_seq {
                    if ack.errno != 0 {
                        batch_error = Some(ack);
                    }
                } else if let Some(&i) = index.get(&ack.seq) {
                    if acks[i].is_none() {
                        missing -= 1;
                    }
                    acks[i] = Some(ack);
                }
                // Anything else is a stale answer to an earlier request: ignored.
            }
        }
        let acks = acks
            .into_iter()
            .zip(&txn.metas)
            .map(|(ack, meta)| {
                // Only reachable with a batch error, which then stands for every message.
                ack.unwrap_or(Ack {
                    errno: libc::ECANCELED,
                    seq: meta.seq,
                    message: None,
                    bad_attr_offset: None,
                })
            })
            .collect();
        Ok(TxnOutcome {
            acks,
            ops: txn.metas.iter().map(|m| m.op).collect(),
            batch_error,
        })
    }

    /// A dump request; returns the raw datagrams of the answer. An interrupted dump (the
    /// ruleset changed meanwhile) is retried.
    fn dump(
        &mut self,
        msg: u16,
        family: u8,
        attrs: impl Fn(&mut Builder),
    ) -> Result<Result<Vec<Vec<u8>>, Ack>, Error> {
        'attempt: for _ in 0..5 {
            let seq = bump(&mut self.seq);
            let mut b = Builder::new();
            let start = b.begin_nft(msg, NLM_F_REQUEST | NLM_F_DUMP, seq, family);
            attrs(&mut b);
            b.end_msg(start);
            self.socket.send(b.as_bytes())?;
            let mut out = Vec::new();
            let mut interrupted = false;
            loop {
                let n = match self.socket.recv(&mut self.recv_buf, false) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Err(Error::UnexpectedReply("dump did not finish".into()));
                    }
                    Err(e) => return Err(Error::Io(e)),
                };
                let datagram = &self.recv_buf[..n];
                let mut done = false;
                for m in messages(datagram) {
                    if m.seq != seq {
                        continue;
                    }
                    if m.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match m.msg_type {
                        NLMSG_DONE => done = true,
                        NLMSG_ERROR => {
                            if let Some(ack) = parse_ack(&m)
                                && ack.errno != 0
                            {
                                return Ok(Err(ack));
                            }
                            done = true;
                        }
                        _ => {}
                    }
                }
                out.push(datagram.to_vec());
                if done {
                    break;
                }
            }
            if interrupted {
                continue 'attempt;
            }
            return Ok(Ok(out));
        }
        Err(Error::UnexpectedReply(
            "dump interrupted five times in a row".into(),
        ))
    }

    /// Whether a table of ours exists (whatever its contents).
    fn table_exists(&mut self, table: &str) -> Result<bool, Error> {
        let seq = bump(&mut self.seq);
        let mut b = Builder::new();
        let start = b.begin_nft(
            NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
        );
        b.put_str(NFTA_TABLE_NAME, table);
        b.end_msg(start);
        let mut found = false;
        let exists = self.query(&b, seq, Op::CreateTable, table, "a table query", |m| {
            if m.msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                found = true;
            }
        })?;
        Ok(exists && found)
    }

    /// Sends one request (not a dump) and hands every reply of its sequence number to
    /// `on_reply` until the kernel's acknowledgement: `Ok(true)` when it succeeded,
    /// `Ok(false)` when the object asked for does not exist (ENOENT).
    fn query(
        &mut self,
        request: &Builder,
        seq: u32,
        op: Op,
        table: &str,
        what: &str,
        mut on_reply: impl FnMut(&Message<'_>),
    ) -> Result<bool, Error> {
        self.socket.send(request.as_bytes())?;
        for _ in 0..16 {
            let n = self.socket.recv(&mut self.recv_buf, false)?;
            for m in messages(&self.recv_buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                if let Some(ack) = parse_ack(&m) {
                    return match ack.errno {
                        0 => Ok(true),
                        libc::ENOENT => Ok(false),
                        _ => Err(from_ack(op, &ack, table, None, None)),
                    };
                }
                on_reply(&m);
            }
        }
        Err(Error::UnexpectedReply(format!("no answer to {what}")))
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
        crate::layout::validate(layout)?;
        let table = layout.table().to_string();
        let mut keys = Vec::with_capacity(elements.len());
        let mut seen: HashMap<ElementKey, usize> = HashMap::with_capacity(elements.len());
        for (opening, timeout) in elements {
            check_timeout(*timeout)?;
            let key = encode(opening)?;
            match seen.get(&key) {
                Some(&i) => keys[i] = (key, *timeout),
                None => {
                    seen.insert(key.clone(), keys.len());
                    keys.push((key, *timeout));
                }
            }
        }
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

    /// Writes element messages into a transaction until it is full; returns how many of
    /// `writes` it took. Consecutive elements of the same set and operation share a message.
    fn write_elements(&mut self, txn: &mut Txn, table: &str, writes: &[ElementWrite<'_>]) -> usize {
        self.write_elements_opt(txn, table, writes, false)
    }

    /// `one_per_change`: every change gets its own message, so that its acknowledgement is its
    /// own. A change's writes (a delete-and-add renewal) are never cut across transactions.
    fn write_elements_opt(
        &mut self,
        txn: &mut Txn,
        table: &str,
        writes: &[ElementWrite<'_>],
        one_per_change: bool,
    ) -> usize {
        let set_attr_offset = TABLE_ATTR_OFFSET + 4 + ((table.len() as u32 + 1 + 3) & !3);
        let budget = self.max_batch_bytes.saturating_sub(64);
        let mut open: Option<(usize, usize, SetId, ElementOp)> = None; // msg start, nest start
        let mut taken = 0;
        let mut previous: Option<usize> = None;
        for w in writes {
            let needed = MAX_ELEMENT_BYTES + 128 + table.len();
            let same_change = previous == Some(w.change);
            if txn.b.len() + needed > budget && !txn.metas.is_empty() && !same_change {
                break;
            }
            let fits_open = match open {
                Some((_, nest, set, op)) => {
                    set == w.key.set
                        && op == w.op
                        && (!one_per_change || same_change)
                        && txn.b.len() - nest + MAX_ELEMENT_BYTES <= MAX_ELEMENTS_NEST
                }
                None => false,
            };
            previous = Some(w.change);
            if !fits_open {
                if let Some((msg, nest, _, _)) = open.take() {
                    txn.b.nest_end(nest);
                    txn.b.end_msg(msg);
                }
                let seq = bump(&mut self.seq);
                let (msg_type, flags) = match w.op {
                    ElementOp::AddExclusive => (
                        NFT_MSG_NEWSETELEM,
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                    ),
                    ElementOp::AddOrKeep | ElementOp::Refresh => {
                        (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
                    }
                    ElementOp::Remove => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
                };
                let msg = txn.b.begin_nft(msg_type, flags, seq, NFPROTO_INET);
                txn.b.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
                txn.b.put_str(NFTA_SET_ELEM_LIST_SET, w.key.set.name());
                let nest = txn.b.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
                txn.metas.push(MsgMeta {
                    seq,
                    op: w.op.op(),
                    changes: Vec::new(),
                    element_offsets: Vec::new(),
                    set_attr_offset: Some(set_attr_offset),
                });
                open = Some((msg, nest, w.key.set, w.op));
            }
            let Some((msg, _, _, _)) = open else { break };
            let offset = (txn.b.len() - msg) as u32;
            let elem = txn.b.nest_start(NFTA_LIST_ELEM);
            txn.b.put_data_value(NFTA_SET_ELEM_KEY, &w.key.key);
            if let Some(end) = &w.key.key_end {
                txn.b.put_data_value(NFTA_SET_ELEM_KEY_END, end);
            }
            if w.op != ElementOp::Remove
                && let Some(timeout) = w.timeout
            {
                txn.b.put_u64(NFTA_SET_ELEM_TIMEOUT, millis(timeout));
                if w.op == ElementOp::Refresh {
                    txn.b.put_u64(NFTA_SET_ELEM_EXPIRATION, millis(timeout));
                }
            }
            txn.b.nest_end(elem);
            if let Some(meta) = txn.metas.last_mut() {
                meta.changes.push(w.change);
                meta.element_offsets.push(offset);
            }
            taken += 1;
        }
        if let Some((msg, nest, _, _)) = open {
            txn.b.nest_end(nest);
            txn.b.end_msg(msg);
        }
        taken
    }

    /// Reads our table back and compares its chains (with rule counts), sets and counters.
    fn verify(&mut self, layout: &Layout, expected: &Expected) -> Result<(), Error> {
        let actual = self.read_structure(layout.table())?;
        let Some(actual) = actual else {
            return Err(Error::VerifyFailed(format!(
                "table inet {} is missing after apply",
                layout.table()
            )));
        };
        compare_structure(expected, &actual).map_err(Error::VerifyFailed)
    }

    /// The structure of our table as the kernel reports it, or `None` if it does not exist.
    fn read_structure(&mut self, table: &str) -> Result<Option<Expected>, Error> {
        if !self.table_exists(table)? {
            return Ok(None);
        }
        let mut chains: Vec<(String, usize)> = Vec::new();
        let mut chain_props = Vec::new();
        let mut rules = Vec::new();
        let mut set_props = Vec::new();
        for datagram in self.dump_ok(NFT_MSG_GETCHAIN, table, NFTA_CHAIN_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs
                    .clone()
                    .find(NFTA_CHAIN_TABLE)
                    .map(c_string)
                    .as_deref()
                    != Some(table)
                {
                    continue;
                }
                if let Some(name) = attrs.clone().find(NFTA_CHAIN_NAME) {
                    let hook = attrs.clone().find(NFTA_CHAIN_HOOK);
                    let props = hook.map(|hook| ChainProps {
                        hooknum: Attrs::new(hook)
                            .find(NFTA_HOOK_HOOKNUM)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                        priority: Attrs::new(hook)
                            .find(NFTA_HOOK_PRIORITY)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                        policy: attrs
                            .clone()
                            .find(NFTA_CHAIN_POLICY)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                    });
                    chains.push((c_string(name), 0));
                    chain_props.push((c_string(name), props));
                }
            }
        }
        for datagram in self.dump_ok(NFT_MSG_GETRULE, table, NFTA_RULE_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs.clone().find(NFTA_RULE_TABLE).map(c_string).as_deref() != Some(table) {
                    continue;
                }
                let chain = attrs
                    .clone()
                    .find(NFTA_RULE_CHAIN)
                    .map(c_string)
                    .unwrap_or_default();
                rules.push((
                    chain.clone(),
                    attrs.find(NFTA_RULE_EXPRESSIONS).unwrap_or(&[]).to_vec(),
                ));
                match chains.iter_mut().find(|(name, _)| *name == chain) {
                    Some(entry) => entry.1 += 1,
                    None => chains.push((chain, 1)),
                }
            }
        }
        let mut sets = Vec::new();
        for datagram in self.dump_ok(NFT_MSG_GETSET, table, NFTA_SET_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSET {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs.clone().find(NFTA_SET_TABLE).map(c_string).as_deref() != Some(table) {
                    continue;
                }
                if let Some(set) = attrs.clone().find(NFTA_SET_NAME).map(c_string) {
                    // Names we do not know cannot be ours: reported as a mismatch below.
                    let name = SetId::from_name(&set)
                        .map(|s| s.name())
                        .unwrap_or("(foreign set)");
                    sets.push(name);
                    let flags = attrs
                        .clone()
                        .find(NFTA_SET_FLAGS)
                        .and_then(be_u32)
                        .unwrap_or(0);
                    let key_len = attrs.find(NFTA_SET_KEY_LEN).and_then(be_u32).unwrap_or(0);
                    set_props.push((name, flags, key_len));
                }
            }
        }
        let counters = self
            .counters_in(table)?
            .into_iter()
            .map(|c| {
                crate::layout::ALL_COUNTER_NAMES
                    .iter()
                    .copied()
                    .find(|n| *n == c.name)
                    .unwrap_or("(foreign counter)")
            })
            .collect();
        Ok(Some(Expected {
            chains,
            sets,
            counters,
            chain_props,
            rules,
            set_props,
        }))
    }

    fn dump_ok(&mut self, msg: u16, table: &str, table_attr: u16) -> Result<Vec<Vec<u8>>, Error> {
        let owned = table.to_string();
        match self.dump(msg, NFPROTO_INET, |b| b.put_str(table_attr, &owned))? {
            Ok(datagrams) => Ok(datagrams),
            Err(ack) if ack.errno == libc::ENOENT => Err(Error::TableMissing { table: owned }),
            Err(ack) => Err(from_ack(Op::CreateTable, &ack, table, None, None)),
        }
    }

    fn counters_in(&mut self, table: &str) -> Result<Vec<Counter>, Error> {
        let owned = table.to_string();
        let datagrams = match self.dump(NFT_MSG_GETOBJ, NFPROTO_INET, |b| {
            b.put_str(NFTA_OBJ_TABLE, &owned);
            b.put_u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
        })? {
            Ok(d) => d,
            Err(ack) if ack.errno == libc::ENOENT => {
                return Err(Error::TableMissing { table: owned });
            }
            Err(ack) => return Err(from_ack(Op::CreateCounter, &ack, table, None, None)),
        };
        let mut out = Vec::new();
        for datagram in datagrams {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs.clone().find(NFTA_OBJ_TABLE).map(c_string).as_deref() != Some(table) {
                    continue;
                }
                if attrs.clone().find(NFTA_OBJ_TYPE).and_then(be_u32) != Some(NFT_OBJECT_COUNTER) {
                    continue;
                }
                let Some(name) = attrs.clone().find(NFTA_OBJ_NAME).map(c_string) else {
                    continue;
                };
                let data = attrs.find(NFTA_OBJ_DATA).unwrap_or(&[]);
                let packets = Attrs::new(data)
                    .find(NFTA_COUNTER_PACKETS)
                    .and_then(be_u64)
                    .unwrap_or(0);
                let bytes = Attrs::new(data)
                    .find(NFTA_COUNTER_BYTES)
                    .and_then(be_u64)
                    .unwrap_or(0);
                out.push(Counter {
                    name,
                    packets,
                    bytes,
                });
            }
        }
        Ok(out)
    }

    /// The named counters of our table (verdict counts: see [`Layout::counter_names`]).
    pub fn counters(&mut self, layout: &Layout) -> Result<Vec<Counter>, Error> {
        self.counters_in(layout.table())
    }

    /// Whether our table exists and has the layout's structure (chains with their rule
    /// counts, sets, counters). Elements are not compared: see [`Netfilter::reconcile`].
    pub fn table_present(&mut self, layout: &Layout) -> Result<bool, Error> {
        let expected = expected_structure(layout)?;
        match self.read_structure(layout.table()) {
            Ok(Some(actual)) => Ok(compare_structure(&expected, &actual).is_ok()),
            Ok(None) | Err(Error::TableMissing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes our table if it exists (and does nothing otherwise).
    pub fn delete_table(&mut self, layout: &Layout) -> Result<(), Error> {
        let table = layout.table().to_string();
        if !self.table_exists(&table)? {
            return Ok(());
        }
        let mut txn = self.new_txn();
        let mut seq = TxnSequencer {
            next_seq: &mut self.seq,
            metas: &mut txn.metas,
        };
        let s = seq.next(Op::DeleteTable);
        let m = txn
            .b
            .begin_nft(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, s, NFPROTO_INET);
        txn.b.put_str(NFTA_TABLE_NAME, &table);
        txn.b.end_msg(m);
        let outcome = self.run(txn)?;
        match outcome.acks.first() {
            _ if outcome.ok() => Ok(()),
            Some(ack) if ack.errno == libc::ENOENT => Ok(()),
            _ => Err(first_error(&outcome, &table)),
        }
    }

    /// The elements of our sets with their remaining time, as canonical openings. Elements
    /// that are not openings (put there by someone else) are skipped and logged.
    pub fn elements(&mut self, layout: &Layout) -> Result<Vec<(Element, Duration)>, Error> {
        let table = layout.table().to_string();
        let mut out = Vec::new();
        for set in ALL_SETS {
            out.extend(self.elements_of(&table, set)?);
        }
        Ok(out)
    }

    /// Applies element changes: as few transactions as the kernel's limits allow (usually
    /// one), and one result per change, in order.
    ///
    /// nf_tables transactions are all or nothing: if an element fails, the kernel aborts the
    /// whole transaction. The failed element is identified (the kernel's extended ack points at
    /// it; without one, its message's elements are retried one per message) and gets its own
    /// error, and the others are sent again without it, so one bad element never loses the
    /// others. The outer `Err` is for a failing socket or a kernel answer that makes no sense.
    ///
    /// `Add` fails with [`Error::ElementExists`] if the element exists; `Renew` refreshes the
    /// timeout (and creates the element if it had expired, with [`RenewMethod::Expiration`]);
    /// `Remove` fails with [`Error::ElementMissing`] if it is absent.
    pub fn commit(
        &mut self,
        layout: &Layout,
        changes: &[Change],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let table = layout.table().to_string();
        let mut results: Vec<Option<Result<(), Error>>> = vec![None; changes.len()];
        let mut keys: Vec<Option<ElementKey>> = Vec::with_capacity(changes.len());
        for (i, change) in changes.iter().enumerate() {
            let checked = match change {
                Change::Add(_, t) | Change::Renew(_, t) => check_timeout(*t),
                Change::Remove(_) => Ok(()),
            }
            .and_then(|()| encode(change.element()));
            match checked {
                Ok(key) => keys.push(Some(key)),
                Err(e) => {
                    results[i] = Some(Err(e));
                    keys.push(None);
                }
            }
        }
        if self.renew_method.is_none() && changes.iter().any(|c| matches!(c, Change::Renew(..))) {
            match self.probe_renew(&table) {
                Ok(method) => self.renew_method = Some(method),
                Err(Error::TableMissing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let renew_method = self.renew_method.unwrap_or(RenewMethod::Expiration);
        let mut pending: Vec<usize> = (0..changes.len())
            .filter(|i| results[*i].is_none())
            .collect();
        let mut singles: HashSet<usize> = HashSet::new();
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > MAX_ROUNDS {
                for i in pending.drain(..) {
                    results[i] = Some(Err(Error::UnexpectedReply(
                        "the kernel kept refusing the batch".into(),
                    )));
                }
                break;
            }
            let mut writes = Vec::with_capacity(pending.len());
            for &i in &pending {
                let Some(key) = keys[i].as_ref() else {
                    continue;
                };
                match &changes[i] {
                    Change::Add(_, t) => writes.push(ElementWrite {
                        change: i,
                        key,
                        op: ElementOp::AddExclusive,
                        timeout: Some(*t),
                    }),
                    Change::Renew(_, t) => match renew_method {
                        RenewMethod::Expiration => writes.push(ElementWrite {
                            change: i,
                            key,
                            op: ElementOp::Refresh,
                            timeout: Some(*t),
                        }),
                        RenewMethod::DeleteAdd => {
                            writes.push(ElementWrite {
                                change: i,
                                key,
                                op: ElementOp::Remove,
                                timeout: None,
                            });
                            writes.push(ElementWrite {
                                change: i,
                                key,
                                op: ElementOp::AddExclusive,
                                timeout: Some(*t),
                            });
                        }
                    },
                    Change::Remove(_) => writes.push(ElementWrite {
                        change: i,
                        key,
                        op: ElementOp::Remove,
                        timeout: None,
                    }),
                }
            }
            let mut retry: Vec<usize> = Vec::new();
            let mut pos = 0;
            while pos < writes.len() {
                let mut txn = self.new_txn();
                let written = self.write_elements_split(&mut txn, &table, &writes[pos..], &singles);
                if written == 0 {
                    return Err(Error::UnexpectedReply(
                        "an element does not fit one transaction".into(),
                    ));
                }
                let metas = txn.metas.clone();
                let outcome = self.run(txn)?;
                self.settle(
                    &table,
                    &metas,
                    &outcome,
                    changes,
                    &mut results,
                    &mut singles,
                    &mut retry,
                )?;
                pos += written;
            }
            retry.sort_unstable();
            retry.dedup();
            pending = retry
                .into_iter()
                .filter(|i| results[*i].is_none())
                .collect();
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::UnexpectedReply(
                        "change was never acknowledged".into(),
                    ))
                })
            })
            .collect())
    }

    /// Like `write_elements`, but each change marked as single gets its own message.
    fn write_elements_split(
        &mut self,
        txn: &mut Txn,
        table: &str,
        writes: &[ElementWrite<'_>],
        singles: &HashSet<usize>,
    ) -> usize {
        let mut done = 0;
        while done < writes.len() {
            let single = singles.contains(&writes[done].change);
            let run = writes[done..]
                .iter()
                .take_while(|w| singles.contains(&w.change) == single)
                .count();
            let n = self.write_elements_opt(txn, table, &writes[done..done + run], single);
            done += n;
            if n < run {
                break;
            }
        }
        done
    }

    /// Reads a transaction's outcome into per-change results: changes it landed get `Ok`,
    /// failed elements their own error, and the others are queued for another round.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        table: &str,
        metas: &[MsgMeta],
        outcome: &TxnOutcome,
        changes: &[Change],
        results: &mut [Option<Result<(), Error>>],
        singles: &mut HashSet<usize>,
        retry: &mut Vec<usize>,
    ) -> Result<(), Error> {
        if outcome.ok() {
            for meta in metas {
                for &i in &meta.changes {
                    if results[i].is_none() {
                        results[i] = Some(Ok(()));
                    }
                }
            }
            // A change in two messages (delete + add renewal) is ok only if both were.
            return Ok(());
        }
        if let Some(batch) = &outcome.batch_error {
            let error = from_ack(Op::AddElement, batch, table, None, None);
            for meta in metas {
                for &i in &meta.changes {
                    results[i] = Some(Err(error.clone()));
                }
            }
            return Ok(());
        }
        let mut table_checked: Option<bool> = None;
        for (meta, ack) in metas.iter().zip(&outcome.acks) {
            if ack.errno == 0 {
                retry.extend(meta.changes.iter().copied());
                continue;
            }
            // Which element did the kernel refuse? The extended ack's offset lies inside it.
            let culprit = ack.bad_attr_offset.and_then(|offset| {
                meta.element_offsets
                    .iter()
                    .rposition(|start| *start <= offset)
                    .filter(|_| {
                        meta.element_offsets
                            .first()
                            .is_some_and(|first| offset >= *first)
                    })
            });
            let single = (meta.changes.len() == 1).then_some(0);
            match culprit.or(single) {
                Some(pos) => {
                    let i = meta.changes[pos];
                    let mut error = from_ack(
                        meta.op,
                        ack,
                        table,
                        Some(changes[i].element()),
                        meta.set_attr_offset,
                    );
                    if let (Error::ElementMissing(_), None) = (&error, ack.bad_attr_offset) {
                        // Without an extended ack ENOENT is ambiguous: is it the table?
                        let exists = match table_checked {
                            Some(e) => e,
                            None => {
                                let e = self.table_exists(table)?;
                                table_checked = Some(e);
                                e
                            }
                        };
                        if !exists {
                            error = Error::TableMissing {
                                table: table.to_string(),
                            };
                        }
                    }
                    if let Error::ElementExists(opening) = &error {
                        // The interval backend answers EEXIST for an overlap as well as for
                        // the same element: only an identical element is "exists".
                        if let Ok(key) = encode(opening)
                            && key.key_end.is_some()
                        {
                            let identical = self
                                .get_element(table, &key)?
                                .is_some_and(|found| found.key_end == key.key_end);
                            if !identical {
                                error = Error::ElementConflicts(opening.clone());
                            }
                        }
                    }
                    if error.is_table_wide() {
                        for &j in &meta.changes {
                            results[j] = Some(Err(error.clone()));
                        }
                    } else {
                        results[i] = Some(Err(error));
                        for (k, &j) in meta.changes.iter().enumerate() {
                            if k != pos {
                                // The kernel stopped at the culprit: the rest of this message
                                // is unknown, so each gets its own message next time.
                                if k > pos {
                                    singles.insert(j);
                                }
                                retry.push(j);
                            }
                        }
                    }
                }
                None => {
                    let error = from_ack(meta.op, ack, table, None, meta.set_attr_offset);
                    if error.is_table_wide() && ack.bad_attr_offset.is_some() {
                        for &j in &meta.changes {
                            results[j] = Some(Err(error.clone()));
                        }
                    } else {
                        for &j in &meta.changes {
                            singles.insert(j);
                            retry.push(j);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Brings our table to `desired`: recreates it if it is missing or damaged (with the
    /// desired elements), otherwise adds what is missing, removes what is not desired, and
    /// refreshes elements whose remaining time is far from the desired one.
    pub fn reconcile(
        &mut self,
        layout: &Layout,
        desired: &[(Element, Duration)],
    ) -> Result<ReconcileReport, Error> {
        // A table left by an earlier run is orphaned: it is claimed before anything else, so
        // that from now on nobody else can change it.
        if !self.table_present(layout)? || !self.claim(layout.table())? {
            let plan = plan(&[], desired);
            let valid: Vec<(Element, Duration)> = plan.add.clone();
            self.apply(layout, &valid)?;
            return Ok(ReconcileReport {
                added: valid.into_iter().map(|(o, _)| o).collect(),
                removed: Vec::new(),
                refreshed: 0,
                table_recreated: true,
                failed: plan.invalid,
            });
        }
        let current = self.elements(layout)?;
        let plan = plan(&current, desired);
        let mut changes =
            Vec::with_capacity(plan.add.len() + plan.remove.len() + plan.refresh.len());
        changes.extend(plan.remove.iter().cloned().map(Change::Remove));
        changes.extend(plan.add.iter().cloned().map(|(o, t)| Change::Add(o, t)));
        changes.extend(
            plan.refresh
                .iter()
                .cloned()
                .map(|(o, t)| Change::Renew(o, t)),
        );
        let results = self.commit(layout, &changes)?;
        let mut report = ReconcileReport {
            failed: plan.invalid,
            ..ReconcileReport::default()
        };
        for (change, result) in changes.into_iter().zip(results) {
            match (change, result) {
                (Change::Remove(o), Ok(())) => report.removed.push(o),
                // It expired on its own meanwhile: the outcome is what was wanted.
                (Change::Remove(o), Err(Error::ElementMissing(_))) => report.removed.push(o),
                (Change::Add(o, _), Ok(())) => report.added.push(o),
                (Change::Renew(..), Ok(())) => report.refreshed += 1,
                (change, Err(e)) => report.failed.push((change.element().clone(), e)),
            }
        }
        Ok(report)
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

    /// Looks one element up (GETSETELEM without dump): `None` if absent. For an interval set the
    /// kernel may answer with an element that merely contains the key; compare `key_end`.
    fn get_element(
        &mut self,
        table: &str,
        key: &ElementKey,
    ) -> Result<Option<FoundElement>, Error> {
        let seq = bump(&mut self.seq);
        let mut b = Builder::new();
        let msg = b.begin_nft(
            NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
        );
        b.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.put_str(NFTA_SET_ELEM_LIST_SET, key.set.name());
        let nest = b.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        let elem = b.nest_start(NFTA_LIST_ELEM);
        b.put_data_value(NFTA_SET_ELEM_KEY, &key.key);
        if let Some(end) = &key.key_end {
            b.put_data_value(NFTA_SET_ELEM_KEY_END, end);
        }
        b.nest_end(elem);
        b.nest_end(nest);
        b.end_msg(msg);
        let mut found = None;
        let exists = self.query(&b, seq, Op::AddElement, table, "an element query", |m| {
            let Some(list) = m.nft_attrs().find(NFTA_SET_ELEM_LIST_ELEMENTS) else {
                return;
            };
            for (_, elem) in Attrs::new(list) {
                let attrs = Attrs::new(elem);
                found = Some(FoundElement {
                    key_end: attrs
                        .clone()
                        .find(NFTA_SET_ELEM_KEY_END)
                        .and_then(data_value)
                        .map(<[u8]>::to_vec),
                    remaining: attrs
                        .find(NFTA_SET_ELEM_EXPIRATION)
                        .and_then(be_u64)
                        .map(Duration::from_millis),
                });
            }
        })?;
        Ok(if exists { found } else { None })
    }

    fn elements_of(&mut self, table: &str, set: SetId) -> Result<Vec<(Element, Duration)>, Error> {
        let t = table.to_string();
        let datagrams = match self.dump(NFT_MSG_GETSETELEM, NFPROTO_INET, |b| {
            b.put_str(NFTA_SET_ELEM_LIST_TABLE, &t);
            b.put_str(NFTA_SET_ELEM_LIST_SET, set.name());
        })? {
            Ok(d) => d,
            Err(ack) if ack.errno == libc::ENOENT => return Err(Error::TableMissing { table: t }),
            Err(ack) => return Err(from_ack(Op::AddElement, &ack, table, None, None)),
        };
        let mut out = Vec::new();
        for datagram in &datagrams {
            parse_elements(datagram, set, &mut out);
        }
        Ok(out)
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

pub(crate) fn next_seq(seq: &mut u32) -> u32 {
    bump(seq)
}

/// An element found by [`Netfilter::get_element`].
#[derive(Debug, Clone)]
struct FoundElement {
    key_end: Option<Vec<u8>>,
    remaining: Option<Duration>,
}

/// Parses the NEWSETELEM messages of a dump datagram into openings with remaining times.
fn parse_elements(datagram: &[u8], set: SetId, out: &mut Vec<(Element, Duration)>) {
    for m in messages(datagram) {
        if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM {
            continue;
        }
        let Some(list) = m.nft_attrs().find(NFTA_SET_ELEM_LIST_ELEMENTS) else {
            continue;
        };
        for (attr_type, elem) in Attrs::new(list) {
            if attr_type != NFTA_LIST_ELEM {
                continue;
            }
            let mut key = None;
            let mut key_end = None;
            let mut flags = 0;
            let mut remaining = None;
            for (t, data) in Attrs::new(elem) {
                match t {
                    NFTA_SET_ELEM_KEY => key = data_value(data),
                    NFTA_SET_ELEM_KEY_END => key_end = data_value(data),
                    NFTA_SET_ELEM_FLAGS => flags = be_u32(data).unwrap_or(0),
                    NFTA_SET_ELEM_EXPIRATION => remaining = be_u64(data).map(Duration::from_millis),
                    _ => {}
                }
            }
            if flags & NFT_SET_ELEM_INTERVAL_END != 0 {
                continue;
            }
            let Some(key) = key else { continue };
            match decode(set, key, key_end) {
                // An element without expiration never expires: reported as the longest time.
                Ok(opening) => out.push((opening, remaining.unwrap_or(Duration::MAX))),
                Err(reason) => {
                    tracing::warn!(set = set.name(), %reason, "skipping an element that is not an opening")
                }
            }
        }
    }
}

/// The first refusal of a failed transaction, as an error.
fn first_error(outcome: &TxnOutcome, table: &str) -> Error {
    if let Some(batch) = &outcome.batch_error {
        return from_ack(Op::CreateTable, batch, table, None, None);
    }
    // ECANCELED marks acks that never came; prefer a real refusal.
    match outcome
        .acks
        .iter()
        .zip(&outcome.ops)
        .find(|(a, _)| a.errno != 0 && a.errno != libc::ECANCELED)
    {
        Some((ack, op)) => from_ack(*op, ack, table, None, None),
        None => Error::UnexpectedReply("transaction failed without an error".into()),
    }
}

/// Whether a rule's expressions as the kernel reports them are the ones we sent: same
/// expressions in the same order, and every attribute we sent present with the same value
/// (the kernel adds attributes of its own, such as a bitwise operation or lookup flags).
pub(crate) fn expressions_match(sent: &[u8], reported: &[u8]) -> bool {
    let sent: Vec<&[u8]> = Attrs::new(sent)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .map(|(_, d)| d)
        .collect();
    let reported: Vec<&[u8]> = Attrs::new(reported)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .map(|(_, d)| d)
        .collect();
    if sent.len() != reported.len() {
        return false;
    }
    sent.iter().zip(&reported).all(|(s, r)| {
        let name = Attrs::new(s).find(NFTA_EXPR_NAME).map(c_string);
        if name != Attrs::new(r).find(NFTA_EXPR_NAME).map(c_string) {
            return false;
        }
        let s_data = Attrs::new(s).find(NFTA_EXPR_DATA).unwrap_or(&[]);
        let r_data = Attrs::new(r).find(NFTA_EXPR_DATA).unwrap_or(&[]);
        // The lookup's set id only names a set within the creating transaction.
        let write_only = |t: u16| name.as_deref() == Some("lookup") && t == 4;
        attrs_subset(s_data, r_data, &write_only, 0)
    })
}

fn attrs_subset(
    sent: &[u8],
    reported: &[u8],
    write_only: &dyn Fn(u16) -> bool,
    depth: usize,
) -> bool {
    Attrs::new(sent).all(|(t, value)| {
        if depth == 0 && write_only(t) {
            return true;
        }
        let Some(other) = Attrs::new(reported).find(t) else {
            return false;
        };
        // Equal bytes, or (for a nest) the same subset relation one level down.
        other == value
            || (depth < 3
                && Attrs::new(value).count() > 0
                && attrs_subset(value, other, &|_| false, depth + 1))
    })
}

fn expected_structure(layout: &Layout) -> Result<Expected, Error> {
    struct Null(u32);
    impl Sequencer for Null {
        fn next(&mut self, _: Op) -> u32 {
            self.0 += 1;
            self.0
        }
    }
    let mut scratch = Builder::new();
    write_table(layout, &mut scratch, &mut Null(0), 0)
}

/// Compares structures regardless of order; the error names the first difference.
fn compare_structure(expected: &Expected, actual: &Expected) -> Result<(), String> {
    let mut e_chains = expected.chains.clone();
    let mut a_chains = actual.chains.clone();
    e_chains.sort();
    a_chains.sort();
    if e_chains != a_chains {
        return Err(format!(
            "chains (with rule counts) {a_chains:?}, expected {e_chains:?}"
        ));
    }
    let mut e_sets = expected.sets.clone();
    let mut a_sets = actual.sets.clone();
    e_sets.sort_unstable();
    a_sets.sort_unstable();
    if e_sets != a_sets {
        return Err(format!("sets {a_sets:?}, expected {e_sets:?}"));
    }
    let mut e_props = expected.chain_props.clone();
    let mut a_props = actual.chain_props.clone();
    e_props.sort_by(|a, b| a.0.cmp(&b.0));
    a_props.sort_by(|a, b| a.0.cmp(&b.0));
    if e_props != a_props {
        return Err(format!("base chains {a_props:?}, expected {e_props:?}"));
    }
    let mut e_set_props = expected.set_props.clone();
    let mut a_set_props = actual.set_props.clone();
    e_set_props.sort_unstable();
    a_set_props.sort_unstable();
    let sets_match = e_set_props.len() == a_set_props.len()
        && e_set_props
            .iter()
            .zip(&a_set_props)
            .all(|(e, a)| e.0 == a.0 && a.1 & e.1 == e.1 && e.2 == a.2);
    if !sets_match {
        return Err(format!(
            "sets (flags, key length) {a_set_props:?}, expected {e_set_props:?}"
        ));
    }
    for (chain, _) in &expected.chains {
        let wanted: Vec<&Vec<u8>> = expected
            .rules
            .iter()
            .filter(|(c, _)| c == chain)
            .map(|(_, r)| r)
            .collect();
        let found: Vec<&Vec<u8>> = actual
            .rules
            .iter()
            .filter(|(c, _)| c == chain)
            .map(|(_, r)| r)
            .collect();
        for (position, (w, f)) in wanted.iter().zip(&found).enumerate() {
            if !expressions_match(w, f) {
                let names = |bytes: &[u8]| -> Vec<String> {
                    Attrs::new(bytes)
                        .filter_map(|(_, e)| Attrs::new(e).find(NFTA_EXPR_NAME).map(c_string))
                        .collect()
                };
                return Err(format!(
                    "rule {position} of chain {chain} differs from the layout: {:?}, expected {:?}",
                    names(f),
                    names(w)
                ));
            }
        }
    }
    let mut e_counters = expected.counters.clone();
    let mut a_counters = actual.counters.clone();
    e_counters.sort_unstable();
    a_counters.sort_unstable();
    if e_counters != a_counters {
        return Err(format!("counters {a_counters:?}, expected {e_counters:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_rounds_up_and_never_reaches_zero() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert!(check_timeout(Duration::ZERO).is_err());
        assert!(check_timeout(Duration::from_secs(1)).is_ok());
    }

    fn writes_for(keys: &[ElementKey], op: ElementOp) -> Vec<ElementWrite<'_>> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| ElementWrite {
                change: i,
                key,
                op,
                timeout: Some(Duration::from_secs(60)),
            })
            .collect()
    }

    fn keys(count: u32) -> Vec<ElementKey> {
        (0..count)
            .map(|i| {
                encode(&Element {
                    host: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(80),
                    remote: None,
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn element_messages_respect_the_attribute_limit_and_the_batch_budget() {
        // Element a netlink socket needs no privilege; nothing is sent here.
        let mut nf = Netfilter::open().expect("netlink socket");
        nf.max_batch_bytes = 1 << 20;
        let keys = keys(5000);
        let writes = writes_for(&keys, ElementOp::AddExclusive);
        let mut txn = nf.new_txn();
        assert_eq!(nf.write_elements(&mut txn, "fwnp", &writes), 5000);
        let mut seen = 0;
        for m in messages(txn.b.as_bytes()).skip(1) {
            let nest = m
                .nft_attrs()
                .find(NFTA_SET_ELEM_LIST_ELEMENTS)
                .expect("element list");
            assert!(
                nest.len() + 4 <= usize::from(u16::MAX),
                "nest of {} bytes",
                nest.len()
            );
            seen += Attrs::new(nest).count();
        }
        assert_eq!(seen, 5000);
        assert!(
            txn.metas.len() >= 3,
            "{} messages: the elements were not split",
            txn.metas.len()
        );
        let carried: Vec<usize> = txn
            .metas
            .iter()
            .flat_map(|m| m.changes.iter().copied())
            .collect();
        assert_eq!(carried, (0..5000).collect::<Vec<_>>());

        // A small budget stops early; the transaction stays within it.
        nf.max_batch_bytes = 64 * 1024;
        let mut txn = nf.new_txn();
        let taken = nf.write_elements(&mut txn, "fwnp", &writes);
        assert!(taken > 500 && taken < 5000, "took {taken}");
        assert!(txn.b.len() <= 64 * 1024);
    }

    #[test]
    fn singled_out_changes_get_their_own_messages() {
        let mut nf = Netfilter::open().expect("netlink socket");
        let keys = keys(20);
        let writes = writes_for(&keys, ElementOp::Remove);
        let singles: HashSet<usize> = (0..10).collect();
        let mut txn = nf.new_txn();
        assert_eq!(
            nf.write_elements_split(&mut txn, "fwnp", &writes, &singles),
            20
        );
        // Ten single messages, then one for the other ten.
        assert_eq!(txn.metas.len(), 11);
        assert!(
            txn.metas[..10]
                .iter()
                .all(|m| m.changes.len() == 1 && m.element_offsets.len() == 1)
        );
        assert_eq!(txn.metas[10].changes.len(), 10);
    }

    #[test]
    fn a_delete_and_add_renewal_is_never_cut() {
        let mut nf = Netfilter::open().expect("netlink socket");
        let keys = keys(2000);
        let mut writes = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            writes.push(ElementWrite {
                change: i,
                key,
                op: ElementOp::Remove,
                timeout: None,
            });
            writes.push(ElementWrite {
                change: i,
                key,
                op: ElementOp::AddExclusive,
                timeout: Some(Duration::from_secs(9)),
            });
        }
        nf.max_batch_bytes = 32 * 1024;
        let mut txn = nf.new_txn();
        let taken = nf.write_elements(&mut txn, "fwnp", &writes);
        assert!(taken < writes.len());
        assert_eq!(taken % 2, 0, "a renewal was split after {taken} writes");
    }

    type Expression<'a> = (&'a str, &'a [(u16, &'a [u8])]);

    fn expression_list(exprs: &[Expression<'_>]) -> Vec<u8> {
        let mut b = Builder::new();
        for (name, attrs) in exprs {
            let elem = b.nest_start(NFTA_LIST_ELEM);
            b.put_str(NFTA_EXPR_NAME, name);
            let data = b.nest_start(NFTA_EXPR_DATA);
            for (t, v) in *attrs {
                b.put(*t, v);
            }
            b.nest_end(data);
            b.nest_end(elem);
        }
        b.into_bytes()
    }

    #[test]
    fn read_back_rules_match_what_was_sent() {
        let sent = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])]),
            ("lookup", &[(1, b"lease4\0"), (4, &[0, 0, 0, 1])]),
        ]);
        // The kernel adds attributes of its own and drops the lookup's set id.
        let reported = expression_list(&[
            (
                "payload",
                &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1]), (6, &[0, 0, 0, 0])],
            ),
            ("lookup", &[(1, b"lease4\0"), (5, &[0, 0, 0, 0])]),
        ]);
        assert!(expressions_match(&sent, &reported));
        // A value changed, an expression replaced, an expression missing: all differ.
        let changed = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 2])]),
            ("lookup", &[(1, b"lease4\0")]),
        ]);
        assert!(!expressions_match(&sent, &changed));
        let replaced = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])]),
            ("immediate", &[]),
        ]);
        assert!(!expressions_match(&sent, &replaced));
        let shorter = expression_list(&[("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])])]);
        assert!(!expressions_match(&sent, &shorter));
    }

    #[test]
    fn structure_comparison_ignores_order() {
        let a = Expected {
            chains: vec![("a".into(), 1), ("b".into(), 2)],
            sets: vec!["lease4", "range4"],
            counters: vec!["x", "y"],
            ..Expected::empty()
        };
        let mut b = a.clone();
        b.chains.reverse();
        b.sets.reverse();
        assert!(compare_structure(&a, &b).is_ok());
        b.chains[0].1 = 0;
        assert!(compare_structure(&a, &b).is_err());
    }
}
