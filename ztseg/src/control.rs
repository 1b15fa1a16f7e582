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

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::token::TokenCode;

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
    /// A person lifts a risk pause or suspension, saying why (recorded in the audit chain).
    Resume {
        agent: String,
        reason: String,
    },
    /// An agent's risk score, standing and top contributors.
    Risk {
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

impl Request {
    /// The request's `cmd`, as it is sent.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TokenApply { .. } => "token_apply",
            Self::TokenRevoke { .. } => "token_revoke",
            Self::Agents {} => "agents",
            Self::Run { .. } => "run",
            Self::Kill { .. } => "kill",
            Self::Revive { .. } => "revive",
            Self::Resume { .. } => "resume",
            Self::Risk { .. } => "risk",
            Self::Events { .. } => "events",
            Self::Status {} => "status",
        }
    }
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

/// A stable code for a failure (`code` in a failed response): what a program reads instead of
/// the sentence. Serialised as the snake_case strings of docs/control-protocol.md.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The token was revoked and its `exp` has not passed.
    Revoked,
    /// The token is older than the one in force.
    Superseded,
    /// The grant does not compile against the catalogue.
    Policy,
    UnknownAgent,
    CgroupOutsideRoot,
    CgroupChanged,
    CgroupOfAnotherAgent,
    NoUid,
    AccessDenied,
    RunNeedsRoot,
    AgentPeer,
    InvalidAgent,
    /// `resume` of an agent that is neither paused nor suspended.
    NotHeld,
    /// The request line is not a valid request (a malformed token is `Token(Malformed)`, a
    /// refusal, with the same spelling).
    Malformed,
    Dataplane,
    Cgroup,
    Internal,
    /// A binding's token file cannot be read (said in the audit log, never on the socket).
    TokenFile,
    /// A token verification refusal (`expired`, `alg_none`, ...).
    #[serde(untagged)]
    Token(TokenCode),
    /// A code this build does not know, from a newer daemon; never sent by this one.
    #[serde(untagged)]
    Other(String),
}

impl ErrorCode {
    /// What kind of failure a code is, hence the CLI's exit code.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Dataplane | Self::Cgroup | Self::Internal => FailureKind::Error,
            Self::InvalidAgent | Self::Malformed => FailureKind::Usage,
            Self::Revoked
            | Self::Superseded
            | Self::Policy
            | Self::UnknownAgent
            | Self::CgroupOutsideRoot
            | Self::CgroupChanged
            | Self::CgroupOfAnotherAgent
            | Self::NoUid
            | Self::AccessDenied
            | Self::RunNeedsRoot
            | Self::AgentPeer
            | Self::NotHeld
            | Self::TokenFile
            | Self::Token(_)
            | Self::Other(_) => FailureKind::Refused,
        }
    }

    /// The code as it appears on the wire and in the audit log.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Revoked => "revoked",
            Self::Superseded => "superseded",
            Self::Policy => "policy",
            Self::UnknownAgent => "unknown_agent",
            Self::CgroupOutsideRoot => "cgroup_outside_root",
            Self::CgroupChanged => "cgroup_changed",
            Self::CgroupOfAnotherAgent => "cgroup_of_another_agent",
            Self::NoUid => "no_uid",
            Self::AccessDenied => "access_denied",
            Self::RunNeedsRoot => "run_needs_root",
            Self::AgentPeer => "agent_peer",
            Self::InvalidAgent => "invalid_agent",
            Self::NotHeld => "not_held",
            Self::Malformed => "malformed",
            Self::Dataplane => "dataplane",
            Self::Cgroup => "cgroup",
            Self::Internal => "internal",
            Self::TokenFile => "token_file",
            Self::Token(code) => code.as_str(),
            Self::Other(code) => code,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One response line. `T` is the request's answer (`data`): the daemon sends an [`Answer`], a
/// client reads the type its request is answered with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response<T> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
    /// One sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable code for the failure (e.g. a token check: "expired", "alg_none").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

impl<T> Response<T> {
    pub fn ok(data: T) -> Self {
        Self { ok: true, data: Some(data), kind: None, error: None, code: None }
    }

    /// A failure without a stable code.
    pub fn fail(kind: FailureKind, error: impl Into<String>) -> Self {
        Self { ok: false, data: None, kind: Some(kind), error: Some(error.into()), code: None }
    }

    /// A failure with a stable code; its kind is the code's.
    pub fn coded(code: ErrorCode, error: impl Into<String>) -> Self {
        Self { ok: false, data: None, kind: Some(code.kind()), error: Some(error.into()), code: Some(code) }
    }
}

/// What the daemon answers a request with: the `data` of a successful response, one type per
/// request. Serialised as the payload alone (no tag: the client knows what it asked).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Answer {
    TokenApply(TokenApplied),
    TokenRevoke(TokenRevoked),
    Agents(Vec<AgentRow>),
    Run(Joined),
    Kill(Killed),
    Revive(Revived),
    Resume(Resumed),
    Risk(RiskView),
    Status(Status),
    Events(EventsStarted),
}

// The answers below list their fields in alphabetical order: that is the order the daemon has
// always sent them in (objects built as `serde_json::Value`, whose keys are sorted), so the
// lines on the wire and `ztseg agents --json` stay byte for byte what they were. Fields the
// daemon may omit are skipped when `None`; the others are `null` when `None`. No
// `deny_unknown_fields`: a client ignores fields a newer daemon adds.

/// `token_apply`: the grant in force.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenApplied {
    pub agent: String,
    pub exp: u64,
    pub jti: String,
    pub op: Option<String>,
    /// Trie entries written.
    pub rules: usize,
}

/// `token_revoke`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRevoked {
    pub agent: String,
    /// The revoked token's `jti`; `None` when the agent held no token.
    pub revoked: Option<String>,
}

/// An agent's state in `agents`: the first that applies, in this order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Killed,
    Suspended,
    Paused,
    NoToken,
    Expired,
    Active,
    /// A state this build does not know, from a newer daemon; never sent by this one.
    #[serde(untagged)]
    Other(String),
}

impl AgentState {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Killed => "killed",
            Self::Suspended => "suspended",
            Self::Paused => "paused",
            Self::NoToken => "no_token",
            Self::Expired => "expired",
            Self::Active => "active",
            Self::Other(state) => state,
        }
    }
}

/// An agent's mode in `agents`: whether what its rules deny is refused or dry-run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentMode {
    Enforce,
    /// `[agent] mode = "audit"`: what its rules deny on what it connects or sends to is let
    /// through and recorded as `would_deny`.
    Audit,
    /// A mode this build does not know, from a newer daemon; never sent by this one.
    #[serde(untagged)]
    Other(String),
}

impl AgentMode {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Other(mode) => mode,
        }
    }
}

/// One agent of `agents` (`ztseg agents --json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRow {
    pub agent: String,
    /// The policy file that binds it; `None` for an agent registered by `ztseg run`.
    pub binding: Option<PathBuf>,
    /// Relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub decisions: u64,
    pub denied: u64,
    pub events_dropped: u64,
    pub events_emitted: u64,
    pub events_written: u64,
    pub exp: Option<u64>,
    /// `exp` minus now, in seconds; negative once expired.
    pub expires_in: Option<i64>,
    pub forbidden_tools: Option<Vec<String>>,
    pub jti: Option<String>,
    pub last_refusal: Option<String>,
    /// Its binding's `mode`: `enforce`, or `audit` (dry run).
    pub mode: AgentMode,
    pub op: Option<String>,
    /// Allows refused because their record could not be written (reason `unrecorded`).
    pub refused_unrecorded: u64,
    /// The risk score now, 0-100 (rounded down).
    pub risk: u8,
    pub rules: usize,
    pub scope: Option<Vec<String>>,
    pub state: AgentState,
    /// Decisions counted in summaries (the agent was past its record budget) instead of
    /// recorded one by one.
    pub summarised: u64,
    pub tools: Option<Vec<String>>,
    pub uid: u32,
}

/// `run`: where the calling process now is and whom `ztseg run` becomes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Joined {
    pub agent: String,
    /// Relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub gid: u32,
    pub uid: u32,
}

/// `kill`. At most one of `frozen`, `processes_error` and `terminated` is present
/// ([`Killed::processes`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Killed {
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<bool>,
    pub killed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes_error: Option<String>,
    /// `None` when closing them failed.
    pub sockets_closed: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<usize>,
}

/// What `kill` did to the agent's processes, when asked to do something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessesOutcome {
    /// Frozen (`true`), or not reported frozen yet (`false`; the freeze goes on).
    Frozen(bool),
    /// How many processes the agent's cgroup held when they were killed.
    Terminated(usize),
    /// The freeze or the kill failed: the sentence.
    Failed(String),
}

impl Killed {
    pub fn new(agent: &str, sockets_closed: Option<usize>, processes: Option<ProcessesOutcome>) -> Self {
        let mut killed = Self {
            agent: agent.to_owned(),
            frozen: None,
            killed: true,
            processes_error: None,
            sockets_closed,
            terminated: None,
        };
        match processes {
            None => {}
            Some(ProcessesOutcome::Frozen(frozen)) => killed.frozen = Some(frozen),
            Some(ProcessesOutcome::Terminated(count)) => killed.terminated = Some(count),
            Some(ProcessesOutcome::Failed(error)) => killed.processes_error = Some(error),
        }
        killed
    }

    /// What happened to the processes; a failure first, should a daemon send more than one.
    pub fn processes(&self) -> Option<ProcessesOutcome> {
        if let Some(error) = &self.processes_error {
            return Some(ProcessesOutcome::Failed(error.clone()));
        }
        self.frozen
            .map(ProcessesOutcome::Frozen)
            .or_else(|| self.terminated.map(ProcessesOutcome::Terminated))
    }
}

/// `revive`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revived {
    pub agent: String,
    pub killed: bool,
    /// `true` once thawed, `false` if still thawing or the write failed, `None` when the cgroup
    /// was not frozen.
    pub thawed: Option<bool>,
}

/// `resume`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resumed {
    pub agent: String,
    /// `true` once thawed, `false` if still thawing or the write failed, `None` when the cgroup
    /// was not frozen.
    pub thawed: Option<bool>,
    /// What it was: `paused` or `suspended`.
    pub was: AgentState,
}

/// `risk`: an agent's score now and what it is made of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RiskView {
    pub agent: String,
    /// Largest first.
    pub contributors: Vec<RiskContributor>,
    pub pause_at: u32,
    /// 0-100, two decimals.
    pub score: f64,
    /// `active`, `paused` or `suspended`, as the risk engine sees it.
    pub standing: String,
    pub suspend_at: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RiskContributor {
    pub class: String,
    pub points: f64,
    /// The class's last reason, with numbers.
    pub reason: String,
}

/// Kernel counters of decisions about processes in no registered agent (`status`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub decisions: u64,
    pub denied: u64,
    pub dropped: u64,
    pub emitted: u64,
}

/// `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Registered agents.
    pub agents: usize,
    pub audit_log: PathBuf,
    /// The `seq` the next audit record gets.
    pub audit_next_seq: u64,
    /// Why the audit log cannot be written now, and since when; `null` when it can.
    pub audit_unwritable: Option<AuditUnwritable>,
    pub cgroup_root: PathBuf,
    /// Records lost to a full ring, per CPU.
    pub events_dropped_per_cpu: Vec<u64>,
    /// Decision records written since the daemon started.
    pub events_written: u64,
    pub pin_dir: PathBuf,
    pub policy_dir: PathBuf,
    /// Tokens on the revocation list.
    pub revoked_tokens: usize,
    pub unregistered: Option<Counters>,
    pub version: String,
}

/// The audit log cannot be written: decisions wait in the kernel's ring, and once it is full
/// allowed decisions are refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditUnwritable {
    pub reason: String,
    /// RFC 3339, UTC.
    pub since: String,
}

/// The first line of an `events` stream.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventsStarted {
    pub follow: bool,
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
    Failed { kind: FailureKind, message: String, code: Option<ErrorCode> },
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

    /// Reads one response line, its `data` read as `T`.
    pub fn read_response<T: DeserializeOwned>(&mut self) -> Result<Option<Response<T>>, ClientError> {
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

    /// Sends a request and returns its data as `T`, or the daemon's failure. The typed methods
    /// below name the `T` each request is answered with.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        if let Err(e) = self.send(request) {
            // The daemon may have answered and closed before reading (a refused peer): prefer
            // its answer to the broken pipe.
            return match self.read_response() {
                Ok(Some(response)) => self.data_of(response),
                _ => Err(e),
            };
        }
        let response = self.read_response()?.ok_or_else(|| ClientError::Protocol {
            path: self.path.clone(),
            detail: "the connection closed before an answer".to_owned(),
        })?;
        self.data_of(response)
    }

    /// `token_apply`.
    pub fn token_apply(&mut self, agent: &str, token: &str) -> Result<TokenApplied, ClientError> {
        self.call(&Request::TokenApply { agent: agent.to_owned(), token: token.to_owned() })
    }

    /// `token_revoke`.
    pub fn token_revoke(&mut self, agent: &str) -> Result<TokenRevoked, ClientError> {
        self.call(&Request::TokenRevoke { agent: agent.to_owned() })
    }

    /// `agents`.
    pub fn agents(&mut self) -> Result<Vec<AgentRow>, ClientError> {
        self.call(&Request::Agents {})
    }

    /// `run`: moves this very process into the agent's cgroup.
    pub fn run(&mut self, agent: &str, token: Option<&str>) -> Result<Joined, ClientError> {
        self.call(&Request::Run { agent: agent.to_owned(), token: token.map(str::to_owned) })
    }

    /// `kill`.
    pub fn kill(&mut self, agent: &str, processes: KillProcesses) -> Result<Killed, ClientError> {
        self.call(&Request::Kill { agent: agent.to_owned(), processes })
    }

    /// `revive`.
    pub fn revive(&mut self, agent: &str) -> Result<Revived, ClientError> {
        self.call(&Request::Revive { agent: agent.to_owned() })
    }

    /// `resume`.
    pub fn resume(&mut self, agent: &str, reason: &str) -> Result<Resumed, ClientError> {
        self.call(&Request::Resume { agent: agent.to_owned(), reason: reason.to_owned() })
    }

    /// `risk`.
    pub fn risk(&mut self, agent: &str) -> Result<RiskView, ClientError> {
        self.call(&Request::Risk { agent: agent.to_owned() })
    }

    /// `status`.
    pub fn status(&mut self) -> Result<Status, ClientError> {
        self.call(&Request::Status {})
    }

    /// Sends a streaming request (events): every line after the first acknowledgement is one
    /// JSON record, handed to `each` until the daemon closes the stream or `each` returns false.
    pub fn stream(
        &mut self,
        request: &Request,
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let _: EventsStarted = self.call(request)?;
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

    fn data_of<T>(&self, response: Response<T>) -> Result<T, ClientError> {
        if !response.ok {
            return Err(failure(response));
        }
        response.data.ok_or_else(|| ClientError::Protocol {
            path: self.path.clone(),
            detail: "a successful answer without data".to_owned(),
        })
    }
}

/// The failure a response that is not `ok` reports.
fn failure<T>(response: Response<T>) -> ClientError {
    ClientError::Failed {
        kind: response.kind.unwrap_or(FailureKind::Error),
        message: response.error.unwrap_or_else(|| "the daemon refused without a reason".to_owned()),
        code: response.code,
    }
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
    use std::collections::BTreeSet;

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
        let expired = ErrorCode::Token(TokenCode::Expired);
        assert_eq!(failure(Response::<()>::coded(expired, "no")).exit_code(), 3);
        assert_eq!(failure(Response::<()>::fail(FailureKind::Usage, "bad")).exit_code(), 2);
        assert_eq!(failure(Response::<()>::coded(ErrorCode::Dataplane, "full")).exit_code(), 1);
    }

    // --- The answers against docs/control-protocol.md ---

    const DOC: &str = include_str!("../../docs/control-protocol.md");

    /// The part of the doc under the heading that starts with `heading`, up to the next one.
    fn section(heading: &str) -> &'static str {
        let start = DOC.find(&format!("\n{heading}")).unwrap_or_else(|| panic!("no {heading:?} in the doc"));
        let body = &DOC[start + 1..];
        let body = &body[body.find('\n').unwrap()..];
        let end = [body.find("\n## "), body.find("\n### ")].into_iter().flatten().min().unwrap_or(body.len());
        &body[..end]
    }

    /// The JSON of each fenced ```json block.
    fn json_blocks(text: &str) -> Vec<serde_json::Value> {
        text.split("```").skip(1).step_by(2).filter_map(|b| b.strip_prefix("json")).map(json_lines).collect()
    }

    fn json_lines(block: &str) -> serde_json::Value {
        serde_json::from_str(block.trim()).unwrap_or_else(|e| panic!("{block}: {e}"))
    }

    /// The JSON objects written inline (`{...}`), outside fenced blocks.
    fn inline_objects(text: &str) -> Vec<serde_json::Value> {
        text.split("```")
            .step_by(2)
            .flat_map(|prose| prose.split('`').skip(1).step_by(2))
            .filter(|span| span.starts_with('{') && span.contains(':'))
            .map(json_lines)
            .collect()
    }

    /// The backticked names in the first cell of each table row.
    fn table_names(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with("| `"))
            .filter_map(|l| l.split('|').nth(1))
            .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    fn keys(value: &impl Serialize) -> BTreeSet<String> {
        match serde_json::to_value(value).unwrap() {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Serialises `answer` (as the daemon does) and reads it back (as the CLI does): the same
    /// value, and the same bytes as the `serde_json::Value` the daemon used to build (sorted keys).
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(answer: &T) -> String {
        let line = serde_json::to_string(&Response::ok(answer)).unwrap();
        let back: Response<T> = serde_json::from_str(&line).unwrap();
        assert_eq!(back.data.as_ref(), Some(answer), "{line}");
        let as_value = serde_json::to_value(answer).unwrap().to_string();
        assert_eq!(serde_json::to_string(answer).unwrap(), as_value, "field order changed");
        line
    }

    fn sample_row() -> AgentRow {
        AgentRow {
            agent: "analyst-7".into(),
            binding: None,
            cgroup: "ztseg.slice/analyst-7".into(),
            cgroup_id: 12345,
            decisions: 10,
            denied: 2,
            events_dropped: 0,
            events_emitted: 9,
            events_written: 9,
            exp: Some(1_767_225_900),
            expires_in: Some(-3),
            forbidden_tools: Some(vec!["shell".into()]),
            jti: Some("9f2c".into()),
            last_refusal: None,
            mode: AgentMode::Enforce,
            op: None,
            refused_unrecorded: 0,
            risk: 0,
            rules: 3,
            scope: Some(vec!["read:data.sales_q1_2026".into()]),
            state: AgentState::Expired,
            summarised: 5,
            tools: Some(vec![]),
            uid: 61184,
        }
    }

    fn sample_status() -> Status {
        Status {
            agents: 1,
            audit_log: "/var/log/ztseg/audit.jsonl".into(),
            audit_next_seq: 42,
            audit_unwritable: Some(AuditUnwritable {
                reason: "cannot write it: No space left on device (os error 28)".into(),
                since: "2026-12-04T18:51:30.658260Z".into(),
            }),
            cgroup_root: "ztseg.slice".into(),
            events_dropped_per_cpu: vec![0, 1],
            events_written: 7,
            pin_dir: "/sys/fs/bpf/ztseg".into(),
            policy_dir: "/etc/ztseg/policies".into(),
            revoked_tokens: 0,
            unregistered: Some(Counters { decisions: 4, denied: 4, dropped: 0, emitted: 4 }),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn every_answer_round_trips() {
        let applied =
            TokenApplied { agent: "a".into(), exp: 1_767_225_900, jti: "j".into(), op: None, rules: 3 };
        assert_eq!(
            round_trip(&applied),
            r#"{"ok":true,"data":{"agent":"a","exp":1767225900,"jti":"j","op":null,"rules":3}}"#
        );
        round_trip(&TokenApplied { op: Some("report".into()), ..applied });
        round_trip(&TokenRevoked { agent: "a".into(), revoked: Some("j".into()) });
        assert_eq!(
            round_trip(&TokenRevoked { agent: "a".into(), revoked: None }),
            r#"{"ok":true,"data":{"agent":"a","revoked":null}}"#
        );
        round_trip(&vec![
            sample_row(),
            AgentRow {
                binding: Some("/etc/ztseg/policies/a.toml".into()),
                mode: AgentMode::Audit,
                ..sample_row()
            },
        ]);
        let joined = Joined {
            agent: "a".into(),
            cgroup: "ztseg.slice/a".into(),
            cgroup_id: 9,
            gid: 61184,
            uid: 61184,
        };
        round_trip(&joined);
        for processes in [
            None,
            Some(ProcessesOutcome::Frozen(true)),
            Some(ProcessesOutcome::Frozen(false)),
            Some(ProcessesOutcome::Terminated(2)),
            Some(ProcessesOutcome::Failed("no cgroup".into())),
        ] {
            let killed = Killed::new("a", Some(3), processes.clone());
            round_trip(&killed);
            assert_eq!(killed.processes(), processes);
        }
        assert_eq!(
            round_trip(&Killed::new("a", None, None)),
            r#"{"ok":true,"data":{"agent":"a","killed":true,"sockets_closed":null}}"#
        );
        for thawed in [None, Some(true), Some(false)] {
            round_trip(&Revived { agent: "a".into(), killed: false, thawed });
        }
        round_trip(&sample_status());
        round_trip(&Status { unregistered: None, ..sample_status() });
        round_trip(&EventsStarted { follow: true });
    }

    #[test]
    fn an_answer_goes_on_the_wire_as_its_payload_alone() {
        let answer = Answer::Kill(Killed::new("a", Some(1), Some(ProcessesOutcome::Terminated(2))));
        assert_eq!(
            serde_json::to_string(&Response::ok(answer)).unwrap(),
            r#"{"ok":true,"data":{"agent":"a","killed":true,"sockets_closed":1,"terminated":2}}"#
        );
        let rows = serde_json::to_value(Answer::Agents(vec![sample_row()])).unwrap();
        assert_eq!(rows, serde_json::to_value(vec![sample_row()]).unwrap());
        assert_eq!(
            serde_json::to_string(&Response::<Answer>::coded(ErrorCode::Token(TokenCode::Malformed), "bad"))
                .unwrap(),
            r#"{"ok":false,"kind":"refused","error":"bad","code":"malformed"}"#
        );
    }

    #[test]
    fn the_agents_answer_has_the_documented_fields() {
        assert_eq!(keys(&sample_row()), table_names(section("### `agents`")));
    }

    #[test]
    fn the_status_answer_has_the_documented_fields() {
        assert_eq!(keys(&sample_status()), table_names(section("### `status`")));
        let unregistered =
            section("### `status`").lines().find(|l| l.starts_with("| `unregistered`")).unwrap();
        let documented = unregistered.split('"').skip(1).step_by(2).map(str::to_owned).collect();
        assert_eq!(keys(&Counters { decisions: 0, denied: 0, dropped: 0, emitted: 0 }), documented);
    }

    #[test]
    fn the_kill_and_revive_answers_have_the_documented_fields() {
        let text = section("### `kill`, `revive`");
        let examples = inline_objects(text);
        let kill = examples.iter().find(|v| v["killed"] == true).expect("a kill example");
        let revive = examples.iter().find(|v| v["killed"] == false).expect("a revive example");
        // The doc's examples read into the types and come back unchanged.
        let killed: Killed = serde_json::from_value(kill.clone()).unwrap();
        assert_eq!(&serde_json::to_value(&killed).unwrap(), kill);
        let revived: Revived = serde_json::from_value(revive.clone()).unwrap();
        assert_eq!(&serde_json::to_value(&revived).unwrap(), revive);
        // Each outcome adds the one key the doc's `processes` table (or its prose) names.
        let base = keys(&Killed::new("a", Some(3), None));
        assert_eq!(base, names(&["agent", "killed", "sockets_closed"]));
        for (outcome, key) in [
            (ProcessesOutcome::Frozen(true), "frozen"),
            (ProcessesOutcome::Terminated(1), "terminated"),
            (ProcessesOutcome::Failed("x".into()), "processes_error"),
        ] {
            assert!(text.contains(&format!("`{key}`")), "{key} is not documented");
            let mut expected = base.clone();
            expected.insert(key.to_owned());
            assert_eq!(keys(&Killed::new("a", Some(3), Some(outcome))), expected);
        }
    }

    #[test]
    fn the_other_answers_read_the_documented_examples() {
        fn same<T: Serialize + DeserializeOwned>(example: &serde_json::Value) {
            let typed: T = serde_json::from_value(example.clone()).unwrap();
            assert_eq!(&serde_json::to_value(&typed).unwrap(), example);
        }
        same::<TokenApplied>(&json_blocks(section("### `token_apply`"))[1]);
        same::<TokenRevoked>(&json_blocks(section("### `token_revoke`"))[1]);
        same::<Joined>(json_blocks(section("### `run`")).last().unwrap());
        let resume_risk = json_blocks(section("### `resume`, `risk`"));
        assert_eq!(
            serde_json::from_value::<Request>(resume_risk[0].clone()).unwrap(),
            Request::Resume {
                agent: "analyst-7".into(),
                reason: "reviewed: a migration job, not a scan".into()
            }
        );
        assert_eq!(
            serde_json::from_value::<Request>(resume_risk[1].clone()).unwrap(),
            Request::Risk { agent: "analyst-7".into() }
        );
        same::<Resumed>(&resume_risk[2]);
        same::<RiskView>(&resume_risk[3]);
    }

    #[test]
    fn a_client_ignores_fields_and_reads_states_it_does_not_know() {
        let mut row = serde_json::to_value(sample_row()).unwrap();
        row["state"] = "quarantined".into();
        row["mode"] = "canary".into();
        row["risk_reasons"] = serde_json::json!(["denials"]);
        let read: AgentRow = serde_json::from_value(row).unwrap();
        assert_eq!(read.state, AgentState::Other("quarantined".into()));
        assert_eq!(read.state.as_str(), "quarantined");
        assert_eq!(read.mode, AgentMode::Other("canary".into()));
        let failed: Response<Killed> =
            serde_json::from_str(r#"{"ok":false,"kind":"refused","error":"x","code":"quota"}"#).unwrap();
        assert_eq!(failed.code, Some(ErrorCode::Other("quota".into())));
    }

    #[test]
    fn error_codes_have_the_documented_spelling_and_kind() {
        let table = section("## Error codes");
        let mut seen = 0;
        for row in table.lines().filter(|l| l.starts_with("| `") || l.starts_with("| token codes")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let kind: FailureKind = serde_json::from_value(cells[2].into()).unwrap();
            for name in cells[1].split('`').skip(1).step_by(2) {
                let code = if cells[1].starts_with("token codes") {
                    ErrorCode::Token(serde_json::from_value(name.into()).unwrap())
                } else {
                    serde_json::from_value(name.into()).unwrap()
                };
                assert!(!matches!(code, ErrorCode::Other(_)), "{name} is not a code this build knows");
                assert_eq!(code.as_str(), name);
                assert_eq!(serde_json::to_value(&code).unwrap(), name);
                assert_eq!(code.kind(), kind, "{name}");
                seen += 1;
            }
        }
        assert!(seen > 20, "the error code table was not found");
        // Every code this build sends reads back as itself (a token's `malformed` aside, which
        // has the request's spelling).
        for code in [
            ErrorCode::Revoked,
            ErrorCode::Superseded,
            ErrorCode::Policy,
            ErrorCode::UnknownAgent,
            ErrorCode::CgroupOutsideRoot,
            ErrorCode::CgroupChanged,
            ErrorCode::CgroupOfAnotherAgent,
            ErrorCode::NoUid,
            ErrorCode::AccessDenied,
            ErrorCode::RunNeedsRoot,
            ErrorCode::AgentPeer,
            ErrorCode::InvalidAgent,
            ErrorCode::NotHeld,
            ErrorCode::Malformed,
            ErrorCode::Dataplane,
            ErrorCode::Cgroup,
            ErrorCode::Internal,
            ErrorCode::TokenFile,
        ]
        .into_iter()
        .chain(TokenCode::ALL.into_iter().filter(|c| *c != TokenCode::Malformed).map(ErrorCode::Token))
        {
            let wire = serde_json::to_value(&code).unwrap();
            assert_eq!(wire, code.as_str());
            assert_eq!(serde_json::from_value::<ErrorCode>(wire).unwrap(), code);
        }
        assert_eq!(ErrorCode::Token(TokenCode::Malformed).kind(), FailureKind::Refused);
        assert_eq!(ErrorCode::Malformed.kind(), FailureKind::Usage);
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
