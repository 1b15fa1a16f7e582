//! Appending to the log: buffering and batched fdatasync, checkpoints, the signed head,
//! rotation, and picking the chain up again after a crash.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::{
    AuditError, Body, Chain, HostKey,
    files::{
        Head, HeadProblem, file_name, head_path, lock_path, pub_key_path, rotated_files, rotated_path,
        sibling, sync_dir, write_atomic,
    },
    key::parse_verifying_key,
    record::{
        CHECKPOINT, CheckpointProblem, LineProblem, PRUNED, RECOVERED, ROTATED, ZERO_HASH, canonical_object,
        chain_hash, check_checkpoint, parse_record, rfc3339,
    },
};

/// When the log checkpoints, rotates and flushes. A 0 turns that trigger off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditOptions {
    /// A signed checkpoint after this many records (default 1000).
    pub checkpoint_every: u64,
    /// ... or when this much time has passed since the last one and records were added
    /// (default 10 s; checked when the daemon calls [`AuditLog::maybe_checkpoint`]).
    pub checkpoint_interval: Duration,
    /// Rotate the live file once it grows past this many bytes (default 64 MiB).
    pub rotate_bytes: u64,
    /// `append` flushes (write + fdatasync) by itself after this many records (default 2048).
    pub flush_every: u64,
    /// Free space the log leaves on its filesystem: a write that would leave less is not made
    /// (the log is unwritable until there is room again). 0: no reserve.
    pub reserve_bytes: u64,
    /// Rotated files kept, in total bytes: [`AuditLog::prune`] deletes the oldest beyond it.
    /// 0: no size limit.
    pub keep_bytes: u64,
    /// Rotated files older than this (by the time they were last written) are deleted by
    /// [`AuditLog::prune`]. `None`: no age limit.
    pub keep_age: Option<Duration>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            rotate_bytes: 64 << 20,
            flush_every: 2048,
            reserve_bytes: 0,
            keep_bytes: 0,
            keep_age: None,
        }
    }
}

/// What [`AuditLog::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Complete records found in the live file (and, when the live file was empty, in the last
    /// rotated file the chain was picked up from).
    pub records: u64,
    /// The seq the next record gets.
    pub next_seq: u64,
    /// A torn last line that was moved aside; the chain records it too.
    pub torn: Option<TornTail>,
    /// The live file was missing or empty after a rotation (a crash between renaming the old
    /// file and starting the new one); the chain was continued from this rotated file.
    pub resumed_rotation: Option<PathBuf>,
    /// The log holds records but `<log>.head` does not exist, so records cut from the end before
    /// this open could not have been noticed.
    pub head_missing: bool,
}

impl RecoveryReport {
    /// Nothing needed repairing and nothing was missing.
    pub fn is_clean(&self) -> bool {
        self.torn.is_none() && self.resumed_rotation.is_none() && !self.head_missing
    }
}

/// A torn last line found at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Its line number in the live file.
    pub line: usize,
    /// How many bytes it had.
    pub bytes: u64,
    /// The chain's last complete record before it (None if the chain was empty).
    pub after_seq: Option<u64>,
    /// Where its bytes were moved, or why they could not be kept (a full disk): they are cut
    /// off either way, and their SHA-256 recorded.
    pub moved_to: Result<PathBuf, String>,
    pub sha256: [u8; 32],
}

/// The one writer of the audit log.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    _lock: Flock<File>,
    key: HostKey,
    key_id: String,
    options: AuditOptions,
    /// Every line appended since the last successful sync: a write or sync that fails is done
    /// again from here.
    buf: Vec<u8>,
    /// Bytes of `buf` written to the file.
    written: usize,
    /// Records in `buf`.
    pending: u64,
    /// The live file's length at the last successful sync.
    synced_len: u64,
    next_seq: u64,
    last_hash: [u8; 32],
    /// Seq of the live file's first record, once it has one.
    file_first_seq: Option<u64>,
    /// The live file's size including `buf`.
    file_bytes: u64,
    /// Rotate once `file_bytes` passes this (`rotate_bytes`, or later after a failed rename).
    rotate_at: u64,
    /// Records since the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint_at: SystemTime,
    /// The last record known to be on disk (written and fdatasync'd).
    durable: Option<(u64, [u8; 32])>,
    /// The last record written to the file and not yet synced.
    unsynced: Option<(u64, [u8; 32])>,
    /// The seq the head file names.
    head_seq: Option<u64>,
    /// Set when a write or fdatasync failed, or the reserve would be broken: records are still
    /// appended (to `buf`), and each write first cuts the file back to `synced_len`.
    unwritable: Option<String>,
    /// The free space of the log's filesystem when last read, less what was written since.
    free_seen: Option<(std::time::Instant, u64)>,
    /// Set when rotation failed half-way: nothing more is appended until the log is reopened
    /// (which recovers the tail and resumes the rotation).
    failed: Option<String>,
}

/// How long a reading of the free space stands for the reserve check.
const RESERVE_RECHECK: Duration = Duration::from_secs(1);

/// A rotated file [`AuditLog::prune`] deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    pub file: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// `size` or `age`.
    pub reason: &'static str,
}

/// What scanning one file at open found.
#[derive(Default)]
struct Scan {
    records: u64,
    last: Option<(u64, [u8; 32])>,
    first_seq: Option<u64>,
    since_checkpoint: u64,
    /// Bytes of complete, checked records.
    good_len: u64,
    /// (line, offset, length) of a torn last line.
    torn: Option<(usize, u64, u64)>,
}

impl AuditLog {
    /// Open (or create) the log at `path`, check what it holds and continue its chain.
    ///
    /// A torn last line is moved aside and recorded; any other damage, a chain shorter than its
    /// signed head, or a `<log>.pub` of another key is an error, and nothing is appended.
    pub fn open(
        path: &Path,
        key: HostKey,
        options: AuditOptions,
    ) -> Result<(Self, RecoveryReport), AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| AuditError::Io { action: "create", path: dir.to_owned(), source })?;
        }
        let lock = take_lock(path)?;
        export_public_key(path, &key)?;
        let verifying = key.verifying_key();

        let head = Head::read(path).map_err(|detail| AuditError::Head {
            path: path.to_owned(),
            detail: format!("its head {} is unusable: {detail}", head_path(path).display()),
        })?;
        if let Some(head) = &head {
            head.check(path, Some(&verifying)).map_err(|p: HeadProblem| AuditError::Head {
                path: path.to_owned(),
                detail: format!("its head {} is not trustworthy: {}", head_path(path).display(), p.detail()),
            })?;
        }

        let mut report = RecoveryReport::default();
        let live = scan(path, &verifying, head.as_ref())?;
        report.records = live.records;
        let mut state = live.last;
        let mut since_checkpoint = live.since_checkpoint;
        if live.last.is_none()
            && let Some((previous, rotated)) = last_rotated(path, &verifying, head.as_ref())?
        {
            report.records = rotated.records;
            state = rotated.last;
            since_checkpoint = rotated.since_checkpoint;
            report.resumed_rotation = Some(previous);
        }

        if let Some(head) = &head {
            let last_seq = state.map(|(seq, _)| seq);
            if last_seq.is_none_or(|seq| seq < head.seq) {
                return Err(AuditError::Head {
                    path: path.to_owned(),
                    detail: format!(
                        "the log ends {} but its signed head (written {}) says seq {} was written: records were cut from its end",
                        last_seq
                            .map_or_else(|| "before its first record".to_owned(), |s| format!("at seq {s}")),
                        head.time(),
                        head.seq
                    ),
                });
            }
        } else if state.is_some() {
            report.head_missing = true;
        }

        if let Some((line, offset, len)) = live.torn {
            let (moved_to, sha256) = move_torn_tail(path, offset, len)?;
            report.torn =
                Some(TornTail { line, bytes: len, after_seq: state.map(|(s, _)| s), moved_to, sha256 });
        }

        let file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| AuditError::Io { action: "open", path: path.to_owned(), source })?;
        // What a crashed writer left in the page cache becomes durable before the head names it.
        file.sync_data().map_err(|source| AuditError::Io {
            action: "sync",
            path: path.to_owned(),
            source,
        })?;
        sync_dir(path)?;
        let file_bytes = file
            .metadata()
            .map_err(|source| AuditError::Io { action: "stat", path: path.to_owned(), source })?
            .len();

        let (next_seq, last_hash) = state.map_or((0, ZERO_HASH), |(seq, hash)| (seq + 1, hash));
        let key_id = key.key_id();
        let mut log = Self {
            path: path.to_owned(),
            file,
            _lock: lock,
            key,
            key_id,
            options,
            buf: Vec::with_capacity(64 << 10),
            written: 0,
            pending: 0,
            synced_len: file_bytes,
            next_seq,
            last_hash,
            file_first_seq: live.first_seq,
            file_bytes,
            rotate_at: options.rotate_bytes,
            since_checkpoint,
            last_checkpoint_at: SystemTime::now(),
            durable: state,
            unsynced: None,
            head_seq: head.map(|h| h.seq),
            unwritable: None,
            free_seen: None,
            failed: None,
        };
        if let Some(previous) = &report.resumed_rotation {
            log.push_rotated(previous)?;
        }
        if let Some(torn) = &report.torn {
            let mut rec = Map::new();
            rec.insert("event".to_owned(), RECOVERED.into());
            rec.insert("ts".to_owned(), rfc3339(SystemTime::now()).into());
            rec.insert("torn_bytes".to_owned(), torn.bytes.into());
            rec.insert("after_seq".to_owned(), torn.after_seq.map_or(Value::Null, Value::from));
            match &torn.moved_to {
                Ok(moved_to) => rec.insert("torn_file".to_owned(), file_name(moved_to).into()),
                Err(why) => {
                    rec.insert("torn_file".to_owned(), Value::Null);
                    rec.insert("torn_not_kept".to_owned(), why.clone().into())
                }
            };
            rec.insert("torn_sha256".to_owned(), hex::encode(torn.sha256).into());
            log.push(rec)?;
            log.since_checkpoint += 1;
        }
        match log.flush() {
            // A full disk does not keep the log from opening: it is unwritable
            // ([`Self::unwritable`]) and writes once it can.
            Ok(()) | Err(AuditError::Unwritable { .. }) => {}
            Err(e) => return Err(e),
        }
        report.next_seq = log.next_seq;
        Ok((log, report))
    }

    /// Append one record body; returns its seq. The body may not carry `seq`, `prev` or `hash`,
    /// nor an `event` the log writes itself, nor fractional numbers.
    pub fn append(&mut self, body: Map<String, Value>) -> Result<u64, AuditError> {
        let body = self.checked_body(&body)?;
        self.append_body(&body)
    }

    /// The [`Body`] of a record body [`append`](Self::append) would take.
    pub(crate) fn checked_body(&self, body: &Map<String, Value>) -> Result<Body, AuditError> {
        self.check_body(body)?;
        Ok(Body::from_map(body))
    }

    /// Append a body the daemon serialised itself ([`super::BodyWriter`]); returns its seq.
    /// Such a body carries no chain field by construction, and no `event` the log writes
    /// itself (the daemon's own record kinds never are).
    pub(crate) fn append_body(&mut self, body: &Body) -> Result<u64, AuditError> {
        let seq = self.push_body(body)?;
        self.since_checkpoint += 1;
        if self.unwritable.is_some() {
            // Nothing can be written: no checkpoint, rotation or flush until it can.
            return Ok(seq);
        }
        match self.after_append() {
            // The record is in the chain and kept; the log says it cannot write
            // ([`Self::unwritable`]) and writes it once it can.
            Ok(()) | Err(AuditError::Unwritable { .. }) => Ok(seq),
            Err(e) => Err(e),
        }
    }

    /// The checkpoint, rotation or flush an append may call for.
    fn after_append(&mut self) -> Result<(), AuditError> {
        if self.options.checkpoint_every > 0 && self.since_checkpoint >= self.options.checkpoint_every {
            self.checkpoint()?;
        }
        if self.options.rotate_bytes > 0 && self.file_bytes > self.rotate_at {
            self.rotate()?;
        } else if self.options.flush_every > 0 && self.pending >= self.options.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Changes the free space the log leaves on its filesystem.
    pub fn set_reserve_bytes(&mut self, bytes: u64) {
        self.options.reserve_bytes = bytes;
    }

    /// Write buffered records, fdatasync, and re-sign the head. Records appended before a
    /// successful `flush` survive a crash.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.write_out()?;
        if let Some((seq, hash)) = self.durable
            && self.head_seq != Some(seq)
        {
            let bytes = Head::sign(&self.path, seq, &hash, &self.key, SystemTime::now());
            write_atomic(&head_path(&self.path), &bytes, 0o644)?;
            self.head_seq = Some(seq);
        }
        Ok(())
    }

    /// Append a checkpoint if records were added and `checkpoint_interval` has passed since the
    /// last one. Returns whether one was written.
    pub fn maybe_checkpoint(&mut self, now: SystemTime) -> Result<bool, AuditError> {
        if self.since_checkpoint == 0 {
            return Ok(false);
        }
        match now.duration_since(self.last_checkpoint_at) {
            Ok(elapsed) if elapsed >= self.options.checkpoint_interval => {
                self.checkpoint_at(now)?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            // The wall clock went backwards: measure the interval from now on.
            Err(_) => {
                self.last_checkpoint_at = now;
                Ok(false)
            }
        }
    }

    /// Append a signed checkpoint covering every record so far (nothing if the last record
    /// already is one, or the chain is empty).
    pub fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.checkpoint_at(SystemTime::now())
    }

    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// When the last checkpoint was written (or the log opened), and how many records have been
    /// appended since, which no checkpoint covers yet.
    pub fn checkpoint_state(&self) -> (SystemTime, u64) {
        (self.last_checkpoint_at, self.since_checkpoint)
    }

    /// The hash of the last record (64 zeros before the first).
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn checkpoint_at(&mut self, now: SystemTime) -> Result<(), AuditError> {
        self.usable()?;
        if self.since_checkpoint == 0 || self.next_seq == 0 {
            return Ok(());
        }
        let head = hex::encode(self.last_hash);
        let mut rec = Map::new();
        rec.insert("event".to_owned(), CHECKPOINT.into());
        rec.insert("ts".to_owned(), rfc3339(now).into());
        rec.insert("covers".to_owned(), (self.next_seq - 1).into());
        rec.insert("head".to_owned(), head.clone().into());
        rec.insert("key".to_owned(), self.key_id.clone().into());
        rec.insert("seq".to_owned(), self.next_seq.into());
        rec.insert("prev".to_owned(), head.into());
        let sig = self.key.sign(&canonical_object(&rec));
        rec.insert("sig".to_owned(), hex::encode(sig).into());
        self.seal(rec);
        self.since_checkpoint = 0;
        self.last_checkpoint_at = now;
        Ok(())
    }

    /// Close the live file as `<log>.<first>-<last>` and continue the chain in a new one. If the
    /// rename fails the live file simply keeps growing and rotation is tried again later: every
    /// record is still logged and durable.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.checkpoint()?;
        self.write_out()?;
        let Some(first) = self.file_first_seq else { return Ok(()) };
        let target = rotated_path(&self.path, first, self.next_seq - 1);
        let renamed = if target.exists() {
            Err(AuditError::RotateTarget { path: self.path.clone(), target: target.clone() })
        } else {
            fs::rename(&self.path, &target).map_err(|source| AuditError::Io {
                action: "rotate",
                path: self.path.clone(),
                source,
            })
        };
        if let Err(e) = renamed {
            tracing::error!("{e}; rotation of the audit log is postponed");
            self.rotate_at = self.file_bytes.saturating_add((self.options.rotate_bytes / 16).max(1));
            return Ok(());
        }
        // From here on the open file is the rotated one: a failure leaves the writer unusable
        // until it is reopened, which resumes the rotation.
        if let Err(e) = sync_dir(&self.path) {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        let file = fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o640)
            .open(&self.path)
            .map_err(|source| self.fail("create", source));
        self.file = file?;
        self.file_first_seq = None;
        self.file_bytes = 0;
        self.synced_len = 0;
        self.rotate_at = self.options.rotate_bytes;
        self.push_rotated(&target)?;
        self.flush()
    }

    fn push_rotated(&mut self, previous: &Path) -> Result<(), AuditError> {
        let mut rec = Map::new();
        rec.insert("event".to_owned(), ROTATED.into());
        rec.insert("ts".to_owned(), rfc3339(SystemTime::now()).into());
        rec.insert("previous_file".to_owned(), file_name(previous).into());
        rec.insert("previous_last_seq".to_owned(), self.next_seq.saturating_sub(1).into());
        self.push(rec)?;
        self.since_checkpoint += 1;
        Ok(())
    }

    fn check_body(&self, body: &Map<String, Value>) -> Result<(), AuditError> {
        for field in ["seq", "prev", "hash"] {
            if body.contains_key(field) {
                return Err(AuditError::ReservedField { path: self.path.clone(), field: field.to_owned() });
            }
        }
        if let Some(event) = body.get("event").and_then(Value::as_str)
            && [CHECKPOINT, ROTATED, RECOVERED, PRUNED].contains(&event)
        {
            return Err(AuditError::ReservedEvent { path: self.path.clone(), event: event.to_owned() });
        }
        for (name, value) in body {
            if let Some(field) = fractional(name, value) {
                return Err(AuditError::FractionalNumber { path: self.path.clone(), field });
            }
        }
        Ok(())
    }

    /// Add `seq` and `prev`, then seal.
    fn push(&mut self, mut rec: Map<String, Value>) -> Result<u64, AuditError> {
        self.usable()?;
        rec.insert("seq".to_owned(), self.next_seq.into());
        rec.insert("prev".to_owned(), hex::encode(self.last_hash).into());
        Ok(self.seal(rec))
    }

    /// Hash a record that carries `seq` and `prev` and buffer its line.
    fn seal(&mut self, mut rec: Map<String, Value>) -> u64 {
        let hash = chain_hash(&self.last_hash, &canonical_object(&rec));
        rec.insert("hash".to_owned(), hex::encode(hash).into());
        let line = canonical_object(&rec);
        self.buffer(&line, hash)
    }

    /// Splice `seq` and `prev` into `body`, hash it, splice in `hash` and buffer the line: the
    /// body is never parsed or sorted again.
    fn push_body(&mut self, body: &Body) -> Result<u64, AuditError> {
        self.usable()?;
        let seq = self.next_seq.to_string();
        let prev = quoted_hex(&self.last_hash);
        let mut hasher = Sha256::new();
        hasher.update(self.last_hash);
        body.emit(Chain { hash: None, prev: Some(&prev), seq: Some(seq.as_bytes()) }, |piece| {
            hasher.update(piece)
        });
        let hash: [u8; 32] = hasher.finalize().into();
        let chain = Chain { hash: Some(&quoted_hex(&hash)), prev: Some(&prev), seq: Some(seq.as_bytes()) };
        let before = self.buf.len();
        body.emit(chain, |piece| self.buf.extend_from_slice(piece));
        self.buf.push(b'\n');
        Ok(self.count_buffered(before, hash))
    }

    fn buffer(&mut self, line: &[u8], hash: [u8; 32]) -> u64 {
        let before = self.buf.len();
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.count_buffered(before, hash)
    }

    /// Book the line just buffered (from `before`) as record `next_seq`, with `hash`.
    fn count_buffered(&mut self, before: usize, hash: [u8; 32]) -> u64 {
        let seq = self.next_seq;
        self.file_bytes += (self.buf.len() - before) as u64;
        self.pending += 1;
        self.file_first_seq.get_or_insert(seq);
        self.next_seq += 1;
        self.last_hash = hash;
        seq
    }

    /// Write and fdatasync the buffer.
    fn write_out(&mut self) -> Result<(), AuditError> {
        self.write_buffered()?;
        let Some(written) = self.unsynced else { return Ok(()) };
        if let Err(source) = self.file.sync_data() {
            return Err(self.cannot_write("sync", &source));
        }
        #[cfg(feature = "fault-injection")]
        injected_sync_delay();
        self.synced_len += self.buf.len() as u64;
        self.buf.clear();
        self.written = 0;
        self.pending = 0;
        self.unsynced = None;
        self.durable = Some(written);
        Ok(())
    }

    /// Writes the buffered records to the file without syncing it: from then on they survive the
    /// daemon's death (not the machine's, until the next [`flush`](Self::flush)). After a failed
    /// write or sync, the file is first cut back to its last synced length and everything since
    /// written again.
    pub(crate) fn write_buffered(&mut self) -> Result<(), AuditError> {
        self.usable()?;
        if self.written == self.buf.len() && self.unwritable.is_none() {
            return Ok(());
        }
        self.check_reserve()?;
        if self.unwritable.is_some() {
            if let Err(source) = self.file.set_len(self.synced_len) {
                return Err(self.cannot_write("truncate", &source));
            }
            self.written = 0;
        }
        if let Err(source) = self.file.write_all(&self.buf[self.written..]) {
            return Err(self.cannot_write("write", &source));
        }
        if let Some((_, free)) = &mut self.free_seen {
            *free = free.saturating_sub((self.buf.len() - self.written) as u64);
        }
        self.written = self.buf.len();
        if self.next_seq > 0 && !self.buf.is_empty() {
            self.unsynced = Some((self.next_seq - 1, self.last_hash));
        }
        self.unwritable = None;
        Ok(())
    }

    /// Why nothing more can be appended until the log is reopened (a rotation failed half-way),
    /// if so.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Why the log cannot be written now, if it cannot (records are kept in memory meanwhile).
    pub fn unwritable(&self) -> Option<&str> {
        self.unwritable.as_deref()
    }

    /// A write would leave less than the reserve free on the log's filesystem: the log is
    /// unwritable until there is room.
    fn check_reserve(&mut self) -> Result<(), AuditError> {
        if self.options.reserve_bytes == 0 {
            return Ok(());
        }
        let needed = (self.buf.len() - self.written) as u64;
        let wanted = self.options.reserve_bytes.saturating_add(needed);
        // A write per batch would cost a statfs each; the last reading, less what was written
        // since, stands for up to a second while it leaves room.
        if let Some((at, free)) = self.free_seen
            && at.elapsed() < RESERVE_RECHECK
            && free >= wanted
        {
            return Ok(());
        }
        let free = match nix::sys::statvfs::statvfs(super::files::parent(&self.path)) {
            Ok(st) => st.blocks_available().saturating_mul(st.fragment_size()),
            Err(errno) => return Err(self.cannot_write("check the free space of", &errno.into())),
        };
        self.free_seen = Some((std::time::Instant::now(), free));
        if free < wanted {
            let reason = format!(
                "its filesystem has {} MiB free, and writing would leave less than the reserve of {} MiB",
                free >> 20,
                self.options.reserve_bytes >> 20
            );
            self.unwritable = Some(reason.clone());
            return Err(AuditError::Unwritable { path: self.path.clone(), reason });
        }
        Ok(())
    }

    fn cannot_write(&mut self, action: &'static str, source: &std::io::Error) -> AuditError {
        let reason = format!("cannot {action} it: {source}");
        self.unwritable = Some(reason.clone());
        AuditError::Unwritable { path: self.path.clone(), reason }
    }

    /// Deletes the oldest rotated files beyond `keep_bytes` or older than `keep_age`, each after
    /// a `pruned` record naming it (its seq range and its last record's hash, which the next
    /// file's first record links to) is in the chain and synced, so `audit verify` can tell
    /// retention from deletion. Nothing is deleted while the log is unwritable.
    pub fn prune(&mut self, now: SystemTime) -> Result<Vec<Pruned>, AuditError> {
        let mut pruned = Vec::new();
        if (self.options.keep_bytes == 0 && self.options.keep_age.is_none()) || self.unwritable.is_some() {
            return Ok(pruned);
        }
        self.usable()?;
        let mut files = Vec::new();
        for path in rotated_files(&self.path)? {
            let Some((first, last)) = super::files::rotated_range_of(&path) else { continue };
            let meta = fs::metadata(&path).map_err(|source| AuditError::Io {
                action: "stat",
                path: path.clone(),
                source,
            })?;
            files.push((path, first, last, meta.len(), meta.modified().unwrap_or(now)));
        }
        let mut total: u64 = files.iter().map(|f| f.3).sum();
        for (path, first_seq, last_seq, bytes, modified) in files {
            let reason = if self.options.keep_bytes > 0 && total > self.options.keep_bytes {
                "size"
            } else if self
                .options
                .keep_age
                .is_some_and(|age| now.duration_since(modified).is_ok_and(|d| d > age))
            {
                "age"
            } else {
                break;
            };
            let mut rec = Map::new();
            rec.insert("event".to_owned(), PRUNED.into());
            rec.insert("ts".to_owned(), rfc3339(now).into());
            rec.insert("file".to_owned(), file_name(&path).into());
            rec.insert("first_seq".to_owned(), first_seq.into());
            rec.insert("last_seq".to_owned(), last_seq.into());
            rec.insert(
                "last_hash".to_owned(),
                last_hash_of(&path, last_seq).map_or(Value::Null, Value::from),
            );
            rec.insert("bytes".to_owned(), bytes.into());
            rec.insert("reason".to_owned(), reason.into());
            self.push(rec)?;
            self.since_checkpoint += 1;
            // On disk before the file goes: a crash in between leaves the file and its record
            // (the next prune records it again).
            self.flush()?;
            fs::remove_file(&path).map_err(|source| AuditError::Io {
                action: "delete",
                path: path.clone(),
                source,
            })?;
            total -= bytes;
            pruned.push(Pruned { file: path, first_seq, last_seq, bytes, reason });
        }
        if !pruned.is_empty() {
            sync_dir(&self.path)?;
        }
        Ok(pruned)
    }

    fn fail(&mut self, action: &'static str, source: std::io::Error) -> AuditError {
        self.failed = Some(format!("cannot {action}: {source}"));
        AuditError::Io { action, path: self.path.clone(), source }
    }

    fn usable(&self) -> Result<(), AuditError> {
        match &self.failed {
            Some(reason) => Err(AuditError::Failed { path: self.path.clone(), reason: reason.clone() }),
            None => Ok(()),
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if self.failed.is_none()
            && let Err(e) = self.flush()
        {
            tracing::error!("audit log not flushed on close: {e}");
        }
    }
}

/// The path of the first fractional number in `value`, if any (`field`, `field.inner`, `field[2]`).
fn fractional(path: &str, value: &Value) -> Option<String> {
    match value {
        Value::Number(n) if n.is_f64() => Some(path.to_owned()),
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, v)| fractional(&format!("{path}[{i}]"), v))
        }
        Value::Object(map) => map.iter().find_map(|(k, v)| fractional(&format!("{path}.{k}"), v)),
        _ => None,
    }
}

fn take_lock(path: &Path) -> Result<Flock<File>, AuditError> {
    let lock = lock_path(path);
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .map_err(|source| AuditError::Io { action: "open", path: lock.clone(), source })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        Errno::EWOULDBLOCK => AuditError::Locked { path: path.to_owned(), lock: lock.clone() },
        errno => AuditError::Io { action: "lock", path: lock.clone(), source: errno.into() },
    })
}

/// Write `<log>.pub` if missing; refuse one that holds another key.
fn export_public_key(log: &Path, key: &HostKey) -> Result<(), AuditError> {
    let path = pub_key_path(log);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = parse_verifying_key(&text)
                .map_err(|reason| AuditError::PublicKey { path: path.clone(), reason })?;
            if found != key.verifying_key() {
                return Err(AuditError::KeyMismatch {
                    path,
                    found: hex::encode(found.to_bytes()),
                    expected: key.key_id(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&path, key.public_key_pem().as_bytes(), 0o644)
        }
        Err(source) => Err(AuditError::Io { action: "read", path, source }),
    }
}

/// The last rotated file and what it holds, checked; `None` when there is none. A rotated file
/// was complete when it was renamed, so a torn or empty one is damage.
fn last_rotated(
    path: &Path,
    key: &ed25519_dalek::VerifyingKey,
    head: Option<&Head>,
) -> Result<Option<(PathBuf, Scan)>, AuditError> {
    let Some(previous) = rotated_files(path)?.pop() else { return Ok(None) };
    let found = scan(&previous, key, head)?;
    let problem = match (found.torn, found.last) {
        (Some((line, _, _)), _) => Some((line, "the rotated file ends in a torn line")),
        (None, None) => Some((1, "the rotated file holds no records")),
        _ => None,
    };
    if let Some((line, detail)) = problem {
        return Err(AuditError::Damaged { path: previous, line, seq: None, detail: detail.to_owned() });
    }
    Ok(Some((previous, found)))
}

/// Read one file of the log, checking each record and its link to the one before. The first
/// record's `prev` is trusted unless its seq is 0 (earlier files are `verify`'s business).
fn scan(path: &Path, key: &ed25519_dalek::VerifyingKey, head: Option<&Head>) -> Result<Scan, AuditError> {
    let io_err = |source| AuditError::Io { action: "read", path: path.to_owned(), source };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(source) => return Err(io_err(source)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut scan = Scan::default();
    let mut line = Vec::new();
    let mut line_no = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io_err)? as u64;
        if n == 0 {
            break;
        }
        line_no += 1;
        let offset = scan.good_len;
        let damaged = |seq: Option<u64>, detail: String| AuditError::Damaged {
            path: path.to_owned(),
            line: line_no,
            seq,
            detail,
        };
        if line.last() != Some(&b'\n') {
            scan.torn = Some((line_no, offset, n));
            break;
        }
        let rec = match parse_record(&line[..line.len() - 1]) {
            Ok(rec) => rec,
            Err(LineProblem::NotJson(_)) if offset + n == len => {
                scan.torn = Some((line_no, offset, n));
                break;
            }
            Err(LineProblem::NotJson(e)) => return Err(damaged(None, format!("the line is not JSON ({e})"))),
            Err(LineProblem::Malformed { seq, detail }) => return Err(damaged(seq, detail)),
        };
        let seq = rec.seq;
        if !rec.intact() {
            return Err(damaged(Some(seq), format!("record {seq} does not match its hash: it was edited")));
        }
        let linked = match scan.last {
            None => seq != 0 || rec.prev == ZERO_HASH,
            Some((last, hash)) => seq == last + 1 && rec.prev == hash,
        };
        if !linked {
            return Err(damaged(
                Some(seq),
                format!("record {seq} does not continue the chain from the line before"),
            ));
        }
        if rec.event() == Some(CHECKPOINT) {
            check_checkpoint(&rec, Some(key)).map_err(|p| {
                damaged(
                    Some(seq),
                    match p {
                        CheckpointProblem::Malformed(d) | CheckpointProblem::Signature(d) => d,
                    },
                )
            })?;
            scan.since_checkpoint = 0;
        } else {
            scan.since_checkpoint += 1;
        }
        if let Some(head) = head.filter(|h| h.seq == seq && h.hash != rec.hash) {
            return Err(AuditError::Head {
                path: path.to_owned(),
                detail: format!(
                    "record {} (line {line_no}) differs from the one its signed head names",
                    head.seq
                ),
            });
        }
        scan.records += 1;
        scan.first_seq.get_or_insert(seq);
        scan.last = Some((seq, rec.hash));
        scan.good_len = offset + n;
    }
    Ok(scan)
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io { action, path: path.to_owned(), source }
}

/// The `hash` of the last line of a rotated file, if that line is record `last_seq`.
fn last_hash_of(path: &Path, last_seq: u64) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let tail = len.min(64 << 10);
    file.seek(SeekFrom::Start(len - tail)).ok()?;
    let mut bytes = Vec::with_capacity(tail as usize);
    file.read_to_end(&mut bytes).ok()?;
    let line = bytes.strip_suffix(b"\n")?.rsplit(|&b| b == b'\n').next()?;
    let rec: Value = serde_json::from_slice(line).ok()?;
    (rec.get("seq")?.as_u64()? == last_seq).then(|| rec.get("hash")?.as_str().map(str::to_owned))?
}

/// Copy the torn bytes at `offset..offset+len` to `<log>.torn-<unix-seconds>` and cut them off
/// the live file. Returns where they went.
fn move_torn_tail(
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<(Result<PathBuf, String>, [u8; 32]), AuditError> {
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open", path))?;
    let mut torn = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.seek(SeekFrom::Start(offset)).map_err(io_err("read", path))?;
    (&mut file).take(len).read_to_end(&mut torn).map_err(io_err("read", path))?;
    let sha256: [u8; 32] = Sha256::digest(&torn).into();
    // Kept beside the log if the disk has room; a full disk (what tears a line, often) must
    // not keep the daemon from starting: the bytes are then cut off with only their hash kept.
    let moved_to = keep_aside(path, &torn).map_err(|e| {
        tracing::error!(error = %e, bytes = len, "the torn last line of the audit log could not be kept aside; it is cut off, its SHA-256 recorded");
        e.to_string()
    });
    file.set_len(offset).and_then(|()| file.sync_all()).map_err(io_err("truncate", path))?;
    Ok((moved_to, sha256))
}

/// Writes `torn` to a new `<log>.torn-<unix-seconds>[.N]`; removes a partial one.
fn keep_aside(path: &Path, torn: &[u8]) -> Result<PathBuf, AuditError> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut attempt = 0;
    let (mut aside, target) = loop {
        let suffix = if attempt == 0 { format!(".torn-{secs}") } else { format!(".torn-{secs}.{attempt}") };
        let target = sibling(path, &suffix);
        match fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(&target) {
            Ok(f) => break (f, target),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(source) => return Err(AuditError::Io { action: "create", path: target, source }),
        }
    };
    if let Err(source) = aside.write_all(torn).and_then(|()| aside.sync_all()) {
        let _ = fs::remove_file(&target);
        return Err(AuditError::Io { action: "write", path: target, source });
    }
    sync_dir(&target)?;
    Ok(target)
}

/// A hash as a JSON string: `"` 64 lowercase hex digits `"`.
fn quoted_hex(hash: &[u8; 32]) -> [u8; 66] {
    let mut out = [b'"'; 66];
    // The output is exactly twice the input's length.
    let _ = hex::encode_to_slice(hash, &mut out[1..65]);
    out
}

/// A test build's slow disk: every fdatasync of the log takes `ZTSEG_FAULT_SYNC_DELAY_MS` longer.
#[cfg(feature = "fault-injection")]
fn injected_sync_delay() {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let ms = std::env::var("ZTSEG_FAULT_SYNC_DELAY_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    });
    if let Some(delay) = delay {
        std::thread::sleep(*delay);
    }
}
