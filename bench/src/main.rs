//! `cargo xtask bench` (as root): what enforcement costs, against no enforcement and against
//! nftables rules matching the agent's cgroup, and what the control plane takes.
//!
//! Every figure is a median of interleaved runs with its spread, and every data-plane figure
//! is also given as a ratio to "no programs" measured in the same run. Nothing is asserted about
//! timings: the report says which aims were met. Output: `target/bench/report.md` and
//! `target/bench/connect.svg`.

mod control_plane;
mod dns;
mod net;
mod report;
mod stats;
mod worker;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use ipnet::{IpNet, Ipv4Net};
use ztseg::{
    cgroup::{self, CgroupFs},
    dataplane::{Dataplane, Entry, Verdict},
};
use ztseg_common::rule::{PROTO_TCP, PROTO_UDP};

use crate::{
    net::{ALLOWED, DENIED, Netns, NftShape},
    stats::{Stat, stat},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("worker") => worker::main(&args[1..]),
        Some("spin") => worker::spin(&args[1..]),
        Some("burst") => worker::burst(&args[1..]),
        Some("flow") => worker::flow(&args[1..]),
        Some("bulk") => worker::bulk(&args[1..]),
        Some("udp-flood") => worker::udp_flood(&args[1..]),
        Some("dns-upstream") => dns::upstream_main(&args[1..]),
        Some("dns-client") => dns::client_main(&args[1..]),
        _ => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztseg-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Options: `--runs N` (default 5), `--quick` (fewer operations per run), `--daemon PATH` (the
/// ztseg binary for the control-plane figures), `--out DIR`, `--control-only`, `--kernel-only` (the
/// ztseg data-plane cases alone: no nftables cases, no bulk runs, no daemon figures).
pub struct Options {
    pub runs: usize,
    pub tcp_ops: u64,
    pub udp_ops: u64,
    pub daemon: Option<PathBuf>,
    pub out: PathBuf,
    /// `--control-only`: skip the data-plane matrix.
    pub control_only: bool,
    /// `--dns-only`: only the DNS figures.
    pub dns_only: bool,
    /// `--kernel-only`: only the ztseg data-plane cases.
    pub kernel_only: bool,
    pub quick: bool,
    /// How long each bulk-throughput run sends.
    pub bulk_ms: u64,
}

fn options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        runs: 5,
        tcp_ops: 20_000,
        udp_ops: 100_000,
        daemon: None,
        out: PathBuf::from("target/bench"),
        control_only: false,
        dns_only: false,
        kernel_only: false,
        quick: false,
        bulk_ms: 1000,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => o.runs = it.next().context("--runs N")?.parse()?,
            "--quick" => (o.tcp_ops, o.udp_ops, o.bulk_ms, o.quick) = (4_000, 20_000, 300, true),
            "--daemon" => o.daemon = Some(PathBuf::from(it.next().context("--daemon PATH")?)),
            "--out" => o.out = PathBuf::from(it.next().context("--out DIR")?),
            "--control-only" => o.control_only = true,
            "--dns-only" => o.dns_only = true,
            "--kernel-only" => o.kernel_only = true,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

/// Cgroups this bench made, removed (after killing anything left in them) on drop.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn make(&mut self, path: &Path) -> Result<u64> {
        let id = cgroup::ensure(path)?;
        self.0.push(path.to_owned());
        Ok(id)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = fs::write(path.join("cgroup.kill"), "1");
            let _ = cgroup::remove(path);
        }
    }
}

/// Detaches the bench's programs and removes its pins on drop.
struct Pins {
    dir: PathBuf,
    root: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = ztseg::dataplane::uninstall(&self.dir, &self.root) {
            eprintln!("warning: cleaning up {} failed: {e}", self.dir.display());
        }
    }
}

/// A thread reading the event ring (poll, then drain), like the daemon's reader minus attribution.
struct Drain {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Drain {
    fn start(mut ring: aya::maps::RingBuf<aya::maps::MapData>) -> Self {
        use std::{os::fd::AsRawFd as _, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut read = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the ring's fd, which `ring` keeps open.
                unsafe { libc::poll(&raw mut pfd, 1, 100) };
                while let Some(record) = ring.next() {
                    drop(record);
                    read += 1;
                }
            }
            read
        });
        Self { stop, thread }
    }

    /// Stops the reader: records read, and records the kernel lost to a full ring.
    fn stop(self, dataplane: &Dataplane) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let read = self.thread.join().unwrap_or(0);
        let lost = dataplane.drops_per_cpu().map(|d| d.iter().sum()).unwrap_or(0);
        (read, lost)
    }
}

/// What a data-plane measurement enforces.
#[derive(Clone, Debug, PartialEq)]
pub enum Setup {
    /// The worker sits outside every enforcing cgroup.
    None,
    Ztseg {
        rules: usize,
        agents: usize,
    },
    Nft(NftShape),
}

#[derive(Clone, Debug)]
pub struct Case {
    pub setup: Setup,
    /// true: the allowed destination; false: one no rule allows.
    pub allowed: bool,
    cgroup: PathBuf,
}

impl Case {
    pub fn label(&self) -> String {
        let what = match &self.setup {
            Setup::None => "no programs".to_owned(),
            Setup::Ztseg { rules, agents } => format!("ztseg, {rules} rules, {agents} agents"),
            Setup::Nft(shape) => shape.label(),
        };
        if self.setup == Setup::None {
            what
        } else {
            format!("{what}, {}", if self.allowed { "allowed" } else { "denied" })
        }
    }
}

/// Per case and protocol, over runs: the median and 99th-percentile ns of one operation, the
/// ratio of the median to the baseline's in the same run, kernel ns per decision, and the runs
/// whose namespace saw TCP trouble (accept-queue overflows or drops, retransmissions).
#[derive(Default)]
pub struct Results {
    pub op_ns: BTreeMap<(String, &'static str), Vec<f64>>,
    pub p99_ns: BTreeMap<(String, &'static str), Vec<f64>>,
    pub troubled: BTreeMap<(String, &'static str), Vec<net::TcpTrouble>>,
    pub ratio: BTreeMap<(String, &'static str), Vec<f64>>,
    pub kernel_ns: BTreeMap<(String, &'static str), Vec<f64>>,
    pub order: Vec<Case>,
    pub notes: Vec<String>,
    /// Bulk TCP over a veth, bytes/s per run: (no programs, ztseg agent), and their ratio.
    pub bulk: Vec<(f64, f64)>,
}

impl Results {
    pub fn op(&self, case: &Case, proto: &'static str) -> Stat {
        stat(self.op_ns.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice))
    }
    pub fn ratio(&self, case: &Case, proto: &'static str) -> Stat {
        stat(self.ratio.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice))
    }
    pub fn kernel(&self, case: &Case, proto: &'static str) -> Stat {
        stat(self.kernel_ns.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice))
    }
    /// A percentile of a case's ratios over its pairs.
    pub fn ratio_percentile(&self, case: &Case, proto: &'static str, p: f64) -> f64 {
        stats::percentile(self.ratio.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice), p)
    }
    pub fn p99(&self, case: &Case, proto: &'static str) -> Stat {
        stat(self.p99_ns.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice))
    }
    /// The runs of a case with TCP trouble in its namespace, and the counts summed over them.
    pub fn trouble(&self, case: &Case, proto: &'static str) -> (usize, net::TcpTrouble) {
        let runs = self.troubled.get(&(case.label(), proto)).map_or(&[][..], Vec::as_slice);
        let sum = runs.iter().fold(net::TcpTrouble::default(), |a, t| net::TcpTrouble {
            listen_overflows: a.listen_overflows + t.listen_overflows,
            listen_drops: a.listen_drops + t.listen_drops,
            retransmits: a.retransmits + t.retransmits,
        });
        (runs.iter().filter(|t| t.any()).count(), sum)
    }
}

/// The rule table of an agent with `n` entries: the allowed destination for TCP and UDP, and
/// fillers of mixed prefix lengths in the same protocol and port bucket (the bucket every lookup
/// of this bench walks: the conservative case).
fn table(n: usize) -> Vec<Entry> {
    let allowed: IpNet = "127.0.0.2/32".parse().unwrap_or(IpNet::V4(Ipv4Net::default()));
    let mut entries = vec![
        Entry {
            net: allowed,
            proto: PROTO_TCP,
            port: 9000,
            inbound: false,
            verdict: Verdict::Allow,
            rule_id: 0,
        },
        Entry {
            net: allowed,
            proto: PROTO_UDP,
            port: 9000,
            inbound: false,
            verdict: Verdict::Allow,
            rule_id: 0,
        },
    ];
    let mut x: u32 = 0x9e37_79b9;
    let mut i = 2;
    while entries.len() < n.max(2) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let prefix = 16 + (x % 17) as u8;
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (x & 0x00ff_ffff));
        if let Ok(net) = Ipv4Net::new(addr, prefix) {
            let proto = if i % 2 == 0 { PROTO_TCP } else { PROTO_UDP };
            entries.push(Entry {
                net: IpNet::V4(net.trunc()),
                proto,
                port: 9000,
                inbound: false,
                verdict: Verdict::Allow,
                rule_id: i,
            });
        }
        i += 1;
    }
    entries.truncate(n.max(2));
    entries
}

/// One worker run: per-operation median and 99th percentile, successes and failures.
struct Timed {
    p50: f64,
    p99: f64,
    ok: u64,
    failed: u64,
}

/// A worker taking turns (see `worker::main`).
struct Turns {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Turns {
    fn start(bench: &Path, proto: &str, addr: &str, n: u64, cgroup: &Path, netns: &Path) -> Result<Self> {
        use std::process::Stdio;
        let mut child = Command::new(bench)
            .args(["worker", proto, addr, &n.to_string()])
            .arg(cgroup)
            .arg(netns)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start a worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut worker = Self { child, stdin, stdout };
        worker.expect("ready")?;
        Ok(worker)
    }

    fn line(&mut self) -> Result<String> {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        let line = self.line()?;
        if line != want {
            bail!("worker said {line:?}, not {want:?}");
        }
        Ok(())
    }

    /// One turn; true once the worker has run its operations or its time.
    fn turn(&mut self) -> Result<bool> {
        use std::io::Write as _;
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        match self.line()?.as_str() {
            "done" => Ok(false),
            "finished" => Ok(true),
            other => bail!("worker said {other:?}"),
        }
    }

    fn finish(mut self) -> Result<Timed> {
        drop(self.stdin);
        let text = {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut self.stdout, &mut text)?;
            text
        };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("worker failed ({status})");
        }
        let f: Vec<u64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let [ok, failed, p50, p99] = f[..] else { bail!("worker said {text:?}") };
        Ok(Timed { p50: p50 as f64, p99: p99 as f64, ok, failed })
    }
}

/// Times a case and the baseline (the allowed destination from outside every enforcing cgroup,
/// in a namespace of its own) in alternating turns of a few dozen operations, so both see the
/// same machine: (baseline, case).
fn measure_pair(
    bench: &Path,
    proto: &str,
    n: u64,
    (base, base_ns): (&Path, &Path),
    (addr, cgroup, netns): (&str, &Path, &Path),
) -> Result<(Timed, Timed)> {
    let mut a = Turns::start(bench, proto, ALLOWED, n, base, base_ns)?;
    let mut b = Turns::start(bench, proto, addr, n, cgroup, netns)?;
    loop {
        let a_done = a.turn()?;
        let b_done = b.turn()?;
        if a_done || b_done {
            break;
        }
    }
    Ok((a.finish()?, b.finish()?))
}

/// Bytes per second of one bulk run from `cgroup` to the sink.
fn bulk(bench: &Path, cgroup: &Path, ns: &Netns, millis: u64) -> Result<f64> {
    let out = Command::new(bench)
        .args(["bulk", net::SINK, &millis.to_string()])
        .arg(cgroup)
        .arg(ns.path())
        .output()?;
    if !out.status.success() {
        bail!("bulk worker failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ztseg-bench-")?;
    let rest = rest.strip_prefix("cp-").unwrap_or(rest);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let pid: u32 = digits.parse().ok()?;
    (!Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Removes what an interrupted earlier run (Ctrl-C, a timeout) left behind: its programs and
/// pins, cgroups (after killing what is left in them), network namespace and temp dir. Only
/// names of this bench's form, and only those whose process is gone.
fn sweep_stale(fs_: &CgroupFs) {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    };
    for name in names(Path::new("/sys/fs/bpf")) {
        if stale_pid(&name).is_none() {
            continue;
        }
        // Pins `ztseg-bench-<pid>[-x]` belong to the root cgroup `ztseg-bench-<pid>-agents.slice`
        // or `ztseg-bench-<pid>-x.slice`.
        let root = if name.ends_with(|c: char| c.is_ascii_digit()) {
            format!("{name}-agents.slice")
        } else {
            format!("{name}.slice")
        };
        let root = fs_.mount().join(root);
        eprintln!("ztseg-bench: removing the leftovers of an interrupted run: /sys/fs/bpf/{name}");
        if let Err(e) = ztseg::dataplane::uninstall(&Path::new("/sys/fs/bpf").join(&name), &root) {
            eprintln!("warning: cannot remove /sys/fs/bpf/{name}: {e}");
        }
    }
    for name in names(fs_.mount()) {
        if stale_pid(&name).is_none() {
            continue;
        }
        let top = fs_.mount().join(&name);
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            let children: Vec<PathBuf> = fs::read_dir(&dirs[i])
                .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
                .unwrap_or_default();
            dirs.extend(children);
            i += 1;
        }
        let _ = fs::write(top.join("cgroup.kill"), "1");
        for dir in dirs.iter().rev() {
            let _ = cgroup::remove(dir);
        }
    }
    for name in names(Path::new("/run/netns")) {
        if stale_pid(&name).is_some() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    for name in names(&std::env::temp_dir()) {
        if stale_pid(&name).is_some() {
            let _ = fs::remove_dir_all(std::env::temp_dir().join(name));
        }
    }
}

pub(crate) fn set_bpf_stats(on: bool) -> Result<bool> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let before = fs::read_to_string(path)?.trim() == "1";
    fs::write(path, if on { "1" } else { "0" })?;
    Ok(before)
}

fn run(args: &[String]) -> Result<()> {
    let opts = options(args)?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the bench loads BPF programs, creates cgroups and network namespaces: run it as root");
    }
    let bench = std::env::current_exe()?;
    let id = std::process::id();
    let fs_ = CgroupFs::discover()?;
    sweep_stale(&fs_);
    if opts.dns_only {
        let daemon = opts.daemon.as_ref().context("--dns-only needs --daemon PATH")?;
        let figures = dns::run(&bench, daemon, &fs_, opts.quick)?;
        let mut md = String::from("# ztseg DNS figures\n\n| figure | value |\n|---|---|\n");
        for (name, value) in &figures.lines {
            md.push_str(&format!("| {name} | {value} |\n"));
        }
        fs::create_dir_all(&opts.out)?;
        fs::write(opts.out.join("dns.md"), &md)?;
        println!("{md}");
        return Ok(());
    }
    let mut cgroups = Cgroups(Vec::new());
    let outside = fs_.resolve(Path::new(&format!("ztseg-bench-{id}.slice")))?;
    cgroups.make(&outside)?;
    let base = outside.join("base");
    cgroups.make(&base)?;
    let nft_cg = outside.join("nft");
    cgroups.make(&nft_cg)?;
    let root = fs_.resolve(Path::new(&format!("ztseg-bench-{id}-agents.slice")))?;
    let pins = Pins { dir: PathBuf::from(format!("/sys/fs/bpf/ztseg-bench-{id}")), root: root.clone() };
    let ns = Netns::new(&format!("ztseg-bench-{id}"))?;
    // The baseline worker's own namespace, set up the same way: nftables rules apply to every
    // packet of the namespace they are loaded in, whatever its cgroup.
    let base_ns = Netns::new(&format!("ztseg-bench-{id}-base"))?;
    // Loaded as the daemon loads them by default (the DNS redirect on).
    let load = ztseg::dataplane::LoadOptions { dns: ztseg::config::Dns::default().kernel_config() };
    let (dataplane, _) = Dataplane::start_with(&pins.dir, &root, &load)?;
    let mut dataplane = dataplane;
    // A consumer drains the event ring as the daemon would, so every decision pays for writing
    // its record (a full, undrained ring would make the bench time the cheaper drop path).
    let drain = Drain::start(dataplane.take_events().context("the dataplane has no event ring")??);
    let stats_were_on = set_bpf_stats(true)?;

    let sizes = [1usize, 1_000, 100_000, 1_000_000];
    let deadline = ztseg::clock::boot_now_ns() + 24 * 3_600_000_000_000;
    let mut agent_cgroups = Vec::new();
    for n in sizes {
        let path = root.join(format!("r{n}"));
        let cg = cgroups.make(&path)?;
        dataplane.register(cg)?;
        let started = std::time::Instant::now();
        dataplane.grant(cg, &table(n), deadline)?;
        eprintln!("ztseg-bench: agent with {n} rules ready ({:.1} s)", started.elapsed().as_secs_f64());
        agent_cgroups.push((n, path));
    }
    dataplane.reclaim()?;
    let (nft_path, nft_level) = net::nft_cgroup(fs_.mount(), &nft_cg)?;
    let links = pins.dir.join("links");

    let mut results = Results::default();
    let matrix: &[usize] = if opts.control_only { &[] } else { &[1, 10_000] };
    for &agents in matrix {
        if agents > 1 {
            // Registered agents without rules: fake cgroup ids, only the agents map grows.
            for i in 0..(agents - sizes.len()) {
                dataplane.register((1 << 40) + i as u64)?;
            }
        }
        let mut cases = vec![Case { setup: Setup::None, allowed: true, cgroup: base.clone() }];
        for (n, path) in &agent_cgroups {
            for allowed in [true, false] {
                cases.push(Case { setup: Setup::Ztseg { rules: *n, agents }, allowed, cgroup: path.clone() });
            }
        }
        if agents == 1 && !opts.kernel_only {
            for shape in [
                NftShape::List(1),
                NftShape::List(1_000),
                NftShape::List(10_000),
                NftShape::Set(1_000),
                NftShape::Set(100_000),
            ] {
                for allowed in [true, false] {
                    cases.push(Case { setup: Setup::Nft(shape), allowed, cgroup: nft_cg.clone() });
                }
            }
        }
        for run in 0..opts.runs {
            eprintln!("ztseg-bench: data plane, {agents} agent(s), run {}/{}", run + 1, opts.runs);
            for case in &cases {
                if let Setup::Nft(shape) = case.setup {
                    ns.nft(&net::nft_ruleset(shape, &nft_path, nft_level))?;
                }
                for (proto, n) in [("tcp", opts.tcp_ops), ("udp", opts.udp_ops)] {
                    let addr = if case.allowed { ALLOWED } else { DENIED };
                    let program = if proto == "tcp" { "connect4" } else { "sendmsg4" };
                    let before = stats::prog_counters(&links.join(program))?;
                    let socket_before = stats::prog_counters(&links.join("sock_create"))?;
                    let packets = |links: &Path| -> Result<u64> {
                        Ok(stats::prog_counters(&links.join("packets_in"))?.0
                            + stats::prog_counters(&links.join("packets_out"))?.0)
                    };
                    let packets_before = packets(&links)?;
                    let trouble_before = ns.tcp_trouble()?;
                    let (base_timed, timed) = measure_pair(
                        &bench,
                        proto,
                        n,
                        (&base, &base_ns.path()),
                        (addr, &case.cgroup, &ns.path()),
                    )?;
                    let trouble = ns.tcp_trouble()?.since(trouble_before);
                    let (ns_op, ok, failed) = (timed.p50, timed.ok, timed.failed);
                    let after = stats::prog_counters(&links.join(program))?;
                    let socket_after = stats::prog_counters(&links.join("sock_create"))?;
                    let packets_after = packets(&links)?;
                    let label = case.label();
                    let expect_ok = case.allowed || matches!(case.setup, Setup::None);
                    if (expect_ok && failed > 0) || (!expect_ok && ok > 0) {
                        results
                            .notes
                            .push(format!("{label} {proto}: {ok} succeeded, {failed} failed (unexpected)"));
                    }
                    results.op_ns.entry((label.clone(), proto)).or_default().push(ns_op);
                    results.p99_ns.entry((label.clone(), proto)).or_default().push(timed.p99);
                    results.troubled.entry((label.clone(), proto)).or_default().push(trouble);
                    // To the baseline's turns of the same pair. For "no programs" itself the two
                    // halves run the same thing: the spread of that ratio is the bench's noise.
                    if base_timed.p50 > 0.0 {
                        results.ratio.entry((label.clone(), proto)).or_default().push(ns_op / base_timed.p50);
                    }
                    // The packet programs' time per TCP connect: every packet of the agent's
                    // side of a connect and close, both ways (SYN, ACK, FIN and theirs).
                    if proto == "tcp" && matches!(case.setup, Setup::Ztseg { .. }) && after.1 > before.1 {
                        let ns = (packets_after - packets_before) as f64 / (after.1 - before.1) as f64;
                        results.kernel_ns.entry((label.clone(), "packets")).or_default().push(ns);
                    }
                    // The socket-creation hook of the TCP case: it reads the socket's type and
                    // protocol and lets a TCP socket through (see the report).
                    if proto == "tcp"
                        && matches!(case.setup, Setup::Ztseg { .. })
                        && socket_after.1 > socket_before.1
                    {
                        let ns = (socket_after.0 - socket_before.0) as f64
                            / (socket_after.1 - socket_before.1) as f64;
                        results.kernel_ns.entry((label.clone(), "socket")).or_default().push(ns);
                    }
                    if matches!(case.setup, Setup::Ztseg { .. }) && after.1 > before.1 {
                        results
                            .kernel_ns
                            .entry((label, proto))
                            .or_default()
                            .push((after.0 - before.0) as f64 / (after.1 - before.1) as f64);
                    }
                }
                if matches!(case.setup, Setup::Nft(_)) {
                    ns.nft_flush()?;
                }
            }
        }
        results.order.extend(cases);
    }
    set_bpf_stats(stats_were_on)?;
    if !opts.control_only && !opts.kernel_only {
        // What the cgroup_skb programs cost per packet: bulk TCP across a veth link from an
        // agent (its one rule grants the sink) and from outside, interleaved in the same runs.
        // The connect is judged once; every data packet out and every ACK in runs a program.
        let far = ns.far_sink(&format!("ztseg-bench-{id}-far"), id)?;
        let bulk_path = root.join("bulk");
        let bulk_cg = cgroups.make(&bulk_path)?;
        dataplane.register(bulk_cg)?;
        let sink: IpNet = format!("{}/32", net::FAR).parse()?;
        let rule = Entry {
            net: sink,
            proto: PROTO_TCP,
            port: 9100,
            inbound: false,
            verdict: Verdict::Allow,
            rule_id: 0,
        };
        dataplane.grant(bulk_cg, &[rule], deadline)?;
        for run in 0..opts.runs {
            eprintln!("ztseg-bench: bulk TCP over a veth, run {}/{}", run + 1, opts.runs);
            let without = bulk(&bench, &base, &ns, opts.bulk_ms)?;
            let with = bulk(&bench, &bulk_path, &ns, opts.bulk_ms)?;
            results.bulk.push((without, with));
        }
        drop(far);
    }
    let (read, lost) = drain.stop(&dataplane);
    results.notes.push(format!(
        "event records read by the bench's ring consumer: {read}; lost to a full ring: {lost}"
    ));
    drop(dataplane);

    let daemon = opts.daemon.as_ref().filter(|_| !opts.kernel_only);
    let control = match daemon {
        Some(daemon) => Some(control_plane::run(&bench, daemon, &ns, &fs_)?),
        None => None,
    };
    let dns = match daemon {
        Some(daemon) => Some(dns::run(&bench, daemon, &fs_, opts.quick)?),
        None => None,
    };
    fs::create_dir_all(&opts.out)?;
    let md = report::markdown(&opts, &results, control.as_ref(), dns.as_ref());
    fs::write(opts.out.join("report.md"), &md)?;
    fs::write(opts.out.join("connect.svg"), report::chart(&results))?;
    println!("{md}");
    eprintln!("ztseg-bench: wrote {}", opts.out.join("report.md").display());
    drop(ns);
    drop(base_ns);
    drop(pins);
    drop(cgroups);
    Ok(())
}
