//! A stand-in for the kernel and host behind [`Kernel`], for unit tests of the daemon's state:
//! the agents map and rule tables in memory, with the same rules as the [`Dataplane`]'s (a
//! grant keeps the agent's flags, a second register keeps its state, an unregistered agent is
//! refused), the agents' cgroups, their open sockets, and every call in order. Any operation can
//! be made to fail, to test that a refusal leaves everything as it was.
//!
//! [`Dataplane`]: crate::dataplane::Dataplane

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use ztseg_common::{
    agent::{AgentState, FLAG_KILLED},
    event::AgentCounts,
};

use super::kernel::Kernel;
use crate::{
    cgroup::CgroupError,
    dataplane::{DataplaneError, Entry, Granted},
};

/// A call the state made, as recorded by [`FakeKernel::calls`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Register(u64),
    Unregister(u64),
    Grant {
        cgroup_id: u64,
        table: u32,
    },
    Revoke(u64),
    SetKilled(u64, bool),
    SetFlag(u64, u32, bool),
    SetMode(u64, u32),
    EnsureCgroup(PathBuf),
    RemoveCgroup(PathBuf),
    Freeze(PathBuf, bool),
    KillAll(PathBuf),
    /// The cgroup ids whose sockets were closed, in one pass.
    CloseSockets(Vec<u64>),
}

/// Operations that can be told to fail (`FakeKernel::fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Register,
    Grant,
    Revoke,
    SetKilled,
    SetFlag,
    SetMode,
    EnsureCgroup,
    Freeze,
    KillAll,
    CloseSockets,
}

/// What survives a daemon restart: the pinned maps, and the cgroups and sockets on the host.
#[derive(Clone, Debug, Default)]
pub struct Pins {
    pub agents: BTreeMap<u64, AgentState>,
    /// Rule tables by id, with the entries granted.
    pub tables: BTreeMap<u32, Vec<Entry>>,
    next_table: u32,
    /// Cgroup ids by absolute path.
    pub cgroups: BTreeMap<PathBuf, u64>,
    next_cgroup: u64,
    /// Processes in each cgroup.
    pub processes: BTreeMap<PathBuf, Vec<u32>>,
    pub frozen: BTreeSet<PathBuf>,
    /// Open sockets per cgroup id.
    pub open_sockets: HashMap<u64, usize>,
}

#[derive(Debug, Default)]
pub struct FakeKernel {
    pub pins: Pins,
    /// Every call, in order.
    pub calls: Vec<Call>,
    failing: BTreeSet<Op>,
}

fn injected(op: Op) -> io::Error {
    io::Error::other(format!("injected failure of {op:?}"))
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The kernel a restarted daemon finds: the same pins, no calls yet, nothing failing.
    pub fn restarted(&self) -> Self {
        Self { pins: self.pins.clone(), ..Self::default() }
    }

    /// Makes every later `op` fail (and change nothing).
    pub fn fail(&mut self, op: Op) {
        self.failing.insert(op);
    }

    pub fn heal(&mut self, op: Op) {
        self.failing.remove(&op);
    }

    fn check(&self, op: Op) -> io::Result<()> {
        if self.failing.contains(&op) { Err(injected(op)) } else { Ok(()) }
    }

    fn check_map(&self, op: Op) -> Result<(), DataplaneError> {
        self.check(op)
            .map_err(|source| DataplaneError::PinDir { path: PathBuf::from("<fake kernel>"), source })
    }

    fn check_cgroup(&self, op: Op, path: &Path) -> Result<(), CgroupError> {
        self.check(op).map_err(|source| CgroupError::Control { path: path.to_owned(), file: "fake", source })
    }

    fn registered(&self, cgroup_id: u64) -> Result<AgentState, DataplaneError> {
        self.pins.agents.get(&cgroup_id).copied().ok_or(DataplaneError::NotRegistered(cgroup_id))
    }

    /// The agent's kernel state; panics if it is not registered.
    pub fn state(&self, cgroup_id: u64) -> AgentState {
        self.pins.agents[&cgroup_id]
    }

    /// The entries of the agent's table in force (none without a table).
    pub fn rules(&self, cgroup_id: u64) -> Vec<Entry> {
        self.pins.tables.get(&self.state(cgroup_id).table).cloned().unwrap_or_default()
    }

    /// Pretends `count` sockets are open in the cgroup.
    pub fn open_sockets(&mut self, cgroup_id: u64, count: usize) {
        self.pins.open_sockets.insert(cgroup_id, count);
    }

    /// Index of the first call equal to `call`, if any.
    pub fn position(&self, call: &Call) -> Option<usize> {
        self.calls.iter().position(|c| c == call)
    }
}

impl Kernel for FakeKernel {
    fn register(&mut self, cgroup_id: u64) -> Result<AgentState, DataplaneError> {
        self.check_map(Op::Register)?;
        self.calls.push(Call::Register(cgroup_id));
        if let Some(state) = self.pins.agents.get(&cgroup_id) {
            return Ok(*state);
        }
        let slot = (0..).find(|s| self.pins.agents.values().all(|a| a.slot != *s)).unwrap_or(0);
        let state = AgentState { slot, ..AgentState::default() };
        self.pins.agents.insert(cgroup_id, state);
        Ok(state)
    }

    fn unregister(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        self.calls.push(Call::Unregister(cgroup_id));
        if let Some(state) = self.pins.agents.remove(&cgroup_id) {
            self.pins.tables.remove(&state.table);
        }
        Ok(())
    }

    fn agent(&self, cgroup_id: u64) -> Result<Option<AgentState>, DataplaneError> {
        Ok(self.pins.agents.get(&cgroup_id).copied())
    }

    fn agents(&self) -> Result<Vec<(u64, AgentState)>, DataplaneError> {
        Ok(self.pins.agents.iter().map(|(id, state)| (*id, *state)).collect())
    }

    fn grant_announced(
        &mut self,
        cgroup_id: u64,
        entries: &[Entry],
        deadline_ns: u64,
        announce: impl FnOnce(u32),
    ) -> Result<Granted, DataplaneError> {
        self.check_map(Op::Grant)?;
        let state = self.registered(cgroup_id)?;
        self.pins.next_table += 1;
        let table = self.pins.next_table;
        self.pins.tables.insert(table, entries.to_vec());
        announce(table);
        // Flags (the kill switch) are kept, as the dataplane keeps them.
        let next = AgentState { deadline_ns: deadline_ns.max(1), table, ..state };
        self.pins.agents.insert(cgroup_id, next);
        // No program runs here: the replaced table is reclaimed at once.
        self.pins.tables.remove(&state.table);
        self.calls.push(Call::Grant { cgroup_id, table });
        Ok(Granted { table, previous: state.table, entries: entries.len() })
    }

    fn revoke(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        self.check_map(Op::Revoke)?;
        let state = self.registered(cgroup_id)?;
        self.calls.push(Call::Revoke(cgroup_id));
        self.pins.agents.insert(cgroup_id, AgentState { deadline_ns: 0, table: 0, ..state });
        self.pins.tables.remove(&state.table);
        Ok(())
    }

    fn set_killed(&mut self, cgroup_id: u64, killed: bool) -> Result<(), DataplaneError> {
        self.check_map(Op::SetKilled)?;
        let mut state = self.registered(cgroup_id)?;
        self.calls.push(Call::SetKilled(cgroup_id, killed));
        if killed {
            state.flags |= FLAG_KILLED;
        } else {
            state.flags &= !FLAG_KILLED;
        }
        self.pins.agents.insert(cgroup_id, state);
        Ok(())
    }

    fn set_mode(&mut self, cgroup_id: u64, mode: u32) -> Result<(), DataplaneError> {
        self.check_map(Op::SetMode)?;
        let state = self.registered(cgroup_id)?;
        self.calls.push(Call::SetMode(cgroup_id, mode));
        self.pins.agents.insert(cgroup_id, AgentState { mode, ..state });
        Ok(())
    }

    fn set_flag(&mut self, cgroup_id: u64, flag: u32, on: bool) -> Result<(), DataplaneError> {
        self.check_map(Op::SetFlag)?;
        let mut state = self.registered(cgroup_id)?;
        self.calls.push(Call::SetFlag(cgroup_id, flag, on));
        if on {
            state.flags |= flag;
        } else {
            state.flags &= !flag;
        }
        self.pins.agents.insert(cgroup_id, state);
        Ok(())
    }

    fn stats(&self, _slot: u32) -> Result<AgentCounts, DataplaneError> {
        Ok(AgentCounts::default())
    }

    fn ensure_cgroup(&mut self, path: &Path) -> Result<u64, CgroupError> {
        self.check(Op::EnsureCgroup)
            .map_err(|source| CgroupError::Create { path: path.to_owned(), source })?;
        self.calls.push(Call::EnsureCgroup(path.to_owned()));
        if let Some(id) = self.pins.cgroups.get(path) {
            return Ok(*id);
        }
        // Cgroup ids are inode numbers: never small, never reused.
        self.pins.next_cgroup += 1;
        let id = 1000 + self.pins.next_cgroup;
        self.pins.cgroups.insert(path.to_owned(), id);
        Ok(id)
    }

    fn cgroup_processes(&self, path: &Path) -> Result<Vec<u32>, CgroupError> {
        Ok(self.pins.processes.get(path).cloned().unwrap_or_default())
    }

    fn remove_cgroup(&mut self, path: &Path) -> Result<(), CgroupError> {
        self.calls.push(Call::RemoveCgroup(path.to_owned()));
        self.pins.cgroups.remove(path);
        Ok(())
    }

    fn freeze(&mut self, path: &Path, frozen: bool, _wait: Duration) -> Result<bool, CgroupError> {
        self.check_cgroup(Op::Freeze, path)?;
        self.calls.push(Call::Freeze(path.to_owned(), frozen));
        if frozen {
            self.pins.frozen.insert(path.to_owned());
        } else {
            self.pins.frozen.remove(path);
        }
        Ok(true)
    }

    fn frozen(&self, path: &Path) -> bool {
        self.pins.frozen.contains(path)
    }

    fn kill_all(&mut self, path: &Path) -> Result<usize, CgroupError> {
        self.check_cgroup(Op::KillAll, path)?;
        self.calls.push(Call::KillAll(path.to_owned()));
        Ok(self.pins.processes.remove(path).map_or(0, |p| p.len()))
    }

    fn close_sockets(&mut self, targets: &[(&Path, u64)]) -> io::Result<HashMap<u64, usize>> {
        self.check(Op::CloseSockets)?;
        let ids: Vec<u64> = targets.iter().map(|(_, id)| *id).collect();
        self.calls.push(Call::CloseSockets(ids.clone()));
        Ok(ids.into_iter().map(|id| (id, self.pins.open_sockets.remove(&id).unwrap_or(0))).collect())
    }
}
