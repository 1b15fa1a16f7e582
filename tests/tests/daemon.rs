//! The daemon end to end: a real `ztseg daemon` process, real policy files and tokens, agents
//! started with `ztseg run` inside network namespaces these tests create, the real kernel.
//!
//! Each denial is paired with a positive control (the same connect from outside the agents'
//! root succeeds), and every wait follows the daemon's event stream instead of sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::fs;

use serde_json::Value;
use ztseg_integration::{
    At, Daemon, Netns, Site, TempDir, claims, loop_counts, probe, run_agent, run_agent_loop, serve,
};

/// The catalogue of these tests: scope `read:db` reaches 10.77.0.1:8001; tool `net` reaches every
/// port of 10.77.0.0/24; tool `shell` means 10.77.0.2:8001.
const CATALOGUE: &str = r#"
[scopes."read:db"]
allow = [{ to = "10.77.0.1/32", ports = [8001], proto = "tcp" }]

[scopes."read:db2"]
allow = [{ to = "10.77.0.1/32", ports = [8002], proto = "tcp" }]

[tools.net]
allow = [{ to = "10.77.0.0/24", proto = "tcp" }]

[tools.shell]
allow = [{ to = "10.77.0.2/32", ports = [8001], proto = "tcp" }]
"#;

struct World {
    // Drop order: daemon before the site (uninstall) and the namespace.
    daemon: Daemon,
    ns: Netns,
    _server: ztseg_integration::Proc,
    _dir: TempDir,
    _site: Site,
}

fn world() -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-daemon");
    let ns = Netns::new(&["10.77.0.1/32", "10.77.0.2/32"]);
    let server = serve(&ns, &["10.77.0.1:8001", "10.77.0.1:8002", "10.77.0.2:8001", "10.77.0.2:8002"]);
    let daemon = Daemon::start(&site, &dir.path);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    World { daemon, ns, _server: server, _dir: dir, _site: site }
}

impl World {
    fn run(&self, agent: &str, ops: &[&str]) -> Vec<String> {
        let (code, out, err) = run_agent(&self.daemon, &self.ns, agent, None, ops);
        assert_eq!(code, 0, "ztseg run failed: {err}");
        out
    }

    fn outside(&self, ops: &[&str]) -> Vec<String> {
        probe(At { netns: &self.ns, cgroup: None }, ops)
    }
}

#[test]
fn a_scope_reaches_its_service_and_nothing_else() {
    let w = world();
    let token = w.daemon.issue("analyst", &["--op", "op-1", "--scope", "read:db"]);
    w.daemon.bind("analyst", &token);
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002", "tcp:10.77.0.2:8001", "udp-sendto:10.77.0.1:8001"];
    assert_eq!(w.run("analyst", &ops), ["ok", "EPERM", "EPERM", "EPERM"]);
    assert_eq!(w.outside(&ops), ["ok"; 4]);
}

#[test]
fn a_forbidden_tool_beats_an_allow() {
    let w = world();
    let token = w.daemon.issue("analyst", &["--tool", "net", "--forbid", "shell"]);
    w.daemon.bind("analyst", &token);
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8002", "tcp:10.77.0.2:8001"];
    assert_eq!(w.run("analyst", &ops), ["ok", "ok", "EPERM"]);
    assert_eq!(w.outside(&ops), ["ok"; 3]);
}

#[test]
fn a_short_token_stops_at_exp_even_with_the_daemon_stopped() {
    let mut w = world();
    let token = w.daemon.issue("analyst", &["--scope", "read:db", "--ttl", "3"]);
    let exp_ns = claims(&token)["exp"].as_u64().unwrap() * 1_000_000_000;
    w.daemon.bind("analyst", &token);
    // The agent starts while the daemon runs; then the daemon dies and the agent keeps going.
    let mut agent = run_agent_proc(&w, "analyst", &["until-denied", "tcp:10.77.0.1:8001"]);
    assert_eq!(agent.line(), "first ok");
    w.daemon.crash();
    let fields: Vec<String> = agent.line().split_whitespace().map(str::to_owned).collect();
    assert_eq!(fields[4], "last-ok-started-unix", "{fields:?}");
    let (last_ok, denied) = (fields[5].parse::<u64>().unwrap(), fields[7].parse::<u64>().unwrap());
    // Wall and boot clocks are converted once at grant time; allow 20 ms for that and for
    // clock adjustments in between.
    let slack = 20_000_000;
    assert!(last_ok < exp_ns + slack, "allowed {} ms after exp", (last_ok - exp_ns) / 1_000_000);
    assert!(denied + slack >= exp_ns, "denied {} ms before exp", (exp_ns - denied) / 1_000_000);
    assert_eq!(w.outside(&["tcp:10.77.0.1:8001"]), ["ok"]);
}

/// `ztseg run --agent AGENT -- ztseg-probe ARGS...` in the world's namespace, as a process.
fn run_agent_proc(w: &World, agent: &str, args: &[&str]) -> ztseg_integration::Proc {
    ztseg_integration::spawn_in_netns(
        &w.ns,
        &w.daemon,
        &[&["run", "--agent", agent, "--"][..], &[w.daemon.probe.to_str().unwrap()], args].concat(),
    )
}

#[test]
fn a_refreshed_token_keeps_a_connect_loop_going_without_a_refusal() {
    let w = world();
    let first = w.daemon.issue("analyst", &["--op", "op-1", "--scope", "read:db"]);
    w.daemon.bind("analyst", &first);
    let looping = run_agent_loop(&w.daemon, &w.ns, "analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"]);
    // Refresh by replacing the binding's token file...
    let second = w.daemon.issue("analyst", &["--op", "op-1", "--scope", "read:db", "--scope", "read:db2"]);
    w.daemon.bind("analyst", &second);
    // ...and by `ztseg token apply`.
    let third = w.daemon.issue("analyst", &["--op", "op-2", "--scope", "read:db"]);
    let (code, out, err) = w.daemon.ztseg(&["token", "apply", "--agent", "analyst", &third]);
    assert_eq!(code, 0, "token apply: {err}");
    assert!(out.contains(claims(&third)["jti"].as_str().unwrap()), "{out}");
    let counts = loop_counts(&looping.finish());
    let allowed = counts["tcp:10.77.0.1:8001"];
    assert!(allowed.0 > 0);
    assert_eq!(allowed.1 + allowed.2, 0, "refusals across the refresh: {counts:?}");
    assert_eq!(counts["tcp:10.77.0.2:8001"].0, 0, "{counts:?}");
    let agents: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    assert_eq!(agents[0]["jti"], claims(&third)["jti"]);
    assert_eq!(agents[0]["op"], "op-2");
}

/// An unsigned token (`alg: none`).
fn unsigned(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})), b64(claims))
}

/// Signs arbitrary claims with the test issuer's Ed25519 key and kid, as a compromised or buggy
/// orchestrator could.
fn signed(daemon: &Daemon, claims: &Value) -> String {
    let jwks: Value =
        serde_json::from_slice(&fs::read(daemon.key.with_file_name("jwks.json")).unwrap()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = jwks["keys"][0]["kid"].as_str().map(str::to_owned);
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&fs::read(&daemon.key).unwrap()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// An HS256 token whose HMAC secret is the issuer's public key: the algorithm-confusion attack.
fn hs256_with_public_key(daemon: &Daemon, claims: &Value) -> String {
    let public = fs::read(daemon.key.with_file_name("ed25519.pub.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_secret(&public).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key).unwrap()
}

#[test]
fn each_bad_token_is_refused_with_its_reason_and_rights_stay() {
    let w = world();
    let good = w.daemon.issue("analyst", &["--scope", "read:db"]);
    w.daemon.bind("analyst", &good);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Valid claims asking for more than the good token; each case breaks one thing.
    let valid = serde_json::json!({
        "iss": w.daemon.issuer, "aud": "ztseg", "sub": "analyst", "jti": "fresh-1",
        "iat": now, "nbf": now, "exp": now + 60, "scope": ["read:db", "read:db2"],
    });
    let with = |key: &str, value: Value| {
        let mut c = valid.clone();
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = valid.clone();
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let other_keys = TempDir::new("ztseg-otherkey");
    let status = std::process::Command::new(ztseg_integration::bin("ztseg"))
        .args(["token", "keygen", "--out"])
        .arg(other_keys.path.join("k"))
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let foreign = {
        let key = other_keys.path.join("k/ed25519.pem");
        let (code, out, err) = w.daemon.ztseg(&[
            "token",
            "issue",
            "--key",
            key.to_str().unwrap(),
            "--iss",
            &w.daemon.issuer,
            "--agent",
            "analyst",
            "--scope",
            "read:db2",
        ]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_owned()
    };
    let tampered = {
        use base64::Engine as _;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut c = claims(&good);
        c["scope"] = serde_json::json!(["read:db", "read:db2"]);
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
        parts.join(".")
    };
    let cases: Vec<(&str, String)> = vec![
        ("alg_none", unsigned(&valid)),
        ("alg_not_pinned", hs256_with_public_key(&w.daemon, &valid)),
        ("unknown_kid", foreign),
        ("bad_signature", tampered),
        ("unknown_issuer", signed(&w.daemon, &with("iss", "someone-else".into()))),
        ("wrong_audience", signed(&w.daemon, &with("aud", "other".into()))),
        ("expired", signed(&w.daemon, &with("exp", (now - 10).into()))),
        ("not_yet_valid", signed(&w.daemon, &with("nbf", (now + 600).into()))),
        ("issued_in_future", signed(&w.daemon, &with("iat", (now + 600).into()))),
        ("missing_claim", signed(&w.daemon, &without("exp"))),
        ("missing_claim", signed(&w.daemon, &without("jti"))),
        ("lifetime_too_long", signed(&w.daemon, &with("exp", (now + 7200).into()))),
        ("wrong_agent", signed(&w.daemon, &with("sub", "someone".into()))),
        ("subject_mismatch", signed(&w.daemon, &with("agent_id", "someone".into()))),
        ("wildcard_scope", signed(&w.daemon, &with("scope", "read:*".into()))),
        ("policy", signed(&w.daemon, &with("scope", serde_json::json!(["read:unknown"])))),
        ("replay", signed(&w.daemon, &with("jti", claims(&good)["jti"].clone()))),
    ];
    let mut after = 0;
    for (code, token) in &cases {
        let (exit, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "analyst", token]);
        assert_eq!(exit, 3, "{code}: exit {exit}, {err}");
        assert_eq!(err.trim().lines().count(), 1, "{code}: not one sentence: {err:?}");
        // The refusal is in the audit trail, after the previous case's.
        let refused = w.daemon.wait_event(code, {
            let code = code.to_string();
            move |r| {
                r["event"] == "token_refused" && r["code"] == code.as_str() && r["seq"].as_u64() > Some(after)
            }
        });
        assert_eq!(refused["agent"], "analyst");
        after = refused["seq"].as_u64().unwrap();
    }
    // Through all of this the agent kept exactly the good token's rights.
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"]), ["ok", "EPERM"]);
    let agents: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    assert_eq!(agents[0]["jti"], claims(&good)["jti"]);
    // The positive control: the same claims, correctly signed, are accepted.
    let (exit, _, err) =
        w.daemon.ztseg(&["token", "apply", "--agent", "analyst", &signed(&w.daemon, &valid)]);
    assert_eq!(exit, 0, "{err}");
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"]), ["ok", "ok"]);
}

#[test]
fn the_same_token_again_is_idempotent_and_an_older_one_cannot_roll_back() {
    let w = world();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims_at = |jti: &str, iat: u64, scopes: &[&str]| {
        serde_json::json!({
            "iss": w.daemon.issuer, "aud": "ztseg", "sub": "analyst", "jti": jti,
            "iat": iat, "exp": now + 600, "scope": scopes,
        })
    };
    // An older, broader token first, then a newer, narrower one.
    let broad = signed(&w.daemon, &claims_at("broad", now - 100, &["read:db", "read:db2"]));
    let narrow = signed(&w.daemon, &claims_at("narrow", now, &["read:db"]));
    w.daemon.bind("analyst", &broad);
    let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "analyst", &narrow]);
    assert_eq!(code, 0, "{err}");
    // The same token again changes nothing (a restart or a re-read binding presents it again).
    let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "analyst", &narrow]);
    assert_eq!(code, 0, "{err}");
    // Re-presenting the older, broader token would roll rights back: refused.
    let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "analyst", &broad]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("older"), "{err}");
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"]), ["ok", "EPERM"]);
}

#[test]
fn a_broken_policy_file_is_refused_and_the_running_policy_stays() {
    let w = world();
    let token = w.daemon.issue("analyst", &["--scope", "read:db"]);
    w.daemon.bind("analyst", &token);
    w.daemon.write_policy("broken.toml", "[scopes.\"read:db\"\nallow = [");
    let refused = w.daemon.wait_event("the refusal", |r| {
        r["event"] == "policy_refused" && r["reason"].as_str().is_some_and(|s| s.contains("broken.toml"))
    });
    assert!(refused["reason"].as_str().unwrap().contains("broken.toml:"), "{refused}");
    // An invalid but well-formed file (host bits set) is refused too, naming its line.
    w.daemon.write_policy("bad.toml", "[tools.x]\nallow = [{ to = \"10.77.0.1/24\" }]\n");
    let refused = w.daemon.wait_event("the refusal", |r| {
        r["event"] == "policy_refused" && r["reason"].as_str().is_some_and(|s| s.contains("bad.toml:2"))
    });
    assert!(refused["reason"].as_str().unwrap().contains("host bits"), "{refused}");
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"]), ["ok", "EPERM"]);
}

#[test]
fn sigkill_and_restart_keep_enforcement_in_force_throughout() {
    let mut w = world();
    let token = w.daemon.issue("analyst", &["--scope", "read:db"]);
    w.daemon.bind("analyst", &token);
    let looping = run_agent_loop(&w.daemon, &w.ns, "analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"]);
    w.daemon.crash();
    w.daemon.launch();
    let agents: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    assert_eq!(agents[0]["jti"], claims(&token)["jti"], "{agents}");
    w.daemon.crash();
    w.daemon.launch();
    let counts = loop_counts(&looping.finish());
    let (allowed, denied) = (counts["tcp:10.77.0.1:8001"], counts["tcp:10.77.0.2:8001"]);
    assert!(allowed.0 > 0);
    assert_eq!(allowed.1 + allowed.2, 0, "refused across restarts: {counts:?}");
    assert_eq!(denied.0, 0, "allowed across restarts: {counts:?}");
}

#[test]
fn kill_refuses_the_next_connect_survives_a_restart_and_revive_restores() {
    let mut w = world();
    let token = w.daemon.issue("analyst", &["--scope", "read:db"]);
    w.daemon.bind("analyst", &token);
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001"]), ["ok"]);
    let (code, _, err) = w.daemon.ztseg(&["kill", "analyst"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001"]), ["EPERM"]);
    w.daemon.crash();
    w.daemon.launch();
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001"]), ["EPERM"]);
    let agents: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    assert_eq!(agents[0]["state"], "killed");
    let (code, _, err) = w.daemon.ztseg(&["revive", "analyst"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.run("analyst", &["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"]), ["ok", "EPERM"]);
    assert_eq!(w.outside(&["tcp:10.77.0.1:8001"]), ["ok"]);
}

#[test]
fn run_never_starts_the_command_unconfined() {
    let w = world();
    // No daemon at that socket: the command does not start.
    let marker = w._dir.path.join("started");
    let out = std::process::Command::new(ztseg_integration::bin("ztseg"))
        .args(["run", "--agent", "analyst", "--socket"])
        .arg(w._dir.path.join("nothing.sock"))
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the ztseg daemon"));
    assert!(!marker.exists());
    // A token the daemon refuses: the command does not start either.
    let bad = w._dir.path.join("bad.jwt");
    fs::write(&bad, w.daemon.issue("someone-else", &["--scope", "read:db"])).unwrap();
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "analyst", Some(&bad), &["tcp:10.77.0.1:8001"]);
    assert_eq!(code, 3, "{err}");
    assert!(out.is_empty(), "the command ran: {out:?}");
    // The agent runs as its own uid (from agent_uids), not as root, and sits in its own cgroup.
    let mut id = ztseg_integration::spawn_in_netns(
        &w.ns,
        &w.daemon,
        &["run", "--agent", "analyst", "--", "sh", "-c", "id -u; cat /proc/self/cgroup"],
    );
    let uid: Value = serde_json::from_str(&w.daemon.agents()).unwrap();
    assert_eq!(id.line(), uid[0]["uid"].to_string());
    let cgroups = id.finish();
    let unified = cgroups.iter().find(|l| l.starts_with("0::")).unwrap();
    assert!(unified.ends_with(".slice/analyst"), "{cgroups:?}");
}

#[test]
fn the_control_socket_refuses_strangers() {
    let w = world();
    // Open the socket's mode so the kernel lets a stranger connect; the peer check must refuse.
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&w.daemon.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let out = {
        use std::os::unix::process::CommandExt as _;
        std::process::Command::new(&w.daemon.ztseg_for_others)
            .args(["kill", "analyst", "--socket"])
            .arg(&w.daemon.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not use the ztseg control socket"));
    // Root may.
    let (code, _, err) = w.daemon.ztseg(&["agents"]);
    assert_eq!(code, 0, "{err}");
}

/// `ztseg daemon --config CONFIG`: (exit code, stderr).
fn start_daemon(config: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(ztseg_integration::bin("ztseg"))
        .args(["daemon", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn start_errors_exit_with_their_own_codes_and_leave_a_running_daemon_alone() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-start-codes");
    let daemon = Daemon::start(&site, &dir.path);
    // A second daemon on the same pins: 11, and the first goes on serving.
    let (code, err) = start_daemon(&daemon.config);
    assert_eq!(code, 11, "{err}");
    assert!(err.contains("another ztseg process holds pin dir"), "{err}");
    let (code, _, err) = daemon.ztseg(&["status"]);
    assert_eq!(code, 0, "the running daemon stopped answering: {err}");
    // Pins on a directory that is no BPF filesystem: 13.
    let elsewhere = dir.path.join("not-bpffs.toml");
    let text = fs::read_to_string(&daemon.config).unwrap();
    let pins = format!("pin_dir = {:?}", site.pin_dir);
    assert!(text.contains(&pins), "{text}");
    let moved = text.replace(&pins, &format!("pin_dir = {:?}", dir.path.join("pins")));
    fs::write(&elsewhere, moved).unwrap();
    let (code, err) = start_daemon(&elsewhere);
    assert_eq!(code, 13, "{err}");
    assert!(err.contains("is not on a BPF filesystem"), "{err}");
}

/// (scheduling policy, real-time priority) of each of the daemon's threads, by thread name.
fn thread_policies(pid: u32) -> Vec<(String, u32, u32)> {
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let path = task.path();
        let (Ok(comm), Ok(stat)) =
            (fs::read_to_string(path.join("comm")), fs::read_to_string(path.join("stat")))
        else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, rt_priority 40, policy 41.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        threads.push((comm.trim().to_owned(), fields[38].parse().unwrap(), fields[37].parse().unwrap()));
    }
    threads
}

#[test]
fn the_control_socket_is_served_at_real_time_priority_and_nothing_else_is() {
    let w = world();
    // A request answered: the control thread is up and serving.
    let (code, _, stderr) = w.daemon.ztseg(&["status"]);
    assert_eq!(code, 0, "{stderr}");
    let threads = thread_policies(w.daemon.pid());
    const SCHED_FIFO: u32 = 1;
    let control: Vec<_> = threads.iter().filter(|(name, _, _)| name == "ztseg-control").collect();
    assert_eq!(control.len(), 1, "{threads:?}");
    assert_eq!((control[0].1, control[0].2), (SCHED_FIFO, 10), "{threads:?}");
    // Positive control: the record threads and the async workers stay on the normal policy.
    for name in ["ztseg-events", "ztseg-audit"] {
        let thread =
            threads.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no {name}: {threads:?}"));
        assert_eq!(thread.1, 0, "{name} is not on SCHED_OTHER: {threads:?}");
    }
    assert_eq!(threads.iter().filter(|(_, policy, _)| *policy != 0).count(), 1, "{threads:?}");
}
