//! `cargo xtask setup | build | package | test | demo | bench`: the only commands a newcomer needs.
//!
//! The kernel programs are Rust built for `bpfel-unknown-none`, which needs `core` built from
//! source, a compiler that allows unstable flags and bpf-linker against the same LLVM. On Debian
//! 12 that is the `rustc-web` compiler (rustc 1.96, LLVM 22, at /usr/bin/rustc), its library
//! source `rust-web-src`, and bpf-linker 0.13 built against Debian's libLLVM 22
//! (docs/building.md). Userspace builds with the ordinary rustup toolchain.

mod demo;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use xtask::{package, programs};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and demo ztseg")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks for the eBPF build (idempotent).
    Setup,
    /// Build the kernel programs and the `ztseg` binary that embeds them (release).
    Build,
    /// Build the Debian package: target/debian/ztseg_VERSION_ARCH.deb (builds the release binary).
    Package {
        /// Package this binary (built with the kernel programs embedded) instead of building one.
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// Where to write the package.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// The seed scenario end to end (needs root): a daemon, a token, an agent, the kill switch.
    Demo,
    /// Benchmarks (needs root): report and chart in target/bench/.
    Bench {
        /// Interleaved runs per case.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Fewer operations per run (a smoke run of the harness).
        #[arg(long)]
        quick: bool,
    },
    /// Run every test: unit tests, then the privileged integration tests (needs root).
    Test {
        /// Only tests whose name contains this (passed to the test harness).
        filter: Option<String>,
    },
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let root = workspace_root()?;
    match Cli::parse().command {
        Task::Setup => toolchain::setup(),
        Task::Build => {
            let object = build_ebpf(&root)?;
            cargo(&root, &object, &["build", "--release", "-p", "ztseg"])?;
            println!("built {}", root.join("target/release/ztseg").display());
            Ok(())
        }
        Task::Package { binary, out } => {
            let binary = match binary {
                Some(binary) => binary,
                None => {
                    let object = build_ebpf(&root)?;
                    cargo(&root, &object, &["build", "--release", "-p", "ztseg"])?;
                    root.join("target/release/ztseg")
                }
            };
            let out = out.unwrap_or_else(|| root.join("target/debian"));
            let deb = package::build(&root, &binary, &out, package::Compression::Xz)?;
            println!("built {}", deb.display());
            Ok(())
        }
        Task::Test { filter } => test(&root, filter.as_deref()),
        Task::Bench { runs, quick } => {
            let object = privileged_build(&root, "bench")?;
            cargo(
                &root,
                &object,
                &["build", "--release", "--quiet", "-p", "ztseg", "-p", "ztseg-bench", "--bins"],
            )?;
            let mut bench = Command::new(root.join("target/release/ztseg-bench"));
            bench.arg("--runs").arg(runs.to_string()).arg("--daemon").arg(root.join("target/release/ztseg"));
            bench.arg("--out").arg(root.join("target/bench"));
            if quick {
                bench.arg("--quick");
            }
            let status = bench.current_dir(&root).status().context("cannot run the bench")?;
            if !status.success() {
                bail!("the bench failed ({status})");
            }
            Ok(())
        }
        Task::Demo => {
            let object = privileged_build(&root, "demo")?;
            cargo(&root, &object, &["build", "--release", "--quiet", "-p", "ztseg", "--bins"])?;
            cargo(
                &root,
                &object,
                &["build", "--release", "--quiet", "-p", "ztseg-integration", "--bin", "ztseg-probe"],
            )?;
            demo::run(&root, &root.join("target/release/ztseg"), &root.join("target/release/ztseg-probe"))
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_owned).context("xtask has no parent directory")
}

/// Builds the eBPF object with Debian's compiler and returns its path.
fn build_ebpf(root: &Path) -> Result<PathBuf> {
    toolchain::check()?;
    let target_dir = root.join("target/ebpf");
    let status = Command::new(programs::DEBIAN_CARGO)
        .current_dir(root)
        .args(["build", "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .args(["-p", "ztseg-ebpf", "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", programs::DEBIAN_RUSTC)
        // Debian's compiler is a stable release; this lets it take -Z build-std.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", toolchain::path_with_cargo_bin())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run Debian's cargo")?;
    if !status.success() {
        bail!("building the kernel programs failed ({status})");
    }
    Ok(target_dir.join("bpfel-unknown-none/release/ztseg"))
}

/// Runs the rustup cargo on the workspace with the eBPF object to embed.
fn cargo(root: &Path, object: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .env("ZTSEG_EBPF_OBJ", object)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// For a task that needs root (`demo`, `bench`): checks it runs as root, installs the toolchain
/// if missing, and builds the eBPF object.
fn privileged_build(root: &Path, task: &str) -> Result<PathBuf> {
    if !nix_is_root() {
        bail!(
            "the {task} loads BPF programs and creates cgroups and network namespaces: run `cargo xtask {task}` as root"
        );
    }
    ensure_toolchain()?;
    build_ebpf(root)
}

fn ensure_toolchain() -> Result<()> {
    if toolchain::check().is_err() {
        println!("the eBPF toolchain is missing; running `cargo xtask setup` first");
        toolchain::setup()?;
    }
    Ok(())
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    ensure_toolchain()?;
    let object = build_ebpf(root)?;
    let mut unit = vec!["test", "--workspace", "--exclude", "ztseg-ebpf", "--exclude", "ztseg-integration"];
    let mut integration = vec!["test", "-p", "ztseg-integration"];
    let extra: Vec<&str> = filter.into_iter().collect();
    unit.push("--");
    unit.extend(&extra);
    cargo(root, &object, &unit)?;
    if !nix_is_root() {
        bail!(
            "the integration tests load BPF programs and create cgroups and network namespaces: run `cargo xtask test` as root"
        );
    }
    // The daemon tests drive the real `ztseg` binary.
    cargo(root, &object, &["build", "-p", "ztseg", "--bins"])?;
    // Kernel-touching tests share the cgroup tree and bpffs: one at a time.
    integration.extend(["--", "--test-threads=1"]);
    integration.extend(&extra);
    cargo(root, &object, &integration)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
