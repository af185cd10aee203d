//! Layouts (the desired skeleton of our table) and the netlink messages that create them.

use std::net::IpAddr;

use fwnp_proto::message::{PortRange, Prefix, Protocol};

use crate::Error;
use crate::key::{ALL_SETS, Family, SetId, SetKind, prefix_bounds};
use crate::nl::*;

/// What the gateway does with a new connection towards a protected network that no lease admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Refuse {
    /// Drop silently.
    #[default]
    Drop,
    /// Answer: a TCP reset for TCP, ICMP / ICMPv6 "administratively prohibited" otherwise.
    Reject,
}

/// The gateway's table: guards new connections towards protected networks on the forward hook.
///
/// A packet is guarded when its destination lies in one of `protected` (if any are given) and
/// it arrived on one of `inbound_interfaces` (if any are given); at least one of the two lists
/// must be non-empty. Guarded new connections pass only if a lease admits them; established and
/// related traffic always passes; traffic that is not guarded is not touched (the chain's
/// policy is accept, so the table never takes over traffic it was not configured to protect).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayLayout {
    /// Table name in family `inet`; the crate owns this table entirely. Default `fwnp`.
    pub table: String,
    /// Destinations this filter guards.
    pub protected: Vec<Prefix>,
    /// Interfaces (by name) whose arriving traffic this filter guards.
    pub inbound_interfaces: Vec<String>,
    /// What happens to a guarded new connection no lease admits.
    pub refuse: Refuse,
}

impl Default for GatewayLayout {
    fn default() -> Self {
        GatewayLayout {
            table: "fwnp".into(),
            protected: Vec::new(),
            inbound_interfaces: Vec::new(),
            refuse: Refuse::Drop,
        }
    }
}

/// Whether the host table enforces or only observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HostMode {
    /// New inbound connections that no lease or always-allowed entry admits are dropped.
    #[default]
    Enforce,
    /// They are counted (counter `unmatched`, see [`crate::Netfilter::counters`]) and accepted.
    Monitor,
}

/// Inbound traffic the host table always admits (an administration segment, for example).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AlwaysAllowed {
    /// Source prefix; length 0 means any source of that family.
    pub remote: Prefix,
    /// Only this protocol; `None`: any protocol.
    pub protocol: Option<Protocol>,
    /// Only these destination ports; `None`: any port.
    pub ports: Option<PortRange>,
}

/// The host's table on the input hook: loopback, established and related traffic, IPv6
/// neighbour discovery and the always-allowed entries pass; other new inbound connections
/// pass only if they match a mirrored lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostLayout {
    /// Table name in family `inet`; the crate owns this table entirely. Default `fwnp_host`.
    pub table: String,
    /// Enforce or monitor.
    pub mode: HostMode,
    /// Entries that always pass.
    pub always_allowed: Vec<AlwaysAllowed>,
    /// Locally generated traffic sent to another address that the host answers itself.
    pub redirects: Vec<LocalRedirect>,
}

/// Locally generated packets to `to`, `protocol` port `port` are sent to the host itself on
/// loopback port `local_port` instead (a destination NAT on the output hook, so that only the
/// host's own traffic is concerned). NAT-PMP and PCP clients send their requests to the default
/// gateway's port 5351; the host agent answers them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalRedirect {
    /// The destination matched.
    pub to: IpAddr,
    /// The transport protocol matched (TCP or UDP).
    pub protocol: Protocol,
    /// The destination port matched.
    pub port: u16,
    /// The port on loopback (127.0.0.1 or ::1) the packets go to instead.
    pub local_port: u16,
}

impl Default for HostLayout {
    fn default() -> Self {
        HostLayout {
            table: "fwnp_host".into(),
            mode: HostMode::Enforce,
            always_allowed: Vec::new(),
            redirects: Vec::new(),
        }
    }
}

/// The desired skeleton of our table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The gateway's forward filter.
    Gateway(GatewayLayout),
    /// The host's input filter.
    Host(HostLayout),
}

impl Layout {
    /// The name of our table (family `inet`).
    pub fn table(&self) -> &str {
        match self {
            Layout::Gateway(g) => &g.table,
            Layout::Host(h) => &h.table,
        }
    }

    /// The names of the named counters this layout creates (readable with
    /// [`crate::Netfilter::counters`]).
    pub fn counter_names(&self) -> &'static [&'static str] {
        match self {
            Layout::Gateway(_) => &["established", "accepted", "refused"],
            Layout::Host(_) => &["established", "always_allowed", "accepted", "unmatched"],
        }
    }
}

/// Every counter name any layout creates.
pub(crate) const ALL_COUNTER_NAMES: [&str; 5] = [
    "established",
    "accepted",
    "refused",
    "always_allowed",
    "unmatched",
];

// Registers: NFT_REG_1 is 16 bytes wide and shares its storage with NFT_REG32_00..03.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG32_00: u32 = 8;

const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_IIFNAME: u32 = 6;
const NFT_PAYLOAD_NETWORK: u32 = 1;
const NFT_PAYLOAD_TRANSPORT: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CT_STATE: u32 = 0;
const CT_STATE_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: u32 = (-3i32) as u32;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
/// The table belongs to the netlink socket that created (or claimed) it: no other socket may
/// change or delete it, and a flush of the whole ruleset passes it by.
pub(crate) const NFT_TABLE_F_OWNER: u32 = 0x2;
/// The table stays (elements and their timeouts included) when its owner's socket closes;
/// another socket may then claim it (kernel 6.9 and later).
pub(crate) const NFT_TABLE_F_PERSIST: u32 = 0x4;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// Destination NAT's priority (`dstnat`, NF_IP_PRI_NAT_DST).
const NF_PRI_NAT_DST: i32 = -100;
/// The redirect's port comes from a register (NF_NAT_RANGE_PROTO_SPECIFIED).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const IPPROTO_UDP: u8 = 17;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_CONCAT: u32 = 0x80;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
const IFNAMSIZ: usize = 16;

/// What the table must look like once applied: checked by reading it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expected {
    /// Chains in creation order with their number of rules.
    pub(crate) chains: Vec<(String, usize)>,
    pub(crate) sets: Vec<&'static str>,
    pub(crate) counters: Vec<&'static str>,
    /// Base chains' hook, priority, policy and type; `None` for regular chains.
    pub(crate) chain_props: Vec<(String, Option<ChainProps>)>,
    /// Every rule: its chain and the contents of its expression list.
    pub(crate) rules: Vec<(String, Vec<u8>)>,
    /// Every set: name, flags, key length.
    pub(crate) set_props: Vec<(&'static str, u32, u32)>,
}

/// What makes a base chain: where it hooks and what it does with what no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainProps {
    pub(crate) hooknum: u32,
    pub(crate) priority: u32,
    pub(crate) policy: u32,
}

impl Expected {
    pub(crate) fn empty() -> Self {
        Expected {
            chains: Vec::new(),
            sets: Vec::new(),
            counters: Vec::new(),
            chain_props: Vec::new(),
            rules: Vec::new(),
            set_props: Vec::new(),
        }
    }
}

/// Which message of a transaction this is, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    DeleteTable,
    CreateTable,
    CreateCounter,
    CreateSet,
    CreateChain,
    CreateRule,
    AddElement,
    RenewElement,
    RemoveElement,
    ReadGeneration,
}

impl Op {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::DeleteTable => "delete table",
            Op::CreateTable => "create table",
            Op::CreateCounter => "create counter",
            Op::CreateSet => "create set",
            Op::CreateChain => "create chain",
            Op::CreateRule => "create rule",
            Op::AddElement => "add element",
            Op::RenewElement => "renew element",
            Op::RemoveElement => "remove element",
            Op::ReadGeneration => "read the ruleset generation",
        }
    }
}

/// Hands out sequence numbers and remembers which message each one belongs to.
pub(crate) trait Sequencer {
    fn next(&mut self, op: Op) -> u32;
}

fn check_name(what: &str, name: &str, max: usize) -> Result<(), Error> {
    if name.is_empty() || name.len() > max || name.contains('\0') {
        return Err(Error::InvalidLayout(format!(
            "{what} {name:?} must be 1 to {max} bytes without NUL"
        )));
    }
    Ok(())
}

fn validate_prefix(prefix: &Prefix) -> Result<(), Error> {
    let max = match prefix.addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    if prefix.len > max {
        return Err(Error::InvalidLayout(format!(
            "prefix {prefix} is longer than {max} bits"
        )));
    }
    Ok(())
}

/// Checks a layout before anything is sent.
pub(crate) fn validate(layout: &Layout) -> Result<(), Error> {
    check_name("table name", layout.table(), 255)?;
    match layout {
        Layout::Gateway(g) => {
            if g.protected.is_empty() && g.inbound_interfaces.is_empty() {
                return Err(Error::InvalidLayout(
                    "a gateway layout needs protected prefixes and/or inbound interfaces".into(),
                ));
            }
            for prefix in &g.protected {
                validate_prefix(prefix)?;
            }
            for name in &g.inbound_interfaces {
                check_name("interface name", name, IFNAMSIZ - 1)?;
            }
        }
        Layout::Host(h) => {
            for redirect in &h.redirects {
                if !matches!(redirect.protocol, Protocol::Tcp | Protocol::Udp)
                    || redirect.port == 0
                    || redirect.local_port == 0
                {
                    return Err(Error::InvalidLayout(format!(
                        "a redirect is of TCP or UDP to a non-zero port, not {}/{} to {}",
                        redirect.protocol, redirect.port, redirect.local_port
                    )));
                }
            }
            for entry in &h.always_allowed {
                validate_prefix(&entry.remote)?;
                if let Some(ports) = entry.ports
                    && ports.is_empty()
                {
                    return Err(Error::InvalidLayout(format!("reversed port range {ports}")));
                }
            }
        }
    }
    Ok(())
}

/// The number the kernel reports a 32-bit register by: one that starts a 16-byte register is
/// named as that (NFT_REG32_04 is NFT_REG_2). Sending the same name lets the read-back compare
/// bytes.
fn register_name(reg32: u32) -> u32 {
    let offset = reg32.saturating_sub(REG32_00);
    if offset.is_multiple_of(4) {
        REG_1 + offset / 4
    } else {
        reg32
    }
}

/// One rule under construction: a list of expressions.
struct RuleBuilder<'b> {
    b: &'b mut Builder,
}

impl RuleBuilder<'_> {
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Builder)) {
        let elem = self.b.nest_start(NFTA_LIST_ELEM);
        self.b.put_str(NFTA_EXPR_NAME, name);
        let nest = self.b.nest_start(NFTA_EXPR_DATA);
        data(self.b);
        self.b.nest_end(nest);
        self.b.nest_end(elem);
    }

    fn meta(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            b.put_u32(1, dreg); // NFTA_META_DREG
            b.put_u32(2, key); // NFTA_META_KEY
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |b| {
            b.put_u32(1, dreg); // NFTA_PAYLOAD_DREG
            b.put_u32(2, base);
            b.put_u32(3, offset);
            b.put_u32(4, len);
        });
    }

    fn cmp(&mut self, op: u32, sreg: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            b.put_u32(1, sreg); // NFTA_CMP_SREG
            b.put_u32(2, op);
            b.put_data_value(3, data); // NFTA_CMP_DATA
        });
    }

    fn bitwise_and(&mut self, reg: u32, mask: &[u8]) {
        let zero = vec![0u8; mask.len()];
        self.expr("bitwise", |b| {
            b.put_u32(1, reg); // NFTA_BITWISE_SREG
            b.put_u32(2, reg); // NFTA_BITWISE_DREG
            b.put_u32(3, mask.len() as u32);
            b.put_data_value(4, mask); // NFTA_BITWISE_MASK
            b.put_data_value(5, &zero); // NFTA_BITWISE_XOR
        });
    }

    fn nfproto(&mut self, family: Family) {
        self.meta(NFT_META_NFPROTO, REG_1);
        let value = match family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        };
        self.cmp(NFT_CMP_EQ, REG_1, &[value]);
    }

    fn l4proto(&mut self, protocol: u8) {
        self.meta(NFT_META_L4PROTO, REG_1);
        self.cmp(NFT_CMP_EQ, REG_1, &[protocol]);
    }

    /// Loads an address (offset within the IP header) and matches it against a prefix.
    fn addr_in(&mut self, prefix: &Prefix, source: bool) {
        let (family, offset, len) = match (prefix.addr, source) {
            (IpAddr::V4(_), true) => (Family::V4, 12, 4),
            (IpAddr::V4(_), false) => (Family::V4, 16, 4),
            (IpAddr::V6(_), true) => (Family::V6, 8, 16),
            (IpAddr::V6(_), false) => (Family::V6, 24, 16),
        };
        self.nfproto(family);
        let bits = u32::from(prefix.len);
        if bits == 0 {
            return;
        }
        self.payload(NFT_PAYLOAD_NETWORK, offset, len, REG_1);
        let (network, _) = prefix_bounds(prefix);
        let network = match network {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        if bits < len * 8 {
            let mask: Vec<u8> = (0..len)
                .map(|i| {
                    let start = i * 8;
                    if bits >= start + 8 {
                        0xff
                    } else if bits <= start {
                        0
                    } else {
                        0xffu8 << (8 - (bits - start))
                    }
                })
                .collect();
            self.bitwise_and(REG_1, &mask);
        }
        self.cmp(NFT_CMP_EQ, REG_1, &network);
    }

    fn dport_in(&mut self, ports: PortRange) {
        self.payload(NFT_PAYLOAD_TRANSPORT, 2, 2, REG_1);
        if ports.first == ports.last {
            self.cmp(NFT_CMP_EQ, REG_1, &ports.first.to_be_bytes());
        } else {
            // Big-endian bytes compare like the numbers they encode.
            self.cmp(NFT_CMP_GTE, REG_1, &ports.first.to_be_bytes());
            self.cmp(NFT_CMP_LTE, REG_1, &ports.last.to_be_bytes());
        }
    }

    fn ct_established_or_related(&mut self) {
        self.expr("ct", |b| {
            b.put_u32(1, REG_1); // NFTA_CT_DREG
            b.put_u32(2, NFT_CT_STATE);
        });
        self.bitwise_and(REG_1, &CT_STATE_ESTABLISHED_RELATED.to_ne_bytes());
        self.cmp(NFT_CMP_NEQ, REG_1, &0u32.to_ne_bytes());
    }

    fn iifname(&mut self, name: &str) {
        self.meta(NFT_META_IIFNAME, REG_1);
        let mut bytes = [0u8; IFNAMSIZ];
        for (slot, byte) in bytes.iter_mut().zip(name.as_bytes()) {
            *slot = *byte;
        }
        self.cmp(NFT_CMP_EQ, REG_1, &bytes);
    }

    /// `<family> daddr . meta l4proto . th dport [. <family> saddr] @set`
    fn lookup(&mut self, set: SetId) {
        let (daddr, saddr, len) = match set.family {
            Family::V4 => (16, 12, 4u32),
            Family::V6 => (24, 8, 16u32),
        };
        // Registers after the address: one 32-bit register per 4 bytes of address.
        let proto_reg = REG32_00 + len / 4;
        self.nfproto(set.family);
        self.payload(NFT_PAYLOAD_NETWORK, daddr, len, REG_1);
        self.meta(NFT_META_L4PROTO, register_name(proto_reg));
        self.payload(NFT_PAYLOAD_TRANSPORT, 2, 2, register_name(proto_reg + 1));
        if set.kind == SetKind::Range {
            self.payload(
                NFT_PAYLOAD_NETWORK,
                saddr,
                len,
                register_name(proto_reg + 2),
            );
        }
        self.expr("lookup", |b| {
            b.put_str(1, set.name()); // NFTA_LOOKUP_SET
            b.put_u32(2, REG_1); // NFTA_LOOKUP_SREG
            b.put_u32(4, set.transaction_id()); // NFTA_LOOKUP_SET_ID
        });
    }

    fn counter(&mut self, name: &str) {
        self.expr("objref", |b| {
            b.put_u32(1, NFT_OBJECT_COUNTER); // NFTA_OBJREF_IMM_TYPE
            b.put_str(2, name); // NFTA_OBJREF_IMM_NAME
        });
    }

    fn verdict(&mut self, code: u32, chain: Option<&str>) {
        self.expr("immediate", |b| {
            b.put_u32(1, REG_VERDICT); // NFTA_IMMEDIATE_DREG
            let data = b.nest_start(2); // NFTA_IMMEDIATE_DATA
            let verdict = b.nest_start(NFTA_DATA_VERDICT);
            b.put_u32(NFTA_VERDICT_CODE, code);
            if let Some(chain) = chain {
                b.put_str(NFTA_VERDICT_CHAIN, chain);
            }
            b.nest_end(verdict);
            b.nest_end(data);
        });
    }

    /// Sends the packet to the host itself, on loopback port `port`.
    fn redirect_to_port(&mut self, port: u16) {
        self.expr("immediate", |b| {
            b.put_u32(1, REG_1); // NFTA_IMMEDIATE_DREG
            b.put_data_value(2, &port.to_be_bytes()); // NFTA_IMMEDIATE_DATA
        });
        self.expr("redir", |b| {
            b.put_u32(1, REG_1); // NFTA_REDIR_REG_PROTO_MIN
            b.put_u32(2, REG_1); // NFTA_REDIR_REG_PROTO_MAX
            b.put_u32(3, NF_NAT_RANGE_PROTO_SPECIFIED); // NFTA_REDIR_FLAGS
        });
    }

    fn reject(&mut self, kind: u32, code: Option<u8>) {
        self.expr("reject", |b| {
            b.put_u32(1, kind); // NFTA_REJECT_TYPE
            if let Some(code) = code {
                b.put(2, &[code]); // NFTA_REJECT_ICMP_CODE
            }
        });
    }
}

/// Writes the messages of a table into a batch.
struct TableWriter<'a, S: Sequencer> {
    b: &'a mut Builder,
    seq: &'a mut S,
    table: &'a str,
    table_flags: u32,
    expected: Expected,
}

impl<S: Sequencer> TableWriter<'_, S> {
    fn table(&mut self) {
        let seq = self.seq.next(Op::CreateTable);
        let m = self.b.begin_nft(
            NFT_MSG_NEWTABLE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
        );
        self.b.put_str(NFTA_TABLE_NAME, self.table);
        self.b.put_u32(NFTA_TABLE_FLAGS, self.table_flags);
        self.b.end_msg(m);
    }

    fn counter(&mut self, name: &'static str) {
        let seq = self.seq.next(Op::CreateCounter);
        let m = self.b.begin_nft(
            NFT_MSG_NEWOBJ,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
        );
        self.b.put_str(NFTA_OBJ_TABLE, self.table);
        self.b.put_str(NFTA_OBJ_NAME, name);
        self.b.put_u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
        let data = self.b.nest_start(NFTA_OBJ_DATA);
        self.b.put_u64(NFTA_COUNTER_BYTES, 0);
        self.b.put_u64(NFTA_COUNTER_PACKETS, 0);
        self.b.nest_end(data);
        self.b.end_msg(m);
        self.expected.counters.push(name);
    }

    fn set(&mut self, set: SetId) {
        let seq = self.seq.next(Op::CreateSet);
        let m = self.b.begin_nft(
            NFT_MSG_NEWSET,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
        );
        self.b.put_str(NFTA_SET_TABLE, self.table);
        self.b.put_str(NFTA_SET_NAME, set.name());
        let flags = match set.kind {
            SetKind::Exact => NFT_SET_TIMEOUT,
            SetKind::Range => NFT_SET_TIMEOUT | NFT_SET_INTERVAL | NFT_SET_CONCAT,
        };
        self.b.put_u32(NFTA_SET_FLAGS, flags);
        self.b.put_u32(NFTA_SET_KEY_TYPE, set.key_type());
        self.b.put_u32(NFTA_SET_KEY_LEN, set.key_len() as u32);
        self.b.put_u32(NFTA_SET_ID, set.transaction_id());
        if set.kind == SetKind::Range {
            // The interval (pipapo) backend needs the length of each concatenated field; the
            // hash backend refuses them (and nft sends none), see notes on CONCAT.
            let desc = self.b.nest_start(NFTA_SET_DESC);
            let concat = self.b.nest_start(NFTA_SET_DESC_CONCAT);
            for len in set.field_lens() {
                let elem = self.b.nest_start(NFTA_LIST_ELEM);
                self.b.put_u32(NFTA_SET_FIELD_LEN, len);
                self.b.nest_end(elem);
            }
            self.b.nest_end(concat);
            self.b.nest_end(desc);
        }
        self.b.end_msg(m);
        self.expected.sets.push(set.name());
        self.expected
            .set_props
            .push((set.name(), flags, set.key_len() as u32));
    }

    fn chain(&mut self, name: &str, hook: Option<u32>) {
        self.chain_of(name, hook, 0, "filter");
    }

    fn chain_of(&mut self, name: &str, hook: Option<u32>, priority: i32, kind: &str) {
        let seq = self.seq.next(Op::CreateChain);
        let m = self.b.begin_nft(
            NFT_MSG_NEWCHAIN,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
        );
        self.b.put_str(NFTA_CHAIN_TABLE, self.table);
        self.b.put_str(NFTA_CHAIN_NAME, name);
        if let Some(hooknum) = hook {
            let nest = self.b.nest_start(NFTA_CHAIN_HOOK);
            self.b.put_u32(NFTA_HOOK_HOOKNUM, hooknum);
            self.b.put_u32(NFTA_HOOK_PRIORITY, priority as u32);
            self.b.nest_end(nest);
            self.b.put_u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            self.b.put_str(NFTA_CHAIN_TYPE, kind);
        }
        self.b.end_msg(m);
        self.expected.chains.push((name.to_string(), 0));
        let props = hook.map(|hooknum| ChainProps {
            hooknum,
            priority: priority as u32,
            policy: NF_ACCEPT,
        });
        self.expected.chain_props.push((name.to_string(), props));
    }

    fn rule(&mut self, chain: &str, exprs: impl FnOnce(&mut RuleBuilder<'_>)) {
        let seq = self.seq.next(Op::CreateRule);
        let m = self.b.begin_nft(
            NFT_MSG_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | 0x800, // NLM_F_APPEND
            seq,
            NFPROTO_INET,
        );
        self.b.put_str(NFTA_RULE_TABLE, self.table);
        self.b.put_str(NFTA_RULE_CHAIN, chain);
        let list = self.b.nest_start(NFTA_RULE_EXPRESSIONS);
        exprs(&mut RuleBuilder { b: self.b });
        self.b.nest_end(list);
        let contents = self.b.as_bytes().get(list + 4..).unwrap_or(&[]).to_vec();
        self.expected.rules.push((chain.to_string(), contents));
        self.b.end_msg(m);
        if let Some(entry) = self
            .expected
            .chains
            .iter_mut()
            .find(|(name, _)| name == chain)
        {
            entry.1 += 1;
        }
    }

    fn lease_rules(&mut self, chain: &str) {
        for set in ALL_SETS {
            self.rule(chain, |r| {
                r.lookup(set);
                r.counter("accepted");
                r.verdict(NF_ACCEPT, None);
            });
        }
    }

    fn established_rule(&mut self, chain: &str) {
        self.rule(chain, |r| {
            r.ct_established_or_related();
            r.counter("established");
            r.verdict(NF_ACCEPT, None);
        });
    }
}

/// Appends the creation of the whole table (after the caller's delete) to a batch, and returns
/// what reading it back must show. `table_flags`: the table's NFTA_TABLE_FLAGS (ownership).
pub(crate) fn write_table<S: Sequencer>(
    layout: &Layout,
    b: &mut Builder,
    seq: &mut S,
    table_flags: u32,
) -> Result<Expected, Error> {
    validate(layout)?;
    let mut w = TableWriter {
        b,
        seq,
        table: layout.table(),
        table_flags,
        expected: Expected::empty(),
    };
    w.table();
    for name in layout.counter_names() {
        w.counter(name);
    }
    for set in ALL_SETS {
        w.set(set);
    }
    match layout {
        Layout::Gateway(g) => write_gateway(&mut w, g),
        Layout::Host(h) => write_host(&mut w, h),
    }
    Ok(w.expected)
}

fn write_gateway<S: Sequencer>(w: &mut TableWriter<'_, S>, g: &GatewayLayout) {
    // `guard` decides guarded traffic; `forward` (the base chain) sends only guarded traffic
    // there, and everything else falls through to the accept policy.
    w.chain("forward", Some(NF_INET_FORWARD));
    w.chain("guard", None);
    let by_destination = !g.inbound_interfaces.is_empty() && !g.protected.is_empty();
    if by_destination {
        w.chain("by_destination", None);
    }
    w.established_rule("forward");
    if g.inbound_interfaces.is_empty() {
        for prefix in &g.protected {
            w.rule("forward", |r| {
                r.addr_in(prefix, false);
                r.verdict(NFT_JUMP, Some("guard"));
            });
        }
    } else {
        let target = if by_destination {
            "by_destination"
        } else {
            "guard"
        };
        for name in &g.inbound_interfaces {
            w.rule("forward", |r| {
                r.iifname(name);
                r.verdict(NFT_JUMP, Some(target));
            });
        }
        if by_destination {
            for prefix in &g.protected {
                w.rule("by_destination", |r| {
                    r.addr_in(prefix, false);
                    r.verdict(NFT_JUMP, Some("guard"));
                });
            }
        }
    }
    w.lease_rules("guard");
    match g.refuse {
        Refuse::Drop => w.rule("guard", |r| {
            r.counter("refused");
            r.verdict(NF_DROP, None);
        }),
        Refuse::Reject => {
            w.rule("guard", |r| {
                r.l4proto(IPPROTO_TCP);
                r.counter("refused");
                r.reject(NFT_REJECT_TCP_RST, None);
            });
            w.rule("guard", |r| {
                r.counter("refused");
                r.reject(
                    NFT_REJECT_ICMPX_UNREACH,
                    Some(NFT_REJECT_ICMPX_ADMIN_PROHIBITED),
                );
            });
        }
    }
}

fn write_host<S: Sequencer>(w: &mut TableWriter<'_, S>, h: &HostLayout) {
    w.chain("input", Some(NF_INET_LOCAL_IN));
    w.rule("input", |r| {
        r.iifname("lo");
        r.verdict(NF_ACCEPT, None);
    });
    w.established_rule("input");
    // IPv6 does not work without neighbour discovery and router advertisements (ICMPv6 types
    // 133 to 137), which conntrack does not see as part of any connection.
    w.rule("input", |r| {
        r.nfproto(Family::V6);
        r.l4proto(IPPROTO_ICMPV6);
        r.payload(NFT_PAYLOAD_TRANSPORT, 0, 1, REG_1);
        r.cmp(NFT_CMP_GTE, REG_1, &[133]);
        r.cmp(NFT_CMP_LTE, REG_1, &[137]);
        r.verdict(NF_ACCEPT, None);
    });
    for entry in &h.always_allowed {
        w.rule("input", |r| {
            r.addr_in(&entry.remote, true);
            if let Some(protocol) = entry.protocol {
                r.l4proto(protocol.number());
            }
            if let Some(ports) = entry.ports {
                r.dport_in(ports);
            }
            r.counter("always_allowed");
            r.verdict(NF_ACCEPT, None);
        });
    }
    w.lease_rules("input");
    let verdict = match h.mode {
        HostMode::Enforce => NF_DROP,
        HostMode::Monitor => NF_ACCEPT,
    };
    w.rule("input", |r| {
        r.counter("unmatched");
        r.verdict(verdict, None);
    });
    if !h.redirects.is_empty() {
        w.chain_of("redirect", Some(NF_INET_LOCAL_OUT), NF_PRI_NAT_DST, "nat");
        for redirect in &h.redirects {
            let full = match redirect.to {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            w.rule("redirect", |r| {
                r.addr_in(
                    &Prefix {
                        addr: redirect.to,
                        len: full,
                    },
                    false,
                );
                r.l4proto(match redirect.protocol {
                    Protocol::Tcp => IPPROTO_TCP,
                    _ => IPPROTO_UDP,
                });
                r.dport_in(PortRange::single(redirect.port));
                r.redirect_to_port(redirect.local_port);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(u32, Vec<Op>);
    impl Sequencer for Counting {
        fn next(&mut self, op: Op) -> u32 {
            self.0 += 1;
            self.1.push(op);
            self.0
        }
    }

    fn prefix(s: &str, len: u8) -> Prefix {
        Prefix {
            addr: s.parse().unwrap(),
            len,
        }
    }

    #[test]
    fn gateway_layout_shape() {
        let layout = Layout::Gateway(GatewayLayout {
            protected: vec![prefix("10.1.0.0", 16), prefix("2001:db8:1::", 48)],
            inbound_interfaces: vec!["wan0".into()],
            refuse: Refuse::Reject,
            ..GatewayLayout::default()
        });
        let mut b = Builder::new();
        let mut seq = Counting(0, Vec::new());
        let expected = write_table(&layout, &mut b, &mut seq, 0).unwrap();
        assert_eq!(
            expected.chains,
            vec![
                ("forward".to_string(), 2),
                ("guard".to_string(), 6),
                ("by_destination".to_string(), 2)
            ]
        );
        assert_eq!(expected.sets, vec!["lease4", "lease6", "range4", "range6"]);
        // One sequence number per message, each message once in the datagram.
        let count = messages(b.as_bytes()).count();
        assert_eq!(count as u32, seq.0);
        assert_eq!(seq.1.iter().filter(|op| **op == Op::CreateRule).count(), 10);
    }

    #[test]
    fn host_layout_counts_rules() {
        let layout = Layout::Host(HostLayout {
            mode: HostMode::Monitor,
            always_allowed: vec![AlwaysAllowed {
                remote: prefix("192.0.2.0", 24),
                protocol: Some(Protocol::Tcp),
                ports: Some(PortRange::single(22)),
            }],
            ..HostLayout::default()
        });
        let mut b = Builder::new();
        let expected = write_table(&layout, &mut b, &mut Counting(0, Vec::new()), 0).unwrap();
        // lo, established, ICMPv6 ND, 1 always-allowed, 4 lease lookups, unmatched.
        assert_eq!(expected.chains, vec![("input".to_string(), 9)]);
        assert_eq!(
            expected.counters,
            vec!["established", "always_allowed", "accepted", "unmatched"]
        );
    }

    #[test]
    fn registers_are_named_as_the_kernel_reports_them() {
        assert_eq!(register_name(8), 1);
        assert_eq!(register_name(9), 9);
        assert_eq!(register_name(12), 2);
        assert_eq!(register_name(14), 14);
        assert_eq!(register_name(16), 3);
    }

    #[test]
    fn refuses_bad_layouts() {
        let empty = Layout::Gateway(GatewayLayout::default());
        assert!(matches!(validate(&empty), Err(Error::InvalidLayout(_))));
        let long_if = Layout::Gateway(GatewayLayout {
            inbound_interfaces: vec!["a-very-long-interface".into()],
            ..GatewayLayout::default()
        });
        assert!(matches!(validate(&long_if), Err(Error::InvalidLayout(_))));
        let bad_prefix = Layout::Gateway(GatewayLayout {
            protected: vec![prefix("10.0.0.0", 40)],
            ..GatewayLayout::default()
        });
        assert!(matches!(
            validate(&bad_prefix),
            Err(Error::InvalidLayout(_))
        ));
    }
}
