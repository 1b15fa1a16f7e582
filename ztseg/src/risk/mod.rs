//! Continuous verification: a risk score per agent, fed by every decision record the audit log
//! takes, that pauses the agent at `pause_at` and suspends it at `suspend_at`.
//!
//! The score is the sum, capped at 100, of one contribution per signal class. Each class adds
//! points per signal up to its own cap, and its contribution halves every `half_life_seconds`.
//! Every cap but the tripwire's is below `pause_at` (the config refuses anything else), so no
//! single heuristic pauses an agent on its own: a pause takes at least two kinds of evidence.
//!
//! | class | signal | points | cap | half-life |
//! | --- | --- | --- | --- | --- |
//! | `denied` | an outbound decision denied for want of a rule | 0.2 | 20 | 10 min |
//! | `forbidden` | an outbound decision denied by a `forbidden_tools`/deny rule | 1 | 30 | 30 min |
//! | `scan` | a denied destination past `scan_ports` ports of one host, or past `scan_hosts` hosts, in `scan_window_seconds` | 2 | 55 | 30 min |
//! | `new_destination` | an allowed destination past the agent's first `baseline_destinations` | 2 | 15 | 60 min |
//! | `rate` | a second with more than `rate_per_second` decisions | 5 | 15 | 5 min |
//! | `side_door` | a refused socket (raw, or a protocol ztseg does not judge) | 10 | 40 | 60 min |
//! | `stale_token` | a decision refused for an expired or missing token | 1 | 15 | 10 min |
//! | `tripwire` | any attempt on a tripwire address (cloud metadata by default) | 100 | 100 | 24 h |
//! | `dns` | a DNS query the proxy refused: a name no rule allows or a deny names, a record type it does not forward, a wildcard's budget spent, a CNAME to an unallowed name, a malformed query | 1 | 40 | 30 min |
//!
//! A `would_deny` decision (audit mode: denied by the rules, let through) counts as the denial
//! it would have been (`denied`, `forbidden`, `scan`): an agent in audit mode that scans is
//! paused all the same, and its pause is enforced.
//!
//! Why these: a policy that denies routine traffic all day reaches `denied` 20 (+ `rate` 15 in a
//! tight retry loop): 35, under the pause. Names smuggled out through DNS (a query per chunk of
//! data, under a domain no rule allows) reach `denied` 20 + `dns` 40: 60, with a scan or a
//! forbidden tool on top paused; none of those queries leaves the host. A port scan reaches `scan` 55 + `denied` 20: paused.
//! Hammering a forbidden tool's destination after that adds `forbidden`: suspended. Benign
//! work (package installs, clones, API calls to granted hosts) earns at most `new_destination`.
//!
//! The score is a pure function of the records, the parameters and time: the engine reads
//! nothing but what a record holds (its `ts`, to the microsecond, is the clock), so replaying the
//! audit log through [`replay`] gives the same scores, the same `risk` records and the same
//! pauses and suspensions as the daemon made live. A person's `resume` (a record too) sets the
//! score back to 0 and lifts the pause or suspension.

pub mod replay;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt::Write as _,
    net::IpAddr,
    sync::Arc,
};

use serde_json::{Map, Value, json};
use ztseg_common::{
    decision::reason,
    dns::{ACTION_DNS, reason as dns_reason},
    event::{ACTION_CONNECT, ACTION_SENDMSG, ACTION_SOCKET},
};

use crate::config::{OnSuspend, Risk};

/// A signal class: what kind of evidence a contribution to the score is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Denied,
    Forbidden,
    Scan,
    NewDestination,
    Rate,
    SideDoor,
    StaleToken,
    Tripwire,
    Dns,
}

impl Class {
    pub const ALL: [Self; 9] = [
        Self::Denied,
        Self::Forbidden,
        Self::Scan,
        Self::NewDestination,
        Self::Rate,
        Self::SideDoor,
        Self::StaleToken,
        Self::Tripwire,
        Self::Dns,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::Forbidden => "forbidden",
            Self::Scan => "scan",
            Self::NewDestination => "new_destination",
            Self::Rate => "rate",
            Self::SideDoor => "side_door",
            Self::StaleToken => "stale_token",
            Self::Tripwire => "tripwire",
            Self::Dns => "dns",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    const fn index(self) -> usize {
        self as usize
    }

    /// Points per signal, cap, half-life in seconds.
    const fn defaults(self) -> Weights {
        let (points, cap, half_life_s) = match self {
            Self::Denied => (0.2, 20.0, 600.0),
            Self::Forbidden => (1.0, 30.0, 1800.0),
            Self::Scan => (2.0, 55.0, 1800.0),
            Self::NewDestination => (2.0, 15.0, 3600.0),
            Self::Rate => (5.0, 15.0, 300.0),
            Self::SideDoor => (10.0, 40.0, 3600.0),
            Self::StaleToken => (1.0, 15.0, 600.0),
            Self::Tripwire => (100.0, 100.0, 86_400.0),
            Self::Dns => (1.0, 40.0, 1800.0),
        };
        Weights { points, cap, half_life_us: half_life_s * 1e6 }
    }
}

const CLASSES: usize = Class::ALL.len();

#[derive(Clone, Copy, Debug, PartialEq)]
struct Weights {
    points: f64,
    cap: f64,
    half_life_us: f64,
}

/// The engine's parameters, from `[risk]`.
#[derive(Clone, Debug)]
pub struct Params {
    pub pause_at: f64,
    pub suspend_at: f64,
    pub on_suspend: OnSuspend,
    weights: [Weights; CLASSES],
    tripwires: Vec<ipnet::IpNet>,
    scan_window_us: u64,
    scan_ports: usize,
    scan_hosts: usize,
    baseline_destinations: usize,
    rate_per_second: u64,
}

/// Distinct destinations (and denied ones in the scan window) remembered per agent at most;
/// past it the oldest go (scan) or nothing more is learned and every new one scores
/// (destinations).
const REMEMBERED: usize = 1024;
/// Evidence seqs a record lists at most (it counts them all).
const EVIDENCE: usize = 16;

impl Params {
    /// The parameters of `[risk]`, or the key at fault and what is wrong with it.
    pub fn from_config(risk: &Risk) -> Result<Self, (String, String)> {
        let bad = |key: &str, problem: String| Err((format!("risk.{key}"), problem));
        let (pause_at, suspend_at) = (risk.pause_at, risk.suspend_at);
        if !(1..=100).contains(&pause_at) || !(1..=100).contains(&suspend_at) || pause_at > suspend_at {
            return Err((
                "risk".to_owned(),
                format!("needs 1 <= pause_at <= suspend_at <= 100, got {pause_at} and {suspend_at}"),
            ));
        }
        let mut weights = Class::ALL.map(Class::defaults);
        for (name, given) in &risk.classes {
            let Some(class) = Class::from_name(name) else {
                let known: Vec<&str> = Class::ALL.iter().map(|c| c.name()).collect();
                return bad(
                    &format!("classes.{name}"),
                    format!("is no signal class; known: {}", known.join(", ")),
                );
            };
            let w = &mut weights[class.index()];
            w.points = given.points.unwrap_or(w.points);
            w.cap = given.cap.unwrap_or(w.cap);
            w.half_life_us = given.half_life_seconds.map_or(w.half_life_us, |s| s * 1e6);
        }
        for class in Class::ALL {
            let w = weights[class.index()];
            let key = format!("classes.{}", class.name());
            if !(0.0..=100.0).contains(&w.points) {
                return bad(&key, format!("points must be 0-100, got {}", w.points));
            }
            if !(0.0..=100.0).contains(&w.cap) {
                return bad(&key, format!("cap must be 0-100, got {}", w.cap));
            }
            if !(w.half_life_us >= 1e6 && w.half_life_us <= 365.0 * 86_400e6) {
                return bad(
                    &key,
                    format!("half_life_seconds must be 1 s to a year, got {}", w.half_life_us / 1e6),
                );
            }
            if class != Class::Tripwire && w.cap >= f64::from(pause_at) {
                return bad(
                    &key,
                    format!(
                        "cap {} would let one class pause an agent on its own; it must be below pause_at ({pause_at})",
                        w.cap
                    ),
                );
            }
        }
        if risk.scan_window_seconds == 0 || risk.scan_window_seconds > 86_400 {
            return bad("scan_window_seconds", format!("must be 1-86400, got {}", risk.scan_window_seconds));
        }
        if risk.baseline_destinations as usize >= REMEMBERED {
            return bad(
                "baseline_destinations",
                format!(
                    "must be below {REMEMBERED} (the destinations remembered per agent), got {}",
                    risk.baseline_destinations
                ),
            );
        }
        if risk.rate_per_second == 0 {
            return bad("rate_per_second", "must be at least 1".to_owned());
        }
        Ok(Self::of(risk, weights))
    }

    fn of(risk: &Risk, weights: [Weights; CLASSES]) -> Self {
        Self {
            pause_at: f64::from(risk.pause_at),
            suspend_at: f64::from(risk.suspend_at),
            on_suspend: risk.on_suspend,
            weights,
            tripwires: risk.tripwires.clone(),
            scan_window_us: risk.scan_window_seconds * 1_000_000,
            scan_ports: risk.scan_ports as usize,
            scan_hosts: risk.scan_hosts as usize,
            baseline_destinations: risk.baseline_destinations as usize,
            rate_per_second: risk.rate_per_second,
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        // Valid: a unit test checks `from_config` takes them.
        Self::of(&Risk::default(), Class::ALL.map(Class::defaults))
    }
}

/// One decision record, as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub agent: Arc<str>,
    /// The record's `seq`.
    pub seq: u64,
    /// Its `ts` (a summary's `last_ts`), µs since the Unix epoch.
    pub ts_us: u64,
    /// `ACTION_*`.
    pub action: u8,
    pub allowed: bool,
    /// `reason::*`.
    pub reason: u8,
    pub dst: Option<IpAddr>,
    pub dport: u16,
    /// 1, or how many decisions a summary stands for.
    pub count: u64,
}

/// Where an agent stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Standing {
    #[default]
    Active,
    Paused,
    Suspended,
}

/// What the daemon does when a score crosses a threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pause,
    Suspend,
}

impl Action {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Suspend => "suspend",
        }
    }
}

/// A change of an agent's score: one `risk` record.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub agent: Arc<str>,
    pub ts_us: u64,
    pub class: Class,
    /// What the class gathered since its last record (each signal's points as added; they
    /// decay from then on, like the rest of the score).
    pub points: f64,
    /// The score just before and just after the record that completed them.
    pub before: f64,
    pub after: f64,
    /// What the evidence was, with numbers.
    pub reason: String,
    /// Seqs of the records behind the points (the first [`EVIDENCE`]) and how many there were.
    pub evidence: Vec<u64>,
    pub evidence_count: u64,
    /// Set on the record whose points crossed a threshold, with the score's make-up then.
    pub action: Option<Action>,
    pub contributors: Vec<Contributor>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Contributor {
    pub class: Class,
    pub points: f64,
    /// The class's last reason.
    pub reason: String,
}

/// Two decimals: what records and answers show (the engine keeps full precision).
pub fn shown(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Change {
    /// The `risk` audit record (without `seq`, `prev`, `hash`).
    pub fn to_record(&self) -> Map<String, Value> {
        let mut r = Map::new();
        r.insert("event".into(), json!("risk"));
        r.insert("ts".into(), json!(rfc3339_us(self.ts_us)));
        r.insert("agent".into(), json!(&*self.agent));
        r.insert("class".into(), json!(self.class.name()));
        r.insert("points".into(), json!(shown(self.points)));
        r.insert("risk_before".into(), json!(shown(self.before)));
        r.insert("risk_after".into(), json!(shown(self.after)));
        r.insert("reason".into(), json!(self.reason));
        r.insert("evidence".into(), json!(self.evidence));
        r.insert("evidence_count".into(), json!(self.evidence_count));
        if let Some(action) = self.action {
            r.insert("action".into(), json!(action.name()));
            let contributors: Vec<Value> = self
                .contributors
                .iter()
                .map(|c| json!({"class": c.class.name(), "points": shown(c.points), "reason": c.reason}))
                .collect();
            r.insert("contributors".into(), Value::Array(contributors));
        }
        r
    }
}

pub fn rfc3339_us(ts_us: u64) -> String {
    crate::events::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_micros(ts_us))
}

/// An agent's score now, for `ztseg risk` and `ztseg agents`.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub score: f64,
    pub standing: Standing,
    /// Classes with a contribution, largest first.
    pub contributors: Vec<Contributor>,
}

/// What a class has gathered since its last record.
#[derive(Clone, Debug, Default)]
struct Pending {
    points: f64,
    evidence: Vec<u64>,
    count: u64,
    first_us: u64,
    destinations: HashSet<(Option<IpAddr>, u16)>,
    last: Option<(Option<IpAddr>, u16, u8, u8)>,
}

#[derive(Clone, Debug, Default)]
struct ClassState {
    /// The contribution at the agent's `t_us`.
    value: f64,
    pending: Pending,
    last_reason: String,
}

/// Denied destinations in the scan window, oldest first, and per host its ports there.
#[derive(Clone, Debug, Default)]
struct ScanWindow {
    order: VecDeque<(u64, IpAddr, u16)>,
    hosts: HashMap<IpAddr, HashSet<u16>>,
}

impl ScanWindow {
    fn expire(&mut self, now_us: u64, window_us: u64) {
        while let Some(&(t, host, port)) = self.order.front() {
            if now_us.saturating_sub(t) < window_us && self.order.len() < REMEMBERED {
                break;
            }
            self.order.pop_front();
            if let Some(ports) = self.hosts.get_mut(&host) {
                ports.remove(&port);
                if ports.is_empty() {
                    self.hosts.remove(&host);
                }
            }
        }
    }

    /// Adds a denied destination; whether it is new in the window, with its host's port count
    /// and the window's host count after.
    fn add(&mut self, now_us: u64, host: IpAddr, port: u16) -> Option<(usize, usize)> {
        let ports = self.hosts.entry(host).or_default();
        if !ports.insert(port) {
            return None;
        }
        let on_host = ports.len();
        self.order.push_back((now_us, host, port));
        Some((on_host, self.hosts.len()))
    }
}

#[derive(Clone, Debug, Default)]
struct AgentRisk {
    /// The latest record time seen (records from different CPUs come slightly out of order:
    /// time never runs back).
    t_us: u64,
    /// The time the class values are decayed to: at most [`DECAY_STEP_US`] behind `t_us`.
    decayed_us: u64,
    classes: [ClassState; CLASSES],
    standing: Standing,
    scan: ScanWindow,
    destinations: HashSet<(IpAddr, u16)>,
    /// Destinations past the baseline.
    new_destinations: u64,
    /// The current second, its decisions, and whether it scored.
    second: u64,
    in_second: u64,
    second_scored: bool,
}

/// Decay is applied at most once a millisecond per agent (a record's cost is then mostly a
/// lookup): the values are then at most 1 ms stale, 0.07% of the shortest half-life allowed.
const DECAY_STEP_US: u64 = 1000;

impl AgentRisk {
    fn advance(&mut self, ts_us: u64, params: &Params) {
        self.t_us = self.t_us.max(ts_us);
        if self.t_us - self.decayed_us >= DECAY_STEP_US {
            self.decay_to_now(params);
        }
    }

    fn decay_to_now(&mut self, params: &Params) {
        let dt = (self.t_us - self.decayed_us) as f64;
        if dt > 0.0 {
            for (state, w) in self.classes.iter_mut().zip(&params.weights) {
                if state.value > 0.0 {
                    state.value *= (-dt / w.half_life_us).exp2();
                }
            }
        }
        self.decayed_us = self.t_us;
    }

    fn score(&self) -> f64 {
        self.classes.iter().map(|c| c.value).sum::<f64>().min(100.0)
    }

    /// Adds `signals` signals of `class`; the points it took (0 at the cap).
    fn add(&mut self, class: Class, signals: u64, obs: &Observation, params: &Params) -> f64 {
        let w = params.weights[class.index()];
        let state = &mut self.classes[class.index()];
        let points = (w.points * signals as f64).min(w.cap - state.value).max(0.0);
        state.value += points;
        if points > 0.0 {
            let p = &mut state.pending;
            if p.count == 0 {
                p.first_us = obs.ts_us;
            }
            p.points += points;
            p.count += signals;
            if p.evidence.len() < EVIDENCE {
                p.evidence.push(obs.seq);
            }
            if p.destinations.len() < 64 {
                p.destinations.insert((obs.dst, obs.dport));
            }
            p.last = Some((obs.dst, obs.dport, obs.reason, obs.action));
        }
        points
    }
}

/// The scores of every agent seen.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    params: Params,
    /// By agent id (the daemon's own names, not chosen by an agent: a fast hash).
    agents: HashMap<Arc<str>, AgentRisk, foldhash::fast::RandomState>,
}

impl Engine {
    pub fn new(params: Params) -> Self {
        Self { params, agents: HashMap::default() }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Takes one decision record; the score changes it makes (none for most).
    pub fn observe(&mut self, obs: &Observation) -> Vec<Change> {
        // Inbound traffic is what others do to the agent, and a decision refused because the
        // agent is already killed, paused or suspended is a consequence, not new evidence.
        let outbound = matches!(obs.action, ACTION_CONNECT | ACTION_SENDMSG | ACTION_SOCKET | ACTION_DNS);
        if !outbound || matches!(obs.reason, reason::KILLED | reason::PAUSED | reason::SUSPENDED) {
            return Vec::new();
        }
        let params = &self.params;
        let agent = match self.agents.get_mut(&obs.agent) {
            Some(agent) => agent,
            None => self.agents.entry(obs.agent.clone()).or_default(),
        };
        agent.advance(obs.ts_us, params);
        let before = agent.score();
        let mut touched = [false; CLASSES];
        let mut signal = |agent: &mut AgentRisk, class: Class, signals: u64| {
            if agent.add(class, signals, obs, params) > 0.0 {
                touched[class.index()] = true;
            }
        };
        // Rate: every outbound decision counts toward its second.
        let second = obs.ts_us / 1_000_000;
        if second != agent.second {
            (agent.second, agent.in_second, agent.second_scored) = (second, 0, false);
        }
        agent.in_second = agent.in_second.saturating_add(obs.count);
        if agent.in_second > params.rate_per_second && !agent.second_scored {
            agent.second_scored = true;
            signal(agent, Class::Rate, 1);
        }
        if let Some(dst) = obs.dst
            && params.tripwires.iter().any(|net| net.contains(&dst))
        {
            signal(agent, Class::Tripwire, 1);
        }
        match (obs.allowed, obs.reason) {
            (true, _) if obs.action != ACTION_SOCKET => {
                if let Some(dst) = obs.dst {
                    let key = (dst, obs.dport);
                    let known = agent.destinations.contains(&key);
                    if !known && agent.destinations.len() < REMEMBERED {
                        agent.destinations.insert(key);
                    }
                    if !known && agent.destinations.len() > params.baseline_destinations {
                        agent.new_destinations += 1;
                        signal(agent, Class::NewDestination, 1);
                    }
                }
            }
            (true, _) => {}
            (false, reason::NO_RULE | reason::FORBIDDEN) => {
                let class = if obs.reason == reason::FORBIDDEN { Class::Forbidden } else { Class::Denied };
                signal(agent, class, obs.count);
                if obs.action == ACTION_DNS {
                    signal(agent, Class::Dns, obs.count);
                }
                if let Some(dst) = obs.dst {
                    agent.scan.expire(agent.t_us, params.scan_window_us);
                    if let Some((on_host, hosts)) = agent.scan.add(agent.t_us, dst, obs.dport) {
                        let past = usize::from(on_host > params.scan_ports)
                            + usize::from(on_host == 1 && hosts > params.scan_hosts);
                        if past > 0 {
                            signal(agent, Class::Scan, past as u64);
                        }
                    }
                }
            }
            (false, reason::RAW_SOCKET | reason::PROTOCOL) => signal(agent, Class::SideDoor, obs.count),
            (false, dns_reason::QTYPE | dns_reason::BUDGET | dns_reason::CNAME | dns_reason::MALFORMED) => {
                signal(agent, Class::Dns, obs.count);
            }
            (false, reason::EXPIRED | reason::NO_TOKEN) => signal(agent, Class::StaleToken, obs.count),
            (false, _) => {}
        }
        if !touched.contains(&true) {
            return Vec::new();
        }
        let after = agent.score();
        let action = match agent.standing {
            Standing::Suspended => None,
            _ if after >= params.suspend_at => Some(Action::Suspend),
            Standing::Active if after >= params.pause_at => Some(Action::Pause),
            _ => None,
        };
        if let Some(action) = action {
            agent.standing = if action == Action::Suspend { Standing::Suspended } else { Standing::Paused };
        }
        // A class reports once it has gathered a whole point; when a threshold is crossed,
        // every class that has gathered anything reports, the classes this record touched
        // last, the crossing on the very last.
        let mut changes = Vec::new();
        let untouched = Class::ALL.into_iter().filter(|c| !touched[c.index()]);
        let order: Vec<Class> =
            untouched.chain(Class::ALL.into_iter().filter(|c| touched[c.index()])).collect();
        for class in order {
            let pending = &agent.classes[class.index()].pending;
            let due = if action.is_some() {
                pending.points >= 0.01 || touched[class.index()]
            } else {
                touched[class.index()] && pending.points >= 1.0 - 1e-9
            };
            if !due {
                continue;
            }
            let reason = explain(class, agent, params);
            let state = &mut agent.classes[class.index()];
            let pending = std::mem::take(&mut state.pending);
            state.last_reason.clone_from(&reason);
            changes.push(Change {
                agent: obs.agent.clone(),
                ts_us: agent.t_us,
                class,
                points: pending.points,
                before,
                after,
                reason,
                evidence: pending.evidence,
                evidence_count: pending.count,
                action: None,
                contributors: Vec::new(),
            });
        }
        if let (Some(action), Some(last)) = (action, changes.last_mut()) {
            last.action = Some(action);
            last.contributors = contributors(agent);
        }
        changes
    }

    /// A person lifted the agent's pause or suspension: its score starts again from 0 (what it
    /// has learned of its destinations stays).
    pub fn resume(&mut self, agent: &str, ts_us: u64) {
        if let Some(risk) = self.agents.get_mut(agent) {
            risk.advance(ts_us, &self.params);
            risk.decay_to_now(&self.params);
            risk.classes = Default::default();
            risk.standing = Standing::Active;
            risk.scan = ScanWindow::default();
            risk.second_scored = true;
        }
    }

    /// The agent's score at `now_us` (decayed; nothing changes).
    pub fn view(&self, agent: &str, now_us: u64) -> View {
        let Some(risk) = self.agents.get(agent) else {
            return View { score: 0.0, standing: Standing::Active, contributors: Vec::new() };
        };
        let mut risk = risk.clone();
        risk.advance(now_us, &self.params);
        risk.decay_to_now(&self.params);
        View { score: risk.score(), standing: risk.standing, contributors: contributors(&risk) }
    }

    /// Every agent's score at `now_us`, cheaply (for `ztseg agents`).
    pub fn scores(&self, now_us: u64) -> HashMap<Arc<str>, (f64, Standing)> {
        self.agents
            .iter()
            .map(|(agent, risk)| {
                let dt = now_us.max(risk.t_us).saturating_sub(risk.decayed_us) as f64;
                let score: f64 = risk
                    .classes
                    .iter()
                    .zip(&self.params.weights)
                    .map(|(c, w)| if c.value > 0.0 { c.value * (-dt / w.half_life_us).exp2() } else { 0.0 })
                    .sum();
                (agent.clone(), (score.min(100.0), risk.standing))
            })
            .collect()
    }
}

fn contributors(agent: &AgentRisk) -> Vec<Contributor> {
    let mut list: Vec<Contributor> = Class::ALL
        .into_iter()
        .filter(|c| agent.classes[c.index()].value > 0.0)
        .map(|class| {
            let state = &agent.classes[class.index()];
            Contributor { class, points: state.value, reason: state.last_reason.clone() }
        })
        .collect();
    list.sort_by(|a, b| b.points.total_cmp(&a.points).then(a.class.cmp(&b.class)));
    list
}

/// `10.0.0.5:22`, `[fd00::1]:443`, or `-` for none.
fn endpoint(dst: Option<IpAddr>, port: u16) -> String {
    match dst {
        Some(IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        None => "every destination".to_owned(),
    }
}

fn what(action: u8) -> &'static str {
    match action {
        ACTION_CONNECT => "connects",
        ACTION_SENDMSG => "sends",
        ACTION_SOCKET => "sockets",
        ACTION_DNS => "DNS queries",
        _ => "decisions",
    }
}

/// The reason of a class's record: what it saw, with numbers.
fn explain(class: Class, agent: &AgentRisk, params: &Params) -> String {
    let p = &agent.classes[class.index()].pending;
    let secs = agent.t_us.saturating_sub(p.first_us) as f64 / 1e6;
    let (dst, port, why, action) = p.last.unwrap_or((None, 0, 0, 0));
    let mut s = String::new();
    let _ = match class {
        Class::Denied | Class::Forbidden => write!(
            s,
            "{} denied {} ({}) to {} destination(s) in {:.0} s, the last to {}",
            p.count,
            what(action),
            crate::events::reason_name(why),
            p.destinations.len(),
            secs,
            endpoint(dst, port)
        ),
        Class::Scan => {
            let (host, ports) = agent
                .scan
                .hosts
                .iter()
                .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
                .map_or((None, 0), |(h, ports)| (Some(*h), ports.len()));
            write!(
                s,
                "denied attempts on {} port(s) of {} and on {} host(s) in the last {} s (free: {} ports of a host, {} hosts)",
                ports,
                host.map_or_else(|| "-".to_owned(), |h| h.to_string()),
                agent.scan.hosts.len(),
                params.scan_window_us / 1_000_000,
                params.scan_ports,
                params.scan_hosts
            )
        }
        Class::NewDestination => write!(
            s,
            "{} new destination(s) past the first {} (the last {})",
            agent.new_destinations,
            params.baseline_destinations,
            endpoint(dst, port)
        ),
        Class::Rate => {
            write!(s, "{} decisions in one second (more than {})", agent.in_second, params.rate_per_second)
        }
        Class::SideDoor => write!(s, "{} refused socket(s) ({})", p.count, crate::events::reason_name(why)),
        Class::StaleToken => write!(
            s,
            "{} {} refused: token {} in {:.0} s",
            p.count,
            what(action),
            if why == reason::EXPIRED { "expired" } else { "missing or revoked" },
            secs
        ),
        Class::Tripwire => write!(s, "{} {}, a tripwire address", what(action), endpoint(dst, port)),
        Class::Dns => write!(
            s,
            "{} DNS queries refused in {:.0} s, the last for {}",
            p.count,
            secs,
            crate::events::reason_name(why)
        ),
    };
    s
}
