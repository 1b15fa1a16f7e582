//! Whether a packet of an agent's socket may pass, as a plain function the cgroup_skb programs
//! call (ingress and egress) and the unit tests exercise without a kernel.
//!
//! The socket hooks judge a connection once, when it is made; these judge every packet, so that
//! the kill switch, a pause and a token's expiry cut established traffic too, in both
//! directions, and so that no packet leaves with a destination other than the one judged.

use crate::{agent::AgentState, decision::gate, rule::PROTO_TCP};

/// IPv6 next-header values a packet of an agent may carry right after its fixed header: TCP,
/// UDP, a fragment header (no routing header can follow one) and ICMPv6.
const PLAIN_V6_NEXT: [u8; 4] = [PROTO_TCP, crate::rule::PROTO_UDP, 44, 58];

/// The TCP RST flag.
pub const TCP_RST: u8 = 0x04;

/// What the packet programs read of a packet: the IP version, the IPv4 header length in 32-bit
/// words, the IPv4 protocol or the IPv6 next header, and (for TCP on egress) the TCP flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub version: u8,
    pub ihl: u8,
    pub next: u8,
    pub tcp_flags: u8,
}

/// Whether the packet would reach somewhere other than its header's destination, the one the
/// socket hooks judged: IPv4 options (source routes) or any IPv6 extension header that may
/// precede or be a routing header. Anything but IPv4 or IPv6 counts as such (fail closed).
pub const fn redirects(h: &Headers) -> bool {
    match h.version {
        4 => h.ihl != 5,
        6 => {
            let n = h.next;
            !(n == PLAIN_V6_NEXT[0]
                || n == PLAIN_V6_NEXT[1]
                || n == PLAIN_V6_NEXT[2]
                || n == PLAIN_V6_NEXT[3])
        }
        _ => true,
    }
}

/// Whether a packet of an agent's socket (`agent` is its entry, `None` for an unregistered
/// cgroup under the agents' root) may pass at boot time `now`.
///
/// A denied agent's (killed, paused, expired, without a token) packets are dropped both ways,
/// except an outgoing TCP reset: it carries no data and tells the peer the connection is gone
/// when the daemon closes the agent's sockets.
pub const fn passes(agent: Option<&AgentState>, now: u64, egress: bool, h: &Headers) -> bool {
    if egress && redirects(h) {
        return false;
    }
    if gate(agent, now).is_ok() {
        return true;
    }
    egress && h.next == PROTO_TCP && h.tcp_flags & TCP_RST != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{FLAG_KILLED, FLAG_PAUSED};

    const LIVE: AgentState = AgentState { deadline_ns: 1_000, table: 1, slot: 0, flags: 0, mode: 0 };
    const TCP4: Headers = Headers { version: 4, ihl: 5, next: PROTO_TCP, tcp_flags: 0x10 };
    const UDP6: Headers = Headers { version: 6, ihl: 0, next: 17, tcp_flags: 0 };

    #[test]
    fn a_live_agents_plain_packets_pass_both_ways() {
        for h in [TCP4, UDP6, Headers { next: 44, ..UDP6 }, Headers { next: 58, ..UDP6 }] {
            assert!(passes(Some(&LIVE), 10, true, &h), "{h:?}");
            assert!(passes(Some(&LIVE), 10, false, &h), "{h:?}");
        }
    }

    #[test]
    fn killed_paused_expired_and_unknown_agents_pass_nothing_but_a_reset() {
        let killed = AgentState { flags: FLAG_KILLED, ..LIVE };
        let paused = AgentState { flags: FLAG_PAUSED, ..LIVE };
        let no_token = AgentState { deadline_ns: 0, ..LIVE };
        for (agent, now) in [
            (Some(&killed), 10),
            (Some(&paused), 10),
            (Some(&LIVE), 1_000),
            (Some(&no_token), 10),
            (None, 10),
        ] {
            for egress in [true, false] {
                assert!(!passes(agent, now, egress, &TCP4));
                assert!(!passes(agent, now, egress, &UDP6));
            }
            let reset = Headers { tcp_flags: TCP_RST, ..TCP4 };
            assert!(passes(agent, now, true, &reset), "a reset leaves");
            assert!(!passes(agent, now, false, &reset), "nothing comes in");
            assert!(!passes(agent, now, true, &Headers { tcp_flags: TCP_RST, ..UDP6 }), "UDP has no reset");
        }
    }

    #[test]
    fn routing_headers_and_ip_options_never_leave() {
        for h in [
            Headers { ihl: 6, ..TCP4 },
            Headers { next: 43, ..UDP6 },
            Headers { next: 0, ..UDP6 },
            Headers { next: 60, ..UDP6 },
            Headers { version: 5, ..TCP4 },
        ] {
            assert!(redirects(&h), "{h:?}");
            assert!(!passes(Some(&LIVE), 10, true, &h), "{h:?}");
        }
        // Inbound packets are not the agent's to route.
        assert!(passes(Some(&LIVE), 10, false, &Headers { next: 43, ..UDP6 }));
    }
}
