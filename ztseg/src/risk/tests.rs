//! Golden traces on a fake clock (the records' own times), and properties of the score.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use ztseg_common::{
    decision::reason,
    dns::{ACTION_DNS, reason as dns_reason},
    event::{ACTION_ACCEPT, ACTION_CONNECT, ACTION_SENDMSG, ACTION_SOCKET},
};

use super::{replay::Input, *};

const T0: u64 = 1_800_000_000_000_000;
const SECOND: u64 = 1_000_000;

/// Builds a trace of one agent's records, seq and clock advancing as they go.
struct Trace {
    agent: Arc<str>,
    seq: u64,
    now: u64,
    obs: Vec<Observation>,
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

impl Trace {
    fn new(agent: &str) -> Self {
        Self { agent: Arc::from(agent), seq: 100, now: T0, obs: Vec::new() }
    }

    fn at(&mut self, after_us: u64) -> &mut Self {
        self.now += after_us;
        self
    }

    fn push(&mut self, action: u8, allowed: bool, why: u8, dst: Option<IpAddr>, dport: u16, count: u64) {
        self.seq += 1;
        self.obs.push(Observation {
            agent: self.agent.clone(),
            seq: self.seq,
            ts_us: self.now,
            action,
            allowed,
            reason: why,
            dst,
            dport,
            count,
        });
    }

    fn allow(&mut self, dst: IpAddr, port: u16) {
        self.push(ACTION_CONNECT, true, reason::RULE, Some(dst), port, 1);
    }

    fn deny(&mut self, dst: IpAddr, port: u16) {
        self.push(ACTION_CONNECT, false, reason::NO_RULE, Some(dst), port, 1);
    }

    fn forbidden(&mut self, dst: IpAddr, port: u16) {
        self.push(ACTION_CONNECT, false, reason::FORBIDDEN, Some(dst), port, 1);
    }
}

/// The engine after `obs`, its changes, and the highest score it reached.
fn run(obs: &[Observation]) -> (Engine, Vec<Change>, f64) {
    let mut engine = Engine::new(Params::default());
    let (mut changes, mut peak) = (Vec::new(), 0.0f64);
    for o in obs {
        changes.extend(engine.observe(o));
        peak = peak.max(engine.view(&o.agent, o.ts_us).score);
    }
    (engine, changes, peak)
}

fn benign_trace() -> Trace {
    let mut t = Trace::new("builder");
    // A package install: a mirror pool of 40 addresses, 300 connects over two minutes.
    for i in 0..300u32 {
        t.at(400_000).allow(ip(203, 0, 113, (i % 40) as u8), 443);
    }
    // A git clone: a few connects to one host.
    for _ in 0..5 {
        t.at(SECOND).allow(ip(192, 0, 2, 10), 443);
    }
    // API calls to two granted hosts, and DNS, for ten minutes; telemetry the policy denies.
    for i in 0..600u32 {
        t.at(SECOND).allow(ip(198, 51, 100, 1 + (i % 2) as u8), 443);
        t.push(ACTION_SENDMSG, true, reason::RULE, Some(ip(127, 0, 0, 53)), 53, 1);
        if i % 30 == 0 {
            t.deny(ip(198, 51, 100, 200), 443);
        }
    }
    t
}

#[test]
fn benign_workloads_stay_under_20() {
    let t = benign_trace();
    let (_, changes, peak) = run(&t.obs);
    assert!(peak < 20.0, "peak {peak}: {changes:#?}");
    // And the score is not blind: the mirror pool past the baseline did register.
    assert!(changes.iter().any(|c| c.class == Class::NewDestination), "{changes:#?}");
    assert!(changes.iter().all(|c| c.action.is_none()));
}

#[test]
fn a_policy_denying_10000_routine_attempts_stays_under_40() {
    // Over ten minutes, and again as a tight retry loop in two seconds: four destinations.
    for spacing in [60_000, 200] {
        let mut t = Trace::new("misconfigured");
        for i in 0..10_000u32 {
            t.at(spacing).deny(ip(10, 0, 7, (i % 4) as u8), 5432);
            if i % 10 == 0 {
                t.allow(ip(10, 0, 5, 12), 5432);
            }
        }
        let (engine, changes, peak) = run(&t.obs);
        assert!(peak < 40.0, "spacing {spacing} µs: peak {peak}");
        assert!(peak > 15.0, "the denials counted: peak {peak}");
        assert_eq!(engine.view("misconfigured", t.now).standing, Standing::Active);
        assert!(changes.iter().all(|c| c.action.is_none()));
    }
}

#[test]
fn a_hostile_trace_is_paused_at_the_scan_and_suspended_at_the_hammering_each_with_two_reasons() {
    let mut t = Trace::new("hostile");
    for _ in 0..20 {
        t.at(SECOND).allow(ip(10, 0, 5, 12), 5432);
    }
    // A port scan of one host, 200 ports a second.
    let scan_start = t.seq;
    for port in 1..=1000u16 {
        t.at(5_000).deny(ip(10, 0, 0, 5), port);
    }
    let scan_end = t.seq;
    // Then hammering a forbidden tool's destination.
    for _ in 0..100 {
        t.at(10_000).forbidden(ip(10, 0, 9, 9), 22);
    }
    let (engine, changes, _) = run(&t.obs);
    let crossings: Vec<&Change> = changes.iter().filter(|c| c.action.is_some()).collect();
    assert_eq!(crossings.len(), 2, "{crossings:#?}");
    let (pause, suspend) = (crossings[0], crossings[1]);
    assert_eq!(pause.action, Some(Action::Pause));
    let scan_seq = pause.evidence.last().copied().unwrap();
    assert!((scan_start..=scan_end).contains(&scan_seq), "paused at the scan: {pause:#?}");
    assert!(pause.after >= 70.0 && pause.after < 90.0, "{pause:#?}");
    assert!(pause.contributors.len() >= 2, "{pause:#?}");
    assert!(pause.contributors.iter().any(|c| c.class == Class::Scan));
    assert!(pause.contributors.iter().all(|c| !c.reason.is_empty()));
    assert_eq!(suspend.action, Some(Action::Suspend));
    assert!(suspend.evidence.iter().all(|&s| s > scan_end), "suspended at the hammering: {suspend:#?}");
    assert!(suspend.after >= 90.0);
    assert!(suspend.contributors.len() >= 2, "{suspend:#?}");
    assert!(suspend.contributors.iter().any(|c| c.class == Class::Forbidden));
    assert_eq!(engine.view("hostile", t.now).standing, Standing::Suspended);
    // The scan's reason has numbers a person can check.
    let scan = changes.iter().rfind(|c| c.class == Class::Scan && c.seq_in(scan_start..=scan_end)).unwrap();
    assert!(
        scan.reason.contains("of 10.0.0.5") && scan.reason.contains("in the last 60 s"),
        "{}",
        scan.reason
    );
}

impl Change {
    fn seq_in(&self, range: std::ops::RangeInclusive<u64>) -> bool {
        self.evidence.iter().any(|s| range.contains(s))
    }
}

#[test]
fn a_tripwire_suspends_at_once_and_a_resume_starts_from_zero() {
    let mut t = Trace::new("curious");
    t.at(SECOND).allow(ip(10, 0, 5, 12), 5432);
    t.at(SECOND).deny(ip(169, 254, 169, 254), 80);
    let (mut engine, changes, _) = run(&t.obs);
    let last = changes.last().unwrap();
    assert_eq!((last.class, last.action), (Class::Tripwire, Some(Action::Suspend)), "{changes:#?}");
    // Two reasons: the tripwire and the denial it also was.
    assert!(last.contributors.len() >= 2);
    engine.resume("curious", t.now + SECOND);
    let view = engine.view("curious", t.now + SECOND);
    assert_eq!((view.score, view.standing), (0.0, Standing::Active));
}

#[test]
fn refused_sockets_and_stale_tokens_score_and_inbound_and_consequences_do_not() {
    let mut t = Trace::new("a");
    t.at(SECOND).push(ACTION_SOCKET, false, reason::RAW_SOCKET, None, 0, 1);
    t.at(SECOND).push(ACTION_CONNECT, false, reason::EXPIRED, Some(ip(10, 0, 0, 1)), 80, 1);
    let (engine, changes, _) = run(&t.obs);
    let classes: Vec<Class> = changes.iter().map(|c| c.class).collect();
    assert_eq!(classes, [Class::SideDoor, Class::StaleToken]);
    assert!(engine.view("a", t.now).score > 10.9);
    let mut quiet = Trace::new("b");
    for _ in 0..1000 {
        quiet.at(1000).push(ACTION_ACCEPT, false, reason::NO_RULE, Some(ip(10, 0, 0, 2)), 22, 1);
        quiet.push(ACTION_CONNECT, false, reason::PAUSED, Some(ip(10, 0, 0, 3)), 22, 1);
        quiet.push(ACTION_CONNECT, false, reason::KILLED, Some(ip(10, 0, 0, 3)), 22, 1);
    }
    let (engine, changes, _) = run(&quiet.obs);
    assert!(changes.is_empty());
    assert_eq!(engine.view("b", quiet.now).score, 0.0);
}

#[test]
fn a_summary_counts_as_its_count() {
    let mut one = Trace::new("a");
    one.at(SECOND).push(ACTION_CONNECT, false, reason::NO_RULE, None, 0, 50);
    let mut many = Trace::new("a");
    many.at(SECOND);
    for _ in 0..50 {
        many.push(ACTION_CONNECT, false, reason::NO_RULE, None, 0, 1);
    }
    let a = run(&one.obs).0.view("a", one.now + SECOND).score;
    let b = run(&many.obs).0.view("a", one.now + SECOND).score;
    assert!((a - b).abs() < 1e-9 && a > 9.0, "{a} {b}");
}

#[test]
fn every_point_of_the_score_is_in_a_record() {
    let t = benign_trace();
    let (_, changes, _) = run(&t.obs);
    for c in &changes {
        assert!(c.after > c.before, "{c:#?}");
        assert!(c.points >= 1.0 - 1e-9 || c.action.is_some(), "{c:#?}");
        assert!(!c.evidence.is_empty() && c.evidence_count >= c.evidence.len() as u64);
    }
}

#[test]
fn the_defaults_are_a_valid_config() {
    assert!(Params::from_config(&crate::config::Risk::default()).is_ok());
}

#[test]
fn a_config_cannot_let_one_class_pause_an_agent_alone() {
    let mut risk = crate::config::Risk::default();
    risk.classes.insert("scan".into(), crate::config::ClassWeights { cap: Some(70.0), ..Default::default() });
    let (key, problem) = Params::from_config(&risk).unwrap_err();
    assert_eq!(key, "risk.classes.scan");
    assert!(problem.contains("below pause_at"), "{problem}");
    risk.classes.clear();
    risk.classes.insert("scam".into(), crate::config::ClassWeights::default());
    assert_eq!(Params::from_config(&risk).unwrap_err().0, "risk.classes.scam");
}

#[test]
fn names_smuggled_through_dns_score_denied_and_dns_but_do_not_pause_alone() {
    let mut t = Trace::new("exfil");
    for _ in 0..1000 {
        t.at(2_000).push(ACTION_DNS, false, reason::NO_RULE, None, 53, 1);
    }
    // Record types the proxy does not forward, to a name it would.
    for _ in 0..10 {
        t.at(2_000).push(ACTION_DNS, false, dns_reason::QTYPE, None, 53, 1);
    }
    let (engine, changes, _) = run(&t.obs);
    let view = engine.view("exfil", t.now);
    let of = |class| view.contributors.iter().find(|c| c.class == class).map_or(0.0, |c| c.points);
    assert!((of(Class::Denied) - 20.0).abs() < 0.5, "{view:?}");
    assert!((of(Class::Dns) - 40.0).abs() < 0.5, "{view:?}");
    assert!(view.score < 70.0 && view.standing == Standing::Active, "{view:?}");
    let dns = changes.iter().rev().find(|c| c.class == Class::Dns).unwrap();
    assert!(dns.reason.contains("DNS queries refused"), "{}", dns.reason);
    // An answered query is no evidence.
    let mut fine = Trace::new("fine");
    for _ in 0..100 {
        fine.at(10_000).push(ACTION_DNS, true, reason::RULE, None, 53, 1);
    }
    assert_eq!(run(&fine.obs).0.view("fine", fine.now).score, 0.0);
}

/// The JSON record the daemon writes for `o` (the fields the engine reads, as the daemon names
/// them). A denial is written as a `would_deny` (audit mode: let through) at every other seq:
/// the engine scores it as the denial it would have been, live and replayed.
fn record_of(o: &Observation) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("seq".into(), json!(o.seq));
    r.insert("agent".into(), json!(&*o.agent));
    r.insert("ts".into(), json!(rfc3339_us(o.ts_us)));
    r.insert("action".into(), json!(crate::events::action_name(o.action)));
    let verdict = match (o.allowed, o.seq % 2) {
        (true, _) => "allow",
        (false, 0) => "would_deny",
        (false, _) => "deny",
    };
    r.insert("verdict".into(), json!(verdict));
    r.insert("reason".into(), json!(crate::events::reason_name(o.reason)));
    r.insert("dst".into(), json!(o.dst.map(|d| d.to_string())));
    r.insert("dport".into(), json!(o.dport));
    r.insert("proto".into(), json!("tcp"));
    if o.count != 1 {
        r.insert("count".into(), json!(o.count));
        r.insert("ts".into(), json!(rfc3339_us(o.ts_us - 5)));
        r.insert("last_ts".into(), json!(rfc3339_us(o.ts_us)));
    }
    r
}

fn observation() -> impl Strategy<Value = (u64, u8, u8, u8, u8, u16, u64)> {
    (
        0u64..3 * SECOND,
        prop::sample::select(vec![ACTION_CONNECT, ACTION_SENDMSG, ACTION_SOCKET, ACTION_ACCEPT, ACTION_DNS]),
        prop::sample::select(vec![
            reason::RULE,
            reason::NO_RULE,
            reason::FORBIDDEN,
            reason::EXPIRED,
            reason::RAW_SOCKET,
            reason::PAUSED,
            dns_reason::QTYPE,
            dns_reason::BUDGET,
            dns_reason::FULL,
        ]),
        0u8..4,
        0u8..20,
        0u16..40,
        prop::sample::select(vec![1u64, 1, 1, 7, 3000]),
    )
}

fn trace_of(raw: &[(u64, u8, u8, u8, u8, u16, u64)]) -> Vec<Observation> {
    let mut t = Trace::new("x");
    for &(gap, action, why, host_a, host_b, port, count) in raw {
        t.now += gap;
        let dst = if host_a == 3 { ip(169, 254, 169, 254) } else { ip(10, host_a, 0, host_b) };
        // A DNS record has no destination (the proxy answered it), a socket's neither.
        let dst = (action != ACTION_SOCKET && action != ACTION_DNS).then_some(dst);
        t.push(action, why == reason::RULE, why, dst, port, count);
    }
    t.obs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn the_score_stays_within_0_and_100(raw in prop::collection::vec(observation(), 1..300)) {
        let obs = trace_of(&raw);
        let mut engine = Engine::new(Params::default());
        for o in &obs {
            for c in engine.observe(o) {
                prop_assert!((0.0..=100.0).contains(&c.before) && (0.0..=100.0).contains(&c.after));
            }
            let s = engine.view("x", o.ts_us).score;
            prop_assert!((0.0..=100.0).contains(&s));
        }
    }

    #[test]
    fn an_event_never_lowers_the_score_at_the_same_instant(raw in prop::collection::vec(observation(), 1..200)) {
        let obs = trace_of(&raw);
        let mut engine = Engine::new(Params::default());
        for o in &obs {
            let before = engine.view("x", o.ts_us).score;
            engine.observe(o);
            prop_assert!(engine.view("x", o.ts_us).score >= before);
        }
    }

    #[test]
    fn with_no_events_the_score_decays(raw in prop::collection::vec(observation(), 1..100), later in 1u64..100_000) {
        let obs = trace_of(&raw);
        let (engine, ..) = run(&obs);
        let end = obs.last().unwrap().ts_us;
        let now = engine.view("x", end).score;
        let then = engine.view("x", end + later * SECOND).score;
        prop_assert!(then <= now);
        // (A score held at 100 by contributions summing past it decays once they fall below.)
        if now > 0.0 && now < 100.0 {
            prop_assert!(then < now);
        }
    }

    #[test]
    fn replaying_the_records_gives_what_the_live_engine_gave(raw in prop::collection::vec(observation(), 1..300), resume_at in 0usize..300) {
        let obs = trace_of(&raw);
        let mut live = Engine::new(Params::default());
        let (mut live_changes, mut inputs) = (Vec::new(), Vec::new());
        for (i, o) in obs.iter().enumerate() {
            if i == resume_at {
                live.resume("x", o.ts_us);
                let resume = json!({"event": "resume", "agent": "x", "ts": rfc3339_us(o.ts_us), "reason": "reviewed"});
                inputs.push(replay::input_of(resume.as_object().unwrap()).unwrap());
            }
            live_changes.extend(live.observe(o));
            let parsed = replay::input_of(&record_of(o));
            prop_assert_eq!(parsed.as_ref(), Some(&Input::Decision(o.clone())));
            inputs.extend(parsed);
        }
        let (replayed, changes) = replay::replay(Params::default(), inputs);
        let records = |cs: &[Change]| cs.iter().map(Change::to_record).collect::<Vec<_>>();
        prop_assert_eq!(records(&changes), records(&live_changes));
        let end = obs.last().unwrap().ts_us;
        prop_assert_eq!(replayed.view("x", end), live.view("x", end));
    }
}
