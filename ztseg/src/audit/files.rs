//! The files around the live log: naming, rotated files in chain order, the signed head, and
//! atomic replacement.

use std::{
    ffi::OsString,
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use super::{
    AuditError, HostKey,
    record::{canonical_object, parse_hash, rfc3339},
};

/// `<log><suffix>`, e.g. `audit.jsonl.pub`.
pub(crate) fn sibling(log: &Path, suffix: &str) -> PathBuf {
    let mut name = log.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    log.with_file_name(name)
}

/// `<log>.pub`: the host's public key, SPKI PEM.
pub fn pub_key_path(log: &Path) -> PathBuf {
    sibling(log, ".pub")
}

/// `<log>.head`: the signed statement of the last durable record.
pub fn head_path(log: &Path) -> PathBuf {
    sibling(log, ".head")
}

pub(crate) fn lock_path(log: &Path) -> PathBuf {
    sibling(log, ".lock")
}

/// `<log>.<first>-<last>`: where a rotated file goes.
pub(crate) fn rotated_path(log: &Path, first: u64, last: u64) -> PathBuf {
    sibling(log, &format!(".{first}-{last}"))
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The seq range a rotated file's name spells, if `name` is `<log_name>.<first>-<last>`.
fn rotated_range(log_name: &str, name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(log_name)?.strip_prefix('.')?;
    let (first, last) = rest.split_once('-')?;
    let number =
        |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten();
    Some((number(first)?, number(last)?))
}

/// The seq range a rotated file's name spells (`<log>.<first>-<last>`).
pub(crate) fn rotated_range_of(path: &Path) -> Option<(u64, u64)> {
    let name = file_name(path);
    let (stem, _) = name.rsplit_once('.')?;
    rotated_range(stem, &name)
}

/// The live log a file belongs to: itself, or `<log>` for a rotated `<log>.<first>-<last>`.
pub fn live_path_of(path: &Path) -> PathBuf {
    let name = file_name(path);
    if let Some((stem, _)) = name.rsplit_once('.')
        && rotated_range(stem, &name).is_some()
    {
        return path.with_file_name(stem);
    }
    path.to_owned()
}

pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Rotated files of `log`, in chain order (by first seq).
pub(crate) fn rotated_files(log: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let dir = parent(log);
    let log_name = file_name(log);
    let entries = fs::read_dir(dir).map_err(|source| AuditError::Io {
        action: "list",
        path: dir.to_owned(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|source| AuditError::Io { action: "list", path: dir.to_owned(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(range) = rotated_range(&log_name, &name) {
            found.push((range, log.with_file_name(name)));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// Every file of the log at `path` in chain order: rotated files, then the live file. A rotated
/// file named directly is returned alone.
pub fn resolve_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    if live_path_of(path) != path {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = rotated_files(path)?;
    if path.exists() {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(AuditError::NotFound { path: path.to_owned() });
    }
    Ok(files)
}

/// fsync the directory holding `path`, so a create, rename or link in it is durable.
pub(crate) fn sync_dir(path: &Path) -> Result<(), AuditError> {
    let dir = parent(path);
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| AuditError::Io {
        action: "sync",
        path: dir.to_owned(),
        source,
    })
}

/// Replace `path` with `bytes` so that a reader (or a crash) sees the old or the new content,
/// never a mix: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuditError> {
    let tmp = sibling(path, ".tmp");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|source| AuditError::Io { action: "write", path: tmp.clone(), source })?;
    fs::rename(&tmp, path).map_err(|source| AuditError::Io {
        action: "replace",
        path: path.to_owned(),
        source,
    })?;
    sync_dir(path)
}

/// The content of `<log>.head`.
pub(crate) struct Head {
    map: Map<String, Value>,
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    /// Sign a head for the record `seq` with hash `hash` of the live file `log`.
    pub fn sign(log: &Path, seq: u64, hash: &[u8; 32], key: &HostKey, now: SystemTime) -> Vec<u8> {
        let mut map = Map::new();
        map.insert("file".to_owned(), file_name(log).into());
        map.insert("seq".to_owned(), seq.into());
        map.insert("hash".to_owned(), hex::encode(hash).into());
        map.insert("time".to_owned(), rfc3339(now).into());
        map.insert("key".to_owned(), key.key_id().into());
        let sig = key.sign(&canonical_object(&map));
        map.insert("sig".to_owned(), hex::encode(sig).into());
        let mut bytes = canonical_object(&map);
        bytes.push(b'\n');
        bytes
    }

    /// Read `<log>.head`; `Ok(None)` when there is none.
    pub fn read(log: &Path) -> Result<Option<Self>, String> {
        let path = head_path(log);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes) else {
            return Err("it is not a JSON object".to_owned());
        };
        let seq = map.get("seq").and_then(Value::as_u64);
        let hash = map.get("hash").and_then(Value::as_str).and_then(parse_hash);
        match (seq, hash) {
            (Some(seq), Some(hash)) => Ok(Some(Self { map, seq, hash })),
            _ => Err("it lacks an integer `seq` or a hex `hash`".to_owned()),
        }
    }

    pub fn time(&self) -> &str {
        self.map.get("time").and_then(Value::as_str).unwrap_or("?")
    }

    /// The head belongs to `log` and, when a key is given, is signed by it.
    pub fn check(&self, log: &Path, key: Option<&VerifyingKey>) -> Result<(), HeadProblem> {
        let named = self.map.get("file").and_then(Value::as_str).unwrap_or("");
        if named != file_name(log) {
            return Err(HeadProblem::Malformed(format!(
                "it is the head of {named:?}, not of {:?}",
                file_name(log)
            )));
        }
        let Some(key) = key else { return Ok(()) };
        let expected = hex::encode(key.to_bytes());
        if self.map.get("key").and_then(Value::as_str) != Some(expected.as_str()) {
            return Err(HeadProblem::Signature(format!("it is not signed by key {expected}")));
        }
        let mut sig = [0; 64];
        let sig_ok = self
            .map
            .get("sig")
            .and_then(Value::as_str)
            .is_some_and(|s| hex::decode_to_slice(s, &mut sig).is_ok());
        let mut signed = self.map.clone();
        signed.remove("sig");
        if !sig_ok || key.verify_strict(&canonical_object(&signed), &Signature::from_bytes(&sig)).is_err() {
            return Err(HeadProblem::Signature(format!("its signature does not verify with key {expected}")));
        }
        Ok(())
    }
}

pub(crate) enum HeadProblem {
    Malformed(String),
    Signature(String),
}

impl HeadProblem {
    pub fn detail(&self) -> &str {
        match self {
            Self::Malformed(d) | Self::Signature(d) => d,
        }
    }
}
