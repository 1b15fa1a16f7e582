//! The rule tries: one LPM trie per address family, shared by all agents.
//!
//! A key is `(table, protocol, direction, port, address prefix)`, compared bit by bit from the
//! first byte. Everything before the address is always inside the prefix, so a lookup only ever
//! meets entries of the same table (one agent's), protocol, direction and port bucket; the address part is the only one
//! the longest-prefix match ranges over. "Every port" is the bucket of port 0: a decision looks
//! up the destination port's bucket and the every-port bucket, two lookups and no loop, and a
//! deny found in either wins (see [`crate::decision::combine`]).
//!
//! Byte order: `port` and `addr` are network order, exactly as the kernel hands them to the
//! programs in `bpf_sock_addr.user_port` / `user_ip4` / `user_ip6`. `table` is host order; it is
//! matched whole, so its byte order never changes which entries match.

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// The port bucket of rules that hold for every port.
pub const ANY_PORT: [u8; 2] = [0, 0];

/// Set in the id of a rule table that has no entry in the every-port bucket (of any direction
/// or protocol): the programs then skip that lookup, which could only miss. A table without the
/// bit (every table written before the bit existed included) is looked up in both buckets, so
/// an every-port deny is never skipped.
pub const TABLE_NO_EVERY_PORT: u32 = 1 << 31;

/// Whether a table's every-port bucket can hold an entry (see [`TABLE_NO_EVERY_PORT`]).
pub const fn has_every_port(table: u32) -> bool {
    table & TABLE_NO_EVERY_PORT == 0
}

/// `dir` of a rule about what the agent sends or connects to: `port` and `addr` are the peer's.
pub const DIR_OUT: u8 = 0;
/// `dir` of a rule about what comes in (an `inbound` grant): `port` is the agent's own port,
/// `addr` the sender's. Before this field existed it was padding, always zero: rules pinned by
/// an older daemon read as outbound, which is what they were.
pub const DIR_IN: u8 = 1;

/// Bits of a key before the address: table (32), protocol (8), direction (8), port (16).
pub const HEAD_BITS: u32 = 64;

/// `prefix_len` of a key whose address part is `addr_bits` long.
pub const fn prefix_len(addr_bits: u8) -> u32 {
    HEAD_BITS + addr_bits as u32
}

/// Data part of an IPv4 rule key (the LPM key is `prefix_len: u32` followed by this).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule4 {
    pub table: u32,
    pub proto: u8,
    /// [`DIR_OUT`] or [`DIR_IN`]; inside every prefix.
    pub dir: u8,
    /// The peer's port (outbound) or the agent's own (inbound), network order; [`ANY_PORT`] for
    /// every port.
    pub port: [u8; 2],
    /// The destination (outbound) or sender (inbound) address, network order.
    pub addr: [u8; 4],
}

impl Rule4 {
    /// `prefix_len` of a key that names one address (what a decision looks up).
    pub const EXACT: u32 = prefix_len(32);

    /// An outbound key: `port` and `addr` are the destination's.
    pub const fn new(table: u32, proto: u8, port: [u8; 2], addr: [u8; 4]) -> Self {
        Self { table, proto, dir: DIR_OUT, port, addr }
    }

    /// An inbound key: `port` is the agent's own, `addr` the sender's.
    pub const fn incoming(table: u32, proto: u8, port: [u8; 2], addr: [u8; 4]) -> Self {
        Self { table, proto, dir: DIR_IN, port, addr }
    }
}

/// Data part of an IPv6 rule key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule6 {
    pub table: u32,
    pub proto: u8,
    /// [`DIR_OUT`] or [`DIR_IN`].
    pub dir: u8,
    /// Destination port, network order; [`ANY_PORT`] for every port.
    pub port: [u8; 2],
    /// Destination address, network order.
    pub addr: [u8; 16],
}

impl Rule6 {
    pub const EXACT: u32 = prefix_len(128);

    /// An outbound key: `port` and `addr` are the destination's.
    pub const fn new(table: u32, proto: u8, port: [u8; 2], addr: [u8; 16]) -> Self {
        Self { table, proto, dir: DIR_OUT, port, addr }
    }

    /// An inbound key: `port` is the agent's own, `addr` the sender's.
    pub const fn incoming(table: u32, proto: u8, port: [u8; 2], addr: [u8; 16]) -> Self {
        Self { table, proto, dir: DIR_IN, port, addr }
    }
}

/// Allowed: a rule value that allows, and a decision's verdict.
pub const VERDICT_ALLOW: u8 = 1;
/// Denied: a rule value that denies (an enforced deny), and a decision's verdict.
pub const VERDICT_DENY: u8 = 2;
/// A decision's verdict only, never a rule value: the rules deny it (`no_rule` or `forbidden`),
/// and it was let through because the agent, or the catalogue entry whose deny matched, is in
/// audit (dry-run) mode.
pub const VERDICT_WOULD_DENY: u8 = 3;
/// A rule value: a deny of a catalogue entry in audit mode matches (its `rule_id`), and no allow
/// of this bucket covers the address. Alone it lets nothing through: an audit deny never admits
/// what no allow grants.
pub const VERDICT_AUDIT_DENY: u8 = 4;
/// A rule value: a deny of a catalogue entry in audit mode matches (its `rule_id`), and an allow
/// of this bucket covers the address too: let through as `would_deny`, unless an enforced deny
/// of the other bucket matches.
pub const VERDICT_AUDIT_DENY_ALLOWED: u8 = 5;

/// Value of both rule tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Index of the rule in the daemon's compiled rule set, reported with each decision so the
    /// daemon can name the catalogue entry behind it.
    pub rule_id: u32,
    /// `VERDICT_ALLOW`, `VERDICT_DENY`, `VERDICT_AUDIT_DENY` or `VERDICT_AUDIT_DENY_ALLOWED`.
    /// Programs older than the audit values read those as no match: they fail closed.
    pub verdict: u8,
    pub _pad: [u8; 3],
}

impl RuleValue {
    pub const fn new(rule_id: u32, verdict: u8) -> Self {
        Self { rule_id, verdict, _pad: [0; 3] }
    }
}

/// An IPv4 destination as the kernel will route it: `0.0.0.0` reaches this host, so it is judged
/// as `127.0.0.1` (a rule set that denies loopback must not be walked around through it).
pub const fn effective_v4(addr: [u8; 4]) -> [u8; 4] {
    if u32::from_ne_bytes(addr) == 0 { [127, 0, 0, 1] } else { addr }
}

/// Where an IPv6 destination really goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest6 {
    /// An IPv4-mapped address (`::ffff:a.b.c.d`): the socket talks IPv4 to `a.b.c.d`, so the
    /// IPv4 rules judge it.
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Classifies an IPv6 destination: IPv4-mapped goes to the IPv4 rules, and `::` (which the
/// kernel routes to this host) is judged as `::1`.
pub const fn effective_v6(addr: [u8; 16]) -> Dest6 {
    let words = [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
    ];
    let last = [addr[12], addr[13], addr[14], addr[15]];
    if words[0] == 0 && words[1] == 0 {
        if addr[8] == 0 && addr[9] == 0 && addr[10] == 0xff && addr[11] == 0xff {
            return Dest6::V4(effective_v4(last));
        }
        if words[2] == 0 && u32::from_ne_bytes(last) == 0 {
            let mut loopback = [0u8; 16];
            loopback[15] = 1;
            return Dest6::V6(loopback);
        }
    }
    Dest6::V6(addr)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integers and byte arrays, explicit padding (checked by the layout
    // tests), so every bit pattern is valid.
    unsafe impl aya::Pod for super::Rule4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Rule6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleValue {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn key_layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Rule4>(), 12);
        assert_eq!(offset_of!(Rule4, proto), 4);
        assert_eq!(offset_of!(Rule4, port), 6);
        assert_eq!(offset_of!(Rule4, addr), 8);
        assert_eq!(size_of::<Rule6>(), 24);
        assert_eq!(offset_of!(Rule6, port), 6);
        assert_eq!(offset_of!(Rule6, addr), 8);
        assert_eq!(size_of::<RuleValue>(), 8);
        assert_eq!(offset_of!(RuleValue, verdict), 4);
        // The LPM trie stores the value right after the key data: it must stay aligned.
        assert_eq!(size_of::<Rule4>() % align_of::<RuleValue>(), 0);
        assert_eq!(size_of::<Rule6>() % align_of::<RuleValue>(), 0);
    }

    #[test]
    fn prefix_lengths_count_the_head_then_the_address() {
        assert_eq!(HEAD_BITS, 8 * offset_of!(Rule4, addr) as u32);
        assert_eq!(HEAD_BITS, 8 * offset_of!(Rule6, addr) as u32);
        assert_eq!(prefix_len(0), 64);
        assert_eq!(prefix_len(24), 88);
        assert_eq!(Rule4::EXACT, 96);
        assert_eq!(Rule6::EXACT, 192);
        assert_eq!(Rule4::EXACT as usize, 8 * size_of::<Rule4>());
        assert_eq!(Rule6::EXACT as usize, 8 * size_of::<Rule6>());
    }

    #[test]
    fn port_and_address_are_network_order() {
        let key = Rule4::new(7, PROTO_TCP, 5432u16.to_be_bytes(), [10, 0, 5, 12]);
        assert_eq!(key.port, [0x15, 0x38]);
        // SAFETY: Rule4 is repr(C) plain data of 12 bytes without padding.
        let bytes: [u8; 12] = unsafe { core::mem::transmute(key) };
        assert_eq!(&bytes[4..], &[PROTO_TCP, 0, 0x15, 0x38, 10, 0, 5, 12]);
        assert_eq!(&bytes[..4], &7u32.to_ne_bytes());
        let inbound: [u8; 12] =
            unsafe { core::mem::transmute(Rule4::incoming(7, PROTO_TCP, [0, 22], [10, 0, 0, 0])) };
        assert_eq!(&inbound[4..8], &[PROTO_TCP, DIR_IN, 0, 22], "the direction sits inside every prefix");
    }

    #[test]
    fn every_port_is_the_zero_bucket() {
        let any = Rule4::new(1, PROTO_UDP, ANY_PORT, [1, 2, 3, 4]);
        assert_eq!(any.port, 0u16.to_be_bytes());
    }

    #[test]
    fn unspecified_destinations_are_judged_as_loopback() {
        assert_eq!(effective_v4([0, 0, 0, 0]), [127, 0, 0, 1]);
        assert_eq!(effective_v4([10, 0, 0, 0]), [10, 0, 0, 0]);
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert_eq!(effective_v6([0; 16]), Dest6::V6(loopback));
    }

    #[test]
    fn v4_mapped_destinations_go_to_the_v4_rules() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[203, 0, 113, 9]);
        assert_eq!(effective_v6(mapped), Dest6::V4([203, 0, 113, 9]));
        mapped[12..].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(effective_v6(mapped), Dest6::V4([127, 0, 0, 1]));
        // IPv4-compatible (::a.b.c.d) and NAT64 addresses are IPv6 destinations.
        let mut compat = [0u8; 16];
        compat[12..].copy_from_slice(&[203, 0, 113, 9]);
        assert_eq!(effective_v6(compat), Dest6::V6(compat));
        let mut nat64 = [0u8; 16];
        nat64[..4].copy_from_slice(&[0x00, 0x64, 0xff, 0x9b]);
        nat64[12..].copy_from_slice(&[203, 0, 113, 9]);
        assert_eq!(effective_v6(nat64), Dest6::V6(nat64));
        // Only ::ffff:0:0/96 is mapped.
        let mut near = mapped;
        near[9] = 1;
        assert_eq!(effective_v6(near), Dest6::V6(near));
    }
}
