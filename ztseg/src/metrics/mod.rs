//! The daemon's metrics in the Prometheus text format (`[metrics] listen`, off by default).
//!
//! Three parts, each a room of its own:
//! - [`Metrics`]: the counters the daemon's threads bump as they work — decisions by verdict and
//!   reason (and per agent, bounded), records handed to the audit writer, token verifications,
//!   control request latencies, and the risk scores hook. Atomics only, plus one short lock taken
//!   once per batch of decisions (never by the control thread or the audit writer).
//! - [`Snapshot`]: plain data for one scrape, gathered by the daemon from these counters, the audit
//!   writer, the ring and the pinned maps (`daemon::metrics`); [`render`] turns it into text.
//! - [`server`]: the HTTP endpoint, on a thread of its own, with bounded connections.
//!
//! Risk scores: housekeeping calls [`Metrics::set_agent_risk`] each second with the risk
//! engine's scores (and [`Metrics::clear_agent_risk`]), for the `ztseg_agent_risk` gauge family, one series per
//! agent within the `agent_series` bound. Nothing else is needed on the metrics side.

pub mod render;
pub mod server;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use self::render::{Format, render};

/// Verdict codes counted apart (`rule::VERDICT_*` of decisions are 1-3: allow, deny, would_deny);
/// others count as 0.
const VERDICT_CODES: usize = 4;
/// Reason codes counted apart (`decision::reason::*`, DNS reasons included, are all below it);
/// others count as 0.
const REASON_CODES: usize = 16;

/// Decisions by (verdict code, reason code).
struct DecisionCounts([[AtomicU64; REASON_CODES]; VERDICT_CODES]);

impl Default for DecisionCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

impl DecisionCounts {
    fn add(&self, verdict: u8, reason: u8, count: u64) {
        let (v, r) = (usize::from(verdict), usize::from(reason));
        let v = if v < VERDICT_CODES { v } else { 0 };
        let r = if r < REASON_CODES { r } else { 0 };
        self.0[v][r].fetch_add(count, Ordering::Relaxed);
    }

    /// The counts that are not zero, as (verdict code, reason code, count).
    fn read(&self) -> Vec<(u8, u8, u64)> {
        let mut out = Vec::new();
        for (v, reasons) in self.0.iter().enumerate() {
            for (r, count) in reasons.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    out.push((v as u8, r as u8, count));
                }
            }
        }
        out
    }
}

/// No risk score has been set for the agent.
const NO_RISK: u64 = u64::MAX;

/// What is counted for an agent with series of its own.
struct AgentCounts {
    decisions: DecisionCounts,
    risk: AtomicU64,
}

impl Default for AgentCounts {
    fn default() -> Self {
        Self { decisions: DecisionCounts::default(), risk: AtomicU64::new(NO_RISK) }
    }
}

/// The agents with series of their own, in the order first seen, at most `limit`.
struct AgentSeries {
    limit: usize,
    by_name: HashMap<Arc<str>, Arc<AgentCounts>>,
    order: Vec<(Arc<str>, Arc<AgentCounts>)>,
}

impl AgentSeries {
    /// The agent's counters, given series of its own if there is room; `None` once full.
    fn get(&mut self, agent: &str) -> Option<Arc<AgentCounts>> {
        if let Some(counts) = self.by_name.get(agent) {
            return Some(counts.clone());
        }
        if self.order.len() >= self.limit {
            return None;
        }
        let (name, counts): (Arc<str>, _) = (agent.into(), Arc::new(AgentCounts::default()));
        self.by_name.insert(name.clone(), counts.clone());
        self.order.push((name, counts.clone()));
        Some(counts)
    }
}

/// One decision or summary as counted: its agent (if attributed), verdict and reason codes, and
/// how many decisions it stands for (a summary's `count`, else 1).
pub struct Counted<'a> {
    pub agent: Option<&'a Arc<str>>,
    pub verdict: u8,
    pub reason: u8,
    pub count: u64,
}

/// Control requests timed, by the `cmd` of the control protocol (`events` streams and is not
/// timed).
pub const REQUEST_KINDS: [&str; 9] =
    ["token_apply", "token_revoke", "agents", "run", "kill", "revive", "resume", "risk", "status"];

/// Upper bounds (seconds) of the control request latency buckets.
pub const REQUEST_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds (seconds) of the audit write lag buckets.
pub const LAG_BUCKETS: [f64; 13] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// Token verification results counted: `valid`, then each refusal code.
fn token_results() -> impl Iterator<Item = &'static str> {
    std::iter::once("valid").chain(crate::token::TokenCode::ALL.iter().map(|code| code.as_str()))
}

/// A histogram of durations whose observations are atomic adds: no lock between the thread
/// that observes and the scrape that reads.
pub struct Histogram {
    bounds_ns: Vec<u64>,
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one past every bound.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

/// A histogram as read at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds in seconds; the counts have one more entry, past the last bound.
    pub bounds: &'static [f64],
    /// Per bucket, not cumulative.
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds_ns: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds_ns.iter().position(|&b| ns <= b).unwrap_or(self.bounds_ns.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// What the audit writer reports as it works: the lag from decision to append, and where the
/// checkpoints are. Atomics the writer stores and a scrape loads.
pub struct WriterGauges {
    lag: Histogram,
    checkpoint_unix_ns: AtomicU64,
    unsigned_records: AtomicU64,
}

impl Default for WriterGauges {
    fn default() -> Self {
        Self {
            lag: Histogram::new(&LAG_BUCKETS),
            checkpoint_unix_ns: AtomicU64::new(unix_ns(SystemTime::now())),
            unsigned_records: AtomicU64::new(0),
        }
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl WriterGauges {
    /// A record of a decision the kernel made at `decided_boot_ns` was just appended.
    pub fn appended(&self, decided_boot_ns: u64) {
        let lag = crate::clock::boot_now_ns().saturating_sub(decided_boot_ns);
        self.lag.observe(Duration::from_nanos(lag));
    }

    /// The log's last checkpoint (or opening) and the records appended since.
    pub fn checkpoints(&self, last: SystemTime, unsigned_records: u64) {
        self.checkpoint_unix_ns.store(unix_ns(last), Ordering::Relaxed);
        self.unsigned_records.store(unsigned_records, Ordering::Relaxed);
    }

    /// Fills in the lag and checkpoint parts of `audit`.
    pub fn read_into(&self, audit: &mut AuditSnapshot) {
        audit.lag = self.lag.snapshot();
        let since =
            unix_ns(SystemTime::now()).saturating_sub(self.checkpoint_unix_ns.load(Ordering::Relaxed));
        audit.checkpoint_age_seconds = since as f64 / 1e9;
        audit.unsigned_records = self.unsigned_records.load(Ordering::Relaxed);
    }
}

/// The daemon's own counters; one per daemon, shared by `Arc`.
pub struct Metrics {
    decisions: DecisionCounts,
    agents: Mutex<AgentSeries>,
    /// Decisions of agents beyond the `agent_series` bound, together.
    other_agents: DecisionCounts,
    /// Decision records handed to the audit writer.
    handed_over: AtomicU64,
    /// `valid`, then one per `TokenCode::ALL`.
    tokens: Vec<AtomicU64>,
    requests: Vec<Histogram>,
}

impl Metrics {
    /// Counters with series of their own for the first `agent_series` agents seen.
    pub fn new(agent_series: usize) -> Self {
        Self {
            decisions: DecisionCounts::default(),
            agents: Mutex::new(AgentSeries {
                limit: agent_series,
                by_name: HashMap::new(),
                order: Vec::new(),
            }),
            other_agents: DecisionCounts::default(),
            handed_over: AtomicU64::new(0),
            tokens: token_results().map(|_| AtomicU64::new(0)).collect(),
            requests: REQUEST_KINDS.iter().map(|_| Histogram::new(&REQUEST_BUCKETS)).collect(),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, AgentSeries> {
        self.agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a batch of decision records handed to the audit writer (the event reader's and the
    /// summaries drain's): one short lock per batch for the per-agent series.
    pub fn count_decisions<'a>(&self, batch: impl IntoIterator<Item = Counted<'a>>) {
        let mut agents = self.agents();
        let mut records = 0;
        for Counted { agent, verdict, reason, count } in batch {
            records += 1;
            self.decisions.add(verdict, reason, count);
            if let Some(agent) = agent {
                match agents.get(agent) {
                    Some(counts) => counts.decisions.add(verdict, reason, count),
                    None => self.other_agents.add(verdict, reason, count),
                }
            }
        }
        drop(agents);
        self.handed_over.fetch_add(records, Ordering::Relaxed);
    }

    /// Decision records handed to the audit writer so far.
    pub fn handed_over(&self) -> u64 {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// Counts one token verification: `None` for a valid token, else its refusal code.
    pub fn count_token(&self, refused: Option<crate::token::TokenCode>) {
        let index = match refused {
            None => 0,
            Some(code) => 1 + crate::token::TokenCode::ALL.iter().position(|c| *c == code).unwrap_or(0),
        };
        if let Some(counter) = self.tokens.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Times one control request of `kind` (a [`REQUEST_KINDS`] entry; others are not timed).
    pub fn observe_request(&self, kind: &str, took: Duration) {
        if let Some(i) = REQUEST_KINDS.iter().position(|k| *k == kind) {
            self.requests[i].observe(took);
        }
    }

    /// The risk engine's hook: `agent`'s current score (0-100), exported as
    /// `ztseg_agent_risk{agent}` if the agent has series of its own (the first `agent_series`
    /// agents seen). Takes the per-agent series' lock, which the event reader holds for one
    /// batch's lookups and a scrape for a copy of the list: microseconds, never a disk or the
    /// state lock.
    pub fn set_agent_risk(&self, agent: &str, risk: u8) {
        if let Some(counts) = self.agents().get(agent) {
            counts.risk.store(u64::from(risk), Ordering::Relaxed);
        }
    }

    /// The agent has no score any more (removed): its `ztseg_agent_risk` series goes.
    pub fn clear_agent_risk(&self, agent: &str) {
        if let Some(counts) = self.agents().by_name.get(agent) {
            counts.risk.store(NO_RISK, Ordering::Relaxed);
        }
    }

    /// Fills in the parts of `snapshot` these counters hold.
    pub fn read_into(&self, snapshot: &mut Snapshot) {
        snapshot.decisions = self.decisions.read();
        let agents: Vec<(Arc<str>, Arc<AgentCounts>)> = self.agents().order.clone();
        snapshot.agent_decisions = agents
            .iter()
            .flat_map(|(agent, counts)| {
                counts.decisions.read().into_iter().map(move |(v, r, n)| (agent.clone(), v, r, n))
            })
            .collect();
        snapshot.agent_risk = agents
            .iter()
            .filter_map(|(agent, counts)| {
                let risk = counts.risk.load(Ordering::Relaxed);
                (risk != NO_RISK).then(|| (agent.clone(), risk))
            })
            .collect();
        snapshot.agents_with_series = agents.len();
        snapshot.other_agent_decisions = self.other_agents.read();
        snapshot.tokens =
            token_results().zip(&self.tokens).map(|(r, n)| (r, n.load(Ordering::Relaxed))).collect();
        snapshot.requests =
            REQUEST_KINDS.iter().copied().zip(self.requests.iter().map(Histogram::snapshot)).collect();
    }
}

/// The audit writer as read at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditSnapshot {
    /// Decision records appended to the log since the daemon started.
    pub decision_records: u64,
    /// Every record appended since the daemon started (decisions, daemon records, checkpoints).
    pub records: u64,
    /// Decision records handed to the writer and not yet appended.
    pub pending_records: u64,
    /// Whether the log cannot be written now (full disk, reserve, write error).
    pub unwritable: bool,
    /// Seconds since the last signed checkpoint (or since the log was opened).
    pub checkpoint_age_seconds: f64,
    /// Records appended since then, which no checkpoint covers yet.
    pub unsigned_records: u64,
    /// Time from a kernel decision to its append to the log.
    pub lag: HistogramSnapshot,
}

/// The events ring as read at one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingSnapshot {
    /// Bytes of records the kernel has written and the daemon has not handed back (read and
    /// not yet written to the log, or not read yet).
    pub used_bytes: u64,
    pub size_bytes: u64,
}

/// One kernel program's BPF run-time statistics (counted only while `kernel.bpf_stats_enabled`
/// is on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramSnapshot {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub runs: u64,
}

/// Everything one scrape shows: plain data, so rendering is a pure function.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// (verdict code, reason code, decisions), every agent and none.
    pub decisions: Vec<(u8, u8, u64)>,
    /// (agent, verdict code, reason code, decisions) of agents with series of their own.
    pub agent_decisions: Vec<(Arc<str>, u8, u8, u64)>,
    /// Decisions of the agents beyond the bound, together.
    pub other_agent_decisions: Vec<(u8, u8, u64)>,
    /// How many agents have series of their own.
    pub agents_with_series: usize,
    /// (agent, risk 0-100) set through the risk hook.
    pub agent_risk: Vec<(Arc<str>, u64)>,
    /// (state, agents): every state of `ztseg agents`, zeros included.
    pub agents_by_state: Vec<(&'static str, u64)>,
    /// (result, verifications).
    pub tokens: Vec<(&'static str, u64)>,
    /// (request kind, latency).
    pub requests: Vec<(&'static str, HistogramSnapshot)>,
    pub audit: AuditSnapshot,
    /// `None` if the ring cannot be read (the reader did not start).
    pub ring: Option<RingSnapshot>,
    /// Records the kernel could not reserve in the full ring (`drops` map), since the map was
    /// created; `None` if it cannot be read.
    pub ring_dropped: Option<u64>,
    /// Whether `kernel.bpf_stats_enabled` is on; `None` if it cannot be read.
    pub bpf_stats_enabled: Option<bool>,
    pub programs: Vec<ProgramSnapshot>,
}

/// The states an agent can be in, as `ztseg agents` names them, in its order of precedence.
pub const AGENT_STATES: [&str; 6] = ["killed", "suspended", "paused", "no_token", "expired", "active"];

/// An agent's state from its kernel flags and token expiry, as `ztseg agents` judges it: the
/// first that applies of killed, suspended, paused, no token, expired, active.
pub fn agent_state(flags: crate::dataplane::observe::Flags, exp: Option<u64>, now_unix: u64) -> &'static str {
    match (exp, flags.killed, flags.suspended, flags.paused) {
        (_, true, ..) => "killed",
        (_, _, true, _) => "suspended",
        (.., true) => "paused",
        (None, ..) => "no_token",
        (Some(exp), ..) if now_unix >= exp => "expired",
        (Some(_), ..) => "active",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_verdict_reason_and_a_bounded_set_of_agents() {
        let metrics = Metrics::new(2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let one = |agent, verdict, reason, count| Counted { agent, verdict, reason, count };
        metrics.count_decisions([one(Some(&a), 1, 1, 1), one(Some(&b), 2, 2, 1), one(None, 2, 8, 1)]);
        // A summary counts as its count; a third agent is past the bound.
        metrics.count_decisions([one(Some(&c), 2, 2, 40), one(Some(&a), 1, 1, 5)]);
        // A code out of range is counted under 0, not lost or out of bounds.
        metrics.count_decisions([one(None, 200, 200, 1)]);
        // A would-be denial (audit mode) is a verdict of its own, not an allow or a deny.
        metrics.count_decisions([one(None, 3, 2, 2)]);
        let mut s = Snapshot::default();
        metrics.read_into(&mut s);
        assert_eq!(s.decisions, [(0, 0, 1), (1, 1, 6), (2, 2, 41), (2, 8, 1), (3, 2, 2)]);
        assert_eq!(s.agent_decisions, [(a.clone(), 1, 1, 6), (b.clone(), 2, 2, 1)]);
        assert_eq!(s.other_agent_decisions, [(2, 2, 40)]);
        assert_eq!(s.agents_with_series, 2);
        assert_eq!(metrics.handed_over(), 7);
    }

    #[test]
    fn risk_is_exported_only_once_set_and_only_within_the_bound() {
        let metrics = Metrics::new(1);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        metrics.set_agent_risk(&a, 42);
        metrics.set_agent_risk(&b, 99);
        metrics.set_agent_risk("a", 43);
        metrics.set_agent_risk("a", 42);
        let mut s = Snapshot::default();
        metrics.read_into(&mut s);
        assert_eq!(s.agent_risk, [(a.clone(), 42)]);
        metrics.clear_agent_risk("a");
        metrics.read_into(&mut s);
        assert!(s.agent_risk.is_empty());
    }

    #[test]
    fn histograms_bucket_by_upper_bound_and_sum() {
        let h = Histogram::new(&[0.001, 0.01]);
        for ms in [0, 1, 2, 10, 11, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.counts, [2, 2, 2]);
        assert_eq!(s.count(), 6);
        assert!((s.sum_seconds - 5.024).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn tokens_and_requests_are_counted_by_result_and_kind() {
        let metrics = Metrics::new(0);
        metrics.count_token(None);
        metrics.count_token(Some(crate::token::TokenCode::Expired));
        metrics.count_token(Some(crate::token::TokenCode::Expired));
        metrics.observe_request("kill", Duration::from_micros(300));
        metrics.observe_request("events", Duration::from_secs(1));
        let mut s = Snapshot::default();
        metrics.read_into(&mut s);
        let tokens: HashMap<&str, u64> = s.tokens.iter().copied().collect();
        assert_eq!((tokens["valid"], tokens["expired"], tokens["replay"]), (1, 2, 0));
        assert_eq!(tokens.len(), 1 + crate::token::TokenCode::ALL.len());
        let requests: HashMap<&str, u64> = s.requests.iter().map(|(k, h)| (*k, h.count())).collect();
        assert_eq!((requests["kill"], requests["status"], requests.get("events")), (1, 0, None));
    }

    #[test]
    fn request_kinds_are_the_control_protocol_commands_less_events() {
        use crate::control::{KillProcesses, Request};
        let agent = || "a".to_owned();
        let every = [
            Request::TokenApply { agent: agent(), token: String::new() },
            Request::TokenRevoke { agent: agent() },
            Request::Agents {},
            Request::Run { agent: agent(), token: None },
            Request::Kill { agent: agent(), processes: KillProcesses::Keep },
            Request::Revive { agent: agent() },
            Request::Resume { agent: agent(), reason: String::new() },
            Request::Risk { agent: agent() },
            Request::Status {},
        ];
        let kinds: Vec<String> = every
            .iter()
            .map(|r| serde_json::to_value(r).unwrap()["cmd"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, REQUEST_KINDS);
        for r in &every {
            assert_eq!(r.kind(), serde_json::to_value(r).unwrap()["cmd"]);
        }
    }

    #[test]
    fn agent_states_follow_the_order_of_ztseg_agents() {
        let f = |killed, suspended, paused| crate::dataplane::observe::Flags { killed, suspended, paused };
        assert_eq!(agent_state(f(true, true, true), Some(10), 5), "killed");
        assert_eq!(agent_state(f(false, true, true), Some(10), 5), "suspended");
        assert_eq!(agent_state(f(false, false, true), None, 5), "paused");
        assert_eq!(agent_state(f(false, false, false), None, 5), "no_token");
        assert_eq!(agent_state(f(false, false, false), Some(5), 5), "expired");
        assert_eq!(agent_state(f(false, false, false), Some(6), 5), "active");
        use crate::control::AgentState;
        let named = [
            AgentState::Killed,
            AgentState::Suspended,
            AgentState::Paused,
            AgentState::NoToken,
            AgentState::Expired,
            AgentState::Active,
        ]
        .map(|s| s.as_str().to_owned());
        assert_eq!(named, AGENT_STATES);
    }
}
