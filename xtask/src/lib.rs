//! The parts of xtask the integration tests use too: the Debian package build (the package
//! test installs what `cargo xtask package` makes) and the table of programs relied on.

pub mod package;
pub mod programs;
