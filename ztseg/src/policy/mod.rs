//! The policy dir: the capability catalogue (what each tool and scope means on the network) and
//! agent bindings (which agent holds which token), as TOML files.
//!
//! Reading is in three steps, each pure and unit-tested without a kernel:
//! - [`parse_file`] turns one file into a [`PolicyFile`], refusing anything that could widen or
//!   blur a grant (unknown keys, malformed or unbounded networks, ports that can never match, ...)
//!   with an error pointing at the offending line;
//! - [`assemble`] merges the files of a dir into a [`PolicySet`], refusing a tool, scope, baseline
//!   or agent defined twice;
//! - [`Catalogue::compile`] turns a token's grant into rule-trie entries for the dataplane.
//!
//! ```toml
//! [baseline]                      # granted to every agent holding a valid token
//! allow = [{ to = "127.0.0.53/32", ports = [53], proto = "udp" }]
//! [tools.http]
//! allow = [{ to = "203.0.113.0/24", ports = [80, 443], proto = "tcp" }]
//! [scopes."read:data.sales_q1_2026"]
//! allow = [{ to = "10.0.5.12/32", ports = [5432], proto = "tcp" }]
//! deny = [{ to = "10.0.5.0/24", ports = ["6000-6999"] }]   # deny wins over any allow
//! [agent]
//! id = "analyst-7"
//! token_file = "analyst-7.jwt"    # relative to this file's directory; or token = "eyJ..."
//! ```

mod assemble;
mod compile;
mod name;
mod parse;

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

pub use self::{
    assemble::{Catalogue, Definition, PolicySet, assemble},
    compile::{CompileError, Compiled, Grant, GrantKind, MAX_ENTRIES, NameGrant},
    name::{NamePattern, label_byte},
};
use crate::agent_id::{AgentId, InvalidAgentId};

/// What one policy file holds. A file may hold catalogue content, an agent binding, or both.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyFile {
    pub path: PathBuf,
    pub baseline: Option<Group>,
    pub tools: BTreeMap<String, Group>,
    pub scopes: BTreeMap<String, Group>,
    pub binding: Option<Binding>,
}

impl PolicyFile {
    /// What this file puts in audit mode (catalogue entries and its binding), by name.
    pub fn in_audit_mode(&self) -> Vec<String> {
        let audit = |g: &&Group| g.mode == Mode::Audit;
        let baseline = self.baseline.iter().filter(audit).map(|_| "[baseline]".to_owned());
        let tools = self.tools.iter().filter(|(_, g)| audit(g)).map(|(n, _)| format!("[tools.{n}]"));
        let scopes = self.scopes.iter().filter(|(_, g)| audit(g)).map(|(n, _)| format!("[scopes.{n:?}]"));
        let binding =
            self.binding.iter().filter(|b| b.mode == Mode::Audit).map(|b| format!("[agent] {}", b.id));
        baseline.chain(tools).chain(scopes).chain(binding).collect()
    }

    /// Catalogue rules (allow and deny) in this file.
    pub fn rule_count(&self) -> usize {
        self.baseline
            .iter()
            .chain(self.tools.values())
            .chain(self.scopes.values())
            .map(Group::rule_count)
            .sum()
    }
}

/// Whether an agent binding or a catalogue entry is enforced or dry-run (`mode = "audit"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// What the rules deny is refused.
    #[default]
    Enforce,
    /// What the rules deny is let through and recorded as `would_deny`: for an agent, what its
    /// rules deny on what it connects or sends to; for a catalogue entry, what its deny rules
    /// (all its rules, for a forbidden tool) deny of what an allow grants. Never the kill
    /// switch, a suspension or pause, a missing or expired token, an unregistered cgroup, a
    /// socket nothing can judge, or inbound traffic.
    Audit,
}

impl Mode {
    /// As written in policy files and shown by `ztseg agents`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }

    /// `AgentState::mode` of the agents map.
    pub const fn code(self) -> u32 {
        match self {
            Self::Enforce => ztseg_common::agent::MODE_ENFORCE,
            Self::Audit => ztseg_common::agent::MODE_AUDIT,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rules of the baseline, one tool or one scope.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Group {
    pub allow: Vec<Rule>,
    /// Denies win over any allow, of this group or any other.
    pub deny: Vec<Rule>,
    /// Connections and datagrams granted into the agent: `net` is the sender (`from`), `ports`
    /// the agent's own ports. Nothing comes in without one.
    pub inbound: Vec<Rule>,
    /// `mode`: in [`Mode::Audit`] its denies (and, as a forbidden tool, all its outbound rules)
    /// are would-deny rules; its allows and inbound grants are in force either way.
    pub mode: Mode,
    /// Line of the group's name (`[tools.http]`, `[baseline]`, ...).
    pub line: usize,
    /// The rules of `allow` and `deny` whose `to` is a DNS name (`allow` and `deny` hold the
    /// others), each with its place in its list.
    pub names: Vec<NameRule>,
}

impl Group {
    pub fn rule_count(&self) -> usize {
        self.allow.len() + self.deny.len() + self.inbound.len() + self.names.len()
    }
}

/// A rule of `allow` or `deny` whose `to` is a DNS name or wildcard: what the agent may
/// resolve (and then reach at the addresses of the answer, on these ports and protocols), or
/// may not resolve.
#[derive(Clone, Debug, PartialEq)]
pub struct NameRule {
    pub pattern: NamePattern,
    pub ports: Ports,
    /// `Tcp`, `Udp` or `TcpUdp` (ICMP cannot be reached through a name).
    pub protos: Protos,
    /// In `deny` rather than `allow`.
    pub deny: bool,
    /// Its place (from 0) in its list, among address rules and names alike: its origin's `#N`.
    pub index: usize,
    /// Line where the rule starts.
    pub line: usize,
}

/// One catalogue rule: a destination network, its ports and protocols.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Destination network; host bits are always clear.
    pub net: IpNet,
    pub ports: Ports,
    pub protos: Protos,
    /// Line where the rule starts.
    pub line: usize,
}

/// Destination ports of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Every port (`ports` absent, or ranges covering 1-65535).
    All,
    /// Sorted, non-overlapping, non-adjacent inclusive ranges; never empty, never 1-65535.
    Ranges(Vec<PortRange>),
}

/// An inclusive port range; `lo == hi` for a single port. Ports run from 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl Ports {
    /// Normalizes `ranges`: sorted, overlapping and adjacent ranges merged, empty ranges dropped,
    /// and a cover of 1-65535 (or nothing at all) turned into [`Ports::All`].
    pub fn new(mut ranges: Vec<PortRange>) -> Self {
        ranges.retain(|r| r.lo <= r.hi);
        ranges.sort();
        let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(r.hi),
                _ => merged.push(r),
            }
        }
        // Port 0 is "every port" in the dataplane; a range starting at 0 means the same.
        match merged.as_slice() {
            [] => Self::All,
            [only] if only.lo <= 1 && only.hi == u16::MAX => Self::All,
            _ => Self::Ranges(merged),
        }
    }

    /// The same ports in normal form (see [`Ports::new`]).
    pub fn normalized(&self) -> Self {
        match self {
            Self::All => Self::All,
            Self::Ranges(ranges) => Self::new(ranges.clone()),
        }
    }

    /// How many dataplane entries these ports take per protocol (once normalized).
    pub fn entry_count(&self) -> usize {
        match self {
            Self::All => 1,
            Self::Ranges(ranges) => ranges.iter().map(|r| usize::from(r.hi - r.lo) + 1).sum(),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi { write!(f, "{}", self.lo) } else { write!(f, "{}-{}", self.lo, self.hi) }
    }
}

/// Protocols of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protos {
    Tcp,
    Udp,
    /// ICMP for IPv4 networks, ICMPv6 for IPv6 networks.
    Icmp,
    /// `proto` absent.
    TcpUdp,
}

/// An agent binding: the agent's id, where its token is, and its cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub id: AgentId,
    pub token: TokenSource,
    /// Relative to the cgroup2 mount, no `..`; `None` means the daemon's default
    /// (`<cgroup_root>/<id>`).
    pub cgroup: Option<PathBuf>,
    /// `mode`: in [`Mode::Audit`] what the agent's rules deny on what it connects or sends to is
    /// let through as `would_deny`.
    pub mode: Mode,
    /// The file the binding came from.
    pub path: PathBuf,
    /// Line of `[agent]`.
    pub line: usize,
}

/// Where an agent's token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// An absolute path (a relative `token_file` is resolved against the policy file's directory).
    File(PathBuf),
    /// The token itself (`token = "eyJ..."`), shared by the binding's copies (the parsed file's
    /// and the assembled catalogue's): 10,000 agents' tokens are ~4.6 MB each time they are held.
    Inline(std::sync::Arc<str>),
}

impl fmt::Debug for TokenSource {
    // A token is a bearer credential: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Inline(token) => write!(f, "Inline(<{} bytes>)", token.len()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// TOML syntax, unknown keys and wrong types.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    /// A value that parses but is refused: `message` says what is wrong and how to fix it.
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: {source}")]
    AgentId { path: PathBuf, line: usize, source: InvalidAgentId },
    #[error("{path}:{line}: cannot resolve token_file {token_file:?} to an absolute path: {source}")]
    TokenPath { path: PathBuf, line: usize, token_file: String, source: io::Error },
    #[error("{path}:{line}: {what} is defined twice, here and at {first_path}:{first_line}")]
    Duplicate { path: PathBuf, line: usize, what: Definition, first_path: PathBuf, first_line: usize },
}

impl PolicyError {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. }
            | Self::Syntax { path, .. }
            | Self::Invalid { path, .. }
            | Self::AgentId { path, .. }
            | Self::TokenPath { path, .. }
            | Self::Duplicate { path, .. } => path,
        }
    }

    /// The line at fault, if the error is about a line.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. }
            | Self::Invalid { line, .. }
            | Self::AgentId { line, .. }
            | Self::TokenPath { line, .. }
            | Self::Duplicate { line, .. } => Some(*line),
        }
    }
}

/// At least one error, the first kept apart so that callers reporting one need no unwrap.
#[derive(Debug)]
struct Errors {
    first: PolicyError,
    rest: Vec<PolicyError>,
}

impl Errors {
    /// `None` if `errors` is empty; otherwise the errors ordered by file and line.
    fn from_vec(mut errors: Vec<PolicyError>) -> Option<Self> {
        errors.sort_by(|a, b| (a.path(), a.line()).cmp(&(b.path(), b.line())));
        let mut it = errors.into_iter();
        it.next().map(|first| Self { first, rest: it.collect() })
    }

    fn into_vec(self) -> Vec<PolicyError> {
        let mut all = vec![self.first];
        all.extend(self.rest);
        all
    }
}

/// Parses one policy file (`path` is only used for messages and to resolve `token_file`).
/// Returns the first error by line; [`check_path`] reports them all.
pub fn parse_file(path: &Path, text: &str) -> Result<PolicyFile, PolicyError> {
    parse::parse(path, text).map_err(|e| e.first)
}

/// Reads and parses one policy file.
pub fn load_file(path: &Path) -> Result<PolicyFile, PolicyError> {
    let text = read(path)?;
    parse_file(path, &text)
}

fn read(path: &Path) -> Result<String, PolicyError> {
    fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.to_owned(), source })
}

/// The policy files of `dir`: every regular `*.toml` file (symlinks followed) except hidden
/// ones (`.name.toml`, as a shell glob would), sorted by name.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |source| PolicyError::Read { path: dir.to_owned(), source };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".toml") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Loads and assembles every policy file of `dir`; on failure, every error found.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyError>> {
    let files = policy_files(dir).map_err(|e| vec![e])?;
    load_all(&files).map(|(set, _)| set).map_err(Errors::into_vec)
}

fn load_all(paths: &[PathBuf]) -> Result<(PolicySet, Vec<PolicyFile>), Errors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        match read(path) {
            Ok(text) => match parse::parse_partial(path, &text) {
                Ok((file, found)) => {
                    files.push(file);
                    errors.extend(found);
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(e),
        }
    }
    // Cross-file checks over what parsed, so that one bad rule hides no duplicate.
    let (set, duplicates) = assemble::merge(&files);
    errors.extend(duplicates);
    match Errors::from_vec(errors) {
        None => Ok((set, files)),
        Some(e) => Err(e),
    }
}

/// What `ztseg policy check` found valid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckSummary {
    pub files: usize,
    pub baseline: bool,
    pub tools: usize,
    pub scopes: usize,
    pub bindings: usize,
    /// Catalogue rules (allow and deny).
    pub rules: usize,
    /// What is in audit mode (dry run: would-be denials let through), by name: `[baseline]`,
    /// `tool "x"`, `scope "y"`, `agent "z"`.
    pub audit: Vec<String>,
}

impl fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
        write!(
            f,
            "{} valid: {}, {}, {}, {}, {}",
            plural(self.files, "file"),
            if self.baseline { "baseline" } else { "no baseline" },
            plural(self.tools, "tool"),
            plural(self.scopes, "scope"),
            plural(self.rules, "rule"),
            plural(self.bindings, "agent binding"),
        )?;
        if !self.audit.is_empty() {
            write!(f, "; in audit mode (would-be denials let through): {}", self.audit.join(", "))?;
        }
        Ok(())
    }
}

/// `ztseg policy check PATH`: validates a file, or every `*.toml` of a directory together (as
/// the daemon would load them). Returns a summary, or every error found, ordered by file and line.
pub fn check_path(path: &Path) -> Result<CheckSummary, Vec<PolicyError>> {
    let paths = if path.is_dir() { policy_files(path).map_err(|e| vec![e])? } else { vec![path.to_owned()] };
    let (set, files) = load_all(&paths).map_err(Errors::into_vec)?;
    Ok(CheckSummary {
        files: files.len(),
        baseline: set.catalogue.baseline.is_some(),
        tools: set.catalogue.tools.len(),
        scopes: set.catalogue.scopes.len(),
        bindings: set.bindings.len(),
        rules: files.iter().map(PolicyFile::rule_count).sum(),
        audit: set.in_audit_mode().iter().map(ToString::to_string).collect(),
    })
}

#[cfg(test)]
mod tests;
