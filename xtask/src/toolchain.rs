//! The eBPF toolchain: check it, and install what is missing on Debian 12.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::programs;

/// Where `-Z build-std` looks for the library source of /usr/bin/rustc.
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin dir first, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn package_installed(name: &str) -> bool {
    Command::new(programs::DPKG_QUERY)
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// bpf-linker is present, runs, and uses LLVM 22 like the compiler.
fn bpf_linker_ok() -> bool {
    let linker = cargo_bin().join("bpf-linker");
    let runs = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    runs && Command::new(programs::LDD)
        .arg(&linker)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libLLVM.so.22"))
}

fn missing() -> Vec<String> {
    let mut missing: Vec<String> = programs::packages()
        .into_iter()
        .filter(|p| !package_installed(p))
        .map(|p| format!("Debian package {p}"))
        .collect();
    missing.extend(
        programs::missing()
            .map(|p| format!("{} at {} (package {}, for {})", p.name, p.path, p.package, p.why)),
    );
    if !Path::new(RUST_SRC).exists() {
        missing.push(format!("the library source in {RUST_SRC} (rust-web-src)"));
    }
    if !bpf_linker_ok() {
        missing.push(format!("bpf-linker {BPF_LINKER_VERSION} built against LLVM 22"));
    }
    missing
}

/// Fails with one sentence when the eBPF toolchain is incomplete.
pub fn check() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    bail!("the eBPF toolchain is incomplete (missing {}); run `cargo xtask setup`", missing.join(", "))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Installs what is missing; takes well under a second when nothing is.
pub fn setup() -> Result<()> {
    let packages: Vec<&str> = programs::packages().into_iter().filter(|p| !package_installed(p)).collect();
    if !packages.is_empty() {
        println!("installing Debian packages: {}", packages.join(" "));
        run(Command::new(programs::APT_GET).arg("update").arg("-q"))?;
        run(Command::new(programs::APT_GET)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_ok() {
        let llvm = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]
            .iter()
            .map(|d| Path::new(d).join("libLLVM.so.22.1"))
            .find(|p| p.exists())
            .context("Debian's libLLVM.so.22.1 is missing although rustc-web is installed")?;
        // bpf-linker's build looks for <prefix>/lib/libLLVM.so; Debian names it by soname only.
        let prefix = std::env::temp_dir().join("ztseg-llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
        println!("building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)", llvm.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .args(["install", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix))?;
    }
    check()?;
    println!("eBPF toolchain ready");
    Ok(())
}
