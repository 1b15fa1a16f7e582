//! Control-plane figures: token verification, catalogue compilation, rule-set replacement,
//! token apply -> enforced and kill -> enforced latency with 10,000 agents, event pipeline and
//! audit throughput, and daemon memory.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use ztseg::{
    agent_id::AgentId,
    cgroup::CgroupFs,
    config::{Config, Issuer},
    control::{Client, KillProcesses, Request},
    token::{self, IssueParams, Verifier},
};

use crate::{
    net::{ALLOWED, FLOW, Netns, SPIN},
    stats::{percentile, stat},
};

/// Decisions left in the ring for the pipeline figure: most of what the ring holds (about
/// 47,600 records), so the drain lasts long enough to time.
const PIPELINE_BACKLOG: u64 = 40_000;

/// Each figure: a name and a value with its unit, plus detail.
pub struct Figures {
    pub lines: Vec<(String, String)>,
}

impl Figures {
    pub(crate) fn add(&mut self, name: &str, value: String) {
        eprintln!("ztseg-bench: {name}: {value}");
        self.lines.push((name.to_owned(), value));
    }
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(bin: &Path, config: &Path) -> Result<Self> {
        Self::start_with(bin, config, &[])
    }

    /// Started with `env` added to its environment.
    fn start_with(bin: &Path, config: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["daemon", "--config"])
            .arg(config)
            .env("ZTSEG_LOG", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = BufReader::new(child.stderr.take().context("stderr")?);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("ztseg daemon ready")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let daemon = Self { child: Some(child) };
        rx.recv_timeout(Duration::from_secs(600)).context("the daemon did not become ready")?;
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            signal_pid(child.id(), signal);
        }
    }
}

/// Signals one process by pid; never pid 0 or -1 (which would reach a whole group).
fn signal_pid(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_pid(child.id(), nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

fn call(socket: &Path, request: &Request) -> Result<Value> {
    Ok(Client::connect(socket)?.call(request)?)
}

/// Starts `ztseg-bench spin ...` and returns once it is spinning on the opposite outcome.
fn spinner(
    bench: &Path,
    until: &str,
    cgroup: &Path,
    ns: &Netns,
) -> Result<(Child, BufReader<std::process::ChildStdout>)> {
    start_worker(bench, &["spin", until, SPIN], cgroup, ns, "spinning")
}

/// Starts `ztseg-bench ARGS... CGROUP NETNS` and returns once it printed `ready`.
fn start_worker(
    bench: &Path,
    args: &[&str],
    cgroup: &Path,
    ns: &Netns,
    ready: &str,
) -> Result<(Child, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(bench)
        .args(args)
        .arg(cgroup)
        .arg(ns.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != ready {
        bail!("{} said {line:?}", args[0]);
    }
    Ok((child, out))
}

/// Watches the agent's kernel entry (the pinned `agents` map) from a thread of its own, polling
/// every 20 µs at real-time priority; returns the boot-clock ns at which `seen` first held.
fn watch_agent(
    pin: &Path,
    cgroup_id: u64,
    what: &'static str,
    seen: impl Fn(&ztseg_common::agent::AgentState) -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<u64>>> {
    use ztseg_common::agent::AgentState;
    let data = aya::maps::MapData::from_pin(pin)?;
    let agents: aya::maps::HashMap<_, u64, AgentState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        // Sees the change as soon as it is made: a watcher waiting for a CPU would add its own
        // wait to the figure.
        let fifo = crate::worker::set_fifo();
        let _ = ready_tx.send(fifo.is_ok());
        fifo?;
        let give_up = ztseg::clock::boot_now_ns() + 30_000_000_000;
        loop {
            if agents.get(&cgroup_id, 0).is_ok_and(|a| seen(&a)) {
                return Ok(ztseg::clock::boot_now_ns());
            }
            if ztseg::clock::boot_now_ns() > give_up {
                bail!("{what} did not show in 30 s");
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    // Started and at its priority before the request is sent (a thread just made waits for its
    // first CPU slice like any other).
    ready.recv().context("the watcher did not start")?;
    Ok(watcher)
}

/// The agent's table in the kernel now.
fn table_of(pin: &Path, cgroup_id: u64) -> Result<u32> {
    let data = aya::maps::MapData::from_pin(pin)?;
    let agents: aya::maps::HashMap<_, u64, ztseg_common::agent::AgentState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    Ok(agents.get(&cgroup_id, 0)?.table)
}

fn read_ns(child: &mut Child, out: &mut BufReader<std::process::ChildStdout>) -> Result<u64> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    child.wait()?;
    line.trim().parse().with_context(|| format!("spinner said {line:?}"))
}

/// A UDP flood from the probe agent (two processes, as fast as they can send): decisions/s,
/// records and log bytes it cost, and `sendmsg4`'s cost per decision when summarised against
/// its cost when each decision is a ring record (a send within the record budget).
#[allow(clippy::too_many_arguments)]
fn flood_figures(
    fig: &mut Figures,
    bench: &Path,
    socket: &Path,
    probe_cgroup: &Path,
    ns: &Netns,
    pin_dir: &Path,
    log: &Path,
    issue: &dyn Fn(&str, &[&str]) -> Result<String>,
) -> Result<()> {
    const TARGET: &str = "127.0.0.2:9003";
    call(socket, &Request::TokenApply { agent: "probe".into(), token: issue("probe", &["s", "u"])? })?;
    let sendmsg4 = pin_dir.join("links/sendmsg4");
    let flood = |count: u64, processes: usize| -> Result<(u64, f64, f64)> {
        let mut workers = Vec::new();
        for _ in 0..processes {
            workers.push(start_worker(
                bench,
                &["udp-flood", &count.to_string(), TARGET],
                probe_cgroup,
                ns,
                "ready",
            )?);
        }
        let (rt0, n0) = crate::stats::prog_counters(&sendmsg4)?;
        let t0 = Instant::now();
        for (child, _) in &mut workers {
            writeln!(child.stdin.as_mut().context("stdin")?)?;
        }
        let mut sent = 0;
        for (mut child, mut out) in workers {
            let mut line = String::new();
            out.read_line(&mut line)?;
            sent += line.trim().parse::<u64>().unwrap_or(0);
            child.wait()?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let (rt1, n1) = crate::stats::prog_counters(&sendmsg4)?;
        Ok((sent, secs, (rt1 - rt0) as f64 / (n1 - n0).max(1) as f64))
    };
    let log_size = || fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let lines = || fs::read(log).map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64).unwrap_or(0);
    // Settles once the log has not grown for 1.5 s (the summaries are drained every second).
    let settle = || {
        let mut size = log_size();
        loop {
            std::thread::sleep(Duration::from_millis(1500));
            let now = log_size();
            if now == size {
                return;
            }
            size = now;
        }
    };
    let stats_were_on = crate::set_bpf_stats(true)?;
    settle();
    let (bytes0, lines0) = (log_size(), lines());
    let (sent, secs, flood_ns) = flood(400_000, 2)?;
    settle();
    let (bytes, records) = (log_size() - bytes0, lines() - lines0);
    fig.add(
        "UDP flood, one agent, 2 processes: decisions/s; records and log bytes it cost",
        format!(
            "{:.0} decisions/s ({sent} in {secs:.2} s); {records} records ({:.0}/s of flood), {:.1} MB of log ({:.2} MB/s of flood)",
            sent as f64 / secs,
            records as f64 / secs,
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / secs
        ),
    );
    // Past its budget's window: 1,000 sends are each a ring record.
    std::thread::sleep(Duration::from_millis(1100));
    let (_, _, record_ns) = flood(1_000, 1)?;
    crate::set_bpf_stats(stats_were_on)?;
    fig.add(
        "sendmsg4 per decision (bpf_stats): in a flood (mostly summarised) vs each a ring record (within the budget)",
        format!("{flood_ns:.0} ns vs {record_ns:.0} ns"),
    );
    Ok(())
}

/// The daemon under test and where its flooding agent runs.
struct Flood<'a> {
    bench: &'a Path,
    socket: &'a Path,
    probe_cgroup: &'a Path,
    ns: &'a Netns,
    pin_dir: &'a Path,
}

impl Flood<'_> {
    /// Token apply -> first allowed connect, and kill -> enforced / first refused, each with the
    /// agent flooding connects; `disk` is appended to the figures' names.
    fn apply_and_kill(
        &self,
        fig: &mut Figures,
        issue: &dyn Fn(&str, &[&str]) -> Result<String>,
        disk: &str,
    ) -> Result<()> {
        // token apply -> first allowed connect, as the agent sees it.
        let mut apply = Vec::new();
        let mut answered = Vec::new();
        let agents_pin = self.pin_dir.join(ztseg_common::maps::AGENTS);
        let probe_id = ztseg::cgroup::id(self.probe_cgroup)?;
        let mut switched = Vec::new();
        for _ in 0..100 {
            call(
                self.socket,
                &Request::TokenApply { agent: "probe".into(), token: issue("probe", &["none"])? },
            )?;
            let (mut child, mut out) = spinner(self.bench, "until-ok", self.probe_cgroup, self.ns)?;
            let token = issue("probe", &["s"])?;
            let before = table_of(&agents_pin, probe_id)?;
            let watcher =
                watch_agent(&agents_pin, probe_id, "the new rule table", move |a| a.table != before)?;
            let t0 = ztseg::clock::boot_now_ns();
            call(self.socket, &Request::TokenApply { agent: "probe".into(), token })?;
            let t_answer = ztseg::clock::boot_now_ns();
            let t_ok = read_ns(&mut child, &mut out)?;
            let t_table = watcher.join().map_err(|_| anyhow::anyhow!("the table watcher panicked"))??;
            apply.push(t_ok.saturating_sub(t0) as f64 / 1e3);
            answered.push(t_answer.saturating_sub(t0) as f64 / 1e3);
            switched.push(t_table.saturating_sub(t0) as f64 / 1e3);
        }
        fig.add(
            &format!(
                "token apply -> enforced (the new rule table in the kernel), agent flooding connects, 10,000 agents (100 samples){disk}"
            ),
            format!("p50 {:.0} µs, p99 {:.0} µs", percentile(&switched, 50.0), percentile(&switched, 99.0)),
        );
        fig.add(
            &format!("token apply -> first allowed connect, as the flooding agent sees it, 10,000 agents (100 samples){disk}"),
            format!(
                "p50 {:.0} µs, p99 {:.0} µs (daemon answer: p50 {:.0} µs, p99 {:.0} µs)",
                percentile(&apply, 50.0),
                percentile(&apply, 99.0),
                percentile(&answered, 50.0),
                percentile(&answered, 99.0)
            ),
        );

        // kill -> enforced (the kill flag in the kernel's entry: every decision from then on
        // refuses), and kill -> first refused connect as the flooding agent sees it (which adds the
        // agent's own wait for a CPU: the daemon's threads run ahead of it).
        let (mut kill, mut enforced) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            let (mut child, mut out) = spinner(self.bench, "until-denied", self.probe_cgroup, self.ns)?;
            let watcher = watch_agent(&agents_pin, probe_id, "the kill flag", |a| a.killed())?;
            let t0 = ztseg::clock::boot_now_ns();
            call(self.socket, &Request::Kill { agent: "probe".into(), processes: KillProcesses::Keep })?;
            let t_denied = read_ns(&mut child, &mut out)?;
            let t_flag = watcher.join().map_err(|_| anyhow::anyhow!("the kill flag watcher panicked"))??;
            kill.push(t_denied.saturating_sub(t0) as f64 / 1e3);
            enforced.push(t_flag.saturating_sub(t0) as f64 / 1e3);
            call(self.socket, &Request::Revive { agent: "probe".into() })?;
        }
        fig.add(
            &format!(
                "ztseg kill -> enforced (kill flag in the kernel), agent flooding connects (50 samples){disk}"
            ),
            format!("p50 {:.0} µs, p99 {:.0} µs", percentile(&enforced, 50.0), percentile(&enforced, 99.0)),
        );
        fig.add(
            &format!("ztseg kill -> first refused connect, as the flooding agent sees it (50 samples){disk}"),
            format!("p50 {:.0} µs, p99 {:.0} µs", percentile(&kill, 50.0), percentile(&kill, 99.0)),
        );
        Ok(())
    }
}

/// One drain of a backlog: records per second, and how many of the backlog arrived and how
/// many the ring dropped (both should be the backlog and 0; the figure says so when not).
struct Drain {
    rate: f64,
    arrived: u64,
    dropped: u64,
    refused: u64,
}

/// Records per second the daemon writes when it drains a backlog of decisions made while it
/// was stopped. Progress is read from `status` (a few counters), not `agents` (10,000 rows), so
/// the measuring does not compete with what it measures. The backlog comes from 20 agents, each
/// within its record budget (2048 records per CPU per second), so every decision is a ring
/// record (one agent's 40,000 would mostly be counted in summaries); each drain uses 20 agents
/// not used before (`first` on), as the risk engine would rightly pause an agent that bursts
/// 2,000 connects again and again, and a paused agent's refusals past half the ring are
/// summarised, not recorded one by one. The daemon is stopped only
/// once it has caught up with what came before (a ring still holding an earlier phase's records
/// would drop part of the backlog), and the rate is taken to the last record written, so a
/// backlog that did not all arrive gives a short count, not a timeout divided into it.
fn pipeline_rate(
    bench: &Path,
    daemon: &Daemon,
    socket: &Path,
    root: &Path,
    ns: &Netns,
    first: u64,
) -> Result<Drain> {
    let counters = |socket: &Path| -> Result<(u64, u64)> {
        let status = call(socket, &Request::Status {})?;
        let written = status["events_written"].as_u64().context("status without events_written")?;
        let dropped = status["events_dropped_per_cpu"]
            .as_array()
            .context("status without events_dropped_per_cpu")?
            .iter()
            .filter_map(Value::as_u64)
            .sum();
        Ok((written, dropped))
    };
    // Caught up: the count has not moved for 200 ms.
    let settled = |socket: &Path| -> Result<(u64, u64)> {
        let mut last = counters(socket)?;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = counters(socket)?;
            if now.0 != last.0 {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= Duration::from_millis(200) {
                return Ok(now);
            }
        }
    };
    let backlog_agents = 20;
    let mut bursts = Vec::new();
    for i in first..first + backlog_agents {
        let mut burst = Command::new(bench)
            .args(["burst", &(PIPELINE_BACKLOG / backlog_agents).to_string(), ALLOWED])
            .arg(root.join(format!("bench-{i}")))
            .arg(ns.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(burst.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        bursts.push((burst, out));
    }
    let (before, dropped_before) = settled(socket)?;
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut connected = 0;
    for (burst, out) in &mut bursts {
        writeln!(burst.stdin.take().context("stdin")?, "go")?;
        let mut line = String::new();
        out.read_line(&mut line)?;
        connected += line.trim().parse::<u64>().with_context(|| format!("burst said {line:?}"))?;
        burst.wait()?;
    }
    let t0 = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    let target = before + PIPELINE_BACKLOG;
    let (mut written, mut dropped) = (before, dropped_before);
    let mut last_change = t0;
    // Until the whole backlog is written, or nothing more came for a second (part of it lost).
    while written < target && last_change.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(1));
        let now = counters(socket)?;
        if now.0 != written {
            last_change = Instant::now();
        }
        (written, dropped) = now;
    }
    let arrived = written - before;
    Ok(Drain {
        rate: arrived as f64 / (last_change - t0).as_secs_f64().max(1e-6),
        arrived,
        dropped: dropped - dropped_before,
        refused: PIPELINE_BACKLOG - connected,
    })
}

/// The risk engine's cost per record, alone: 20 agents' decisions (allows to a few granted
/// destinations, routine denials, one agent scanning), fed as the audit writer feeds them.
fn scoring_cost() -> (f64, usize) {
    use std::{net::IpAddr, sync::Arc};

    use ztseg::risk::{Engine, Observation, Params};
    use ztseg_common::{decision::reason, event::ACTION_CONNECT};
    let agents: Vec<Arc<str>> = (0..20).map(|i| Arc::from(format!("bench-{i}"))).collect();
    let events = 1_000_000usize;
    let t0 = 1_800_000_000_000_000u64;
    let observations: Vec<Observation> = (0..events)
        .map(|i| {
            let agent = agents[i % agents.len()].clone();
            let (allowed, why, host, port) = match i % 10 {
                0 => (false, reason::NO_RULE, 7, 5432),
                1 if i % 20 == 1 => (false, reason::NO_RULE, 5, (i / 20 % 1000) as u16),
                _ => (true, reason::RULE, (i % 4) as u8, 443),
            };
            Observation {
                agent,
                seq: i as u64,
                ts_us: t0 + i as u64 * 3,
                action: ACTION_CONNECT,
                allowed,
                reason: why,
                dst: Some(IpAddr::from([10, 0, 0, host])),
                dport: port,
                count: 1,
            }
        })
        .collect();
    let mut engine = Engine::new(Params::default());
    let started = Instant::now();
    let mut changes = 0usize;
    for o in &observations {
        changes += engine.observe(o).len();
    }
    let elapsed = started.elapsed();
    std::hint::black_box(changes);
    (elapsed.as_nanos() as f64 / events as f64, events)
}

pub fn run(bench: &Path, daemon_bin: &Path, ns: &Netns, fs_: &CgroupFs) -> Result<Figures> {
    let mut fig = Figures { lines: Vec::new() };
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("ztseg-bench-cp-{id}"));
    let _cleanup = DirGuard(dir.clone());
    fs::create_dir_all(dir.join("policies"))?;
    let keys = token::keygen(&dir.join("keys"))?;
    let key_pem = fs::read_to_string(&keys.private_key)?;
    let issuer = "bench-orchestrator";
    let issue = |agent: &str, scopes: &[&str]| -> Result<String> {
        let agent: AgentId = agent.parse()?;
        let mut params = IssueParams::new(issuer, agent);
        params.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        params.ttl_seconds = 3000;
        Ok(token::issue(&key_pem, &params, ztseg::clock::unix_now_secs())?)
    };

    // Tokens verified per second (EdDSA, JWKS key; no replay cache involved).
    let config = Config {
        issuers: vec![Issuer {
            iss: issuer.into(),
            key: keys.jwks.clone(),
            algorithms: vec!["EdDSA".into()],
        }],
        ..Config::default()
    };
    let verifier = Verifier::from_config(&config)?;
    let sample = issue("bench-0", &["s"])?;
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        verifier.verify(&sample, ztseg::clock::unix_now_secs())?;
    }
    fig.add(
        "tokens verified per second (EdDSA)",
        format!("{:.0}", n as f64 / started.elapsed().as_secs_f64()),
    );

    // Catalogue of 1,000 scopes: parse, assemble, compile a grant of all of them.
    let mut text = String::new();
    for i in 0..1000 {
        let _ = writeln!(
            text,
            "[scopes.\"read:s{i}\"]\nallow = [{{ to = \"10.{}.{}.0/24\", ports = [5432, 443] }}]",
            i / 256,
            i % 256
        );
    }
    let scopes: Vec<String> = (0..1000).map(|i| format!("read:s{i}")).collect();
    let mut times = Vec::new();
    let mut entries = 0;
    for _ in 0..7 {
        let started = Instant::now();
        let file = ztseg::policy::parse_file(Path::new("catalogue.toml"), &text)?;
        let set = ztseg::policy::assemble(&[file])?;
        let compiled = set.catalogue.compile(&ztseg::policy::Grant {
            scopes: &scopes,
            tools: &[],
            forbidden_tools: &[],
        })?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        entries = compiled.entries.len();
    }
    let s = stat(&times);
    fig.add(
        "catalogue of 1,000 scopes: parse + compile a grant of all",
        format!("{:.1} ms (spread {:.1}-{:.1}), {entries} entries", s.median, s.min, s.max),
    );

    // The daemon: idle, then with 10,000 agents, then with one 1M-rule grant.
    let root_rel = format!("ztseg-bench-{id}-d.slice");
    let pin_dir = format!("/sys/fs/bpf/ztseg-bench-{id}-d");
    let root = fs_.resolve(Path::new(&root_rel))?;
    let _pins = PinsGuard(PathBuf::from(&pin_dir), root.clone());
    let socket = dir.join("ztseg.sock");
    let mut catalogue = String::from(
        "[scopes.s]\nallow = [{ to = \"127.0.0.2/32\", ports = [9000, 9001, 9002], proto = \"tcp\" }]\n[scopes.u]\nallow = [{ to = \"127.0.0.2/32\", ports = [9003], proto = \"udp\" }]\n[scopes.none]\nallow = []\n[scopes.big]\nallow = [\n",
    );
    for i in 0..16 {
        let _ =
            writeln!(catalogue, "  {{ to = \"10.{i}.0.0/16\", ports = [\"1-62500\"], proto = \"tcp\" }},");
    }
    catalogue.push_str("]\n");
    fs::write(dir.join("policies/catalogue.toml"), &catalogue)?;
    let config_path = dir.join("ztseg.toml");
    fs::write(
        &config_path,
        format!(
            // 10,000 agents need more uids than the default range's 4,336.
            "policy_dir = {:?}\nstate_dir = {:?}\naudit_log = {:?}\nsocket = {socket:?}\npin_dir = {pin_dir:?}\ncgroup_root = {root_rel:?}\n\
             agent_uids = \"300000-319999\"\n\
             [[issuers]]\niss = {issuer:?}\nkey = {:?}\nalgorithms = [\"EdDSA\"]\n",
            dir.join("policies"),
            dir.join("state"),
            dir.join("audit/audit.jsonl"),
            keys.jwks
        ),
    )?;
    {
        let daemon = Daemon::start(daemon_bin, &config_path)?;
        fig.add("daemon RSS, idle", format!("{} KiB", rss_kib(daemon.pid())));
    }
    let agents = 10_000;
    for i in 0..agents {
        let name = format!("bench-{i}");
        let token = issue(&name, &["s"])?;
        fs::write(
            dir.join(format!("policies/{name}.toml")),
            format!("[agent]\nid = {name:?}\ntoken = {token:?}\n"),
        )?;
    }
    let probe_token = issue("probe", &["none"])?;
    fs::write(
        dir.join("policies/probe.toml"),
        format!("[agent]\nid = \"probe\"\ntoken = {probe_token:?}\n"),
    )?;
    let started = Instant::now();
    let daemon = Daemon::start(daemon_bin, &config_path)?;
    fig.add(
        "daemon start with 10,000 agent bindings (verify, compile, grant each)",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    fig.add("daemon RSS, 10,000 agents", format!("{} KiB", rss_kib(daemon.pid())));
    let probe_cgroup = root.join("probe");

    // The latencies below time the daemon's enforcement, not how long the bench's own request
    // waits for a CPU behind a spinning agent: the bench's thread runs at the priority of the
    // daemon's control thread (its workers and watchers start at the normal one).
    crate::worker::set_fifo()?;

    let flood =
        Flood { bench, socket: &socket, probe_cgroup: &probe_cgroup, ns, pin_dir: Path::new(&pin_dir) };
    flood.apply_and_kill(&mut fig, &issue, "")?;

    // The same apply with no agent traffic: the daemon's own cost (the rules are in the kernel
    // before it answers).
    let mut quiet = Vec::new();
    for i in 0..100 {
        let token = issue("probe", if i % 2 == 0 { &["none"] } else { &["s"] })?;
        let t0 = Instant::now();
        call(&socket, &Request::TokenApply { agent: "probe".into(), token })?;
        quiet.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    fig.add(
        "token apply, no agent traffic, 10,000 agents (100 samples): daemon answer, rules already enforced",
        format!("p50 {:.0} µs, p99 {:.0} µs", percentile(&quiet, 50.0), percentile(&quiet, 99.0)),
    );

    // kill -> the last byte of an established connection delivered, either way; kill -> the
    // agent's socket closed. The flow's server side is outside the agents' root.
    call(&socket, &Request::TokenApply { agent: "probe".into(), token: issue("probe", &["s"])? })?;
    let (mut cut, mut closed, mut after_answer) = (Vec::new(), Vec::new(), 0);
    let samples = 30;
    for _ in 0..samples {
        let (mut child, mut out) = start_worker(bench, &["flow", FLOW], &probe_cgroup, ns, "flowing")?;
        let t0 = ztseg::clock::boot_now_ns();
        call(&socket, &Request::Kill { agent: "probe".into(), processes: KillProcesses::Keep })?;
        let answered = ztseg::clock::boot_now_ns();
        let mut line = String::new();
        out.read_line(&mut line)?;
        child.wait()?;
        let stamps: Vec<u64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let [last_in, last_out, ended] = stamps[..] else { bail!("flow said {line:?}") };
        let last = last_in.max(last_out);
        cut.push(last.saturating_sub(t0) as f64 / 1e3);
        closed.push(ended.saturating_sub(t0) as f64 / 1e3);
        after_answer += usize::from(last > answered);
        call(&socket, &Request::Revive { agent: "probe".into() })?;
    }
    fig.add(
        "ztseg kill -> last byte of an established TCP connection delivered, either way (30 samples, a chunk each way every 100 µs)",
        format!(
            "p50 {:.0} µs, p99 {:.0} µs; samples with a byte read after kill returned: {after_answer} of {samples}",
            percentile(&cut, 50.0),
            percentile(&cut, 99.0)
        ),
    );
    fig.add(
        "ztseg kill -> the agent's socket reports its end (SOCK_DESTROY) (30 samples)",
        format!("p50 {:.0} µs, p99 {:.0} µs", percentile(&closed, 50.0), percentile(&closed, 99.0)),
    );

    flood_figures(
        &mut fig,
        bench,
        &socket,
        &probe_cgroup,
        ns,
        Path::new(&pin_dir),
        &dir.join("audit/audit.jsonl"),
        &issue,
    )?;

    // Event pipeline: a backlog of decisions made while the daemon is stopped, then drained;
    // with the risk engine scoring every record (as deployed) and without, in six pairs of
    // turns, each turn on a daemon started for it and three drains long, the pair's order
    // alternating (scored first, then unscored first) so that both see the machine's same
    // moments. A turn's rate is the median of its drains; a pair's ratio, scored over unscored;
    // the cost of scoring, the median of the pairs' ratios. The rates are the medians of the
    // six turns each.
    let unscored_config = dir.join("ztseg-unscored.toml");
    fs::write(&unscored_config, format!("{}\n[risk]\nenabled = false\n", fs::read_to_string(&config_path)?))?;
    let (mut scored, mut unscored, mut short) = (Vec::new(), Vec::new(), Vec::new());
    let mut daemon = daemon;
    let mut first = 0;
    let (pairs, drains) = (6, 3);
    for turn in (0..pairs).flat_map(|pair| if pair % 2 == 0 { [true, false] } else { [false, true] }) {
        drop(daemon);
        daemon = Daemon::start(daemon_bin, if turn { &config_path } else { &unscored_config })?;
        let mut rates = Vec::new();
        for _ in 0..drains {
            let drain = pipeline_rate(bench, &daemon, &socket, &root, ns, first)?;
            first += 20;
            if drain.arrived < PIPELINE_BACKLOG || drain.dropped > 0 || drain.refused > 0 {
                short.push(format!(
                    "{} of {PIPELINE_BACKLOG} arrived, {} dropped by the ring, {} connects refused",
                    drain.arrived, drain.dropped, drain.refused
                ));
            }
            rates.push(drain.rate);
        }
        if turn { scored.push(stat(&rates).median) } else { unscored.push(stat(&rates).median) }
    }
    let ratios: Vec<f64> = scored.iter().zip(&unscored).map(|(s, u)| s / u).collect();
    let listed = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    let (scored_median, unscored_median) = (stat(&scored).median, stat(&unscored).median);
    fig.add(
        "event pipeline: ring -> attribution -> audit append -> risk scoring -> stream",
        format!(
            "{scored_median:.0} events/s (a {PIPELINE_BACKLOG}-event backlog; median of {} turns of {drains} drains: {}){}",
            scored.len(),
            listed(&scored),
            if short.is_empty() { String::new() } else { format!("; short drains: {}", short.join("; ")) }
        ),
    );
    let (per_event, events) = scoring_cost();
    fig.add(
        "event pipeline without risk scoring ([risk] enabled = false)",
        format!(
            "{unscored_median:.0} events/s (median of {}); with scoring {:.1}% of that (median of the pairs' {}); the engine alone takes {:.1}% of the pipeline's time per record",
            listed(&unscored),
            100.0 * stat(&ratios).median,
            ratios.iter().map(|r| format!("{:.1}%", 100.0 * r)).collect::<Vec<_>>().join(", "),
            100.0 * per_event * 1e-9 * scored_median
        ),
    );
    fig.add(
        "risk scoring cost per decision record (engine alone, one thread)",
        format!("{per_event:.0} ns ({events} records of 20 agents: allows, denials, a scan)"),
    );

    // The flood figures again while the audit disk is slow: every fdatasync of the log takes
    // 50 ms longer (the bench's build injects it). Control requests never wait for the log.
    drop(daemon);
    let daemon = Daemon::start_with(daemon_bin, &config_path, &[("ZTSEG_FAULT_SYNC_DELAY_MS", "50")])?;
    flood.apply_and_kill(&mut fig, &issue, ", audit fdatasync +50 ms")?;

    // One agent with 1,000,000 rules.
    let started = Instant::now();
    call(&socket, &Request::TokenApply { agent: "probe".into(), token: issue("probe", &["big"])? })?;
    fig.add(
        "token apply of a 1,000,000-rule grant (compile + write)",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    fig.add("daemon RSS, 10,000 agents and 1,000,000 rules", format!("{} KiB", rss_kib(daemon.pid())));
    drop(daemon);

    // Replacing a 10,000-rule set, with the library (what the daemon does per token apply).
    let dp_root = fs_.resolve(Path::new(&format!("ztseg-bench-{id}-r.slice")))?;
    let dp_pins = PinsGuard(PathBuf::from(format!("/sys/fs/bpf/ztseg-bench-{id}-r")), dp_root.clone());
    {
        let (mut dp, _) = ztseg::dataplane::Dataplane::start(&dp_pins.0, &dp_root)?;
        let cg = 1u64 << 41;
        dp.register(cg)?;
        let a = crate::table(10_000);
        let mut b = a.clone();
        for e in &mut b {
            e.port = 9001;
        }
        let (mut swap, mut reclaim) = (Vec::new(), Vec::new());
        for i in 0..11 {
            let started = Instant::now();
            dp.grant(cg, if i % 2 == 0 { &a } else { &b }, u64::MAX / 2)?;
            swap.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            dp.reclaim()?;
            reclaim.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let (s, r) = (stat(&swap), stat(&reclaim));
        fig.add(
            "replace a 10,000-rule set: write + switch (agent sees it)",
            format!("{:.1} ms (spread {:.1}-{:.1})", s.median, s.min, s.max),
        );
        fig.add(
            "... then reclaim the old set (RCU grace period + delete)",
            format!("{:.1} ms (spread {:.1}-{:.1})", r.median, r.min, r.max),
        );
    }

    // Audit appends per second, on its own.
    let audit_dir = dir.join("audit-bench");
    fs::create_dir_all(&audit_dir)?;
    let (mut log, _) = ztseg::audit::AuditLog::open(
        &audit_dir.join("a.jsonl"),
        ztseg::audit::HostKey::generate()?,
        ztseg::audit::AuditOptions::default(),
    )?;
    let record = json!({"ts": "2026-11-28T13:02:03.123456Z", "agent": "analyst-7", "op": "report-2026-q1", "jti": "0123456789abcdef0123456789abcdef", "pid": 4242, "uid": 65534, "comm": "python3", "cgroup_id": 12345, "action": "connect", "proto": "tcp", "dst": "10.0.5.12", "dport": 5432, "verdict": "allow", "reason": "rule", "rule": "scope:read:data.sales_q1_2026#0"});
    let map = record.as_object().cloned().unwrap_or_default();
    let n = 100_000;
    let started = Instant::now();
    for _ in 0..n {
        log.append(map.clone())?;
    }
    log.flush()?;
    fig.add(
        "audit appends per second (fdatasync every 2048 records)",
        format!("{:.0}", n as f64 / started.elapsed().as_secs_f64()),
    );
    Ok(fig)
}

pub(crate) struct DirGuard(pub(crate) PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) struct PinsGuard(pub(crate) PathBuf, pub(crate) PathBuf);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        // Agents' cgroups hold no processes by now; remove them with the pins.
        if let Ok(children) = fs::read_dir(&self.1) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                let _ = fs::write(child.path().join("cgroup.kill"), "1");
            }
        }
        if let Err(e) = ztseg::dataplane::uninstall(&self.0, &self.1) {
            eprintln!("warning: cleaning up {} failed: {e}", self.0.display());
        }
    }
}
