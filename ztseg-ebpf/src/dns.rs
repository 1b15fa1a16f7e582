//! DNS under ztseg's control (see `ztseg_common::dns`): port 53 goes to the daemon's proxy at the
//! agent's own proxy address; `recvmsg` and `getpeername` show the resolver the agent asked; and
//! addresses the proxy handed out for allowed names are found in the `learned` map when the
//! rule table has no match.
//!
//! The settings are read-only data set when the programs are loaded (`DNS_CONFIG`): with DNS
//! off, the verifier prunes every path below as dead code.

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, SkStorage},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use ztseg_common::{
    decision::{Decision, NO_RULE_ID},
    dns::{
        DnsConfig, DnsPeer, FLAG_NAMES, Intercept, Learned, LearnedValue, MAX_LEARNED, NOT_LEARNED, learned,
        reason as dns_reason,
    },
    event::{ACTION_SENDMSG, FAMILY_V4, FAMILY_V6},
    packet::Peer,
    rule::{ANY_PORT, DIR_OUT, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, effective_v4},
};

use crate::{ALLOW, Dest, Target, Task, port_of, protocol_of, remember_peer, v4_dest};

/// What `redirect_v4`/`redirect_v6` return for a destination that is not theirs: the rules
/// judge it. (Not an `Option`: see `Task`.)
pub const NOT_DNS: i32 = -1;

/// Set by the daemon at load (`EbpfLoader::set_global`); all zero (off) otherwise.
#[unsafe(no_mangle)]
static DNS_CONFIG: Global<DnsConfig> = Global::new(DnsConfig::OFF);

#[btf_map(name = "learned")]
static LEARNED: HashMap<Learned, LearnedValue, { MAX_LEARNED as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map(name = "dns_peers")]
static DNS_PEERS: SkStorage<DnsPeer> = SkStorage::new();

#[inline(always)]
fn config() -> DnsConfig {
    // A volatile read: the compiler must not fold in the object's initialiser (the loader
    // rewrites the value).
    DNS_CONFIG.load()
}

/// Connect or unconnected send of an IPv4 socket: port 53 goes to the proxy, the proxy's
/// network is refused, anything else is [`NOT_DNS`].
#[inline(always)]
pub fn redirect_v4(ctx: &SockAddrContext, action: u8, target: Target) -> i32 {
    let config = config();
    if config.enabled == 0 {
        return NOT_DNS;
    }
    let raw = target.ip[0];
    let addr = effective_v4(raw.to_ne_bytes());
    let port = target.port;
    let intercept = config.intercept(port, addr);
    if intercept == Intercept::Pass {
        return NOT_DNS;
    }
    let proto = match protocol_of(ctx) {
        Ok(proto) if proto == PROTO_TCP || proto == PROTO_UDP => proto,
        _ => return NOT_DNS,
    };
    let task = Task::current();
    let proxy = config.proxy_addr(task.slot());
    // The agent's own proxy address is where a dual-stack socket connected through the redirect
    // sends (the kernel judges each of its sends here, as to the IPv4 address); it names no one
    // else, so it is let through as a query. Any other address of the proxy's network is not.
    let own = intercept == Intercept::ProxyNet && addr == proxy && port == config.port;
    if !target.given && !own {
        // A connected socket's send with no address goes to its peer and cannot be redirected:
        // a peer other than the agent's proxy was connected without the redirect (and judged by
        // the rules then); the rules judge it now.
        return NOT_DNS;
    }
    let decision = if intercept == Intercept::ProxyNet && !own {
        Decision::deny(dns_reason::PROXY_NET)
    } else {
        to_proxy(&task)
    };
    if decision.passes() && !own {
        remember_resolver(ctx, [raw, 0, 0, 0], port, FAMILY_V4);
    }
    let verdict = task.report(action, v4_dest(proto, port, addr), &decision, true);
    if verdict == ALLOW && target.given {
        // SAFETY: `user_ip4` and `user_port` are writable in connect4 and sendmsg4 programs;
        // `user_port` is a 4-byte field with the port in its first two bytes.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(proxy);
            (*ctx.sock_addr).user_port = u32::from_ne_bytes([config.port[0], config.port[1], 0, 0]);
        }
        if action == ACTION_SENDMSG {
            // The proxy's reply comes from where the datagram now goes.
            let peer = Peer {
                addr: [u32::from_ne_bytes(proxy), 0, 0, 0],
                port: config.port,
                family: FAMILY_V4,
                _pad: 0,
            };
            remember_peer(ctx, &peer);
        }
    }
    verdict
}

/// Connect or unconnected send of an IPv6 socket. Only a connect can be redirected (to the
/// proxy's IPv4-mapped address; an IPv6-only socket then fails with ENETUNREACH): the kernel
/// refuses a sendmsg6 rewrite to an IPv4-mapped address, so an unconnected IPv6 send to port 53
/// is refused (`dns_v6`). IPv4-mapped destinations of unconnected sends never get here: the
/// kernel hands those to the sendmsg4 program.
#[inline(always)]
pub fn redirect_v6(ctx: &SockAddrContext, action: u8, target: Target) -> i32 {
    let config = config();
    // A connected socket's send with no address goes to its peer: a socket connected to port 53
    // through the redirect sends from the IPv4 side (sendmsg4); any other peer is the rules'.
    if config.enabled == 0 || !target.given {
        return NOT_DNS;
    }
    let w = target.ip;
    let port = target.port;
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    // An IPv4-mapped destination is intercepted as its IPv4 address would be; an IPv6 one on
    // port 53 only (the proxy's network is IPv4).
    let intercept = if mapped {
        config.intercept(port, effective_v4(w[3].to_ne_bytes()))
    } else if port == ztseg_common::dns::DNS_PORT {
        Intercept::Redirect
    } else {
        Intercept::Pass
    };
    if intercept == Intercept::Pass {
        return NOT_DNS;
    }
    let proto = match protocol_of(ctx) {
        Ok(proto) if proto == PROTO_TCP || proto == PROTO_UDP => proto,
        _ => return NOT_DNS,
    };
    let task = Task::current();
    let decision = if intercept == Intercept::ProxyNet {
        Decision::deny(dns_reason::PROXY_NET)
    } else if action == ACTION_SENDMSG {
        Decision::deny(dns_reason::DNS_V6)
    } else {
        to_proxy(&task)
    };
    let dest = if mapped {
        v4_dest(proto, port, effective_v4(w[3].to_ne_bytes()))
    } else {
        Dest { family: FAMILY_V6, proto, addr: w, port }
    };
    if decision.passes() {
        remember_resolver(ctx, w, port, FAMILY_V6);
    }
    let verdict = task.report(action, dest, &decision, true);
    if verdict == ALLOW {
        let proxy = config.proxy_addr(task.slot());
        // SAFETY: `user_ip6` (word by word) and `user_port` are writable in connect6.
        unsafe {
            let ip6 = (&raw mut (*ctx.sock_addr).user_ip6).cast::<u32>();
            ip6.write_volatile(0);
            ip6.add(1).write_volatile(0);
            ip6.add(2).write_volatile(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
            ip6.add(3).write_volatile(u32::from_ne_bytes(proxy));
            (*ctx.sock_addr).user_port = u32::from_ne_bytes([config.port[0], config.port[1], 0, 0]);
        }
    }
    verdict
}

/// The decision of a query to the proxy: the agent-level checks (registration, kill switch,
/// suspension, token, pause), then allowed. Which names it may resolve is the proxy's part.
#[inline(always)]
fn to_proxy(task: &Task) -> Decision {
    match task.gate() {
        Ok(_) => Decision { verdict: VERDICT_ALLOW, reason: dns_reason::DNS_PROXY, rule_id: NO_RULE_ID },
        Err(denied) => denied,
    }
}

/// Remembers on the socket the resolver the agent asked, for `recvmsg` and `getpeername`.
#[inline(always)]
fn remember_resolver(ctx: &SockAddrContext, addr: [u32; 4], port: [u8; 2], family: u8) {
    // SAFETY: the socket of a sock_addr context; creates zeroed storage on first use.
    let peer = unsafe { DNS_PEERS.get_or_insert_ptr_mut(ctx, None) };
    if peer.is_null() {
        return;
    }
    // SAFETY: the socket's storage, valid for the socket's life. Written field by field
    // (volatile: see `Dest`). Two sends on one socket racing leave one of the two resolvers.
    unsafe {
        let words = (&raw mut (*peer).addr).cast::<u32>();
        words.write_volatile(addr[0]);
        words.add(1).write_volatile(addr[1]);
        words.add(2).write_volatile(addr[2]);
        words.add(3).write_volatile(addr[3]);
        (&raw mut (*peer).port).write_volatile(port);
        (&raw mut (*peer).family).write_volatile(family);
    }
}

/// Whether `addr` (IPv4, network order) and `port` are a proxy address of `config`.
#[inline(always)]
fn from_proxy(config: &DnsConfig, addr: u32, port: [u8; 2]) -> bool {
    config.enabled != 0 && config.in_net(addr.to_ne_bytes()) && port == config.port
}

/// The source of a datagram an IPv4 socket reads: the proxy's address becomes the resolver's.
/// (recvmsg programs must return 1.)
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

/// The peer of a connected IPv4 socket.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

#[inline(always)]
fn restore_v4(ctx: &SockAddrContext) {
    let config = config();
    // SAFETY: `user_ip4` and `user_port` are readable and writable in recvmsg4/getpeername4.
    let (addr, port) = unsafe { ((*ctx.sock_addr).user_ip4, port_of(ctx)) };
    if !from_proxy(&config, addr, port) {
        return;
    }
    // SAFETY: the socket's storage (or null); only read.
    let peer = unsafe { DNS_PEERS.get_ptr_mut(ctx) };
    if peer.is_null() {
        return;
    }
    // SAFETY: as above.
    unsafe {
        if (*peer).family != FAMILY_V4 {
            return;
        }
        (*ctx.sock_addr).user_ip4 = (*peer).addr[0];
        (*ctx.sock_addr).user_port = u32::from_ne_bytes([(*peer).port[0], (*peer).port[1], 0, 0]);
    }
}

#[inline(always)]
fn restore_v6(ctx: &SockAddrContext) {
    let config = config();
    // SAFETY: `user_ip6` and `user_port` are readable and writable in recvmsg6/getpeername6.
    let (w, port) = unsafe { ((*ctx.sock_addr).user_ip6, port_of(ctx)) };
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    if !mapped || !from_proxy(&config, w[3], port) {
        return;
    }
    // SAFETY: the socket's storage (or null); only read.
    let peer = unsafe { DNS_PEERS.get_ptr_mut(ctx) };
    if peer.is_null() {
        return;
    }
    // SAFETY: as above. An IPv4 resolver asked from this dual-stack socket (through its
    // IPv4-mapped form, which the kernel judges in sendmsg4) is shown IPv4-mapped.
    unsafe {
        let v4 = (*peer).family == FAMILY_V4;
        let ip6 = (&raw mut (*ctx.sock_addr).user_ip6).cast::<u32>();
        ip6.write_volatile(if v4 { 0 } else { (*peer).addr[0] });
        ip6.add(1).write_volatile(if v4 { 0 } else { (*peer).addr[1] });
        ip6.add(2).write_volatile(if v4 { u32::from_ne_bytes([0, 0, 0xff, 0xff]) } else { (*peer).addr[2] });
        ip6.add(3).write_volatile(if v4 { (*peer).addr[0] } else { (*peer).addr[3] });
        (*ctx.sock_addr).user_port = u32::from_ne_bytes([(*peer).port[0], (*peer).port[1], 0, 0]);
    }
}

/// A destination the rule table left at `no_rule`: an address the proxy handed the agent for a
/// name its rules allow, at the destination's port or for every port, until it expires. Only
/// for outbound decisions of agents with [`FLAG_NAMES`]; every other decision is left as it is.
#[inline(always)]
pub fn learned_or(
    task: &Task,
    dir: u8,
    proto: u8,
    port: [u8; 2],
    addr: [u32; 4],
    family: u8,
    decided: Decision,
) -> Decision {
    if dir != DIR_OUT
        || decided.reason != ztseg_common::decision::reason::NO_RULE
        || task.agent.flags & FLAG_NAMES == 0
    {
        return decided;
    }
    let mut key = Learned { cgroup_id: task.cgroup_id, addr, port, family, proto, _pad: 0 };
    // SAFETY: copied out at once, never kept.
    let at_port: LearnedValue = unsafe { LEARNED.get(&key).copied() }.unwrap_or(NOT_LEARNED);
    let found = learned(&at_port, task.now);
    if found.passes() {
        return found;
    }
    key.port = ANY_PORT;
    // SAFETY: as above.
    let any_port: LearnedValue = unsafe { LEARNED.get(&key).copied() }.unwrap_or(NOT_LEARNED);
    learned(&any_port, task.now)
}
