//! DNS under ztseg's control: agents resolve names through the daemon's proxy, which answers
//! only names their rules allow, and writes the answers' addresses into the kernel's rules
//! (the `learned` map) before it releases them, so the first connect after a lookup is never
//! refused, and nothing an agent puts in a query name leaves the host unless a rule allows
//! that name. The kernel half (the redirect of port 53, the `learned` lookups) is
//! `ztseg-ebpf/src/dns.rs`; see `ztseg_common::dns` for what they share.
//!
//! - [`rules`]: an agent's name rules, indexed (`*` is one label; a deny covers what is below);
//! - [`store`]: the names and addresses each agent holds, and the `learned` map's writes;
//! - [`answer`]: reading queries and upstream answers, writing answers (hickory's wire format);
//! - [`upstream`]: the resolvers asked;
//! - [`record`]: the audit records of queries;
//! - [`proxy`]: the sockets, and each query from arrival to answer.

pub mod answer;
#[cfg(test)]
mod fake_map;
pub mod proxy;
pub mod record;
pub mod rules;
pub mod store;
pub mod upstream;

#[cfg(test)]
mod proxy_tests;

pub use self::{
    rules::NameRules,
    store::{Limits, Store},
};
