//! The record of one DNS query (docs/events.md#dns-records): a decision record of action
//! `dns` with the query's name, type and answers, and what the risk engine reads of it.

use std::{net::IpAddr, sync::Arc};

use serde_json::{Map, Value, json};
use ztseg_common::{dns::ACTION_DNS, rule::VERDICT_ALLOW};

use super::store::Who;
use crate::{events, risk::Observation};

/// What became of a query.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub allowed: bool,
    /// `decision::reason` or `dns::reason`.
    pub reason: u8,
    pub rule_id: Option<u32>,
    /// The code the agent got (`NOERROR`, `NXDOMAIN`, `REFUSED`, `SERVFAIL`, ...).
    pub rcode: String,
    /// The addresses the agent got (and that were granted), and the CNAME chain to them.
    pub answers: Vec<IpAddr>,
    pub cnames: Vec<String>,
    /// Addresses of the upstream answer that no name may grant (loopback, link-local, ...),
    /// left out of the agent's answer.
    pub dropped: Vec<IpAddr>,
    /// The shortest TTL the agent got.
    pub ttl: Option<u32>,
    /// Why, in words, for a refusal.
    pub detail: Option<String>,
}

/// The query itself.
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub who: Option<&'a Who>,
    /// `udp` or `tcp`.
    pub proto: &'static str,
    /// Lower case, no trailing dot; empty when the message was unreadable.
    pub qname: &'a str,
    /// `A`, `AAAA`, `TXT`, ...; empty when unreadable.
    pub qtype: &'a str,
    /// Wall-clock µs.
    pub ts_us: u64,
}

/// The record's fields (the audit log adds `seq`, `prev`, `hash`) and what the risk engine
/// reads of it (an agent's records only), exactly as the record says it.
pub fn record(asked: &Asked<'_>, outcome: &Outcome) -> (Map<String, Value>, Option<Observation>) {
    let who = asked.who;
    let table = who.and_then(|w| w.table.as_deref());
    let rule = outcome.rule_id.and_then(|id| table?.origins.get(id as usize)).cloned();
    let mut r = Map::new();
    r.insert("action".into(), json!("dns"));
    r.insert("agent".into(), json!(who.map(|w| &*w.agent)));
    r.insert("answers".into(), json!(outcome.answers.iter().map(ToString::to_string).collect::<Vec<_>>()));
    r.insert("cgroup_id".into(), json!(who.map_or(0, |w| w.cgroup_id)));
    r.insert("cnames".into(), json!(outcome.cnames));
    r.insert("comm".into(), json!(""));
    if let Some(detail) = &outcome.detail {
        r.insert("detail".into(), json!(detail));
    }
    r.insert("dport".into(), json!(53));
    if !outcome.dropped.is_empty() {
        r.insert(
            "dropped".into(),
            json!(outcome.dropped.iter().map(ToString::to_string).collect::<Vec<_>>()),
        );
    }
    r.insert("dst".into(), Value::Null);
    r.insert("jti".into(), json!(table.map(|t| &t.jti)));
    r.insert("op".into(), json!(table.and_then(|t| t.op.as_deref())));
    r.insert("pid".into(), json!(0));
    r.insert("proto".into(), json!(asked.proto));
    r.insert("qname".into(), json!(asked.qname));
    r.insert("qtype".into(), json!(asked.qtype));
    r.insert("rcode".into(), json!(outcome.rcode));
    r.insert("reason".into(), json!(events::reason_name(outcome.reason)));
    r.insert("rule".into(), json!(rule));
    r.insert("ts".into(), json!(crate::risk::rfc3339_us(asked.ts_us)));
    r.insert("ttl".into(), json!(outcome.ttl));
    r.insert("uid".into(), json!(who.map_or(0, |w| w.uid)));
    let verdict = if outcome.allowed { VERDICT_ALLOW } else { ztseg_common::rule::VERDICT_DENY };
    r.insert("verdict".into(), json!(events::verdict_name(verdict)));
    let observation = who.map(|w| Observation {
        agent: Arc::clone(&w.agent),
        seq: 0,
        ts_us: asked.ts_us,
        action: ACTION_DNS,
        allowed: outcome.allowed,
        reason: outcome.reason,
        dst: None,
        dport: 53,
        count: 1,
    });
    (r, observation)
}

#[cfg(test)]
mod tests {
    use ztseg_common::decision::reason;

    use super::*;
    use crate::{events::TableInfo, risk::replay};

    fn who() -> Who {
        Who {
            agent: "alpha".into(),
            cgroup_id: 7,
            uid: 61184,
            table: Some(Arc::new(TableInfo {
                origins: Arc::new(vec!["tool:llm#0".into()]),
                op: Some("op-1".into()),
                jti: "j1".into(),
            })),
        }
    }

    #[test]
    fn a_record_names_the_query_its_answers_and_why_and_replays_as_it_was_scored() {
        let who = who();
        let asked = Asked {
            who: Some(&who),
            proto: "udp",
            qname: "api.example.com",
            qtype: "A",
            ts_us: 1_800_000_000_123_456,
        };
        let outcome = Outcome {
            allowed: true,
            reason: reason::RULE,
            rule_id: Some(0),
            rcode: "NOERROR".into(),
            answers: vec!["192.0.2.7".parse().unwrap()],
            cnames: vec!["edge.cdn.example.net".into()],
            ttl: Some(30),
            ..Outcome::default()
        };
        let (r, observation) = record(&asked, &outcome);
        assert_eq!(r["action"], "dns");
        assert_eq!((r["qname"].as_str(), r["qtype"].as_str()), (Some("api.example.com"), Some("A")));
        assert_eq!(r["answers"], json!(["192.0.2.7"]));
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str(), r["rule"].as_str()),
            (Some("allow"), Some("rule"), Some("tool:llm#0"))
        );
        assert_eq!(
            (r["agent"].as_str(), r["jti"].as_str(), r["op"].as_str()),
            (Some("alpha"), Some("j1"), Some("op-1"))
        );
        assert_eq!(r["ts"], "2027-01-15T08:00:00.123456Z");
        let mut logged = r.clone();
        logged.insert("seq".into(), json!(9));
        let mut live = observation.unwrap();
        live.seq = 9;
        assert_eq!(replay::input_of(&logged), Some(replay::Input::Decision(live)));
        // A refusal says why.
        let refused = Outcome {
            reason: ztseg_common::dns::reason::QTYPE,
            rcode: "REFUSED".into(),
            detail: Some("TXT is not forwarded".into()),
            ..Outcome::default()
        };
        let (r, observation) = record(&Asked { qtype: "TXT", ..asked }, &refused);
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str(), r["rule"].is_null()),
            (Some("deny"), Some("qtype"), true)
        );
        let mut logged = r.clone();
        logged.insert("seq".into(), json!(10));
        let mut live = observation.unwrap();
        live.seq = 10;
        assert_eq!(replay::input_of(&logged), Some(replay::Input::Decision(live)));
    }
}
