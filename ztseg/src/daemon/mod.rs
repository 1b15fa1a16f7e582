//! `ztseg daemon`: brings up the dataplane (adopting pinned state), restores agents, loads the
//! policy dir and keeps it applied, serves the control socket, and turns kernel decision events
//! into audit records and live streams.
//!
//! Owners: [`State`] (agents, policy, the dataplane) behind one lock held for short, non-async
//! steps by the control server (a task per connection), the policy watcher and a housekeeping
//! tick (token expiry, replay cache, table reclaim, systemd watchdog); the audit writer, a thread
//! that owns the log (appends, flushes, checkpoints) and streams each record once it has its
//! `seq`; and the event reader, which attributes decisions from the [`directory`] and hands them
//! to the writer without taking the state lock. Records flow one way: ring -> attribution ->
//! audit writer -> subscribers. With `[metrics] listen`, a metrics thread ([`metrics`]) reads
//! what the others count, never waiting on their locks.

mod audit_writer;
mod decision_log;
mod directory;
#[cfg(test)]
mod fake_kernel;
mod kernel;
mod metrics;
mod ring;
mod state;

use std::{
    collections::VecDeque,
    fs, io,
    os::{fd::OwnedFd, unix::fs::PermissionsExt as _},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher as _};
use serde_json::{Map, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
};
use tracing::{debug, error, info, warn};

pub use self::state::{Refusal, Source, State};
use crate::{
    agent_id::AgentId,
    audit::{AuditLog, HostKey},
    cgroup::{self, CgroupFs},
    clock,
    config::Config,
    control::{
        self, Answer, Counters, ErrorCode, EventsStarted, FailureKind, Joined, MAX_REQUEST_BYTES, Request,
        Status, TokenRevoked, peer,
    },
    dataplane::Dataplane,
    events,
    token::{ReplayCache, Verifier},
};

/// Recent events kept for `ztseg events` without `--follow`.
const RECENT_EVENTS: usize = 2048;

struct Shared {
    /// Taken by the control thread (awaited), housekeeping and policy reloads (blocking
    /// threads); every step under it is a syscall or a file write, never an await. FIFO-fair
    /// (tokio's mutex): once the control thread waits, housekeeping's next step queues behind
    /// it instead of taking the lock again at once.
    state: tokio::sync::Mutex<State>,
    /// Who decisions belong to, for the event reader (see [`directory`]).
    directory: Arc<RwLock<directory::Directory>>,
    audit: audit_writer::AuditSender,
    /// Every audit record (decisions and daemon events), as a JSON line, for subscribers.
    stream: broadcast::Sender<Arc<Line>>,
    recent: Arc<Mutex<VecDeque<Arc<Line>>>>,
    control_gid: Option<u32>,
    /// The agents' root as /proc/PID/cgroup shows it ("/ztseg.slice"): no process below it is
    /// ever a client of the control socket.
    agents_root: String,
    /// The runtime event streams are served on: `ztseg events --follow` clients are fed at the
    /// normal priority, never by the real-time control thread.
    streams: tokio::runtime::Handle,
    /// Counted whether or not they are served.
    metrics: Arc<crate::metrics::Metrics>,
    /// The ring, for the metrics' fill gauge; set by the event reader.
    ring_fill: Arc<std::sync::OnceLock<ring::Consumer>>,
    /// Refreshed by housekeeping while the metrics are served.
    agent_tokens: Option<Arc<metrics::AgentTokens>>,
}

/// The state under its lock. Releasing it saves the agents a step changed (`state_dir/agents/`),
/// so every control request, reload and tick leaves the saved state current, and a start with
/// 10,000 bindings writes each agent's file once.
struct StateGuard<'a>(tokio::sync::MutexGuard<'a, State>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.0.persist();
    }
}

use audit_writer::Line;

impl Shared {
    /// The state, from a blocking thread (`spawn_blocking`, or a thread without a runtime).
    fn state(&self) -> StateGuard<'_> {
        StateGuard(self.state.blocking_lock())
    }

    /// The state, from the control thread's runtime.
    async fn state_async(&self) -> StateGuard<'_> {
        StateGuard(self.state.lock().await)
    }
}

/// The nice value of the daemon's housekeeping threads, and of the threads that turn decisions
/// into records.
const CONTROL_NICE: i32 = -10;
/// The control thread's `SCHED_FIFO` priority: above every ordinary task (agents, record
/// threads), below the kernel's own real-time threads (watchdogs, migration: 99).
const CONTROL_RT_PRIORITY: u32 = 10;
/// Not below the agents' priority: a spinning agent must not starve the threads that log it.
const RECORD_NICE: i32 = 0;

/// The time slice the daemon's threads ask the scheduler for (EEVDF, Linux 6.12+): short, so a
/// woken control thread preempts whatever runs on its CPU (an agent spinning included) at once
/// instead of after that task's slice, and a record thread yields its CPU as soon.
const SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (include/uapi/linux/sched/types.h).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Sets the calling thread's nice value and a short time slice (`sched_setattr`); where the
/// kernel refuses the slice, the nice value alone; a failure is logged (the daemon works
/// without either).
fn set_priority(nice: i32) {
    let attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: SLICE_NS,
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: sched_setattr reads `attr`, whose size it is told, for the calling thread (0).
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on our own thread id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    // Said once: the blocking pool starts threads all the time.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if rc != 0 && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        warn!(error = %io::Error::last_os_error(), nice, "cannot set the daemon's thread priorities (CAP_SYS_NICE?); a flooding agent may delay control requests");
    }
}

/// Puts the calling thread (the control server) on `SCHED_FIFO` [`CONTROL_RT_PRIORITY`]: a
/// woken control request preempts any agent at once, whatever the agents' load. Threads it
/// starts fall back to the normal policy (`SCHED_FLAG_RESET_ON_FORK`). The kernel's real-time
/// throttling (`sched_rt_runtime_us`, 95% by default) bounds what a runaway request could take.
/// Where real-time scheduling is refused, the nice value and short slice of the other control
/// threads, said in the log.
fn set_realtime() {
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
    let attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_FIFO as u32,
        flags: SCHED_FLAG_RESET_ON_FORK,
        priority: CONTROL_RT_PRIORITY,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `attr`, whose size it is told, for the calling thread (0).
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot run the control server at real-time priority (CAP_SYS_NICE?); it runs at nice {CONTROL_NICE} and a flooding agent may delay control requests");
        set_priority(CONTROL_NICE);
    }
}

/// For the threads that turn decisions into records (the event reader, the audit writer): a
/// flood of decisions takes the CPU the control server leaves.
pub(crate) fn lower_priority() {
    set_priority(RECORD_NICE);
}

/// Hands a logged record to the event stream and the recent backlog (the audit writer's last
/// step for each record).
fn publish(stream: &broadcast::Sender<Arc<Line>>, recent: &Mutex<VecDeque<Arc<Line>>>, mut line: Line) {
    line.json.push(b'\n');
    let line = Arc::new(line);
    {
        let mut recent = recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(line.clone());
    }
    // No subscribers is fine.
    let _ = stream.send(line);
}

/// The persisted revocation list; a damaged one stops the start (it would un-revoke tokens).
fn ztseg_revocations(config: &Config) -> anyhow::Result<crate::token::Revocations> {
    let path = config.state_dir.join("revoked.json");
    crate::token::Revocations::load(&path, crate::clock::unix_now_secs())
        .with_context(|| format!("cannot read the revocation list {}", path.display()))
}

/// Creates a directory with `mode`; an existing one keeps its mode (it may be shared).
fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn group_id(name: &str) -> Result<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .with_context(|| format!("control_group {name:?} does not exist"))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Housekeeping and policy reloads (workers and the blocking pool) run ahead of the
        // agents and of the record threads; the control socket has a thread of its own
        // (`control_thread`).
        .on_thread_start(|| set_priority(CONTROL_NICE))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    // Handlers first: a stop during startup or right after "ready" is taken once the daemon is
    // up, and still ends the audit log cleanly (the default action would just kill it).
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    ensure_dir(&config.state_dir, 0o700)?;
    if let Some(dir) = config.audit_log.parent() {
        ensure_dir(dir, 0o750)?;
    }
    if let Some(dir) = config.socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::create_dir_all(&config.policy_dir)
        .with_context(|| format!("cannot create policy dir {}", config.policy_dir.display()))?;
    let control_gid = config.control_group.as_deref().map(group_id).transpose()?;
    // Bound before anything else is done: an address in use stops the start at once.
    let metrics_bound = config
        .metrics
        .listen
        .as_ref()
        .map(|listen| {
            crate::metrics::server::bind(listen, control_gid)
                .with_context(|| format!("cannot listen for metrics on {listen} (metrics.listen)"))
        })
        .transpose()?;
    let counters = Arc::new(crate::metrics::Metrics::new(config.metrics.agent_series));

    let cgroups = CgroupFs::discover()?;
    let root = cgroups.resolve(&config.cgroup_root)?;
    let verifier = {
        let counters = counters.clone();
        Verifier::from_config(&config)?.with_outcomes(move |outcome| counters.count_token(outcome))
    };
    if config.issuers.is_empty() {
        // The packaged default config: the daemon enforces, but no agent can be granted anything.
        warn!("no [[issuers]] configured: every token is refused (unknown_issuer) until one is");
    }
    let load = crate::dataplane::LoadOptions { dns: config.dns.kernel_config() };
    let (mut dataplane, report) = Dataplane::start_with(&config.pin_dir, &root, &load)?;
    // The DNS proxy's sockets, once the pin dir is this daemon's (a second daemon is told that
    // first): agents' DNS goes nowhere else.
    let dns_bound = config
        .dns
        .enabled
        .then(|| {
            crate::dns::proxy::bind(config.dns.port).with_context(|| {
                format!(
                    "cannot listen for the DNS proxy on port {} of the loopback (dns.port)",
                    config.dns.port
                )
            })
        })
        .transpose()?;
    let learned = dataplane.take_learned().context("the learned map was already taken")?;
    let dns_store = Arc::new(Mutex::new(
        crate::dns::Store::new(Box::new(learned), crate::dns::Limits::of(&config.dns))
            .context("cannot read the pinned learned map")?,
    ));
    let observer = metrics_bound.as_ref().and_then(|_| {
        crate::dataplane::observe::Observer::open(dataplane.pin_paths())
            .inspect_err(|e| warn!(error = %e, "metrics: cannot open the pinned maps; agents' kill switches, ring drops and program run times are not shown"))
            .ok()
    });
    let ring = dataplane.take_events_fd().context("the events ring buffer was already taken")??;
    let summaries = dataplane.take_summaries().context("the summaries map was already taken")?;
    let replay = ReplayCache::load(&config.state_dir.join("replay.json"))
        .with_context(|| format!("cannot read the replay cache in {}", config.state_dir.display()))?;
    let revoked = ztseg_revocations(&config)?;
    let key = HostKey::load_or_create(&config.state_dir)?;
    let (log, recovery) = AuditLog::open(&config.audit_log, key, config.audit.options())?;
    // The scores are what the log says: rebuilt from it, as a replay would.
    let params = crate::risk::Params::from_config(&config.risk)
        .map_err(|(key, problem)| anyhow::anyhow!("{}: {key} {problem}", config.audit_log.display()))?;
    let started = std::time::Instant::now();
    let (engine, _) = if config.risk.enabled {
        crate::risk::replay::replay_file(params, &config.audit_log).with_context(|| {
            format!("cannot read {} to rebuild the risk scores", config.audit_log.display())
        })?
    } else {
        crate::risk::replay::replay(params, [])
    };
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "risk scores rebuilt from the audit log");
    let held: Vec<(Arc<str>, crate::risk::Action)> = engine
        .scores(crate::risk::replay::us_of(std::time::SystemTime::now()))
        .into_iter()
        .filter_map(|(agent, (_, standing))| match standing {
            crate::risk::Standing::Active => None,
            crate::risk::Standing::Paused => Some((agent, crate::risk::Action::Pause)),
            crate::risk::Standing::Suspended => Some((agent, crate::risk::Action::Suspend)),
        })
        .collect();
    let engine = Arc::new(std::sync::Mutex::new(engine));
    let (risk_actions, risk_rx) = tokio::sync::mpsc::unbounded_channel();
    let (stream, _) = broadcast::channel(4096);
    let recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)));
    let audit = {
        let (stream, recent) = (stream.clone(), recent.clone());
        let scoring = audit_writer::Scoring {
            enabled: config.risk.enabled,
            engine: engine.clone(),
            actions: risk_actions.clone(),
        };
        audit_writer::start(log, scoring, move |record| publish(&stream, &recent, record))
            .context("cannot start the audit writer thread")?
    };
    let audit_first_seq = audit.next_seq();
    let directory = Arc::new(RwLock::new(directory::Directory::default()));

    let trail = state::Trail { audit: audit.clone(), directory: directory.clone(), risk: engine };
    let mut state = State::new(config.clone(), cgroups, dataplane, verifier, replay, revoked, trail);
    if config.dns.enabled {
        state.set_dns(dns_store.clone());
    }
    let mut fields = Map::new();
    fields.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    fields.insert("links_updated".into(), json!(report.links_updated));
    fields.insert("links_created".into(), json!(report.links_created));
    fields.insert("agents_adopted".into(), json!(report.agents_adopted));
    fields.insert("counters_replaced".into(), json!(report.counters_replaced));
    fields.insert("audit_recovery".into(), json!(format!("{recovery:?}")));
    state.audit_event("daemon_started", fields);
    // The catalogue first (saved tokens compile against it), then the saved agents, then the
    // bindings (tokens already taken from them are not taken again).
    let mut refused = Vec::new();
    state.load_policy(&mut refused);
    state.restore();
    state.apply_bindings(&mut refused);
    state.forget_strangers();
    // Learned addresses of agents that are gone (or all of them, with DNS off) go too.
    dns_store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget_strangers();
    state.save_replay();
    state.persist();

    let agents_root = format!("/{}", state.config.cgroup_root.display());
    let agent_tokens = metrics_bound.as_ref().map(|_| Arc::new(metrics::AgentTokens::default()));
    let shared = Arc::new(Shared {
        state: tokio::sync::Mutex::new(state),
        directory,
        audit,
        stream,
        recent,
        control_gid,
        agents_root,
        streams: tokio::runtime::Handle::current(),
        metrics: counters,
        ring_fill: Arc::new(std::sync::OnceLock::new()),
        agent_tokens,
    });
    if let (Some(bound), Some(tokens)) = (metrics_bound, &shared.agent_tokens) {
        let scraper = metrics::Scraper {
            metrics: shared.metrics.clone(),
            audit: shared.audit.clone(),
            first_seq: audit_first_seq,
            ring: shared.ring_fill.clone(),
            observer,
            agents: tokens.clone(),
        };
        metrics::spawn(bound, scraper)?;
    }
    let listener = bind_socket(&config, control_gid)?;
    let (policy_tx, policy_rx) = mpsc::channel(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files (our own reloads) raises access events: only changes count.
        let changed = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
        if changed {
            let _ = policy_tx.try_send(());
        }
    })
    .context("cannot watch the policy dir")?;
    watcher
        .watch(&config.policy_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", config.policy_dir.display()))?;

    tokio::spawn(watch_policy(shared.clone(), policy_rx));
    let (stop_events, events_stop) = tokio::sync::watch::channel(false);
    let events_task = {
        // The event reader runs on a thread of its own at a lower priority, like the audit
        // writer: a flood of decisions takes the CPU the control server leaves, not the CPU a
        // kill needs.
        let (shared, done) = (shared.clone(), tokio::sync::oneshot::channel::<()>());
        let (done_tx, done_rx) = done;
        let spawned = std::thread::Builder::new().name("ztseg-events".into()).spawn(move || {
            lower_priority();
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(read_events(shared, ring, events_stop)),
                Err(e) => {
                    error!(error = %e, "cannot start the event reader; decisions are enforced but not logged")
                }
            }
            let _ = done_tx.send(());
        });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start the event reader thread; decisions are enforced but not logged");
        }
        done_rx
    };
    let (stop_summaries, summaries_stop) = std::sync::mpsc::channel::<()>();
    let summaries_task = {
        let (shared, (done_tx, done_rx)) = (shared.clone(), tokio::sync::oneshot::channel::<()>());
        let spawned = std::thread::Builder::new().name("ztseg-summaries".into()).spawn(move || {
            lower_priority();
            drain_summaries(&shared, summaries, &summaries_stop);
            let _ = done_tx.send(());
        });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start the summaries thread; decisions past an agent's record budget are counted in the kernel but not logged");
        }
        done_rx
    };
    // A pause or suspension the log holds and the kernel may not (a daemon stopped between
    // the two) is carried out again; one already in force is left as it is.
    for held in held {
        let _ = risk_actions.send(held);
    }
    drop(risk_actions);
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("ztseg-risk".into())
            .spawn(move || take_risk_actions(&shared, risk_rx))
            .context("cannot start the risk actions thread")?;
    }
    if let Some(bound) = dns_bound {
        let resolvers = crate::dns::upstream::resolvers(&config.dns);
        if resolvers.is_empty() {
            error!(
                "the DNS proxy has no upstream resolver (none in [dns] upstream nor /etc/resolv.conf): every allowed name is answered SERVFAIL"
            );
        }
        let records = Arc::new(DnsRecords { audit: shared.audit.clone() });
        let proxy = crate::dns::proxy::Proxy::new(dns_store, &config.dns, resolvers, records);
        crate::dns::proxy::spawn(proxy, bound).context("cannot start the DNS proxy thread")?;
    }
    tokio::spawn(housekeeping(shared.clone()));
    control_thread(shared.clone(), listener)?;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(socket = %config.socket.display(), pin_dir = %config.pin_dir.display(), "ztseg daemon ready");

    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (enforcement stays pinned in the kernel)"),
        _ = int.recv() => info!("SIGINT: stopping (enforcement stays pinned in the kernel)"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drop(watcher);
    // Every decision made so far goes into the log before the closing checkpoint.
    let _ = stop_events.send(true);
    let _ = stop_summaries.send(());
    // Shorter than the unit's TimeoutStopSec (10 s), so the closing checkpoint is written before
    // systemd would kill the daemon.
    let drained = async {
        let _ = events_task.await;
        let _ = summaries_task.await;
    };
    if tokio::time::timeout(Duration::from_secs(5), drained).await.is_err() {
        warn!(
            "the event reader or the summaries drain did not finish in 5 s; the rest stays in the pinned ring and summaries for the next start"
        );
    }
    // Held to the end: no control request changes anything after the last record.
    let mut state = shared.state_async().await;
    state.audit_event("daemon_stopped", Map::new());
    // A clean stop ends the log on a signed checkpoint, after everything handed over (waits
    // for the writer; the runtime's other tasks go on meanwhile).
    shared.audit.close();
    state.save_replay();
    state.persist();
    drop(state);
    let _ = fs::remove_file(&config.socket);
    if let Some(listen) = &config.metrics.listen {
        crate::metrics::server::unbind(listen);
    }
    Ok(())
}

/// The DNS proxy's records go to the audit writer like the kernel's decisions (scored by the
/// risk engine in log order); an allowed answer waits until its record is in the log file.
struct DnsRecords {
    audit: audit_writer::AuditSender,
}

impl crate::dns::proxy::Records for DnsRecords {
    fn send(
        &self,
        fields: Map<String, serde_json::Value>,
        agent: Option<Arc<str>>,
        observation: Option<crate::risk::Observation>,
        allowed: bool,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let decision = audit_writer::Decision {
            body: crate::audit::Body::from_map(&fields),
            agent,
            written: None,
            denied: !allowed,
            decided_ns: None,
            observation,
        };
        let (release, written) = if allowed {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(audit_writer::Release::Wake(tx)), Some(rx))
        } else {
            (None, None)
        };
        self.audit.send_decisions(vec![decision], Some(permit), release);
        written
    }
}

/// Carries out the risk engine's pauses and suspensions, in the order it crossed them.
fn take_risk_actions(
    shared: &Shared,
    mut actions: tokio::sync::mpsc::UnboundedReceiver<(Arc<str>, crate::risk::Action)>,
) {
    while let Some((agent, action)) = actions.blocking_recv() {
        let Ok(id) = agent.parse::<AgentId>() else { continue };
        let mut state = shared.state();
        let done = match action {
            crate::risk::Action::Pause => state.pause(&id),
            crate::risk::Action::Suspend => state.suspend(&id),
        };
        if let Err(refusal) = done {
            error!(agent = %agent, action = action.name(), error = %refusal.message, "the risk engine's action could not be carried out");
        }
    }
}

fn bind_socket(config: &Config, control_gid: Option<u32>) -> Result<std::os::unix::net::UnixListener> {
    let path = &config.socket;
    if path.exists() {
        // A live daemon would hold the pin dir, which Dataplane::start refused already.
        fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(gid) = control_gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("cannot give {} to the control group", path.display()))?;
    }
    Ok(listener)
}

async fn watch_policy(shared: Arc<Shared>, mut changes: mpsc::Receiver<()>) {
    while changes.recv().await.is_some() {
        // Coalesce a burst of file events (an editor's write, a rename) into one reload.
        while changes.try_recv().is_ok() {}
        let shared2 = shared.clone();
        let done = tokio::task::spawn_blocking(move || shared2.state().reload_policy()).await;
        if let Ok(summary) = done {
            debug!(%summary, "policy dir changed");
        }
    }
}

/// How often the summaries of agents past their record budget are drained into records.
const SUMMARIES_EVERY: Duration = Duration::from_secs(1);

/// Drains the summaries every second (and once more at the stop): each becomes one record,
/// attributed like a decision, and is deleted from the map once written. At start, what an
/// earlier daemon read and did not delete comes first.
fn drain_summaries(
    shared: &Shared,
    mut summaries: crate::dataplane::Summaries,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    let mut timestamps = events::Timestamps::default();
    let mut drained = summaries.idle();
    loop {
        match drained {
            Ok(drained) if drained.is_empty() => {}
            Ok(drained) => write_summaries(shared, &mut summaries, &drained, &mut timestamps),
            Err(e) => error!(error = %e, "cannot read the decision summaries; they stay in the kernel"),
        }
        let stopping =
            !matches!(stop.recv_timeout(SUMMARIES_EVERY), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
        drained = summaries.switch();
        if stopping {
            match drained {
                Ok(drained) if !drained.is_empty() => {
                    write_summaries(shared, &mut summaries, &drained, &mut timestamps);
                }
                Ok(_) => {}
                Err(e) => error!(error = %e, "cannot read the decision summaries; they stay in the kernel"),
            }
            return;
        }
    }
}

/// Hands the summaries' records to the audit writer and deletes them once they are written.
fn write_summaries(
    shared: &Shared,
    summaries: &mut crate::dataplane::Summaries,
    drained: &[crate::dataplane::Drained],
    timestamps: &mut events::Timestamps,
) {
    let clocks = clock::boot_and_unix_now_ns();
    let firsts: Vec<ztseg_common::event::Event> = drained.iter().map(|d| d.first).collect();
    let who = attribute(shared, &firsts);
    shared.metrics.count_decisions(drained.iter().zip(&who).map(|(d, (w, _))| crate::metrics::Counted {
        agent: w.agent.as_ref(),
        verdict: d.first.verdict,
        reason: d.first.reason,
        count: d.count,
    }));
    let records = drained
        .iter()
        .zip(who)
        .map(|(d, (who, written))| {
            let ts = events::wall_ns(d.first.ts_boot_ns, clocks.0, clocks.1);
            let counted =
                events::Counted { count: d.count, last_ns: events::wall_ns(d.last_ns, clocks.0, clocks.1) };
            audit_writer::Decision {
                body: events::summary_body(&d.first, counted, &who, ts, timestamps),
                observation: events::observation(&d.first, who.agent.as_ref(), ts, Some(counted)),
                agent: who.agent,
                written,
                denied: d.first.verdict != ztseg_common::rule::VERDICT_ALLOW,
                decided_ns: Some(d.last_ns),
            }
        })
        .collect();
    let (tx, written) = std::sync::mpsc::channel();
    shared.audit.send_decisions(records, None, Some(audit_writer::Release::Notify(tx)));
    // Deleted once written: a daemon killed before then finds them again at its next start.
    if written.recv().is_ok()
        && let Err(e) = summaries.delete(drained.iter().map(|d| &d.key))
    {
        error!(error = %e, "cannot delete drained decision summaries; they will be logged again");
    }
}

/// Who made each of `events`: looked up under the directory's read lock a few at a time, so the
/// control thread's writes never wait for more than a handful of lookups.
fn attribute(
    shared: &Shared,
    events: &[ztseg_common::event::Event],
) -> Vec<(events::Attribution, Option<Arc<std::sync::atomic::AtomicU64>>)> {
    let mut who = Vec::with_capacity(events.len());
    for chunk in events.chunks(ATTRIBUTED_PER_LOCK) {
        let directory = shared.directory.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        who.extend(chunk.iter().map(|event| directory.who(event)));
    }
    who
}

/// Records the ring holds at most.
const RING_RECORDS: usize =
    (ztseg_common::maps::EVENTS_BYTES as u64 / ztseg_common::maps::EVENT_STRIDE) as usize;

/// Events attributed per hold of the directory's read lock.
const ATTRIBUTED_PER_LOCK: usize = 16;

/// Events taken off the ring, attributed and handed to the audit writer at a time.
const EVENT_BATCH: usize = 256;

/// Batches handed to the audit writer and not yet appended, at most: beyond it the reader
/// waits, and a slow disk backs up into the kernel's ring (whose overflow is counted) rather
/// than into the daemon's memory.
const BATCHES_IN_FLIGHT: usize = 64;

fn take_batch(ring: &mut ring::Ring, batch: &mut Vec<ztseg_common::event::Event>) {
    let mut bytes = Vec::with_capacity(size_of::<ztseg_common::event::Event>());
    while ring.next(&mut bytes) {
        match events::decode(&bytes) {
            Some(event) => batch.push(event),
            None => warn!(bytes = bytes.len(), "ring buffer record of unexpected size"),
        }
        if batch.len() >= EVENT_BATCH {
            break;
        }
    }
}

/// Reads the kernel's decision records until `stop` turns true, then drains what is left and
/// returns.
async fn read_events(shared: Arc<Shared>, ring: OwnedFd, mut stop: tokio::sync::watch::Receiver<bool>) {
    // Read in place (`ring`): records go back to the kernel once written to the log. The map's
    // fd is polled for readiness.
    let reader = {
        use std::os::fd::AsFd as _;
        ring::Ring::new(ring.as_fd(), ztseg_common::maps::EVENTS_BYTES as usize)
    };
    let mut reader = match reader {
        Ok(reader) => {
            let _ = shared.ring_fill.set(reader.consumer());
            reader
        }
        Err(e) => {
            error!(error = %e, "cannot map the events ring buffer; decisions are still enforced but not logged");
            return;
        }
    };
    // SAFETY: the AsyncFd owns the fd (an `OwnedFd`): it stays open, and the same, for as long
    // as it is registered.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the events ring buffer; decisions are still enforced but not logged");
            return;
        }
    };
    // The kernel wakes this reader only once per window of backlog (a wakeup per record would
    // cost more than the decision); a timer drains what accumulates below it.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut drain = tokio::time::interval(Duration::from_millis(ztseg_common::maps::EVENTS_DRAIN_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut taken_since_stop = 0usize;
    let mut timestamps = events::Timestamps::default();
    loop {
        let mut stopping = *stop.borrow();
        let woken = if stopping {
            // Draining for the stop: no waiting.
            None
        } else {
            tokio::select! {
            guard = ring.readable_mut() => Some(guard),
            _ = drain.tick() => None,
            _ = stop.changed() => {
                stopping = true;
                None
            }
            }
        };
        let mut batch = Vec::new();
        match woken {
            Some(Ok(mut guard)) => {
                take_batch(&mut reader, &mut batch);
                if batch.len() < EVENT_BATCH {
                    guard.clear_ready();
                }
            }
            Some(Err(e)) => {
                error!(error = %e, "polling the events ring buffer failed");
                return;
            }
            None => take_batch(&mut reader, &mut batch),
        }
        let drained = batch.len() < EVENT_BATCH;
        let batch_len = batch.len();
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let clocks = clock::boot_and_unix_now_ns();
        // Attributed at once (a later directory could name a later token), under the read lock
        // for the lookups only, a few at a time: the control thread's writes never wait for
        // more than a handful of lookups by a thread an agent's load can delay. The records are
        // written after.
        let who = attribute(&shared, &batch);
        shared.metrics.count_decisions(batch.iter().zip(&who).map(|(event, (w, _))| {
            crate::metrics::Counted {
                agent: w.agent.as_ref(),
                verdict: event.verdict,
                reason: event.reason,
                count: 1,
            }
        }));
        let records = batch
            .iter()
            .zip(who)
            .map(|(event, (who, written))| {
                let ts = events::wall_ns(event.ts_boot_ns, clocks.0, clocks.1);
                audit_writer::Decision {
                    body: events::decision_body(event, &who, ts, &mut timestamps),
                    observation: events::observation(event, who.agent.as_ref(), ts, None),
                    agent: who.agent,
                    written,
                    denied: event.verdict != ztseg_common::rule::VERDICT_ALLOW,
                    decided_ns: Some(event.ts_boot_ns),
                }
            })
            .collect();
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let release = audit_writer::Release::Ring { consumer: reader.consumer(), upto: reader.position() };
        shared.audit.send_decisions(records, Some(permit), Some(release));
        if stopping {
            // What was in the ring at the stop, at most: agents still running keep adding.
            taken_since_stop += batch_len;
            if drained || taken_since_stop >= RING_RECORDS {
                return;
            }
        }
    }
}

/// Rule entries housekeeping deletes per hold of the state lock (a few µs each).
const RECLAIM_STEP_KEYS: usize = 64;

/// How long the audit writer may sit on waiting work before the watchdog stops being fed.
const AUDIT_STALL: Duration = Duration::from_secs(10);

async fn housekeeping(shared: Arc<Shared>) {
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let shared2 = shared.clone();
        let work = tokio::task::spawn_blocking(move || {
            let (barrier, replay) = {
                let mut state = shared2.state();
                let mut replay = None;
                if ticks.is_multiple_of(5) {
                    state.sweep_expired();
                    replay = state.replay_snapshot();
                    if let Some(tokens) = &shared2.agent_tokens {
                        let agents = state.agents.values();
                        tokens.set(
                            agents.map(|a| (a.cgroup_id, a.active.as_ref().map(|g| g.claims.exp))).collect(),
                        );
                        for (agent, score) in state.risk_scores() {
                            shared2.metrics.set_agent_risk(&agent, score);
                        }
                    }
                }
                (state.kernel.reclaim_barrier(), replay)
            };
            // Slow file work without the state lock.
            if let Some(snapshot) = replay {
                state::write_replay(&snapshot);
            }
            // Replaced rule tables: the grace period is waited out without the state lock (it
            // takes milliseconds; token applies and kills go on meanwhile).
            if let Some(barrier) = barrier {
                match barrier.wait() {
                    // In steps of a few hundred entries, each under the lock on its own: a
                    // kill or apply waits for one step at most, not for a backlog.
                    Ok(()) => {
                        while shared2.state().kernel.finish_reclaim_some(&barrier, RECLAIM_STEP_KEYS) {}
                    }
                    Err(e) => error!(error = %e, "could not reclaim replaced rule tables"),
                }
            }
        })
        .await;
        match work {
            Ok(()) => {
                // Only a loop that still gets the state lock, with an audit writer that keeps
                // up, tells systemd it is alive.
                if watchdog && ticks.is_multiple_of(5) && !shared.audit.stalled(AUDIT_STALL) {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
            Err(e) => error!(error = %e, "housekeeping failed"),
        }
    }
}

/// Serves the control socket on a thread of its own at real-time priority (`SCHED_FIFO`
/// [`CONTROL_RT_PRIORITY`], see [`set_realtime`]): a kill or a token apply is read, handled and
/// answered on this one thread, with no hand-over to another thread that would have to wait for
/// a CPU behind a spinning agent or the record threads. Requests are handled one at a time, as
/// the state lock would serialise them anyway.
fn control_thread(shared: Arc<Shared>, listener: std::os::unix::net::UnixListener) -> Result<()> {
    listener.set_nonblocking(true).context("cannot make the control socket non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control server's runtime")?;
    std::thread::Builder::new()
        .name("ztseg-control".into())
        .spawn(move || {
            set_realtime();
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(async move {
                    match UnixListener::from_std(listener) {
                        Ok(listener) => accept(shared, listener).await,
                        Err(e) => error!(error = %e, "cannot serve the control socket"),
                    }
                })
            }));
            // A daemon that cannot take a kill is of no use: stop it (systemd restarts it;
            // enforcement stays pinned) rather than stay "ready" with no one listening.
            error!(panicked = served.is_err(), "the control server stopped; stopping the daemon");
            std::process::abort();
        })
        .context("cannot start the control server's thread")?;
    Ok(())
}

async fn accept(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(shared.clone(), stream));
            }
            Err(e) => {
                warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A response the daemon sends.
type Response = control::Response<Answer>;

async fn write_response(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await
}

/// Why a control connection is refused before any request is read, if it is.
fn refuse_peer(shared: &Shared, peer: &control::Peer, pidfd: &OwnedFd) -> Option<Response> {
    if !peer.authorized(shared.control_gid) {
        warn!(uid = peer.uid, pid = peer.pid, "control connection refused: not root or in control_group");
        return Some(Response::coded(
            ErrorCode::AccessDenied,
            format!("uid {} may not use the ztseg control socket (root or control_group only)", peer.uid),
        ));
    }
    // An agent is never a client, whatever its credentials: it could otherwise lift its own
    // kill switch or move itself into a better-granted agent. Unknown cgroup: refused too.
    let cgroup = match control::pidfd_cgroup(pidfd) {
        Ok(cgroup) if !control::cgroup_within(&cgroup, &shared.agents_root) => return None,
        Ok(cgroup) => cgroup,
        Err(e) => format!("unknown ({e})"),
    };
    warn!(uid = peer.uid, pid = peer.pid, cgroup, "control connection refused: the peer is an agent");
    let mut fields = serde_json::Map::new();
    fields.insert("pid".into(), json!(peer.pid));
    fields.insert("uid".into(), json!(peer.uid));
    fields.insert("cgroup".into(), json!(cgroup));
    fields.insert("reason".into(), json!("agent_peer"));
    fields.insert("ts".into(), json!(events::rfc3339(std::time::SystemTime::now())));
    fields.insert("event".into(), json!("control_refused"));
    shared.audit.send(fields);
    Some(Response::coded(
        ErrorCode::AgentPeer,
        format!(
            "process {} is inside the agents' root ({cgroup}); agents may not use the ztseg control socket",
            peer.pid
        ),
    ))
}

async fn serve_connection(shared: Arc<Shared>, stream: UnixStream) {
    let (peer, pidfd) = match peer(&stream).and_then(|p| Ok((p, control::peer_pidfd(&stream)?))) {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %e, "cannot read a control peer's credentials; closing");
            return;
        }
    };
    let (reader, mut writer) = stream.into_split();
    if let Some(refusal) = refuse_peer(&shared, &peer, &pidfd) {
        let _ = write_response(&mut writer, &refusal).await;
        return;
    }
    let mut lines = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        // A line longer than the limit is cut there and refused: no unbounded buffering.
        match (&mut lines).take(MAX_REQUEST_BYTES as u64 + 1).read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_REQUEST_BYTES => {
                let _ = write_response(&mut writer, &Response::fail(FailureKind::Usage, "request too long"))
                    .await;
                return;
            }
            Ok(_) => {}
        }
        let started = std::time::Instant::now();
        let request: Request = match serde_json::from_str(line.trim_end()) {
            Ok(request) => request,
            Err(e) => {
                let response = Response::coded(ErrorCode::Malformed, format!("malformed request: {e}"));
                if write_response(&mut writer, &response).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if let Request::Events { follow, agent } = request {
            hand_over_stream(shared, lines.into_inner(), writer, follow, agent);
            return;
        }
        // Handled here, on the control thread: no hand-over to a thread that waits for a CPU.
        let kind = request.kind();
        let mut state = shared.state_async().await;
        let response = handle(&mut state, request, &pidfd, peer.uid);
        drop(state);
        let written = write_response(&mut writer, &response).await;
        shared.metrics.observe_request(kind, started.elapsed());
        if written.is_err() {
            return;
        }
    }
}

fn refused(refusal: Refusal) -> Response {
    Response::coded(refusal.code, refusal.message)
}

fn parse_agent(agent: &str) -> Result<AgentId, Refusal> {
    agent.parse::<AgentId>().map_err(|e| Refusal::new(ErrorCode::InvalidAgent, e.to_string()))
}

/// Handles one request (blocking: map writes, cgroup moves).
fn handle(state: &mut State, request: Request, peer: &OwnedFd, peer_uid: u32) -> Response {
    match request {
        Request::TokenApply { agent, token } => match parse_agent(&agent) {
            Ok(agent) => state
                .apply_token(&agent, &token, Source::Apply)
                .map_or_else(refused, |applied| Response::ok(Answer::TokenApply(applied))),
            Err(refusal) => refused(refusal),
        },
        Request::TokenRevoke { agent } => match parse_agent(&agent) {
            Ok(agent) if !state.agents.contains_key(&agent) => {
                Response::coded(ErrorCode::UnknownAgent, format!("no agent {agent} is registered"))
            }
            Ok(agent) => match state.revoke_durably(&agent, "revoked by `ztseg token revoke`") {
                Ok(revoked) => {
                    Response::ok(Answer::TokenRevoke(TokenRevoked { agent: agent.to_string(), revoked }))
                }
                Err(refusal) => refused(refusal),
            },
            Err(refusal) => refused(refusal),
        },
        Request::Agents {} => Response::ok(Answer::Agents(state.agents())),
        Request::Kill { agent, processes } => match parse_agent(&agent) {
            Ok(agent) => {
                state.kill(&agent, processes).map_or_else(refused, |k| Response::ok(Answer::Kill(k)))
            }
            Err(refusal) => refused(refusal),
        },
        Request::Revive { agent } => match parse_agent(&agent) {
            Ok(agent) => state.revive(&agent).map_or_else(refused, |r| Response::ok(Answer::Revive(r))),
            Err(refusal) => refused(refusal),
        },
        // Only root can give the process the agent's own uid and box: any other caller's
        // process would join the agent's cgroup and rights with its own uid and groups.
        Request::Run { .. } if peer_uid != 0 => Response::coded(
            ErrorCode::RunNeedsRoot,
            format!("uid {peer_uid} may not start agents: `ztseg run` must be started by root"),
        ),
        Request::Run { agent, token } => match parse_agent(&agent) {
            Ok(agent) => run_agent(state, &agent, token.as_deref(), peer),
            Err(refusal) => refused(refusal),
        },
        Request::Resume { agent, reason } => match parse_agent(&agent) {
            Ok(agent) => match state.resume(&agent, &reason, peer_uid) {
                Ok(resumed) => Response::ok(Answer::Resume(resumed)),
                Err(refusal) => refused(refusal),
            },
            Err(refusal) => refused(refusal),
        },
        Request::Risk { agent } => match parse_agent(&agent).and_then(|agent| state.risk_view(&agent)) {
            Ok(view) => Response::ok(Answer::Risk(view)),
            Err(refusal) => refused(refusal),
        },
        Request::Status {} => Response::ok(Answer::Status(status(state))),
        Request::Events { .. } => Response::fail(FailureKind::Usage, "events are streamed"),
    }
}

/// Registers the agent, applies its token, and moves the requesting process (named by its
/// pidfd, so a recycled pid is never moved in its place) into the agent's cgroup. The answer
/// carries the agent's uid, which `ztseg run` switches to before it execs.
fn run_agent(state: &mut State, agent: &AgentId, token: Option<&str>, peer: &OwnedFd) -> Response {
    if let Err(refusal) = state.ensure_agent(agent, None, None) {
        return refused(refusal);
    }
    if let Some(token) = token
        && let Err(refusal) = state.apply_token(agent, token, Source::Run)
    {
        return refused(refusal);
    }
    let Some(record) = state.agents.get(agent) else {
        return Response::fail(FailureKind::Error, format!("agent {agent} vanished"));
    };
    let (relative, cgroup_id, uid) = (record.cgroup.clone(), record.cgroup_id, record.uid);
    let Some(path) = state.resolve_cgroup(&relative) else {
        return Response::fail(FailureKind::Error, format!("agent {agent}'s cgroup cannot be resolved"));
    };
    let gone = || Response::fail(FailureKind::Error, "the requesting process has exited");
    let Ok(Some(pid)) = control::pidfd_pid(peer) else { return gone() };
    let Ok(pid) = u32::try_from(pid) else { return gone() };
    if let Err(e) = cgroup::move_process(&path, pid) {
        return Response::coded(ErrorCode::Cgroup, e.to_string());
    }
    // The pid was the caller's when read; had the caller exited in between and its pid been
    // reused, the pidfd now says so (fail loudly: a stranger was moved).
    if control::pidfd_pid(peer).ok().flatten() != i32::try_from(pid).ok() {
        warn!(agent = %agent, pid, "the caller exited while it was moved; pid {pid} may now be another process");
        return gone();
    }
    info!(agent = %agent, pid, uid, "process joined the agent's cgroup");
    Response::ok(Answer::Run(Joined { agent: agent.to_string(), cgroup: relative, cgroup_id, gid: uid, uid }))
}

fn status(state: &State) -> Status {
    Status {
        agents: state.agents.len(),
        audit_log: state.config.audit_log.clone(),
        audit_next_seq: state.audit.next_seq(),
        audit_unwritable: state
            .audit
            .unwritable()
            .map(|u| crate::control::AuditUnwritable { reason: u.reason, since: events::rfc3339(u.since) }),
        cgroup_root: state.config.cgroup_root.clone(),
        events_dropped_per_cpu: state.kernel.drops_per_cpu().unwrap_or_default(),
        events_written: state.audit.decisions_written(),
        pin_dir: state.config.pin_dir.clone(),
        policy_dir: state.config.policy_dir.clone(),
        revoked_tokens: state.revoked_tokens(),
        unregistered: state.kernel.stats(ztseg_common::event::UNREGISTERED_SLOT).ok().map(|s| Counters {
            decisions: s.decisions,
            denied: s.denied,
            dropped: s.dropped,
            emitted: s.emitted,
        }),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Moves an events connection from the control thread to the normal runtime (`Shared::streams`)
/// and serves it there: feeding a subscriber record by record is no work for a real-time thread.
fn hand_over_stream(
    shared: Arc<Shared>,
    reader: tokio::net::unix::OwnedReadHalf,
    writer: tokio::net::unix::OwnedWriteHalf,
    follow: bool,
    agent: Option<String>,
) {
    let stream = match reader.reunite(writer).map_err(io::Error::other).and_then(UnixStream::into_std) {
        Ok(stream) => stream,
        Err(e) => {
            warn!(error = %e, "cannot hand an events connection over; closing it");
            return;
        }
    };
    let streams = shared.streams.clone();
    streams.spawn(async move {
        match UnixStream::from_std(stream) {
            Ok(stream) => {
                let (_, mut writer) = stream.into_split();
                stream_events(&shared, &mut writer, follow, agent).await;
            }
            Err(e) => warn!(error = %e, "cannot serve an events connection"),
        }
    });
}

async fn stream_events(
    shared: &Shared,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    follow: bool,
    agent: Option<String>,
) {
    // Subscribe before copying the backlog so nothing falls between the two.
    let mut live = shared.stream.subscribe();
    let backlog: Vec<Arc<Line>> =
        shared.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
    let wanted = |line: &Line| agent.as_deref().is_none_or(|a| line.agent.as_deref() == Some(a));
    if write_response(writer, &Response::ok(Answer::Events(EventsStarted { follow }))).await.is_err() {
        return;
    }
    for line in backlog.iter().filter(|l| wanted(l)) {
        if writer.write_all(&line.json).await.is_err() {
            return;
        }
    }
    if !follow {
        return;
    }
    // Lines published between subscribing and copying the backlog arrive on both.
    let sent: std::collections::HashSet<usize> = backlog.iter().map(|l| Arc::as_ptr(l) as usize).collect();
    loop {
        match live.recv().await {
            Ok(line) => {
                if sent.contains(&(Arc::as_ptr(&line) as usize)) || !wanted(&line) {
                    continue;
                }
                if writer.write_all(&line.json).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let note = json!({ "event": "subscriber_lagged", "missed": missed });
                if writer.write_all(format!("{note}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
