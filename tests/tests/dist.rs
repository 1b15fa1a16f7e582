//! The systemd unit shipped in `dist/` passes `systemd-analyze verify` (with its ExecStart
//! pointed at the binary this build made, since verify checks that the command exists).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{fs, process::Command};

use ztseg_integration::{TempDir, bin};

#[test]
fn the_systemd_unit_verifies() {
    let unit = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/ztseg.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/ztseg daemon"), "the unit's ExecStart moved");
    assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure"));
    let dir = TempDir::new("ztseg-unit");
    let copy = dir.path.join("ztseg.service");
    fs::write(&copy, unit.replace("/usr/local/bin/ztseg", bin("ztseg").to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{complaints}");
    // verify reports problems on stderr without always failing: there must be none about us.
    assert!(!complaints.contains("ztseg.service"), "{complaints}");
}
