//! Writer, recovery, rotation and verification against real files in a temporary directory.
//! Every tampering test first shows that the untouched log verifies.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{record::rfc3339, *};

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ztseg-audit-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn body(i: u64) -> Map<String, Value> {
    obj(json!({
        "ts": "2026-05-01T12:00:00.000Z", "agent": "analyst-7", "op": "op-1", "jti": "j-1",
        "pid": 4242 + i, "comm": "python3", "cgroup_id": 77, "action": "connect", "proto": "tcp",
        "dst": "10.0.5.12", "dport": 5432, "verdict": if i.is_multiple_of(3) { "deny" } else { "allow" },
        "reason": "rule", "rule": "scopes.read:data.sales_q1_2026",
    }))
}

/// Checkpoint every 5 records, flush every 4, no rotation.
fn small() -> AuditOptions {
    AuditOptions {
        checkpoint_every: 5,
        checkpoint_interval: Duration::from_secs(3600),
        rotate_bytes: 0,
        flush_every: 4,
        ..AuditOptions::default()
    }
}

fn host_key(dir: &Path) -> HostKey {
    HostKey::load_or_create(&dir.join("state")).unwrap()
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("log").join("audit.jsonl")
}

/// A log of `n` appended records (plus checkpoints) under `dir`; returns its path and key.
fn write_log(dir: &Path, n: u64, options: AuditOptions) -> (PathBuf, VerifyingKey) {
    let key = host_key(dir);
    let public = key.verifying_key();
    let path = log_path(dir);
    let (mut log, report) = AuditLog::open(&path, key, options).unwrap();
    assert!(report.is_clean(), "{report:?}");
    for i in 0..n {
        log.append(body(i)).unwrap();
    }
    log.flush().unwrap();
    (path, public)
}

/// 20 records with checkpoints at seq 5, 11, 17, 23: 24 lines, line k + 1 holds seq k.
fn standard_log(dir: &Path) -> (PathBuf, VerifyingKey) {
    write_log(dir, 20, small())
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

/// Copy the live file, its key and its head into `dir/copy`.
fn copy_log(src: &Path, dir: &Path) -> PathBuf {
    let dst_dir = dir.join("copy");
    fs::create_dir_all(&dst_dir).unwrap();
    let dst = dst_dir.join(src.file_name().unwrap());
    fs::copy(src, &dst).unwrap();
    fs::copy(pub_key_path(src), pub_key_path(&dst)).unwrap();
    fs::copy(head_path(src), head_path(&dst)).unwrap();
    dst
}

/// What an operator trusts (`--config`): the host key in the state dir beside the log's dir,
/// never `<log>.pub`.
fn trusted(log: &Path) -> TrustedKey {
    let state = log.parent().unwrap().parent().unwrap().join("state");
    TrustedKey {
        key: load_host_public_key(&state).unwrap(),
        source: KeySource::HostKey(state.join(HOST_KEY_FILE)),
    }
}

/// Strict verification with the trusted key; the tail limit fits every writer option used here
/// (checkpoints every 5 or 10 records).
fn options(log: &Path) -> VerifyOptions {
    VerifyOptions { checkpoint_every: 10, ..VerifyOptions::new(Some(trusted(log))) }
}

fn verify_files(files: &[PathBuf]) -> Result<VerifyReport, Damage> {
    verify(files, &options(&files[0]))
}

fn verify_log(path: &Path) -> Result<VerifyReport, Damage> {
    verify_files(&resolve_files(path).unwrap())
}

fn given(key: VerifyingKey) -> VerifyOptions {
    VerifyOptions::new(Some(TrustedKey { key, source: KeySource::Given }))
}

fn damage(path: &Path) -> Damage {
    match verify_log(path) {
        Ok(report) => panic!("tampering was not detected: {report}"),
        Err(damage) => damage,
    }
}

fn assert_damage(d: &Damage, file: &Path, kind: DamageKind, line: usize, seq: Option<u64>) {
    assert_eq!((d.kind, d.line, d.seq, d.file.as_path()), (kind, line, seq, file), "{d}");
}

/// Recompute every `prev` and `hash` from the first line on, as someone without the host key
/// would after changing a record.
fn rechain(lines: &mut [String]) {
    let mut prev = ZERO_HASH;
    for line in lines.iter_mut() {
        let mut rec = obj(serde_json::from_str(line).unwrap());
        rec.remove("hash");
        rec.insert("prev".into(), hex::encode(prev).into());
        let hash = chain_hash(&prev, &canonical_bytes(&Value::Object(rec.clone())));
        rec.insert("hash".into(), hex::encode(hash).into());
        *line = String::from_utf8(canonical_bytes(&Value::Object(rec))).unwrap();
        prev = hash;
    }
}

#[test]
fn appended_log_verifies() {
    let dir = TempDir::new("ok");
    let (path, public) = standard_log(dir.path());
    let report = verify_log(&path).unwrap();
    assert_eq!((report.records, report.first_seq, report.last_seq), (24, Some(0), Some(23)));
    assert_eq!((report.checkpoints_verified, report.checkpoints_unchecked), (4, 0));
    assert_eq!(report.key, Some(KeySource::HostKey(dir.path().join("state").join(HOST_KEY_FILE))));
    assert_eq!(report.key_id, Some(hex::encode(public.to_bytes())));
    assert_eq!((report.head_seq, report.head_missing, report.unvouched), (Some(23), false, 0));
    let given = verify(std::slice::from_ref(&path), &given(public)).unwrap();
    assert_eq!(given.key, Some(KeySource::Given));
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 24);
    let checkpoint = obj(serde_json::from_str(&lines[5]).unwrap());
    assert_eq!(checkpoint["event"], "checkpoint");
    assert_eq!(checkpoint["covers"], 4);
    assert_eq!(checkpoint["head"], obj(serde_json::from_str(&lines[4]).unwrap())["hash"]);
}

#[test]
fn record_hash_follows_the_documented_definition() {
    let dir = TempDir::new("hash");
    let path = log_path(dir.path());
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    let mut rec = Map::new();
    rec.insert("verdict".into(), "deny".into());
    rec.insert("dport".into(), 443.into());
    rec.insert("comm".into(), "py\"th\\on\n\u{1}é".into());
    rec.insert("agent".into(), "a-1".into());
    log.append(rec).unwrap();
    log.append(obj(json!({"agent": "a-1"}))).unwrap();
    drop(log);

    // By hand, from the module documentation: sorted keys, compact, escapes as Python's
    // json.dumps(ensure_ascii=False); hash = SHA-256(prev raw bytes || canonical bytes).
    let zeros = "0".repeat(64);
    let canonical = format!(
        r#"{{"agent":"a-1","comm":"py\"th\\on\n\u0001é","dport":443,"prev":"{zeros}","seq":0,"verdict":"deny"}}"#
    );
    let hash =
        hex::encode(Sha256::new().chain_update([0u8; 32]).chain_update(canonical.as_bytes()).finalize());
    let expected_line = format!(
        r#"{{"agent":"a-1","comm":"py\"th\\on\n\u0001é","dport":443,"hash":"{hash}","prev":"{zeros}","seq":0,"verdict":"deny"}}"#
    );
    let lines = read_lines(&path);
    assert_eq!(lines[0], expected_line);

    let second = format!(r#"{{"agent":"a-1","prev":"{hash}","seq":1}}"#);
    let hash2 = hex::encode(
        Sha256::new().chain_update(hex::decode(&hash).unwrap()).chain_update(second.as_bytes()).finalize(),
    );
    assert_eq!(lines[1], format!(r#"{{"agent":"a-1","hash":"{hash2}","prev":"{hash}","seq":1}}"#));
    verify_log(&path).unwrap();
}

#[test]
fn canonical_form_sorts_nested_objects() {
    let value = json!({"b": [{"d": 1, "c": -2}, "x"], "a": null, "é": true, "Z": {"y": {}, "x": []}});
    assert_eq!(
        String::from_utf8(canonical_bytes(&value)).unwrap(),
        r#"{"Z":{"x":[],"y":{}},"a":null,"b":[{"c":-2,"d":1},"x"],"é":true}"#
    );
}

#[test]
fn edited_field_is_named() {
    let dir = TempDir::new("edit");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    assert!(lines[7].contains(r#""dport":5432"#));
    lines[7] = lines[7].replace(r#""dport":5432"#, r#""dport":5433"#);
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::Edited, 8, Some(7));
}

#[test]
fn rewritten_chain_is_caught_by_the_next_checkpoint() {
    let dir = TempDir::new("rechain");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    fs::remove_file(head_path(&copy)).unwrap();
    // Control: re-chaining an untouched log changes nothing, so it still verifies.
    let mut lines = read_lines(&copy);
    rechain(&mut lines);
    assert_eq!(lines, read_lines(&path));
    let headless = VerifyOptions { allow_missing_head: true, ..options(&copy) };
    verify(std::slice::from_ref(&copy), &headless).unwrap();

    lines[7] = lines[7].replace(r#""dport":5432"#, r#""dport":22"#);
    rechain(&mut lines);
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::BadCheckpointSignature, 12, Some(11));
}

#[test]
fn deleted_middle_line_is_named() {
    let dir = TempDir::new("delete");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    lines.remove(8);
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::Deleted, 9, Some(8));
}

#[test]
fn swapped_lines_are_reordered() {
    let dir = TempDir::new("swap");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    lines.swap(3, 4);
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::Reordered, 4, Some(4));
}

#[test]
fn inserted_copy_is_named() {
    let dir = TempDir::new("insert");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    let copied = lines[1].clone();
    lines.insert(7, copied);
    write_lines(&copy, &lines);
    let d = damage(&copy);
    assert_damage(&d, &copy, DamageKind::Inserted, 8, Some(1));
    assert!(d.detail.contains("repeats record 1 (line 2"), "{d}");
}

#[test]
fn inserted_forged_record_is_named_not_its_twin() {
    let dir = TempDir::new("forge");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    // A well-formed record 8 that links to record 7, placed before the real record 8.
    let mut forged = obj(serde_json::from_str(&lines[8]).unwrap());
    forged.remove("hash");
    forged.insert("dst".into(), "198.51.100.9".into());
    let prev = record::parse_hash(forged["prev"].as_str().unwrap()).unwrap();
    let hash = chain_hash(&prev, &canonical_bytes(&Value::Object(forged.clone())));
    forged.insert("hash".into(), hex::encode(hash).into());
    lines.insert(8, String::from_utf8(canonical_bytes(&Value::Object(forged))).unwrap());
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::Inserted, 9, Some(8));
}

#[test]
fn line_cut_mid_record_is_truncated() {
    let dir = TempDir::new("torn");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let bytes = fs::read(&copy).unwrap();
    let last_start = bytes[..bytes.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    fs::write(&copy, &bytes[..last_start + 40]).unwrap();
    assert_damage(&damage(&copy), &copy, DamageKind::Truncated, 24, None);
}

#[test]
fn records_dropped_from_the_end_are_caught_by_the_head() {
    let dir = TempDir::new("drop");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    lines.truncate(21);
    write_lines(&copy, &lines);
    let d = damage(&copy);
    assert_damage(&d, &copy, DamageKind::Truncated, 22, Some(21));
    assert!(d.detail.contains("seq 23"), "{d}");
    // Without the head, whole records cut from the end are indistinguishable from a shorter log:
    // the head is what catches it, so a log without one fails unless the caller accepts that.
    fs::remove_file(head_path(&copy)).unwrap();
    assert_damage(&damage(&copy), &copy, DamageKind::HeadMissing, 21, Some(20));
    let headless = VerifyOptions { allow_missing_head: true, ..options(&copy) };
    let report = verify(std::slice::from_ref(&copy), &headless).unwrap();
    assert_eq!((report.last_seq, report.head_missing, report.unvouched), (Some(20), true, 3));
}

#[test]
fn flipped_checkpoint_signature_is_named() {
    let dir = TempDir::new("sig");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    verify_log(&copy).unwrap();
    let mut lines = read_lines(&copy);
    let mut rec = obj(serde_json::from_str(&lines[5]).unwrap());
    let sig = rec["sig"].as_str().unwrap().to_owned();
    let flipped = format!("{}{}", if sig.starts_with('0') { '1' } else { '0' }, &sig[1..]);
    rec.insert("sig".into(), flipped.into());
    lines[5] = String::from_utf8(canonical_bytes(&Value::Object(rec))).unwrap();
    write_lines(&copy, &lines);
    assert_damage(&damage(&copy), &copy, DamageKind::BadCheckpointSignature, 6, Some(5));
}

#[test]
fn wrong_key_is_refused() {
    let dir = TempDir::new("wrongkey");
    let (path, public) = standard_log(dir.path());
    let files = resolve_files(&path).unwrap();
    assert_eq!(verify(&files, &given(public)).unwrap().key, Some(KeySource::Given));
    let other = HostKey::generate().unwrap().verifying_key();
    let d = verify(&files, &given(other)).unwrap_err();
    assert_damage(&d, &path, DamageKind::BadCheckpointSignature, 6, Some(5));
    assert!(d.detail.contains(&hex::encode(other.to_bytes())), "{d}");
}

#[test]
fn no_signatures_checks_the_chain_only_and_says_so() {
    let dir = TempDir::new("nokey");
    let (path, _) = standard_log(dir.path());
    fs::remove_file(pub_key_path(&path)).unwrap();
    let report = verify(&resolve_files(&path).unwrap(), &VerifyOptions::new(None)).unwrap();
    assert_eq!((report.key.clone(), report.checkpoints_verified, report.checkpoints_unchecked), (None, 0, 4));
    assert!(report.to_string().contains("SIGNATURES NOT CHECKED"), "{report}");
}

#[test]
fn torn_tail_is_moved_aside_and_recorded() {
    let dir = TempDir::new("recover");
    let (path, public) = standard_log(dir.path());
    let torn = br#"{"agent":"analyst-7","comm":"pyth"#;
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(torn);
    fs::write(&path, &bytes).unwrap();
    assert_damage(&damage(&path), &path, DamageKind::Truncated, 25, None);

    let (mut log, report) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    let tail = report.torn.clone().unwrap();
    assert_eq!((tail.line, tail.bytes, tail.after_seq), (25, torn.len() as u64, Some(23)));
    assert_eq!(fs::read(tail.moved_to.as_ref().unwrap()).unwrap(), torn);
    assert_eq!(report.next_seq, 25);
    for i in 0..3 {
        log.append(body(i)).unwrap();
    }
    drop(log);

    let recovered = obj(serde_json::from_str(&read_lines(&path)[24]).unwrap());
    assert_eq!(recovered["event"], "recovered");
    assert_eq!(recovered["torn_bytes"], torn.len());
    assert_eq!(recovered["after_seq"], 23);
    let report = verify(&resolve_files(&path).unwrap(), &given(public)).unwrap();
    assert_eq!((report.last_seq, report.head_seq), (Some(27), Some(27)));
}

#[test]
fn edited_record_refuses_open_and_changes_nothing() {
    let dir = TempDir::new("refuse");
    let (path, _) = standard_log(dir.path());
    let (log, report) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.next_seq, 24);
    drop(log);

    let mut lines = read_lines(&path);
    lines[7] = lines[7].replace("analyst-7", "analyst-8");
    write_lines(&path, &lines);
    let before = fs::read(&path).unwrap();
    match AuditLog::open(&path, host_key(dir.path()), small()) {
        Err(AuditError::Damaged { line: 8, seq: Some(7), .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an edited log was opened for appending"),
    }
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn records_cut_from_the_end_refuse_open() {
    let dir = TempDir::new("cutopen");
    let (path, _) = standard_log(dir.path());
    let mut lines = read_lines(&path);
    lines.truncate(22);
    write_lines(&path, &lines);
    let err = AuditLog::open(&path, host_key(dir.path()), small()).err().unwrap();
    assert!(matches!(err, AuditError::Head { .. }), "{err}");
    assert!(err.to_string().contains("ends at seq 21"), "{err}");
}

#[test]
fn reopen_continues_the_chain() {
    let dir = TempDir::new("reopen");
    let (path, _) = write_log(dir.path(), 7, small());
    let (mut log, report) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.next_seq, 8);
    for i in 0..7 {
        log.append(body(i)).unwrap();
    }
    log.checkpoint().unwrap();
    drop(log);
    let report = verify_log(&path).unwrap();
    assert_eq!((report.records, report.checkpoints_verified), (17, 3));
}

#[test]
fn second_writer_is_locked_out() {
    let dir = TempDir::new("lock");
    let path = log_path(dir.path());
    let (_log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    let err = AuditLog::open(&path, host_key(dir.path()), small()).err().unwrap();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
}

#[test]
fn another_hosts_key_refuses_open() {
    let dir = TempDir::new("keymismatch");
    let (path, _) = standard_log(dir.path());
    let err = AuditLog::open(&path, HostKey::generate().unwrap(), small()).err().unwrap();
    assert!(matches!(err, AuditError::KeyMismatch { .. }), "{err}");
}

/// A rotated log: 100 records, rotating past 3000 bytes, checkpoints every 10.
fn rotated_log(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let options = AuditOptions { rotate_bytes: 3000, checkpoint_every: 10, ..small() };
    let (path, _) = write_log(dir, 100, options);
    let files = resolve_files(&path).unwrap();
    (path, files)
}

#[test]
fn rotation_carries_the_chain_across_files() {
    let dir = TempDir::new("rotate");
    let (path, files) = rotated_log(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    assert_eq!(files.last(), Some(&path));
    let mut expected_first = 0;
    for (i, file) in files.iter().enumerate() {
        let lines = read_lines(file);
        let first = obj(serde_json::from_str(&lines[0]).unwrap());
        assert_eq!(first["seq"], expected_first);
        if i > 0 {
            assert_eq!(first["event"], "rotated");
            assert_eq!(first["previous_file"], files[i - 1].file_name().unwrap().to_str().unwrap());
        }
        let last = obj(serde_json::from_str(lines.last().unwrap()).unwrap());
        let last_seq = last["seq"].as_u64().unwrap();
        if file != &path {
            assert_eq!(last["event"], "checkpoint", "a rotated file ends signed");
            let name = file.file_name().unwrap().to_str().unwrap();
            assert_eq!(name, format!("audit.jsonl.{expected_first}-{last_seq}"));
        }
        expected_first = last_seq + 1;
    }
    let report = verify_files(&files).unwrap();
    assert_eq!(report.last_seq, Some(expected_first - 1));
    assert_eq!(report.files, files);
    assert_eq!(report.head_seq, report.last_seq);
    // A rotated file named on its own is verified on its own (its chain starts at seq 0).
    verify_files(&resolve_files(&files[0]).unwrap()).unwrap();
}

#[test]
fn missing_rotated_file_is_truncation() {
    let dir = TempDir::new("rotmissing");
    let (path, files) = rotated_log(dir.path());
    verify_files(&files).unwrap();
    let gone_first = read_lines(&files[1])[0].clone();
    let gone_first = obj(serde_json::from_str(&gone_first).unwrap())["seq"].as_u64().unwrap();
    fs::remove_file(&files[1]).unwrap();
    let d = verify_log(&path).unwrap_err();
    assert_damage(&d, &files[2], DamageKind::Truncated, 1, Some(gone_first));
    assert!(d.detail.contains(files[1].file_name().unwrap().to_str().unwrap()), "{d}");
}

/// What the log's records with `event` say, in order.
fn events_of(files: &[PathBuf], event: &str) -> Vec<Map<String, Value>> {
    files
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| obj(serde_json::from_str(&l).unwrap()))
        .filter(|r| r.get("event").and_then(Value::as_str) == Some(event))
        .collect()
}

#[test]
fn retention_deletes_the_oldest_files_and_says_so_in_the_chain() {
    let dir = TempDir::new("prune");
    let (path, before) = rotated_log(dir.path());
    assert!(before.len() >= 4, "{before:?}");
    let key = host_key(dir.path());
    // Keep about two rotated files' worth.
    let sizes: Vec<u64> = before.iter().map(|f| fs::metadata(f).unwrap().len()).collect();
    let keep = sizes[before.len() - 3] + sizes[before.len() - 2];
    let options = AuditOptions { rotate_bytes: 3000, checkpoint_every: 10, keep_bytes: keep, ..small() };
    let (mut log, _) = AuditLog::open(&path, key, options).unwrap();
    let pruned = log.prune(SystemTime::now()).unwrap();
    log.checkpoint().unwrap();
    drop(log);
    let after = resolve_files(&path).unwrap();
    assert_eq!(pruned.len(), before.len() - 3, "{pruned:?}");
    assert_eq!(after, before[before.len() - 3..].to_vec());
    // Each deletion is a record of the chain, naming the file, its range and its last hash.
    let said = events_of(&after, "pruned");
    assert_eq!(said.len(), pruned.len());
    for (record, gone) in said.iter().zip(&pruned) {
        assert_eq!(record["file"], gone.file.file_name().unwrap().to_str().unwrap());
        assert_eq!(
            (record["first_seq"].as_u64(), record["last_seq"].as_u64()),
            (Some(gone.first_seq), Some(gone.last_seq))
        );
        assert_eq!(record["reason"], "size");
    }
    let report = verify_log(&path).unwrap();
    let first_kept = obj(serde_json::from_str(&read_lines(&after[0])[0]).unwrap())["seq"].as_u64().unwrap();
    assert_eq!(report.first_seq, Some(first_kept));
    assert_eq!(report.pruned.map(|p| p.1), Some(first_kept));
    assert!(report.to_string().contains("deleted by retention"), "{report}");
    // Without retention nothing goes.
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    assert_eq!(log.prune(SystemTime::now()).unwrap(), vec![]);
}

#[test]
fn retention_by_age_spares_recent_files() {
    let dir = TempDir::new("pruneage");
    let (path, before) = rotated_log(dir.path());
    let options = AuditOptions { keep_age: Some(Duration::from_secs(3600)), ..small() };
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), options).unwrap();
    assert_eq!(log.prune(SystemTime::now()).unwrap(), vec![], "every file is minutes old");
    let later = SystemTime::now() + Duration::from_secs(7200);
    let pruned = log.prune(later).unwrap();
    assert_eq!(pruned.len(), before.len() - 1);
    assert!(pruned.iter().all(|p| p.reason == "age"));
    log.checkpoint().unwrap();
    drop(log);
    assert_eq!(resolve_files(&path).unwrap(), vec![path.clone()]);
    verify_log(&path).unwrap();
}

#[test]
fn files_deleted_outside_retention_do_not_verify() {
    let dir = TempDir::new("prunefake");
    let (path, files) = rotated_log(dir.path());
    // Positive control: the whole log verifies.
    verify_files(&files).unwrap();
    // The oldest files deleted by hand: the chain starts later and nothing in it says why.
    fs::remove_file(&files[0]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let d = verify_log(&path).unwrap_err();
    assert_damage(&d, &files[2], DamageKind::Truncated, 1, Some(0));
    assert!(d.detail.contains("not by the daemon's retention"), "{d}");
}

#[test]
fn a_file_deleted_after_a_retention_does_not_verify() {
    let dir = TempDir::new("prunemore");
    let (path, files) = rotated_log(dir.path());
    assert!(files.len() >= 4, "{files:?}");
    // Retention takes the two oldest files.
    let keep: u64 = files[2..files.len() - 1].iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    let options = AuditOptions { keep_bytes: keep, ..small() };
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), options).unwrap();
    assert_eq!(log.prune(SystemTime::now()).unwrap().len(), 2);
    log.checkpoint().unwrap();
    drop(log);
    verify_log(&path).unwrap();
    // Then someone deletes the next one: no record names it.
    fs::remove_file(&files[2]).unwrap();
    let d = verify_log(&path).unwrap_err();
    assert_damage(&d, &files[3], DamageKind::Truncated, 1, Some(0));
}

#[test]
fn an_unwritable_log_keeps_its_records_and_writes_them_once_it_can() {
    let dir = TempDir::new("unwritable");
    let (path, _) = write_log(dir.path(), 3, small());
    let lines = read_lines(&path).len();
    // A reserve no filesystem has: no write is made.
    let options = AuditOptions { reserve_bytes: u64::MAX / 2, ..small() };
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), options).unwrap();
    for i in 0..10 {
        log.append(body(i)).unwrap();
    }
    assert!(log.unwritable().is_some_and(|r| r.contains("reserve")), "{:?}", log.unwritable());
    assert!(matches!(log.flush(), Err(AuditError::Unwritable { .. })));
    assert_eq!(read_lines(&path).len(), lines, "nothing was written");
    // Room again: everything appended meanwhile is written, in one chain.
    log.set_reserve_bytes(0);
    log.flush().unwrap();
    assert_eq!(log.unwritable(), None);
    drop(log);
    let report = verify_log(&path).unwrap();
    assert_eq!(report.records, read_lines(&path).len() as u64);
    assert!(read_lines(&path).len() >= lines + 10);
}

#[test]
fn interrupted_rotation_is_resumed() {
    let dir = TempDir::new("rotresume");
    let (path, _) = standard_log(dir.path());
    // A crash right after the live file was renamed, before the new one was started.
    let rotated = path.with_file_name("audit.jsonl.0-23");
    fs::rename(&path, &rotated).unwrap();
    let (mut log, report) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    assert_eq!(report.resumed_rotation.as_deref(), Some(rotated.as_path()));
    assert_eq!(report.next_seq, 25);
    log.append(body(0)).unwrap();
    drop(log);
    let files = resolve_files(&path).unwrap();
    assert_eq!(files, vec![rotated, path.clone()]);
    assert_eq!(verify_files(&files).unwrap().last_seq, Some(25));
}

#[test]
fn resolve_files_orders_rotated_files_by_seq() {
    let dir = TempDir::new("resolve");
    let live = dir.path().join("audit.jsonl");
    for name in [
        "audit.jsonl.20-99",
        "audit.jsonl.0-9",
        "audit.jsonl.100-109",
        "audit.jsonl.10-19",
        "audit.jsonl",
        "audit.jsonl.pub",
        "audit.jsonl.head",
        "audit.jsonl.lock",
        "audit.jsonl.torn-1700000000",
        "audit.jsonl.x-1",
        "other.jsonl.0-9",
    ] {
        fs::write(dir.path().join(name), "").unwrap();
    }
    let names: Vec<String> = resolve_files(&live)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["audit.jsonl.0-9", "audit.jsonl.10-19", "audit.jsonl.20-99", "audit.jsonl.100-109", "audit.jsonl"]
    );
    assert_eq!(live_path_of(&dir.path().join("audit.jsonl.10-19")), live);
    assert_eq!(live_path_of(&live), live);
    assert!(matches!(resolve_files(&dir.path().join("absent.jsonl")), Err(AuditError::NotFound { .. })));
}

#[test]
fn reserved_fields_and_fractions_are_refused() {
    let dir = TempDir::new("reserved");
    let path = log_path(dir.path());
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    assert_eq!(log.append(obj(json!({"agent": "a", "risk": 5, "x": {"y": [1, 2]}}))).unwrap(), 0);
    let refused = [
        (json!({"seq": 3}), "seq"),
        (json!({"hash": "ab"}), "hash"),
        (json!({"event": "checkpoint"}), "checkpoint"),
        (json!({"event": "rotated"}), "rotated"),
        (json!({"risk": 0.5}), "risk"),
        (json!({"x": {"y": [1, 2.5]}}), "x.y[1]"),
    ];
    for (rec, named) in refused {
        let err = log.append(obj(rec)).unwrap_err();
        assert!(err.to_string().contains(&format!("`{named}`")), "{err}");
    }
    assert_eq!(log.next_seq(), 1);
}

#[test]
fn checkpoints_follow_the_clock() {
    let dir = TempDir::new("clock");
    let path = log_path(dir.path());
    let options =
        AuditOptions { checkpoint_every: 0, checkpoint_interval: Duration::from_secs(10), ..small() };
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), options).unwrap();
    let t0 = SystemTime::now();
    assert!(!log.maybe_checkpoint(t0 + Duration::from_secs(60)).unwrap(), "nothing to cover yet");
    log.append(body(0)).unwrap();
    assert!(!log.maybe_checkpoint(t0 + Duration::from_secs(5)).unwrap());
    assert!(log.maybe_checkpoint(t0 + Duration::from_secs(11)).unwrap());
    assert!(!log.maybe_checkpoint(t0 + Duration::from_secs(30)).unwrap(), "no records since");
    log.append(body(1)).unwrap();
    assert!(!log.maybe_checkpoint(t0 + Duration::from_secs(15)).unwrap());
    assert!(log.maybe_checkpoint(t0 + Duration::from_secs(21)).unwrap());
    assert_eq!(log.next_seq(), 4);
    drop(log);
    assert_eq!(verify_log(&path).unwrap().checkpoints_verified, 2);
}

#[test]
fn host_key_is_private_and_stable() {
    let dir = TempDir::new("hostkey");
    let state = dir.path().join("state");
    let key = HostKey::load_or_create(&state).unwrap();
    let file = state.join(HOST_KEY_FILE);
    assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(fs::read_to_string(&file).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(HostKey::load_or_create(&state).unwrap().key_id(), key.key_id());
    assert_eq!(parse_verifying_key(&key.public_key_pem()).unwrap(), key.verifying_key());
    assert_eq!(parse_verifying_key(&key.key_id()).unwrap(), key.verifying_key());

    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let err = HostKey::load_or_create(&state).unwrap_err();
    assert!(matches!(err, AuditError::KeyPermissions { mode: 0o644, .. }), "{err}");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    HostKey::load_or_create(&state).unwrap();
}

#[test]
fn exported_public_key_verifies_the_log() {
    let dir = TempDir::new("pubkey");
    let (path, public) = standard_log(dir.path());
    assert_eq!(load_verifying_key(&pub_key_path(&path)).unwrap(), public);
    assert!(fs::read_to_string(pub_key_path(&path)).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let at = |secs: u64, millis: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
    assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(at(951_782_400, 7)), "2000-02-29T00:00:00.007Z");
    assert_eq!(rfc3339(at(1_777_636_800, 123)), "2026-05-01T12:00:00.123Z");
    assert_eq!(rfc3339(at(4_102_444_799, 999)), "2099-12-31T23:59:59.999Z");
}

#[test]
fn failed_rotation_is_postponed_not_lost() {
    // Control: where the first rotation goes (record sizes are deterministic).
    let probe = TempDir::new("rotprobe");
    let (_, probe_files) = rotated_log(probe.path());
    let first_name = probe_files[0].file_name().unwrap().to_owned();

    let dir = TempDir::new("rotblocked");
    let path = log_path(dir.path());
    let options = AuditOptions { rotate_bytes: 3000, checkpoint_every: 10, ..small() };
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), options).unwrap();
    let squatter = path.with_file_name(&first_name);
    fs::write(&squatter, "not part of the log\n").unwrap();
    for i in 0..100 {
        log.append(body(i)).unwrap();
    }
    drop(log);
    assert_eq!(fs::read_to_string(&squatter).unwrap(), "not part of the log\n");
    fs::remove_file(&squatter).unwrap();
    let files = resolve_files(&path).unwrap();
    assert!(files.len() >= 2, "rotation resumed later: {files:?}");
    assert_ne!(files[0].file_name(), Some(first_name.as_os_str()));
    verify_files(&files).unwrap();
    let bodies = files.iter().flat_map(|f| read_lines(f)).filter(|l| !l.contains(r#""event":"#)).count();
    assert_eq!(bodies, 100);
}

#[test]
fn missing_first_rotated_file_is_truncation() {
    let dir = TempDir::new("rotfirst");
    let (path, files) = rotated_log(dir.path());
    verify_files(&files).unwrap();
    fs::remove_file(&files[0]).unwrap();
    assert_damage(&verify_log(&path).unwrap_err(), &files[1], DamageKind::Truncated, 1, Some(0));
}

#[test]
fn forged_head_is_refused() {
    let dir = TempDir::new("head");
    let (path, _) = standard_log(dir.path());
    let copy = copy_log(&path, dir.path());
    assert_eq!(verify_log(&copy).unwrap().head_seq, Some(23));
    // Claim more records than were written, to make an intact log look truncated.
    let mut head = obj(serde_json::from_str(&fs::read_to_string(head_path(&copy)).unwrap()).unwrap());
    head.insert("seq".into(), 40.into());
    fs::write(head_path(&copy), canonical_bytes(&Value::Object(head))).unwrap();
    assert_damage(&damage(&copy), &head_path(&copy), DamageKind::BadCheckpointSignature, 1, Some(40));
}

// Forgeries by someone who can write the log directory but has no host key (built by
// `forge`, in the log's own format). Each first shows the genuine log verifies.

/// 22 records with checkpoints at seq 5, 11, 17, 23 and two records (24, 25) after the last:
/// 26 lines, line k + 1 holds seq k; the head names seq 25.
fn log_with_tail(dir: &Path) -> PathBuf {
    let (path, _) = write_log(dir, 22, small());
    let report = verify_log(&path).unwrap();
    assert_eq!((report.last_seq, report.head_seq, report.unvouched), (Some(25), Some(25), 0));
    path
}

#[test]
fn forgery_resigned_with_another_key_and_pub_replaced_fails() {
    let dir = TempDir::new("forge-resign");
    let path = log_with_tail(dir.path());
    let attacker = forge::Forger::new().unwrap();
    attacker.remove_and_resign(&path, &[7, 8]).unwrap();
    // The forgery is consistent in itself: checked with the key in the replaced `.pub`, it passes.
    let pub_key = load_verifying_key(&pub_key_path(&path)).unwrap();
    assert_eq!(pub_key, attacker.key.verifying_key());
    verify(&resolve_files(&path).unwrap(), &given(pub_key)).unwrap();
    // With the host key an operator trusts, the first re-signed checkpoint fails.
    let d = damage(&path);
    assert_damage(&d, &path, DamageKind::BadCheckpointSignature, 6, Some(5));
    assert!(d.detail.contains(&attacker.key.key_id()), "{d}");
}

#[test]
fn replaced_pub_alone_is_a_key_mismatch() {
    let dir = TempDir::new("forge-pub");
    let path = log_with_tail(dir.path());
    let attacker = forge::Forger::new().unwrap();
    attacker.replace_pub(&path).unwrap();
    let d = damage(&path);
    assert_damage(&d, &pub_key_path(&path), DamageKind::KeyMismatch, 1, None);
    assert!(d.detail.contains(&attacker.key.key_id()), "{d}");
}

#[test]
fn forgery_removed_records_without_pub_and_head_fails() {
    let dir = TempDir::new("forge-nohead");
    let path = log_with_tail(dir.path());
    let genuine = read_lines(&path);
    // Records cut after the last checkpoint: every checkpoint left is genuine.
    forge::remove_lines(&path, &[25], None).unwrap();
    forge::delete_pub_and_head(&path).unwrap();
    assert_damage(&damage(&path), &path, DamageKind::HeadMissing, 25, Some(24));
    // Not even a caller who gives up signatures gets an ok without accepting the missing head.
    let unsigned = VerifyOptions::new(None);
    let d = verify(&resolve_files(&path).unwrap(), &unsigned).unwrap_err();
    assert_eq!(d.kind, DamageKind::HeadMissing, "{d}");
    // Records cut from the middle: the next checkpoint no longer verifies.
    forge::write_lines(&path, &genuine).unwrap();
    forge::remove_lines(&path, &[8], None).unwrap();
    assert_damage(&damage(&path), &path, DamageKind::BadCheckpointSignature, 11, Some(10));
}

#[test]
fn forgery_rewritten_tail_fails_with_or_without_the_head() {
    let dir = TempDir::new("forge-tail");
    let path = log_with_tail(dir.path());
    assert_eq!(forge::rewrite_tail(&path).unwrap(), 2);
    // The genuine head names the genuine record 25.
    assert_damage(&damage(&path), &path, DamageKind::Edited, 26, Some(25));
    fs::remove_file(head_path(&path)).unwrap();
    assert_damage(&damage(&path), &path, DamageKind::HeadMissing, 26, Some(25));
}

#[test]
fn forgery_fabricated_chain_without_checkpoints_fails() {
    let dir = TempDir::new("forge-fab");
    let path = log_with_tail(dir.path());
    forge::fabricate(&path, 30).unwrap();
    forge::delete_pub_and_head(&path).unwrap();
    assert_damage(&damage(&path), &path, DamageKind::HeadMissing, 30, Some(29));
    // Accepting a missing head does not make a chain nothing signed acceptable.
    let headless = VerifyOptions { allow_missing_head: true, ..options(&path) };
    let files = resolve_files(&path).unwrap();
    let d = verify(&files, &headless).unwrap_err();
    assert_damage(&d, &path, DamageKind::UnsignedTail, 1, Some(0));
    assert!(d.detail.contains("30 records after no checkpoint at all"), "{d}");
    // A short one, within the checkpoint interval, still has no signature at all.
    forge::fabricate(&path, 3).unwrap();
    let d = verify(&files, &headless).unwrap_err();
    assert_damage(&d, &path, DamageKind::UnsignedTail, 1, Some(0));
    // With a head the attacker signed: the head's signature fails.
    let attacker = forge::Forger::new().unwrap();
    attacker.sign_head(&path).unwrap();
    assert_damage(&damage(&path), &head_path(&path), DamageKind::BadCheckpointSignature, 1, Some(2));
}

#[test]
fn forgery_older_log_and_head_put_back_is_rolled_back() {
    let dir = TempDir::new("forge-rollback");
    let path = log_with_tail(dir.path());
    let older = forge::Snapshot::take(&path).unwrap();
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    for i in 0..8 {
        log.append(body(i)).unwrap();
    }
    drop(log);
    let report = verify_log(&path).unwrap();
    let anchor = Anchor::new(
        "audit.jsonl".to_owned(),
        report.last_seq.unwrap(),
        report.last_hash.unwrap(),
        report.key_id.unwrap(),
        SystemTime::now(),
    );
    let anchor_file = dir.path().join("anchors.jsonl");
    fs::write(&anchor_file, format!("Dec 02 host ztseg-anchor[7]: {}\n", anchor.to_line())).unwrap();
    let anchors = Anchor::read_file(&anchor_file).unwrap();
    assert_eq!((anchors[0].seq, anchors[0].hash), (anchor.seq, anchor.hash));
    let anchored = VerifyOptions { anchors, ..options(&path) };
    // Control: the current log holds the anchor.
    assert_eq!(verify(&resolve_files(&path).unwrap(), &anchored).unwrap().anchors, 1);

    older.put_back(&path).unwrap();
    // Alone, the older pair is genuine and verifies: nothing in the directory can tell.
    verify_log(&path).unwrap();
    let d = verify(&resolve_files(&path).unwrap(), &anchored).unwrap_err();
    assert_damage(&d, &path, DamageKind::RolledBack, 26, Some(25));
    assert!(d.detail.contains(&format!("saw seq {}", anchor.seq)), "{d}");

    // Rolled back and continued by the daemon: the anchor's seq holds another record.
    let (mut log, _) = AuditLog::open(&path, host_key(dir.path()), small()).unwrap();
    for i in 0..20 {
        log.append(body(100 + i)).unwrap();
    }
    drop(log);
    verify_log(&path).unwrap();
    let d = verify(&resolve_files(&path).unwrap(), &anchored).unwrap_err();
    assert_eq!((d.kind, d.seq), (DamageKind::RolledBack, Some(anchor.seq)), "{d}");
}

#[test]
fn long_unsigned_tail_and_records_after_the_head_fail() {
    let dir = TempDir::new("unsigned");
    let no_checkpoints = AuditOptions { checkpoint_every: 0, ..small() };
    let (path, _) = write_log(dir.path(), 9, no_checkpoints);
    // The writer of this log never checkpoints; one that checkpoints every 5 records would have.
    let strict = VerifyOptions { checkpoint_every: 5, ..options(&path) };
    let files = resolve_files(&path).unwrap();
    let d = verify(&files, &strict).unwrap_err();
    assert_damage(&d, &path, DamageKind::UnsignedTail, 1, Some(0));
    let accepting = VerifyOptions { allow_unsigned_tail: true, ..strict.clone() };
    assert_eq!(verify(&files, &accepting).unwrap().unvouched, 0, "the head vouches for all");

    // Records chained on after the head (and after the last checkpoint) are vouched for by nothing.
    let dir = TempDir::new("afterhead");
    let path = log_with_tail(dir.path());
    let mut lines = read_lines(&path);
    lines.push(lines[24].replace(r#""dport":5432"#, r#""dport":22"#));
    forge::rechain(&mut lines, None).unwrap();
    forge::write_lines(&path, &lines).unwrap();
    let d = damage(&path);
    assert_damage(&d, &path, DamageKind::UnsignedTail, 27, Some(26));
    assert!(d.detail.contains("after the signed head (seq 25)"), "{d}");
    let accepting = VerifyOptions { allow_unsigned_tail: true, ..options(&path) };
    assert_eq!(verify(&resolve_files(&path).unwrap(), &accepting).unwrap().unvouched, 1);
}
