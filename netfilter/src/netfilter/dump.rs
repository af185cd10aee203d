//! Reading the kernel's state back: dumps (retried when the ruleset changes meanwhile), single
//! queries, the table's elements with their remaining time, and its counters.

use super::*;

/// An element found by [`Netfilter::get_element`].
#[derive(Debug, Clone)]
pub(super) struct FoundElement {
    pub(super) key_end: Option<Vec<u8>>,
    pub(super) remaining: Option<Duration>,
}

/// How many element queries [`Netfilter::look_up`] sends in one datagram: the kernel queues
/// each answer as a buffer of a page or more until it is read, and one datagram's answers
/// must fit the receive buffer.
const LOOKUPS_PER_ROUND: usize = 512;

/// The remaining time of the element in an answer to a query (NEWSETELEM) if it is exactly
/// `wanted`: an interval set may answer with an element that merely contains the key.
fn found_exactly(m: &Message<'_>, wanted: &ElementKey) -> Option<Duration> {
    if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM {
        return None;
    }
    let list = m.nft_attrs().find(NFTA_SET_ELEM_LIST_ELEMENTS)?;
    for (attr_type, elem) in Attrs::new(list) {
        if attr_type != NFTA_LIST_ELEM {
            continue;
        }
        let (mut key, mut key_end, mut remaining) = (None, None, None);
        for (t, data) in Attrs::new(elem) {
            match t {
                NFTA_SET_ELEM_KEY => key = data_value(data),
                NFTA_SET_ELEM_KEY_END => key_end = data_value(data),
                NFTA_SET_ELEM_EXPIRATION => remaining = be_u64(data).map(Duration::from_millis),
                _ => {}
            }
        }
        if key == Some(wanted.key.as_slice()) && key_end == wanted.key_end.as_deref() {
            // An element without expiration never expires: reported as the longest time.
            return Some(remaining.unwrap_or(Duration::MAX));
        }
    }
    None
}

/// Parses the NEWSETELEM messages of a dump datagram into openings with remaining times.
pub(super) fn parse_elements(datagram: &[u8], set: SetId, out: &mut Vec<(Element, Duration)>) {
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

impl Netfilter {
    /// The ruleset's generation in this handle's network namespace: the kernel moves it on by
    /// one with every transaction it commits, whoever sent it and whatever table it touched (it
    /// skips 0 when it wraps). Reading it costs one small request, whatever the ruleset holds.
    ///
    /// ```no_run
    /// let mut nf = fwnp_netfilter::Netfilter::open()?;
    /// let before = nf.generation()?;
    /// // ... someone runs `nft add table inet other` ...
    /// assert_ne!(nf.generation()?, before);
    /// # Ok::<(), fwnp_netfilter::Error>(())
    /// ```
    pub fn generation(&mut self) -> Result<u32, Error> {
        let seq = bump(&mut self.seq);
        let mut b = Builder::new();
        let start = b.begin_nft(
            NFT_MSG_GETGEN,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_UNSPEC,
        );
        b.end_msg(start);
        let mut generation = None;
        let answered = self.query(&b, seq, Op::ReadGeneration, "", "a generation query", |m| {
            if m.msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                generation = m.nft_attrs().find(NFTA_GEN_ID).and_then(be_u32);
            }
        })?;
        match generation {
            Some(generation) if answered => Ok(generation),
            _ => Err(Error::UnexpectedReply(
                "the generation query was answered without a generation".into(),
            )),
        }
    }

    /// How many transactions of this handle the kernel has committed (each moved the
    /// generation on by one): together with [`Netfilter::generation`], whether anyone else
    /// committed one meanwhile.
    ///
    /// ```no_run
    /// let mut nf = fwnp_netfilter::Netfilter::open()?;
    /// let (generation, committed) = (nf.generation()?, nf.committed());
    /// // ... changes through `nf`, and perhaps someone else's ...
    /// let theirs = u64::from(nf.generation()?.wrapping_sub(generation))
    ///     .saturating_sub(nf.committed() - committed);
    /// # Ok::<(), fwnp_netfilter::Error>(())
    /// ```
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// A dump request; returns the raw datagrams of the answer. An interrupted dump (the
    /// ruleset changed meanwhile) is retried.
    pub(super) fn dump(
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
                let n = self.recv_answer(|| "dump did not finish".into())?;
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
    pub(super) fn table_exists(&mut self, table: &str) -> Result<bool, Error> {
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
    pub(super) fn query(
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

    pub(super) fn dump_ok(
        &mut self,
        msg: u16,
        table: &str,
        table_attr: u16,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let owned = table.to_string();
        match self.dump(msg, NFPROTO_INET, |b| b.put_str(table_attr, &owned))? {
            Ok(datagrams) => Ok(datagrams),
            Err(ack) if ack.errno == libc::ENOENT => Err(Error::TableMissing { table: owned }),
            Err(ack) => Err(from_ack(Op::CreateTable, &ack, table, None, None)),
        }
    }

    pub(super) fn counters_in(&mut self, table: &str) -> Result<Vec<Counter>, Error> {
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

    /// Looks one element up (GETSETELEM without dump): `None` if absent. For an interval set the
    /// kernel may answer with an element that merely contains the key; compare `key_end`.
    pub(super) fn get_element(
        &mut self,
        table: &str,
        key: &ElementKey,
    ) -> Result<Option<FoundElement>, Error> {
        let seq = bump(&mut self.seq);
        let mut b = Builder::new();
        put_element_query(&mut b, NLM_F_REQUEST | NLM_F_ACK, seq, table, key);
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

    /// Looks each key up in the kernel, many queries to a datagram, and answers for each the
    /// remaining time of the element held with exactly that key (and key end), `None` when
    /// there is none; an element without an expiration counts as the longest time. Linear in
    /// the number of keys, however large the set: unlike a dump, a query goes to its element
    /// through the set's index.
    pub(super) fn look_up(
        &mut self,
        table: &str,
        keys: &[ElementKey],
    ) -> Result<Vec<Option<Duration>>, Error> {
        let mut out = vec![None; keys.len()];
        let mut round: HashMap<u32, usize> = HashMap::with_capacity(LOOKUPS_PER_ROUND);
        for (chunk_at, chunk) in keys.chunks(LOOKUPS_PER_ROUND).enumerate() {
            round.clear();
            let mut b = Builder::new();
            for (i, key) in chunk.iter().enumerate() {
                let seq = bump(&mut self.seq);
                round.insert(seq, chunk_at * LOOKUPS_PER_ROUND + i);
                // No acknowledgement asked: the element answers a query that finds it, an
                // error one that does not, and a datagram (a receive) is saved per element.
                put_element_query(&mut b, NLM_F_REQUEST, seq, table, key);
            }
            // The kernel answers the messages of a datagram in order: once the generation
            // query that ends it is acknowledged, every element query has been answered.
            let last = bump(&mut self.seq);
            let msg = b.begin_nft(
                NFT_MSG_GETGEN,
                NLM_F_REQUEST | NLM_F_ACK,
                last,
                NFPROTO_UNSPEC,
            );
            b.end_msg(msg);
            self.socket.send(b.as_bytes())?;
            let mut answered = false;
            while !answered {
                let n = self.recv_answer(|| "element queries went unanswered".into())?;
                for m in messages(&self.recv_buf[..n]) {
                    if m.seq == last {
                        if let Some(ack) = parse_ack(&m) {
                            if ack.errno != 0 {
                                return Err(from_ack(Op::ReadGeneration, &ack, table, None, None));
                            }
                            answered = true;
                        }
                        continue;
                    }
                    let Some(&at) = round.get(&m.seq) else {
                        continue;
                    };
                    if let Some(ack) = parse_ack(&m) {
                        match ack.errno {
                            0 | libc::ENOENT => continue,
                            _ => {
                                return Err(from_ack(Op::AddElement, &ack, table, None, None));
                            }
                        }
                    }
                    if let Some(remaining) = found_exactly(&m, &keys[at]) {
                        out[at] = Some(remaining);
                    }
                }
            }
        }
        Ok(out)
    }

    pub(super) fn elements_of(
        &mut self,
        table: &str,
        set: SetId,
    ) -> Result<Vec<(Element, Duration)>, Error> {
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
}

/// Appends to `b` a query for the element of `key` in `table` (GETSETELEM with `flags`).
fn put_element_query(b: &mut Builder, flags: u16, seq: u32, table: &str, key: &ElementKey) {
    let msg = b.begin_nft(NFT_MSG_GETSETELEM, flags, seq, NFPROTO_INET);
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
}
