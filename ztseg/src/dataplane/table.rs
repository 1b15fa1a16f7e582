//! Compiling a rule set into rule-trie entries (pure; unit-tested without a kernel).
//!
//! The kernel answers "longest match in the destination-port bucket" and "longest match in the
//! every-port bucket" and lets a deny in either win. For that to equal "any matching deny wins",
//! a bucket must never hold an allow underneath a deny that covers it (the allow would be the
//! longer match and hide the deny), so such allows are dropped here: everything they would
//! admit is denied anyway.
//!
//! Audit denies (of catalogue entries in audit mode) are folded in the same way, so that a
//! bucket's longest match still says everything the bucket holds about an address:
//! - an allow or an audit deny under an enforced deny is dropped (the deny wins);
//! - an allow under an audit deny is stored as [`VERDICT_AUDIT_DENY_ALLOWED`] naming the
//!   (longest) audit deny over it: allowed, but a would-be denial;
//! - an audit deny is stored as [`VERDICT_AUDIT_DENY_ALLOWED`] when an allow of its bucket
//!   covers it (the same or a shorter prefix), else as [`VERDICT_AUDIT_DENY`], which admits
//!   nothing by itself.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use ztseg_common::rule::{
    DIR_IN, DIR_OUT, Rule4, Rule6, RuleValue, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_AUDIT_DENY_ALLOWED,
    VERDICT_DENY, prefix_len,
};

/// What an entry says, weakest first (of two entries with the same key the stronger is kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    /// A deny of a catalogue entry in audit mode: what it covers is let through as
    /// `would_deny` where an allow grants it, and stays denied (`no_rule`) where none does.
    AuditDeny,
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
/// Duplicates collapse (a deny beats an audit deny beats an allow for the same key; otherwise
/// the first rule id stays), allows and audit denies covered by a deny of the same protocol and
/// port bucket are dropped, and allows and audit denies that cover each other are marked (see
/// the module's documentation).
pub fn encode(table: u32, entries: &[Entry]) -> Encoded {
    type Bucket = (bool, u8, u16);
    /// The entry kept for a key, and whether an allow has that key too.
    struct Kept {
        verdict: Verdict,
        rule_id: u32,
        allowed: bool,
    }
    let mut unique: BTreeMap<(Bucket, Net), Kept> = BTreeMap::new();
    for e in entries {
        let key = ((e.inbound, e.proto, e.port), canonical(e.net));
        let allowed = e.verdict == Verdict::Allow;
        unique
            .entry(key)
            .and_modify(|kept| {
                if e.verdict > kept.verdict {
                    (kept.verdict, kept.rule_id) = (e.verdict, e.rule_id);
                }
                kept.allowed |= allowed;
            })
            .or_insert(Kept { verdict: e.verdict, rule_id: e.rule_id, allowed });
    }
    let with = |verdict: Verdict| -> BTreeSet<(Bucket, Net)> {
        unique.iter().filter(|(_, k)| k.verdict == verdict).map(|(key, _)| *key).collect()
    };
    let denies = with(Verdict::Deny);
    let allows: BTreeSet<(Bucket, Net)> =
        unique.iter().filter(|(_, k)| k.allowed).map(|(key, _)| *key).collect();
    let audits: BTreeMap<(Bucket, Net), u32> = unique
        .iter()
        .filter(|(_, k)| k.verdict == Verdict::AuditDeny)
        .map(|(key, k)| (*key, k.rule_id))
        .collect();

    let mut out = Encoded::default();
    for ((bucket @ (inbound, proto, port), net), kept) in &unique {
        let (bucket, net) = (*bucket, *net);
        // The networks over this one, longest (`net` itself) first.
        let over = || supernets(net).into_iter().rev();
        let value = match kept.verdict {
            Verdict::Deny => RuleValue::new(kept.rule_id, VERDICT_DENY),
            _ if !denies.is_empty() && over().any(|s| denies.contains(&(bucket, s))) => continue,
            Verdict::AuditDeny => {
                let allowed = over().any(|s| allows.contains(&(bucket, s)));
                let verdict = if allowed { VERDICT_AUDIT_DENY_ALLOWED } else { VERDICT_AUDIT_DENY };
                RuleValue::new(kept.rule_id, verdict)
            }
            Verdict::Allow if audits.is_empty() => RuleValue::new(kept.rule_id, VERDICT_ALLOW),
            Verdict::Allow => match over().find_map(|s| audits.get(&(bucket, s))) {
                Some(&audit) => RuleValue::new(audit, VERDICT_AUDIT_DENY_ALLOWED),
                None => RuleValue::new(kept.rule_id, VERDICT_ALLOW),
            },
        };
        let port = port.to_be_bytes();
        let dir = if *inbound { DIR_IN } else { DIR_OUT };
        let proto = *proto;
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
    use std::net::IpAddr;

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

    fn values(out: &Encoded) -> Vec<(Ipv4Net, u8, u32)> {
        out.v4
            .iter()
            .map(|(key, value)| {
                let (prefix, data) = (key.prefix_len(), key.data());
                let net = Ipv4Net::new(data.addr.into(), (prefix - 64) as u8).unwrap();
                (net, value.verdict, value.rule_id)
            })
            .collect()
    }

    #[test]
    fn audit_denies_fold_into_the_allows_they_cover_and_under_the_denies_that_cover_them() {
        use Verdict::{Allow, AuditDeny, Deny};
        let out = encode(
            1,
            &[
                // An audit deny inside an allow: the allow over it makes it a would-be denial.
                entry("10.0.0.0/16", PROTO_TCP, 22, Allow, 0),
                entry("10.0.3.0/24", PROTO_TCP, 22, AuditDeny, 1),
                // An allow inside an audit deny: the allow is marked with the deny's id; the deny
                // has no allow over it and admits nothing itself.
                entry("11.0.0.0/8", PROTO_TCP, 22, AuditDeny, 2),
                entry("11.1.2.3/32", PROTO_TCP, 22, Allow, 3),
                // Under an enforced deny, audit denies and allows go.
                entry("192.168.0.0/16", PROTO_TCP, 22, Deny, 4),
                entry("192.168.1.0/24", PROTO_TCP, 22, AuditDeny, 5),
                entry("192.168.1.1/32", PROTO_TCP, 22, Allow, 6),
                // An enforced deny inside an audit deny stays, longer.
                entry("172.16.0.0/12", PROTO_TCP, 22, AuditDeny, 7),
                entry("172.16.1.0/24", PROTO_TCP, 22, Deny, 8),
                // Same key: an audit deny beats an allow (and knows it is allowed); a deny beats both.
                entry("10.9.9.9/32", PROTO_TCP, 22, Allow, 9),
                entry("10.9.9.9/32", PROTO_TCP, 22, AuditDeny, 10),
                entry("10.9.9.8/32", PROTO_TCP, 22, AuditDeny, 11),
                entry("10.9.9.8/32", PROTO_TCP, 22, Deny, 12),
                // Nested: the longest audit deny over an allow names it.
                entry("12.20.0.0/16", PROTO_TCP, 22, AuditDeny, 13),
                entry("12.20.5.0/24", PROTO_TCP, 22, Allow, 14),
                entry("12.20.5.128/25", PROTO_TCP, 22, AuditDeny, 15),
                entry("12.20.5.129/32", PROTO_TCP, 22, Allow, 16),
                // Another port is another bucket: untouched.
                entry("11.1.2.3/32", PROTO_TCP, 80, Allow, 17),
            ],
        );
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let mut got = values(&out);
        got.sort();
        let mut expected = vec![
            (net("10.0.0.0/16"), VERDICT_ALLOW, 0),
            (net("10.0.3.0/24"), VERDICT_AUDIT_DENY_ALLOWED, 1),
            (net("11.0.0.0/8"), VERDICT_AUDIT_DENY, 2),
            (net("11.1.2.3/32"), VERDICT_AUDIT_DENY_ALLOWED, 2),
            (net("11.1.2.3/32"), VERDICT_ALLOW, 17),
            (net("192.168.0.0/16"), VERDICT_DENY, 4),
            (net("172.16.0.0/12"), VERDICT_AUDIT_DENY, 7),
            (net("172.16.1.0/24"), VERDICT_DENY, 8),
            (net("10.9.9.9/32"), VERDICT_AUDIT_DENY_ALLOWED, 10),
            (net("10.9.9.8/32"), VERDICT_DENY, 12),
            (net("12.20.0.0/16"), VERDICT_AUDIT_DENY, 13),
            (net("12.20.5.0/24"), VERDICT_AUDIT_DENY_ALLOWED, 13),
            (net("12.20.5.128/25"), VERDICT_AUDIT_DENY_ALLOWED, 15),
            (net("12.20.5.129/32"), VERDICT_AUDIT_DENY_ALLOWED, 15),
        ];
        expected.sort();
        assert_eq!(got, expected);
    }

    /// What the programs decide about `addr:port` over `out`: the longest match of each bucket,
    /// joined by `combine_found`.
    fn kernel_decides(
        out: &Encoded,
        addr: std::net::Ipv4Addr,
        port: u16,
    ) -> ztseg_common::decision::Decision {
        use ztseg_common::decision::{NO_MATCH, combine_found};
        let longest = |bucket: u16| {
            out.v4
                .iter()
                .filter(|(key, _)| key.data().port == bucket.to_be_bytes())
                .filter(|(key, _)| {
                    let data = key.data();
                    Ipv4Net::new(data.addr.into(), (key.prefix_len() - 64) as u8).unwrap().contains(&addr)
                })
                .max_by_key(|(key, _)| key.prefix_len())
                .map_or(NO_MATCH, |(_, value)| *value)
        };
        combine_found(&longest(port), &longest(0))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Whatever the rules, the two-bucket longest-match lookup decides what the rules mean:
        /// an enforced deny that matches wins (`forbidden`); else, if an allow matches, an audit
        /// deny that matches makes it a would-be denial, or it is allowed; else `no_rule`.
        #[test]
        fn the_lookup_decides_what_the_rules_mean(
            rules in proptest::collection::vec(
                (0u8..=255, 24u8..=32, proptest::sample::select(vec![0u16, 22]), 0u8..3),
                1..12,
            )
        ) {
            use ztseg_common::{decision::reason, rule::VERDICT_WOULD_DENY};
            let entries: Vec<Entry> = rules
                .iter()
                .enumerate()
                .map(|(i, &(host, prefix, port, v))| Entry {
                    net: IpNet::V4(Ipv4Net::new([10, 0, 0, host].into(), prefix).unwrap().trunc()),
                    proto: PROTO_TCP,
                    port,
                    inbound: false,
                    verdict: [Verdict::Allow, Verdict::AuditDeny, Verdict::Deny][usize::from(v)],
                    rule_id: i as u32,
                })
                .collect();
            let out = encode(1, &entries);
            for host in 0..=255u8 {
                let addr = std::net::Ipv4Addr::new(10, 0, 0, host);
                let matching = |verdict: Verdict| entries.iter().filter(move |e| e.verdict == verdict && e.net.contains(&IpAddr::V4(addr)));
                let got = kernel_decides(&out, addr, 22);
                let expected = if matching(Verdict::Deny).next().is_some() {
                    (VERDICT_DENY, reason::FORBIDDEN)
                } else if matching(Verdict::Allow).next().is_some() {
                    if matching(Verdict::AuditDeny).next().is_some() {
                        (VERDICT_WOULD_DENY, reason::FORBIDDEN)
                    } else {
                        (VERDICT_ALLOW, reason::RULE)
                    }
                } else {
                    (VERDICT_DENY, reason::NO_RULE)
                };
                proptest::prop_assert_eq!((got.verdict, got.reason), expected, "10.0.0.{} over {:?}", host, entries);
                // The rule named is one that says so.
                let named = entries.iter().find(|e| e.rule_id == got.rule_id);
                match expected.0 {
                    VERDICT_DENY if expected.1 == reason::FORBIDDEN => proptest::prop_assert_eq!(named.map(|e| e.verdict), Some(Verdict::Deny)),
                    VERDICT_WOULD_DENY => proptest::prop_assert_eq!(named.map(|e| e.verdict), Some(Verdict::AuditDeny)),
                    VERDICT_ALLOW => proptest::prop_assert_eq!(named.map(|e| e.verdict), Some(Verdict::Allow)),
                    _ => {}
                }
                if let Some(e) = named {
                    proptest::prop_assert!(e.net.contains(&IpAddr::V4(addr)));
                }
            }
        }
    }

    #[test]
    fn tables_never_share_keys() {
        let rules = [entry("10.0.0.1/32", PROTO_TCP, 22, Verdict::Allow, 0)];
        let (a, b) = (encode(1, &rules), encode(2, &rules));
        assert_ne!(a.v4[0].0.data(), b.v4[0].0.data());
    }
}
