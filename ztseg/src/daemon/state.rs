//! The daemon's state and every change to it: agents, their tokens and rule tables, the policy
//! files in force, and the audit trail of each change.
//!
//! Everything here runs under one lock, in short steps (map writes are single syscalls). A change
//! either completes or is refused with a one-sentence reason, and a refusal leaves the kernel
//! state and this state as they were. Audit records are handed to the audit writer (its own
//! thread), and what the event reader needs is kept in the [`Directory`] under a lock of its
//! own, so neither the disk nor a flood of decisions holds this lock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tracing::{error, info, warn};

use crate::{
    agent_id::AgentId,
    agent_uid,
    cgroup::CgroupFs,
    clock,
    config::Config,
    // `Code` keeps the refusal lines within the width they had as strings.
    control::{
        AgentMode, AgentRow, AgentState, ErrorCode as Code, KillProcesses, Killed, ProcessesOutcome, Resumed,
        Revived, RiskContributor, RiskView, TokenApplied,
    },
    daemon::{
        audit_writer::AuditSender,
        directory::{Directory, TableInfo},
        kernel::Kernel,
    },
    dataplane::Dataplane,
    events,
    policy::{self, Grant, Mode, PolicyFile, PolicySet, TokenSource},
    risk,
    token::{Claims, ReplayCache, Revocations, Revoked, TokenError, Verifier},
};

/// How long `ztseg kill --freeze` waits for the kernel to report the agent frozen.
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a request or a file was refused: a stable code and one sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        Self::new(Code::Token(e.code()), e.to_string())
    }
}

/// Where an agent's token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Binding,
    Apply,
    Run,
    Restore,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Binding => "binding",
            Self::Apply => "token_apply",
            Self::Run => "run",
            Self::Restore => "restore",
        }
    }
}

/// The token in force for an agent and what it compiled to.
#[derive(Clone, Debug)]
pub struct ActiveGrant {
    pub token: String,
    pub hash: [u8; 32],
    pub claims: Claims,
    pub origins: Arc<Vec<String>>,
    /// Its rules to DNS names, as the DNS proxy judges queries by them.
    pub names: Arc<crate::dns::NameRules>,
    pub entries: usize,
    /// Catalogue generation it was compiled against.
    pub generation: u64,
    pub expiry_logged: bool,
}

#[derive(Clone, Debug)]
pub struct AgentRecord {
    pub id: AgentId,
    /// Relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The agent's own uid and gid (same number), from `agent_uids`; stable across restarts.
    pub uid: u32,
    /// The policy file whose `[agent]` binding declares this agent, if any.
    pub bound_by: Option<PathBuf>,
    /// The mode the kernel has for it (`AgentState::mode`): its binding's `mode`, enforce
    /// without a binding.
    pub mode: Mode,
    pub active: Option<ActiveGrant>,
    /// SHA-256 of the token last taken from the binding's file, so re-reading an unchanged file
    /// does not present it again.
    pub binding_token: Option<[u8; 32]>,
    /// Decision records of this agent written to the audit log (counted by the audit writer).
    pub events_written: Arc<AtomicU64>,
    pub last_refusal: Option<String>,
}

/// The persisted part of an agent's state (`<state_dir>/agents/<id>.json`, one file per agent so a
/// token apply rewrites one small file whatever the number of agents): where it is and the last
/// token it was granted, so a restart re-attaches every agent to its rights.
#[derive(Debug, Serialize, Deserialize)]
struct PersistedAgent {
    id: String,
    cgroup: PathBuf,
    /// Absent in state saved before agents had uids of their own: one is allocated.
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    token: Option<String>,
    /// Hex SHA-256 of the token last taken from the agent's binding file.
    #[serde(default)]
    binding_token_sha256: Option<String>,
}

/// Where the state's changes go besides the kernel: the audit writer, and the directory the
/// event reader attributes decisions by.
pub struct Trail {
    pub audit: AuditSender,
    pub directory: Arc<RwLock<Directory>>,
    /// The risk engine the audit writer feeds; read here for `agents` and `risk`.
    pub risk: Arc<std::sync::Mutex<risk::Engine>>,
}

/// `K` is the kernel and host the state changes: the [`Dataplane`] in the daemon, a fake in
/// unit tests.
pub struct State<K: Kernel = Dataplane> {
    pub config: Config,
    cgroups: CgroupFs,
    pub kernel: K,
    verifier: Verifier,
    replay: ReplayCache,
    replay_dirty: bool,
    replay_generation: u64,
    /// Agents whose saved state is stale; written (or removed) when the lock is released.
    persist_dirty: BTreeSet<AgentId>,
    /// Last good parse of each policy file.
    files: BTreeMap<PathBuf, PolicyFile>,
    policy: PolicySet,
    generation: u64,
    pub agents: BTreeMap<AgentId, AgentRecord>,
    by_cgroup: HashMap<u64, AgentId>,
    /// The agents' cgroups (relative paths, in component order) and uids: kept with `agents` and
    /// `by_cgroup` at the one place each agent is added and removed, so registering an agent
    /// checks overlaps and free uids without a scan over every agent.
    by_path: BTreeMap<PathBuf, AgentId>,
    uids: std::collections::HashSet<u32>,
    /// Uids of running processes, read from /proc at most once a second (10,000 new bindings
    /// at start-up read it a few times, not 10,000).
    live_uids: Option<(std::time::Instant, std::collections::HashSet<u32>)>,
    /// What the event reader attributes decisions by; kept with `agents` and each grant.
    directory: Arc<RwLock<Directory>>,
    pub audit: AuditSender,
    /// Where the next new agent's uid search starts; saved in `state_dir/uid_cursor`.
    uid_cursor: u32,
    /// Tokens whose rights were taken back before their `exp`.
    revoked: Revocations,
    risk: Arc<std::sync::Mutex<risk::Engine>>,
    /// The DNS proxy's store of names and learned addresses (`[dns] enabled`): kept with each
    /// registration, grant, revocation and removal.
    dns: Option<Arc<std::sync::Mutex<crate::dns::Store>>>,
}

use clock::unix_now_secs as now_unix;

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Writes a snapshot from `State::replay_snapshot`; a failure is logged (the next change
/// writes the whole cache again).
pub fn write_replay(snapshot: &ReplaySnapshot) {
    // One writer at a time (they share the temp file), and never an older snapshot over a newer.
    static WRITTEN: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
    let mut written = WRITTEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if snapshot.generation <= *written {
        return;
    }
    let bytes = match snapshot.cache.to_bytes() {
        Ok(bytes) => bytes,
        Err(e) => return warn!(error = %e, "cannot save the replay cache"),
    };
    match ReplayCache::write_bytes(&snapshot.path, &bytes) {
        Ok(()) => *written = snapshot.generation,
        Err(e) => warn!(error = %e, "cannot save the replay cache"),
    }
}

/// The replay cache at one moment (`State::replay_snapshot`), serialised and written without
/// the state lock (10,000 entries take about a millisecond).
pub struct ReplaySnapshot {
    path: PathBuf,
    cache: ReplayCache,
    generation: u64,
}

/// Rewrites `path` in place (no temp file, no fsync): creating and renaming a file per token
/// apply made ext4's inode allocator the daemon's hottest path. The saved agent state only
/// matters while the kernel state it describes exists, which a daemon crash keeps (the write is
/// in the page cache once `write` returns) and a power loss or kernel crash wipes anyway (the
/// pins live in memory). A file left half-written is refused on restore and its agent stays
/// unregistered (fail closed).
fn rewrite_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)
}

impl<K: Kernel> State<K> {
    pub fn new(
        config: Config,
        cgroups: CgroupFs,
        kernel: K,
        verifier: Verifier,
        replay: ReplayCache,
        revoked: Revocations,
        trail: Trail,
    ) -> Self {
        let Trail { audit, directory, risk } = trail;
        // A missing or unreadable cursor starts at the range's first uid: round-robin then
        // resumes from there, and uids in use are skipped either way.
        let uid_cursor = fs::read_to_string(config.state_dir.join("uid_cursor"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(config.agent_uids.first);
        Self {
            uid_cursor,
            revoked,
            config,
            cgroups,
            kernel,
            verifier,
            replay,
            replay_dirty: false,
            replay_generation: 0,
            persist_dirty: BTreeSet::new(),
            files: BTreeMap::new(),
            policy: PolicySet::default(),
            generation: 0,
            agents: BTreeMap::new(),
            by_cgroup: HashMap::new(),
            by_path: BTreeMap::new(),
            uids: std::collections::HashSet::new(),
            live_uids: None,
            directory,
            audit,
            risk,
            dns: None,
        }
    }

    /// Keeps the DNS proxy's store with the agents and their grants from now on.
    pub fn set_dns(&mut self, store: Arc<std::sync::Mutex<crate::dns::Store>>) {
        self.dns = Some(store);
    }

    /// The DNS store, if the proxy runs; a poisoned lock is taken as is (every change to the
    /// store completes or leaves its maps as they were).
    fn dns(&self) -> Option<std::sync::MutexGuard<'_, crate::dns::Store>> {
        self.dns.as_ref().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn persisted_dir(&self) -> PathBuf {
        self.config.state_dir.join("agents")
    }

    /// Where the next new agent's uid search starts (`agent_uid::allocate`).
    fn uid_cursor_path(&self) -> PathBuf {
        self.config.state_dir.join("uid_cursor")
    }

    pub fn replay_path(&self) -> PathBuf {
        self.config.state_dir.join("replay.json")
    }

    /// Hands a daemon-side event to the audit writer (which logs it, then streams it).
    pub fn audit_event(&mut self, event: &str, mut fields: Map<String, Value>) {
        fields.insert("ts".into(), Value::String(events::rfc3339(SystemTime::now())));
        fields.insert("event".into(), Value::String(event.to_owned()));
        self.audit.send(fields);
    }

    /// The directory, for writing; a poisoned lock (a panic while holding it) is taken as is:
    /// its maps are never left half-changed by one insert or remove.
    fn directory(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.directory.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The agent's default cgroup: `<cgroup_root>/<id>`.
    fn default_cgroup(&self, id: &AgentId) -> PathBuf {
        self.config.cgroup_root.join(id.as_str())
    }

    /// The agent whose cgroup is `relative`, an ancestor of it, or below it. Paths order by
    /// component, so the first cgroup at or after `relative` is a descendant if any is.
    fn agent_overlapping(&self, relative: &Path) -> Option<AgentId> {
        relative
            .ancestors()
            .find_map(|a| self.by_path.get(a))
            .or_else(|| {
                self.by_path
                    .range(relative.to_owned()..)
                    .next()
                    .filter(|(p, _)| p.starts_with(relative))
                    .map(|(_, id)| id)
            })
            .cloned()
    }

    /// Uids some running process has, refreshed at most once a second.
    fn live_uids(&mut self) -> std::collections::HashSet<u32> {
        let fresh =
            self.live_uids.as_ref().is_some_and(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
        if !fresh {
            self.live_uids = Some((std::time::Instant::now(), agent_uid::live_uids()));
        }
        self.live_uids.as_ref().map(|(_, uids)| uids.clone()).unwrap_or_default()
    }

    /// Makes sure the agent exists: cgroup created, registered in the kernel (no rights yet).
    /// `uid` is the agent's uid before a restart, kept when it is still free.
    pub fn ensure_agent(
        &mut self,
        id: &AgentId,
        cgroup: Option<&Path>,
        saved_uid: Option<u32>,
    ) -> Result<&mut AgentRecord, Refusal> {
        let relative = cgroup.map_or_else(|| self.default_cgroup(id), Path::to_owned);
        if !relative.starts_with(&self.config.cgroup_root) || relative == self.config.cgroup_root {
            return Err(Refusal::new(
                Code::CgroupOutsideRoot,
                format!(
                    "agent {id}'s cgroup {} is not below the agents' root {}; it would not be enforced",
                    relative.display(),
                    self.config.cgroup_root.display()
                ),
            ));
        }
        if let Some(existing) = self.agents.get(id)
            && existing.cgroup != relative
        {
            return Err(Refusal::new(
                Code::CgroupChanged,
                format!(
                    "agent {id} already lives in {}, not {}",
                    existing.cgroup.display(),
                    relative.display()
                ),
            ));
        }
        if !self.agents.contains_key(id) {
            // A cgroup inside (or around) another agent's would let one agent's binding take
            // over the other's identity in the kernel, or be frozen and killed with it.
            if let Some(other) = self.agent_overlapping(&relative) {
                return Err(Refusal::new(
                    Code::CgroupOfAnotherAgent,
                    format!(
                        "agent {id}'s cgroup {} overlaps agent {other}'s cgroup {}",
                        relative.display(),
                        self.agents.get(&other).map_or_else(String::new, |a| a.cgroup.display().to_string())
                    ),
                ));
            }
            let live = if saved_uid.is_some() { Default::default() } else { self.live_uids() };
            let in_use =
                agent_uid::InUse { agents: &self.uids, live: &live, by_host: &agent_uid::used_by_host };
            let uid = agent_uid::allocate(self.config.agent_uids, saved_uid, self.uid_cursor, &in_use)
                .ok_or_else(|| {
                    Refusal::new(
                        Code::NoUid,
                        format!(
                            "no free uid is left for agent {id} in agent_uids {}-{}",
                            self.config.agent_uids.first, self.config.agent_uids.last
                        ),
                    )
                })?;
            let path =
                self.cgroups.resolve(&relative).map_err(|e| Refusal::new(Code::Cgroup, e.to_string()))?;
            let cgroup_id =
                self.kernel.ensure_cgroup(&path).map_err(|e| Refusal::new(Code::Cgroup, e.to_string()))?;
            // Known to the directory before the kernel knows it: its first decision is named.
            let written = Arc::new(AtomicU64::new(0));
            self.directory().add_agent(cgroup_id, id.clone(), written.clone());
            let registered = match self.kernel.register(cgroup_id) {
                Ok(registered) => registered,
                Err(e) => {
                    self.directory().remove_agent(cgroup_id);
                    return Err(Refusal::new(Code::Dataplane, e.to_string()));
                }
            };
            if let Some(mut dns) = self.dns() {
                dns.register(cgroup_id, registered.slot, id.as_str(), uid);
            }
            self.by_cgroup.insert(cgroup_id, id.clone());
            self.by_path.insert(relative.clone(), id.clone());
            self.uids.insert(uid);
            self.agents.insert(
                id.clone(),
                AgentRecord {
                    id: id.clone(),
                    cgroup: relative,
                    cgroup_id,
                    uid,
                    bound_by: None,
                    // What the kernel has (pinned, across a restart): the binding sets it.
                    mode: if registered.audit() { Mode::Audit } else { Mode::Enforce },
                    active: None,
                    binding_token: None,
                    events_written: written,
                    last_refusal: None,
                },
            );
            info!(agent = %id, cgroup_id, uid, "agent registered");
            if saved_uid != Some(uid) {
                self.mark_changed(id);
                self.uid_cursor = uid.saturating_add(1);
                if let Err(e) = rewrite_file(&self.uid_cursor_path(), self.uid_cursor.to_string().as_bytes())
                {
                    warn!(error = %e, "cannot save the uid cursor");
                }
            }
        }
        self.agents.get_mut(id).ok_or_else(|| Refusal::new(Code::Internal, "agent vanished"))
    }

    /// Verifies `token` for `agent`, compiles it against the catalogue and grants it: the new rule
    /// table and the token's deadline replace the old ones in one step. On any refusal the agent
    /// keeps what it had.
    pub fn apply_token(
        &mut self,
        agent: &AgentId,
        token: &str,
        source: Source,
    ) -> Result<TokenApplied, Refusal> {
        let token = token.trim();
        let result = self.try_apply(agent, token, source);
        match &result {
            Ok(_) => {}
            Err(refusal) => {
                warn!(agent = %agent, code = %refusal.code, source = source.name(), "token refused: {}", refusal.message);
                if let Some(record) = self.agents.get_mut(agent) {
                    record.last_refusal = Some(refusal.message.clone());
                }
                let mut fields = Map::new();
                fields.insert("agent".into(), json!(agent.as_str()));
                fields.insert("source".into(), json!(source.name()));
                fields.insert("code".into(), json!(refusal.code));
                fields.insert("reason".into(), json!(refusal.message));
                self.audit_event("token_refused", fields);
            }
        }
        result
    }

    fn try_apply(&mut self, agent: &AgentId, token: &str, source: Source) -> Result<TokenApplied, Refusal> {
        let now = now_unix();
        let claims = self.verifier.verify_for(token, agent, now)?;
        if self.revoked.refuses(&claims.jti, agent.as_str(), claims.iat, now) {
            return Err(Refusal::new(
                Code::Revoked,
                format!(
                    "token {} was revoked for agent {agent}, or was issued before a token revoked for it; it stays refused until it would have expired",
                    claims.jti
                ),
            ));
        }
        let hash = sha256(token);
        let record = self.agents.get(agent).ok_or_else(|| {
            Refusal::new(
                Code::UnknownAgent,
                format!("agent {agent} is not registered (no binding and no `ztseg run`)"),
            )
        })?;
        if let Some(active) = &record.active {
            if active.hash == hash && active.generation == self.generation {
                // The very token in force, compiled against this catalogue: nothing to do.
                return Ok(grant_summary(agent, active));
            }
            if claims.iat < active.claims.iat {
                return Err(Refusal::new(
                    Code::Superseded,
                    format!(
                        "token {} (iat {}) is older than token {} (iat {}) in force for agent {agent}",
                        claims.jti, claims.iat, active.claims.jti, active.claims.iat
                    ),
                ));
            }
        }
        let compiled = self
            .policy
            .catalogue
            .compile(&Grant {
                scopes: &claims.scope,
                tools: &claims.tools,
                forbidden_tools: &claims.forbidden_tools,
            })
            .map_err(|e| Refusal::new(Code::Policy, e.to_string()))?;
        let leeway = self.config.leeway_seconds;
        self.replay.check_and_record(&claims, token, agent, now, leeway)?;
        self.replay_dirty = true;
        let cgroup_id = record.cgroup_id;
        let previous = record.active.as_ref().map(|a| {
            let info =
                TableInfo { origins: a.origins.clone(), op: a.claims.op.clone(), jti: a.claims.jti.clone() };
            (a.names.clone(), clock::boot_deadline_now(a.claims.exp), Arc::new(info))
        });
        let deadline = clock::boot_deadline_now(claims.exp);
        let names = crate::dns::NameRules::new(compiled.names, &compiled.origins);
        // The directory learns the new table before the kernel switches to it, so the event
        // reader never sees a decision of a table it cannot name.
        let origins = Arc::new(compiled.origins);
        let info = TableInfo { origins: origins.clone(), op: claims.op.clone(), jti: claims.jti.clone() };
        let directory = Arc::clone(&self.directory);
        // Names: the kernel consults the learned addresses of an agent whose grant has some
        // (the flag goes on before the switch, off after it), and the DNS store moves them to
        // the new rules before the switch.
        let named = self.dns.is_some() && names.allows_any();
        if named {
            self.kernel
                .set_flag(cgroup_id, ztseg_common::dns::FLAG_NAMES, true)
                .map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        }
        let dns = self.dns.clone();
        let dns_info = Arc::new(info.clone());
        let table = self
            .kernel
            .grant_announced(cgroup_id, &compiled.entries, deadline, |table| {
                directory
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .add_table(cgroup_id, table, info);
                if let Some(dns) = &dns {
                    let mut dns = dns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    dns.regrant(cgroup_id, names.clone(), deadline, dns_info);
                }
            })
            .map_err(|e| {
                // The store goes back to the grant the kernel kept.
                if let Some(mut dns) = self.dns() {
                    match previous {
                        Some((names, deadline, info)) => dns.regrant(cgroup_id, names, deadline, info),
                        None => dns.withdraw(cgroup_id),
                    }
                }
                Refusal::new(Code::Dataplane, e.to_string())
            })?;
        if !named
            && matches!(self.kernel.agent(cgroup_id), Ok(Some(s)) if s.flags & ztseg_common::dns::FLAG_NAMES != 0)
            && let Err(e) = self.kernel.set_flag(cgroup_id, ztseg_common::dns::FLAG_NAMES, false)
        {
            // It only costs a lookup: the store holds no address for a grant without names.
            warn!(agent = %agent, error = %e, "cannot clear the agent's names flag");
        }
        self.directory().keep_tables(cgroup_id, table.table, table.previous);
        let active = ActiveGrant {
            token: token.to_owned(),
            hash,
            claims,
            origins,
            names,
            entries: table.entries,
            generation: self.generation,
            expiry_logged: false,
        };
        let summary = grant_summary(agent, &active);
        info!(agent = %agent, jti = %active.claims.jti, op = ?active.claims.op, entries = active.entries, source = source.name(), "token granted");
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("source".into(), json!(source.name()));
        fields.insert("op".into(), json!(active.claims.op));
        fields.insert("jti".into(), json!(active.claims.jti));
        fields.insert("exp".into(), json!(active.claims.exp));
        fields.insert("scope".into(), json!(active.claims.scope));
        fields.insert("tools".into(), json!(active.claims.tools));
        fields.insert("forbidden_tools".into(), json!(active.claims.forbidden_tools));
        fields.insert("entries".into(), json!(active.entries));
        if let Some(record) = self.agents.get_mut(agent) {
            record.active = Some(active);
            record.last_refusal = None;
        }
        self.audit_event("token_granted", fields);
        // A restored or recompiled token is the one already saved: nothing to write.
        if source != Source::Restore {
            self.mark_changed(agent);
        }
        Ok(summary)
    }

    /// Withdraws an agent's rights (its token and rules); the agent stays registered.
    pub fn revoke(&mut self, agent: &AgentId, why: &str) -> Result<(), Refusal> {
        let Some(record) = self.agents.get_mut(agent) else { return Ok(()) };
        let Some(active) = record.active.take() else { return Ok(()) };
        let cgroup_id = record.cgroup_id;
        if let Err(e) = self.withdraw(agent, cgroup_id) {
            // The kernel still grants: the daemon keeps saying so, and a retry can try again.
            if let Some(record) = self.agents.get_mut(agent) {
                record.active = Some(active);
            }
            return Err(Refusal::new(Code::Dataplane, e));
        }
        // After the kernel's switch to no table: decisions of the old one still in the ring
        // then lose their token, which is what a revocation means for them.
        self.directory().clear_tables(cgroup_id);
        let closed = self.close_agent_sockets(agent);
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("reason".into(), json!(why));
        fields.insert("sockets_closed".into(), json!(closed));
        self.audit_event("token_revoked", fields);
        info!(agent = %agent, "rights revoked: {why}");
        self.mark_changed(agent);
        Ok(())
    }

    /// Takes the agent's rules and deadline out of the kernel; if the kernel refuses, turns the
    /// agent's kill switch on instead (fail closed: `ztseg revive` lifts it) and says so in the
    /// log and the audit chain. An error means neither held and the kernel may still grant.
    fn withdraw(&mut self, agent: &AgentId, cgroup_id: u64) -> Result<(), String> {
        if let Some(mut dns) = self.dns() {
            dns.withdraw(cgroup_id);
        }
        let Err(e) = self.kernel.revoke(cgroup_id) else { return Ok(()) };
        match self.kernel.set_killed(cgroup_id, true) {
            Ok(()) => {
                error!(agent = %agent, error = %e, "revoking in the kernel failed; the agent's kill switch is on instead (`ztseg revive` lifts it)");
                let mut fields = Map::new();
                fields.insert("agent".into(), json!(agent.as_str()));
                fields.insert("reason".into(), json!(format!("revoking in the kernel failed: {e}")));
                self.audit_event("kill", fields);
                Ok(())
            }
            Err(kill) => {
                error!(agent = %agent, error = %e, kill_error = %kill, "revoking in the kernel failed, and so did the kill switch: the kernel may still grant until the token's exp");
                Err(format!(
                    "agent {agent}'s rules could not be taken out of the kernel ({e}) nor its kill switch set ({kill}); the kernel may still grant them until the token expires"
                ))
            }
        }
    }

    /// Revokes the agent's token in force and puts its `jti` on the revocation list first, so the
    /// same token presented again is refused until its `exp`, restarts included. Returns the
    /// revoked token's id, or `None` when the agent held none.
    pub fn revoke_durably(&mut self, agent: &AgentId, why: &str) -> Result<Option<String>, Refusal> {
        let Some(active) = self.agents.get(agent).and_then(|a| a.active.as_ref()) else {
            return Ok(None);
        };
        let (jti, iat, exp) = (active.claims.jti.clone(), active.claims.iat, active.claims.exp);
        let leeway = self.config.leeway_seconds;
        let revoked = Revoked {
            jti: &jti,
            agent: agent.as_str(),
            iat,
            token_until: exp + leeway,
            floor_until: iat + self.config.max_ttl_seconds + 2 * leeway,
        };
        let saved = self.revoked.add(&revoked, now_unix());
        // The rights go whatever happened to the list (fail closed); only its durability failed.
        self.revoke(agent, why)?;
        saved.map_err(|e| {
            Refusal::new(
                Code::Internal,
                format!("token {jti} is revoked, but the revocation list could not be saved ({e}); a restart would forget it"),
            )
        })?;
        Ok(Some(jti))
    }

    /// Removes an agent: rights revoked, unregistered (its cgroup is then denied everything), and
    /// its cgroup removed if empty.
    pub fn remove_agent(&mut self, agent: &AgentId, why: &str) {
        if let Err(refusal) = self.revoke_durably(agent, why) {
            warn!(agent = %agent, "{}", refusal.message);
        }
        let Some(record) = self.agents.remove(agent) else { return };
        self.by_cgroup.remove(&record.cgroup_id);
        self.by_path.remove(&record.cgroup);
        self.uids.remove(&record.uid);
        if let Err(e) = self.kernel.unregister(record.cgroup_id) {
            warn!(agent = %agent, error = %e, "unregistering in the kernel failed");
        }
        if let Some(mut dns) = self.dns() {
            dns.unregister(record.cgroup_id);
        }
        // Forgotten by the directory only once the kernel no longer knows it.
        self.directory().remove_agent(record.cgroup_id);
        if let Ok(path) = self.cgroups.resolve(&record.cgroup)
            && self.kernel.cgroup_processes(&path).map(|p| p.is_empty()).unwrap_or(false)
        {
            let _ = self.kernel.remove_cgroup(&path);
        }
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("reason".into(), json!(why));
        self.audit_event("agent_removed", fields);
        self.mark_changed(agent);
    }

    /// Pulls the kill switch: from the flag on, the packet programs pass none of the agent's
    /// bytes and every hook refuses it; its sockets are then closed so its connections end
    /// rather than stall; then its processes are frozen or killed if asked.
    pub fn kill(&mut self, agent: &AgentId, processes: KillProcesses) -> Result<Killed, Refusal> {
        let record = self
            .agents
            .get(agent)
            .ok_or_else(|| Refusal::new(Code::UnknownAgent, format!("no agent {agent} is registered")))?;
        let cgroup_id = record.cgroup_id;
        let cgroup = self.cgroups.resolve(&record.cgroup);
        self.kernel.set_killed(cgroup_id, true).map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        let closed = self.close_agent_sockets(agent);
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("sockets_closed".into(), json!(closed));
        // The network is cut whatever happens here; a failure to freeze or terminate is said.
        let outcome = match (processes, &cgroup) {
            (KillProcesses::Keep, _) => None,
            (_, Err(e)) => Some(ProcessesOutcome::Failed(e.to_string())),
            (KillProcesses::Freeze, Ok(path)) => Some(match self.kernel.freeze(path, true, FREEZE_WAIT) {
                Ok(frozen) => ProcessesOutcome::Frozen(frozen),
                Err(e) => ProcessesOutcome::Failed(e.to_string()),
            }),
            (KillProcesses::Terminate, Ok(path)) => Some(match self.kernel.kill_all(path) {
                Ok(count) => ProcessesOutcome::Terminated(count),
                Err(e) => ProcessesOutcome::Failed(e.to_string()),
            }),
        };
        match &outcome {
            None => {}
            Some(ProcessesOutcome::Frozen(frozen)) => {
                fields.insert("frozen".into(), json!(frozen));
            }
            Some(ProcessesOutcome::Terminated(count)) => {
                fields.insert("terminated".into(), json!(count));
            }
            Some(ProcessesOutcome::Failed(error)) => {
                warn!(agent = %agent, error = %error, "the kill switch is on, but its processes could not be frozen or terminated");
                fields.insert("processes_error".into(), json!(error));
            }
        }
        self.audit_event("kill", fields);
        warn!(agent = %agent, ?processes, "kill switch on");
        Ok(Killed::new(agent.as_str(), closed, outcome))
    }

    /// Releases the kill switch and thaws the agent's cgroup if `kill --freeze` froze it.
    pub fn revive(&mut self, agent: &AgentId) -> Result<Revived, Refusal> {
        let record = self
            .agents
            .get(agent)
            .ok_or_else(|| Refusal::new(Code::UnknownAgent, format!("no agent {agent} is registered")))?;
        let cgroup = self.cgroups.resolve(&record.cgroup);
        let (cgroup_id, granted) = (record.cgroup_id, record.active.is_some());
        // Rules the daemon revoked but the kernel kept (the kill switch stood in for the
        // revocation) go first: lifting the switch must not bring them back.
        if !granted
            && let Ok(Some(held)) = self.kernel.agent(cgroup_id)
            && (held.table != 0 || held.deadline_ns != 0)
        {
            self.kernel.revoke(cgroup_id).map_err(|e| {
                Refusal::new(
                    Code::Dataplane,
                    format!("agent {agent} still holds rules that were revoked and the kernel will not take them out ({e}); its kill switch stays on"),
                )
            })?;
        }
        self.kernel.set_killed(cgroup_id, false).map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        let thawed = match cgroup {
            Ok(path) if self.kernel.frozen(&path) => match self.kernel.freeze(&path, false, FREEZE_WAIT) {
                Ok(thawed) => Some(thawed),
                Err(e) => {
                    warn!(agent = %agent, error = %e, "cannot thaw the agent's cgroup");
                    Some(false)
                }
            },
            _ => None,
        };
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        if let Some(thawed) = thawed {
            fields.insert("thawed".into(), json!(thawed));
        }
        self.audit_event("revive", fields);
        warn!(agent = %agent, "kill switch off");
        Ok(Revived { agent: agent.to_string(), killed: false, thawed })
    }

    fn risk(&self) -> std::sync::MutexGuard<'_, risk::Engine> {
        self.risk.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The risk engine crossed `pause_at`: the agent's new connects, sends and inbound traffic
    /// are refused (reason `paused`) and no packet of its connections passes (they are held,
    /// not closed) until a person resumes it.
    pub fn pause(&mut self, agent: &AgentId) -> Result<(), Refusal> {
        let record = self.agents.get(agent).ok_or_else(|| unknown_agent(agent))?;
        if let Ok(Some(held)) = self.kernel.agent(record.cgroup_id)
            && (held.paused() || held.suspended())
        {
            return Ok(());
        }
        self.kernel
            .set_flag(record.cgroup_id, ztseg_common::agent::FLAG_PAUSED, true)
            .map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        self.audit_event("paused", fields);
        warn!(agent = %agent, "paused by the risk engine: flagged for review (`ztseg risk {agent}`, then `ztseg resume {agent} --reason ...`)");
        Ok(())
    }

    /// The risk engine crossed `suspend_at`: the agent is cut off as by the kill switch (no
    /// packet passes, its sockets are closed), its token revoked, its processes frozen or
    /// terminated (`[risk] on_suspend`), until a person resumes it.
    pub fn suspend(&mut self, agent: &AgentId) -> Result<(), Refusal> {
        let record = self.agents.get(agent).ok_or_else(|| unknown_agent(agent))?;
        let cgroup_id = record.cgroup_id;
        let cgroup = self.cgroups.resolve(&record.cgroup);
        if let Ok(Some(held)) = self.kernel.agent(cgroup_id)
            && held.suspended()
        {
            return Ok(());
        }
        self.kernel
            .set_flag(cgroup_id, ztseg_common::agent::FLAG_SUSPENDED, true)
            .map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        let closed = self.close_agent_sockets(agent);
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("sockets_closed".into(), json!(closed));
        match self.revoke_durably(agent, "suspended by the risk engine") {
            Ok(jti) => fields.insert("revoked".into(), json!(jti)),
            Err(refusal) => fields.insert("revoke_error".into(), json!(refusal.message)),
        };
        let outcome = match (self.config.risk.on_suspend, &cgroup) {
            (_, Err(e)) => Err(e.to_string()),
            (crate::config::OnSuspend::Freeze, Ok(path)) => self
                .kernel
                .freeze(path, true, FREEZE_WAIT)
                .map(|f| ("frozen", json!(f)))
                .map_err(|e| e.to_string()),
            (crate::config::OnSuspend::Terminate, Ok(path)) => {
                self.kernel.kill_all(path).map(|n| ("terminated", json!(n))).map_err(|e| e.to_string())
            }
        };
        match outcome {
            Ok((key, value)) => fields.insert(key.into(), value),
            Err(error) => {
                warn!(agent = %agent, error = %error, "suspended, but its processes could not be frozen or terminated");
                fields.insert("processes_error".into(), json!(error))
            }
        };
        self.audit_event("suspended", fields);
        warn!(agent = %agent, "suspended by the risk engine: cut off, token revoked (`ztseg risk {agent}`, then `ztseg resume {agent} --reason ...`)");
        Ok(())
    }

    /// A person lifts the agent's pause or suspension: recorded first (the risk engine takes
    /// it in log order and starts the score again from 0), then the flags go and a frozen
    /// cgroup is thawed. A suspended agent's token stays revoked: it needs a new one.
    pub fn resume(&mut self, agent: &AgentId, reason: &str, by_uid: u32) -> Result<Resumed, Refusal> {
        let record = self.agents.get(agent).ok_or_else(|| unknown_agent(agent))?;
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Refusal::new(
                Code::Malformed,
                "a resume needs a reason (--reason TEXT): it goes in the audit log",
            ));
        }
        let (cgroup_id, cgroup) = (record.cgroup_id, self.cgroups.resolve(&record.cgroup));
        let held = self.kernel.agent(cgroup_id).map_err(|e| Refusal::new(Code::Dataplane, e.to_string()))?;
        let was = match held {
            Some(s) if s.suspended() => AgentState::Suspended,
            Some(s) if s.paused() => AgentState::Paused,
            _ => {
                return Err(Refusal::new(
                    Code::NotHeld,
                    format!("agent {agent} is neither paused nor suspended"),
                ));
            }
        };
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("reason".into(), json!(reason));
        fields.insert("was".into(), json!(was.as_str()));
        fields.insert("by_uid".into(), json!(by_uid));
        self.audit_event("resume", fields);
        for flag in [ztseg_common::agent::FLAG_SUSPENDED, ztseg_common::agent::FLAG_PAUSED] {
            self.kernel.set_flag(cgroup_id, flag, false).map_err(|e| {
                Refusal::new(
                    Code::Dataplane,
                    format!("agent {agent} could not be resumed ({e}); it stays {}", was.as_str()),
                )
            })?;
        }
        let thawed = match cgroup {
            Ok(path) if self.kernel.frozen(&path) => {
                Some(self.kernel.freeze(&path, false, FREEZE_WAIT).unwrap_or_else(|e| {
                    warn!(agent = %agent, error = %e, "cannot thaw the agent's cgroup");
                    false
                }))
            }
            _ => None,
        };
        warn!(agent = %agent, reason, was = was.as_str(), "resumed by a person");
        Ok(Resumed { agent: agent.to_string(), thawed, was })
    }

    /// Every scored agent's risk now, 0-100 rounded down (for the metrics).
    pub fn risk_scores(&self) -> Vec<(Arc<str>, u8)> {
        let scores = self.risk().scores(risk::replay::us_of(SystemTime::now()));
        scores.into_iter().map(|(agent, (score, _))| (agent, score.floor() as u8)).collect()
    }

    /// `ztseg risk ID`.
    pub fn risk_view(&self, agent: &AgentId) -> Result<RiskView, Refusal> {
        if !self.agents.contains_key(agent) {
            return Err(unknown_agent(agent));
        }
        let view = self.risk().view(agent.as_str(), risk::replay::us_of(SystemTime::now()));
        let shown = risk::shown;
        Ok(RiskView {
            agent: agent.to_string(),
            contributors: view
                .contributors
                .into_iter()
                .map(|c| RiskContributor {
                    class: c.class.name().to_owned(),
                    points: shown(c.points),
                    reason: c.reason,
                })
                .collect(),
            pause_at: self.config.risk.pause_at,
            score: shown(view.score),
            standing: match view.standing {
                risk::Standing::Active => "active",
                risk::Standing::Paused => "paused",
                risk::Standing::Suspended => "suspended",
            }
            .to_owned(),
            suspend_at: self.config.risk.suspend_at,
        })
    }

    /// Destroys the TCP and UDP sockets of `agents` in one pass ([`Kernel::close_sockets`]); how many
    /// per agent, or `None` for all when that failed (logged: the packet programs still pass
    /// none of their bytes).
    fn close_sockets(&mut self, agents: &[AgentId]) -> Option<HashMap<AgentId, usize>> {
        let targets: Vec<(PathBuf, u64, &AgentId)> = agents
            .iter()
            .filter_map(|id| {
                let record = self.agents.get(id)?;
                Some((self.cgroups.resolve(&record.cgroup).ok()?, record.cgroup_id, id))
            })
            .collect();
        if targets.is_empty() {
            return Some(HashMap::new());
        }
        let paths: Vec<(&Path, u64)> = targets.iter().map(|(path, id, _)| (path.as_path(), *id)).collect();
        match self.kernel.close_sockets(&paths) {
            Ok(by_cgroup) => {
                let closed: HashMap<AgentId, usize> = targets
                    .iter()
                    .map(|(_, cgroup_id, id)| ((*id).clone(), by_cgroup.get(cgroup_id).copied().unwrap_or(0)))
                    .collect();
                info!(
                    agents = targets.len(),
                    closed = closed.values().sum::<usize>(),
                    "closed agents' sockets"
                );
                Some(closed)
            }
            Err(e) => {
                warn!(agents = targets.len(), error = %e, "cannot close the agents' sockets");
                None
            }
        }
    }

    /// [`Self::close_sockets`] for one agent.
    fn close_agent_sockets(&mut self, agent: &AgentId) -> Option<usize> {
        self.close_sockets(std::slice::from_ref(agent)).map(|closed| closed.get(agent).copied().unwrap_or(0))
    }

    /// Re-reads the policy dir and applies it: [`Self::load_policy`], then
    /// [`Self::apply_bindings`].
    pub fn reload_policy(&mut self) -> Value {
        let mut refused = Vec::new();
        let applied = self.load_policy(&mut refused);
        if applied {
            self.apply_bindings(&mut refused);
        }
        json!({
            "applied": applied,
            "files": self.files.len(),
            "bindings": self.policy.bindings.len(),
            "tools": self.policy.catalogue.tools.len(),
            "scopes": self.policy.catalogue.scopes.len(),
            "refused": refused,
        })
    }

    /// Reads the policy files. A file that fails to parse is refused and its last good version
    /// stays; a set of files that does not fit together is refused whole (returns false, and the
    /// previous policy stays in force). Each refusal goes to the audit log.
    pub fn load_policy(&mut self, refused: &mut Vec<String>) -> bool {
        let dir = self.config.policy_dir.clone();
        let present = match policy::policy_files(&dir) {
            Ok(files) => files,
            Err(e) => {
                warn!(dir = %dir.display(), "cannot read the policy dir; the previous policy stays in force: {e}");
                refused.push(e.to_string());
                self.audit_refusals(refused);
                return false;
            }
        };
        let mut next = self.files.clone();
        next.retain(|path, _| present.contains(path));
        for path in &present {
            match policy::load_file(path) {
                // Audit mode lets through what the catalogue would deny: only where the host's
                // config allows it (whoever writes a binding could otherwise open an agent).
                Ok(file) if !self.config.allow_audit_mode && !file.in_audit_mode().is_empty() => {
                    let e = format!(
                        "{}: {} in audit mode, which this host does not allow (allow_audit_mode = false in the daemon's config)",
                        path.display(),
                        file.in_audit_mode().join(", ")
                    );
                    warn!(file = %path.display(), kept_previous = next.contains_key(path), "policy file refused: {e}");
                    refused.push(e);
                }
                Ok(file) => {
                    next.insert(path.clone(), file);
                }
                Err(e) => {
                    let kept = next.contains_key(path);
                    warn!(file = %path.display(), kept_previous = kept, "policy file refused: {e}");
                    refused.push(e.to_string());
                }
            }
        }
        let files: Vec<PolicyFile> = next.values().cloned().collect();
        let assembled = match policy::assemble(&files) {
            Ok(set) => set,
            Err(e) => {
                warn!("policy refused as a whole, the previous policy stays in force: {e}");
                refused.push(e.to_string());
                self.audit_refusals(refused);
                return false;
            }
        };
        self.audit_refusals(refused);
        if assembled.catalogue != self.policy.catalogue {
            self.generation += 1;
        }
        self.files = next;
        self.policy = assembled;
        let mut fields = Map::new();
        fields.insert("files".into(), json!(self.files.len()));
        fields.insert("bindings".into(), json!(self.policy.bindings.len()));
        fields.insert("generation".into(), json!(self.generation));
        self.audit_event("policy_reloaded", fields);
        info!(files = self.files.len(), bindings = self.policy.bindings.len(), "policy loaded");
        true
    }

    fn audit_refusals(&mut self, refused: &[String]) {
        for reason in refused {
            let mut fields = Map::new();
            fields.insert("reason".into(), json!(reason));
            self.audit_event("policy_refused", fields);
        }
    }

    /// Makes the agents match the bindings in force: agents whose binding is gone lose their
    /// rights and registration; a binding whose token changed since it was last taken is applied
    /// (a re-read of the same token changes nothing, so a later `token apply` is not undone); and
    /// after a catalogue change every token in force is compiled again.
    pub fn apply_bindings(&mut self, refused: &mut Vec<String>) {
        let gone: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.bound_by.is_some() && !self.policy.bindings.contains_key(&a.id))
            .map(|a| a.id.clone())
            .collect();
        for agent in gone {
            self.remove_agent(&agent, "binding removed");
        }
        let bindings: Vec<_> = self.policy.bindings.values().cloned().collect();
        for binding in bindings {
            let id = binding.id.clone();
            let record = match self.ensure_agent(&id, binding.cgroup.as_deref(), None) {
                Ok(record) => record,
                Err(refusal) => {
                    warn!(agent = %id, "binding refused: {}", refusal.message);
                    refused.push(refusal.message);
                    continue;
                }
            };
            record.bound_by = Some(binding.path.clone());
            // Before its token: an agent bound in audit mode is dry-run from its first grant.
            if let Err(e) = self.set_mode(&id, binding.mode) {
                refused.push(e);
            }
            let token = match &binding.token {
                TokenSource::Inline(token) => Ok(token.trim().to_owned()),
                TokenSource::File(path) => {
                    fs::read_to_string(path).map(|t| t.trim().to_owned()).map_err(|e| {
                        Refusal::new(
                            Code::TokenFile,
                            format!("cannot read token file {} of agent {id}: {e}", path.display()),
                        )
                    })
                }
            };
            let token = match token {
                Ok(token) => token,
                Err(refusal) => {
                    refused.push(refusal.message);
                    continue;
                }
            };
            let hash = sha256(&token);
            if self.agents.get(&id).is_some_and(|a| a.binding_token == Some(hash)) {
                continue;
            }
            let result = self.apply_token(&id, &token, Source::Binding);
            // Taken, granted or not: the same file content is not tried again.
            if let Some(record) = self.agents.get_mut(&id) {
                record.binding_token = Some(hash);
            }
            self.mark_changed(&id);
            if let Err(refusal) = result {
                refused.push(refusal.message);
            }
        }
        // An agent without a binding (its binding gone while the daemon was down, or registered
        // by `ztseg run`) is enforced.
        let unbound: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.mode != Mode::Enforce && !self.policy.bindings.contains_key(&a.id))
            .map(|a| a.id.clone())
            .collect();
        for agent in unbound {
            if let Err(e) = self.set_mode(&agent, Mode::Enforce) {
                refused.push(e);
            }
        }
        let stale: Vec<(AgentId, String)> = self
            .agents
            .values()
            .filter_map(|a| {
                let active = a.active.as_ref()?;
                (active.generation != self.generation).then(|| (a.id.clone(), active.token.clone()))
            })
            .collect();
        for (agent, token) in stale {
            if let Err(refusal) = self.apply_token(&agent, &token, Source::Restore) {
                // The token no longer fits the catalogue: fail closed.
                if let Err(e) = self.revoke(&agent, &format!("catalogue changed: {}", refusal.message)) {
                    warn!(agent = %agent, "{}", e.message);
                }
            }
        }
    }

    /// Puts the agent in `mode` in the kernel, then in its record, with a `mode` audit record,
    /// unless it is in that mode already. On a failure the record keeps the mode the kernel
    /// still has, so the next policy reload tries again.
    fn set_mode(&mut self, agent: &AgentId, mode: Mode) -> Result<(), String> {
        let Some(record) = self.agents.get_mut(agent) else { return Ok(()) };
        let was = record.mode;
        if was == mode {
            return Ok(());
        }
        if let Err(e) = self.kernel.set_mode(record.cgroup_id, mode.code()) {
            let message = format!("cannot put agent {agent} in {mode} mode (it stays in {was} mode): {e}");
            error!(agent = %agent, "{message}");
            return Err(message);
        }
        record.mode = mode;
        info!(agent = %agent, mode = %mode, was = %was, "agent mode changed");
        let mut fields = Map::new();
        fields.insert("agent".into(), json!(agent.as_str()));
        fields.insert("mode".into(), json!(mode.as_str()));
        fields.insert("was".into(), json!(was.as_str()));
        self.audit_event("mode", fields);
        Ok(())
    }

    /// Restores agents saved by the previous run and removes kernel agents nobody knows about.
    pub fn restore(&mut self) {
        let mut persisted: Vec<PersistedAgent> = Vec::new();
        if let Ok(dir) = fs::read_dir(self.persisted_dir()) {
            for entry in dir.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                match fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                {
                    Ok(saved) => persisted.push(saved),
                    // Its agent is then unknown: forget_strangers unregisters it (fail closed).
                    Err(e) => warn!(path = %path.display(), "cannot read saved agent state: {e}"),
                }
            }
        }
        // Agents with a saved uid first, so one without cannot be given another's uid.
        persisted.sort_by_key(|saved| saved.uid.is_none());
        let mut lapsed = Vec::new();
        for saved in persisted {
            let Ok(id) = saved.id.parse::<AgentId>() else { continue };
            match self.ensure_agent(&id, Some(&saved.cgroup), saved.uid) {
                Ok(record) => {
                    record.binding_token = saved
                        .binding_token_sha256
                        .as_deref()
                        .and_then(|h| hex::decode(h).ok())
                        .and_then(|b| b.try_into().ok());
                }
                Err(refusal) => {
                    warn!(agent = %id, "cannot restore agent: {}", refusal.message);
                    continue;
                }
            }
            if let Some(token) = saved.token
                && let Err(refusal) = self.apply_token(&id, &token, Source::Restore)
            {
                info!(agent = %id, "saved token not restored: {}", refusal.message);
                // An expired or refused token grants nothing: drop its table too, and close the
                // sockets the kernel has been passing no packet of since (all in one pass below).
                if let Some(cgroup_id) = self.agents.get(&id).map(|record| record.cgroup_id) {
                    // An error is logged loudly; nothing else can be done at start.
                    let _ = self.withdraw(&id, cgroup_id);
                }
                // The saved state forgets the token: a later catalogue that covers it again
                // does not grant it again without anyone presenting it.
                self.mark_changed(&id);
                lapsed.push(id);
            }
        }
        // An agent without a token holds no rules: a revocation the kernel refused before the
        // restart (the kill switch stood in) is tried again now.
        let holding: Vec<(AgentId, u64)> = self
            .agents
            .iter()
            .filter(|(_, record)| record.active.is_none())
            .filter(|(_, record)| {
                matches!(self.kernel.agent(record.cgroup_id), Ok(Some(held)) if held.table != 0 || held.deadline_ns != 0)
            })
            .map(|(id, record)| (id.clone(), record.cgroup_id))
            .collect();
        for (id, cgroup_id) in holding {
            let _ = self.withdraw(&id, cgroup_id);
        }
        self.close_sockets(&lapsed);
    }

    /// Kernel agents that no binding, no saved state and no `ztseg run` explains lose everything.
    pub fn forget_strangers(&mut self) {
        let known: std::collections::HashSet<u64> = self.agents.values().map(|a| a.cgroup_id).collect();
        let Ok(kernel) = self.kernel.agents() else { return };
        for (cgroup_id, _) in kernel {
            if !known.contains(&cgroup_id) {
                warn!(cgroup_id, "unknown agent in the pinned maps: unregistering it");
                let _ = self.kernel.unregister(cgroup_id);
            }
        }
    }

    /// Marks the agent's saved state stale; `persist` writes it when the lock is released, so
    /// starting with 10,000 bindings writes each agent's file once.
    fn mark_changed(&mut self, agent: &AgentId) {
        self.persist_dirty.insert(agent.clone());
    }

    /// Writes the saved state of each agent that changed (id, cgroup, token in force), or removes
    /// it for an agent that is gone.
    pub fn persist(&mut self) {
        if self.persist_dirty.is_empty() {
            return;
        }
        let dir = self.persisted_dir();
        if let Err(e) = fs::create_dir_all(&dir) {
            warn!(error = %e, dir = %dir.display(), "cannot save agent state");
            return;
        }
        for id in std::mem::take(&mut self.persist_dirty) {
            let path = dir.join(format!("{id}.json"));
            let result = match self.agents.get(&id) {
                Some(a) => {
                    let saved = PersistedAgent {
                        id: a.id.to_string(),
                        cgroup: a.cgroup.clone(),
                        uid: Some(a.uid),
                        token: a.active.as_ref().map(|g| g.token.clone()),
                        binding_token_sha256: a.binding_token.map(hex::encode),
                    };
                    serde_json::to_vec_pretty(&saved)
                        .map_err(io::Error::other)
                        .and_then(|bytes| rewrite_file(&path, &bytes))
                }
                None => match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            if let Err(e) = result {
                warn!(agent = %id, error = %e, "cannot save agent state");
            }
        }
    }

    /// Saves the replay cache if it changed.
    pub fn save_replay(&mut self) {
        if let Some(snapshot) = self.replay_snapshot() {
            write_replay(&snapshot);
        }
    }

    /// The replay cache's file contents, if it changed, to be written (`write_replay`) after the
    /// lock is released: its fsync would otherwise hold up token applies and kills.
    pub fn replay_snapshot(&mut self) -> Option<ReplaySnapshot> {
        if !self.replay_dirty {
            return None;
        }
        self.replay.prune(now_unix(), self.config.leeway_seconds);
        self.replay_dirty = false;
        self.replay_generation += 1;
        Some(ReplaySnapshot {
            path: self.replay_path(),
            cache: self.replay.clone(),
            generation: self.replay_generation,
        })
    }

    /// Logs each token's expiry once.
    pub fn sweep_expired(&mut self) {
        let now = now_unix();
        let mut expired = Vec::new();
        for record in self.agents.values_mut() {
            if let Some(active) = &mut record.active
                && !active.expiry_logged
                && now >= active.claims.exp
            {
                active.expiry_logged = true;
                expired.push((record.id.clone(), active.claims.jti.clone(), active.claims.op.clone()));
            }
        }
        // The kernel stopped their bytes at exp on its own; their sockets go now, in one pass.
        let ids: Vec<AgentId> = expired.iter().map(|(agent, ..)| agent.clone()).collect();
        let closed = self.close_sockets(&ids);
        for (agent, jti, op) in expired {
            info!(agent = %agent, jti = %jti, "token expired");
            let mut fields = Map::new();
            fields.insert(
                "sockets_closed".into(),
                json!(closed.as_ref().map(|c| c.get(&agent).copied().unwrap_or(0))),
            );
            fields.insert("agent".into(), json!(agent.as_str()));
            fields.insert("jti".into(), json!(jti));
            fields.insert("op".into(), json!(op));
            self.audit_event("token_expired", fields);
        }
    }

    /// `ztseg agents --json`.
    pub fn agents(&self) -> Vec<AgentRow> {
        let now = now_unix();
        let scores = self.risk().scores(risk::replay::us_of(SystemTime::now()));
        self.agents
            .values()
            .map(|a| {
                let kernel = self.kernel.agent(a.cgroup_id).ok().flatten();
                let stats = kernel.and_then(|k| self.kernel.stats(k.slot).ok()).unwrap_or_default();
                let killed = kernel.is_some_and(|k| k.killed());
                let suspended = kernel.is_some_and(|k| k.suspended());
                let paused = kernel.is_some_and(|k| k.paused());
                // As the kernel enforces it: a mode it does not know enforces.
                let mode =
                    if kernel.is_some_and(|k| k.audit()) { AgentMode::Audit } else { AgentMode::Enforce };
                let state = match (&a.active, killed, suspended, paused) {
                    (_, true, ..) => AgentState::Killed,
                    (_, _, true, _) => AgentState::Suspended,
                    (.., true) => AgentState::Paused,
                    (None, ..) => AgentState::NoToken,
                    (Some(g), ..) if now >= g.claims.exp => AgentState::Expired,
                    (Some(_), ..) => AgentState::Active,
                };
                AgentRow {
                    agent: a.id.to_string(),
                    binding: a.bound_by.clone(),
                    cgroup: a.cgroup.clone(),
                    cgroup_id: a.cgroup_id,
                    decisions: stats.decisions,
                    denied: stats.denied,
                    events_dropped: stats.dropped,
                    events_emitted: stats.emitted,
                    events_written: a.events_written.load(Ordering::Relaxed),
                    exp: a.active.as_ref().map(|g| g.claims.exp),
                    expires_in: a.active.as_ref().map(|g| g.claims.exp as i64 - now as i64),
                    forbidden_tools: a.active.as_ref().map(|g| g.claims.forbidden_tools.clone()),
                    jti: a.active.as_ref().map(|g| g.claims.jti.clone()),
                    last_refusal: a.last_refusal.clone(),
                    mode,
                    op: a.active.as_ref().and_then(|g| g.claims.op.clone()),
                    refused_unrecorded: stats.unrecorded,
                    risk: scores.get(a.id.as_str()).map_or(0, |(score, _)| score.floor() as u8),
                    rules: a.active.as_ref().map_or(0, |g| g.entries),
                    scope: a.active.as_ref().map(|g| g.claims.scope.clone()),
                    state,
                    summarised: stats.summarised,
                    tools: a.active.as_ref().map(|g| g.claims.tools.clone()),
                    uid: a.uid,
                }
            })
            .collect()
    }

    /// How many tokens are on the revocation list.
    pub fn revoked_tokens(&self) -> usize {
        self.revoked.len()
    }

    pub fn resolve_cgroup(&self, relative: &Path) -> Option<PathBuf> {
        self.cgroups.resolve(relative).ok()
    }
}

fn unknown_agent(agent: &AgentId) -> Refusal {
    Refusal::new(Code::UnknownAgent, format!("no agent {agent} is registered"))
}

fn grant_summary(agent: &AgentId, active: &ActiveGrant) -> TokenApplied {
    TokenApplied {
        agent: agent.to_string(),
        exp: active.claims.exp,
        jti: active.claims.jti.clone(),
        op: active.claims.op.clone(),
        rules: active.entries,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
