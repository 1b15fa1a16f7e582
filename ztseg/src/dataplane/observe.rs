//! Read-only views of the pinned kernel state for the metrics: the agents' flags, the ring's
//! drop counter and each program's run-time statistics. An [`Observer`] opens fds of its own
//! from the pins, so a scrape reads the kernel without the [`Dataplane`](super::Dataplane) and
//! without the daemon's state lock.

use std::{collections::HashMap as StdHashMap, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use ztseg_common::{agent::AgentState, maps};

use super::{DataplaneError, PROGRAMS, PinPaths, bpf_sys, map_err};

/// Fds of the pinned `agents` and `drops` maps, and where the links are.
pub struct Observer {
    agents: HashMap<MapData, u64, AgentState>,
    drops: PerCpuArray<MapData, u64>,
    paths: PinPaths,
}

/// An agent's kill switch, suspension and pause, as the kernel holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub killed: bool,
    pub suspended: bool,
    pub paused: bool,
}

impl Observer {
    /// Opens the pinned maps under `paths` (the daemon's, once it has started the dataplane).
    pub fn open(paths: &PinPaths) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| MapData::from_pin(paths.map(name)).map_err(map_err(name));
        let agents = HashMap::try_from(Map::HashMap(open(maps::AGENTS)?)).map_err(map_err(maps::AGENTS))?;
        let drops =
            PerCpuArray::try_from(Map::PerCpuArray(open(maps::DROPS)?)).map_err(map_err(maps::DROPS))?;
        Ok(Self { agents, drops, paths: paths.clone() })
    }

    /// Every registered agent's flags, by cgroup id.
    pub fn agent_flags(&self) -> Result<StdHashMap<u64, Flags>, DataplaneError> {
        self.agents
            .iter()
            .map(|entry| {
                let (cgroup_id, state) = entry.map_err(map_err(maps::AGENTS))?;
                Ok((
                    cgroup_id,
                    Flags { killed: state.killed(), suspended: state.suspended(), paused: state.paused() },
                ))
            })
            .collect()
    }

    /// Decision records lost to a full ring, summed over the CPUs, since the map was created.
    pub fn ring_dropped(&self) -> Result<u64, DataplaneError> {
        let per_cpu = self.drops.get(&0, 0).map_err(map_err(maps::DROPS))?;
        Ok(per_cpu.iter().fold(0u64, |sum, n| sum.wrapping_add(*n)))
    }

    /// (program, run time ns, runs) of each attached program whose pinned link can be read.
    pub fn programs(&self) -> Vec<(&'static str, u64, u64)> {
        PROGRAMS
            .iter()
            .filter_map(|(name, _)| {
                let (run_time_ns, runs) = program_stats(&self.paths.link(name)).ok()?;
                Some((*name, run_time_ns, runs))
            })
            .collect()
    }
}

/// Cumulative run time (ns) and runs of the program behind the pinned link `link`: what
/// `bpftool prog show` prints as `run_time_ns` and `run_cnt` (counted only while
/// `kernel.bpf_stats_enabled` is on).
pub fn program_stats(link: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::fd::AsFd as _;
    let link = bpf_sys::obj_get(link)?;
    bpf_sys::link_program_stats(link.as_fd())
}

/// Whether the sysctl `kernel.bpf_stats_enabled` is on; `None` if it cannot be read. (The
/// kernel also counts while any process holds a `BPF_ENABLE_STATS` fd, which the sysctl does
/// not show.)
pub fn bpf_stats_enabled() -> Option<bool> {
    let text = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(text.trim() != "0")
}
