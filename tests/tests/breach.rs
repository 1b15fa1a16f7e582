//! Assume breach: a compromised agent, started with `ztseg run`, tries to take over another
//! agent or to leave its box by every way the network hooks do not see. Each technique is tried
//! from inside an agent (it must fail) and from outside any agent as root (it must work: the
//! positive control that shows the probe and its target are real).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{ffi::OsStr, fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use serde_json::Value;
use ztseg_integration::{At, Daemon, Netns, Proc, Site, TempDir, probe, run_agent, serve, spawn_agent};

/// alpha may reach 10.77.0.1:8001; beta every TCP port of 10.77.0.0/24 and UDP 10.77.0.1:8002.
const CATALOGUE: &str = r#"
[baseline]
allow = [{ to = "10.77.0.53/32", ports = [53], proto = "udp" }]

[scopes."read:db"]
allow = [{ to = "10.77.0.1/32", ports = [8001], proto = "tcp" }, { to = "db.test", ports = [8001], proto = "tcp" }]

[tools.net]
allow = [{ to = "10.77.0.0/24", proto = "tcp" }, { to = "10.77.0.1/32", ports = [8002], proto = "udp" }]
"#;

struct World {
    daemon: Daemon,
    ns: Netns,
    site: Site,
    _server: Proc,
    _dir: TempDir,
}

fn world() -> World {
    let site = Site::new();
    let dir = TempDir::new("ztseg-breach");
    let ns = Netns::new(&["10.77.0.1/32", "10.77.0.53/32"]);
    let server = serve(&ns, &["10.77.0.1:8001", "10.77.0.1:8002"]);
    // nogroup (gid 65534) may use the control socket: the tests show what such a member may not do.
    // The daemon runs in the namespace, so its DNS proxy serves the agents there, and asks the
    // namespace's resolver.
    let mut daemon = Daemon::configure_with_dns(
        &site,
        &dir.path,
        "control_group = \"nogroup\"",
        "upstream = [\"10.77.0.53:53\"]",
    );
    daemon.launch_in(&ns);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    let world = World { daemon, ns, site, _server: server, _dir: dir };
    world.daemon.bind_new("alpha", &["--scope", "read:db"]);
    world.daemon.bind_new("beta", &["--tool", "net"]);
    world
}

impl World {
    fn agent(&self, id: &str) -> Value {
        let agents: Value = serde_json::from_str(&self.daemon.agents()).unwrap();
        agents.as_array().unwrap().iter().find(|a| a["agent"] == id).unwrap().clone()
    }

    /// Runs the probe's `once OPS` as agent `id`; one outcome per op.
    fn inside(&self, id: &str, ops: &[&str]) -> Vec<String> {
        let (code, out, err) = run_agent(&self.daemon, &self.ns, id, None, ops);
        assert_eq!(code, 0, "ztseg run failed: {err}");
        assert_eq!(out.len(), ops.len(), "{out:?} {err}");
        out
    }

    fn outside(&self, ops: &[&str]) -> Vec<String> {
        probe(At { netns: &self.ns, cgroup: None }, ops)
    }

    /// Starts the probe in `mode ARGS` as agent `id`.
    fn spawn(&self, id: &str, mode: &[&str]) -> Proc {
        let mut cmd: Vec<&OsStr> = vec![self.daemon.probe.as_os_str()];
        cmd.extend(mode.iter().map(OsStr::new));
        spawn_agent(&self.daemon, &self.ns, id, &cmd, &[("SECRET", "hunter2")])
    }
}

/// One technique: what it is, the probe op alpha runs, the outcome the mechanism named in the
/// README gives it, and the control: the op run outside any agent (the same op unless it must
/// reach the target another way) and its outcome there ("ok" unless the kernel answers
/// otherwise without any filter).
struct Case {
    what: &'static str,
    op: String,
    inside: &'static str,
    control: Option<String>,
    outside: &'static str,
}

fn case(what: &'static str, op: impl Into<String>, inside: &'static str) -> Case {
    Case { what, op: op.into(), inside, control: None, outside: "ok" }
}

/// Runs every case inside alpha and outside any agent; each gives exactly its expected outcome
/// on both sides, so a refusal from another cause than the one named fails the test.
fn assert_cases(w: &World, cases: &[Case]) {
    let ops: Vec<&str> = cases.iter().map(|c| c.op.as_str()).collect();
    let controls: Vec<&str> = cases.iter().map(|c| c.control.as_deref().unwrap_or(&c.op)).collect();
    let inside = w.inside("alpha", &ops);
    let outside = w.outside(&controls);
    let mut table = String::new();
    for ((c, got), control) in cases.iter().zip(&inside).zip(&outside) {
        table.push_str(&format!("{:<52} {:<48} agent: {got:<14} outside: {control}\n", c.what, c.op));
    }
    eprintln!("{table}");
    for ((c, got), control) in cases.iter().zip(&inside).zip(&outside) {
        assert_eq!(got, c.inside, "{} from inside the agent\n{table}", c.what);
        assert_eq!(control, c.outside, "positive control: {}\n{table}", c.what);
    }
}

#[test]
fn an_agent_cannot_touch_another_agent() {
    let w = world();
    let mut beta = w.spawn("beta", &["hold", "10.77.0.1:8002"]);
    let held = beta.line();
    let fields: Vec<&str> = held.split_whitespace().collect();
    let (pid, fd) = (fields[1], fields[3]);
    // Different uids, both from the configured range, neither root nor nobody.
    let (alpha_uid, beta_uid) =
        (w.agent("alpha")["uid"].as_u64().unwrap(), w.agent("beta")["uid"].as_u64().unwrap());
    assert_ne!(alpha_uid, beta_uid);
    assert!((61184..=65519).contains(&alpha_uid) && (61184..=65519).contains(&beta_uid));
    // beta holds no capability, no group, and runs as its own uid with no_new_privs.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = u32::try_from(beta_uid).unwrap();
    assert_eq!(ztseg::sandbox::verify_dropped(&status, uid, uid), Ok(()), "{status}");
    // Positive control for that check: the test process itself (root) does not pass it.
    assert!(
        ztseg::sandbox::verify_dropped(&fs::read_to_string("/proc/self/status").unwrap(), uid, uid).is_err()
    );

    let cases = [
        case("ptrace another agent", format!("ptrace:{pid}"), "EPERM"),
        case("read another agent's environment (its secrets)", format!("environ:{pid}"), "ENOENT"),
        case("open another agent's memory", format!("mem:{pid}"), "ENOENT"),
        case("process_vm_readv another agent", format!("vmread:{pid}"), "EPERM"),
        case("take another agent's socket (pidfd_getfd)", format!("getfd:{pid}:{fd}"), "EPERM"),
        case("signal another agent", format!("signal:{pid}"), "EPERM"),
    ];
    assert_cases(&w, &cases);
    // beta is unharmed.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    beta.finish();
}

#[test]
fn an_agent_cannot_leave_its_box() {
    let w = world();
    let tag = std::process::id();
    // Host services' sockets: anyone may write to the first two (one under /run, one elsewhere),
    // only root and its group to the third (outside /run, so only its mode stops the agent).
    let elsewhere = format!("/var/lib/ztseg-test-{tag}");
    fs::create_dir_all(&elsewhere).unwrap();
    let _dir_cleanup = CleanupDir(elsewhere.clone().into());
    let run_socket = format!("/run/ztseg-test-{tag}-open.sock");
    let open_socket = format!("{elsewhere}/open.sock");
    let closed_socket = format!("{elsewhere}/closed.sock");
    let _cleanup = Cleanup(vec![run_socket.clone()]);
    // A SysV shared-memory segment anyone may open.
    let shm_key: i32 = 0x7a74_0000 | (tag as i32 & 0xffff);
    let _shm = Shm::create(shm_key);
    let mut host = Vec::new();
    for (path, mode) in [(&run_socket, 0o777), (&open_socket, 0o777), (&closed_socket, 0o770)] {
        let mut listener = Proc::spawn({
            let mut c = Command::new(ztseg_integration::probe_bin());
            c.args(["listen-unix", path]);
            c
        });
        assert_eq!(listener.line(), "ready");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        host.push(listener);
    }
    // An abstract socket beta listens on, and a path socket in beta's private /tmp.
    let abstract_name = format!("ztseg-test-{tag}-beta");
    let mut beta_abstract = w.spawn("beta", &["listen-unix", &format!("@{abstract_name}")]);
    assert_eq!(beta_abstract.line(), "ready");
    let mut beta_tmp = w.spawn("beta", &["listen-unix", "/tmp/beta.sock"]);
    assert_eq!(beta_tmp.line(), "ready");
    let beta_tmp_from_host = format!("/proc/{}/root/tmp/beta.sock", beta_tmp.pid());

    let cases = [
        case("connect to a world-writable host Unix socket in /run", format!("unix:{run_socket}"), "ENOENT"),
        case(
            "connect to a world-writable host Unix socket elsewhere",
            format!("unix:{open_socket}"),
            "ECONNREFUSED",
        ),
        case("connect to a root-only (0770) host Unix socket", format!("unix:{closed_socket}"), "EACCES"),
        case("open the host's SysV shared memory", format!("shm:{shm_key}"), "ENOENT"),
        case("type into its own terminal (TIOCSTI)", "tiocsti", "EPERM"),
        case("connect to another agent's abstract socket", format!("unix:@{abstract_name}"), "EPERM"),
        // The control reaches the same (0777) socket through beta's root.
        Case {
            control: Some(format!("unix:{beta_tmp_from_host}")),
            ..case("connect to another agent's 0777 socket in /tmp", "unix:/tmp/beta.sock", "ENOENT")
        },
        // The test's socket sits in /tmp; the default /run/ztseg is just as private to an agent.
        case("connect to the ztseg control socket", format!("unix:{}", w.daemon.socket.display()), "ENOENT"),
        case("open an AF_PACKET socket (also needs CAP_NET_RAW)", "packet", "EPERM"),
        // Any user may open sock_diag (it lists every socket of the namespace): the filter's EPERM.
        case("open an AF_NETLINK sock_diag socket", "netlink:4", "EPERM"),
        case("create a user namespace (unshare)", "userns", "EPERM"),
        case("create a network namespace (with a user namespace)", "netns", "EPERM"),
        case("create a user namespace (clone flags)", "clone-newuser", "EPERM"),
        // An empty clone3 call: the kernel says EINVAL, the filter ENOSYS before it.
        Case { outside: "EINVAL", ..case("clone3 (flags the filter cannot read)", "clone3", "ENOSYS") },
        case("set up io_uring (its ops bypass seccomp)", "io_uring", "EPERM"),
    ];
    assert_cases(&w, &cases);
    // What ordinary programs need still works inside: route netlink, and the agent's own
    // Unix sockets (here a socketpair-free connect to a listener of its own is in the Python test).
    assert_eq!(w.inside("alpha", &["netlink:0", "tcp:10.77.0.1:8001"]), ["ok", "ok"]);
    // AF_VSOCK: refused by the filter inside; outside it needs the vsock module, which this host
    // may lack, so there is no control.
    assert_eq!(w.inside("alpha", &["vsock"]), ["EPERM"]);
}

#[test]
fn an_agent_is_never_a_control_client() {
    let w = world();
    let alpha_cgroup = w.site.root.join("alpha");
    // A root process inside alpha's cgroup (what an agent that kept root would be) is refused,
    // and the refusal is in the audit log.
    let from = w.daemon.next_seq();
    let out = {
        use std::os::unix::process::CommandExt as _;
        let procs = alpha_cgroup.join("cgroup.procs");
        let mut command = Command::new(&w.daemon.ztseg_for_others);
        command.args(["revive", "alpha", "--socket"]).arg(&w.daemon.socket);
        // SAFETY: the closure only writes to a file and returns an io::Result.
        unsafe { command.pre_exec(move || fs::write(&procs, "0")) };
        command.output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("agents may not use the ztseg control socket"), "{err}");
    let records = w.daemon.collect_events(from, |r| r["event"] == "control_refused");
    let refused = records.last().unwrap();
    assert_eq!(refused["reason"], "agent_peer");
    assert!(refused["cgroup"].as_str().unwrap().ends_with("/alpha"), "{refused}");
    // Positive control: the same command from outside the agents' root works.
    let (code, _, err) = w.daemon.ztseg(&["revive", "alpha"]);
    assert_eq!(code, 0, "{err}");
    // A control_group member (nogroup) that speaks the protocol itself, skipping the client's
    // root check, is refused by the daemon and stays where it was.
    let out = {
        use std::os::unix::process::CommandExt as _;
        let script = "import json, socket, sys\n\
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
            s.sendall(b'{\"cmd\":\"run\",\"agent\":\"alpha\"}\\n')\n\
            print(json.loads(s.makefile().readline()).get('code'))\n\
            print(open('/proc/self/cgroup').read().strip().split('::')[-1])\n";
        Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&w.daemon.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let said = String::from_utf8_lossy(&out.stdout);
    let mut lines = said.lines();
    assert_eq!(lines.next(), Some("run_needs_root"), "{said} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!lines.next().unwrap().ends_with("/alpha"), "{said}");
    // And a non-root launcher cannot start an agent at all: CMD would keep its uid. The marker
    // goes where that user may write, as the positive control shows.
    let open = w.daemon.dir.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    let as_nobody = |program: &Path| {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(program);
        command.uid(65534).gid(65534);
        command
    };
    let control = open.join("control");
    assert!(as_nobody(Path::new("touch")).arg(&control).status().unwrap().success());
    assert!(control.exists());
    let marker = open.join("started");
    let out = {
        as_nobody(&w.daemon.ztseg_for_others)
            .args(["run", "--agent", "alpha", "--socket"])
            .arg(&w.daemon.socket)
            .args(["--", "touch"])
            .arg(&marker)
            .output()
            .unwrap()
    };
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be started by root"));
    assert!(!marker.exists());
}

#[test]
fn a_binding_cannot_take_over_another_agents_cgroup() {
    let w = world();
    let root = w.site.root.strip_prefix(w.site.cgroups.mount()).unwrap().display().to_string();
    let token = w.daemon.issue("mallory", &["--tool", "net"]);
    let hijack = format!("[agent]\nid = \"mallory\"\ntoken = {token:?}\ncgroup = \"{root}/beta\"\n");
    // `policy check` refuses it, naming the line.
    let file = w._dir.path.join("mallory.toml");
    fs::write(&file, &hijack).unwrap();
    let (code, _, err) = w.daemon.ztseg(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("mallory.toml:4") && err.contains("another agent's cgroup"), "{err}");
    // The daemon refuses it too and beta keeps its entry and grant.
    let from = w.daemon.next_seq();
    w.daemon.write_policy("mallory.toml", &hijack);
    w.daemon.collect_events(from, |r| r["event"] == "policy_refused");
    assert!(w.agent("beta")["tools"].to_string().contains("net"));
    assert!(!w.daemon.agents().contains("mallory"));
    // Positive control: mallory in its own cgroup is accepted.
    w.daemon.write_policy("mallory.toml", &format!("[agent]\nid = \"mallory\"\ntoken = {token:?}\n"));
    w.daemon.wait_event("mallory's grant", |r| r["event"] == "token_granted" && r["agent"] == "mallory");
}

/// A SysV shared-memory segment (mode 0666) the test made; removed on drop.
struct Shm(i32);

impl Shm {
    fn create(key: i32) -> Self {
        // SAFETY: shmget with integer arguments creates a segment we remove on drop.
        let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o666) };
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        Self(id)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: removes the segment this test created.
        unsafe { libc::shmctl(self.0, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

/// A file removed on drop (a Unix socket the test bound outside its temp dir).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// A DNS server for the tests' own zone: `db.test` is 10.77.0.1; every other name NXDOMAIN.
const DNS_SERVER: &str = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.53", 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    end = q.index(b"\x00", 12) + 5
    question, qtype = q[12:end], struct.unpack(">H", q[end - 4:end - 2])[0]
    known = question[:-4] == b"\x02db\x04test\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("10.77.0.1") if known and qtype == 1 else b""
    flags = b"\x81\x80" if known else b"\x81\x83"
    s.sendto(q[:2] + flags + b"\x00\x01" + struct.pack(">H", 1 if answer else 0) + b"\x00\x00\x00\x00" + question + answer, peer)
"#;

/// What an ordinary Python agent does: threads, a process pool and a manager (pipes, semaphores
/// in /dev/shm, a Unix socket in /tmp), a subprocess, a third-party package, and a name lookup
/// (through ztseg's DNS proxy, which asks the namespace's resolver for the granted name)
/// followed by a connect to the granted service.
const PYTHON_AGENT: &str = r#"
import multiprocessing, socket, subprocess, threading
import jwt  # a third-party package (Debian's python3-jwt)

def square(x):
    return x * x

if __name__ == "__main__":
    seen = []
    threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(seen) == [0, 1, 2, 3]
    with multiprocessing.Pool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        shared["k"] = 1
        assert shared["k"] == 1
    assert subprocess.run(["sh", "-c", "echo hi"], capture_output=True).stdout == b"hi\n"
    addr = socket.getaddrinfo("db.test", 8001, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    socket.create_connection(addr, timeout=5).close()
    print("ok", addr[0], jwt.__name__, flush=True)
"#;

#[test]
fn ordinary_python_agent_work_still_runs() {
    let w = world();
    // `ip netns exec` puts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    let netns_etc = Path::new("/etc/netns").join(&w.ns.name);
    fs::create_dir_all(&netns_etc).unwrap();
    let _cleanup = CleanupDir(netns_etc.clone());
    fs::write(netns_etc.join("resolv.conf"), "nameserver 10.77.0.53\noptions timeout:2 attempts:2\n")
        .unwrap();
    let mut dns = Proc::spawn({
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &w.ns.name, "/usr/bin/python3", "-c", DNS_SERVER]);
        c
    });
    assert_eq!(dns.line(), "ready");
    let mut agent = spawn_agent(
        &w.daemon,
        &w.ns,
        "alpha",
        &[OsStr::new("/usr/bin/python3"), OsStr::new("-c"), OsStr::new(PYTHON_AGENT)],
        &[],
    );
    assert_eq!(agent.line(), "ok 10.77.0.1 jwt");
    // Positive control for the enforcement around it: the same agent cannot reach what it was
    // not granted (beta's UDP service).
    assert_eq!(w.inside("alpha", &["udp-sendto:10.77.0.1:8002"]), ["EPERM"]);
}

/// A directory removed on drop.
struct CleanupDir(std::path::PathBuf);

impl Drop for CleanupDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
