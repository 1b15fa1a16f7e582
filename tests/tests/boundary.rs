//! The network boundary is whole: the kill switch and a token's expiry cut established traffic in
//! both directions (the cgroup_skb programs read the agent's entry on every packet), the daemon
//! closes the agent's sockets, and no packet leaves with a destination other than the one the
//! socket hooks judged.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{ffi::OsStr, fs, process::Command};

use serde_json::Value;
use ztseg_integration::{
    At, Daemon, Netns, Proc, Site, TempDir, after_second, probe, run_agent, spawn_agent,
};

const CATALOGUE: &str = r#"
[scopes."stream"]
allow = [{ to = "10.77.0.1/32", ports = [8003], proto = "tcp" }, { to = "10.77.0.1/32", ports = [8003], proto = "udp" }]
"#;

/// Echoes stamped after the kernel let them through can be stamped a little later: the receiving
/// thread may be scheduled late. No byte may arrive later than this after the cut.
const STAMP_SLACK_NS: u64 = 100_000_000;

struct World {
    daemon: Daemon,
    ns: Netns,
    echo: Proc,
    _dir: TempDir,
    _site: Site,
}

fn world(ttl: &str) -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-boundary");
    let ns = Netns::new(&["10.77.0.1/32"]);
    let echo = ztseg_integration::echo(&ns, "10.77.0.1:8003");
    let daemon = Daemon::start(&site, &dir.path);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("alpha", &["--scope", "stream", "--ttl", ttl]);
    World { daemon, ns, echo, _dir: dir, _site: site }
}

fn boot_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Starts the streaming agent and returns once bytes came back over TCP and UDP (the echo server
/// also sends of its own accord, so what reaches the agent does not hang on what it sends: each
/// direction is observed on its own). The positive control for everything after.
fn streaming_agent(w: &World) -> Proc {
    let cmd = [w.daemon.probe.as_os_str(), OsStr::new("stream"), OsStr::new("10.77.0.1:8003")];
    let mut agent = spawn_agent(&w.daemon, &w.ns, "alpha", &cmd, &[]);
    until_flowing(&mut agent);
    agent
}

/// The boot-time stamps of the lines starting with `prefix`.
fn stamps(lines: &[String], prefix: &str) -> Vec<u64> {
    lines.iter().filter_map(|l| l.strip_prefix(prefix)).map(|t| t.parse().unwrap()).collect()
}

/// No echo reached the agent (`tcp`/`udp` stamps) and no byte of it reached the server (`rx`
/// stamps) later than `cut` plus the stamping slack.
fn assert_no_bytes_after(agent_lines: &[String], server_lines: &[String], cut: u64, what: &str) {
    let late = |stamps: Vec<u64>| stamps.into_iter().filter(|&t| t > cut + STAMP_SLACK_NS).count();
    let (tcp_in, udp_in) = (late(stamps(agent_lines, "tcp ")), late(stamps(agent_lines, "udp ")));
    let out = late(stamps(server_lines, "rx "));
    assert!(
        tcp_in + udp_in + out == 0,
        "chunks after {what}: {tcp_in} TCP and {udp_in} UDP into the agent, {out} out of it"
    );
}

#[test]
fn kill_cuts_established_tcp_and_udp_both_ways_and_closes_the_sockets() {
    let w = world("300");
    let agent = streaming_agent(&w);
    let (code, out, err) = w.daemon.ztseg(&["kill", "alpha"]);
    let killed_at = boot_ns();
    assert_eq!(code, 0, "{err}");
    // Absence cannot be awaited: watch for a while in which, uncut, some 50 echoes and 50 pushes
    // from the server would arrive, and as many bytes reach the server.
    std::thread::sleep(std::time::Duration::from_nanos(5 * STAMP_SLACK_NS));
    let agent_lines = agent.finish();
    let server_lines = w.echo.finish();
    // No echo reached the agent, and nothing of the agent reached the server, after the kill.
    assert_no_bytes_after(&agent_lines, &server_lines, killed_at, "kill");
    // The sockets were closed: the TCP connection ended with an abort, not a hang.
    // (The reader or the writer sees the abort, the other then sees the end or a broken pipe.)
    assert!(agent_lines.iter().any(|l| l == "tcp-closed ECONNABORTED"), "{agent_lines:?}\n{out}");
    let record = w.daemon.wait_event("the kill record", |r| r["event"] == "kill");
    assert!(record["sockets_closed"].as_u64().unwrap_or(0) >= 2, "{record}");
    assert!(out.contains("socket(s) closed"), "{out}");
}

/// Waits for `proc` to say it connected and for 3 chunks back over TCP and UDP each.
fn until_flowing(proc: &mut Proc) {
    assert_eq!(proc.line(), "connected");
    let (mut tcp, mut udp) = (0, 0);
    while tcp < 3 || udp < 3 {
        let line = proc.line();
        if line.starts_with("tcp ") {
            tcp += 1;
        } else if line.starts_with("udp ") {
            udp += 1;
        } else {
            panic!("unexpected line before the cut: {line}");
        }
    }
}

#[test]
fn kill_closes_a_socket_another_agent_made_and_handed_over() {
    // Two compromised agents that can reach each other (a Unix socket both can open): beta makes
    // TCP and UDP sockets and hands them to alpha (SCM_RIGHTS), which connects them under its own
    // rules. They stay in beta's cgroup: found by cgroup, they would outlive alpha's kill, and
    // their packets are judged by beta's (live) state.
    let w = world("300");
    w.daemon.bind_new("beta", &["--scope", "stream", "--ttl", "300"]);
    let (alpha, beta) = (w._site.root.join("alpha"), w._site.root.join("beta"));
    let mut command = Command::new(ztseg_integration::probe_bin());
    command.arg("--netns").arg(w.ns.path()).arg("--cgroup").arg(&beta);
    command.arg("stream-moved").arg(&alpha).arg("10.77.0.1:8003");
    let mut handed = Proc::spawn(command);
    until_flowing(&mut handed);
    // The control: beta's own connections, which alpha's kill must leave alone.
    let cmd = [w.daemon.probe.as_os_str(), OsStr::new("stream"), OsStr::new("10.77.0.1:8003")];
    let mut neighbour = spawn_agent(&w.daemon, &w.ns, "beta", &cmd, &[]);
    until_flowing(&mut neighbour);

    let (code, out, err) = w.daemon.ztseg(&["kill", "alpha"]);
    let killed_at = boot_ns();
    assert_eq!(code, 0, "{err}");
    // Absence cannot be awaited: watch for a while in which, uncut, some 50 echoes would arrive.
    std::thread::sleep(std::time::Duration::from_nanos(5 * STAMP_SLACK_NS));
    let handed_lines = handed.finish();
    let neighbour_lines = neighbour.finish();
    let late = |lines: &[String], prefix: &str| {
        stamps(lines, prefix).into_iter().filter(|&t| t > killed_at + STAMP_SLACK_NS).count()
    };
    assert_eq!(
        (late(&handed_lines, "tcp "), late(&handed_lines, "udp ")),
        (0, 0),
        "chunks reached alpha's handed-over sockets after its kill: {handed_lines:?}"
    );
    assert!(handed_lines.iter().any(|l| l == "tcp-closed ECONNABORTED"), "{handed_lines:?}\n{out}");
    let record = w.daemon.wait_event("the kill record", |r| r["event"] == "kill");
    assert!(record["sockets_closed"].as_u64().unwrap_or(0) >= 2, "{record}");
    // Beta is not killed: its own connections still carry chunks both ways.
    assert!(late(&neighbour_lines, "tcp ") > 0 && late(&neighbour_lines, "udp ") > 0, "{neighbour_lines:?}");
    assert!(!neighbour_lines.iter().any(|l| l.starts_with("tcp-closed")), "{neighbour_lines:?}");
}

#[test]
fn expiry_cuts_established_traffic_with_the_daemon_stopped_and_a_restart_keeps_it_cut() {
    let mut w = world("4");
    // The kernel's deadline for the agent, on the boot clock.
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(w._site.pin_dir.join("agents"))
        .output()
        .unwrap();
    let entries: Value = serde_json::from_slice(&dump.stdout).unwrap();
    // With BTF, bpftool's JSON carries named fields under "formatted".
    let entry = &entries[0];
    let deadline = entry["formatted"]["value"]["deadline_ns"]
        .as_u64()
        .or_else(|| entry["value"]["deadline_ns"].as_u64())
        .unwrap_or_else(|| panic!("no deadline in {entries}"));
    let agent = streaming_agent(&w);
    w.daemon.freeze(true);
    // Nothing to await but the clock: the kernel alone enforces exp. Wait past it.
    let wait = deadline.saturating_sub(boot_ns()) + 2 * STAMP_SLACK_NS;
    std::thread::sleep(std::time::Duration::from_nanos(wait));
    let agent_lines = agent.finish();
    let server_lines = w.echo.finish();
    let before = stamps(&agent_lines, "tcp ").into_iter().filter(|&t| t < deadline).count();
    assert!(before >= 3, "traffic flowed before exp: {agent_lines:?}");
    assert_no_bytes_after(&agent_lines, &server_lines, deadline, "exp");
    // A restart keeps it so: new connects are refused.
    w.daemon.freeze(false);
    w.daemon.crash();
    w.daemon.launch();
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "alpha", None, &["tcp:10.77.0.1:8003"]);
    assert_eq!((code, out), (0, vec!["EPERM".to_owned()]), "{err}");
}

#[test]
fn a_connected_udp_send_with_a_traffic_class_goes_to_its_judged_destination() {
    // ECN as QUIC stacks set it: an IP_TOS control message on a connected socket's send, which
    // makes the kernel run the sendmsg hook with no address (the connected one is used).
    let w = world("300");
    let ops =
        ["udp-connect-tos:10.77.0.1:8003", "udp-connect:10.77.0.1:8003", "udp-connect-tos:10.77.0.1:8004"];
    assert_eq!(probe(At { netns: &w.ns, cgroup: None }, &ops), ["ok", "ok", "ok"]);
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "alpha", None, &ops);
    assert_eq!(code, 0, "{err}");
    // 8004 is no destination of alpha's: refused at the connect, before any send.
    assert_eq!(out, ["ok", "ok", "EPERM"]);
}

#[test]
fn ip_options_never_leave_an_agent() {
    let w = world("300");
    let ops = ["ipopts:10.77.0.1:8003", "udp-sendto:10.77.0.1:8003"];
    // Outside any agent the options go out; inside, the datagram carrying them is dropped
    // (the option itself is accepted: it is the packet that is refused), a plain one is not.
    assert_eq!(probe(At { netns: &w.ns, cgroup: None }, &ops), ["ok", "ok"]);
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "alpha", None, &ops);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, ["EPERM", "ok"]);
}

/// Reads capture lines up to the marker (a plain UDP datagram to `marker_dst`), returning them.
fn captured_until_marker(capture: &mut Proc, marker_dst: &str) -> Vec<String> {
    let marker = format!("pkt {marker_dst} 17");
    let mut lines = Vec::new();
    loop {
        let line = capture.line();
        if line == marker {
            return lines;
        }
        lines.push(line);
    }
}

#[test]
fn a_routing_header_cannot_take_a_packet_past_the_judged_destination() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-rthdr");
    // The agent's host and a far host on a veth link: Y (fd78::1) is granted, X (fd78::2) not.
    let here = Netns::new(&[]);
    let far = Netns::new(&[]);
    let (a, b) = here.veth_to(&far, "10.78.0.10/24", "10.78.0.1/24");
    here.add_v6("fd78::10/64", &a);
    far.add_v6("fd78::1/64", &b);
    far.add_v6("fd78::2/64", &b);
    let mut capture = {
        let mut command = Command::new(ztseg_integration::probe_bin());
        command.arg("--netns").arg(far.path()).args(["capture", &b]);
        let mut capture = Proc::spawn(command);
        assert_eq!(capture.line(), "ready");
        capture
    };
    let daemon = Daemon::start(&site, &dir.path);
    daemon.write_policy(
        "catalogue.toml",
        "[scopes.\"detour\"]\nallow = [{ to = \"fd78::1/128\", ports = [9000], proto = \"udp\" }]\n",
    );
    daemon.bind_new("alpha", &["--scope", "detour"]);
    let detour = "rthdr:[fd78::1]:9000:[fd78::2]";
    let marker = "udp-sendto:[fd78::2]:9001";

    // Positive control: from outside any agent the routing header takes the datagram to X.
    assert_eq!(probe(At { netns: &here, cgroup: None }, &[detour, marker]), ["ok", "ok"]);
    let seen = captured_until_marker(&mut capture, "fd78::2");
    assert!(seen.contains(&"pkt fd78::2 43".to_owned()), "control: no routed packet reached X: {seen:?}");

    // The agent: the datagram with the routing header is refused; a plain one to Y still goes.
    let (code, out, err) = run_agent(&daemon, &here, "alpha", None, &[detour, "udp-sendto:[fd78::1]:9000"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, ["EPERM", "ok"]);
    assert_eq!(probe(At { netns: &here, cgroup: None }, &[marker]), ["ok"]);
    let seen = captured_until_marker(&mut capture, "fd78::2");
    assert!(!seen.iter().any(|l| l.starts_with("pkt fd78::2 ")), "the agent's packet reached X: {seen:?}");
    assert!(
        seen.contains(&"pkt fd78::1 17".to_owned()),
        "the agent's plain datagram to Y is missing: {seen:?}"
    );
}

/// The `iat` of a token.
fn iat_of(token: &str) -> u64 {
    ztseg_integration::claims(token)["iat"].as_u64().unwrap()
}

#[test]
fn a_revoked_token_stays_revoked_until_its_exp_restarts_included() {
    let mut w = world("300");
    // An older token of the agent, still unexpired, and a newer one applied over it.
    let older = fs::read_to_string(w.daemon.policy_dir.join("alpha.jwt")).unwrap();
    after_second(iat_of(&older));
    let token = w.daemon.issue("alpha", &["--scope", "stream"]);
    let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "alpha", &token]);
    assert_eq!(code, 0, "{err}");
    let kept = w._dir.path.join("kept.jwt");
    fs::write(&kept, &token).unwrap();
    // Deleting the binding is how an orchestrator revokes.
    fs::remove_file(w.daemon.policy_dir.join("alpha.toml")).unwrap();
    w.daemon.wait_event("the revocation", |r| r["event"] == "token_revoked" && r["agent"] == "alpha");
    let refused = |w: &World| {
        for presented in [&token, &older] {
            let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "alpha", presented]);
            assert_eq!(code, 3, "{err}");
            assert!(err.contains("revoked"), "{err}");
        }
        let (code, out, err) = run_agent(&w.daemon, &w.ns, "alpha", Some(&kept), &["tcp:10.77.0.1:8003"]);
        assert_eq!(code, 3, "{err}");
        assert!(out.is_empty() && err.contains("revoked"), "{out:?} {err}");
    };
    refused(&w);
    w.daemon.crash();
    w.daemon.launch();
    refused(&w);
    // Positive control: a token issued after the revoked one is accepted, and `ztseg token
    // revoke` revokes it the same way.
    after_second(iat_of(&token));
    let fresh = w.daemon.issue("alpha", &["--scope", "stream"]);
    let fresh_file = w._dir.path.join("fresh.jwt");
    fs::write(&fresh_file, &fresh).unwrap();
    let (code, out, err) = run_agent(&w.daemon, &w.ns, "alpha", Some(&fresh_file), &["tcp:10.77.0.1:8003"]);
    assert_eq!((code, out), (0, vec!["ok".to_owned()]), "{err}");
    let (code, out, err) = w.daemon.ztseg(&["token", "revoke", "--agent", "alpha"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked until its exp"), "{out}");
    let (code, _, err) = w.daemon.ztseg(&["token", "apply", "--agent", "alpha", &fresh]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("revoked"), "{err}");
    let (code, out, _) = run_agent(&w.daemon, &w.ns, "alpha", None, &["tcp:10.77.0.1:8003"]);
    assert_eq!((code, out), (0, vec!["EPERM".to_owned()]));
}
