//! `ztseg run --agent ID [--token FILE|-] -- CMD...`: start CMD confined as an agent.
//!
//! Started by root. The daemon registers the agent (creating its cgroup and giving it a uid of
//! its own), verifies and applies the token, and moves this very process (named by its pidfd,
//! not by anything it claims) into the agent's cgroup. Only when this process can see itself in
//! that cgroup does it build the agent's box (`sandbox`): inherited descriptors closed (a socket
//! opened outside the cgroup would be judged by the cgroup it was created in), a private mount
//! namespace, the agent's uid and gid with no groups and no capabilities, no_new_privs, Landlock
//! scopes and a seccomp filter. Then it execs. If anything fails, CMD never starts.

use std::{
    ffi::{CString, OsString},
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    sys::socket::{AddressFamily, SockaddrLike as _, SockaddrStorage, getsockname},
    unistd::Uid,
};

use crate::{
    agent_id::AgentId,
    control::{Client, ClientError},
    sandbox::{self, SandboxError},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error(
        "{0} is a socket (not a Unix one) opened outside the agent's cgroup; it would bypass enforcement, so CMD is not started"
    )]
    InheritedSocket(&'static str),
    #[error(
        "ztseg run must be started by root: it runs agent {0} under the agent's own uid, which only root can switch to"
    )]
    NotRoot(AgentId),
    #[error(
        "this process is in cgroup {found:?}, not in the agent's {expected:?}; CMD is not started unconfined"
    )]
    NotConfined { found: String, expected: String },
    #[error("cannot read /proc/self/cgroup: {0}")]
    ProcCgroup(io::Error),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot close inherited descriptors: {0}")]
    CloseFds(io::Error),
    #[error("the command contains a NUL byte")]
    BadCommand,
    #[error("cannot run {command}: {source}")]
    Exec { command: String, source: nix::Error },
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Daemon(e) => e.exit_code(),
            Self::InheritedSocket(_) | Self::NotConfined { .. } | Self::NotRoot(_) | Self::Sandbox(_) => 3,
            _ => 1,
        }
    }
}

pub struct RunOptions {
    pub agent: AgentId,
    pub token: Option<String>,
    pub socket: PathBuf,
    pub command: Vec<OsString>,
}

/// Refuses when stdin, stdout or stderr is a socket of any family but Unix.
fn check_stdio() -> Result<(), RunError> {
    for (fd, name) in [(0, "stdin"), (1, "stdout"), (2, "stderr")] {
        // SAFETY: the descriptor is only inspected, and only while this function runs.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        // Any socket but a Unix one (the journal's stream under systemd, a pipe-like pair):
        // network, packet, netlink sockets would be the agent's without being judged as its.
        if let Ok(addr) = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()))
            && !matches!(addr.family(), Some(AddressFamily::Unix))
        {
            return Err(RunError::InheritedSocket(name));
        }
    }
    Ok(())
}

/// The cgroup2 path of this process ("0::/path" in /proc/self/cgroup).
pub fn own_cgroup() -> Result<String, RunError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(RunError::ProcCgroup)?;
    Ok(text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned())
}

fn close_inherited_fds() -> Result<(), RunError> {
    // SAFETY: closes descriptors 3 and up; nothing in this process uses them any more (the
    // daemon connection is dropped before).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        return Err(RunError::CloseFds(io::Error::last_os_error()));
    }
    Ok(())
}

/// Confines this process as the agent and execs the command; returns only on failure.
pub fn run(options: RunOptions) -> RunError {
    match prepare(&options) {
        Ok(program) => exec(&program, &options.command),
        Err(e) => e,
    }
}

fn prepare(options: &RunOptions) -> Result<Program, RunError> {
    if !Uid::effective().is_root() {
        return Err(RunError::NotRoot(options.agent.clone()));
    }
    check_stdio()?;
    let joined = Client::connect(&options.socket)?.run(options.agent.as_str(), options.token.as_deref())?;
    let (uid, gid) = (joined.uid, joined.gid);
    let expected = format!("/{}", joined.cgroup.display().to_string().trim_start_matches('/'));
    let found = own_cgroup()?;
    if found != expected {
        return Err(RunError::NotConfined { found, expected });
    }
    close_inherited_fds()?;
    // Opened before the agent's private /tmp hides it (and while a 0700 parent directory is still
    // no obstacle); the kernel checks that the agent may execute it at exec.
    let program = Program::open(&options.command)?;
    sandbox::private_mounts()?;
    sandbox::detach_terminal()?;
    sandbox::no_new_privs()?;
    sandbox::drop_privileges(uid, gid)?;
    sandbox::landlock_scopes()?;
    sandbox::seccomp()?;
    Ok(program)
}

/// CMD's executable, open.
struct Program {
    file: fs::File,
    name: String,
}

impl Program {
    /// Finds `command[0]` (on PATH when it has no '/') and opens it. A script keeps its
    /// descriptor across exec (the kernel hands the interpreter /dev/fd/N); a binary does not.
    fn open(command: &[OsString]) -> Result<Self, RunError> {
        let first = command.first().ok_or(RunError::BadCommand)?;
        let name = Path::new(first).display().to_string();
        let not_found = || RunError::Exec { command: name.clone(), source: nix::Error::ENOENT };
        let path = if first.as_bytes().contains(&b'/') {
            PathBuf::from(first)
        } else {
            let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
            std::env::split_paths(&search)
                .map(|dir| dir.join(first))
                .find(|p| p.is_file())
                .ok_or_else(not_found)?
        };
        let io_err = |e: io::Error| RunError::Exec {
            command: name.clone(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        // Rust opens with O_CLOEXEC.
        let file = fs::File::open(&path).map_err(io_err)?;
        let mut head = [0u8; 2];
        let script =
            std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).is_ok_and(|n| n == 2 && head == *b"#!");
        if script {
            nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(|e| io_err(e.into()))?;
        }
        Ok(Self { file, name })
    }
}

/// Executes the open file with the launcher's environment, HOME pointed at the agent's private
/// /tmp (the launcher's home is root's, which the agent cannot enter).
fn exec(program: &Program, command: &[OsString]) -> RunError {
    use std::os::fd::AsRawFd as _;
    let Ok(args) = command.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>() else {
        return RunError::BadCommand;
    };
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != "HOME")
        .chain([("HOME".into(), "/tmp".into())])
        .filter_map(|(k, v)| {
            let mut pair = k.into_vec();
            pair.push(b'=');
            pair.extend_from_slice(v.as_bytes());
            CString::new(pair).ok()
        })
        .collect();
    match nix::unistd::fexecve(program.file.as_raw_fd(), &args, &env) {
        Err(source) => RunError::Exec { command: program.name.clone(), source },
        Ok(never) => match never {},
    }
}
