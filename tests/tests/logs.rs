//! Where the daemon's log goes. Plain text wherever stderr is not a terminal, even when systemd's
//! `JOURNAL_STREAM` is inherited from a unit and names another file; coloured on a terminal (the
//! control: the same check finds the escapes there); the journal, with each field a journal
//! field, when stderr is the journal's stream, and plain text again should the journal be down.
//! The journal is a stand-in ([`FakeJournal`]): none runs on the test machines.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use ztseg_integration::{Daemon, FakeJournal, LogTo, Netns, READY_LINE, Site, TempDir, claims, run_agent};

const ESC: char = '\u{1b}';

#[test]
fn logs_to_a_file_are_plain_text_though_journal_stream_is_set_and_coloured_on_a_terminal() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-logs");
    let mut daemon = Daemon::configure(&site, &dir.path, "");
    let file = dir.path.join("stderr.log");
    fs::write(&file, "").unwrap();
    let meta = fs::metadata(&file).unwrap();
    // The same device, another inode: what a process whose stderr a unit redirected inherits.
    let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
    // An empty NO_COLOR counts as unset: whatever this environment has, colours are not turned off.
    daemon.launch_logging_to(LogTo::File(&file), &[("JOURNAL_STREAM", &other), ("NO_COLOR", "")]);
    daemon.stop();
    let log = daemon.log();
    assert!(log.contains(READY_LINE), "{log}");
    assert!(!log.contains(ESC), "escape sequences in a log file:\n{log:?}");
    // Timestamps stay: this file is not the journal, nothing adds them.
    let first = log.lines().next().unwrap();
    assert!(first.starts_with(|c: char| c.is_ascii_digit()), "no timestamp: {first}");

    // Control: on a terminal the same daemon colours its lines, and the check sees it.
    daemon.launch_logging_to(LogTo::Terminal, &[("JOURNAL_STREAM", &other), ("NO_COLOR", "")]);
    daemon.stop();
    let log = daemon.log();
    let ready = log.lines().find(|line| line.contains(READY_LINE)).unwrap();
    assert!(ready.contains(ESC), "no colour on a terminal: {ready:?}");
}

#[test]
fn stderr_as_the_journal_stream_without_a_journal_falls_back_to_plain_text() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-logs");
    let journal = FakeJournal::down(&dir.path.join("journal"));
    let mut daemon = Daemon::configure(&site, &dir.path, "");
    daemon.launch_logging_to(LogTo::Journal(&journal), &[]);
    daemon.stop();
    let log = daemon.log();
    assert!(log.contains("cannot write to the journal's socket; logging to stderr as text"), "{log}");
    assert!(log.contains(READY_LINE), "{log}");
    assert!(!log.contains(ESC), "{log:?}");
    // Meant for the journal, which adds the time: none of its own.
    let ready = log.lines().find(|line| line.contains(READY_LINE)).unwrap();
    assert!(ready.trim_start().starts_with("INFO"), "{ready}");
}

const CATALOGUE: &str = r#"
[scopes."read:svc"]
allow = [{ to = "10.78.0.1/32", ports = [8001] }]
"#;

#[test]
fn under_the_journal_each_field_is_a_journal_field() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-logs");
    let ns = Netns::new(&["10.78.0.1/32"]);
    let journal = FakeJournal::new(&dir.path.join("journal"));
    let mut daemon = Daemon::configure(&site, &dir.path, "");
    daemon.launch_logging_to(LogTo::Journal(&journal), &[]);
    let entries = journal.entries();
    let ready = entries.iter().find(|e| e["MESSAGE"] == READY_LINE).unwrap();
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "ztseg");
    assert_eq!(ready["PRIORITY"], "6", "info");
    assert_eq!(ready["SOCKET"], daemon.socket.display().to_string());

    daemon.write_policy("catalogue.toml", CATALOGUE);
    let token = daemon.bind_new("analyst", &["--op", "op-logs", "--scope", "read:svc"]);
    let jti = claims(&token)["jti"].as_str().unwrap().to_owned();
    let (code, out, err) = run_agent(&daemon, &ns, "analyst", None, &["tcp:10.78.0.1:9"]);
    assert_eq!((code, out), (0, vec!["EPERM".to_owned()]), "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let denial = loop {
        let entries = journal.entries();
        if let Some(e) = entries.into_iter().find(|e| e.get("VERDICT").is_some_and(|v| v == "deny")) {
            break e;
        }
        assert!(Instant::now() < deadline, "no denial in the journal: {:#?}", journal.entries());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(denial["MESSAGE"], "analyst: deny connect tcp to 10.78.0.1:9 (no_rule)");
    assert_eq!(denial["AGENT"], "analyst");
    assert_eq!(denial["OP"], "op-logs");
    assert_eq!(denial["JTI"], jti);
    assert_eq!(denial["REASON"], "no_rule");
    assert_eq!(denial["DST"], "10.78.0.1");
    assert_eq!(denial["DPORT"], "9");
    assert_eq!(denial["TARGET"], "ztseg::decision");
    daemon.stop();
    // Nothing went to stderr as text, timestamps or colours included.
    let text = fs::read_to_string(journal.stderr()).unwrap();
    assert!(text.is_empty(), "{text}");
}
