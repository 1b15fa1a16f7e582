//! Whether a packet of an agent's socket may pass, as a plain function the cgroup_skb programs
//! call (ingress and egress) and the unit tests exercise without a kernel.
//!
//! The socket hooks judge a connection once, when it is made; these judge every packet, so that
//! the kill switch, a pause and a token's expiry cut established traffic too, in both
//! directions, and so that no packet leaves with a destination other than the one judged.

use crate::{
    agent::AgentState,
    decision::gate,
    event::{FAMILY_V4, FAMILY_V6},
    rule::{PROTO_TCP, PROTO_UDP},
};

/// IPv6 next-header values a packet of an agent may carry right after its fixed header: TCP,
/// UDP, a fragment header (no routing header can follow one) and ICMPv6.
const PLAIN_V6_NEXT: [u8; 4] = [PROTO_TCP, crate::rule::PROTO_UDP, 44, 58];

/// The TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// The TCP SYN and ACK flags.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Socket states (`bpf_sock.state`, the kernel's `TCP_*` values, which UDP sockets use too).
pub const STATE_ESTABLISHED: u32 = 1;
pub const STATE_LISTEN: u32 = 10;

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
/// A denied agent's (killed, suspended, paused, expired, without a token) packets are dropped both ways,
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

/// What an incoming packet is to the agent's socket it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Traffic of a connection the socket hooks judged when the agent made it, or accepted
    /// after its opening was judged; or a reply to one of the socket's own judged sends. Only
    /// the agent's state (kill, pause, expiry) decides it.
    Judged,
    /// A packet for a listening TCP socket: a connection attempt from outside. `opening` is the
    /// SYN, the one packet recorded; the handshake's later packets to the listener (the final
    /// ACK, a SYN-cookie ACK) are judged the same way without a record.
    Connection { opening: bool },
    /// A datagram to an unconnected UDP socket that is not a reply to one of its own sends.
    Datagram,
}

/// Classifies an incoming packet by the socket it reached: `sock_protocol` and `sock_state` are
/// the socket's, `tcp_flags` the packet's (0 for UDP), `reply` whether the sender is a peer the
/// socket itself sent to (see [`Peers`]).
///
/// A connected UDP socket only ever receives from the peer its connect named, which the hooks
/// judged; a TCP socket in any state but listening only from its connection's peer. Anything
/// else (an unknown protocol) counts as a datagram: judged against the inbound rules, which
/// grant nothing but TCP and UDP, so it fails closed.
pub const fn arrival(sock_protocol: u32, sock_state: u32, tcp_flags: u8, reply: bool) -> Arrival {
    if sock_protocol == PROTO_TCP as u32 {
        if sock_state == STATE_LISTEN {
            return Arrival::Connection { opening: tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 };
        }
        return Arrival::Judged;
    }
    if sock_protocol == PROTO_UDP as u32 && (sock_state == STATE_ESTABLISHED || reply) {
        return Arrival::Judged;
    }
    Arrival::Datagram
}

/// Whether an IPv6 address (four network-order words, as read from the packet) is IPv4-mapped
/// (`::ffff:a.b.c.d`).
pub const fn v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Peers an unconnected UDP socket may hear back from, kept per socket (socket storage,
/// freed with the socket): the sendmsg programs add each destination they allow, and a
/// datagram from one of them is a reply rather than an unsolicited arrival. At most
/// [`REPLY_PEERS`] per socket, the oldest overwritten first; a reply from a peer overwritten
/// since is judged as unsolicited (fails closed).
pub const REPLY_PEERS: usize = 8;

/// One peer: its address as network-order words (IPv4 in the first word, the rest zero), its
/// port in network order, and its family ([`FAMILY_V4`] or [`FAMILY_V6`]; 0 in an unused slot,
/// which matches nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub addr: [u32; 4],
    pub port: [u8; 2],
    pub family: u8,
    pub _pad: u8,
}

impl Peer {
    pub const fn v4(addr: u32, port: [u8; 2]) -> Self {
        Self { addr: [addr, 0, 0, 0], port, family: FAMILY_V4, _pad: 0 }
    }

    pub const fn v6(addr: [u32; 4], port: [u8; 2]) -> Self {
        Self { addr, port, family: FAMILY_V6, _pad: 0 }
    }

    /// Field by field: a whole-struct or array comparison may become a `bcmp` call, which BPF
    /// programs cannot make.
    #[inline(always)]
    pub const fn same(&self, other: &Self) -> bool {
        self.family == other.family
            && self.port[0] == other.port[0]
            && self.port[1] == other.port[1]
            && self.addr[0] == other.addr[0]
            && self.addr[1] == other.addr[1]
            && self.addr[2] == other.addr[2]
            && self.addr[3] == other.addr[3]
    }
}

/// The socket storage value: the peers and where the next one goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub next: u32,
    pub peers: [Peer; REPLY_PEERS],
}

impl Peers {
    #[inline(always)]
    pub fn contains(&self, peer: &Peer) -> bool {
        let mut i = 0;
        while i < REPLY_PEERS {
            if self.peers[i].same(peer) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The slot `peer` goes into, or `None` if it is there already.
    #[inline(always)]
    pub fn slot_for(&self, peer: &Peer) -> Option<usize> {
        if self.contains(peer) { None } else { Some(self.next as usize % REPLY_PEERS) }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Peers {}

#[cfg(test)]
mod tests {
    #[test]
    fn v4_mapped_senders_are_recognised() {
        let words =
            |b: [u8; 16]| [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 0, 3];
        assert!(v4_mapped(&words(mapped)));
        let mut compat = mapped;
        compat[10] = 0;
        assert!(!v4_mapped(&words(compat)));
        let mut ula = mapped;
        ula[0] = 0xfd;
        assert!(!v4_mapped(&words(ula)));
    }

    use super::*;
    use crate::agent::{FLAG_KILLED, FLAG_PAUSED, FLAG_SUSPENDED};

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
    fn killed_suspended_paused_expired_and_unknown_agents_pass_nothing_but_a_reset() {
        let killed = AgentState { flags: FLAG_KILLED, ..LIVE };
        let suspended = AgentState { flags: FLAG_SUSPENDED, ..LIVE };
        let paused = AgentState { flags: FLAG_PAUSED, ..LIVE };
        let no_token = AgentState { deadline_ns: 0, ..LIVE };
        for (agent, now) in [
            (Some(&killed), 10),
            (Some(&suspended), 10),
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
    fn only_listeners_and_unconnected_udp_sockets_meet_strangers() {
        let syn = TCP_SYN;
        let syn_ack = TCP_SYN | TCP_ACK;
        assert_eq!(arrival(6, STATE_LISTEN, syn, false), Arrival::Connection { opening: true });
        assert_eq!(arrival(6, STATE_LISTEN, TCP_ACK, false), Arrival::Connection { opening: false });
        assert_eq!(arrival(6, STATE_LISTEN, syn_ack, false), Arrival::Connection { opening: false });
        // A reply to one of its own sends is not an invitation to a listener.
        assert_eq!(arrival(6, STATE_LISTEN, syn, true), Arrival::Connection { opening: true });
        assert_eq!(arrival(6, STATE_ESTABLISHED, syn_ack, false), Arrival::Judged);
        assert_eq!(arrival(6, 2, syn, false), Arrival::Judged, "SYN_SENT: simultaneous open with its peer");
        assert_eq!(arrival(17, STATE_ESTABLISHED, 0, false), Arrival::Judged, "connected UDP");
        assert_eq!(arrival(17, 7, 0, false), Arrival::Datagram, "unconnected UDP");
        assert_eq!(arrival(17, 7, 0, true), Arrival::Judged, "a reply to its own send");
        assert_eq!(arrival(132, STATE_ESTABLISHED, 0, true), Arrival::Datagram, "anything else is judged");
    }

    #[test]
    fn peers_are_kept_per_socket_oldest_overwritten_first() {
        let mut peers = Peers::default();
        let a = Peer::v4(u32::from_ne_bytes([10, 0, 0, 1]), [0, 53]);
        assert!(!peers.contains(&a));
        assert!(!peers.contains(&Peer::v4(0, [0, 0])), "an empty slot matches no packet");
        for i in 0..REPLY_PEERS as u32 {
            let p = if i == 0 { a } else { Peer::v4(i, [0, 1]) };
            let slot = peers.slot_for(&p).unwrap();
            peers.peers[slot] = p;
            peers.next += 1;
        }
        assert!(peers.contains(&a));
        assert_eq!(peers.slot_for(&a), None, "a peer already there is not added twice");
        assert!(!peers.contains(&Peer { port: [0, 54], ..a }), "the port counts");
        assert!(!peers.contains(&Peer { family: FAMILY_V6, ..a }), "the family counts");
        let newer = Peer::v6([1, 2, 3, 4], [0, 53]);
        let slot = peers.slot_for(&newer).unwrap();
        assert_eq!(slot, 0, "the oldest goes");
        peers.peers[slot] = newer;
        assert!(!peers.contains(&a) && peers.contains(&newer));
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
