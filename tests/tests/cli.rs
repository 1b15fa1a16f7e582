//! The shell completions and manual pages that `ztseg completions` and `ztseg man` generate from
//! the command line's definition: they name the real subcommands and are what their tools take.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{fs, process::Command};

use ztseg_integration::{TempDir, bin};

/// `ztseg ARGS`: (exit code, stdout, stderr).
fn ztseg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("ztseg")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bash_completions_offer_the_real_subcommands_and_load_in_bash() {
    let (code, script, err) = ztseg(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    for word in ["agents", "kill", "revive", "token", "audit", "--freeze"] {
        assert!(script.contains(word), "{word} missing from the bash completions");
    }
    assert!(!script.contains("no-such-command"), "control: the check does not match anything");
    // bash loads it and registers the completion function.
    let dir = TempDir::new("ztseg-cli");
    let file = dir.path.join("ztseg.bash");
    fs::write(&file, &script).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p ztseg", file.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("_ztseg"));
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, script, err) = ztseg(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(script.contains("agents"), "{shell}");
    }
    let (code, _, err) = ztseg(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn the_manual_page_has_its_header_and_names_the_subcommands() {
    let (code, page, err) = ztseg(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(page.lines().any(|line| line.starts_with(".TH ztseg 1")), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for name in ["ztseg\\-agents(1)", "ztseg\\-kill(1)", "ztseg\\-daemon(1)"] {
        assert!(page.contains(name), "{name} missing:\n{page}");
    }
    // No page is written for `help`: the top page does not point to one.
    assert!(!page.contains("ztseg\\-help"), "{page}");
}

#[test]
fn man_dir_writes_one_page_per_subcommand() {
    let dir = TempDir::new("ztseg-cli");
    let out = dir.path.join("man1");
    let (code, stdout, err) = ztseg(&["man", "--dir", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(stdout.trim(), format!("wrote the manual pages to {}", out.display()));
    let issue = fs::read_to_string(out.join("ztseg-token-issue.1")).unwrap();
    assert!(issue.contains(".TH ztseg-token-issue 1"), "{issue}");
    assert!(
        issue.contains(&format!("\"ztseg {}\"", env!("CARGO_PKG_VERSION"))),
        "no version in the footer: {issue}"
    );
    assert!(issue.contains("\\-\\-scope"), "{issue}");
    assert!(out.join("ztseg.1").exists() && out.join("ztseg-agents.1").exists());
    assert!(!out.join("ztseg-help.1").exists());
    // The top page is the one `ztseg man` prints.
    assert_eq!(fs::read_to_string(out.join("ztseg.1")).unwrap(), ztseg(&["man"]).1);
}
