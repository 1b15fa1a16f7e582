//! Decision events: one record per kernel decision, written to the `events` ring buffer before
//! the program returns, plus the counters that make lost events visible.

/// A connect (TCP, connected UDP).
pub const ACTION_CONNECT: u8 = 1;
/// An unconnected UDP send.
pub const ACTION_SENDMSG: u8 = 2;
/// Creation of a socket.
pub const ACTION_SOCKET: u8 = 3;
/// A TCP connection attempt into the agent (a SYN to a listening socket). Inbound records have
/// no task: `pid_tgid` and `comm` are zero, `uid_gid` is the socket owner's uid (gid zero),
/// `addr` is the sender's address and `port` the agent's own port.
pub const ACTION_ACCEPT: u8 = 4;
/// A datagram into an unconnected UDP socket of the agent that is not a reply to its own
/// sends. Same fields as [`ACTION_ACCEPT`].
pub const ACTION_RECEIVE: u8 = 5;

/// Whether `action` is one of the inbound ones, whose `addr` is the sender.
pub const fn inbound(action: u8) -> bool {
    action == ACTION_ACCEPT || action == ACTION_RECEIVE
}

/// The destination was judged as IPv4 (also for IPv4-mapped IPv6 destinations).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// One decision, as the kernel made it. 80 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_BOOTTIME` ns of the decision.
    pub ts_boot_ns: u64,
    /// cgroup id of the deciding task (the agent).
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid (process id) in the upper 32 bits.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the upper 32 bits.
    pub uid_gid: u64,
    /// The rule that decided (`decision::NO_RULE_ID` if none).
    pub rule_id: u32,
    /// The rule table the agent had in force: with `rule_id`, names the catalogue entry.
    pub table: u32,
    /// Task name, NUL-padded.
    pub comm: [u8; 16],
    /// Destination address as four network-order words (the bytes of each word, in memory order,
    /// are the address bytes); IPv4 in the first word. Zero for sockets.
    pub addr: [u32; 4],
    /// Destination port, network order.
    pub port: [u8; 2],
    /// `FAMILY_V4` / `FAMILY_V6`, as judged (a v4-mapped destination is `FAMILY_V4`).
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// `ACTION_*`.
    pub action: u8,
    /// `rule::VERDICT_ALLOW` / `VERDICT_DENY` / `VERDICT_WOULD_DENY` (let through in audit mode).
    pub verdict: u8,
    /// `decision::reason::*`.
    pub reason: u8,
    pub _pad: u8,
}

/// Per-agent counters, indexed by the agent's slot; the last index counts processes in no
/// registered agent (`UNREGISTERED_SLOT`). The `stats` map is per-CPU: each CPU's programs add to
/// that CPU's copy (atomic adds, no line shared between CPUs), and a reader sums the copies
/// into [`AgentCounts`] ([`AgentStats::total`]).
///
/// Each decision adds one to exactly one counter, the one of its outcome (one atomic add per
/// decision, the cheapest a program can count); the totals a reader wants are sums of them.
/// "Passed" is an allow or a would-be denial let through in audit mode; "denied" a denial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Passed, its record written to the ring.
    pub passed_written: u64,
    /// Denied, its record written to the ring.
    pub denied_written: u64,
    /// Passed and counted in a summary (the agent was over its record budget on this CPU, or
    /// the ring was full).
    pub passed_summarised: u64,
    /// Denied and counted in a summary.
    pub denied_summarised: u64,
    /// Denied with no record: the ring was more than half full (the rest is kept for allows)
    /// or full, and the summaries map full too. The denial stood.
    pub denied_dropped: u64,
    /// An allow refused because no record of it could be made (reason `unrecorded`).
    pub unrecorded: u64,
    /// Passed and not reported: a packet judged without a record.
    pub passed_quiet: u64,
    /// Denied and not reported.
    pub denied_quiet: u64,
    /// Not a counter: when this CPU's current record-budget window began (boot ns).
    pub budget_start_ns: u64,
    /// Not a counter: records written to the ring in that window.
    pub budget_used: u64,
}

/// An agent's counts across the host, from its per-CPU [`AgentStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounts {
    pub decisions: u64,
    /// Decisions that were refused (`unrecorded` allows included).
    pub denied: u64,
    /// Denials whose record was neither written nor summarised.
    pub dropped: u64,
    /// Events the programs tried to write to the ring (written + dropped + unrecorded). A TCP
    /// or UDP socket's creation is neither counted nor reported.
    pub emitted: u64,
    /// Allows refused because their record could not be made.
    pub unrecorded: u64,
    /// Decisions counted in a summary instead of each written to the ring.
    pub summarised: u64,
}

impl AgentStats {
    /// The sum of per-CPU copies: the agent's counts across the host.
    #[must_use]
    pub fn total<'a>(per_cpu: impl IntoIterator<Item = &'a Self>) -> AgentCounts {
        // Wrapping, as the kernel's adds do; 2^64 decisions are not reached.
        let sum = per_cpu.into_iter().fold(Self::default(), |sum, cpu| Self {
            passed_written: sum.passed_written.wrapping_add(cpu.passed_written),
            denied_written: sum.denied_written.wrapping_add(cpu.denied_written),
            passed_summarised: sum.passed_summarised.wrapping_add(cpu.passed_summarised),
            denied_summarised: sum.denied_summarised.wrapping_add(cpu.denied_summarised),
            denied_dropped: sum.denied_dropped.wrapping_add(cpu.denied_dropped),
            unrecorded: sum.unrecorded.wrapping_add(cpu.unrecorded),
            passed_quiet: sum.passed_quiet.wrapping_add(cpu.passed_quiet),
            denied_quiet: sum.denied_quiet.wrapping_add(cpu.denied_quiet),
            budget_start_ns: 0,
            budget_used: 0,
        });
        let denied = sum
            .denied_written
            .wrapping_add(sum.denied_summarised)
            .wrapping_add(sum.denied_dropped)
            .wrapping_add(sum.unrecorded)
            .wrapping_add(sum.denied_quiet);
        AgentCounts {
            decisions: denied
                .wrapping_add(sum.passed_written)
                .wrapping_add(sum.passed_summarised)
                .wrapping_add(sum.passed_quiet),
            denied,
            dropped: sum.denied_dropped,
            emitted: sum
                .passed_written
                .wrapping_add(sum.denied_written)
                .wrapping_add(sum.denied_dropped)
                .wrapping_add(sum.unrecorded),
            unrecorded: sum.unrecorded,
            summarised: sum.passed_summarised.wrapping_add(sum.denied_summarised),
        }
    }
}

/// Records an agent may write to the ring per CPU per budget window; its further decisions in
/// the window are counted in summaries ([`SummaryKey`]). One agent's flood then costs the ring
/// at most this many records per CPU per window, and the ring stays free for the others.
pub const RECORDS_PER_WINDOW: u64 = 2048;
/// The record budget's window.
pub const BUDGET_WINDOW_NS: u64 = 1_000_000_000;

/// What repeated decisions have in common to be counted together: the agent (cgroup), the rule
/// table and rule, the action, protocol, verdict and reason, and for what passes (allows, and
/// would-be denials let through in audit mode) the destination (address, port, family); a
/// denial's key has a zero destination (denials are summarised harder: a scan is one summary
/// per reason, with its first decision's destination). `epoch`
/// is the summaries epoch the programs counted in (the daemon drains the other). 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SummaryKey {
    pub cgroup_id: u64,
    pub addr: [u32; 4],
    pub rule_id: u32,
    pub table: u32,
    pub port: [u8; 2],
    pub family: u8,
    pub proto: u8,
    pub action: u8,
    pub verdict: u8,
    pub reason: u8,
    pub epoch: u8,
}

/// One CPU's count of the decisions of a [`SummaryKey`], with the first of them in full. The
/// `summaries` map is per-CPU: a CPU that finds the key inserted by another starts its own
/// copy (`count` 0) by writing `first`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub first: Event,
    pub count: u64,
    /// Boot ns of the last decision counted.
    pub last_ns: u64,
}

/// Stats index of decisions about processes in no registered agent.
pub const UNREGISTERED_SLOT: u32 = crate::maps::MAX_AGENTS;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, explicit padding (layout test).
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SummaryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Summary {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn event_layout_is_fixed() {
        assert_eq!(size_of::<Event>(), 80);
        assert_eq!(crate::maps::EVENT_STRIDE, 88);
        assert_eq!(offset_of!(Event, rule_id), 32);
        assert_eq!(offset_of!(Event, table), 36);
        assert_eq!(offset_of!(Event, comm), 40);
        assert_eq!(offset_of!(Event, addr), 56);
        assert_eq!(offset_of!(Event, port), 72);
        assert_eq!(offset_of!(Event, family), 74);
        assert_eq!(offset_of!(Event, reason), 78);
        // Ring buffer records are 8-byte aligned.
        assert_eq!(size_of::<Event>() % 8, 0);
        assert_eq!(size_of::<AgentStats>(), 80);
        assert_eq!(size_of::<SummaryKey>(), 40);
        assert_eq!(offset_of!(SummaryKey, port), 32);
        assert_eq!(offset_of!(SummaryKey, epoch), 39);
        assert_eq!(size_of::<Summary>(), 96);
        // Per-CPU map values are laid out 8-byte aligned per CPU; no rounding hides a field.
        assert_eq!(size_of::<AgentStats>() % 8, 0);
    }

    #[test]
    fn per_cpu_copies_sum_into_the_totals_of_their_outcomes() {
        let cpus = [
            AgentStats { passed_written: 2, denied_written: 1, budget_used: 3, ..AgentStats::default() },
            AgentStats::default(),
            AgentStats {
                passed_written: 1,
                denied_written: 1,
                passed_summarised: 1,
                denied_summarised: 1,
                denied_dropped: 1,
                unrecorded: 1,
                passed_quiet: 3,
                denied_quiet: 2,
                budget_start_ns: 9,
                budget_used: 4,
            },
        ];
        assert_eq!(
            AgentStats::total(&cpus),
            AgentCounts { decisions: 14, denied: 7, dropped: 1, emitted: 7, unrecorded: 1, summarised: 2 }
        );
        assert_eq!(AgentStats::total(&[]), AgentCounts::default());
    }
}
