//! Inbound is policed: a connection or datagram into an agent comes in only when an inbound rule
//! grants its sender and the agent's port (or it is a reply to what the agent sent), every such
//! decision is a record, and the kill switch cuts it. Kill can also freeze or end the agent's
//! processes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{ffi::OsStr, fs, process::Command, time::Duration};

use ztseg_integration::{At, Daemon, Netns, Proc, Site, TempDir, probe, run_agent, spawn_agent};

/// The agent's host (10.79.0.10) and a far host on a veth link with two addresses: 10.79.0.2 may
/// reach the agent's port 7000, 10.79.0.1 may not; the agent may ask 10.79.0.1:9100 over UDP.
const CATALOGUE: &str = r#"
[scopes."served"]
allow = [{ to = "10.79.0.1/32", ports = [9100], proto = "udp" }, { to = "10.79.0.3/32", proto = "udp" }]
inbound = [{ from = "10.79.0.2/32", ports = [7000] }]
"#;

struct World {
    daemon: Daemon,
    here: Netns,
    far: Netns,
    _dir: TempDir,
    site: Site,
}

fn world() -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-inbound");
    let here = Netns::new(&[]);
    let far = Netns::new(&[]);
    let (_, b) = here.veth_to(&far, "10.79.0.10/24", "10.79.0.1/24");
    far.add_v4("10.79.0.2/24", &b);
    let daemon = Daemon::start(&site, &dir.path);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("alpha", &["--scope", "served"]);
    World { daemon, here, far, _dir: dir, site }
}

/// A `listen` probe on `addr` in the agent `alpha` (or outside any agent), once it is ready.
fn listener(w: &World, addr: &str, in_agent: bool) -> Proc {
    let mut proc = if in_agent {
        let cmd = [w.daemon.probe.as_os_str(), OsStr::new("listen"), OsStr::new(addr)];
        spawn_agent(&w.daemon, &w.here, "alpha", &cmd, &[])
    } else {
        let mut command = Command::new(ztseg_integration::probe_bin());
        command.arg("--netns").arg(w.here.path()).args(["listen", addr]);
        Proc::spawn(command)
    };
    assert_eq!(proc.line(), "ready");
    proc
}

fn from_far(w: &World, ops: &[&str]) -> Vec<String> {
    probe(At { netns: &w.far, cgroup: None }, ops)
}

#[test]
fn inbound_is_denied_by_default_allowed_when_granted_and_cut_on_kill() {
    let w = world();
    // Positive control: outside any agent, both far addresses connect and send.
    let mut open = listener(&w, "10.79.0.10:7001", false);
    let ops = ["tcp-from:10.79.0.1:10.79.0.10:7001", "udp-from:10.79.0.1:10.79.0.10:7001"];
    assert_eq!(from_far(&w, &ops), ["ok", "ok"]);
    assert_eq!(open.line(), "accepted 10.79.0.1");
    assert_eq!(open.line(), "udp 10.79.0.1");

    // The agent: the ungranted sender gets nothing (its SYN is dropped, so the connect times
    // out), the granted one is served.
    let mut served = listener(&w, "10.79.0.10:7000", true);
    let ops = ["tcp-from:10.79.0.1:10.79.0.10:7000", "tcp-from:10.79.0.2:10.79.0.10:7000"];
    assert_eq!(from_far(&w, &ops), ["ETIMEDOUT", "ok"]);
    assert_eq!(served.line(), "accepted 10.79.0.2");
    let denied =
        w.daemon.wait_event("the refused connection", |r| r["action"] == "accept" && r["verdict"] == "deny");
    assert_eq!(
        (&denied["agent"], &denied["src"], &denied["dport"], &denied["proto"], &denied["reason"]),
        (&"alpha".into(), &"10.79.0.1".into(), &7000.into(), &"tcp".into(), &"no_rule".into()),
        "{denied}"
    );
    assert!(denied["dst"].is_null() && denied["pid"] == 0, "{denied}");
    // No task made it: the record names the owner of the socket it reached, the agent's uid.
    let (_, agents, _) = w.daemon.ztseg(&["agents", "--json"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    let alpha = agents.as_array().unwrap().iter().find(|a| a["agent"] == "alpha").unwrap();
    assert!(alpha["uid"].as_u64().is_some_and(|uid| uid > 0), "{alpha}");
    assert_eq!(denied["uid"], alpha["uid"], "{denied}");
    let allowed =
        w.daemon.wait_event("the granted connection", |r| r["action"] == "accept" && r["verdict"] == "allow");
    assert_eq!(
        (&allowed["src"], &allowed["rule"]),
        (&"10.79.0.2".into(), &"scope:served#in0".into()),
        "{allowed}"
    );

    // Datagrams: the ungranted sender's is dropped (with a record), the granted one's comes in.
    // Sent in this order on one link, the granted datagram is the next thing the agent hears.
    assert_eq!(
        from_far(&w, &["udp-from:10.79.0.1:10.79.0.10:7000", "udp-from:10.79.0.2:10.79.0.10:7000"]),
        ["ok", "ok"]
    );
    assert_eq!(served.line(), "udp 10.79.0.2");
    let dropped =
        w.daemon.wait_event("the refused datagram", |r| r["action"] == "receive" && r["verdict"] == "deny");
    assert_eq!(
        (&dropped["src"], &dropped["dport"], &dropped["proto"]),
        (&"10.79.0.1".into(), &7000.into(), &"udp".into())
    );

    // Kill: the listener is closed with the agent's other sockets, and the granted sender is
    // refused too.
    let (code, _, err) = w.daemon.ztseg(&["kill", "alpha"]);
    assert_eq!(code, 0, "{err}");
    assert!(served.line().starts_with("accept-error "), "the listener was not closed");
    let after = from_far(&w, &["tcp-from:10.79.0.2:10.79.0.10:7000"]);
    assert_ne!(after, ["ok"], "a connection reached the killed agent");
    // Not only its closed sockets: a listener the killed agent opens anew hears nothing either
    // (the SYN is dropped, so the connect times out rather than being reset), with a record.
    drop(served);
    let _reopened = listener(&w, "10.79.0.10:7000", true);
    assert_eq!(from_far(&w, &["tcp-from:10.79.0.2:10.79.0.10:7000"]), ["ETIMEDOUT"]);
    let refused = w.daemon.wait_event("the killed agent's refused connection", |r| {
        r["action"] == "accept" && r["reason"] == "killed"
    });
    assert_eq!(refused["src"], "10.79.0.2", "{refused}");
    // The control still serves: it was the agent that was cut, not the link.
    assert_eq!(from_far(&w, &["tcp-from:10.79.0.2:10.79.0.10:7001"]), ["ok"]);
    assert_eq!(open.line(), "accepted 10.79.0.2");
}

#[test]
fn a_reply_to_the_agents_own_send_comes_in_and_nothing_else_on_that_socket() {
    let w = world();
    let echo = {
        let mut command = Command::new(ztseg_integration::probe_bin());
        command.arg("--netns").arg(w.far.path()).args(["echo", "10.79.0.1:9100"]);
        let mut echo = Proc::spawn(command);
        assert_eq!(echo.line(), "ready");
        echo
    };
    // The granted destination answers, and the answer reaches the agent's unconnected socket.
    let (code, out, err) = run_agent(&w.daemon, &w.here, "alpha", None, &["udp-ask:10.79.0.1:9100"]);
    assert_eq!((code, out), (0, vec!["ok".to_owned()]), "{err}");
    // Kill: the same exchange gets no further than the send.
    let (code, _, err) = w.daemon.ztseg(&["kill", "alpha"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_agent(&w.daemon, &w.here, "alpha", None, &["udp-ask:10.79.0.1:9100"]);
    assert_eq!((code, out), (0, vec!["EPERM".to_owned()]), "{err}");
    // Positive control: outside the agent the echo still answers.
    assert_eq!(probe(At { netns: &w.here, cgroup: None }, &["udp-ask:10.79.0.1:9100"]), ["ok"]);
    drop(echo);
}

#[test]
fn icmp_errors_cannot_carry_data_into_an_agent() {
    // ICMP errors reach a socket through the kernel's error handlers, which no cgroup program
    // sees; with IP_RECVERR they would put a forged error's payload on the error queue. Inside
    // an agent the option is accepted (glibc's resolver needs the call to succeed) and stays off.
    let w = world();
    let ops = ["recverr4", "recverr6"];
    assert_eq!(probe(At { netns: &w.here, cgroup: None }, &ops), ["on", "on"]);
    let (code, out, err) = run_agent(&w.daemon, &w.here, "alpha", None, &ops);
    assert_eq!((code, out), (0, vec!["off".to_owned(), "off".to_owned()]), "{err}");
}

#[test]
fn a_udp_socket_connected_to_port_0_cannot_hear_every_port() {
    // Connected to port 0, a UDP socket takes datagrams from every port of the peer; no rule
    // can grant port 0, not even one for every port of the address.
    let w = world();
    let ops = ["udp-connect-only:10.79.0.3:0", "udp-connect-only:10.79.0.3:54"];
    assert_eq!(probe(At { netns: &w.here, cgroup: None }, &ops), ["ok", "ok"]);
    let (code, out, err) = run_agent(&w.daemon, &w.here, "alpha", None, &ops);
    assert_eq!((code, out), (0, vec!["EPERM".to_owned(), "ok".to_owned()]), "{err}");
}

/// The `key` line of the agent's cgroup.events ("frozen 0|1", "populated 0|1").
fn cgroup_event(w: &World, key: &str) -> String {
    let events = fs::read_to_string(w.site.root.join("alpha").join("cgroup.events")).unwrap();
    events.lines().find(|l| l.starts_with(key)).unwrap().to_owned()
}

#[test]
fn kill_freeze_freezes_the_agent_and_revive_thaws_it() {
    let w = world();
    let _agent = listener(&w, "10.79.0.10:7000", true);
    assert_eq!(cgroup_event(&w, "frozen"), "frozen 0");
    let (code, out, err) = w.daemon.ztseg(&["kill", "alpha", "--freeze"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("its processes are frozen"), "{out}");
    assert_eq!(cgroup_event(&w, "frozen"), "frozen 1");
    let record = w.daemon.wait_event("the kill record", |r| r["event"] == "kill");
    assert_eq!(record["frozen"], true, "{record}");
    let (code, out, err) = w.daemon.ztseg(&["revive", "alpha"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("thawed"), "{out}");
    assert_eq!(cgroup_event(&w, "frozen"), "frozen 0");
}

#[test]
fn kill_terminate_ends_every_process_of_the_agent() {
    let w = world();
    let agent = listener(&w, "10.79.0.10:7000", true);
    assert_eq!(cgroup_event(&w, "populated"), "populated 1");
    let (code, out, err) = w.daemon.ztseg(&["kill", "alpha", "--terminate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("process(es) killed"), "{out}");
    // The listener ends, killed: its output closes and it did not exit of its own accord (its
    // socket was closed first, which it may have had time to report).
    let (lines, status) = agent.end();
    assert!(lines.iter().all(|l| l.starts_with("accept-error ")), "{lines:?}");
    assert!(!status.success(), "{status}");
    // cgroup.kill is asynchronous for the last exits; the cgroup empties right after.
    let emptied = ztseg::cgroup::await_event(
        &w.site.root.join("alpha"),
        "populated 0",
        Duration::from_secs(30),
        || Ok(()),
    );
    assert!(emptied.unwrap(), "the agent's cgroup still holds processes");
}
