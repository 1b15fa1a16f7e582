//! The control socket: newline-delimited JSON requests and responses between the CLI (and
//! `ztseg run`) and the daemon.
//!
//! The socket is mode 0660 and every connection's peer credentials (SO_PEERCRED, SO_PEERGROUPS)
//! are checked: root, or a member of the configured `control_group`.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Environment variable naming the control socket for client commands.
pub const SOCKET_ENV: &str = "ZTSEG_SOCKET";
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Hand a (refreshed) token to the daemon for an agent.
    TokenApply {
        agent: String,
        token: String,
    },
    /// Revoke the token in force for an agent, durably (until its `exp`).
    TokenRevoke {
        agent: String,
    },
    /// Agents, token expiry, state, counters.
    Agents {},
    /// Register (or join) an agent and move the calling process into its cgroup.
    Run {
        agent: String,
        token: Option<String>,
    },
    Kill {
        agent: String,
        /// Absent: the network only (older clients send none).
        #[serde(default)]
        processes: KillProcesses,
    },
    Revive {
        agent: String,
    },
    /// Decision events: the recent ones, then (with `follow`) every new one.
    Events {
        follow: bool,
        agent: Option<String>,
    },
    /// Daemon status: pins, counters, audit log.
    Status {},
}

/// What `ztseg kill` does to the agent's processes, besides cutting its network.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KillProcesses {
    /// Leave them running, cut off.
    #[default]
    Keep,
    /// Freeze the agent's cgroup (`--freeze`); `ztseg revive` thaws it.
    Freeze,
    /// SIGKILL every process of the agent's cgroup (`--terminate`).
    Terminate,
}

/// How a request failed, mapped to the CLI's exit codes (1, 2, 3).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Runtime error.
    Error,
    /// The request itself is malformed.
    Usage,
    /// Verification failed, policy invalid, access denied.
    Refused,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
    /// One sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable code for the refusal (e.g. a token check: "expired", "alg_none").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl Response {
    pub fn ok(data: Value) -> Self {
        Self { ok: true, data: Some(data), kind: None, error: None, code: None }
    }

    pub fn fail(kind: FailureKind, error: impl Into<String>, code: Option<&str>) -> Self {
        Self {
            ok: false,
            data: None,
            kind: Some(kind),
            error: Some(error.into()),
            code: code.map(str::to_owned),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the ztseg daemon at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("lost the connection to the ztseg daemon at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the ztseg daemon at {path} sent an unreadable answer: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("{message}")]
    Failed { kind: FailureKind, message: String, code: Option<String> },
}

impl ClientError {
    /// The CLI exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Failed { kind: FailureKind::Refused, .. } => 3,
            Self::Failed { kind: FailureKind::Usage, .. } => 2,
            _ => 1,
        }
    }
}

/// A connection to the daemon.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.to_owned(), source })?;
        let writer =
            stream.try_clone().map_err(|source| ClientError::Connect { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), reader: BufReader::new(stream), writer })
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let io_err = |source| ClientError::Io { path: self.path.clone(), source };
        let mut line = serde_json::to_vec(request)
            .map_err(|e| ClientError::Protocol { path: self.path.clone(), detail: e.to_string() })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io_err)
    }

    /// Reads one response line.
    pub fn read_response(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ClientError::Protocol { path: self.path.clone(), detail: e.to_string() })
    }

    /// Sends a request and returns its data, or the daemon's failure.
    pub fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        if let Err(e) = self.send(request) {
            // The daemon may have answered and closed before reading (a refused peer): prefer
            // its answer to the broken pipe.
            return match self.read_response() {
                Ok(Some(response)) => into_result(response),
                _ => Err(e),
            };
        }
        let response = self.read_response()?.ok_or_else(|| ClientError::Protocol {
            path: self.path.clone(),
            detail: "the connection closed before an answer".to_owned(),
        })?;
        into_result(response)
    }

    /// Sends a streaming request (events): every line after the first acknowledgement is one
    /// JSON record, handed to `each` until the daemon closes the stream or `each` returns false.
    pub fn stream(
        &mut self,
        request: &Request,
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        self.call(request)?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|source| ClientError::Io { path: self.path.clone(), source })?;
            if n == 0 || !each(line.trim_end()) {
                return Ok(());
            }
        }
    }
}

fn into_result(response: Response) -> Result<Value, ClientError> {
    if response.ok {
        return Ok(response.data.unwrap_or(Value::Null));
    }
    Err(ClientError::Failed {
        kind: response.kind.unwrap_or(FailureKind::Error),
        message: response.error.unwrap_or_else(|| "the daemon refused without a reason".to_owned()),
        code: response.code,
    })
}

/// Who is on the other end of a control connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Reads the peer's credentials from the kernel (not from anything the peer sent).
pub fn peer(stream: &impl std::os::fd::AsFd) -> io::Result<Peer> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
    // SAFETY: SO_PEERGROUPS writes at most `len` bytes of gid_t into `groups`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 {
        groups.truncate(len as usize / size_of::<u32>());
    } else {
        // Unknown supplementary groups: judge by uid and primary gid only (fail closed).
        groups.clear();
    }
    Ok(Peer { pid: cred.pid(), uid: cred.uid(), gid: cred.gid(), groups })
}

/// A pidfd for the peer process, taken by the kernel at connect time (SO_PEERPIDFD, Linux 6.5):
/// unlike the pid, it cannot come to name another process once the peer exits.
pub fn peer_pidfd(stream: &impl std::os::fd::AsFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int, the new descriptor, which we then own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd names now, or `None` once that process has exited (fdinfo says -1).
pub fn pidfd_pid(pidfd: &impl std::os::fd::AsFd) -> io::Result<Option<i32>> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_fd().as_raw_fd()))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| io::Error::other("fdinfo of a pidfd has no Pid line"))?;
    Ok((pid > 0).then_some(pid))
}

/// The cgroup2 path of the process a pidfd names ("/ztseg.slice/a"), read while that process is
/// known to be alive, so the path cannot be a recycled pid's.
pub fn pidfd_cgroup(pidfd: &impl std::os::fd::AsFd) -> io::Result<String> {
    let gone = || io::Error::new(io::ErrorKind::NotFound, "the process has exited");
    let pid = pidfd_pid(pidfd)?.ok_or_else(gone)?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    if pidfd_pid(pidfd)? != Some(pid) {
        return Err(gone());
    }
    Ok(text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned())
}

/// Whether cgroup `path` ("/a/b") is `root` ("/a") or below it.
pub fn cgroup_within(path: &str, root: &str) -> bool {
    Path::new(path).starts_with(root)
}

impl Peer {
    /// Root, or a member (primary or supplementary) of `group`.
    pub fn authorized(&self, group: Option<u32>) -> bool {
        self.uid == 0 || group.is_some_and(|g| self.gid == g || self.groups.contains(&g))
    }
}

/// The socket path a client command uses: `--socket`, else `$ZTSEG_SOCKET`, else the config's.
pub fn socket_path(flag: Option<&Path>, config_socket: &Path) -> PathBuf {
    flag.map(Path::to_owned)
        .or_else(|| std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| config_socket.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::TokenApply { agent: "a".into(), token: "t".into() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"cmd":"token_apply","agent":"a","token":"t"}"#);
        let back: Request = serde_json::from_str(r#"{"cmd":"agents"}"#).unwrap();
        assert_eq!(back, Request::Agents {});
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"agents","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
    }

    #[test]
    fn failures_map_to_exit_codes() {
        let refused = into_result(Response::fail(FailureKind::Refused, "no", Some("expired"))).unwrap_err();
        assert_eq!(refused.exit_code(), 3);
        let usage = into_result(Response::fail(FailureKind::Usage, "bad", None)).unwrap_err();
        assert_eq!(usage.exit_code(), 2);
        assert_eq!(into_result(Response::ok(Value::Bool(true))).unwrap(), Value::Bool(true));
    }

    #[test]
    fn only_root_or_the_group_is_authorized() {
        let peer = |uid, gid, groups: &[u32]| Peer { pid: 1, uid, gid, groups: groups.to_vec() };
        assert!(peer(0, 0, &[]).authorized(None));
        assert!(!peer(1000, 1000, &[]).authorized(None));
        assert!(peer(1000, 1000, &[5, 42]).authorized(Some(42)));
        assert!(peer(1000, 42, &[]).authorized(Some(42)));
        assert!(!peer(1000, 1000, &[5]).authorized(Some(42)));
    }

    #[test]
    fn a_pidfd_names_its_process_and_its_cgroup() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pidfd = peer_pidfd(&a).unwrap();
        assert_eq!(pidfd_pid(&pidfd).unwrap(), Some(std::process::id() as i32));
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(own.contains(&format!("0::{}", pidfd_cgroup(&pidfd).unwrap())));
    }

    #[test]
    fn cgroup_within_compares_whole_components() {
        assert!(cgroup_within("/ztseg.slice/a", "/ztseg.slice"));
        assert!(cgroup_within("/ztseg.slice", "/ztseg.slice"));
        assert!(!cgroup_within("/ztseg.slice2/a", "/ztseg.slice"));
        assert!(!cgroup_within("/system.slice", "/ztseg.slice"));
    }

    #[test]
    fn socket_flag_beats_environment_beats_config() {
        let config = Path::new("/run/ztseg/ztseg.sock");
        assert_eq!(socket_path(Some(Path::new("/tmp/x.sock")), config), PathBuf::from("/tmp/x.sock"));
    }
}
