//! The audit log's one owner: a thread that appends the records it is handed, flushes them
//! (write, fdatasync, signed head), writes checkpoints, and passes each record, with its `seq`,
//! on to the event stream. Control requests and the event reader hand records over and go on:
//! a slow disk delays the log, never a kill or a token apply.
//!
//! Daemon records (a kill, a grant, a refusal) are never refused or made to wait. Decision
//! records come in ring batches, each holding a permit of a small semaphore until it is
//! appended: a slow disk backs up into the kernel's ring (whose overflow is counted), not into
//! the daemon's memory.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info, warn};

use super::decision_log;
use crate::{
    audit::{AuditLog, Body, Chain},
    risk,
};

/// How often the writer flushes what it appended.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How often it writes a checkpoint if the log's own interval has passed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Denied decisions logged (at `info`, target `ztseg::decision`) per second at most; the rest
/// are counted in one line per second. The audit log and the event stream carry every one.
const DENIALS_LOGGED_PER_SECOND: u32 = 10;

/// A decision record, serialised, with what the writer counts and publishes it by.
pub struct Decision {
    pub body: Body,
    pub agent: Option<Arc<str>>,
    /// The counter of records written for its agent, if it has one.
    pub written: Option<Arc<AtomicU64>>,
    pub denied: bool,
    /// When the kernel decided (boot-clock ns; a summary's last decision), for the lag metric.
    pub decided_ns: Option<u64>,
    /// What the risk engine reads of it (an agent's decisions only); its `seq` is set here.
    pub observation: Option<risk::Observation>,
}

/// The risk engine, fed in log order by the writer (the one place records have their order),
/// and where its actions go: a pause or suspension for the control side to carry out.
pub struct Scoring {
    /// `[risk] enabled`: off, nothing is scored.
    pub enabled: bool,
    pub engine: Arc<std::sync::Mutex<risk::Engine>>,
    pub actions: tokio::sync::mpsc::UnboundedSender<(Arc<str>, risk::Action)>,
}

/// What to do once a batch is written to the log file.
pub enum Release {
    /// The kernel may take its ring back: everything before ring position `upto` (see
    /// [`super::ring`]).
    Ring { consumer: super::ring::Consumer, upto: u64 },
    /// Tell the sender (the summaries drain, which then deletes what the batch summarised).
    Notify(mpsc::Sender<()>),
    /// Wake the sender's task (the DNS proxy, which then releases the answer it recorded).
    Wake(tokio::sync::oneshot::Sender<()>),
}

impl Release {
    fn done(self) {
        match self {
            Self::Ring { consumer, upto } => consumer.release(upto),
            Self::Notify(tx) => {
                let _ = tx.send(());
            }
            Self::Wake(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// A record as the event stream carries it (with `seq`, without `prev` and `hash`).
pub struct Line {
    pub agent: Option<Arc<str>>,
    pub json: Vec<u8>,
}

enum Msg {
    Record(Map<String, Value>),
    Decisions(Vec<Decision>, Option<OwnedSemaphorePermit>, Option<Release>),
    /// Write a checkpoint and flush, then say so (the daemon's stop).
    Close(mpsc::Sender<()>),
}

/// The handing-over side; cheap to clone.
#[derive(Clone)]
pub struct AuditSender {
    tx: mpsc::Sender<Msg>,
    next_seq: Arc<AtomicU64>,
    decisions_written: Arc<AtomicU64>,
    health: Arc<Health>,
}

/// Whether the writer keeps up: messages handed over and not yet taken, and when it last took
/// one (boot-clock ns); and why the log cannot be written, since when, if it cannot.
#[derive(Default)]
struct Health {
    pending: AtomicU64,
    progress_ns: AtomicU64,
    unwritable: std::sync::Mutex<Option<Unwritable>>,
    /// Lag and checkpoints, for the metrics.
    gauges: crate::metrics::WriterGauges,
}

/// The audit log cannot be written: records wait in memory, their ring space is not handed
/// back, and once the ring is full allowed decisions are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwritable {
    pub reason: String,
    pub since: SystemTime,
}

impl AuditSender {
    /// Hands a daemon record over; never waits.
    pub fn send(&self, record: Map<String, Value>) {
        self.health.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Record(record)).is_err() {
            error!("the audit writer has stopped; a daemon record was not logged");
        }
    }

    /// Hands a batch of decision records over; `permit` is released once they are appended, and
    /// `release` done once they are written to the file (not before: a daemon killed in between
    /// leaves them in the kernel's ring for the next start).
    pub fn send_decisions(
        &self,
        records: Vec<Decision>,
        permit: Option<OwnedSemaphorePermit>,
        release: Option<Release>,
    ) {
        self.health.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Decisions(records, permit, release)).is_err() {
            error!("the audit writer has stopped; decision records were not logged");
        }
    }

    /// The `seq` the next appended record gets (records handed over but not yet appended get
    /// this one and later ones).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Whether the writer has had work waiting and taken none of it for `limit` (a hung disk,
    /// a dead thread): the daemon then stops telling systemd it is alive.
    pub fn stalled(&self, limit: std::time::Duration) -> bool {
        let idle =
            crate::clock::boot_now_ns().saturating_sub(self.health.progress_ns.load(Ordering::Relaxed));
        self.health.pending.load(Ordering::Relaxed) > 0 && u128::from(idle) > limit.as_nanos()
    }

    /// Why the log cannot be written, if it cannot.
    pub fn unwritable(&self) -> Option<Unwritable> {
        self.health.unwritable.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Decision records appended so far.
    pub fn decisions_written(&self) -> u64 {
        self.decisions_written.load(Ordering::Relaxed)
    }

    /// The writer's lag and checkpoints, for the metrics.
    pub fn gauges(&self) -> &crate::metrics::WriterGauges {
        &self.health.gauges
    }

    /// Writes a checkpoint after everything handed over so far, flushes and ends the writer:
    /// the log ends on that checkpoint, and what is handed over later is refused (and said).
    /// Returns once done (at once if the writer is gone). Blocking.
    pub fn close(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// Starts the writer; `publish` gets every record after its append (with `seq` unless the
/// append failed). A panic in the writer aborts the daemon (systemd restarts it; enforcement
/// stays pinned in the kernel): a daemon that goes on without its log would be unobserved.
pub fn start(
    log: AuditLog,
    scoring: Scoring,
    publish: impl Fn(Line) + Send + 'static,
) -> std::io::Result<AuditSender> {
    let (tx, rx) = mpsc::channel();
    let next_seq = Arc::new(AtomicU64::new(log.next_seq()));
    let decisions_written = Arc::new(AtomicU64::new(0));
    let health = Arc::new(Health {
        pending: AtomicU64::new(0),
        progress_ns: AtomicU64::new(crate::clock::boot_now_ns()),
        unwritable: std::sync::Mutex::new(None),
        gauges: crate::metrics::WriterGauges::default(),
    });
    let sender = AuditSender {
        tx,
        next_seq: next_seq.clone(),
        decisions_written: decisions_written.clone(),
        health: health.clone(),
    };
    thread::Builder::new().name("ztseg-audit".into()).spawn(move || {
        super::lower_priority();
        let denials = Denials { since: Instant::now(), logged: 0, unlogged: 0 };
        let writer = Writer {
            log,
            publish,
            next_seq,
            decisions_written,
            health,
            denials,
            held: Vec::new(),
            unwritable_said: None,
            scoring,
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(&rx))).is_err() {
            error!("the audit writer panicked; stopping the daemon (enforcement stays pinned)");
            std::process::abort();
        }
    })?;
    Ok(sender)
}

struct Writer<P> {
    log: AuditLog,
    publish: P,
    next_seq: Arc<AtomicU64>,
    decisions_written: Arc<AtomicU64>,
    health: Arc<Health>,
    denials: Denials,
    /// Batches appended and not yet written: their permits (the reader waits once all are
    /// held) and ring positions (handed back once written).
    held: Vec<(Option<OwnedSemaphorePermit>, Option<Release>)>,
    /// When the log was last said to be unwritable.
    unwritable_said: Option<Instant>,
    scoring: Scoring,
}

/// How often an unwritable log is said again.
const UNWRITABLE_SAID_EVERY: Duration = Duration::from_secs(10);
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Denied decisions logged and not logged in the current second.
struct Denials {
    since: Instant,
    logged: u32,
    unlogged: u64,
}

impl<P: Fn(Line)> Writer<P> {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        let (mut flushed, mut checked) = (Instant::now(), Instant::now());
        self.prune();
        let mut pruned = Instant::now();
        loop {
            let msg = rx.recv_timeout(FLUSH_EVERY.saturating_sub(flushed.elapsed()));
            if msg.is_ok() {
                self.health.pending.fetch_sub(1, Ordering::Relaxed);
            }
            match msg {
                Ok(Msg::Record(record)) => self.append_daemon(&record),
                Ok(Msg::Decisions(records, permit, release)) => {
                    let engine = self.scoring.engine.clone();
                    let mut engine = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for decision in records {
                        self.append_decision(decision, &mut engine);
                    }
                    drop(engine);
                    // Written (not yet synced) before the kernel gets the ring space back; a log
                    // that cannot be written keeps the records in memory and their space in
                    // the ring, whose filling then refuses allows rather than let them through
                    // unrecorded.
                    self.held.push((permit, release));
                    let written = self.log.write_buffered();
                    self.after_write(written);
                }
                Ok(Msg::Close(done)) => {
                    if let Err(e) = self.log.checkpoint() {
                        error!(error = %e, "could not write the closing audit checkpoint");
                    }
                    self.flush();
                    let _ = done.send(());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            self.health.progress_ns.store(crate::clock::boot_now_ns(), Ordering::Relaxed);
            if flushed.elapsed() >= FLUSH_EVERY {
                self.flush();
                flushed = Instant::now();
            }
            if checked.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.log.maybe_checkpoint(SystemTime::now()) {
                    error!(error = %e, "could not write an audit checkpoint");
                }
                checked = Instant::now();
            }
            let (checkpoint, unsigned) = self.log.checkpoint_state();
            self.health.gauges.checkpoints(checkpoint, unsigned);
            if pruned.elapsed() >= PRUNE_EVERY {
                self.prune();
                pruned = Instant::now();
            }
        }
    }

    /// A daemon record: checked (no chain field, no event the log writes itself), appended,
    /// written to the file and published.
    fn append_daemon(&mut self, record: &Map<String, Value>) {
        let agent = record.get("agent").and_then(Value::as_str).map(Arc::from);
        let (body, seq) = match self.log.checked_body(record) {
            Ok(body) => {
                let seq = self.append(&body);
                if seq.is_some() {
                    self.take_resume(record);
                }
                // Written at once (synced with the next flush): a daemon killed a moment later
                // must not take a grant, a revocation or a reload out of the log with it.
                let written = self.log.write_buffered();
                self.after_write(written);
                (body, seq)
            }
            Err(e) => {
                warn!(error = %e, event = ?record.get("event"), "could not append to the audit log");
                // Published as it came, less any field of the log's own (the reason it was refused).
                let mut record = record.clone();
                for field in ["hash", "prev", "seq"] {
                    record.remove(field);
                }
                (Body::from_map(&record), None)
            }
        };
        self.publish(&body, agent, seq);
    }

    /// A person's `resume`: the agent's score starts again from 0, in log order.
    fn take_resume(&self, record: &Map<String, Value>) {
        if record.get("event").and_then(Value::as_str) != Some("resume") {
            return;
        }
        // Read from the record itself, as the replay reads its line (`replay::input`).
        let agent = record.get("agent").and_then(Value::as_str);
        let ts_us = record.get("ts").and_then(Value::as_str).and_then(risk::replay::micros);
        if let (Some(agent), Some(ts_us)) = (agent, ts_us) {
            self.scoring
                .engine
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume(agent, ts_us);
        }
    }

    fn append_decision(&mut self, decision: Decision, engine: &mut risk::Engine) {
        let seq = self.append(&decision.body);
        self.decisions_written.fetch_add(1, Ordering::Relaxed);
        if let Some(counter) = &decision.written {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(decided) = decision.decided_ns {
            self.health.gauges.appended(decided);
        }
        if decision.denied {
            self.log_denial(&decision.body);
        } else {
            decision_log::allowed(&decision.body);
        }
        self.publish(&decision.body, decision.agent, seq);
        if let (Some(mut observation), Some(seq), true) = (decision.observation, seq, self.scoring.enabled) {
            observation.seq = seq;
            for change in engine.observe(&observation) {
                self.append_risk(&change);
            }
        }
    }

    /// A score change: its record goes in the log right after the decision that made it, and a
    /// crossing goes to the control side to be carried out.
    fn append_risk(&mut self, change: &risk::Change) {
        let body = Body::from_map(&change.to_record());
        let seq = self.append(&body);
        if let Some(action) = change.action {
            warn!(agent = %change.agent, score = change.after, action = action.name(), reason = %change.reason, "risk threshold crossed");
            if self.scoring.actions.send((change.agent.clone(), action)).is_err() {
                error!(agent = %change.agent, "the risk actions are not taken (the daemon is stopping)");
            }
        }
        self.publish(&body, Some(change.agent.clone()), seq);
    }

    /// Appends `body`; its seq, or `None` (said) if the log refused it.
    fn append(&mut self, body: &Body) -> Option<u64> {
        let seq = match self.log.append_body(body) {
            Ok(seq) => Some(seq),
            Err(e) => {
                warn!(error = %e, "could not append to the audit log");
                None
            }
        };
        self.next_seq.store(self.log.next_seq(), Ordering::Relaxed);
        seq
    }

    /// Logs a denied decision, at most [`DENIALS_LOGGED_PER_SECOND`] a second: a flood of
    /// denials would otherwise become a flood of journal lines.
    fn log_denial(&mut self, body: &Body) {
        if self.denials.since.elapsed() >= Duration::from_secs(1) {
            if self.denials.unlogged > 0 {
                info!(target: "ztseg::decision", unlogged = self.denials.unlogged, "more denied decisions in the last second than are logged here; the audit log and `ztseg events` have every one");
            }
            self.denials = Denials { since: Instant::now(), logged: 0, unlogged: 0 };
        }
        if self.denials.logged < DENIALS_LOGGED_PER_SECOND {
            self.denials.logged += 1;
            decision_log::denied(body);
        } else {
            self.denials.unlogged += 1;
        }
    }

    fn publish(&self, body: &Body, agent: Option<Arc<str>>, seq: Option<u64>) {
        let seq = seq.map(|seq| seq.to_string());
        let json = body.to_vec(Chain { seq: seq.as_deref().map(str::as_bytes), ..Chain::default() });
        (self.publish)(Line { agent, json });
    }

    fn flush(&mut self) {
        let flushed = self.log.flush();
        self.after_write(flushed);
    }

    /// After a write of the buffer: hands written batches' ring space back, or says (now, then
    /// every 10 s) that the log cannot be written; says when it can be again, in the log too.
    fn after_write(&mut self, outcome: Result<(), crate::audit::AuditError>) {
        let problem = self.log.unwritable().or(self.log.failure()).map(str::to_owned);
        if problem.is_none() {
            // Every appended record is in the file (an error here was the head's or a
            // checkpoint's, said below): the kernel may have the ring space back.
            for (permit, release) in self.held.drain(..) {
                if let Some(release) = release {
                    release.done();
                }
                drop(permit);
            }
        }
        if let Err(e) = &outcome
            && problem.is_none()
        {
            error!(error = %e, "could not write the audit log's head or checkpoint");
        }
        let mut health = self.health.unwritable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (problem, health.as_mut()) {
            (None, None) => {}
            (None, Some(_)) => {
                let Some(was) = health.take() else { return };
                drop(health);
                self.unwritable_said = None;
                let secs = SystemTime::now().duration_since(was.since).unwrap_or_default().as_secs();
                info!(
                    unwritable_for_s = secs,
                    "the audit log can be written again; what was held is written"
                );
                let mut record = Map::new();
                record.insert("event".to_owned(), "audit_resumed".into());
                record.insert("ts".to_owned(), crate::events::rfc3339(SystemTime::now()).into());
                record.insert("unwritable_since".to_owned(), crate::events::rfc3339(was.since).into());
                record.insert("reason".to_owned(), was.reason.into());
                self.append_daemon(&record);
            }
            (Some(reason), was) => {
                match was {
                    Some(was) => was.reason.clone_from(&reason),
                    None => *health = Some(Unwritable { reason: reason.clone(), since: SystemTime::now() }),
                }
                drop(health);
                if self.unwritable_said.is_none_or(|t| t.elapsed() >= UNWRITABLE_SAID_EVERY) {
                    self.unwritable_said = Some(Instant::now());
                    error!(reason = %reason, held_batches = self.held.len(), "the audit log cannot be written; decisions wait in the kernel's ring, and once it is full allowed connects are refused (reason `unrecorded`) until the log can be written");
                }
            }
        }
    }

    /// Retention: the oldest rotated files beyond `[audit] keep_mib` / `keep_days` go, each
    /// named in the chain first.
    fn prune(&mut self) {
        match self.log.prune(SystemTime::now()) {
            Ok(pruned) => {
                for p in pruned {
                    info!(file = %p.file.display(), first_seq = p.first_seq, last_seq = p.last_seq, bytes = p.bytes, reason = p.reason, "deleted a rotated audit file (retention); a `pruned` record in the chain names it");
                }
            }
            Err(e) => error!(error = %e, "audit log retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::audit::{AuditOptions, HostKey};

    #[test]
    fn records_are_appended_in_order_published_with_their_seq_and_counted() {
        let dir = std::env::temp_dir().join(format!("ztseg-audit-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = HostKey::load_or_create(&dir).unwrap();
        let (log, _) = AuditLog::open(&dir.join("audit.jsonl"), key, AuditOptions::default()).unwrap();
        let first = log.next_seq();
        let published = Arc::new(Mutex::new(Vec::new()));
        let sink = published.clone();
        let (actions, _) = tokio::sync::mpsc::unbounded_channel();
        let scoring = Scoring { enabled: true, engine: Arc::default(), actions };
        let audit = start(log, scoring, move |line: Line| {
            sink.lock().unwrap().push(serde_json::from_slice::<Value>(&line.json).unwrap())
        })
        .unwrap();
        let mut daemon = Map::new();
        daemon.insert("event".into(), json!("kill"));
        audit.send(daemon);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(1));
        let permit = semaphore.clone().try_acquire_owned().unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let decision = |v: &str| {
            let mut r = Map::new();
            r.insert("verdict".into(), json!(v));
            Decision {
                body: Body::from_map(&r),
                agent: None,
                written: Some(counter.clone()),
                denied: v == "deny",
                observation: None,
                decided_ns: None,
            }
        };
        audit.send_decisions(vec![decision("allow"), decision("deny")], Some(permit), None);
        audit.close();
        // Everything handed over before the close is appended, in order, and published.
        let seqs: Vec<u64> = published.lock().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [first, first + 1, first + 2]);
        assert_eq!(published.lock().unwrap()[0]["event"], "kill");
        assert_eq!((audit.decisions_written(), counter.load(Ordering::Relaxed)), (2, 2));
        // The batch's permit came back once it was appended.
        assert_eq!(semaphore.available_permits(), 1);
        // The closing checkpoint follows them.
        assert!(audit.next_seq() > first + 2);
        // The writer has ended: a late record is refused, and the log still ends on the
        // checkpoint.
        let mut late = Map::new();
        late.insert("event".into(), json!("late"));
        audit.send(late);
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        assert!(text.lines().last().unwrap().contains("checkpoint"), "{text}");
        assert!(!text.contains("late"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
