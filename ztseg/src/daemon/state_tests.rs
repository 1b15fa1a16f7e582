//! The state's logic against the fake kernel: grants, refreshes, supersession, revocation, the
//! kill switch, restore after a restart, and expiry. Every test checks what the kernel was left
//! holding, not only what the state answered.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use serde_json::{Map, Value};
use ztseg_common::agent::AgentState;

use super::{Source, State, Trail};
use crate::{
    agent_id::AgentId,
    audit::{AuditLog, AuditOptions, HostKey},
    cgroup::CgroupFs,
    clock,
    config::Config,
    control::KillProcesses,
    daemon::{
        audit_writer,
        directory::Directory,
        fake_kernel::{Call, FakeKernel, Op},
        kernel::Kernel as _,
    },
    token::{
        IssueParams, ReplayCache, Revocations, issue,
        test_support::{ISS, TempDir, TestIssuer, agent, config},
    },
};

/// Where the fake cgroup2 hierarchy is "mounted": nothing is ever created there.
const MOUNT: &str = "/fake-cgroup2";

const CATALOGUE: &str = r#"
[baseline]
allow = [{ to = "10.0.53.53/32", ports = [53], proto = "udp" }]

[scopes."read:sales"]
allow = [{ to = "10.0.5.12/32", ports = [5432], proto = "tcp" }]

[scopes."write:report"]
allow = [{ to = "10.0.6.20/32", ports = [443], proto = "tcp" }]
"#;

/// Audit records the writer published, in order.
type Records = Arc<Mutex<Vec<Map<String, Value>>>>;

/// A host for states: a config, policy, state and audit dirs under one temp dir, and an issuer.
struct Host {
    dir: TempDir,
    issuer: TestIssuer,
    /// Audit logs made so far (each state gets its own file: a log is locked while open).
    logs: Mutex<u32>,
}

impl Host {
    fn new() -> Self {
        let dir = TempDir::new("state");
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/catalogue.toml"), CATALOGUE).unwrap();
        Self { dir, issuer: TestIssuer::ed25519(), logs: Mutex::new(0) }
    }

    fn config(&self) -> Config {
        Config {
            policy_dir: self.dir.path().join("policies"),
            state_dir: self.dir.path().join("state"),
            audit_log: self.dir.path().join("audit/audit.jsonl"),
            allow_audit_mode: true,
            ..config(&[(ISS, &self.issuer.keys.jwks, &["EdDSA"])])
        }
    }

    /// A state as the daemon starts one, on `kernel`, with its policy loaded.
    fn state(&self, kernel: FakeKernel) -> (State<FakeKernel>, Records) {
        self.state_with(kernel, self.config())
    }

    /// [`Self::state`] with another config.
    fn state_with(&self, kernel: FakeKernel, config: Config) -> (State<FakeKernel>, Records) {
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let replay = ReplayCache::load(&config.state_dir.join("replay.json")).unwrap();
        let revoked =
            Revocations::load(&config.state_dir.join("revoked.json"), clock::unix_now_secs()).unwrap();
        let log_path = {
            let mut n = self.logs.lock().unwrap();
            *n += 1;
            self.dir.path().join(format!("audit/audit-{n}.jsonl"))
        };
        let (log, _) =
            AuditLog::open(&log_path, HostKey::generate().unwrap(), AuditOptions::default()).unwrap();
        let records = Records::default();
        let risk: Arc<std::sync::Mutex<crate::risk::Engine>> = Arc::default();
        let audit = {
            let records = records.clone();
            let (actions, _) = tokio::sync::mpsc::unbounded_channel();
            let scoring = audit_writer::Scoring { enabled: true, engine: risk.clone(), actions };
            audit_writer::start(log, scoring, move |line: audit_writer::Line| {
                let Ok(Value::Object(record)) = serde_json::from_slice(&line.json) else {
                    panic!("a published line is not a JSON object")
                };
                records.lock().unwrap().push(record)
            })
            .unwrap()
        };
        let trail = Trail { audit, directory: Arc::new(RwLock::new(Directory::default())), risk };
        let mut state =
            State::new(config, CgroupFs::at(MOUNT), kernel, self.issuer.verifier(), replay, revoked, trail);
        let mut refused = Vec::new();
        assert!(state.load_policy(&mut refused), "{refused:?}");
        (state, records)
    }

    /// A token for `agent` granting `scopes`, issued `age` seconds ago and valid `ttl` seconds
    /// from its issue.
    fn token(&self, agent: &str, scopes: &[&str], age: i64, ttl: u64) -> String {
        let mut params = IssueParams::new(ISS, agent.parse().unwrap());
        params.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        params.ttl_seconds = ttl;
        let iat = clock::unix_now_secs().saturating_add_signed(-age);
        issue(&self.issuer.private_pem, &params, iat).unwrap()
    }
}

/// The audit records handed over so far, once the writer has appended them all.
fn audited(state: &State<FakeKernel>, records: &Records) -> Vec<Map<String, Value>> {
    state.audit.close();
    records.lock().unwrap().clone()
}

fn events<'a>(records: &'a [Map<String, Value>], event: &str) -> Vec<&'a Map<String, Value>> {
    records.iter().filter(|r| r["event"] == event).collect()
}

/// A registered agent (as `ztseg run` registers one) and its cgroup id.
fn register(state: &mut State<FakeKernel>, id: &str) -> (AgentId, u64) {
    let id = agent(id);
    let cgroup_id = state.ensure_agent(&id, None, None).unwrap().cgroup_id;
    (id, cgroup_id)
}

/// The destinations of the agent's rules in the fake kernel, sorted.
fn destinations(kernel: &FakeKernel, cgroup_id: u64) -> Vec<String> {
    let mut nets: Vec<String> = kernel.rules(cgroup_id).iter().map(|e| e.net.to_string()).collect();
    nets.sort();
    nets
}

/// The boot-clock deadline a grant of a token expiring at `exp` should have set, within 2 s.
#[track_caller]
fn assert_deadline(deadline_ns: u64, exp: u64) {
    let expected = clock::boot_deadline_now(exp);
    assert!(
        deadline_ns.abs_diff(expected) < 2_000_000_000,
        "deadline {deadline_ns} is not the token's exp {exp} on the boot clock ({expected})"
    );
}

fn exp_of(state: &State<FakeKernel>, id: &AgentId) -> u64 {
    state.agents[id].active.as_ref().unwrap().claims.exp
}

fn jti_of(state: &State<FakeKernel>, id: &AgentId) -> Option<String> {
    state.agents[id].active.as_ref().map(|g| g.claims.jti.clone())
}

fn agent_state(state: &State<FakeKernel>, id: &AgentId) -> String {
    let agents = state.agents();
    agents.iter().find(|a| a.agent == id.as_str()).unwrap().state.as_str().to_owned()
}

#[test]
fn a_registered_agent_has_no_rights_until_a_token_grants_its_rules_until_exp() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");

    let cgroup = PathBuf::from(MOUNT).join("ztseg.slice/analyst-7");
    assert_eq!(state.kernel.calls[..2], [Call::EnsureCgroup(cgroup), Call::Register(cgroup_id)]);
    let registered = state.kernel.state(cgroup_id);
    assert_eq!((registered.table, registered.deadline_ns, registered.flags), (0, 0, 0));
    assert_eq!(agent_state(&state, &id), "no_token");

    let token = host.token("analyst-7", &["read:sales"], 0, 300);
    state.apply_token(&id, &token, Source::Apply).unwrap();

    let granted = state.kernel.state(cgroup_id);
    assert_ne!(granted.table, 0);
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.5.12/32", "10.0.53.53/32"]);
    assert_deadline(granted.deadline_ns, exp_of(&state, &id));
    assert_eq!(state.agents[&id].active.as_ref().unwrap().entries, 2);
    assert_eq!(agent_state(&state, &id), "active");
}

#[test]
fn a_newer_token_replaces_the_table_and_the_deadline() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 10, 300), Source::Apply).unwrap();
    let first = state.kernel.state(cgroup_id);

    let refresh = host.token("analyst-7", &["write:report"], 0, 600);
    state.apply_token(&id, &refresh, Source::Apply).unwrap();

    let second = state.kernel.state(cgroup_id);
    assert_ne!(second.table, first.table);
    assert!(!state.kernel.pins.tables.contains_key(&first.table), "the replaced table is left behind");
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.53.53/32", "10.0.6.20/32"]);
    assert!(second.deadline_ns > first.deadline_ns);
    assert_deadline(second.deadline_ns, exp_of(&state, &id));
    assert_eq!(state.agents[&id].active.as_ref().unwrap().token, refresh);
}

#[test]
fn the_token_in_force_presented_again_changes_nothing() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let token = host.token("analyst-7", &["read:sales"], 0, 300);
    state.apply_token(&id, &token, Source::Apply).unwrap();
    let before = (state.kernel.state(cgroup_id), state.kernel.calls.len());

    state.apply_token(&id, &token, Source::Apply).unwrap();

    assert_eq!((state.kernel.state(cgroup_id), state.kernel.calls.len()), before);
}

#[test]
fn an_older_token_than_the_one_in_force_is_refused_as_superseded() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let older = host.token("analyst-7", &["read:sales"], 20, 300);
    let newer = host.token("analyst-7", &["write:report"], 0, 300);

    // Positive control: the older token is granted while nothing newer is in force.
    state.apply_token(&id, &older, Source::Apply).unwrap();
    state.apply_token(&id, &newer, Source::Apply).unwrap();
    let in_force = state.kernel.state(cgroup_id);

    let refusal = state.apply_token(&id, &older, Source::Apply).unwrap_err();

    assert_eq!(refusal.code.as_str(), "superseded");
    assert_eq!(state.kernel.state(cgroup_id), in_force);
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.53.53/32", "10.0.6.20/32"]);
    assert_eq!(state.agents[&id].active.as_ref().unwrap().token, newer);
    assert_eq!(state.agents[&id].last_refusal.as_deref(), Some(refusal.message.as_str()));
}

#[test]
fn a_refused_grant_leaves_the_kernel_and_the_token_in_force_as_they_were() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let first = host.token("analyst-7", &["read:sales"], 10, 300);
    state.apply_token(&id, &first, Source::Apply).unwrap();
    let in_force = state.kernel.state(cgroup_id);

    let unknown_scope = host.token("analyst-7", &["read:everything"], 0, 300);
    assert_eq!(state.apply_token(&id, &unknown_scope, Source::Apply).unwrap_err().code.as_str(), "policy");
    state.kernel.fail(Op::Grant);
    let refresh = host.token("analyst-7", &["write:report"], 0, 300);
    assert_eq!(state.apply_token(&id, &refresh, Source::Apply).unwrap_err().code.as_str(), "dataplane");

    assert_eq!(state.kernel.state(cgroup_id), in_force);
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.5.12/32", "10.0.53.53/32"]);
    assert_eq!(state.agents[&id].active.as_ref().unwrap().token, first);

    // Positive control: once the kernel takes writes again, the same refresh is granted.
    state.kernel.heal(Op::Grant);
    state.apply_token(&id, &refresh, Source::Apply).unwrap();
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.53.53/32", "10.0.6.20/32"]);
}

#[test]
fn a_revoked_token_loses_its_rules_and_sockets_and_stays_refused_across_a_restart() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let token = host.token("analyst-7", &["read:sales"], 0, 300);
    state.apply_token(&id, &token, Source::Apply).unwrap();
    let jti = jti_of(&state, &id);
    state.kernel.open_sockets(cgroup_id, 2);

    assert_eq!(state.revoke_durably(&id, "test").unwrap(), jti);

    let revoked = state.kernel.state(cgroup_id);
    assert_eq!((revoked.table, revoked.deadline_ns), (0, 0));
    assert!(destinations(&state.kernel, cgroup_id).is_empty());
    let (revoke, close) = (Call::Revoke(cgroup_id), Call::CloseSockets(vec![cgroup_id]));
    assert!(state.kernel.position(&revoke) < state.kernel.position(&close), "{:?}", state.kernel.calls);
    assert_eq!(state.kernel.pins.open_sockets.get(&cgroup_id), None, "sockets left open");
    assert_eq!(state.agents[&id].active.as_ref().map(|g| &g.token), None);

    assert_eq!(state.apply_token(&id, &token, Source::Apply).unwrap_err().code.as_str(), "revoked");
    assert_eq!(state.kernel.state(cgroup_id), revoked);

    // A restarted daemon reads the list back: the token is still refused.
    let (mut restarted, _) = host.state(state.kernel.restarted());
    restarted.ensure_agent(&id, None, None).unwrap();
    assert_eq!(restarted.apply_token(&id, &token, Source::Apply).unwrap_err().code.as_str(), "revoked");
    assert_eq!(restarted.kernel.state(cgroup_id).table, 0);

    // Positive control: a token issued after the revoked one is granted.
    let later = host.token("analyst-7", &["read:sales"], -1, 300);
    restarted.apply_token(&id, &later, Source::Apply).unwrap();
    assert_ne!(restarted.kernel.state(cgroup_id).table, 0);
}

#[test]
fn kill_sets_the_flag_before_closing_sockets_and_revive_clears_it() {
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let (other, other_id) = register(&mut state, "analyst-8");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.apply_token(&other, &host.token("analyst-8", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.kernel.open_sockets(cgroup_id, 3);
    state.kernel.open_sockets(other_id, 1);

    let answer = state.kill(&id, KillProcesses::Keep).unwrap();

    assert_eq!((answer.killed, answer.sockets_closed), (true, Some(3)));
    assert!(state.kernel.state(cgroup_id).killed());
    let (flag, close) = (Call::SetKilled(cgroup_id, true), Call::CloseSockets(vec![cgroup_id]));
    assert!(state.kernel.position(&flag) < state.kernel.position(&close), "{:?}", state.kernel.calls);
    assert_eq!(agent_state(&state, &id), "killed");
    // Killing does not take the rules: they wait behind the flag.
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.5.12/32", "10.0.53.53/32"]);
    // Positive control: the other agent is untouched.
    assert!(!state.kernel.state(other_id).killed());
    assert_eq!(state.kernel.pins.open_sockets.get(&other_id), Some(&1));

    state.revive(&id).unwrap();

    assert!(!state.kernel.state(cgroup_id).killed());
    assert_eq!(agent_state(&state, &id), "active");
    let records = audited(&state, &records);
    assert_eq!(events(&records, "kill")[0]["sockets_closed"], 3);
    assert_eq!(events(&records, "revive").len(), 1);
}

#[test]
fn a_token_applied_while_killed_is_granted_but_the_kill_switch_stays_on() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.kill(&id, KillProcesses::Keep).unwrap();

    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();

    let killed = state.kernel.state(cgroup_id);
    assert!(killed.killed(), "a grant lifted the kill switch");
    assert_ne!(killed.table, 0);
    assert_eq!(agent_state(&state, &id), "killed");
    assert!(!state.kernel.calls.contains(&Call::SetKilled(cgroup_id, false)));
}

#[test]
fn a_kill_the_kernel_does_not_take_is_refused_and_closes_nothing() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.kernel.open_sockets(cgroup_id, 2);
    state.kernel.fail(Op::SetKilled);

    assert_eq!(state.kill(&id, KillProcesses::Freeze).unwrap_err().code.as_str(), "dataplane");

    assert!(!state.kernel.state(cgroup_id).killed());
    assert!(!state.kernel.calls.iter().any(|c| matches!(c, Call::CloseSockets(_) | Call::Freeze(..))));
    assert_eq!(state.kernel.pins.open_sockets.get(&cgroup_id), Some(&2));
    assert_eq!(state.kill(&agent("nobody"), KillProcesses::Keep).unwrap_err().code.as_str(), "unknown_agent");
}

#[test]
fn kill_freezes_or_terminates_the_processes_and_revive_thaws_them() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let cgroup = PathBuf::from(MOUNT).join("ztseg.slice/analyst-7");

    let answer = state.kill(&id, KillProcesses::Freeze).unwrap();
    assert_eq!(answer.frozen, Some(true));
    assert!(state.kernel.frozen(&cgroup));
    assert!(
        state.kernel.position(&Call::SetKilled(cgroup_id, true))
            < state.kernel.position(&Call::Freeze(cgroup.clone(), true))
    );
    let answer = state.revive(&id).unwrap();
    assert_eq!(answer.thawed, Some(true));
    assert!(!state.kernel.frozen(&cgroup));

    // Revived without a freeze: nothing to thaw.
    state.kill(&id, KillProcesses::Keep).unwrap();
    assert_eq!(state.revive(&id).unwrap().thawed, None);

    state.kernel.pins.processes.insert(cgroup.clone(), vec![41, 42]);
    let answer = state.kill(&id, KillProcesses::Terminate).unwrap();
    assert_eq!(answer.terminated, Some(2));
    assert!(state.kernel.calls.contains(&Call::KillAll(cgroup)));

    // A freeze that fails is said, and the network stays cut.
    state.kernel.fail(Op::Freeze);
    let answer = state.kill(&id, KillProcesses::Freeze).unwrap();
    assert!(answer.processes_error.is_some(), "{answer:?}");
    assert!(state.kernel.state(cgroup_id).killed());
}

#[test]
fn a_restarted_daemon_restores_its_agents_grants_and_kill_switches_and_forgets_strangers() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (killed, killed_id) = register(&mut state, "analyst-7");
    let (granted, granted_id) = register(&mut state, "analyst-8");
    state.apply_token(&killed, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.apply_token(&granted, &host.token("analyst-8", &["write:report"], 0, 300), Source::Apply).unwrap();
    state.kill(&killed, KillProcesses::Keep).unwrap();
    state.persist();
    let mut pins = state.kernel.restarted();
    // An agent in the pinned maps that nobody knows about.
    pins.pins.agents.insert(4242, AgentState { slot: 99, ..AgentState::default() });
    let before: Vec<_> =
        state.agents.values().map(|a| (a.id.clone(), a.cgroup_id, a.uid, jti_of(&state, &a.id))).collect();
    let kernel_before = [killed_id, granted_id].map(|id| state.kernel.state(id));
    drop(state);

    let (mut restarted, _) = host.state(pins);
    restarted.restore();
    restarted.apply_bindings(&mut Vec::new());
    restarted.forget_strangers();

    let after: Vec<_> = restarted
        .agents
        .values()
        .map(|a| (a.id.clone(), a.cgroup_id, a.uid, jti_of(&restarted, &a.id)))
        .collect();
    assert_eq!(after, before);
    for ((cgroup_id, id), was) in
        [(killed_id, &killed), (granted_id, &granted)].into_iter().zip(kernel_before)
    {
        let now = restarted.kernel.state(cgroup_id);
        assert_eq!((now.slot, now.flags), (was.slot, was.flags), "{id}");
        assert_deadline(now.deadline_ns, exp_of(&restarted, id));
    }
    assert!(restarted.kernel.state(killed_id).killed(), "the restart lifted the kill switch");
    assert!(!restarted.kernel.state(granted_id).killed());
    assert_eq!(destinations(&restarted.kernel, killed_id), ["10.0.5.12/32", "10.0.53.53/32"]);
    assert_eq!(destinations(&restarted.kernel, granted_id), ["10.0.53.53/32", "10.0.6.20/32"]);
    assert_eq!(agent_state(&restarted, &killed), "killed");
    assert!(!restarted.kernel.calls.iter().any(|c| matches!(c, Call::SetKilled(..) | Call::CloseSockets(_))));
    // The stranger is unregistered; the known agents are not.
    assert_eq!(restarted.kernel.agents().unwrap().len(), 2);
    assert!(restarted.kernel.calls.contains(&Call::Unregister(4242)));
}

#[test]
fn a_saved_token_the_catalogue_no_longer_covers_is_not_restored() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.persist();
    let mut pins = state.kernel.restarted();
    pins.open_sockets(cgroup_id, 2);
    drop(state);
    let narrower = CATALOGUE.replace("[scopes.\"read:sales\"]", "[scopes.\"read:other\"]");
    std::fs::write(host.config().policy_dir.join("catalogue.toml"), narrower).unwrap();

    let (mut restarted, _) = host.state(pins);
    restarted.restore();

    assert_eq!(restarted.agents[&id].cgroup_id, cgroup_id, "the agent itself is restored");
    assert_eq!(jti_of(&restarted, &id), None);
    let lapsed = restarted.kernel.state(cgroup_id);
    assert_eq!((lapsed.table, lapsed.deadline_ns), (0, 0));
    assert!(restarted.kernel.calls.contains(&Call::CloseSockets(vec![cgroup_id])));
    assert_eq!(restarted.kernel.pins.open_sockets.get(&cgroup_id), None);

    // The saved state forgot the token: a catalogue that covers it again, at the next start,
    // does not grant it again without anyone presenting it.
    restarted.persist();
    let pins = restarted.kernel.restarted();
    drop(restarted);
    std::fs::write(host.config().policy_dir.join("catalogue.toml"), CATALOGUE).unwrap();
    let (mut again, _) = host.state(pins);
    again.restore();
    assert_eq!(jti_of(&again, &id), None);
    assert_eq!(again.kernel.state(cgroup_id).table, 0);
}

#[test]
fn a_revoke_the_kernel_refuses_turns_the_kill_switch_on_or_keeps_the_grant_for_a_retry() {
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    let jti = jti_of(&state, &id);

    // The rules cannot be taken out: the kill switch cuts the agent off instead.
    state.kernel.fail(Op::Revoke);
    assert_eq!(state.revoke_durably(&id, "test").unwrap(), jti);
    assert!(state.kernel.state(cgroup_id).killed(), "the kernel still grants and nothing cut it off");
    assert_eq!(agent_state(&state, &id), "killed");
    assert_eq!(events(&audited(&state, &records), "kill").len(), 1);
    // Lifting the switch must not bring the revoked rules back: while the kernel keeps them,
    // revive is refused and the switch stays on; once it takes writes, revive withdraws them.
    assert_eq!(state.revive(&id).unwrap_err().code.as_str(), "dataplane");
    assert!(state.kernel.state(cgroup_id).killed());
    assert_ne!(state.kernel.state(cgroup_id).table, 0);
    // A restarted daemon tries the revocation again at once.
    state.persist();
    let mut pins = state.kernel.restarted();
    pins.fail(Op::SetKilled);
    let (mut restarted, _) = host.state(pins);
    restarted.restore();
    assert_eq!(
        (restarted.kernel.state(cgroup_id).table, restarted.kernel.state(cgroup_id).deadline_ns),
        (0, 0)
    );
    restarted.kernel.heal(Op::SetKilled);
    restarted.revive(&id).unwrap();
    assert!(!restarted.kernel.state(cgroup_id).killed());
    state.kernel.heal(Op::Revoke);
    state.revive(&id).unwrap();
    assert_eq!(state.kernel.state(cgroup_id).table, 0);
    assert!(!state.kernel.state(cgroup_id).killed());

    // Neither holds: the revoke fails, and the daemon still knows the grant, so a retry works.
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    let jti = jti_of(&state, &id);
    state.kernel.fail(Op::Revoke);
    state.kernel.fail(Op::SetKilled);
    assert_eq!(state.revoke_durably(&id, "test").unwrap_err().code.as_str(), "dataplane");
    assert_eq!(jti_of(&state, &id), jti);
    assert_ne!(state.kernel.state(cgroup_id).table, 0);
    // Positive control: once the kernel takes writes again, the retry revokes.
    state.kernel.heal(Op::Revoke);
    assert_eq!(state.revoke_durably(&id, "test").unwrap(), jti);
    assert_eq!(state.kernel.state(cgroup_id).table, 0);
}

#[test]
fn the_sweep_reports_an_expired_token_once_and_closes_only_its_sockets() {
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let (expired, expired_id) = register(&mut state, "analyst-7");
    let (valid, valid_id) = register(&mut state, "analyst-8");
    // Expired a second ago: still within the leeway, so it is granted, with a deadline passed.
    state.apply_token(&expired, &host.token("analyst-7", &["read:sales"], 10, 9), Source::Apply).unwrap();
    state.apply_token(&valid, &host.token("analyst-8", &["read:sales"], 0, 300), Source::Apply).unwrap();
    assert!(state.kernel.state(expired_id).deadline_ns <= clock::boot_now_ns());
    state.kernel.open_sockets(expired_id, 4);
    state.kernel.open_sockets(valid_id, 1);

    state.sweep_expired();
    state.sweep_expired();

    let closes: Vec<&Call> =
        state.kernel.calls.iter().filter(|c| matches!(c, Call::CloseSockets(_))).collect();
    assert_eq!(closes, [&Call::CloseSockets(vec![expired_id])]);
    assert_eq!(state.kernel.pins.open_sockets.get(&valid_id), Some(&1));
    assert!(state.agents[&expired].active.as_ref().unwrap().expiry_logged);
    assert!(!state.agents[&valid].active.as_ref().unwrap().expiry_logged);
    assert_eq!(agent_state(&state, &expired), "expired");
    let records = audited(&state, &records);
    let logged = events(&records, "token_expired");
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0]["agent"].clone(), logged[0]["sockets_closed"].clone()),
        ("analyst-7".into(), 4.into())
    );
}

#[test]
fn a_pause_holds_the_agent_through_a_refreshed_token_until_a_person_resumes_it() {
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let (other, other_id) = register(&mut state, "analyst-8");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 10, 300), Source::Apply).unwrap();
    state.apply_token(&other, &host.token("analyst-8", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.kernel.open_sockets(cgroup_id, 2);

    // Resuming an agent that is not held is refused, and changes nothing.
    assert_eq!(state.resume(&id, "looked", 0).unwrap_err().code.as_str(), "not_held");

    state.pause(&id).unwrap();
    assert!(state.kernel.state(cgroup_id).paused());
    assert_eq!(agent_state(&state, &id), "paused");
    // Held, not cut: its sockets stay open, its rules stay.
    assert_eq!(state.kernel.pins.open_sockets.get(&cgroup_id), Some(&2));
    assert_eq!(destinations(&state.kernel, cgroup_id), ["10.0.5.12/32", "10.0.53.53/32"]);
    // A second pause (the engine's, replayed at a restart) records nothing more.
    state.pause(&id).unwrap();
    // A refreshed token does not lift it.
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 600), Source::Apply).unwrap();
    assert_eq!(agent_state(&state, &id), "paused");
    // Positive control: the other agent is untouched.
    assert_eq!(agent_state(&state, &other), "active");
    assert!(!state.kernel.state(other_id).paused());

    // A resume needs a reason.
    assert_eq!(state.resume(&id, "  ", 0).unwrap_err().code.as_str(), "malformed");
    assert!(state.kernel.state(cgroup_id).paused());
    let resumed = state.resume(&id, "false positive: a migration job", 1000).unwrap();
    assert_eq!((resumed.was.as_str(), resumed.thawed), ("paused", None));
    assert_eq!(agent_state(&state, &id), "active");

    let records = audited(&state, &records);
    assert_eq!(events(&records, "paused").len(), 1);
    let resume = events(&records, "resume");
    assert_eq!(resume.len(), 1);
    assert_eq!(
        (
            resume[0]["agent"].as_str(),
            resume[0]["reason"].as_str(),
            resume[0]["was"].as_str(),
            resume[0]["by_uid"].as_u64()
        ),
        (Some("analyst-7"), Some("false positive: a migration job"), Some("paused"), Some(1000))
    );
}

#[test]
fn a_suspension_cuts_revokes_and_freezes_and_a_resume_thaws_but_the_token_stays_revoked() {
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    let token = host.token("analyst-7", &["read:sales"], 0, 300);
    state.apply_token(&id, &token, Source::Apply).unwrap();
    state.kernel.open_sockets(cgroup_id, 3);
    let cgroup = PathBuf::from(MOUNT).join("ztseg.slice/analyst-7");
    state.pause(&id).unwrap();

    state.suspend(&id).unwrap();

    let held = state.kernel.state(cgroup_id);
    assert!(held.suspended());
    assert_eq!(agent_state(&state, &id), "suspended");
    // The flag first, then the sockets, the token, the processes.
    let flag = Call::SetFlag(cgroup_id, ztseg_common::agent::FLAG_SUSPENDED, true);
    assert!(state.kernel.position(&flag) < state.kernel.position(&Call::CloseSockets(vec![cgroup_id])));
    assert_eq!(state.kernel.pins.open_sockets.get(&cgroup_id).copied().unwrap_or(0), 0);
    assert_eq!((held.table, held.deadline_ns), (0, 0), "the token is revoked");
    assert!(state.kernel.frozen(&cgroup));
    // The same token presented again is refused: the revocation is durable.
    assert_eq!(state.apply_token(&id, &token, Source::Apply).unwrap_err().code.as_str(), "revoked");

    let resumed = state.resume(&id, "reviewed the transcript", 0).unwrap();
    assert_eq!((resumed.was.as_str(), resumed.thawed), ("suspended", Some(true)));
    let after = state.kernel.state(cgroup_id);
    assert!(!after.suspended() && !after.paused());
    assert!(!state.kernel.frozen(&cgroup));
    assert_eq!(agent_state(&state, &id), "no_token");

    let records = audited(&state, &records);
    let suspended = events(&records, "suspended");
    assert_eq!(suspended.len(), 1);
    assert_eq!(
        (suspended[0]["sockets_closed"].as_u64(), suspended[0]["frozen"].as_bool()),
        (Some(3), Some(true))
    );
    assert!(suspended[0]["revoked"].is_string());
}

#[test]
fn a_suspension_the_kernel_does_not_take_is_said_and_changes_nothing_else() {
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    let (id, cgroup_id) = register(&mut state, "analyst-7");
    state.apply_token(&id, &host.token("analyst-7", &["read:sales"], 0, 300), Source::Apply).unwrap();
    state.kernel.open_sockets(cgroup_id, 1);
    state.kernel.fail(Op::SetFlag);
    assert_eq!(state.suspend(&id).unwrap_err().code.as_str(), "dataplane");
    assert_eq!(state.pause(&id).unwrap_err().code.as_str(), "dataplane");
    assert_eq!(state.kernel.pins.open_sockets.get(&cgroup_id), Some(&1));
    assert_ne!(state.kernel.state(cgroup_id).table, 0);
    assert_eq!(agent_state(&state, &id), "active");
}

/// Writes `<id>.toml` binding `id` to `token` inline, with `mode` when given.
fn bind(host: &Host, id: &str, token: &str, mode: Option<&str>) {
    let mode = mode.map_or_else(String::new, |m| format!("mode = {m:?}\n"));
    let text = format!("[agent]\nid = {id:?}\ntoken = {token:?}\n{mode}");
    std::fs::write(host.dir.path().join(format!("policies/{id}.toml")), text).unwrap();
}

fn mode_of(state: &State<FakeKernel>, id: &AgentId) -> String {
    let agents = state.agents();
    agents.iter().find(|a| a.agent == id.as_str()).unwrap().mode.as_str().to_owned()
}

#[test]
fn a_bindings_mode_goes_to_the_kernel_before_its_grant_and_back_to_enforce_when_it_goes() {
    use ztseg_common::agent::{MODE_AUDIT, MODE_ENFORCE};
    let host = Host::new();
    let (mut state, records) = host.state(FakeKernel::new());
    let token = host.token("dry", &["read:sales"], 0, 300);
    bind(&host, "dry", &token, Some("audit"));
    bind(&host, "strict", &host.token("strict", &["read:sales"], 0, 300), None);
    state.reload_policy();
    let (dry, strict) = (agent("dry"), agent("strict"));
    let dry_id = state.agents[&dry].cgroup_id;
    let strict_id = state.agents[&strict].cgroup_id;
    assert_eq!(state.kernel.state(dry_id).mode, MODE_AUDIT);
    assert_eq!(state.kernel.state(strict_id).mode, MODE_ENFORCE);
    assert_eq!((mode_of(&state, &dry), mode_of(&state, &strict)), ("audit".into(), "enforce".into()));
    // The mode was set before the grant: the agent is never enforced-then-dry-run by surprise.
    let set = state.kernel.position(&Call::SetMode(dry_id, MODE_AUDIT)).unwrap();
    let granted = state
        .kernel
        .calls
        .iter()
        .position(|c| matches!(c, Call::Grant { cgroup_id, .. } if *cgroup_id == dry_id));
    assert!(granted.is_some_and(|g| set < g), "{:?}", state.kernel.calls);
    // An enforced agent's entry is never written for its mode.
    assert!(!state.kernel.calls.iter().any(|c| matches!(c, Call::SetMode(id, _) if *id == strict_id)));

    // The same token, the mode taken out: enforced again, without a new grant.
    let grants = |state: &State<FakeKernel>| {
        state.kernel.calls.iter().filter(|c| matches!(c, Call::Grant { .. })).count()
    };
    let before = grants(&state);
    bind(&host, "dry", &token, None);
    state.reload_policy();
    assert_eq!(state.kernel.state(dry_id).mode, MODE_ENFORCE);
    assert_eq!(grants(&state), before);
    assert_eq!(mode_of(&state, &dry), "enforce");
    // A mode the kernel does not take is said, and tried again at the next reload.
    bind(&host, "dry", &token, Some("audit"));
    state.kernel.fail(Op::SetMode);
    let reloaded = state.reload_policy();
    assert!(
        reloaded["refused"][0].as_str().unwrap().contains("cannot put agent dry in audit mode"),
        "{reloaded}"
    );
    assert_eq!(state.kernel.state(dry_id).mode, MODE_ENFORCE);
    state.kernel.heal(Op::SetMode);
    state.reload_policy();
    assert_eq!(state.kernel.state(dry_id).mode, MODE_AUDIT);
    let records = audited(&state, &records);
    let modes: Vec<(String, String)> = events(&records, "mode")
        .iter()
        .map(|r| (r["mode"].as_str().unwrap().to_owned(), r["was"].as_str().unwrap().to_owned()))
        .collect();
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(modes, [pair("audit", "enforce"), pair("enforce", "audit"), pair("audit", "enforce")]);
}

#[test]
fn a_host_that_does_not_allow_audit_mode_refuses_a_file_asking_for_it_and_keeps_the_rest() {
    use ztseg_common::agent::MODE_ENFORCE;
    let host = Host::new();
    let (mut state, _) =
        host.state_with(FakeKernel::new(), Config { allow_audit_mode: false, ..host.config() });
    bind(&host, "dry", &host.token("dry", &["read:sales"], 0, 300), Some("audit"));
    bind(&host, "strict", &host.token("strict", &["read:sales"], 0, 300), None);
    let reloaded = state.reload_policy();
    let refusal = reloaded["refused"][0].as_str().unwrap();
    assert!(
        refusal.contains("[agent] dry in audit mode") && refusal.contains("allow_audit_mode = false"),
        "{reloaded}"
    );
    // The file asking for it is refused whole: no agent dry, no grant; the other is granted.
    assert!(!state.agents.contains_key(&agent("dry")));
    let strict_id = state.agents[&agent("strict")].cgroup_id;
    assert_eq!(state.kernel.state(strict_id).mode, MODE_ENFORCE);
    assert_ne!(state.kernel.state(strict_id).table, 0);
    // Positive control: the same file on a host that allows it.
    let (mut allowing, _) = host.state(FakeKernel::new());
    allowing.reload_policy();
    assert_eq!(mode_of(&allowing, &agent("dry")), "audit");
}

#[test]
fn after_a_restart_an_agent_in_audit_mode_without_its_binding_is_enforced() {
    use ztseg_common::agent::{MODE_AUDIT, MODE_ENFORCE};
    let host = Host::new();
    let (mut state, _) = host.state(FakeKernel::new());
    bind(&host, "dry", &host.token("dry", &["read:sales"], 0, 300), Some("audit"));
    state.reload_policy();
    let dry = agent("dry");
    let cgroup_id = state.agents[&dry].cgroup_id;
    assert_eq!(state.kernel.state(cgroup_id).mode, MODE_AUDIT);
    state.persist();
    let pins = state.kernel.restarted();
    drop(state);

    // Still bound: the pinned mode stays, and no write is needed for it.
    let (mut restarted, _) = host.state(pins.restarted());
    restarted.restore();
    restarted.apply_bindings(&mut Vec::new());
    assert_eq!(restarted.kernel.state(cgroup_id).mode, MODE_AUDIT);
    assert!(!restarted.kernel.calls.iter().any(|c| matches!(c, Call::SetMode(..))));
    drop(restarted);

    // The binding went while the daemon was down: the agent is restored, but enforced.
    std::fs::remove_file(host.dir.path().join("policies/dry.toml")).unwrap();
    let (mut restarted, _) = host.state(pins);
    restarted.restore();
    restarted.apply_bindings(&mut Vec::new());
    assert_eq!(restarted.kernel.state(cgroup_id).mode, MODE_ENFORCE);
    assert_eq!(mode_of(&restarted, &dry), "enforce");
}
