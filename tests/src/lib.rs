//! Test fixtures that own real kernel objects and remove them on drop, even when a test fails:
//! a network namespace with addresses of its own, a pin dir, an agents' root cgroup, and the
//! probe processes (stand-ins for agents) that the tests start.
//!
//! Nothing here touches an address outside the namespaces it creates.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test fixtures: a panic is the report")]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use ztseg::cgroup::CgroupFs;

mod journal;
pub use journal::{Entry, FakeJournal};

/// The probe binary cargo built next to the test binaries (`target/<profile>/ztseg-probe`; test
/// binaries live in `target/<profile>/deps`).
pub fn probe_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("ztseg-probe");
    assert!(bin.exists(), "{} is missing; build with `cargo test -p ztseg-integration`", bin.display());
    bin
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace with `lo` up and extra addresses on it; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace and puts `addrs` (e.g. "10.77.0.1/32", "fd77::1/128") on its `lo`.
    pub fn new(addrs: &[&str]) -> Self {
        let ns = Self { name: unique("ztseg-t") };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        for addr in addrs {
            let mut args = vec!["-n", &ns.name, "addr", "add", addr, "dev", "lo"];
            if addr.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        }
        ns
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ping_group_range`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")])
            .status()
            .expect("run sysctl");
        assert!(status.success(), "sysctl {key}={value} failed in {}", self.name);
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Joins this namespace and `peer` with a veth pair, addressing each end; returns the names
    /// of this end and of the peer's.
    pub fn veth_to(&self, peer: &Netns, here: &str, there: &str) -> (String, String) {
        let (a, b) = (
            format!("zt{}a", NEXT.fetch_add(1, Ordering::SeqCst)),
            format!("zt{}b", NEXT.fetch_add(1, Ordering::SeqCst)),
        );
        ip(&["-n", &self.name, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &peer.name]);
        ip(&["-n", &self.name, "addr", "add", here, "dev", &a]);
        ip(&["-n", &peer.name, "addr", "add", there, "dev", &b]);
        ip(&["-n", &self.name, "link", "set", &a, "up"]);
        ip(&["-n", &peer.name, "link", "set", &b, "up"]);
        (a, b)
    }

    /// Adds another IPv4 address to `dev`.
    pub fn add_v4(&self, addr: &str, dev: &str) {
        ip(&["-n", &self.name, "addr", "add", addr, "dev", dev]);
    }

    /// Adds an IPv6 address to `dev`, usable at once (no duplicate address detection).
    pub fn add_v6(&self, addr: &str, dev: &str) {
        ip(&["-n", &self.name, "addr", "add", addr, "dev", dev, "nodad"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip").args(["netns", "del", &self.name]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// A process this test started; killed (by pid) and reaped on drop.
pub struct Proc {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl Proc {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn probe");
        let stdout = child.stdout.take().map(BufReader::new);
        let stdin = child.stdin.take();
        Self { child, stdout, stdin }
    }

    /// The next line the process prints (blocks until it does).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "process {} ended without the expected output", self.child.id());
        line.trim_end().to_owned()
    }

    /// Closes stdin (the probe's "stop" signal) and returns everything it prints until it exits.
    pub fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let lines = self.stdout.take().unwrap().lines().map(Result::unwrap).collect();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "probe failed: {status}");
        lines
    }

    /// Reads the rest of the output and waits for the end, however it came (stdin stays open).
    pub fn end(mut self) -> (Vec<String>, std::process::ExitStatus) {
        let lines = self.stdout.take().unwrap().lines().map(Result::unwrap).collect();
        (lines, self.child.wait().unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where a probe runs: inside an agent cgroup or not, inside a namespace or not.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub netns: &'a Netns,
    pub cgroup: Option<&'a Path>,
}

fn probe_command(at: At<'_>) -> Command {
    let mut command = Command::new(probe_bin());
    command.arg("--netns").arg(at.netns.path());
    if let Some(cgroup) = at.cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    command
}

/// Runs each op once in a fresh probe process; one outcome ("ok", "EPERM", ...) per op.
pub fn probe(at: At<'_>, ops: &[&str]) -> Vec<String> {
    let out = probe_command(at).arg("once").args(ops).stderr(Stdio::inherit()).output().expect("run probe");
    assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), ops.len(), "probe output {lines:?}");
    lines
}

/// Starts a probe that repeats `ops` until [`Proc::finish`]; returns once the first round ran.
pub fn probe_loop(at: At<'_>, ops: &[&str]) -> Proc {
    let mut command = probe_command(at);
    command.arg("loop").args(ops);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.line(), "started");
    proc
}

/// Counts printed by a finished loop probe: op -> (ok, EPERM, other).
pub fn loop_counts(lines: &[String]) -> std::collections::BTreeMap<String, (u64, u64, u64)> {
    lines
        .iter()
        .map(|line| {
            let mut parts = line.split_whitespace();
            let op = parts.next().unwrap().to_owned();
            let mut n = parts.map(|p| p.split_once('=').unwrap().1.parse::<u64>().unwrap());
            (op, (n.next().unwrap(), n.next().unwrap(), n.next().unwrap()))
        })
        .collect()
}

/// Starts a server (TCP listeners and UDP sockets on `addrs`) inside `netns`; returns once bound.
pub fn serve(netns: &Netns, addrs: &[&str]) -> Proc {
    let mut command = Command::new(probe_bin());
    command.arg("--netns").arg(netns.path()).arg("serve").args(addrs);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.line(), "ready");
    proc
}

/// Starts the probe's echo server on `addr` inside `netns` (TCP and UDP; it also sends a byte of
/// its own every 10 ms to each peer); returns once it listens.
pub fn echo(netns: &Netns, addr: &str) -> Proc {
    let mut command = Command::new(probe_bin());
    command.arg("--netns").arg(netns.path()).args(["echo", addr]);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.line(), "ready");
    proc
}

/// A pin dir and an agents' root cgroup of this test's own; on drop the programs are detached,
/// the pins removed, the processes left in its cgroups killed and the cgroups removed.
pub struct Site {
    pub pin_dir: PathBuf,
    pub root: PathBuf,
    pub cgroups: CgroupFs,
}

impl Site {
    pub fn new() -> Self {
        let name = unique("ztseg-test");
        let cgroups = CgroupFs::discover().unwrap();
        let root = cgroups.resolve(Path::new(&format!("{name}.slice"))).unwrap();
        Self { pin_dir: PathBuf::from("/sys/fs/bpf").join(&name), root, cgroups }
    }

    /// Creates a cgroup below the root (not registered with anything) and returns its path and id.
    pub fn cgroup(&self, name: &str) -> (PathBuf, u64) {
        let path = self.root.join(name);
        let id = ztseg::cgroup::ensure(&path).unwrap();
        (path, id)
    }
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Ok(children) = fs::read_dir(&self.root) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                // Kill what a failed test may have left, then wait for the cgroup to empty.
                let _ = fs::write(child.path().join("cgroup.kill"), "1");
                for _ in 0..200 {
                    if ztseg::cgroup::processes(&child.path()).map(|p| p.is_empty()).unwrap_or(true) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
        match ztseg::dataplane::uninstall(&self.pin_dir, &self.root) {
            Ok(report) if report.busy_cgroups.is_empty() => {}
            Ok(report) => eprintln!("warning: cgroups still busy: {:?}", report.busy_cgroups),
            Err(e) => {
                eprintln!("warning: cleanup of {} failed: {e}", self.pin_dir.display());
                let _ = fs::remove_dir_all(&self.pin_dir);
            }
        }
    }
}

/// Whether `ready` came true within a minute while `child` ran.
fn wait_until(child: &mut Child, ready: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if ready() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// A binary cargo built next to the test binaries (`ztseg` is built by `cargo xtask test`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(bin.exists(), "{} is missing; run the tests with `cargo xtask test`", bin.display());
    bin
}

/// A scratch directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        fs::create_dir_all(&path).unwrap();
        // Agents run as `nobody` and read probe binaries, not this dir; keep it private.
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running `ztseg daemon` on a private config: its own pin dir and agents' root (from a
/// [`Site`]), policy dir, state dir, audit log and socket. Killed on drop.
pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub policy_dir: PathBuf,
    pub audit_log: PathBuf,
    pub key: PathBuf,
    pub issuer: String,
    /// A copy of the probe that agents (user `nobody`) can execute wherever the repo lives.
    pub probe: PathBuf,
    /// A copy of `ztseg` that other users can execute: the checkout may sit under a directory
    /// only root can enter (root's home, a `mktemp -d` folder).
    pub ztseg_for_others: PathBuf,
    child: Option<Child>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Where stderr went, when a file (then [`Daemon::log`] reads it).
    log_file: Option<PathBuf>,
    /// The network namespace the daemon runs in (its DNS proxy serves the agents there), by
    /// name; the host's when `None`.
    pub netns: Option<String>,
    /// The DNS proxy's port (unique per daemon, so daemons of concurrent tests never clash).
    pub dns_port: u16,
}

/// A DNS proxy port of this test process's own, outside the ephemeral range.
fn unique_dns_port() -> u16 {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    10_000 + ((std::process::id() % 1000) * 16 + n % 16) as u16
}

/// What the daemon logs once it serves: the harness waits for it.
pub const READY_LINE: &str = "ztseg daemon ready";

/// Where a launched daemon's stderr goes.
#[derive(Clone, Copy)]
pub enum LogTo<'a> {
    /// A pipe the harness reads (what [`Daemon::launch`] does).
    Pipe,
    /// A file, created or emptied first.
    File(&'a Path),
    /// A pseudo-terminal, whose other end the harness reads.
    Terminal,
    /// The journal's stream (`JOURNAL_STREAM` set to the journal's stderr file) with the
    /// journal's socket this fake one, in a mount namespace of the daemon's own.
    Journal(&'a FakeJournal),
}

impl Daemon {
    /// The daemon's process id (0 once it was stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Writes a config for `site` under `dir`, makes an issuer key, and starts the daemon.
    pub fn start(site: &Site, dir: &Path) -> Self {
        Self::start_with(site, dir, "")
    }

    /// The same, with `extra` top-level config keys (e.g. `control_group = "nogroup"`).
    pub fn start_with(site: &Site, dir: &Path, extra: &str) -> Self {
        let mut daemon = Self::configure(site, dir, extra);
        daemon.launch();
        daemon
    }

    /// Writes the config and the issuer key as [`Daemon::start_with`] does, without starting the
    /// daemon ([`Daemon::launch_logging_to`] starts it).
    pub fn configure(site: &Site, dir: &Path, extra: &str) -> Self {
        Self::configure_with_dns(site, dir, extra, "")
    }

    /// [`Daemon::configure`] with `dns` (lines) added to the config's `[dns]` table.
    pub fn configure_with_dns(site: &Site, dir: &Path, extra: &str, dns: &str) -> Self {
        let dns_port = unique_dns_port();
        let policy_dir = dir.join("policies");
        let keys = dir.join("keys");
        fs::create_dir_all(&policy_dir).unwrap();
        let out = Command::new(bin("ztseg")).args(["token", "keygen", "--out"]).arg(&keys).output().unwrap();
        assert!(out.status.success(), "token keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        let root = site.root.strip_prefix(site.cgroups.mount()).unwrap();
        let config = dir.join("ztseg.toml");
        let issuer = "test-orchestrator".to_owned();
        fs::write(
            &config,
            format!(
                "{extra}\npolicy_dir = {policy:?}\nstate_dir = {state:?}\naudit_log = {audit:?}\nsocket = {socket:?}\n\
                 pin_dir = {pins:?}\ncgroup_root = {root:?}\nmax_ttl_seconds = 3600\nleeway_seconds = 0\n\n\
                 [[issuers]]\niss = {issuer:?}\nkey = {jwks:?}\nalgorithms = [\"EdDSA\"]\n\n\
                 [dns]\nport = {dns_port}\n{dns}\n",
                policy = policy_dir,
                state = dir.join("state"),
                audit = dir.join("audit/audit.jsonl"),
                socket = dir.join("ztseg.sock"),
                pins = site.pin_dir,
                root = root,
                jwks = keys.join("jwks.json"),
            ),
        )
        .unwrap();
        let probe = dir.join("agent-probe");
        let ztseg_for_others = dir.join("ztseg");
        fs::copy(probe_bin(), &probe).unwrap();
        fs::copy(bin("ztseg"), &ztseg_for_others).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&ztseg_for_others, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self {
            probe,
            ztseg_for_others,
            dir: dir.to_owned(),
            socket: dir.join("ztseg.sock"),
            audit_log: dir.join("audit/audit.jsonl"),
            config,
            policy_dir,
            key: keys.join("ed25519.pem"),
            issuer,
            child: None,
            log: Default::default(),
            log_file: None,
            netns: None,
            dns_port,
        }
    }

    /// Starts the daemon inside `netns` (where its DNS proxy then serves the agents that run
    /// there) and returns once it is ready.
    pub fn launch_in(&mut self, netns: &Netns) {
        self.netns = Some(netns.name.clone());
        self.launch();
    }

    /// Starts the daemon process and returns once it says it is ready.
    pub fn launch(&mut self) {
        self.launch_logging_to(LogTo::Pipe, &[]);
    }

    /// Starts the daemon process with its stderr on `to` and `env` added to its environment;
    /// returns once its log says it is ready. [`Daemon::log`] then has what it wrote there.
    pub fn launch_logging_to(&mut self, to: LogTo<'_>, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "daemon already running");
        let mut command = Command::new(bin("ztseg"));
        if let Some(netns) = &self.netns {
            // Its network namespace only (`ip netns exec` would also mount a sysfs of the
            // namespace's own over /sys, hiding the cgroup2 and bpf mounts the daemon needs).
            let ns = fs::File::open(PathBuf::from("/run/netns").join(netns)).unwrap();
            // SAFETY: the closure makes one system call on a descriptor opened before the fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                })
            };
        }
        command.args(["daemon", "--config"]).arg(&self.config).env("ZTSEG_LOG", "info").stdout(Stdio::null());
        command.envs(env.iter().copied());
        self.log_file = None;
        let mut terminal = None;
        match to {
            LogTo::Pipe => {
                command.stderr(Stdio::piped());
            }
            LogTo::File(path) => {
                command.stderr(fs::File::create(path).unwrap());
                self.log_file = Some(path.to_owned());
            }
            LogTo::Terminal => {
                let pty = nix::pty::openpty(None, None).unwrap();
                command.stderr(pty.slave);
                terminal = Some(fs::File::from(pty.master));
            }
            LogTo::Journal(journal) => {
                command.stderr(fs::OpenOptions::new().append(true).open(journal.stderr()).unwrap());
                command.env("JOURNAL_STREAM", journal.stream());
                // SAFETY: the closure makes system calls only, on strings made before the fork.
                unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, journal.enter()) };
                self.log_file = Some(journal.stderr());
            }
        }
        let mut child = command.spawn().unwrap();
        // Our copy of a terminal's daemon end: closed, so that reading ends when the daemon exits.
        drop(command);
        let stderr: Option<Box<dyn std::io::Read + Send>> = match (terminal, child.stderr.take()) {
            (Some(terminal), _) => Some(Box::new(terminal)),
            (None, Some(pipe)) => Some(Box::new(pipe)),
            (None, None) => None,
        };
        let up = match (stderr, to) {
            (Some(stderr), _) => self.read_log(stderr),
            // In the journal, or on stderr should the daemon find no journal.
            (None, LogTo::Journal(journal)) => wait_until(&mut child, || {
                journal.entries().iter().any(|e| e.get("MESSAGE").is_some_and(|m| m.contains(READY_LINE)))
                    || self.log().contains(READY_LINE)
            }),
            (None, _) => wait_until(&mut child, || self.log().contains(READY_LINE)),
        };
        self.child = Some(child);
        assert!(up, "daemon did not become ready:\n{}", self.log());
    }

    /// Collects the lines of `stderr` into the log; whether the ready line came within a minute.
    fn read_log(&self, stderr: Box<dyn std::io::Read + Send>) -> bool {
        let log = self.log.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            // A terminal's reads end in EIO once the daemon closes its end.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(READY_LINE)
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        ready_rx.recv_timeout(std::time::Duration::from_secs(60)).is_ok()
    }

    /// SIGKILLs the daemon (a crash), leaving pins and state as they are.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the daemon and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            // A test that failed while the daemon was frozen must not wait for it forever.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = child.wait();
        }
    }

    /// SIGSTOPs the daemon (it stops draining the event ring buffer) or SIGCONTs it.
    pub fn freeze(&self, frozen: bool) {
        let child = self.child.as_ref().expect("daemon running");
        let signal =
            if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    /// The audit sequence number the next record will get (`ztseg status`).
    pub fn next_seq(&self) -> u64 {
        let (code, out, err) = self.ztseg(&["status"]);
        assert_eq!(code, 0, "status failed: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["audit_next_seq"].as_u64().unwrap()
    }

    /// Follows the event stream and returns every record with `seq >= from` up to and including
    /// the first one matching `last`. Panics after 60 s.
    pub fn collect_events(
        &self,
        from: u64,
        last: impl Fn(&serde_json::Value) -> bool + Send + 'static,
    ) -> Vec<serde_json::Value> {
        let mut child = Command::new(bin("ztseg"))
            .args(["events", "--follow"])
            .env(ztseg::control::SOCKET_ENV, &self.socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut records = Vec::new();
            for line in stdout.lines().map_while(Result::ok) {
                let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if record["seq"].as_u64().is_none_or(|s| s < from) {
                    continue;
                }
                let done = last(&record);
                records.push(record);
                if done {
                    let _ = tx.send(records);
                    return;
                }
            }
        });
        let found = rx.recv_timeout(std::time::Duration::from_secs(60));
        let _ = child.kill();
        let _ = child.wait();
        found.unwrap_or_else(|_| panic!("timed out collecting events\n{}", self.log()))
    }

    /// Waits until the audit log is synced to disk up to `seq`: the signed head file next to it
    /// names the last durable record. The daemon flushes every 200 ms; panics after 30 s.
    pub fn wait_durable(&self, seq: u64) {
        let head = ztseg::audit::head_path(&self.audit_log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let durable = fs::read(&head)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|h| h["seq"].as_u64());
            if durable.is_some_and(|d| d >= seq) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "record {seq} never became durable");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What the daemon logged: every line since it was made, or the log file of its last
    /// [`LogTo::File`] launch, whole.
    pub fn log(&self) -> String {
        match &self.log_file {
            Some(path) => String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned(),
            None => self.log.lock().unwrap().join("\n"),
        }
    }

    /// Runs `ztseg ARGS` against this daemon; returns (exit code, stdout, stderr).
    pub fn ztseg(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("ztseg"))
            .args(args)
            .env(ztseg::control::SOCKET_ENV, &self.socket)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Issues a token with the test issuer's key (`ztseg token issue`).
    pub fn issue(&self, agent: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "token",
            "issue",
            "--key",
            self.key.to_str().unwrap(),
            "--iss",
            &self.issuer,
            "--agent",
            agent,
        ];
        args.extend(extra);
        let (code, out, err) = self.ztseg(&args);
        assert_eq!(code, 0, "token issue failed: {err}");
        out.trim().to_owned()
    }

    /// Binds `agent` to `token` through a policy file (`AGENT.jwt` and `AGENT.toml`, as an
    /// orchestrator would) and waits for the grant of that very token.
    pub fn bind(&self, agent: &str, token: &str) {
        let jti = claims(token)["jti"].as_str().unwrap().to_owned();
        fs::write(self.policy_dir.join(format!("{agent}.jwt")), token).unwrap();
        self.write_policy(
            &format!("{agent}.toml"),
            &format!("[agent]\nid = {agent:?}\ntoken_file = \"{agent}.jwt\"\n"),
        );
        self.wait_event("the grant", move |r| r["event"] == "token_granted" && r["jti"] == jti.as_str());
    }

    /// Issues a token for `agent` with `grant` (token issue options) and binds it; returns it.
    pub fn bind_new(&self, agent: &str, grant: &[&str]) -> String {
        let token = self.issue(agent, grant);
        self.bind(agent, &token);
        token
    }

    /// Writes a policy file atomically (as an orchestrator should: temp file, then rename).
    pub fn write_policy(&self, name: &str, text: &str) {
        let tmp = self.policy_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.policy_dir.join(name)).unwrap();
    }

    /// `ztseg agents --json`, as JSON text.
    pub fn agents(&self) -> String {
        let (code, out, err) = self.ztseg(&["agents", "--json"]);
        assert_eq!(code, 0, "agents failed: {err}");
        out
    }

    /// Waits for the first record of the daemon's event stream (`ztseg events --follow`, which
    /// starts with the recent backlog) that satisfies `matches`, and returns it. Panics after 30 s.
    pub fn wait_event(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool + Send + 'static,
    ) -> serde_json::Value {
        let mut child = Command::new(bin("ztseg"))
            .args(["events", "--follow"])
            .env(ztseg::control::SOCKET_ENV, &self.socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Ok(record) = serde_json::from_str::<serde_json::Value>(&line)
                    && matches(&record)
                {
                    let _ = tx.send(record);
                    return;
                }
            }
        });
        let found = rx.recv_timeout(std::time::Duration::from_secs(30));
        let _ = child.kill();
        let _ = child.wait();
        found.unwrap_or_else(|_| panic!("timed out waiting for {what}\n{}", self.log()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `ztseg run --agent AGENT [--token FILE] -- ztseg-probe once OPS...` inside `netns`;
/// returns (exit code, probe outcomes, stderr).
pub fn run_agent(
    daemon: &Daemon,
    netns: &Netns,
    agent: &str,
    token: Option<&Path>,
    ops: &[&str],
) -> (i32, Vec<String>, String) {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &netns.name]).arg(bin("ztseg")).args(["run", "--agent", agent]);
    if let Some(token) = token {
        command.arg("--token").arg(token);
    }
    command.arg("--").arg(&daemon.probe).arg("once").args(ops);
    let out = command.env(ztseg::control::SOCKET_ENV, &daemon.socket).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `ztseg ARGS...` inside `netns` against `daemon`, as a process whose output the test reads.
pub fn spawn_in_netns(netns: &Netns, daemon: &Daemon, args: &[&str]) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &netns.name])
        .arg(bin("ztseg"))
        .args(args)
        .env(ztseg::control::SOCKET_ENV, &daemon.socket);
    Proc::spawn(command)
}

/// Starts `ztseg run ... -- ztseg-probe loop OPS...` inside `netns`; returns once it runs.
pub fn run_agent_loop(daemon: &Daemon, netns: &Netns, agent: &str, ops: &[&str]) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &netns.name])
        .arg(bin("ztseg"))
        .args(["run", "--agent", agent, "--"])
        .arg(&daemon.probe)
        .arg("loop")
        .args(ops)
        .env(ztseg::control::SOCKET_ENV, &daemon.socket);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.line(), "started");
    proc
}

/// Starts `ztseg run --agent AGENT -- CMD...` inside `netns` with extra environment `env`, as a
/// process whose output the test reads.
pub fn spawn_agent(
    daemon: &Daemon,
    netns: &Netns,
    agent: &str,
    cmd: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> Proc {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &netns.name])
        .arg(bin("ztseg"))
        .args(["run", "--agent", agent, "--"])
        .args(cmd)
        .envs(env.iter().copied())
        .env(ztseg::control::SOCKET_ENV, &daemon.socket);
    Proc::spawn(command)
}

/// Waits for the wall clock to pass `iat`, so the next token issued is strictly newer than one
/// issued at `iat` (a revocation refuses tokens issued up to the revoked one's second).
pub fn after_second(iat: u64) {
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() <= iat {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The claims of a token, decoded without verification (test bookkeeping only).
pub fn claims(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.trim().split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap())
        .unwrap()
}
