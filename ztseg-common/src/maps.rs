//! Names and sizes of the BPF maps, the one place both sides read them from.
//!
//! Names are at most 15 bytes (`BPF_OBJ_NAME_LEN`); the daemon pins each map under its pin dir
//! with the same name, so `bpftool map dump pinned <pin dir>/agents` finds it.

/// cgroup id (`u64`) -> [`crate::agent::AgentState`]; hash, allocated on update (no prealloc),
/// so a program that looked up an entry keeps reading the version it found.
pub const AGENTS: &str = "agents";
/// LPM trie of [`crate::rule::Rule4`] -> [`crate::rule::RuleValue`].
pub const RULES_V4: &str = "rules_v4";
/// LPM trie of [`crate::rule::Rule6`] -> [`crate::rule::RuleValue`].
pub const RULES_V6: &str = "rules_v6";
/// Ring buffer of [`crate::event::Event`] records, one per decision.
pub const EVENTS: &str = "events";
/// Per-CPU count of events that found the ring buffer full (one slot, a `u64` per CPU).
pub const DROPS: &str = "drops";
/// Per-CPU [`crate::event::AgentStats`] by agent slot (plus one for unregistered processes).
pub const STATS: &str = "stats";
/// Socket storage of [`crate::packet::Peers`]: the peers each unconnected UDP socket of an agent
/// sent to, whose datagrams are replies rather than unsolicited arrivals.
pub const REPLIES: &str = "replies";
/// One-slot array of maps. Updating it makes the kernel wait for every running program
/// (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c): the daemon's RCU barrier before it
/// reclaims a rule table that a program may still be reading.
pub const RCU_BARRIER: &str = "rcu_barrier";
/// The inner map that the daemon stores into [`RCU_BARRIER`]; never read.
pub const RCU_BARRIER_INNER: &str = "rcu_barrier_in";

/// Registered agents at most (also the size of the per-agent stats array, whose
/// `(MAX_AGENTS + 1) * 80` bytes, 1.25 MiB, are allocated once per possible CPU).
pub const MAX_AGENTS: u32 = 16_384;

/// Per-CPU counts of repeated decisions of agents over their record budget, drained by the
/// daemon into summary records (`event::SummaryKey`, `event::Summary`).
pub const SUMMARIES: &str = "summaries";
/// One `u32`: the epoch the programs count summaries in (the daemon drains the other).
pub const SUMMARY_EPOCH: &str = "summary_epoch";
/// Distinct summaries per epoch (about a second); an agent over budget whose decision finds
/// the map full is treated as if the ring were full (its allow refused, its denial shed).
pub const MAX_SUMMARIES: u32 = 16_384;
/// Rule entries per address family at most, across all agents, including a replacement table
/// being written while the old one is still in force.
pub const MAX_RULES: u32 = 1 << 22;
/// Bytes of the events ring buffer (a power of two, a multiple of the page size): 4 MiB hold
/// about 47,000 events (80-byte records plus an 8-byte header each).
pub const EVENTS_BYTES: u32 = 1 << 22;

/// Bytes one event takes in the ring: the record and the kernel's 8-byte header
/// (`BPF_RINGBUF_HDR_SZ`; records are 8-byte aligned, as `Event` is).
pub const EVENT_STRIDE: u64 = core::mem::size_of::<crate::event::Event>() as u64 + 8;
/// The kernel wakes the reader each time this many bytes have accumulated unread (about 370
/// events); below that, records wait for the reader's periodic drain ([`EVENTS_DRAIN_MS`]).
/// Waking the reader costs an interrupt per record, several microseconds on a VM: more than the
/// whole decision.
pub const EVENTS_WAKE_BYTES: u64 = 32 * 1024;

/// Unread bytes in the events ring from which denials are counted but not recorded: the rest of
/// the ring is kept for allows, which are refused when their record cannot be written. A flood
/// of denials (a scan, a hammered forbidden destination) can then never refuse anyone's allows.
pub const SHED_DENIALS_AT: u64 = EVENTS_BYTES as u64 / 2;
/// The reader drains the ring at least this often, whether or not it was woken.
pub const EVENTS_DRAIN_MS: u64 = 50;

/// Whether the program that just reserved a record should wake the reader: `unread` is the
/// ring's unread bytes including that record (`BPF_RB_AVAIL_DATA`). True once per
/// [`EVENTS_WAKE_BYTES`] of backlog, so a lagging reader is woken again and again as it grows.
#[must_use]
pub const fn wake_reader(unread: u64) -> bool {
    unread >= EVENTS_WAKE_BYTES && unread % EVENTS_WAKE_BYTES < EVENT_STRIDE
}

#[cfg(test)]
mod wake_tests {
    use super::*;

    #[test]
    fn wakes_once_per_window_of_backlog() {
        // One producer: unread grows one stride at a time from an empty ring; each wake falls
        // in the first stride of the next window, and every window gets exactly one.
        let mut wakes = 0u64;
        for n in 1..=2_000u64 {
            let unread = n * EVENT_STRIDE;
            if wake_reader(unread) {
                wakes += 1;
                let window = wakes * EVENTS_WAKE_BYTES;
                assert!(unread >= window && unread < window + EVENT_STRIDE, "{unread} for window {window}");
            }
        }
        assert_eq!(wakes, 2_000 * EVENT_STRIDE / EVENTS_WAKE_BYTES);
    }

    #[test]
    fn a_short_backlog_never_wakes() {
        assert!(!wake_reader(EVENT_STRIDE));
        assert!(!wake_reader(EVENTS_WAKE_BYTES - 1));
        assert!(wake_reader(EVENTS_WAKE_BYTES));
    }
}
