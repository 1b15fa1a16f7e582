//! One uid (and the gid of the same number) per agent, from the configured `agent_uids` range.
//!
//! Two agents never share a uid, so the kernel's own permission checks keep them apart: one
//! cannot ptrace, signal, read the /proc files of or take descriptors from the other. A uid is
//! never one the host already uses: one with a passwd or group entry, or one systemd has handed
//! to a DynamicUser service (the default range is systemd's), is skipped.

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

/// The uid an agent gets: `wanted` (its uid before a restart) if it is still in the range and
/// free, else the lowest free uid in the range; `None` when the range is used up.
pub fn allocate(
    range: UidRange,
    wanted: Option<u32>,
    taken: &HashSet<u32>,
    used_by_host: impl Fn(u32) -> bool,
) -> Option<u32> {
    let free = |uid: u32| range.contains(uid) && !taken.contains(&uid) && !used_by_host(uid);
    wanted.filter(|&uid| free(uid)).or_else(|| (range.first..=range.last).find(|&uid| free(uid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: UidRange = UidRange { first: 61184, last: 61187 };

    #[test]
    fn agents_get_distinct_uids_in_the_range() {
        let mut taken = HashSet::new();
        for expected in [61184, 61185, 61186, 61187] {
            let uid = allocate(RANGE, None, &taken, |_| false).unwrap();
            assert_eq!(uid, expected);
            taken.insert(uid);
        }
        assert_eq!(allocate(RANGE, None, &taken, |_| false), None, "the range is used up");
    }

    #[test]
    fn a_restored_agent_keeps_its_uid_unless_it_is_no_longer_free() {
        let taken = HashSet::from([61184]);
        assert_eq!(allocate(RANGE, Some(61186), &taken, |_| false), Some(61186));
        assert_eq!(allocate(RANGE, Some(61184), &taken, |_| false), Some(61185), "taken by another agent");
        assert_eq!(allocate(RANGE, Some(1000), &taken, |_| false), Some(61185), "outside the range");
        assert_eq!(allocate(RANGE, Some(61186), &taken, |uid| uid == 61186), Some(61185), "host uses it");
    }

    #[test]
    fn uids_the_host_uses_are_skipped() {
        assert_eq!(allocate(RANGE, None, &HashSet::new(), |uid| uid < 61186), Some(61186));
        // root and nobody have passwd entries on every host.
        assert!(used_by_host(0));
    }
}
