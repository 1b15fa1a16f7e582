//! `cargo xtask demo`: the seed scenario, end to end, on this machine's kernel.
//!
//! A daemon on a private config with the repo's `policies/`, an orchestrator key, and agent
//! `analyst-7` running operation `report-2026-q1` against small services on a test host in a
//! network namespace the demo creates. It shows what was allowed, what was denied and why (from
//! the kernel's own decision events), pulls the kill switch, lets the token expire, verifies the
//! audit log, and cleans up everything it made.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::programs;

const AGENT: &str = "analyst-7";
const ISSUER: &str = "moltbot-orchestrator";
const TTL_SECONDS: u64 = 20;

/// The services of the demo's test host, and what the agent tries.
const SERVICES: [(&str, &str); 7] = [
    ("10.0.5.12:5432", "sales database (scope read:data.sales_q1_2026)"),
    ("10.0.6.20:443", "report store (scope write:report.draft.2026q1)"),
    ("10.0.53.53:53", "DNS resolver (its port 53: to ztseg's DNS proxy)"),
    ("203.0.113.10:443", "a web site (tool http, forbidden)"),
    ("10.0.7.22:22", "an internal host's ssh (tool bash, forbidden)"),
    ("10.0.5.13:5432", "another database (not granted)"),
    ("10.0.5.12:22", "the sales database's ssh (not granted)"),
];

const ATTEMPTS: [(&str, &str); 8] = [
    ("tcp:10.0.5.12:5432", "read the sales data"),
    ("tcp:10.0.6.20:443", "upload the report draft"),
    ("udp-sendto:10.0.53.53:53", "resolve a name"),
    ("tcp:203.0.113.10:443", "fetch a web page"),
    ("tcp:10.0.7.22:22", "ssh into an internal host"),
    ("tcp:10.0.5.13:5432", "read another database"),
    ("tcp:10.0.5.12:22", "ssh into the database host"),
    ("udplite4", "open a UDP-Lite socket"),
];

struct Cleanup {
    netns: Vec<String>,
    daemon: Option<Child>,
    servers: Vec<Child>,
    dir: PathBuf,
    ztseg: PathBuf,
    config: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            stop_daemon(daemon);
        }
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new(&self.ztseg).args(["uninstall", "--config"]).arg(&self.config).output();
        for ns in &self.netns {
            let _ = Command::new(programs::IP).args(["netns", "del", ns]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new(programs::IP).args(args).status().context("cannot run ip")?;
    if !status.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

fn ztseg(bin: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    let out =
        Command::new(bin).args(args).env("ZTSEG_SOCKET", socket).output().context("cannot run ztseg")?;
    if !out.status.success() {
        bail!("ztseg {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `ztseg daemon` and returns once it is ready.
fn start_daemon(ztseg_bin: &Path, config: &Path) -> Result<Child> {
    let mut daemon = Command::new(ztseg_bin)
        .args(["daemon", "--config"])
        .arg(config)
        .env("ZTSEG_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = daemon.stderr.take().context("daemon stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ztseg daemon ready")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = daemon.kill();
        bail!("the daemon did not start");
    }
    Ok(daemon)
}

fn stop_daemon(mut daemon: Child) {
    if let Ok(pid) = i32::try_from(daemon.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let _ = daemon.wait();
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The audit sequence number the next record will get.
fn next_seq(bin: &Path, socket: &Path) -> Result<u64> {
    let status: Value = serde_json::from_str(&ztseg(bin, socket, &["status"])?)?;
    Ok(status["audit_next_seq"].as_u64().unwrap_or(0))
}

/// The kernel's decisions about the agent from `from_seq` on, keyed by "proto dst:port".
fn decisions(bin: &Path, socket: &Path, from_seq: u64, since: &str) -> Result<BTreeMap<String, Value>> {
    let out = ztseg(bin, socket, &["events", "--agent", AGENT])?;
    let mut by_target = BTreeMap::new();
    for line in out.lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
        // Decisions from before this attempt can still arrive after it (a restarted daemon
        // drains what the kernel logged while it was down): the decision time tells them apart.
        let new = record["seq"].as_u64().is_some_and(|seq| seq >= from_seq)
            && record["ts"].as_str().is_some_and(|ts| ts >= since);
        if record.get("verdict").is_none() || !new {
            continue;
        }
        let key = match record["action"].as_str() {
            Some("socket") => "socket".to_owned(),
            _ => format!(
                "{} {}:{}",
                record["proto"].as_str().unwrap_or("?"),
                record["dst"].as_str().unwrap_or("?"),
                record["dport"]
            ),
        };
        by_target.insert(key, record);
    }
    Ok(by_target)
}

fn target_key(op: &str) -> String {
    match op.split_once(':') {
        Some(("tcp", addr)) => format!("tcp {addr}"),
        Some(("udp-sendto", addr)) => format!("udp {addr}"),
        _ => "socket".to_owned(),
    }
}

struct Demo {
    bin: PathBuf,
    probe: PathBuf,
    socket: PathBuf,
    agents_ns: String,
}

impl Demo {
    /// The agent (via `ztseg run`) tries `ops`; prints each outcome with the kernel's reason.
    fn attempt(&self, ops: &[(&str, &str)]) -> Result<Vec<String>> {
        let from_seq = next_seq(&self.bin, &self.socket)?;
        let since = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let out = Command::new(programs::IP)
            .args(["netns", "exec", &self.agents_ns])
            .arg(&self.bin)
            .args(["run", "--agent", AGENT, "--"])
            .arg(&self.probe)
            .arg("once")
            .args(ops.iter().map(|(op, _)| *op))
            .env("ZTSEG_SOCKET", &self.socket)
            .output()
            .context("cannot run ztseg run")?;
        if !out.status.success() {
            bail!("ztseg run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let outcomes: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        // The decision events for these connects are written before the connects return; the
        // daemon reads them from the ring buffer right after. Ask for them until all are there.
        let mut seen = BTreeMap::new();
        for _ in 0..100 {
            seen = decisions(&self.bin, &self.socket, from_seq, &since)?;
            if ops.iter().all(|(op, _)| seen.contains_key(&target_key(op))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for ((op, what), outcome) in ops.iter().zip(&outcomes) {
            let record = seen.get(&target_key(op));
            let verdict = if outcome == "ok" { "ALLOW" } else { "DENY " };
            let why = record.map_or_else(String::new, |r| {
                let reason = r["reason"].as_str().unwrap_or("?");
                match r["rule"].as_str() {
                    Some(rule) => format!("{reason}: {rule}"),
                    None => reason.to_owned(),
                }
            });
            println!(
                "    {verdict}  {:<26} {:<28} {}",
                op.split_once(':').map_or(*op, |(_, a)| a),
                what,
                why
            );
        }
        Ok(outcomes)
    }
}

pub fn run(root: &Path, ztseg_bin: &Path, probe_bin: &Path) -> Result<()> {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("ztseg-demo-{id}"));
    fs::create_dir_all(dir.join("policies"))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    // The agent runs under its own uid: give it a copy of the probe it can execute.
    let probe = dir.join("agent-probe");
    fs::copy(probe_bin, &probe)?;
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755))?;
    let agents_ns = format!("ztseg-demo-agents-{id}");
    let services_ns = format!("ztseg-demo-services-{id}");
    let config = dir.join("ztseg.toml");
    let mut cleanup = Cleanup {
        netns: vec![],
        daemon: None,
        servers: vec![],
        dir: dir.clone(),
        ztseg: ztseg_bin.to_owned(),
        config: config.clone(),
    };
    let socket = dir.join("ztseg.sock");
    let cgroup_root = format!("ztseg-demo-{id}.slice");
    let pin_dir = format!("/sys/fs/bpf/ztseg-demo-{id}");

    println!("== ztseg demo: agent {AGENT}, operation report-2026-q1 ==\n");
    println!("[1] a test network: the agent's host and a services host, joined by a veth link");
    for ns in [&agents_ns, &services_ns] {
        ip(&["netns", "add", ns])?;
        cleanup.netns.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "-n",
        &agents_ns,
        "link",
        "add",
        "agents0",
        "type",
        "veth",
        "peer",
        "name",
        "services0",
        "netns",
        &services_ns,
    ])?;
    ip(&["-n", &agents_ns, "addr", "add", "10.99.0.1/30", "dev", "agents0"])?;
    ip(&["-n", &services_ns, "addr", "add", "10.99.0.2/30", "dev", "services0"])?;
    ip(&["-n", &agents_ns, "link", "set", "agents0", "up"])?;
    ip(&["-n", &services_ns, "link", "set", "services0", "up"])?;
    for net in ["10.0.0.0/16", "203.0.113.0/24"] {
        ip(&["-n", &agents_ns, "route", "add", net, "via", "10.99.0.2"])?;
    }
    let mut listen = Vec::new();
    for (addr, what) in SERVICES {
        let host = addr.split(':').next().unwrap_or_default();
        let _ = Command::new(programs::IP)
            .args(["-n", &services_ns, "addr", "add", &format!("{host}/32"), "dev", "lo"])
            .output();
        println!("    {addr:<18} {what}");
        listen.push(addr);
    }
    let mut server = Command::new(&probe)
        .args(["--netns", &format!("/run/netns/{services_ns}"), "serve"])
        .args(&listen)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut ready = String::new();
    BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut ready)?;
    cleanup.servers.push(server);
    if ready.trim() != "ready" {
        bail!("the demo services did not start");
    }

    println!("\n[2] the orchestrator's signing key, and a daemon trusting it (EdDSA pinned)");
    let keys = dir.join("keys");
    let out = ztseg(ztseg_bin, &socket, &["token", "keygen", "--out", keys.to_str().unwrap_or_default()])?;
    println!("{}", out.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"));
    for entry in fs::read_dir(root.join("policies"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            fs::copy(&path, dir.join("policies").join(path.file_name().unwrap_or_default()))?;
        }
    }
    fs::write(
        &config,
        format!(
            "policy_dir = {:?}\nstate_dir = {:?}\naudit_log = {:?}\nsocket = {:?}\npin_dir = {pin_dir:?}\n\
             cgroup_root = {cgroup_root:?}\n\n[[issuers]]\niss = {ISSUER:?}\nkey = {:?}\nalgorithms = [\"EdDSA\"]\n",
            dir.join("policies"),
            dir.join("state"),
            dir.join("audit/audit.jsonl"),
            socket,
            keys.join("jwks.json"),
        ),
    )?;
    cleanup.daemon = Some(start_daemon(ztseg_bin, &config)?);
    println!("    daemon up: programs pinned under {pin_dir}, agents under {cgroup_root}");
    let tree = Command::new(programs::BPFTOOL).args(["cgroup", "tree"]).output();
    if let Ok(tree) = tree {
        let programs: Vec<String> = String::from_utf8_lossy(&tree.stdout)
            .lines()
            .filter(|l| l.contains("connect") || l.contains("sendmsg") || l.contains("sock_create"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        println!(
            "    bpftool cgroup tree: {} programs ({})",
            programs.len(),
            programs.iter().filter_map(|p| p.split(' ').next_back()).collect::<Vec<_>>().join(", ")
        );
    }

    println!("\n[3] the orchestrator grants {AGENT} a {TTL_SECONDS} s token for operation report-2026-q1");
    let token = ztseg(
        ztseg_bin,
        &socket,
        &[
            "token",
            "issue",
            "--key",
            keys.join("ed25519.pem").to_str().unwrap_or_default(),
            "--iss",
            ISSUER,
            "--agent",
            AGENT,
            "--op",
            "report-2026-q1",
            "--scope",
            "read:data.sales_q1_2026",
            "--scope",
            "write:report.draft.2026q1",
            "--tool",
            "pandas",
            "--tool",
            "matplotlib",
            "--forbid",
            "bash",
            "--forbid",
            "http",
            "--ttl",
            &TTL_SECONDS.to_string(),
        ],
    )?;
    let token = token.trim().to_owned();
    let claims: Value = serde_json::from_str(&ztseg(
        ztseg_bin,
        &socket,
        &["token", "inspect", "--config", config.to_str().unwrap_or_default(), &token],
    )?)?;
    println!(
        "    verified claims: sub {}, op {}, scope {}, tools {}, forbidden {}, exp in {} s",
        claims["sub"],
        claims["op"],
        claims["scope"],
        claims["tools"],
        claims["forbidden_tools"],
        claims["exp"].as_u64().unwrap_or(0).saturating_sub(unix_now())
    );
    let token_file = dir.join("policies").join(format!("{AGENT}.jwt"));
    fs::write(&token_file, &token)?;
    let binding = dir.join("policies").join(format!(".{AGENT}.toml.tmp"));
    fs::write(&binding, format!("[agent]\nid = {AGENT:?}\ntoken_file = \"{AGENT}.jwt\"\n"))?;
    fs::rename(&binding, dir.join("policies").join(format!("{AGENT}.toml")))?;
    println!("    binding dropped: policies/{AGENT}.toml -> {AGENT}.jwt");
    let mut granted = false;
    for _ in 0..250 {
        let agents: Value = serde_json::from_str(&ztseg(ztseg_bin, &socket, &["agents", "--json"])?)?;
        if agents.as_array().into_iter().flatten().any(|a| a["jti"] == claims["jti"]) {
            granted = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if !granted {
        bail!("the daemon did not grant the token");
    }
    println!(
        "{}",
        ztseg(ztseg_bin, &socket, &["agents"])?
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let demo = Demo {
        bin: ztseg_bin.to_owned(),
        probe: probe.clone(),
        socket: socket.clone(),
        agents_ns: agents_ns.clone(),
    };
    println!(
        "\n[4] {AGENT} runs (ztseg run: its own uid, shown as UID above, its own cgroup and box) and tries:"
    );
    demo.attempt(&ATTEMPTS)?;

    println!("\n[5] kill switch: ztseg kill {AGENT}");
    ztseg(ztseg_bin, &socket, &["kill", AGENT])?;
    demo.attempt(&ATTEMPTS[..1])?;
    println!("    ztseg revive {AGENT}");
    ztseg(ztseg_bin, &socket, &["revive", AGENT])?;
    demo.attempt(&ATTEMPTS[..1])?;

    println!("\n[6] {AGENT} goes rogue (a prompt injection): it scans the database host's ports");
    let scan: Vec<String> = (1..=120).map(|port| format!("tcp:10.0.5.12:{port}")).collect();
    let out = Command::new(programs::IP)
        .args(["netns", "exec", &agents_ns])
        .arg(ztseg_bin)
        .args(["run", "--agent", AGENT, "--"])
        .arg(&probe)
        .arg("once")
        .args(&scan)
        .env("ZTSEG_SOCKET", &socket)
        .output()
        .context("cannot run ztseg run")?;
    let refused = String::from_utf8_lossy(&out.stdout).lines().filter(|l| *l == "EPERM").count();
    println!(
        "    {refused} of {} connects refused in the kernel; the risk engine scores each record",
        scan.len()
    );
    let mut paused = false;
    for _ in 0..250 {
        let agents: Value = serde_json::from_str(&ztseg(ztseg_bin, &socket, &["agents", "--json"])?)?;
        if agents.as_array().into_iter().flatten().any(|a| a["agent"] == AGENT && a["state"] == "paused") {
            paused = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if !paused {
        bail!("the risk engine did not pause the scanning agent");
    }
    println!(
        "    paused: its score crossed pause_at (70; at suspend_at, 90, it is suspended). ztseg risk {AGENT}:"
    );
    println!(
        "{}",
        ztseg(ztseg_bin, &socket, &["risk", AGENT])?
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("    what its token allows is now refused, its connections held:");
    demo.attempt(&ATTEMPTS[..1])?;
    println!("    a person reviews it: ztseg resume {AGENT} --reason \"...\"");
    ztseg(ztseg_bin, &socket, &["resume", AGENT, "--reason", "demo: the scan was the demo's own"])?;
    demo.attempt(&ATTEMPTS[..1])?;

    let exp = claims["exp"].as_u64().unwrap_or(0);
    println!(
        "\n[7] the token expires at exp; the kernel enforces it on its own clock (the daemon is stopped first)"
    );
    if let Some(daemon) = cleanup.daemon.take() {
        let mut daemon = daemon;
        // Start the agent now: `ztseg run` needs the daemon, the running agent does not.
        let mut agent = Command::new(programs::IP)
            .args(["netns", "exec", &agents_ns])
            .arg(ztseg_bin)
            .args(["run", "--agent", AGENT, "--"])
            .arg(&probe)
            .args(["until-denied", "tcp:10.0.5.12:5432"])
            .env("ZTSEG_SOCKET", &socket)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(agent.stdout.take().context("agent stdout")?).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        println!(
            "    agent connects to the sales database: {}",
            if first == "first ok" { "ALLOW" } else { "DENY" }
        );
        let _ = daemon.kill();
        let _ = daemon.wait();
        println!("    daemon SIGKILLed; the agent keeps connecting every few ms ...");
        let last = lines.next().transpose()?.unwrap_or_default();
        let fields: Vec<&str> = last.split_whitespace().collect();
        let at = |name: &str| {
            fields
                .iter()
                .position(|f| *f == name)
                .and_then(|i| fields.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (ok_ns, denied_ns) = (at("last-ok-started-unix"), at("denied-ended-unix"));
        let exp_ns = exp * 1_000_000_000;
        println!(
            "    last allowed connect started {:.1} ms before exp; first refused one ended {:.1} ms after exp",
            (exp_ns as f64 - ok_ns as f64) / 1e6,
            (denied_ns as f64 - exp_ns as f64) / 1e6
        );
        let _ = agent.wait();
    }
    cleanup.daemon = Some(start_daemon(ztseg_bin, &config)?);
    println!("    daemon restarted; it re-adopted the pinned programs and maps:");
    println!(
        "{}",
        ztseg(ztseg_bin, &socket, &["agents"])?
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    demo.attempt(&ATTEMPTS[..1])?;
    if let Some(daemon) = cleanup.daemon.take() {
        stop_daemon(daemon);
    }

    println!("\n[8] the audit log (daemon stopped, log complete)");
    // With the host key, found through the daemon's config: `<log>.pub` is never trusted.
    let out = Command::new(ztseg_bin)
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .arg(dir.join("audit/audit.jsonl"))
        .output()?;
    println!(
        "    ztseg audit verify: {}",
        String::from_utf8_lossy(&out.stdout).trim().replace('\n', "\n    ")
    );
    if !out.status.success() {
        bail!("audit verify failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }

    println!("\n[9] cleanup: daemon stopped, programs detached, pins, cgroups, namespaces and files removed");
    drop(cleanup);
    Ok(())
}
