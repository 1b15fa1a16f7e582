//! Decision events from the kernel: decoding the ring buffer records and turning them into the
//! JSON records of the event stream and the audit log (docs/events.md).

use std::{
    borrow::Cow,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ztseg_common::{
    decision::{NO_RULE_ID, reason},
    event::{
        ACTION_ACCEPT, ACTION_CONNECT, ACTION_RECEIVE, ACTION_SENDMSG, ACTION_SOCKET, Event, FAMILY_V4,
        FAMILY_V6, inbound,
    },
    rule::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_WOULD_DENY},
};

use crate::audit::{Body, BodyWriter};

/// Reads one ring buffer record; `None` if it is not an [`Event`] (wrong size).
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() != size_of::<Event>() {
        return None;
    }
    // SAFETY: the length matches and `Event` is plain data valid for every bit pattern; the
    // read does not assume alignment.
    Some(unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() })
}

pub fn action_name(action: u8) -> &'static str {
    match action {
        ACTION_CONNECT => "connect",
        ACTION_SENDMSG => "sendmsg",
        ACTION_SOCKET => "socket",
        ACTION_ACCEPT => "accept",
        ACTION_RECEIVE => "receive",
        ztseg_common::dns::ACTION_DNS => "dns",
        _ => "unknown",
    }
}

/// A decision's verdict as records name it: `allow`, `would_deny` (denied by the rules, let
/// through in audit mode), or `deny` (any other code: fails closed in what it says).
pub fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_ALLOW => "allow",
        VERDICT_WOULD_DENY => "would_deny",
        _ => "deny",
    }
}

/// Whether a summary of `event`'s kind counts every destination (a denials summary: `dst`
/// null, `dport` 0) rather than one: what was let through (allowed or would-be denied) is
/// summarised by destination.
fn summarised_by_reason(event: &Event) -> bool {
    !matches!(event.verdict, VERDICT_ALLOW | VERDICT_WOULD_DENY)
}

pub fn reason_name(code: u8) -> &'static str {
    match code {
        reason::RULE => "rule",
        reason::NO_RULE => "no_rule",
        reason::FORBIDDEN => "forbidden",
        reason::EXPIRED => "expired",
        reason::NO_TOKEN => "no_token",
        reason::KILLED => "killed",
        reason::PAUSED => "paused",
        reason::UNREGISTERED => "unregistered",
        reason::RAW_SOCKET => "raw_socket",
        reason::PROTOCOL => "protocol",
        reason::UNRECORDED => "unrecorded",
        reason::SUSPENDED => "suspended",
        _ => dns_reason_name(code),
    }
}

/// The reasons of DNS decisions (`ztseg_common::dns::reason`).
fn dns_reason_name(code: u8) -> &'static str {
    use ztseg_common::dns::reason as dns;
    match code {
        dns::DNS_PROXY => "dns_proxy",
        dns::PROXY_NET => "proxy_net",
        dns::DNS_V6 => "dns_v6",
        dns::QTYPE => "qtype",
        dns::BUDGET => "budget",
        dns::FULL => "full",
        dns::CNAME => "cname",
        dns::UPSTREAM => "upstream",
        dns::INSTALL => "install",
        dns::MALFORMED => "malformed",
        _ => "unknown",
    }
}

/// Protocol names as in the policy files; other protocols by number.
pub fn proto_name(proto: u8) -> Cow<'static, str> {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP | PROTO_ICMPV6 => "icmp".into(),
        other => other.to_string().into(),
    }
}

/// The address of an event: the destination of a connect or send, the sender of an inbound
/// connection or datagram (`None` for socket creation).
pub fn address(event: &Event) -> Option<IpAddr> {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(event.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    match (event.action, event.family) {
        (ACTION_SOCKET, _) => None,
        (_, FAMILY_V4) => Some(IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))),
        (_, FAMILY_V6) => Some(IpAddr::V6(Ipv6Addr::from(octets))),
        _ => None,
    }
}

/// The wall-clock time of a boot-clock timestamp, given both clocks read at one instant.
pub fn wall_time(ts_boot_ns: u64, boot_now_ns: u64, unix_now_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(wall_ns(ts_boot_ns, boot_now_ns, unix_now_ns))
}

pub fn wall_ns(ts_boot_ns: u64, boot_now_ns: u64, unix_now_ns: u64) -> u64 {
    unix_now_ns.saturating_sub(boot_now_ns.saturating_sub(ts_boot_ns))
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-28T13:02:03.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Writes record timestamps as [`rfc3339`] does, formatting the date and time of day once per
/// second rather than once per record.
#[derive(Default)]
pub struct Timestamps {
    second: Option<u64>,
    /// `"2026-11-28T13:02:03.` for `second`.
    prefix: Vec<u8>,
}

impl Timestamps {
    /// The JSON string of the wall-clock time `unix_ns`.
    pub fn write(&mut self, unix_ns: u64, out: &mut Vec<u8>) {
        let (second, micros) = (unix_ns / 1_000_000_000, unix_ns % 1_000_000_000 / 1_000);
        if self.second != Some(second) {
            let whole = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second));
            self.prefix.clear();
            self.prefix.push(b'"');
            // `YYYY-MM-DDTHH:MM:SSZ`: all but the `Z`.
            let whole = whole.to_string();
            self.prefix.extend_from_slice(&whole.as_bytes()[..whole.len() - 1]);
            self.prefix.push(b'.');
            self.second = Some(second);
        }
        out.extend_from_slice(&self.prefix);
        let _ = write!(out, "{micros:06}Z\"");
    }
}

/// What attributes the decisions of one rule table.
#[derive(Clone, Debug)]
pub struct TableInfo {
    /// The catalogue entry behind each rule id, e.g. `scope:read:x#0`.
    pub origins: Arc<Vec<String>>,
    pub op: Option<String>,
    pub jti: String,
}

/// What the daemon knows about the agent behind an event.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    pub agent: Option<Arc<str>>,
    /// The token whose rule table made the decision.
    pub table: Option<Arc<TableInfo>>,
}

/// The audit/event record body of a kernel decision (without `seq`, `prev`, `hash`, which the
/// audit log adds), `ts` being the decision's wall-clock time in ns. Inbound records (`accept`,
/// `receive`) name the sender in `src` and the agent's own port in `dport`, with `dst` null;
/// they have no task, so `pid` is 0 and `comm` empty.
pub fn decision_body(event: &Event, who: &Attribution, ts: u64, timestamps: &mut Timestamps) -> Body {
    body_of(event, who, ts, None, timestamps)
}

/// How many decisions a summary record stands for, and the wall-clock ns of the last one.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub count: u64,
    pub last_ns: u64,
}

/// The record of a summary: the first decision's record (its `ts`) with `count` and `last_ts`.
/// A denials summary counts every destination (`dst` null, `dport` 0), an allows summary one.
pub fn summary_body(
    first: &Event,
    counted: Counted,
    who: &Attribution,
    ts: u64,
    timestamps: &mut Timestamps,
) -> Body {
    body_of(first, who, ts, Some(counted), timestamps)
}

fn body_of(
    event: &Event,
    who: &Attribution,
    ts: u64,
    counted: Option<Counted>,
    timestamps: &mut Timestamps,
) -> Body {
    let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());
    let table = who.table.as_deref();
    let rule = rule_id(event).and_then(|id| table?.origins.get(id as usize));
    let inbound = inbound(event.action);
    // A denials summary stands for every destination it counted.
    let any_destination = counted.is_some() && summarised_by_reason(event);
    let mut body = BodyWriter::new();
    body.str("action", action_name(event.action))
        .opt_str("agent", who.agent.as_deref())
        .u64("cgroup_id", event.cgroup_id)
        .str("comm", &String::from_utf8_lossy(&event.comm[..comm_len]));
    if let Some(counted) = counted {
        body.u64("count", counted.count);
    }
    body.u64("dport", if any_destination { 0 } else { u64::from(u16::from_be_bytes(event.port)) })
        .ip("dst", if inbound || any_destination { None } else { address(event) })
        .opt_str("jti", table.map(|t| t.jti.as_str()));
    if let Some(counted) = counted {
        body.raw("last_ts", |out| timestamps.write(counted.last_ns, out));
    }
    body.opt_str("op", table.and_then(|t| t.op.as_deref()))
        .u64("pid", event.pid_tgid >> 32)
        .str("proto", &proto_name(event.proto))
        .str("reason", reason_name(event.reason))
        .opt_str("rule", rule.map(String::as_str));
    if inbound {
        body.ip("src", if any_destination { None } else { address(event) });
    }
    body.raw("ts", |out| timestamps.write(ts, out))
        .u64("uid", u64::from(event.uid_gid as u32))
        .str("verdict", verdict_name(event.verdict));
    body.finish()
}

/// What the risk engine reads of a decision of an agent, exactly as its record (made by
/// [`decision_body`] or [`summary_body`] with the same `ts`/`counted`) says it: the engine's
/// replay of the log reads the same from the JSON. `seq` is set once the record has one.
pub fn observation(
    event: &Event,
    agent: Option<&Arc<str>>,
    ts: u64,
    counted: Option<Counted>,
) -> Option<crate::risk::Observation> {
    let agent = agent?.clone();
    if action_name(event.action) == "unknown" || reason_name(event.reason) == "unknown" {
        return None;
    }
    let any_destination = counted.is_some() && summarised_by_reason(event);
    let dst = if inbound(event.action) || any_destination { None } else { address(event) };
    Some(crate::risk::Observation {
        agent,
        seq: 0,
        // A summary's time is its last decision's.
        ts_us: counted.map_or(ts, |c| c.last_ns) / 1_000,
        action: event.action,
        // A would-be denial is scored as the denial it would have been.
        allowed: event.verdict == VERDICT_ALLOW,
        reason: event.reason,
        dst,
        dport: if any_destination { 0 } else { u16::from_be_bytes(event.port) },
        count: counted.map_or(1, |c| c.count),
    })
}

/// The rule id of an event, if a rule decided it.
pub fn rule_id(event: &Event) -> Option<u32> {
    (event.rule_id != NO_RULE_ID).then_some(event.rule_id)
}

#[cfg(test)]
mod tests {
    use ztseg_common::rule::VERDICT_DENY;

    use serde_json::Value;

    use super::*;
    use crate::audit::Chain;

    fn record(event: &Event, who: &Attribution, ts: SystemTime) -> serde_json::Map<String, Value> {
        let ns = ts.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let body = decision_body(event, who, ns, &mut Timestamps::default());
        let Ok(Value::Object(map)) = serde_json::from_slice(&body.to_vec(Chain::default())) else {
            panic!("not an object")
        };
        map
    }

    fn event() -> Event {
        Event {
            ts_boot_ns: 5_000_000_000,
            cgroup_id: 77,
            pid_tgid: (4242u64 << 32) | 4243,
            uid_gid: (100u64 << 32) | 1000,
            rule_id: 0,
            table: 3,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
            addr: [u32::from_ne_bytes([10, 0, 5, 12]), 0, 0, 0],
            port: 5432u16.to_be_bytes(),
            family: FAMILY_V4,
            proto: PROTO_TCP,
            action: ACTION_CONNECT,
            verdict: VERDICT_ALLOW,
            reason: reason::RULE,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_only_whole_records() {
        let e = event();
        // SAFETY: Event is plain data.
        let bytes: [u8; 80] = unsafe { std::mem::transmute(e) };
        assert_eq!(decode(&bytes), Some(e));
        assert_eq!(decode(&bytes[..79]), None);
    }

    #[test]
    fn record_has_the_contract_fields() {
        let table = TableInfo {
            origins: Arc::new(vec!["scope:read:data.sales_q1_2026#0".into()]),
            op: Some("report-2026-q1".into()),
            jti: "j1".into(),
        };
        let who = Attribution { agent: Some("analyst-7".into()), table: Some(Arc::new(table)) };
        let r = record(&event(), &who, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        assert_eq!(r["ts"], "2027-01-15T08:00:00.000000Z");
        assert_eq!(r["agent"], "analyst-7");
        assert_eq!(r["pid"], 4242);
        assert_eq!(r["uid"], 1000);
        assert_eq!(r["comm"], "python3");
        assert_eq!(r["action"], "connect");
        assert_eq!(r["proto"], "tcp");
        assert_eq!(r["dst"], "10.0.5.12");
        assert_eq!(r["dport"], 5432);
        assert_eq!(r["verdict"], "allow");
        assert_eq!(r["reason"], "rule");
        assert_eq!(r["rule"], "scope:read:data.sales_q1_2026#0");
        assert_eq!(r["cgroup_id"], 77);
        assert_eq!((r["op"].as_str(), r["jti"].as_str()), (Some("report-2026-q1"), Some("j1")));
        // A rule id the table does not have names no rule.
        let mut other = event();
        other.rule_id = 1;
        assert!(record(&other, &who, UNIX_EPOCH)["rule"].is_null());
    }

    #[test]
    fn timestamps_match_rfc3339_across_seconds() {
        let mut timestamps = Timestamps::default();
        for ns in [0, 999_999_999, 1_000_000_000, 1_800_000_000_123_456_789, 1_800_000_001_000_001_000] {
            let mut out = Vec::new();
            timestamps.write(ns, &mut out);
            let expected = rfc3339(UNIX_EPOCH + Duration::from_nanos(ns));
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{expected}\""));
        }
    }

    #[test]
    fn v6_and_socket_destinations() {
        let mut e = event();
        e.family = FAMILY_V6;
        let v6: Ipv6Addr = "fd77::1".parse().unwrap();
        let o = v6.octets();
        e.addr =
            [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]));
        assert_eq!(address(&e), Some(IpAddr::V6(v6)));
        e.action = ACTION_SOCKET;
        assert_eq!(address(&e), None);
        e.verdict = VERDICT_DENY;
        e.reason = reason::RAW_SOCKET;
        let r = record(&e, &Attribution::default(), UNIX_EPOCH);
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str(), r["dst"].is_null()),
            (Some("deny"), Some("raw_socket"), true)
        );
    }

    #[test]
    fn inbound_records_name_the_sender_and_the_agents_port() {
        let mut e = event();
        e.action = ACTION_ACCEPT;
        e.pid_tgid = 0;
        e.comm = [0; 16];
        e.port = 8080u16.to_be_bytes();
        let r = record(&e, &Attribution::default(), UNIX_EPOCH);
        assert_eq!(r["action"], "accept");
        assert_eq!(r["src"], "10.0.5.12");
        assert!(r["dst"].is_null());
        assert_eq!(
            (r["dport"].as_u64(), r["pid"].as_u64(), r["comm"].as_str()),
            (Some(8080), Some(0), Some(""))
        );
        e.action = ACTION_RECEIVE;
        e.proto = PROTO_UDP;
        let r = record(&e, &Attribution::default(), UNIX_EPOCH);
        assert_eq!((r["action"].as_str(), r["proto"].as_str()), (Some("receive"), Some("udp")));
        let outbound = record(&event(), &Attribution::default(), UNIX_EPOCH);
        assert!(!outbound.contains_key("src"), "outbound records keep their shape");
    }

    #[test]
    fn a_would_be_denial_is_recorded_as_would_deny_with_its_reason_rule_and_destination() {
        let table = TableInfo {
            origins: Arc::new(vec!["scope:x#0".into(), "forbidden:tool:shell#0".into()]),
            op: None,
            jti: "j1".into(),
        };
        let who = Attribution { agent: Some("analyst-7".into()), table: Some(Arc::new(table)) };
        let mut e = event();
        (e.verdict, e.reason, e.rule_id) = (VERDICT_WOULD_DENY, reason::FORBIDDEN, 1);
        let r = record(&e, &who, UNIX_EPOCH);
        assert_eq!(
            (r["verdict"].as_str(), r["reason"].as_str(), r["rule"].as_str(), r["dst"].as_str()),
            (Some("would_deny"), Some("forbidden"), Some("forbidden:tool:shell#0"), Some("10.0.5.12"))
        );
        // Summarised like an allow, by destination (it reached one); a denial by reason only.
        let counted = Counted { count: 9, last_ns: 2_000_000_000 };
        let summary = |e: &Event| {
            let body = summary_body(e, counted, &who, 1_000_000_000, &mut Timestamps::default());
            serde_json::from_slice::<Value>(&body.to_vec(Chain::default())).unwrap()
        };
        assert_eq!(
            (summary(&e)["dst"].as_str(), summary(&e)["dport"].as_u64()),
            (Some("10.0.5.12"), Some(5432))
        );
        let mut denied = e;
        denied.verdict = VERDICT_DENY;
        assert_eq!((summary(&denied)["dst"].as_str(), summary(&denied)["dport"].as_u64()), (None, Some(0)));
        assert_eq!(verdict_name(0), "deny", "an unknown code says deny");
    }

    /// Replay equals live at the boundary: what the risk engine is fed with a record (its
    /// observation) is what the replay parses back from the record's JSON, for every verdict,
    /// one by one and summarised; a would-be denial is fed as the denial it would have been.
    #[test]
    fn the_engine_reads_from_a_record_what_it_was_fed_with_it() {
        let who = Attribution { agent: Some("analyst-7".into()), table: None };
        for (verdict, why) in [
            (VERDICT_ALLOW, reason::RULE),
            (VERDICT_DENY, reason::NO_RULE),
            (VERDICT_DENY, reason::FORBIDDEN),
            (VERDICT_WOULD_DENY, reason::NO_RULE),
            (VERDICT_WOULD_DENY, reason::FORBIDDEN),
        ] {
            let mut e = event();
            (e.verdict, e.reason) = (verdict, why);
            for counted in [None, Some(Counted { count: 7, last_ns: 1_800_000_001_000_000_000 })] {
                let ts = 1_800_000_000_000_000_000;
                let body = match counted {
                    None => decision_body(&e, &who, ts, &mut Timestamps::default()),
                    Some(c) => summary_body(&e, c, &who, ts, &mut Timestamps::default()),
                };
                let mut fed = observation(&e, who.agent.as_ref(), ts, counted).unwrap();
                fed.seq = 42;
                let Value::Object(mut json) = serde_json::from_slice(&body.to_vec(Chain::default())).unwrap()
                else {
                    panic!("not an object")
                };
                json.insert("seq".into(), 42.into());
                let parsed = crate::risk::replay::input_of(&json);
                assert_eq!(parsed, Some(crate::risk::replay::Input::Decision(fed.clone())), "{json:?}");
                assert_eq!(fed.allowed, verdict == VERDICT_ALLOW);
            }
        }
    }

    #[test]
    fn boot_time_maps_to_wall_time() {
        let t = wall_time(9_000, 10_000, 1_000_000);
        assert_eq!(t, UNIX_EPOCH + Duration::from_nanos(999_000));
    }
}
