//! DNS figures: what the daemon's DNS proxy adds to a query (p50, p99) over asking the
//! resolver directly, the queries per second it answers, the memory 100,000 distinct names
//! take (the daemon's resident size and the kernel's `learned` map), and the kernel's cost of a
//! decision through a learned address against one through the rule table.
//!
//! A resolver of the bench's own (`dns-upstream`) answers every name under `bench.test` with an
//! address of 10.128.0.0/9 derived from the name, in a namespace of its own, where the daemon
//! runs too (its proxy serves that namespace's loopback) and the clients (`dns-client`), inside
//! the agent's cgroup (through the proxy) or outside it (the resolver directly, the baseline).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use nix::sched::CloneFlags;
use ztseg::{
    agent_id::AgentId,
    cgroup::CgroupFs,
    token::{self, IssueParams},
};

use crate::{
    control_plane::Figures,
    stats::{self, percentile},
};

/// The resolver's address in the bench's DNS namespace.
const UPSTREAM: &str = "10.78.0.53:53";
/// An address the plain agent's scope grants, and one nothing grants (both local: a connect
/// ends at once with a reset, after the kernel's decision).
const GRANTED: &str = "10.78.0.80:443";
const REFUSED: &str = "10.78.0.99:443";

/// The address the resolver answers for `name`: in 10.128.0.0/9, from an FNV-1a hash.
fn address_of(name: &str) -> Ipv4Addr {
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    Ipv4Addr::from(0x0a80_0000 | (hash & 0x007f_ffff))
}

fn join_netns(path: &Path) -> Result<()> {
    nix::sched::setns(fs::File::open(path)?, CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// `ztseg-bench dns-upstream NETNS`: the resolver; "ready" once bound; serves until killed.
pub fn upstream_main(args: &[String]) -> Result<()> {
    join_netns(Path::new(args.first().context("dns-upstream NETNS")?))?;
    let socket = UdpSocket::bind(UPSTREAM)?;
    println!("ready");
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
        let Some(query) = request.queries.first() else { continue };
        let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata.recursion_available = true;
        reply.add_query(query.clone());
        if query.query_type() == RecordType::A {
            let name = query.name().to_ascii().to_ascii_lowercase();
            let address = address_of(name.trim_end_matches('.'));
            reply.add_answer(Record::from_rdata(query.name().clone(), 3600, RData::A(A(address))));
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}

/// One A query over `socket` (connected); its time in ns, or `None` without an answer.
fn ask(socket: &UdpSocket, name: &str, id: u16) -> Option<u64> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let bytes = message.to_vec().ok()?;
    let started = Instant::now();
    socket.send(&bytes).ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let n = socket.recv(&mut buf).ok()?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if reply.metadata.id == id {
            let answered = reply.answers.iter().any(|r| matches!(r.data, RData::A(_)));
            return answered.then(|| started.elapsed().as_nanos() as u64);
        }
    }
}

fn client_socket() -> Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.connect(UPSTREAM)?;
    Ok(socket)
}

/// `ztseg-bench dns-client CGROUP|- NETNS latency N PREFIX | rate SECONDS THREADS PREFIX |
/// fill N THREADS PREFIX | connect ADDR N`: joins the namespace and the cgroup (`-`: none),
/// then prints its figures on one line.
pub fn client_main(args: &[String]) -> Result<()> {
    let [cgroup, netns, what, rest @ ..] = args else { bail!("dns-client CGROUP NETNS WHAT ...") };
    join_netns(Path::new(netns))?;
    if cgroup != "-" {
        fs::write(Path::new(cgroup).join("cgroup.procs"), "0")?;
    }
    let arg = |i: usize| rest.get(i).context("missing argument");
    match what.as_str() {
        "latency" => {
            let n: u64 = arg(0)?.parse()?;
            let socket = client_socket()?;
            let mut times = Vec::new();
            for i in 0..n {
                if let Some(ns) = ask(&socket, &format!("{}{i}.bench.test", arg(1)?), i as u16) {
                    times.push(ns as f64);
                }
            }
            println!("{} {} {}", times.len(), percentile(&times, 50.0), percentile(&times, 99.0));
        }
        "rate" | "fill" => {
            let (limit, threads): (u64, u64) = (arg(0)?.parse()?, arg(1)?.parse()?);
            let prefix = arg(2)?.clone();
            let answered = Arc::new(AtomicU64::new(0));
            let next = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let deadline = started + Duration::from_secs(limit);
            let fill = what == "fill";
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (answered, next, prefix) = (answered.clone(), next.clone(), prefix.clone());
                    std::thread::spawn(move || -> Result<()> {
                        let socket = client_socket()?;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if (fill && i >= limit) || (!fill && Instant::now() >= deadline) {
                                return Ok(());
                            }
                            if ask(&socket, &format!("{prefix}{i}.bench.test"), (i ^ t) as u16).is_some() {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} {:.0}",
                answered.load(Ordering::Relaxed),
                answered.load(Ordering::Relaxed) as f64 / secs
            );
        }
        "connect" => {
            let addr: SocketAddr = arg(0)?.parse()?;
            let n: u64 = arg(1)?.parse()?;
            let (mut reached, mut eperm, mut other) = (0, 0, 0);
            for _ in 0..n {
                // No listener: an allowed connect ends in a reset (ECONNREFUSED), a denied one
                // at the hook (EPERM).
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => reached += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    _ => other += 1,
                }
            }
            println!("{reached} {eperm} {other}");
        }
        other => bail!("dns-client: unknown {other}"),
    }
    Ok(())
}

/// Kills and reaps a child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ready(child: &mut Child, what: &str) -> Result<()> {
    let out = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("{what} did not start");
    }
    Ok(())
}

fn client(bench: &Path, cgroup: Option<&Path>, netns: &Path, args: &[&str]) -> Result<Vec<f64>> {
    let out = Command::new(bench)
        .arg("dns-client")
        .arg(cgroup.map_or_else(|| PathBuf::from("-"), Path::to_owned))
        .arg(netns)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("dns-client {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.split_whitespace().filter_map(|v| v.parse().ok()).collect())
}

/// Bytes the kernel accounts to a pinned map (`bpftool map show`'s `bytes_memlock`) and its
/// entries.
fn map_figures(pin: &Path) -> Result<(u64, usize)> {
    let out = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(pin).output()?;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool map show")?;
    let bytes = shown["bytes_memlock"].as_u64().unwrap_or(0);
    let map = aya::maps::MapData::from_pin(pin)?;
    let map = aya::maps::HashMap::<_, ztseg_common::dns::Learned, ztseg_common::dns::LearnedValue>::try_from(
        aya::maps::Map::HashMap(map),
    )?;
    Ok((bytes, map.keys().count()))
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Runs the DNS figures against the daemon binary `daemon_bin`.
pub fn run(bench: &Path, daemon_bin: &Path, fs_: &CgroupFs, quick: bool) -> Result<Figures> {
    let mut fig = Figures { lines: Vec::new() };
    let id = std::process::id();
    let name = format!("ztseg-bench-{id}-dns");
    let dir = std::env::temp_dir().join(&name);
    let _dir = crate::control_plane::DirGuard(dir.clone());
    fs::create_dir_all(dir.join("policies"))?;
    let ns = crate::net::Netns::new(&name)?;
    for addr in ["10.78.0.53/32", "10.78.0.80/32", "10.78.0.99/32", "10.128.0.0/9"] {
        let status = Command::new("ip").args(["-n", &name, "addr", "add", addr, "dev", "lo"]).status()?;
        if !status.success() {
            bail!("cannot add {addr} in the DNS namespace");
        }
    }
    let mut upstream =
        Command::new(bench).arg("dns-upstream").arg(ns.path()).stdout(Stdio::piped()).spawn()?;
    ready(&mut upstream, "the bench's resolver")?;
    let _upstream = Reaped(upstream);

    let root_rel = format!("{name}.slice");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let root = fs_.resolve(Path::new(&root_rel))?;
    let _pins = crate::control_plane::PinsGuard(pin_dir.clone(), root.clone());
    let keys = token::keygen(&dir.join("keys"))?;
    let key_pem = fs::read_to_string(&keys.private_key)?;
    let issuer = "bench-orchestrator";
    let names = if quick { 20_000 } else { 100_000 };
    let socket = dir.join("ztseg.sock");
    let config = dir.join("ztseg.toml");
    fs::write(
        &config,
        format!(
            "policy_dir = {:?}\nstate_dir = {:?}\naudit_log = {:?}\nsocket = {socket:?}\npin_dir = {pin_dir:?}\ncgroup_root = {root_rel:?}\n\
             [[issuers]]\niss = {issuer:?}\nkey = {:?}\nalgorithms = [\"EdDSA\"]\n\
             [dns]\nport = {}\nupstream = [{UPSTREAM:?}]\nttl_min_seconds = 3600\nttl_max_seconds = 3600\n\
             max_names = {}\nmax_addresses = {}\nwildcard_names = {}\n",
            dir.join("policies"),
            dir.join("state"),
            dir.join("audit/audit.jsonl"),
            keys.jwks,
            10_000 + id % 20_000,
            // Room for the latency and rate clients' names besides the fill's.
            names * 4,
            names * 4,
            names * 8,
        ),
    )?;
    fs::write(
        dir.join("policies/catalogue.toml"),
        format!(
            "[scopes.names]\nallow = [{{ to = \"*.bench.test\", ports = [443], proto = \"tcp\" }}]\n\
             [scopes.plain]\nallow = [{{ to = \"{}/32\", ports = [443], proto = \"tcp\" }}]\n",
            GRANTED.split(':').next().unwrap_or_default()
        ),
    )?;
    for (agent, scope) in [("names", "names"), ("plain", "plain")] {
        let mut params = IssueParams::new(issuer, agent.parse::<AgentId>()?);
        params.scopes = vec![scope.to_owned()];
        params.ttl_seconds = 3000;
        let token = token::issue(&key_pem, &params, ztseg::clock::unix_now_secs())?;
        fs::write(
            dir.join(format!("policies/{agent}.toml")),
            format!("[agent]\nid = {agent:?}\ntoken = {token:?}\n"),
        )?;
    }
    let netns_file = fs::File::open(ns.path())?;
    let mut command = Command::new(daemon_bin);
    command.args(["daemon", "--config"]).arg(&config).env("ZTSEG_LOG", "warn").stdout(Stdio::null());
    // SAFETY: one system call on a descriptor opened before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&netns_file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    let daemon = Reaped(command.stderr(Stdio::null()).spawn()?);
    let pid = daemon.0.id();
    // Ready once both agents hold their grants.
    let started = Instant::now();
    loop {
        let out =
            Command::new(daemon_bin).args(["agents", "--json"]).env("ZTSEG_SOCKET", &socket).output()?;
        let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let active = agents.as_array().map_or(0, |a| a.iter().filter(|a| a["state"] == "active").count());
        if active == 2 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the DNS bench's daemon did not grant its agents");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let named = root.join("names");
    let plain = root.join("plain");
    let netns = ns.path();

    // Latency: one query at a time, each a new name (the proxy asks upstream every time).
    let n = if quick { "500" } else { "3000" };
    let proxied = client(bench, Some(&named), &netns, &["latency", n, "lat-"])?;
    let direct = client(bench, None, &netns, &["latency", n, "dir-"])?;
    let [_, p50, p99] = proxied[..] else { bail!("latency client: {proxied:?}") };
    let [_, d50, d99] = direct[..] else { bail!("latency client: {direct:?}") };
    fig.add(
        "DNS query through the proxy (A, new name each, one at a time), p50 / p99",
        format!(
            "{:.0} µs / {:.0} µs; the resolver asked directly: {:.0} µs / {:.0} µs",
            p50 / 1e3,
            p99 / 1e3,
            d50 / 1e3,
            d99 / 1e3
        ),
    );
    fig.add(
        "latency the proxy adds per query, p50 / p99",
        format!("{:.0} µs / {:.0} µs (policy check, upstream round trip from the daemon, learned-map write, audit record written before the answer)", (p50 - d50) / 1e3, (p99 - d99) / 1e3),
    );
    // Throughput: 4 clients for a few seconds.
    let secs = if quick { "2" } else { "5" };
    let rate = client(bench, Some(&named), &netns, &["rate", secs, "4", "rate-"])?;
    let direct_rate = client(bench, None, &netns, &["rate", secs, "4", "drate-"])?;
    fig.add(
        "queries per second through the proxy (4 clients, new names)",
        format!(
            "{:.0} (the resolver directly: {:.0})",
            rate.get(1).copied().unwrap_or(0.0),
            direct_rate.get(1).copied().unwrap_or(0.0)
        ),
    );
    // Memory: distinct names, each an address, held at once.
    let rss_before = rss_kib(pid);
    let (map_before, entries_before) = map_figures(&pin_dir.join(ztseg_common::dns::LEARNED))?;
    let filled = client(bench, Some(&named), &netns, &["fill", &names.to_string(), "4", "fill-"])?;
    let rss_after = rss_kib(pid);
    let (map_after, entries) = map_figures(&pin_dir.join(ztseg_common::dns::LEARNED))?;
    fig.add(
        &format!("memory with {names} distinct names answered (one address each, held)"),
        format!(
            "{} answered; daemon resident {} MiB -> {} MiB (+{:.0} B/name); learned map {} -> {} entries, {:.1} -> {:.1} MiB in the kernel (+{:.0} B/entry)",
            filled.first().copied().unwrap_or(0.0),
            rss_before / 1024,
            rss_after / 1024,
            (rss_after.saturating_sub(rss_before) * 1024) as f64 / names as f64,
            entries_before,
            entries,
            map_before as f64 / 1048576.0,
            map_after as f64 / 1048576.0,
            map_after.saturating_sub(map_before) as f64 / (entries.saturating_sub(entries_before)).max(1) as f64
        ),
    );
    // The kernel's decision: through the rule table, through a learned address, and a refusal,
    // for an agent with names and one without.
    let learned_addr = format!("{}:443", address_of("fill-7.bench.test"));
    let link = pin_dir.join("links/connect4");
    let stats_were_on = crate::set_bpf_stats(true)?;
    let mut cost = String::new();
    let connects = if quick { "5000" } else { "20000" };
    for (label, cgroup, addr, expect_allowed) in [
        ("no names, allowed by an address rule", &plain, GRANTED.to_owned(), true),
        ("no names, no rule", &plain, REFUSED.to_owned(), false),
        ("names, allowed by a learned address", &named, learned_addr, true),
        ("names, no rule and nothing learned", &named, REFUSED.to_owned(), false),
    ] {
        let before = stats::prog_counters(&link)?;
        let out = client(bench, Some(cgroup), &netns, &["connect", &addr, connects])?;
        let after = stats::prog_counters(&link)?;
        let ok = if expect_allowed { out.first() } else { out.get(1) };
        if ok.copied().unwrap_or(0.0) < connects.parse::<f64>()? {
            bail!("{label}: connects came out {out:?}");
        }
        let per = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
        let _ = write!(cost, "{label}: {per:.0} ns; ");
    }
    crate::set_bpf_stats(stats_were_on)?;
    fig.add("connect4 per decision (bpf_stats)", cost.trim_end_matches("; ").to_owned());
    drop(daemon);
    Ok(fig)
}
