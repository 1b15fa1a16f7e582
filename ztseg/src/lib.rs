//! ztseg: per-agent, default-deny network segmentation enforced by eBPF cgroup programs.
//!
//! Modules follow the daemon's concerns; pure logic (parsing, compiling, encoding) never touches
//! the kernel and is unit-tested without root.

pub mod agent_id;
pub mod agent_uid;
pub mod audit;
pub mod cgroup;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod risk;
pub mod run;
pub mod sandbox;
pub mod sockets;
pub mod token;
