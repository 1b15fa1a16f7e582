//! Embeds the kernel programs built by `cargo xtask build`.
//!
//! The eBPF object needs its own toolchain (`cargo xtask setup`), so this script does not build
//! it: `cargo xtask build|test|demo` builds it first and passes its path in `ZTSEG_EBPF_OBJ`. A
//! plain `cargo build`/`check`/`clippy` embeds an empty object instead, and such a binary refuses
//! to enforce anything (it says to use `cargo xtask build`).
use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    println!("cargo:rerun-if-env-changed=ZTSEG_EBPF_OBJ");
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        println!("cargo::error=OUT_DIR is not set; run this build through cargo");
        return ExitCode::FAILURE;
    };
    let embedded = out_dir.join("ztseg-ebpf.o");
    let result = match env::var_os("ZTSEG_EBPF_OBJ") {
        Some(object) => {
            println!("cargo:rerun-if-changed={}", PathBuf::from(&object).display());
            fs::copy(&object, &embedded).map(drop).map_err(|e| {
                format!(
                    "ZTSEG_EBPF_OBJ={} cannot be copied ({e}); run `cargo xtask build`",
                    PathBuf::from(&object).display()
                )
            })
        }
        None => fs::write(&embedded, []).map_err(|e| format!("cannot write {}: {e}", embedded.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            println!("cargo::error={message}");
            ExitCode::FAILURE
        }
    }
}
