//! Decision events from the kernel: decoding the ring buffer records and turning them into the
//! JSON records of the event stream and the audit log (docs/events.md).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};
use ztseg_common::{
    decision::{NO_RULE_ID, reason},
    event::{
        ACTION_ACCEPT, ACTION_CONNECT, ACTION_RECEIVE, ACTION_SENDMSG, ACTION_SOCKET, Event, FAMILY_V4,
        FAMILY_V6, inbound,
    },
    rule::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW},
};

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
        _ => "unknown",
    }
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
        _ => "unknown",
    }
}

/// Protocol names as in the policy files; other protocols by number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP | PROTO_ICMPV6 => "icmp".to_owned(),
        other => other.to_string(),
    }
}

/// The address of an event: the destination of a connect or send, the sender of an inbound
/// connection or datagram (`None` for socket creation).
pub fn address(event: &Event) -> Option<IpAddr> {
    let bytes: Vec<u8> = event.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match (event.action, event.family) {
        (ACTION_SOCKET, _) => None,
        (_, FAMILY_V4) => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        (_, FAMILY_V6) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes);
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The wall-clock time of a boot-clock timestamp, given both clocks read at one instant.
pub fn wall_time(ts_boot_ns: u64, boot_now_ns: u64, unix_now_ns: u64) -> SystemTime {
    let unix_ns = unix_now_ns.saturating_sub(boot_now_ns.saturating_sub(ts_boot_ns));
    UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-28T13:02:03.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// What the daemon knows about the agent behind an event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attribution {
    pub agent: Option<String>,
    pub op: Option<String>,
    pub jti: Option<String>,
    /// The catalogue entry behind `rule_id` in the event's table, e.g. `scope:read:x#0`.
    pub rule: Option<String>,
}

/// The audit/event record body of a kernel decision (without `seq`, `prev`, `hash`, which the
/// audit log adds). Inbound records (`accept`, `receive`) name the sender in `src` and the
/// agent's own port in `dport`, with `dst` null; they have no task, so `pid` is 0 and `comm`
/// empty.
pub fn record(event: &Event, who: &Attribution, ts: SystemTime) -> Map<String, Value> {
    let tgid = (event.pid_tgid >> 32) as u32;
    let uid = event.uid_gid as u32;
    let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());
    let comm = String::from_utf8_lossy(&event.comm[..comm_len]).into_owned();
    let body = json!({
        "ts": rfc3339(ts),
        "agent": who.agent,
        "op": who.op,
        "jti": who.jti,
        "pid": tgid,
        "uid": uid,
        "comm": comm,
        "cgroup_id": event.cgroup_id,
        "action": action_name(event.action),
        "proto": proto_name(event.proto),
        "dst": if inbound(event.action) { None } else { address(event).map(|a| a.to_string()) },
        "dport": u16::from_be_bytes(event.port),
        "verdict": if event.verdict == VERDICT_ALLOW { "allow" } else { "deny" },
        "reason": reason_name(event.reason),
        "rule": who.rule,
    });
    let mut map = match body {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    if inbound(event.action) {
        map.insert("src".into(), json!(address(event).map(|a| a.to_string())));
    }

    map
}

/// The rule id of an event, if a rule decided it.
pub fn rule_id(event: &Event) -> Option<u32> {
    (event.rule_id != NO_RULE_ID).then_some(event.rule_id)
}

#[cfg(test)]
mod tests {
    use ztseg_common::rule::VERDICT_DENY;

    use super::*;

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
        let who = Attribution {
            agent: Some("analyst-7".into()),
            op: Some("report-2026-q1".into()),
            jti: Some("j1".into()),
            rule: Some("scope:read:data.sales_q1_2026#0".into()),
        };
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
    fn boot_time_maps_to_wall_time() {
        let t = wall_time(9_000, 10_000, 1_000_000);
        assert_eq!(t, UNIX_EPOCH + Duration::from_nanos(999_000));
    }
}
