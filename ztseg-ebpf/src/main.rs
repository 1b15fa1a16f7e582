//! ztseg's kernel programs, attached once at the agents' root cgroup.
//!
//! Each program judges one socket operation with one chain of map lookups (agent state, then the
//! destination's port bucket and, unless the table's id says it has none, every-port bucket of
//! the agent's rule table) and no loops, and
//! writes one event record before it returns. The decision logic lives in
//! `ztseg_common::decision` so it is unit-tested without a kernel; this file reads the context,
//! looks things up, reports and returns the verdict.
#![no_std]
#![no_main]
// The bpfel target has no atomic read-modify-write in `core::sync::atomic` ("atomic-cas": false),
// but the BPF ISA has an atomic add (BPF_ATOMIC | BPF_ADD, "lock xadd" when the result is unused).
// The intrinsic reaches it; the eBPF build already runs with RUSTC_BOOTSTRAP (-Z build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod dns;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage, lpm_trie::Key,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
        generated::{
            bpf_get_current_comm, bpf_get_socket_uid, bpf_ringbuf_query, bpf_sk_fullsock, bpf_sk_storage_get,
            bpf_skb_cgroup_id,
        },
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockoptContext},
};
use ztseg_common::{
    agent::AgentState,
    decision::{
        Decision, NO_MATCH, NO_RULE_ID, combine_found, dry_run, enforced, gate, gate_rules, held, reason,
    },
    event::{
        ACTION_ACCEPT, ACTION_CONNECT, ACTION_RECEIVE, ACTION_SENDMSG, ACTION_SOCKET, AgentStats,
        BUDGET_WINDOW_NS, Event, FAMILY_V4, FAMILY_V6, RECORDS_PER_WINDOW, Summary, SummaryKey,
        UNREGISTERED_SLOT,
    },
    maps::{EVENTS_BYTES, MAX_AGENTS, MAX_RULES, MAX_SUMMARIES, SHED_DENIALS_AT, wake_reader},
    packet::{self, Arrival, Headers, Peer, Peers, REPLY_PEERS, STATE_ESTABLISHED},
    rule::{
        ANY_PORT, DIR_IN, DIR_OUT, Dest6, PROTO_TCP, PROTO_UDP, Rule4, Rule6, RuleValue, effective_v4,
        effective_v6, has_every_port,
    },
    sockopt,
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

#[btf_map(name = "events")]
static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

// The two counter maps: per-CPU, both counted by `count` (an atomic add on this CPU's copy).
#[btf_map(name = "drops")]
static DROPS: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map(name = "stats")]
static STATS: PerCpuArray<AgentStats, { MAX_AGENTS as usize + 1 }> = PerCpuArray::new();

/// Repeated decisions of agents over their record budget, counted per CPU (see `summarise`).
#[btf_map(name = "summaries")]
static SUMMARIES: PerCpuHashMap<
    SummaryKey,
    Summary,
    { MAX_SUMMARIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

#[btf_map(name = "summary_epoch")]
static SUMMARY_EPOCH: Array<u32, 1> = Array::new();

/// Where `summarise` builds a key and a first value: in map memory, written field by field (a
/// struct built on the stack would be zeroed and copied with `memset`/`memcpy`; see `Dest`).
#[repr(C)]
struct Scratch {
    key: SummaryKey,
    value: Summary,
}

/// One scratch slot per nesting level of programs on a CPU: a task's program can be preempted by
/// another task's and interrupted by a softirq's `packets_in`, and one slot shared between them
/// would let the inner one overwrite the outer one's half-built key (counting its decision under
/// another key, or another agent).
const SCRATCH_LEVELS: u64 = 4;

#[btf_map(name = "summary_scratch")]
static SCRATCH: PerCpuArray<Scratch, { SCRATCH_LEVELS as usize }> = PerCpuArray::new();

/// This CPU's nesting level in `summarise` (the scratch slot the next program takes).
#[btf_map(name = "summary_nest")]
static NEST: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map(name = "replies")]
static REPLIES: SkStorage<Peers> = SkStorage::new();

/// Never read by a program: the daemon updates it to wait out running programs (see
/// `ztseg_common::maps::RCU_BARRIER`).
#[btf_map(name = "rcu_barrier")]
static RCU_BARRIER: ArrayOfMaps<Array<u32, 1>, 1> = ArrayOfMaps::new();

#[btf_map(name = "rcu_barrier_in")]
static RCU_BARRIER_INNER: Array<u32, 1> = Array::new();

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // Port 53 goes to the daemon's DNS proxy (see `dns`); everything else to the rules.
    let target = Target::given_v4(&ctx);
    match dns::redirect_v4(&ctx, ACTION_CONNECT, target) {
        dns::NOT_DNS => judge_v4(&ctx, ACTION_CONNECT, target),
        verdict => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // Port 53 goes to the daemon's DNS proxy (see `dns`); everything else to the rules.
    let target = Target::given_v6(&ctx);
    match dns::redirect_v6(&ctx, ACTION_CONNECT, target) {
        dns::NOT_DNS => judge_v6(&ctx, ACTION_CONNECT, target),
        verdict => verdict,
    }
}

/// Where a connect or send goes, as the hook sees it: the address the call gave, or, for a
/// send with none (`given` false), the socket's connected peer. A connected UDP socket's send
/// that carries an IP-level control message (IP_TOS or IPV6_TCLASS for ECN, IP_PKTINFO: what
/// QUIC stacks add) runs the sendmsg hook with an all-zero address, and the datagram goes to
/// the connected peer, so that is what is judged. A given address never reads as none: the
/// kernel refuses a send to port 0 before the hook. (Not an `Option`: see `Task`.)
#[derive(Clone, Copy)]
pub struct Target {
    /// Network order: `[ip4, 0, 0, 0]` or the four words of an IPv6 address.
    pub ip: [u32; 4],
    /// Network order.
    pub port: [u8; 2],
    pub given: bool,
}

impl Target {
    #[inline(always)]
    fn given_v4(ctx: &SockAddrContext) -> Self {
        // SAFETY: the kernel hands a valid `bpf_sock_addr` to cgroup/sock_addr programs.
        Self { ip: [unsafe { (*ctx.sock_addr).user_ip4 }, 0, 0, 0], port: port_of(ctx), given: true }
    }

    #[inline(always)]
    fn given_v6(ctx: &SockAddrContext) -> Self {
        // SAFETY: as above.
        Self { ip: unsafe { (*ctx.sock_addr).user_ip6 }, port: port_of(ctx), given: true }
    }

    /// A send's target: the given address, or, when the hook was run with none (an all-zero
    /// address: family 0, port 0), the connected peer, read by `peer` from the socket.
    #[inline(always)]
    fn send(ctx: &SockAddrContext, given: Self, peer: impl Fn(*const bpf_sock) -> [u32; 4]) -> Self {
        // SAFETY: as above; `user_family` is readable in every sock_addr program.
        if given.port != [0, 0] || unsafe { (*ctx.sock_addr).user_family } != 0 {
            return given;
        }
        // SAFETY: the context's socket is never null; `dst_port` (network order, in the first
        // two bytes of its 4-byte word) is a readable field of `bpf_sock`. Volatile, field by
        // field: the verifier allows no pointer arithmetic on a socket, only loads at constant
        // offsets from it.
        unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            let port = core::ptr::read_volatile((&raw const (*sk).dst_port).cast::<u32>()).to_ne_bytes();
            Self { ip: peer(sk), port: [port[0], port[1]], given: false }
        }
    }

    #[inline(always)]
    fn send_v4(ctx: &SockAddrContext) -> Self {
        // SAFETY (the reader): a socket of the context; `dst_ip4` is network order.
        Self::send(ctx, Self::given_v4(ctx), |sk| {
            [unsafe { core::ptr::read_volatile(&raw const (*sk).dst_ip4) }, 0, 0, 0]
        })
    }

    #[inline(always)]
    fn send_v6(ctx: &SockAddrContext) -> Self {
        // SAFETY (the reader): as in `send_v4`; `dst_ip6` is four network-order words, read one
        // by one.
        Self::send(ctx, Self::given_v6(ctx), |sk| unsafe {
            let ip6 = (&raw const (*sk).dst_ip6).cast::<u32>();
            [
                core::ptr::read_volatile(ip6),
                core::ptr::read_volatile(ip6.add(1)),
                core::ptr::read_volatile(ip6.add(2)),
                core::ptr::read_volatile(ip6.add(3)),
            ]
        })
    }
}

/// Runs for unconnected UDP sends, and for a connected socket's send with an IP-level control
/// message (see `Target`); other sends of a connected UDP socket were judged at its connect. An
/// allowed destination of an unconnected send is remembered on the socket, so that its replies
/// come in.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // Port 53 goes to the daemon's DNS proxy (see `dns`); everything else to the rules.
    let target = Target::send_v4(&ctx);
    match dns::redirect_v4(&ctx, ACTION_SENDMSG, target) {
        dns::NOT_DNS => judge_v4(&ctx, ACTION_SENDMSG, target),
        verdict => verdict,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    // Port 53 goes to the daemon's DNS proxy (see `dns`); everything else to the rules.
    let target = Target::send_v6(&ctx);
    match dns::redirect_v6(&ctx, ACTION_SENDMSG, target) {
        dns::NOT_DNS => judge_v6(&ctx, ACTION_SENDMSG, target),
        verdict => verdict,
    }
}

/// Every packet into an agent's socket: nothing comes in while the agent is killed, paused,
/// expired or without a token; and a connection attempt to a listening socket or a datagram to
/// an unconnected one (other than a reply to its own send) comes in only when an inbound rule
/// grants it, with a record (see `packet::arrival`).
#[cgroup_skb(ingress)]
pub fn packets_in(ctx: SkBuffContext) -> i32 {
    let Some(sk) = full_socket(&ctx) else {
        return judge_packet(&ctx, false);
    };
    // SAFETY: a full socket the kernel handed us; plain field reads.
    let (protocol, state, local_port) = unsafe { ((*sk).protocol, (*sk).state, (*sk).src_port) };
    if protocol == PROTO_TCP as u32 && state == STATE_ESTABLISHED {
        // The bulk of all traffic: skip the classification.
        return judge_packet(&ctx, false);
    }
    let first: u8 = ctx.load(0).unwrap_or(0);
    let (version, ihl) = (first >> 4, first & 0x0f);
    let next: u8 = ctx.load(if version == 6 { 6 } else { 9 }).unwrap_or(u8::MAX);
    // The transport header, when it follows the IP header directly; otherwise none is read and
    // the packet is judged without one (no SYN seen, no reply recognised: fails closed).
    let l4 = match version {
        4 => Some(usize::from(ihl) * 4),
        6 if next == PROTO_TCP || next == PROTO_UDP => Some(40),
        _ => None,
    };
    let tcp_flags: u8 = match l4 {
        Some(at) if next == PROTO_TCP => ctx.load(at + 13).unwrap_or(0),
        // Behind extension headers: the flags are unknown, so the packet is recorded as an
        // opening (a SYN hidden behind a hop-by-hop header must not go unrecorded).
        _ => packet::TCP_SYN,
    };
    let sender = match version {
        4 => Peer::v4(ctx.load(12).unwrap_or(0), [0; 2]),
        _ => Peer::v6(
            [
                ctx.load(8).unwrap_or(0),
                ctx.load(12).unwrap_or(0),
                ctx.load(16).unwrap_or(0),
                ctx.load(20).unwrap_or(0),
            ],
            [0; 2],
        ),
    };
    let reply = protocol == PROTO_UDP as u32
        && next == PROTO_UDP
        && match l4 {
            Some(at) => is_reply(sk, &Peer { port: ctx.load(at).unwrap_or([0; 2]), ..sender }),
            None => false,
        };
    let (action, emit) = match packet::arrival(protocol, state, tcp_flags, reply) {
        Arrival::Judged => return judge_packet(&ctx, false),
        Arrival::Connection { opening } => (ACTION_ACCEPT, opening),
        Arrival::Datagram => (ACTION_RECEIVE, true),
    };
    let task = Task::of_packet(&ctx);
    // Protocols above 255 cannot be granted; they are judged as 255, which no rule names.
    let proto = u8::try_from(protocol).unwrap_or(u8::MAX);
    let port = u16::try_from(local_port).unwrap_or(0).to_be_bytes();
    let dest = Dest { family: sender.family, proto, addr: sender.addr, port };
    let decision = if version == 4 {
        decide_v4(&task, DIR_IN, proto, port, sender.addr[0].to_ne_bytes())
    } else if version == 6 && !packet::v4_mapped(&sender.addr) {
        decide_v6(&task, DIR_IN, proto, port, bytes16(sender.addr))
    } else {
        // An IPv6 packet from an IPv4-mapped address would reach a dual-stack socket looking
        // like an IPv4 sender while judged by IPv6 rules; no real sender has such an address.
        Decision::deny(reason::PROTOCOL)
    };
    task.report(action, dest, &decision, emit)
}

/// The full socket a packet belongs to, if any.
#[inline(always)]
fn full_socket(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: `sk` of a cgroup_skb context is readable (a socket or null); the helper checks it.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a non-null socket pointer from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(full)
}

/// Whether `peer` is one the socket sent to (its `replies` storage, if it has any).
#[inline(always)]
fn is_reply(sk: *mut bpf_sock, peer: &Peer) -> bool {
    // SAFETY: a full socket; without the create flag the helper only looks up.
    let peers = unsafe {
        bpf_sk_storage_get((&raw const REPLIES).cast_mut().cast(), sk.cast(), core::ptr::null_mut(), 0)
    }
    .cast::<Peers>();
    // SAFETY: the helper returns the socket's storage or null.
    !peers.is_null() && unsafe { (*peers).contains(peer) }
}

/// Remembers an allowed destination of an unconnected send on the socket.
#[inline(always)]
fn remember_peer(ctx: &SockAddrContext, peer: &Peer) {
    // SAFETY: the socket of a sock_addr context; creates zeroed storage on first use.
    let peers = unsafe { REPLIES.get_or_insert_ptr_mut(ctx, None) };
    if peers.is_null() {
        return;
    }
    // SAFETY: the socket's storage, valid for the socket's life. Two sends on one socket may
    // race here; the worst outcome is a slot holding a mix of two allowed destinations, or one
    // of them not remembered (its replies are then judged as unsolicited).
    unsafe {
        let Some(slot) = (*peers).slot_for(peer) else {
            return;
        };
        if slot >= REPLY_PEERS {
            return;
        }
        let to = (&raw mut (*peers).peers[slot]);
        let addr = (&raw mut (*to).addr).cast::<u32>();
        addr.write_volatile(peer.addr[0]);
        addr.add(1).write_volatile(peer.addr[1]);
        addr.add(2).write_volatile(peer.addr[2]);
        addr.add(3).write_volatile(peer.addr[3]);
        (&raw mut (*to).port).write_volatile(peer.port);
        (&raw mut (*to).family).write_volatile(peer.family);
        (*peers).next = (*peers).next.wrapping_add(1);
    }
}

/// Every packet out of an agent's socket: nothing leaves while the agent is denied (but a TCP
/// reset), and nothing leaves with IPv4 options or an IPv6 routing header, which would take it
/// somewhere other than the destination the socket hooks judged.
#[cgroup_skb(egress)]
pub fn packets_out(ctx: SkBuffContext) -> i32 {
    judge_packet(&ctx, true)
}

#[inline(always)]
fn judge_packet(ctx: &SkBuffContext, egress: bool) -> i32 {
    // SAFETY: the kernel hands cgroup_skb programs a valid skb; the helpers only read it.
    let (cgroup_id, now) = unsafe { (bpf_skb_cgroup_id(ctx.skb.skb), bpf_ktime_get_boot_ns()) };
    // SAFETY: the entry is copied out at once, never kept.
    let agent = unsafe { AGENTS.get(cgroup_id).copied() };
    // The skb starts at the IP header. An unreadable byte reads as a value that fails closed.
    let first: u8 = ctx.load(0).unwrap_or(0);
    let version = first >> 4;
    let ihl = first & 0x0f;
    let next: u8 = ctx.load(if version == 6 { 6 } else { 9 }).unwrap_or(u8::MAX);
    let mut headers = Headers { version, ihl, next, tcp_flags: 0 };
    if egress && next == PROTO_TCP as u8 {
        let tcp = if version == 6 { 40 } else { usize::from(ihl) * 4 };
        headers.tcp_flags = ctx.load(tcp + 13).unwrap_or(0);
    }
    if packet::passes(agent.as_ref(), now, egress, &headers) { ALLOW } else { DENY }
}

/// Refuses the sockets no other hook can judge: raw sockets, and protocols other than TCP and UDP
/// (SCTP and MPTCP connect on their own terms, ping sockets send without a sendmsg hook).
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock` to cgroup/sock_create programs.
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    // A TCP or UDP socket reaches nothing by itself: its connects, sends and every packet in are
    // judged (an unregistered cgroup's included, refused as `unregistered` there). It is let
    // through at once, with no lookup, neither timed, counted nor recorded: this hook runs for
    // every socket an agent opens, and the decision that matters is the connect's.
    if sock_type != SOCK_RAW && (protocol == PROTO_TCP as u32 || protocol == PROTO_UDP as u32) {
        return ALLOW;
    }
    let task = Task::current();
    let decision = match task.gate() {
        Err(denied) if denied.reason == reason::UNREGISTERED => denied,
        _ if sock_type == SOCK_RAW => Decision::deny(reason::RAW_SOCKET),
        _ => Decision::deny(reason::PROTOCOL),
    };
    let dest = Dest {
        family: if family == AF_INET6 { FAMILY_V6 } else { FAMILY_V4 },
        // Protocols above 255 (MPTCP is 262) are reported as 255.
        proto: u8::try_from(protocol).unwrap_or(u8::MAX),
        addr: [0; 4],
        port: [0; 2],
    };
    task.report(ACTION_SOCKET, dest, &decision, true)
}

/// Neutralises the socket options that would let something no hook judges reach the agent
/// (`sockopt::neutralised`: the ICMP error queue): the call succeeds and the option is not
/// applied. A refusal would break glibc's resolver, which turns IP_RECVERR on for every query
/// socket and gives up the query when it cannot.
#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sockopt` to cgroup/setsockopt programs; `optlen`
    // is writable, and -1 tells the kernel to skip its own handling and return success.
    unsafe {
        if sockopt::neutralised((*ctx.sockopt).level, (*ctx.sockopt).optname) {
            (*ctx.sockopt).optlen = -1;
        }
    }
    ALLOW
}

const AF_INET6: u32 = 10;

/// The destination as judged. The address is kept as network-order words: zeroing or copying
/// 16-byte arrays makes LLVM call `memset`/`memcpy`, which with BTF become global functions the
/// verifier refuses ("number of funcs in func_info doesn't match number of subprogs").
#[derive(Clone, Copy)]
struct Dest {
    family: u8,
    proto: u8,
    addr: [u32; 4],
    port: [u8; 2],
}

/// The task making the request (or, for an incoming packet, the socket it reached) and the
/// agent it belongs to.
struct Task {
    cgroup_id: u64,
    now: u64,
    /// Copied out at once: the daemon may replace the entry while we run. All zero for no
    /// entry (`slot` then says so): not an `Option`, whose `None` payload LLVM may spill
    /// uninitialised, which the verifier refuses.
    agent: AgentState,
    /// The agent's stats slot, `UNREGISTERED_SLOT` without an entry.
    slot: u32,
    /// For an incoming packet: no task of the agent is running, the record carries the socket
    /// owner's uid (read from this skb only when a record is written) and no pid or comm. Null
    /// for a task (not an `Option`: LLVM may spill a `None`'s undefined payload, and the
    /// verifier refuses reading an uninitialised register).
    packet: *mut __sk_buff,
}

impl Task {
    /// The current task's cgroup is the agent: agents cannot move between cgroups.
    #[inline(always)]
    fn current() -> Self {
        // SAFETY: plain helper calls without arguments.
        let (cgroup_id, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_boot_ns()) };
        Self::of(cgroup_id, now, core::ptr::null_mut())
    }

    /// The agent whose socket an incoming packet reached (the socket's cgroup).
    #[inline(always)]
    fn of_packet(ctx: &SkBuffContext) -> Self {
        // SAFETY: the kernel hands cgroup_skb programs a valid skb; the helpers only read it.
        let (cgroup_id, now) = unsafe { (bpf_skb_cgroup_id(ctx.skb.skb), bpf_ktime_get_boot_ns()) };
        Self::of(cgroup_id, now, ctx.skb.skb)
    }

    /// The agent of `cgroup_id`: its entry copied out (all zero without one, the slot then
    /// `UNREGISTERED_SLOT`).
    #[inline(always)]
    fn of(cgroup_id: u64, now: u64, packet: *mut __sk_buff) -> Self {
        // SAFETY: the reference is only read here, never kept.
        let found = unsafe { AGENTS.get(cgroup_id) };
        let slot = found.map_or(UNREGISTERED_SLOT, |a| a.slot);
        let agent = found.copied().unwrap_or_default();
        Self { cgroup_id, now, agent, slot, packet }
    }

    #[inline(always)]
    fn gate(&self) -> Result<u32, Decision> {
        gate(self.entry(), self.now)
    }

    #[inline(always)]
    fn gate_rules(&self) -> Result<u32, Decision> {
        gate_rules(self.entry(), self.now)
    }

    /// Read after [`Self::gate_rules`] passed: the agent is registered.
    #[inline(always)]
    fn paused(&self) -> bool {
        self.agent.paused()
    }

    /// The agent's `AgentState::mode` (read after [`Self::gate_rules`] passed).
    #[inline(always)]
    fn mode(&self) -> u32 {
        self.agent.mode
    }

    /// The agent's entry, `None` without one.
    #[inline(always)]
    fn entry(&self) -> Option<&AgentState> {
        if self.slot == UNREGISTERED_SLOT { None } else { Some(&self.agent) }
    }

    /// The rule table in force (0 without an entry: the zeroed `agent`).
    #[inline(always)]
    fn table(&self) -> u32 {
        self.agent.table
    }

    #[inline(always)]
    fn slot(&self) -> u32 {
        self.slot
    }

    /// Writes the event (when `emit`), counts the decision, and returns the program's verdict.
    ///
    /// A decision is recorded in one of two ways: its own record in the ring, or a count in its
    /// summary (a pinned map the daemon drains every second into a record with the count). It
    /// goes to the ring unless its agent is past its record budget on this CPU, or it is a
    /// denial and the ring is more than half full (the rest is kept for allows); a decision
    /// whose ring record cannot be reserved (the ring is full) is summarised instead. Nothing is
    /// allowed unrecorded: an allow that neither way can record (the summaries map is full too)
    /// is refused (`unrecorded`); such a denial is counted (`dropped`).
    #[inline(always)]
    fn report(&self, action: u8, dest: Dest, decision: &Decision, emit: bool) -> i32 {
        if !emit {
            self.count(decision, Outcome::Quiet);
            return verdict(decision);
        }
        // A denial shed past half the ring takes no record of the budget. What passes (an allow,
        // a would-be denial in audit mode) is never shed.
        let to_ring = (decision.passes() || ring_unread() < SHED_DENIALS_AT) && !self.over_budget();
        if to_ring && let Some(mut entry) = EVENTS.reserve(0) {
            // SAFETY: the reserved, writable record (see `fill`).
            unsafe { self.fill(entry.as_mut_ptr(), action, &dest, decision) };
            // Waking the reader per record would cost more than the decision: wake it once per
            // window of backlog; it also drains on a timer.
            let wake = if wake_reader(ring_unread()) { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
            entry.submit(wake.into());
            self.count(decision, Outcome::Written);
            return verdict(decision);
        }
        if to_ring && let Some(drops) = DROPS.get_ptr_mut(0) {
            // A full ring. SAFETY: this CPU's slot of the map value (see `count`).
            unsafe { count(drops) };
        }
        if self.summarise(action, &dest, decision) {
            self.count(decision, Outcome::Summarised);
            return verdict(decision);
        }
        if decision.passes() {
            // Logged before delivered, or not delivered: an allow (or a would-be denial in audit
            // mode) whose record cannot be made is refused with reason `unrecorded`.
            self.count(decision, Outcome::Unrecorded);
            return DENY;
        }
        self.count(decision, Outcome::Dropped);
        DENY
    }

    /// Writes the whole record of this decision at `event`.
    ///
    /// # Safety
    /// `event` points to writable memory for one `Event` (a reserved ring record or a map value).
    #[inline(always)]
    unsafe fn fill(&self, event: *mut Event, action: u8, dest: &Dest, decision: &Decision) {
        // SAFETY: every field is written (the comm helper fills all 16 bytes, NUL-padded, or
        // zeroes them).
        unsafe {
            (*event).ts_boot_ns = self.now;
            (*event).cgroup_id = self.cgroup_id;
            (*event).rule_id = decision.rule_id;
            (*event).table = self.table();
            if self.packet.is_null() {
                (*event).pid_tgid = bpf_get_current_pid_tgid();
                (*event).uid_gid = bpf_get_current_uid_gid();
                bpf_get_current_comm((&raw mut (*event).comm).cast(), 16);
            } else {
                (*event).pid_tgid = 0;
                (*event).uid_gid = u64::from(bpf_get_socket_uid(self.packet));
                let comm = (&raw mut (*event).comm).cast::<u64>();
                comm.write_volatile(0);
                comm.add(1).write_volatile(0);
            }
            // Volatile: for socket events these are constant zeros, which LLVM would
            // merge into a `memset` call (see `Dest`).
            let addr = (&raw mut (*event).addr).cast::<u32>();
            addr.write_volatile(dest.addr[0]);
            addr.add(1).write_volatile(dest.addr[1]);
            addr.add(2).write_volatile(dest.addr[2]);
            addr.add(3).write_volatile(dest.addr[3]);
            (&raw mut (*event).port).write_volatile(dest.port);
            (*event).family = dest.family;
            (*event).proto = dest.proto;
            (*event).action = action;
            (*event).verdict = decision.verdict;
            (*event).reason = decision.reason;
            (*event)._pad = 0;
        }
    }

    /// Whether this agent has used up its record budget on this CPU for the current window
    /// (`RECORDS_PER_WINDOW` per `BUDGET_WINDOW_NS`); takes one record of it if not.
    #[inline(always)]
    fn over_budget(&self) -> bool {
        let Some(stats) = STATS.get_ptr_mut(self.slot()) else { return false };
        // SAFETY: this CPU's copy of a valid array element. A program that preempts this one
        // on the same CPU may interleave its update: the budget is then off by one, no count
        // is (counts go through `count`).
        unsafe {
            if self.now.wrapping_sub((*stats).budget_start_ns) >= BUDGET_WINDOW_NS {
                (*stats).budget_start_ns = self.now;
                (*stats).budget_used = 0;
            }
            if (*stats).budget_used >= RECORDS_PER_WINDOW {
                return true;
            }
            (*stats).budget_used += 1;
        }
        false
    }

    /// Counts the decision in its summary (this CPU's copy; the first one in full); false when
    /// the summaries map is full. What passes (an allow, a would-be denial) is counted by its
    /// destination; a denial only by its reason (its key's destination is zero, its first record
    /// names one).
    #[inline(always)]
    fn summarise(&self, action: u8, dest: &Dest, decision: &Decision) -> bool {
        let Some(nest) = NEST.get_ptr_mut(0) else { return false };
        // SAFETY: this CPU's counter. Nesting on a CPU is last in, first out: a program that
        // interrupts between the read and the write below runs to its end (restoring the level)
        // before this one touches its slot, so no two running programs share a slot. Volatile:
        // the compiler must not move the accesses across the slot's use.
        let level = unsafe { nest.read_volatile() };
        if level >= SCRATCH_LEVELS {
            return false;
        }
        // SAFETY: as above.
        unsafe { nest.write_volatile(level + 1) };
        let counted = self.summarise_in(level as u32, action, dest, decision);
        // SAFETY: as above.
        unsafe { nest.write_volatile(level) };
        counted
    }

    /// `summarise` with scratch slot `level`, which no other running program uses.
    #[inline(always)]
    fn summarise_in(&self, level: u32, action: u8, dest: &Dest, decision: &Decision) -> bool {
        let Some(scratch) = SCRATCH.get_ptr_mut(level) else { return false };
        let epoch = SUMMARY_EPOCH.get(0).map_or(0, |e| *e as u8);
        let exact = decision.passes();
        // SAFETY: this CPU's scratch value, written field by field before it is used as a key
        // or a value; summary values are this CPU's copies (counted with `count`).
        unsafe {
            let key = &raw mut (*scratch).key;
            (*key).cgroup_id = self.cgroup_id;
            let addr = (&raw mut (*key).addr).cast::<u32>();
            addr.write_volatile(if exact { dest.addr[0] } else { 0 });
            addr.add(1).write_volatile(if exact { dest.addr[1] } else { 0 });
            addr.add(2).write_volatile(if exact { dest.addr[2] } else { 0 });
            addr.add(3).write_volatile(if exact { dest.addr[3] } else { 0 });
            (*key).rule_id = decision.rule_id;
            (*key).table = self.table();
            (&raw mut (*key).port).write_volatile(if exact { dest.port } else { [0, 0] });
            (*key).family = dest.family;
            (*key).proto = dest.proto;
            (*key).action = action;
            (*key).verdict = decision.verdict;
            (*key).reason = decision.reason;
            (*key).epoch = epoch;
            if let Some(summary) = SUMMARIES.get_ptr_mut(&*key) {
                self.add_to(summary, action, dest, decision);
                return true;
            }
            let value = &raw mut (*scratch).value;
            self.fill(&raw mut (*value).first, action, dest, decision);
            (*value).count = 1;
            (*value).last_ns = self.now;
            if SUMMARIES.insert(&*key, &*value, BPF_NOEXIST.into()).is_ok() {
                return true;
            }
            // Another CPU inserted the key meanwhile (or the map is full).
            match SUMMARIES.get_ptr_mut(&*key) {
                Some(summary) => {
                    self.add_to(summary, action, dest, decision);
                    true
                }
                None => false,
            }
        }
    }

    /// Adds this decision to this CPU's copy of a summary, starting the copy if it is new.
    ///
    /// # Safety
    /// `summary` is this CPU's copy of a `summaries` value.
    #[inline(always)]
    unsafe fn add_to(&self, summary: *mut Summary, action: u8, dest: &Dest, decision: &Decision) {
        // SAFETY: as the caller promises.
        unsafe {
            if (*summary).count == 0 {
                self.fill(&raw mut (*summary).first, action, dest, decision);
            }
            count(&raw mut (*summary).count);
            (*summary).last_ns = self.now;
        }
    }

    /// Counts a decision in the one counter of its outcome (see `AgentStats`).
    #[inline(always)]
    fn count(&self, decision: &Decision, outcome: Outcome) {
        let Some(stats) = STATS.get_ptr_mut(self.slot()) else { return };
        let passed = decision.passes();
        // SAFETY: this CPU's copy of a valid array element (see `count`).
        unsafe {
            let counter = match outcome {
                Outcome::Written if passed => &raw mut (*stats).passed_written,
                Outcome::Written => &raw mut (*stats).denied_written,
                Outcome::Summarised if passed => &raw mut (*stats).passed_summarised,
                Outcome::Summarised => &raw mut (*stats).denied_summarised,
                Outcome::Dropped => &raw mut (*stats).denied_dropped,
                Outcome::Unrecorded => &raw mut (*stats).unrecorded,
                Outcome::Quiet if passed => &raw mut (*stats).passed_quiet,
                Outcome::Quiet => &raw mut (*stats).denied_quiet,
            };
            count(counter);
        }
    }
}

/// What became of a decision's record (the counter `Task::count` adds to).
#[derive(Clone, Copy)]
enum Outcome {
    /// Written to the ring.
    Written,
    /// Counted in a summary.
    Summarised,
    /// A denial neither written nor summarised.
    Dropped,
    /// An allow refused because neither way could record it.
    Unrecorded,
    /// Not reported (`emit` false).
    Quiet,
}

/// Bytes written to the events ring and not yet consumed by the daemon.
#[inline(always)]
fn ring_unread() -> u64 {
    // SAFETY: the ring buffer map's address, as the helper expects.
    unsafe { bpf_ringbuf_query((&raw const EVENTS).cast_mut().cast(), BPF_RB_AVAIL_DATA.into()) }
}

#[inline(always)]
fn verdict(decision: &Decision) -> i32 {
    if decision.passes() { ALLOW } else { DENY }
}

/// Adds one to a counter in this CPU's copy of a per-CPU map value: the one way `stats` and
/// `drops` are counted. No other CPU writes that copy, so the add costs no shared cache line; it
/// is still atomic because another program may run on this CPU in the middle of it (a preempted
/// sock_addr program, a softirq's `packets_in`), and a plain `+= 1` would then lose a count.
///
/// # Safety
/// `counter` points into a map value.
#[inline(always)]
unsafe fn count(counter: *mut u64) {
    // SAFETY: the caller passes a valid, 8-byte aligned map value field. The old value is not
    // used, so this compiles to the plain atomic add every BPF CPU version has.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
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
fn v4_dest(proto: u8, port: [u8; 2], addr: [u8; 4]) -> Dest {
    Dest { family: FAMILY_V4, proto, addr: [u32::from_ne_bytes(addr), 0, 0, 0], port }
}

#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn bytes16(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

#[inline(always)]
fn judge_v4(ctx: &SockAddrContext, action: u8, target: Target) -> i32 {
    let task = Task::current();
    // Network order: its bytes are the address as written.
    let addr = effective_v4(target.ip[0].to_ne_bytes());
    let port = target.port;
    let (dest, decision) = match protocol_of(ctx) {
        Ok(proto) => (v4_dest(proto, port, addr), decide_v4(&task, DIR_OUT, proto, port, addr)),
        Err(denied) => (v4_dest(u8::MAX, port, addr), denied),
    };
    finish(ctx, &task, action, target, dest, &decision)
}

/// Reports the decision of a connect or send; an allowed unconnected send's destination is
/// remembered on the socket first, so that the reply finds it (a connected socket's replies
/// come from its peer).
#[inline(always)]
fn finish(
    ctx: &SockAddrContext,
    task: &Task,
    action: u8,
    target: Target,
    dest: Dest,
    decision: &Decision,
) -> i32 {
    if action == ACTION_SENDMSG && target.given && decision.passes() {
        remember_peer(ctx, &Peer { addr: dest.addr, port: dest.port, family: dest.family, _pad: 0 });
    }
    task.report(action, dest, decision, true)
}

#[inline(always)]
fn judge_v6(ctx: &SockAddrContext, action: u8, target: Target) -> i32 {
    let task = Task::current();
    // Four network-order words.
    let w = target.ip;
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    let addr =
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]];
    let port = target.port;
    let (dest, decision) = match (protocol_of(ctx), effective_v6(addr)) {
        (Ok(proto), Dest6::V4(v4)) => (v4_dest(proto, port, v4), decide_v4(&task, DIR_OUT, proto, port, v4)),
        (Ok(proto), Dest6::V6(v6)) => (
            Dest { family: FAMILY_V6, proto, addr: words(v6), port },
            decide_v6(&task, DIR_OUT, proto, port, v6),
        ),
        (Err(denied), _) => (Dest { family: FAMILY_V6, proto: u8::MAX, addr: w, port }, denied),
    };
    finish(ctx, &task, action, target, dest, &decision)
}

/// What the rules decided, with the agent's mode applied: an outbound denial by the rules is
/// let through as `would_deny` in audit mode (`dry_run`); an inbound decision is never dry-run.
#[inline(always)]
fn judged(dir: u8, decision: Decision, mode: u32) -> Decision {
    if dir == DIR_OUT { dry_run(decision, mode) } else { enforced(decision) }
}

#[inline(always)]
fn decide_v4(task: &Task, dir: u8, proto: u8, port: [u8; 2], addr: [u8; 4]) -> Decision {
    // A paused agent's rules are still consulted: only what they allow (or audit mode would let
    // through) is refused (`held`).
    let table = match task.gate_rules() {
        Ok(table) => table,
        Err(denied) => return denied,
    };
    if port == ANY_PORT {
        // Port 0 is no destination a rule can name; a UDP socket connected to it would take
        // datagrams from every port of the host.
        return Decision::deny(reason::NO_RULE);
    }
    let at_port = Key::new(Rule4::EXACT, Rule4 { table, proto, dir, port, addr });
    let at_port: RuleValue = RULES_V4.get(&at_port).copied().unwrap_or(NO_MATCH);
    // A table without every-port entries is not asked for one.
    let any_port: RuleValue = if has_every_port(table) {
        let any_port = Key::new(Rule4::EXACT, Rule4 { table, proto, dir, port: ANY_PORT, addr });
        RULES_V4.get(&any_port).copied().unwrap_or(NO_MATCH)
    } else {
        NO_MATCH
    };
    let decided = combine_found(&at_port, &any_port);
    let decided =
        dns::learned_or(task, dir, proto, port, [u32::from_ne_bytes(addr), 0, 0, 0], FAMILY_V4, decided);
    held(judged(dir, decided, task.mode()), task.paused())
}

#[inline(always)]
fn decide_v6(task: &Task, dir: u8, proto: u8, port: [u8; 2], addr: [u8; 16]) -> Decision {
    // A paused agent's rules are still consulted: only what they allow (or audit mode would let
    // through) is refused (`held`).
    let table = match task.gate_rules() {
        Ok(table) => table,
        Err(denied) => return denied,
    };
    if port == ANY_PORT {
        // Port 0 is no destination a rule can name; a UDP socket connected to it would take
        // datagrams from every port of the host.
        return Decision::deny(reason::NO_RULE);
    }
    let at_port = Key::new(Rule6::EXACT, Rule6 { table, proto, dir, port, addr });
    let at_port: RuleValue = RULES_V6.get(&at_port).copied().unwrap_or(NO_MATCH);
    // A table without every-port entries is not asked for one.
    let any_port: RuleValue = if has_every_port(table) {
        let any_port = Key::new(Rule6::EXACT, Rule6 { table, proto, dir, port: ANY_PORT, addr });
        RULES_V6.get(&any_port).copied().unwrap_or(NO_MATCH)
    } else {
        NO_MATCH
    };
    let decided = combine_found(&at_port, &any_port);
    let decided = dns::learned_or(task, dir, proto, port, words(addr), FAMILY_V6, decided);
    held(judged(dir, decided, task.mode()), task.paused())
}

// Keeps NO_RULE_ID referenced for readers: events of gate denials carry it as rule_id.
const _: u32 = NO_RULE_ID;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
