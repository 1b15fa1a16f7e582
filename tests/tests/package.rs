//! The Debian package `cargo xtask package` builds (here from the test build's binary, with the
//! same code): installed on this machine with dpkg, its unit verified (or started, where systemd
//! runs), the installed daemon run with the installed config until its control socket answers,
//! then removed and purged: no file, pin or cgroup of it is left.
//!
//! This is the one test on the default paths (`/etc/ztseg`, `/sys/fs/bpf/ztseg`, `ztseg.slice`,
//! `/run/ztseg`, ...): every other test and the bench take a pin dir, cgroup and socket of their
//! own. A lock file keeps two runs of it apart (two checkouts on one machine), and it refuses to
//! touch a machine where ztseg is already installed or has left anything. A guard purges the
//! package, detaches what the daemon pinned (with `ztseg uninstall`) and removes the directories
//! even when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use xtask::package::{self, Compression};
use ztseg::{cgroup::CgroupFs, config::Config};
use ztseg_integration::{READY_LINE, TempDir, bin};

/// The installed binary (by a constant: it comes from our package, not from a Debian one).
const INSTALLED: &str = package::BINARY;
const LOCK: &str = "/run/lock/ztseg-package-test.lock";
const PIN_DIR: &str = "/sys/fs/bpf/ztseg";
/// What dpkg, the maintainer scripts (deb-systemd-helper) and the daemon make outside the files
/// the package lists; none may exist before the test nor after the purge.
const MADE: &[&str] = &[
    "/etc/ztseg",
    "/var/lib/ztseg",
    "/var/log/ztseg",
    "/run/ztseg",
    PIN_DIR,
    "/etc/systemd/system/multi-user.target.wants/ztseg.service",
    "/etc/systemd/system/ztseg.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/ztseg.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/ztseg.service",
    "/var/lib/systemd/deb-systemd-helper-masked/ztseg.service",
];

/// Runs `command` (never with a `ZTSEG_SOCKET` of the caller's: clients find the socket
/// through the installed config).
fn run(command: &mut Command) -> Output {
    command.env_remove(ztseg::control::SOCKET_ENV).output().unwrap()
}

/// Runs `command`, which must succeed; its stdout.
fn succeed(command: &mut Command) -> String {
    let out = run(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's status of the package: "install ok installed", "deinstall ok config-files", or None
/// when dpkg does not know it (never installed, or purged).
fn package_status() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", package::NAME]));
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !status.ends_with("not-installed")).then_some(status)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The agents' root of the default config.
fn cgroup_root() -> PathBuf {
    CgroupFs::discover().unwrap().resolve(&Config::default().cgroup_root).unwrap()
}

/// Every trace of ztseg this test looks for: what is made outside the package, and the agents'
/// root cgroup.
fn traces() -> Vec<PathBuf> {
    MADE.iter().map(PathBuf::from).chain([cgroup_root()]).collect()
}

/// Holds the machine for this test: an exclusive lock, and on drop (when the test did not
/// finish cleanly) stops the daemon it started, purges the package, detaches what is pinned with
/// the test build's `ztseg uninstall`, and removes what is left of the paths this test made.
struct Machine {
    _lock: nix::fcntl::Flock<fs::File>,
    scratch: TempDir,
    daemon: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    clean: bool,
}

impl Machine {
    /// Waits for any other run of this test, then refuses a machine that has ztseg on it.
    fn take() -> Self {
        fs::create_dir_all(Path::new(LOCK).parent().unwrap()).unwrap();
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(LOCK).unwrap();
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock");
        let present: Vec<PathBuf> = traces()
            .into_iter()
            .chain([INSTALLED.into(), package::UNIT.into()])
            .filter(|p| exists(p))
            .collect();
        assert!(
            present.is_empty() && package_status().is_none(),
            "this machine already has ztseg (dpkg: {:?}; present: {present:?}): this test installs \
             and purges the package on the default paths and would destroy it; run it elsewhere, \
             or purge ztseg and `ztseg uninstall` first",
            package_status()
        );
        Self {
            _lock: lock,
            scratch: TempDir::new("ztseg-package"),
            daemon: None,
            log: Default::default(),
            clean: false,
        }
    }

    /// Starts the installed daemon with the installed config; returns once it says it is ready.
    fn start_daemon(&mut self) {
        let mut child = Command::new(INSTALLED)
            .args(["daemon", "--config", package::CONFIG])
            .env("ZTSEG_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        self.daemon = Some(child);
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(READY_LINE)
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        let up = ready_rx.recv_timeout(Duration::from_secs(60)).is_ok();
        assert!(up, "the installed daemon did not become ready:\n{}", self.log());
    }

    /// SIGTERMs the daemon and waits for it; it must exit cleanly.
    fn stop_daemon(&mut self) {
        let mut child = self.daemon.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "the daemon stopped with {status}:\n{}", self.log());
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Puts the machine back as it was; the problems met on the way.
    fn restore(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        if package_status().is_some() {
            let out = run(Command::new("dpkg").args(["--purge", package::NAME]));
            if !out.status.success() {
                problems.push(format!("dpkg --purge: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        if exists(Path::new(PIN_DIR)) || exists(&cgroup_root()) {
            // Detached by ztseg itself, never by deleting files on bpffs.
            let defaults = self.scratch.path.join("defaults.toml");
            fs::write(&defaults, "").unwrap();
            let out = run(Command::new(bin("ztseg")).arg("uninstall").arg("--config").arg(&defaults));
            if !out.status.success() {
                problems.push(format!("ztseg uninstall: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        for path in MADE.iter().map(Path::new).filter(|p| exists(p) && !p.starts_with("/sys")) {
            let removed = if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(path)
            } else {
                fs::remove_file(path)
            };
            if let Err(e) = removed {
                problems.push(format!("cannot remove {}: {e}", path.display()));
            }
        }
        problems
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        let problems = self.restore();
        // A guard that cannot put the machine back fails the test (unless it already failed).
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("the package test could not restore the machine: {problems:#?}");
        }
        if !problems.is_empty() {
            eprintln!("the package test could not restore the machine: {problems:#?}");
        }
    }
}

fn mode_and_owner(path: &str) -> (u32, u32, u32) {
    let meta = fs::metadata(path).unwrap();
    (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid())
}

/// The packaged default config is valid and, uncommented, shows the built-in defaults: each
/// commented key's value is the default, so the file documents what the daemon does.
#[test]
fn the_default_config_is_the_built_in_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/ztseg.toml");
    let text = fs::read_to_string(path).unwrap();
    assert_eq!(Config::parse(&text, Path::new(path)).unwrap(), Config::default());
    // Uncomment the settings (`# key = value`, `# [table]`), not the prose.
    fn setting(line: &str) -> Option<&str> {
        line.strip_prefix("# ").filter(|rest| {
            rest.starts_with('[')
                || rest
                    .split_once(" = ")
                    .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        })
    }
    let uncommented: String =
        text.lines().map(|line| setting(line).unwrap_or(line)).collect::<Vec<_>>().join("\n");
    assert!(text.lines().filter(|l| setting(l).is_some()).count() >= 20, "the settings were not found");
    let config = Config::parse(&uncommented, Path::new(path)).unwrap();
    let mut expected = Config { control_group: Some("ztseg".into()), ..Config::default() };
    expected.issuers = config.issuers.clone();
    assert_eq!(config, expected);
    // The issuer it suggests is the one the docs use, on a key file the operator puts in place.
    assert_eq!(config.issuers.len(), 1);
    assert_eq!(config.issuers[0].key, Path::new("/etc/ztseg/keys/orchestrator.jwks.json"));
}

#[test]
fn the_package_installs_runs_and_purges_without_a_trace() {
    let mut machine = Machine::take();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let built = std::time::Instant::now();
    let deb = package::build(root, &bin("ztseg"), &machine.scratch.path, Compression::Fast).unwrap();
    eprintln!("packaged in {:.1} s", built.elapsed().as_secs_f64());
    let fields = succeed(Command::new("dpkg-deb").arg("--field").arg(&deb).args(["Package", "Depends"]));
    assert!(fields.contains("Package: ztseg") && fields.contains("Depends: libc6 (>= 2."), "{fields}");

    succeed(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(package_status().as_deref(), Some("install ok installed"));
    let listed: Vec<PathBuf> =
        succeed(Command::new("dpkg-query").args(["-L", package::NAME])).lines().map(PathBuf::from).collect();
    for path in [INSTALLED, package::UNIT, package::CONFIG, "/usr/share/man/man1/ztseg.1.gz"]
        .iter()
        .chain(&["/usr/share/bash-completion/completions/ztseg", "/usr/share/doc/ztseg/copyright"])
    {
        assert!(listed.contains(&PathBuf::from(path)), "{path} is not in the package: {listed:?}");
        assert!(exists(Path::new(path)), "{path} was not installed");
    }
    let conffiles = succeed(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", package::NAME]));
    assert!(conffiles.contains(package::CONFIG), "{conffiles}");
    assert_eq!(mode_and_owner("/var/lib/ztseg"), (0o700, 0, 0));
    assert_eq!(mode_and_owner("/var/log/ztseg"), (0o750, 0, 0));
    assert_eq!(mode_and_owner(package::POLICY_DIR), (0o750, 0, 0));
    assert_eq!(mode_and_owner("/etc/ztseg/keys"), (0o755, 0, 0));
    assert_eq!(mode_and_owner(INSTALLED), (0o755, 0, 0));
    // postinst enabled the unit as deb-systemd-helper does, for multi-user.target.
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/ztseg.service");
    assert_eq!(fs::read_link(wants).unwrap(), Path::new(package::UNIT));
    let unit = fs::read_to_string(package::UNIT).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/ztseg daemon --config /etc/ztseg/ztseg.toml\n"), "{unit}");

    // The unit as systemd reads it (ExecStart must exist: it is the installed binary).
    let verify = run(Command::new("systemd-analyze").args(["verify", package::UNIT]));
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && !complaints.contains("ztseg.service"), "{complaints}");

    let status = if systemd_runs() {
        // postinst started the unit (deb-systemd-invoke); it reports ready once it serves.
        succeed(Command::new("systemctl").args(["is-active", "ztseg.service"]));
        succeed(Command::new(INSTALLED).arg("status"))
    } else {
        // No systemd here (PID 1 is not it): the installed daemon with the installed config.
        machine.start_daemon();
        assert!(machine.log().contains("no [[issuers]] configured"), "{}", machine.log());
        // The client finds the socket through the installed config, as an operator's would.
        succeed(Command::new(INSTALLED).arg("status"))
    };
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pin_dir"], PIN_DIR, "{status}");
    assert_eq!(status["policy_dir"], package::POLICY_DIR, "{status}");
    // Positive controls for the purge: the daemon pinned, made the agents' root, keyed and
    // logged.
    for path in [
        Path::new(PIN_DIR).join("agents"),
        Path::new(PIN_DIR).join("links/connect4"),
        cgroup_root(),
        PathBuf::from("/var/lib/ztseg/host-key.pem"),
        PathBuf::from("/var/log/ztseg/audit.jsonl"),
        PathBuf::from("/run/ztseg/ztseg.sock"),
    ] {
        assert!(exists(&path), "{} is missing while the daemon runs", path.display());
    }
    if !systemd_runs() {
        machine.stop_daemon();
    }

    // Remove: the binary goes, the config stays, and enforcement stays pinned (as when the
    // daemon stops); nothing is detached without a purge.
    succeed(Command::new("dpkg").args(["--remove", package::NAME]));
    assert_eq!(package_status().as_deref(), Some("deinstall ok config-files"));
    assert!(!exists(Path::new(INSTALLED)) && !exists(Path::new(package::UNIT)));
    assert!(exists(Path::new(package::CONFIG)));
    assert!(exists(&Path::new(PIN_DIR).join("links/connect4")) && exists(&cgroup_root()));

    // Purge: `ztseg uninstall` detaches and unpins, then the state and log go.
    let purge = succeed(Command::new("dpkg").args(["--purge", package::NAME]));
    assert!(purge.contains(&format!("map pins from {PIN_DIR}")), "{purge}");
    assert_eq!(package_status(), None);
    let left: Vec<PathBuf> = listed
        .iter()
        .filter(|p| p.to_string_lossy().contains("ztseg"))
        .cloned()
        .chain(traces())
        .filter(|p| exists(p))
        .collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
    machine.clean = true;
}
