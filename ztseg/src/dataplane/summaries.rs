//! The summaries of repeated decisions: what the programs count, per CPU, for an agent past its
//! record budget (`ztseg_common::event::RECORDS_PER_WINDOW`), drained into summary records.
//!
//! The programs count into the epoch that `summary_epoch` names. Draining switches them to the
//! other epoch, waits out the programs still counting into the old one (the RCU barrier), and
//! reads the old epoch's entries, which nothing writes any more: no count is lost between the
//! read and the delete. The entries are deleted only once their records are written, so a
//! daemon killed in between finds them again (and writes them again: at least once).

use std::sync::Arc;

use aya::maps::{Array, MapData, PerCpuHashMap};
use ztseg_common::{
    event::{Event, Summary, SummaryKey},
    maps,
};

use super::{BarrierFds, DataplaneError, map_err};

/// The `summaries` map, its epoch and the barrier to switch epochs with.
pub struct Summaries {
    map: PerCpuHashMap<MapData, SummaryKey, Summary>,
    epoch: Array<MapData, u32>,
    barrier: Arc<BarrierFds>,
}

/// One summary read out of the map, its CPUs' copies combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    pub key: SummaryKey,
    /// The earliest CPU's first decision, in full.
    pub first: Event,
    /// Decisions counted, on every CPU.
    pub count: u64,
    /// Boot ns of the last one.
    pub last_ns: u64,
}

impl Summaries {
    pub(super) fn new(
        map: PerCpuHashMap<MapData, SummaryKey, Summary>,
        epoch: Array<MapData, u32>,
        barrier: Arc<BarrierFds>,
    ) -> Self {
        Self { map, epoch, barrier }
    }

    fn current(&self) -> Result<u8, DataplaneError> {
        let epoch = self.epoch.get(&0, 0).map_err(map_err(maps::SUMMARY_EPOCH))?;
        Ok(u8::from(epoch & 1 == 1))
    }

    /// The summaries of the epoch the programs do not count in: what an earlier daemon read and
    /// did not delete. Read at start, before the first switch sends the programs there.
    pub fn idle(&self) -> Result<Vec<Drained>, DataplaneError> {
        let idle = self.current()? ^ 1;
        // An earlier daemon may have died between switching and waiting: programs that read
        // the old epoch before the switch finish first.
        self.barrier.wait()?;
        self.read(idle)
    }

    /// Switches the programs to the other epoch, waits until none counts into the old one, and
    /// returns the old one's summaries.
    pub fn switch(&mut self) -> Result<Vec<Drained>, DataplaneError> {
        let old = self.current()?;
        self.epoch.set(0, u32::from(old ^ 1), 0).map_err(map_err(maps::SUMMARY_EPOCH))?;
        self.barrier.wait()?;
        self.read(old)
    }

    fn read(&self, epoch: u8) -> Result<Vec<Drained>, DataplaneError> {
        let mut drained = Vec::new();
        for key in self.map.keys() {
            let key = key.map_err(map_err(maps::SUMMARIES))?;
            if key.epoch != epoch {
                continue;
            }
            let per_cpu = match self.map.get(&key, 0) {
                Ok(values) => values,
                // Deleted since the key was listed (by nothing but this task: not expected).
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(maps::SUMMARIES)(e)),
            };
            if let Some(summary) = combine(key, per_cpu.iter()) {
                drained.push(summary);
            }
        }
        Ok(drained)
    }

    /// Deletes summaries whose records are written.
    pub fn delete<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a SummaryKey>,
    ) -> Result<(), DataplaneError> {
        for key in keys {
            match self.map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::SUMMARIES)(e)),
            }
        }
        Ok(())
    }
}

/// One summary from its CPUs' copies: counts added, the earliest first decision, the latest
/// last. `None` if no CPU counted anything (a copy is all zeros until its CPU counts).
pub fn combine<'a>(key: SummaryKey, per_cpu: impl IntoIterator<Item = &'a Summary>) -> Option<Drained> {
    let mut out: Option<Drained> = None;
    for cpu in per_cpu.into_iter().filter(|s| s.count > 0) {
        match &mut out {
            None => out = Some(Drained { key, first: cpu.first, count: cpu.count, last_ns: cpu.last_ns }),
            Some(d) => {
                d.count += cpu.count;
                if cpu.first.ts_boot_ns < d.first.ts_boot_ns {
                    d.first = cpu.first;
                }
                d.last_ns = d.last_ns.max(cpu.last_ns);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(first_ns: u64, count: u64, last_ns: u64) -> Summary {
        let first = Event {
            ts_boot_ns: first_ns,
            cgroup_id: 7,
            pid_tgid: first_ns << 32,
            uid_gid: 0,
            rule_id: 0,
            table: 1,
            comm: [0; 16],
            addr: [0; 4],
            port: [0; 2],
            family: 4,
            proto: 17,
            action: 2,
            verdict: 1,
            reason: 0,
            _pad: 0,
        };
        Summary { first, count, last_ns }
    }

    #[test]
    fn copies_combine_into_one_count_from_the_earliest_to_the_latest() {
        let zero = Summary { count: 0, ..summary(0, 0, 0) };
        let cpus = [summary(50, 3, 90), zero, summary(20, 4, 60)];
        let d = combine(SummaryKey::default(), &cpus).unwrap();
        assert_eq!((d.count, d.first.ts_boot_ns, d.last_ns), (7, 20, 90));
        assert_eq!(d.first.pid_tgid, 20 << 32, "the first decision of the earliest copy");
        assert_eq!(combine(SummaryKey::default(), &[zero, zero]), None);
    }
}
