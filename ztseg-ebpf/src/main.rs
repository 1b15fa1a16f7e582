//! ztseg's kernel programs, attached once at the agents' root cgroup.
//!
//! Each program judges one socket operation with one chain of map lookups (agent state, then the
//! destination's port bucket and every-port bucket of the agent's rule table) and no loops. The
//! logic lives in `ztseg_common::decision` so it is unit-tested without a kernel; this file only
//! reads the context, looks things up and returns the verdict.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, lpm_trie::Key},
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use ztseg_common::{
    agent::AgentState,
    decision::{Decision, combine, gate, reason},
    maps::{MAX_AGENTS, MAX_RULES},
    rule::{ANY_PORT, Dest6, PROTO_TCP, PROTO_UDP, Rule4, Rule6, RuleValue, effective_v4, effective_v6},
};

/// Return values of cgroup programs: 1 lets the operation proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const SOCK_RAW: u32 = 3;

#[btf_map(name = "agents")]
static AGENTS: HashMap<u64, AgentState, { MAX_AGENTS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map(name = "rules_v4")]
static RULES_V4: LpmTrie<Rule4, RuleValue, { MAX_RULES as usize }> = LpmTrie::new();

#[btf_map(name = "rules_v6")]
static RULES_V6: LpmTrie<Rule6, RuleValue, { MAX_RULES as usize }> = LpmTrie::new();

/// Never read by a program: the daemon updates it to wait out running programs (see
/// `ztseg_common::maps::RCU_BARRIER`).
#[btf_map(name = "rcu_barrier")]
static RCU_BARRIER: ArrayOfMaps<Array<u32, 1>, 1> = ArrayOfMaps::new();

#[btf_map(name = "rcu_barrier_in")]
static RCU_BARRIER_INNER: Array<u32, 1> = Array::new();

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    verdict(judge_v4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    verdict(judge_v6(&ctx))
}

/// Runs for unconnected UDP sends only; a connected UDP socket was judged at connect.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(judge_v4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(judge_v6(&ctx))
}

/// Refuses the sockets no other hook can judge: raw sockets, and protocols other than TCP and UDP
/// (SCTP and MPTCP connect on their own terms, ping sockets send without a sendmsg hook).
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock` to cgroup/sock_create programs.
    let (sock_type, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    let decision = match gate_of_current() {
        Err(denied) if denied.reason == reason::UNREGISTERED => denied,
        _ if sock_type == SOCK_RAW => Decision::deny(reason::RAW_SOCKET),
        _ if protocol != PROTO_TCP as u32 && protocol != PROTO_UDP as u32 => Decision::deny(reason::PROTOCOL),
        _ => Decision::allow_socket(),
    };
    verdict(decision)
}

#[inline(always)]
fn verdict(decision: Decision) -> i32 {
    if decision.allowed() { ALLOW } else { DENY }
}

/// The agent checks for the current task's cgroup. Agents cannot move between cgroups, so the
/// task's cgroup is the agent the operation belongs to.
#[inline(always)]
fn gate_of_current() -> Result<u32, Decision> {
    // SAFETY: plain helper calls without arguments.
    let (cgroup_id, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_boot_ns()) };
    // Copy the value out at once: the daemon may replace the entry while we run.
    // SAFETY: the reference is only read here, never kept.
    let agent: Option<AgentState> = unsafe { AGENTS.get(cgroup_id).copied() };
    gate(agent.as_ref(), now)
}

#[inline(always)]
fn protocol_of(ctx: &SockAddrContext) -> Result<u8, Decision> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to cgroup/sock_addr programs.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    // IPPROTO_MPTCP is 262: truncating it to a byte would read as TCP.
    u8::try_from(protocol).map_err(|_| Decision::deny(reason::PROTOCOL))
}

/// `user_port` holds the port in network order in its first two bytes.
#[inline(always)]
fn port_of(ctx: &SockAddrContext) -> [u8; 2] {
    // SAFETY: as above; the verifier wants the whole 4-byte field read.
    let port = unsafe { (*ctx.sock_addr).user_port };
    let bytes = port.to_ne_bytes();
    [bytes[0], bytes[1]]
}

#[inline(always)]
fn judge_v4(ctx: &SockAddrContext) -> Decision {
    // SAFETY: as above. `user_ip4` is network order; its bytes are the address as written.
    let addr = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    match protocol_of(ctx) {
        Ok(protocol) => decide_v4(protocol, port_of(ctx), effective_v4(addr)),
        Err(denied) => denied,
    }
}

#[inline(always)]
fn judge_v6(ctx: &SockAddrContext) -> Decision {
    // SAFETY: as above. `user_ip6` is four network-order words.
    let w = unsafe { (*ctx.sock_addr).user_ip6 };
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    let addr =
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]];
    let protocol = match protocol_of(ctx) {
        Ok(protocol) => protocol,
        Err(denied) => return denied,
    };
    match effective_v6(addr) {
        Dest6::V4(addr) => decide_v4(protocol, port_of(ctx), addr),
        Dest6::V6(addr) => decide_v6(protocol, port_of(ctx), addr),
    }
}

#[inline(always)]
fn decide_v4(protocol: u8, port: [u8; 2], addr: [u8; 4]) -> Decision {
    let table = match gate_of_current() {
        Ok(table) => table,
        Err(denied) => return denied,
    };
    let at_port = Key::new(Rule4::EXACT, Rule4::new(table, protocol, port, addr));
    let any_port = Key::new(Rule4::EXACT, Rule4::new(table, protocol, ANY_PORT, addr));
    let at_port: Option<RuleValue> = RULES_V4.get(&at_port).copied();
    let any_port: Option<RuleValue> = RULES_V4.get(&any_port).copied();
    combine(at_port.as_ref(), any_port.as_ref())
}

#[inline(always)]
fn decide_v6(protocol: u8, port: [u8; 2], addr: [u8; 16]) -> Decision {
    let table = match gate_of_current() {
        Ok(table) => table,
        Err(denied) => return denied,
    };
    let at_port = Key::new(Rule6::EXACT, Rule6::new(table, protocol, port, addr));
    let any_port = Key::new(Rule6::EXACT, Rule6::new(table, protocol, ANY_PORT, addr));
    let at_port: Option<RuleValue> = RULES_V6.get(&at_port).copied();
    let any_port: Option<RuleValue> = RULES_V6.get(&any_port).copied();
    combine(at_port.as_ref(), any_port.as_ref())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
