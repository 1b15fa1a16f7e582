//! Anchors: the head of a verified log, written down somewhere the host cannot rewrite.
//!
//! Whoever can write the log directory can put back an older log together with its older head:
//! both are genuinely signed, so the log alone cannot tell. `ztseg audit anchor` prints a
//! statement of where a verified chain ended, one JSON line,
//! `{"anchor":"ztseg-audit","file":F,"seq":S,"hash":H,"time":T,"key":K}`, for the operator to
//! ship off the host (journald through `logger`, a remote collector, an append-only file).
//! `ztseg audit verify --anchor FILE` then requires the chain to hold record `S` with hash `H`:
//! a log rolled back behind the anchor (`S` missing, or another record at `S`) fails as
//! [`super::DamageKind::RolledBack`]. The anchor is signed by nothing: its worth is where it is
//! kept.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde_json::{Map, Value};

use super::{
    AuditError,
    record::{canonical_object, parse_hash, rfc3339},
};

/// The `anchor` field every anchor line carries.
const MARK: &str = "ztseg-audit";

/// Where a verified chain ended, as `ztseg audit anchor` saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// The live log's file name (e.g. `audit.jsonl`).
    pub file: String,
    pub seq: u64,
    pub hash: [u8; 32],
    /// When the anchor was taken (RFC 3339 UTC).
    pub time: String,
    /// The host key the log was verified with (64 hex digits).
    pub key: String,
    /// The file it was read from (empty for one not read from a file).
    pub source: PathBuf,
}

impl Anchor {
    pub fn new(file: String, seq: u64, hash: [u8; 32], key: String, now: SystemTime) -> Self {
        Self { file, seq, hash, time: rfc3339(now), key, source: PathBuf::new() }
    }

    /// The anchor as one canonical JSON line (without the newline).
    pub fn to_line(&self) -> String {
        let mut map = Map::new();
        map.insert("anchor".to_owned(), MARK.into());
        map.insert("file".to_owned(), self.file.clone().into());
        map.insert("seq".to_owned(), self.seq.into());
        map.insert("hash".to_owned(), hex::encode(self.hash).into());
        map.insert("time".to_owned(), self.time.clone().into());
        map.insert("key".to_owned(), self.key.clone().into());
        String::from_utf8_lossy(&canonical_object(&map)).into_owned()
    }

    /// Every anchor in `path`: one per non-empty line. Text before a line's first `{` is
    /// skipped, so a line copied from the journal (`Dec 02 host ztseg-anchor[12]: {...}`) works.
    pub fn read_file(path: &Path) -> Result<Vec<Self>, AuditError> {
        let text = fs::read_to_string(path).map_err(|source| AuditError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        let mut anchors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let Some(start) = line.find('{') else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(AuditError::Anchor {
                    path: path.to_owned(),
                    line: n + 1,
                    reason: "no JSON object",
                });
            };
            let bad = |reason| AuditError::Anchor { path: path.to_owned(), line: n + 1, reason };
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&line[start..]) else {
                return Err(bad("not a JSON object"));
            };
            let text = |name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
            if text("anchor").as_deref() != Some(MARK) {
                return Err(bad("not a ztseg audit anchor (no \"anchor\":\"ztseg-audit\")"));
            }
            let (Some(file), Some(seq), Some(hash)) = (
                text("file"),
                map.get("seq").and_then(Value::as_u64),
                text("hash").as_deref().and_then(parse_hash),
            ) else {
                return Err(bad("it lacks a `file`, an integer `seq` or a hex `hash`"));
            };
            anchors.push(Self {
                file,
                seq,
                hash,
                time: text("time").unwrap_or_else(|| "?".to_owned()),
                key: text("key").unwrap_or_default(),
                source: path.to_owned(),
            });
        }
        if anchors.is_empty() {
            return Err(AuditError::Anchor { path: path.to_owned(), line: 0, reason: "it holds no anchor" });
        }
        Ok(anchors)
    }
}
