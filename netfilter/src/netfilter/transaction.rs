//! Element transactions: building a batch of element messages within the socket's budget,
//! sending it, matching each acknowledgement to the caller's change by sequence number, and
//! settling a failed batch by giving each bad element its own error and sending the rest again.

use super::*;

/// Metadata of one message of a transaction, to map its acknowledgement back.
#[derive(Debug, Clone)]
pub(super) struct MsgMeta {
    pub(super) seq: u32,
    pub(super) op: Op,
    /// The caller's changes this message carries (indices), in element order.
    pub(super) changes: Vec<usize>,
    /// Offset of each element's attribute within the message, parallel to `changes`.
    pub(super) element_offsets: Vec<u32>,
    /// Offset of the set-name attribute within the message (element messages).
    pub(super) set_attr_offset: Option<u32>,
}

/// A transaction being built.
#[derive(Debug)]
pub(super) struct Txn {
    pub(super) b: Builder,
    pub(super) begin_seq: u32,
    pub(super) metas: Vec<MsgMeta>,
    /// What the elements' timeouts count from: they are shortened by the time from then to
    /// the send (see [`Netfilter::run`]).
    pub(super) timeouts_from: Instant,
    /// Where each timeout (and expiration) value written by [`put_element`] lies in `b`.
    timeouts: Vec<u32>,
}

pub(super) struct TxnSequencer<'a> {
    pub(super) next_seq: &'a mut u32,
    pub(super) metas: &'a mut Vec<MsgMeta>,
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

pub(super) fn bump(seq: &mut u32) -> u32 {
    *seq = seq.wrapping_add(1).max(1);
    *seq
}

/// The outcome of one transaction.
#[derive(Debug)]
pub(super) struct TxnOutcome {
    /// One acknowledgement per message, in message order.
    pub(super) acks: Vec<Ack>,
    /// What each message did, parallel to `acks`.
    pub(super) ops: Vec<Op>,
    /// An error the kernel reported against the whole batch (commit failure, no memory).
    pub(super) batch_error: Option<Ack>,
}

impl TxnOutcome {
    pub(super) fn ok(&self) -> bool {
        self.batch_error.is_none() && self.acks.iter().all(|a| a.errno == 0)
    }
}

/// What one element message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ElementOp {
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
    pub(super) fn op(self) -> Op {
        match self {
            ElementOp::AddExclusive | ElementOp::AddOrKeep => Op::AddElement,
            ElementOp::Refresh => Op::RenewElement,
            ElementOp::Remove => Op::RemoveElement,
        }
    }
}

/// One element to write.
#[derive(Debug, Clone, Copy)]
pub(super) struct ElementWrite<'a> {
    pub(super) change: usize,
    pub(super) key: &'a ElementKey,
    pub(super) op: ElementOp,
    pub(super) timeout: Option<Duration>,
}

/// Writes one element of an element message, noting where its timeout lies in `timeouts`.
fn put_element(b: &mut Builder, timeouts: &mut Vec<u32>, w: &ElementWrite<'_>) {
    let elem = b.nest_start(NFTA_LIST_ELEM);
    b.put_data_value(NFTA_SET_ELEM_KEY, &w.key.key);
    if let Some(end) = &w.key.key_end {
        b.put_data_value(NFTA_SET_ELEM_KEY_END, end);
    }
    if w.op != ElementOp::Remove
        && let Some(timeout) = w.timeout
    {
        let mut put = |b: &mut Builder, attr| {
            // The value follows the attribute's 4-byte header.
            if let Ok(at) = u32::try_from(b.len() + 4) {
                timeouts.push(at);
            }
            b.put_u64(attr, millis(timeout));
        };
        put(b, NFTA_SET_ELEM_TIMEOUT);
        if w.op == ElementOp::Refresh {
            put(b, NFTA_SET_ELEM_EXPIRATION);
        }
    }
    b.nest_end(elem);
}

/// The bytes [`put_element`] writes for an element added with a timeout: what a batch of
/// many is sized by before it is written, so that its buffer is allocated once rather than
/// grown by copies, each holding the old buffer and the new one at once.
pub(super) fn added_element_bytes(key: &ElementKey) -> usize {
    const ATTR: usize = 4;
    let value = |v: &[u8]| ATTR + ATTR + v.len().next_multiple_of(4);
    ATTR + value(&key.key) + key.key_end.as_deref().map_or(0, value) + ATTR + 8
}

/// The bytes of an element message's headers, beside its elements: the netlink and
/// nf_tables headers, the table's and the set's names and the elements' nest.
pub(super) fn element_message_bytes(table: &str) -> usize {
    MAX_ELEMENT_BYTES + 128 + table.len()
}

pub(super) fn millis(d: Duration) -> u64 {
    // Round up: a lease of 1.5 ms must not become 1 ms, nor 0 (which means "never expires").
    let ms = d
        .as_millis()
        .saturating_add(u128::from(!d.subsec_nanos().is_multiple_of(1_000_000)));
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

pub(super) fn check_timeout(timeout: Duration) -> Result<(), Error> {
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

/// The first refusal of a failed transaction, as an error.
pub(super) fn first_error(outcome: &TxnOutcome, table: &str) -> Error {
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

impl Netfilter {
    pub(super) fn new_txn(&mut self) -> Txn {
        let mut b = Builder::new();
        let begin_seq = bump(&mut self.seq);
        b.batch_begin(begin_seq);
        Txn {
            b,
            begin_seq,
            metas: Vec::new(),
            timeouts_from: Instant::now(),
            timeouts: Vec::new(),
        }
    }

    /// Receives the next datagram of an answer into `recv_buf`; its length. A socket that
    /// waited in vain (its receive timeout) is [`Error::UnexpectedReply`], saying what never
    /// came (`unanswered`).
    pub(super) fn recv_answer(
        &mut self,
        unanswered: impl FnOnce() -> String,
    ) -> Result<usize, Error> {
        match self.socket.recv(&mut self.recv_buf, false) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::UnexpectedReply(unanswered()))
            }
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// Sends a transaction in one datagram and collects one acknowledgement per message.
    pub(super) fn run(&mut self, mut txn: Txn) -> Result<TxnOutcome, Error> {
        let end_seq = bump(&mut self.seq);
        txn.b.batch_end(end_seq);
        // The kernel counts an element's timeout from when it takes it: the time spent since
        // the timeouts were computed (planning and writing a large batch take seconds) is taken
        // off, so that no element outlives the expiry it was desired for.
        let elapsed = u64::try_from(txn.timeouts_from.elapsed().as_millis()).unwrap_or(u64::MAX);
        if elapsed > 0 {
            for &at in &txn.timeouts {
                // Never 0, which the kernel takes as "never expires".
                txn.b
                    .update_u64(at as usize, |ms| ms.saturating_sub(elapsed).max(1));
            }
        }
        self.socket.send(txn.b.as_bytes()).map_err(|e| {
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
            let n = self.recv_answer(|| format!("{missing} acknowledgements never arrived"))?;
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
        let outcome = TxnOutcome {
            acks,
            ops: txn.metas.iter().map(|m| m.op).collect(),
            batch_error,
        };
        // nf_tables commits a batch whole or aborts it whole: every message acknowledged
        // without error means it was committed.
        if outcome.ok() {
            self.committed = self.committed.wrapping_add(1);
        }
        Ok(outcome)
    }

    /// Writes element messages into a transaction until it is full; returns how many of
    /// `writes` it took. Consecutive elements of the same set and operation share a message.
    pub(super) fn write_elements(
        &mut self,
        txn: &mut Txn,
        table: &str,
        writes: &[ElementWrite<'_>],
    ) -> usize {
        self.write_elements_opt(txn, table, writes, false)
    }

    /// `one_per_change`: every change gets its own message, so that its acknowledgement is its
    /// own. A change's writes (a delete-and-add renewal) are never cut across transactions.
    pub(super) fn write_elements_opt(
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
            put_element(&mut txn.b, &mut txn.timeouts, w);
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
        let asked = Instant::now();
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
                txn.timeouts_from = asked;
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
    pub(super) fn write_elements_split(
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
    pub(super) fn settle(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::Prefix;

    #[test]
    fn millis_rounds_up_and_never_reaches_zero() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert!(check_timeout(Duration::ZERO).is_err());
        assert!(check_timeout(Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn an_added_element_takes_the_bytes_a_batch_is_sized_by() {
        let openings = [
            Element {
                host: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                protocol: Protocol::Tcp,
                ports: PortRange::single(1024),
                remote: None,
            },
            Element {
                host: "2001:db8::7".parse().expect("address"),
                protocol: Protocol::Udp,
                ports: PortRange {
                    first: 5000,
                    last: 5010,
                },
                remote: Some(Prefix {
                    addr: "2001:db8:1::".parse().expect("address"),
                    len: 48,
                }),
            },
            Element {
                host: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                protocol: Protocol::Udp,
                ports: PortRange::single(53),
                remote: Some(Prefix {
                    addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)),
                    len: 24,
                }),
            },
        ];
        let mut sets = std::collections::HashSet::new();
        for opening in &openings {
            let key = encode(opening).expect("key");
            sets.insert(key.set);
            let mut b = Builder::new();
            let before = b.len();
            put_element(
                &mut b,
                &mut Vec::new(),
                &ElementWrite {
                    change: 0,
                    key: &key,
                    op: ElementOp::AddExclusive,
                    timeout: Some(Duration::from_secs(3600)),
                },
            );
            assert_eq!(b.len() - before, added_element_bytes(&key), "{opening:?}");
        }
        // A single key, a key with an upper end: both kinds of set.
        assert!(sets.len() >= 2, "{sets:?}");
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
}
