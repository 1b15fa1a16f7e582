//! Every path under the pin dir, derived in one place.
//!
//! ```text
//! <pin dir>/agents             agents map      (bpftool map dump pinned <pin dir>/agents)
//! <pin dir>/rules_v4           IPv4 rule trie
//! <pin dir>/rules_v6           IPv6 rule trie
//! <pin dir>/events             ring buffer of decision events (kept while the daemon is down)
//! <pin dir>/drops              per-CPU count of events lost to a full ring buffer
//! <pin dir>/stats              per-agent decisions, denials and lost events, per CPU
//! <pin dir>/replies            per-socket peers of unconnected UDP sends (socket storage)
//! <pin dir>/summaries          per-CPU counts of repeated decisions of agents past their budget
//! <pin dir>/summary_epoch      the summaries epoch the programs count in
//! <pin dir>/learned            addresses the DNS proxy answered, per agent, with their expiry
//! <pin dir>/dns_peers          per-socket resolver an agent asked (socket storage)
//! <pin dir>/links/<program>    the BPF link that keeps <program> attached to the agents' root
//! ```

use std::path::{Path, PathBuf};

use ztseg_common::{dns, maps};

/// Maps that the programs use and that must outlive the daemon.
pub const PINNED_MAPS: [&str; 11] = [
    maps::AGENTS,
    maps::RULES_V4,
    maps::RULES_V6,
    maps::EVENTS,
    maps::DROPS,
    maps::STATS,
    maps::REPLIES,
    maps::SUMMARIES,
    maps::SUMMARY_EPOCH,
    dns::LEARNED,
    dns::DNS_PEERS,
];

/// Pinned maps that hold only counters: nothing enforced depends on them, so a daemon that finds
/// one pinned in another shape (an older version's) replaces it and its counts restart at zero,
/// where a pinned enforcement map of another shape is refused.
/// (The summaries are counts too: one of another shape is replaced, its pending counts lost.)
pub const COUNTER_MAPS: [&str; 4] = [maps::DROPS, maps::STATS, maps::SUMMARIES, maps::SUMMARY_EPOCH];

#[derive(Clone, Debug)]
pub struct PinPaths {
    dir: PathBuf,
}

impl PinPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
}
