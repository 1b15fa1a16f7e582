//! The tamper-evident audit log: SHA-256 hash-chained JSON lines with signed checkpoints.
//!
//! Every kernel decision and every daemon-side event ends up here, one JSON object per line.
//! `ztseg audit verify` ([`verify`]) finds any edit, deletion, reordering, insertion or truncation
//! and names the first bad record.
//!
//! # Record format (the contract a third party verifies against)
//!
//! The daemon passes a record body (`ts`, `agent`, `op`, `verdict`, ... or `event`); the log adds
//! - `seq`: unsigned integer, 0 for the first record ever, then consecutive (+1) across the whole
//!   chain, rotated files included;
//! - `prev`: the previous record's `hash` (64 lowercase hex digits); 64 zeros (`"000…0"`) for
//!   seq 0;
//! - `hash`: `hex(SHA-256(P || C))`, where `P` is the 32 raw bytes that `prev` spells in hex and
//!   `C` is the record's *canonical bytes*: the whole record including `seq` and `prev` but
//!   without `hash`, as compact JSON (no whitespace) with the keys of every object sorted
//!   (byte-wise, which is Unicode code point order), strings escaped as `\"`, `\\`, `\b`, `\f`,
//!   `\n`, `\r`, `\t`, other characters below U+0020 as `\u00xx` (lowercase hex), everything else
//!   as raw UTF-8, integers in plain decimal. This is exactly Python's
//!   `json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`.
//!
//! Each line on disk is the canonical form of the full record (with `hash`) followed by `\n`; a
//! line that is not in that form (re-indented, keys reordered, a duplicated key) counts as
//! edited. Record bodies may hold only integers, never fractional numbers, so that every
//! implementation prints the same bytes; the writer refuses anything else.
//!
//! A checkpoint is a chain record like any other:
//! `{"event":"checkpoint","seq":S,"prev":H,"covers":S-1,"head":H,"key":K,"ts":T,"sig":G,"hash":..}`
//! where `covers`/`head` name the last record it vouches for (the one right before it), `K` is
//! the host's Ed25519 public key as 64 hex digits, and `G` is the hex Ed25519 signature over the
//! checkpoint's canonical bytes without `sig` and `hash`. `hash` is then computed as for every
//! record (so it covers `sig`). One valid signature vouches for every record before it, through
//! the chain. The public key is exported next to the log as `<log>.pub` (SPKI PEM), but
//! `ztseg audit verify` never trusts it (whoever can rewrite the log can rewrite `<log>.pub`):
//! it checks with a key given out of band or the host key found through the daemon's config,
//! requires the signed head, refuses records no signature vouches for, and checks anchors
//! ([`Anchor`]) kept off the host against rollback.
//!
//! Verifying a log with a few lines of Python (for a rotated log, feed it the rotated files in
//! seq order, then the live file, as one stream of lines):
//!
//! ```text
//! import hashlib, json
//! prev = bytes(32)
//! for n, line in enumerate(open("audit.jsonl", encoding="utf-8"), 1):
//!     rec = json.loads(line)
//!     claimed = rec.pop("hash")
//!     assert rec["prev"] == prev.hex(), f"line {n}: broken link"
//!     canon = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
//!     assert hashlib.sha256(prev + canon.encode()).hexdigest() == claimed, f"line {n}: edited"
//!     prev = bytes.fromhex(claimed)
//!     # checkpoints: del rec["sig"], then Ed25519-verify the sig over the same dumps() bytes
//! ```
//!
//! # Files
//!
//! - `<log>` (e.g. `/var/log/ztseg/audit.jsonl`): the live file.
//! - `<log>.<first_seq>-<last_seq>` (e.g. `audit.jsonl.0-183421`): rotated files. When the live
//!   file passes `rotate_bytes` the writer appends a checkpoint (so every rotated file ends
//!   signed), renames the file to the seq range it holds and starts a new live file whose first
//!   record continues the chain and names its predecessor:
//!   `{"event":"rotated","previous_file":"audit.jsonl.0-183421","previous_last_seq":183421,..}`.
//!   [`resolve_files`] lists them in chain order (by first seq), live file last.
//! - `<log>.pub`: the host's public key, SPKI PEM.
//! - `<log>.head`: a signed statement of the last durable record
//!   (`{"file","seq","hash","time","key","sig"}`, `sig` over the canonical bytes of the other
//!   fields), rewritten atomically (temp file, fsync, rename, fsync of the directory) at each
//!   flush. A chain that ends before the head's seq has lost records at its end.
//! - `<log>.torn-<unix-seconds>`: bytes of a torn last line moved aside at recovery.
//! - `<log>.lock`: held (flock) by the one writer.
//!
//! # Durability
//!
//! Appends go to a buffer in memory. [`AuditLog::flush`] writes the buffer and `fdatasync`s the
//! file, then rewrites the head. `append` flushes by itself every `flush_every` (2048) records and
//! the daemon calls `flush` at least every 200 ms and on shutdown. A crash (daemon killed, kernel
//! panic, power loss) therefore loses at most the records appended in the last 200 ms and never
//! more than 2047 of them; everything before the last completed `flush` survives. A write cut
//! short leaves a torn last line, which the next [`AuditLog::open`] moves aside and records in
//! the chain (`{"event":"recovered","torn_bytes":N,"after_seq":S,..}`). Any other damage found
//! at open (an edited, missing or extra record, a chain shorter than its signed head) is never
//! healed: `open` fails and nothing is appended until an operator has run `ztseg audit verify`.

mod anchor;
mod body;
mod files;
pub mod forge;
mod key;
mod record;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::{io, path::PathBuf};

pub use anchor::Anchor;
pub use body::{Body, BodyWriter, Chain};
pub use files::{head_path, live_path_of, pub_key_path, resolve_files};
pub use key::{HOST_KEY_FILE, HostKey, load_host_public_key, load_verifying_key, parse_verifying_key};
pub use record::{ZERO_HASH, canonical_bytes, chain_hash};
pub use verify::{Damage, DamageKind, KeySource, TrustedKey, VerifyOptions, VerifyReport, verify};
pub use writer::{AuditLog, AuditOptions, RecoveryReport, TornTail};

/// What can go wrong opening, appending to or resolving the audit log, or handling its key.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} is not an Ed25519 PKCS#8 PEM private key: {reason}")]
    PrivateKey { path: PathBuf, reason: String },
    #[error("{path} is readable or writable by group or others (mode {mode:o}); run `chmod 600` on it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("cannot generate the host key: the system's random number generator failed: {reason}")]
    Random { reason: String },
    #[error(
        "{path} holds public key {found}, not the host key {expected}; restore the matching key in the state dir or move the log aside"
    )]
    KeyMismatch { path: PathBuf, found: String, expected: String },
    #[error("{path} is not an Ed25519 public key (SPKI PEM or 64 hex digits): {reason}")]
    PublicKey { path: PathBuf, reason: String },
    #[error("{path} is in use by another writer (it holds the lock on {lock})")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error(
        "{path}: line {line}: {detail}; nothing is appended until `ztseg audit verify {path}` has been run and the damaged file moved aside"
    )]
    Damaged { path: PathBuf, line: usize, seq: Option<u64>, detail: String },
    #[error(
        "{path}: {detail}; nothing is appended until `ztseg audit verify {path}` has been run and the log or its head moved aside"
    )]
    Head { path: PathBuf, detail: String },
    #[error("{path}: field `{field}` of an appended record is reserved for the log itself")]
    ReservedField { path: PathBuf, field: String },
    #[error("{path}: event `{event}` is written by the log itself and cannot be appended")]
    ReservedEvent { path: PathBuf, event: String },
    #[error(
        "{path}: field `{field}` holds a fractional number; audit records carry integers or strings so their canonical form is unambiguous"
    )]
    FractionalNumber { path: PathBuf, field: String },
    #[error(
        "{path}: an earlier write failed ({reason}); reopen the log, which recovers its tail, before appending"
    )]
    Failed { path: PathBuf, reason: String },
    #[error("{path}: {reason}; records are kept in memory and written once it can be written again")]
    Unwritable { path: PathBuf, reason: String },
    #[error("{path}: rotating would overwrite {target}, which already exists")]
    RotateTarget { path: PathBuf, target: PathBuf },
    #[error("{path}: line {line}: not a usable anchor: {reason}")]
    Anchor { path: PathBuf, line: usize, reason: &'static str },
    #[error("{path}: no audit log here (neither the file nor rotated files of it exist)")]
    NotFound { path: PathBuf },
}
