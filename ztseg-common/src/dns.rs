//! DNS under ztseg's control: what the kernel programs and the daemon's DNS proxy share.
//!
//! Every connect or send of an agent to port 53 (UDP and TCP, any address, connected or not) is
//! rewritten to the daemon's DNS proxy, at an address of the proxy's loopback network that
//! encodes the agent's slot: the proxy knows whose query it reads from the address the query
//! came to, which the kernel chose from the agent's cgroup (the agent cannot pick another's).
//! The `recvmsg` and `getpeername` programs rewrite the proxy's address back to the resolver
//! the agent asked ([`DnsPeer`], socket storage).
//!
//! Addresses the proxy hands out for names the agent's rules allow go into the `learned` map,
//! keyed by the agent's cgroup id, with an expiry on the boot clock: a destination the agent's
//! rule table does not match (`no_rule`) is looked up there, only for agents whose entry has
//! [`FLAG_NAMES`] (a grant with name rules), so agents without names pay nothing.
//!
//! Byte order: addresses and ports are network order, as in `bpf_sock_addr`.

use crate::{
    decision::{Decision, NO_RULE_ID},
    rule::{VERDICT_ALLOW, VERDICT_DENY},
};

/// The port agents' DNS goes to.
pub const DNS_PORT: [u8; 2] = 53u16.to_be_bytes();

/// `AgentState.flags` bit: the grant in force has name rules, so the kernel consults the
/// `learned` map when the rule table has no match. (Bit 8: far from the state flags.)
pub const FLAG_NAMES: u32 = 1 << 8;

/// An action only the DNS proxy records: one query and its answer.
pub const ACTION_DNS: u8 = 16;

/// Reasons of DNS decisions (stable numbers, in a range of their own).
pub mod reason {
    /// Allowed: a connect or send to port 53, redirected to the daemon's DNS proxy.
    pub const DNS_PROXY: u8 = 40;
    /// Denied: an address of the DNS proxy's network named directly (only the redirect may
    /// reach the proxy, at the agent's own address).
    pub const PROXY_NET: u8 = 41;
    /// Denied: an unconnected IPv6 send to port 53, which the kernel cannot redirect to the
    /// (IPv4) proxy (`udpv6_sendmsg` refuses a rewrite to an IPv4-mapped address).
    pub const DNS_V6: u8 = 42;
    /// A query of a record type other than A, AAAA (and the CNAMEs leading to them): refused.
    pub const QTYPE: u8 = 43;
    /// The agent has queried more distinct names under this wildcard in the window than its
    /// budget allows: refused.
    pub const BUDGET: u8 = 44;
    /// The agent holds as many names or addresses as it may: refused.
    pub const FULL: u8 = 45;
    /// A CNAME of the answer leads to a name no rule of the agent allows: refused.
    pub const CNAME: u8 = 46;
    /// The upstream resolvers did not answer (or answered with an error): SERVFAIL.
    pub const UPSTREAM: u8 = 47;
    /// The answer's addresses could not be written into the kernel: SERVFAIL (never released
    /// unenforced).
    pub const INSTALL: u8 = 48;
    /// A query that is not a well-formed standard query of one name: FORMERR or NOTIMP.
    pub const MALFORMED: u8 = 49;
}

/// The DNS settings the programs are loaded with (read-only data: the verifier sees constants,
/// so a daemon with DNS off loads programs without the DNS paths).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Non-zero: port 53 is redirected to the proxy.
    pub enabled: u32,
    /// The proxy's network: the first two bytes of a /16 inside 127.0.0.0/8 (network order),
    /// the last two zero.
    pub net: [u8; 4],
    /// The proxy's port, network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

impl DnsConfig {
    pub const OFF: Self = Self { enabled: 0, net: [0; 4], port: [0; 2], _pad: [0; 2] };

    pub const fn new(net: [u8; 4], port: u16) -> Self {
        Self { enabled: 1, net: [net[0], net[1], 0, 0], port: port.to_be_bytes(), _pad: [0; 2] }
    }

    /// Whether `addr` lies in the proxy's network.
    pub const fn in_net(&self, addr: [u8; 4]) -> bool {
        addr[0] == self.net[0] && addr[1] == self.net[1]
    }

    /// The proxy's address for the agent in `slot`: the network's host part is `slot + 1`.
    pub const fn proxy_addr(&self, slot: u32) -> [u8; 4] {
        let host = (slot + 1).to_be_bytes();
        [self.net[0], self.net[1], host[2], host[3]]
    }

    /// The slot whose proxy address `addr` is, if it is one.
    pub const fn slot_of(&self, addr: [u8; 4]) -> Option<u32> {
        if !self.in_net(addr) {
            return None;
        }
        let host = u16::from_be_bytes([addr[2], addr[3]]) as u32;
        if host == 0 { None } else { Some(host - 1) }
    }

    /// What the programs do with an IPv4 destination (`addr` as the kernel will route it).
    pub const fn intercept(&self, port: [u8; 2], addr: [u8; 4]) -> Intercept {
        if self.enabled == 0 {
            return Intercept::Pass;
        }
        if self.in_net(addr) {
            return Intercept::ProxyNet;
        }
        if port[0] == DNS_PORT[0] && port[1] == DNS_PORT[1] {
            return Intercept::Redirect;
        }
        Intercept::Pass
    }
}

/// What happens to a destination before the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intercept {
    /// Not DNS: judged by the rules.
    Pass,
    /// Port 53: sent to the proxy.
    Redirect,
    /// An address of the proxy's network: refused.
    ProxyNet,
}

/// Socket storage: the resolver an agent's socket asked, for the `recvmsg` and `getpeername`
/// programs to put back in place of the proxy's address. (The last one asked: a socket that
/// sends to several resolvers sees every answer as from the last.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPeer {
    /// As the agent wrote it: an IPv4 address in the first word, or an IPv6 address
    /// (network-order words).
    pub addr: [u32; 4],
    /// Network order.
    pub port: [u8; 2],
    /// `event::FAMILY_V4` or `event::FAMILY_V6` (the address family the agent wrote).
    pub family: u8,
    pub _pad: u8,
    pub _pad2: u32,
}

/// Key of the `learned` map: an address the proxy handed an agent for a name its rules allow,
/// with the rule's protocol and port ([`crate::rule::ANY_PORT`] for every port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Learned {
    /// The agent's cgroup id: never reused while the cgroup exists, so an entry can never
    /// grant another agent.
    pub cgroup_id: u64,
    /// Network-order words; IPv4 in the first, the rest zero.
    pub addr: [u32; 4],
    /// Network order.
    pub port: [u8; 2],
    /// `event::FAMILY_V4` / `event::FAMILY_V6`.
    pub family: u8,
    pub proto: u8,
    pub _pad: u32,
}

/// Value of the `learned` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    /// `CLOCK_BOOTTIME` ns from which the entry grants nothing (the answer's TTL, clamped,
    /// and never past the token's `exp`).
    pub expires_ns: u64,
    /// The name rule that allowed it (reported with each decision it makes).
    pub rule_id: u32,
    /// A fingerprint of that rule (origin, pattern, ports), which a restarted daemon checks
    /// against the grant it restores: an entry whose rule changed is deleted. Not read by the
    /// programs.
    pub check: u32,
}

/// Name of the `learned` map and of the socket storage of [`DnsPeer`].
pub const LEARNED: &str = "learned";
pub const DNS_PEERS: &str = "dns_peers";

/// Entries of the `learned` map, all agents together (allocated as used: the map is not
/// preallocated).
pub const MAX_LEARNED: u32 = 1 << 20;

/// The decision a `learned` lookup gives: the entry's rule allows until its expiry; anything
/// else is the rule table's default deny.
pub const fn learned(found: &LearnedValue, now_boot_ns: u64) -> Decision {
    if found.expires_ns != 0 && now_boot_ns < found.expires_ns {
        return Decision {
            verdict: VERDICT_ALLOW,
            reason: crate::decision::reason::RULE,
            rule_id: found.rule_id,
        };
    }
    Decision { verdict: VERDICT_DENY, reason: crate::decision::reason::NO_RULE, rule_id: NO_RULE_ID }
}

/// What a lookup that found nothing stands for in [`learned`].
pub const NOT_LEARNED: LearnedValue = LearnedValue { expires_ns: 0, rule_id: NO_RULE_ID, check: 0 };

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integers and byte arrays, explicit padding (checked by the layout
    // tests), so every bit pattern is valid.
    unsafe impl aya::Pod for super::DnsConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Learned {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LearnedValue {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<DnsConfig>(), 12);
        assert_eq!(offset_of!(DnsConfig, port), 8);
        assert_eq!(size_of::<DnsPeer>(), 24);
        assert_eq!(offset_of!(DnsPeer, port), 16);
        assert_eq!(offset_of!(DnsPeer, family), 18);
        assert_eq!(size_of::<Learned>(), 32);
        assert_eq!(offset_of!(Learned, addr), 8);
        assert_eq!(offset_of!(Learned, port), 24);
        assert_eq!(offset_of!(Learned, family), 26);
        assert_eq!(offset_of!(Learned, proto), 27);
        assert_eq!(size_of::<LearnedValue>(), 16);
        assert_eq!(offset_of!(LearnedValue, rule_id), 8);
    }

    #[test]
    fn a_slot_has_one_proxy_address_and_back() {
        let config = DnsConfig::new([127, 53, 0, 0], 10053);
        assert_eq!(config.port, [0x27, 0x45]);
        assert_eq!(config.proxy_addr(0), [127, 53, 0, 1]);
        assert_eq!(config.proxy_addr(300), [127, 53, 1, 45]);
        for slot in [0, 1, 255, 256, 16_383] {
            assert_eq!(config.slot_of(config.proxy_addr(slot)), Some(slot));
        }
        assert_eq!(config.slot_of([127, 53, 0, 0]), None);
        assert_eq!(config.slot_of([127, 0, 0, 1]), None);
        assert_eq!(config.slot_of([10, 53, 0, 1]), None);
    }

    #[test]
    fn port_53_is_redirected_and_the_proxy_net_refused() {
        let config = DnsConfig::new([127, 53, 0, 0], 10053);
        assert_eq!(config.intercept(DNS_PORT, [8, 8, 8, 8]), Intercept::Redirect);
        assert_eq!(config.intercept(DNS_PORT, [127, 0, 0, 53]), Intercept::Redirect);
        assert_eq!(config.intercept(443u16.to_be_bytes(), [8, 8, 8, 8]), Intercept::Pass);
        assert_eq!(config.intercept(853u16.to_be_bytes(), [8, 8, 8, 8]), Intercept::Pass);
        // Another agent's proxy address, on any port, 53 included.
        assert_eq!(config.intercept(config.port, [127, 53, 0, 9]), Intercept::ProxyNet);
        assert_eq!(config.intercept(DNS_PORT, [127, 53, 0, 9]), Intercept::ProxyNet);
        assert_eq!(DnsConfig::OFF.intercept(DNS_PORT, [8, 8, 8, 8]), Intercept::Pass);
    }

    #[test]
    fn a_learned_entry_allows_until_it_expires() {
        let found = LearnedValue { expires_ns: 100, rule_id: 7, check: 0 };
        let allowed = learned(&found, 99);
        assert!(allowed.passes());
        assert_eq!((allowed.rule_id, allowed.reason), (7, crate::decision::reason::RULE));
        let expired = learned(&found, 100);
        assert_eq!(expired, Decision::deny(crate::decision::reason::NO_RULE));
        assert_eq!(learned(&NOT_LEARNED, 0), Decision::deny(crate::decision::reason::NO_RULE));
    }
}
