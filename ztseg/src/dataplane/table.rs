//! Compiling a rule set into rule-trie entries (pure; unit-tested without a kernel).
//!
//! The kernel answers "longest match in the destination-port bucket" and "longest match in the
//! every-port bucket" and lets a deny in either win. For that to equal "any matching deny wins",
//! a bucket must never hold an allow underneath a deny that covers it (the allow would be the
//! longer match and hide the deny), so such allows are dropped here: everything they would
//! admit is denied anyway.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use ztseg_common::rule::{DIR_IN, DIR_OUT, Rule4, Rule6, RuleValue, VERDICT_ALLOW, VERDICT_DENY, prefix_len};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// One rule-trie entry before encoding: a network for one protocol, direction and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Destination network (outbound) or sender network (inbound); host bits are ignored.
    pub net: IpNet,
    /// IP protocol number (`PROTO_TCP`, `PROTO_UDP`, ...).
    pub proto: u8,
    /// Destination port (outbound) or the agent's own port (inbound), host order; 0 means every
    /// port.
    pub port: u16,
    /// Whether this grants or refuses something coming in (an `inbound` rule).
    pub inbound: bool,
    pub verdict: Verdict,
    /// Reported with each decision this entry makes (index into the caller's rule list).
    pub rule_id: u32,
}

/// Trie entries of one table, ready to insert.
#[derive(Default)]
pub struct Encoded {
    pub v4: Vec<(Key<Rule4>, RuleValue)>,
    pub v6: Vec<(Key<Rule6>, RuleValue)>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Family-specific network, with IPv4-mapped IPv6 networks turned into the IPv4 networks they
/// mean (the kernel side judges `::ffff:a.b.c.d` destinations with the IPv4 rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Net {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

fn canonical(net: IpNet) -> Net {
    match net.trunc() {
        IpNet::V4(n) => Net::V4(n),
        IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
            Some(v4) if n.prefix_len() >= 96 => {
                Ipv4Net::new(v4, n.prefix_len() - 96).map_or(Net::V6(n), |m| Net::V4(m.trunc()))
            }
            _ => Net::V6(n),
        },
    }
}

/// The networks that contain `net`, `net` itself included.
fn supernets(net: Net) -> Vec<Net> {
    match net {
        Net::V4(n) => (0..=n.prefix_len())
            .filter_map(|p| Ipv4Net::new(n.addr(), p).ok().map(|s| Net::V4(s.trunc())))
            .collect(),
        Net::V6(n) => (0..=n.prefix_len())
            .filter_map(|p| Ipv6Net::new(n.addr(), p).ok().map(|s| Net::V6(s.trunc())))
            .collect(),
    }
}

/// Encodes `entries` as the trie entries of table `table`.
///
/// Duplicates collapse (a deny beats an allow for the same key; otherwise the first rule id
/// stays), and allows covered by a deny of the same protocol and port bucket are dropped.
pub fn encode(table: u32, entries: &[Entry]) -> Encoded {
    type Bucket = (bool, u8, u16);
    let mut unique: BTreeMap<(Bucket, Net), (Verdict, u32)> = BTreeMap::new();
    for e in entries {
        let key = ((e.inbound, e.proto, e.port), canonical(e.net));
        let candidate = (e.verdict, e.rule_id);
        unique
            .entry(key)
            .and_modify(|kept| {
                if e.verdict == Verdict::Deny && kept.0 == Verdict::Allow {
                    *kept = candidate;
                }
            })
            .or_insert(candidate);
    }
    let denies: BTreeSet<(Bucket, Net)> =
        unique.iter().filter(|(_, v)| v.0 == Verdict::Deny).map(|(k, _)| *k).collect();

    let mut out = Encoded::default();
    for ((bucket @ (inbound, proto, port), net), (verdict, rule_id)) in unique {
        if verdict == Verdict::Allow && supernets(net).into_iter().any(|s| denies.contains(&(bucket, s))) {
            continue;
        }
        let value =
            RuleValue::new(rule_id, if verdict == Verdict::Allow { VERDICT_ALLOW } else { VERDICT_DENY });
        let port = port.to_be_bytes();
        let dir = if inbound { DIR_IN } else { DIR_OUT };
        match net {
            Net::V4(n) => out.v4.push((
                Key::new(
                    prefix_len(n.prefix_len()),
                    Rule4 { table, proto, dir, port, addr: n.addr().octets() },
                ),
                value,
            )),
            Net::V6(n) => out.v6.push((
                Key::new(
                    prefix_len(n.prefix_len()),
                    Rule6 { table, proto, dir, port, addr: n.addr().octets() },
                ),
                value,
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ztseg_common::rule::{PROTO_TCP, PROTO_UDP};

    use super::*;

    fn entry(net: &str, proto: u8, port: u16, verdict: Verdict, rule_id: u32) -> Entry {
        Entry { net: net.parse().unwrap(), proto, port, inbound: false, verdict, rule_id }
    }

    fn data4(e: &(Key<Rule4>, RuleValue)) -> (u32, Rule4, RuleValue) {
        let key = e.0;
        let (p, d) = (key.prefix_len(), key.data());
        (p, d, e.1)
    }

    #[test]
    fn encodes_prefix_port_and_address() {
        let out = encode(5, &[entry("10.0.5.0/24", PROTO_TCP, 5432, Verdict::Allow, 0)]);
        assert_eq!(out.v4.len(), 1);
        let (prefix, data, value) = data4(&out.v4[0]);
        assert_eq!(prefix, 64 + 24);
        assert_eq!(data, Rule4::new(5, PROTO_TCP, [0x15, 0x38], [10, 0, 5, 0]));
        assert_eq!(value, RuleValue::new(0, VERDICT_ALLOW));
    }

    #[test]
    fn host_bits_are_cleared() {
        let out = encode(1, &[entry("10.0.5.77/24", PROTO_TCP, 80, Verdict::Allow, 0)]);
        assert_eq!(data4(&out.v4[0]).1.addr, [10, 0, 5, 0]);
    }

    #[test]
    fn every_port_is_port_zero() {
        let out = encode(1, &[entry("10.0.0.1/32", PROTO_UDP, 0, Verdict::Allow, 0)]);
        assert_eq!(data4(&out.v4[0]).1.port, [0, 0]);
    }

    #[test]
    fn v4_mapped_v6_rules_become_v4_rules() {
        let out = encode(1, &[entry("::ffff:10.1.0.0/112", PROTO_TCP, 443, Verdict::Allow, 3)]);
        assert!(out.v6.is_empty());
        let (prefix, data, _) = data4(&out.v4[0]);
        assert_eq!((prefix, data.addr), (64 + 16, [10, 1, 0, 0]));
    }

    #[test]
    fn v6_entries_keep_their_prefix() {
        let out = encode(2, &[entry("fd00:1::/64", PROTO_TCP, 0, Verdict::Deny, 1)]);
        let (key, value) = out.v6[0];
        assert_eq!(key.prefix_len(), 64 + 64);
        assert_eq!(key.data().addr[..8], [0xfd, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(value.verdict, VERDICT_DENY);
    }

    #[test]
    fn an_allow_under_a_same_bucket_deny_is_dropped() {
        let out = encode(
            1,
            &[
                entry("10.0.0.0/8", PROTO_TCP, 443, Verdict::Deny, 0),
                entry("10.1.2.3/32", PROTO_TCP, 443, Verdict::Allow, 1),
                // Another port: its own bucket, kept (the kernel's two-bucket check handles it).
                entry("10.1.2.3/32", PROTO_TCP, 80, Verdict::Allow, 2),
                // A deny inside an allow stays below it and wins by being longer.
                entry("192.168.0.0/16", PROTO_TCP, 443, Verdict::Allow, 3),
                entry("192.168.1.0/24", PROTO_TCP, 443, Verdict::Deny, 4),
            ],
        );
        let ids: Vec<u32> = out.v4.iter().map(|e| e.1.rule_id).collect();
        assert_eq!(ids.len(), 4);
        assert!(!ids.contains(&1));
    }

    #[test]
    fn duplicates_collapse_and_deny_wins() {
        let out = encode(
            1,
            &[
                entry("10.0.0.1/32", PROTO_TCP, 22, Verdict::Allow, 0),
                entry("10.0.0.1/32", PROTO_TCP, 22, Verdict::Allow, 1),
                entry("10.0.0.2/32", PROTO_TCP, 22, Verdict::Allow, 2),
                entry("10.0.0.2/32", PROTO_TCP, 22, Verdict::Deny, 3),
            ],
        );
        let got: Vec<(u32, u8)> = out.v4.iter().map(|e| (e.1.rule_id, e.1.verdict)).collect();
        assert_eq!(got, vec![(0, VERDICT_ALLOW), (3, VERDICT_DENY)]);
    }

    #[test]
    fn tables_never_share_keys() {
        let rules = [entry("10.0.0.1/32", PROTO_TCP, 22, Verdict::Allow, 0)];
        let (a, b) = (encode(1, &rules), encode(2, &rules));
        assert_ne!(a.v4[0].0.data(), b.v4[0].0.data());
    }
}
