//! `ztseg audit verify`: walk the chain across files and name the first bad record.
//!
//! What it trusts: only the key its caller gives it ([`TrustedKey`]: `--key`, or the host key
//! found through the daemon's config), never `<log>.pub`, which is compared and a mismatch
//! reported. What vouches for a record: a checkpoint after it whose signature verifies, or the
//! signed head naming it or a later record. A log without a head, or ending in more records
//! than the writer ever leaves unsigned, fails unless the caller says it accepts that
//! ([`VerifyOptions`]).

use std::{
    collections::VecDeque,
    fmt, fs,
    fs::File,
    io::{self, BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::{
    AuditOptions,
    anchor::Anchor,
    files::{Head, HeadProblem, file_name, head_path, live_path_of, pub_key_path},
    key::parse_verifying_key,
    record::{
        CHECKPOINT, CheckpointProblem, LineProblem, PRUNED, ROTATED, Record, ZERO_HASH, check_checkpoint,
        parse_hash, parse_record,
    },
};

/// How many recent records are remembered to say which earlier line an inserted copy repeats.
const RECENT: usize = 4096;

/// How many records past its `checkpoint_every` the writer may leave unsigned: the `rotated`
/// and `recovered` records it writes when it opens the log are counted without triggering a
/// checkpoint, so a genuine stretch is at most `checkpoint_every + 1` records long.
const TAIL_SLACK: u64 = 2;

/// When the live log ends in records its head does not name yet (the daemon flushed while the
/// log was read, and re-signs the head right after), how often and how long apart the head is
/// read again.
const HEAD_RETRIES: u32 = 10;
const HEAD_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What is wrong with a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// A record's content does not match its hash (or it was replaced and re-hashed).
    Edited,
    /// Records are missing from the middle of the chain.
    Deleted,
    /// A record appears before one that precedes it in the chain.
    Reordered,
    /// A record that is not part of the chain: a duplicate seq, or a second record linking to
    /// the same predecessor.
    Inserted,
    /// Records are missing at the end (a torn last line, or fewer records than the signed head
    /// says were written), or a whole file is missing.
    Truncated,
    /// A checkpoint (or the head) whose signature fails with the key used.
    BadCheckpointSignature,
    /// A line that is not a record of this log at all.
    Malformed,
    /// A file could not be read.
    Unreadable,
    /// The live log has no `<log>.head`: records cut from its end or rewritten after its last
    /// checkpoint could not be noticed.
    HeadMissing,
    /// Records at the end that no signature vouches for: more after the last checkpoint than
    /// the writer ever leaves unsigned, or records after both the last checkpoint and the head.
    UnsignedTail,
    /// The chain does not hold a record an anchor saw: the log was put back to an older state
    /// (or replaced) behind the anchor.
    RolledBack,
    /// `<log>.pub` holds another key than the trusted one: it was replaced.
    KeyMismatch,
}

impl fmt::Display for DamageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Reordered => "reordered",
            Self::Inserted => "inserted",
            Self::Truncated => "truncated",
            Self::BadCheckpointSignature => "bad checkpoint signature",
            Self::Malformed => "malformed",
            Self::Unreadable => "unreadable",
            Self::HeadMissing => "head missing",
            Self::UnsignedTail => "unsigned tail",
            Self::RolledBack => "rolled back",
            Self::KeyMismatch => "key mismatch",
        })
    }
}

/// The first bad record found: where it is (1-based line in `file`) and what is wrong. For
/// missing records, `seq` is the first missing seq and `line` where it should have been.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub line: usize,
    pub seq: Option<u64>,
    pub kind: DamageKind,
    pub detail: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: line {}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Damage {}

/// Where the trusted key came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// Given by the caller (`--key`).
    Given,
    /// Derived from the host's private key file (`--config`: `<state_dir>/host-key.pem`).
    HostKey(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Given => f.write_str("the given key"),
            Self::HostKey(path) => write!(f, "the host key of {}", path.display()),
        }
    }
}

/// A key the caller trusts, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: VerifyingKey,
    pub source: KeySource,
}

/// What [`verify`] checks, and what its caller accepts.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// The key checkpoint and head signatures must verify with. `None`: signatures are not
    /// checked at all, which the caller must have asked for (`--no-signatures`).
    pub key: Option<TrustedKey>,
    /// The writer's `checkpoint_every`: a log ending in more unsigned records than that (plus
    /// the writer's own slack) fails as [`DamageKind::UnsignedTail`]. 0: no limit.
    pub checkpoint_every: u64,
    /// Accept a live log without `<log>.head` (`--allow-missing-head`).
    pub allow_missing_head: bool,
    /// Accept records at the end that no signature vouches for (`--allow-unsigned-tail`).
    pub allow_unsigned_tail: bool,
    /// Records the chain must hold (`--anchor`).
    pub anchors: Vec<Anchor>,
}

impl VerifyOptions {
    /// Check everything with `key`, accepting nothing unvouched, with the daemon's
    /// `checkpoint_every`.
    pub fn new(key: Option<TrustedKey>) -> Self {
        Self {
            key,
            checkpoint_every: AuditOptions::default().checkpoint_every,
            allow_missing_head: false,
            allow_unsigned_tail: false,
            anchors: Vec::new(),
        }
    }
}

/// What a successful verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: Vec<PathBuf>,
    /// Records in the chain, checkpoints included.
    pub records: u64,
    pub checkpoints_verified: u64,
    /// Checkpoints whose signature was not checked because there was no key.
    pub checkpoints_unchecked: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The hash of the last record.
    pub last_hash: Option<[u8; 32]>,
    /// Where the key came from; `None` when signatures were not checked.
    pub key: Option<KeySource>,
    /// The key used, as 64 hex digits.
    pub key_id: Option<String>,
    /// The seq of the signed head the chain was checked against, if there was one.
    pub head_seq: Option<u64>,
    /// The live log had no head and the caller accepted that.
    pub head_missing: bool,
    /// Records at the end that no checked signature vouches for (accepted by the caller).
    pub unvouched: u64,
    /// Anchors the chain holds.
    pub anchors: usize,
    /// The chain starts after records deleted by the daemon's retention: (the seq of the
    /// `pruned` record that names them, the first seq kept).
    pub pruned: Option<(u64, u64)>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok: {} records", self.records)?;
        if let (Some(first), Some(last)) = (self.first_seq, self.last_seq) {
            write!(f, " (seq {first}..={last})")?;
        }
        write!(f, " in {} file(s); ", self.files.len())?;
        match (&self.key, &self.key_id) {
            (Some(source), Some(id)) => {
                write!(f, "{} checkpoint(s) verified with {source} {id}", self.checkpoints_verified)?;
            }
            _ => write!(
                f,
                "SIGNATURES NOT CHECKED ({} checkpoint(s) unchecked): anyone who can write the log directory could have forged this log",
                self.checkpoints_unchecked
            )?,
        }
        match self.head_seq {
            Some(seq) => write!(f, "; chain reaches its signed head (seq {seq})")?,
            None if self.head_missing => write!(
                f,
                "; NO SIGNED HEAD: records cut from the end or rewritten after the last checkpoint cannot be detected"
            )?,
            None => write!(f, "; no signed head applies (the last file is a rotated one)")?,
        }
        if self.unvouched > 0 {
            write!(f, "; THE LAST {} RECORD(S) ARE VOUCHED FOR BY NO SIGNATURE", self.unvouched)?;
        }
        if self.anchors > 0 {
            write!(f, "; holds all {} anchor(s)", self.anchors)?;
        }
        if let Some((by, first)) = self.pruned {
            write!(f, "; records before seq {first} were deleted by retention (record {by} says so)")?;
        }
        Ok(())
    }
}

/// Check the hash chain across `files` (in chain order, as [`super::resolve_files`] gives them),
/// every checkpoint's signature and the signed head with `options.key`, the anchors, and that
/// every record is vouched for by a signature. Returns the first bad record.
pub fn verify(files: &[PathBuf], options: &VerifyOptions) -> Result<VerifyReport, Damage> {
    let Some(last_file) = files.last() else {
        return Err(Damage {
            file: PathBuf::new(),
            line: 0,
            seq: None,
            kind: DamageKind::Unreadable,
            detail: "no files to verify".to_owned(),
        });
    };
    let live = live_path_of(last_file);
    if let Some(anchor) = options.anchors.iter().find(|a| a.file != file_name(&live)) {
        return Err(Damage {
            file: anchor.source.clone(),
            line: 0,
            seq: Some(anchor.seq),
            kind: DamageKind::Malformed,
            detail: format!("the anchor is of log {:?}, not of {:?}", anchor.file, file_name(&live)),
        });
    }
    let key = options.key.as_ref().map(|t| t.key);
    // The head belongs to the live file: it does not apply when the list stops at a rotated
    // file while the live file exists.
    let head_applies = last_file == &live || !live.exists();
    let (head, head_damage) = if head_applies { load_head(&live, key.as_ref()) } else { (None, None) };
    let mut verifier = Verifier {
        files,
        key,
        head,
        anchors: &options.anchors,
        last: None,
        recent: VecDeque::with_capacity(RECENT),
        records: 0,
        checkpoints_verified: 0,
        checkpoints_unchecked: 0,
        first_seq: None,
        last_checkpoint: None,
        lines_in_last_file: 0,
        start: None,
        start_pruned_by: None,
    };
    let mut cursor = None;
    for idx in 0..files.len() {
        cursor = Some(verifier.scan_file(idx)?);
    }
    if head_applies
        && last_file == &live
        && let Some(cursor) = cursor.as_mut()
    {
        verifier.catch_up_with_head(&live, cursor)?;
    }
    verifier.finish()?;
    verifier.check_start()?;
    if let Some(damage) = head_damage {
        return Err(damage);
    }
    verifier.check_anchors_reached()?;
    let head_missing = head_applies && verifier.head.is_none() && verifier.last.is_some();
    if head_missing && !options.allow_missing_head {
        let last = verifier.last.as_ref().map_or(0, |l| l.seq);
        return Err(verifier.at_end(
            DamageKind::HeadMissing,
            format!(
                "{} does not exist: nothing vouches that the log ends at seq {last}, nor for records after its last checkpoint; restore the head or pass --allow-missing-head to accept that",
                head_path(&live).display()
            ),
        ));
    }
    let unvouched = verifier.check_tail(options, head_missing)?;
    if let Some(trusted) = &options.key {
        check_pub_file(&live, trusted)?;
    }
    Ok(VerifyReport {
        files: files.to_vec(),
        records: verifier.records,
        checkpoints_verified: verifier.checkpoints_verified,
        checkpoints_unchecked: verifier.checkpoints_unchecked,
        first_seq: verifier.first_seq,
        last_seq: verifier.last.as_ref().map(|l| l.seq),
        last_hash: verifier.last.as_ref().map(|l| l.hash),
        key: options.key.as_ref().map(|t| t.source.clone()),
        key_id: key.map(|k| hex::encode(k.to_bytes())),
        head_seq: verifier.head.as_ref().map(|h| h.seq),
        head_missing,
        unvouched,
        anchors: options.anchors.len(),
        pruned: verifier.start_pruned_by.zip(verifier.start.map(|s| s.seq)),
    })
}

/// `<log>.pub` is never trusted, but one that holds another key than the trusted one was
/// replaced (the daemon refuses to start with it).
fn check_pub_file(live: &Path, trusted: &TrustedKey) -> Result<(), Damage> {
    let path = pub_key_path(live);
    let expected = hex::encode(trusted.key.to_bytes());
    let found = match fs::read_to_string(&path) {
        Ok(text) => parse_verifying_key(&text).map(|k| hex::encode(k.to_bytes())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(format!("cannot read it: {e}")),
    };
    match found {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => Err(Damage {
            file: path,
            line: 1,
            seq: None,
            kind: DamageKind::KeyMismatch,
            detail: format!(
                "it holds key {found}, not the trusted key {expected} ({}): it was replaced",
                trusted.source
            ),
        }),
        Err(reason) => Err(Damage {
            file: path,
            line: 1,
            seq: None,
            kind: DamageKind::KeyMismatch,
            detail: format!("it is not an Ed25519 public key ({reason}); the trusted key is {expected}"),
        }),
    }
}

struct HeadTarget {
    seq: u64,
    hash: [u8; 32],
    path: PathBuf,
    time: String,
}

/// The signed head of the live log. A head that is unusable is reported after the chain
/// itself, which names damage more precisely.
fn load_head(live: &Path, key: Option<&VerifyingKey>) -> (Option<HeadTarget>, Option<Damage>) {
    let path = head_path(live);
    let damage = |kind, seq, detail: &str| Damage {
        file: path.clone(),
        line: 1,
        seq,
        kind,
        detail: format!("the log's signed head is not trustworthy: {detail}"),
    };
    match Head::read(live) {
        Ok(None) => (None, None),
        Err(detail) => (None, Some(damage(DamageKind::Malformed, None, &detail))),
        Ok(Some(head)) => match head.check(live, key) {
            Ok(()) => {
                let time = head.time().to_owned();
                (Some(HeadTarget { seq: head.seq, hash: head.hash, path: path.clone(), time }), None)
            }
            Err(HeadProblem::Malformed(d)) => (None, Some(damage(DamageKind::Malformed, Some(head.seq), &d))),
            Err(HeadProblem::Signature(d)) => {
                (None, Some(damage(DamageKind::BadCheckpointSignature, Some(head.seq), &d)))
            }
        },
    }
}

/// The last file, open where its scan stopped, so records appended since can be read on.
struct Cursor {
    idx: usize,
    reader: BufReader<File>,
    line_no: usize,
    offset: u64,
}

/// A record accepted into the chain.
#[derive(Clone)]
struct Accepted {
    file: usize,
    line: usize,
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
}

/// A record read ahead, parsed only as far as needed to classify damage.
struct Ahead {
    file: usize,
    line: usize,
    seq: u64,
    prev: Option<[u8; 32]>,
}

struct Verifier<'a> {
    files: &'a [PathBuf],
    key: Option<VerifyingKey>,
    head: Option<HeadTarget>,
    anchors: &'a [Anchor],
    last: Option<Accepted>,
    recent: VecDeque<Accepted>,
    records: u64,
    checkpoints_verified: u64,
    checkpoints_unchecked: u64,
    first_seq: Option<u64>,
    /// The seq of the last checkpoint accepted.
    last_checkpoint: Option<u64>,
    lines_in_last_file: usize,
    /// The chain's first record when it is not seq 0: the `rotated` record that began a file
    /// whose predecessors retention deleted.
    start: Option<Start>,
    /// The `pruned` record that names the records before `start`.
    start_pruned_by: Option<u64>,
}

#[derive(Clone, Copy)]
struct Start {
    seq: u64,
    prev: [u8; 32],
    file: usize,
    line: usize,
}

impl Verifier<'_> {
    /// A chain that starts after seq 0 must say, in a record of its own, that the daemon's
    /// retention deleted what came before: anyone else's deletion does not verify.
    fn check_start(&self) -> Result<(), Damage> {
        match self.start {
            Some(start) if self.start_pruned_by.is_none() => Err(self.damage(
                start.file,
                start.line,
                Some(0),
                DamageKind::Truncated,
                format!(
                    "the chain starts at seq {}, not 0, and no `pruned` record in it names records 0..={} (with the hash this record links to): earlier files were deleted, not by the daemon's retention",
                    start.seq,
                    start.seq - 1
                ),
            )),
            _ => Ok(()),
        }
    }

    fn damage(&self, file: usize, line: usize, seq: Option<u64>, kind: DamageKind, detail: String) -> Damage {
        Damage { file: self.files[file].clone(), line, seq, kind, detail }
    }

    fn scan_file(&mut self, idx: usize) -> Result<Cursor, Damage> {
        let file = File::open(&self.files[idx]).map_err(|e| self.unreadable(idx, &e))?;
        let reader = BufReader::with_capacity(1 << 20, file);
        let mut cursor = Cursor { idx, reader, line_no: 0, offset: 0 };
        self.scan_more(&mut cursor)?;
        Ok(cursor)
    }

    fn unreadable(&self, idx: usize, e: &io::Error) -> Damage {
        self.damage(idx, 0, None, DamageKind::Unreadable, format!("cannot read it: {e}"))
    }

    /// Read `cursor`'s file on to its end.
    fn scan_more(&mut self, cursor: &mut Cursor) -> Result<(), Damage> {
        let idx = cursor.idx;
        let Cursor { reader, line_no, offset, .. } = cursor;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| self.unreadable(idx, &e))?;
            if n == 0 {
                break;
            }
            *line_no += 1;
            *offset += n as u64;
            if line.last() != Some(&b'\n') {
                let seq = serde_json::from_slice::<Value>(&line).ok().and_then(|v| v.get("seq")?.as_u64());
                return Err(self.damage(
                    idx,
                    *line_no,
                    seq,
                    DamageKind::Truncated,
                    "the line is cut short (no trailing newline): a write was torn or the file was cut mid-record"
                        .to_owned(),
                ));
            }
            let at_eof = reader.fill_buf().map_err(|e| self.unreadable(idx, &e))?.is_empty();
            let rec = match parse_record(&line[..n - 1]) {
                Ok(rec) => rec,
                Err(LineProblem::NotJson(e)) if at_eof && idx + 1 == self.files.len() => {
                    return Err(self.damage(
                        idx,
                        *line_no,
                        None,
                        DamageKind::Truncated,
                        format!("the last line is not complete JSON ({e}): a write was torn"),
                    ));
                }
                Err(LineProblem::NotJson(e)) => {
                    return Err(self.damage(
                        idx,
                        *line_no,
                        None,
                        DamageKind::Malformed,
                        format!("the line is not JSON ({e})"),
                    ));
                }
                Err(LineProblem::Malformed { seq, detail }) => {
                    return Err(self.damage(idx, *line_no, seq, DamageKind::Malformed, detail));
                }
            };
            self.check(idx, *line_no, *offset, rec)?;
        }
        if idx + 1 == self.files.len() {
            self.lines_in_last_file = *line_no;
        }
        Ok(())
    }

    /// Check one record against the chain so far; `offset` is just past its line.
    fn check(&mut self, idx: usize, line: usize, offset: u64, rec: Record) -> Result<(), Damage> {
        let s = rec.seq;
        let at =
            |kind, detail: String| Damage { file: self.files[idx].clone(), line, seq: Some(s), kind, detail };
        let is_checkpoint = rec.event() == Some(CHECKPOINT);
        // A failing signature is the most specific thing to say about a checkpoint, even one
        // whose bytes were also altered (flipping a byte of `sig` breaks both).
        if is_checkpoint
            && let Err(CheckpointProblem::Signature(d)) = check_checkpoint(&rec, self.key.as_ref())
        {
            return Err(at(DamageKind::BadCheckpointSignature, d));
        }
        if !rec.hash_ok {
            return Err(at(
                DamageKind::Edited,
                "the record does not match its hash: it was changed after it was written".to_owned(),
            ));
        }
        if !rec.canonical {
            return Err(at(
                DamageKind::Edited,
                "the line is not in the canonical form the log writes: the record was rewritten".to_owned(),
            ));
        }

        let Some(last) = self.last.clone() else {
            if s != 0 && rec.event() == Some(ROTATED) {
                // The first file kept after retention deleted older ones; a `pruned` record
                // later in the chain must name what came before ([`Self::check_start`]).
                self.start = Some(Start { seq: s, prev: rec.prev, file: idx, line });
                return self.accept(idx, line, rec);
            }
            if s != 0 {
                let what = rec.map.get("previous_file").and_then(Value::as_str).map_or_else(
                    || "earlier records are missing".to_owned(),
                    |f| format!("{f} (named by this record) is missing"),
                );
                return Err(Damage {
                    seq: Some(0),
                    ..at(DamageKind::Truncated, format!("the chain starts at seq {s}, not 0: {what}"))
                });
            }
            if rec.prev != ZERO_HASH {
                return Err(at(DamageKind::Edited, "record 0's prev is not 64 zeros".to_owned()));
            }
            return self.accept(idx, line, rec);
        };

        let n = last.seq + 1;
        if s == n && rec.prev == last.hash {
            return self.accept(idx, line, rec);
        }
        if s == n {
            // Either this record is an extra one, or the record before it was replaced.
            if self.find_later(idx, line, offset, |a| a.seq == n && a.prev == Some(last.hash)).is_some() {
                return Err(at(
                    DamageKind::Inserted,
                    format!(
                        "it does not link to record {} but a later record {n} does: this one was inserted",
                        last.seq
                    ),
                ));
            }
            return Err(Damage {
                file: self.files[last.file].clone(),
                line: last.line,
                seq: Some(last.seq),
                kind: DamageKind::Edited,
                detail: format!(
                    "record {n} (line {line} of {}) does not link to this record's hash: it was altered or replaced after record {n} was written",
                    file_name(&self.files[idx])
                ),
            });
        }
        if s > n {
            let missing =
                if s - 1 == n { format!("record {n} is") } else { format!("records {n}..={} are", s - 1) };
            if rec.prev == last.hash {
                return Err(at(
                    DamageKind::Edited,
                    format!(
                        "its seq jumps from {} to {s} although it links to record {}: the seq was rewritten",
                        last.seq, last.seq
                    ),
                ));
            }
            if line == 1 && idx > 0 {
                let what = rec.map.get("previous_file").and_then(Value::as_str).map_or_else(
                    || format!("a file between {} and this one", file_name(&self.files[idx - 1])),
                    |f| format!("{f} (named by this record)"),
                );
                return Err(Damage {
                    seq: Some(n),
                    ..at(
                        DamageKind::Truncated,
                        format!("{missing} missing: {what} is not among the files verified"),
                    )
                });
            }
            if let Some(later) = self.find_later(idx, line, offset, |a| (n..s).contains(&a.seq)) {
                return Err(at(
                    DamageKind::Reordered,
                    format!(
                        "record {s} comes before record {} (line {} of {})",
                        later.seq,
                        later.line,
                        file_name(&self.files[later.file])
                    ),
                ));
            }
            return Err(Damage {
                seq: Some(n),
                ..at(DamageKind::Deleted, format!("{missing} missing before this line"))
            });
        }

        // s < n: this seq is already in the chain.
        if s + 1 == n && rec.prev == last.prev {
            // Two records claim the same predecessor; the chain continues from one of them.
            if self.find_later(idx, line, offset, |a| a.seq == n && a.prev == Some(rec.hash)).is_some() {
                return Err(Damage {
                    file: self.files[last.file].clone(),
                    line: last.line,
                    seq: Some(last.seq),
                    kind: DamageKind::Inserted,
                    detail: format!(
                        "it and record {s} on line {line} both follow record {}, and the chain continues from the later one: this one was inserted",
                        s.saturating_sub(1)
                    ),
                });
            }
        }
        let earlier = self.recent.iter().find(|a| a.seq == s);
        let detail = match earlier {
            Some(a) if a.hash == rec.hash => {
                format!("it repeats record {s} (line {} of {})", a.line, file_name(&self.files[a.file]))
            }
            Some(a) => {
                format!("seq {s} is already used on line {} of {}", a.line, file_name(&self.files[a.file]))
            }
            None => format!("seq {s} is already used earlier in the chain"),
        };
        Err(at(DamageKind::Inserted, detail))
    }

    /// Take a record that links correctly into the chain.
    fn accept(&mut self, idx: usize, line: usize, rec: Record) -> Result<(), Damage> {
        let s = rec.seq;
        let at =
            |kind, detail: String| Damage { file: self.files[idx].clone(), line, seq: Some(s), kind, detail };
        if line == 1 && idx > 0 {
            let continues = rec.event() == Some(ROTATED)
                && rec.map.get("previous_last_seq").and_then(Value::as_u64) == Some(s.wrapping_sub(1));
            if !continues {
                return Err(at(
                    DamageKind::Malformed,
                    "a file after the first must begin with the `rotated` record that continues the chain"
                        .to_owned(),
                ));
            }
        }
        if rec.event() == Some(CHECKPOINT) {
            match check_checkpoint(&rec, self.key.as_ref()) {
                Ok(true) => self.checkpoints_verified += 1,
                Ok(false) => self.checkpoints_unchecked += 1,
                Err(CheckpointProblem::Malformed(d)) => return Err(at(DamageKind::Malformed, d)),
                Err(CheckpointProblem::Signature(d)) => {
                    return Err(at(DamageKind::BadCheckpointSignature, d));
                }
            }
        }
        if let Some(anchor) = self.anchors.iter().find(|a| a.seq == s && a.hash != rec.hash) {
            return Err(at(
                DamageKind::RolledBack,
                format!(
                    "the record differs from the one anchor {} (taken {}) saw at this seq: the log was replaced or rolled back and rewritten behind the anchor",
                    anchor.source.display(),
                    anchor.time
                ),
            ));
        }
        if rec.event() == Some(CHECKPOINT) {
            self.last_checkpoint = Some(s);
        }
        if rec.event() == Some(PRUNED)
            && let Some(start) = self.start
            && rec.map.get("last_seq").and_then(Value::as_u64) == Some(start.seq - 1)
            && rec.map.get("last_hash").and_then(Value::as_str) == Some(hex::encode(start.prev).as_str())
        {
            self.start_pruned_by = Some(s);
        }
        if let Some(head) = self.head.as_ref().filter(|h| h.seq == s && h.hash != rec.hash) {
            return Err(at(
                DamageKind::Edited,
                format!(
                    "the record differs from the one the signed head {} names: the chain was rewritten from here or earlier",
                    head.path.display()
                ),
            ));
        }
        let accepted = Accepted { file: idx, line, seq: s, prev: rec.prev, hash: rec.hash };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(accepted.clone());
        self.last = Some(accepted);
        self.first_seq.get_or_insert(s);
        self.records += 1;
        Ok(())
    }

    /// A damage just past the chain's last line.
    fn at_end(&self, kind: DamageKind, detail: String) -> Damage {
        let seq = self.last.as_ref().map(|l| l.seq);
        self.damage(self.files.len() - 1, self.lines_in_last_file, seq, kind, detail)
    }

    /// The daemon writes and syncs records, then re-signs the head: a live log read while it
    /// flushes ends in records the head read before does not name yet. Read the head again
    /// (a few times, briefly apart) and the file on, until the head names the chain's end.
    fn catch_up_with_head(&mut self, live: &Path, cursor: &mut Cursor) -> Result<(), Damage> {
        for _ in 0..HEAD_RETRIES {
            let (Some(last), Some(head)) = (&self.last, &self.head) else { return Ok(()) };
            if head.seq >= last.seq || self.last_checkpoint == Some(last.seq) {
                return Ok(());
            }
            std::thread::sleep(HEAD_RETRY_PAUSE);
            let (Some(newer), None) = load_head(live, self.key.as_ref()) else { continue };
            if newer.seq <= head.seq {
                continue;
            }
            if newer.seq <= last.seq {
                if let Some(a) = self.recent.iter().find(|a| a.seq == newer.seq)
                    && a.hash != newer.hash
                {
                    return Err(self.damage(
                        a.file,
                        a.line,
                        Some(a.seq),
                        DamageKind::Edited,
                        format!(
                            "the record differs from the one the signed head {} names: the chain was rewritten from here or earlier",
                            newer.path.display()
                        ),
                    ));
                }
                self.head = Some(newer);
            } else {
                self.head = Some(newer);
                self.scan_more(cursor)?;
            }
        }
        Ok(())
    }

    /// Every anchor's seq is in the chain (a differing record at it was caught on the way).
    fn check_anchors_reached(&self) -> Result<(), Damage> {
        let reached = self.last.as_ref().map(|l| l.seq);
        let Some(anchor) =
            self.anchors.iter().filter(|a| reached.is_none_or(|r| a.seq > r)).max_by_key(|a| a.seq)
        else {
            return Ok(());
        };
        Err(self.at_end(
            DamageKind::RolledBack,
            format!(
                "the chain ends {} but anchor {} (taken {}) saw seq {}: the log was rolled back behind the anchor",
                reached.map_or_else(|| "before its first record".to_owned(), |seq| format!("at seq {seq}")),
                anchor.source.display(),
                anchor.time,
                anchor.seq
            ),
        ))
    }

    /// The records at the end that no signature vouches for: after the last checkpoint and
    /// after the head. Fails when there are more after the last checkpoint than the writer
    /// ever leaves unsigned, or when any is vouched for by nothing and the caller did not
    /// accept that. Returns how many were accepted unvouched.
    fn check_tail(&self, options: &VerifyOptions, head_missing: bool) -> Result<u64, Damage> {
        let Some(last) = &self.last else { return Ok(0) };
        let since_checkpoint = self.last_checkpoint.map_or(last.seq + 1, |c| last.seq - c);
        let after = self
            .last_checkpoint
            .map_or_else(|| "no checkpoint at all".to_owned(), |c| format!("the last checkpoint (seq {c})"));
        let limit = options.checkpoint_every.saturating_add(TAIL_SLACK);
        if options.checkpoint_every > 0 && since_checkpoint > limit && !options.allow_unsigned_tail {
            let first = last.seq + 1 - since_checkpoint;
            return Err(self.at_record(
                first,
                DamageKind::UnsignedTail,
                format!(
                    "the chain ends in {since_checkpoint} records after {after}, but the writer signs a checkpoint at least every {} records: they were written without the host key (--allow-unsigned-tail accepts that)",
                    options.checkpoint_every
                ),
            ));
        }
        let vouched_to = match (self.last_checkpoint, self.head.as_ref().map(|h| h.seq)) {
            (Some(c), Some(h)) => Some(c.max(h)),
            (c, h) => c.or(h),
        };
        let unvouched = vouched_to.map_or(last.seq + 1, |v| last.seq.saturating_sub(v));
        if unvouched == 0 || options.allow_unsigned_tail || (head_missing && vouched_to.is_some()) {
            return Ok(unvouched);
        }
        let first = last.seq + 1 - unvouched;
        let detail = match (&self.head, head_missing) {
            (Some(head), _) => format!(
                "records {first}..={} come after {after} and after the signed head (seq {}): no signature vouches for them (--allow-unsigned-tail accepts that)",
                last.seq, head.seq
            ),
            (None, true) => format!(
                "the log holds no checkpoint and has no head: no signature vouches for any of its {unvouched} records (--allow-unsigned-tail accepts that)"
            ),
            (None, false) => format!(
                "records {first}..={} come after {after} at the end of a rotated file: no signature vouches for them (--allow-unsigned-tail accepts that)",
                last.seq
            ),
        };
        Err(self.at_record(first, DamageKind::UnsignedTail, detail))
    }

    /// A damage at record `seq` if it is among the recent ones, else at the chain's end.
    fn at_record(&self, seq: u64, kind: DamageKind, detail: String) -> Damage {
        match self.recent.iter().find(|a| a.seq == seq) {
            Some(a) => self.damage(a.file, a.line, Some(seq), kind, detail),
            None => self.at_end(kind, detail),
        }
    }

    /// After the last file: does the chain reach the signed head?
    fn finish(&self) -> Result<(), Damage> {
        let Some(head) = &self.head else { return Ok(()) };
        let reached = self.last.as_ref().map(|l| l.seq);
        if reached.is_some_and(|seq| seq >= head.seq) {
            return Ok(());
        }
        let file = self.files.len() - 1;
        let first_missing = reached.map_or(0, |seq| seq + 1);
        Err(self.damage(
            file,
            self.lines_in_last_file + 1,
            Some(first_missing),
            DamageKind::Truncated,
            format!(
                "the chain ends {} but the signed head {} (written {}) says seq {} was written: records were cut from the end",
                reached.map_or_else(|| "before its first record".to_owned(), |seq| format!("at seq {seq}")),
                head.path.display(),
                head.time,
                head.seq
            ),
        ))
    }

    /// The first record after `line` (at byte `offset` of file `idx`), in this or a later file,
    /// for which `wanted` holds. Only read when classifying damage.
    fn find_later(
        &self,
        idx: usize,
        line: usize,
        offset: u64,
        wanted: impl Fn(&Ahead) -> bool,
    ) -> Option<Ahead> {
        for (file, path) in self.files.iter().enumerate().skip(idx) {
            let mut reader = BufReader::new(File::open(path).ok()?);
            let mut line_no = 0;
            if file == idx {
                reader.seek(SeekFrom::Start(offset)).ok()?;
                line_no = line;
            }
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if reader.read_until(b'\n', &mut buf).ok()? == 0 {
                    break;
                }
                line_no += 1;
                let Ok(value) = serde_json::from_slice::<Value>(&buf) else { continue };
                let Some(seq) = value.get("seq").and_then(Value::as_u64) else { continue };
                let prev = value.get("prev").and_then(Value::as_str).and_then(parse_hash);
                let ahead = Ahead { file, line: line_no, seq, prev };
                if wanted(&ahead) {
                    return Some(ahead);
                }
            }
        }
        None
    }
}
