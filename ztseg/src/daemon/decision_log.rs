//! A decision record as a log event (target `ztseg::decision`): the record's fields as the
//! event's fields, so that the journal gets `AGENT`, `OP`, `JTI`, `VERDICT`, `REASON`, ... of
//! its own, and its gist as the message, so that a one-line view still says who did what.

use serde::Deserialize;
use tracing::{Level, debug, enabled, info};

use crate::audit::{Body, Chain};

/// The log target of decisions (`ZTSEG_LOG=info,ztseg::decision=debug` logs allowed ones too).
const TARGET: &str = "ztseg::decision";

/// The fields of a decision record (docs/events.md) that a log event carries; `ts` is left to
/// the log's own time.
#[derive(Debug, Deserialize, PartialEq, Eq)]
struct Fields {
    action: String,
    agent: Option<String>,
    cgroup_id: u64,
    comm: String,
    dport: u64,
    dst: Option<String>,
    jti: Option<String>,
    op: Option<String>,
    pid: u64,
    proto: String,
    reason: String,
    rule: Option<String>,
    #[serde(default)]
    src: Option<String>,
    uid: u64,
    verdict: String,
}

impl Fields {
    /// `analyst-7: deny connect tcp to 203.0.113.7:443 (no_rule)`; an inbound one
    /// `from 10.79.0.1 to port 7000`.
    fn message(&self) -> String {
        let agent = self.agent.as_deref().unwrap_or("(no agent)");
        let mut text = format!("{agent}: {} {} {}", self.verdict, self.action, self.proto);
        if let Some(dst) = &self.dst {
            if dst.contains(':') {
                text += &format!(" to [{dst}]:{}", self.dport);
            } else {
                text += &format!(" to {dst}:{}", self.dport);
            }
        }
        if let Some(src) = &self.src {
            text += &format!(" from {src} to port {}", self.dport);
        }
        text + &format!(" ({})", self.reason)
    }
}

/// One event per decision, at `level` (`info` for denials, `debug` for allows).
macro_rules! decision_event {
    ($level:ident, $fields:expr) => {{
        let f = $fields;
        $level!(
            target: TARGET,
            agent = f.agent.as_deref(),
            op = f.op.as_deref(),
            jti = f.jti.as_deref(),
            verdict = %f.verdict,
            reason = %f.reason,
            action = %f.action,
            proto = %f.proto,
            dst = f.dst.as_deref(),
            src = f.src.as_deref(),
            dport = f.dport,
            rule = f.rule.as_deref(),
            pid = f.pid,
            uid = f.uid,
            comm = %f.comm,
            cgroup_id = f.cgroup_id,
            "{}",
            f.message()
        )
    }};
}

/// Logs a denied decision at `info`.
pub fn denied(body: &Body) {
    if enabled!(target: TARGET, Level::INFO) {
        match fields(body) {
            Ok(fields) => decision_event!(info, &fields),
            Err(raw) => info!(target: TARGET, "{raw}"),
        }
    }
}

/// Logs an allowed decision at `debug`.
pub fn allowed(body: &Body) {
    if enabled!(target: TARGET, Level::DEBUG) {
        match fields(body) {
            Ok(fields) => decision_event!(debug, &fields),
            Err(raw) => debug!(target: TARGET, "{raw}"),
        }
    }
}

/// The record's fields; the record itself as text should it not read as a decision (it always
/// does: [`crate::events::decision_body`] wrote it).
fn fields(body: &Body) -> Result<Fields, String> {
    let bytes = body.to_vec(Chain::default());
    serde_json::from_slice(&bytes).map_err(|_| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Body {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        Body::from_map(value.as_object().unwrap())
    }

    #[test]
    fn an_outbound_decision_reads_with_its_destination() {
        let fields = fields(&body(
            r#"{"action":"connect","agent":"analyst-7","cgroup_id":12,"comm":"curl","dport":443,"dst":"203.0.113.7","jti":"j1","op":"report","pid":77,"proto":"tcp","reason":"no_rule","rule":null,"ts":"2026-11-28T13:02:03.123456Z","uid":61184,"verdict":"deny"}"#,
        ))
        .unwrap();
        assert_eq!(fields.agent.as_deref(), Some("analyst-7"));
        assert_eq!((fields.jti.as_deref(), fields.op.as_deref()), (Some("j1"), Some("report")));
        assert_eq!((fields.verdict.as_str(), fields.reason.as_str()), ("deny", "no_rule"));
        assert_eq!(fields.src, None);
        assert_eq!(fields.message(), "analyst-7: deny connect tcp to 203.0.113.7:443 (no_rule)");
    }

    #[test]
    fn inbound_ipv6_and_unattributed_decisions_read_too() {
        let inbound = fields(&body(
            r#"{"action":"accept","agent":"alpha","cgroup_id":12,"comm":"","dport":7000,"dst":null,"jti":null,"op":null,"pid":0,"proto":"tcp","reason":"no_rule","rule":null,"src":"10.79.0.1","ts":"x","uid":61184,"verdict":"deny"}"#,
        ))
        .unwrap();
        assert_eq!(inbound.message(), "alpha: deny accept tcp from 10.79.0.1 to port 7000 (no_rule)");
        let v6 = fields(&body(
            r#"{"action":"sendmsg","agent":null,"cgroup_id":12,"comm":"dig","dport":53,"dst":"2001:db8::1","jti":null,"op":null,"pid":9,"proto":"udp","reason":"rule","rule":"scope:dns#0","ts":"x","uid":0,"verdict":"allow"}"#,
        ))
        .unwrap();
        assert_eq!(v6.message(), "(no agent): allow sendmsg udp to [2001:db8::1]:53 (rule)");
    }

    #[test]
    fn a_body_that_is_no_decision_is_logged_as_it_is() {
        assert_eq!(
            fields(&body(r#"{"event":"daemon_started"}"#)),
            Err(r#"{"event":"daemon_started"}"#.to_owned())
        );
    }
}
