//! The agent's box, built by `ztseg run` (as root, already inside the agent's cgroup) just
//! before it execs the agent: what the network hooks cannot see is closed here.
//!
//! | technique | closed by |
//! | --- | --- |
//! | ptrace, /proc/PID/mem and environ, process_vm_readv, pidfd_getfd, signals to other agents | its own uid (the kernel's permission checks), seccomp, Landlock signal scope |
//! | other processes in /proc | a private procfs mounted with `hidepid=invisible` |
//! | abstract Unix sockets outside the agent | Landlock abstract-socket scope |
//! | path Unix sockets of the host | its own uid with no groups (needs o+w); an empty /run (only the resolver config kept); other world-writable host sockets masked in its mount namespace |
//! | files and sockets of other agents in /tmp, /var/tmp, /dev/shm, /run/lock | a private tmpfs on each |
//! | SysV IPC and POSIX message queues of the host or other agents | its own IPC namespace |
//! | typing into the launcher's terminal (TIOCSTI), reading it | a new session (no controlling terminal), seccomp on those ioctls |
//! | AF_PACKET, AF_VSOCK, AF_NETLINK (but route), other families | seccomp (socket, socketpair) |
//! | x32 or 32-bit syscall numbers for any of these | seccomp: other ABIs refused outright |
//! | new user/network/mount namespaces, setns | seccomp (unshare, clone flags, clone3, setns) |
//! | io_uring (its operations bypass seccomp), bpf, perf_event_open, keyrings, mounts | seccomp |
//! | capabilities, setuid binaries | no capabilities in any set, bounding set empty, no_new_privs |

use std::{collections::BTreeMap, fs, io, os::unix::fs::FileTypeExt as _, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
    unistd::{Gid, Uid},
};

/// What failed while building the box; CMD is then not started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot make the agent's private mounts ({what}): {source}")]
    Mounts { what: String, source: nix::Error },
    #[error("cannot drop privileges to uid {uid}: {what}: {source}")]
    Privileges { uid: u32, what: &'static str, source: io::Error },
    #[error("privileges remain after dropping them to uid {uid}: {what}; CMD is not started")]
    Remaining { uid: u32, what: String },
    #[error("cannot leave the launcher's terminal: {0}")]
    Terminal(io::Error),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error(
        "cannot restrict the agent with Landlock (abstract Unix socket and signal scopes need Linux 6.12 or later): {0}"
    )]
    Landlock(String),
    #[error("cannot install the agent's seccomp filter: {0}")]
    Seccomp(String),
}

/// Where the host's resolver configuration may point (systemd-resolved's stub file, for one):
/// kept visible under the agent's empty /run.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A private mount and IPC namespace: its own /tmp, /var/tmp, /dev/shm and /run (empty but for
/// the resolver configuration), a /proc that shows only the agent's own processes, the host's
/// other world-writable Unix sockets masked, and SysV IPC and POSIX message queues of its own.
pub fn private_mounts() -> Result<(), SandboxError> {
    let fail = |what: &str| {
        let what = what.to_owned();
        move |source| SandboxError::Mounts { what, source }
    };
    // The resolver file, found before /run is covered.
    let resolver = fs::canonicalize(RESOLV_CONF).ok().filter(|p| p.starts_with("/run"));
    let resolver_copy = resolver.as_ref().and_then(|p| fs::File::open(p).ok());
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC).map_err(fail("unshare"))?;
    // Host mounts still reach the agent; nothing the agent's namespace does reaches the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(fail("/ as slave"))?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (dir, mode) in
        [("/tmp", "mode=1777"), ("/var/tmp", "mode=1777"), ("/dev/shm", "mode=1777"), ("/run", "mode=0755")]
    {
        if Path::new(dir).is_dir() {
            mount(Some("tmpfs"), dir, Some("tmpfs"), hardened, Some(mode)).map_err(fail(dir))?;
        }
    }
    if let (Some(path), Some(file)) = (resolver, resolver_copy) {
        keep_resolver(&path, &file).map_err(fail("the resolver configuration"))?;
    }
    // POSIX message queues live in the mqueue filesystem of the IPC namespace.
    if Path::new("/dev/mqueue").is_dir() {
        mount(Some("mqueue"), "/dev/mqueue", Some("mqueue"), hardened | MsFlags::MS_NOEXEC, None::<&str>)
            .map_err(fail("/dev/mqueue"))?;
    }
    mount(Some("proc"), "/proc", Some("proc"), hardened | MsFlags::MS_NOEXEC, Some("hidepid=invisible"))
        .map_err(fail("/proc"))?;
    for socket in world_writable_sockets() {
        match mount(Some("/dev/null"), socket.as_str(), None::<&str>, MsFlags::MS_BIND, None::<&str>) {
            // Gone since it was listed, or under one of the private dirs above: nothing to mask.
            Ok(()) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(fail(&socket)(e)),
        }
    }
    Ok(())
}

/// Puts the resolver file `path` (under /run, now an empty tmpfs) back, read-only, from the
/// descriptor opened before /run was covered.
fn keep_resolver(path: &Path, file: &fs::File) -> Result<(), nix::Error> {
    use std::os::fd::AsRawFd as _;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    }
    fs::File::create(path).map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let source = format!("/proc/self/fd/{}", file.as_raw_fd());
    mount(Some(source.as_str()), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
}

/// Bound path sockets that any uid may connect to: those of this network namespace and of the
/// host's (pid 1's), as /proc/PID/net/unix lists them. A path socket reaches across network
/// namespaces, so an agent in a namespace of its own can still connect to the host's.
fn world_writable_sockets() -> Vec<String> {
    let table = ["/proc/self/net/unix", "/proc/1/net/unix"]
        .iter()
        .map(|p| fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter(|path| path.starts_with('/'))
        .filter(|path| {
            fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt as _;
                m.file_type().is_socket() && m.permissions().mode() & 0o002 != 0
            })
        })
        .map(str::to_owned)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Leaves the launcher's terminal: a new session when this process can start one, else
/// TIOCNOTTY (a process group leader, e.g. a shell's foreground job, cannot call setsid). Then
/// /dev/tty must no longer open.
pub fn detach_terminal() -> Result<(), SandboxError> {
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    let fail = |source: io::Error| SandboxError::Terminal(source);
    let open_tty =
        || fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/tty");
    if nix::unistd::setsid().is_err()
        && let Ok(tty) = open_tty()
    {
        // SAFETY: TIOCNOTTY takes no argument and only detaches this process from the terminal.
        check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCNOTTY) }.into()).map_err(fail)?;
    }
    match open_tty() {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(fail(e)),
        Ok(_) => Err(fail(io::Error::other("/dev/tty still opens"))),
    }
}

fn os(what: &'static str, uid: u32) -> impl Fn(io::Error) -> SandboxError {
    move |source| SandboxError::Privileges { uid, what, source }
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities in any set, then checks
/// /proc/self/status says so.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    nix::unistd::setgroups(&[]).map_err(|e| os("setgroups", uid)(e.into()))?;
    let last_cap: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(os("reading cap_last_cap", uid))?
        .trim()
        .parse()
        .map_err(|_| os("reading cap_last_cap", uid)(io::Error::other("not a number")))?;
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only changes this process's bounding set.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) }.into())
            .map_err(os("dropping the bounding set", uid))?;
    }
    // SAFETY: as above, for the ambient set.
    check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) }.into())
        .map_err(os("clearing ambient capabilities", uid))?;
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setresgid(g, g, g).map_err(|e| os("setresgid", uid)(e.into()))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| os("setresuid", uid)(e.into()))?;
    // Leaving uid 0 clears the permitted, effective and ambient sets, not the inheritable one.
    let mut header = libc_cap_header();
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one v3 header and two data structs, all owned here.
    check(unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) })
        .map_err(os("clearing inheritable capabilities", uid))?;
    verify_dropped(
        &fs::read_to_string("/proc/self/status").map_err(os("reading /proc/self/status", uid))?,
        uid,
        gid,
    )
    .map_err(|what| SandboxError::Remaining { uid, what })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn libc_cap_header() -> CapHeader {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 }
}

/// Checks a /proc/PID/status text: every uid and gid is the agent's, no supplementary groups, and
/// every capability set is empty. Returns what is wrong.
pub fn verify_dropped(status: &str, uid: u32, gid: u32) -> Result<(), String> {
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(str::trim)
    };
    for (name, want) in [("Uid", uid), ("Gid", gid)] {
        let ids: Vec<&str> = field(name).unwrap_or_default().split_whitespace().collect();
        if ids.len() != 4 || ids.iter().any(|id| *id != want.to_string()) {
            return Err(format!("{name} is {ids:?}, not {want} four times"));
        }
    }
    if field("Groups").is_none_or(|g| !g.is_empty()) {
        return Err(format!("supplementary groups {:?}", field("Groups").unwrap_or("?")));
    }
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        match field(set).map(|v| u64::from_str_radix(v, 16)) {
            Some(Ok(0)) => {}
            other => return Err(format!("{set} is {other:?}")),
        }
    }
    match field("NoNewPrivs") {
        Some("1") => Ok(()),
        other => Err(format!("NoNewPrivs is {other:?}")),
    }
}

pub fn no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) only sets a flag on this process.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
        .map_err(SandboxError::NoNewPrivs)
}

/// Landlock scopes: no connecting to abstract Unix sockets, and no signals to processes, outside
/// the agent's own Landlock domain. Required (fail closed): a kernel without them refuses.
pub fn landlock_scopes() -> Result<(), SandboxError> {
    use landlock::{CompatLevel, Compatible as _, Ruleset, RulesetAttr as _, RulesetStatus, Scope};
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| SandboxError::Landlock(e.to_string()))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(SandboxError::Landlock(format!("enforced only {:?}", status.ruleset)));
    }
    Ok(())
}

/// Address families an agent may open: Unix, IPv4, IPv6, and netlink's route protocol (what
/// getaddrinfo and `ip addr` ask). Everything else is refused with EPERM.
const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_NETLINK: u64 = 16;
const NETLINK_ROUTE: u64 = 0;

/// Syscalls refused outright (EPERM).
const REFUSED: [libc::c_long; 24] = [
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_setns,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
];

const NAMESPACE_FLAGS: [libc::c_int; 8] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
    0x80, // CLONE_NEWTIME
];

#[cfg(target_arch = "x86_64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// The rules whose match refuses a call with EPERM (any rule of a syscall matching).
fn refusal_rules() -> Result<BTreeMap<i64, Vec<seccompiler::SeccompRule>>, seccompiler::BackendError> {
    use seccompiler::{
        SeccompCmpArgLen::Dword, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule as Rule,
    };
    let arg = |index, op, value| Cond::new(index, Dword, op, value);
    let mut rules: BTreeMap<i64, Vec<Rule>> = REFUSED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_socket,
        vec![
            Rule::new(vec![arg(0, Op::Eq, 0)?])?,
            Rule::new(vec![arg(0, Op::Gt, AF_INET)?, arg(0, Op::Lt, AF_INET6)?])?,
            Rule::new(vec![arg(0, Op::Gt, AF_INET6)?, arg(0, Op::Lt, AF_NETLINK)?])?,
            Rule::new(vec![arg(0, Op::Gt, AF_NETLINK)?])?,
            Rule::new(vec![arg(0, Op::Eq, AF_NETLINK)?, arg(2, Op::Ne, NETLINK_ROUTE)?])?,
        ],
    );
    rules.insert(libc::SYS_socketpair, vec![Rule::new(vec![arg(0, Op::Ne, AF_UNIX)?])?]);
    // Typing into a terminal (TIOCSTI) or driving the console (TIOCLINUX).
    rules.insert(
        libc::SYS_ioctl,
        vec![
            Rule::new(vec![arg(1, Op::Eq, libc::TIOCSTI)?])?,
            Rule::new(vec![arg(1, Op::Eq, libc::TIOCLINUX)?])?,
        ],
    );
    let namespace_rules = |index: u8| -> Result<Vec<Rule>, seccompiler::BackendError> {
        NAMESPACE_FLAGS
            .iter()
            .map(|&flag| {
                let flag = u64::from(flag.unsigned_abs());
                Rule::new(vec![arg(index, Op::MaskedEq(flag), flag)?])
            })
            .collect()
    };
    rules.insert(libc::SYS_unshare, namespace_rules(0)?);
    // x86_64 and aarch64 both take clone's flags first.
    rules.insert(libc::SYS_clone, namespace_rules(0)?);
    Ok(rules)
}

/// x32 syscalls carry the x86_64 audit arch with bit 30 set in the number: a filter written for
/// x86_64 numbers would not see them. Refused outright (where the kernel has x32 at all).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A hand-written first filter: any syscall number with the x32 bit is refused with EPERM.
fn other_abi_filter() -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    let stmt = |code, k| sock_filter { code, jt: 0, jf: 0, k };
    vec![
        // seccomp_data.nr is at offset 0.
        stmt(LD_W_ABS, 0),
        sock_filter { code: JGE_K, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the agent's seccomp filters (after no_new_privs). clone3 passes its flags in memory a
/// filter cannot read, so it answers ENOSYS and the C library falls back to clone, whose flags the
/// filter checks. A syscall of another architecture (int 0x80) kills the process: the
/// generated filters check the audit arch first.
pub fn seccomp() -> Result<(), SandboxError> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let fail = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    seccompiler::apply_filter(&other_abi_filter()).map_err(|e| fail(&e))?;
    let refusals = refusal_rules().map_err(|e| fail(&e))?;
    let enosys = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    for (rules, action) in [
        (refusals, SeccompAction::Errno(libc::EPERM as u32)),
        (enosys, SeccompAction::Errno(libc::ENOSYS as u32)),
    ] {
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, ARCH).map_err(|e| fail(&e))?;
        let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| fail(&e))?;
        seccompiler::apply_filter(&program).map_err(|e| fail(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\tpython3\nUid:\t61184\t61184\t61184\t61184\nGid:\t61184\t61184\t61184\t61184\n\
        Groups:\t\nNoNewPrivs:\t1\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";

    #[test]
    fn a_fully_dropped_status_passes() {
        assert_eq!(verify_dropped(DROPPED, 61184, 61184), Ok(()));
    }

    #[test]
    fn anything_left_over_is_named() {
        let cases = [
            ("Uid:\t61184\t61184\t61184\t61184", "Uid:\t61184\t0\t61184\t61184", "Uid"),
            ("Gid:\t61184\t61184\t61184\t61184", "Gid:\t61184\t61184\t0\t61184", "Gid"),
            ("CapPrm:\t0000000000000000", "CapPrm:\t0000000000200000", "CapPrm"),
            ("CapEff:\t0000000000000000", "CapEff:\t0000000000200000", "CapEff"),
            ("Groups:\t", "Groups:\t27", "supplementary groups"),
            ("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff", "CapBnd"),
            ("CapInh:\t0000000000000000", "CapInh:\t0000000000000400", "CapInh"),
            ("CapAmb:\t0000000000000000", "CapAmb:\t0000000000001000", "CapAmb"),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs"),
        ];
        for (from, to, named) in cases {
            let err = verify_dropped(&DROPPED.replace(from, to), 61184, 61184).unwrap_err();
            assert!(err.contains(named), "{to}: {err}");
        }
        assert!(verify_dropped(DROPPED, 61185, 61184).unwrap_err().contains("Uid"));
    }

    #[test]
    fn the_other_abi_filter_refuses_only_numbers_with_the_x32_bit() {
        // Run the classic BPF program by hand on seccomp_data.nr.
        fn verdict(program: &[seccompiler::sock_filter], nr: u32) -> u32 {
            let (mut acc, mut pc) = (0u32, 0usize);
            loop {
                let insn = &program[pc];
                match insn.code {
                    0x20 => acc = if insn.k == 0 { nr } else { 0 },
                    0x35 => pc += usize::from(if acc >= insn.k { insn.jt } else { insn.jf }),
                    0x06 => return insn.k,
                    other => panic!("unexpected opcode {other:#x}"),
                }
                pc += 1;
            }
        }
        let program = other_abi_filter();
        let refused = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        assert_eq!(verdict(&program, libc::SYS_socket as u32), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(&program, X32_SYSCALL_BIT | libc::SYS_socket as u32), refused);
        assert_eq!(verdict(&program, X32_SYSCALL_BIT | 521), refused, "x32 ptrace");
    }

    #[test]
    fn the_seccomp_filter_compiles() {
        let rules = refusal_rules().unwrap();
        assert!(rules.contains_key(&libc::SYS_ptrace) && rules.contains_key(&libc::SYS_socket));
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(1),
            ARCH,
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        assert!(program.len() < 4096, "a seccomp program has at most 4096 instructions");
    }
}
