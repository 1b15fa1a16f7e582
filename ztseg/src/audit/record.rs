//! Canonical JSON, the chain hash, and reading one record line back.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the record with seq 0.
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// Events the log writes itself; a caller cannot append them.
pub(crate) const CHECKPOINT: &str = "checkpoint";
pub(crate) const ROTATED: &str = "rotated";
pub(crate) const RECOVERED: &str = "recovered";
pub(crate) const PRUNED: &str = "pruned";

/// Compact JSON with every object's keys sorted: the bytes that are hashed and signed.
pub fn canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, value);
    out
}

/// [`canonical_bytes`] of an object.
pub(crate) fn canonical_object(map: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_object(&mut out, map);
    out
}

/// `SHA-256(prev || canonical)`: a record's hash from its predecessor's and its own canonical
/// bytes (without `hash`).
pub fn chain_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical);
    hasher.finalize().into()
}

pub(crate) fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

// Sorted explicitly: serde_json's `Map` keeps insertion order when any crate in the build turns
// on its `preserve_order` feature.
fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

// The escapes of serde_json and of Python's json.dumps(ensure_ascii=False), which agree.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                let b = c as u8;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// One line read back, parsed far enough to check it.
pub(crate) struct Record {
    pub map: Map<String, Value>,
    pub seq: u64,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
    /// The line is byte for byte the canonical form of the record it holds.
    pub canonical: bool,
    /// `hash` is SHA-256 over `prev` and the record's canonical bytes.
    pub hash_ok: bool,
}

impl Record {
    pub fn event(&self) -> Option<&str> {
        self.map.get("event").and_then(Value::as_str)
    }

    /// Both checks that make a record what the writer wrote.
    pub fn intact(&self) -> bool {
        self.canonical && self.hash_ok
    }
}

/// Why a line is not a record at all.
pub(crate) enum LineProblem {
    /// Not JSON: typically a torn write.
    NotJson(String),
    /// JSON, but without the fields every record has.
    Malformed { seq: Option<u64>, detail: String },
}

/// Parse one line (without its `\n`) and check its form and hash.
pub(crate) fn parse_record(line: &[u8]) -> Result<Record, LineProblem> {
    let value: Value = serde_json::from_slice(line).map_err(|e| LineProblem::NotJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(LineProblem::Malformed { seq: None, detail: "the line is not a JSON object".to_owned() });
    };
    let Some(seq) = map.get("seq").and_then(Value::as_u64) else {
        return Err(LineProblem::Malformed {
            seq: None,
            detail: "the record has no integer `seq`".to_owned(),
        });
    };
    let field = |name: &str| {
        map.get(name).and_then(Value::as_str).and_then(parse_hash).ok_or_else(|| LineProblem::Malformed {
            seq: Some(seq),
            detail: format!("the record's `{name}` is not 64 lowercase hex digits"),
        })
    };
    let prev = field("prev")?;
    let hash = field("hash")?;
    let canonical = canonical_object(&map) == line;
    let hash_value = map.remove("hash");
    let hash_ok = chain_hash(&prev, &canonical_object(&map)) == hash;
    if let Some(hash_value) = hash_value {
        map.insert("hash".to_owned(), hash_value);
    }
    Ok(Record { map, seq, prev, hash, canonical, hash_ok })
}

/// 64 lowercase hex digits to 32 bytes.
pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    (hex::encode(out) == text).then_some(out)
}

/// Why a checkpoint does not vouch for what precedes it.
pub(crate) enum CheckpointProblem {
    /// Its fields do not fit the record it follows.
    Malformed(String),
    /// Signed by (or naming) another key than the one verified with, or the signature is bad.
    Signature(String),
}

/// Check a checkpoint record: when a key is given, `key` is that key and `sig` verifies; then
/// `covers`/`head` name its predecessor. `Ok(true)` when the signature was checked. The
/// signature comes first because it speaks for the whole record: a checkpoint whose `prev` was
/// rewritten fails it.
pub(crate) fn check_checkpoint(rec: &Record, key: Option<&VerifyingKey>) -> Result<bool, CheckpointProblem> {
    if let Some(key) = key {
        let expected = hex::encode(key.to_bytes());
        let named = rec.map.get("key").and_then(Value::as_str).unwrap_or("");
        if named != expected {
            return Err(CheckpointProblem::Signature(format!(
                "checkpoint names key {named:?}, not the verifying key {expected}"
            )));
        }
        let mut sig = [0; 64];
        let sig_hex = rec.map.get("sig").and_then(Value::as_str).unwrap_or("");
        if hex::decode_to_slice(sig_hex, &mut sig).is_err() {
            return Err(CheckpointProblem::Signature("checkpoint's `sig` is not 128 hex digits".to_owned()));
        }
        let mut signed = rec.map.clone();
        signed.remove("sig");
        signed.remove("hash");
        if key.verify_strict(&canonical_object(&signed), &Signature::from_bytes(&sig)).is_err() {
            return Err(CheckpointProblem::Signature(format!(
                "checkpoint signature does not verify with key {expected}"
            )));
        }
    }
    let covers = rec.map.get("covers").and_then(Value::as_u64);
    if rec.seq == 0 || covers != Some(rec.seq - 1) {
        return Err(CheckpointProblem::Malformed(format!(
            "checkpoint at seq {} must cover seq {} but `covers` is {}",
            rec.seq,
            rec.seq.saturating_sub(1),
            rec.map.get("covers").map_or_else(|| "missing".to_owned(), Value::to_string)
        )));
    }
    if rec.map.get("head").and_then(Value::as_str) != Some(hex::encode(rec.prev).as_str()) {
        return Err(CheckpointProblem::Malformed(
            "checkpoint's `head` is not the hash of the record it covers".to_owned(),
        ));
    }
    Ok(key.is_some())
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-05-01T12:00:00.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
