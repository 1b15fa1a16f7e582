//! `ztseg audit verify`: walk the chain across files and name the first bad record.

use std::{
    collections::VecDeque,
    fmt, fs,
    fs::File,
    io::{self, BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::{
    files::{Head, HeadProblem, file_name, head_path, live_path_of, pub_key_path},
    key::parse_verifying_key,
    record::{
        CHECKPOINT, CheckpointProblem, LineProblem, ROTATED, Record, ZERO_HASH, check_checkpoint, parse_hash,
        parse_record,
    },
};

/// How many recent records are remembered to say which earlier line an inserted copy repeats.
const RECENT: usize = 4096;

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

/// Which key checkpoint and head signatures were checked with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The key given by the caller (`--key`): the trustworthy case.
    Given,
    /// The key exported next to the log. Whoever can rewrite the log can rewrite this file too.
    PubFile(PathBuf),
    /// No key: signatures were not checked.
    None,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Given => f.write_str("the given key"),
            Self::PubFile(path) => write!(f, "the key in {}", path.display()),
            Self::None => f.write_str("no key (signatures not checked)"),
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
    pub key: KeySource,
    /// The key used, as 64 hex digits.
    pub key_id: Option<String>,
    /// The seq of the signed head the chain was checked against, if there was one.
    pub head_seq: Option<u64>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok: {} records", self.records)?;
        if let (Some(first), Some(last)) = (self.first_seq, self.last_seq) {
            write!(f, " (seq {first}..={last})")?;
        }
        write!(
            f,
            " in {} file(s); {} checkpoint(s) verified with {}",
            self.files.len(),
            self.checkpoints_verified,
            self.key
        )?;
        if let Some(id) = &self.key_id {
            write!(f, " {id}")?;
        }
        if self.checkpoints_unchecked > 0 {
            write!(f, ", {} unchecked", self.checkpoints_unchecked)?;
        }
        match self.head_seq {
            Some(seq) => write!(f, "; chain reaches its signed head (seq {seq})"),
            None => write!(f, "; no signed head checked"),
        }
    }
}

/// Check the hash chain across `files` (in chain order, as [`super::resolve_files`] gives them)
/// and every checkpoint's signature with `key`, or with the key in `<log>.pub` when `key` is
/// `None`. Returns the first bad record.
pub fn verify(files: &[PathBuf], key: Option<&VerifyingKey>) -> Result<VerifyReport, Damage> {
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
    let (key, source) = resolve_key(&live, key)?;
    let (head, head_damage) = load_head(files, &live, key.as_ref());
    let mut verifier = Verifier {
        files,
        key,
        head,
        last: None,
        recent: VecDeque::with_capacity(RECENT),
        records: 0,
        checkpoints_verified: 0,
        checkpoints_unchecked: 0,
        first_seq: None,
        lines_in_last_file: 0,
    };
    for idx in 0..files.len() {
        verifier.scan_file(idx)?;
    }
    verifier.finish()?;
    if let Some(damage) = head_damage {
        return Err(damage);
    }
    Ok(VerifyReport {
        files: files.to_vec(),
        records: verifier.records,
        checkpoints_verified: verifier.checkpoints_verified,
        checkpoints_unchecked: verifier.checkpoints_unchecked,
        first_seq: verifier.first_seq,
        last_seq: verifier.last.as_ref().map(|l| l.seq),
        key: source,
        key_id: key.map(|k| hex::encode(k.to_bytes())),
        head_seq: verifier.head.map(|h| h.seq),
    })
}

fn resolve_key(
    live: &Path,
    given: Option<&VerifyingKey>,
) -> Result<(Option<VerifyingKey>, KeySource), Damage> {
    if let Some(key) = given {
        return Ok((Some(*key), KeySource::Given));
    }
    let path = pub_key_path(live);
    let damage = |kind, detail| Damage { file: path.clone(), line: 1, seq: None, kind, detail };
    match fs::read_to_string(&path) {
        Ok(text) => match parse_verifying_key(&text) {
            Ok(key) => Ok((Some(key), KeySource::PubFile(path))),
            Err(e) => Err(damage(DamageKind::Malformed, format!("not an Ed25519 public key: {e}"))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((None, KeySource::None)),
        Err(e) => Err(damage(DamageKind::Unreadable, format!("cannot read it: {e}"))),
    }
}

struct HeadTarget {
    seq: u64,
    hash: [u8; 32],
    path: PathBuf,
    time: String,
}

/// The signed head of the live log, when it applies to this list of files (it does not when
/// the list stops at a rotated file while the live file exists). A head that is unusable is
/// reported after the chain itself, which names damage more precisely.
fn load_head(
    files: &[PathBuf],
    live: &Path,
    key: Option<&VerifyingKey>,
) -> (Option<HeadTarget>, Option<Damage>) {
    if files.last().is_some_and(|f| f != live) && live.exists() {
        return (None, None);
    }
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
    last: Option<Accepted>,
    recent: VecDeque<Accepted>,
    records: u64,
    checkpoints_verified: u64,
    checkpoints_unchecked: u64,
    first_seq: Option<u64>,
    lines_in_last_file: usize,
}

impl Verifier<'_> {
    fn damage(&self, file: usize, line: usize, seq: Option<u64>, kind: DamageKind, detail: String) -> Damage {
        Damage { file: self.files[file].clone(), line, seq, kind, detail }
    }

    fn scan_file(&mut self, idx: usize) -> Result<(), Damage> {
        let path = self.files[idx].clone();
        let unreadable = |e: io::Error| Damage {
            file: path.clone(),
            line: 0,
            seq: None,
            kind: DamageKind::Unreadable,
            detail: format!("cannot read it: {e}"),
        };
        let file = File::open(&self.files[idx]).map_err(unreadable)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = Vec::new();
        let mut line_no = 0;
        let mut offset = 0;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            offset += n as u64;
            if line.last() != Some(&b'\n') {
                let seq = serde_json::from_slice::<Value>(&line).ok().and_then(|v| v.get("seq")?.as_u64());
                return Err(self.damage(
                    idx,
                    line_no,
                    seq,
                    DamageKind::Truncated,
                    "the line is cut short (no trailing newline): a write was torn or the file was cut mid-record"
                        .to_owned(),
                ));
            }
            let at_eof = reader.fill_buf().map_err(unreadable)?.is_empty();
            let rec = match parse_record(&line[..n - 1]) {
                Ok(rec) => rec,
                Err(LineProblem::NotJson(e)) if at_eof && idx + 1 == self.files.len() => {
                    return Err(self.damage(
                        idx,
                        line_no,
                        None,
                        DamageKind::Truncated,
                        format!("the last line is not complete JSON ({e}): a write was torn"),
                    ));
                }
                Err(LineProblem::NotJson(e)) => {
                    return Err(self.damage(
                        idx,
                        line_no,
                        None,
                        DamageKind::Malformed,
                        format!("the line is not JSON ({e})"),
                    ));
                }
                Err(LineProblem::Malformed { seq, detail }) => {
                    return Err(self.damage(idx, line_no, seq, DamageKind::Malformed, detail));
                }
            };
            self.check(idx, line_no, offset, rec)?;
        }
        if idx + 1 == self.files.len() {
            self.lines_in_last_file = line_no;
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
