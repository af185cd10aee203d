//! Netlink framing for nf_tables and ctnetlink: a message builder and a bounds-checked
//! attribute walker. Numbers come from the kernel's uapi headers (`linux/netlink.h`,
//! `linux/netfilter/nfnetlink.h`, `nf_tables.h`, `nfnetlink_conntrack.h`).

// Netlink header flags and types.
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
pub(crate) const NLMSG_ERROR: u16 = 0x2;
pub(crate) const NLMSG_DONE: u16 = 0x3;
pub(crate) const NLMSGERR_ATTR_MSG: u16 = 1;
pub(crate) const NLMSGERR_ATTR_OFFS: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

// nfnetlink.
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFPROTO_UNSPEC: u8 = 0;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

// nf_tables message types.
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u16 = 4;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NFT_MSG_NEWSET: u16 = 9;
pub(crate) const NFT_MSG_GETSET: u16 = 10;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(crate) const NFT_MSG_GETSETELEM: u16 = 13;
pub(crate) const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_MSG_NEWGEN: u16 = 15;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;
pub(crate) const NFT_MSG_NEWOBJ: u16 = 18;
pub(crate) const NFT_MSG_GETOBJ: u16 = 19;

// Attributes.
pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_TABLE_FLAGS: u16 = 2;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
pub(crate) const NFTA_SET_TABLE: u16 = 1;
pub(crate) const NFTA_SET_NAME: u16 = 2;
pub(crate) const NFTA_SET_FLAGS: u16 = 3;
pub(crate) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(crate) const NFTA_SET_KEY_LEN: u16 = 5;
pub(crate) const NFTA_SET_DESC: u16 = 9;
pub(crate) const NFTA_SET_ID: u16 = 10;
pub(crate) const NFTA_SET_DESC_CONCAT: u16 = 2;
pub(crate) const NFTA_SET_FIELD_LEN: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub(crate) const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
pub(crate) const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
pub(crate) const NFTA_SET_ELEM_KEY_END: u16 = 10;
pub(crate) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NFTA_VERDICT_CHAIN: u16 = 2;
pub(crate) const NFTA_OBJ_TABLE: u16 = 1;
pub(crate) const NFTA_OBJ_NAME: u16 = 2;
pub(crate) const NFTA_OBJ_TYPE: u16 = 3;
pub(crate) const NFTA_OBJ_DATA: u16 = 4;
pub(crate) const NFTA_COUNTER_BYTES: u16 = 1;
pub(crate) const NFTA_COUNTER_PACKETS: u16 = 2;
pub(crate) const NFT_OBJECT_COUNTER: u32 = 1;
pub(crate) const NFTA_GEN_ID: u16 = 1;

/// The fixed part of a netlink message: `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, resource id.
pub(crate) const NFGENMSG_LEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A datagram reserved at this size or more is written into an anonymous mapping of its own
/// rather than the heap (see [`Bytes`]).
const MAPPED_AT: usize = 1 << 20;

/// The bytes of a datagram being built: on the heap, or, once reserved at [`MAPPED_AT`] bytes
/// or more, in an anonymous mapping of their own, which goes back to the system the moment the
/// datagram is dropped. The allocator keeps freed memory for reuse: a start's replacement of
/// a million elements (about 50 MB in one datagram) stayed in the gateway's resident memory
/// long after it was sent, while a mapping's pages count only once written and only until
/// unmapped.
#[derive(Debug)]
enum Bytes {
    Heap(Vec<u8>),
    Mapped { map: memmap2::MmapMut, len: usize },
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes::Heap(Vec::new())
    }
}

impl Bytes {
    fn len(&self) -> usize {
        match self {
            Bytes::Heap(v) => v.len(),
            Bytes::Mapped { len, .. } => *len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Heap(v) => v,
            Bytes::Mapped { map, len } => &map[..*len],
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Bytes::Heap(v) => v,
            Bytes::Mapped { map, len } => &mut map[..*len],
        }
    }

    /// Room for `additional` more bytes at once; in a mapping from [`MAPPED_AT`] on.
    fn reserve(&mut self, additional: usize) {
        let needed = self.len().saturating_add(additional);
        match self {
            Bytes::Heap(v) if needed < MAPPED_AT => v.reserve_exact(additional),
            Bytes::Heap(_) => self.map(needed),
            Bytes::Mapped { map, .. } if needed > map.len() => self.map(needed),
            Bytes::Mapped { .. } => {}
        }
    }

    /// Moves the bytes into a new mapping of `capacity` bytes. Without one (the system
    /// refused the mapping) they stay on, or move to, the heap.
    fn map(&mut self, capacity: usize) {
        match memmap2::MmapMut::map_anon(capacity) {
            Ok(mut map) => {
                let len = self.len();
                map[..len].copy_from_slice(self.as_slice());
                *self = Bytes::Mapped { map, len };
            }
            Err(_) => {
                if let Bytes::Mapped { .. } = self {
                    *self = Bytes::Heap(self.as_slice().to_vec());
                }
                if let Bytes::Heap(v) = self {
                    v.reserve_exact(capacity.saturating_sub(v.len()));
                }
            }
        }
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        if let Bytes::Mapped { map, len } = self {
            let end = *len + data.len();
            let capacity = map.len();
            if end > capacity {
                // Written past what was reserved: a mapping twice as large.
                self.map(end.max(capacity.saturating_mul(2)));
            }
        }
        match self {
            Bytes::Heap(v) => v.extend_from_slice(data),
            Bytes::Mapped { map, len } => {
                map[*len..*len + data.len()].copy_from_slice(data);
                *len += data.len();
            }
        }
    }

    fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    /// Pads with zeros up to `new_len` (never shorter).
    fn pad_to(&mut self, new_len: usize) {
        const ZEROS: [u8; 4] = [0; 4];
        let mut missing = new_len.saturating_sub(self.len());
        while missing > 0 {
            let n = missing.min(ZEROS.len());
            self.extend_from_slice(&ZEROS[..n]);
            missing -= n;
        }
    }

    #[cfg(test)]
    fn into_vec(self) -> Vec<u8> {
        match self {
            Bytes::Heap(v) => v,
            Bytes::Mapped { map, len } => map[..len].to_vec(),
        }
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Bytes {
    type Output = [u8];

    fn index(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.as_slice()[range]
    }
}

impl std::ops::IndexMut<std::ops::Range<usize>> for Bytes {
    fn index_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        &mut self.as_mut_slice()[range]
    }
}

/// Builds netlink datagrams: messages with a `nfgenmsg` header and (nested) attributes.
#[derive(Debug, Default)]
pub(crate) struct Builder {
    buf: Bytes,
}

impl Builder {
    pub(crate) fn new() -> Self {
        Builder {
            buf: Bytes::Heap(Vec::with_capacity(4096)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Makes room for `additional` more bytes at once (see [`Bytes::reserve`]).
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// Starts a message; returns its start offset for [`Builder::end_msg`].
    pub(crate) fn begin_msg(
        &mut self,
        msg_type: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
    ) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0, the kernel fills it
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub(crate) fn end_msg(&mut self, start: usize) {
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// An nf_tables message: subsystem 10 in the high byte of the type.
    pub(crate) fn begin_nft(&mut self, msg: u16, flags: u16, seq: u32, family: u8) -> usize {
        self.begin_msg((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, family, 0)
    }

    pub(crate) fn put(&mut self, attr_type: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(data);
        let padded = align4(self.buf.len());
        self.buf.pad_to(padded);
    }

    /// Replaces the big-endian `u64` at `at` (an attribute's value) by what `update` makes of
    /// it; nothing if there is none.
    pub(crate) fn update_u64(&mut self, at: usize, update: impl FnOnce(u64) -> u64) {
        let Some(bytes) = self.buf.as_mut_slice().get_mut(at..at + 8) else {
            return;
        };
        let mut value = [0u8; 8];
        value.copy_from_slice(bytes);
        bytes.copy_from_slice(&update(u64::from_be_bytes(value)).to_be_bytes());
    }

    pub(crate) fn put_u32(&mut self, attr_type: u16, value: u32) {
        self.put(attr_type, &value.to_be_bytes());
    }

    pub(crate) fn put_u64(&mut self, attr_type: u16, value: u64) {
        self.put(attr_type, &value.to_be_bytes());
    }

    pub(crate) fn put_str(&mut self, attr_type: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.put(attr_type, &bytes);
    }

    pub(crate) fn nest_start(&mut self, attr_type: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        start
    }

    /// Closes a nest. Returns false if it grew past the 64 KiB an attribute length can say.
    pub(crate) fn nest_end(&mut self, start: usize) -> bool {
        let len = self.buf.len() - start;
        let fits = len <= usize::from(u16::MAX);
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        fits
    }

    /// `NFTA_*_DATA`-style nest holding one `NFTA_DATA_VALUE`.
    pub(crate) fn put_data_value(&mut self, attr_type: u16, value: &[u8]) {
        let nest = self.nest_start(attr_type);
        self.put(NFTA_DATA_VALUE, value);
        self.nest_end(nest);
    }

    /// Adds the batch begin message of an nf_tables transaction.
    pub(crate) fn batch_begin(&mut self, seq: u32) {
        let start = self.begin_msg(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.end_msg(start);
    }

    pub(crate) fn batch_end(&mut self, seq: u32) {
        let start = self.begin_msg(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.end_msg(start);
    }

    #[cfg(test)]
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf.into_vec()
    }
}

/// One received netlink message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub(crate) msg_type: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    /// Everything after the 16-byte header.
    pub(crate) payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The attributes after the `nfgenmsg` header (empty if the payload is too short).
    pub(crate) fn nft_attrs(&self) -> Attrs<'a> {
        Attrs::new(self.payload.get(NFGENMSG_LEN..).unwrap_or(&[]))
    }

    #[cfg(test)]
    pub(crate) fn nfgen_family(&self) -> Option<u8> {
        self.payload.first().copied()
    }
}

/// Splits a datagram into messages; stops at the first malformed header.
#[derive(Debug, Clone)]
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

pub(crate) fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;
    fn next(&mut self) -> Option<Message<'a>> {
        let header = self.rest.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let msg = Message {
            msg_type: u16::from_ne_bytes(header[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(header[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(header[8..12].try_into().ok()?),
            payload: self.rest.get(NLMSG_HDRLEN..len)?,
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(msg)
    }
}

/// A netlink error or acknowledgement (`struct nlmsgerr`), with the extended ack if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    /// 0 for success, else a positive errno.
    pub(crate) errno: i32,
    /// Sequence number of the message this answers.
    pub(crate) seq: u32,
    /// The kernel's error text (extended ack).
    pub(crate) message: Option<String>,
    /// Offset of the refused attribute within the original message (extended ack).
    pub(crate) bad_attr_offset: Option<u32>,
}

pub(crate) fn parse_ack(msg: &Message<'_>) -> Option<Ack> {
    if msg.msg_type != NLMSG_ERROR {
        return None;
    }
    let error = i32::from_ne_bytes(msg.payload.get(0..4)?.try_into().ok()?);
    let original = msg.payload.get(4..4 + NLMSG_HDRLEN)?;
    let original_len = u32::from_ne_bytes(original[0..4].try_into().ok()?) as usize;
    let seq = u32::from_ne_bytes(original[8..12].try_into().ok()?);
    let mut ack = Ack {
        errno: error.checked_neg().unwrap_or(i32::MAX),
        seq,
        message: None,
        bad_attr_offset: None,
    };
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK the original is echoed as its header only (NLM_F_CAPPED);
        // otherwise in full. The TLVs follow either way.
        let echoed = if msg.flags & 0x100 != 0 {
            NLMSG_HDRLEN
        } else {
            align4(original_len)
        };
        let tlvs = msg.payload.get(4 + echoed..).unwrap_or(&[]);
        for (attr_type, data) in Attrs::new(tlvs) {
            match attr_type {
                NLMSGERR_ATTR_MSG => ack.message = Some(c_string(data)),
                NLMSGERR_ATTR_OFFS => ack.bad_attr_offset = be_or_ne_u32(data, false),
                _ => {}
            }
        }
    }
    Some(ack)
}

/// Iterates over the attributes of a buffer: `(type without flags, payload)`. A malformed
/// attribute ends the walk; nothing is read outside the buffer.
#[derive(Debug, Clone)]
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Attrs { rest: buf }
    }

    /// The payload of the first attribute of this type.
    pub(crate) fn find(self, wanted: u16) -> Option<&'a [u8]> {
        let mut attrs = self;
        attrs.find_map(|(t, d)| (t == wanted).then_some(d))
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let header = self.rest.get(..4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let attr_type = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let data = &self.rest[4..len];
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some((attr_type, data))
    }
}

/// A NUL-terminated (or not) string attribute.
pub(crate) fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

pub(crate) fn be_u32(data: &[u8]) -> Option<u32> {
    be_or_ne_u32(data, true)
}

fn be_or_ne_u32(data: &[u8], big_endian: bool) -> Option<u32> {
    let bytes: [u8; 4] = data.get(..4)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_ne_bytes(bytes)
    })
}

pub(crate) fn be_u64(data: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(data.get(..8)?.try_into().ok()?))
}

/// The value bytes inside an `nft_data` nest (`NFTA_DATA_VALUE`).
pub(crate) fn data_value(nest: &[u8]) -> Option<&[u8]> {
    Attrs::new(nest).find(NFTA_DATA_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_walker_round_trip() {
        let mut b = Builder::new();
        let start = b.begin_nft(NFT_MSG_NEWTABLE, NLM_F_REQUEST | NLM_F_ACK, 7, NFPROTO_INET);
        b.put_str(NFTA_TABLE_NAME, "fwnp");
        let nest = b.nest_start(NFTA_CHAIN_HOOK);
        b.put_u32(NFTA_HOOK_HOOKNUM, 2);
        assert!(b.nest_end(nest));
        b.end_msg(start);
        let bytes = b.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let msgs: Vec<_> = messages(&bytes).collect();
        assert_eq!(msgs.len(), 1);
        let msg = msgs[0];
        assert_eq!(msg.msg_type, (10 << 8) | NFT_MSG_NEWTABLE);
        assert_eq!(msg.seq, 7);
        assert_eq!(msg.nfgen_family(), Some(NFPROTO_INET));
        let attrs: Vec<_> = msg.nft_attrs().collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(c_string(attrs[0].1), "fwnp");
        // "fwnp\0" is 5 bytes: the attribute is 9 long and padded to 12.
        assert_eq!(attrs[1].0, NFTA_CHAIN_HOOK);
        assert_eq!(
            Attrs::new(attrs[1].1)
                .find(NFTA_HOOK_HOOKNUM)
                .and_then(be_u32),
            Some(2)
        );
    }

    #[test]
    fn walker_never_reads_past_a_lying_length() {
        // Claims 200 bytes in an 8-byte buffer.
        let buf = [200u8, 0, 1, 0, 1, 2, 3, 4];
        assert_eq!(Attrs::new(&buf).count(), 0);
        // Claims a length shorter than its own header.
        let buf = [2u8, 0, 1, 0];
        assert_eq!(Attrs::new(&buf).count(), 0);
        let buf = [0xffu8; 20];
        assert_eq!(messages(&buf).count(), 0);
    }

    /// Writes messages `seqs`, each with an attribute of `size` bytes and its number.
    fn write_messages(b: &mut Builder, seqs: std::ops::Range<u32>, size: usize) {
        let data = vec![0xa5u8; size];
        for seq in seqs {
            let m = b.begin_nft(1, 0, seq, 1);
            b.put(1, &data);
            b.put_u32(2, seq);
            b.end_msg(m);
        }
    }

    #[test]
    fn a_large_datagram_is_written_into_a_mapping_with_the_same_bytes() {
        // 3 MiB of messages: on the heap, and in a builder that reserves 2 MiB after its first
        // message, so that it is mapped and grows its mapping once written past it.
        const MESSAGES: u32 = 3 * 1024;
        let mut heap = Builder::new();
        write_messages(&mut heap, 0..MESSAGES, 1021);
        let mut mapped = Builder::new();
        write_messages(&mut mapped, 0..1, 1021);
        mapped.reserve(2 * MAPPED_AT);
        assert!(matches!(mapped.buf, Bytes::Mapped { .. }));
        write_messages(&mut mapped, 1..MESSAGES, 1021);
        assert!(matches!(mapped.buf, Bytes::Mapped { .. }));
        assert!(mapped.len() > 2 * MAPPED_AT, "written past the reservation");
        assert_eq!(mapped.as_bytes(), heap.as_bytes());
        assert_eq!(messages(mapped.as_bytes()).count(), MESSAGES as usize);
        assert_eq!(mapped.into_bytes(), heap.into_bytes());
        // A small reservation stays on the heap.
        let mut small = Builder::new();
        small.reserve(MAPPED_AT / 2);
        assert!(matches!(small.buf, Bytes::Heap(_)));
    }

    #[test]
    fn nest_end_reports_overflow() {
        let mut b = Builder::new();
        let nest = b.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
        b.put(1, &[0u8; 70_000]);
        assert!(!b.nest_end(nest));
    }

    #[test]
    fn parses_extended_ack() {
        // An nlmsgerr for seq 9 with errno ENOENT, capped, with a message and an offset.
        let mut b = Builder::new();
        let start = b.buf.len();
        b.buf.extend_from_slice(&0u32.to_ne_bytes());
        b.buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.buf
            .extend_from_slice(&(0x100u16 | NLM_F_ACK_TLVS).to_ne_bytes());
        b.buf.extend_from_slice(&0u32.to_ne_bytes());
        b.buf.extend_from_slice(&0u32.to_ne_bytes());
        b.buf.extend_from_slice(&(-2i32).to_ne_bytes());
        // Echoed header: length 100, type, flags, seq 9, pid.
        b.buf.extend_from_slice(&100u32.to_ne_bytes());
        b.buf.extend_from_slice(&0u32.to_ne_bytes());
        b.buf.extend_from_slice(&9u32.to_ne_bytes());
        b.buf.extend_from_slice(&0u32.to_ne_bytes());
        b.put_str(NLMSGERR_ATTR_MSG, "no such table");
        b.put(NLMSGERR_ATTR_OFFS, &20u32.to_ne_bytes());
        b.end_msg(start);
        let bytes = b.into_bytes();
        let msg = messages(&bytes).next().expect("one message");
        let ack = parse_ack(&msg).expect("an ack");
        assert_eq!(ack.errno, 2);
        assert_eq!(ack.seq, 9);
        assert_eq!(ack.message.as_deref(), Some("no such table"));
        assert_eq!(ack.bad_attr_offset, Some(20));
    }
}
