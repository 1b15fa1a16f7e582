//! The daemon's side of `[metrics]`: what one scrape reads, and the thread that serves them.
//!
//! A scrape takes no lock the control thread or the audit writer waits on: it loads the
//! [`Metrics`] atomics and the audit writer's gauges, reads the ring's positions, reads the
//! pinned maps through fds of its own ([`Observer`]), and counts agents by state from a list
//! (cgroup id, token expiry) that housekeeping refreshes every second under the state lock it
//! holds anyway.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{Context as _, Result};
use tracing::{error, warn};

use super::{audit_writer::AuditSender, ring};
use crate::{
    dataplane::observe::{self, Observer},
    metrics::{
        AGENT_STATES, Metrics, ProgramSnapshot, RingSnapshot, Snapshot, agent_state, render,
        server::{self, Bound},
    },
};

/// A registered agent's cgroup id and token expiry (unix seconds; `None`: no token).
pub type AgentToken = (u64, Option<u64>);

/// Every registered agent's [`AgentToken`], as housekeeping last saw them.
#[derive(Default)]
pub struct AgentTokens(Mutex<Arc<Vec<AgentToken>>>);

impl AgentTokens {
    pub fn set(&self, agents: Vec<AgentToken>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(agents);
    }

    fn get(&self) -> Arc<Vec<AgentToken>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Everything a scrape reads.
pub struct Scraper {
    pub metrics: Arc<Metrics>,
    pub audit: AuditSender,
    /// The audit log's next seq when the daemon started: records appended since are counted.
    pub first_seq: u64,
    /// Set by the event reader once it has mapped the ring.
    pub ring: Arc<OnceLock<ring::Consumer>>,
    /// `None` if the pinned maps could not be opened (said at start).
    pub observer: Option<Observer>,
    pub agents: Arc<AgentTokens>,
}

impl Scraper {
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        // Appended before handed over is read: a record counted in neither is not pending.
        let written = self.audit.decisions_written();
        self.metrics.read_into(&mut s);
        s.audit.decision_records = written;
        s.audit.records = self.audit.next_seq().saturating_sub(self.first_seq);
        s.audit.pending_records = self.metrics.handed_over().saturating_sub(written);
        s.audit.unwritable = self.audit.unwritable().is_some();
        self.audit.gauges().read_into(&mut s.audit);
        s.ring = self.ring.get().map(|consumer| {
            let (used_bytes, size_bytes) = consumer.fill();
            RingSnapshot { used_bytes, size_bytes }
        });
        s.bpf_stats_enabled = observe::bpf_stats_enabled();
        let mut flags = std::collections::HashMap::new();
        if let Some(observer) = &self.observer {
            s.ring_dropped = observer.ring_dropped().ok();
            match observer.agent_flags() {
                Ok(found) => flags = found,
                Err(e) => warn!(error = %e, "metrics: cannot read the agents map; kill switches not counted"),
            }
            s.programs = observer
                .programs()
                .into_iter()
                .map(|(name, run_time_ns, runs)| ProgramSnapshot { name, run_time_ns, runs })
                .collect();
        }
        let now = crate::clock::unix_now_secs();
        let mut by_state: BTreeMap<&'static str, u64> = AGENT_STATES.iter().map(|s| (*s, 0)).collect();
        for (cgroup_id, exp) in self.agents.get().iter() {
            let f = flags.get(cgroup_id).copied().unwrap_or_default();
            *by_state.entry(agent_state(f, *exp, now)).or_default() += 1;
        }
        s.agents_by_state = by_state.into_iter().collect();
        s
    }
}

/// Serves the metrics on `bound` from a thread of its own, at the record threads' priority
/// (below the control thread and housekeeping): a scrape, however often, takes the CPU they
/// leave. A panic there stops the metrics, not the daemon.
pub fn spawn(bound: Bound, scraper: Scraper) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the metrics server's runtime")?;
    std::thread::Builder::new()
        .name("ztseg-metrics".into())
        .spawn(move || {
            super::lower_priority();
            let scraper = Arc::new(scraper);
            let scrape = Arc::new(move |format| render(scraper.snapshot(), format));
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(server::serve(bound, scrape));
            }));
            error!(panicked = served.is_err(), "the metrics server stopped; metrics are no longer served");
        })
        .context("cannot start the metrics server's thread")?;
    Ok(())
}
