//! `ztseg run --agent ID [--token FILE|-] [--user USER] -- CMD...`: start CMD confined as an agent.
//!
//! The daemon registers the agent (creating its cgroup), verifies and applies the token, and
//! moves this very process (identified by its socket credentials, not by anything it claims)
//! into the agent's cgroup. Only when this process can see itself in that cgroup does it prepare
//! CMD: inherited descriptors are closed (a socket opened outside the cgroup would be judged by
//! the cgroup it was created in), privileges are dropped (root, or anyone with CAP_SYS_ADMIN,
//! could leave the cgroup), and setuid binaries are neutralised (no_new_privs). Then it execs.
//! If anything fails, CMD never starts.

use std::{
    ffi::{CString, OsString},
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    sys::socket::{AddressFamily, SockaddrLike as _, SockaddrStorage, getsockname},
    unistd::{Gid, Uid, User},
};

use crate::{
    agent_id::AgentId,
    control::{Client, ClientError, Request},
};

/// The user an agent runs as when `ztseg run` is started by root without `--user`.
pub const DEFAULT_AGENT_USER: &str = "nobody";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error(
        "{0} is a network socket opened outside the agent's cgroup; it would bypass enforcement, so CMD is not started"
    )]
    InheritedSocket(&'static str),
    #[error("the daemon answered without the agent's cgroup")]
    NoCgroup,
    #[error(
        "this process is in cgroup {found:?}, not in the agent's {expected:?}; CMD is not started unconfined"
    )]
    NotConfined { found: String, expected: String },
    #[error("cannot read /proc/self/cgroup: {0}")]
    ProcCgroup(io::Error),
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("cannot drop privileges to {user}: {source}")]
    Privileges { user: String, source: nix::Error },
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
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
            Self::InheritedSocket(_) | Self::NotConfined { .. } => 3,
            _ => 1,
        }
    }
}

pub struct RunOptions {
    pub agent: AgentId,
    pub token: Option<String>,
    pub user: Option<String>,
    pub socket: PathBuf,
    pub command: Vec<OsString>,
}

/// Refuses when stdin, stdout or stderr is an IPv4/IPv6 socket.
fn check_stdio() -> Result<(), RunError> {
    for (fd, name) in [(0, "stdin"), (1, "stdout"), (2, "stderr")] {
        // SAFETY: the descriptor is only inspected, and only while this function runs.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(addr) = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()))
            && matches!(addr.family(), Some(AddressFamily::Inet | AddressFamily::Inet6))
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

fn drop_privileges(user: Option<&str>) -> Result<(), RunError> {
    let target = match user {
        Some(name) => Some(name.to_owned()),
        None if Uid::effective().is_root() => Some(DEFAULT_AGENT_USER.to_owned()),
        None => None,
    };
    if let Some(name) = target {
        let user = User::from_name(&name).ok().flatten().ok_or_else(|| RunError::NoSuchUser(name.clone()))?;
        let fail = |source| RunError::Privileges { user: name.clone(), source };
        if Uid::effective().is_root() {
            nix::unistd::setgroups(&[]).map_err(fail)?;
        }
        nix::unistd::setgid(user.gid).map_err(fail)?;
        nix::unistd::setuid(user.uid).map_err(fail)?;
        if Uid::effective().is_root() || Gid::effective().as_raw() != user.gid.as_raw() {
            return Err(fail(nix::Error::EPERM));
        }
    }
    Ok(())
}

/// Confines this process as the agent and execs the command; returns only on failure.
pub fn run(options: RunOptions) -> RunError {
    match prepare(&options) {
        Ok(()) => exec(&options.command),
        Err(e) => e,
    }
}

fn prepare(options: &RunOptions) -> Result<(), RunError> {
    check_stdio()?;
    let reply = {
        let mut client = Client::connect(&options.socket)?;
        client.call(&Request::Run { agent: options.agent.to_string(), token: options.token.clone() })?
    };
    let expected = reply.get("cgroup").and_then(|c| c.as_str()).ok_or(RunError::NoCgroup)?;
    let expected = format!("/{}", expected.trim_start_matches('/'));
    let found = own_cgroup()?;
    if found != expected {
        return Err(RunError::NotConfined { found, expected });
    }
    close_inherited_fds()?;
    drop_privileges(options.user.as_deref())?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(RunError::NoNewPrivs(nix::Error::last()));
    }
    Ok(())
}

fn exec(command: &[OsString]) -> RunError {
    let Ok(args) = command.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>() else {
        return RunError::BadCommand;
    };
    let Some(program) = args.first() else {
        return RunError::BadCommand;
    };
    match nix::unistd::execvp(program, &args) {
        Err(source) => RunError::Exec { command: Path::new(&command[0]).display().to_string(), source },
        Ok(never) => match never {},
    }
}
