//! What the daemon's [`State`](super::State) asks of the kernel and the host: the enforcement
//! maps (agents and their rule tables), the agents' cgroups, and their sockets. One trait, so the
//! state's logic runs in unit tests against a stand-in (`fake_kernel`) without root or BPF.
//!
//! The production implementation is [`Dataplane`] itself: its map writes, plus the cgroup and
//! socket calls the state used to make directly, unchanged.

use std::{collections::HashMap, io, path::Path, time::Duration};

use ztseg_common::{agent::AgentState, event::AgentCounts};

use crate::{
    cgroup::{self, CgroupError},
    dataplane::{Dataplane, DataplaneError, Entry, Granted},
    sockets,
};

/// The kernel and host operations behind the daemon's state. Each method is the [`Dataplane`]
/// method, or the `cgroup`/`sockets` function, of the same name and meaning.
pub trait Kernel {
    /// Registers an agent cgroup with no rights; an agent already registered keeps its state.
    fn register(&mut self, cgroup_id: u64) -> Result<AgentState, DataplaneError>;

    /// Removes an agent: its cgroup falls back to "unregistered" (everything denied).
    fn unregister(&mut self, cgroup_id: u64) -> Result<(), DataplaneError>;

    /// The agent's state as the kernel sees it.
    fn agent(&self, cgroup_id: u64) -> Result<Option<AgentState>, DataplaneError>;

    /// Every registered agent: cgroup id and state.
    fn agents(&self) -> Result<Vec<(u64, AgentState)>, DataplaneError>;

    /// Replaces the agent's rule table and deadline at once, telling `announce` the new table's
    /// id before any decision can use it. On an error the agent keeps what it had.
    fn grant_announced(
        &mut self,
        cgroup_id: u64,
        entries: &[Entry],
        deadline_ns: u64,
        announce: impl FnOnce(u32),
    ) -> Result<Granted, DataplaneError>;

    /// Withdraws the agent's rules and deadline; it stays registered.
    fn revoke(&mut self, cgroup_id: u64) -> Result<(), DataplaneError>;

    /// Turns the agent's kill switch on or off.
    fn set_killed(&mut self, cgroup_id: u64, killed: bool) -> Result<(), DataplaneError>;

    /// Sets or clears one of the agent's `FLAG_*` bits (the risk engine's pause and suspension).
    fn set_flag(&mut self, cgroup_id: u64, flag: u32, on: bool) -> Result<(), DataplaneError>;

    /// Sets the agent's enforcement mode (`AgentState::mode`: enforce or audit).
    fn set_mode(&mut self, cgroup_id: u64, mode: u32) -> Result<(), DataplaneError>;

    /// Kernel counters of an agent slot.
    fn stats(&self, slot: u32) -> Result<AgentCounts, DataplaneError>;

    /// Creates the cgroup directory if missing and returns its id (`cgroup::ensure`).
    fn ensure_cgroup(&mut self, path: &Path) -> Result<u64, CgroupError>;

    /// Pids of the processes in the cgroup (`cgroup::processes`).
    fn cgroup_processes(&self, path: &Path) -> Result<Vec<u32>, CgroupError>;

    /// Removes an empty cgroup directory (`cgroup::remove`).
    fn remove_cgroup(&mut self, path: &Path) -> Result<(), CgroupError>;

    /// Freezes or thaws the cgroup; says whether the kernel reported it frozen in `wait`
    /// (`cgroup::freeze`).
    fn freeze(&mut self, path: &Path, frozen: bool, wait: Duration) -> Result<bool, CgroupError>;

    /// Whether the cgroup is frozen or asked to be (`cgroup::frozen`).
    fn frozen(&self, path: &Path) -> bool;

    /// SIGKILLs every process of the cgroup; how many it held (`cgroup::kill_all`).
    fn kill_all(&mut self, path: &Path) -> Result<usize, CgroupError>;

    /// Destroys the TCP and UDP sockets of the cgroups in `targets` (path, id); how many per
    /// cgroup id (`sockets::close_all`).
    fn close_sockets(&mut self, targets: &[(&Path, u64)]) -> io::Result<HashMap<u64, usize>>;
}

impl Kernel for Dataplane {
    fn register(&mut self, cgroup_id: u64) -> Result<AgentState, DataplaneError> {
        Dataplane::register(self, cgroup_id)
    }

    fn unregister(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        Dataplane::unregister(self, cgroup_id)
    }

    fn agent(&self, cgroup_id: u64) -> Result<Option<AgentState>, DataplaneError> {
        Dataplane::agent(self, cgroup_id)
    }

    fn agents(&self) -> Result<Vec<(u64, AgentState)>, DataplaneError> {
        Dataplane::agents(self)
    }

    fn grant_announced(
        &mut self,
        cgroup_id: u64,
        entries: &[Entry],
        deadline_ns: u64,
        announce: impl FnOnce(u32),
    ) -> Result<Granted, DataplaneError> {
        Dataplane::grant_announced(self, cgroup_id, entries, deadline_ns, announce)
    }

    fn revoke(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        Dataplane::revoke(self, cgroup_id)
    }

    fn set_killed(&mut self, cgroup_id: u64, killed: bool) -> Result<(), DataplaneError> {
        Dataplane::set_killed(self, cgroup_id, killed)
    }

    fn set_flag(&mut self, cgroup_id: u64, flag: u32, on: bool) -> Result<(), DataplaneError> {
        Dataplane::set_flag(self, cgroup_id, flag, on)
    }

    fn set_mode(&mut self, cgroup_id: u64, mode: u32) -> Result<(), DataplaneError> {
        Dataplane::set_mode(self, cgroup_id, mode)
    }

    fn stats(&self, slot: u32) -> Result<AgentCounts, DataplaneError> {
        Dataplane::stats(self, slot)
    }

    fn ensure_cgroup(&mut self, path: &Path) -> Result<u64, CgroupError> {
        cgroup::ensure(path)
    }

    fn cgroup_processes(&self, path: &Path) -> Result<Vec<u32>, CgroupError> {
        cgroup::processes(path)
    }

    fn remove_cgroup(&mut self, path: &Path) -> Result<(), CgroupError> {
        cgroup::remove(path)
    }

    fn freeze(&mut self, path: &Path, frozen: bool, wait: Duration) -> Result<bool, CgroupError> {
        cgroup::freeze(path, frozen, wait)
    }

    fn frozen(&self, path: &Path) -> bool {
        cgroup::frozen(path)
    }

    fn kill_all(&mut self, path: &Path) -> Result<usize, CgroupError> {
        cgroup::kill_all(path)
    }

    fn close_sockets(&mut self, targets: &[(&Path, u64)]) -> io::Result<HashMap<u64, usize>> {
        sockets::close_all(targets)
    }
}
