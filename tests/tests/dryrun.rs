//! Dry-run (audit) mode with real agents: an agent bound with `mode = "audit"` reaches what its
//! rules deny, each time with a `would_deny` record, while an enforced agent with the same token
//! is refused; what is never dry-run (the kill switch, a missing or expired token, sockets
//! nothing can judge, port 0, inbound traffic, a risk pause) holds for it all the same; a
//! catalogue entry in audit mode lets through what its denies cover only where an allow grants
//! it, beside an enforced entry whose deny still refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{ffi::OsStr, fs};

use serde_json::Value;
use ztseg_integration::{At, Daemon, Netns, Proc, Site, TempDir, claims, probe, run_agent, spawn_agent};

/// 10.80.0.1 serves the `work` scope's port 8001 (and, unlisted, 8002; an echo on 8003);
/// 10.80.0.9:22 is what a `--forbid shell` token denies by name. 10.80.0.5 is granted whole by
/// `wide`; of it, `legacy` (an audit entry) denies port 2222 and `ssh` (enforced) port 22.
/// `legacy` also denies 10.80.0.6:2222, which nothing allows. 10.80.0.2 may send to an agent's
/// UDP port 7000; 10.80.0.10 is where an agent listens.
const CATALOGUE: &str = r#"
[scopes."work"]
allow = [{ to = "10.80.0.1/32", ports = [8001] }]
inbound = [{ from = "10.80.0.2/32", ports = [7000], proto = "udp" }]

[tools.shell]
allow = [{ to = "10.80.0.9/32", ports = [22], proto = "tcp" }]

[scopes."wide"]
allow = [{ to = "10.80.0.5/32", proto = "tcp" }]

[tools.legacy]
mode = "audit"
allow = [{ to = "10.80.0.5/32", ports = [2222], proto = "tcp" }, { to = "10.80.0.6/32", ports = [2222], proto = "tcp" }]

[tools.ssh]
allow = [{ to = "10.80.0.5/32", ports = [22], proto = "tcp" }]
"#;

const ADDRESSES: [&str; 7] = [
    "10.80.0.1/32",
    "10.80.0.2/32",
    "10.80.0.5/32",
    "10.80.0.6/32",
    "10.80.0.7/32",
    "10.80.0.9/32",
    "10.80.0.10/32",
];

struct World {
    daemon: Daemon,
    ns: Netns,
    _servers: Proc,
    _echo: Proc,
    _dir: TempDir,
    _site: Site,
}

fn world() -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-dryrun");
    let ns = Netns::new(&ADDRESSES);
    let servers = ztseg_integration::serve(
        &ns,
        &[
            "10.80.0.1:8001",
            "10.80.0.1:8002",
            "10.80.0.9:22",
            "10.80.0.5:22",
            "10.80.0.5:2222",
            "10.80.0.5:8001",
            "10.80.0.6:2222",
        ],
    );
    let echo = ztseg_integration::echo(&ns, "10.80.0.1:8003");
    let daemon = Daemon::start_with(&site, &dir.path, "allow_audit_mode = true");
    daemon.write_policy("catalogue.toml", CATALOGUE);
    World { daemon, ns, _servers: servers, _echo: echo, _dir: dir, _site: site }
}

impl World {
    /// Binds `agent` to a new token with `grant` (token issue options), `mode` in its binding
    /// when given, and waits for the grant; returns the token.
    fn bind(&self, agent: &str, grant: &[&str], mode: Option<&str>) -> String {
        let token = self.daemon.issue(agent, grant);
        let jti = claims(&token)["jti"].as_str().unwrap().to_owned();
        fs::write(self.daemon.policy_dir.join(format!("{agent}.jwt")), &token).unwrap();
        self.write_binding(agent, mode);
        self.daemon
            .wait_event("the grant", move |r| r["event"] == "token_granted" && r["jti"] == jti.as_str());
        token
    }

    fn write_binding(&self, agent: &str, mode: Option<&str>) {
        let mode = mode.map_or_else(String::new, |m| format!("mode = {m:?}\n"));
        self.daemon.write_policy(
            &format!("{agent}.toml"),
            &format!("[agent]\nid = {agent:?}\ntoken_file = \"{agent}.jwt\"\n{mode}"),
        );
    }

    fn inside(&self, agent: &str, ops: &[&str]) -> Vec<String> {
        let (code, out, err) = run_agent(&self.daemon, &self.ns, agent, None, ops);
        assert_eq!(code, 0, "ztseg run failed: {err}");
        out
    }

    fn outside(&self, ops: &[&str]) -> Vec<String> {
        probe(At { netns: &self.ns, cgroup: None }, ops)
    }

    fn row(&self, agent: &str) -> Value {
        let agents: Value = serde_json::from_str(&self.daemon.agents()).unwrap();
        agents.as_array().unwrap().iter().find(|a| a["agent"] == agent).unwrap().clone()
    }

    /// The first record of `agent`'s decision on `dst:dport` with `verdict` and `reason`.
    fn record(&self, agent: &str, action: &str, dst: &str, dport: u16, verdict: &str, reason: &str) -> Value {
        let (agent, action, dst, verdict, reason) =
            (agent.to_owned(), action.to_owned(), dst.to_owned(), verdict.to_owned(), reason.to_owned());
        let what = format!("{agent}'s {verdict} ({reason}) of {action} {dst}:{dport}");
        self.daemon.wait_event(&what, move |r| {
            r["agent"] == agent.as_str()
                && r["action"] == action.as_str()
                && r["dst"] == dst.as_str()
                && r["dport"] == dport
                && r["verdict"] == verdict.as_str()
                && r["reason"] == reason.as_str()
        })
    }
}

#[test]
fn an_agent_in_audit_mode_reaches_what_its_rules_deny_with_a_would_deny_record_and_what_is_never_dry_run_holds()
 {
    let w = world();
    w.bind("dry", &["--scope", "work", "--forbid", "shell"], Some("audit"));
    w.bind("strict", &["--scope", "work", "--forbid", "shell"], None);
    let ops = ["tcp:10.80.0.1:8001", "tcp:10.80.0.1:8002", "tcp:10.80.0.9:22", "udp-ask:10.80.0.1:8003"];
    // Positive control: outside any agent every destination answers.
    assert_eq!(w.outside(&ops), ["ok", "ok", "ok", "ok"]);

    // The enforced agent: only its grant (the control for everything let through below).
    assert_eq!(w.inside("strict", &ops), ["ok", "EPERM", "EPERM", "EPERM"]);
    w.record("strict", "connect", "10.80.0.1", 8002, "deny", "no_rule");
    let forbidden = w.record("strict", "connect", "10.80.0.9", 22, "deny", "forbidden");
    assert_eq!(forbidden["rule"], "forbidden:tool:shell#0", "{forbidden}");

    // The same token in audit mode: real connections to what its rules deny, an unlisted
    // destination and a forbidden tool's, and an unconnected UDP exchange whose reply comes in.
    assert_eq!(w.inside("dry", &ops), ["ok", "ok", "ok", "ok"]);
    let allowed = w.record("dry", "connect", "10.80.0.1", 8001, "allow", "rule");
    assert_eq!(allowed["rule"], "scope:work#0", "{allowed}");
    let unlisted = w.record("dry", "connect", "10.80.0.1", 8002, "would_deny", "no_rule");
    assert!(unlisted["rule"].is_null() && unlisted["jti"].is_string(), "{unlisted}");
    let shell = w.record("dry", "connect", "10.80.0.9", 22, "would_deny", "forbidden");
    assert_eq!(shell["rule"], "forbidden:tool:shell#0", "{shell}");
    w.record("dry", "sendmsg", "10.80.0.1", 8003, "would_deny", "no_rule");

    // `ztseg agents` says which is which.
    assert_eq!(
        (w.row("dry")["mode"].as_str(), w.row("strict")["mode"].as_str()),
        (Some("audit"), Some("enforce"))
    );
    let dry = w.row("dry");
    assert_eq!(dry["denied"], 0, "a would-be denial is no denial: {dry}");
    let (code, table, err) = w.daemon.ztseg(&["agents"]);
    assert_eq!(code, 0, "{err}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[2], "MODE", "{table}");
    let line = |id: &str| {
        table.lines().find(|l| l.starts_with(id)).unwrap().split_whitespace().nth(2).unwrap().to_owned()
    };
    assert_eq!((line("dry"), line("strict")), ("audit".to_owned(), "enforce".to_owned()), "{table}");

    // Never dry-run: sockets nothing can judge, and a UDP socket connected to port 0 (which no
    // rule can name); refused for the audit agent as for any, with their own reasons.
    assert_eq!(w.outside(&["udplite4", "udp-connect-only:10.80.0.1:0"]), ["ok", "ok"]);
    assert_eq!(w.inside("dry", &["udplite4", "udp-connect-only:10.80.0.1:0"]), ["EPERM", "EPERM"]);
    w.daemon.wait_event("the refused socket", |r| {
        r["agent"] == "dry" && r["action"] == "socket" && r["verdict"] == "deny" && r["reason"] == "protocol"
    });

    // Never dry-run: inbound traffic. Of two datagrams to the audit agent's port 7000, the
    // ungranted sender's is dropped (with a deny record) and the granted one's comes in.
    let cmd = [w.daemon.probe.as_os_str(), OsStr::new("listen"), OsStr::new("10.80.0.10:7000")];
    let mut listening = spawn_agent(&w.daemon, &w.ns, "dry", &cmd, &[]);
    assert_eq!(listening.line(), "ready");
    assert_eq!(
        w.outside(&["udp-from:10.80.0.1:10.80.0.10:7000", "udp-from:10.80.0.2:10.80.0.10:7000"]),
        ["ok", "ok"]
    );
    assert_eq!(listening.line(), "udp 10.80.0.2");
    let dropped = w.daemon.wait_event("the refused datagram", |r| {
        r["agent"] == "dry" && r["action"] == "receive" && r["src"] == "10.80.0.1"
    });
    assert_eq!(
        (dropped["verdict"].as_str(), dropped["reason"].as_str()),
        (Some("deny"), Some("no_rule")),
        "{dropped}"
    );
    drop(listening);

    // Never dry-run: the kill switch refuses even what audit mode lets through, and its own
    // grant; revived, the agent is dry-run again.
    let (code, _, err) = w.daemon.ztseg(&["kill", "dry"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.inside("dry", &["tcp:10.80.0.1:8001", "tcp:10.80.0.1:8002"]), ["EPERM", "EPERM"]);
    w.record("dry", "connect", "10.80.0.1", 8002, "deny", "killed");
    let (code, _, err) = w.daemon.ztseg(&["revive", "dry"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.inside("dry", &["tcp:10.80.0.1:8002"]), ["ok"]);

    // The binding back in enforce mode (the same token, no new grant): enforced at once.
    w.write_binding("dry", None);
    let switched =
        w.daemon.wait_event("the switch to enforce", |r| r["event"] == "mode" && r["mode"] == "enforce");
    assert_eq!(
        (switched["agent"].as_str(), switched["was"].as_str()),
        (Some("dry"), Some("audit")),
        "{switched}"
    );
    assert_eq!(w.inside("dry", &["tcp:10.80.0.1:8001", "tcp:10.80.0.1:8002"]), ["ok", "EPERM"]);
    w.record("dry", "connect", "10.80.0.1", 8002, "deny", "no_rule");
    assert_eq!(w.row("dry")["mode"], "enforce");

    // Never dry-run: a token's expiry. An agent in audit mode whose token has expired reaches
    // nothing, not its grant nor what it would dry-run.
    w.bind("brief", &["--scope", "work", "--ttl", "3"], Some("audit"));
    assert_eq!(w.row("brief")["mode"], "audit");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.row("brief")["state"] != "expired" {
        assert!(std::time::Instant::now() < deadline, "the token never expired");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(w.inside("brief", &["tcp:10.80.0.1:8001", "tcp:10.80.0.1:8002"]), ["EPERM", "EPERM"]);
    w.record("brief", "connect", "10.80.0.1", 8002, "deny", "expired");
}

#[test]
fn a_catalogue_entry_in_audit_mode_lets_its_denials_through_where_an_allow_grants_them_while_an_enforced_entry_denies()
 {
    let w = world();
    // An enforced agent: only the entry decides.
    w.bind("rollout", &["--scope", "wide", "--forbid", "legacy", "--forbid", "ssh"], None);
    let ops = ["tcp:10.80.0.5:8001", "tcp:10.80.0.5:2222", "tcp:10.80.0.5:22", "tcp:10.80.0.6:2222"];
    assert_eq!(w.outside(&ops), ["ok", "ok", "ok", "ok"]);
    assert_eq!(w.inside("rollout", &ops), ["ok", "ok", "EPERM", "EPERM"]);
    let granted = w.record("rollout", "connect", "10.80.0.5", 8001, "allow", "rule");
    assert_eq!(granted["rule"], "scope:wide#0", "{granted}");
    // The audit entry's deny: recorded as it would have denied, let through (`wide` grants it).
    let would = w.record("rollout", "connect", "10.80.0.5", 2222, "would_deny", "forbidden");
    assert_eq!(would["rule"], "forbidden:tool:legacy#0", "{would}");
    // The enforced entry's deny, beside it in the same allow: refused.
    let denied = w.record("rollout", "connect", "10.80.0.5", 22, "deny", "forbidden");
    assert_eq!(denied["rule"], "forbidden:tool:ssh#0", "{denied}");
    // Where no allow grants it, an audit deny admits nothing: the agent's default deny stands.
    w.record("rollout", "connect", "10.80.0.6", 2222, "deny", "no_rule");
    assert_eq!(w.row("rollout")["mode"], "enforce");

    // The entry switched to enforce: its deny refuses, after the recompile.
    w.daemon.write_policy("catalogue.toml", &CATALOGUE.replace("mode = \"audit\"\n", ""));
    w.daemon.wait_event("the recompiled grant", |r| {
        r["event"] == "token_granted" && r["agent"] == "rollout" && r["source"] == "restore"
    });
    assert_eq!(w.inside("rollout", &["tcp:10.80.0.5:8001", "tcp:10.80.0.5:2222"]), ["ok", "EPERM"]);
    let enforced = w.record("rollout", "connect", "10.80.0.5", 2222, "deny", "forbidden");
    assert_eq!(enforced["rule"], "forbidden:tool:legacy#0", "{enforced}");
}

fn risk_records(log: &std::path::Path) -> Vec<serde_json::Map<String, Value>> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "risk")
        .map(|r| {
            let mut r = r.as_object().unwrap().clone();
            for chain in ["seq", "prev", "hash"] {
                r.remove(chain);
            }
            r
        })
        .collect()
}

#[test]
fn an_agent_in_audit_mode_that_scans_is_scored_as_denied_and_its_pause_is_enforced() {
    let w = world();
    w.bind("dry", &["--scope", "work"], Some("audit"));
    w.bind("steady", &["--scope", "work"], Some("audit"));
    // A port scan of 10.80.0.7, where nothing listens: let through (refused by the host itself,
    // not by ztseg) until the risk engine, counting each would-be denial as the denial it would
    // have been, pauses the agent; from then on it is refused.
    let scan: Vec<String> = (1..=120).map(|port| format!("tcp:10.80.0.7:{port}")).collect();
    let scan: Vec<&str> = scan.iter().map(String::as_str).collect();
    let outcomes = w.inside("dry", &scan);
    assert_eq!(outcomes[0], "ECONNREFUSED", "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o == "ECONNREFUSED" || o == "EPERM"), "{outcomes:?}");
    let pause = w
        .daemon
        .wait_event("the pause", |r| r["event"] == "risk" && r["agent"] == "dry" && r["action"] == "pause");
    let classes: Vec<&str> =
        pause["contributors"].as_array().unwrap().iter().map(|c| c["class"].as_str().unwrap()).collect();
    assert!(classes.contains(&"scan") && classes.contains(&"denied"), "{pause}");
    w.daemon.wait_event("the pause carried out", |r| r["event"] == "paused" && r["agent"] == "dry");
    assert_eq!(
        (w.row("dry")["state"].as_str(), w.row("dry")["mode"].as_str()),
        (Some("paused"), Some("audit"))
    );

    // Paused, audit mode or not: what it would dry-run is refused with the reason it would have
    // had (still scored), and its own grant as paused.
    assert_eq!(w.inside("dry", &["tcp:10.80.0.1:8002", "tcp:10.80.0.1:8001"]), ["EPERM", "EPERM"]);
    w.record("dry", "connect", "10.80.0.1", 8002, "deny", "no_rule");
    w.record("dry", "connect", "10.80.0.1", 8001, "deny", "paused");
    // Its neighbour in audit mode is neither paused nor refused (the control).
    assert_eq!(w.inside("steady", &["tcp:10.80.0.1:8002", "tcp:10.80.0.1:8001"]), ["ok", "ok"]);
    assert_eq!(w.row("steady")["state"], "active");

    // Replay equals live: the audit log, replayed through a fresh engine, gives the very risk
    // records the daemon wrote from would-be denials.
    let last = w.record("steady", "connect", "10.80.0.1", 8001, "allow", "rule");
    w.daemon.wait_durable(last["seq"].as_u64().unwrap());
    let logged = risk_records(&w.daemon.audit_log);
    let (_, changes) =
        ztseg::risk::replay::replay_file(ztseg::risk::Params::default(), &w.daemon.audit_log).unwrap();
    let replayed: Vec<_> = changes.iter().map(ztseg::risk::Change::to_record).collect();
    assert!(logged.len() >= 2, "{logged:#?}");
    assert_eq!(replayed, logged);
}
