//! One uid (and the gid of the same number) per agent, from the configured `agent_uids` range.
//!
//! Two agents never share a uid, so the kernel's own permission checks keep them apart: one
//! cannot ptrace, signal, read the /proc files of or take descriptors from the other. A uid is
//! never one the host already uses: one with a passwd or group entry, or one systemd has handed
//! to a DynamicUser service (the default range is systemd's), is skipped; so is a uid some
//! running process still has (a removed agent's processes). New uids are handed out round-robin
//! from a cursor the daemon keeps, so a removed agent's uid comes back only after the whole
//! range has been used.

use std::{collections::HashSet, path::Path};

use crate::config::UidRange;

/// Where systemd records the uids it has handed to DynamicUser services, one file per uid.
const SYSTEMD_DYNAMIC_UIDS: &str = "/run/systemd/dynamic-uid";

/// Whether the host uses `uid` (or gid `uid`) for anything else.
pub fn used_by_host(uid: u32) -> bool {
    nix::unistd::User::from_uid(uid.into()).ok().flatten().is_some()
        || nix::unistd::Group::from_gid(uid.into()).ok().flatten().is_some()
        || Path::new(SYSTEMD_DYNAMIC_UIDS).join(uid.to_string()).exists()
}

/// The effective uids of the running processes (the owners of /proc/PID).
pub fn live_uids() -> HashSet<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
        .collect()
}

/// What the host and the other agents use, for [`allocate`].
pub struct InUse<'a> {
    /// Uids of the other agents.
    pub agents: &'a HashSet<u32>,
    /// Uids of running processes: never handed to a new agent (an agent's own processes keep
    /// running across a daemon restart, so its saved uid is not checked against them).
    pub live: &'a HashSet<u32>,
    pub by_host: &'a dyn Fn(u32) -> bool,
}

/// The uid an agent gets: `wanted` (its uid before a restart) if it is still in the range and
/// free, else the first free uid from `cursor` on, wrapping around the range; `None` when the
/// range is used up.
pub fn allocate(range: UidRange, wanted: Option<u32>, cursor: u32, in_use: &InUse<'_>) -> Option<u32> {
    let free = |uid: u32| range.contains(uid) && !in_use.agents.contains(&uid) && !(in_use.by_host)(uid);
    if let Some(uid) = wanted.filter(|&uid| free(uid)) {
        return Some(uid);
    }
    let start = if range.contains(cursor) { cursor } else { range.first };
    (start..=range.last).chain(range.first..start).find(|&uid| free(uid) && !in_use.live.contains(&uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: UidRange = UidRange { first: 61184, last: 61187 };

    fn pick(wanted: Option<u32>, cursor: u32, agents: &[u32], live: &[u32], host: &[u32]) -> Option<u32> {
        let (agents, live): (HashSet<u32>, HashSet<u32>) =
            (agents.iter().copied().collect(), live.iter().copied().collect());
        let by_host = |uid| host.contains(&uid);
        allocate(RANGE, wanted, cursor, &InUse { agents: &agents, live: &live, by_host: &by_host })
    }

    #[test]
    fn agents_get_distinct_uids_in_the_range_round_robin() {
        let mut agents = Vec::new();
        let mut cursor = RANGE.first;
        for expected in [61184, 61185, 61186, 61187] {
            let uid = pick(None, cursor, &agents, &[], &[]).unwrap();
            assert_eq!(uid, expected);
            agents.push(uid);
            cursor = uid + 1;
        }
        assert_eq!(pick(None, cursor, &agents, &[], &[]), None, "the range is used up");
        // 61184's agent was removed: the cursor (past the end) wraps to it.
        assert_eq!(pick(None, cursor, &agents[1..], &[], &[]), Some(61184));
        // A removed agent's uid is not the next one handed out while others are free.
        assert_eq!(pick(None, 61186, &[61185], &[], &[]), Some(61186));
    }

    #[test]
    fn a_restored_agent_keeps_its_uid_unless_it_is_no_longer_free() {
        assert_eq!(
            pick(Some(61186), 61184, &[61184], &[61186], &[]),
            Some(61186),
            "its own processes run on"
        );
        assert_eq!(pick(Some(61184), 61184, &[61184], &[], &[]), Some(61185), "taken by another agent");
        assert_eq!(pick(Some(1000), 61184, &[61184], &[], &[]), Some(61185), "outside the range");
        assert_eq!(pick(Some(61186), 61184, &[61184], &[], &[61186]), Some(61185), "the host uses it");
    }

    #[test]
    fn uids_the_host_or_running_processes_use_are_skipped() {
        assert_eq!(pick(None, 61184, &[], &[], &[61184, 61185]), Some(61186));
        assert_eq!(
            pick(None, 61184, &[], &[61184], &[]),
            Some(61185),
            "a removed agent's process still runs"
        );
        // root and nobody have passwd entries on every host; this test runs as someone.
        assert!(used_by_host(0));
        assert!(!live_uids().is_empty());
    }
}
