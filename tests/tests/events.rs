//! Kernel decision events end to end: what the kernel decides reaches the event stream and the
//! audit log with the right fields; the audit log's chain survives a SIGKILL and shows every kind
//! of tampering; and under load every decision is either written or counted as dropped.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{collections::BTreeSet, fs, io::Write as _, path::Path, process::Command};

use serde_json::Value;
use ztseg_integration::{
    Daemon, Netns, Proc, Site, TempDir, bin, loop_counts, run_agent, run_agent_loop, serve, spawn_in_netns,
};

const CATALOGUE: &str = r#"
[scopes."read:svc"]
allow = [
  { to = "10.77.0.1/32", ports = [8001] },
  { to = "fd77::1/128", ports = [8001] },
]
"#;

struct World {
    daemon: Daemon,
    ns: Netns,
    _server: Proc,
    dir: TempDir,
    _site: Site,
}

fn world() -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-events");
    let ns = Netns::new(&["10.77.0.1/32", "fd77::1/128"]);
    let server = serve(&ns, &["10.77.0.1:8001", "10.77.0.1:8002", "[fd77::1]:8001", "[fd77::1]:8002"]);
    let daemon = Daemon::start(&site, &dir.path);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("analyst", &["--op", "op-events", "--scope", "read:svc"]);
    World { daemon, ns, _server: server, dir, _site: site }
}

/// A decision that is certainly the last of a batch: a denied connect to port 9.
const MARKER: &str = "tcp:10.77.0.1:9";

fn is_marker(r: &Value) -> bool {
    r["action"] == "connect" && r["dport"] == 9
}

#[test]
fn a_known_set_of_decisions_produces_exactly_those_events() {
    let w = world();
    let from = w.daemon.next_seq();
    let ops = [
        "tcp:10.77.0.1:8001",
        "tcp:10.77.0.1:8002",
        "udp-sendto:10.77.0.1:8001",
        "udp-sendto:10.77.0.1:8002",
        "tcp:[fd77::1]:8001",
        "tcp:[fd77::1]:8002",
        "udp-sendto:[fd77::1]:8001",
        "udp-sendto:[fd77::1]:8002",
        MARKER,
    ];
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "analyst", None, &ops);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, ["ok", "EPERM", "ok", "EPERM", "ok", "EPERM", "ok", "EPERM", "EPERM"]);
    let records = w.daemon.collect_events(from, is_marker);
    let decisions: Vec<&Value> = records.iter().filter(|r| r.get("verdict").is_some()).collect();
    let got: BTreeSet<String> = decisions
        .iter()
        .map(|r| {
            format!(
                "{} {} {}:{} {} {} {}",
                r["action"].as_str().unwrap(),
                r["proto"].as_str().unwrap(),
                r["dst"].as_str().unwrap(),
                r["dport"],
                r["verdict"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
                r["rule"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let expected: BTreeSet<String> = [
        "connect tcp 10.77.0.1:8001 allow rule scope:read:svc#0",
        "connect tcp 10.77.0.1:8002 deny no_rule -",
        "sendmsg udp 10.77.0.1:8001 allow rule scope:read:svc#0",
        "sendmsg udp 10.77.0.1:8002 deny no_rule -",
        "connect tcp fd77::1:8001 allow rule scope:read:svc#1",
        "connect tcp fd77::1:8002 deny no_rule -",
        "sendmsg udp fd77::1:8001 allow rule scope:read:svc#1",
        "sendmsg udp fd77::1:8002 deny no_rule -",
        "connect tcp 10.77.0.1:9 deny no_rule -",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(got, expected);
    assert_eq!(decisions.len(), ops.len(), "one event per decision, no more: {records:#?}");
    let token = fs::read_to_string(w.daemon.policy_dir.join("analyst.jwt")).unwrap();
    let jti = token_jti(&token);
    let agents: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    let uid = agents[0]["uid"].as_u64().unwrap();
    assert!((61184..=65519).contains(&uid), "the agent's own uid: {agents}");
    for r in &decisions {
        assert_eq!(r["agent"], "analyst", "{r}");
        assert_eq!(r["op"], "op-events", "{r}");
        assert_eq!(r["jti"], jti.as_str(), "{r}");
        assert_eq!(r["uid"], uid, "{r}");
        assert_eq!(r["comm"], "agent-probe", "{r}");
        assert!(r["pid"].as_u64().unwrap() > 0 && r["cgroup_id"].as_u64().unwrap() > 0, "{r}");
        assert!(r["ts"].as_str().unwrap().ends_with('Z'), "{r}");
    }
}

fn token_jti(token: &str) -> String {
    ztseg_integration::claims(token)["jti"].as_str().unwrap().to_owned()
}

fn verify(log: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("ztseg")).args(["audit", "verify"]).arg(log).args(extra).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Copies the log with its `.pub` and `.head` into a fresh dir, changing its lines with `edit`.
fn tampered(dir: &Path, log: &Path, name: &str, edit: impl FnOnce(&mut Vec<String>)) -> std::path::PathBuf {
    let target = dir.join(name);
    fs::create_dir_all(&target).unwrap();
    let copy = target.join("audit.jsonl");
    let mut lines: Vec<String> = fs::read_to_string(log).unwrap().lines().map(str::to_owned).collect();
    edit(&mut lines);
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(&copy, text).unwrap();
    for suffix in ["pub", "head"] {
        fs::copy(
            log.with_extension(format!("jsonl.{suffix}")),
            copy.with_extension(format!("jsonl.{suffix}")),
        )
        .unwrap();
    }
    copy
}

#[test]
fn audit_verify_detects_each_kind_of_tampering_on_a_real_log() {
    let mut w = world();
    let ops: Vec<&str> =
        std::iter::repeat_n(["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"], 20).flatten().collect();
    let (code, _, err) = run_agent(&w.daemon, &w.ns, "analyst", None, &ops);
    assert_eq!(code, 0, "{err}");
    w.daemon.stop();
    let log = w.daemon.audit_log.clone();
    let lines = fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines > 40, "too short a log to tamper with: {lines} lines");
    let checkpoint = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .position(|l| l.contains("\"event\":\"checkpoint\""))
        .expect("a checkpoint in the log");
    let scratch = w.dir.path.join("tamper");
    // Positive control: the untouched copy verifies.
    let intact = tampered(&scratch, &log, "intact", |_| {});
    // Checked as an operator does: with the host key, found through the daemon's config.
    let config = w.daemon.config.to_str().unwrap().to_owned();
    let (code, err) = verify(&intact, &["--config", &config]);
    assert_eq!(code, 0, "{err}");
    let mid = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .enumerate()
        .skip(lines / 3)
        .find(|(_, l)| l.contains("\"verdict\":\"deny\""))
        .map(|(i, _)| i)
        .expect("a denied decision in the log");
    let cases: Vec<(&str, std::path::PathBuf)> = vec![
        (
            "edited",
            tampered(&scratch, &log, "edited", |l| {
                l[mid] = l[mid].replace("\"verdict\":\"deny\"", "\"verdict\":\"allow\"")
            }),
        ),
        (
            "deleted",
            tampered(&scratch, &log, "deleted", |l| {
                l.remove(mid);
            }),
        ),
        ("reordered", tampered(&scratch, &log, "reordered", |l| l.swap(mid, mid + 1))),
        (
            "inserted",
            tampered(&scratch, &log, "inserted", |l| {
                let copy = l[mid].clone();
                l.insert(mid + 1, copy);
            }),
        ),
        (
            "truncated",
            tampered(&scratch, &log, "truncated-tail", |l| {
                l.truncate(l.len() - 3);
            }),
        ),
        (
            "bad checkpoint signature",
            tampered(&scratch, &log, "badsig", |l| {
                let line = &mut l[checkpoint];
                let at = line.find("\"sig\":\"").unwrap() + 7;
                let flipped = if &line[at..=at] == "0" { "1" } else { "0" };
                line.replace_range(at..=at, flipped);
            }),
        ),
    ];
    for (kind, copy) in &cases {
        let (code, err) = verify(copy, &["--config", &config]);
        assert_eq!(code, 3, "{kind}: {err}");
        assert!(err.contains(&format!(": {kind}:")), "{kind} not named: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A torn last line (cut mid-record) is truncation too.
    let torn = tampered(&scratch, &log, "torn", |_| {});
    let text = fs::read(&torn).unwrap();
    fs::write(&torn, &text[..text.len() - 10]).unwrap();
    let (code, err) = verify(&torn, &["--config", &config]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(": truncated:"), "{err}");
    // Checked with another key, the checkpoints fail.
    let other = TempDir::new("ztseg-otherkey");
    let status = Command::new(bin("ztseg"))
        .args(["token", "keygen", "--out"])
        .arg(other.path.join("k"))
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let other_key = other.path.join("k/ed25519.pub.pem");
    let (code, err) = verify(&intact, &["--key", other_key.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("bad checkpoint signature"), "{err}");
    let (code, err) = verify(&intact, &["--key", log.with_extension("jsonl.pub").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_sigkilled_daemon_continues_the_chain() {
    let mut w = world();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002", MARKER];
    for _ in 0..2 {
        let from = w.daemon.next_seq();
        assert_eq!(run_agent(&w.daemon, &w.ns, "analyst", None, &ops).0, 0);
        let records = w.daemon.collect_events(from, is_marker);
        // Records reach the stream before the disk; SIGKILL once the marker is durable (the
        // signed head, rewritten at each flush, says how far the file is synced).
        w.daemon.wait_durable(records.last().unwrap()["seq"].as_u64().unwrap());
        w.daemon.crash();
        w.daemon.launch();
    }
    w.daemon.stop();
    let (code, err) = verify(&w.daemon.audit_log, &["--config", w.daemon.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(&w.daemon.audit_log).unwrap();
    assert_eq!(text.matches("\"event\":\"daemon_started\"").count(), 3);
    // Both runs' decisions are in the one chain.
    assert_eq!(text.matches("\"dport\":9,").count(), 2);
}

/// Copies the live log with its `.pub` and `.head` into `dir/name` as they are.
fn copied(dir: &Path, log: &Path, name: &str) -> std::path::PathBuf {
    tampered(dir, log, name, |_| {})
}

fn assert_refused(log: &Path, args: &[&str], kind: &str) {
    let (code, err) = verify(log, args);
    assert_eq!(code, 3, "{kind}: {err}");
    assert!(err.contains(&format!(": {kind}:")), "{kind} not named: {err}");
}

#[test]
fn audit_verify_refuses_forgeries_without_the_host_key() {
    use ztseg::audit::forge;
    let mut w = world();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002", MARKER];
    let from = w.daemon.next_seq();
    assert_eq!(run_agent(&w.daemon, &w.ns, "analyst", None, &ops).0, 0);
    let records = w.daemon.collect_events(from, is_marker);
    w.daemon.wait_durable(records.last().unwrap()["seq"].as_u64().unwrap());
    // Killed, not stopped: the log ends in records after its last checkpoint, vouched for by
    // the head alone.
    w.daemon.crash();
    let log = w.daemon.audit_log.clone();
    let config = w.daemon.config.to_str().unwrap().to_owned();
    let trusted = ["--config", config.as_str()];
    let scratch = w.dir.path.join("forge");
    let genuine = copied(&scratch, &log, "genuine");
    let (code, err) = verify(&genuine, &trusted);
    assert_eq!(code, 0, "the genuine log verifies: {err}");
    let lines = fs::read_to_string(&log).unwrap().lines().count();
    let mid = lines / 2;

    // 1. Records removed, checkpoints and head re-signed with the attacker's key, `.pub` replaced.
    let resigned = copied(&scratch, &log, "resigned");
    forge::Forger::new().unwrap().remove_and_resign(&resigned, &[mid]).unwrap();
    assert_refused(&resigned, &trusted, "bad checkpoint signature");
    // The `.pub` beside the log is never trusted: without a key there is no check at all.
    let empty_state = w.dir.path.join("no-key");
    fs::create_dir_all(&empty_state).unwrap();
    let keyless = w.dir.path.join("keyless.toml");
    fs::write(&keyless, format!("state_dir = {empty_state:?}\n")).unwrap();
    let (code, err) = verify(&resigned, &["--config", keyless.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no trusted key"), "{err}");

    // 2. Records removed, `.pub` and `.head` deleted.
    let headless = copied(&scratch, &log, "headless");
    forge::remove_lines(&headless, &[lines - 1], None).unwrap();
    forge::delete_pub_and_head(&headless).unwrap();
    assert_refused(&headless, &trusted, "head missing");
    let (code, err) = verify(&headless, &["--no-signatures"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(": head missing:"), "{err}");

    // 3. With the real host key: every record after the last checkpoint rewritten, head deleted.
    let rewritten = copied(&scratch, &log, "rewritten");
    assert!(forge::rewrite_tail(&rewritten).unwrap() > 0, "the crashed log ends unsigned");
    assert_refused(&rewritten, &trusted, "edited");
    fs::remove_file(ztseg::audit::head_path(&rewritten)).unwrap();
    assert_refused(&rewritten, &trusted, "head missing");

    // 4. The whole log replaced by a made-up chain without checkpoints.
    let fabricated = copied(&scratch, &log, "fabricated");
    forge::fabricate(&fabricated, 5).unwrap();
    fs::remove_file(ztseg::audit::head_path(&fabricated)).unwrap();
    assert_refused(&fabricated, &trusted, "head missing");
    assert_refused(&fabricated, &["--config", &config, "--allow-missing-head"], "unsigned tail");

    // 5. An older (log, head) pair put back behind an anchor.
    let older = forge::Snapshot::take(&log).unwrap();
    w.daemon.launch();
    let from = w.daemon.next_seq();
    assert_eq!(run_agent(&w.daemon, &w.ns, "analyst", None, &ops).0, 0);
    w.daemon.collect_events(from, is_marker);
    w.daemon.stop();
    let anchor_file = w.dir.path.join("anchors.jsonl");
    let out = Command::new(bin("ztseg"))
        .args(["audit", "anchor"])
        .arg(&log)
        .args(["--config", &config, "--out"])
        .arg(&anchor_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let anchor: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(anchor["file"], "audit.jsonl");
    let anchored = ["--config", config.as_str(), "--anchor", anchor_file.to_str().unwrap()];
    let (code, err) = verify(&log, &anchored);
    assert_eq!(code, 0, "the current log holds its anchor: {err}");
    older.put_back(&log).unwrap();
    let (code, err) = verify(&log, &trusted);
    assert_eq!(code, 0, "alone, the older pair verifies: {err}");
    assert_refused(&log, &anchored, "rolled back");
}

/// `ztseg run -- ztseg-probe gated-repeat N OPS...`: returns once the agent is confined and
/// waiting for the go.
fn gated_agent(w: &World, rounds: u64, ops: &[&str]) -> Proc {
    let rounds = rounds.to_string();
    let mut args =
        vec!["run", "--agent", "analyst", "--", w.daemon.probe.to_str().unwrap(), "gated-repeat", &rounds];
    args.extend(ops);
    let mut agent = spawn_in_netns(&w.ns, &w.daemon, &args);
    assert_eq!(agent.line(), "ready");
    agent
}

/// The kernel's and the daemon's counters of `agent`: (emitted, summarised, dropped,
/// refused_unrecorded, written).
fn counters_of(daemon: &Daemon, agent: &str) -> [u64; 5] {
    let agents: Value = serde_json::from_str(&daemon.agents()).unwrap();
    let a = agents.as_array().unwrap().iter().find(|a| a["agent"] == agent).unwrap();
    ["events_emitted", "summarised", "events_dropped", "refused_unrecorded", "events_written"]
        .map(|k| a[k].as_u64().unwrap())
}

/// Decisions `records` stand for: a summary's `count`, or 1.
fn decisions_in(records: &[&Value]) -> u64 {
    records.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum()
}

/// An allowed connect none of the bursts makes.
const ALLOWED_MARKER: &str = "tcp:[fd77::1]:8001";

/// The records of the live audit log with `seq >= from`.
fn logged_since(log: &Path, from: u64) -> Vec<Value> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["seq"].as_u64().unwrap() >= from)
        .collect()
}

#[test]
fn a_burst_past_the_record_budget_is_summarised_with_exact_counts_and_nothing_is_refused() {
    let mut w = world();
    let from = w.daemon.next_seq();
    // 100,000 decisions while the daemon is frozen (nothing drains the ring, which holds about
    // 47,000): past 2048 records per CPU a second, the agent's decisions are counted in
    // summaries, so the ring never fills and no allow is refused.
    let rounds = 50_000;
    let mut agent = gated_agent(&w, rounds, &["tcp-rst:10.77.0.1:8001", "tcp:10.77.0.1:8002"]);
    w.daemon.freeze(true);
    writeln!(agent.stdin(), "go").unwrap();
    let outcome = agent.line();
    w.daemon.freeze(false);
    drop(agent);
    assert_eq!(outcome, format!("EPERM={rounds} ok={rounds}"), "only the denials are refused");
    // The stop drains the summaries: everything is in the log after it.
    let [emitted, summarised, dropped, unrecorded, _] = counters_of(&w.daemon, "analyst");
    w.daemon.stop();
    eprintln!("{emitted} records to the ring, {summarised} decisions summarised");
    assert!(summarised > 0 && emitted < 2 * rounds, "nothing was summarised");
    assert_eq!((dropped, unrecorded), (0, 0));
    let records = logged_since(&w.daemon.audit_log, from);
    let of = |verdict: &str, port: u64| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["action"] == "connect" && r["verdict"] == verdict && r["dport"] == port)
            .collect()
    };
    let allowed = of("allow", 8001);
    // Allows are summarised by destination: every record names 10.77.0.1:8001.
    assert!(allowed.iter().all(|r| r["dst"] == "10.77.0.1"));
    assert_eq!(decisions_in(&allowed), rounds, "allowed connects without a record");
    assert!(allowed.iter().any(|r| r["count"].as_u64().is_some_and(|c| c > 1)), "no summary record");
    // Denials are summarised by reason (destination null); each counts.
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "connect" && r["verdict"] == "deny" && r["reason"] == "no_rule")
        .collect();
    assert_eq!(decisions_in(&denied), rounds, "denied connects without a record");
    let summaries: Vec<&&Value> = denied.iter().filter(|r| r["count"].is_u64()).collect();
    assert!(summaries.iter().all(|r| r["dst"].is_null() && r["dport"] == 0 && r["last_ts"].is_string()));
    // The kernel's counters reconcile with the log exactly.
    let all: Vec<&Value> =
        records.iter().filter(|r| r["agent"] == "analyst" && r["action"].is_string()).collect();
    assert_eq!(decisions_in(&all), emitted + summarised);
}

/// Floods from `agent`: loops of allowed and denied UDP sends and TCP connects.
fn flood(w: &World, agent: &str) -> Vec<Proc> {
    [
        &["udp-sendto:10.77.0.1:8001", "udp-sendto:10.77.0.1:9"][..],
        &["tcp-rst:10.77.0.1:8001", "tcp:10.77.0.1:8002"][..],
        &["udp-sendto:10.77.0.1:8001"][..],
    ]
    .iter()
    .map(|ops| run_agent_loop(&w.daemon, &w.ns, agent, ops))
    .collect()
}

#[test]
fn a_flooding_agent_does_not_cost_anyone_a_record_and_the_counts_reconcile() {
    let mut w = world();
    w.daemon.bind_new("second", &["--op", "op-second", "--scope", "read:svc"]);
    let from = w.daemon.next_seq();
    let flooders = flood(&w, "analyst");
    // While the flood runs: a marker process in the flooding agent and a second agent each
    // make allowed connects of their own.
    let marker = run_agent_loop(&w.daemon, &w.ns, "analyst", &[ALLOWED_MARKER]);
    let second = run_agent_loop(&w.daemon, &w.ns, "second", &["tcp-rst:10.77.0.1:8001"]);
    // Ten seconds of flood, counted by the kernel (no sleep: the decisions are the clock).
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let seq = w.daemon.next_seq() + 1_000;
        w.daemon.wait_event("more of the flood", move |r| r["seq"].as_u64().is_some_and(|s| s >= seq));
    }
    let marker = loop_counts(&marker.finish())[ALLOWED_MARKER];
    let second = loop_counts(&second.finish())["tcp-rst:10.77.0.1:8001"];
    let mut flooded = 0;
    for f in flooders {
        flooded += loop_counts(&f.finish()).values().map(|(ok, eperm, _)| ok + eperm).sum::<u64>();
    }
    let analyst = counters_of(&w.daemon, "analyst");
    let second_counts = counters_of(&w.daemon, "second");
    w.daemon.stop();
    eprintln!(
        "flood: {flooded} decisions; analyst {analyst:?}, marker {marker:?}; second {second_counts:?}, {second:?}"
    );
    // No allow refused: neither the marker's nor the second agent's.
    assert_eq!((marker.1, marker.2, second.1, second.2), (0, 0, 0, 0));
    assert!(marker.0 > 0 && second.0 > 0);
    let records = logged_since(&w.daemon.audit_log, from);
    let allowed_to = |agent: &str, dst: &str| -> u64 {
        let of: Vec<&Value> = records
            .iter()
            .filter(|r| {
                r["agent"] == agent && r["verdict"] == "allow" && r["dst"] == dst && r["dport"] == 8001
            })
            .filter(|r| r["action"] == "connect")
            .collect();
        decisions_in(&of)
    };
    // Every allowed connect, by count and destination (the loop's last one may be made and
    // recorded as it is stopped, before it is counted).
    let logged = allowed_to("analyst", "fd77::1");
    assert!(logged == marker.0 || logged == marker.0 + 1, "marker: {} connects, {logged} recorded", marker.0);
    let logged = allowed_to("second", "10.77.0.1");
    assert!(
        logged == second.0 || logged == second.0 + 1,
        "second agent: {} connects, {logged} recorded",
        second.0
    );
    // Per agent, the log holds exactly what the kernel counted as recorded.
    for (agent, [emitted, summarised, dropped, unrecorded, _]) in
        [("analyst", analyst), ("second", second_counts)]
    {
        let of: Vec<&Value> =
            records.iter().filter(|r| r["agent"] == agent && r["action"].is_string()).collect();
        assert_eq!(decisions_in(&of), emitted - dropped - unrecorded + summarised, "{agent}");
        assert_eq!(unrecorded, 0, "{agent}: allows refused for want of a record");
    }
}

#[test]
fn sigkilled_twenty_times_under_a_connect_loop_the_daemon_loses_no_allowed_decision() {
    let mut w = world();
    let agent = run_agent_loop(&w.daemon, &w.ns, "analyst", &["tcp-rst:10.77.0.1:8001"]);
    for kill in 0..20 {
        // Mid-stream, at a different point each time: this start has written some of the loop's
        // decisions (its backlog and new ones) and is reading more when it is killed.
        let seq = w.daemon.next_seq() + 40 * kill;
        w.daemon.wait_event("a decision of the loop", move |r| {
            r["seq"].as_u64().is_some_and(|s| s >= seq) && r["action"] == "connect" && r["dport"] == 8001
        });
        w.daemon.crash();
        w.daemon.launch();
    }
    let counts = loop_counts(&agent.finish());
    // Refused (EPERM) only for want of a record: while the daemon restarts the loop fills the
    // ring, and an allow that cannot be recorded is refused.
    let (allowed, _refused, other) = counts["tcp-rst:10.77.0.1:8001"];
    assert_eq!(other, 0);
    assert!(allowed > 0);
    // The marker comes after everything the loop made: once it is read, so is the loop.
    let (code, out, _) = run_agent(&w.daemon, &w.ns, "analyst", None, &[ALLOWED_MARKER]);
    assert_eq!((code, out), (0, vec!["ok".to_owned()]));
    w.daemon.wait_event("the marker", |r| r["action"] == "connect" && r["dst"] == "fd77::1");
    w.daemon.stop();
    let log = fs::read_to_string(&w.daemon.audit_log).unwrap();
    let (records, repeats) = loop_records(&log);
    // A kill between writing a batch and handing its ring space back (or deleting its
    // summaries) repeats that batch at the next start. Nothing is lost: each allowed connect
    // has its record (the loop's last connect may have been made and recorded as it was
    // stopped, before it could count it).
    eprintln!("{allowed} allowed connects; {records} recorded, {repeats} of them repeats");
    let distinct = records - repeats;
    assert!(distinct == allowed || distinct == allowed + 1, "{allowed} allowed connects, {distinct} records");
    // No daemon record is lost either: every start's is in the log.
    let starts = log.lines().filter(|l| l.contains(r#""event":"daemon_started""#)).count();
    assert_eq!(starts, 21);
    let (code, err) = verify(&w.daemon.audit_log, &["--config", w.daemon.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

/// The loop's allowed connects in `log` (a summary counting `count`), and how many of them
/// repeat a record an earlier start wrote: a repeat comes after a later `daemon_started` and has
/// the same pid and a (first) time at most 2 µs apart (each start converts the kernel's
/// boot-clock times anew); the loop's own connects are tens of µs apart.
fn loop_records(log: &str) -> (u64, u64) {
    let mut earlier: BTreeSet<(u64, i64)> = BTreeSet::new();
    let mut this_start: Vec<(u64, i64)> = Vec::new();
    let (mut records, mut repeats) = (0, 0);
    for line in log.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        if r["event"] == "daemon_started" {
            earlier.extend(this_start.drain(..));
            continue;
        }
        if !(r["action"] == "connect" && r["dport"] == 8001 && r["verdict"] == "allow") {
            continue;
        }
        let key = (r["pid"].as_u64().unwrap(), micros(r["ts"].as_str().unwrap()));
        let decisions = r["count"].as_u64().unwrap_or(1);
        records += decisions;
        if (-2..=2).any(|d| earlier.contains(&(key.0, key.1 + d))) {
            repeats += decisions;
        }
        this_start.push(key);
    }
    (records, repeats)
}

/// Microseconds since the start of the month of an RFC 3339 UTC time with 6 fractional digits
/// (enough to compare times of one test run).
fn micros(ts: &str) -> i64 {
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let day: i64 = date.rsplit('-').next().unwrap().parse().unwrap();
    let mut hms = time.split(':');
    let (h, m, s): (i64, i64, f64) = (
        hms.next().unwrap().parse().unwrap(),
        hms.next().unwrap().parse().unwrap(),
        hms.next().unwrap().parse().unwrap(),
    );
    ((day * 24 + h) * 60 + m) * 60_000_000 + (s * 1e6).round() as i64
}

/// A tmpfs of `size` mounted at `path`, detached when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0750").as_str()),
        )
        .unwrap();
        Self(path.to_owned())
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        st.blocks_available() * st.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Polls `what` (a daemon's status or counters, which no event announces) until it holds.
fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !holds() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn status(daemon: &Daemon) -> Value {
    let (code, out, err) = daemon.ztseg(&["status"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_full_audit_disk_loses_no_record_across_a_crash_and_recovers() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-events-full");
    let ns = Netns::new(&["10.77.0.1/32", "fd77::1/128"]);
    let _server = serve(&ns, &["10.77.0.1:8001", "[fd77::1]:8001"]);
    // The log on a filesystem of its own that the test fills (big enough, once emptied, for
    // what the daemon holds meanwhile and the ring's backlog).
    let disk = Tmpfs::mount(&dir.path.join("audit"), "64m");
    let mut daemon = Daemon::start_with(&site, &dir.path, "audit.reserve_mib = 0");
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("analyst", &["--op", "op-events", "--scope", "read:svc"]);
    assert!(status(&daemon)["audit_unwritable"].is_null());
    // Leave 16 KiB: the loop's records fill it within a few hundred connects.
    let filler = dir.path.join("audit/filler");
    let room = disk.free_bytes();
    fs::write(&filler, vec![0u8; (room - (16 << 10)) as usize]).unwrap();
    let agent = run_agent_loop(&daemon, &ns, "analyst", &["tcp-rst:10.77.0.1:8001"]);
    eventually("the daemon to say the log cannot be written", || {
        !status(&daemon)["audit_unwritable"].is_null()
    });
    let said = status(&daemon)["audit_unwritable"].clone();
    assert!(said["reason"].as_str().unwrap().contains("No space left"), "{said}");
    // The records wait in the ring, then in the kernel's summaries, counted; the loop goes on.
    let [emitted, summarised, ..] = counters_of(&daemon, "analyst");
    eventually("the loop to go on past a full ring", || {
        let [e, s, ..] = counters_of(&daemon, "analyst");
        e + s > emitted + summarised + 60_000
    });
    // A crash meanwhile loses nothing: what the daemon held in memory is still in the ring.
    daemon.crash();
    daemon.launch();
    eventually("the new daemon to find the log unwritable", || {
        !status(&daemon)["audit_unwritable"].is_null()
    });
    // Room again: what was held is written, in one chain, and the log says it was unwritable.
    fs::remove_file(&filler).unwrap();
    daemon.wait_event("the log's recovery", |r| r["event"] == "audit_resumed");
    assert!(status(&daemon)["audit_unwritable"].is_null());
    let counts = loop_counts(&agent.finish());
    let (allowed, refused, other) = counts["tcp-rst:10.77.0.1:8001"];
    assert_eq!((refused, other), (0, 0), "an allow refused");
    let (code, out, _) = run_agent(&daemon, &ns, "analyst", None, &[ALLOWED_MARKER]);
    assert_eq!((code, out), (0, vec!["ok".to_owned()]));
    daemon.wait_event("the marker", |r| r["action"] == "connect" && r["dst"] == "fd77::1");
    daemon.stop();
    let log = fs::read_to_string(&daemon.audit_log).unwrap();
    let (records, repeats) = loop_records(&log);
    eprintln!("{allowed} allowed connects, {refused} refused; {records} records ({repeats} repeats)");
    // Every allowed connect of the loop has its record (and the marker's, of another pid). The
    // crash may repeat what the killed daemon had partly written before the disk filled.
    let distinct = records - repeats;
    assert!(
        distinct == allowed + 1 || distinct == allowed + 2,
        "{allowed} allowed connects, {distinct} records"
    );
    let resumed: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "audit_resumed")
        .collect();
    assert_eq!(resumed.len(), 1);
    assert!(resumed[0]["reason"].as_str().unwrap().contains("No space left"));
    let (code, err) = verify(&daemon.audit_log, &["--config", daemon.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    drop(daemon);
    drop(disk);
}

#[test]
fn retention_keeps_the_configured_size_and_the_chain_still_verifies() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-events-retention");
    let ns = Netns::new(&["10.77.0.1/32"]);
    let _server = serve(&ns, &["10.77.0.1:8001"]);
    let mut daemon = Daemon::start_with(
        &site,
        &dir.path,
        "audit.rotate_mib = 1\naudit.keep_mib = 2\naudit.reserve_mib = 0",
    );
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("analyst", &["--op", "op-events", "--scope", "read:svc"]);
    let rotated = |daemon: &Daemon| ztseg::audit::resolve_files(&daemon.audit_log).unwrap().len() - 1;
    let agent = run_agent_loop(&daemon, &ns, "analyst", &["tcp-rst:10.77.0.1:8001"]);
    // About 2,500 records a MiB: wait for five rotations.
    let mut seen = 0;
    while rotated(&daemon) < 5 {
        let seq = daemon.next_seq() + 2_500;
        daemon.wait_event("more of the loop's records", move |r| r["seq"].as_u64().is_some_and(|s| s >= seq));
        seen += 1;
        assert!(seen < 100, "the log did not rotate");
    }
    drop(agent.finish());
    // Retention runs at start (and every 10 s): a restart applies it now.
    daemon.stop();
    daemon.launch();
    daemon.stop();
    let files = ztseg::audit::resolve_files(&daemon.audit_log).unwrap();
    let kept: u64 = files[..files.len() - 1].iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert!(kept <= 2 << 20, "{kept} bytes of rotated files kept");
    assert!(files.len() >= 2, "{files:?}");
    let first: Value =
        serde_json::from_str(fs::read_to_string(&files[0]).unwrap().lines().next().unwrap()).unwrap();
    assert!(first["seq"].as_u64().unwrap() > 0, "the oldest files are gone");
    let log = files.iter().map(|f| fs::read_to_string(f).unwrap()).collect::<String>();
    assert!(log.lines().any(|l| l.contains(r#""event":"pruned""#) && l.contains(r#""reason":"size""#)));
    let (code, err) = verify(&daemon.audit_log, &["--config", daemon.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Positive control: the oldest kept file deleted by hand no longer verifies.
    fs::remove_file(&files[0]).unwrap();
    let (code, err) = verify(&daemon.audit_log, &["--config", daemon.config.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("not by the daemon's retention"), "{err}");
}
