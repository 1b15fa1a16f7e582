//! Forgeries of a log by someone who can write its directory but has no host key: what
//! `ztseg audit verify` must catch. For tests (this crate's and the CLI's integration tests);
//! nothing here is used by the daemon. Each function rewrites files in place, in the log's own
//! format, the way such an attacker would: records re-chained with valid hashes, checkpoints
//! and heads re-signed with the attacker's key, `<log>.pub` replaced.
//!
//! Every function works on a single live file whose chain starts at seq 0 (no rotated files).

use std::{fs, io, path::Path, time::SystemTime};

use serde_json::{Map, Value};

use super::{
    HostKey,
    files::{Head, head_path, pub_key_path},
    record::{CHECKPOINT, ZERO_HASH, canonical_object, chain_hash},
};

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The log's lines, without their newlines.
pub fn read_lines(log: &Path) -> io::Result<Vec<String>> {
    Ok(fs::read_to_string(log)?.lines().map(str::to_owned).collect())
}

/// Write `lines` as the log, one per line.
pub fn write_lines(log: &Path, lines: &[String]) -> io::Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(log, text)
}

fn parse(line: &str) -> io::Result<Map<String, Value>> {
    match serde_json::from_str(line).map_err(bad)? {
        Value::Object(map) => Ok(map),
        _ => Err(bad("a line is not a JSON object")),
    }
}

/// Renumber `seq` from 0, recompute every `prev` and `hash`, and make each checkpoint name the
/// record before it. With `signer`, every checkpoint is re-signed with that key (and names it);
/// without, checkpoints keep their old signatures.
pub fn rechain(lines: &mut [String], signer: Option<&HostKey>) -> io::Result<()> {
    let mut prev = ZERO_HASH;
    for (seq, line) in (0_u64..).zip(lines.iter_mut()) {
        let mut rec = parse(line)?;
        rec.remove("hash");
        rec.insert("seq".into(), seq.into());
        rec.insert("prev".into(), hex::encode(prev).into());
        if rec.get("event").and_then(Value::as_str) == Some(CHECKPOINT) {
            rec.insert("covers".into(), seq.saturating_sub(1).into());
            rec.insert("head".into(), hex::encode(prev).into());
            if let Some(key) = signer {
                rec.remove("sig");
                rec.insert("key".into(), key.key_id().into());
                let sig = key.sign(&canonical_object(&rec));
                rec.insert("sig".into(), hex::encode(sig).into());
            }
        }
        let hash = chain_hash(&prev, &canonical_object(&rec));
        rec.insert("hash".into(), hex::encode(hash).into());
        *line = String::from_utf8(canonical_object(&rec)).map_err(bad)?;
        prev = hash;
    }
    Ok(())
}

/// The seq and hash of the last line.
fn last_record(lines: &[String]) -> io::Result<(u64, [u8; 32])> {
    let last = parse(lines.last().ok_or_else(|| bad("the log is empty"))?)?;
    let seq = last.get("seq").and_then(Value::as_u64).ok_or_else(|| bad("no seq"))?;
    let mut hash = [0; 32];
    hex::decode_to_slice(last.get("hash").and_then(Value::as_str).unwrap_or(""), &mut hash).map_err(bad)?;
    Ok((seq, hash))
}

/// An attacker with a key of their own.
pub struct Forger {
    pub key: HostKey,
}

impl Forger {
    pub fn new() -> io::Result<Self> {
        Ok(Self { key: HostKey::generate().map_err(bad)? })
    }

    /// Forgery 1: remove the records on `lines` (0-based line indexes), re-chain, re-sign
    /// every checkpoint and the head with the attacker's key, and replace `<log>.pub` with it.
    pub fn remove_and_resign(&self, log: &Path, lines: &[usize]) -> io::Result<()> {
        remove_lines(log, lines, Some(&self.key))?;
        self.sign_head(log)?;
        self.replace_pub(log)
    }

    /// Write `<log>.head` for the log's last record, signed with the attacker's key.
    pub fn sign_head(&self, log: &Path) -> io::Result<()> {
        let (seq, hash) = last_record(&read_lines(log)?)?;
        fs::write(head_path(log), Head::sign(log, seq, &hash, &self.key, SystemTime::now()))
    }

    /// Replace `<log>.pub` with the attacker's public key.
    pub fn replace_pub(&self, log: &Path) -> io::Result<()> {
        fs::write(pub_key_path(log), self.key.public_key_pem())
    }
}

/// Remove the records on `lines` (0-based line indexes) and re-chain the rest
/// ([`rechain`], re-signing checkpoints with `signer` if given).
pub fn remove_lines(log: &Path, lines: &[usize], signer: Option<&HostKey>) -> io::Result<()> {
    let mut kept: Vec<String> = read_lines(log)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !lines.contains(i))
        .map(|(_, line)| line)
        .collect();
    rechain(&mut kept, signer)?;
    write_lines(log, &kept)
}

/// Forgery 2's last step: delete `<log>.pub` and `<log>.head` (either may be missing).
pub fn delete_pub_and_head(log: &Path) -> io::Result<()> {
    for path in [pub_key_path(log), head_path(log)] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Forgery 3: rewrite every record after the last checkpoint (each gets `"forged":1` and, if it
/// is a decision, an `allow` verdict) and re-chain them; the checkpoints before stay genuine.
/// Returns how many records were rewritten.
pub fn rewrite_tail(log: &Path) -> io::Result<usize> {
    let mut lines = read_lines(log)?;
    let start = lines.iter().rposition(|l| l.contains(r#""event":"checkpoint""#)).map_or(0, |i| i + 1);
    for line in &mut lines[start..] {
        let mut rec = parse(line)?;
        rec.insert("forged".into(), 1.into());
        if rec.contains_key("verdict") {
            rec.insert("verdict".into(), "allow".into());
        }
        *line = String::from_utf8(canonical_object(&rec)).map_err(bad)?;
    }
    rechain(&mut lines, None)?;
    write_lines(log, &lines)?;
    Ok(lines.len() - start)
}

/// Forgery 4: replace the whole log with a chain of `n` made-up decision records and no
/// checkpoint.
pub fn fabricate(log: &Path, n: u64) -> io::Result<()> {
    let mut lines = Vec::new();
    for i in 0..n {
        let rec = serde_json::json!({
            "ts": "2026-05-01T12:00:00.000000Z", "agent": "analyst-7", "op": null, "jti": null,
            "pid": 1000 + i, "uid": 0, "comm": "curl", "cgroup_id": 1, "action": "connect",
            "proto": "tcp", "dst": "192.0.2.1", "dport": 443, "verdict": "deny", "reason": "no_rule",
            "rule": null, "seq": 0, "prev": "", "hash": "",
        });
        lines.push(rec.to_string());
    }
    rechain(&mut lines, None)?;
    write_lines(log, &lines)
}

/// The live file and its head as they are now, to be put back later (forgery 5: an older
/// log and its genuinely signed older head).
pub struct Snapshot {
    log: Vec<u8>,
    head: Vec<u8>,
}

impl Snapshot {
    pub fn take(log: &Path) -> io::Result<Self> {
        Ok(Self { log: fs::read(log)?, head: fs::read(head_path(log))? })
    }

    /// Put the log and head back as they were; rotated files are left alone.
    pub fn put_back(&self, log: &Path) -> io::Result<()> {
        fs::write(log, &self.log)?;
        fs::write(head_path(log), &self.head)
    }
}
