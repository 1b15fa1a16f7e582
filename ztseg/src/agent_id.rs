//! Agent ids: the name an orchestrator gives an agent, also the name of its cgroup directory.

use std::{fmt, str::FromStr};

/// Longest accepted agent id.
pub const MAX_LEN: usize = 64;

/// A validated agent id: 1 to 64 characters of `A-Z a-z 0-9 - _`, starting with a letter or a
/// digit. No dots, slashes or leading dashes, so an id is always a plain directory name that
/// cannot collide with a cgroup control file (`cgroup.procs`, `memory.max`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("agent id {id:?} is invalid: {why}")]
pub struct InvalidAgentId {
    pub id: String,
    pub why: &'static str,
}

impl AgentId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AgentId {
    type Err = InvalidAgentId;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let fail = |why| Err(InvalidAgentId { id: id.to_owned(), why });
        let Some(first) = id.chars().next() else {
            return fail("it is empty");
        };
        if id.len() > MAX_LEN {
            return fail("it is longer than 64 characters");
        }
        if !first.is_ascii_alphanumeric() {
            return fail("it must start with a letter or a digit");
        }
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return fail("only letters, digits, '-' and '_' are allowed");
        }
        Ok(Self(id.to_owned()))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for id in ["analyst-7", "A", "9lives", "agent_x-1"] {
            assert_eq!(id.parse::<AgentId>().unwrap().as_str(), id);
        }
        assert!("a".repeat(64).parse::<AgentId>().is_ok());
    }

    #[test]
    fn refuses_what_could_escape_or_collide_in_the_cgroup_tree() {
        for id in ["", "..", "a/b", "cgroup.procs", "-x", "_x", "a b", "é", "x\n"] {
            assert!(id.parse::<AgentId>().is_err(), "{id:?} was accepted");
        }
        assert!("a".repeat(65).parse::<AgentId>().is_err());
    }
}
