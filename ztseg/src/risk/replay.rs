//! Scores from the audit log: the records the engine reads, parsed back from their JSON lines, and
//! the whole log replayed through a fresh [`Engine`]. The daemon rebuilds its scores this way
//! at start, and `replay equals live` is checked this way.

use std::{
    borrow::Cow,
    io::BufRead,
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use serde::Deserialize;
use serde_json::{Map, Value};
use ztseg_common::event::{ACTION_ACCEPT, ACTION_CONNECT, ACTION_RECEIVE, ACTION_SENDMSG, ACTION_SOCKET};

use super::{Change, Engine, Observation, Params};

/// The fields of a record the engine reads.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    agent: Option<Cow<'a, str>>,
    seq: Option<u64>,
    #[serde(borrow)]
    ts: Option<Cow<'a, str>>,
    #[serde(borrow)]
    last_ts: Option<Cow<'a, str>>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    verdict: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    dst: Option<Cow<'a, str>>,
    dport: Option<u16>,
    count: Option<u64>,
}

/// What a record is to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Decision(Observation),
    /// A person resumed the agent.
    Resume {
        agent: Arc<str>,
        ts_us: u64,
    },
}

/// µs since the Unix epoch of a record's RFC 3339 `ts`.
pub fn micros(ts: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(ts).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
}

fn action_code(name: &str) -> Option<u8> {
    Some(match name {
        "connect" => ACTION_CONNECT,
        "sendmsg" => ACTION_SENDMSG,
        "socket" => ACTION_SOCKET,
        "accept" => ACTION_ACCEPT,
        "receive" => ACTION_RECEIVE,
        "dns" => ztseg_common::dns::ACTION_DNS,
        _ => return None,
    })
}

fn reason_code(name: &str) -> Option<u8> {
    (0..=u8::MAX).find(|&code| crate::events::reason_name(code) == name && name != "unknown")
}

/// What one audit log line is to the engine, if anything (decision records of an agent, and
/// `resume` records).
pub fn input(line: &[u8]) -> Option<Input> {
    let f: Fields = serde_json::from_slice(line).ok()?;
    let agent: Arc<str> = Arc::from(f.agent.as_deref()?);
    match f.event.as_deref() {
        Some("resume") => Some(Input::Resume { agent, ts_us: micros(f.ts.as_deref()?)? }),
        Some(_) => None,
        None => {
            let verdict = f.verdict.as_deref()?;
            let ts = f.last_ts.as_deref().or(f.ts.as_deref())?;
            Some(Input::Decision(Observation {
                agent,
                seq: f.seq?,
                ts_us: micros(ts)?,
                action: action_code(f.action.as_deref()?)?,
                allowed: verdict == "allow",
                reason: reason_code(f.reason.as_deref()?)?,
                dst: f.dst.as_deref().and_then(|d| d.parse::<IpAddr>().ok()),
                dport: f.dport.unwrap_or(0),
                count: f.count.unwrap_or(1),
            }))
        }
    }
}

/// [`input`] of a record as a JSON object.
pub fn input_of(record: &Map<String, Value>) -> Option<Input> {
    input(&serde_json::to_vec(record).ok()?)
}

/// An engine that has taken `inputs` in order, and the changes it made.
pub fn replay(params: Params, inputs: impl IntoIterator<Item = Input>) -> (Engine, Vec<Change>) {
    let mut engine = Engine::new(params);
    let mut changes = Vec::new();
    for input in inputs {
        match input {
            Input::Decision(obs) => changes.extend(engine.observe(&obs)),
            Input::Resume { agent, ts_us } => engine.resume(&agent, ts_us),
        }
    }
    (engine, changes)
}

/// Replays the audit log file at `path` (its lines in order; a missing file is an empty log).
pub fn replay_file(params: Params, path: &Path) -> std::io::Result<(Engine, Vec<Change>)> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(replay(params, [])),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut inputs = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // Most lines are decisions; a daemon record other than `resume` is skipped unparsed.
        if memchr::memmem::find(&line, b"\"event\":").is_some()
            && memchr::memmem::find(&line, b"\"event\":\"resume\"").is_none()
        {
            continue;
        }
        inputs.extend(input(&line));
    }
    Ok(replay(params, inputs))
}

/// The µs of a `SystemTime` (for the live side, which has ns).
pub fn us_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64
}
