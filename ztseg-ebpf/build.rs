//! bpf-linker emits BTF (needed by the BTF-defined maps, and what makes `bpftool map dump` print
//! named fields) only when asked to.
fn main() {
    println!("cargo:rustc-link-arg=--btf");
}
