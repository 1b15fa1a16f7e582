//! The agents map: one entry per registered agent cgroup.

/// The agent's kill switch is on: every decision is a deny.
pub const FLAG_KILLED: u32 = 1 << 0;
/// The agent is paused by the risk engine: new connections, sends and inbound traffic are
/// refused and its established connections held (no packet passes) until a person resumes it.
pub const FLAG_PAUSED: u32 = 1 << 1;
/// The agent is suspended by the risk engine: as killed (its sockets are also closed, its token
/// revoked, its processes frozen), until a person resumes it.
pub const FLAG_SUSPENDED: u32 = 1 << 2;

/// [`AgentState::mode`]: the agent's rules are enforced.
pub const MODE_ENFORCE: u32 = 0;
/// [`AgentState::mode`]: dry run (`[agent] mode = "audit"`). What the agent's rules deny on what
/// it connects or sends to (`no_rule`, `forbidden`) is let through and recorded as
/// `would_deny`; everything else (kill switch, suspension, token, pause, unregistered cgroups,
/// sockets nothing can judge, inbound traffic) is enforced as in [`MODE_ENFORCE`].
pub const MODE_AUDIT: u32 = 1;

/// Value of the agents map, keyed by the agent's cgroup id (`u64`, the cgroup2 inode number).
///
/// The daemon replaces the whole value at once (never a field in place), so a program sees either
/// the old or the new state of an agent, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentState {
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`) from which every decision is a deny;
    /// 0 means the agent holds no valid token.
    pub deadline_ns: u64,
    /// The rule table in force: the first field of every rule key this agent's lookups use. A
    /// table belongs to one agent only, so one agent's rules can never match another's.
    pub table: u32,
    /// Stable number of the agent, for per-agent counters and events.
    pub slot: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`]; any other value enforces (fails closed).
    pub mode: u32,
}

impl AgentState {
    pub const fn killed(&self) -> bool {
        self.flags & FLAG_KILLED != 0
    }

    pub const fn paused(&self) -> bool {
        self.flags & FLAG_PAUSED != 0
    }

    pub const fn suspended(&self) -> bool {
        self.flags & FLAG_SUSPENDED != 0
    }

    /// Whether the agent is in audit (dry-run) mode.
    pub const fn audit(&self) -> bool {
        self.mode == MODE_AUDIT
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no padding (checked by the layout test).
unsafe impl aya::Pod for AgentState {}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layout_is_what_the_kernel_side_reads() {
        assert_eq!(size_of::<AgentState>(), 24);
        assert_eq!(offset_of!(AgentState, deadline_ns), 0);
        assert_eq!(offset_of!(AgentState, table), 8);
        assert_eq!(offset_of!(AgentState, slot), 12);
        assert_eq!(offset_of!(AgentState, flags), 16);
        assert_eq!(offset_of!(AgentState, mode), 20);
    }
}
