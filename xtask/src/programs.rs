//! Every program (and the few files) that xtask, the tests, the demo and the bench rely on, by
//! path, with the Debian package that provides it. `cargo xtask setup` installs these packages
//! and checks each path; the unit tests below tie each path to its package (`dpkg -S`) and each
//! program the workspace's code starts to an entry here, so a forgotten package fails a test on
//! any machine, not only on a fresh one.

/// A program or file relied on, where it lives, and which Debian package puts it there.
pub struct Program {
    /// The name the code runs it by (`Command::new(name)`), or a short label for a file.
    pub name: &'static str,
    /// Where Debian 12 installs it (the path `dpkg -S` knows).
    pub path: &'static str,
    pub package: &'static str,
    /// Who needs it, for the error that names what is missing.
    pub why: &'static str,
}

/// Debian's cargo for the eBPF build: rustc-web does not pull it in.
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Debian's rustc 1.96 with LLVM 22: builds `core` for bpfel with `-Z build-std`.
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const BPFTOOL: &str = "/usr/sbin/bpftool";
pub const IP: &str = "/bin/ip";
pub const APT_GET: &str = "/usr/bin/apt-get";
pub const DPKG_QUERY: &str = "/usr/bin/dpkg-query";
pub const LDD: &str = "/usr/bin/ldd";
pub const PYTHON: &str = "/usr/bin/python3";
pub const DPKG_DEB: &str = "/usr/bin/dpkg-deb";
pub const GZIP: &str = "/bin/gzip";

pub const PROGRAMS: &[Program] = &[
    Program { name: "cargo", path: DEBIAN_CARGO, package: "cargo-web", why: "the eBPF build" },
    Program { name: "rustc", path: DEBIAN_RUSTC, package: "rustc-web", why: "the eBPF build" },
    Program {
        name: "rust library source",
        path: "/usr/lib/rustlib/src/rust",
        package: "rust-web-src",
        why: "the eBPF build (-Z build-std=core)",
    },
    Program {
        name: "libLLVM 22",
        path: "/usr/lib/x86_64-linux-gnu/libLLVM.so.22.1",
        package: "libllvm22",
        why: "building bpf-linker",
    },
    Program { name: "bpftool", path: BPFTOOL, package: "bpftool", why: "the demo and tests" },
    Program { name: "ip", path: IP, package: "iproute2", why: "test networks in namespaces" },
    Program {
        name: "sysctl",
        path: "/sbin/sysctl",
        package: "procps",
        why: "namespace sysctls in the tests",
    },
    Program { name: "nsenter", path: "/usr/bin/nsenter", package: "util-linux", why: "the bench" },
    Program { name: "nft", path: "/usr/sbin/nft", package: "nftables", why: "the bench's baseline" },
    Program {
        name: "bash",
        path: "/bin/bash",
        package: "bash",
        why: "the shell-completion test loads the script",
    },
    Program {
        name: "systemd-analyze",
        path: "/usr/bin/systemd-analyze",
        package: "systemd",
        why: "the unit file and package tests",
    },
    Program {
        name: "systemctl",
        path: "/bin/systemctl",
        package: "systemd",
        why: "the package test, where systemd runs",
    },
    Program { name: "dpkg-deb", path: DPKG_DEB, package: "dpkg", why: "cargo xtask package" },
    Program { name: "gzip", path: GZIP, package: "gzip", why: "cargo xtask package (manual pages)" },
    Program {
        name: "dpkg",
        path: "/usr/bin/dpkg",
        package: "dpkg",
        why: "the package test installs and purges it",
    },
    Program {
        name: "dpkg-query",
        path: DPKG_QUERY,
        package: "dpkg",
        why: "the package test, cargo xtask setup",
    },
    Program { name: "python3", path: PYTHON, package: "python3-minimal", why: "the PyJWT interop test" },
    Program {
        name: "python3 jwt",
        path: "/usr/lib/python3/dist-packages/jwt/__init__.py",
        package: "python3-jwt",
        why: "the PyJWT interop test",
    },
    Program {
        name: "python3 cryptography",
        path: "/usr/lib/python3/dist-packages/cryptography/__init__.py",
        package: "python3-cryptography",
        why: "the PyJWT interop test",
    },
    Program { name: "touch", path: "/bin/touch", package: "coreutils", why: "agents the tests start" },
    Program { name: "sh", path: "/bin/sh", package: "dash", why: "agents the tests start" },
    Program { name: "apt-get", path: APT_GET, package: "apt", why: "cargo xtask setup" },
    Program {
        name: "ldd",
        path: LDD,
        package: "libc-bin",
        why: "checking bpf-linker's LLVM, the package's Depends",
    },
];

/// The Debian packages to install, each once, in table order.
pub fn packages() -> Vec<&'static str> {
    let mut packages: Vec<&str> = Vec::new();
    for program in PROGRAMS {
        if !packages.contains(&program.package) {
            packages.push(program.package);
        }
    }
    packages
}

/// The entries whose path is not on this machine.
pub fn missing() -> impl Iterator<Item = &'static Program> {
    PROGRAMS.iter().filter(|p| !std::path::Path::new(p.path).exists())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a panic is the report")]

    use std::{
        fs,
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    /// `/usr/bin/x` and `/bin/x` are one file on a merged-/usr system, but dpkg knows one name.
    fn dpkg_names(path: &str) -> Vec<String> {
        let mut names = vec![path.to_owned()];
        for (merged, plain) in [("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/"), ("/usr/lib/", "/lib/")] {
            if let Some(rest) = path.strip_prefix(merged) {
                names.push(format!("{plain}{rest}"));
            } else if let Some(rest) = path.strip_prefix(plain) {
                names.push(format!("{merged}{rest}"));
            }
        }
        names
    }

    #[test]
    fn each_path_belongs_to_the_package_named_for_it() {
        if !Path::new(DPKG_QUERY).exists() {
            eprintln!("no dpkg on this machine: the package table is checked on Debian only");
            return;
        }
        let mut checked = 0;
        for program in PROGRAMS {
            if !Path::new(program.path).exists() {
                eprintln!("{} ({}) is not installed here; not checked", program.name, program.path);
                continue;
            }
            let owners: Vec<String> = dpkg_names(program.path)
                .iter()
                .filter_map(|name| {
                    let out = Command::new(DPKG_QUERY).args(["-S", name]).output().unwrap();
                    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
                })
                .collect();
            // `dpkg -S` prints "package[:arch]: path".
            let named = owners.iter().flat_map(|o| o.lines()).any(|line| {
                let package = line.split(':').next().unwrap_or_default();
                package.split(", ").any(|p| p == program.package)
            });
            assert!(named, "{} is provided by {owners:?}, not by {}", program.path, program.package);
            checked += 1;
        }
        // dpkg, apt and libc-bin are on every Debian machine: the check above ran at least there.
        assert!(checked >= 3, "only {checked} entries could be checked");
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The string literal right after each occurrence of `pattern`, when it looks like a
    /// program name or path (this file's own `"Command::new("` does not).
    fn literals_after<'a>(source: &'a str, pattern: &str) -> Vec<&'a str> {
        let program_like = |s: &&str| s.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c));
        source
            .match_indices(pattern)
            .filter_map(|(at, _)| {
                let rest = source[at + pattern.len()..].strip_prefix('"')?;
                rest.split('"').next().filter(program_like)
            })
            .collect()
    }

    #[test]
    fn every_program_the_workspace_starts_is_in_the_table() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        for dir in ["xtask/src", "tests", "bench/src", "ztseg/src"] {
            rust_files(&root.join(dir), &mut files);
        }
        let mut started = 0;
        for file in &files {
            let source = fs::read_to_string(file).unwrap();
            for program in literals_after(&source, "Command::new(") {
                started += 1;
                let known = PROGRAMS.iter().any(|p| p.name == program || p.path == program);
                assert!(
                    known,
                    "{} starts `{program}`, which is not in xtask/src/programs.rs: add it with its Debian package",
                    file.display()
                );
            }
        }
        // This file's own `Command::new(DPKG_QUERY)` names a constant, not a literal.
        assert!(started >= 5, "found only {started} programs started by name: is the scan broken?");
    }

    #[test]
    fn the_scan_sees_a_literal_program_name() {
        assert_eq!(
            literals_after(r#"Command::new("ip").args(x); Command::new(bin)"#, "Command::new("),
            ["ip"]
        );
    }
}
