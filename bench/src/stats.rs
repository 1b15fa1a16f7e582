//! Medians, spreads and percentiles; BPF run-time statistics.

use std::path::Path;

use anyhow::{Context as _, Result};

/// Median and spread (min..max) of a set of measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(values: &[f64]) -> Stat {
    if values.is_empty() {
        return Stat::default();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
    Stat { median, min: v[0], max: v[v.len() - 1], n: v.len() }
}

/// The `p`-th percentile (nearest rank) of `values`.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Cumulative (run time ns, run count) of the program behind a pinned link (what the daemon's
/// metrics export as `ztseg_program_run_seconds_total` and `ztseg_program_runs_total`).
pub fn prog_counters(link: &Path) -> Result<(u64, u64)> {
    ztseg::dataplane::observe::program_stats(link)
        .with_context(|| format!("cannot read the run-time statistics of {}", link.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_spread_percentile() {
        let s = stat(&[5.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 5.0, 4));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
