//! Medians, spreads and percentiles; BPF run-time statistics from bpftool.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

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

/// Cumulative (run time ns, run count) of the program behind a pinned link.
pub fn prog_counters(link: &Path) -> Result<(u64, u64)> {
    let out = Command::new("bpftool").args(["link", "show", "pinned"]).arg(link).arg("--json").output()?;
    let info: Value = serde_json::from_slice(&out.stdout).context("bpftool link show")?;
    let id = info["prog_id"].as_u64().context("no prog_id")?;
    let out = Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "--json"]).output()?;
    let info: Value = serde_json::from_slice(&out.stdout).context("bpftool prog show")?;
    Ok((info["run_time_ns"].as_u64().unwrap_or(0), info["run_cnt"].as_u64().unwrap_or(0)))
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
